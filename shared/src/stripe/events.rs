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

pub use super::session::{CheckoutSession, PaymentStatus, SessionStatus};

/// An id field that Stripe may send as an id or, when expanded, as an object with an `id`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
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

/// The id of an optional expandable field.
pub(crate) fn id_of(field: &Option<Expandable>) -> Option<String> {
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

/// A charge, as far as the app reads it (`charge.refunded`).
#[derive(Clone, Debug, Deserialize)]
pub struct Charge {
    pub id: String,
    #[serde(default)]
    pub payment_intent: Option<Expandable>,
    /// The amount charged, in the smallest currency unit.
    #[serde(default)]
    pub amount: i64,
    /// Refunded so far (cumulative over every refund of the charge).
    #[serde(default)]
    pub amount_refunded: i64,
    /// True only once the charge is fully refunded.
    #[serde(default)]
    pub refunded: bool,
    #[serde(default)]
    pub currency: Option<String>,
    /// The charge's refunds: listed only when expanded since API 2022-11-15 (never read here).
    #[serde(default)]
    pub refunds: Option<List<Refund>>,
}

/// A payment intent, as far as the app reads it (`GET /v1/payment_intents/{id}` with
/// `expand[]=latest_charge`).
#[derive(Clone, Debug, Deserialize)]
pub struct PaymentIntent {
    pub id: String,
    /// `requires_payment_method`, `requires_confirmation`, `requires_action`, `processing`,
    /// `requires_capture`, `canceled` or `succeeded`.
    pub status: String,
    #[serde(default)]
    pub amount: i64,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub customer: Option<Expandable>,
    /// The latest charge: an object when expanded, else its id.
    #[serde(default)]
    pub latest_charge: Option<ChargeField>,
    #[serde(default)]
    pub created: Option<i64>,
}

/// A charge field: expanded (an object) or not (its id).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ChargeField {
    Object(Box<Charge>),
    Id(String),
}

impl PaymentIntent {
    /// The latest charge, when the answer expanded it.
    pub fn charge(&self) -> Option<&Charge> {
        match &self.latest_charge {
            Some(ChargeField::Object(charge)) => Some(charge),
            _ => None,
        }
    }
}

/// A refund, as far as the app reads it (`charge.refund.updated`, `refund.*`, the Refunds API).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Refund {
    pub id: String,
    #[serde(default)]
    pub amount: i64,
    #[serde(default)]
    pub currency: Option<String>,
    /// `pending`, `requires_action`, `succeeded`, `failed` or `canceled`.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub payment_intent: Option<Expandable>,
    #[serde(default)]
    pub charge: Option<Expandable>,
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    #[serde(default)]
    pub created: Option<i64>,
}

impl Refund {
    /// True when the refund can no longer return the money (it failed or was canceled).
    pub fn is_dead(&self) -> bool {
        matches!(self.status.as_deref(), Some("failed" | "canceled"))
    }
}

/// A dispute, as far as the app reads it (`charge.dispute.*`).
#[derive(Clone, Debug, Deserialize)]
pub struct Dispute {
    pub id: String,
    #[serde(default)]
    pub charge: Option<Expandable>,
    #[serde(default)]
    pub payment_intent: Option<Expandable>,
    #[serde(default)]
    pub amount: i64,
    #[serde(default)]
    pub currency: Option<String>,
    /// `warning_needs_response`, `needs_response`, `under_review`, `won`, `lost`, ...
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub created: Option<i64>,
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

/// What happened to a subscription. Within one second of `created`, events apply in this
/// order (the SQL function ranks them), so a late `created` never overwrites an `updated`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionTransition {
    Created,
    Updated,
    Deleted,
}

/// What happened to an invoice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InvoiceTransition {
    Paid,
    PaymentSucceeded,
    PaymentFailed,
}

/// What happened to a dispute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DisputeTransition {
    Created,
    /// Stripe took the disputed amount (a chargeback opening, or an inquiry escalating).
    FundsWithdrawn,
    Closed,
}

/// A parsed event.
#[derive(Clone, Debug)]
pub enum Event {
    CheckoutSession {
        transition: CheckoutTransition,
        session: CheckoutSession,
    },
    Subscription {
        transition: SubscriptionTransition,
        subscription: Subscription,
    },
    Invoice {
        transition: InvoiceTransition,
        invoice: Invoice,
    },
    /// `charge.refunded`: a full or partial refund.
    ChargeRefunded { charge: Charge },
    /// A refund changed (it may have failed or been canceled: the money is back).
    RefundUpdated { refund: Refund },
    Dispute {
        transition: DisputeTransition,
        dispute: Dispute,
    },
    /// A type the app does not act on; recorded as ignored.
    Other,
}

