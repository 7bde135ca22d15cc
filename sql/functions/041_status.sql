-- The status and analytics routes (WIRE.md 3.4): one function per route, answering JSON.
--
-- Time series come from the metrics tables of migrations/0002_metrics.sql (worker_metrics,
-- queue_metrics: one row per worker, and per queue, every METRICS_AGGREGATE_INTERVAL_S), summed
-- over workers and bucketed over time here; counts of what is stored come from the statistics
-- snapshot (queue_stats, system_stats) and cheap live counts, as in 022_stats_resources.sql.
-- A row belongs to the bucket its bucket_start falls in, and to a range [from, to) when its
-- bucket_start does. A function that names an unknown queue answers {"notFound": true}.

-- The bucket of length p_seconds that holds ts; buckets are aligned on the Unix epoch, so
-- minute, hour and day buckets start on whole minutes, hours and UTC midnights.
CREATE OR REPLACE FUNCTION queen.status_bucket(ts timestamptz, p_seconds bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_timestamp(floor(extract(epoch FROM ts) / p_seconds) * p_seconds)
$$;

-- The range of a request: f {from?, to?}. "to" defaults to now (or to "from" when that is
-- later), "from" to p_span before "to". bucket_minutes is the first of 1, 5, 15, 60, 360 and
-- 1440 that cuts the range into at most 120 buckets; past 120 days, a whole number of days.
CREATE OR REPLACE FUNCTION queen.status_window(f jsonb, p_span interval DEFAULT interval '1 hour',
                                               OUT w_from timestamptz, OUT w_to timestamptz,
                                               OUT bucket_minutes bigint)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_minutes double precision;
    v_step    integer;
BEGIN
    w_to := coalesce((f->>'to')::timestamptz, greatest(now(), (f->>'from')::timestamptz));
    w_from := coalesce((f->>'from')::timestamptz, w_to - p_span);
    v_minutes := extract(epoch FROM w_to - w_from) / 60.0;
    FOREACH v_step IN ARRAY ARRAY[1, 5, 15, 60, 360, 1440] LOOP
        IF ceil(v_minutes / v_step) <= 120 THEN
            bucket_minutes := v_step;
            RETURN;
        END IF;
    END LOOP;
    bucket_minutes := 1440 * ceil(v_minutes / (120 * 1440))::bigint;
END
$$;

-- The queue names a request's queue/namespace/task filters select; NULL without filters
-- (every queue, deleted ones included, whose metrics rows are still kept).
CREATE OR REPLACE FUNCTION queen.status_queue_names(f jsonb) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN f->>'queue' IS NULL AND f->>'namespace' IS NULL AND f->>'task' IS NULL
                THEN NULL
                ELSE coalesce((SELECT array_agg(qu.name) FROM queen.queues qu
                                WHERE (f->>'queue' IS NULL OR qu.name = f->>'queue')
                                  AND (f->>'namespace' IS NULL OR qu.namespace = f->>'namespace')
                                  AND (f->>'task' IS NULL OR qu.task = f->>'task')),
                              '{}'::text[]) END
$$;

CREATE OR REPLACE FUNCTION queen.status_unknown_queue(f jsonb) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT f->>'queue' IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM queen.queues WHERE name = f->>'queue')
$$;

-- A figure rounded for JSON; no data (NULL) reads as 0.
CREATE OR REPLACE FUNCTION queen.status_round(v double precision, p_digits integer DEFAULT 3)
RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$
    SELECT round(coalesce(v, 0)::numeric, p_digits)
$$;

-- GET /api/v1/status. f {from?, to?, queue?, namespace?, task?}; p_alive_seconds: a worker
-- whose last row ends within that many seconds of now is alive.
-- Without queue filters the throughput comes from worker_metrics, with them from the
-- queue_metrics of the selected queues; latencies, database errors and workers are always
-- the whole cluster's (the metrics tables keep them per worker only).
CREATE OR REPLACE FUNCTION queen.status_overview(f jsonb, p_alive_seconds integer) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    w          record;
    v_bs       bigint;
    v_names    text[];
    v_filtered boolean;
    v_sys      queen.system_stats;
    v_through  jsonb;
    v_queues   jsonb;
    v_messages jsonb;
    v_leases   jsonb;
    v_dlq      jsonb;
    v_workers  jsonb;
    v_errors   jsonb;
