//! The preflight checklist, offline and against faked Stripe, OpenAI and a real database.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use base64::Engine;
use serde_json::json;
use tools::preflight::{run, Check, Status};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn jwt(claims: serde_json::Value) -> String {
    let b = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.sig",
        b(&json!({"alg": "HS256", "typ": "JWT"})),
        b(&claims)
    )
}

fn production(db_url: &str) -> HashMap<&'static str, String> {
    HashMap::from([
        ("APP_ENV", "production".to_owned()),
        ("DATABASE_URL", db_url.to_owned()),
        ("SUPABASE_URL", "https://abcdefgh.supabase.co".to_owned()),
        (
            "SUPABASE_SERVICE_ROLE_KEY",
            jwt(json!({"iss": "supabase", "ref": "abcdefgh", "role": "service_role"})),
        ),
        ("SUPABASE_JWT_SECRET", "jwt-secret".to_owned()),
        ("STRIPE_SECRET_KEY", "sk_live_abc".to_owned()),
        ("STRIPE_WEBHOOK_SECRET", "whsec_live".to_owned()),
        ("STRIPE_FULL_REPORT_PRICE_ID", "price_live1".to_owned()),
        (
            "CHECKOUT_SUCCESS_URL",
            "https://app.example.com/ok".to_owned(),
        ),
        (
            "CHECKOUT_CANCEL_URL",
            "https://app.example.com/cancel".to_owned(),
        ),
        ("OPENAI_API_KEY", "sk-openai".to_owned()),
        (
            "WEBHOOK_PUBLIC_URL",
            "https://app.example.com/api/stripe/webhook".to_owned(),
        ),
    ])
}

async fn run_checks(env: &HashMap<&'static str, String>, online: bool) -> Vec<Check> {
    let lookup = |k: &str| env.get(k).cloned();
    run(&lookup, online).await
}

fn failed(checks: &[Check]) -> Vec<&str> {
    checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| c.name.as_str())
        .collect()
}

#[tokio::test]
async fn a_good_production_environment_passes_offline() {
    let checks = run_checks(&production("postgres://postgres@127.0.0.1:5432/x"), false).await;
    assert_eq!(failed(&checks), Vec::<&str>::new(), "{checks:#?}");
    assert!(checks
        .iter()
        .any(|c| c.name == "Stripe price" && c.status == Status::Skip));
}

#[tokio::test]
async fn test_keys_and_missing_settings_fail_with_fixes() {
    let mut env = production("postgres://postgres@127.0.0.1:5432/x");
    env.insert("STRIPE_SECRET_KEY", "sk_test_abc".into());
    env.insert("STRIPE_WEBHOOK_SECRET", "not-a-whsec".into());
    env.insert("STRIPE_FULL_REPORT_PRICE_ID", "prod_123".into());
    env.remove("OPENAI_API_KEY");
    env.insert("LLM_TOTAL_BUDGET_MS", "90000".into());

    let checks = run_checks(&env, false).await;

    assert_eq!(
        failed(&checks),
        [
            "webhook configuration",
            "checkout configuration",
            "chat configuration",
            "reconciler configuration",
            "Stripe uses a live key",
            "webhook secret is an endpoint secret",
            "full report price is a price id",
            "LLM key or rules-only",
            "timeouts fit the function timeouts"
        ]
    );
    for check in checks.iter().filter(|c| c.status == Status::Fail) {
        assert!(!check.fix.is_empty(), "{} has a fix", check.name);
        assert!(
            !check.detail.contains("sk_test_abc") && !check.detail.contains("not-a-whsec"),
            "no values in {}",
            check.detail
        );
    }
    env.insert("CHAT_RULES_ONLY", "true".into());
    env.remove("LLM_TOTAL_BUDGET_MS");
    let rules_only = checks_names_failed(&env).await;
    assert!(!rules_only.contains(&"LLM key or rules-only".to_owned()));
}

