//! Settlement: when a request ends (answered, failed, timed out, client gone, function about to
//! time out), its reservation is replaced by what its attempts were charged, and a complete
//! answer of the first model is cached. One round trip, the request's second.

use serde_json::json;
use shared::llm::Usage;
use shared::store::chat::{SettledSource, Settlement};
use shared::telemetry::MetricSet;

use crate::meta::Source;
use crate::upstream::Ledger;
use crate::State;

/// A complete answer worth caching.
pub(crate) struct Cacheable<'a> {
    pub key: &'a str,
    pub content: &'a str,
    pub finish_reason: &'a str,
    pub usage: Option<Usage>,
}

/// Settles the request. Nothing to do when it reserved nothing and reached no upstream.
pub(crate) async fn settle(
    state: &State,
    ledger: &Ledger,
    source: Source,
    cacheable: Option<Cacheable<'_>>,
    metrics: &mut MetricSet,
) {
    let charges = ledger.charges;
    metrics.count("UpstreamAttempts", u64::from(charges.attempts));
    if charges.failed > 0 {
        metrics.count("FailedAttempts", u64::from(charges.failed));
    }
    metrics.count("PromptTokens", charges.prompt_tokens);
    metrics.count("CompletionTokens", charges.completion_tokens);
    metrics.count("TokensCharged", charges.total());
    if charges.estimated {
        metrics.count("UsageEstimated", 1);
        tracing::warn!("the upstream reported no token usage for an attempt; charging an estimate");
    }
    if ledger.reservation.is_some() && charges.total() > ledger.reserved() {
        // Only an upstream that ignores max_tokens, or a tokenizer making tokens of less than a
        // byte, gets here: the charge is recorded as reported all the same.
        metrics.count("ReservationExceeded", 1);
        tracing::warn!(
            charged = charges.total(),
            reserved = ledger.reserved(),
            "an answer cost more than its reservation"
        );
    }
    if ledger.reservation.is_none() && charges.attempts == 0 {
        return;
    }
    let cached = cacheable
        .as_ref()
        .map(|c| json!({"content": c.content, "finish_reason": c.finish_reason, "usage": c.usage}));
    let settlement = Settlement {
        reservation: ledger.reservation.map(|r| r.id),
        cache_key: cacheable.as_ref().map(|c| c.key),
        cache: cached.as_ref().map(|c| (c, state.config.cache_ttl_s)),
        source: match source {
            Source::Llm => SettledSource::Llm,
            Source::Fallback => SettledSource::Fallback,
            Source::Cache | Source::Rules => SettledSource::Rules,
        },
        prompt_tokens: charges.prompt_tokens,
        completion_tokens: charges.completion_tokens,
        attempts: charges.attempts,
        failed_attempts: charges.failed,
        usage_estimated: charges.estimated,
        anonymous: ledger.user.anonymous,
    };
    match state
        .store
        .chat_settle(ledger.user.id, &settlement, state.clock.unix_ms())
        .await
    {
        Ok(settled) if !settled.settled => {
            metrics.count("LateSettlements", 1);
            tracing::warn!("the reservation had expired and was counted in full");
        }
        Ok(_) => {}
        Err(e) => {
            // The reservation stays open and counts in full once it expires.
            metrics.count("StoreErrors", 1);
            tracing::error!(error = %e, "could not settle the chat request");
        }
    }
}
