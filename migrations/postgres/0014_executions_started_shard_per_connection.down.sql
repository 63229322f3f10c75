-- The shard of 0011: one of 8 by the execution's id.
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
