-- Consumer-group administration (WIRE.md 3.5): list, lag, detail, delete, subscription
-- timestamp, seeks. Every function is one JSON-in/JSON-out call; the pending lookup of
-- 020_pending_lookup.sql is kept in step wherever cursors are dropped or moved back.

-- Every group that consumes queue p_queue, with its subscription point: the groups with a
-- record for the queue, and the groups subscribed to a namespace/task the queue belongs to
-- (WIRE.md 2.3.6 point 6) that have not popped it yet, whose record is written at their next
-- namespace pop with the namespace record's point (queen.subscribe_scope). Retention and depth
-- count both: a queue made after a group's namespace pop is that group's to consume already.
CREATE OR REPLACE FUNCTION queen.queue_readers(p_queue uuid)
RETURNS TABLE (consumer_group text, subscription_from timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT s.consumer_group, s.subscription_from
      FROM queen.consumer_subscriptions s
     WHERE s.queue_id = p_queue
    UNION ALL
    SELECT ns.consumer_group, min(ns.subscription_from)
      FROM queen.namespace_subscriptions ns
      JOIN queen.queues qu ON qu.id = p_queue
     WHERE (ns.namespace <> '' OR ns.task <> '')
       AND (ns.namespace = '' OR ns.namespace = qu.namespace)
       AND (ns.task = '' OR ns.task = qu.task)
       AND NOT EXISTS (SELECT 1 FROM queen.consumer_subscriptions s
                        WHERE s.queue_id = p_queue AND s.consumer_group = ns.consumer_group)
     GROUP BY ns.consumer_group
$$;

-- The first unconsumed message of a group in a partition: after its cursor, or after its
-- subscription point where it has no cursor yet.
CREATE OR REPLACE FUNCTION queen.first_unconsumed(p_partition uuid, p_after_at timestamptz,
                                                  p_after_id uuid)
RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT m.created_at FROM queen.messages m
     WHERE m.partition_id = p_partition AND (m.created_at, m.id) > (p_after_at, p_after_id)
     ORDER BY m.created_at, m.id LIMIT 1
$$;

-- Lag of every (group, partition) that has work, from the pending lookup (no full scan).
CREATE OR REPLACE FUNCTION queen.group_lag(p_group text DEFAULT NULL)
RETURNS TABLE (consumer_group text, queue_id uuid, partition_id uuid, worker_id text,
               oldest_unconsumed_at timestamptz, offset_lag bigint,
               last_consumed_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT x.consumer_group, x.queue_id, x.partition_id, x.worker_id, x.oldest, x.lag,
           x.last_consumed_at
      FROM (SELECT pp.consumer_group, pp.queue_id, pp.partition_id, pc.worker_id,
                   pc.last_consumed_at,
                   queen.first_unconsumed(pp.partition_id,
                       coalesce(pc.cursor_created_at, s.subscription_from),
                       coalesce(pc.cursor_id, queen.start_cursor_id(s.subscription_from))) AS oldest,
                   (SELECT count(*) FROM queen.messages m
                     WHERE m.partition_id = pp.partition_id
                       AND (m.created_at, m.id) > (coalesce(pc.cursor_created_at, s.subscription_from),
                           coalesce(pc.cursor_id, queen.start_cursor_id(s.subscription_from)))) AS lag
              FROM queen.partition_pending pp
              LEFT JOIN queen.consumer_subscriptions s
                     ON s.queue_id = pp.queue_id AND s.consumer_group = pp.consumer_group
              LEFT JOIN queen.partition_consumers pc
                     ON pc.partition_id = pp.partition_id AND pc.consumer_group = pp.consumer_group
             WHERE p_group IS NULL OR pp.consumer_group = p_group) x
     WHERE x.lag > 0;
END
$$;

-- Takes the exclusive lookup locks of these queues in id order, before an admin change
-- touches cursors: the re-seeding that follows needs them anyway, and taking them first means
-- the change never holds cursor rows while it waits for a push (a transaction that pushes and
-- then acks could otherwise wait on it in turn).
CREATE OR REPLACE FUNCTION queen.lock_lookups(p_queues uuid[]) RETURNS void
LANGUAGE sql AS $$
    SELECT count(pg_advisory_xact_lock(queen.lookup_lock_class(), hashtext(q::text)))
      FROM (SELECT DISTINCT q FROM unnest(p_queues) q ORDER BY q) x
$$;

-- Takes group p_group's claim locks on these queues, in id order, after lock_lookups: a
-- pop making the group's first row in a partition holds its lock shared (ensure_consumer),
-- so a change of the group's cursors waits for that row to commit and then sees it. Per
-- (queue, group): a change of one group never makes another group's pops skip.
CREATE OR REPLACE FUNCTION queen.lock_group_claims(p_queues uuid[], p_group text) RETURNS void
LANGUAGE sql AS $$
    SELECT count(pg_advisory_xact_lock(queen.lookup_lock_class() + 3,
                                       hashtext(q::text || '/' || p_group)))
      FROM (SELECT DISTINCT q FROM unnest(p_queues) q ORDER BY q) x
$$;

-- GET /api/v1/consumer-groups: one row per (group, queue), queue mode included.
CREATE OR REPLACE FUNCTION queen.consumer_groups_list() RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
    WITH pairs AS (
        SELECT s.consumer_group, s.queue_id FROM queen.consumer_subscriptions s
        UNION
        SELECT pc.consumer_group, p.queue_id
          FROM queen.partition_consumers pc JOIN queen.partitions p ON p.id = pc.partition_id
    ), lag AS (
        SELECT l.consumer_group, l.queue_id, count(*) AS partitions_with_lag,
               max(extract(epoch FROM now() - l.oldest_unconsumed_at)) AS max_lag
          FROM queen.group_lag() l GROUP BY 1, 2
    ), usage AS (
        SELECT pc.consumer_group, p.queue_id,
               count(DISTINCT pc.worker_id) FILTER (WHERE pc.lease_id IS NOT NULL
                                                     AND pc.lease_expires_at > now()) AS members,
               bool_or(pc.total_consumed > 0 OR pc.last_consumed_at IS NOT NULL) AS consumed
          FROM queen.partition_consumers pc JOIN queen.partitions p ON p.id = pc.partition_id
         GROUP BY 1, 2
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'name', pr.consumer_group,
               'topics', jsonb_build_array(qu.name),
               'queueName', qu.name,
               'members', coalesce(u.members, 0),
               'partitionsWithLag', coalesce(l.partitions_with_lag, 0),
               'totalLag', NULL,
               'maxTimeLag', coalesce(floor(l.max_lag)::bigint, 0),
               'state', CASE WHEN coalesce(l.max_lag, 0) > 300 THEN 'Lagging'
                             WHEN coalesce(u.consumed, false) THEN 'Stable'
                             ELSE 'Dead' END,
               'subscriptionMode', s.subscription_mode,
               'subscriptionTimestamp', CASE WHEN s.subscription_from = '-infinity' THEN NULL
                                             ELSE queen.format_ts3(s.subscription_from) END,
               'subscriptionCreatedAt', queen.format_ts3(s.created_at))
             ORDER BY pr.consumer_group, qu.name), '[]'::jsonb)
      FROM pairs pr
      JOIN queen.queues qu ON qu.id = pr.queue_id
      LEFT JOIN queen.consumer_subscriptions s
             ON s.queue_id = pr.queue_id AND s.consumer_group = pr.consumer_group
      LEFT JOIN lag l ON l.consumer_group = pr.consumer_group AND l.queue_id = pr.queue_id
      LEFT JOIN usage u ON u.consumer_group = pr.consumer_group AND u.queue_id = pr.queue_id);
