-- Reverts 0004: drops executions, their step runs, attempts and logs. executions goes before
-- step_runs: with foreign keys on, SQLite cannot drop a table whose parent table (here
-- step_runs, through a sub-workflow's parent step) is already gone.
DROP TABLE execution_logs;
DROP TABLE step_attempts;
DROP TABLE executions;
DROP TABLE step_runs;
