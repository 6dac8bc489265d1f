//! What the webhook asks of Stripe around applying an event, when it has a key:
//! - before: the line items of a paid session that matches no order of ours (I5);
//! - after: the refund of a duplicate payment (I3) and the expiry of sessions whose orders a
//!   payment closed (I1).
//!
//! A refund that fails for now answers 503, so Stripe redelivers the event and the redelivery
//! (a `duplicate` outcome that still carries the refund) tries again under the same idempotency
//! key. An expiry that fails is only logged: checkout never hands those sessions out again, and
//! a payment on one would be a duplicate, refunded in turn.

use shared::store::effect::{Verification, VerificationStatus};
use shared::store::{ApplyOutcome, Effect};
use shared::stripe::client::{CallStats, LineItem};
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
    let Some(price_id) = state.config.price_id.as_deref() else {
        return Ok(unavailable("STRIPE_FULL_REPORT_PRICE_ID is not set"));
    };
    let mut stats = CallStats::default();
    let items = stripe.list_line_items(session_id, &mut stats).await;
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
pub fn verdict(items: &[LineItem], price_id: &str) -> Verification {
    if items
        .iter()
        .any(|i| i.price_id() == Some(price_id) && i.quantity.unwrap_or(1) > 0)
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

/// Refunds a duplicate and expires closed orders' sessions, as the applied event asks.
pub async fn follow_up(
    state: &State,
    applied: &ApplyOutcome,
    metrics: &mut MetricSet,
) -> Result<(), WebhookError> {
    let Some(stripe) = &state.stripe else {
        if let Some(refund) = &applied.refund {
            tracing::error!(order_id = %refund.order_id, payment_intent = %refund.payment_intent_id,
                "duplicate payment not refunded: the webhook has no STRIPE_SECRET_KEY; refund it in the Stripe Dashboard");
        }
        return Ok(());
    };
    for session in &applied.expire_sessions {
        let mut stats = CallStats::default();
        match stripe.expire_if_open(session, &mut stats).await {
            Ok(s) => tracing::info!(
                session,
                status = s.status.map(|s| s.as_str()).unwrap_or("unknown"),
                "expired the session of an order the payment closed"
            ),
            Err(e) => {
                metrics.count_by("StripeErrors", "Class", e.class(), 1);
                tracing::warn!(session, error = %e, "could not expire the session of a closed order");
            }
        }
    }
    let Some(due) = &applied.refund else {
        return Ok(());
    };
    if !state.config.auto_refund {
        tracing::error!(order_id = %due.order_id, payment_intent = %due.payment_intent_id,
            "duplicate payment not refunded: AUTO_REFUND_DUPLICATES=false; refund it in the Stripe Dashboard");
        return Ok(());
    }
    let mut stats = CallStats::default();
    let refund = stripe
        .refund_duplicate(
            &due.payment_intent_id,
            &due.order_id.to_string(),
            &mut stats,
        )
        .await;
    metrics.millis("StripeLatency", stats.elapsed);
    match refund {
        Ok(refund) => {
            state
                .store
                .record_duplicate_refund(due.order_id, &refund)
                .await?;
            metrics.count("DuplicateRefunds", 1);
            tracing::warn!(order_id = %due.order_id, refund = %refund.id,
                "refunded a duplicate payment");
            Ok(())
        }
        Err(e) if e.is_transient() => Err(e.into()),
        Err(e) => {
            // A permanent refusal (already refunded in the Dashboard, a disputed charge): the
            // audit keeps the duplicate open and payment_health reports it.
            metrics.count("DuplicateRefundFailures", 1);
            metrics.count_by("StripeErrors", "Class", e.class(), 1);
            tracing::error!(order_id = %due.order_id, error = %e,
                "Stripe refused to refund a duplicate payment; see the runbook");
            Ok(())
        }
    }
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
        for (items, want) in cases {
            assert_eq!(verdict(&items, "price_report").status, want, "{items:?}");
        }
        assert_eq!(
            verdict(&[item("price_other", 1)], "price_report").detail,
            "line items hold [price_other], not price_report"
        );
    }
}
