-- Migration 0014's helpers that are single SQL statements, now in plpgsql: same statements, same
-- results, same locks; only where Postgres keeps their plans changes.
--
-- A LANGUAGE sql function that the planner cannot inline (a FROM, a lock, a data-modifying
-- statement, a set result) is parsed, analysed and planned again on every call: with four such
-- calls in a turn's life (lock_conversation_of by each of begin_attempt, record_run and
-- finish_turn; previous_interaction and begin_start by begin_attempt), that was a sixth of the
-- Postgres CPU a turn costs (perf, bench/e2e.py). A plpgsql function plans each statement once
-- per session and keeps the plan. A volatile plpgsql function takes a fresh snapshot for each
-- statement, as a volatile SQL function does; a stable one reads with its caller's.
--
-- turn_data and api_time stay in SQL: they are single expressions, inlined where they are called.

CREATE OR REPLACE FUNCTION lock_conversation_of(in_turn text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    locked text;
BEGIN
    SELECT c.id INTO locked FROM conversation c
    WHERE c.id = (SELECT o.conversation_id FROM turn o WHERE o.id = in_turn)
    FOR UPDATE OF c;
    RETURN locked;
END $$;

CREATE OR REPLACE FUNCTION previous_interaction(in_parent text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    interaction text;
BEGIN
    WITH RECURSIVE ancestor AS (
        SELECT id, parent_turn_id, status, interaction_id, 0 AS depth
        FROM turn WHERE id = in_parent
        UNION ALL
        SELECT t.id, t.parent_turn_id, t.status, t.interaction_id, a.depth + 1
        FROM turn t JOIN ancestor a ON t.id = a.parent_turn_id
        WHERE a.status <> 'completed'
    )
    SELECT interaction_id INTO interaction FROM ancestor WHERE status = 'completed'
    ORDER BY depth LIMIT 1;
    RETURN interaction;
END $$;

CREATE OR REPLACE FUNCTION begin_start(
    in_turn text, in_previous text, in_after integer, in_lease_s double precision,
    in_grouped boolean
) RETURNS SETOF integer LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
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
    RETURNING t.start_attempts;
END $$;

CREATE OR REPLACE FUNCTION abandon_start(in_turn text, in_attempt integer, in_doubt boolean)
RETURNS SETOF integer LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    UPDATE turn AS t SET start_attempt_at = NULL,
        doubtful_attempts = CASE WHEN in_doubt THEN t.doubtful_attempts || in_attempt
                                 ELSE t.doubtful_attempts END
    WHERE t.id = in_turn AND t.start_attempts = in_attempt AND t.start_attempt_at IS NOT NULL
      AND t.run_id IS NULL
    RETURNING cardinality(ARRAY(
        SELECT a FROM unnest(t.doubtful_attempts) AS a WHERE NOT t.attempt_groups ? a::text));
END $$;

CREATE OR REPLACE FUNCTION fail_start(in_turn text, in_attempt integer, in_error jsonb)
RETURNS SETOF turn LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    UPDATE turn AS t SET status = 'failed', error = in_error, completed_at = now(),
        next_check_at = NULL, start_attempt_at = NULL
    WHERE t.id = in_turn AND t.start_attempts = in_attempt AND t.status = 'queued'
      AND t.run_id IS NULL
    RETURNING t.*;
END $$;
