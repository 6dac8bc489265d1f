//! The Stripe webhook (`/api/stripe/webhook`): verifies `Stripe-Signature` over the exact bytes
//! received, parses the event, and applies it exactly once through the store.
//!
//! Answers: 200 once the event is recorded (applied, duplicate, ignored, stale or unmatched);
//! 4xx for requests that are not genuine, current events for this mode (nothing is stored);
//! 503/500 when the database (or, for the calls below, Stripe) cannot take the event now, so
//! Stripe delivers it again.
//!
//! With a Stripe key the webhook also acts at Stripe ([`stripe_calls`]): it checks the line
//! items of a paid session that matches no order before granting anything, refunds a second
//! payment for a product the user already owns, and expires the sessions of orders a payment
//! closed. The invariants are in docs/payments.md.

pub mod stripe_calls;

use std::time::{Duration, Instant};

use http::{header, Method, Response, StatusCode};
use lambda_http::{Body, Request};
use serde::Serialize;
use shared::clock::Clock;
use shared::config::{self, ConfigError, EnvReader, Secret, StoreConfig, StripeApi, StripeMode};
use shared::error::{json_response, ApiError};
use shared::store::{ApplyOutcome, Outcome, Store, StoreError};
use shared::stripe::client::StripeClient;
use shared::stripe::events::{self, Event};
use shared::stripe::ids::PriceId;
use shared::stripe::signature::{self, SignatureError};
use shared::telemetry::{MetricSet, Metrics, RequestContext};

/// The route name in logs.
pub const ROUTE: &str = "webhook";

/// The webhook's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub store: StoreConfig,
    pub secrets: Vec<Secret>,
    pub tolerance: Duration,
    pub stripe_mode: StripeMode,
    pub max_body_bytes: usize,
    /// Stripe API access (`STRIPE_SECRET_KEY` set): verification, refunds, expiry.
    pub stripe: Option<StripeApi>,
    /// `STRIPE_FULL_REPORT_PRICE_ID`: what a paid session without an order must contain.
    pub price_id: Option<PriceId>,
    /// `AUTO_REFUND_DUPLICATES` (default on): refund a second payment for an owned product.
    pub auto_refund: bool,
}

impl Config {
    /// Reads through `env`; needs only the store variables and `STRIPE_WEBHOOK_SECRET`. With
    /// `STRIPE_SECRET_KEY` (a restricted key with Checkout Sessions read and Refunds write is
    /// enough) it also verifies, refunds and expires at Stripe.
    pub fn read(mut env: EnvReader<'_>) -> Result<Self, ConfigError> {
        let app_env = env.app_env();
        let store = StoreConfig::read(&mut env, app_env);
        shared::http_client::check_extra_roots(&mut env);
        let secrets = config::read_webhook_secrets(&mut env, app_env);
        let tolerance = env.seconds("STRIPE_WEBHOOK_TOLERANCE_S", 300, 1..=86_400);
        let stripe_mode = config::expected_stripe_mode(&mut env, app_env);
        let max_body_bytes =
            env.integer("WEBHOOK_MAX_BODY_BYTES", 1 << 20, 1024..=6 << 20) as usize;
        let stripe = env
            .optional("STRIPE_SECRET_KEY")
            .filter(|key| config::stripe_key_mode(key).is_some())
            .map(|key| StripeApi::read(&mut env, Secret::new(key), 3000, 1));
        let price_id = match env.optional("STRIPE_FULL_REPORT_PRICE_ID") {
            Some(_) => config::read_price_id(&mut env, "STRIPE_FULL_REPORT_PRICE_ID", app_env),
            None if stripe.is_some() && app_env.is_production() => {
                env.problem(
                    "STRIPE_FULL_REPORT_PRICE_ID",
                    "is required with STRIPE_SECRET_KEY: paid sessions without an order are checked against it",
                );
                None
            }
            None => None,
        };
        let auto_refund = env.parsed("AUTO_REFUND_DUPLICATES", true, "true or false", |raw| {
            raw.parse::<bool>().ok()
        });
        let config = store.map(|store| Config {
            store,
            secrets,
            tolerance,
            stripe_mode,
            max_body_bytes,
            stripe,
            price_id,
            auto_refund,
        });
        env.finish_required(config, "DATABASE_URL")
    }
}

/// Everything a request needs, built once per cold start.
#[derive(Clone, Debug)]
pub struct State {
    pub config: Config,
    pub store: Store,
    /// Present when the config has a Stripe key.
    pub stripe: Option<StripeClient>,
    pub metrics: Metrics,
    /// The wall clock (signature tolerance, arrival times).
    pub clock: Clock,
}

