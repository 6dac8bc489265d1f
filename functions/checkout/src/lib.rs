//! Stripe Checkout for the full report (`/api/pay/checkout`).
//!
//! NOT IMPLEMENTED YET: every request is answered 501 with a JSON error saying so. The real
//! handler is tracked in its own issue; this crate exists so the workspace, the deployment
//! template and the frontend's routes are complete from the start.

use std::time::Instant;

use http::{Response, StatusCode};
use lambda_http::{Body, Request};
use shared::error::ApiError;

/// The route name in logs.
pub const ROUTE: &str = "checkout";

/// Answers 501 `not_implemented`.
pub async fn handle(request: Request) -> Response<Body> {
    let started = Instant::now();
    let request_id = shared::lambda::request_id(&request);
    let response = ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "the checkout function is not implemented yet",
    )
    .into_response(&request_id);
    shared::telemetry::log_request(
        ROUTE,
        501,
        started.elapsed(),
        &request_id,
        "not_implemented",
    );
    response
}
