"""Reads by offset (WIRE2.md 6.2, 6.3): ``POST /api/v1/fetch`` and ``POST
/api/v1/partitions/changed``, over raw HTTP (every rule, the 400s and the caps) and through the
official 2.6.0 client's ``queue.fetch`` / ``queue.changed_since``.
"""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
import psycopg2
import psycopg2.extras
import pytest

from tests.client26 import run26
from tests.http_helpers import configure, pop, push
from tests.support import db_clock_iso, pass_time, unique_name, wait_until

TIMESTAMP_6 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def fetch(http: httpx.Client, *entries: dict[str, Any], **top: Any) -> list[dict[str, Any]]:
    """The entries of a 200 fetch answer (anything else fails the test)."""
    answer = http.post("/api/v1/fetch", json={"entries": list(entries), **top})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["entries"]) == len(entries)
    return body["entries"]


def changed(http: httpx.Client, *entries: dict[str, Any]) -> dict[str, Any]:
    answer = http.post("/api/v1/partitions/changed", json={"entries": list(entries)})
    assert answer.status_code == 200, answer.text
    return answer.json()


def offsets_of(entry: dict[str, Any]) -> list[int]:
    return [record["offset"] for record in entry["records"]]


def clean(db) -> None:
    """Runs retention and eviction until a cycle got the cleaning lock and found no more."""
    for _ in range(200):
        with db.cursor() as cursor:
            cursor.execute("SELECT queen.cleanup_cycle(1000, true, true)")
            [(answer,)] = cursor.fetchall()
        if answer["locked"] and not answer["more"]:
            return
        time.sleep(0.05)
    raise AssertionError("the cleaning lock stayed busy")


def trimmed_queue(http: httpx.Client, db, old: int, new: int) -> str:
    """A queue whose ``old`` first messages (offsets 0..old-1) retention deleted, followed by
    ``new`` kept ones: logStartOffset ``old``, highWatermark ``old + new``."""
    queue = unique_name()
    push(http, queue, [{"n": n} for n in range(old)], prefix="old")
    pass_time(db, queue, 7200)
    push(http, queue, [{"n": old + n} for n in range(new)], prefix="new")
    configure(http, queue, retentionEnabled=True, retentionSeconds=3600)
    clean(db)
    return queue


# -- fetch --------------------------------------------------------------------------------


def test_fetch_answers_records_in_offset_order_with_the_bounds(http):
    queue = unique_name()
    push(http, queue, [{"n": 0}, {"n": 1}, {"n": 2}], partition="p")
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": "p", "transactionId": txid, "payload": {"txid": txid}}
        for txid in ("t1", "x", "x", "y")]})  # a stored and an in-array duplicate
    assert [r["status"] for r in answer.json()] == ["duplicate", "queued", "duplicate", "queued"]

    whole, tail, at_end, past_end = fetch(
        http, {"queue": queue, "partition": "p", "offset": 0},
        {"queue": queue, "partition": "p", "offset": 3},
        {"queue": queue, "partition": "p", "offset": 5},
        {"queue": queue, "partition": "p", "offset": 6})

    assert offsets_of(whole) == [0, 1, 2, 3, 4]
    assert [r["transactionId"] for r in whole["records"]] == ["t0", "t1", "t2", "x", "y"]
    assert whole["records"][3]["payload"] == {"txid": "x"}
    assert all(TIMESTAMP_6.match(r["ts"]) for r in whole["records"])
    assert (whole["queue"], whole["partition"]) == (queue, "p")
    assert (whole["highWatermark"], whole["logStartOffset"]) == (5, 0)
    assert "error" not in whole
    assert offsets_of(tail) == [3, 4]
    assert at_end["records"] == [] and "error" not in at_end  # offset == highWatermark
    assert past_end["records"] == [] and past_end["error"] == "OFFSET_OUT_OF_RANGE"
    assert past_end["highWatermark"] == 5


