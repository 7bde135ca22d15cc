-- Retention, eviction and partition cleanup (WIRE.md 2.1, 8 rows 21-22, 9.6; 7.1 row 23).
-- Called by the background services; every call is one transaction that first takes the
-- cluster-wide advisory lock (upstream's id 737001) with a try, so only one instance cleans
-- at a time and a busy lock just skips this turn.
--
-- Deadlocks: deleting messages fires the message-count trigger, which updates the partitions
-- rows. Pushes lock partition rows in id order, so a cycle first collects the doomed messages,
-- then locks their partitions in id order, and only then deletes.

-- The point up to which every consumer of the partition's queue has consumed: the smallest
-- cursor over its readers (queen.queue_readers: a group without a cursor there counts at its
-- subscription point). NULL when no group ever subscribed.
CREATE OR REPLACE FUNCTION queen.consumed_by_all(p_partition uuid, p_queue uuid,
                                                 OUT at timestamptz, OUT id uuid)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(pc.cursor_created_at, s.subscription_from),
           coalesce(pc.cursor_id, queen.start_cursor_id(s.subscription_from))
      FROM queen.queue_readers(p_queue) s
      LEFT JOIN queen.partition_consumers pc
             ON pc.partition_id = p_partition AND pc.consumer_group = s.consumer_group
     ORDER BY 1, 2
     LIMIT 1
$$;

-- Whether a message is out on a live lease (inside the span some group's delivery in flight
-- covers). Retention and eviction leave it until the lease ends: deleted under it, its ack
-- would find nothing and the lease would hold the partition until it expired.
CREATE OR REPLACE FUNCTION queen.out_on_lease(p_partition uuid, p_at timestamptz, p_id uuid)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM queen.partition_consumers pc
                    WHERE pc.partition_id = p_partition
                      AND pc.lease_id IS NOT NULL AND pc.lease_expires_at > now()
                      AND (p_at, p_id) > (pc.cursor_created_at, pc.cursor_id)
                      AND (p_at, p_id) <= (pc.lease_last_created_at, pc.lease_last_id))
$$;

-- One bounded cleanup step: at most p_batch messages deleted, spread over the rules asked
-- for. Returns {locked, retention, completed, evicted, more, busy}; more = the batch was
-- full and some of it went; busy = partitions in use by a pop, ack or push, left over.
CREATE OR REPLACE FUNCTION queen.cleanup_cycle(p_batch integer, p_retention boolean,
                                               p_eviction boolean)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_ids       uuid[];
    v_parts     uuid[];
    v_groups    uuid[];   -- a partition id per group row this step holds
    v_held      uuid[];   -- the partitions it holds whole: cleaned now
    v_busy      integer := 0;  -- the partitions left to the next step
    v_retention integer := 0;
    v_completed integer := 0;
    v_evicted   integer := 0;
    v_whys      text[];
