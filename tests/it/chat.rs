//! The chat function against the real PostgreSQL and faked OpenAI-compatible upstreams.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat::conversation::Limits;
use chat::rules::RuleBook;
use serde_json::{json, Value};
use shared::auth::AuthConfig;
use shared::config::{Secret, StoreConfig};
use shared::retry::RetryPolicy;
use shared::store::Store;
use testkit::apps;
use testkit::db::TestDb;
use testkit::fixtures::FunctionUrlRequest;
use testkit::llm_fake;
use testkit::tokens;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

pub(crate) const JWT_SECRET: &str = "chat-tests-jwt-secret-at-least-32-characters";
const OPENAI_KEY: &str = "sk-test-openai-key-for-tests";

fn config(db_url: &str, base_url: Option<&str>) -> chat::Config {
    chat::Config {
        store: StoreConfig::Postgres {
            url: Secret::new(db_url),
            ca_pem: None,
        },
        auth: AuthConfig {
            hs256_secret: Some(Secret::new(JWT_SECRET)),
            supabase_url: None,
            jwks_refetch_floor: Duration::from_secs(30),
        },
        openai_key: base_url.map(|_| Secret::new(OPENAI_KEY)),
        openai_base_url: base_url.unwrap_or("http://127.0.0.1:9").to_owned(),
        cap_field: chat::CapField::MaxCompletionTokens,
        fallback: None,
        timeout: Duration::from_millis(800),
        backoff: RetryPolicy {
            max_retries: 2,
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(1500),
        },
        first_token_timeout: Duration::from_millis(800),
        idle_timeout: Duration::from_millis(300),
        total_budget: Duration::from_secs(5),
        deadline_reserve: Duration::from_millis(500),
        limits: Limits {
            max_messages: 20,
            max_message_chars: 2000,
            max_total_chars: 8000,
            max_tokens: 256,
            allow_client_system: false,
            models: vec!["gpt-4o-mini".into(), "gpt-4o".into()],
            default_model: "gpt-4o-mini".into(),
        },
        system_prompt: "You are the test assistant.".into(),
        rate_limit_per_min: 1000,
        budgets: chat::budget::Budgets::default(),
        cache_ttl_s: 3600,
        max_body_bytes: 64 * 1024,
        rules: RuleBook::embedded(),
    }
}

pub(crate) struct App {
    pub(crate) db: TestDb,
    state: Arc<chat::State>,
    metrics: Arc<Mutex<Vec<String>>>,
    pub(crate) user: String,
}

pub(crate) async fn spawn_app_with(
    base_url: Option<&str>,
    tweak: impl FnOnce(&mut chat::Config),
) -> App {
    let db = TestDb::new().await;
    let sql = db.client().await;
    let user = db.create_user(&sql).await.to_string();
    let mut config = config(&db.url, base_url);
    tweak(&mut config);
    let (state, lines) = apps::chat_state(config, Store::postgres(&db.url, 2).unwrap());
    App {
        db,
        state: Arc::new(state),
        metrics: lines,
        user,
    }
}

pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub(crate) fn source(&self) -> &str {
        self.headers
            .get(chat::SOURCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The `data:` payloads of an event stream.
    pub(crate) fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: ").map(str::to_owned))
            .collect()
    }

    fn streamed_text(&self) -> String {
        self.events()
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    }
}

impl App {
    async fn ask(&self, body: Value) -> Answer {
        self.send(
            FunctionUrlRequest::post("/v1/chat/completions", body.to_string().as_bytes()).bearer(
                &tokens::hs256(
                    &tokens::user_claims(&self.user, None),
                    JWT_SECRET.as_bytes(),
                ),
            ),
        )
        .await
    }

    pub(crate) async fn send(&self, request: FunctionUrlRequest) -> Answer {
        let response = match request.into_request() {
            Ok(request) => chat::handle(self.state.clone(), request).await,
            Err(response) => {
                response.map(|b| shared::lambda::StreamBody::full(b.as_ref().to_vec()))
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await;
        Answer {
            status,
            headers,
            body,
        }
    }

    pub(crate) fn metric_total(&self, name: &str) -> f64 {
        self.metrics
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|d| d.get(name).and_then(Value::as_f64))
            .sum()
    }
}

fn hello() -> Value {
    json!({"messages": [{"role": "user", "content": "Say hello"}]})
}

pub(crate) async fn upstream() -> MockServer {
    MockServer::start().await
}

pub(crate) fn completions() -> wiremock::MockBuilder {
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header(
            "authorization",
            format!("Bearer {OPENAI_KEY}").as_str(),
        ))
}

