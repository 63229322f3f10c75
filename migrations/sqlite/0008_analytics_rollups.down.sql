-- Reverts 0008: drops the rollups (they are derived from executions and step attempts, which
-- stay) with the triggers that maintain them.
DROP TRIGGER step_runs_analytics_attempt_finished;
DROP TRIGGER executions_analytics_started;
DROP TRIGGER executions_analytics_finished;
DROP TABLE usage_rollups;
DROP TABLE error_rollups;
DROP TABLE step_rollups;
DROP TABLE execution_rollups;
DROP TABLE analytics_duration_buckets;