BEGIN
    IF NOT pg_try_advisory_xact_lock(737001) THEN
        RETURN jsonb_build_object('locked', false, 'more', false);
    END IF;
    -- Taken-over leases are remembered for the transactions of their old holders, which
    -- come within a lease time or so (migration 13): a day is plenty.
    DELETE FROM queen.expired_leases WHERE expired_at < now() - interval '1 day';

    WITH doomed AS (
        SELECT d.id, d.partition_id, d.why FROM (
            SELECT m.id, m.partition_id, 'retention' AS why
              FROM queen.queues qu
              JOIN queen.partitions p ON p.queue_id = qu.id
              CROSS JOIN LATERAL (
                  SELECT m.id, m.partition_id FROM queen.messages m
                   WHERE m.partition_id = p.id
                     AND m.created_at < now() - make_interval(secs => qu.retention_seconds)
                     AND NOT queen.out_on_lease(m.partition_id, m.created_at, m.id)
                   ORDER BY m.created_at, m.id LIMIT p_batch) m
             WHERE p_retention AND qu.retention_seconds > 0
            UNION ALL
            SELECT m.id, m.partition_id, 'completed'
              FROM queen.queues qu
              JOIN queen.partitions p ON p.queue_id = qu.id
              CROSS JOIN LATERAL queen.consumed_by_all(p.id, qu.id) c
              CROSS JOIN LATERAL (
                  SELECT m.id, m.partition_id FROM queen.messages m
                   WHERE m.partition_id = p.id
                     AND m.created_at < now() - make_interval(secs => qu.completed_retention_seconds)
                     AND (m.created_at, m.id) <= (c.at, c.id)
                     -- a dead letter is not completed: kept for its operator (WIRE.md 9.3,
                     -- never silently dropped) until retried, deleted or retentionSeconds
                     AND NOT EXISTS (SELECT 1 FROM queen.dead_letter_queue d
                                      WHERE d.message_id = m.id)
                   ORDER BY m.created_at, m.id LIMIT p_batch) m
             WHERE p_retention AND qu.completed_retention_seconds > 0 AND c.at IS NOT NULL
            UNION ALL
            SELECT m.id, m.partition_id, 'evicted'
              FROM queen.queues qu
              JOIN queen.partitions p ON p.queue_id = qu.id
              LEFT JOIN LATERAL queen.consumed_by_all(p.id, qu.id) c ON true
              CROSS JOIN LATERAL (
                  SELECT m.id, m.partition_id FROM queen.messages m
                   WHERE m.partition_id = p.id
                     AND m.created_at < now() - make_interval(secs => qu.max_wait_time_seconds)
                     AND (c.at IS NULL OR (m.created_at, m.id) > (c.at, c.id))
                     AND NOT queen.out_on_lease(m.partition_id, m.created_at, m.id)
                   ORDER BY m.created_at, m.id LIMIT p_batch) m
             WHERE p_eviction AND qu.max_wait_time_seconds > 0
        ) d
        LIMIT p_batch
    ), unique_doomed AS (
        SELECT DISTINCT ON (id) id, partition_id, why FROM doomed ORDER BY id, why
    )
    SELECT array_agg(id), array_agg(DISTINCT partition_id), array_agg(why)
      INTO v_ids, v_parts, v_whys
      FROM unique_doomed;

    IF v_ids IS NOT NULL THEN
        -- No pop may hand out a message this step deletes (its ack would find nothing). A
        -- partition is cleaned only when the step holds it whole: its row FOR UPDATE (a
        -- group's first pop, which makes its row, waits) and every group's row FOR SHARE (a
        -- pop's SKIP LOCKED passes the partition by). Nothing here waits: a partition a pop,
        -- an ack or a push is using now is left to the next step. (Waiting deadlocked with
        -- callers that hold a group's row and then need a partition's: a transaction's acks
        -- and pushes, a fused ack that dead-letters.)
        v_busy := cardinality(v_parts);
        v_parts := ARRAY(SELECT p.id FROM queen.partitions p WHERE p.id = ANY(v_parts)
                          ORDER BY p.id FOR UPDATE SKIP LOCKED);
        v_busy := v_busy - cardinality(v_parts);
        v_groups := ARRAY(SELECT pc.partition_id FROM queen.partition_consumers pc
                           WHERE pc.partition_id = ANY(v_parts)
                           ORDER BY pc.partition_id, pc.consumer_group FOR SHARE SKIP LOCKED);
        v_held := ARRAY(SELECT p FROM unnest(v_parts) AS p
                         WHERE (SELECT count(*) FROM unnest(v_groups) AS g WHERE g = p)
                               = (SELECT count(*) FROM queen.partition_consumers pc
                                   WHERE pc.partition_id = p));
        v_busy := v_busy + cardinality(v_parts) - cardinality(v_held);
        -- Asked again: this statement's snapshot sees the leases committed since the scan.
        WITH gone AS (
            DELETE FROM queen.messages m
             WHERE m.id = ANY(v_ids) AND m.partition_id = ANY(v_held)
               AND NOT queen.out_on_lease(m.partition_id, m.created_at, m.id)
            RETURNING m.id
        )
        SELECT count(*) FILTER (WHERE d.why = 'retention'),
               count(*) FILTER (WHERE d.why = 'completed'),
               count(*) FILTER (WHERE d.why = 'evicted')
          INTO v_retention, v_completed, v_evicted
          FROM gone JOIN unnest(v_ids, v_whys) AS d(id, why) ON d.id = gone.id;
    END IF;

    RETURN jsonb_build_object('locked', true, 'retention', v_retention, 'completed', v_completed,
                              'evicted', v_evicted,
                              -- (a full batch of nothing but busy partitions' messages
                                      -- is not more: the caller decides on busy ones)
                              'more', coalesce(array_length(v_ids, 1), 0) >= p_batch
                                      AND v_retention + v_completed + v_evicted > 0,
                              'busy', v_busy);
END
$$;

-- Drops partitions without messages that saw no activity for p_days days (never the
-- Default partition, whose id configure reports). Rows a push holds are skipped.
CREATE OR REPLACE FUNCTION queen.cleanup_partitions(p_days integer, p_batch integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    IF p_days <= 0 OR NOT pg_try_advisory_xact_lock(737001) THEN
        RETURN 0;
    END IF;
    -- The offsets stay (migration 12): the name, pushed to again, numbers on from them; and
    -- the old id (migration 14), so that its stream state follows it there.
    WITH gone AS (
        DELETE FROM queen.partitions
         WHERE id IN (SELECT p.id FROM queen.partitions p
                       WHERE p.message_count = 0 AND p.name <> 'Default'
                         AND p.last_activity < now() - make_interval(days => p_days)
                         AND NOT EXISTS (SELECT 1 FROM queen.messages m WHERE m.partition_id = p.id)
                         AND NOT EXISTS (SELECT 1 FROM queen.partition_consumers pc
                                          WHERE pc.partition_id = p.id AND pc.lease_id IS NOT NULL
                                            AND pc.lease_expires_at > now())
                       ORDER BY p.id LIMIT p_batch
                       FOR UPDATE OF p SKIP LOCKED)
        RETURNING id, queue_id, name, last_seq
    ), kept AS (
        INSERT INTO queen.dropped_partitions (queue_id, name, last_seq, partition_id)
        SELECT queue_id, name, last_seq, id FROM gone WHERE last_seq > 0
        ON CONFLICT (queue_id, name) DO UPDATE
           SET last_seq = excluded.last_seq, partition_id = excluded.partition_id
    )
    SELECT count(*) INTO v_count FROM gone;
    RETURN v_count;
END
$$;
