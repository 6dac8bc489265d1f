//! The seed's deployment checklist as code: every item passes or fails with a fix.
//!
//! Offline items read the environment exactly as the three functions do (their own `Config`
//! readers), plus the production rules and the timeouts against the functions' timeouts.
//! `--online` items ask Stripe (price, webhook endpoint), the LLM upstream (`/models`) and the
//! database (migrations current).

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use shared::config::{stripe_key_mode, EnvReader, StripeMode};
use shared::store::{Call, Store};
use shared::stripe::events::handled_event_types;

include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// An item's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// One checklist item.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    pub fix: String,
}

impl Check {
    fn pass(name: &str, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Pass,
            detail: detail.into(),
            fix: String::new(),
        }
    }
    fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Fail,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
    fn skip(name: &str, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Skip,
            detail: detail.into(),
            fix: String::new(),
        }
    }
}

/// Where to fix a variable.
pub fn fix_for(variable: &str) -> &'static str {
    match variable {
        "STRIPE_SECRET_KEY" => "Stripe Dashboard > Developers > API keys: the live secret key (sk_live_...) or a restricted live key (rk_live_...)",
        "STRIPE_WEBHOOK_SECRET" => "Stripe Dashboard > Developers > Webhooks > the production endpoint > Signing secret (whsec_...)",
        "STRIPE_FULL_REPORT_PRICE_ID" => "Stripe Dashboard > Product catalogue > the full report > its live one-time price (price_...)",
        "SUPABASE_URL" | "SUPABASE_SERVICE_ROLE_KEY" | "SUPABASE_JWT_SECRET" => "Supabase Dashboard > Project Settings > API (project URL, service_role key, JWT secret)",
        "DATABASE_URL" | "DATABASE_CA_CERT" => "Supabase Dashboard > Connect > Transaction pooler (port 6543) URI; SSL certificate from Project Settings > Database",
        "OPENAI_API_KEY" => "an API key of the OpenAI-compatible provider, or CHAT_RULES_ONLY=true to answer from rules on purpose",
        "CHECKOUT_SUCCESS_URL" | "CHECKOUT_CANCEL_URL" => "your app's https pages for a finished or cancelled checkout",
        "LLM_MAX_TOKENS_FIELD" | "LLM_FALLBACK_MAX_TOKENS_FIELD" => "max_completion_tokens (OpenAI's, the default) or max_tokens, for an OpenAI-compatible server that knows only the older field: docs/configuration.md",
        "LLM_FALLBACK_MODEL" | "LLM_FALLBACK_BASE_URL" | "LLM_FALLBACK_API_KEY" => "the second model's name, and its OpenAI-compatible server and key when it is another provider (they default to the first's): docs/configuration.md",
        "CHAT_DAILY_TOKEN_BUDGET" | "CHAT_ANONYMOUS_DAILY_TOKEN_BUDGET" | "CHAT_ANONYMOUS_RATE_LIMIT_PER_MIN" => "tokens per user and UTC day (0 turns a budget off) and the anonymous sessions' requests per minute: docs/configuration.md",
        _ => "see docs/configuration.md",
    }
}

fn config_check<T>(name: &str, result: Result<T, shared::config::ConfigError>) -> Check {
    match result {
        Ok(_) => Check::pass(name, "every variable present and well-formed"),
        Err(e) => {
            let detail = e
                .problems
                .iter()
                .map(|p| format!("{}: {}", p.variable, p.what))
                .collect::<Vec<_>>()
                .join("; ");
            let mut fixes: Vec<&str> = e.problems.iter().map(|p| fix_for(p.variable)).collect();
            fixes.dedup();
            Check::fail(name, detail, fixes.join("; "))
        }
    }
}