END
$$;

-- GET /api/v1/consumer-groups/lagging: partitions whose oldest unconsumed message is at least
-- p_min_seconds old, worst first.
CREATE OR REPLACE FUNCTION queen.consumer_groups_lagging(p_min_seconds integer) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'consumer_group', l.consumer_group, 'queue_name', qu.name,
               'partition_name', p.name, 'partition_id', l.partition_id,
               'worker_id', l.worker_id, 'offset_lag', l.offset_lag,
               'time_lag_seconds', floor(extract(epoch FROM now() - l.oldest_unconsumed_at))::bigint,
               'lag_hours', round((extract(epoch FROM now() - l.oldest_unconsumed_at) / 3600)::numeric, 2),
               'oldest_unconsumed_at', queen.format_ts3(l.oldest_unconsumed_at),
               'last_consumed_at', queen.format_ts3(l.last_consumed_at))
             ORDER BY l.oldest_unconsumed_at, l.consumer_group, p.name), '[]'::jsonb)
      FROM queen.group_lag() l
      JOIN queen.partitions p ON p.id = l.partition_id
      JOIN queen.queues qu ON qu.id = l.queue_id
     WHERE l.oldest_unconsumed_at <= now() - make_interval(secs => p_min_seconds));
END
$$;

-- GET /api/v1/consumer-groups/{group}: per queue, the group's partitions; {} when unknown.
-- A partition is the group's once it has a cursor there, or messages waiting for it there (a
-- subscribed group that has not popped it yet: its lag counts as much as any other).
CREATE OR REPLACE FUNCTION queen.consumer_group_detail(p_group text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
    WITH lag AS (SELECT * FROM queen.group_lag(p_group)),
    cursors AS (SELECT * FROM queen.partition_consumers WHERE consumer_group = p_group),
    rows AS (
        SELECT qu.name AS queue_name, jsonb_build_object(
                   'partition', p.name, 'workerId', pc.worker_id,
                   'lastConsumedAt', queen.format_ts3(pc.last_consumed_at),
                   'totalConsumed', coalesce(pc.total_consumed, 0),
                   'offsetLag', coalesce(l.offset_lag, 0),
                   'timeLagSeconds', coalesce(floor(extract(epoch FROM now() - l.oldest_unconsumed_at))::bigint, 0),
                   'leaseActive', coalesce(pc.lease_id IS NOT NULL AND pc.lease_expires_at > now(),
                                           false)) AS row,
               p.name AS partition_name
          FROM cursors pc
          FULL JOIN lag l ON l.partition_id = pc.partition_id
          JOIN queen.partitions p ON p.id = coalesce(pc.partition_id, l.partition_id)
          JOIN queen.queues qu ON qu.id = p.queue_id
    )
    SELECT coalesce(jsonb_object_agg(queue_name, jsonb_build_object('partitions', parts)), '{}'::jsonb)
      FROM (SELECT queue_name, jsonb_agg(row ORDER BY partition_name) AS parts
              FROM rows GROUP BY queue_name) g);
