//! The direct PostgreSQL backend behind a transaction-mode pooler (PgBouncer, the shape of
//! Supabase's Supavisor on port 6543): every call is one `query_typed` with the unnamed
//! statement, so client connections can share server connections between transactions.
//! Needs `scripts/ensure-pgbouncer` (scripts/test starts it).

use futures::future::join_all;
use serde_json::json;
use shared::payments::facts::{Facts, InvoiceFact};
use shared::store::chat::{Admission, AdmitLimits, Reserve, SettledSource, Settlement};
use shared::store::payments::Delivery;
use shared::store::{Outcome, Store};
use shared::stripe::events::{self, Event};
use testkit::db::TestDb;
use testkit::fixtures;

#[tokio::test]
async fn concurrent_calls_through_a_transaction_pooler_are_each_applied_once() {
    let db = TestDb::new().await;
    let sql = db.client().await;
    // Several client pools, more client connections than PgBouncer's 4 server connections per
    // database: calls of different clients interleave on the same server sessions.
    let stores: Vec<Store> = (0..4)
        .map(|_| Store::postgres(&db.pooler_url(), 4).unwrap())
        .collect();
    let mut users = Vec::new();
    for _ in 0..8 {
        users.push(db.create_user(&sql).await);
    }
    let bodies: Vec<Vec<u8>> = (0..32)
        .map(|_| {
            let mut event = fixtures::load("stripe/invoice.paid.dahlia.json");
            fixtures::set(&mut event, "/id", json!(fixtures::event_id()));
            fixtures::set(&mut event, "/created", json!(fixtures::now()));
            fixtures::body(&event)
        })
        .collect();

    let applied = join_all(bodies.iter().enumerate().map(|(i, body)| {
        let store = &stores[i % stores.len()];
        async move {
            let parsed = events::parse(body).unwrap();
            let Event::Invoice { invoice, .. } = &parsed.event else {
                panic!("an invoice event")
            };
            let mut facts = Facts::at(fixtures::now() * 1000);
            facts.invoices.push(InvoiceFact::of(invoice));
            let delivery = Delivery {
                event: &parsed,
                received_at_ms: 0,
            };
            // Every event twice: the second delivery must be a duplicate.
            let first = store
                .record_stripe_facts(Some(delivery), Some((&facts, None)), &[])
                .await
                .unwrap();
            let again = store
                .record_stripe_facts(Some(delivery), Some((&facts, None)), &[])
                .await
                .unwrap();
            (first.outcome, again.outcome)
        }
    }))
    .await;
    let limits = AdmitLimits {
        per_window: 100,
        window_s: 60,
        daily_tokens: Some(1_000),
    };
    let admitted = join_all(users.iter().enumerate().map(|(i, user)| {
        let store = &stores[i % stores.len()];
        async move {
            let key = format!("key-{i}");
            let reserve = Reserve {
                tokens: 100,
                hold_s: 60,
            };
            let now = shared::clock::Clock::system().unix_ms();
            let before = store
                .chat_admit(*user, Some(&key), limits, reserve, now)
                .await
                .unwrap();
            let reservation = match &before {
                Admission::Miss { reservation, .. } => *reservation,
                _ => None,
            };
            let answer = json!({"answer": i});
            store
                .chat_settle(
                    *user,
                    &Settlement {
                        reservation,
                        cache_key: Some(&key),
                        cache: Some((&answer, 600)),
                        source: SettledSource::Llm,
                        prompt_tokens: 3,
                        completion_tokens: 5,
                        attempts: 1,
                        failed_attempts: 0,
                        usage_estimated: false,
                        anonymous: false,
                    },
                    now,
                )
                .await
                .unwrap();
            let after = store
                .chat_admit(*user, Some(&key), limits, reserve, now)
                .await
                .unwrap();
            (before, after, answer)
        }
    }))
    .await;

    for (first, again) in &applied {
        assert_ne!(*first, Outcome::Duplicate, "the first delivery is recorded");
        assert_eq!(*again, Outcome::Duplicate);
    }
    let recorded: i64 = sql
        .query_one("select count(*) from stripe_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 32);
    for (before, after, answer) in admitted {
        assert!(
            matches!(
                before,
                Admission::Miss {
                    reservation: Some(_),
                    ..
                }
            ),
            "{before:?}"
        );
        assert!(
            matches!(&after, Admission::Hit { response, .. } if *response == answer),
            "{after:?}"
        );
    }
}
