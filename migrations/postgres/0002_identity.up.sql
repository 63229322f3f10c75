-- Identity: refresh sessions and their refresh tokens, password reset tokens, API keys and the
-- audit trail. Owned by the identity area (src/store/identity.rs). The SQLite twin describes the
-- same tables. Secrets are never stored: tokens and keys are kept as lowercase hex SHA-256.

-- A refresh-session family: the id travels in access tokens; revoking it ends the family.
CREATE TABLE sessions (
    id             uuid        PRIMARY KEY,
    -- Sessions are worthless without their user: removing a user removes them.
    user_id        uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,
    revoked_at     timestamptz,
    revoke_reason  text        CHECK (revoke_reason IN
                       ('LOGOUT', 'REFRESH_REUSE', 'PASSWORD_RESET', 'ADMIN', 'USER_DELETED')),
    user_agent     text,
    ip_address     text,
    CONSTRAINT sessions_revocation_complete CHECK ((revoked_at IS NULL) = (revoke_reason IS NULL))
);

-- revoke_all_user_sessions touches only the live sessions of one user.
CREATE INDEX sessions_user_live ON sessions (user_id) WHERE revoked_at IS NULL;
-- Replicas poll recent revocations (list_revoked_sessions_since).
CREATE INDEX sessions_revoked_at ON sessions (revoked_at, id) WHERE revoked_at IS NOT NULL;

-- One row per refresh token ever issued in a session; used_at marks a rotated token, so a
-- second presentation is detected as reuse.
CREATE TABLE refresh_tokens (
    token_hash  text        PRIMARY KEY,
    session_id  uuid        NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);

-- Serves the cascade from sessions.
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

CREATE TABLE password_reset_tokens (
    token_hash  text        PRIMARY KEY,
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);

-- A successful reset retires the user's other outstanding tokens; also serves the cascade.
CREATE INDEX password_reset_tokens_user ON password_reset_tokens (user_id) WHERE used_at IS NULL;

CREATE TABLE api_keys (
    id            uuid        PRIMARY KEY,
    user_id       uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name          text        NOT NULL,
    -- Displayable start of the key (for example 'tc_7f3a9c21'), safe to show in lists.
    key_prefix    text        NOT NULL,
    key_hash      text        NOT NULL,
    -- JSON array of 'runner', 'read', 'write'.
    scopes        jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(scopes) = 'array'),
    shared        boolean     NOT NULL DEFAULT false,
    expires_at    timestamptz,
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    CONSTRAINT api_keys_key_prefix_unique UNIQUE (key_prefix),
    CONSTRAINT api_keys_key_hash_unique UNIQUE (key_hash)
);

-- list_api_keys: one user's keys newest first, live ones only unless asked.
CREATE INDEX api_keys_user_created_at ON api_keys (user_id, created_at, id);
CREATE INDEX api_keys_user_live_created_at ON api_keys (user_id, created_at, id)
    WHERE revoked_at IS NULL;

-- The audit trail is append-only: rows are never updated or soft-deleted, so the table has
-- no updated_at, version or deleted_at.
CREATE TABLE audit_logs (
    id             uuid        PRIMARY KEY,
    -- The trail outlives the people in it: removing a user keeps its entries, anonymised.
    actor_id       uuid        REFERENCES users (id) ON DELETE SET NULL,
    actor_kind     text        NOT NULL CHECK (actor_kind IN ('USER', 'API_KEY', 'SYSTEM')),
    -- Byte-order collation so an action prefix ('auth.') is a plain index range.
    action         text        COLLATE "C" NOT NULL,
    resource_type  text        NOT NULL,
    resource_id    text,
    outcome        text        NOT NULL CHECK (outcome IN ('SUCCESS', 'FAILURE')),
    ip_address     text,
    user_agent     text,
    request_id     text,
    changes        jsonb,
    metadata       jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    created_at     timestamptz NOT NULL
);

-- list_audit_logs pages newest first on (created_at, id), optionally narrowed by one of these.
CREATE INDEX audit_logs_created_at ON audit_logs (created_at, id);
CREATE INDEX audit_logs_actor ON audit_logs (actor_id, created_at, id) WHERE actor_id IS NOT NULL;
CREATE INDEX audit_logs_action ON audit_logs (action, created_at, id);
CREATE INDEX audit_logs_resource ON audit_logs (resource_type, resource_id, created_at, id);
