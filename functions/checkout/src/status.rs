//! `GET ?session_id=` (or the user's latest order): the order's status for the success page,
//! reconciled from Stripe while it is pending, so the page shows `paid` before the webhook
//! arrives.

use lambda_http::Request;
use serde::Serialize;
use shared::store::orders::Status;
use shared::stripe::ids::SessionId;
use shared::telemetry::MetricSet;

use crate::session::{reconcile, retrieve, transition_for};
use crate::{request, CheckoutError, State, RATE_WINDOW_S};

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
        match retrieve(state, &id, metrics).await {
            Ok(session) => {
                if let Some(transition) = transition_for(order.status, &session) {
                    if let Some(updated) = reconcile(state, transition, session, metrics).await? {
                        order = updated;
                    }
                }
            }
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
