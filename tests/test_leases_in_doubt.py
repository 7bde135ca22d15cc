"""Leases of pops the server never answered with are expired once PostgreSQL answers.

A pop call the server gave up on (its deadline passed, the connection broke) may still be
committed by PostgreSQL, e.g. once a frozen server thaws: its lease is held by nobody and
hid the partition's messages for leaseTime. The server makes every lease id, remembers the
ones in doubt, and expires them (``queen.expire_leases``) while they could still appear.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from queen_tw.engine.leases_in_doubt import (
    DOUBT_S,
    MOST_IN_DOUBT,
    ROUND_S,
    LeasesInDoubt,
    new_lease_id,
)
from queen_tw.errors import DatabaseUnavailable

from tests.faultkit import Fleet, private_postgres
from tests.http_helpers import ack, configure, poll_pop, pop, push
from tests.support import unique_name


class _Calls:
    def __init__(self, answer: Any = ()):
        self.made: list[tuple[str, list[str]]] = []
        self.answer = answer
        self.fail = False

    def __call__(self, name: str, leases: list[str]) -> defer.Deferred:
        self.made.append((name, sorted(leases)))
        if self.fail:
            return defer.fail(DatabaseUnavailable("PostgreSQL away"))
        return defer.succeed(list(self.answer))


def test_leases_in_doubt_are_expired_in_rounds_until_their_doubt_is_over() -> None:
    clock, calls, freed = Clock(), _Calls([["q", "p"]]), []
    doubt = LeasesInDoubt(calls, clock, freed.extend)
    clock.advance(10 * ROUND_S)
    assert calls.made == []  # nothing in doubt: no call

    doubt.note("lease-a")
    calls.fail = True
    clock.advance(ROUND_S)  # PostgreSQL away: tried, kept
    calls.fail = False
    clock.advance(ROUND_S)

    assert calls.made == [("expire_leases", ["lease-a"])] * 2
    assert freed == [("q", "p")] and len(doubt) == 1  # still in doubt: it may yet commit
    clock.advance(DOUBT_S)
    assert len(doubt) == 0  # expired once more after its doubt ended: settled
    made = len(calls.made)
    clock.advance(10 * ROUND_S)
    assert len(calls.made) == made  # no more rounds


def test_leases_never_settled_are_forgotten_and_their_number_is_bounded() -> None:
    """PostgreSQL away all along: the set neither grows without bound during the outage nor
    keeps a 2 s timer running for ever after it."""
    clock, calls = Clock(), _Calls()
    calls.fail = True
    doubt = LeasesInDoubt(calls, clock, lambda freed: None)
    for n in range(MOST_IN_DOUBT + 5):
        doubt.note(f"lease-{n}")
    assert len(doubt) == MOST_IN_DOUBT

    for _ in range(int(2 * DOUBT_S / ROUND_S) + 2):
        clock.advance(ROUND_S)
    made = len(calls.made)
    clock.advance(100 * ROUND_S)

    assert len(doubt) == 0 and len(calls.made) == made  # forgotten; no timer left
    assert max(len(leases) for _, leases in calls.made) <= 1000  # (sent in chunks)


def test_lease_ids_are_version_4_uuids_and_differ() -> None:
    made = {new_lease_id() for _ in range(1000)}
    assert len(made) == 1000
    for text in list(made)[:50]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_expire_leases_frees_the_partitions_of_those_leases_only(http, db) -> None:
    queue, other = unique_name(), unique_name()
    push(http, queue, ["one"])
    push(http, other, ["two"])
    lost = pop(http, queue)["messages"][0]
    pop(http, other)  # held by its consumer

    with db.cursor() as cursor:
        cursor.execute("SELECT queen.expire_leases(%s::jsonb)", (json.dumps(
            [lost["leaseId"], "00000000-0000-4000-8000-000000000000"]),))
        [(freed,)] = cursor.fetchall()

    assert freed == [[queue, "Default"]]
    again = pop(http, queue)["messages"]
    assert [m["transactionId"] for m in again] == [lost["transactionId"]]
    assert http.get(f"/api/v1/pop/queue/{other}").status_code == 204  # still held


@pytest.mark.fault
def test_a_pop_the_server_gave_up_on_during_a_freeze_hides_nothing_for_lease_time() -> None:
    """PostgreSQL frozen: the pop's call misses its 2 s deadline and answers 204, but its
    statement is in PostgreSQL's socket and runs when it thaws, committing a lease nobody
    holds (300 s here). The lease was in doubt: expired within a round or two."""
    with private_postgres() as postgres:
        fleet = Fleet(postgres.pg_env())
        try:
            server = fleet.server(LIBQUEEN_INFLIGHT_DEADLINE_MS="2000")
            delivered = _pop_after_a_frozen_pop(server.url, postgres)
        finally:
            postgres.thaw()
            fleet.close()
    assert delivered["messages"][0]["data"] == "second"


def _pop_after_a_frozen_pop(url: str, postgres) -> dict:
    queue = unique_name()
    with httpx.Client(base_url=url, timeout=30) as http:
        configure(http, queue, leaseTime=300)
        push(http, queue, ["first"])
        ack(http, pop(http, queue)["messages"][0])  # the group's row and subscription exist
        push(http, queue, ["second"], prefix="later")
        postgres.freeze()
        try:
            unanswered = http.get(f"/api/v1/pop/queue/{queue}", params={"wait": "false"})
        finally:
            postgres.thaw()
        assert unanswered.status_code == 204
        # (a ceiling for a broken server: a round comes every 2 s)
        return poll_pop(http, queue, within=30)
