-- Analytics rollups: counts and duration histograms of finished executions and step attempts
-- per hour, error messages per hour, and usage per user and day. The database maintains them
-- with triggers in the transaction that finishes an execution or a step attempt (or creates an
-- execution), so no code path can forget them and a query over a range reads a number of rows
-- that depends on the range, never on the length of the history. Owned by the analytics area
-- (src/store/analytics.rs). The SQLite twin describes the same tables and triggers.
--
-- Durations are kept as histograms over fixed buckets that grow by 25% from 1 ms
-- (`analytics_duration_buckets`): bucket i holds durations in (upper(i-1), upper(i)]; -1 holds
-- runs that finished without starting. Ids that may be missing (an execution without a
-- workflow, a step run whose agent was purged) are the nil UUID, so the keys stay unique.

CREATE TABLE analytics_duration_buckets (
    bucket         integer          PRIMARY KEY,
    upper_seconds  double precision NOT NULL
);

INSERT INTO analytics_duration_buckets (bucket, upper_seconds)
WITH RECURSIVE buckets (bucket, upper_seconds) AS (
    SELECT 0, 0.001::double precision
    UNION ALL
    SELECT bucket + 1, upper_seconds * 1.25 FROM buckets WHERE bucket < 120
)
SELECT bucket, upper_seconds FROM buckets;

-- Finished executions per owner, hour (epoch seconds, UTC), workflow, status, duration bucket.
CREATE TABLE execution_rollups (
    owner_id          uuid             NOT NULL,
    hour_start        bigint           NOT NULL,
    workflow_id       uuid             NOT NULL,
    status            text             NOT NULL,
    duration_bucket   integer          NOT NULL,
    executions        bigint           NOT NULL,
    duration_seconds  double precision NOT NULL,
    PRIMARY KEY (owner_id, hour_start, workflow_id, status, duration_bucket)
);
CREATE INDEX execution_rollups_workflow_hour ON execution_rollups (workflow_id, hour_start);
CREATE INDEX execution_rollups_hour ON execution_rollups (hour_start);

-- Finished step attempts per owner, hour, agent, workflow, status, duration bucket.
CREATE TABLE step_rollups (
    owner_id          uuid             NOT NULL,
    hour_start        bigint           NOT NULL,
    agent_id          uuid             NOT NULL,
    workflow_id       uuid             NOT NULL,
    status            text             NOT NULL,
    duration_bucket   integer          NOT NULL,
    attempts          bigint           NOT NULL,
    -- Attempts the retry policy started (beyond the first; lease losses not counted).
    retries           bigint           NOT NULL,
    duration_seconds  double precision NOT NULL,
    -- Rows of one key are spread over 8 shards, so attempts finishing at once do not queue
    -- behind one row lock; readers sum the shards.
    shard             smallint         NOT NULL DEFAULT 0,
    PRIMARY KEY (owner_id, hour_start, agent_id, workflow_id, status, duration_bucket, shard)
);
CREATE INDEX step_rollups_agent_hour ON step_rollups (agent_id, hour_start);
CREATE INDEX step_rollups_workflow_hour ON step_rollups (workflow_id, hour_start);
CREATE INDEX step_rollups_hour ON step_rollups (hour_start);

-- Errors (their first 200 characters) that ended an execution of a workflow or an attempt of
-- an agent, per hour. `subject_id` is the workflow's or the agent's id.
CREATE TABLE error_rollups (
    subject_id   uuid   NOT NULL,
    hour_start   bigint NOT NULL,
    message      text   NOT NULL,
    occurrences  bigint NOT NULL,
    PRIMARY KEY (subject_id, hour_start, message)
);

-- Usage per user and day (epoch seconds of midnight UTC). `api_calls` is added by the servers
-- (each replica flushes its counts every few seconds); the rest by the triggers below.
CREATE TABLE usage_rollups (
    user_id             uuid             NOT NULL,
    day_start           bigint           NOT NULL,
    api_calls           bigint           NOT NULL DEFAULT 0,
    executions_started  bigint           NOT NULL DEFAULT 0,
    step_seconds        double precision NOT NULL DEFAULT 0,
    prompt_tokens       bigint           NOT NULL DEFAULT 0,
    completion_tokens   bigint           NOT NULL DEFAULT 0,
    -- As in step_rollups: 8 rows per user and day, summed by readers.
    shard               smallint         NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day_start, shard)
);
CREATE INDEX usage_rollups_day ON usage_rollups (day_start);

