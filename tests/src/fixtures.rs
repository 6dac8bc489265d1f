//! Stripe event fixtures (`tests/fixtures/stripe/`) and real function-URL events
//! (`tests/fixtures/lambda/`), turned into the `http::Request` the handlers receive.

use base64::Engine;
use lambda_http::{Body, Context, Request};
use serde_json::{json, Value};
use shared::config::Secret;
use shared::function_url::FunctionUrlEvent;
use shared::stripe::signature;

/// A fixture file parsed as JSON.
pub fn load(relative: &str) -> Value {
    let path = crate::workspace_root()
        .join("tests/fixtures")
        .join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// Sets `value` at a JSON pointer (creating objects on the way).
pub fn set(doc: &mut Value, pointer: &str, value: Value) {
    let mut current = doc;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        if i == parts.len() - 1 {
            current[*part] = value;
            return;
        }
        if current.get(*part).is_none() || current[*part].is_null() {
            current[*part] = json!({});
        }
        current = &mut current[*part];
    }
}

/// A unique Stripe event id.
pub fn event_id() -> String {
    format!("evt_{}", uuid::Uuid::new_v4().simple())
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// A checkout event of `type_` for `order_id`/`user_id` and session `session_id`.
/// An event of a type the webhook records and does not act on (`customer.created`): nothing is
/// read from Stripe for it, so it reaches the database whatever Stripe does.
pub fn ignored_event() -> Value {
    json!({"id": event_id(), "object": "event", "type": "customer.created", "created": now(),
           "livemode": false, "api_version": shared::stripe::API_VERSION,
           "data": {"object": {"id": "cus_ignored", "object": "customer"}}})
}

pub fn checkout_event(
    type_: &str,
    session_id: &str,
    order_id: &str,
    user_id: &str,
    payment_status: &str,
) -> Value {
    let mut event = load("stripe/checkout.session.completed.json");
    set(&mut event, "/id", json!(event_id()));
    set(&mut event, "/type", json!(type_));
    set(&mut event, "/created", json!(now()));
    set(&mut event, "/data/object/id", json!(session_id));
    set(
        &mut event,
        "/data/object/client_reference_id",
        json!(user_id),
    );
    set(
        &mut event,
        "/data/object/metadata/order_id",
        json!(order_id),
    );
    set(&mut event, "/data/object/metadata/user_id", json!(user_id));
    set(
        &mut event,
        "/data/object/payment_status",
        json!(payment_status),
    );
    set(&mut event, "/data/object/created", json!(now() - 120));
    // Each session has its own payment intent, as at Stripe.
    let pi = format!("pi_{}", session_id.trim_start_matches("cs_"));
    set(&mut event, "/data/object/payment_intent", json!(pi));
    let status = if type_ == "checkout.session.expired" {
        "expired"
    } else {
        "complete"
    };
    set(&mut event, "/data/object/status", json!(status));
    event
}

/// A `charge.refunded` event for the charge of `payment_intent`: `amount_refunded` of `amount`
/// so far (fully refunded when equal).
pub fn charge_refunded_event(payment_intent: &str, amount: i64, amount_refunded: i64) -> Value {
    let mut event = load("stripe/charge.refunded.json");
    set(&mut event, "/id", json!(event_id()));
    set(&mut event, "/created", json!(now()));
    set(
        &mut event,
        "/data/object/id",
        json!(format!("ch_{}", payment_intent.trim_start_matches("pi_"))),
    );
    set(
        &mut event,
        "/data/object/payment_intent",
        json!(payment_intent),
    );
    set(&mut event, "/data/object/amount", json!(amount));
    set(
        &mut event,
        "/data/object/amount_refunded",
        json!(amount_refunded),
    );
    set(
        &mut event,
        "/data/object/refunded",
        json!(amount_refunded >= amount),
    );
    // Since 2022-11-15 a charge no longer lists its refunds unless expanded.
    if let Some(charge) = event["data"]["object"].as_object_mut() {
        charge.remove("refunds");
    }
    event
}

/// A refund event (`charge.refund.updated`, `refund.updated`, `refund.failed`) about refund
/// `id` of `amount` on `payment_intent`, now `status` (`failed`, `canceled`, `succeeded`, ...).
pub fn refund_event(
    type_: &str,
    id: &str,
    payment_intent: &str,
    amount: i64,
    status: &str,
) -> Value {
    json!({
        "id": event_id(), "object": "event", "api_version": shared::stripe::API_VERSION,
        "created": now(), "livemode": false, "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null}, "type": type_,
        "data": {"object": {
            "id": id, "object": "refund", "amount": amount, "currency": "usd",
            "charge": format!("ch_{}", payment_intent.trim_start_matches("pi_")),
            "payment_intent": payment_intent, "reason": "requested_by_customer",
            "status": status, "created": now(), "metadata": {},
            "failure_reason": if status == "failed" { json!("expired_or_canceled_card") } else { Value::Null },
        }},
    })
}

/// A `charge.dispute.created` or `charge.dispute.closed` event (`status`: `needs_response`,
/// `won`, `lost`, ...) of dispute `id` on `payment_intent`.
pub fn dispute_event(type_: &str, id: &str, payment_intent: &str, status: &str) -> Value {
    let mut event = load("stripe/charge.dispute.created.json");
    set(&mut event, "/id", json!(event_id()));
    set(&mut event, "/type", json!(type_));
    set(&mut event, "/created", json!(now()));
    set(&mut event, "/data/object/id", json!(id));
    set(
        &mut event,
        "/data/object/charge",
        json!(format!("ch_{}", payment_intent.trim_start_matches("pi_"))),
    );
    set(
        &mut event,
        "/data/object/payment_intent",
        json!(payment_intent),
    );
    set(&mut event, "/data/object/status", json!(status));
    event
}

/// The bytes Stripe would send for `event`.
pub fn body(event: &Value) -> Vec<u8> {
    serde_json::to_vec(event).expect("fixture serializes")
}

/// A `Stripe-Signature` header for `body` signed now with `secret`.
pub fn sign(body: &[u8], secret: &str) -> String {
    signature::sign(body, &Secret::new(secret), now())
}

/// A function-URL request as Lambda delivers it, through the same adapter the functions run.
pub struct FunctionUrlRequest {
    event: Value,
}

impl FunctionUrlRequest {
    /// A POST with a JSON body, not base64-encoded (as function URLs send `application/json`).
    pub fn post(path: &str, body: &[u8]) -> Self {
        let mut event = load("lambda/function_url_post.json");
        set(&mut event, "/rawPath", json!(path));
        set(&mut event, "/requestContext/http/path", json!(path));
        set(
            &mut event,
            "/requestContext/requestId",
            json!(uuid::Uuid::new_v4().to_string()),
        );
        match std::str::from_utf8(body) {
            Ok(text) => {
                set(&mut event, "/body", json!(text));
                set(&mut event, "/isBase64Encoded", json!(false));
            }
            Err(_) => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(body);
                set(&mut event, "/body", json!(encoded));
                set(&mut event, "/isBase64Encoded", json!(true));
            }
        }
        Self { event }
    }

    /// A GET with a query string (`a=1&b=2`).
    pub fn get(path: &str, query: &str) -> Self {
        let mut request = Self::post(path, b"")
            .method("GET")
            .without_header("content-type");
        set(&mut request.event, "/body", Value::Null);
        set(&mut request.event, "/rawQueryString", json!(query));
        let params: serde_json::Map<String, Value> =
            serde_urlencoded::from_str::<Vec<(String, String)>>(query)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, json!(v)))
                .collect();
        if !params.is_empty() {
            set(
                &mut request.event,
                "/queryStringParameters",
                Value::Object(params),
            );
        }
        request
    }

    /// Adds `Authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// Sends the body base64-encoded, as function URLs do for non-text content types.
    pub fn base64(mut self) -> Self {
        if self.event["isBase64Encoded"] != json!(true) {
            let text = self.event["body"].as_str().unwrap_or_default().to_owned();
            let encoded = base64::engine::general_purpose::STANDARD.encode(text);
            set(&mut self.event, "/body", json!(encoded));
            set(&mut self.event, "/isBase64Encoded", json!(true));
        }
        self
    }

    /// Replaces the raw event body (e.g. with invalid base64).
    pub fn raw_body(mut self, body: &str, base64: bool) -> Self {
        set(&mut self.event, "/body", json!(body));
        set(&mut self.event, "/isBase64Encoded", json!(base64));
        self
    }

    /// Sets the method.
    pub fn method(mut self, method: &str) -> Self {
        set(
            &mut self.event,
            "/requestContext/http/method",
            json!(method),
        );
        self
    }

    /// Sets a header (lower-case name, as function URLs deliver them).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        set(
            &mut self.event,
            &format!("/headers/{}", name.to_ascii_lowercase()),
            json!(value),
        );
        self
    }

    /// Removes a header.
    pub fn without_header(mut self, name: &str) -> Self {
        if let Some(headers) = self.event["headers"].as_object_mut() {
            headers.remove(&name.to_ascii_lowercase());
        }
        self
    }

    /// The event JSON.
    pub fn event(&self) -> &Value {
        &self.event
    }

    /// The request the handler gets, or the adapter's own 4xx answer.
    #[allow(clippy::result_large_err)]
    pub fn into_request(self) -> Result<Request, http::Response<Body>> {
        // Read from JSON text into the runtime's own event type, as `shared::lambda::run` does.
        let text = serde_json::to_vec(&self.event).expect("event JSON");
        let event: FunctionUrlEvent = serde_json::from_slice(&text).expect("function URL event");
        let mut context = Context::default();
        context.request_id = uuid::Uuid::new_v4().to_string();
        shared::lambda::event_into_request(event, context.clone())
            .map_err(|e| e.into_response(&context.request_id))
    }
}

/// A response body as JSON.
pub fn json_body(response: &http::Response<Body>) -> Value {
    serde_json::from_slice(response.body().as_ref()).unwrap_or(Value::Null)
}
