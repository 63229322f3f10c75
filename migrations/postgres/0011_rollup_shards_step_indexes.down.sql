-- Reverts 0011: the shards of each execution rollup are summed into one row again, and the
-- triggers' functions of 0008 come back (they write shard 0 of the usage rollups, which keep
-- their shards).
CREATE TEMPORARY TABLE merged_execution_rollups AS
SELECT owner_id, hour_start, workflow_id, status, duration_bucket,
       sum(executions)::bigint AS executions, sum(duration_seconds) AS duration_seconds
FROM execution_rollups
GROUP BY owner_id, hour_start, workflow_id, status, duration_bucket;
DELETE FROM execution_rollups;
ALTER TABLE execution_rollups DROP CONSTRAINT execution_rollups_pkey;
ALTER TABLE execution_rollups DROP COLUMN shard;
ALTER TABLE execution_rollups
    ADD PRIMARY KEY (owner_id, hour_start, workflow_id, status, duration_bucket);
INSERT INTO execution_rollups (owner_id, hour_start, workflow_id, status, duration_bucket,
                               executions, duration_seconds)
SELECT owner_id, hour_start, workflow_id, status, duration_bucket, executions, duration_seconds
FROM merged_execution_rollups;
DROP TABLE merged_execution_rollups;

DROP TRIGGER executions_analytics_started ON executions;
CREATE TRIGGER executions_analytics_started
    AFTER INSERT ON executions
    FOR EACH ROW
    WHEN (NEW.parent_execution_id IS NULL)
    EXECUTE FUNCTION analytics_execution_started();

CREATE OR REPLACE FUNCTION analytics_execution_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    finished_hour bigint :=
        floor(extract(epoch FROM COALESCE(NEW.finished_at, NEW.updated_at)) / 3600)::bigint * 3600;
    duration double precision :=
        extract(epoch FROM (NEW.finished_at - NEW.started_at))::double precision;
BEGIN
    INSERT INTO execution_rollups AS rollup (owner_id, hour_start, workflow_id, status,
                                             duration_bucket, executions, duration_seconds)
    VALUES (NEW.owner_id, finished_hour,
            COALESCE(NEW.workflow_id, '00000000-0000-0000-0000-000000000000'::uuid),
            NEW.status, analytics_duration_bucket(duration), 1, COALESCE(duration, 0))
    ON CONFLICT (owner_id, hour_start, workflow_id, status, duration_bucket) DO UPDATE
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
    INSERT INTO usage_rollups AS rollup (user_id, day_start, executions_started)
    VALUES (NEW.owner_id, floor(extract(epoch FROM NEW.created_at) / 86400)::bigint * 86400, 1)
    ON CONFLICT (user_id, day_start, shard) DO UPDATE
        SET executions_started = rollup.executions_started + 1;
    RETURN NULL;
END;
$$;

DROP INDEX step_runs_queued;
DROP INDEX step_runs_retries_due;
DROP INDEX step_runs_leased;
CREATE INDEX step_runs_status_next_attempt_at ON step_runs (status, next_attempt_at);
CREATE INDEX step_runs_status_lease_expires_at ON step_runs (status, lease_expires_at);
