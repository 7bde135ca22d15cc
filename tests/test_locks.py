"""Locks and semaphores (WIRE2.md 4): POST /api/v1/locks over KV rows, fencing tokens, expiry
and takeover, the transaction guard; raw HTTP and the real 2.6.0 client (one of them
SIGKILLed while it holds a lock)."""

import json
import os
import signal
import subprocess
import tempfile
import textwrap
import time
from datetime import datetime
from typing import Any, Dict

import httpx
from client26 import client26_python, run26

from support import count_messages, unique_name


def lock_op(http: httpx.Client, **op: Any) -> Dict[str, Any]:
    answer = http.post("/api/v1/locks", json={"operations": [op]})
    assert answer.status_code == 200, answer.text
    [result] = answer.json()["results"]
    return result


def expire_permit(db, name: str, slot: int = 0) -> None:
    with db.cursor() as cursor:
        cursor.execute("UPDATE queen.kv SET expires_at = now() - interval '1 second' "
                       "WHERE namespace = 'queen-locks' AND key = %s", (f"{name}#{slot}",))
        assert cursor.rowcount == 1
    db.commit()


def guarded_push(http: httpx.Client, guard: Dict[str, Any], queue: str) -> Dict[str, Any]:
    return http.post("/api/v1/transaction", json={"operations": [
        {"type": "push", "items": [{"queue": queue, "payload": "work"}]}],
        "kv": [guard]}).json()


def test_acquire_refuses_a_second_owner_and_answers_a_retry_of_the_first(http):
    name = unique_name("lock-")
    first = lock_op(http, op="acquire", name=name, ttlSeconds=30, owner="a")
    assert first["acquired"] is True and first["slot"] == 0 and first["owner"] == "a"
    assert first["guard"] == {"op": "check", "ns": "queen-locks", "key": f"{name}#0",
                              "expect": first["token"], "required": True}
    other = lock_op(http, op="acquire", name=name, ttlSeconds=30, owner="b")
    assert other["acquired"] is False and other["reason"] == "held"
    assert other["holders"] == [{"slot": 0, "owner": "a"}]
    retry = lock_op(http, op="acquire", name=name, ttlSeconds=30, owner="a")
    assert retry["acquired"] is True and retry["already"] is True
    assert retry["token"] == first["token"]


def test_renew_gives_a_new_token_and_the_old_one_stops_working(http):
    name = unique_name("lock-")
    held = lock_op(http, op="acquire", name=name, ttlSeconds=30, owner="a")
    renewed = lock_op(http, op="renew", name=name, token=held["token"], ttlSeconds=30)
    assert renewed["renewed"] is True and renewed["token"] > held["token"]
    stale = lock_op(http, op="release", name=name, token=held["token"])
    assert stale["released"] is False and stale["reason"] == "lost"
    assert stale["holders"] == [{"slot": 0, "owner": "a"}]
    lost_answer = lock_op(http, op="renew", name=name, token=held["token"], ttlSeconds=30,
                          owner="a")  # the owner's retry of a renew whose answer was lost
    assert lost_answer["renewed"] is True and lost_answer["token"] > renewed["token"]
    stranger = lock_op(http, op="renew", name=name, token=held["token"], ttlSeconds=30,
                       owner="b")
    assert stranger["renewed"] is False and stranger["reason"] == "lost"
    ownerless = lock_op(http, op="renew", name=name, token=held["token"], ttlSeconds=30)
    assert ownerless["renewed"] is False and ownerless["reason"] == "lost"
    [holder] = lock_op(http, op="get", name=name)["holders"]
    assert holder["token"] == lost_answer["token"] and holder["renewedAt"] is not None
    assert lock_op(http, op="release", name=name, token=holder["token"])["released"] is True
    assert lock_op(http, op="get", name=name) == {"index": 0, "op": "get", "name": name,
                                                  "held": False, "holders": []}


def test_an_expired_permit_is_taken_over_with_a_higher_token_that_fences_the_old(http, db):
    name, queue = unique_name("lock-"), unique_name()
    old = lock_op(http, op="acquire", name=name, ttlSeconds=30, owner="old")
    expire_permit(db, name)
    new = lock_op(http, op="acquire", name=name, ttlSeconds=30, owner="new")
    assert new["acquired"] is True and new["token"] > old["token"]
    refused = guarded_push(http, old["guard"], queue)
    assert refused["success"] is False and refused["reason"] == "kv_precondition"
    assert refused["kvReason"] == "version" and refused["value"] == {"owner": "new"}
    assert refused["failedIndex"] == 1
    assert guarded_push(http, new["guard"], queue)["success"] is True
    assert count_messages(db, queue) == 1


def test_a_semaphore_grants_distinct_slots_up_to_its_limit(http, db):
    name = unique_name("sem-")
    grants = [lock_op(http, op="acquire", name=name, ttlSeconds=30, owner=f"o{n}", limit=3)
              for n in range(3)]
    assert sorted(g["slot"] for g in grants) == [0, 1, 2]
    full = lock_op(http, op="acquire", name=name, ttlSeconds=30, owner="o3", limit=3)
    assert full["acquired"] is False and full["reason"] == "held"
    assert sorted(h["owner"] for h in full["holders"]) == ["o0", "o1", "o2"]
    released = lock_op(http, op="release", name=name, token=grants[1]["token"],
                       slot=grants[1]["slot"])
    assert released == {"index": 0, "op": "release", "name": name, "released": True,
                        "slot": grants[1]["slot"]}
    freed = lock_op(http, op="acquire", name=name, ttlSeconds=30, owner="o3", limit=3)
    assert freed["acquired"] is True and freed["slot"] == grants[1]["slot"]


