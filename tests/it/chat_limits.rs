//! Chat cost ceilings and time rules: token budgets per user and UTC day (counted from the
//! upstream's usage, estimated when it reports none), anonymous sessions' smaller limits, stream
//! timeouts that default to `LLM_TIMEOUT_MS`, and a cache key no content can forge. Each app is
//! configured through `chat::Config::read`, as the function reads its environment.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use shared::store::Store;
use testkit::apps;
use testkit::db::TestDb;
use testkit::fixtures::FunctionUrlRequest;
use testkit::{llm_fake, tokens};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const JWT: &str = "chat-limits-jwt-secret-at-least-32-characters";
const SYSTEM_PROMPT: &str = "You are the test assistant.";

struct App {
    db: TestDb,
    state: Arc<chat::State>,
    metrics: Arc<Mutex<Vec<String>>>,
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn source(&self) -> &str {
        self.headers
            .get(chat::SOURCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn code(&self) -> String {
        serde_json::from_slice::<Value>(&self.body).unwrap_or(Value::Null)["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn spawn(upstream: Option<&str>, vars: &[(&'static str, &str)]) -> App {
    let db = TestDb::new().await;
    let mut env: Vec<(&'static str, String)> = vec![
        ("DATABASE_URL", db.url.clone()),
        ("SUPABASE_JWT_SECRET", JWT.to_owned()),
        ("CHAT_SYSTEM_PROMPT", SYSTEM_PROMPT.to_owned()),
        ("CHAT_RATE_LIMIT_PER_MIN", "1000".to_owned()),
        ("LLM_MAX_RETRIES", "0".to_owned()),
    ];
    if let Some(base) = upstream {
        env.push(("OPENAI_API_KEY", "sk-limits".to_owned()));
        env.push(("OPENAI_BASE_URL", base.to_owned()));
    }
    env.extend(vars.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let config = chat::Config::read(shared::config::EnvReader::new(move |k| {
        env.iter()
            .rev()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
    }))
    .unwrap();
    let (state, lines) = apps::chat_state(config, Store::postgres(&db.url, 2).unwrap());
    App {
        db,
        state: Arc::new(state),
        metrics: lines,
    }
}

impl App {
    async fn user(&self) -> String {
        self.db
            .create_user(&self.db.client().await)
            .await
            .to_string()
    }

    async fn ask_as(&self, user: &str, anonymous: bool, body: Value) -> Answer {
        let mut claims = tokens::user_claims(user, None);
        claims["is_anonymous"] = json!(anonymous);
        let request = FunctionUrlRequest::post("/v1/chat/completions", body.to_string().as_bytes())
            .bearer(&tokens::hs256(&claims, JWT.as_bytes()))
            .into_request()
            .unwrap();
        let response = chat::handle(self.state.clone(), request).await;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await;
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn ask(&self, user: &str, question: &str) -> Answer {
        self.ask_as(
            user,
            false,
            json!({"messages": [{"role": "user", "content": question}]}),
        )
        .await
    }

    /// (prompt_tokens, completion_tokens, estimated_answers, anonymous) of the user's UTC day.
    async fn usage(&self, user: &str) -> (i64, i64, i32, bool) {
        let row = self
            .db
            .client()
            .await
            .query_one(
                "select prompt_tokens, completion_tokens, estimated_answers, anonymous from chat_usage \
                 where user_id = $1::text::uuid and day = (now() at time zone 'utc')::date",
                &[&user],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    }

    fn metric_total(&self, name: &str) -> f64 {
        self.metrics
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|d| d.get(name).and_then(Value::as_f64))
            .sum()
    }
}

/// An upstream answering every request with `body` (19 tokens of usage in `llm_fake::completion`).
async fn upstream_answering(body: Value) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(body))
        .mount(&server)
        .await;
    server
}

fn seconds_to_utc_midnight() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    86_400 - now % 86_400
}

#[tokio::test]
async fn over_budget_is_429_until_the_next_utc_day_without_an_upstream_call() {
    let server = upstream_answering(llm_fake::completion("Hello!")).await;
    // Each question reserves its prompt bound (3 + the system prompt's 27 bytes + 4 + the
    // question's bytes + 4) plus CHAT_MAX_TOKENS (10): 62-63 tokens; each answer costs 19.
    let app = spawn(
        Some(&format!("{}/v1", server.uri())),
        &[("CHAT_DAILY_TOKEN_BUDGET", "90"), ("CHAT_MAX_TOKENS", "10")],
    )
    .await;
    let user = app.user().await;
    let other = app.user().await;

    let first = app.ask(&user, "first question").await;
    let second = app.ask(&user, "second question").await;
    let refused = app.ask(&user, "third question").await;
    let cached = app.ask(&user, "first question").await;
    let someone_else = app.ask(&other, "third question").await;

    assert_eq!((first.status, first.source()), (200, "llm"));
    assert_eq!(
        (second.status, second.source()),
        (200, "llm"),
        "19 spent + 63 reserved of 90: still under"
    );
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (429, "token_budget_exceeded")
    );
    let retry_after: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry_after.abs_diff(seconds_to_utc_midnight()) <= 2,
        "Retry-After {retry_after} s runs to midnight UTC"
    );
    assert_eq!(
        (cached.status, cached.source()),
        (200, "cache"),
        "a cached answer costs nothing and is still served"
    );
    assert_eq!((someone_else.status, someone_else.source()), (200, "llm"));
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        3,
        "no upstream call once over budget"
    );
    assert_eq!(app.usage(&user).await, (24, 14, 0, false));
    assert_eq!(app.metric_total("BudgetExceeded"), 1.0);
}

