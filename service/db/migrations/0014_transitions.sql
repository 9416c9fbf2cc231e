-- A turn's state changes in one round trip each (docs/design.md, "Round trips of a turn").
--
-- The worker's transitions were transactions of five or six round trips (BEGIN, lock the
-- conversation, change the turn, append its event, COMMIT; a start attempt also read the turn
-- and the interaction to chain to). These functions do the same work, in the same order and
-- under the same locks, as one statement: called outside a transaction, each commits on its own.
-- Every statement of a plpgsql function takes a fresh snapshot, so what they read after waiting
-- for the conversation's lock (the turn, the next turn to start) is what committed before the
-- lock was granted, as in the transactions they replace.

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

-- Lock a turn's conversation (always before the turn itself: one lock order, no deadlocks):
-- its id, or null when the turn is gone.
CREATE FUNCTION lock_conversation_of(in_turn text) RETURNS text LANGUAGE sql AS $$
    SELECT c.id FROM conversation c
    WHERE c.id = (SELECT o.conversation_id FROM turn o WHERE o.id = in_turn)
    FOR UPDATE OF c
$$;

-- Notify listeners of an event on commit (channel research_events): "<conversation id> <event
-- JSON>" when that fits in a NOTIFY payload (under 8,000 bytes), so a feed (service.domain.feeds)
-- need not read it back; else the bare conversation id, meaning "read what is new". Returns the
-- event's JSON (times as the API writes them).
CREATE FUNCTION notify_event(
    in_conversation text, in_sequence bigint, in_type text, in_turn text, in_at timestamptz,
    in_data jsonb
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    notice text := json_build_object(
        'sequence', in_sequence, 'type', in_type, 'conversation_id', in_conversation,
        'turn_id', in_turn, 'created_at', api_time(in_at), 'data', in_data)::text;
BEGIN
    PERFORM pg_notify('research_events', CASE WHEN octet_length(notice) < 7900
                                              THEN in_conversation || ' ' || notice
                                              ELSE in_conversation END);
    RETURN notice;
END $$;

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
    notice := notify_event(in_conversation, e.sequence, e.type, in_turn, e.created_at, in_data);
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
    of_conversation text := lock_conversation_of(in_turn);  -- first: the lifecycle's lock order
    t turn;
    changed jsonb;
    appended record;
BEGIN
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
    of_conversation text := lock_conversation_of(in_turn);  -- first: the lifecycle's lock order
    t turn;
    changed jsonb;
    added integer;
BEGIN
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

-- Start attempts (service.db.attempts). Attempt N of a turn owns its start lease while
-- start_attempts = N and start_attempt_at is set; each write below is conditional on that
-- number, so a stale attempt changes nothing of a newer one's state.

-- The interaction a turn's run continues: walking up from its parent, the first completed
-- turn's (a failed or cancelled one gives no context, so its children chain past it).
CREATE FUNCTION previous_interaction(in_parent text) RETURNS text LANGUAGE sql STABLE AS $$
    WITH RECURSIVE ancestor AS (
        SELECT id, parent_turn_id, status, interaction_id, 0 AS depth
        FROM turn WHERE id = in_parent
        UNION ALL
        SELECT t.id, t.parent_turn_id, t.status, t.interaction_id, a.depth + 1
        FROM turn t JOIN ancestor a ON t.id = a.parent_turn_id
        WHERE a.status <> 'completed'
    )
    SELECT interaction_id FROM ancestor WHERE status = 'completed' ORDER BY depth LIMIT 1
$$;

-- Begin attempt `in_after` + 1, only if attempt `in_after` is still the newest and holds no
-- live lease: its number, or no row. An attempt still holding a lease that ran out never came
-- back (its worker died or froze, maybe after Parallel had made its run): it joins
-- doubtful_attempts. `in_grouped`: the attempt makes its run only by adding it to a task group
-- (attempt_groups: "" until the group is known), so dying before the add leaves no doubt.
CREATE FUNCTION begin_start(
    in_turn text, in_previous text, in_after integer, in_lease_s double precision,
    in_grouped boolean
) RETURNS SETOF integer LANGUAGE sql AS $$
    UPDATE turn AS t SET start_attempts = t.start_attempts + 1, start_attempt_at = now(),
        previous_interaction_id = in_previous,
        attempt_groups = CASE WHEN in_grouped
                              THEN t.attempt_groups
                                   || jsonb_build_object((t.start_attempts + 1)::text, '')
                              ELSE t.attempt_groups END,
        doubtful_attempts = CASE WHEN t.start_attempt_at IS NOT NULL
                                 THEN t.doubtful_attempts || t.start_attempts
                                 ELSE t.doubtful_attempts END
    WHERE t.id = in_turn AND t.start_attempts = in_after AND t.status = 'queued'
      AND t.run_id IS NULL
      AND (t.start_attempt_at IS NULL
           OR t.start_attempt_at <= now() - make_interval(secs => in_lease_s))
    RETURNING t.start_attempts
$$;

-- End attempt `in_attempt` without a run (only the attempt that owns the lease can; a stale
-- one is in doubtful_attempts already, put there by the attempt that took over), joining
-- doubtful_attempts when `in_doubt` (its create may have made a run). How many attempts are in
-- doubt now (one that added to a task group is not: its run can be listed), or no row.
CREATE FUNCTION abandon_start(in_turn text, in_attempt integer, in_doubt boolean)
RETURNS SETOF integer LANGUAGE sql AS $$
    UPDATE turn SET start_attempt_at = NULL,
        doubtful_attempts = CASE WHEN in_doubt THEN doubtful_attempts || in_attempt
                                 ELSE doubtful_attempts END
    WHERE id = in_turn AND start_attempts = in_attempt AND start_attempt_at IS NOT NULL
      AND run_id IS NULL
    RETURNING cardinality(ARRAY(
        SELECT a FROM unnest(doubtful_attempts) AS a WHERE NOT attempt_groups ? a::text))
$$;

-- Fail the queued turn for attempt `in_attempt` (Parallel refused its create, or too many
-- creates are in doubt), unless a newer attempt owns it by now or it left `queued` (a cancel
-- won): the failed turn, or no row.
CREATE FUNCTION fail_start(in_turn text, in_attempt integer, in_error jsonb)
RETURNS SETOF turn LANGUAGE sql AS $$
    UPDATE turn AS t SET status = 'failed', error = in_error, completed_at = now(),
        next_check_at = NULL, start_attempt_at = NULL
    WHERE t.id = in_turn AND t.start_attempts = in_attempt AND t.status = 'queued'
      AND t.run_id IS NULL
    RETURNING t.*
$$;

-- Begin a start attempt, in one statement: the conversation locked, then the turn; outcome
--   'gone'             the turn is gone;
--   'not-queued'       it is not queued, or has its run;
--   'waiting'          it is not its conversation's head (oldest open turn);
--   'lease-held'       another attempt's lease is live for `lease_left_s` more;
--   'create_in_doubt'  `in_max_doubtful` (> 0) creates may each have made a run nothing can
--                      find: the turn failed instead (`in_doubt_error`, its event and webhook
--                      delivery), `head_*` the conversation's next turn;
--   'begun'            attempt `attempt` holds the lease, its run to continue `previous`.
-- `turn_now` is the turn as locked (as failed, for create_in_doubt). `previous_lost`: the
-- attempt before never came back (its lease ran out); `lost_attempt`: its number, when it had
-- not added its run to a task group (one that had is no doubt: the next attempt lists the
-- group and adopts its run).
CREATE FUNCTION begin_attempt(
    in_turn text, in_lease_s double precision, in_grouped boolean, in_max_doubtful integer,
    in_doubt_error jsonb, in_delivery_id text, in_webhook_id text
) RETURNS TABLE (outcome text, turn_now jsonb, attempt integer, previous text,
                 previous_lost boolean, lost_attempt integer, lease_left_s double precision,
                 head_id text, head_status text)
LANGUAGE plpgsql AS $$
DECLARE
    of_conversation text := lock_conversation_of(in_turn);  -- first: the lifecycle's lock order
    t turn;
    head text;
    held boolean;
    unresolved integer;
    appended record;
BEGIN
    IF of_conversation IS NULL THEN
        outcome := 'gone';
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT * INTO t FROM turn AS u WHERE u.id = in_turn FOR UPDATE;
    turn_now := turn_data(t);
    IF t.status <> 'queued' OR t.run_id IS NOT NULL THEN
        outcome := 'not-queued';
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT h.id INTO head FROM turn h
    WHERE h.conversation_id = of_conversation AND h.status IN ('queued', 'running')
    ORDER BY h.seq
    LIMIT 1;
    IF head IS DISTINCT FROM in_turn THEN
        outcome := 'waiting';
        RETURN NEXT;
        RETURN;
    END IF;
    held := t.start_attempt_at IS NOT NULL;
    previous_lost := held;
    lease_left_s := GREATEST(0, EXTRACT(epoch FROM t.start_attempt_at
                                        + make_interval(secs => in_lease_s) - now()));
    IF held AND lease_left_s > 0 THEN
        outcome := 'lease-held';
        RETURN NEXT;
        RETURN;
    END IF;
    IF held AND NOT t.attempt_groups ? t.start_attempts::text THEN
        lost_attempt := t.start_attempts;
    END IF;
    unresolved := cardinality(ARRAY(SELECT a FROM unnest(t.doubtful_attempts) AS a
                                    WHERE NOT t.attempt_groups ? a::text))
                  + CASE WHEN lost_attempt IS NULL THEN 0 ELSE 1 END;
    IF 0 < in_max_doubtful AND in_max_doubtful <= unresolved THEN
        IF held THEN
            PERFORM abandon_start(in_turn, t.start_attempts, true);
        END IF;
        SELECT * INTO t FROM fail_start(in_turn, t.start_attempts, in_doubt_error);
        turn_now := turn_data(t);
        SELECT * INTO appended
        FROM append_event(of_conversation, 'turn.failed', in_turn, turn_now, false,
                          in_delivery_id, in_webhook_id);
        outcome := 'create_in_doubt';
        head_id := appended.head_id;
        head_status := appended.head_status;
        RETURN NEXT;
        RETURN;
    END IF;
    previous := previous_interaction(t.parent_turn_id);
    attempt := begin_start(in_turn, previous, t.start_attempts, in_lease_s, in_grouped);
    outcome := 'begun';
    RETURN NEXT;
END $$;
