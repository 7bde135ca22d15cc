-- Locks and semaphores (WIRE2.md 4): POST /api/v1/locks turned into KV rows.
--
-- A permit is the KV row ('queen-locks', '<name>#<slot>') with value {owner, since?} and a
-- TTL; its version is the permit's fencing token. A lock is a semaphore of one slot. All the
-- slots of a name share one advisory lock (queen.kv_lock_id), taken for every name of the
-- call in lock-id order before anything is read: a semaphore's free slot is then chosen with
-- no race (so `contended` never happens here) and a guard (a `check` of the permit in a
-- transaction's kv rider) waits for a renew or takeover in progress.
--
-- Ops arrive validated by queen_tw/http/kv_input.py: {op: acquire|renew|release|get, name,
-- ttl, owner, limit, token, slot}.

-- The guard of a permit: the KV op a transaction puts first in its `kv` rider.
CREATE OR REPLACE FUNCTION queen.lock_guard(p_name text, p_slot integer, p_token bigint)
RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('op', 'check', 'ns', 'queen-locks',
                              'key', p_name || '#' || p_slot, 'expect', p_token,
                              'required', true)
$$;

-- The live permits of a name, slot order: {slot, owner, token, since, expiresAt, renewedAt}.
CREATE OR REPLACE FUNCTION queen.lock_holders(p_name text, p_now timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'slot', h.slot, 'owner', h.value->'owner', 'token', h.version,
               'since', coalesce(h.value->'since', to_jsonb(queen.format_ts6(h.created_at))),
               'expiresAt', queen.format_ts6(h.expires_at),
               'renewedAt', CASE WHEN h.value ? 'since'
                                 THEN to_jsonb(queen.format_ts6(h.updated_at)) END)
             ORDER BY h.slot), '[]'::jsonb)
      FROM (SELECT k.*, substr(k.key, length(p_name) + 2)::integer AS slot
              FROM queen.kv k
             WHERE k.namespace = 'queen-locks'
               AND k.key > p_name || '#' AND k.key < p_name || '$'
               AND substr(k.key, length(p_name) + 2) ~ '^[0-9]{1,4}$'
               AND (k.expires_at IS NULL OR k.expires_at > p_now)) h
$$;

-- Holders as a refusal shows them: [{slot, owner}].
CREATE OR REPLACE FUNCTION queen.lock_owners(p_holders jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('slot', h->'slot', 'owner', h->'owner')),
                    '[]'::jsonb)
      FROM jsonb_array_elements(p_holders) h
$$;

