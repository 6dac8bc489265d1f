//! The chat function's configuration, read once per cold start.

use std::time::Duration;

use shared::auth::AuthConfig;
use shared::config::{self, ConfigError, EnvReader, Secret, StoreConfig};
use shared::retry::RetryPolicy;

use crate::budget::Budgets;
use crate::conversation::{CapField, Limits};
use crate::rules::RuleBook;

/// The chat function's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub store: StoreConfig,
    pub auth: AuthConfig,
    /// `None`: rules only (no `OPENAI_API_KEY`).
    pub openai_key: Option<Secret>,
    pub openai_base_url: String,
    /// The field the first model's server takes the completion cap in (`LLM_MAX_TOKENS_FIELD`).
    pub cap_field: CapField,
    /// The second model (`LLM_FALLBACK_*`), tried when the first fails before its first token.
    pub fallback: Option<FallbackModel>,
    pub timeout: Duration,
    /// Retries of a failed LLM call (`LLM_MAX_RETRIES`) and the pauses between them.
    pub backoff: RetryPolicy,
    pub first_token_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_budget: Duration,
    pub deadline_reserve: Duration,
    pub limits: Limits,
    pub system_prompt: String,
    pub rate_limit_per_min: u32,
    /// Token budgets and the limits of anonymous sessions.
    pub budgets: Budgets,
    pub cache_ttl_s: u32,
    pub max_body_bytes: usize,
    pub rules: RuleBook,
}

/// The second model: any OpenAI-compatible server, the same as the first by default.
#[derive(Clone, Debug)]
pub struct FallbackModel {
    /// `LLM_FALLBACK_BASE_URL`, default `OPENAI_BASE_URL`.
    pub base_url: String,
    /// `LLM_FALLBACK_API_KEY`, default `OPENAI_API_KEY`.
    pub key: Secret,
    /// `LLM_FALLBACK_MODEL`: asked instead of the request's model.
    pub model: String,
    /// `LLM_FALLBACK_MAX_TOKENS_FIELD`, default the first model's.
    pub cap_field: CapField,
}

/// The stream idle timeout's default, shortened to `LLM_TIMEOUT_MS` when that is smaller.
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 15_000;

const DEFAULT_SYSTEM_PROMPT: &str =
    "You are the helpful assistant of this app. Answer briefly and \
in the language of the user. For payments and accounts, point users to the app's own pages.";

