//! A tiny identity provider: RSA and Ed25519 keys made here, a JWKS served on 127.0.0.1:0,
//! tokens signed with `jsonwebtoken`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const ISSUER: &str = "https://idp.test/auth/v1";
pub const AUDIENCE: &str = "authenticated";

fn base64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key and its public JWK.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub algorithm: Algorithm,
    encoding_key: EncodingKey,
    pub jwk: Value,
}

impl SigningKey {
    pub fn ed25519(kid: &str) -> Self {
        let seed: [u8; 32] = rand::random();
        let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        // PKCS#8 wrapping of an Ed25519 seed: a fixed prefix and the 32 bytes.
        let mut pkcs8 = hex::decode("302e020100300506032b657004220420").expect("hex");
        pkcs8.extend_from_slice(&seed);
        Self {
            kid: kid.to_owned(),
            algorithm: Algorithm::EdDSA,
            encoding_key: EncodingKey::from_ed_der(&pkcs8),
            jwk: json!({
                "kty": "OKP", "crv": "Ed25519", "x": base64url(&public),
                "kid": kid, "alg": "EdDSA", "use": "sig",
            }),
        }
    }

    pub fn rsa(kid: &str) -> Self {
        use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
        use aws_lc_rs::signature::KeyPair as _;
        let private =
            aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa key");
        let pkcs8: Pkcs8V1Der<'_> = private.as_der().expect("pkcs8 der");
        let body = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|chunk| std::str::from_utf8(chunk).expect("ascii"))
            .collect();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        );
        let public = private.public_key();
        Self {
            kid: kid.to_owned(),
            algorithm: Algorithm::RS256,
            encoding_key: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("rsa pem"),
            // No `alg`: the verifier must pick RS256 for an RSA key by itself.
            jwk: json!({
                "kty": "RSA", "n": base64url(public.modulus().big_endian_without_leading_zero()),
                "e": base64url(public.exponent().big_endian_without_leading_zero()), "kid": kid,
                "use": "sig",
            }),
        }
    }

    /// Signs `claims` with this key, naming `kid` in the header.
    pub fn sign_with_kid(&self, claims: &Value, kid: &str) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding_key).expect("sign")
    }

    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_kid(claims, &self.kid)
    }
}

/// Claims of a valid token for `subject`, valid for ten minutes.
pub fn claims(subject: &str, email: Option<&str>) -> Value {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 600,
        "role": "authenticated",
        "user_metadata": { "full_name": "External Person" },
    });
    if let Some(email) = email {
        claims["email"] = json!(email);
    }
    claims
}

/// The JWKS endpoint: its keys can change, and it counts how often it was fetched.
pub struct JwksServer {
    pub url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    pub async fn start(keys: &[&SigningKey]) -> Self {
        let keys = Arc::new(Mutex::new(keys.iter().map(|key| key.jwk.clone()).collect::<Vec<_>>()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let router = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get({
                let keys = keys.clone();
                let fetches = fetches.clone();
                move || {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let document = json!({ "keys": keys.lock().expect("keys").clone() });
                    async move { axum::Json(document) }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind jwks");
        let address = listener.local_addr().expect("jwks address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { url: format!("http://{address}/.well-known/jwks.json"), keys, fetches, task }
    }

    pub fn add_key(&self, key: &SigningKey) {
        self.add_jwk(key.jwk.clone());
    }

    pub fn add_jwk(&self, jwk: Value) {
        self.keys.lock().expect("keys").push(jwk);
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// The `turbocat` flags that trust this provider.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--external-jwks-url".into(),
            self.url.clone(),
            "--external-issuer".into(),
            ISSUER.into(),
            "--external-audience".into(),
            AUDIENCE.into(),
        ]
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
