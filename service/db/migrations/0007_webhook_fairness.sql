-- Fair webhook delivery and secret rotation that keeps every secret of the last 24 hours.

-- While a dispatcher sends a delivery, the end of its lease (the same time as next_attempt_at);
-- NULL once the attempt is recorded. Attempts in flight are the rows with leased_until > now(),
-- counted per tenant and per receiving host by every claim, whichever worker holds them.
ALTER TABLE webhook_delivery ADD COLUMN leased_until timestamptz;
CREATE INDEX webhook_delivery_leased_idx ON webhook_delivery (leased_until)
    WHERE leased_until IS NOT NULL;
-- The claim visits the tenants with pending deliveries (a skip scan) and takes the first due
-- ones of each.
CREATE INDEX webhook_delivery_tenant_due_idx ON webhook_delivery (tenant_id, next_attempt_at)
    WHERE status = 'pending';

-- Secrets replaced by a rotation, each signing beside the current one until expires_at (24 h
-- after it was replaced). conversation.webhook_secret_previous/_until stay written with the
-- latest one, for workers of the previous release during a rollout.
CREATE TABLE previous_webhook_secret (
    conversation_id  text NOT NULL REFERENCES conversation (id) ON DELETE CASCADE,
    secret           text NOT NULL,
    expires_at       timestamptz NOT NULL,
    CONSTRAINT previous_webhook_secret_pkey PRIMARY KEY (conversation_id, secret)
);

INSERT INTO previous_webhook_secret (conversation_id, secret, expires_at)
SELECT id, webhook_secret_previous, webhook_secret_previous_until FROM conversation
WHERE webhook_secret_previous IS NOT NULL AND webhook_secret_previous_until > now();
