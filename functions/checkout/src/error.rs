//! Why a checkout request was not served, and the one mapping to answers.

use http::StatusCode;
use shared::auth::AuthError;
use shared::error::ApiError;
use shared::store::StoreError;
use shared::stripe::client::StripeError;

use crate::MAX_BODY_BYTES;

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("unsupported content type")]
    UnsupportedMediaType,
    #[error("body too large")]
    BodyTooLarge,
    #[error("invalid body: {1}")]
    InvalidBody(&'static str, String),
    #[error("invalid session id")]
    InvalidSessionId,
    #[error("rate limited")]
    RateLimited(u64),
    #[error("unknown user")]
    UnknownUser,
    #[error("anonymous session")]
    SignInRequired,
    #[error("already paid")]
    AlreadyPaid,
    #[error("payment disputed")]
    PaymentDisputed,
    #[error("payment processing")]
    PaymentProcessing,
    #[error("no order")]
    NotFound,
    #[error("checkout still being created by another request")]
    Busy,
    #[error(transparent)]
    Stripe(#[from] StripeError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CheckoutError {
    /// The one mapping from errors to answers.
    pub fn to_api_error(&self) -> ApiError {
        use StatusCode as S;
        match self {
            CheckoutError::Auth(e) => e.to_api_error(),
            CheckoutError::MethodNotAllowed => ApiError::method_not_allowed("GET, POST"),
            CheckoutError::UnsupportedMediaType => {
                ApiError::unsupported_media_type("send the body as application/json")
            }
            CheckoutError::BodyTooLarge => ApiError::body_too_large(MAX_BODY_BYTES),
            CheckoutError::InvalidBody(code, message) => {
                ApiError::new(S::BAD_REQUEST, code, message.clone())
            }
            CheckoutError::InvalidSessionId => ApiError::new(
                S::BAD_REQUEST,
                "invalid_session_id",
                "session_id must be a Checkout Session id (cs_...)",
            ),
            CheckoutError::RateLimited(after) => ApiError::new(
                S::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many checkout requests; try again shortly",
            )
            .retry_after(*after),
            CheckoutError::UnknownUser => ApiError::new(
                S::FORBIDDEN,
                "unknown_user",
                "the token's user does not exist in this project",
            ),
            // An anonymous account can be lost (signed out, cleared browser) and what it bought
            // with it: buying needs a real account.
            CheckoutError::SignInRequired => ApiError::new(
                S::FORBIDDEN,
                "sign_in_required",
                "sign in with an account before buying; a guest session cannot keep a purchase",
            ),
            CheckoutError::AlreadyPaid => ApiError::new(
                S::CONFLICT,
                "already_paid",
                "you have already bought the full report",
            ),
            CheckoutError::PaymentDisputed => ApiError::new(
                S::CONFLICT,
                "payment_disputed",
                "your payment for the full report is disputed; it unlocks again if the dispute is resolved in your favour",
            ),
            CheckoutError::PaymentProcessing => ApiError::new(
                S::CONFLICT,
                "payment_processing",
                "your payment is being processed; the report unlocks when it completes",
            ),
            CheckoutError::NotFound => ApiError::new(
                S::NOT_FOUND,
                "order_not_found",
                "no such order for this user",
            ),
            CheckoutError::Busy => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "checkout_in_progress",
                "your checkout is still being prepared; try again in a moment",
            )
            .retry_after(2),
            CheckoutError::Stripe(e) if e.is_transient() => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "payment_provider_unavailable",
                "the payment provider is not answering; try again in a moment",
            )
            .retry_after(5),
            CheckoutError::Stripe(_) => ApiError::new(
                S::BAD_GATEWAY,
                "payment_provider_error",
                "the payment provider refused the request; it has been logged",
            ),
            CheckoutError::Store(StoreError::Unavailable(_)) => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the database is not answering; try again in a moment",
            )
            .retry_after(5),
            CheckoutError::Store(_) => ApiError::internal(),
        }
    }
}
