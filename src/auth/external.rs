//! External identity (OIDC, Supabase Auth): verifies bearer JWTs of one configured issuer
//! against its JWKS and maps their `sub` to a local user, created on first sight.
//! Creating a user writes an `auth.external_user_created` audit row; each user's
//! `last_login_at` is stamped at most once per `LAST_LOGIN_INTERVAL` (throttled here, in memory).
//! May call: the store; the issuer's JWKS URL over HTTP(S).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::Digest;

use uuid::Uuid;

use super::caller::{Caller, ClientInfo, Credential};
use crate::store::{
    AuditActorKind, AuditOutcome, ExternalIdentity, NewAuditLog, NewUser, RoleAssignment, Store,
    StoreError, User, UserRole,
};

/// How long a fetched JWKS is trusted before it is fetched again.
pub const DEFAULT_JWKS_CACHE_TTL: Duration = Duration::from_secs(10 * 60);
/// The JWKS is never fetched more often than this, whatever tokens arrive.
pub const DEFAULT_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(5);
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;
/// A JWKS larger than this is refused.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Emails of users whose provider gave none (or an unverified one) end with this.
const PLACEHOLDER_EMAIL_DOMAIN: &str = "external.invalid";
/// A user's `last_login_at` is written at most once per this interval (tokens arrive with
/// every request; one write per request would be a write per call).
pub const LAST_LOGIN_INTERVAL: Duration = Duration::from_secs(60);
/// Above this many remembered users, stamps older than `LAST_LOGIN_INTERVAL` are swept out.
const LAST_LOGIN_SWEEP_THRESHOLD: usize = 10_000;

/// Settings of the external identity provider.
#[derive(Debug, Clone)]
pub struct ExternalIdentitySettings {
    pub jwks_url: url::Url,
    /// The exact `iss` of the provider's tokens.
    pub issuer: String,
    /// The `aud` our tokens must carry.
    pub audience: String,
    pub cache_ttl: Duration,
    pub min_refetch_interval: Duration,
}

