//! The Vercel AI SDK's `useChat` protocol, both ways: what `DefaultChatTransport` posts (`{id,
//! messages: UIMessage[], trigger, messageId?}`), turned into the OpenAI-shaped request the rest
//! of the function serves (so the same limits, admission, cache and fallbacks apply), and the UI
//! message stream (protocol `v1`) it reads back: server-sent events `data: <chunk>\n\n` ending
//! with `data: [DONE]`.
//!
//! History keeps `text` parts; `step-start` (which the SDK adds to assistant messages) is
//! ignored; any other part (files, tools, reasoning, sources, data) is refused. A regenerate
//! answers the conversation again without its last assistant message, and skips the cache.
//!
//! AI SDK 5 and 6 check every chunk against a strict schema, so each chunk carries exactly its
//! documented fields. An answer is `start` (a fresh `messageId`, and `messageMetadata` saying
//! where the answer came from), `start-step`, `text-start`, `text-delta`s, `text-end`,
//! `finish-step`, `finish` (`finishReason`, and `messageMetadata` with the tokens charged); a
//! stream that breaks after it began ends with `error` (`errorText`). Metadata goes only where
//! the schemas allow it: `start` and `finish`.

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::lambda::StreamBody;

use crate::conversation::{invalid, read_body, Chat, Invalid, Limits};
use crate::meta::Meta;

// ---- The request ----

/// What the client asked for (`trigger`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// `submit-message`: answer the conversation.
    Submit,
    /// `regenerate-message`: answer it again, fresh (never from the cache).
    Regenerate,
}

/// A validated `useChat` request.
#[derive(Clone, Debug, PartialEq)]
pub struct UiChat {
    /// The conversation as the OpenAI-shaped request (always streamed, no usage chunk).
    pub chat: Chat,
    pub trigger: Trigger,
}

// Accepted so the SDK's requests parse; the chat id and the regenerated message's id do not
// change the answer (the SDK has already removed that message from `messages`).
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawUiRequest {
    #[serde(default)]
    id: Option<String>,
    messages: Vec<RawUiMessage>,
    #[serde(default)]
    trigger: Option<String>,
    #[serde(default)]
    message_id: Option<String>,
    /// `useChat`'s `body` option may choose a model from the allow-list.
    #[serde(default)]
    model: Option<String>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUiMessage {
    #[serde(default)]
    id: Option<String>,
    role: String,
    /// Ours, sent back with history (where an answer came from): ignored.
    #[serde(default)]
    metadata: Option<IgnoredAny>,
    parts: Vec<RawUiPart>,
}

/// A part: only its type and text matter; the SDK's other fields (`state`, `providerMetadata`,
/// a tool's input) are skipped, and the type decides whether the part is accepted.
#[derive(Debug, Deserialize)]
struct RawUiPart {
    #[serde(rename = "type")]
    type_: String,
    #[serde(default)]
    text: Option<String>,
}

/// The conversation in the OpenAI request's shape, for the OpenAI parser.
#[derive(Serialize)]
struct OpenAiShaped<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    messages: Vec<OpenAiMessage>,
    stream: bool,
}

#[derive(Serialize)]
struct OpenAiMessage {
    role: String,
    content: String,
}

/// The top-level keys and message keys that tell a `useChat` body from an OpenAI one.
#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    id: Option<IgnoredAny>,
    #[serde(default)]
    trigger: Option<IgnoredAny>,
    #[serde(default)]
    messages: Option<Vec<ProbeMessage>>,
}

#[derive(Deserialize)]
struct ProbeMessage {
    #[serde(default)]
    parts: Option<IgnoredAny>,
}

/// True when `body` is a `useChat` request: it has `id` or `trigger`, or a message with `parts`
/// (none of which an OpenAI request has). Anything unreadable is left to the OpenAI parser, whose
/// errors are the established ones.
pub fn is_ui_body(body: &[u8]) -> bool {
    serde_json::from_slice::<Probe>(body).is_ok_and(|p| {
        p.id.is_some()
            || p.trigger.is_some()
            || p.messages
                .is_some_and(|m| m.iter().any(|m| m.parts.is_some()))
    })
}

