//! The Stripe webhook (`/api/stripe/webhook`): verifies `Stripe-Signature` over the exact bytes
//! received, parses the event, and applies it exactly once through the store.
//!
//! An event is a notification: the webhook reads the object it names from Stripe's API (a
//! session and its payment; a payment with its charge, refunds and disputes; a subscription; an
//! invoice), stores what Stripe says now, and carries out what the stored facts make due
//! (refunds of duplicate payments, expiries of sessions nobody should pay): the one path of
//! `shared::payments::sync`, which checkout and the reconciler share. The invariants are in
//! docs/payments.md.
//!
//! Answers: 200 once the event and what Stripe says are stored (applied, duplicate, ignored or
//! unmatched); 4xx for requests that are not genuine, current events for this mode (nothing is
//! stored); 503 when Stripe cannot be read, the database cannot take the event, or an action
//! due failed for now, so Stripe delivers it again.

use std::time::{Duration, Instant};

use http::{header, Method, Response, StatusCode};
use lambda_http::{Body, Request};
use serde::Serialize;
use shared::clock::Clock;
use shared::config::{self, ConfigError, EnvReader, Secret, StoreConfig, StripeApi, StripeMode};
use shared::error::{json_response, ApiError};
use shared::payments::{target_of, Reader, SyncError, Synced, Syncer};
use shared::store::payments::Delivery;
use shared::store::{Outcome, Store, StoreError};
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
    /// Stripe API access (`STRIPE_SECRET_KEY`): every event's object is read from it.
    pub stripe: StripeApi,
    /// `STRIPE_FULL_REPORT_PRICE_ID`: what a paid session of another channel must contain.
    pub price_id: Option<PriceId>,
    /// `AUTO_REFUND_DUPLICATES` (default on): refund a second payment for an owned product.
    pub auto_refund: bool,
}

impl Config {
    /// Reads through `env`: the store variables, `STRIPE_WEBHOOK_SECRET` and `STRIPE_SECRET_KEY`
    /// (a restricted key is enough: see docs/configuration.md for the permissions).
    pub fn read(mut env: EnvReader<'_>) -> Result<Self, ConfigError> {
        let app_env = env.app_env();
        let store = StoreConfig::read(&mut env, app_env);
        shared::http_client::check_extra_roots(&mut env);
        let secrets = config::read_webhook_secrets(&mut env, app_env);
        let tolerance = env.seconds("STRIPE_WEBHOOK_TOLERANCE_S", 300, 1..=86_400);
        let key = config::read_stripe_secret_key(&mut env, app_env);
        let stripe_mode = match &key {
            Some((_, mode)) => *mode,
            None => config::expected_stripe_mode(&mut env, app_env),
        };
        let max_body_bytes =
            env.integer("WEBHOOK_MAX_BODY_BYTES", 1 << 20, 1024..=6 << 20) as usize;
        let stripe = key.map(|(key, _)| StripeApi::read(&mut env, key, 3000, 1));
        let price_id = match env.optional("STRIPE_FULL_REPORT_PRICE_ID") {
            Some(_) => config::read_price_id(&mut env, "STRIPE_FULL_REPORT_PRICE_ID", app_env),
            None if app_env.is_production() => {
                env.problem(
                    "STRIPE_FULL_REPORT_PRICE_ID",
                    "is required: paid sessions of other channels (Payment Links) are checked against it",
                );
                None
            }
            None => None,
        };
        let auto_refund = env.parsed("AUTO_REFUND_DUPLICATES", true, "true or false", |raw| {
            raw.parse::<bool>().ok()
        });
        let config = match (store, stripe) {
            (Some(store), Some(stripe)) => Some(Config {
                store,
                secrets,
                tolerance,
                stripe_mode,
                max_body_bytes,
                stripe,
                price_id,
                auto_refund,
            }),
            _ => None,
        };
        env.finish_required(config, "DATABASE_URL")
    }

    /// The syncer over `state`'s clients.
    pub fn syncer<'a>(&'a self, state: &'a State) -> Syncer<'a> {
        Syncer {
            store: &state.store,
            reader: Reader {
                stripe: &state.stripe,
                price: self.price_id.as_ref(),
            },
            clock: state.clock,
            refunds: self.auto_refund,
        }
    }
}