END
$$;

-- DELETE /api/v1/consumer-groups/{group}[/queues/{queue}]: drops the group's cursors and
-- leases (on one queue or all), its watermark rows, and with p_metadata its subscription
-- records. Kept records re-seed the lookup, so the group starts over from its subscription
-- point. Returns the answer plus the affected queue names (for waking parked pops).
CREATE OR REPLACE FUNCTION queen.delete_consumer_group(p_group text, p_queue text, p_metadata boolean)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_queues  uuid[];
    v_names   text[];
    v_deleted integer;
    v_leases  uuid[];
    v_sub     record;
BEGIN
    SELECT array_agg(id), array_agg(name) INTO v_queues, v_names FROM queen.queues
     WHERE p_queue IS NULL OR name = p_queue;
    v_queues := coalesce(v_queues, '{}');
    v_names := coalesce(v_names, '{}');
    PERFORM queen.lock_lookups(v_queues);
    PERFORM queen.lock_group_claims(v_queues, p_group);

    WITH gone AS (
        DELETE FROM queen.partition_consumers pc USING queen.partitions p
         WHERE pc.partition_id = p.id AND pc.consumer_group = p_group
           AND p.queue_id = ANY(v_queues)
        RETURNING pc.lease_id)
    SELECT count(*), array_agg(lease_id) INTO v_deleted, v_leases FROM gone;
    -- Their holders' late transactions must fail, as after a seek (note_ended_leases).
    PERFORM queen.note_ended_leases(v_leases);
    DELETE FROM queen.partition_pending
     WHERE consumer_group = p_group AND queue_id = ANY(v_queues);
    DELETE FROM queen.consumer_watermarks
     WHERE consumer_group = p_group AND queue_name = ANY(v_names);
    IF p_metadata THEN
        DELETE FROM queen.consumer_subscriptions
         WHERE consumer_group = p_group AND queue_id = ANY(v_queues);
        IF p_queue IS NULL THEN
            DELETE FROM queen.namespace_subscriptions WHERE consumer_group = p_group;
        END IF;
    ELSE
        FOR v_sub IN SELECT * FROM queen.consumer_subscriptions
                      WHERE consumer_group = p_group AND queue_id = ANY(v_queues) LOOP
            PERFORM queen.seed_pending(v_sub.queue_id, p_group, v_sub.subscription_from);
        END LOOP;
    END IF;

    RETURN jsonb_build_object('success', true, 'consumerGroup', p_group,
                              'deletedPartitions', v_deleted, 'metadataDeleted', p_metadata,
                              'queues', to_jsonb(v_names))
        || CASE WHEN p_queue IS NULL THEN '{}'::jsonb
                ELSE jsonb_build_object('queueName', p_queue) END;
