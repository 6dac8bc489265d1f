//! Admission: what a request must pass before anything is asked of the LLM, and its deadline.

use std::time::{Duration, Instant};

use http::Method;
use lambda_http::{Request, RequestExt};
use serde_json::Value;
use shared::clock::Clock;
use shared::llm::Message;
use shared::store::chat::Admission;
use shared::telemetry::MetricSet;

use crate::request::Chat;
use crate::wire::{self, Wire};
use crate::{cache_key, ChatError, Config, State};

const RATE_WINDOW_S: u32 = 60;

/// When the answer must be out: the configured budget, shortened by the invocation's own
/// deadline minus a reserve. A deadline in the past or absurdly far (as `cargo lambda watch`
/// sends: a constant in 1970) is ignored.
pub fn deadline_for(request: &Request, config: &Config, clock: Clock) -> Instant {
    let mut budget = config.total_budget;
    if let Some(context) = request.lambda_context_ref() {
        let left_ms = i64::try_from(context.deadline)
            .unwrap_or(i64::MAX)
            .saturating_sub(clock.unix_ms());
        if left_ms > 1000 && left_ms < 15 * 60 * 1000 {
            let usable =
                Duration::from_millis(left_ms as u64).saturating_sub(config.deadline_reserve);
            budget = budget.min(usable.max(Duration::from_millis(100)));
        }
    }
    Instant::now() + budget
}

fn is_chat_path(path: &str) -> bool {
    matches!(
        path.trim_end_matches('/'),
        "" | "/v1/chat/completions" | "/chat/completions"
    )
}

pub(crate) struct Admitted {
    pub user: Asker,
    pub chat: Chat,
    /// The messages sent upstream (the server's system prompt first).
    pub messages: Vec<Message>,
    pub wire: Wire,
    pub cache_key: Option<String>,
    pub cached: Option<Value>,
}

/// Who asked, as the bookkeeping needs it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Asker {
    pub id: uuid::Uuid,
    pub anonymous: bool,
}

/// Everything before the answer: path, method, token, body, limits, budget and cache (one
/// round trip for the last three).
pub(crate) async fn admit(
    state: &State,
    request: &Request,
    metrics: &mut MetricSet,
) -> Result<Admitted, ChatError> {
    if !is_chat_path(request.uri().path()) {
        return Err(ChatError::NotFound);
    }
    if request.method() != Method::POST {
        return Err(ChatError::MethodNotAllowed);
    }
    let now = state.clock.unix_s();
    let user = state
        .verifier
        .verify_request(request.headers(), now)
        .await?;
    let body = request.body().as_ref();
    if body.len() > state.config.max_body_bytes {
        return Err(ChatError::BodyTooLarge(state.config.max_body_bytes));
    }
    if !shared::lambda::has_json_body(request.headers()) {
        return Err(ChatError::UnsupportedMediaType);
    }
    let wire::Parsed { chat, wire, fresh } =
        wire::parse(request.uri().path(), body, &state.config.limits)
            .map_err(ChatError::Invalid)?;
    let messages = chat.upstream_messages(&state.config.system_prompt);
    let cache_key = if state.config.cache_ttl_s > 0 {
        cache_key::cache_key(&chat.upstream(&messages))
    } else {
        None
    };
    // A fresh answer (a regenerate) is not looked up, but it is recorded.
    let lookup = if fresh { None } else { cache_key.as_deref() };
    let mut limits = state.config.budgets.limits(
        user.is_anonymous,
        state.config.rate_limit_per_min,
        RATE_WINDOW_S,
    );
    if state.llm.is_none() {
        // Rules only: every answer is free, so no budget applies.
        limits.daily_tokens = None;
    }
    // The limits and the cache share one round trip. If the database is down the request is
    // still answered (uncached, unlimited): the chat must never fail for want of bookkeeping.
    let admission = state.store.chat_admit(user.id, lookup, limits).await;
    let cached = match admission {
        Ok(Admission::RateLimited { retry_after }) => {
            return Err(ChatError::RateLimited(retry_after))
        }
        Ok(Admission::BudgetExceeded {
            retry_after,
            used,
            budget,
        }) => {
            tracing::info!(
                used,
                budget,
                anonymous = user.is_anonymous,
                "daily token budget reached"
            );
            return Err(ChatError::BudgetExceeded(retry_after));
        }
        Ok(Admission::UnknownUser) => return Err(ChatError::UnknownUser),
        Ok(Admission::Hit { response }) => Some(response),
        Ok(Admission::Miss) => None,
        Err(e) => {
            metrics.count("StoreErrors", 1);
            tracing::error!(error = %e, "chat admission failed; answering without cache or rate limit");
            None
        }
    };
    Ok(Admitted {
        user: Asker {
            id: user.id,
            anonymous: user.is_anonymous,
        },
        chat,
        messages,
        wire,
        cache_key,
        cached,
    })
}
