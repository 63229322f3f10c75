-- Alert rules (owned, soft-deleted, versioned like the other resources), their incidents and
-- the log of every webhook call they made.
CREATE TABLE alert_rules (
    id                     uuid        PRIMARY KEY,
    owner_id               uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name                   text        COLLATE "C" NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description            text        NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    disabled               boolean     NOT NULL DEFAULT false,
    condition_type         text        NOT NULL CHECK (condition_type IN ('EXECUTION_FAILED',
        'FAILURES_IN_WINDOW', 'NO_RUNNER_AVAILABLE', 'QUEUED_STEP_TOO_OLD', 'AGENT_FAILING')),
    -- The condition's subject, by type (no foreign keys: the resources are soft-deleted, and a
    -- rule about a deleted one simply never holds again).
    workflow_id            uuid,
    deployment_id          uuid,
    agent_id               uuid,
    failure_count          integer     NOT NULL DEFAULT 0,
    window_seconds         integer     NOT NULL DEFAULT 0,
    threshold_seconds      integer     NOT NULL DEFAULT 0,
    webhook_url            text        NOT NULL CHECK (length(webhook_url) BETWEEN 1 AND 2048),
    webhook_secret         text        NOT NULL,
    allow_private_network  boolean     NOT NULL DEFAULT false,
    -- When a periodic evaluation is next due; the replica that moves it evaluates the rule.
    next_evaluation_at     timestamptz NOT NULL,
    version                bigint      NOT NULL DEFAULT 1,
    created_at             timestamptz NOT NULL,
    updated_at             timestamptz NOT NULL,
    deleted_at             timestamptz
);

CREATE INDEX alert_rules_owner ON alert_rules (owner_id, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX alert_rules_due ON alert_rules (next_evaluation_at)
    WHERE deleted_at IS NULL AND NOT disabled;

-- An incident: the condition held from `opened_at` until `resolved_at`. At most one is open per
-- rule: the replica whose insert wins sends the FIRING notification, the one whose update
-- closes it sends RESOLVED.
CREATE TABLE alert_incidents (
    id           uuid        PRIMARY KEY,
    rule_id      uuid        NOT NULL REFERENCES alert_rules (id) ON DELETE CASCADE,
    summary      text        NOT NULL,
    opened_at    timestamptz NOT NULL,
    resolved_at  timestamptz
);

CREATE UNIQUE INDEX alert_incidents_one_open ON alert_incidents (rule_id) WHERE resolved_at IS NULL;
CREATE INDEX alert_incidents_by_rule ON alert_incidents (rule_id, opened_at, id);

-- Every call of a rule's webhook.
CREATE TABLE alert_deliveries (
    id               uuid             PRIMARY KEY,
    rule_id          uuid             NOT NULL REFERENCES alert_rules (id) ON DELETE CASCADE,
    incident_id      uuid             NOT NULL REFERENCES alert_incidents (id) ON DELETE CASCADE,
    event            text             NOT NULL CHECK (event IN ('FIRING', 'RESOLVED')),
    attempt          integer          NOT NULL CHECK (attempt >= 1),
    response_status  integer          NOT NULL DEFAULT 0,
    succeeded        boolean          NOT NULL,
    error            text             NOT NULL DEFAULT '',
    duration_ms      double precision NOT NULL DEFAULT 0,
    attempted_at     timestamptz      NOT NULL
);

CREATE INDEX alert_deliveries_by_rule ON alert_deliveries (rule_id, attempted_at, id);

-- Failures within a window: only failed rows are in it, so it costs nothing to the executions
-- that succeed.
CREATE INDEX executions_failed_finished_at ON executions (owner_id, finished_at)
    WHERE status IN ('FAILED', 'TIMED_OUT');
