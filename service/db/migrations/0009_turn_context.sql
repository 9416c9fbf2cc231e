-- How a turn's run was given its conversation's context: 'none' (no completed ancestor),
-- 'chained' (created with previous_interaction_id) or 'reseeded' (Parallel refused that
-- interaction, so the run was created without it, the lineage's earlier questions and answers
-- prefixed to its input). NULL while the turn has no run (queued, or ended before one was made).
ALTER TABLE turn ADD COLUMN context text
    CONSTRAINT turn_context_check CHECK (context IN ('none', 'chained', 'reseeded'));
-- Runs made before this column existed were all created as previous_interaction_id says.
UPDATE turn SET context = CASE WHEN previous_interaction_id IS NULL THEN 'none' ELSE 'chained' END
WHERE run_id IS NOT NULL;
