//! A whole shop for money tests: a fresh database, the fake Stripe, several checkout instances
//! (as Lambda runs several) and the webhook, all on the real SQL functions, with the database
//! reached through a proxy that can cut it off. Events Stripe emits wait in the fake's outbox
//! until the test delivers them, so a test decides when and how often each one arrives.

use std::time::Duration;

use serde_json::{json, Value};
use shared::store::Store;
use tokio_postgres::Client;

use crate::apps::{self, MetricLines};
use crate::db::TestDb;
use crate::fixtures::{self, FunctionUrlRequest};
use crate::proxy::DbProxy;
use crate::stripe_fake::FakeStripe;
use crate::tokens;

/// How the shop is set up.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// Checkout instances (each its own pool, as Lambda instances are).
    pub instances: usize,
    pub session_ttl_s: u32,
    pub auto_refund: bool,
    /// The model test: how the chargebacks still open at the end are decided.
    pub open_disputes_end_won: bool,
    /// The model test: the end catches up through one reconciler run instead of deliveries.
    pub finish_by_reconciler: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            instances: 2,
            session_ttl_s: 7200,
            auto_refund: true,
            open_disputes_end_won: true,
            finish_by_reconciler: false,
        }
    }
}

/// A running shop.
pub struct World {
    pub db: TestDb,
    /// A direct connection, not through the proxy.
    pub sql: Client,
    pub stripe: FakeStripe,
    pub proxy: DbProxy,
    pub checkouts: Vec<checkout::State>,
    pub webhook: webhook::State,
    pub webhook_metrics: MetricLines,
    pub checkout_metrics: Vec<MetricLines>,
    /// The reconciler, on the webhook's store.
    pub reconciler: reconcile::State,
    pub reconcile_metrics: MetricLines,
}

/// An HTTP answer: status and JSON body.
pub type Answer = (u16, Value);

impl World {
    /// A fresh shop.
    pub async fn new(setup: Setup) -> World {
        let db = TestDb::new().await;
        let sql = db.client().await;
        let stripe = FakeStripe::start().await;
        let proxy = DbProxy::start("127.0.0.1:5432".parse().expect("address")).await;
        let url = proxy.url_through(&db.url);
        let mut checkouts = Vec::new();
        let mut checkout_metrics = Vec::new();
        for _ in 0..setup.instances.max(1) {
            let config = checkout::Config {
                session_ttl_s: setup.session_ttl_s,
                max_wait: Duration::from_secs(10),
                ..apps::checkout_config(&url, &stripe.uri())
            };
            let (state, lines) =
                apps::checkout_state(config, Store::postgres(&url, 2).expect("store"));
            checkouts.push(state);
            checkout_metrics.push(lines);
        }
        let config = webhook::Config {
            auto_refund: setup.auto_refund,
            ..apps::webhook_config(apps::store_config(&url), &stripe.uri())
        };
        let store = Store::postgres(&url, 2).expect("store");
        let (webhook, webhook_metrics) = apps::webhook_state(config, store.clone());
        let (mut reconciler, reconcile_metrics) = apps::reconcile_state(store, &stripe.uri());
        reconciler.config.auto_refund = setup.auto_refund;
        World {
            db,
            sql,
            stripe,
            proxy,
            checkouts,
            webhook,
            webhook_metrics,
            checkout_metrics,
            reconciler,
            reconcile_metrics,
        }
    }

    /// Empties the database, the fake Stripe and the metrics, and applies `setup`'s TTL and
    /// webhook key (the instance count stays): a fresh shop without a fresh database.
    pub async fn reset(&mut self, setup: Setup) {
        self.proxy.up();
        self.sql
            .batch_execute(
                "truncate public.payment_audit, public.stripe_events, public.entitlements,
                   public.stripe_sessions, public.stripe_payments, public.stripe_refunds,
                   public.stripe_disputes, public.invoices, public.subscriptions,
                   public.stripe_customers, public.chat_cache, public.chat_usage,
                   internal.rate_limits, internal.stripe_actions, internal.verifications,
                   internal.reconciler_runs, public.orders, auth.users cascade",
            )
            .await
            .expect("truncate");
        self.stripe.reset();
        for state in &mut self.checkouts {
            state.config.session_ttl_s = setup.session_ttl_s;
        }
        self.webhook.config.auto_refund = setup.auto_refund;
        self.reconciler.config.auto_refund = setup.auto_refund;
        for lines in [&self.webhook_metrics, &self.reconcile_metrics]
            .into_iter()
            .chain(&self.checkout_metrics)
        {
            if let Ok(mut lines) = lines.lock() {
                lines.clear();
            }
        }
    }

    /// A new user in `auth.users`.
    pub async fn user(&self) -> String {
        self.db.create_user(&self.sql).await.to_string()
    }

    /// The user's access token.
    pub fn token(user: &str) -> String {
        tokens::hs256(
            &tokens::user_claims(user, None),
            apps::JWT_SECRET.as_bytes(),
        )
    }