def test_unknown_queue_is_an_error_and_an_unwritten_partition_an_empty_log(http):
    queue = unique_name()
    push(http, queue, ["d0", "d1"])
    push(http, queue, ["three"], partition="3")
    unknown, unwritten, default, numbered = fetch(
        http, {"queue": unique_name(), "offset": 0},
        {"queue": queue, "partition": "never", "offset": 0},
        {"queue": queue, "offset": 1},          # no partition: Default
        {"queue": queue, "partition": 3, "offset": 0})  # a number names partition "3"

    assert unknown["error"] == "UNKNOWN_TOPIC_OR_PARTITION" and unknown["records"] == []
    assert (unknown["highWatermark"], unknown["logStartOffset"]) == (0, 0)
    assert "error" not in unwritten and unwritten["records"] == []
    assert (unwritten["highWatermark"], unwritten["logStartOffset"]) == (0, 0)
    assert default["partition"] == "Default"
    assert [r["payload"] for r in default["records"]] == ["d1"]
    assert numbered["partition"] == "3" and numbered["records"][0]["payload"] == "three"


def test_an_offset_retention_deleted_is_out_of_range_and_the_log_start_moves(http, db):
    queue = trimmed_queue(http, db, old=3, new=3)
    before, kept = fetch(http, {"queue": queue, "offset": 1}, {"queue": queue, "offset": 3})

    assert before["error"] == "OFFSET_OUT_OF_RANGE" and before["records"] == []
    assert (before["logStartOffset"], before["highWatermark"]) == (3, 6)
    assert offsets_of(kept) == [3, 4, 5]
    assert [r["payload"] for r in kept["records"]] == [{"n": 3}, {"n": 4}, {"n": 5}]


def test_a_partition_cleaned_up_when_idle_numbers_on_from_its_old_offsets(http, db):
    """PARTITION_CLEANUP_DAYS drops an empty idle partition's row: its offsets must survive it
    (a reader resuming at its stored offset would otherwise skip what comes next)."""
    queue = unique_name()
    push(http, queue, ["a", "b", "c"], partition="p1")
    assert http.delete(f"/api/v1/queues/{queue}/clear").status_code == 200
    with db.cursor() as cursor:
        cursor.execute("""UPDATE queen.partitions SET last_activity = now() - interval '40 days'
                           WHERE name = 'p1'
                             AND queue_id = (SELECT id FROM queen.queues WHERE name = %s)""",
                       (queue,))

    def dropped() -> bool:
        with db.cursor() as cursor:
            cursor.execute("SELECT queen.cleanup_partitions(30, 1000)")
            cursor.execute("""SELECT count(*) FROM queen.partitions p JOIN queen.queues q
                                ON q.id = p.queue_id WHERE q.name = %s AND p.name = 'p1'""",
                           (queue,))
            return cursor.fetchone()[0] == 0
    wait_until(dropped, message="the idle partition dropped")

    [gone] = fetch(http, {"queue": queue, "partition": "p1", "offset": 3})
    assert (gone["records"], gone["highWatermark"], gone["logStartOffset"]) == ([], 3, 3)
    assert "error" not in gone
    push(http, queue, ["d"], partition="p1", prefix="again")
    [back] = fetch(http, {"queue": queue, "partition": "p1", "offset": 3})
    assert [(r["offset"], r["payload"]) for r in back["records"]] == [(3, "d")]
    assert (back["highWatermark"], back["logStartOffset"]) == (4, 3)
    with db.cursor() as cursor:  # the kept offsets went back into the partition's row
        cursor.execute("""SELECT count(*) FROM queen.dropped_partitions d JOIN queen.queues q
                            ON q.id = d.queue_id WHERE q.name = %s""", (queue,))
        assert cursor.fetchone()[0] == 0


