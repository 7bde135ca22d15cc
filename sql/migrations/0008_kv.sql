-- Migration 8: KV state (WIRE2.md 2, 12) and the permits of locks and semaphores (WIRE2.md 4),
-- which are rows of the namespace 'queen-locks'.
--
-- Keys and namespaces are compared byte by byte (COLLATE "C"): listings page in byte order
-- and a prefix is a range of the primary key. A row past expires_at is absent to every read
-- (queries compare it with the call's instant); the sweeper deletes such rows later, through
-- the partial index. Versions come from one sequence without a per-backend cache, so they
-- rise in the order writers take them; writers of one key are serialised by an advisory lock
-- (sql/functions/060_kv.sql), which makes a key's versions rise in commit order: a lock's
-- token (its row's version) is a fencing token.

CREATE SEQUENCE queen.kv_versions AS bigint CACHE 1;

CREATE TABLE queen.kv (
    namespace  text COLLATE "C" NOT NULL,
    key        text COLLATE "C" NOT NULL,
    value      jsonb NOT NULL,
    version    bigint NOT NULL,
    expires_at timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (namespace, key)
);

CREATE INDEX kv_expiry ON queen.kv (expires_at) WHERE expires_at IS NOT NULL;
