//! Typed configuration read from the environment once per cold start.
//!
//! Every function builds its own config struct from the pieces here, asking only for the
//! variables it uses. Reading collects every problem before failing, and a problem names the
//! variable and what is wrong with it, never its value.

use std::fmt;
use std::time::Duration;

mod stripe;

pub use stripe::{
    expected_stripe_mode, read_price_id, read_stripe_secret_key, read_webhook_secrets,
    stripe_key_mode, StripeApi, StripeMode,
};

/// A secret value (API key, signing secret, connection string with a password).
/// `Debug` and `Display` never show it; call [`Secret::expose`] where it is actually used.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that sends or uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where the app runs. Only `production` enforces the live-key rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppEnv {
    Development,
    Test,
    Staging,
    Production,
}

impl AppEnv {
    /// True for `APP_ENV=production`.
    pub fn is_production(self) -> bool {
        self == AppEnv::Production
    }
}

/// One thing wrong with one variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub variable: &'static str,
    pub what: String,
}

/// Every problem found while reading the configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration ({} problem(s)):",
            self.problems.len()
        )?;
        for p in &self.problems {
            write!(f, "\n  - {}: {}", p.variable, p.what)?;
        }
        Ok(())
    }
}

type Lookup<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

/// Reads variables through a lookup function (the process environment, or a map in tests) and
/// collects problems instead of stopping at the first.
pub struct EnvReader<'a> {
    lookup: Lookup<'a>,
    problems: Vec<Problem>,
}

impl<'a> EnvReader<'a> {
    /// Reads from the process environment.
    pub fn from_env() -> EnvReader<'static> {
        EnvReader::new(|name| std::env::var(name).ok())
    }

    /// Reads through `lookup`; empty values count as unset.
    pub fn new(lookup: impl Fn(&str) -> Option<String> + 'a) -> Self {
        Self {
            lookup: Box::new(lookup),
            problems: Vec::new(),
        }
    }

    /// Records a problem with `variable`.
    pub fn problem(&mut self, variable: &'static str, what: impl Into<String>) {
        self.problems.push(Problem {
            variable,
            what: what.into(),
        });
    }

    /// The trimmed value, or `None` when unset or empty.
    pub fn optional(&self, variable: &str) -> Option<String> {
        (self.lookup)(variable)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// The value, or a recorded "is required" problem.
    pub fn required(&mut self, variable: &'static str) -> Option<String> {
        let value = self.optional(variable);
        if value.is_none() {
            self.problem(variable, "is required but not set");
        }
        value
    }

    /// Parses an optional value with `parse`, falling back to `default` when unset.
    /// `expected` describes a valid value for the problem message.
    pub fn parsed<T>(
        &mut self,
        variable: &'static str,
        default: T,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> T {
        match self.optional(variable) {
            None => default,
            Some(raw) => match parse(&raw) {
                Some(v) => v,
                None => {
                    self.problem(variable, format!("must be {expected}"));
                    default
                }
            },
        }
    }

    /// An optional integer within `range`, or `default`.
    pub fn integer(
        &mut self,
        variable: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> u64 {
        let expected = format!("a whole number from {} to {}", range.start(), range.end());
        self.parsed(variable, default, &expected, |raw| {
            raw.parse::<u64>().ok().filter(|v| range.contains(v))
        })
    }

    /// An optional duration given in whole seconds.
    pub fn seconds(
        &mut self,
        variable: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Duration {
        Duration::from_secs(self.integer(variable, default, range))
    }

    /// `APP_ENV`: development (default), test, staging or production.
    pub fn app_env(&mut self) -> AppEnv {
        self.parsed(
            "APP_ENV",
            AppEnv::Development,
            "one of development, test, staging, production",
            |raw| match raw.to_ascii_lowercase().as_str() {
                "development" | "dev" | "local" => Some(AppEnv::Development),
                "test" => Some(AppEnv::Test),
                "staging" => Some(AppEnv::Staging),
                "production" | "prod" => Some(AppEnv::Production),
                _ => None,
            },
        )
    }

    /// Finishes reading a config assembled only when its required parts were present: the
    /// recorded problems if any, else the value (a missing value with no recorded problem is
    /// reported against `variable`).
    pub fn finish_required<T>(
        mut self,
        value: Option<T>,
        variable: &'static str,
    ) -> Result<T, ConfigError> {
        match value {
            Some(value) if self.problems.is_empty() => Ok(value),
            _ => {
                if self.problems.is_empty() {
                    self.problem(variable, "is required");
                }
                Err(ConfigError {
                    problems: self.problems,
                })
            }
        }
    }

    /// Finishes reading: `Ok(value)` when no problem was recorded.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError {
                problems: self.problems,
            })
        }
    }
}

