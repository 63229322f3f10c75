//! Access tokens signed with a key pair from PEM files (`--jwt-algorithm EdDSA|RS256`), through
//! the real `turbocat` binary over REST and gRPC: register and GetCurrentUser work; an HS256
//! token keyed with the public key (algorithm confusion) and a token from another key are
//! refused; bad key settings stop start-up with an error naming the flag.

#[path = "../support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::Digest;
use turbocat::proto::v1 as pb;
use turbocat::proto::v1::auth_service_client::AuthServiceClient;
use turbocat::proto::v1::user_service_client::UserServiceClient;

const PASSWORD: &str = "correct horse battery staple";

fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|chunk| std::str::from_utf8(chunk).expect("base64 is ascii"))
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// A PEM key pair written to a directory.
struct KeyFiles {
    private_pem: String,
    public_pem: String,
    private_path: PathBuf,
    public_path: PathBuf,
}

impl KeyFiles {
    fn write(directory: &Path, name: &str, private_pem: String, public_pem: String) -> Self {
        let private_path = directory.join(format!("{name}-private.pem"));
        let public_path = directory.join(format!("{name}-public.pem"));
        std::fs::write(&private_path, &private_pem).expect("write private key");
        std::fs::write(&public_path, &public_pem).expect("write public key");
        Self { private_pem, public_pem, private_path, public_path }
    }

    fn ed25519(directory: &Path, name: &str) -> Self {
        let mut seed = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut seed);
        let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        let private_der =
            [hex::decode("302e020100300506032b657004220420").expect("hex"), seed.to_vec()];
        let public_der = [hex::decode("302a300506032b6570032100").expect("hex"), public.to_vec()];
        Self::write(
            directory,
            name,
            pem("PRIVATE KEY", &private_der.concat()),
            pem("PUBLIC KEY", &public_der.concat()),
        )
    }

    /// A fresh 2048-bit RSA key: PKCS#8 private and SPKI public PEM.
    fn rsa(directory: &Path, name: &str) -> Self {
        use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
        use aws_lc_rs::signature::KeyPair as _;
        let private =
            aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa key");
        let private_der: Pkcs8V1Der<'_> = private.as_der().expect("pkcs8 der");
        let public_der: PublicKeyX509Der<'_> = private.public_key().as_der().expect("spki der");
        Self::write(
            directory,
            name,
            pem("PRIVATE KEY", private_der.as_ref()),
            pem("PUBLIC KEY", public_der.as_ref()),
        )
    }

    fn arguments<'a>(&'a self, algorithm: &'a str) -> Vec<&'a str> {
        vec![
            "--jwt-algorithm",
            algorithm,
            "--jwt-private-key-file",
            self.private_path.to_str().expect("utf-8 path"),
            "--jwt-public-key-file",
            self.public_path.to_str().expect("utf-8 path"),
        ]
    }

    fn public_der(&self) -> Vec<u8> {
        let body: String =
            self.public_pem.lines().filter(|line| !line.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).expect("pem body")
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("http client")
}

#[derive(Debug, Clone, Copy)]
enum Transport {
    Rest,
    Grpc,
}

/// Registers a fresh user: its access token.
async fn register(base_url: &str, transport: Transport) -> String {
    let email = format!("keys-{}@example.com", uuid::Uuid::new_v4().simple());
    match transport {
        Transport::Rest => {
            let body = json!({ "email": email, "password": PASSWORD, "fullName": "Kim" });
            let response = http()
                .post(format!("{base_url}/api/v1/auth/register"))
                .json(&body)
                .send()
                .await
                .expect("rest register");
            assert_eq!(response.status().as_u16(), 201);
            let envelope: Value = response.json().await.expect("json");
            envelope["data"]["accessToken"].as_str().expect("accessToken").to_owned()
        }
        Transport::Grpc => {
            let mut auth =
                AuthServiceClient::connect(base_url.to_owned()).await.expect("grpc connect");
            let request = pb::RegisterRequest {
                email,
                password: PASSWORD.to_owned(),
                full_name: "Kim".to_owned(),
            };
            auth.register(request).await.expect("grpc register").into_inner().access_token
        }
    }
}

