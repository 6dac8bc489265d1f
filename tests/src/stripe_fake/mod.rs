//! A fake Stripe API at the HTTP level, with Stripe's documented shapes and semantics:
//! Checkout Sessions (create with `Idempotency-Key`, retrieve, expire, line items), refunds, and
//! the money side tests drive (the customer pays, refunds from the Dashboard, disputes). Every
//! change emits the event Stripe would send; tests take the events from the outbox and deliver
//! them when and how they like (late, twice, concurrently). Local runs (`start_local`) deliver
//! them to the webhook at once, signed, as Stripe would.
//!
//! Idempotency as Stripe documents it: the first result of a key is kept (also an error, once
//! the endpoint ran) and replayed with `Idempotent-Replayed: true`; other parameters under the
//! same key are an `idempotency_error`; validation errors are not kept.

mod state;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use state::{error, missing, FakeState, Stored};
pub use state::{Scripted, AMOUNT, CURRENCY};

/// The secret key the fake accepts.
pub const KEY: &str = "sk_test_fake_key_for_tests";

/// A running fake.
pub struct FakeStripe {
    pub server: MockServer,
    state: Arc<Mutex<FakeState>>,
    /// Local runs: where events are delivered, and the secret they are signed with.
    sink: Option<Arc<(String, String)>>,
}

type Shared = Arc<Mutex<FakeState>>;
/// A route's answer from the fake's state.
type Handler = fn(&mut FakeState, &Request) -> ResponseTemplate;

fn with_delay(state: &FakeState, template: ResponseTemplate) -> ResponseTemplate {
    match state.delay {
        Some(d) => template.set_delay(d),
        None => template,
    }
}

fn json_response(status: u16, body: Value) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(body)
}

fn last_segments(request: &Request) -> Vec<String> {
    request
        .url
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn form(request: &Request) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(&request.body).unwrap_or_default()
}

fn check_headers(request: &Request) -> Option<ResponseTemplate> {
    let auth = request
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {KEY}")) {
        return Some(error(
            401,
            "invalid_request_error",
            None,
            "Invalid API Key provided: sk_test_****",
        ));
    }
    if request.headers.get("stripe-version").is_none() {
        return Some(error(
            400,
            "invalid_request_error",
            None,
            "the fake requires a pinned Stripe-Version",
        ));
    }
    None
}

fn idempotency_key(request: &Request) -> Option<String> {
    request
        .headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A 409 while the first request under `key` is still running (its answer delayed): Stripe keeps
/// nothing for the second request, which may be tried again.
fn key_in_flight(state: &FakeState, key: &str) -> Option<ResponseTemplate> {
    let until = state.keys_in_flight.get(key)?;
    (std::time::Instant::now() < *until).then(|| {
        error(
            409,
            "idempotency_error",
            Some("idempotency_key_in_use"),
            "There is currently another in-progress request using this idempotent key (that \
             probably means you submitted twice, and the other request is still going through). \
             Please try again later.",
        )
    })
}

fn key_kept(state: &FakeState, key: &str) -> bool {
    state.idempotency.keys().any(|(_, k)| k == key)
}

/// Runs `op` under Stripe's idempotency rules for `(endpoint, key)`.
fn idempotent(
    state: &mut FakeState,
    endpoint: &str,
    key: Option<String>,
    params: Vec<(String, String)>,
    op: impl FnOnce(&mut FakeState) -> (u16, Value, bool),
) -> ResponseTemplate {
    if let Some(key) = &key {
        if let Some(busy) = key_in_flight(state, key) {
            return busy;
        }
        if let Some(stored) = state.idempotency.get(&(endpoint.to_owned(), key.clone())) {
            if stored.params != params {
                return error(400, "idempotency_error", None,
                    "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request.");
            }
            return json_response(stored.status, stored.body.clone())
                .insert_header("idempotent-replayed", "true");
        }
    }
    let (status, body, keep) = op(state);
    if let (Some(key), true) = (key, keep) {
        Stored::keep(state, endpoint, key, params, status, &body);
    }
    json_response(status, body)
}

/// Answers every route; events emitted by the change are delivered in local runs.
struct Route {
    state: Shared,
    sink: Option<Arc<(String, String)>>,
    handler: Handler,
}

impl Respond for Route {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if let Some(refused) = check_headers(request) {
            return refused;
        }
        let Ok(mut state) = self.state.lock() else {
            return error(500, "api_error", None, "poisoned");
        };
        let kept_before = idempotency_key(request).map(|k| key_kept(&state, &k));
        let template = (self.handler)(&mut state, request);
        // A request that ran (its result newly kept under its key) is in flight while its answer
        // is delayed.
        if let (Some(false), Some(key)) = (kept_before, idempotency_key(request)) {
            if key_kept(&state, &key) {
                let path = request.url.path();
                let own = if path == "/v1/checkout/sessions" {
                    state.create_delay
                } else if path == "/v1/refunds" {
                    state.refund_delay
                } else {
                    None
                };
                if let Some(delay) = state.delay.or(own) {
                    state
                        .keys_in_flight
                        .insert(key, std::time::Instant::now() + delay);
                }
            }
        }
        let template = with_delay(&state, template);
        deliver_outbox(&mut state, &self.state, self.sink.as_deref());
        template
    }
}

