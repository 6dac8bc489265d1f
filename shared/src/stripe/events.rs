//! Typed Stripe events: the types the webhook handles, plus `Other` for the rest.
//!
//! Only the fields the app uses are read; unknown fields are ignored (Stripe adds fields without
//! notice). Both invoice shapes are read: before `2025-03-31.basil` an invoice names its
//! subscription at `subscription`, since then at `parent.subscription_details.subscription`
//! (and each line at `parent.subscription_item_details.subscription`). Subscription periods moved
//! from the subscription onto its items the same way.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// An id field that Stripe may send as an id or, when expanded, as an object with an `id`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Expandable {
    Id(String),
    Object { id: String },
}

impl Expandable {
    /// The id either way.
    pub fn id(&self) -> &str {
        match self {
            Expandable::Id(id) | Expandable::Object { id } => id,
        }
    }
}

fn id_of(field: &Option<Expandable>) -> Option<String> {
    field.as_ref().map(|e| e.id().to_owned())
}

/// The envelope every event shares. `data.object` is parsed by type.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    pub id: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub created: i64,
    pub livemode: bool,
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(borrow)]
    pub data: EnvelopeData<'a>,
}

/// `data` of an event.
#[derive(Debug, Deserialize)]
pub struct EnvelopeData<'a> {
    #[serde(borrow)]
    pub object: &'a RawValue,
}

/// A Checkout Session, as far as the app reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub payment_status: Option<String>,
    #[serde(default)]
    pub client_reference_id: Option<String>,
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    #[serde(default)]
    pub customer: Option<Expandable>,
    #[serde(default)]
    pub payment_intent: Option<Expandable>,
    #[serde(default)]
    pub amount_total: Option<i64>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub created: Option<i64>,
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// Only set while the session is open.
    #[serde(default)]
    pub url: Option<String>,
}

impl CheckoutSession {
    fn metadata(&self, key: &str) -> Option<String> {
        self.metadata
            .as_ref()
            .and_then(|m| m.get(key))
            .filter(|v| !v.is_empty())
            .cloned()
    }
}

/// A subscription, as far as the app reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct Subscription {
    pub id: String,
    pub customer: Expandable,
    pub status: String,
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    #[serde(default)]
    pub cancel_at_period_end: bool,
    #[serde(default)]
    pub cancel_at: Option<i64>,
    #[serde(default)]
    pub canceled_at: Option<i64>,
    #[serde(default)]
    pub ended_at: Option<i64>,
    /// Before `2025-03-31.basil`.
    #[serde(default)]
    pub current_period_start: Option<i64>,
    /// Before `2025-03-31.basil`.
    #[serde(default)]
    pub current_period_end: Option<i64>,
    #[serde(default)]
    pub items: Option<List<SubscriptionItem>>,
}

/// A Stripe list (`{"data": [...]}`).
#[derive(Clone, Debug, Deserialize)]
pub struct List<T> {
    #[serde(default = "Vec::new")]
    pub data: Vec<T>,
}

/// A subscription item.
#[derive(Clone, Debug, Deserialize)]
pub struct SubscriptionItem {
    #[serde(default)]
    pub price: Option<Expandable>,
    /// Since `2025-03-31.basil`.
    #[serde(default)]
    pub current_period_start: Option<i64>,
    /// Since `2025-03-31.basil`.
    #[serde(default)]
    pub current_period_end: Option<i64>,
}

/// An invoice, as far as the app reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct Invoice {
    pub id: String,
    #[serde(default)]
    pub customer: Option<Expandable>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub amount_due: i64,
    #[serde(default)]
    pub amount_paid: i64,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub billing_reason: Option<String>,
    #[serde(default)]
    pub attempt_count: i64,
    #[serde(default)]
    pub hosted_invoice_url: Option<String>,
    #[serde(default)]
    pub period_start: Option<i64>,
    #[serde(default)]
    pub period_end: Option<i64>,
    #[serde(default)]
    pub next_payment_attempt: Option<i64>,
    /// Before `2025-03-31.basil`.
    #[serde(default)]
    pub subscription: Option<Expandable>,
    /// Since `2025-03-31.basil`.
    #[serde(default)]
    pub parent: Option<InvoiceParent>,
    #[serde(default)]
    pub lines: Option<List<InvoiceLine>>,
}

