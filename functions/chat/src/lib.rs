//! The chat endpoint (`/api/llm/chat`): OpenAI Chat Completions on the wire, an answer always.
//!
//! Every request is answered within its deadline: by the LLM (`OPENAI_BASE_URL`, per-attempt
//! timeout, at most `LLM_MAX_RETRIES` retries with backoff while the deadline allows), by the
//! per-user cache, or by the rule engine when the LLM fails for good or is not configured. The
//! source is in the `x-chat-source` header and the `x_source` body field.
//!
//! The same URL speaks the AI SDK's UI message stream to `useChat` bodies (`ui_request`,
//! `ui_stream`): the body decides, everything before the answer's bytes is shared (`wire`).

pub mod budget;
pub mod cache_key;
pub mod reply;
pub mod request;
pub mod rules;
pub mod ui_request;
pub mod ui_stream;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{header, HeaderValue, Method, Response, StatusCode};
use lambda_http::{Request, RequestExt};
use serde_json::{json, Value};
use shared::auth::{AuthConfig, AuthError, Verifier};
use shared::config::{self, ConfigError, EnvReader, Secret, StoreConfig};
use shared::error::ApiError;
use shared::lambda::{error_stream, StreamBody};
use shared::llm::{self, sse::Event, LlmClient, LlmError, Message, Usage};
use shared::retry::RetryPolicy;
use shared::store::chat::{Admission, Recorded};
use shared::store::Store;
use shared::telemetry::{self, MetricSet, Metrics};

use budget::Budgets;
use reply::{Meta, Source};
use request::{Chat, Limits};
use rules::RuleBook;
use wire::Wire;

/// The route name in logs.
pub const ROUTE: &str = "chat";
/// Header naming the answer's source.
pub const SOURCE_HEADER: &str = "x-chat-source";
/// Header naming why the rules answered.
pub const FALLBACK_HEADER: &str = "x-chat-fallback-reason";
const RATE_WINDOW_S: u32 = 60;
/// An attempt with less time than this left is not started.
const MIN_ATTEMPT: Duration = Duration::from_millis(250);

/// The chat function's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub store: StoreConfig,
    pub auth: AuthConfig,
    /// `None`: rules only (no `OPENAI_API_KEY`).
    pub openai_key: Option<Secret>,
    pub openai_base_url: String,
    pub timeout: Duration,
    pub max_retries: u32,
    pub backoff: RetryPolicy,
    pub first_token_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_budget: Duration,
    pub deadline_reserve: Duration,
    pub limits: Limits,
    pub system_prompt: String,
    pub rate_limit_per_min: u32,
    /// Token budgets and the limits of anonymous sessions.
    pub budgets: Budgets,
    pub cache_ttl_s: u32,
    pub max_body_bytes: usize,
    pub rules: RuleBook,
}

/// The stream idle timeout's default, shortened to `LLM_TIMEOUT_MS` when that is smaller.
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 15_000;