fn b64_json(part: &str) -> Option<Value> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Runs the checklist with variables from `lookup`.
pub async fn run(lookup: &(dyn Fn(&str) -> Option<String> + Sync), online: bool) -> Vec<Check> {
    let get = |k: &str| {
        lookup(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let env = || EnvReader::new(|k| lookup(k));
    let production = get("APP_ENV")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "production" | "prod"));
    let mut checks = vec![
        config_check("webhook configuration", webhook::Config::read(env())),
        config_check("checkout configuration", checkout::Config::read(env())),
        config_check("chat configuration", chat::Config::read(env())),
        config_check("reconciler configuration", reconcile::Config::read(env())),
    ];

    // The seed's environment items, one by one.
    if production {
        checks.push(
            match get("STRIPE_SECRET_KEY").as_deref().map(stripe_key_mode) {
                Some(Some(StripeMode::Live)) => {
                    Check::pass("Stripe uses a live key", "sk_live_/rk_live_")
                }
                _ => Check::fail(
                    "Stripe uses a live key",
                    "STRIPE_SECRET_KEY is not a live key",
                    fix_for("STRIPE_SECRET_KEY"),
                ),
            },
        );
        let secrets = get("STRIPE_WEBHOOK_SECRET").unwrap_or_default();
        checks.push(
            if !secrets.is_empty() && secrets.split(',').all(|s| s.trim().starts_with("whsec_")) {
                Check::pass("webhook secret is an endpoint secret", "whsec_")
            } else {
                Check::fail(
                    "webhook secret is an endpoint secret",
                    "STRIPE_WEBHOOK_SECRET is missing or not whsec_",
                    fix_for("STRIPE_WEBHOOK_SECRET"),
                )
            },
        );
        checks.push(
            if get("STRIPE_FULL_REPORT_PRICE_ID").is_some_and(|p| p.starts_with("price_")) {
                Check::pass("full report price is a price id", "price_")
            } else {
                Check::fail(
                    "full report price is a price id",
                    "STRIPE_FULL_REPORT_PRICE_ID is missing or not price_",
                    fix_for("STRIPE_FULL_REPORT_PRICE_ID"),
                )
            },
        );
    } else {
        checks.push(Check::skip(
            "Stripe uses a live key",
            "APP_ENV is not production",
        ));
    }
    checks.push(supabase_consistency(&get));
    checks.push(match (get("OPENAI_API_KEY"), get("CHAT_RULES_ONLY").as_deref()) {
        (Some(_), _) => Check::pass("LLM key or rules-only", "OPENAI_API_KEY is set"),
        (None, Some("true")) => Check::pass("LLM key or rules-only", "CHAT_RULES_ONLY=true: rules answer on purpose"),
        (None, _) => Check::fail("LLM key or rules-only", "no OPENAI_API_KEY and CHAT_RULES_ONLY is not true: every chat answer would come from rules", fix_for("OPENAI_API_KEY")),
    });
    checks.push(timeouts(&get));
    checks.push(database_tls(&get, production));

    if !online {
        for name in [
            "Stripe price",
            "Stripe key reads what the webhook reads",
            "Stripe webhook endpoint",
            "LLM key works",
            "database and migrations",
        ] {
            checks.push(Check::skip(name, "offline run (add --online)"));
        }
        return checks;
    }
    checks.push(stripe_price(&get).await);
    checks.push(stripe_reads(&get).await);
    checks.push(stripe_webhook_endpoint(&get).await);
    checks.push(llm_models(&get).await);
    checks.push(database(lookup).await);
    checks
}

