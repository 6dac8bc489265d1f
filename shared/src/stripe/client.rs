//! A thin Stripe API client over the workspace's reqwest: Checkout Sessions (create, retrieve,
//! expire, line items) and refunds.
//!
//! Requests are form-encoded with `Stripe-Version` pinned ([`super::API_VERSION`]). Retries follow
//! Stripe's official libraries: network errors, 409 (lock timeout), 429 and 5xx are retried with
//! exponential backoff and jitter between 0.5 s and 5 s, `Stripe-Should-Retry` overrides the
//! status, `Retry-After` is honoured up to the cap, and a POST keeps its `Idempotency-Key` on every
//! try. The secret key is sent and never logged or returned in an error.

use std::time::{Duration, Instant};

use serde::Deserialize;

use super::events::CheckoutSession;
use crate::config::Secret;
pub use crate::retry::RetryPolicy;

/// Stripe's error body: `{"error": {"type", "code", "message", "param"}}`.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorDetail,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorDetail {
    #[serde(default, rename = "type")]
    type_: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    param: Option<String>,
}

/// True for a Checkout Session id: `cs_` then letters, digits and `_`, at most 255 characters.
pub fn is_session_id(id: &str) -> bool {
    id.starts_with("cs_")
        && (4..=255).contains(&id.len())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
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

/// A line item of a Checkout Session, as far as the app reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct LineItem {
    #[serde(default)]
    pub price: Option<super::events::Expandable>,
    #[serde(default)]
    pub quantity: Option<i64>,
    #[serde(default)]
    pub amount_total: Option<i64>,
}

impl LineItem {
    /// The price id, whether the price is expanded or not.
    pub fn price_id(&self) -> Option<&str> {
        self.price.as_ref().map(|p| p.id())
    }
}

/// A refund, as far as the app reads it (and hands to `record_duplicate_refund`).
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct Refund {
    pub id: String,
    #[serde(default)]
    pub amount: i64,
    #[serde(default)]
    pub currency: Option<String>,
    /// `pending`, `requires_action`, `succeeded`, `failed` or `canceled`.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

impl Refund {
    /// True when the refund can no longer return the money (it failed or was canceled).
    pub fn is_dead(&self) -> bool {
        matches!(self.status.as_deref(), Some("failed" | "canceled"))
    }
}

#[derive(Deserialize)]
struct ChargeRef {
    #[serde(default)]
    payment_intent: Option<super::events::Expandable>,
}

#[derive(Deserialize)]
struct List<T> {
    #[serde(default = "Vec::new")]
    data: Vec<T>,
}

/// Parameters of a one-time payment Checkout Session.
#[derive(Clone, Debug)]
pub struct NewCheckoutSession<'a> {
    pub price: &'a str,
    pub quantity: u32,
    pub client_reference_id: &'a str,
    pub metadata: &'a [(&'a str, &'a str)],
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    pub expires_at: i64,
    pub customer_email: Option<&'a str>,
}

impl NewCheckoutSession<'_> {
    /// The form fields, in a stable order (the same order on every retry).
    pub fn form(&self) -> Vec<(String, String)> {
        let mut form = vec![
            ("mode".to_owned(), "payment".to_owned()),
            ("line_items[0][price]".to_owned(), self.price.to_owned()),
            (
                "line_items[0][quantity]".to_owned(),
                self.quantity.to_string(),
            ),
            (
                "client_reference_id".to_owned(),
                self.client_reference_id.to_owned(),
            ),
            ("success_url".to_owned(), self.success_url.to_owned()),
            ("cancel_url".to_owned(), self.cancel_url.to_owned()),
            ("expires_at".to_owned(), self.expires_at.to_string()),
        ];
        for (key, value) in self.metadata {
            form.push((format!("metadata[{key}]"), (*value).to_owned()));
            form.push((
                format!("payment_intent_data[metadata][{key}]"),
                (*value).to_owned(),
            ));
        }
        if let Some(email) = self.customer_email {
            form.push(("customer_email".to_owned(), email.to_owned()));
        }
        form
    }
}

/// The client. Build once per cold start.
#[derive(Clone, Debug)]
pub struct StripeClient {
    http: reqwest::Client,
    base: String,
    key: Secret,
    policy: RetryPolicy,
}

/// What one call cost: tries made and time spent (for metrics).
#[derive(Clone, Copy, Debug, Default)]
pub struct CallStats {
    pub attempts: u32,
    pub elapsed: Duration,
}

