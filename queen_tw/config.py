"""Server configuration: one table of options, read once from CLI flags and the environment.

Every option is an environment variable (the upstream names of WIRE.md section 5) and a
command-line flag of ``twistd queen``.  :data:`OPTIONS` is the only list of them: the
``usage.Options`` flags, the environment parsing, ``--help`` and the README table are all
generated from it.  Precedence is CLI > environment > default.  The result is a frozen
:class:`Config` that is passed down; no other module reads the server's options from
``os.environ`` (the CLI tools read QUEEN_URL/QUEEN_TOKEN, the worker processes their
parent's marker, the embedded PostgreSQL passes the environment on to its tools).

Upstream names that queen-tw accepts and ignores are listed in :data:`IGNORED_ENV`.

Run ``python -m queen_tw.config --markdown`` to print the option table for the README.
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from psycopg2.extensions import make_dsn, parse_dsn
from twisted.python import usage

from queen_tw.auth.keys import key_family, load_public_key
from queen_tw.cluster.peers import parse_peers
from queen_tw.logs import route_twistd
from queen_tw.startup import refuse_to_start

MiB = 1024 * 1024


class ConfigError(ValueError):
    """A configuration value was refused; the message starts with the environment name."""


@dataclass(frozen=True)
class OptionSpec:
    """One configurable option: how it is named, parsed, bounded and explained.

    ``kind`` picks the parser (see ``_PARSERS``).  ``minimum``/``maximum`` bound numbers,
    ``choices`` bound strings.  The CLI flag is derived from the environment name so the
    two can never drift apart: ``QUEEN_`` is dropped, the rest is lower-cased and dashed
    (``DB_POOL_SIZE`` -> ``--db-pool-size``, ``QUEEN_EMBEDDED_PG`` -> ``--embedded-pg``).
    """

    field: str
    env: str
    kind: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """The long CLI flag without the leading dashes."""
        return self.env.removeprefix("QUEEN_").lower().replace("_", "-")

    def shown_default(self) -> str:
        """The default as a person would type it (used in ``--help`` and the README)."""
        if self.default is None:
            return "unset"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if self.default == "":
            return '""'
        return str(self.default)


def _opt(field: str, env: str, kind: str, default: Any, help: str, **bounds: Any) -> OptionSpec:
    """Shorthand that keeps the table below one row per option."""
    return OptionSpec(field, env, kind, default, help, **bounds)


def _batcher_options(op: str, preferred: int, hold_ms: int, max_batch: int,
                     concurrent: int) -> tuple[OptionSpec, ...]:
    """The four QUEEN_<OP>_* knobs of one operation's Batcher (see engine/batcher.py)."""
    env = f"QUEEN_{op.upper()}"
    return (
        _opt(f"{op}_preferred_batch_size", f"{env}_PREFERRED_BATCH_SIZE", "int", preferred,
             f"{op}: items that trigger a flush while another call is in flight", minimum=1),
        _opt(f"{op}_max_hold_ms", f"{env}_MAX_HOLD_MS", "int", hold_ms,
             f"{op}: longest wait for more requests to fuse, in ms", minimum=0),
        _opt(f"{op}_max_batch_size", f"{env}_MAX_BATCH_SIZE", "int", max_batch,
             f"{op}: most items in one database call", minimum=1),
        _opt(f"{op}_max_concurrent", f"{env}_MAX_CONCURRENT", "int", concurrent,
             f"{op}: database calls in flight at once (all operations share DB_POOL_SIZE)",
             minimum=1),
    )


LOG_LEVELS = ("trace", "debug", "info", "warn", "error")
SUBSCRIPTION_MODES = ("", "all", "new", "new-only")