const DEFAULT_SYSTEM_PROMPT: &str =
    "You are the helpful assistant of this app. Answer briefly and \
in the language of the user. For payments and accounts, point users to the app's own pages.";

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::read(EnvReader::from_env())
    }

    /// Reads through `env`.
    pub fn read(mut env: EnvReader<'_>) -> Result<Self, ConfigError> {
        let app_env = env.app_env();
        let store = StoreConfig::read(&mut env, app_env);
        shared::http_client::check_extra_roots(&mut env);
        let auth = config::read_auth(&mut env, app_env);
        let openai_key = env.optional("OPENAI_API_KEY").map(Secret::new);
        let rules_only = env.parsed("CHAT_RULES_ONLY", false, "true or false", |v| {
            v.parse().ok()
        });
        if app_env.is_production() && openai_key.is_none() && !rules_only {
            env.problem(
                "OPENAI_API_KEY",
                "is required when APP_ENV=production (or set CHAT_RULES_ONLY=true to answer from rules only)",
            );
        }
        let openai_base_url = env
            .optional("OPENAI_BASE_URL")
            .unwrap_or_else(|| "https://api.openai.com/v1".into());
        if !openai_base_url.starts_with("http://") && !openai_base_url.starts_with("https://") {
            env.problem("OPENAI_BASE_URL", "must be an http(s) URL");
        }
        let timeout = Duration::from_millis(env.integer("LLM_TIMEOUT_MS", 30_000, 100..=600_000));
        let max_retries = env.integer("LLM_MAX_RETRIES", 2, 0..=5) as u32;
        // Neither stream timeout waits longer than LLM_TIMEOUT_MS unless configured on purpose.
        let timeout_ms = timeout.as_millis() as u64;
        let first_token_timeout = Duration::from_millis(env.integer(
            "LLM_FIRST_TOKEN_TIMEOUT_MS",
            timeout_ms,
            100..=600_000,
        ));
        let idle_timeout = Duration::from_millis(env.integer(
            "LLM_STREAM_IDLE_TIMEOUT_MS",
            DEFAULT_IDLE_TIMEOUT_MS.min(timeout_ms),
            100..=600_000,
        ));
        let total_budget =
            Duration::from_millis(env.integer("LLM_TOTAL_BUDGET_MS", 55_000, 500..=900_000));
        let deadline_reserve =
            Duration::from_millis(env.integer("CHAT_DEADLINE_RESERVE_MS", 1500, 0..=60_000));
        let default_model = env
            .optional("LLM_MODEL")
            .unwrap_or_else(|| "gpt-4o-mini".into());
        let mut models: Vec<String> = env
            .optional("LLM_MODELS")
            .map(|v| {
                v.split(',')
                    .map(|m| m.trim().to_owned())
                    .filter(|m| !m.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if !models.contains(&default_model) {
            models.insert(0, default_model.clone());
        }
        let limits = Limits {
            max_messages: env.integer("CHAT_MAX_MESSAGES", 50, 1..=1000) as usize,
            max_message_chars: env.integer("CHAT_MAX_MESSAGE_CHARS", 8000, 1..=1_000_000) as usize,
            max_total_chars: env.integer("CHAT_MAX_TOTAL_CHARS", 32_000, 1..=4_000_000) as usize,
            max_tokens: env.integer("CHAT_MAX_TOKENS", 1024, 1..=128_000) as u32,
            allow_client_system: env.parsed(
                "CHAT_ALLOW_CLIENT_SYSTEM",
                false,
                "true or false",
                |v| v.parse().ok(),
            ),
            models,
            default_model,
        };
        let system_prompt = env
            .optional("CHAT_SYSTEM_PROMPT")
            .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.into());
        let rate_limit_per_min = env.integer("CHAT_RATE_LIMIT_PER_MIN", 20, 1..=100_000) as u32;
        let budgets = Budgets::read(&mut env);
        let cache_ttl_s = env.integer("CHAT_CACHE_TTL_S", 3600, 0..=30 * 86_400) as u32;
        let max_body_bytes =
            env.integer("CHAT_MAX_BODY_BYTES", 256 * 1024, 1024..=6 << 20) as usize;
        let rules = match env.optional("CHAT_RULES_PATH") {
            None => RuleBook::embedded(),
            Some(path) => match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| RuleBook::parse(&t))
            {
                Ok(book) => book,
                Err(why) => {
                    env.problem(
                        "CHAT_RULES_PATH",
                        format!("is not a usable rules file ({why})"),
                    );
                    RuleBook::embedded()
                }
            },
        };
        let config = store.map(|store| Config {
            store,
            auth,
            openai_key,
            openai_base_url,
            timeout,
            max_retries,
            backoff: RetryPolicy {
                max_retries,
                initial_delay: Duration::from_millis(500),
                max_delay: Duration::from_secs(4),
            },
            first_token_timeout,
            idle_timeout,
            total_budget,
            deadline_reserve,
            limits,
            system_prompt,
            rate_limit_per_min,
            budgets,
            cache_ttl_s,
            max_body_bytes,
            rules,
        });
        env.finish_required(config, "DATABASE_URL")
    }
}

/// Everything a request needs, built once per cold start.
#[derive(Debug)]
pub struct State {
    pub config: Config,
    pub store: Store,
    pub llm: Option<LlmClient>,
    pub verifier: Verifier,
    pub metrics: Metrics,
}

impl State {
    /// Builds the clients (connections open lazily) and metrics on stdout.
    pub fn new(config: Config) -> Result<Self, String> {
        let store = Store::from_config(&config.store).map_err(|e| e.to_string())?;
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
            metrics: Metrics::new(ROUTE, telemetry::MetricsSink::Stdout),
        })
    }
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no such path")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("unsupported content type")]
    UnsupportedMediaType,
    #[error("body too large")]
    BodyTooLarge(usize),
    #[error("invalid request: {}", .0.message)]
    Invalid(request::Invalid),
    #[error("rate limited")]
    RateLimited(u64),
    #[error("daily token budget exceeded")]
    BudgetExceeded(u64),
    #[error("unknown user")]
    UnknownUser,
}

