-- Reverts 0004: drops executions, their step runs, attempts and logs. executions and step_runs
-- reference each other, so they go in one statement.
DROP TABLE execution_logs, step_attempts, step_runs, executions;