OPTIONS: tuple[OptionSpec, ...] = (
    # --- server -------------------------------------------------------------------------
    _opt("port", "PORT", "int", 6632, "HTTP port (0 picks a free port)", minimum=0, maximum=65535),
    _opt("host", "HOST", "str", "0.0.0.0", "HTTP bind address"),
    _opt("num_workers", "NUM_WORKERS", "int", 1,
         "Worker processes sharing the port (upstream: event-loop threads, default 10)", minimum=1),
    _opt("worker_id", "WORKER_ID", "str", "queen-tw-1",
         "Name of this instance in /health, logs and pg_stat_activity"),
    _opt("log_level", "LOG_LEVEL", "choice", "info",
         "Least severe log lines written: trace (same as debug), debug, info, warn or error",
         choices=LOG_LEVELS),
    _opt("log_format", "LOG_FORMAT", "choice", "text",
         "text (twistd's log lines) or json (one object per line: time, level, namespace, "
         "message, fields)", choices=("text", "json")),
    _opt("access_log", "ACCESS_LOG", "bool", True,
         "One info log line per request (method, path, status, duration, bytes, request id, "
         "peer), namespace queen_tw.access"),
    # --- PostgreSQL ---------------------------------------------------------------------
    _opt("pg_host", "PG_HOST", "str", "localhost",
         "PostgreSQL host name or unix-socket directory; a comma list (host[:port] each, a "
         "missing port is PG_PORT) connects to whichever is read-write (primary failover)"),
    _opt("pg_port", "PG_PORT", "ports", "5432",
         "PostgreSQL port (1-65535), or a comma list of them matching PG_HOST's hosts one "
         "to one"),
    _opt("pg_user", "PG_USER", "str", "postgres", "PostgreSQL user"),
    _opt("pg_password", "PG_PASSWORD", "str", "postgres", "PostgreSQL password"),
    _opt("pg_db", "PG_DB", "str", "postgres", "PostgreSQL database (the schema is always queen)"),
    _opt("pg_use_ssl", "PG_USE_SSL", "bool", False, "Connect with TLS"),
    _opt("pg_ssl_reject_unauthorized", "PG_SSL_REJECT_UNAUTHORIZED", "bool", True,
         "With PG_USE_SSL: true = sslmode require, false = sslmode prefer"),
    _opt("pg_dsn", "QUEEN_PG_DSN", "str", "",
         "Full libpq connection string (keywords or postgresql:// URI), e.g. several hosts "
         "with target_session_attrs=read-write; replaces PG_HOST, PG_PORT, PG_USER, "
         "PG_PASSWORD, PG_DB and the SSL flags; the DB_* session settings are still added"),
    _opt("db_pool_size", "DB_POOL_SIZE", "int", 10,
         "PostgreSQL connections in the pool (upstream's 150 is sized for a C++ server)",
         minimum=1),
    _opt("db_connection_timeout_ms", "DB_CONNECTION_TIMEOUT", "int", 2000,
         "Connect timeout in ms (libpq rounds up to whole seconds, minimum 2); 0 = none: "
         "a connect then waits as long as the network lets it", minimum=0),
    _opt("db_statement_timeout_ms", "DB_STATEMENT_TIMEOUT", "int", 30000,
         "statement_timeout in ms, 0 = none", minimum=0),
    _opt("db_lock_timeout_ms", "DB_LOCK_TIMEOUT", "int", 10000,
         "lock_timeout in ms, 0 = none", minimum=0),
    # --- pop and long polling -----------------------------------------------------------
    _opt("default_timeout_ms", "DEFAULT_TIMEOUT", "int", 30000,
         "Long-poll timeout in ms when a pop gives none", minimum=0),
    _opt("default_batch_size", "DEFAULT_BATCH_SIZE", "int", 1,
         "Messages per pop when a pop gives no batch", minimum=1),
    _opt("default_subscription_mode", "DEFAULT_SUBSCRIPTION_MODE", "choice", "",
         'Subscription mode of a new consumer group: "" or all = from the start, '
         "new or new-only = only later messages", choices=SUBSCRIPTION_MODES),
    _opt("pop_wait_initial_interval_ms", "POP_WAIT_INITIAL_INTERVAL_MS", "int", 100,
         "Fallback re-check interval of a parked long-poll, in ms", minimum=1),
    _opt("pop_wait_backoff_threshold", "POP_WAIT_BACKOFF_THRESHOLD", "int", 3,
         "Empty re-checks before the interval starts to grow", minimum=0),
    _opt("pop_wait_backoff_multiplier", "POP_WAIT_BACKOFF_MULTIPLIER", "float", 2.0,
         "Growth factor of the re-check interval", minimum=1.0),
    _opt("pop_wait_max_interval_ms", "POP_WAIT_MAX_INTERVAL_MS", "int", 1000,
         "Largest re-check interval, in ms", minimum=1),
    # --- background jobs ----------------------------------------------------------------
    _opt("retention_interval_ms", "RETENTION_INTERVAL", "int", 300000,
         "Retention cycle period in ms", minimum=1),
    _opt("retention_batch_size", "RETENTION_BATCH_SIZE", "int", 1000,
         "Rows deleted per retention statement", minimum=1),
    _opt("eviction_interval_ms", "EVICTION_INTERVAL", "int", 60000,
         "Eviction (max wait time) cycle period in ms", minimum=1),
    _opt("eviction_batch_size", "EVICTION_BATCH_SIZE", "int", 1000,
         "Rows evicted per statement", minimum=1),
    _opt("stats_interval_ms", "STATS_INTERVAL_MS", "int", 10000,
         "Statistics refresh period in ms", minimum=1),
    _opt("timers_sweep_interval_ms", "QUEEN_TIMERS_SWEEP_INTERVAL_MS", "int", 1000,
         "Longest sleep of the timer sweeper, in ms (it wakes when the next timer is due; "
         "this bounds how late a timer scheduled on another instance fires)", minimum=10),
    _opt("timers_sweep_batch", "QUEEN_TIMERS_SWEEP_BATCH", "int", 500,
         "Due timers fired per sweep transaction", minimum=1, maximum=10000),
    _opt("partition_cleanup_days", "PARTITION_CLEANUP_DAYS", "int", 30,
         "Drop empty partitions idle for this many days (never a Default partition); "
         "0 = never", minimum=0),
    _opt("metrics_sample_interval_ms", "METRICS_SAMPLE_INTERVAL_MS", "int", 1000,
         "How often event-loop lag, memory, CPU, pool and file buffer are sampled, in ms",
         minimum=10),
    _opt("metrics_aggregate_interval_s", "METRICS_AGGREGATE_INTERVAL_S", "int", 60,
         "How often each worker writes its metrics rows to PostgreSQL, in seconds", minimum=1),
    _opt("metrics_retention_days", "METRICS_RETENTION_DAYS", "int", 90,
         "Metrics rows older than this many days are deleted", minimum=1),
    # --- file buffer (PostgreSQL outage) ------------------------------------------------
    _opt("file_buffer_dir", "FILE_BUFFER_DIR", "str", "/var/lib/queen/buffers",
         "Directory of the failover buffer; one per instance"),
    _opt("file_buffer_flush_ms", "FILE_BUFFER_FLUSH_MS", "int", 100,
         "How often buffered pushes are flushed and replayed, in ms", minimum=1),
    _opt("file_buffer_max_batch", "FILE_BUFFER_MAX_BATCH", "int", 100,
         "Buffered events per replay transaction", minimum=1),
    _opt("file_buffer_events_per_file", "FILE_BUFFER_EVENTS_PER_FILE", "int", 10000,
         "Events per buffer file before it is rotated", minimum=1),
    _opt("file_buffer_failed_retry_ms", "FILE_BUFFER_FAILED_RETRY_MS", "int", 60000,
         "How long records the replay gave up on (failed/) wait before another round, in ms; "
         "doubles while they keep failing, up to an hour; 0 = never", minimum=0),
    _opt("db_inflight_deadline_ms", "LIBQUEEN_INFLIGHT_DEADLINE_MS", "int", 0,
         "Longest wait for one database call before it counts as an outage (pushes then go "
         "to the file buffer), in ms, at least 2000; 0 = DB_STATEMENT_TIMEOUT + 5000 (35000 "
         "when DB_STATEMENT_TIMEOUT is 0)", minimum=0),
    _opt("cache_refresh_interval_ms", "QUEEN_CACHE_REFRESH_INTERVAL_MS", "int", 60000,
         "How often the maintenance flags are re-read from PostgreSQL, in ms", minimum=100),
    # --- batching engine (one Batcher per operation type) -------------------------------
    *_batcher_options("push", preferred=50, hold_ms=20, max_batch=500, concurrent=4),
    *_batcher_options("pop", preferred=20, hold_ms=5, max_batch=200, concurrent=3),
    *_batcher_options("ack", preferred=50, hold_ms=20, max_batch=500, concurrent=3),
    # One transaction per call and one call at a time, as upstream: concurrent transactions
    # locking the same partitions in different orders would deadlock each other.
    *_batcher_options("transaction", preferred=1, hold_ms=0, max_batch=1, concurrent=1),
    *_batcher_options("renew_lease", preferred=10, hold_ms=100, max_batch=100, concurrent=2),
    _opt("max_pending_items", "QUEEN_MAX_PENDING_ITEMS", "int", 20000,
         "Items queued per operation type while the database is busy; beyond it requests "
         "get 503 with Retry-After", minimum=1),
    # --- limits, encryption, development ------------------------------------------------
    _opt("max_body_bytes", "QUEEN_MAX_BODY_BYTES", "int", 64 * MiB,
         "Largest accepted request body in bytes; a larger one answers 413 before it is "
         "read (a chunked one at the chunk header that takes it past) and the connection "
         "closes", minimum=1),
    _opt("request_read_timeout_ms", "QUEEN_REQUEST_READ_TIMEOUT_MS", "int", 120000,
         "Time a request's headers and body may take to arrive, from its first byte, in ms; "
         "then 408 and the connection is closed (0 = no limit). A connection with no request "
         "under way is closed after 60 s, or a second after this when shorter", minimum=0),
    _opt("max_client_connections", "QUEEN_MAX_CLIENT_CONNECTIONS", "int", 0,
         "Open connections one client address may hold; a connection beyond it is answered "
         "503 and closed (0 = no limit; behind a proxy every client has the proxy's "
         "address)", minimum=0),
    _opt("max_push_items", "QUEEN_MAX_PUSH_ITEMS", "int", 100000,
         "Most messages one push, transaction or stream cycle may carry (JSON or binary, "
         "counted before a compressed body is expanded); beyond it 413", minimum=1),
    _opt("encryption_key", "QUEEN_ENCRYPTION_KEY", "key", None,
         "64 hex characters (AES-256) for encrypted queues; unset = off (configuring an "
         "encrypted queue is then refused); malformed = refuse to start. "
         "Prefer the environment: flags show up in ps"),
    _opt("listen", "QUEEN_LISTEN", "str", "",
         "Twisted endpoint description of the HTTP listener, e.g. "
         "ssl:6632:privateKey=key.pem:certKey=cert.pem, tcp:6632:interface=127.0.0.1 or "
         "unix:/run/queen.sock; empty = tcp on HOST:PORT (NUM_WORKERS > 1 needs it empty)"),
    _opt("listen_fd", "QUEEN_LISTEN_FD", "int", None,
         "Serve on this inherited listening socket instead of PORT (set by NUM_WORKERS for "
         "its worker processes; not for direct use)", minimum=0),
    _opt("embedded_pg", "QUEEN_EMBEDDED_PG", "path", None,
         "Run a private PostgreSQL in this directory (needs queen-tw[embedded]); "
         "for development, overrides the PG_* connection"),
    # --- cluster: UDP peer sync (WIRE.md 6) ---------------------------------------------
    _opt("udp_peers", "QUEEN_UDP_PEERS", "str", "",
         "Peers to sync with over UDP: comma list of host[:port] (http:// and a trailing / "
         "are stripped; the port defaults to QUEEN_UDP_NOTIFY_PORT); empty = sync off"),
    _opt("udp_notify_port", "QUEEN_UDP_NOTIFY_PORT", "int", 6633,
         "UDP port of peer sync, and the default port of each peer (0 picks a free port)",
         minimum=0, maximum=65535),
    _opt("udp_bind", "QUEEN_UDP_BIND", "str", "",
         "Address the peer-sync UDP socket binds; empty = HOST"),
    _opt("sync_enabled", "QUEEN_SYNC_ENABLED", "bool", True,
         "false turns peer sync off even when QUEEN_UDP_PEERS is set"),
    _opt("sync_secret", "QUEEN_SYNC_SECRET", "str", "",
         "HMAC-SHA256 key of the peer datagrams (same on every instance); empty = unsigned. "
         "Prefer the environment: flags show up in ps"),
    _opt("sync_heartbeat_ms", "QUEEN_SYNC_HEARTBEAT_MS", "int", 1000,
         "Period of the heartbeat sent to every peer, in ms", minimum=10),
    _opt("sync_dead_threshold_ms", "QUEEN_SYNC_DEAD_THRESHOLD_MS", "int", 5000,
         "A peer is dead after this long without a heartbeat, in ms (more than "
         "QUEEN_SYNC_HEARTBEAT_MS)", minimum=1),
    _opt("sync_recv_buffer_mb", "QUEEN_SYNC_RECV_BUFFER_MB", "int", 8,
         "Receive buffer of the peer-sync socket in MiB; 0 = the system default",
         minimum=0, maximum=2047),  # SO_RCVBUF takes a C int of bytes
    _opt("queue_config_ttl_ms", "QUEEN_QUEUE_CONFIG_TTL_MS", "int", 5000,
         "How long a queue's encryption flag is cached, in ms: the longest a queue switched "
         "to encryptionEnabled on another instance can be missed when no peer datagram "
         "arrives; 0 = read it from PostgreSQL on every push (and, without a key, every pop "
         "of a queue)", minimum=0),
    _opt("sync_fd", "QUEEN_SYNC_FD", "int", None,
         "Use this inherited UDP socket for peer sync (set by NUM_WORKERS for worker 1; "
         "not for direct use)", minimum=0),
    # --- ephemeral queues (WIRE2.md 7; RAM only, per instance) --------------------------
    _opt("ephemeral_max_bytes", "QUEEN_EPHEMERAL_MAX_BYTES", "int", 256 * MiB,
         "Payload bytes all ephemeral queues of this instance may hold together; a push "
         "beyond it answers 503 ephemeral_unavailable; 0 = no limit", minimum=0),
    _opt("ephemeral_queue_max_bytes", "QUEEN_EPHEMERAL_QUEUE_MAX_BYTES", "int", 16 * MiB,
         "maxBytes of an ephemeral queue that declares none", minimum=1),
    _opt("ephemeral_queue_max_length", "QUEEN_EPHEMERAL_QUEUE_MAX_LENGTH", "int", 10000,
         "maxLength (messages) of an ephemeral queue that declares none", minimum=1),
    _opt("ephemeral_lease_s", "QUEEN_EPHEMERAL_LEASE_S", "int", 30,
         "leaseSeconds of an ephemeral queue that declares none", minimum=1, maximum=86400),
    _opt("ephemeral_retry_limit", "QUEEN_EPHEMERAL_RETRY_LIMIT", "int", 3,
         "retryLimit (redeliveries before a message is dropped) of an ephemeral queue that "
         "declares none", minimum=0, maximum=1000),
    _opt("ephemeral_refresh_ms", "QUEEN_EPHEMERAL_REFRESH_MS", "int", 30000,
         "How often the declared ephemeral queues are re-read from PostgreSQL, in ms (a "
         "configure or delete made on another instance reaches this one within it)",
         minimum=100),
    _opt("ephemeral_peers", "QUEEN_EPHEMERAL_PEERS", "str", "",
         "Comma list of the base URLs (http://host:port) of every instance serving ephemeral "
         "queues, this one included, the same on each: a queue is owned by one of them and "
         "the others relay its requests there; empty = this instance serves its own"),
    _opt("ephemeral_self", "QUEEN_EPHEMERAL_SELF", "str", "",
         "This instance's entry in QUEEN_EPHEMERAL_PEERS (required with it)"),
    # --- JWT authentication (WIRE.md 4) -------------------------------------------------
    _opt("jwt_enabled", "JWT_ENABLED", "bool", False,
         "Require a bearer token (JWT) on every route but the skipped paths"),
    _opt("jwt_algorithm", "JWT_ALGORITHM", "named", "HS256",
         "HS256 (JWT_SECRET), RS256 (RS256/384/512 by JWT_PUBLIC_KEY, else JWT_JWKS_URL), "
         "EdDSA (Ed25519 by JWT_PUBLIC_KEY, else JWT_JWKS_URL) or auto (by the token's alg, "
         "among the algorithms of the configured keys)",
         choices=("HS256", "RS256", "EdDSA", "auto")),
    _opt("jwt_secret", "JWT_SECRET", "str", "",
         "HS256 shared secret; required with JWT_ALGORITHM=HS256 (the server refuses to start "
         "without it). Prefer the environment: flags show up in ps"),
    _opt("jwt_jwks_url", "JWT_JWKS_URL", "str", "",
         "http(s) URL of the identity provider's key set (JWKS) for RS256/EdDSA tokens"),
    _opt("jwt_public_key", "JWT_PUBLIC_KEY", "str", "",
         "RSA or Ed25519 public key: PEM text (newlines may be written \\n) or the path of a "
         "PEM file; used before JWT_JWKS_URL"),
    _opt("jwt_issuer", "JWT_ISSUER", "str", "", "Required iss claim; empty = not checked"),
    _opt("jwt_audience", "JWT_AUDIENCE", "str", "", "Required aud claim; empty = not checked"),
    _opt("jwt_clock_skew", "JWT_CLOCK_SKEW", "int", 30,
         "Leeway in seconds for exp, nbf and iat", minimum=0),
    _opt("jwt_skip_paths", "JWT_SKIP_PATHS", "str", "/health,/metrics/prometheus,/metrics,/",
         "Comma list of paths served without a token (exact, or a prefix when the entry "
         "ends in / and is not /)"),
    _opt("jwt_jwks_refresh_interval", "JWT_JWKS_REFRESH_INTERVAL", "int", 3600,
         "Seconds after which the JWKS is fetched again (in the background)", minimum=1),
    _opt("jwt_jwks_timeout_ms", "JWT_JWKS_TIMEOUT_MS", "int", 5000,
         "Longest wait for the JWKS, in ms", minimum=1),
    _opt("jwt_roles_claim", "JWT_ROLES_CLAIM", "str", "role", "Claim holding one role name"),
    _opt("jwt_roles_array_claim", "JWT_ROLES_ARRAY_CLAIM", "str", "roles",
         "Claim holding an array of role names"),
    _opt("jwt_role_admin", "JWT_ROLE_ADMIN", "str", "admin", "Role name of the admin level"),
    _opt("jwt_role_read_write", "JWT_ROLE_READ_WRITE", "str", "read-write",
         "Role name of the read-write level"),
    _opt("jwt_role_read_only", "JWT_ROLE_READ_ONLY", "str", "read-only",
         "Role name of the read-only level"),
)

