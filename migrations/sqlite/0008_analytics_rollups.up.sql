-- Analytics rollups: counts and duration histograms of finished executions and step attempts
-- per hour, error messages per hour, and usage per user and day. The database maintains them
-- with triggers in the transaction that finishes an execution or a step attempt (or creates an
-- execution), so no code path can forget them and a query over a range reads a number of rows
-- that depends on the range, never on the length of the history. Owned by the analytics area
-- (src/store/analytics.rs). The PostgreSQL twin describes the same tables and triggers; SQLite
-- has no functions of its own, so the bucket and token expressions are written out in place.
--
-- Durations are kept as histograms over fixed buckets that grow by 25% from 1 ms
-- (`analytics_duration_buckets`): bucket i holds durations in (upper(i-1), upper(i)]; -1 holds
-- runs that finished without starting. Ids that may be missing (an execution without a
-- workflow, a step run whose agent was purged) are the nil UUID, so the keys stay unique.

CREATE TABLE analytics_duration_buckets (
    bucket         INTEGER PRIMARY KEY NOT NULL,
    upper_seconds  REAL    NOT NULL
);

INSERT INTO analytics_duration_buckets (bucket, upper_seconds)
WITH RECURSIVE buckets (bucket, upper_seconds) AS (
    SELECT 0, 0.001
    UNION ALL
    SELECT bucket + 1, upper_seconds * 1.25 FROM buckets WHERE bucket < 120
)
SELECT bucket, upper_seconds FROM buckets;

CREATE TABLE execution_rollups (
    owner_id          BLOB    NOT NULL,
    hour_start        INTEGER NOT NULL,
    workflow_id       BLOB    NOT NULL,
    status            TEXT    NOT NULL,
    duration_bucket   INTEGER NOT NULL,
    executions        INTEGER NOT NULL,
    duration_seconds  REAL    NOT NULL,
    PRIMARY KEY (owner_id, hour_start, workflow_id, status, duration_bucket)
);
CREATE INDEX execution_rollups_workflow_hour ON execution_rollups (workflow_id, hour_start);
CREATE INDEX execution_rollups_hour ON execution_rollups (hour_start);

CREATE TABLE step_rollups (
    owner_id          BLOB    NOT NULL,
    hour_start        INTEGER NOT NULL,
    agent_id          BLOB    NOT NULL,
    workflow_id       BLOB    NOT NULL,
    status            TEXT    NOT NULL,
    duration_bucket   INTEGER NOT NULL,
    attempts          INTEGER NOT NULL,
    retries           INTEGER NOT NULL,
    duration_seconds  REAL    NOT NULL,
    -- PostgreSQL spreads one key over 8 shards against row lock queues; SQLite serialises its
    -- writers anyway and keeps every row in shard 0.
    shard             INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (owner_id, hour_start, agent_id, workflow_id, status, duration_bucket, shard)
);
CREATE INDEX step_rollups_agent_hour ON step_rollups (agent_id, hour_start);
CREATE INDEX step_rollups_workflow_hour ON step_rollups (workflow_id, hour_start);
CREATE INDEX step_rollups_hour ON step_rollups (hour_start);

CREATE TABLE error_rollups (
    subject_id   BLOB    NOT NULL,
    hour_start   INTEGER NOT NULL,
    message      TEXT    NOT NULL,
    occurrences  INTEGER NOT NULL,
    PRIMARY KEY (subject_id, hour_start, message)
);

CREATE TABLE usage_rollups (
    user_id             BLOB    NOT NULL,
    day_start           INTEGER NOT NULL,
    api_calls           INTEGER NOT NULL DEFAULT 0,
    executions_started  INTEGER NOT NULL DEFAULT 0,
    step_seconds        REAL    NOT NULL DEFAULT 0,
    prompt_tokens       INTEGER NOT NULL DEFAULT 0,
    completion_tokens   INTEGER NOT NULL DEFAULT 0,
    shard               INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day_start, shard)
);
CREATE INDEX usage_rollups_day ON usage_rollups (day_start);

