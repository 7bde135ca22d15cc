-- Metrics (WIRE.md 3.8; queen_tw/metrics/): the one write of each aggregate interval, the
-- pruning of old rows, and the one read behind the "pg" families of /metrics/prometheus.
-- Tables: sql/migrations/0002_metrics.sql.

-- Rows older than p_days days are deleted; returns {workerRows, queueRows} deleted.
CREATE OR REPLACE FUNCTION queen.metrics_prune(p_days integer)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_cutoff  timestamptz := now() - make_interval(days => greatest(p_days, 0));
    v_workers bigint;
    v_queues  bigint;
BEGIN
    DELETE FROM queen.worker_metrics WHERE bucket_start < v_cutoff;
    GET DIAGNOSTICS v_workers = ROW_COUNT;
    DELETE FROM queen.queue_metrics WHERE bucket_start < v_cutoff;
    GET DIAGNOSTICS v_queues = ROW_COUNT;
    RETURN jsonb_build_object('workerRows', v_workers, 'queueRows', v_queues);
END
$$;

-- One worker's interval: {hostname, workerId, pid, bucketStart, bucketSeconds, worker{…the
-- worker_metrics columns}, queues[{queue_name, …the queue_metrics columns}], retentionDays}.
-- Writes the worker row and the queue rows, adds the worker's counters to its running totals,
-- and prunes rows past the retention. Writing the same bucket again (a write whose answer was
-- lost, retried with more counted since) replaces its rows and adds only the difference to
-- the totals, so they never count anything twice.
CREATE OR REPLACE FUNCTION queen.metrics_write(p jsonb)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_host   text := p->>'hostname';
    v_worker text := p->>'workerId';
    v_pid    integer := (p->>'pid')::integer;
    v_start  timestamptz := (p->>'bucketStart')::timestamptz;
    v_secs   integer := greatest(coalesce((p->>'bucketSeconds')::integer, 1), 1);
    v_keys   jsonb := jsonb_build_object('bucket_start', v_start, 'bucket_seconds', v_secs,
                                         'hostname', v_host, 'worker_id', v_worker, 'pid', v_pid);
    v_old    jsonb;
    v_pruned jsonb := '{}'::jsonb;
    v_now    numeric := extract(epoch FROM clock_timestamp());  -- as the call came in
BEGIN
    SELECT to_jsonb(w) INTO v_old FROM queen.worker_metrics w
     WHERE w.bucket_start = v_start AND w.hostname = v_host AND w.worker_id = v_worker
       AND w.pid = v_pid;
    IF v_old IS NOT NULL THEN
        DELETE FROM queen.worker_metrics
         WHERE bucket_start = v_start AND hostname = v_host AND worker_id = v_worker
           AND pid = v_pid;
        DELETE FROM queen.queue_metrics
         WHERE bucket_start = v_start AND hostname = v_host AND worker_id = v_worker
           AND pid = v_pid;
    END IF;

    INSERT INTO queen.worker_metrics
    SELECT * FROM jsonb_populate_record(NULL::queen.worker_metrics, p->'worker' || v_keys);

    INSERT INTO queen.queue_metrics
    SELECT r.* FROM jsonb_array_elements(coalesce(p->'queues', '[]'::jsonb)) q(e),
                    LATERAL jsonb_populate_record(NULL::queen.queue_metrics, q.e || v_keys) r;

    INSERT INTO queen.metrics_totals AS t (hostname, worker_id, counter, value, updated_at)
    SELECT v_host, v_worker, c.key,
           c.value::bigint - coalesce((v_old->>c.key)::bigint, 0), now()
      FROM jsonb_each_text(coalesce(p->'totals', '{}'::jsonb)) c
    ON CONFLICT (hostname, worker_id, counter)
       DO UPDATE SET value = t.value + excluded.value, updated_at = excluded.updated_at;

    IF p ? 'retentionDays' THEN
        v_pruned := queen.metrics_prune((p->>'retentionDays')::integer);
    END IF;
    -- now: PostgreSQL's clock, which the writer's bucket times follow from then on
    RETURN jsonb_build_object('rewritten', v_old IS NOT NULL, 'pruned', v_pruned, 'now', v_now);
