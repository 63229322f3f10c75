//! Password hashing with argon2id at the OWASP parameters (19 MiB, 2 passes, 1 lane). Hashing
//! is deliberately slow, so it runs on tokio's blocking pool, never on a runtime thread.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};

/// The fewest characters a password may have.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// The most characters a password may have: a bound on the hashing work one request can cause.
pub const MAX_PASSWORD_CHARS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password hashing failed: {0}")]
    Hashing(String),
    #[error("the hashing task was lost")]
    TaskLost,
}

fn hasher() -> Result<Argon2<'static>, PasswordError> {
    let params = Params::new(19 * 1024, 2, 1, None)
        .map_err(|error| PasswordError::Hashing(error.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes `password` into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
pub async fn hash_password(password: String) -> Result<String, PasswordError> {
    tokio::task::spawn_blocking(move || {
        hasher()?
            .hash_password(password.as_bytes())
            .map(|hash| hash.to_string())
            .map_err(|error| PasswordError::Hashing(error.to_string()))
    })
    .await
    .map_err(|_| PasswordError::TaskLost)?
}

/// Whether `password` matches the PHC `hash`. A malformed hash never matches.
pub async fn verify_password(password: String, hash: String) -> Result<bool, PasswordError> {
    tokio::task::spawn_blocking(move || {
        let Ok(parsed) = PasswordHash::new(&hash) else { return Ok(false) };
        Ok(hasher()?.verify_password(password.as_bytes(), &parsed).is_ok())
    })
    .await
    .map_err(|_| PasswordError::TaskLost)?
}

#[cfg(test)]
mod tests {
    use super::{hash_password, verify_password};

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let hash = hash_password("correct horse battery".into()).await.expect("hash");
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert!(!hash.contains("correct horse"));
        assert!(
            verify_password("correct horse battery".into(), hash.clone()).await.expect("verify")
        );
        assert!(
            !verify_password("correct horse battery!".into(), hash.clone()).await.expect("verify")
        );
        assert!(!verify_password("anything".into(), "not a hash".into()).await.expect("verify"));
        let second = hash_password("correct horse battery".into()).await.expect("hash");
        assert_ne!(hash, second, "every hash has its own salt");
    }
}
