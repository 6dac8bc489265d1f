//! What the fake Stripe holds and how it changes, without HTTP: Checkout Sessions with their
//! line items, the payments (charges) they make, refunds, disputes, idempotency keys, and the
//! events every change emits, in Stripe's own shapes.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde_json::{json, Map, Value};
use wiremock::ResponseTemplate;

/// The price and amount every session of the fake sells, unless a test says otherwise.
pub const AMOUNT: i64 = 1900;
/// The currency of every payment.
pub const CURRENCY: &str = "usd";

/// A scripted answer to a create call.
pub enum Scripted {
    /// Not kept under the key (a 5xx before the endpoint ran): a retry runs anew.
    Transient(ResponseTemplate),
    /// Kept under the key as Stripe keeps a result once the endpoint ran: every later request
    /// with that key gets it again, `Idempotent-Replayed: true`.
    Stored(u16, Value),
}

/// A stored answer under an idempotency key: the parameters first sent and the response.
pub struct Stored {
    pub params: Vec<(String, String)>,
    pub status: u16,
    pub body: Value,
}

/// The `metadata[key]=value` fields of a form, as Stripe returns them: `{"key": "value"}`.
pub fn metadata_of(form: &[(String, String)]) -> Map<String, Value> {
    form.iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("metadata[")
                .and_then(|r| r.strip_suffix(']'))
                .map(|m| (m.to_owned(), json!(v)))
        })
        .collect()
}

impl Stored {
    /// Keeps `status` and `body` under `(endpoint, key)`, as Stripe keeps an idempotent answer.
    pub fn keep(
        state: &mut FakeState,
        endpoint: &str,
        key: String,
        params: Vec<(String, String)>,
        status: u16,
        body: &Value,
    ) {
        state.idempotency.insert(
            (endpoint.to_owned(), key),
            Stored {
                params,
                status,
                body: body.clone(),
            },
        );
    }
}

/// Everything the fake holds.
#[derive(Default)]
pub struct FakeState {
    pub sessions: HashMap<String, Value>,
    /// Creation order of sessions, for tests that look at them in order.
    pub session_order: Vec<String>,
    pub line_items: HashMap<String, Vec<Value>>,
    /// Charges by payment intent.
    pub charges: HashMap<String, Value>,
    /// Payment intents' statuses (the rest of a payment intent is its charge's).
    pub intents: HashMap<String, String>,
    pub subscriptions: HashMap<String, Value>,
    pub invoices: HashMap<String, Value>,
    /// Every event emitted, oldest first, for `GET /v1/events`.
    pub log: Vec<Value>,
    /// Events the webhook answered with a 2xx (the rest are listed as undelivered).
    pub delivered: std::collections::HashSet<String>,
    pub refunds: Vec<Value>,
    pub disputes: HashMap<String, Value>,
    /// `(endpoint, key)` -> first result, as Stripe keeps it.
    pub idempotency: HashMap<(String, String), Stored>,
    /// Keys whose first request is still running (its answer delayed): until then another request
    /// under the key is a 409, nothing kept, as at Stripe.
    pub keys_in_flight: HashMap<String, std::time::Instant>,
    /// Answers to give to the next create calls instead of creating.
    pub scripted: VecDeque<Scripted>,
    pub delay: Option<Duration>,
    /// Delays the answers to session creates only.
    pub create_delay: Option<Duration>,
    /// The next refund requests answered 500, kept under their key as Stripe keeps an error
    /// of an endpoint that ran (a retry with the key gets the same 500, replayed).
    pub refund_failures: u32,
    /// The next expiry requests answered 500, kept under their key.
    pub expire_failures: u32,
    /// Delays the answers to refund requests only (the refund is made, the answer is late).
    pub refund_delay: Option<Duration>,
    /// Payments made so far (each one's `created` is a second after the one before).
    pub payments_made: i64,
    /// The status the next refunds are created with (default `succeeded`).
    pub next_refund_status: Option<String>,
    pub counter: u64,
    /// Local runs: session URLs point at the fake's own pay page.
    pub pay_base: Option<String>,
    /// Events emitted and not taken yet, oldest first.
    pub outbox: Vec<Value>,
    /// `created` of the events emitted from now on (default: the clock).
    pub event_time: Option<i64>,
    customers: HashMap<String, String>,
}

