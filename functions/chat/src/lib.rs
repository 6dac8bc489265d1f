//! The chat endpoint (`/api/llm/chat`): OpenAI Chat Completions on the wire, an answer always.
//!
//! Every request is answered within its deadline: by the LLM (`OPENAI_BASE_URL`, per-attempt
//! timeout, at most `LLM_MAX_RETRIES` retries with backoff while the deadline allows), by the
//! per-user cache, or by the rule engine when the LLM fails for good or is not configured. The
//! source is in the `x-chat-source` header and the `x_source` body field.
//!
//! The same URL speaks the AI SDK's UI message stream to `useChat` bodies (`ui_request`,
//! `ui_stream`): the body decides, everything before the answer's bytes is shared (`wire`).
//!
//! The flow is here; each step has its module: `admit` (path, token, body, limits, cache),
//! `upstream` (the LLM under the retry loop), `respond` (whole answers), `relay` (streamed
//! answers), `bookkeeping` (cache and token counts).

pub mod admit;
mod bookkeeping;
pub mod budget;
pub mod cache_key;
pub mod config;
pub mod error;
mod relay;
pub mod reply;
pub mod request;
mod respond;
pub mod rules;
pub mod ui_request;
pub mod ui_stream;
mod upstream;
pub mod wire;

use std::sync::Arc;

use http::{header, Response};
use lambda_http::Request;
use shared::auth::Verifier;
use shared::clock::Clock;
use shared::lambda::{error_stream, StreamBody};
use shared::llm::{LlmClient, Usage};
use shared::store::Store;
use shared::telemetry::{Metrics, RequestContext};

pub use admit::deadline_for;
pub use config::Config;
pub use error::ChatError;

use admit::{admit, Admitted};
use reply::{Meta, Source};
use request::Chat;
use respond::{sse_response, whole_answer};
use upstream::with_retries;
use wire::Wire;

/// The route name in logs.
pub const ROUTE: &str = "chat";
/// Header naming the answer's source.
pub const SOURCE_HEADER: &str = "x-chat-source";
/// Header naming why the rules answered.
pub const FALLBACK_HEADER: &str = "x-chat-fallback-reason";

/// Everything a request needs, built once per cold start.
#[derive(Debug)]
pub struct State {
    pub config: Config,
    pub store: Store,
    /// `None`: rules only.
    pub llm: Option<LlmClient>,
    pub verifier: Verifier,
    pub metrics: Metrics,
    /// The wall clock (token times, the invocation's deadline).
    pub clock: Clock,
}

impl State {
    /// Builds the clients (connections open lazily) and metrics on stdout.
    pub fn new(config: Config) -> Result<Self, String> {
        let store = Store::from_config(&config.store).map_err(|e| e.to_string())?;
        Self::from_parts(config, store, Metrics::stdout(ROUTE))
    }

    /// The state over a given store and metrics sink (tests and benchmarks).
    pub fn from_parts(config: Config, store: Store, metrics: Metrics) -> Result<Self, String> {
        let llm = match &config.openai_key {
            Some(key) => Some(
                LlmClient::new(&config.openai_base_url, key.clone()).map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        Ok(Self {
            verifier: Verifier::new(config.auth.clone()),
            config,
            store,
            llm,
            metrics,
            clock: Clock::system(),
        })
    }
}

/// Handles one request. Non-streamed answers are complete when this returns; streamed ones
/// finish in a task that also writes the request's log and metrics lines.
pub async fn handle(state: Arc<State>, request: Request) -> Response<StreamBody> {
    let mut context = RequestContext::start(&state.metrics, shared::lambda::request_id(&request));
    context.metrics.count("Requests", 1);
    let deadline = deadline_for(&request, &state.config, state.clock);
    if ui_stream::is_resume_probe(request.method(), request.uri().path()) {
        context.finish(204, "no_stream_to_resume").await;
        return ui_stream::no_stream_to_resume();
    }

    let admitted = match admit(&state, &request, &mut context.metrics).await {
        Ok(admitted) => admitted,
        Err(error) => {
            let metrics = &mut context.metrics;
            match &error {
                ChatError::Auth(e) => {
                    metrics.count("AuthFailures", 1);
                    tracing::warn!(
                        request_id = context.request_id,
                        reason = e.code(),
                        "token refused"
                    );
                }
                ChatError::RateLimited(_) => metrics.count("RateLimited", 1),
                ChatError::BudgetExceeded(_) => metrics.count("BudgetExceeded", 1),
                ChatError::Invalid(i) => metrics.count_by("InvalidRequests", "Code", i.code, 1),
                _ => {}
            }
            let api = error.to_api_error();
            let code = api.code;
            let mut response = error_stream(api, &context.request_id);
            if matches!(error, ChatError::Auth(_)) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, shared::auth::www_authenticate());
            }
            context.finish(response.status().as_u16(), code).await;
            return response;
        }
    };