# Upstream or seed names that queen-tw accepts and ignores (WIRE.md section 5,
# "Seeds only / retired").  Nothing reads them; the list exists for documentation.
IGNORED_ENV: tuple[str, ...] = (
    "POLL_WORKER_INTERVAL", "POLL_DB_INTERVAL", "POLL_MAX_INTERVAL", "BATCH_INSERT_SIZE",
    "BATCH_PUSH_TARGET_SIZE_MB", "BATCH_PUSH_MAX_SIZE_MB", "DB_POOL_ACQUISITION_TIMEOUT",
    "DB_QUERY_TIMEOUT", "DB_MAX_RETRIES", "LOG_TIMESTAMP",
    # upstream's (WIRE.md 5) with no meaning here: its libpq, sidecar, thread pools, response
    # pump, concurrency control and partition cache (keepalives: set them in QUEEN_PG_DSN)
    "WEBAPP_ROOT", "DB_IDLE_TIMEOUT", "DB_TCP_USER_TIMEOUT_MS", "DB_KEEPALIVES_IDLE",
    "DB_KEEPALIVES_INTERVAL", "DB_KEEPALIVES_COUNT", "DB_THREAD_POOL_SERVICE_THREADS",
    "SIDECAR_POOL_SIZE", "SIDECAR_MICRO_BATCH_WAIT_MS", "SIDECAR_MAX_ITEMS_PER_TX",
    "SIDECAR_MAX_BATCH_SIZE", "SIDECAR_MAX_PENDING_COUNT", "QUEUE_BACKOFF_CLEANUP_THRESHOLD",
    "RESPONSE_TIMER_INTERVAL_MS", "RESPONSE_BATCH_SIZE", "RESPONSE_BATCH_MAX",
    "QUEEN_CONCURRENCY_MODE", "QUEEN_VEGAS_MIN_LIMIT", "QUEEN_VEGAS_MAX_LIMIT",
    "QUEEN_VEGAS_ALPHA", "QUEEN_VEGAS_BETA", "QUEEN_VEGAS_RTT_WINDOW_SAMPLES",
    "QUEEN_VEGAS_RTT_MIN_WINDOW_SEC", "QUEEN_VEGAS_UPDATE_INTERVAL_MS",
    "QUEEN_CUSTOM_PREFERRED_BATCH_SIZE", "QUEEN_CUSTOM_MAX_HOLD_MS",
    "QUEEN_CUSTOM_MAX_BATCH_SIZE", "QUEEN_CUSTOM_MAX_CONCURRENT",
    "STATS_RECONCILE_INTERVAL_MS", "STATS_HISTORY_RETENTION_DAYS",
    "PARTITION_LOOKUP_RECONCILE_INTERVAL_MS", "PARTITION_LOOKUP_RECONCILE_LOOKBACK_SECONDS",
    "QUEEN_CACHE_PARTITION_MAX", "QUEEN_CACHE_PARTITION_TTL_MS",
)


