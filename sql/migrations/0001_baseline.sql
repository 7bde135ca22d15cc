-- Migration 1, the baseline: every table, index and constraint of the queen schema as the
-- installer before versioned migrations left it (its files 001_schema.sql,
-- 020_pending_lookup.sql and 022_stats_resources.sql). Functions, triggers and views are not
-- here: they live in sql/functions/ and are re-applied when they change.
--
-- Written with IF NOT EXISTS throughout: a database made by that earlier installer already
-- has all of it, so applying this file there changes nothing and records it as version 1
-- (its adoption). Later migrations are plain statements applied exactly once; this one is the
-- only file that must stay idempotent. Never edit it: add a numbered file after it.
--
-- Deleting a queen.queues row removes everything under it at the database level, because the
-- official client harnesses clean up with plain SQL DELETEs. queen.messages has no foreign key
-- to its partition: a trigger (sql/functions/001_partitions_deleted.sql) deletes the messages
-- of deleted partitions instead.

CREATE SCHEMA IF NOT EXISTS queen;

CREATE TABLE IF NOT EXISTS queen.queues (
    id                          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                        text NOT NULL UNIQUE,
    namespace                   text NOT NULL DEFAULT '',
    task                        text NOT NULL DEFAULT '',
    priority                    integer NOT NULL DEFAULT 0,
    lease_time                  integer NOT NULL DEFAULT 300,
    retry_limit                 integer NOT NULL DEFAULT 3,
    retry_delay                 integer NOT NULL DEFAULT 1000,
    max_size                    integer NOT NULL DEFAULT 0,
    ttl                         integer NOT NULL DEFAULT 3600,
    dead_letter_queue           boolean NOT NULL DEFAULT false,
    dlq_after_max_retries       boolean NOT NULL DEFAULT false,
    delayed_processing          integer NOT NULL DEFAULT 0,
    window_buffer               integer NOT NULL DEFAULT 0,
    retention_seconds           integer NOT NULL DEFAULT 0,
    completed_retention_seconds integer NOT NULL DEFAULT 0,
    retention_enabled           boolean NOT NULL DEFAULT false,
    encryption_enabled          boolean NOT NULL DEFAULT false,
    max_wait_time_seconds       integer NOT NULL DEFAULT 0,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now()
);

-- last_message_at / last_message_id: the order key of the newest message. Pushes lock the
-- partition row, so they also serialise the order keys of one partition (WIRE.md 2.2 point 3).
-- message_count: maintained counter behind maxSize (WIRE.md 9.5), never a count(*).
CREATE TABLE IF NOT EXISTS queen.partitions (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    queue_id        uuid NOT NULL REFERENCES queen.queues(id) ON DELETE CASCADE,
    name            text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_activity   timestamptz NOT NULL DEFAULT now(),
    last_message_at timestamptz,
    last_message_id uuid,
    message_count   bigint NOT NULL DEFAULT 0,
    UNIQUE (queue_id, name)
);

CREATE TABLE IF NOT EXISTS queen.messages (
    id             uuid PRIMARY KEY,
    partition_id   uuid NOT NULL,  -- no foreign key: see sql/functions/001_partitions_deleted.sql
    transaction_id text NOT NULL,
    payload        jsonb,
    trace_id       uuid,
    producer_sub   text,
    is_encrypted   boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL,
    UNIQUE (partition_id, transaction_id)
);
CREATE INDEX IF NOT EXISTS messages_partition_order
    ON queen.messages (partition_id, created_at, id);

-- One row per (partition, consumer group): the cursor (everything after it is pending), the
-- lease of the delivery in flight, and the retry state of that delivery.
CREATE TABLE IF NOT EXISTS queen.partition_consumers (
    partition_id          uuid NOT NULL REFERENCES queen.partitions(id) ON DELETE CASCADE,
    consumer_group        text NOT NULL,
    cursor_created_at     timestamptz NOT NULL DEFAULT '-infinity',
    cursor_id             uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',
    lease_id              uuid,
    lease_expires_at      timestamptz,
    lease_last_created_at timestamptz,
    lease_last_id         uuid,
    lease_count           integer NOT NULL DEFAULT 0,
    worker_id             text,
    retry_count           integer NOT NULL DEFAULT 0,
    retry_after           timestamptz,
    total_consumed        bigint NOT NULL DEFAULT 0,
    batches_consumed      bigint NOT NULL DEFAULT 0,
    last_consumed_at      timestamptz,
    last_served_at        timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition_id, consumer_group)
);
CREATE INDEX IF NOT EXISTS partition_consumers_lease
    ON queen.partition_consumers (lease_id) WHERE lease_id IS NOT NULL;

