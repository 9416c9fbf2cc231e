-- Task groups (docs/design.md, "Task groups"): runs are added to a Parallel task group the
-- service owns, so one event stream reports them all and a lost create's run can be found by
-- listing the group. A row per group: how full and old it is (rotation), whether runs may still
-- be added, its event stream's cursor, and the worker following that stream (a lease).
CREATE TABLE task_group (
    id              text PRIMARY KEY,             -- Parallel's taskgroup_id
    created_at      timestamptz NOT NULL DEFAULT now(),
    run_count       integer NOT NULL DEFAULT 0,
    closed_at       timestamptz,                  -- rotated: no run is added any more
    finished_at     timestamptz,                  -- closed and no run active: not followed
    event_cursor    text,                         -- the last event_id handled
    follower        text,                         -- the worker following the stream
    lease_until     timestamptz
);
CREATE INDEX task_group_followed_idx ON task_group (lease_until) WHERE finished_at IS NULL;

-- The group each start attempt added its run to ({"<attempt>": "<taskgroup_id>"}), written
-- before the add is sent: a later attempt lists those groups for a run tagged with the turn
-- before it creates another. taskgroup_id: the group of the turn's recorded run.
ALTER TABLE turn ADD COLUMN attempt_groups jsonb NOT NULL DEFAULT '{}';
ALTER TABLE turn ADD COLUMN taskgroup_id text;
