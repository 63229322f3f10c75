-- Ids are 16-byte BLOBs, times RFC 3339 TEXT in UTC, booleans 0/1.
-- Alert rules (owned, soft-deleted, versioned like the other resources), their incidents and
-- the log of every webhook call they made.
CREATE TABLE alert_rules (
    id                     BLOB        PRIMARY KEY NOT NULL,
    owner_id               BLOB        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name                   TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description            TEXT        NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    disabled               INTEGER     NOT NULL DEFAULT 0,
    condition_type         TEXT        NOT NULL CHECK (condition_type IN ('EXECUTION_FAILED',
        'FAILURES_IN_WINDOW', 'NO_RUNNER_AVAILABLE', 'QUEUED_STEP_TOO_OLD', 'AGENT_FAILING')),
    -- The condition's subject, by type (no foreign keys: the resources are soft-deleted, and a
    -- rule about a deleted one simply never holds again).
    workflow_id            BLOB,
    deployment_id          BLOB,
    agent_id               BLOB,
    failure_count          INTEGER     NOT NULL DEFAULT 0,
    window_seconds         INTEGER     NOT NULL DEFAULT 0,
    threshold_seconds      INTEGER     NOT NULL DEFAULT 0,
    webhook_url            TEXT        NOT NULL CHECK (length(webhook_url) BETWEEN 1 AND 2048),
    webhook_secret         TEXT        NOT NULL,
    allow_private_network  INTEGER     NOT NULL DEFAULT 0,
    -- When a periodic evaluation is next due; the replica that moves it evaluates the rule.
    next_evaluation_at     TEXT NOT NULL,
    version                INTEGER      NOT NULL DEFAULT 1,
    created_at             TEXT NOT NULL,
    updated_at             TEXT NOT NULL,
    deleted_at             TEXT
);

CREATE INDEX alert_rules_owner ON alert_rules (owner_id, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX alert_rules_due ON alert_rules (next_evaluation_at)
    WHERE deleted_at IS NULL AND disabled = 0;

-- An incident: the condition held from `opened_at` until `resolved_at`. At most one is open per
-- rule: the replica whose insert wins sends the FIRING notification, the one whose update
-- closes it sends RESOLVED.
CREATE TABLE alert_incidents (
    id           BLOB        PRIMARY KEY NOT NULL,
    rule_id      BLOB        NOT NULL REFERENCES alert_rules (id) ON DELETE CASCADE,
    summary      TEXT        NOT NULL,
    opened_at    TEXT NOT NULL,
    resolved_at  TEXT
);

CREATE UNIQUE INDEX alert_incidents_one_open ON alert_incidents (rule_id) WHERE resolved_at IS NULL;
CREATE INDEX alert_incidents_by_rule ON alert_incidents (rule_id, opened_at, id);

-- Every call of a rule's webhook.
CREATE TABLE alert_deliveries (
    id               BLOB             PRIMARY KEY NOT NULL,
    rule_id          BLOB             NOT NULL REFERENCES alert_rules (id) ON DELETE CASCADE,
    incident_id      BLOB             NOT NULL REFERENCES alert_incidents (id) ON DELETE CASCADE,
    event            TEXT             NOT NULL CHECK (event IN ('FIRING', 'RESOLVED')),
    attempt          INTEGER          NOT NULL CHECK (attempt >= 1),
    response_status  INTEGER          NOT NULL DEFAULT 0,
    succeeded        INTEGER          NOT NULL,
    error            TEXT             NOT NULL DEFAULT '',
    duration_ms      REAL NOT NULL DEFAULT 0,
    attempted_at     TEXT      NOT NULL
);

CREATE INDEX alert_deliveries_by_rule ON alert_deliveries (rule_id, attempted_at, id);

-- Failures within a window: only failed rows are in it, so it costs nothing to the executions
-- that succeed.
CREATE INDEX executions_failed_finished_at ON executions (owner_id, finished_at)
    WHERE status IN ('FAILED', 'TIMED_OUT');
