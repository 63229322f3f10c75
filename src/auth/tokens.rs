//! Access tokens (JWT) and refresh/reset secrets. The signing algorithm is fixed by config
//! (HS256 with a shared secret, or EdDSA / RS256 with a PEM key pair); a token with any other
//! algorithm, `alg: none`, a bad signature, a wrong issuer or audience, or an expired `exp` is
//! refused. Refresh and reset tokens are 256 random bits, handed out once and stored only as
//! SHA-256 hashes.
//! May call: config (secrets and setting errors).

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use uuid::Uuid;

use crate::config::{JwtAlgorithm, Secret, SettingError};
use crate::store::UserRole;

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The user id.
    pub sub: String,
    pub role: String,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    /// Unique id of this token.
    pub jti: String,
    /// The session the token belongs to; revoking it refuses the token.
    pub sid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is invalid: {0}")]
    Invalid(String),
    #[error("the token cannot be signed: {0}")]
    Signing(String),
}

/// The key access tokens are signed with.
#[derive(Clone)]
pub enum SigningKey {
    /// HS256 with a shared secret (at least 32 bytes).
    Hs256(Secret),
    /// EdDSA or RS256 with a key pair read from PEM files, checked to belong together.
    KeyPair(KeyPair),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hs256(secret) => formatter.debug_tuple("Hs256").field(secret).finish(),
            Self::KeyPair(pair) => formatter
                .debug_struct("KeyPair")
                .field("algorithm", &pair.algorithm)
                .field("key_id", &pair.key_id)
                .finish_non_exhaustive(),
        }
    }
}

/// An asymmetric key pair: the private half signs, the public half verifies.
#[derive(Clone)]
pub struct KeyPair {
    algorithm: Algorithm,
    key_id: String,
    encoding_key: EncodingKey,
    decoding_key: DecodingKey,
}

/// Which half of a key pair a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyHalf {
    Private,
    Public,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyPairError {
    #[error("not a usable key for {algorithm}: {cause}")]
    WrongKey { half: KeyHalf, algorithm: &'static str, cause: String },
    #[error("the private and public keys are not two halves of one key pair")]
    Mismatch,
    #[error("HS256 uses --jwt-secret, not a key pair")]
    NotAsymmetric,
}

impl KeyPair {
    /// Reads a key pair from PEM text: PKCS#8 for Ed25519; PKCS#8 or PKCS#1 for RSA. A token is
    /// signed and verified once to prove the two halves belong together.
    pub fn from_pem(
        algorithm: JwtAlgorithm,
        private_pem: &[u8],
        public_pem: &[u8],
    ) -> Result<Self, KeyPairError> {
        let (jwt_algorithm, expected, algorithm_name) = match algorithm {
            JwtAlgorithm::Hs256 => return Err(KeyPairError::NotAsymmetric),
            JwtAlgorithm::EdDsa => (Algorithm::EdDSA, "Ed25519", "EdDSA"),
            JwtAlgorithm::Rs256 => (Algorithm::RS256, "RSA", "RS256"),
        };
        let wrong_key = |half: KeyHalf, cause: jsonwebtoken::errors::Error| {
            let kind = match half {
                KeyHalf::Private => "private",
                KeyHalf::Public => "public",
            };
            KeyPairError::WrongKey {
                half,
                algorithm: algorithm_name,
                cause: format!("expected a PEM {expected} {kind} key ({cause})"),
            }
        };
        let (encoding_key, decoding_key) = match jwt_algorithm {
            Algorithm::EdDSA => (
                EncodingKey::from_ed_pem(private_pem)
                    .map_err(|error| wrong_key(KeyHalf::Private, error))?,
                DecodingKey::from_ed_pem(public_pem)
                    .map_err(|error| wrong_key(KeyHalf::Public, error))?,
            ),
            _ => (
                EncodingKey::from_rsa_pem(private_pem)
                    .map_err(|error| wrong_key(KeyHalf::Private, error))?,
                DecodingKey::from_rsa_pem(public_pem)
                    .map_err(|error| wrong_key(KeyHalf::Public, error))?,
            ),
        };
        let key_id = key_id_of(&pem_body(public_pem));
        let pair = Self { algorithm: jwt_algorithm, key_id, encoding_key, decoding_key };
        pair.check_halves_match()?;
        Ok(pair)
    }

    /// Signs a probe and verifies it: a broken private key fails to sign, a public key of
    /// another pair fails to verify.
    fn check_halves_match(&self) -> Result<(), KeyPairError> {
        let probe = serde_json::json!({ "probe": "turbocat key pair check" });
        let token = jsonwebtoken::encode(&Header::new(self.algorithm), &probe, &self.encoding_key)
            .map_err(|error| KeyPairError::WrongKey {
                half: KeyHalf::Private,
                algorithm: algorithm_name(self.algorithm),
                cause: format!("cannot sign with it: {error}"),
            })?;
        let mut validation = Validation::new(self.algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_aud = false;
        jsonwebtoken::decode::<serde_json::Value>(&token, &self.decoding_key, &validation)
            .map(|_| ())
            .map_err(|_| KeyPairError::Mismatch)
    }
}

fn algorithm_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::EdDSA => "EdDSA",
        Algorithm::RS256 => "RS256",
        _ => "HS256",
    }
}

