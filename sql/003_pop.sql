-- Pop: claim partitions for a consumer group under one lease and read their pending messages.
-- One call serves many requests (pop_specific_batch), so the server fuses concurrent pops.

-- Creates the (partition, group) row when the group first lands on a partition. A named group
-- starts strictly after every message created at or before its subscription time (2.3.6); the
-- cursor (ts, max uuid) expresses exactly that without reading any message.
CREATE OR REPLACE FUNCTION queen.ensure_consumer(p_partition uuid, p_queue uuid, p_group text,
                                                 p_sub_mode text, p_sub_from text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_from timestamptz;
BEGIN
    IF EXISTS (SELECT 1 FROM queen.partition_consumers
                WHERE partition_id = p_partition AND consumer_group = p_group) THEN
        RETURN;
    END IF;
    IF p_group = '__QUEUE_MODE__' THEN
        v_from := '-infinity';
    ELSE
        SELECT subscription_from INTO v_from FROM queen.consumer_subscriptions
         WHERE queue_id = p_queue AND consumer_group = p_group;
        IF NOT FOUND THEN
            v_from := queen.subscription_start(p_sub_mode, p_sub_from);
            INSERT INTO queen.consumer_subscriptions (queue_id, consumer_group, subscription_mode,
                                                      subscription_from)
            VALUES (p_queue, p_group, coalesce(nullif(p_sub_mode, ''), 'all'), v_from)
            ON CONFLICT (queue_id, consumer_group) DO NOTHING;
            SELECT subscription_from INTO v_from FROM queen.consumer_subscriptions
             WHERE queue_id = p_queue AND consumer_group = p_group;
        END IF;
    END IF;
    INSERT INTO queen.partition_consumers (partition_id, consumer_group, cursor_created_at, cursor_id)
    VALUES (p_partition, p_group, v_from,
            CASE WHEN v_from = '-infinity' THEN '00000000-0000-0000-0000-000000000000'::uuid
                 ELSE 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid END)
    ON CONFLICT (partition_id, consumer_group) DO NOTHING;
END
$$;

-- First-contact decision of a named group: a timestamp, "now", or the beginning.
CREATE OR REPLACE FUNCTION queen.subscription_start(p_mode text, p_from text) RETURNS timestamptz
LANGUAGE plpgsql AS $$
BEGIN
    IF p_from IS NOT NULL AND p_from <> '' THEN
        IF lower(p_from) = 'now' THEN
            RETURN now();
        END IF;
        BEGIN
            RETURN p_from::timestamptz;
        EXCEPTION WHEN others THEN
            NULL;  -- an unparsable subscriptionFrom is ignored (2.3.6 point 7)
        END;
    END IF;
    IF p_mode IN ('new', 'new-only') THEN
        RETURN now();
    END IF;
    RETURN '-infinity';
END
$$;

CREATE OR REPLACE FUNCTION queen.format_ts6(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

CREATE OR REPLACE FUNCTION queen.format_ts3(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- Tries to deliver from one partition to one group. Returns the messages (a jsonb array,
-- empty when the partition is leased, cooling down, in its window, or has nothing due).
-- p_lease_id NULL means autoAck: the cursor moves at once and no lease remains.
CREATE OR REPLACE FUNCTION queen.pop_partition(p_partition uuid, p_group text, p_batch integer,
                                               p_lease_id uuid, p_worker text,
                                               p_sub_mode text, p_sub_from text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_part     record;
    v_pc       record;
    v_messages jsonb;
    v_last     record;
    v_count    integer;
    v_lease    integer;
BEGIN
    SELECT p.id, p.name, p.last_message_at, qu.id AS queue_id, qu.name AS queue_name,
           qu.lease_time, qu.delayed_processing, qu.window_buffer
      INTO v_part
      FROM queen.partitions p JOIN queen.queues qu ON qu.id = p.queue_id
     WHERE p.id = p_partition;
    IF NOT FOUND OR v_part.last_message_at IS NULL THEN
        RETURN '[]'::jsonb;
    END IF;
    IF v_part.window_buffer > 0
       AND v_part.last_message_at > now() - make_interval(secs => v_part.window_buffer) THEN
        RETURN '[]'::jsonb;
    END IF;

    PERFORM queen.ensure_consumer(p_partition, v_part.queue_id, p_group, p_sub_mode, p_sub_from);
    -- Another request claiming this partition right now is skipped, never waited for.
    SELECT * INTO v_pc FROM queen.partition_consumers
     WHERE partition_id = p_partition AND consumer_group = p_group
       FOR UPDATE SKIP LOCKED;
    IF NOT FOUND
       OR (v_pc.lease_id IS NOT NULL AND v_pc.lease_expires_at > now())
       OR (v_pc.retry_after IS NOT NULL AND v_pc.retry_after > now()) THEN
        RETURN '[]'::jsonb;
    END IF;

    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'id', m.id,
               'transactionId', m.transaction_id,
               'partitionId', m.partition_id,
               'partition', v_part.name,
               'queue', v_part.queue_name,
               'consumerGroup', p_group,
               'leaseId', coalesce(p_lease_id::text, ''),
               'data', m.payload,
               'isEncrypted', m.is_encrypted,
               'traceId', m.trace_id,
               'producerSub', m.producer_sub,
               'createdAt', queen.format_ts6(m.created_at),
               'retryCount', v_pc.retry_count)
             ORDER BY m.created_at, m.id), '[]'::jsonb),
           count(*)
      INTO v_messages, v_count
      FROM (SELECT * FROM queen.messages m
             WHERE m.partition_id = p_partition
               AND (m.created_at, m.id) > (v_pc.cursor_created_at, v_pc.cursor_id)
               AND (v_part.delayed_processing = 0
                    OR m.created_at <= now() - make_interval(secs => v_part.delayed_processing))
             ORDER BY m.created_at, m.id
             LIMIT greatest(p_batch, 1)) m;

    IF v_count = 0 THEN
        -- A lease that expired with nothing left to redeliver is simply over.
        IF v_pc.lease_id IS NOT NULL THEN
            UPDATE queen.partition_consumers SET lease_id = NULL, lease_expires_at = NULL
             WHERE partition_id = p_partition AND consumer_group = p_group;
        END IF;
        RETURN '[]'::jsonb;
    END IF;

    SELECT m.created_at, m.id INTO v_last
      FROM queen.messages m WHERE m.id = (v_messages->(v_count - 1)->>'id')::uuid;

    IF p_lease_id IS NULL THEN
        UPDATE queen.partition_consumers
           SET cursor_created_at = v_last.created_at, cursor_id = v_last.id,
               lease_id = NULL, lease_expires_at = NULL, retry_count = 0,
               total_consumed = total_consumed + v_count, batches_consumed = batches_consumed + 1,
               last_consumed_at = now(), last_served_at = clock_timestamp(), worker_id = p_worker
         WHERE partition_id = p_partition AND consumer_group = p_group;
    ELSE
        v_lease := CASE WHEN v_part.lease_time > 0 THEN v_part.lease_time ELSE 60 END;
        UPDATE queen.partition_consumers
           SET lease_id = p_lease_id, lease_expires_at = now() + make_interval(secs => v_lease),
               lease_last_created_at = v_last.created_at, lease_last_id = v_last.id,
               lease_count = v_count, last_served_at = clock_timestamp(), worker_id = p_worker
         WHERE partition_id = p_partition AND consumer_group = p_group;
    END IF;
    RETURN v_messages;
END
$$;

-- One pop request. p_req: {queue, partition (null = any), consumerGroup, batch, autoAck,
-- partitions, workerId, subscriptionMode, subscriptionFrom}.
-- Returns {success, queue, partition, partitionId, leaseId, consumerGroup, partitionsClaimed,
-- messages}; messages is empty when nothing could be delivered.
CREATE OR REPLACE FUNCTION queen.pop_request(p_req jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_group      text := coalesce(nullif(p_req->>'consumerGroup', ''), '__QUEUE_MODE__');
    v_batch      integer := greatest(coalesce((p_req->>'batch')::integer, 1), 1);
    v_max_parts  integer := greatest(coalesce((p_req->>'partitions')::integer, 1), 1);
    v_auto_ack   boolean := coalesce((p_req->>'autoAck')::boolean, false);
    v_worker     text := p_req->>'workerId';
    v_sub_mode   text := p_req->>'subscriptionMode';
    v_sub_from   text := p_req->>'subscriptionFrom';
    v_lease_id   uuid := CASE WHEN v_auto_ack THEN NULL ELSE gen_random_uuid() END;
    v_queue      record;
    v_cand       record;
    v_got        jsonb;
    v_messages   jsonb := '[]'::jsonb;
    v_claimed    integer := 0;
    v_first_name text;
    v_first_id   uuid;
BEGIN
    SELECT id, name INTO v_queue FROM queen.queues WHERE name = p_req->>'queue';
    IF NOT FOUND THEN
        RETURN jsonb_build_object('success', true, 'messages', '[]'::jsonb);
    END IF;

    FOR v_cand IN
        SELECT p.id, p.name
          FROM queen.partitions p
          LEFT JOIN queen.partition_consumers pc
                 ON pc.partition_id = p.id AND pc.consumer_group = v_group
         WHERE p.queue_id = v_queue.id
           AND (p_req->>'partition' IS NULL OR p.name = p_req->>'partition')
           AND p.last_message_id IS NOT NULL
           AND (pc.partition_id IS NULL OR (
                    (pc.cursor_created_at, pc.cursor_id) < (p.last_message_at, p.last_message_id)
                AND (pc.lease_id IS NULL OR pc.lease_expires_at <= now())
                AND (pc.retry_after IS NULL OR pc.retry_after <= now())))
         ORDER BY pc.last_served_at NULLS FIRST, p.id
    LOOP
        v_got := queen.pop_partition(v_cand.id, v_group, v_batch - jsonb_array_length(v_messages),
                                     v_lease_id, v_worker, v_sub_mode, v_sub_from);
        IF jsonb_array_length(v_got) > 0 THEN
            IF v_claimed = 0 THEN
                v_first_name := v_cand.name;
                v_first_id := v_cand.id;
            END IF;
            v_claimed := v_claimed + 1;
            v_messages := v_messages || v_got;
            EXIT WHEN v_claimed >= v_max_parts OR jsonb_array_length(v_messages) >= v_batch;
        END IF;
    END LOOP;

    IF v_claimed = 0 AND p_req->>'partition' IS NULL THEN
        INSERT INTO queen.consumer_watermarks (queue_name, consumer_group, last_empty_scan_at, updated_at)
        VALUES (v_queue.name, v_group, now(), now())
        ON CONFLICT (queue_name, consumer_group)
        DO UPDATE SET last_empty_scan_at = now(), updated_at = now();
    END IF;

    RETURN jsonb_build_object(
        'success', true,
        'queue', v_queue.name,
        'partition', v_first_name,
        'partitionId', v_first_id,
        'leaseId', CASE WHEN v_claimed > 0 THEN coalesce(v_lease_id::text, '') ELSE NULL END,
        'consumerGroup', v_group,
        'partitionsClaimed', v_claimed,
        'messages', v_messages);
END
$$;

-- The batch entry point the server calls, and the SQL-level API of WIRE.md 7.2.
-- Input: [{idx, queue_name, partition_name, consumer_group, lease_seconds, worker_id, batch_size,
-- sub_mode, sub_from}] (snake_case, as the official harnesses send) or the camelCase keys of
-- pop_request. Output: [{idx, result}] in input order. One request's error does not fail the
-- others.
CREATE OR REPLACE FUNCTION queen.pop_specific_batch(p_reqs jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_req    jsonb;
    v_idx    integer := 0;
    v_norm   jsonb;
    v_result jsonb;
    v_out    jsonb := '[]'::jsonb;
BEGIN
    FOR v_req IN SELECT e FROM jsonb_array_elements(p_reqs) e LOOP
        v_norm := jsonb_strip_nulls(jsonb_build_object(
            'queue', coalesce(v_req->>'queue', v_req->>'queue_name'),
            'partition', coalesce(v_req->>'partition', v_req->>'partition_name'),
            'consumerGroup', coalesce(v_req->>'consumerGroup', v_req->>'consumer_group'),
            'batch', coalesce(v_req->'batch', v_req->'batch_size'),
            'partitions', v_req->'partitions',
            'autoAck', coalesce(v_req->'autoAck', v_req->'auto_ack'),
            'workerId', coalesce(v_req->>'workerId', v_req->>'worker_id'),
            'subscriptionMode', coalesce(v_req->>'subscriptionMode', v_req->>'sub_mode'),
            'subscriptionFrom', coalesce(v_req->>'subscriptionFrom', v_req->>'sub_from')));
        BEGIN
            v_result := queen.pop_request(v_norm);
        EXCEPTION WHEN others THEN
            v_result := jsonb_build_object('success', false, 'error', SQLERRM,
                                           'messages', '[]'::jsonb);
        END;
        v_out := v_out || jsonb_build_array(jsonb_build_object(
            'idx', coalesce((v_req->>'idx')::integer, v_idx), 'result', v_result));
        v_idx := v_idx + 1;
    END LOOP;
    RETURN v_out;
END
$$;