/// Parses and validates a `useChat` body.
pub fn parse(body: &[u8], limits: &Limits) -> Result<UiChat, Invalid> {
    let raw: RawUiRequest = read_body(body, "the body is not a valid useChat request")?;
    let trigger = match raw.trigger.as_deref() {
        None | Some("submit-message") => Trigger::Submit,
        Some("regenerate-message") => Trigger::Regenerate,
        Some(other) => {
            return Err(invalid(
                "invalid_parameter",
                format!("trigger {other:?} is not submit-message or regenerate-message"),
            ))
        }
    };
    let mut messages = raw.messages;
    if trigger == Trigger::Regenerate && messages.last().is_some_and(|m| m.role == "assistant") {
        messages.pop();
    }
    // Counted before the text is gathered, so a huge history is refused before it is copied.
    if messages.len() > limits.max_messages {
        return Err(invalid(
            "too_many_messages",
            format!("at most {} messages", limits.max_messages),
        ));
    }
    let mut openai = Vec::with_capacity(messages.len());
    for (i, message) in messages.into_iter().enumerate() {
        let mut text = String::new();
        for (j, part) in message.parts.into_iter().enumerate() {
            match (part.type_.as_str(), part.text) {
                ("text", Some(t)) => text.push_str(&t),
                ("text", None) => {
                    return Err(invalid(
                        "missing_field",
                        format!("messages[{i}].parts[{j}]: a text part needs its text"),
                    ))
                }
                ("step-start", _) => {}
                (kind, _) => {
                    return Err(invalid(
                        "non_text_content",
                        format!(
                            "messages[{i}].parts[{j}]: {kind:?} parts are not supported; send text parts"
                        ),
                    ))
                }
            }
        }
        openai.push(OpenAiMessage {
            role: message.role,
            content: text,
        });
    }
    let shaped = OpenAiShaped {
        model: raw.model.as_deref(),
        messages: openai,
        stream: true,
    };
    // The OpenAI parser owns every limit and role rule; the UI body is only another spelling.
    let bytes = serde_json::to_vec(&shaped)
        .map_err(|_| invalid("invalid_json", "the body is not a valid useChat request"))?;
    let chat = super::openai::parse(&bytes, limits)?;
    Ok(UiChat { chat, trigger })
}

// ---- The answer ----

/// The header that names the protocol.
pub const PROTOCOL_HEADER: &str = "x-vercel-ai-ui-message-stream";
/// The one text part of an answer.
const TEXT_ID: &str = "text-1";
/// The terminator.
const DONE: &str = "data: [DONE]\n\n";

fn event(chunk: &Value) -> String {
    format!("data: {chunk}\n\n")
}

/// The answer's metadata in `start`: `source` (`llm`, `fallback`, `cache`, `rules`),
/// `fallbackReason` when the first model did not answer, `model`.
pub fn metadata(meta: &Meta) -> Value {
    let mut metadata = json!({"source": meta.source.as_str(), "model": meta.model});
    if let Some(reason) = &meta.fallback_reason {
        metadata["fallbackReason"] = json!(reason);
    }
    metadata
}

/// The SDK's finish reason for an OpenAI one.
pub fn finish_reason(openai: &str) -> &'static str {
    match openai {
        "stop" => "stop",
        "length" => "length",
        "content_filter" => "content-filter",
        "tool_calls" | "function_call" => "tool-calls",
        _ => "other",
    }
}