fn supabase_consistency(get: &dyn Fn(&str) -> Option<String>) -> Check {
    const NAME: &str = "Supabase URL and keys consistent";
    let Some(url) = get("SUPABASE_URL") else {
        return Check::skip(
            NAME,
            "SUPABASE_URL not set (DATABASE_URL and SUPABASE_JWT_SECRET in use)",
        );
    };
    let host = url
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned();
    let project_ref = host.strip_suffix(".supabase.co").map(str::to_owned);
    if let Some(key) = get("SUPABASE_SERVICE_ROLE_KEY") {
        let parts: Vec<&str> = key.split('.').collect();
        if parts.len() == 3 {
            let Some(claims) = b64_json(parts[1]) else {
                return Check::fail(
                    NAME,
                    "SUPABASE_SERVICE_ROLE_KEY is not a readable JWT",
                    fix_for("SUPABASE_SERVICE_ROLE_KEY"),
                );
            };
            if claims["role"] != "service_role" {
                return Check::fail(
                    NAME,
                    format!(
                        "SUPABASE_SERVICE_ROLE_KEY has role {}, not service_role (the anon key?)",
                        claims["role"]
                    ),
                    fix_for("SUPABASE_SERVICE_ROLE_KEY"),
                );
            }
            if let (Some(r), Some(key_ref)) = (&project_ref, claims["ref"].as_str()) {
                if r != key_ref {
                    return Check::fail(
                        NAME,
                        format!(
                            "the service key belongs to project {key_ref}, SUPABASE_URL to {r}"
                        ),
                        fix_for("SUPABASE_SERVICE_ROLE_KEY"),
                    );
                }
            }
        } else if !key.starts_with("sb_secret_") {
            return Check::fail(
                NAME,
                "SUPABASE_SERVICE_ROLE_KEY is neither a service_role JWT nor an sb_secret_ key",
                fix_for("SUPABASE_SERVICE_ROLE_KEY"),
            );
        }
    }
    if let (Some(db), Some(r)) = (get("DATABASE_URL"), &project_ref) {
        let user = db
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(['@', ':']).next())
            .unwrap_or("");
        if let Some(db_ref) = user.strip_prefix("postgres.") {
            if db_ref != r {
                return Check::fail(
                    NAME,
                    format!("DATABASE_URL is for project {db_ref}, SUPABASE_URL for {r}"),
                    fix_for("DATABASE_URL"),
                );
            }
        }
    }
    Check::pass(NAME, format!("project {}", project_ref.unwrap_or(host)))
}

fn timeouts(get: &dyn Fn(&str) -> Option<String>) -> Check {
    const NAME: &str = "timeouts fit the function timeouts";
    let num = |k: &str, d: u64| get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(d);
    let mut problems = Vec::new();
    let chat_timeout_ms = num("CHAT_FUNCTION_TIMEOUT_S", 60) * 1000;
    let budget = num("LLM_TOTAL_BUDGET_MS", 55_000);
    let reserve = num("CHAT_DEADLINE_RESERVE_MS", 1500);
    let attempt = num("LLM_TIMEOUT_MS", 30_000);
    if budget + reserve > chat_timeout_ms {
        problems.push(format!("LLM_TOTAL_BUDGET_MS + CHAT_DEADLINE_RESERVE_MS = {} ms > chat function timeout {chat_timeout_ms} ms", budget + reserve));
    }
    if attempt > budget {
        problems.push(format!("LLM_TIMEOUT_MS {attempt} ms > LLM_TOTAL_BUDGET_MS {budget} ms: the first attempt could never time out on its own"));
    }
    let checkout_timeout_ms = num("CHECKOUT_FUNCTION_TIMEOUT_S", 45) * 1000;
    let stripe = num("STRIPE_TIMEOUT_MS", 8000);
    let retries = num("STRIPE_MAX_RETRIES", 2);
    let worst = stripe * (retries + 1) + 5000 * retries;
    if worst > checkout_timeout_ms {
        problems.push(format!("a Stripe call with retries may take {worst} ms > checkout function timeout {checkout_timeout_ms} ms"));
    }
    let wait = num("CHECKOUT_MAX_WAIT_MS", 20_000);
    if wait >= checkout_timeout_ms {
        problems.push(format!(
            "CHECKOUT_MAX_WAIT_MS {wait} ms >= checkout function timeout {checkout_timeout_ms} ms"
        ));
    }
    if problems.is_empty() {
        Check::pass(NAME, format!("chat {budget}+{reserve} ms of {chat_timeout_ms} ms; checkout Stripe worst case {worst} ms of {checkout_timeout_ms} ms"))
    } else {
        Check::fail(NAME, problems.join("; "), "lower the budgets or raise the functions' Timeout in template.yaml (and CHAT_FUNCTION_TIMEOUT_S / CHECKOUT_FUNCTION_TIMEOUT_S here)")
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap_or_default()
}

async fn stripe_get(get: &dyn Fn(&str) -> Option<String>, path: &str) -> Result<Value, String> {
    let key = get("STRIPE_SECRET_KEY").ok_or("STRIPE_SECRET_KEY is not set")?;
    let base = get("STRIPE_API_BASE").unwrap_or_else(|| "https://api.stripe.com".into());
    let response = http()
        .get(format!("{}{path}", base.trim_end_matches('/')))
        .bearer_auth(key)
        .header("Stripe-Version", shared::stripe::API_VERSION)
        .send()
        .await
        .map_err(|e| format!("Stripe unreachable: {}", e.without_url()))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(format!(
            "Stripe answered {status}: {}",
            body["error"]["message"].as_str().unwrap_or("")
        ));
    }
    Ok(body)
}

