-- The histogram bucket of a duration, as a PL/pgSQL function instead of a SQL one. A SQL
-- function with a sub-select is not inlined, and PostgreSQL plans its body again on every call
-- from a trigger: under load that planning was most of what the step and execution rollups
-- cost (2.1 s of planning for 39,380 calls in one run of 500 executions of a 10-step chain, the
-- largest single cost of a step's result in PostgreSQL). PL/pgSQL keeps the plan of its
-- statement for the session. Same arguments, same result, same volatility.
CREATE OR REPLACE FUNCTION analytics_duration_bucket(seconds double precision) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN COALESCE(
        (SELECT min(bucket) FROM analytics_duration_buckets WHERE upper_seconds >= seconds),
        CASE WHEN seconds IS NULL THEN -1 ELSE 120 END);
END;
$$;
