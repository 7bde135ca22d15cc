-- Migration 14: the id a partition had when idle-partition cleanup dropped it.
--
-- Stream state (migration 3) is keyed by the source partition's id and is meant to outlive
-- the cleanup of an idle partition, but a push to the name again made a partition with a new
-- id, under which the state was never found again (and stayed, unreachable). The cleanup now
-- keeps the old id here beside the offsets, and queen.create_partitions moves the state of a
-- re-created partition to its new id (sql/functions/002_push.sql). Rows dropped before this
-- migration have none: their state cannot be told apart any more.
ALTER TABLE queen.dropped_partitions ADD COLUMN partition_id uuid;

-- The state of one partition, found without reading every query's: moved here when a
-- dropped partition is made again, deleted with its queue.
CREATE INDEX state_partition ON queen_streams.state (partition_id);
