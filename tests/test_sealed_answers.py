"""Encrypted payloads opened inside answers PostgreSQL wrote as text (pops, fetch): only the
envelopes of encrypted messages change; everything else is left byte for byte."""

from __future__ import annotations

import json

from queen_tw.engine.sealed_answers import open_fetch_records, open_pop_messages

ENVELOPE = '{"iv": "aXY=", "authTag": "dGFn", "encrypted": "c2VjcmV0"}'


def opened(stored):
    return '{"plain":true}' if stored["encrypted"] == "c2VjcmV0" else None


def pop_message(message_id: str, data: str) -> str:
    return ('{"id":"' + message_id + '","transactionId":"a\\",\\"data\\":{}","leaseId":"",'
            + '"data":' + data + ',"createdAt":"x"}')


def test_a_pop_opens_only_the_encrypted_messages_envelopes():
    look_alike = pop_message("plain-1", ENVELOPE)  # a plain payload shaped like an envelope
    text = "[" + ",".join([pop_message("enc-1", ENVELOPE), look_alike,
                           pop_message("num-1", "[1.50, 0.12345678901234567890123]")]) + "]"

    out = open_pop_messages(text, ["enc-1"], opened)

    messages = json.loads(out)
    assert messages[0]["data"] == {"plain": True}
    assert out.endswith(look_alike + "," + pop_message("num-1", "[1.50, 0.12345678901234567890123]")
                        + "]")
    assert messages[0]["transactionId"] == 'a","data":{}'


def test_an_envelope_that_cannot_be_opened_goes_out_as_stored():
    other = ENVELOPE.replace("c2VjcmV0", "b3RoZXI=")
    text = "[" + pop_message("enc-1", other) + "]"

    assert open_pop_messages(text, ["enc-1"], opened) == text


def test_a_fetch_opens_marked_records_and_drops_every_marker():
    records = [
        '{"offset":0,"transactionId":"t0","payload":' + ENVELOPE
        + ',"ts":"2026-01-01T00:00:00.000000Z","encrypted":true}',
        '{"offset":1,"transactionId":"t1","payload":{"encrypted": true, "n": 1.50}'
        + ',"ts":"2026-01-01T00:00:00.000001Z"}',
        '{"offset":2,"transactionId":"t2","payload":' + ENVELOPE.replace("c2VjcmV0", "eA==")
        + ',"ts":"2026-01-01T00:00:00.000002Z","encrypted":true}',
    ]
    text = '{"entries":[{"queue":"q","partition":"p","records":[' + ",".join(records) + "]}]}"

    out = open_fetch_records(text, opened)

    got = json.loads(out)["entries"][0]["records"]
    assert got[0]["payload"] == {"plain": True} and "encrypted" not in got[0]
    assert '"payload":{"encrypted": true, "n": 1.50}' in out  # a plain record, as stored
    assert got[2]["payload"]["encrypted"] == "eA==" and "encrypted" not in got[2]