#[tokio::test]
async fn rule_answers_cost_nothing_and_zero_turns_the_budget_off() {
    let app = spawn(None, &[("CHAT_DAILY_TOKEN_BUDGET", "1")]).await;
    let user = app.user().await;
    // Spent earlier today, when an LLM was configured: rule answers are still free.
    app.db
        .client()
        .await
        .execute(
            "insert into chat_usage (user_id, day, prompt_tokens, completion_tokens) \
             values ($1::text::uuid, (now() at time zone 'utc')::date, 500, 500)",
            &[&user],
        )
        .await
        .unwrap();
    for i in 0..3 {
        let answer = app.ask(&user, &format!("refund {i}")).await;
        assert_eq!((answer.status, answer.source()), (200, "rules"));
    }

    let server = upstream_answering(llm_fake::completion("Hello!")).await;
    let unlimited = spawn(
        Some(&format!("{}/v1", server.uri())),
        &[("CHAT_DAILY_TOKEN_BUDGET", "0")],
    )
    .await;
    let user = unlimited.user().await;
    for i in 0..3 {
        let answer = unlimited.ask(&user, &format!("question {i}")).await;
        assert_eq!((answer.status, answer.source()), (200, "llm"));
    }
    assert_eq!(unlimited.usage(&user).await, (36, 21, 0, false));
}

#[tokio::test]
async fn streamed_answers_are_counted_from_the_usage_chunk() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(llm_fake::sse(&["a", "b", "c"]), "text/event-stream"),
        )
        .mount(&server)
        .await;
    // "one" reserves 3 + (27 + 4) + (3 + 4) + 5 = 46 tokens; the answer costs 12.
    let app = spawn(
        Some(&format!("{}/v1", server.uri())),
        &[("CHAT_DAILY_TOKEN_BUDGET", "50"), ("CHAT_MAX_TOKENS", "5")],
    )
    .await;
    let user = app.user().await;
    let stream = |q: &str| json!({"messages": [{"role": "user", "content": q}], "stream": true});

    let first = app.ask_as(&user, false, stream("one")).await;
    let refused = app.ask_as(&user, false, stream("two")).await;

    assert_eq!((first.status, first.source()), (200, "llm"));
    assert!(first.text().ends_with("data: [DONE]\n\n"));
    let sent: Value =
        serde_json::from_slice(&server.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    assert_eq!(
        app.usage(&user).await,
        (9, 3, 0, false),
        "the usage chunk's counts"
    );
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (429, "token_budget_exceeded")
    );
}

