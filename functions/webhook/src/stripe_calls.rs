//! What the webhook asks of Stripe around applying an event, when it has a key:
//! - before: the line items of a paid session that matches no order of ours (I5), and the
//!   payment intent of a dispute that names only its charge;
//! - after: the refund of a duplicate payment (I3) and the expiry of sessions whose orders a
//!   payment closed (I1).
//!
//! A refund that fails for now answers 503, so Stripe redelivers the event and the redelivery
//! (a `duplicate` outcome that still carries the refund) tries again under the same idempotency
//! key. A key Stripe answers with a stored error (Stripe keeps a 500 under its key) or whose
//! refund failed at once gives way to the next key of the payment (`-2`, `-3`): Stripe never
//! refunds more than remains, so a new key cannot refund twice. An expiry stays due in the
//! database until Stripe confirms it: the redelivery, and checkout before it opens a new order,
//! try again.

use shared::store::effect::{Verification, VerificationStatus};
use shared::store::{ApplyOutcome, Effect, RefundDue};
use shared::stripe::client::{CallStats, LineItem, StripeClient, StripeError};
use shared::stripe::ids::{PriceId, SessionId};
use shared::telemetry::MetricSet;

use crate::{State, WebhookError};

/// The verdict on a paid session without an order: the product's price among its line items.
pub async fn verify_session(
    state: &State,
    effect: &Effect,
    metrics: &mut MetricSet,
) -> Result<Verification, WebhookError> {
    let Effect::CheckoutSession { session_id, .. } = effect else {
        return Ok(unavailable("not a checkout session"));
    };
    let Some(stripe) = &state.stripe else {
        return Ok(unavailable(
            "the webhook has no STRIPE_SECRET_KEY to read the session's line items",
        ));
    };
    let Some(price_id) = &state.config.price_id else {
        return Ok(unavailable("STRIPE_FULL_REPORT_PRICE_ID is not set"));
    };
    let mut stats = CallStats::default();
    let items = match SessionId::parse(session_id) {
        Ok(id) => stripe.list_line_items(&id, &mut stats).await,
        Err(e) => Err(StripeError::Decode(e.to_string())),
    };
    metrics.millis("StripeLatency", stats.elapsed);
    match items {
        Ok(items) => Ok(verdict(&items, price_id)),
        Err(e) if e.is_transient() => Err(e.into()),
        Err(e) => {
            metrics.count_by("StripeErrors", "Class", e.class(), 1);
            Ok(unavailable(&format!(
                "Stripe refused to list the line items: {}",
                e.class()
            )))
        }
    }
}

/// Verified when some line item is the product's price, with a positive quantity.
pub fn verdict(items: &[LineItem], price_id: &PriceId) -> Verification {
    if items
        .iter()
        .any(|i| i.price_id() == Some(price_id.as_str()) && i.quantity.unwrap_or(1) > 0)
    {
        return Verification {
            status: VerificationStatus::Verified,
            detail: format!("line items hold {price_id}"),
        };
    }
    let found: Vec<&str> = items.iter().filter_map(LineItem::price_id).collect();
    Verification {
        status: VerificationStatus::Mismatch,
        detail: format!("line items hold [{}], not {price_id}", found.join(", ")),
    }
}

fn unavailable(detail: &str) -> Verification {
    Verification {
        status: VerificationStatus::Unavailable,
        detail: detail.to_owned(),
    }
}

/// How many idempotency keys one delivery may use for a duplicate's refund before it is left to
/// a person.
const REFUND_KEYS: u32 = 3;

/// A dispute that names only its charge gets the charge's payment intent from Stripe, so that
/// it can be matched to its order (Stripe's older charges and some dispute objects carry no
/// payment intent). Without a key, or if Stripe does not know the charge, it stays as it is.
pub async fn complete_dispute(
    state: &State,
    effect: &mut Effect,
    metrics: &mut MetricSet,
) -> Result<(), WebhookError> {
    let Effect::Dispute {
        payment_intent_id: payment_intent_id @ None,
        charge_id: Some(charge),
        ..
    } = effect
    else {
        return Ok(());
    };
    let Some(stripe) = &state.stripe else {
        return Ok(());
    };
    let mut stats = CallStats::default();
    let found = stripe.charge_payment_intent(charge, &mut stats).await;
    metrics.millis("StripeLatency", stats.elapsed);
    match found {
        Ok(pi) => *payment_intent_id = pi,
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => {
            metrics.count_by("StripeErrors", "Class", e.class(), 1);
            tracing::warn!(error = %e, "could not read the disputed charge");
        }
    }
    Ok(())
}

/// Refunds duplicates and expires closed orders' sessions, as the applied event asks.
pub async fn follow_up(
    state: &State,
    applied: &ApplyOutcome,
    metrics: &mut MetricSet,
) -> Result<(), WebhookError> {
    let Some(stripe) = &state.stripe else {
        for refund in &applied.refunds {
            tracing::error!(order_id = %refund.order_id, payment_intent = %refund.payment_intent_id,
                "duplicate payment not refunded: the webhook has no STRIPE_SECRET_KEY; refund it in the Stripe Dashboard");
        }
        return Ok(());
    };
    expire_sessions(state, &applied.expire_sessions, metrics).await?;
    if !state.config.auto_refund {
        for refund in &applied.refunds {
            tracing::error!(order_id = %refund.order_id, payment_intent = %refund.payment_intent_id,
                "duplicate payment not refunded: AUTO_REFUND_DUPLICATES=false; refund it in the Stripe Dashboard");
        }
        return Ok(());
    }
    // Every refund is tried; the first one that failed for now makes the answer a 503, and
    // Stripe's next delivery carries what is still due.
    let mut unavailable = None;
    for refund in &applied.refunds {
        // After a dispute event of this very payment the database knows the chargeback's
        // outcome: a refusal is news.
        let after_dispute = applied.dispute.is_some()
            && applied.order_id.as_deref() == Some(refund.order_id.to_string().as_str());
        if let Err(e) = refund_duplicate(state, stripe, refund, after_dispute, metrics).await {
            unavailable.get_or_insert(e);
        }
    }
    unavailable.map_or(Ok(()), Err)
}

