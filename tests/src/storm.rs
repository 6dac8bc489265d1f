//! A webhook storm: thousands of Stripe events for hundreds of users (payments by card and by
//! delayed methods that succeed or fail, subscriptions created, renewed after a failed attempt,
//! canceled), made by the fake Stripe, delivered with duplicates, in shuffled order, by
//! concurrent senders that redeliver every non-2xx answer as Stripe does, optionally while the
//! database connections are cut midway. Every delivery reads its object from the fake, as from
//! Stripe. Afterwards the database must equal what the fake's objects say.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::store::Store;
use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::fixtures::{self, FunctionUrlRequest};
use crate::stripe_fake::FakeStripe;

const SECRET: &str = crate::apps::WEBHOOK_SECRET;

/// Storm size and shape.
#[derive(Clone, Copy, Debug)]
pub struct StormConfig {
    pub users: usize,
    pub senders: usize,
    /// Share of events delivered more than once.
    pub duplicate_share: f64,
    /// Cut every database connection for this long when half the deliveries are done.
    pub cut_database_for: Option<Duration>,
    pub seed: u64,
}

/// What happened.
#[derive(Clone, Debug)]
pub struct StormReport {
    pub unique_events: usize,
    pub deliveries: usize,
    pub duplicate_deliveries: usize,
    pub redeliveries: usize,
    pub elapsed: Duration,
    pub handler_p50_ms: f64,
    pub handler_p99_ms: f64,
    /// Differences between the database and the expected state (empty when correct).
    pub mismatches: Vec<String>,
}

impl StormReport {
    /// Deliveries per second.
    pub fn events_per_second(&self) -> f64 {
        self.deliveries as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

struct Expected {
    user: String,
    order_status: &'static str,
    subscription_status: &'static str,
}

/// A small deterministic generator (xorshift), so a storm can be replayed by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() % 1_000_000) as f64 / 1_000_000.0
    }
}

/// Users, their orders and what happens to their money and subscriptions, at the fake; the
/// events it emits, in Stripe's order, and what the end must be.
async fn plan(sql: &Client, stripe: &FakeStripe, users: usize) -> (Vec<Value>, Vec<Expected>) {
    let mut expected = Vec::new();
    for i in 0..users {
        let user = uuid::Uuid::new_v4().to_string();
        sql.execute(
            "insert into auth.users (id, email) values ($1::text::uuid, $2)",
            &[&user, &format!("u{i}@example.com")],
        )
        .await
        .expect("user");
        let order: String = sql
            .query_one(
                "insert into orders (user_id) values ($1::text::uuid) returning id::text",
                &[&user],
            )
            .await
            .expect("order")
            .get(0);
        let session = stripe.session_for_order(&user, &order);
        sql.execute(
            "update orders set stripe_checkout_session_id = $2, session_created_at = now() - interval '1 minute'
             where id = $1::text::uuid",
            &[&order, &session],
        )
        .await
        .expect("attach");
        let order_status = match i % 4 {
            0 | 1 => {
                stripe.pay(&session).expect("pay");
                "paid"
            }
            2 => {
                stripe.pay_async(&session).expect("pay");
                stripe.settle_async(&session, true).expect("settle");
                "paid"
            }
            _ => {
                stripe.pay_async(&session).expect("pay");
                stripe.settle_async(&session, false).expect("settle");
                "failed"
            }
        };
        let subscription = stripe.subscribe(&user, "price_monthly_plan");
        stripe
            .set_subscription_status(&subscription, "past_due")
            .expect("past due");
        stripe.renew(&subscription).expect("renew");
        let subscription_status = if i % 5 == 0 { "canceled" } else { "active" };
        stripe
            .set_subscription_status(&subscription, subscription_status)
            .expect("status");
        expected.push(Expected {
            user,
            order_status,
            subscription_status,
        });
    }
    (stripe.take_events(), expected)
}