fn create_session(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let template = create_session_now(state, request);
    match state.create_delay {
        Some(d) => template.set_delay(d),
        None => template,
    }
}

fn create_session_now(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let Some(key) = idempotency_key(request) else {
        return error(
            400,
            "invalid_request_error",
            None,
            "the fake requires an Idempotency-Key",
        );
    };
    let params = form(request);
    let endpoint = "POST /v1/checkout/sessions";
    if !state
        .idempotency
        .contains_key(&(endpoint.to_owned(), key.clone()))
    {
        match state.scripted.pop_front() {
            Some(Scripted::Transient(template)) => return template,
            Some(Scripted::Stored(status, body)) => {
                Stored::keep(state, endpoint, key, params, status, &body);
                return json_response(status, body);
            }
            None => {}
        }
    }
    idempotent(state, endpoint, Some(key), params.clone(), |s| {
        s.create_session(&params)
    })
}

fn retrieve_session(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let id = last_segments(request).pop().unwrap_or_default();
    match state.sessions.get(&id) {
        Some(session) => json_response(200, session.clone()),
        None => json_response(404, missing("checkout.session", &id)),
    }
}

fn expire_session(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let segments = last_segments(request);
    let id = segments
        .get(segments.len().saturating_sub(2))
        .cloned()
        .unwrap_or_default();
    let endpoint = format!("POST /v1/checkout/sessions/{id}/expire");
    idempotent(
        state,
        &endpoint,
        idempotency_key(request),
        form(request),
        |s| {
            if s.expire_failures > 0 {
                s.expire_failures -= 1;
                let body = state::error_body("api_error", None, "An unknown error occurred");
                return (500, body, true);
            }
            let (status, body) = s.expire(&id);
            (status, body, status == 200)
        },
    )
}

fn line_items(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let pairs = match query(request, &["limit", "starting_after"]) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let segments = last_segments(request);
    let id = segments
        .get(segments.len().saturating_sub(2))
        .cloned()
        .unwrap_or_default();
    match state.line_items.get(&id) {
        Some(items) => page(
            items.clone(),
            &pairs,
            &format!("/v1/checkout/sessions/{id}/line_items"),
        ),
        None => json_response(404, missing("checkout.session", &id)),
    }
}

