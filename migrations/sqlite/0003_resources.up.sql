-- Resources: agents and their version history, workflows and their steps, templates,
-- deployments and their event log. Owned by the resources area (src/store/resources.rs).
-- The PostgreSQL twin describes the same tables, columns and constraints. Ids are 16-byte BLOBs
-- (sqlx's Uuid encoding), times RFC 3339 TEXT in UTC, JSON TEXT, booleans 0/1.
--
-- Conventions: every user-owned row is soft-deleted (`deleted_at`) and optimistically locked
-- (`version`); `owner_id` cascades from users because users are themselves soft-deleted, so a
-- hard user delete only ever happens when an operator really wants everything gone. Names sort
-- byte-wise (BINARY here, `COLLATE "C"` on PostgreSQL). Indexes serve the list queries (owner
-- scope, then sort key, then id as the tie-breaker) and skip deleted rows. Substring search
-- (`LIKE '%text%'`) cannot use a b-tree index; it is bounded by the owner scope.

-- ---------------------------------------------------------------------------------------------
-- agents
-- ---------------------------------------------------------------------------------------------

CREATE TABLE agents (
    id                BLOB        PRIMARY KEY NOT NULL,
    owner_id          BLOB        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name              TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description       TEXT        NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    agent_type        TEXT        NOT NULL
        CHECK (agent_type IN ('CODE', 'API', 'LLM', 'DATA', 'WORKFLOW')),
    -- Type-specific settings; their shape is validated by the service layer.
    config            TEXT        NOT NULL DEFAULT '{}' CHECK (json_type(config) = 'object'),
    -- Resource limits are four typed columns rather than one JSON document: the set is fixed,
    -- every runner needs all four, and the database can refuse nonsense (zero, negative).
    timeout_seconds   INTEGER     NOT NULL CHECK (timeout_seconds > 0),
    memory_mb         INTEGER     NOT NULL CHECK (memory_mb > 0),
    cpu_seconds       INTEGER     NOT NULL CHECK (cpu_seconds > 0),
    max_output_bytes  INTEGER     NOT NULL CHECK (max_output_bytes > 0),
    status            TEXT        NOT NULL DEFAULT 'IDLE'
        CHECK (status IN ('IDLE', 'RUNNING', 'PAUSED', 'STOPPED')),
    tags              TEXT        NOT NULL DEFAULT '[]' CHECK (json_type(tags) = 'array'),
    version           INTEGER     NOT NULL DEFAULT 1,
    created_at        TEXT        NOT NULL,
    updated_at        TEXT        NOT NULL,
    deleted_at        TEXT
);

CREATE INDEX agents_owner_updated_at ON agents (owner_id, updated_at, id) WHERE deleted_at IS NULL;
CREATE INDEX agents_owner_created_at ON agents (owner_id, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX agents_owner_name ON agents (owner_id, lower(name), id) WHERE deleted_at IS NULL;
CREATE INDEX agents_owner_agent_type ON agents (owner_id, agent_type, id) WHERE deleted_at IS NULL;
CREATE INDEX agents_owner_status ON agents (owner_id, status, id) WHERE deleted_at IS NULL;
-- The unscoped (administrator) list, newest first by default.
CREATE INDEX agents_updated_at ON agents (updated_at, id) WHERE deleted_at IS NULL;
-- No tag index: SQLite cannot index inside a JSON array; the tag filter (`json_each`) scans the
-- owner's live rows, which the owner indexes above already narrow down.

-- ---------------------------------------------------------------------------------------------
-- agent_versions: one row per saved state of an agent, version 1 written on create
-- ---------------------------------------------------------------------------------------------

CREATE TABLE agent_versions (
    id              BLOB        PRIMARY KEY NOT NULL,
    -- History belongs to its agent; agents are soft-deleted, so this only fires on a purge.
    agent_id        BLOB        NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    version         INTEGER     NOT NULL CHECK (version >= 1),
    -- The whole agent as it was after this version was saved.
    snapshot        TEXT        NOT NULL CHECK (json_type(snapshot) = 'object'),
    -- Names of the fields this version changed (every field for version 1).
    changed_fields  TEXT        NOT NULL DEFAULT '[]' CHECK (json_type(changed_fields) = 'array'),
    -- The history outlives the account of whoever made the change.
    changed_by      BLOB        REFERENCES users (id) ON DELETE SET NULL,
    created_at      TEXT        NOT NULL,
    updated_at      TEXT        NOT NULL,
    -- Also serves list_agent_versions (newest first).
    CONSTRAINT agent_versions_agent_version_unique UNIQUE (agent_id, version)
);

-- ---------------------------------------------------------------------------------------------
-- workflows and workflow_steps
-- ---------------------------------------------------------------------------------------------

CREATE TABLE workflows (
    id               BLOB        PRIMARY KEY NOT NULL,
    owner_id         BLOB        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name             TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description      TEXT        NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    -- Input an execution starts with when its caller gives none.
    default_input    TEXT        NOT NULL DEFAULT '{}' CHECK (json_valid(default_input)),
    priority         INTEGER     NOT NULL DEFAULT 5 CHECK (priority BETWEEN 1 AND 10),
    -- Whole-execution timeout; NULL means only the step timeouts apply.
    timeout_seconds  INTEGER     CHECK (timeout_seconds > 0),
    tags             TEXT        NOT NULL DEFAULT '[]' CHECK (json_type(tags) = 'array'),
    version          INTEGER     NOT NULL DEFAULT 1,
    created_at       TEXT        NOT NULL,
    updated_at       TEXT        NOT NULL,
    deleted_at       TEXT
);

CREATE INDEX workflows_owner_updated_at ON workflows (owner_id, updated_at, id) WHERE deleted_at IS NULL;
CREATE INDEX workflows_owner_created_at ON workflows (owner_id, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX workflows_owner_name ON workflows (owner_id, lower(name), id) WHERE deleted_at IS NULL;
CREATE INDEX workflows_owner_priority ON workflows (owner_id, priority, id) WHERE deleted_at IS NULL;
CREATE INDEX workflows_updated_at ON workflows (updated_at, id) WHERE deleted_at IS NULL;

-- The steps of a workflow definition. Rows are replaced with the definition (same id kept for a
-- step_key that survives an update), so they carry no deleted_at or version of their own.
CREATE TABLE workflow_steps (
    id                        BLOB        PRIMARY KEY NOT NULL,
    workflow_id               BLOB        NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    step_key                  TEXT        NOT NULL CHECK (length(step_key) BETWEEN 1 AND 100),
    name                      TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- RESTRICT: agents are soft-deleted, and the store refuses to soft-delete an agent that a
    -- live workflow still uses, so a hard delete of a used agent is always a mistake.
    agent_id                  BLOB        NOT NULL REFERENCES agents (id) ON DELETE RESTRICT,
    -- Keys of the steps this one waits for; the service checks they exist and form a DAG.
    depends_on                TEXT        NOT NULL DEFAULT '[]' CHECK (json_type(depends_on) = 'array'),
    -- NULL: the step receives the execution input.
    input_mapping             TEXT        CHECK (input_mapping IS NULL OR json_valid(input_mapping)),
    -- Retry policy as typed columns (a fixed shape the engine reads on every failure).
    retry_max_attempts        INTEGER     NOT NULL CHECK (retry_max_attempts >= 1),
    retry_initial_backoff_ms  INTEGER     NOT NULL CHECK (retry_initial_backoff_ms >= 0),
    retry_max_backoff_ms      INTEGER     NOT NULL CHECK (retry_max_backoff_ms >= retry_initial_backoff_ms),
    retry_multiplier          REAL        NOT NULL CHECK (retry_multiplier >= 1.0),
    timeout_seconds           INTEGER     CHECK (timeout_seconds > 0),
    -- Runner labels this step needs, each "key" (present) or "key=value".
    required_labels           TEXT        NOT NULL DEFAULT '[]' CHECK (json_type(required_labels) = 'array'),
    -- Order of the step in the definition, from 0.
    position                  INTEGER     NOT NULL CHECK (position >= 0),
    created_at                TEXT        NOT NULL,
    updated_at                TEXT        NOT NULL,
    CONSTRAINT workflow_steps_workflow_step_key_unique UNIQUE (workflow_id, step_key)
);

CREATE INDEX workflow_steps_workflow_position ON workflow_steps (workflow_id, position, id);
-- workflows_using_agent, and the RESTRICT check when an agent row is purged.
CREATE INDEX workflow_steps_agent ON workflow_steps (agent_id);

-- ---------------------------------------------------------------------------------------------
-- templates
-- ---------------------------------------------------------------------------------------------

CREATE TABLE templates (
    id           BLOB        PRIMARY KEY NOT NULL,
    -- NULL: a built-in starter template, installed at start-up and visible to every user.
    owner_id     BLOB        REFERENCES users (id) ON DELETE CASCADE,
    name         TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description  TEXT        NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    category     TEXT        NOT NULL DEFAULT '' CHECK (length(category) <= 100),
    tags         TEXT        NOT NULL DEFAULT '[]' CHECK (json_type(tags) = 'array'),
    is_public    BOOLEAN     NOT NULL DEFAULT 0 CHECK (is_public IN (0, 1)),
    kind         TEXT        NOT NULL CHECK (kind IN ('AGENT', 'WORKFLOW')),
    -- The agent or workflow definition, with parameter placeholders.
    body         TEXT        NOT NULL CHECK (json_type(body) = 'object'),
    -- Declared parameters: [{name, description, type, default, required}, ...].
    parameters   TEXT        NOT NULL DEFAULT '[]' CHECK (json_type(parameters) = 'array'),
    version      INTEGER     NOT NULL DEFAULT 1,
    created_at   TEXT        NOT NULL,
    updated_at   TEXT        NOT NULL,
    deleted_at   TEXT
);

-- A user's list is "mine OR public OR built-in": one index per branch of the OR.
CREATE INDEX templates_owner_updated_at ON templates (owner_id, updated_at, id) WHERE deleted_at IS NULL;
CREATE INDEX templates_public_updated_at ON templates (updated_at, id)
    WHERE deleted_at IS NULL AND (is_public OR owner_id IS NULL);
CREATE INDEX templates_updated_at ON templates (updated_at, id) WHERE deleted_at IS NULL;
CREATE INDEX templates_created_at ON templates (created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX templates_name ON templates (lower(name), id) WHERE deleted_at IS NULL;
CREATE INDEX templates_category ON templates (category, kind) WHERE deleted_at IS NULL;

-- ---------------------------------------------------------------------------------------------
-- deployments and deployment_events
-- ---------------------------------------------------------------------------------------------

CREATE TABLE deployments (
    id                 BLOB        PRIMARY KEY NOT NULL,
    owner_id           BLOB        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name               TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description        TEXT        NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    -- Exactly one target. RESTRICT: workflows and agents are soft-deleted; purging one that a
    -- deployment still points at must be a deliberate two-step operation.
    workflow_id        BLOB        REFERENCES workflows (id) ON DELETE RESTRICT,
    agent_id           BLOB        REFERENCES agents (id) ON DELETE RESTRICT,
    environment        TEXT        NOT NULL
        CHECK (environment IN ('DEVELOPMENT', 'STAGING', 'PRODUCTION')),
    -- Input defaults and environment values handed to every triggered execution.
    config             TEXT        NOT NULL DEFAULT '{}' CHECK (json_type(config) = 'object'),
    trigger_type       TEXT        NOT NULL CHECK (trigger_type IN ('MANUAL', 'CRON', 'WEBHOOK')),
    -- Set exactly when trigger_type is CRON.
    cron_expression    TEXT,
    -- IANA time zone the cron expression is read in; set for CRON triggers.
    timezone           TEXT        DEFAULT 'UTC',
    -- HMAC key of a WEBHOOK trigger; required for that trigger type, NULL otherwise.
    webhook_secret     TEXT,
    status             TEXT        NOT NULL DEFAULT 'STOPPED'
        CHECK (status IN ('STOPPED', 'RUNNING', 'FAILED')),
    last_triggered_at  TEXT,
    -- Next cron fire time, computed by the service; NULL when not scheduled.
    next_run_at        TEXT,
    version            INTEGER     NOT NULL DEFAULT 1,
    created_at         TEXT        NOT NULL,
    updated_at         TEXT        NOT NULL,
    deleted_at         TEXT,
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
    id             BLOB        PRIMARY KEY NOT NULL,
    deployment_id  BLOB        NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    kind           TEXT        NOT NULL
        CHECK (kind IN ('CREATED', 'STARTED', 'STOPPED', 'TRIGGERED', 'FAILED', 'UPDATED')),
    message        TEXT        NOT NULL DEFAULT '' CHECK (length(message) <= 5000),
    -- NULL for the scheduler and webhooks; the event outlives the account that caused it.
    actor_id       BLOB        REFERENCES users (id) ON DELETE SET NULL,
    created_at     TEXT        NOT NULL,
    updated_at     TEXT        NOT NULL
);

-- list_deployment_events, newest first (ids are UUID v7, so id order is creation order).
CREATE INDEX deployment_events_deployment_created_at ON deployment_events (deployment_id, created_at, id);