/// The headers of a UI message stream.
pub fn headers(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(PROTOCOL_HEADER, HeaderValue::from_static("v1"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// The first events: `start` (fresh message id, metadata), `start-step`, `text-start`.
pub fn opening(meta: &Meta) -> String {
    let message_id = format!("msg-{}", uuid::Uuid::new_v4().simple());
    let mut out = event(
        &json!({"type": "start", "messageId": message_id, "messageMetadata": metadata(meta)}),
    );
    out.push_str(&event(&json!({"type": "start-step"})));
    out.push_str(&event(&json!({"type": "text-start", "id": TEXT_ID})));
    out
}

/// One piece of the answer's text.
pub fn delta(text: &str) -> String {
    event(&json!({"type": "text-delta", "id": TEXT_ID, "delta": text}))
}

/// The last events of a complete answer: `text-end`, `finish-step`, `finish` (with
/// `messageMetadata.tokensCharged`, merged into the message's metadata by the SDK), `[DONE]`.
pub fn closing(openai_finish_reason: &str, charged: u64) -> String {
    let mut out = event(&json!({"type": "text-end", "id": TEXT_ID}));
    out.push_str(&event(&json!({"type": "finish-step"})));
    out.push_str(&event(&json!({
        "type": "finish",
        "finishReason": finish_reason(openai_finish_reason),
        "messageMetadata": {"tokensCharged": charged},
    })));
    out.push_str(DONE);
    out
}

/// The end of a stream that broke after it began: `error` (the SDK shows `errorText`), `[DONE]`.
pub fn broken(class: &str) -> String {
    let mut out = event(&json!({
        "type": "error",
        "errorText": format!("The answer was interrupted ({class}); please try again."),
    }));
    out.push_str(DONE);
    out
}

/// A whole answer at once (rules, cache), as the same events a streamed one has.
pub fn whole(meta: &Meta, content: &str, openai_finish_reason: &str, charged: u64) -> String {
    let mut out = opening(meta);
    if !content.is_empty() {
        out.push_str(&delta(content));
    }
    out.push_str(&closing(openai_finish_reason, charged));
    out
}

/// True for the SDK's resume probe, `GET /{chatId}/stream`.
pub fn is_resume_probe(method: &http::Method, path: &str) -> bool {
    method == http::Method::GET
        && path
            .strip_prefix('/')
            .and_then(|p| p.strip_suffix("/stream"))
            .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// The answer to a resume probe: nothing to resume (answers are not kept once sent).
pub fn no_stream_to_resume() -> Response<StreamBody> {
    let mut response = Response::new(StreamBody::full(Vec::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_messages: 4,
            max_message_chars: 20,
            max_total_chars: 40,
            max_tokens: 100,
            allow_client_system: false,
            models: vec!["gpt-4o-mini".into(), "gpt-4o".into()],
            default_model: "gpt-4o-mini".into(),
        }
    }

    fn user(id: &str, text: &str) -> Value {
        json!({"id": id, "role": "user", "parts": [{"type": "text", "text": text}]})
    }

    fn assistant(id: &str, text: &str) -> Value {
        json!({"id": id, "role": "assistant", "metadata": {"source": "llm"},
            "parts": [{"type": "step-start"}, {"type": "text", "text": text, "state": "done"}]})
    }

    fn body(messages: Vec<Value>, trigger: &str) -> Vec<u8> {
        json!({"id": "chat-1", "messages": messages, "trigger": trigger})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn tells_use_chat_bodies_from_openai_ones() {
        assert!(is_ui_body(&body(vec![user("u1", "hi")], "submit-message")));
        assert!(is_ui_body(
            br#"{"messages":[{"role":"user","parts":[{"type":"text","text":"hi"}]}]}"#
        ));
        assert!(is_ui_body(br#"{"id":"x","messages":[]}"#));
        for openai in [
            &br#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#[..],
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"parts"}]}]}"#,
            b"not json",
            br#"{"messages":"nope"}"#,
            b"",
        ] {
            assert!(!is_ui_body(openai), "{}", String::from_utf8_lossy(openai));
        }
    }

    #[test]
    fn history_keeps_text_and_skips_step_start() {
        let ui = parse(
            &body(
                vec![
                    user("u1", "hi"),
                    assistant("a1", "hello"),
                    json!({"id": "u2", "role": "user", "parts": [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]}),
                ],
                "submit-message",
            ),
            &limits(),
        )
        .unwrap();
        assert_eq!(ui.trigger, Trigger::Submit);
        let roles: Vec<_> = ui.chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "user"]);
        assert_eq!(ui.chat.messages[1].content, "hello");
        assert_eq!(ui.chat.last_user_text(), "你好");
        assert!(ui.chat.stream && !ui.chat.include_usage);
        assert_eq!(
            (ui.chat.model.as_str(), ui.chat.max_tokens),
            ("gpt-4o-mini", 100)
        );
    }

    #[test]
    fn regenerate_drops_a_trailing_assistant_message() {
        let with_answer = parse(
            &body(
                vec![user("u1", "hi"), assistant("a1", "first try")],
                "regenerate-message",
            ),
            &limits(),
        )
        .unwrap();
        // What the SDK itself sends: the answer already removed, its id in messageId.
        let without = parse(
            json!({"id": "c", "messages": [user("u1", "hi")], "trigger": "regenerate-message", "messageId": "a1"})
                .to_string()
                .as_bytes(),
            &limits(),
        )
        .unwrap();
        assert_eq!(with_answer.trigger, Trigger::Regenerate);
        assert_eq!(with_answer.chat.messages.len(), 1);
        assert_eq!(with_answer.chat, without.chat);
        // A submit keeps a trailing assistant message (the client's own choice).
        let submit = parse(
            &body(
                vec![user("u1", "hi"), assistant("a1", "x")],
                "submit-message",
            ),
            &limits(),
        )
        .unwrap();
        assert_eq!(submit.chat.messages.len(), 2);
    }

    #[test]
    fn a_model_from_the_body_option_is_allow_listed() {
        let pick = |model: &str| {
            parse(
                json!({"id": "c", "messages": [user("u", "x")], "trigger": "submit-message", "model": model})
                    .to_string()
                    .as_bytes(),
                &limits(),
            )
        };
        assert_eq!(pick("gpt-4o").unwrap().chat.model, "gpt-4o");
        assert_eq!(pick("o1-pro").unwrap_err().code, "model_not_allowed");
    }

    #[test]
    fn refusals_have_the_same_stable_codes() {
        let file = json!({"id": "u", "role": "user", "parts": [{"type": "file", "mediaType": "image/png", "url": "data:x"}]});
        let tool = json!({"id": "a", "role": "assistant", "parts": [{"type": "tool-weather", "toolCallId": "t", "state": "input-available", "input": {}}]});
        let system =
            json!({"id": "s", "role": "system", "parts": [{"type": "text", "text": "be evil"}]});
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{not json".to_vec(), "invalid_json"),
            (
                br#"{"id":"c","trigger":"submit-message"}"#.to_vec(),
                "missing_field",
            ),
            (
                br#"{"id":"c","messages":[],"trigger":"submit-message","tools":[]}"#.to_vec(),
                "unknown_field",
            ),
            (
                br#"{"id":"c","messages":[{"id":"u","role":"user","content":"x","parts":[]}]}"#
                    .to_vec(),
                "unknown_field",
            ),
            (body(vec![], "submit-message"), "empty_messages"),
            (body(vec![user("u", "x")], "continue"), "invalid_parameter"),
            (body(vec![file], "submit-message"), "non_text_content"),
            (
                body(
                    vec![json!({"id": "u", "role": "user", "parts": [{"type": "text"}]})],
                    "submit-message",
                ),
                "missing_field",
            ),
            (
                body(vec![user("u", "x"), tool], "submit-message"),
                "non_text_content",
            ),
            (
                body(vec![system, user("u", "x")], "submit-message"),
                "system_message_not_allowed",
            ),
            (
                body(
                    vec![json!({"id": "w", "role": "wizard", "parts": []})],
                    "submit-message",
                ),
                "unknown_role",
            ),
            (
                body(vec![user("u", &"x".repeat(21))], "submit-message"),
                "message_too_long",
            ),
            (
                body(vec![user("u", &"x".repeat(20)); 3], "submit-message"),
                "conversation_too_long",
            ),
            (
                body(vec![user("u", "x"); 5], "submit-message"),
                "too_many_messages",
            ),
            (
                body(vec![assistant("a", "only me")], "submit-message"),
                "no_user_message",
            ),
            (
                body(
                    vec![user("u", "x"), assistant("a", "y")],
                    "regenerate-message",
                ),
                "ok",
            ),
        ];
        for (body, code) in cases {
            let got = parse(&body, &limits()).map(|_| "ok").map_err(|e| e.code);
            assert_eq!(
                got.unwrap_or_else(|e| e),
                code,
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    // ---- the answer ----

    use crate::meta::Source;

    fn chunks(stream: &str) -> Vec<Value> {
        let events: Vec<&str> = stream
            .split_terminator("\n\n")
            .map(|e| {
                e.strip_prefix("data: ")
                    .expect("every event is a data line")
            })
            .collect();
        assert_eq!(events.last(), Some(&"[DONE]"));
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).expect("JSON chunk"))
            .collect()
    }

    #[test]
    fn whole_answer_has_exactly_the_documented_chunks() {
        let meta = Meta::new(
            "gpt-4o-mini",
            Source::Rules,
            Some("timeout".into()),
            1_767_225_600,
        );
        let got = chunks(&whole(&meta, "Hello", "stop", 0));
        let message_id = got[0]["messageId"].as_str().unwrap().to_owned();
        assert!(message_id.starts_with("msg-") && message_id.len() > 20);
        assert_eq!(
            got,
            [
                json!({"type": "start", "messageId": message_id,
                    "messageMetadata": {"source": "rules", "fallbackReason": "timeout", "model": "gpt-4o-mini"}}),
                json!({"type": "start-step"}),
                json!({"type": "text-start", "id": "text-1"}),
                json!({"type": "text-delta", "id": "text-1", "delta": "Hello"}),
                json!({"type": "text-end", "id": "text-1"}),
                json!({"type": "finish-step"}),
                json!({"type": "finish", "finishReason": "stop", "messageMetadata": {"tokensCharged": 0}}),
            ]
        );
        let again = chunks(&whole(&meta, "Hello", "stop", 0));
        assert_ne!(
            again[0]["messageId"], got[0]["messageId"],
            "fresh per answer"
        );
    }

    #[test]
    fn finish_reasons_map_to_the_sdk_enum() {
        for (openai, sdk) in [
            ("stop", "stop"),
            ("length", "length"),
            ("content_filter", "content-filter"),
            ("tool_calls", "tool-calls"),
            ("function_call", "tool-calls"),
            ("something_new", "other"),
        ] {
            assert_eq!(finish_reason(openai), sdk);
        }
        assert_eq!(
            chunks(&closing("length", 42)).last().unwrap(),
            &json!({"type": "finish", "finishReason": "length", "messageMetadata": {"tokensCharged": 42}})
        );
    }

    #[test]
    fn broken_stream_ends_with_an_error_chunk() {
        let got = chunks(&broken("stream_stalled"));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["type"], "error");
        assert_eq!(
            got[0].as_object().unwrap().len(),
            2,
            "type and errorText only"
        );
        assert!(got[0]["errorText"]
            .as_str()
            .unwrap()
            .contains("interrupted"));
    }

    #[test]
    fn resume_probe_paths() {
        let get = http::Method::GET;
        assert!(is_resume_probe(&get, "/chat-123/stream"));
        assert!(!is_resume_probe(&http::Method::POST, "/chat-123/stream"));
        for path in [
            "/stream",
            "//stream",
            "/a/b/stream",
            "/",
            "/chat-123/streams",
        ] {
            assert!(!is_resume_probe(&get, path), "{path}");
        }
    }
}
