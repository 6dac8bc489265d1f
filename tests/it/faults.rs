//! Upstream faults under load: checkout races while Stripe fails and times out, and chat while
//! its upstream hangs, resets, 429s, 5xx-es, lies or stalls.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use shared::auth::AuthConfig;
use shared::config::Secret;
use shared::store::Store;
use shared::stripe::client::RetryPolicy;
use testkit::apps;
use testkit::db::TestDb;
use testkit::fixtures::{self, FunctionUrlRequest};
use testkit::stripe_fake::FakeStripe;
use testkit::tokens;

const JWT: &str = "faults-jwt-secret-faults-jwt-secret-0123";

fn checkout_state(db_url: &str, stripe: &str) -> checkout::State {
    let config = checkout::Config {
        auth: AuthConfig {
            hs256_secret: Some(Secret::new(JWT)),
            ..apps::auth_config()
        },
        stripe: apps::stripe_api(stripe, 2, Duration::from_millis(400)),
        rate_limit_per_min: 10_000,
        status_rate_limit_per_min: 10_000,
        max_wait: Duration::from_secs(5),
        ..apps::checkout_config(db_url, stripe)
    };
    apps::checkout_state(config, Store::postgres(db_url, 4).unwrap()).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clicks_per_user_for_many_users_make_one_session_each() {
    let db = TestDb::new().await;
    let sql = db.client().await;
    let stripe = FakeStripe::start().await;
    let mut users = Vec::new();
    for _ in 0..10 {
        users.push(db.create_user(&sql).await.to_string());
    }
    let states: Vec<Arc<checkout::State>> = (0..10)
        .map(|_| Arc::new(checkout_state(&db.url, &stripe.uri())))
        .collect();
    let clicks = users.iter().enumerate().flat_map(|(u, user)| {
        let states = &states;
        (0..50).map(move |i| {
            let state = states[(u * 7 + i) % states.len()].clone();
            let request = FunctionUrlRequest::post("/", b"").bearer(&tokens::hs256(
                &tokens::user_claims(user, None),
                JWT.as_bytes(),
            ));
            async move {
                let response = checkout::handle(&state, request.into_request().unwrap()).await;
                (
                    user.clone(),
                    response.status().as_u16(),
                    fixtures::json_body(&response),
                )
            }
        })
    });
    let results = futures::future::join_all(clicks).await;

    let mut urls: HashMap<String, HashSet<String>> = HashMap::new();
    for (user, status, body) in &results {
        assert_eq!(*status, 200, "{body}");
        urls.entry(user.clone())
            .or_default()
            .insert(body["url"].as_str().unwrap().to_owned());
    }
    assert!(
        urls.values().all(|u| u.len() == 1),
        "all callers of a user got the same URL"
    );
    assert_eq!(
        stripe.create_requests().await.len(),
        users.len(),
        "one create call per user reached Stripe"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_races_with_stripe_failing_still_make_one_session_per_user() {
    let db = TestDb::new().await;
    let sql = db.client().await;
    let stripe = FakeStripe::start().await;
    let mut users = Vec::new();
    for _ in 0..8 {
        users.push(db.create_user(&sql).await.to_string());
    }
    // Stripe fails often at first: 500s and 429s, and answers slower than our timeout for a while
    // (the sessions it creates meanwhile must be found again through the idempotency key).
    stripe.script((0..12).map(|i| {
        if i % 3 == 0 {
            FakeStripe::rate_limited()
        } else {
            FakeStripe::server_error()
        }
    }));
    stripe.delay(Some(Duration::from_millis(600)));
    let states: Vec<Arc<checkout::State>> = (0..8)
        .map(|_| Arc::new(checkout_state(&db.url, &stripe.uri())))
        .collect();
    let clicks = users.iter().enumerate().flat_map(|(u, user)| {
        let states = &states;
        (0..50).map(move |i| {
            let state = states[(u + i) % states.len()].clone();
            let request = FunctionUrlRequest::post("/", b"").bearer(&tokens::hs256(
                &tokens::user_claims(user, None),
                JWT.as_bytes(),
            ));
            async move {
                let response = checkout::handle(&state, request.into_request().unwrap()).await;
                (
                    user.clone(),
                    response.status().as_u16(),
                    fixtures::json_body(&response),
                )
            }
        })
    });
    let stormy = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(clicks))
        .await
        .expect("no hang");
    stripe.delay(None);

    // Every click got an answer: a URL, or a clear retryable 503.
    assert!(
        stormy.iter().all(|(_, s, _)| *s == 200 || *s == 503),
        "{:?}",
        stormy.iter().map(|r| r.1).collect::<HashSet<_>>()
    );
    // Once Stripe is well again, each user's next click gets the one session.
    let mut urls: HashMap<String, HashSet<String>> = HashMap::new();
    for (user, status, body) in &stormy {
        if *status == 200 {
            urls.entry(user.clone())
                .or_default()
                .insert(body["url"].as_str().unwrap().to_owned());
        }
    }
    for user in &users {
        let request = FunctionUrlRequest::post("/", b"").bearer(&tokens::hs256(
            &tokens::user_claims(user, None),
            JWT.as_bytes(),
        ));
        let response = checkout::handle(&states[0], request.into_request().unwrap()).await;
        assert_eq!(response.status(), 200, "{}", fixtures::json_body(&response));
        urls.entry(user.clone()).or_default().insert(
            fixtures::json_body(&response)["url"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    for user in &users {
        assert_eq!(urls[user].len(), 1, "user {user} saw {:?}", urls[user]);
    }
    // Stripe holds exactly one session per user; the database one open order each, no lease left.
    let mut sessions_per_user: HashMap<String, usize> = HashMap::new();
    for session in stripe.sessions() {
        let user = session["client_reference_id"].as_str().unwrap().to_owned();
        *sessions_per_user.entry(user).or_default() += 1;
    }
    assert_eq!(sessions_per_user.len(), users.len());
    assert!(
        sessions_per_user.values().all(|n| *n == 1),
        "{sessions_per_user:?}"
    );
    for user in &users {
        let url = urls[user].iter().next().unwrap();
        let id = url.rsplit('/').next().unwrap().split('#').next().unwrap();
        assert_eq!(
            stripe.session(id).unwrap()["client_reference_id"],
            json!(user)
        );
    }
    let row = sql.query_one(
        "select count(*), count(*) filter (where stripe_checkout_session_id is not null), count(*) filter (where session_claimed_until is not null)
         from orders", &[]).await.unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        ),
        (8, 8, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_every_request_within_the_deadline_whatever_the_upstream_does() {
    let db = TestDb::new().await;
    let sql = db.client().await;
    let user = db.create_user(&sql).await.to_string();
    let base = testkit::llm_fake::chaos_upstream().await;
    let mut config = chat::Config::read(shared::config::EnvReader::new(|k| match k {
        "DATABASE_URL" => Some(db.url.clone()),
        "SUPABASE_JWT_SECRET" => Some(JWT.into()),
        "OPENAI_API_KEY" => Some("sk-chaos".into()),
        "OPENAI_BASE_URL" => Some(base.clone()),
        "CHAT_RATE_LIMIT_PER_MIN" => Some("100000".into()),
        "CHAT_CACHE_TTL_S" => Some("0".into()),
        _ => None,
    }))
    .unwrap();
    config.timeout = Duration::from_millis(400);
    config.first_token_timeout = Duration::from_millis(400);
    config.idle_timeout = Duration::from_millis(300);
    config.total_budget = Duration::from_millis(1500);
    config.backoff = RetryPolicy {
        max_retries: 2,
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
    };
    config.openai_key = Some(Secret::new("sk-chaos"));
    let state = Arc::new(apps::chat_state(config, Store::postgres(&db.url, 4).unwrap()).0);
    let token = tokens::hs256(&tokens::user_claims(&user, None), JWT.as_bytes());
    let modes = [
        "ok",
        "hang",
        "reset",
        "slow",
        "429",
        "500",
        "malformed",
        "stall",
    ];
    let requests = (0..96).map(|i| {
        let state = state.clone();
        let body = json!({"messages": [{"role": "user", "content": format!("{} #{i}", modes[i % modes.len()])}], "stream": (i / 8) % 2 == 0}).to_string();
        let request = FunctionUrlRequest::post("/", body.as_bytes()).bearer(&token);
        async move {
            let started = Instant::now();
            let response = chat::handle(state, request.into_request().unwrap()).await;
            let status = response.status().as_u16();
            let source = response.headers()[chat::SOURCE_HEADER].to_str().unwrap().to_owned();
            let body = response.into_body().collect().await;
            (modes[i % modes.len()], (i / 8) % 2 == 0, status, source, started.elapsed(), body)
        }
    });
    let results = futures::future::join_all(requests).await;

    let mut latencies: Vec<f64> = results.iter().map(|r| r.4.as_secs_f64() * 1000.0).collect();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut mix: HashMap<&str, usize> = HashMap::new();
    for (mode, stream, status, source, elapsed, body) in &results {
        assert_eq!(*status, 200, "{mode}");
        assert!(
            *elapsed < Duration::from_millis(2500),
            "{mode} took {elapsed:?}"
        );
        assert!(!body.is_empty(), "{mode} answered something");
        *mix.entry(source.as_str()).or_default() += 1;
        if matches!(*mode, "ok" | "slow") {
            assert_eq!(source, "llm", "{mode}");
        }
        if matches!(*mode, "hang" | "reset" | "429" | "500" | "malformed")
            || (*mode == "stall" && !stream)
        {
            assert_eq!(source, "rules", "{mode}");
        }
        if *mode == "stall" && *stream {
            assert_eq!(source, "llm");
            assert!(
                String::from_utf8_lossy(body).contains("stream_stalled"),
                "a stalled stream ends with an error event"
            );
        }
    }
    eprintln!(
        "chat under upstream faults: {} requests, latency p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms, sources {:?}",
        results.len(), latencies[latencies.len() / 2], latencies[latencies.len() * 95 / 100], latencies[latencies.len() - 1], mix
    );
}
