//! The chat function answering `useChat` (the AI SDK's UI message stream) on the function URL
//! root, against the real PostgreSQL and faked upstreams; the harness is `chat`'s.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::fixtures::FunctionUrlRequest;
use testkit::{llm_fake, tokens};
use wiremock::ResponseTemplate;

use crate::chat::{completions, spawn_app_with, upstream, Answer, App, JWT_SECRET};

fn user(id: &str, text: &str) -> Value {
    json!({"id": id, "role": "user", "parts": [{"type": "text", "text": text}]})
}

/// An assistant message as useChat keeps it: a step-start part, the text, our metadata.
fn assistant(id: &str, text: &str) -> Value {
    json!({"id": id, "role": "assistant", "metadata": {"source": "llm", "model": "gpt-4o-mini"},
        "parts": [{"type": "step-start"}, {"type": "text", "text": text, "state": "done"}]})
}

/// What DefaultChatTransport posts.
fn use_chat(messages: Vec<Value>, trigger: &str) -> Value {
    json!({"id": "chat-4f1c", "messages": messages, "trigger": trigger})
}

impl App {
    fn token(&self) -> String {
        tokens::hs256(
            &tokens::user_claims(&self.user, None),
            JWT_SECRET.as_bytes(),
        )
    }

    async fn ask_ui(&self, body: Value) -> Answer {
        self.send(FunctionUrlRequest::post("/", body.to_string().as_bytes()).bearer(&self.token()))
            .await
    }
}

impl Answer {
    /// The chunks of a UI message stream, checked to end with `[DONE]`.
    fn chunks(&self) -> Vec<Value> {
        let events = self.events();
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).expect("each event is one JSON chunk"))
            .collect()
    }

    fn types(&self) -> Vec<String> {
        self.chunks()
            .iter()
            .map(|c| c["type"].as_str().unwrap_or("?").to_owned())
            .collect()
    }

    fn text(&self) -> String {
        self.chunks()
            .iter()
            .filter(|c| c["type"] == "text-delta")
            .map(|c| c["delta"].as_str().unwrap_or_default())
            .collect()
    }

    fn metadata(&self) -> Value {
        self.chunks()[0]["messageMetadata"].clone()
    }
}

fn keys(chunk: &Value) -> BTreeSet<&str> {
    chunk
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

async fn cached_rows(app: &App) -> i64 {
    app.db
        .client()
        .await
        .query_one("select count(*) from chat_cache", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn use_chat_body_gets_the_ui_message_stream_with_exact_chunks() {
    let server = upstream().await;
    completions()
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(llm_fake::sse(&["你", "好", "!"]), "text/event-stream"),
        )
        .mount(&server)
        .await;
    let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |c| c.cache_ttl_s = 0).await;

    let answer = app
        .ask_ui(use_chat(vec![user("u1", "hi")], "submit-message"))
        .await;
    let again = app
        .ask_ui(use_chat(vec![user("u1", "hi")], "submit-message"))
        .await;

    assert_eq!((answer.status, answer.source()), (200, "llm"));
    for (name, value) in [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("x-vercel-ai-ui-message-stream", "v1"),
        ("x-accel-buffering", "no"),
    ] {
        assert_eq!(answer.headers[name], value, "{name}");
    }
    assert_eq!(
        answer.types(),
        [
            "start",
            "start-step",
            "text-start",
            "text-delta",
            "text-delta",
            "text-delta",
            "text-end",
            "finish-step",
            "finish"
        ]
    );
    // Exactly the documented fields: the SDK's schemas are strict.
    let chunks = answer.chunks();
    let expected: [&[&str]; 9] = [
        &["type", "messageId", "messageMetadata"],
        &["type"],
        &["type", "id"],
        &["type", "id", "delta"],
        &["type", "id", "delta"],
        &["type", "id", "delta"],
        &["type", "id"],
        &["type"],
        &["type", "finishReason", "messageMetadata"],
    ];
    for (chunk, fields) in chunks.iter().zip(expected) {
        assert_eq!(keys(chunk), fields.iter().copied().collect(), "{chunk}");
    }
    let text_ids: BTreeSet<_> = chunks.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(text_ids.len(), 1, "one text part");
    assert_eq!(answer.text(), "你好!");
    assert_eq!(chunks[8]["finishReason"], "stop");
    // The charge goes in the finish chunk's metadata (the upstream's usage: 9 + 3).
    assert_eq!(chunks[8]["messageMetadata"], json!({"tokensCharged": 12}));
    assert_eq!(
        answer.metadata(),
        json!({"source": "llm", "model": "gpt-4o-mini"})
    );
    assert_ne!(
        chunks[0]["messageId"],
        again.chunks()[0]["messageId"],
        "a fresh message id per answer"
    );
    let sent: Value =
        serde_json::from_slice(&server.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(sent["stream"], true);
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "You are the test assistant."}, {"role": "user", "content": "hi"}])
    );
}

