//! Store area: identity. Owns users, refresh sessions and their refresh tokens, password reset
//! tokens, API keys and the append-only audit trail. May call: sqlx and `super` (the Store seam).
//!
//! Secrets never reach the database: refresh tokens, reset tokens and API keys are stored as the
//! lowercase hex SHA-256 of the secret, hashed by the caller. Operations that read and then write
//! (user creation with "first user is admin", refresh rotation, password reset) run in one write
//! transaction: `BEGIN IMMEDIATE` on SQLite, row locks (plus one advisory lock) on PostgreSQL.

use async_trait::async_trait;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use super::batch::BatchRows;
use super::{
    CursorPage, Dialect, OwnerScope, Page, PageRequest, PagedList, SortField, SortOrder,
    StoreError, StoreResult, fetch_page, sql_order,
};

// ---------------------------------------------------------------------------------------------
// Users
// ---------------------------------------------------------------------------------------------

text_enum! {
    /// What a user may do: administrators see everything, agents are machine accounts.
    pub enum UserRole {
        Admin => "ADMIN",
        User => "USER",
        Agent => "AGENT",
    }
}

/// An account. `email` is always lowercase; `password_hash` is `None` for external identities.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub password_hash: Option<String>,
    pub full_name: String,
    pub avatar_url: Option<String>,
    pub role: UserRole,
    /// Always a JSON object.
    #[sqlx(json)]
    pub preferences: serde_json::Value,
    pub external_issuer: Option<String>,
    pub external_subject: Option<String>,
    pub last_login_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub version: i64,
}

/// The identity of a user at an external OIDC provider (its `iss` and `sub` claims).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalIdentity {
    pub issuer: String,
    pub subject: String,
}

/// How `create_user` picks the role of the new account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleAssignment {
    /// Always this role.
    Exactly(UserRole),
    /// `Admin` when no live user exists yet, otherwise `otherwise`. Decided atomically: two
    /// concurrent first registrations never both become administrators.
    FirstUserIsAdmin { otherwise: UserRole },
}

impl From<UserRole> for RoleAssignment {
    fn from(role: UserRole) -> Self {
        RoleAssignment::Exactly(role)
    }
}

/// The fields of a new account. `email` is lowercased by the store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewUser {
    pub email: String,
    pub password_hash: Option<String>,
    pub full_name: String,
    pub avatar_url: Option<String>,
    pub role: RoleAssignment,
    /// Must be a JSON object.
    pub preferences: serde_json::Value,
    pub external_identity: Option<ExternalIdentity>,
}

impl NewUser {
    /// A plain `USER` account without password, avatar, preferences or external identity.
    pub fn new(email: impl Into<String>, full_name: impl Into<String>) -> Self {
        Self {
            email: email.into(),
            password_hash: None,
            full_name: full_name.into(),
            avatar_url: None,
            role: RoleAssignment::Exactly(UserRole::User),
            preferences: serde_json::Value::Object(serde_json::Map::new()),
            external_identity: None,
        }
    }
}

/// A partial profile update: `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserProfileChanges {
    pub full_name: Option<String>,
    /// `Some(None)` removes the avatar.
    pub avatar_url: Option<Option<String>>,
    /// Replaces the whole preferences object.
    pub preferences: Option<serde_json::Value>,
}

/// The columns `list_users` can sort by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSortField {
    CreatedAt,
    UpdatedAt,
    Email,
    /// Case-insensitive.
    FullName,
}

impl SortField for UserSortField {
    const DEFAULT_ORDER: SortOrder<Self> =
        SortOrder { field: UserSortField::CreatedAt, descending: true };

    fn expression(self) -> &'static str {
        match self {
            UserSortField::CreatedAt => "created_at",
            UserSortField::UpdatedAt => "updated_at",
            UserSortField::Email => "email",
            UserSortField::FullName => "lower(full_name)",
        }
    }
}

/// What `list_users` returns: live users, newest first unless `sort` says otherwise.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserFilter {
    pub page: PageRequest,
    pub sort: Option<SortOrder<UserSortField>>,
    /// Case-insensitive substring of the email or the full name.
    pub search: Option<String>,
    pub role: Option<UserRole>,
}

/// Names the unique constraint a user insert tripped over, the same on both backends:
/// `AlreadyExists("email")` or `AlreadyExists("external_identity")`.
fn name_user_conflict(error: StoreError) -> StoreError {
    let StoreError::AlreadyExists(constraint) = error else { return error };
    if constraint.contains("email") {
        return StoreError::AlreadyExists("email".to_owned());
    }
    if constraint.contains("external") {
        return StoreError::AlreadyExists("external_identity".to_owned());
    }
    StoreError::AlreadyExists(constraint)
}

// ---------------------------------------------------------------------------------------------
// Sessions and refresh tokens
// ---------------------------------------------------------------------------------------------

text_enum! {
    /// Why a session was revoked.
    pub enum SessionRevokeReason {
        Logout => "LOGOUT",
        /// A rotated refresh token was presented again: the family is presumed stolen.
        RefreshReuse => "REFRESH_REUSE",
        PasswordReset => "PASSWORD_RESET",
        Admin => "ADMIN",
        /// The user was (soft-)deleted.
        UserDeleted => "USER_DELETED",
    }
}

/// A refresh-session family. Its id is carried by every access token issued in it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Session {
    pub id: Uuid,
    pub user_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoke_reason: Option<SessionRevokeReason>,
    pub user_agent: Option<String>,
    pub ip_address: Option<String>,
}

/// A new session and its first refresh token, created together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub user_id: Uuid,
    pub expires_at: DateTime<Utc>,
    pub user_agent: Option<String>,
    pub ip_address: Option<String>,
    /// SHA-256 (lowercase hex) of the first refresh token.
    pub refresh_token_hash: String,
    pub refresh_token_expires_at: DateTime<Utc>,
}

/// A revoked session, as replicas need it to refuse its access tokens.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RevokedSession {
    pub session_id: Uuid,
    pub user_id: Uuid,
    pub revoked_at: DateTime<Utc>,
    /// After this the session's tokens are dead anyway, so replicas can forget the entry.
    pub expires_at: DateTime<Utc>,
}

/// One refresh: the presented token is exchanged for a new one in the same session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshTokenRotation {
    /// SHA-256 (lowercase hex) of the token the client presented.
    pub presented_token_hash: String,
    /// SHA-256 (lowercase hex) of the token that replaces it.
    pub new_token_hash: String,
    pub new_token_expires_at: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

/// Why a known, never-used refresh token was refused. Nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshRejection {
    TokenExpired,
    SessionExpired,
    SessionRevoked,
    UserDeleted,
}

/// The result of `rotate_refresh_token`.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per refresh and matched at once, never stored in bulk"
)]
pub enum RotateOutcome {
    /// The presented token is now used, the new one is stored; the session and its live user.
    Rotated { session: Session, user: User },
    /// The presented token had already been rotated (or lost a race to a concurrent rotation):
    /// the whole session is now revoked with `REFRESH_REUSE`.
    Reused { session_id: Uuid, user_id: Uuid },
    /// The token is known but cannot be used; nothing changed.
    Invalid { reason: RefreshRejection },
    /// No token has this hash.
    NotFound,
}

/// The token and session facts rotation decides on, read in one query.
#[derive(sqlx::FromRow)]
struct PresentedRefreshToken {
    session_id: Uuid,
    token_expires_at: DateTime<Utc>,
    used_at: Option<DateTime<Utc>>,
    user_id: Uuid,
    session_expires_at: DateTime<Utc>,
    session_revoked_at: Option<DateTime<Utc>>,
}

