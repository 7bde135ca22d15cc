-- Push: the one implementation behind POST /api/v1/push, transactions, the file-buffer replay
-- and the SQL-level API (push_messages_v2 / _v3, WIRE.md 9.2). Set-based: one call per batch.

-- A time-ordered UUID (version 7) whose first 48 bits are the Unix time in ms of `ts`, the rest
-- random. random() (PostgreSQL's per-backend generator, seeded from the strong source when the
-- backend starts) is used instead of gen_random_uuid(): its strong-random read per row was most
-- of a push's id cost. Ids need to be unique, not secret; 74 random bits per millisecond are
-- (each random() call is used for at most 32 bits, well within its 53).
CREATE OR REPLACE FUNCTION queen.uuid_v7(ts timestamptz) RETURNS uuid
LANGUAGE sql VOLATILE AS $$
    SELECT (lpad(to_hex(floor(extract(epoch FROM ts) * 1000)::bigint), 12, '0')
            || '7' || lpad(to_hex(floor(random() * 4096)::int), 3, '0')
            || to_hex(8 + floor(random() * 4)::int)  -- RFC 9562 variant
            || lpad(to_hex(floor(random() * 268435456)::int), 7, '0')
            || lpad(to_hex(floor(random() * 4294967296)::bigint), 8, '0'))::uuid
$$;

