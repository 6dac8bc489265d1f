//! How an outside reviewer would try to break the chat's budget and limits next: a client that
//! leaves mid-stream, an instance that dies holding a reservation, a retry storm, huge prompts,
//! a day that ends mid-answer, retries the budget cannot cover, a database that is down, an
//! upstream that lies about its usage. The harness is `chat_ceilings`'.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use shared::store::chat::{Admission, AdmitLimits, Reserve, SettledSource, Settlement};
use shared::store::Store;
use testkit::fixtures::FunctionUrlRequest;
use testkit::{llm_fake, tokens};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::chat_ceilings::{advance_limiter, fleet, prompt, Fleet};

const DAY_MS: i64 = 86_400_000;

async fn open_reservations(app: &Fleet) -> i64 {
    app.db
        .client()
        .await
        .query_one("select count(*) from chat_reservations", &[])
        .await
        .unwrap()
        .get(0)
}

/// (prompt, completion, unsettled) tokens of a user's day.
async fn usage_on(app: &Fleet, user: &str, day_ms: i64) -> Option<(i64, i64, i64)> {
    app.db
        .client()
        .await
        .query_opt(
            "select prompt_tokens, completion_tokens, unsettled_tokens from chat_usage \
             where user_id = $1::text::uuid and day = (to_timestamp($2::bigint / 1000.0) at time zone 'utc')::date",
            &[&user, &day_ms],
        )
        .await
        .unwrap()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
}

fn now_ms() -> i64 {
    shared::clock::Clock::system().unix_ms()
}

/// A streamed request for a long answer, signed for `user`.
fn long_story_streamed(user: &str) -> lambda_http::Request {
    let body =
        json!({"messages": [{"role": "user", "content": "a long story please"}], "stream": true});
    FunctionUrlRequest::post("/v1/chat/completions", body.to_string().as_bytes())
        .bearer(&tokens::hs256(
            &tokens::user_claims(user, None),
            b"chat-ceilings-jwt-secret-at-least-32-characters",
        ))
        .into_request()
        .unwrap()
}