impl PresentedRefreshToken {
    /// Why this never-used token cannot be rotated at `now`, if it cannot.
    fn rejection(&self, now: DateTime<Utc>) -> Option<RefreshRejection> {
        if self.session_revoked_at.is_some() {
            return Some(RefreshRejection::SessionRevoked);
        }
        if self.session_expires_at <= now {
            return Some(RefreshRejection::SessionExpired);
        }
        if self.token_expires_at <= now {
            return Some(RefreshRejection::TokenExpired);
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Password reset
// ---------------------------------------------------------------------------------------------

/// A single-use password reset token.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PasswordResetToken {
    pub token_hash: String,
    pub user_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
}

/// A reset token to store for a live user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPasswordResetToken {
    pub user_id: Uuid,
    /// SHA-256 (lowercase hex) of the token sent to the user.
    pub token_hash: String,
    pub expires_at: DateTime<Utc>,
}

/// A whole password reset: consume the token, set the hash, end every session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordReset {
    pub token_hash: String,
    pub new_password_hash: String,
    pub now: DateTime<Utc>,
}

/// The result of `consume_password_reset_token`; only `Reset` changed anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordResetOutcome {
    /// The password is set, the user's other reset tokens are retired and these sessions revoked.
    Reset {
        user_id: Uuid,
        revoked_session_ids: Vec<Uuid>,
    },
    AlreadyUsed,
    Expired,
    /// No token has this hash, or its user is deleted.
    NotFound,
}

// ---------------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------------

/// What an API key may do. Stored as a JSON array of lowercase names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiKeyScope {
    /// Attach as a runner.
    Runner,
    Read,
    Write,
}

/// An API key. The secret itself is never stored; `key_prefix` is safe to display.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApiKey {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub key_prefix: String,
    pub key_hash: String,
    #[sqlx(json)]
    pub scopes: Vec<ApiKeyScope>,
    pub shared: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A key to store for a live user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    pub user_id: Uuid,
    pub name: String,
    /// Unique displayable prefix, for example `tc_7f3a9c21`.
    pub key_prefix: String,
    /// SHA-256 (lowercase hex) of the whole secret.
    pub key_hash: String,
    pub scopes: Vec<ApiKeyScope>,
    pub shared: bool,
    pub expires_at: Option<DateTime<Utc>>,
}

/// What `list_api_keys` returns: newest first, live keys only unless `include_revoked`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiKeyFilter {
    pub page: PageRequest,
    pub include_revoked: bool,
}

/// An API key and its owner, read in one query to authenticate a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyWithOwner {
    pub key: ApiKey,
    pub owner: User,
}

/// `api_keys` joined with its owner, whose columns carry an `owner_` prefix.
#[derive(sqlx::FromRow)]
struct ApiKeyWithOwnerRow {
    #[sqlx(flatten)]
    key: ApiKey,
    owner_email: String,
    owner_password_hash: Option<String>,
    owner_full_name: String,
    owner_avatar_url: Option<String>,
    owner_role: UserRole,
    #[sqlx(json)]
    owner_preferences: serde_json::Value,
    owner_external_issuer: Option<String>,
    owner_external_subject: Option<String>,
    owner_last_login_at: Option<DateTime<Utc>>,
    owner_created_at: DateTime<Utc>,
    owner_updated_at: DateTime<Utc>,
    owner_version: i64,
}

impl From<ApiKeyWithOwnerRow> for ApiKeyWithOwner {
    fn from(row: ApiKeyWithOwnerRow) -> Self {
        let owner = User {
            id: row.key.user_id,
            email: row.owner_email,
            password_hash: row.owner_password_hash,
            full_name: row.owner_full_name,
            avatar_url: row.owner_avatar_url,
            role: row.owner_role,
            preferences: row.owner_preferences,
            external_issuer: row.owner_external_issuer,
            external_subject: row.owner_external_subject,
            last_login_at: row.owner_last_login_at,
            created_at: row.owner_created_at,
            updated_at: row.owner_updated_at,
            // The lookup only joins live owners.
            deleted_at: None,
            version: row.owner_version,
        };
        ApiKeyWithOwner { key: row.key, owner }
    }
}

/// Names the unique constraint an API key insert tripped over, the same on both backends:
/// `AlreadyExists("key_prefix")` or `AlreadyExists("key_hash")`.
fn name_api_key_conflict(error: StoreError) -> StoreError {
    let StoreError::AlreadyExists(constraint) = error else { return error };
    if constraint.contains("key_prefix") {
        return StoreError::AlreadyExists("key_prefix".to_owned());
    }
    if constraint.contains("key_hash") {
        return StoreError::AlreadyExists("key_hash".to_owned());
    }
    StoreError::AlreadyExists(constraint)
}

// ---------------------------------------------------------------------------------------------
// Audit trail
// ---------------------------------------------------------------------------------------------

text_enum! {
    /// Who did it: a signed-in user, a user through one of their API keys, or Turbocat itself.
    pub enum AuditActorKind {
        User => "USER",
        ApiKey => "API_KEY",
        System => "SYSTEM",
    }
}

text_enum! {
    /// Whether the audited action succeeded.
    pub enum AuditOutcome {
        Success => "SUCCESS",
        Failure => "FAILURE",
    }
}

/// One audit entry. Append-only: entries are never updated or deleted (the table has no
/// `updated_at`, `version` or `deleted_at`); `actor_id` becomes `None` if its user is removed.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AuditLog {
    pub id: Uuid,
    pub actor_id: Option<Uuid>,
    pub actor_kind: AuditActorKind,
    /// Dotted name such as `auth.login` or `agent.update`.
    pub action: String,
    pub resource_type: String,
    pub resource_id: Option<String>,
    pub outcome: AuditOutcome,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    /// Before and after of what changed.
    #[sqlx(json(nullable))]
    pub changes: Option<serde_json::Value>,
    /// Always a JSON object.
    #[sqlx(json)]
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// An entry to append; its time is assigned by the store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditLog {
    /// The row's id, a UUIDv7 made with the entry (`new`), so rows keep the order of events.
    pub id: Uuid,
    /// The acting user (for an API key: its owner, with the key id in `metadata`).
    pub actor_id: Option<Uuid>,
    pub actor_kind: AuditActorKind,
    pub action: String,
    pub resource_type: String,
    pub resource_id: Option<String>,
    pub outcome: AuditOutcome,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub changes: Option<serde_json::Value>,
    /// Must be a JSON object.
    pub metadata: serde_json::Value,
}

impl NewAuditLog {
    /// A successful action without actor, request details, changes or metadata.
    pub fn new(
        actor_kind: AuditActorKind,
        action: impl Into<String>,
        resource_type: impl Into<String>,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            actor_id: None,
            actor_kind,
            action: action.into(),
            resource_type: resource_type.into(),
            resource_id: None,
            outcome: AuditOutcome::Success,
            ip_address: None,
            user_agent: None,
            request_id: None,
            changes: None,
            metadata: serde_json::Value::Object(serde_json::Map::new()),
        }
    }
}

/// How `list_audit_logs` matches the action name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditActionFilter {
    Exact(String),
    /// Every action starting with this text, for example `auth.`.
    Prefix(String),
}

