//! Workflows and executions as a client meets them: the real `turbocat` binary, REST through
//! reqwest and gRPC through the generated clients, in `dev` (SQLite) and `serve` (PostgreSQL +
//! Redis). Agents are made through the store of the server's own database.

#[path = "../support/mod.rs"]
mod support;

mod executions;
mod fixture;
mod workflows;
