-- Ack and lease extension (WIRE.md 2.0, 2.4, 2.6).

-- Items: [{index, transactionId, partitionId, status, consumerGroup, leaseId, error, req}].
-- ``req`` numbers the HTTP request an item came from when the server fuses several requests
-- into one call: each request is applied on its own, in req order, exactly as if it had been
-- sent alone. Items of one (partition, group) apply in message order. A failed delivery counts
-- once per request however many messages it lists; completions after the first failure in a
-- request are ignored so the failed message is never skipped; exhaustion sends every failed
-- message of the request to the dead-letter table.
--
-- Returns {settled, results}. The common case, every item of a (req, partition, group)
-- completing a message of the live delivery, is settled as a whole: one range read checks the
-- items and the cursor jumps to the last one. Such a key comes back once in ``settled``
-- ({req, partitionId, consumerGroup, queueName, partitionName, leaseReleased}; each of its
-- items succeeded) instead of as one result per item, which cost more to build and to parse
-- than the ack itself. Every other item has its own entry in ``results``: {pos (0-based
-- input position), result: {index, transactionId, success, error, queueName, partitionName,
-- dlq, leaseReleased}}. queen.ack_messages expands both into one result per item.
-- Generic plans, as pop_request's (003_pop.sql): re-planning the range reads at every call
-- cost more than the part-of-a-delivery check's unhashed `= ANY` costs without a custom plan.
CREATE OR REPLACE FUNCTION queen.ack_core(p_items jsonb) RETURNS json
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_key       record;
    v_it        record;
    v_pc        queen.partition_consumers%ROWTYPE;  -- typed: read before any row is found
    v_cfg       record;
    -- By input position + 1, sized up front: a first assignment into an empty array sets
    -- its lower bound (a key settled whole writes nothing here), which shifted every
    -- position read back by ordinality.
    v_results   jsonb[] := array_fill(NULL::jsonb, ARRAY[jsonb_array_length(p_items)]);
    v_failure   text;      -- NULL, 'retry' or 'exhausted': what this request did to the delivery
    v_error     text;
    v_dlq       boolean;
    v_released  boolean;
    v_cursor_at timestamptz;
    v_cursor_id uuid;
    v_found     boolean;
    v_group_pos integer[];
    v_pos       integer;
    v_n         integer;
    v_last_at   timestamptz;
    v_last_id   uuid;
    v_settled   json[] := '{}';
    v_whole     boolean;  -- the items are exactly the delivery's unacked messages
    v_held      uuid;     -- the lease this request found: its items are checked against it
    v_made      boolean;  -- this request made the group's row: removed again if unused
