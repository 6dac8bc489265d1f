//! The checkout function against the real PostgreSQL and a faked Stripe API.

use std::time::Duration;

use serde_json::{json, Value};
use shared::store::Store;
use shared::stripe::ids::PriceId;
use testkit::apps;
use testkit::db::TestDb;
use testkit::fixtures::{self, FunctionUrlRequest};
use testkit::stripe_fake::FakeStripe;
use testkit::tokens;
use tokio_postgres::Client;

const JWT_SECRET: &str = apps::JWT_SECRET;

struct App {
    db: TestDb,
    sql: Client,
    stripe: FakeStripe,
    state: checkout::State,
    metrics: apps::MetricLines,
}

fn state_for(
    db_url: &str,
    stripe_base: &str,
    tweak: impl FnOnce(&mut checkout::Config),
) -> (checkout::State, apps::MetricLines) {
    let mut config = apps::checkout_config(db_url, stripe_base);
    tweak(&mut config);
    apps::checkout_state(config, Store::postgres(db_url, 4).unwrap())
}

async fn spawn_app_with(tweak: impl FnOnce(&mut checkout::Config)) -> App {
    let db = TestDb::new().await;
    let sql = db.client().await;
    let stripe = FakeStripe::start().await;
    let (state, metrics) = state_for(&db.url, &stripe.uri(), tweak);
    App {
        db,
        sql,
        stripe,
        state,
        metrics,
    }
}

async fn spawn_app() -> App {
    spawn_app_with(|_| {}).await
}

fn token(user: &str) -> String {
    tokens::hs256(&tokens::user_claims(user, None), JWT_SECRET.as_bytes())
}

async fn call(
    state: &checkout::State,
    request: FunctionUrlRequest,
) -> (u16, Value, http::HeaderMap) {
    let response = match request.into_request() {
        Ok(request) => checkout::handle(state, request).await,
        Err(response) => response,
    };
    (
        response.status().as_u16(),
        fixtures::json_body(&response),
        response.headers().clone(),
    )
}

impl App {
    async fn user(&self) -> String {
        self.db.create_user(&self.sql).await.to_string()
    }

    async fn post(&self, user: &str) -> (u16, Value) {
        let (status, body, _) = call(
            &self.state,
            FunctionUrlRequest::post("/", b"{}").bearer(&token(user)),
        )
        .await;
        (status, body)
    }

    async fn poll(&self, user: &str, session: Option<&str>) -> (u16, Value) {
        let query = session
            .map(|s| format!("session_id={s}"))
            .unwrap_or_default();
        let (status, body, _) = call(
            &self.state,
            FunctionUrlRequest::get("/", &query).bearer(&token(user)),
        )
        .await;
        (status, body)
    }

    async fn scalar<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> T {
        self.sql.query_one(sql, &[]).await.expect(sql).get(0)
    }

    fn metric_total(&self, name: &str) -> f64 {
        apps::metric_total(&self.metrics, name)
    }

    /// The customer pays `session` at Stripe and its `checkout.session.completed` reaches the
    /// webhook.
    async fn webhook_completes(&self, session: &str) -> Value {
        let (state, _) = apps::webhook_state(
            apps::webhook_config(apps::store_config(&self.db.url), &self.stripe.uri()),
            Store::postgres(&self.db.url, 1).unwrap(),
        );
        if self
            .stripe
            .session(session)
            .is_some_and(|s| s["status"] == "open")
        {
            self.stripe.pay(session).unwrap();
        }
        let event = self
            .stripe
            .take_events()
            .into_iter()
            .find(|e| {
                e["type"] == "checkout.session.completed" && e["data"]["object"]["id"] == session
            })
            .expect("the completion of the session");
        let body = fixtures::body(&event);
        let request = FunctionUrlRequest::post("/", &body).header(
            "stripe-signature",
            &fixtures::sign(&body, apps::WEBHOOK_SECRET),
        );
        fixtures::json_body(&webhook::handle(&state, request.into_request().unwrap()).await)
    }

    /// How many `payment_audit` rows of `kind` there are.
    async fn audits(&self, kind: &str) -> i64 {
        let sql = "select count(*) from payment_audit where kind = $1";
        self.sql.query_one(sql, &[&kind]).await.unwrap().get(0)
    }
}