/// Why an external token was refused; for logs only, never for the caller.
#[derive(Debug, thiserror::Error)]
pub enum ExternalTokenError {
    #[error("the external token is invalid: {0}")]
    Invalid(String),
    #[error("the external token names no key id")]
    MissingKeyId,
    #[error("the issuer's key set has no usable key {key_id}")]
    UnknownKey { key_id: String },
    #[error("the token's algorithm {token:?} is not the key's {key:?}")]
    AlgorithmMismatch { token: Algorithm, key: Algorithm },
    #[error("the external identity's email belongs to another account")]
    EmailTaken,
    #[error("the local user of the external identity cannot be read or created")]
    Store(#[source] StoreError),
}

/// A verification key of the issuer, with the one algorithm it may be used with.
#[derive(Clone)]
struct VerificationKey {
    key: DecodingKey,
    algorithm: Algorithm,
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, VerificationKey>,
    /// When the keys were last fetched successfully.
    fetched_at: Option<Instant>,
    /// When a fetch was last started, successful or not.
    attempted_at: Option<Instant>,
}

/// The claims read from an external token (beyond those `Validation` checks).
#[derive(Debug, Deserialize)]
struct ExternalClaims {
    sub: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<bool>,
    #[serde(default)]
    name: Option<String>,
    /// Supabase Auth puts profile fields here.
    #[serde(default)]
    user_metadata: Option<UserMetadata>,
}

#[derive(Debug, Default, Deserialize)]
struct UserMetadata {
    #[serde(default)]
    full_name: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    avatar_url: Option<String>,
}

#[derive(Deserialize)]
struct IssuerOnly {
    #[serde(default)]
    iss: Option<String>,
}

/// Verifies the tokens of one external issuer and maps them to local users.
pub struct ExternalVerifier {
    settings: ExternalIdentitySettings,
    store: Arc<dyn Store>,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<KeyCache>,
    /// When each user's `last_login_at` was last written by this process.
    last_login_stamped: std::sync::Mutex<HashMap<Uuid, Instant>>,
}

/// The local user of an external identity, and whether this request created it.
struct LocalUser {
    user: User,
    created: bool,
}

impl ExternalVerifier {
    pub fn new(
        settings: ExternalIdentitySettings,
        store: Arc<dyn Store>,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()?;
        Ok(Self {
            settings,
            store,
            http,
            cache: tokio::sync::Mutex::new(KeyCache::default()),
            last_login_stamped: std::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// Whether the token's unverified `iss` is this issuer: such tokens are verified here.
    pub fn claims_issuer(&self, token: &str) -> bool {
        jsonwebtoken::dangerous::insecure_decode_claims::<IssuerOnly>(token)
            .ok()
            .and_then(|claims| claims.iss)
            .is_some_and(|issuer| issuer == self.settings.issuer)
    }

    /// Verifies `token` (sent by `client`) and returns its local caller, creating the user on
    /// first sight (audited) and stamping its last login (throttled).
    pub async fn authenticate(
        &self,
        token: &str,
        client: &ClientInfo,
    ) -> Result<Caller, ExternalTokenError> {
        let claims = self.verify(token).await?;
        let LocalUser { user, created } = self.local_user(&claims).await?;
        if created {
            self.audit_user_created(&user, client).await;
        }
        self.stamp_last_login(user.id).await;
        Ok(Caller {
            user_id: user.id,
            role: user.role,
            credential: Credential::External { issuer: self.settings.issuer.clone() },
        })
    }

    async fn verify(&self, token: &str) -> Result<ExternalClaims, ExternalTokenError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| ExternalTokenError::Invalid(error.to_string()))?;
        let key_id = header.kid.ok_or(ExternalTokenError::MissingKeyId)?;
        let key = self.key(&key_id).await?;
        // The key decides the algorithm: a token cannot pick a weaker or symmetric one.
        if header.alg != key.algorithm {
            return Err(ExternalTokenError::AlgorithmMismatch {
                token: header.alg,
                key: key.algorithm,
            });
        }
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<ExternalClaims>(token, &key.key, &validation)
            .map_err(|error| ExternalTokenError::Invalid(error.to_string()))?;
        if data.claims.sub.trim().is_empty() {
            return Err(ExternalTokenError::Invalid("the subject is empty".to_owned()));
        }
        Ok(data.claims)
    }

    /// The key `key_id`: from the cache while it is fresh, else fetched (at most once per
    /// `min_refetch_interval`, so unknown key ids cannot make us hammer the issuer).
    async fn key(&self, key_id: &str) -> Result<VerificationKey, ExternalTokenError> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        let fresh = cache
            .fetched_at
            .is_some_and(|fetched_at| now.duration_since(fetched_at) < self.settings.cache_ttl);
        if fresh && let Some(key) = cache.keys.get(key_id) {
            return Ok(key.clone());
        }
        let may_fetch = cache.attempted_at.is_none_or(|attempted_at| {
            now.duration_since(attempted_at) >= self.settings.min_refetch_interval
        });
        if may_fetch {
            cache.attempted_at = Some(now);
            match self.fetch_keys().await {
                Ok(keys) => {
                    tracing::info!(keys = keys.len(), issuer = %self.settings.issuer, "fetched the external issuer's key set");
                    cache.keys = keys;
                    cache.fetched_at = Some(now);
                }
                // Keys fetched before stay usable: a provider outage must not log everyone out.
                Err(error) => tracing::warn!(
                    error = %error,
                    jwks_url = %self.settings.jwks_url,
                    "cannot fetch the external issuer's key set"
                ),
            }
        }
        cache
            .keys
            .get(key_id)
            .cloned()
            .ok_or_else(|| ExternalTokenError::UnknownKey { key_id: key_id.to_owned() })
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, VerificationKey>, String> {
        let response = self
            .http
            .get(self.settings.jwks_url.clone())
            .send()
            .await
            .map_err(|error| error.to_string())?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("the key set url answered {status}"));
        }
        let body = response.bytes().await.map_err(|error| error.to_string())?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!("the key set is larger than {MAX_JWKS_BYTES} bytes"));
        }
        parse_key_set(&body)
    }

    /// Appends the `auth.external_user_created` row; a failure is logged, never the caller's.
    async fn audit_user_created(&self, user: &User, client: &ClientInfo) {
        let entry = NewAuditLog {
            id: Uuid::now_v7(),
            actor_id: Some(user.id),
            actor_kind: AuditActorKind::User,
            action: "auth.external_user_created".to_owned(),
            resource_type: "user".to_owned(),
            resource_id: Some(user.id.to_string()),
            outcome: AuditOutcome::Success,
            ip_address: client.ip_address.map(|address| address.to_string()),
            user_agent: client.user_agent.clone(),
            request_id: client.request_id.clone(),
            changes: None,
            metadata: serde_json::json!({ "issuer": self.settings.issuer }),
        };
        if let Err(error) = self.store.append_audit_log(entry).await {
            tracing::error!(%error, user_id = %user.id, "could not write the audit row of an external user");
        }
    }

    /// Writes `last_login_at` of `user_id` unless this process did within `LAST_LOGIN_INTERVAL`.
    async fn stamp_last_login(&self, user_id: Uuid) {
        let now = Instant::now();
        let due = {
            // A poisoned lock only means another request panicked; the stamps are still usable.
            let mut stamped =
                self.last_login_stamped.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if stamped.len() > LAST_LOGIN_SWEEP_THRESHOLD {
                stamped.retain(|_, at| now.duration_since(*at) < LAST_LOGIN_INTERVAL);
            }
            let due = stamped
                .get(&user_id)
                .is_none_or(|at| now.duration_since(*at) >= LAST_LOGIN_INTERVAL);
            if due {
                stamped.insert(user_id, now);
            }
            due
        };
        if !due {
            return;
        }
        if let Err(error) = self.store.record_login(user_id, chrono::Utc::now()).await {
            tracing::warn!(%error, user_id = %user_id, "could not record the login of an external user");
            // Let the next request try again.
            self.last_login_stamped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&user_id);
        }
    }

    async fn local_user(&self, claims: &ExternalClaims) -> Result<LocalUser, ExternalTokenError> {
        let issuer = &self.settings.issuer;
        match self.store.get_user_by_external_identity(issuer, &claims.sub).await {
            Ok(user) => return Ok(LocalUser { user, created: false }),
            Err(StoreError::NotFound) => {}
            Err(error) => return Err(ExternalTokenError::Store(error)),
        }
        let email = self.email_for(claims);
        // Never merge with a local account: whoever controls the provider's email claim
        // would otherwise take that account over.
        match self.store.get_user_by_email(&email).await {
            // A concurrent first request of the same identity created it just now.
            Ok(existing)
                if existing.external_issuer.as_deref() == Some(issuer.as_str())
                    && existing.external_subject.as_deref() == Some(claims.sub.as_str()) =>
            {
                return Ok(LocalUser { user: existing, created: false });
            }
            Ok(existing) => {
                tracing::warn!(
                    issuer = %issuer,
                    existing_user_id = %existing.id,
                    "refused an external identity whose email belongs to another account"
                );
                return Err(ExternalTokenError::EmailTaken);
            }
            Err(StoreError::NotFound) => {}
            Err(error) => return Err(ExternalTokenError::Store(error)),
        }
        let metadata = claims.user_metadata.as_ref();
        let full_name = metadata
            .and_then(|metadata| metadata.full_name.clone().or_else(|| metadata.name.clone()))
            .or_else(|| claims.name.clone())
            .map(|name| name.trim().chars().take(200).collect::<String>())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| email.split('@').next().unwrap_or("external user").to_owned());
        let avatar_url = metadata
            .and_then(|metadata| metadata.avatar_url.clone())
            .filter(|url| url.starts_with("https://") && url.len() <= 2048);
        let new_user = NewUser {
            email,
            password_hash: None,
            full_name,
            avatar_url,
            role: RoleAssignment::Exactly(UserRole::User),
            preferences: serde_json::Value::Object(serde_json::Map::new()),
            external_identity: Some(ExternalIdentity {
                issuer: issuer.clone(),
                subject: claims.sub.clone(),
            }),
        };
        match self.store.create_user(new_user).await {
            Ok(user) => {
                tracing::info!(user_id = %user.id, issuer = %issuer, "created the local user of an external identity");
                Ok(LocalUser { user, created: true })
            }
            // Two first requests at once: the other one created it.
            Err(StoreError::AlreadyExists(what)) => {
                match self.store.get_user_by_external_identity(issuer, &claims.sub).await {
                    Ok(user) => Ok(LocalUser { user, created: false }),
                    Err(_) => {
                        tracing::warn!(issuer = %issuer, duplicate = %what, "refused an external identity that collides with another account");
                        Err(ExternalTokenError::EmailTaken)
                    }
                }
            }
            Err(error) => Err(ExternalTokenError::Store(error)),
        }
    }

    /// The provider's verified email, or a placeholder derived from the identity.
    fn email_for(&self, claims: &ExternalClaims) -> String {
        let verified_email = claims
            .email
            .as_deref()
            .map(|email| email.trim().to_lowercase())
            .filter(|_| claims.email_verified != Some(false))
            .filter(|email| is_plausible_email(email));
        verified_email.unwrap_or_else(|| {
            let digest = sha2::Sha256::digest(
                format!("{}\n{}", self.settings.issuer, claims.sub).as_bytes(),
            );
            format!("external-{}@{PLACEHOLDER_EMAIL_DOMAIN}", hex::encode(&digest[..12]))
        })
    }
}

