//! Facts: Stripe's objects as read from the API, in the shape `public.record_stripe_facts` stores
//! them (supabase/schemas/20_facts.sql). Only Stripe's own fields: no amount here is computed.

use serde::Serialize;

use crate::stripe::events::{
    id_of, CheckoutSession, Dispute, Invoice, PaymentIntent, Refund, Subscription,
};

/// Objects read from Stripe at one moment (`read_at_ms`, taken before the first read: a read
/// that starts later replaces them, one that started earlier never does).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Facts {
    pub read_at_ms: i64,
    pub sessions: Vec<SessionFact>,
    pub payments: Vec<PaymentFact>,
    pub refunds: Vec<RefundFact>,
    pub disputes: Vec<DisputeFact>,
    pub subscriptions: Vec<SubscriptionFact>,
    pub invoices: Vec<InvoiceFact>,
}

impl Facts {
    /// No objects, read at `read_at_ms`.
    pub fn at(read_at_ms: i64) -> Self {
        Facts {
            read_at_ms,
            ..Facts::default()
        }
    }

    /// True when nothing was read.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
            && self.payments.is_empty()
            && self.refunds.is_empty()
            && self.disputes.is_empty()
            && self.subscriptions.is_empty()
            && self.invoices.is_empty()
    }

    /// Adds another read's objects (read at the same moment or later).
    pub fn extend(&mut self, other: Facts) {
        self.sessions.extend(other.sessions);
        self.payments.extend(other.payments);
        self.refunds.extend(other.refunds);
        self.disputes.extend(other.disputes);
        self.subscriptions.extend(other.subscriptions);
        self.invoices.extend(other.invoices);
    }
}

/// A Checkout Session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionFact {
    pub id: String,
    pub mode: Option<String>,
    pub status: Option<&'static str>,
    pub payment_status: Option<&'static str>,
    pub payment_intent_id: Option<String>,
    pub customer_id: Option<String>,
    pub client_reference_id: Option<String>,
    pub metadata_user_id: Option<String>,
    pub metadata_order_id: Option<String>,
    /// Whether the line items hold the product's price; `None` when not read (the stored
    /// verdict stands).
    pub sells_product: Option<bool>,
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
    pub url: Option<String>,
    pub created: Option<i64>,
    pub expires_at: Option<i64>,
}

impl SessionFact {
    /// The session as Stripe showed it, with the line items' verdict when read.
    pub fn of(s: &CheckoutSession, sells_product: Option<bool>) -> Self {
        SessionFact {
            id: s.id.clone(),
            mode: s.mode.clone(),
            status: s.status.map(|st| st.as_str()),
            payment_status: s.payment_status.map(|p| p.as_str()),
            payment_intent_id: id_of(&s.payment_intent),
            customer_id: id_of(&s.customer),
            client_reference_id: s.client_reference_id.clone(),
            metadata_user_id: s.metadata("user_id"),
            metadata_order_id: s.metadata("order_id"),
            sells_product,
            amount_total: s.amount_total,
            currency: s.currency.clone(),
            url: s.url.clone(),
            created: s.created,
            expires_at: s.expires_at,
        }
    }

    /// A session that names an order of ours (the buyer is then the order's).
    pub fn is_ours(&self) -> bool {
        self.metadata_order_id.is_some()
    }
}

/// A payment intent with its latest charge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PaymentFact {
    pub id: String,
    pub status: String,
    pub amount: i64,
    pub currency: Option<String>,
    pub customer_id: Option<String>,
    pub charge_id: Option<String>,
    /// The charge's `amount_refunded` (pending refunds included).
    pub amount_refunded: i64,
    /// The charge's `refunded`: all of it went back.
    pub refunded: bool,
    pub created: Option<i64>,
}

impl PaymentFact {
    /// The payment intent as Stripe showed it (its latest charge expanded).
    pub fn of(p: &PaymentIntent) -> Self {
        let charge = p.charge();
        PaymentFact {
            id: p.id.clone(),
            status: p.status.clone(),
            amount: p.amount,
            currency: p.currency.clone(),
            customer_id: id_of(&p.customer),
            charge_id: charge.map(|c| c.id.clone()),
            amount_refunded: charge.map_or(0, |c| c.amount_refunded),
            refunded: charge.is_some_and(|c| c.refunded),
            created: p.created,
        }
    }
}

/// A refund.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefundFact {
    pub id: String,
    pub payment_intent_id: Option<String>,
    pub charge_id: Option<String>,
    pub amount: i64,
    pub currency: Option<String>,
    pub status: Option<String>,
    pub reason: Option<String>,
    /// Made by the webhook for a duplicate (`metadata[refunded_by] = webhook`).
    pub by_webhook: bool,
    pub created: Option<i64>,
}

impl RefundFact {
    /// The refund as Stripe showed it.
    pub fn of(r: &Refund) -> Self {
        RefundFact {
            id: r.id.clone(),
            payment_intent_id: id_of(&r.payment_intent),
            charge_id: id_of(&r.charge),
            amount: r.amount,
            currency: r.currency.clone(),
            status: r.status.clone(),
            reason: r.reason.clone(),
            by_webhook: r
                .metadata
                .as_ref()
                .and_then(|m| m.get("refunded_by"))
                .is_some_and(|v| v == "webhook"),
            created: r.created,
        }
    }
}

/// A dispute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DisputeFact {
    pub id: String,
    pub payment_intent_id: Option<String>,
    pub charge_id: Option<String>,
    pub amount: i64,
    pub currency: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub created: Option<i64>,
}

