//! Runs webhook storms against the local PostgreSQL and prints the figures (docs/testing.md).
//!
//! Usage: webhook-storm [--users 500] [--senders 8]
//! Two storms: one undisturbed, one with every database connection cut for 1 s midway. Exit code
//! 1 if the database does not end exactly as the events say.

use std::time::Duration;

use testkit::db::TestDb;
use testkit::proxy::DbProxy;
use testkit::storm::{self, StormConfig, StormReport};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut users = 500usize;
    let mut senders = 8usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (
            arg.as_str(),
            args.next().and_then(|v| v.parse::<usize>().ok()),
        ) {
            ("--users", Some(v)) => users = v,
            ("--senders", Some(v)) => senders = v,
            _ => {
                eprintln!("usage: webhook-storm [--users N] [--senders N]");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let mut rows: Vec<(&str, StormReport)> = Vec::new();
    let calm = TestDb::new().await;
    let config = StormConfig {
        users,
        senders,
        duplicate_share: 0.35,
        cut_database_for: None,
        seed: 42,
    };
    rows.push((
        "undisturbed",
        storm::run(&calm.url, &calm.url, None, config).await,
    ));
    let cut = TestDb::new().await;
    let proxy = DbProxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let through = proxy.url_through(&cut.url);
    let config = StormConfig {
        cut_database_for: Some(Duration::from_secs(1)),
        seed: 43,
        ..config
    };
    rows.push((
        "database cut for 1 s midway",
        storm::run(&cut.url, &through, Some(&proxy), config).await,
    ));

    println!("webhook storms: {users} users, {senders} concurrent senders, 35% of events duplicated, shuffled");
    println!("| storm | unique events | deliveries | duplicates | non-2xx redelivered | events/s | handler p50 ms | handler p99 ms | state |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut ok = true;
    for (name, r) in &rows {
        ok &= r.mismatches.is_empty();
        println!(
            "| {name} | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {} |",
            r.unique_events,
            r.deliveries,
            r.duplicate_deliveries,
            r.redeliveries,
            r.events_per_second(),
            r.handler_p50_ms,
            r.handler_p99_ms,
            if r.mismatches.is_empty() {
                "exact".to_owned()
            } else {
                format!("{} mismatches", r.mismatches.len())
            }
        );
        for m in &r.mismatches {
            eprintln!("  {name}: {m}");
        }
    }
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
