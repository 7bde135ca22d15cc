-- Migration 6: per-partition offsets and the time of each partition's last write (WIRE2.md
-- 6.1, 6.3; read by POST /api/v1/fetch and POST /api/v1/partitions/changed, see
-- sql/functions/070_fetch.sql, and by every pop, which hands out each message's offset).
--
-- A message's offset is seq - 1, migration 4's position, not a column of its own. seq is
-- already what an offset must be in every way but one: assigned by the push under the
-- partition lock it holds to commit, so in commit order; never rewritten by a delete
-- (retention moves first_seq, other deletes leave holes). The one way it fell short: the push
-- numbered the duplicates it then did not store, leaving holes in live positions. From this
-- migration on only what the push stores keeps a number (sql/functions/002_push.sql closes
-- the gaps of a push that met duplicates before it commits), so seq is dense and
--
--     offset = seq - 1,  highWatermark = last_seq,  logStartOffset = first_seq - 1.
--
-- A second column would be another number per message kept in step with the first (eight
-- bytes a row and a second counter under the same lock) to say the same thing. The statistics
-- arithmetic of migration 4 is unchanged: partition_holes now holds deleted positions only.
--
-- Existing databases: partition_holes cannot tell a duplicate's position from a deleted
-- message's, and no offset was ever handed out before this migration, so the stored messages
-- of every partition with holes are renumbered densely from their oldest one (which keeps
-- its position, so the deleted prefix stays counted in logStartOffset); last_seq follows,
-- the holes go, and the cursors of those partitions take the positions of the messages they
-- stand on (what the trigger on partition_consumers computes). Partitions without holes keep
-- every position as it is.

CREATE TEMPORARY TABLE renumbered_partitions ON COMMIT DROP AS
    SELECT DISTINCT partition_id FROM queen.partition_holes;

UPDATE queen.messages m SET seq = r.seq
  FROM (SELECT x.id,
               min(x.seq) OVER (PARTITION BY x.partition_id) - 1
               + row_number() OVER (PARTITION BY x.partition_id ORDER BY x.seq) AS seq
          FROM queen.messages x
         WHERE x.partition_id IN (SELECT partition_id FROM renumbered_partitions)) r
 WHERE m.id = r.id AND m.seq <> r.seq;

UPDATE queen.partitions p SET first_seq = s.first_seq, last_seq = s.last_seq
  FROM (SELECT partition_id, min(seq) AS first_seq, max(seq) AS last_seq
          FROM queen.messages
         WHERE partition_id IN (SELECT partition_id FROM renumbered_partitions)
         GROUP BY partition_id) s
 WHERE p.id = s.partition_id;

UPDATE queen.partition_consumers pc
   SET cursor_seq = coalesce(
           (SELECT m.seq FROM queen.messages m
             WHERE m.partition_id = pc.partition_id
               AND (m.created_at, m.id) <= (pc.cursor_created_at, pc.cursor_id)
             ORDER BY m.created_at DESC, m.id DESC LIMIT 1), 0)
 WHERE pc.partition_id IN (SELECT partition_id FROM renumbered_partitions);

DELETE FROM queen.partition_holes;

-- Reads by offset find their first record with one probe; unique, so a numbering fault
-- fails its push instead of handing two messages one offset.
CREATE UNIQUE INDEX messages_partition_seq ON queen.messages (partition_id, seq);

-- When the partition last stored a message: the push's transaction start (now()), so a
-- reader's safeTime, bounded by the start of the oldest transaction still running, never
-- passes a write that is not visible yet (see queen.partitions_changed). Partitions written
-- before this migration take the time of their newest message.
ALTER TABLE queen.partitions ADD COLUMN last_write_at timestamptz;
UPDATE queen.partitions SET last_write_at = last_message_at WHERE last_message_at IS NOT NULL;
CREATE INDEX partitions_last_write ON queen.partitions (queue_id, last_write_at, name);
