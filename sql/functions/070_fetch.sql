-- Reads by offset (WIRE2.md 6): POST /api/v1/fetch and POST /api/v1/partitions/changed.
-- Neither leases, moves a cursor nor writes anything: two callers asking the same get the same
-- answer. Offsets are migration 6's: a message's offset is seq - 1, a partition's
-- highWatermark last_seq and its logStartOffset first_seq - 1. Each route is one call of one
-- function here; the server only validates the request and decrypts encrypted payloads.

-- fetch: p_entries = [{queue, partition, offset, maxBytes}] as the server checked them
-- (partition named, 0 <= offset, 1 <= maxBytes). Records are contiguous from each entry's
-- offset, at most p_record_cap per entry, while the entry's maxBytes and the call's
-- p_call_bytes hold, counting each record's payload as the answer carries it: its JSON text
-- (at least 1 byte; an encrypted one's plaintext length, read off its base64 ciphertext, not
-- the envelope's). Not its stored size: PostgreSQL compresses a repetitive payload, and
-- counted so small, enough of them overran the 1 GB limit of the answer's text. The call's
-- first record goes out whatever its size, so one large record never stalls a reader.
-- Returns the WIRE answer as json text (``body``), with the payload bytes it holds, whether an
-- entry carries an error (the long poll returns at once then) and whether a record is
-- encrypted (those carry "encrypted": true for the server to decrypt and remove).
-- STABLE: every statement reads the call's one snapshot, so the bounds, the byte budget and
-- the records rendered agree.
CREATE OR REPLACE FUNCTION queen.fetch_records(p_entries jsonb, p_call_bytes bigint,
                                               p_record_cap integer,
                                               OUT body text, OUT bytes bigint,
                                               OUT any_error boolean, OUT encrypted boolean)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_queues     text[];
    v_parts      text[];
    v_pids       uuid[];
    v_offsets    bigint[];
    v_max_bytes  bigint[];
    v_highs      bigint[];
    v_starts     bigint[];
    v_errors     text[];
    v_takes      integer[] := '{}';
    v_take       integer;
    v_entry_used bigint;
    v_size       bigint;
    v_delivered  boolean := false;  -- a record of this call is already in
BEGIN
    bytes := 0;
    SELECT array_agg(x.queue ORDER BY x.i), array_agg(x.part ORDER BY x.i),
           array_agg(x.pid ORDER BY x.i), array_agg(x.off ORDER BY x.i),
           array_agg(x.max_bytes ORDER BY x.i), array_agg(x.high ORDER BY x.i),
           array_agg(x.log_start ORDER BY x.i),
           array_agg(CASE WHEN x.queue_id IS NULL THEN 'UNKNOWN_TOPIC_OR_PARTITION'
                          WHEN x.off < x.log_start OR x.off > x.high THEN 'OFFSET_OUT_OF_RANGE'
                     END ORDER BY x.i)
      INTO v_queues, v_parts, v_pids, v_offsets, v_max_bytes, v_highs, v_starts, v_errors
      FROM (SELECT j.i, j.e->>'queue' AS queue, j.e->>'partition' AS part,
                   (j.e->>'offset')::bigint AS off, (j.e->>'maxBytes')::bigint AS max_bytes,
                   qu.id AS queue_id, p.id AS pid,
                   -- a partition not written yet, or cleaned up (migration 12), is an empty log
                   coalesce(p.last_seq, d.last_seq, 0) AS high,
                   coalesce(p.first_seq - 1, d.last_seq, 0) AS log_start
              FROM jsonb_array_elements(p_entries) WITH ORDINALITY AS j(e, i)
              LEFT JOIN queen.queues qu ON qu.name = j.e->>'queue'
              LEFT JOIN queen.partitions p ON p.queue_id = qu.id AND p.name = j.e->>'partition'
              LEFT JOIN queen.dropped_partitions d
                     ON p.id IS NULL AND d.queue_id = qu.id AND d.name = j.e->>'partition') x;
    IF v_queues IS NULL THEN
        body := '{"entries":[]}';
        any_error := false;
        encrypted := false;
        RETURN;
    END IF;

    -- How many records each entry takes: sizes read in offset order until a cap is met, so
    -- no more rows are looked at than are delivered (plus one).
    FOR n IN 1..cardinality(v_queues) LOOP
        v_take := 0;
        v_entry_used := 0;
        IF v_errors[n] IS NULL AND v_pids[n] IS NOT NULL AND v_offsets[n] < v_highs[n]
           AND (NOT v_delivered OR bytes < p_call_bytes) THEN
            FOR v_size IN
                SELECT greatest(coalesce(CASE WHEN m.is_encrypted
                                              THEN length(m.payload->>'encrypted') * 3 / 4
                                              ELSE octet_length(m.payload::text) END, 0), 1)
                  FROM queen.messages m
                 WHERE m.partition_id = v_pids[n] AND m.seq > v_offsets[n]
                 ORDER BY m.seq
                 LIMIT p_record_cap
            LOOP
                EXIT WHEN v_delivered AND (v_entry_used + v_size > v_max_bytes[n]
                                           OR bytes + v_size > p_call_bytes);
                v_delivered := true;
                v_take := v_take + 1;
                v_entry_used := v_entry_used + v_size;
                bytes := bytes + v_size;
            END LOOP;
        END IF;
        v_takes := v_takes || v_take;
    END LOOP;

    -- The answer, concatenated: a payload's stored text goes out as it is, never re-parsed.
    SELECT '{"entries":[' || string_agg(
               '{"queue":' || to_json(e.queue)::text || ',"partition":' || to_json(e.part)::text
               || ',"records":[' || coalesce(r.records, '') || '],"highWatermark":' || e.high
               || ',"logStartOffset":' || e.log_start
               || coalesce(',"error":"' || e.error || '"', '') || '}',
               ',' ORDER BY e.i) || ']}',
           bool_or(e.error IS NOT NULL), coalesce(bool_or(r.encrypted), false)
      INTO body, any_error, encrypted
      FROM unnest(v_queues, v_parts, v_pids, v_offsets, v_takes, v_highs, v_starts, v_errors)
           WITH ORDINALITY AS e(queue, part, pid, off, take, high, log_start, error, i)
      LEFT JOIN LATERAL (
          SELECT string_agg('{"offset":' || (m.seq - 1)
                            || ',"transactionId":' || to_json(m.transaction_id)::text
                            || ',"payload":' || coalesce(m.payload::text, 'null')
                            || ',"ts":"' || queen.format_ts6(m.created_at) || '"'
                            || CASE WHEN m.is_encrypted THEN ',"encrypted":true' ELSE '' END
                            || '}', ',' ORDER BY m.seq) AS records,
                 bool_or(m.is_encrypted) AS encrypted
            FROM (SELECT * FROM queen.messages m
                   WHERE e.take > 0 AND m.partition_id = e.pid AND m.seq > e.off
                   ORDER BY m.seq LIMIT e.take) m
      ) r ON true;
END
$$;

-- The opaque page cursor of partitions_changed, tagged with its mode: 'n:' + the last name
-- (listing by name) or 't:' + the last write in microseconds + ':' + the last name (listing
-- by last write); names travel hex-encoded, so any name survives.
CREATE OR REPLACE FUNCTION queen.changed_cursor(p_at timestamptz, p_name text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_at IS NULL THEN 'n:'
                ELSE 't:' || (extract(epoch FROM p_at) * 1000000)::bigint || ':' END
           || encode(convert_to(p_name, 'UTF8'), 'hex')
$$;

-- A cursor's parts: (NULL, name) for a by-name cursor, (time, name) for a by-write one;
-- nothing for text no changed_cursor made.
CREATE OR REPLACE FUNCTION queen.changed_cursor_parts(p_cursor text, OUT at timestamptz,
                                                      OUT name text)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_match text[];
BEGIN
    v_match := regexp_match(p_cursor, '^(?:n|t:(-?[0-9]{1,19})):((?:[0-9a-f]{2})*)$');
    IF v_match IS NULL THEN
        RETURN;
    END IF;
    at := 'epoch'::timestamptz + v_match[1]::bigint * interval '1 microsecond';  -- exact
    name := convert_from(decode(v_match[2], 'hex'), 'UTF8');
EXCEPTION WHEN others THEN  -- not UTF-8, or a time out of range: not one of ours
    at := NULL;
    name := NULL;
END
$$;

-- partitions/changed: p_entries = [{queue, since, after, limit}] (since: text or null,
-- after: a cursor or null, 1 <= limit <= 1000). Returns the WIRE answer as json text, or, when
-- an entry's since is not a timestamp, ``bad_since`` = that text and no body.
--
-- safeTime: a time T such that every partition write with lastWriteAt < T is visible in this
-- answer. A push stamps last_write_at with its transaction's start (now()), so T is the
-- earliest of now() - p_guard_seconds and the start of every transaction open in this
-- database, read from pg_stat_activity by a statement of its own BEFORE the statement that
-- reads the partitions (VOLATILE, so that one takes a later snapshot): a push not open at the
-- first statement either committed before the second (visible) or started after the first
-- (lastWriteAt > T). The guard covers a transaction just begun that pg_stat_activity does not
-- show yet. Every open transaction counts, not only those that wrote: a push's xid is assigned
-- after it started, and a long read-only transaction only holds T back. When this role cannot
-- see other sessions (no pg_read_all_stats), T is no later than now() - p_floor_seconds and
-- the answer says safeTimeDegraded.
-- A since without a UTC offset is read as UTC (the function's TimeZone).
CREATE OR REPLACE FUNCTION queen.partitions_changed(p_entries jsonb, p_guard_seconds integer,
                                                    p_floor_seconds integer,
                                                    OUT body text, OUT bad_since text)
LANGUAGE plpgsql VOLATILE SET TimeZone = 'UTC' AS $$
DECLARE
    v_safe     timestamptz;
    v_masked   boolean;
    v_sinces   timestamptz[] := '{}';
    v_since    timestamptz;
    v_entry    jsonb;
    v_entries  text[] := '{}';
BEGIN
    SELECT least(now() - make_interval(secs => p_guard_seconds),
                 min(a.xact_start) FILTER (WHERE a.backend_type = 'client backend')),
           coalesce(bool_or(a.query = '<insufficient privilege>'), false)
      INTO v_safe, v_masked
      FROM pg_stat_activity a
     WHERE a.datname = current_database() AND a.pid <> pg_backend_pid();
    IF v_masked THEN
        v_safe := least(v_safe, now() - make_interval(secs => p_floor_seconds));
    END IF;

    FOR v_entry IN SELECT e FROM jsonb_array_elements(p_entries) e LOOP
        v_since := NULL;
        IF jsonb_typeof(v_entry->'since') = 'string' THEN
            BEGIN
                v_since := (v_entry->>'since')::timestamptz;
            EXCEPTION WHEN others THEN  -- any input error (some are not class 22: "current")
                bad_since := v_entry->>'since';
                RETURN;
            END;
        END IF;
        v_sinces := v_sinces || v_since;
    END LOOP;

    -- The partitions, each entry one indexed read of at most limit + 1 rows (the extra one
    -- says whether there is a next page).
    SELECT coalesce(array_agg(queen.changed_entry(e.v, s.since) ORDER BY e.i), '{}')
      INTO v_entries
      FROM jsonb_array_elements(p_entries) WITH ORDINALITY AS e(v, i)
      JOIN unnest(v_sinces) WITH ORDINALITY AS s(since, i) USING (i);

    body := '{"entries":[' || array_to_string(v_entries, ',') || '],"safeTime":"'
            || queen.format_ts6(v_safe) || '"'
            || CASE WHEN v_masked THEN ',"safeTimeDegraded":true' ELSE '' END || '}';
END
$$;

-- One entry of partitions_changed: {queue, partitions, next, error?} as json text.
CREATE OR REPLACE FUNCTION queen.changed_entry(p_entry jsonb, p_since timestamptz)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_queue_id uuid;
    v_limit    integer := (p_entry->>'limit')::integer;
    v_after    text := nullif(p_entry->>'after', '');
    v_after_at timestamptz;
    v_after_nm text;
    v_page     json;
    v_count    integer;
    v_last_at  timestamptz;
    v_last     text;
    v_head     text := '{"queue":' || to_json(p_entry->>'queue')::text;
BEGIN
    SELECT qu.id INTO v_queue_id FROM queen.queues qu WHERE qu.name = p_entry->>'queue';
    IF NOT FOUND THEN
        RETURN v_head || ',"partitions":[],"next":null,"error":"UNKNOWN_TOPIC_OR_PARTITION"}';
    END IF;
    IF v_after IS NOT NULL THEN
        SELECT c.at, c.name INTO v_after_at, v_after_nm FROM queen.changed_cursor_parts(v_after) c;
        IF v_after_nm IS NULL OR (v_after_at IS NULL) <> (p_since IS NULL) THEN
            RETURN v_head || ',"partitions":[],"next":null,"error":"BAD_CURSOR"}';
        END IF;
    END IF;

    SELECT json_agg(json_build_object(
               'name', x.name, 'id', x.id, 'lastOffset', x.last_seq - 1,
               'logStart', x.first_seq - 1,
               'lastWriteAt', queen.format_ts6(x.last_write_at)) ORDER BY x.k)
               FILTER (WHERE x.k <= v_limit),
           count(*),
           (array_agg(x.last_write_at ORDER BY x.k) FILTER (WHERE x.k <= v_limit))[v_limit],
           (array_agg(x.name ORDER BY x.k) FILTER (WHERE x.k <= v_limit))[v_limit]
      INTO v_page, v_count, v_last_at, v_last
      FROM (SELECT p.*, row_number() OVER (ORDER BY p.name) AS k
              FROM (SELECT p.* FROM queen.partitions p
                     WHERE p_since IS NULL AND p.queue_id = v_queue_id
                       AND (v_after IS NULL OR p.name > v_after_nm)
                     ORDER BY p.name
                     LIMIT v_limit + 1) p
            UNION ALL
            SELECT p.*, row_number() OVER (ORDER BY p.last_write_at, p.name) AS k
              FROM (SELECT p.* FROM queen.partitions p
                     WHERE p_since IS NOT NULL AND p.queue_id = v_queue_id
                       AND p.last_write_at >= p_since
                       AND (v_after IS NULL
                            OR (p.last_write_at, p.name) > (v_after_at, v_after_nm))
                     ORDER BY p.last_write_at, p.name
                     LIMIT v_limit + 1) p) x;
    RETURN v_head || ',"partitions":' || coalesce(v_page::text, '[]') || ',"next":'
           || CASE WHEN v_count > v_limit
                   THEN to_json(queen.changed_cursor(CASE WHEN p_since IS NOT NULL THEN v_last_at END,
                                                     v_last))::text
                   ELSE 'null' END || '}';
END
$$;