/// What `list_audit_logs` returns: newest first, `limit` entries a page (1 to 100).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditLogFilter {
    pub actor_id: Option<Uuid>,
    pub action: Option<AuditActionFilter>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    /// Inclusive lower bound on `created_at`.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper bound on `created_at`.
    pub to: Option<DateTime<Utc>>,
    /// The `next_cursor` of the previous page; `None` for the first page.
    pub cursor: Option<String>,
    pub limit: u32,
}

impl Default for AuditLogFilter {
    fn default() -> Self {
        Self {
            actor_id: None,
            action: None,
            resource_type: None,
            resource_id: None,
            from: None,
            to: None,
            cursor: None,
            limit: PageRequest::DEFAULT_PAGE_SIZE,
        }
    }
}

/// The position after the last entry of a page: its `(created_at, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AuditCursor {
    created_at: DateTime<Utc>,
    id: Uuid,
}

impl AuditCursor {
    fn encode(self) -> String {
        let created_at = self.created_at.to_rfc3339_opts(SecondsFormat::Nanos, true);
        let plain = format!("{created_at}|{}", self.id.simple());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(plain)
    }

    fn decode(cursor: &str) -> StoreResult<Self> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(cursor)
            .map_err(|_| StoreError::InvalidCursor)?;
        let plain = String::from_utf8(bytes).map_err(|_| StoreError::InvalidCursor)?;
        let (created_at, id) = plain.split_once('|').ok_or(StoreError::InvalidCursor)?;
        let created_at = DateTime::parse_from_rfc3339(created_at)
            .map_err(|_| StoreError::InvalidCursor)?
            .with_timezone(&Utc);
        let id = Uuid::try_parse(id).map_err(|_| StoreError::InvalidCursor)?;
        Ok(Self { created_at, id })
    }
}

