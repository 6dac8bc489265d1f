//! The payments' SQL entry points (supabase/schemas/40_sync.sql): store what Stripe's API
//! answered and learn what is due at Stripe now; mark a session of another channel being read;
//! the reconciler's runs. Each call is one SQL function, one transaction, one round trip.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Arg, Call, Store, StoreError};
use crate::payments::facts::Facts;
use crate::stripe::events::ParsedEvent;

/// What storing facts did.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The objects were stored and the purchases they concern settled.
    Applied,
    /// The event id was recorded before; its reads were stored all the same.
    Duplicate,
    /// A type the app does not act on; recorded only.
    Ignored,
    /// The objects concern no purchase or subscription of a user we know (or Stripe does not
    /// know them); recorded for follow-up.
    Unmatched,
}

impl Outcome {
    /// The snake_case name, as logged and stored.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Ignored => "ignored",
            Outcome::Unmatched => "unmatched",
        }
    }
}

/// A refund due: a payment that is not the one that stands among its buyer's held purchases.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct RefundDue {
    pub order_id: uuid::Uuid,
    pub payment_intent_id: String,
    /// The idempotency key's number (earlier keys hold errors).
    pub attempt: u32,
    /// The payment intent of the purchase that stands against it, read again before the refund.
    #[serde(default)]
    pub standing: Option<String>,
}

/// An expiry due: a session of ours Stripe still lets someone pay that nobody should.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct ExpiryDue {
    pub session_id: String,
    pub attempt: u32,
}

/// The two calls that carry out decisions at Stripe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Refund,
    Expire,
}

/// A call to Stripe that failed under an idempotency key: the next try uses the next key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActionFailure {
    pub kind: ActionKind,
    pub object_id: String,
    pub attempt: u32,
    pub error: String,
}

/// The answer of `record_stripe_facts`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Recorded {
    pub outcome: Outcome,
    #[serde(default)]
    pub detail: Option<String>,
    /// Stored objects that differ from what was stored before (new ones included).
    #[serde(default)]
    pub changed: u32,
    #[serde(default)]
    pub refunds: Vec<RefundDue>,
    #[serde(default)]
    pub expiries: Vec<ExpiryDue>,
    /// Checkout session created -> order paid, for each order first paid now.
    #[serde(default)]
    pub sync_delays_ms: Vec<i64>,
    /// Second payments for a product found now.
    #[serde(default)]
    pub duplicates: u32,
    /// A paid session of another channel that does not sell the product, found now.
    #[serde(default)]
    pub unverified: bool,
}

/// `p_event`: the envelope fields the ledger keeps.
#[derive(Serialize)]
struct EventMeta<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    type_: &'a str,
    created: i64,
    livemode: bool,
    api_version: Option<&'a str>,
    received_at_ms: i64,
}

/// What the reconciler reads again (from `reconcile_begin`).
#[derive(Clone, Debug, Deserialize)]
pub struct ReconcilePlan {
    pub run: i64,
    /// Unix seconds: list undelivered events created since.
    pub since: i64,
    /// The most pressing, then the least recently read, at most the run's limit of each.
    pub sessions: Vec<String>,
    pub payments: Vec<String>,
    /// How many are due in all (more than listed: the next runs read the rest).
    pub sessions_due: u32,
    pub payments_due: u32,
}

/// A verified event as `record_stripe_facts` records it.
#[derive(Clone, Copy, Debug)]
pub struct Delivery<'a> {
    pub event: &'a ParsedEvent<'a>,
    pub received_at_ms: i64,
}

fn decode<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, StoreError> {
    serde_json::from_value(value).map_err(|e| StoreError::Decode(e.to_string()))
}

fn json<T: Serialize>(value: &T) -> Result<Value, StoreError> {
    serde_json::to_value(value).map_err(|e| StoreError::Decode(e.to_string()))
}

