//! The chat's cost ceilings as an outside reviewer attacked them (issue 21): failed attempts
//! that cost nothing, concurrent requests over several instances overshooting the budget, and a
//! double burst across a fixed window's edge. Each app is configured through
//! `chat::Config::read`, as the function reads its environment; several `chat::State`s over one
//! database are several Lambda instances.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use shared::llm::Message;
use shared::store::Store;
use testkit::apps;
use testkit::db::TestDb;
use testkit::fixtures::FunctionUrlRequest;
use testkit::{llm_fake, tokens};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const JWT: &str = "chat-ceilings-jwt-secret-at-least-32-characters";
const SYSTEM_PROMPT: &str = "You are the test assistant.";

pub(crate) struct Fleet {
    pub(crate) db: TestDb,
    /// One state per Lambda instance, each with its own connections.
    pub(crate) instances: Vec<Arc<chat::State>>,
    metrics: Vec<Arc<Mutex<Vec<String>>>>,
}

pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn source(&self) -> &str {
        self.headers
            .get(chat::SOURCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub(crate) fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `instances` states over one fresh database, configured from `vars` on top of test defaults.
pub(crate) async fn fleet(
    upstream: Option<&str>,
    instances: usize,
    vars: &[(&'static str, &str)],
) -> Fleet {
    let db = TestDb::new().await;
    let mut env: Vec<(&'static str, String)> = vec![
        ("DATABASE_URL", db.url.clone()),
        ("SUPABASE_JWT_SECRET", JWT.to_owned()),
        ("CHAT_SYSTEM_PROMPT", SYSTEM_PROMPT.to_owned()),
        ("CHAT_RATE_LIMIT_PER_MIN", "1000".to_owned()),
        ("CHAT_CACHE_TTL_S", "0".to_owned()),
    ];
    if let Some(base) = upstream {
        env.push(("OPENAI_API_KEY", "sk-ceilings".to_owned()));
        env.push(("OPENAI_BASE_URL", base.to_owned()));
    }
    env.extend(vars.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let mut states = Vec::new();
    let mut metrics = Vec::new();
    for _ in 0..instances {
        let env = env.clone();
        let config = chat::Config::read(shared::config::EnvReader::new(move |k| {
            env.iter()
                .rev()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
        }))
        .unwrap();
        let (state, lines) = apps::chat_state(config, Store::postgres(&db.url, 2).unwrap());
        states.push(Arc::new(state));
        metrics.push(lines);
    }
    Fleet {
        db,
        instances: states,
        metrics,
    }
}

impl Fleet {
    pub(crate) async fn user(&self) -> String {
        self.db
            .create_user(&self.db.client().await)
            .await
            .to_string()
    }

    /// Sends `body` to `path` as `user` through instance `k`, and reads the whole answer.
    pub(crate) async fn send(&self, k: usize, user: &str, path: &str, body: &Value) -> Answer {
        let state = self.instances[k % self.instances.len()].clone();
        let request = FunctionUrlRequest::post(path, body.to_string().as_bytes())
            .bearer(&tokens::hs256(
                &tokens::user_claims(user, None),
                JWT.as_bytes(),
            ))
            .into_request()
            .unwrap();
        let response = chat::handle(state, request).await;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await;
        Answer {
            status,
            headers,
            body,
        }
    }

    /// A plain OpenAI request through instance `k`.
    pub(crate) async fn ask(&self, k: usize, user: &str, question: &str) -> Answer {
        self.send(
            k,
            user,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": question}]}),
        )
        .await
    }

    /// Tokens the user's UTC day counts as spent: charged plus reservations never settled.
    pub(crate) async fn spent(&self, user: &str) -> i64 {
        self.db
            .client()
            .await
            .query_one(
                "select coalesce(sum(prompt_tokens + completion_tokens), 0)::bigint from chat_usage \
                 where user_id = $1::text::uuid and day = (now() at time zone 'utc')::date",
                &[&user],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub(crate) fn metric_total(&self, name: &str) -> f64 {
        self.metrics
            .iter()
            .map(|lines| apps::metric_total(lines, name))
            .sum()
    }
}

/// The prompt sent upstream for one question.
pub(crate) fn prompt(question: &str) -> Vec<Message> {
    vec![
        Message {
            role: "system".into(),
            content: SYSTEM_PROMPT.into(),
        },
        Message {
            role: "user".into(),
            content: question.into(),
        },
    ]
}

/// A `useChat` submit of one question.
pub(crate) fn use_chat(question: &str) -> Value {
    json!({"id": "chat-1", "trigger": "submit-message",
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": question}]}]})
}

/// Issue 21, 1: against an upstream slower than LLM_TIMEOUT_MS every attempt times out and the
/// rules answer; each attempt reached the upstream with the whole prompt and may have generated
/// up to the cap before it was cut: each is charged that bound, and each retry reserved it first.
#[tokio::test]
async fn every_attempt_that_reached_the_upstream_is_charged() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(llm_fake::completion("too late"))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    let app = fleet(
        Some(&format!("{}/v1", server.uri())),
        1,
        &[
            // 15 attempts at 138 + the question's bytes each: 2,241; what is left (359) does
            // not hold the long question below (738).
            ("CHAT_DAILY_TOKEN_BUDGET", "2600"),
            ("CHAT_MAX_TOKENS", "100"),
            ("LLM_TIMEOUT_MS", "200"),
            ("LLM_MAX_RETRIES", "2"),
            ("LLM_TOTAL_BUDGET_MS", "6000"),
        ],
    )
    .await;
    let user = app.user().await;
    let plain = ["how much is it", "refund please", "is it safe"];
    let streamed = ["tell me more", "and then"];

    let mut answers = join_all(plain.iter().map(|q| app.ask(0, &user, q))).await;
    let bodies: Vec<Value> = streamed.iter().map(|q| use_chat(q)).collect();
    answers.extend(join_all(bodies.iter().map(|body| app.send(0, &user, "/", body))).await);

    for answer in &answers {
        assert_eq!((answer.status, answer.source()), (200, "rules"));
        assert_eq!(answer.header(chat::FALLBACK_HEADER), "timeout");
    }
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        15,
        "three attempts per request, each with the whole prompt"
    );
    let bound: u64 = plain
        .iter()
        .chain(&streamed)
        .map(|q| 3 * chat::budget::worst_case(&prompt(q), 100))
        .sum();
    assert_eq!(bound, 2241);
    assert_eq!(
        app.spent(&user).await,
        bound as i64,
        "every attempt charged its prompt's bound and the cap (no usage came back)"
    );
    let row = app
        .db
        .client()
        .await
        .query_one(
            "select upstream_attempts, failed_attempts, requests, llm_answers from chat_usage \
             where user_id = $1::text::uuid",
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
        (15, 15, 5, 0)
    );
    assert_eq!(app.metric_total("UpstreamAttempts"), 15.0);
    assert_eq!(app.metric_total("FailedAttempts"), 15.0);

    // The charges now count: a long question whose worst case fits an empty day but not what is
    // left of this one is refused before any upstream call.
    let long = "why ".repeat(150);
    let refused = app.ask(0, &user, &long).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (429, "token_budget_exceeded"),
        "{}",
        refused.text()
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 15);
}

/// Issue 21, 2: many requests at once over three instances against an upstream that spends the
/// whole completion cap and one token per prompt byte. The day's spend never passes the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_over_three_instances_never_pass_the_budget() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(llm_fake::Metered {
            delay: Duration::from_millis(400),
        })
        .mount(&server)
        .await;
    let budget = 1000;
    let app = fleet(
        Some(&format!("{}/v1", server.uri())),
        3,
        &[
            ("CHAT_DAILY_TOKEN_BUDGET", "1000"),
            ("CHAT_MAX_TOKENS", "200"),
        ],
    )
    .await;
    let user = app.user().await;
    let requests = (0..24).map(|i| {
        let question = format!("question number {i:02}");
        let app = &app;
        let user = &user;
        async move {
            match i % 3 {
                0 => app.ask(i, user, &question).await,
                1 => {
                    let body = json!({"messages": [{"role": "user", "content": question}],
                        "stream": true, "stream_options": {"include_usage": true}});
                    app.send(i, user, "/v1/chat/completions", &body).await
                }
                _ => app.send(i, user, "/", &use_chat(&question)).await,
            }
        }
    });

    let answers = join_all(requests).await;

    let answered = answers
        .iter()
        .filter(|a| a.status == 200 && a.source() == "llm")
        .count();
    let refused = answers
        .iter()
        .filter(|a| a.status == 429 && a.code() == "token_budget_exceeded")
        .count();
    let spent = app.spent(&user).await;
    let calls = server.received_requests().await.unwrap().len();
    assert!(
        spent <= budget,
        "spent {spent} of {budget} with {answered} answers and {calls} upstream calls"
    );
    assert_eq!(answered + refused, 24, "every request answered or refused");
    assert!(answered >= 1, "the budget allows some answers");
    assert_eq!(calls, answered, "no upstream call for a refused request");
    // Each answer cost exactly its reservation here: the fake spends the worst case.
    let each = {
        let (prompt_tokens, completion) = llm_fake::Metered::usage(
            &json!({"messages": prompt("question number 00"), "max_tokens": 200}),
        );
        (prompt_tokens + completion) as i64
    };
    assert_eq!(spent, each * answered as i64);
    assert_eq!(answered as i64, budget / each, "as many as fit, no more");
    let open: i64 = app
        .db
        .client()
        .await
        .query_one("select count(*) from chat_reservations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0, "every reservation settled");
}

/// Moves the request limiter's world forward by `seconds`: every stored time goes back.
pub(crate) async fn advance_limiter(db: &TestDb, seconds: f64) {
    db.client()
        .await
        .batch_execute(&format!(
            "do $$ begin
               if to_regclass('internal.rate_limits') is not null then
                 update internal.rate_limits
                 set window_start = window_start - make_interval(secs => {seconds});
               end if;
               if to_regclass('internal.chat_requests') is not null then
                 execute 'update internal.chat_requests
                   set at = at - make_interval(secs => {seconds})';
               end if;
             end $$"
        ))
        .await
        .unwrap();
}

/// Issue 21, 3: limit 20 a minute; 1 request at t0, 19 at t0+57 s, 21 at t0+60.5 s. A fixed
/// window answered 40 within 4 s; the sliding window answers what fits in any 60 s: 21.
#[tokio::test]
async fn a_double_burst_across_a_window_edge_gets_no_second_quota() {
    let app = fleet(None, 2, &[("CHAT_RATE_LIMIT_PER_MIN", "20")]).await;
    let user = app.user().await;
    let mut answered = 0;
    let mut refused = Vec::new();
    for (advance, burst) in [(0.0, 1), (57.0, 19), (3.5, 21)] {
        advance_limiter(&app.db, advance).await;
        for i in 0..burst {
            let answer = app.ask(i, &user, "how much is the report?").await;
            match answer.status {
                200 => answered += 1,
                _ => refused.push(answer),
            }
        }
    }

    assert_eq!(
        answered, 21,
        "20 in (t0, t0+60], then one more as t0 leaves"
    );
    assert_eq!(refused.len(), 20);
    for answer in &refused {
        assert_eq!(answer.code(), "rate_limited");
        let retry_after: u64 = answer.header("retry-after").parse().unwrap();
        assert!(
            (54..=57).contains(&retry_after),
            "until the first request of t0+57 leaves the window: {retry_after}"
        );
        let error = &answer.json()["error"];
        assert_eq!(
            (
                error["limit"].clone(),
                error["quota"].clone(),
                error["remaining"].clone()
            ),
            (json!("requests"), json!(20), json!(0))
        );
    }
}
