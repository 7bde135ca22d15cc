-- KV state (WIRE2.md 2): every op of POST /api/v1/kv in one call, also run by the `kv` rider
-- of a transaction (010_transaction.sql) and by the lock ops (061_locks.sql).
--
-- Ops arrive validated and normalised by queen_tw/http/kv_input.py:
--   {op (the input spelling, echoed), kind: get|getMany|getPrefix|put|delete|incr|check,
--    ns, key, keys, prefix, after, limit, keysOnly, value, ttl (seconds; null = forever),
--    expect (null = none; putIfAbsent arrives as put with expect 0), required, delta, min, max}
--
-- Concurrency: every key an op writes or checks is locked first, by a transaction-level
-- advisory lock per key, all of them in one global order (the lock id's order), before any
-- row is touched. Two calls on the same keys then run one after the other whatever order
-- their ops name the keys in, and never deadlock; a transaction batch takes the locks of all
-- its bundles first (kv_lock), before any queue or partition lock. The permits of one lock
-- or semaphore ('queen-locks', '<name>#<slot>') share one lock id, so a semaphore's slots are
-- decided under one lock. Reads take no lock.

-- The class of the KV advisory locks (the two-integer form keeps them apart from the other
-- advisory locks of the schema).
CREATE OR REPLACE FUNCTION queen.kv_lock_class() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 737010 $$;

-- The advisory lock id of a key: one per key, one per lock name in 'queen-locks'.
CREATE OR REPLACE FUNCTION queen.kv_lock_id(p_ns text, p_key text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtext(p_ns || '/' || CASE WHEN p_ns = 'queen-locks'
                                        THEN regexp_replace(p_key, '#[^#]*$', '')
                                        ELSE p_key END)
$$;

-- Locks every key that ops of `p_ops` write or check, in lock-id order.
CREATE OR REPLACE FUNCTION queen.kv_lock(p_ops jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_id integer;
BEGIN
    FOR v_id IN
        SELECT DISTINCT queen.kv_lock_id(o->>'ns', o->>'key')
          FROM jsonb_array_elements(coalesce(p_ops, '[]'::jsonb)) o
         WHERE o->>'kind' IN ('put', 'delete', 'incr', 'check')
         ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(queen.kv_lock_class(), v_id);
    END LOOP;
END
$$;

-- The live row of a key at instant p_now (NULL when absent or expired).
CREATE OR REPLACE FUNCTION queen.kv_live(p_ns text, p_key text, p_now timestamptz)
RETURNS queen.kv
LANGUAGE sql STABLE AS $$
    SELECT * FROM queen.kv
     WHERE namespace = p_ns AND key = p_key
       AND (expires_at IS NULL OR expires_at > p_now)
$$;

-- Writes a key (creating it, or replacing a live or expired row) with a new version.
-- p_keep_expiry keeps a live row's expiry (incr); the caller holds the key's lock.
CREATE OR REPLACE FUNCTION queen.kv_store(p_ns text, p_key text, p_value jsonb,
                                          p_expires_at timestamptz, p_now timestamptz,
                                          p_keep_expiry boolean DEFAULT false)
RETURNS queen.kv
LANGUAGE sql AS $$
    INSERT INTO queen.kv AS k (namespace, key, value, version, expires_at, created_at,
                               updated_at)
    VALUES (p_ns, p_key, p_value, nextval('queen.kv_versions'), p_expires_at, p_now, p_now)
    ON CONFLICT (namespace, key) DO UPDATE
       SET value = excluded.value, version = excluded.version, updated_at = p_now,
           expires_at = CASE WHEN p_keep_expiry AND (k.expires_at IS NULL OR k.expires_at > p_now)
                             THEN k.expires_at ELSE excluded.expires_at END,
           created_at = CASE WHEN k.expires_at IS NULL OR k.expires_at > p_now
                             THEN k.created_at ELSE p_now END
    RETURNING k.*
$$;

-- A row as the reads show it.
CREATE OR REPLACE FUNCTION queen.kv_row_json(p_row queen.kv, p_with_value boolean DEFAULT true)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('key', p_row.key, 'version', p_row.version,
                              'expiresAt', queen.format_ts6(p_row.expires_at),
                              'updatedAt', queen.format_ts6(p_row.updated_at))
           || CASE WHEN p_with_value THEN jsonb_build_object('value', p_row.value)
                   ELSE '{}'::jsonb END
$$;

-- One write or check op (kinds put, delete, incr, check) against the key's live row.
-- Returns the result element without index; the caller holds the key's lock.
CREATE OR REPLACE FUNCTION queen.kv_write_op(o jsonb, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_ns      text := o->>'ns';
    v_key     text := o->>'key';
    v_kind    text := o->>'kind';
    v_expect  bigint := (o->>'expect')::bigint;
    v_expires timestamptz := p_now + make_interval(secs => (o->>'ttl')::bigint);
    v_cur     queen.kv := queen.kv_live(v_ns, v_key, p_now);
    v_version bigint := coalesce(v_cur.version, 0);
    v_value   jsonb := coalesce(v_cur.value, 'null'::jsonb);
    v_reason  text;
    v_number  numeric;
    v_new     queen.kv;
BEGIN
    IF v_kind = 'incr' THEN
        IF v_cur.key IS NOT NULL AND jsonb_typeof(v_cur.value) <> 'number' THEN
            RETURN jsonb_build_object('op', o->'op', 'applied', false, 'reason', 'type',
                                      'key', v_key, 'value', 0, 'version', v_version);
        END IF;
        v_number := coalesce((v_cur.value #>> '{}')::numeric, 0);
        -- Besides min and max, every result stays within ±1e308: the server reads values
        -- back as JSON numbers (a float beyond that is infinite, an integer past 4300 digits
        -- is refused), so a greater one would be stored and then unreadable.
        IF (o->>'min' IS NOT NULL AND v_number + (o->>'delta')::numeric < (o->>'min')::numeric)
           OR (o->>'max' IS NOT NULL AND v_number + (o->>'delta')::numeric > (o->>'max')::numeric)
           OR abs(v_number + (o->>'delta')::numeric) >= 1e308
        THEN
            RETURN jsonb_build_object('op', o->'op', 'applied', false, 'reason', 'limit',
                                      'key', v_key, 'value', to_jsonb(trim_scale(v_number)),
                                      'version', v_version);
        END IF;
        v_new := queen.kv_store(v_ns, v_key,
                                to_jsonb(trim_scale(v_number + (o->>'delta')::numeric)),
                                v_expires, p_now, true);
        RETURN jsonb_build_object('op', o->'op', 'applied', true, 'key', v_key,
                                  'value', v_new.value, 'version', v_new.version,
                                  'expiresAt', queen.format_ts6(v_new.expires_at));
    END IF;

    -- put, delete, check: the precondition first
    IF v_expect IS NOT NULL THEN
        IF v_expect = 0 AND v_cur.key IS NOT NULL THEN
            v_reason := 'exists';
        ELSIF v_expect > 0 AND v_cur.key IS NULL THEN
            v_reason := 'absent';
        ELSIF v_expect > 0 AND v_cur.version <> v_expect THEN
            v_reason := 'version';
        END IF;
    ELSIF v_kind = 'delete' AND v_cur.key IS NULL THEN
        v_reason := 'absent';
    END IF;
    IF v_reason IS NOT NULL THEN
        RETURN jsonb_build_object('op', o->'op', 'applied', false, 'reason', v_reason,
                                  'key', v_key, 'value', v_value, 'version', v_version);
    END IF;

    IF v_kind = 'put' THEN
        v_new := queen.kv_store(v_ns, v_key, o->'value', v_expires, p_now);
        RETURN jsonb_build_object('op', o->'op', 'applied', true, 'key', v_key,
                                  'value', v_new.value, 'version', v_new.version,
                                  'expiresAt', queen.format_ts6(v_new.expires_at));
    ELSIF v_kind = 'delete' AND v_cur.key IS NOT NULL THEN
        DELETE FROM queen.kv WHERE namespace = v_ns AND key = v_key;
    END IF;
    -- delete (the removed row, or version 0 for `expect: 0` on an absent key) and check
    RETURN jsonb_build_object('op', o->'op', 'applied', true, 'key', v_key,
                              'value', v_value, 'version', v_version);
END
$$;

-- The multi-key reads share one byte budget per call: rows are taken in key byte order while
-- the bytes read before them are under the budget (so the row straddling it is included),
-- then the page stops with `truncated`. Each returns {element, budget (what is left)}.

-- getMany: rows in key byte order, missing keys in request order (keys cut by the budget are
-- in neither list).
CREATE OR REPLACE FUNCTION queen.kv_get_many(o jsonb, p_now timestamptz, p_budget bigint)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH wanted AS (
        SELECT k, min(n) AS n FROM jsonb_array_elements_text(o->'keys') WITH ORDINALITY t(k, n)
         GROUP BY k
    ), live AS (
        SELECT r.*, coalesce(sum(r.cost) OVER (ORDER BY r.key ROWS BETWEEN UNBOUNDED PRECEDING
                                                AND 1 PRECEDING), 0) AS before
          FROM (SELECT k.*, octet_length(k.value::text) AS cost FROM queen.kv k
                 WHERE k.namespace = o->>'ns' AND k.key IN (SELECT w.k FROM wanted w)
                   AND (k.expires_at IS NULL OR k.expires_at > p_now)) r
    ), page AS (
        SELECT coalesce(jsonb_agg(queen.kv_row_json(
                   ROW(l.namespace, l.key, l.value, l.version, l.expires_at, l.created_at,
                       l.updated_at)::queen.kv) ORDER BY l.key)
                            FILTER (WHERE l.before < p_budget), '[]'::jsonb) AS rows,
               coalesce(sum(l.cost) FILTER (WHERE l.before < p_budget), 0) AS spent,
               coalesce(bool_or(l.before >= p_budget), false) AS truncated
          FROM live l
    )
    SELECT jsonb_build_object('budget', p_budget - page.spent, 'element', jsonb_build_object(
        'op', o->'op', 'rows', page.rows, 'truncated', page.truncated,
        'missing', (SELECT coalesce(jsonb_agg(w.k ORDER BY w.n), '[]'::jsonb) FROM wanted w
                     WHERE w.k NOT IN (SELECT l.key FROM live l))))
      FROM page
$$;

-- getPrefix: one page of the keys starting with `prefix`, after the `after` cursor
-- (exclusive), in byte order; limit already clamped. The range [prefix, prefix || U+10FFFF]
-- holds every key starting with the prefix except keys whose next character is U+10FFFF
-- followed by more (a noncharacter; such keys are not listed).
CREATE OR REPLACE FUNCTION queen.kv_get_prefix(o jsonb, p_now timestamptz, p_budget bigint)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH candidates AS (
        SELECT k.*, CASE WHEN (o->>'keysOnly')::boolean THEN octet_length(k.key)
                         ELSE octet_length(k.value::text) END AS cost
          FROM queen.kv k
         WHERE k.namespace = o->>'ns'
           AND k.key >= greatest(o->>'prefix', o->>'after') COLLATE "C"
           AND k.key <= (o->>'prefix') || chr(1114111) COLLATE "C"
           AND starts_with(k.key, o->>'prefix')
           AND (o->>'after' IS NULL OR k.key > (o->>'after') COLLATE "C")
           AND (k.expires_at IS NULL OR k.expires_at > p_now)
         ORDER BY k.key
         LIMIT (o->>'limit')::integer + 1
    ), ranked AS (
        SELECT c.*, row_number() OVER w AS n,
               coalesce(sum(c.cost) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                        0) AS before
          FROM candidates c WINDOW w AS (ORDER BY c.key)
    ), page AS (
        SELECT coalesce(jsonb_agg(queen.kv_row_json(
                   ROW(r.namespace, r.key, r.value, r.version, r.expires_at, r.created_at,
                       r.updated_at)::queen.kv, NOT (o->>'keysOnly')::boolean) ORDER BY r.key)
                   FILTER (WHERE r.kept), '[]'::jsonb) AS rows,
               coalesce(sum(r.cost) FILTER (WHERE r.kept), 0) AS spent,
               max(r.key) FILTER (WHERE r.kept) AS last,
               coalesce(bool_or(NOT r.kept), false) AS truncated
          FROM (SELECT ranked.*, ranked.n <= (o->>'limit')::integer
                                 AND ranked.before < p_budget AS kept FROM ranked) r
    )
    SELECT jsonb_build_object('budget', p_budget - page.spent, 'element', jsonb_build_object(
        'op', o->'op', 'rows', page.rows, 'truncated', page.truncated,
        -- (a page the call's budget left empty goes on from where it was asked to start)
        'nextAfter', CASE WHEN page.truncated THEN coalesce(page.last, o->>'after') END))
      FROM page
$$;

-- Applies validated ops (see the top of this file) as one unit: locks, then writes and
-- single-key reads in input order, then multi-key reads (so they see the call's writes).
-- Returns the result elements, index-aligned, each `index` = p_base + position.
-- A lost precondition of a `required` op raises SQLSTATE QKV01 whose message is the JSON
-- {failedIndex, kvReason, version, value}: the caller's exception block rolls back the whole
-- call (kv_call) or bundle (run_transaction).
CREATE OR REPLACE FUNCTION queen.kv_apply(p_ops jsonb, p_base integer DEFAULT 0)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz;
    v_out    jsonb[] := array_fill(NULL::jsonb, ARRAY[jsonb_array_length(p_ops)]);
    v_budget bigint := 4 * 1024 * 1024;
    v_op     jsonb;
    v_pos    integer;
    v_elem   jsonb;
    v_row    queen.kv;
    v_read   jsonb;
BEGIN
    PERFORM queen.kv_lock(p_ops);
    v_now := clock_timestamp();  -- after the locks: the call's one instant
    FOR v_op, v_pos IN SELECT e, n::integer FROM jsonb_array_elements(p_ops) WITH ORDINALITY t(e, n)
    LOOP
        IF v_op->>'kind' = 'get' THEN
            v_row := queen.kv_live(v_op->>'ns', v_op->>'key', v_now);
            IF v_row.key IS NULL THEN
                v_elem := jsonb_build_object('op', v_op->'op', 'found', false,
                                             'key', v_op->>'key');
            ELSE
                v_elem := jsonb_build_object('op', v_op->'op', 'found', true)
                          || queen.kv_row_json(v_row);
                v_budget := v_budget - octet_length(v_row.value::text);
            END IF;
        ELSIF v_op->>'kind' IN ('getMany', 'getPrefix') THEN
            CONTINUE;
        ELSE
            v_elem := queen.kv_write_op(v_op, v_now);
            IF NOT (v_elem->>'applied')::boolean
               AND coalesce((v_op->>'required')::boolean, false) THEN
                RAISE EXCEPTION USING ERRCODE = 'QKV01', MESSAGE = jsonb_build_object(
                    'failedIndex', p_base + v_pos - 1, 'kvReason', v_elem->'reason',
                    'version', v_elem->'version', 'value', v_elem->'value')::text;
            END IF;
        END IF;
        v_out[v_pos] := jsonb_build_object('index', p_base + v_pos - 1) || v_elem;
    END LOOP;
    FOR v_op, v_pos IN SELECT e, n::integer FROM jsonb_array_elements(p_ops) WITH ORDINALITY t(e, n)
                        WHERE e->>'kind' IN ('getMany', 'getPrefix')
    LOOP
        IF v_op->>'kind' = 'getMany' THEN
            v_read := queen.kv_get_many(v_op, v_now, v_budget);
        ELSE
            v_read := queen.kv_get_prefix(v_op, v_now, v_budget);
        END IF;
        v_budget := (v_read->>'budget')::bigint;
        v_out[v_pos] := jsonb_build_object('index', p_base + v_pos - 1) || (v_read->'element');
    END LOOP;
    RETURN to_jsonb(v_out);
END
$$;

-- POST /api/v1/kv: {results} or, when a `required` op lost, {ok: false, reason:
-- "kv_precondition", failedIndex, kvReason, version, value} with nothing applied.
CREATE OR REPLACE FUNCTION queen.kv_call(p_ops jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN jsonb_build_object('results', queen.kv_apply(p_ops));
EXCEPTION WHEN SQLSTATE 'QKV01' THEN
    RETURN jsonb_build_object('ok', false, 'reason', 'kv_precondition') || SQLERRM::jsonb;
END
$$;

-- The sweeper (queen_tw/service.py): deletes up to p_limit rows expired before now (they are
-- already absent to every read); returns how many.
CREATE OR REPLACE FUNCTION queen.kv_sweep(p_limit integer) RETURNS integer
LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM queen.kv k
         USING (SELECT namespace, key FROM queen.kv
                 WHERE expires_at IS NOT NULL AND expires_at <= now()
                 ORDER BY expires_at LIMIT p_limit
                   FOR UPDATE SKIP LOCKED) x
         WHERE k.namespace = x.namespace AND k.key = x.key AND k.expires_at <= now()
        RETURNING 1)
    SELECT count(*)::integer FROM gone
$$;