#[tokio::test]
async fn history_with_assistant_parts_reaches_the_model_as_text() {
    let server = upstream().await;
    completions()
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(llm_fake::sse(&["Paris."]), "text/event-stream"),
        )
        .mount(&server)
        .await;
    let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |_| {}).await;

    let answer = app
        .ask_ui(use_chat(
            vec![
                user("u1", "Capital of Italy?"),
                assistant("a1", "Rome."),
                json!({"id": "u2", "role": "user", "parts": [{"type": "text", "text": "And "}, {"type": "text", "text": "France?"}]}),
            ],
            "submit-message",
        ))
        .await;

    assert_eq!(answer.text(), "Paris.");
    let sent: Value =
        serde_json::from_slice(&server.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "You are the test assistant."},
            {"role": "user", "content": "Capital of Italy?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "And France?"},
        ])
    );
}

#[tokio::test]
async fn regenerate_answers_again_without_the_last_answer_and_without_the_cache() {
    let server = upstream().await;
    completions()
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(llm_fake::sse(&["first try"]), "text/event-stream"),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    completions()
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(llm_fake::sse(&["second try"]), "text/event-stream"),
        )
        .mount(&server)
        .await;
    let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |_| {}).await;
    let question = || user("u1", "Tell me a joke");

    let first = app
        .ask_ui(use_chat(vec![question()], "submit-message"))
        .await;
    let regenerated = app
        .ask_ui(use_chat(
            vec![question(), assistant("a1", "first try")],
            "regenerate-message",
        ))
        .await;
    // What the SDK itself sends for a regenerate: the answer already gone, its id in messageId.
    let sdk_shape = app
        .ask_ui(json!({"id": "chat-4f1c", "messages": [question()], "trigger": "regenerate-message", "messageId": "a2"}))
        .await;
    let submitted_again = app
        .ask_ui(use_chat(vec![question()], "submit-message"))
        .await;

    assert_eq!(
        (first.text(), first.metadata()["source"].clone()),
        ("first try".into(), json!("llm"))
    );
    assert_eq!(
        (regenerated.text(), regenerated.metadata()["source"].clone()),
        ("second try".into(), json!("llm")),
        "a regenerate is never served from the cache"
    );
    assert_eq!(sdk_shape.metadata()["source"], "llm");
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 3);
    let sent: Value = serde_json::from_slice(&requests[1].body).unwrap();
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "You are the test assistant."}, {"role": "user", "content": "Tell me a joke"}]),
        "the last assistant message is dropped"
    );
    // The regenerated answer replaced the cached one.
    assert_eq!(
        (
            submitted_again.text(),
            submitted_again.metadata()["source"].clone()
        ),
        ("second try".into(), json!("cache"))
    );
}

