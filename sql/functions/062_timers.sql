-- Timers (WIRE2.md 3): the batch schedule / reschedule / cancel, the reads, and the sweep that
-- fires due timers as messages. Table: migration 9. Python side: queen_tw/engine/timers.py.

-- Fires after this many failed attempts go to queen.timer_dead_letters (WIRE2 3.4).
CREATE OR REPLACE FUNCTION queen.timers_max_attempts() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 5 $$;

-- The class of the timers' advisory locks (the two-integer form keeps them apart from the
-- schema's other advisory locks): one lock per (queue, timerKey), see timers_schedule.
CREATE OR REPLACE FUNCTION queen.timers_lock_class() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 737020 $$;

-- One timer as peek (with its payload, base64) and list (without) answer it (WIRE2 3.3).
CREATE OR REPLACE FUNCTION queen.timer_view(t queen.timers, p_with_payload boolean)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
               'queue', t.queue, 'timerKey', t.timer_key, 'partition', t.partition,
               'deliverAt', queen.format_ts6(t.deliver_at), 'txn', t.txn,
               'messageId', t.message_id, 'payloadZstd', t.payload_zstd,
               'encrypted', t.encrypted, 'producerSub', t.producer_sub,
               'attempts', t.attempts, 'lastError', t.last_error,
               'claimed', t.claim_token IS NOT NULL AND t.claimed_until > clock_timestamp(),
               'createdAt', queen.format_ts6(t.created_at),
               'updatedAt', queen.format_ts6(t.updated_at))
           || CASE WHEN p_with_payload
                   THEN jsonb_build_object('payload', replace(encode(t.payload, 'base64'),
                                                              chr(10), ''))
                   ELSE '{}'::jsonb END
$$;

