"""Request fusion and back-pressure against the real PostgreSQL.

The engine runs in this process (pytest-twisted's reactor) so the test can count the
database calls its Batchers made; the database is the session's real PostgreSQL.
"""

import concurrent.futures
import json
import uuid

import httpx
import pytest
import pytest_twisted
from twisted.internet import defer

from queen_tw.db import pool
from queen_tw.engine.popper import PopRequest
from queen_tw.engine.waiters import WaiterRegistry
from queen_tw.errors import NotFound

from tests.engine_support import ONE_CALL_AT_A_TIME, in_process_engine
from tests.support import count_messages, unique_name


@pytest.fixture
def engine(pg_env, server):
    with in_process_engine(pg_env, WaiterRegistry(), limits=ONE_CALL_AT_A_TIME) as queue_engine:
        yield queue_engine


@pytest_twisted.ensureDeferred
async def test_concurrent_pushes_are_fused_into_fewer_database_calls(engine):
    queue = unique_name()
    pushes = [defer.ensureDeferred(engine.push([{"queue": queue, "payload": {"n": n}}]))
              for n in range(40)]
    results = await defer.gatherResults(pushes)

    assert [r[0]["status"] for r in results] == ["queued"] * 40
    assert all(r[0]["index"] == 0 for r in results)  # each request sees its own indexes
    assert len({r[0]["message_id"] for r in results}) == 40
    assert engine.batchers["push"].calls < 40 / 2


@pytest_twisted.ensureDeferred
async def test_fused_pushes_dedupe_across_requests(engine):
    queue, key = unique_name(), str(uuid.uuid4())
    pushes = [defer.ensureDeferred(engine.push([{"queue": queue, "transactionId": key}]))
              for _ in range(8)]
    results = [r[0] for r in await defer.gatherResults(pushes)]

    assert sorted(r["status"] for r in results) == ["duplicate"] * 7 + ["queued"]
    assert len({r["message_id"] for r in results}) == 1


@pytest_twisted.ensureDeferred
async def test_concurrent_pops_and_acks_are_fused_and_each_gets_its_own_answer(engine):
    queues = [unique_name() for _ in range(10)]
    await engine.push([{"queue": q, "payload": q} for q in queues])
    calls_before = engine.batchers["pop"].calls

    pops = [defer.ensureDeferred(engine.pop(PopRequest(queue=q, partition=None)))
            for q in queues]
    deliveries = await defer.gatherResults(pops)

    firsts = [d.message_list()[0] for d in deliveries]
    assert [m["data"] for m in firsts] == queues
    assert engine.batchers["pop"].calls - calls_before < 10
    acks = [defer.ensureDeferred(engine.ack([{
        "transactionId": m["transactionId"], "partitionId": m["partitionId"],
        "leaseId": d["leaseId"], "status": "completed", "consumerGroup": None, "error": None,
        "index": 0}])) for d, m in zip(deliveries, firsts, strict=True)]
    answers = await defer.gatherResults(acks)
    assert all(a[0]["success"] and a[0]["leaseReleased"] for a in answers)


@pytest_twisted.ensureDeferred
async def test_a_fused_pop_call_full_of_payload_defers_the_rest_to_calls_of_their_own(
        engine, db):
    """The server holds a fused pop call's answer whole, and each of its up to 200 requests
    may take 64 MiB or more: once the call has handed out its byte budget, the requests
    after it are deferred untouched (no lease, cursor where it was) and popped again alone.
    A budget of one byte: each call delivers to its first request only."""
    engine.popper.call_byte_budget = 1
    queues = [unique_name() for _ in range(6)]
    await engine.push([{"queue": q, "payload": q} for q in queues])
    with db.cursor() as cursor:  # first contacts made now: they would each cost a pop call
        for queue in queues:
            cursor.execute("SELECT queen.subscribe_for(%s::jsonb)", (json.dumps({"queue": queue}),))
    calls_before = engine.batchers["pop"].calls
    with db.cursor() as cursor:
        cursor.execute("SELECT * FROM queen.pop_batch(%s::jsonb, 1)", (json.dumps(
            [{"queue": q, "batch": 1} for q in queues[:2]]),))
        direct = cursor.fetchall()
    assert direct[0][2] is not None and direct[1] == (1, {"success": True, "deferred": True},
                                                      None)

    pops = [defer.ensureDeferred(engine.pop(PopRequest(queue=q, partition=None)))
            for q in queues[1:]]
    deliveries = await defer.gatherResults(pops)

    assert [d.message_list()[0]["data"] for d in deliveries] == queues[1:]
    assert engine.batchers["pop"].calls - calls_before < len(queues) - 1  # they were fused
    assert engine.popper.deferred >= 1  # so a call deferred some