/// The query's pairs, or Stripe's 400 for a parameter the endpoint does not take (Stripe refuses
/// unknown parameters: `parameter_unknown`).
fn query(
    request: &Request,
    allowed: &[&str],
) -> Result<Vec<(String, String)>, Box<ResponseTemplate>> {
    let pairs: Vec<(String, String)> = request
        .url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    for (key, _) in &pairs {
        if !allowed.contains(&key.as_str()) {
            let mut body = state::error_body(
                "invalid_request_error",
                Some("parameter_unknown"),
                &format!("Received unknown parameter: {key}"),
            );
            body["error"]["param"] = json!(key);
            return Err(Box::new(json_response(400, body)));
        }
    }
    Ok(pairs)
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A page of `items` (newest first) as Stripe lists it: `limit` (1-100, default 10) after
/// `starting_after`.
fn page(items: Vec<Value>, pairs: &[(String, String)], url: &str) -> ResponseTemplate {
    let limit = match param(pairs, "limit").map(str::parse::<usize>) {
        None => 10,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        Some(_) => {
            let (status, body) =
                state::param_error("limit", "Invalid integer: limit must be between 1 and 100");
            return json_response(status, body);
        }
    };
    let start = match param(pairs, "starting_after") {
        Some(after) => match items.iter().position(|i| i["id"] == json!(after)) {
            Some(i) => i + 1,
            None => return json_response(404, missing("object", after)),
        },
        None => 0,
    };
    let rest = &items[start.min(items.len())..];
    let data: Vec<Value> = rest.iter().take(limit).cloned().collect();
    json_response(
        200,
        json!({"object": "list", "url": url, "has_more": rest.len() > limit, "data": data}),
    )
}

fn retrieve_intent(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let pairs = match query(request, &["expand[]"]) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let expand = pairs
        .iter()
        .any(|(k, v)| k == "expand[]" && v == "latest_charge");
    let id = last_segments(request).pop().unwrap_or_default();
    match state.payment_intent(&id, expand) {
        Some(pi) => json_response(200, pi),
        None => json_response(404, missing("payment_intent", &id)),
    }
}

fn list_refunds(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let pairs = match query(
        request,
        &["payment_intent", "charge", "limit", "starting_after"],
    ) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let items = match param(&pairs, "payment_intent") {
        Some(pi) if !state.charges.contains_key(pi) => {
            return json_response(404, missing("payment_intent", pi))
        }
        Some(pi) => state.refunds_of(pi),
        None => state.refunds.iter().rev().cloned().collect(),
    };
    page(items, &pairs, "/v1/refunds")
}

fn list_disputes(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let pairs = match query(
        request,
        &["payment_intent", "charge", "limit", "starting_after"],
    ) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let items = match param(&pairs, "payment_intent") {
        Some(pi) if !state.charges.contains_key(pi) => {
            return json_response(404, missing("payment_intent", pi))
        }
        Some(pi) => state.disputes_of(pi),
        None => state.disputes.values().cloned().collect(),
    };
    page(items, &pairs, "/v1/disputes")
}

fn retrieve_subscription(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let id = last_segments(request).pop().unwrap_or_default();
    match state.subscriptions.get(&id) {
        Some(sub) => json_response(200, sub.clone()),
        None => json_response(404, missing("subscription", &id)),
    }
}

fn retrieve_invoice(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let id = last_segments(request).pop().unwrap_or_default();
    match state.invoices.get(&id) {
        Some(invoice) => json_response(200, invoice.clone()),
        None => json_response(404, missing("invoice", &id)),
    }
}

/// `GET /v1/events`: newest first; `delivery_success=false` keeps the events the webhook has not
/// answered with a 2xx; `created[gte]`, `types[]` filter.
fn list_events(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let pairs = match query(
        request,
        &[
            "delivery_success",
            "created[gte]",
            "created[lt]",
            "types[]",
            "type",
            "limit",
            "starting_after",
        ],
    ) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let types: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "types[]")
        .map(|(_, v)| v.as_str())
        .collect();
    if types.len() > 20 {
        let (status, body) = state::param_error("types", "You may pass at most 20 types.");
        return json_response(status, body);
    }
    let since = param(&pairs, "created[gte]").and_then(|v| v.parse::<i64>().ok());
    let before = param(&pairs, "created[lt]").and_then(|v| v.parse::<i64>().ok());
    let undelivered = param(&pairs, "delivery_success") == Some("false");
    let items: Vec<Value> = state
        .log
        .iter()
        .rev()
        .filter(|e| since.is_none_or(|t| e["created"].as_i64().unwrap_or(0) >= t))
        .filter(|e| before.is_none_or(|t| e["created"].as_i64().unwrap_or(0) < t))
        .filter(|e| types.is_empty() || types.contains(&e["type"].as_str().unwrap_or_default()))
        .filter(|e| {
            !undelivered
                || !state
                    .delivered
                    .contains(e["id"].as_str().unwrap_or_default())
        })
        .cloned()
        .collect();
    page(items, &pairs, "/v1/events")
}