BEGIN
    IF queen.status_unknown_queue(f) THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    SELECT * INTO w FROM queen.status_window(f);
    v_bs := w.bucket_minutes * 60;
    v_names := queen.status_queue_names(f);
    v_filtered := v_names IS NOT NULL;

    WITH ops_rows AS (
        SELECT queen.status_bucket(m.bucket_start, v_bs) AS b, m.push_requests,
               m.push_messages, m.pop_messages, m.ack_success, m.ack_failed, m.transactions,
               m.dlq
          FROM queen.worker_metrics m
         WHERE NOT v_filtered AND m.bucket_start >= w.w_from AND m.bucket_start < w.w_to
        UNION ALL
        SELECT queen.status_bucket(q.bucket_start, v_bs), q.push_requests, q.push_messages,
               q.pop_messages, q.ack_success, q.ack_failed, q.transactions, q.dlq
          FROM queen.queue_metrics q
         WHERE v_filtered AND q.queue_name = ANY(v_names)
           AND q.bucket_start >= w.w_from AND q.bucket_start < w.w_to
    ), buckets AS (
        SELECT b, extract(epoch FROM least(b + make_interval(secs => v_bs), w.w_to, now())
                                     - greatest(b, w.w_from)) AS seconds
          FROM generate_series(queen.status_bucket(w.w_from, v_bs), w.w_to,
                               make_interval(secs => v_bs)) b
         WHERE b < w.w_to
    ), ops AS (
        SELECT b, sum(push_requests) AS push_requests, sum(push_messages) AS push_messages,
               sum(pop_messages) AS pop_messages, sum(ack_success) AS ack_success,
               sum(ack_failed) AS ack_failed, sum(transactions) AS transactions, sum(dlq) AS dlq
          FROM ops_rows GROUP BY b
    ), lat AS (
        SELECT queen.status_bucket(m.bucket_start, v_bs) AS b, op,
               sum((m.latency->op->>'avgMs')::float8
                   * coalesce((m.latency->op->>'count')::float8, 1))
                 / nullif(sum(coalesce((m.latency->op->>'count')::float8, 1)), 0) AS avg_ms
          FROM queen.worker_metrics m CROSS JOIN unnest(ARRAY['push', 'pop', 'ack']) op
         WHERE m.bucket_start >= w.w_from AND m.bucket_start < w.w_to
           AND m.latency->op->>'avgMs' IS NOT NULL
         GROUP BY 1, 2
    )
    SELECT (SELECT coalesce(jsonb_agg(jsonb_build_object(
               'timestamp', queen.format_ts3(k.b),
               'pushRequests', coalesce(o.push_requests, 0),
               'pushMessages', coalesce(o.push_messages, 0),
               'popMessages', coalesce(o.pop_messages, 0),
               'ackSuccess', coalesce(o.ack_success, 0),
               'ackFailed', coalesce(o.ack_failed, 0),
               'transactions', coalesce(o.transactions, 0),
               'dlq', coalesce(o.dlq, 0),
               'ingestedPerSecond', CASE WHEN k.seconds > 0
                   THEN queen.status_round(coalesce(o.push_messages, 0) / k.seconds) ELSE 0 END,
               'processedPerSecond', CASE WHEN k.seconds > 0
                   THEN queen.status_round(coalesce(o.ack_success, 0) / k.seconds) ELSE 0 END,
               'latencyMs', jsonb_build_object(
                   'push', queen.status_round((SELECT avg_ms FROM lat WHERE lat.b = k.b AND op = 'push')),
                   'pop', queen.status_round((SELECT avg_ms FROM lat WHERE lat.b = k.b AND op = 'pop')),
                   'ack', queen.status_round((SELECT avg_ms FROM lat WHERE lat.b = k.b AND op = 'ack'))))
             ORDER BY k.b), '[]'::jsonb)
              FROM buckets k LEFT JOIN ops o ON o.b = k.b),
           jsonb_build_object(
               'dbErrors', (SELECT coalesce(sum(m.db_errors), 0) FROM queen.worker_metrics m
                             WHERE m.bucket_start >= w.w_from AND m.bucket_start < w.w_to),
               'ackFailed', (SELECT coalesce(sum(ack_failed), 0) FROM ops_rows),
               'dlq', (SELECT coalesce(sum(dlq), 0) FROM ops_rows))
      INTO v_through, v_errors;

    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'name', s.name, 'pushMessages', s.push_messages, 'popMessages', s.pop_messages,
               'ackSuccess', s.ack_success, 'ackFailed', s.ack_failed, 'dlq', s.dlq,
               'popLagMs', jsonb_build_object('avg', queen.status_round(s.lag_avg),
                                              'max', queen.status_round(s.lag_max)))
             ORDER BY s.push_messages + s.pop_messages DESC, s.name), '[]'::jsonb)
      INTO v_queues
      FROM (SELECT q.queue_name AS name, sum(q.push_messages) AS push_messages,
                   sum(q.pop_messages) AS pop_messages, sum(q.ack_success) AS ack_success,
                   sum(q.ack_failed) AS ack_failed, sum(q.dlq) AS dlq,
                   sum((q.pop_lag_ms->>'avg')::float8 * q.pop_messages)
                     / nullif(sum(q.pop_messages) FILTER (WHERE q.pop_lag_ms ? 'avg'), 0) AS lag_avg,
                   max((q.pop_lag_ms->>'max')::float8) AS lag_max
              FROM queen.queue_metrics q
             WHERE q.bucket_start >= w.w_from AND q.bucket_start < w.w_to
               AND (v_names IS NULL OR q.queue_name = ANY(v_names))
             GROUP BY q.queue_name) s;

    SELECT jsonb_build_object(
               'total', (SELECT coalesce(sum(p.message_count), 0) FROM queen.partitions p
                          JOIN queen.queues qu ON qu.id = p.queue_id
                         WHERE v_names IS NULL OR qu.name = ANY(v_names)),
               'pending', coalesce(sum(qs.pending), 0),
               'processing', coalesce(sum(qs.processing), 0),
               'completed', coalesce(sum(qs.completed), 0),
               'deadLetter', (SELECT count(DISTINCT d.message_id) FROM queen.dead_letter_queue d
                                JOIN queen.partitions p ON p.id = d.partition_id
                                JOIN queen.queues qu ON qu.id = p.queue_id
                               WHERE v_names IS NULL OR qu.name = ANY(v_names)))
      INTO v_messages
      FROM queen.queue_stats qs JOIN queen.queues qu ON qu.id = qs.queue_id
     WHERE v_names IS NULL OR qu.name = ANY(v_names);

    SELECT jsonb_build_object('active', count(DISTINCT pc.lease_id),
                              'partitionsLocked', count(DISTINCT pc.partition_id))
      INTO v_leases
      FROM queen.partition_consumers pc
      JOIN queen.partitions p ON p.id = pc.partition_id
      JOIN queen.queues qu ON qu.id = p.queue_id
     WHERE pc.lease_id IS NOT NULL AND pc.lease_expires_at > now()
       AND (v_names IS NULL OR qu.name = ANY(v_names));

    SELECT jsonb_build_object(
               'total', count(*),
               'inRange', count(*) FILTER (WHERE d.failed_at >= w.w_from AND d.failed_at < w.w_to))
      INTO v_dlq
      FROM queen.dead_letter_queue d
      JOIN queen.partitions p ON p.id = d.partition_id
      JOIN queen.queues qu ON qu.id = p.queue_id
     WHERE v_names IS NULL OR qu.name = ANY(v_names);

    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'hostname', g.hostname, 'workerId', g.worker_id, 'pid', l.pid,
               'lastSeen', queen.format_ts3(l.last_seen),
               'eventLoopLagMs', jsonb_build_object('avg', queen.status_round(g.lag_avg),
                                                    'max', queen.status_round(g.lag_max)),
               'rssBytes', l.rss_bytes,
               'cpuPercent', queen.status_round(
                   (l.cpu_user_seconds + l.cpu_system_seconds) * 100.0
                   / nullif(l.bucket_seconds, 0), 2),
               'dbPoolSize', l.db_pool_size, 'dbPoolIdle', l.db_pool_idle,
               'bufferPending', l.buffer_pending, 'bufferFailed', l.buffer_failed,
               'dbHealthy', l.db_healthy,
               'alive', l.last_seen >= now() - make_interval(secs => p_alive_seconds))
             ORDER BY g.hostname, g.worker_id), '[]'::jsonb)
      INTO v_workers
      FROM (SELECT m.hostname, m.worker_id,
                   avg((m.event_loop_lag_ms->>'avg')::float8) AS lag_avg,
                   max((m.event_loop_lag_ms->>'max')::float8) AS lag_max
              FROM queen.worker_metrics m
             WHERE m.bucket_start >= w.w_from AND m.bucket_start < w.w_to
             GROUP BY m.hostname, m.worker_id) g
      CROSS JOIN LATERAL (
            SELECT m.*, m.bucket_start + make_interval(secs => m.bucket_seconds) AS last_seen
              FROM queen.worker_metrics m
             WHERE m.hostname = g.hostname AND m.worker_id = g.worker_id
               AND m.bucket_start >= w.w_from AND m.bucket_start < w.w_to
             ORDER BY m.bucket_start DESC, m.pid DESC LIMIT 1) l;

    SELECT * INTO v_sys FROM queen.system_stats WHERE id = 1;
    RETURN jsonb_build_object(
        'timeRange', jsonb_build_object('from', queen.format_ts3(w.w_from),
                                        'to', queen.format_ts3(w.w_to)),
        'bucketMinutes', w.bucket_minutes,
        'pointCount', jsonb_array_length(v_through),
        'throughput', v_through,
        'queues', v_queues,
        'messages', v_messages,
        'leases', v_leases,
        'deadLetterQueue', v_dlq,
        'workers', v_workers,
        'errors', v_errors,
        'statsAge', CASE WHEN v_sys.id IS NULL THEN NULL
                         ELSE round(extract(epoch FROM now() - v_sys.computed_at)::numeric, 3) END);
