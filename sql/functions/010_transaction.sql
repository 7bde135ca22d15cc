-- Atomic transactions (WIRE.md 2.5, 9.4): push and ack operations commit together or not at all.

-- p: {operations: [{type: "push", items: [...]} | {type: "ack", transactionId, partitionId,
--     status?, consumerGroup?, leaseId?, error?}], requiredLeases: [uuid text...],
--     kv?: [KV ops as queen.kv_apply takes them (WIRE2.md 5.1), lock guards first],
--     timers?: [timer ops as queen.timers_schedule takes them], producerSub?: the caller's sub}.
-- Items, acks and KV ops are validated by the server first; push items already carry
-- transactionIds. The kv rider runs first, then the timers rider (KV rows, then timer rows,
-- are locked before any queue or partition, WIRE2.md 5.3); their results follow the
-- operations' in `results` (WIRE2.md 5.2), typed "kv" and "timer", at flat indexes.
-- Returns {transactionId, success, results, partitionUpdates (the (queue, partition)s pushed
-- to or whose delivery an ack ended: their waiters are woken)} or, after a rollback,
-- {transactionId, success: false, error, results: [evaluated so far]}, or, when a `required`
-- KV op (a lock guard, a once) lost, {transactionId, success: false, reason:
-- "kv_precondition", failedIndex (flat), kvReason, version, value, error}.
-- The ack ops of transaction p, applied as one ack request (WIRE.md 2.4): a second failed
-- ack of one delivery is then the no-op the contract makes it, not a failure of its lease
-- (released by the first), which rolled back every transaction failing a whole batch; and a
-- completion after a failure does not skip the failed message. Answers one result per ack
-- op, in op order. An op without its own leaseId borrows p_borrowed (WIRE2.md 5.1).
CREATE OR REPLACE FUNCTION queen.transaction_acks(p jsonb, p_borrowed text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_ops jsonb;
    v_op  jsonb;
BEGIN
    SELECT coalesce(jsonb_agg(CASE WHEN coalesce(e->>'leaseId', '') = '' AND p_borrowed IS NOT NULL
                                   THEN e || jsonb_build_object('leaseId', p_borrowed)
                                   ELSE e END ORDER BY n), '[]'::jsonb)
      INTO v_ops
      FROM jsonb_array_elements(p->'operations') WITH ORDINALITY AS t(e, n)
     WHERE e->>'type' IS DISTINCT FROM 'push';
    -- Another live lease on a partition means the caller's delivery there is over.
    IF jsonb_array_length(coalesce(p->'requiredLeases', '[]'::jsonb)) > 0 THEN
        FOR v_op IN SELECT e FROM jsonb_array_elements(v_ops) e LOOP
            IF EXISTS (
                SELECT 1 FROM queen.partition_consumers pc
                 WHERE pc.partition_id = (v_op->>'partitionId')::uuid
                   AND pc.consumer_group = coalesce(nullif(v_op->>'consumerGroup', ''), '__QUEUE_MODE__')
                   AND pc.lease_id IS NOT NULL AND pc.lease_expires_at > now()
                   AND NOT (p->'requiredLeases' ? pc.lease_id::text)) THEN
                RAISE EXCEPTION 'Partition % is held under another lease', v_op->>'partitionId';
            END IF;
        END LOOP;
    END IF;
    RETURN queen.ack_messages(v_ops);
END
$$;

CREATE OR REPLACE FUNCTION queen.run_transaction(p jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_tx_id   uuid := gen_random_uuid();
    -- (an array, appended in place: a jsonb value copied whole at each of its items made a
    -- transaction of 8,000 pushed items take 13 s, and one of 10,000 miss its deadline)
    v_results jsonb[] := '{}';
    v_updates jsonb := '[]'::jsonb;
    v_op      jsonb;
    v_index   integer := 0;
    v_pushed  jsonb;
    v_item    jsonb;
    v_acked   jsonb;
    v_lease   text;
    v_kv      jsonb := '[]'::jsonb;
    v_timers  jsonb := '[]'::jsonb;
    v_flat    integer;
    v_acks    jsonb;  -- every ack op's result, applied at the first ack op (transaction_acks)
    v_ack_n   integer := 0;
    -- An ack op without its own leaseId is fenced by the only lease the caller listed, when
    -- it listed exactly one (WIRE2.md 5.1; 0.15.0 clients never put leaseId on ack ops).
    v_borrowed text := (SELECT min(l) FROM jsonb_array_elements_text(
                                             coalesce(p->'requiredLeases', '[]'::jsonb)) l
                         WHERE l <> '' HAVING count(DISTINCT l) = 1);
BEGIN
    BEGIN
        SELECT coalesce(sum(CASE WHEN e->>'type' = 'push'
                                 THEN jsonb_array_length(e->'items') ELSE 1 END), 0)
          INTO v_flat FROM jsonb_array_elements(p->'operations') e;
        IF jsonb_array_length(coalesce(p->'kv', '[]'::jsonb)) > 0 THEN
            v_kv := queen.kv_apply(p->'kv', v_flat);
        END IF;
        IF jsonb_array_length(coalesce(p->'timers', '[]'::jsonb)) > 0 THEN
            v_timers := queen.timers_schedule(p->'timers', p->>'producerSub');
        END IF;

        FOR v_lease IN SELECT jsonb_array_elements_text(coalesce(p->'requiredLeases', '[]'::jsonb)) LOOP
            -- expired on its row, or expired and taken over by another pop (migration 13)
            IF v_lease <> '' AND (EXISTS (
                    SELECT 1 FROM queen.partition_consumers
                     WHERE lease_id = v_lease::uuid AND lease_expires_at <= now())
                 OR EXISTS (SELECT 1 FROM queen.expired_leases
                             WHERE lease_id = v_lease::uuid)) THEN
                RAISE EXCEPTION 'Lease % has expired', v_lease;
            END IF;
        END LOOP;

        FOR v_op IN SELECT e FROM jsonb_array_elements(p->'operations') e LOOP
            IF v_op->>'type' = 'push' THEN
                v_pushed := queen.push_messages_core(v_op->'items')::jsonb;
                v_updates := v_updates || (v_pushed->'partition_updates');
                FOR v_item IN SELECT e FROM jsonb_array_elements(v_pushed->'items') e LOOP
                    v_results := v_results || jsonb_strip_nulls(jsonb_build_object(
                        'index', v_index, 'type', 'push',
                        'success', v_item->>'status' IN ('queued', 'duplicate'),
                        'status', v_item->>'status',
                        'transactionId', v_item->>'transaction_id',
                        'messageId', v_item->>'message_id',
                        'partitionId', v_item->>'partition_id',
                        'queueName', v_item->>'queueName',
                        'error', v_item->>'error'));
                    v_index := v_index + 1;
                    IF v_item->>'status' NOT IN ('queued', 'duplicate') THEN
                        RAISE EXCEPTION '%', coalesce(v_item->>'error', 'push failed');
                    END IF;
                END LOOP;
            ELSE
                IF v_acks IS NULL THEN
                    v_acks := queen.transaction_acks(p, v_borrowed);
                    -- Deliveries these acks ended: their partitions' parked pops are woken
                    -- like a push's (WIRE.md 2.3.7), or they waited out their timeout.
                    v_updates := v_updates || coalesce((
                        SELECT jsonb_agg(DISTINCT jsonb_build_object(
                                   'queue', a->>'queueName', 'partition', a->>'partitionName'))
                          FROM jsonb_array_elements(v_acks) a
                         WHERE (a->>'leaseReleased')::boolean AND a->>'queueName' IS NOT NULL),
                        '[]'::jsonb);
                END IF;
                v_acked := v_acks -> v_ack_n;
                v_ack_n := v_ack_n + 1;
                v_results := v_results || jsonb_build_object(
                    'index', v_index, 'type', 'ack', 'success', v_acked->'success',
                    'transactionId', v_op->>'transactionId', 'error', v_acked->'error',
                    'dlq', v_acked->'dlq');
                v_index := v_index + 1;
                IF NOT (v_acked->>'success')::boolean THEN
                    RAISE EXCEPTION '%', v_acked->>'error';
                END IF;
            END IF;
        END LOOP;
        v_results := v_results || ARRAY(SELECT e || '{"type": "kv"}'::jsonb
                                          FROM jsonb_array_elements(v_kv) WITH ORDINALITY t(e, n)
                                         ORDER BY n)
                               || ARRAY(SELECT e || jsonb_build_object(
                                                   'type', 'timer',
                                                   'index', v_flat + jsonb_array_length(v_kv) + n - 1)
                                          FROM jsonb_array_elements(v_timers) WITH ORDINALITY t(e, n)
                                         ORDER BY n);
    EXCEPTION WHEN SQLSTATE 'QKV01' THEN
        RETURN jsonb_build_object(
            'transactionId', v_tx_id, 'success', false, 'reason', 'kv_precondition',
            'results', '[]'::jsonb,
            'error', 'A required KV precondition failed; nothing was applied') || SQLERRM::jsonb;
    WHEN others THEN
        -- A deadlock or serialization failure (class 40) is no answer about the transaction:
        -- the call is undone and run again (queen_tw/db/pool.py), and 503 if it keeps failing.
        -- Nor is a lock it waited for past lock_timeout (55P03): 503, the client retries.
        -- Nor a push whose encryption flag changed under it (QE001, 002_push.sql): 503 too.
        IF SQLSTATE LIKE '40%' OR SQLSTATE IN ('55P03', 'QE001') THEN
            RAISE;
        END IF;
        -- Everything inside the block is rolled back; the results gathered so far are kept.
        RETURN jsonb_build_object('transactionId', v_tx_id, 'success', false, 'error', SQLERRM,
                                  'results', to_jsonb(v_results));
    END;
    RETURN jsonb_build_object('transactionId', v_tx_id, 'success', true,
                              'results', to_jsonb(v_results), 'partitionUpdates', v_updates);
END
$$;

-- Several transactions in one call (the server's transaction Batcher): each one still commits
-- or rolls back on its own (run_transaction's exception block is a subtransaction); answers in
-- input order. The KV locks of every bundle are taken first, in their one global order, then
-- the timer keys of every bundle (WIRE2.md 5.3): a bundle's locks outlive it to the end of
-- the call, so taking them bundle by bundle would let two calls take the same keys in
-- opposite orders, or a KV or timer lock after a partition lock (an audit counted 22 to 52
-- deadlocks in 300 fused bundles with timer riders before the timer keys came first).
CREATE OR REPLACE FUNCTION queen.run_transactions(p_list jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM queen.kv_lock(jsonb_agg(o))
       FROM jsonb_array_elements(p_list) t,
            jsonb_array_elements(coalesce(t->'kv', '[]'::jsonb)) o;
    PERFORM queen.timers_lock(jsonb_agg(o))
       FROM jsonb_array_elements(p_list) t,
            jsonb_array_elements(coalesce(t->'timers', '[]'::jsonb)) o;
    RETURN (SELECT coalesce(jsonb_agg(queen.run_transaction(t.p) ORDER BY t.o), '[]'::jsonb)
              FROM jsonb_array_elements(p_list) WITH ORDINALITY AS t(p, o));
END
$$;
