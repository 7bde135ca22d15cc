"""Background services: retention, eviction, partition cleanup, statistics (WIRE.md 2.1, 5,
9.6; 7.1 row 23; 8 rows 21-22).

The scheduling logic runs on ``task.Clock``; the SQL runs in a real server whose intervals are
a few hundred milliseconds, and every wait is a bounded poll.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import psycopg2
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from queen_tw.services.periodic import PeriodicService
from queen_tw.services.retention import BUSY_TRIES, Cleaner

from tests.http_helpers import ack, configure, pop, push
from tests.scratch_databases import scratch_database, server_env
from tests.support import pass_time, running_server, unique_name, wait_until


def _count(db, queue: str, partition: str | None = None) -> int:
    with db.cursor() as cursor:
        cursor.execute("""SELECT count(*) FROM queen.messages m
                            JOIN queen.partitions p ON p.id = m.partition_id
                            JOIN queen.queues q ON q.id = p.queue_id
                           WHERE q.name = %s AND (%s::text IS NULL OR p.name = %s)""",
                       (queue, partition, partition))
        return cursor.fetchone()[0]


LOCKED_OUT_S = 2.0
"""How long the lock test watches cycles being skipped: a documented minimum of several
300 ms cycles, not a bound. A cycle that ignored the lock would delete in any of them; on a
slow machine fewer cycles run (the test proves less), but it cannot fail for being slow."""


def _after_a_cleaning_run(client, db) -> None:
    """Return once a cleaning run has gone over everything stored so far (instead of
    sleeping for "a few cycles"): a control message pushed now with retentionSeconds=1 is
    deleted only by a run that started once it was due, so after anything pushed before it
    was due as well."""
    control = unique_name("test-control-")
    configure(client, control, retentionSeconds=1)
    push(client, control, ["control"])
    _cleaned(db, control)


def _cleaned(db, queue: str, left: int = 0, partition: str | None = None) -> None:
    """Wait until the cleaner has brought ``queue`` down to ``left`` messages."""
    wait_until(lambda: _count(db, queue, partition) == left, interval=0.1,
               message=f"{queue} cleaned down to {left} message(s)")


@pytest.fixture(scope="module")
def cleaner_server(pg_env):
    """A server cleaning every 300 ms in steps of 10 messages (eviction alone: rarely)."""
    with running_server(pg_env, "queen-tw-retention-", RETENTION_INTERVAL="300",
                        RETENTION_BATCH_SIZE="10", EVICTION_INTERVAL="3600000",
                        STATS_INTERVAL_MS="300") as process:
        yield process


@pytest.fixture
def client(cleaner_server):
    with httpx.Client(base_url=cleaner_server.url, timeout=10) as c:
        yield c


# -- scheduling (task.Clock) ------------------------------------------------------------


def test_periodic_service_runs_every_interval_starting_one_interval_after_start():
    clock, runs = Clock(), []

    async def work():
        runs.append(clock.seconds())

    job = PeriodicService("job", 500, work, clock)
    job.startService()
    clock.advance(0.4)
    assert runs == []
    clock.pump([0.1, 0.5, 0.5])

    assert runs == [0.5, 1.0, 1.5]
    job.stopService()


def test_periodic_service_never_overlaps_a_slow_run():
    clock, started, gates = Clock(), [], []

    async def work():
        started.append(clock.seconds())
        gate = defer.Deferred()
        gates.append(gate)
        await gate

    job = PeriodicService("job", 100, work, clock)
    job.startService()
    clock.pump([0.1, 0.1, 0.1])
    assert started == [pytest.approx(0.1)]  # still running: nothing new started
    gates[0].callback(None)
    clock.pump([0.1])

    assert len(started) == 2
    job.stopService()
    gates[1].callback(None)


def test_periodic_service_survives_a_failing_run():
    clock, attempts = Clock(), []

    async def work():
        attempts.append(clock.seconds())
        if len(attempts) == 1:
            raise RuntimeError("boom")

    job = PeriodicService("job", 100, work, clock)
    job.startService()
    clock.pump([0.1, 0.1, 0.1])

    assert len(attempts) == 3
    assert job.failures == 1 and job.runs == 3
    job.stopService()


def test_stopping_waits_for_the_run_in_progress_and_schedules_no_more():
    clock, gate, runs = Clock(), defer.Deferred(), []

    async def work():
        runs.append(1)
        await gate

    job = PeriodicService("job", 100, work, clock)
    job.startService()
    clock.advance(0.1)
    stopped = job.stopService()
    assert not stopped.called
    gate.callback(None)
    clock.advance(1)

    assert stopped.called
    assert runs == [1]
    assert clock.getDelayedCalls() == []


# -- retention and eviction (real server, real SQL) -------------------------------------


def test_retention_seconds_deletes_old_messages_consumed_or_not(client, db):
    queue = unique_name()
    configure(client, queue, retentionSeconds=1)
    push(client, queue, list(range(25)))  # more than one 10-message step
    ack(client, pop(client, queue)["messages"][0])

    _cleaned(db, queue)


def test_completed_retention_deletes_only_what_every_group_consumed(client, db):
    queue = unique_name()
    configure(client, queue, completedRetentionSeconds=1)
    push(client, queue, ["done", "pending"])
    ack(client, pop(client, queue)["messages"][0])
    # a named group that consumed nothing keeps everything alive, so consume with it too
    message = pop(client, queue, consumerGroup="g")["messages"][0]
    ack(client, message, consumerGroup="g")

    _cleaned(db, queue, left=1)
    _after_a_cleaning_run(client, db)
    assert _count(db, queue) == 1
    assert pop(client, queue)["messages"][0]["data"] == "pending"


def test_completed_retention_keeps_dead_letters(client, db):
    """The cursor passes a dead letter, but it was not completed: deleting it took its
    dead-letter row too (WIRE.md 9.3: a failed message is never silently dropped)."""
    queue = unique_name()
    configure(client, queue, completedRetentionSeconds=1, retryLimit=0)
    push(client, queue, ["failed", "done"])
    dead = pop(client, queue)["messages"][0]
    assert ack(client, dead, "failed", error="broken")["dlq"] is True
    assert ack(client, pop(client, queue)["messages"][0])["success"] is True

    _cleaned(db, queue, left=1)
    _after_a_cleaning_run(client, db)

    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM queen.dead_letter_queue WHERE partition_id = %s",
                       (dead["partitionId"],))
        assert cursor.fetchone()[0] == 1
    assert _count(db, queue) == 1


def test_completed_retention_keeps_messages_of_a_group_that_has_not_consumed_them(client, db):
    queue = unique_name()
    configure(client, queue, completedRetentionSeconds=1)
    push(client, queue, ["x"])
    assert pop(client, queue, consumerGroup="slow") is not None  # leased, not acked
    message = pop(client, queue)["messages"][0]
    ack(client, message)

    _after_a_cleaning_run(client, db)

    assert _count(db, queue) == 1


def test_completed_retention_waits_for_a_namespace_group_on_a_queue_it_has_not_popped(
        client, db):
    """A group subscribed to a namespace consumes every queue of it, those made after its
    last namespace pop included (its record there is written at its next pop)."""
    namespace, first, later = unique_name("ns-"), unique_name(), unique_name()

    def configure_in_namespace(queue: str) -> None:
        answer = client.post("/api/v1/configure", json={
            "queue": queue, "namespace": namespace, "options": {"completedRetentionSeconds": 1}})
        assert answer.status_code == 200, answer.text

    configure_in_namespace(first)
    push(client, first, ["a"])
    group_pop = client.get("/api/v1/pop", params={"namespace": namespace,
                                                   "consumerGroup": "G", "wait": "false"})
    assert group_pop.status_code == 200, group_pop.text
    ack(client, group_pop.json()["messages"][0], consumerGroup="G")
    configure_in_namespace(later)
    push(client, later, ["m0", "m1", "m2"])
    for message in pop(client, later, batch=10)["messages"]:  # queue mode consumes them all
        ack(client, message)

    _after_a_cleaning_run(client, db)

    assert _count(db, later) == 3
    depth = client.get(f"/api/v1/resources/queues/{later}/depth").json()
    assert depth["pending"] == 3, depth
    delivered = client.get("/api/v1/pop", params={"namespace": namespace, "consumerGroup": "G",
                                                   "batch": 10, "wait": "false"})
    assert [m["data"] for m in delivered.json()["messages"]] == ["m0", "m1", "m2"]


def test_a_failed_message_removed_by_retention_leaves_no_retry_count_to_the_next(client, db):
    queue = unique_name()
    configure(client, queue, retentionSeconds=1, retryLimit=1, retryDelay=0)
    push(client, queue, ["old"], prefix="old")
    assert ack(client, pop(client, queue)["messages"][0], status="failed")["success"]
    _cleaned(db, queue)  # "old" removed while its group waits to retry it

    push(client, queue, ["new"], prefix="new")
    [message] = pop(client, queue)["messages"]

    assert (message["data"], message["retryCount"], message["deliveryAttempt"]) == ("new", 0, 1)
    assert ack(client, message, status="failed")["dlq"] is False  # retryLimit 1: one retry left


def test_max_wait_time_evicts_unconsumed_messages_in_the_retention_cycle(client, db):
    queue = unique_name()
    configure(client, queue, maxWaitTimeSeconds=1)
    push(client, queue, ["waited-too-long"])

    _cleaned(db, queue)


def test_eviction_keeps_messages_every_group_consumed(client, db):
    queue = unique_name()
    configure(client, queue, maxWaitTimeSeconds=1)
    push(client, queue, ["consumed", "waiting"])
    ack(client, pop(client, queue)["messages"][0])

    _cleaned(db, queue, left=1)
    _after_a_cleaning_run(client, db)
    assert _count(db, queue) == 1


def test_queue_without_retention_options_is_left_alone(client, db):
    queue = unique_name()
    push(client, queue, [1, 2])
    ack(client, pop(client, queue)["messages"][0])

    _after_a_cleaning_run(client, db)

    assert _count(db, queue) == 2


def test_empty_partitions_idle_past_the_cleanup_days_are_dropped(client, db):
    queue = unique_name()
    configure(client, queue, retentionSeconds=1)
    push(client, queue, ["x"], partition="idle")
    _cleaned(db, queue)
    with db.cursor() as cursor:
        cursor.execute("""UPDATE queen.partitions SET last_activity = now() - interval '31 days'
                           WHERE queue_id = (SELECT id FROM queen.queues WHERE name = %s)""",
                       (queue,))

    def partitions():
        with db.cursor() as cursor:
            cursor.execute("""SELECT array_agg(p.name ORDER BY p.name) FROM queen.partitions p
                                JOIN queen.queues q ON q.id = p.queue_id WHERE q.name = %s""",
                           (queue,))
            return cursor.fetchone()[0]

    wait_until(lambda: partitions() == ["Default"], message="idle partition dropped")


def test_a_cycle_is_skipped_while_another_instance_holds_the_cluster_lock(client, db, pg_dsn):
    import psycopg2

    queue = unique_name()
    holder = psycopg2.connect(pg_dsn)
    holder.autocommit = True
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(737001)")
        configure(client, queue, retentionSeconds=1)
        push(client, queue, ["kept-while-locked"])
        time.sleep(LOCKED_OUT_S)  # the lock holder makes every cycle skip
        assert _count(db, queue) == 1
    finally:
        holder.close()  # releases the session lock

    _cleaned(db, queue)


def test_retention_while_pushing_into_many_partitions_loses_no_push(client, db, cleaner_server):
    """Pushers keep going until retention has deleted messages of the queue under them (so
    the two really overlapped), then every push must have been accepted and, in the end,
    retention takes everything."""
    queue = unique_name()
    configure(client, queue, retentionSeconds=1)
    failures: list = []
    pushed = [0, 0, 0]
    done = threading.Event()

    def pusher(me: int):
        with httpx.Client(base_url=cleaner_server.url, timeout=10) as c:
            n = 0
            while not done.is_set():
                answer = c.post("/api/v1/push", json={"items": [
                    {"queue": queue, "partition": f"p{(n + k) % 20}", "payload": k,
                     "transactionId": f"{me}-{n}-{k}"} for k in range(20)]})
                if answer.status_code != 201 or any(r["status"] != "queued" for r in answer.json()):
                    failures.append(answer.text)
                else:
                    pushed[me] += 20
                n += 1

    threads = [threading.Thread(target=pusher, args=(me,)) for me in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: failures or sum(pushed) - _count(db, queue) >= 100, interval=0.1,
                   message="retention deleting while pushes go on")
    finally:
        done.set()
        for thread in threads:
            thread.join(10)

    assert failures == []
    assert "deadlock" not in cleaner_server.log_text().lower()
    _cleaned(db, queue)


# -- statistics -------------------------------------------------------------------------


def test_statistics_refresh_on_their_interval(client):
    queue = unique_name()
    push(client, queue, [1])

    def fresh():
        overview = client.get("/api/v1/resources/overview").json()
        return overview["statsAge"] is not None and overview["statsAge"] < 2

    wait_until(fresh, message="statistics younger than 2 s")


@pytest.fixture
def alone(pg_dsn: str, pg_env):
    """(http client, autocommit connection, DSN) on a database of its own whose server never
    cleans by itself: the tests below run the retention step by hand, and another server's
    cleaning (every 300 ms above) would take their messages first."""
    with scratch_database(pg_dsn) as dsn, running_server(
            server_env(pg_env, dsn), RETENTION_INTERVAL="3600000",
            EVICTION_INTERVAL="3600000") as process:
        connection = psycopg2.connect(dsn)
        connection.autocommit = True
        try:
            with httpx.Client(base_url=process.url, timeout=30) as http:
                yield http, connection, dsn
        finally:
            connection.close()


@pytest.mark.parametrize("popped_before", [False, True], ids=["first-pop", "later-pop"])
def test_a_pop_during_a_retention_step_hands_out_nothing_the_step_deletes(
        alone, popped_before):
    """A pop whose transaction overlapped the step's DELETE read the doomed rows (it took no
    lock the DELETE waits for), leased them and handed them out; the step then committed and
    every ack answered "Message not found" (README: "its ack always finds it"). The step's
    transaction is held open here (the retention service's own SQL) to widen the window."""
    http, db, pg_dsn = alone
    queue = unique_name()
    configure(http, queue, retentionSeconds=60)
    if popped_before:  # the group's row exists, as for any consumer after its first pop
        push(http, queue, ["first"])
        ack(http, pop(http, queue)["messages"][0])
    push(http, queue, [f"m{n}" for n in range(3)], prefix="old")
    pass_time(db, queue, 120)
    step = psycopg2.connect(pg_dsn)
    answer: dict = {}
    try:
        with step.cursor() as cursor:
            for _ in range(200):  # (another instance's cycle may hold the cluster lock)
                cursor.execute("SELECT queen.cleanup_cycle(1000, true, true)")
                outcome = cursor.fetchone()[0]
                if outcome["locked"]:
                    break
                step.rollback()
                time.sleep(0.05)
            assert outcome["retention"] == 3 + popped_before, outcome
        popping = threading.Thread(target=lambda: answer.setdefault("pop", http.get(
            f"/api/v1/pop/queue/{queue}", params={"wait": "false", "batch": 10})))
        popping.start()
        popping.join(2)  # a pop may wait for the step or pass its partition by
        step.commit()
        popping.join(15)
    finally:
        step.close()

    if answer["pop"].status_code == 204:
        return
    handed_out = answer["pop"].json()["messages"]
    assert all(ack(http, message)["success"] for message in handed_out), handed_out


def _one_step(pg_dsn: str, outcome: dict) -> threading.Thread:
    """A retention step on a connection of its own (retried while another holds the lock)."""
    def run() -> None:
        connection = psycopg2.connect(pg_dsn)
        try:
            with connection.cursor() as cursor:
                for _ in range(400):
                    try:
                        cursor.execute("SELECT queen.cleanup_cycle(1000, true, true)")
                    except psycopg2.Error as err:
                        outcome["error"] = err
                        return
                    step = cursor.fetchone()[0]
                    connection.commit()
                    if step["locked"]:
                        outcome["step"] = step
                        return
                    time.sleep(0.02)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("then", ["push to the partition", "dead-letter in another"])
def test_a_retention_step_leaves_a_partition_in_use_and_never_deadlocks(alone, then):
    """An ack holds its group's row, then needs a partition's row (a transaction's push, a
    fused ack's dead letter). A step that waited for the group's row while holding the
    partitions deadlocked with it; it now leaves what is in use to the next step."""
    http, db, pg_dsn = alone
    queue, other = unique_name(), unique_name()
    for name in (queue, other):
        configure(http, name, retentionSeconds=60, retryLimit=0)
        push(http, name, ["a", "b"], prefix="old")
        pass_time(db, name, 120)
    held, other_held = (pop(http, name, batch=1)["messages"][0] for name in (queue, other))
    caller = psycopg2.connect(pg_dsn)
    outcome: dict = {}
    try:
        with caller.cursor() as cursor:
            cursor.execute("SELECT queen.ack_messages(%s::jsonb)", (json.dumps([{
                "transactionId": held["transactionId"], "partitionId": held["partitionId"],
                "leaseId": held["leaseId"]}]),))
            step = _one_step(pg_dsn, outcome)
            step.join(20)  # it does not wait for the caller
            assert outcome["step"]["busy"] >= 1, outcome
            if then == "push to the partition":
                cursor.execute("SELECT queen.push_store(%s::jsonb)", (json.dumps([{
                    "queue": queue, "payload": 1, "transactionId": "new"}]),))
            else:
                cursor.execute("SELECT queen.ack_messages(%s::jsonb)", (json.dumps([{
                    "transactionId": other_held["transactionId"],
                    "partitionId": other_held["partitionId"],
                    "leaseId": other_held["leaseId"], "status": "failed"}]),))
            caller.commit()
    finally:
        caller.close()
    assert "error" not in outcome, outcome


class _Steps:
    """Stands in for the pool: answers cleanup_cycle with the given steps, then idle ones."""

    def __init__(self, *steps: dict):
        self.steps = list(steps)
        self.calls = 0

    def call(self, name: str, *args) -> defer.Deferred:
        self.calls += 1
        step = self.steps.pop(0) if self.steps else {"locked": True, "more": False}
        return defer.succeed({"retention": 0, "busy": 0, **step})


def _run(cleaner: Cleaner):
    done: list = []
    defer.ensureDeferred(cleaner.eviction_run()).addBoth(done.append)
    return done[0]


def test_a_run_tries_again_while_a_partition_is_in_use_then_leaves_it():
    in_use = {"locked": True, "more": False, "busy": 1}
    freed = _Steps(in_use, in_use, {"locked": True, "more": False, "retention": 3})
    assert _run(Cleaner(freed, batch_size=10)).retention == 3 and freed.calls == 3

    stuck = _Steps(*[in_use] * 50)
    run = _run(Cleaner(stuck, batch_size=10))
    assert stuck.calls == BUSY_TRIES and run.busy == 1
