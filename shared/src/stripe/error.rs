//! Stripe's errors as the client reports them, classified, and which of them Stripe's own
//! libraries retry.

use serde::Deserialize;

/// Stripe's error body: `{"error": {"type", "code", "message", "param"}}`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(default)]
    pub error: ErrorDetail,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ErrorDetail {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
}

/// Whether a response with `status` and `Stripe-Should-Retry: should_retry` is retried, as
/// Stripe's libraries decide.
pub fn retries_status(status: u16, should_retry: Option<bool>) -> bool {
    match should_retry {
        Some(decision) => decision,
        None => status == 409 || status == 429 || status >= 500,
    }
}

/// A failed Stripe call.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// No answer: connect error, reset, or timeout (after retries).
    #[error("Stripe unreachable ({})", if *.timeout { "timeout" } else { "network error" })]
    Network { timeout: bool },
    /// Stripe answered with an error (after retries when retryable). `replayed`: Stripe answered
    /// from its idempotency store (`Idempotent-Replayed: true`), i.e. this is the stored result
    /// of the first request made with the key, and the key will never give anything else.
    #[error("Stripe {status} {type_}{}: {message}", code.as_deref().map(|c| format!("/{c}")).unwrap_or_default())]
    Api {
        status: u16,
        type_: String,
        code: Option<String>,
        message: String,
        param: Option<String>,
        replayed: bool,
    },
    /// A 2xx body that is not the expected object.
    #[error("unexpected Stripe response: {0}")]
    Decode(String),
}

impl StripeError {
    /// A short class for metrics and logs.
    pub fn class(&self) -> &'static str {
        match self {
            StripeError::Network { timeout: true } => "timeout",
            StripeError::Network { timeout: false } => "network",
            StripeError::Decode(_) => "invalid_response",
            StripeError::Api { status, type_, .. } => match (*status, type_.as_str()) {
                (401 | 403, _) | (_, "authentication_error") => "authentication",
                (429, _) => "rate_limited",
                (409, _) => "conflict",
                (s, _) if s >= 500 => "server",
                (_, "idempotency_error") => "idempotency",
                (_, "card_error") => "card",
                _ => "invalid_request",
            },
        }
    }

    /// True when trying again later may succeed (Stripe down or busy).
    pub fn is_transient(&self) -> bool {
        !self.is_replayed()
            && matches!(
                self.class(),
                "timeout" | "network" | "rate_limited" | "server" | "conflict"
            )
    }

    /// True when Stripe answered from its idempotency store.
    pub fn is_replayed(&self) -> bool {
        matches!(self, StripeError::Api { replayed: true, .. })
    }

    /// Stripe's error code (`charge_already_refunded`, `resource_missing`, ...), if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            StripeError::Api { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// True when the request under this idempotency key can never succeed: Stripe refused the
    /// key (`idempotency_error`: other parameters) or replayed a stored error for it.
    pub fn is_dead_key(&self) -> bool {
        self.is_replayed() || self.class() == "idempotency"
    }

    /// The parameter Stripe named, if any.
    pub fn param(&self) -> Option<&str> {
        match self {
            StripeError::Api { param, .. } => param.as_deref(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retried_statuses_follow_stripe_libraries() {
        for (status, header, want) in [
            (409, None, true),
            (429, None, true),
            (500, None, true),
            (503, None, true),
            (400, None, false),
            (401, None, false),
            (402, None, false),
            (404, None, false),
            (400, Some(true), true),
            (500, Some(false), false),
        ] {
            assert_eq!(retries_status(status, header), want, "{status} {header:?}");
        }
    }

    #[test]
    fn error_classes() {
        let api = |status: u16, type_: &str| StripeError::Api {
            status,
            type_: type_.into(),
            code: None,
            message: String::new(),
            param: None,
            replayed: false,
        };
        assert_eq!(api(401, "authentication_error").class(), "authentication");
        assert_eq!(api(400, "invalid_request_error").class(), "invalid_request");
        assert_eq!(api(400, "idempotency_error").class(), "idempotency");
        assert_eq!(api(503, "api_error").class(), "server");
        assert!(api(429, "rate_limit_error").is_transient());
        assert!(!api(400, "invalid_request_error").is_transient());
        assert_eq!(StripeError::Network { timeout: true }.class(), "timeout");
        let replayed = StripeError::Api {
            status: 500,
            type_: "api_error".into(),
            code: None,
            message: String::new(),
            param: None,
            replayed: true,
        };
        assert!(!replayed.is_transient() && replayed.is_dead_key());
        assert!(api(400, "idempotency_error").is_dead_key());
        assert!(!api(400, "invalid_request_error").is_dead_key());
    }
}
