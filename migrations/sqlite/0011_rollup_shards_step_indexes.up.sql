-- PostgreSQL's 0011 spreads the execution rollups and the count of executions started over 8
-- shards against row lock queues. SQLite serialises its writers anyway and keeps every rollup
-- row in shard 0 (as in 0008): the execution rollups get the column, so that both backends
-- keep the same tables and columns, and the triggers stay as they are.
ALTER TABLE execution_rollups ADD COLUMN shard INTEGER NOT NULL DEFAULT 0;

-- The step runs the reconciler looks for, each kind in a partial index of its own, in the order
-- it reads them: QUEUED steps oldest first (`list_ready_step_runs`, which read every QUEUED step
-- of the backlog and sorted them, 47 ms a pass behind 5,000 of them), PENDING retries whose
-- backoff ends first, and ASSIGNED/RUNNING steps by the end of their lease
-- (`list_expired_leases`). A step's row enters an index only in those states, where the
-- indexes of 0004 took every version of every row.
DROP INDEX step_runs_status_next_attempt_at;
DROP INDEX step_runs_status_lease_expires_at;
CREATE INDEX step_runs_queued ON step_runs (queued_at, id) WHERE status = 'QUEUED';
CREATE INDEX step_runs_retries_due ON step_runs (next_attempt_at, id)
    WHERE status = 'PENDING' AND next_attempt_at IS NOT NULL;
CREATE INDEX step_runs_leased ON step_runs (lease_expires_at, id)
    WHERE status IN ('ASSIGNED', 'RUNNING');
