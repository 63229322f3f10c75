//! The edges: one listener serving gRPC (HTTP/2), grpc-web, REST/JSON under `/api/v1`,
//! `grpc.health.v1.Health`, gRPC reflection, `GET /health`, `GET /metrics` and the web console
//! at `/`. Authentication,
//! request ids, CORS, tracing, request metrics and the access log are layers shared by every
//! transport.
//! May call: the service layer and the `app` context it runs with; `auth` (the layer);
//! `engine` (the runner stream's messages); `proto` and `error` (transcoding, envelopes); the
//! store only for health probes.

pub mod console;
pub mod grpc;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod rest;
pub mod security_headers;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::response::{IntoResponse, Response};
use http::HeaderValue;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{
    DefaultPredicate, NotForContentType, Predicate, SizeAbove,
};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::app::AppContext;
use crate::auth::caller::REQUEST_ID_HEADER;
use crate::error::{ErrorCode, ServiceError};

/// Settings of the edges.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    /// Largest REST request body; larger ones get 413 PAYLOAD_TOO_LARGE.
    pub max_body_bytes: usize,
    /// Largest gRPC message in either direction.
    pub max_message_bytes: usize,
    /// Origins allowed to call from a browser; empty means same-origin only.
    pub cors_origins: Vec<String>,
}

/// Responses smaller than this go out as they are, whatever the client accepts: compressing a
/// small body costs more time than the bytes it saves.
pub const MIN_COMPRESSED_BYTES: u16 = 1024;

/// gzip, when the client asks for it (`Accept-Encoding`), for responses of a known size of at
/// least `MIN_COMPRESSED_BYTES`. Never for streams, whose events must leave at once: SSE, gRPC
/// and grpc-web (a watch over grpc-web is a stream too).
fn compression_layer() -> CompressionLayer<impl Predicate> {
    let predicate = DefaultPredicate::new()
        .and(SizeAbove::new(MIN_COMPRESSED_BYTES))
        .and(NotForContentType::const_new("application/grpc"));
    CompressionLayer::new().gzip(true).compress_when(predicate)
}

/// Builds the one router that serves every transport.
pub async fn router(context: Arc<AppContext>, settings: &EdgeSettings) -> Result<Router, String> {
    let pool = crate::proto::descriptor_pool();

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(health::keep_grpc_health(
        context.clone(),
        health_reporter,
        Duration::from_secs(5),
    ));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| format!("reflection: {error}"))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|error| format!("reflection: {error}"))?;

    let authenticator = Arc::new(crate::auth::layer::Authenticator {
        store: context.store.clone(),
        tokens: context.tokens.clone(),
        revoked_sessions: context.revoked_sessions.clone(),
        trusted_proxies: context.trusted_proxies.clone(),
        external: context.external_identity.clone(),
        api_key_last_used: crate::auth::api_keys::LastUsedThrottle::default(),
        local_runner_key: context.local_runner_key.clone(),
        api_calls: context.api_calls.clone(),
    });
    tokio::spawn(context.api_calls.clone().keep_flushing(context.store.clone()));
    tokio::spawn(context.revoked_sessions.clone().keep_current(
        context.store.clone(),
        context.bus.clone(),
        context.tokens.settings().access_token_lifetime,
    ));
    let grpc_router = grpc::routes(&context, settings.max_message_bytes)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(
            authenticator,
            crate::auth::layer::authenticate,
        ));

    let bindings = rest::bindings::http_bindings(pool)?;
    let observer = Arc::new(metrics::RequestObserver {
        rest_templates: bindings
            .iter()
            .map(|binding| (binding.route_path.clone(), binding.template.clone()))
            .collect(),
        grpc_methods: pool
            .services()
            .flat_map(|service| {
                service
                    .methods()
                    .map(|method| format!("/{}/{}", service.full_name(), method.name()))
                    .collect::<Vec<_>>()
            })
            .collect(),
        access_log: context.observability.access_log,
    });
    let security_headers = axum::middleware::from_fn_with_state(
        Arc::new(security_headers::SecurityHeaders {
            trusted_proxies: context.trusted_proxies.clone(),
        }),
        security_headers::add_security_headers,
    );
    let rest_router = rest::router(bindings, grpc_router.clone(), settings.max_body_bytes);

    let health_router = Router::new()
        .route("/health", axum::routing::get(health::liveness))
        .route("/health/ready", axum::routing::get(health::readiness))
        .with_state(context.clone());

    let app = Router::new()
        .merge(health_router)
        .merge(rest_router)
        .merge(webhooks::router(context.clone(), settings.max_body_bytes))
        .merge(openapi::router(pool)?)
        .merge(grpc_router.layer(tonic_web::GrpcWebLayer::new()))
        .merge(metrics::router(context.clone(), false))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        // Skips gRPC and grpc-web responses by their content type; covers the fallbacks too.
        .layer(security_headers)
        // The docs page sets its own security headers (a CSP that lets its scripts run).
        .merge(openapi::docs_router())
        .layer(compression_layer())
        // Counts, times and logs every request, after routing (it reads the matched route).
        .layer(axum::middleware::from_fn_with_state(observer, metrics::observe))
        .layer(cors_layer(&settings.cors_origins))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(|request: &http::Request<_>| {
            let request_id = request
                .headers()
                .get(REQUEST_ID_HEADER)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default();
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id)
        })
        // The access log reports every answer; a 5xx (a 501 of a method that does not exist
        // included) is not an error of this server's, and real faults are logged where they
        // happen, with their cause.
        .on_failure(()))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid));
    Ok(app)
}

fn cors_layer(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> =
        origins.iter().filter_map(|origin| HeaderValue::from_str(origin).ok()).collect();
    let exposed = [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        REQUEST_ID_HEADER,
        "etag",
        "retry-after",
    ]
    .map(http::HeaderName::from_static);
    let allowed = [
        "authorization",
        "content-type",
        "x-api-key",
        REQUEST_ID_HEADER,
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
        "if-match",
    ]
    .map(http::HeaderName::from_static);
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([
            http::Method::GET,
            http::Method::POST,
            http::Method::PUT,
            http::Method::PATCH,
            http::Method::DELETE,
            http::Method::OPTIONS,
        ])
        .allow_headers(allowed)
        .expose_headers(exposed)
        .max_age(Duration::from_secs(600))
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|content_type| content_type.starts_with("application/grpc"))
}

/// Unknown routes: a gRPC status for gRPC callers, the console's files and pages for browsers,
/// the envelope for everyone else.
async fn fallback(method: http::Method, uri: http::Uri, headers: http::HeaderMap) -> Response {
    if is_grpc(&headers) {
        return tonic::Status::unimplemented(format!("unknown method {}", uri.path()))
            .into_http::<axum::body::Body>()
            .into_response();
    }
    if let Some(response) = console::response(&method, uri.path(), &headers) {
        return response;
    }
    let error =
        ServiceError::new(ErrorCode::NotFound, format!("no route for {method} {}", uri.path()));
    rest::envelope::error(&error, &rest::envelope::request_id_of(&headers))
}

async fn method_not_allowed(
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
) -> Response {
    let error = ServiceError::new(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    );
    rest::envelope::error(&error, &rest::envelope::request_id_of(&headers))
}
