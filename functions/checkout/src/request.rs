//! What a checkout request carries: the `POST` body and the `GET` query.

use lambda_http::{Request, RequestExt};
use serde::Deserialize;
use shared::store::orders::FULL_REPORT;
use shared::stripe::ids::SessionId;

use crate::{CheckoutError, MAX_BODY_BYTES};

/// The body of `POST`: empty, `{}` or `{"product": "full_report"}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    #[serde(default)]
    pub product: Option<String>,
}

/// Parses and checks the body of `POST` (size, content type, fields, product).
pub fn parse_body(request: &Request) -> Result<CheckoutRequest, CheckoutError> {
    let body = request.body().as_ref();
    if body.len() > MAX_BODY_BYTES {
        return Err(CheckoutError::BodyTooLarge);
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(CheckoutRequest::default());
    }
    if !shared::lambda::has_json_body(request.headers()) {
        return Err(CheckoutError::UnsupportedMediaType);
    }
    let parsed: CheckoutRequest = serde_json::from_slice(body).map_err(|e| {
        if e.to_string().starts_with("unknown field") {
            CheckoutError::InvalidBody("unknown_field", format!("{e}"))
        } else {
            CheckoutError::InvalidBody(
                "invalid_json",
                "the body is not a JSON object of the expected shape".into(),
            )
        }
    })?;
    if parsed.product.as_deref().is_some_and(|p| p != FULL_REPORT) {
        return Err(CheckoutError::InvalidBody(
            "unknown_product",
            format!("the only product sold here is {FULL_REPORT}"),
        ));
    }
    Ok(parsed)
}

/// `?session_id=cs_...` of `GET`, if given.
pub fn session_id_param(request: &Request) -> Result<Option<SessionId>, CheckoutError> {
    let params = request.query_string_parameters();
    let Some(id) = params.first("session_id") else {
        return Ok(None);
    };
    SessionId::parse(id)
        .map(Some)
        .map_err(|_| CheckoutError::InvalidSessionId)
}