impl ChatError {
    /// The one mapping from errors to answers.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            ChatError::Auth(e) => e.to_api_error(),
            ChatError::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "POST to /v1/chat/completions, /chat/completions or /",
            ),
            ChatError::MethodNotAllowed => ApiError::method_not_allowed("POST"),
            ChatError::UnsupportedMediaType => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            ),
            ChatError::BodyTooLarge(limit) => ApiError::body_too_large(*limit),
            ChatError::Invalid(invalid) => ApiError::new(
                StatusCode::BAD_REQUEST,
                invalid.code,
                invalid.message.clone(),
            ),
            ChatError::RateLimited(after) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many chat requests; try again shortly",
            )
            .retry_after(*after),
            ChatError::BudgetExceeded(after) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "token_budget_exceeded",
                "you have used today's chat allowance; it renews at midnight UTC",
            )
            .retry_after(*after),
            ChatError::UnknownUser => ApiError::new(
                StatusCode::FORBIDDEN,
                "unknown_user",
                "the token's user does not exist in this project",
            ),
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// When the answer must be out: the configured budget, shortened by the invocation's own
/// deadline minus a reserve. A deadline in the past or absurdly far (as `cargo lambda watch`
/// sends: a constant in 1970) is ignored.
pub fn deadline_for(request: &Request, config: &Config) -> Instant {
    let mut budget = config.total_budget;
    if let Some(context) = request.lambda_context_ref() {
        let left_ms = i64::try_from(context.deadline)
            .unwrap_or(i64::MAX)
            .saturating_sub(now_ms());
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

struct Admitted {
    user: Asker,
    chat: Chat,
    /// The messages sent upstream (the server's system prompt first).
    messages: Vec<Message>,
    wire: Wire,
    cache_key: Option<String>,
    cached: Option<Value>,
}

/// Who asked, as the bookkeeping needs it.
#[derive(Clone, Copy, Debug)]
struct Asker {
    id: uuid::Uuid,
    anonymous: bool,
}

async fn admit(
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
    let now = now_ms() / 1000;
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

/// Handles one request. Non-streamed answers are complete when this returns; streamed ones
/// finish in a task that also writes the request's log and metrics lines.
pub async fn handle(state: Arc<State>, request: Request) -> Response<StreamBody> {
    let started = Instant::now();
    let request_id = shared::lambda::request_id(&request);
    let mut metrics = state.metrics.start();
    metrics.property("request_id", request_id.as_str());
    metrics.count("Requests", 1);
    let deadline = deadline_for(&request, &state.config);
    if ui_stream::is_resume_probe(request.method(), request.uri().path()) {
        finish(metrics, started, 204, &request_id, "no_stream_to_resume").await;
        return ui_stream::no_stream_to_resume();
    }

    let admitted = match admit(&state, &request, &mut metrics).await {
        Ok(admitted) => admitted,
        Err(error) => {
            match &error {
                ChatError::Auth(e) => {
                    metrics.count("AuthFailures", 1);
                    tracing::warn!(request_id, reason = e.code(), "token refused");
                }
                ChatError::RateLimited(_) => metrics.count("RateLimited", 1),
                ChatError::BudgetExceeded(_) => metrics.count("BudgetExceeded", 1),
                ChatError::Invalid(i) => metrics.count_by("InvalidRequests", "Code", i.code, 1),
                _ => {}
            }
            let api = error.to_api_error();
            let code = api.code;
            let mut response = error_stream(api, &request_id);
            if matches!(error, ChatError::Auth(_)) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, shared::auth::www_authenticate());
            }
            finish(
                metrics,
                started,
                response.status().as_u16(),
                &request_id,
                code,
            )
            .await;
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
        metrics.count("CacheHits", 1);
        let content = cached["content"].as_str().unwrap_or_default().to_owned();
        let finish_reason = cached["finish_reason"]
            .as_str()
            .unwrap_or("stop")
            .to_owned();
        let usage = serde_json::from_value::<Usage>(cached["usage"].clone()).ok();
        let meta = Meta::new(&chat.model, Source::Cache, None);
        let response = whole_answer(wire, &chat, &meta, &content, &finish_reason, usage);
        done(metrics, started, &request_id, &meta).await;
        return response;
    }

    let Some(llm) = state.llm.clone() else {
        return rules_answer(
            &state,
            wire,
            &chat,
            "no_api_key",
            metrics,
            started,
            &request_id,
        )
        .await;
    };
    let upstream = chat.upstream(&messages);

    if !chat.stream {
        let config = &state.config;
        let result = with_retries(config, deadline, &mut metrics, |left| {
            llm.complete(&upstream, config.timeout.min(left))
        })
        .await;
        return match result {
            Ok(completion) => {
                let meta = Meta::new(&chat.model, Source::Llm, None);
                record(
                    &state,
                    user,
                    cache_key.as_deref(),
                    &messages,
                    &completion.content,
                    &completion.finish_reason,
                    completion.usage,
                    &mut metrics,
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
                done(metrics, started, &request_id, &meta).await;
                response
            }
            Err(error) => {
                rules_answer(
                    &state,
                    wire,
                    &chat,
                    error.class(),
                    metrics,
                    started,
                    &request_id,
                )
                .await
            }
        };
    }

    let config = &state.config;
    let opened = with_retries(config, deadline, &mut metrics, |left| {
        llm.open_stream(&upstream, config.first_token_timeout.min(left))
    })
    .await;
    let (first, stream) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            return rules_answer(
                &state,
                wire,
                &chat,
                error.class(),
                metrics,
                started,
                &request_id,
            )
            .await
        }
    };
    let meta = Meta::new(&chat.model, Source::Llm, None);
    let (tx, body) = StreamBody::channel(32);
    let response = match wire {
        Wire::UiStream => ui_stream::response(&meta, body),
        Wire::OpenAi { .. } => sse_response(&meta, body),
    };
    let task = StreamTask {
        state: state.clone(),
        user,
        messages,
        cache_key,
        wire,
        meta,
        deadline,
        metrics,
        started,
        request_id,
    };
    tokio::spawn(task.run(first, stream, tx));
    response
}

/// Calls `attempt` (given the time left) until it succeeds, fails for good, runs out of retries,
/// or the deadline leaves no room for another try.
async fn with_retries<T, F, Fut>(
    config: &Config,
    deadline: Instant,
    metrics: &mut MetricSet,
    mut attempt: F,
) -> Result<T, LlmError>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<T, LlmError>>,
{
    let mut retry = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left < MIN_ATTEMPT {
            return Err(LlmError::Timeout);
        }
        let started = Instant::now();
        let error = match attempt(left).await {
            Ok(value) => {
                metrics.millis("UpstreamLatency", started.elapsed());
                return Ok(value);
            }
            Err(error) => error,
        };
        metrics.count_by("LlmErrors", "Class", error.class(), 1);
        if error == LlmError::Timeout {
            metrics.count("Timeouts", 1);
        }
        if let LlmError::Auth { status } = error {
            metrics.count("UpstreamAuthErrors", 1);
            tracing::error!(status, "the LLM upstream refused OPENAI_API_KEY: configuration error, answering from rules");
        } else {
            tracing::warn!(class = error.class(), retry, "LLM attempt failed");
        }
        if !error.is_retryable() || retry >= config.max_retries {
            return Err(error);
        }
        if error
            .retry_after()
            .is_some_and(|after| after > config.backoff.max_delay)
        {
            return Err(error);
        }
        retry += 1;
        let delay = config
            .backoff
            .delay(retry, shared::retry::jitter(), error.retry_after());
        if delay + MIN_ATTEMPT > deadline.saturating_duration_since(Instant::now()) {
            return Err(error);
        }
        metrics.count("Retries", 1);
        tokio::time::sleep(delay).await;
    }
}

