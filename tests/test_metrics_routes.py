"""GET /metrics and GET /metrics/prometheus on real servers, and the rows behind them.

Each test runs its servers on a database of its own (``scratch_database``), so the cluster
totals read from PostgreSQL are exactly the test's workload.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.faultkit import private_postgres
from tests.http_helpers import ack, configure, pop, push
from tests.scratch_databases import scratch_database, server_env
from tests.support import running_server, unique_name, wait_until

POOL_SIZE = 4

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# The families other engineers' alert rules and dashboards are written over (counters without
# their _total suffix, as prometheus_client's parser names the family).
PROCESS_FAMILIES = {
    "queen_uptime_seconds", "queen_cpu_user_microseconds", "queen_cpu_system_microseconds",
    "queen_process_resident_memory_bytes", "queen_process_virtual_memory_bytes",
    "queen_db_pool_size", "queen_db_pool_idle", "queen_db_pool_active",
    "queen_file_buffer_pending", "queen_file_buffer_failed", "queen_file_buffer_db_healthy",
    "queen_maintenance_mode_enabled", "queen_shared_state_enabled", "queen_qc_cache_size",
    "queen_qc_cache_hits", "queen_qc_cache_misses", "queen_servers",
    "queen_transport_messages", "queen_request_duration_seconds"}
POSTGRES_FAMILIES = {
    "queen_cluster_push_requests", "queen_cluster_pop_requests", "queen_cluster_ack_requests",
    "queen_cluster_transactions", "queen_cluster_push_messages", "queen_cluster_pop_messages",
    "queen_cluster_ack_messages", "queen_cluster_ack", "queen_cluster_db_errors",
    "queen_cluster_dlq", "queen_queue_push_requests_per_minute",
    "queen_queue_push_messages_per_minute", "queen_queue_pop_messages_per_minute",
    "queen_queue_pop_empty_per_minute", "queen_queue_transactions_per_minute",
    "queen_queue_ack_per_minute", "queen_queue_pop_lag_milliseconds",
    "queen_queue_parked_consumers", "queen_queue_metrics_age_seconds",
    "queen_queue_pending_messages", "queen_queue_processing_messages",
    "queen_worker_event_loop_lag_milliseconds", "queen_worker_db_connections",
    "queen_worker_metrics_age_seconds", "queen_worker_db_errors_per_minute",
    "queen_worker_dlq_per_minute", "queen_worker_requests_per_minute",
    "queen_worker_messages_per_minute", "queen_worker_ack_per_minute",
    "queen_worker_lag_milliseconds", "queen_dlq_depth", "queen_dlq_depth_by_queue"}


def family_names(http: httpx.Client) -> set[str]:
    answer = http.get("/metrics/prometheus")
    assert answer.status_code == 200, answer.text
    return {family.name for family in text_string_to_metric_families(answer.text)}


def scrape(http: httpx.Client) -> Samples:
    """``/metrics/prometheus`` parsed by prometheus_client's own parser: value by (sample
    name, sorted labels)."""
    answer = http.get("/metrics/prometheus")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not exposed"
    return samples[key]


def families(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def rows(dsn: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, args)
            return cursor.fetchall()
    finally:
        connection.close()


@pytest.fixture
def own_database(pg_dsn: str) -> Iterator[str]:
    with scratch_database(pg_dsn) as dsn:
        yield dsn


def workload(http: httpx.Client, first: str, second: str) -> None:
    """5 messages pushed to ``first`` (2 requests) and 2 to ``second``; everything popped;
    6 acks completed, one failed that dead-letters its message (retryLimit 0)."""
    configure(http, first, retryLimit=0, retryDelay=0)
    configure(http, second)
    push(http, first, [{"n": n} for n in range(3)], prefix="a")
    push(http, first, [{"n": n} for n in range(2)], prefix="b")
    push(http, second, [{"n": n} for n in range(2)], prefix="c")
    delivered = pop(http, first, batch=10)
    assert delivered is not None and len(delivered["messages"]) == 5
    *good, bad = delivered["messages"]
    for message in good:
        assert ack(http, message)["success"]
    result = ack(http, bad, "failed", error="cannot parse")
    assert result["success"] and result["dlq"]
    delivered = pop(http, second, batch=10)
    assert delivered is not None and len(delivered["messages"]) == 2
    for message in delivered["messages"]:
        assert ack(http, message)["success"]
    assert pop(http, second) is None  # one empty pop


def test_prometheus_values_after_a_known_workload(pg_env, own_database):
    first, second = unique_name("metrics-a-"), unique_name("metrics-b-")
    env = server_env(pg_env, own_database)
    with running_server(env, DB_POOL_SIZE=str(POOL_SIZE), METRICS_AGGREGATE_INTERVAL_S="1",
                        METRICS_SAMPLE_INTERVAL_MS="200") as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        workload(http, first, second)

        samples = scrape(http)  # at once: this process's unwritten counts are included
        assert value(samples, "queen_cluster_push_messages_total", scope="cluster") == 7
        assert value(samples, "queen_cluster_push_requests_total", scope="cluster") == 3
        assert value(samples, "queen_cluster_pop_requests_total", scope="cluster") == 3
        assert value(samples, "queen_cluster_pop_messages_total", scope="cluster") == 7
        assert value(samples, "queen_cluster_ack_requests_total", scope="cluster") == 7
        assert value(samples, "queen_cluster_ack_total", scope="cluster", result="success") == 6
        assert value(samples, "queen_cluster_ack_total", scope="cluster", result="failed") == 1
        assert value(samples, "queen_cluster_dlq_total", scope="cluster") == 1
        assert value(samples, "queen_cluster_transactions_total", scope="cluster") == 0
        assert value(samples, "queen_request_duration_seconds_count", op="push") == 3
        assert value(samples, "queen_request_duration_seconds_count", op="pop") == 3
        assert value(samples, "queen_request_duration_seconds_count", op="ack") == 7
        assert value(samples, "queen_request_duration_seconds_bucket", op="ack", le="+Inf") == 7
        assert value(samples, "queen_request_duration_seconds_sum", op="push") > 0
        assert value(samples, "queen_db_pool_size") == POOL_SIZE
        assert value(samples, "queen_file_buffer_db_healthy") == 1
        assert value(samples, "queen_maintenance_mode_enabled") == 0
        assert value(samples, "queen_process_resident_memory_bytes") > 10_000_000
        assert value(samples, "queen_cpu_user_microseconds_total") > 0
        assert value(samples, "queen_dlq_depth", scope="cluster") == 1
        assert value(samples, "queen_dlq_depth_by_queue", queue=first) == 1
        assert ("queen_dlq_depth_by_queue", (("queue", second),)) not in samples

        # After an aggregate interval: the per-queue gauges of the last minute. The empty
        # pop was the workload's last request: once it is written, everything is.
        def aggregated() -> Samples | None:
            now = scrape(http)
            key = ("queen_queue_pop_empty_per_minute", (("queue", second),))
            return now if now.get(key) == 1 else None
        samples = wait_until(aggregated, message="per-queue gauges after an aggregate")
        assert value(samples, "queen_queue_push_messages_per_minute", queue=first) == 5
        assert value(samples, "queen_queue_push_requests_per_minute", queue=first) == 2
        assert value(samples, "queen_queue_pop_messages_per_minute", queue=second) == 2
        assert value(samples, "queen_queue_pop_empty_per_minute", queue=second) == 1
        assert value(samples, "queen_queue_ack_per_minute", queue=first, result="success") == 4
        assert value(samples, "queen_queue_ack_per_minute", queue=first, result="failed") == 1
        assert value(samples, "queen_queue_pop_lag_milliseconds", queue=first, stat="max") > 0
        # totals now come from PostgreSQL, not double-counted with the unwritten ones
        assert value(samples, "queen_cluster_push_messages_total", scope="cluster") == 7
        assert value(samples, "queen_cluster_dlq_total", scope="cluster") == 1
        assert family_names(http) >= PROCESS_FAMILIES | POSTGRES_FAMILIES
        [(worker_rows,)] = rows(own_database, "SELECT count(*) FROM queen.worker_metrics")
        assert worker_rows >= 1
        pid = str(server.pid)
        workers = [labels for name, labels in samples
                   if name == "queen_worker_db_connections"]
        assert [dict(labels)["pid"] for labels in workers] == [pid]


def test_metrics_json_has_real_values(pg_env, own_database):
    env = server_env(pg_env, own_database)
    with running_server(env, DB_POOL_SIZE=str(POOL_SIZE), METRICS_SAMPLE_INTERVAL_MS="100"
                        ) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        workload(http, unique_name("metrics-a-"), unique_name("metrics-b-"))
        answer = http.get("/metrics")
        assert answer.status_code == 200
        body = answer.json()
        # 3 pushes + 3 pops + 7 acks; 7 pushed + 7 delivered + 7 acknowledged
        assert body["requests"]["total"] == 13
        assert body["messages"]["total"] == 21
        assert body["database"] == {"poolSize": POOL_SIZE, "idleConnections": POOL_SIZE,
                                    "waitingRequests": 0}
        assert body["memory"]["rss"] > 10_000_000
        assert body["memory"]["heapUsed"] == 0
        assert body["cpu"]["user"] > 0
        assert 0 < body["uptime"] < 600
        # the rate covers the last seconds' samples: positive right after the workload
        rated = wait_until(lambda: http.get("/metrics").json()["requests"]["rate"] or None,
                           message="a request rate")
        assert rated > 0


def test_rows_are_written_each_interval_and_pruned_after_retention(pg_env, own_database):
    queue = unique_name("metrics-rows-")
    env = server_env(pg_env, own_database)
    with running_server(env, METRICS_AGGREGATE_INTERVAL_S="1") as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        configure(http, queue)
        push(http, queue, [{"n": 1}, {"n": 2}])
        pid = server.pid

        def queue_row() -> list[tuple[Any, ...]] | None:
            found = rows(own_database, "SELECT push_messages, pid FROM queen.queue_metrics "
                                       "WHERE queue_name = %s", queue)
            return found or None
        assert wait_until(queue_row, message="a queue_metrics row") == [(2, pid)]
        wait_until(lambda: rows(own_database, "SELECT count(DISTINCT bucket_start) "
                                              "FROM queen.worker_metrics")[0][0] >= 3 or None,
                   message="three intervals written")
        duplicated = rows(own_database, "SELECT bucket_start, count(*) FROM queen.worker_metrics "
                                        "GROUP BY bucket_start HAVING count(*) > 1")
        assert duplicated == []  # one row per interval for the one worker
        [(pushed,)] = rows(own_database, "SELECT value FROM queen.metrics_totals "
                                         "WHERE counter = 'push_messages'")
        assert pushed == 2

        rows(own_database, """
            INSERT INTO queen.worker_metrics (bucket_start, bucket_seconds, hostname,
                                              worker_id, pid)
            VALUES (now() - interval '91 days', 60, 'old-host', 'old-worker', 1);
            INSERT INTO queen.queue_metrics (bucket_start, bucket_seconds, queue_name,
                                             hostname, worker_id, pid)
            VALUES (now() - interval '91 days', 60, 'old-queue', 'old-host', 'old-worker', 1)
            RETURNING 1""")

        def pruned() -> bool | None:
            left = rows(own_database, """
                SELECT (SELECT count(*) FROM queen.worker_metrics WHERE hostname = 'old-host')
                     + (SELECT count(*) FROM queen.queue_metrics WHERE hostname = 'old-host')""")
            return left[0][0] == 0 or None
        wait_until(pruned, message="rows older than METRICS_RETENTION_DAYS deleted")
        [(recent,)] = rows(own_database, "SELECT count(*) FROM queen.worker_metrics")
        assert recent >= 3  # the recent ones stay


def test_prune_function_deletes_only_rows_past_retention(own_database, pg_env):
    env = server_env(pg_env, own_database)
    with running_server(env):  # installs the schema (and writes its own row at stop)
        pass
    rows(own_database, """
        INSERT INTO queen.worker_metrics (bucket_start, bucket_seconds, hostname, worker_id, pid)
        VALUES (now() - interval '3 days', 60, 'h', 'w', 1), (now() - interval '1 day', 60,
                'h', 'w', 1)
        RETURNING 1""")
    [(answer,)] = rows(own_database, "SELECT queen.metrics_prune(2)")
    assert answer == {"workerRows": 1, "queueRows": 0}
    assert rows(own_database, "SELECT count(*) FROM queen.worker_metrics "
                              "WHERE hostname = 'h'") == [(1,)]


def test_each_of_two_workers_writes_its_own_rows_and_totals_add_up(pg_env, own_database):
    queue = unique_name("metrics-workers-")
    env = server_env(pg_env, own_database)
    with running_server(env, NUM_WORKERS="2", METRICS_AGGREGATE_INTERVAL_S="1") as server:
        pushes = 12
        for n in range(pushes):  # new connections: the kernel spreads them over the workers
            with httpx.Client(base_url=server.url, timeout=30) as http:
                if n == 0:
                    configure(http, queue)
                push(http, queue, [{"n": n}], prefix=f"p{n}-")

        def both_wrote() -> list[tuple[Any, ...]] | None:
            found = rows(own_database, "SELECT worker_id, count(DISTINCT pid) "
                                       "FROM queen.worker_metrics GROUP BY worker_id")
            return found if len(found) == 2 else None
        written = wait_until(both_wrote, message="rows of both workers")
        assert [count for _, count in written] == [1, 1]
        pids = rows(own_database, "SELECT DISTINCT pid FROM queen.worker_metrics")
        assert len(pids) == 2

        def totals_complete() -> list[tuple[Any, ...]] | None:
            found = rows(own_database, "SELECT worker_id, value FROM queen.metrics_totals "
                                       "WHERE counter = 'push_messages' ORDER BY worker_id")
            return found if sum(v for _, v in found) == pushes else None
        per_worker = wait_until(totals_complete, message="every push in the totals")
        with httpx.Client(base_url=server.url, timeout=30) as http:
            samples = scrape(http)
        assert value(samples, "queen_cluster_push_messages_total", scope="cluster") == pushes
        assert sum(v for _, v in per_worker) == pushes
        exposed = {dict(labels)["worker_id"] for name, labels in samples
                   if name == "queen_worker_db_connections"}
        assert exposed == {worker for worker, _ in per_worker}


def test_prometheus_answers_while_postgres_is_stopped():
    with private_postgres() as postgres, \
            running_server(postgres.pg_env(), METRICS_AGGREGATE_INTERVAL_S="1") as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        queue = unique_name("metrics-down-")
        configure(http, queue)
        push(http, queue, [{"n": 1}])
        assert value(scrape(http), "queen_cluster_push_messages_total", scope="cluster") == 1
        postgres.stop()
        samples = scrape(http)
        assert value(samples, "queen_file_buffer_db_healthy") == 0
        assert value(samples, "queen_uptime_seconds") > 0
        assert value(samples, "queen_request_duration_seconds_count", op="push") == 1
        assert "queen_cluster_push_messages_total" not in families(samples)
        assert family_names(http) >= PROCESS_FAMILIES
        assert not POSTGRES_FAMILIES & family_names(http)
        assert http.get("/metrics").status_code == 200
        postgres.start()
        wait_until(lambda: value(scrape(http), "queen_file_buffer_db_healthy") == 1 or None,
                   message="the pg families back")
        log = server.log_text()
    # the outage is logged once by the scrape, and the metrics loops never fail as a bug
    assert log.count("metrics snapshot (PostgreSQL) failing") <= 1
    assert "metrics sampler run failed" not in log
    assert "metrics write run failed" not in log


def test_stopping_writes_the_last_interval(pg_env, own_database):
    queue = unique_name("metrics-stop-")
    env = server_env(pg_env, own_database)
    with running_server(env, METRICS_AGGREGATE_INTERVAL_S="3600") as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        configure(http, queue)
        push(http, queue, [{"n": 1}, {"n": 2}, {"n": 3}])
        assert rows(own_database, "SELECT count(*) FROM queen.queue_metrics") == [(0,)]
    assert rows(own_database, "SELECT push_messages FROM queen.queue_metrics "
                              "WHERE queue_name = %s", queue) == [(3,)]
    assert rows(own_database, "SELECT value FROM queen.metrics_totals "
                              "WHERE counter = 'push_messages'") == [(3,)]


def test_the_dlq_action_counts_as_a_dead_letter_move(pg_env, own_database):
    queue = unique_name("metrics-dlq-")
    with running_server(server_env(pg_env, own_database)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        pushed = http.post("/api/v1/push", json={"items": [
            {"queue": queue, "transactionId": "t0", "payload": 1}]}).json()
        before = value(scrape(http), "queen_cluster_dlq_total", scope="cluster")

        moved = http.post(f"/api/v1/messages/{pushed[0]['partition_id']}/t0/dlq")

        assert moved.json()["dlq"] is True
        assert value(scrape(http), "queen_cluster_dlq_total", scope="cluster") == before + 1


def test_a_cluster_counter_never_goes_down_while_intervals_are_written(pg_env, own_database):
    """A scrape adds this process's unwritten counts to the totals read from PostgreSQL. A
    write of an interval that finished between that read and the sum dropped the interval
    from the scrape: queen_cluster_push_messages_total fell (e.g. 408 to 371), which
    Prometheus reads as a counter reset. Writes now wait for a scrape's read and sum.
    (Racy by nature: the old code failed about every other run of this test.)"""
    import threading
    import time

    queue = unique_name("metrics-race-")
    with running_server(server_env(pg_env, own_database), METRICS_AGGREGATE_INTERVAL_S="1",
                        METRICS_SAMPLE_INTERVAL_MS="200") as server:
        stop, pushed = threading.Event(), [0]

        def pusher() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not stop.is_set():
                    push(client, queue, [pushed[0]], prefix=f"m{pushed[0]}-")
                    pushed[0] += 1
                    time.sleep(0.005)

        thread = threading.Thread(target=pusher, daemon=True)
        thread.start()
        seen: list[float] = []
        try:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                deadline = time.monotonic() + 12  # a dozen writes, each a chance to drop
                while time.monotonic() < deadline:
                    seen.append(value(scrape(http), "queen_cluster_push_messages_total",
                                      scope="cluster"))
        finally:
            stop.set()
            thread.join(30)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            final = value(scrape(http), "queen_cluster_push_messages_total", scope="cluster")

    assert all(later >= earlier for earlier, later in zip(seen, seen[1:], strict=False)), seen
    assert final == pushed[0]
