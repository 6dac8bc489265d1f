//! The reference model of the payments: what must be true of a user's purchases of the report,
//! from Stripe's objects alone, in a few lines. The SQL decisions
//! (supabase/schemas/30_decisions.sql) must agree with it over any facts (tests/it/decisions.rs)
//! and, through every interleaving the model test makes, with what the fake Stripe holds at the
//! end (tests/it/payments_model.rs).

/// One purchase: a completed payment-mode session of ours, or of another channel that sells
/// the report, with its payment as Stripe says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Purchase {
    pub session: String,
    /// The session's `payment_status` is `paid` or `no_payment_required`.
    pub session_paid: bool,
    pub payment_intent: Option<String>,
    /// The payment intent's status, when it was read.
    pub intent_status: Option<String>,
    /// The charge's `refunded`.
    pub refunded: bool,
    /// Its disputes' statuses.
    pub disputes: Vec<String>,
    /// A refund of it waits for the customer (`requires_action`).
    pub refund_waiting: bool,
    /// When the payment was made (the payment intent's `created`, else the session's).
    pub made_at: i64,
}

/// Where a purchase's money is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Money {
    Held,
    Refunded,
    Disputed,
    InFlight,
    Unpaid,
}

impl Money {
    /// The status an order with this money shows.
    pub fn order_status(self) -> &'static str {
        match self {
            Money::Held => "paid",
            Money::Refunded => "refunded",
            Money::Disputed => "disputed",
            Money::InFlight => "processing",
            Money::Unpaid => "failed",
        }
    }
}

/// A purchase's money: Stripe's own fields, nothing added up.
pub fn money(p: &Purchase) -> Money {
    match p.intent_status.as_deref() {
        None if p.session_paid => Money::Held,
        None => Money::InFlight,
        Some("succeeded") if p.refunded || p.disputes.iter().any(|d| d == "lost") => {
            Money::Refunded
        }
        Some("succeeded")
            if p.disputes
                .iter()
                .any(|d| d == "needs_response" || d == "under_review") =>
        {
            Money::Disputed
        }
        Some("succeeded") => Money::Held,
        Some("canceled" | "requires_payment_method") => Money::Unpaid,
        Some(_) => Money::InFlight,
    }
}

/// What a user has of the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub owns: bool,
    pub in_flight: bool,
    pub disputed: bool,
    /// The session of the purchase that stands: the earliest made of the held ones.
    pub standing: Option<String>,
    /// Sessions whose payments are due for a refund: every other held one that was read, unless
    /// a refund of it waits for the customer.
    pub refunds_due: Vec<String>,
}

/// When a purchase was made, for ranking: a payment not read yet was made at an unknown time,
/// last.
fn made(p: &Purchase) -> i64 {
    match (&p.payment_intent, &p.intent_status) {
        (Some(_), None) => i64::MAX,
        _ => p.made_at,
    }
}

/// The verdict over a user's purchases.
pub fn verdict(purchases: &[Purchase]) -> Verdict {
    let mut held: Vec<&Purchase> = purchases
        .iter()
        .filter(|p| money(p) == Money::Held)
        .collect();
    held.sort_by(|a, b| (made(a), &a.session).cmp(&(made(b), &b.session)));
    Verdict {
        owns: !held.is_empty(),
        in_flight: purchases.iter().any(|p| money(p) == Money::InFlight),
        disputed: purchases.iter().any(|p| money(p) == Money::Disputed),
        standing: held.first().map(|p| p.session.clone()),
        refunds_due: held
            .iter()
            .skip(1)
            .filter(|p| p.intent_status.is_some() && !p.refund_waiting)
            .map(|p| p.session.clone())
            .collect(),
    }
}