/// Waits up to 5 s for every reservation to be settled (the relay settles in its own task).
async fn until_settled(app: &Fleet) {
    for _ in 0..100 {
        if open_reservations(app).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_client_leaving_mid_stream_closes_the_upstream_and_pays_the_cut_streams_bound() {
    let (base, written) = llm_fake::trickling_stream(200, Duration::from_millis(30)).await;
    let app = fleet(
        Some(&base),
        1,
        &[
            ("CHAT_DAILY_TOKEN_BUDGET", "5000"),
            ("CHAT_MAX_TOKENS", "300"),
        ],
    )
    .await;
    let user = app.user().await;
    let request = long_story_streamed(&user);

    let response = chat::handle(app.instances[0].clone(), request).await;
    assert_eq!(response.headers()[chat::SOURCE_HEADER], "llm");
    let mut body = response.into_body();
    let first = body.next().await.expect("the first chunk").unwrap();
    assert!(String::from_utf8_lossy(&first).contains("chat.completion.chunk"));
    drop(body);
    // The relay notices at its next write, settles, and closes the upstream connection.
    until_settled(&app).await;

    assert_eq!(
        open_reservations(&app).await,
        0,
        "the reservation is released"
    );
    let (prompt_tokens, completion, unsettled) = usage_on(&app, &user, now_ms()).await.unwrap();
    let sent = written.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        sent < 200,
        "the upstream stopped when the client left ({sent} chunks)"
    );
    assert_eq!(
        prompt_tokens,
        chat::budget::prompt_bound(&prompt("a long story please")) as i64,
        "no usage came back: the prompt's bound"
    );
    assert_eq!(
        completion, 300,
        "cut before its usage chunk: what the upstream may have generated, the cap"
    );
    assert_eq!(unsettled, 0);
    assert_eq!(app.metric_total("ClientDisconnects"), 1.0);
}

/// A client that keeps the connection but stops reading: the body's buffer fills and each send
/// waits. The wait ends at the request's deadline, so the answer is settled (and the function
/// ends) while the client still holds the body, instead of when the client lets go.
#[tokio::test]
async fn a_client_that_stops_reading_cannot_hold_the_answer_past_its_deadline() {
    let (base, _) = llm_fake::trickling_stream(400, Duration::from_millis(1)).await;
    let app = fleet(
        Some(&base),
        1,
        &[
            ("CHAT_DAILY_TOKEN_BUDGET", "5000"),
            ("CHAT_MAX_TOKENS", "300"),
            ("LLM_TOTAL_BUDGET_MS", "1500"),
        ],
    )
    .await;
    let user = app.user().await;
    let request = long_story_streamed(&user);

    let response = chat::handle(app.instances[0].clone(), request).await;
    let mut body = response.into_body();
    body.next().await.expect("the first chunk").unwrap();
    // Held, never read again: 400 chunks do not fit the body's buffer.
    until_settled(&app).await;

    assert_eq!(
        open_reservations(&app).await,
        0,
        "settled while the client still holds the body"
    );
    let (_, completion, _) = usage_on(&app, &user, now_ms()).await.unwrap();
    assert_eq!(completion, 300, "cut at the deadline: charged the cap");
    assert_eq!(app.metric_total("ClientDisconnects"), 1.0);
    drop(body);
}

#[tokio::test]
async fn a_reservation_whose_instance_died_counts_in_full_and_expires_into_spent() {
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
            ("CHAT_DAILY_TOKEN_BUDGET", "1000"),
            ("CHAT_MAX_TOKENS", "400"),
        ],
    )
    .await;
    let user = app.user().await;
    let uid = user.parse().unwrap();
    let limits = AdmitLimits {
        per_window: 100,
        window_s: 60,
        daily_tokens: Some(1000),
    };
    // Another instance reserved 600 tokens and died before settling.
    let dead = Store::postgres(&app.db.url, 1).unwrap();
    let admission = dead
        .chat_admit(
            uid,
            None,
            limits,
            Reserve {
                tokens: 600,
                hold_s: 30,
            },
            now_ms(),
        )
        .await
        .unwrap();
    let Admission::Miss {
        reservation: Some(orphan),
        ..
    } = admission
    else {
        panic!("a reservation: {admission:?}")
    };

    let while_open = app.ask(0, &user, "hello").await;
    app.db
        .client()
        .await
        .execute(
            "update chat_reservations set expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    let after_expiry = app.ask(0, &user, "hello").await;
    let late = dead
        .chat_settle(
            uid,
            &Settlement {
                reservation: Some(orphan),
                cache_key: None,
                cache: None,
                source: SettledSource::Llm,
                prompt_tokens: 10,
                completion_tokens: 10,
                attempts: 1,
                failed_attempts: 0,
                usage_estimated: false,
                anonymous: false,
            },
            now_ms(),
        )
        .await
        .unwrap();

    // 600 held + this request's 443 > 1000: refused, and told to come back when it is resolved.
    assert_eq!(
        (while_open.status, while_open.code().as_str()),
        (429, "token_budget_exceeded")
    );
    let retry_after: u64 = while_open.header("retry-after").parse().unwrap();
    assert!(
        retry_after <= 30,
        "until the reservation expires: {retry_after}"
    );
    assert!(while_open.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("in progress"));
    assert_eq!(while_open.json()["error"]["reserved"], 600);
    // Expired: swept into spent, in full; the day is over for a request of this size.
    assert_eq!(after_expiry.status, 429);
    let error = &after_expiry.json()["error"];
    assert_eq!(error["spent"], 600);
    assert_eq!(
        error["retry_after_s"], error["reset_s"],
        "until midnight UTC"
    );
    assert!(!late.settled, "a late settlement does not charge again");
    assert_eq!(
        usage_on(&app, &user, now_ms()).await,
        Some((0, 0, 600)),
        "counted once, in full"
    );
    assert!(server.received_requests().await.unwrap().is_empty());
    let health: Value = app
        .db
        .client()
        .await
        .query_one("select public.chat_health(1, 1000)", &[])
        .await
        .unwrap()
        .get(0);
    let today = &health["per_day"][0];
    assert_eq!(
        (
            today["unsettled_tokens"].clone(),
            today["unsettled_requests"].clone(),
            today["spent_tokens"].clone()
        ),
        (json!(600), json!(1), json!(600))
    );
}