impl StripeClient {
    /// A client for `base` (`STRIPE_API_BASE`, e.g. `https://api.stripe.com`).
    pub fn new(
        base: &str,
        key: Secret,
        policy: RetryPolicy,
        timeout: Duration,
    ) -> reqwest::Result<Self> {
        Ok(Self {
            http: crate::http_client::build(Duration::from_secs(3).min(timeout), timeout)?,
            base: base.trim_end_matches('/').to_owned(),
            key,
            policy,
        })
    }

    /// The client `api` describes, with Stripe's libraries' backoff.
    pub fn from_config(api: &crate::config::StripeApi) -> reqwest::Result<Self> {
        Self::new(
            &api.base,
            api.key.clone(),
            RetryPolicy {
                max_retries: api.retries,
                ..RetryPolicy::default()
            },
            api.timeout,
        )
    }

    /// Opens the connection to Stripe in the background (no key sent), for the first call.
    pub fn warm_up(&self) {
        crate::http_client::warm_up(&self.http, format!("{}/v1/", self.base));
    }

    /// `POST /v1/checkout/sessions` with `Idempotency-Key: idempotency_key`.
    pub async fn create_checkout_session(
        &self,
        params: &NewCheckoutSession<'_>,
        idempotency_key: &str,
        stats: &mut CallStats,
    ) -> Result<CheckoutSession, StripeError> {
        let form = params.form();
        let url = format!("{}/v1/checkout/sessions", self.base);
        self.send(stats, || {
            self.http
                .post(&url)
                .header("Idempotency-Key", idempotency_key)
                .form(&form)
        })
        .await
    }

    /// `GET /v1/checkout/sessions/{id}`.
    pub async fn retrieve_checkout_session(
        &self,
        id: &str,
        stats: &mut CallStats,
    ) -> Result<CheckoutSession, StripeError> {
        let url = self.session_url(id, "")?;
        self.send(stats, || self.http.get(&url)).await
    }

    /// `POST /v1/checkout/sessions/{id}/expire`: an open session can no longer be paid. Stripe
    /// answers 400 for a session that is not open (see [`StripeClient::expire_if_open`]).
    pub async fn expire_checkout_session(
        &self,
        id: &str,
        stats: &mut CallStats,
    ) -> Result<CheckoutSession, StripeError> {
        let url = self.session_url(id, "/expire")?;
        let key = format!("expire-{id}");
        self.send(stats, || {
            self.http.post(&url).header("Idempotency-Key", &key)
        })
        .await
    }