#[tokio::test]
async fn first_click_creates_one_session_and_stores_it_on_the_order() {
    let app = spawn_app().await;
    let user = app.user().await;

    let (status, body) = app.post(&user).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reused"], false);
    let session_id = body["session_id"].as_str().unwrap();
    assert!(body["url"]
        .as_str()
        .unwrap()
        .starts_with("https://checkout.stripe.com/c/pay/cs_test_"));
    let order_id = body["order_id"].as_str().unwrap();
    let row = app.sql.query_one(
        "select user_id::text, status, stripe_checkout_session_id, checkout_url, extract(epoch from checkout_expires_at - created_at)::int, session_claimed_until
         from orders where id = $1::text::uuid", &[&order_id]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), user);
    assert_eq!(row.get::<_, String>(1), "pending");
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some(session_id));
    assert_eq!(
        row.get::<_, Option<String>>(3).as_deref(),
        body["url"].as_str()
    );
    assert!(
        (7199..=7201).contains(&row.get::<_, i32>(4)),
        "expires_at = created_at + TTL"
    );
    assert!(
        row.get::<_, Option<std::time::SystemTime>>(5).is_none(),
        "lease released"
    );

    let creates = app.stripe.create_requests().await;
    assert_eq!(creates.len(), 1);
    let (key, form) = &creates[0];
    assert_eq!(key, &format!("checkout-{order_id}"));
    let get = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("mode"), Some("payment"));
    assert_eq!(get("line_items[0][price]"), Some("price_full_report_test"));
    assert_eq!(get("line_items[0][quantity]"), Some("1"));
    assert_eq!(get("client_reference_id"), Some(user.as_str()));
    assert_eq!(get("metadata[order_id]"), Some(order_id));
    assert_eq!(get("metadata[user_id]"), Some(user.as_str()));
    assert_eq!(
        get("success_url"),
        Some("https://app.example.com/report/success?session_id={CHECKOUT_SESSION_ID}")
    );
    assert_eq!(
        get("customer_email"),
        Some(format!("{}@example.com", &user[..8]).as_str())
    );
    assert_eq!(app.metric_total("SessionsCreated"), 1.0);
}

#[tokio::test]
async fn second_click_reuses_the_open_session() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (_, first) = app.post(&user).await;

    let (status, second) = app.post(&user).await;

    assert_eq!(status, 200);
    assert_eq!(second["reused"], true);
    assert_eq!(
        (
            second["url"].clone(),
            second["session_id"].clone(),
            second["order_id"].clone()
        ),
        (
            first["url"].clone(),
            first["session_id"].clone(),
            first["order_id"].clone()
        )
    );
    assert_eq!(app.stripe.create_requests().await.len(), 1);
    assert_eq!(
        app.stripe.retrieve_count().await,
        1,
        "Stripe was asked whether the session is still open"
    );
    assert_eq!(app.metric_total("SessionsReused"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_clicks_make_exactly_one_session() {
    let app = spawn_app().await;
    let user = app.user().await;
    // Ten function instances, five concurrent clicks each.
    let states: Vec<checkout::State> = (0..10)
        .map(|_| state_for(&app.db.url, &app.stripe.uri(), |_| {}).0)
        .collect();
    let clicks = (0..50).map(|i| {
        let request = FunctionUrlRequest::post("/", b"").bearer(&token(&user));
        call(&states[i % 10], request)
    });

    let results = futures::future::join_all(clicks).await;

    assert!(
        results.iter().all(|(status, _, _)| *status == 200),
        "{:?}",
        results
            .iter()
            .map(|r| (r.0, r.1.clone()))
            .collect::<Vec<_>>()
    );
    let urls: std::collections::HashSet<_> = results
        .iter()
        .map(|(_, b, _)| b["url"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(urls.len(), 1, "every click got the same URL");
    assert_eq!(
        app.stripe.create_requests().await.len(),
        1,
        "exactly one create call reached Stripe"
    );
    assert_eq!(
        results
            .iter()
            .filter(|(_, b, _)| b["reused"] == false)
            .count(),
        1
    );
    assert_eq!(app.scalar::<i64>("select count(*) from orders").await, 1);
}

#[tokio::test]
async fn a_user_who_paid_is_told_so_without_creating_anything() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (_, first) = app.post(&user).await;
    let session = first["session_id"].as_str().unwrap().to_owned();
    app.webhook_completes(&session).await;
    let posts = app.stripe.requests("POST").await.len();

    let (status, body) = app.post(&user).await;

    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("already_paid"))
    );
    assert_eq!(
        app.stripe.requests("POST").await.len(),
        posts,
        "nothing asked of Stripe"
    );
    assert_eq!(app.scalar::<i64>("select count(*) from orders").await, 1);
    assert_eq!(app.metric_total("AlreadyPaid"), 1.0);
}

#[tokio::test]
async fn completed_session_is_reconciled_when_the_webhook_is_late() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (_, first) = app.post(&user).await;
    let session = first["session_id"].as_str().unwrap();
    app.stripe.complete(session, true);

    let (status, body) = app.post(&user).await;

    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("already_paid"))
    );
    assert_eq!(
        app.scalar::<String>("select status from orders").await,
        "paid"
    );
    assert!(
        app.scalar::<bool>("select active from entitlements where product = 'full_report'")
            .await
    );
    assert_eq!(app.metric_total("Reconciliations"), 1.0);
    assert_eq!(app.stripe.create_requests().await.len(), 1);

    // The webhook arrives afterwards: recorded, nothing paid twice.
    let webhook = app.webhook_completes(session).await;
    assert_eq!(webhook["outcome"], "applied");
    assert_eq!(app.audits("order_paid").await, 1);
    assert_eq!(app.audits("duplicate_payment").await, 0);
}

