//! The functions' states as tests and benchmarks build them: one constructor per function over
//! a real database, with test secrets, fast Stripe retries and metrics kept in memory.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use shared::auth::AuthConfig;
use shared::config::{Secret, StoreConfig, StripeApi, StripeMode};
use shared::store::Store;
use shared::stripe::client::{RetryPolicy, StripeClient};
use shared::stripe::ids::PriceId;
use shared::telemetry::Metrics;

/// The webhook secret test deliveries are signed with.
pub const WEBHOOK_SECRET: &str = "whsec_test_integration_secret";
/// The HS256 secret test tokens are signed with.
pub const JWT_SECRET: &str = "local-jwt-secret-for-tests-at-least-32-chars";
/// The full report's price in tests (the Stripe fake sells it at 1900 usd).
pub const PRICE: &str = "price_full_report_test";

/// [`PRICE`] as the config holds it.
pub fn price() -> PriceId {
    PriceId::parse(PRICE).expect("a price id")
}

/// Metric lines a state wrote (EMF JSON, one per request).
pub type MetricLines = Arc<Mutex<Vec<String>>>;

/// A direct PostgreSQL store config for `url`.
pub fn store_config(url: &str) -> StoreConfig {
    StoreConfig::Postgres {
        url: Secret::new(url),
        ca_pem: None,
    }
}

/// Auth with the test HS256 secret.
pub fn auth_config() -> AuthConfig {
    AuthConfig {
        hs256_secret: Some(Secret::new(JWT_SECRET)),
        supabase_url: None,
        jwks_refetch_floor: Duration::from_secs(30),
    }
}

/// Stripe API settings for a fake at `base`.
pub fn stripe_api(base: &str, retries: u32, timeout: Duration) -> StripeApi {
    StripeApi {
        key: Secret::new(crate::stripe_fake::KEY),
        base: base.to_owned(),
        timeout,
        retries,
    }
}

/// Stripe's backoff shrunk to milliseconds, so retries cost tests nothing.
pub fn fast_retries(max_retries: u32) -> RetryPolicy {
    RetryPolicy {
        max_retries,
        initial_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
    }
}

/// A Stripe client for `api` with [`fast_retries`].
pub fn stripe_client(api: &StripeApi) -> StripeClient {
    StripeClient::new(
        &api.base,
        api.key.clone(),
        fast_retries(api.retries),
        api.timeout,
    )
    .expect("stripe client")
}

/// The webhook's config over `store` and a Stripe fake at `stripe_base`, test mode.
pub fn webhook_config(store: StoreConfig, stripe_base: &str) -> webhook::Config {
    webhook::Config {
        store,
        secrets: vec![Secret::new(WEBHOOK_SECRET)],
        tolerance: Duration::from_secs(300),
        stripe_mode: StripeMode::Test,
        max_body_bytes: 1 << 20,
        stripe: stripe_api(stripe_base, 1, Duration::from_secs(2)),
        price_id: Some(price()),
        auto_refund: true,
    }
}

/// The webhook over `store` (its connections), with [`fast_retries`], metrics in memory.
pub fn webhook_state(config: webhook::Config, store: Store) -> (webhook::State, MetricLines) {
    let (metrics, lines) = Metrics::in_memory("webhook");
    let mut state = webhook::State::from_parts(config, store, metrics).expect("webhook state");
    state.stripe = stripe_client(&state.config.stripe);
    (state, lines)
}

/// The reconciler over `store` and a Stripe fake at `stripe_base`, metrics in memory.
pub fn reconcile_state(store: Store, stripe_base: &str) -> (reconcile::State, MetricLines) {
    let config = reconcile::Config {
        store: store_config("postgres://unused"),
        stripe: stripe_api(stripe_base, 1, Duration::from_secs(2)),
        price_id: Some(price()),
        auto_refund: true,
        max_reads: 500,
    };
    let (metrics, lines) = Metrics::in_memory("reconcile");
    let mut state = reconcile::State::from_parts(config, store, metrics).expect("reconcile state");
    state.stripe = stripe_client(&state.config.stripe);
    (state, lines)
}

/// The checkout function's config over `db_url` and a Stripe fake at `stripe_base`.
pub fn checkout_config(db_url: &str, stripe_base: &str) -> checkout::Config {
    checkout::Config {
        store: store_config(db_url),
        auth: auth_config(),
        stripe: stripe_api(stripe_base, 2, Duration::from_secs(2)),
        price_id: price(),
        success_url: "https://app.example.com/report/success?session_id={CHECKOUT_SESSION_ID}"
            .into(),
        cancel_url: "https://app.example.com/report".into(),
        session_ttl_s: 7200,
        rate_limit_per_min: 1000,
        status_rate_limit_per_min: 1000,
        max_wait: Duration::from_secs(10),
    }
}

/// The checkout function over `store`, with [`fast_retries`], metrics in memory.
pub fn checkout_state(config: checkout::Config, store: Store) -> (checkout::State, MetricLines) {
    let (metrics, lines) = Metrics::in_memory("checkout");
    let mut state = checkout::State::from_parts(config, store, metrics).expect("checkout state");
    state.stripe = stripe_client(&state.config.stripe);
    (state, lines)
}

/// The chat function over `store`, metrics in memory.
pub fn chat_state(config: chat::Config, store: Store) -> (chat::State, MetricLines) {
    let (metrics, lines) = Metrics::in_memory("chat");
    let state = chat::State::from_parts(config, store, metrics).expect("chat state");
    (state, lines)
}

/// The sum of a metric over every line written.
pub fn metric_total(lines: &MetricLines, name: &str) -> f64 {
    lines
        .lock()
        .map(|lines| {
            lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|d| d.get(name).and_then(Value::as_f64))
                .sum()
        })
        .unwrap_or_default()
}