/// Everything a request needs, built once per cold start.
#[derive(Clone, Debug)]
pub struct State {
    pub config: Config,
    pub store: Store,
    pub stripe: StripeClient,
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
        let stripe = StripeClient::from_config(&config.stripe).map_err(|e| e.to_string())?;
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
        Ok((event_id, outcome)) => {
            let body = Accepted {
                received: true,
                event_id: &event_id,
                outcome: outcome.as_str(),
            };
            (
                json_response(StatusCode::OK, &body),
                outcome.as_str().to_owned(),
            )
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
) -> Result<(String, Outcome), WebhookError> {
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
    let outcome = apply(state, &parsed, metrics).await?;
    Ok((parsed.id, outcome))
}

/// Applies a verified event through the one sync path: reads what it names, stores it, carries
/// out what is due. Also the reconciler's path for an event Stripe could not deliver.
pub async fn apply(
    state: &State,
    parsed: &events::ParsedEvent<'_>,
    metrics: &mut MetricSet,
) -> Result<Outcome, WebhookError> {
    let target = target_of(&parsed.event);
    let buyer_waits = shared::payments::target::paid_elsewhere_by(&parsed.event);
    let delivery = Delivery {
        event: parsed,
        received_at_ms: state.clock.unix_ms(),
    };
    let started = Instant::now();
    let synced = state
        .config
        .syncer(state)
        .sync(
            Some(delivery),
            target.as_ref(),
            buyer_waits.as_ref().map(|(s, u)| (s.as_str(), u.as_str())),
        )
        .await;
    let synced = match synced {
        Ok(synced) => synced,
        Err(SyncError::Store(e)) => return Err(e.into()),
        Err(SyncError::Stripe(e)) => {
            metrics.millis("StoreTime", started.elapsed());
            return Err(e.into());
        }
    };
    metrics.millis(
        "StoreTime",
        started.elapsed().saturating_sub(synced.stripe_time),
    );
    metrics.millis("StripeLatency", synced.stripe_time);
    let outcome = report(parsed, &synced, metrics);
    if let Some(e) = synced.unavailable {
        // What is due stays due: Stripe's next delivery (or the reconciler) makes it.
        return Err(e.into());
    }
    Ok(outcome)
}

/// Metrics and log lines for what a sync did; the event's outcome.
fn report(parsed: &events::ParsedEvent<'_>, synced: &Synced, metrics: &mut MetricSet) -> Outcome {
    for class in &synced.stripe_errors {
        metrics.count_by("StripeErrors", "Class", class, 1);
    }
    let Some(recorded) = &synced.recorded else {
        return Outcome::Unmatched;
    };
    let detail = recorded.detail.as_deref().unwrap_or("");
    match recorded.outcome {
        Outcome::Duplicate => metrics.count("Duplicates", 1),
        Outcome::Unmatched => {
            metrics.count("Unmatched", 1);
            tracing::warn!(event_id = %parsed.id, event_type = %parsed.type_, detail, "event matched no purchase or user");
        }
        Outcome::Applied | Outcome::Ignored => {
            metrics.count_by("Processed", "EventType", &parsed.type_, 1);
        }
    }
    for delay in recorded.sync_delays_ms.iter().filter(|d| **d >= 0) {
        metrics.millis("OrderSyncDelay", Duration::from_millis(*delay as u64));
    }
    if recorded.unverified {
        metrics.count("UnverifiedSessions", 1);
        tracing::error!(event_id = %parsed.id, "a paid session of another channel does not sell the product: nothing granted");
    }
    if recorded.duplicates > 0 {
        metrics.count("DuplicatePayments", u64::from(recorded.duplicates));
        tracing::error!(event_id = %parsed.id, "a second payment for a product the user already owns");
    }
    if matches!(parsed.event, Event::ChargeRefunded { .. }) {
        metrics.count("Refunds", 1);
    }
    if let Event::Dispute {
        transition,
        dispute,
    } = &parsed.event
    {
        if *transition == events::DisputeTransition::Created {
            metrics.count("Disputes", 1);
        }
        tracing::warn!(event_id = %parsed.id, status = %dispute.status, "dispute");
    }
    if synced.refunds_made > 0 {
        metrics.count("DuplicateRefunds", u64::from(synced.refunds_made));
    }
    if synced.sessions_expired > 0 {
        metrics.count("SessionsExpired", u64::from(synced.sessions_expired));
    }
    for (due, error) in &synced.refunds_refused {
        metrics.count("DuplicateRefundFailures", 1);
        tracing::error!(order_id = %due.order_id, payment_intent = %due.payment_intent_id, error,
            "Stripe refused to refund a duplicate payment that is still due; see the runbook");
    }
    for due in &synced.refunds_left {
        tracing::error!(order_id = %due.order_id, payment_intent = %due.payment_intent_id,
            "duplicate payment not refunded: AUTO_REFUND_DUPLICATES=false; refund it in the Stripe Dashboard");
    }
    if matches!(parsed.event, Event::Other) {
        tracing::debug!(event_type = %parsed.type_, "event type not handled");
    }
    recorded.outcome.clone()
}

/// A verified body as an event, or the webhook's refusal of it (400 `invalid_event`).
pub fn parse_event(body: &[u8]) -> Result<events::ParsedEvent<'_>, WebhookError> {
    events::parse(body).map_err(|e| WebhookError::InvalidEvent(e.to_string()))
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
