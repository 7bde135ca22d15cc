"""The hot-path JSON codec must read and write exactly what the json module does."""

import json
import math

import pytest

from queen_tw import jsoncodec


@pytest.mark.parametrize("text", [
    b'{"big": 123456789012345678901234567890, "neg": -1180591620717411303424}',
    b'{"id": "1234567890123456789012", "n": 9223372036854775807}',
    '{"text": "z\\u00e9 \\ud83c\\udf89", "small": 1.5}'.encode(),
    '{"big": 123456789012345678901234567890}',  # str input
    b'[1, 2.5, true, null, "x"]',
])
def test_reads_exactly_what_json_reads(text):
    assert jsoncodec.loads(text) == json.loads(text)


def test_reads_nan_like_json_and_rejects_malformed_input_with_value_error():
    assert math.isnan(jsoncodec.loads(b'{"x": NaN}')["x"])
    with pytest.raises(ValueError):
        jsoncodec.loads(b'{"x": ')
    with pytest.raises(ValueError):
        jsoncodec.loads(b'\xff\xfe')


def test_writes_integers_beyond_64_bits_exactly():
    value = {"big": 2**70, "text": "zé", "list": [1, None, True]}

    assert json.loads(jsoncodec.dumps(value)) == value
    assert json.loads(jsoncodec.dumps_text(value)) == value
