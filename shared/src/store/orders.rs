//! Orders for the one-time purchase: start or resume checkout, attach a session, retire an order
//! whose session can never be created, and the status the success page polls. Each call is one
//! SQL function, one round trip. The invariants these functions keep are in docs/payments.md.

use serde::Deserialize;
use uuid::Uuid;

use super::payments::ExpiryDue;
use super::{Arg, Call, Store, StoreError};
use crate::payments::facts::SessionFact;

/// The product the checkout sells.
pub const FULL_REPORT: &str = "full_report";

/// An order's status as stored.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Pending,
    Processing,
    Paid,
    Failed,
    Expired,
    /// Fully refunded, or a dispute lost: the product is locked again and may be bought again.
    Refunded,
    /// A dispute is open: the product is suspended until it closes.
    Disputed,
}

impl OrderStatus {
    /// The status shown to the success page: `pending | paid | expired | failed | refunded |
    /// disputed` (an async payment still in flight is pending to the user).
    pub fn public(self) -> &'static str {
        match self {
            OrderStatus::Pending | OrderStatus::Processing => "pending",
            OrderStatus::Paid => "paid",
            OrderStatus::Failed => "failed",
            OrderStatus::Expired => "expired",
            OrderStatus::Refunded => "refunded",
            OrderStatus::Disputed => "disputed",
        }
    }

    /// True while the order can still become paid through its session.
    pub fn is_open(self) -> bool {
        matches!(self, OrderStatus::Pending | OrderStatus::Processing)
    }
}

/// An order as the SQL functions return it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Order {
    pub order_id: Uuid,
    pub status: OrderStatus,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub expires_at: Option<i64>,
    pub created_at: i64,
    #[serde(default)]
    pub paid_at: Option<i64>,
    /// The e-mail the order's session is created with (fixed when the order opened).
    #[serde(default)]
    pub customer_email: Option<String>,
    #[serde(default)]
    pub amount_refunded: Option<i64>,
}

/// What `checkout_begin` found.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Begin {
    RateLimited {
        retry_after: u64,
    },
    UnknownUser,
    AlreadyPaid {
        order: Order,
    },
    /// The user's payment is disputed: no new purchase until the dispute closes.
    Disputed {
        order: Order,
    },
    /// A payment of the user's is in flight (a delayed method, or a paid session of another
    /// channel being read at Stripe now).
    Processing {
        #[serde(default)]
        order: Option<Order>,
    },
    /// Sessions of ours Stripe may still let someone pay that nobody should: expire them, store
    /// what Stripe answers, ask again.
    ExpireFirst {
        sessions: Vec<ExpiryDue>,
    },
    /// A pending order with a session: ask Stripe whether it is still open.
    OpenSession {
        order: Order,
    },
    /// This caller holds the lease to create the order's session.
    CreateSession {
        order: Order,
    },
    /// Another caller is creating the session: wait `retry_ms` and ask again.
    InProgress {
        order: Order,
        retry_ms: u64,
    },
}

/// Limits and lifetimes `checkout_begin` applies.
#[derive(Clone, Copy, Debug)]
pub struct BeginLimits {
    /// Requests per window, `None` for a caller asking again while waiting.
    pub per_window: Option<u32>,
    pub window_s: u32,
    pub lease_s: u32,
    pub session_ttl_s: u32,
}

/// What `checkout_attach_session` did.
#[derive(Clone, Debug, Deserialize)]
pub struct Attached {
    /// The session is the order's and may be handed out (Stripe lets it be paid, the user owns
    /// nothing and has no payment in flight).
    pub attached: bool,
    #[serde(default)]
    pub order: Option<Order>,
    /// Sessions to expire now (this one, when it must not be paid).
    #[serde(default)]
    pub expiries: Vec<ExpiryDue>,
}

/// What `checkout_retire_order` did.
#[derive(Clone, Debug, Deserialize)]
pub struct Retired {
    pub retired: bool,
}

/// What `checkout_status` found.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Status {
    RateLimited { retry_after: u64 },
    NotFound,
    Found { order: Order },
}

fn decode<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, StoreError> {
    serde_json::from_value(value).map_err(|e| StoreError::Decode(e.to_string()))
}

fn int(v: u32) -> Arg<'static> {
    Arg::Int(Some(i32::try_from(v).unwrap_or(i32::MAX)))
}

impl Store {
    /// Starts or resumes the user's checkout of `product`; a new order keeps `email` for its
    /// session. `claim` names this caller: a lease it already holds is resumed.
    pub async fn checkout_begin(
        &self,
        user: Uuid,
        product: &str,
        email: Option<&str>,
        claim: Uuid,
        limits: BeginLimits,
    ) -> Result<Begin, StoreError> {
        decode(
            self.call(Call {
                function: "checkout_begin",
                args: vec![
                    ("p_user", Arg::Uuid(user)),
                    ("p_product", Arg::Text(product)),
                    ("p_email", Arg::OptText(email)),
                    ("p_claim", Arg::Uuid(claim)),
                    (
                        "p_limit",
                        Arg::Int(
                            limits
                                .per_window
                                .map(|l| i32::try_from(l).unwrap_or(i32::MAX)),
                        ),
                    ),
                    ("p_window_s", int(limits.window_s)),
                    ("p_lease_s", int(limits.lease_s)),
                    ("p_session_ttl_s", int(limits.session_ttl_s)),
                ],
            })
            .await?,
        )
    }

    /// Stores the session the order's create gave (as Stripe answered it) on the order and
    /// releases the lease.
    pub async fn checkout_attach_session(
        &self,
        order: Uuid,
        session: &SessionFact,
    ) -> Result<Attached, StoreError> {
        let session =
            serde_json::to_value(session).map_err(|e| StoreError::Decode(e.to_string()))?;
        decode(
            self.call(Call {
                function: "checkout_attach_session",
                args: vec![
                    ("p_order", Arg::Uuid(order)),
                    ("p_session", Arg::Value(session)),
                ],
            })
            .await?,
        )
    }

    /// Gives the creation lease back after a failed Stripe call.
    pub async fn checkout_release_lease(&self, order: Uuid) -> Result<(), StoreError> {
        self.call(Call {
            function: "checkout_release_lease",
            args: vec![("p_order", Arg::Uuid(order))],
        })
        .await
        .map(|_| ())
    }

    /// Closes a pending order without a session whose Stripe create can never succeed, so the
    /// next begin opens a fresh one.
    pub async fn checkout_retire_order(
        &self,
        order: Uuid,
        reason: &str,
    ) -> Result<Retired, StoreError> {
        decode(
            self.call(Call {
                function: "checkout_retire_order",
                args: vec![
                    ("p_order", Arg::Uuid(order)),
                    ("p_reason", Arg::Text(reason)),
                ],
            })
            .await?,
        )
    }

    /// The user's order by session id, or their latest.
    pub async fn checkout_status(
        &self,
        user: Uuid,
        session_id: Option<&str>,
        per_window: u32,
        window_s: u32,
    ) -> Result<Status, StoreError> {
        decode(
            self.call(Call {
                function: "checkout_status",
                args: vec![
                    ("p_user", Arg::Uuid(user)),
                    ("p_session_id", Arg::OptText(session_id)),
                    ("p_limit", int(per_window)),
                    ("p_window_s", int(window_s)),
                ],
            })
            .await?,
        )
    }
}
