//! `Stripe-Signature` verification, as Stripe's own libraries do it.
//!
//! Header: `t=<unix>,v1=<hex>[,v1=<hex>...]`; other schemes (`v0`) are ignored. The signed payload
//! is `"{t}.{raw body}"`, HMAC-SHA256 keyed with the endpoint secret used as-is. The event is
//! genuine if ANY `v1` matches ANY configured secret (one `v1` per active secret is sent while a
//! secret is rolled), compared in constant time. Only the age of `t` is checked.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// Stripe's default tolerance between `t` and now.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// Longest header accepted; a real one with a few signatures is ~200 bytes.
const MAX_HEADER_LEN: usize = 4096;

/// Why a signature was refused. The variants map to stable error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    MissingHeader,
    #[error("the Stripe-Signature header is malformed")]
    Malformed,
    #[error("the Stripe-Signature header has no v1 signature")]
    NoV1Signature,
    #[error("the signature timestamp is outside the tolerance")]
    TimestampOutsideTolerance,
    #[error("no signature matches the payload")]
    NoMatch,
}

impl SignatureError {
    /// The stable error code.
    pub fn code(self) -> &'static str {
        match self {
            SignatureError::MissingHeader => "missing_signature",
            SignatureError::Malformed => "malformed_signature",
            SignatureError::NoV1Signature => "no_v1_signature",
            SignatureError::TimestampOutsideTolerance => "timestamp_outside_tolerance",
            SignatureError::NoMatch => "signature_mismatch",
        }
    }
}

/// The parts of a `Stripe-Signature` header this verifier uses.
#[derive(Debug, PartialEq, Eq)]
pub struct SignatureHeader<'a> {
    pub timestamp: i64,
    pub v1: Vec<&'a str>,
}

/// Parses the header. Unknown schemes are skipped; a missing or non-numeric `t` is malformed.
pub fn parse_header(header: &str) -> Result<SignatureHeader<'_>, SignatureError> {
    if header.len() > MAX_HEADER_LEN {
        return Err(SignatureError::Malformed);
    }
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for item in header.split(',') {
        let Some((key, value)) = item.split_once('=') else {
            continue;
        };
        match key.trim() {
            "t" => {
                timestamp = Some(
                    value
                        .trim()
                        .parse::<i64>()
                        .map_err(|_| SignatureError::Malformed)?,
                )
            }
            "v1" => v1.push(value.trim()),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if v1.is_empty() {
        return Err(SignatureError::NoV1Signature);
    }
    Ok(SignatureHeader { timestamp, v1 })
}

/// Verifies `payload` against `header`, accepting any configured secret. Returns the header's
/// timestamp.
pub fn verify(
    payload: &[u8],
    header: &str,
    secrets: &[Secret],
    now: i64,
    tolerance: Duration,
) -> Result<i64, SignatureError> {
    let parsed = parse_header(header)?;
    let mut matched = false;
    for secret in secrets {
        let expected = hex::encode(compute(payload, parsed.timestamp, secret));
        for candidate in &parsed.v1 {
            // Evaluate every pair: the time taken does not reveal which one matched.
            matched |= bool::from(expected.as_bytes().ct_eq(candidate.as_bytes()));
        }
    }
    if !matched {
        return Err(SignatureError::NoMatch);
    }
    let age = now.saturating_sub(parsed.timestamp);
    if age > i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX) {
        return Err(SignatureError::TimestampOutsideTolerance);
    }
    Ok(parsed.timestamp)
}

/// A header Stripe would send for `payload` at `timestamp` (for tests, fixtures and the local
/// trigger command).
pub fn sign(payload: &[u8], secret: &Secret, timestamp: i64) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(compute(payload, timestamp, secret))
    )
}

