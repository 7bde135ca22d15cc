"""Defects the schemathesis runs (tests/test_fuzz.py, bench/fuzz.py) found, each pinned by
the request that showed it, over a real socket on the shared server."""

from __future__ import annotations

import uuid

import httpx
import pytest

from queen_tw.http.parsing import timestamp

# Timestamps Python's ISO parser accepted and PostgreSQL then refused (500), or that an
# offset pushed out of years 1-9999 (echoed back as a wrong year).
PG_REFUSED = ["2020-W01-1", "2020-01-01T00:00:00+23:59"]
OUT_OF_RANGE = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]


@pytest.mark.parametrize("sent", PG_REFUSED)
def test_timestamps_postgresql_would_refuse_are_sent_to_it_as_utc(http: httpx.Client, sent):
    group = f"fuzz-finding-{uuid.uuid4().hex[:8]}"
    answer = http.post(f"/api/v1/consumer-groups/{group}/subscription",
                       json={"subscriptionTimestamp": sent})
    assert answer.status_code == 200, answer.text
    assert answer.json()["newTimestamp"] == timestamp(sent, "t").replace("+00:00", ".000Z")
    for route in ("/api/v1/dlq", "/api/v1/messages"):
        listed = http.get(route, params={"from": sent})
        assert listed.status_code == 200, (route, listed.text)


@pytest.mark.parametrize("sent", OUT_OF_RANGE)
def test_timestamps_outside_years_1_to_9999_in_utc_answer_400(http: httpx.Client, sent):
    group = f"fuzz-finding-{uuid.uuid4().hex[:8]}"
    answer = http.post(f"/api/v1/consumer-groups/{group}/subscription",
                       json={"subscriptionTimestamp": sent})
    assert answer.status_code == 400
    assert answer.json() == {
        "error": "subscriptionTimestamp is out of range (years 1-9999 in UTC)"}
    listed = http.get("/api/v1/dlq", params={"to": sent})
    assert listed.status_code == 400
    assert listed.json()["error"].startswith("to is out of range")


def test_timestamps_are_read_as_utc():
    assert timestamp("2024-05-01 12:00:00.25+02:00", "t") == "2024-05-01T10:00:00.250000+00:00"
    assert timestamp("2024-05-01T12:00:00z", "t") == "2024-05-01T12:00:00+00:00"
    assert timestamp("2024-05-01T12:00:00", "t") == "2024-05-01T12:00:00+00:00"
    assert timestamp("", "t") is None
