-- The bucket function as 0008 made it: a SQL function.
CREATE OR REPLACE FUNCTION analytics_duration_bucket(seconds double precision) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(
        (SELECT min(bucket) FROM analytics_duration_buckets WHERE upper_seconds >= seconds),
        CASE WHEN seconds IS NULL THEN -1 ELSE 120 END)
$$;