/// The smallest string greater than every string that starts with `prefix`, so
/// `action >= prefix AND action < bound` is a prefix match served by a plain index range
/// (both backends compare these columns bytewise, which for UTF-8 is code point order).
/// `None` when no such string exists (the prefix is empty or all `char::MAX`).
fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut characters: Vec<char> = prefix.chars().collect();
    while let Some(last) = characters.pop() {
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(next) = next {
            characters.push(next);
            return Some(characters.into_iter().collect());
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Housekeeping
// ---------------------------------------------------------------------------------------------

/// How many rows `purge_expired_identity_rows` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgedIdentityRows {
    /// Sessions (with all their refresh tokens) that expired before the cut-off.
    pub sessions: u64,
    /// Used refresh tokens of live sessions that expired before the cut-off.
    pub refresh_tokens: u64,
    pub password_reset_tokens: u64,
}

// ---------------------------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------------------------

/// Users, sessions, refresh and reset tokens, API keys and the audit trail.
#[async_trait]
pub trait IdentityStore: Send + Sync {
    // Users.

    /// Creates an account. A live account with the same email (any case) is
    /// `AlreadyExists("email")`; with the same external identity,
    /// `AlreadyExists("external_identity")`.
    async fn create_user(&self, new_user: NewUser) -> StoreResult<User>;

    /// A live user by id.
    async fn get_user(&self, user_id: Uuid) -> StoreResult<User>;

    /// A live user by email, compared case-insensitively.
    async fn get_user_by_email(&self, email: &str) -> StoreResult<User>;

    /// A live user by the (issuer, subject) of an external identity.
    async fn get_user_by_external_identity(&self, issuer: &str, subject: &str)
    -> StoreResult<User>;

    /// The number of live users.
    async fn count_users(&self) -> StoreResult<i64>;

    /// Applies the changes when the user is still at `expected_version`.
    async fn update_user_profile(
        &self,
        user_id: Uuid,
        expected_version: i64,
        changes: UserProfileChanges,
    ) -> StoreResult<User>;

    /// Changes the role, version-checked when `expected_version` is given.
    async fn set_user_role(
        &self,
        user_id: Uuid,
        role: UserRole,
        expected_version: Option<i64>,
    ) -> StoreResult<User>;

    /// Replaces the password hash (bumps the version; sessions are the caller's business).
    async fn set_password_hash(&self, user_id: Uuid, password_hash: String) -> StoreResult<()>;

    /// Stamps a successful sign-in; touches nothing else (no version bump).
    async fn record_login(&self, user_id: Uuid, at: DateTime<Utc>) -> StoreResult<()>;

    /// A page of live users.
    async fn list_users(&self, filter: UserFilter) -> StoreResult<Page<User>>;

    /// Soft-deletes the user (version-checked when given) and revokes its live sessions with
    /// `USER_DELETED`, in one transaction. Its email becomes free for a new account.
    async fn soft_delete_user(
        &self,
        user_id: Uuid,
        expected_version: Option<i64>,
    ) -> StoreResult<()>;

    // Sessions and refresh tokens.

    /// Creates a session and its first refresh token in one transaction; the user must be live.
    async fn create_session(&self, new_session: NewSession) -> StoreResult<Session>;

    /// A session by id, revoked or not.
    async fn get_session(&self, session_id: Uuid) -> StoreResult<Session>;

    /// Revokes a session; `Ok(false)` when it was already revoked (the first reason stays).
    async fn revoke_session(
        &self,
        session_id: Uuid,
        reason: SessionRevokeReason,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// Revokes every live (unrevoked, unexpired) session of a user; returns their ids.
    async fn revoke_all_user_sessions(
        &self,
        user_id: Uuid,
        reason: SessionRevokeReason,
        at: DateTime<Utc>,
    ) -> StoreResult<Vec<Uuid>>;

    /// Sessions revoked at or after `since`, oldest revocation first. Replicas poll this (with
    /// some overlap for clock skew) to refuse revoked access tokens before they expire.
    async fn list_revoked_sessions_since(
        &self,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<RevokedSession>>;

    /// Exchanges a refresh token for a new one, detecting reuse; see `RotateOutcome`.
    async fn rotate_refresh_token(
        &self,
        rotation: RefreshTokenRotation,
    ) -> StoreResult<RotateOutcome>;

    /// The session (revoked or not) a refresh token, used or not, belongs to, by the token's
    /// hash; `NotFound` for an unknown hash. Logout reads it; it changes nothing.
    async fn get_session_by_refresh_token(&self, token_hash: &str) -> StoreResult<Session>;

    // Password reset.

    /// Stores a reset token for a live user (`NotFound` otherwise).
    async fn create_password_reset_token(
        &self,
        new_token: NewPasswordResetToken,
    ) -> StoreResult<PasswordResetToken>;

    /// Consumes a reset token and, in the same transaction, sets the new password hash, retires
    /// the user's other reset tokens and revokes all its sessions with `PASSWORD_RESET`.
    async fn consume_password_reset_token(
        &self,
        reset: PasswordReset,
    ) -> StoreResult<PasswordResetOutcome>;

    // API keys.

    /// Stores a key for a live user (`NotFound` otherwise); a taken prefix or hash is
    /// `AlreadyExists("key_prefix")` / `AlreadyExists("key_hash")`.
    async fn create_api_key(&self, new_key: NewApiKey) -> StoreResult<ApiKey>;

    /// A page of keys in scope, newest first.
    async fn list_api_keys(
        &self,
        scope: OwnerScope,
        filter: ApiKeyFilter,
    ) -> StoreResult<Page<ApiKey>>;

    /// An unrevoked key of a live user by hash, with its owner. Expired keys are returned (the
    /// caller checks `expires_at`); revoked keys and keys of deleted users are `NotFound`.
    async fn get_api_key_by_hash(&self, key_hash: &str) -> StoreResult<ApiKeyWithOwner>;

    /// The same as `get_api_key_by_hash`, by the key's id: what re-checks a credential that
    /// was accepted earlier (an attached runner's key).
    async fn get_api_key_with_owner(&self, api_key_id: Uuid) -> StoreResult<ApiKeyWithOwner>;

    /// Revokes a key in scope and returns it; revoking a revoked key keeps the first time.
    async fn revoke_api_key(&self, scope: OwnerScope, api_key_id: Uuid) -> StoreResult<ApiKey>;

    /// Stamps a use of the key with one cheap UPDATE (callers throttle how often).
    async fn touch_api_key_last_used(&self, api_key_id: Uuid, at: DateTime<Utc>)
    -> StoreResult<()>;

    // Audit trail.

    /// Appends an entry.
    async fn append_audit_log(&self, entry: NewAuditLog) -> StoreResult<AuditLog> {
        let mut appended = self.append_audit_logs(std::slice::from_ref(&entry)).await?;
        appended.pop().ok_or_else(|| StoreError::Database(sqlx::Error::RowNotFound))
    }

    /// Appends entries in one statement and one commit: the rows, in no particular order.
    /// Entries share their `created_at`. One bad entry (an actor that does not exist) fails the
    /// whole statement. The audit trail's group commit hands it at most `MAX_WRITE_BATCH`; a
    /// slice far larger (thousands) would pass a backend's limit of bound values.
    async fn append_audit_logs(&self, entries: &[NewAuditLog]) -> StoreResult<Vec<AuditLog>>;

    /// A page of entries, newest first; constant cost however deep the cursor.
    async fn list_audit_logs(&self, filter: AuditLogFilter) -> StoreResult<CursorPage<AuditLog>>;

    // Housekeeping.

    /// Deletes sessions, used refresh tokens and reset tokens that expired before `before`.
    async fn purge_expired_identity_rows(
        &self,
        before: DateTime<Utc>,
    ) -> StoreResult<PurgedIdentityRows>;
}

/// Advisory lock key that serialises "first user is admin" decisions on PostgreSQL (see
/// `Dialect::LOCK_USER_CREATION`).
const USER_CREATION_LOCK_KEY: i64 = 0x7463_2d75_7365_7273; // "tc-users" in ASCII

// ---------------------------------------------------------------------------------------------
// The implementation, written once for both backends
// ---------------------------------------------------------------------------------------------

/// The SELECT of a key joined with its owner (`ApiKeyWithOwnerRow`), without its WHERE.
macro_rules! api_key_with_owner_select {
    () => {
        "SELECT api_keys.id, api_keys.user_id, api_keys.name, api_keys.key_prefix, \
         api_keys.key_hash, api_keys.scopes, api_keys.shared, api_keys.expires_at, \
         api_keys.last_used_at, api_keys.revoked_at, api_keys.created_at, \
         api_keys.updated_at, users.email AS owner_email, \
         users.password_hash AS owner_password_hash, \
         users.full_name AS owner_full_name, users.avatar_url AS owner_avatar_url, \
         users.role AS owner_role, users.preferences AS owner_preferences, \
         users.external_issuer AS owner_external_issuer, \
         users.external_subject AS owner_external_subject, \
         users.last_login_at AS owner_last_login_at, \
         users.created_at AS owner_created_at, users.updated_at AS owner_updated_at, \
         users.version AS owner_version \
         FROM api_keys JOIN users ON users.id = api_keys.user_id"
    };
}

/// The columns of `users`, in `User` field order, as a literal for `concat!`.
macro_rules! user_columns {
    () => {
        "id, email, password_hash, full_name, avatar_url, role, preferences, external_issuer, \
         external_subject, last_login_at, created_at, updated_at, deleted_at, version"
    };
}

/// The columns of `sessions`, in `Session` field order.
macro_rules! session_columns {
    () => {
        "id, user_id, created_at, updated_at, expires_at, revoked_at, revoke_reason, user_agent, \
         ip_address"
    };
}

/// The columns of `api_keys`, in `ApiKey` field order.
macro_rules! api_key_columns {
    () => {
        "id, user_id, name, key_prefix, key_hash, scopes, shared, expires_at, last_used_at, \
         revoked_at, created_at, updated_at"
    };
}

/// The columns of `audit_logs`, in `AuditLog` field order.
macro_rules! audit_log_columns {
    () => {
        "id, actor_id, actor_kind, action, resource_type, resource_id, outcome, ip_address, \
         user_agent, request_id, changes, metadata, created_at"
    };
}

macro_rules! impl_identity_store {
    ($store:ty, $db:ty) => {
        impl $store {
            /// After a version-checked user UPDATE touched nothing: `NotFound` when there is no
            /// live user, otherwise the conflict with its current version.
            async fn explain_missed_user_update(
                connection: &mut <$db as sqlx::Database>::Connection,
                user_id: Uuid,
            ) -> StoreError {
                let current_version = sqlx::query_scalar::<$db, i64>(
                    "SELECT version FROM users WHERE id = $1 AND deleted_at IS NULL",
                )
                .bind(user_id)
                .fetch_optional(connection)
                .await;
                match current_version {
                    Ok(Some(current_version)) => StoreError::VersionConflict { current_version },
                    Ok(None) => StoreError::NotFound,
                    Err(error) => error.into(),
                }
            }

            /// Revokes one session unless it already is; whether this call revoked it.
            async fn revoke_session_on(
                connection: &mut <$db as sqlx::Database>::Connection,
                session_id: Uuid,
                reason: SessionRevokeReason,
                at: DateTime<Utc>,
            ) -> Result<bool, sqlx::Error> {
                let result = sqlx::query::<$db>(
                    "UPDATE sessions SET revoked_at = $1, revoke_reason = $2, updated_at = $1 \
                     WHERE id = $3 AND revoked_at IS NULL",
                )
                .bind(at)
                .bind(reason)
                .bind(session_id)
                .execute(connection)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            /// Revokes every unrevoked, unexpired session of a user; the revoked ids.
            async fn revoke_user_sessions_on(
                connection: &mut <$db as sqlx::Database>::Connection,
                user_id: Uuid,
                reason: SessionRevokeReason,
                at: DateTime<Utc>,
            ) -> Result<Vec<Uuid>, sqlx::Error> {
                sqlx::query_scalar::<$db, Uuid>(
                    "UPDATE sessions SET revoked_at = $1, revoke_reason = $2, updated_at = $1 \
                     WHERE user_id = $3 AND revoked_at IS NULL AND expires_at > $1 RETURNING id",
                )
                .bind(at)
                .bind(reason)
                .bind(user_id)
                .fetch_all(connection)
                .await
            }

            /// Appends the WHERE conditions of `list_users` after `WHERE deleted_at IS NULL`.
            fn push_user_filter(builder: &mut sqlx::QueryBuilder<$db>, filter: &UserFilter) {
                if let Some(role) = filter.role {
                    builder.push(" AND role = ");
                    builder.push_bind(role);
                }
                if let Some(search) = filter.search.as_deref().filter(|text| !text.is_empty()) {
                    let pattern = super::like_pattern(search);
                    builder.push(" AND (lower(email) LIKE ");
                    builder.push_bind(pattern.clone());
                    builder.push(" ESCAPE '\\' OR lower(full_name) LIKE ");
                    builder.push_bind(pattern);
                    builder.push(" ESCAPE '\\')");
                }
            }

            /// Appends the WHERE conditions of `list_audit_logs` after `WHERE 1 = 1`.
            fn push_audit_log_filter(
                builder: &mut sqlx::QueryBuilder<$db>,
                filter: &AuditLogFilter,
            ) -> StoreResult<()> {
                if let Some(actor_id) = filter.actor_id {
                    builder.push(" AND actor_id = ");
                    builder.push_bind(actor_id);
                }
                match &filter.action {
                    None => {}
                    Some(AuditActionFilter::Exact(action)) => {
                        builder.push(" AND action = ");
                        builder.push_bind(action.clone());
                    }
                    Some(AuditActionFilter::Prefix(prefix)) => {
                        builder.push(" AND action >= ");
                        builder.push_bind(prefix.clone());
                        if let Some(upper_bound) = prefix_upper_bound(prefix) {
                            builder.push(" AND action < ");
                            builder.push_bind(upper_bound);
                        }
                    }
                }
                if let Some(resource_type) = &filter.resource_type {
                    builder.push(" AND resource_type = ");
                    builder.push_bind(resource_type.clone());
                }
                if let Some(resource_id) = &filter.resource_id {
                    builder.push(" AND resource_id = ");
                    builder.push_bind(resource_id.clone());
                }
                if let Some(from) = filter.from {
                    builder.push(" AND created_at >= ");
                    builder.push_bind(from);
                }
                if let Some(to) = filter.to {
                    builder.push(" AND created_at < ");
                    builder.push_bind(to);
                }
                if let Some(cursor) = filter.cursor.as_deref() {
                    let cursor = AuditCursor::decode(cursor)?;
                    <$store as Dialect>::push_before_cursor(builder, cursor.created_at, cursor.id);
                }
                Ok(())
            }
        }

        #[async_trait]
        impl IdentityStore for $store {
            async fn create_user(&self, new_user: NewUser) -> StoreResult<User> {
                let mut transaction = self.begin_write_transaction().await?;
                let role = match new_user.role {
                    RoleAssignment::Exactly(role) => role,
                    RoleAssignment::FirstUserIsAdmin { otherwise } => {
                        if let Some(lock) = <$store as Dialect>::LOCK_USER_CREATION {
                            sqlx::query::<$db>(lock)
                                .bind(USER_CREATION_LOCK_KEY)
                                .execute(&mut *transaction)
                                .await?;
                        }
                        let live_users = sqlx::query_scalar::<$db, i64>(
                            "SELECT COUNT(*) FROM users WHERE deleted_at IS NULL",
                        )
                        .fetch_one(&mut *transaction)
                        .await?;
                        if live_users == 0 { UserRole::Admin } else { otherwise }
                    }
                };
                let (external_issuer, external_subject) = match new_user.external_identity {
                    Some(identity) => (Some(identity.issuer), Some(identity.subject)),
                    None => (None, None),
                };
                let user = sqlx::query_as::<$db, User>(concat!(
                    "INSERT INTO users (id, email, password_hash, full_name, avatar_url, role, \
                     preferences, external_issuer, external_subject, created_at, updated_at, \
                     version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, 1) RETURNING ",
                    user_columns!()
                ))
                .bind(Uuid::now_v7())
                .bind(new_user.email.to_lowercase())
                .bind(new_user.password_hash)
                .bind(new_user.full_name)
                .bind(new_user.avatar_url)
                .bind(role)
                .bind(Json(new_user.preferences))
                .bind(external_issuer)
                .bind(external_subject)
                .bind(Utc::now())
                .fetch_one(&mut *transaction)
                .await
                .map_err(|error| name_user_conflict(error.into()))?;
                transaction.commit().await?;
                Ok(user)
            }

            async fn get_user(&self, user_id: Uuid) -> StoreResult<User> {
                sqlx::query_as::<$db, User>(concat!(
                    "SELECT ",
                    user_columns!(),
                    " FROM users WHERE id = $1 AND deleted_at IS NULL"
                ))
                .bind(user_id)
                .fetch_optional(&self.connections)
                .await?
                .ok_or(StoreError::NotFound)
            }

            async fn get_user_by_email(&self, email: &str) -> StoreResult<User> {
                sqlx::query_as::<$db, User>(concat!(
                    "SELECT ",
                    user_columns!(),
                    " FROM users WHERE email = $1 AND deleted_at IS NULL"
                ))
                .bind(email.to_lowercase())
                .fetch_optional(&self.connections)
                .await?
                .ok_or(StoreError::NotFound)
            }

            async fn get_user_by_external_identity(
                &self,
                issuer: &str,
                subject: &str,
            ) -> StoreResult<User> {
                sqlx::query_as::<$db, User>(concat!(
                    "SELECT ",
                    user_columns!(),
                    " FROM users WHERE external_issuer = $1 AND external_subject = $2 \
                     AND deleted_at IS NULL"
                ))
                .bind(issuer.to_owned())
                .bind(subject.to_owned())
                .fetch_optional(&self.connections)
                .await?
                .ok_or(StoreError::NotFound)
            }

            async fn count_users(&self) -> StoreResult<i64> {
                let count = sqlx::query_scalar::<$db, i64>(
                    "SELECT COUNT(*) FROM users WHERE deleted_at IS NULL",
                )
                .fetch_one(&self.connections)
                .await?;
                Ok(count)
            }

            async fn update_user_profile(
                &self,
                user_id: Uuid,
                expected_version: i64,
                changes: UserProfileChanges,
            ) -> StoreResult<User> {
                let mut builder = sqlx::QueryBuilder::<$db>::new("UPDATE users SET updated_at = ");
                builder.push_bind(Utc::now());
                builder.push(", version = version + 1");
                if let Some(full_name) = changes.full_name {
                    builder.push(", full_name = ");
                    builder.push_bind(full_name);
                }
                if let Some(avatar_url) = changes.avatar_url {
                    builder.push(", avatar_url = ");
                    builder.push_bind(avatar_url);
                }
                if let Some(preferences) = changes.preferences {
                    builder.push(", preferences = ");
                    builder.push_bind(Json(preferences));
                }
                builder.push(" WHERE id = ");
                builder.push_bind(user_id);
                builder.push(" AND version = ");
                builder.push_bind(expected_version);
                builder.push(concat!(" AND deleted_at IS NULL RETURNING ", user_columns!()));
                let mut connection = self.connections.acquire().await?;
                let updated =
                    builder.build_query_as::<User>().fetch_optional(&mut *connection).await?;
                match updated {
                    Some(user) => Ok(user),
                    None => {
                        let error =
                            <$store>::explain_missed_user_update(&mut connection, user_id).await;
                        Err(error)
                    }
                }
            }

            async fn set_user_role(
                &self,
                user_id: Uuid,
                role: UserRole,
                expected_version: Option<i64>,
            ) -> StoreResult<User> {
                let mut builder = sqlx::QueryBuilder::<$db>::new("UPDATE users SET role = ");
                builder.push_bind(role);
                builder.push(", updated_at = ");
                builder.push_bind(Utc::now());
                builder.push(", version = version + 1 WHERE id = ");
                builder.push_bind(user_id);
                if let Some(expected_version) = expected_version {
                    builder.push(" AND version = ");
                    builder.push_bind(expected_version);
                }
                builder.push(concat!(" AND deleted_at IS NULL RETURNING ", user_columns!()));
                let mut connection = self.connections.acquire().await?;
                let updated =
                    builder.build_query_as::<User>().fetch_optional(&mut *connection).await?;
                match updated {
                    Some(user) => Ok(user),
                    None => {
                        let error =
                            <$store>::explain_missed_user_update(&mut connection, user_id).await;
                        Err(error)
                    }
                }
            }

            async fn set_password_hash(
                &self,
                user_id: Uuid,
                password_hash: String,
            ) -> StoreResult<()> {
                let result = sqlx::query::<$db>(
                    "UPDATE users SET password_hash = $1, updated_at = $2, version = version + 1 \
                     WHERE id = $3 AND deleted_at IS NULL",
                )
                .bind(password_hash)
                .bind(Utc::now())
                .bind(user_id)
                .execute(&self.connections)
                .await?;
                if result.rows_affected() == 0 {
                    return Err(StoreError::NotFound);
                }
                Ok(())
            }

            async fn record_login(&self, user_id: Uuid, at: DateTime<Utc>) -> StoreResult<()> {
                let result = sqlx::query::<$db>(
                    "UPDATE users SET last_login_at = $1 WHERE id = $2 AND deleted_at IS NULL",
                )
                .bind(at)
                .bind(user_id)
                .execute(&self.connections)
                .await?;
                if result.rows_affected() == 0 {
                    return Err(StoreError::NotFound);
                }
                Ok(())
            }

            async fn list_users(&self, filter: UserFilter) -> StoreResult<Page<User>> {
                let list = PagedList {
                    counted: None,
                    count_statement: "SELECT COUNT(*) FROM users WHERE deleted_at IS NULL",
                    rows_statement: concat!(
                        "SELECT ",
                        user_columns!(),
                        " FROM users WHERE deleted_at IS NULL"
                    ),
                    order: sql_order(filter.sort),
                    page: filter.page,
                };
                fetch_page(&self.connections, &self.totals, list, |builder| {
                    <$store>::push_user_filter(builder, &filter)
                })
                .await
            }

            async fn soft_delete_user(
                &self,
                user_id: Uuid,
                expected_version: Option<i64>,
            ) -> StoreResult<()> {
                let now = Utc::now();
                let mut transaction = self.begin_write_transaction().await?;
                let mut builder =
                    sqlx::QueryBuilder::<$db>::new("UPDATE users SET deleted_at = ");
                builder.push_bind(now);
                builder.push(", updated_at = ");
                builder.push_bind(now);
                builder.push(", version = version + 1 WHERE id = ");
                builder.push_bind(user_id);
                if let Some(expected_version) = expected_version {
                    builder.push(" AND version = ");
                    builder.push_bind(expected_version);
                }
                builder.push(" AND deleted_at IS NULL");
                let deleted = builder.build().execute(&mut *transaction).await?;
                if deleted.rows_affected() == 0 {
                    let error =
                        <$store>::explain_missed_user_update(&mut transaction, user_id).await;
                    transaction.rollback().await?;
                    return Err(error);
                }
                <$store>::revoke_user_sessions_on(
                    &mut transaction,
                    user_id,
                    SessionRevokeReason::UserDeleted,
                    now,
                )
                .await?;
                transaction.commit().await?;
                Ok(())
            }

            async fn create_session(&self, new_session: NewSession) -> StoreResult<Session> {
                let now = Utc::now();
                let mut transaction = self.begin_write_transaction().await?;
                let session = sqlx::query_as::<$db, Session>(concat!(
                    "INSERT INTO sessions (id, user_id, created_at, updated_at, expires_at, \
                     user_agent, ip_address) \
                     SELECT $1, id, $2, $2, $3, $4, $5 FROM users \
                     WHERE id = $6 AND deleted_at IS NULL RETURNING ",
                    session_columns!()
                ))
                .bind(Uuid::now_v7())
                .bind(now)
                .bind(new_session.expires_at)
                .bind(new_session.user_agent)
                .bind(new_session.ip_address)
                .bind(new_session.user_id)
                .fetch_optional(&mut *transaction)
                .await?;
                let Some(session) = session else {
                    transaction.rollback().await?;
                    return Err(StoreError::NotFound);
                };
                sqlx::query::<$db>(
                    "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(new_session.refresh_token_hash)
                .bind(session.id)
                .bind(now)
                .bind(new_session.refresh_token_expires_at)
                .execute(&mut *transaction)
                .await?;
                transaction.commit().await?;
                Ok(session)
            }

            async fn get_session(&self, session_id: Uuid) -> StoreResult<Session> {
                sqlx::query_as::<$db, Session>(concat!(
                    "SELECT ",
                    session_columns!(),
                    " FROM sessions WHERE id = $1"
                ))
                .bind(session_id)
                .fetch_optional(&self.connections)
                .await?
                .ok_or(StoreError::NotFound)
            }

            async fn revoke_session(
                &self,
                session_id: Uuid,
                reason: SessionRevokeReason,
                at: DateTime<Utc>,
            ) -> StoreResult<bool> {
                let mut connection = self.connections.acquire().await?;
                let revoked =
                    <$store>::revoke_session_on(&mut connection, session_id, reason, at).await?;
                if revoked {
                    return Ok(true);
                }
                let exists = sqlx::query_scalar::<$db, i64>(
                    "SELECT COUNT(*) FROM sessions WHERE id = $1",
                )
                .bind(session_id)
                .fetch_one(&mut *connection)
                .await?;
                if exists == 0 {
                    return Err(StoreError::NotFound);
                }
                Ok(false)
            }

            async fn revoke_all_user_sessions(
                &self,
                user_id: Uuid,
                reason: SessionRevokeReason,
                at: DateTime<Utc>,
            ) -> StoreResult<Vec<Uuid>> {
                let mut connection = self.connections.acquire().await?;
                let revoked =
                    <$store>::revoke_user_sessions_on(&mut connection, user_id, reason, at)
                        .await?;
                Ok(revoked)
            }

            async fn list_revoked_sessions_since(
                &self,
                since: DateTime<Utc>,
            ) -> StoreResult<Vec<RevokedSession>> {
                let revoked = sqlx::query_as::<$db, RevokedSession>(
                    "SELECT id AS session_id, user_id, revoked_at, expires_at FROM sessions \
                     WHERE revoked_at IS NOT NULL AND revoked_at >= $1 ORDER BY revoked_at, id",
                )
                .bind(since)
                .fetch_all(&self.connections)
                .await?;
                Ok(revoked)
            }

            async fn rotate_refresh_token(
                &self,
                rotation: RefreshTokenRotation,
            ) -> StoreResult<RotateOutcome> {
                let now = rotation.now;
                let mut transaction = self.begin_write_transaction().await?;
                let presented = sqlx::query_as::<$db, PresentedRefreshToken>(
                    "SELECT refresh_tokens.session_id, refresh_tokens.expires_at AS \
                     token_expires_at, refresh_tokens.used_at, sessions.user_id, \
                     sessions.expires_at AS session_expires_at, \
                     sessions.revoked_at AS session_revoked_at \
                     FROM refresh_tokens JOIN sessions ON sessions.id = refresh_tokens.session_id \
                     WHERE refresh_tokens.token_hash = $1",
                )
                .bind(rotation.presented_token_hash.clone())
                .fetch_optional(&mut *transaction)
                .await?;
                let Some(presented) = presented else {
                    transaction.rollback().await?;
                    return Ok(RotateOutcome::NotFound);
                };
                let reused = RotateOutcome::Reused {
                    session_id: presented.session_id,
                    user_id: presented.user_id,
                };
                if presented.used_at.is_some() {
                    <$store>::revoke_session_on(
                        &mut transaction,
                        presented.session_id,
                        SessionRevokeReason::RefreshReuse,
                        now,
                    )
                    .await?;
                    transaction.commit().await?;
                    return Ok(reused);
                }
                if let Some(reason) = presented.rejection(now) {
                    transaction.rollback().await?;
                    return Ok(RotateOutcome::Invalid { reason });
                }
                let user = sqlx::query_as::<$db, User>(concat!(
                    "SELECT ",
                    user_columns!(),
                    " FROM users WHERE id = $1 AND deleted_at IS NULL"
                ))
                .bind(presented.user_id)
                .fetch_optional(&mut *transaction)
                .await?;
                let Some(user) = user else {
                    transaction.rollback().await?;
                    return Ok(RotateOutcome::Invalid { reason: RefreshRejection::UserDeleted });
                };
                // The guard on used_at makes a concurrent rotation of the same token (which
                // read it unused too) touch no row here: that is reuse as well.
                let marked = sqlx::query::<$db>(
                    "UPDATE refresh_tokens SET used_at = $1 \
                     WHERE token_hash = $2 AND used_at IS NULL",
                )
                .bind(now)
                .bind(rotation.presented_token_hash)
                .execute(&mut *transaction)
                .await?;
                if marked.rows_affected() == 0 {
                    <$store>::revoke_session_on(
                        &mut transaction,
                        presented.session_id,
                        SessionRevokeReason::RefreshReuse,
                        now,
                    )
                    .await?;
                    transaction.commit().await?;
                    return Ok(reused);
                }
                sqlx::query::<$db>(
                    "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(rotation.new_token_hash)
                .bind(presented.session_id)
                .bind(now)
                .bind(rotation.new_token_expires_at)
                .execute(&mut *transaction)
                .await?;
                let session = sqlx::query_as::<$db, Session>(concat!(
                    "UPDATE sessions SET updated_at = $1 WHERE id = $2 RETURNING ",
                    session_columns!()
                ))
                .bind(now)
                .bind(presented.session_id)
                .fetch_one(&mut *transaction)
                .await?;
                transaction.commit().await?;
                Ok(RotateOutcome::Rotated { session, user })
            }

            async fn get_session_by_refresh_token(
                &self,
                token_hash: &str,
            ) -> StoreResult<Session> {
                sqlx::query_as::<$db, Session>(concat!(
                    "SELECT ",
                    session_columns!(),
                    " FROM sessions WHERE id = \
                     (SELECT session_id FROM refresh_tokens WHERE token_hash = $1)"
                ))
                .bind(token_hash.to_owned())
                .fetch_optional(&self.connections)
                .await?
                .ok_or(StoreError::NotFound)
            }

            async fn create_password_reset_token(
                &self,
                new_token: NewPasswordResetToken,
            ) -> StoreResult<PasswordResetToken> {
                sqlx::query_as::<$db, PasswordResetToken>(
                    "INSERT INTO password_reset_tokens (token_hash, user_id, created_at, \
                     expires_at) SELECT $1, id, $2, $3 FROM users \
                     WHERE id = $4 AND deleted_at IS NULL \
                     RETURNING token_hash, user_id, created_at, expires_at, used_at",
                )
                .bind(new_token.token_hash)
                .bind(Utc::now())
                .bind(new_token.expires_at)
                .bind(new_token.user_id)
                .fetch_optional(&self.connections)
                .await?
                .ok_or(StoreError::NotFound)
            }

            async fn consume_password_reset_token(
                &self,
                reset: PasswordReset,
            ) -> StoreResult<PasswordResetOutcome> {
                let now = reset.now;
                let mut transaction = self.begin_write_transaction().await?;
                let token = sqlx::query_as::<$db, PasswordResetToken>(
                    "SELECT token_hash, user_id, created_at, expires_at, used_at \
                     FROM password_reset_tokens WHERE token_hash = $1",
                )
                .bind(reset.token_hash.clone())
                .fetch_optional(&mut *transaction)
                .await?;
                let rejection = match &token {
                    None => Some(PasswordResetOutcome::NotFound),
                    Some(token) if token.used_at.is_some() => {
                        Some(PasswordResetOutcome::AlreadyUsed)
                    }
                    Some(token) if token.expires_at <= now => Some(PasswordResetOutcome::Expired),
                    Some(_) => None,
                };
                if let Some(rejection) = rejection {
                    transaction.rollback().await?;
                    return Ok(rejection);
                }
                // Claim the token first: of two concurrent resets only one passes this guard.
                let claimed = sqlx::query_scalar::<$db, Uuid>(
                    "UPDATE password_reset_tokens SET used_at = $1 \
                     WHERE token_hash = $2 AND used_at IS NULL RETURNING user_id",
                )
                .bind(now)
                .bind(reset.token_hash)
                .fetch_optional(&mut *transaction)
                .await?;
                let Some(user_id) = claimed else {
                    transaction.rollback().await?;
                    return Ok(PasswordResetOutcome::AlreadyUsed);
                };
                let updated = sqlx::query::<$db>(
                    "UPDATE users SET password_hash = $1, updated_at = $2, version = version + 1 \
                     WHERE id = $3 AND deleted_at IS NULL",
                )
                .bind(reset.new_password_hash)
                .bind(now)
                .bind(user_id)
                .execute(&mut *transaction)
                .await?;
                if updated.rows_affected() == 0 {
                    transaction.rollback().await?;
                    return Ok(PasswordResetOutcome::NotFound);
                }
                sqlx::query::<$db>(
                    "UPDATE password_reset_tokens SET used_at = $1 \
                     WHERE user_id = $2 AND used_at IS NULL",
                )
                .bind(now)
                .bind(user_id)
                .execute(&mut *transaction)
                .await?;
                let revoked_session_ids = <$store>::revoke_user_sessions_on(
                    &mut transaction,
                    user_id,
                    SessionRevokeReason::PasswordReset,
                    now,
                )
                .await?;
                transaction.commit().await?;
                Ok(PasswordResetOutcome::Reset { user_id, revoked_session_ids })
            }

            async fn create_api_key(&self, new_key: NewApiKey) -> StoreResult<ApiKey> {
                let now = Utc::now();
                sqlx::query_as::<$db, ApiKey>(concat!(
                    "INSERT INTO api_keys (id, user_id, name, key_prefix, key_hash, scopes, \
                     shared, expires_at, created_at, updated_at) \
                     SELECT $1, id, $2, $3, $4, $5, $6, $7, $8, $8 FROM users \
                     WHERE id = $9 AND deleted_at IS NULL RETURNING ",
                    api_key_columns!()
                ))
                .bind(Uuid::now_v7())
                .bind(new_key.name)
                .bind(new_key.key_prefix)
                .bind(new_key.key_hash)
                .bind(Json(new_key.scopes))
                .bind(new_key.shared)
                .bind(new_key.expires_at)
                .bind(now)
                .bind(new_key.user_id)
                .fetch_optional(&self.connections)
                .await
                .map_err(|error| name_api_key_conflict(error.into()))?
                .ok_or(StoreError::NotFound)
            }

            async fn list_api_keys(
                &self,
                scope: OwnerScope,
                filter: ApiKeyFilter,
            ) -> StoreResult<Page<ApiKey>> {
                let push_filter = |builder: &mut sqlx::QueryBuilder<$db>| {
                    if let Some(owner_id) = scope.owner_id() {
                        builder.push(" AND user_id = ");
                        builder.push_bind(owner_id);
                    }
                    if !filter.include_revoked {
                        builder.push(" AND revoked_at IS NULL");
                    }
                };
                let list = PagedList {
                    counted: None,
                    count_statement: "SELECT COUNT(*) FROM api_keys WHERE 1 = 1",
                    rows_statement: concat!(
                        "SELECT ",
                        api_key_columns!(),
                        " FROM api_keys WHERE 1 = 1"
                    ),
                    order: SortOrder { field: "created_at", descending: true },
                    page: filter.page,
                };
                fetch_page(&self.connections, &self.totals, list, push_filter).await
            }

            async fn get_api_key_by_hash(&self, key_hash: &str) -> StoreResult<ApiKeyWithOwner> {
                let row = sqlx::query_as::<$db, ApiKeyWithOwnerRow>(concat!(
                    api_key_with_owner_select!(),
                    " WHERE api_keys.key_hash = $1 AND api_keys.revoked_at IS NULL \
                     AND users.deleted_at IS NULL"
                ))
                .bind(key_hash.to_owned())
                .fetch_optional(&self.connections)
                .await?;
                row.map(ApiKeyWithOwner::from).ok_or(StoreError::NotFound)
            }

            async fn get_api_key_with_owner(
                &self,
                api_key_id: Uuid,
            ) -> StoreResult<ApiKeyWithOwner> {
                let row = sqlx::query_as::<$db, ApiKeyWithOwnerRow>(concat!(
                    api_key_with_owner_select!(),
                    " WHERE api_keys.id = $1 AND api_keys.revoked_at IS NULL \
                     AND users.deleted_at IS NULL"
                ))
                .bind(api_key_id)
                .fetch_optional(&self.connections)
                .await?;
                row.map(ApiKeyWithOwner::from).ok_or(StoreError::NotFound)
            }

            async fn revoke_api_key(
                &self,
                scope: OwnerScope,
                api_key_id: Uuid,
            ) -> StoreResult<ApiKey> {
                let now = Utc::now();
                let mut builder = sqlx::QueryBuilder::<$db>::new(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ",
                );
                builder.push_bind(now);
                builder.push("), updated_at = ");
                builder.push_bind(now);
                builder.push(" WHERE id = ");
                builder.push_bind(api_key_id);
                if let Some(owner_id) = scope.owner_id() {
                    builder.push(" AND user_id = ");
                    builder.push_bind(owner_id);
                }
                builder.push(concat!(" RETURNING ", api_key_columns!()));
                builder
                    .build_query_as::<ApiKey>()
                    .fetch_optional(&self.connections)
                    .await?
                    .ok_or(StoreError::NotFound)
            }

            async fn touch_api_key_last_used(
                &self,
                api_key_id: Uuid,
                at: DateTime<Utc>,
            ) -> StoreResult<()> {
                let result =
                    sqlx::query::<$db>("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                        .bind(at)
                        .bind(api_key_id)
                        .execute(&self.connections)
                        .await?;
                if result.rows_affected() == 0 {
                    return Err(StoreError::NotFound);
                }
                Ok(())
            }

            async fn append_audit_logs(
                &self,
                entries: &[NewAuditLog],
            ) -> StoreResult<Vec<AuditLog>> {
                if entries.is_empty() {
                    return Ok(Vec::new());
                }
                let created_at = Utc::now();
                let mut builder = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO audit_logs (id, actor_id, actor_kind, action, resource_type, \
                     resource_id, outcome, ip_address, user_agent, request_id, changes, \
                     metadata, created_at) ",
                );
                BatchRows::<$db>::new(entries.len())
                    .column(entries.iter().map(|entry| entry.id))
                    .column(entries.iter().map(|entry| entry.actor_id))
                    .column(entries.iter().map(|entry| entry.actor_kind))
                    .column(entries.iter().map(|entry| entry.action.as_str()))
                    .column(entries.iter().map(|entry| entry.resource_type.as_str()))
                    .column(entries.iter().map(|entry| entry.resource_id.as_deref()))
                    .column(entries.iter().map(|entry| entry.outcome))
                    .column(entries.iter().map(|entry| entry.ip_address.as_deref()))
                    .column(entries.iter().map(|entry| entry.user_agent.as_deref()))
                    .column(entries.iter().map(|entry| entry.request_id.as_deref()))
                    .column(entries.iter().map(|entry| entry.changes.as_ref().map(Json)))
                    .column(entries.iter().map(|entry| Json(&entry.metadata)))
                    .column(entries.iter().map(|_| created_at))
                    .push_rows(&mut builder);
                builder.push(concat!(" RETURNING ", audit_log_columns!()));
                Ok(builder.build_query_as::<AuditLog>().fetch_all(&self.connections).await?)
            }

            async fn list_audit_logs(
                &self,
                filter: AuditLogFilter,
            ) -> StoreResult<CursorPage<AuditLog>> {
                let limit = filter.limit.clamp(1, PageRequest::MAX_PAGE_SIZE);
                let mut builder = sqlx::QueryBuilder::<$db>::new(concat!(
                    "SELECT ",
                    audit_log_columns!(),
                    " FROM audit_logs WHERE 1 = 1"
                ));
                <$store>::push_audit_log_filter(&mut builder, &filter)?;
                // One row more than the page tells whether another page follows.
                builder.push(" ORDER BY created_at DESC, id DESC LIMIT ");
                builder.push_bind(i64::from(limit) + 1);
                let mut items = builder.build_query_as::<AuditLog>().fetch_all(&self.connections).await?;
                let has_more = items.len() > limit as usize;
                items.truncate(limit as usize);
                let next_cursor = match items.last() {
                    Some(last) if has_more => {
                        Some(AuditCursor { created_at: last.created_at, id: last.id }.encode())
                    }
                    _ => None,
                };
                Ok(CursorPage { items, next_cursor })
            }

            async fn purge_expired_identity_rows(
                &self,
                before: DateTime<Utc>,
            ) -> StoreResult<PurgedIdentityRows> {
                let mut transaction = self.begin_write_transaction().await?;
                let sessions = sqlx::query::<$db>("DELETE FROM sessions WHERE expires_at < $1")
                    .bind(before)
                    .execute(&mut *transaction)
                    .await?
                    .rows_affected();
                // A used token is kept to detect its reuse; past its own expiry it could not
                // be rotated anyway, so after the cut-off a replay is simply not found.
                let refresh_tokens = sqlx::query::<$db>(
                    "DELETE FROM refresh_tokens WHERE used_at IS NOT NULL AND expires_at < $1",
                )
                .bind(before)
                .execute(&mut *transaction)
                .await?
                .rows_affected();
                let password_reset_tokens = sqlx::query::<$db>(
                    "DELETE FROM password_reset_tokens WHERE expires_at < $1",
                )
                .bind(before)
                .execute(&mut *transaction)
                .await?
                .rows_affected();
                transaction.commit().await?;
                Ok(PurgedIdentityRows { sessions, refresh_tokens, password_reset_tokens })
            }
        }
    };
}

impl_identity_store!(super::PostgresStore, sqlx::Postgres);
impl_identity_store!(super::SqliteStore, sqlx::Sqlite);
