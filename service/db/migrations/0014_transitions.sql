-- A turn's state changes in one round trip each (docs/design.md, "Round trips of a turn").
--
-- The worker's transitions were transactions of five round trips (BEGIN, lock the conversation,
-- change the turn, append its event, COMMIT). These functions do the same work, in the same
-- order and under the same locks, as one statement: called outside a transaction, each commits
-- on its own. Every statement of a plpgsql function takes a fresh snapshot, so what they read
-- after waiting for the conversation's lock (the turn, the next turn to start) is what
-- committed before the lock was granted, as in the transactions they replace.

-- A timestamp as the API writes it (msgspec): UTC, microseconds unless they are zero.
CREATE FUNCTION api_time(at timestamptz) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT regexp_replace(to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                          '\.000000Z$', 'Z')
$$;

-- A turn as the API shows it (service.models.Turn): an event's data.
CREATE FUNCTION turn_data(t turn) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', t.id, 'conversation_id', t.conversation_id, 'seq', t.seq,
        'parent_turn_id', t.parent_turn_id, 'input', t.input, 'processor', t.processor,
        'output_schema', t.output_schema, 'metadata', t.metadata, 'status', t.status,
        'run_id', t.run_id, 'interaction_id', t.interaction_id,
        'previous_interaction_id', t.previous_interaction_id, 'output', t.output,
        'basis', t.basis, 'error', t.error, 'upstream_may_continue', t.upstream_may_continue,
        'context', t.context, 'created_at', api_time(t.created_at),
        'started_at', api_time(t.started_at), 'completed_at', api_time(t.completed_at))
$$;

-- Append an event to the conversation's log (call it with the conversation locked, after the
-- turn's change): the conversation's counters and expiry move on, listeners are notified on
-- commit (the event itself in the payload when it fits in a NOTIFY, else the bare conversation
-- id), a terminal event of a conversation with a webhook queues its delivery (ids given by the
-- caller), and `in_first_response` also stores the data as its turn's first answer (its
-- Idempotency-Key's). Returns the event's sequence and time, and the conversation's head (its
-- oldest open turn) as this transaction leaves it.
CREATE FUNCTION append_event(
    in_conversation text, in_type text, in_turn text, in_data jsonb, in_first_response boolean,
    in_delivery_id text, in_webhook_id text
) RETURNS TABLE (event_sequence bigint, event_created_at timestamptz, head_id text,
                 head_status text)
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    e record;
    notice text;
BEGIN
    UPDATE conversation AS v SET event_count = v.event_count + 1, updated_at = now(),
        last_activity_at = now(),
        expires_at = CASE WHEN v.ttl_seconds IS NOT NULL
                          THEN now() + make_interval(secs => v.ttl_seconds) END
    WHERE v.id = in_conversation
    RETURNING v.event_count, v.tenant_id, v.webhook_url INTO c;
    INSERT INTO event AS x (conversation_id, sequence, type, turn_id, data)
    VALUES (in_conversation, c.event_count, in_type, in_turn, in_data)
    RETURNING x.sequence, x.type, x.created_at INTO e;
    IF in_first_response THEN
        UPDATE turn SET first_response = in_data WHERE id = in_turn;
    END IF;
    notice := json_build_object(
        'sequence', e.sequence, 'type', e.type, 'conversation_id', in_conversation,
        'turn_id', in_turn, 'created_at', api_time(e.created_at), 'data', in_data)::text;
    PERFORM pg_notify('research_events', CASE WHEN octet_length(notice) < 7900
                                              THEN in_conversation || ' ' || notice
                                              ELSE in_conversation END);
    IF c.webhook_url IS NOT NULL
       AND in_type IN ('turn.completed', 'turn.failed', 'turn.cancelled') THEN
        INSERT INTO webhook_delivery (
            id, conversation_id, tenant_id, event_sequence, event_type, webhook_id, url, payload,
            next_attempt_at
        ) VALUES (
            in_delivery_id, in_conversation, c.tenant_id, e.sequence, e.type, in_webhook_id,
            c.webhook_url,
            jsonb_build_object('type', e.type, 'timestamp', api_time(e.created_at),
                               'data', notice::jsonb),
            now()
        );
        PERFORM pg_notify('webhook_deliveries', 'due');
    END IF;
    RETURN QUERY
    SELECT e.sequence, e.created_at, h.id, h.status
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT o.id, o.status FROM turn o
        WHERE o.conversation_id = in_conversation AND o.status IN ('queued', 'running')
        ORDER BY o.seq
        LIMIT 1
    ) AS h ON true;
END $$;

