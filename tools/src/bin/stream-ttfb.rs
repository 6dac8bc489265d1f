//! Measures time to first byte and gaps between chunks of streamed chat answers through a local
//! stand-in for the Lambda Runtime API, with the real release binary of the `chat` function, in
//! both protocols it speaks (the OpenAI stream and the AI SDK's UI message stream).
//!
//! Usage: stream-ttfb [--binary target/release/chat] [--requests 50]   (requests per protocol)
//! Needs the local PostgreSQL (a fresh database is made and dropped).

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use testkit::fixtures::{self, FunctionUrlRequest};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Milliseconds measured for one protocol.
#[derive(Default)]
struct Samples {
    ttfb: Vec<f64>,
    gaps: Vec<f64>,
    totals: Vec<f64>,
}

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

    // Both protocols the function speaks, alternated request by request so they share the
    // machine's ups and downs: the OpenAI format, and the AI SDK's UI message stream (useChat).
    let protocols = [
        (
            "OpenAI `chat.completion.chunk`",
            "/v1/chat/completions",
            "Hello",
        ),
        ("AI SDK UI message stream", "/", "\"delta\":\"Hello\""),
    ];
    let mut samples: Vec<Samples> = protocols.iter().map(|_| Samples::default()).collect();
    for i in 0..requests * protocols.len() {
        let which = i % protocols.len();
        let (_, path, expect) = protocols[which];
        let question = format!("question {i}");
        let body = if path == "/" {
            json!({"id": format!("chat-{i}"), "trigger": "submit-message",
                "messages": [{"id": format!("m-{i}"), "role": "user", "parts": [{"type": "text", "text": question}]}]})
        } else {
            json!({"messages": [{"role": "user", "content": question}], "stream": true})
        };
        let event = FunctionUrlRequest::post(path, body.to_string().as_bytes())
            .header("authorization", &format!("Bearer {token}"));
        api.invoke(event.event().to_string()).await;
        let Some(outcome) = api.outcome(Duration::from_secs(10)).await else {
            eprintln!("no answer to request {i}");
            return std::process::ExitCode::FAILURE;
        };
        if i < 2 * protocols.len() {
            if !String::from_utf8_lossy(&outcome.body).contains(expect) {
                eprintln!(
                    "unexpected answer on {path}: {}",
                    String::from_utf8_lossy(&outcome.body)
                );
                return std::process::ExitCode::FAILURE;
            }
            continue; // warm-up: connections to the database and the upstream
        }
        let s = &mut samples[which];
        if let Some(t) = outcome.time_to_first_byte() {
            s.ttfb.push(t.as_secs_f64() * 1000.0);
        }
        for pair in outcome.body_reads.windows(2) {
            s.gaps
                .push(pair[1].0.duration_since(pair[0].0).as_secs_f64() * 1000.0);
        }
        s.totals.push(outcome.total().as_secs_f64() * 1000.0);
    }
    let _ = child.kill().await;
    println!(
        "streamed chat through the Runtime API stand-in ({} measured requests per protocol, {binary})",
        samples[0].ttfb.len()
    );
    println!("| stream | time to first byte p50 | p95 | max | gap between chunks p50 | whole answer p50 |");
    println!("|---|---|---|---|---|---|");
    for ((name, _, _), s) in protocols.iter().zip(&mut samples) {
        for v in [&mut s.ttfb, &mut s.gaps, &mut s.totals] {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        }
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            percentile(&s.ttfb, 50.0),
            percentile(&s.ttfb, 95.0),
            s.ttfb.last().copied().unwrap_or(f64::NAN),
            percentile(&s.gaps, 50.0),
            percentile(&s.totals, 50.0),
        );
    }
    let _ = fixtures::now();
    std::process::ExitCode::SUCCESS
}