CREATE TRIGGER executions_analytics_finished
    AFTER UPDATE OF status ON executions
    FOR EACH ROW
    WHEN OLD.status IN ('QUEUED', 'RUNNING')
         AND NEW.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT')
BEGIN
    INSERT INTO execution_rollups (owner_id, hour_start, workflow_id, status, duration_bucket,
                                   executions, duration_seconds)
    VALUES (NEW.owner_id,
            CAST(strftime('%s', COALESCE(NEW.finished_at, NEW.updated_at)) AS INTEGER)
                / 3600 * 3600,
            COALESCE(NEW.workflow_id, zeroblob(16)),
            NEW.status,
            CASE WHEN NEW.started_at IS NULL OR NEW.finished_at IS NULL THEN -1
                 ELSE COALESCE((SELECT MIN(bucket) FROM analytics_duration_buckets
                                WHERE upper_seconds >= (julianday(NEW.finished_at)
                                                        - julianday(NEW.started_at)) * 86400.0),
                               120) END,
            1,
            COALESCE((julianday(NEW.finished_at) - julianday(NEW.started_at)) * 86400.0, 0))
    ON CONFLICT (owner_id, hour_start, workflow_id, status, duration_bucket) DO UPDATE
        SET executions = executions + 1,
            duration_seconds = duration_seconds + excluded.duration_seconds;
    INSERT INTO error_rollups (subject_id, hour_start, message, occurrences)
    SELECT NEW.workflow_id,
           CAST(strftime('%s', COALESCE(NEW.finished_at, NEW.updated_at)) AS INTEGER)
               / 3600 * 3600,
           substr(COALESCE(NEW.error, lower(replace(NEW.status, '_', ' '))), 1, 200),
           1
    WHERE NEW.status IN ('FAILED', 'TIMED_OUT') AND NEW.workflow_id IS NOT NULL
    ON CONFLICT (subject_id, hour_start, message) DO UPDATE SET occurrences = occurrences + 1;
END;

CREATE TRIGGER executions_analytics_started
    AFTER INSERT ON executions
    FOR EACH ROW
    WHEN NEW.parent_execution_id IS NULL
BEGIN
    INSERT INTO usage_rollups (user_id, day_start, executions_started)
    VALUES (NEW.owner_id, CAST(strftime('%s', NEW.created_at) AS INTEGER) / 86400 * 86400, 1)
    ON CONFLICT (user_id, day_start, shard) DO UPDATE
        SET executions_started = executions_started + 1;
END;

-- Every attempt that ends (a retried attempt ends FAILED or TIMED_OUT before the next starts).
CREATE TRIGGER step_runs_analytics_attempt_finished
    AFTER UPDATE OF status ON step_runs
    FOR EACH ROW
    WHEN OLD.status IN ('PENDING', 'QUEUED', 'ASSIGNED', 'RUNNING')
         AND NEW.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT')
