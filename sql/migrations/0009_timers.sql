-- Migration 9: durable timers (WIRE2.md 3, 12). A timer is a message staged under
-- (queue, timer_key) that becomes an ordinary message of its queue when it fires
-- (sql/functions/062_timers.sql). Timers are keyed by names, not by queue ids: they survive
-- the deletion of their queue, and a fired timer re-creates it as a push would.
--
-- timer_key sorts in byte order (COLLATE "C"): the list route pages by it.
-- payload: the bytes the scheduler sent (base64-decoded), or the encryption envelope's JSON
-- when the queue encrypts; peek answers them as stored. body: the decompressed JSON of a
-- payload_zstd payload, so a fire never needs to decompress (NULL otherwise: the payload is
-- the JSON text itself).
-- visible_at: when a sweeper may take the row next. It is deliver_at when scheduled, the end
-- of the claim while a sweeper holds one (claimed_until, claim_token), and the end of the
-- backoff after a failed fire; sweepers read due rows, and the next wake-up, from its index.

CREATE TABLE queen.timers (
    queue         text NOT NULL,
    timer_key     text COLLATE "C" NOT NULL,
    partition     text NOT NULL DEFAULT 'Default',
    deliver_at    timestamptz NOT NULL,
    visible_at    timestamptz NOT NULL,
    txn           text NOT NULL,
    message_id    uuid NOT NULL,
    payload       bytea NOT NULL,
    payload_zstd  boolean NOT NULL DEFAULT false,
    body          jsonb,
    encrypted     boolean NOT NULL DEFAULT false,
    producer_sub  text,
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text,
    claim_token   uuid,
    claimed_until timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, timer_key)
);
CREATE INDEX timers_visible ON queen.timers (visible_at);

-- Timers whose fire failed five times (a full queue, a key missing for an encrypted queue):
-- the row as it was, with the last error, for an operator to read. Keyed like the timers,
-- and not tied to a queue row either.
CREATE TABLE queen.timer_dead_letters (
    id            bigserial PRIMARY KEY,
    queue         text NOT NULL,
    timer_key     text COLLATE "C" NOT NULL,
    partition     text NOT NULL,
    deliver_at    timestamptz NOT NULL,
    txn           text NOT NULL,
    message_id    uuid NOT NULL,
    payload       bytea NOT NULL,
    payload_zstd  boolean NOT NULL,
    body          jsonb,
    encrypted     boolean NOT NULL,
    producer_sub  text,
    attempts      integer NOT NULL,
    last_error    text,
    failed_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX timer_dead_letters_queue ON queen.timer_dead_letters (queue, failed_at);