END
$$;

-- GET /api/v1/status/queues. f {namespace?, task?, to?, limit, offset}: the queues that
-- existed at "to" (default now), by name; counts from the statistics snapshot.
CREATE OR REPLACE FUNCTION queen.status_queues(f jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_limit  integer := coalesce((f->>'limit')::int, 100);
    v_offset integer := coalesce((f->>'offset')::int, 0);
BEGIN
    RETURN (
    WITH hits AS (
        SELECT qu.* FROM queen.queues qu
         WHERE (f->>'namespace' IS NULL OR qu.namespace = f->>'namespace')
           AND (f->>'task' IS NULL OR qu.task = f->>'task')
           AND (f->>'to' IS NULL OR qu.created_at <= (f->>'to')::timestamptz)
    )
    SELECT jsonb_build_object(
        'queues', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'id', h.id, 'name', h.name, 'namespace', h.namespace, 'task', h.task,
                       'createdAt', queen.format_ts3(h.created_at),
                       'partitions', pa.partitions,
                       'messages', jsonb_build_object(
                           'total', pa.total,
                           'pending', coalesce(qs.pending, 0),
                           'processing', coalesce(qs.processing, 0)))
                     ORDER BY h.name)
              FROM (SELECT * FROM hits ORDER BY name LIMIT v_limit OFFSET v_offset) h
              CROSS JOIN LATERAL (
                    SELECT count(*) AS partitions, coalesce(sum(p.message_count), 0) AS total
                      FROM queen.partitions p WHERE p.queue_id = h.id) pa
              LEFT JOIN queen.queue_stats qs ON qs.queue_id = h.id), '[]'::jsonb),
        'pagination', jsonb_build_object('limit', v_limit, 'offset', v_offset,
                                         'total', (SELECT count(*) FROM hits))));