-- Move a turn that is in one of `in_from` to a terminal status, with its event: the whole of a
-- run's end (or a cancel) in one statement. The turn's conversation is locked first, as every
-- transition does (one lock order, no deadlocks). No row: the turn is gone. Else the turn as it
-- now is (null when it was not in `in_from`: nothing changed) and the conversation's head.
CREATE FUNCTION finish_turn(
    in_turn text, in_status text, in_from text[], in_output jsonb, in_basis jsonb,
    in_error jsonb, in_upstream boolean, in_delivery_id text, in_webhook_id text
) RETURNS TABLE (turn_after jsonb, head_id text, head_status text)
LANGUAGE plpgsql AS $$
DECLARE
    of_conversation text;
    t turn;
    changed jsonb;
    appended record;
BEGIN
    SELECT c.id INTO of_conversation FROM conversation c
    WHERE c.id = (SELECT o.conversation_id FROM turn o WHERE o.id = in_turn)
    FOR UPDATE OF c;
    IF of_conversation IS NULL THEN
        RETURN;
    END IF;
    UPDATE turn AS u SET
        status = in_status,
        output = COALESCE(in_output, u.output),
        basis = COALESCE(in_basis, u.basis),
        error = COALESCE(in_error, u.error),
        upstream_may_continue = u.upstream_may_continue OR in_upstream,
        completed_at = now(),
        next_check_at = NULL
    WHERE u.id = in_turn AND u.status = ANY(in_from)
    RETURNING u.* INTO t;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::jsonb, NULL::text, NULL::text;
        RETURN;
    END IF;
    changed := turn_data(t);
    SELECT * INTO appended
    FROM append_event(of_conversation, 'turn.' || in_status, in_turn, changed, false,
                      in_delivery_id, in_webhook_id);
    RETURN QUERY SELECT changed, appended.head_id, appended.head_status;
END $$;

-- Store a start attempt's run (service.db.attempts): the attempt that owns the turn's start
-- lease makes a queued turn running (with its turn.running event) or leaves a cancelled one
-- cancelled, saying its run may go on; any other attempt's run is kept as an extra run. No
-- row: the turn is gone. Else the turn as it now is (null for an extra run) and whether the
-- extra run is new.
CREATE FUNCTION record_run(
    in_turn text, in_attempt integer, in_run text, in_interaction text,
    in_first_check_s double precision, in_reseeded boolean, in_taskgroup text
) RETURNS TABLE (turn_after jsonb, extra boolean)
LANGUAGE plpgsql AS $$
DECLARE
    of_conversation text;
    t turn;
    changed jsonb;
    added integer;
BEGIN
    SELECT c.id INTO of_conversation FROM conversation c
    WHERE c.id = (SELECT o.conversation_id FROM turn o WHERE o.id = in_turn)
    FOR UPDATE OF c;
    IF of_conversation IS NULL THEN
        RETURN;
    END IF;
    UPDATE turn AS u SET
        run_id = in_run, interaction_id = in_interaction, start_attempt_at = NULL,
        context = CASE WHEN in_reseeded THEN 'reseeded'
                       WHEN u.previous_interaction_id IS NULL THEN 'none' ELSE 'chained' END,
        previous_interaction_id = CASE WHEN in_reseeded THEN NULL
                                       ELSE u.previous_interaction_id END,
        status = CASE WHEN u.status = 'queued' THEN 'running' ELSE u.status END,
        started_at = CASE WHEN u.status = 'queued' THEN now() ELSE u.started_at END,
        next_check_at = CASE WHEN u.status = 'queued'
                             THEN now() + make_interval(secs => in_first_check_s) END,
        upstream_may_continue = u.upstream_may_continue OR u.status = 'cancelled',
        taskgroup_id = in_taskgroup
    WHERE u.id = in_turn AND u.start_attempts = in_attempt AND u.start_attempt_at IS NOT NULL
      AND u.run_id IS NULL
    RETURNING u.* INTO t;
    IF NOT FOUND THEN
        INSERT INTO turn_extra_run (turn_id, attempt, run_id, interaction_id)
        VALUES (in_turn, in_attempt, in_run, in_interaction)
        ON CONFLICT (turn_id, attempt) DO NOTHING;
        GET DIAGNOSTICS added = ROW_COUNT;
        RETURN QUERY SELECT NULL::jsonb, added > 0;
        RETURN;
    END IF;
    changed := turn_data(t);
    IF t.status = 'running' THEN
        PERFORM append_event(of_conversation, 'turn.running', in_turn, changed, false, NULL,
                             NULL);
    END IF;
    RETURN QUERY SELECT changed, false;
END $$;