@pytest_twisted.ensureDeferred
async def test_two_fused_failed_acks_of_one_delivery_count_once(engine):
    """The first failure ends the delivery; the second finds none in flight and is a no-op
    (WIRE.md 2.4), also when both requests travel in one fused call."""
    queue = unique_name()
    await engine.configure(queue, "", "", {"retryLimit": 5, "retryDelay": 0})
    await engine.push([{"queue": queue}])
    delivery = await engine.pop(PopRequest(queue=queue, partition=None))
    message = delivery.message_list()[0]
    failed = {"transactionId": message["transactionId"], "partitionId": message["partitionId"],
              "status": "failed", "consumerGroup": None, "leaseId": None, "error": None,
              "index": 0}
    await defer.gatherResults([defer.ensureDeferred(engine.ack([failed])) for _ in range(2)])

    again = await engine.pop(PopRequest(queue=queue, partition=None))
    assert again.message_list()[0]["retryCount"] == 1


@pytest_twisted.ensureDeferred
async def test_a_delivery_whose_client_left_is_given_back_at_once(engine):
    """The messages of a pop answer stay PostgreSQL's unparsed text; giving a delivery back
    still reads them to release the lease, so the next pop gets the same messages."""
    queue = unique_name()
    await engine.push([{"queue": queue, "payload": n} for n in range(3)])

    gone = await engine.pop(PopRequest(queue=queue, partition=None, batch=3),
                            gone=defer.succeed(None))
    again = await engine.pop(PopRequest(queue=queue, partition=None, batch=3))

    assert gone is None
    assert [m["data"] for m in again.message_list()] == [0, 1, 2]


@pytest_twisted.ensureDeferred
async def test_concurrent_lease_renewals_are_fused_and_each_gets_its_own_answer(engine):
    queues = [unique_name() for _ in range(5)]
    await engine.push([{"queue": q, "payload": q} for q in queues])
    leases = [(await engine.pop(PopRequest(queue=q, partition=None)))["leaseId"]
              for q in queues]
    calls_before = engine.batchers["renew_lease"].calls

    renewals = [defer.ensureDeferred(engine.extend_lease(lease, 120)) for lease in leases]
    unknown = defer.ensureDeferred(engine.extend_lease(str(uuid.uuid4()), 120))
    expiries = await defer.gatherResults(renewals)
    refused = await unknown.addErrback(lambda failure: failure.value)

    assert all(isinstance(expiry, str) and expiry.endswith("Z") for expiry in expiries)
    assert isinstance(refused, NotFound) and str(refused) == "Lease not found"
    assert engine.batchers["renew_lease"].calls - calls_before < 6


@pytest_twisted.ensureDeferred
async def test_fused_transactions_commit_or_roll_back_each_on_its_own(engine, db):
    """Three transactions in one database call: the one whose ack fails rolls back alone."""
    good, doomed, other = (unique_name() for _ in range(3))
    calls_before = engine.batchers["transaction"].calls

    def pushing(queue, *more):
        return defer.ensureDeferred(engine.transaction(
            [{"type": "push", "items": [{"queue": queue, "payload": queue}]}, *more], []))

    failing_ack = {"type": "ack", "transactionId": "never-pushed",
                   "partitionId": str(uuid.uuid4()), "status": "completed",
                   "consumerGroup": None, "leaseId": None, "error": None}
    outcomes = await defer.gatherResults([pushing(good), pushing(doomed, failing_ack),
                                          pushing(other)])

    assert [o["success"] for o in outcomes] == [True, False, True]
    assert outcomes[1]["error"] == "Message not found"
    assert [count_messages(db, q) for q in (good, doomed, other)] == [1, 0, 1]
    assert engine.batchers["transaction"].calls - calls_before < 3


def test_flooded_server_answers_503_with_retry_after_and_loses_nothing(make_server, db):
    server = make_server(QUEEN_MAX_PENDING_ITEMS="50", QUEEN_PUSH_MAX_CONCURRENT="1",
                         QUEEN_PUSH_MAX_BATCH_SIZE="10")
    queue = unique_name()

    def push(n):
        items = [{"queue": queue, "transactionId": f"{n}-{i}"} for i in range(20)]
        return httpx.post(f"{server.url}/api/v1/push", json={"items": items}, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(push, range(64)))

    refused = [a for a in answers if a.status_code == 503]
    accepted = [a for a in answers if a.status_code == 201]
    assert len(refused) + len(accepted) == 64
    assert refused, "the bound was never reached"
    assert all(a.headers.get("retry-after") and "error" in a.json() for a in refused)
    assert count_messages(db, queue) == 20 * len(accepted)