/// Runs a storm against the database at `db_url` (migrated, empty), reaching it through
/// `delivery_url` (e.g. a [`crate::proxy::DbProxy`]), and checks the result.
pub async fn run(
    db_url: &str,
    delivery_url: &str,
    proxy: Option<&crate::proxy::DbProxy>,
    config: StormConfig,
) -> StormReport {
    let sql = crate::db::connect(db_url).await;
    let stripe = FakeStripe::start().await;
    let (events, expected) = plan(&sql, &stripe, config.users).await;
    let bodies: Vec<Vec<u8>> = events.iter().map(fixtures::body).collect();
    let mut rng = Rng(config.seed | 1);
    let mut deliveries: Vec<usize> = (0..bodies.len()).collect();
    let mut duplicates = 0;
    for i in 0..bodies.len() {
        if rng.unit() < config.duplicate_share {
            let copies = 1 + (rng.next() % 2) as usize;
            for _ in 0..copies {
                deliveries.push(i);
                duplicates += 1;
            }
        }
    }
    for i in (1..deliveries.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        deliveries.swap(i, j);
    }
    let total = deliveries.len();
    let queue = Arc::new(Mutex::new(
        deliveries.into_iter().collect::<VecDeque<usize>>(),
    ));
    let bodies = Arc::new(bodies);
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let redeliveries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..config.senders {
        let (state, _) = crate::apps::webhook_state(
            crate::apps::webhook_config(crate::apps::store_config(delivery_url), &stripe.uri()),
            Store::postgres(delivery_url, 1).expect("store"),
        );
        let (queue, bodies, latencies, redeliveries, done) = (
            queue.clone(),
            bodies.clone(),
            latencies.clone(),
            redeliveries.clone(),
            done.clone(),
        );
        senders.push(tokio::spawn(async move {
            loop {
                let Some(index) = queue.lock().await.pop_front() else {
                    // Others may still push redeliveries back.
                    if done.load(std::sync::atomic::Ordering::SeqCst) >= total {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let body = &bodies[index];
                let request = FunctionUrlRequest::post("/api/stripe/webhook", body)
                    .header("stripe-signature", &fixtures::sign(body, SECRET))
                    .into_request()
                    .expect("request");
                let t = Instant::now();
                let status = webhook::handle(&state, request).await.status();
                latencies
                    .lock()
                    .await
                    .push(t.elapsed().as_secs_f64() * 1000.0);
                if status.is_success() {
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                } else {
                    // Stripe delivers again later.
                    redeliveries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    queue.lock().await.push_back(index);
                }
            }
        }));
    }
    if let (Some(proxy), Some(cut)) = (proxy, config.cut_database_for) {
        while done.load(std::sync::atomic::Ordering::SeqCst) < total / 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        proxy.down();
        tokio::time::sleep(cut).await;
        proxy.up();
    }
    for sender in senders {
        let _ = sender.await;
    }
    let elapsed = started.elapsed();
    let mut latencies = latencies.lock().await.clone();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let pct = |p: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    StormReport {
        unique_events: events.len(),
        deliveries: total,
        duplicate_deliveries: duplicates,
        redeliveries: redeliveries.load(std::sync::atomic::Ordering::SeqCst),
        elapsed,
        handler_p50_ms: pct(0.5),
        handler_p99_ms: pct(0.99),
        mismatches: verify(&sql, events.len(), &expected).await,
    }
}

async fn count(sql: &Client, query: &str) -> i64 {
    sql.query_one(query, &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

async fn verify(sql: &Client, unique: usize, expected: &[Expected]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut expect = |what: &str, got: i64, want: i64| {
        if got != want {
            problems.push(format!("{what}: {got}, expected {want}"));
        }
    };
    let paid = expected.iter().filter(|e| e.order_status == "paid").count() as i64;
    let users = expected.len() as i64;
    expect(
        "events recorded",
        count(sql, "select count(*) from stripe_events").await,
        unique as i64,
    );
    expect(
        "unmatched events",
        count(
            sql,
            "select count(*) from stripe_events where outcome = 'unmatched'",
        )
        .await,
        0,
    );
    expect(
        "paid orders",
        count(sql, "select count(*) from orders where status = 'paid'").await,
        paid,
    );
    expect(
        "failed orders",
        count(sql, "select count(*) from orders where status = 'failed'").await,
        users - paid,
    );
    expect(
        "order_paid audits",
        count(
            sql,
            "select count(*) from payment_audit where kind = 'order_paid'",
        )
        .await,
        paid,
    );
    expect(
        "duplicate payments",
        count(
            sql,
            "select count(*) from payment_audit where kind = 'duplicate_payment'",
        )
        .await,
        0,
    );
    expect(
        "report entitlements",
        count(
            sql,
            "select count(*) from entitlements where product = 'full_report' and active",
        )
        .await,
        paid,
    );
    expect(
        "paid invoices (the first, and the renewal)",
        count(sql, "select count(*) from invoices where status = 'paid'").await,
        2 * users,
    );
    expect(
        "invoice_paid audits",
        count(
            sql,
            "select count(*) from payment_audit where kind = 'invoice_paid'",
        )
        .await,
        2 * users,
    );
    expect(
        "invoice_payment_failed audits",
        count(
            sql,
            "select count(*) from payment_audit where kind = 'invoice_payment_failed'",
        )
        .await,
        users,
    );
    let canceled = expected
        .iter()
        .filter(|e| e.subscription_status == "canceled")
        .count() as i64;
    expect(
        "canceled subscriptions",
        count(
            sql,
            "select count(*) from subscriptions where status = 'canceled'",
        )
        .await,
        canceled,
    );
    expect(
        "active subscriptions",
        count(
            sql,
            "select count(*) from subscriptions where status = 'active'",
        )
        .await,
        users - canceled,
    );
    expect(
        "active subscription entitlements",
        count(
            sql,
            "select count(*) from entitlements where product = 'subscription' and active",
        )
        .await,
        users - canceled,
    );
    // Per user: the newest subscription state won and the order ended as its events say.
    for e in expected {
        let row = sql
            .query_one(
                "select (select status from orders where user_id = $1::text::uuid),
                        (select status from subscriptions where user_id = $1::text::uuid)",
                &[&e.user],
            )
            .await;
        match row {
            Ok(row) => {
                let (order, sub): (Option<String>, Option<String>) = (row.get(0), row.get(1));
                if order.as_deref() != Some(e.order_status)
                    || sub.as_deref() != Some(e.subscription_status)
                {
                    problems.push(format!(
                        "user {}: order {order:?} sub {sub:?}, expected {} {}",
                        e.user, e.order_status, e.subscription_status
                    ));
                }
            }
            Err(err) => problems.push(format!("user {}: {err}", e.user)),
        }
        if problems.len() > 20 {
            break;
        }
    }
    problems
}
