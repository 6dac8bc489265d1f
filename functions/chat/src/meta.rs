//! Who answered and the identity of one answer, the same whatever protocol carries it.

/// Where an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The configured model (`OPENAI_BASE_URL`, `LLM_MODEL`).
    Llm,
    /// The second model (`LLM_FALLBACK_*`), after the first failed before its first token.
    Fallback,
    /// The per-user cache: free.
    Cache,
    /// The rule engine.
    Rules,
}

impl Source {
    /// `llm`, `fallback`, `cache` or `rules`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Llm => "llm",
            Source::Fallback => "fallback",
            Source::Cache => "cache",
            Source::Rules => "rules",
        }
    }
}

/// Identity of one answer.
#[derive(Clone, Debug)]
pub struct Meta {
    pub id: String,
    pub created: i64,
    /// The model that answered (the fallback's when it did).
    pub model: String,
    pub source: Source,
    /// Why the first model did not answer (`no_api_key`, `timeout`, `upstream_5xx`, ...): set for
    /// the fallback model's and the rules' answers.
    pub fallback_reason: Option<String>,
}

impl Meta {
    /// A new answer id (`chatcmpl-...`), created at `created` (Unix seconds).
    pub fn new(model: &str, source: Source, fallback_reason: Option<String>, created: i64) -> Self {
        Self {
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            created,
            model: model.to_owned(),
            source,
            fallback_reason,
        }
    }
}
