-- Quota counters: each tenant's open turns and each month's spend, kept by the turns' own commits
-- instead of being counted under a lock on the tenant's row (docs/design.md §2, "Quotas").
--
-- Triggers on `turn` keep them. They are DEFERRED: they run inside COMMIT, so a counter row is
-- locked only while its transaction commits (never across a round trip to a client, a frozen
-- process cannot hold it). A new turn's trigger is also the check: it refuses the commit when the
-- turn does not fit (SQLSTATE RQ429: open turns, RQ402: budget), so two turns committing at once
-- serialize on the counter row and only as many fit as the limit allows.
--
-- What they count is what service.db.usage counts from the turns themselves: open = queued or
-- running; spend = the estimated cost of every turn that has or may still get a Parallel run
-- (run_id set, or queued, running or completed), by the month (UTC) it was created in, plus the
-- spend of deleted conversations. Deleting a conversation moves its turns' spend into
-- deleted_usage in the deleting transaction, so a deleted turn leaves the month's spend as it was.
-- The worker's quota repair (service.db.quotas) recounts a tenant whose counter disagrees.

CREATE TABLE quota_open_turns (
    tenant_id   text PRIMARY KEY,
    open_turns  integer NOT NULL
);

CREATE TABLE quota_month_spend (
    tenant_id  text NOT NULL,
    month      date NOT NULL,
    usd        numeric(14, 6) NOT NULL,
    CONSTRAINT quota_month_spend_pkey PRIMARY KEY (tenant_id, month)
);

CREATE FUNCTION quota_is_open(status text) RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN status IN ('queued', 'running') THEN 1 ELSE 0 END
$$;

CREATE FUNCTION quota_billed(status text, run_id text, cost numeric) RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN run_id IS NOT NULL OR status IN ('queued', 'running', 'completed')
                THEN cost ELSE 0 END
$$;

CREATE FUNCTION quota_month(created_at timestamptz) RETURNS date LANGUAGE sql IMMUTABLE AS $$
    SELECT date_trunc('month', created_at AT TIME ZONE 'UTC')::date
$$;

-- Add to a tenant's counters (no check: turns that end, or changes made by hand).
CREATE FUNCTION quota_add(of_tenant text, in_month date, open_delta integer, usd_delta numeric)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF open_delta <> 0 THEN
        INSERT INTO quota_open_turns AS q (tenant_id, open_turns) VALUES (of_tenant, open_delta)
        ON CONFLICT (tenant_id) DO UPDATE SET open_turns = q.open_turns + EXCLUDED.open_turns;
    END IF;
    IF usd_delta <> 0 THEN
        INSERT INTO quota_month_spend AS s (tenant_id, month, usd)
        VALUES (of_tenant, in_month, usd_delta)
        ON CONFLICT (tenant_id, month) DO UPDATE SET usd = s.usd + EXCLUDED.usd;
    END IF;
END $$;

-- A new turn takes its place under the limits, or the commit fails. The open-turn limit is the
-- API's setting, passed for the transaction as research.max_open_turns_per_tenant (absent: no
-- limit); the budget is the tenant's.
CREATE FUNCTION quota_count_new_turn() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    open_limit integer := NULLIF(current_setting('research.max_open_turns_per_tenant', true),
                                 '')::integer;
    budget numeric;
    counted integer;
    spent numeric;
    cost numeric := quota_billed(NEW.status, NEW.run_id, NEW.estimated_cost_usd);
