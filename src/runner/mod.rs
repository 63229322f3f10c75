//! The runner: what `turbocat runner` (and the local runner of `turbocat dev`) does with a step
//! assignment. `executors` runs the five agent types; the server is reached only through the
//! proto (`RunnerService.Attach`).
