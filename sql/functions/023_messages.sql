-- Message browsing and operator actions (WIRE.md 3.2): list, detail, delete, retry, dlq, and
-- clearing a queue or partition.

-- Status of one message (3.2): dead_letter if a DLQ row exists; with queue mode, completed
-- at/behind the queue-mode cursor, processing under its live lease, else pending; bus-only
-- partitions are completed once every subscribed group's cursor passed it. A partition queue
-- mode has not reached yet in a queue it reads (a hybrid queue) is not bus-only: queue mode
-- will still deliver its messages, so they are pending.
CREATE OR REPLACE FUNCTION queen.message_status(p_partition uuid, p_queue uuid, p_at timestamptz,
                                                p_id uuid)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_qm     record;
    v_groups integer;
    v_behind integer;
BEGIN
    IF EXISTS (SELECT 1 FROM queen.dead_letter_queue WHERE message_id = p_id) THEN
        RETURN 'dead_letter';
    END IF;
    SELECT * INTO v_qm FROM queen.partition_consumers
     WHERE partition_id = p_partition AND consumer_group = '__QUEUE_MODE__';
    IF FOUND THEN
        IF (p_at, p_id) <= (v_qm.cursor_created_at, v_qm.cursor_id) THEN
            RETURN 'completed';
        END IF;
        IF v_qm.lease_id IS NOT NULL AND v_qm.lease_expires_at > now()
           AND (p_at, p_id) <= (v_qm.lease_last_created_at, v_qm.lease_last_id) THEN
            RETURN 'processing';
        END IF;
        RETURN 'pending';
    END IF;
    IF EXISTS (SELECT 1 FROM queen.consumer_subscriptions
                WHERE queue_id = p_queue AND consumer_group = '__QUEUE_MODE__') THEN
        RETURN 'pending';  -- (queue mode starts at the beginning: see queen.subscribe_group)
    END IF;
    SELECT count(*),
           count(*) FILTER (WHERE CASE WHEN pc.partition_id IS NULL THEN p_at <= s.subscription_from
                                       ELSE (p_at, p_id) <= (pc.cursor_created_at, pc.cursor_id) END)
      INTO v_groups, v_behind
      FROM queen.consumer_subscriptions s
      LEFT JOIN queen.partition_consumers pc
             ON pc.partition_id = p_partition AND pc.consumer_group = s.consumer_group
     WHERE s.queue_id = p_queue AND s.consumer_group <> '__QUEUE_MODE__';
    IF v_groups > 0 AND v_behind = v_groups THEN
        RETURN 'completed';
    END IF;
    IF EXISTS (SELECT 1 FROM queen.partition_consumers pc
                WHERE pc.partition_id = p_partition AND pc.lease_id IS NOT NULL
                  AND pc.lease_expires_at > now()
                  AND (p_at, p_id) > (pc.cursor_created_at, pc.cursor_id)
                  AND (p_at, p_id) <= (pc.lease_last_created_at, pc.lease_last_id)) THEN
        RETURN 'processing';
    END IF;
    RETURN 'pending';
END
$$;

CREATE OR REPLACE FUNCTION queen.queue_mode_of(p_queue uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'hasQueueMode', bool_or(consumer_group = '__QUEUE_MODE__') IS TRUE,
        'busGroupsCount', count(*) FILTER (WHERE consumer_group <> '__QUEUE_MODE__'),
        'type', CASE WHEN bool_or(consumer_group = '__QUEUE_MODE__') IS TRUE
                      AND count(*) FILTER (WHERE consumer_group <> '__QUEUE_MODE__') > 0 THEN 'hybrid'
                     WHEN count(*) FILTER (WHERE consumer_group <> '__QUEUE_MODE__') > 0 THEN 'bus'
                     ELSE 'queue' END)
      FROM queen.consumer_subscriptions WHERE queue_id = p_queue
$$;

