//! Why a chat request was refused, and the one mapping from that to an answer.

use http::StatusCode;
use shared::auth::AuthError;
use shared::error::ApiError;

use crate::request;

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
            ChatError::UnsupportedMediaType => {
                ApiError::unsupported_media_type("send the body as application/json")
            }
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