def _incompressible(size: int) -> str:
    return os.urandom(size // 2).hex()


def test_byte_caps_per_entry_and_per_call_and_the_first_record_always_goes(http):
    queue = unique_name()
    push(http, queue, [_incompressible(1000) for _ in range(5)], partition="a")
    push(http, queue, [_incompressible(1000) for _ in range(5)], partition="b")
    a = {"queue": queue, "partition": "a", "offset": 0}
    b = {"queue": queue, "partition": "b", "offset": 0}

    [capped] = fetch(http, dict(a, maxBytes=2500))
    assert offsets_of(capped) == [0, 1]  # ~1 KB each: a third would pass 2500 bytes
    [oversized] = fetch(http, dict(a, maxBytes=10))
    assert offsets_of(oversized) == [0]  # larger than the cap, delivered all the same
    first, second = fetch(http, dict(a, maxBytes=10), dict(b, maxBytes=10))
    assert offsets_of(first) == [0] and second["records"] == []  # only the call's first
    assert "error" not in second and second["highWatermark"] == 5

    first, second = fetch(http, a, b, maxBytes=3500)  # the whole call's budget
    assert offsets_of(first) == [0, 1, 2] and second["records"] == []
    first, second = fetch(http, a, b, maxBytes=1)
    assert offsets_of(first) == [0] and second["records"] == []
    first, second = fetch(http, a, b)
    assert offsets_of(first) == offsets_of(second) == [0, 1, 2, 3, 4]


def test_compressible_payloads_count_their_full_size_not_their_stored_one(http):
    """PostgreSQL compresses a repetitive payload when it stores it: counted at that size, a
    fetch of 30 MiB payloads took every record and overran PostgreSQL's 1 GB string limit."""
    queue = unique_name()
    push(http, queue, ["a" * 1_000_000 for _ in range(6)], partition="a")

    [entry] = fetch(http, {"queue": queue, "partition": "a", "offset": 0,
                           "maxBytes": 3_500_000})

    assert offsets_of(entry) == [0, 1, 2]
    assert all(record["payload"] == "a" * 1_000_000 for record in entry["records"])


def test_an_encrypted_queue_is_capped_by_its_payload_bytes_not_its_ciphertext(http):
    plain, sealed = unique_name(), unique_name()
    configure(http, sealed, encryptionEnabled=True)
    for queue in (plain, sealed):
        push(http, queue, [_incompressible(1000) for _ in range(6)], partition="a")

    [from_plain] = fetch(http, {"queue": plain, "partition": "a", "offset": 0, "maxBytes": 4100})
    [from_sealed] = fetch(http, {"queue": sealed, "partition": "a", "offset": 0,
                                 "maxBytes": 4100})

    assert offsets_of(from_sealed) == offsets_of(from_plain) == [0, 1, 2, 3]


def test_an_entry_returns_at_most_ten_thousand_records(http):
    queue = unique_name()
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "payload": n} for n in range(10_005)]}, timeout=120)
    assert answer.status_code == 201
    [entry] = fetch(http, {"queue": queue, "offset": 0, "maxBytes": 8 * 1024 * 1024})
    assert offsets_of(entry) == list(range(10_000))
    assert entry["highWatermark"] == 10_005


def test_payloads_come_back_decrypted_and_null_stays_null(http):
    secret, plain = unique_name(), unique_name()
    configure(http, secret, encryptionEnabled=True)
    push(http, secret, [{"card": "4111"}, None, "text"])
    push(http, plain, [None, {"x": [1, 2]}])
    encrypted, clear = fetch(http, {"queue": secret, "offset": 0}, {"queue": plain, "offset": 0})

    assert [r["payload"] for r in encrypted["records"]] == [{"card": "4111"}, None, "text"]
    assert all(set(r) == {"offset", "transactionId", "payload", "ts"}
               for r in encrypted["records"])
    assert [r["payload"] for r in clear["records"]] == [None, {"x": [1, 2]}]


def test_fetch_moves_no_cursor_and_takes_no_lease(http):
    queue = unique_name()
    push(http, queue, ["m0", "m1"])
    assert offsets_of(fetch(http, {"queue": queue, "offset": 0})[0]) == [0, 1]
    assert offsets_of(fetch(http, {"queue": queue, "offset": 0})[0]) == [0, 1]
    popped = pop(http, queue, batch=10)
    assert popped is not None and [m["data"] for m in popped["messages"]] == ["m0", "m1"]


