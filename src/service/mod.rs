//! The service layer: one transport-neutral function per operation. Each takes the context, the
//! caller (or client info for public operations) and the proto request, validates it, does the
//! work through the store, queue and bus, writes the audit trail, and returns the proto
//! response or a `ServiceError`. The gRPC methods call these; REST reaches them through gRPC.
//! May call: store, queue, bus, auth. Never the edges.

pub mod api_keys;
pub mod audit;
pub mod auth;
pub mod convert;
pub mod users;
pub mod validate;
