-- Statistics and the resource overview routes (WIRE.md 3.1, 3.5 stats/refresh).
-- Counts never look at every message: they come from message positions (messages.seq,
-- partitions.first_seq/last_seq, partition_consumers.cursor_seq and partition_holes, see
-- migrations/0004_stats_counters.sql) and the maintained partitions.message_count, read with
-- a few index probes per partition. The statistics service snapshots them every
-- STATS_INTERVAL_MS (tables queue_stats and system_stats in migrations/0001_baseline.sql);
-- the resource routes read the snapshot or the same functions live.

-- The smallest UUIDv7 of a moment. Nothing calls it any more (an id does not tell a
-- message's created_at: see queen.messages_list); kept, as every function a release made.
CREATE OR REPLACE FUNCTION queen.uuid_v7_floor(ts timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE AS $$
    SELECT (lpad(to_hex(floor(extract(epoch FROM ts) * 1000)::bigint), 12, '0')
            || '00000000000000000000')::uuid
$$;

-- Where a group without a cursor in a partition stands: the position (seq) of the last
-- message at or before its subscription point, 0 when there is none (one index probe).
CREATE OR REPLACE FUNCTION queen.subscription_seq(p_partition uuid, p_from timestamptz)
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT m.seq FROM queen.messages m
                      WHERE m.partition_id = p_partition
                        AND (m.created_at, m.id) <= (p_from, queen.start_cursor_id(p_from))
                      ORDER BY m.created_at DESC, m.id DESC LIMIT 1), 0)
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

-- Positions (migration 4): how many stored messages of a partition sit at positions
-- 1..p_seq, i.e. the positions from the oldest stored one, less the holes among them.
CREATE OR REPLACE FUNCTION queen.stored_through(p_partition uuid, p_first bigint, p_last bigint,
                                                p_seq bigint)
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_seq IS NULL OR p_seq < p_first THEN 0
                ELSE least(p_seq, p_last) - p_first + 1
                     - coalesce((SELECT sum(least(h.seq_hi, p_seq) - greatest(h.seq_lo, p_first) + 1)
                                   FROM queen.partition_holes h
                                  WHERE h.partition_id = p_partition
                                    AND h.seq_lo <= p_seq AND h.seq_hi >= p_first), 0)::bigint
           END
$$;

-- A cursor that moves (any writer: pops, acks, seeks, the DLQ route, transactions) records
-- the position of the message it now stands on: found by its id (a primary-key probe), or,
-- for a start-of-time or "after this moment" cursor or a message deleted since, by the order
-- key. A BEFORE trigger, so the row is written once. (By id first: a statement that shifts
-- a partition's times together, as the tests' pass_time does, keeps every position.)
CREATE OR REPLACE FUNCTION queen.on_cursor_positioned() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.cursor_seq := coalesce(
        (SELECT m.seq FROM queen.messages m
          WHERE m.id = NEW.cursor_id AND m.partition_id = NEW.partition_id),
        (SELECT m.seq FROM queen.messages m
          WHERE m.partition_id = NEW.partition_id
            AND (m.created_at, m.id) <= (NEW.cursor_created_at, NEW.cursor_id)
          ORDER BY m.created_at DESC, m.id DESC LIMIT 1),
        0);
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER partition_consumers_cursor_seq
    BEFORE UPDATE OF cursor_created_at, cursor_id ON queen.partition_consumers
    FOR EACH ROW
    WHEN ((NEW.cursor_created_at, NEW.cursor_id) IS DISTINCT FROM (OLD.cursor_created_at, OLD.cursor_id))
    EXECUTE FUNCTION queen.on_cursor_positioned();

CREATE OR REPLACE TRIGGER partition_consumers_cursor_seq_new
    BEFORE INSERT ON queen.partition_consumers
    FOR EACH ROW WHEN (NEW.cursor_created_at > '-infinity')
    EXECUTE FUNCTION queen.on_cursor_positioned();

