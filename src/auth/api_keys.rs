//! API keys: making a new key, telling a well-formed key from noise, and authenticating a
//! request that carries one. May call: the store.
//!
//! A key reads `tc_<8 hex>_<43 base64url>`: the first part (`tc_7f3a9c21`) is its public prefix,
//! safe to show; the rest is 32 random bytes. Only the SHA-256 of the whole key is stored.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::API_KEY_PREFIX;
use super::caller::{Authentication, Caller, Credential};
use super::tokens::hash_opaque_token;
use crate::store::{ApiKeyScope, Store, StoreError, UserRole};

/// Hex characters of the random part of the public prefix.
const PREFIX_HEX_CHARS: usize = 8;
/// Random bytes of the secret part.
const SECRET_BYTES: usize = 32;
/// Base64url characters (no padding) that encode `SECRET_BYTES`.
const SECRET_CHARS: usize = 43;
/// `last_used_at` is written at most this often per key.
pub const LAST_USED_INTERVAL: Duration = Duration::from_secs(60);
/// Above this many remembered keys, entries older than `LAST_USED_INTERVAL` are dropped.
const THROTTLE_PRUNE_THRESHOLD: usize = 10_000;

/// A freshly made key. `key` is the secret: show it once, never log or store it.
pub struct GeneratedApiKey {
    pub key: String,
    /// The public prefix, e.g. `tc_7f3a9c21`.
    pub prefix: String,
    /// Lowercase hex SHA-256 of `key`: what the store keeps.
    pub hash: String,
}

impl std::fmt::Debug for GeneratedApiKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GeneratedApiKey")
            .field("key", &"[redacted]")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Makes a new random key.
pub fn generate_api_key() -> GeneratedApiKey {
    let mut prefix_bytes = [0u8; PREFIX_HEX_CHARS / 2];
    rand::Rng::fill(&mut rand::rng(), &mut prefix_bytes);
    let mut secret_bytes = [0u8; SECRET_BYTES];
    rand::Rng::fill(&mut rand::rng(), &mut secret_bytes);
    let prefix = format!("{API_KEY_PREFIX}{}", hex::encode(prefix_bytes));
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret_bytes);
    let key = format!("{prefix}_{secret}");
    let hash = hash_opaque_token(&key);
    debug_assert!(is_well_formed(&key), "a generated key has the documented shape");
    GeneratedApiKey { key, prefix, hash }
}

/// Whether `text` has the shape of a key this server makes (no store lookup needed to refuse
/// anything else).
pub fn is_well_formed(text: &str) -> bool {
    let Some(rest) = text.strip_prefix(API_KEY_PREFIX) else { return false };
    let Some((prefix_hex, secret)) = rest.split_once('_') else { return false };
    prefix_hex.len() == PREFIX_HEX_CHARS
        && prefix_hex.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
        && secret.len() == SECRET_CHARS
        && secret.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
}

/// The role a key acts with: its owner's, except that a key whose only scope is `runner` is
/// an `Agent` (it may attach runners and nothing else). Never more than the owner's.
pub fn effective_role(owner_role: UserRole, scopes: &[ApiKeyScope]) -> UserRole {
    let runner_only =
        !scopes.is_empty() && scopes.iter().all(|scope| *scope == ApiKeyScope::Runner);
    if runner_only { UserRole::Agent } else { owner_role }
}

/// Remembers when each key's `last_used_at` was last written, so a busy key costs one UPDATE a
/// minute rather than one per request.
#[derive(Default)]
pub struct LastUsedThrottle {
    written_at: Mutex<HashMap<Uuid, Instant>>,
}

impl LastUsedThrottle {
    /// True when the key's last use should be written now (and notes that it is).
    pub fn should_write(&self, api_key_id: Uuid, now: Instant) -> bool {
        let Ok(mut written_at) = self.written_at.lock() else { return false };
        if let Some(previous) = written_at.get(&api_key_id)
            && now.saturating_duration_since(*previous) < LAST_USED_INTERVAL
        {
            return false;
        }
        if written_at.len() >= THROTTLE_PRUNE_THRESHOLD {
            written_at.retain(|_, previous| {
                now.saturating_duration_since(*previous) < LAST_USED_INTERVAL
            });
        }
        written_at.insert(api_key_id, now);
        true
    }
}

/// Decides who sends `key`: the key's owner, with the key's effective role, when the key is
/// well-formed, known, unrevoked, unexpired and its owner is live.
pub async fn authenticate(
    store: &dyn Store,
    throttle: &LastUsedThrottle,
    key: &str,
) -> Authentication {
    authenticate_at(store, throttle, key, Utc::now()).await
}

/// `authenticate` with an explicit throttle and clock.
pub async fn authenticate_at(
    store: &dyn Store,
    throttle: &LastUsedThrottle,
    key: &str,
    now: DateTime<Utc>,
) -> Authentication {
    if !is_well_formed(key) {
        return rejected("the api key is malformed");
    }
    let found = match store.get_api_key_by_hash(&hash_opaque_token(key)).await {
        Ok(found) => found,
        // Revoked keys and keys of deleted owners are not found either.
        Err(StoreError::NotFound) => return rejected("the api key is unknown or revoked"),
        // The database is away: the key is not judged (a runner told "unauthenticated" would
        // stop for good); the request answers 503 and is tried again.
        Err(error) if error.is_unavailable() => {
            tracing::debug!(%error, "could not look up an api key: the database is unreachable");
            return Authentication::Unavailable;
        }
        Err(error) => {
            tracing::error!(%error, "could not look up an api key");
            return rejected(STORE_UNAVAILABLE);
        }
    };
    let checked = match caller_of_key(found, now) {
        Ok(caller) => caller,
        Err(reason) => return rejected(reason),
    };
    if let Credential::ApiKey { api_key_id, .. } = &checked.credential
        && throttle.should_write(*api_key_id, Instant::now())
        && let Err(error) = store.touch_api_key_last_used(*api_key_id, now).await
    {
        tracing::warn!(%error, api_key_id = %api_key_id, "could not stamp an api key's last use");
    }
    Authentication::Authenticated(checked)
}