impl DisputeFact {
    /// The dispute as Stripe showed it.
    pub fn of(d: &Dispute) -> Self {
        DisputeFact {
            id: d.id.clone(),
            payment_intent_id: id_of(&d.payment_intent),
            charge_id: id_of(&d.charge),
            amount: d.amount,
            currency: d.currency.clone(),
            status: d.status.clone(),
            reason: d.reason.clone(),
            created: d.created,
        }
    }
}

/// A subscription. Its period is read from the subscription (before `2025-03-31.basil`) or from
/// its first item (since).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SubscriptionFact {
    pub id: String,
    pub customer_id: String,
    pub metadata_user_id: Option<String>,
    pub status: String,
    pub price_id: Option<String>,
    pub current_period_start: Option<i64>,
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    pub cancel_at: Option<i64>,
    pub canceled_at: Option<i64>,
    pub ended_at: Option<i64>,
}

impl SubscriptionFact {
    /// The subscription as Stripe showed it.
    pub fn of(s: &Subscription) -> Self {
        let first_item = s.items.as_ref().and_then(|i| i.data.first());
        SubscriptionFact {
            id: s.id.clone(),
            customer_id: s.customer.id().to_owned(),
            metadata_user_id: s.metadata.as_ref().and_then(|m| m.get("user_id")).cloned(),
            status: s.status.clone(),
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
}

/// An invoice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InvoiceFact {
    pub id: String,
    pub customer_id: Option<String>,
    pub subscription_id: Option<String>,
    pub status: Option<String>,
    pub billing_reason: Option<String>,
    pub amount_due: i64,
    pub amount_paid: i64,
    pub currency: Option<String>,
    pub attempt_count: i64,
    pub hosted_invoice_url: Option<String>,
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
    pub next_payment_attempt: Option<i64>,
}

impl InvoiceFact {
    /// The invoice as Stripe showed it, its subscription wherever the API version puts it.
    pub fn of(i: &Invoice) -> Self {
        InvoiceFact {
            id: i.id.clone(),
            customer_id: id_of(&i.customer),
            subscription_id: i.subscription_id(),
            status: i.status.clone(),
            billing_reason: i.billing_reason.clone(),
            amount_due: i.amount_due,
            amount_paid: i.amount_paid,
            currency: i.currency.clone(),
            attempt_count: i.attempt_count,
            hosted_invoice_url: i.hosted_invoice_url.clone(),
            period_start: i.period_start,
            period_end: i.period_end,
            next_payment_attempt: i.next_payment_attempt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_payment_is_read_from_its_expanded_latest_charge() {
        let pi: PaymentIntent = serde_json::from_value(json!({
            "id": "pi_1", "object": "payment_intent", "status": "succeeded", "amount": 1900,
            "currency": "usd", "customer": "cus_1", "created": 10,
            "latest_charge": {"id": "ch_1", "object": "charge", "amount": 1900,
                              "amount_refunded": 1900, "refunded": true, "payment_intent": "pi_1"}
        }))
        .unwrap();
        let fact = PaymentFact::of(&pi);
        assert_eq!(
            (
                fact.charge_id.as_deref(),
                fact.amount_refunded,
                fact.refunded
            ),
            (Some("ch_1"), 1900, true)
        );
        let unexpanded: PaymentIntent = serde_json::from_value(json!({
            "id": "pi_1", "status": "processing", "amount": 1900, "latest_charge": "ch_1"
        }))
        .unwrap();
        let fact = PaymentFact::of(&unexpanded);
        assert_eq!((fact.charge_id, fact.refunded), (None, false));
    }

    #[test]
    fn a_refund_by_the_webhook_says_so_in_its_metadata() {
        let refund: Refund = serde_json::from_value(json!({
            "id": "re_1", "amount": 1900, "status": "succeeded", "payment_intent": "pi_1",
            "metadata": {"refunded_by": "webhook", "order_id": "o"}
        }))
        .unwrap();
        assert!(RefundFact::of(&refund).by_webhook);
        let dashboard: Refund =
            serde_json::from_value(json!({"id": "re_2", "amount": 5, "metadata": {}})).unwrap();
        assert!(!RefundFact::of(&dashboard).by_webhook);
    }

    #[test]
    fn a_subscription_period_is_read_from_its_items_in_new_versions() {
        let sub: Subscription = serde_json::from_value(json!({
            "id": "sub_1", "customer": "cus_1", "status": "active",
            "items": {"data": [{"price": {"id": "price_1"}, "current_period_start": 10,
                                "current_period_end": 20}]}
        }))
        .unwrap();
        let fact = SubscriptionFact::of(&sub);
        assert_eq!(
            (
                fact.current_period_start,
                fact.current_period_end,
                fact.price_id.as_deref()
            ),
            (Some(10), Some(20), Some("price_1"))
        );
    }

    #[test]
    fn an_invoice_subscription_is_read_from_both_api_shapes() {
        let shapes = [
            (
                json!({"id": "in_1", "subscription": "sub_old", "parent": null}),
                "sub_old",
            ),
            (
                json!({"id": "in_1", "subscription": null, "parent": {"type": "subscription_details",
                       "subscription_details": {"subscription": "sub_new", "metadata": {}}}}),
                "sub_new",
            ),
            (
                json!({"id": "in_1", "lines": {"object": "list", "data": [{"parent": {
                       "type": "subscription_item_details",
                       "subscription_item_details": {"subscription": "sub_line"}}}]}}),
                "sub_line",
            ),
            (
                json!({"id": "in_1", "subscription": {"id": "sub_exp", "object": "subscription"}}),
                "sub_exp",
            ),
        ];
        for (object, want) in shapes {
            let invoice: Invoice = serde_json::from_value(object).unwrap();
            assert_eq!(
                InvoiceFact::of(&invoice).subscription_id.as_deref(),
                Some(want)
            );
        }
    }
}