async fn stripe_price(get: &(dyn Fn(&str) -> Option<String> + Sync)) -> Check {
    const NAME: &str = "Stripe price";
    let Some(price) = get("STRIPE_FULL_REPORT_PRICE_ID") else {
        return Check::fail(
            NAME,
            "STRIPE_FULL_REPORT_PRICE_ID is not set",
            fix_for("STRIPE_FULL_REPORT_PRICE_ID"),
        );
    };
    let body = match stripe_get(get, &format!("/v1/prices/{price}")).await {
        Ok(body) => body,
        Err(e) => return Check::fail(NAME, e, fix_for("STRIPE_FULL_REPORT_PRICE_ID")),
    };
    let key_live = get("STRIPE_SECRET_KEY")
        .as_deref()
        .and_then(stripe_key_mode)
        == Some(StripeMode::Live);
    let mut problems = Vec::new();
    if body["active"] != Value::Bool(true) {
        problems.push("the price is not active".to_owned());
    }
    if body["type"] != "one_time" {
        problems.push(format!("the price is {}, not one_time", body["type"]));
    }
    if body["livemode"].as_bool() != Some(key_live) {
        problems.push("the price's mode (live/test) differs from the key's".to_owned());
    }
    if problems.is_empty() {
        Check::pass(
            NAME,
            format!(
                "{price}: active, one-time, {} {}",
                body["unit_amount"],
                body["currency"].as_str().unwrap_or("")
            ),
        )
    } else {
        Check::fail(
            NAME,
            problems.join("; "),
            fix_for("STRIPE_FULL_REPORT_PRICE_ID"),
        )
    }
}

/// Every list the webhook, checkout and the reconciler read from, asked once with `limit=1`: a
/// restricted key without one of these permissions makes the webhook answer 503 for every event
/// of that kind. (Write permissions, Refunds and Checkout Sessions, cannot be checked without
/// writing: docs/configuration.md lists them.)
const STRIPE_READS: [(&str, &str); 8] = [
    ("/v1/checkout/sessions?limit=1", "Checkout Sessions"),
    ("/v1/payment_intents?limit=1", "PaymentIntents"),
    ("/v1/charges?limit=1", "Charges"),
    ("/v1/refunds?limit=1", "Refunds"),
    ("/v1/disputes?limit=1", "Disputes"),
    ("/v1/subscriptions?limit=1", "Subscriptions"),
    ("/v1/invoices?limit=1", "Invoices"),
    ("/v1/events?limit=1", "Events"),
];

async fn stripe_reads(get: &(dyn Fn(&str) -> Option<String> + Sync)) -> Check {
    const NAME: &str = "Stripe key reads what the webhook reads";
    let mut refused = Vec::new();
    for (path, permission) in STRIPE_READS {
        if let Err(e) = stripe_get(get, path).await {
            refused.push(format!("{permission} ({e})"));
        }
    }
    if refused.is_empty() {
        Check::pass(NAME, "sessions, payment intents, charges, refunds, disputes, subscriptions, invoices, events")
    } else {
        Check::fail(
            NAME,
            format!("cannot read: {}", refused.join("; ")),
            "Stripe Dashboard > Developers > API keys > the restricted key: give it the permissions docs/configuration.md lists (STRIPE_SECRET_KEY)",
        )
    }
}

