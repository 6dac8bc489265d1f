//! The webhook end to end: Stripe-Signature to rows in PostgreSQL. Every event is a
//! notification: the webhook reads the object it names from the fake Stripe, which holds what
//! the test made happen (a payment, a refund, a subscription's life).

use shared::clock::Clock;
use std::time::Duration;

use serde_json::{json, Value};
use shared::config::{Secret, StripeMode};
use shared::store::Store;
use testkit::apps;
use testkit::db::TestDb;
use testkit::fixtures::{self, FunctionUrlRequest};
use testkit::stripe_fake::{FakeStripe, AMOUNT};
use tokio_postgres::Client;
use webhook::{Config, State};

const SECRET: &str = apps::WEBHOOK_SECRET;

struct App {
    db: TestDb,
    sql: Client,
    stripe: FakeStripe,
    state: State,
    metrics: apps::MetricLines,
}

fn config(url: &str, stripe: &FakeStripe, secrets: &[&str]) -> Config {
    Config {
        secrets: secrets.iter().map(|s| Secret::new(*s)).collect(),
        ..apps::webhook_config(apps::store_config(url), &stripe.uri())
    }
}

fn state_for(url: &str, stripe: &FakeStripe, secrets: &[&str]) -> (State, apps::MetricLines) {
    apps::webhook_state(
        config(url, stripe, secrets),
        Store::postgres(url, 2).expect("store"),
    )
}

async fn spawn_app() -> App {
    let db = TestDb::new().await;
    let sql = db.client().await;
    let stripe = FakeStripe::start().await;
    let (state, metrics) = state_for(&db.url, &stripe, &[SECRET]);
    App {
        db,
        sql,
        stripe,
        state,
        metrics,
    }
}

impl App {
    async fn deliver(&self, event: &Value) -> (u16, Value) {
        let body = fixtures::body(event);
        let request = FunctionUrlRequest::post("/api/stripe/webhook", &body)
            .header("stripe-signature", &fixtures::sign(&body, SECRET));
        self.send(request).await
    }

    /// Delivers every event the fake emitted, in its order; the answers.
    async fn deliver_all(&self) -> Vec<(u16, Value)> {
        let mut answers = Vec::new();
        for event in self.stripe.take_events() {
            answers.push(self.deliver(&event).await);
        }
        answers
    }

    async fn send(&self, request: FunctionUrlRequest) -> (u16, Value) {
        send_to(&self.state, request).await
    }

    async fn user(&self) -> String {
        self.db.create_user(&self.sql).await.to_string()
    }

    /// An order of `user` with a session of ours at the fake, open (created two minutes ago).
    async fn order_with_session(&self, user: &str) -> (String, String) {
        let order: String = self
            .sql
            .query_one(
                "insert into orders (user_id) values ($1::text::uuid) returning id::text",
                &[&user],
            )
            .await
            .expect("insert order")
            .get(0);
        let session = self.stripe.session_for_order(user, &order);
        self.sql
            .execute(
                "update orders set stripe_checkout_session_id = $2,
                   session_created_at = now() - interval '2 minutes' where id = $1::text::uuid",
                &[&order, &session],
            )
            .await
            .expect("attach");
        (order, session)
    }

    /// The invoice.paid fixture, its invoice held at the fake: a valid delivery of it applies.
    fn invoice_body(&self) -> Vec<u8> {
        let mut event = fixtures::load("stripe/invoice.paid.dahlia.json");
        fixtures::set(&mut event, "/created", json!(fixtures::now()));
        self.stripe.hold(&event["data"]["object"]);
        fixtures::body(&event)
    }

    async fn scalar<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> T {
        self.sql.query_one(sql, &[]).await.expect(sql).get(0)
    }

    async fn count(&self, sql: &str) -> i64 {
        self.scalar::<i64>(sql).await
    }

    fn metric_total(&self, name: &str) -> f64 {
        apps::metric_total(&self.metrics, name)
    }

    /// Audit rows of `kind`.
    async fn audits(&self, kind: &str) -> i64 {
        let sql = format!("select count(*) from payment_audit where kind = '{kind}'");
        self.count(&sql).await
    }

    /// Entitlement rows, active or not.
    async fn entitlements(&self) -> i64 {
        self.count("select count(*) from entitlements").await
    }

    async fn status_of(&self, order: &str) -> String {
        self.scalar(&format!("select status from orders where id = '{order}'"))
            .await
    }
}

