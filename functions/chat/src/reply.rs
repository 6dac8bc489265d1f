//! The OpenAI wire format of answers: `chat.completion` objects and `chat.completion.chunk`
//! server-sent events, with the answer's source in an extra field the SDKs ignore.

use serde_json::{json, Value};
use shared::llm::Usage;

/// Where an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Llm,
    Cache,
    Rules,
}

impl Source {
    /// `llm`, `cache` or `rules`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Llm => "llm",
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
    pub model: String,
    pub source: Source,
    /// Why the rules answered (`no_api_key`, `timeout`, `upstream_5xx`, ...).
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

/// A complete `chat.completion` object.
pub fn completion(meta: &Meta, content: &str, finish_reason: &str, usage: Option<Usage>) -> Value {
    json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": usage_json(usage),
        "x_source": meta.source.as_str(),
        "x_fallback_reason": meta.fallback_reason,
    })
}

fn usage_json(usage: Option<Usage>) -> Value {
    let u = usage.unwrap_or_default();
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens})
}

/// One SSE event carrying a `chat.completion.chunk`.
pub fn chunk(meta: &Meta, delta: Value, finish_reason: Option<&str>) -> String {
    let chunk = json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        "x_source": meta.source.as_str(),
    });
    format!("data: {chunk}\n\n")
}

/// The usage chunk (`stream_options.include_usage`): empty `choices`.
pub fn usage_chunk(meta: &Meta, usage: Option<Usage>) -> String {
    let chunk = json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage_json(usage),
    });
    format!("data: {chunk}\n\n")
}

/// The terminator.
pub const DONE: &str = "data: [DONE]\n\n";

/// The final event of a stream that broke after it started: an OpenAI-style error object, which
/// the SDKs raise as an API error.
pub fn stream_error(code: &str, message: &str) -> String {
    let event = json!({"error": {"message": message, "type": "upstream_error", "code": code, "param": null}});
    format!("data: {event}\n\n")
}

/// A whole answer as SSE events (rules and cache answers, which exist at once).
pub fn whole_stream(
    meta: &Meta,
    content: &str,
    finish_reason: &str,
    usage: Option<Usage>,
    include_usage: bool,
) -> String {
    let mut out = chunk(meta, json!({"role": "assistant", "content": ""}), None);
    out.push_str(&chunk(meta, json!({"content": content}), None));
    out.push_str(&chunk(meta, json!({}), Some(finish_reason)));
    if include_usage {
        out.push_str(&usage_chunk(meta, usage));
    }
    out.push_str(DONE);
    out
}