-- "a.b" is namespace a, task b (as upstream); undotted names get no namespace.
CREATE OR REPLACE FUNCTION queen.namespace_of(queue_name text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN position('.' IN queue_name) > 0 THEN split_part(queue_name, '.', 1) ELSE '' END
$$;

CREATE OR REPLACE FUNCTION queen.task_of(queue_name text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN position('.' IN queue_name) > 0 THEN split_part(queue_name, '.', 2) ELSE '' END
$$;

-- Keeps partitions.message_count true whatever deletes messages (retention, explicit delete,
-- clear), so maxSize never needs a count(*).
CREATE OR REPLACE FUNCTION queen.on_messages_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE queen.partitions p
       SET message_count = greatest(p.message_count - gone.n, 0)
      FROM (SELECT partition_id, count(*) AS n FROM deleted_rows GROUP BY partition_id) gone
     WHERE p.id = gone.partition_id;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER messages_deleted_count
    AFTER DELETE ON queen.messages
    REFERENCING OLD TABLE AS deleted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queen.on_messages_deleted();

DROP FUNCTION IF EXISTS queen.push_messages_core(jsonb);  -- its answer type changed (jsonb -> json)

-- Items: [{queue, partition?, payload?, transactionId?, traceId?, producerSub?, isEncrypted?}]
-- (camelCase keys, as the HTTP body; the server validates types before calling).
-- Returns {"items": [per-item result, in input order], "partition_updates": [...]}, built as
-- json (text appended once; jsonb would be built, then re-walked to print it).
CREATE OR REPLACE FUNCTION queen.push_messages_core(p_items jsonb) RETURNS json
LANGUAGE plpgsql AS $$
DECLARE
    v_now     timestamptz;
    v_results json;
    v_updates json;
    v_pair_queues text[];
    v_pair_parts  text[];
    v_queue_names text[];
    v_wanted  bigint;
    v_queues  bigint;
    v_locked  bigint;
    v_attempt integer;
BEGIN
    IF p_items IS NULL OR jsonb_array_length(p_items) = 0 THEN
        RETURN json_build_object('items', '[]'::json, 'partition_updates', '[]'::json);
    END IF;

    -- The (queue, partition) pairs, read from the items once.
    SELECT array_agg(q), array_agg(p) INTO v_pair_queues, v_pair_parts
      FROM (SELECT DISTINCT e->>'queue' AS q, coalesce(e->>'partition', 'Default') AS p
              FROM jsonb_array_elements(p_items) e) pairs;
    v_queue_names := ARRAY(SELECT DISTINCT unnest(v_pair_queues));
    v_wanted := cardinality(v_pair_queues);
    v_queues := cardinality(v_queue_names);
    -- Create what is missing, then lock. A queue deleted or an idle partition cleaned up
    -- between the two steps would silently drop items, so count what was locked and go
    -- again when something vanished.
    FOR v_attempt IN 1..5 LOOP
        INSERT INTO queen.queues (name, namespace, task)
        SELECT q, queen.namespace_of(q), queen.task_of(q)
          FROM unnest(v_queue_names) AS s(q)
         WHERE NOT EXISTS (SELECT 1 FROM queen.queues x WHERE x.name = s.q)
        ON CONFLICT (name) DO NOTHING;

        -- KEY SHARE keeps the queues from being deleted under us until commit.
        PERFORM 1 FROM queen.queues qu
         WHERE qu.name = ANY(v_queue_names)
         ORDER BY qu.id FOR KEY SHARE;
        GET DIAGNOSTICS v_locked = ROW_COUNT;
        CONTINUE WHEN v_locked <> v_queues;

        INSERT INTO queen.partitions (queue_id, name)
        SELECT qu.id, w.p
          FROM unnest(v_pair_queues, v_pair_parts) AS w(q, p)
          JOIN queen.queues qu ON qu.name = w.q
         WHERE NOT EXISTS (SELECT 1 FROM queen.partitions x
                            WHERE x.queue_id = qu.id AND x.name = w.p)
        ON CONFLICT (queue_id, name) DO NOTHING;

        -- Lock capacity-limited queues, then the partitions, always in id order (no deadlocks).
        -- Holding the partition lock to commit serialises pushes per partition: dedupe sees every
        -- committed message and order keys grow in commit order.
        PERFORM 1 FROM queen.queues qu
         WHERE qu.max_size > 0 AND qu.name = ANY(v_queue_names)
         ORDER BY qu.id FOR NO KEY UPDATE;
        PERFORM 1 FROM queen.partitions p
          JOIN queen.queues qu ON qu.id = p.queue_id
         WHERE (qu.name, p.name) IN (SELECT w.q, w.p
                                       FROM unnest(v_pair_queues, v_pair_parts) AS w(q, p))
         ORDER BY p.id FOR NO KEY UPDATE OF p;
        GET DIAGNOSTICS v_locked = ROW_COUNT;
        EXIT WHEN v_locked = v_wanted;
    END LOOP;
    IF v_locked IS DISTINCT FROM v_wanted THEN
        RAISE EXCEPTION 'push: % of % partitions could not be created and locked', v_locked, v_wanted;
    END IF;

    v_now := clock_timestamp();

    -- One pass, no joins between CTEs (their row estimates are poor and nested loops over
    -- them go quadratic): each item row carries everything its answer needs, computed with
    -- window functions in array order.
    WITH items AS (
        SELECT (t.o - 1)::int AS idx,
               t.e->>'queue' AS queue_name,
               coalesce(t.e->>'partition', 'Default') AS partition_name,
               CASE WHEN t.e ? 'payload' THEN t.e->'payload' ELSE '{}'::jsonb END AS payload,
               coalesce(nullif(t.e->>'transactionId', ''), gen_random_uuid()::text) AS txid,
               nullif(t.e->>'traceId', '')::uuid AS trace_id,
               nullif(t.e->>'producerSub', '') AS producer_sub,
               coalesce((t.e->>'isEncrypted')::boolean, false) AS is_encrypted
          FROM jsonb_array_elements(p_items) WITH ORDINALITY AS t(e, o)
    ), resolved AS (
        SELECT i.*, p.id AS partition_id, qu.id AS queue_id, qu.max_size, p.last_message_at,
               (SELECT m.id FROM queen.messages m
                 WHERE m.partition_id = p.id AND m.transaction_id = i.txid) AS existing_id,
               row_number() OVER (PARTITION BY p.id, i.txid ORDER BY i.idx) = 1 AS is_first
          FROM items i
          JOIN queen.queues qu ON qu.name = i.queue_name
          JOIN queen.partitions p ON p.queue_id = qu.id AND p.name = i.partition_name
    ), room AS (
        SELECT qu.id AS queue_id,
               qu.max_size - coalesce((SELECT sum(p.message_count) FROM queen.partitions p
                                        WHERE p.queue_id = qu.id), 0) AS free
          FROM queen.queues qu
         WHERE qu.max_size > 0 AND qu.id IN (SELECT queue_id FROM resolved)
    ), ranked AS (
        SELECT r.*,
               r.existing_id IS NULL AND r.is_first AS wants_insert,
               count(*) FILTER (WHERE r.existing_id IS NULL AND r.is_first)
                   OVER (PARTITION BY r.queue_id ORDER BY r.idx) AS queue_rank
          FROM resolved r
    ), planned AS (
        SELECT k.*,
               k.wants_insert AND (k.max_size = 0 OR k.queue_rank <=
                   (SELECT free FROM room WHERE room.queue_id = k.queue_id)) AS is_new
          FROM ranked k
    ), stamped AS (
        SELECT x.*,
               CASE WHEN x.is_new THEN queen.uuid_v7(x.created_at) END AS new_id
          FROM (SELECT pl.*,
                       greatest(v_now, coalesce(pl.last_message_at, '-infinity') + interval '1 microsecond')
                       + (count(*) FILTER (WHERE pl.is_new)
                              OVER (PARTITION BY pl.partition_id ORDER BY pl.idx) - 1)
                         * interval '1 microsecond' AS created_at
                  FROM planned pl) x
    ), answered AS (
        SELECT st.*,
               coalesce(st.existing_id,
                        first_value(st.new_id) OVER (PARTITION BY st.partition_id, st.txid
                                                     ORDER BY st.idx)) AS message_id
          FROM stamped st
    ), inserted AS (
        INSERT INTO queen.messages (id, partition_id, transaction_id, payload, trace_id,
                                    producer_sub, is_encrypted, created_at)
        SELECT a.new_id, a.partition_id, a.txid, a.payload, a.trace_id, a.producer_sub,
               a.is_encrypted, a.created_at
          FROM answered a
         WHERE a.is_new
    ), newest AS (
        UPDATE queen.partitions p
           SET last_message_at = n.created_at,
               last_message_id = n.new_id,
               message_count = p.message_count + n.cnt,
               last_activity = v_now
          FROM (SELECT DISTINCT ON (partition_id) partition_id, created_at, new_id,
                       count(*) OVER (PARTITION BY partition_id) AS cnt
                  FROM answered
                 WHERE is_new
                 ORDER BY partition_id, created_at DESC) n
         WHERE p.id = n.partition_id
        RETURNING p.id, p.name, p.queue_id
    )
    SELECT (SELECT json_agg(CASE
                 WHEN a.is_new THEN json_build_object(
                     'index', a.idx, 'status', 'queued', 'transaction_id', a.txid,
                     'message_id', a.message_id, 'partition_id', a.partition_id,
                     'trace_id', a.trace_id, 'queueName', a.queue_name)
                 WHEN a.message_id IS NOT NULL THEN json_build_object(
                     'index', a.idx, 'status', 'duplicate', 'transaction_id', a.txid,
                     'message_id', a.message_id, 'queueName', a.queue_name)
                 ELSE json_build_object(
                     'index', a.idx, 'status', 'failed', 'queue', a.queue_name,
                     'partition', a.partition_name, 'transaction_id', a.txid,
                     'error', format('Queue %s has reached its max capacity (%s messages)',
                                     a.queue_name, a.max_size))
               END ORDER BY a.idx) FROM answered a),
           (SELECT coalesce(json_agg(json_build_object(
                       'queue', qu.name, 'partition', n.name, 'partitionId', n.id)), '[]'::json)
              FROM newest n JOIN queen.queues qu ON qu.id = n.queue_id)
      INTO v_results, v_updates;

    -- Worker processes of one server wake each other's long polls (cluster/pg_wakeups.py).
    IF current_setting('queen.wakeup', true) = 'on' THEN
        PERFORM pg_notify('queen_wakeup', concat_ws(chr(10), u->>'queue', u->>'partition',
                                                    current_setting('application_name')))
           FROM json_array_elements(v_updates) u;
    END IF;

    RETURN json_build_object('items', v_results, 'partition_updates', v_updates);
END
$$;

-- SQL-level API (WIRE.md 7.2, 9.2): producers may enqueue inside their own transaction.
CREATE OR REPLACE FUNCTION queen.push_messages_v2(p_items jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT queen.push_messages_core(p_items)::jsonb->'items'
$$;

CREATE OR REPLACE FUNCTION queen.push_messages_v3(p_items jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT queen.push_messages_core(p_items)::jsonb
$$;