/// Refunds one duplicate under its idempotency keys, from the first one not known to be spent.
async fn refund_duplicate(
    state: &State,
    stripe: &StripeClient,
    due: &RefundDue,
    after_dispute: bool,
    metrics: &mut MetricSet,
) -> Result<(), WebhookError> {
    let order = due.order_id.to_string();
    for attempt in due.attempt..due.attempt + REFUND_KEYS {
        let mut stats = CallStats::default();
        let refund = stripe
            .refund_duplicate(&due.payment_intent_id, &order, attempt, &mut stats)
            .await;
        metrics.millis("StripeLatency", stats.elapsed);
        match refund {
            Ok(refund) => {
                let still_due = state
                    .store
                    .record_duplicate_refund(due.order_id, &refund)
                    .await?;
                if still_due {
                    tracing::warn!(order_id = %due.order_id, refund = %refund.id,
                        status = refund.status.as_deref().unwrap_or(""),
                        "the duplicate's refund under this key failed; trying the next key");
                    continue;
                }
                metrics.count("DuplicateRefunds", 1);
                tracing::warn!(order_id = %due.order_id, refund = %refund.id,
                    status = refund.status.as_deref().unwrap_or(""), "refunded a duplicate payment");
                return Ok(());
            }
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) if e.code() == Some("charge_already_refunded") => {
                // Refunded meanwhile (in the Dashboard): charge.refunded settles the order.
                tracing::warn!(order_id = %due.order_id, "the duplicate was already refunded");
                return Ok(());
            }
            Err(e) if e.is_dead_key() => {
                metrics.count_by("StripeErrors", "Class", e.class(), 1);
                tracing::warn!(order_id = %due.order_id, attempt, error = %e,
                    "the refund's key holds an error; trying the next key");
            }
            Err(e) if e.code() == Some("charge_disputed") && !after_dispute => {
                // Charged back, and the dispute's events have not reached us yet: the money is
                // with the cardholder while the dispute runs. A lost dispute leaves it there; a
                // won one gives it back, and that event asks for this refund again.
                tracing::warn!(order_id = %due.order_id, payment_intent = %due.payment_intent_id,
                    "the duplicate is under a chargeback; its refund waits for the dispute");
                return Ok(());
            }
            Err(e) => {
                refund_failed(due, &e, metrics);
                return Ok(());
            }
        }
    }
    refund_failed(
        due,
        &StripeError::Decode("every refund key was used".into()),
        metrics,
    );
    Ok(())
}

/// A permanent refusal (every key used, the charge not refundable): the audit keeps the
/// duplicate open, payment_health reports it, and the alarm asks a person to refund it.
fn refund_failed(due: &RefundDue, error: &StripeError, metrics: &mut MetricSet) {
    metrics.count("DuplicateRefundFailures", 1);
    metrics.count_by("StripeErrors", "Class", error.class(), 1);
    tracing::error!(order_id = %due.order_id, error = %error,
        "Stripe refused to refund a duplicate payment; see the runbook");
}

/// Expires sessions of closed orders and confirms each one Stripe no longer lets anyone pay
/// (expired now, or found complete or expired). What is not confirmed stays due.
pub async fn expire_sessions(
    state: &State,
    sessions: &[String],
    metrics: &mut MetricSet,
) -> Result<(), WebhookError> {
    let Some(stripe) = &state.stripe else {
        return Ok(());
    };
    let mut confirmed = Vec::new();
    for session in sessions {
        let mut stats = CallStats::default();
        let expired = match SessionId::parse(session) {
            Ok(id) => stripe.expire_if_open(&id, &mut stats).await,
            Err(e) => Err(StripeError::Decode(e.to_string())),
        };
        match expired {
            Ok(s) if s.status != Some(shared::stripe::events::SessionStatus::Open) => {
                tracing::info!(
                    session,
                    status = s.status.map(|s| s.as_str()).unwrap_or("unknown"),
                    "the session of a closed order can no longer be paid"
                );
                confirmed.push(session.clone());
            }
            Ok(_) => tracing::warn!(session, "the session of a closed order is still open"),
            Err(e) => {
                metrics.count_by("StripeErrors", "Class", e.class(), 1);
                tracing::warn!(session, error = %e, "could not expire the session of a closed order");
            }
        }
    }
    state.store.checkout_sessions_expired(&confirmed).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(price: &str, quantity: i64) -> LineItem {
        serde_json::from_value(serde_json::json!({
            "object": "item", "price": {"id": price, "object": "price"}, "quantity": quantity
        }))
        .unwrap()
    }

    #[test]
    fn only_the_products_price_verifies() {
        let cases = [
            (vec![item("price_report", 1)], VerificationStatus::Verified),
            (
                vec![item("price_other", 1), item("price_report", 2)],
                VerificationStatus::Verified,
            ),
            (vec![item("price_other", 1)], VerificationStatus::Mismatch),
            (vec![item("price_report", 0)], VerificationStatus::Mismatch),
            (vec![], VerificationStatus::Mismatch),
        ];
        let report = PriceId::parse("price_report").unwrap();
        for (items, want) in cases {
            assert_eq!(verdict(&items, &report).status, want, "{items:?}");
        }
        assert_eq!(
            verdict(&[item("price_other", 1)], &report).detail,
            "line items hold [price_other], not price_report"
        );
    }
}
