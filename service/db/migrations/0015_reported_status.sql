-- Push mode: the finished status Parallel's webhook reported for a running turn's run, kept
-- until the follower claims the turn's check (which then asks for the result at once).
ALTER TABLE turn ADD COLUMN reported_status text
    CHECK (reported_status IN ('completed', 'failed', 'cancelled'));
