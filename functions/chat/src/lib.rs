//! The chat endpoint (`/api/llm/chat`): an answer always, at a cost that never passes the
//! user's budget.
//!
//! A request's trip, in the order [`handle`] makes it:
//! 1. [`admit`]: path, token, body (the protocol is read by [`wire`]: `wire/openai.rs` or
//!    `wire/ui.rs`), then one round trip for the request limit, the cache and the reservation of
//!    the request's worst case against the user's UTC day;
//! 2. a cache hit is answered at once, free ([`respond`]);
//! 3. [`upstream`]: the first model under the retry loop, then the fallback model, each further
//!    attempt covered by extending the reservation first, every attempt that reached the
//!    upstream charged;
//! 4. the answer: whole ([`respond`]) or relayed chunk by chunk ([`relay`]), or the rule engine
//!    when no model answered ([`rules`]);
//! 5. [`settle`]: the reservation replaced by what was charged, the answer cached (the second
//!    round trip).
//!
//! Nothing below calls back into this file: the modules form a tree under [`handle`].

pub mod admit;
pub mod budget;
pub mod cache_key;
pub mod config;
pub mod conversation;
pub mod error;
pub mod meta;
pub mod ratelimit;
mod relay;
mod respond;
pub mod rules;
mod settle;
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
pub use conversation::CapField;
pub use error::ChatError;
pub use respond::{CHARGED_HEADER, FALLBACK_HEADER, SOURCE_HEADER};

use admit::{admit, Admitted};
use meta::{Meta, Source};
use settle::Cacheable;
use upstream::{Ledger, Outcome};
use wire::Whole;

/// The route name in logs.
pub const ROUTE: &str = "chat";

/// Everything a request needs, built once per cold start.
#[derive(Debug)]
pub struct State {
    pub config: Config,
    pub store: Store,
    /// `None`: rules only.
    pub llm: Option<LlmClient>,
    /// The second model's client, name and cap field (`LLM_FALLBACK_*`).
    pub fallback: Option<(LlmClient, String, CapField)>,
    pub verifier: Verifier,
    pub metrics: Metrics,
    /// The wall clock (token times, the invocation's deadline, the limits' and budget's time).
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
        let fallback = match &config.fallback {
            Some(f) => Some((
                LlmClient::new(&f.base_url, f.key.clone()).map_err(|e| e.to_string())?,
                f.model.clone(),
                f.cap_field,
            )),
            None => None,
        };
        Ok(Self {
            verifier: Verifier::new(config.auth.clone()),
            config,
            store,
            llm,
            fallback,
            metrics,
            clock: Clock::system(),
        })
    }
}