/// The bytes inside a PEM file's armour (base64-decoded), or the file itself when it has none.
fn pem_body(pem: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(pem);
    let body: String = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).unwrap_or_else(|_| pem.to_vec())
}

/// A key id names a key without revealing it: the first 8 bytes of its SHA-256, in hex.
fn key_id_of(key_bytes: &[u8]) -> String {
    hex::encode(&sha2::Sha256::digest(key_bytes)[..8])
}

/// The signing key that `--jwt-algorithm`, `--jwt-private-key-file` and
/// `--jwt-public-key-file` name. `hs256_secret` is asked for only with HS256. Each problem names
/// its flag: a missing or unreadable file, or a key of the wrong type for the algorithm.
pub fn signing_key_from_settings<E: From<SettingError>>(
    algorithm: JwtAlgorithm,
    private_key_file: Option<&Path>,
    public_key_file: Option<&Path>,
    hs256_secret: impl FnOnce() -> Result<Secret, E>,
) -> Result<SigningKey, E> {
    let private_error = private_key_file_error;
    let public_error = public_key_file_error;
    if algorithm == JwtAlgorithm::Hs256 {
        if private_key_file.is_some() {
            return Err(
                private_error("only used with --jwt-algorithm EdDSA or RS256".into()).into()
            );
        }
        if public_key_file.is_some() {
            return Err(public_error("only used with --jwt-algorithm EdDSA or RS256".into()).into());
        }
        return Ok(SigningKey::Hs256(hs256_secret()?));
    }
    let required = "required with --jwt-algorithm EdDSA or RS256".to_owned();
    let private_path = private_key_file.ok_or_else(|| private_error(required.clone()))?;
    let public_path = public_key_file.ok_or_else(|| public_error(required))?;
    load_key_pair(algorithm, private_path, public_path).map_err(E::from)
}

fn private_key_file_error(problem: String) -> SettingError {
    SettingError {
        flag: "--jwt-private-key-file",
        variable: "TURBOCAT_JWT_PRIVATE_KEY_FILE",
        problem,
    }
}

fn public_key_file_error(problem: String) -> SettingError {
    SettingError {
        flag: "--jwt-public-key-file",
        variable: "TURBOCAT_JWT_PUBLIC_KEY_FILE",
        problem,
    }
}

fn load_key_pair(
    algorithm: JwtAlgorithm,
    private_path: &Path,
    public_path: &Path,
) -> Result<SigningKey, SettingError> {
    let private_error = private_key_file_error;
    let public_error = public_key_file_error;
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
    };
    let private_pem = read(private_path).map_err(private_error)?;
    let public_pem = read(public_path).map_err(public_error)?;
    KeyPair::from_pem(algorithm, &private_pem, &public_pem).map(SigningKey::KeyPair).map_err(
        |error| match &error {
            KeyPairError::WrongKey { half: KeyHalf::Private, .. } => {
                private_error(format!("{}: {error}", private_path.display()))
            }
            KeyPairError::WrongKey { half: KeyHalf::Public, .. } => {
                public_error(format!("{}: {error}", public_path.display()))
            }
            KeyPairError::Mismatch | KeyPairError::NotAsymmetric => public_error(format!(
                "{} and {}: {error}",
                private_path.display(),
                public_path.display()
            )),
        },
    )
}

