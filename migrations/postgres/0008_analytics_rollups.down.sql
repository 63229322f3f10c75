-- Reverts 0008: drops the rollups (they are derived from executions and step attempts, which
-- stay) with the triggers and functions that maintain them.
DROP TRIGGER step_runs_analytics_attempt_finished ON step_runs;
DROP TRIGGER executions_analytics_started ON executions;
DROP TRIGGER executions_analytics_finished ON executions;
DROP FUNCTION analytics_step_attempt_finished();
DROP FUNCTION analytics_execution_started();
DROP FUNCTION analytics_execution_finished();
DROP FUNCTION analytics_token_count(jsonb, text);
DROP FUNCTION analytics_duration_bucket(double precision);
DROP TABLE usage_rollups;
DROP TABLE error_rollups;
DROP TABLE step_rollups;
DROP TABLE execution_rollups;
DROP TABLE analytics_duration_buckets;