@pytest.mark.parametrize(("body", "complaint"), [
    ({"entries": {"queue": "q"}}, "entries must be an array"),
    ({"entries": [{"queue": "q", "offset": 0}] * 1025}, "1025 entries exceed the limit of 1024"),
    ({"entries": ["q"]}, "entries[0] must be an object"),
    ({"entries": [{"offset": 0}]}, "entries[0].queue must be a string"),
    ({"entries": [{"queue": "", "offset": 0}]}, "entries[0].queue must not be empty"),
    ({"entries": [{"queue": "q", "partition": True, "offset": 0}]},
     "entries[0].partition must be a string"),
    ({"entries": [{"queue": "q"}]}, "entries[0].offset must be an integer"),
    ({"entries": [{"queue": "q", "offset": "0"}]}, "entries[0].offset must be an integer"),
    ({"entries": [{"queue": "q", "offset": 1.5}]}, "entries[0].offset must be an integer"),
    ({"entries": [{"queue": "q", "offset": -1}]}, "entries[0].offset must not be negative"),
    ({"entries": [{"queue": "q", "offset": 0, "maxBytes": "1"}]},
     "entries[0].maxBytes must be an integer"),
    ({"entries": [], "maxWaitMs": -1}, "maxWaitMs must not be negative"),
    ({"entries": [], "maxBytes": False}, "maxBytes must be an integer"),
    ({"entries": [], "minBytes": 0.5}, "minBytes must be an integer"),
])
def test_fetch_refuses_a_bad_body_with_400_naming_the_field(http, body, complaint):
    answer = http.post("/api/v1/fetch", json=body)
    assert answer.status_code == 400
    assert complaint in answer.json()["error"]


def test_fetch_of_nothing_and_of_1024_entries_answers(http):
    assert http.post("/api/v1/fetch", content=b"").json() == {"entries": []}
    queue = unique_name()
    push(http, queue, ["only"])
    entries = fetch(http, *[{"queue": queue, "offset": 0}] * 1024)
    assert all(offsets_of(entry) == [0] for entry in entries)
    assert http.post("/api/v1/fetch", content=b"{not json").status_code == 400


# -- the long poll ------------------------------------------------------------------------


def test_long_poll_returns_when_a_push_arrives(http):
    queue = unique_name()
    push(http, queue, ["first"], partition="p")
    later = threading.Timer(0.5, lambda: push(http, queue, ["second"], partition="p",
                                              prefix="later"))
    started = time.monotonic()
    later.start()
    try:
        [entry] = fetch(http, {"queue": queue, "partition": "p", "offset": 1}, maxWaitMs=20_000)
    finally:
        later.join()
    assert [r["payload"] for r in entry["records"]] == ["second"]
    assert time.monotonic() - started < 15  # woken by the push, not by the deadline


def test_long_poll_answers_at_its_deadline_and_at_once_on_an_entry_error(http):
    queue = unique_name()
    push(http, queue, ["only"])
    started = time.monotonic()
    [entry] = fetch(http, {"queue": queue, "offset": 1}, maxWaitMs=400)
    assert entry["records"] == [] and "error" not in entry
    assert time.monotonic() - started >= 0.4

    started = time.monotonic()
    quiet, unknown = fetch(http, {"queue": queue, "offset": 1},
                           {"queue": unique_name(), "offset": 0}, maxWaitMs=20_000)
    assert unknown["error"] == "UNKNOWN_TOPIC_OR_PARTITION"
    assert time.monotonic() - started < 10

    started = time.monotonic()  # records already there: no wait either
    [entry] = fetch(http, {"queue": queue, "offset": 0}, maxWaitMs=20_000, minBytes=1)
    assert offsets_of(entry) == [0] and time.monotonic() - started < 10


# -- partitions/changed -------------------------------------------------------------------


