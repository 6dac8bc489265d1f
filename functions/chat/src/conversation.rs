//! The conversation a request asks to have answered, whatever protocol it came in: validated
//! messages, the model, the token cap; and why a request was refused.

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

    /// The upstream request for `messages` (from [`Chat::upstream_messages`]) to `model`; usage
    /// is always asked for on streams, since the token budget counts it.
    pub fn upstream<'a>(&'a self, model: &'a str, messages: &'a [Message]) -> llm::Request<'a> {
        llm::Request {
            model,
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
