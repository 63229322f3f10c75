//! Security headers of REST and health responses (never of gRPC or grpc-web ones): no sniffing,
//! no framing, no referrer, no caching (a response that set its own content security policy or
//! cache policy, the console's files, keeps it), and HSTS when a trusted proxy says it spoke TLS.
//! May call: nothing beyond the request and the trusted proxy list.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderName, HeaderValue, header};

pub const HSTS_VALUE: &str = "max-age=31536000; includeSubDomains";

/// What the layer needs to know.
#[derive(Debug, Clone, Default)]
pub struct SecurityHeaders {
    /// Peers whose `X-Forwarded-Proto` is believed.
    pub trusted_proxies: Vec<IpAddr>,
}

impl SecurityHeaders {
    /// Whether the client reached us over TLS: only a trusted proxy can say so, as we never
    /// terminate TLS ourselves.
    fn came_over_tls(&self, peer: Option<IpAddr>, headers: &http::HeaderMap) -> bool {
        let Some(peer) = peer else { return false };
        if !self.trusted_proxies.contains(&peer) {
            return false;
        }
        // A chain of proxies appends: the first value is the client's side.
        headers
            .get("x-forwarded-proto")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(',').next())
            .is_some_and(|protocol| protocol.trim().eq_ignore_ascii_case("https"))
    }
}

/// The middleware: adds the headers to every response it wraps, unless it is a gRPC one.
pub async fn add_security_headers(
    State(settings): State<Arc<SecurityHeaders>>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip());
    let over_tls = settings.came_over_tls(peer, request.headers());
    let mut response = next.run(request).await;
    if is_grpc_response(response.headers()) {
        return response;
    }
    let headers = response.headers_mut();
    let fixed: [(HeaderName, &'static str); 5] = [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in fixed {
        let own_policy = name == header::CONTENT_SECURITY_POLICY || name == header::CACHE_CONTROL;
        if own_policy && headers.contains_key(&name) {
            continue;
        }
        headers.insert(name, HeaderValue::from_static(value));
    }
    if over_tls {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static(HSTS_VALUE));
    }
    response
}

fn is_grpc_response(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|content_type| content_type.starts_with("application/grpc"))
}