#[tokio::test]
async fn llm_answer_in_openai_format_with_source() {
    let server = upstream().await;
    completions()
        .respond_with(
            ResponseTemplate::new(200).set_body_json(llm_fake::completion("Hello there!")),
        )
        .expect(1)
        .mount(&server)
        .await;
    let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |_| {}).await;

    let answer = app.ask(hello()).await;

    assert_eq!(answer.status, 200);
    assert_eq!(answer.source(), "llm");
    let body = answer.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello there!");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["total_tokens"], 19);
    assert_eq!(body["x_source"], "llm");
    assert_eq!(body["model"], "gpt-4o-mini");
    // The server's system prompt went first; the token cap was applied.
    let sent: Value =
        serde_json::from_slice(&server.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "You are the test assistant."})
    );
    assert_eq!(sent["messages"][1]["content"], "Say hello");
    // In the field the server chose (LLM_MAX_TOKENS_FIELD), whatever the client sent.
    assert_eq!(sent["max_completion_tokens"], 256);
    assert!(sent.get("max_tokens").is_none());
    assert_eq!(sent["stream"], false);
    let usage = app
        .db
        .client()
        .await
        .query_one(
            "select prompt_tokens, completion_tokens, llm_answers from chat_usage",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            usage.get::<_, i64>(0),
            usage.get::<_, i64>(1),
            usage.get::<_, i32>(2)
        ),
        (12, 7, 1)
    );
    assert_eq!(app.metric_total("PromptTokens"), 12.0);
}

#[tokio::test]
async fn second_identical_question_is_a_cache_hit_without_upstream_call() {
    let server = upstream().await;
    completions()
        .respond_with(
            ResponseTemplate::new(200).set_body_json(llm_fake::completion("Cached answer")),
        )
        .expect(1)
        .mount(&server)
        .await;
    let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |_| {}).await;

    let first = app.ask(hello()).await;
    let second = app
        .ask(json!({"messages": [{"role": "user", "content": "  Say hello  "}]}))
        .await;
    let streamed = app
        .ask(json!({"messages": [{"role": "user", "content": "Say hello"}], "stream": true}))
        .await;

    assert_eq!(first.source(), "llm");
    assert_eq!(second.source(), "cache");
    assert_eq!(
        second.json()["choices"][0]["message"]["content"],
        "Cached answer"
    );
    assert_eq!(second.json()["x_source"], "cache");
    assert_eq!(
        streamed.source(),
        "cache",
        "a stream may be served from the cache too"
    );
    assert_eq!(streamed.streamed_text(), "Cached answer");
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    assert_eq!(app.metric_total("CacheHits"), 2.0);
}

#[tokio::test]
async fn hanging_upstream_falls_back_to_rules_within_the_deadline() {
    let server = upstream().await;
    completions()
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(llm_fake::completion("late"))
                .set_delay(Duration::from_secs(30)),
        )
        .mount(&server)
        .await;
    let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |c| {
        c.timeout = Duration::from_millis(300);
        c.total_budget = Duration::from_millis(1500);
    })
    .await;

    let started = Instant::now();
    let answer = app
        .ask(json!({"messages": [{"role": "user", "content": "How much is the full report?"}]}))
        .await;

    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered within the budget ({:?})",
        started.elapsed()
    );
    assert_eq!(answer.status, 200);
    assert_eq!(answer.source(), "rules");
    assert_eq!(answer.headers[chat::FALLBACK_HEADER], "timeout");
    let body = answer.json();
    assert!(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("one-time purchase"));
    assert_eq!(body["x_fallback_reason"], "timeout");
    assert!(app.metric_total("Timeouts") >= 1.0);
}