#[tokio::test]
async fn expired_session_gives_a_fresh_order_and_session() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (_, first) = app.post(&user).await;
    app.stripe.expire(first["session_id"].as_str().unwrap());

    let (status, second) = app.post(&user).await;

    assert_eq!(status, 200, "{second}");
    assert_eq!(second["reused"], false);
    assert_ne!(second["session_id"], first["session_id"]);
    assert_ne!(second["order_id"], first["order_id"]);
    let statuses: Vec<String> = app
        .sql
        .query("select status from orders order by created_at", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["expired", "pending"]);
    let keys: Vec<String> = app
        .stripe
        .create_requests()
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1], "a new order means a new idempotency key");
}

#[tokio::test]
async fn stripe_500_then_success_retries_with_the_same_idempotency_key() {
    let app = spawn_app().await;
    let user = app.user().await;
    app.stripe
        .script([FakeStripe::server_error(), FakeStripe::rate_limited()]);

    let (status, body) = app.post(&user).await;

    assert_eq!(status, 200, "{body}");
    let creates = app.stripe.create_requests().await;
    assert_eq!(creates.len(), 3);
    assert!(
        creates
            .iter()
            .all(|(k, f)| *k == creates[0].0 && *f == creates[0].1),
        "same key, same parameters"
    );
}

#[tokio::test]
async fn stripe_down_is_a_clear_503_and_the_next_click_recovers() {
    let db = TestDb::new().await;
    let sql = db.client().await;
    let user = db.create_user(&sql).await.to_string();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (down, _) = state_for(&db.url, &dead, |_| {});

    let (status, body, headers) = call(
        &down,
        FunctionUrlRequest::post("/", b"").bearer(&token(&user)),
    )
    .await;

    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("payment_provider_unavailable")),
        "{body}"
    );
    assert!(headers.contains_key("retry-after"));
    let row = sql
        .query_one(
            "select status, stripe_checkout_session_id, session_claimed_until from orders",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert!(row.get::<_, Option<String>>(1).is_none());
    assert!(
        row.get::<_, Option<std::time::SystemTime>>(2).is_none(),
        "lease released: nothing blocks the next try"
    );

    let stripe = FakeStripe::start().await;
    let (up, _) = state_for(&db.url, &stripe.uri(), |_| {});
    let (status, body, _) = call(
        &up,
        FunctionUrlRequest::post("/", b"").bearer(&token(&user)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        sql.query_one("select count(*) from orders", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        1,
        "the same order was resumed"
    );
}

#[tokio::test]
async fn stripe_timeout_is_a_503() {
    let app = spawn_app_with(|c| {
        c.stripe.timeout = Duration::from_millis(200);
        c.stripe.retries = 1;
    })
    .await;
    let user = app.user().await;
    app.stripe.delay(Some(Duration::from_secs(2)));

    let (status, body) = app.post(&user).await;

    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("payment_provider_unavailable"))
    );
    assert_eq!(app.metric_total("StripeErrors"), 1.0);
}

#[tokio::test]
async fn stripe_refusing_the_price_is_a_502() {
    let app = spawn_app_with(|c| c.price_id = PriceId::parse("prod_not_a_price").unwrap()).await;
    let user = app.user().await;
    let (status, body) = app.post(&user).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("payment_provider_error"))
    );
    assert!(
        !body.to_string().contains("No such price"),
        "Stripe's message stays in the logs"
    );
    assert_eq!(
        app.stripe.create_requests().await.len(),
        1,
        "a 400 is not retried"
    );
}

