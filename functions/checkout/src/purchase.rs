//! `POST`: start or resume the user's checkout of the full report.
//!
//! Already paid: 409 `already_paid` (also while that payment is being stored: the database makes
//! the click wait for it). Disputed: 409 `payment_disputed`. A payment in flight: 409
//! `payment_processing`. An open order whose session Stripe still reports open: that session
//! (`reused: true`). A session Stripe reports finished (complete or expired): what Stripe says is
//! stored through the payments' sync path, and the click asks again (then already paid, in
//! flight, or a fresh order). Otherwise one new session for the user's one open order.
//!
//! Concurrent clicks collapse twice over: one open order per user and product, and a short lease
//! on creating its session (the others wait for it); the create carries the idempotency key
//! `checkout-{order_id}` and parameters taken from the order only, so a retry or a takeover
//! after a crash returns the same session. A key that can never give a session (an
//! `idempotency_error`, a replayed error, an `expires_at` Stripe no longer accepts) retires the
//! order, and the click starts a fresh one (I9).

use std::time::{Duration, Instant};

use lambda_http::Request;
use serde::Serialize;
use shared::auth::User;
use shared::payments::facts::SessionFact;
use shared::store::orders::{Begin, BeginLimits, Order, FULL_REPORT};
use shared::stripe::client::{CallStats, NewCheckoutSession, StripeError};
use shared::stripe::events::{CheckoutSession, SessionStatus};
use shared::telemetry::MetricSet;

use crate::session::{self, retrieve, unknown_status};
use crate::{request, CheckoutError, State, RATE_WINDOW_S};

/// How often one click starts over (a session found finished, a retired order, sessions expired
/// first, a session that must not be paid) before answering 503.
const MAX_RESTARTS: u32 = 3;

/// The answer to `POST`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CheckoutAnswer {
    pub url: String,
    pub session_id: String,
    pub order_id: uuid::Uuid,
    pub reused: bool,
}

/// What one look at the order led to.
enum Step {
    Answer(CheckoutAnswer),
    /// Ask `checkout_begin` again (a fresh order, or what a payment changed).
    Restart,
    /// Stripe refused the order's e-mail: ask again for a fresh order without one.
    RetireEmail,
}