/// `GET /v1/checkout/sessions`: newest first, by `status` and `created[gte]`.
fn list_sessions(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let pairs = match query(
        request,
        &[
            "status",
            "created[gte]",
            "limit",
            "starting_after",
            "payment_intent",
            "customer",
        ],
    ) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let since = param(&pairs, "created[gte]").and_then(|v| v.parse::<i64>().ok());
    let status = param(&pairs, "status");
    let items: Vec<Value> = state
        .session_order
        .iter()
        .rev()
        .filter_map(|id| state.sessions.get(id))
        .filter(|s| status.is_none_or(|st| s["status"] == json!(st)))
        .filter(|s| since.is_none_or(|t| s["created"].as_i64().unwrap_or(0) >= t))
        .cloned()
        .collect();
    page(items, &pairs, "/v1/checkout/sessions")
}

/// `POST /_fake/...`: what happens at Stripe outside the API (a cardholder disputes, a refund
/// fails at the bank, a delayed payment settles, a subscription renews), for `stripe-trigger` and
/// local runs. Each emits the events Stripe would. Not Stripe's API.
fn control(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let segments = last_segments(request);
    let form = form(request);
    let get = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let yes = |name: &str| get(name) == Some("true");
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let done = |result: Result<Value, String>| match result {
        Ok(body) => json_response(200, body),
        Err(why) => json_response(400, state::error_body("invalid_request_error", None, &why)),
    };
    match segments.as_slice() {
        ["_fake", "payment_intents", pi, "dispute"] => done(
            state
                .dispute(pi, yes("inquiry"))
                .map(|id| json!({"id": id})),
        ),
        ["_fake", "disputes", id, "close"] => done(
            state
                .close_dispute(id, yes("won"))
                .map(|()| json!({"id": id})),
        ),
        ["_fake", "disputes", id, "escalate"] => {
            done(state.escalate(id).map(|()| json!({"id": id})))
        }
        ["_fake", "refunds", id, "fail"] => done(state.fail_refund(id).map(|()| json!({"id": id}))),
        ["_fake", "refunds", id, "complete"] => {
            done(state.complete_refund(id).map(|()| json!({"id": id})))
        }
        ["_fake", "checkout", "sessions", id, "settle"] => done(
            state
                .settle_async(id, yes("succeeded"))
                .map(|()| json!({"id": id})),
        ),
        ["_fake", "subscriptions"] => {
            let user = get("user").unwrap_or_default().to_owned();
            let price = get("price").unwrap_or("price_monthly_plan").to_owned();
            done(Ok(json!({"id": state.subscribe(&user, &price)})))
        }
        ["_fake", "subscriptions", id, "status"] => {
            let status = get("status").unwrap_or("active").to_owned();
            done(
                state
                    .set_subscription_status(id, &status)
                    .map(|()| json!({"id": id})),
            )
        }
        ["_fake", "subscriptions", id, "renew"] => {
            done(state.renew(id).map(|invoice| json!({"id": invoice})))
        }
        _ => json_response(404, missing("fake route", request.url.path())),
    }
}

fn retrieve_charge(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let id = last_segments(request).pop().unwrap_or_default();
    match state.charges.values().find(|c| c["id"] == json!(id)) {
        Some(charge) => json_response(200, charge.clone()),
        None => json_response(404, missing("charge", &id)),
    }
}

fn create_refund(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let template = create_refund_now(state, request);
    match state.refund_delay {
        Some(d) => template.set_delay(d),
        None => template,
    }
}