def test_listing_by_name_pages_with_next_until_null(http):
    queue = unique_name()
    for name in ("c", "a", "d", "b", "e"):
        push(http, queue, [name, name], partition=name)
    names: list[str] = []
    after = None
    for _ in range(5):
        answer = changed(http, {"queue": queue, "limit": 2, "after": after})
        [entry] = answer["entries"]
        names += [p["name"] for p in entry["partitions"]]
        after = entry["next"]
        if after is None:
            break
    assert names == ["a", "b", "c", "d", "e"]

    [entry] = changed(http, {"queue": queue})["entries"]
    a = entry["partitions"][0]
    assert (a["name"], a["lastOffset"], a["logStart"]) == ("a", 1, 0)
    assert TIMESTAMP_6.match(a["lastWriteAt"]) and len(a["id"]) == 36
    assert entry["next"] is None and "error" not in entry


def test_since_lists_partitions_written_from_then_by_last_write(http, db):
    queue = unique_name()
    push(http, queue, ["old"], partition="early")
    cut = db_clock_iso(db)
    push(http, queue, ["x"], partition="z-first")
    push(http, queue, ["y"], partition="a-second")
    push(http, queue, ["z"], partition="z-first", prefix="again")

    [entry] = changed(http, {"queue": queue, "since": cut})["entries"]
    assert [p["name"] for p in entry["partitions"]] == ["a-second", "z-first"]
    assert entry["partitions"][1]["lastOffset"] == 1

    first = changed(http, {"queue": queue, "since": cut, "limit": 1})["entries"][0]
    second = changed(http, {"queue": queue, "since": cut, "limit": 1,
                            "after": first["next"]})["entries"][0]
    assert [p["name"] for p in first["partitions"] + second["partitions"]] == [
        "a-second", "z-first"]
    assert second["next"] is None


def test_a_cursor_of_the_other_mode_or_a_made_up_one_is_bad_and_a_missing_queue_unknown(http):
    queue = unique_name()
    for name in ("a", "b"):
        push(http, queue, [name], partition=name)
    by_name = changed(http, {"queue": queue, "limit": 1})["entries"][0]["next"]
    by_time = changed(http, {"queue": queue, "limit": 1,
                             "since": "2000-01-01T00:00:00Z"})["entries"][0]["next"]
    answer = changed(http, {"queue": queue, "since": "2000-01-01", "after": by_name},
                     {"queue": queue, "after": by_time},
                     {"queue": queue, "after": "n:zz"},
                     {"queue": unique_name()},
                     {"queue": queue, "after": ""})
    errors = [entry.get("error") for entry in answer["entries"]]
    assert errors == ["BAD_CURSOR", "BAD_CURSOR", "BAD_CURSOR", "UNKNOWN_TOPIC_OR_PARTITION",
                      None]
    assert answer["entries"][3]["partitions"] == [] and answer["entries"][3]["next"] is None
    assert [p["name"] for p in answer["entries"][4]["partitions"]] == ["a", "b"]


def test_safe_time_is_fixed_format_and_no_later_than_an_open_writing_transaction(http, pg_dsn):
    queue = unique_name()
    push(http, queue, ["before"], partition="seen")
    writer = psycopg2.connect(pg_dsn)
    try:
        with writer.cursor() as cursor:  # a push left uncommitted: psycopg2 opened a transaction
            cursor.execute("SELECT queen.push_messages_v2(%s::jsonb)", (psycopg2.extras.Json(
                [{"queue": queue, "partition": "late", "payload": 1}]),))
            cursor.execute("SELECT now()")
            [(writer_start,)] = cursor.fetchall()
        time.sleep(0.1)
        answer = changed(http, {"queue": queue, "since": "2000-01-01T00:00:00.000000Z"})
        assert TIMESTAMP_6.match(answer["safeTime"]) and "safeTimeDegraded" not in answer
        assert [p["name"] for p in answer["entries"][0]["partitions"]] == ["seen"]
        safe = answer["safeTime"]
        assert safe <= writer_start.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        writer.commit()
    finally:
        writer.close()
    # what the uncommitted push wrote is at or after safeTime: the next pass sees it
    [entry] = changed(http, {"queue": queue, "since": safe})["entries"]
    assert "late" in [p["name"] for p in entry["partitions"]]