BEGIN
    INSERT INTO step_rollups (owner_id, hour_start, agent_id, workflow_id, status,
                              duration_bucket, attempts, retries, duration_seconds)
    SELECT executions.owner_id,
           CAST(strftime('%s', COALESCE(NEW.finished_at, NEW.updated_at)) AS INTEGER)
               / 3600 * 3600,
           COALESCE(NEW.agent_id, zeroblob(16)),
           COALESCE(executions.workflow_id, zeroblob(16)),
           NEW.status,
           CASE WHEN NEW.started_at IS NULL OR NEW.finished_at IS NULL THEN -1
                ELSE COALESCE((SELECT MIN(bucket) FROM analytics_duration_buckets
                               WHERE upper_seconds >= (julianday(NEW.finished_at)
                                                       - julianday(NEW.started_at)) * 86400.0),
                              120) END,
           1,
           CASE WHEN NEW.attempt - NEW.infra_reassignments > 1 THEN 1 ELSE 0 END,
           COALESCE((julianday(NEW.finished_at) - julianday(NEW.started_at)) * 86400.0, 0)
    FROM executions WHERE executions.id = NEW.execution_id
    ON CONFLICT (owner_id, hour_start, agent_id, workflow_id, status, duration_bucket, shard)
    DO UPDATE
        SET attempts = attempts + 1,
            retries = retries + excluded.retries,
            duration_seconds = duration_seconds + excluded.duration_seconds;
    INSERT INTO error_rollups (subject_id, hour_start, message, occurrences)
    SELECT NEW.agent_id,
           CAST(strftime('%s', COALESCE(NEW.finished_at, NEW.updated_at)) AS INTEGER)
               / 3600 * 3600,
           substr(COALESCE(NEW.error, lower(replace(NEW.status, '_', ' '))), 1, 200),
           1
    WHERE NEW.status IN ('FAILED', 'TIMED_OUT') AND NEW.agent_id IS NOT NULL
    ON CONFLICT (subject_id, hour_start, message) DO UPDATE SET occurrences = occurrences + 1;
    INSERT INTO usage_rollups (user_id, day_start, step_seconds, prompt_tokens,
                               completion_tokens)
    SELECT executions.owner_id,
           CAST(strftime('%s', COALESCE(NEW.finished_at, NEW.updated_at)) AS INTEGER)
               / 86400 * 86400,
           MAX(COALESCE((julianday(NEW.finished_at) - julianday(NEW.started_at)) * 86400.0, 0),
               0),
           CASE WHEN llm.is_llm AND json_valid(NEW.output)
                     AND json_type(NEW.output, '$.usage.promptTokens') IN ('integer', 'real')
                THEN MIN(MAX(CAST(json_extract(NEW.output, '$.usage.promptTokens') AS INTEGER),
                             0), 1000000000000)
                ELSE 0 END,
           CASE WHEN llm.is_llm AND json_valid(NEW.output)
                     AND json_type(NEW.output, '$.usage.completionTokens') IN ('integer', 'real')
                THEN MIN(MAX(CAST(json_extract(NEW.output, '$.usage.completionTokens')
                                  AS INTEGER), 0), 1000000000000)
                ELSE 0 END
    FROM executions,
         (SELECT EXISTS (SELECT 1 FROM agents WHERE agents.id = NEW.agent_id
                         AND agents.agent_type = 'LLM') AS is_llm) AS llm
    WHERE executions.id = NEW.execution_id
    ON CONFLICT (user_id, day_start, shard) DO UPDATE
        SET step_seconds = step_seconds + excluded.step_seconds,
            prompt_tokens = prompt_tokens + excluded.prompt_tokens,
            completion_tokens = completion_tokens + excluded.completion_tokens;
END;

-- The runs that finished before this migration, summed as the triggers above sum new ones: an
-- upgraded installation shows its history. (Retries of old attempts: an attempt after the
-- first that did not follow a lost lease.)
INSERT INTO execution_rollups (owner_id, hour_start, workflow_id, status, duration_bucket,
                               executions, duration_seconds)
SELECT owner_id, finished_hour, workflow_key, status,
       CASE WHEN seconds IS NULL THEN -1
            ELSE COALESCE((SELECT MIN(bucket) FROM analytics_duration_buckets
                           WHERE upper_seconds >= seconds), 120) END AS duration_bucket,
       COUNT(*), COALESCE(SUM(seconds), 0)
