//! Cold start, warm latency, CPU, peak memory and database round trips of the three release
//! binaries, driven through a local stand-in for the Lambda Runtime API with real function-URL
//! events, against local fakes (Stripe, OpenAI) and the local PostgreSQL.
//!
//! Usage: lambda-bench [--bin-dir target/release] [--warm 1000]
//! Prints a markdown table (README, Benchmarks).

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::fixtures::{self, FunctionUrlRequest};
use testkit::runtime_api::RuntimeApi;
use tokio_postgres::Client;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const WEBHOOK_SECRET: &str = "whsec_bench";
const JWT_SECRET: &str = "bench-jwt-secret-bench-jwt-secret-0123";

struct Process {
    child: tokio::process::Child,
    api: RuntimeApi,
    pid: u32,
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is [0]; utime is field 14 overall -> [11], stime [12].
    fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

async fn spawn(binary: &str, env: &[(&str, String)]) -> (Process, Instant) {
    let api = RuntimeApi::start().await;
    let mut command = tokio::process::Command::new(binary);
    command
        .env_clear()
        .env("AWS_LAMBDA_RUNTIME_API", api.addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "bench")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_LEVEL", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let started = Instant::now();
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    let pid = child.id().unwrap_or(0);
    (Process { child, api, pid }, started)
}

struct Row {
    function: &'static str,
    branch: &'static str,
    p50_us: f64,
    p99_us: f64,
    cpu_us: f64,
}

async fn branch(
    process: &mut Process,
    sql: &Client,
    db: &str,
    function: &'static str,
    name: &'static str,
    n: usize,
    mut event: impl FnMut(usize) -> String,
) -> Row {
    let _ = (sql, db);
    let before_cpu = cpu_ticks(process.pid);
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        process.api.invoke(event(i)).await;
        let outcome = process
            .api
            .outcome(Duration::from_secs(20))
            .await
            .expect("answer");
        times.push(outcome.total().as_secs_f64() * 1e6);
    }
    let cpu = cpu_ticks(process.pid) - before_cpu;
    times.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let ticks_per_s = 100.0;
    Row {
        function,
        branch: name,
        p50_us: times[times.len() / 2],
        p99_us: times[(times.len() * 99 / 100).min(times.len() - 1)],
        cpu_us: cpu as f64 / ticks_per_s * 1e6 / n as f64,
    }
}

/// Sends the first event of a fresh process: (name, spawn to first response, spawn to first
/// `next`, binary path).
async fn first_invocation(
    process: &mut Process,
    started: Instant,
    name: &'static str,
    binary: &str,
    event: String,
) -> (&'static str, Duration, Duration, String) {
    process.api.invoke(event).await;
    let first = process
        .api
        .outcome(Duration::from_secs(20))
        .await
        .expect("first answer");
    (
        name,
        first.finished.duration_since(started),
        first.handed_out.duration_since(started),
        binary.to_owned(),
    )
}

fn webhook_event(secret: &str, event: &serde_json::Value) -> String {
    let body = fixtures::body(event);
    FunctionUrlRequest::post("/", &body)
        .header("stripe-signature", &fixtures::sign(&body, secret))
        .event()
        .to_string()
}

fn bearer_event(token: &str, body: &str) -> String {
    FunctionUrlRequest::post("/", body.as_bytes())
        .bearer(token)
        .event()
        .to_string()
}