#[tokio::test]
async fn answers_without_usage_are_charged_their_bound_and_counted() {
    let mut body = llm_fake::completion("完整报告为一次性购买");
    body.as_object_mut().unwrap().remove("usage");
    let server = upstream_answering(body).await;
    let streamed = MockServer::start().await;
    let sse_without_usage: String = llm_fake::sse(&["Hi", " there"])
        .split_inclusive("\n\n")
        .filter(|event| !event.contains("\"usage\""))
        .collect();
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(sse_without_usage, "text/event-stream"),
        )
        .mount(&streamed)
        .await;
    let app = spawn(Some(&format!("{}/v1", server.uri())), &[]).await;
    let stream_app = spawn(Some(&format!("{}/v1", streamed.uri())), &[]).await;
    let user = app.user().await;
    let stream_user = stream_app.user().await;
    let prompt = |question: &str| {
        vec![
            shared::llm::Message {
                role: "system".into(),
                content: SYSTEM_PROMPT.into(),
            },
            shared::llm::Message {
                role: "user".into(),
                content: question.into(),
            },
        ]
    };

    let whole = app.ask(&user, "多少钱？").await;
    let streamed_answer = stream_app
        .ask_as(
            &stream_user,
            false,
            json!({"messages": [{"role": "user", "content": "hello"}], "stream": true}),
        )
        .await;

    assert_eq!((whole.status, whole.source()), (200, "llm"));
    assert_eq!(
        (streamed_answer.status, streamed_answer.source()),
        (200, "llm")
    );
    // No usage: the prompt's bound (a token is at least a byte) and the completion cap
    // (CHAT_MAX_TOKENS, 1,024 by default), not the answer's visible text: a reasoning model's
    // hidden tokens are billed too, and a guess that could fall below the truth would let the
    // day's spend pass the budget.
    let bound = |question: &str| chat::budget::prompt_bound(&prompt(question)) as i64;
    assert_eq!(app.usage(&user).await, (bound("多少钱？"), 1024, 1, false));
    assert_eq!(
        stream_app.usage(&stream_user).await,
        (bound("hello"), 1024, 1, false)
    );
    assert_eq!(app.metric_total("UsageEstimated"), 1.0);
    assert_eq!(stream_app.metric_total("UsageEstimated"), 1.0);
}

#[tokio::test]
async fn anonymous_sessions_get_the_smaller_budget_and_rate_limit() {
    let server = upstream_answering(llm_fake::completion("Hello!")).await;
    let app = spawn(
        Some(&format!("{}/v1", server.uri())),
        &[
            ("CHAT_DAILY_TOKEN_BUDGET", "1000"),
            // "one" reserves 51 tokens and costs 19: a second question does not fit in 60.
            ("CHAT_ANONYMOUS_DAILY_TOKEN_BUDGET", "60"),
            ("CHAT_ANONYMOUS_RATE_LIMIT_PER_MIN", "3"),
            ("CHAT_MAX_TOKENS", "10"),
        ],
    )
    .await;
    let guest = app.user().await;
    let member = app.user().await;
    let hello = |q: &str| json!({"messages": [{"role": "user", "content": q}]});

    let guest_first = app.ask_as(&guest, true, hello("one")).await;
    let guest_over_budget = app.ask_as(&guest, true, hello("two")).await;
    let guest_cached = app.ask_as(&guest, true, hello("one")).await;
    let guest_rate_limited = app.ask_as(&guest, true, hello("one")).await;
    let mut member_answers = Vec::new();
    for q in ["one", "two", "three", "four"] {
        member_answers.push(app.ask_as(&member, false, hello(q)).await);
    }

    assert_eq!(guest_first.source(), "llm");
    assert_eq!(
        (guest_over_budget.status, guest_over_budget.code().as_str()),
        (429, "token_budget_exceeded")
    );
    assert_eq!(guest_cached.source(), "cache");
    assert_eq!(
        (
            guest_rate_limited.status,
            guest_rate_limited.code().as_str()
        ),
        (429, "rate_limited"),
        "the fourth request in a minute"
    );
    assert!(member_answers
        .iter()
        .all(|a| (a.status, a.source()) == (200, "llm")));
    assert_eq!(app.usage(&guest).await, (12, 7, 0, true));
    assert!(
        !app.usage(&member).await.3,
        "a member is not counted as anonymous"
    );
}

