-- The count of executions a user starts (0011) went to one of 8 shards by the execution's id,
-- taken when the creation commits. Under a burst of creations over a pool of 20 connections,
-- commits still met on a shard's row: a creation's commit waited 0.9 ms on average for it (the
-- deferred trigger's upsert, 1,020 creations in 15 s of scenario 2's fan-out), the second
-- largest share of PostgreSQL's statement time there. The shard is now the committing
-- connection's own: 8 plus its backend's process id modulo 64, so two connections share a row
-- only when their process ids meet modulo 64, and one connection's commits follow each other.
-- Any shard is right: the rows are counters, and readers sum a user's day over all of them.
CREATE OR REPLACE FUNCTION analytics_execution_started() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_rollups AS rollup (user_id, day_start, executions_started, shard)
    VALUES (NEW.owner_id, floor(extract(epoch FROM NEW.created_at) / 86400)::bigint * 86400, 1,
            8 + pg_backend_pid() % 64)
    ON CONFLICT (user_id, day_start, shard) DO UPDATE
        SET executions_started = rollup.executions_started + 1;
    RETURN NULL;
END;
$$;
