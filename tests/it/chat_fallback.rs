//! The second model (`LLM_FALLBACK_*`) and what every answer says about itself: who answered
//! (`x-chat-source`, `useChat`'s `messageMetadata`), what it was charged, and the limits
//! (`RateLimit-Policy`, `RateLimit`). The harness is `chat_ceilings`'.

use std::time::Duration;

use serde_json::{json, Value};
use testkit::llm_fake;
use wiremock::matchers::{body_partial_json, header, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::chat_ceilings::{fleet, use_chat, Answer, Fleet};

const FALLBACK_KEY: &str = "sk-fallback-key";
const FALLBACK_MODEL: &str = "backup-model-1";

/// A fallback upstream answering `text` (usage 12 + 7), or a stream of it.
async fn fallback_server(text: &'static str) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header(
            "authorization",
            format!("Bearer {FALLBACK_KEY}").as_str(),
        ))
        .and(body_partial_json(
            json!({"model": FALLBACK_MODEL, "stream": true}),
        ))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(llm_fake::sse(&[text]), "text/event-stream"),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(header(
            "authorization",
            format!("Bearer {FALLBACK_KEY}").as_str(),
        ))
        .and(body_partial_json(json!({"model": FALLBACK_MODEL})))
        .respond_with(ResponseTemplate::new(200).set_body_json(llm_fake::completion(text)))
        .mount(&server)
        .await;
    server
}

async fn with_fallback(
    primary: &str,
    fallback: &MockServer,
    vars: &[(&'static str, &str)],
) -> Fleet {
    let fallback_base = format!("{}/v1", fallback.uri());
    let mut all: Vec<(&'static str, &str)> = vec![
        ("LLM_FALLBACK_BASE_URL", fallback_base.as_str()),
        ("LLM_FALLBACK_API_KEY", FALLBACK_KEY),
        ("LLM_FALLBACK_MODEL", FALLBACK_MODEL),
        ("LLM_TIMEOUT_MS", "300"),
        ("LLM_MAX_RETRIES", "1"),
        ("CHAT_DAILY_TOKEN_BUDGET", "100000"),
        ("CHAT_MAX_TOKENS", "100"),
    ];
    all.extend_from_slice(vars);
    fleet(Some(primary), 1, &all).await
}

fn ui_chunks(answer: &Answer) -> Vec<Value> {
    answer
        .text()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[tokio::test]
async fn a_first_model_failing_before_its_first_token_hands_over_to_the_fallback() {
    let hanging = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(llm_fake::completion("late"))
                .set_delay(Duration::from_secs(5)),
        )
        .mount(&hanging)
        .await;
    let failing = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_json(llm_fake::error(
            "The engine is currently overloaded",
            "server_error",
            "server_error",
        )))
        .mount(&failing)
        .await;
    let limited = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "20")
                .set_body_json(llm_fake::error(
                    "Rate limit reached",
                    "requests",
                    "rate_limit_exceeded",
                )),
        )
        .mount(&limited)
        .await;
    let cases = [
        (format!("{}/v1", hanging.uri()), "timeout", 1),
        (format!("{}/v1", failing.uri()), "upstream_5xx", 2),
        (format!("{}/v1", limited.uri()), "rate_limited", 1),
        ("http://127.0.0.1:9/v1".to_owned(), "connect", 0),
    ];
    for (primary, reason, primary_attempts) in cases {
        let fallback = fallback_server("from the backup").await;
        let app = with_fallback(&primary, &fallback, &[]).await;
        let user = app.user().await;

        let plain = app.ask(0, &user, "hello there").await;
        let streamed = app.send(0, &user, "/", &use_chat("hello again")).await;

        assert_eq!(
            (plain.status, plain.source()),
            (200, "fallback"),
            "{reason}"
        );
        assert_eq!(plain.header(chat::FALLBACK_HEADER), reason);
        let body = plain.json();
        assert_eq!(
            (
                body["choices"][0]["message"]["content"].clone(),
                body["model"].clone(),
                body["x_source"].clone()
            ),
            (
                json!("from the backup"),
                json!(FALLBACK_MODEL),
                json!("fallback")
            ),
            "{reason}"
        );
        assert_eq!(streamed.source(), "fallback");
        let chunks = ui_chunks(&streamed);
        assert_eq!(
            chunks[0]["messageMetadata"],
            json!({"source": "fallback", "fallbackReason": reason, "model": FALLBACK_MODEL}),
            "{reason}"
        );
        assert_eq!(fallback.received_requests().await.unwrap().len(), 2);
        // Every attempt that reached an upstream was paid for, the fallback's too.
        let row = app
            .db
            .client()
            .await
            .query_one(
                "select fallback_answers, llm_answers, upstream_attempts, failed_attempts \
                 from chat_usage where user_id = $1::text::uuid",
                &[&user],
            )
            .await
            .unwrap();
        assert_eq!(
            (
                row.get::<_, i32>(0),
                row.get::<_, i32>(1),
                row.get::<_, i32>(2),
                row.get::<_, i32>(3)
            ),
            (2, 0, 2 * (primary_attempts + 1), 2 * primary_attempts),
            "{reason}"
        );
        assert_eq!(app.metric_total("FallbackModelTries"), 2.0);
    }
}

