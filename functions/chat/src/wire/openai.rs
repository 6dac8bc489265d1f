//! The OpenAI Chat Completions wire format, both ways: the request as much of it as the SDKs
//! send, parsed into a [`Chat`] (parameters that do not change the answer are accepted and
//! ignored; anything else unknown, non-text content and unknown roles are refused), and the
//! answer: `chat.completion` objects or `chat.completion.chunk` server-sent events ending with
//! `data: [DONE]`, with the answer's source and charge in extra `x_` fields the SDKs ignore.

use serde::Deserialize;
use serde_json::{json, Value};
use shared::llm::{Message, Usage};

use crate::conversation::{invalid, read_body, Chat, Invalid, Limits};
use crate::meta::Meta;

// ---- The request ----

// Some fields are parsed only so the SDKs' requests are accepted; they are deliberately unused.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<RawMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<RawStreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    n: Option<u32>,
    // Accepted and ignored: they tune sampling or bookkeeping, not what is allowed.
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Option<RawContent>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    refusal: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawContent {
    Text(String),
    Parts(Vec<RawPart>),
}

#[derive(Debug, Deserialize)]
struct RawPart {
    #[serde(rename = "type")]
    type_: String,
    #[serde(default)]
    text: Option<String>,
}

/// Parses and validates a request body.
pub fn parse(body: &[u8], limits: &Limits) -> Result<Chat, Invalid> {
    let raw: RawRequest = read_body(body, "the body is not a valid chat completion request")?;
    let model = match raw.model {
        None => limits.default_model.clone(),
        Some(m) if limits.models.contains(&m) => m,
        Some(m) => {
            return Err(invalid(
                "model_not_allowed",
                format!(
                    "model {m:?} is not available; use one of {:?}",
                    limits.models
                ),
            ))
        }
    };
    if raw.messages.is_empty() {
        return Err(invalid("empty_messages", "messages must not be empty"));
    }
    if raw.messages.len() > limits.max_messages {
        return Err(invalid(
            "too_many_messages",
            format!("at most {} messages", limits.max_messages),
        ));
    }
    if raw.n.is_some_and(|n| n != 1) {
        return Err(invalid("invalid_parameter", "n must be 1"));
    }
    if raw.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(invalid(
            "invalid_parameter",
            "temperature must be between 0 and 2",
        ));
    }
    for (field, value) in [
        ("max_tokens", raw.max_tokens),
        ("max_completion_tokens", raw.max_completion_tokens),
    ] {
        if value == Some(0) {
            return Err(invalid(
                "invalid_parameter",
                format!("{field} must be at least 1"),
            ));
        }
    }
    let requested = raw.max_completion_tokens.or(raw.max_tokens);
    let mut total = 0usize;
    let mut messages = Vec::with_capacity(raw.messages.len());
    for (i, m) in raw.messages.into_iter().enumerate() {
        match m.role.as_str() {
            "user" | "assistant" => {}
            "system" | "developer" if limits.allow_client_system => {}
            "system" | "developer" => {
                return Err(invalid(
                    "system_message_not_allowed",
                    "the system prompt is set by the server",
                ))
            }
            "tool" | "function" => {
                return Err(invalid(
                    "unsupported_role",
                    format!("messages[{i}]: {} messages are not supported", m.role),
                ))
            }
            other => {
                return Err(invalid(
                    "unknown_role",
                    format!("messages[{i}]: unknown role {other:?}"),
                ))
            }
        }
        let content = match m.content {
            None => String::new(),
            Some(RawContent::Text(text)) => text,
            Some(RawContent::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.into_iter().enumerate() {
                    match (part.type_.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        ("text", None) => {
                            return Err(invalid(
                                "missing_field",
                                format!("messages[{i}].content[{j}]: a text part needs its text"),
                            ))
                        }
                        _ => {
                            return Err(invalid(
                                "non_text_content",
                                format!("messages[{i}]: only text content is supported"),
                            ))
                        }
                    }
                }
                text
            }
        };
        let chars = content.chars().count();
        if chars > limits.max_message_chars {
            return Err(invalid(
                "message_too_long",
                format!(
                    "messages[{i}] is longer than {} characters",
                    limits.max_message_chars
                ),
            ));
        }
        total += chars;
        if total > limits.max_total_chars {
            return Err(invalid(
                "conversation_too_long",
                format!(
                    "the conversation is longer than {} characters",
                    limits.max_total_chars
                ),
            ));
        }
        messages.push(Message {
            role: if m.role == "developer" {
                "system".into()
            } else {
                m.role
            },
            content,
        });
    }
    if !messages
        .iter()
        .any(|m| m.role == "user" && !m.content.trim().is_empty())
    {
        return Err(invalid(
            "no_user_message",
            "at least one user message with text is required",
        ));
    }
    Ok(Chat {
        model,
        messages,
        stream: raw.stream.unwrap_or(false),
        include_usage: raw
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        max_tokens: requested
            .unwrap_or(limits.max_tokens)
            .min(limits.max_tokens),
        temperature: raw.temperature,
    })
}

