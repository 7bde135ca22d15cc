"""The hot-path JSON codec must read and write exactly what the json module does."""

import json
import re

import pytest

from queen_tw import jsoncodec


@pytest.mark.parametrize("text", [
    b'{"big": 123456789012345678901234567890, "neg": -1180591620717411303424}',
    b'{"id": "1234567890123456789012", "n": 9223372036854775807}',
    b'{"text": "z\\u00e9 \\ud83c\\udf89", "small": 1.5}',
    '{"big": 123456789012345678901234567890}',  # str input
    b'[1, 2.5, true, null, "x"]',
])
def test_reads_exactly_what_json_reads(text):
    assert jsoncodec.loads(text) == json.loads(text)


def test_rejects_malformed_input_with_value_error():
    with pytest.raises(ValueError):
        jsoncodec.loads(b'{"x": ')
    with pytest.raises(ValueError):
        jsoncodec.loads(b'\xff\xfe')


@pytest.mark.parametrize("text,why", [
    (b'{"x": NaN}', "NaN"),
    (b'{"x": -Infinity, "big": 123456789012345678901234567890}', "-Infinity"),
    (b'[1e400]', "out of range"),
    (b'{"x": "a\\u0000"}', "\\u0000"),
    (b'{"k\\u0000": 1}', "\\u0000"),
    ('{"x": "a\\u0000"}', "\\u0000"),  # str input
    (b'["\\ud800"]', "surrogate"),
    (b'{"n": 123456789012345678901234567890, "s": "\\udfff"}', "surrogate"),
    (b"[" * 5000 + b"]" * 5000, "nested deeper than 512"),
    (b"[" * 513 + b"]" * 513, "nested deeper than 512"),
    (b'[' + b'1' * 30 + b', ' + b"[" * 513 + b"]" * 513 + b']', "nested deeper than 512"),
])
def test_refuses_what_postgresql_cannot_store(text, why):
    with pytest.raises(jsoncodec.UnstorableJSON, match=re.escape(why)):
        jsoncodec.loads(text)


@pytest.mark.parametrize("text", [
    b"[" * 512 + b"]" * 512,
    b'{"items": [' + b", ".join([b'{"a": [1]}'] * 600) + b']}',  # many brackets, shallow
    b"[" + b"[1], " * 300 + b"[" * 300 + b"]" * 301,  # many brackets, 301 deep: walked
    b'{"text": "not a NUL: \\\\u0000", "pair": "\\ud83c\\udf89"}',
])
def test_accepts_deep_wide_and_escaped_documents_within_the_limits(text):
    assert jsoncodec.loads(text) == json.loads(text)


def test_writes_integers_beyond_64_bits_exactly():
    value = {"big": 2**70, "text": "zé", "list": [1, None, True]}

    assert json.loads(jsoncodec.dumps(value)) == value
    assert json.loads(jsoncodec.dumps_text(value)) == value
