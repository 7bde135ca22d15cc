-- Migration 7: a named consumer group's conflation policy (WIRE2 8.4, last-value delivery).
--
-- Stored beside the subscription record (WIRE.md 2.3.6), because it is decided at the same
-- moment: the group's first contact with the queue (queen.subscribe, 003_pop.sql), from that
-- pop's conflation=true. It never changes afterwards (a later request that disagrees gets
-- conflationConflict and the stored value); deleting the group's metadata deletes the record
-- and with it the policy, which is how an operator changes it. Queue mode never conflates.
-- Records made before this migration are non-conflating groups, as they were.

ALTER TABLE queen.consumer_subscriptions ADD COLUMN conflation boolean NOT NULL DEFAULT false;