#[tokio::test]
async fn a_request_the_first_model_refuses_goes_to_the_rules_not_the_fallback() {
    let refusing = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(llm_fake::error(
            "This model's maximum context length is exceeded",
            "invalid_request_error",
            "context_length_exceeded",
        )))
        .mount(&refusing)
        .await;
    let fallback = fallback_server("never").await;
    let app = with_fallback(&format!("{}/v1", refusing.uri()), &fallback, &[]).await;
    let user = app.user().await;

    let answer = app.ask(0, &user, "refund please").await;

    assert_eq!((answer.status, answer.source()), (200, "rules"));
    assert_eq!(answer.header(chat::FALLBACK_HEADER), "upstream_4xx");
    assert!(fallback.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_stream_broken_mid_answer_ends_with_its_error_never_on_the_fallback() {
    let events: Vec<String> = llm_fake::sse(&["half an ", "answer", "never sent"])
        .split_inclusive("\n\n")
        .take(3)
        .map(str::to_owned)
        .collect();
    let base = llm_fake::stalling_stream(events, Duration::from_secs(30)).await;
    let fallback = fallback_server("never").await;
    let app = with_fallback(&base, &fallback, &[]).await;
    let user = app.user().await;

    let openai = app
        .send(
            0,
            &user,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}),
        )
        .await;
    let ui = app.send(0, &user, "/", &use_chat("hi")).await;

    assert_eq!(openai.source(), "llm");
    assert!(
        openai.text().contains("stream_stalled"),
        "{}",
        openai.text()
    );
    assert!(openai.text().ends_with("data: [DONE]\n\n"));
    assert_eq!(ui.source(), "llm");
    let last = ui_chunks(&ui).pop().unwrap();
    assert_eq!(last["type"], "error");
    assert!(fallback.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn when_both_models_fail_the_rules_answer_with_the_first_ones_reason() {
    let failing = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_json(llm_fake::error(
            "boom",
            "server_error",
            "server_error",
        )))
        .mount(&failing)
        .await;
    let base = format!("{}/v1", failing.uri());
    let app = fleet(
        Some(&base),
        1,
        &[
            // The same server, another model: both fail.
            ("LLM_FALLBACK_MODEL", FALLBACK_MODEL),
            ("LLM_MAX_RETRIES", "0"),
            ("CHAT_MAX_TOKENS", "100"),
        ],
    )
    .await;
    let user = app.user().await;

    let answer = app.ask(0, &user, "how much is the report?").await;

    assert_eq!((answer.status, answer.source()), (200, "rules"));
    assert_eq!(answer.header(chat::FALLBACK_HEADER), "upstream_5xx");
    let models: Vec<Value> = failing
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["model"].clone())
        .collect();
    assert_eq!(
        models,
        [json!("gpt-4o-mini"), json!(FALLBACK_MODEL)],
        "the fallback's server and key default to the first model's"
    );
}

#[test]
fn fallback_configuration_is_checked_at_cold_start() {
    let read = |vars: &[(&'static str, &'static str)]| {
        let mut env = vec![
            ("DATABASE_URL", "postgres://u@127.0.0.1/x"),
            ("SUPABASE_JWT_SECRET", "s"),
        ];
        env.extend_from_slice(vars);
        chat::Config::read(shared::config::EnvReader::new(move |k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }))
    };
    let problems = |vars| match read(vars) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.iter().map(|p| p.variable).collect(),
    };
    assert_eq!(
        problems(&[
            ("OPENAI_API_KEY", "sk-a"),
            ("LLM_FALLBACK_BASE_URL", "https://b.example/v1")
        ]),
        ["LLM_FALLBACK_MODEL"],
        "a server without a model to ask"
    );
    assert_eq!(
        problems(&[("LLM_FALLBACK_MODEL", "m")]),
        ["LLM_FALLBACK_MODEL"],
        "a fallback without a first model"
    );
    assert_eq!(
        problems(&[
            ("OPENAI_API_KEY", "sk-a"),
            ("LLM_FALLBACK_MODEL", "m"),
            ("LLM_FALLBACK_BASE_URL", "ftp://b")
        ]),
        ["LLM_FALLBACK_BASE_URL"]
    );
    let config = read(&[("OPENAI_API_KEY", "sk-a"), ("LLM_FALLBACK_MODEL", "m")]).unwrap();
    let fallback = config.fallback.unwrap();
    assert_eq!(
        (
            fallback.base_url.as_str(),
            fallback.key.expose(),
            fallback.model.as_str()
        ),
        ("https://api.openai.com/v1", "sk-a", "m")
    );
    assert!(read(&[("OPENAI_API_KEY", "sk-a")])
        .unwrap()
        .fallback
        .is_none());
    let debug = format!(
        "{:?}",
        read(&[
            ("OPENAI_API_KEY", "sk-a"),
            ("LLM_FALLBACK_MODEL", "m"),
            ("LLM_FALLBACK_API_KEY", "sk-secret-fallback")
        ])
        .unwrap()
    );
    assert!(
        !debug.contains("sk-secret-fallback"),
        "the key is never printed"
    );
}