/// How the store reaches the database.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// Direct PostgreSQL (`DATABASE_URL`); works behind Supabase's transaction pooler.
    Postgres {
        url: Secret,
        /// Extra PEM root certificate(s), e.g. Supabase's CA, from `DATABASE_CA_CERT`.
        ca_pem: Option<String>,
    },
    /// Supabase's PostgREST (`SUPABASE_URL` + `SUPABASE_SERVICE_ROLE_KEY`).
    PostgRest { url: String, service_key: Secret },
}

impl StoreConfig {
    /// `DATABASE_URL` wins; otherwise both Supabase variables are required.
    pub fn read(env: &mut EnvReader<'_>, app_env: AppEnv) -> Option<StoreConfig> {
        if let Some(url) = env.optional("DATABASE_URL") {
            let ca_pem = match env.optional("DATABASE_CA_CERT") {
                Some(pem) if pem.starts_with("-----BEGIN") => Some(pem),
                Some(path) => match std::fs::read_to_string(&path) {
                    Ok(pem) => Some(pem),
                    Err(_) => {
                        env.problem(
                            "DATABASE_CA_CERT",
                            "is neither PEM text nor a readable PEM file",
                        );
                        None
                    }
                },
                None => None,
            };
            // libpq's sslmode and sslrootcert are read here too (tokio-postgres knows neither
            // verify-ca nor verify-full), and the certificates they name must load.
            let checked = crate::store::database_url::DatabaseUrl::parse(&url, ca_pem.is_some())
                .map_err(|e| ("DATABASE_URL", e.0))
                .and_then(|parsed| {
                    crate::store::tls::client_config(&parsed.tls, ca_pem.as_deref())
                        .map(|_| ())
                        .map_err(|e| (e.variable, e.what))
                });
            if let Err((variable, what)) = checked {
                env.problem(variable, what);
                return None;
            }
            return Some(StoreConfig::Postgres {
                url: Secret::new(url),
                ca_pem,
            });
        }
        let url = env.optional("SUPABASE_URL");
        let key = env.optional("SUPABASE_SERVICE_ROLE_KEY");
        match (url, key) {
            (None, None) => {
                env.problem(
                    "DATABASE_URL",
                    "is required (or set SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY)",
                );
                None
            }
            (Some(url), None) => {
                read_supabase_url(env, &url, app_env);
                env.problem(
                    "SUPABASE_SERVICE_ROLE_KEY",
                    "is required when SUPABASE_URL is set and DATABASE_URL is not",
                );
                None
            }
            (None, Some(_)) => {
                env.problem(
                    "SUPABASE_URL",
                    "is required when SUPABASE_SERVICE_ROLE_KEY is set and DATABASE_URL is not",
                );
                None
            }
            (Some(url), Some(key)) => {
                let url = read_supabase_url(env, &url, app_env)?;
                Some(StoreConfig::PostgRest {
                    url,
                    service_key: Secret::new(key),
                })
            }
        }
    }
}

/// `SUPABASE_URL`: an http(s) URL, https in production, without a trailing slash.
pub fn read_supabase_url(env: &mut EnvReader<'_>, raw: &str, app_env: AppEnv) -> Option<String> {
    let trimmed = raw.trim_end_matches('/');
    let https = trimmed.starts_with("https://");
    if !https && !trimmed.starts_with("http://") {
        env.problem("SUPABASE_URL", "must be an http(s) URL");
        return None;
    }
    if app_env.is_production() && !https {
        env.problem("SUPABASE_URL", "must use https when APP_ENV=production");
        return None;
    }
    Some(trimmed.to_owned())
}

/// Token verification settings: `SUPABASE_JWT_SECRET` (HS256) and/or `SUPABASE_URL` (JWKS and
/// issuer). At least one is required.
pub fn read_auth(env: &mut EnvReader<'_>, app_env: AppEnv) -> crate::auth::AuthConfig {
    let hs256_secret = env.optional("SUPABASE_JWT_SECRET").map(Secret::new);
    let supabase_url = env
        .optional("SUPABASE_URL")
        .and_then(|raw| read_supabase_url(env, &raw, app_env));
    if hs256_secret.is_none() && env.optional("SUPABASE_URL").is_none() {
        env.problem(
            "SUPABASE_JWT_SECRET",
            "is required to verify access tokens unless SUPABASE_URL is set (JWKS)",
        );
    }
    let floor = env.seconds("SUPABASE_JWKS_REFETCH_FLOOR_S", 30, 1..=3600);
    crate::auth::AuthConfig {
        hs256_secret,
        supabase_url,
        jwks_refetch_floor: floor,
    }
}

