//! Checkout for the one-time full report (`/api/pay/checkout`) that never charges a user twice.
//!
//! - `POST`: start or resume checkout. Already paid: 409 `already_paid`. A pending order whose
//!   session Stripe still reports `open`: that session (`reused: true`). Complete: reconciled to
//!   paid (the webhook may be late), 409. Expired: the order expires and a fresh order and session
//!   are made. Otherwise one new session for a new pending order.
//! - `GET ?session_id=` (or the latest order): the order's status for the success page, reconciled
//!   from Stripe while it is pending.
//!
//! Concurrent clicks collapse twice over: the database allows one open order per user and
//! product and gives one caller a short lease to create its session (the others wait for it),
//! and the Stripe call carries an `Idempotency-Key` derived from the order, so retries and a
//! lease taken over after a crash return the same session.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{header, Method, Response, StatusCode};
use lambda_http::{Body, Request, RequestExt};
use serde::{Deserialize, Serialize};
use shared::auth::{AuthConfig, AuthError, User, Verifier};
use shared::config::{self, ConfigError, EnvReader, Secret, StoreConfig};
use shared::error::{json_response, ApiError};
use shared::store::orders::{Begin, BeginLimits, Order, OrderStatus, Status, FULL_REPORT};
use shared::store::{Store, StoreError};
use shared::stripe::client::{
    CallStats, NewCheckoutSession, RetryPolicy, StripeClient, StripeError,
};
use shared::stripe::events::{CheckoutSession, CheckoutTransition, Event};
use shared::telemetry::{self, MetricSet, Metrics};

/// The route name in logs.
pub const ROUTE: &str = "checkout";
/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4096;
const RATE_WINDOW_S: u32 = 60;

/// The checkout function's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub store: StoreConfig,
    pub auth: AuthConfig,
    pub stripe_key: Secret,
    pub stripe_api_base: String,
    pub stripe_timeout: Duration,
    pub stripe_retries: u32,
    pub price_id: String,
    pub success_url: String,
    pub cancel_url: String,
    pub session_ttl_s: u32,
    pub rate_limit_per_min: u32,
    pub status_rate_limit_per_min: u32,
    /// How long a click waits for a concurrent click that is creating the session.
    pub max_wait: Duration,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::read(EnvReader::from_env())
    }

    /// Reads through `env`.
    pub fn read(mut env: EnvReader<'_>) -> Result<Self, ConfigError> {
        let app_env = env.app_env();
        let store = StoreConfig::read(&mut env, app_env);
        let auth = config::read_auth(&mut env, app_env);
        let key = config::read_stripe_secret_key(&mut env, app_env);
        let stripe_api_base = env
            .optional("STRIPE_API_BASE")
            .unwrap_or_else(|| "https://api.stripe.com".into());
        if !stripe_api_base.starts_with("http://") && !stripe_api_base.starts_with("https://") {
            env.problem("STRIPE_API_BASE", "must be an http(s) URL");
        }
        let price_id = config::read_price_id(&mut env, "STRIPE_FULL_REPORT_PRICE_ID", app_env);
        let mut success_url = config::read_redirect_url(
            &mut env,
            "CHECKOUT_SUCCESS_URL",
            app_env,
            "http://localhost:3000/report/success?session_id={CHECKOUT_SESSION_ID}",
        );
        if !success_url.contains("{CHECKOUT_SESSION_ID}") {
            let sep = if success_url.contains('?') { '&' } else { '?' };
            success_url = format!("{success_url}{sep}session_id={{CHECKOUT_SESSION_ID}}");
        }
        let cancel_url = config::read_redirect_url(
            &mut env,
            "CHECKOUT_CANCEL_URL",
            app_env,
            "http://localhost:3000/report?checkout=cancelled",
        );
        // Stripe accepts expires_at from 30 minutes to 24 hours ahead.
        let session_ttl_s = env.integer("CHECKOUT_SESSION_TTL_S", 7200, 1860..=86_400) as u32;
        let rate_limit_per_min = env.integer("CHECKOUT_RATE_LIMIT_PER_MIN", 10, 1..=10_000) as u32;
        let status_rate_limit_per_min =
            env.integer("CHECKOUT_STATUS_RATE_LIMIT_PER_MIN", 60, 1..=10_000) as u32;
        let stripe_timeout =
            Duration::from_millis(env.integer("STRIPE_TIMEOUT_MS", 8000, 100..=60_000));
        let stripe_retries = env.integer("STRIPE_MAX_RETRIES", 2, 0..=5) as u32;
        let max_wait =
            Duration::from_millis(env.integer("CHECKOUT_MAX_WAIT_MS", 20_000, 100..=60_000));
        let config = match (store, key) {
            (Some(store), Some((stripe_key, _mode))) => Some(Config {
                store,
                auth,
                stripe_key,
                stripe_api_base,
                stripe_timeout,
                stripe_retries,
                price_id,
                success_url,
                cancel_url,
                session_ttl_s,
                rate_limit_per_min,
                status_rate_limit_per_min,
                max_wait,
            }),
            _ => None,
        };
        env.finish_required(config, "STRIPE_SECRET_KEY")
    }

    /// The lease a click holds while creating a session: every Stripe try and backoff fits.
    pub fn lease_s(&self) -> u32 {
        let per_try = self.stripe_timeout.as_secs_f64() + 5.0;
        (per_try * f64::from(self.stripe_retries + 1)).ceil() as u32 + 5
    }
}