impl Store {
    /// Stores the objects read from Stripe (and the event, if any, exactly once in the ledger),
    /// settles the purchases they concern, records the calls that failed, and answers what is
    /// due at Stripe now. `facts: None` records an event of a type the app does not act on.
    pub async fn record_stripe_facts(
        &self,
        delivery: Option<Delivery<'_>>,
        facts: Option<(&Facts, Option<&str>)>,
        failures: &[ActionFailure],
    ) -> Result<Recorded, StoreError> {
        let (event, payload) = match delivery {
            Some(d) => (
                Some(json(&EventMeta {
                    id: &d.event.id,
                    type_: &d.event.type_,
                    created: d.event.created,
                    livemode: d.event.livemode,
                    api_version: d.event.api_version.as_deref(),
                    received_at_ms: d.received_at_ms,
                })?),
                Some(d.event.raw),
            ),
            None => (None, None),
        };
        let facts = match facts {
            Some((facts, missing)) => {
                let mut value = json(facts)?;
                if let (Some(missing), Some(map)) = (missing, value.as_object_mut()) {
                    map.insert("missing".into(), Value::String(missing.to_owned()));
                }
                Some(value)
            }
            None => None,
        };
        let mut args = vec![("p_event", Arg::OptJson(event))];
        args.push(match payload {
            Some(raw) => ("p_payload", Arg::Json(raw)),
            None => ("p_payload", Arg::OptJson(None)),
        });
        args.push(("p_facts", Arg::OptJson(facts)));
        args.push(("p_actions", Arg::Value(json(&failures)?)));
        decode(
            self.call(Call {
                function: "record_stripe_facts",
                args,
            })
            .await?,
        )
    }

    /// A paid session of another channel is about to be read at Stripe: its buyer's clicks see a
    /// payment in flight meanwhile. Answers the line items' verdict already stored, if any.
    pub async fn stripe_sync_begin(
        &self,
        session_id: &str,
        user: &str,
    ) -> Result<Option<bool>, StoreError> {
        let answer = self
            .call(Call {
                function: "stripe_sync_begin",
                args: vec![
                    ("p_session_id", Arg::Text(session_id)),
                    ("p_user", Arg::Text(user)),
                ],
            })
            .await?;
        Ok(answer["sells_product"].as_bool())
    }

    /// Starts a reconciler run: where to list undelivered events from (`since`: Unix seconds,
    /// else after the last run) and what to read again (at most `limit` of each).
    pub async fn reconcile_begin(
        &self,
        since: Option<i64>,
        limit: u32,
    ) -> Result<ReconcilePlan, StoreError> {
        decode(
            self.call(Call {
                function: "reconcile_begin",
                args: vec![
                    ("p_since_s", Arg::BigInt(since)),
                    (
                        "p_limit",
                        Arg::Int(Some(i32::try_from(limit).unwrap_or(i32::MAX))),
                    ),
                ],
            })
            .await?,
        )
    }

    /// Of `ids` (events a run listed), those the ledger does not hold, in the order given.
    pub async fn stripe_events_unknown(&self, ids: &[&str]) -> Result<Vec<String>, StoreError> {
        decode(
            self.call(Call {
                function: "stripe_events_unknown",
                args: vec![("p_ids", Arg::Value(serde_json::json!(ids)))],
            })
            .await?,
        )
    }

    /// Ends a reconciler run with what it did and how far it listed every undelivered event
    /// (`listed_through`, Unix seconds: the next run lists from a little before it).
    pub async fn reconcile_finish(
        &self,
        run: i64,
        events: u32,
        repaired: u32,
        error: Option<&str>,
        listed_through: Option<i64>,
    ) -> Result<(), StoreError> {
        self.call(Call {
            function: "reconcile_finish",
            args: vec![
                ("p_run", Arg::BigInt(Some(run))),
                (
                    "p_events",
                    Arg::Int(Some(i32::try_from(events).unwrap_or(i32::MAX))),
                ),
                (
                    "p_repaired",
                    Arg::Int(Some(i32::try_from(repaired).unwrap_or(i32::MAX))),
                ),
                ("p_error", Arg::OptText(error)),
                ("p_listed_through_s", Arg::BigInt(listed_through)),
            ],
        })
        .await
        .map(|_| ())
    }
}
