//! Authentication: who a caller is (access tokens, API keys), sessions and their revocation,
//! password hashing. Services read the `Caller` the layer leaves on each request.
//! May call: the store, the bus (revocations), `redis_pool` (rate limit counters in `serve`),
//! `config` (secrets and settings), `error`, and `outage` (quiet retries of its background
//! loops).

pub mod api_keys;
pub mod caller;
pub mod external;
pub mod layer;
pub mod mailer;
pub mod password;
pub mod rate_limit;
pub mod revocation;
pub mod tokens;
pub mod usage;

/// Every API key starts with this, so a bearer value can be told apart from a JWT.
pub const API_KEY_PREFIX: &str = "tc_";
