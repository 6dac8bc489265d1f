//! Reading the objects a target names from Stripe's API: the facts. Independent reads go out at
//! once (a payment's intent, refunds and disputes), so a read costs about one round trip to
//! Stripe, two for a session with a payment.

use std::time::Duration;

use super::facts::{DisputeFact, Facts, InvoiceFact, PaymentFact, RefundFact, SessionFact};
use super::target::{PaymentRef, Target};
use crate::stripe::client::{CallStats, LineItem, StripeClient, StripeError};
use crate::stripe::events::{id_of, SessionStatus};
use crate::stripe::ids::{PriceId, SessionId};

/// Reads facts for targets.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    pub stripe: &'a StripeClient,
    /// `STRIPE_FULL_REPORT_PRICE_ID`: what a session of another channel must sell to be a
    /// purchase. Without it such sessions are never read as purchases.
    pub price: Option<&'a PriceId>,
}

/// What a read found.
#[derive(Debug, Default)]
pub struct Read {
    pub facts: Facts,
    /// Stripe does not know the object (`resource_missing`), or it names no payment: nothing to
    /// store, and reading again will not change that.
    pub missing: Option<String>,
    /// Time spent waiting for Stripe.
    pub elapsed: Duration,
}

impl Reader<'_> {
    /// Reads `target`'s objects. `sells_known`: the line items' verdict already stored for the
    /// session, if any. An error is a failure to read now (Stripe down, our key refused): the
    /// caller answers so that the read is tried again.
    pub async fn read(
        &self,
        target: &Target,
        read_at_ms: i64,
        sells_known: Option<bool>,
    ) -> Result<Read, StripeError> {
        let mut read = Read {
            facts: Facts::at(read_at_ms),
            ..Read::default()
        };
        let result = match target {
            Target::Session(id) => self.session(id, sells_known, &mut read).await,
            Target::Payment(PaymentRef::Intent(pi)) => self.payment(pi, &mut read).await,
            Target::Payment(PaymentRef::Charge(charge)) => self.charge(charge, &mut read).await,
            Target::Subscription(id) => {
                let mut stats = CallStats::default();
                let sub = self.stripe.retrieve_subscription(id, &mut stats).await;
                read.elapsed += stats.elapsed;
                sub.map(|s| {
                    read.facts
                        .subscriptions
                        .push(super::facts::SubscriptionFact::of(&s))
                })
            }
            Target::Invoice(id) => {
                let mut stats = CallStats::default();
                let invoice = self.stripe.retrieve_invoice(id, &mut stats).await;
                read.elapsed += stats.elapsed;
                invoice.map(|i| read.facts.invoices.push(InvoiceFact::of(&i)))
            }
        };
        match result {
            Ok(()) => Ok(read),
            Err(e) if e.code() == Some("resource_missing") => {
                read.missing = Some(format!("Stripe does not know it: {e}"));
                read.facts = Facts::at(read_at_ms);
                Ok(read)
            }
            Err(e) => Err(e),
        }
    }

    /// A session, then (at once) its line items when its buyer is not ours and the verdict is
    /// not stored, and its payment.
    async fn session(
        &self,
        id: &str,
        sells_known: Option<bool>,
        read: &mut Read,
    ) -> Result<(), StripeError> {
        let id = SessionId::parse(id).map_err(|e| StripeError::Decode(e.to_string()))?;
        let mut stats = CallStats::default();
        let session = self.stripe.retrieve_checkout_session(&id, &mut stats).await;
        read.elapsed += stats.elapsed;
        let session = session?;
        let foreign_purchase = session.metadata("order_id").is_none()
            && session.mode.as_deref() == Some("payment")
            && session.status == Some(SessionStatus::Complete);
        let items = async {
            match self.price {
                Some(price) if foreign_purchase && sells_known.is_none() => {
                    let mut stats = CallStats::default();
                    let items = self.stripe.list_line_items(&id, &mut stats).await;
                    (items.map(|i| Some(sells(&i, price))), stats.elapsed)
                }
                _ => (Ok(None), Duration::ZERO),
            }
        };
        let pi = id_of(&session.payment_intent);
        let mut payment = Read::default();
        let payment_read = async {
            match &pi {
                Some(pi) => self.payment(pi, &mut payment).await,
                None => Ok(()),
            }
        };
        let ((items, items_elapsed), paid) = tokio::join!(items, payment_read);
        read.elapsed += items_elapsed.max(payment.elapsed);
        let verdict = items?;
        paid?;
        read.facts.sessions.push(SessionFact::of(&session, verdict));
        read.facts.extend(payment.facts);
        Ok(())
    }

    /// A payment: its intent with the latest charge, its refunds and its disputes, at once.
    pub async fn payment(&self, pi: &str, read: &mut Read) -> Result<(), StripeError> {
        let (mut a, mut b, mut c) = (
            CallStats::default(),
            CallStats::default(),
            CallStats::default(),
        );
        let (intent, refunds, disputes) = tokio::join!(
            self.stripe.retrieve_payment_intent(pi, &mut a),
            self.stripe.list_refunds(pi, &mut b),
            self.stripe.list_disputes(pi, &mut c),
        );
        read.elapsed += a.elapsed.max(b.elapsed).max(c.elapsed);
        let (intent, refunds, disputes) = (intent?, refunds?, disputes?);
        read.facts.payments.push(PaymentFact::of(&intent));
        read.facts
            .refunds
            .extend(refunds.iter().map(RefundFact::of));
        read.facts
            .disputes
            .extend(disputes.iter().map(DisputeFact::of));
        Ok(())
    }

    /// A charge's payment (a refund or dispute that names only its charge).
    async fn charge(&self, charge: &str, read: &mut Read) -> Result<(), StripeError> {
        let mut stats = CallStats::default();
        let found = self.stripe.retrieve_charge(charge, &mut stats).await;
        read.elapsed += stats.elapsed;
        match id_of(&found?.payment_intent) {
            Some(pi) => self.payment(&pi, read).await,
            None => {
                read.missing = Some("the charge has no payment intent".into());
                Ok(())
            }
        }
    }
}

/// The line items' verdict: some item is the product's price, with a positive quantity.
pub fn sells(items: &[LineItem], price: &PriceId) -> bool {
    items
        .iter()
        .any(|i| i.price_id() == Some(price.as_str()) && i.quantity.unwrap_or(1) > 0)
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
    fn only_the_products_price_sells_the_product() {
        let report = PriceId::parse("price_report").unwrap();
        let cases = [
            (vec![item("price_report", 1)], true),
            (vec![item("price_other", 1), item("price_report", 2)], true),
            (vec![item("price_other", 1)], false),
            (vec![item("price_report", 0)], false),
            (vec![], false),
        ];
        for (items, want) in cases {
            assert_eq!(sells(&items, &report), want, "{items:?}");
        }
    }
}