fn create_refund_now(state: &mut FakeState, request: &Request) -> ResponseTemplate {
    let params = form(request);
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let metadata = state::metadata_of(&params);
    let pi = get("payment_intent");
    let amount = get("amount").and_then(|a| a.parse::<i64>().ok());
    let reason = get("reason");
    idempotent(
        state,
        "POST /v1/refunds",
        idempotency_key(request),
        params.clone(),
        |s| {
            if s.refund_failures > 0 {
                s.refund_failures -= 1;
                let body = state::error_body("api_error", None, "An unknown error occurred");
                return (500, body, true);
            }
            let Some(pi) = pi else {
                let (status, body) =
                    state::param_error("payment_intent", "Missing required param: payment_intent.");
                return (status, body, false);
            };
            let (status, body) = s.refund(&pi, amount, reason.as_deref(), metadata);
            (status, body, true)
        },
    )
}

/// Delivers the outbox to the webhook (local runs only), each event signed and posted from a
/// thread of its own, as Stripe delivers independently of the API call that caused it.
fn deliver_outbox(state: &mut FakeState, shared: &Shared, sink: Option<&(String, String)>) {
    let Some((url, secret)) = sink else {
        return;
    };
    for event in std::mem::take(&mut state.outbox) {
        let body = crate::fixtures::body(&event);
        let signature = crate::fixtures::sign(&body, secret);
        let url = url.clone();
        let type_ = event["type"].as_str().unwrap_or_default().to_owned();
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        let delivered_to = shared.clone();
        crate::on_own_runtime(async move {
            let result = reqwest::Client::new()
                .post(&url)
                .header("content-type", "application/json")
                .header("stripe-signature", signature)
                .body(body)
                .send()
                .await;
            match result {
                Ok(r) => {
                    println!("fake-stripe: delivered {type_}: {}", r.status());
                    if r.status().is_success() {
                        if let Ok(mut state) = delivered_to.lock() {
                            state.delivered.insert(id);
                        }
                    }
                }
                Err(e) => println!("fake-stripe: delivery of {type_} failed: {e}"),
            }
        });
    }
}

/// The local pay page: completes and pays the session, as Stripe Checkout would, and redirects
/// to its success URL; the webhook gets `checkout.session.completed`.
struct PayPage {
    state: Shared,
    sink: Option<Arc<(String, String)>>,
}

impl Respond for PayPage {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id = last_segments(request).pop().unwrap_or_default();
        let Ok(mut state) = self.state.lock() else {
            return ResponseTemplate::new(500);
        };
        if let Err(why) = state.pay(&id, true) {
            let status = if state.sessions.contains_key(&id) {
                410
            } else {
                404
            };
            return ResponseTemplate::new(status).set_body_string(why);
        }
        let success = state.sessions[&id]["success_url"]
            .as_str()
            .unwrap_or_default()
            .replace("{CHECKOUT_SESSION_ID}", &id);
        deliver_outbox(&mut state, &self.state, self.sink.as_deref());
        ResponseTemplate::new(303).insert_header("location", success.as_str())
    }
}

impl FakeStripe {
    /// Starts a fake on a loopback port; events stay in the outbox for the test.
    pub async fn start() -> FakeStripe {
        Self::start_with(MockServer::start().await, None).await
    }

    /// Starts a fake for local runs on `listener`: session URLs open a pay page on the fake,
    /// and every event is delivered to `webhook_url`, signed with `secret`.
    pub async fn start_local(
        listener: std::net::TcpListener,
        webhook_url: &str,
        secret: &str,
    ) -> FakeStripe {
        let server = MockServer::builder().listener(listener).start().await;
        let sink = Arc::new((webhook_url.to_owned(), secret.to_owned()));
        let fake = Self::start_with(server, Some(sink)).await;
        fake.with(|s| s.pay_base = Some(fake.server.uri()));
        Mock::given(method("GET"))
            .and(path_regex(r"^/pay/[A-Za-z0-9_]+$"))
            .respond_with(PayPage {
                state: fake.state.clone(),
                sink: fake.sink.clone(),
            })
            .mount(&fake.server)
            .await;
        fake
    }

