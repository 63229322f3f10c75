-- Reverts 0011 (every row is in shard 0 on SQLite: nothing to sum).
ALTER TABLE execution_rollups DROP COLUMN shard;

DROP INDEX step_runs_queued;
DROP INDEX step_runs_retries_due;
DROP INDEX step_runs_leased;
CREATE INDEX step_runs_status_next_attempt_at ON step_runs (status, next_attempt_at);
CREATE INDEX step_runs_status_lease_expires_at ON step_runs (status, lease_expires_at);