/// Everything a request needs, built once per cold start.
#[derive(Debug)]
pub struct State {
    pub config: Config,
    pub store: Store,
    pub stripe: StripeClient,
    pub verifier: Verifier,
    pub metrics: Metrics,
}

impl State {
    /// Builds the clients (connections open lazily) and metrics on stdout.
    pub fn new(config: Config) -> Result<Self, String> {
        let store = Store::from_config(&config.store).map_err(|e| e.to_string())?;
        let stripe = stripe_client(&config).map_err(|e| e.to_string())?;
        let verifier = Verifier::new(config.auth.clone());
        Ok(Self {
            config,
            store,
            stripe,
            verifier,
            metrics: Metrics::new(ROUTE, telemetry::MetricsSink::Stdout),
        })
    }
}

/// The Stripe client `config` describes.
pub fn stripe_client(config: &Config) -> reqwest::Result<StripeClient> {
    StripeClient::new(
        &config.stripe_api_base,
        config.stripe_key.clone(),
        RetryPolicy {
            max_retries: config.stripe_retries,
            ..RetryPolicy::default()
        },
        config.stripe_timeout,
    )
}

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("unsupported content type")]
    UnsupportedMediaType,
    #[error("body too large")]
    BodyTooLarge,
    #[error("invalid body: {1}")]
    InvalidBody(&'static str, String),
    #[error("invalid session id")]
    InvalidSessionId,
    #[error("rate limited")]
    RateLimited(u64),
    #[error("unknown user")]
    UnknownUser,
    #[error("anonymous session")]
    SignInRequired,
    #[error("already paid")]
    AlreadyPaid,
    #[error("payment processing")]
    PaymentProcessing,
    #[error("no order")]
    NotFound,
    #[error("checkout still being created by another request")]
    Busy,
    #[error(transparent)]
    Stripe(#[from] StripeError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CheckoutError {
    /// The one mapping from errors to answers.
    pub fn to_api_error(&self) -> ApiError {
        use StatusCode as S;
        match self {
            CheckoutError::Auth(e) => e.to_api_error(),
            CheckoutError::MethodNotAllowed => ApiError::method_not_allowed("GET, POST"),
            CheckoutError::UnsupportedMediaType => ApiError::new(
                S::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            ),
            CheckoutError::BodyTooLarge => ApiError::body_too_large(MAX_BODY_BYTES),
            CheckoutError::InvalidBody(code, message) => {
                ApiError::new(S::BAD_REQUEST, code, message.clone())
            }
            CheckoutError::InvalidSessionId => ApiError::new(
                S::BAD_REQUEST,
                "invalid_session_id",
                "session_id must be a Checkout Session id (cs_...)",
            ),
            CheckoutError::RateLimited(after) => ApiError::new(
                S::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many checkout requests; try again shortly",
            )
            .retry_after(*after),
            CheckoutError::UnknownUser => ApiError::new(
                S::FORBIDDEN,
                "unknown_user",
                "the token's user does not exist in this project",
            ),
            // An anonymous account can be lost (signed out, cleared browser) and what it bought
            // with it: buying needs a real account.
            CheckoutError::SignInRequired => ApiError::new(
                S::FORBIDDEN,
                "sign_in_required",
                "sign in with an account before buying; a guest session cannot keep a purchase",
            ),
            CheckoutError::AlreadyPaid => ApiError::new(
                S::CONFLICT,
                "already_paid",
                "you have already bought the full report",
            ),
            CheckoutError::PaymentProcessing => ApiError::new(
                S::CONFLICT,
                "payment_processing",
                "your payment is being processed; the report unlocks when it completes",
            ),
            CheckoutError::NotFound => ApiError::new(
                S::NOT_FOUND,
                "order_not_found",
                "no such order for this user",
            ),
            CheckoutError::Busy => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "checkout_in_progress",
                "your checkout is still being prepared; try again in a moment",
            )
            .retry_after(2),
            CheckoutError::Stripe(e) if e.is_transient() => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "payment_provider_unavailable",
                "the payment provider is not answering; try again in a moment",
            )
            .retry_after(5),
            CheckoutError::Stripe(_) => ApiError::new(
                S::BAD_GATEWAY,
                "payment_provider_error",
                "the payment provider refused the request; it has been logged",
            ),
            CheckoutError::Store(StoreError::Unavailable(_)) => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the database is not answering; try again in a moment",
            )
            .retry_after(5),
            CheckoutError::Store(_) => ApiError::internal(),
        }
    }
}