/// GetCurrentUser with `token`: the user id, or the error code.
async fn current_user(base_url: &str, transport: Transport, token: &str) -> Result<String, String> {
    match transport {
        Transport::Rest => {
            let response = http()
                .get(format!("{base_url}/api/v1/users/me"))
                .bearer_auth(token)
                .send()
                .await
                .expect("rest me");
            let status = response.status().as_u16();
            let envelope: Value = response.json().await.expect("json");
            if envelope["success"] == true {
                assert_eq!(status, 200);
                return Ok(envelope["data"]["id"].as_str().expect("id").to_owned());
            }
            assert_eq!(status, 401, "{envelope}");
            Err(envelope["error"]["code"].as_str().unwrap_or_default().to_owned())
        }
        Transport::Grpc => {
            let mut users =
                UserServiceClient::connect(base_url.to_owned()).await.expect("grpc connect");
            let mut request = tonic::Request::new(pb::GetCurrentUserRequest {});
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("ascii metadata"),
            );
            match users.get_current_user(request).await {
                Ok(response) => Ok(response.into_inner().user.expect("user").id),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
                    Err(turbocat::error::ServiceError::from_status(&status)
                        .code
                        .as_str()
                        .to_owned())
                }
            }
        }
    }
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64");
    serde_json::from_slice(&bytes).expect("claims")
}

