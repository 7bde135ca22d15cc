"""The in-process side of the metrics: histogram, recorder, sampler, aggregator document,
Prometheus collectors; on ``task.Clock`` and plain values, no server."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task

from queen_tw.engine.popper import Delivery
from queen_tw.errors import DatabaseUnavailable
from queen_tw.metrics.aggregator import Aggregator, AggregatorService, WorkerIdentity
from queen_tw.metrics.exposition import PostgresCollector, ProcessCollector, make_registry
from queen_tw.metrics.histogram import LATENCY_BOUNDS_S, Histogram
from queen_tw.metrics.recorder import Recorder, delivery_facts
from queen_tw.metrics.sampler import Sampler

NOW = 1_800_000_000.0


class Wall:
    """A settable Unix clock."""

    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now



def _pushed(recorder: Recorder, items: list, seconds: float) -> None:
    """A push of ``items`` that stored every one."""
    recorder.pushed(items, [{"status": "queued"} for _ in items], seconds)

def delivery(queue: str, created: list[str], payload: Any = None) -> Delivery:
    """A pop answer as the popper builds it: the messages as PostgreSQL's text."""
    parts = []
    for n, at in enumerate(created):
        data = orjson.dumps(payload if payload is not None else {"n": n}).decode()
        data = data.replace('":', '": ').replace(',"', ', "')  # jsonb's text form
        parts.append(
            f'{{"id":"0000000{n}-0000-7000-8000-000000000000","transactionId":"t{n}",'
            f'"partitionId":"11111111-1111-4111-8111-111111111111","partition":"Default",'
            f'"queue":"{queue}","consumerGroup":"__QUEUE_MODE__","leaseId":"","data":{data},'
            f'"traceId":null,"producerSub":null,"createdAt":"{at}","retryCount":0}}')
    text = "[" + ",".join(parts) + "]"
    return Delivery({"queue": queue, "partition": "Default"}, orjson.Fragment(text), text)


# -- histogram --------------------------------------------------------------------------

def test_histogram_percentiles_come_from_the_buckets_and_never_exceed_the_maximum():
    histogram = Histogram((1, 2, 5, 10))
    for value in [0.5] * 50 + [1.5] * 45 + [4.0] * 5:
        histogram.observe(value)
    summary = histogram.summary()
    assert summary["count"] == 100
    assert summary["avg"] == pytest.approx((25 + 67.5 + 20) / 100)
    assert summary["max"] == 4.0
    assert summary["p50"] == 1.0  # the 50th value is the last of the first bucket
    assert 1.0 < summary["p95"] <= 2.0
    assert 2.0 < summary["p99"] <= 4.0


def test_histogram_above_the_last_bound_lands_in_the_open_bucket():
    histogram = Histogram((1, 2))
    histogram.observe(7.0)
    assert histogram.cumulative() == [(1, 0), (2, 0), (float("inf"), 1)]
    assert 2.0 < histogram.quantile(0.99) <= 7.0 == histogram.quantile(1.0)


def test_empty_histogram_summarises_as_zeros():
    assert Histogram((1,)).summary() == {"count": 0, "avg": 0.0, "max": 0.0, "p50": 0.0,
                                         "p95": 0.0, "p99": 0.0}


# -- recorder ---------------------------------------------------------------------------

def test_push_counts_requests_and_messages_per_queue():
    recorder = Recorder(wall=Wall())
    _pushed(recorder, [{"queue": "a"}, {"queue": "b"}, {"queue": "a"}], 0.002)
    _pushed(recorder, [{"queue": "a"}], 0.004)
    counts = recorder.current.counts
    assert (counts.push_requests, counts.push_messages) == (2, 4)
    a, b = recorder.current.queues["a"], recorder.current.queues["b"]
    assert (a.push_requests, a.push_messages, b.push_requests, b.push_messages) == (2, 3, 1, 1)
    assert recorder.current.latency["push"].count == 2


