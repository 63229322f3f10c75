//! The web console: the bundle built from `console/` (committed under `assets/console`, embedded
//! in the binary) served at `/`, with the page itself for every client route (a single-page
//! application). The console talks to the API through grpc-web only; this module only serves
//! files. Paths of the API and of the other pages keep their answers.
//! May call: nothing beyond the embedded files and the request's method, path and headers.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, Method, StatusCode, header};

/// The built bundle (`npm ci && npm run build` in `console/`).
#[derive(rust_embed::Embed)]
#[folder = "assets/console"]
struct ConsoleAssets;

/// The page every client route loads.
const INDEX: &str = "index.html";

/// Vite names the files under `assets/` after a hash of their content: they never change.
const IMMUTABLE_PREFIX: &str = "assets/";

/// The console's own scripts, styles and calls only (grpc-web to the same origin).
pub const CONSOLE_CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'none'; object-src 'none'";

/// Paths that belong to the API or to other pages: never answered with the console.
const RESERVED_PREFIXES: [&str; 6] =
    ["/api/", "/docs", "/health", "/metrics", "/webhooks", "/grpc."];

/// The console's answer to a request no route took, if it is the console's: one of its files,
/// or the page for a client route (a `GET` of an HTML page outside the API's paths).
pub fn response(method: &Method, path: &str, headers: &http::HeaderMap) -> Option<Response> {
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    if RESERVED_PREFIXES.iter().any(|prefix| path.starts_with(prefix))
        || path.starts_with("/turbocat.")
    {
        return None;
    }
    let relative = path.trim_start_matches('/');
    if !relative.is_empty()
        && let Some(file) = ConsoleAssets::get(relative)
    {
        return Some(file_response(relative, &file, headers));
    }
    if !wants_the_page(relative, headers) {
        return None;
    }
    let index = ConsoleAssets::get(INDEX)?;
    Some(file_response(INDEX, &index, headers))
}

/// A client route: no file extension in its last segment, asked for by a browser (or by anyone
/// who does not say what they accept).
fn wants_the_page(relative: &str, headers: &http::HeaderMap) -> bool {
    let last_segment = relative.rsplit('/').next().unwrap_or_default();
    if last_segment.contains('.') {
        return false;
    }
    match headers.get(header::ACCEPT).and_then(|value| value.to_str().ok()) {
        None => true,
        Some(accept) => accept.contains("text/html") || accept.contains("*/*"),
    }
}

fn file_response(
    relative: &str,
    file: &rust_embed::EmbeddedFile,
    request_headers: &http::HeaderMap,
) -> Response {
    let etag = format!("\"{}\"", hex::encode(file.metadata.sha256_hash()));
    let cache_control = if relative.starts_with(IMMUTABLE_PREFIX) {
        "public, max-age=31536000, immutable"
    } else {
        // The page names the current bundle: revalidate it every time (its ETag makes that cheap).
        "no-cache"
    };
    let content_type = match file.metadata.mimetype() {
        mime if mime.starts_with("text/") && !mime.contains("charset") => {
            format!("{mime}; charset=utf-8")
        }
        mime => mime.to_owned(),
    };
    let mut headers: Vec<(HeaderName, HeaderValue)> = vec![
        (header::CACHE_CONTROL, HeaderValue::from_static(cache_control)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONSOLE_CONTENT_SECURITY_POLICY),
        ),
    ];
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.push((header::ETAG, value));
    }
    let not_modified = request_headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|candidate| candidate.trim() == etag));
    if not_modified {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        response.headers_mut().extend(headers);
        return response;
    }
    if let Ok(value) = HeaderValue::from_str(&content_type) {
        headers.push((header::CONTENT_TYPE, value));
    }
    let body = match &file.data {
        std::borrow::Cow::Borrowed(bytes) => Body::from(bytes::Bytes::from_static(bytes)),
        std::borrow::Cow::Owned(bytes) => Body::from(bytes.clone()),
    };
    let mut response = Response::new(body);
    response.headers_mut().extend(headers);
    response
}