/// Stripe's error body.
pub fn error(status: u16, type_: &str, code: Option<&str>, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_json(error_body(type_, code, message))
        .insert_header("request-id", "req_fake")
}

/// Stripe's error JSON.
pub fn error_body(type_: &str, code: Option<&str>, message: &str) -> Value {
    json!({"error": {"type": type_, "code": code, "message": message,
        "request_log_url": "https://dashboard.stripe.com/test/logs/req_fake"}})
}

/// A Stripe error with a `param`.
pub fn param_error(param: &str, message: &str) -> (u16, Value) {
    let mut body = error_body("invalid_request_error", Some("parameter_invalid"), message);
    body["error"]["param"] = json!(param);
    (400, body)
}

fn now() -> i64 {
    crate::fixtures::now()
}

impl FakeState {
    fn next_id(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!(
            "{prefix}_fake{:05}{}",
            self.counter,
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        )
    }

    /// Appends an event of `type_` about `object` to the outbox (and the event log).
    pub fn emit(&mut self, type_: &str, object: Value) {
        let id = format!("evt_{}", uuid::Uuid::new_v4().simple());
        let event = json!({
            "id": id, "object": "event", "api_version": shared::stripe::API_VERSION,
            "created": self.event_time.unwrap_or_else(now), "livemode": false,
            "pending_webhooks": 1, "request": {"id": null, "idempotency_key": null},
            "type": type_, "data": {"object": object},
        });
        self.log.push(event.clone());
        self.outbox.push(event);
    }

    /// `GET /v1/payment_intents/{id}`: the payment intent of a charge the fake made, its latest
    /// charge as an id or (`expand`) the charge object, which lists no refunds.
    pub fn payment_intent(&self, pi: &str, expand: bool) -> Option<Value> {
        let charge = self.charges.get(pi)?;
        let status = self
            .intents
            .get(pi)
            .cloned()
            .unwrap_or_else(|| "succeeded".into());
        Some(json!({
            "id": pi, "object": "payment_intent", "amount": charge["amount"],
            "amount_received": if status == "succeeded" { charge["amount"].clone() } else { json!(0) },
            "currency": charge["currency"], "customer": charge["customer"], "status": status,
            "latest_charge": if expand { charge.clone() } else { charge["id"].clone() },
            "metadata": charge["metadata"], "created": charge["created"], "livemode": false,
            "payment_method_types": ["card"],
        }))
    }

    /// `POST /v1/checkout/sessions` after the idempotency check: a session, or an error. The
    /// `bool` says whether Stripe would store the answer under the key (validation errors are
    /// not stored: the endpoint never started).
    pub fn create_session(&mut self, form: &[(String, String)]) -> (u16, Value, bool) {
        let get = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let (Some(price), Some(success), Some(expires_at)) = (
            get("line_items[0][price]"),
            get("success_url"),
            get("expires_at"),
        ) else {
            let body = error_body(
                "invalid_request_error",
                Some("parameter_missing"),
                "Missing required param.",
            );
            return (400, body, false);
        };
        let Ok(expires_at) = expires_at.parse::<i64>() else {
            let (status, body) = param_error("expires_at", "Invalid integer");
            return (status, body, false);
        };
        // Stripe: "The `expires_at` timestamp must be between 30 minutes and 24 hours from
        // Checkout Session creation."
        let ahead = expires_at - now();
        if !(1800..=86_400).contains(&ahead) {
            let (status, body) = param_error(
                "expires_at",
                "The `expires_at` timestamp must be between 30 minutes and 24 hours from Checkout Session creation.",
            );
            return (status, body, false);
        }
        if !price.starts_with("price_") {
            let body = error_body(
                "invalid_request_error",
                Some("resource_missing"),
                &format!("No such price: '{price}'"),
            );
            return (400, body, true);
        }
        let quantity = get("line_items[0][quantity]")
            .and_then(|q| q.parse::<i64>().ok())
            .unwrap_or(1);
        let id = self.next_id("cs_test");
        let metadata = metadata_of(form);
        let url = match &self.pay_base {
            Some(base) => format!("{base}/pay/{id}"),
            None => {
                format!("https://checkout.stripe.com/c/pay/{id}#fidkdWxOYHwnPyd1blpxYHZxWjA0")
            }
        };
        let session = json!({
            "id": id, "object": "checkout.session", "mode": get("mode"), "status": "open",
            "payment_status": "unpaid", "amount_total": AMOUNT * quantity, "currency": CURRENCY,
            "client_reference_id": get("client_reference_id"), "customer": null,
            "customer_email": get("customer_email"), "metadata": metadata,
            "success_url": success, "cancel_url": get("cancel_url"),
            "expires_at": expires_at, "created": now(), "livemode": false,
            "payment_intent": null, "url": url,
        });
        self.add_session(session.clone(), &price, quantity);
        (200, session, true)
    }