def test_pop_counts_messages_and_the_age_of_the_oldest():
    wall = Wall()
    recorder = Recorder(wall=wall)
    wall.now = 1_700_000_002.5  # 2.5 s after the first message was created
    recorder.popped("q", delivery("q", ["2023-11-14T22:13:20.000000Z",
                                        "2023-11-14T22:13:21.000000Z"]), 0.001)
    recorder.popped("q", None, 0.001)
    recorder.popped("q", None, None)  # a long poll that timed out: no latency
    activity = recorder.current.queues["q"]
    assert (activity.pop_requests, activity.pop_messages, activity.pop_empty) == (3, 2, 2)
    assert activity.lag.count == 1
    assert activity.lag.maximum == pytest.approx(2500.0)
    assert recorder.current.latency["pop"].count == 2


def test_message_count_ignores_lookalike_payloads():
    lookalike = {"createdAt": "2000-01-01T00:00:00Z", "retryCount": 5,
                 "nested": {"x": "y", "retryCount": 1}}
    answer = delivery("q", ["2023-11-14T22:13:20.000000Z"] * 3, payload=lookalike)
    count, oldest = delivery_facts(answer)
    assert count == 3
    assert oldest == pytest.approx(1_700_000_000.0)


def test_parsed_deliveries_are_counted_too():
    parsed = Delivery({"queue": "q"}, [{"createdAt": "2023-11-14T22:13:20.000Z"}] * 4)
    assert delivery_facts(parsed) == (4, pytest.approx(1_700_000_000.0))


def test_ack_results_success_failed_and_dlq():
    recorder = Recorder(wall=Wall())
    items = [{"status": "completed"}, {"status": "failed"}, {"status": "completed"},
             {"status": "retry"}]
    results = [{"success": True, "queueName": "q", "dlq": False},
               {"success": True, "queueName": "q", "dlq": True},
               {"success": False, "queueName": "q", "dlq": False},  # lease lost
               {"success": True, "queueName": "q", "dlq": False}]
    recorder.acked(items, results, 0.003)
    counts = recorder.current.counts
    assert (counts.ack_requests, counts.ack_messages) == (1, 4)
    assert (counts.ack_success, counts.ack_failed, counts.dlq) == (1, 1, 1)
    activity = recorder.current.queues["q"]
    assert (activity.ack_success, activity.ack_failed, activity.dlq) == (1, 1, 1)


def test_a_batch_of_alike_acks_counts_the_same_as_one_by_one():
    batch, single = Recorder(wall=Wall()), Recorder(wall=Wall())
    items = [{"status": "failed"}] * 3
    results = [{"success": True, "queueName": "q", "dlq": dead} for dead in (True, False, True)]
    batch.acked(items, results, 0.001)
    for item, result in zip(items, results, strict=True):
        single.acked([item], [result], 0.001)
    for recorder in (batch, single):
        counts, activity = recorder.current.counts, recorder.current.queues["q"]
        assert (counts.ack_failed, counts.ack_success, counts.dlq) == (3, 0, 2)
        assert (activity.ack_failed, activity.dlq) == (3, 2)
    assert batch.current.counts.ack_messages == single.current.counts.ack_messages == 3


def test_transactions_count_once_per_queue_pushed_to():
    recorder = Recorder(wall=Wall())
    recorder.transacted([{"type": "push", "items": [{"queue": "a"}, {"queue": "a"}]},
                         {"type": "ack", "items": [{}]}], {"success": False}, 0.01)
    assert recorder.current.counts.transactions == 1
    assert recorder.current.queues["a"].transactions == 1
    assert recorder.current.counts.push_messages == 0  # rolled back: nothing stored