/// How the webhook reads an event type it handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    Checkout(CheckoutTransition),
    Subscription(SubscriptionTransition),
    Invoice(InvoiceTransition),
    ChargeRefunded,
    RefundUpdated,
    Dispute(DisputeTransition),
}

/// Every event type the webhook acts on, and how: the one table (the endpoint must subscribe to
/// each of these; `preflight` checks it).
pub const HANDLED: &[(&str, Handled)] = &[
    (
        "checkout.session.completed",
        Handled::Checkout(CheckoutTransition::Completed),
    ),
    (
        "checkout.session.async_payment_succeeded",
        Handled::Checkout(CheckoutTransition::AsyncPaymentSucceeded),
    ),
    (
        "checkout.session.async_payment_failed",
        Handled::Checkout(CheckoutTransition::AsyncPaymentFailed),
    ),
    (
        "checkout.session.expired",
        Handled::Checkout(CheckoutTransition::Expired),
    ),
    (
        "customer.subscription.created",
        Handled::Subscription(SubscriptionTransition::Created),
    ),
    (
        "customer.subscription.updated",
        Handled::Subscription(SubscriptionTransition::Updated),
    ),
    (
        "customer.subscription.deleted",
        Handled::Subscription(SubscriptionTransition::Deleted),
    ),
    ("invoice.paid", Handled::Invoice(InvoiceTransition::Paid)),
    (
        "invoice.payment_succeeded",
        Handled::Invoice(InvoiceTransition::PaymentSucceeded),
    ),
    (
        "invoice.payment_failed",
        Handled::Invoice(InvoiceTransition::PaymentFailed),
    ),
    ("charge.refunded", Handled::ChargeRefunded),
    ("charge.refund.updated", Handled::RefundUpdated),
    ("refund.updated", Handled::RefundUpdated),
    ("refund.failed", Handled::RefundUpdated),
    (
        "charge.dispute.created",
        Handled::Dispute(DisputeTransition::Created),
    ),
    (
        "charge.dispute.funds_withdrawn",
        Handled::Dispute(DisputeTransition::FundsWithdrawn),
    ),
    (
        "charge.dispute.closed",
        Handled::Dispute(DisputeTransition::Closed),
    ),
];

/// The event types of [`HANDLED`], in its order.
pub fn handled_event_types() -> impl Iterator<Item = &'static str> {
    HANDLED.iter().map(|(type_, _)| *type_)
}

/// How the webhook reads `type_`, if it handles it.
pub fn handled(type_: &str) -> Option<Handled> {
    HANDLED.iter().find(|(t, _)| *t == type_).map(|(_, h)| *h)
}

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
    fn typed<T: serde::de::DeserializeOwned>(object: &str, what: &str) -> Result<T, EventError> {
        serde_json::from_str(object).map_err(|_| EventError(format!("data.object is not a {what}")))
    }
    let event = match handled(&envelope.type_) {
        Some(Handled::Checkout(transition)) => Event::CheckoutSession {
            transition,
            session: typed(object, "checkout session")?,
        },
        Some(Handled::Subscription(transition)) => Event::Subscription {
            transition,
            subscription: typed(object, "subscription")?,
        },
        Some(Handled::Invoice(transition)) => Event::Invoice {
            transition,
            invoice: typed(object, "invoice")?,
        },
        Some(Handled::ChargeRefunded) => Event::ChargeRefunded {
            charge: typed(object, "charge")?,
        },
        Some(Handled::RefundUpdated) => Event::RefundUpdated {
            refund: typed(object, "refund")?,
        },
        Some(Handled::Dispute(transition)) => Event::Dispute {
            transition,
            dispute: typed(object, "dispute")?,
        },
        None => Event::Other,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// An event of `type_` around `object`, as Stripe sends it.
    pub(crate) fn event(type_: &str, object: serde_json::Value) -> String {
        json!({"id": "evt_1", "object": "event", "type": type_, "created": 1_767_225_600,
               "livemode": false, "api_version": "2026-07-29.dahlia", "data": {"object": object}})
        .to_string()
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