/// Settings of the token service.
#[derive(Clone)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    pub access_token_lifetime: Duration,
    pub refresh_token_lifetime: Duration,
    pub signing_key: SigningKey,
}

impl std::fmt::Debug for TokenSettings {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TokenSettings")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("access_token_lifetime", &self.access_token_lifetime)
            .field("refresh_token_lifetime", &self.refresh_token_lifetime)
            .field("signing_key", &self.signing_key)
            .finish()
    }
}

impl TokenSettings {
    /// HS256 with `secret`.
    pub fn new(secret: Secret) -> Self {
        Self::with_signing_key(SigningKey::Hs256(secret))
    }

    pub fn with_signing_key(signing_key: SigningKey) -> Self {
        Self {
            issuer: "turbocat".to_owned(),
            audience: "turbocat-api".to_owned(),
            access_token_lifetime: Duration::from_secs(15 * 60),
            refresh_token_lifetime: Duration::from_secs(7 * 24 * 60 * 60),
            signing_key,
        }
    }
}

/// Signs and verifies access tokens.
pub struct TokenService {
    settings: TokenSettings,
    algorithm: Algorithm,
    key_id: String,
    encoding_key: EncodingKey,
    decoding_key: DecodingKey,
}

/// A freshly issued access token.
#[derive(Debug, Clone)]
pub struct IssuedAccessToken {
    pub token: String,
    pub expires_in: Duration,
}

impl TokenService {
    pub fn new(settings: TokenSettings) -> Self {
        let (algorithm, key_id, encoding_key, decoding_key) = match &settings.signing_key {
            SigningKey::Hs256(secret) => {
                let secret = secret.expose().as_bytes();
                (
                    Algorithm::HS256,
                    key_id_of(secret),
                    EncodingKey::from_secret(secret),
                    DecodingKey::from_secret(secret),
                )
            }
            SigningKey::KeyPair(pair) => (
                pair.algorithm,
                pair.key_id.clone(),
                pair.encoding_key.clone(),
                pair.decoding_key.clone(),
            ),
        };
        Self { algorithm, key_id, encoding_key, decoding_key, settings }
    }

    /// The algorithm tokens are signed with, and the only one accepted.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The `kid` header of the tokens this service signs.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn settings(&self) -> &TokenSettings {
        &self.settings
    }

    /// Issues an access token for `user_id` in `session_id`.
    pub fn issue_access_token(
        &self,
        user_id: Uuid,
        role: UserRole,
        session_id: Uuid,
    ) -> Result<IssuedAccessToken, TokenError> {
        let now = chrono::Utc::now().timestamp();
        let lifetime = self.settings.access_token_lifetime;
        let claims = AccessClaims {
            sub: user_id.to_string(),
            role: role.as_str().to_owned(),
            iss: self.settings.issuer.clone(),
            aud: self.settings.audience.clone(),
            iat: now,
            exp: now + i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2),
            jti: Uuid::new_v4().to_string(),
            sid: session_id.to_string(),
        };
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.key_id.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding_key)
            .map_err(|error| TokenError::Signing(error.to_string()))?;
        Ok(IssuedAccessToken { token, expires_in: lifetime })
    }

    /// Verifies an access token's algorithm, signature, issuer, audience and expiry.
    pub fn verify_access_token(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let mut validation = Validation::new(self.algorithm);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = 5;
        jsonwebtoken::decode::<AccessClaims>(token, &self.decoding_key, &validation)
            .map(|data| data.claims)
            .map_err(|error| TokenError::Invalid(error.to_string()))
    }
}