async fn send_to(state: &State, request: FunctionUrlRequest) -> (u16, Value) {
    let response = match request.into_request() {
        Ok(request) => webhook::handle(state, request).await,
        Err(response) => response,
    };
    (response.status().as_u16(), fixtures::json_body(&response))
}

#[tokio::test]
async fn paid_checkout_marks_order_paid_and_grants_the_report() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (order, session) = app.order_with_session(&user).await;
    let pi = app.stripe.pay(&session).unwrap();
    let mut events = app.stripe.take_events();
    // The event's own payload is kept as received (non-ASCII text included).
    fixtures::set(
        &mut events[0],
        "/data/object/customer_details",
        json!({"name": "张伟 Zoë"}),
    );

    let (status, body) = app.deliver(&events[0]).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "applied");
    assert_eq!(body["event_id"], events[0]["id"]);
    let row = app
        .sql
        .query_one(
            "select status, amount_total, currency, stripe_payment_intent_id, paid_at is not null
             from orders where id = $1::text::uuid",
            &[&order],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "paid");
    assert_eq!(row.get::<_, Option<i64>>(1), Some(AMOUNT));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("usd"));
    assert_eq!(row.get::<_, Option<String>>(3), Some(pi.clone()));
    assert!(row.get::<_, bool>(4));
    assert_eq!(
        app.count(&format!("select count(*) from entitlements where user_id = '{user}' and product = 'full_report' and active")).await,
        1
    );
    assert_eq!(
        app.count(&format!(
            "select count(*) from payment_audit where kind = 'order_paid' and amount = {AMOUNT}"
        ))
        .await,
        1
    );
    let (outcome, payload_name): (String, String) = {
        let r = app.sql.query_one("select outcome, payload #>> '{data,object,customer_details,name}' from stripe_events", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(outcome, "applied");
    assert_eq!(payload_name, "张伟 Zoë");
    // What was stored is what Stripe holds, read back: the session, its payment and charge.
    let fact: Value = app
        .scalar(&format!(
            "select jsonb_build_object('session', s.status, 'intent', p.status, 'charge', p.charge_id)
             from stripe_sessions s join stripe_payments p on p.id = s.payment_intent_id
             where s.id = '{session}'"
        ))
        .await;
    assert_eq!(
        fact,
        json!({"session": "complete", "intent": "succeeded",
               "charge": app.stripe.charge(&pi).unwrap()["id"]})
    );
    assert!(
        app.metric_total("OrderSyncDelay") >= 100_000.0,
        "session created 2 minutes before payment"
    );
    assert_eq!(app.metric_total("Processed"), 1.0);
    assert!(app.metric_total("StripeLatency") > 0.0);
}

#[tokio::test]
async fn the_event_payload_decides_nothing_the_object_read_does() {
    // A delivery whose payload says `paid` about a session Stripe shows open: nothing is paid.
    let app = spawn_app().await;
    let user = app.user().await;
    let (order, session) = app.order_with_session(&user).await;
    let mut forged = fixtures::checkout_event(
        "checkout.session.completed",
        &session,
        &order,
        &user,
        "paid",
    );
    fixtures::set(&mut forged, "/data/object/status", json!("complete"));

    let (status, body) = app.deliver(&forged).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(app.status_of(&order).await, "pending");
    assert_eq!(
        app.count("select count(*) from entitlements where active")
            .await,
        0
    );
    assert_eq!(
        app.scalar::<String>(&format!(
            "select status from stripe_sessions where id = '{session}'"
        ))
        .await,
        "open"
    );
}

#[tokio::test]
async fn duplicate_event_is_applied_once() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (_, session) = app.order_with_session(&user).await;
    app.stripe.pay(&session).unwrap();
    let event = app.stripe.take_events().remove(0);

    let first = app.deliver(&event).await;
    let second = app.deliver(&event).await;

    assert_eq!(first.0, 200);
    assert_eq!(
        second,
        (
            200,
            json!({"received": true, "event_id": event["id"], "outcome": "duplicate"})
        )
    );
    assert_eq!(app.count("select count(*) from stripe_events").await, 1);
    assert_eq!(app.count("select count(*) from payment_audit").await, 1);
    assert_eq!(app.metric_total("Duplicates"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_deliveries_apply_once() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (_, session) = app.order_with_session(&user).await;
    app.stripe.pay(&session).unwrap();
    let event = app.stripe.take_events().remove(0);
    let body = fixtures::body(&event);
    // Twenty Lambda instances: each its own state and connection.
    let states: Vec<State> = (0..20)
        .map(|_| state_for(&app.db.url, &app.stripe, &[SECRET]).0)
        .collect();

    let deliveries = states.iter().map(|state| {
        let request = FunctionUrlRequest::post("/", &body)
            .header("stripe-signature", &fixtures::sign(&body, SECRET));
        send_to(state, request)
    });
    let results = futures::future::join_all(deliveries).await;

    assert!(
        results.iter().all(|(status, _)| *status == 200),
        "{results:?}"
    );
    let applied = results
        .iter()
        .filter(|(_, b)| b["outcome"] == "applied")
        .count();
    let duplicates = results
        .iter()
        .filter(|(_, b)| b["outcome"] == "duplicate")
        .count();
    assert_eq!((applied, duplicates), (1, 19));
    assert_eq!(app.audits("order_paid").await, 1);
    assert_eq!(app.entitlements().await, 1);
}

#[tokio::test]
async fn unpaid_completion_then_async_success_pays_the_order() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (order, session) = app.order_with_session(&user).await;

    app.stripe.pay_async(&session).unwrap();
    assert_eq!(app.deliver_all().await[0].1["outcome"], "applied");
    assert_eq!(app.status_of(&order).await, "processing");
    assert_eq!(
        app.count("select count(*) from entitlements where active")
            .await,
        0
    );

    app.stripe.settle_async(&session, true).unwrap();
    assert_eq!(app.deliver_all().await[0].1["outcome"], "applied");
    assert_eq!(app.status_of(&order).await, "paid");
    assert_eq!(
        app.count("select count(*) from entitlements where active")
            .await,
        1
    );
    assert_eq!(
        app.scalar::<String>("select string_agg(kind, ',' order by id) from payment_audit")
            .await,
        "order_processing,order_paid"
    );
}

#[tokio::test]
async fn async_payment_failure_fails_the_order() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (order, session) = app.order_with_session(&user).await;
    app.stripe.pay_async(&session).unwrap();
    app.deliver_all().await;

    app.stripe.settle_async(&session, false).unwrap();
    let answers = app.deliver_all().await;

    assert_eq!(
        (answers[0].0, answers[0].1["outcome"].as_str()),
        (200, Some("applied"))
    );
    assert_eq!(app.status_of(&order).await, "failed");
    assert_eq!(
        app.scalar::<String>(&format!(
            "select p.status from stripe_payments p join orders o on o.stripe_payment_intent_id = p.id where o.id = '{order}'"
        ))
        .await,
        "requires_payment_method"
    );
    assert_eq!(app.audits("order_payment_failed").await, 1);
    assert_eq!(app.entitlements().await, 1, "the row exists, inactive");
    assert_eq!(
        app.count("select count(*) from entitlements where active")
            .await,
        0
    );
}

