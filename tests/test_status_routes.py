"""Status and analytics routes (WIRE.md 3.4; issue 18 points 3 and 7).

Metrics rows are seeded by SQL as the metrics service writes them (two workers, three
one-minute intervals, two queues), thirty days back so no running server's own rows fall in
their range; the routes must return their sums and buckets exactly. Counts of stored messages
come from the statistics snapshot, so tests that read them refresh it first.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any, Dict, Iterator, List

import httpx
import pytest

from tests.client_helpers import connect, run_scenario
from tests.http_helpers import ack, pop, push
from tests.support import unique_name, wait_until

WORKERS = ("w-a", "w-b")
BUCKETS = 3
BUCKET_S = 60


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _configure(http: httpx.Client, queue: str, namespace: str = "", task: str = "",
               **options: Any) -> None:
    answer = http.post("/api/v1/configure", json={
        "queue": queue, "namespace": namespace, "task": task, "options": options})
    assert answer.status_code == 200, answer.text


def _refresh(http: httpx.Client) -> None:
    assert http.post("/api/v1/stats/refresh").status_code == 200


def _get(http: httpx.Client, path: str, **params: Any) -> Dict[str, Any]:
    answer = http.get(path, params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _worker_row(i: int, j: int) -> Dict[str, Any]:
    """What worker ``i`` counted in interval ``j`` (distinct numbers, so sums are telling)."""
    push_requests = 10 * (i + 1) + j
    return {
        "push_requests": push_requests, "push_messages": 100 * (i + 1) + 10 * j,
        "pop_requests": 20 + j, "pop_messages": 50 * (i + 1) + j, "pop_empty": j,
        "ack_requests": 30 + i, "ack_messages": 40 * (i + 1) + j + i + j,
        "ack_success": 40 * (i + 1) + j, "ack_failed": i + j, "transactions": j,
        "dlq": i, "db_errors": i * j,
        "latency": {"push": {"count": push_requests, "avgMs": 2.0 + i, "maxMs": 9.0},
                    "pop": {"count": 10, "avgMs": 4.0 + j, "maxMs": 12.0},
                    "ack": {"count": 5 * (i + 1), "avgMs": 1.0 + j, "maxMs": 3.0}},
        "event_loop_lag_ms": {"avg": 1.0 + i + j, "max": 10.0 + i + j, "p99": 9.0},
        "pop_lag_ms": {"avg": 5.0, "max": 7.0, "p99": 7.0},
        "rss_bytes": 100_000_000 * (i + 1) + j, "cpu_user_seconds": 0.6 * (i + 1),
        "cpu_system_seconds": 0.3 * (i + 1), "db_pool_size": 10, "db_pool_idle": 8 - j,
        "db_pool_waiting": j, "buffer_pending": j, "buffer_failed": 0,
        "db_healthy": not (i == 1 and j == BUCKETS - 1), "parked_consumers": j,
    }


def _queue_row(q: int, i: int, j: int) -> Dict[str, Any]:
    """What worker ``i`` counted for queue ``q`` in interval ``j``."""
    return {
        "push_requests": 3 + q + j, "push_messages": (60 - 20 * q) * (i + 1) + j,
        "pop_requests": 5 + j, "pop_messages": 10 * (q + 1) + i + j, "pop_empty": i,
        "ack_success": 8 * (q + 1) + j, "ack_failed": q + i, "transactions": j, "dlq": q * i,
        "pop_lag_ms": {"avg": 100.0 * (q + 1) + 10 * i + j, "max": 500.0 + q + i + j,
                       "p99": 400.0},
        "parked_consumers": i + j + q,
    }


class Seeded:
    """The seeded rows and where they are."""

    def __init__(self, base: datetime, hostname: str, queues: List[str], namespace: str,
                 task: str):
        self.base = base
        self.hostname = hostname
        self.queues = queues
        self.namespace = namespace
        self.task = task
        self.start = _iso(base)
        self.end = _iso(base + timedelta(seconds=BUCKET_S * BUCKETS))

    def bucket(self, j: int) -> str:
        return _iso(self.base + timedelta(seconds=BUCKET_S * j))


@pytest.fixture
def seeded(http: httpx.Client, db) -> Iterator[Seeded]:
    """Two workers x three intervals, and two queues (one namespace, one task) x the same."""
    with db.cursor() as cursor:  # a whole hour, so every bucket size starts there
        cursor.execute("SELECT date_trunc('hour', now() - interval '30 days 7 hours')"
                       " AT TIME ZONE 'UTC'")
        base = cursor.fetchone()[0]
    hostname = unique_name("host-")
    namespace, task = unique_name("ns-"), unique_name("task-")
    queues = [unique_name("sq-a-"), unique_name("sq-b-")]
    _configure(http, queues[0], namespace, task)
    _configure(http, queues[1], namespace)
    seeded = Seeded(base, hostname, queues, namespace, task)
    with db.cursor() as cursor:
        for i, worker in enumerate(WORKERS):
            for j in range(BUCKETS):
                row = {key: json.dumps(value) if isinstance(value, dict) else value
                       for key, value in _worker_row(i, j).items()}
                columns = ", ".join(row)
                cursor.execute(
                    f"INSERT INTO queen.worker_metrics (bucket_start, bucket_seconds, hostname,"
                    f" worker_id, pid, {columns}) VALUES (%s AT TIME ZONE 'UTC', %s, %s, %s,"
                    f" %s, {', '.join(['%s'] * len(row))})",
                    (base + timedelta(seconds=BUCKET_S * j), BUCKET_S, hostname, worker,
                     1000 + i, *row.values()))
                for q, queue in enumerate(queues):
                    qrow = {key: json.dumps(value) if isinstance(value, dict) else value
                            for key, value in _queue_row(q, i, j).items()}
                    cursor.execute(
                        f"INSERT INTO queen.queue_metrics (bucket_start, bucket_seconds,"
                        f" queue_name, hostname, worker_id, pid, {', '.join(qrow)}) VALUES"
                        f" (%s AT TIME ZONE 'UTC', %s, %s, %s, %s, %s,"
                        f" {', '.join(['%s'] * len(qrow))})",
                        (base + timedelta(seconds=BUCKET_S * j), BUCKET_S, queue, hostname,
                         worker, 1000 + i, *qrow.values()))
    try:
        yield seeded
    finally:
        with db.cursor() as cursor:
            cursor.execute("DELETE FROM queen.worker_metrics WHERE hostname = %s", (hostname,))
            cursor.execute("DELETE FROM queen.queue_metrics WHERE hostname = %s", (hostname,))
        for queue in queues:
            http.delete(f"/api/v1/resources/queues/{queue}")


def _weighted(pairs: List[tuple]) -> float:
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


# -- /api/v1/status ---------------------------------------------------------------------


def test_status_sums_both_workers_per_one_minute_bucket(http, seeded):
    status = _get(http, "/api/v1/status", **{"from": seeded.start, "to": seeded.end})

    assert status["timeRange"] == {"from": seeded.start, "to": seeded.end}
    assert status["bucketMinutes"] == 1 and status["pointCount"] == BUCKETS
    assert [p["timestamp"] for p in status["throughput"]] == [
        seeded.bucket(j) for j in range(BUCKETS)]
    for j, point in enumerate(status["throughput"]):
        rows = [_worker_row(i, j) for i in range(len(WORKERS))]
        for key, column in (("pushRequests", "push_requests"), ("pushMessages", "push_messages"),
                            ("popMessages", "pop_messages"), ("ackSuccess", "ack_success"),
                            ("ackFailed", "ack_failed"), ("transactions", "transactions"),
                            ("dlq", "dlq")):
            assert point[key] == sum(r[column] for r in rows), (key, j)
        assert point["ingestedPerSecond"] == pytest.approx(
            sum(r["push_messages"] for r in rows) / BUCKET_S, abs=1e-3)
        assert point["processedPerSecond"] == pytest.approx(
            sum(r["ack_success"] for r in rows) / BUCKET_S, abs=1e-3)
        for op in ("push", "pop", "ack"):
            assert point["latencyMs"][op] == pytest.approx(_weighted(
                [(r["latency"][op]["avgMs"], r["latency"][op]["count"]) for r in rows]),
                abs=1e-3)


def test_status_lists_each_worker_with_its_last_interval(http, seeded):
    status = _get(http, "/api/v1/status", **{"from": seeded.start, "to": seeded.end})

    workers = [w for w in status["workers"] if w["hostname"] == seeded.hostname]
    assert [w["workerId"] for w in workers] == list(WORKERS)
    for i, worker in enumerate(workers):
        last = _worker_row(i, BUCKETS - 1)
        assert worker["pid"] == 1000 + i
        assert worker["lastSeen"] == _iso(seeded.base + timedelta(seconds=BUCKET_S * BUCKETS))
        assert worker["rssBytes"] == last["rss_bytes"]
        assert worker["cpuPercent"] == pytest.approx(90.0 * (i + 1) / BUCKET_S, abs=0.01)
        assert worker["dbPoolSize"] == 10 and worker["dbPoolIdle"] == last["db_pool_idle"]
        assert worker["bufferPending"] == last["buffer_pending"]
        assert worker["dbHealthy"] is last["db_healthy"]
        assert worker["eventLoopLagMs"] == {
            "avg": pytest.approx(sum(1.0 + i + j for j in range(BUCKETS)) / BUCKETS),
            "max": 10.0 + i + BUCKETS - 1}
        assert worker["alive"] is False  # thirty days ago
    rows = [_worker_row(i, j) for i in range(len(WORKERS)) for j in range(BUCKETS)]
    assert status["errors"] == {"dbErrors": sum(r["db_errors"] for r in rows),
                                "ackFailed": sum(r["ack_failed"] for r in rows),
                                "dlq": sum(r["dlq"] for r in rows)}


def test_status_queues_are_summed_over_the_range_busiest_first(http, seeded):
    status = _get(http, "/api/v1/status", **{"from": seeded.start, "to": seeded.end})

    mine = [q for q in status["queues"] if q["name"] in seeded.queues]
    assert [q["name"] for q in mine] == seeded.queues  # queue a pushes more
    for q, entry in enumerate(mine):
        rows = [_queue_row(q, i, j) for i in range(len(WORKERS)) for j in range(BUCKETS)]
        assert entry["pushMessages"] == sum(r["push_messages"] for r in rows)
        assert entry["popMessages"] == sum(r["pop_messages"] for r in rows)
        assert entry["ackSuccess"] == sum(r["ack_success"] for r in rows)
        assert entry["ackFailed"] == sum(r["ack_failed"] for r in rows)
        assert entry["dlq"] == sum(r["dlq"] for r in rows)
        assert entry["popLagMs"]["avg"] == pytest.approx(_weighted(
            [(r["pop_lag_ms"]["avg"], r["pop_messages"]) for r in rows]), abs=1e-3)
        assert entry["popLagMs"]["max"] == max(r["pop_lag_ms"]["max"] for r in rows)


@pytest.mark.parametrize("filters,selected", [
    (lambda s: {"queue": s.queues[1]}, [1]),
    (lambda s: {"namespace": s.namespace}, [0, 1]),
    (lambda s: {"task": s.task}, [0]),
], ids=["queue", "namespace", "task"])
def test_status_filters_count_only_the_selected_queues(http, seeded, filters, selected):
    status = _get(http, "/api/v1/status",
                  **{"from": seeded.start, "to": seeded.end, **filters(seeded)})

    assert sorted(q["name"] for q in status["queues"]) == sorted(
        seeded.queues[q] for q in selected)
    for j, point in enumerate(status["throughput"]):
        rows = [_queue_row(q, i, j) for q in selected for i in range(len(WORKERS))]
        assert point["pushMessages"] == sum(r["push_messages"] for r in rows)
        assert point["ackFailed"] == sum(r["ack_failed"] for r in rows)
    rows = [_queue_row(q, i, j) for q in selected for i in range(len(WORKERS))
            for j in range(BUCKETS)]
    assert status["errors"]["dlq"] == sum(r["dlq"] for r in rows)


def test_status_counts_stored_messages_leases_and_dead_letters_of_a_queue(http):
    queue = unique_name("sq-live-")
    push(http, queue, [1, 2, 3, 4])
    first = pop(http, queue, batch=1)["messages"][0]
    assert ack(http, first, "dlq", error="boom")["dlq"] is True
    held = pop(http, queue, batch=2)  # a lease on two messages stays open
    assert held is not None
    _refresh(http)

    status = _get(http, "/api/v1/status", queue=queue)

    assert status["messages"]["total"] == 4
    assert status["messages"]["processing"] == 2 and status["messages"]["pending"] == 1
    assert status["messages"]["deadLetter"] == 1
    assert status["deadLetterQueue"] == {"total": 1, "inRange": 1}
    assert status["leases"] == {"active": 1, "partitionsLocked": 1}
    assert status["statsAge"] is not None and status["statsAge"] >= 0
    http.delete(f"/api/v1/resources/queues/{queue}")


def test_status_defaults_to_the_last_hour_in_minute_buckets(http):
    status = _get(http, "/api/v1/status")

    start = datetime.fromisoformat(status["timeRange"]["from"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(status["timeRange"]["to"].replace("Z", "+00:00"))
    assert end - start == timedelta(hours=1)
    assert status["bucketMinutes"] == 1
    assert status["pointCount"] == len(status["throughput"]) in (60, 61)
    times = [p["timestamp"] for p in status["throughput"]]
    assert times == sorted(times)


@pytest.mark.parametrize("span,bucket", [
    (timedelta(hours=2), 1), (timedelta(hours=3), 5), (timedelta(hours=30), 15),
    (timedelta(days=5), 60), (timedelta(days=30), 360), (timedelta(days=100), 1440),
    (timedelta(days=365), 1440 * 4),
])
def test_bucket_size_keeps_the_series_near_120_points(http, span, bucket):
    end = datetime(2026, 1, 1)
    status = _get(http, "/api/v1/status", **{"from": _iso(end - span), "to": _iso(end)})

    assert status["bucketMinutes"] == bucket
    assert 0 < status["pointCount"] <= 121
    assert all(p["pushMessages"] == 0 for p in status["throughput"])  # long past: empty


def test_five_minute_buckets_hold_all_three_intervals(http, seeded):
    end = seeded.base + timedelta(hours=3)
    status = _get(http, "/api/v1/status", **{"from": seeded.start, "to": _iso(end)})

    assert status["bucketMinutes"] == 5
    first = status["throughput"][0]
    assert first["timestamp"] == seeded.start
    assert first["pushMessages"] == sum(_worker_row(i, j)["push_messages"]
                                        for i in range(len(WORKERS)) for j in range(BUCKETS))
    assert first["ingestedPerSecond"] == pytest.approx(first["pushMessages"] / 300, abs=1e-3)
    assert all(p["pushMessages"] == 0 for p in status["throughput"][1:])


def test_epoch_milliseconds_are_accepted_for_from_and_to(http, seeded):
    start_ms = int((seeded.base - datetime(1970, 1, 1)).total_seconds() * 1000)
    status = _get(http, "/api/v1/status",
                  **{"from": str(start_ms), "to": str(start_ms + BUCKETS * BUCKET_S * 1000)})

    assert status["timeRange"] == {"from": seeded.start, "to": seeded.end}
    assert status["throughput"][0]["pushMessages"] == sum(
        _worker_row(i, 0)["push_messages"] for i in range(len(WORKERS)))


def test_range_beyond_metrics_retention_is_empty_not_refused(http):
    status = _get(http, "/api/v1/status", **{"from": "2001-01-01T00:00:00Z",
                                             "to": "2001-01-01T01:00:00Z"})

    assert status["pointCount"] == 60 and status["workers"] == [] and status["queues"] == []
    assert status["errors"] == {"dbErrors": 0, "ackFailed": 0, "dlq": 0}


# -- /api/v1/status/queues and /status/queues/{queue} -----------------------------------


def test_status_queues_pages_and_filters_by_namespace_and_task(http):
    namespace, task = unique_name("ns-"), unique_name("task-")
    names = sorted(unique_name("sq-page-") for _ in range(3))
    for n, name in enumerate(names):
        _configure(http, name, namespace, task if n < 2 else "")
    push(http, names[0], [1, 2])
    _refresh(http)

    first = _get(http, "/api/v1/status/queues", namespace=namespace, limit=2)
    rest = _get(http, "/api/v1/status/queues", namespace=namespace, limit=2, offset=2)
    by_task = _get(http, "/api/v1/status/queues", task=task)
    capped = _get(http, "/api/v1/status/queues", namespace=namespace, limit=10**12)

    assert [q["name"] for q in first["queues"]] == names[:2]
    assert first["pagination"] == {"limit": 2, "offset": 0, "total": 3}
    assert [q["name"] for q in rest["queues"]] == names[2:]
    assert [q["name"] for q in by_task["queues"]] == names[:2]
    assert capped["pagination"]["limit"] == 1000 and len(capped["queues"]) == 3
    entry = first["queues"][0]
    assert entry["namespace"] == namespace and entry["task"] == task
    assert entry["partitions"] == 1
    assert entry["messages"] == {"total": 2, "pending": 2, "processing": 0}
    assert entry["createdAt"].endswith("Z")
    for name in names:
        http.delete(f"/api/v1/resources/queues/{name}")


def test_status_queue_shows_config_partitions_cursor_and_group_lag(http):
    queue = unique_name("sq-detail-")
    _configure(http, queue, leaseTime=120, retryLimit=5, priority=7, deadLetterQueue=True)
    push(http, queue, [1, 2, 3], partition="p1")
    push(http, queue, [4], partition="p2", prefix="u")
    delivered = pop(http, queue, "p1", batch=2)
    for message in delivered["messages"]:
        ack(http, message)
    pop(http, queue, "p1", batch=5, consumerGroup="readers")  # group cursor, lease open

    detail = _get(http, f"/api/v1/status/queues/{queue}")

    config = detail["queue"]["config"]
    assert detail["queue"]["name"] == queue and detail["queue"]["priority"] == 7
    assert config["leaseTime"] == 120 and config["retryLimit"] == 5
    assert config["deadLetterQueue"] is True
    assert {"ttl", "retryDelay", "maxQueueSize"} <= set(config)
    parts = {p["name"]: p for p in detail["partitions"]}
    assert set(parts) == {"Default", "p1", "p2"}  # configure made Default
    assert parts["p1"]["messages"] == {"total": 3, "pending": 1, "processing": 0}
    assert parts["p1"]["cursor"]["totalConsumed"] == 2
    assert parts["p1"]["cursor"]["batchesConsumed"] == 1
    assert parts["p1"]["cursor"]["lastActivity"].endswith("Z")
    assert parts["p2"]["cursor"] == {"totalConsumed": 0, "batchesConsumed": 0,
                                     "lastActivity": None}
    groups = {g["name"]: g for g in parts["p1"]["consumerGroups"]}
    assert groups["__QUEUE_MODE__"]["offsetLag"] == 1
    assert groups["readers"]["offsetLag"] == 3  # popped under a lease, not acked
    assert groups["readers"]["timeLagSeconds"] >= 0
    assert detail["totals"]["total"] == detail["messages"]["total"] == 4
    assert detail["totals"]["partitions"] == 3 and detail["totals"]["consumed"] == 2
    http.delete(f"/api/v1/resources/queues/{queue}")


def test_status_queue_messages_are_newest_first_and_paged(http):
    queue = unique_name("sq-msgs-")
    push(http, queue, [0, 1, 2, 3, 4])

    page = _get(http, f"/api/v1/status/queues/{queue}/messages", limit=2)
    second = _get(http, f"/api/v1/status/queues/{queue}/messages", limit=2, offset=2)

    assert [m["transactionId"] for m in page["messages"]] == ["t4", "t3"]
    assert [m["transactionId"] for m in second["messages"]] == ["t2", "t1"]
    assert page["pagination"] == {"limit": 2, "offset": 0, "total": 5}
    message = page["messages"][0]
    assert message["queue"] == queue and message["partition"] == "Default"
    assert message["queuePath"] == f"{queue}/Default" and message["status"] == "pending"
    assert set(message) >= {"id", "partitionId", "createdAt"}
    http.delete(f"/api/v1/resources/queues/{queue}")


def test_status_queue_messages_merge_partitions_newest_first(http):
    queue = unique_name("sq-merge-")
    push(http, queue, [0, 1], partition="p1", prefix="a")
    push(http, queue, [0, 1], partition="p2", prefix="b")
    push(http, queue, [0], partition="p1", prefix="c")

    page = _get(http, f"/api/v1/status/queues/{queue}/messages", limit=3, offset=1)

    assert [m["queuePath"].split("/")[1] + ":" + m["transactionId"]
            for m in page["messages"]] == ["p2:b1", "p2:b0", "p1:a1"]
    assert page["pagination"]["total"] == 5
    http.delete(f"/api/v1/resources/queues/{queue}")


# -- /api/v1/status/analytics and /api/v1/analytics/* -----------------------------------


def test_analytics_per_minute_sums_queue_rows(http, seeded):
    answer = _get(http, "/api/v1/status/analytics", interval="minute",
                  namespace=seeded.namespace, **{"from": seeded.start, "to": seeded.end})

    assert answer["interval"] == "minute"
    assert (answer["from"], answer["to"]) == (seeded.start, seeded.end)
    assert [p["timestamp"] for p in answer["dataPoints"]] == [
        seeded.bucket(j) for j in range(BUCKETS)]
    for j, point in enumerate(answer["dataPoints"]):
        rows = [_queue_row(q, i, j) for q in range(2) for i in range(len(WORKERS))]
        assert point["pushMessages"] == sum(r["push_messages"] for r in rows)
        assert point["popMessages"] == sum(r["pop_messages"] for r in rows)
        assert point["ackSuccess"] == sum(r["ack_success"] for r in rows)
        assert point["dlq"] == sum(r["dlq"] for r in rows)
        assert point["avgPopLagMs"] == pytest.approx(_weighted(
            [(r["pop_lag_ms"]["avg"], r["pop_messages"]) for r in rows]), abs=1e-3)


def test_analytics_per_hour_puts_the_range_in_one_point(http, seeded):
    answer = _get(http, "/api/v1/status/analytics", queue=seeded.queues[0],
                  **{"from": seeded.start, "to": seeded.end})

    assert answer["interval"] == "hour" and len(answer["dataPoints"]) == 1
    assert answer["dataPoints"][0]["timestamp"] == seeded.start  # the hour starts there
    assert answer["dataPoints"][0]["ackFailed"] == sum(
        _queue_row(0, i, j)["ack_failed"] for i in range(len(WORKERS)) for j in range(BUCKETS))


def test_system_metrics_sum_the_workers_per_bucket(http, seeded):
    answer = _get(http, "/api/v1/analytics/system-metrics",
                  **{"from": seeded.start, "to": seeded.end})

    assert answer["bucketMinutes"] == 1 and len(answer["series"]) == BUCKETS
    for j, point in enumerate(answer["series"]):
        rows = [_worker_row(i, j) for i in range(len(WORKERS))]
        assert point["timestamp"] == seeded.bucket(j) and point["workers"] == 2
        assert point["rssBytes"] == sum(r["rss_bytes"] for r in rows)
        assert point["cpuPercent"] == pytest.approx(90.0 * 3 / BUCKET_S, abs=0.01)
        assert point["dbPoolIdle"] == sum(r["db_pool_idle"] for r in rows)
        assert point["eventLoopLagMs"]["max"] == max(r["event_loop_lag_ms"]["max"] for r in rows)
        assert point["popMessages"] == sum(r["pop_messages"] for r in rows)


def test_worker_metrics_give_one_series_per_worker_and_filter(http, seeded):
    every = _get(http, "/api/v1/analytics/worker-metrics", hostname=seeded.hostname,
                 **{"from": seeded.start, "to": seeded.end})
    one = _get(http, "/api/v1/analytics/worker-metrics", hostname=seeded.hostname,
               workerId=WORKERS[1], **{"from": seeded.start, "to": seeded.end})

    assert [(s["workerId"], s["pid"]) for s in every["series"]] == [("w-a", 1000), ("w-b", 1001)]
    assert [s["workerId"] for s in one["series"]] == ["w-b"]
    points = one["series"][0]["points"]
    assert [p["rssBytes"] for p in points] == [_worker_row(1, j)["rss_bytes"]
                                               for j in range(BUCKETS)]
    assert [p["dbHealthy"] for p in points] == [True, True, False]
    assert [p["dbPoolWaiting"] for p in points] == [0, 1, 2]


def test_queue_lag_ops_and_parked_series_per_queue(http, seeded):
    window = {"from": seeded.start, "to": seeded.end, "queue": seeded.queues[1]}
    lag = _get(http, "/api/v1/analytics/queue-lag", **window)
    ops = _get(http, "/api/v1/analytics/queue-ops", **window)
    parked = _get(http, "/api/v1/analytics/queue-parked-replicas", **window)

    for answer in (lag, ops, parked):
        assert [s["queue"] for s in answer["series"]] == [seeded.queues[1]]
        assert answer["bucketMinutes"] == 1 and len(answer["series"][0]["points"]) == BUCKETS
    for j in range(BUCKETS):
        rows = [_queue_row(1, i, j) for i in range(len(WORKERS))]
        assert lag["series"][0]["points"][j]["avgMs"] == pytest.approx(_weighted(
            [(r["pop_lag_ms"]["avg"], r["pop_messages"]) for r in rows]), abs=1e-3)
        assert lag["series"][0]["points"][j]["maxMs"] == max(r["pop_lag_ms"]["max"]
                                                             for r in rows)
        assert ops["series"][0]["points"][j]["pushMessages"] == sum(
            r["push_messages"] for r in rows)
        assert ops["series"][0]["points"][j]["popEmpty"] == sum(r["pop_empty"] for r in rows)
        assert parked["series"][0]["points"][j] == {
            "timestamp": seeded.bucket(j), "replicas": 2,
            "parkedConsumers": sum(r["parked_consumers"] for r in rows)}


def test_retention_reports_rows_and_oldest_row_per_table(http, seeded):
    answer = _get(http, "/api/v1/analytics/retention")
    of_queue = _get(http, "/api/v1/analytics/retention", queue=seeded.queues[0])

    tables = {t["table"]: t for t in answer["series"]}
    assert {"messages", "dead_letter_queue", "message_traces", "worker_metrics",
            "queue_metrics"} <= set(tables)
    assert tables["worker_metrics"]["rows"] >= len(WORKERS) * BUCKETS
    assert tables["worker_metrics"]["oldestAt"] <= seeded.start
    assert tables["worker_metrics"]["oldestAgeSeconds"] >= 30 * 86400
    assert answer["metricsRetentionDays"] == 90
    mine = {t["table"]: t for t in of_queue["series"]}
    assert "worker_metrics" not in mine
    assert mine["queue_metrics"] == {
        "table": "queue_metrics", "rows": len(WORKERS) * BUCKETS, "oldestAt": seeded.start,
        "oldestAgeSeconds": mine["queue_metrics"]["oldestAgeSeconds"]}
    assert mine["messages"]["rows"] == 0 and mine["messages"]["oldestAt"] is None


def test_postgres_stats_describe_the_database_and_queen_tables(http):
    answer = _get(http, "/api/v1/analytics/postgres-stats")

    assert answer["database"]["sizeBytes"] > 0 and answer["database"]["connections"] >= 1
    assert 0 <= answer["database"]["cacheHitRatio"] <= 1
    tables = {t["name"]: t for t in answer["tables"]}
    assert {"messages", "queues", "worker_metrics", "queue_metrics"} <= set(tables)
    assert tables["messages"]["sizeBytes"] > 0
    assert {"liveRows", "deadRows", "lastVacuum", "lastAutovacuum",
            "lastAnalyze"} <= set(tables["messages"])
    assert any(i["table"] == "messages" for i in answer["indexes"])


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize("path,params,names", [
    ("/api/v1/status", {"from": "yesterday"}, "from"),
    ("/api/v1/status", {"to": "2024-13-01T00:00:00Z"}, "to"),
    ("/api/v1/status/analytics", {"from": "12:00"}, "from"),
    ("/api/v1/analytics/system-metrics", {"to": "soon"}, "to"),
    ("/api/v1/analytics/queue-lag", {"from": "x"}, "from"),
    ("/api/v1/status", {"from": "2024-01-02T00:00:00Z", "to": "2024-01-01T00:00:00Z"},
     "from must not be after to"),
    ("/api/v1/analytics/worker-metrics", {"from": "1700000000000", "to": "1600000000000"},
     "from must not be after to"),
    ("/api/v1/status", {"from": "99999999999999999"}, "from"),
    ("/api/v1/status/analytics", {"interval": "week"}, "interval"),
])
def test_bad_parameters_answer_400_naming_them(http, path, params, names):
    answer = http.get(path, params=params)

    assert answer.status_code == 400, answer.text
    assert names in answer.json()["error"]


@pytest.mark.parametrize("params,page", [
    ({"limit": "ten"}, (100, 0)), ({"limit": "0"}, (1, 0)), ({"offset": "-1"}, (100, 0)),
    ({"offset": "1.5"}, (100, 0)), ({"limit": "5000", "offset": "2"}, (1000, 2)),
])
def test_odd_paging_is_read_as_wire_1_2_says(http, params, page):
    """Not an integer: the default; out of range: clamped (they answered 400)."""
    answer = _get(http, "/api/v1/status/queues", **params)
    assert (answer["pagination"]["limit"], answer["pagination"]["offset"]) == page


def test_odd_paging_of_queue_messages_takes_defaults_and_bounds(http):
    queue = unique_name("sq-bad-")
    push(http, queue, [1])

    assert _get(http, f"/api/v1/status/queues/{queue}/messages",
                limit="lots")["pagination"]["limit"] == 50
    assert _get(http, f"/api/v1/status/queues/{queue}/messages",
                offset="x")["pagination"]["offset"] == 0
    capped = _get(http, f"/api/v1/status/queues/{queue}/messages", limit=5000)
    assert capped["pagination"]["limit"] == 1000 and len(capped["messages"]) == 1
    http.delete(f"/api/v1/resources/queues/{queue}")


@pytest.mark.parametrize("path", [
    "/api/v1/status/queues/{q}", "/api/v1/status/queues/{q}/messages",
    "/api/v1/status?queue={q}", "/api/v1/status/analytics?queue={q}",
    "/api/v1/analytics/queue-lag?queue={q}", "/api/v1/analytics/queue-ops?queue={q}",
    "/api/v1/analytics/queue-parked-replicas?queue={q}", "/api/v1/analytics/retention?queue={q}",
])
def test_unknown_queue_answers_404(http, path):
    answer = http.get(path.format(q=unique_name("nowhere-")))

    assert answer.status_code == 404
    assert answer.json() == {"error": "Queue not found"}


# -- end to end: real traffic through the metrics writer ---------------------------------


def test_real_traffic_shows_up_in_status_after_an_aggregate_interval(make_server):
    server = make_server(METRICS_AGGREGATE_INTERVAL_S="1")
    queue = unique_name("sq-e2e-")
    with httpx.Client(base_url=server.url, timeout=40) as client:
        push(client, queue, list(range(5)))
        delivered = pop(client, queue, batch=3)
        for message in delivered["messages"]:
            ack(client, message)

        def settled() -> Dict[str, Any] | None:
            status = _get(client, "/api/v1/status", queue=queue)
            entries = [q for q in status["queues"] if q["name"] == queue]
            done = entries and entries[0]["pushMessages"] == 5 and entries[0]["ackSuccess"] == 3
            return status if done else None

        status = wait_until(settled, message="the queue's metrics rows")
        ops = _get(client, "/api/v1/analytics/queue-ops", queue=queue)
        system = _get(client, "/api/v1/analytics/system-metrics")

    entry = status["queues"][0]
    assert entry["popMessages"] == 3 and entry["ackFailed"] == 0 and entry["dlq"] == 0
    assert sum(p["pushMessages"] for p in status["throughput"]) == 5
    assert sum(p["ackSuccess"] for p in status["throughput"]) == 3
    worker = [w for w in status["workers"] if w["pid"] == server.pid]
    assert len(worker) == 1 and worker[0]["alive"] is True and worker[0]["rssBytes"] > 0
    assert worker[0]["dbHealthy"] is True
    points = ops["series"][0]["points"]
    assert ops["series"][0]["queue"] == queue
    assert sum(p["pushMessages"] for p in points) == 5
    assert sum(p["pushRequests"] for p in points) == 1
    assert system["series"] and system["series"][-1]["rssBytes"] > 0


# -- the official client's Admin --------------------------------------------------------


def test_official_admin_methods_return_the_documented_shapes(server, http, seeded):
    async def scenario() -> Dict[str, Any]:
        async with connect(server.url) as client:
            admin = client.admin
            window = {"from": seeded.start, "to": seeded.end}
            return {
                "status": await admin.get_status(**window),
                "queues": await admin.get_queue_stats(namespace=seeded.namespace, limit=1),
                "queue": await admin.get_queue_detail(seeded.queues[0]),
                "analytics": await admin.get_analytics(interval="minute",
                                                       queue=seeded.queues[0], **window),
                "system": await admin.get_system_metrics(**window),
                "workers": await admin.get_worker_metrics(hostname=seeded.hostname, **window),
                "postgres": await admin.get_postgres_stats(),
            }

    got = run_scenario(scenario())

    assert got["status"]["pointCount"] == BUCKETS
    assert got["status"]["throughput"][0]["pushMessages"] == sum(
        _worker_row(i, 0)["push_messages"] for i in range(len(WORKERS)))
    assert got["queues"]["pagination"] == {"limit": 1, "offset": 0, "total": 2}
    assert got["queues"]["queues"][0]["name"] == seeded.queues[0]
    assert got["queue"]["queue"]["name"] == seeded.queues[0]
    assert [p["timestamp"] for p in got["analytics"]["dataPoints"]] == [
        seeded.bucket(j) for j in range(BUCKETS)]
    assert [p["workers"] for p in got["system"]["series"]] == [2] * BUCKETS
    assert [s["workerId"] for s in got["workers"]["series"]] == list(WORKERS)
    assert got["postgres"]["database"]["sizeBytes"] > 0