@dataclass(frozen=True)
class Config:
    """The parsed, validated settings of one server process (see :data:`OPTIONS`).

    Build it with :meth:`from_sources` (or :meth:`defaults` in tests); defaults live in the
    option table only.  ``warnings`` holds messages the server should log at start.
    ``migrate_only`` is a run mode, not a
    setting: the ``--migrate-only`` flag of :data:`RUN_FLAGS`, with no environment variable
    (set in a service's environment it would make every restart exit).  Secrets are kept
    out of ``repr``.
    """

    port: int
    host: str
    num_workers: int
    worker_id: str
    log_level: str
    log_format: str
    access_log: bool
    pg_host: str
    pg_port: str
    pg_user: str
    pg_password: str = dataclasses.field(repr=False)
    pg_db: str
    pg_use_ssl: bool
    pg_ssl_reject_unauthorized: bool
    pg_dsn: str = dataclasses.field(repr=False)
    db_pool_size: int
    db_connection_timeout_ms: int
    db_statement_timeout_ms: int
    db_lock_timeout_ms: int
    default_timeout_ms: int
    default_batch_size: int
    default_subscription_mode: str
    pop_wait_initial_interval_ms: int
    pop_wait_backoff_threshold: int
    pop_wait_backoff_multiplier: float
    pop_wait_max_interval_ms: int
    retention_interval_ms: int
    retention_batch_size: int
    eviction_interval_ms: int
    eviction_batch_size: int
    stats_interval_ms: int
    timers_sweep_interval_ms: int
    timers_sweep_batch: int
    partition_cleanup_days: int
    metrics_sample_interval_ms: int
    metrics_aggregate_interval_s: int
    metrics_retention_days: int
    file_buffer_dir: str
    file_buffer_flush_ms: int
    file_buffer_max_batch: int
    file_buffer_events_per_file: int
    file_buffer_failed_retry_ms: int
    db_inflight_deadline_ms: int
    cache_refresh_interval_ms: int
    push_preferred_batch_size: int
    push_max_hold_ms: int
    push_max_batch_size: int
    push_max_concurrent: int
    pop_preferred_batch_size: int
    pop_max_hold_ms: int
    pop_max_batch_size: int
    pop_max_concurrent: int
    ack_preferred_batch_size: int
    ack_max_hold_ms: int
    ack_max_batch_size: int
    ack_max_concurrent: int
    transaction_preferred_batch_size: int
    transaction_max_hold_ms: int
    transaction_max_batch_size: int
    transaction_max_concurrent: int
    renew_lease_preferred_batch_size: int
    renew_lease_max_hold_ms: int
    renew_lease_max_batch_size: int
    renew_lease_max_concurrent: int
    max_pending_items: int
    max_body_bytes: int
    max_client_connections: int
    max_push_items: int
    request_read_timeout_ms: int
    encryption_key: bytes | None = dataclasses.field(repr=False)
    listen: str
    listen_fd: int | None
    embedded_pg: str | None
    udp_peers: str
    udp_notify_port: int
    udp_bind: str
    sync_enabled: bool
    sync_secret: str = dataclasses.field(repr=False)
    sync_heartbeat_ms: int
    sync_dead_threshold_ms: int
    sync_recv_buffer_mb: int
    queue_config_ttl_ms: int
    sync_fd: int | None
    jwt_enabled: bool
    jwt_algorithm: str
    jwt_secret: str = dataclasses.field(repr=False)
    jwt_jwks_url: str
    jwt_public_key: str
    jwt_issuer: str
    jwt_audience: str
    jwt_clock_skew: int
    jwt_skip_paths: str
    jwt_jwks_refresh_interval: int
    jwt_jwks_timeout_ms: int
    jwt_roles_claim: str
    jwt_roles_array_claim: str
    jwt_role_admin: str
    jwt_role_read_write: str
    jwt_role_read_only: str
    ephemeral_max_bytes: int
    ephemeral_queue_max_bytes: int
    ephemeral_queue_max_length: int
    ephemeral_lease_s: int
    ephemeral_retry_limit: int
    ephemeral_refresh_ms: int
    ephemeral_peers: str
    ephemeral_self: str
    migrate_only: bool = False
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_sources(
        cls, env: Mapping[str, str], cli: Mapping[str, str | None]
    ) -> Config:
        """Parse every option once: CLI value if given (not None), else env, else default.

        ``cli`` is keyed by field name (``"db_pool_size"``); a None value means "flag not
        given".  Raises :class:`ConfigError` naming the environment variable of the first
        bad value, so the operator knows what to fix whichever way it was set.
        """
        unknown = set(cli) - _FIELDS
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        warnings: list[str] = []
        for spec in OPTIONS:
            raw = cli.get(spec.field)
            if raw is None:
                raw = env.get(spec.env)
            values[spec.field] = _parse(spec, raw, warnings)
        _check_cross_field(values)
        warnings.extend(f"{name} is an upstream setting queen-tw accepts and ignores"
                        for name in IGNORED_ENV if env.get(name))
        return cls(**values, warnings=tuple(warnings))

    @classmethod
    def defaults(cls) -> Config:
        """The configuration with nothing set (handy in tests)."""
        return cls.from_sources({}, {})

    def with_changes(self, **changes: Any) -> Config:
        """A copy with some fields replaced; no re-validation (tests and embedded mode)."""
        return dataclasses.replace(self, **changes)

    @property
    def sync_wanted(self) -> bool:
        """Peer sync runs: peers are configured and QUEEN_SYNC_ENABLED is not false."""
        return self.sync_enabled and bool(self.udp_peers.strip())

    @property
    def udp_interface(self) -> str:
        """The address the peer-sync socket binds (QUEEN_UDP_BIND, else HOST)."""
        return self.udp_bind.strip() or self.host

    @property
    def sslmode(self) -> str:
        """libpq sslmode from the two upstream flags (libpq ignores it on unix sockets)."""
        if not self.pg_use_ssl:
            return "disable"
        return "require" if self.pg_ssl_reject_unauthorized else "prefer"

    def dsn_with_settings(self, **settings: str) -> str:
        """:attr:`dsn` plus more server settings for every session (e.g. custom GUCs)."""
        extra = "".join(f" -c {name.replace('__', '.')}={value}"
                        for name, value in settings.items())
        return self.dsn.replace("-c statement_timeout=",
                                f"{extra.strip()} -c statement_timeout=", 1)

    def as_env(self) -> dict[str, str]:
        """Every set option as environment variables: how a parent hands its configuration
        (CLI flags included) to the worker processes it starts."""
        env = {}
        for spec in OPTIONS:
            value = getattr(self, spec.field)
            if value is None:
                continue
            if isinstance(value, bool):
                env[spec.env] = "true" if value else "false"
            elif isinstance(value, bytes):
                env[spec.env] = value.hex()
            else:
                env[spec.env] = str(value)
        return env

    @property
    def dsn(self) -> str:
        """A libpq keyword DSN for the configured PostgreSQL.

        ``pg_host`` may be a unix-socket directory (libpq treats a leading ``/`` as one), or
        a comma list of hosts: libpq then tries them in turn and keeps the first read-write
        one (``target_session_attrs``), which is how a reconnect finds a promoted standby.
        ``pg_dsn``, when set, replaces the ``PG_*`` connection (see :func:`_dsn_with_session`).
        Statement and lock timeouts travel as startup ``options`` so every connection of
        every pool gets them without an extra round trip; ``application_name`` is the
        worker id so ``pg_stat_activity`` shows which instance holds a connection. The
        worker id also travels as the ``queen.worker`` setting, which names the sender of the
        wake-up notices the SQL functions send: ``application_name`` cannot, as QUEEN_PG_DSN
        may set its own and PostgreSQL cuts it to 63 bytes.
        """
        startup = (f"-c statement_timeout={self.db_statement_timeout_ms} "
                   f"-c lock_timeout={self.db_lock_timeout_ms} "
                   f"-c queen.worker={_option_value(self.worker_id)}")
        if self.pg_dsn.strip():
            return _dsn_with_session(self.pg_dsn, startup, self.worker_id,
                                     str(math.ceil(self.db_connection_timeout_ms / 1000)))
        hosts, ports = host_list(self.pg_host, self.pg_port)
        parts = {
            "host": ",".join(hosts),
            "port": ",".join(ports),
            "user": self.pg_user,
            "password": self.pg_password,
            "dbname": self.pg_db,
            "connect_timeout": str(math.ceil(self.db_connection_timeout_ms / 1000)),
            "sslmode": self.sslmode,
            "application_name": self.worker_id,
            "options": startup,
        }
        if len(hosts) > 1:
            parts["target_session_attrs"] = "read-write"
        return " ".join(f"{key}={_quote_dsn_value(value)}" for key, value in parts.items())


