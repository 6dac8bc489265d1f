//! A thin Stripe API client over the workspace's reqwest: Checkout Sessions (create, retrieve,
//! expire, line items, the open ones), refunds, and the reads the payments' facts come from
//! (payment intents with their latest charge, refunds, disputes, charges, subscriptions,
//! invoices, undelivered events).
//!
//! Requests are form-encoded with `Stripe-Version` pinned ([`super::API_VERSION`]). Retries follow
//! Stripe's official libraries: network errors, 409 (lock timeout), 429 and 5xx are retried with
//! exponential backoff and jitter between 0.5 s and 5 s, `Stripe-Should-Retry` overrides the
//! status, `Retry-After` is honoured up to the cap, and a POST keeps its `Idempotency-Key` on every
//! try. The secret key is sent and never logged or returned in an error.

use std::time::{Duration, Instant};

use serde::Deserialize;

use super::error::ErrorBody;
pub use super::error::{retries_status, StripeError};
use super::events::CheckoutSession;
pub use super::events::Refund;
use super::ids::SessionId;
use crate::config::Secret;
pub use crate::retry::RetryPolicy;
use crate::retry::{After, OutOfTime};

/// A line item of a Checkout Session, as far as the app reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct LineItem {
    #[serde(default)]
    pub id: Option<String>,
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

/// One page of a Stripe list.
#[derive(Debug, Deserialize)]
pub struct Page<T> {
    #[serde(default = "Vec::new")]
    pub data: Vec<T>,
    #[serde(default)]
    pub has_more: bool,
}

/// The most pages one list call follows (100 objects each).
pub const MAX_PAGES: usize = 20;

/// What a list endpoint gave: its objects, newest first, and whether that was all of them
/// (`false`: more than [`MAX_PAGES`] pages; narrow the query).
#[derive(Debug)]
pub struct Listed<T> {
    pub items: Vec<T>,
    pub complete: bool,
}

/// An id that goes into a URL path or query: one of `prefixes`, then ASCII letters, digits and
/// `_`, at most 255 characters. Checked before any request is built, wherever the id came from.
pub fn checked_id<'a>(id: &'a str, prefixes: &[&str]) -> Result<&'a str, StripeError> {
    let well_formed = prefixes.iter().any(|p| id.starts_with(p))
        && id.len() <= 255
        && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
    if well_formed {
        Ok(id)
    } else {
        Err(StripeError::Decode(format!(
            "not a Stripe id ({})",
            prefixes.join(", ")
        )))
    }
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

