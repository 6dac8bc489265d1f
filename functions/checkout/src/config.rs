//! The checkout function's configuration, read once per cold start.

use std::time::Duration;

use shared::auth::AuthConfig;
use shared::config::{self, ConfigError, EnvReader, StoreConfig, StripeApi};
use shared::stripe::ids::PriceId;

/// The checkout function's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub store: StoreConfig,
    pub auth: AuthConfig,
    pub stripe: StripeApi,
    pub price_id: PriceId,
    pub success_url: String,
    pub cancel_url: String,
    pub session_ttl_s: u32,
    pub rate_limit_per_min: u32,
    pub status_rate_limit_per_min: u32,
    /// How long a click waits for a concurrent click that is creating the session.
    pub max_wait: Duration,
}

impl Config {
    /// Reads through `env`.
    pub fn read(mut env: EnvReader<'_>) -> Result<Self, ConfigError> {
        let app_env = env.app_env();
        let store = StoreConfig::read(&mut env, app_env);
        shared::http_client::check_extra_roots(&mut env);
        let auth = config::read_auth(&mut env, app_env);
        let stripe = config::read_stripe_secret_key(&mut env, app_env)
            .map(|(key, _mode)| StripeApi::read(&mut env, key, 8000, 2));
        let price_id = config::read_price_id(&mut env, "STRIPE_FULL_REPORT_PRICE_ID", app_env);
        let mut success_url = config::read_redirect_url(
            &mut env,
            "CHECKOUT_SUCCESS_URL",
            app_env,
            "http://localhost:3000/report/success?session_id={CHECKOUT_SESSION_ID}",
        );
        if !success_url.contains("{CHECKOUT_SESSION_ID}") {
            let sep = if success_url.contains('?') { '&' } else { '?' };
            success_url = format!("{success_url}{sep}session_id={{CHECKOUT_SESSION_ID}}");
        }
        let cancel_url = config::read_redirect_url(
            &mut env,
            "CHECKOUT_CANCEL_URL",
            app_env,
            "http://localhost:3000/report?checkout=cancelled",
        );
        // Stripe accepts expires_at from 30 minutes to 24 hours ahead.
        let session_ttl_s = env.integer("CHECKOUT_SESSION_TTL_S", 7200, 1860..=86_400) as u32;
        let rate_limit_per_min = env.integer("CHECKOUT_RATE_LIMIT_PER_MIN", 10, 1..=10_000) as u32;
        let status_rate_limit_per_min =
            env.integer("CHECKOUT_STATUS_RATE_LIMIT_PER_MIN", 60, 1..=10_000) as u32;
        let max_wait =
            Duration::from_millis(env.integer("CHECKOUT_MAX_WAIT_MS", 20_000, 100..=60_000));
        let config = match (store, stripe, price_id) {
            (Some(store), Some(stripe), Some(price_id)) => Some(Config {
                store,
                auth,
                stripe,
                price_id,
                success_url,
                cancel_url,
                session_ttl_s,
                rate_limit_per_min,
                status_rate_limit_per_min,
                max_wait,
            }),
            _ => None,
        };
        env.finish_required(config, "STRIPE_SECRET_KEY")
    }

    /// The lease a click holds while creating a session: every Stripe try and backoff fits.
    pub fn lease_s(&self) -> u32 {
        let per_try = self.stripe.timeout.as_secs_f64() + 5.0;
        (per_try * f64::from(self.stripe.retries + 1)).ceil() as u32 + 5
    }
}