-- Where a named group starts in partitions it has never consumed (WIRE.md 2.3.6).
CREATE TABLE IF NOT EXISTS queen.consumer_subscriptions (
    queue_id          uuid NOT NULL REFERENCES queen.queues(id) ON DELETE CASCADE,
    consumer_group    text NOT NULL,
    subscription_mode text NOT NULL DEFAULT 'all',
    subscription_from timestamptz NOT NULL DEFAULT '-infinity',
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue_id, consumer_group)
);

CREATE TABLE IF NOT EXISTS queen.dead_letter_queue (
    id             bigserial PRIMARY KEY,
    message_id     uuid NOT NULL REFERENCES queen.messages(id) ON DELETE CASCADE,
    partition_id   uuid NOT NULL REFERENCES queen.partitions(id) ON DELETE CASCADE,
    consumer_group text NOT NULL,
    error_message  text,
    retry_count    integer NOT NULL DEFAULT 0,
    failed_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dead_letter_queue_partition
    ON queen.dead_letter_queue (partition_id, failed_at);
CREATE INDEX IF NOT EXISTS dead_letter_queue_message
    ON queen.dead_letter_queue (message_id);

CREATE TABLE IF NOT EXISTS queen.message_traces (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    message_id     uuid NOT NULL REFERENCES queen.messages(id) ON DELETE CASCADE,
    partition_id   uuid NOT NULL REFERENCES queen.partitions(id) ON DELETE CASCADE,
    transaction_id text NOT NULL,
    consumer_group text NOT NULL,
    event_type     text NOT NULL DEFAULT 'info',
    data           jsonb NOT NULL,
    trace_names    text[] NOT NULL DEFAULT '{}',
    worker_id      text,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS message_traces_message
    ON queen.message_traces (partition_id, transaction_id, created_at);

-- Kept for the official JS harness (WIRE.md 7.2, 9.8): never consulted to hide messages.
CREATE TABLE IF NOT EXISTS queen.consumer_watermarks (
    queue_name         text NOT NULL REFERENCES queen.queues(name) ON DELETE CASCADE ON UPDATE CASCADE,
    consumer_group     text NOT NULL,
    last_empty_scan_at timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue_name, consumer_group)
);

-- Cluster-wide flags such as maintenance_mode (WIRE.md 3.7).
CREATE TABLE IF NOT EXISTS queen.system_state (
    key        text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The pending-partition lookup (see sql/functions/020_pending_lookup.sql).
CREATE TABLE IF NOT EXISTS queen.partition_pending (
    queue_id        uuid NOT NULL,
    consumer_group  text NOT NULL,
    partition_id    uuid NOT NULL REFERENCES queen.partitions(id) ON DELETE CASCADE,
    last_message_at timestamptz NOT NULL,
    last_message_id uuid NOT NULL,
    PRIMARY KEY (queue_id, consumer_group, partition_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS partition_pending_by_partition
    ON queen.partition_pending (partition_id, consumer_group);

-- Where a named group starts on queues it first meets through a namespace/task pop
-- (WIRE.md 2.3.6 point 6): consulted after the (group, queue) record, so queues created later
-- join at the namespace subscription's point.
CREATE TABLE IF NOT EXISTS queen.namespace_subscriptions (
    namespace         text NOT NULL,
    task              text NOT NULL,
    consumer_group    text NOT NULL,
    subscription_mode text NOT NULL DEFAULT 'all',
    subscription_from timestamptz NOT NULL DEFAULT '-infinity',
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, task, consumer_group)
);

-- Statistics snapshots (see sql/functions/022_stats_resources.sql).
CREATE TABLE IF NOT EXISTS queen.queue_stats (
    queue_id    uuid PRIMARY KEY REFERENCES queen.queues(id) ON DELETE CASCADE,
    total       bigint NOT NULL DEFAULT 0,
    pending     bigint NOT NULL DEFAULT 0,
    processing  bigint NOT NULL DEFAULT 0,
    completed   bigint NOT NULL DEFAULT 0,
    dead_letter bigint NOT NULL DEFAULT 0,
    computed_at timestamptz NOT NULL DEFAULT now()
);

-- One row: cluster-wide figures of the last refresh and what the next needs for rates.
CREATE TABLE IF NOT EXISTS queen.system_stats (
    id                   integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    ingested_per_second  double precision NOT NULL DEFAULT 0,
    processed_per_second double precision NOT NULL DEFAULT 0,
    consumed_total       bigint NOT NULL DEFAULT 0,
    lag                  jsonb NOT NULL DEFAULT '{}'::jsonb,
    computed_at          timestamptz NOT NULL DEFAULT now()
);