#[tokio::test]
async fn cached_answer_streams_as_the_same_chunks() {
    let server = upstream().await;
    completions()
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(llm_fake::sse(&["Cached", " answer"]), "text/event-stream"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |_| {}).await;

    let first = app
        .ask_ui(use_chat(vec![user("u1", "Say hello")], "submit-message"))
        .await;
    let second = app
        .ask_ui(use_chat(vec![user("u9", "  Say hello ")], "submit-message"))
        .await;
    // The OpenAI format shares the cache: same conversation, same answer.
    let openai = app
        .send(
            FunctionUrlRequest::post(
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "Say hello"}]})
                    .to_string()
                    .as_bytes(),
            )
            .bearer(&app.token()),
        )
        .await;

    assert_eq!(first.metadata()["source"], "llm");
    assert_eq!(
        (second.source(), second.text()),
        ("cache", "Cached answer".to_owned())
    );
    assert_eq!(
        second.metadata(),
        json!({"source": "cache", "model": "gpt-4o-mini"})
    );
    assert_eq!(
        second.types(),
        [
            "start",
            "start-step",
            "text-start",
            "text-delta",
            "text-end",
            "finish-step",
            "finish"
        ]
    );
    assert_eq!(
        openai.json()["choices"][0]["message"]["content"],
        "Cached answer"
    );
    assert_eq!(app.metric_total("CacheHits"), 2.0);
}

#[tokio::test]
async fn fallback_answers_stream_complete_and_say_they_are_automatic() {
    let server = upstream().await;
    completions()
        .respond_with(ResponseTemplate::new(500).set_body_json(llm_fake::error(
            "The server had an error",
            "server_error",
            "server_error",
        )))
        .mount(&server)
        .await;
    let failing = spawn_app_with(Some(&format!("{}/v1", server.uri())), |_| {}).await;
    let keyless = spawn_app_with(None, |_| {}).await;

    let after_5xx = failing
        .ask_ui(use_chat(
            vec![user("u1", "How much is the full report?")],
            "submit-message",
        ))
        .await;
    let no_key = keyless
        .ask_ui(use_chat(
            vec![user("u1", "我想购买完整报告")],
            "submit-message",
        ))
        .await;

    assert_eq!((after_5xx.status, after_5xx.source()), (200, "rules"));
    assert_eq!(after_5xx.headers[chat::FALLBACK_HEADER], "upstream_5xx");
    assert_eq!(
        after_5xx.metadata(),
        json!({"source": "rules", "fallbackReason": "upstream_5xx", "model": "gpt-4o-mini"})
    );
    assert!(after_5xx.text().contains("one-time purchase"));
    assert_eq!(after_5xx.types().last().unwrap(), "finish");
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        3,
        "retried first"
    );
    assert_eq!(no_key.metadata()["fallbackReason"], "no_api_key");
    assert!(no_key.text().contains("完整报告为一次性购买"));
    assert_eq!(cached_rows(&failing).await, 0, "fallbacks are never cached");
}

#[tokio::test]
async fn stream_that_breaks_after_the_first_chunk_ends_with_an_error_chunk() {
    let events: Vec<String> = llm_fake::sse(&["partial ", "answer", "never sent"])
        .split_inclusive("\n\n")
        .take(3)
        .map(str::to_owned)
        .collect();
    let base = llm_fake::stalling_stream(events, Duration::from_secs(30)).await;
    let app = spawn_app_with(Some(&base), |_| {}).await;

    let started = Instant::now();
    let answer = app
        .ask_ui(use_chat(vec![user("u1", "hi")], "submit-message"))
        .await;

    assert!(started.elapsed() < Duration::from_secs(3), "never hangs");
    assert_eq!((answer.status, answer.source()), (200, "llm"));
    assert_eq!(
        answer.types(),
        [
            "start",
            "start-step",
            "text-start",
            "text-delta",
            "text-delta",
            "error"
        ]
    );
    assert_eq!(answer.text(), "partial answer");
    let error = answer.chunks().pop().unwrap();
    assert_eq!(keys(&error), ["errorText", "type"].into_iter().collect());
    assert!(error["errorText"]
        .as_str()
        .unwrap()
        .contains("stream_stalled"));
    assert_eq!(app.metric_total("StreamInterrupted"), 1.0);
    assert_eq!(cached_rows(&app).await, 0, "a broken answer is not cached");
}