-- GET /api/v1/messages. f: {queue?, partition?, ns?, task?, status?, from?, to?, limit, offset}.
-- Newest first. The window is on created_at alone, read per partition through the ordering
-- index: a message's id does not tell its created_at (a fired timer keeps the id minted when
-- it was scheduled, WIRE2 3.1; a client-made id carries the client's clock), so a window on
-- the ids left such messages out.
CREATE OR REPLACE FUNCTION queen.messages_list(f jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_limit  integer := coalesce((f->>'limit')::int, 200);
    v_offset integer := coalesce((f->>'offset')::int, 0);
    v_from   timestamptz := coalesce((f->>'from')::timestamptz, now() - interval '1 hour');
    v_to     timestamptz := coalesce((f->>'to')::timestamptz, now() + interval '1 second');
    v_rows   jsonb;
    v_queue  uuid;
BEGIN
    WITH hits AS (
        SELECT m.*, p.name AS partition_name, p.queue_id, qu.name AS queue_name, qu.namespace,
               qu.task, qu.priority,
               queen.message_status(m.partition_id, p.queue_id, m.created_at, m.id) AS status
          FROM queen.messages m
          JOIN queen.partitions p ON p.id = m.partition_id
          JOIN queen.queues qu ON qu.id = p.queue_id
         WHERE m.created_at BETWEEN v_from AND v_to
           AND (f->>'queue' IS NULL OR qu.name = f->>'queue')
           AND (f->>'partition' IS NULL OR p.name = f->>'partition')
           AND (f->>'ns' IS NULL OR qu.namespace = f->>'ns')
           AND (f->>'task' IS NULL OR qu.task = f->>'task')
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'id', h.id, 'transactionId', h.transaction_id, 'partitionId', h.partition_id,
               'queuePath', h.queue_name || '/' || h.partition_name,
               'queue', h.queue_name, 'partition', h.partition_name,
               'namespace', h.namespace, 'task', h.task,
               'status', h.status, 'queueStatus', h.status,
               'busStatus', jsonb_build_object(
                   'consumedBy', (SELECT count(*) FROM queen.partition_consumers pc
                                   WHERE pc.partition_id = h.partition_id
                                     AND pc.consumer_group <> '__QUEUE_MODE__'
                                     AND (h.created_at, h.id) <= (pc.cursor_created_at, pc.cursor_id)),
                   'totalGroups', (SELECT count(*) FROM queen.consumer_subscriptions s
                                    WHERE s.queue_id = h.queue_id
                                      AND s.consumer_group <> '__QUEUE_MODE__')),
               'traceId', h.trace_id, 'producerSub', h.producer_sub,
               'queuePriority', h.priority,
               'createdAt', queen.format_ts3(h.created_at),
               'leaseExpiresAt', (SELECT queen.format_ts3(pc.lease_expires_at)
                                    FROM queen.partition_consumers pc
                                   WHERE pc.partition_id = h.partition_id
                                     AND pc.consumer_group = '__QUEUE_MODE__'
                                     AND h.status = 'processing'))
             ORDER BY h.created_at DESC, h.id DESC), '[]'::jsonb)
      INTO v_rows
      FROM (SELECT * FROM hits
             WHERE f->>'status' IS NULL OR status = f->>'status'
                OR (f->>'status' = 'failed' AND status = 'dead_letter')
             ORDER BY created_at DESC, id DESC LIMIT v_limit OFFSET v_offset) h;

    SELECT id INTO v_queue FROM queen.queues WHERE name = f->>'queue';
    RETURN jsonb_build_object(
        'messages', v_rows,
        'mode', CASE WHEN v_queue IS NOT NULL THEN queen.queue_mode_of(v_queue)
                     ELSE jsonb_build_object('hasQueueMode', true, 'busGroupsCount', 0,
                                             'type', 'queue') END);
END
$$;

