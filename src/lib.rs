//! Turbocat: an open backend for orchestrating AI agents and workflows.
#![deny(unsafe_code)]

pub mod api;
pub mod app;
pub mod auth;
pub mod bus;
pub mod config;
pub mod engine;
pub mod error;
pub mod fuzzing;
pub mod jq;
pub mod mapping;
pub mod outage;
pub mod proto;
pub mod queue;
pub mod redis_pool;
pub mod runner;
pub mod seed;
pub mod server;
pub mod service;
pub mod ssrf;
pub mod store;
pub mod text;