    fn add_session(&mut self, session: Value, price: &str, quantity: i64) {
        let id = session["id"].as_str().unwrap_or_default().to_owned();
        let item = json!({
            "id": self.next_id("li"), "object": "item", "amount_discount": 0,
            "amount_subtotal": AMOUNT * quantity, "amount_tax": 0,
            "amount_total": AMOUNT * quantity, "currency": CURRENCY, "description": "Full report",
            "price": {"id": price, "object": "price", "currency": CURRENCY,
                      "unit_amount": AMOUNT, "type": "one_time", "active": true},
            "quantity": quantity,
        });
        self.line_items.insert(id.clone(), vec![item]);
        self.sessions.insert(id.clone(), session);
        self.session_order.push(id);
    }

    /// A session of ours for `order`, as checkout would create it (without the HTTP call).
    pub fn session_for_order(&mut self, user: &str, order: &str) -> String {
        let id = self.next_id("cs_test");
        let url = format!("https://checkout.stripe.com/c/pay/{id}");
        let session = json!({
            "id": id, "object": "checkout.session", "mode": "payment", "status": "open",
            "payment_status": "unpaid", "amount_total": AMOUNT, "currency": CURRENCY,
            "client_reference_id": user, "customer": null,
            "metadata": {"order_id": order, "user_id": user, "product": "full_report"},
            "expires_at": now() + 7200, "created": now(), "livemode": false,
            "payment_intent": null, "url": url,
        });
        self.add_session(session, crate::apps::PRICE, 1);
        id
    }

    /// A session made outside our API calls, e.g. by a Payment Link: no order metadata,
    /// `client_reference_id` as the buyer set it. Returns its id.
    pub fn foreign_session(&mut self, user: &str, price: &str, amount: i64) -> String {
        let id = self.next_id("cs_test");
        let session = json!({
            "id": id, "object": "checkout.session", "mode": "payment", "status": "open",
            "payment_status": "unpaid", "amount_total": amount, "currency": CURRENCY,
            "client_reference_id": user, "customer": null, "metadata": {},
            "payment_link": "plink_fake", "expires_at": now() + 86_400, "created": now(),
            "livemode": false, "payment_intent": null, "url": null,
        });
        self.add_session(session, price, 1);
        id
    }

    /// `POST /v1/checkout/sessions/{id}/expire`.
    pub fn expire(&mut self, id: &str) -> (u16, Value) {
        let Some(session) = self.sessions.get_mut(id) else {
            return (404, missing("checkout.session", id));
        };
        if session["status"] != "open" {
            let message = format!(
                "Only Checkout Sessions with a status in [\"open\"] can be expired. This Checkout Session has a status of {}.",
                session["status"]
            );
            return (400, error_body("invalid_request_error", None, &message));
        }
        session["status"] = json!("expired");
        session["url"] = Value::Null;
        let session = session.clone();
        self.emit("checkout.session.expired", session.clone());
        (200, session)
    }

