//! Client addresses: an untrusted peer's `X-Forwarded-For` is ignored, a trusted proxy's is
//! believed (its rightmost untrusted hop). Observed in the audit row of each login attempt,
//! over REST and gRPC.

use std::collections::HashMap;

use sqlx::Row;
use turbocat::proto::v1::LoginRequest;
use turbocat::proto::v1::auth_service_client::AuthServiceClient;

use crate::support::start_dev;
use crate::{grpc_channel, grpc_request, http, sqlite_rows};

/// One failed login per case, over both transports; returns the request id of each
/// (case, transport) so its audit row can be found.
async fn failed_logins(base_url: &str, forwarded_for: &[Option<&str>]) -> Vec<(String, String)> {
    let mut auth = AuthServiceClient::new(grpc_channel(base_url).await);
    let mut sent = Vec::new();
    for (index, forwarded) in forwarded_for.iter().enumerate() {
        let email = format!("nobody-{index}@example.com");
        let rest_request_id = uuid::Uuid::new_v4().to_string();
        let mut request = http()
            .post(format!("{base_url}/api/v1/auth/login"))
            .header("x-request-id", &rest_request_id)
            .json(&serde_json::json!({ "email": email, "password": "wrong password" }));
        if let Some(forwarded) = forwarded {
            request = request.header("x-forwarded-for", *forwarded);
        }
        let response = request.send().await.expect("login");
        assert_eq!(response.status(), 401);
        sent.push((format!("rest {forwarded:?}"), rest_request_id));

        let grpc_request_id = uuid::Uuid::new_v4().to_string();
        let mut metadata = vec![("x-request-id", grpc_request_id.as_str())];
        if let Some(forwarded) = forwarded {
            metadata.push(("x-forwarded-for", forwarded));
        }
        let login = LoginRequest { email, password: "wrong password".into() };
        let status = auth.login(grpc_request(login, &metadata)).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        sent.push((format!("grpc {forwarded:?}"), grpc_request_id));
    }
    sent
}

async fn audited_addresses(data_dir: &std::path::Path) -> HashMap<String, Option<String>> {
    sqlite_rows(
        data_dir,
        "SELECT request_id, ip_address FROM audit_logs WHERE action = 'auth.login' \
         AND outcome = 'FAILURE'",
    )
    .await
    .iter()
    .map(|row| (row.get::<String, _>("request_id"), row.get::<Option<String>, _>("ip_address")))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_peer_cannot_choose_its_address() {
    let (server, data_dir) = start_dev(&[]);
    let cases = [Some("203.0.113.9"), Some("198.51.100.7, 203.0.113.9"), None];
    let sent = failed_logins(&server.base_url(), &cases).await;
    let audited = audited_addresses(data_dir.path()).await;
    assert_eq!(audited.len(), sent.len(), "one audit row per attempt: {audited:?}");
    for (case, request_id) in sent {
        assert_eq!(
            audited.get(&request_id).cloned().flatten().as_deref(),
            Some("127.0.0.1"),
            "{case}: the peer's own address, whatever it forwards"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_passes_on_the_client_address() {
    let (server, data_dir) = start_dev(&["--trusted-proxies", "127.0.0.1,10.0.0.2"]);
    let cases = [
        (Some("203.0.113.9"), "203.0.113.9"),
        // A client may prepend anything: only the hop the proxy appended is believed.
        (Some("198.51.100.7, 203.0.113.10"), "203.0.113.10"),
        // Hops of trusted proxies are skipped.
        (Some("203.0.113.11, 10.0.0.2"), "203.0.113.11"),
        (Some("2001:db8::7"), "2001:db8::7"),
        // Nothing usable: the proxy itself.
        (Some("not-an-address"), "127.0.0.1"),
        (None, "127.0.0.1"),
    ];
    let forwarded: Vec<Option<&str>> = cases.iter().map(|(forwarded, _)| *forwarded).collect();
    let sent = failed_logins(&server.base_url(), &forwarded).await;
    let audited = audited_addresses(data_dir.path()).await;
    assert_eq!(audited.len(), sent.len(), "one audit row per attempt: {audited:?}");
    // Each case was sent twice (REST, then gRPC).
    for ((case, request_id), expected) in
        sent.iter().zip(cases.iter().flat_map(|(_, expected)| [*expected, *expected]))
    {
        assert_eq!(audited.get(request_id).cloned().flatten().as_deref(), Some(expected), "{case}");
    }
}
