-- A step run's current attempt lives on the step run alone; `step_attempts` keeps the attempts
-- that are over, written once when the next attempt starts (a retry after FAILED or TIMED_OUT,
-- or a requeue after a lost lease). Until 0012 the current attempt had a row of its own that
-- the mirror trigger (0006, 0009) updated on every transition: one more row to insert per step
-- and one more UPDATE per transition, on the engine's hottest path. Readers now take the
-- finished attempts from `step_attempts` and the current one from `step_runs`.

-- When the current attempt began (NULL: with the step run, at `created_at`).
ALTER TABLE step_runs ADD COLUMN attempt_created_at timestamptz;

UPDATE step_runs
SET attempt_created_at = a.created_at
FROM step_attempts a
WHERE a.step_run_id = step_runs.id AND a.attempt = step_runs.attempt AND step_runs.attempt > 1;

DELETE FROM step_attempts a
USING step_runs r
WHERE a.step_run_id = r.id AND a.attempt = r.attempt;

DROP TRIGGER step_runs_mirror_attempt ON step_runs;
DROP FUNCTION mirror_step_attempt();