/// Why a delivery was not taken.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("unsupported content type")]
    UnsupportedMediaType,
    #[error("body too large")]
    BodyTooLarge(usize),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    #[error("event livemode does not match this endpoint")]
    LivemodeMismatch { livemode: bool },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A Stripe call the event needs failed for now (nothing is lost: Stripe redelivers).
    #[error("Stripe call failed: {0}")]
    Stripe(#[from] shared::stripe::client::StripeError),
}

impl WebhookError {
    /// The one mapping from errors to answers.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            WebhookError::MethodNotAllowed => ApiError::method_not_allowed("POST"),
            WebhookError::UnsupportedMediaType => {
                ApiError::unsupported_media_type("Stripe events are sent as application/json")
            }
            WebhookError::BodyTooLarge(limit) => ApiError::body_too_large(*limit),
            WebhookError::Signature(e) => {
                ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
            }
            WebhookError::InvalidEvent(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_event",
                "the body is not a Stripe event this endpoint can read",
            ),
            WebhookError::LivemodeMismatch { livemode } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "livemode_mismatch",
                if *livemode {
                    "a live-mode event was sent to a test-mode endpoint"
                } else {
                    "a test-mode event was sent to a live-mode endpoint"
                },
            ),
            WebhookError::Store(StoreError::Unavailable(_)) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the event could not be stored now; Stripe will deliver it again",
            )
            .retry_after(60),
            WebhookError::Store(_) => ApiError::internal(),
            WebhookError::Stripe(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "payment_provider_unavailable",
                "Stripe is not answering; deliver the event again",
            )
            .retry_after(60),
        }
    }
}

impl State {
    /// Builds the clients (connections open lazily) and metrics on stdout.
    pub fn new(config: Config) -> Result<Self, String> {
        let store = Store::from_config(&config.store).map_err(|e| e.to_string())?;
        Self::from_parts(config, store, Metrics::stdout(ROUTE))
    }