#[tokio::test]
async fn errors_before_the_stream_are_the_usual_json_errors() {
    let app = spawn_app_with(None, |c| {
        c.rate_limit_per_min = 3;
        c.limits.max_messages = 3;
        c.limits.max_message_chars = 50;
    })
    .await;
    let ok = use_chat(vec![user("u1", "hi")], "submit-message");
    let file = json!({"id": "u1", "role": "user", "parts": [{"type": "text", "text": "see"},
        {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AAAA"}]});
    let tool = json!({"id": "a1", "role": "assistant", "parts": [{"type": "tool-weather",
        "toolCallId": "call_1", "state": "output-available", "input": {}, "output": {}}]});
    let post = |body: &Value| FunctionUrlRequest::post("/", body.to_string().as_bytes());
    let cases = [
        (post(&ok), 401, "missing_token"),
        (post(&ok).bearer("not-a-token"), 401, "invalid_token"),
        (post(&use_chat(vec![file], "submit-message")).bearer(&app.token()), 400, "non_text_content"),
        (post(&use_chat(vec![user("u", "x"), tool, user("u2", "y")], "submit-message")).bearer(&app.token()), 400, "non_text_content"),
        (post(&json!({"id": "c", "messages": [user("u", "x")], "trigger": "submit-message", "tools": {}})).bearer(&app.token()), 400, "unknown_field"),
        (post(&use_chat(vec![user("u", "x")], "resume-stream")).bearer(&app.token()), 400, "invalid_parameter"),
        (post(&use_chat(vec![user("u", "x"); 4], "submit-message")).bearer(&app.token()), 400, "too_many_messages"),
        (post(&use_chat(vec![user("u", &"x".repeat(51))], "submit-message")).bearer(&app.token()), 400, "message_too_long"),
        (post(&use_chat(vec![user("u", "x")], "submit-message")).bearer(&app.token()).header("content-type", "text/plain"), 415, "unsupported_media_type"),
        // A useChat body on an OpenAI path is an OpenAI request, as before.
        (FunctionUrlRequest::post("/v1/chat/completions", ok.to_string().as_bytes()).bearer(&app.token()), 400, "unknown_field"),
    ];
    for (request, status, code) in cases {
        let answer = app.send(request).await;
        assert_eq!(
            (answer.status, answer.json()["error"]["code"].as_str()),
            (status, Some(code)),
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        assert!(answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
    }
    let large = json!({"id": "c", "messages": [user("u", &"x".repeat(70 * 1024))], "trigger": "submit-message"});
    assert_eq!(app.ask_ui(large).await.status, 413);
    for _ in 0..3 {
        assert_eq!(app.ask_ui(ok.clone()).await.status, 200);
    }
    let limited = app.ask_ui(ok).await;
    assert_eq!(
        (limited.status, limited.json()["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    assert!(limited.headers.contains_key("retry-after"));
}

#[tokio::test]
async fn resume_probe_answers_204() {
    let app = spawn_app_with(None, |_| {}).await;

    let probe = app
        .send(FunctionUrlRequest::get("/chat-4f1c/stream", "").bearer(&app.token()))
        .await;
    let anonymous = app
        .send(FunctionUrlRequest::get("/chat-4f1c/stream", ""))
        .await;
    let posted = app
        .send(FunctionUrlRequest::post("/chat-4f1c/stream", b"{}").bearer(&app.token()))
        .await;

    assert_eq!((probe.status, probe.body.len()), (204, 0));
    assert_eq!(
        anonymous.status, 204,
        "nothing to hide: no stream is ever kept"
    );
    assert_eq!(
        (posted.status, posted.json()["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}
