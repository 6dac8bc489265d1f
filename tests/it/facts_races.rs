//! Races at the database itself: two `record_stripe_facts` transactions on raw connections, one
//! held open on purpose.

use std::time::Duration;

use serde_json::{json, Value};
use testkit::db::TestDb;
use tokio_postgres::Client;

async fn record(sql: &Client, facts: &Value) -> Value {
    sql.query_one(
        "select public.record_stripe_facts(null, null, $1::text::jsonb, null)::text",
        &[&facts.to_string()],
    )
    .await
    .map(|r| serde_json::from_str::<Value>(&r.get::<_, String>(0)).unwrap())
    .unwrap()
}

fn session(id: &str, order: &str, user: &str, pi: &str) -> Value {
    json!({"id": id, "mode": "payment", "status": "complete", "payment_status": "paid",
           "payment_intent_id": pi, "customer_id": null, "client_reference_id": user,
           "metadata_user_id": user, "metadata_order_id": order, "sells_product": null,
           "amount_total": 1900, "currency": "usd", "url": null, "created": 1_800_000_000i64,
           "expires_at": 1_800_003_600i64})
}

fn payment(pi: &str, refunded: bool) -> Value {
    json!({"id": pi, "status": "succeeded", "amount": 1900, "currency": "usd",
           "customer_id": null, "charge_id": format!("ch_{pi}"),
           "amount_refunded": if refunded { 1900 } else { 0 }, "refunded": refunded,
           "created": 1_800_000_010i64})
}

/// Found by the third outside review: a session's first read (with its payment) is being stored
/// while a newer read of the payment (a refund event) is stored concurrently. Before payment locks,
/// the refund's transaction computed which purchases it concerns before the session committed,
/// took no purchase lock and settled nothing, yet its newer payment fact replaced the older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_read_stored_while_the_sessions_first_read_commits_settles_nothing() {
    let db = TestDb::new().await;
    let a = db.client().await;
    let b = db.client().await;
    let user = db.create_user(&a).await.to_string();
    let order: String = a
        .query_one(
            "insert into orders (user_id) values ($1::text::uuid) returning id::text",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    let pi = "pi_review_race";
    let cs = "cs_test_review_race";

    // T2: checkout.session.completed, read at t=1000 ms: complete, paid.
    a.batch_execute("begin").await.unwrap();
    record(
        &a,
        &json!({"read_at_ms": 1_800_000_020_000i64, "sessions": [session(cs, &order, &user, pi)],
                "payments": [payment(pi, false)]}),
    )
    .await;

    // T1: charge.refunded, read later: the payment refunded in full.
    let refund = tokio::spawn(async move {
        record(
            &b,
            &json!({"read_at_ms": 1_800_000_030_000i64, "payments": [payment(pi, true)],
                    "refunds": [{"id": "re_review", "payment_intent_id": pi, "charge_id": null,
                                 "amount": 1900, "currency": "usd", "status": "succeeded",
                                 "reason": "requested_by_customer", "by_webhook": false,
                                 "created": 1_800_000_025i64}]}),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.batch_execute("commit").await.unwrap();
    let answer = refund.await.unwrap();

    let fact: bool = a
        .query_one("select refunded from stripe_payments where id = $1", &[&pi])
        .await
        .unwrap()
        .get(0);
    let decided: bool = a
        .query_one(
            "select owns from billing.ownership($1::text::uuid, 'full_report')",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    let (status, active): (String, bool) = a
        .query_one(
            "select o.status, e.active from orders o
             join entitlements e on e.user_id = o.user_id and e.product = o.product
             where o.id = $1::text::uuid",
            &[&order],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert!(fact, "the newer read is stored: the payment is refunded");
    assert!(
        !decided,
        "the decisions over the stored facts: the user owns nothing"
    );
    assert_eq!(
        (status.as_str(), active),
        ("refunded", false),
        "the stored order and entitlement must follow the stored facts; the refund's record \
         answered {answer}"
    );
}
