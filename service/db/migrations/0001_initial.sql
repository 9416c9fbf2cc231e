-- Tenants, API keys, conversations, turns and their events.

CREATE TABLE tenant (
    id          text PRIMARY KEY,
    name        text NOT NULL CONSTRAINT tenant_name_key UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A key is shown once; only its SHA-256 is kept. `id` is the visible prefix of the key.
CREATE TABLE api_key (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenant (id) ON DELETE CASCADE,
    key_hash    bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_key_tenant_idx ON api_key (tenant_id);

CREATE TABLE conversation (
    id              text PRIMARY KEY,
    tenant_id       text NOT NULL REFERENCES tenant (id) ON DELETE CASCADE,
    title           text,
    processor       text NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    webhook_url     text,
    webhook_secret  text,
    -- After a rotation the previous secret keeps signing until webhook_secret_previous_until.
    webhook_secret_previous        text,
    webhook_secret_previous_until  timestamptz,
    turn_count      integer NOT NULL DEFAULT 0,
    last_turn_id    text,
    event_count     bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversation_tenant_created_idx ON conversation (tenant_id, created_at DESC, id DESC);

CREATE TABLE turn (
    id                       text PRIMARY KEY,
    conversation_id          text NOT NULL REFERENCES conversation (id) ON DELETE CASCADE,
    tenant_id                text NOT NULL,
    seq                      integer NOT NULL,
    parent_turn_id           text,
    input                    jsonb NOT NULL,
    processor                text NOT NULL,
    output_schema            jsonb NOT NULL,
    metadata                 jsonb NOT NULL DEFAULT '{}'::jsonb,
    status                   text NOT NULL DEFAULT 'queued'
        CONSTRAINT turn_status_check
        CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    run_id                   text,
    interaction_id           text,
    previous_interaction_id  text,
    output                   jsonb,
    basis                    jsonb,
    error                    jsonb,
    upstream_may_continue    boolean NOT NULL DEFAULT false,
    idempotency_key          text,
    request_hash             bytea,
    first_response           jsonb,
    created_at               timestamptz NOT NULL DEFAULT now(),
    started_at               timestamptz,
    completed_at             timestamptz,
    -- Worker bookkeeping, never shown to clients.
    start_attempts           integer NOT NULL DEFAULT 0,
    start_attempt_at         timestamptz,
    next_check_at            timestamptz,
    check_count              integer NOT NULL DEFAULT 0,
    CONSTRAINT turn_conversation_seq_key UNIQUE (conversation_id, seq),
    CONSTRAINT turn_idempotency_key UNIQUE (conversation_id, idempotency_key)
);
-- The follower's schedule: running turns by their next check.
CREATE INDEX turn_due_idx ON turn (next_check_at) WHERE status = 'running';
-- Open turns of a conversation, oldest first: who runs next.
CREATE INDEX turn_open_idx ON turn (conversation_id, seq) WHERE status IN ('queued', 'running');
CREATE UNIQUE INDEX turn_run_id_idx ON turn (run_id) WHERE run_id IS NOT NULL;

CREATE TABLE event (
    conversation_id  text NOT NULL REFERENCES conversation (id) ON DELETE CASCADE,
    sequence         bigint NOT NULL,
    type             text NOT NULL,
    turn_id          text NOT NULL,
    data             jsonb NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT event_pkey PRIMARY KEY (conversation_id, sequence)
);
