//! The effect of a Stripe event on the app's data: the documented argument `p_effect` of
//! `public.apply_stripe_event` (and of `checkout_reconcile`), as tagged JSON. The SQL functions
//! in `supabase/migrations/` read exactly these fields; this module is their contract.
//!
//! `kind` selects the SQL function: `checkout_session`, `subscription`, `invoice`, `charge`,
//! `refund`, `dispute`, or `ignored`. Amounts are integers in the smallest currency unit; times are Unix
//! seconds.

use serde::Serialize;

use crate::stripe::events::{
    id_of, CheckoutTransition, DisputeTransition, Event, InvoiceTransition, PaymentStatus,
    SubscriptionTransition,
};

/// What the webhook found when it checked a paid session that matches no order of ours against
/// its line items at Stripe (invariant I5 in docs/payments.md). Absent until checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub status: VerificationStatus,
    pub detail: String,
}

/// The verdict of a [`Verification`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerificationStatus {
    /// The session's line items hold the product's price: grant it.
    Verified,
    /// Something else was bought: grant nothing.
    Mismatch,
    /// No Stripe key, or Stripe does not know the session: grant nothing.
    Unavailable,
}

/// `p_effect`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Effect {
    CheckoutSession {
        transition: CheckoutTransition,
        session_id: String,
        mode: Option<String>,
        payment_status: Option<PaymentStatus>,
        /// Our `metadata[order_id]`.
        order_id: Option<String>,
        /// Our `metadata[user_id]`, else `client_reference_id`.
        user_id: Option<String>,
        product: Option<String>,
        customer_id: Option<String>,
        payment_intent_id: Option<String>,
        amount_total: Option<i64>,
        currency: Option<String>,
        session_created: Option<i64>,
        /// Absent (not `null`) until checked: the SQL function tests for its absence.
        #[serde(skip_serializing_if = "Option::is_none")]
        verification: Option<Verification>,
    },
    Subscription {
        transition: SubscriptionTransition,
        id: String,
        customer_id: String,
        user_id: Option<String>,
        status: String,
        price_id: Option<String>,
        current_period_start: Option<i64>,
        current_period_end: Option<i64>,
        cancel_at_period_end: bool,
        cancel_at: Option<i64>,
        canceled_at: Option<i64>,
        ended_at: Option<i64>,
    },
    Invoice {
        transition: InvoiceTransition,
        id: String,
        customer_id: Option<String>,
        subscription_id: Option<String>,
        status: Option<String>,
        amount_due: i64,
        amount_paid: i64,
        currency: Option<String>,
        billing_reason: Option<String>,
        attempt_count: i64,
        hosted_invoice_url: Option<String>,
        period_start: Option<i64>,
        period_end: Option<i64>,
        next_payment_attempt: Option<i64>,
    },
    /// `charge.refunded`: amounts are cumulative for the charge; the refunds it lists, if any.
    Charge {
        charge_id: String,
        payment_intent_id: Option<String>,
        amount: i64,
        amount_refunded: i64,
        refunded: bool,
        currency: Option<String>,
        refunds: Vec<RefundEffect>,
    },
    /// A refund's current state (`charge.refund.updated`, `refund.updated`, `refund.failed`).
    Refund(RefundEffect),
    Dispute {
        transition: DisputeTransition,
        id: String,
        charge_id: Option<String>,
        payment_intent_id: Option<String>,
        amount: i64,
        currency: Option<String>,
        status: String,
        reason: Option<String>,
    },
    Ignored,
}

/// A refund as the SQL functions read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefundEffect {
    pub id: String,
    pub payment_intent_id: Option<String>,
    pub charge_id: Option<String>,
    pub amount: i64,
    pub currency: Option<String>,
    /// `pending`, `requires_action`, `succeeded`, `failed`, `canceled`.
    pub status: Option<String>,
    pub reason: Option<String>,
}

impl From<&crate::stripe::events::Refund> for RefundEffect {
    fn from(r: &crate::stripe::events::Refund) -> Self {
        RefundEffect {
            id: r.id.clone(),
            payment_intent_id: id_of(&r.payment_intent),
            charge_id: id_of(&r.charge),
            amount: r.amount,
            currency: r.currency.clone(),
            status: r.status.clone(),
            reason: r.reason.clone(),
        }
    }
}

impl Effect {
    /// A checkout session effect with the webhook's verification added.
    pub fn verified(mut self, verdict: Verification) -> Effect {
        if let Effect::CheckoutSession { verification, .. } = &mut self {
            *verification = Some(verdict);
        }
        self
    }
}