def test_safe_time_is_degraded_when_other_sessions_are_hidden(http, db, pg_dsn):
    role = f"reader_{unique_name('r')[:20].replace('-', '_')}"
    with db.cursor() as cursor:
        cursor.execute(f'CREATE ROLE "{role}"')
        cursor.execute(f'GRANT USAGE ON SCHEMA queen TO "{role}"')
        cursor.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA queen TO "{role}"')
    reader = psycopg2.connect(pg_dsn)
    reader.autocommit = True
    try:
        with reader.cursor() as cursor:
            cursor.execute(f'SET ROLE "{role}"')
            cursor.execute("SELECT body FROM queen.partitions_changed('[]'::jsonb, 5, 30)")
            [(body,)] = cursor.fetchall()
            cursor.execute("SELECT now()")
            [(now,)] = cursor.fetchall()
    finally:
        reader.close()
        with db.cursor() as cursor:
            cursor.execute(f'DROP OWNED BY "{role}"')
            cursor.execute(f'DROP ROLE "{role}"')
    assert '"safeTimeDegraded":true' in body
    safe = re.search(r'"safeTime":"([^"]+)"', body)
    assert safe is not None
    assert datetime.fromisoformat(safe.group(1)) <= now - timedelta(seconds=30)


def test_changed_answers_safe_time_for_no_entries_and_clamps_the_limit(http):
    answer = changed(http)
    assert answer["entries"] == [] and TIMESTAMP_6.match(answer["safeTime"])
    queue = unique_name()
    for name in ("a", "b"):
        push(http, queue, [name], partition=name)
    assert len(changed(http, {"queue": queue, "limit": 0})["entries"][0]["partitions"]) == 1
    assert len(changed(http, {"queue": queue, "limit": 10**9})["entries"][0]["partitions"]) == 2


@pytest.mark.parametrize(("body", "complaint"), [
    ({"entries": [{"queue": "q", "since": "yesterday-ish"}]}, "since is not a timestamp"),
    ({"entries": [{"queue": "q", "since": "current"}]}, "since is not a timestamp"),
    ({"entries": [{"queue": "q", "since": 17}]}, "entries[0].since must be a timestamp"),
    ({"entries": [{"queue": "q", "after": 3}]}, "entries[0].after must be a string"),
    ({"entries": [{"queue": "q", "limit": "10"}]}, "entries[0].limit must be an integer"),
    ({"entries": [{"queue": ""}]}, "entries[0].queue must not be empty"),
    ({"entries": [{"queue": "q"}] * 65}, "65 entries exceed the limit of 64"),
    ({"entries": "q"}, "entries must be an array"),
])
def test_changed_refuses_a_bad_body_with_400_naming_the_field(http, body, complaint):
    answer = http.post("/api/v1/partitions/changed", json=body)
    assert answer.status_code == 400
    assert complaint in answer.json()["error"]


# -- the official 2.6.0 client --------------------------------------------------------------

CLIENT_FETCH = """
async def scenario(client, args):
    offsets = args.get("offsets")
    return await client.queue(args["queue"]).fetch(
        args["partitions"], offsets=offsets, max_bytes=args["max_bytes"])
"""