#[tokio::main]
async fn main() {
    let mut bin_dir = "target/release".to_owned();
    let mut warm = 1000usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--bin-dir", Some(v)) => bin_dir = v,
            ("--warm", Some(v)) => warm = v.parse().unwrap_or(warm),
            _ => {
                eprintln!("usage: lambda-bench [--bin-dir DIR] [--warm N]");
                std::process::exit(2);
            }
        }
    }
    let db = testkit::db::TestDb::new().await;
    let sql = db.client().await;
    let stripe = testkit::stripe_fake::FakeStripe::start().await;
    let openai = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(testkit::llm_fake::completion(
                "Hello from the fake upstream.",
            )),
        )
        .mount(&openai)
        .await;
    let common = vec![
        ("DATABASE_URL", db.url.clone()),
        ("SUPABASE_JWT_SECRET", JWT_SECRET.to_owned()),
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
        ("STRIPE_SECRET_KEY", testkit::stripe_fake::KEY.to_owned()),
        ("STRIPE_API_BASE", stripe.uri()),
        ("STRIPE_FULL_REPORT_PRICE_ID", "price_bench".to_owned()),
        ("CHECKOUT_RATE_LIMIT_PER_MIN", "10000".to_owned()),
        ("CHAT_RATE_LIMIT_PER_MIN", "100000".to_owned()),
        ("OPENAI_BASE_URL", format!("{}/v1", openai.uri())),
    ];
    let mut users = Vec::new();
    for _ in 0..(warm + 3) {
        users.push(db.create_user(&sql).await.to_string());
    }
    let token = |u: &str| {
        testkit::tokens::hs256(
            &testkit::tokens::user_claims(u, None),
            JWT_SECRET.as_bytes(),
        )
    };
    let mut rows = Vec::new();
    let mut colds = Vec::new();

    // webhook
    let binary = format!("{bin_dir}/webhook");
    let (mut p, started) = spawn(&binary, &common).await;
    let invoice = |id: String| {
        let mut e = fixtures::load("stripe/invoice.paid.dahlia.json");
        fixtures::set(&mut e, "/id", json!(id));
        fixtures::set(&mut e, "/created", json!(fixtures::now()));
        e
    };
    colds.push(
        first_invocation(
            &mut p,
            started,
            "webhook",
            &binary,
            webhook_event(WEBHOOK_SECRET, &invoice(fixtures::event_id())),
        )
        .await,
    );
    rows.push(
        branch(&mut p, &sql, &db.name, "webhook", "new event", warm, |_| {
            webhook_event(WEBHOOK_SECRET, &invoice(fixtures::event_id()))
        })
        .await,
    );
    let dup = invoice(fixtures::event_id());
    rows.push(
        branch(
            &mut p,
            &sql,
            &db.name,
            "webhook",
            "duplicate event",
            warm,
            |_| webhook_event(WEBHOOK_SECRET, &dup),
        )
        .await,
    );
    let webhook_rss = peak_rss_kib(p.pid);
    let _ = p.child.kill().await;

    // checkout
    let binary = format!("{bin_dir}/checkout");
    let (mut p, started) = spawn(&binary, &common).await;
    colds.push(
        first_invocation(
            &mut p,
            started,
            "checkout",
            &binary,
            bearer_event(&token(&users[0]), ""),
        )
        .await,
    );
    let fresh: Vec<String> = users[3..].iter().map(|u| token(u)).collect();
    rows.push(
        branch(
            &mut p,
            &sql,
            &db.name,
            "checkout",
            "new session",
            warm,
            |i| bearer_event(&fresh[i], ""),
        )
        .await,
    );
    let reuse = token(&users[0]);
    rows.push(
        branch(
            &mut p,
            &sql,
            &db.name,
            "checkout",
            "reused session",
            warm,
            |_| bearer_event(&reuse, ""),
        )
        .await,
    );
    sql.execute(
        "insert into orders (user_id, status, paid_at) values ($1::text::uuid, 'paid', now())",
        &[&users[1]],
    )
    .await
    .expect("paid order");
    let paid = token(&users[1]);
    rows.push(
        branch(
            &mut p,
            &sql,
            &db.name,
            "checkout",
            "already paid",
            warm,
            |_| bearer_event(&paid, ""),
        )
        .await,
    );
    let checkout_rss = peak_rss_kib(p.pid);
    let _ = p.child.kill().await;

    // chat
    let binary = format!("{bin_dir}/chat");
    let mut chat_env = common.clone();
    chat_env.push(("OPENAI_API_KEY", "sk-bench".to_owned()));
    let (mut p, started) = spawn(&binary, &chat_env).await;
    let chat_token = token(&users[2]);
    let ask = |text: String| {
        bearer_event(
            &chat_token,
            &json!({"messages": [{"role": "user", "content": text}]}).to_string(),
        )
    };
    colds.push(first_invocation(&mut p, started, "chat", &binary, ask("cold".into())).await);
    rows.push(
        branch(&mut p, &sql, &db.name, "chat", "llm", warm, |i| {
            ask(format!("question {i}"))
        })
        .await,
    );
    rows.push(
        branch(&mut p, &sql, &db.name, "chat", "cache", warm, |_| {
            ask("question 0".into())
        })
        .await,
    );
    let chat_rss = peak_rss_kib(p.pid);
    let _ = p.child.kill().await;
    let mut rules_env = common.clone();
    rules_env.push(("CHAT_CACHE_TTL_S", "0".to_owned()));
    let (mut p, _) = spawn(&binary, &rules_env).await;
    rows.push(
        branch(
            &mut p,
            &sql,
            &db.name,
            "chat",
            "rules (no key)",
            warm,
            |i| ask(format!("how much is the full report {i}")),
        )
        .await,
    );
    let _ = p.child.kill().await;

    println!("Lambda Runtime API stand-in, release binaries, {warm} warm invocations per branch");
    println!();
    println!("| function | cold start (spawn to first response) | of which init (spawn to first `next`) | peak RSS | stripped binary |");
    println!("|---|---|---|---|---|");
    for ((name, cold, init, path), rss) in colds.iter().zip([webhook_rss, checkout_rss, chat_rss]) {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.1} MiB | {:.2} MB |",
            cold.as_secs_f64() * 1000.0,
            init.as_secs_f64() * 1000.0,
            rss as f64 / 1024.0,
            size as f64 / 1e6
        );
    }
    println!();
    let trips = round_trips(&db, &stripe, &openai, &users).await;
    println!("| function | branch | p50 | p99 | CPU per invocation | DB round trips |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let counted = trips
            .iter()
            .find(|(f, b, _)| *f == r.function && *b == r.branch)
            .map(|t| t.2.to_string())
            .unwrap_or_else(|| "?".into());
        println!(
            "| {} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {counted} |",
            r.function, r.branch, r.p50_us, r.p99_us, r.cpu_us
        );
    }
}

