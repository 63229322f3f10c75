//! Who is calling: the `Caller` the auth layer puts on every authenticated request, and the
//! `ClientInfo` (address, agent, request id) every request carries. Services read both from the
//! request extensions; they never parse credentials themselves.

use std::net::IpAddr;

use uuid::Uuid;

use crate::error::{ServiceError, ServiceResult};
use crate::store::{ApiKeyScope, OwnerScope, UserRole};

/// The header that carries a request's id: set (or kept) by the edges, read by the auth layer
/// into `ClientInfo`, echoed in every response and in the REST envelope's `meta.requestId`.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// How the caller proved who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// An access token of one of our sessions.
    Session { session_id: Uuid },
    /// An API key; its scopes never exceed its owner's rights.
    ApiKey { api_key_id: Uuid, scopes: Vec<ApiKeyScope>, shared: bool },
    /// A token of a configured external identity provider.
    External { issuer: String },
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
    /// The effective role: an API key whose only scope is `runner` acts as `Agent`.
    pub role: UserRole,
    pub credential: Credential,
}

impl Caller {
    /// The rows this caller may see: everything for an admin, their own otherwise.
    pub fn owner_scope(&self) -> OwnerScope {
        match self.role {
            UserRole::Admin => OwnerScope::All,
            _ => OwnerScope::Owner(self.user_id),
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == UserRole::Admin
    }

    /// Refuses callers that are not administrators.
    pub fn require_admin(&self) -> ServiceResult<()> {
        if self.is_admin() {
            return Ok(());
        }
        Err(ServiceError::forbidden("this operation needs the admin role"))
    }

    /// Refuses API keys: managing keys needs a person signed in (an access token of one of our
    /// sessions or of the external identity provider), so a leaked key can neither mint more
    /// keys nor leave a child that outlives its own revocation.
    pub fn require_interactive_session(&self) -> ServiceResult<()> {
        if matches!(self.credential, Credential::ApiKey { .. }) {
            return Err(ServiceError::forbidden(
                "managing API keys needs a signed-in session, not an API key",
            ));
        }
        Ok(())
    }

    /// Refuses runner-only keys, and keys without the scope the operation needs.
    pub fn require_user_access(&self, access: Access) -> ServiceResult<()> {
        if self.role == UserRole::Agent {
            return Err(ServiceError::forbidden("a runner key may only attach runners"));
        }
        let Credential::ApiKey { scopes, .. } = &self.credential else { return Ok(()) };
        let needed = match access {
            Access::Read => ApiKeyScope::Read,
            Access::Write => ApiKeyScope::Write,
        };
        // A write key may also read.
        let allowed = scopes.contains(&needed)
            || (access == Access::Read && scopes.contains(&ApiKeyScope::Write));
        if allowed {
            return Ok(());
        }
        Err(ServiceError::forbidden(
            format!("this API key lacks the {needed:?} scope").to_lowercase(),
        ))
    }
}

/// What an operation does with the caller's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// What the auth layer concluded about a request's credentials.
#[derive(Debug, Clone)]
pub enum Authentication {
    /// No credentials were sent.
    Anonymous,
    Authenticated(Caller),
    /// Credentials were sent and refused; the reason is for logs only, never for the caller.
    Rejected {
        reason: String,
    },
    /// Credentials were sent and could not be checked: the database is unreachable. Operations
    /// that need a caller answer 503 SERVICE_UNAVAILABLE (never 401: the key may be good).
    Unavailable,
}

/// Where a request came from.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// The client's address: the peer, or `X-Forwarded-For` when the peer is a trusted proxy.
    pub ip_address: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
}

/// A slot the edge leaves on a request for the auth layer to write the caller's id into, so the
/// access log line written after the answer can name who called (REST requests reach the layer
/// on an inner request that carries the same extensions).
#[derive(Debug, Clone, Default)]
pub struct CallerRecord(std::sync::Arc<std::sync::OnceLock<Uuid>>);

impl CallerRecord {
    pub fn record(&self, user_id: Uuid) {
        let _ = self.0.set(user_id);
    }

    pub fn user_id(&self) -> Option<Uuid> {
        self.0.get().copied()
    }
}

/// The caller of a request, or UNAUTHORIZED (the message is the same whatever went wrong), or
/// SERVICE_UNAVAILABLE when the credentials could not be checked.
pub fn caller_of<T>(request: &tonic::Request<T>) -> ServiceResult<Caller> {
    match request.extensions().get::<Authentication>() {
        Some(Authentication::Authenticated(caller)) => Ok(caller.clone()),
        Some(Authentication::Unavailable) => Err(ServiceError::new(
            crate::error::ErrorCode::ServiceUnavailable,
            "the credentials cannot be checked now (the database is unavailable); try again in a few seconds",
        )
        .with_retry_after(crate::error::DATABASE_RETRY_AFTER)),
        _ => Err(ServiceError::unauthorized("authentication required")),
    }
}

/// The client information of a request (empty if the layer did not run).
pub fn client_of<T>(request: &tonic::Request<T>) -> ClientInfo {
    request.extensions().get::<ClientInfo>().cloned().unwrap_or_default()
}
