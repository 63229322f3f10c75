//! The HMAC-SHA256 signature of webhook calls, one scheme both ways: the calls Turbocat receives
//! (a deployment's webhook, checked in `super::deployments`) and the ones it sends (alert
//! notifications, `super::alerts`). The signature covers `<timestamp>.<delivery id>.<body>`
//! (`X-Turbocat-Timestamp`, `X-Turbocat-Delivery`, the exact body bytes) and travels as
//! `X-Turbocat-Signature: sha256=<hex>`; secrets are 32 random bytes shown as hex.
//! May call: nothing of ours (hmac, sha2, rand).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header of a webhook call that carries the signature (see `signed_payload`).
pub const SIGNATURE_HEADER: &str = "x-turbocat-signature";
/// The header of a webhook call that carries when it was sent, in Unix seconds (signed).
pub const TIMESTAMP_HEADER: &str = "x-turbocat-timestamp";
/// The header of a webhook call that carries its sender's unique id for it (signed).
pub const DELIVERY_HEADER: &str = "x-turbocat-delivery";
/// The prefix a signature may carry (`sha256=<hex>`, as GitHub sends it).
pub const SIGNATURE_PREFIX: &str = "sha256=";
/// Random bytes in a webhook secret (shown as 64 hex digits).
const SECRET_BYTES: usize = 32;

/// A fresh webhook secret: 32 random bytes from the operating system's generator, as hex.
pub fn new_secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    hex::encode(bytes)
}

/// The bytes a webhook signature covers: `<timestamp>.<delivery id>.<body>`, so neither the
/// time nor the id can be changed (or the body sent again later) without the secret.
pub fn signed_payload(timestamp: &str, delivery: &str, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(timestamp.len() + delivery.len() + body.len() + 2);
    payload.extend_from_slice(timestamp.as_bytes());
    payload.push(b'.');
    payload.extend_from_slice(delivery.as_bytes());
    payload.push(b'.');
    payload.extend_from_slice(body);
    payload
}

/// The `X-Turbocat-Signature` value of `payload`: `sha256=` and the lowercase hex HMAC-SHA256
/// keyed with the text of `secret`.
pub fn sign(secret: &str, payload: &[u8]) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(payload);
    format!("{SIGNATURE_PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether `signature` (lowercase or uppercase hex, optionally prefixed `sha256=`) is the
/// HMAC-SHA256 of `payload` keyed with the text of `secret`. Compared in constant time.
pub fn signature_matches(secret: &str, payload: &[u8], signature: &str) -> bool {
    let signature = signature.trim();
    let digits = signature.strip_prefix(SIGNATURE_PREFIX).unwrap_or(signature);
    let Ok(given) = hex::decode(digits) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(payload);
    mac.verify_slice(&given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_signed_verifies_and_nothing_else_does() {
        let secret = new_secret();
        assert_eq!(secret.len(), 64);
        let payload = signed_payload("1700000000", "delivery-1", br#"{"text":"hi"}"#);
        let signature = sign(&secret, &payload);
        assert!(signature.starts_with("sha256="), "{signature}");
        assert!(signature_matches(&secret, &payload, &signature));
        let other = signed_payload("1700000001", "delivery-1", br#"{"text":"hi"}"#);
        assert!(!signature_matches(&secret, &other, &signature), "another timestamp");
        assert!(!signature_matches("another secret", &payload, &signature), "another secret");
    }
}
