-- Queue configuration, dead-letter reads and traces (WIRE.md 2.1, 3.3, 3.6).

-- p: {queue, namespace, task, options{15 camelCase options, already validated and typed}}.
-- Full replace: options missing from p return to their defaults.
CREATE OR REPLACE FUNCTION queen.configure_queue(p jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    o          jsonb := coalesce(p->'options', '{}'::jsonb);
    v_queue    queen.queues;
    v_part_id  uuid;
BEGIN
    INSERT INTO queen.queues AS qu (name, namespace, task, priority, lease_time, retry_limit,
        retry_delay, max_size, ttl, dead_letter_queue, dlq_after_max_retries, delayed_processing,
        window_buffer, retention_seconds, completed_retention_seconds, retention_enabled,
        encryption_enabled, max_wait_time_seconds)
    VALUES (p->>'queue', coalesce(p->>'namespace', ''), coalesce(p->>'task', ''),
        coalesce((o->>'priority')::int, 0), coalesce((o->>'leaseTime')::int, 300),
        coalesce((o->>'retryLimit')::int, 3), coalesce((o->>'retryDelay')::int, 1000),
        coalesce((o->>'maxSize')::int, 0), coalesce((o->>'ttl')::int, 3600),
        coalesce((o->>'deadLetterQueue')::boolean, false),
        coalesce((o->>'dlqAfterMaxRetries')::boolean, false),
        coalesce((o->>'delayedProcessing')::int, 0), coalesce((o->>'windowBuffer')::int, 0),
        coalesce((o->>'retentionSeconds')::int, 0),
        coalesce((o->>'completedRetentionSeconds')::int, 0),
        coalesce((o->>'retentionEnabled')::boolean, false),
        coalesce((o->>'encryptionEnabled')::boolean, false),
        coalesce((o->>'maxWaitTimeSeconds')::int, 0))
    ON CONFLICT (name) DO UPDATE SET
        namespace = excluded.namespace, task = excluded.task, priority = excluded.priority,
        lease_time = excluded.lease_time, retry_limit = excluded.retry_limit,
        retry_delay = excluded.retry_delay, max_size = excluded.max_size, ttl = excluded.ttl,
        dead_letter_queue = excluded.dead_letter_queue,
        dlq_after_max_retries = excluded.dlq_after_max_retries,
        delayed_processing = excluded.delayed_processing, window_buffer = excluded.window_buffer,
        retention_seconds = excluded.retention_seconds,
        completed_retention_seconds = excluded.completed_retention_seconds,
        retention_enabled = excluded.retention_enabled,
        encryption_enabled = excluded.encryption_enabled,
        max_wait_time_seconds = excluded.max_wait_time_seconds,
        updated_at = now()
    RETURNING * INTO v_queue;

    INSERT INTO queen.partitions (queue_id, name) VALUES (v_queue.id, 'Default')
    ON CONFLICT (queue_id, name) DO NOTHING;
    SELECT id INTO v_part_id FROM queen.partitions WHERE queue_id = v_queue.id AND name = 'Default';

    RETURN jsonb_build_object(
        'configured', true, 'queueId', v_queue.id, 'partitionId', v_part_id,
        'queue', v_queue.name, 'namespace', v_queue.namespace, 'task', v_queue.task,
        'options', queen.queue_options(v_queue));
END
$$;

CREATE OR REPLACE FUNCTION queen.queue_options(qu queen.queues) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'priority', qu.priority, 'leaseTime', qu.lease_time, 'retryLimit', qu.retry_limit,
        'retryDelay', qu.retry_delay, 'maxSize', qu.max_size, 'ttl', qu.ttl,
        'deadLetterQueue', qu.dead_letter_queue, 'dlqAfterMaxRetries', qu.dlq_after_max_retries,
        'delayedProcessing', qu.delayed_processing, 'windowBuffer', qu.window_buffer,
        'retentionSeconds', qu.retention_seconds,
        'completedRetentionSeconds', qu.completed_retention_seconds,
        'retentionEnabled', qu.retention_enabled, 'encryptionEnabled', qu.encryption_enabled,
        'maxWaitTimeSeconds', qu.max_wait_time_seconds)
$$;