#[tokio::test]
async fn a_retry_storm_while_limited_does_not_push_the_limit_back() {
    let app = fleet(None, 3, &[("CHAT_RATE_LIMIT_PER_MIN", "3")]).await;
    let user = app.user().await;
    let mut statuses = Vec::new();
    for i in 0..40 {
        statuses.push(app.ask(i, &user, "hi").await.status);
    }
    advance_limiter(&app.db, 60.5).await;
    let after: Vec<u16> = futures::future::join_all((0..4).map(|i| app.ask(i, &user, "hi")))
        .await
        .iter()
        .map(|a| a.status)
        .collect();

    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 37);
    let mut sorted = after.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [200, 200, 200, 429],
        "a minute after the first three, refused requests left no trace"
    );
}

#[tokio::test]
async fn a_prompt_whose_worst_case_passes_the_whole_budget_is_a_400_no_wait_can_fix() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(llm_fake::completion("x")))
        .mount(&server)
        .await;
    let app = fleet(
        Some(&format!("{}/v1", server.uri())),
        1,
        &[
            ("CHAT_DAILY_TOKEN_BUDGET", "1000"),
            ("CHAT_MAX_TOKENS", "100"),
        ],
    )
    .await;
    let user = app.user().await;
    // 400 Chinese characters are 1,200 bytes: up to 1,200 tokens for a byte-level tokenizer.
    let chinese = "完".repeat(400);

    let refused = app.ask(0, &user, &chinese).await;
    let shorter = app.ask(0, &user, &"完".repeat(200)).await;

    assert_eq!(
        (refused.status, refused.code().as_str()),
        (400, "conversation_exceeds_budget")
    );
    assert!(
        refused.header("retry-after").is_empty(),
        "waiting does not help: no Retry-After"
    );
    let error = &refused.json()["error"];
    assert_eq!(error["quota"], 1000);
    assert_eq!(error["limit"], "tokens");
    assert!(error.get("retry_after_s").is_none());
    let requested = error["requested"].as_u64().unwrap();
    assert!(requested > 1000, "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains(&format!("up to {requested} tokens")),
        "{error}"
    );
    assert_eq!(
        app.metric_total("InvalidRequests"),
        1.0,
        "counted as a bad request, not a limit"
    );
    assert_eq!(
        (shorter.status, shorter.source()),
        (200, "llm"),
        "600 bytes fit"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_day_ending_mid_answer_charges_the_day_that_reserved() {
    let app = fleet(None, 1, &[]).await;
    let user = app.user().await;
    let uid = user.parse().unwrap();
    let store = Store::postgres(&app.db.url, 1).unwrap();
    let midnight = (now_ms() / DAY_MS + 1) * DAY_MS;
    let limits = AdmitLimits {
        per_window: 100,
        window_s: 60,
        daily_tokens: Some(1000),
    };
    let admit = |tokens, at| {
        let store = &store;
        async move {
            store
                .chat_admit(uid, None, limits, Reserve { tokens, hold_s: 60 }, at)
                .await
                .unwrap()
        }
    };
    let reservation = |admission: Admission| match admission {
        Admission::Miss { reservation, .. } => reservation,
        other => panic!("admitted: {other:?}"),
    };
    let settle = |reservation, charged, at| {
        let store = &store;
        async move {
            let settlement = Settlement {
                reservation,
                cache_key: None,
                cache: None,
                source: SettledSource::Llm,
                prompt_tokens: charged,
                completion_tokens: 0,
                attempts: 1,
                failed_attempts: 0,
                usage_estimated: false,
                anonymous: false,
            };
            store.chat_settle(uid, &settlement, at).await.unwrap()
        }
    };

    // 800 reserved half a second before midnight, settled at 300 half a second after.
    let late_answer = reservation(admit(800, midnight - 500).await);
    // Another, made a second before midnight, whose instance dies.
    let orphan = reservation(admit(150, midnight - 1000).await);
    let next_day = admit(950, midnight + 400).await;
    settle(late_answer, 300, midnight + 500).await;
    let over_yesterday = admit(600, midnight - 200).await;
    // The orphan's expiry passes on the next day: it is counted on its own day.
    let much_later = admit(50, midnight + 120_000).await;

    assert!(
        reservation(next_day).is_some(),
        "the new day's budget is its own: 950 fits"
    );
    assert!(orphan.is_some());
    assert!(
        matches!(over_yesterday, Admission::BudgetExceeded { .. }),
        "300 settled + 150 held + 600 > 1000 on the old day: {over_yesterday:?}"
    );
    assert!(
        matches!(much_later, Admission::Miss { .. }),
        "950 expired + 50 fit: {much_later:?}"
    );
    assert_eq!(
        usage_on(&app, &user, midnight - 1).await,
        Some((300, 0, 150)),
        "charged and expired on the day that reserved"
    );
    let next = usage_on(&app, &user, midnight + 1)
        .await
        .unwrap_or_default();
    assert_eq!(
        (next.0, next.2),
        (0, 950),
        "the next day holds only its own (expired) reservation of 950"
    );
}

#[tokio::test]
async fn retries_the_budget_cannot_cover_are_not_made() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_json(llm_fake::error(
            "The server had an error",
            "server_error",
            "server_error",
        )))
        .mount(&server)
        .await;
    // "hi" reserves 3 + (27 + 4) + (2 + 4) + 100 = 140; a retry needs 140 more: a 5xx may
    // come after the model generated, so each attempt may cost its whole worst case.
    let app = fleet(
        Some(&format!("{}/v1", server.uri())),
        1,
        &[
            ("CHAT_DAILY_TOKEN_BUDGET", "160"),
            ("CHAT_MAX_TOKENS", "100"),
            ("LLM_MAX_RETRIES", "2"),
        ],
    )
    .await;
    let user = app.user().await;

    let answer = app.ask(0, &user, "hi").await;

    assert_eq!((answer.status, answer.source()), (200, "rules"));
    assert_eq!(answer.header(chat::FALLBACK_HEADER), "token_budget");
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        1,
        "140 + 140 > 160: the first retry is not covered"
    );
    assert_eq!(
        app.spent(&user).await,
        chat::budget::worst_case(&prompt("hi"), 100) as i64,
        "the 500 is charged its bound: the prompt's and the cap"
    );
    assert_eq!(open_reservations(&app).await, 0);
}