BEGIN
    IF quota_is_open(NEW.status) = 1 THEN
        INSERT INTO quota_open_turns AS q (tenant_id, open_turns) VALUES (NEW.tenant_id, 1)
        ON CONFLICT (tenant_id) DO UPDATE SET open_turns = q.open_turns + 1
        WHERE open_limit IS NULL OR q.open_turns < open_limit
        RETURNING q.open_turns INTO counted;
        IF counted IS NULL THEN  -- the tenant's row is at the limit
            SELECT q.open_turns INTO counted FROM quota_open_turns q
            WHERE q.tenant_id = NEW.tenant_id;
            RAISE EXCEPTION 'too many open turns' USING ERRCODE = 'RQ429',
                DETAIL = json_build_object('open', counted, 'limit', open_limit)::text;
        ELSIF counted > open_limit THEN  -- the tenant's first open turn, over a limit of 0
            RAISE EXCEPTION 'too many open turns' USING ERRCODE = 'RQ429',
                DETAIL = json_build_object('open', counted - 1, 'limit', open_limit)::text;
        END IF;
    END IF;
    IF cost <> 0 THEN
        SELECT t.monthly_budget_usd INTO budget FROM tenant t WHERE t.id = NEW.tenant_id;
        INSERT INTO quota_month_spend AS s (tenant_id, month, usd)
        VALUES (NEW.tenant_id, quota_month(NEW.created_at), cost)
        ON CONFLICT (tenant_id, month) DO UPDATE SET usd = s.usd + EXCLUDED.usd
        WHERE budget IS NULL OR s.usd + EXCLUDED.usd <= budget
        RETURNING s.usd INTO spent;
        IF spent IS NULL THEN  -- the month's row has no room left for this turn
            SELECT s.usd INTO spent FROM quota_month_spend s
            WHERE s.tenant_id = NEW.tenant_id AND s.month = quota_month(NEW.created_at);
            RAISE EXCEPTION 'over the monthly budget' USING ERRCODE = 'RQ402',
                DETAIL = json_build_object('spent', spent::text, 'budget', budget::text,
                                           'cost', cost::text)::text;
        ELSIF spent > budget THEN  -- the month's first billed turn, over the whole budget
            RAISE EXCEPTION 'over the monthly budget' USING ERRCODE = 'RQ402',
                DETAIL = json_build_object('spent', (spent - cost)::text, 'budget', budget::text,
                                           'cost', cost::text)::text;
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION quota_recount_turn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- The spend stays: deleted_usage holds it now (see above).
        PERFORM quota_add(OLD.tenant_id, NULL, -quota_is_open(OLD.status), 0);
    ELSIF OLD.tenant_id = NEW.tenant_id
          AND quota_month(OLD.created_at) = quota_month(NEW.created_at) THEN
        PERFORM quota_add(NEW.tenant_id, quota_month(NEW.created_at),
                          quota_is_open(NEW.status) - quota_is_open(OLD.status),
                          quota_billed(NEW.status, NEW.run_id, NEW.estimated_cost_usd)
                          - quota_billed(OLD.status, OLD.run_id, OLD.estimated_cost_usd));
    ELSE
        PERFORM quota_add(OLD.tenant_id, quota_month(OLD.created_at), -quota_is_open(OLD.status),
                          -quota_billed(OLD.status, OLD.run_id, OLD.estimated_cost_usd));
        PERFORM quota_add(NEW.tenant_id, quota_month(NEW.created_at), quota_is_open(NEW.status),
                          quota_billed(NEW.status, NEW.run_id, NEW.estimated_cost_usd));
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER turn_quota_insert AFTER INSERT ON turn
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION quota_count_new_turn();

-- Only changes that move a counter: a follower's claim (next_check_at) fires nothing.
CREATE CONSTRAINT TRIGGER turn_quota_update AFTER UPDATE ON turn
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.run_id IS DISTINCT FROM NEW.run_id
          OR OLD.estimated_cost_usd IS DISTINCT FROM NEW.estimated_cost_usd
          OR OLD.created_at IS DISTINCT FROM NEW.created_at
          OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id)
    EXECUTE FUNCTION quota_recount_turn();

CREATE CONSTRAINT TRIGGER turn_quota_delete AFTER DELETE ON turn
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.status IN ('queued', 'running'))
    EXECUTE FUNCTION quota_recount_turn();

-- The counters as the turns stand now (a turn committed while this migration runs, before its
-- triggers exist for other sessions, is recounted by the repair).
INSERT INTO quota_open_turns (tenant_id, open_turns)
SELECT tenant_id, count(*) FROM turn WHERE status IN ('queued', 'running') GROUP BY tenant_id;

INSERT INTO quota_month_spend (tenant_id, month, usd)
SELECT tenant_id, month, sum(usd) FROM (
    SELECT tenant_id, quota_month(created_at) AS month,
           quota_billed(status, run_id, estimated_cost_usd) AS usd
    FROM turn
    UNION ALL
    SELECT tenant_id, month, usd FROM deleted_usage
) m
GROUP BY tenant_id, month;
