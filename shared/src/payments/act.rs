//! Actions: the calls that carry out a decision at Stripe, each under an idempotency key numbered
//! by attempt (`refund-duplicate-{pi}`, `-2`, ...; `expire-{session}`, `-2`, ...). A key Stripe
//! answers with a stored error (it keeps the result of a request that ran, 500s included, and
//! replays it), refuses, or gave a refund that failed is spent: the next key is tried at once, up
//! to [`KEYS_PER_RUN`], and every spent key is reported so that the next run starts after it. A
//! key that met only a passing failure (a timeout, a network error, a 429, a 5xx or 409 not yet
//! replayed) is not spent: Stripe kept nothing for it, or keeps the answer the next try under the
//! same key gets, so an outage does not use up [`MAX_ATTEMPTS`]. A new key cannot refund twice
//! (Stripe never refunds more than remains) or expire twice.

use std::time::Duration;

use crate::store::payments::{ActionFailure, ActionKind, ExpiryDue, RefundDue};
use crate::stripe::client::{CallStats, Refund, StripeClient, StripeError};
use crate::stripe::events::CheckoutSession;
use crate::stripe::ids::SessionId;

/// Keys one run tries for one action before it leaves the action to the next run.
pub const KEYS_PER_RUN: u32 = 3;

/// Keys spent on one action after which it is left to a person (an alarm): a refund Stripe
/// refuses ten times will not be made by an eleventh try every ten minutes.
pub const MAX_ATTEMPTS: u32 = 10;

/// What an action came to.
#[derive(Debug)]
pub struct Acted<T> {
    /// Stripe's answer and the attempt that gave it, or the last error.
    pub result: Result<(T, u32), StripeError>,
    /// Keys spent on the way.
    pub spent: Vec<ActionFailure>,
    pub elapsed: Duration,
}

/// The keys one run may try from `first`: at most [`KEYS_PER_RUN`], never past [`MAX_ATTEMPTS`].
fn keys(first: u32) -> std::ops::RangeInclusive<u32> {
    first..=(first + KEYS_PER_RUN - 1).min(MAX_ATTEMPTS)
}

fn spent(kind: ActionKind, object_id: &str, attempt: u32, error: &str) -> ActionFailure {
    ActionFailure {
        kind,
        object_id: object_id.to_owned(),
        attempt,
        error: error.chars().take(300).collect(),
    }
}

/// Refunds the whole of a duplicate payment (`reason=duplicate`, `metadata[refunded_by]=webhook`).
pub async fn refund(stripe: &StripeClient, due: &RefundDue) -> Acted<Refund> {
    let mut acted = Acted {
        result: Err(StripeError::Decode("no key tried".into())),
        spent: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let order = due.order_id.to_string();
    let first = due.attempt.max(1);
    for attempt in keys(first) {
        let mut stats = CallStats::default();
        let answer = stripe
            .refund_duplicate(&due.payment_intent_id, &order, attempt, &mut stats)
            .await;
        acted.elapsed += stats.elapsed;
        match answer {
            Ok(refund) if refund.is_dead() => {
                let why = format!(
                    "the refund under this key {}",
                    refund.status.as_deref().unwrap_or("failed")
                );
                acted.spent.push(spent(
                    ActionKind::Refund,
                    &due.payment_intent_id,
                    attempt,
                    &why,
                ));
                acted.result = Ok((refund, attempt));
            }
            Ok(refund) => {
                acted.result = Ok((refund, attempt));
                return acted;
            }
            Err(e) if e.is_dead_key() => {
                acted.spent.push(spent(
                    ActionKind::Refund,
                    &due.payment_intent_id,
                    attempt,
                    &e.to_string(),
                ));
                acted.result = Err(e);
            }
            Err(e) => {
                // Refused: this key is not used again. Failed for now: the next try uses it
                // again, and gets whatever Stripe kept for it.
                if !e.is_transient() {
                    acted.spent.push(spent(
                        ActionKind::Refund,
                        &due.payment_intent_id,
                        attempt,
                        &e.to_string(),
                    ));
                }
                acted.result = Err(e);
                return acted;
            }
        }
    }
    acted
}

/// Expires a session; a session Stripe says is not open is read back (complete or expired).
pub async fn expire(stripe: &StripeClient, due: &ExpiryDue) -> Acted<CheckoutSession> {
    let mut acted = Acted {
        result: Err(StripeError::Decode("no key tried".into())),
        spent: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let id = match SessionId::parse(&due.session_id) {
        Ok(id) => id,
        Err(e) => {
            acted.result = Err(StripeError::Decode(e.to_string()));
            return acted;
        }
    };
    let first = due.attempt.max(1);
    for attempt in keys(first) {
        let mut stats = CallStats::default();
        let answer = stripe.expire_if_open(&id, attempt, &mut stats).await;
        acted.elapsed += stats.elapsed;
        match answer {
            Ok(session) => {
                acted.result = Ok((session, attempt));
                return acted;
            }
            Err(e) => {
                if !e.is_transient() {
                    acted.spent.push(spent(
                        ActionKind::Expire,
                        &due.session_id,
                        attempt,
                        &e.to_string(),
                    ));
                }
                let next = e.is_dead_key();
                acted.result = Err(e);
                if !next {
                    return acted;
                }
            }
        }
    }
    acted
}
