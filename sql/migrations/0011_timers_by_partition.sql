-- Migration 11: the due timers of one target partition, in the order they fire. A sweep
-- takes a timer only when no earlier due timer of the same partition is left behind (held by
-- another sweeper, or deferred because another transaction holds the partition), so that a
-- partition's timers fire in order (sql/functions/062_timers.sql, queen.timers_sweep); this
-- index answers that question with one probe.
CREATE INDEX timers_by_partition ON queen.timers (queue, partition, visible_at, timer_key);
