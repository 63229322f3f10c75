//! Rate limits of the unauthenticated auth operations (register, login, refresh, forgot and
//! reset password): fixed-window counters per client address and per named account, in memory
//! (`dev`) or in Redis (`serve`, so every replica counts against the same limit).
//! May call: redis (through `RedisPool`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::Digest;

use super::caller::ClientInfo;
use crate::error::{ErrorCode, ServiceError, ServiceResult};
use crate::redis_pool::{RedisCommandError, RedisPool};

/// At most `limit` hits per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateRule {
    /// Hits allowed per window; 0 switches the rule off.
    pub limit: u32,
    pub window: Duration,
}

impl RateRule {
    pub fn per_window(limit: u32, window: Duration) -> Self {
        Self { limit, window }
    }

    pub fn is_disabled(&self) -> bool {
        self.limit == 0
    }
}

/// Whether a hit was within its rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed,
    /// Over the limit; the window ends after `retry_after`.
    Limited {
        retry_after: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error(transparent)]
    Redis(#[from] RedisCommandError),
}

impl From<redis::RedisError> for RateLimitError {
    fn from(error: redis::RedisError) -> Self {
        Self::Redis(RedisCommandError::from(error))
    }
}

/// Counts hits on keys. Implementations count every hit, allowed or not.
#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Counts one hit on `key` under `rule`.
    async fn hit(&self, key: &str, rule: RateRule) -> Result<RateDecision, RateLimitError>;
}

/// The decision for the `count`-th hit of a window that ends after `remaining`.
fn decide(count: u64, remaining: Duration, rule: RateRule) -> RateDecision {
    if count <= u64::from(rule.limit) {
        return RateDecision::Allowed;
    }
    // Retry-After is whole seconds: never tell a client to come back before the window ends.
    let whole_seconds = remaining.as_millis().div_ceil(1000).max(1);
    let retry_after = Duration::from_secs(u64::try_from(whole_seconds).unwrap_or(u64::MAX));
    RateDecision::Limited { retry_after }
}

// ---------------------------------------------------------------------------------------------
// In memory
// ---------------------------------------------------------------------------------------------

/// Entries above this many make a hit sweep out the expired windows first.
const MEMORY_SWEEP_THRESHOLD: usize = 10_000;

struct MemoryWindow {
    count: u64,
    ends_at: Instant,
}

/// Counters of one process (`dev`).
#[derive(Default)]
pub struct MemoryRateLimiter {
    windows: Mutex<HashMap<String, MemoryWindow>>,
}

impl MemoryRateLimiter {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn hit(&self, key: &str, rule: RateRule) -> Result<RateDecision, RateLimitError> {
        let now = Instant::now();
        // A poisoned lock only means another hit panicked; the counters are still usable.
        let mut windows = self.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if windows.len() > MEMORY_SWEEP_THRESHOLD {
            windows.retain(|_, window| window.ends_at > now);
        }
        let window = windows
            .entry(key.to_owned())
            .or_insert_with(|| MemoryWindow { count: 0, ends_at: now + rule.window });
        if window.ends_at <= now {
            *window = MemoryWindow { count: 0, ends_at: now + rule.window };
        }
        window.count += 1;
        Ok(decide(window.count, window.ends_at.saturating_duration_since(now), rule))
    }
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// INCR the window's counter, start its expiry on the first hit (or if it somehow has none),
/// and answer the count and the milliseconds left, atomically.
const HIT_SCRIPT: &str = r"
local count = redis.call('INCR', KEYS[1])
local remaining = redis.call('PTTL', KEYS[1])
if count == 1 or remaining < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  remaining = tonumber(ARGV[1])
end
return {count, remaining}
";

/// Counters shared by every replica on one Redis (`serve`); keys `<prefix><key>`, by default
/// `turbocat:ratelimit:login:ip:192.0.2.7`.
pub struct RedisRateLimiter {
    pool: RedisPool,
    key_prefix: String,
    script: redis::Script,
}

impl RedisRateLimiter {
    /// `key_prefix` is `turbocat:ratelimit:` by default; replicas must agree on it.
    pub fn new(pool: RedisPool, key_prefix: impl Into<String>) -> Self {
        Self { pool, key_prefix: key_prefix.into(), script: redis::Script::new(HIT_SCRIPT) }
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn hit(&self, key: &str, rule: RateRule) -> Result<RateDecision, RateLimitError> {
        let full_key = format!("{}{key}", self.key_prefix);
        let window_millis = u64::try_from(rule.window.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut connection = self.pool.connection().await?;
        let (count, remaining_millis): (i64, i64) =
            self.script.key(full_key).arg(window_millis).invoke_async(&mut *connection).await?;
        let count = u64::try_from(count).unwrap_or(0);
        let remaining = Duration::from_millis(u64::try_from(remaining_millis).unwrap_or(0));
        Ok(decide(count, remaining, rule))
    }
}

// ---------------------------------------------------------------------------------------------
// The policy of the auth operations
// ---------------------------------------------------------------------------------------------

/// An operation that is limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthAction {
    Register,
    Login,
    Refresh,
    ForgotPassword,
    ResetPassword,
}

impl AuthAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthAction::Register => "register",
            AuthAction::Login => "login",
            AuthAction::Refresh => "refresh",
            AuthAction::ForgotPassword => "forgot_password",
            AuthAction::ResetPassword => "reset_password",
        }
    }
}