#[tokio::test]
async fn expired_session_expires_its_order_and_a_late_expiry_event_never_unpays_one() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (pending, session) = app.order_with_session(&user).await;
    assert!(app.stripe.expire(&session));
    assert_eq!(app.deliver_all().await[0].1["outcome"], "applied");
    assert_eq!(app.status_of(&pending).await, "expired");

    // An expiry event about a session that was paid since (Stripe's order of events is not
    // promised): the session read back is complete and paid.
    let other = app.user().await;
    let (paid, session) = app.order_with_session(&other).await;
    let late = fixtures::checkout_event(
        "checkout.session.expired",
        &session,
        &paid,
        &other,
        "unpaid",
    );
    app.stripe.pay(&session).unwrap();
    app.deliver_all().await;
    assert_eq!(app.deliver(&late).await.1["outcome"], "applied");
    assert_eq!(app.status_of(&paid).await, "paid");
}

#[tokio::test]
async fn refunds_and_disputes_settle_the_order_from_what_stripe_says() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (order, session) = app.order_with_session(&user).await;
    let pi = app.stripe.pay(&session).unwrap();
    app.deliver_all().await;

    app.stripe.refund(&pi, Some(500)).unwrap();
    assert_eq!(app.deliver_all().await[0].1["outcome"], "applied");
    assert_eq!(app.status_of(&order).await, "paid");
    assert_eq!(
        app.scalar::<i64>(&format!(
            "select amount_refunded from orders where id = '{order}'"
        ))
        .await,
        500
    );
    let dispute = app.stripe.dispute(&pi).unwrap();
    app.deliver_all().await;
    assert_eq!(app.status_of(&order).await, "disputed");
    app.stripe.close_dispute(&dispute, true).unwrap();
    app.deliver_all().await;
    assert_eq!(app.status_of(&order).await, "paid");
    let full = app.stripe.refund(&pi, None).unwrap();
    app.deliver_all().await;

    assert_eq!(app.status_of(&order).await, "refunded");
    assert_eq!(
        app.count("select count(*) from entitlements where active")
            .await,
        0
    );
    assert_eq!(
        app.scalar::<String>("select string_agg(kind, ',' order by id) from payment_audit")
            .await,
        "order_paid,order_partially_refunded,dispute_opened,dispute_won,order_refunded"
    );
    assert_eq!(app.metric_total("Refunds"), 2.0);
    assert_eq!(app.metric_total("Disputes"), 1.0);

    // The full refund fails (a closed card): the money is the merchant's again.
    app.stripe
        .fail_refund(full["id"].as_str().unwrap())
        .unwrap();
    app.deliver_all().await;
    assert_eq!(app.status_of(&order).await, "paid");
    assert_eq!(
        app.count("select count(*) from entitlements where active")
            .await,
        1
    );
    assert_eq!(app.audits("refund_reversed").await, 1);
}

