-- Reverts 0013: the current attempt gets its row in `step_attempts` again, kept by the mirror
-- trigger of 0009.
CREATE FUNCTION mirror_step_attempt() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE step_attempts SET
        status      = NEW.status,
        input       = COALESCE(NEW.input, input),
        queued_at   = COALESCE(NEW.queued_at, queued_at),
        runner_id   = COALESCE(NEW.runner_id, runner_id),
        assigned_at = COALESCE(NEW.assigned_at, assigned_at),
        started_at  = COALESCE(NEW.started_at, started_at),
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

CREATE TRIGGER step_runs_mirror_attempt
    AFTER UPDATE OF status ON step_runs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status AND OLD.attempt = NEW.attempt)
    EXECUTE FUNCTION mirror_step_attempt();

INSERT INTO step_attempts (step_run_id, attempt, status, runner_id, input, output, error,
                           retryable, queued_at, assigned_at, started_at, finished_at,
                           created_at, updated_at)
SELECT id, attempt, status, runner_id, input,
       CASE WHEN status IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED') THEN output END,
       CASE WHEN status IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED') THEN error END,
       CASE WHEN status IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED')
            THEN error_retryable END,
       queued_at, assigned_at, started_at,
       CASE WHEN status IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED') THEN finished_at END,
       COALESCE(attempt_created_at, created_at), updated_at
FROM step_runs;

ALTER TABLE step_runs DROP COLUMN attempt_created_at;
