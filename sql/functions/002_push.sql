-- Push: the one implementation behind POST /api/v1/push, transactions, the file-buffer replay
-- and the SQL-level API (push_messages_v2 / _v3, WIRE.md 9.2). Set-based: one call per batch.

-- A time-ordered UUID (version 7): the first 48 bits are the Unix time in ms of `ts`, the next
-- 12 its sub-millisecond fraction (RFC 9562 method 3), the rest random. random() (PostgreSQL's
-- per-backend generator, seeded from the strong source when the backend starts) is used
-- instead of gen_random_uuid(): its strong-random read per row was most of a push's id cost.
-- Ids need to be unique, not secret; 62 random bits per 1/4096 ms are plenty (each random()
-- call is used for at most 32 bits, well within its 53).
CREATE OR REPLACE FUNCTION queen.uuid_v7(ts timestamptz) RETURNS uuid
LANGUAGE sql VOLATILE AS $$
    SELECT (lpad(to_hex(floor(extract(epoch FROM ts) * 1000)::bigint), 12, '0')
            -- the sub-millisecond fraction (RFC 9562 method 3): ids of one push, whose
            -- timestamps step by a microsecond, sort in push order within a millisecond
            || '7' || lpad(to_hex(floor((extract(epoch FROM ts) * 1000
                                         - floor(extract(epoch FROM ts) * 1000)) * 4096)::int),
                           3, '0')
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

-- The items of a push with the partition each goes to, among the partitions push_store locked
-- (given as aligned arrays); idx is the item's position. One place for the rule that an item
-- without a partition goes to 'Default'. Plain SQL, so the planner inlines it.
CREATE OR REPLACE FUNCTION queen.push_items_placed(p_items jsonb, p_part_ids uuid[],
                                                   p_part_queues text[], p_part_names text[])
RETURNS TABLE (idx integer, e jsonb, partition_id uuid)
LANGUAGE sql STABLE AS $$
    SELECT (t.o - 1)::int, t.e, lp.id
      FROM jsonb_array_elements(p_items) WITH ORDINALITY AS t(e, o)
      JOIN unnest(p_part_ids, p_part_queues, p_part_names) AS lp(id, queue_name, name)
        ON lp.queue_name = t.e->>'queue' AND lp.name = coalesce(t.e->>'partition', 'Default')
$$;

-- A queue may not be created under a name holding a percent-escape such as %41. The official
-- clients put queue names into pop paths unencoded and the server decodes every path segment
-- (WIRE.md 1.2), so the pops of a queue "q%41" asked for "qA": it took pushes whose messages
-- no pop or consume could reach. Refused here, where every path creates queues (a push, a
-- transaction, configure, a timer's fire, a stream's sink), as bad input (class 22: the
-- server answers 400, a push fails that request's items with this reason). A queue named so
-- before keeps working: configure's upsert of an existing name passes. Partition names may
-- hold escapes: a queue's pops reach every partition, only a partition-addressed pop cannot.
CREATE OR REPLACE FUNCTION queen.refuse_unreachable_queue_name() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.name ~ '%[0-9A-Fa-f]{2}'
       AND NOT EXISTS (SELECT 1 FROM queen.queues WHERE name = NEW.name) THEN
        RAISE EXCEPTION 'Queue name % holds a percent-escape (%): clients put queue names '
                        'into pop paths unencoded and the server decodes them, so its '
                        'messages could not be popped', NEW.name,
                        substring(NEW.name FROM '%[0-9A-Fa-f]{2}')
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER queues_reachable_name
    BEFORE INSERT ON queen.queues
    FOR EACH ROW EXECUTE FUNCTION queen.refuse_unreachable_queue_name();

-- Creates the (queue, partition) pairs that do not exist yet (aligned arrays), and takes KEY
-- SHARE on their queues so none is deleted under the caller until it commits. False when a
-- queue went between its creation and that lock (deleted meanwhile): the caller goes again.
-- Shared by push_store and the timer sweep, which creates its targets before locking them.
CREATE OR REPLACE FUNCTION queen.create_partitions(p_queues text[], p_partitions text[])
RETURNS boolean
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_queue_names text[] := ARRAY(SELECT DISTINCT unnest(p_queues));
    v_locked      bigint;
BEGIN
    INSERT INTO queen.queues (name, namespace, task)
    SELECT q, queen.namespace_of(q), queen.task_of(q)
      FROM unnest(v_queue_names) AS s(q)
     WHERE NOT EXISTS (SELECT 1 FROM queen.queues x WHERE x.name = s.q)
    ON CONFLICT (name) DO NOTHING;
    PERFORM 1 FROM queen.queues qu
     WHERE qu.name = ANY(v_queue_names)
     ORDER BY qu.id FOR KEY SHARE;
    GET DIAGNOSTICS v_locked = ROW_COUNT;
    IF v_locked <> cardinality(v_queue_names) THEN
        RETURN false;
    END IF;
    -- A name cleaned up before numbers on from its old offsets (migration 12), and its stream
    -- state moves to the new id (migration 14).
    WITH made AS (
        INSERT INTO queen.partitions (queue_id, name, last_seq, first_seq)
        SELECT qu.id, w.p, coalesce(d.last_seq, 0), coalesce(d.last_seq, 0) + 1
          FROM unnest(p_queues, p_partitions) AS w(q, p)
          JOIN queen.queues qu ON qu.name = w.q
          LEFT JOIN queen.dropped_partitions d ON d.queue_id = qu.id AND d.name = w.p
         WHERE NOT EXISTS (SELECT 1 FROM queen.partitions x
                            WHERE x.queue_id = qu.id AND x.name = w.p)
        ON CONFLICT (queue_id, name) DO NOTHING
        RETURNING id, queue_id, name
    ), rekeyed AS (
        UPDATE queen_streams.state s SET partition_id = made.id
          FROM made JOIN queen.dropped_partitions d
                      ON d.queue_id = made.queue_id AND d.name = made.name
         WHERE s.partition_id = d.partition_id
    )
    DELETE FROM queen.dropped_partitions d USING made
     WHERE d.queue_id = made.queue_id AND d.name = made.name;
    RETURN true;
END
$$;

-- Items: [{queue, partition?, payload?, transactionId?, traceId?, producerSub?, isEncrypted?,
--          id?}] (camelCase keys, as the HTTP body; the server validates types before calling).
-- id: a message id minted before the push (a timer's, promised when it was scheduled; a
-- compressed frame's, minted by the client); the server never takes it from a request body.
-- Returns a compact answer the caller expands (the server in Python, push_messages_core below
-- in SQL), so PostgreSQL builds no object per item. Items are named by their index:
--   {"stored": [indexes stored], "ids": [their message ids, aligned],
--    "duplicates": [indexes answered duplicate], "duplicateIds": [the ids they answer with],
--    "refused": [indexes over maxSize], "maxSize": {queue: n} (with refusals),
--    "partitions": [[partition id, queue, partition] of every partition named],
--    "updated": [ids of the partitions that got messages]}
-- An item without transactionId gets a random one here; callers that must name it in their
-- answer (the server, push_messages_core) give every item its id first.
-- Generic plans: the statements' shapes do not depend on the values, and planning them anew
-- for each call cost a push of one item a quarter of its database time.
CREATE OR REPLACE FUNCTION queen.push_store(p_items jsonb) RETURNS json
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_pair_queues text[];
    v_pair_parts  text[];
    v_part_ids    uuid[];
    v_part_queues text[];
    v_part_names  text[];
    v_part_seqs   bigint[];
    v_last        timestamptz;
    v_base        timestamptz;
    v_wanted      bigint;
    v_found       bigint;
    v_locked      bigint;
    v_attempt     integer;
    v_capped      boolean;
    v_sealed      boolean;  -- a locked partition's queue encrypts
    v_refused     integer[] := '{}';
    v_stored_at   integer[];
    v_stored_ids  uuid[];
    v_stored_parts uuid[];
    v_move        record;
    v_dup_at      integer[] := '{}';
    v_dup_ids     uuid[] := '{}';
    v_updated     uuid[];
    v_answer      json;
BEGIN
    IF p_items IS NULL OR jsonb_array_length(p_items) = 0 THEN
        RETURN '{"stored": [], "ids": [], "duplicates": [], "duplicateIds": [], "refused": [],
                 "partitions": [], "updated": []}'::json;
    END IF;

    -- The (queue, partition) pairs, read from the items once.
    SELECT array_agg(q), array_agg(p) INTO v_pair_queues, v_pair_parts
      FROM (SELECT DISTINCT e->>'queue' AS q, coalesce(e->>'partition', 'Default') AS p
              FROM jsonb_array_elements(p_items) e) pairs;
    v_wanted := cardinality(v_pair_queues);
    -- Usually every partition exists already: then nothing is created and only the locks below
    -- are taken.
    SELECT count(*) INTO v_found
      FROM queen.partitions p JOIN queen.queues qu ON qu.id = p.queue_id
     WHERE (qu.name, p.name) IN (SELECT * FROM unnest(v_pair_queues, v_pair_parts));

    FOR v_attempt IN 1..5 LOOP
        -- A queue deleted or an idle partition cleaned up between the creation and the lock
        -- below would silently drop items: the lock counts, and we go again.
        IF v_found <> v_wanted OR v_attempt > 1 THEN
            IF NOT queen.create_partitions(v_pair_queues, v_pair_parts) THEN
                v_locked := 0;
                CONTINUE;
            END IF;
        END IF;

        -- Lock capacity-limited queues, then the partitions, always in id order (no deadlocks).
        -- Holding the partition lock to commit serialises pushes per partition: dedupe sees every
        -- committed message and order keys grow in commit order. The newest order key is read
        -- under the lock, so it is the last committed one.
        PERFORM 1 FROM queen.queues qu
         WHERE qu.max_size > 0 AND qu.name = ANY(v_pair_queues)
         ORDER BY qu.id FOR NO KEY UPDATE;
        v_capped := FOUND;
        SELECT count(*), array_agg(l.id), array_agg(l.queue_name), array_agg(l.name),
               max(l.last_message_at), array_agg(l.last_seq), bool_or(l.encryption_enabled)
          INTO v_locked, v_part_ids, v_part_queues, v_part_names, v_last, v_part_seqs, v_sealed
          FROM (SELECT p.id, qu.name AS queue_name, p.name, p.last_message_at, p.last_seq,
                       qu.encryption_enabled
                  FROM queen.partitions p JOIN queen.queues qu ON qu.id = p.queue_id
                 WHERE (qu.name, p.name) IN (SELECT * FROM unnest(v_pair_queues, v_pair_parts))
                 ORDER BY p.id FOR NO KEY UPDATE OF p) l;
        EXIT WHEN v_locked = v_wanted;
    END LOOP;
    IF v_locked IS DISTINCT FROM v_wanted THEN
        RAISE EXCEPTION 'push: % of % partitions could not be created and locked', v_locked, v_wanted;
    END IF;

    -- A payload in plaintext for a queue that encrypts: the server decided from a flag it
    -- read before a configure committed (another worker's cache, a peer not told yet).
    -- Nothing is stored; the server reads the flag again (QueueSettingsChanged).
    IF v_sealed THEN
        PERFORM 1 FROM queen.push_items_placed(p_items, v_part_ids, v_part_queues, v_part_names) i
          JOIN queen.queues qu ON qu.name = i.e->>'queue'
         WHERE qu.encryption_enabled AND NOT coalesce((i.e->>'isEncrypted')::boolean, false)
         LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'push: a payload in plaintext for a queue with encryptionEnabled'
                  USING ERRCODE = 'QE001';
        END IF;
    END IF;

    IF v_capped THEN
        v_refused := queen.push_refusals(p_items, v_part_ids, v_part_queues, v_part_names);
    END IF;

    -- Order keys: one base for the whole call, later than the newest message of every partition
    -- it locked, plus the item's position in microseconds, so array order is kept within each
    -- partition and every key is unique within the call (it names the item in RETURNING).
    v_base := greatest(clock_timestamp(), v_last + interval '1 microsecond');

    -- One statement. RETURNING names each stored item by its order key (base + its position).
    -- No CTE is joined to another: their row estimates are poor, and nested loops over them go
    -- quadratic.
    -- (The join is push_items_placed's, written out: through the function, although the
    -- planner inlines it, this statement measured 5-15 % slower in four A/B pairs.)
    -- seq: the item's position in its partition after the partition's last_seq (migration 4),
    -- whose offset is seq - 1 (migration 6). Offsets are dense: only stored messages keep a
    -- number. Every item is numbered here, duplicates included (probing for them first cost
    -- 10-15 % of a push of 100); when some turn out duplicates, the messages stored after
    -- them move down below.
    WITH placed AS (
        SELECT t.o - 1 AS idx, lp.id AS partition_id,
               lp.last_seq + row_number() OVER (PARTITION BY lp.id ORDER BY t.o) AS seq,
               CASE WHEN t.e ? 'payload' THEN t.e->'payload' ELSE '{}'::jsonb END AS payload,
               coalesce(nullif(t.e->>'transactionId', ''), gen_random_uuid()::text) AS txid,
               nullif(t.e->>'traceId', '')::uuid AS trace_id,
               nullif(t.e->>'producerSub', '') AS producer_sub,
               coalesce((t.e->>'isEncrypted')::boolean, false) AS is_encrypted,
               nullif(t.e->>'id', '')::uuid AS given_id
          FROM jsonb_array_elements(p_items) WITH ORDINALITY AS t(e, o)
          JOIN unnest(v_part_ids, v_part_queues, v_part_names, v_part_seqs)
               AS lp(id, queue_name, name, last_seq)
            ON lp.queue_name = t.e->>'queue' AND lp.name = coalesce(t.e->>'partition', 'Default')
         WHERE t.o - 1 <> ALL (v_refused)
    ), inserted AS (
        INSERT INTO queen.messages (id, partition_id, transaction_id, payload, trace_id,
                                    producer_sub, is_encrypted, created_at, seq)
        -- A given id some stored message already has (a client reusing the id of another
        -- message; a retry of the same message is a duplicate, not stored whatever id) would
        -- fail the whole call on the primary key: that message gets an id of ours instead,
        -- which its answer names.
        SELECT CASE WHEN pl.given_id IS NULL
                      OR EXISTS (SELECT 1 FROM queen.messages x WHERE x.id = pl.given_id)
                    THEN queen.uuid_v7(v_base + pl.idx * interval '1 microsecond')
                    ELSE pl.given_id END,
               pl.partition_id,
               pl.txid, pl.payload, pl.trace_id, pl.producer_sub, pl.is_encrypted,
               v_base + pl.idx * interval '1 microsecond', pl.seq
          FROM placed pl
         ORDER BY pl.idx  -- within one array the first occurrence of a transactionId wins
        ON CONFLICT (partition_id, transaction_id) DO NOTHING
        RETURNING id, partition_id, created_at
    ), newest AS (
        UPDATE queen.partitions p
           SET last_message_at = n.last_at,
               last_message_id = n.last_id,
               message_count = p.message_count + n.cnt,
               last_seq = p.last_seq + n.cnt,  -- dense: see the renumbering below
               last_write_at = now(),  -- the transaction's start: see queen.partitions_changed
               last_activity = clock_timestamp()
          FROM (SELECT ins.partition_id, max(ins.created_at) AS last_at, count(*) AS cnt,
                       (array_agg(ins.id ORDER BY ins.created_at DESC))[1] AS last_id
                  FROM inserted ins GROUP BY ins.partition_id) n
         WHERE p.id = n.partition_id
        RETURNING p.id
    )
    SELECT coalesce(array_agg((extract(epoch FROM ins.created_at - v_base) * 1000000)::int), '{}'),
           coalesce(array_agg(ins.id), '{}'),
           (SELECT coalesce(array_agg(n.id), '{}') FROM newest n),
           coalesce(array_agg(ins.partition_id), '{}')
      INTO v_stored_at, v_stored_ids, v_updated, v_stored_parts
      FROM inserted ins;

    -- The items neither stored nor refused are duplicates: they answer with the id of the
    -- message stored before, or earlier in this array (visible now to a new statement).
    IF cardinality(v_stored_at) + cardinality(v_refused) < jsonb_array_length(p_items) THEN
        SELECT coalesce(array_agg(d.idx), '{}'), coalesce(array_agg(m.id), '{}')
          INTO v_dup_at, v_dup_ids
          FROM queen.push_items_placed(p_items, v_part_ids, v_part_queues, v_part_names) d
          JOIN queen.messages m ON m.partition_id = d.partition_id
                               AND m.transaction_id = d.e->>'transactionId'
         WHERE d.idx <> ALL (v_refused) AND d.idx <> ALL (v_stored_at);
        -- Offsets stay dense: the messages stored after a duplicate's number move down, in
        -- ascending order, so each lands on a number already free (the index is unique).
        FOR v_move IN
            SELECT s.id, lp.last_seq + row_number() OVER (PARTITION BY s.pid ORDER BY s.idx) AS seq
              FROM unnest(v_stored_ids, v_stored_parts, v_stored_at) AS s(id, pid, idx)
              JOIN unnest(v_part_ids, v_part_seqs) AS lp(id, last_seq) ON lp.id = s.pid
             ORDER BY s.pid, s.idx
        LOOP
            UPDATE queen.messages SET seq = v_move.seq WHERE id = v_move.id AND seq <> v_move.seq;
        END LOOP;
    END IF;

    v_answer := json_build_object(
        'stored', to_json(v_stored_at), 'ids', to_json(v_stored_ids),
        'duplicates', to_json(v_dup_at), 'duplicateIds', to_json(v_dup_ids),
        'refused', to_json(v_refused),
        'partitions', (SELECT json_agg(json_build_array(lp.id, lp.queue_name, lp.name))
                         FROM unnest(v_part_ids, v_part_queues, v_part_names)
                              AS lp(id, queue_name, name)),
        'updated', to_json(v_updated),
        'maxSize', CASE WHEN cardinality(v_refused) > 0 THEN
                       (SELECT json_object_agg(qu.name, qu.max_size) FROM queen.queues qu
                         WHERE qu.name = ANY(v_pair_queues) AND qu.max_size > 0) END);

    -- Worker processes of one server wake each other's long polls (cluster/pg_wakeups.py).
    IF cardinality(v_updated) > 0 AND current_setting('queen.wakeup', true) = 'on' THEN
        PERFORM pg_notify('queen_wakeup', concat_ws(chr(10), lp.queue_name, lp.name,
                                                    current_setting('queen.worker', true)))
           FROM unnest(v_part_ids, v_part_queues, v_part_names) AS lp(id, queue_name, name)
          WHERE lp.id = ANY(v_updated);
    END IF;
    RETURN v_answer;
END
$$;

-- maxSize (WIRE.md 9.5): the indexes of the items a capacity-limited queue has no room for,
-- counting only the items that would be stored (not duplicates), in array order. The caller
-- holds the queue's lock, so the room cannot change until it commits.
CREATE OR REPLACE FUNCTION queen.push_refusals(p_items jsonb, p_part_ids uuid[],
                                               p_part_queues text[], p_part_names text[])
RETURNS integer[]
LANGUAGE sql STABLE AS $$
    WITH items AS (
        SELECT i.idx, i.partition_id, qu.id AS queue_id, qu.max_size,
               nullif(i.e->>'transactionId', '') AS txid
          FROM queen.push_items_placed(p_items, p_part_ids, p_part_queues, p_part_names) i
          JOIN queen.queues qu ON qu.name = i.e->>'queue'
         WHERE qu.max_size > 0
    ), fresh AS (
        SELECT i.*,
               i.txid IS NULL
               OR (row_number() OVER (PARTITION BY i.partition_id, i.txid ORDER BY i.idx) = 1
                   AND NOT EXISTS (SELECT 1 FROM queen.messages m
                                    WHERE m.partition_id = i.partition_id
                                      AND m.transaction_id = i.txid)) AS is_new
          FROM items i
    ), ranked AS (
        SELECT f.*, count(*) FILTER (WHERE f.is_new)
                        OVER (PARTITION BY f.queue_id ORDER BY f.idx) AS queue_rank
          FROM fresh f
    ), over AS (
        SELECT r.idx, r.partition_id, r.txid
          FROM ranked r
         WHERE r.is_new
           AND r.queue_rank > r.max_size - (SELECT coalesce(sum(p.message_count), 0)
                                              FROM queen.partitions p WHERE p.queue_id = r.queue_id)
    )
    -- a later repeat of a refused item is refused with it, never stored in its place
    SELECT coalesce(array_agg(f.idx ORDER BY f.idx), '{}')
      FROM fresh f
     WHERE f.idx IN (SELECT o.idx FROM over o)
        OR EXISTS (SELECT 1 FROM over o
                    WHERE o.partition_id = f.partition_id AND o.txid = f.txid)
$$;

-- The full per-item answer of WIRE.md 2.2 built from push_store's compact one, for the SQL
-- callers (transactions, the SQL-level API, message retry). Every item gets its transactionId
-- first, so the answer can name it.
-- Returns {"items": [per-item result, in input order], "partition_updates": [...]}.
CREATE OR REPLACE FUNCTION queen.push_messages_core(p_items jsonb) RETURNS json
LANGUAGE plpgsql AS $$
DECLARE
    v_items  jsonb;
    v_answer jsonb;
BEGIN
    SELECT coalesce(jsonb_agg(CASE WHEN coalesce(t.e->>'transactionId', '') = ''
                                   THEN t.e || jsonb_build_object('transactionId', gen_random_uuid()::text)
                                   ELSE t.e END ORDER BY t.o), '[]'::jsonb)
      INTO v_items
      FROM jsonb_array_elements(coalesce(p_items, '[]'::jsonb)) WITH ORDINALITY AS t(e, o);
    v_answer := queen.push_store(v_items)::jsonb;
    RETURN json_build_object(
        'items', (SELECT coalesce(json_agg(CASE
                     WHEN st.id IS NOT NULL THEN json_build_object(
                         'index', t.o - 1, 'status', 'queued', 'transaction_id', t.e->>'transactionId',
                         'message_id', st.id, 'partition_id', lp.id,
                         'trace_id', nullif(t.e->>'traceId', '')::uuid, 'queueName', t.e->>'queue')
                     WHEN du.id IS NOT NULL THEN json_build_object(
                         'index', t.o - 1, 'status', 'duplicate', 'transaction_id', t.e->>'transactionId',
                         'message_id', du.id, 'queueName', t.e->>'queue')
                     ELSE json_build_object(
                         'index', t.o - 1, 'status', 'failed', 'queue', t.e->>'queue',
                         'partition', lp.name, 'transaction_id', t.e->>'transactionId',
                         'error', format('Queue %s has reached its max capacity (%s messages)',
                                         t.e->>'queue', v_answer->'maxSize'->>(t.e->>'queue')))
                   END ORDER BY t.o), '[]'::json)
                    FROM jsonb_array_elements(v_items) WITH ORDINALITY AS t(e, o)
                    JOIN (SELECT (x->>0)::uuid AS id, x->>1 AS queue_name, x->>2 AS name
                            FROM jsonb_array_elements(v_answer->'partitions') x) lp
                      ON lp.queue_name = t.e->>'queue' AND lp.name = coalesce(t.e->>'partition', 'Default')
                    LEFT JOIN (SELECT i.value::int AS idx, m.value::uuid AS id
                                 FROM jsonb_array_elements_text(v_answer->'stored') WITH ORDINALITY i(value, o)
                                 JOIN jsonb_array_elements_text(v_answer->'ids') WITH ORDINALITY m(value, o)
                                   USING (o)) st ON st.idx = t.o - 1
                    LEFT JOIN (SELECT i.value::int AS idx, m.value::uuid AS id
                                 FROM jsonb_array_elements_text(v_answer->'duplicates') WITH ORDINALITY i(value, o)
                                 JOIN jsonb_array_elements_text(v_answer->'duplicateIds') WITH ORDINALITY m(value, o)
                                   USING (o)) du ON du.idx = t.o - 1),
        'partition_updates', (SELECT coalesce(json_agg(json_build_object(
                                  'queue', x->>1, 'partition', x->>2, 'partitionId', x->>0)), '[]'::json)
                                FROM jsonb_array_elements(v_answer->'partitions') x
                               WHERE v_answer->'updated' @> jsonb_build_array(x->>0)));
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