#[tokio::test]
async fn a_paid_session_of_another_channel_is_granted_only_for_our_price() {
    let app = spawn_app().await;
    let user = app.user().await;
    let other = app
        .stripe
        .foreign_session(&user, "price_something_else", 500);
    app.stripe.pay(&other).unwrap();

    let answers = app.deliver_all().await;

    assert_eq!(
        (answers[0].0, answers[0].1["outcome"].clone()),
        (200, json!("unmatched"))
    );
    assert_eq!(app.count("select count(*) from orders").await, 0);
    assert_eq!(
        app.count("select count(*) from entitlements where active")
            .await,
        0
    );
    assert_eq!(app.audits("session_unverified").await, 1);
    assert_eq!(app.metric_total("UnverifiedSessions"), 1.0);
    assert_eq!(
        app.scalar::<Option<bool>>(&format!(
            "select sells_product from stripe_sessions where id = '{other}'"
        ))
        .await,
        Some(false)
    );

    let link = app.stripe.foreign_session(&user, apps::PRICE, AMOUNT);
    app.stripe.pay(&link).unwrap();
    app.deliver_all().await;
    assert_eq!(
        app.count("select count(*) from entitlements where active")
            .await,
        1
    );
}

#[tokio::test]
async fn session_for_an_unknown_user_is_recorded_as_unmatched() {
    let app = spawn_app().await;
    let stranger = uuid::Uuid::new_v4().to_string();
    let link = app.stripe.foreign_session(&stranger, apps::PRICE, AMOUNT);
    app.stripe.pay(&link).unwrap();

    let answers = app.deliver_all().await;

    assert_eq!(
        (answers[0].0, answers[0].1["outcome"].as_str()),
        (200, Some("unmatched"))
    );
    assert_eq!(app.count("select count(*) from orders").await, 0);
    assert_eq!(
        app.scalar::<String>("select outcome from stripe_events")
            .await,
        "unmatched"
    );
    assert_eq!(app.metric_total("Unmatched"), 1.0);
}

#[tokio::test]
async fn an_object_stripe_does_not_know_is_recorded_as_unmatched() {
    let app = spawn_app().await;
    let event = fixtures::charge_refunded_event("pi_nobody_knows", 1900, 1900);

    let (status, body) = app.deliver(&event).await;

    assert_eq!((status, body["outcome"].as_str()), (200, Some("unmatched")));
    assert!(app
        .scalar::<String>("select detail from stripe_events")
        .await
        .contains("Stripe does not know it"),);
}

#[tokio::test]
async fn second_paid_order_for_the_same_product_is_refunded() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (first, a) = app.order_with_session(&user).await;
    app.stripe.pay(&a).unwrap();
    app.deliver_all().await;
    app.sql
        .execute("update orders set closed_reason = 'completed'", &[])
        .await
        .unwrap();
    let (second, b) = app.order_with_session(&user).await;
    let pi = app.stripe.pay(&b).unwrap();

    app.deliver_all().await;
    app.deliver_all().await;

    assert_eq!(app.status_of(&first).await, "paid");
    assert_eq!(app.status_of(&second).await, "refunded");
    assert_eq!(app.audits("duplicate_payment").await, 1);
    assert_eq!(app.audits("duplicate_refunded").await, 1);
    assert_eq!(app.metric_total("DuplicatePayments"), 1.0);
    assert_eq!(app.metric_total("DuplicateRefunds"), 1.0);
    assert_eq!(app.stripe.charge(&pi).unwrap()["refunded"], true);
}