    /// The customer pays the session: complete, and paid (card) or unpaid (an async method in
    /// flight). Emits `checkout.session.completed`. Returns the payment intent, or why not.
    pub fn pay(&mut self, id: &str, paid: bool) -> Result<String, String> {
        let Some(session) = self.sessions.get(id).cloned() else {
            return Err(format!("no such session {id}"));
        };
        if session["status"] != "open" {
            return Err(format!("the session is {}", session["status"]));
        }
        let user = session["client_reference_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let customer = match self.customers.get(&user) {
            Some(c) => c.clone(),
            None => {
                let c = self.next_id("cus");
                self.customers.insert(user, c.clone());
                c
            }
        };
        let pi = self.next_id("pi");
        let amount = session["amount_total"].as_i64().unwrap_or(AMOUNT);
        // Each payment is a second after the one before: which one was made first is never a
        // tie here (Stripe's `created` has one-second precision; ties are the decision property
        // test's, tests/it/decisions.rs).
        self.payments_made += 1;
        let made = now() + self.payments_made;
        let charge = json!({
            "id": self.next_id("ch"), "object": "charge", "amount": amount,
            "amount_captured": if paid { amount } else { 0 }, "amount_refunded": 0,
            "currency": CURRENCY, "customer": customer, "disputed": false, "paid": paid,
            "payment_intent": pi, "refunded": false, "status": if paid { "succeeded" } else { "pending" },
            "metadata": session["metadata"].clone(), "livemode": false, "created": made,
        });
        self.charges.insert(pi.clone(), charge);
        self.intents.insert(
            pi.clone(),
            (if paid { "succeeded" } else { "processing" }).into(),
        );
        let session = self.sessions.get_mut(id).expect("present");
        session["status"] = json!("complete");
        session["payment_status"] = json!(if paid { "paid" } else { "unpaid" });
        session["payment_intent"] = json!(pi);
        session["customer"] = json!(customer);
        session["url"] = Value::Null;
        let session = session.clone();
        self.emit("checkout.session.completed", session);
        Ok(pi)
    }

