//! What a client is told about its limits: the IETF `RateLimit-Policy` and `RateLimit` header
//! fields (draft-ietf-httpapi-ratelimit-headers) on every answer after admission, and the body of
//! a 429 naming the limit that was hit, what remains and when it resets.
//!
//! Two policies: `"requests"` (the sliding window, `CHAT_RATE_LIMIT_PER_MIN` per 60 s) and
//! `"tokens"` (the daily budget, renewing at midnight UTC; its unit is LLM tokens, `qu="tokens"`,
//! which the draft's unit registry does not list, so a client that only knows requests ignores
//! it). For example:
//!
//! ```text
//! RateLimit-Policy: "requests";q=20;w=60, "tokens";q=200000;w=86400;qu="tokens"
//! RateLimit: "requests";r=19;t=60, "tokens";r=198463;t=41529
//! ```

use http::{HeaderMap, HeaderValue};
use serde_json::{json, Map, Value};
use shared::store::chat::{BudgetState, RateState};

/// The policy header.
pub const POLICY_HEADER: &str = "ratelimit-policy";
/// The state header.
pub const STATE_HEADER: &str = "ratelimit";

/// The limits a request was admitted under, as far as they are known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quotas {
    /// The request limit's policy (known from config even when the database is not reachable).
    pub policy: Option<(u32, u32)>,
    /// The daily token budget, when one applies.
    pub budget_policy: Option<u64>,
    /// The state admission reported; `None` when the database could not say.
    pub rate: Option<RateState>,
    pub budget: Option<BudgetState>,
}

impl Quotas {
    /// Writes `RateLimit-Policy` (what is configured) and `RateLimit` (what admission counted).
    pub fn insert(&self, headers: &mut HeaderMap) {
        let mut policies = Vec::new();
        let mut states = Vec::new();
        if let Some((quota, window_s)) = self.policy {
            policies.push(format!("\"requests\";q={quota};w={window_s}"));
            if let Some(rate) = &self.rate {
                states.push(format!(
                    "\"requests\";r={};t={}",
                    rate.remaining,
                    if rate.retry_after > 0 {
                        rate.retry_after
                    } else {
                        rate.reset_s
                    }
                ));
            }
        }
        if let Some(budget) = self.budget_policy {
            policies.push(format!("\"tokens\";q={budget};w=86400;qu=\"tokens\""));
            if let Some(state) = &self.budget {
                states.push(format!(
                    "\"tokens\";r={};t={}",
                    state.remaining, state.reset_s
                ));
            }
        }
        for (name, items) in [(POLICY_HEADER, policies), (STATE_HEADER, states)] {
            if let Ok(value) = HeaderValue::from_str(&items.join(", ")) {
                if !items.is_empty() {
                    headers.insert(name, value);
                }
            }
        }
    }
}

/// Why a request was refused for its limits, with what the client needs to come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Too many requests in the sliding window.
    Requests(RateState),
    /// The request's worst case does not fit in what is left of the day's budget.
    Tokens { budget: BudgetState, requested: u64 },
}

impl Refusal {
    /// Seconds until a request like this one could be admitted: for requests, until the oldest
    /// counted request leaves the window; for tokens, until midnight UTC when what is settled
    /// already leaves no room, else until the earliest open reservation is settled or expires.
    pub fn retry_after(&self) -> u64 {
        match self {
            Refusal::Requests(rate) => u64::from(rate.retry_after.max(1)),
            Refusal::Tokens { budget, requested } => {
                let settled_alone_fits = budget.spent.saturating_add(*requested) <= budget.budget;
                match budget.next_expiry_s {
                    Some(expiry) if settled_alone_fits => expiry.clamp(1, budget.reset_s.max(1)),
                    _ => budget.reset_s.max(1),
                }
            }
        }
    }

    /// The fields the 429 body adds to `code`, `message` and `request_id`.
    pub fn details(&self) -> Map<String, Value> {
        let value = match self {
            Refusal::Requests(rate) => json!({
                "limit": "requests",
                "quota": rate.limit,
                "window_s": rate.window_s,
                "remaining": rate.remaining,
                "reset_s": self.retry_after(),
                "retry_after_s": self.retry_after(),
            }),
            Refusal::Tokens { budget, requested } => json!({
                "limit": "tokens",
                "quota": budget.budget,
                "window": "utc_day",
                "spent": budget.spent,
                "reserved": budget.reserved,
                "remaining": budget.remaining,
                "requested": requested,
                "reset_s": budget.reset_s,
                "retry_after_s": self.retry_after(),
            }),
        };
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(remaining: u32, reset_s: u32, retry_after: u32) -> RateState {
        RateState {
            limit: 20,
            window_s: 60,
            remaining,
            reset_s,
            retry_after,
        }
    }

    fn budget(spent: u64, reserved: u64, next_expiry_s: Option<u64>) -> BudgetState {
        BudgetState {
            budget: 1000,
            spent,
            reserved,
            remaining: 1000u64.saturating_sub(spent + reserved),
            reset_s: 3600,
            next_expiry_s,
        }
    }

    #[test]
    fn headers_name_both_policies_as_structured_fields() {
        let mut headers = HeaderMap::new();
        Quotas {
            policy: Some((20, 60)),
            budget_policy: Some(1000),
            rate: Some(rate(19, 60, 0)),
            budget: Some(budget(100, 400, Some(55))),
        }
        .insert(&mut headers);
        assert_eq!(
            headers[POLICY_HEADER],
            "\"requests\";q=20;w=60, \"tokens\";q=1000;w=86400;qu=\"tokens\""
        );
        assert_eq!(
            headers[STATE_HEADER],
            "\"requests\";r=19;t=60, \"tokens\";r=500;t=3600"
        );

        let mut unknown = HeaderMap::new();
        Quotas {
            policy: Some((5, 60)),
            ..Quotas::default()
        }
        .insert(&mut unknown);
        assert_eq!(unknown[POLICY_HEADER], "\"requests\";q=5;w=60");
        assert!(
            !unknown.contains_key(STATE_HEADER),
            "no state when the database could not say"
        );
    }

    #[test]
    fn refusals_say_which_limit_and_when_to_come_back() {
        let requests = Refusal::Requests(rate(0, 60, 3));
        assert_eq!(requests.retry_after(), 3);
        assert_eq!(requests.details()["limit"], "requests");
        assert_eq!(requests.details()["remaining"], 0);

        // Spent leaves room for this request: only reservations in flight block it.
        let in_flight = Refusal::Tokens {
            budget: budget(100, 800, Some(42)),
            requested: 400,
        };
        assert_eq!(in_flight.retry_after(), 42);
        // Spent alone leaves no room: tomorrow.
        let spent = Refusal::Tokens {
            budget: budget(900, 0, None),
            requested: 400,
        };
        assert_eq!(spent.retry_after(), 3600);
        let details = spent.details();
        assert_eq!(
            (
                details["limit"].clone(),
                details["remaining"].clone(),
                details["requested"].clone()
            ),
            (json!("tokens"), json!(100), json!(400))
        );
    }
}