#[tokio::test]
async fn every_answer_carries_its_limits_and_a_cache_hit_says_it_was_free() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({"stream": true})))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(llm_fake::sse(&["a", "b"]), "text/event-stream"),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(llm_fake::completion("whole")))
        .mount(&server)
        .await;
    let app = fleet(
        Some(&format!("{}/v1", server.uri())),
        1,
        &[
            ("CHAT_RATE_LIMIT_PER_MIN", "10"),
            ("CHAT_DAILY_TOKEN_BUDGET", "5000"),
            ("CHAT_MAX_TOKENS", "100"),
            ("CHAT_CACHE_TTL_S", "600"),
        ],
    )
    .await;
    let user = app.user().await;

    let plain = app.ask(0, &user, "first").await;
    let cached = app.ask(0, &user, "first").await;
    let streamed = app
        .send(
            0,
            &user,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "second"}], "stream": true,
                "stream_options": {"include_usage": true}}),
        )
        .await;
    let ui = app.send(0, &user, "/", &use_chat("third")).await;

    let policy = "\"requests\";q=10;w=60, \"tokens\";q=5000;w=86400;qu=\"tokens\"";
    for (answer, remaining) in [(&plain, 9), (&cached, 8), (&streamed, 7), (&ui, 6)] {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("ratelimit-policy"), policy);
        let state = answer.header("ratelimit");
        assert!(
            state.starts_with(&format!("\"requests\";r={remaining};t=")),
            "{state}"
        );
        assert!(state.contains(", \"tokens\";r="), "{state}");
    }
    // The reservation of a request in flight is already out of what remains.
    assert_eq!(plain.source(), "llm");
    assert_eq!(plain.header(chat::CHARGED_HEADER), "19");
    assert_eq!(plain.json()["x_tokens_charged"], 19);
    assert_eq!(cached.source(), "cache");
    assert_eq!(cached.header(chat::CHARGED_HEADER), "0");
    assert_eq!(cached.json()["x_tokens_charged"], 0);
    assert_eq!(
        cached.json()["usage"]["total_tokens"],
        0,
        "this request cost nothing"
    );
    let finish: Value = streamed
        .text()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|c| c["choices"][0]["finish_reason"] == "stop")
        .unwrap();
    assert_eq!(finish["x_tokens_charged"], 11, "the usage chunk's 9 + 2");
    assert_eq!(
        ui_chunks(&ui).last().unwrap()["messageMetadata"],
        json!({"tokensCharged": 11})
    );
    assert_eq!(app.metric_total("CacheHits"), 1.0);
}

#[tokio::test]
async fn a_429_names_the_limit_what_remains_and_when_it_resets() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(llm_fake::Metered {
            delay: Duration::ZERO,
        })
        .mount(&server)
        .await;
    let app = fleet(
        Some(&format!("{}/v1", server.uri())),
        1,
        &[
            ("CHAT_RATE_LIMIT_PER_MIN", "2"),
            ("CHAT_DAILY_TOKEN_BUDGET", "250"),
            ("CHAT_MAX_TOKENS", "100"),
        ],
    )
    .await;
    let user = app.user().await;

    let first = app.ask(0, &user, "one").await;
    let tokens = app.ask(0, &user, "two").await;
    let requests = app.ask(0, &user, "three").await;

    assert_eq!(first.source(), "llm");
    assert_eq!(
        (tokens.status, tokens.code().as_str()),
        (429, "token_budget_exceeded")
    );
    let error = &tokens.json()["error"];
    assert_eq!(error["limit"], "tokens");
    assert_eq!(error["quota"], 250);
    let spent = error["spent"].as_u64().unwrap();
    assert_eq!(
        spent,
        3 + 31 + 7 + 100,
        "the first answer, as the fake bills it"
    );
    assert_eq!(error["remaining"], 250 - spent);
    assert!(error["requested"].as_u64().unwrap() > 250 - spent);
    assert_eq!(
        tokens.header("retry-after"),
        error["retry_after_s"].to_string()
    );
    assert!(tokens
        .header("ratelimit")
        .contains(&format!("\"tokens\";r={}", 250 - spent)));
    assert_eq!(
        (requests.status, requests.code().as_str()),
        (429, "rate_limited")
    );
    let error = &requests.json()["error"];
    assert_eq!(
        (
            error["limit"].clone(),
            error["quota"].clone(),
            error["remaining"].clone()
        ),
        (json!("requests"), json!(2), json!(0))
    );
    assert_eq!(
        requests.header("retry-after"),
        error["retry_after_s"].to_string()
    );
    assert!(requests
        .header("ratelimit")
        .starts_with("\"requests\";r=0;t="));
}