END
$$;

-- GET /api/v1/status/queues/{queue}: the queue, its options, and per partition its counts,
-- its queue-mode cursor and the lag of every consumer group that has a cursor there or
-- messages waiting there (from its subscription point); all from positions and index probes,
-- so its cost follows partitions and groups, not messages.
CREATE OR REPLACE FUNCTION queen.status_queue(p_name text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    qu           queen.queues;
    v_partitions jsonb;
    v_totals     jsonb;
BEGIN
    SELECT * INTO qu FROM queen.queues WHERE name = p_name;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    WITH parts AS (  -- counts from positions (022_stats_resources.sql): no message is counted
        SELECT p.id, p.name, p.created_at, p.message_count, p.first_seq, p.last_seq,
               jsonb_build_object('total', c.total, 'pending', c.pending,
                                  'processing', c.processing, 'completed', c.completed,
                                  'deadLetter', c.dead_letter) AS s
          FROM queen.partitions p CROSS JOIN LATERAL queen.partition_counts(ARRAY[p.id]) c
         WHERE p.queue_id = qu.id
    )
    SELECT (SELECT coalesce(jsonb_agg(jsonb_build_object(
               'id', sp.id, 'name', sp.name, 'createdAt', queen.format_ts3(sp.created_at),
               'messages', jsonb_build_object('total', (sp.s->>'total')::bigint,
                                              'pending', (sp.s->>'pending')::bigint,
                                              'processing', (sp.s->>'processing')::bigint),
               'cursor', jsonb_build_object(
                   'totalConsumed', coalesce(qm.total_consumed, 0),
                   'batchesConsumed', coalesce(qm.batches_consumed, 0),
                   'lastActivity', queen.format_ts3(qm.last_consumed_at)),
               -- every group with a cursor here, and every group with messages waiting
               -- here that has not popped the partition yet (from its subscription point)
               'consumerGroups', coalesce((
                   SELECT jsonb_agg(g.lag ORDER BY g.name) FROM (
                       SELECT pc.consumer_group AS name, jsonb_build_object(
                              'name', pc.consumer_group,
                              'offsetLag', sp.message_count - queen.stored_through(
                                  sp.id, sp.first_seq, sp.last_seq, pc.cursor_seq),
                              'timeLagSeconds', coalesce(round(extract(epoch FROM now()
                                  - queen.first_unconsumed(sp.id, pc.cursor_created_at,
                                                           pc.cursor_id))::numeric, 3), 0)) AS lag
                         FROM queen.partition_consumers pc WHERE pc.partition_id = sp.id
                       UNION ALL
                       SELECT pp.consumer_group, jsonb_build_object(
                              'name', pp.consumer_group,
                              'offsetLag', sp.message_count - queen.stored_through(
                                  sp.id, sp.first_seq, sp.last_seq,
                                  queen.subscription_seq(sp.id, s.subscription_from)),
                              'timeLagSeconds', coalesce(round(extract(epoch FROM now()
                                  - queen.first_unconsumed(sp.id, s.subscription_from,
                                        queen.start_cursor_id(s.subscription_from)))::numeric,
                                  3), 0))
                         FROM queen.partition_pending pp
                         LEFT JOIN queen.consumer_subscriptions s
                                ON s.queue_id = pp.queue_id AND s.consumer_group = pp.consumer_group
                        WHERE pp.partition_id = sp.id AND s.subscription_from IS NOT NULL
                          AND NOT EXISTS (SELECT 1 FROM queen.partition_consumers pc
                                           WHERE pc.partition_id = sp.id
                                             AND pc.consumer_group = pp.consumer_group)) g),
                   '[]'::jsonb))
             ORDER BY sp.name), '[]'::jsonb)
              FROM parts sp
              LEFT JOIN queen.partition_consumers qm
                     ON qm.partition_id = sp.id AND qm.consumer_group = '__QUEUE_MODE__'),
           (SELECT jsonb_build_object(
               'total', coalesce(sum((s->>'total')::bigint), 0),
               'pending', coalesce(sum((s->>'pending')::bigint), 0),
               'processing', coalesce(sum((s->>'processing')::bigint), 0),
               'completed', coalesce(sum((s->>'completed')::bigint), 0),
               'deadLetter', coalesce(sum((s->>'deadLetter')::bigint), 0))
              FROM parts)
      INTO v_partitions, v_totals;

    RETURN jsonb_build_object(
        'queue', jsonb_build_object(
            'id', qu.id, 'name', qu.name, 'namespace', qu.namespace, 'task', qu.task,
            'createdAt', queen.format_ts3(qu.created_at), 'priority', qu.priority,
            'config', jsonb_build_object(
                'leaseTime', qu.lease_time, 'retryLimit', qu.retry_limit,
                'retryDelay', qu.retry_delay, 'ttl', qu.ttl, 'maxQueueSize', qu.max_size,
                'deadLetterQueue', qu.dead_letter_queue)),
        'messages', v_totals,
        'partitions', v_partitions,
        'totals', v_totals || jsonb_build_object(
            'partitions', jsonb_array_length(v_partitions),
            'consumed', (SELECT coalesce(sum(pc.total_consumed), 0)
                           FROM queen.partition_consumers pc
                           JOIN queen.partitions p ON p.id = pc.partition_id
                          WHERE p.queue_id = qu.id
                            AND pc.consumer_group = '__QUEUE_MODE__')));
END
$$;

-- GET /api/v1/status/queues/{queue}/messages: the queue's messages, newest first.
CREATE OR REPLACE FUNCTION queen.status_queue_messages(p_name text, p_limit integer,
                                                       p_offset integer) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_queue uuid;
BEGIN
    SELECT id INTO v_queue FROM queen.queues WHERE name = p_name;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    RETURN jsonb_build_object(
        'messages', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'id', h.id, 'transactionId', h.transaction_id,
                       'partitionId', h.partition_id,
                       'queuePath', p_name || '/' || h.partition_name,
                       'queue', p_name, 'partition', h.partition_name,
                       'status', queen.message_status(h.partition_id, v_queue, h.created_at, h.id),
                       'createdAt', queen.format_ts3(h.created_at), 'traceId', h.trace_id)
                     ORDER BY h.created_at DESC, h.id DESC)
              FROM (SELECT m.id, m.transaction_id, m.partition_id, m.created_at, m.trace_id,
                           p.name AS partition_name
                      FROM queen.partitions p
                      CROSS JOIN LATERAL (  -- each partition's newest, by its order index
                            SELECT m.* FROM queen.messages m WHERE m.partition_id = p.id
                             ORDER BY m.created_at DESC, m.id DESC
                             LIMIT p_limit::bigint + p_offset) m
                     WHERE p.queue_id = v_queue
                     ORDER BY m.created_at DESC, m.id DESC
                     LIMIT p_limit OFFSET p_offset) h), '[]'::jsonb),
        'pagination', jsonb_build_object(
            'limit', p_limit, 'offset', p_offset,
            'total', (SELECT coalesce(sum(message_count), 0) FROM queen.partitions
                       WHERE queue_id = v_queue)));
