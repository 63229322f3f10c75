//! Users, roles and API keys as a client meets them: the real `turbocat` binary, REST through
//! reqwest and gRPC through the generated clients, in `dev` (SQLite) and `serve` (PostgreSQL +
//! Redis).

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod api_keys;
mod cli_and_secrets;
mod profile;
