//! Health: `GET /health` (liveness with the state of every dependency; 503 when the database is
//! unreachable), `GET /health/ready` (503 until every dependency answers, and from the moment
//! the process starts shutting down), and the
//! `grpc.health.v1.Health` statuses kept in step by a background probe.
//! May call: the probes in `AppContext`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::Response;
use serde_json::{Value, json};

use super::rest::envelope;
use crate::app::{AppContext, HealthProbe};
use crate::error::{ErrorCode, ServiceError};

/// The outcome of one probe.
#[derive(Debug, Clone)]
pub struct ComponentReport {
    pub component: &'static str,
    pub backend: &'static str,
    pub critical: bool,
    pub up: bool,
    pub latency: Duration,
    pub message: String,
}

impl ComponentReport {
    fn to_json(&self) -> Value {
        json!({
            "name": self.component,
            "backend": self.backend,
            "status": if self.up { "UP" } else { "DOWN" },
            "latencyMs": self.latency.as_secs_f64() * 1000.0,
            "message": self.message,
        })
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Pings every dependency at once, each within a short timeout.
pub async fn probe_all(probes: &[Arc<dyn HealthProbe>]) -> Vec<ComponentReport> {
    let checks = probes.iter().map(|probe| async move {
        let started = Instant::now();
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, probe.ping()).await;
        let (up, message) = match outcome {
            Ok(Ok(())) => (true, String::new()),
            Ok(Err(message)) => (false, message),
            Err(_) => (false, format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
        };
        ComponentReport {
            component: probe.component(),
            backend: probe.backend(),
            critical: probe.critical(),
            up,
            latency: started.elapsed(),
            message,
        }
    });
    futures::future::join_all(checks).await
}

fn summary(context: &AppContext, reports: &[ComponentReport]) -> Value {
    let all_up = reports.iter().all(|report| report.up);
    json!({
        "status": if all_up { "UP" } else { "DEGRADED" },
        "mode": context.mode.as_str(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": context.started_at.elapsed().as_secs(),
        "components": reports.iter().map(ComponentReport::to_json).collect::<Vec<_>>(),
    })
}

fn unavailable(
    context: &AppContext,
    reports: &[ComponentReport],
    message: &str,
    request_id: &str,
) -> Response {
    let error = ServiceError::new(ErrorCode::ServiceUnavailable, message);
    let mut body = envelope::error_body(&error, request_id);
    body["error"]["details"] = json!([summary(context, reports)]);
    let mut response = envelope::error(&error, request_id);
    *response.body_mut() = axum::body::Body::from(body.to_string());
    response
}

pub async fn liveness(
    State(context): State<Arc<AppContext>>,
    headers: http::HeaderMap,
) -> Response {
    let request_id = envelope::request_id_of(&headers);
    let reports = probe_all(&context.probes).await;
    let critical_down = reports.iter().any(|report| report.critical && !report.up);
    if critical_down {
        return unavailable(&context, &reports, "the database is unreachable", &request_id);
    }
    envelope::success(http::StatusCode::OK, summary(&context, &reports), None, &request_id)
}

pub async fn readiness(
    State(context): State<Arc<AppContext>>,
    headers: http::HeaderMap,
) -> Response {
    let request_id = envelope::request_id_of(&headers);
    let reports = probe_all(&context.probes).await;
    if context.shutting_down.is_cancelled() {
        // A load balancer stops sending new work here while the requests in flight finish.
        return unavailable(
            &context,
            &reports,
            "not ready: the server is shutting down",
            &request_id,
        );
    }
    if reports.iter().any(|report| !report.up) {
        return unavailable(&context, &reports, "not ready: a dependency is down", &request_id);
    }
    envelope::success(http::StatusCode::OK, summary(&context, &reports), None, &request_id)
}

/// Keeps `grpc.health.v1.Health` in step with the probes: SERVING while every critical
/// dependency answers, NOT_SERVING otherwise and from the moment the process starts shutting
/// down.
pub async fn keep_grpc_health(
    context: Arc<AppContext>,
    reporter: tonic_health::server::HealthReporter,
    interval: Duration,
) {
    let mut last_serving = None;
    loop {
        let reports = probe_all(&context.probes).await;
        let serving = !context.shutting_down.is_cancelled()
            && reports.iter().all(|report| !report.critical || report.up);
        if last_serving != Some(serving) {
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            for name in super::grpc::SERVICE_NAMES {
                reporter.set_service_status(name, status).await;
            }
            tracing::info!(serving, "grpc health status changed");
            last_serving = Some(serving);
        }
        let not_yet_stopping = !context.shutting_down.is_cancelled();
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            // A shutdown is reported at once, not at the next probe.
            () = context.shutting_down.cancelled(), if not_yet_stopping => {}
        }
    }
}

/// The store as a health probe.
pub struct StoreProbe(pub Arc<dyn crate::store::Store>);

#[async_trait::async_trait]
impl HealthProbe for StoreProbe {
    fn component(&self) -> &'static str {
        "database"
    }

    fn backend(&self) -> &'static str {
        self.0.backend().as_str()
    }

    fn critical(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<(), String> {
        self.0.ping().await.map_err(|error| match error {
            crate::store::StoreError::Database(cause) => cause.to_string(),
            other => other.to_string(),
        })
    }
}