/// Database round trips per request of each branch, counted at the store (`Store::round_trips`)
/// with the handlers run in-process on the same database and fakes.
async fn round_trips(
    db: &testkit::db::TestDb,
    stripe: &testkit::stripe_fake::FakeStripe,
    openai: &MockServer,
    users: &[String],
) -> Vec<(&'static str, &'static str, u64)> {
    use shared::config::{Secret, StoreConfig, StripeMode};
    use shared::store::Store;
    use std::sync::Arc;
    let sql = db.client().await;
    let mut out = Vec::new();
    let store = Store::postgres(&db.url, 1).expect("store");
    let webhook = webhook::State {
        config: webhook::Config {
            store: StoreConfig::Postgres {
                url: Secret::new(&db.url),
                ca_pem: None,
            },
            secrets: vec![Secret::new(WEBHOOK_SECRET)],
            tolerance: Duration::from_secs(300),
            stripe_mode: StripeMode::Test,
            max_body_bytes: 1 << 20,
        },
        store: store.clone(),
        metrics: shared::telemetry::Metrics::in_memory("webhook").0,
    };
    let mut event = fixtures::load("stripe/invoice.paid.dahlia.json");
    fixtures::set(&mut event, "/id", json!(fixtures::event_id()));
    fixtures::set(&mut event, "/created", json!(fixtures::now()));
    for name in ["new event", "duplicate event"] {
        let before = store.round_trips();
        let request: lambda_http::Request = serde_json::from_str::<
            lambda_http::request::LambdaRequest,
        >(&webhook_event(WEBHOOK_SECRET, &event))
        .map(|l| shared::lambda::into_request(l, lambda_http::Context::default()).expect("request"))
        .expect("event");
        webhook::handle(&webhook, request).await;
        out.push(("webhook", name, store.round_trips() - before));
    }
    let env = |k: &str| -> Option<String> {
        match k {
            "DATABASE_URL" => Some(db.url.clone()),
            "SUPABASE_JWT_SECRET" => Some(JWT_SECRET.into()),
            "STRIPE_SECRET_KEY" => Some(testkit::stripe_fake::KEY.into()),
            "STRIPE_API_BASE" => Some(stripe.uri()),
            "STRIPE_FULL_REPORT_PRICE_ID" => Some("price_bench".into()),
            "OPENAI_API_KEY" => Some("sk-bench".into()),
            "OPENAI_BASE_URL" => Some(format!("{}/v1", openai.uri())),
            "CHECKOUT_RATE_LIMIT_PER_MIN" => Some("10000".into()),
            "CHAT_RATE_LIMIT_PER_MIN" => Some("10000".into()),
            _ => None,
        }
    };
    let config =
        checkout::Config::read(shared::config::EnvReader::new(env)).expect("checkout config");
    let mut checkout = checkout::State::new(config).expect("checkout state");
    checkout.metrics = shared::telemetry::Metrics::in_memory("checkout").0;
    let buyer = db.create_user(&sql).await.to_string();
    let request = |user: &str| {
        let event = bearer_event(
            &testkit::tokens::hs256(
                &testkit::tokens::user_claims(user, None),
                JWT_SECRET.as_bytes(),
            ),
            "",
        );
        shared::lambda::into_request(
            serde_json::from_str(&event).expect("event"),
            lambda_http::Context::default(),
        )
        .expect("request")
    };
    let _ = users;
    let payer = db.create_user(&sql).await.to_string();
    sql.execute(
        "insert into orders (user_id, status, paid_at) values ($1::text::uuid, 'paid', now())",
        &[&payer],
    )
    .await
    .expect("paid");
    for (name, user) in [
        ("new session", buyer.clone()),
        ("reused session", buyer),
        ("already paid", payer),
    ] {
        let before = checkout.store.round_trips();
        checkout::handle(&checkout, request(&user)).await;
        out.push(("checkout", name, checkout.store.round_trips() - before));
    }
    let config = chat::Config::read(shared::config::EnvReader::new(env)).expect("chat config");
    let mut chat = chat::State::new(config).expect("chat state");
    chat.metrics = shared::telemetry::Metrics::in_memory("chat").0;
    let chat = Arc::new(chat);
    let asker = db.create_user(&sql).await.to_string();
    let ask = |text: &str| {
        let event = bearer_event(
            &testkit::tokens::hs256(
                &testkit::tokens::user_claims(&asker, None),
                JWT_SECRET.as_bytes(),
            ),
            &json!({"messages": [{"role": "user", "content": text}]}).to_string(),
        );
        shared::lambda::into_request(
            serde_json::from_str(&event).expect("event"),
            lambda_http::Context::default(),
        )
        .expect("request")
    };
    for (name, text) in [("llm", "round trips?"), ("cache", "round trips?")] {
        let before = chat.store.round_trips();
        let _ = chat::handle(chat.clone(), ask(text))
            .await
            .into_body()
            .collect()
            .await;
        out.push(("chat", name, chat.store.round_trips() - before));
    }
    let rules_config = chat::Config::read(shared::config::EnvReader::new(|k| {
        if k == "OPENAI_API_KEY" {
            None
        } else {
            env(k)
        }
    }))
    .expect("chat config");
    let mut rules = chat::State::new(rules_config).expect("chat state");
    rules.metrics = shared::telemetry::Metrics::in_memory("chat").0;
    let rules = Arc::new(rules);
    let before = rules.store.round_trips();
    let _ = chat::handle(rules.clone(), ask("how much"))
        .await
        .into_body()
        .collect()
        .await;
    out.push(("chat", "rules (no key)", rules.store.round_trips() - before));
    out
}
