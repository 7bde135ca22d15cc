-- Migration 12: the offsets of partitions that idle-partition cleanup dropped.
--
-- A partition's highWatermark counts every message it was ever pushed (WIRE2.md 6.1), but it
-- lives in queen.partitions.last_seq, and queen.cleanup_partitions (sql/functions/
-- 024_retention.sql) deletes the rows of empty partitions idle for PARTITION_CLEANUP_DAYS.
-- A push to the name again created a fresh row numbered from offset 0, so a reader resuming
-- at its stored offset met OFFSET_OUT_OF_RANGE and skipped the new messages. The cleanup now
-- leaves last_seq here; queen.create_partitions numbers a re-created partition on from it,
-- and the reads by offset answer a dropped partition as the empty log it is.
CREATE TABLE queen.dropped_partitions (
    queue_id uuid NOT NULL REFERENCES queen.queues(id) ON DELETE CASCADE,
    name     text NOT NULL,
    last_seq bigint NOT NULL,
    PRIMARY KEY (queue_id, name)
);