impl Event {
    /// The effect this event has on the app's data.
    pub fn effect(&self) -> Effect {
        match self {
            Event::CheckoutSession {
                transition,
                session,
            } => Effect::CheckoutSession {
                transition: *transition,
                session_id: session.id.clone(),
                mode: session.mode.clone(),
                payment_status: session.payment_status,
                order_id: session.metadata("order_id"),
                user_id: session
                    .metadata("user_id")
                    .or_else(|| session.client_reference_id.clone()),
                product: session.metadata("product"),
                customer_id: id_of(&session.customer),
                payment_intent_id: id_of(&session.payment_intent),
                amount_total: session.amount_total,
                currency: session.currency.clone(),
                session_created: session.created,
                verification: None,
            },
            Event::Subscription {
                transition,
                subscription: s,
            } => {
                let first_item = s.items.as_ref().and_then(|i| i.data.first());
                let deleted = *transition == SubscriptionTransition::Deleted;
                Effect::Subscription {
                    transition: *transition,
                    id: s.id.clone(),
                    customer_id: s.customer.id().to_owned(),
                    user_id: s.metadata.as_ref().and_then(|m| m.get("user_id")).cloned(),
                    // A deleted subscription is canceled whatever status the payload carries.
                    status: if deleted {
                        "canceled".to_owned()
                    } else {
                        s.status.clone()
                    },
                    price_id: first_item
                        .and_then(|i| i.price.as_ref())
                        .map(|p| p.id().to_owned()),
                    current_period_start: s
                        .current_period_start
                        .or_else(|| first_item.and_then(|i| i.current_period_start)),
                    current_period_end: s
                        .current_period_end
                        .or_else(|| first_item.and_then(|i| i.current_period_end)),
                    cancel_at_period_end: s.cancel_at_period_end,
                    cancel_at: s.cancel_at,
                    canceled_at: s.canceled_at,
                    ended_at: s.ended_at,
                }
            }
            Event::Invoice {
                transition,
                invoice: i,
            } => Effect::Invoice {
                transition: *transition,
                id: i.id.clone(),
                customer_id: id_of(&i.customer),
                subscription_id: i.subscription_id(),
                status: i.status.clone(),
                amount_due: i.amount_due,
                amount_paid: i.amount_paid,
                currency: i.currency.clone(),
                billing_reason: i.billing_reason.clone(),
                attempt_count: i.attempt_count,
                hosted_invoice_url: i.hosted_invoice_url.clone(),
                period_start: i.period_start,
                period_end: i.period_end,
                next_payment_attempt: i.next_payment_attempt,
            },
            Event::ChargeRefunded { charge: c } => Effect::Charge {
                charge_id: c.id.clone(),
                payment_intent_id: id_of(&c.payment_intent),
                amount: c.amount,
                amount_refunded: c.amount_refunded,
                refunded: c.refunded,
                currency: c.currency.clone(),
                refunds: c
                    .refunds
                    .as_ref()
                    .map(|l| l.data.iter().map(RefundEffect::from).collect())
                    .unwrap_or_default(),
            },
            Event::RefundUpdated { refund } => Effect::Refund(RefundEffect::from(refund)),
            Event::Dispute {
                transition,
                dispute: d,
            } => Effect::Dispute {
                transition: *transition,
                id: d.id.clone(),
                charge_id: id_of(&d.charge),
                payment_intent_id: id_of(&d.payment_intent),
                amount: d.amount,
                currency: d.currency.clone(),
                status: d.status.clone(),
                reason: d.reason.clone(),
            },
            Event::Other => Effect::Ignored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stripe::events::parse;
    use crate::stripe::events::tests::event;
    use serde_json::json;

    #[test]
    fn invoice_subscription_is_read_from_both_api_shapes() {
        let old = event(
            "invoice.paid",
            json!({"id": "in_1", "subscription": "sub_old", "parent": null}),
        );
        let new = event(
            "invoice.paid",
            json!({"id": "in_1", "subscription": null,
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_new", "metadata": {}}}}),
        );
        let line_only = event(
            "invoice.paid",
            json!({"id": "in_1", "lines": {"object": "list", "data": [
            {"parent": {"type": "subscription_item_details", "subscription_item_details": {"subscription": "sub_line"}}}]}}),
        );
        let expanded = event(
            "invoice.paid",
            json!({"id": "in_1", "subscription": {"id": "sub_exp", "object": "subscription"}}),
        );
        for (body, want) in [
            (old, "sub_old"),
            (new, "sub_new"),
            (line_only, "sub_line"),
            (expanded, "sub_exp"),
        ] {
            let parsed = parse(body.as_bytes()).unwrap();
            let Effect::Invoice {
                subscription_id, ..
            } = parsed.event.effect()
            else {
                panic!("not an invoice")
            };
            assert_eq!(subscription_id.as_deref(), Some(want));
        }
    }

    #[test]
    fn subscription_period_is_read_from_items_in_new_versions() {
        let body = event(
            "customer.subscription.updated",
            json!({"id": "sub_1", "customer": "cus_1", "status": "active",
            "items": {"data": [{"price": {"id": "price_1"}, "current_period_start": 10, "current_period_end": 20}]}}),
        );
        let Effect::Subscription {
            current_period_start,
            current_period_end,
            price_id,
            ..
        } = parse(body.as_bytes()).unwrap().event.effect()
        else {
            panic!()
        };
        assert_eq!(
            (current_period_start, current_period_end),
            (Some(10), Some(20))
        );
        assert_eq!(price_id.as_deref(), Some("price_1"));
    }

    #[test]
    fn deleted_subscription_is_canceled() {
        let body = event(
            "customer.subscription.deleted",
            json!({"id": "sub_1", "customer": "cus_1", "status": "active"}),
        );
        let Effect::Subscription {
            status, transition, ..
        } = parse(body.as_bytes()).unwrap().event.effect()
        else {
            panic!()
        };
        assert_eq!(
            (status.as_str(), transition),
            ("canceled", SubscriptionTransition::Deleted)
        );
    }

    #[test]
    fn checkout_user_comes_from_metadata_then_client_reference() {
        let body = event(
            "checkout.session.completed",
            json!({"id": "cs_1", "client_reference_id": "u-ref",
            "metadata": {"order_id": "o-1"}, "mode": "payment", "payment_status": "paid"}),
        );
        let Effect::CheckoutSession {
            user_id, order_id, ..
        } = parse(body.as_bytes()).unwrap().event.effect()
        else {
            panic!()
        };
        assert_eq!(
            (user_id.as_deref(), order_id.as_deref()),
            (Some("u-ref"), Some("o-1"))
        );
    }

    #[test]
    fn refunds_and_disputes_carry_the_payment_intent() {
        let refunded = event(
            "charge.refunded",
            json!({"id": "ch_1", "object": "charge", "payment_intent": "pi_1", "amount": 1900,
                   "amount_refunded": 1900, "refunded": true, "currency": "usd"}),
        );
        assert_eq!(
            parse(refunded.as_bytes()).unwrap().event.effect(),
            Effect::Charge {
                charge_id: "ch_1".into(),
                payment_intent_id: Some("pi_1".into()),
                amount: 1900,
                amount_refunded: 1900,
                refunded: true,
                currency: Some("usd".into()),
                refunds: Vec::new(),
            }
        );
        let closed = event(
            "charge.dispute.closed",
            json!({"id": "dp_1", "object": "dispute", "charge": {"id": "ch_1"},
                   "payment_intent": "pi_1", "amount": 1900, "currency": "usd", "status": "lost"}),
        );
        let Effect::Dispute {
            transition,
            charge_id,
            payment_intent_id,
            status,
            ..
        } = parse(closed.as_bytes()).unwrap().event.effect()
        else {
            panic!("not a dispute")
        };
        assert_eq!(transition, DisputeTransition::Closed);
        assert_eq!(
            (
                charge_id.as_deref(),
                payment_intent_id.as_deref(),
                status.as_str()
            ),
            (Some("ch_1"), Some("pi_1"), "lost")
        );
    }

    #[test]
    fn verification_is_absent_until_checked() {
        let body = event(
            "checkout.session.completed",
            json!({"id": "cs_1", "mode": "payment", "payment_status": "paid"}),
        );
        let effect = parse(body.as_bytes()).unwrap().event.effect();
        let json = serde_json::to_value(&effect).unwrap();
        assert!(json.get("verification").is_none(), "{json}");
        let checked = effect.verified(Verification {
            status: VerificationStatus::Mismatch,
            detail: "price_other".into(),
        });
        let json = serde_json::to_value(&checked).unwrap();
        assert_eq!(json["verification"]["status"], "mismatch");
    }
}
