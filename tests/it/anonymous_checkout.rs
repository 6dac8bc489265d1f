//! Checkout refuses anonymous sessions (`is_anonymous: true`): an anonymous account can be lost
//! together with what it bought, so buying needs a real account. Nothing is created, at Stripe
//! or in the database; the same user signed in properly gets through.

use serde_json::json;
use shared::telemetry::Metrics;
use testkit::db::TestDb;
use testkit::fixtures::{self, FunctionUrlRequest};
use testkit::tokens;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const JWT: &str = "anonymous-checkout-jwt-secret-at-least-32-chars";

#[tokio::test]
async fn anonymous_sessions_must_sign_in_before_buying() {
    let db = TestDb::new().await;
    let sql = db.client().await;
    let user = db.create_user(&sql).await.to_string();
    let stripe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .respond_with(
            ResponseTemplate::new(500).set_body_json(
                json!({"error": {"type": "api_error", "message": "down for the test"}}),
            ),
        )
        .mount(&stripe)
        .await;
    let env = [
        ("DATABASE_URL", db.url.clone()),
        ("SUPABASE_JWT_SECRET", JWT.to_owned()),
        ("STRIPE_SECRET_KEY", "sk_test_anonymous".to_owned()),
        ("STRIPE_API_BASE", stripe.uri()),
        ("STRIPE_MAX_RETRIES", "0".to_owned()),
        ("STRIPE_FULL_REPORT_PRICE_ID", "price_anonymous".to_owned()),
    ];
    let config = checkout::Config::read(shared::config::EnvReader::new(|k| {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    }))
    .unwrap();
    let mut state = checkout::State::new(config).unwrap();
    state.metrics = Metrics::in_memory("checkout").0;
    let post = |anonymous: bool| {
        let mut claims = tokens::user_claims(&user, None);
        claims["is_anonymous"] = json!(anonymous);
        FunctionUrlRequest::post("/", b"")
            .bearer(&tokens::hs256(&claims, JWT.as_bytes()))
            .into_request()
            .unwrap()
    };

    let guest = checkout::handle(&state, post(true)).await;
    let orders_after_guest: i64 = sql
        .query_one("select count(*) from orders", &[])
        .await
        .unwrap()
        .get(0);
    let stripe_calls_after_guest = stripe.received_requests().await.unwrap().len();
    let member = checkout::handle(&state, post(false)).await;

    assert_eq!(guest.status(), 403);
    let body = fixtures::json_body(&guest);
    assert_eq!(body["error"]["code"], "sign_in_required");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("sign in"));
    assert_eq!((orders_after_guest, stripe_calls_after_guest), (0, 0));
    assert_ne!(
        member.status(),
        403,
        "the same user, signed in, gets through"
    );
    assert_eq!(
        stripe.received_requests().await.unwrap().len(),
        1,
        "and reaches Stripe"
    );
}