def test_a_committed_transaction_counts_its_stored_pushes_acks_and_dead_letters():
    recorder = Recorder(wall=Wall())
    operations = [{"type": "ack", "status": "completed"}, {"type": "ack", "status": "failed"},
                  {"type": "push", "items": [{"queue": "a"}, {"queue": "a"}]}]
    outcome = {"success": True, "results": [
        {"type": "ack", "success": True, "dlq": False},
        {"type": "ack", "success": True, "dlq": True},
        {"type": "push", "status": "queued", "queueName": "a"},
        {"type": "push", "status": "duplicate", "queueName": "a"}]}

    recorder.transacted(operations, outcome, 0.01)

    counts = recorder.current.counts
    assert (counts.push_messages, counts.push_requests) == (1, 0)
    assert (counts.ack_messages, counts.ack_success, counts.ack_failed, counts.dlq) == \
        (2, 1, 1, 1)
    assert recorder.current.queues["a"].push_messages == 1


def test_failed_requests_count_as_requests_with_latency():
    recorder = Recorder(wall=Wall())
    recorder.failed("push", 0.5)
    recorder.failed("transaction", 0.5)
    counts = recorder.current.counts
    assert (counts.push_requests, counts.push_messages, counts.transactions) == (1, 0, 1)
    assert recorder.current.latency["push"].count == 1


def test_an_unwritten_interval_is_merged_into_the_next_and_kept_until_written():
    wall = Wall()
    errors = [0]
    recorder = Recorder(wall=wall, db_errors=lambda: errors[0])
    _pushed(recorder, [{"queue": "a"}], 0.001)
    errors[0] = 2
    wall.now += 60
    first = recorder.take_interval()
    assert (first.counts.push_messages, first.counts.db_errors) == (1, 2)
    # the write failed: not written() -> still unwritten, merged into the next
    _pushed(recorder, [{"queue": "a"}, {"queue": "b"}], 0.001)
    assert recorder.unwritten().push_messages == 3
    wall.now += 60
    merged = recorder.take_interval()
    assert merged.started == NOW and merged.ended == NOW + 120
    assert merged.counts.push_messages == 3 and merged.counts.db_errors == 2
    assert merged.queues["a"].push_messages == 2
    recorder.written()
    assert recorder.unwritten().push_messages == 0
    assert recorder.totals().push_messages == 3
    assert recorder.latency("push").count == 2


# -- sampler ----------------------------------------------------------------------------

class FakePool:
    size = 5
    connected = True

    def usage(self) -> tuple[int, int, int]:
        return 3, 2, 1


class FakeBuffer:
    maintenance_mode = True

    def buffer_status(self) -> Any:
        return SimpleNamespace(pending=7, failed=1)


def test_sampler_measures_how_late_it_ran_and_reads_the_process():
    clock = task.Clock()
    clock.advance(100)
    recorder = Recorder(wall=Wall())
    sampler = Sampler(recorder, clock, 1.0, pool=FakePool(), buffer=FakeBuffer(),
                      parked=lambda: {"q": 2})
    service = sampler.service()
    service.startService()  # first sample at once
    assert sampler.latest.loop_lag_ms == 0
    clock.advance(1.25)  # the run due after 1 s could only start 250 ms later
    sample = sampler.latest
    assert sample.loop_lag_ms == pytest.approx(250.0)
    assert recorder.current.loop_lag.count == 2
    assert (sample.pool_size, sample.pool_idle, sample.pool_active, sample.pool_waiting) == (
        5, 3, 2, 1)
    assert (sample.buffer_pending, sample.buffer_failed, sample.maintenance) == (7, 1, True)
    assert sample.parked == {"q": 2}
    assert sample.rss_bytes > 0 and sample.cpu_user_s > 0
    service.stopService()


def test_sampler_rates_over_its_window():
    clock = task.Clock()
    recorder = Recorder(wall=Wall())
    sampler = Sampler(recorder, clock, 1.0)
    sampler.sample()
    for _ in range(10):
        _pushed(recorder, [{"queue": "q"}, {"queue": "q"}], 0.001)
    clock.advance(2)
    sample = sampler.sample()
    assert sample.requests_rate == 5.0
    assert sample.messages_rate == 10.0