#[tokio::test]
async fn rate_limited_upstream_is_retried_after_retry_after() {
    let server = upstream().await;
    completions()
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "1")
                .set_body_json(llm_fake::error(
                    "Rate limit reached",
                    "requests",
                    "rate_limit_exceeded",
                )),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    completions()
        .respond_with(
            ResponseTemplate::new(200).set_body_json(llm_fake::completion("after the wait")),
        )
        .mount(&server)
        .await;
    let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |_| {}).await;

    let started = Instant::now();
    let answer = app.ask(hello()).await;

    assert_eq!(answer.source(), "llm");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited as Retry-After asked"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
    assert_eq!(app.metric_total("Retries"), 1.0);
}

#[tokio::test]
async fn three_5xx_fall_back_after_exactly_two_retries() {
    let server = upstream().await;
    completions()
        .respond_with(ResponseTemplate::new(500).set_body_json(llm_fake::error(
            "The server had an error",
            "server_error",
            "server_error",
        )))
        .mount(&server)
        .await;
    let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |_| {}).await;

    let answer = app.ask(hello()).await;

    assert_eq!((answer.status, answer.source()), (200, "rules"));
    assert_eq!(answer.headers[chat::FALLBACK_HEADER], "upstream_5xx");
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
    assert_eq!(app.metric_total("Retries"), 2.0);
}

#[tokio::test]
async fn client_errors_and_a_bad_key_are_not_retried() {
    for (status, reason) in [
        (400u16, "upstream_4xx"),
        (401, "auth"),
        (403, "auth"),
        (404, "upstream_4xx"),
    ] {
        let server = upstream().await;
        completions()
            .respond_with(ResponseTemplate::new(status).set_body_json(llm_fake::error(
                "no",
                "invalid_request_error",
                "x",
            )))
            .mount(&server)
            .await;
        let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |_| {}).await;

        let answer = app.ask(hello()).await;

        assert_eq!(
            (
                answer.source(),
                answer.headers[chat::FALLBACK_HEADER].to_str().unwrap()
            ),
            ("rules", reason),
            "{status}"
        );
        assert_eq!(
            server.received_requests().await.unwrap().len(),
            1,
            "{status} is never retried"
        );
        if reason == "auth" {
            assert_eq!(app.metric_total("UpstreamAuthErrors"), 1.0);
        }
    }
}

#[tokio::test]
async fn malformed_upstream_json_falls_back() {
    let server = upstream().await;
    completions()
        .respond_with(
            ResponseTemplate::new(200).set_body_raw("{\"choices\": [", "application/json"),
        )
        .mount(&server)
        .await;
    let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |_| {}).await;
    let answer = app.ask(hello()).await;
    assert_eq!(
        (
            answer.source(),
            answer.headers[chat::FALLBACK_HEADER].to_str().unwrap()
        ),
        ("rules", "invalid_response")
    );
}