def test_client_fetch_reads_every_record_in_order_and_resumes_past_retention(http, server, db):
    queue = unique_name()
    push(http, queue, [{"n": n} for n in range(300)])
    push(http, queue, [_incompressible(200) for _ in range(40)], partition="b")
    first = run26(server.url, CLIENT_FETCH, queue=queue, partitions=["Default", "b", "never"],
                  max_bytes=3000)  # ~20 bytes and ~200 bytes a record: many calls each

    assert [r["payload"] for r in first["Default"]["records"]] == [{"n": n} for n in range(300)]
    assert [r["offset"] for r in first["Default"]["records"]] == list(range(300))
    assert [r["offset"] for r in first["b"]["records"]] == list(range(40))
    assert first["Default"]["nextOffset"] == first["Default"]["highWatermark"] == 300
    assert first["never"]["records"] == [] and first["never"]["highWatermark"] == 0

    # retention deletes past where the reader stopped; it resumes at the oldest kept record
    push(http, queue, [{"n": 300 + n} for n in range(20)], prefix="mid")
    pass_time(db, queue, 7200)
    push(http, queue, [{"n": 320 + n} for n in range(5)], prefix="new")
    configure(http, queue, retentionEnabled=True, retentionSeconds=3600)
    clean(db)
    resumed = run26(server.url, CLIENT_FETCH, queue=queue, partitions=["Default"],
                    offsets={"Default": first["Default"]["nextOffset"]}, max_bytes=3000)

    kept = resumed["Default"]
    assert (kept["logStartOffset"], kept["highWatermark"], kept["nextOffset"]) == (320, 325, 325)
    assert [r["offset"] for r in kept["records"]] == list(range(320, 325))
    assert [r["payload"] for r in kept["records"]] == [{"n": n} for n in range(320, 325)]


CLIENT_CHANGED = """
async def scenario(client, args):
    return await client.queue(args["queue"]).changed_since(args.get("since"))
"""


def test_client_changed_since_pages_both_ways_and_safe_time_chains(http, server, db):
    queue = unique_name()
    names = [f"p{n:04d}" for n in range(1001)]  # more than one page of 1000
    answer = http.post("/api/v1/push", json={"items": [
        {"queue": queue, "partition": name, "payload": name} for name in names]}, timeout=120)
    assert answer.status_code == 201

    by_name = run26(server.url, CLIENT_CHANGED, queue=queue)
    assert [p["name"] for p in by_name["partitions"]] == names
    assert TIMESTAMP_6.match(by_name["safeTime"])
    by_write = run26(server.url, CLIENT_CHANGED, queue=queue, since="2000-01-01T00:00:00Z")
    assert sorted(p["name"] for p in by_write["partitions"]) == names
    written = [p["lastWriteAt"] for p in by_write["partitions"]]
    assert written == sorted(written)

    with db.cursor() as cursor:  # an hour passes for these partitions
        cursor.execute("""UPDATE queen.partitions p
                             SET last_write_at = last_write_at - interval '1 hour'
                            FROM queen.queues q WHERE q.id = p.queue_id AND q.name = %s""",
                       (queue,))
    settled = run26(server.url, CLIENT_CHANGED, queue=queue, since="2000-01-01T00:00:00Z")
    push(http, queue, ["again"], partition="p0500", prefix="again")
    push(http, queue, ["new"], partition="zz-new")
    since_then = run26(server.url, CLIENT_CHANGED, queue=queue, since=settled["safeTime"])
    assert [p["name"] for p in since_then["partitions"]] == ["p0500", "zz-new"]
    assert since_then["partitions"][0]["lastOffset"] == 1
    assert since_then["safeTime"] >= settled["safeTime"]


def test_a_long_poll_whose_client_leaves_ends_cleanly(http, server):
    queue = unique_name()
    push(http, queue, ["only"])
    with pytest.raises(httpx.ReadTimeout):
        http.post("/api/v1/fetch", timeout=0.5, json={
            "entries": [{"queue": queue, "offset": 1}], "maxWaitMs": 2000})
    time.sleep(2.5)  # past the poll's deadline: nothing may be left to fire
    push(http, queue, ["next"], prefix="next")  # nor a wake-up to a watch long gone
    [entry] = fetch(http, {"queue": queue, "offset": 1})
    assert [r["payload"] for r in entry["records"]] == ["next"]
    log = server.log_text()
    assert "AlreadyCalledError" not in log and "parked fetch" not in log
    assert "Unhandled error in Deferred" not in log