_FIELDS = frozenset(spec.field for spec in OPTIONS)


def host_list(pg_host: str, pg_port: str) -> tuple[list[str], list[str]]:
    """PG_HOST and PG_PORT as libpq's parallel host and port lists.

    Each comma-separated host is ``host``, ``host:port``, ``[ipv6]`` or ``[ipv6]:port``; a
    unix-socket directory (leading ``/``) and a bare IPv6 address are taken whole. A host
    without its own port takes PG_PORT, or its entry of PG_PORT's list. A single host
    without a port gives exactly ``([PG_HOST], [PG_PORT])``.
    """
    entries = [entry.strip() for entry in pg_host.split(",")] if "," in pg_host else [pg_host]
    defaults = pg_port.split(",")
    if len(defaults) == 1:
        defaults = defaults * len(entries)
    elif len(defaults) != len(entries):
        raise ConfigError(f"PG_PORT: {len(defaults)} ports for the {len(entries)} hosts of "
                          "PG_HOST; give one port, or one per host")
    hosts, ports = [], []
    for entry, default in zip(entries, defaults, strict=True):
        host, port = _host_and_port(entry, default)
        hosts.append(host)
        ports.append(port)
    return hosts, ports


def _host_and_port(entry: str, default_port: str) -> tuple[str, str]:
    if not entry:
        raise ConfigError("PG_HOST: an entry of the host list is empty")
    host, port = entry, ""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
    elif not entry.startswith(("/", "@")) and entry.count(":") == 1:
        host, port = entry.split(":")
    if not port:
        return host, default_port
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"PG_HOST: expected a port from 1 to 65535 in {entry!r}")
    return host, port


