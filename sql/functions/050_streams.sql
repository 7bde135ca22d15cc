-- The Streams API (WIRE.md 3.9): query registration, the atomic cycle and state reads, over
-- the queen_streams tables of migrations/0003_streams.sql. One call per request; the server
-- validates every field first (queen_tw/http/streams.py), so these functions trust types.

-- p: {name, source_queue, sink_queue?, config_hash, reset}.
-- Returns {success: true, query_id, name, config_hash, fresh, reset} or, for a name already
-- registered with another config_hash and no reset, {success: false, conflict: true,
-- query_id, name, error}. The same hash again is idempotent (source and sink are updated);
-- reset: true wipes every state row of the query (whatever the hash) and takes the new hash.
CREATE OR REPLACE FUNCTION queen.streams_register(p jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_query  queen_streams.queries%ROWTYPE;
    v_reset  boolean := coalesce((p->>'reset')::boolean, false);
    v_wiped  boolean := false;
BEGIN
    INSERT INTO queen_streams.queries (name, source_queue, sink_queue, config_hash)
    VALUES (p->>'name', p->>'source_queue', nullif(p->>'sink_queue', ''), p->>'config_hash')
    ON CONFLICT (name) DO NOTHING
    RETURNING * INTO v_query;
    IF FOUND THEN
        RETURN jsonb_build_object('success', true, 'query_id', v_query.id, 'name', v_query.name,
                                  'config_hash', v_query.config_hash, 'fresh', true,
                                  'reset', false);
    END IF;

    SELECT * INTO v_query FROM queen_streams.queries WHERE name = p->>'name' FOR UPDATE;
    IF v_query.config_hash <> p->>'config_hash' AND NOT v_reset THEN
        RETURN jsonb_build_object(
            'success', false, 'conflict', true, 'query_id', v_query.id, 'name', v_query.name,
            'error', format('config_hash mismatch: query %s is registered with another '
                            'operator chain; pass reset: true to wipe its state, or register '
                            'under a new name', v_query.name));
    END IF;
    IF v_reset THEN
        DELETE FROM queen_streams.state WHERE query_id = v_query.id;
        v_wiped := true;
    END IF;
    UPDATE queen_streams.queries
       SET source_queue = p->>'source_queue', sink_queue = nullif(p->>'sink_queue', ''),
           config_hash = p->>'config_hash', updated_at = now()
     WHERE id = v_query.id;
    RETURN jsonb_build_object('success', true, 'query_id', v_query.id, 'name', v_query.name,
                              'config_hash', p->>'config_hash', 'fresh', false,
                              'reset', v_wiped);
END
$$;

-- p: {query_id, partition_id, keys: [text], key_prefix?: text, ripe_at_or_before?: number}.
-- Keys empty = every key. key_prefix keeps keys starting with it; ripe_at_or_before (epoch
-- ms) keeps rows whose value has a numeric windowEnd at or before it (the SDK's idle flush
-- asks for the windows that have closed). Returns {found: false} for an unknown query, else
-- {found: true, rows: [{key, value, updated_at}]} in key order.
CREATE OR REPLACE FUNCTION queen.streams_state_get(p jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM queen_streams.queries
                                  WHERE id = (p->>'query_id')::uuid)
                THEN jsonb_build_object('found', false)
                ELSE jsonb_build_object('found', true, 'rows', coalesce((
        SELECT jsonb_agg(jsonb_build_object('key', s.key, 'value', s.value,
                                            'updated_at', queen.format_ts3(s.updated_at))
                         ORDER BY s.key)
          FROM queen_streams.state s
         WHERE s.query_id = (p->>'query_id')::uuid
           AND s.partition_id = (p->>'partition_id')::uuid
           AND (jsonb_array_length(coalesce(p->'keys', '[]'::jsonb)) = 0
                OR s.key IN (SELECT jsonb_array_elements_text(p->'keys')))
           AND (coalesce(p->>'key_prefix', '') = '' OR starts_with(s.key, p->>'key_prefix'))
           AND (p->'ripe_at_or_before' IS NULL
                OR (jsonb_typeof(s.value->'windowEnd') = 'number'
                    AND (s.value->>'windowEnd')::numeric
                        <= (p->>'ripe_at_or_before')::numeric))), '[]'::jsonb))
           END
$$;

-- One stream cycle, atomically: the ack of the source partition, the state ops and the sink
-- pushes commit together or not at all.
-- p: {query_id, partition_id, consumer_group, release_lease, state_ops: [{type: upsert |
--     delete, key, value?}], push_items: [push items, validated, with transactionIds and
--     encrypted payloads, as push_store takes them], ack: {transactionId, leaseId?, status:
--     completed | success | failed | dlq, count?, error?} | null}.
-- The ack names the last message the cycle handled. It goes through ack_core, as any ack:
-- completed moves the group's cursor to it; failed and dlq send it to the dead-letter table
-- (with the ack's error) and move past it. A leaseId is checked first: a lease that expired
-- or that another consumer now holds fails the cycle before anything is written. With
-- release_lease (the default) the lease ends with the cycle; without it the lease is kept
-- while part of the delivery is unacknowledged, so that tail comes back, in order, after it
-- expires (the SDK's gate). The sink pushes are push_store's (as POST /api/v1/push), so sink queues keep
-- their dedupe, maxSize and ordering; an item refused (maxSize) fails the cycle.
-- Returns {found: false} for an unknown query; else {success, query_id, partition_id,
-- state_ops_applied, ack_result} plus pushed (push_store's compact answer, or null: the
-- server expands it into the WIRE push_results and wakes the sink partitions it names) and
-- source ({queue, partition, leaseReleased}: a released lease wakes the source's pops); or,
-- after a rollback, {success: false, error, ...} with nothing applied.
-- The transactionId a cycle's ack settles, given the group's row as the ack finds it (p_pc,
-- locked by the caller; NULL fields when the group has none). Raises, so that nothing of the cycle is applied, when the named message is
-- already behind the cursor (the same cycle sent again after its answer was lost) or, under
-- the live lease, beyond what that lease delivered. A completed ack whose count covers every
-- message still unacknowledged in the delivery settles the whole delivery, whichever of its
-- messages it names: the SDKs name the last message in their own order (createdAt to the
-- millisecond, then id), which for ids a client minted within one millisecond (a 2.6.0
-- binary push) is not the delivery's order.
CREATE OR REPLACE FUNCTION queen.stream_ack_target(p_ack jsonb, p_partition uuid,
                                                   p_lease uuid, p_status text,
                                                   p_count integer,
                                                   p_pc queen.partition_consumers)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_txid    text := p_ack->>'transactionId';
    v_named   record;
    v_pending integer;
BEGIN
    SELECT m.id, m.created_at INTO v_named FROM queen.messages m
     WHERE m.partition_id = p_partition AND m.transaction_id = v_txid;
    IF p_pc.partition_id IS NULL OR v_named.id IS NULL THEN
        RETURN v_txid;  -- ack_core answers for these
    END IF;
    IF (v_named.created_at, v_named.id) <= (p_pc.cursor_created_at, p_pc.cursor_id) THEN
        RAISE EXCEPTION 'ack of % failed: it was acknowledged already; nothing was applied',
                        v_txid;
    END IF;
    IF p_pc.lease_id IS NULL OR p_pc.lease_expires_at <= now() OR p_lease <> p_pc.lease_id THEN
        RETURN v_txid;  -- no live delivery this ack belongs to: ack_core's checks decide
    END IF;
    IF (v_named.created_at, v_named.id) > (p_pc.lease_last_created_at, p_pc.lease_last_id) THEN
        RAISE EXCEPTION 'ack of % failed: the lease did not deliver it; nothing was applied',
                        v_txid;
    END IF;
    IF p_status IN ('completed', 'success') THEN
        SELECT count(*) INTO v_pending FROM queen.messages m
         WHERE m.partition_id = p_partition
           AND (m.created_at, m.id) > (p_pc.cursor_created_at, p_pc.cursor_id)
           AND (m.created_at, m.id) <= (p_pc.lease_last_created_at, p_pc.lease_last_id);
        IF p_count >= v_pending THEN
            SELECT m.transaction_id INTO v_txid FROM queen.messages m
             WHERE m.id = p_pc.lease_last_id;
        END IF;
    END IF;
    RETURN v_txid;
END
$$;

CREATE OR REPLACE FUNCTION queen.streams_cycle(p jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_query_id  uuid := (p->>'query_id')::uuid;
    v_partition uuid := (p->>'partition_id')::uuid;
    v_group     text := coalesce(nullif(p->>'consumer_group', ''), '__QUEUE_MODE__');
    v_release   boolean := coalesce((p->>'release_lease')::boolean, true);
    v_ack       jsonb := nullif(p->'ack', 'null'::jsonb);
    v_ops       jsonb := coalesce(p->'state_ops', '[]'::jsonb);
    v_items     jsonb := coalesce(p->'push_items', '[]'::jsonb);
    v_lease     uuid;
    v_status    text;
    v_count     integer;
    v_acked     jsonb;
    v_released  boolean := false;
    v_drop      boolean;
    v_pushed    jsonb;
    v_refused   integer;
    v_ack_out   jsonb := 'null'::jsonb;
    v_source    jsonb := 'null'::jsonb;
    v_pc        queen.partition_consumers%ROWTYPE;  -- the group's row before the ack
    v_txid      text;     -- the message acked
    v_moved     integer;  -- messages the cursor moved over
BEGIN
    IF NOT EXISTS (SELECT 1 FROM queen_streams.queries WHERE id = v_query_id) THEN
        RETURN jsonb_build_object('found', false);
    END IF;
    BEGIN
        -- Cycles of one (query, partition) commit one after the other: a worker's idle
        -- flush and its cycles write the same state rows.
        PERFORM pg_advisory_xact_lock(hashtextextended(
            'queen_streams:' || v_query_id::text || ':' || v_partition::text, 0));

        IF v_ack IS NOT NULL THEN
            v_lease := nullif(v_ack->>'leaseId', '')::uuid;
            v_status := lower(coalesce(nullif(v_ack->>'status', ''), 'completed'));
            v_count := coalesce((v_ack->>'count')::integer, 1);
            IF v_lease IS NOT NULL AND NOT EXISTS (
                    SELECT 1 FROM queen.partition_consumers pc
                     WHERE pc.partition_id = v_partition AND pc.consumer_group = v_group
                       AND pc.lease_id = v_lease AND pc.lease_expires_at > now()) THEN
                RAISE EXCEPTION 'Lease % on partition % (group %) has expired or is held by '
                                'another consumer; nothing was applied',
                                v_lease, v_partition, v_group;
            END IF;
            SELECT * INTO v_pc FROM queen.partition_consumers
             WHERE partition_id = v_partition AND consumer_group = v_group FOR UPDATE;
            IF NOT FOUND THEN
                -- made here, where the group starts, so that the messages the cursor moves
                -- over are counted from there (a missing row counted none)
                PERFORM queen.add_consumer_row(v_partition, v_group);
                SELECT * INTO v_pc FROM queen.partition_consumers
                 WHERE partition_id = v_partition AND consumer_group = v_group FOR UPDATE;
            END IF;
            v_txid := queen.stream_ack_target(v_ack, v_partition, v_lease, v_status, v_count,
                                              v_pc);
            v_acked := queen.ack_messages(jsonb_build_array(jsonb_build_object(
                'transactionId', v_txid, 'partitionId', v_partition,
                'consumerGroup', v_group, 'leaseId', v_lease,
                'status', CASE WHEN v_status IN ('failed', 'dlq') THEN 'dlq' ELSE 'completed' END,
                'error', coalesce(nullif(v_ack->>'error', ''), 'Stream cycle reported failure'))))
                -> 0;
            IF NOT (v_acked->>'success')::boolean THEN
                RAISE EXCEPTION 'ack of % failed: %; nothing was applied',
                                v_ack->>'transactionId', v_acked->>'error';
            END IF;
            v_released := coalesce((v_acked->>'leaseReleased')::boolean, false);
            -- ack_core counted one consumed message (none for a dead letter); the cursor moved
            -- over v_moved. The lease ends here unless the caller keeps it for the
            -- unacknowledged tail (only a lease the ack named: without one there is no
            -- telling whose lease is held).
            SELECT pc.lease_id = v_lease,
                   (SELECT count(*) FROM queen.messages m
                     WHERE m.partition_id = v_partition
                       AND (m.created_at, m.id) > (v_pc.cursor_created_at, v_pc.cursor_id)
                       AND (m.created_at, m.id) <= (pc.cursor_created_at, pc.cursor_id))
              INTO v_drop, v_moved
              FROM queen.partition_consumers pc
             WHERE pc.partition_id = v_partition AND pc.consumer_group = v_group;
            v_drop := v_release AND coalesce(v_drop, false);
            UPDATE queen.partition_consumers
               SET total_consumed = total_consumed + greatest(v_moved - 1, 0),
                   lease_id = CASE WHEN v_drop THEN NULL ELSE lease_id END,
                   lease_expires_at = CASE WHEN v_drop THEN NULL ELSE lease_expires_at END,
                   retry_count = CASE WHEN v_drop THEN 0 ELSE retry_count END,
                   batches_consumed = batches_consumed + CASE WHEN v_drop THEN 1 ELSE 0 END
             WHERE partition_id = v_partition AND consumer_group = v_group
               AND (v_moved > 1 OR v_drop);
            IF v_drop THEN
                v_released := true;
                IF current_setting('queen.wakeup', true) = 'on' THEN
                    PERFORM pg_notify('queen_wakeup', concat_ws(chr(10), v_acked->>'queueName',
                                      v_acked->>'partitionName',
                                      current_setting('queen.worker', true)));
                END IF;
            END IF;
            v_ack_out := jsonb_build_object('success', true, 'count', v_count,
                                            'lease_released', v_released,
                                            'dlq', coalesce((v_acked->>'dlq')::boolean, false));
            v_source := jsonb_build_object('queue', v_acked->>'queueName',
                                           'partition', v_acked->>'partitionName',
                                           'leaseReleased', v_released);
        END IF;

        -- State: the last op of each key decides (a key may be written and deleted in one
        -- cycle); set-based, one statement each way.
        WITH last_ops AS (
            SELECT DISTINCT ON (o.e->>'key') o.e->>'key' AS key, o.e->>'type' AS kind,
                   coalesce(o.e->'value', 'null'::jsonb) AS value
              FROM jsonb_array_elements(v_ops) WITH ORDINALITY AS o(e, n)
             ORDER BY o.e->>'key', o.n DESC
        ), deleted AS (
            DELETE FROM queen_streams.state s
             USING last_ops l
             WHERE l.kind = 'delete' AND s.query_id = v_query_id
               AND s.partition_id = v_partition AND s.key = l.key
        )
        INSERT INTO queen_streams.state (query_id, partition_id, key, value, updated_at)
        SELECT v_query_id, v_partition, l.key, l.value, now()
          FROM last_ops l
         WHERE l.kind = 'upsert'
        ON CONFLICT (query_id, partition_id, key)
        DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at;

        IF jsonb_array_length(v_items) > 0 THEN
            v_pushed := queen.push_store(v_items)::jsonb;
            IF jsonb_array_length(v_pushed->'refused') > 0 THEN
                v_refused := (v_pushed->'refused'->>0)::integer;
                RAISE EXCEPTION 'sink push item % refused: Queue % has reached its max '
                                'capacity (% messages); nothing was applied',
                                v_refused, v_items->v_refused->>'queue',
                                v_pushed->'maxSize'->>(v_items->v_refused->>'queue');
            END IF;
        END IF;
    EXCEPTION WHEN others THEN
        IF SQLSTATE LIKE '40%' OR SQLSTATE IN ('55P03', 'QE001') THEN
            RAISE;  -- a conflict, a lock wait, a stale encryption flag: not the cycle's verdict
        END IF;
        -- Everything inside the block is rolled back (a subtransaction).
        RETURN jsonb_build_object('found', true, 'success', false, 'error', SQLERRM,
                                  'query_id', v_query_id, 'partition_id', v_partition,
                                  'state_ops_applied', 0, 'ack_result', NULL);
    END;
    RETURN jsonb_build_object('found', true, 'success', true, 'query_id', v_query_id,
                              'partition_id', v_partition,
                              'state_ops_applied', jsonb_array_length(v_ops),
                              'ack_result', v_ack_out, 'pushed', v_pushed,
                              'source', v_source);
END
$$;
