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

/// Every reading of `payload` as `<timestamp>.<delivery id>.<body>` with text parts in UTF-8,
/// splitting at any two of its first `max_dots` dots: what a signed payload could be taken for.
/// The checks that no other accepted call shares a call's signed bytes walk these.
pub fn payload_readings(payload: &[u8], max_dots: usize) -> Vec<(&str, &str, &[u8])> {
    let dots: Vec<usize> = payload
        .iter()
        .enumerate()
        .filter_map(|(position, byte)| (*byte == b'.').then_some(position))
        .take(max_dots)
        .collect();
    let mut readings = Vec::new();
    for (rank, first) in dots.iter().enumerate() {
        for second in &dots[rank + 1..] {
            if let (Ok(timestamp), Ok(delivery)) = (
                std::str::from_utf8(&payload[..*first]),
                std::str::from_utf8(&payload[first + 1..*second]),
            ) {
                readings.push((timestamp, delivery, &payload[second + 1..]));
            }
        }
    }
    readings
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

/// Properties: a signature verifies for exactly the secret and bytes it was made from, in any
/// of the accepted spellings; any other bytes, secret or signature text is refused without a
/// panic.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn a_signature_verifies_iff_the_signed_bytes_are_unchanged(
            secret in ".{0,80}",
            payload in proptest::collection::vec(any::<u8>(), 0..256),
            flip in (any::<proptest::sample::Index>(), 1u8..=255),
        ) {
            let signature = sign(&secret, &payload);
            prop_assert!(signature.starts_with(SIGNATURE_PREFIX));
            prop_assert_eq!(signature.len(), SIGNATURE_PREFIX.len() + 64);
            prop_assert!(signature_matches(&secret, &payload, &signature));
            let digits = &signature[SIGNATURE_PREFIX.len()..];
            for spelling in [digits.to_owned(), digits.to_uppercase(), format!("  {signature}\n")] {
                prop_assert!(signature_matches(&secret, &payload, &spelling), "{spelling:?}");
            }
            let mut extended = payload.clone();
            extended.push(b' ');
            prop_assert!(!signature_matches(&secret, &extended, &signature), "a byte appended");
            if !payload.is_empty() {
                let mut changed = payload.clone();
                let position = flip.0.index(changed.len());
                changed[position] ^= flip.1;
                prop_assert!(!signature_matches(&secret, &changed, &signature), "a byte changed");
                prop_assert!(!signature_matches(&secret, &payload[..payload.len() - 1], &signature), "a byte cut");
            }
            let other_secret = format!("{secret}x");
            prop_assert!(!signature_matches(&other_secret, &payload, &signature), "another secret");
            prop_assert!(!signature_matches(&secret, &payload, &signature[..signature.len() - 2]), "truncated");
        }

        #[test]
        fn any_signature_text_is_judged_without_panicking(
            secret in ".{0,40}",
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            signature in prop_oneof![".{0,80}", "(sha256=)?[0-9a-fA-F]{0,70}"],
        ) {
            let matches = signature_matches(&secret, &payload, &signature);
            let expected = sign(&secret, &payload);
            let trimmed = signature.trim();
            let normalized = trimmed.strip_prefix(SIGNATURE_PREFIX).unwrap_or(trimmed).to_ascii_lowercase();
            prop_assert_eq!(matches, normalized == expected[SIGNATURE_PREFIX.len()..]);
        }

        #[test]
        fn the_timestamp_and_the_delivery_id_are_signed(
            timestamp in "[0-9]{1,12}",
            delivery in "[A-Za-z0-9_:-]{1,20}",
            other_delivery in "[A-Za-z0-9_:-]{1,20}",
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let secret = new_secret();
            let signature = sign(&secret, &signed_payload(&timestamp, &delivery, &body));
            prop_assert!(signature_matches(&secret, &signed_payload(&timestamp, &delivery, &body), &signature));
            let later = format!("{timestamp}0");
            prop_assert!(!signature_matches(&secret, &signed_payload(&later, &delivery, &body), &signature));
            if other_delivery != delivery {
                prop_assert!(!signature_matches(&secret, &signed_payload(&timestamp, &other_delivery, &body), &signature));
            }
        }
    }
}
