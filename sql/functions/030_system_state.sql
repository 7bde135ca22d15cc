-- Cluster-wide flags (WIRE.md 3.7): maintenance_mode and pop_maintenance_mode, each stored as
-- {"enabled": bool} in queen.system_state (table in migrations/0001_baseline.sql). Every
-- instance reads them at start and every QUEEN_CACHE_REFRESH_INTERVAL_MS.

-- Every flag as one object: {"maintenance_mode": {"enabled": true}, ...}.
CREATE OR REPLACE FUNCTION queen.system_state_get() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_object_agg(key, value), '{}'::jsonb) FROM queen.system_state
$$;

-- Sets one flag; returns the stored value.
CREATE OR REPLACE FUNCTION queen.system_state_set(p_key text, p_value jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    INSERT INTO queen.system_state (key, value) VALUES (p_key, p_value)
    ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now()
    RETURNING value
$$;

-- Whether anything encrypted is stored (payloads, timers, dead timers).
CREATE OR REPLACE FUNCTION queen.encrypted_payloads_stored() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM queen.messages WHERE is_encrypted)
        OR EXISTS (SELECT 1 FROM queen.timers WHERE encrypted)
        OR EXISTS (SELECT 1 FROM queen.timer_dead_letters WHERE encrypted)
$$;

-- One stored encryption envelope ({"encrypted", "iv", "authTag"}), NULL when none: a server
-- tries to open it when no key digest is recorded yet (see encryption_key_check).
CREATE OR REPLACE FUNCTION queen.encrypted_payload_sample() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT payload FROM queen.messages WHERE is_encrypted LIMIT 1),
        (SELECT convert_from(payload, 'UTF8')::jsonb FROM queen.timers WHERE encrypted LIMIT 1),
        (SELECT convert_from(payload, 'UTF8')::jsonb FROM queen.timer_dead_letters
          WHERE encrypted LIMIT 1))
$$;

-- The encryption key check (key 'encryption_key_check', {"check": text}): a digest of the
-- database's QUEEN_ENCRYPTION_KEY, never the key. A server with a key calls this before it
-- opens its pool: 'recorded' (the first key), 'matches', 'mismatch' (another key, and
-- encrypted payloads it cannot read are stored) or 'differs' (another key, nothing encrypted
-- stored yet; instances with the recorded key may still be running and encrypt any time). The
-- server refuses to start on the last two: it would hand payloads out undecrypted and seal
-- new ones no other instance could open. Changing the key is an operator's step (README).
-- 'unverified': no digest is recorded but encrypted payloads are (a database written by a
-- release from before this check): nothing is recorded, and the server opens
-- encrypted_payload_sample() with its key, then records it with p_verified true, or refuses
-- to start. Recording the first key seen would make a wrong one the database's for good.
CREATE OR REPLACE FUNCTION queen.encryption_key_check(p_check text, p_verified boolean)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_stored text;
BEGIN
    IF NOT p_verified
       AND NOT EXISTS (SELECT 1 FROM queen.system_state WHERE key = 'encryption_key_check')
       AND queen.encrypted_payloads_stored() THEN
        RETURN 'unverified';
    END IF;
    INSERT INTO queen.system_state (key, value)
    VALUES ('encryption_key_check', jsonb_build_object('check', p_check))
    ON CONFLICT (key) DO NOTHING;
    IF FOUND THEN
        RETURN 'recorded';
    END IF;
    SELECT value->>'check' INTO v_stored FROM queen.system_state
     WHERE key = 'encryption_key_check' FOR UPDATE;
    IF v_stored = p_check THEN
        RETURN 'matches';
    END IF;
    IF queen.encrypted_payloads_stored() THEN
        RETURN 'mismatch';
    END IF;
    RETURN 'differs';
END
$$;

-- The check of the earlier release (which records the first key it is given).
CREATE OR REPLACE FUNCTION queen.encryption_key_check(p_check text) RETURNS text
LANGUAGE sql AS $$
    SELECT queen.encryption_key_check(p_check, true)
$$;