fn is_plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else { return false };
    email.len() <= 254
        && !local.is_empty()
        && domain.contains('.')
        && !email.chars().any(|character| character.is_whitespace() || character.is_control())
}

/// The usable signature keys of a JWKS document, by key id. Keys without an id, symmetric
/// keys, encryption keys and unsupported ones are skipped.
fn parse_key_set(body: &[u8]) -> Result<HashMap<String, VerificationKey>, String> {
    #[derive(Deserialize)]
    struct RawKeySet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawKeySet = serde_json::from_slice(body)
        .map_err(|error| format!("the key set is not a JWKS: {error}"))?;
    let mut keys = HashMap::new();
    for value in raw.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else { continue };
        let Some(key_id) = jwk.common.key_id.clone() else { continue };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let Some(algorithm) = algorithm_of(&jwk) else { continue };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else { continue };
        keys.insert(key_id, VerificationKey { key, algorithm });
    }
    Ok(keys)
}

/// The one asymmetric algorithm a key is used with: its `alg`, else the default of its type.
fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (_, Some(KeyAlgorithm::HS256 | KeyAlgorithm::HS384 | KeyAlgorithm::HS512)) => return None,
        (_, Some(declared)) => Algorithm::try_from(declared).ok()?,
        (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
        (AlgorithmParameters::OctetKeyPair(parameters), None)
            if parameters.curve == EllipticCurve::Ed25519 =>
        {
            Algorithm::EdDSA
        }
        (AlgorithmParameters::EllipticCurve(parameters), None) => match parameters.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        _ => return None,
    };
    let family_matches = matches!(
        (&jwk.algorithm, algorithm),
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ) | (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA)
            | (AlgorithmParameters::EllipticCurve(_), Algorithm::ES256 | Algorithm::ES384)
    );
    family_matches.then_some(algorithm)
}