/// Which limits apply to the auth operations, and where the counters live.
pub struct AuthRateLimits {
    limiter: Arc<dyn RateLimiter>,
    /// Hits of one operation from one client address.
    per_client_address: RateRule,
    /// Hits of one operation naming one account (email).
    per_account: RateRule,
}

impl AuthRateLimits {
    pub fn new(
        limiter: Arc<dyn RateLimiter>,
        per_client_address: RateRule,
        per_account: RateRule,
    ) -> Self {
        Self { limiter, per_client_address, per_account }
    }

    /// Counts one `action` from `client` (naming `account`, an email, if any); RATE_LIMITED
    /// with a retry delay when a limit is exceeded. If the counters cannot be reached the
    /// request is let through (logged): sign-in must not depend on Redis.
    pub async fn check(
        &self,
        action: AuthAction,
        client: &ClientInfo,
        account: Option<&str>,
    ) -> ServiceResult<()> {
        if let Some(address) = client.ip_address {
            let key = format!("{}:ip:{address}", action.as_str());
            self.check_one(action, "client_address", &key, self.per_client_address).await?;
        }
        let account = account.map(|email| email.trim().to_lowercase());
        if let Some(account) = account.filter(|email| !email.is_empty()) {
            // The email is hashed so the counters do not list who tried to sign in.
            let account_hash = hex::encode(&sha2::Sha256::digest(account.as_bytes())[..16]);
            let key = format!("{}:account:{account_hash}", action.as_str());
            self.check_one(action, "account", &key, self.per_account).await?;
        }
        Ok(())
    }

    async fn check_one(
        &self,
        action: AuthAction,
        counter: &'static str,
        key: &str,
        rule: RateRule,
    ) -> ServiceResult<()> {
        if rule.is_disabled() {
            return Ok(());
        }
        match self.limiter.hit(key, rule).await {
            Ok(RateDecision::Allowed) => Ok(()),
            Ok(RateDecision::Limited { retry_after }) => {
                tracing::info!(
                    action = action.as_str(),
                    counter,
                    retry_after_seconds = retry_after.as_secs(),
                    "rate limit exceeded"
                );
                Err(ServiceError::new(ErrorCode::RateLimited, "too many attempts; try again later")
                    .with_retry_after(retry_after))
            }
            Err(error) => {
                tracing::warn!(%error, action = action.as_str(), "rate limit counters unavailable; request let through");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{MemoryRateLimiter, RateDecision, RateLimiter, RateRule};

    #[tokio::test]
    async fn a_memory_window_allows_its_limit_then_refuses_until_it_ends() {
        let limiter = MemoryRateLimiter::new();
        let rule = RateRule::per_window(2, Duration::from_millis(300));
        assert_eq!(limiter.hit("a", rule).await.expect("hit"), RateDecision::Allowed);
        assert_eq!(limiter.hit("a", rule).await.expect("hit"), RateDecision::Allowed);
        let RateDecision::Limited { retry_after } = limiter.hit("a", rule).await.expect("hit")
        else {
            panic!("the third hit is over the limit");
        };
        assert_eq!(retry_after, Duration::from_secs(1), "rounded up to whole seconds");
        assert_eq!(limiter.hit("b", rule).await.expect("hit"), RateDecision::Allowed, "own key");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(limiter.hit("a", rule).await.expect("hit"), RateDecision::Allowed, "new window");
    }
}