    /// Expires the session if it is open; returns the session as Stripe holds it afterwards
    /// (read back when Stripe refused because it was no longer open: complete or expired).
    pub async fn expire_if_open(
        &self,
        id: &str,
        stats: &mut CallStats,
    ) -> Result<CheckoutSession, StripeError> {
        match self.expire_checkout_session(id, stats).await {
            Ok(session) => Ok(session),
            Err(StripeError::Api { status: 400, .. }) => {
                self.retrieve_checkout_session(id, stats).await
            }
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/checkout/sessions/{id}/line_items` (the first 100: a session of ours has one).
    pub async fn list_line_items(
        &self,
        id: &str,
        stats: &mut CallStats,
    ) -> Result<Vec<LineItem>, StripeError> {
        let url = self.session_url(id, "/line_items?limit=100")?;
        let list: List<LineItem> = self.send(stats, || self.http.get(&url)).await?;
        Ok(list.data)
    }

    /// `POST /v1/refunds` for the whole of a payment intent, `reason=duplicate`, with an
    /// idempotency key derived from the payment intent and `attempt` (1, 2, ...), so a refund is
    /// made once however often it is asked for. A later attempt is for a key Stripe answers with
    /// a stored error: Stripe never refunds more than remains, so a new key cannot refund twice.
    pub async fn refund_duplicate(
        &self,
        payment_intent: &str,
        order_id: &str,
        attempt: u32,
        stats: &mut CallStats,
    ) -> Result<Refund, StripeError> {
        let form = [
            ("payment_intent", payment_intent),
            ("reason", "duplicate"),
            ("metadata[order_id]", order_id),
            ("metadata[refunded_by]", "webhook"),
        ];
        let url = format!("{}/v1/refunds", self.base);
        let key = match attempt {
            0 | 1 => format!("refund-duplicate-{payment_intent}"),
            n => format!("refund-duplicate-{payment_intent}-{n}"),
        };
        self.send(stats, || {
            self.http
                .post(&url)
                .header("Idempotency-Key", &key)
                .form(&form)
        })
        .await
    }

    /// `GET /v1/charges/{id}`: the charge's payment intent, for a dispute that names only the
    /// charge.
    pub async fn charge_payment_intent(
        &self,
        id: &str,
        stats: &mut CallStats,
    ) -> Result<Option<String>, StripeError> {
        if !id.starts_with("ch_") && !id.starts_with("py_")
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(StripeError::Decode("not a charge id".into()));
        }
        let url = format!("{}/v1/charges/{id}", self.base);
        let charge: ChargeRef = self.send(stats, || self.http.get(&url)).await?;
        Ok(charge.payment_intent.map(|p| p.id().to_owned()))
    }

    fn session_url(&self, id: &str, suffix: &str) -> Result<String, StripeError> {
        if !is_session_id(id) {
            return Err(StripeError::Decode("not a Checkout Session id".into()));
        }
        Ok(format!("{}/v1/checkout/sessions/{id}{suffix}", self.base))
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        stats: &mut CallStats,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, StripeError> {
        let started = Instant::now();
        let mut retry = 0;
        loop {
            stats.attempts += 1;
            let result = build()
                .bearer_auth(self.key.expose())
                .header("Stripe-Version", super::API_VERSION)
                .send()
                .await;
            let (error, retry_after, should_retry) = match result {
                Err(e) => (
                    {
                        crate::http_client::log_if_untrusted(&e, "stripe");
                        StripeError::Network {
                            timeout: e.is_timeout(),
                        }
                    },
                    None,
                    None,
                ),
                Ok(response) => {
                    let status = response.status().as_u16();
                    let headers = response.headers().clone();
                    let should_retry = headers
                        .get("stripe-should-retry")
                        .and_then(|v| v.to_str().ok())
                        .map(|v| v.eq_ignore_ascii_case("true"));
                    let replayed = headers
                        .get("idempotent-replayed")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
                    let retry_after = headers
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let body = response.bytes().await;
                    match body {
                        Err(e) => (
                            StripeError::Network {
                                timeout: e.is_timeout(),
                            },
                            None,
                            None,
                        ),
                        Ok(bytes) if (200..300).contains(&status) => {
                            stats.elapsed = started.elapsed();
                            return serde_json::from_slice(&bytes)
                                .map_err(|e| StripeError::Decode(e.to_string()));
                        }
                        Ok(bytes) => {
                            let detail = serde_json::from_slice::<ErrorBody>(&bytes)
                                .unwrap_or_default()
                                .error;
                            let error = StripeError::Api {
                                status,
                                type_: detail.type_.unwrap_or_else(|| "api_error".into()),
                                code: detail.code,
                                message: detail.message.unwrap_or_default(),
                                param: detail.param,
                                replayed,
                            };
                            // A replayed answer is what the key holds: asking again changes nothing.
                            let retryable = !replayed && retries_status(status, should_retry);
                            (error, retry_after, Some(retryable))
                        }
                    }
                }
            };
            // Network errors are retried unless Stripe said otherwise.
            let retryable = should_retry.unwrap_or(true);
            if !retryable || retry >= self.policy.max_retries {
                stats.elapsed = started.elapsed();
                return Err(error);
            }
            retry += 1;
            let delay = self
                .policy
                .delay(retry, crate::retry::jitter(), retry_after);
            tracing::warn!(
                class = error.class(),
                retry,
                delay_ms = delay.as_millis() as u64,
                "retrying Stripe call"
            );
            tokio::time::sleep(delay).await;
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
    fn form_is_stable_and_carries_metadata_and_email() {
        let params = NewCheckoutSession {
            price: "price_1",
            quantity: 1,
            client_reference_id: "user",
            metadata: &[("order_id", "o1"), ("user_id", "u1")],
            success_url: "https://app/s?session_id={CHECKOUT_SESSION_ID}",
            cancel_url: "https://app/c",
            expires_at: 1_800_000_000,
            customer_email: Some("a@b.c"),
        };
        let encoded = serde_urlencoded::to_string(params.form()).unwrap();
        assert!(encoded.starts_with(
            "mode=payment&line_items%5B0%5D%5Bprice%5D=price_1&line_items%5B0%5D%5Bquantity%5D=1"
        ));
        assert!(encoded.contains("metadata%5Border_id%5D=o1"));
        assert!(encoded.contains(
            "success_url=https%3A%2F%2Fapp%2Fs%3Fsession_id%3D%7BCHECKOUT_SESSION_ID%7D"
        ));
        assert!(encoded.ends_with("customer_email=a%40b.c"));
        assert_eq!(params.form(), params.form());
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

    #[test]
    fn session_ids_are_checked_once() {
        for id in ["cs_test_a1", "cs_live_B_2"] {
            assert!(is_session_id(id), "{id}");
        }
        for id in [
            "",
            "cs_",
            "pi_123",
            "cs_test/../x",
            "cs_test a",
            &format!("cs_{}", "a".repeat(253)),
        ] {
            assert!(!is_session_id(id), "{id}");
        }
    }
}
