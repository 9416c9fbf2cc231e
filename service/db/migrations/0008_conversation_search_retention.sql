-- Finding conversations (GET /v1/conversations?metadata.<key>=<value>&status=) and retention
-- (ttl_seconds, expires_at, and the sweeper that deletes expired conversations).

-- `metadata @> '{"key": "value", …}'`: jsonb_path_ops keeps one hash per key/value path, smaller
-- and faster for @> than the default operator class. (The status filter needs no index of its
-- own: `active` reads turn_tenant_open_idx, `idle` walks conversation_tenant_created_idx and
-- probes turn_open_idx; see service/db/conversations.py.)
CREATE INDEX conversation_metadata_idx ON conversation USING gin (metadata jsonb_path_ops);

-- With a TTL, a conversation expires ttl_seconds after its last activity: creation, a new turn,
-- a turn changing status (every event of the conversation sets last_activity_at and
-- expires_at). Rows from before this migration have no TTL; their last activity reads as
-- updated_at (NULL here keeps the migration from rewriting the table).
ALTER TABLE conversation ADD COLUMN ttl_seconds integer
    CONSTRAINT conversation_ttl_seconds_check CHECK (ttl_seconds BETWEEN 1 AND 31536000);
ALTER TABLE conversation ADD COLUMN last_activity_at timestamptz;
ALTER TABLE conversation ALTER COLUMN last_activity_at SET DEFAULT now();
ALTER TABLE conversation ADD COLUMN expires_at timestamptz;
-- The sweeper's schedule: conversations with a TTL by when they expire.
CREATE INDEX conversation_expires_idx ON conversation (expires_at) WHERE expires_at IS NOT NULL;
