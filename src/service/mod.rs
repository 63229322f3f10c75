//! The service layer: one transport-neutral function per operation. Each takes the context, the
//! caller (or client info for public operations) and the proto request, validates it, does the
//! work through the store, queue and bus, writes the audit trail, and returns the proto
//! response or a `ServiceError`. The gRPC methods call these; REST reaches them through gRPC.
//! May call: app (the context), store, queue, bus, auth, the engine (DAG checks, snapshots,
//! schedules, starting and cancelling executions), `error`, and the shared pure modules
//! (`proto`, `mapping`, `jq`, `outage`, `ssrf`). Never the edges, never the runner program.

pub mod agents;
pub mod alerts;
pub mod analytics;
pub mod api_keys;
pub mod audit;
pub mod audit_logs;
pub mod auth;
pub mod convert;
pub mod deployments;
pub mod executions;
pub mod runner_access;
pub mod runner_listing;
pub mod signing;
pub mod subworkflows;
pub mod templates;
pub mod triggers;
pub mod users;
pub mod validate;
pub mod watch;
pub mod workflows;
