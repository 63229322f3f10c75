//! The Store conformance suite: every test runs against PostgreSQL and SQLite.

#[path = "../support/mod.rs"]
mod support;

mod alerts;
mod analytics;
mod connections;
mod executions;
mod identity;
mod migrations;
mod resources;