/// Handles one request. Non-streamed answers are complete when this returns; streamed ones
/// finish in a task that also settles the request and writes its log and metrics lines.
pub async fn handle(state: Arc<State>, request: Request) -> Response<StreamBody> {
    let mut context = RequestContext::start(&state.metrics, shared::lambda::request_id(&request));
    context.metrics.count("Requests", 1);
    if wire::ui::is_resume_probe(request.method(), request.uri().path()) {
        context.finish(204, "no_stream_to_resume").await;
        return wire::ui::no_stream_to_resume();
    }
    let deadline = deadline_for(&request, &state.config, state.clock);

    let admitted = match admit(&state, &request, deadline, &mut context.metrics).await {
        Ok(admitted) => admitted,
        Err(error) => return refuse(error, context).await,
    };
    let Admitted {
        user,
        chat,
        messages,
        wire,
        cache_key,
        cached,
        quotas,
        reservation,
        store_down,
    } = admitted;
    let now = state.clock.unix_s();

    if let Some(cached) = cached {
        context.metrics.count("CacheHits", 1);
        context.metrics.count("TokensCharged", 0);
        let content = cached["content"].as_str().unwrap_or_default();
        let finish_reason = cached["finish_reason"].as_str().unwrap_or("stop");
        let meta = Meta::new(&chat.model, Source::Cache, None, now);
        let answer = Whole {
            content,
            finish_reason,
            usage: None,
            charged: 0,
        };
        let response = respond::whole(wire, &meta, &quotas, answer);
        done(context, &meta).await;
        return response;
    }

    let mut ledger = Ledger::new(user, reservation);
    let outcome = if store_down && quotas.budget_policy.is_some() {
        // No reservation could be made: the budget cannot be kept, so no model is asked.
        ledger.reason = Some("store_unavailable");
        Outcome::Failed
    } else {
        upstream::ask(
            &state,
            &chat,
            &messages,
            deadline,
            &mut ledger,
            &mut context.metrics,
        )
        .await
    };
    let reason = |source: Source| match source {
        Source::Llm => None,
        _ => ledger.reason.map(str::to_owned),
    };

    match outcome {
        Outcome::Complete {
            source,
            model,
            completion,
        } => {
            ledger.charges.attempt(
                &messages,
                chat.max_tokens,
                completion.usage,
                budget::Ended::Complete(&completion.content),
                false,
            );
            let meta = Meta::new(&model, source, reason(source), now);
            let cacheable = cache_key
                .as_deref()
                .filter(|_| source == Source::Llm)
                .filter(|_| completion.finish_reason == "stop" && !completion.content.is_empty())
                .map(|key| Cacheable {
                    key,
                    content: &completion.content,
                    finish_reason: &completion.finish_reason,
                    usage: completion.usage,
                });
            settle::settle(&state, &ledger, source, cacheable, &mut context.metrics).await;
            let answer = Whole {
                content: &completion.content,
                finish_reason: &completion.finish_reason,
                usage: completion.usage,
                charged: ledger.charges.total(),
            };
            let response = respond::whole(wire, &meta, &quotas, answer);
            done(context, &meta).await;
            response
        }
        Outcome::Stream {
            source,
            model,
            first,
            stream,
        } => {
            let meta = Meta::new(&model, source, reason(source), now);
            let (tx, body) = StreamBody::channel(32);
            let response = respond::stream(wire, &meta, &quotas, body);
            let task = relay::StreamTask {
                state: state.clone(),
                ledger,
                messages,
                max_tokens: chat.max_tokens,
                cache_key,
                wire,
                meta,
                deadline,
                context,
            };
            tokio::spawn(task.run(first, stream, tx));
            response
        }
        Outcome::Failed => {
            let reason = ledger.reason.unwrap_or("timeout");
            let answer = state.config.rules.answer(chat.last_user_text());
            context.metrics.count_by("Fallbacks", "Reason", reason, 1);
            tracing::info!(
                request_id = context.request_id,
                reason,
                rule = answer.rule,
                "answered from rules"
            );
            // Failed attempts are paid for, and the reservation released.
            settle::settle(&state, &ledger, Source::Rules, None, &mut context.metrics).await;
            let meta = Meta::new(&chat.model, Source::Rules, Some(reason.to_owned()), now);
            let whole = Whole {
                content: answer.reply,
                finish_reason: "stop",
                usage: None::<Usage>,
                charged: ledger.charges.total(),
            };
            let response = respond::whole(wire, &meta, &quotas, whole);
            done(context, &meta).await;
            response
        }
    }
}

/// The answer to a refused request (its 4xx, with `Retry-After` and the limit for a 429).
async fn refuse(error: ChatError, mut context: RequestContext) -> Response<StreamBody> {
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
        ChatError::Limited {
            refusal: ratelimit::Refusal::Requests(_),
            ..
        } => metrics.count("RateLimited", 1),
        ChatError::Limited {
            refusal: ratelimit::Refusal::Tokens { .. },
            ..
        } => metrics.count("BudgetExceeded", 1),
        ChatError::Invalid(i) => metrics.count_by("InvalidRequests", "Code", i.code, 1),
        ChatError::ExceedsBudget { .. } => {
            metrics.count_by("InvalidRequests", "Code", "conversation_exceeds_budget", 1)
        }
        _ => {}
    }
    let api = error.to_api_error();
    let code = api.code;
    let mut response = error_stream(api, &context.request_id);
    match &error {
        ChatError::Auth(_) => {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, shared::auth::www_authenticate());
        }
        ChatError::Limited { quotas, .. } => quotas.insert(response.headers_mut()),
        _ => {}
    }
    context.finish(response.status().as_u16(), code).await;
    response
}

/// Closes a request answered at once, counting the answer by its source.
async fn done(mut context: RequestContext, meta: &Meta) {
    context
        .metrics
        .count_by("Answers", "Source", meta.source.as_str(), 1);
    context.finish(200, meta.source.as_str()).await;
}
