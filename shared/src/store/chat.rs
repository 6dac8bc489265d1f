//! Chat admission (request limit, cache lookup, token reservation: one round trip), the
//! extension of a reservation before another upstream attempt, and settlement.

use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::{Arg, Call, Store, StoreError};

/// The request limit as `chat_admit` counted it: an exact sliding window.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct RateState {
    /// Requests per window.
    pub limit: u32,
    pub window_s: u32,
    /// Requests left in the window after this one.
    pub remaining: u32,
    /// Seconds until the oldest counted request leaves the window.
    pub reset_s: u32,
    /// 0 when admitted, else seconds until a request would be.
    #[serde(default)]
    pub retry_after: u32,
}

/// The token budget of the user's UTC day, as admission (or an extension) left it.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct BudgetState {
    pub budget: u64,
    /// Settled charges plus reservations that expired unsettled.
    pub spent: u64,
    /// Open reservations, this request's included when it was admitted.
    pub reserved: u64,
    /// `budget - spent - reserved`, at least 0.
    pub remaining: u64,
    /// Seconds to the next UTC midnight, when the day's budget renews.
    pub reset_s: u64,
    /// Seconds until the earliest open reservation expires (settled or counted by then).
    #[serde(default)]
    pub next_expiry_s: Option<u64>,
}

/// What `chat_admit` found.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Admission {
    /// Over the request limit.
    RateLimited {
        rate: RateState,
    },
    UnknownUser,
    /// A cached answer: free, nothing reserved.
    Hit {
        response: Value,
        rate: RateState,
        /// The day's figures, for the answer's headers.
        #[serde(default)]
        budget: Option<BudgetState>,
    },
    /// `spent + reserved + requested` would pass the budget; nothing reserved.
    BudgetExceeded {
        rate: RateState,
        budget: BudgetState,
        requested: u64,
    },
    /// Not cached; with a budget, `reservation` holds the request's worst case.
    Miss {
        rate: RateState,
        #[serde(default)]
        budget: Option<BudgetState>,
        #[serde(default)]
        reservation: Option<Uuid>,
    },
}

/// What one request is admitted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmitLimits {
    /// Requests per window.
    pub per_window: u32,
    pub window_s: u32,
    /// Tokens per user and UTC day; `None`: no budget, nothing reserved.
    pub daily_tokens: Option<u64>,
}

/// The reservation asked for at admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reserve {
    /// The request's worst case: its prompt bound plus the completion cap.
    pub tokens: u64,
    /// How long the reservation stays open without a settlement (the function's remaining
    /// time): after that it counts as spent in full.
    pub hold_s: u32,
}

/// What `chat_extend` answered.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Extension {
    /// The reservation now holds `tokens`.
    Extended { tokens: u64 },
    /// The attempt would pass the budget: not covered.
    BudgetExceeded { budget: BudgetState, requested: u64 },
    /// The reservation expired and was counted in full: no further attempt is covered.
    Gone,
}

/// Who answered, as the usage counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettledSource {
    Llm,
    Fallback,
    /// The rule engine, after upstream attempts that are still paid for.
    Rules,
}

impl SettledSource {
    fn as_str(self) -> &'static str {
        match self {
            SettledSource::Llm => "llm",
            SettledSource::Fallback => "fallback",
            SettledSource::Rules => "rules",
        }
    }
}

/// A request's settlement: what it really cost, and the answer to cache.
#[derive(Clone, Debug)]
pub struct Settlement<'a> {
    pub reservation: Option<Uuid>,
    pub cache_key: Option<&'a str>,
    /// The response to cache (complete answers of the primary model only), with its TTL.
    pub cache: Option<(&'a Value, u32)>,
    pub source: SettledSource,
    /// Charged over every attempt that reached the upstream.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Attempts that reached the upstream, and of those the failed ones.
    pub attempts: u32,
    pub failed_attempts: u32,
    /// Part of the charge is an estimate: the upstream reported no usage for it.
    pub usage_estimated: bool,
    /// The user is signed in anonymously.
    pub anonymous: bool,
}

/// What `chat_settle` did.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Settled {
    /// False when the reservation had expired and was counted in full already.
    pub settled: bool,
}

fn int(v: u32) -> Arg<'static> {
    Arg::Int(Some(i32::try_from(v).unwrap_or(i32::MAX)))
}

fn big(v: u64) -> Arg<'static> {
    Arg::BigInt(Some(i64::try_from(v).unwrap_or(i64::MAX)))
}

fn budget_arg(daily_tokens: Option<u64>) -> Arg<'static> {
    Arg::BigInt(
        daily_tokens
            .filter(|b| *b > 0)
            .map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
    )
}

