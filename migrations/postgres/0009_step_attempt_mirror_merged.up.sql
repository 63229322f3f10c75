-- The mirror of 0006, for transitions that carry more than one stage at once: a step handed
-- straight to a runner goes PENDING -> ASSIGNED in one statement (its input and queued_at
-- travel with the assignment), and a short step's start is recorded with its result (no
-- RUNNING statement of its own). So each stage's columns are copied whenever the step run has
-- them, not only at the status that used to set them; within one attempt they only ever go
-- from NULL to a value.
CREATE OR REPLACE FUNCTION mirror_step_attempt() RETURNS trigger
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
