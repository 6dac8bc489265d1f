//! What a Stripe event is about: the object to read again. An event is a notification that the
//! object changed; its payload only says which object (and, for a session of another channel,
//! whose it looks like, so its buyer's clicks can wait while it is read).

use crate::stripe::events::{id_of, Event};

/// The object an event names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A Checkout Session (and, through it, its payment).
    Session(String),
    /// A payment, by its payment intent or, when the object names only its charge, the charge.
    Payment(PaymentRef),
    Subscription(String),
    Invoice(String),
}

/// How an object names its payment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PaymentRef {
    Intent(String),
    Charge(String),
}

impl PaymentRef {
    fn of(payment_intent: Option<String>, charge: Option<String>) -> Option<PaymentRef> {
        payment_intent
            .map(PaymentRef::Intent)
            .or(charge.map(PaymentRef::Charge))
    }
}

/// The object `event` is about, if the app reads any for it.
pub fn target_of(event: &Event) -> Option<Target> {
    match event {
        Event::CheckoutSession { session, .. } => Some(Target::Session(session.id.clone())),
        Event::ChargeRefunded { charge } => {
            PaymentRef::of(id_of(&charge.payment_intent), Some(charge.id.clone()))
                .map(Target::Payment)
        }
        Event::RefundUpdated { refund } => {
            PaymentRef::of(id_of(&refund.payment_intent), id_of(&refund.charge))
                .map(Target::Payment)
        }
        Event::Dispute { dispute, .. } => {
            PaymentRef::of(id_of(&dispute.payment_intent), id_of(&dispute.charge))
                .map(Target::Payment)
        }
        Event::Subscription { subscription, .. } => {
            Some(Target::Subscription(subscription.id.clone()))
        }
        Event::Invoice { invoice, .. } => Some(Target::Invoice(invoice.id.clone())),
        Event::Other => None,
    }
}

/// The user a session of another channel (no order of ours in its metadata) names, when the
/// event says it completed: a payment may have arrived for them, and their clicks wait while the
/// session is read (I2).
pub fn paid_elsewhere_by(event: &Event) -> Option<(String, String)> {
    let Event::CheckoutSession { session, .. } = event else {
        return None;
    };
    let completed = session.status == Some(crate::stripe::events::SessionStatus::Complete);
    let ours = session.metadata("order_id").is_some();
    if !completed || ours || session.mode.as_deref() != Some("payment") {
        return None;
    }
    let user = session
        .metadata("user_id")
        .or_else(|| session.client_reference_id.clone())?;
    Some((session.id.clone(), user))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stripe::events::parse;
    use crate::stripe::events::tests::event;
    use serde_json::json;

    fn target(type_: &str, object: serde_json::Value) -> Option<Target> {
        target_of(&parse(event(type_, object).as_bytes()).unwrap().event)
    }

    #[test]
    fn each_event_names_the_object_to_read() {
        assert_eq!(
            target("checkout.session.completed", json!({"id": "cs_1"})),
            Some(Target::Session("cs_1".into()))
        );
        assert_eq!(
            target(
                "charge.refunded",
                json!({"id": "ch_1", "payment_intent": "pi_1", "amount": 5})
            ),
            Some(Target::Payment(PaymentRef::Intent("pi_1".into())))
        );
        assert_eq!(
            target(
                "charge.dispute.closed",
                json!({"id": "dp_1", "charge": "ch_9", "status": "lost"})
            ),
            Some(Target::Payment(PaymentRef::Charge("ch_9".into())))
        );
        assert_eq!(
            target(
                "refund.failed",
                json!({"id": "re_1", "payment_intent": {"id": "pi_2"}})
            ),
            Some(Target::Payment(PaymentRef::Intent("pi_2".into())))
        );
        assert_eq!(
            target("refund.updated", json!({"id": "re_1"})),
            None,
            "a refund naming no payment names nothing to read"
        );
        assert_eq!(
            target(
                "customer.subscription.deleted",
                json!({"id": "sub_1", "customer": "cus_1", "status": "canceled"})
            ),
            Some(Target::Subscription("sub_1".into()))
        );
        assert_eq!(
            target("invoice.paid", json!({"id": "in_1"})),
            Some(Target::Invoice("in_1".into()))
        );
        assert_eq!(target("customer.created", json!({"id": "cus_1"})), None);
    }

    #[test]
    fn only_a_completed_session_of_another_channel_makes_its_buyer_wait() {
        let paid = |metadata: serde_json::Value, status: &str| {
            let body = event(
                "checkout.session.completed",
                json!({"id": "cs_1", "mode": "payment", "status": status,
                       "client_reference_id": "u-1", "metadata": metadata}),
            );
            paid_elsewhere_by(&parse(body.as_bytes()).unwrap().event)
        };
        assert_eq!(
            paid(json!({}), "complete"),
            Some(("cs_1".into(), "u-1".into()))
        );
        assert_eq!(paid(json!({"order_id": "o-1"}), "complete"), None);
        assert_eq!(paid(json!({}), "expired"), None);
    }
}
