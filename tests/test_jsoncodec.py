"""The hot-path JSON codec must read and write exactly what the json module does."""

import json
import re

import orjson
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


def test_keeps_json_text_as_it_came_beside_integers_beyond_64_bits():
    """A binary push's payload (a fragment) fused with a JSON push holding a big integer:
    the standard library wrote the integer but refused the fragment, and the fused push
    answered 500 to every request in it."""
    exact = orjson.Fragment(b'{"price":12345678901234.123456789,"z":1.50}')
    value = [{"payload": exact, "n": 2**70}, {"payload": orjson.Fragment("[]"),
                                              "text": "\\u00001\\u0000 zé"}]

    written = jsoncodec.dumps(value)

    assert written == (b'[{"payload":{"price":12345678901234.123456789,"z":1.50},'
                       b'"n":1180591620717411303424},{"payload":[],'
                       b'"text":"\\\\u00001\\\\u0000 z\xc3\xa9"}]')


def test_keeps_json_text_in_documents_too_deep_for_orjson():
    exact = orjson.Fragment(b"1.50")
    deep: list = []
    innermost = deep
    for _ in range(300):
        innermost.append([])
        innermost = innermost[0]
    innermost.append(exact)

    assert jsoncodec.dumps(deep) == b"[" * 301 + b"1.50" + b"]" * 301


def test_still_refuses_what_it_cannot_write():
    with pytest.raises(TypeError):
        jsoncodec.dumps({"n": 2**70, "when": object()})
