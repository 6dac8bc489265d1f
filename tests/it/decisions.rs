//! The decisions (supabase/schemas/30_decisions.sql) are pure functions of the facts: generated
//! fact sets (sessions of ours and of Payment Links, payments in every status, refunds, disputes,
//! payments made in the same second, payments not read yet) are stored as facts and every decision
//! is compared with the reference model (`testkit::money_reference`): who owns the report, what
//! is in flight or disputed, which purchase stands, which payments are due for a refund, and each
//! order's status. Given the same facts in any insertion order, the same answers.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use testkit::db::TestDb;
use testkit::money_reference::{money, verdict, Purchase};
use tokio_postgres::Client;

/// One generated purchase, as facts.
#[derive(Clone, Debug)]
struct Fact {
    ours: bool,
    session_paid: bool,
    /// `None`: the session names a payment that was not read.
    intent: Option<&'static str>,
    refunded: bool,
    disputes: Vec<&'static str>,
    refund_waiting: bool,
    /// Seconds after a base instant: small, so that ties happen.
    made: i64,
}

fn fact() -> impl Strategy<Value = Fact> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::option::weighted(
            0.85,
            prop_oneof![
                6 => Just("succeeded"),
                2 => Just("processing"),
                1 => Just("requires_action"),
                2 => Just("requires_payment_method"),
                1 => Just("canceled"),
            ],
        ),
        prop::bool::weighted(0.25),
        prop::collection::vec(
            prop_oneof![
                Just("warning_needs_response"),
                Just("warning_closed"),
                Just("needs_response"),
                Just("under_review"),
                Just("won"),
                Just("lost"),
            ],
            0..=2,
        ),
        prop::bool::weighted(0.15),
        0i64..4,
    )
        .prop_map(
            |(ours, session_paid, intent, refunded, disputes, refund_waiting, made)| Fact {
                ours,
                session_paid,
                intent,
                refunded,
                disputes,
                refund_waiting,
                made,
            },
        )
}

/// Stores `facts` for a new user, in `order` (a permutation), and answers the purchases as the
/// reference model reads them.
async fn store(sql: &Client, facts: &[Fact], order: &[usize]) -> (String, Vec<Purchase>) {
    let user: String = sql
        .query_one(
            "insert into auth.users (id, email) values (gen_random_uuid(), 'p@example.com')
             returning id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let base = 1_800_000_000i64;
    let mut purchases = Vec::new();
    for &i in order {
        let f = &facts[i];
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let session = format!("cs_test_{i}_{tag}");
        let pi = format!("pi_{tag}");
        let order_id: Option<String> = if f.ours {
            Some(
                sql.query_one(
                    "insert into orders (user_id, stripe_checkout_session_id, closed_reason)
                     values ($1::text::uuid, $2, 'completed') returning id::text",
                    &[&user, &session],
                )
                .await
                .unwrap()
                .get(0),
            )
        } else {
            None
        };
        sql.execute(
            "insert into stripe_sessions (id, mode, status, payment_status, payment_intent_id,
               user_id, order_id, product, sells_product, created_at, read_at, changed_at)
             values ($1, 'payment', 'complete', $2, $3, $4::text::uuid, $5::text::uuid,
               'full_report', $6, to_timestamp($7), now(), now())",
            &[
                &session,
                &(if f.session_paid { "paid" } else { "unpaid" }),
                &pi,
                &user,
                &order_id,
                &(!f.ours),
                &((base + f.made) as f64),
            ],
        )
        .await
        .unwrap();
        if let Some(status) = f.intent {
            sql.execute(
                "insert into stripe_payments (id, status, amount, refunded, created_at, read_at, changed_at)
                 values ($1, $2, 1900, $3, to_timestamp($4), now(), now())",
                &[&pi, &status, &f.refunded, &((base + f.made) as f64)],
            )
            .await
            .unwrap();
        }
        for (k, status) in f.disputes.iter().enumerate() {
            sql.execute(
                "insert into stripe_disputes (id, payment_intent_id, status, read_at, changed_at)
                 values ($1, $2, $3, now(), now())",
                &[&format!("dp_{k}_{tag}"), &pi, status],
            )
            .await
            .unwrap();
        }
        if f.refund_waiting {
            sql.execute(
                "insert into stripe_refunds (id, payment_intent_id, amount, status, read_at, changed_at)
                 values ($1, $2, 1900, 'requires_action', now(), now())",
                &[&format!("re_{tag}"), &pi],
            )
            .await
            .unwrap();
        }
        purchases.push(Purchase {
            session,
            session_paid: f.session_paid,
            payment_intent: Some(pi),
            intent_status: f.intent.map(str::to_owned),
            refunded: f.refunded,
            disputes: f.disputes.iter().map(|d| (*d).to_owned()).collect(),
            refund_waiting: f.refund_waiting,
            made_at: base + f.made,
        });
    }
    (user, purchases)
}

/// What the SQL decides for `user`: (owns, in flight, disputed, standing session, sessions due,
/// each session's order status).
async fn decided(
    sql: &Client,
    user: &str,
) -> (
    bool,
    bool,
    bool,
    Option<String>,
    Vec<String>,
    Vec<(String, String)>,
) {
    let row = sql
        .query_one(
            "select w.owns, w.in_flight, w.disputed,
               (select d.session_id from billing.decisions d where d.user_id = $1::text::uuid and d.stands),
               coalesce((select array_agg(d.session_id order by d.session_id) from billing.decisions d
                         where d.user_id = $1::text::uuid and d.refund_due), '{}')
             from billing.ownership($1::text::uuid, 'full_report') w",
            &[&user],
        )
        .await
        .unwrap();
    let statuses = sql
        .query(
            "select o.stripe_checkout_session_id, n.status from orders o
             cross join lateral billing.order_decision(o) n where o.user_id = $1::text::uuid
             order by 1",
            &[&user],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        statuses,
    )
}

#[test]
fn decisions_over_generated_facts_agree_with_the_reference_model() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (db, sql) = runtime.block_on(async {
        let db = TestDb::new().await;
        let sql = db.client().await;
        (db, sql)
    });
    let cases = std::env::var("DECISION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = prop::collection::vec(fact(), 0..5).prop_flat_map(|facts| {
        let n = facts.len();
        (Just(facts), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
    });
    let result = runner.run(&strategy, |(facts, order)| {
        runtime.block_on(async {
            let (user, purchases) = store(&sql, &facts, &order).await;
            let want = verdict(&purchases);
            let (owns, in_flight, disputed, standing, mut due, statuses) =
                decided(&sql, &user).await;
            let mut want_due = want.refunds_due.clone();
            want_due.sort();
            due.sort();
            prop_assert_eq!(owns, want.owns, "owns");
            prop_assert_eq!(in_flight, want.in_flight, "in flight");
            prop_assert_eq!(disputed, want.disputed, "disputed");
            prop_assert_eq!(&standing, &want.standing, "standing");
            prop_assert_eq!(&due, &want_due, "due for a refund");
            for (session, status) in &statuses {
                let p = purchases.iter().find(|p| &p.session == session).unwrap();
                prop_assert_eq!(
                    status.as_str(),
                    money(p).order_status(),
                    "order of {}",
                    session
                );
            }
            Ok::<(), TestCaseError>(())
        })
    });
    drop(db);
    if let Err(e) = result {
        panic!("{e}");
    }
}
