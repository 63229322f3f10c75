-- Reverts 0005: the parent attempt goes back into the child's definition snapshot as
-- `parentAttempt`, where the engine kept it before the column (and where 0005 reads it from).
UPDATE executions
SET definition = json_set(definition, '$.parentAttempt', parent_attempt)
WHERE parent_attempt IS NOT NULL;

ALTER TABLE executions DROP COLUMN parent_attempt;