fn sign(algorithm: Algorithm, kid: Option<String>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(algorithm);
    header.kid = kid;
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

/// Starts dev with `keys`: tokens work over both transports, forgeries are refused over both.
async fn check_key_pair_server(
    algorithm_flag: &str,
    algorithm: Algorithm,
    keys: &KeyFiles,
    other: &KeyFiles,
) {
    let (server, _data) = support::start_dev(&keys.arguments(algorithm_flag));
    let base_url = server.base_url();
    for transport in [Transport::Rest, Transport::Grpc] {
        let token = register(&base_url, transport).await;
        let header = jsonwebtoken::decode_header(&token).expect("header");
        assert_eq!(header.alg, algorithm);
        let expected_kid = hex::encode(&sha2::Sha256::digest(keys.public_der())[..8]);
        assert_eq!(header.kid.as_deref(), Some(expected_kid.as_str()));
        let claims = claims_of(&token);
        let user_id = claims["sub"].as_str().expect("sub").to_owned();
        for probe in [Transport::Rest, Transport::Grpc] {
            assert_eq!(current_user(&base_url, probe, &token).await, Ok(user_id.clone()));
        }

        // Algorithm confusion: HS256 keyed with the public key, as PEM text and as DER.
        let mut forgeries = vec![
            sign(
                Algorithm::HS256,
                header.kid.clone(),
                &claims,
                &EncodingKey::from_secret(keys.public_pem.as_bytes()),
            ),
            sign(
                Algorithm::HS256,
                header.kid.clone(),
                &claims,
                &EncodingKey::from_secret(&keys.public_der()),
            ),
        ];
        // The same algorithm, another key (with this server's kid).
        let other_key = match algorithm {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(other.private_pem.as_bytes()),
            _ => EncodingKey::from_rsa_pem(other.private_pem.as_bytes()),
        }
        .expect("other key");
        forgeries.push(sign(algorithm, header.kid.clone(), &claims, &other_key));
        // `alg: none`.
        let none_header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = token.split('.').nth(1).expect("payload");
        forgeries.push(format!("{none_header}.{payload}."));
        for (index, forged) in forgeries.iter().enumerate() {
            for probe in [Transport::Rest, Transport::Grpc] {
                assert_eq!(
                    current_user(&base_url, probe, forged).await,
                    Err("UNAUTHORIZED".to_owned()),
                    "forgery {index} over {probe:?} ({transport:?} registration)"
                );
            }
        }
    }
    let log = server.stderr_text();
    let private_body = keys.private_pem.lines().nth(1).expect("pem line");
    assert!(!log.contains(private_body), "the private key in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eddsa_key_files_sign_tokens_and_refuse_forgeries() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let keys = KeyFiles::ed25519(directory.path(), "server");
    let other = KeyFiles::ed25519(directory.path(), "attacker");
    check_key_pair_server("EdDSA", Algorithm::EdDSA, &keys, &other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_key_files_sign_tokens_and_refuse_forgeries() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let keys = KeyFiles::rsa(directory.path(), "server");
    let other = KeyFiles::rsa(directory.path(), "attacker");
    check_key_pair_server("RS256", Algorithm::RS256, &keys, &other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_key_pair_needs_no_jwt_secret() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let keys = KeyFiles::ed25519(directory.path(), "serve");
    let (url, name) = support::create_postgres_database().await;
    let _database = support::ServeDatabase::new(url.clone(), name);
    let redis = support::redis_url();
    let prefix = format!("turbocat-test:{}:ratelimit:", uuid::Uuid::new_v4().simple());
    let mut arguments = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        url.as_str(),
        "--redis-url",
        redis.as_str(),
        "--rate-limit-key-prefix",
        prefix.as_str(),
    ];
    let (success, _, stderr) = support::run_turbocat(&arguments, &[]);
    assert!(!success);
    assert!(stderr.contains("--jwt-secret"), "HS256 needs the secret: {stderr}");
    arguments.extend(keys.arguments("eddsa"));
    let server = tokio::task::spawn_blocking({
        let arguments: Vec<String> =
            arguments.iter().map(|argument| argument.to_string()).collect();
        move || {
            let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
            support::start_turbocat(&arguments, &[])
        }
    })
    .await
    .expect("start serve");
    let base_url = server.base_url();
    for transport in [Transport::Rest, Transport::Grpc] {
        let token = register(&base_url, transport).await;
        assert_eq!(jsonwebtoken::decode_header(&token).expect("header").alg, Algorithm::EdDSA);
        let user_id = claims_of(&token)["sub"].as_str().expect("sub").to_owned();
        for probe in [Transport::Rest, Transport::Grpc] {
            assert_eq!(current_user(&base_url, probe, &token).await, Ok(user_id.clone()));
        }
    }
}

#[test]
fn bad_key_settings_stop_start_up_naming_the_flag() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let ed = KeyFiles::ed25519(directory.path(), "ed");
    let other_ed = KeyFiles::ed25519(directory.path(), "other-ed");
    let rsa = KeyFiles::rsa(directory.path(), "rsa");
    let data_dir = directory.path().join("data");
    let data_dir = data_dir.to_str().expect("utf-8 path");
    let start = |extra: &[&str]| {
        let mut arguments = vec!["dev", "--listen", "127.0.0.1:0", "--data-dir", data_dir];
        arguments.extend_from_slice(extra);
        let (success, _, stderr) = support::run_turbocat(&arguments, &[]);
        assert!(!success, "{extra:?} must not start");
        stderr
    };
    let path = |path: &PathBuf| path.to_str().expect("utf-8 path").to_owned();
    let missing = directory.path().join("missing.pem");
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (vec!["--jwt-algorithm".into(), "EdDSA".into()], "--jwt-private-key-file", "required"),
        (
            vec![
                "--jwt-algorithm".into(),
                "EdDSA".into(),
                "--jwt-private-key-file".into(),
                path(&ed.private_path),
            ],
            "--jwt-public-key-file",
            "required",
        ),
        (
            vec![
                "--jwt-algorithm".into(),
                "EdDSA".into(),
                "--jwt-private-key-file".into(),
                path(&missing),
                "--jwt-public-key-file".into(),
                path(&ed.public_path),
            ],
            "--jwt-private-key-file",
            "cannot read",
        ),
        (
            vec![
                "--jwt-algorithm".into(),
                "EdDSA".into(),
                "--jwt-private-key-file".into(),
                path(&rsa.private_path),
                "--jwt-public-key-file".into(),
                path(&rsa.public_path),
            ],
            "--jwt-private-key-file",
            "EdDSA",
        ),
        (
            vec![
                "--jwt-algorithm".into(),
                "RS256".into(),
                "--jwt-private-key-file".into(),
                path(&rsa.private_path),
                "--jwt-public-key-file".into(),
                path(&ed.public_path),
            ],
            "--jwt-public-key-file",
            "RS256",
        ),
        (
            vec![
                "--jwt-algorithm".into(),
                "EdDSA".into(),
                "--jwt-private-key-file".into(),
                path(&ed.private_path),
                "--jwt-public-key-file".into(),
                path(&other_ed.public_path),
            ],
            "--jwt-public-key-file",
            "not two halves of one key pair",
        ),
        (
            vec!["--jwt-private-key-file".into(), path(&ed.private_path)],
            "--jwt-private-key-file",
            "only used with",
        ),
        (
            vec![
                "--jwt-algorithm".into(),
                "EdDSA".into(),
                "--jwt-private-key-file".into(),
                path(&ed.private_path),
                "--jwt-public-key-file".into(),
                path(&ed.public_path),
                "--jwt-secret".into(),
                "an-hs256-secret-that-would-be-ignored".into(),
            ],
            "--jwt-secret",
            "is not used with --jwt-algorithm EdDSA or RS256",
        ),
    ];
    for (arguments, flag, problem) in cases {
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        let stderr = start(&arguments);
        assert!(stderr.contains(flag), "{arguments:?}: {stderr}");
        assert!(stderr.contains(problem), "{arguments:?}: {stderr}");
        for secret_line in [&ed.private_pem, &rsa.private_pem] {
            assert!(!stderr.contains(secret_line.lines().nth(1).expect("pem line")), "{stderr}");
        }
    }
}
