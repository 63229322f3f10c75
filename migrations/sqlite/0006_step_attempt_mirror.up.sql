-- A step run's transition within one attempt is mirrored into that attempt's row by the
-- database, in the same statement: QUEUED (input, queued_at), ASSIGNED (runner, assigned_at),
-- RUNNING (started_at) and the final statuses (output, error, retryable, finished_at). So each
-- hot transition is one UPDATE of step_runs, committed on its own, and the attempt history
-- cannot disagree with its step. Transitions that start a new attempt (a retry, a lease loss)
-- change `attempt` and keep writing the attempt rows themselves.
CREATE TRIGGER step_runs_mirror_attempt
    AFTER UPDATE OF status ON step_runs
    FOR EACH ROW
    WHEN OLD.status IS NOT NEW.status AND OLD.attempt = NEW.attempt
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
END;
