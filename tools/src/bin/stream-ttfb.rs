//! Measures time to first byte and gaps between chunks of streamed chat answers through a local
//! stand-in for the Lambda Runtime API, with the real release binary of the `chat` function.
//!
//! Usage: stream-ttfb [--binary target/release/chat] [--requests 50]
//! Needs the local PostgreSQL (a fresh database is made and dropped).

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use testkit::fixtures::{self, FunctionUrlRequest};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut binary = "target/release/chat".to_owned();
    let mut requests = 50usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--binary", Some(v)) => binary = v,
            ("--requests", Some(v)) => requests = v.parse().unwrap_or(requests),
            _ => {
                eprintln!("usage: stream-ttfb [--binary PATH] [--requests N]");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            testkit::llm_fake::sse(&["Hello", ", ", "world", "!"]),
            "text/event-stream",
        ))
        .mount(&upstream)
        .await;
    let db = testkit::db::TestDb::new().await;
    let sql = db.client().await;
    let user = db.create_user(&sql).await.to_string();
    let secret = "bench-jwt-secret-bench-jwt-secret-0123";
    let token = testkit::tokens::hs256(
        &testkit::tokens::user_claims(&user, None),
        secret.as_bytes(),
    );
    let mut api = testkit::runtime_api::RuntimeApi::start().await;

    let mut child = match tokio::process::Command::new(&binary)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_LAMBDA_RUNTIME_API", api.addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "chat")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_LEVEL", "error")
        .env("DATABASE_URL", &db.url)
        .env("SUPABASE_JWT_SECRET", secret)
        .env("OPENAI_API_KEY", "sk-bench")
        .env("OPENAI_BASE_URL", format!("{}/v1", upstream.uri()))
        .env("CHAT_CACHE_TTL_S", "0")
        .env("CHAT_RATE_LIMIT_PER_MIN", "100000")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("cannot start {binary}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };

    let mut ttfb = Vec::new();
    let mut gaps = Vec::new();
    let mut totals = Vec::new();
    for i in 0..requests {
        let body = json!({"messages": [{"role": "user", "content": format!("question {i}")}], "stream": true});
        let event = FunctionUrlRequest::post("/v1/chat/completions", body.to_string().as_bytes())
            .header("authorization", &format!("Bearer {token}"));
        api.invoke(event.event().to_string()).await;
        let Some(outcome) = api.outcome(Duration::from_secs(10)).await else {
            eprintln!("no answer to request {i}");
            return std::process::ExitCode::FAILURE;
        };
        if i == 0 && !String::from_utf8_lossy(&outcome.body).contains("Hello") {
            eprintln!(
                "unexpected answer: {}",
                String::from_utf8_lossy(&outcome.body)
            );
            return std::process::ExitCode::FAILURE;
        }
        if i < 3 {
            continue; // warm-up: connections to the database and the upstream
        }
        if let Some(t) = outcome.time_to_first_byte() {
            ttfb.push(t.as_secs_f64() * 1000.0);
        }
        for pair in outcome.body_reads.windows(2) {
            gaps.push(pair[1].0.duration_since(pair[0].0).as_secs_f64() * 1000.0);
        }
        totals.push(outcome.total().as_secs_f64() * 1000.0);
    }
    let _ = child.kill().await;
    for v in [&mut ttfb, &mut gaps, &mut totals] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    }
    println!(
        "streamed chat through the Runtime API stand-in ({} measured requests, {binary})",
        ttfb.len()
    );
    println!("| metric | p50 ms | p95 ms | max ms |");
    println!("|---|---|---|---|");
    for (name, v) in [
        ("time to first byte", &ttfb),
        ("gap between chunks", &gaps),
        ("whole answer", &totals),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            percentile(v, 50.0),
            percentile(v, 95.0),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    let _ = fixtures::now();
    std::process::ExitCode::SUCCESS
}
