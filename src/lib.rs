//! Turbocat: an open backend for orchestrating AI agents and workflows.
#![forbid(unsafe_code)]

pub mod proto;
pub mod store;