#[tokio::test]
async fn no_api_key_answers_from_rules_in_chinese_and_english() {
    let app = spawn_app_with(None, |_| {}).await;
    for (question, expect) in [
        ("我想购买完整报告，多少钱？", "完整报告为一次性购买"),
        ("I was charged twice!", "never charged twice"),
        ("你好", "您好"),
    ] {
        let answer = app
            .ask(json!({"messages": [{"role": "user", "content": question}]}))
            .await;
        assert_eq!((answer.status, answer.source()), (200, "rules"));
        assert_eq!(answer.headers[chat::FALLBACK_HEADER], "no_api_key");
        let content = answer.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(content.contains(expect), "{question} -> {content}");
    }
    assert_eq!(
        app.db
            .client()
            .await
            .query_one("select count(*) from chat_cache", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0,
        "fallbacks are never cached"
    );
}

#[tokio::test]
async fn streamed_llm_answer_ends_with_done() {
    let server = upstream().await;
    completions()
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(llm_fake::sse(&["你", "好", "!"]), "text/event-stream"),
        )
        .mount(&server)
        .await;
    let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |_| {}).await;

    let answer = app.ask(json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true}})).await;

    assert_eq!((answer.status, answer.source()), (200, "llm"));
    assert!(answer.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(answer.streamed_text(), "你好!");
    let events = answer.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 3);
    let sent: Value =
        serde_json::from_slice(&server.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(
        (
            sent["stream"].clone(),
            sent["stream_options"]["include_usage"].clone()
        ),
        (json!(true), json!(true))
    );
    // Recorded for the cache once the stream finished.
    let again = app
        .ask(json!({"messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(again.source(), "cache");
    assert_eq!(again.json()["choices"][0]["message"]["content"], "你好!");
}

#[tokio::test]
async fn stream_that_stalls_midway_ends_with_an_error_event() {
    let events: Vec<String> = llm_fake::sse(&["partial ", "answer", "never sent"])
        .split_inclusive("\n\n")
        .take(3)
        .map(str::to_owned)
        .collect();
    let base = llm_fake::stalling_stream(events, Duration::from_secs(30)).await;
    let app = spawn_app_with(Some(&base), |_| {}).await;

    let started = Instant::now();
    let answer = app
        .ask(json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .await;

    assert!(
        started.elapsed() < Duration::from_secs(3),
        "never hangs ({:?})",
        started.elapsed()
    );
    assert_eq!((answer.status, answer.source()), (200, "llm"));
    assert_eq!(answer.streamed_text(), "partial answer");
    let events = answer.events();
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "stream_stalled");
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(app.metric_total("StreamInterrupted"), 1.0);
    assert_eq!(
        app.db
            .client()
            .await
            .query_one("select count(*) from chat_cache", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0,
        "a broken answer is not cached"
    );
}

#[tokio::test]
async fn stream_without_a_first_token_is_retried_then_falls_back() {
    let base = llm_fake::stalling_stream(vec![], Duration::from_secs(30)).await;
    let app = spawn_app_with(Some(&base), |c| {
        c.first_token_timeout = Duration::from_millis(200)
    })
    .await;

    let answer = app
        .ask(json!({"messages": [{"role": "user", "content": "refund please"}], "stream": true}))
        .await;

    assert_eq!((answer.status, answer.source()), (200, "rules"));
    assert_eq!(answer.headers[chat::FALLBACK_HEADER], "timeout");
    assert!(answer.streamed_text().contains("Refunds"));
    assert_eq!(answer.events().last().unwrap(), "[DONE]");
    assert_eq!(app.metric_total("Retries"), 2.0);
}

#[tokio::test]
async fn impossible_invocation_deadline_is_ignored() {
    // cargo lambda watch hands every invocation a deadline in 1970.
    let server = upstream().await;
    completions()
        .respond_with(ResponseTemplate::new(200).set_body_json(llm_fake::completion("ok")))
        .mount(&server)
        .await;
    let app = spawn_app_with(Some(&format!("{}/v1", server.uri())), |_| {}).await;
    let mut request = FunctionUrlRequest::post("/", hello().to_string().as_bytes())
        .bearer(&tokens::hs256(
            &tokens::user_claims(&app.user, None),
            JWT_SECRET.as_bytes(),
        ))
        .into_request()
        .unwrap();
    let mut context = lambda_http::Context::default();
    context.deadline = 1_000;
    request.extensions_mut().insert(context);

    let deadline = chat::deadline_for(&request, &app.state.config, app.state.clock);
    let response = chat::handle(app.state.clone(), request).await;

    assert!(
        deadline > Instant::now() + Duration::from_secs(4),
        "the configured budget applies"
    );
    assert_eq!(response.headers()[chat::SOURCE_HEADER], "llm");
}

#[tokio::test]
async fn near_invocation_deadline_shortens_the_budget() {
    let app = spawn_app_with(None, |_| {}).await;
    let mut request = FunctionUrlRequest::post("/", b"{}").into_request().unwrap();
    let mut context = lambda_http::Context::default();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    context.deadline = now_ms + 3_000;
    request.extensions_mut().insert(context);
    let deadline = chat::deadline_for(&request, &app.state.config, app.state.clock);
    let left = deadline.saturating_duration_since(Instant::now());
    assert!(
        left <= Duration::from_millis(2_600) && left >= Duration::from_millis(2_000),
        "{left:?}"
    );
}

#[tokio::test]
async fn chat_is_rate_limited_per_user() {
    let app = spawn_app_with(None, |c| c.rate_limit_per_min = 2).await;
    assert_eq!(app.ask(hello()).await.status, 200);
    assert_eq!(app.ask(hello()).await.status, 200);
    let limited = app.ask(hello()).await;
    assert_eq!(
        (limited.status, limited.json()["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    assert!(limited.headers.contains_key("retry-after"));
}

#[tokio::test]
async fn bad_requests_and_missing_tokens_are_clear_4xx() {
    let app = spawn_app_with(None, |_| {}).await;
    let token = tokens::hs256(&tokens::user_claims(&app.user, None), JWT_SECRET.as_bytes());
    let post = |path: &str, body: &[u8]| FunctionUrlRequest::post(path, body).bearer(&token);
    let cases = [
        (FunctionUrlRequest::post("/v1/chat/completions", hello().to_string().as_bytes()), 401, "missing_token"),
        (post("/v1/chat/completions", b"{not json"), 400, "invalid_json"),
        (post("/v1/chat/completions", br#"{"messages":[{"role":"system","content":"x"},{"role":"user","content":"y"}]}"#), 400, "system_message_not_allowed"),
        (post("/v1/chat/completions", br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#), 400, "non_text_content"),
        (post("/v1/chat/completions", br#"{"model":"o1-pro","messages":[{"role":"user","content":"y"}]}"#), 400, "model_not_allowed"),
        (post("/v1/chat/completions", br#"{"messages":[{"role":"user","content":"y"}],"functions":[]}"#), 400, "unknown_field"),
        (post("/v1/embeddings", hello().to_string().as_bytes()), 404, "not_found"),
        (post("/", hello().to_string().as_bytes()).method("GET"), 405, "method_not_allowed"),
        (post("/", hello().to_string().as_bytes()).header("content-type", "text/plain"), 415, "unsupported_media_type"),
        (post("/", &vec![b' '; 70 * 1024]), 413, "body_too_large"),
    ];
    for (request, status, code) in cases {
        let answer = app.send(request).await;
        assert_eq!(
            (answer.status, answer.json()["error"]["code"].as_str()),
            (status, Some(code))
        );
    }
    for path in ["/", "/chat/completions", "/v1/chat/completions/"] {
        assert_eq!(
            app.send(post(path, hello().to_string().as_bytes()))
                .await
                .status,
            200,
            "{path}"
        );
    }
}

#[test]
fn config_defaults_rules_path_and_production_rules() {
    let read = |vars: Vec<(&'static str, String)>| {
        chat::Config::read(shared::config::EnvReader::new(move |k| {
            vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        }))
    };
    let base = || {
        vec![
            ("DATABASE_URL", "postgres://u@127.0.0.1/x".to_owned()),
            ("SUPABASE_JWT_SECRET", "s".to_owned()),
        ]
    };
    let config = read(base()).unwrap();
    assert!(
        config.openai_key.is_none(),
        "no key: rules only, the local default"
    );
    assert_eq!(config.timeout, Duration::from_millis(30_000));
    assert_eq!(config.backoff.max_retries, 2);
    assert_eq!(config.limits.models, ["gpt-4o-mini"]);

    let dir = std::env::temp_dir().join(format!("rules-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&dir, r#"{"default_reply": "custom default", "rules": [{"name": "x", "patterns": ["退款"], "reply": "custom refund"}]}"#).unwrap();
    let mut vars = base();
    vars.push(("CHAT_RULES_PATH", dir.to_string_lossy().into_owned()));
    let custom = read(vars).unwrap();
    assert_eq!(custom.rules.answer("我要退款").reply, "custom refund");
    assert_eq!(custom.rules.answer("anything").reply, "custom default");
    std::fs::remove_file(&dir).ok();

    let mut vars = base();
    vars.push(("CHAT_RULES_PATH", "/nonexistent/rules.json".to_owned()));
    vars.push(("LLM_MAX_RETRIES", "9".to_owned()));
    let err = read(vars).unwrap_err();
    let names: Vec<_> = err.problems.iter().map(|p| p.variable).collect();
    assert_eq!(names, ["LLM_MAX_RETRIES", "CHAT_RULES_PATH"]);

    let mut prod = base();
    prod.push(("APP_ENV", "production".to_owned()));
    assert_eq!(
        read(prod.clone()).unwrap_err().problems[0].variable,
        "OPENAI_API_KEY"
    );
    prod.push(("CHAT_RULES_ONLY", "true".to_owned()));
    assert!(read(prod).is_ok(), "rules only, on purpose");
}