-- The encryption flag of each named queue that exists (the server encrypts before pushing).
CREATE OR REPLACE FUNCTION queen.queue_flags(p_names jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_object_agg(name, jsonb_build_object(
               'encryptionEnabled', encryption_enabled)), '{}'::jsonb)
      FROM queen.queues WHERE name IN (SELECT jsonb_array_elements_text(p_names))
$$;

CREATE OR REPLACE FUNCTION queen.delete_queue(p_name text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_existed    boolean;
    v_partitions uuid[];
BEGIN
    -- Waits for running stats refreshes (queen.queue_delete_lock, 022_stats_resources.sql).
    PERFORM pg_advisory_xact_lock(queen.queue_delete_lock());
    SELECT ARRAY(SELECT p.id FROM queen.partitions p WHERE p.queue_id = qu.id
                 UNION ALL  -- (partitions idle cleanup dropped, migration 14)
                 SELECT d.partition_id FROM queen.dropped_partitions d
                  WHERE d.queue_id = qu.id AND d.partition_id IS NOT NULL)
      INTO v_partitions
      FROM queen.queues qu WHERE qu.name = p_name;
    DELETE FROM queen.queues WHERE name = p_name;
    v_existed := FOUND;
    -- What the cascade cannot reach, being keyed without a foreign key (taken after the
    -- queue row, whose delete waited for writers holding it): the stream state of its
    -- partitions, which nothing reads again, and the dead letters of its timers, by name (a
    -- queue made again under the name listed them as its own).
    DELETE FROM queen_streams.state WHERE partition_id = ANY(v_partitions);
    DELETE FROM queen.timer_dead_letters WHERE queue = p_name;
    RETURN jsonb_build_object('deleted', true, 'queue', p_name, 'existed', v_existed);
END
$$;

-- Per-partition counts for the resource routes (queen.partition_counts, 022_stats_resources.sql:
-- a few index probes, never a scan of the partition's messages) and its oldest and newest
-- stored message.
-- (plpgsql: checked at its first call, when 022 has defined partition_counts.)
CREATE OR REPLACE FUNCTION queen.partition_stats(p_partition uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
    SELECT jsonb_build_object(
        'total', c.total, 'pending', c.pending, 'processing', c.processing,
        'completed', c.completed, 'failed', 0, 'deadLetter', c.dead_letter,
        'oldestMessage', queen.format_ts3((SELECT m.created_at FROM queen.messages m
                                            WHERE m.partition_id = p_partition
                                            ORDER BY m.created_at, m.id LIMIT 1)),
        'newestMessage', queen.format_ts3((SELECT m.created_at FROM queen.messages m
                                            WHERE m.partition_id = p_partition
                                            ORDER BY m.created_at DESC, m.id DESC LIMIT 1)))
      FROM queen.partition_counts(ARRAY[p_partition]) c);
END
$$;

CREATE OR REPLACE FUNCTION queen.queue_detail(p_name text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', qu.id, 'name', qu.name, 'namespace', qu.namespace, 'task', qu.task,
        'createdAt', queen.format_ts3(qu.created_at), 'options', queen.queue_options(qu),
        'partitions', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'id', p.id, 'name', p.name, 'createdAt', queen.format_ts3(p.created_at),
                       'stats', s - 'oldestMessage' - 'newestMessage',
                       'oldestMessage', s->'oldestMessage', 'newestMessage', s->'newestMessage')
                     ORDER BY p.name)
              FROM queen.partitions p, LATERAL queen.partition_stats(p.id) s
             WHERE p.queue_id = qu.id), '[]'::jsonb),
        'totals', (
            SELECT jsonb_build_object(
                       'total', coalesce(sum((s->>'total')::bigint), 0),
                       'pending', coalesce(sum((s->>'pending')::bigint), 0),
                       'processing', coalesce(sum((s->>'processing')::bigint), 0),
                       'completed', coalesce(sum((s->>'completed')::bigint), 0),
                       'failed', 0,
                       'deadLetter', coalesce(sum((s->>'deadLetter')::bigint), 0))
              FROM queen.partitions p, LATERAL queen.partition_stats(p.id) s
             WHERE p.queue_id = qu.id))
      FROM queen.queues qu WHERE qu.name = p_name
$$;

