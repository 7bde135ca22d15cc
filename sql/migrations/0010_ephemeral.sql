-- Migration 10: declared ephemeral queues (WIRE2.md 7). Only the options a queue was
-- configured with are stored; its messages live in one server's RAM and are never written.
CREATE TABLE queen.ephemeral_queues (
    name       text PRIMARY KEY,
    options    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
