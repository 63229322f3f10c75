//! Turbocat: an open backend for orchestrating AI agents and workflows.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod error;
pub mod proto;
pub mod server;
pub mod store;
