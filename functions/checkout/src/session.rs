//! The Stripe side of an order's session, shared by `POST` and `GET`: read it back, apply what
//! Stripe reports to the order (the webhook may be late), and expire sessions that must not be
//! paid any more.

use shared::store::orders::{Order, OrderStatus};
use shared::stripe::client::{CallStats, StripeError};
use shared::stripe::events::{CheckoutSession, CheckoutTransition, Event, PaymentStatus};
use shared::stripe::ids::SessionId;
use shared::telemetry::MetricSet;

use crate::{CheckoutError, State};

/// `GET /v1/checkout/sessions/{id}` for a session id the database holds, timed.
pub async fn retrieve(
    state: &State,
    session_id: &str,
    metrics: &mut MetricSet,
) -> Result<CheckoutSession, CheckoutError> {
    let session_id = SessionId::parse(session_id)
        .map_err(|e| StripeError::Decode(format!("an order holds {e}")))?;
    let mut stats = CallStats::default();
    let result = state
        .stripe
        .retrieve_checkout_session(&session_id, &mut stats)
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
    let mut confirmed = Vec::new();
    for id in &reconciled.expire_sessions {
        if expire(state, id, metrics).await {
            confirmed.push(id.clone());
        }
    }
    state.store.checkout_sessions_expired(&confirmed).await?;
    Ok(reconciled.order)
}

/// The transition to apply for what Stripe reports, if any: a finished session completes a
/// pending order (or pays a processing one), an expired one expires it.
pub fn transition_for(order: OrderStatus, session: &CheckoutSession) -> Option<CheckoutTransition> {
    use shared::stripe::events::SessionStatus as S;
    match session.status? {
        S::Complete
            if order == OrderStatus::Pending
                || session.payment_status == Some(PaymentStatus::Paid) =>
        {
            Some(CheckoutTransition::Completed)
        }
        S::Expired => Some(CheckoutTransition::Expired),
        _ => None,
    }
}

/// Expires a session at Stripe so that nobody can pay it (I1); `true` when Stripe confirms it
/// can no longer be paid (expired now, or found complete or expired). Failures are logged: the
/// order behind it is closed, so checkout never hands it out, and the expiry stays due.
pub async fn expire(state: &State, session_id: &str, metrics: &mut MetricSet) -> bool {
    let mut stats = CallStats::default();
    let result = match SessionId::parse(session_id) {
        Ok(id) => state.stripe.expire_if_open(&id, &mut stats).await,
        Err(e) => Err(StripeError::Decode(e.to_string())),
    };
    metrics.millis("StripeLatency", stats.elapsed);
    match result {
        Ok(s) if s.status != Some(shared::stripe::events::SessionStatus::Open) => {
            metrics.count("SessionsExpired", 1);
            true
        }
        Ok(_) => false,
        Err(e) => {
            metrics.count_by("StripeErrors", "Class", e.class(), 1);
            tracing::warn!(session_id, error = %e, "could not expire a session that must not be paid");
            false
        }
    }
}

/// An error for a session whose status this code does not know.
pub fn unknown_status() -> CheckoutError {
    StripeError::Decode("session without a known status".into()).into()
}