async fn checks_names_failed(env: &HashMap<&'static str, String>) -> Vec<String> {
    failed(&run_checks(env, false).await)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn supabase_keys_must_belong_to_the_project() {
    let mut env = production(
        "postgres://postgres.otherref:pw@aws-0-eu-west-1.pooler.supabase.com:6543/postgres",
    );
    assert!(
        checks_names_failed(&env)
            .await
            .contains(&"Supabase URL and keys consistent".to_owned()),
        "DATABASE_URL of another project"
    );
    env.insert(
        "DATABASE_URL",
        "postgres://postgres.abcdefgh:pw@aws-0-eu-west-1.pooler.supabase.com:6543/postgres".into(),
    );
    assert!(!checks_names_failed(&env)
        .await
        .contains(&"Supabase URL and keys consistent".to_owned()));
    env.insert(
        "SUPABASE_SERVICE_ROLE_KEY",
        jwt(json!({"ref": "abcdefgh", "role": "anon"})),
    );
    assert!(
        checks_names_failed(&env)
            .await
            .contains(&"Supabase URL and keys consistent".to_owned()),
        "the anon key"
    );
}

async fn stripe_fake(events: &[&str]) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET")).and(path("/v1/prices/price_live1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "price_live1", "object": "price",
            "active": true, "type": "one_time", "livemode": true, "unit_amount": 1900, "currency": "usd"})))
        .mount(&server).await;
    Mock::given(method("GET")).and(path("/v1/webhook_endpoints"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"object": "list", "has_more": false, "data": [
            {"id": "we_1", "object": "webhook_endpoint", "url": "https://app.example.com/api/stripe/webhook",
             "status": "enabled", "enabled_events": events, "livemode": true}]})))
        .mount(&server).await;
    // The lists the webhook reads; a restricted key without Disputes read is refused there.
    for list in [
        "checkout/sessions",
        "payment_intents",
        "charges",
        "refunds",
        "subscriptions",
        "invoices",
        "events",
    ] {
        Mock::given(method("GET"))
            .and(path(format!("/v1/{list}")))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"object": "list", "has_more": false, "data": []})),
            )
            .mount(&server)
            .await;
    }
    Mock::given(method("GET")).and(path("/v1/disputes"))
        .respond_with(ResponseTemplate::new(403).set_body_json(json!({"error": {"type": "invalid_request_error",
            "message": "The provided key 'rk_live_***' does not have the required permissions for this endpoint."}})))
        .mount(&server).await;
    server
}

#[tokio::test]
async fn online_checks_against_stripe_openai_and_the_database() {
    let db = testkit::db::TestDb::new().await;
    let stripe = stripe_fake(&[
        "checkout.session.completed",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "invoice.payment_succeeded",
        "invoice.payment_failed",
    ])
    .await;
    let openai = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/models"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]}),
        ))
        .mount(&openai)
        .await;
    let mut env = production(&db.url);
    env.insert("STRIPE_API_BASE", stripe.uri());
    env.insert("OPENAI_BASE_URL", format!("{}/v1", openai.uri()));

    let checks = run_checks(&env, true).await;

    let by_name = |n: &str| checks.iter().find(|c| c.name == n).unwrap().clone();
    assert_eq!(
        by_name("Stripe price").status,
        Status::Pass,
        "{:?}",
        by_name("Stripe price")
    );
    assert_eq!(by_name("LLM key works").status, Status::Pass);
    assert_eq!(
        by_name("database and migrations").status,
        Status::Pass,
        "{:?}",
        by_name("database and migrations")
    );
    let webhook = by_name("Stripe webhook endpoint");
    assert_eq!(webhook.status, Status::Fail);
    assert!(
        webhook
            .detail
            .contains("checkout.session.async_payment_succeeded")
            && webhook.detail.contains("invoice.paid"),
        "{}",
        webhook.detail
    );
    assert!(!webhook.detail.contains("invoice.payment_failed"));
    let reads = by_name("Stripe key reads what the webhook reads");
    assert_eq!(reads.status, Status::Fail);
    assert!(
        reads.detail.starts_with("cannot read: Disputes") && !reads.detail.contains("Refunds"),
        "{}",
        reads.detail
    );

    let all = stripe_fake(&["*"]).await;
    env.insert("STRIPE_API_BASE", all.uri());
    env.insert("OPENAI_API_KEY", "sk-revoked".into());
    let revoked = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/models"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&revoked)
        .await;
    env.insert("OPENAI_BASE_URL", format!("{}/v1", revoked.uri()));
    let checks = run_checks(&env, true).await;
    assert_eq!(
        failed(&checks),
        ["Stripe key reads what the webhook reads", "LLM key works"]
    );
}

#[tokio::test]
async fn database_behind_the_build_fails() {
    let db = testkit::db::TestDb::new().await;
    let sql = db.client().await;
    sql.execute("delete from supabase_migrations.schema_migrations where version = (select max(version) from supabase_migrations.schema_migrations)", &[]).await.unwrap();
    let mut env = production(&db.url);
    env.insert("STRIPE_API_BASE", stripe_fake(&["*"]).await.uri());
    env.remove("OPENAI_API_KEY");
    env.insert("CHAT_RULES_ONLY", "true".into());
    let checks = run_checks(&env, true).await;
    let database = checks
        .iter()
        .find(|c| c.name == "database and migrations")
        .unwrap();
    assert_eq!(database.status, Status::Fail);
    assert!(
        database.detail.contains("migrations behind"),
        "{}",
        database.detail
    );
}