#[tokio::test]
async fn a_stalled_stream_ends_within_llm_timeout_ms_by_default() {
    let events: Vec<String> = llm_fake::sse(&["partial", "never sent"])
        .split_inclusive("\n\n")
        .take(2)
        .map(str::to_owned)
        .collect();
    let base = llm_fake::stalling_stream(events, Duration::from_secs(30)).await;
    let app = spawn(Some(&base), &[("LLM_TIMEOUT_MS", "1000")]).await;
    let user = app.user().await;
    assert_eq!(
        (
            app.state.config.first_token_timeout,
            app.state.config.idle_timeout
        ),
        (Duration::from_secs(1), Duration::from_secs(1))
    );

    let started = Instant::now();
    let answer = app
        .ask_as(
            &user,
            false,
            json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}),
        )
        .await;
    let took = started.elapsed();

    assert_eq!((answer.status, answer.source()), (200, "llm"));
    assert!(
        answer.text().contains("stream_stalled"),
        "{}",
        answer.text()
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "ended after the 1 s idle timeout, not the old 15 s default ({took:?})"
    );

    // Configured on purpose, a longer idle timeout is kept.
    let patient = spawn(
        Some(&base),
        &[
            ("LLM_TIMEOUT_MS", "1000"),
            ("LLM_STREAM_IDLE_TIMEOUT_MS", "5000"),
        ],
    )
    .await;
    assert_eq!(patient.state.config.idle_timeout, Duration::from_secs(5));
    let default = spawn(None, &[]).await;
    assert_eq!(
        (
            default.state.config.first_token_timeout,
            default.state.config.idle_timeout
        ),
        (Duration::from_secs(30), Duration::from_secs(15)),
        "the defaults when LLM_TIMEOUT_MS is not lowered"
    );
}

#[tokio::test]
async fn conversations_that_imitate_separators_get_their_own_answers() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(llm_fake::completion("first")))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(llm_fake::completion("second")))
        .mount(&server)
        .await;
    let app = spawn(Some(&format!("{}/v1", server.uri())), &[]).await;
    let user = app.user().await;
    // Under the old key (role \x01 content, joined by \0) these two hashed the same bytes.
    let one = json!({"messages": [{"role": "user", "content": "a\u{0}user\u{1}b"}]});
    let two =
        json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]});

    let first = app.ask_as(&user, false, one.clone()).await;
    let second = app.ask_as(&user, false, two).await;
    let again = app.ask_as(&user, false, one).await;

    assert_eq!(first.source(), "llm");
    assert_eq!(
        second.source(),
        "llm",
        "not the first conversation's answer"
    );
    assert!(second.text().contains("second"));
    assert_eq!(
        (again.source(), again.text().contains("first")),
        ("cache", true)
    );
}

#[tokio::test]
async fn chat_health_reports_spend_per_utc_day() {
    let server = upstream_answering(llm_fake::completion("Hello!")).await;
    let app = spawn(Some(&format!("{}/v1", server.uri())), &[]).await;
    let (member, guest) = (app.user().await, app.user().await);
    app.ask_as(
        &member,
        false,
        json!({"messages": [{"role": "user", "content": "a"}]}),
    )
    .await;
    app.ask_as(
        &member,
        false,
        json!({"messages": [{"role": "user", "content": "b"}]}),
    )
    .await;
    app.ask_as(
        &guest,
        true,
        json!({"messages": [{"role": "user", "content": "c"}]}),
    )
    .await;

    let health: Value = app
        .db
        .client()
        .await
        .query_one("select public.chat_health(7, 30)", &[])
        .await
        .unwrap()
        .get(0);

    let today = &health["per_day"][0];
    assert_eq!(health["per_day"].as_array().unwrap().len(), 1);
    assert_eq!(
        (
            today["users"].clone(),
            today["anonymous_users"].clone(),
            today["llm_answers"].clone()
        ),
        (json!(2), json!(1), json!(3))
    );
    assert_eq!(
        (
            today["prompt_tokens"].clone(),
            today["completion_tokens"].clone(),
            today["anonymous_tokens"].clone()
        ),
        (json!(36), json!(21), json!(19))
    );
    assert_eq!(
        (
            today["max_user_tokens"].clone(),
            today["users_at_budget"].clone(),
            today["estimated_answers"].clone()
        ),
        (json!(38), json!(1), json!(0))
    );
}
