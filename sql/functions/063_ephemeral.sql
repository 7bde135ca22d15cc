-- Declarations of ephemeral queues (WIRE2.md 7; queen_tw/ephemeral/declarations.py).

-- Stores (or replaces) one queue's options; answers the stored declaration {queue, options}.
CREATE OR REPLACE FUNCTION queen.ephemeral_declare(p_name text, p_options jsonb)
RETURNS jsonb LANGUAGE sql AS $$
    INSERT INTO queen.ephemeral_queues AS q (name, options) VALUES (p_name, p_options)
    ON CONFLICT (name) DO UPDATE SET options = EXCLUDED.options, updated_at = now()
    RETURNING jsonb_build_object('queue', q.name, 'options', q.options)
$$;

-- Removes one declaration; true when there was one.
CREATE OR REPLACE FUNCTION queen.ephemeral_forget(p_name text)
RETURNS boolean LANGUAGE sql AS $$
    WITH gone AS (DELETE FROM queen.ephemeral_queues WHERE name = p_name RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM gone)
$$;

-- Every declaration, by name: [{queue, options}, ...].
CREATE OR REPLACE FUNCTION queen.ephemeral_declarations()
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('queue', name, 'options', options)
                              ORDER BY name), '[]'::jsonb)
    FROM queen.ephemeral_queues
$$;