/// A subscription of the fixture's shape for the customer `cus_QXg1o8vcGmoR32`, held at the fake.
fn subscription_event(app: &App, fixture: &str, status: &str, created: i64) -> Value {
    let mut event = fixtures::load(fixture);
    fixtures::set(&mut event, "/id", json!(fixtures::event_id()));
    fixtures::set(&mut event, "/created", json!(created));
    fixtures::set(&mut event, "/data/object/status", json!(status));
    app.stripe.hold(&event["data"]["object"]);
    event
}

async fn link_customer(app: &App, user: &str) {
    app.sql
        .execute(
            "insert into stripe_customers (stripe_customer_id, user_id) values ('cus_QXg1o8vcGmoR32', $1::text::uuid)",
            &[&user],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn subscription_lifecycle_in_both_api_shapes() {
    let app = spawn_app().await;
    let user = app.user().await;
    link_customer(&app, &user).await;
    let t = fixtures::now();

    let mut created = subscription_event(
        &app,
        "stripe/customer.subscription.updated.acacia.json",
        "active",
        t - 30,
    );
    fixtures::set(
        &mut created,
        "/type",
        json!("customer.subscription.created"),
    );
    assert_eq!(app.deliver(&created).await.1["outcome"], "applied");
    let row = app
        .sql
        .query_one("select status, user_id::text, price_id, extract(epoch from current_period_end)::bigint from subscriptions", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "active");
    assert_eq!(row.get::<_, Option<String>>(1), Some(user.clone()));
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("price_1PgafmB7WZ01zgkW6dKueIc5")
    );
    assert_eq!(row.get::<_, i64>(3), 1_798_322_400);

    let updated = subscription_event(
        &app,
        "stripe/customer.subscription.updated.dahlia.json",
        "past_due",
        t - 20,
    );
    assert_eq!(app.deliver(&updated).await.1["outcome"], "applied");
    assert_eq!(
        app.scalar::<String>("select status from subscriptions")
            .await,
        "past_due"
    );
    assert_eq!(
        app.scalar::<i64>(
            "select extract(epoch from current_period_end)::bigint from subscriptions"
        )
        .await,
        1_798_322_400,
        "period read from the item in the new shape"
    );
    assert!(
        app.scalar::<bool>("select active from entitlements where product = 'subscription'")
            .await
    );

    let mut deleted = subscription_event(
        &app,
        "stripe/customer.subscription.updated.dahlia.json",
        "canceled",
        t - 10,
    );
    fixtures::set(
        &mut deleted,
        "/type",
        json!("customer.subscription.deleted"),
    );
    assert_eq!(app.deliver(&deleted).await.1["outcome"], "applied");
    assert_eq!(
        app.scalar::<String>("select status from subscriptions")
            .await,
        "canceled"
    );
    assert!(
        !app.scalar::<bool>("select active from entitlements where product = 'subscription'")
            .await
    );
}

#[tokio::test]
async fn a_late_event_stores_the_subscription_as_stripe_holds_it_now() {
    // Events of the same second (or out of order) cannot be ordered by `created`; the object
    // read back is the newest state whatever the event says.
    let app = spawn_app().await;
    let t = fixtures::now();
    let canceled = subscription_event(
        &app,
        "stripe/customer.subscription.updated.dahlia.json",
        "canceled",
        t,
    );
    let mut late = canceled.clone();
    fixtures::set(&mut late, "/id", json!(fixtures::event_id()));
    fixtures::set(&mut late, "/type", json!("customer.subscription.created"));
    fixtures::set(&mut late, "/data/object/status", json!("active"));

    assert_eq!(app.deliver(&canceled).await.1["outcome"], "applied");
    let (status, body) = app.deliver(&late).await;

    assert_eq!((status, body["outcome"].as_str()), (200, Some("applied")));
    assert_eq!(
        app.scalar::<String>("select status from subscriptions")
            .await,
        "canceled"
    );
}

#[tokio::test]
async fn invoice_events_in_both_shapes_store_the_invoice_and_audit_once() {
    let app = spawn_app().await;
    let user = app.user().await;
    link_customer(&app, &user).await;
    let t = fixtures::now();

    let mut failed = fixtures::load("stripe/invoice.payment_failed.acacia.json");
    fixtures::set(&mut failed, "/created", json!(t - 100));
    app.stripe.hold(&failed["data"]["object"]);
    assert_eq!(app.deliver(&failed).await.1["outcome"], "applied");
    let row = app
        .sql
        .query_one(
            "select status, subscription_id, user_id::text, attempt_count from invoices",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("open"));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("sub_1Pgc6rB7WZ01zgkWNy0Cn5nw")
    );
    assert_eq!(row.get::<_, Option<String>>(2), Some(user.clone()));
    assert_eq!(row.get::<_, i32>(3), 1);

    let mut paid = fixtures::load("stripe/invoice.paid.dahlia.json");
    fixtures::set(&mut paid, "/created", json!(t - 50));
    app.stripe.hold(&paid["data"]["object"]);
    let mut succeeded = paid.clone();
    fixtures::set(&mut succeeded, "/id", json!(fixtures::event_id()));
    fixtures::set(&mut succeeded, "/type", json!("invoice.payment_succeeded"));
    assert_eq!(app.deliver(&paid).await.1["outcome"], "applied");
    assert_eq!(app.deliver(&succeeded).await.1["outcome"], "applied");

    let row = app
        .sql
        .query_one(
            "select status, amount_paid, subscription_id, paid_at is not null from invoices",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("paid"));
    assert_eq!(row.get::<_, i64>(1), 2000);
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("sub_1Pgc6rB7WZ01zgkWNy0Cn5nw")
    );
    assert!(row.get::<_, bool>(3));
    assert_eq!(app.audits("invoice_paid").await, 1);
    assert_eq!(app.audits("invoice_payment_failed").await, 1);

    // A failed attempt delivered late reads the invoice as it is: paid.
    let mut late = fixtures::load("stripe/invoice.payment_failed.acacia.json");
    fixtures::set(&mut late, "/id", json!(fixtures::event_id()));
    fixtures::set(&mut late, "/created", json!(t - 10));
    assert_eq!(app.deliver(&late).await.0, 200);
    assert_eq!(
        app.scalar::<Option<String>>("select status from invoices")
            .await
            .as_deref(),
        Some("paid")
    );
}

