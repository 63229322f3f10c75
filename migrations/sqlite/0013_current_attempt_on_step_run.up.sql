-- A step run's current attempt lives on the step run alone; `step_attempts` keeps the attempts
-- that are over, written once when the next attempt starts (see the PostgreSQL twin).

-- When the current attempt began (NULL: with the step run, at `created_at`).
ALTER TABLE step_runs ADD COLUMN attempt_created_at TEXT;

UPDATE step_runs
SET attempt_created_at = (
    SELECT a.created_at FROM step_attempts a
    WHERE a.step_run_id = step_runs.id AND a.attempt = step_runs.attempt)
WHERE attempt > 1;

DELETE FROM step_attempts
WHERE EXISTS (SELECT 1 FROM step_runs r
              WHERE r.id = step_attempts.step_run_id AND r.attempt = step_attempts.attempt);

DROP TRIGGER step_runs_mirror_attempt;
