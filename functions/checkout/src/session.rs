//! The Stripe side of an order's session, shared by `POST` and `GET`: read it back, store what
//! Stripe says through the payments' one sync path (the webhook may be late), and expire
//! sessions nobody should pay. Checkout makes no refunds: the webhook and the reconciler do.

use shared::payments::{Reader, SyncError, Synced, Syncer, Target};
use shared::store::payments::ExpiryDue;
use shared::stripe::client::{CallStats, StripeError};
use shared::stripe::events::CheckoutSession;
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

fn syncer(state: &State) -> Syncer<'_> {
    Syncer {
        store: &state.store,
        reader: Reader {
            stripe: &state.stripe,
            price: Some(&state.config.price_id),
        },
        clock: state.clock,
        refunds: false,
    }
}

/// Reads the session and its payment again and stores what Stripe says (the webhook may not have
/// yet), carrying out the expiries that makes due.
pub async fn sync(
    state: &State,
    session_id: &str,
    metrics: &mut MetricSet,
) -> Result<(), CheckoutError> {
    let synced = syncer(state)
        .sync(None, Some(&Target::Session(session_id.to_owned())), None)
        .await;
    metrics.count("Reconciliations", 1);
    finish(synced, metrics)
}

/// Expires sessions nobody should pay and stores what Stripe answers. Fails when one could not
/// be expired for now (Stripe down): no new session is made meanwhile (I1).
pub async fn expire(
    state: &State,
    due: Vec<ExpiryDue>,
    metrics: &mut MetricSet,
) -> Result<(), CheckoutError> {
    let synced = syncer(state).carry_out(Vec::new(), due).await;
    finish(synced, metrics)
}

fn finish(synced: Result<Synced, SyncError>, metrics: &mut MetricSet) -> Result<(), CheckoutError> {
    let synced = match synced {
        Ok(synced) => synced,
        Err(SyncError::Store(e)) => return Err(e.into()),
        Err(SyncError::Stripe(e)) => return Err(e.into()),
    };
    metrics.millis("StripeLatency", synced.stripe_time);
    for class in &synced.stripe_errors {
        metrics.count_by("StripeErrors", "Class", class, 1);
    }
    if synced.sessions_expired > 0 {
        metrics.count("SessionsExpired", u64::from(synced.sessions_expired));
    }
    match synced.unavailable {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// An error for a session whose status this code does not know.
pub fn unknown_status() -> CheckoutError {
    StripeError::Decode("session without a known status".into()).into()
}