#[tokio::test]
async fn unknown_event_type_is_recorded_as_ignored() {
    let app = spawn_app().await;
    let event = json!({"id": fixtures::event_id(), "object": "event", "type": "customer.created",
        "created": fixtures::now(), "livemode": false, "api_version": "2026-07-29.dahlia",
        "data": {"object": {"id": "cus_1", "object": "customer"}}});

    let (status, body) = app.deliver(&event).await;

    assert_eq!((status, body["outcome"].as_str()), (200, Some("ignored")));
    assert_eq!(
        app.scalar::<String>("select type || ':' || outcome from stripe_events")
            .await,
        "customer.created:ignored"
    );
    assert!(
        app.stripe.requests("GET").await.is_empty(),
        "nothing to read for it"
    );
}

#[tokio::test]
async fn stripe_down_while_reading_is_a_503_and_nothing_is_stored() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (order, session) = app.order_with_session(&user).await;
    app.stripe.pay(&session).unwrap();
    let event = app.stripe.take_events().remove(0);
    app.stripe.delay(Some(Duration::from_secs(3)));

    let (status, body) = app.deliver(&event).await;

    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("payment_provider_unavailable")),
        "{body}"
    );
    assert_eq!(app.count("select count(*) from stripe_events").await, 0);
    app.stripe.delay(None);
    assert_eq!(app.deliver(&event).await.1["outcome"], "applied");
    assert_eq!(app.status_of(&order).await, "paid");
}

