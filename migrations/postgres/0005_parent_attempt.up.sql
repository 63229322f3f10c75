-- The attempt of the parent step a sub-workflow execution belongs to: a retried WORKFLOW step
-- starts a new child per attempt, and only the current attempt's child may complete the step.
-- Set exactly for sub-workflow executions. Before this column the engine kept it in the
-- child's definition snapshot as `parentAttempt`; those rows are carried over.
ALTER TABLE executions
    ADD COLUMN parent_attempt integer
        CHECK (parent_attempt IS NULL OR (parent_attempt >= 1 AND parent_execution_id IS NOT NULL));

UPDATE executions
SET parent_attempt = (definition ->> 'parentAttempt')::integer
WHERE parent_execution_id IS NOT NULL
  AND jsonb_typeof(definition -> 'parentAttempt') = 'number';
