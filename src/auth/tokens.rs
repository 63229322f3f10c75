//! Access tokens (JWT) and refresh/reset secrets. The signing algorithm is fixed by config; a
//! token with any other algorithm, `alg: none`, a bad signature, a wrong issuer or audience, or
//! an expired `exp` is refused. Refresh and reset tokens are 256 random bits, handed out once
//! and stored only as SHA-256 hashes.

use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use uuid::Uuid;

use crate::config::Secret;
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

/// Settings of the token service.
#[derive(Clone)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    pub access_token_lifetime: Duration,
    pub refresh_token_lifetime: Duration,
    /// The HS256 secret (at least 32 bytes).
    pub secret: Secret,
}

impl std::fmt::Debug for TokenSettings {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TokenSettings")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("access_token_lifetime", &self.access_token_lifetime)
            .field("refresh_token_lifetime", &self.refresh_token_lifetime)
            .field("secret", &self.secret)
            .finish()
    }
}

impl TokenSettings {
    pub fn new(secret: Secret) -> Self {
        Self {
            issuer: "turbocat".to_owned(),
            audience: "turbocat-api".to_owned(),
            access_token_lifetime: Duration::from_secs(15 * 60),
            refresh_token_lifetime: Duration::from_secs(7 * 24 * 60 * 60),
            secret,
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
        let secret = settings.secret.expose().as_bytes();
        // The key id names the key without revealing it: a prefix of its hash.
        let key_id = hex::encode(&sha2::Sha256::digest(secret)[..8]);
        Self {
            algorithm: Algorithm::HS256,
            key_id,
            encoding_key: EncodingKey::from_secret(secret),
            decoding_key: DecodingKey::from_secret(secret),
            settings,
        }
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