-- Every queue's counts from one pass over all partitions (a queue_detail per queue counted
-- each partition on its own: the listing grew with queues times partitions).
-- (plpgsql: checked at its first call, when 022 has defined partition_counts.)
CREATE OR REPLACE FUNCTION queen.queue_list() RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
    SELECT jsonb_build_object('queues', coalesce(jsonb_agg(jsonb_build_object(
               'id', qu.id, 'name', qu.name, 'namespace', qu.namespace, 'task', qu.task,
               'createdAt', queen.format_ts3(qu.created_at),
               'partitions', coalesce(c.partitions, 0),
               'messages', jsonb_build_object('total', coalesce(c.total, 0),
                                              'pending', coalesce(c.pending, 0),
                                              'processing', coalesce(c.processing, 0)))
               ORDER BY qu.name), '[]'::jsonb))
      FROM queen.queues qu
      LEFT JOIN (SELECT k.queue_id, count(*) AS partitions, sum(k.total) AS total,
                        sum(k.pending) AS pending, sum(k.processing) AS processing
                   FROM queen.partition_counts(ARRAY(SELECT id FROM queen.partitions)) k
                  GROUP BY k.queue_id) c ON c.queue_id = qu.id);
END
$$;

-- Answers that carry payloads but are bounded by a count (the listings of dead letters and
-- traces; the rows a timer sweep claims for the server to encrypt, 062_timers.sql) made
-- jsonb values over PostgreSQL's 256 MiB limit once their payloads were big: the listing
-- answered 400 for every page holding them, the sweep failed every time. A row's payloads go
-- in while the payload text before it (``p_before``; NULL for the first row) is under 64 MiB,
-- so the first row always has them, and an answer stays under 64 MiB plus one row's.
-- Listings give later rows with their payloads null and "dataOmitted": true (read such a
-- message by its own route); a sweep leaves later rows due for the next one.
CREATE OR REPLACE FUNCTION queen.within_answer_budget(p_before bigint) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT coalesce(p_before, 0) < 64 * 1024 * 1024::bigint $$;