async fn stripe_webhook_endpoint(get: &(dyn Fn(&str) -> Option<String> + Sync)) -> Check {
    const NAME: &str = "Stripe webhook endpoint";
    let Some(url) = get("WEBHOOK_PUBLIC_URL") else {
        return Check::fail(
            NAME,
            "WEBHOOK_PUBLIC_URL is not set: the URL Stripe delivers to",
            "set WEBHOOK_PUBLIC_URL=https://<your domain>/api/stripe/webhook for this check",
        );
    };
    let body = match stripe_get(get, "/v1/webhook_endpoints?limit=100").await {
        Ok(body) => body,
        Err(e) => return Check::fail(NAME, e, fix_for("STRIPE_SECRET_KEY")),
    };
    let wanted = url.trim_end_matches('/');
    let endpoints = body["data"].as_array().cloned().unwrap_or_default();
    let Some(endpoint) = endpoints
        .iter()
        .find(|e| e["url"].as_str().map(|u| u.trim_end_matches('/')) == Some(wanted))
    else {
        return Check::fail(NAME, format!("no webhook endpoint for {url}"), "Stripe Dashboard > Developers > Webhooks > Add endpoint with this URL and every event in docs/api.md (Webhook)");
    };
    let events: Vec<&str> = endpoint["enabled_events"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let missing: Vec<&str> = if events.contains(&"*") {
        Vec::new()
    } else {
        handled_event_types()
            .filter(|t| !events.contains(t))
            .collect()
    };
    let mut problems = Vec::new();
    if endpoint["status"] != "enabled" {
        problems.push(format!("the endpoint is {}", endpoint["status"]));
    }
    if !missing.is_empty() {
        problems.push(format!("not subscribed to: {}", missing.join(", ")));
    }
    if problems.is_empty() {
        Check::pass(
            NAME,
            format!("{url}: enabled, every handled event subscribed"),
        )
    } else {
        Check::fail(NAME, problems.join("; "), "Stripe Dashboard > Developers > Webhooks > the endpoint > enable it and add the missing events")
    }
}

async fn llm_models(get: &(dyn Fn(&str) -> Option<String> + Sync)) -> Check {
    const NAME: &str = "LLM key works";
    let Some(key) = get("OPENAI_API_KEY") else {
        return Check::skip(NAME, "no OPENAI_API_KEY");
    };
    let base = get("OPENAI_BASE_URL").unwrap_or_else(|| "https://api.openai.com/v1".into());
    match http()
        .get(format!("{}/models", base.trim_end_matches('/')))
        .bearer_auth(key)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => {
            Check::pass(NAME, format!("{base}/models answered {}", r.status()))
        }
        Ok(r) => Check::fail(
            NAME,
            format!("{base}/models answered {}", r.status()),
            fix_for("OPENAI_API_KEY"),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("{base} unreachable: {}", e.without_url()),
            "check OPENAI_BASE_URL and the network path",
        ),
    }
}

async fn database(lookup: &(dyn Fn(&str) -> Option<String> + Sync)) -> Check {
    const NAME: &str = "database and migrations";
    let mut env = EnvReader::new(|k| lookup(k));
    let app_env = env.app_env();
    let Some(config) = shared::config::StoreConfig::read(&mut env, app_env) else {
        return Check::fail(NAME, "no store configuration", fix_for("DATABASE_URL"));
    };
    let store = match Store::from_config(&config) {
        Ok(store) => store,
        Err(e) => return Check::fail(NAME, e.to_string(), fix_for("DATABASE_URL")),
    };
    let newest = MIGRATIONS.last().copied().unwrap_or("");
    match store
        .call(Call {
            function: "schema_status",
            args: vec![],
        })
        .await
    {
        Ok(status) if status["latest"].as_str() == Some(newest) => {
            Check::pass(NAME, format!("answers; migrations current ({newest})"))
        }
        Ok(status) => Check::fail(
            NAME,
            format!(
                "migrations behind: database at {}, this build needs {newest}",
                status["latest"]
            ),
            "supabase db push (or scripts/db-migrate with DATABASE_URL)",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("the database did not answer: {e}"),
            "check DATABASE_URL / SUPABASE_URL and that schema_status exists (supabase db push)",
        ),
    }
}

