//! The execution engine: workflow definitions as DAGs (`dag`), the `{{…}}` input mappings that
//! feed a step from the workflow input and its upstream outputs (`mapping`), and the cron
//! schedules of deployments (`schedule`). The scheduler, dispatcher and reconciler arrive with
//! the execution-engine issue.
//! May call: the store, the queue and the bus. Never the edges or the service layer.

pub mod dag;
pub mod mapping;
pub mod schedule;