/// `invoice.parent` (since `2025-03-31.basil`).
#[derive(Clone, Debug, Deserialize)]
pub struct InvoiceParent {
    #[serde(default)]
    pub subscription_details: Option<SubscriptionDetails>,
}

/// `invoice.parent.subscription_details`.
#[derive(Clone, Debug, Deserialize)]
pub struct SubscriptionDetails {
    #[serde(default)]
    pub subscription: Option<Expandable>,
}

/// An invoice line; only where it points to a subscription.
#[derive(Clone, Debug, Deserialize)]
pub struct InvoiceLine {
    /// Before `2025-03-31.basil`.
    #[serde(default)]
    pub subscription: Option<Expandable>,
    #[serde(default)]
    pub parent: Option<InvoiceLineParent>,
}

/// `invoice.lines.data[].parent`.
#[derive(Clone, Debug, Deserialize)]
pub struct InvoiceLineParent {
    #[serde(default)]
    pub subscription_item_details: Option<SubscriptionDetails>,
}

impl Invoice {
    /// The subscription this invoice bills, wherever the event's API version puts it.
    pub fn subscription_id(&self) -> Option<String> {
        id_of(&self.subscription)
            .or_else(|| {
                self.parent
                    .as_ref()
                    .and_then(|p| p.subscription_details.as_ref())
                    .and_then(|d| id_of(&d.subscription))
            })
            .or_else(|| {
                self.lines.as_ref()?.data.iter().find_map(|line| {
                    id_of(&line.subscription).or_else(|| {
                        line.parent
                            .as_ref()
                            .and_then(|p| p.subscription_item_details.as_ref())
                            .and_then(|d| id_of(&d.subscription))
                    })
                })
            })
    }
}

/// What happened to a Checkout Session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckoutTransition {
    Completed,
    AsyncPaymentSucceeded,
    AsyncPaymentFailed,
    Expired,
}

/// What happened to an invoice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InvoiceTransition {
    Paid,
    PaymentSucceeded,
    PaymentFailed,
}

/// A parsed event.
#[derive(Clone, Debug)]
pub enum Event {
    CheckoutSession {
        transition: CheckoutTransition,
        session: CheckoutSession,
    },
    Subscription {
        deleted: bool,
        subscription: Subscription,
    },
    Invoice {
        transition: InvoiceTransition,
        invoice: Invoice,
    },
    /// A type the app does not act on; recorded as ignored.
    Other,
}

/// Every event type the webhook acts on (the endpoint must subscribe to these).
pub const HANDLED_EVENT_TYPES: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
];

/// Why a verified body is not an event the app can use.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EventError(String);

/// A verified event: envelope fields, its typed content, and the raw body for the audit trail.
#[derive(Debug)]
pub struct ParsedEvent<'a> {
    pub id: String,
    pub type_: String,
    pub created: i64,
    pub livemode: bool,
    pub api_version: Option<String>,
    pub event: Event,
    pub raw: &'a RawValue,
}

