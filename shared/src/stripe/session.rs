//! A Checkout Session as the app reads it, from events and from the API: its status and
//! payment status as enums (Stripe adds values without notice: those read as `Unknown`).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::events::Expandable;

/// A Checkout Session, as far as the app reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub status: Option<SessionStatus>,
    #[serde(default)]
    pub payment_status: Option<PaymentStatus>,
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
    /// A non-empty metadata value.
    pub fn metadata(&self, key: &str) -> Option<String> {
        self.metadata
            .as_ref()
            .and_then(|m| m.get(key))
            .filter(|v| !v.is_empty())
            .cloned()
    }
}

/// A Checkout Session's `status`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Payable: its `url` works.
    Open,
    /// The customer finished (paid, or an async payment in flight).
    Complete,
    /// Can no longer be paid.
    Expired,
    /// A status this code does not know (Stripe adds values without notice).
    #[serde(other)]
    Unknown,
}

impl SessionStatus {
    /// The snake_case name Stripe uses.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Open => "open",
            SessionStatus::Complete => "complete",
            SessionStatus::Expired => "expired",
            SessionStatus::Unknown => "unknown",
        }
    }
}

/// A Checkout Session's `payment_status`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// The money is in (for a delayed method: it has arrived).
    Paid,
    /// Not paid yet (a delayed method in flight, or not paid at all).
    Unpaid,
    /// A free session (a 100% coupon).
    NoPaymentRequired,
    /// A value this code does not know.
    #[serde(other)]
    Unknown,
}

impl PaymentStatus {
    /// The snake_case name Stripe uses, as the SQL functions read it.
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Paid => "paid",
            PaymentStatus::Unpaid => "unpaid",
            PaymentStatus::NoPaymentRequired => "no_payment_required",
            PaymentStatus::Unknown => "unknown",
        }
    }
}