BEGIN
    FOR v_key IN
        SELECT coalesce((e->>'req')::int, 0) AS req,
               (e->>'partitionId')::uuid AS partition_id,
               coalesce(nullif(e->>'consumerGroup', ''), '__QUEUE_MODE__') AS consumer_group,
               array_agg(DISTINCT (e->>'transactionId') COLLATE "C"
                         ORDER BY (e->>'transactionId') COLLATE "C") AS txids,
               bool_and(lower(coalesce(nullif(e->>'status', ''), 'completed'))
                        IN ('completed', 'success')) AS all_done,
               array_agg(DISTINCT nullif(e->>'leaseId', '')::uuid)
                   FILTER (WHERE nullif(e->>'leaseId', '') IS NOT NULL) AS leases
          FROM jsonb_array_elements(p_items) e
         GROUP BY 1, 2, 3
         ORDER BY 1, 2, 3
    LOOP
        v_made := false;
        SELECT p.name AS partition_name, qu.name AS queue_name, qu.id AS queue_id,
               qu.retry_limit, qu.retry_delay
          INTO v_cfg
          FROM queen.partitions p JOIN queen.queues qu ON qu.id = p.queue_id
         WHERE p.id = v_key.partition_id;
        v_found := FOUND;
        IF v_found THEN
            -- The group's row is there once it popped; an ack must create it otherwise.
            SELECT * INTO v_pc FROM queen.partition_consumers
             WHERE partition_id = v_key.partition_id AND consumer_group = v_key.consumer_group
               FOR UPDATE;
            IF NOT FOUND THEN
                -- (also when a queue delete took the row meanwhile: then the partition is
                -- gone too, and the ack finds nothing)
                v_made := queen.add_consumer_row(v_key.partition_id, v_key.consumer_group);
                v_found := v_made IS NOT NULL;
                SELECT * INTO v_pc FROM queen.partition_consumers
                 WHERE partition_id = v_key.partition_id AND consumer_group = v_key.consumer_group
                   FOR UPDATE;
            END IF;
        END IF;
        IF v_found THEN
            v_cursor_at := v_pc.cursor_created_at;
            v_cursor_id := v_pc.cursor_id;
            v_held := v_pc.lease_id;
        END IF;

        -- The common case, settled as a whole (see above).
        IF v_found AND v_pc.lease_id IS NOT NULL AND v_pc.lease_expires_at > now()
           AND v_key.all_done AND array_position(v_key.txids, NULL) IS NULL
           AND (v_key.leases IS NULL OR v_key.leases = ARRAY[v_pc.lease_id]) THEN
            -- Most acks settle the rest of the delivery at once: its ids, sorted, equal the
            -- items' (a third of the cost of searching the items' array for every message).
            -- A one-message delivery is settled by its last message alone: a conflating
            -- group's (WIRE2 8.4) spans every message since the cursor, which are not read.
            IF v_pc.lease_count = 1 AND cardinality(v_key.txids) = 1 THEN
                v_whole := EXISTS (SELECT 1 FROM queen.messages m
                                    WHERE m.partition_id = v_key.partition_id
                                      AND m.transaction_id = v_key.txids[1]
                                      AND m.id = v_pc.lease_last_id);
            ELSE
                SELECT array_agg(m.transaction_id COLLATE "C"
                                 ORDER BY m.transaction_id COLLATE "C") = v_key.txids
                  INTO v_whole
                  FROM queen.messages m
                 WHERE m.partition_id = v_key.partition_id
                   AND (m.created_at, m.id) > (v_pc.cursor_created_at, v_pc.cursor_id)
                   AND (m.created_at, m.id) <= (v_pc.lease_last_created_at, v_pc.lease_last_id);
            END IF;
            IF v_whole THEN
                v_n := cardinality(v_key.txids);
                v_last_at := v_pc.lease_last_created_at;
                v_last_id := v_pc.lease_last_id;
            ELSE
                -- Part of it. No sort for the newest acked message: its key is the greatest
                -- created_at, and one probe finds its id (the greatest at that key, should two
                -- messages share it).
                SELECT count(*), max(m.created_at)
                  INTO v_n, v_last_at
                  FROM queen.messages m
                 WHERE m.partition_id = v_key.partition_id
                   AND (m.created_at, m.id) > (v_pc.cursor_created_at, v_pc.cursor_id)
                   AND (m.created_at, m.id) <= (v_pc.lease_last_created_at, v_pc.lease_last_id)
                   AND m.transaction_id = ANY(v_key.txids);
                IF v_n = cardinality(v_key.txids) THEN
                    SELECT m.id INTO v_last_id
                      FROM queen.messages m
                     WHERE m.partition_id = v_key.partition_id AND m.created_at = v_last_at
                       AND (m.created_at, m.id) <= (v_pc.lease_last_created_at, v_pc.lease_last_id)
                       AND m.transaction_id = ANY(v_key.txids)
                     ORDER BY m.id DESC LIMIT 1;
                END IF;
            END IF;
            IF v_n = cardinality(v_key.txids) THEN
                v_released := (v_last_at, v_last_id) >= (v_pc.lease_last_created_at, v_pc.lease_last_id);
                UPDATE queen.partition_consumers
                   SET cursor_created_at = v_last_at, cursor_id = v_last_id,
                       lease_id = CASE WHEN v_released THEN NULL ELSE lease_id END,
                       lease_expires_at = CASE WHEN v_released THEN NULL ELSE lease_expires_at END,
                       retry_count = CASE WHEN v_released THEN 0 ELSE retry_count END,
                       batches_consumed = batches_consumed + CASE WHEN v_released THEN 1 ELSE 0 END,
                       total_consumed = total_consumed + v_n,
                       last_consumed_at = now()
                 WHERE partition_id = v_key.partition_id AND consumer_group = v_key.consumer_group;
                IF v_released AND current_setting('queen.wakeup', true) = 'on' THEN
                    PERFORM pg_notify('queen_wakeup', concat_ws(chr(10), v_cfg.queue_name,
                                      v_cfg.partition_name, current_setting('queen.worker', true)));
                END IF;
                v_settled := v_settled || json_build_object(
                    'req', v_key.req, 'partitionId', v_key.partition_id,
                    'consumerGroup', v_key.consumer_group, 'queueName', v_cfg.queue_name,
                    'partitionName', v_cfg.partition_name, 'leaseReleased', v_released);
                CONTINUE;
            END IF;
        END IF;

        v_failure := NULL;
        v_group_pos := '{}';

        FOR v_it IN
            SELECT (t.o - 1)::int AS pos, t.e,
                   coalesce((t.e->>'index')::int, (t.o - 1)::int) AS idx,
                   lower(coalesce(nullif(t.e->>'status', ''), 'completed')) AS status,
                   nullif(t.e->>'leaseId', '') AS lease_id,
                   m.id AS message_id, m.created_at
              FROM jsonb_array_elements(p_items) WITH ORDINALITY AS t(e, o)
              LEFT JOIN queen.messages m
                     ON m.partition_id = v_key.partition_id AND m.transaction_id = t.e->>'transactionId'
             WHERE coalesce((t.e->>'req')::int, 0) = v_key.req
               AND (t.e->>'partitionId')::uuid = v_key.partition_id
               AND coalesce(nullif(t.e->>'consumerGroup', ''), '__QUEUE_MODE__') = v_key.consumer_group
             ORDER BY m.created_at NULLS FIRST, m.id, t.o
        LOOP
            v_error := NULL;
            v_dlq := false;
            IF NOT v_found OR v_it.message_id IS NULL THEN
                v_error := 'Message not found';
            ELSIF v_it.status NOT IN ('completed', 'success', 'failed', 'retry', 'dlq') THEN
                v_error := 'Invalid status';
            ELSIF v_it.lease_id IS NOT NULL
                  AND (v_held IS DISTINCT FROM v_it.lease_id::uuid
                       OR v_pc.lease_expires_at <= now()) THEN
                -- (against the lease as the request found it: its own first failure, which
                -- ends the delivery, must not fail the request's other items)
                v_error := 'Invalid or expired lease';
            ELSIF v_it.lease_id IS NOT NULL
                  AND (v_it.created_at, v_it.message_id)
                      > (v_pc.lease_last_created_at, v_pc.lease_last_id) THEN
                -- its lease never handed it out: moving the cursor there would skip what lies
                -- between
                v_error := 'Message was not delivered under this lease';
            ELSIF (v_it.created_at, v_it.message_id) <= (v_cursor_at, v_cursor_id) THEN
                NULL;  -- already consumed: a harmless repeat
            ELSIF v_it.status IN ('completed', 'success') THEN
                IF v_failure IS NULL THEN
                    v_cursor_at := v_it.created_at;
                    v_cursor_id := v_it.message_id;
                    v_pc.total_consumed := v_pc.total_consumed + 1;
                END IF;
            ELSIF v_it.status = 'retry' THEN
                IF v_failure IS NULL THEN
                    v_failure := 'retry';
                    v_pc.lease_id := NULL;
                END IF;
            ELSIF v_it.status = 'dlq' THEN
                -- after a failure to be retried, ignored like a completion: moving the cursor
                -- past the dead letter would skip the failed message
                v_dlq := v_failure IS DISTINCT FROM 'retry';
            ELSIF v_failure = 'exhausted' THEN
                v_dlq := true;
            ELSIF v_failure IS NULL AND v_pc.lease_id IS NOT NULL THEN
                -- failed: the first failure of this request decides for the whole delivery
                IF v_pc.retry_count < v_cfg.retry_limit THEN
                    v_failure := 'retry';
                    v_pc.retry_count := v_pc.retry_count + 1;
                    v_pc.retry_after := clock_timestamp()
                                        + make_interval(secs => v_cfg.retry_delay / 1000.0);
                    v_pc.lease_id := NULL;
                ELSE
                    v_failure := 'exhausted';
                    v_dlq := true;
                END IF;
            END IF;
            -- failed with no delivery in flight (already released): a no-op reported as success

            -- A message deleted meanwhile (DELETE of it, retention) has nothing to keep.
            IF v_dlq AND NOT EXISTS (SELECT 1 FROM queen.messages
                                      WHERE id = v_it.message_id FOR KEY SHARE) THEN
                v_dlq := false;
                v_error := 'Message not found';
            END IF;
            IF v_dlq THEN
                INSERT INTO queen.dead_letter_queue (message_id, partition_id, consumer_group,
                                                     error_message, retry_count)
                VALUES (v_it.message_id, v_key.partition_id, v_key.consumer_group,
                        coalesce(nullif(v_it.e->>'error', ''), 'Retries exhausted'),
                        v_pc.retry_count);
                v_cursor_at := v_it.created_at;
                v_cursor_id := v_it.message_id;
            END IF;

            v_results[v_it.pos + 1] := jsonb_build_object(
                'index', v_it.idx,
                'transactionId', v_it.e->>'transactionId',
                'success', v_error IS NULL,
                'error', v_error,
                'queueName', v_cfg.queue_name,
                'partitionName', v_cfg.partition_name,
                'dlq', v_dlq);
            v_group_pos := v_group_pos || (v_it.pos + 1);
        END LOOP;

        v_released := false;
        IF v_found THEN
            IF v_failure = 'exhausted' THEN
                v_pc.lease_id := NULL;
                v_pc.retry_count := 0;
            END IF;
            -- The delivery is over once the cursor reached the last message handed out, or
            -- once nothing is left before it: the rest was deleted meanwhile (a DELETE of the
            -- message, or retention racing the pop), and could never be acked, so the lease
            -- held the partition until it expired.
            IF v_pc.lease_id IS NOT NULL
               AND ((v_cursor_at, v_cursor_id) >= (v_pc.lease_last_created_at, v_pc.lease_last_id)
                    OR NOT EXISTS (
                        SELECT 1 FROM queen.messages m
                         WHERE m.partition_id = v_key.partition_id
                           AND (m.created_at, m.id) > (v_cursor_at, v_cursor_id)
                           AND (m.created_at, m.id)
                               <= (v_pc.lease_last_created_at, v_pc.lease_last_id))) THEN
                IF (v_cursor_at, v_cursor_id)
                   < (v_pc.lease_last_created_at, v_pc.lease_last_id) THEN
                    v_cursor_at := v_pc.lease_last_created_at;
                    v_cursor_id := v_pc.lease_last_id;
                END IF;
                v_pc.lease_id := NULL;
                v_pc.retry_count := 0;
                v_pc.batches_consumed := v_pc.batches_consumed + 1;
            END IF;
            v_released := v_pc.lease_id IS NULL;
        END IF;
        IF v_made AND (v_cursor_at, v_cursor_id) = (v_pc.cursor_created_at, v_pc.cursor_id) THEN
            -- Nothing was acked (a failed item, or one with nothing in flight): the row would
            -- fix where the group starts here, or bring back a group deleted meanwhile.
            DELETE FROM queen.partition_consumers
             WHERE partition_id = v_key.partition_id AND consumer_group = v_key.consumer_group;
        ELSIF v_found THEN
            UPDATE queen.partition_consumers
               SET cursor_created_at = v_cursor_at, cursor_id = v_cursor_id,
                   lease_id = v_pc.lease_id,
                   lease_expires_at = CASE WHEN v_pc.lease_id IS NULL THEN NULL ELSE lease_expires_at END,
                   retry_count = v_pc.retry_count, retry_after = v_pc.retry_after,
                   total_consumed = v_pc.total_consumed, batches_consumed = v_pc.batches_consumed,
                   last_consumed_at = CASE WHEN (v_cursor_at, v_cursor_id) > (cursor_created_at, cursor_id)
                                           THEN now() ELSE last_consumed_at END
             WHERE partition_id = v_key.partition_id AND consumer_group = v_key.consumer_group;
        END IF;
        IF v_released AND current_setting('queen.wakeup', true) = 'on' THEN
            PERFORM pg_notify('queen_wakeup', concat_ws(chr(10), v_cfg.queue_name,
                              v_cfg.partition_name, current_setting('queen.worker', true)));
        END IF;
        FOREACH v_pos IN ARRAY v_group_pos LOOP
            v_results[v_pos] := v_results[v_pos] || jsonb_build_object('leaseReleased', v_released);
        END LOOP;
    END LOOP;

    RETURN json_build_object(
        'settled', array_to_json(v_settled),
        'results', (SELECT coalesce(json_agg(json_build_object('pos', n - 1, 'result', r)), '[]')
                      FROM unnest(v_results) WITH ORDINALITY AS x(r, n) WHERE r IS NOT NULL));
END
$$;

-- The (partition, group) row of a group that acks or dead-letters in a partition it never
-- popped: true when this call made it, false when it was there, NULL when the partition is
-- gone (deleted since the caller read it, e.g. with its queue). It starts where the group's subscription to the queue starts, as a pop's would
-- (ensure_consumer): a `new` group made to start at the beginning replayed the partition's
-- history. A group with no subscription yet starts at the beginning.
CREATE OR REPLACE FUNCTION queen.add_consumer_row(p_partition uuid, p_group text)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_from timestamptz;
BEGIN
    SELECT s.subscription_from INTO v_from
      FROM queen.partitions p
      JOIN queen.consumer_subscriptions s
        ON s.queue_id = p.queue_id AND s.consumer_group = p_group
     WHERE p.id = p_partition;
    v_from := coalesce(v_from, '-infinity');
    INSERT INTO queen.partition_consumers (partition_id, consumer_group, cursor_created_at,
                                           cursor_id)
    VALUES (p_partition, p_group, v_from, queen.start_cursor_id(v_from))
    ON CONFLICT (partition_id, consumer_group) DO NOTHING;
    RETURN FOUND;
EXCEPTION WHEN foreign_key_violation THEN
    RETURN NULL;
END
$$;

-- One result per item, in input order: ack_core's answer expanded (for transactions and
-- SQL callers; the server expands it itself). Each item finds its entry by joins: a search of
-- every result for each item made 6,000 acks in one transaction take 6 s.
CREATE OR REPLACE FUNCTION queen.ack_messages(p_items jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    WITH core AS (SELECT queen.ack_core(p_items)::jsonb AS c),
    results AS (
        SELECT (r->>'pos')::int AS pos, r->'result' AS result
          FROM core, jsonb_array_elements(core.c->'results') r
    ), settled AS (
        SELECT (s->>'req')::int AS req, (s->>'partitionId')::uuid AS partition_id,
               s->>'consumerGroup' AS consumer_group, s
          FROM core, jsonb_array_elements(core.c->'settled') s
    )
    SELECT coalesce(jsonb_agg(CASE
               WHEN r.pos IS NOT NULL THEN r.result
               WHEN k.s IS NOT NULL THEN jsonb_build_object(
                   'index', coalesce((t.e->>'index')::int, (t.o - 1)::int),
                   'transactionId', t.e->>'transactionId', 'success', true, 'error', NULL,
                   'queueName', k.s->'queueName', 'partitionName', k.s->'partitionName',
                   'dlq', false, 'leaseReleased', k.s->'leaseReleased') END
             ORDER BY t.o), '[]'::jsonb)
      FROM jsonb_array_elements(p_items) WITH ORDINALITY AS t(e, o)
      LEFT JOIN results r ON r.pos = t.o - 1
      LEFT JOIN settled k
             ON k.req = coalesce((t.e->>'req')::int, 0)
            AND k.partition_id = (t.e->>'partitionId')::uuid
            AND k.consumer_group = coalesce(nullif(t.e->>'consumerGroup', ''), '__QUEUE_MODE__')
$$;

-- Extends every live lease row held under p_lease_id to max(current, now + seconds); seconds
-- defaults to the queue's leaseTime. Returns {found, expired, expiresAt (earliest new expiry),
-- renewed (how many partitions' leases were extended, WIRE2 10)}.
CREATE OR REPLACE FUNCTION queen.extend_lease(p_lease_id uuid, p_seconds integer) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_expires timestamptz;
    v_renewed integer;
BEGIN
    WITH extended AS (
        UPDATE queen.partition_consumers pc
           SET lease_expires_at = greatest(pc.lease_expires_at, now() + make_interval(secs =>
                   coalesce(p_seconds, CASE WHEN qu.lease_time > 0 THEN qu.lease_time ELSE 60 END)))
          FROM queen.partitions p JOIN queen.queues qu ON qu.id = p.queue_id
         WHERE pc.lease_id = p_lease_id AND pc.lease_expires_at > now() AND p.id = pc.partition_id
        RETURNING pc.lease_expires_at
    )
    SELECT min(lease_expires_at), count(*) INTO v_expires, v_renewed FROM extended;
    IF v_expires IS NOT NULL THEN
        RETURN jsonb_build_object('found', true, 'expired', false, 'renewed', v_renewed,
                                  'expiresAt', queen.format_ts3(v_expires));
    END IF;
    RETURN jsonb_build_object(
        'found', EXISTS (SELECT 1 FROM queen.partition_consumers WHERE lease_id = p_lease_id),
        'expired', true);
END
$$;

-- Several renewals in one call (the server's renew_lease Batcher): [{leaseId, seconds}] to
-- extend_lease's answers, in input order.
CREATE OR REPLACE FUNCTION queen.extend_leases(p_items jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT coalesce(jsonb_agg(queen.extend_lease((t.e->>'leaseId')::uuid, (t.e->>'seconds')::integer)
                              ORDER BY t.o), '[]'::jsonb)
      FROM jsonb_array_elements(p_items) WITH ORDINALITY AS t(e, o)
$$;