    let Admitted {
        user,
        chat,
        messages,
        wire,
        cache_key,
        cached,
    } = admitted;
    if let Some(cached) = cached {
        context.metrics.count("CacheHits", 1);
        let content = cached["content"].as_str().unwrap_or_default().to_owned();
        let finish_reason = cached["finish_reason"]
            .as_str()
            .unwrap_or("stop")
            .to_owned();
        let usage = serde_json::from_value::<Usage>(cached["usage"].clone()).ok();
        let meta = Meta::new(&chat.model, Source::Cache, None, state.clock.unix_s());
        let response = whole_answer(wire, &chat, &meta, &content, &finish_reason, usage);
        done(context, &meta).await;
        return response;
    }

    let Some(llm) = state.llm.clone() else {
        return rules_answer(&state, wire, &chat, "no_api_key", context).await;
    };
    let upstream = chat.upstream(&messages);

    if !chat.stream {
        let config = &state.config;
        let result = with_retries(config, deadline, &mut context.metrics, |left| {
            llm.complete(&upstream, config.timeout.min(left))
        })
        .await;
        return match result {
            Ok(completion) => {
                let meta = Meta::new(&chat.model, Source::Llm, None, state.clock.unix_s());
                bookkeeping::record(
                    &state,
                    user,
                    cache_key.as_deref(),
                    &messages,
                    &completion.content,
                    &completion.finish_reason,
                    completion.usage,
                    &mut context.metrics,
                )
                .await;
                let response = whole_answer(
                    wire,
                    &chat,
                    &meta,
                    &completion.content,
                    &completion.finish_reason,
                    completion.usage,
                );
                done(context, &meta).await;
                response
            }
            Err(error) => rules_answer(&state, wire, &chat, error.class(), context).await,
        };
    }

    let config = &state.config;
    let opened = with_retries(config, deadline, &mut context.metrics, |left| {
        llm.open_stream(&upstream, config.first_token_timeout.min(left))
    })
    .await;
    let (first, stream) = match opened {
        Ok(opened) => opened,
        Err(error) => return rules_answer(&state, wire, &chat, error.class(), context).await,
    };
    let meta = Meta::new(&chat.model, Source::Llm, None, state.clock.unix_s());
    let (tx, body) = StreamBody::channel(32);
    let response = match wire {
        Wire::UiStream => ui_stream::response(&meta, body),
        Wire::OpenAi { .. } => sse_response(&meta, body),
    };
    let task = relay::StreamTask {
        state: state.clone(),
        user,
        messages,
        cache_key,
        wire,
        meta,
        deadline,
        context,
    };
    tokio::spawn(task.run(first, stream, tx));
    response
}

/// The rule engine's answer, when the LLM is not configured or failed for good (`reason`).
async fn rules_answer(
    state: &State,
    wire: Wire,
    chat: &Chat,
    reason: &str,
    mut context: RequestContext,
) -> Response<StreamBody> {
    let answer = state.config.rules.answer(chat.last_user_text());
    context.metrics.count_by("Fallbacks", "Reason", reason, 1);
    tracing::info!(
        request_id = context.request_id,
        reason,
        rule = answer.rule,
        "answered from rules"
    );
    let meta = Meta::new(
        &chat.model,
        Source::Rules,
        Some(reason.to_owned()),
        state.clock.unix_s(),
    );
    let response = whole_answer(wire, chat, &meta, answer.reply, "stop", None);
    done(context, &meta).await;
    response
}

/// Closes a request answered at once, counting the answer by its source.
async fn done(mut context: RequestContext, meta: &Meta) {
    context
        .metrics
        .count_by("Answers", "Source", meta.source.as_str(), 1);
    context.finish(200, meta.source.as_str()).await;
}
