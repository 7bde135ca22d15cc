-- Pop: claim partitions for a consumer group under one lease and read their pending messages.
-- One call serves many requests (pop_specific_batch), so the server fuses concurrent pops.
-- Wildcard and namespace pops find candidate partitions in queen.partition_pending (see
-- 020_pending_lookup.sql), so their cost follows the partitions with work, not the queue size.

-- Plans. pop_request and pop_partition run on generic plans: their statements have one good
-- shape whatever the values, but the planner's generic estimate of `LIMIT <parameter>` (a
-- tenth of the partition) made it re-plan them at every call, about a quarter of a pop's
-- database time. The functions they call whose statements do change shape with the values
-- (CASE on a parameter, folded away only in a custom plan) say plan_cache_mode = auto.

-- STABLE like to_char inside them, so the planner inlines them (an IMMUTABLE label on a
-- STABLE body blocks inlining: a function call per message, ~2x slower).
CREATE OR REPLACE FUNCTION queen.format_ts6(ts timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

CREATE OR REPLACE FUNCTION queen.format_ts3(ts timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- The cursor that means "strictly after every message created at or before p_from"; the
-- beginning of time is the zero cursor, so no message sorts before it.
CREATE OR REPLACE FUNCTION queen.start_cursor_id(p_from timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_from = '-infinity' THEN '00000000-0000-0000-0000-000000000000'::uuid
                ELSE 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid END
$$;

-- subscriptionFrom as a point in time, NULL when it is none: unparsable, or one of
-- PostgreSQL's infinities ('infinity' would start a group after every message ever).
CREATE OR REPLACE FUNCTION queen.subscription_timestamp(p_from text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_at timestamptz;
BEGIN
    v_at := p_from::timestamptz;
    RETURN CASE WHEN isfinite(v_at) THEN v_at END;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;

-- First-contact decision of a named group (2.3.6): a timestamp, "now", or the beginning.
-- An unparsable subscriptionFrom is ignored (point 7). "Now" is p_since when given: the
-- database time at which a long poll began waiting for a queue that did not exist yet, so
-- the push that creates the queue is new to that consumer, not history.
CREATE OR REPLACE FUNCTION queen.subscription_start(p_mode text, p_from text,
                                                    p_since timestamptz) RETURNS timestamptz
LANGUAGE plpgsql AS $$
BEGIN
    IF p_from IS NOT NULL AND p_from <> '' THEN
        IF lower(p_from) = 'now' THEN
            RETURN least(now(), p_since);
        END IF;
        RETURN coalesce(queen.subscription_timestamp(p_from),
                        queen.subscription_start(p_mode, NULL, p_since));
    END IF;
    IF lower(coalesce(p_mode, '')) IN ('new', 'new-only') THEN
        RETURN least(now(), p_since);
    END IF;
    RETURN '-infinity';
END
$$;

-- The decision of a group that is not waiting (the earlier release's signature).
CREATE OR REPLACE FUNCTION queen.subscription_start(p_mode text, p_from text) RETURNS timestamptz
LANGUAGE sql AS $$
    SELECT queen.subscription_start(p_mode, p_from, NULL)
$$;

-- How the decision is reported by the consumer-group routes.
CREATE OR REPLACE FUNCTION queen.subscription_mode_name(p_mode text, p_from text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF p_from IS NOT NULL AND p_from <> '' THEN
        IF lower(p_from) = 'now' THEN
            RETURN 'new';
        END IF;
        IF queen.subscription_timestamp(p_from) IS NOT NULL THEN
            RETURN 'timestamp';
        END IF;
    END IF;
    RETURN CASE WHEN lower(coalesce(p_mode, '')) IN ('new', 'new-only') THEN 'new' ELSE 'all' END;
END
$$;

-- Where group p_group starts in queue p_queue's partitions it has no cursor in. The first
-- contact records the decision (queue mode: the beginning; named groups: from the request, or
-- p_inherited when a namespace subscription decided it) and seeds the pending lookup; later
-- calls just read the record, whatever the request says (2.3.6 point 5). With p_create false
-- a missing record answers NULL and nothing is written (see subscribe_for). The first contact
-- also fixes the group's conflation policy (p_conflation; WIRE2 8.4, migration 7).
-- p_since: see subscription_start.
-- (A development version had this as a 7-argument queen.subscribe, and an earlier release
-- without p_since: both dropped where they exist.)
DROP FUNCTION IF EXISTS queen.subscribe(uuid, text, text, text, timestamptz, boolean, boolean);
DROP FUNCTION IF EXISTS queen.subscribe_group(uuid, text, text, text, timestamptz, boolean, boolean);
CREATE OR REPLACE FUNCTION queen.subscribe_group(p_queue uuid, p_group text, p_mode text,
                                                 p_from text, p_inherited timestamptz,
                                                 p_create boolean, p_conflation boolean,
                                                 p_since timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    v_from timestamptz;
    v_mode text;
BEGIN
    SELECT subscription_from INTO v_from FROM queen.consumer_subscriptions
     WHERE queue_id = p_queue AND consumer_group = p_group;
    IF FOUND OR NOT p_create THEN
        RETURN v_from;
    END IF;
    IF p_group = '__QUEUE_MODE__' THEN
        v_from := '-infinity';
        v_mode := 'all';
    ELSIF p_inherited IS NOT NULL THEN
        v_from := p_inherited;
        v_mode := CASE WHEN p_inherited = '-infinity' THEN 'all' ELSE 'timestamp' END;
    ELSE
        v_from := queen.subscription_start(p_mode, p_from, p_since);
        v_mode := queen.subscription_mode_name(p_mode, p_from);
    END IF;
    -- Exclusive on the queue's lookup lock: no push commits between the record and the seeding.
    PERFORM pg_advisory_xact_lock(queen.lookup_lock_class(), hashtext(p_queue::text));
    INSERT INTO queen.consumer_subscriptions (queue_id, consumer_group, subscription_mode,
                                              subscription_from, conflation)
    VALUES (p_queue, p_group, v_mode, v_from, p_conflation AND p_group <> '__QUEUE_MODE__')
    ON CONFLICT (queue_id, consumer_group) DO NOTHING;
    IF FOUND THEN
        PERFORM queen.seed_pending(p_queue, p_group, v_from);
        RETURN v_from;
    END IF;
    SELECT subscription_from INTO v_from FROM queen.consumer_subscriptions
     WHERE queue_id = p_queue AND consumer_group = p_group;
    RETURN v_from;
END
$$;

-- subscribe_group for a group without a conflation policy (the earlier release's signature).
CREATE OR REPLACE FUNCTION queen.subscribe(p_queue uuid, p_group text, p_mode text, p_from text,
                                           p_inherited timestamptz DEFAULT NULL,
                                           p_create boolean DEFAULT true)
RETURNS timestamptz
LANGUAGE sql AS $$
    SELECT queen.subscribe_group(p_queue, p_group, p_mode, p_from, p_inherited, p_create, false,
                                 NULL)
$$;

-- Creates the (partition, group) row when the group first lands on a partition, starting at
-- the group's subscription point. False when another transaction is creating it right now
-- (the caller skips the partition instead of waiting for that transaction), or when the
-- partition is gone.
CREATE OR REPLACE FUNCTION queen.ensure_consumer(p_partition uuid, p_group text, p_from timestamptz)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM queen.partition_consumers
                WHERE partition_id = p_partition AND consumer_group = p_group) THEN
        RETURN true;
    END IF;
    IF NOT pg_try_advisory_xact_lock(queen.lookup_lock_class() + 1,
                                     hashtext(p_partition::text || '/' || p_group)) THEN
        RETURN false;
    END IF;
    -- Shared on the group's claim lock on the queue (queen.lock_group_claims): a change of
    -- this group (a delete, a seek) holding it exclusively made its changes without seeing
    -- this row, which the pop then committed with a lease for a deleted group. Not waited
    -- for: the partition is skipped this time, and the change waits for this transaction.
    IF NOT coalesce(pg_try_advisory_xact_lock_shared(queen.lookup_lock_class() + 3, hashtext(
            (SELECT queue_id FROM queen.partitions WHERE id = p_partition)::text
            || '/' || p_group)), true) THEN
        RETURN false;
    END IF;
    BEGIN  -- (a block of its own: the usual call above pays no subtransaction)
        INSERT INTO queen.partition_consumers (partition_id, consumer_group, cursor_created_at,
                                               cursor_id)
        VALUES (p_partition, p_group, p_from, queen.start_cursor_id(p_from))
        ON CONFLICT (partition_id, consumer_group) DO NOTHING;
    EXCEPTION WHEN foreign_key_violation THEN
        RETURN false;  -- the partition was deleted meanwhile (an idle one by retention's cleanup)
    END;
    RETURN true;
END
$$;

-- Leases that ended for their holder without an ack: expired and taken over, or ended by an
-- operator (seek, clear, a dead letter by hand). A transaction listing one must fail, as it
-- would on the row of a lease that expired (migration 13); the caller holds the rows' locks.
CREATE OR REPLACE FUNCTION queen.note_ended_leases(p_leases uuid[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO queen.expired_leases (lease_id)
    SELECT DISTINCT l FROM unnest(p_leases) AS l WHERE l IS NOT NULL
    ON CONFLICT (lease_id) DO NOTHING
$$;

-- Expires the leases p_leases now: pops the server made but never answered with (the call
-- failed or timed out on its side, and PostgreSQL may have committed it all the same), so
-- nobody holds them, and their messages would stay hidden for the queue's leaseTime. The
-- next pop takes them over as after any expiry. Returns [[queue, partition]] of each
-- partition freed, for its parked pops to be woken.
-- (p_leases: a JSON array of lease ids, as the server passes lists)
CREATE OR REPLACE FUNCTION queen.expire_leases(p_leases jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    WITH freed AS (
        UPDATE queen.partition_consumers pc SET lease_expires_at = now()
         WHERE pc.lease_id = ANY(ARRAY(SELECT jsonb_array_elements_text(p_leases)::uuid))
           AND pc.lease_expires_at > now()
        RETURNING pc.partition_id)
    SELECT coalesce(jsonb_agg(DISTINCT jsonb_build_array(qu.name, p.name)), '[]'::jsonb)
      FROM freed f JOIN queen.partitions p ON p.id = f.partition_id
      JOIN queen.queues qu ON qu.id = p.queue_id
$$;

-- What one pop answer may carry in payload text: without a bound, a batch of big messages
-- built an answer over PostgreSQL's 1 GB string limit, which failed the pop every time (the
-- partition looked empty to that consumer forever). Each partition's read stops at 64 MiB
-- plus one message (the largest a push body takes); a pop across partitions claims no
-- further partition once its answer holds 64 MiB.
CREATE OR REPLACE FUNCTION queen.pop_byte_budget() RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT 64 * 1024 * 1024::bigint $$;

-- Tries to deliver from one partition to one group: ``messages`` is the json text of the array
-- handed out, put together here and never parsed again (NULL when the partition is leased,
-- cooling down, in its window, or has nothing due), ``n`` its length, ``last_id`` the last
-- message's id and ``encrypted_ids`` the messages whose data the server must decrypt (NULL
-- when none).
-- p_lease_id NULL means autoAck: the cursor moves at once and no lease remains.
-- p_lease_seconds > 0 overrides the queue's leaseTime (the SQL-level API's lease_seconds).
CREATE OR REPLACE FUNCTION queen.pop_partition(p_partition uuid, p_group text, p_batch integer,
                                               p_lease_id uuid, p_worker text,
                                               p_lease_seconds integer, p_from timestamptz,
                                               OUT messages text, OUT n integer,
                                               OUT queue_name text, OUT partition_name text,
                                               OUT last_id uuid, OUT encrypted_ids uuid[])
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_part     record;
    v_pc       record;
    v_last_at  timestamptz;
    v_lease    integer;
    v_shared   text;
    v_skip_at  timestamptz;
    v_skip_id  uuid;
BEGIN
    n := 0;
    SELECT p.id, p.name, p.last_message_at, qu.id AS queue_id, qu.name AS queue_name,
           qu.lease_time, qu.delayed_processing, qu.window_buffer,
           coalesce(cs.conflation, false) AS conflation
      INTO v_part
      FROM queen.partitions p JOIN queen.queues qu ON qu.id = p.queue_id
      LEFT JOIN queen.consumer_subscriptions cs
             ON cs.queue_id = qu.id AND cs.consumer_group = p_group
     WHERE p.id = p_partition;
    IF NOT FOUND OR v_part.last_message_at IS NULL THEN
        RETURN;
    END IF;
    IF v_part.window_buffer > 0
       AND v_part.last_message_at > now() - make_interval(secs => v_part.window_buffer) THEN
        RETURN;
    END IF;

    IF NOT queen.ensure_consumer(p_partition, p_group, p_from) THEN
        RETURN;
    END IF;
    -- A leased or cooling partition is refused on a plain read: locking its row would make
    -- the acks of the delivery in flight wait until this whole (fused) pop call commits.
    IF EXISTS (SELECT 1 FROM queen.partition_consumers
                WHERE partition_id = p_partition AND consumer_group = p_group
                  AND ((lease_id IS NOT NULL AND lease_expires_at > now())
                       OR retry_after > now())) THEN
        RETURN;
    END IF;
    -- Another request claiming this partition right now is skipped, never waited for.
    SELECT * INTO v_pc FROM queen.partition_consumers
     WHERE partition_id = p_partition AND consumer_group = p_group
       FOR UPDATE SKIP LOCKED;
    IF NOT FOUND
       OR (v_pc.lease_id IS NOT NULL AND v_pc.lease_expires_at > now())
       OR (v_pc.retry_after IS NOT NULL AND v_pc.retry_after > now()) THEN
        RETURN;
    END IF;

    -- Conflation (WIRE2 8.4): only the newest visible message is handed out. Reading on from
    -- the one before it delivers it alone, while the lease still starts at the cursor: its
    -- completed ack moves the cursor over the whole span, a failed one retries the span.
    IF v_part.conflation THEN
        SELECT m.created_at, m.id INTO v_skip_at, v_skip_id
          FROM queen.messages m
         WHERE m.partition_id = p_partition
           AND (m.created_at, m.id) > (v_pc.cursor_created_at, v_pc.cursor_id)
           AND (v_part.delayed_processing = 0
                OR m.created_at <= now() - make_interval(secs => v_part.delayed_processing))
         ORDER BY m.created_at DESC, m.id DESC
         OFFSET 1 LIMIT 1;
        IF FOUND THEN
            v_pc.cursor_created_at := v_skip_at;
            v_pc.cursor_id := v_skip_id;
        END IF;
    END IF;

    -- Each message's JSON text is put together by concatenation: the fields shared by the
    -- whole delivery are escaped once (v_shared), every value is JSON-escaped (to_json, jsonb's
    -- own text form, uuids and timestamps need none); json_build_object per message took
    -- twice as long and added " : " spacing to every key.
    v_shared := ',"partition":' || to_json(v_part.name) || ',"queue":' || to_json(v_part.queue_name)
                || ',"consumerGroup":' || to_json(p_group)
                || ',"leaseId":"' || coalesce(p_lease_id::text, '') || '","data":';
    SELECT ('[' || string_agg(
               '{"id":"' || m.id || '","transactionId":' || to_json(m.transaction_id)
               || ',"partitionId":"' || m.partition_id || '"' || v_shared || coalesce(m.body, 'null')
               || ',"traceId":' || coalesce('"' || m.trace_id || '"', 'null')
               || ',"producerSub":' || coalesce(to_json(m.producer_sub)::text, 'null')
               || ',"createdAt":"' || queen.format_ts6(m.created_at)
               || '","retryCount":' || v_pc.retry_count
               -- 2.x: the delivery's attempt (1 = first) and the message's offset (migration 6)
               || ',"deliveryAttempt":' || (v_pc.retry_count + 1) || ',"offset":' || (m.seq - 1) || '}',
               ',' ORDER BY m.created_at, m.id) || ']'),
           count(*),
           -- the last message: one order for every aggregate, the scan's own, so none sorts
           (array_agg(m.created_at ORDER BY m.created_at, m.id))[count(*)::int],
           (array_agg(m.id ORDER BY m.created_at, m.id))[count(*)::int],
           array_agg(m.id) FILTER (WHERE m.is_encrypted)
      INTO messages, n, v_last_at, last_id, encrypted_ids
      FROM (SELECT * FROM (
              SELECT t.*, sum(octet_length(t.body)) OVER (ORDER BY t.created_at, t.id)
                          - octet_length(t.body) AS bytes_before
                FROM (SELECT m.*, m.payload::text AS body FROM queen.messages m
                       WHERE m.partition_id = p_partition
                         AND (m.created_at, m.id) > (v_pc.cursor_created_at, v_pc.cursor_id)
                         AND (v_part.delayed_processing = 0
                              OR m.created_at <= now() - make_interval(secs => v_part.delayed_processing))
                       ORDER BY m.created_at, m.id
                       LIMIT greatest(p_batch, 1)) t) b
             -- The byte budget (queen.pop_byte_budget): payloads are taken while the bytes
             -- before them are under it, so one message always goes, whatever its size.
             WHERE b.bytes_before IS NULL OR b.bytes_before < queen.pop_byte_budget()
             ORDER BY b.created_at, b.id) m;

    IF n = 0 THEN
        -- A lease that expired with nothing left to redeliver is simply over.
        IF v_pc.lease_id IS NOT NULL THEN
            PERFORM queen.note_ended_leases(ARRAY[v_pc.lease_id]);
            UPDATE queen.partition_consumers SET lease_id = NULL, lease_expires_at = NULL
             WHERE partition_id = p_partition AND consumer_group = p_group;
        END IF;
        RETURN;
    END IF;
    queue_name := v_part.queue_name;
    partition_name := v_part.name;
    -- A lease still on the row expired (live ones returned above): this pop takes the
    -- partition over, and a transaction of the old holder must still find it expired
    -- (migration 13). (Tested here: the common pop, on a free row, pays no statement.)
    IF v_pc.lease_id IS NOT NULL THEN
        PERFORM queen.note_ended_leases(ARRAY[v_pc.lease_id]);
    END IF;
    IF p_lease_id IS NULL THEN
        UPDATE queen.partition_consumers
           SET cursor_created_at = v_last_at, cursor_id = last_id,
               lease_id = NULL, lease_expires_at = NULL, retry_count = 0,
               total_consumed = total_consumed + n, batches_consumed = batches_consumed + 1,
               last_consumed_at = now(), last_served_at = clock_timestamp(), worker_id = p_worker
         WHERE partition_id = p_partition AND consumer_group = p_group;
    ELSE
        v_lease := coalesce(nullif(greatest(p_lease_seconds, 0), 0),
                            nullif(greatest(v_part.lease_time, 0), 0), 60);
        UPDATE queen.partition_consumers
           SET lease_id = p_lease_id, lease_expires_at = now() + make_interval(secs => v_lease),
               lease_last_created_at = v_last_at, lease_last_id = last_id,
               lease_count = n, last_served_at = clock_timestamp(), worker_id = p_worker
         WHERE partition_id = p_partition AND consumer_group = p_group;
    END IF;
END
$$;

-- The queues a pop reads, highest priority first: one by name, or every queue whose namespace
-- and/or task match (namespace pops).
CREATE OR REPLACE FUNCTION queen.pop_scope(p_req jsonb) RETURNS TABLE (id uuid, name text)
LANGUAGE sql STABLE AS $$
    SELECT qu.id, qu.name FROM queen.queues qu
     WHERE CASE WHEN p_req->>'queue' IS NOT NULL THEN qu.name = p_req->>'queue'
                ELSE (p_req->>'namespace' IS NULL OR qu.namespace = p_req->>'namespace')
                 AND (p_req->>'task' IS NULL OR qu.task = p_req->>'task')
                 AND (p_req->>'namespace' IS NOT NULL OR p_req->>'task' IS NOT NULL) END
     ORDER BY qu.priority DESC, qu.name
$$;

-- Subscribes the group to every queue of the scope and returns the scope with each queue's
-- subscription point. Namespace pops consult (group, queue) first, then the (group, namespace,
-- task) record, which the first namespace pop creates from the request (2.3.6 point 6).
CREATE OR REPLACE FUNCTION queen.subscribe_scope(p_req jsonb, p_group text,
                                                 p_create boolean DEFAULT true)
RETURNS TABLE (queue_id uuid, queue_name text, sub_from timestamptz)
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
DECLARE
    v_q         record;
    v_inherited timestamptz;
    v_mode      text := p_req->>'subscriptionMode';
    v_from      text := p_req->>'subscriptionFrom';
    v_since     timestamptz := (p_req->>'waitingSince')::timestamptz;
BEGIN
    IF p_req->>'queue' IS NULL AND p_group <> '__QUEUE_MODE__' AND p_create THEN
        INSERT INTO queen.namespace_subscriptions (namespace, task, consumer_group,
                                                   subscription_mode, subscription_from)
        VALUES (coalesce(p_req->>'namespace', ''), coalesce(p_req->>'task', ''), p_group,
                queen.subscription_mode_name(v_mode, v_from),
                queen.subscription_start(v_mode, v_from, v_since))
        ON CONFLICT (namespace, task, consumer_group) DO NOTHING;
        SELECT subscription_from INTO v_inherited FROM queen.namespace_subscriptions
         WHERE namespace = coalesce(p_req->>'namespace', '') AND task = coalesce(p_req->>'task', '')
           AND consumer_group = p_group;
    END IF;
    FOR v_q IN SELECT * FROM queen.pop_scope(p_req) LOOP
        queue_id := v_q.id;
        queue_name := v_q.name;
        sub_from := queen.subscribe_group(v_q.id, p_group, v_mode, v_from, v_inherited,
                                          p_create,
                                          coalesce((p_req->>'conflation')::boolean, false),
                                          v_since);
        RETURN NEXT;
    END LOOP;
END
$$;

-- First contacts of one pop request in a transaction of their own. The server's fused pop
-- batches never create subscriptions (a batch holding the exclusive lookup locks of several
-- queues in request order could deadlock with another); they answer needsSubscription and
-- the server calls this, which takes the locks in queue-id order, then pops again.
CREATE OR REPLACE FUNCTION queen.subscribe_for(p_req jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_group  text := coalesce(nullif(p_req->>'consumerGroup', ''), '__QUEUE_MODE__');
    v_count  integer;
    v_queues uuid[];
BEGIN
    -- The scope's queues still to subscribe, held against a delete (which waits for this
    -- transaction), or left out when one is being deleted (this waits for it, then finds the
    -- queue gone): the first contact's record referenced a queue deleted meanwhile, and that
    -- foreign-key failure failed the whole pop, whatever the scope's other queues held.
    SELECT array_agg(held.id ORDER BY held.id) INTO v_queues
      FROM (SELECT qu.id FROM queen.queues qu
             WHERE qu.id IN (SELECT sc.id FROM queen.pop_scope(p_req) sc
                              WHERE NOT EXISTS (SELECT 1 FROM queen.consumer_subscriptions cs
                                                 WHERE cs.queue_id = sc.id
                                                   AND cs.consumer_group = v_group))
             ORDER BY qu.id FOR KEY SHARE OF qu) held;
    PERFORM queen.lock_lookups(coalesce(v_queues, '{}'));
    SELECT count(*) INTO v_count FROM queen.subscribe_scope(p_req, v_group, true);
    RETURN jsonb_build_object('queues', v_count);
END
$$;

-- When something in the scope may next become deliverable (a lease or retry cool-down ends, a
-- delayed message falls due, a window closes), as ms from now; NULL when nothing is known.
-- Parked long-polls use it to re-check at that moment instead of waiting for their timer.
CREATE OR REPLACE FUNCTION queen.next_eligible_in_ms(p_queues uuid[], p_group text,
                                                     p_partition uuid DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql STABLE SET plan_cache_mode = auto AS $$
BEGIN
    RETURN (
    SELECT ceil(extract(epoch FROM (min(t) - clock_timestamp())) * 1000)::bigint
      FROM (SELECT greatest(
                   CASE WHEN pc.lease_id IS NOT NULL AND pc.lease_expires_at > now()
                        THEN pc.lease_expires_at END,
                   CASE WHEN pc.retry_after > now() THEN pc.retry_after END,
                   CASE WHEN qu.window_buffer > 0
                         AND p.last_message_at > now() - make_interval(secs => qu.window_buffer)
                        THEN p.last_message_at + make_interval(secs => qu.window_buffer) END,
                   CASE WHEN qu.delayed_processing > 0 THEN (
                        SELECT m.created_at + make_interval(secs => qu.delayed_processing)
                          FROM queen.messages m
                         WHERE m.partition_id = p.id
                           AND (m.created_at, m.id) > (coalesce(pc.cursor_created_at, s.subscription_from),
                                                       coalesce(pc.cursor_id, queen.start_cursor_id(s.subscription_from)))
                         ORDER BY m.created_at, m.id LIMIT 1) END) AS t
              FROM queen.partitions p
              JOIN queen.queues qu ON qu.id = p.queue_id
              LEFT JOIN queen.consumer_subscriptions s
                     ON s.queue_id = p.queue_id AND s.consumer_group = p_group
              LEFT JOIN queen.partition_consumers pc
                     ON pc.partition_id = p.id AND pc.consumer_group = p_group
             WHERE CASE WHEN p_partition IS NOT NULL THEN p.id = p_partition
                        ELSE p.id IN (SELECT pp.partition_id FROM queen.partition_pending pp
                                       WHERE pp.queue_id = ANY(p_queues)
                                         AND pp.consumer_group = p_group) END) x
     WHERE t > now());
END
$$;

-- Removes lookup rows of a group whose partitions it has caught up with (normally the cursor
-- trigger does it; this catches rows a concurrent push held locked at that moment).
CREATE OR REPLACE FUNCTION queen.prune_pending(p_queues uuid[], p_group text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    DELETE FROM queen.partition_pending
     WHERE ctid IN (SELECT pp.ctid
                      FROM queen.partition_pending pp
                      JOIN queen.partition_consumers pc
                        ON pc.partition_id = pp.partition_id AND pc.consumer_group = pp.consumer_group
                     WHERE pp.queue_id = ANY(p_queues) AND pp.consumer_group = p_group
                       AND (pc.cursor_created_at, pc.cursor_id) >= (pp.last_message_at, pp.last_message_id)
                       FOR UPDATE OF pp SKIP LOCKED);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- The consumer_watermarks row of WIRE.md 7.2 (kept for the JS harness, never read to decide
-- anything). Fused pop batches write many of these rows in request order, so a writer that
-- cannot take the row's try-lock at once skips it instead of waiting (no deadlock between
-- batches), and a row is rewritten at most once a second.
CREATE OR REPLACE FUNCTION queen.note_empty_scan(p_queue text, p_group text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_try_advisory_xact_lock(queen.lookup_lock_class() + 2, hashtext(p_queue || '/' || p_group)) THEN
        INSERT INTO queen.consumer_watermarks AS wm
               (queue_name, consumer_group, last_empty_scan_at, updated_at)
        VALUES (p_queue, p_group, now(), now())
        ON CONFLICT (queue_name, consumer_group) DO UPDATE
           SET last_empty_scan_at = now(), updated_at = now()
         WHERE wm.updated_at < now() - interval '1 second';
    END IF;
END
$$;

-- One pop request. p_req: {queue | namespace/task, partition (null = any), consumerGroup,
-- batch, autoAck, partitions, workerId, leaseSeconds, subscriptionMode, subscriptionFrom}.
-- ``result``: {success, queue, partition, partitionId, leaseId, consumerGroup,
-- partitionsClaimed, more, encryptedIds}; more = another pop may find something right now;
-- encryptedIds = the delivered messages whose data the server decrypts (null when none).
-- ``messages``: the delivered messages (json array text), kept apart so the server can put
-- them into its answer without parsing them. When nothing could be delivered messages is
-- NULL, result.retryInMs says when something known falls due and result.emptyAt is the
-- database time of the attempt (a long poll's waitingSince). Candidates (2.3.3):
-- partitions with pending work for the group, not leased, not cooling down, outside their
-- window, with a due message; by queue priority, then least recently served (never served
-- first), then id. `batch` caps the whole answer.
CREATE OR REPLACE FUNCTION queen.pop_request(p_req jsonb, OUT result json, OUT messages text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_group      text := coalesce(nullif(p_req->>'consumerGroup', ''), '__QUEUE_MODE__');
    v_batch      integer := greatest(coalesce((p_req->>'batch')::integer, 1), 1);
    v_max_parts  integer := (p_req->>'partitions')::integer;  -- NULL: not given
    -- Autopilot (WIRE2 8.3): when the server sizes the width, it is the ready partitions
    -- divided by autoShare (the server's live pops of this lane, as its controller weighs
    -- them), at most 64 and batch.
    v_share      numeric := (p_req->>'autoShare')::numeric;  -- NULL: width not the server's
    v_oldest_ms  bigint;          -- age of the first claimed partition's oldest message
    v_conflate   boolean;         -- the group's stored conflation policy (WIRE2 8.4)
    v_auto_ack   boolean := coalesce((p_req->>'autoAck')::boolean, false);
    v_worker     text := p_req->>'workerId';
    v_lease_secs integer := coalesce((p_req->>'leaseSeconds')::integer, 0);
    -- (made by the server, which expires it should it never learn the outcome: see
    -- queen.expire_leases)
    v_lease_id   uuid := CASE WHEN v_auto_ack THEN NULL
                              ELSE coalesce(nullif(p_req->>'leaseId', '')::uuid,
                                            gen_random_uuid()) END;
    v_defer      boolean := coalesce((p_req->>'deferSubscription')::boolean, false);
    v_queue_ids  uuid[];
    v_names      text[];
    v_froms      timestamptz[];
    v_cand       record;
    v_got        record;
    v_first      record;
    v_first_id   uuid;            -- the first claimed partition
    v_parts      text[] := '{}';  -- the message arrays (json text) of the claimed partitions
    v_encrypted  uuid[] := '{}';  -- their messages whose data the server decrypts
    v_count      integer := 0;    -- messages in them
    v_bytes      bigint := 0;     -- their json text (queen.pop_byte_budget)
    v_last_id    uuid;
    v_examined   integer := 0;
    v_more       boolean := false;
    v_single     uuid;
BEGIN
    -- The usual pop: one queue the group already subscribed to (one indexed read instead of
    -- subscribe_scope's statements, a fifth of a batch-1 pop's database time).
    IF p_req->>'queue' IS NOT NULL THEN
        SELECT ARRAY[qu.id], ARRAY[qu.name], ARRAY[cs.subscription_from], cs.conflation
          INTO v_queue_ids, v_names, v_froms, v_conflate
          FROM queen.queues qu
          JOIN queen.consumer_subscriptions cs
            ON cs.queue_id = qu.id AND cs.consumer_group = v_group
         WHERE qu.name = p_req->>'queue';
    END IF;
    IF v_queue_ids IS NULL THEN  -- namespace pops and first contacts
        SELECT array_agg(queue_id ORDER BY n), array_agg(queue_name ORDER BY n),
               array_agg(sub_from ORDER BY n)
          INTO v_queue_ids, v_names, v_froms
          FROM queen.subscribe_scope(p_req, v_group, NOT v_defer)
               WITH ORDINALITY AS s(queue_id, queue_name, sub_from, n);
    END IF;
    IF v_queue_ids IS NULL THEN  -- nothing to subscribe to yet (noQueueAt: read by older servers)
        result := json_build_object('success', true, 'queues', '[]'::json, 'noQueueAt', now(),
                                    'emptyAt', now());
        RETURN;
    END IF;
    IF array_position(v_froms, NULL) IS NOT NULL THEN
        result := json_build_object('success', true, 'needsSubscription', true);
        RETURN;
    END IF;
    IF v_conflate IS NULL THEN  -- namespace pops: conflating when every queue's record says so
        SELECT coalesce(bool_and(cs.conflation), false) INTO v_conflate
          FROM queen.consumer_subscriptions cs
         WHERE cs.queue_id = ANY(v_queue_ids) AND cs.consumer_group = v_group;
    END IF;
    -- Partitions not given: 1, or batch (at most 64) for a conflating group, which gets one
    -- message per partition (WIRE2 8.4), unless the route names its one partition.
    v_max_parts := CASE WHEN v_max_parts IS NOT NULL THEN greatest(v_max_parts, 1)
                        WHEN v_conflate AND p_req->>'partition' IS NULL THEN least(v_batch, 64)
                        ELSE 1 END;

    IF p_req->>'partition' IS NOT NULL THEN
        SELECT p.id INTO v_single FROM queen.partitions p
         WHERE p.queue_id = v_queue_ids[1] AND p.name = p_req->>'partition';
        IF NOT FOUND THEN
            result := json_build_object('success', true, 'queues', to_json(v_names));
            RETURN;
        END IF;
        SELECT * INTO v_got FROM queen.pop_partition(v_single, v_group, v_batch, v_lease_id,
                                                     v_worker, v_lease_secs, v_froms[1]);
        IF v_got.n > 0 THEN
            v_first := v_got;
            v_first_id := v_single;
            v_parts := ARRAY[v_got.messages];
            v_bytes := octet_length(v_got.messages);
            v_encrypted := v_got.encrypted_ids;
            v_count := v_got.n;
            v_last_id := v_got.last_id;
        END IF;
    ELSE
        FOR v_cand IN
            SELECT pp.partition_id AS id, s.sub_from, count(*) OVER () AS total,
                   coalesce(pc.cursor_created_at, s.sub_from) AS cursor_at,
                   coalesce(pc.cursor_id, queen.start_cursor_id(s.sub_from)) AS cursor_id
              FROM queen.partition_pending pp
              JOIN unnest(v_queue_ids, v_froms) AS s(queue_id, sub_from) ON s.queue_id = pp.queue_id
              JOIN queen.queues qu ON qu.id = pp.queue_id
              JOIN queen.partitions p ON p.id = pp.partition_id
              LEFT JOIN queen.partition_consumers pc
                     ON pc.partition_id = pp.partition_id AND pc.consumer_group = v_group
             WHERE pp.queue_id = ANY(v_queue_ids) AND pp.consumer_group = v_group
               AND (pc.partition_id IS NULL OR (
                        (pc.cursor_created_at, pc.cursor_id) < (pp.last_message_at, pp.last_message_id)
                    AND (pc.lease_id IS NULL OR pc.lease_expires_at <= now())
                    AND (pc.retry_after IS NULL OR pc.retry_after <= now())))
               AND (qu.window_buffer = 0
                    OR p.last_message_at <= now() - make_interval(secs => qu.window_buffer))
               AND (qu.delayed_processing = 0 OR EXISTS (
                        SELECT 1 FROM queen.messages m
                         WHERE m.partition_id = pp.partition_id
                           AND (m.created_at, m.id) > (coalesce(pc.cursor_created_at, s.sub_from),
                                                       coalesce(pc.cursor_id, queen.start_cursor_id(s.sub_from)))
                           AND m.created_at <= now() - make_interval(secs => qu.delayed_processing)))
             ORDER BY qu.priority DESC, pc.last_served_at NULLS FIRST, pp.partition_id
        LOOP
            v_examined := v_examined + 1;
            IF v_examined = 1 AND v_share IS NOT NULL THEN
                v_max_parts := least(64, v_batch, greatest(1, ceil(v_cand.total / greatest(v_share, 0.01))));
            END IF;
            SELECT * INTO v_got FROM queen.pop_partition(v_cand.id, v_group, v_batch - v_count,
                                                         v_lease_id, v_worker, v_lease_secs,
                                                         v_cand.sub_from);
            IF v_got.n > 0 THEN
                IF v_count = 0 THEN
                    v_first := v_got;
                    v_first_id := v_cand.id;
                    IF v_share IS NOT NULL THEN  -- what the autopilot steers by
                        SELECT floor(extract(epoch FROM now() - m.created_at) * 1000)
                          INTO v_oldest_ms
                          FROM queen.messages m
                         WHERE m.partition_id = v_cand.id
                           AND (m.created_at, m.id) > (v_cand.cursor_at, v_cand.cursor_id)
                         ORDER BY m.created_at, m.id LIMIT 1;
                    END IF;
                END IF;
                v_parts := v_parts || v_got.messages;
                v_encrypted := v_encrypted || v_got.encrypted_ids;
                v_count := v_count + v_got.n;
                v_last_id := v_got.last_id;
                v_more := v_cand.total > v_examined;  -- candidates this pop did not look at
                v_bytes := v_bytes + octet_length(v_got.messages);
                EXIT WHEN cardinality(v_parts) >= v_max_parts OR v_count >= v_batch
                       OR v_bytes >= queen.pop_byte_budget();
            END IF;
        END LOOP;
    END IF;

    IF v_count = 0 THEN
        PERFORM queen.prune_pending(v_queue_ids, v_group);
        IF p_req->>'partition' IS NULL AND p_req->>'queue' IS NOT NULL THEN
            PERFORM queen.note_empty_scan(v_names[1], v_group);
        END IF;
        result := json_build_object(
            'success', true, 'consumerGroup', v_group,
            'queues', to_json(v_names),
            'retryInMs', queen.next_eligible_in_ms(v_queue_ids, v_group, v_single),
            'conflation', v_conflate, 'width', v_max_parts, 'emptyAt', now());
        RETURN;
    END IF;

    -- With autoAck the last partition is not leased: the batch cap (or the byte budget) may
    -- have left messages another pop can take at once.
    IF v_auto_ack AND NOT v_more AND (v_count >= v_batch OR v_bytes >= queen.pop_byte_budget()) THEN
        v_more := EXISTS (
            SELECT 1 FROM queen.messages m, queen.messages last
             WHERE last.id = v_last_id
               AND m.partition_id = last.partition_id
               AND (m.created_at, m.id) > (last.created_at, last.id));
    END IF;

    result := json_build_object(
        'success', true,
        'queue', v_first.queue_name,
        'partition', v_first.partition_name,
        'partitionId', v_first_id,
        'leaseId', coalesce(v_lease_id::text, ''),
        'consumerGroup', v_group,
        'partitionsClaimed', cardinality(v_parts),
        'more', v_more,
        'conflation', v_conflate, 'width', v_max_parts, 'oldestMs', v_oldest_ms,
        'encryptedIds', CASE WHEN cardinality(v_encrypted) > 0 THEN to_json(v_encrypted) END);
    messages := CASE WHEN cardinality(v_parts) = 1 THEN v_parts[1]
                     ELSE (SELECT json_agg(x.e ORDER BY a.k, x.i)::text
                             FROM unnest(v_parts) WITH ORDINALITY AS a(arr, k),
                                  LATERAL json_array_elements(a.arr::json) WITH ORDINALITY AS x(e, i))
                END;
END
$$;

-- The server's batch entry point: [{idx?, queue, partition, consumerGroup, batch, ...}] (the
-- camelCase keys of pop_request, or the snake_case ones of the SQL-level API) to one row per
-- request, in input order: its idx, pop_request's result and its messages as json text. One
-- request's error does not fail the others (waiting out a held row or a conflict does).
-- p_budget bounds the call's answer, which the server holds in memory whole: once the
-- messages handed out reach p_budget bytes, each later request is answered
-- {success, deferred: true} untouched, and the server pops it again in a call of its own (the
-- first request of a call always runs). NULL: no bound (queen.pop_byte_budget still bounds
-- each request).
CREATE OR REPLACE FUNCTION queen.pop_batch(p_reqs jsonb, p_budget bigint)
RETURNS TABLE (idx integer, result json, messages text)
LANGUAGE plpgsql AS $$
DECLARE
    v_req     jsonb;
    v_n       integer := 0;
    v_norm    jsonb;
    v_popped  record;
    v_bytes   bigint := 0;
BEGIN
    FOR v_req IN SELECT e FROM jsonb_array_elements(p_reqs) e LOOP
        v_norm := jsonb_strip_nulls(jsonb_build_object(
            'queue', coalesce(v_req->>'queue', v_req->>'queue_name'),
            'namespace', v_req->>'namespace',
            'task', v_req->>'task',
            'partition', coalesce(v_req->>'partition', v_req->>'partition_name'),
            'consumerGroup', coalesce(v_req->>'consumerGroup', v_req->>'consumer_group'),
            'batch', coalesce(v_req->'batch', v_req->'batch_size'),
            'partitions', v_req->'partitions',
            'autoShare', v_req->'autoShare',
            'conflation', v_req->'conflation',
            'autoAck', coalesce(v_req->'autoAck', v_req->'auto_ack'),
            'workerId', coalesce(v_req->>'workerId', v_req->>'worker_id'),
            'leaseSeconds', coalesce(v_req->'leaseSeconds', v_req->'lease_seconds'),
            'leaseId', v_req->>'leaseId',
            'subscriptionMode', coalesce(v_req->>'subscriptionMode', v_req->>'sub_mode'),
            'subscriptionFrom', coalesce(v_req->>'subscriptionFrom', v_req->>'sub_from'),
            'deferSubscription', v_req->'deferSubscription'));
        idx := coalesce((v_req->>'idx')::integer, v_n);
        IF v_bytes >= p_budget THEN
            result := json_build_object('success', true, 'deferred', true);
            messages := NULL;
            RETURN NEXT;
            v_n := v_n + 1;
            CONTINUE;
        END IF;
        BEGIN
            SELECT * INTO v_popped FROM queen.pop_request(v_norm);
            result := v_popped.result;
            messages := v_popped.messages;
        EXCEPTION
            -- A row held too long (lock_timeout) or a conflict ends the whole call: the pool
            -- answers it or runs it again. Caught here, each later request waited out the
            -- lock timeout again: a fused call of 57 pops took 30 s to end.
            WHEN lock_not_available OR deadlock_detected OR serialization_failure THEN
                RAISE;
            WHEN others THEN
                result := json_build_object('success', false, 'error', SQLERRM);
                messages := NULL;
        END;
        v_bytes := v_bytes + coalesce(octet_length(messages), 0);
        RETURN NEXT;
        v_n := v_n + 1;
    END LOOP;
END
$$;

-- pop_batch without a bound on the call (the SQL-level API; the earlier release's signature).
CREATE OR REPLACE FUNCTION queen.pop_batch(p_reqs jsonb)
RETURNS TABLE (idx integer, result json, messages text)
LANGUAGE sql AS $$
    SELECT * FROM queen.pop_batch(p_reqs, NULL)
$$;

-- The SQL-level API of WIRE.md 7.2: [{idx, result}] with the messages inside each result
-- (each with its isEncrypted flag), as jsonb.
CREATE OR REPLACE FUNCTION queen.pop_specific_batch(p_reqs jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('idx', b.idx, 'result',
               (b.result::jsonb - 'encryptedIds') || jsonb_build_object('messages', coalesce(
                   (SELECT jsonb_agg(m || jsonb_build_object('isEncrypted',
                               coalesce(b.result::jsonb->'encryptedIds', '[]'::jsonb) ? (m->>'id'))
                                     ORDER BY i)
                      FROM jsonb_array_elements(b.messages::jsonb) WITH ORDINALITY AS x(m, i)),
                   '[]'::jsonb)))
             ORDER BY b.n), '[]'::jsonb)
      FROM queen.pop_batch(p_reqs) WITH ORDINALITY AS b(idx, result, messages, n)
$$;


-- An autoAck delivery whose client left before its answer was written (the server saw the
-- connection close): autoAck committed it at the pop, so left alone its messages would be
-- lost. Each partition's cursor goes back to where that pop found it, when it still stands
-- at the delivery's last message with no lease on it (nobody read further meanwhile; if
-- somebody did, going back would deliver their messages twice, and nothing is undone).
-- Items: one per (partition, group): {partitionId, consumerGroup, firstAt, firstId, lastAt,
-- lastId, count}. Returns the ids of the partitions whose messages are deliverable again
-- (a JSON array).
CREATE OR REPLACE FUNCTION queen.undo_auto_ack(p_items jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_it     record;
    v_before record;
    v_undone uuid[] := '{}';
BEGIN
    FOR v_it IN
        SELECT (e->>'partitionId')::uuid AS partition_id,
               coalesce(nullif(e->>'consumerGroup', ''), '__QUEUE_MODE__') AS consumer_group,
               (e->>'firstAt')::timestamptz AS first_at, (e->>'firstId')::uuid AS first_id,
               (e->>'lastAt')::timestamptz AS last_at, (e->>'lastId')::uuid AS last_id,
               (e->>'count')::int AS n
          FROM jsonb_array_elements(p_items) e
         ORDER BY 1, 2
    LOOP
        -- where the pop found the cursor: any point after the message before the first one
        -- and before the first one is the same cursor
        SELECT m.created_at, m.id INTO v_before
          FROM queen.messages m
         WHERE m.partition_id = v_it.partition_id
           AND (m.created_at, m.id) < (v_it.first_at, v_it.first_id)
         ORDER BY m.created_at DESC, m.id DESC LIMIT 1;
        UPDATE queen.partition_consumers
           SET cursor_created_at = coalesce(v_before.created_at, '-infinity'),
               cursor_id = coalesce(v_before.id, '00000000-0000-0000-0000-000000000000'::uuid),
               total_consumed = greatest(total_consumed - v_it.n, 0),
               batches_consumed = greatest(batches_consumed - 1, 0)
         WHERE partition_id = v_it.partition_id AND consumer_group = v_it.consumer_group
           AND cursor_created_at = v_it.last_at AND cursor_id = v_it.last_id
           AND lease_id IS NULL;
        CONTINUE WHEN NOT FOUND;
        v_undone := v_undone || v_it.partition_id;
        -- the pending lookup forgot the partition when the cursor reached its newest message
        INSERT INTO queen.partition_pending AS pp
               (queue_id, consumer_group, partition_id, last_message_at, last_message_id)
        SELECT p.queue_id, v_it.consumer_group, p.id, p.last_message_at, p.last_message_id
          FROM queen.partitions p
         WHERE p.id = v_it.partition_id AND p.last_message_id IS NOT NULL
        ON CONFLICT (queue_id, consumer_group, partition_id) DO UPDATE
           SET last_message_at = excluded.last_message_at,
               last_message_id = excluded.last_message_id
         WHERE (pp.last_message_at, pp.last_message_id)
               < (excluded.last_message_at, excluded.last_message_id);
    END LOOP;
    RETURN to_jsonb(v_undone);
END
$$;