CREATE OR REPLACE FUNCTION queen.lock_acquire(o jsonb, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_name    text := o->>'name';
    v_limit   integer := coalesce((o->>'limit')::integer, 1);
    v_owner   text := coalesce(o->>'owner', gen_random_uuid()::text);
    v_holders jsonb;
    v_mine    jsonb;
    v_slot    integer;
    v_row     queen.kv;
BEGIN
    SELECT coalesce(jsonb_agg(h), '[]'::jsonb) INTO v_holders
      FROM jsonb_array_elements(queen.lock_holders(v_name, p_now)) h
     WHERE (h->>'slot')::integer < v_limit;
    SELECT h INTO v_mine FROM jsonb_array_elements(v_holders) h
     WHERE h->>'owner' = v_owner LIMIT 1;
    IF v_mine IS NOT NULL THEN  -- a retry whose first answer was lost
        RETURN jsonb_build_object(
            'acquired', true, 'already', true, 'slot', v_mine->'slot', 'token', v_mine->'token',
            'owner', v_owner, 'expiresAt', v_mine->'expiresAt',
            'guard', queen.lock_guard(v_name, (v_mine->>'slot')::integer,
                                      (v_mine->>'token')::bigint));
    END IF;
    IF jsonb_array_length(v_holders) >= v_limit THEN
        RETURN jsonb_build_object('acquired', false, 'reason', 'held',
                                  'holders', queen.lock_owners(v_holders));
    END IF;
    SELECT s INTO v_slot FROM generate_series(0, v_limit - 1) s
     WHERE NOT EXISTS (SELECT 1 FROM jsonb_array_elements(v_holders) h
                        WHERE (h->>'slot')::integer = s)
     ORDER BY random() LIMIT 1;
    v_row := queen.kv_store('queen-locks', v_name || '#' || v_slot,
                            jsonb_build_object('owner', v_owner),
                            p_now + make_interval(secs => (o->>'ttl')::bigint), p_now);
    RETURN jsonb_build_object('acquired', true, 'slot', v_slot, 'token', v_row.version,
                              'owner', v_owner, 'expiresAt', queen.format_ts6(v_row.expires_at),
                              'guard', queen.lock_guard(v_name, v_slot, v_row.version));
END
$$;

-- Renew: the slot's live permit at `token`, or held by `owner` (the lost answer of an earlier
-- renew), is rewritten with the new TTL and `since` kept: a new token.
CREATE OR REPLACE FUNCTION queen.lock_renew(o jsonb, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_name text := o->>'name';
    v_slot integer := coalesce((o->>'slot')::integer, 0);
    v_cur  queen.kv := queen.kv_live('queen-locks', v_name || '#' || v_slot, p_now);
    v_row  queen.kv;
BEGIN
    -- (coalesce: a renew without `owner` compares NULL, which must count as "not the holder")
    IF v_cur.key IS NULL OR NOT (coalesce(v_cur.version = (o->>'token')::bigint, false)
                                 OR coalesce(v_cur.value->>'owner' = o->>'owner', false)) THEN
        RETURN jsonb_build_object('renewed', false, 'reason', 'lost', 'slot', v_slot,
                                  'holders', queen.lock_owners(queen.lock_holders(v_name, p_now)));
    END IF;
    v_row := queen.kv_store('queen-locks', v_cur.key,
                            v_cur.value || jsonb_build_object('since', coalesce(
                                v_cur.value->'since', to_jsonb(queen.format_ts6(v_cur.created_at)))),
                            p_now + make_interval(secs => (o->>'ttl')::bigint), p_now);
    RETURN jsonb_build_object('renewed', true, 'slot', v_slot, 'token', v_row.version,
                              'expiresAt', queen.format_ts6(v_row.expires_at),
                              'guard', queen.lock_guard(v_name, v_slot, v_row.version));
END
$$;

CREATE OR REPLACE FUNCTION queen.lock_release(o jsonb, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_name text := o->>'name';
    v_slot integer := coalesce((o->>'slot')::integer, 0);
BEGIN
    DELETE FROM queen.kv
     WHERE namespace = 'queen-locks' AND key = v_name || '#' || v_slot
       AND version = (o->>'token')::bigint
       AND (expires_at IS NULL OR expires_at > p_now);
    IF FOUND THEN
        RETURN jsonb_build_object('released', true, 'slot', v_slot);
    END IF;
    RETURN jsonb_build_object('released', false, 'reason', 'lost', 'slot', v_slot,
                              'holders', queen.lock_owners(queen.lock_holders(v_name, p_now)));
END
$$;

-- POST /api/v1/locks: {results}, one element per op, in input order.
CREATE OR REPLACE FUNCTION queen.locks_apply(p_ops jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_id    integer;
    v_now   timestamptz;
    v_out   jsonb := '[]'::jsonb;
    v_op    jsonb;
    v_pos   integer;
    v_elem  jsonb;
    v_holders jsonb;
BEGIN
    FOR v_id IN SELECT DISTINCT queen.kv_lock_id('queen-locks', o->>'name' || '#0')
                  FROM jsonb_array_elements(p_ops) o
                 WHERE o->>'op' <> 'get' ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(queen.kv_lock_class(), v_id);
    END LOOP;
    v_now := clock_timestamp();
    FOR v_op, v_pos IN SELECT e, n::integer FROM jsonb_array_elements(p_ops) WITH ORDINALITY t(e, n)
    LOOP
        CASE v_op->>'op'
            WHEN 'acquire' THEN v_elem := queen.lock_acquire(v_op, v_now);
            WHEN 'renew' THEN v_elem := queen.lock_renew(v_op, v_now);
            WHEN 'release' THEN v_elem := queen.lock_release(v_op, v_now);
            ELSE
                v_holders := queen.lock_holders(v_op->>'name', v_now);
                v_elem := jsonb_build_object('held', jsonb_array_length(v_holders) > 0,
                                             'holders', v_holders);
        END CASE;
        v_out := v_out || jsonb_build_array(jsonb_build_object(
            'index', v_pos - 1, 'op', v_op->'op', 'name', v_op->'name') || v_elem);
    END LOOP;
    RETURN jsonb_build_object('results', v_out);
END
$$;
