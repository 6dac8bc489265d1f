//! The OpenAI Chat Completions request, as much of it as a chat UI sends, parsed into a
//! validated [`Chat`]. Parameters the SDKs send that do not change the answer are accepted and
//! ignored; anything else unknown, non-text content and unknown roles are refused.

use serde::Deserialize;
use serde_json::Value;
use shared::llm::{self, Message};

/// Limits from config.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_messages: usize,
    pub max_message_chars: usize,
    pub max_total_chars: usize,
    pub max_tokens: u32,
    pub allow_client_system: bool,
    pub models: Vec<String>,
    pub default_model: String,
}

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

/// A validated chat request.
#[derive(Clone, Debug, PartialEq)]
pub struct Chat {
    pub model: String,
    /// The client's messages (no server system prompt yet).
    pub messages: Vec<Message>,
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: u32,
    /// The client used `max_completion_tokens` (sent upstream the same way).
    pub uses_max_completion_tokens: bool,
    pub temperature: Option<f64>,
}

/// Why a request was refused: a stable code and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub code: &'static str,
    pub message: String,
}

pub(crate) fn invalid(code: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        code,
        message: message.into(),
    }
}

/// A body serde refused: `unknown_field` and `missing_field` say which field, anything else is
/// `invalid_json` with `what` (the body's content never goes into the answer).
pub(crate) fn refused_body(error: serde_json::Error, what: &str) -> Invalid {
    let text = error.to_string();
    if text.starts_with("unknown field") {
        invalid("unknown_field", text)
    } else if text.starts_with("missing field") {
        invalid("missing_field", text)
    } else {
        invalid("invalid_json", what)
    }
}

/// Parses and validates a request body.
pub fn parse(body: &[u8], limits: &Limits) -> Result<Chat, Invalid> {
    let raw: RawRequest = serde_json::from_slice(body)
        .map_err(|e| refused_body(e, "the body is not a valid chat completion request"))?;
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
    let requested = raw.max_completion_tokens.or(raw.max_tokens);
    if requested == Some(0) {
        return Err(invalid(
            "invalid_parameter",
            "max_tokens must be at least 1",
        ));
    }
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
                for part in parts {
                    match (part.type_.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
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
        uses_max_completion_tokens: raw.max_completion_tokens.is_some(),
        temperature: raw.temperature,
    })
}

impl Chat {
    /// The user's last message (what the rule engine answers).
    pub fn last_user_text(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.as_str())
            .unwrap_or("")
    }

    /// The messages sent upstream: the server's system prompt first.
    pub fn upstream_messages(&self, system_prompt: &str) -> Vec<Message> {
        let mut out = Vec::with_capacity(self.messages.len() + 1);
        if !system_prompt.is_empty() {
            out.push(Message {
                role: "system".into(),
                content: system_prompt.to_owned(),
            });
        }
        out.extend(self.messages.iter().cloned());
        out
    }

    /// The upstream request for `messages` (from [`Chat::upstream_messages`]); usage is always
    /// asked for on streams, since the token budget counts it.
    pub fn upstream<'a>(&'a self, messages: &'a [Message]) -> llm::Request<'a> {
        llm::Request {
            model: &self.model,
            messages,
            max_tokens: (!self.uses_max_completion_tokens).then_some(self.max_tokens),
            max_completion_tokens: self.uses_max_completion_tokens.then_some(self.max_tokens),
            temperature: self.temperature,
            stream: self.stream,
            stream_options: self.stream.then_some(llm::StreamOptions {
                include_usage: true,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(chat.stream && chat.include_usage && chat.uses_max_completion_tokens);
        assert_eq!(chat.max_tokens, 100, "capped by config");
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
