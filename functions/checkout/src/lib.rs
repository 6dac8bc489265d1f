//! Checkout for the one-time full report (`/api/pay/checkout`) that never charges a user twice.
//!
//! - `POST` ([`purchase`]): start or resume checkout; one payable session per user at a time.
//! - `GET ?session_id=` ([`status`]): the order's status for the success page.
//!
//! The invariants (one payable session, paid means paid, exactly once, ...) are written down in
//! docs/payments.md and enforced by the SQL functions this crate calls.

pub mod config;
pub mod error;
pub mod purchase;
pub mod request;
pub mod session;
pub mod status;

use http::{header, Method, Response, StatusCode};
use lambda_http::{Body, Request};
use shared::auth::Verifier;
use shared::clock::Clock;
use shared::error::json_response;
use shared::store::Store;
use shared::stripe::client::StripeClient;
use shared::telemetry::{MetricSet, Metrics, RequestContext};

pub use config::Config;
pub use error::CheckoutError;
pub use purchase::CheckoutAnswer;
pub use request::{parse_body, CheckoutRequest};
pub use status::StatusAnswer;

/// The route name in logs.
pub const ROUTE: &str = "checkout";
/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4096;
const RATE_WINDOW_S: u32 = 60;

/// Everything a request needs, built once per cold start.
#[derive(Debug)]
pub struct State {
    pub config: Config,
    pub store: Store,
    pub stripe: StripeClient,
    pub verifier: Verifier,
    pub metrics: Metrics,
    /// The wall clock (token times).
    pub clock: Clock,
}

impl State {
    /// Builds the clients (connections open lazily) and metrics on stdout.
    pub fn new(config: Config) -> Result<Self, String> {
        let store = Store::from_config(&config.store).map_err(|e| e.to_string())?;
        Self::from_parts(config, store, Metrics::stdout(ROUTE))
    }

    /// The state over a given store and metrics sink (tests and benchmarks).
    pub fn from_parts(config: Config, store: Store, metrics: Metrics) -> Result<Self, String> {
        let stripe = StripeClient::from_config(&config.stripe).map_err(|e| e.to_string())?;
        let verifier = Verifier::new(config.auth.clone());
        Ok(Self {
            config,
            store,
            stripe,
            verifier,
            metrics,
            clock: Clock::system(),
        })
    }
}

/// Handles one request: one log line and one metrics line, whatever the answer.
pub async fn handle(state: &State, request: Request) -> Response<Body> {
    let mut context = RequestContext::start(&state.metrics, shared::lambda::request_id(&request));
    context.metrics.count("Requests", 1);
    let metrics = &mut context.metrics;
    let now = state.clock.unix_s();
    let result = match *request.method() {
        Method::POST => purchase::post(state, &request, now, metrics)
            .await
            .map(|a| json_response(StatusCode::OK, &a)),
        Method::GET => status::get(state, &request, now, metrics)
            .await
            .map(|a| json_response(StatusCode::OK, &a)),
        _ => Err(CheckoutError::MethodNotAllowed),
    };
    let (response, outcome) = match result {
        Ok(response) => (response, "ok".to_owned()),
        Err(error) => {
            record_error(&error, &context.request_id, &mut context.metrics);
            let api = error.to_api_error();
            let code = api.code.to_owned();
            let mut response = api.into_response(&context.request_id);
            if matches!(error, CheckoutError::Auth(_)) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, shared::auth::www_authenticate());
            }
            (response, code)
        }
    };
    context.finish(response.status().as_u16(), &outcome).await;
    response
}

fn record_error(error: &CheckoutError, request_id: &str, metrics: &mut MetricSet) {
    match error {
        CheckoutError::Auth(e) => {
            metrics.count("AuthFailures", 1);
            tracing::warn!(request_id, reason = e.code(), "token refused");
        }
        CheckoutError::RateLimited(_) => metrics.count("RateLimited", 1),
        CheckoutError::Stripe(e) => {
            metrics.count_by("StripeErrors", "Class", e.class(), 1);
            if e.class() == "authentication" {
                tracing::error!(request_id, error = %e, "Stripe rejected our key: check STRIPE_SECRET_KEY");
            } else {
                tracing::error!(request_id, error = %e, "Stripe call failed");
            }
        }
        CheckoutError::Store(e) => {
            metrics.count("Errors", 1);
            tracing::error!(request_id, error = %e, "store call failed");
        }
        _ => {}
    }
}