// ---- The answer ----

/// A complete `chat.completion` object. `usage` is the upstream's (zeros for cache and rule
/// answers, which cost nothing); `charged` is what the request was charged against the budget.
pub fn completion(
    meta: &Meta,
    content: &str,
    finish_reason: &str,
    usage: Option<Usage>,
    charged: u64,
) -> Value {
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
        "x_tokens_charged": charged,
    })
}

fn usage_json(usage: Option<Usage>) -> Value {
    let u = usage.unwrap_or_default();
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens})
}

/// One SSE event carrying a `chat.completion.chunk`.
fn chunk(meta: &Meta, delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        "x_source": meta.source.as_str(),
    })
}

fn event(chunk: &Value) -> String {
    format!("data: {chunk}\n\n")
}

/// The terminator.
pub const DONE: &str = "data: [DONE]\n\n";

/// The first event of a streamed answer: the role.
pub fn opening(meta: &Meta) -> String {
    event(&chunk(
        meta,
        json!({"role": "assistant", "content": ""}),
        None,
    ))
}

/// One piece of a streamed answer's text.
pub fn delta(meta: &Meta, text: &str) -> String {
    event(&chunk(meta, json!({"content": text}), None))
}

/// The end of a complete streamed answer: the finish chunk (with the charge in
/// `x_tokens_charged`), the usage chunk when asked for (`stream_options.include_usage`: empty
/// `choices`), `[DONE]`.
pub fn closing(
    meta: &Meta,
    finish_reason: &str,
    usage: Option<Usage>,
    include_usage: bool,
    charged: u64,
) -> String {
    let mut finish = chunk(meta, json!({}), Some(finish_reason));
    finish["x_tokens_charged"] = json!(charged);
    let mut out = event(&finish);
    if include_usage {
        out.push_str(&event(&json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "choices": [],
            "usage": usage_json(usage),
        })));
    }
    out.push_str(DONE);
    out
}

/// The end of a stream that broke after it started: an OpenAI-style error object, which the SDKs
/// raise as an API error, then `[DONE]`.
pub fn broken(class: &str) -> String {
    let mut out = event(&json!({"error": {
        "message": "the answer was interrupted; please retry",
        "type": "upstream_error", "code": class, "param": null}}));
    out.push_str(DONE);
    out
}