@pytest_twisted.ensureDeferred
async def test_fused_pushes_too_large_for_one_statement_are_stored_in_smaller_calls(
        engine, monkeypatch):
    """Many large pushes fused into one call once made a statement over PostgreSQL's 1 GiB
    message limit (the bound is lowered here to a few kilobytes)."""
    monkeypatch.setattr(pool, "MAX_STATEMENT_BYTES", 5000)
    queue = unique_name()
    batcher = engine.batchers["push"]
    calls = batcher.calls
    pushes = [batcher.submit([{"queue": queue, "partition": "p", "transactionId": f"t{n}",
                               "payload": str(n) * 2000}]) for n in range(4)]
    results = [r[0] for r in await defer.gatherResults(pushes)]
    assert batcher.calls - calls == 1  # fused, then split below the batcher
    assert [r["status"] for r in results] == ["queued"] * 4

    delivery = await engine.pop(PopRequest(queue=queue, partition="p", batch=10))
    assert [m["transactionId"] for m in delivery.message_list()] == ["t0", "t1", "t2", "t3"]



# -- shards of one fused push that fail while others commit ------------------------------


def test_a_queue_encrypted_elsewhere_does_not_answer_its_neighbours_duplicate(
        server, make_server, db):
    """One request: 12 partitions of a plain queue, and one item of a queue another instance
    has just set to encrypt (this server's cache still says plain). The shard holding that
    item fails (the flag changed under it) while the other commits: the whole request was
    sent again, and the 12 items it had stored answered `duplicate`."""
    from tests.support import TEST_ENCRYPTION_KEY

    stale = make_server(QUEEN_ENCRYPTION_KEY=TEST_ENCRYPTION_KEY,
                        QUEEN_QUEUE_CONFIG_TTL_MS="600000")
    plain, sealed = unique_name(), unique_name()
    with httpx.Client(base_url=stale.url, timeout=30) as client:
        client.post("/api/v1/push", json={"items": [
            {"queue": sealed, "payload": "warm", "transactionId": "warm"}]}).raise_for_status()
        httpx.post(server.url + "/api/v1/configure", timeout=30, json={
            "queue": sealed, "options": {"encryptionEnabled": True}}).raise_for_status()
        answer = client.post("/api/v1/push", json={"items": [
            {"queue": plain, "partition": f"p{n}", "payload": n, "transactionId": f"t{n}"}
            for n in range(12)] + [{"queue": sealed, "payload": {"s": 1},
                                    "transactionId": "secret"}]})

    assert answer.status_code == 201, answer.text
    assert [r["status"] for r in answer.json()] == ["queued"] * 13, answer.text
    assert count_messages(db, plain) == 12
    with db.cursor() as cursor:
        cursor.execute("SELECT m.is_encrypted FROM queen.messages m JOIN queen.partitions p "
                       "ON p.id = m.partition_id JOIN queen.queues q ON q.id = p.queue_id "
                       "WHERE q.name = %s AND m.transaction_id = 'secret'", (sealed,))
        assert cursor.fetchall() == [(True,)]


def test_concurrent_framed_pushes_reusing_one_client_id_answer_every_item_queued(server, db):
    """Six requests at once, each with a frame reusing one client message id (its own
    transactionId) and six frames in partitions of their own. Racing inserts of that id fail
    one shard of a fused call while the other commits: the jobs were run again one by one,
    and the items already stored answered `duplicate`."""
    from tests.binary_bodies import framed_body, framed_group, v7_id

    queue, shared = unique_name(), v7_id()

    def one(n: int) -> httpx.Response:
        groups = [framed_group(queue, "P", [(shared, f"shared-{n}", b'{"s":1}')])]
        groups += [framed_group(queue, f"own{n}-{k}", [(v7_id(), f"own{n}-{k}", b"1")])
                   for k in range(6)]
        return httpx.post(server.url + "/api/v1/push", content=framed_body(groups),
                          headers={"Content-Type": "application/x-queen-push"}, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(6) as pool_:
        answers = list(pool_.map(one, range(6)))

    assert [a.status_code for a in answers] == [201] * 6, [a.text for a in answers]
    assert [r["status"] for a in answers for r in a.json()] == ["queued"] * 42
    assert count_messages(db, queue) == 42