/// The body of `POST`: empty, `{}` or `{"product": "full_report"}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    #[serde(default)]
    pub product: Option<String>,
}

/// The answer to `POST`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CheckoutAnswer {
    pub url: String,
    pub session_id: String,
    pub order_id: uuid::Uuid,
    pub reused: bool,
}

/// The answer to `GET`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct StatusAnswer {
    pub order_id: uuid::Uuid,
    pub status: &'static str,
    pub session_id: Option<String>,
    pub paid_at: Option<i64>,
}

/// Handles one request: one log line and one metrics line, whatever the answer.
pub async fn handle(state: &State, request: Request) -> Response<Body> {
    let started = Instant::now();
    let request_id = shared::lambda::request_id(&request);
    let mut metrics = state.metrics.start();
    metrics.property("request_id", request_id.as_str());
    metrics.count("Requests", 1);

    let result = match *request.method() {
        Method::POST => post(state, &request, &mut metrics)
            .await
            .map(|a| json_response(StatusCode::OK, &a)),
        Method::GET => get(state, &request, &mut metrics)
            .await
            .map(|a| json_response(StatusCode::OK, &a)),
        _ => Err(CheckoutError::MethodNotAllowed),
    };
    let (response, outcome) = match result {
        Ok(response) => (response, "ok".to_owned()),
        Err(error) => {
            record_error(&error, &request_id, &mut metrics);
            let api = error.to_api_error();
            let code = api.code.to_owned();
            let mut response = api.into_response(&request_id);
            if matches!(error, CheckoutError::Auth(_)) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, shared::auth::www_authenticate());
            }
            (response, code)
        }
    };
    telemetry::finish_request(
        metrics,
        "Duration",
        ROUTE,
        response.status().as_u16(),
        started,
        &request_id,
        &outcome,
    )
    .await;
    response
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Parses and checks the body of `POST` (size, content type, fields, product).
pub fn parse_body(request: &Request) -> Result<CheckoutRequest, CheckoutError> {
    let body = request.body().as_ref();
    if body.len() > MAX_BODY_BYTES {
        return Err(CheckoutError::BodyTooLarge);
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(CheckoutRequest::default());
    }
    if !shared::lambda::has_json_body(request.headers()) {
        return Err(CheckoutError::UnsupportedMediaType);
    }
    let parsed: CheckoutRequest = serde_json::from_slice(body).map_err(|e| {
        if e.to_string().starts_with("unknown field") {
            CheckoutError::InvalidBody("unknown_field", format!("{e}"))
        } else {
            CheckoutError::InvalidBody(
                "invalid_json",
                "the body is not a JSON object of the expected shape".into(),
            )
        }
    })?;
    if parsed.product.as_deref().is_some_and(|p| p != FULL_REPORT) {
        return Err(CheckoutError::InvalidBody(
            "unknown_product",
            format!("the only product sold here is {FULL_REPORT}"),
        ));
    }
    Ok(parsed)
}