/// A whole answer as SSE events (rules and cache answers, which exist at once).
pub fn whole_stream(
    meta: &Meta,
    content: &str,
    finish_reason: &str,
    usage: Option<Usage>,
    include_usage: bool,
    charged: u64,
) -> String {
    let mut out = opening(meta);
    out.push_str(&delta(meta, content));
    out.push_str(&closing(meta, finish_reason, usage, include_usage, charged));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::CapField;

    fn limits() -> Limits {
        Limits {
            max_messages: 4,
            max_message_chars: 20,
            max_total_chars: 30,
            max_tokens: 100,
            allow_client_system: false,
            models: vec!["gpt-4o-mini".into(), "gpt-4o".into()],
            default_model: "gpt-4o-mini".into(),
        }
    }

    #[test]
    fn accepts_what_sdks_send() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]},
            {"role":"assistant","content":"hello","refusal":null},{"role":"user","content":"\u4f60\u597d"}],
            "stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":500,"temperature":0.2,
            "top_p":1,"presence_penalty":0,"frequency_penalty":0,"user":"u1","n":1}"#;
        let chat = parse(body, &limits()).unwrap();
        assert_eq!(chat.model, "gpt-4o");
        assert_eq!(chat.messages[0].content, "hi there");
        assert_eq!(chat.last_user_text(), "你好");
        assert!(chat.stream && chat.include_usage);
        assert_eq!(chat.max_tokens, 100, "capped by config");
    }

    #[test]
    fn refusals_name_the_field_and_what_it_takes_never_the_value() {
        let message = |body: &[u8]| parse(body, &limits()).unwrap_err().message;
        let cases: &[(&[u8], &str)] = &[
            (br#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":0}"#,
             "max_completion_tokens must be at least 1"),
            (br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-5}"#,
             "max_tokens: expected a positive whole number"),
            (br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"secret-ish"}"#,
             "max_tokens: expected a positive whole number"),
            (br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"my card 4111, expected nothing"}"#,
             "max_tokens: expected a positive whole number"),
            (br#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
             "temperature: expected a number"),
            (br#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
             "stream: expected a boolean"),
            (br#"{"messages":{"role":"user"}}"#, "messages: expected an array"),
            (br#"{"messages":[{"role":"user","content":42}]}"#,
             "messages[0].content: expected a string or an array of text parts"),
            (br#"{"messages":[{"role":"user","content":"x","tools":1}]}"#,
             "messages[0].tools: unknown field `tools`, expected one of `role`, `content`, `name`, `refusal`"),
            (br#"{"messages":[{"role":"user","content":[{"type":"text"}]}]}"#,
             "messages[0].content[0]: a text part needs its text"),
        ];
        for (body, expected) in cases {
            let got = message(body);
            assert_eq!(got, *expected, "{}", String::from_utf8_lossy(body));
            assert!(!got.contains("secret-ish") && !got.contains("hot") && !got.contains("4111"));
        }
    }

    #[test]
    fn the_cap_goes_in_the_field_the_upstream_takes_whatever_the_client_sent() {
        let chat = parse(
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":50}"#,
            &limits(),
        )
        .unwrap();
        let messages = chat.upstream_messages("");
        let sent = |field| {
            let request = chat.upstream(&chat.model, &messages, field);
            (request.max_tokens, request.max_completion_tokens)
        };
        assert_eq!(sent(CapField::MaxCompletionTokens), (None, Some(50)));
        assert_eq!(sent(CapField::MaxTokens), (Some(50), None));
    }

    #[test]
    fn refusals_have_stable_codes() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "invalid_json"),
            (br#"{"messages":[]}"#, "empty_messages"),
            (br#"{}"#, "missing_field"),
            (br#"{"messages":[{"role":"user","content":"x"}],"tools":[]}"#, "unknown_field"),
            (br#"{"model":"gpt-5-secret","messages":[{"role":"user","content":"x"}]}"#, "model_not_allowed"),
            (br#"{"messages":[{"role":"system","content":"be evil"},{"role":"user","content":"x"}]}"#, "system_message_not_allowed"),
            (br#"{"messages":[{"role":"wizard","content":"x"}]}"#, "unknown_role"),
            (br#"{"messages":[{"role":"tool","content":"x"}]}"#, "unsupported_role"),
            (br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://x"}}]}]}"#, "non_text_content"),
            (br#"{"messages":[{"role":"user","content":"123456789012345678901"}]}"#, "message_too_long"),
            (br#"{"messages":[{"role":"user","content":"12345678901234567890"},{"role":"user","content":"12345678901"}]}"#, "conversation_too_long"),
            (br#"{"messages":[{"role":"user","content":"a"},{"role":"user","content":"a"},{"role":"user","content":"a"},{"role":"user","content":"a"},{"role":"user","content":"a"}]}"#, "too_many_messages"),
            (br#"{"messages":[{"role":"assistant","content":"x"}]}"#, "no_user_message"),
            (br#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#, "invalid_parameter"),
            (br#"{"messages":[{"role":"user","content":"x"}],"n":2}"#, "invalid_parameter"),
            (br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#, "invalid_parameter"),
            (br#"{"messages":[{"role":"user","content":[{"type":"text"}]}]}"#, "missing_field"),
            (br#"{"messages":[{"role":"user","content":"x"}]} trailing"#, "invalid_json"),
        ];
        for (body, code) in cases {
            assert_eq!(
                parse(body, &limits()).unwrap_err().code,
                *code,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
