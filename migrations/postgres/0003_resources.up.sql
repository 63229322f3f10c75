-- Resources: agents and their version history, workflows and their steps, templates,
-- deployments and their event log. Owned by the resources area (src/store/resources.rs).
-- The SQLite twin describes the same tables, columns and constraints.
--
-- Conventions: every user-owned row is soft-deleted (`deleted_at`) and optimistically locked
-- (`version`); `owner_id` cascades from users because users are themselves soft-deleted, so a
-- hard user delete only ever happens when an operator really wants everything gone. Names are
-- `COLLATE "C"` so that sorting by name is byte-wise, exactly like SQLite. Indexes serve the list
-- queries (owner scope, then sort key, then id as the tie-breaker) and skip deleted rows.
-- Substring search (`LIKE '%text%'`) cannot use a b-tree index; it is bounded by the owner
-- scope and a pg_trgm index can be added if it ever matters.

-- ---------------------------------------------------------------------------------------------
-- agents
-- ---------------------------------------------------------------------------------------------

CREATE TABLE agents (
    id                uuid        PRIMARY KEY,
    owner_id          uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name              text        COLLATE "C" NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description       text        NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    agent_type        text        NOT NULL
        CHECK (agent_type IN ('CODE', 'API', 'LLM', 'DATA', 'WORKFLOW')),
    -- Type-specific settings; their shape is validated by the service layer.
    config            jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    -- Resource limits are four typed columns rather than one JSON document: the set is fixed,
    -- every runner needs all four, and the database can refuse nonsense (zero, negative).
    timeout_seconds   integer     NOT NULL CHECK (timeout_seconds > 0),
    memory_mb         integer     NOT NULL CHECK (memory_mb > 0),
    cpu_seconds       integer     NOT NULL CHECK (cpu_seconds > 0),
    max_output_bytes  bigint      NOT NULL CHECK (max_output_bytes > 0),
    status            text        NOT NULL DEFAULT 'IDLE'
        CHECK (status IN ('IDLE', 'RUNNING', 'PAUSED', 'STOPPED')),
    tags              jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(tags) = 'array'),
    version           bigint      NOT NULL DEFAULT 1,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    deleted_at        timestamptz
);

CREATE INDEX agents_owner_updated_at ON agents (owner_id, updated_at, id) WHERE deleted_at IS NULL;
CREATE INDEX agents_owner_created_at ON agents (owner_id, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX agents_owner_name ON agents (owner_id, lower(name), id) WHERE deleted_at IS NULL;
CREATE INDEX agents_owner_agent_type ON agents (owner_id, agent_type, id) WHERE deleted_at IS NULL;
CREATE INDEX agents_owner_status ON agents (owner_id, status, id) WHERE deleted_at IS NULL;
-- The unscoped (administrator) list, newest first by default.
CREATE INDEX agents_updated_at ON agents (updated_at, id) WHERE deleted_at IS NULL;
-- Tag filter: `tags @> '["tag"]'`.
CREATE INDEX agents_tags ON agents USING gin (tags jsonb_path_ops) WHERE deleted_at IS NULL;

-- ---------------------------------------------------------------------------------------------
-- agent_versions: one row per saved state of an agent, version 1 written on create
-- ---------------------------------------------------------------------------------------------

CREATE TABLE agent_versions (
    id              uuid        PRIMARY KEY,
    -- History belongs to its agent; agents are soft-deleted, so this only fires on a purge.
    agent_id        uuid        NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    version         bigint      NOT NULL CHECK (version >= 1),
    -- The whole agent as it was after this version was saved.
    snapshot        jsonb       NOT NULL CHECK (jsonb_typeof(snapshot) = 'object'),
    -- Names of the fields this version changed (every field for version 1).
    changed_fields  jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(changed_fields) = 'array'),
    -- The history outlives the account of whoever made the change.
    changed_by      uuid        REFERENCES users (id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    -- Also serves list_agent_versions (newest first).
    CONSTRAINT agent_versions_agent_version_unique UNIQUE (agent_id, version)
);

-- ---------------------------------------------------------------------------------------------
-- workflows and workflow_steps
-- ---------------------------------------------------------------------------------------------

CREATE TABLE workflows (
    id               uuid        PRIMARY KEY,
    owner_id         uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name             text        COLLATE "C" NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description      text        NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    -- Input an execution starts with when its caller gives none.
    default_input    jsonb       NOT NULL DEFAULT '{}',
    priority         integer     NOT NULL DEFAULT 5 CHECK (priority BETWEEN 1 AND 10),
    -- Whole-execution timeout; NULL means only the step timeouts apply.
    timeout_seconds  integer     CHECK (timeout_seconds > 0),
    tags             jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(tags) = 'array'),
    version          bigint      NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    deleted_at       timestamptz
);

