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
