//! Webhook storms in the normal test run (bounded: STORM_USERS, default 60 users, ~450 events).
//! `cargo run -p tools --bin webhook-storm` runs larger ones and prints the figures.

use std::time::Duration;

use testkit::db::TestDb;
use testkit::proxy::DbProxy;
use testkit::storm::{self, StormConfig};

fn users() -> usize {
    std::env::var("STORM_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_duplicated_shuffled_events_leaves_exactly_the_expected_state() {
    let db = TestDb::new().await;
    let config = StormConfig {
        users: users(),
        senders: 8,
        duplicate_share: 0.35,
        cut_database_for: None,
        seed: 7,
    };

    let report = storm::run(&db.url, &db.url, None, config).await;

    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(report.duplicate_deliveries as f64 >= 0.3 * report.unique_events as f64);
    assert_eq!(report.redeliveries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_survives_the_database_going_away_midway() {
    let db = TestDb::new().await;
    let proxy = DbProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let through = proxy.url_through(&db.url);
    let config = StormConfig {
        users: users(),
        senders: 8,
        duplicate_share: 0.35,
        cut_database_for: Some(Duration::from_millis(400)),
        seed: 11,
    };

    let report = storm::run(&db.url, &through, Some(&proxy), config).await;

    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    assert!(
        report.redeliveries > 0,
        "some deliveries met the cut and were delivered again"
    );
}