async fn post(
    state: &State,
    request: &Request,
    metrics: &mut MetricSet,
) -> Result<CheckoutAnswer, CheckoutError> {
    let user = state
        .verifier
        .verify_request(request.headers(), unix_now())
        .await?;
    if user.is_anonymous {
        return Err(CheckoutError::SignInRequired);
    }
    parse_body(request)?;
    let config = &state.config;
    let mut limits = BeginLimits {
        per_window: Some(config.rate_limit_per_min),
        window_s: RATE_WINDOW_S,
        lease_s: config.lease_s(),
        session_ttl_s: config.session_ttl_s,
    };
    let deadline = Instant::now() + config.max_wait;
    let mut waited = false;
    let mut expired_restarts = 0;
    loop {
        let begin = state
            .store
            .checkout_begin(user.id, FULL_REPORT, limits)
            .await?;
        // Only the first look counts against the rate limit.
        limits.per_window = None;
        match begin {
            Begin::RateLimited { retry_after } => {
                return Err(CheckoutError::RateLimited(retry_after))
            }
            Begin::UnknownUser => return Err(CheckoutError::UnknownUser),
            Begin::AlreadyPaid { .. } => {
                metrics.count("AlreadyPaid", 1);
                return Err(CheckoutError::AlreadyPaid);
            }
            Begin::Processing { .. } => return Err(CheckoutError::PaymentProcessing),
            Begin::OpenSession { order } if waited => {
                // A concurrent click created this session moments ago: it is open.
                metrics.count("SessionsReused", 1);
                return answer(order, None, true);
            }
            Begin::OpenSession { order } => {
                let session_id = order.session_id.clone().unwrap_or_default();
                let session = retrieve(state, &session_id, metrics).await?;
                match session.status.as_deref() {
                    Some("open") => {
                        metrics.count("SessionsReused", 1);
                        return answer(order, session.url, true);
                    }
                    Some("complete") => {
                        let reconciled =
                            reconcile(state, CheckoutTransition::Completed, session, metrics)
                                .await?;
                        return Err(match reconciled {
                            OrderStatus::Paid => {
                                metrics.count("AlreadyPaid", 1);
                                CheckoutError::AlreadyPaid
                            }
                            _ => CheckoutError::PaymentProcessing,
                        });
                    }
                    Some("expired") => {
                        reconcile(state, CheckoutTransition::Expired, session, metrics).await?;
                        expired_restarts += 1;
                        if expired_restarts > 2 {
                            return Err(CheckoutError::Busy);
                        }
                    }
                    _ => {
                        return Err(
                            StripeError::Decode("session without a known status".into()).into()
                        )
                    }
                }
            }
            Begin::CreateSession { order } => return create(state, &user, order, metrics).await,
            Begin::InProgress { retry_ms, .. } => {
                let pause = Duration::from_millis(retry_ms.clamp(20, 250));
                if Instant::now() + pause > deadline {
                    return Err(CheckoutError::Busy);
                }
                waited = true;
                tokio::time::sleep(pause).await;
            }
        }
    }
}

fn answer(
    order: Order,
    url: Option<String>,
    reused: bool,
) -> Result<CheckoutAnswer, CheckoutError> {
    let session_id = order.session_id.clone().unwrap_or_default();
    let url = url.or(order.url).unwrap_or_default();
    if url.is_empty() || session_id.is_empty() {
        return Err(StripeError::Decode("open session without a URL".into()).into());
    }
    Ok(CheckoutAnswer {
        url,
        session_id,
        order_id: order.order_id,
        reused,
    })
}

async fn create(
    state: &State,
    user: &User,
    order: Order,
    metrics: &mut MetricSet,
) -> Result<CheckoutAnswer, CheckoutError> {
    let config = &state.config;
    let order_id = order.order_id.to_string();
    let user_id = user.id.to_string();
    let metadata = [
        ("order_id", order_id.as_str()),
        ("user_id", user_id.as_str()),
        ("product", FULL_REPORT),
    ];
    // Every parameter derives from the order, so a retry or a takeover under the same
    // idempotency key sends identical parameters.
    let params = NewCheckoutSession {
        price: &config.price_id,
        quantity: 1,
        client_reference_id: &user_id,
        metadata: &metadata,
        success_url: &config.success_url,
        cancel_url: &config.cancel_url,
        expires_at: order.created_at + i64::from(config.session_ttl_s),
        customer_email: user.email.as_deref(),
    };
    let mut stats = CallStats::default();
    let created = state
        .stripe
        .create_checkout_session(&params, &format!("checkout-{order_id}"), &mut stats)
        .await;
    metrics.millis("StripeLatency", stats.elapsed);
    let session = match created {
        Ok(session) => session,
        Err(error) => {
            // Free the lease so the next click tries again at once (same idempotency key).
            if let Err(e) = state.store.checkout_release_lease(order.order_id).await {
                tracing::warn!(error = %e, "could not release the checkout lease; it will expire");
            }
            return Err(error.into());
        }
    };
    let attached = state
        .store
        .checkout_attach_session(
            order.order_id,
            &session.id,
            session.url.as_deref(),
            session.expires_at,
            session.created,
        )
        .await?;
    if !attached.attached {
        tracing::error!(order_id = %order.order_id, "order already had another session; answering with the stored one");
    }
    metrics.count("SessionsCreated", 1);
    let url = session.url.clone();
    answer(
        attached.order,
        if attached.attached { url } else { None },
        !attached.attached,
    )
}