    /// The state over a given store and metrics sink (tests and benchmarks).
    pub fn from_parts(config: Config, store: Store, metrics: Metrics) -> Result<Self, String> {
        let stripe = match &config.stripe {
            Some(api) => Some(StripeClient::from_config(api).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(Self {
            config,
            store,
            stripe,
            metrics,
            clock: Clock::system(),
        })
    }
}

#[derive(Serialize)]
struct Accepted<'a> {
    received: bool,
    event_id: &'a str,
    outcome: &'a str,
}

/// Handles one delivery: one log line and one metrics line per request, whatever the answer.
pub async fn handle(state: &State, request: Request) -> Response<Body> {
    let mut context = RequestContext::start(&state.metrics, shared::lambda::request_id(&request));
    context.metrics.count("Received", 1);

    let result = process(state, &request, &mut context.metrics).await;
    let (response, outcome) = match result {
        Ok((event_id, applied)) => {
            let outcome = applied.outcome.as_str();
            let body = Accepted {
                received: true,
                event_id: &event_id,
                outcome,
            };
            (json_response(StatusCode::OK, &body), outcome.to_owned())
        }
        Err(error) => {
            record_error(&error, &context.request_id, &mut context.metrics);
            let api = error.to_api_error();
            let code = api.code;
            (api.into_response(&context.request_id), code.to_owned())
        }
    };
    context.finish(response.status().as_u16(), &outcome).await;
    response
}

async fn process(
    state: &State,
    request: &Request,
    metrics: &mut MetricSet,
) -> Result<(String, ApplyOutcome), WebhookError> {
    if request.method() != Method::POST {
        return Err(WebhookError::MethodNotAllowed);
    }
    // Stripe always sends a JSON content type; a request without one is judged by its signature.
    if request.headers().contains_key(header::CONTENT_TYPE)
        && !shared::lambda::has_json_body(request.headers())
    {
        return Err(WebhookError::UnsupportedMediaType);
    }
    let body = request.body().as_ref();
    if body.len() > state.config.max_body_bytes {
        return Err(WebhookError::BodyTooLarge(state.config.max_body_bytes));
    }
    let header = match request.headers().get("stripe-signature") {
        None => return Err(SignatureError::MissingHeader.into()),
        Some(value) => value.to_str().map_err(|_| SignatureError::Malformed)?,
    };
    signature::verify(
        body,
        header,
        &state.config.secrets,
        state.clock.unix_s(),
        state.config.tolerance,
    )?;

    let parsed = parse_event(body)?;
    if StripeMode::of_livemode(parsed.livemode) != state.config.stripe_mode {
        return Err(WebhookError::LivemodeMismatch {
            livemode: parsed.livemode,
        });
    }
    let mut effect = parsed.event.effect();
    stripe_calls::complete_dispute(state, &mut effect, metrics).await?;
    let store_started = Instant::now();
    let mut applied = apply(state, &parsed, &effect).await?;
    if applied.outcome == Outcome::NeedsVerification {
        // A paid session that matches no order of ours: granted only if Stripe says it bought
        // the product (I5). A Stripe failure answers 503, nothing recorded, Stripe redelivers.
        let verdict = stripe_calls::verify_session(state, &effect, metrics).await?;
        effect = effect.verified(verdict);
        applied = apply(state, &parsed, &effect).await?;
    }
    metrics.millis("StoreTime", store_started.elapsed());

    match applied.outcome {
        Outcome::Duplicate => metrics.count("Duplicates", 1),
        Outcome::Unmatched => {
            metrics.count("Unmatched", 1);
            tracing::warn!(event_id = %parsed.id, event_type = %parsed.type_, detail = applied.detail.as_deref().unwrap_or(""), "event matched no order or user");
        }
        Outcome::Applied | Outcome::Ignored | Outcome::Stale | Outcome::NeedsVerification => {
            metrics.count_by("Processed", "EventType", &parsed.type_, 1);
        }
    }
    if let Some(delay) = applied.sync_delay_ms.filter(|d| *d >= 0) {
        metrics.millis("OrderSyncDelay", Duration::from_millis(delay as u64));
    }
    if applied.unverified {
        metrics.count("UnverifiedSessions", 1);
        tracing::error!(event_id = %parsed.id, detail = applied.detail.as_deref().unwrap_or(""), "paid session without an order was not granted");
    }
    if applied.refunded {
        metrics.count("Refunds", 1);
    }
    if let Some(status) = applied.dispute.as_deref() {
        if matches!(
            parsed.event,
            Event::Dispute {
                transition: events::DisputeTransition::Created,
                ..
            }
        ) {
            metrics.count("Disputes", 1);
        }
        tracing::warn!(event_id = %parsed.id, status, detail = applied.detail.as_deref().unwrap_or(""), "dispute");
    }
    if applied.duplicate_payment {
        metrics.count("DuplicatePayments", 1);
        tracing::error!(
            event_id = %parsed.id,
            order_id = applied.order_id.as_deref().unwrap_or(""),
            "a second payment for a product the user already owns"
        );
    }
    stripe_calls::follow_up(state, &applied, metrics).await?;
    if matches!(parsed.event, Event::Other) {
        tracing::debug!(event_type = %parsed.type_, "event type not handled");
    }
    Ok((parsed.id, applied))
}

/// A verified body as an event, or the webhook's refusal of it (400 `invalid_event`).
pub fn parse_event(body: &[u8]) -> Result<events::ParsedEvent<'_>, WebhookError> {
    events::parse(body).map_err(|e| WebhookError::InvalidEvent(e.to_string()))
}

/// Applies the event; a unique violation means another delivery got there first, and the event
/// is applied once more to learn the outcome (the function is one transaction: nothing of the
/// first try remains).
async fn apply(
    state: &State,
    parsed: &events::ParsedEvent<'_>,
    effect: &shared::store::Effect,
) -> Result<ApplyOutcome, StoreError> {
    match state
        .store
        .apply_stripe_event(parsed, effect, state.clock.unix_ms())
        .await
    {
        Err(StoreError::Conflict(detail)) => {
            tracing::warn!(event_id = %parsed.id, detail, "unique violation; applying again");
            state
                .store
                .apply_stripe_event(parsed, effect, state.clock.unix_ms())
                .await
        }
        other => other,
    }
}

fn record_error(error: &WebhookError, request_id: &str, metrics: &mut MetricSet) {
    match error {
        WebhookError::Signature(e) => {
            metrics.count("SignatureFailures", 1);
            tracing::warn!(request_id, reason = e.code(), "signature refused");
        }
        WebhookError::Store(e) => {
            metrics.count("Errors", 1);
            tracing::error!(request_id, error = %e, "event not stored; Stripe will redeliver");
        }
        WebhookError::InvalidEvent(reason) => {
            metrics.count("InvalidEvents", 1);
            tracing::warn!(request_id, reason = %reason, "verified body is not a usable event");
        }
        WebhookError::Stripe(e) => {
            metrics.count_by("StripeErrors", "Class", e.class(), 1);
            tracing::error!(request_id, error = %e, "Stripe call failed; Stripe will redeliver");
        }
        WebhookError::LivemodeMismatch { .. } => {
            metrics.count("LivemodeMismatches", 1);
            tracing::error!(
                request_id,
                "event mode does not match this endpoint's Stripe mode"
            );
        }
        _ => {}
    }
}