    /// `POST` checkout on instance `instance`.
    pub async fn click_on(&self, instance: usize, user: &str) -> Answer {
        let state = &self.checkouts[instance % self.checkouts.len()];
        let request = FunctionUrlRequest::post("/", b"").bearer(&Self::token(user));
        call_checkout(state, request).await
    }

    /// `POST` checkout.
    pub async fn click(&self, user: &str) -> Answer {
        self.click_on(0, user).await
    }

    /// `n` concurrent clicks of one user, spread over the instances.
    pub async fn clicks(&self, user: &str, n: usize) -> Vec<Answer> {
        futures_util::future::join_all((0..n).map(|i| self.click_on(i, user))).await
    }

    /// `GET` checkout (the success page's poll).
    pub async fn poll(&self, user: &str, session: Option<&str>) -> Answer {
        let query = session
            .map(|s| format!("session_id={s}"))
            .unwrap_or_default();
        let request = FunctionUrlRequest::get("/", &query).bearer(&Self::token(user));
        call_checkout(&self.checkouts[0], request).await
    }

    /// Delivers one event to the webhook, signed now; a 2xx marks it delivered at the fake (it
    /// is then no longer listed as undelivered).
    pub async fn deliver(&self, event: &Value) -> Answer {
        let body = fixtures::body(event);
        let request = FunctionUrlRequest::post("/", &body).header(
            "stripe-signature",
            &fixtures::sign(&body, apps::WEBHOOK_SECRET),
        );
        let response = match request.into_request() {
            Ok(request) => webhook::handle(&self.webhook, request).await,
            Err(response) => response,
        };
        if response.status().is_success() {
            self.stripe
                .mark_delivered(event["id"].as_str().unwrap_or_default());
        }
        (response.status().as_u16(), fixtures::json_body(&response))
    }

    /// One reconciler run (from the last one, or `since`, Unix seconds).
    pub async fn reconcile(&self, since: Option<i64>) -> reconcile::Report {
        reconcile::handle(&self.reconciler, since, None)
            .await
            .unwrap_or_else(|e| panic!("reconciler run failed: {e}"))
    }

    /// Delivers everything in the outbox in order, as Stripe does when all is well; events the
    /// webhook did not take (non-2xx) come back, to deliver again later.
    pub async fn deliver_all(&self) -> Vec<Value> {
        let mut failed = Vec::new();
        // A delivery can emit events itself (a refund, an expiry): deliver until quiet.
        for _ in 0..8 {
            let events = self.stripe.take_events();
            if events.is_empty() {
                break;
            }
            for event in events {
                let (status, body) = self.deliver(&event).await;
                assert!(status < 500 || status == 503, "webhook {status}: {body}");
                if status != 200 {
                    failed.push(event);
                }
            }
        }
        failed
    }

    /// One value from the database.
    pub async fn scalar<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> T {
        self.sql.query_one(sql, &[]).await.expect(sql).get(0)
    }

    /// The order row of a session as JSON (`status`, `amount_refunded`, ...).
    pub async fn order_of(&self, session: &str) -> Value {
        self.sql
            .query_one(
                "select coalesce((select to_jsonb(o) from orders o where stripe_checkout_session_id = $1), 'null'::jsonb)",
                &[&session],
            )
            .await
            .map(|r| r.get::<_, Value>(0))
            .unwrap_or(Value::Null)
    }

    /// Whether the user's full report is unlocked.
    pub async fn owns(&self, user: &str) -> bool {
        self.sql
            .query_one(
                "select coalesce((select active from entitlements where user_id = $1::text::uuid and product = 'full_report'), false)",
                &[&user],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(false)
    }

    /// Sessions at the fake that were created for `user` by our checkout and are open now.
    pub fn open_sessions_of(&self, user: &str) -> Vec<String> {
        self.stripe
            .sessions()
            .into_iter()
            .filter(|s| {
                s["status"] == "open"
                    && s["client_reference_id"] == json!(user)
                    && s["metadata"]["order_id"].is_string()
            })
            .filter_map(|s| s["id"].as_str().map(str::to_owned))
            .collect()
    }

    /// The sum of a webhook metric.
    pub fn webhook_metric(&self, name: &str) -> f64 {
        apps::metric_total(&self.webhook_metrics, name)
    }

    /// The sum of a checkout metric over every instance.
    pub fn checkout_metric(&self, name: &str) -> f64 {
        self.checkout_metrics
            .iter()
            .map(|l| apps::metric_total(l, name))
            .sum()
    }
}

async fn call_checkout(state: &checkout::State, request: FunctionUrlRequest) -> Answer {
    let response = match request.into_request() {
        Ok(request) => checkout::handle(state, request).await,
        Err(response) => response,
    };
    (response.status().as_u16(), fixtures::json_body(&response))
}
