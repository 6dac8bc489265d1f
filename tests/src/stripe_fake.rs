//! A fake Stripe API at the HTTP level: Checkout Sessions created (form-encoded, with
//! `Idempotency-Key` semantics: a replay returns the first result with `Idempotent-Replayed: true`,
//! other parameters under the same key are an `idempotency_error`) and retrieved, with Stripe's
//! error bodies and headers, scripted failures and delays.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// The secret key the fake accepts.
pub const KEY: &str = "sk_test_fake_key_for_tests";

#[derive(Default)]
struct FakeState {
    sessions: HashMap<String, Value>,
    idempotency: HashMap<String, (Vec<(String, String)>, Value)>,
    /// Answers to give to the next create calls instead of creating (e.g. a 500).
    scripted: VecDeque<ResponseTemplate>,
    delay: Option<Duration>,
    created: u32,
    /// Local runs: session URLs point at the fake's own pay page.
    pay_base: Option<String>,
}

/// A running fake.
pub struct FakeStripe {
    pub server: MockServer,
    state: Arc<Mutex<FakeState>>,
}

fn error(status: u16, type_: &str, code: Option<&str>, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_json(
            json!({"error": {"type": type_, "code": code, "message": message,
            "request_log_url": "https://dashboard.stripe.com/test/logs/req_fake"}}),
        )
        .insert_header("request-id", "req_fake")
}

struct Create(Arc<Mutex<FakeState>>);

impl Respond for Create {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let Ok(mut state) = self.0.lock() else {
            return error(500, "api_error", None, "poisoned");
        };
        if let Some(auth) = check_headers(request) {
            return auth;
        }
        let Some(key) = request
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        else {
            return error(
                400,
                "invalid_request_error",
                None,
                "the fake requires an Idempotency-Key",
            );
        };
        let form: Vec<(String, String)> =
            serde_urlencoded::from_bytes(&request.body).unwrap_or_default();
        let delay = state.delay;
        let with_delay = |t: ResponseTemplate| match delay {
            Some(d) => t.set_delay(d),
            None => t,
        };
        if let Some((first_form, session_id)) = state.idempotency.get(&key) {
            if *first_form != form {
                return with_delay(error(400, "idempotency_error", None,
                    "Keys for idempotent requests can only be used with the same parameters they were first used with."));
            }
            let session = state
                .sessions
                .get(session_id.as_str().unwrap_or_default())
                .cloned()
                .unwrap_or(Value::Null);
            return with_delay(
                ResponseTemplate::new(200)
                    .set_body_json(session)
                    .insert_header("idempotent-replayed", "true"),
            );
        }
        if let Some(scripted) = state.scripted.pop_front() {
            // Stripe does not keep a 5xx under the key: the retry executes anew.
            return with_delay(scripted);
        }
        let get = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let (Some(price), Some(success), Some(expires_at)) = (
            get("line_items[0][price]"),
            get("success_url"),
            get("expires_at"),
        ) else {
            return with_delay(error(
                400,
                "invalid_request_error",
                Some("parameter_missing"),
                "Missing required param.",
            ));
        };
        if !price.starts_with("price_") {
            return with_delay(error(
                400,
                "invalid_request_error",
                Some("resource_missing"),
                &format!("No such price: '{price}'"),
            ));
        }
        state.created += 1;
        let id = format!(
            "cs_test_fake{:04}{}",
            state.created,
            &uuid::Uuid::new_v4().simple().to_string()[..20]
        );
        let metadata: serde_json::Map<String, Value> = form
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("metadata[")
                    .and_then(|r| r.strip_suffix(']'))
                    .map(|m| (m.to_owned(), json!(v)))
            })
            .collect();
        let session = json!({
            "id": id, "object": "checkout.session", "mode": get("mode"), "status": "open",
            "payment_status": "unpaid", "amount_total": 1900, "currency": "usd",
            "client_reference_id": get("client_reference_id"), "customer": null,
            "customer_email": get("customer_email"), "metadata": metadata,
            "success_url": success, "cancel_url": get("cancel_url"),
            "expires_at": expires_at.parse::<i64>().unwrap_or_default(),
            "created": crate::fixtures::now(), "livemode": false, "payment_intent": null,
            "url": match &state.pay_base {
                Some(base) => format!("{base}/pay/{id}"),
                None => format!("https://checkout.stripe.com/c/pay/{id}#fidkdWxOYHwnPyd1blpxYHZxWjA0"),
            },
        });
        state.sessions.insert(id.clone(), session.clone());
        state.idempotency.insert(key, (form, json!(id)));
        with_delay(ResponseTemplate::new(200).set_body_json(session))
    }
}

struct Retrieve(Arc<Mutex<FakeState>>);

impl Respond for Retrieve {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if let Some(auth) = check_headers(request) {
            return auth;
        }
        let id = request
            .url
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let Ok(state) = self.0.lock() else {
            return error(500, "api_error", None, "poisoned");
        };
        let template = match state.sessions.get(&id) {
            Some(session) => ResponseTemplate::new(200).set_body_json(session),
            None => error(
                404,
                "invalid_request_error",
                Some("resource_missing"),
                &format!("No such checkout.session: '{id}'"),
            ),
        };
        match state.delay {
            Some(d) => template.set_delay(d),
            None => template,
        }
    }
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

