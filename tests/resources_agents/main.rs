//! Agents and the audit trail as a client meets them: the real `turbocat` binary, REST through
//! reqwest and gRPC through the generated clients, each test once on `dev` (SQLite) and once on
//! `serve` (PostgreSQL + Redis).

#[path = "../support/mod.rs"]
mod support;

mod audit_trail;
mod crud;
mod harness;
mod listing;
mod usage;
mod validation;