-- Takes the timer keys of p_items (ops as timers_schedule takes them; NULL: none) in lock-id
-- order, each by a transaction-level advisory lock, rows or no rows. Taking a key again in
-- the same transaction is free, so a fused transaction call takes every bundle's keys first
-- (run_transactions), then each bundle's timers_schedule takes them again.
CREATE OR REPLACE FUNCTION queen.timers_lock(p_items jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_lock integer;
BEGIN
    FOR v_lock IN
        SELECT DISTINCT hashtext((e->>'queue') || '/' || (e->>'timerKey'))
          FROM jsonb_array_elements(coalesce(p_items, '[]'::jsonb)) e
         ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(queen.timers_lock_class(), v_lock);
    END LOOP;
END
$$;

-- Schedule, reschedule (the same upsert) and cancel, in one call; results index-aligned
-- (WIRE2 3.1). p_items are ops the server validated and prepared (engine/timers.py):
--   {op, queue, timerKey, partition?, txn?, delayMs?, payload? (base64 of the bytes to keep),
--    payloadZstd?, body? (the decompressed JSON of a payloadZstd payload), encrypted?}
-- with each (queue, timerKey) at most once. p_producer_sub: the caller's token sub.
-- Callable inside another transaction (the timers rider of POST /api/v1/transaction).
-- Concurrency: each key is locked first by a transaction-level advisory lock, all of them in
-- lock-id order, before any row is touched (keys that have no row yet included), so two calls
-- naming the same keys in any order run one after the other and never deadlock; in a
-- transaction these come after the KV locks and before any queue or partition lock (WIRE2 5.3).
-- Sweepers never wait for them: they skip locked rows.
-- A row a sweeper has claimed (in flight, its claim not expired) is neither replaced nor
-- cancelled: too_late. The message id is minted here: the fired message will carry it.
CREATE OR REPLACE FUNCTION queen.timers_schedule(p_items jsonb, p_producer_sub text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_now     timestamptz;
    v_results jsonb;
BEGIN
    IF p_items IS NULL OR jsonb_array_length(p_items) = 0 THEN
        RETURN '[]'::jsonb;
    END IF;
    PERFORM queen.timers_lock(p_items);
    v_now := clock_timestamp();  -- after the wait: deliverAt counts from when it applies

    WITH ops AS (
        SELECT (x.o - 1)::int AS idx, x.e->>'op' AS op, x.e->>'queue' AS queue,
               x.e->>'timerKey' AS timer_key, x.e
          FROM jsonb_array_elements(p_items) WITH ORDINALITY AS x(e, o)
    ), existing AS (  -- rows there now (one a sweeper is firing right now included)
        SELECT ops.idx FROM ops
          JOIN queen.timers t ON t.queue = ops.queue AND t.timer_key = ops.timer_key
    ), upserted AS (
        INSERT INTO queen.timers AS t (queue, timer_key, partition, deliver_at, visible_at, txn,
                                       message_id, payload, payload_zstd, body, encrypted,
                                       producer_sub, created_at, updated_at)
        SELECT ops.queue, ops.timer_key, coalesce(ops.e->>'partition', 'Default'), d.at, d.at,
               ops.e->>'txn', queen.uuid_v7(v_now), decode(ops.e->>'payload', 'base64'),
               coalesce((ops.e->>'payloadZstd')::boolean, false), ops.e->'body',
               coalesce((ops.e->>'encrypted')::boolean, false), p_producer_sub, v_now, v_now
          FROM ops
         CROSS JOIN LATERAL (SELECT v_now + make_interval(
                                 secs => (ops.e->>'delayMs')::double precision / 1000) AS at) d
         WHERE ops.op IN ('schedule', 'reschedule')
        ON CONFLICT (queue, timer_key) DO UPDATE SET
               partition = excluded.partition, deliver_at = excluded.deliver_at,
               visible_at = excluded.visible_at, txn = excluded.txn,
               message_id = excluded.message_id, payload = excluded.payload,
               payload_zstd = excluded.payload_zstd, body = excluded.body,
               encrypted = excluded.encrypted, producer_sub = excluded.producer_sub,
               attempts = 0, last_error = NULL, claim_token = NULL, claimed_until = NULL,
               updated_at = excluded.updated_at
         WHERE t.claim_token IS NULL OR t.claimed_until <= v_now
        RETURNING t.queue, t.timer_key, t.txn, t.message_id, t.deliver_at,
                  (t.xmax = 0) AS inserted
    ), cancelled AS (
        DELETE FROM queen.timers t USING ops
         WHERE ops.op = 'cancel' AND t.queue = ops.queue AND t.timer_key = ops.timer_key
           AND (t.claim_token IS NULL OR t.claimed_until <= v_now)
        RETURNING t.queue, t.timer_key, t.txn
    )
    SELECT jsonb_agg(CASE
               WHEN u.timer_key IS NOT NULL THEN jsonb_build_object(
                   'ok', true, 'status', CASE WHEN u.inserted THEN 'scheduled'
                                              ELSE 'rescheduled' END,
                   'queue', ops.queue, 'timerKey', ops.timer_key, 'txn', u.txn,
                   'messageId', u.message_id, 'deliverAt', queen.format_ts6(u.deliver_at))
               WHEN c.timer_key IS NOT NULL THEN jsonb_build_object(
                   'ok', true, 'status', 'cancelled', 'queue', ops.queue,
                   'timerKey', ops.timer_key, 'txn', c.txn)
               WHEN ops.op = 'cancel' AND ops.idx NOT IN (SELECT idx FROM existing)
               THEN jsonb_build_object(
                   'ok', false, 'status', 'absent', 'queue', ops.queue,
                   'timerKey', ops.timer_key, 'txn', ops.e->'txn')
               ELSE jsonb_build_object(
                   'ok', false, 'status', 'too_late', 'queue', ops.queue,
                   'timerKey', ops.timer_key)
           END ORDER BY ops.idx)
      INTO v_results
      FROM ops
      LEFT JOIN upserted u ON u.queue = ops.queue AND u.timer_key = ops.timer_key
      LEFT JOIN cancelled c ON c.queue = ops.queue AND c.timer_key = ops.timer_key;
    RETURN v_results;
END
$$;

-- GET /api/v1/timers/{queue}/{key}: the row with its payload, or found: false.
CREATE OR REPLACE FUNCTION queen.timer_peek(p_queue text, p_key text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT jsonb_build_object('found', true) || queen.timer_view(t, true)
           FROM queen.timers t WHERE t.queue = p_queue AND t.timer_key = p_key),
        jsonb_build_object('found', false, 'queue', p_queue, 'timerKey', p_key))
$$;

-- GET /api/v1/timers/{queue}: a keyset page in timer_key byte order, after p_after (exclusive).
CREATE OR REPLACE FUNCTION queen.timers_list(p_queue text, p_after text, p_limit integer)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH page AS (
        SELECT t, t.timer_key, row_number() OVER (ORDER BY t.timer_key) AS n
          FROM queen.timers t
         WHERE t.queue = p_queue AND (p_after IS NULL OR t.timer_key > p_after)
         ORDER BY t.timer_key
         LIMIT p_limit + 1
    )
    SELECT jsonb_build_object(
        'rows', coalesce(jsonb_agg(queen.timer_view(p.t, false) ORDER BY p.n)
                         FILTER (WHERE p.n <= p_limit), '[]'::jsonb),
        'truncated', count(*) > p_limit,
        'nextAfter', CASE WHEN count(*) > p_limit
                          THEN max(p.timer_key) FILTER (WHERE p.n = p_limit) END)
      FROM page p
$$;

-- A failed fire of these rows (aligned arrays): attempts + 1, the error kept, the claim
-- dropped and the row hidden for a backoff of 1, 2, 4, 8 s; at the fifth failure the row
-- moves to queen.timer_dead_letters. Returns how many moved.
CREATE OR REPLACE FUNCTION queen.timers_failed(p_queues text[], p_keys text[],
                                               p_errors text[])
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_dead integer;
BEGIN
    UPDATE queen.timers t
       SET attempts = t.attempts + 1, last_error = f.error,
           visible_at = clock_timestamp() + power(2, t.attempts) * interval '1 second',
           claim_token = NULL, claimed_until = NULL, updated_at = clock_timestamp()
      FROM unnest(p_queues, p_keys, p_errors) AS f(queue, timer_key, error)
     WHERE t.queue = f.queue AND t.timer_key = f.timer_key;
    WITH dead AS (
        DELETE FROM queen.timers t USING unnest(p_queues, p_keys) AS f(queue, timer_key)
         WHERE t.queue = f.queue AND t.timer_key = f.timer_key
           AND t.attempts >= queen.timers_max_attempts()
        RETURNING t.*
    )
    INSERT INTO queen.timer_dead_letters (queue, timer_key, partition, deliver_at, txn,
                                          message_id, payload, payload_zstd, body, encrypted,
                                          producer_sub, attempts, last_error)
    SELECT queue, timer_key, partition, deliver_at, txn, message_id, payload, payload_zstd,
           body, encrypted, producer_sub, attempts, last_error
      FROM dead;
    GET DIAGNOSTICS v_dead = ROW_COUNT;
    RETURN v_dead;
END
$$;

-- Fires rows the caller holds locked (aligned arrays of their keys), in that order: one push
-- of their messages (id = the promised messageId, transactionId = txn, producerSub = the
-- scheduler's; queue and partition created if missing), and the rows delivered or deduped
-- (their txn is already in the partition: nothing pushed) are deleted, all in the caller's
-- transaction. A row the push refuses (maxSize) counts a failed attempt. p_bodies: what to
-- push instead of the stored payloads, aligned, [{payload, isEncrypted}] (the encryption
-- envelopes the server made for a queue that started encrypting after the timer was
-- scheduled); NULL = the stored ones.
-- Returns {fired, duplicates, failed, dead, updated: [[queue, partition], ...]}.
CREATE OR REPLACE FUNCTION queen.timers_fire(p_queues text[], p_keys text[], p_bodies jsonb)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_items   jsonb;
    v_queues  text[];
    v_keys    text[];
    v_answer  jsonb;
    v_refused integer[];
    v_dead    integer := 0;
BEGIN
    SELECT jsonb_agg(jsonb_build_object(
               'queue', t.queue, 'partition', t.partition,
               'payload', CASE WHEN p_bodies IS NOT NULL THEN p_bodies->(k.o::int - 1)->'payload'
                               ELSE coalesce(t.body, convert_from(t.payload, 'UTF8')::jsonb) END,
               'transactionId', t.txn, 'producerSub', t.producer_sub,
               'isEncrypted', CASE WHEN p_bodies IS NOT NULL
                                   THEN (p_bodies->(k.o::int - 1)->>'isEncrypted')::boolean
                                   ELSE t.encrypted END,
               'id', t.message_id) ORDER BY k.o),
           array_agg(t.queue ORDER BY k.o), array_agg(t.timer_key ORDER BY k.o)
      INTO v_items, v_queues, v_keys
      FROM unnest(p_queues, p_keys) WITH ORDINALITY AS k(queue, timer_key, o)
      JOIN queen.timers t ON t.queue = k.queue AND t.timer_key = k.timer_key;
    IF v_items IS NULL THEN
        RETURN '{"fired": 0, "duplicates": 0, "failed": 0, "dead": 0, "updated": []}'::jsonb;
    END IF;

    v_answer := queen.push_store(v_items)::jsonb;
    v_refused := ARRAY(SELECT x::int FROM jsonb_array_elements_text(v_answer->'refused') x);
    DELETE FROM queen.timers t
     USING unnest(v_queues, v_keys) WITH ORDINALITY AS k(queue, timer_key, o)
     WHERE t.queue = k.queue AND t.timer_key = k.timer_key AND (k.o - 1) <> ALL (v_refused);
    IF cardinality(v_refused) > 0 THEN
        v_dead := queen.timers_failed(
            ARRAY(SELECT v_queues[i + 1] FROM unnest(v_refused) i),
            ARRAY(SELECT v_keys[i + 1] FROM unnest(v_refused) i),
            ARRAY(SELECT format('Queue %s has reached its max capacity', v_queues[i + 1])
                    FROM unnest(v_refused) i));
    END IF;
    RETURN jsonb_build_object(
        'fired', jsonb_array_length(v_answer->'stored'),
        'duplicates', jsonb_array_length(v_answer->'duplicates'),
        'failed', cardinality(v_refused), 'dead', v_dead,
        'updated', (SELECT coalesce(jsonb_agg(jsonb_build_array(x->>1, x->>2)), '[]'::jsonb)
                      FROM jsonb_array_elements(v_answer->'partitions') x
                     WHERE v_answer->'updated' @> jsonb_build_array(x->>0)));
END
$$;

-- timers_fire one row at a time, each in its own subtransaction: the fallback when a batch
-- fails on a row it cannot push (a poisoned row must not hold back every other timer). A
-- row that fails counts a failed attempt with the error; transient errors (deadlock,
-- serialization, lock or statement timeout) are raised, and spend no attempt.
CREATE OR REPLACE FUNCTION queen.timers_fire_each(p_queues text[], p_keys text[])
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_total jsonb := '{"fired": 0, "duplicates": 0, "failed": 0, "dead": 0, "updated": []}';
    v_one   jsonb;
    v_error text;
BEGIN
    FOR i IN 1..coalesce(cardinality(p_queues), 0) LOOP
        BEGIN
            v_one := queen.timers_fire(p_queues[i:i], p_keys[i:i], NULL);
        EXCEPTION WHEN OTHERS THEN
            IF SQLSTATE LIKE '40%' OR SQLSTATE IN ('55P03', '57014', 'QE001') THEN
                RAISE;
            END IF;
            v_error := SQLERRM;
            v_one := jsonb_build_object(
                'fired', 0, 'duplicates', 0, 'failed', 1, 'updated', '[]'::jsonb,
                'dead', queen.timers_failed(p_queues[i:i], p_keys[i:i], ARRAY[v_error]));
        END;
        v_total := jsonb_build_object(
            'fired', (v_total->>'fired')::int + (v_one->>'fired')::int,
            'duplicates', (v_total->>'duplicates')::int + (v_one->>'duplicates')::int,
            'failed', (v_total->>'failed')::int + (v_one->>'failed')::int,
            'dead', (v_total->>'dead')::int + (v_one->>'dead')::int,
            'updated', (v_total->'updated') || (v_one->'updated'));
    END LOOP;
    RETURN v_total;
END
$$;

-- How long one sweep may wait, in all, for the partitions (and capacity-limited queues) of
-- the timers it fires: short of deadlock_timeout, so that a sweep waiting on a partition while
-- holding others gives up before a push waiting on one of those would be failed as a
-- deadlock; and short, since the pushes to the partitions it holds wait for it meanwhile.
CREATE OR REPLACE FUNCTION queen.timers_lock_budget() RETURNS interval
LANGUAGE sql STABLE AS $$
    SELECT least(interval '200 milliseconds', current_setting('deadlock_timeout')::interval / 2)
$$;

-- Locks what a push of timers to the (queue, partition) targets would lock (aligned arrays;
-- repeats allowed), without the head-of-line wait a plain push would make: a partition held
-- by a long transaction must not stall every other timer. Returns the targets it did not
-- lock (queue, partition) and, among them, the queues it could not lock (held_queues: every
-- partition of such a queue is held back, so the sweep leaves the whole queue); their timers
-- wait for a later sweep.
--
-- The targets that do not exist yet are created first (a fired timer re-creates its queue as
-- a push would; that may wait on a concurrent creation of the same one). Then every lock is
-- tried without waiting: each queue (FOR NO KEY UPDATE when capacity-limited, as push_store
-- takes it; FOR SHARE otherwise, so that no configuration change makes it capacity-limited,
-- and no delete removes it, before the fire), then each partition; and only the ones held by
-- others are waited for, in that order, until p_deadline (see timers_lock_budget): a
-- partition busy with pushes is had within milliseconds, one a transaction keeps is given
-- up. Each wait is bounded by the time left, never raised above the session's own
-- lock_timeout, and is a subtransaction: a call makes at most 15 (the creation included). Only
-- the ones that got their lock keep a subtransaction id; a sweep whose waits get more than
-- the 64 a backend caches costs other backends' visibility checks more, nothing else.
CREATE OR REPLACE FUNCTION queen.timers_lock_targets(p_queues text[], p_partitions text[],
                                                     p_deadline timestamptz,
                                                     OUT queue text[], OUT partition text[],
                                                     OUT held_queues text[])
LANGUAGE plpgsql AS $$
DECLARE
    v_queues  text[];
    v_parts   text[];
    v_missing record;
    v_capped  uuid[];
    v_plain   uuid[];
    v_ids     uuid[];
    v_got_q   uuid[];
    v_got_p   uuid[];
    v_wait    record;
    v_waits   integer := 0;
    v_saved   text := current_setting('lock_timeout');
BEGIN
    SELECT coalesce(array_agg(w.q), '{}'), coalesce(array_agg(w.p), '{}') INTO v_queues, v_parts
      FROM (SELECT DISTINCT q, p FROM unnest(p_queues, p_partitions) AS u(q, p)) w;
    SELECT array_agg(w.q) AS queues, array_agg(w.p) AS parts INTO v_missing
      FROM unnest(v_queues, v_parts) AS w(q, p)
     WHERE NOT EXISTS (SELECT 1 FROM queen.queues qu
                         JOIN queen.partitions pa ON pa.queue_id = qu.id AND pa.name = w.p
                        WHERE qu.name = w.q);
    IF v_missing.queues IS NOT NULL THEN
        -- (tried even when the budget is spent: an uncontended creation waits for nothing)
        PERFORM queen.timers_wait_setting(p_deadline, v_saved, 1);
        BEGIN
            PERFORM queen.create_partitions(v_missing.queues, v_missing.parts);
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- still missing: their timers wait
        END;
        PERFORM set_config('lock_timeout', v_saved, true);
        v_waits := 1;
    END IF;
    SELECT coalesce(array_agg(DISTINCT qu.id) FILTER (WHERE qu.max_size > 0), '{}'),
           coalesce(array_agg(DISTINCT qu.id) FILTER (WHERE qu.max_size <= 0), '{}'),
           coalesce(array_agg(pa.id), '{}')
      INTO v_capped, v_plain, v_ids
      FROM unnest(v_queues, v_parts) AS w(q, p)
      JOIN queen.queues qu ON qu.name = w.q
      JOIN queen.partitions pa ON pa.queue_id = qu.id AND pa.name = w.p;

    SELECT coalesce(array_agg(l.id), '{}') INTO v_got_q
      FROM (SELECT qu.id FROM queen.queues qu WHERE qu.id = ANY(v_capped)
             ORDER BY qu.id FOR NO KEY UPDATE SKIP LOCKED) l;
    SELECT v_got_q || coalesce(array_agg(l.id), '{}') INTO v_got_q
      FROM (SELECT qu.id FROM queen.queues qu WHERE qu.id = ANY(v_plain)
             ORDER BY qu.id FOR SHARE SKIP LOCKED) l;
    SELECT coalesce(array_agg(l.id), '{}') INTO v_got_p
      FROM (SELECT pa.id FROM queen.partitions pa WHERE pa.id = ANY(v_ids)
               AND pa.queue_id = ANY(v_got_q)
             ORDER BY pa.id FOR NO KEY UPDATE SKIP LOCKED) l;

    FOR v_wait IN
        SELECT 1 AS kind, x.id FROM unnest(v_capped) AS x(id) WHERE x.id <> ALL (v_got_q)
        UNION ALL
        SELECT 2, x.id FROM unnest(v_plain) AS x(id) WHERE x.id <> ALL (v_got_q)
        UNION ALL
        SELECT 3, x.id FROM unnest(v_ids) AS x(id) WHERE x.id <> ALL (v_got_p)
        ORDER BY 1, 2
    LOOP
        CONTINUE WHEN v_wait.kind = 3
                      AND NOT EXISTS (SELECT 1 FROM queen.partitions pa
                                       WHERE pa.id = v_wait.id AND pa.queue_id = ANY(v_got_q));
        EXIT WHEN v_waits >= 15 OR NOT queen.timers_wait_setting(p_deadline, v_saved, 0);
        v_waits := v_waits + 1;
        BEGIN
            IF v_wait.kind = 1 THEN
                PERFORM 1 FROM queen.queues WHERE id = v_wait.id FOR NO KEY UPDATE;
            ELSIF v_wait.kind = 2 THEN
                PERFORM 1 FROM queen.queues WHERE id = v_wait.id FOR SHARE;
            ELSE
                PERFORM 1 FROM queen.partitions WHERE id = v_wait.id FOR NO KEY UPDATE;
            END IF;
            IF FOUND AND v_wait.kind < 3 THEN
                v_got_q := v_got_q || v_wait.id;
            ELSIF FOUND THEN
                v_got_p := v_got_p || v_wait.id;
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- still held: its timers wait
        END;
    END LOOP;
    PERFORM set_config('lock_timeout', v_saved, true);
    -- A queue locked FOR SHARE that became capacity-limited before the lock (a configuration
    -- committed in between) would make push_store wait for the stronger lock: it is held.
    v_got_q := ARRAY(SELECT qu.id FROM queen.queues qu WHERE qu.id = ANY(v_got_q)
                        AND (qu.max_size <= 0 OR qu.id = ANY(v_capped)));

    SELECT coalesce(array_agg(w.q), '{}'), coalesce(array_agg(w.p), '{}') INTO queue, partition
      FROM unnest(v_queues, v_parts) AS w(q, p)
     WHERE NOT EXISTS (SELECT 1 FROM queen.queues qu
                         JOIN queen.partitions pa ON pa.queue_id = qu.id AND pa.name = w.p
                        WHERE qu.name = w.q AND pa.id = ANY(v_got_p)
                          AND qu.id = ANY(v_got_q));
    held_queues := ARRAY(SELECT qu.name FROM queen.queues qu
                          WHERE qu.id = ANY(v_capped || v_plain) AND qu.id <> ALL (v_got_q));
END
$$;

-- Sets lock_timeout to the time left until p_deadline, at least p_floor_ms, never above the
-- session's own (p_saved, 0 = none): false, and nothing set, when that leaves no time.
CREATE OR REPLACE FUNCTION queen.timers_wait_setting(p_deadline timestamptz, p_saved text,
                                                     p_floor_ms integer)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_left_ms bigint := greatest(ceil(extract(epoch FROM p_deadline - clock_timestamp()) * 1000),
                                 p_floor_ms);
    v_own_ms  double precision := extract(epoch FROM p_saved::interval) * 1000;
BEGIN
    IF v_left_ms < 1 THEN
        RETURN false;
    END IF;
    IF v_own_ms > 0 THEN
        v_left_ms := least(v_left_ms, ceil(v_own_ms)::bigint);
    END IF;
    PERFORM set_config('lock_timeout', v_left_ms::text, true);
    RETURN true;
END
$$;

-- One sweep: takes up to p_limit due rows (oldest visible first; rows another sweeper holds
-- are skipped) and fires them in this one transaction, except rows whose queue encrypts
-- while their payload is plain (the queue started encrypting after they were scheduled):
-- those are claimed for p_lease_ms under one token and returned with their JSON for the
-- server to encrypt (timers_fire_claimed); a claim that is not fired in time becomes due
-- again.
-- A partition's timers fire in order: of each partition the sweep takes only the due rows
-- before the first one it does not hold (one another sweeper holds goes first, with its
-- successors left for later). Rows whose partition or queue stays held by another
-- transaction (timers_lock_targets) are deferred: left due as they are, with every other
-- row of that partition or queue, and the sweep takes other rows in their place, in up to
-- eight rounds. The rows fire in the order they became due (claimed rows after the sweep,
-- when timers_fire_claimed pushes them: their place among their partition's is not kept).
-- Returns the fire's counts plus
--   claimed: {token, rows: [{queue, timerKey, body, bodyText}]} or null,
--   taken: rows taken (fired, failed, claimed, or left due past the claim's byte budget),
--   deferred: rows left for a held partition,
--   nextDueMs: ms until the next row is due (<= 0: due now; null: none).
CREATE OR REPLACE FUNCTION queen.timers_sweep(p_limit integer, p_lease_ms integer)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_now      timestamptz := clock_timestamp();
    v_deadline timestamptz := clock_timestamp() + queen.timers_lock_budget();
    v_queues   text[] := '{}';  -- the rows taken
    v_keys     text[] := '{}';
    v_plain    boolean[] := '{}';
    v_held_q   text[] := '{}';  -- the targets held by others: (queue, partition) ...
    v_held_p   text[] := '{}';
    v_held_qs  text[] := '{}';  -- ... and whole queues
    v_deferred integer := 0;
    v_round    record;
    v_held     record;
    v_fire_q   text[];
    v_fire_k   text[];
    v_fired    jsonb;
    v_token    uuid;
    v_claimed  jsonb;
    v_next     double precision;
BEGIN
    FOR v_round_no IN 1..8 LOOP
        WITH candidates AS (
            SELECT t.queue, t.timer_key, t.partition, t.visible_at,
                   coalesce(qu.encryption_enabled, false) AND NOT t.encrypted AS needs_key
              FROM queen.timers t LEFT JOIN queen.queues qu ON qu.name = t.queue
             WHERE t.visible_at <= v_now
               AND t.queue <> ALL (v_held_qs)
               AND (t.queue, t.partition) NOT IN (SELECT * FROM unnest(v_held_q, v_held_p))
               AND (t.queue, t.timer_key) NOT IN (SELECT * FROM unnest(v_queues, v_keys))
             ORDER BY t.visible_at, t.queue, t.timer_key
             LIMIT p_limit - cardinality(v_queues)
               FOR UPDATE OF t SKIP LOCKED
        ), firsts AS (  -- per partition, its first due row this sweep does not hold
            SELECT c.queue, c.partition, f.visible_at, f.timer_key
              FROM (SELECT DISTINCT queue, partition FROM candidates) c
              LEFT JOIN LATERAL (
                  SELECT e.visible_at, e.timer_key FROM queen.timers e
                   WHERE e.queue = c.queue AND e.partition = c.partition
                     AND e.visible_at <= v_now
                     AND (e.queue, e.timer_key) NOT IN (SELECT * FROM unnest(v_queues, v_keys))
                     AND (e.queue, e.timer_key) NOT IN (SELECT x.queue, x.timer_key
                                                          FROM candidates x)
                   ORDER BY e.visible_at, e.timer_key
                   LIMIT 1) f ON true
        )
        SELECT coalesce(array_agg(c.queue), '{}') AS queues,
               coalesce(array_agg(c.timer_key), '{}') AS keys,
               coalesce(array_agg(c.partition), '{}') AS parts,
               coalesce(array_agg(c.needs_key), '{}') AS plain
          INTO v_round
          FROM candidates c JOIN firsts f ON f.queue = c.queue AND f.partition = c.partition
         WHERE f.visible_at IS NULL
            OR (c.visible_at, c.timer_key) < (f.visible_at, f.timer_key);
        EXIT WHEN cardinality(v_round.queues) = 0;

        -- Only the rows fired here need their partitions; claimed ones are pushed later,
        -- but wait with the others of a held partition or queue.
        SELECT * INTO v_held
          FROM queen.timers_lock_targets(
                   ARRAY(SELECT r.q FROM unnest(v_round.queues, v_round.plain) AS r(q, n)
                          WHERE NOT r.n),
                   ARRAY(SELECT r.p FROM unnest(v_round.parts, v_round.plain) AS r(p, n)
                          WHERE NOT r.n),
                   v_deadline);
        v_held_q := v_held_q || v_held.queue;
        v_held_p := v_held_p || v_held.partition;
        v_held_qs := v_held_qs || v_held.held_queues;
        SELECT v_queues || coalesce(array_agg(r.q), '{}'),
               v_keys || coalesce(array_agg(r.k), '{}'),
               v_plain || coalesce(array_agg(r.n), '{}'),
               v_deferred + cardinality(v_round.queues) - count(*)
          INTO v_queues, v_keys, v_plain, v_deferred
          FROM unnest(v_round.queues, v_round.keys, v_round.parts, v_round.plain)
               AS r(q, k, p, n)
         WHERE (r.q, r.p) NOT IN (SELECT * FROM unnest(v_held.queue, v_held.partition))
           AND r.q <> ALL (v_held.held_queues);
        EXIT WHEN cardinality(v_held.queue) = 0 OR cardinality(v_queues) >= p_limit;
    END LOOP;

    SELECT coalesce(array_agg(t.queue ORDER BY t.visible_at, t.queue, t.timer_key), '{}'),
           coalesce(array_agg(t.timer_key ORDER BY t.visible_at, t.queue, t.timer_key), '{}')
      INTO v_fire_q, v_fire_k
      FROM unnest(v_queues, v_keys, v_plain) AS k(queue, timer_key, plain)
      JOIN queen.timers t ON t.queue = k.queue AND t.timer_key = k.timer_key
     WHERE NOT k.plain;
    BEGIN
        v_fired := queen.timers_fire(v_fire_q, v_fire_k, NULL);
    EXCEPTION WHEN OTHERS THEN
        IF SQLSTATE LIKE '40%' OR SQLSTATE IN ('55P03', '57014', 'QE001') THEN
            RAISE;
        END IF;
        v_fired := queen.timers_fire_each(v_fire_q, v_fire_k);
    END;

    IF cardinality(v_queues) > cardinality(v_fire_q) THEN
        v_token := gen_random_uuid();
        -- Their bodies go to the server in one answer: claimed within
        -- queen.within_answer_budget (005_admin.sql), the rest stays due for the next sweep.
        WITH budgeted AS (
            SELECT x.i FROM (
                -- (the body the answer carries twice, as body and bodyText: a zstd
                -- payload's is its expansion)
                SELECT i, 2 * sum(coalesce(octet_length(t.body::text), octet_length(t.payload)))
                              OVER (ORDER BY i ROWS BETWEEN UNBOUNDED PRECEDING
                                                        AND 1 PRECEDING) AS before
                  FROM generate_subscripts(v_queues, 1) i
                  JOIN queen.timers t ON t.queue = v_queues[i] AND t.timer_key = v_keys[i]
                 WHERE v_plain[i]) x
             WHERE queen.within_answer_budget(x.before)
        ), claimed AS (
            UPDATE queen.timers t
               SET claim_token = v_token,
                   claimed_until = v_now + p_lease_ms * interval '1 millisecond',
                   visible_at = v_now + p_lease_ms * interval '1 millisecond'
              FROM budgeted b
             WHERE t.queue = v_queues[b.i] AND t.timer_key = v_keys[b.i]
            RETURNING b.i, t.queue, t.timer_key,
                      coalesce(t.body, convert_from(t.payload, 'UTF8')::jsonb) AS body,
                      coalesce(t.body::text, convert_from(t.payload, 'UTF8')) AS body_text
        )
        -- bodyText: the JSON as text, which the server seals as it is (a parsed body lost
        -- the digits of numbers beyond a double's); body stays for the release before, and
        -- goes in the next one (then the byte budget above counts one copy again)
        SELECT jsonb_build_object('token', v_token, 'rows', jsonb_agg(jsonb_build_object(
                   'queue', c.queue, 'timerKey', c.timer_key, 'body', c.body,
                   'bodyText', c.body_text) ORDER BY c.i))
          INTO v_claimed
          FROM claimed c;
    END IF;

    SELECT extract(epoch FROM min(t.visible_at) - clock_timestamp()) * 1000
      INTO v_next
      FROM queen.timers t;
    RETURN v_fired || jsonb_build_object('claimed', v_claimed, 'taken', cardinality(v_queues),
                                         'deferred', v_deferred, 'nextDueMs', v_next);
END
$$;

-- Fires rows this server claimed in a sweep (p_token), with the payloads it made for them:
-- p_rows [{queue, timerKey, payload, isEncrypted}]. A row whose claim another sweeper has
-- taken over since (its claim expired) is left alone: that sweeper fires it. A row whose
-- partition stays held (timers_lock_targets) gives its claim up and is due again at once:
-- the next sweep claims it anew. Returns timers_fire's counts plus deferred.
CREATE OR REPLACE FUNCTION queen.timers_fire_claimed(p_token uuid, p_rows jsonb)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_queues text[];
    v_keys   text[];
    v_parts  text[];
    v_bodies jsonb;
    v_held   record;
    v_fire   record;
BEGIN
    SELECT coalesce(array_agg(l.queue ORDER BY l.o), '{}'),
           coalesce(array_agg(l.timer_key ORDER BY l.o), '{}'),
           coalesce(array_agg(l.partition ORDER BY l.o), '{}')
      INTO v_queues, v_keys, v_parts
      FROM (SELECT t.queue, t.timer_key, t.partition, r.o
              FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS r(e, o)
              JOIN queen.timers t ON t.queue = r.e->>'queue' AND t.timer_key = r.e->>'timerKey'
             WHERE t.claim_token = p_token
             ORDER BY t.queue, t.timer_key
               FOR UPDATE OF t) l;
    SELECT * INTO v_held
      FROM queen.timers_lock_targets(v_queues, v_parts,
                                     clock_timestamp() + queen.timers_lock_budget());
    UPDATE queen.timers t
       SET claim_token = NULL, claimed_until = NULL,
           visible_at = least(t.deliver_at, clock_timestamp())
      FROM unnest(v_queues, v_keys, v_parts) AS k(queue, timer_key, partition)
     WHERE t.queue = k.queue AND t.timer_key = k.timer_key
       AND (k.queue, k.partition) IN (SELECT * FROM unnest(v_held.queue, v_held.partition));
    SELECT coalesce(array_agg(k.queue ORDER BY k.o), '{}') AS queues,
           coalesce(array_agg(k.timer_key ORDER BY k.o), '{}') AS keys,
           coalesce(jsonb_agg(p_rows->(r.o::int - 1) ORDER BY k.o), '[]'::jsonb) AS bodies,
           count(*) AS n
      INTO v_fire
      FROM unnest(v_queues, v_keys, v_parts) WITH ORDINALITY AS k(queue, timer_key, partition, o)
      JOIN jsonb_array_elements(p_rows) WITH ORDINALITY AS r(e, o)
        ON r.e->>'queue' = k.queue AND r.e->>'timerKey' = k.timer_key
     WHERE (k.queue, k.partition) NOT IN (SELECT * FROM unnest(v_held.queue, v_held.partition));
    RETURN queen.timers_fire(v_fire.queues, v_fire.keys, v_fire.bodies)
           || jsonb_build_object('deferred', cardinality(v_queues) - v_fire.n);
END
$$;

-- A claimed fire the server could not prepare (no key for an encrypted queue): a failed
-- attempt for each row of p_rows [{queue, timerKey}] still under this claim. Servers before
-- session 19 call it; later ones give such rows back (timers_release_claimed).
CREATE OR REPLACE FUNCTION queen.timers_fail_claimed(p_token uuid, p_rows jsonb,
                                                     p_error text)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_queues text[];
    v_keys   text[];
BEGIN
    SELECT coalesce(array_agg(l.queue), '{}'), coalesce(array_agg(l.timer_key), '{}')
      INTO v_queues, v_keys
      FROM (SELECT t.queue, t.timer_key
              FROM jsonb_array_elements(p_rows) AS r(e)
              JOIN queen.timers t ON t.queue = r.e->>'queue' AND t.timer_key = r.e->>'timerKey'
             WHERE t.claim_token = p_token
             ORDER BY t.queue, t.timer_key
               FOR UPDATE OF t) l;
    RETURN queen.timers_failed(v_queues, v_keys,
                               array_fill(p_error, ARRAY[cardinality(v_queues)]));
END
$$;

-- A claimed fire a server without QUEEN_ENCRYPTION_KEY cannot prepare (an instance started
-- without the key among keyed ones): the rows of p_rows [{queue, timerKey}] still under
-- this claim are given back, due again p_delay_ms on, with p_error as their lastError and no
-- attempt spent, for a server with the key to fire, as the file buffer holds sealed records
-- until such a server replays them. Failing them instead dead-lettered them after five
-- sweeps of the keyless instance. Returns the rows given back.
CREATE OR REPLACE FUNCTION queen.timers_release_claimed(p_token uuid, p_rows jsonb,
                                                        p_error text, p_delay_ms integer)
RETURNS integer
LANGUAGE sql AS $$
    WITH released AS (
        UPDATE queen.timers t
           SET claim_token = NULL, claimed_until = NULL, last_error = p_error,
               visible_at = clock_timestamp() + p_delay_ms * interval '1 millisecond'
          FROM jsonb_array_elements(p_rows) AS r(e)
         WHERE t.queue = r.e->>'queue' AND t.timer_key = r.e->>'timerKey'
           AND t.claim_token = p_token
        RETURNING 1)
    SELECT count(*)::integer FROM released
$$;

-- Dead timers (queen.timer_dead_letters) as the dead-letter routes show and handle them:
-- GET /api/v1/dlq lists them (queen.dlq_list), and the message routes that retry or delete
-- a dead letter by (partitionId, transactionId) reach them when no message has that key.

-- The JSON a dead timer would have delivered: its decompressed body, or its payload's text (an
-- encryption envelope when encrypted). A payload that is no JSON text (the very reason some
-- timers die) is shown as a JSON string of its base64, so a listing never fails on it.
CREATE OR REPLACE FUNCTION queen.timer_dead_letter_data(p_payload bytea, p_body jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_body IS NOT NULL THEN
        RETURN p_body;
    END IF;
    BEGIN
        RETURN convert_from(p_payload, 'UTF8')::jsonb;
    EXCEPTION WHEN invalid_text_representation OR character_not_in_repertoire THEN
        RETURN to_jsonb(replace(encode(p_payload, 'base64'), chr(10), ''));
    END;
END
$$;

-- POST /api/v1/messages/{p}/{t}/retry of a dead timer (the partition's queue and name, and
-- the txn it promised): the newest such dead letter is scheduled again, due now, with no
-- attempt spent and its promised message id, and every dead letter of that message is
-- forgotten. The key is locked as timers_schedule locks it; a key scheduled again since the
-- timer died is left as it is: {conflict: true, timerKey}. {notFound: true} when none.
CREATE OR REPLACE FUNCTION queen.timer_dead_letter_retry(p_partition uuid, p_txn text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_dead queen.timer_dead_letters;
    v_now  timestamptz;
BEGIN
    SELECT t.* INTO v_dead
      FROM queen.partitions p
      JOIN queen.queues qu ON qu.id = p.queue_id
      JOIN queen.timer_dead_letters t ON t.queue = qu.name AND t.partition = p.name
     WHERE p.id = p_partition AND t.txn = p_txn
     ORDER BY t.failed_at DESC, t.id DESC
     LIMIT 1
       FOR UPDATE OF t;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    PERFORM pg_advisory_xact_lock(queen.timers_lock_class(),
                                  hashtext(v_dead.queue || '/' || v_dead.timer_key));
    v_now := clock_timestamp();
    INSERT INTO queen.timers (queue, timer_key, partition, deliver_at, visible_at, txn,
                              message_id, payload, payload_zstd, body, encrypted, producer_sub,
                              created_at, updated_at)
    VALUES (v_dead.queue, v_dead.timer_key, v_dead.partition, v_now, v_now, v_dead.txn,
            v_dead.message_id, v_dead.payload, v_dead.payload_zstd, v_dead.body,
            v_dead.encrypted, v_dead.producer_sub, v_now, v_now)
    ON CONFLICT (queue, timer_key) DO NOTHING;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('conflict', true, 'timerKey', v_dead.timer_key);
    END IF;
    DELETE FROM queen.timer_dead_letters t
     WHERE t.queue = v_dead.queue AND t.partition = v_dead.partition AND t.txn = p_txn;
    RETURN jsonb_build_object('success', true, 'messageId', v_dead.message_id,
                              'transactionId', p_txn, 'timerKey', v_dead.timer_key,
                              'deliverAt', queen.format_ts6(v_now));
END
$$;

-- DELETE /api/v1/messages/{p}/{t} of a dead timer: every dead letter of that message goes.
CREATE OR REPLACE FUNCTION queen.timer_dead_letter_delete(p_partition uuid, p_txn text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM queen.timer_dead_letters t
     USING queen.partitions p JOIN queen.queues qu ON qu.id = p.queue_id
     WHERE p.id = p_partition AND t.queue = qu.name AND t.partition = p.name
       AND t.txn = p_txn;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    RETURN jsonb_build_object('success', true, 'partitionId', p_partition,
                              'transactionId', p_txn, 'message', 'Timer dead letter deleted');
END
$$;
