//! Admission: what a request must pass before anything is asked of the LLM (path, method,
//! token, body, the request limit, the cache and the token reservation, the last three in one
//! round trip), and its deadline.

use std::time::{Duration, Instant};

use http::Method;
use lambda_http::{Request, RequestExt};
use serde_json::Value;
use shared::clock::Clock;
use shared::llm::Message;
use shared::store::chat::{Admission, Reserve};
use shared::telemetry::MetricSet;

use crate::conversation::Chat;
use crate::ratelimit::{Quotas, Refusal};
use crate::wire::{self, Wire};
use crate::{budget, cache_key, ChatError, Config, State};

/// The request limit's window.
pub const RATE_WINDOW_S: u32 = 60;
/// Time a settlement is given after the function's own end before a reservation counts in full.
const SETTLE_GRACE: Duration = Duration::from_secs(5);

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

/// A request that passed admission.
pub(crate) struct Admitted {
    pub user: Asker,
    pub chat: Chat,
    /// The messages sent upstream (the server's system prompt first).
    pub messages: Vec<Message>,
    pub wire: Wire,
    pub cache_key: Option<String>,
    pub cached: Option<Value>,
    /// The limits as admission left them, for the answer's headers.
    pub quotas: Quotas,
    /// The tokens reserved for the first attempt, when a budget applies.
    pub reservation: Option<Reservation>,
    /// The database could not be asked: nothing is limited, reserved or cached.
    pub store_down: bool,
}

/// An open reservation of tokens against the user's day.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reservation {
    pub id: uuid::Uuid,
    /// Tokens held now.
    pub tokens: u64,
    pub budget: u64,
}

/// Who asked, as the bookkeeping needs it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Asker {
    pub id: uuid::Uuid,
    pub anonymous: bool,
}

/// Everything before the answer: path, method, token, body, then one round trip for the request
/// limit, the cache and the reservation of the request's worst case.
pub(crate) async fn admit(
    state: &State,
    request: &Request,
    deadline: Instant,
    metrics: &mut MetricSet,
) -> Result<Admitted, ChatError> {
    if !is_chat_path(request.uri().path()) {
        return Err(ChatError::NotFound);
    }
    if request.method() != Method::POST {
        return Err(ChatError::MethodNotAllowed);
    }
    let config = &state.config;
    let user = state
        .verifier
        .verify_request(request.headers(), state.clock.unix_s())
        .await?;
    let body = request.body().as_ref();
    if body.len() > config.max_body_bytes {
        return Err(ChatError::BodyTooLarge(config.max_body_bytes));
    }
    if !shared::lambda::has_json_body(request.headers()) {
        return Err(ChatError::UnsupportedMediaType);
    }
    let wire::Parsed { chat, wire, fresh } =
        wire::parse(request.uri().path(), body, &config.limits).map_err(ChatError::Invalid)?;
    let messages = chat.upstream_messages(&config.system_prompt);
    let cache_key = if config.cache_ttl_s > 0 {
        cache_key::cache_key(&chat.upstream(&chat.model, &messages, config.cap_field))
    } else {
        None
    };
    // A fresh answer (a regenerate) is not looked up, but it is recorded.
    let lookup = if fresh { None } else { cache_key.as_deref() };
    let mut limits =
        config
            .budgets
            .limits(user.is_anonymous, config.rate_limit_per_min, RATE_WINDOW_S);
    if state.llm.is_none() {
        // Rules only: every answer is free, so no budget applies.
        limits.daily_tokens = None;
    }
    let mut quotas = Quotas {
        policy: Some((limits.per_window, limits.window_s)),
        budget_policy: limits.daily_tokens,
        ..Quotas::default()
    };
    let reserve = Reserve {
        tokens: budget::worst_case(&messages, chat.max_tokens),
        hold_s: hold_for(deadline, config),
    };
    if let Some(budget) = limits.daily_tokens.filter(|b| reserve.tokens > *b) {
        // Refused before the round trip: it would never fit, so it counts against no limit.
        return Err(ChatError::ExceedsBudget {
            requested: reserve.tokens,
            budget,
        });
    }
    let admission = state
        .store
        .chat_admit(user.id, lookup, limits, reserve, state.clock.unix_ms())
        .await;
    let (cached, reservation, store_down) = match admission {
        Ok(Admission::RateLimited { rate }) => {
            quotas.rate = Some(rate);
            let refusal = Refusal::Requests(rate);
            return Err(ChatError::Limited { refusal, quotas });
        }
        Ok(Admission::BudgetExceeded {
            budget,
            requested,
            rate,
        }) => {
            quotas.rate = Some(rate);
            quotas.budget = Some(budget);
            tracing::info!(
                spent = budget.spent,
                reserved = budget.reserved,
                requested,
                budget = budget.budget,
                anonymous = user.is_anonymous,
                "daily token budget reached"
            );
            let refusal = Refusal::Tokens { budget, requested };
            return Err(ChatError::Limited { refusal, quotas });
        }
        Ok(Admission::UnknownUser) => return Err(ChatError::UnknownUser),
        Ok(Admission::Hit {
            response,
            rate,
            budget,
        }) => {
            quotas.rate = Some(rate);
            quotas.budget = budget;
            (Some(response), None, false)
        }
        Ok(Admission::Miss {
            rate,
            budget,
            reservation,
        }) => {
            quotas.rate = Some(rate);
            quotas.budget = budget;
            let reservation =
                reservation
                    .zip(limits.daily_tokens)
                    .map(|(id, budget)| Reservation {
                        id,
                        tokens: reserve.tokens,
                        budget,
                    });
            (None, reservation, false)
        }
        Err(e) => {
            metrics.count("StoreErrors", 1);
            tracing::error!(error = %e, "chat admission failed: no cache, limit or reservation");
            (None, None, true)
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
        quotas,
        reservation,
        store_down,
    })
}

/// How long a reservation stays open without a settlement: the request's time left, the reserve
/// kept before the function's timeout, and a grace for the settlement's own round trip. After
/// that the function cannot be running any more, and the reservation counts as spent in full.
fn hold_for(deadline: Instant, config: &Config) -> u32 {
    let hold =
        deadline.saturating_duration_since(Instant::now()) + config.deadline_reserve + SETTLE_GRACE;
    u32::try_from(hold.as_secs() + 1).unwrap_or(u32::MAX)
}
