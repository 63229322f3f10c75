-- Reverts 0006: the engine writes the attempt rows itself again.
DROP TRIGGER step_runs_mirror_attempt ON step_runs;
DROP FUNCTION mirror_step_attempt();