impl Config {
    /// Reads through `env`.
    pub fn read(mut env: EnvReader<'_>) -> Result<Self, ConfigError> {
        let app_env = env.app_env();
        let store = StoreConfig::read(&mut env, app_env);
        shared::http_client::check_extra_roots(&mut env);
        let auth = config::read_auth(&mut env, app_env);
        let openai_key = env.optional("OPENAI_API_KEY").map(Secret::new);
        let rules_only = env.parsed("CHAT_RULES_ONLY", false, "true or false", |v| {
            v.parse().ok()
        });
        if app_env.is_production() && openai_key.is_none() && !rules_only {
            env.problem(
                "OPENAI_API_KEY",
                "is required when APP_ENV=production (or set CHAT_RULES_ONLY=true to answer from rules only)",
            );
        }
        let openai_base_url = env
            .optional("OPENAI_BASE_URL")
            .unwrap_or_else(|| "https://api.openai.com/v1".into());
        if !openai_base_url.starts_with("http://") && !openai_base_url.starts_with("https://") {
            env.problem("OPENAI_BASE_URL", "must be an http(s) URL");
        }
        let cap_field = read_cap_field(
            &mut env,
            "LLM_MAX_TOKENS_FIELD",
            CapField::MaxCompletionTokens,
        );
        let fallback = read_fallback(&mut env, openai_key.as_ref(), &openai_base_url, cap_field);
        let timeout = Duration::from_millis(env.integer("LLM_TIMEOUT_MS", 30_000, 100..=600_000));
        let max_retries = env.integer("LLM_MAX_RETRIES", 2, 0..=5) as u32;
        // Neither stream timeout waits longer than LLM_TIMEOUT_MS unless configured on purpose.
        let timeout_ms = timeout.as_millis() as u64;
        let first_token_timeout = Duration::from_millis(env.integer(
            "LLM_FIRST_TOKEN_TIMEOUT_MS",
            timeout_ms,
            100..=600_000,
        ));
        let idle_timeout = Duration::from_millis(env.integer(
            "LLM_STREAM_IDLE_TIMEOUT_MS",
            DEFAULT_IDLE_TIMEOUT_MS.min(timeout_ms),
            100..=600_000,
        ));
        let total_budget =
            Duration::from_millis(env.integer("LLM_TOTAL_BUDGET_MS", 55_000, 500..=900_000));
        let deadline_reserve =
            Duration::from_millis(env.integer("CHAT_DEADLINE_RESERVE_MS", 1500, 0..=60_000));
        let default_model = env
            .optional("LLM_MODEL")
            .unwrap_or_else(|| "gpt-4o-mini".into());
        let mut models: Vec<String> = env
            .optional("LLM_MODELS")
            .map(|v| {
                v.split(',')
                    .map(|m| m.trim().to_owned())
                    .filter(|m| !m.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if !models.contains(&default_model) {
            models.insert(0, default_model.clone());
        }
        let limits = Limits {
            max_messages: env.integer("CHAT_MAX_MESSAGES", 50, 1..=1000) as usize,
            max_message_chars: env.integer("CHAT_MAX_MESSAGE_CHARS", 8000, 1..=1_000_000) as usize,
            max_total_chars: env.integer("CHAT_MAX_TOTAL_CHARS", 32_000, 1..=4_000_000) as usize,
            max_tokens: env.integer("CHAT_MAX_TOKENS", 1024, 1..=128_000) as u32,
            allow_client_system: env.parsed(
                "CHAT_ALLOW_CLIENT_SYSTEM",
                false,
                "true or false",
                |v| v.parse().ok(),
            ),
            models,
            default_model,
        };
        let system_prompt = env
            .optional("CHAT_SYSTEM_PROMPT")
            .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.into());
        let rate_limit_per_min = env.integer("CHAT_RATE_LIMIT_PER_MIN", 20, 1..=100_000) as u32;
        let budgets = Budgets::read(&mut env);
        let cache_ttl_s = env.integer("CHAT_CACHE_TTL_S", 3600, 0..=30 * 86_400) as u32;
        let max_body_bytes =
            env.integer("CHAT_MAX_BODY_BYTES", 256 * 1024, 1024..=6 << 20) as usize;
        let rules = match env.optional("CHAT_RULES_PATH") {
            None => RuleBook::embedded(),
            Some(path) => match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| RuleBook::parse(&t))
            {
                Ok(book) => book,
                Err(why) => {
                    env.problem(
                        "CHAT_RULES_PATH",
                        format!("is not a usable rules file ({why})"),
                    );
                    RuleBook::embedded()
                }
            },
        };
        let config = store.map(|store| Config {
            store,
            auth,
            openai_key,
            openai_base_url,
            cap_field,
            fallback,
            timeout,
            backoff: RetryPolicy {
                max_retries,
                initial_delay: Duration::from_millis(500),
                max_delay: Duration::from_secs(4),
            },
            first_token_timeout,
            idle_timeout,
            total_budget,
            deadline_reserve,
            limits,
            system_prompt,
            rate_limit_per_min,
            budgets,
            cache_ttl_s,
            max_body_bytes,
            rules,
        });
        env.finish_required(config, "DATABASE_URL")
    }
}

/// `LLM_FALLBACK_MODEL` turns the second model on; its server and key default to the first's.
fn read_fallback(
    env: &mut EnvReader<'_>,
    openai_key: Option<&Secret>,
    openai_base_url: &str,
    first_cap_field: CapField,
) -> Option<FallbackModel> {
    let cap_field = read_cap_field(env, "LLM_FALLBACK_MAX_TOKENS_FIELD", first_cap_field);
    let base_url = env.optional("LLM_FALLBACK_BASE_URL");
    let key = env.optional("LLM_FALLBACK_API_KEY").map(Secret::new);
    let model = env.optional("LLM_FALLBACK_MODEL");
    let Some(model) = model else {
        if base_url.is_some() || key.is_some() {
            env.problem(
                "LLM_FALLBACK_MODEL",
                "is required with LLM_FALLBACK_BASE_URL or LLM_FALLBACK_API_KEY (which model to ask)",
            );
        }
        return None;
    };
    if openai_key.is_none() {
        env.problem(
            "LLM_FALLBACK_MODEL",
            "needs OPENAI_API_KEY: the fallback is tried after the first model",
        );
        return None;
    }
    let base_url = base_url.unwrap_or_else(|| openai_base_url.to_owned());
    if !base_url.starts_with("http://") && !base_url.starts_with("https://") {
        env.problem("LLM_FALLBACK_BASE_URL", "must be an http(s) URL");
    }
    let key = key.or_else(|| openai_key.cloned())?;
    Some(FallbackModel {
        base_url,
        key,
        model,
        cap_field,
    })
}

/// `max_completion_tokens` (OpenAI's field, the only one its reasoning models take) or
/// `max_tokens` (the older spelling some OpenAI-compatible servers still need).
fn read_cap_field(env: &mut EnvReader<'_>, variable: &'static str, default: CapField) -> CapField {
    env.parsed(
        variable,
        default,
        "max_completion_tokens or max_tokens",
        CapField::parse,
    )
}
