-- Quotas: a rate limit per API key, a monthly budget per tenant, and each turn's estimated cost.

-- Requests per minute; NULL takes the service's default (RATE_LIMIT_PER_MIN), 0 means unlimited.
ALTER TABLE api_key ADD COLUMN rate_limit_per_min integer
    CONSTRAINT api_key_rate_limit_check CHECK (rate_limit_per_min >= 0);

-- USD per calendar month (UTC); NULL means no budget.
ALTER TABLE tenant ADD COLUMN monthly_budget_usd numeric(14, 4)
    CONSTRAINT tenant_monthly_budget_check CHECK (monthly_budget_usd >= 0);

-- Parallel's price of one run of the turn's processor, fixed when the turn is created.
ALTER TABLE turn ADD COLUMN estimated_cost_usd numeric(12, 6) NOT NULL DEFAULT 0;

-- A tenant's turns of one month: the budget check and GET /v1/usage.
CREATE INDEX turn_tenant_created_idx ON turn (tenant_id, created_at);
-- A tenant's open turns: the per-tenant open-turn limit.
CREATE INDEX turn_tenant_open_idx ON turn (tenant_id) WHERE status IN ('queued', 'running');

-- Spend of deleted conversations, so deleting one neither hides its cost from the usage report
-- nor gives its budget back. One row per tenant, month, conversation and processor.
CREATE TABLE deleted_usage (
    tenant_id        text NOT NULL REFERENCES tenant (id) ON DELETE CASCADE,
    month            date NOT NULL,
    conversation_id  text NOT NULL,
    processor        text NOT NULL,
    turns            integer NOT NULL,
    usd              numeric(14, 6) NOT NULL,
    CONSTRAINT deleted_usage_pkey PRIMARY KEY (tenant_id, month, conversation_id, processor)
);
