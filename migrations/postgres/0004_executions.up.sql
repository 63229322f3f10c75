-- executions, step_runs, step_attempts, execution_logs: the durable state of the execution
-- engine. Owned by the executions area (src/store/executions.rs). The SQLite twin describes the
-- same tables, columns, constraints and indexes.
--
-- Deletion rules, chosen on purpose:
-- * owner_id CASCADE: users are soft-deleted; only a hard purge of an account removes its
--   rows, and then its execution history (inputs, outputs, logs) must go with it.
-- * workflow_id, deployment_id SET NULL: workflows and deployments are soft-deleted, so these
--   keys normally never fire. A hard purge of a workflow or deployment must not erase history:
--   an execution carries its own `definition` snapshot and stays fully readable without them.
-- * parent execution and parent step run CASCADE: a sub-workflow execution is part of its
--   parent; it has no meaning (and no owner view) without it.
-- * step_runs.agent_id SET NULL: same reasoning as workflow_id (the snapshot is in `definition`).

CREATE TABLE executions (
    id                   uuid        PRIMARY KEY,
    owner_id             uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    workflow_id          uuid        REFERENCES workflows (id) ON DELETE SET NULL,
    deployment_id        uuid        REFERENCES deployments (id) ON DELETE SET NULL,
    parent_execution_id  uuid        REFERENCES executions (id) ON DELETE CASCADE,
    -- The step of the parent execution that started this sub-workflow (foreign key below).
    parent_step_run_id   uuid,
    depth                integer     NOT NULL DEFAULT 0 CHECK (depth >= 0),
    trigger              text        NOT NULL
        CHECK (trigger IN ('MANUAL', 'CRON', 'WEBHOOK', 'SUB_WORKFLOW', 'API')),
    status               text        NOT NULL
        CHECK (status IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT')),
    priority             integer     NOT NULL CHECK (priority BETWEEN 1 AND 10),
    input                jsonb       NOT NULL,
    output               jsonb,
    error                text,
    -- The workflow and agent snapshots as of creation: the engine runs from this, never from
    -- the live (editable) workflow.
    definition           jsonb       NOT NULL CHECK (jsonb_typeof(definition) = 'object'),
    timeout_seconds      integer     CHECK (timeout_seconds > 0),
    deadline_at          timestamptz,
    started_at           timestamptz,
    finished_at          timestamptz,
    cancel_requested_at  timestamptz,
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL,
    deleted_at           timestamptz,
    version              bigint      NOT NULL DEFAULT 1,
    CONSTRAINT executions_parent_complete
        CHECK ((parent_execution_id IS NULL) = (parent_step_run_id IS NULL)),
    CONSTRAINT executions_depth_follows_parent
        CHECK ((parent_execution_id IS NULL) = (depth = 0)),
    CONSTRAINT executions_sub_workflow_has_parent
        CHECK ((trigger = 'SUB_WORKFLOW') = (parent_execution_id IS NOT NULL))
);

CREATE TABLE step_runs (
    id                   uuid        PRIMARY KEY,
    execution_id         uuid        NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    step_key             text        NOT NULL CHECK (length(step_key) BETWEEN 1 AND 200),
    agent_id             uuid        REFERENCES agents (id) ON DELETE SET NULL,
    status               text        NOT NULL
        CHECK (status IN ('PENDING', 'QUEUED', 'ASSIGNED', 'RUNNING', 'SUCCEEDED', 'FAILED',
                          'CANCELLED', 'TIMED_OUT')),
    -- The current attempt; every transition is fenced on (id, attempt).
    attempt              integer     NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    -- Attempts the user's retry policy allows; infrastructure reassignments do not count.
    max_attempts         integer     NOT NULL CHECK (max_attempts >= 1),
    -- Attempts started because a runner lost its lease (each one also bumped `attempt`).
    infra_reassignments  integer     NOT NULL DEFAULT 0
        CHECK (infra_reassignments >= 0 AND infra_reassignments < attempt),
    input                jsonb,
    output               jsonb,
    error                text,
    error_retryable      boolean,
    runner_id            text,
    -- The lease granted at assignment. Heartbeats extend leases in memory/Redis only; the
    -- reconciler reads this column to find work whose runner may be gone.
    lease_expires_at     timestamptz,
    -- Set while a retry waits for its backoff (status PENDING).
    next_attempt_at      timestamptz,
    queued_at            timestamptz,
    assigned_at          timestamptz,
    started_at           timestamptz,
    finished_at          timestamptz,
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL,
    version              bigint      NOT NULL DEFAULT 1,
    CONSTRAINT step_runs_step_key_unique UNIQUE (execution_id, step_key),
    -- Lists an execution's step runs in creation order, and is the target of the composite
    -- keys that tie a sub-workflow (or a log line) to a step run of the same execution.
    CONSTRAINT step_runs_execution_id_id_unique UNIQUE (execution_id, id),
    CONSTRAINT step_runs_held_by_runner
        CHECK (status NOT IN ('ASSIGNED', 'RUNNING') OR runner_id IS NOT NULL)
);

ALTER TABLE executions
    ADD CONSTRAINT executions_parent_step_run_fk
    FOREIGN KEY (parent_execution_id, parent_step_run_id)
    REFERENCES step_runs (execution_id, id) ON DELETE CASCADE;

-- The permanent record of every attempt of a step run. The row of the current attempt mirrors
-- the step run; older rows are final (their last status, or LEASE_LOST when the runner's lease
-- expired and the step was reassigned).
CREATE TABLE step_attempts (
    step_run_id          uuid        NOT NULL REFERENCES step_runs (id) ON DELETE CASCADE,
    attempt              integer     NOT NULL CHECK (attempt >= 1),
    status               text        NOT NULL
        CHECK (status IN ('PENDING', 'QUEUED', 'ASSIGNED', 'RUNNING', 'SUCCEEDED', 'FAILED',
                          'CANCELLED', 'TIMED_OUT', 'LEASE_LOST')),
    runner_id            text,
    input                jsonb,
    output               jsonb,
    error                text,
    retryable            boolean,
    queued_at            timestamptz,
    assigned_at          timestamptz,
    started_at           timestamptz,
    finished_at          timestamptz,
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL,
    PRIMARY KEY (step_run_id, attempt)
);

-- Append-only (never updated), hence no updated_at; the 64-bit id is the cursor of log streams.
CREATE TABLE execution_logs (
    id                   bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    execution_id         uuid        NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    step_run_id          uuid,
    attempt              integer     CHECK (attempt >= 1),
    level                text        NOT NULL CHECK (level IN ('DEBUG', 'INFO', 'WARN', 'ERROR')),
    source               text        NOT NULL
        CHECK (source IN ('SYSTEM', 'STDOUT', 'STDERR', 'RUNNER')),
    message              text        NOT NULL,
    fields               jsonb,
    created_at           timestamptz NOT NULL,
    CONSTRAINT execution_logs_attempt_needs_step
        CHECK (attempt IS NULL OR step_run_id IS NOT NULL),
    CONSTRAINT execution_logs_step_run_fk FOREIGN KEY (execution_id, step_run_id)
        REFERENCES step_runs (execution_id, id) ON DELETE CASCADE
);

-- list_executions, newest first, per scope and filter (id is the tie-breaker and the cursor).
CREATE INDEX executions_owner_created_at ON executions (owner_id, created_at, id)
    WHERE deleted_at IS NULL;
CREATE INDEX executions_created_at ON executions (created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX executions_workflow_created_at ON executions (workflow_id, created_at, id)
    WHERE deleted_at IS NULL;
CREATE INDEX executions_deployment_created_at ON executions (deployment_id, created_at, id)
    WHERE deleted_at IS NULL;
CREATE INDEX executions_parent_created_at ON executions (parent_execution_id, created_at, id)
    WHERE deleted_at IS NULL;
CREATE INDEX executions_status_created_at ON executions (status, created_at, id)
    WHERE deleted_at IS NULL;
-- The reconciler's deadline sweep: only unfinished executions with a deadline.
CREATE INDEX executions_unfinished_deadline ON executions (deadline_at)
    WHERE deadline_at IS NOT NULL AND status IN ('QUEUED', 'RUNNING');

-- list_ready_step_runs (QUEUED, and PENDING retries whose backoff is over).
CREATE INDEX step_runs_status_next_attempt_at ON step_runs (status, next_attempt_at);
-- list_expired_leases (ASSIGNED/RUNNING past their lease).
CREATE INDEX step_runs_status_lease_expires_at ON step_runs (status, lease_expires_at);

-- list_execution_logs: by execution, and by step run, in id order.
CREATE INDEX execution_logs_execution_id ON execution_logs (execution_id, id);
CREATE INDEX execution_logs_step_run_id ON execution_logs (step_run_id, id)
    WHERE step_run_id IS NOT NULL;