-- GET /api/v1/messages/{partitionId}/{transactionId}; NULL when there is no such message.
CREATE OR REPLACE FUNCTION queen.message_detail(p_partition uuid, p_transaction text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_m record;
BEGIN
    SELECT m.*, p.name AS partition_name, p.queue_id, qu.name AS queue_name, qu.namespace,
           qu.task, qu AS queue_row
      INTO v_m
      FROM queen.messages m
      JOIN queen.partitions p ON p.id = m.partition_id
      JOIN queen.queues qu ON qu.id = p.queue_id
     WHERE m.partition_id = p_partition AND m.transaction_id = p_transaction;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN jsonb_build_object(
        'id', v_m.id, 'transactionId', v_m.transaction_id, 'partitionId', v_m.partition_id,
        'queuePath', v_m.queue_name || '/' || v_m.partition_name,
        'queue', v_m.queue_name, 'partition', v_m.partition_name,
        'namespace', v_m.namespace, 'task', v_m.task,
        'status', queen.message_status(v_m.partition_id, v_m.queue_id, v_m.created_at, v_m.id),
        'payload', v_m.payload, 'isEncrypted', v_m.is_encrypted,
        'traceId', v_m.trace_id, 'producerSub', v_m.producer_sub,
        'createdAt', queen.format_ts3(v_m.created_at),
        'errorMessage', (SELECT d.error_message FROM queen.dead_letter_queue d
                          WHERE d.message_id = v_m.id ORDER BY d.failed_at DESC LIMIT 1),
        'retryCount', coalesce((SELECT max(d.retry_count) FROM queen.dead_letter_queue d
                                 WHERE d.message_id = v_m.id),
                               (SELECT pc.retry_count FROM queen.partition_consumers pc
                                 WHERE pc.partition_id = v_m.partition_id
                                   AND pc.consumer_group = '__QUEUE_MODE__'
                                   AND (v_m.created_at, v_m.id) > (pc.cursor_created_at, pc.cursor_id)), 0),
        'leaseExpiresAt', (SELECT queen.format_ts3(pc.lease_expires_at)
                             FROM queen.partition_consumers pc
                            WHERE pc.partition_id = v_m.partition_id
                              AND pc.consumer_group = '__QUEUE_MODE__'
                              AND pc.lease_id IS NOT NULL AND pc.lease_expires_at > now()
                              AND (v_m.created_at, v_m.id) > (pc.cursor_created_at, pc.cursor_id)
                              AND (v_m.created_at, v_m.id) <= (pc.lease_last_created_at, pc.lease_last_id)),
        'queueConfig', queen.queue_options(v_m.queue_row),
        'mode', queen.queue_mode_of(v_m.queue_id),
        'consumerGroups', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'name', s.consumer_group,
                       'consumed', CASE WHEN pc.partition_id IS NULL THEN v_m.created_at <= s.subscription_from
                                        ELSE (v_m.created_at, v_m.id) <= (pc.cursor_created_at, pc.cursor_id) END,
                       'leaseExpiresAt', CASE WHEN pc.lease_id IS NOT NULL AND pc.lease_expires_at > now()
                                              THEN queen.format_ts3(pc.lease_expires_at) END)
                     ORDER BY s.consumer_group)
              FROM queen.consumer_subscriptions s
              LEFT JOIN queen.partition_consumers pc
                     ON pc.partition_id = v_m.partition_id AND pc.consumer_group = s.consumer_group
             WHERE s.queue_id = v_m.queue_id), '[]'::jsonb));
END
$$;

-- DELETE /api/v1/messages/{partitionId}/{transactionId}.
CREATE OR REPLACE FUNCTION queen.delete_message(p_partition uuid, p_transaction text) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM queen.messages WHERE partition_id = p_partition AND transaction_id = p_transaction;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    RETURN jsonb_build_object('success', true, 'partitionId', p_partition,
                              'transactionId', p_transaction, 'message', 'Message deleted');
END
$$;