#[tokio::test]
async fn without_its_database_the_chat_answers_from_rules_rather_than_unmetered() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(llm_fake::completion("paid")))
        .mount(&server)
        .await;
    let base = format!("{}/v1", server.uri());
    let dead = "postgres://postgres@127.0.0.1:1/nothing?sslmode=disable";
    let answer_with = |budget: &'static str| {
        let base = base.clone();
        async move {
            let env = [
                ("DATABASE_URL", dead.to_owned()),
                (
                    "SUPABASE_JWT_SECRET",
                    "chat-ceilings-jwt-secret-at-least-32-characters".to_owned(),
                ),
                ("OPENAI_API_KEY", "sk-x".to_owned()),
                ("OPENAI_BASE_URL", base),
                ("CHAT_DAILY_TOKEN_BUDGET", budget.to_owned()),
            ];
            let config = chat::Config::read(shared::config::EnvReader::new(move |k| {
                env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
            }))
            .unwrap();
            let (state, _) = testkit::apps::chat_state(config, Store::postgres(dead, 1).unwrap());
            let user = uuid::Uuid::new_v4().to_string();
            let request = FunctionUrlRequest::post(
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "hi"}]})
                    .to_string()
                    .as_bytes(),
            )
            .bearer(&tokens::hs256(
                &tokens::user_claims(&user, None),
                b"chat-ceilings-jwt-secret-at-least-32-characters",
            ))
            .into_request()
            .unwrap();
            chat::handle(std::sync::Arc::new(state), request).await
        }
    };

    // Above the default cap's worst case (1,024 + the prompt): a budget the request fits.
    let metered = answer_with("5000").await;
    let unmetered = answer_with("0").await;

    assert_eq!(metered.status(), 200);
    assert_eq!(metered.headers()[chat::SOURCE_HEADER], "rules");
    assert_eq!(
        metered.headers()[chat::FALLBACK_HEADER],
        "store_unavailable"
    );
    assert!(
        !metered.headers().contains_key("ratelimit"),
        "no state is claimed when it is unknown"
    );
    assert!(metered.headers().contains_key("ratelimit-policy"));
    assert_eq!(
        unmetered.headers()[chat::SOURCE_HEADER],
        "llm",
        "no budget configured: nothing to keep"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn an_upstream_reporting_more_than_it_may_is_charged_and_counted() {
    let server = MockServer::start().await;
    let mut lying = llm_fake::completion("short");
    lying["usage"] = json!({"prompt_tokens": 10, "completion_tokens": 900, "total_tokens": 910});
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(lying))
        .mount(&server)
        .await;
    let app = fleet(
        Some(&format!("{}/v1", server.uri())),
        1,
        &[
            ("CHAT_DAILY_TOKEN_BUDGET", "100000"),
            ("CHAT_MAX_TOKENS", "100"),
        ],
    )
    .await;
    let user = app.user().await;

    let answer = app.ask(0, &user, "hi").await;

    assert_eq!(answer.source(), "llm");
    assert_eq!(answer.json()["x_tokens_charged"], 910);
    assert_eq!(
        app.spent(&user).await,
        910,
        "recorded as the provider bills it"
    );
    assert_eq!(app.metric_total("ReservationExceeded"), 1.0);
}