#[tokio::test]
async fn clicks_are_rate_limited_per_user() {
    let app = spawn_app_with(|c| c.rate_limit_per_min = 3).await;
    let alice = app.user().await;
    let bob = app.user().await;
    for _ in 0..3 {
        assert_eq!(app.post(&alice).await.0, 200);
    }
    let (status, body, headers) = call(
        &app.state,
        FunctionUrlRequest::post("/", b"").bearer(&token(&alice)),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    let after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&after));
    assert_eq!(app.post(&bob).await.0, 200, "limits are per user");
}

#[tokio::test]
async fn requests_without_a_valid_token_are_401() {
    let app = spawn_app().await;
    let user = app.user().await;
    let mut expired = tokens::user_claims(&user, None);
    expired["exp"] = json!(fixtures::now() - 3600);
    let cases = [
        (FunctionUrlRequest::post("/", b""), "missing_token"),
        (
            FunctionUrlRequest::post("/", b"").header("authorization", "Basic dXNlcjpwYXNz"),
            "missing_token",
        ),
        (
            FunctionUrlRequest::post("/", b"").bearer("not-a-token"),
            "invalid_token",
        ),
        (
            FunctionUrlRequest::post("/", b"")
                .bearer(&tokens::hs256(&expired, JWT_SECRET.as_bytes())),
            "token_expired",
        ),
        (
            FunctionUrlRequest::post("/", b"").bearer(&tokens::hs256(
                &tokens::user_claims(&user, None),
                b"wrong-secret-wrong-secret-wrong-secret",
            )),
            "invalid_token_signature",
        ),
        (
            FunctionUrlRequest::get("/", "").bearer(&tokens::raw(
                &json!({"alg": "none"}),
                &tokens::user_claims(&user, None),
                b"",
            )),
            "unsupported_token_algorithm",
        ),
    ];
    for (request, code) in cases {
        let (status, body, headers) = call(&app.state, request).await;
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some(code)));
        assert!(headers.contains_key("www-authenticate"));
    }
    assert!(app.stripe.requests("POST").await.is_empty());
    assert_eq!(app.scalar::<i64>("select count(*) from orders").await, 0);
}

#[tokio::test]
async fn token_of_a_deleted_user_is_403() {
    let app = spawn_app().await;
    let user = app.user().await;
    assert_eq!(app.post(&user).await.0, 200, "the user buys before");

    let id = uuid::Uuid::parse_str(&user).unwrap();
    let delete = "delete from auth.users where id = $1";
    assert_eq!(app.sql.execute(delete, &[&id]).await.unwrap(), 1);
    // The same token, still valid for an hour: the user it names is gone.
    let (status, body) = app.post(&user).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("unknown_user"))
    );
    // No second session was asked of Stripe (the user's orders went with the user: cascade).
    assert_eq!(app.stripe.create_requests().await.len(), 1);
}

#[tokio::test]
async fn bad_requests_are_clear_4xx() {
    let app = spawn_app().await;
    let user = app.user().await;
    let t = token(&user);
    let cases = [
        (
            FunctionUrlRequest::post("/", b"{\"price\":\"price_cheap\"}").bearer(&t),
            400,
            "unknown_field",
        ),
        (
            FunctionUrlRequest::post("/", b"{not json").bearer(&t),
            400,
            "invalid_json",
        ),
        (
            FunctionUrlRequest::post("/", b"{\"product\":\"other\"}").bearer(&t),
            400,
            "unknown_product",
        ),
        (
            FunctionUrlRequest::post("/", b"product=x")
                .header("content-type", "application/x-www-form-urlencoded")
                .bearer(&t),
            415,
            "unsupported_media_type",
        ),
        (
            FunctionUrlRequest::post("/", &vec![b' '; 5000]).bearer(&t),
            413,
            "body_too_large",
        ),
        (
            FunctionUrlRequest::post("/", b"")
                .method("DELETE")
                .bearer(&t),
            405,
            "method_not_allowed",
        ),
        (
            FunctionUrlRequest::get("/", "session_id=../../etc").bearer(&t),
            400,
            "invalid_session_id",
        ),
    ];
    for (request, status, code) in cases {
        let (got, body, _) = call(&app.state, request).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    assert!(app.stripe.requests("POST").await.is_empty());
    let (status, body) = app.post(&user).await;
    assert_eq!(status, 200, "{body}");
    let explicit = FunctionUrlRequest::post("/", b"{\"product\":\"full_report\"}").bearer(&t);
    assert_eq!(call(&app.state, explicit).await.0, 200);
}

#[tokio::test]
async fn success_page_poll_reconciles_before_the_webhook() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (_, first) = app.post(&user).await;
    let session = first["session_id"].as_str().unwrap();

    let (status, pending) = app.poll(&user, Some(session)).await;
    assert_eq!((status, pending["status"].as_str()), (200, Some("pending")));

    app.stripe.complete(session, true);
    let (_, paid) = app.poll(&user, Some(session)).await;
    assert_eq!(paid["status"], "paid");
    assert_eq!(paid["order_id"], first["order_id"]);
    assert!(paid["paid_at"].is_i64());

    let webhook = app.webhook_completes(session).await;
    assert_eq!(webhook["outcome"], "applied");
    assert_eq!(app.audits("order_paid").await, 1);
}

