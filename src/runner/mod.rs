//! The runner: what `turbocat runner` (and the local runner of `turbocat dev`) does with a step
//! assignment. `client` speaks `RunnerService.Attach` with the server; `executors` runs the
//! agent types a runner runs (CODE, API, LLM, DATA); `ssrf` guards the URLs of API and LLM
//! agents. The server is reached only through the proto.
//! May call: `crate::mapping` and the generated proto types; never the store, the queue
//! or the service layer.

pub mod client;
pub mod executors;
pub mod ssrf;