/// A new opaque secret: 256 random bits, base64url without padding.
pub fn new_opaque_token() -> String {
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The stored form of an opaque secret: lowercase hex SHA-256.
pub fn hash_opaque_token(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HS256_SECRET: &str = "unit-test-secret-that-is-long-enough-0123";

    fn pem(label: &str, der: &[u8]) -> String {
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|chunk| std::str::from_utf8(chunk).unwrap_or_default())
            .collect();
        format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
    }

    /// (private PKCS#8 PEM, public SPKI PEM) of a fresh Ed25519 key.
    fn ed25519_pems() -> (String, String) {
        let mut seed = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut seed);
        let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        let private_der = [hex::decode("302e020100300506032b657004220420").unwrap(), seed.to_vec()];
        let public_der = [hex::decode("302a300506032b6570032100").unwrap(), public.to_vec()];
        (pem("PRIVATE KEY", &private_der.concat()), pem("PUBLIC KEY", &public_der.concat()))
    }

    /// (private PKCS#8 PEM, public SPKI PEM) of a fresh 2048-bit RSA key.
    fn rsa_pems() -> (String, String) {
        use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
        use aws_lc_rs::signature::KeyPair as _;
        let private = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let private_der: Pkcs8V1Der<'_> = private.as_der().unwrap();
        let public_der: PublicKeyX509Der<'_> = private.public_key().as_der().unwrap();
        (pem("PRIVATE KEY", private_der.as_ref()), pem("PUBLIC KEY", public_der.as_ref()))
    }

    fn service(algorithm: JwtAlgorithm, private_pem: &str, public_pem: &str) -> TokenService {
        let pair =
            KeyPair::from_pem(algorithm, private_pem.as_bytes(), public_pem.as_bytes()).unwrap();
        TokenService::new(TokenSettings::with_signing_key(SigningKey::KeyPair(pair)))
    }

    fn issue(service: &TokenService) -> String {
        service.issue_access_token(Uuid::new_v4(), UserRole::User, Uuid::new_v4()).unwrap().token
    }

    fn claims_of(token: &str) -> AccessClaims {
        let payload = token.split('.').nth(1).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn hs256_forgery(claims: &AccessClaims, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn eddsa_tokens_round_trip_with_a_public_key_kid() {
        let (private_pem, public_pem) = ed25519_pems();
        let tokens = service(JwtAlgorithm::EdDsa, &private_pem, &public_pem);
        let token = issue(&tokens);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::EdDSA);
        let expected_kid = key_id_of(&pem_body(public_pem.as_bytes()));
        assert_eq!(header.kid.as_deref(), Some(expected_kid.as_str()));
        assert_eq!(expected_kid.len(), 16);
        assert_eq!(tokens.verify_access_token(&token).unwrap(), claims_of(&token));
        // The kid names the public key, not the private one.
        assert_ne!(expected_kid, key_id_of(&pem_body(private_pem.as_bytes())));
    }

    #[test]
    fn algorithm_confusion_and_foreign_keys_are_refused() {
        let (private_pem, public_pem) = ed25519_pems();
        let tokens = service(JwtAlgorithm::EdDsa, &private_pem, &public_pem);
        let claims = claims_of(&issue(&tokens));
        for secret in [public_pem.as_bytes().to_vec(), pem_body(public_pem.as_bytes())] {
            let forged = hs256_forgery(&claims, &secret);
            assert!(tokens.verify_access_token(&forged).is_err(), "hs256 with the public key");
        }
        let (other_private, _) = ed25519_pems();
        let foreign = jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &EncodingKey::from_ed_pem(other_private.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(tokens.verify_access_token(&foreign).is_err(), "another ed25519 key");
        // An HS256 service refuses EdDSA tokens, even well-formed ones.
        let hs256 = TokenService::new(TokenSettings::new(Secret::new(HS256_SECRET)));
        assert!(hs256.verify_access_token(&issue(&tokens)).is_err());
        assert!(tokens.verify_access_token(&issue(&hs256)).is_err());
    }

    #[test]
    fn rs256_round_trips_and_refuses_hs256_with_its_public_key() {
        let (private_pem, public_pem) = rsa_pems();
        let tokens = service(JwtAlgorithm::Rs256, &private_pem, &public_pem);
        let token = issue(&tokens);
        assert_eq!(jsonwebtoken::decode_header(&token).unwrap().alg, Algorithm::RS256);
        assert!(tokens.verify_access_token(&token).is_ok());
        let forged = hs256_forgery(&claims_of(&token), public_pem.as_bytes());
        assert!(tokens.verify_access_token(&forged).is_err());
        // RSA keys do not pass for EdDSA, nor Ed25519 keys for RS256.
        let (ed_private, ed_public) = ed25519_pems();
        let wrong =
            KeyPair::from_pem(JwtAlgorithm::EdDsa, private_pem.as_bytes(), ed_public.as_bytes());
        assert!(matches!(wrong, Err(KeyPairError::WrongKey { half: KeyHalf::Private, .. })));
        let wrong =
            KeyPair::from_pem(JwtAlgorithm::Rs256, private_pem.as_bytes(), ed_public.as_bytes());
        assert!(matches!(wrong, Err(KeyPairError::WrongKey { half: KeyHalf::Public, .. })));
        let wrong =
            KeyPair::from_pem(JwtAlgorithm::Rs256, ed_private.as_bytes(), public_pem.as_bytes());
        assert!(matches!(wrong, Err(KeyPairError::WrongKey { half: KeyHalf::Private, .. })));
    }

    #[test]
    fn halves_of_different_pairs_and_swapped_halves_are_refused() {
        let (private_pem, _) = ed25519_pems();
        let (_, other_public) = ed25519_pems();
        let mismatch =
            KeyPair::from_pem(JwtAlgorithm::EdDsa, private_pem.as_bytes(), other_public.as_bytes());
        assert!(matches!(mismatch, Err(KeyPairError::Mismatch)));
        let swapped =
            KeyPair::from_pem(JwtAlgorithm::EdDsa, other_public.as_bytes(), private_pem.as_bytes());
        assert!(matches!(swapped, Err(KeyPairError::WrongKey { half: KeyHalf::Private, .. })));
    }

    #[test]
    fn settings_errors_name_the_flag() {
        let no_secret = || -> Result<Secret, SettingError> { panic!("hs256 secret not needed") };
        let error =
            signing_key_from_settings(JwtAlgorithm::EdDsa, None, None, no_secret).unwrap_err();
        assert_eq!(error.flag, "--jwt-private-key-file");
        let directory = tempfile::tempdir().unwrap();
        let (private_pem, public_pem) = ed25519_pems();
        let private_path = directory.path().join("private.pem");
        let public_path = directory.path().join("public.pem");
        std::fs::write(&private_path, &private_pem).unwrap();
        let error =
            signing_key_from_settings(JwtAlgorithm::EdDsa, Some(&private_path), None, no_secret)
                .unwrap_err();
        assert_eq!(error.flag, "--jwt-public-key-file");
        let error = signing_key_from_settings(
            JwtAlgorithm::EdDsa,
            Some(&private_path),
            Some(&public_path),
            no_secret,
        )
        .unwrap_err();
        assert_eq!(error.flag, "--jwt-public-key-file");
        assert!(error.to_string().contains("cannot read"), "{error}");
        std::fs::write(&public_path, &public_pem).unwrap();
        let error = signing_key_from_settings(
            JwtAlgorithm::Rs256,
            Some(&private_path),
            Some(&public_path),
            no_secret,
        )
        .unwrap_err();
        assert_eq!(error.flag, "--jwt-private-key-file");
        assert!(error.to_string().contains("RS256"), "{error}");
        assert!(!error.to_string().contains(private_pem.lines().nth(1).unwrap()), "{error}");
        let key = signing_key_from_settings(
            JwtAlgorithm::EdDsa,
            Some(&private_path),
            Some(&public_path),
            no_secret,
        )
        .unwrap();
        assert!(matches!(key, SigningKey::KeyPair(_)));
        assert!(!format!("{key:?}").contains(private_pem.lines().nth(1).unwrap()));
        let error =
            signing_key_from_settings(JwtAlgorithm::Hs256, Some(&private_path), None, || {
                Ok::<_, SettingError>(Secret::new(HS256_SECRET))
            })
            .unwrap_err();
        assert_eq!(error.flag, "--jwt-private-key-file");
        let key = signing_key_from_settings(JwtAlgorithm::Hs256, None, None, || {
            Ok::<_, SettingError>(Secret::new(HS256_SECRET))
        })
        .unwrap();
        assert!(matches!(key, SigningKey::Hs256(_)));
    }
}
