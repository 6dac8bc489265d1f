//! The AI SDK's UI message stream (protocol `v1`), what `useChat` reads: server-sent events
//! `data: <chunk>\n\n` ending with `data: [DONE]`. AI SDK 5 and 6 check every chunk against a
//! strict schema, so each chunk carries exactly its documented fields.
//!
//! An answer is `start` (a fresh `messageId`, and `messageMetadata` saying where the answer came
//! from), `start-step`, `text-start`, `text-delta`s, `text-end`, `finish-step`, `finish`
//! (`finishReason`); a stream that breaks after it began ends with `error` (`errorText`).

use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};
use shared::lambda::StreamBody;

use crate::reply::Meta;

/// The header that names the protocol.
pub const PROTOCOL_HEADER: &str = "x-vercel-ai-ui-message-stream";
/// The one text part of an answer.
const TEXT_ID: &str = "text-1";
/// The terminator.
const DONE: &str = "data: [DONE]\n\n";

fn event(chunk: &Value) -> String {
    format!("data: {chunk}\n\n")
}

/// The answer's metadata: `source` (`llm`, `cache`, `rules`), `fallbackReason` for rules, `model`.
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

/// The headers of a UI message stream around `body`, with the answer's source headers.
pub fn response(meta: &Meta, body: StreamBody) -> Response<StreamBody> {
    let mut response = crate::respond::with_source(Response::new(body), meta);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(PROTOCOL_HEADER, HeaderValue::from_static("v1"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
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

/// The last events of a complete answer: `text-end`, `finish-step`, `finish`, `[DONE]`.
pub fn closing(openai_finish_reason: &str) -> String {
    let mut out = event(&json!({"type": "text-end", "id": TEXT_ID}));
    out.push_str(&event(&json!({"type": "finish-step"})));
    out.push_str(&event(
        &json!({"type": "finish", "finishReason": finish_reason(openai_finish_reason)}),
    ));
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
pub fn whole(meta: &Meta, content: &str, openai_finish_reason: &str) -> String {
    let mut out = opening(meta);
    if !content.is_empty() {
        out.push_str(&delta(content));
    }
    out.push_str(&closing(openai_finish_reason));
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
    use crate::reply::Source;

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
        let got = chunks(&whole(&meta, "Hello", "stop"));
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
                json!({"type": "finish", "finishReason": "stop"}),
            ]
        );
        let again = chunks(&whole(&meta, "Hello", "stop"));
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
            chunks(&closing("length")).last().unwrap(),
            &json!({"type": "finish", "finishReason": "length"})
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
