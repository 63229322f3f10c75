//! Redis connections shared by the Redis queue and the Redis bus: one bb8 pool of multiplexed
//! connections for commands, plus the client that opens dedicated connections (pub/sub).
//!
//! A checkout costs no round trip: pooled connections are `redis::aio::ConnectionManager`s,
//! which reconnect by themselves after a failed command (the command that met the failure
//! reports it; the next one runs on a fresh connection), so the pool does not `PING` each
//! connection it hands out. None of our commands block, so the multiplexed connections
//! pipeline concurrent callers.
//! May call: redis, bb8 (as bb8-redis re-exports it), and the `metrics` facade (failed commands
//! are counted). Errors and logs name the server's host and port, never the
//! URL itself, so a password in the URL cannot leak.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bb8_redis::bb8::{self, PooledConnection};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// How many pooled connections to keep and how long to wait for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisPoolOptions {
    pub max_connections: u32,
    /// How long `connect_redis` and every command wait for a connection before giving up.
    pub connection_timeout: Duration,
}

impl Default for RedisPoolOptions {
    fn default() -> Self {
        Self { max_connections: 16, connection_timeout: Duration::from_secs(5) }
    }
}

/// A checked-out connection; it derefs to a `redis::aio::ConnectionManager` (a multiplexed
/// connection that reconnects after a failure).
pub type RedisPooledConnection<'pool> = PooledConnection<'pool, ReconnectingConnections>;

/// Makes the pool's connections: each a `ConnectionManager` with the pool's timeouts.
#[derive(Clone)]
pub struct ReconnectingConnections {
    client: redis::Client,
    timeout: Duration,
}

impl bb8::ManageConnection for ReconnectingConnections {
    type Connection = ConnectionManager;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        ConnectionManager::new_with_config(self.client.clone(), config).await
    }

    /// Only asked when a connection is tested on checkout, which this pool does not do.
    async fn is_valid(&self, connection: &mut Self::Connection) -> Result<(), Self::Error> {
        let _pong: String = redis::cmd("PING").query_async(connection).await?;
        Ok(())
    }

    fn has_broken(&self, _connection: &mut Self::Connection) -> bool {
        false
    }
}

/// Commands go through the pool; dedicated connections (pub/sub) are opened with `client()`.
/// Cloning is cheap and shares the pool.
#[derive(Clone)]
pub struct RedisPool {
    commands: bb8::Pool<ReconnectingConnections>,
    client: redis::Client,
    server_address: Arc<str>,
}

impl fmt::Debug for RedisPool {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("RedisPool").field("server_address", &self.server_address).finish()
    }
}

/// Why `connect_redis` failed. Every message names the server as `host:port` only.
#[derive(Debug, thiserror::Error)]
pub enum RedisConnectError {
    #[error("invalid redis url for {server_address}")]
    InvalidUrl {
        server_address: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("cannot connect to redis at {server_address}")]
    Unreachable {
        server_address: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("timed out connecting to redis at {server_address} after {timeout:?}")]
    TimedOut { server_address: String, timeout: Duration },
}

/// A command that could not run: no connection in time, or Redis answered with an error.
#[derive(Debug, thiserror::Error)]
pub enum RedisCommandError {
    #[error("no redis connection to {server_address} became available in time")]
    PoolTimedOut { server_address: String },
    #[error("redis command failed")]
    Command(#[source] redis::RedisError),
}

impl From<redis::RedisError> for RedisCommandError {
    /// Every failed command passes here (`?` on a command's result): counted for `/metrics`.
    fn from(error: redis::RedisError) -> Self {
        metrics::counter!("turbocat_redis_errors_total").increment(1);
        RedisCommandError::Command(error)
    }
}

/// Connects to the Redis server `url` names (`redis://[user:password@]host:port[/db]`,
/// `rediss://…` for TLS) with default pool options, and checks it answers `PING`.
pub async fn connect_redis(url: &str) -> Result<RedisPool, RedisConnectError> {
    connect_redis_with_options(url, RedisPoolOptions::default()).await
}

/// `connect_redis` with explicit pool options.
pub async fn connect_redis_with_options(
    url: &str,
    options: RedisPoolOptions,
) -> Result<RedisPool, RedisConnectError> {
    let client = match redis::Client::open(url) {
        Ok(client) => client,
        Err(source) => {
            let server_address = server_address_of_unparsed_url(url);
            return Err(RedisConnectError::InvalidUrl { server_address, source });
        }
    };
    let server_address = client.get_connection_info().addr().to_string();

    // A first connection outside the pool: bb8 retries failed connects until its timeout and
    // then reports only "timed out", which hides the reason (refused, wrong password, …).
    let first_connection =
        tokio::time::timeout(options.connection_timeout, check_server_answers(&client)).await;
    match first_connection {
        Err(_elapsed) => {
            return Err(RedisConnectError::TimedOut {
                server_address,
                timeout: options.connection_timeout,
            });
        }
        Ok(Err(source)) => return Err(RedisConnectError::Unreachable { server_address, source }),
        Ok(Ok(())) => {}
    }

    let manager =
        ReconnectingConnections { client: client.clone(), timeout: options.connection_timeout };
    let commands = bb8::Pool::builder()
        .max_size(options.max_connections)
        .connection_timeout(options.connection_timeout)
        .test_on_check_out(false)
        .build_unchecked(manager);
    tracing::debug!(server_address = %server_address, "connected to redis");
    Ok(RedisPool { commands, client, server_address: server_address.into() })
}

async fn check_server_answers(client: &redis::Client) -> Result<(), redis::RedisError> {
    let mut connection = client.get_multiplexed_async_connection().await?;
    let _pong: String = redis::cmd("PING").query_async(&mut connection).await?;
    Ok(())
}

/// `host:port` of a URL that redis could not parse, or a placeholder; never the credentials.
fn server_address_of_unparsed_url(url: &str) -> String {
    let Ok(parsed) = url::Url::parse(url) else {
        return "<unparseable url>".to_owned();
    };
    let host = parsed.host_str().unwrap_or("<no host>");
    match parsed.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

impl RedisPool {
    /// A pooled connection for commands.
    pub async fn connection(&self) -> Result<RedisPooledConnection<'_>, RedisCommandError> {
        self.commands.get().await.map_err(|error| match error {
            bb8::RunError::User(source) => RedisCommandError::from(source),
            bb8::RunError::TimedOut => {
                metrics::counter!("turbocat_redis_errors_total").increment(1);
                RedisCommandError::PoolTimedOut { server_address: self.server_address.to_string() }
            }
        })
    }

    /// The client that opens dedicated (non-pooled) connections, such as pub/sub.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// `host:port` of the server, safe to log.
    pub fn server_address(&self) -> &str {
        &self.server_address
    }
}
