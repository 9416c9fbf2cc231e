-- Start attempts whose create call may have made a Parallel run that nobody follows: the worker
-- died, or the connection broke, after the request was sent and before its answer was stored.
-- Parallel cannot list runs or deduplicate a create, so such a run is billed and never read.
ALTER TABLE turn ADD COLUMN doubtful_attempts integer[] NOT NULL DEFAULT '{}';
