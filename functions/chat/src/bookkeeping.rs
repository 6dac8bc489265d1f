//! The bookkeeping of an LLM answer: the cache and the user's token count for the day.

use serde_json::json;
use shared::llm::{Message, Usage};
use shared::store::chat::Recorded;
use shared::telemetry::MetricSet;

use crate::admit::Asker;
use crate::{budget, State};

/// Caches a complete answer and adds its tokens to the user's day: the upstream's count, or an
/// estimate when it reported none (the budget must still see the spend).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn record(
    state: &State,
    user: Asker,
    cache_key: Option<&str>,
    prompt: &[Message],
    content: &str,
    finish_reason: &str,
    usage: Option<Usage>,
    metrics: &mut MetricSet,
) {
    let counted = usage.unwrap_or_else(|| {
        metrics.count("UsageEstimated", 1);
        tracing::warn!("the upstream reported no token usage; counting an estimate");
        budget::estimate(prompt, content)
    });
    metrics.count("PromptTokens", u64::from(counted.prompt_tokens));
    metrics.count("CompletionTokens", u64::from(counted.completion_tokens));
    // Only complete answers are cached.
    let cacheable = finish_reason == "stop" && !content.is_empty();
    let cached = json!({"content": content, "finish_reason": finish_reason, "usage": usage});
    let recorded = Recorded {
        cache_key,
        cache: cacheable.then_some((&cached, state.config.cache_ttl_s)),
        llm: true,
        prompt_tokens: Some(counted.prompt_tokens),
        completion_tokens: Some(counted.completion_tokens),
        usage_estimated: usage.is_none(),
        anonymous: user.anonymous,
    };
    if let Err(e) = state.store.chat_record(user.id, &recorded).await {
        metrics.count("StoreErrors", 1);
        tracing::error!(error = %e, "could not record the chat answer");
    }
}
