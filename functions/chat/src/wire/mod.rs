//! The two protocols the chat speaks, each in one file with its request parsing and its answer
//! encoding side by side: [`openai`] (Chat Completions, for servers and the official SDKs) and
//! [`ui`] (the AI SDK's `useChat`). The body decides which one a request speaks; admission,
//! cache, budget and fallbacks are the same for both, only the bytes of the answer differ.

pub mod openai;
pub mod ui;

use http::{header, HeaderMap, HeaderValue};
use shared::llm::Usage;

use crate::conversation::{Chat, Invalid, Limits};
use crate::meta::Meta;

/// The protocol of one answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// `chat.completion` objects, or `chat.completion.chunk` events when `stream`.
    OpenAi { stream: bool, include_usage: bool },
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
/// answered as a UI message stream; everything else is the OpenAI format.
pub fn parse(path: &str, body: &[u8], limits: &Limits) -> Result<Parsed, Invalid> {
    if path.trim_end_matches('/').is_empty() && ui::is_ui_body(body) {
        let parsed = ui::parse(body, limits)?;
        return Ok(Parsed {
            chat: parsed.chat,
            wire: Wire::UiStream,
            fresh: parsed.trigger == ui::Trigger::Regenerate,
        });
    }
    let chat = openai::parse(body, limits)?;
    Ok(Parsed {
        wire: Wire::OpenAi {
            stream: chat.stream,
            include_usage: chat.include_usage,
        },
        chat,
        fresh: false,
    })
}

/// A whole answer's text, as the answer encoders need it.
#[derive(Clone, Copy, Debug)]
pub struct Whole<'a> {
    pub content: &'a str,
    pub finish_reason: &'a str,
    /// The upstream's usage of the answering attempt; `None` for cache and rule answers.
    pub usage: Option<Usage>,
    /// What the request was charged against the budget (0 for the cache).
    pub charged: u64,
}

impl Wire {
    /// True when the answer is a stream of events.
    pub fn is_stream(self) -> bool {
        match self {
            Wire::OpenAi { stream, .. } => stream,
            Wire::UiStream => true,
        }
    }

    /// The content headers of an answer.
    pub fn headers(self, headers: &mut HeaderMap) {
        match self {
            Wire::UiStream => ui::headers(headers),
            Wire::OpenAi { stream: true, .. } => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream; charset=utf-8"),
                );
            }
            Wire::OpenAi { stream: false, .. } => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
        }
    }

    /// A whole answer (rules, cache, a complete LLM answer) in this protocol.
    pub fn whole(self, meta: &Meta, answer: Whole<'_>) -> String {
        match self {
            Wire::UiStream => ui::whole(meta, answer.content, answer.finish_reason, answer.charged),
            Wire::OpenAi {
                stream: true,
                include_usage,
            } => openai::whole_stream(
                meta,
                answer.content,
                answer.finish_reason,
                answer.usage,
                include_usage,
                answer.charged,
            ),
            Wire::OpenAi { stream: false, .. } => openai::completion(
                meta,
                answer.content,
                answer.finish_reason,
                answer.usage,
                answer.charged,
            )
            .to_string(),
        }
    }

    /// The first bytes of a streamed answer.
    pub fn opening(self, meta: &Meta) -> String {
        match self {
            Wire::OpenAi { .. } => openai::opening(meta),
            Wire::UiStream => ui::opening(meta),
        }
    }

    /// One piece of a streamed answer's text.
    pub fn delta(self, meta: &Meta, text: &str) -> String {
        match self {
            Wire::OpenAi { .. } => openai::delta(meta, text),
            Wire::UiStream => ui::delta(text),
        }
    }

    /// The end of a complete streamed answer, terminator included.
    pub fn closing(
        self,
        meta: &Meta,
        finish_reason: &str,
        usage: Option<Usage>,
        charged: u64,
    ) -> String {
        match self {
            Wire::OpenAi { include_usage, .. } => {
                openai::closing(meta, finish_reason, usage, include_usage, charged)
            }
            Wire::UiStream => ui::closing(finish_reason, charged),
        }
    }

    /// The end of a stream that broke after it began (`class`: why), terminator included.
    pub fn broken(self, class: &str) -> String {
        match self {
            Wire::OpenAi { .. } => openai::broken(class),
            Wire::UiStream => ui::broken(class),
        }
    }
}
