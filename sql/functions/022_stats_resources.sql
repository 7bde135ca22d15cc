-- Statistics and the resource overview routes (WIRE.md 3.1, 3.5 stats/refresh).
-- Counts that need a look at every message (pending, completed, lag) come from a snapshot the
-- statistics service refreshes every STATS_INTERVAL_MS (tables queue_stats and system_stats in
-- migrations/0001_baseline.sql); cheap counts are read live.

-- The smallest UUIDv7 of a moment: message ids at or after it were created at or after it,
-- so time windows over messages use the primary key.
CREATE OR REPLACE FUNCTION queen.uuid_v7_floor(ts timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE AS $$
    SELECT (lpad(to_hex(floor(extract(epoch FROM ts) * 1000)::bigint), 12, '0')
            || '00000000000000000000')::uuid
$$;

CREATE OR REPLACE FUNCTION queen.stats_of(p_values double precision[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'avg', coalesce(round(avg(v)::numeric, 3), 0),
        'median', coalesce(round((percentile_cont(0.5) WITHIN GROUP (ORDER BY v))::numeric, 3), 0),
        'min', coalesce(round(min(v)::numeric, 3), 0),
        'max', coalesce(round(max(v)::numeric, 3), 0))
      FROM unnest(p_values) v
$$;

-- Recomputes every queue's counts and the cluster figures; returns a summary.
CREATE OR REPLACE FUNCTION queen.refresh_stats() RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_started  timestamptz := clock_timestamp();
    v_prev     queen.system_stats;
    v_consumed bigint;
    v_ingested bigint;
    v_elapsed  double precision;
    v_queues   integer;
    v_lag      jsonb;
BEGIN
    INSERT INTO queen.queue_stats AS qs (queue_id, total, pending, processing, completed,
                                         dead_letter, computed_at)
    SELECT p.queue_id, sum((s->>'total')::bigint), sum((s->>'pending')::bigint),
           sum((s->>'processing')::bigint), sum((s->>'completed')::bigint),
           sum((s->>'deadLetter')::bigint), now()
      FROM queen.partitions p, LATERAL queen.partition_stats(p.id) s
     GROUP BY p.queue_id
    ON CONFLICT (queue_id) DO UPDATE SET
        total = excluded.total, pending = excluded.pending, processing = excluded.processing,
        completed = excluded.completed, dead_letter = excluded.dead_letter,
        computed_at = excluded.computed_at;
    GET DIAGNOSTICS v_queues = ROW_COUNT;

    SELECT * INTO v_prev FROM queen.system_stats WHERE id = 1;
    SELECT coalesce(sum(total_consumed), 0) INTO v_consumed FROM queen.partition_consumers;
    SELECT count(*) INTO v_ingested FROM queen.messages
     WHERE id >= queen.uuid_v7_floor(now() - interval '60 seconds');
    v_elapsed := greatest(extract(epoch FROM now() - coalesce(v_prev.computed_at, now())), 0);
    SELECT jsonb_build_object(
               'time', queen.stats_of(array_agg(extract(epoch FROM now() - l.oldest_unconsumed_at)::double precision)),
               'offset', queen.stats_of(array_agg(l.offset_lag::double precision)))
      INTO v_lag FROM queen.group_lag() l;

    INSERT INTO queen.system_stats AS ss (id, ingested_per_second, processed_per_second,
                                          consumed_total, lag, computed_at)
    VALUES (1, v_ingested / 60.0,
            CASE WHEN v_prev.id IS NULL OR v_elapsed = 0 THEN 0
                 ELSE greatest(v_consumed - v_prev.consumed_total, 0) / v_elapsed END,
            v_consumed, v_lag, now())
    ON CONFLICT (id) DO UPDATE SET
        ingested_per_second = excluded.ingested_per_second,
        processed_per_second = excluded.processed_per_second,
        consumed_total = excluded.consumed_total, lag = excluded.lag,
        computed_at = excluded.computed_at;

    DELETE FROM queen.queue_stats qs WHERE NOT EXISTS (SELECT 1 FROM queen.queues q WHERE q.id = qs.queue_id);

    RETURN jsonb_build_object(
        'success', true, 'queues', v_queues,
        'durationMs', round((extract(epoch FROM clock_timestamp() - v_started) * 1000)::numeric, 1),
        'refreshedAt', queen.format_ts3(now()));
END
$$;

-- GET /api/v1/resources/overview
CREATE OR REPLACE FUNCTION queen.resources_overview() RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_sys queen.system_stats;
BEGIN
    SELECT * INTO v_sys FROM queen.system_stats WHERE id = 1;
    RETURN jsonb_build_object(
        'queues', (SELECT count(*) FROM queen.queues),
        'partitions', (SELECT count(*) FROM queen.partitions),
        'namespaces', (SELECT count(DISTINCT namespace) FROM queen.queues WHERE namespace <> ''),
        'tasks', (SELECT count(DISTINCT task) FROM queen.queues WHERE task <> ''),
        'messages', (SELECT jsonb_build_object(
                         'total', (SELECT coalesce(sum(message_count), 0) FROM queen.partitions),
                         'pending', coalesce(sum(qs.pending), 0),
                         'processing', coalesce(sum(qs.processing), 0),
                         'completed', coalesce(sum(qs.completed), 0),
                         'failed', 0,
                         'deadLetter', (SELECT count(*) FROM queen.dead_letter_queue))
                       FROM queen.queue_stats qs),
        'lag', coalesce(v_sys.lag, '{}'::jsonb)
               || jsonb_build_object('time', coalesce(v_sys.lag->'time', queen.stats_of('{}')),
                                     'offset', coalesce(v_sys.lag->'offset', queen.stats_of('{}'))),
        'throughput', jsonb_build_object(
            'ingestedPerSecond', round(coalesce(v_sys.ingested_per_second, 0)::numeric, 3),
            'processedPerSecond', round(coalesce(v_sys.processed_per_second, 0)::numeric, 3)),
        'timestamp', queen.format_ts3(now()),
        'statsAge', CASE WHEN v_sys.id IS NULL THEN NULL
                         ELSE round(extract(epoch FROM now() - v_sys.computed_at)::numeric, 3) END);
END
$$;

-- GET /api/v1/resources/namespaces and /tasks: queues grouped by namespace or task.
CREATE OR REPLACE FUNCTION queen.resources_grouped(p_by text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               p_by, g.key, 'queues', g.queues, 'partitions', g.partitions,
               'messages', jsonb_build_object('total', g.total, 'pending', g.pending))
             ORDER BY g.key), '[]'::jsonb)
      FROM (SELECT CASE WHEN p_by = 'namespace' THEN qu.namespace ELSE qu.task END AS key,
                   count(*) AS queues,
                   sum((SELECT count(*) FROM queen.partitions p WHERE p.queue_id = qu.id)) AS partitions,
                   sum((SELECT coalesce(sum(message_count), 0) FROM queen.partitions p
                         WHERE p.queue_id = qu.id)) AS total,
                   coalesce(sum(qs.pending), 0) AS pending
              FROM queen.queues qu
              LEFT JOIN queen.queue_stats qs ON qs.queue_id = qu.id
             WHERE CASE WHEN p_by = 'namespace' THEN qu.namespace ELSE qu.task END <> ''
             GROUP BY 1) g);