fn compute(payload: &[u8], timestamp: i64, secret: &Secret) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any size"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600;
    const BODY: &[u8] = "{\"id\":\"evt_1\",\"name\":\"Zoë 张伟\"}".as_bytes();

    fn secrets(list: &[&str]) -> Vec<Secret> {
        list.iter().map(|s| Secret::new(*s)).collect()
    }

    #[test]
    fn known_vector_matches_stripe_scheme() {
        // printf '1700000000.{}' | openssl dgst -sha256 -hmac whsec_test
        let header = sign(b"{}", &Secret::new("whsec_test"), 1_700_000_000);
        assert_eq!(
            header,
            "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
        );
    }

    #[test]
    fn table_of_headers() {
        let good = sign(BODY, &Secret::new("whsec_a"), NOW);
        let sig = &good["t=1767225600,v1=".len()..];
        let cases: Vec<(String, Result<i64, SignatureError>)> = vec![
            (good.clone(), Ok(NOW)),
            (format!("t={NOW},v1={},v0=abc", sig), Ok(NOW)),
            (format!("t={NOW},v1=deadbeef,v1={sig}"), Ok(NOW)),
            (format!("t={NOW}, v1={sig}"), Ok(NOW)),
            (
                format!("t={NOW},v0={sig}"),
                Err(SignatureError::NoV1Signature),
            ),
            (format!("v1={sig}"), Err(SignatureError::Malformed)),
            (format!("t=abc,v1={sig}"), Err(SignatureError::Malformed)),
            (String::new(), Err(SignatureError::Malformed)),
            (
                format!("t={},v1={sig}", NOW + 1),
                Err(SignatureError::NoMatch),
            ),
            (
                format!("t={NOW},v1={}", &sig[..63]),
                Err(SignatureError::NoMatch),
            ),
            (
                format!("t={NOW},v1={}", sig.to_uppercase()),
                Err(SignatureError::NoMatch),
            ),
        ];
        for (header, expected) in cases {
            let got = verify(
                BODY,
                &header,
                &secrets(&["whsec_a"]),
                NOW,
                DEFAULT_TOLERANCE,
            );
            assert_eq!(got, expected, "header {header:?}");
        }
    }

    #[test]
    fn any_of_several_secrets_may_match() {
        let header = sign(BODY, &Secret::new("whsec_new"), NOW);
        let keys = secrets(&["whsec_old", "whsec_new"]);
        assert_eq!(
            verify(BODY, &header, &keys, NOW, DEFAULT_TOLERANCE),
            Ok(NOW)
        );
        assert_eq!(
            verify(
                BODY,
                &header,
                &secrets(&["whsec_old"]),
                NOW,
                DEFAULT_TOLERANCE
            ),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn rotation_header_with_two_v1_matches_either_secret() {
        let old = sign(BODY, &Secret::new("whsec_old"), NOW);
        let new = sign(BODY, &Secret::new("whsec_new"), NOW);
        let header = format!("{old},v1={}", &new[new.find("v1=").unwrap() + 3..]);
        for secret in ["whsec_old", "whsec_new"] {
            assert_eq!(
                verify(BODY, &header, &secrets(&[secret]), NOW, DEFAULT_TOLERANCE),
                Ok(NOW),
                "{secret}"
            );
        }
    }

    #[test]
    fn old_timestamp_is_rejected_future_is_accepted() {
        let keys = secrets(&["whsec_a"]);
        let old = sign(BODY, &keys[0], NOW - 301);
        assert_eq!(
            verify(BODY, &old, &keys, NOW, DEFAULT_TOLERANCE),
            Err(SignatureError::TimestampOutsideTolerance)
        );
        let edge = sign(BODY, &keys[0], NOW - 300);
        assert_eq!(
            verify(BODY, &edge, &keys, NOW, DEFAULT_TOLERANCE),
            Ok(NOW - 300)
        );
        let future = sign(BODY, &keys[0], NOW + 600);
        assert_eq!(
            verify(BODY, &future, &keys, NOW, DEFAULT_TOLERANCE),
            Ok(NOW + 600)
        );
    }

    #[test]
    fn a_different_body_does_not_verify() {
        let keys = secrets(&["whsec_a"]);
        let header = sign(BODY, &keys[0], NOW);
        let tampered = "{\"id\":\"evt_1\",\"name\":\"Zoe 张伟\"}".as_bytes();
        assert_eq!(
            verify(tampered, &header, &keys, NOW, DEFAULT_TOLERANCE),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn oversized_header_is_malformed() {
        let header = format!("t={NOW},{}", "v1=00,".repeat(1000));
        assert_eq!(parse_header(&header), Err(SignatureError::Malformed));
    }
}
