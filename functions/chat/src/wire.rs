//! Which protocol an answer is written in: the OpenAI Chat Completions format (`reply`) or the AI
//! SDK's UI message stream (`ui_stream`). The request's body decides; admission, cache and
//! fallbacks are the same for both, only the bytes of the answer differ.

use serde_json::json;
use shared::llm::Usage;

use crate::reply::{self, Meta};
use crate::request::{self, Chat, Invalid, Limits};
use crate::{ui_request, ui_stream};

/// The protocol of one answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// `chat.completion` objects or `chat.completion.chunk` events.
    OpenAi { include_usage: bool },
    /// `useChat`'s UI message stream (always streamed).
    UiStream,
}

/// A parsed request: the conversation, the protocol to answer in, and whether it asks for a
/// fresh answer (one the cache must not give).
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    pub chat: Chat,
    pub wire: Wire,
    pub fresh: bool,
}

/// Parses a body posted to `path`: on the root (where `/api/llm/chat` lands) a `useChat` body is
/// answered as a UI message stream; everything else is the OpenAI format, exactly as before.
pub fn parse(path: &str, body: &[u8], limits: &Limits) -> Result<Parsed, Invalid> {
    if path.trim_end_matches('/').is_empty() && ui_request::is_ui_body(body) {
        let ui = ui_request::parse(body, limits)?;
        return Ok(Parsed {
            chat: ui.chat,
            wire: Wire::UiStream,
            fresh: ui.trigger == ui_request::Trigger::Regenerate,
        });
    }
    let chat = request::parse(body, limits)?;
    Ok(Parsed {
        wire: Wire::OpenAi {
            include_usage: chat.include_usage,
        },
        chat,
        fresh: false,
    })
}

impl Wire {
    /// The first bytes of a streamed answer.
    pub fn opening(self, meta: &Meta) -> String {
        match self {
            Wire::OpenAi { .. } => {
                reply::chunk(meta, json!({"role": "assistant", "content": ""}), None)
            }
            Wire::UiStream => ui_stream::opening(meta),
        }
    }

    /// One piece of a streamed answer's text.
    pub fn delta(self, meta: &Meta, text: &str) -> String {
        match self {
            Wire::OpenAi { .. } => reply::chunk(meta, json!({"content": text}), None),
            Wire::UiStream => ui_stream::delta(text),
        }
    }

    /// The end of a complete streamed answer, terminator included.
    pub fn closing(self, meta: &Meta, finish_reason: &str, usage: Option<Usage>) -> String {
        match self {
            Wire::OpenAi { include_usage } => {
                let mut out = reply::chunk(meta, json!({}), Some(finish_reason));
                if include_usage {
                    out.push_str(&reply::usage_chunk(meta, usage));
                }
                out.push_str(reply::DONE);
                out
            }
            Wire::UiStream => ui_stream::closing(finish_reason),
        }
    }

    /// The end of a stream that broke after it began (`class`: why), terminator included.
    pub fn broken(self, class: &str) -> String {
        match self {
            Wire::OpenAi { .. } => {
                let mut out =
                    reply::stream_error(class, "the answer was interrupted; please retry");
                out.push_str(reply::DONE);
                out
            }
            Wire::UiStream => ui_stream::broken(class),
        }
    }
}