/// What one call cost: the time spent, retries included (for metrics).
#[derive(Clone, Copy, Debug, Default)]
pub struct CallStats {
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
        id: &SessionId,
        stats: &mut CallStats,
    ) -> Result<CheckoutSession, StripeError> {
        let url = self.session_url(id, "");
        self.send(stats, || self.http.get(&url)).await
    }

    /// `POST /v1/checkout/sessions/{id}/expire` under the key `expire-{id}` (`-{attempt}` from
    /// the second attempt on: a key Stripe keeps an error under is never used again). An open
    /// session can no longer be paid. Stripe answers 400 for a session that is not open (see
    /// [`StripeClient::expire_if_open`]).
    pub async fn expire_checkout_session(
        &self,
        id: &SessionId,
        attempt: u32,
        stats: &mut CallStats,
    ) -> Result<CheckoutSession, StripeError> {
        let url = self.session_url(id, "/expire");
        let key = match attempt {
            0 | 1 => format!("expire-{id}"),
            n => format!("expire-{id}-{n}"),
        };
        self.send(stats, || {
            self.http.post(&url).header("Idempotency-Key", &key)
        })
        .await
    }

    /// Expires the session if it is open; returns the session as Stripe holds it afterwards
    /// (read back when Stripe refused because it was no longer open: complete or expired).
    pub async fn expire_if_open(
        &self,
        id: &SessionId,
        attempt: u32,
        stats: &mut CallStats,
    ) -> Result<CheckoutSession, StripeError> {
        match self.expire_checkout_session(id, attempt, stats).await {
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
        id: &SessionId,
        stats: &mut CallStats,
    ) -> Result<Vec<LineItem>, StripeError> {
        self.list(stats, &self.session_url(id, "/line_items"), &[])
            .await
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

    /// `GET /v1/charges/{id}`: a charge, for a refund or dispute that names only its charge.
    pub async fn retrieve_charge(
        &self,
        id: &str,
        stats: &mut CallStats,
    ) -> Result<super::events::Charge, StripeError> {
        let url = format!(
            "{}/v1/charges/{}",
            self.base,
            checked_id(id, &["ch_", "py_"])?
        );
        self.send(stats, || self.http.get(&url)).await
    }

    /// `GET /v1/payment_intents/{id}?expand[]=latest_charge`: the payment and its latest charge.
    pub async fn retrieve_payment_intent(
        &self,
        id: &str,
        stats: &mut CallStats,
    ) -> Result<super::events::PaymentIntent, StripeError> {
        let url = format!(
            "{}/v1/payment_intents/{}",
            self.base,
            checked_id(id, &["pi_"])?
        );
        self.send(stats, || {
            self.http.get(&url).query(&[("expand[]", "latest_charge")])
        })
        .await
    }

    /// `GET /v1/refunds?payment_intent=`: every refund of a payment, newest first.
    pub async fn list_refunds(
        &self,
        payment_intent: &str,
        stats: &mut CallStats,
    ) -> Result<Vec<Refund>, StripeError> {
        let pi = checked_id(payment_intent, &["pi_"])?;
        self.list(
            stats,
            &format!("{}/v1/refunds", self.base),
            &[("payment_intent", pi)],
        )
        .await
    }

    /// `GET /v1/disputes?payment_intent=`: every dispute of a payment, newest first.
    pub async fn list_disputes(
        &self,
        payment_intent: &str,
        stats: &mut CallStats,
    ) -> Result<Vec<super::events::Dispute>, StripeError> {
        let pi = checked_id(payment_intent, &["pi_"])?;
        self.list(
            stats,
            &format!("{}/v1/disputes", self.base),
            &[("payment_intent", pi)],
        )
        .await
    }

    /// `GET /v1/subscriptions/{id}`.
    pub async fn retrieve_subscription(
        &self,
        id: &str,
        stats: &mut CallStats,
    ) -> Result<super::events::Subscription, StripeError> {
        let url = format!(
            "{}/v1/subscriptions/{}",
            self.base,
            checked_id(id, &["sub_"])?
        );
        self.send(stats, || self.http.get(&url)).await
    }

    /// `GET /v1/invoices/{id}`.
    pub async fn retrieve_invoice(
        &self,
        id: &str,
        stats: &mut CallStats,
    ) -> Result<super::events::Invoice, StripeError> {
        let url = format!("{}/v1/invoices/{}", self.base, checked_id(id, &["in_"])?);
        self.send(stats, || self.http.get(&url)).await
    }

    /// `GET /v1/events?delivery_success=false`: events created since `created_gte` (Unix seconds)
    /// that did not reach every endpoint, of the given types (at most 20), newest first, as raw
    /// JSON (each is read as the webhook reads a delivery).
    pub async fn list_undelivered_events(
        &self,
        created: std::ops::Range<i64>,
        types: &[&str],
        stats: &mut CallStats,
    ) -> Result<Listed<Box<serde_json::value::RawValue>>, StripeError> {
        let (from, to) = (created.start.to_string(), created.end.to_string());
        let mut query = vec![
            ("delivery_success", "false"),
            ("created[gte]", from.as_str()),
            ("created[lt]", to.as_str()),
        ];
        query.extend(types.iter().take(20).map(|t| ("types[]", *t)));
        self.list_pages(stats, &format!("{}/v1/events", self.base), &query)
            .await
    }

    /// `GET /v1/checkout/sessions?status=open`: open sessions created since `created_gte`.
    pub async fn list_open_sessions(
        &self,
        created_gte: i64,
        stats: &mut CallStats,
    ) -> Result<Listed<CheckoutSession>, StripeError> {
        let since = created_gte.to_string();
        let query = [("status", "open"), ("created[gte]", since.as_str())];
        self.list_pages(
            stats,
            &format!("{}/v1/checkout/sessions", self.base),
            &query,
        )
        .await
    }

    /// Every object of a list that is short by nature (one payment's refunds, one session's line
    /// items): a list longer than [`MAX_PAGES`] pages is an error, never a silent cut.
    async fn list<T: serde::de::DeserializeOwned + HasId>(
        &self,
        stats: &mut CallStats,
        url: &str,
        query: &[(&str, &str)],
    ) -> Result<Vec<T>, StripeError> {
        let listed = self.list_pages(stats, url, query).await?;
        if !listed.complete {
            return Err(StripeError::Decode(format!(
                "{url} has more than {MAX_PAGES} pages"
            )));
        }
        Ok(listed.items)
    }

    /// The objects of a list endpoint, 100 a page, following `starting_after` for at most
    /// [`MAX_PAGES`] pages.
    async fn list_pages<T: serde::de::DeserializeOwned + HasId>(
        &self,
        stats: &mut CallStats,
        url: &str,
        query: &[(&str, &str)],
    ) -> Result<Listed<T>, StripeError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        let mut elapsed = std::time::Duration::ZERO;
        for _ in 0..MAX_PAGES {
            let mut page_stats = CallStats::default();
            let page: Result<Page<T>, _> = self
                .send(&mut page_stats, || {
                    let request = self.http.get(url).query(query).query(&[("limit", "100")]);
                    match &after {
                        Some(id) => request.query(&[("starting_after", id.as_str())]),
                        None => request,
                    }
                })
                .await;
            elapsed += page_stats.elapsed;
            stats.elapsed = elapsed;
            let page = page?;
            let next = page.data.last().and_then(|o| o.object_id());
            all.extend(page.data);
            match next {
                Some(id) if page.has_more => after = Some(id),
                _ => {
                    return Ok(Listed {
                        items: all,
                        complete: true,
                    })
                }
            }
        }
        Ok(Listed {
            items: all,
            complete: false,
        })
    }

    fn session_url(&self, id: &SessionId, suffix: &str) -> String {
        format!("{}/v1/checkout/sessions/{id}{suffix}", self.base)
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        stats: &mut CallStats,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, StripeError> {
        let started = Instant::now();
        let result = self
            .policy
            .run(
                None,
                |_| self.attempt(build()),
                |failure: &Failure, _| failure.after,
                |failure, retry, delay| {
                    tracing::warn!(
                        class = failure.error.class(),
                        retry,
                        delay_ms = delay.as_millis() as u64,
                        "retrying Stripe call"
                    );
                },
            )
            .await;
        stats.elapsed = started.elapsed();
        result.map_err(|failure| failure.error)
    }

    /// One try: the answer, or the error with what Stripe's libraries would do next.
    async fn attempt<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, Failure> {
        let sent = request
            .bearer_auth(self.key.expose())
            .header("Stripe-Version", super::API_VERSION)
            .send()
            .await;
        // Network errors are retried, except a refused certificate: only configuration helps.
        let network = |e: reqwest::Error| {
            crate::http_client::log_if_untrusted(&e, "stripe");
            let after = if crate::http_client::untrusted_certificate(&e) {
                After::Stop
            } else {
                After::Retry { retry_after: None }
            };
            Failure {
                error: StripeError::Network {
                    timeout: e.is_timeout(),
                },
                after,
            }
        };
        let response = sent.map_err(network)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(network)?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(|e| Failure {
                error: StripeError::Decode(e.to_string()),
                after: After::Stop,
            });
        }
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let should_retry = header("stripe-should-retry").map(|v| v.eq_ignore_ascii_case("true"));
        let replayed =
            header("idempotent-replayed").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let retry_after = header("retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let detail = serde_json::from_slice::<ErrorBody>(&bytes)
            .unwrap_or_default()
            .error;
        // A replayed answer is what the key holds: asking again changes nothing.
        let after = if !replayed && retries_status(status, should_retry) {
            After::Retry { retry_after }
        } else {
            After::Stop
        };
        Err(Failure {
            error: StripeError::Api {
                status,
                type_: detail.type_.unwrap_or_else(|| "api_error".into()),
                code: detail.code,
                message: detail.message.unwrap_or_default(),
                param: detail.param,
                replayed,
            },
            after,
        })
    }
}

/// A listed object's id, for `starting_after`.
pub trait HasId {
    fn object_id(&self) -> Option<String>;
}

impl HasId for LineItem {
    fn object_id(&self) -> Option<String> {
        self.id.clone()
    }
}

impl HasId for Refund {
    fn object_id(&self) -> Option<String> {
        Some(self.id.clone())
    }
}

impl HasId for super::events::Dispute {
    fn object_id(&self) -> Option<String> {
        Some(self.id.clone())
    }
}

impl HasId for CheckoutSession {
    fn object_id(&self) -> Option<String> {
        Some(self.id.clone())
    }
}

impl HasId for Box<serde_json::value::RawValue> {
    fn object_id(&self) -> Option<String> {
        #[derive(Deserialize)]
        struct Id {
            id: String,
        }
        serde_json::from_str::<Id>(self.get()).ok().map(|i| i.id)
    }
}

/// A failed try and what to do about it.
struct Failure {
    error: StripeError,
    after: After,
}

impl From<OutOfTime> for Failure {
    fn from(_: OutOfTime) -> Self {
        Failure {
            error: StripeError::Network { timeout: true },
            after: After::Stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