pub(crate) fn with_source(mut response: Response<StreamBody>, meta: &Meta) -> Response<StreamBody> {
    let headers = response.headers_mut();
    headers.insert(
        SOURCE_HEADER,
        HeaderValue::from_static(meta.source.as_str()),
    );
    if let Some(reason) = meta
        .fallback_reason
        .as_deref()
        .and_then(|r| HeaderValue::from_str(r).ok())
    {
        headers.insert(FALLBACK_HEADER, reason);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn sse_response(meta: &Meta, body: StreamBody) -> Response<StreamBody> {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    with_source(response, meta)
}

/// An answer that exists at once (rules, cache, a complete LLM answer), in the format asked for.
fn whole_answer(
    wire: Wire,
    chat: &Chat,
    meta: &Meta,
    content: &str,
    finish_reason: &str,
    usage: Option<Usage>,
) -> Response<StreamBody> {
    if wire == Wire::UiStream {
        let events = ui_stream::whole(meta, content, finish_reason);
        return ui_stream::response(meta, StreamBody::full(events));
    }
    if chat.stream {
        let events = reply::whole_stream(meta, content, finish_reason, usage, chat.include_usage);
        return sse_response(meta, StreamBody::full(events));
    }
    let body = reply::completion(meta, content, finish_reason, usage);
    let mut response = Response::new(StreamBody::full(body.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    with_source(response, meta)
}

async fn rules_answer(
    state: &State,
    wire: Wire,
    chat: &Chat,
    reason: &str,
    mut metrics: MetricSet,
    started: Instant,
    request_id: &str,
) -> Response<StreamBody> {
    let answer = state.config.rules.answer(chat.last_user_text());
    metrics.count_by("Fallbacks", "Reason", reason, 1);
    tracing::info!(
        request_id,
        reason,
        rule = answer.rule,
        "answered from rules"
    );
    let meta = Meta::new(&chat.model, Source::Rules, Some(reason.to_owned()));
    let response = whole_answer(wire, chat, &meta, answer.reply, "stop", None);
    done(metrics, started, request_id, &meta).await;
    response
}

/// Caches a complete answer and adds its tokens to the user's day: the upstream's count, or an
/// estimate when it reported none (the budget must still see the spend).
#[allow(clippy::too_many_arguments)]
async fn record(
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

async fn done(mut metrics: MetricSet, started: Instant, request_id: &str, meta: &Meta) {
    metrics.count_by("Answers", "Source", meta.source.as_str(), 1);
    finish(metrics, started, 200, request_id, meta.source.as_str()).await;
}

/// The end of a request: metrics line, log line, and a Sentry report for a 5xx.
async fn finish(
    metrics: MetricSet,
    started: Instant,
    status: u16,
    request_id: &str,
    outcome: &str,
) {
    telemetry::finish_request(
        metrics,
        "TotalLatency",
        ROUTE,
        status,
        started,
        request_id,
        outcome,
    )
    .await;
}

/// The rest of a streamed LLM answer, relayed chunk by chunk.
struct StreamTask {
    state: Arc<State>,
    user: Asker,
    messages: Vec<Message>,
    cache_key: Option<String>,
    wire: Wire,
    meta: Meta,
    deadline: Instant,
    metrics: MetricSet,
    started: Instant,
    request_id: String,
}

impl StreamTask {
    async fn run(
        mut self,
        first: Vec<Event>,
        mut stream: llm::sse::EventStream,
        tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) {
        let send = |text: String| {
            let tx = tx.clone();
            async move { tx.send(bytes::Bytes::from(text)).await.is_ok() }
        };
        let mut content = String::new();
        let mut finish_reason: Option<String> = None;
        let mut usage = None;
        let mut failure: Option<LlmError> = None;
        let mut open = send(self.wire.opening(&self.meta)).await;
        let mut pending: std::collections::VecDeque<Event> = first.into();
        let idle = self.state.config.idle_timeout;
        while open {
            let event = match pending.pop_front() {
                Some(event) => Some(event),
                None => {
                    let left = self.deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(idle.min(left), stream.next_event()).await {
                        Err(_) => {
                            failure = Some(LlmError::StreamStalled);
                            break;
                        }
                        Ok(Err(e)) => {
                            failure = Some(e);
                            break;
                        }
                        Ok(Ok(event)) => event,
                    }
                }
            };
            match event {
                None | Some(Event::Done) => break,
                Some(Event::Role) => {}
                Some(Event::Delta(text)) => {
                    content.push_str(&text);
                    open = send(self.wire.delta(&self.meta, &text)).await;
                }
                Some(Event::Finish(reason)) => finish_reason = Some(reason),
                Some(Event::Usage(u)) => usage = Some(u),
            }
        }
        let status_outcome = match (&failure, open) {
            (Some(error), true) => {
                self.metrics
                    .count_by("LlmErrors", "Class", error.class(), 1);
                self.metrics.count("StreamInterrupted", 1);
                tracing::warn!(request_id = %self.request_id, class = error.class(), "stream broke after it started");
                send(self.wire.broken(error.class())).await;
                "stream_interrupted"
            }
            (_, false) => {
                self.metrics.count("ClientDisconnects", 1);
                "client_disconnected"
            }
            (None, true) => {
                let reason = finish_reason.as_deref().unwrap_or("stop");
                send(self.wire.closing(&self.meta, reason, usage)).await;
                "llm"
            }
        };
        // Recorded before the body ends: Lambda may freeze the instance once the stream closes.
        let complete = failure.is_none() && open;
        let reason = if complete {
            finish_reason.as_deref().unwrap_or("stop")
        } else {
            "interrupted"
        };
        record(
            &self.state,
            self.user,
            self.cache_key.as_deref(),
            &self.messages,
            &content,
            reason,
            usage,
            &mut self.metrics,
        )
        .await;
        drop(tx);
        self.metrics.count_by("Answers", "Source", "llm", 1);
        finish(
            self.metrics,
            self.started,
            200,
            &self.request_id,
            status_outcome,
        )
        .await;
    }
}
