-- users: every account, local (password) or mapped from an external OIDC identity provider.
-- Owned by the identity area (src/store/identity.rs). The SQLite twin describes the same table.

CREATE TABLE users (
    id                uuid        PRIMARY KEY,
    -- Stored lowercased by the store, so equality is case-insensitive. Byte-order collation
    -- (email, full_name) so sorting matches SQLite's BINARY whatever the server's locale.
    email             text        COLLATE "C" NOT NULL CHECK (length(email) BETWEEN 1 AND 254),
    -- NULL for users that sign in through an external identity provider only.
    password_hash     text,
    full_name         text        COLLATE "C" NOT NULL,
    avatar_url        text,
    role              text        NOT NULL CHECK (role IN ('ADMIN', 'USER', 'AGENT')),
    preferences       jsonb       NOT NULL DEFAULT '{}'
                                  CHECK (jsonb_typeof(preferences) = 'object'),
    -- The OIDC issuer and subject of an external identity; both set or both NULL.
    external_issuer   text,
    external_subject  text,
    last_login_at     timestamptz,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    deleted_at        timestamptz,
    version           bigint      NOT NULL DEFAULT 1,
    CONSTRAINT users_external_identity_complete
        CHECK ((external_issuer IS NULL) = (external_subject IS NULL))
);

-- A soft-deleted user frees its email and external identity for a new account.
CREATE UNIQUE INDEX users_email_unique ON users (email) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX users_external_identity_unique
    ON users (external_issuer, external_subject)
    WHERE external_issuer IS NOT NULL AND deleted_at IS NULL;

-- list_users sorts (id is the tie-breaker; names case-insensitively) and filters by role.
CREATE INDEX users_created_at ON users (created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX users_updated_at ON users (updated_at, id) WHERE deleted_at IS NULL;
CREATE INDEX users_full_name ON users (lower(full_name), id) WHERE deleted_at IS NULL;
CREATE INDEX users_role_created_at ON users (role, created_at, id) WHERE deleted_at IS NULL;