-- Deleted messages (retention, eviction, explicit deletes, clears): first_seq moves to the
-- oldest message left, and deleted positions after it become holes. Runs after the count
-- trigger of 002_push.sql (trigger names sort), which has locked these partition rows, so no
-- push numbers messages in between.
CREATE OR REPLACE FUNCTION queen.on_messages_deleted_positions() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_parts uuid[];
BEGIN
    SELECT array_agg(DISTINCT partition_id) INTO v_parts FROM deleted_rows;
    UPDATE queen.partitions p
       SET first_seq = coalesce((SELECT m.seq FROM queen.messages m
                                  WHERE m.partition_id = p.id
                                  ORDER BY m.created_at, m.id LIMIT 1), p.last_seq + 1)
     WHERE p.id = ANY(v_parts);
    INSERT INTO queen.partition_holes (partition_id, seq_lo, seq_hi)
    SELECT g.partition_id, min(g.seq), max(g.seq)
      FROM (SELECT d.partition_id, d.seq,
                   d.seq - row_number() OVER (PARTITION BY d.partition_id ORDER BY d.seq) AS island
              FROM deleted_rows d JOIN queen.partitions p ON p.id = d.partition_id
             WHERE d.seq > p.first_seq) g
     GROUP BY g.partition_id, g.island;
    DELETE FROM queen.partition_holes h USING queen.partitions p
     WHERE p.id = ANY(v_parts) AND h.partition_id = p.id AND h.seq_hi < p.first_seq;
    -- A group cooling down after a failed delivery whose next message is gone (retention,
    -- eviction, a delete) starts its next delivery afresh: the retry count was that message's,
    -- and carried over it would dead-letter the next one early.
    UPDATE queen.partition_consumers pc
       SET retry_count = 0, retry_after = NULL
     WHERE pc.partition_id = ANY(v_parts)
       AND pc.retry_count > 0
       AND (pc.lease_id IS NULL OR pc.lease_expires_at <= now())
       AND EXISTS (SELECT 1 FROM deleted_rows d
                    WHERE d.partition_id = pc.partition_id
                      AND (d.created_at, d.id) > (pc.cursor_created_at, pc.cursor_id)
                      AND NOT EXISTS (SELECT 1 FROM queen.messages m
                                       WHERE m.partition_id = pc.partition_id
                                         AND (m.created_at, m.id) > (pc.cursor_created_at, pc.cursor_id)
                                         AND (m.created_at, m.id) < (d.created_at, d.id)));
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER messages_deleted_positions
    AFTER DELETE ON queen.messages
    REFERENCING OLD TABLE AS deleted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queen.on_messages_deleted_positions();