def _dsn_with_session(dsn: str, startup: str, application_name: str,
                      connect_timeout: str) -> str:
    """QUEEN_PG_DSN plus what every queen-tw session needs.

    The DB_* timeouts are appended to the DSN's own ``options``; ``application_name`` and
    ``connect_timeout`` are defaults the DSN may override; several hosts default to
    ``target_session_attrs=read-write`` (never land on a standby).
    """
    try:
        given = parse_dsn(dsn)
    except Exception as err:  # psycopg2.ProgrammingError: libpq's own message
        raise ConfigError(f"QUEEN_PG_DSN: not a libpq connection string ({str(err).strip()})") \
            from None
    given["options"] = f"{given.get('options', '')} {startup}".strip()
    given.setdefault("application_name", application_name)
    given.setdefault("connect_timeout", connect_timeout)
    if "," in given.get("host", "") + given.get("hostaddr", ""):
        given.setdefault("target_session_attrs", "read-write")
    return str(make_dsn(**given))


def _option_value(value: str) -> str:
    """Escape a value for libpq's ``options`` (spaces split arguments there)."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def _quote_dsn_value(value: str) -> str:
    """Quote a value for a libpq keyword DSN (single quotes; escape ``\\`` and ``'``)."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


# --- parsing ---------------------------------------------------------------------------


def _parse(spec: OptionSpec, raw: str | None, warnings: list[str]) -> Any:
    """Turn one raw string into the field's value, or the default when it is absent.

    An empty string counts as absent for every non-text option, so ``PORT=`` in an
    environment file means "use the default" rather than an error.
    """
    if raw is None or (raw.strip() == "" and spec.kind not in ("str", "choice")):
        return spec.default
    if spec.kind == "key":
        return _parse_key(spec, raw)
    return _PARSERS[spec.kind](spec, raw)


def _parse_int(spec: OptionSpec, raw: str) -> int:
    """A base-10 integer within the spec's bounds."""
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise ConfigError(f"{spec.env}: expected an integer, got {raw!r}") from None
    _check_bounds(spec, value)
    return value


def _parse_ports(spec: OptionSpec, raw: str) -> str:
    """A port, or a comma list of ports (one per host of a host list), normalized."""
    ports = [part.strip() for part in raw.split(",")]
    for port in ports:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{spec.env}: expected a port from 1 to 65535 or a comma list "
                              f"of them, got {raw!r}")
    return ",".join(str(int(port)) for port in ports)


