-- Migration 3: the Streams API's tables (WIRE.md 3.9), in their own schema queen_streams so
-- the streaming SDKs' state can be read, backed up and granted apart from the broker's.
--
-- queries: one row per registered streaming query. ``name`` is the SDK's queryId; the server
-- hands out ``id``, which every cycle and state read names. ``config_hash`` fingerprints the
-- operator chain: registering the same name with another hash is refused (409) unless the
-- caller asks for a reset, which wipes the query's state.
--
-- state: the operators' state, one row per (query, source partition, key). A partition is
-- leased to one worker of a consumer group at a time, so all writes to one (query, partition)
-- come from the worker holding that lease; the cycle function checks the lease and serialises
-- on the pair anyway (sql/functions/050_streams.sql). No foreign key to queen.partitions:
-- state outlives the cleanup of an idle partition, and goes with its query (or a reset).
-- The official JS harness cleans up with DELETE FROM queen_streams.queries WHERE name LIKE
-- 'test-%' (WIRE.md 7.2): the cascade takes the state along.

CREATE SCHEMA queen_streams;

CREATE TABLE queen_streams.queries (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text NOT NULL UNIQUE,
    source_queue text NOT NULL,
    sink_queue   text,
    config_hash  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE queen_streams.state (
    query_id     uuid NOT NULL REFERENCES queen_streams.queries(id) ON DELETE CASCADE,
    partition_id uuid NOT NULL,
    key          text NOT NULL,
    value        jsonb NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (query_id, partition_id, key)
);