END
$$;

-- POST /api/v1/consumer-groups/{group}/subscription: a new starting point for the partitions
-- the group has no cursor in yet (on every queue it subscribed to).
CREATE OR REPLACE FUNCTION queen.set_subscription_timestamp(p_group text, p_ts timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_rows integer;
    v_sub  record;
    v_names text[];
BEGIN
    PERFORM queen.lock_lookups(ARRAY(SELECT queue_id FROM queen.consumer_subscriptions
                                      WHERE consumer_group = p_group));
    PERFORM queen.lock_group_claims(ARRAY(SELECT queue_id FROM queen.consumer_subscriptions
                                           WHERE consumer_group = p_group), p_group);
    UPDATE queen.consumer_subscriptions
       SET subscription_from = p_ts, subscription_mode = 'timestamp'
     WHERE consumer_group = p_group;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    UPDATE queen.namespace_subscriptions
       SET subscription_from = p_ts, subscription_mode = 'timestamp'
     WHERE consumer_group = p_group;
    DELETE FROM queen.consumer_watermarks WHERE consumer_group = p_group;
    FOR v_sub IN SELECT * FROM queen.consumer_subscriptions WHERE consumer_group = p_group LOOP
        PERFORM queen.seed_pending(v_sub.queue_id, p_group, p_ts);
    END LOOP;
    SELECT array_agg(qu.name) INTO v_names
      FROM queen.consumer_subscriptions s JOIN queen.queues qu ON qu.id = s.queue_id
     WHERE s.consumer_group = p_group;
    RETURN jsonb_build_object('success', true, 'consumerGroup', p_group,
                              'newTimestamp', queen.format_ts3(p_ts), 'rowsUpdated', v_rows,
                              'queues', to_jsonb(coalesce(v_names, '{}')));
END
$$;

-- POST /api/v1/consumer-groups/{group}/queues/{queue}/seek: every partition where the group
-- has a cursor moves to its newest message (p_to_end) or to the last message at/before p_ts
-- (none: the start). Leases and retry state end. Moving back re-creates lookup rows.
CREATE OR REPLACE FUNCTION queen.seek_consumer_group(p_group text, p_queue text,
                                                     p_to_end boolean, p_ts timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_queue   uuid;
    v_updated integer;
BEGIN
    -- KEY SHARE: a delete of the queue under way is waited for (then: not found) rather than
    -- met on a foreign key by the rows written below.
    SELECT id INTO v_queue FROM queen.queues WHERE name = p_queue FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    PERFORM queen.lock_lookups(ARRAY[v_queue]);
    PERFORM queen.lock_group_claims(ARRAY[v_queue], p_group);
    -- Every row of the group is locked, leased or not: a pop committing a lease right now
    -- is waited for and its lease read (a lease filter would skip the row it still sees free).
    PERFORM queen.note_ended_leases(ARRAY(
        SELECT pc.lease_id FROM queen.partition_consumers pc
          JOIN queen.partitions p ON p.id = pc.partition_id
         WHERE p.queue_id = v_queue AND pc.consumer_group = p_group
         ORDER BY pc.partition_id FOR UPDATE OF pc));
    WITH targets AS (
        SELECT pc.partition_id,
               CASE WHEN p_to_end THEN p.last_message_at ELSE t.created_at END AS at,
               CASE WHEN p_to_end THEN p.last_message_id ELSE t.id END AS id
          FROM queen.partition_consumers pc
          JOIN queen.partitions p ON p.id = pc.partition_id
          LEFT JOIN LATERAL (SELECT m.created_at, m.id FROM queen.messages m
                              WHERE NOT p_to_end AND m.partition_id = p.id
                                AND m.created_at <= p_ts
                              ORDER BY m.created_at DESC, m.id DESC LIMIT 1) t ON true
         WHERE p.queue_id = v_queue AND pc.consumer_group = p_group
    )
    UPDATE queen.partition_consumers pc
       SET cursor_created_at = coalesce(t.at, '-infinity'),
           cursor_id = coalesce(t.id, '00000000-0000-0000-0000-000000000000'::uuid),
           lease_id = NULL, lease_expires_at = NULL, retry_count = 0, retry_after = NULL
      FROM targets t
     WHERE pc.partition_id = t.partition_id AND pc.consumer_group = p_group
       AND NOT (p_to_end AND t.at IS NULL);
    GET DIAGNOSTICS v_updated = ROW_COUNT;
    IF NOT p_to_end THEN
        DELETE FROM queen.consumer_watermarks WHERE consumer_group = p_group AND queue_name = p_queue;
        PERFORM queen.seed_pending(v_queue, p_group,
            coalesce((SELECT subscription_from FROM queen.consumer_subscriptions
                       WHERE queue_id = v_queue AND consumer_group = p_group), '-infinity'));
    END IF;
    RETURN jsonb_build_object('success', true, 'consumerGroup', p_group, 'queueName', p_queue,
                              'seekToEnd', p_to_end,
                              'targetTimestamp', CASE WHEN p_to_end THEN NULL ELSE queen.format_ts3(p_ts) END,
                              'partitionsUpdated', v_updated);
END
$$;

-- POST …/partitions/{partition}/seek: that partition's cursor to its newest message.
CREATE OR REPLACE FUNCTION queen.seek_consumer_group_partition(p_group text, p_queue text,
                                                               p_partition text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_part record;
BEGIN
    -- KEY SHARE: a delete of the queue under way is waited for (then: not found) rather than
    -- met by the insert below on the foreign key.
    SELECT p.id, p.last_message_at, p.last_message_id INTO v_part
      FROM queen.partitions p JOIN queen.queues qu ON qu.id = p.queue_id
     WHERE qu.name = p_queue AND p.name = p_partition
       FOR KEY SHARE OF p;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('notFound', true);
    END IF;
    PERFORM queen.note_ended_leases(ARRAY(  -- locked leased or not: see above
        SELECT lease_id FROM queen.partition_consumers
         WHERE partition_id = v_part.id AND consumer_group = p_group
           FOR UPDATE));
    INSERT INTO queen.partition_consumers AS pc (partition_id, consumer_group, cursor_created_at, cursor_id)
    VALUES (v_part.id, p_group, coalesce(v_part.last_message_at, '-infinity'),
            coalesce(v_part.last_message_id, '00000000-0000-0000-0000-000000000000'::uuid))
    ON CONFLICT (partition_id, consumer_group) DO UPDATE
       SET cursor_created_at = excluded.cursor_created_at, cursor_id = excluded.cursor_id,
           lease_id = NULL, lease_expires_at = NULL, retry_count = 0, retry_after = NULL;
    RETURN jsonb_build_object('success', true, 'consumerGroup', p_group, 'queueName', p_queue,
                              'partitionName', p_partition, 'updated', true,
                              'cursorMovedTo', v_part.last_message_id);
END
$$;