/// Parses a verified body.
pub fn parse(body: &[u8]) -> Result<ParsedEvent<'_>, EventError> {
    let raw: &RawValue = serde_json::from_slice(body)
        .map_err(|e| EventError(format!("the body is not JSON: {e}")))?;
    let envelope: Envelope<'_> = serde_json::from_str(raw.get())
        .map_err(|e| EventError(format!("the body is not a Stripe event: {e}")))?;
    if !envelope.id.starts_with("evt_") || envelope.id.len() > 255 {
        return Err(EventError("the event id is not a Stripe event id".into()));
    }
    let object = envelope.data.object.get();
    let typed = |what: &str| EventError(format!("data.object is not a {what}"));
    let event = match envelope.type_.as_str() {
        "checkout.session.completed"
        | "checkout.session.async_payment_succeeded"
        | "checkout.session.async_payment_failed"
        | "checkout.session.expired" => {
            let transition = match envelope.type_.as_str() {
                "checkout.session.completed" => CheckoutTransition::Completed,
                "checkout.session.async_payment_succeeded" => {
                    CheckoutTransition::AsyncPaymentSucceeded
                }
                "checkout.session.async_payment_failed" => CheckoutTransition::AsyncPaymentFailed,
                _ => CheckoutTransition::Expired,
            };
            let session = serde_json::from_str(object).map_err(|_| typed("checkout session"))?;
            Event::CheckoutSession {
                transition,
                session,
            }
        }
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => {
            let subscription = serde_json::from_str(object).map_err(|_| typed("subscription"))?;
            Event::Subscription {
                deleted: envelope.type_ == "customer.subscription.deleted",
                subscription,
            }
        }
        "invoice.paid" | "invoice.payment_succeeded" | "invoice.payment_failed" => {
            let transition = match envelope.type_.as_str() {
                "invoice.paid" => InvoiceTransition::Paid,
                "invoice.payment_succeeded" => InvoiceTransition::PaymentSucceeded,
                _ => InvoiceTransition::PaymentFailed,
            };
            let invoice = serde_json::from_str(object).map_err(|_| typed("invoice"))?;
            Event::Invoice {
                transition,
                invoice,
            }
        }
        _ => Event::Other,
    };
    Ok(ParsedEvent {
        id: envelope.id,
        type_: envelope.type_,
        created: envelope.created,
        livemode: envelope.livemode,
        api_version: envelope.api_version,
        event,
        raw,
    })
}

/// The effect of an event on the app's data, as the `apply_stripe_event` SQL function takes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Effect {
    CheckoutSession {
        transition: CheckoutTransition,
        session_id: String,
        mode: Option<String>,
        payment_status: Option<String>,
        order_id: Option<String>,
        user_id: Option<String>,
        product: Option<String>,
        customer_id: Option<String>,
        payment_intent_id: Option<String>,
        amount_total: Option<i64>,
        currency: Option<String>,
        session_created: Option<i64>,
    },
    Subscription {
        id: String,
        customer_id: String,
        user_id: Option<String>,
        status: String,
        deleted: bool,
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
    Ignored,
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
                payment_status: session.payment_status.clone(),
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
            },
            Event::Subscription {
                deleted,
                subscription: s,
            } => {
                let first_item = s.items.as_ref().and_then(|i| i.data.first());
                Effect::Subscription {
                    id: s.id.clone(),
                    customer_id: s.customer.id().to_owned(),
                    user_id: s.metadata.as_ref().and_then(|m| m.get("user_id")).cloned(),
                    // A deleted subscription is canceled whatever status the payload carries.
                    status: if *deleted {
                        "canceled".to_owned()
                    } else {
                        s.status.clone()
                    },
                    deleted: *deleted,
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
            Event::Other => Effect::Ignored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(type_: &str, object: serde_json::Value) -> String {
        json!({"id": "evt_1", "object": "event", "type": type_, "created": 1_767_225_600,
               "livemode": false, "api_version": "2026-07-29.dahlia", "data": {"object": object}})
        .to_string()
    }

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
            status, deleted, ..
        } = parse(body.as_bytes()).unwrap().event.effect()
        else {
            panic!()
        };
        assert_eq!((status.as_str(), deleted), ("canceled", true));
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
    fn unknown_type_is_other_and_unknown_fields_are_ignored() {
        let body = event("plan.created", json!({"id": "price_1", "anything": [1, 2]}));
        assert!(matches!(
            parse(body.as_bytes()).unwrap().event,
            Event::Other
        ));
    }

    #[test]
    fn json_that_is_not_an_event_is_refused() {
        for body in ["[]", "{}", "{\"id\":\"evt_1\"}", "not json",
                     &event("invoice.paid", json!("a string")),
                     &json!({"id": "x1", "type": "a", "created": 1, "livemode": false, "data": {"object": {}}}).to_string()] {
            assert!(parse(body.as_bytes()).is_err(), "{body}");
        }
    }
}