/// A production database that is not loopback must not be reached in plain text: TLS is the
/// default, so only an explicit `sslmode=disable` fails this item.
fn database_tls(get: &dyn Fn(&str) -> Option<String>, production: bool) -> Check {
    use shared::store::database_url::{DatabaseUrl, TlsPolicy};
    const NAME: &str = "database connection encrypted";
    let Some(url) = get("DATABASE_URL") else {
        return Check::skip(NAME, "no DATABASE_URL (PostgREST over https)");
    };
    match DatabaseUrl::parse(&url, get("DATABASE_CA_CERT").is_some()) {
        Err(_) => Check::skip(
            NAME,
            "DATABASE_URL is refused by the configuration check above",
        ),
        Ok(parsed)
            if parsed.tls == TlsPolicy::Plain
                && !shared::store::database_url::is_loopback(&parsed.config) =>
        {
            if production {
                Check::fail(NAME, "DATABASE_URL has sslmode=disable for a host that is not loopback: the session, passwords and data go in plain text", "remove sslmode=disable (verified TLS is the default) or use sslmode=verify-full with sslrootcert=<Supabase's CA>")
            } else {
                Check::pass(NAME, "sslmode=disable on purpose (not production)")
            }
        }
        Ok(parsed) => Check::pass(
            NAME,
            match parsed.tls {
                TlsPolicy::Plain => "loopback host, plain text",
                TlsPolicy::Verified {
                    check_host: true, ..
                } => "TLS required, certificate and host name verified",
                TlsPolicy::Verified {
                    check_host: false, ..
                } => "TLS required, certificate chain verified (sslmode=verify-ca)",
            },
        ),
    }
}

#[cfg(test)]
mod database_tls_tests {
    use super::*;

    fn check(url: &str, production: bool) -> Status {
        let url = url.to_owned();
        database_tls(
            &move |k: &str| (k == "DATABASE_URL").then(|| url.clone()),
            production,
        )
        .status
    }

    #[test]
    fn plain_text_to_a_remote_database_fails_only_in_production() {
        let remote = "postgres://u:p@aws-0-eu-west-1.pooler.supabase.com:6543/postgres";
        assert_eq!(check(remote, true), Status::Pass, "TLS by default");
        assert_eq!(
            check(&format!("{remote}?sslmode=verify-full"), true),
            Status::Pass
        );
        assert_eq!(
            check(&format!("{remote}?sslmode=disable"), true),
            Status::Fail
        );
        assert_eq!(
            check(&format!("{remote}?sslmode=disable"), false),
            Status::Pass
        );
        assert_eq!(
            check("postgres://postgres@127.0.0.1:5432/x?sslmode=disable", true),
            Status::Pass,
            "loopback"
        );
        for remote_addr in [
            "postgres://app_user:S3cret@localhost:15432/postgres?hostaddr=192.0.2.2",
            "host=localhost hostaddr=192.0.2.2 port=15432 user=app_user password=S3cret",
        ] {
            let verdict = database_tls(
                &|k: &str| (k == "DATABASE_URL").then(|| remote_addr.to_owned()),
                true,
            );
            assert_eq!(verdict.status, Status::Pass, "{remote_addr}");
            assert!(
                verdict.detail.contains("TLS required"),
                "a remote hostaddr is not a loopback host: {}",
                verdict.detail
            );
            let separator = if remote_addr.contains('?') { "&" } else { " " };
            assert_eq!(
                check(&format!("{remote_addr}{separator}sslmode=disable"), true),
                Status::Fail,
                "{remote_addr}"
            );
        }
        assert_eq!(
            check(
                "postgres://app_user:S3cret@/postgres?hostaddr=192.0.2.2",
                true
            ),
            Status::Skip,
            "no host to verify against: refused by the configuration check"
        );
        let none = database_tls(&|_: &str| None, true);
        assert_eq!(none.status, Status::Skip);
    }
}
