-- queen-tw schema, version 1.
-- Every statement is idempotent: the installer may run this file on a database that already
-- has it. Deleting a queen.queues row removes everything under it at the database level,
-- because the official client harnesses clean up with plain SQL DELETEs.

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
    partition_id   uuid NOT NULL,  -- no foreign key: see on_partitions_deleted below
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

-- A foreign key on messages.partition_id checked every inserted row, ~12 % of a push. The push
-- locks its partition rows until commit (002_push.sql), so no partition can vanish under a
-- message being inserted, and deleting partitions deletes their messages here, as the
-- ON DELETE CASCADE did (queue deletes reach it through partitions' own cascade).
ALTER TABLE queen.messages DROP CONSTRAINT IF EXISTS messages_partition_id_fkey;

CREATE OR REPLACE FUNCTION queen.on_partitions_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM queen.messages m USING deleted_partitions d WHERE m.partition_id = d.id;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER partitions_deleted_messages
    AFTER DELETE ON queen.partitions
    REFERENCING OLD TABLE AS deleted_partitions
    FOR EACH STATEMENT EXECUTE FUNCTION queen.on_partitions_deleted();

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
