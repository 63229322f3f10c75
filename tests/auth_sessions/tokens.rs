//! Crafted access tokens against an authenticated RPC (`GetCurrentUser`), over both transports:
//! every forgery the token layer must refuse, and one correctly signed control token it accepts.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::flows::claims_of;
use crate::support::{TEST_JWT_SECRET, start_dev};
use crate::{Client, PASSWORD, TRANSPORTS, assert_unauthorized, unique_email};

fn base64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn sign(algorithm: Algorithm, secret: &str, claims: &Value) -> String {
    let header = Header::new(algorithm);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("sign")
}

/// `header.payload.signature` with the header and payload replaced as JSON.
fn reassemble(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes())
    )
}

fn signature_of(token: &str) -> String {
    token.rsplit('.').next().expect("signature").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_access_tokens_are_refused() {
    let (server, _directory) = start_dev(&["--jwt-secret", TEST_JWT_SECRET]);
    for transport in TRANSPORTS {
        let client = Client::new(transport, &server.base_url()).await;
        let pair = client.register(&unique_email("forge"), PASSWORD).await.expect("register");
        let claims = claims_of(&pair.access_token);
        let now = chrono::Utc::now().timestamp();

        // The control: a token we sign ourselves with the server's secret is accepted, so each
        // refusal below is about the one thing that was changed.
        let control = sign(Algorithm::HS256, TEST_JWT_SECRET, &claims);
        assert_eq!(client.me(&control).await.expect("control token"), pair.user_id);

        let with = |field: &str, value: Value| {
            let mut changed = claims.clone();
            changed[field] = value;
            changed
        };
        let forgeries: Vec<(&str, String)> = vec![
            ("alg none", reassemble(&json!({ "alg": "none", "typ": "JWT" }), &claims, "")),
            (
                "alg none with a signature",
                reassemble(
                    &json!({ "alg": "none", "typ": "JWT" }),
                    &claims,
                    &signature_of(&pair.access_token),
                ),
            ),
            (
                "HS256 with another secret",
                sign(Algorithm::HS256, "another-secret-that-is-long-enough-98765", &claims),
            ),
            ("HS512 with the right secret", sign(Algorithm::HS512, TEST_JWT_SECRET, &claims)),
            ("HS384 with the right secret", sign(Algorithm::HS384, TEST_JWT_SECRET, &claims)),
            (
                "RS256 header on an HS256 signature",
                reassemble(
                    &json!({ "alg": "RS256", "typ": "JWT" }),
                    &claims,
                    &signature_of(&pair.access_token),
                ),
            ),
            (
                "tampered payload",
                reassemble(
                    &json!({ "alg": "HS256", "typ": "JWT" }),
                    &with("role", json!("ADMIN")),
                    &signature_of(&pair.access_token),
                ),
            ),
            (
                "tampered subject",
                reassemble(
                    &json!({ "alg": "HS256", "typ": "JWT" }),
                    &with("sub", json!(uuid::Uuid::new_v4().to_string())),
                    &signature_of(&pair.access_token),
                ),
            ),
            (
                "expired",
                sign(Algorithm::HS256, TEST_JWT_SECRET, &{
                    let mut expired = with("exp", json!(now - 3600));
                    expired["iat"] = json!(now - 7200);
                    expired
                }),
            ),
            (
                "wrong audience",
                sign(Algorithm::HS256, TEST_JWT_SECRET, &with("aud", json!("someone-else"))),
            ),
            (
                "wrong issuer",
                sign(Algorithm::HS256, TEST_JWT_SECRET, &with("iss", json!("evil-issuer"))),
            ),
            ("not a jwt", "definitely.not.ajwt".to_owned()),
        ];
        for (attack, token) in &forgeries {
            let failure = assert_unauthorized(client.me(token).await, attack);
            assert_eq!(failure.message, "authentication required", "{transport:?} {attack}");
        }
        // The genuine token still works: the refusals were not a blanket failure.
        assert_eq!(client.me(&pair.access_token).await.expect("genuine"), pair.user_id);
    }
}