impl Store {
    /// Counts the request against the user's request limit, looks the answer up in the cache
    /// and, on a miss with a budget, reserves `reserve.tokens` against the user's UTC day.
    /// `now_ms` is the function's clock (Unix milliseconds).
    pub async fn chat_admit(
        &self,
        user: Uuid,
        cache_key: Option<&str>,
        limits: AdmitLimits,
        reserve: Reserve,
        now_ms: i64,
    ) -> Result<Admission, StoreError> {
        let value = self
            .call(Call {
                function: "chat_admit",
                args: vec![
                    ("p_user", Arg::Uuid(user)),
                    ("p_cache_key", Arg::OptText(cache_key)),
                    ("p_limit", int(limits.per_window)),
                    ("p_window_s", int(limits.window_s)),
                    ("p_token_budget", budget_arg(limits.daily_tokens)),
                    ("p_reserve", big(reserve.tokens)),
                    ("p_hold_s", int(reserve.hold_s)),
                    ("p_now_ms", Arg::BigInt(Some(now_ms))),
                ],
            })
            .await?;
        serde_json::from_value(value).map_err(|e| StoreError::Decode(e.to_string()))
    }

    /// Adds `tokens` to an open reservation before another upstream attempt, if the budget
    /// allows it.
    pub async fn chat_extend(
        &self,
        user: Uuid,
        reservation: Uuid,
        tokens: u64,
        daily_tokens: Option<u64>,
        now_ms: i64,
    ) -> Result<Extension, StoreError> {
        let value = self
            .call(Call {
                function: "chat_extend",
                args: vec![
                    ("p_user", Arg::Uuid(user)),
                    ("p_reservation", Arg::Uuid(reservation)),
                    ("p_tokens", big(tokens)),
                    ("p_token_budget", budget_arg(daily_tokens)),
                    ("p_now_ms", Arg::BigInt(Some(now_ms))),
                ],
            })
            .await?;
        serde_json::from_value(value).map_err(|e| StoreError::Decode(e.to_string()))
    }

    /// Caches the answer, releases the reservation and charges what the request really used.
    pub async fn chat_settle(
        &self,
        user: Uuid,
        settlement: &Settlement<'_>,
        now_ms: i64,
    ) -> Result<Settled, StoreError> {
        let (response, ttl) = match settlement.cache {
            Some((response, ttl)) => (Some(response.clone()), ttl),
            None => (None, 0),
        };
        let value = self
            .call(Call {
                function: "chat_settle",
                args: vec![
                    ("p_user", Arg::Uuid(user)),
                    ("p_reservation", Arg::OptUuid(settlement.reservation)),
                    ("p_cache_key", Arg::OptText(settlement.cache_key)),
                    (
                        "p_response",
                        response.map(Arg::Value).unwrap_or(Arg::OptJson(None)),
                    ),
                    ("p_cache_ttl_s", int(ttl)),
                    ("p_source", Arg::Text(settlement.source.as_str())),
                    ("p_prompt_tokens", big(settlement.prompt_tokens)),
                    ("p_completion_tokens", big(settlement.completion_tokens)),
                    ("p_attempts", int(settlement.attempts)),
                    ("p_failed_attempts", int(settlement.failed_attempts)),
                    ("p_usage_estimated", Arg::Bool(settlement.usage_estimated)),
                    ("p_anonymous", Arg::Bool(settlement.anonymous)),
                    ("p_now_ms", Arg::BigInt(Some(now_ms))),
                ],
            })
            .await?;
        serde_json::from_value(value).map_err(|e| StoreError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn admission_answers_decode() {
        let rate = json!({"allowed": true, "limit": 20, "window_s": 60, "remaining": 19, "reset_s": 60, "retry_after": 0});
        let miss: Admission = serde_json::from_value(json!({
            "state": "miss", "rate": rate, "reservation": "8d5b4c6e-6f0e-4a43-9d43-3f5d6c1c2b1a",
            "budget": {"budget": 1000, "spent": 10, "reserved": 500, "remaining": 490, "reset_s": 3600, "next_expiry_s": 60}
        }))
        .unwrap();
        let Admission::Miss {
            rate,
            budget: Some(budget),
            reservation: Some(_),
        } = miss
        else {
            panic!("a miss with a reservation: {miss:?}")
        };
        assert_eq!((rate.limit, rate.remaining), (20, 19));
        assert_eq!((budget.remaining, budget.next_expiry_s), (490, Some(60)));
        let no_budget: Admission =
            serde_json::from_value(json!({"state": "miss", "rate": {"limit": 5, "window_s": 60, "remaining": 4, "reset_s": 60}}))
                .unwrap();
        assert!(matches!(
            no_budget,
            Admission::Miss {
                budget: None,
                reservation: None,
                ..
            }
        ));
        let gone: Extension = serde_json::from_value(json!({"state": "gone"})).unwrap();
        assert_eq!(gone, Extension::Gone);
    }
}