END
$$;

-- GET /api/v1/status/analytics. f {from?, to?, queue?, namespace?, task?, interval}: the
-- queue_metrics of the selected queues summed per minute, hour or day (UTC); only buckets
-- with rows. The default range is the last hour, day or 30 days, by interval.
CREATE OR REPLACE FUNCTION queen.status_analytics(f jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_interval text := coalesce(f->>'interval', 'hour');
    v_bs       bigint := CASE v_interval WHEN 'minute' THEN 60 WHEN 'day' THEN 86400 ELSE 3600 END;
    w          record;
    v_names    text[];
BEGIN
    IF queen.status_unknown_queue(f) THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    SELECT * INTO w FROM queen.status_window(
        f, CASE v_interval WHEN 'minute' THEN interval '1 hour' WHEN 'day' THEN interval '30 days'
                           ELSE interval '1 day' END);
    v_names := queen.status_queue_names(f);
    RETURN jsonb_build_object(
        'interval', v_interval,
        'from', queen.format_ts3(w.w_from), 'to', queen.format_ts3(w.w_to),
        'dataPoints', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'timestamp', queen.format_ts3(s.b),
                       'pushMessages', s.push_messages, 'popMessages', s.pop_messages,
                       'ackSuccess', s.ack_success, 'ackFailed', s.ack_failed, 'dlq', s.dlq,
                       'avgPopLagMs', queen.status_round(s.lag_avg))
                     ORDER BY s.b)
              FROM (SELECT queen.status_bucket(q.bucket_start, v_bs) AS b,
                           sum(q.push_messages) AS push_messages,
                           sum(q.pop_messages) AS pop_messages,
                           sum(q.ack_success) AS ack_success, sum(q.ack_failed) AS ack_failed,
                           sum(q.dlq) AS dlq,
                           sum((q.pop_lag_ms->>'avg')::float8 * q.pop_messages)
                             / nullif(sum(q.pop_messages) FILTER (WHERE q.pop_lag_ms ? 'avg'), 0)
                             AS lag_avg
                      FROM queen.queue_metrics q
                     WHERE q.bucket_start >= w.w_from AND q.bucket_start < w.w_to
                       AND (v_names IS NULL OR q.queue_name = ANY(v_names))
                     GROUP BY 1) s), '[]'::jsonb));
END
$$;

-- One worker's figures in one bucket (rows of one worker name in one bucket): gauges
-- averaged over its rows, counters summed. Used by the system and worker series.
CREATE OR REPLACE FUNCTION queen.status_worker_buckets(p_from timestamptz, p_to timestamptz,
                                                       p_bs bigint, f jsonb)