FROM (SELECT owner_id,
             CAST(strftime('%s', COALESCE(finished_at, updated_at)) AS INTEGER) / 3600 * 3600
                 AS finished_hour,
             COALESCE(workflow_id, zeroblob(16)) AS workflow_key,
             status,
             (julianday(finished_at) - julianday(started_at)) * 86400.0 AS seconds
      FROM executions
      WHERE status IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT')) AS finished
GROUP BY owner_id, finished_hour, workflow_key, status, duration_bucket;

INSERT INTO error_rollups (subject_id, hour_start, message, occurrences)
SELECT workflow_id,
       CAST(strftime('%s', COALESCE(finished_at, updated_at)) AS INTEGER) / 3600 * 3600,
       substr(COALESCE(error, lower(replace(status, '_', ' '))), 1, 200), COUNT(*)
FROM executions
WHERE status IN ('FAILED', 'TIMED_OUT') AND workflow_id IS NOT NULL
GROUP BY 1, 2, 3;

CREATE TEMPORARY TABLE finished_attempts AS
SELECT e.owner_id AS owner_id,
       COALESCE(s.agent_id, zeroblob(16)) AS agent_key,
       s.agent_id AS agent_id,
       COALESCE(e.workflow_id, zeroblob(16)) AS workflow_key,
       a.status AS status,
       a.error AS error,
       a.output AS output,
       COALESCE(a.finished_at, a.updated_at) AS finished,
       (julianday(a.finished_at) - julianday(a.started_at)) * 86400.0 AS seconds,
       CASE WHEN a.attempt > 1 AND COALESCE(previous.status, '') <> 'LEASE_LOST' THEN 1 ELSE 0 END
           AS retry,
       COALESCE(agent.agent_type = 'LLM', 0) AS is_llm
FROM step_attempts a
JOIN step_runs s ON s.id = a.step_run_id
JOIN executions e ON e.id = s.execution_id
LEFT JOIN step_attempts previous
    ON previous.step_run_id = a.step_run_id AND previous.attempt = a.attempt - 1
LEFT JOIN agents agent ON agent.id = s.agent_id
WHERE a.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT');

INSERT INTO step_rollups (owner_id, hour_start, agent_id, workflow_id, status, duration_bucket,
                          attempts, retries, duration_seconds)
SELECT owner_id, CAST(strftime('%s', finished) AS INTEGER) / 3600 * 3600 AS finished_hour,
       agent_key, workflow_key, status,
       CASE WHEN seconds IS NULL THEN -1
            ELSE COALESCE((SELECT MIN(bucket) FROM analytics_duration_buckets
                           WHERE upper_seconds >= seconds), 120) END AS duration_bucket,
       COUNT(*), SUM(retry), COALESCE(SUM(seconds), 0)
FROM finished_attempts
GROUP BY owner_id, finished_hour, agent_key, workflow_key, status, duration_bucket;

INSERT INTO error_rollups (subject_id, hour_start, message, occurrences)
SELECT agent_id, CAST(strftime('%s', finished) AS INTEGER) / 3600 * 3600,
       substr(COALESCE(error, lower(replace(status, '_', ' '))), 1, 200), COUNT(*)
FROM finished_attempts
WHERE status IN ('FAILED', 'TIMED_OUT') AND agent_id IS NOT NULL
GROUP BY 1, 2, 3
ON CONFLICT (subject_id, hour_start, message) DO UPDATE
    SET occurrences = occurrences + excluded.occurrences;

INSERT INTO usage_rollups (user_id, day_start, executions_started)
SELECT owner_id, CAST(strftime('%s', created_at) AS INTEGER) / 86400 * 86400, COUNT(*)
FROM executions
WHERE parent_execution_id IS NULL
GROUP BY 1, 2;

INSERT INTO usage_rollups (user_id, day_start, step_seconds, prompt_tokens, completion_tokens)
SELECT owner_id, CAST(strftime('%s', finished) AS INTEGER) / 86400 * 86400,
       SUM(MAX(COALESCE(seconds, 0), 0)),
       SUM(CASE WHEN is_llm AND json_valid(output)
                     AND json_type(output, '$.usage.promptTokens') IN ('integer', 'real')
                THEN MIN(MAX(CAST(json_extract(output, '$.usage.promptTokens') AS INTEGER), 0),
                         1000000000000)
                ELSE 0 END),
       SUM(CASE WHEN is_llm AND json_valid(output)
                     AND json_type(output, '$.usage.completionTokens') IN ('integer', 'real')
                THEN MIN(MAX(CAST(json_extract(output, '$.usage.completionTokens') AS INTEGER),
                             0), 1000000000000)
                ELSE 0 END)
FROM finished_attempts
WHERE true
GROUP BY 1, 2
ON CONFLICT (user_id, day_start, shard) DO UPDATE
    SET step_seconds = step_seconds + excluded.step_seconds,
        prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens;

DROP TABLE finished_attempts;
