//! The runner: what `turbocat runner` (and the local runner of `turbocat dev`) does with a step
//! assignment. `client` speaks `RunnerService.Attach` with the server; `executors` runs the
//! agent types a runner runs (CODE, API, LLM, DATA), whose URLs the shared `ssrf` guard vets.
//! The server is reached only through the proto.
//! May call: its own executors and the shared pure modules: `proto` (the generated types and
//! their well-known-type conversions), `mapping` (`{{…}}` templates), `jq`, `ssrf` and `text`. Never
//! the store, the queue, the bus, the engine, the service layer or the edges.

pub mod client;
pub mod executors;