def test_lock_ops_are_independent_and_one_result_each(http):
    a, b, c = unique_name("lock-"), unique_name("lock-"), unique_name("lock-")
    lock_op(http, op="acquire", name=c, ttlSeconds=10, owner="y")
    answer = http.post("/api/v1/locks", json={"operations": [
        {"op": "acquire", "name": a, "ttlSeconds": 10, "owner": "x"},
        {"op": "release", "name": b, "token": 99},
        {"op": "get", "name": c}]}).json()["results"]
    assert [(r["index"], r["name"]) for r in answer] == [(0, a), (1, b), (2, c)]
    assert answer[0]["acquired"] is True and answer[1]["released"] is False
    assert answer[2]["held"] is True and answer[2]["holders"][0]["owner"] == "y"


def test_bad_lock_ops_answer_the_envelope(http):
    cases = [
        ({"op": "acquire", "name": "a#b", "ttlSeconds": 5}, "locks_bad_name"),
        ({"op": "acquire", "name": "a", "forever": True}, "locks_unknown_field"),
        ({"op": "acquire", "name": "a"}, "locks_ttl_required"),
        ({"op": "renew", "name": "a", "ttlSeconds": 5}, "locks_token_required"),
        ({"op": "acquire", "name": "a", "ttlSeconds": 5, "limit": 1025}, "locks_bad_limit"),
        ({"op": "steal", "name": "a"}, "locks_unknown_op"),
    ]
    for op, reason in cases:
        answer = http.post("/api/v1/locks", json={"operations": [op]})
        assert answer.status_code == 400, op
        assert answer.json()["error"] == "locks_bad_request"
        assert answer.json()["reason"] == reason, op
    twice = http.post("/api/v1/locks", json=[{"op": "get", "name": "a"},
                                             {"op": "get", "name": "a"}])
    assert twice.json()["reason"] == "locks_duplicate_name"


HOLDER = """
import asyncio, json, sys
from queen import Queen

async def main(url, name):
    async with Queen(url=url) as client:
        lock = client.lock(name, ttl_seconds=3)
        assert await lock.acquire()
        print(json.dumps({"owner": lock.owner}), flush=True)
        await asyncio.sleep(3600)  # renews every second until killed

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_a_killed_holders_lock_is_taken_over_only_after_expiry_and_its_token_is_refused(
        server, http, db):
    name, queue = unique_name("lock-"), unique_name()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(textwrap.dedent(HOLDER))
    holder = subprocess.Popen([client26_python(), script.name, server.url, name],
                              stdout=subprocess.PIPE, text=True)
    try:
        owner = json.loads(holder.stdout.readline())["owner"]
        time.sleep(1.5)  # at least one background renew
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
        os.unlink(script.name)
    [last] = lock_op(http, op="get", name=name)["holders"]
    assert last["owner"] == owner
    old_guard = {"op": "check", "ns": "queen-locks", "key": f"{name}#0",
                 "expect": last["token"], "required": True}

    refusals = 0
    while True:
        taken = lock_op(http, op="acquire", name=name, ttlSeconds=30, owner="successor")
        if taken["acquired"]:
            break
        assert taken["holders"] == [{"slot": 0, "owner": owner}]
        refusals += 1
        time.sleep(0.1)
    [successor] = lock_op(http, op="get", name=name)["holders"]
    assert refusals > 0  # refused while the dead holder's permit lived, then taken:
    assert _instant(successor["since"]) >= _instant(last["expiresAt"])  # not before expiry
    assert taken["token"] > last["token"]
    refused = guarded_push(http, old_guard, queue)
    assert refused["reason"] == "kv_precondition" and refused["kvReason"] == "version"
    assert count_messages(db, queue) == 0


def _instant(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


CLIENT_LOCKS = """
async def scenario(client, args):
    out = {}
    lock = client.lock(args["name"], ttl_seconds=30)
    out["acquired"] = await lock.acquire()
    rival = client.lock(args["name"], ttl_seconds=30)
    out["rival"] = await rival.acquire()
    result = await (client.transaction().guard(lock)
                    .queue(args["queue"]).push([{"data": {"step": 1}}]).commit())
    out["guarded"] = result.get("success")
    out["renewed"] = await lock.renew()
    result = await (client.transaction().guard(lock)
                    .queue(args["queue"]).push([{"data": {"step": 2}}]).commit())
    out["guarded_after_renew"] = result.get("success")
    out["released"] = await lock.release()
    out["rival_after"] = await rival.acquire()
    await rival.release()
    sems = [client.semaphore(args["sem"], 2, ttl_seconds=30) for _ in range(3)]
    out["semaphore"] = [await s.acquire() for s in sems]
    out["slots"] = sorted(s.slot for s in sems if s.held)
    info = await client.locks.get(args["sem"])
    out["holders"] = len(info["holders"])
    for s in sems:
        await s.release()
    return out
"""


def test_the_2_6_client_lock_guard_and_semaphore(server, db):
    name, sem, queue = unique_name("lock-"), unique_name("sem-"), unique_name()
    out = run26(server.url, CLIENT_LOCKS, name=name, sem=sem, queue=queue)
    assert out == {"acquired": True, "rival": False, "guarded": True, "renewed": True,
                   "guarded_after_renew": True, "released": True, "rival_after": True,
                   "semaphore": [True, True, False], "slots": [0, 1], "holders": 2}
    assert count_messages(db, queue) == 2