def _parse_float(spec: OptionSpec, raw: str) -> float:
    """A finite number within the spec's bounds."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{spec.env}: expected a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{spec.env}: expected a finite number, got {raw!r}")
    _check_bounds(spec, value)
    return value


_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def _parse_bool(spec: OptionSpec, raw: str) -> bool:
    """true/false/1/0/yes/no in any case; anything else is refused, not guessed."""
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(f"{spec.env}: expected true/false/1/0/yes/no, got {raw!r}")


def _parse_str(spec: OptionSpec, raw: str) -> str:
    """Text is taken as given (an empty PG_PASSWORD is meaningful)."""
    return raw


_CHOICE_ALIASES = {"warning": "warn"}


def _parse_choice(spec: OptionSpec, raw: str) -> str:
    """One of the spec's choices, case-insensitive; ``warning`` is accepted for ``warn``."""
    word = raw.strip().lower()
    word = _CHOICE_ALIASES.get(word, word)
    if word in spec.choices:
        return word
    if not word and spec.default in spec.choices:
        return spec.default
    allowed = ", ".join(repr(choice) for choice in spec.choices)
    raise ConfigError(f"{spec.env}: expected one of {allowed}, got {raw!r}")


def _parse_named(spec: OptionSpec, raw: str) -> str:
    """One of the spec's choices, case-insensitive, returned as the table spells it
    (``hs256`` -> ``HS256``, ``eddsa`` -> ``EdDSA``)."""
    word = raw.strip().lower()
    for choice in spec.choices:
        if choice.lower() == word:
            return choice
    allowed = ", ".join(spec.choices)
    raise ConfigError(f"{spec.env}: expected one of {allowed}, got {raw!r}")


def _parse_path(spec: OptionSpec, raw: str) -> str | None:
    """A directory name; blank means unset."""
    return raw.strip() or None


def _parse_key(spec: OptionSpec, raw: str) -> bytes | None:
    """64 hex characters -> 32 key bytes; anything else refuses to start.

    WIRE.md let a malformed key turn encryption off, and encrypted queues then stored
    plaintext without anyone asking for it (issue 17): a typo in a secret must stop the
    server, not weaken it.  The key itself never appears in the message.
    """
    text = raw.strip()
    # (not bytes.fromhex alone: it skips whitespace, and 64 characters with a space inside
    # made a 31-byte key that failed later with a traceback)
    if len(text) == 64 and all(c in string.hexdigits for c in text):
        return bytes.fromhex(text)
    raise ConfigError(
        f"{spec.env}: expected 64 hex characters (a 32-byte AES-256 key), got {len(text)} "
        "characters" + ("" if len(text) != 64 else " that are not all hex digits"))


_PARSERS: dict[str, Callable[[OptionSpec, str], Any]] = {
    "int": _parse_int,
    "ports": _parse_ports,
    "float": _parse_float,
    "bool": _parse_bool,
    "str": _parse_str,
    "choice": _parse_choice,
    "named": _parse_named,
    "path": _parse_path,
}


def _check_bounds(spec: OptionSpec, value: float) -> None:
    """Refuse numbers outside the spec's range, naming the environment variable."""
    low, high = spec.minimum, spec.maximum
    if low is not None and high is not None and not low <= value <= high:
        raise ConfigError(f"{spec.env}: must be between {low:g} and {high:g}, got {value:g}")
    if low is not None and value < low:
        raise ConfigError(f"{spec.env}: must be >= {low:g}, got {value:g}")
    if high is not None and value > high:
        raise ConfigError(f"{spec.env}: must be <= {high:g}, got {value:g}")


def _check_cross_field(values: Mapping[str, Any]) -> None:
    """Rules that involve two options."""
    if values["pop_wait_max_interval_ms"] < values["pop_wait_initial_interval_ms"]:
        raise ConfigError(
            "POP_WAIT_MAX_INTERVAL_MS: must be >= POP_WAIT_INITIAL_INTERVAL_MS "
            f"({values['pop_wait_initial_interval_ms']}), got {values['pop_wait_max_interval_ms']}"
        )
    if values["sync_dead_threshold_ms"] <= values["sync_heartbeat_ms"]:
        raise ConfigError(
            "QUEEN_SYNC_DEAD_THRESHOLD_MS: must be more than QUEEN_SYNC_HEARTBEAT_MS "
            f"({values['sync_heartbeat_ms']}), got {values['sync_dead_threshold_ms']}")
    try:
        peers = parse_peers(values["udp_peers"], values["udp_notify_port"])
    except ValueError as err:
        raise ConfigError(f"QUEEN_UDP_PEERS: {err}") from None
    if values["listen"].strip() and values["num_workers"] > 1:
        raise ConfigError("QUEEN_LISTEN: not supported with NUM_WORKERS > 1 (the workers share "
                          "one TCP socket on HOST:PORT); leave it empty or set NUM_WORKERS=1")
    portless = [str(peer.host) for peer in peers if peer.port == 0]
    if portless:
        raise ConfigError(f"QUEEN_UDP_PEERS: peer {portless[0]!r} needs a port when "
                          "QUEEN_UDP_NOTIFY_PORT is 0")
    members = [p.strip().rstrip("/") for p in values["ephemeral_peers"].split(",") if p.strip()]
    for member in members:  # the relay forwards to member + path: each must be a base URL
        url = urllib.parse.urlsplit(member)
        try:
            url.port  # noqa: B018 (a port that is no number raises here)
        except ValueError:
            url = urllib.parse.urlsplit("")
        if url.scheme not in ("http", "https") or not url.hostname or url.path or url.query:
            raise ConfigError(f"QUEEN_EPHEMERAL_PEERS: {member!r} is not a base URL such as "
                              "http://host:port")
    if members and values["ephemeral_self"].strip().rstrip("/") not in members:
        raise ConfigError("QUEEN_EPHEMERAL_SELF: must be this instance's own entry of "
                          f"QUEEN_EPHEMERAL_PEERS ({', '.join(members)}), "
                          f"got {values['ephemeral_self']!r}")
    if values["jwt_enabled"]:
        _check_jwt_keys(values)
    host_list(values["pg_host"], values["pg_port"])
    if values["pg_dsn"].strip():
        _dsn_with_session(values["pg_dsn"], "", "", "")


