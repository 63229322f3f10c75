//! One warning per outage: how a background loop (the dispatcher, the reconciler, the cron
//! poller, the usage flush, …) reports a dependency that stopped answering and paces its retries.
//! The first failure of an outage is a `warn` line, the ones after it are `debug`, the pause
//! before the next try grows up to `MAX_PAUSE`, and the first success after an outage says so
//! once at `info`. Nothing is dropped: the loop keeps retrying until the dependency is back.
//! May call: nothing (tokio's clock and `tracing` only).

use std::time::{Duration, Instant};

/// The pause after the first failure of an outage.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// The longest pause between two tries.
pub const MAX_PAUSE: Duration = Duration::from_secs(5);

/// The state of one loop's dependency: answering, or failing since some instant.
#[derive(Debug)]
pub struct Outage {
    /// What the loop does, for the log lines: `"dispatching"`, `"reconciling"`.
    activity: &'static str,
    failing_since: Option<Instant>,
    failures: u32,
}

impl Outage {
    pub fn new(activity: &'static str) -> Self {
        Self { activity, failing_since: None, failures: 0 }
    }

    /// Records a failed pass; returns how long to pause before the next one. Only the first
    /// failure of an outage is a warning.
    pub fn failed(&mut self, error: &dyn std::error::Error) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let error = with_causes(error);
        if self.failing_since.is_none() {
            self.failing_since = Some(Instant::now());
            tracing::warn!(
                activity = self.activity,
                %error,
                "a background task is failing; retrying quietly until it works again"
            );
        } else {
            tracing::debug!(activity = self.activity, %error, failures = self.failures, "still failing");
        }
        self.pause()
    }

    /// Records a pass that worked: one `info` line when it ends an outage.
    pub fn succeeded(&mut self) {
        let Some(since) = self.failing_since.take() else { return };
        tracing::info!(
            activity = self.activity,
            failures = self.failures,
            outage_seconds = since.elapsed().as_secs_f64(),
            "a background task works again"
        );
        self.failures = 0;
    }

    /// Whether the last pass failed.
    pub fn is_failing(&self) -> bool {
        self.failing_since.is_some()
    }

    /// The pause before the next try: `FIRST_PAUSE`, doubled with every further failure, at
    /// most `MAX_PAUSE`; none while nothing fails.
    pub fn pause(&self) -> Duration {
        if self.failures == 0 {
            return Duration::ZERO;
        }
        let doublings = self.failures.saturating_sub(1).min(8);
        FIRST_PAUSE.saturating_mul(1 << doublings).min(MAX_PAUSE)
    }
}

/// An error and its causes, `: `-separated ("database error: error communicating with the
/// database: connection refused"): the first line of an outage says what is wrong.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        if !text.ends_with(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_grows_to_its_cap_and_a_success_resets_it() {
        let mut outage = Outage::new("testing");
        assert_eq!(outage.pause(), Duration::ZERO);
        assert!(!outage.is_failing());
        let down = std::io::Error::other("down");
        assert_eq!(outage.failed(&down), FIRST_PAUSE);
        assert_eq!(outage.failed(&down), FIRST_PAUSE * 2);
        assert!(outage.is_failing());
        for _ in 0..20 {
            outage.failed(&down);
        }
        assert_eq!(outage.pause(), MAX_PAUSE);
        outage.succeeded();
        assert!(!outage.is_failing());
        assert_eq!(outage.pause(), Duration::ZERO);
        assert_eq!(outage.failed(&down), FIRST_PAUSE, "a new outage starts over");
    }
}