#[tokio::test]
async fn webhook_before_the_poll_answers_from_the_database() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (_, first) = app.post(&user).await;
    let session = first["session_id"].as_str().unwrap();
    app.webhook_completes(session).await;
    let retrieves_before = app.stripe.retrieve_count().await;

    let (status, body) = app.poll(&user, None).await;

    assert_eq!((status, body["status"].as_str()), (200, Some("paid")));
    assert_eq!(
        app.stripe.retrieve_count().await,
        retrieves_before,
        "no Stripe call for a paid order"
    );
}

#[tokio::test]
async fn poll_of_an_expired_session_and_of_someone_elses() {
    let app = spawn_app().await;
    let user = app.user().await;
    let other = app.user().await;
    let (_, first) = app.post(&user).await;
    let session = first["session_id"].as_str().unwrap();
    app.stripe.expire(session);

    assert_eq!(app.poll(&user, Some(session)).await.1["status"], "expired");
    let (status, body) = app.poll(&other, Some(session)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("order_not_found"))
    );
    let (status, _) = app.poll(&other, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn poll_survives_stripe_being_down() {
    let app = spawn_app().await;
    let user = app.user().await;
    let (_, first) = app.post(&user).await;
    app.stripe.delay(Some(Duration::from_secs(5)));
    let (slow, _) = state_for(&app.db.url, &app.stripe.uri(), |c| {
        c.stripe.timeout = Duration::from_millis(100);
        c.stripe.retries = 0;
    });

    let query = format!("session_id={}", first["session_id"].as_str().unwrap());
    let (status, body, _) = call(
        &slow,
        FunctionUrlRequest::get("/", &query).bearer(&token(&user)),
    )
    .await;

    assert_eq!((status, body["status"].as_str()), (200, Some("pending")));
}

#[test]
fn config_reports_every_problem_and_defaults_outside_production() {
    let read = |vars: &'static [(&'static str, &'static str)]| {
        checkout::Config::read(shared::config::EnvReader::new(move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }))
    };
    let ok = read(&[
        ("DATABASE_URL", "postgres://u@127.0.0.1/x"),
        ("STRIPE_SECRET_KEY", "sk_test_x"),
        ("STRIPE_FULL_REPORT_PRICE_ID", "price_1"),
        ("SUPABASE_JWT_SECRET", "s"),
    ])
    .unwrap();
    assert_eq!(ok.session_ttl_s, 7200);
    assert_eq!(ok.rate_limit_per_min, 10);
    assert!(ok.success_url.contains("{CHECKOUT_SESSION_ID}"));
    assert_eq!(ok.stripe.base, "https://api.stripe.com");

    let err = read(&[
        ("APP_ENV", "production"),
        ("DATABASE_URL", "postgres://u@db.example/x"),
        ("STRIPE_SECRET_KEY", "sk_test_x"),
        ("STRIPE_FULL_REPORT_PRICE_ID", "prod_1"),
        ("CHECKOUT_SUCCESS_URL", "http://insecure.example/s"),
        ("CHECKOUT_SESSION_TTL_S", "60"),
    ])
    .unwrap_err();
    let vars: Vec<_> = err.problems.iter().map(|p| p.variable).collect();
    assert_eq!(
        vars,
        [
            "SUPABASE_JWT_SECRET",
            "STRIPE_SECRET_KEY",
            "STRIPE_FULL_REPORT_PRICE_ID",
            "CHECKOUT_SUCCESS_URL",
            "CHECKOUT_CANCEL_URL",
            "CHECKOUT_SESSION_TTL_S"
        ]
    );
}