# -- aggregator -------------------------------------------------------------------------

class RecordingDb:
    """Stands in for the pool in front of ``queen.metrics_write``: records or refuses."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.down = False

    async def call(self, function: str, document: dict) -> dict:
        if self.down:
            raise DatabaseUnavailable("Database unavailable")
        self.calls.append((function, document))
        return {"rewritten": False}


def aggregator_for(recorder: Recorder, clock: task.Clock, db: RecordingDb,
                   parked: dict[str, int]) -> Aggregator:
    sampler = Sampler(recorder, clock, 1.0, pool=FakePool(), buffer=FakeBuffer(),
                      parked=lambda: parked)
    sampler.sample()
    return Aggregator(recorder, sampler, db, WorkerIdentity("host", "w-1", 42),  # type: ignore[arg-type]
                      retention_days=90)


def test_document_has_the_worker_row_queue_rows_and_totals():
    wall, clock, db = Wall(), task.Clock(), RecordingDb()
    recorder = Recorder(wall=wall)
    aggregator = aggregator_for(recorder, clock, db, {"idle": 1})
    _pushed(recorder, [{"queue": "q"}] * 3, 0.002)
    wall.now += 60
    defer.ensureDeferred(aggregator.write())
    [(function, document)] = db.calls
    assert function == "metrics_write"
    assert (document["hostname"], document["workerId"], document["pid"]) == ("host", "w-1", 42)
    assert document["bucketSeconds"] == 60
    assert document["worker"]["push_messages"] == 3
    assert document["worker"]["latency"]["push"]["count"] == 1
    assert document["worker"]["db_pool_size"] == 5
    assert document["worker"]["parked_consumers"] == 1
    assert document["totals"]["push_messages"] == 3
    assert document["retentionDays"] == 90
    rows = {row["queue_name"]: row for row in document["queues"]}
    assert rows["q"]["push_messages"] == 3
    assert rows["idle"]["parked_consumers"] == 1 and rows["idle"]["push_messages"] == 0


def test_a_failed_write_keeps_the_counts_for_the_next_and_logs_once():
    wall, clock, db = Wall(), task.Clock(), RecordingDb()
    recorder = Recorder(wall=wall)
    aggregator = aggregator_for(recorder, clock, db, {})
    service = AggregatorService(aggregator, clock, 10)
    db.down = True
    service.startService()  # the first write, at once (it reads PostgreSQL's clock), fails
    _pushed(recorder, [{"queue": "q"}], 0.001)
    for _ in range(3):
        wall.now += 10
        clock.advance(10)
    assert db.calls == []
    _pushed(recorder, [{"queue": "q"}], 0.001)
    db.down = False
    clock.advance(10)
    [(_, document)] = db.calls
    assert document["totals"]["push_messages"] == 2  # nothing lost to the outage
    stopped = service.stopService()  # the last write at stop
    assert stopped.called
    assert len(db.calls) == 2


def test_the_intervals_follow_postgresqls_clock_once_a_write_has_read_it():
    wall = Wall()
    recorder = Recorder(wall=wall)
    recorder.take_interval()
    wall.now += 1

    recorder.follow_database_time(wall.now + 180.0, wall.now - 0.01, wall.now + 0.01)

    assert recorder.database_time.offset == pytest.approx(180.0)
    assert recorder.current.started == pytest.approx(wall.now - 1 + 180.0)
    assert recorder.take_interval().ended == pytest.approx(wall.now + 180.0)


def test_a_reading_within_half_its_round_trip_leaves_the_offset_as_it_is():
    """PostgreSQL on the same host: any reading is off by up to half the round trip (a
    connection waited for, a busy function); the offset stays 0 instead of wandering."""
    wall = Wall()
    recorder = Recorder(wall=wall)
    started = recorder.current.started

    recorder.follow_database_time(wall.now + 0.04, wall.now - 0.05, wall.now + 0.05)

    assert recorder.database_time.offset == 0.0 and recorder.current.started == started


def test_parked_queue_gets_a_zero_row_once_it_is_empty_again():
    wall, clock, db = Wall(), task.Clock(), RecordingDb()
    parked = {"q": 2}
    recorder = Recorder(wall=wall)
    aggregator = aggregator_for(recorder, clock, db, parked)
    defer.ensureDeferred(aggregator.write())
    parked.clear()
    aggregator._sampler.sample()  # type: ignore[attr-defined]
    defer.ensureDeferred(aggregator.write())
    defer.ensureDeferred(aggregator.write())
    rows = [[(row["queue_name"], row["parked_consumers"]) for row in document["queues"]]
            for _, document in db.calls]
    assert rows == [[("q", 2)], [("q", 0)], []]


# -- exposition -------------------------------------------------------------------------

def parse(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text.decode())
            for sample in family.samples}


def test_cluster_totals_add_the_unwritten_counts_and_leave_out_pg_without_a_snapshot():
    recorder = Recorder(wall=Wall())
    sampler = Sampler(recorder, task.Clock(), 1.0, pool=FakePool())
    postgres = PostgresCollector(recorder)
    registry = make_registry(ProcessCollector(recorder, sampler), postgres)
    _pushed(recorder, [{"queue": "q"}] * 4, 0.002)
    postgres.feed({"totals": {"push_messages": 10, "ack_failed": 1}, "queues": [],
                   "workers": [], "dlqDepth": 3, "dlqByQueue": {"q": 3}, "depth": {}})
    samples = parse(generate_latest(registry))
    assert samples[("queen_cluster_push_messages_total", (("scope", "cluster"),))] == 14
    assert samples[("queen_cluster_ack_total", (("result", "failed"), ("scope", "cluster")))] == 1
    assert samples[("queen_dlq_depth_by_queue", (("queue", "q"),))] == 3
    assert samples[("queen_request_duration_seconds_count", (("op", "push"),))] == 1
    buckets = [value for (name, labels), value in samples.items()
               if name == "queen_request_duration_seconds_bucket" and ("op", "push") in labels]
    assert len(buckets) == len(LATENCY_BOUNDS_S) + 1
    assert samples[("queen_db_pool_size", ())] == 5
    postgres.feed(None)
    samples = parse(generate_latest(registry))
    assert not any(name.startswith("queen_cluster_") for name, _ in samples)
    assert samples[("queen_file_buffer_db_healthy", ())] == 0


def test_duplicates_and_refused_items_are_not_counted_as_pushed_messages():
    recorder = Recorder()
    items = [{"queue": "a"}, {"queue": "a"}, {"queue": "b"}, {"queue": "b"}]
    recorder.pushed(items, [{"status": "queued"}, {"status": "duplicate"},
                            {"status": "failed"}, {"status": "buffered"}], 0.001)

    interval = recorder.current
    assert (interval.counts.push_requests, interval.counts.push_messages) == (1, 2)
    assert interval.queue("a").push_messages == 1 and interval.queue("b").push_messages == 1
    assert interval.queue("a").push_requests == 1 and interval.queue("b").push_requests == 1


def test_a_workers_cluster_totals_are_the_written_ones_alone():
    """Scrapes of a NUM_WORKERS port reach either worker: each adding its own unwritten
    counts made the cluster counters go down from one scrape to the next."""
    recorder = Recorder(wall=Wall())
    postgres = PostgresCollector(None)
    sampler = Sampler(recorder, task.Clock(), 1.0, pool=FakePool())
    registry = make_registry(ProcessCollector(recorder, sampler), postgres)
    _pushed(recorder, [{"queue": "q"}] * 4, 0.002)
    postgres.feed({"totals": {"push_messages": 10}, "queues": [], "workers": [],
                   "dlqDepth": 0, "dlqByQueue": {}, "depth": {}})

    samples = parse(generate_latest(registry))

    assert samples[("queen_cluster_push_messages_total", (("scope", "cluster"),))] == 10
