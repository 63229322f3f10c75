//! Security headers: on every REST and health response, never on gRPC or grpc-web ones; HSTS
//! only when a trusted proxy says the client spoke TLS.

use prost::Message;
use turbocat::proto::v1::LoginRequest;
use turbocat::proto::v1::auth_service_client::AuthServiceClient;

use crate::support::start_dev;
use crate::{grpc_channel, grpc_request, http};

const HSTS: &str = "max-age=31536000; includeSubDomains";
const FIXED_HEADERS: [(&str, &str); 5] = [
    ("x-content-type-options", "nosniff"),
    ("content-security-policy", "frame-ancestors 'none'"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
];
const ALL_HEADER_NAMES: [&str; 6] = [
    "x-content-type-options",
    "content-security-policy",
    "x-frame-options",
    "referrer-policy",
    "cache-control",
    "strict-transport-security",
];

fn assert_fixed_headers(headers: &http::HeaderMap, what: &str) {
    for (name, expected) in FIXED_HEADERS {
        let value = headers.get(name).and_then(|value| value.to_str().ok());
        assert_eq!(value, Some(expected), "{name} on {what}");
    }
}

fn hsts_of(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("strict-transport-security")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

fn bad_login() -> serde_json::Value {
    serde_json::json!({ "email": "nobody@example.com", "password": "wrong password" })
}

/// A REST call of each kind: health, readiness, an API error, an unknown API route.
async fn rest_responses(
    base_url: &str,
    forwarded_proto: Option<&str>,
) -> Vec<(String, http::HeaderMap)> {
    let client = http();
    let with_proto = |builder: reqwest::RequestBuilder| match forwarded_proto {
        Some(protocol) => builder.header("x-forwarded-proto", protocol),
        None => builder,
    };
    let mut responses = Vec::new();
    for path in ["/health", "/health/ready", "/api/v1/users/me", "/api/v1/no-such-route"] {
        let response =
            with_proto(client.get(format!("{base_url}{path}"))).send().await.expect("get");
        responses.push((format!("GET {path} ({})", response.status()), response.headers().clone()));
    }
    let response = with_proto(client.post(format!("{base_url}/api/v1/auth/login")))
        .json(&bad_login())
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), 401, "a bad login is refused");
    responses.push(("POST /api/v1/auth/login (401)".to_owned(), response.headers().clone()));
    let response =
        with_proto(client.delete(format!("{base_url}/health"))).send().await.expect("delete");
    assert_eq!(response.status(), 405);
    responses.push(("DELETE /health (405)".to_owned(), response.headers().clone()));
    responses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_responses_carry_the_security_headers_and_grpc_responses_do_not() {
    let (server, _data_dir) = start_dev(&[]);
    let base_url = server.base_url();

    // REST and health, with an https claim from a peer that is no trusted proxy: no HSTS.
    for (what, headers) in rest_responses(&base_url, Some("https")).await {
        assert_fixed_headers(&headers, &what);
        assert_eq!(hsts_of(&headers), None, "an untrusted peer cannot turn on HSTS ({what})");
    }

    // Native gRPC: an error and a success carry none of them.
    let mut auth = AuthServiceClient::new(grpc_channel(&base_url).await);
    let login =
        LoginRequest { email: "nobody@example.com".into(), password: "wrong password".into() };
    let status = auth
        .login(grpc_request(login.clone(), &[("x-forwarded-proto", "https")]))
        .await
        .expect_err("a bad login is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(grpc_channel(&base_url).await);
    let healthy = health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health check");
    for (what, metadata) in [("grpc error", status.metadata()), ("grpc health", healthy.metadata())]
    {
        let headers = metadata.clone().into_headers();
        for name in ALL_HEADER_NAMES {
            assert!(!headers.contains_key(name), "{name} must not be on a {what} response");
        }
    }

    // grpc-web, as a browser sends it.
    let message = login.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    framed.extend_from_slice(&message);
    let response = http()
        .post(format!("{base_url}/turbocat.v1.AuthService/Login"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(framed)
        .send()
        .await
        .expect("grpc-web");
    assert_eq!(response.status(), 200);
    let content_type = response.headers().get("content-type").and_then(|value| value.to_str().ok());
    assert!(content_type.is_some_and(|value| value.starts_with("application/grpc-web")));
    for name in ALL_HEADER_NAMES {
        assert!(!response.headers().contains_key(name), "{name} must not be on grpc-web");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_is_sent_only_when_a_trusted_proxy_forwarded_https() {
    let (server, _data_dir) = start_dev(&["--trusted-proxies", "10.9.9.9,127.0.0.1"]);
    let base_url = server.base_url();

    for (what, headers) in rest_responses(&base_url, Some("https")).await {
        assert_fixed_headers(&headers, &what);
        assert_eq!(hsts_of(&headers).as_deref(), Some(HSTS), "{what} over https");
    }
    // A chain of proxies: the first value is the client's side.
    let chained = http()
        .get(format!("{base_url}/health"))
        .header("x-forwarded-proto", "HTTPS, http")
        .send()
        .await
        .expect("health");
    assert_eq!(hsts_of(chained.headers()).as_deref(), Some(HSTS));
    for forwarded_proto in [Some("http"), None] {
        for (what, headers) in rest_responses(&base_url, forwarded_proto).await {
            assert_fixed_headers(&headers, &what);
            assert_eq!(hsts_of(&headers), None, "{what} over {forwarded_proto:?}");
        }
    }

    // gRPC stays free of them even over a trusted https proxy.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(grpc_channel(&base_url).await);
    let healthy = health
        .check(grpc_request(
            tonic_health::pb::HealthCheckRequest { service: String::new() },
            &[("x-forwarded-proto", "https")],
        ))
        .await
        .expect("health check");
    let headers = healthy.metadata().clone().into_headers();
    for name in ALL_HEADER_NAMES {
        assert!(!headers.contains_key(name), "{name} must not be on gRPC");
    }
}