    /// An async payment of a completed, unpaid session settles.
    pub fn settle_async(&mut self, id: &str, succeeded: bool) -> Result<(), String> {
        let Some(session) = self.sessions.get_mut(id) else {
            return Err(format!("no such session {id}"));
        };
        if session["status"] != "complete" || session["payment_status"] != "unpaid" {
            return Err("not an async payment in flight".into());
        }
        if succeeded {
            session["payment_status"] = json!("paid");
        }
        let session = session.clone();
        let pi = session["payment_intent"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if let Some(charge) = self.charges.get_mut(&pi) {
            charge["paid"] = json!(succeeded);
            charge["status"] = json!(if succeeded { "succeeded" } else { "failed" });
            charge["amount_captured"] = if succeeded {
                charge["amount"].clone()
            } else {
                json!(0)
            };
        }
        // A delayed payment that fails sends its payment intent back for another method.
        self.intents.insert(
            pi,
            (if succeeded {
                "succeeded"
            } else {
                "requires_payment_method"
            })
            .into(),
        );
        self.emit(
            if succeeded {
                "checkout.session.async_payment_succeeded"
            } else {
                "checkout.session.async_payment_failed"
            },
            session,
        );
        Ok(())
    }

    /// `POST /v1/refunds` (and refunds from the Dashboard): `amount` defaults to what remains.
    pub fn refund(
        &mut self,
        pi: &str,
        amount: Option<i64>,
        reason: Option<&str>,
        metadata: Map<String, Value>,
    ) -> (u16, Value) {
        let Some(charge) = self.charges.get(pi).cloned() else {
            return (404, missing("payment_intent", pi));
        };
        if charge["paid"] != true {
            return (
                400,
                error_body(
                    "invalid_request_error",
                    Some("charge_not_refundable"),
                    "This charge has not succeeded.",
                ),
            );
        }
        // A chargeback took the money: Stripe refuses to refund the charge until a won dispute
        // gives it back (an inquiry withdrew nothing: `is_charge_refundable`).
        if self
            .disputes
            .values()
            .any(|d| d["payment_intent"] == json!(pi) && d["is_charge_refundable"] == false)
        {
            return (
                400,
                error_body(
                    "invalid_request_error",
                    Some("charge_disputed"),
                    "The charge you're attempting to refund has been charged back.",
                ),
            );
        }
        let total = charge["amount"].as_i64().unwrap_or_default();
        let refunded = charge["amount_refunded"].as_i64().unwrap_or_default();
        let amount = amount.unwrap_or(total - refunded);
        if refunded >= total {
            return (
                400,
                error_body(
                    "invalid_request_error",
                    Some("charge_already_refunded"),
                    &format!(
                        "Charge {} has already been refunded.",
                        charge["id"].as_str().unwrap_or_default()
                    ),
                ),
            );
        }
        if amount <= 0 || refunded + amount > total {
            let (status, body) = param_error(
                "amount",
                "Refund amount is greater than the unrefunded amount.",
            );
            return (status, body);
        }
        let status = self
            .next_refund_status
            .clone()
            .unwrap_or_else(|| "succeeded".into());
        let refund = json!({
            "id": self.next_id("re"), "object": "refund", "amount": amount,
            "charge": charge["id"], "payment_intent": pi, "currency": CURRENCY,
            "reason": reason, "status": status, "metadata": metadata, "created": now(),
        });
        self.refunds.push(refund.clone());
        // A failed refund moved nothing; one waiting for the customer's details moves the money
        // only when it succeeds (`complete_refund`).
        if matches!(status.as_str(), "failed" | "canceled" | "requires_action") {
            return (200, refund);
        }
        let charge = self.charges.get_mut(pi).expect("present");
        charge["amount_refunded"] = json!(refunded + amount);
        charge["refunded"] = json!(refunded + amount >= total);
        let charge = charge.clone();
        self.emit("charge.refunded", charge);
        (200, refund)
    }

    /// A refund waiting for the customer's details succeeds: the money goes back now.
    pub fn complete_refund(&mut self, id: &str) -> Result<(), String> {
        let Some(refund) = self.refunds.iter_mut().find(|r| r["id"] == json!(id)) else {
            return Err(format!("no such refund {id}"));
        };
        if refund["status"] != "requires_action" {
            return Err(format!("the refund is {}", refund["status"]));
        }
        refund["status"] = json!("succeeded");
        let refund = refund.clone();
        let pi = refund["payment_intent"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let Some(charge) = self.charges.get_mut(&pi) else {
            return Err(format!("no such payment {pi}"));
        };
        let refunded = charge["amount_refunded"].as_i64().unwrap_or_default()
            + refund["amount"].as_i64().unwrap_or_default();
        charge["amount_refunded"] = json!(refunded);
        charge["refunded"] = json!(refunded >= charge["amount"].as_i64().unwrap_or_default());
        let charge = charge.clone();
        self.emit("charge.refund.updated", refund);
        self.emit("charge.refunded", charge);
        Ok(())
    }

    /// A refund waiting for the customer is canceled (the cancel API, or its instructions
    /// expired): no money moved, `amount_refunded` never counted it.
    pub fn cancel_refund(&mut self, id: &str) -> Result<(), String> {
        let Some(refund) = self.refunds.iter_mut().find(|r| r["id"] == json!(id)) else {
            return Err(format!("no such refund {id}"));
        };
        if refund["status"] != "requires_action" {
            return Err(format!("the refund is {}", refund["status"]));
        }
        refund["status"] = json!("canceled");
        let refund = refund.clone();
        self.emit("charge.refund.updated", refund.clone());
        self.emit("refund.updated", refund);
        Ok(())
    }

    /// A refund fails after it was made (a closed card): Stripe puts the money back in the
    /// merchant's balance and reports the refund `failed`.
    pub fn fail_refund(&mut self, id: &str) -> Result<(), String> {
        let Some(refund) = self.refunds.iter_mut().find(|r| r["id"] == json!(id)) else {
            return Err(format!("no such refund {id}"));
        };
        if refund["status"] != "succeeded" && refund["status"] != "pending" {
            return Err(format!("the refund is {}", refund["status"]));
        }
        refund["status"] = json!("failed");
        refund["failure_reason"] = json!("expired_or_canceled_card");
        let refund = refund.clone();
        let pi = refund["payment_intent"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if let Some(charge) = self.charges.get_mut(&pi) {
            let left = charge["amount_refunded"].as_i64().unwrap_or_default()
                - refund["amount"].as_i64().unwrap_or_default();
            charge["amount_refunded"] = json!(left.max(0));
            charge["refunded"] = json!(false);
        }
        self.emit("charge.refund.updated", refund.clone());
        self.emit("refund.failed", refund);
        Ok(())
    }

    /// The cardholder disputes the payment (a chargeback, `inquiry: false`: Stripe withdraws the
    /// amount) or asks their bank about it (an inquiry: nothing is withdrawn yet).
    pub fn dispute(&mut self, pi: &str, inquiry: bool) -> Result<String, String> {
        let Some(charge) = self.charges.get_mut(pi) else {
            return Err(format!("no such payment {pi}"));
        };
        charge["disputed"] = json!(true);
        let charge = charge.clone();
        let id = self.next_id("dp");
        let dispute = json!({
            "id": id, "object": "dispute", "amount": charge["amount"], "charge": charge["id"],
            "payment_intent": pi, "currency": CURRENCY,
            "status": if inquiry { "warning_needs_response" } else { "needs_response" },
            "reason": "fraudulent", "is_charge_refundable": inquiry, "livemode": false,
            "created": now(), "metadata": {},
        });
        self.disputes.insert(id.clone(), dispute.clone());
        self.emit("charge.dispute.created", dispute.clone());
        if !inquiry {
            self.emit("charge.dispute.funds_withdrawn", dispute);
        }
        Ok(id)
    }

    /// An inquiry becomes a chargeback: Stripe withdraws the amount now.
    pub fn escalate(&mut self, id: &str) -> Result<(), String> {
        let Some(dispute) = self.disputes.get_mut(id) else {
            return Err(format!("no such dispute {id}"));
        };
        if dispute["status"] != "warning_needs_response" {
            return Err(format!("the dispute is {}", dispute["status"]));
        }
        dispute["status"] = json!("needs_response");
        dispute["is_charge_refundable"] = json!(false);
        let dispute = dispute.clone();
        self.emit("charge.dispute.funds_withdrawn", dispute);
        Ok(())
    }

    /// The dispute is decided.
    pub fn close_dispute(&mut self, id: &str, won: bool) -> Result<(), String> {
        let Some(dispute) = self.disputes.get_mut(id) else {
            return Err(format!("no such dispute {id}"));
        };
        let status = match dispute["status"].as_str() {
            Some("won" | "lost" | "warning_closed") => return Err("already closed".into()),
            Some("warning_needs_response") => "warning_closed",
            _ if won => "won",
            _ => "lost",
        };
        dispute["status"] = json!(status);
        // Closed: a lost dispute keeps the money with the cardholder; otherwise it is the
        // merchant's again, and refundable.
        dispute["is_charge_refundable"] = json!(status != "lost");
        let dispute = dispute.clone();
        self.emit("charge.dispute.closed", dispute);
        Ok(())
    }
}

impl FakeState {
    fn customer_of(&mut self, user: &str) -> String {
        match self.customers.get(user) {
            Some(c) => c.clone(),
            None => {
                let c = self.next_id("cus");
                self.customers.insert(user.to_owned(), c.clone());
                c
            }
        }
    }

    /// A subscription bought through Checkout by `user` (Stripe's order of events: the
    /// subscription created incomplete, the session naming its buyer, the subscription active,
    /// its first invoice paid). Returns the subscription id.
    pub fn subscribe(&mut self, user: &str, price: &str) -> String {
        let customer = self.customer_of(user);
        let id = self.next_id("sub");
        let t = now();
        let subscription = json!({
            "id": id, "object": "subscription", "customer": customer, "status": "incomplete",
            "metadata": {}, "cancel_at_period_end": false, "cancel_at": null,
            "canceled_at": null, "ended_at": null, "created": t, "livemode": false,
            "items": {"object": "list", "has_more": false, "data": [{
                "id": self.next_id("si"), "object": "subscription_item",
                "price": {"id": price, "object": "price"},
                "current_period_start": t, "current_period_end": t + 30 * 86_400}]},
        });
        self.subscriptions.insert(id.clone(), subscription.clone());
        self.emit("customer.subscription.created", subscription);
        let session_id = self.next_id("cs_test");
        let session = json!({
            "id": session_id, "object": "checkout.session", "mode": "subscription",
            "status": "complete", "payment_status": "paid", "customer": customer,
            "client_reference_id": user, "metadata": {}, "subscription": id,
            "payment_intent": null, "amount_total": AMOUNT, "currency": CURRENCY,
            "created": t, "expires_at": t + 86_400, "livemode": false, "url": null,
        });
        self.sessions.insert(session_id.clone(), session.clone());
        self.session_order.push(session_id);
        self.emit("checkout.session.completed", session);
        self.set_subscription_status(&id, "active")
            .expect("just made");
        let invoice_id = self.next_id("in");
        let invoice = json!({
            "id": invoice_id, "object": "invoice", "customer": customer, "status": "paid",
            "amount_due": AMOUNT, "amount_paid": AMOUNT, "currency": CURRENCY,
            "billing_reason": "subscription_create", "attempt_count": 1,
            "hosted_invoice_url": format!("https://invoice.stripe.com/i/{invoice_id}"),
            "parent": {"type": "subscription_details",
                       "subscription_details": {"subscription": id, "metadata": {}}},
            "period_start": t, "period_end": t, "next_payment_attempt": null,
            "created": t, "livemode": false,
        });
        self.invoices.insert(invoice_id, invoice.clone());
        self.emit("invoice.paid", invoice);
        id
    }

    /// A renewal of a subscription whose first attempt fails and second succeeds: the invoice
    /// open (`invoice.payment_failed`), then paid (`invoice.paid`). Returns the invoice id.
    pub fn renew(&mut self, subscription: &str) -> Result<String, String> {
        let Some(sub) = self.subscriptions.get(subscription).cloned() else {
            return Err(format!("no such subscription {subscription}"));
        };
        let id = self.next_id("in");
        let t = now();
        let mut invoice = json!({
            "id": id, "object": "invoice", "customer": sub["customer"], "status": "open",
            "amount_due": AMOUNT, "amount_paid": 0, "currency": CURRENCY,
            "billing_reason": "subscription_cycle", "attempt_count": 1,
            "hosted_invoice_url": format!("https://invoice.stripe.com/i/{id}"),
            "parent": {"type": "subscription_details",
                       "subscription_details": {"subscription": subscription, "metadata": {}}},
            "period_start": t, "period_end": t, "next_payment_attempt": t + 86_400,
            "created": t, "livemode": false,
        });
        self.invoices.insert(id.clone(), invoice.clone());
        self.emit("invoice.payment_failed", invoice.clone());
        invoice["status"] = json!("paid");
        invoice["amount_paid"] = json!(AMOUNT);
        invoice["attempt_count"] = json!(2);
        invoice["next_payment_attempt"] = Value::Null;
        self.invoices.insert(id.clone(), invoice.clone());
        self.emit("invoice.paid", invoice);
        Ok(id)
    }

    /// A subscription moves to `status` (`canceled`: it ends, `customer.subscription.deleted`).
    pub fn set_subscription_status(&mut self, id: &str, status: &str) -> Result<(), String> {
        let Some(sub) = self.subscriptions.get_mut(id) else {
            return Err(format!("no such subscription {id}"));
        };
        if sub["status"] == "canceled" {
            return Err("a canceled subscription stays canceled".into());
        }
        sub["status"] = json!(status);
        if status == "canceled" {
            sub["canceled_at"] = json!(now());
            sub["ended_at"] = json!(now());
        }
        let sub = sub.clone();
        let type_ = if status == "canceled" {
            "customer.subscription.deleted"
        } else {
            "customer.subscription.updated"
        };
        self.emit(type_, sub);
        Ok(())
    }

    /// Holds an object as Stripe would (a test's own fixture: the event naming it can then be
    /// read back), by its `object` type.
    pub fn hold(&mut self, object: &Value) {
        let id = object["id"].as_str().unwrap_or_default().to_owned();
        match object["object"].as_str() {
            Some("subscription") => {
                self.subscriptions.insert(id, object.clone());
            }
            Some("invoice") => {
                self.invoices.insert(id, object.clone());
            }
            Some("checkout.session") => {
                if !self.sessions.contains_key(&id) {
                    self.session_order.push(id.clone());
                }
                self.sessions.insert(id, object.clone());
            }
            _ => {}
        }
    }

    /// The refunds of a payment, newest first.
    pub fn refunds_of(&self, pi: &str) -> Vec<Value> {
        self.refunds
            .iter()
            .rev()
            .filter(|r| r["payment_intent"] == json!(pi))
            .cloned()
            .collect()
    }

    /// The disputes of a payment, newest first.
    pub fn disputes_of(&self, pi: &str) -> Vec<Value> {
        let mut disputes: Vec<Value> = self
            .disputes
            .values()
            .filter(|d| d["payment_intent"] == json!(pi))
            .cloned()
            .collect();
        disputes.sort_by(|a, b| b["id"].as_str().cmp(&a["id"].as_str()));
        disputes
    }
}

/// Stripe's 404 body.
pub fn missing(object: &str, id: &str) -> Value {
    error_body(
        "invalid_request_error",
        Some("resource_missing"),
        &format!("No such {object}: '{id}'"),
    )
}
