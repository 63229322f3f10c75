//! What operators watch: `GET /metrics` in Prometheus text format (the `metrics` facade with
//! `metrics-exporter-prometheus` as the recorder), the layer every request passes that counts it
//! and times it by REST route template or gRPC method and status class and writes its access log
//! line, and the gauges read at scrape time (queue depth, runners, database connections).
//! Series recorded elsewhere: executions finished and step wait/run times (the engine), Redis
//! errors (`redis_pool`).
//! May call: the app context (queue, engine, store, settings) and `auth` (the caller record).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::app::AppContext;
use crate::auth::caller::{CallerRecord, REQUEST_ID_HEADER};

/// Histogram buckets, in seconds, of every latency series.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's recorder, installed on first use; `None` if another recorder was installed.
pub fn recorder() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = match PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS) {
                Ok(builder) => builder,
                Err(error) => {
                    tracing::warn!(%error, "metrics are off: bad histogram buckets");
                    return None;
                }
            };
            match builder.install_recorder() {
                Ok(handle) => {
                    // Shown from the first scrape, before anything has gone wrong.
                    metrics::counter!("turbocat_redis_errors_total").increment(0);
                    Some(handle)
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics are off: a recorder is already installed");
                    None
                }
            }
        })
        .as_ref()
}

/// What the request layer needs: REST route templates by axum path, and whether to log.
pub struct RequestObserver {
    /// `/api/v1/agents/{p0}` -> `/api/v1/agents/{agent_id}`.
    pub rest_templates: HashMap<String, String>,
    /// Every gRPC method path of the contract (`/turbocat.v1.AgentService/GetAgent`).
    pub grpc_methods: std::collections::HashSet<String>,
    pub access_log: bool,
}

/// `rest`, `grpc` or `grpc-web`, by the request's content type.
fn transport_of(request: &Request) -> &'static str {
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if content_type.starts_with("application/grpc-web") {
        "grpc-web"
    } else if content_type.starts_with("application/grpc") {
        "grpc"
    } else {
        "rest"
    }
}

impl RequestObserver {
    /// The route label: a REST template, a gRPC method of the contract, the matched pattern of
    /// anything else, or `unmatched`, so that no client can make the label set grow.
    fn route_of(&self, request: &Request, transport: &str) -> String {
        let matched = request.extensions().get::<MatchedPath>().map(MatchedPath::as_str);
        if transport != "rest" && self.grpc_methods.contains(request.uri().path()) {
            return request.uri().path().to_owned();
        }
        match matched {
            Some(path) => self.rest_templates.get(path).cloned().unwrap_or_else(|| path.to_owned()),
            None => "unmatched".to_owned(),
        }
    }
}

/// `2xx` … `5xx`; a gRPC answer by its `grpc-status` (in the headers of an error answered
/// without a body; a success carries it in the trailers and counts as `2xx`), mapped the way the
/// REST edge maps the same codes. A stream (a runner's `Attach`, `WatchExecution`) is counted
/// and timed when its headers leave.
fn status_class(transport: &str, response: &Response) -> &'static str {
    let http_status = if transport == "rest" {
        response.status()
    } else {
        let code = response
            .headers()
            .get("grpc-status")
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.parse::<i32>().ok())
            .map_or(tonic::Code::Ok, tonic::Code::from);
        if code == tonic::Code::Ok {
            return "2xx";
        }
        crate::error::ErrorCode::from_grpc_code(code).http_status()
    };
    match http_status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The layer: counts and times every request and writes its access log line (never a token,
/// never a body).
pub async fn observe(
    State(observer): State<Arc<RequestObserver>>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let transport = transport_of(&request);
    let route = observer.route_of(&request, transport);
    let method = request.method().clone();
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let caller = CallerRecord::default();
    request.extensions_mut().insert(caller.clone());
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let class = status_class(transport, &response);
    let labels = [
        ("transport", transport.to_owned()),
        ("method", method.as_str().to_owned()),
        ("route", route.clone()),
        ("status_class", class.to_owned()),
    ];
    metrics::counter!("turbocat_requests_total", &labels).increment(1);
    metrics::histogram!("turbocat_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
    if observer.access_log {
        let caller_id = caller.user_id().map(|id| id.to_string()).unwrap_or_default();
        tracing::info!(
            target: "turbocat::access",
            method = %method,
            route = %route,
            transport,
            status = response.status().as_u16(),
            grpc_status = response.headers().get("grpc-status").and_then(|value| value.to_str().ok()).unwrap_or_default(),
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            request_id = %request_id,
            caller_id = %caller_id,
            "request"
        );
    }
    response
}

/// Sets the gauges that are read rather than counted.
async fn refresh_gauges(context: &AppContext) {
    match context.queue.stats().await {
        Ok(stats) => {
            metrics::gauge!("turbocat_queue_depth", "state" => "ready").set(stats.ready as f64);
            metrics::gauge!("turbocat_queue_depth", "state" => "in_flight")
                .set(stats.in_flight as f64);
        }
        Err(error) => tracing::debug!(%error, "queue depth unknown for this scrape"),
    }
    let runners = context.engine.runners_of_every_replica().await;
    metrics::gauge!("turbocat_runners_connected").set(runners.len() as f64);
    let connections = context.store.pool_connections();
    let in_use = connections.open.saturating_sub(connections.idle);
    metrics::gauge!("turbocat_database_connections", "state" => "in_use").set(f64::from(in_use));
    metrics::gauge!("turbocat_database_connections", "state" => "idle")
        .set(f64::from(connections.idle));
}

/// `GET /metrics`. On the main listener it needs the bearer token (`--metrics-token`) and is
/// off (404) without one, or when `--metrics-listen` serves it elsewhere; on its own listener
/// (`on_metrics_listener`) it asks for the token only if one is set.
pub async fn scrape(
    context: &AppContext,
    headers: &http::HeaderMap,
    on_metrics_listener: bool,
) -> Response {
    let settings = &context.observability;
    if !on_metrics_listener
        && (settings.separate_metrics_listener || settings.metrics_token.is_none())
    {
        return (http::StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    if let Some(token) = &settings.metrics_token {
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !crate::auth::layer::subtle_equal(presented.trim().as_bytes(), token.expose().as_bytes())
        {
            return (
                http::StatusCode::UNAUTHORIZED,
                [(http::header::WWW_AUTHENTICATE, "Bearer")],
                "the metrics need the bearer token of --metrics-token\n",
            )
                .into_response();
        }
    }
    let Some(recorder) = recorder() else {
        return (http::StatusCode::SERVICE_UNAVAILABLE, "metrics are off\n").into_response();
    };
    refresh_gauges(context).await;
    recorder.run_upkeep();
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], recorder.render())
        .into_response()
}

/// The `/metrics` route of the main listener (`on_metrics_listener` false) or of its own.
pub fn router(context: Arc<AppContext>, on_metrics_listener: bool) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: http::HeaderMap| {
            let context = context.clone();
            async move { scrape(&context, &headers, on_metrics_listener).await }
        }),
    )
}