END
$$;

-- Everything the "pg" families of /metrics/prometheus show, in one read (p: {staleSeconds}:
-- workers and queues with no row ending within that many seconds are left out):
--   totals     {counter: sum over every worker's running totals}
--   queues     [{queue, <counter>PerMinute…, lag{avg,max,p99}, parked, ageSeconds}]
--   workers    [{hostname, workerId, pid, <counter>PerMinute…, eventLoopLag{…}, popLag{…},
--                dbConnections, ageSeconds}]
--   dlqDepth, dlqByQueue {queue: n}, depth {queue: {pending, processing}}
-- "Per minute" sums the intervals that ended during the last 60 seconds.
CREATE OR REPLACE FUNCTION queen.metrics_snapshot(p jsonb DEFAULT '{}'::jsonb)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
WITH params AS (
    SELECT now() AS at,
           now() - make_interval(secs => coalesce((p->>'staleSeconds')::double precision, 600))
               AS stale_before,
           now() - interval '60 seconds' AS minute_ago
), q_rows AS (
    SELECT m.*, m.bucket_start + make_interval(secs => m.bucket_seconds) AS bucket_end
      FROM queen.queue_metrics m, params
     WHERE m.bucket_start + make_interval(secs => m.bucket_seconds) > params.stale_before
), q_latest AS (
    SELECT DISTINCT ON (queue_name, hostname, worker_id, pid) queue_name, parked_consumers
      FROM q_rows
     ORDER BY queue_name, hostname, worker_id, pid, bucket_start DESC
), q_parked AS (
    SELECT queue_name, sum(parked_consumers) AS parked FROM q_latest GROUP BY queue_name
), queues AS (
    SELECT r.queue_name,
           sum(r.push_requests) FILTER (WHERE r.bucket_end > params.minute_ago) AS push_requests,
           sum(r.push_messages) FILTER (WHERE r.bucket_end > params.minute_ago) AS push_messages,
           sum(r.pop_messages) FILTER (WHERE r.bucket_end > params.minute_ago) AS pop_messages,
           sum(r.pop_empty) FILTER (WHERE r.bucket_end > params.minute_ago) AS pop_empty,
           sum(r.transactions) FILTER (WHERE r.bucket_end > params.minute_ago) AS transactions,
           sum(r.ack_success) FILTER (WHERE r.bucket_end > params.minute_ago) AS ack_success,
           sum(r.ack_failed) FILTER (WHERE r.bucket_end > params.minute_ago) AS ack_failed,
           sum(r.dlq) FILTER (WHERE r.bucket_end > params.minute_ago) AS dlq,
           sum((r.pop_lag_ms->>'count')::bigint)
               FILTER (WHERE r.bucket_end > params.minute_ago) AS lag_count,
           sum((r.pop_lag_ms->>'avg')::double precision * (r.pop_lag_ms->>'count')::bigint)
               FILTER (WHERE r.bucket_end > params.minute_ago) AS lag_sum,
           max((r.pop_lag_ms->>'max')::double precision)
               FILTER (WHERE r.bucket_end > params.minute_ago) AS lag_max,
           max((r.pop_lag_ms->>'p99')::double precision)
               FILTER (WHERE r.bucket_end > params.minute_ago) AS lag_p99,
           extract(epoch FROM params.at - max(r.bucket_end)) AS age
      FROM q_rows r, params
     GROUP BY r.queue_name, params.at
), w_rows AS (
    SELECT m.*, m.bucket_start + make_interval(secs => m.bucket_seconds) AS bucket_end
      FROM queen.worker_metrics m, params
     WHERE m.bucket_start + make_interval(secs => m.bucket_seconds) > params.stale_before
), w_latest AS (
    SELECT DISTINCT ON (hostname, worker_id, pid) *
      FROM w_rows
     ORDER BY hostname, worker_id, pid, bucket_start DESC
), w_minute AS (
    SELECT hostname, worker_id, pid,
           sum(push_requests) AS push_requests, sum(pop_requests) AS pop_requests,
           sum(ack_requests) AS ack_requests, sum(transactions) AS transactions,
           sum(push_messages) AS push_messages, sum(pop_messages) AS pop_messages,
           sum(ack_messages) AS ack_messages, sum(ack_success) AS ack_success,
           sum(ack_failed) AS ack_failed, sum(db_errors) AS db_errors, sum(dlq) AS dlq
      FROM w_rows, params
     WHERE bucket_end > params.minute_ago
     GROUP BY hostname, worker_id, pid
), dlq AS (
    SELECT qu.name, count(*) AS n
      FROM queen.dead_letter_queue d
      JOIN queen.partitions pa ON pa.id = d.partition_id
      JOIN queen.queues qu ON qu.id = pa.queue_id
     GROUP BY qu.name
)
SELECT jsonb_build_object(
    'totals', (SELECT coalesce(jsonb_object_agg(counter, total), '{}'::jsonb)
                 FROM (SELECT counter, sum(value) AS total
                         FROM queen.metrics_totals GROUP BY counter) t),
    'queues', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'queue', q.queue_name,
                   'pushRequestsPerMinute', coalesce(q.push_requests, 0),
                   'pushMessagesPerMinute', coalesce(q.push_messages, 0),
                   'popMessagesPerMinute', coalesce(q.pop_messages, 0),
                   'popEmptyPerMinute', coalesce(q.pop_empty, 0),
                   'transactionsPerMinute', coalesce(q.transactions, 0),
                   'ackSuccessPerMinute', coalesce(q.ack_success, 0),
                   'ackFailedPerMinute', coalesce(q.ack_failed, 0),
                   'dlqPerMinute', coalesce(q.dlq, 0),
                   'lag', jsonb_build_object(
                       'avg', coalesce(round((q.lag_sum / nullif(q.lag_count, 0))::numeric, 3), 0),
                       'max', coalesce(q.lag_max, 0), 'p99', coalesce(q.lag_p99, 0)),
                   'parked', coalesce(pk.parked, 0),
                   'ageSeconds', round(q.age, 3)) ORDER BY q.queue_name), '[]'::jsonb)
                 FROM queues q LEFT JOIN q_parked pk ON pk.queue_name = q.queue_name),
    'workers', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'hostname', l.hostname, 'workerId', l.worker_id, 'pid', l.pid,
                    'pushRequestsPerMinute', coalesce(m.push_requests, 0),
                    'popRequestsPerMinute', coalesce(m.pop_requests, 0),
                    'ackRequestsPerMinute', coalesce(m.ack_requests, 0),
                    'transactionsPerMinute', coalesce(m.transactions, 0),
                    'pushMessagesPerMinute', coalesce(m.push_messages, 0),
                    'popMessagesPerMinute', coalesce(m.pop_messages, 0),
                    'ackMessagesPerMinute', coalesce(m.ack_messages, 0),
                    'ackSuccessPerMinute', coalesce(m.ack_success, 0),
                    'ackFailedPerMinute', coalesce(m.ack_failed, 0),
                    'dbErrorsPerMinute', coalesce(m.db_errors, 0),
                    'dlqPerMinute', coalesce(m.dlq, 0),
                    'eventLoopLag', l.event_loop_lag_ms, 'popLag', l.pop_lag_ms,
                    'dbConnections', l.db_pool_size,
                    'ageSeconds', round(extract(epoch FROM now() - l.bucket_end), 3))
                    ORDER BY l.hostname, l.worker_id, l.pid), '[]'::jsonb)
                  FROM w_latest l
                  LEFT JOIN w_minute m USING (hostname, worker_id, pid)),
    'dlqDepth', (SELECT count(*) FROM queen.dead_letter_queue),
    'dlqByQueue', (SELECT coalesce(jsonb_object_agg(name, n), '{}'::jsonb) FROM dlq),
    'depth', (SELECT coalesce(jsonb_object_agg(qu.name, jsonb_build_object(
                  'pending', qs.pending, 'processing', qs.processing)), '{}'::jsonb)
                FROM queen.queue_stats qs JOIN queen.queues qu ON qu.id = qs.queue_id))
$$;