    async fn start_with(server: MockServer, sink: Option<Arc<(String, String)>>) -> FakeStripe {
        let state: Shared = Arc::new(Mutex::new(FakeState::default()));
        let routes: [(&str, &str, Handler); 14] = [
            ("POST", r"^/v1/checkout/sessions$", create_session),
            (
                "GET",
                r"^/v1/checkout/sessions/[A-Za-z0-9_]+$",
                retrieve_session,
            ),
            (
                "POST",
                r"^/v1/checkout/sessions/[A-Za-z0-9_]+/expire$",
                expire_session,
            ),
            (
                "GET",
                r"^/v1/checkout/sessions/[A-Za-z0-9_]+/line_items$",
                line_items,
            ),
            ("POST", r"^/v1/refunds$", create_refund),
            ("GET", r"^/v1/refunds$", list_refunds),
            ("GET", r"^/v1/charges/[A-Za-z0-9_]+$", retrieve_charge),
            (
                "GET",
                r"^/v1/payment_intents/[A-Za-z0-9_]+$",
                retrieve_intent,
            ),
            ("GET", r"^/v1/disputes$", list_disputes),
            (
                "GET",
                r"^/v1/subscriptions/[A-Za-z0-9_]+$",
                retrieve_subscription,
            ),
            ("GET", r"^/v1/invoices/[A-Za-z0-9_]+$", retrieve_invoice),
            ("GET", r"^/v1/events$", list_events),
            ("GET", r"^/v1/checkout/sessions$", list_sessions),
            ("POST", r"^/_fake/", control),
        ];
        for (verb, pattern, handler) in routes {
            Mock::given(method(verb))
                .and(path_regex(pattern))
                .respond_with(Route {
                    state: state.clone(),
                    sink: sink.clone(),
                    handler,
                })
                .mount(&server)
                .await;
        }
        FakeStripe {
            server,
            state,
            sink,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = f(&mut state);
        deliver_outbox(&mut state, &self.state, self.sink.as_deref());
        out
    }

    /// The base URL (`STRIPE_API_BASE`).
    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// Answers the next create calls with these responses (not kept under the key).
    pub fn script(&self, responses: impl IntoIterator<Item = ResponseTemplate>) {
        self.with(|s| {
            s.scripted
                .extend(responses.into_iter().map(Scripted::Transient))
        });
    }

    /// Answers the next create call with this error, kept under its idempotency key as Stripe
    /// keeps the result of a request whose endpoint ran.
    pub fn script_stored_error(&self, status: u16, type_: &str, code: Option<&str>, message: &str) {
        let body = state::error_body(type_, code, message);
        self.with(|s| s.scripted.push_back(Scripted::Stored(status, body)));
    }

    /// Answers the next `n` refund requests with a 500, kept under their idempotency key as
    /// Stripe keeps the result of an endpoint that ran (the same key replays the 500).
    pub fn fail_next_refunds(&self, n: u32) {
        self.with(|s| s.refund_failures = n);
    }

    /// Answers the next `n` expiry requests with a 500, kept under their idempotency key.
    pub fn fail_next_expires(&self, n: u32) {
        self.with(|s| s.expire_failures = n);
    }

    /// Creates the next refunds with this status (`requires_action`, `pending`, `failed`, ...;
    /// `None`: `succeeded`).
    pub fn next_refund_status(&self, status: Option<&str>) {
        self.with(|s| s.next_refund_status = status.map(str::to_owned));
    }

    /// A refund waiting for the customer's details succeeds.
    pub fn complete_refund(&self, id: &str) -> Result<(), String> {
        self.with(|s| s.complete_refund(id))
    }

    /// A refund waiting for the customer is canceled: nothing moved.
    pub fn cancel_refund(&self, id: &str) -> Result<(), String> {
        self.with(|s| s.cancel_refund(id))
    }

    /// A refund fails after it was made: the money is the merchant's again.
    pub fn fail_refund(&self, id: &str) -> Result<(), String> {
        self.with(|s| s.fail_refund(id))
    }

    /// An inquiry escalates to a chargeback.
    pub fn escalate(&self, dispute: &str) -> Result<(), String> {
        self.with(|s| s.escalate(dispute))
    }

    /// The cardholder's bank opens an inquiry (nothing withdrawn yet).
    pub fn inquiry(&self, pi: &str) -> Result<String, String> {
        self.with(|s| s.dispute(pi, true))
    }

    /// A Stripe 500 (`api_error`).
    pub fn server_error() -> ResponseTemplate {
        error(500, "api_error", None, "An unknown error occurred")
    }

    /// A Stripe 429 (`rate_limit_error`).
    pub fn rate_limited() -> ResponseTemplate {
        error(
            429,
            "invalid_request_error",
            Some("rate_limit"),
            "Too many requests",
        )
        .insert_header("retry-after", "0")
    }

    /// Delays the answers to session creates only.
    pub fn delay_creates(&self, delay: Option<Duration>) {
        self.with(|s| s.create_delay = delay);
    }

    /// Delays the answers to refund requests only: the refund is made, its answer comes late.
    pub fn delay_refunds(&self, delay: Option<Duration>) {
        self.with(|s| s.refund_delay = delay);
    }

    /// Delays every answer (to provoke client timeouts).
    pub fn delay(&self, delay: Option<Duration>) {
        self.with(|s| s.delay = delay);
    }

    /// Marks a session complete (paid or unpaid), as after the customer's payment (emits
    /// `checkout.session.completed`). Returns the payment intent.
    pub fn complete(&self, id: &str, paid: bool) -> Option<String> {
        self.with(|s| s.pay(id, paid).ok())
    }

    /// The customer pays an open session; `Err` says why they cannot (not open, unknown).
    pub fn pay(&self, id: &str) -> Result<String, String> {
        self.with(|s| s.pay(id, true))
    }

    /// The customer starts an async payment (bank debit): complete, unpaid.
    pub fn pay_async(&self, id: &str) -> Result<String, String> {
        self.with(|s| s.pay(id, false))
    }

    /// The async payment of a session settles.
    pub fn settle_async(&self, id: &str, succeeded: bool) -> Result<(), String> {
        self.with(|s| s.settle_async(id, succeeded))
    }

    /// Stripe expires a session (its time ran out); emits `checkout.session.expired`.
    pub fn expire(&self, id: &str) -> bool {
        self.with(|s| s.expire(id).0 == 200)
    }

    /// A session of ours for `order` of `user`, as checkout creates it.
    pub fn session_for_order(&self, user: &str, order: &str) -> String {
        self.with(|s| s.session_for_order(user, order))
    }

    /// A session made outside our API calls (a Payment Link) for `user`, selling `price`.
    pub fn foreign_session(&self, user: &str, price: &str, amount: i64) -> String {
        self.with(|s| s.foreign_session(user, price, amount))
    }

    /// A refund from the Dashboard: `amount` defaults to all that remains.
    pub fn refund(&self, pi: &str, amount: Option<i64>) -> Result<Value, Value> {
        self.with(
            |s| match s.refund(pi, amount, Some("requested_by_customer"), Map::new()) {
                (200, refund) => Ok(refund),
                (_, error) => Err(error),
            },
        )
    }

    /// The cardholder disputes a payment (a chargeback); returns the dispute id.
    pub fn dispute(&self, pi: &str) -> Result<String, String> {
        self.with(|s| s.dispute(pi, false))
    }

    /// A dispute is decided.
    pub fn close_dispute(&self, id: &str, won: bool) -> Result<(), String> {
        self.with(|s| s.close_dispute(id, won))
    }

    /// A subscription bought through Checkout by `user` at `price`; its events (created, the
    /// session, active, the first invoice paid) wait in the outbox. Returns its id.
    pub fn subscribe(&self, user: &str, price: &str) -> String {
        self.with(|s| s.subscribe(user, price))
    }

    /// A renewal invoice that fails once, then is paid.
    pub fn renew(&self, subscription: &str) -> Result<String, String> {
        self.with(|s| s.renew(subscription))
    }

    /// A subscription moves to `status` (`canceled` ends it).
    pub fn set_subscription_status(&self, id: &str, status: &str) -> Result<(), String> {
        self.with(|s| s.set_subscription_status(id, status))
    }

    /// Holds an object a test made (a subscription, an invoice, a session), as Stripe holds the
    /// object an event names.
    pub fn hold(&self, object: &Value) {
        self.with(|s| s.hold(object));
    }

    /// The webhook took this event (a 2xx): it is no longer listed as undelivered.
    pub fn mark_delivered(&self, event_id: &str) {
        self.with(|s| {
            s.delivered.insert(event_id.to_owned());
        });
    }

    /// A subscription as the fake holds it.
    pub fn subscription(&self, id: &str) -> Option<Value> {
        self.with(|s| s.subscriptions.get(id).cloned())
    }

    /// `created` of the events emitted from now on (`None`: the clock).
    pub fn set_event_time(&self, created: Option<i64>) {
        self.with(|s| s.event_time = created);
    }

    /// Takes every event emitted so far, oldest first.
    pub fn take_events(&self) -> Vec<Value> {
        self.with(|s| std::mem::take(&mut s.outbox))
    }

    /// Every session the fake holds, in creation order.
    pub fn sessions(&self) -> Vec<Value> {
        self.with(|s| {
            s.session_order
                .iter()
                .filter_map(|id| s.sessions.get(id).cloned())
                .collect()
        })
    }

    /// A session as the fake holds it.
    pub fn session(&self, id: &str) -> Option<Value> {
        self.with(|s| s.sessions.get(id).cloned())
    }

    /// The charge of a payment intent.
    pub fn charge(&self, pi: &str) -> Option<Value> {
        self.with(|s| s.charges.get(pi).cloned())
    }

    /// A payment intent as `GET /v1/payment_intents/{id}?expand[]=latest_charge` answers it.
    pub fn payment_intent(&self, pi: &str) -> Option<Value> {
        self.with(|s| s.payment_intent(pi, true))
    }

    /// Every charge, by payment intent.
    pub fn charges(&self) -> Vec<(String, Value)> {
        self.with(|s| {
            s.charges
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
    }

    /// Every dispute, by id.
    pub fn disputes(&self) -> Vec<Value> {
        self.with(|s| s.disputes.values().cloned().collect())
    }

    /// The price ids of a session's line items.
    pub fn line_item_prices(&self, session: &str) -> Vec<String> {
        self.with(|s| {
            s.line_items
                .get(session)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|i| i["price"]["id"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    /// Forgets everything: sessions, payments, keys, scripts, the outbox (requests already
    /// received stay in the mock server's journal).
    pub fn reset(&self) {
        self.with(|s| {
            let pay_base = s.pay_base.take();
            *s = FakeState::default();
            s.pay_base = pay_base;
        });
    }

    /// Every refund made, oldest first.
    pub fn refunds(&self) -> Vec<Value> {
        self.with(|s| s.refunds.clone())
    }

    /// Every create request received: (idempotency key, form).
    pub async fn create_requests(&self) -> Vec<(String, Vec<(String, String)>)> {
        self.requests_to("POST", "/v1/checkout/sessions")
            .await
            .into_iter()
            .map(|r| {
                let key = idempotency_key(&r).unwrap_or_default();
                (key, form(&r))
            })
            .collect()
    }

    /// How many session retrieve calls were received.
    pub async fn retrieve_count(&self) -> usize {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| {
                r.method.as_str() == "GET"
                    && r.url.path().starts_with("/v1/checkout/sessions/")
                    && !r.url.path().ends_with("/line_items")
            })
            .count()
    }

    /// Answers the line items of `session` (one item of `price`) only after `delay`: a Payment
    /// Link's verification held open, for a click to fall into.
    pub async fn slow_line_items(&self, session: &str, price: &str, delay: Duration) {
        Mock::given(method("GET"))
            .and(wiremock::matchers::path(format!(
                "/v1/checkout/sessions/{session}/line_items"
            )))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"object": "list", "has_more": false, "data": [
                        {"object": "item", "quantity": 1, "price": {"id": price, "object": "price"}}]}))
                    .set_delay(delay),
            )
            .with_priority(1)
            .mount(&self.server)
            .await;
    }

    /// Every request received with this method.
    pub async fn requests(&self, verb: &str) -> Vec<Request> {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.method.as_str() == verb)
            .collect()
    }

    /// Every request received with this method and exact path.
    pub async fn requests_to(&self, verb: &str, exact_path: &str) -> Vec<Request> {
        self.requests(verb)
            .await
            .into_iter()
            .filter(|r| r.url.path() == exact_path)
            .collect()
    }
}