-- f: {queue, consumerGroup?, partition?, from?, to?, limit, offset}. Newest failure first.
-- Two kinds of dead letters, filtered, counted and paged together in this one query: the
-- messages' (queen.dead_letter_queue) and the timers' whose fire failed for good
-- (queen.timer_dead_letters, WIRE2 3.4). A timer's row is listed under the consumer group
-- "__timer__" with the message it promised (id, transactionId, the payload it would have
-- delivered); its createdAt is when it was due, its partitionId null when no such partition
-- exists (a timer is keyed by names), and it names its timerKey.
CREATE OR REPLACE FUNCTION queen.dlq_list(f jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_limit  integer := coalesce((f->>'limit')::int, 100);
    v_offset integer := coalesce((f->>'offset')::int, 0);
    v_rows   jsonb;
    v_total  bigint;
BEGIN
    WITH hits AS (
        SELECT false AS is_timer, d.id, d.failed_at
          FROM queen.dead_letter_queue d
          JOIN queen.partitions p ON p.id = d.partition_id
          JOIN queen.queues qu ON qu.id = p.queue_id
         WHERE (f->>'queue' IS NULL OR qu.name = f->>'queue')
           AND (f->>'consumerGroup' IS NULL OR d.consumer_group = f->>'consumerGroup')
           AND (f->>'partition' IS NULL OR p.name = f->>'partition')
           AND (f->>'from' IS NULL OR d.failed_at >= (f->>'from')::timestamptz)
           AND (f->>'to' IS NULL OR d.failed_at <= (f->>'to')::timestamptz)
        UNION ALL
        SELECT true, t.id, t.failed_at
          FROM queen.timer_dead_letters t
         WHERE coalesce(f->>'consumerGroup', '__timer__') = '__timer__'
           AND (f->>'queue' IS NULL OR t.queue = f->>'queue')
           AND (f->>'partition' IS NULL OR t.partition = f->>'partition')
           AND (f->>'from' IS NULL OR t.failed_at >= (f->>'from')::timestamptz)
           AND (f->>'to' IS NULL OR t.failed_at <= (f->>'to')::timestamptz)
    ), page AS (
        SELECT * FROM hits ORDER BY failed_at DESC, is_timer, id DESC
         LIMIT v_limit OFFSET v_offset
    ), shown AS (
        SELECT h.failed_at, h.is_timer, h.id, jsonb_build_object(
                   'id', d.message_id, 'transactionId', m.transaction_id,
                   'partitionId', d.partition_id, 'queue', qu.name, 'partition', p.name,
                   'consumerGroup', d.consumer_group, 'errorMessage', d.error_message,
                   'retryCount', d.retry_count, 'producerSub', m.producer_sub,
                   'createdAt', queen.format_ts3(m.created_at),
                   'failedAt', queen.format_ts3(d.failed_at)) AS row,
               m.payload AS data, m.is_encrypted AS encrypted
          FROM page h
          JOIN queen.dead_letter_queue d ON d.id = h.id
          JOIN queen.messages m ON m.id = d.message_id
          JOIN queen.partitions p ON p.id = d.partition_id
          JOIN queen.queues qu ON qu.id = p.queue_id
         WHERE NOT h.is_timer
        UNION ALL
        SELECT h.failed_at, h.is_timer, h.id, jsonb_build_object(
                   'id', t.message_id, 'transactionId', t.txn, 'partitionId', p.id,
                   'queue', t.queue, 'partition', t.partition, 'consumerGroup', '__timer__',
                   'errorMessage', t.last_error, 'retryCount', t.attempts,
                   'producerSub', t.producer_sub,
                   'createdAt', queen.format_ts3(t.deliver_at),
                   'failedAt', queen.format_ts3(t.failed_at), 'timerKey', t.timer_key),
               queen.timer_dead_letter_data(t.payload, t.body), t.encrypted
          FROM page h
          JOIN queen.timer_dead_letters t ON t.id = h.id
          LEFT JOIN queen.queues qu ON qu.name = t.queue
          LEFT JOIN queen.partitions p ON p.queue_id = qu.id AND p.name = t.partition
         WHERE h.is_timer
    )
    SELECT (SELECT count(*) FROM hits),
           (SELECT coalesce(jsonb_agg(s.row || CASE WHEN queen.within_answer_budget(s.before)
                        THEN jsonb_build_object('data', s.data, 'isEncrypted', s.encrypted)
                        ELSE '{"data": null, "dataOmitted": true}' END
                                      ORDER BY s.failed_at DESC, s.is_timer, s.id DESC),
                            '[]'::jsonb)
              FROM (SELECT x.*, sum(octet_length(x.data::text)) OVER (
                               ORDER BY x.failed_at DESC, x.is_timer, x.id DESC
                               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before
                      FROM shown x) s)
      INTO v_total, v_rows;
    RETURN jsonb_build_object('messages', v_rows, 'total', v_total, 'limit', v_limit,
                              'offset', v_offset,
                              'pagination', jsonb_build_object('limit', v_limit, 'offset', v_offset));
END
$$;

-- p: {transactionId, partitionId, consumerGroup, traceNames[], eventType, data, workerId}.
-- Returns {traceId} or {notFound: true} when the message does not exist.
CREATE OR REPLACE FUNCTION queen.add_trace(p jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_message uuid;
    v_trace   uuid;
BEGIN
    -- KEY SHARE: a delete of the message under way is waited for (then: not found).
    SELECT id INTO v_message FROM queen.messages
     WHERE partition_id = (p->>'partitionId')::uuid AND transaction_id = p->>'transactionId'
       FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    INSERT INTO queen.message_traces (message_id, partition_id, transaction_id, consumer_group,
                                      event_type, data, trace_names, worker_id)
    VALUES (v_message, (p->>'partitionId')::uuid, p->>'transactionId',
            coalesce(p->>'consumerGroup', '__QUEUE_MODE__'), coalesce(p->>'eventType', 'info'),
            p->'data',
            -- each name once, in order, and no empty one (by-name could never reach it)
            ARRAY(SELECT n.name
                    FROM jsonb_array_elements_text(coalesce(p->'traceNames', '[]'::jsonb))
                         WITH ORDINALITY AS n(name, o)
                   WHERE n.name <> '' GROUP BY n.name ORDER BY min(n.o)),
            p->>'workerId')
    RETURNING id INTO v_trace;
    RETURN jsonb_build_object('traceId', v_trace);
END
$$;

-- A message's traces, oldest first; their data within queen.within_answer_budget.
CREATE OR REPLACE FUNCTION queen.list_traces(p_partition uuid, p_transaction text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('traces', coalesce(jsonb_agg(jsonb_build_object(
               'id', t.id, 'event_type', t.event_type,
               'data', CASE WHEN queen.within_answer_budget(t.before) THEN t.data END,
               'consumer_group', t.consumer_group, 'worker_id', t.worker_id,
               'created_at', queen.format_ts3(t.created_at),
               'trace_names', to_jsonb(t.trace_names))
               || CASE WHEN queen.within_answer_budget(t.before) THEN '{}'
                       ELSE '{"dataOmitted": true}' END::jsonb
               ORDER BY t.created_at, t.id), '[]'::jsonb))
      FROM (SELECT t.*, sum(octet_length(t.data::text)) OVER (
                       ORDER BY t.created_at, t.id
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before
              FROM queen.message_traces t
             WHERE t.partition_id = p_partition AND t.transaction_id = p_transaction) t
$$;

-- GET /api/v1/traces/names: every trace name with its events and messages, newest use first
-- (an event naming one name twice, or the empty name, as an earlier release stored them,
-- counts once, or not at all).
CREATE OR REPLACE FUNCTION queen.trace_names(p_limit integer, p_offset integer) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH names AS (
        SELECT n.name, count(DISTINCT t.id) AS traces, count(DISTINCT t.message_id) AS messages,
               max(t.created_at) AS last_seen
          FROM queen.message_traces t, unnest(t.trace_names) AS n(name)
         WHERE n.name <> ''
         GROUP BY n.name
    )
    SELECT jsonb_build_object(
        'trace_names', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'trace_name', p.name, 'trace_count', p.traces,
                       'message_count', p.messages, 'last_seen', queen.format_ts3(p.last_seen))
                     ORDER BY p.last_seen DESC, p.name)
              FROM (SELECT * FROM names ORDER BY last_seen DESC, name
                    LIMIT p_limit OFFSET p_offset) p), '[]'::jsonb),
        'total', (SELECT count(*) FROM names),
        'pagination', jsonb_build_object('limit', p_limit, 'offset', p_offset))
$$;

-- GET /api/v1/traces/by-name/{name}: the events carrying a name, oldest first, each with its
-- message (payload as stored: the engine decrypts; isEncrypted says whether it must). A row's
-- data and message_payload come within queen.within_answer_budget, counted together (one
-- big message traced many times used to repeat its payload in every row).
CREATE OR REPLACE FUNCTION queen.traces_by_name(p_name text, p_limit integer, p_offset integer)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'traces', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'id', x.id, 'event_type', x.event_type,
                       'consumer_group', x.consumer_group, 'worker_id', x.worker_id,
                       'created_at', queen.format_ts3(x.created_at),
                       'trace_names', to_jsonb(x.trace_names),
                       'transaction_id', x.transaction_id, 'partition_id', x.partition_id,
                       'queue_name', x.queue_name, 'partition_name', x.partition_name)
                     || CASE WHEN queen.within_answer_budget(x.before)
                             THEN jsonb_build_object('data', x.data,
                                                     'message_payload', x.payload,
                                                     'isEncrypted', x.is_encrypted)
                             ELSE '{"data": null, "message_payload": null,
                                    "dataOmitted": true}' END
                     ORDER BY x.created_at, x.id)
              FROM (SELECT t.*, qu.name AS queue_name, p.name AS partition_name, m.payload,
                           m.is_encrypted,
                           sum(coalesce(octet_length(t.data::text), 0)
                               + coalesce(octet_length(m.payload::text), 0))
                               OVER (ORDER BY t.created_at, t.id
                                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before
                      FROM (SELECT * FROM queen.message_traces
                             WHERE trace_names @> ARRAY[p_name]
                             ORDER BY created_at, id LIMIT p_limit OFFSET p_offset) t
                      JOIN queen.messages m ON m.id = t.message_id
                      JOIN queen.partitions p ON p.id = t.partition_id
                      JOIN queen.queues qu ON qu.id = p.queue_id) x), '[]'::jsonb),
        'total', (SELECT count(*) FROM queen.message_traces WHERE trace_names @> ARRAY[p_name]),
        'pagination', jsonb_build_object('limit', p_limit, 'offset', p_offset))
$$;
