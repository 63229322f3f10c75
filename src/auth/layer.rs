//! The one authentication layer, in front of the gRPC services (and so of REST, which the
//! edge transcodes through them). It reads `Authorization: Bearer …` or `x-api-key`, decides
//! who the caller is, and leaves an `Authentication` and a `ClientInfo` in the request
//! extensions. It never answers by itself: each operation decides whether it needs a caller.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use uuid::Uuid;

use super::caller::{Authentication, Caller, ClientInfo, Credential};
use super::revocation::RevokedSessions;
use super::tokens::TokenService;
use crate::store::{Store, UserRole};

/// What authentication needs to decide.
pub struct Authenticator {
    pub store: Arc<dyn Store>,
    pub tokens: Arc<TokenService>,
    pub revoked_sessions: Arc<RevokedSessions>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// The configured external identity provider, whose tokens it verifies.
    pub external: Option<Arc<super::external::ExternalVerifier>>,
    /// Which API keys had `last_used_at` stamped recently (one write a minute per key).
    pub api_key_last_used: super::api_keys::LastUsedThrottle,
    /// The in-process runner's credential (`turbocat dev`).
    pub local_runner_key: Option<crate::config::Secret>,
    /// Counts each authenticated caller's API calls for the usage statistics.
    pub api_calls: Arc<super::usage::ApiCallCounter>,
}

impl Authenticator {
    /// Decides who sent `headers` (from `client`, which audit rows it causes name).
    pub async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        client: &ClientInfo,
    ) -> Authentication {
        if let Some(api_key) = header_text(headers, "x-api-key") {
            if let Some(caller) = self.local_runner(api_key) {
                return Authentication::Authenticated(caller);
            }
            return self.authenticate_api_key(api_key).await;
        }
        let Some(authorization) = header_text(headers, "authorization") else {
            return Authentication::Anonymous;
        };
        let Some(token) = authorization
            .strip_prefix("Bearer ")
            .or_else(|| authorization.strip_prefix("bearer "))
            .map(str::trim)
        else {
            return rejected("the authorization header is not a bearer token");
        };
        if token.starts_with(super::API_KEY_PREFIX) {
            return self.authenticate_api_key(token).await;
        }
        if let Some(external) = &self.external
            && external.claims_issuer(token)
        {
            return match external.authenticate(token, client).await {
                Ok(caller) => Authentication::Authenticated(caller),
                Err(error) => rejected(error.to_string()),
            };
        }
        self.authenticate_access_token(token)
    }

    fn authenticate_access_token(&self, token: &str) -> Authentication {
        let claims = match self.tokens.verify_access_token(token) {
            Ok(claims) => claims,
            Err(error) => return rejected(error.to_string()),
        };
        let (Ok(user_id), Ok(session_id), Ok(role)) = (
            Uuid::parse_str(&claims.sub),
            Uuid::parse_str(&claims.sid),
            claims.role.parse::<UserRole>(),
        ) else {
            return rejected("the token's claims are malformed");
        };
        if self.revoked_sessions.is_revoked(session_id) {
            return rejected("the token's session is revoked");
        }
        Authentication::Authenticated(Caller {
            user_id,
            role,
            credential: Credential::Session { session_id },
        })
    }

    /// A key of `ApiKeyService`; see `super::api_keys`.
    /// The in-process runner of `turbocat dev`: a shared runner that may only attach.
    fn local_runner(&self, presented: &str) -> Option<Caller> {
        let expected = self.local_runner_key.as_ref()?;
        let matches: bool = subtle_equal(expected.expose().as_bytes(), presented.as_bytes());
        matches.then(|| Caller {
            user_id: Uuid::nil(),
            role: UserRole::Agent,
            credential: Credential::ApiKey {
                api_key_id: Uuid::nil(),
                scopes: vec![crate::store::ApiKeyScope::Runner],
                shared: true,
            },
        })
    }

    async fn authenticate_api_key(&self, key: &str) -> Authentication {
        super::api_keys::authenticate(self.store.as_ref(), &self.api_key_last_used, key).await
    }

    /// The client's address: the peer, or the first `X-Forwarded-For` hop behind trusted proxies.
    pub fn client_address(
        &self,
        peer: Option<IpAddr>,
        headers: &http::HeaderMap,
    ) -> Option<IpAddr> {
        let peer = peer?;
        if !self.trusted_proxies.contains(&peer) {
            return Some(peer);
        }
        // A trusted proxy that forwards nothing is itself the client.
        let Some(forwarded) = header_text(headers, "x-forwarded-for") else { return Some(peer) };
        // The rightmost address not of a trusted proxy is the client.
        forwarded
            .split(',')
            .rev()
            .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
            .find(|hop| !self.trusted_proxies.contains(hop))
            .or(Some(peer))
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub(crate) fn subtle_equal(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter().zip(right).fold(0u8, |difference, (a, b)| difference | (a ^ b)) == 0
}

fn rejected(reason: impl Into<String>) -> Authentication {
    Authentication::Rejected { reason: reason.into() }
}

fn header_text<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|text| !text.is_empty())
}

/// The middleware: authenticates and records the client, then hands the request on.
pub async fn authenticate(
    State(authenticator): State<Arc<Authenticator>>,
    mut request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip());
    let client = ClientInfo {
        ip_address: authenticator.client_address(peer, headers),
        user_agent: header_text(headers, "user-agent").map(str::to_owned),
        request_id: header_text(headers, crate::auth::caller::REQUEST_ID_HEADER).map(str::to_owned),
    };
    let authentication = authenticator.authenticate(headers, &client).await;
    match &authentication {
        Authentication::Rejected { reason } => {
            tracing::debug!(reason = %reason, "credentials refused");
        }
        // Runners' own traffic (their stream) is not a user's API usage.
        Authentication::Authenticated(caller) if caller.role != UserRole::Agent => {
            authenticator.api_calls.record(caller.user_id);
        }
        Authentication::Authenticated(_)
        | Authentication::Anonymous
        | Authentication::Unavailable => {}
    }
    if let (Authentication::Authenticated(caller), Some(record)) =
        (&authentication, request.extensions().get::<super::caller::CallerRecord>())
    {
        record.record(caller.user_id);
    }
    request.extensions_mut().insert(client);
    request.extensions_mut().insert(authentication);
    next.run(request).await
}
