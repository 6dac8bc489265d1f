//! Chat admission (rate limit + cache lookup + token budget, one round trip) and answer recording.

use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::{Arg, Call, Store, StoreError};

/// What `chat_admit` found.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Admission {
    RateLimited {
        retry_after: u64,
    },
    UnknownUser,
    Hit {
        response: Value,
    },
    /// The user's tokens today reached the budget; `retry_after` runs to the next UTC day.
    BudgetExceeded {
        retry_after: u64,
        used: u64,
        budget: u64,
    },
    Miss,
}

/// The limits one request is admitted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmitLimits {
    /// Requests per window.
    pub per_window: u32,
    pub window_s: u32,
    /// Tokens per user and UTC day; `None`: no budget.
    pub daily_tokens: Option<u64>,
}

/// An answer to record.
#[derive(Clone, Debug)]
pub struct Recorded<'a> {
    pub cache_key: Option<&'a str>,
    /// The response to cache (LLM answers only), with its TTL.
    pub cache: Option<(&'a Value, u32)>,
    pub llm: bool,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    /// The token counts are an estimate: the upstream reported no usage.
    pub usage_estimated: bool,
    /// The user is signed in anonymously.
    pub anonymous: bool,
}

fn int(v: Option<u32>) -> Arg<'static> {
    Arg::Int(v.map(|v| i32::try_from(v).unwrap_or(i32::MAX)))
}

impl Store {
    /// Counts the request against the user's rate limit, looks the answer up in the cache and,
    /// on a miss, checks the user's token budget for the UTC day.
    pub async fn chat_admit(
        &self,
        user: Uuid,
        cache_key: Option<&str>,
        limits: AdmitLimits,
    ) -> Result<Admission, StoreError> {
        let budget = limits
            .daily_tokens
            .filter(|b| *b > 0)
            .map(|b| i64::try_from(b).unwrap_or(i64::MAX));
        let value = self
            .call(Call {
                function: "chat_admit",
                args: vec![
                    ("p_user", Arg::Uuid(user)),
                    ("p_cache_key", Arg::OptText(cache_key)),
                    ("p_limit", int(Some(limits.per_window))),
                    ("p_window_s", int(Some(limits.window_s))),
                    ("p_token_budget", Arg::BigInt(budget)),
                ],
            })
            .await?;
        serde_json::from_value(value).map_err(|e| StoreError::Decode(e.to_string()))
    }

    /// Caches an LLM answer and adds to the user's usage.
    pub async fn chat_record(&self, user: Uuid, record: &Recorded<'_>) -> Result<(), StoreError> {
        let (response, ttl) = match record.cache {
            Some((response, ttl)) => (Some(response.clone()), ttl),
            None => (None, 0),
        };
        self.call(Call {
            function: "chat_record",
            args: vec![
                ("p_user", Arg::Uuid(user)),
                ("p_cache_key", Arg::OptText(record.cache_key)),
                (
                    "p_response",
                    response.map(Arg::Value).unwrap_or(Arg::OptJson(None)),
                ),
                ("p_cache_ttl_s", int(Some(ttl))),
                ("p_llm", Arg::Bool(record.llm)),
                ("p_prompt_tokens", int(record.prompt_tokens)),
                ("p_completion_tokens", int(record.completion_tokens)),
                ("p_usage_estimated", Arg::Bool(record.usage_estimated)),
                ("p_anonymous", Arg::Bool(record.anonymous)),
            ],
        })
        .await
        .map(|_| ())
    }
}