RETURNS TABLE (b timestamptz, hostname text, worker_id text, pid integer, rows bigint,
               rss_bytes double precision, cpu_percent double precision,
               lag_avg double precision, lag_max double precision,
               pool_size double precision, pool_idle double precision,
               pool_waiting double precision, buffer_pending double precision,
               buffer_failed double precision, db_healthy boolean,
               push_requests bigint, push_messages bigint, pop_requests bigint,
               pop_messages bigint, ack_requests bigint, ack_success bigint,
               ack_failed bigint, transactions bigint, dlq bigint, db_errors bigint)
LANGUAGE sql STABLE AS $$
    SELECT queen.status_bucket(m.bucket_start, p_bs), m.hostname, m.worker_id, max(m.pid),
           count(*), avg(m.rss_bytes),
           sum(m.cpu_user_seconds + m.cpu_system_seconds) * 100.0
             / nullif(sum(m.bucket_seconds), 0),
           avg((m.event_loop_lag_ms->>'avg')::float8), max((m.event_loop_lag_ms->>'max')::float8),
           avg(m.db_pool_size), avg(m.db_pool_idle), avg(m.db_pool_waiting),
           avg(m.buffer_pending), avg(m.buffer_failed), bool_and(m.db_healthy),
           sum(m.push_requests)::bigint, sum(m.push_messages)::bigint,
           sum(m.pop_requests)::bigint, sum(m.pop_messages)::bigint,
           sum(m.ack_requests)::bigint, sum(m.ack_success)::bigint, sum(m.ack_failed)::bigint,
           sum(m.transactions)::bigint, sum(m.dlq)::bigint, sum(m.db_errors)::bigint
      FROM queen.worker_metrics m
     WHERE m.bucket_start >= p_from AND m.bucket_start < p_to
       AND (f->>'hostname' IS NULL OR m.hostname = f->>'hostname')
       AND (f->>'workerId' IS NULL OR m.worker_id = f->>'workerId')
     GROUP BY 1, 2, 3
$$;

-- GET /api/v1/analytics/system-metrics. f {from?, to?, hostname?, workerId?}: per bucket with
-- rows, the workers' figures summed (each worker's gauges first averaged over the bucket);
-- event-loop lag is the mean of the workers' averages and the largest maximum.
CREATE OR REPLACE FUNCTION queen.analytics_system_metrics(f jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    w record;
BEGIN
    SELECT * INTO w FROM queen.status_window(f);
    RETURN jsonb_build_object(
        'from', queen.format_ts3(w.w_from), 'to', queen.format_ts3(w.w_to),
        'bucketMinutes', w.bucket_minutes,
        'series', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'timestamp', queen.format_ts3(s.b), 'workers', s.workers,
                       'rssBytes', round(s.rss), 'cpuPercent', queen.status_round(s.cpu, 2),
                       'eventLoopLagMs', jsonb_build_object('avg', queen.status_round(s.lag_avg),
                                                            'max', queen.status_round(s.lag_max)),
                       'dbPoolSize', round(s.pool_size), 'dbPoolIdle', round(s.pool_idle),
                       'dbPoolWaiting', round(s.pool_waiting),
                       'bufferPending', round(s.buffer_pending),
                       'bufferFailed', round(s.buffer_failed),
                       'pushRequests', s.push_requests, 'pushMessages', s.push_messages,
                       'popRequests', s.pop_requests, 'popMessages', s.pop_messages,
                       'ackRequests', s.ack_requests, 'ackSuccess', s.ack_success,
                       'ackFailed', s.ack_failed, 'transactions', s.transactions,
                       'dlq', s.dlq, 'dbErrors', s.db_errors)
                     ORDER BY s.b)
              FROM (SELECT x.b, count(*) AS workers, sum(x.rss_bytes) AS rss,
                           sum(x.cpu_percent) AS cpu, avg(x.lag_avg) AS lag_avg,
                           max(x.lag_max) AS lag_max, sum(x.pool_size) AS pool_size,
                           sum(x.pool_idle) AS pool_idle, sum(x.pool_waiting) AS pool_waiting,
                           sum(x.buffer_pending) AS buffer_pending,
                           sum(x.buffer_failed) AS buffer_failed,
                           sum(x.push_requests) AS push_requests,
                           sum(x.push_messages) AS push_messages,
                           sum(x.pop_requests) AS pop_requests,
                           sum(x.pop_messages) AS pop_messages,
                           sum(x.ack_requests) AS ack_requests,
                           sum(x.ack_success) AS ack_success, sum(x.ack_failed) AS ack_failed,
                           sum(x.transactions) AS transactions, sum(x.dlq) AS dlq,
                           sum(x.db_errors) AS db_errors
                      FROM queen.status_worker_buckets(w.w_from, w.w_to,
                                                       w.bucket_minutes * 60, f) x
                     GROUP BY x.b) s), '[]'::jsonb));
END
$$;