END
$$;

-- GET /api/v1/resources/partitions: f {queue?, limit, offset}.
CREATE OR REPLACE FUNCTION queen.resources_partitions(f jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_limit  integer := coalesce((f->>'limit')::int, 100);
    v_offset integer := coalesce((f->>'offset')::int, 0);
BEGIN
    RETURN (
    WITH hits AS (
        SELECT p.*, qu.name AS queue_name
          FROM queen.partitions p JOIN queen.queues qu ON qu.id = p.queue_id
         WHERE f->>'queue' IS NULL OR qu.name = f->>'queue'
    )
    SELECT jsonb_build_object(
        'partitions', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'id', h.id, 'name', h.name, 'queue', h.queue_name,
                       'createdAt', queen.format_ts3(h.created_at),
                       'lastActivity', queen.format_ts3(h.last_activity),
                       'messages', jsonb_build_object(
                           'total', h.message_count,
                           'pending', (SELECT count(*) FROM queen.messages m
                                        LEFT JOIN queen.partition_consumers pc
                                               ON pc.partition_id = h.id
                                              AND pc.consumer_group = '__QUEUE_MODE__'
                                        WHERE m.partition_id = h.id
                                          AND (pc.partition_id IS NULL
                                               OR (m.created_at, m.id) > (pc.cursor_created_at, pc.cursor_id)))))
                     ORDER BY h.queue_name, h.name)
              FROM (SELECT * FROM hits ORDER BY queue_name, name LIMIT v_limit OFFSET v_offset) h),
            '[]'::jsonb),
        'total', (SELECT count(*) FROM hits),
        'limit', v_limit, 'offset', v_offset));
END
$$;
