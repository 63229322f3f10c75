-- Reverts 0009: the mirror of 0006 again, which copies each stage's columns only at the status
-- that sets them.
CREATE OR REPLACE FUNCTION mirror_step_attempt() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE step_attempts SET
        status      = NEW.status,
        input       = CASE WHEN NEW.status = 'QUEUED' THEN NEW.input ELSE input END,
        queued_at   = CASE WHEN NEW.status = 'QUEUED' THEN NEW.queued_at ELSE queued_at END,
        runner_id   = CASE WHEN NEW.status = 'ASSIGNED' THEN NEW.runner_id ELSE runner_id END,
        assigned_at = CASE WHEN NEW.status = 'ASSIGNED' THEN NEW.assigned_at ELSE assigned_at END,
        started_at  = CASE WHEN NEW.status = 'RUNNING' THEN NEW.started_at ELSE started_at END,
        output      = CASE WHEN NEW.status IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED')
                           THEN NEW.output ELSE output END,
        error       = CASE WHEN NEW.status IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED')
                           THEN NEW.error ELSE error END,
        retryable   = CASE WHEN NEW.status IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED')
                           THEN NEW.error_retryable ELSE retryable END,
        finished_at = CASE WHEN NEW.status IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED')
                           THEN NEW.finished_at ELSE finished_at END,
        updated_at  = NEW.updated_at
    WHERE step_run_id = NEW.id AND attempt = NEW.attempt;
    RETURN NULL;
END;
$$;