-- The counts of the partitions p_partitions, as the full recount defined them:
-- total = stored; completed = at or before the queue-mode cursor, less the ones queue mode
-- dead-lettered there (one it dead-lettered ahead of its cursor is still pending); processing = after it, up to the last message of a live queue-mode lease;
-- pending = the rest; dead_letter = the partition's messages in the dead-letter table,
-- whichever group put them there (one a named group dead-lettered is pending for queue mode
-- too: the other counts are queue mode's view). stored_through's arithmetic written out (a
-- SQL function with a sub-select is never inlined, and a call per partition cost more than
-- the probes): a few index probes per partition, whatever it stores. Dead letters are
-- counted per partition (one index range and a key probe each), so that count grows with the
-- dead-letter table, not with the queue.
-- Taken as an array, not as one id that NULL widens to all: a generic plan of
-- `p_partition IS NULL OR p.id = p_partition` read every partition, once per partition a
-- listing counted (GET /api/v1/resources/queues took seconds at a few thousand queues).
DROP FUNCTION IF EXISTS queen.partition_counts(uuid);
CREATE OR REPLACE FUNCTION queen.partition_counts(p_partitions uuid[])
RETURNS TABLE (partition_id uuid, queue_id uuid, total bigint, pending bigint,
               processing bigint, completed bigint, dead_letter bigint)
LANGUAGE sql STABLE AS $$
    SELECT x.id, x.queue_id, x.message_count, x.message_count - x.consumed - x.processing,
           x.processing, x.consumed - dl.own, dl.dead_letter
      FROM (
        SELECT p.id, p.queue_id, p.message_count, coalesce(pc.cursor_seq, 0) AS cursor_seq,
               -- stored messages at positions first_seq..cursor_seq
               CASE WHEN coalesce(pc.cursor_seq, 0) < p.first_seq THEN 0
                    ELSE least(pc.cursor_seq, p.last_seq) - p.first_seq + 1
                         - coalesce((SELECT sum(least(h.seq_hi, pc.cursor_seq)
                                                - greatest(h.seq_lo, p.first_seq) + 1)
                                       FROM queen.partition_holes h
                                      WHERE h.partition_id = p.id
                                        AND h.seq_lo <= pc.cursor_seq
                                        AND h.seq_hi >= p.first_seq), 0)
               END AS consumed,
               -- stored messages after the cursor, up to the lease's last one
               CASE WHEN le.seq IS NULL THEN 0
                    ELSE le.seq - greatest(pc.cursor_seq, p.first_seq - 1)
                         - coalesce((SELECT sum(least(h.seq_hi, le.seq)
                                                - greatest(h.seq_lo, pc.cursor_seq + 1,
                                                           p.first_seq) + 1)
                                       FROM queen.partition_holes h
                                      WHERE h.partition_id = p.id
                                        AND h.seq_lo <= le.seq
                                        AND h.seq_hi > greatest(pc.cursor_seq, p.first_seq - 1)),
                                    0)
               END AS processing
          FROM queen.partitions p
          LEFT JOIN queen.partition_consumers pc
                 ON pc.partition_id = p.id AND pc.consumer_group = '__QUEUE_MODE__'
          LEFT JOIN LATERAL (
              SELECT m.seq FROM queen.messages m
               WHERE pc.lease_id IS NOT NULL AND pc.lease_expires_at > now()
                 AND m.partition_id = p.id
                 AND (m.created_at, m.id) <= (pc.lease_last_created_at, pc.lease_last_id)
                 AND (m.created_at, m.id) > (pc.cursor_created_at, pc.cursor_id)
               ORDER BY m.created_at DESC, m.id DESC LIMIT 1) le ON true
         WHERE p.id = ANY(p_partitions)
      ) x
      CROSS JOIN LATERAL (
          SELECT count(DISTINCT d.message_id) AS dead_letter,
                 count(DISTINCT d.message_id)
                     FILTER (WHERE d.consumer_group = '__QUEUE_MODE__'
                               AND m.seq <= x.cursor_seq) AS own
            FROM queen.dead_letter_queue d
            JOIN queen.messages m ON m.id = d.message_id
           WHERE d.partition_id = x.id) dl
$$;

-- Lag of every (group, partition) with work (the pending lookup's rows): the stored
-- messages after the group's cursor (or its subscription point where it has none), and the
-- oldest of them. Probes written out, as in partition_counts.
CREATE OR REPLACE FUNCTION queen.lag_counts()
RETURNS TABLE (consumer_group text, partition_id uuid, oldest_unconsumed_at timestamptz,
               offset_lag bigint)
LANGUAGE sql STABLE AS $$
    SELECT y.consumer_group, y.partition_id,
           (SELECT m.created_at FROM queen.messages m
             WHERE m.partition_id = y.partition_id AND (m.created_at, m.id) > (y.at, y.id)
             ORDER BY m.created_at, m.id LIMIT 1),
           y.lag
      FROM (
        SELECT x.consumer_group, x.partition_id, x.at, x.id,
               CASE WHEN x.at IS NULL THEN 0
                    WHEN x.seq < x.first_seq THEN x.message_count
                    ELSE x.message_count - (least(x.seq, x.last_seq) - x.first_seq + 1
                         - coalesce((SELECT sum(least(h.seq_hi, x.seq)
                                                - greatest(h.seq_lo, x.first_seq) + 1)
                                       FROM queen.partition_holes h
                                      WHERE h.partition_id = x.partition_id
                                        AND h.seq_lo <= x.seq AND h.seq_hi >= x.first_seq), 0))
               END AS lag
          FROM (
            SELECT pp.consumer_group, pp.partition_id, p.message_count, p.first_seq, p.last_seq,
                   coalesce(pc.cursor_created_at, s.subscription_from) AS at,
                   coalesce(pc.cursor_id, queen.start_cursor_id(s.subscription_from)) AS id,
                   coalesce(pc.cursor_seq,
                            queen.subscription_seq(pp.partition_id, s.subscription_from)) AS seq
              FROM queen.partition_pending pp
              JOIN queen.partitions p ON p.id = pp.partition_id
              LEFT JOIN queen.consumer_subscriptions s
                     ON s.queue_id = pp.queue_id AND s.consumer_group = pp.consumer_group
              LEFT JOIN queen.partition_consumers pc
                     ON pc.partition_id = pp.partition_id AND pc.consumer_group = pp.consumer_group
            OFFSET 0  -- kept apart: seq is used three times below, its probe runs once
          ) x
      ) y
     WHERE y.lag > 0
$$;

-- Held exclusive by queen.delete_queue, shared by queen.refresh_stats (see there).
CREATE OR REPLACE FUNCTION queen.queue_delete_lock() RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT 737003::bigint $$;

-- Recomputes every queue's counts and the cluster figures; returns a summary. Its cost
-- follows the number of partitions and of lagging (group, partition) pairs, not of messages.
-- It holds queen.queue_delete_lock() shared, so no queue is deleted while it counts and the
-- upsert never meets a missing queue (no foreign-key violation). An advisory lock rather
-- than FOR KEY SHARE on the queue rows: row share lockers join each other's lock past a
-- waiting DELETE, and refreshes that overlap (several instances, POST stats/refresh) would
-- starve it; the lock manager queues a new shared request behind the waiting delete.
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
    PERFORM pg_advisory_xact_lock_shared(queen.queue_delete_lock());
    WITH live AS (
        SELECT qu.id FROM queen.queues qu
    ), counted AS (
        SELECT c.queue_id, sum(c.total) AS total, sum(c.pending) AS pending,
               sum(c.processing) AS processing, sum(c.completed) AS completed,
               sum(c.dead_letter) AS dead_letter
          FROM queen.partition_counts(ARRAY(SELECT id FROM queen.partitions)) c
         GROUP BY c.queue_id
    )
    INSERT INTO queen.queue_stats AS qs (queue_id, total, pending, processing, completed,
                                         dead_letter, computed_at)
    SELECT l.id, coalesce(c.total, 0), coalesce(c.pending, 0), coalesce(c.processing, 0),
           coalesce(c.completed, 0), coalesce(c.dead_letter, 0), now()
      FROM live l LEFT JOIN counted c ON c.queue_id = l.id
     ORDER BY l.id
    ON CONFLICT (queue_id) DO UPDATE SET
        total = excluded.total, pending = excluded.pending, processing = excluded.processing,
        completed = excluded.completed, dead_letter = excluded.dead_letter,
        computed_at = excluded.computed_at;
    GET DIAGNOSTICS v_queues = ROW_COUNT;

    SELECT * INTO v_prev FROM queen.system_stats WHERE id = 1;
    SELECT coalesce(sum(total_consumed), 0) INTO v_consumed FROM queen.partition_consumers;
    -- Messages stored in the last minute: from the partitions active in it, the stored
    -- messages after the position of the last one older than the minute.
    SELECT coalesce(sum(p.message_count - queen.stored_through(p.id, p.first_seq, p.last_seq, (
               SELECT m.seq FROM queen.messages m
                WHERE m.partition_id = p.id AND m.created_at < now() - interval '60 seconds'
                ORDER BY m.created_at DESC, m.id DESC LIMIT 1))), 0)
      INTO v_ingested
      FROM queen.partitions p
     WHERE p.last_message_at >= now() - interval '60 seconds';
    v_elapsed := greatest(extract(epoch FROM now() - coalesce(v_prev.computed_at, now())), 0);
    SELECT jsonb_build_object(
               'time', queen.stats_of(array_agg(extract(epoch FROM now() - l.oldest_unconsumed_at)::double precision)),
               'offset', queen.stats_of(array_agg(l.offset_lag::double precision)))
      INTO v_lag FROM queen.lag_counts() l;

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
                         -- messages, as in every queue's totals: one dead-lettered by
                         -- two groups has two rows
                         'deadLetter', (SELECT count(DISTINCT message_id)
                                          FROM queen.dead_letter_queue))
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
                           'pending', (SELECT c.pending + c.processing
                                         FROM queen.partition_counts(ARRAY[h.id]) c)))
                     ORDER BY h.queue_name, h.name)
              FROM (SELECT * FROM hits ORDER BY queue_name, name LIMIT v_limit OFFSET v_offset) h),
            '[]'::jsonb),
        'total', (SELECT count(*) FROM hits),
        'limit', v_limit, 'offset', v_offset));
END
$$;