CREATE INDEX workflows_owner_updated_at ON workflows (owner_id, updated_at, id) WHERE deleted_at IS NULL;
CREATE INDEX workflows_owner_created_at ON workflows (owner_id, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX workflows_owner_name ON workflows (owner_id, lower(name), id) WHERE deleted_at IS NULL;
CREATE INDEX workflows_owner_priority ON workflows (owner_id, priority, id) WHERE deleted_at IS NULL;
CREATE INDEX workflows_updated_at ON workflows (updated_at, id) WHERE deleted_at IS NULL;
CREATE INDEX workflows_tags ON workflows USING gin (tags jsonb_path_ops) WHERE deleted_at IS NULL;

-- The steps of a workflow definition. Rows are replaced with the definition (same id kept for a
-- step_key that survives an update), so they carry no deleted_at or version of their own.
CREATE TABLE workflow_steps (
    id                        uuid        PRIMARY KEY,
    workflow_id               uuid        NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    step_key                  text        NOT NULL CHECK (length(step_key) BETWEEN 1 AND 100),
    name                      text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- RESTRICT: agents are soft-deleted, and the store refuses to soft-delete an agent that a
    -- live workflow still uses, so a hard delete of a used agent is always a mistake.
    agent_id                  uuid        NOT NULL REFERENCES agents (id) ON DELETE RESTRICT,
    -- Keys of the steps this one waits for; the service checks they exist and form a DAG.
    depends_on                jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(depends_on) = 'array'),
    -- NULL: the step receives the execution input.
    input_mapping             jsonb,
    -- Retry policy as typed columns (a fixed shape the engine reads on every failure).
    retry_max_attempts        integer     NOT NULL CHECK (retry_max_attempts >= 1),
    retry_initial_backoff_ms  bigint      NOT NULL CHECK (retry_initial_backoff_ms >= 0),
    retry_max_backoff_ms      bigint      NOT NULL CHECK (retry_max_backoff_ms >= retry_initial_backoff_ms),
    retry_multiplier          double precision NOT NULL CHECK (retry_multiplier >= 1.0),
    timeout_seconds           integer     CHECK (timeout_seconds > 0),
    -- Runner labels this step needs, each "key" (present) or "key=value".
    required_labels           jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(required_labels) = 'array'),
    -- Order of the step in the definition, from 0.
    position                  integer     NOT NULL CHECK (position >= 0),
    created_at                timestamptz NOT NULL,
    updated_at                timestamptz NOT NULL,
    CONSTRAINT workflow_steps_workflow_step_key_unique UNIQUE (workflow_id, step_key)
);

CREATE INDEX workflow_steps_workflow_position ON workflow_steps (workflow_id, position, id);
-- workflows_using_agent, and the RESTRICT check when an agent row is purged.
CREATE INDEX workflow_steps_agent ON workflow_steps (agent_id);

-- ---------------------------------------------------------------------------------------------
-- templates
-- ---------------------------------------------------------------------------------------------

CREATE TABLE templates (
    id           uuid        PRIMARY KEY,
    -- NULL: a built-in starter template, installed at start-up and visible to every user.
    owner_id     uuid        REFERENCES users (id) ON DELETE CASCADE,
    name         text        COLLATE "C" NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description  text        NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    category     text        NOT NULL DEFAULT '' CHECK (length(category) <= 100),
    tags         jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(tags) = 'array'),
    is_public    boolean     NOT NULL DEFAULT false,
    kind         text        NOT NULL CHECK (kind IN ('AGENT', 'WORKFLOW')),
    -- The agent or workflow definition, with parameter placeholders.
    body         jsonb       NOT NULL CHECK (jsonb_typeof(body) = 'object'),
    -- Declared parameters: [{name, description, type, default, required}, ...].
    parameters   jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(parameters) = 'array'),
    version      bigint      NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    deleted_at   timestamptz
);

-- A user's list is "mine OR public OR built-in": one index per branch of the OR.
CREATE INDEX templates_owner_updated_at ON templates (owner_id, updated_at, id) WHERE deleted_at IS NULL;
CREATE INDEX templates_public_updated_at ON templates (updated_at, id)
    WHERE deleted_at IS NULL AND (is_public OR owner_id IS NULL);