def _check_jwt_keys(values: Mapping[str, Any]) -> None:
    """With JWT on, the configured algorithm must have a key to verify with.

    Upstream starts without one and answers every request 500 (``HS256 secret not
    configured``); a server that cannot admit anyone is refused at start instead. A
    JWT_PUBLIC_KEY that cannot be read or is of the wrong kind is refused too.
    """
    algorithm, secret = values["jwt_algorithm"], values["jwt_secret"]
    url, pem = values["jwt_jwks_url"].strip(), values["jwt_public_key"].strip()
    if url and not url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"JWT_JWKS_URL: expected an http:// or https:// URL, got {url!r}")
    family = None
    if pem:
        try:
            family = key_family(load_public_key(pem))
        except ValueError as err:
            raise ConfigError(f"JWT_PUBLIC_KEY: {err}") from None
    if algorithm == "HS256" and not secret:
        raise ConfigError("JWT_SECRET: required when JWT_ENABLED=true and JWT_ALGORITHM=HS256")
    wanted = {"RS256": "RSA", "EdDSA": "EdDSA"}.get(algorithm)
    if wanted and family not in (None, wanted):
        raise ConfigError(f"JWT_PUBLIC_KEY: JWT_ALGORITHM={algorithm} needs an "
                          f"{wanted} key, got an {family} key")
    if wanted and not (family or url):
        raise ConfigError(f"JWT_ALGORITHM={algorithm} needs JWT_PUBLIC_KEY or JWT_JWKS_URL")
    if algorithm == "auto" and not (secret or pem or url):
        raise ConfigError("JWT_ALGORITHM=auto needs JWT_SECRET, JWT_PUBLIC_KEY or JWT_JWKS_URL")


_NOT_OPTIONS = frozenset({"warnings", "migrate_only"})
"""Config fields that are not in the option table: computed, or a run-mode flag."""


def _check_table_matches_dataclass() -> None:
    """Fail at import if the option table and the Config fields ever disagree."""
    declared = {f.name for f in dataclasses.fields(Config)} - _NOT_OPTIONS
    if declared != _FIELDS:
        raise RuntimeError(f"OPTIONS and Config differ: {sorted(declared ^ _FIELDS)}")


_check_table_matches_dataclass()


# --- twistd command line ---------------------------------------------------------------


RUN_FLAGS: tuple[tuple[str, str], ...] = (
    ("migrate-only", "Apply the schema migrations, then exit (status 0) instead of serving"),
)
"""Flags of ``twistd queen`` that choose what the process does rather than configure it:
(flag, help).  Only on the command line; see :class:`Config`."""


def _help_text(spec: OptionSpec) -> str:
    """The ``--help`` line: meaning, then where else it can be set and its default."""
    return f"{spec.help} [env {spec.env}; default {spec.shown_default()}]"


class QueenOptions(usage.Options):
    """``twistd queen`` options, generated from :data:`OPTIONS` and :data:`RUN_FLAGS`.

    Flags default to None so that an absent flag falls through to the environment; after
    parsing, ``self.config`` holds the :class:`Config`.  Run by twistd, parsing also routes
    twistd's log output through ``LOG_LEVEL`` and ``LOG_FORMAT`` (:mod:`queen_tw.logs`).

    A refused option ends the process with one line (``queen-tw: PORT: expected an integer,
    got 'abc'``): twistd would print its whole ``--help`` before a ``UsageError``.
    """

    synopsis = "[options]"
    longdesc = (
        "Run the queen-tw message queue server. Every option can also be set with the "
        "environment variable named in its help; a flag wins over the environment."
    )
    optParameters: ClassVar[list[list[Any]]] = [
        [spec.flag, None, None, _help_text(spec)] for spec in OPTIONS
    ]
    optFlags: ClassVar[list[list[Any]]] = [[flag, None, text] for flag, text in RUN_FLAGS]

    config: Config
    parent: usage.Options | None = None
    """twistd's own options when run as ``twistd queen`` (usage.Options sets it)."""

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse, or end the process with the one-line reason (``--help`` still works)."""
        try:
            super().parseOptions(options)
        except usage.UsageError as err:
            refuse_to_start(f"{err} (twistd queen --help lists the options)")

    def postOptions(self) -> None:
        """Build the Config (a bad value becomes a UsageError naming the option), then
        hand the log settings to twistd."""
        cli = {spec.field: self[spec.flag] for spec in OPTIONS}
        try:
            config = Config.from_sources(os.environ, cli)
        except ConfigError as err:
            raise usage.UsageError(str(err)) from None
        self.config = config.with_changes(migrate_only=bool(self["migrate-only"]))
        if self.parent is not None:
            route_twistd(self.parent, config.log_level, config.log_format,
                         worker=config.worker_id)


# --- README table ----------------------------------------------------------------------


def markdown_table() -> str:
    """The option table as Markdown, for the README's Configuration section."""
    lines = ["| Environment | Flag | Default | Meaning |", "|---|---|---|---|"]
    for spec in OPTIONS:
        meaning = spec.help.replace("|", "\\|")
        lines.append(f"| `{spec.env}` | `--{spec.flag}` | `{spec.shown_default()}` | {meaning} |")
    for flag, text in RUN_FLAGS:
        lines.append(f"| (flag only) | `--{flag}` | off | {text} |")
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    """``python -m queen_tw.config --markdown`` prints the README option table."""
    if argv == ["--markdown"]:
        print(markdown_table())
        return 0
    print("usage: python -m queen_tw.config --markdown", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