-- The histogram bucket of a duration in seconds (-1 for none).
CREATE FUNCTION analytics_duration_bucket(seconds double precision) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(
        (SELECT min(bucket) FROM analytics_duration_buckets WHERE upper_seconds >= seconds),
        CASE WHEN seconds IS NULL THEN -1 ELSE 120 END)
$$;

-- A token count from an LLM step's output (`usage.promptTokens`…): 0 unless it is a number,
-- clamped, so a runner's odd report can never fail the completion that carries it.
CREATE FUNCTION analytics_token_count(output jsonb, field text) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(output -> 'usage' -> field) = 'number'
                THEN least(greatest((output -> 'usage' ->> field)::numeric, 0), 1000000000000)::bigint
                ELSE 0 END
$$;

CREATE FUNCTION analytics_execution_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    finished_hour bigint :=
        floor(extract(epoch FROM COALESCE(NEW.finished_at, NEW.updated_at)) / 3600)::bigint * 3600;
    duration double precision :=
        extract(epoch FROM (NEW.finished_at - NEW.started_at))::double precision;
BEGIN
    INSERT INTO execution_rollups AS rollup (owner_id, hour_start, workflow_id, status,
                                             duration_bucket, executions, duration_seconds)
    VALUES (NEW.owner_id, finished_hour,
            COALESCE(NEW.workflow_id, '00000000-0000-0000-0000-000000000000'::uuid),
            NEW.status, analytics_duration_bucket(duration), 1, COALESCE(duration, 0))
    ON CONFLICT (owner_id, hour_start, workflow_id, status, duration_bucket) DO UPDATE
        SET executions = rollup.executions + 1,
            duration_seconds = rollup.duration_seconds + EXCLUDED.duration_seconds;
    IF NEW.status IN ('FAILED', 'TIMED_OUT') AND NEW.workflow_id IS NOT NULL THEN
        INSERT INTO error_rollups AS rollup (subject_id, hour_start, message, occurrences)
        VALUES (NEW.workflow_id, finished_hour,
                left(COALESCE(NEW.error, lower(replace(NEW.status, '_', ' '))), 200), 1)
        ON CONFLICT (subject_id, hour_start, message) DO UPDATE
            SET occurrences = rollup.occurrences + 1;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER executions_analytics_finished
    AFTER UPDATE OF status ON executions
    FOR EACH ROW
    WHEN (OLD.status IN ('QUEUED', 'RUNNING')
          AND NEW.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT'))
    EXECUTE FUNCTION analytics_execution_finished();

CREATE FUNCTION analytics_execution_started() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_rollups AS rollup (user_id, day_start, executions_started)
    VALUES (NEW.owner_id, floor(extract(epoch FROM NEW.created_at) / 86400)::bigint * 86400, 1)
    ON CONFLICT (user_id, day_start, shard) DO UPDATE
        SET executions_started = rollup.executions_started + 1;
    RETURN NULL;
END;
$$;

CREATE TRIGGER executions_analytics_started
    AFTER INSERT ON executions
    FOR EACH ROW
    WHEN (NEW.parent_execution_id IS NULL)
    EXECUTE FUNCTION analytics_execution_started();

CREATE FUNCTION analytics_step_attempt_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    finished timestamptz := COALESCE(NEW.finished_at, NEW.updated_at);
    finished_hour bigint := floor(extract(epoch FROM finished) / 3600)::bigint * 3600;
    duration double precision :=
        extract(epoch FROM (NEW.finished_at - NEW.started_at))::double precision;
    execution_owner uuid;
    execution_workflow uuid;
    is_llm boolean;
    -- The step run's own shard: its attempts always land on the same rows.
    row_shard smallint := abs(hashtext(NEW.id::text)) % 8;
BEGIN
    SELECT owner_id, workflow_id INTO execution_owner, execution_workflow
    FROM executions WHERE id = NEW.execution_id;
    SELECT agent_type = 'LLM' INTO is_llm FROM agents WHERE id = NEW.agent_id;
    INSERT INTO step_rollups AS rollup (owner_id, hour_start, agent_id, workflow_id, status,
                                        duration_bucket, attempts, retries, duration_seconds,
                                        shard)
    VALUES (execution_owner, finished_hour,
            COALESCE(NEW.agent_id, '00000000-0000-0000-0000-000000000000'::uuid),
            COALESCE(execution_workflow, '00000000-0000-0000-0000-000000000000'::uuid),
            NEW.status, analytics_duration_bucket(duration), 1,
            CASE WHEN NEW.attempt - NEW.infra_reassignments > 1 THEN 1 ELSE 0 END,
            COALESCE(duration, 0), row_shard)
    ON CONFLICT (owner_id, hour_start, agent_id, workflow_id, status, duration_bucket, shard)
    DO UPDATE
        SET attempts = rollup.attempts + 1,
            retries = rollup.retries + EXCLUDED.retries,
            duration_seconds = rollup.duration_seconds + EXCLUDED.duration_seconds;
    IF NEW.status IN ('FAILED', 'TIMED_OUT') AND NEW.agent_id IS NOT NULL THEN
        INSERT INTO error_rollups AS rollup (subject_id, hour_start, message, occurrences)
        VALUES (NEW.agent_id, finished_hour,
                left(COALESCE(NEW.error, lower(replace(NEW.status, '_', ' '))), 200), 1)
        ON CONFLICT (subject_id, hour_start, message) DO UPDATE
            SET occurrences = rollup.occurrences + 1;
    END IF;
    INSERT INTO usage_rollups AS rollup (user_id, day_start, step_seconds, prompt_tokens,
                                         completion_tokens, shard)
    VALUES (execution_owner, floor(extract(epoch FROM finished) / 86400)::bigint * 86400,
            greatest(COALESCE(duration, 0), 0),
            CASE WHEN is_llm THEN analytics_token_count(NEW.output, 'promptTokens') ELSE 0 END,
            CASE WHEN is_llm THEN analytics_token_count(NEW.output, 'completionTokens') ELSE 0 END,
            row_shard)
    ON CONFLICT (user_id, day_start, shard) DO UPDATE
        SET step_seconds = rollup.step_seconds + EXCLUDED.step_seconds,
            prompt_tokens = rollup.prompt_tokens + EXCLUDED.prompt_tokens,
            completion_tokens = rollup.completion_tokens + EXCLUDED.completion_tokens;
    RETURN NULL;
END;
$$;

-- Every attempt that ends (a retried attempt ends FAILED or TIMED_OUT before the next starts).
CREATE TRIGGER step_runs_analytics_attempt_finished
    AFTER UPDATE OF status ON step_runs
    FOR EACH ROW
    WHEN (OLD.status IN ('PENDING', 'QUEUED', 'ASSIGNED', 'RUNNING')
          AND NEW.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT'))
    EXECUTE FUNCTION analytics_step_attempt_finished();

-- The runs that finished before this migration, summed as the triggers above sum new ones: an
-- upgraded installation shows its history. (Retries of old attempts: an attempt after the
-- first that did not follow a lost lease.)
INSERT INTO execution_rollups (owner_id, hour_start, workflow_id, status, duration_bucket,
                               executions, duration_seconds)
SELECT owner_id, finished_hour, workflow_key, status, analytics_duration_bucket(seconds),
       count(*), COALESCE(sum(seconds), 0)
FROM (SELECT owner_id,
             floor(extract(epoch FROM COALESCE(finished_at, updated_at)) / 3600)::bigint * 3600
                 AS finished_hour,
             COALESCE(workflow_id, '00000000-0000-0000-0000-000000000000'::uuid) AS workflow_key,
             status,
             extract(epoch FROM (finished_at - started_at))::double precision AS seconds
      FROM executions
      WHERE status IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT')) AS finished
GROUP BY owner_id, finished_hour, workflow_key, status, analytics_duration_bucket(seconds);

INSERT INTO error_rollups (subject_id, hour_start, message, occurrences)
SELECT workflow_id,
       floor(extract(epoch FROM COALESCE(finished_at, updated_at)) / 3600)::bigint * 3600,
       left(COALESCE(error, lower(replace(status, '_', ' '))), 200), count(*)
FROM executions
WHERE status IN ('FAILED', 'TIMED_OUT') AND workflow_id IS NOT NULL
GROUP BY 1, 2, 3;

CREATE TEMPORARY TABLE finished_attempts AS
SELECT e.owner_id,
       COALESCE(s.agent_id, '00000000-0000-0000-0000-000000000000'::uuid) AS agent_key,
       s.agent_id,
       COALESCE(e.workflow_id, '00000000-0000-0000-0000-000000000000'::uuid) AS workflow_key,
       a.status,
       a.error,
       a.output,
       COALESCE(a.finished_at, a.updated_at) AS finished,
       extract(epoch FROM (a.finished_at - a.started_at))::double precision AS seconds,
       CASE WHEN a.attempt > 1 AND COALESCE(previous.status, '') <> 'LEASE_LOST' THEN 1 ELSE 0 END
           AS retry,
       COALESCE(agent.agent_type = 'LLM', false) AS is_llm
FROM step_attempts a
JOIN step_runs s ON s.id = a.step_run_id
JOIN executions e ON e.id = s.execution_id
LEFT JOIN step_attempts previous
    ON previous.step_run_id = a.step_run_id AND previous.attempt = a.attempt - 1
LEFT JOIN agents agent ON agent.id = s.agent_id
WHERE a.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT');

INSERT INTO step_rollups (owner_id, hour_start, agent_id, workflow_id, status, duration_bucket,
                          attempts, retries, duration_seconds)
SELECT owner_id, floor(extract(epoch FROM finished) / 3600)::bigint * 3600, agent_key,
       workflow_key, status, analytics_duration_bucket(seconds), count(*), sum(retry),
       COALESCE(sum(seconds), 0)
FROM finished_attempts
GROUP BY 1, 2, 3, 4, 5, 6;

INSERT INTO error_rollups AS rollup (subject_id, hour_start, message, occurrences)
SELECT agent_id, floor(extract(epoch FROM finished) / 3600)::bigint * 3600,
       left(COALESCE(error, lower(replace(status, '_', ' '))), 200), count(*)
FROM finished_attempts
WHERE status IN ('FAILED', 'TIMED_OUT') AND agent_id IS NOT NULL
GROUP BY 1, 2, 3
ON CONFLICT (subject_id, hour_start, message) DO UPDATE
    SET occurrences = rollup.occurrences + EXCLUDED.occurrences;

INSERT INTO usage_rollups (user_id, day_start, executions_started)
SELECT owner_id, floor(extract(epoch FROM created_at) / 86400)::bigint * 86400, count(*)
FROM executions
WHERE parent_execution_id IS NULL
GROUP BY 1, 2;

INSERT INTO usage_rollups AS rollup (user_id, day_start, step_seconds, prompt_tokens,
                                     completion_tokens)
SELECT owner_id, floor(extract(epoch FROM finished) / 86400)::bigint * 86400,
       sum(greatest(COALESCE(seconds, 0), 0)),
       sum(CASE WHEN is_llm THEN analytics_token_count(output, 'promptTokens') ELSE 0 END),
       sum(CASE WHEN is_llm THEN analytics_token_count(output, 'completionTokens') ELSE 0 END)
FROM finished_attempts
GROUP BY 1, 2
ON CONFLICT (user_id, day_start, shard) DO UPDATE
    SET step_seconds = rollup.step_seconds + EXCLUDED.step_seconds,
        prompt_tokens = rollup.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = rollup.completion_tokens + EXCLUDED.completion_tokens;

DROP TABLE finished_attempts;
