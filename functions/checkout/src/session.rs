//! The Stripe side of an order's session, shared by `POST` and `GET`: read it back, apply what
//! Stripe reports to the order (the webhook may be late), and expire sessions that must not be
//! paid any more.

use shared::store::orders::{Order, OrderStatus};
use shared::stripe::client::{CallStats, StripeError};
use shared::stripe::events::{CheckoutSession, CheckoutTransition, Event};
use shared::telemetry::MetricSet;

use crate::{CheckoutError, State};

/// `GET /v1/checkout/sessions/{id}`, timed.
pub async fn retrieve(
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

/// Applies what Stripe reports about a session through the webhook's own SQL path and expires
/// the sessions of orders a payment closed. Returns the order as it stands afterwards.
pub async fn reconcile(
    state: &State,
    transition: CheckoutTransition,
    session: CheckoutSession,
    metrics: &mut MetricSet,
) -> Result<Option<Order>, CheckoutError> {
    let effect = Event::CheckoutSession {
        transition,
        session,
    }
    .effect();
    let reconciled = state.store.checkout_reconcile(&effect).await?;
    metrics.count("Reconciliations", 1);
    if reconciled.duplicate_payment {
        metrics.count("DuplicatePayments", 1);
        tracing::error!(
            "a second payment for a product the user already owns; the webhook refunds it"
        );
    }
    for id in &reconciled.expire_sessions {
        expire(state, id, metrics).await;
    }
    Ok(reconciled.order)
}

/// The transition to apply for what Stripe reports, if any: a finished session completes a
/// pending order (or pays a processing one), an expired one expires it.
pub fn transition_for(order: OrderStatus, session: &CheckoutSession) -> Option<CheckoutTransition> {
    use shared::stripe::events::SessionStatus as S;
    match session.status? {
        S::Complete
            if order == OrderStatus::Pending
                || session.payment_status.as_deref() == Some("paid") =>
        {
            Some(CheckoutTransition::Completed)
        }
        S::Expired => Some(CheckoutTransition::Expired),
        _ => None,
    }
}

/// Expires a session at Stripe so that nobody can pay it (I1). Failures are logged: the order
/// behind it is closed, so checkout never hands it out, and a payment on it would be a
/// duplicate, refunded by the webhook.
pub async fn expire(state: &State, session_id: &str, metrics: &mut MetricSet) {
    let mut stats = CallStats::default();
    match state.stripe.expire_if_open(session_id, &mut stats).await {
        Ok(_) => metrics.count("SessionsExpired", 1),
        Err(e) => {
            metrics.count_by("StripeErrors", "Class", e.class(), 1);
            tracing::warn!(session_id, error = %e, "could not expire a session that must not be paid");
        }
    }
    metrics.millis("StripeLatency", stats.elapsed);
}

/// An error for a session whose status this code does not know.
pub fn unknown_status() -> CheckoutError {
    StripeError::Decode("session without a known status".into()).into()
}
