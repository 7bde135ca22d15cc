-- Migration 2: the metrics tables (WIRE.md 3.4 and 3.8; queen_tw/metrics/).
--
-- Each worker process counts in memory and, every METRICS_AGGREGATE_INTERVAL_S, writes what it
-- counted during that interval: one worker_metrics row, and one queue_metrics row per queue it
-- served. Rows are never updated; the analytics routes sum them over workers and bucket them
-- over time, and rows older than METRICS_RETENTION_DAYS are deleted. metrics_totals holds each
-- worker's running totals (added to at each write), so cluster-wide counters stay monotonic
-- when old interval rows are pruned or a worker restarts.

CREATE TABLE queen.worker_metrics (
    bucket_start      timestamptz NOT NULL,  -- start of the interval the row covers
    bucket_seconds    integer NOT NULL,      -- its length (the last one before a stop is short)
    hostname          text NOT NULL,
    worker_id         text NOT NULL,
    pid               integer NOT NULL,
    push_requests     bigint NOT NULL DEFAULT 0,
    push_messages     bigint NOT NULL DEFAULT 0,
    pop_requests      bigint NOT NULL DEFAULT 0,
    pop_messages      bigint NOT NULL DEFAULT 0,
    pop_empty         bigint NOT NULL DEFAULT 0,
    ack_requests      bigint NOT NULL DEFAULT 0,
    ack_messages      bigint NOT NULL DEFAULT 0,
    ack_success       bigint NOT NULL DEFAULT 0,
    ack_failed        bigint NOT NULL DEFAULT 0,
    transactions      bigint NOT NULL DEFAULT 0,
    dlq               bigint NOT NULL DEFAULT 0,  -- messages moved to the dead-letter queue
    db_errors         bigint NOT NULL DEFAULT 0,
    -- {"push": {"count", "avgMs", "maxMs", "p50Ms", "p95Ms", "p99Ms"}, "pop": …, "ack": …,
    --  "transaction": …}: request latency seen by this worker during the interval
    latency           jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- {"avg", "max", "p99"} of the samples taken every METRICS_SAMPLE_INTERVAL_MS
    event_loop_lag_ms jsonb NOT NULL DEFAULT '{}'::jsonb,
    pop_lag_ms        jsonb NOT NULL DEFAULT '{}'::jsonb,  -- message age when delivered
    rss_bytes         bigint NOT NULL DEFAULT 0,
    cpu_user_seconds  double precision NOT NULL DEFAULT 0,  -- spent during the interval
    cpu_system_seconds double precision NOT NULL DEFAULT 0,
    db_pool_size      integer NOT NULL DEFAULT 0,
    db_pool_idle      integer NOT NULL DEFAULT 0,
    db_pool_waiting   integer NOT NULL DEFAULT 0,
    buffer_pending    bigint NOT NULL DEFAULT 0,
    buffer_failed     bigint NOT NULL DEFAULT 0,
    db_healthy        boolean NOT NULL DEFAULT true,
    parked_consumers  integer NOT NULL DEFAULT 0,  -- long polls waiting at the interval's end
    PRIMARY KEY (bucket_start, hostname, worker_id, pid)
);
CREATE INDEX worker_metrics_by_worker ON queen.worker_metrics (worker_id, bucket_start);

-- No foreign key to queen.queues: metrics of a deleted queue stay until retention.
CREATE TABLE queen.queue_metrics (
    bucket_start   timestamptz NOT NULL,
    bucket_seconds integer NOT NULL,
    queue_name     text NOT NULL,
    hostname       text NOT NULL,
    worker_id      text NOT NULL,
    pid            integer NOT NULL,
    push_requests  bigint NOT NULL DEFAULT 0,
    push_messages  bigint NOT NULL DEFAULT 0,
    pop_requests   bigint NOT NULL DEFAULT 0,
    pop_messages   bigint NOT NULL DEFAULT 0,
    pop_empty      bigint NOT NULL DEFAULT 0,
    ack_success    bigint NOT NULL DEFAULT 0,
    ack_failed     bigint NOT NULL DEFAULT 0,
    transactions   bigint NOT NULL DEFAULT 0,
    dlq            bigint NOT NULL DEFAULT 0,
    pop_lag_ms     jsonb NOT NULL DEFAULT '{}'::jsonb,  -- {"avg", "max", "p99"}
    parked_consumers integer NOT NULL DEFAULT 0,
    PRIMARY KEY (queue_name, bucket_start, hostname, worker_id, pid)
);
CREATE INDEX queue_metrics_by_time ON queen.queue_metrics (bucket_start);

-- Running totals per worker name: counter -> value, added to at every write.
CREATE TABLE queen.metrics_totals (
    hostname   text NOT NULL,
    worker_id  text NOT NULL,
    counter    text NOT NULL,  -- push_requests, ack_success, dlq, ...
    value      bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hostname, worker_id, counter)
);