async fn assert_rejected(app: &App, request: FunctionUrlRequest, status: u16, code: &str) {
    let (got, body) = app.send(request).await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    assert!(body["error"]["request_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    assert_eq!(
        app.count("select count(*) from stripe_events").await,
        0,
        "nothing stored"
    );
}

#[tokio::test]
async fn bad_signature_is_rejected_and_nothing_stored() {
    let app = spawn_app().await;
    let body = app.invoice_body();
    let forged = fixtures::sign(&body, "whsec_someone_else");
    assert_rejected(
        &app,
        FunctionUrlRequest::post("/", &body).header("stripe-signature", &forged),
        400,
        "signature_mismatch",
    )
    .await;
    assert_rejected(
        &app,
        FunctionUrlRequest::post("/", &body),
        400,
        "missing_signature",
    )
    .await;
    assert_rejected(
        &app,
        FunctionUrlRequest::post("/", &body).header("stripe-signature", "garbage"),
        400,
        "malformed_signature",
    )
    .await;
    assert_eq!(app.metric_total("SignatureFailures"), 3.0);
}

#[tokio::test]
async fn signature_over_a_different_body_is_rejected() {
    let app = spawn_app().await;
    let body = app.invoice_body();
    let header = fixtures::sign(&body, SECRET);
    let mut other = body.clone();
    let last = other.len() - 2;
    other[last] = b' ';
    assert_rejected(
        &app,
        FunctionUrlRequest::post("/", &other).header("stripe-signature", &header),
        400,
        "signature_mismatch",
    )
    .await;
}

#[tokio::test]
async fn expired_timestamp_is_rejected() {
    let app = spawn_app().await;
    let body = app.invoice_body();
    let old = shared::stripe::signature::sign(&body, &Secret::new(SECRET), fixtures::now() - 301);
    assert_rejected(
        &app,
        FunctionUrlRequest::post("/", &body).header("stripe-signature", &old),
        400,
        "timestamp_outside_tolerance",
    )
    .await;
}

/// The tolerance is judged by the function's clock, not the test's: a delivery signed now is
/// refused by a webhook whose clock runs 301 s ahead, and accepted by one 290 s ahead.
#[tokio::test]
async fn the_tolerance_follows_the_functions_clock() {
    let mut app = spawn_app().await;
    let body = app.invoice_body();
    let now = shared::stripe::signature::sign(&body, &Secret::new(SECRET), fixtures::now());
    app.state.clock = Clock::shifted_ms(301_000);
    assert_rejected(
        &app,
        FunctionUrlRequest::post("/", &body).header("stripe-signature", &now),
        400,
        "timestamp_outside_tolerance",
    )
    .await;
    app.state.clock = Clock::shifted_ms(290_000);
    let (status, answer) = app
        .send(FunctionUrlRequest::post("/", &body).header("stripe-signature", &now))
        .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn rotated_secret_is_accepted_during_rotation() {
    let app = spawn_app().await;
    let (state, _) = state_for(
        &app.db.url,
        &app.stripe,
        &["whsec_old_secret", "whsec_new_secret"],
    );
    let body = app.invoice_body();
    let t = fixtures::now();
    let old = shared::stripe::signature::sign(&body, &Secret::new("whsec_old_secret"), t);
    let new = shared::stripe::signature::sign(&body, &Secret::new("whsec_new_secret"), t);
    // Stripe's header during a roll: one v1 per active secret.
    let header = format!("{new},v1={}", old.split("v1=").nth(1).unwrap());

    let (status, body_json) = send_to(
        &state,
        FunctionUrlRequest::post("/", &body).header("stripe-signature", &header),
    )
    .await;
    assert_eq!(
        (status, body_json["outcome"].as_str()),
        (200, Some("applied"))
    );

    // And an endpoint still on the new secret alone accepts the header signed with it.
    let (only_new, _) = state_for(&app.db.url, &app.stripe, &["whsec_new_secret"]);
    let (status, body_json) = send_to(
        &only_new,
        FunctionUrlRequest::post("/", &body).header("stripe-signature", &header),
    )
    .await;
    assert_eq!(
        (status, body_json["outcome"].as_str()),
        (200, Some("duplicate"))
    );
}

#[tokio::test]
async fn malformed_json_is_rejected() {
    let app = spawn_app().await;
    for body in [
        &b"{not json"[..],
        b"[]",
        b"{\"id\":\"evt_1\"}",
        b"{\"hello\":\"world\"}",
    ] {
        let header = fixtures::sign(body, SECRET);
        assert_rejected(
            &app,
            FunctionUrlRequest::post("/", body).header("stripe-signature", &header),
            400,
            "invalid_event",
        )
        .await;
    }
}

#[tokio::test]
async fn live_event_sent_to_a_test_endpoint_is_rejected() {
    let app = spawn_app().await;
    let mut event = fixtures::load("stripe/invoice.paid.dahlia.json");
    fixtures::set(&mut event, "/livemode", json!(true));
    let body = fixtures::body(&event);
    let header = fixtures::sign(&body, SECRET);
    assert_rejected(
        &app,
        FunctionUrlRequest::post("/", &body).header("stripe-signature", &header),
        400,
        "livemode_mismatch",
    )
    .await;
}

#[tokio::test]
async fn test_event_sent_to_a_live_endpoint_is_rejected() {
    let mut app = spawn_app().await;
    app.state.config.stripe_mode = StripeMode::Live;
    let body = app.invoice_body();
    let header = fixtures::sign(&body, SECRET);
    assert_rejected(
        &app,
        FunctionUrlRequest::post("/", &body).header("stripe-signature", &header),
        400,
        "livemode_mismatch",
    )
    .await;
}

#[tokio::test]
async fn base64_body_with_non_ascii_text_verifies() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (_, session) = app.order_with_session(&user).await;
    app.stripe.pay(&session).unwrap();
    let mut event = app.stripe.take_events().remove(0);
    fixtures::set(
        &mut event,
        "/data/object/customer_details",
        json!({"name": "张伟 Zoë"}),
    );
    let body = fixtures::body(&event);
    assert!(std::str::from_utf8(&body).unwrap().contains("张伟"));
    let request = FunctionUrlRequest::post("/", &body)
        .base64()
        .header("stripe-signature", &fixtures::sign(&body, SECRET));

    let (status, response) = app.send(request).await;

    assert_eq!(
        (status, response["outcome"].as_str()),
        (200, Some("applied"))
    );
}

#[tokio::test]
async fn invalid_base64_body_is_a_400() {
    let app = spawn_app().await;
    let request = FunctionUrlRequest::post("/", b"{}")
        .raw_body("***not base64***", true)
        .header("stripe-signature", "t=1,v1=00");
    assert_rejected(&app, request, 400, "invalid_body_encoding").await;
}

#[tokio::test]
async fn wrong_method_content_type_and_size_are_clear_4xx() {
    let mut app = spawn_app().await;
    let body = app.invoice_body();
    let header = fixtures::sign(&body, SECRET);
    assert_rejected(
        &app,
        FunctionUrlRequest::post("/", &body).method("GET"),
        405,
        "method_not_allowed",
    )
    .await;
    assert_rejected(
        &app,
        FunctionUrlRequest::post("/", &body)
            .header("content-type", "text/plain")
            .header("stripe-signature", &header),
        415,
        "unsupported_media_type",
    )
    .await;
    app.state.config.max_body_bytes = 1024;
    assert_rejected(
        &app,
        FunctionUrlRequest::post("/", &body).header("stripe-signature", &header),
        413,
        "body_too_large",
    )
    .await;
}

#[tokio::test]
async fn method_not_allowed_names_the_allowed_method() {
    let app = spawn_app().await;
    let request = FunctionUrlRequest::post("/", b"")
        .method("PUT")
        .into_request()
        .unwrap();
    let response = webhook::handle(&app.state, request).await;
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_answers_503_and_redelivery_applies_once() {
    let db = TestDb::new().await;
    let sql = db.client().await;
    let stripe = FakeStripe::start().await;
    let proxy = testkit::proxy::DbProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let (state, metrics) = state_for(&proxy.url_through(&db.url), &stripe, &[SECRET]);
    let app = App {
        sql,
        stripe,
        state,
        metrics,
        db,
    };
    let user = app.user().await;
    let (order, session) = app.order_with_session(&user).await;
    app.stripe.pay(&session).unwrap();
    let event = app.stripe.take_events().remove(0);
    // Warm the pool, then take the database away mid-life.
    assert_eq!(app.deliver(&json!({"id": fixtures::event_id(), "type": "customer.created", "created": fixtures::now(),
        "livemode": false, "data": {"object": {}}})).await.0, 200);
    proxy.down();

    let (status, body) = app.deliver(&event).await;

    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("store_unavailable")),
        "{body}"
    );
    assert_eq!(
        app.status_of(&order).await,
        "pending",
        "nothing half-applied"
    );
    assert_eq!(
        app.count(&format!(
            "select count(*) from stripe_events where id = '{}'",
            event["id"].as_str().unwrap()
        ))
        .await,
        0
    );

    proxy.up();
    let (status, body) = app.deliver(&event).await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("applied")),
        "{body}"
    );
    let (status, body) = app.deliver(&event).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("duplicate")));
    assert_eq!(app.status_of(&order).await, "paid");
    assert_eq!(app.count("select count(*) from payment_audit").await, 1);
}

#[tokio::test]
async fn config_needs_the_store_the_webhook_secret_and_a_stripe_key() {
    let vars = [
        ("DATABASE_URL", "postgres://postgres@127.0.0.1/x"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_x"),
        ("STRIPE_SECRET_KEY", "rk_test_x"),
    ];
    let config = Config::read(shared::config::EnvReader::new(|k| {
        vars.iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.to_string())
    }))
    .expect("minimal config");
    assert_eq!(config.stripe_mode, StripeMode::Test);
    assert_eq!(config.tolerance, Duration::from_secs(300));

    let err = Config::read(shared::config::EnvReader::new(|_| None)).unwrap_err();
    let names: Vec<_> = err.problems.iter().map(|p| p.variable).collect();
    assert_eq!(
        names,
        ["DATABASE_URL", "STRIPE_WEBHOOK_SECRET", "STRIPE_SECRET_KEY"]
    );
}
