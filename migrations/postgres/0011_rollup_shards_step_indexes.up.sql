-- Execution rollups and the count of executions started, spread over 8 shards like the step
-- rollups (0008): every execution of one owner, hour, workflow and outcome, and every execution
-- a user starts in a day, updated one row, so executions created or finished at once queued
-- behind that row's lock until each transaction committed (creating 32 executions at once, an
-- INSERT waited 63 ms on average). An execution's shard comes from its id; readers sum the
-- shards, as they do for the step rollups. The executions a user starts count in usage shards
-- 8-15, apart from the step seconds and tokens of 0-7: a commit of step results holds those
-- rows until it ends, and creating an execution waited for it (16 ms on average under load).
-- And that count is taken when the creation commits (a deferred trigger), not when the
-- execution's row is inserted: the transaction then holds the row only while it commits, not
-- while it also inserts the execution's steps (10 ms of waiting on average with 32 creations
-- at once over 8 shards).
ALTER TABLE execution_rollups ADD COLUMN shard smallint NOT NULL DEFAULT 0;
ALTER TABLE execution_rollups DROP CONSTRAINT execution_rollups_pkey;
ALTER TABLE execution_rollups
    ADD PRIMARY KEY (owner_id, hour_start, workflow_id, status, duration_bucket, shard);

CREATE OR REPLACE FUNCTION analytics_execution_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    finished_hour bigint :=
        floor(extract(epoch FROM COALESCE(NEW.finished_at, NEW.updated_at)) / 3600)::bigint * 3600;
    duration double precision :=
        extract(epoch FROM (NEW.finished_at - NEW.started_at))::double precision;
    -- The execution's own shard (see step_rollups).
    row_shard smallint := abs(hashtext(NEW.id::text)) % 8;
BEGIN
    INSERT INTO execution_rollups AS rollup (owner_id, hour_start, workflow_id, status,
                                             duration_bucket, executions, duration_seconds,
                                             shard)
    VALUES (NEW.owner_id, finished_hour,
            COALESCE(NEW.workflow_id, '00000000-0000-0000-0000-000000000000'::uuid),
            NEW.status, analytics_duration_bucket(duration), 1, COALESCE(duration, 0),
            row_shard)
    ON CONFLICT (owner_id, hour_start, workflow_id, status, duration_bucket, shard) DO UPDATE
        SET executions = rollup.executions + 1,
            duration_seconds = rollup.duration_seconds + EXCLUDED.duration_seconds;
    IF NEW.status IN ('FAILED', 'TIMED_OUT') AND NEW.workflow_id IS NOT NULL THEN
        INSERT INTO error_rollups AS rollup (subject_id, hour_start, message, occurrences)
        VALUES (NEW.workflow_id, finished_hour,
                left(COALESCE(NEW.error, lower(replace(NEW.status, '_', ' '))), 200), 1)
        ON CONFLICT (subject_id, hour_start, message) DO UPDATE
            SET occurrences = rollup.occurrences + 1;
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION analytics_execution_started() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_rollups AS rollup (user_id, day_start, executions_started, shard)
    VALUES (NEW.owner_id, floor(extract(epoch FROM NEW.created_at) / 86400)::bigint * 86400, 1,
            8 + abs(hashtext(NEW.id::text)) % 8)
    ON CONFLICT (user_id, day_start, shard) DO UPDATE
        SET executions_started = rollup.executions_started + 1;
    RETURN NULL;
END;
$$;

DROP TRIGGER executions_analytics_started ON executions;
CREATE CONSTRAINT TRIGGER executions_analytics_started
    AFTER INSERT ON executions
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.parent_execution_id IS NULL)
    EXECUTE FUNCTION analytics_execution_started();

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
