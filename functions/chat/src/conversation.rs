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
    pub temperature: Option<f64>,
}

/// The field an upstream takes the completion cap in. The server chooses it per upstream
/// (`LLM_MAX_TOKENS_FIELD`, `LLM_FALLBACK_MAX_TOKENS_FIELD`), whichever the client sent: OpenAI's
/// reasoning models refuse `max_tokens`, and some OpenAI-compatible servers know only it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapField {
    MaxTokens,
    MaxCompletionTokens,
}

impl CapField {
    /// The field's name, as the variables spell it.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "max_tokens" => Some(CapField::MaxTokens),
            "max_completion_tokens" => Some(CapField::MaxCompletionTokens),
            _ => None,
        }
    }
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

/// Reads a body as `T`, or says which field is wrong and how: `unknown_field`,
/// `missing_field`, `invalid_parameter` (a field of the wrong type or value, named by its path,
/// with what was expected), or `invalid_json` with `what` for a body that is not JSON at all. The
/// body's content never goes into the answer (serde's own messages quote the value; these do
/// not).
pub(crate) fn read_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, Invalid> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| refused_body(e, what))?;
    // Anything after the JSON value (serde_json::from_slice refuses it too).
    deserializer
        .end()
        .map_err(|_| invalid("invalid_json", what))?;
    Ok(value)
}

fn refused_body(error: serde_path_to_error::Error<serde_json::Error>, what: &str) -> Invalid {
    let path = error.path().to_string();
    let inner = error.into_inner();
    let text = inner.to_string();
    let text = text.split(" at line ").next().unwrap_or_default();
    let at = |message: &str| {
        if path == "." {
            message.to_owned()
        } else {
            format!("{path}: {message}")
        }
    };
    if text.starts_with("unknown field") {
        invalid("unknown_field", at(text))
    } else if text.starts_with("missing field") {
        invalid("missing_field", at(text))
    } else if inner.classify() == serde_json::error::Category::Data && path != "." {
        // Serde puts what was expected last; the value sent, quoted before it, may itself
        // contain ", expected ".
        let expected = match text.rsplit_once(", expected ") {
            Some((_, expected)) => plain_type(expected),
            None if text.contains("untagged enum RawContent") => {
                "a string or an array of text parts".to_owned()
            }
            None => "another type or value".to_owned(),
        };
        invalid("invalid_parameter", at(&format!("expected {expected}")))
    } else {
        invalid("invalid_json", what)
    }
}

/// Serde's names of the types a field expects, as an API's user would say them.
fn plain_type(expected: &str) -> String {
    match expected {
        "u32" => "a positive whole number".to_owned(),
        "i64" => "a whole number".to_owned(),
        "f64" => "a number".to_owned(),
        "a sequence" => "an array".to_owned(),
        other if other.starts_with("struct ") || other == "a map" => "an object".to_owned(),
        other => other.to_owned(),
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

    /// The upstream request for `messages` (from [`Chat::upstream_messages`]) to `model`, with
    /// the cap in the field that upstream takes; usage is always asked for on streams, since the
    /// token budget counts it.
    pub fn upstream<'a>(
        &'a self,
        model: &'a str,
        messages: &'a [Message],
        cap_field: CapField,
    ) -> llm::Request<'a> {
        let cap = |field| (cap_field == field).then_some(self.max_tokens);
        llm::Request {
            model,
            messages,
            max_tokens: cap(CapField::MaxTokens),
            max_completion_tokens: cap(CapField::MaxCompletionTokens),
            temperature: self.temperature,
            stream: self.stream,
            stream_options: self.stream.then_some(llm::StreamOptions {
                include_usage: true,
            }),
        }
    }
}