async fn retrieve(
    state: &State,
    session_id: &str,
    metrics: &mut MetricSet,
) -> Result<CheckoutSession, CheckoutError> {
    let mut stats = CallStats::default();
    let result = state
        .stripe
        .retrieve_checkout_session(session_id, &mut stats)
        .await;
    metrics.millis("StripeLatency", stats.elapsed);
    Ok(result?)
}

/// Applies what Stripe reports about a session; returns the order's status afterwards.
async fn reconcile(
    state: &State,
    transition: CheckoutTransition,
    session: CheckoutSession,
    metrics: &mut MetricSet,
) -> Result<OrderStatus, CheckoutError> {
    let effect = Event::CheckoutSession {
        transition,
        session,
    }
    .effect();
    let reconciled = state.store.checkout_reconcile(&effect).await?;
    metrics.count("Reconciliations", 1);
    if reconciled.duplicate_payment {
        metrics.count("DuplicatePayments", 1);
        tracing::error!("a second paid order for the same user and product");
    }
    Ok(reconciled
        .order
        .map(|o| o.status)
        .unwrap_or(OrderStatus::Pending))
}

fn session_id_param(request: &Request) -> Result<Option<String>, CheckoutError> {
    let params = request.query_string_parameters();
    let Some(id) = params.first("session_id") else {
        return Ok(None);
    };
    let valid = id.starts_with("cs_")
        && id.len() <= 255
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(CheckoutError::InvalidSessionId);
    }
    Ok(Some(id.to_owned()))
}

async fn get(
    state: &State,
    request: &Request,
    metrics: &mut MetricSet,
) -> Result<StatusAnswer, CheckoutError> {
    let user = state
        .verifier
        .verify_request(request.headers(), unix_now())
        .await?;
    let session_id = session_id_param(request)?;
    let status = state
        .store
        .checkout_status(
            user.id,
            session_id.as_deref(),
            state.config.status_rate_limit_per_min,
            RATE_WINDOW_S,
        )
        .await?;
    let mut order = match status {
        Status::RateLimited { retry_after } => return Err(CheckoutError::RateLimited(retry_after)),
        Status::NotFound => return Err(CheckoutError::NotFound),
        Status::Found { order } => order,
    };
    if matches!(order.status, OrderStatus::Pending | OrderStatus::Processing) {
        if let Some(id) = order.session_id.clone() {
            // A poll never fails because Stripe does: the stored state is still an answer.
            match retrieve(state, &id, metrics).await {
                Ok(session) => {
                    let transition = match session.status.as_deref() {
                        Some("complete")
                            if order.status == OrderStatus::Pending
                                || session.payment_status.as_deref() == Some("paid") =>
                        {
                            Some(CheckoutTransition::Completed)
                        }
                        Some("expired") => Some(CheckoutTransition::Expired),
                        _ => None,
                    };
                    if let Some(transition) = transition {
                        let effect = Event::CheckoutSession {
                            transition,
                            session,
                        }
                        .effect();
                        let reconciled = state.store.checkout_reconcile(&effect).await?;
                        metrics.count("Reconciliations", 1);
                        if let Some(updated) = reconciled.order {
                            order = updated;
                        }
                    }
                }
                Err(CheckoutError::Stripe(e)) => {
                    metrics.count_by("StripeErrors", "Class", e.class(), 1);
                    tracing::warn!(error = %e, "could not refresh the order from Stripe; answering the stored state");
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(StatusAnswer {
        order_id: order.order_id,
        status: order.status.public(),
        session_id: order.session_id,
        paid_at: order.paid_at,
    })
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
