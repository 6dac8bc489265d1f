//! Chat admission (rate limit + cache lookup, one round trip) and answer recording.

use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::{Arg, Call, Store, StoreError};

/// What `chat_admit` found.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Admission {
    RateLimited { retry_after: u64 },
    UnknownUser,
    Hit { response: Value },
    Miss,
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
}

fn int(v: Option<u32>) -> Arg<'static> {
    Arg::Int(v.map(|v| i32::try_from(v).unwrap_or(i32::MAX)))
}

impl Store {
    /// Counts the request against the user's limit and looks the answer up in the cache.
    pub async fn chat_admit(
        &self,
        user: Uuid,
        cache_key: Option<&str>,
        per_window: u32,
        window_s: u32,
    ) -> Result<Admission, StoreError> {
        let value = self
            .call(Call {
                function: "chat_admit",
                args: vec![
                    ("p_user", Arg::Uuid(user)),
                    ("p_cache_key", Arg::OptText(cache_key)),
                    ("p_limit", int(Some(per_window))),
                    ("p_window_s", int(Some(window_s))),
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
            ],
        })
        .await
        .map(|_| ())
    }
}
