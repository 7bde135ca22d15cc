-- Migration 4: message positions, so statistics never count messages (issue 18 point 4;
-- sql/functions/022_stats_resources.sql reads them).
--
-- Every message gets seq, its position in its partition: the push numbers what it stores
-- after the partition's last_seq, under the partition lock it already holds, so positions
-- follow the order keys (created_at, id). A cursor remembers the position of the message it
-- stands on (partition_consumers.cursor_seq, set by a trigger wherever a cursor moves), so
-- "how many messages of the partition are at or before this cursor" is arithmetic:
--
--     consumed = 0                                            if cursor_seq < first_seq
--              = cursor_seq - first_seq + 1 - holes <= cursor_seq   otherwise
--
-- first_seq is the position of the oldest stored message (last_seq + 1 when there is none),
-- kept by the delete trigger; partition_holes lists the positions between first_seq and
-- last_seq that hold no message: messages deleted out of order (eviction, a single delete)
-- and the positions of duplicates a push numbered but did not store. Deleting the oldest
-- messages (retention) only moves first_seq and leaves no hole. Nothing here is written per
-- message outside the INSERT that stores it; holes are written per deleting statement.

ALTER TABLE queen.messages ADD COLUMN seq bigint;
ALTER TABLE queen.partitions
    ADD COLUMN last_seq bigint NOT NULL DEFAULT 0,
    ADD COLUMN first_seq bigint NOT NULL DEFAULT 1;
ALTER TABLE queen.partition_consumers ADD COLUMN cursor_seq bigint NOT NULL DEFAULT 0;

CREATE TABLE queen.partition_holes (
    partition_id uuid NOT NULL REFERENCES queen.partitions(id) ON DELETE CASCADE,
    seq_lo       bigint NOT NULL,
    seq_hi       bigint NOT NULL,
    PRIMARY KEY (partition_id, seq_lo)
);

-- Backfill: the messages already stored are numbered 1..n in order-key order, so a database
-- upgraded with messages in it reports the counts the full recount reported.
UPDATE queen.messages m SET seq = n.seq
  FROM (SELECT id, row_number() OVER (PARTITION BY partition_id ORDER BY created_at, id) AS seq
          FROM queen.messages) n
 WHERE m.id = n.id;
ALTER TABLE queen.messages ALTER COLUMN seq SET NOT NULL;

UPDATE queen.partitions p SET last_seq = c.n, first_seq = 1, message_count = c.n
  FROM (SELECT partition_id, count(*) AS n FROM queen.messages GROUP BY partition_id) c
 WHERE p.id = c.partition_id;
UPDATE queen.partitions p SET message_count = 0
 WHERE p.message_count <> 0
   AND NOT EXISTS (SELECT 1 FROM queen.messages m WHERE m.partition_id = p.id);

UPDATE queen.partition_consumers pc
   SET cursor_seq = (SELECT count(*) FROM queen.messages m
                      WHERE m.partition_id = pc.partition_id
                        AND (m.created_at, m.id) <= (pc.cursor_created_at, pc.cursor_id))
 WHERE pc.cursor_created_at > '-infinity';