/// An absolute URL the browser is sent to; https in production, a local default elsewhere.
pub fn read_redirect_url(
    env: &mut EnvReader<'_>,
    variable: &'static str,
    app_env: AppEnv,
    local_default: &str,
) -> String {
    let value = match env.optional(variable) {
        Some(v) => v,
        None if app_env.is_production() => {
            env.problem(variable, "is required when APP_ENV=production");
            return String::new();
        }
        None => return local_default.to_owned(),
    };
    let https = value.starts_with("https://");
    if !https && !value.starts_with("http://") {
        env.problem(variable, "must be an absolute http(s) URL");
    } else if app_env.is_production() && !https {
        env.problem(variable, "must use https when APP_ENV=production");
    }
    value
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    pub(crate) fn reader(vars: &[(&str, &str)]) -> EnvReader<'static> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        EnvReader::new(move |k| map.get(k).cloned())
    }

    #[test]
    fn secret_is_never_displayed() {
        let s = Secret::new("whsec_supersecret");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "whsec_supersecret");
    }

    #[test]
    fn all_problems_are_reported_at_once_without_values() {
        let mut env = reader(&[
            ("APP_ENV", "production"),
            ("STRIPE_WEBHOOK_SECRET", "not-a-whsec-value"),
            ("SUPABASE_URL", "http://insecure.example"),
            ("SUPABASE_SERVICE_ROLE_KEY", "service-key-value"),
            ("STRIPE_SECRET_KEY", "sk_test_123"),
        ]);
        let app_env = env.app_env();
        read_webhook_secrets(&mut env, app_env);
        StoreConfig::read(&mut env, app_env);
        read_stripe_secret_key(&mut env, app_env);
        let err = env.finish(()).unwrap_err();
        let vars: Vec<_> = err.problems.iter().map(|p| p.variable).collect();
        assert_eq!(
            vars,
            ["STRIPE_WEBHOOK_SECRET", "SUPABASE_URL", "STRIPE_SECRET_KEY"]
        );
        let text = err.to_string();
        for value in [
            "not-a-whsec-value",
            "insecure.example",
            "service-key-value",
            "sk_test_123",
        ] {
            assert!(!text.contains(value), "{text} leaks {value}");
        }
    }

    #[test]
    fn database_url_wins_over_supabase_pair() {
        let mut env = reader(&[
            ("DATABASE_URL", "postgres://u:p@db.example:6543/postgres"),
            ("SUPABASE_URL", "https://x.supabase.co"),
        ]);
        let store = StoreConfig::read(&mut env, AppEnv::Production);
        assert!(matches!(store, Some(StoreConfig::Postgres { .. })));
        assert!(env.finish(()).is_ok());
    }

    #[test]
    fn libpq_tls_parameters_are_accepted_and_checked() {
        let cases = [
            ("postgres://u:p@db.x.supabase.co:5432/postgres?sslmode=verify-full", None),
            ("postgres://u:p@db.x.supabase.co:5432/postgres?sslmode=verify-ca", Some("DATABASE_URL")),
            ("postgres://u:p@db.x.supabase.co:5432/postgres?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", Some("DATABASE_URL")),
            ("postgres://u:p@db.x.supabase.co:5432/postgres?sslmode=bogus", Some("DATABASE_URL")),
        ];
        for (url, problem) in cases {
            let mut env = reader(&[("DATABASE_URL", url)]);
            let store = StoreConfig::read(&mut env, AppEnv::Production);
            let got = env.finish(()).err().map(|e| e.problems[0].variable);
            assert_eq!(got, problem, "{url}");
            assert_eq!(store.is_some(), problem.is_none());
        }
        let mut env = reader(&[
            (
                "DATABASE_URL",
                "postgres://u@db.example.com/x?sslmode=verify-ca",
            ),
            (
                "DATABASE_CA_CERT",
                "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----",
            ),
        ]);
        StoreConfig::read(&mut env, AppEnv::Development);
        assert_eq!(
            env.finish(()).unwrap_err().problems[0].variable,
            "DATABASE_CA_CERT"
        );
    }

    #[test]
    fn half_a_supabase_pair_names_the_missing_half() {
        let mut env = reader(&[("SUPABASE_URL", "https://x.supabase.co")]);
        assert!(StoreConfig::read(&mut env, AppEnv::Development).is_none());
        let err = env.finish(()).unwrap_err();
        assert_eq!(err.problems[0].variable, "SUPABASE_SERVICE_ROLE_KEY");
    }

    #[test]
    fn out_of_range_integer_is_a_problem() {
        let mut env = reader(&[("X_LIMIT", "0"), ("APP_ENV", "prod")]);
        assert_eq!(env.integer("X_LIMIT", 5, 1..=10), 5);
        assert_eq!(env.app_env(), AppEnv::Production);
        let err = env.finish(()).unwrap_err();
        assert_eq!(err.problems[0].what, "must be a whole number from 1 to 10");
    }
}
