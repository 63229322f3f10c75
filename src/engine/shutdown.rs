//! This process stopping (SIGTERM, SIGINT): the dispatcher and the reconciler end after their
//! current pass (a pass never leaves a claim behind: each is acknowledged or released, so the
//! queue work goes back to the other replicas), no runner attached here gets another
//! assignment, and each is asked to move: its stream ends with UNAVAILABLE while what it sent
//! is still read and applied, then it reconnects (through the load balancer, to another replica,
//! or to this address again once a new process listens) naming the attempts it still holds,
//! which the next replica keeps because their leases live in Redis (or the database).
//! Nothing is taken back or cancelled: a step running on a runner finishes there.

use std::sync::Arc;
use std::time::Duration;

use super::Engine;

/// The status a runner reads when its server shuts down.
pub const SHUTTING_DOWN: &str = "this server is shutting down; attach again (to another replica)";

impl Engine {
    /// Stops the loops and moves the runners attached here away; returns once every runner has
    /// closed its stream or `patience` has passed (the streams still open are then cut, and their
    /// runners reconnect just the same).
    pub async fn shut_down(self: &Arc<Self>, patience: Duration) {
        self.stopping.cancel();
        let runners = self.attached_runners.all();
        // First no runner here takes anything more, then each is told.
        for runner in &runners {
            runner.set_draining();
        }
        let deadline = tokio::time::Instant::now() + patience;
        for runner in &runners {
            let status = tonic::Status::unavailable(SHUTTING_DOWN);
            if !runner.ask_to_move(status.clone(), patience / 4).await {
                runner.withdraw(status);
            }
        }
        while !self.attached_runners.all().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let still_attached = self.attached_runners.all();
        for runner in &still_attached {
            runner.withdraw(tonic::Status::unavailable(SHUTTING_DOWN));
        }
        tracing::info!(
            moved = runners.len() - still_attached.len(),
            cut = still_attached.len(),
            "runners asked to attach elsewhere"
        );
    }

    /// Whether `shut_down` was called: the runner service refuses new attachments then.
    pub fn is_shutting_down(&self) -> bool {
        self.stopping.is_cancelled()
    }
}