/// Handles `POST`.
pub async fn post(
    state: &State,
    request: &Request,
    now: i64,
    metrics: &mut MetricSet,
) -> Result<CheckoutAnswer, CheckoutError> {
    let user = state
        .verifier
        .verify_request(request.headers(), now)
        .await?;
    if user.is_anonymous {
        return Err(CheckoutError::SignInRequired);
    }
    request::parse_body(request)?;
    let config = &state.config;
    let mut limits = BeginLimits {
        per_window: Some(config.rate_limit_per_min),
        window_s: RATE_WINDOW_S,
        lease_s: config.lease_s(),
        session_ttl_s: config.session_ttl_s,
    };
    let deadline = Instant::now() + config.max_wait;
    let mut waited = false;
    let mut restarts = 0;
    // This request's claim on a creation lease: asking again with it resumes its own lease.
    let claim = uuid::Uuid::new_v4();
    // Cleared when Stripe refuses the e-mail: the next order lets Checkout ask for one.
    let mut email = user.email.clone();
    loop {
        let begin = state
            .store
            .checkout_begin(user.id, FULL_REPORT, email.as_deref(), claim, limits)
            .await?;
        // Only the first look counts against the rate limit.
        limits.per_window = None;
        let step = match begin {
            Begin::RateLimited { retry_after } => {
                return Err(CheckoutError::RateLimited(retry_after))
            }
            Begin::UnknownUser => return Err(CheckoutError::UnknownUser),
            Begin::AlreadyPaid { .. } => {
                metrics.count("AlreadyPaid", 1);
                return Err(CheckoutError::AlreadyPaid);
            }
            Begin::Disputed { .. } => return Err(CheckoutError::PaymentDisputed),
            Begin::Processing { .. } => return Err(CheckoutError::PaymentProcessing),
            Begin::ExpireFirst { sessions } => {
                // Sessions of ours Stripe may still let someone pay that nobody should: none is
                // handed out, and no new one is made, before they are expired (I1).
                session::expire(state, sessions, metrics).await?;
                Step::Restart
            }
            Begin::OpenSession { order } if waited => {
                // A concurrent click created this session moments ago: it is open.
                metrics.count("SessionsReused", 1);
                Step::Answer(answer(order, None, true)?)
            }
            Begin::OpenSession { order } => resume(state, order, metrics).await?,
            Begin::CreateSession { order } => {
                let step = create(state, &user, order, metrics).await?;
                if let Step::RetireEmail = step {
                    email = None;
                }
                step
            }
            Begin::InProgress { retry_ms, .. } => {
                let pause = Duration::from_millis(retry_ms.clamp(20, 250));
                if Instant::now() + pause > deadline {
                    return Err(CheckoutError::Busy);
                }
                waited = true;
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        match step {
            Step::Answer(answer) => return Ok(answer),
            Step::Restart | Step::RetireEmail if restarts < MAX_RESTARTS => {
                restarts += 1;
                // What a wait showed was before the restart: a session found after it is
                // asked about at Stripe.
                waited = false;
            }
            Step::Restart | Step::RetireEmail => return Err(CheckoutError::Busy),
        }
    }
}

/// An open order with a session: hand it out again if Stripe says it is still open; otherwise
/// store what Stripe says (paid, in flight, expired) and ask again.
async fn resume(
    state: &State,
    order: Order,
    metrics: &mut MetricSet,
) -> Result<Step, CheckoutError> {
    let session_id = order.session_id.clone().unwrap_or_default();
    let session = retrieve(state, &session_id, metrics).await?;
    match session.status {
        Some(SessionStatus::Open) => {
            metrics.count("SessionsReused", 1);
            Ok(Step::Answer(answer(order, session.url, true)?))
        }
        Some(SessionStatus::Complete | SessionStatus::Expired) => {
            session::sync(state, &session.id, metrics).await?;
            Ok(Step::Restart)
        }
        _ => Err(unknown_status()),
    }
}

/// This click holds the order's lease: create its session at Stripe and attach it.
async fn create(
    state: &State,
    user: &User,
    order: Order,
    metrics: &mut MetricSet,
) -> Result<Step, CheckoutError> {
    let created = create_at_stripe(state, user.id, &order, metrics).await;
    let session = match created {
        Ok(session) => session,
        Err(error)
            if error.is_dead_key()
                || matches!(error.param(), Some("expires_at" | "customer_email")) =>
        {
            // Nothing was created under this key, and nothing ever will be (a parameter fixed on
            // the order is refused): close the order so that the user is not locked out, and
            // start a fresh one.
            tracing::warn!(order_id = %order.order_id, error = %error, "retiring an order whose session cannot be created");
            state
                .store
                .checkout_retire_order(order.order_id, error.class())
                .await?;
            metrics.count("OrdersRetired", 1);
            return Ok(if error.param() == Some("customer_email") {
                Step::RetireEmail
            } else {
                Step::Restart
            });
        }
        Err(error) => {
            // Free the lease so the next click tries again at once (same idempotency key).
            if let Err(e) = state.store.checkout_release_lease(order.order_id).await {
                tracing::warn!(error = %e, "could not release the checkout lease; it will expire");
            }
            return Err(error.into());
        }
    };
    attach(state, order, session, metrics).await
}

/// `POST /v1/checkout/sessions` for `order` under its idempotency key `checkout-{order_id}`.
/// Every parameter derives from the order (I9), so a retry or a takeover after a crash sends
/// identical parameters whatever the token says now.
pub async fn create_at_stripe(
    state: &State,
    user: uuid::Uuid,
    order: &Order,
    metrics: &mut MetricSet,
) -> Result<CheckoutSession, StripeError> {
    let config = &state.config;
    let order_id = order.order_id.to_string();
    let user_id = user.to_string();
    let metadata = [
        ("order_id", order_id.as_str()),
        ("user_id", user_id.as_str()),
        ("product", FULL_REPORT),
    ];
    let params = NewCheckoutSession {
        price: config.price_id.as_str(),
        quantity: 1,
        client_reference_id: &user_id,
        metadata: &metadata,
        success_url: &config.success_url,
        cancel_url: &config.cancel_url,
        expires_at: order
            .expires_at
            .unwrap_or(order.created_at + i64::from(config.session_ttl_s)),
        customer_email: order.customer_email.as_deref(),
    };
    let mut stats = CallStats::default();
    let created = state
        .stripe
        .create_checkout_session(&params, &format!("checkout-{order_id}"), &mut stats)
        .await;
    metrics.millis("StripeLatency", stats.elapsed);
    created
}

/// Stores the session on its order; one that must not be paid (the user paid meanwhile, or
/// Stripe no longer lets it be paid) is expired at Stripe and never handed out (I1).
async fn attach(
    state: &State,
    order: Order,
    session: CheckoutSession,
    metrics: &mut MetricSet,
) -> Result<Step, CheckoutError> {
    let attached = state
        .store
        .checkout_attach_session(order.order_id, &SessionFact::of(&session, None))
        .await?;
    if !attached.attached {
        tracing::warn!(order_id = %order.order_id, session_id = %session.id,
            "the session must not be paid now; expiring it");
        session::expire(state, attached.expiries, metrics).await?;
        return Ok(Step::Restart);
    }
    metrics.count("SessionsCreated", 1);
    let order = attached.order.unwrap_or(order);
    Ok(Step::Answer(answer(order, session.url, false)?))
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
