//! `GET ?session_id=` (or the user's latest order): the order's status for the success page.
//! While it is pending or processing, the session is read at Stripe and, once finished, stored
//! through the payments' sync path, so the page shows `paid` before the webhook arrives.

use lambda_http::Request;
use serde::Serialize;
use shared::store::orders::Status;
use shared::stripe::ids::SessionId;
use shared::telemetry::MetricSet;

use crate::session::{retrieve, sync};
use crate::{request, CheckoutError, State, RATE_WINDOW_S};
use shared::stripe::events::SessionStatus;

/// The answer to `GET`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct StatusAnswer {
    pub order_id: uuid::Uuid,
    /// `pending | paid | expired | failed | refunded | disputed`.
    pub status: &'static str,
    pub session_id: Option<String>,
    pub paid_at: Option<i64>,
}

/// Handles `GET`.
pub async fn get(
    state: &State,
    request: &Request,
    now: i64,
    metrics: &mut MetricSet,
) -> Result<StatusAnswer, CheckoutError> {
    let user = state
        .verifier
        .verify_request(request.headers(), now)
        .await?;
    let session_id = request::session_id_param(request)?;
    let status = state
        .store
        .checkout_status(
            user.id,
            session_id.as_ref().map(SessionId::as_str),
            state.config.status_rate_limit_per_min,
            RATE_WINDOW_S,
        )
        .await?;
    let mut order = match status {
        Status::RateLimited { retry_after } => return Err(CheckoutError::RateLimited(retry_after)),
        Status::NotFound => return Err(CheckoutError::NotFound),
        Status::Found { order } => order,
    };
    if let (true, Some(id)) = (order.status.is_open(), order.session_id.clone()) {
        // A poll never fails because Stripe does: the stored state is still an answer.
        match refresh(state, &id, metrics).await {
            Ok(true) => {
                let again = state
                    .store
                    .checkout_status(user.id, Some(&id), u32::MAX, RATE_WINDOW_S)
                    .await?;
                if let Status::Found { order: updated } = again {
                    order = updated;
                }
            }
            Ok(false) => {}
            Err(CheckoutError::Stripe(e)) => {
                metrics.count_by("StripeErrors", "Class", e.class(), 1);
                tracing::warn!(error = %e, "could not refresh the order from Stripe; answering the stored state");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(StatusAnswer {
        order_id: order.order_id,
        status: order.status.public(),
        session_id: order.session_id,
        paid_at: order.paid_at,
    })
}

/// Reads the session of an open order at Stripe; once it is no longer open (or its payment may
/// have settled), stores what Stripe says. True when something was stored.
async fn refresh(
    state: &State,
    session_id: &str,
    metrics: &mut MetricSet,
) -> Result<bool, CheckoutError> {
    let session = retrieve(state, session_id, metrics).await?;
    if session.status == Some(SessionStatus::Open) {
        return Ok(false);
    }
    sync(state, session_id, metrics).await?;
    Ok(true)
}