/// A stream whose body ends cleanly after some content but with no finish_reason, no usage and
/// no `[DONE]` (a proxy or server that ends the response on an internal error) was cut, not
/// answered whole: the provider may have generated past what arrived. (Treated like `[DONE]`
/// before: charged as whole, told `finish_reason: "stop"`, and cached.)
#[tokio::test]
async fn a_stream_that_ends_without_done_is_charged_as_cut_and_not_cached() {
    let server = MockServer::start().await;
    let chunk = |delta: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
                   "model": "gpt-4o-mini",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
        )
    };
    let body = [
        chunk(json!({"role": "assistant", "content": ""})),
        chunk(json!({"content": "Half an ans"})),
    ]
    .concat();
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(body.into_bytes(), "text/event-stream"),
        )
        .mount(&server)
        .await;
    let app = fleet(
        Some(&format!("{}/v1", server.uri())),
        1,
        &[
            ("CHAT_DAILY_TOKEN_BUDGET", "100000"),
            ("CHAT_MAX_TOKENS", "300"),
            ("CHAT_CACHE_TTL_S", "3600"),
        ],
    )
    .await;
    let user = app.user().await;
    let request = json!({"messages": [{"role": "user", "content": "tell me"}], "stream": true});

    let first = app.send(0, &user, "/v1/chat/completions", &request).await;
    assert_eq!(first.source(), "llm");
    let (prompt_tokens, completion, _) = usage_on(&app, &user, now_ms()).await.unwrap();
    assert_eq!(
        prompt_tokens,
        chat::budget::prompt_bound(&prompt("tell me")) as i64
    );
    assert_eq!(
        completion, 300,
        "ended before its finish: what the upstream may have generated, the cap"
    );
    assert!(
        !first.text().contains(r#""finish_reason":"stop""#),
        "a cut answer is not reported as whole"
    );

    let again = app.send(0, &user, "/v1/chat/completions", &request).await;
    assert_ne!(again.source(), "cache", "a cut answer is not cached");
}

/// `"usage": {}` (or only `total_tokens`) reads as zeros, which were charged as an exact 0: a
/// free answer. A usage that is no count (no prompt tokens, no completion for text) is no usage,
/// and gets the bound.
#[tokio::test]
async fn an_empty_usage_object_is_not_a_free_answer() {
    let server = MockServer::start().await;
    let mut answer = llm_fake::completion(&"word ".repeat(40));
    answer["usage"] = json!({});
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer))
        .mount(&server)
        .await;
    let app = fleet(
        Some(&format!("{}/v1", server.uri())),
        1,
        &[
            ("CHAT_DAILY_TOKEN_BUDGET", "100000"),
            ("CHAT_MAX_TOKENS", "100"),
        ],
    )
    .await;
    let user = app.user().await;

    let answer = app.ask(0, &user, "hi").await;

    assert_eq!(answer.source(), "llm");
    let bound = chat::budget::worst_case(&prompt("hi"), 100) as i64;
    assert_eq!(app.spent(&user).await, bound, "no usable usage: the bound");
    assert_eq!(app.metric_total("UsageEstimated"), 1.0);
}