-- GET /api/v1/analytics/worker-metrics. f {from?, to?, hostname?, workerId?}: one series per
-- worker name (hostname, workerId), one point per bucket with rows.
CREATE OR REPLACE FUNCTION queen.analytics_worker_metrics(f jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    w record;
BEGIN
    SELECT * INTO w FROM queen.status_window(f);
    RETURN jsonb_build_object(
        'from', queen.format_ts3(w.w_from), 'to', queen.format_ts3(w.w_to),
        'bucketMinutes', w.bucket_minutes,
        'series', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'hostname', g.hostname, 'workerId', g.worker_id, 'pid', g.pid,
                       'points', g.points) ORDER BY g.hostname, g.worker_id)
              FROM (SELECT x.hostname, x.worker_id,
                           (array_agg(x.pid ORDER BY x.b DESC))[1] AS pid,
                           jsonb_agg(jsonb_build_object(
                               'timestamp', queen.format_ts3(x.b),
                               'rssBytes', round(x.rss_bytes),
                               'cpuPercent', queen.status_round(x.cpu_percent, 2),
                               'eventLoopLagMs', jsonb_build_object(
                                   'avg', queen.status_round(x.lag_avg),
                                   'max', queen.status_round(x.lag_max)),
                               'dbPoolSize', round(x.pool_size),
                               'dbPoolIdle', round(x.pool_idle),
                               'dbPoolWaiting', round(x.pool_waiting),
                               'bufferPending', round(x.buffer_pending),
                               'bufferFailed', round(x.buffer_failed),
                               'dbHealthy', x.db_healthy,
                               'pushMessages', x.push_messages, 'popMessages', x.pop_messages,
                               'ackSuccess', x.ack_success, 'ackFailed', x.ack_failed,
                               'dbErrors', x.db_errors)
                             ORDER BY x.b) AS points
                      FROM queen.status_worker_buckets(w.w_from, w.w_to,
                                                       w.bucket_minutes * 60, f) x
                     GROUP BY x.hostname, x.worker_id) g), '[]'::jsonb));
END
$$;

-- GET /api/v1/analytics/postgres-stats: the database's size, cache hit ratio and
-- connections, and the queen schema's tables and indexes from the statistics views.
CREATE OR REPLACE FUNCTION queen.analytics_postgres_stats() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'database', (
            SELECT jsonb_build_object(
                       'name', d.datname,
                       'sizeBytes', pg_database_size(d.datid),
                       'cacheHitRatio', CASE WHEN d.blks_hit + d.blks_read = 0 THEN NULL
                           ELSE round(d.blks_hit::numeric / (d.blks_hit + d.blks_read), 4) END,
                       'connections', d.numbackends,
                       'transactionsCommitted', d.xact_commit,
                       'transactionsRolledBack', d.xact_rollback,
                       'deadlocks', d.deadlocks)
              FROM pg_stat_database d WHERE d.datname = current_database()),
        'tables', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'name', t.relname,
                       'sizeBytes', pg_total_relation_size(t.relid),
                       'liveRows', t.n_live_tup, 'deadRows', t.n_dead_tup,
                       'lastVacuum', queen.format_ts3(t.last_vacuum),
                       'lastAutovacuum', queen.format_ts3(t.last_autovacuum),
                       'lastAnalyze', queen.format_ts3(greatest(t.last_analyze,
                                                                t.last_autoanalyze)),
                       'sequentialScans', t.seq_scan, 'indexScans', coalesce(t.idx_scan, 0))
                     ORDER BY pg_total_relation_size(t.relid) DESC, t.relname)
              FROM pg_stat_user_tables t WHERE t.schemaname = 'queen'), '[]'::jsonb),
        'indexes', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'name', i.indexrelname, 'table', i.relname,
                       'sizeBytes', pg_relation_size(i.indexrelid), 'scans', i.idx_scan)
                     ORDER BY pg_relation_size(i.indexrelid) DESC, i.indexrelname)
              FROM pg_stat_user_indexes i WHERE i.schemaname = 'queen'), '[]'::jsonb))
$$;