/// Whether a key accepted earlier (say, the key an attached runner presented) still stands at
/// `now`: the caller it acts as today, or why it no longer does.
pub async fn recheck(
    store: &dyn Store,
    api_key_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Caller, &'static str> {
    match store.get_api_key_with_owner(api_key_id).await {
        Ok(found) => caller_of_key(found, now),
        Err(StoreError::NotFound) => Err("the api key is unknown or revoked"),
        // Every re-check of an outage meets it; the key is not judged meanwhile.
        Err(error) if error.is_unavailable() => {
            tracing::debug!(%error, %api_key_id, "could not look up an api key: the database is unreachable");
            Err(STORE_UNAVAILABLE)
        }
        Err(error) => {
            tracing::error!(%error, %api_key_id, "could not look up an api key");
            Err(STORE_UNAVAILABLE)
        }
    }
}

/// The reason `recheck` gives when the store could not answer (the key is not judged then).
pub const STORE_UNAVAILABLE: &str = "the api key could not be checked";

/// The caller a key found in the store acts as at `now`, or why it acts as no one.
fn caller_of_key(
    found: crate::store::ApiKeyWithOwner,
    now: DateTime<Utc>,
) -> Result<Caller, &'static str> {
    let api_key = found.key;
    if api_key.revoked_at.is_some() || found.owner.deleted_at.is_some() {
        return Err("the api key is revoked or its owner is deleted");
    }
    if api_key.expires_at.is_some_and(|expires_at| expires_at <= now) {
        return Err("the api key has expired");
    }
    let owner_is_admin = found.owner.role == UserRole::Admin;
    Ok(Caller {
        user_id: found.owner.id,
        role: effective_role(found.owner.role, &api_key.scopes),
        credential: Credential::ApiKey {
            api_key_id: api_key.id,
            // A shared key serves everyone only while its owner is still an administrator.
            shared: api_key.shared && owner_is_admin,
            scopes: api_key.scopes,
        },
    })
}

fn rejected(reason: &str) -> Authentication {
    Authentication::Rejected { reason: reason.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape_and_differ() {
        let first = generate_api_key();
        let second = generate_api_key();
        assert!(first.key.starts_with(&format!("{}_", first.prefix)));
        assert_eq!(first.prefix.len(), API_KEY_PREFIX.len() + PREFIX_HEX_CHARS);
        assert_eq!(first.key.len(), first.prefix.len() + 1 + SECRET_CHARS);
        assert!(is_well_formed(&first.key));
        assert_ne!(first.key, second.key);
        assert_ne!(first.hash, second.hash);
        assert_eq!(first.hash, hash_opaque_token(&first.key));
        assert!(!format!("{first:?}").contains(&first.key));
    }

    #[test]
    fn malformed_keys_are_told_apart() {
        let good = generate_api_key().key;
        let secret = "a".repeat(SECRET_CHARS);
        let short_secret = "a".repeat(SECRET_CHARS - 1);
        for bad in [
            String::new(),
            "tc_".to_owned(),
            format!("tc_1234567_{secret}"),
            format!("tc_ABCDEF12_{secret}"),
            format!("xx_abcdef12_{secret}"),
            format!("tc_abcdef12_{short_secret}"),
            format!("tc_abcdef12_{short_secret}+"),
            format!("tc_abcdef12{secret}"),
            format!("{good}x"),
        ] {
            assert!(!is_well_formed(&bad), "{bad}");
        }
        assert!(is_well_formed(&format!("tc_abcdef12_{short_secret}-")));
        assert!(is_well_formed(&format!("tc_0123abcd_{secret}")));
    }

    #[test]
    fn a_runner_only_key_is_an_agent_and_no_key_exceeds_its_owner() {
        use ApiKeyScope::{Read, Runner, Write};
        assert_eq!(effective_role(UserRole::Admin, &[Runner]), UserRole::Agent);
        assert_eq!(effective_role(UserRole::User, &[Runner, Runner]), UserRole::Agent);
        assert_eq!(effective_role(UserRole::Admin, &[Runner, Read]), UserRole::Admin);
        assert_eq!(effective_role(UserRole::User, &[Read, Write]), UserRole::User);
        assert_eq!(effective_role(UserRole::User, &[]), UserRole::User);
    }

    #[test]
    fn the_throttle_allows_one_write_a_minute_per_key() {
        let throttle = LastUsedThrottle::default();
        let start = Instant::now();
        let key = Uuid::new_v4();
        let other = Uuid::new_v4();
        assert!(throttle.should_write(key, start));
        assert!(!throttle.should_write(key, start + Duration::from_secs(1)));
        assert!(!throttle.should_write(key, start + Duration::from_secs(59)));
        assert!(throttle.should_write(other, start + Duration::from_secs(2)));
        assert!(throttle.should_write(key, start + Duration::from_secs(61)));
        assert!(!throttle.should_write(key, start + Duration::from_secs(62)));
    }
}
