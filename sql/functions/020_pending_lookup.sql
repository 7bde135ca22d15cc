-- The pending-partition lookup (DESIGN.md "a small lookup of which partitions have messages
-- newer than a group's cursor"): one row per (queue, group, partition) that may hold work for
-- that group. Pops read it instead of scanning every partition of a queue, so a wildcard pop
-- costs O(pending partitions), not O(partitions). Its tables (partition_pending and
-- namespace_subscriptions) are in migrations/0001_baseline.sql.
--
-- Kept exact in the same transaction as the change that causes it, by triggers, so every
-- writer (HTTP push, transactions, file-buffer replay, the SQL-level push_messages_v2/v3,
-- acks, seeks) keeps it without knowing about it:
--   * a partition whose newest message changes gets a row for every group subscribed to its
--     queue (queen.consumer_subscriptions; queue mode is recorded there at first contact);
--   * a cursor that reaches the row's recorded newest message removes the row;
--   * a group's first contact with a queue seeds rows for partitions newer than its start.
-- A row is a hint, never a promise: pops re-check the partition before delivering, and a row
-- whose partition turns out to be consumed is removed then.
--
-- Races, and why none loses a message:
--   * push vs. cursor advance: the push upserts the row (taking its row lock) with the new
--     newest key; the cursor trigger deletes only rows whose key is <= the cursor and skips
--     rows a push holds locked, so a concurrent push always leaves its row behind.
--   * push vs. first contact: pushes take a shared, first contacts an exclusive advisory lock
--     on the queue, so either the push sees the new subscription row or the seeding sees the
--     pushed partition.

-- Advisory lock spaces (two-int form, so they never collide with one-bigint locks such as the
-- schema installer's or retention's).
CREATE OR REPLACE FUNCTION queen.lookup_lock_class() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 737002 $$;

-- Pushes: every partition whose newest message moved gets a row per subscribed group.
CREATE OR REPLACE FUNCTION queen.on_partitions_advanced() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(queen.lookup_lock_class(), hashtext(q.queue_id::text))
       FROM (SELECT DISTINCT n.queue_id
               FROM new_rows n JOIN old_rows o ON o.id = n.id
              WHERE n.last_message_id IS DISTINCT FROM o.last_message_id
              ORDER BY 1) q;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO queen.partition_pending AS pp
           (queue_id, consumer_group, partition_id, last_message_at, last_message_id)
    SELECT n.queue_id, s.consumer_group, n.id, n.last_message_at, n.last_message_id
      FROM new_rows n
      JOIN old_rows o ON o.id = n.id
      JOIN queen.consumer_subscriptions s ON s.queue_id = n.queue_id
     WHERE n.last_message_id IS DISTINCT FROM o.last_message_id
       AND n.last_message_id IS NOT NULL
     ORDER BY n.queue_id, s.consumer_group, n.id
    ON CONFLICT (queue_id, consumer_group, partition_id) DO UPDATE
       SET last_message_at = excluded.last_message_at, last_message_id = excluded.last_message_id
     WHERE (pp.last_message_at, pp.last_message_id)
           < (excluded.last_message_at, excluded.last_message_id);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER partitions_advanced_lookup
    AFTER UPDATE ON queen.partitions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queen.on_partitions_advanced();

-- Cursors: a group that caught up with a partition no longer needs its row. Rows a push is
-- updating right now are skipped (the push leaves a newer key behind anyway), so this never
-- waits and cannot deadlock with a push.
CREATE OR REPLACE FUNCTION queen.on_cursor_moved() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM queen.partition_pending
     WHERE ctid = (SELECT ctid FROM queen.partition_pending
                    WHERE partition_id = NEW.partition_id
                      AND consumer_group = NEW.consumer_group
                      AND (last_message_at, last_message_id) <= (NEW.cursor_created_at, NEW.cursor_id)
                      FOR UPDATE SKIP LOCKED);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER partition_consumers_cursor_lookup
    AFTER INSERT OR UPDATE OF cursor_created_at, cursor_id ON queen.partition_consumers
    FOR EACH ROW EXECUTE FUNCTION queen.on_cursor_moved();

-- Seeds the rows of one group on one queue: every partition with a message after the group's
-- cursor there, or after p_from where the group has no cursor. Holds the queue's exclusive
-- lookup lock, so no push can slip between the subscription record and this scan. O(partitions
-- of the queue); runs at first contact, on a subscription change, and after cursors were
-- dropped or moved back.
CREATE OR REPLACE FUNCTION queen.seed_pending(p_queue uuid, p_group text, p_from timestamptz)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count   integer;
    v_attempt integer;
BEGIN
    PERFORM pg_advisory_xact_lock(queen.lookup_lock_class(), hashtext(p_queue::text));
    -- A partition the scan still sees can be deleted meanwhile (an idle one by retention's
    -- cleanup, or with its queue): the insert then waits for that delete and fails on the
    -- foreign key. Once it failed the delete has committed, so the scan run again skips it.
    FOR v_attempt IN 1..3 LOOP
        BEGIN
            INSERT INTO queen.partition_pending AS pp
                   (queue_id, consumer_group, partition_id, last_message_at, last_message_id)
            SELECT p.queue_id, p_group, p.id, p.last_message_at, p.last_message_id
              FROM queen.partitions p
              LEFT JOIN queen.partition_consumers pc
                     ON pc.partition_id = p.id AND pc.consumer_group = p_group
             WHERE p.queue_id = p_queue
               AND p.last_message_id IS NOT NULL
               AND CASE WHEN pc.partition_id IS NULL THEN p.last_message_at > p_from
                        ELSE (p.last_message_at, p.last_message_id)
                             > (pc.cursor_created_at, pc.cursor_id)
                   END
             ORDER BY p.id
            ON CONFLICT (queue_id, consumer_group, partition_id) DO UPDATE
               SET last_message_at = excluded.last_message_at,
                   last_message_id = excluded.last_message_id
             WHERE (pp.last_message_at, pp.last_message_id)
                   < (excluded.last_message_at, excluded.last_message_id);
            GET DIAGNOSTICS v_count = ROW_COUNT;
            RETURN v_count;
        EXCEPTION WHEN foreign_key_violation THEN
            IF v_attempt = 3 THEN
                RAISE;
            END IF;
        END;
    END LOOP;
END
$$;
