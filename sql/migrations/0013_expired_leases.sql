-- Migration 13: leases that expired and were taken over by another pop.
--
-- A transaction names the leases its acks were delivered under (requiredLeases, WIRE.md 9.4)
-- and must fail when one of them expired. queen.run_transaction found an expired lease only
-- on the partition_consumers row that still carried it; once another consumer's pop took the
-- partition over, the row held the new lease and the old one was nowhere, so a late
-- transaction of the first consumer passed (with two leases listed, its ack ops carry no
-- lease to be fenced by) and both consumers' results were committed for one message. A pop
-- that takes over an expired lease now leaves its id here; retention's cleanup forgets the
-- entries after a day (sql/functions/024_retention.sql).
CREATE TABLE queen.expired_leases (
    lease_id   uuid PRIMARY KEY,
    expired_at timestamptz NOT NULL DEFAULT now()
);