-- POST /api/v1/messages/{p}/{t}/retry: forget the message's dead letters and enqueue a copy
-- at the partition tail with transactionId "<orig>:retry:<n>".
-- A message stored in plaintext before its queue began to encrypt cannot be copied as it is
-- (push_store refuses plaintext there, and every retry failed alike): without p_sealed the
-- answer is {seal: its payload as JSON text} for the server to encrypt and call again with.
-- (No default for p_sealed: the two-argument form below stays for servers of the release
-- before, which may re-install their files during a rolling upgrade; with a default, their
-- two-argument calls were ambiguous.)
DROP FUNCTION IF EXISTS queen.retry_message(uuid, text, jsonb);  -- had a default for a day
CREATE OR REPLACE FUNCTION queen.retry_message(p_partition uuid, p_transaction text,
                                               p_sealed jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_m      record;
    v_n      integer;
    v_txid   text;
    v_item   jsonb;
    v_pushed jsonb;
BEGIN
    SELECT m.*, p.name AS partition_name, qu.name AS queue_name,
           qu.encryption_enabled AND NOT m.is_encrypted AS needs_seal INTO v_m
      FROM queen.messages m
      JOIN queen.partitions p ON p.id = m.partition_id
      JOIN queen.queues qu ON qu.id = p.queue_id
     WHERE m.partition_id = p_partition AND m.transaction_id = p_transaction
       FOR KEY SHARE OF m, p;  -- a delete under way is waited for: its copy must not revive it
    IF NOT FOUND THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    IF v_m.needs_seal THEN
        IF p_sealed IS NULL THEN
            RETURN jsonb_build_object('seal', v_m.payload::text);
        END IF;
        v_m.payload := p_sealed;
        v_m.is_encrypted := true;
    END IF;
    SELECT count(*) + 1 INTO v_n FROM queen.messages
     WHERE partition_id = p_partition AND starts_with(transaction_id, p_transaction || ':retry:');
    LOOP
        -- <orig>:retry:<n>, the original cut short where the whole would pass the 255
        -- characters a transactionId may have (WIRE.md 1.4; the loop steps over any clash)
        v_txid := left(p_transaction, 255 - length(':retry:' || v_n)) || ':retry:' || v_n;
        EXIT WHEN NOT EXISTS (SELECT 1 FROM queen.messages
                               WHERE partition_id = p_partition AND transaction_id = v_txid);
        v_n := v_n + 1;
    END LOOP;
    v_item := jsonb_build_object('queue', v_m.queue_name, 'partition', v_m.partition_name,
                                 'payload', v_m.payload, 'transactionId', v_txid,
                                 'isEncrypted', v_m.is_encrypted);
    IF v_m.trace_id IS NOT NULL THEN
        v_item := v_item || jsonb_build_object('traceId', v_m.trace_id);
    END IF;
    IF v_m.producer_sub IS NOT NULL THEN
        v_item := v_item || jsonb_build_object('producerSub', v_m.producer_sub);
    END IF;
    v_pushed := queen.push_messages_core(jsonb_build_array(v_item))::jsonb->'items'->0;
    IF v_pushed->>'status' = 'failed' THEN
        -- (a full queue, at its maxSize): the dead letter stays, nothing was copied
        RETURN jsonb_build_object('refused', v_pushed->>'error');
    END IF;
    DELETE FROM queen.dead_letter_queue WHERE message_id = v_m.id;
    RETURN jsonb_build_object('success', true,
                              'messageId', v_pushed->>'message_id',
                              'transactionId', v_txid,
                              'queue', v_m.queue_name, 'partition', v_m.partition_name);
END
$$;

CREATE OR REPLACE FUNCTION queen.retry_message(p_partition uuid, p_transaction text)
RETURNS jsonb
LANGUAGE sql AS $$ SELECT queen.retry_message(p_partition, p_transaction, NULL::jsonb) $$;

-- POST /api/v1/messages/{p}/{t}/dlq: a dead letter for the group; when it is the group's next
-- pending message, the cursor moves past it.
CREATE OR REPLACE FUNCTION queen.dead_letter_message(p_partition uuid, p_transaction text,
                                                     p_group text, p_error text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_m  record;
    v_pc record;
BEGIN
    SELECT m.id, m.created_at, p.name AS partition_name, qu.name AS queue_name INTO v_m
      FROM queen.messages m
      JOIN queen.partitions p ON p.id = m.partition_id
      JOIN queen.queues qu ON qu.id = p.queue_id
     WHERE m.partition_id = p_partition AND m.transaction_id = p_transaction
       FOR KEY SHARE OF m, p;  -- a delete under way is waited for (then: not found)
    IF NOT FOUND THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    PERFORM queen.add_consumer_row(p_partition, p_group);
    SELECT * INTO v_pc FROM queen.partition_consumers
     WHERE partition_id = p_partition AND consumer_group = p_group FOR UPDATE;
    -- Once per message and group: the request sent again (a retry of a lost answer, a second
    -- click) adds no second dead letter, which /dlq would list and count twice. The group's
    -- row lock above serialises two such requests.
    INSERT INTO queen.dead_letter_queue (message_id, partition_id, consumer_group, error_message)
    SELECT v_m.id, p_partition, p_group, coalesce(p_error, 'Moved to DLQ by operator')
     WHERE NOT EXISTS (SELECT 1 FROM queen.dead_letter_queue d
                        WHERE d.message_id = v_m.id
                          AND d.consumer_group IS NOT DISTINCT FROM p_group);
    IF NOT EXISTS (SELECT 1 FROM queen.messages m
                    WHERE m.partition_id = p_partition
                      AND (m.created_at, m.id) > (v_pc.cursor_created_at, v_pc.cursor_id)
                      AND (m.created_at, m.id) < (v_m.created_at, v_m.id))
       AND (v_m.created_at, v_m.id) > (v_pc.cursor_created_at, v_pc.cursor_id) THEN
        PERFORM queen.note_ended_leases(ARRAY[v_pc.lease_id]);
        UPDATE queen.partition_consumers
           SET cursor_created_at = v_m.created_at, cursor_id = v_m.id,
               lease_id = NULL, lease_expires_at = NULL, retry_count = 0, retry_after = NULL
         WHERE partition_id = p_partition AND consumer_group = p_group;
    END IF;
    RETURN jsonb_build_object('success', true, 'dlq', true, 'queue', v_m.queue_name,
                              'partition', v_m.partition_name);
END
$$;

-- DELETE /api/v1/queues/{queue}/clear[?partition=]: deletes the messages and ends the leases;
-- configuration and cursors stay. Partition rows are locked in id order first, as pushes do,
-- so the message-count trigger cannot deadlock with a push.
CREATE OR REPLACE FUNCTION queen.clear_queue(p_queue text, p_partition text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_parts   uuid[];
    v_deleted bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM queen.queues WHERE name = p_queue) THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    SELECT array_agg(id ORDER BY id) INTO v_parts FROM (
        SELECT p.id FROM queen.partitions p JOIN queen.queues qu ON qu.id = p.queue_id
         WHERE qu.name = p_queue AND (p_partition IS NULL OR p.name = p_partition)
         ORDER BY p.id FOR NO KEY UPDATE OF p) x;
    v_parts := coalesce(v_parts, '{}');
    DELETE FROM queen.messages WHERE partition_id = ANY(v_parts);
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    PERFORM queen.note_ended_leases(ARRAY(
        SELECT lease_id FROM queen.partition_consumers
         WHERE partition_id = ANY(v_parts) AND lease_id IS NOT NULL
         ORDER BY partition_id, consumer_group FOR UPDATE));
    UPDATE queen.partition_consumers
       SET lease_id = NULL, lease_expires_at = NULL, retry_count = 0, retry_after = NULL
     WHERE partition_id = ANY(v_parts) AND lease_id IS NOT NULL;
    DELETE FROM queen.partition_pending WHERE partition_id = ANY(v_parts);
    RETURN jsonb_build_object('success', true, 'queue', p_queue, 'partition', p_partition,
                              'deleted', v_deleted);
END
$$;