-- GET /api/v1/analytics/queue-lag, queue-ops and queue-parked-replicas. f {from?, to?,
-- queue?}; p_kind 'lag' | 'ops' | 'parked'. One series per queue, one point per bucket with
-- rows: pop lag (average weighted by messages popped, largest maximum), operation counts,
-- or long polls parked at the end of an interval (each worker's largest, summed) with the
-- number of workers (replicas) that reported the queue.
CREATE OR REPLACE FUNCTION queen.analytics_queue_series(f jsonb, p_kind text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    w record;
BEGIN
    IF queen.status_unknown_queue(f) THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    SELECT * INTO w FROM queen.status_window(f);
    RETURN jsonb_build_object(
        'from', queen.format_ts3(w.w_from), 'to', queen.format_ts3(w.w_to),
        'bucketMinutes', w.bucket_minutes,
        'series', coalesce((
            SELECT jsonb_agg(jsonb_build_object('queue', g.queue, 'points', g.points)
                             ORDER BY g.queue)
              FROM (SELECT x.queue, jsonb_agg(CASE p_kind
                        WHEN 'lag' THEN jsonb_build_object(
                            'timestamp', queen.format_ts3(x.b),
                            'avgMs', queen.status_round(x.lag_avg),
                            'maxMs', queen.status_round(x.lag_max),
                            'popMessages', x.pop_messages)
                        WHEN 'parked' THEN jsonb_build_object(
                            'timestamp', queen.format_ts3(x.b),
                            'parkedConsumers', x.parked, 'replicas', x.replicas)
                        ELSE jsonb_build_object(
                            'timestamp', queen.format_ts3(x.b),
                            'pushRequests', x.push_requests, 'pushMessages', x.push_messages,
                            'popRequests', x.pop_requests, 'popMessages', x.pop_messages,
                            'popEmpty', x.pop_empty, 'ackSuccess', x.ack_success,
                            'ackFailed', x.ack_failed, 'transactions', x.transactions,
                            'dlq', x.dlq) END ORDER BY x.b) AS points
                      FROM (SELECT y.queue, y.b, sum(y.push_requests) AS push_requests,
                                   sum(y.push_messages) AS push_messages,
                                   sum(y.pop_requests) AS pop_requests,
                                   sum(y.pop_messages) AS pop_messages,
                                   sum(y.pop_empty) AS pop_empty,
                                   sum(y.ack_success) AS ack_success,
                                   sum(y.ack_failed) AS ack_failed,
                                   sum(y.transactions) AS transactions, sum(y.dlq) AS dlq,
                                   sum(y.lag_weighted) / nullif(sum(y.lag_weight), 0) AS lag_avg,
                                   max(y.lag_max) AS lag_max, sum(y.parked) AS parked,
                                   count(*) AS replicas
                              FROM (SELECT q.queue_name AS queue,
                                           queen.status_bucket(q.bucket_start,
                                                               w.bucket_minutes * 60) AS b,
                                           q.hostname, q.worker_id,
                                           sum(q.push_requests) AS push_requests,
                                           sum(q.push_messages) AS push_messages,
                                           sum(q.pop_requests) AS pop_requests,
                                           sum(q.pop_messages) AS pop_messages,
                                           sum(q.pop_empty) AS pop_empty,
                                           sum(q.ack_success) AS ack_success,
                                           sum(q.ack_failed) AS ack_failed,
                                           sum(q.transactions) AS transactions,
                                           sum(q.dlq) AS dlq,
                                           sum((q.pop_lag_ms->>'avg')::float8 * q.pop_messages)
                                               AS lag_weighted,
                                           sum(q.pop_messages) FILTER (WHERE q.pop_lag_ms ? 'avg')
                                               AS lag_weight,
                                           max((q.pop_lag_ms->>'max')::float8) AS lag_max,
                                           max(q.parked_consumers) AS parked
                                      FROM queen.queue_metrics q
                                     WHERE q.bucket_start >= w.w_from AND q.bucket_start < w.w_to
                                       AND (f->>'queue' IS NULL OR q.queue_name = f->>'queue')
                                     GROUP BY 1, 2, 3, 4) y
                             GROUP BY y.queue, y.b) x
                     GROUP BY x.queue) g), '[]'::jsonb));
END
$$;

-- GET /api/v1/analytics/retention. f {from?, to?, queue?}; p_metrics_days:
-- METRICS_RETENTION_DAYS. The retention job records nothing of its own, so this is a picture
-- of now whatever the range (which is only echoed): per table that retention or eviction
-- prunes, its rows and its oldest row's time and age (with a queue filter, that queue's
-- messages, dead letters, traces and metrics rows).
CREATE OR REPLACE FUNCTION queen.analytics_retention(f jsonb, p_metrics_days integer) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_queue  uuid;
    v_tables jsonb;
    w        record;
BEGIN
    IF queen.status_unknown_queue(f) THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    SELECT * INTO w FROM queen.status_window(f);
    SELECT id INTO v_queue FROM queen.queues WHERE name = f->>'queue';
    WITH t(name, rows, oldest) AS (
        SELECT 'messages',
               (SELECT coalesce(sum(p.message_count), 0) FROM queen.partitions p
                 WHERE v_queue IS NULL OR p.queue_id = v_queue),
               (SELECT min(m.created_at) FROM queen.messages m
                 WHERE v_queue IS NULL
                    OR m.partition_id IN (SELECT id FROM queen.partitions WHERE queue_id = v_queue))
        UNION ALL
        SELECT 'dead_letter_queue', count(*), min(d.failed_at)
          FROM queen.dead_letter_queue d
         WHERE v_queue IS NULL
            OR d.partition_id IN (SELECT id FROM queen.partitions WHERE queue_id = v_queue)
        UNION ALL
        SELECT 'message_traces', count(*), min(x.created_at) FROM queen.message_traces x
         WHERE v_queue IS NULL
            OR x.partition_id IN (SELECT id FROM queen.partitions WHERE queue_id = v_queue)
        UNION ALL
        SELECT 'worker_metrics', count(*), min(bucket_start) FROM queen.worker_metrics
        HAVING f->>'queue' IS NULL  -- per worker, not per queue
        UNION ALL
        SELECT 'queue_metrics', count(*), min(bucket_start) FROM queen.queue_metrics
         WHERE f->>'queue' IS NULL OR queue_name = f->>'queue'
    )
    SELECT jsonb_agg(jsonb_build_object(
               'table', t.name, 'rows', t.rows, 'oldestAt', queen.format_ts3(t.oldest),
               'oldestAgeSeconds', CASE WHEN t.oldest IS NULL THEN NULL
                   ELSE round(extract(epoch FROM now() - t.oldest)::numeric, 3) END))
      INTO v_tables FROM t;
    RETURN jsonb_build_object(
        'from', queen.format_ts3(w.w_from), 'to', queen.format_ts3(w.w_to),
        'bucketMinutes', w.bucket_minutes, 'now', queen.format_ts3(now()),
        'metricsRetentionDays', p_metrics_days,
        'series', v_tables);
END
$$;
