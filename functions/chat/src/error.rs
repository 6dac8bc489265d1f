//! Why a chat request was refused, and the one mapping from that to an answer.

use http::StatusCode;
use shared::auth::AuthError;
use shared::error::ApiError;

use crate::conversation::Invalid;
use crate::ratelimit::{Quotas, Refusal};

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
    Invalid(Invalid),
    /// A limit: requests in the window, or the day's tokens; `quotas` for the headers.
    #[error("over a limit")]
    Limited { refusal: Refusal, quotas: Quotas },
    #[error("unknown user")]
    UnknownUser,
    /// The request's worst case alone passes the whole day's budget: no wait would let it in.
    #[error("the conversation exceeds the daily token budget")]
    ExceedsBudget { requested: u64, budget: u64 },
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
            ChatError::UnsupportedMediaType => {
                ApiError::unsupported_media_type("send the body as application/json")
            }
            ChatError::BodyTooLarge(limit) => ApiError::body_too_large(*limit),
            ChatError::Invalid(invalid) => ApiError::new(
                StatusCode::BAD_REQUEST,
                invalid.code,
                invalid.message.clone(),
            ),
            ChatError::Limited { refusal, .. } => {
                let (code, message) = match refusal {
                    Refusal::Requests(_) => {
                        ("rate_limited", "too many chat requests; try again shortly")
                    }
                    Refusal::Tokens { budget, requested }
                        if budget.spent.saturating_add(*requested) <= budget.budget =>
                    {
                        (
                            "token_budget_exceeded",
                            "your answers in progress hold the rest of today's chat allowance; \
                             try again when they finish",
                        )
                    }
                    Refusal::Tokens { .. } => (
                        "token_budget_exceeded",
                        "you have used today's chat allowance; it renews at midnight UTC",
                    ),
                };
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message)
                    .retry_after(refusal.retry_after())
                    .details(refusal.details())
            }
            ChatError::ExceedsBudget { requested, budget } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "conversation_exceeds_budget",
                format!(
                    "this conversation can cost up to {requested} tokens (its prompt and the \
                     answer's cap), more than the whole daily allowance of {budget}; shorten it \
                     or ask for a shorter answer (max_tokens)"
                ),
            )
            .details(exceeds_details(*requested, *budget)),
            ChatError::UnknownUser => ApiError::new(
                StatusCode::FORBIDDEN,
                "unknown_user",
                "the token's user does not exist in this project",
            ),
        }
    }
}

/// The fields a `conversation_exceeds_budget` body adds: no `retry_after_s`, since no wait helps.
fn exceeds_details(requested: u64, budget: u64) -> serde_json::Map<String, serde_json::Value> {
    let mut map = serde_json::Map::new();
    map.insert("limit".into(), "tokens".into());
    map.insert("quota".into(), budget.into());
    map.insert("window".into(), "utc_day".into());
    map.insert("requested".into(), requested.into());
    map
}