/// The local pay page: completes the session, delivers a signed `checkout.session.completed` to
/// the webhook, and redirects to the session's success URL, as Stripe Checkout would.
struct Pay {
    state: Arc<Mutex<FakeState>>,
    webhook_url: String,
    webhook_secret: String,
}

impl Respond for Pay {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id = request
            .url
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let Ok(mut state) = self.state.lock() else {
            return error(500, "api_error", None, "poisoned");
        };
        let Some(session) = state.sessions.get_mut(&id) else {
            return ResponseTemplate::new(404).set_body_string("no such checkout session");
        };
        if session["status"] != "open" {
            return ResponseTemplate::new(410)
                .set_body_string(format!("this session is {}", session["status"]));
        }
        session["status"] = json!("complete");
        session["payment_status"] = json!("paid");
        session["url"] = Value::Null;
        let order = session["metadata"]["order_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let user = session["client_reference_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let success = session["success_url"]
            .as_str()
            .unwrap_or_default()
            .replace("{CHECKOUT_SESSION_ID}", &id);
        let event = crate::fixtures::checkout_event(
            "checkout.session.completed",
            &id,
            &order,
            &user,
            "paid",
        );
        let body = crate::fixtures::body(&event);
        let signature = crate::fixtures::sign(&body, &self.webhook_secret);
        let url = self.webhook_url.clone();
        // Delivered from another thread, as Stripe delivers webhooks independently of the redirect.
        std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let result = reqwest::Client::new()
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("stripe-signature", signature)
                    .body(body)
                    .send()
                    .await;
                match result {
                    Ok(r) => println!(
                        "fake-stripe: delivered checkout.session.completed for {id}: {}",
                        r.status()
                    ),
                    Err(e) => println!("fake-stripe: webhook delivery failed: {e}"),
                }
            });
        });
        ResponseTemplate::new(303).insert_header("location", success.as_str())
    }
}

impl FakeStripe {
    /// Starts a fake on a loopback port.
    pub async fn start() -> FakeStripe {
        Self::start_with(MockServer::start().await).await
    }

    /// Starts a fake for local runs on `listener`: session URLs open a pay page on the fake that
    /// completes the session and delivers the webhook to `webhook_url`, signed with `secret`.
    pub async fn start_local(
        listener: std::net::TcpListener,
        webhook_url: &str,
        secret: &str,
    ) -> FakeStripe {
        let server = MockServer::builder().listener(listener).start().await;
        let fake = Self::start_with(server).await;
        if let Ok(mut state) = fake.state.lock() {
            state.pay_base = Some(fake.server.uri());
        }
        Mock::given(method("GET"))
            .and(path_regex(r"^/pay/[A-Za-z0-9_]+$"))
            .respond_with(Pay {
                state: fake.state.clone(),
                webhook_url: webhook_url.to_owned(),
                webhook_secret: secret.to_owned(),
            })
            .mount(&fake.server)
            .await;
        fake
    }

    async fn start_with(server: MockServer) -> FakeStripe {
        let state = Arc::new(Mutex::new(FakeState::default()));
        Mock::given(method("POST"))
            .and(path("/v1/checkout/sessions"))
            .respond_with(Create(state.clone()))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path_regex(r"^/v1/checkout/sessions/[A-Za-z0-9_]+$"))
            .respond_with(Retrieve(state.clone()))
            .mount(&server)
            .await;
        FakeStripe { server, state }
    }

    /// The base URL (`STRIPE_API_BASE`).
    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// Answers the next create calls with these responses instead of creating.
    pub fn script(&self, responses: impl IntoIterator<Item = ResponseTemplate>) {
        if let Ok(mut s) = self.state.lock() {
            s.scripted.extend(responses);
        }
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

    /// Delays every answer (to provoke client timeouts).
    pub fn delay(&self, delay: Option<Duration>) {
        if let Ok(mut s) = self.state.lock() {
            s.delay = delay;
        }
    }

    /// Marks a session complete (paid or unpaid), as after the customer's payment.
    pub fn complete(&self, id: &str, paid: bool) {
        self.update(id, |s| {
            s["status"] = json!("complete");
            s["payment_status"] = json!(if paid { "paid" } else { "unpaid" });
            s["payment_intent"] = json!("pi_fake_1");
            s["customer"] = json!("cus_fake_1");
            s["url"] = Value::Null;
        });
    }

    /// Marks a session expired.
    pub fn expire(&self, id: &str) {
        self.update(id, |s| {
            s["status"] = json!("expired");
            s["url"] = Value::Null;
        });
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Value)) {
        if let Ok(mut state) = self.state.lock() {
            if let Some(session) = state.sessions.get_mut(id) {
                f(session);
            }
        }
    }

    /// Every session the fake holds.
    pub fn sessions(&self) -> Vec<Value> {
        self.state
            .lock()
            .map(|s| s.sessions.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A session as the fake holds it.
    pub fn session(&self, id: &str) -> Option<Value> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.sessions.get(id).cloned())
    }

    /// Every create request received: (idempotency key, form).
    pub async fn create_requests(&self) -> Vec<(String, Vec<(String, String)>)> {
        self.requests("POST")
            .await
            .into_iter()
            .map(|r| {
                let key = r
                    .headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                (
                    key,
                    serde_urlencoded::from_bytes(&r.body).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// How many retrieve calls were received.
    pub async fn retrieve_count(&self) -> usize {
        self.requests("GET").await.len()
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
}
