//! The Stripe settings: the secret key and the mode it implies, the API's base, timeout and
//! retries, the webhook's signing secrets and the product's price.

use super::{AppEnv, EnvReader, Secret};
use crate::stripe::ids::PriceId;

/// Whether Stripe objects are expected to be live or test mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StripeMode {
    Test,
    Live,
}

impl StripeMode {
    /// The mode an event with this `livemode` flag belongs to.
    pub fn of_livemode(livemode: bool) -> Self {
        if livemode {
            StripeMode::Live
        } else {
            StripeMode::Test
        }
    }
}

/// How a function reaches the Stripe API.
#[derive(Clone, Debug)]
pub struct StripeApi {
    /// `STRIPE_SECRET_KEY`: a secret (`sk_`) or restricted (`rk_`) key.
    pub key: Secret,
    /// `STRIPE_API_BASE`, default `https://api.stripe.com` (tests and local runs point it at a
    /// stand-in).
    pub base: String,
    /// `STRIPE_TIMEOUT_MS`: one try, connect to last byte.
    pub timeout: std::time::Duration,
    /// `STRIPE_MAX_RETRIES`.
    pub retries: u32,
}

impl StripeApi {
    /// Reads the API settings around an already checked `key`; `timeout_ms` and `retries` are
    /// the function's defaults (the webhook answers Stripe within its own delivery timeout, so
    /// its defaults are shorter than checkout's).
    pub fn read(env: &mut EnvReader<'_>, key: Secret, timeout_ms: u64, retries: u64) -> StripeApi {
        let base = env
            .optional("STRIPE_API_BASE")
            .unwrap_or_else(|| "https://api.stripe.com".into());
        if !base.starts_with("http://") && !base.starts_with("https://") {
            env.problem("STRIPE_API_BASE", "must be an http(s) URL");
        }
        let timeout = std::time::Duration::from_millis(env.integer(
            "STRIPE_TIMEOUT_MS",
            timeout_ms,
            100..=60_000,
        ));
        let retries = env.integer("STRIPE_MAX_RETRIES", retries, 0..=5) as u32;
        StripeApi {
            key,
            base,
            timeout,
            retries,
        }
    }
}

/// `STRIPE_WEBHOOK_SECRET`: one or more comma-separated endpoint secrets (several while a secret
/// is being rolled). In production each must be a `whsec_` secret.
pub fn read_webhook_secrets(env: &mut EnvReader<'_>, app_env: AppEnv) -> Vec<Secret> {
    let Some(raw) = env.required("STRIPE_WEBHOOK_SECRET") else {
        return Vec::new();
    };
    let secrets: Vec<Secret> = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Secret::new)
        .collect();
    if secrets.is_empty() {
        env.problem("STRIPE_WEBHOOK_SECRET", "holds no secret");
    } else if app_env.is_production() && secrets.iter().any(|s| !s.expose().starts_with("whsec_")) {
        env.problem(
            "STRIPE_WEBHOOK_SECRET",
            "must be the endpoint's whsec_ signing secret(s) when APP_ENV=production",
        );
    }
    secrets
}

/// `STRIPE_SECRET_KEY` when a function needs it: `sk_`/`rk_`, live in production. Returns the key
/// and the mode it implies.
pub fn read_stripe_secret_key(
    env: &mut EnvReader<'_>,
    app_env: AppEnv,
) -> Option<(Secret, StripeMode)> {
    let key = env.required("STRIPE_SECRET_KEY")?;
    let mode = stripe_key_mode(&key);
    match mode {
        None => {
            env.problem(
                "STRIPE_SECRET_KEY",
                "must be a Stripe secret (sk_) or restricted (rk_) key",
            );
            None
        }
        Some(StripeMode::Test) if app_env.is_production() => {
            env.problem(
                "STRIPE_SECRET_KEY",
                "is a test-mode key; APP_ENV=production needs sk_live_ or rk_live_",
            );
            None
        }
        Some(mode) => Some((Secret::new(key), mode)),
    }
}

/// The mode of a Stripe secret or restricted key, `None` if it is neither.
pub fn stripe_key_mode(key: &str) -> Option<StripeMode> {
    if key.starts_with("sk_live_") || key.starts_with("rk_live_") {
        Some(StripeMode::Live)
    } else if key.starts_with("sk_test_") || key.starts_with("rk_test_") {
        Some(StripeMode::Test)
    } else {
        None
    }
}

/// The Stripe mode a function that has no secret key expects: the key's mode when
/// `STRIPE_SECRET_KEY` is set, otherwise live in production and test elsewhere.
pub fn expected_stripe_mode(env: &mut EnvReader<'_>, app_env: AppEnv) -> StripeMode {
    match env.optional("STRIPE_SECRET_KEY") {
        Some(key) => match stripe_key_mode(&key) {
            Some(StripeMode::Test) if app_env.is_production() => {
                env.problem(
                    "STRIPE_SECRET_KEY",
                    "is a test-mode key; APP_ENV=production needs sk_live_ or rk_live_",
                );
                StripeMode::Live
            }
            Some(mode) => mode,
            None => {
                env.problem(
                    "STRIPE_SECRET_KEY",
                    "must be a Stripe secret (sk_) or restricted (rk_) key",
                );
                StripeMode::Test
            }
        },
        None if app_env.is_production() => StripeMode::Live,
        None => StripeMode::Test,
    }
}

/// A Stripe price id (`None` when missing or malformed, with the problem recorded); `price_` in
/// production.
pub fn read_price_id(
    env: &mut EnvReader<'_>,
    variable: &'static str,
    app_env: AppEnv,
) -> Option<PriceId> {
    let raw = env.required(variable)?;
    let Ok(id) = PriceId::parse(&raw) else {
        env.problem(variable, "must be a price id (no spaces)");
        return None;
    };
    if app_env.is_production() && !id.is_stripe_price() {
        env.problem(
            variable,
            "must be a Stripe price id (price_...) when APP_ENV=production",
        );
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::reader;

    #[test]
    fn webhook_secrets_split_on_commas() {
        let mut env = reader(&[("STRIPE_WEBHOOK_SECRET", "whsec_a, whsec_b,")]);
        let secrets = read_webhook_secrets(&mut env, AppEnv::Production);
        assert_eq!(secrets.len(), 2);
        assert_eq!(secrets[1].expose(), "whsec_b");
    }

    #[test]
    fn stripe_mode_follows_key_then_app_env() {
        let mut env = reader(&[("STRIPE_SECRET_KEY", "rk_live_x")]);
        assert_eq!(
            expected_stripe_mode(&mut env, AppEnv::Development),
            StripeMode::Live
        );
        let mut env = reader(&[]);
        assert_eq!(
            expected_stripe_mode(&mut env, AppEnv::Production),
            StripeMode::Live
        );
        assert_eq!(
            expected_stripe_mode(&mut env, AppEnv::Staging),
            StripeMode::Test
        );
    }
}