CREATE INDEX templates_updated_at ON templates (updated_at, id) WHERE deleted_at IS NULL;
CREATE INDEX templates_created_at ON templates (created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX templates_name ON templates (lower(name), id) WHERE deleted_at IS NULL;
CREATE INDEX templates_category ON templates (category, kind) WHERE deleted_at IS NULL;
CREATE INDEX templates_tags ON templates USING gin (tags jsonb_path_ops) WHERE deleted_at IS NULL;

-- ---------------------------------------------------------------------------------------------
-- deployments and deployment_events
-- ---------------------------------------------------------------------------------------------

CREATE TABLE deployments (
    id                 uuid        PRIMARY KEY,
    owner_id           uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name               text        COLLATE "C" NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description        text        NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    -- Exactly one target. RESTRICT: workflows and agents are soft-deleted; purging one that a
    -- deployment still points at must be a deliberate two-step operation.
    workflow_id        uuid        REFERENCES workflows (id) ON DELETE RESTRICT,
    agent_id           uuid        REFERENCES agents (id) ON DELETE RESTRICT,
    environment        text        NOT NULL
        CHECK (environment IN ('DEVELOPMENT', 'STAGING', 'PRODUCTION')),
    -- Input defaults and environment values handed to every triggered execution.
    config             jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    trigger_type       text        NOT NULL CHECK (trigger_type IN ('MANUAL', 'CRON', 'WEBHOOK')),
    -- Set exactly when trigger_type is CRON.
    cron_expression    text,
    -- IANA time zone the cron expression is read in; set for CRON triggers.
    timezone           text        DEFAULT 'UTC',
    -- HMAC key of a WEBHOOK trigger; required for that trigger type, NULL otherwise.
    webhook_secret     text,
    status             text        NOT NULL DEFAULT 'STOPPED'
        CHECK (status IN ('STOPPED', 'RUNNING', 'FAILED')),
    last_triggered_at  timestamptz,
    -- Next cron fire time, computed by the service; NULL when not scheduled.
    next_run_at        timestamptz,
    version            bigint      NOT NULL DEFAULT 1,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    deleted_at         timestamptz,
    CONSTRAINT deployments_exactly_one_target
        CHECK ((workflow_id IS NULL) <> (agent_id IS NULL)),
    CONSTRAINT deployments_cron_expression_matches_trigger
        CHECK ((trigger_type = 'CRON') = (cron_expression IS NOT NULL)),
    CONSTRAINT deployments_cron_has_timezone
        CHECK (trigger_type <> 'CRON' OR timezone IS NOT NULL),
    CONSTRAINT deployments_webhook_secret_matches_trigger
        CHECK ((trigger_type = 'WEBHOOK') = (webhook_secret IS NOT NULL))
);

CREATE INDEX deployments_owner_updated_at ON deployments (owner_id, updated_at, id) WHERE deleted_at IS NULL;
CREATE INDEX deployments_owner_created_at ON deployments (owner_id, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX deployments_owner_name ON deployments (owner_id, lower(name), id) WHERE deleted_at IS NULL;
CREATE INDEX deployments_owner_status ON deployments (owner_id, status, id) WHERE deleted_at IS NULL;
CREATE INDEX deployments_owner_environment ON deployments (owner_id, environment, id) WHERE deleted_at IS NULL;
CREATE INDEX deployments_updated_at ON deployments (updated_at, id) WHERE deleted_at IS NULL;
-- Filters by target, and the RESTRICT checks when a workflow or agent row is purged.
CREATE INDEX deployments_workflow ON deployments (workflow_id) WHERE workflow_id IS NOT NULL;
CREATE INDEX deployments_agent ON deployments (agent_id) WHERE agent_id IS NOT NULL;
-- The cron scheduler's "what is due" query.
CREATE INDEX deployments_due_cron ON deployments (next_run_at, id)
    WHERE deleted_at IS NULL AND status = 'RUNNING' AND trigger_type = 'CRON';

-- Append-only history of a deployment (created, started, stopped, triggered, ...).
CREATE TABLE deployment_events (
    id             uuid        PRIMARY KEY,
    deployment_id  uuid        NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    kind           text        NOT NULL
        CHECK (kind IN ('CREATED', 'STARTED', 'STOPPED', 'TRIGGERED', 'FAILED', 'UPDATED')),
    message        text        NOT NULL DEFAULT '' CHECK (length(message) <= 5000),
    -- NULL for the scheduler and webhooks; the event outlives the account that caused it.
    actor_id       uuid        REFERENCES users (id) ON DELETE SET NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL
);

-- list_deployment_events, newest first (ids are UUID v7, so id order is creation order).
CREATE INDEX deployment_events_deployment_created_at ON deployment_events (deployment_id, created_at, id);
