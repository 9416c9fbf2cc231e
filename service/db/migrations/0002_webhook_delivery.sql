-- Outbound webhooks: one delivery per terminal event of a conversation with a webhook URL,
-- written in the transaction that records the event (an outbox), and every attempt to send it.

CREATE TABLE webhook_delivery (
    id                text PRIMARY KEY,
    conversation_id   text NOT NULL REFERENCES conversation (id) ON DELETE CASCADE,
    tenant_id         text NOT NULL,
    event_sequence    bigint NOT NULL,
    event_type        text NOT NULL,
    -- The Standard Webhooks `webhook-id`: the same on every attempt, redeliveries included.
    webhook_id        text NOT NULL,
    url               text NOT NULL,
    -- The whole body, {"type", "timestamp", "data": event}, fixed when the event is recorded.
    payload           jsonb NOT NULL,
    status            text NOT NULL DEFAULT 'pending'
        CONSTRAINT webhook_delivery_status_check CHECK (status IN ('pending', 'delivered', 'failed')),
    attempt_count     integer NOT NULL DEFAULT 0,
    -- Attempts since the delivery was created or last redelivered: the retry schedule's index.
    attempts_in_round integer NOT NULL DEFAULT 0,
    -- When a pending delivery is due; while a dispatcher sends it, the end of its lease.
    next_attempt_at   timestamptz,
    last_status_code  integer,
    created_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at      timestamptz,
    CONSTRAINT webhook_delivery_event_key UNIQUE (conversation_id, event_sequence),
    CONSTRAINT webhook_delivery_webhook_id_key UNIQUE (webhook_id)
);
-- The dispatcher's schedule: pending deliveries by when they are due.
CREATE INDEX webhook_delivery_due_idx ON webhook_delivery (next_attempt_at) WHERE status = 'pending';

CREATE TABLE webhook_attempt (
    delivery_id       text NOT NULL REFERENCES webhook_delivery (id) ON DELETE CASCADE,
    attempt           integer NOT NULL,
    started_at        timestamptz NOT NULL,
    status_code       integer,
    latency_ms        integer,
    error             text,
    -- The first 500 characters of the receiver's answer.
    response_excerpt  text,
    CONSTRAINT webhook_attempt_pkey PRIMARY KEY (delivery_id, attempt)
);
