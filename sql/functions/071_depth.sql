-- Queue depth (WIRE2 10, GET /api/v1/resources/queues/{queue}/depth[?group=]): per partition
-- the stored messages after a group's cursor, by position arithmetic (migration 4: seq,
-- first_seq, holes), never by counting messages.

-- Where group p_group stands in partition p_partition, as a position: its cursor's, or where
-- its subscription (queen.queue_readers) starts it (the last message at or before its time),
-- or 0 (the beginning) when it has neither.
CREATE OR REPLACE FUNCTION queen.depth_position(p_partition uuid, p_queue uuid, p_group text)
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT pc.cursor_seq FROM queen.partition_consumers pc
          WHERE pc.partition_id = p_partition AND pc.consumer_group = p_group),
        (SELECT m.seq FROM queen.queue_readers(p_queue) s
           JOIN LATERAL (SELECT m.seq FROM queen.messages m
                          WHERE m.partition_id = p_partition
                            AND (m.created_at, m.id)
                                <= (s.subscription_from, queen.start_cursor_id(s.subscription_from))
                          ORDER BY m.created_at DESC, m.id DESC LIMIT 1) m ON true
          WHERE s.consumer_group = p_group),
        0)
$$;

-- The depth report of queue p_queue for group p_group, or NULL when there is no such queue.
-- Without a group each partition reports the worst pending of the queue's readers (queue
-- mode's when nobody reads it). effectivePending counts handler runs still owed:
-- partitionsPending for a conflating group (one delivery per partition), pending otherwise.
CREATE OR REPLACE FUNCTION queen.queue_depth(p_queue text, p_group text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH q AS (SELECT qu.id, qu.name FROM queen.queues qu WHERE qu.name = p_queue),
    readers AS (
        SELECT p_group AS consumer_group WHERE p_group IS NOT NULL
        UNION ALL
        SELECT s.consumer_group FROM q, queen.queue_readers(q.id) s
         WHERE p_group IS NULL
        UNION ALL
        SELECT '__QUEUE_MODE__' WHERE p_group IS NULL AND NOT EXISTS (
            SELECT 1 FROM q, queen.queue_readers(q.id))),
    per_partition AS (
        SELECT p.name, max(p.message_count - queen.stored_through(
                   p.id, p.first_seq, p.last_seq,
                   queen.depth_position(p.id, q.id, r.consumer_group))) AS pending
          FROM q JOIN queen.partitions p ON p.queue_id = q.id CROSS JOIN readers r
         GROUP BY p.id, p.name),
    policy AS (
        SELECT coalesce((SELECT s.conflation FROM queen.consumer_subscriptions s JOIN q
                                 ON s.queue_id = q.id
                          WHERE s.consumer_group = p_group), false) AS conflation),
    totals AS (
        SELECT coalesce(sum(pending), 0)::bigint AS pending,
               count(*) FILTER (WHERE pending > 0) AS partitions_pending,
               coalesce(jsonb_agg(jsonb_build_object('partition', name, 'pending', pending)
                                  ORDER BY name), '[]'::jsonb) AS partitions
          FROM per_partition)
    SELECT jsonb_build_object(
               'queue', q.name, 'group', p_group, 'pending', t.pending,
               'partitionsPending', t.partitions_pending, 'conflation', policy.conflation,
               'effectivePending', CASE WHEN policy.conflation THEN t.partitions_pending
                                        ELSE t.pending END,
               'partitions', t.partitions)
      FROM q, totals t, policy
$$;
