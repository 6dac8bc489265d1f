//! Cold start, warm latency, CPU, peak memory and database round trips of the three release
//! binaries, driven through a local stand-in for the Lambda Runtime API with real function-URL
//! events, against local fakes (Stripe, OpenAI) and the local PostgreSQL.
//!
//! The Node.js baseline (`--node`) covers chat only: its webhook and checkout implemented the SQL
//! contract that issue 20 replaced (events as commands, `apply_stripe_event`), and were removed.
//!
//! Usage: lambda-bench [--bin-dir target/release] [--warm 1000]
//! Prints a markdown table (README, Benchmarks).

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::fixtures::{self, FunctionUrlRequest};
use testkit::postgrest::PostgRest;
use testkit::runtime_api::{Outcome, RuntimeApi};
use tokio_postgres::Client;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const WEBHOOK_SECRET: &str = "whsec_bench";
const JWT_SECRET: &str = "bench-jwt-secret-bench-jwt-secret-0123";
const SERVICE_KEY: &str = "bench-service-role-key";
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// One function implementation to run: a Rust release binary (direct PostgreSQL or through the
/// PostgREST stand-in) or the Node.js baseline (supabase-js through the PostgREST stand-in; chat
/// only, see `runs_function`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Impl {
    RustDirect,
    RustRest,
    Node,
    /// `noop-function`: the runtime client and adapter with a handler that answers at once.
    RuntimeFloor,
    /// The Rust binary with `DATABASE_URL` through a transaction-mode pooler (PgBouncer).
    RustPooled,
}

impl Impl {
    /// Whether this implementation exists for `function`: the Node.js baseline is chat only.
    fn runs_function(self, function: &str) -> bool {
        self != Impl::Node || function == "chat"
    }

    fn label(self) -> &'static str {
        match self {
            Impl::RustDirect => "Rust, direct PostgreSQL",
            Impl::RustRest => "Rust, PostgREST",
            Impl::Node => "Node.js, supabase-js",
            Impl::RuntimeFloor => "Rust runtime floor (answers at once, no database call)",
            Impl::RustPooled => "Rust, PostgreSQL through PgBouncer (transaction mode)",
        }
    }
}

struct Process {
    child: tokio::process::Child,
    api: RuntimeApi,
    pid: u32,
}

impl Process {
    /// Sends one event and waits for the answer; panics on a missing answer or an unexpected
    /// status, so a benchmark never times error paths by accident.
    async fn invoke(&mut self, event: String, expect: &Expect) -> Outcome {
        self.api.invoke(event).await;
        let outcome = tokio::select! {
            outcome = self.api.outcome(ANSWER_TIMEOUT) => outcome
                .unwrap_or_else(|| panic!("no answer from pid {} within {ANSWER_TIMEOUT:?}", self.pid)),
            status = self.child.wait() => panic!("pid {} exited before answering: {status:?}", self.pid),
        };
        expect.check(&outcome);
        outcome
    }

    /// CPU time used so far by all the process's threads (scheduler statistics, nanoseconds).
    fn cpu_ns(&self) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return 0;
        };
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmHWM:")
                    .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))
            })
            .unwrap_or(0)
    }

    /// SIGTERM first (a profiler wrapping the function writes its output), SIGKILL after 5 s.
    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.pid.to_string())
            .status();
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// What an answer must look like.
struct Expect {
    status: u16,
    /// `x-chat-source` must be this.
    source: Option<&'static str>,
}

impl Expect {
    const fn status(status: u16) -> Expect {
        Expect {
            status,
            source: None,
        }
    }

    fn check(&self, outcome: &Outcome) {
        let head: serde_json::Value = match &outcome.prelude {
            Some(prelude) => serde_json::from_str(prelude).unwrap_or_default(),
            None => serde_json::from_slice(&outcome.body).unwrap_or_default(),
        };
        let status = head["statusCode"].as_u64().unwrap_or(0);
        let source = head["headers"]["x-chat-source"].as_str();
        let body = String::from_utf8_lossy(&outcome.body);
        assert!(
            outcome.kind == "response" && status == u64::from(self.status),
            "expected {} got {} {status}: {}",
            self.status,
            outcome.kind,
            body.chars().take(400).collect::<String>()
        );
        if let Some(want) = self.source {
            assert_eq!(
                source,
                Some(want),
                "x-chat-source: {}",
                body.chars().take(400).collect::<String>()
            );
        }
    }
}

/// Everything the functions talk to, shared by every run.
struct Upstreams {
    db: testkit::db::TestDb,
    sql: Client,
    stripe: testkit::stripe_fake::FakeStripe,
    openai: MockServer,
    rest: PostgRest,
    node_dir: Option<String>,
    bin_dir: String,
    /// Server URL of a transaction-mode pooler in front of the same PostgreSQL.
    pooler: Option<String>,
    /// The same peers behind TLS (`--tls`).
    tls: Option<bench::tls::TlsPeers>,
}

impl Upstreams {
    fn env(&self, which: Impl, function: &str, tls: bool) -> Vec<(&'static str, String)> {
        if let (true, Some(peers)) = (tls, &self.tls) {
            return self.tls_env(peers, which, function);
        }
        let mut env = vec![
            ("SUPABASE_JWT_SECRET", JWT_SECRET.to_owned()),
            ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
            ("STRIPE_SECRET_KEY", testkit::stripe_fake::KEY.to_owned()),
            ("STRIPE_API_BASE", self.stripe.uri()),
            ("STRIPE_FULL_REPORT_PRICE_ID", "price_bench".to_owned()),
            ("CHECKOUT_RATE_LIMIT_PER_MIN", "10000".to_owned()),
            ("CHAT_RATE_LIMIT_PER_MIN", "100000".to_owned()),
            // On (the production path reads the day's usage) but out of reach of long runs.
            ("CHAT_DAILY_TOKEN_BUDGET", "1000000000".to_owned()),
            ("OPENAI_BASE_URL", format!("{}/v1", self.openai.uri())),
        ];
        if function == "chat" {
            env.push(("OPENAI_API_KEY", "sk-bench".to_owned()));
        }
        match which {
            Impl::RustDirect => env.push(("DATABASE_URL", self.db.url.clone())),
            Impl::RustPooled => env.push((
                "DATABASE_URL",
                testkit::db::url_for(self.pooler.as_deref().unwrap_or_default(), &self.db.name),
            )),
            Impl::RustRest | Impl::Node | Impl::RuntimeFloor => {
                env.push(("SUPABASE_URL", self.rest.uri()));
                env.push(("SUPABASE_SERVICE_ROLE_KEY", SERVICE_KEY.to_owned()));
            }
        }
        env
    }

    /// `env` with every peer behind TLS: the same stand-ins through the run's TLS fronts.
    fn tls_env(
        &self,
        peers: &bench::tls::TlsPeers,
        which: Impl,
        function: &str,
    ) -> Vec<(&'static str, String)> {
        let mut env: Vec<(&'static str, String)> = self
            .env(which, function, false)
            .into_iter()
            .filter(|(k, _)| {
                !matches!(
                    *k,
                    "STRIPE_API_BASE" | "OPENAI_BASE_URL" | "SUPABASE_URL" | "DATABASE_URL"
                )
            })
            .collect();
        env.push(("STRIPE_API_BASE", peers.stripe.uri()));
        env.push(("OPENAI_BASE_URL", format!("{}/v1", peers.openai.uri())));
        match which {
            Impl::RustDirect => env.push(("DATABASE_URL", peers.db_url(&self.db.name))),
            Impl::RustPooled => env.push((
                "DATABASE_URL",
                peers.pooler_url(&self.db.name).unwrap_or_default(),
            )),
            Impl::RustRest | Impl::Node | Impl::RuntimeFloor => {
                env.push(("SUPABASE_URL", peers.rest.uri()));
            }
        }
        env.extend(peers.env());
        env
    }

    fn command(&self, which: Impl, function: &str) -> (String, Vec<String>) {
        match which {
            Impl::RustDirect | Impl::RustRest | Impl::RustPooled => {
                (format!("{}/{function}", self.bin_dir), vec![])
            }
            Impl::RuntimeFloor => {
                let here = std::env::current_exe().unwrap_or_default();
                let dir = here
                    .parent()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                (format!("{dir}/noop-function"), vec![])
            }
            Impl::Node => (
                "node".to_owned(),
                vec![format!(
                    "{}/{function}.js",
                    self.node_dir.as_deref().unwrap_or("bench/node/dist")
                )],
            ),
        }
    }

    async fn spawn(
        &self,
        which: Impl,
        function: &str,
        extra: &[(&str, &str)],
    ) -> (Process, Instant) {
        self.spawn_in(which, function, extra, false).await
    }

    /// `spawn`, with every peer behind TLS when `tls`.
    async fn spawn_in(
        &self,
        which: Impl,
        function: &str,
        extra: &[(&str, &str)],
        tls: bool,
    ) -> (Process, Instant) {
        let api = RuntimeApi::start().await;
        let (program, args) = self.command(which, function);
        // BENCH_WRAP="strace -f -ttt -o /tmp/trace" runs the function under a tracer or profiler;
        // BENCH_WRAP_ONLY=webhook limits that to one function. CPU and RSS then describe the
        // wrapper's pid: the function itself under valgrind (same process), the tool otherwise.
        let only = std::env::var("BENCH_WRAP_ONLY").unwrap_or_default();
        let wrap = if only.is_empty() || only == function {
            std::env::var("BENCH_WRAP").unwrap_or_default()
        } else {
            String::new()
        };
        let mut words = wrap.split_whitespace();
        let mut command = match words.next() {
            Some(tool) => {
                let mut c = tokio::process::Command::new(tool);
                c.args(words).arg(&program);
                c
            }
            None => tokio::process::Command::new(&program),
        };
        command
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_LAMBDA_RUNTIME_API", api.addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", function)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_LEVEL", "error")
            .env("NODE_ENV", "production")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in self.env(which, function, tls) {
            command.env(k, v);
        }
        for (k, v) in extra {
            command.env(k, v);
        }
        let started = Instant::now();
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let pid = child.id().unwrap_or(0);
        (Process { child, api, pid }, started)
    }

    /// `n` new users (auth.users rows).
    async fn users(&self, n: usize) -> Vec<String> {
        self.sql
            .query(
                "insert into auth.users (id, email)
                 select id, replace(id::text, '-', '') || '@example.com'
                 from (select gen_random_uuid() as id from generate_series(1, $1::int)) u
                 returning id::text",
                &[&(n as i32)],
            )
            .await
            .expect("users")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    async fn paid_user(&self) -> String {
        paid_order(&self.sql, &self.stripe).await.0
    }

    async fn refunded_payment(&self) -> (serde_json::Value, serde_json::Value) {
        refunded_payment(&self.sql, &self.stripe).await
    }
}

/// A new user's order with a session of ours, paid at the fake Stripe (nothing delivered yet:
/// the facts design knows a payment only from what it read at Stripe, so a `paid` row alone is
/// no payment). Answers the user and the payment intent.
async fn paid_order(sql: &Client, stripe: &testkit::stripe_fake::FakeStripe) -> (String, String) {
    let row = sql
        .query_one(
            "with u as (insert into auth.users (id, email)
                        select id, replace(id::text, '-', '') || '@example.com'
                        from (select gen_random_uuid() as id) g returning id)
             insert into orders (user_id) select id from u returning user_id::text, id::text",
            &[],
        )
        .await
        .expect("order");
    let (user, order): (String, String) = (row.get(0), row.get(1));
    let session = stripe.session_for_order(&user, &order);
    sql.execute(
        "update orders set stripe_checkout_session_id = $2, session_created_at = now()
         where id = $1::text::uuid",
        &[&order, &session],
    )
    .await
    .expect("attach");
    (user, stripe.pay(&session).expect("pay"))
}

/// A paid order (`paid_order`), then partly refunded (500 of 1900: the order stays paid).
/// Answers the events the fake sent for it: `checkout.session.completed` (its first delivery
/// pays the order) and `charge.refunded`, whose delivery makes the webhook read the payment
/// intent (latest charge expanded), its refunds and its disputes.
async fn refunded_payment(
    sql: &Client,
    stripe: &testkit::stripe_fake::FakeStripe,
) -> (serde_json::Value, serde_json::Value) {
    let (_, pi) = paid_order(sql, stripe).await;
    stripe.refund(&pi, Some(500)).expect("partial refund");
    let events = stripe.take_events();
    let find = |type_: &str| {
        events
            .iter()
            .find(|e| e["type"] == type_ && e["data"]["object"]["payment_intent"] == pi.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("no {type_} event for {pi}"))
    };
    (find("checkout.session.completed"), find("charge.refunded"))
}

/// `event` delivered anew: a new id, created now.
fn redelivered(event: &serde_json::Value) -> serde_json::Value {
    let mut e = event.clone();
    fixtures::set(&mut e, "/id", json!(fixtures::event_id()));
    fixtures::set(&mut e, "/created", json!(fixtures::now()));
    e
}

/// `iss` of the tokens: the PostgREST stand-in's Auth URL, which the functions check when they
/// are given `SUPABASE_URL` (and ignore otherwise); its TLS front's in the TLS setting.
static ISSUER: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

fn set_issuer(supabase_url: &str) {
    if let Ok(mut issuer) = ISSUER.lock() {
        *issuer = format!("{supabase_url}/auth/v1");
    }
}

fn token(user: &str) -> String {
    let issuer = ISSUER.lock().map(|i| i.clone()).unwrap_or_default();
    testkit::tokens::hs256(
        &testkit::tokens::user_claims(user, Some(issuer.as_str()).filter(|i| !i.is_empty())),
        JWT_SECRET.as_bytes(),
    )
}

fn webhook_event(event: &serde_json::Value) -> String {
    let body = fixtures::body(event);
    FunctionUrlRequest::post("/", &body)
        .header("stripe-signature", &fixtures::sign(&body, WEBHOOK_SECRET))
        .event()
        .to_string()
}

/// A new `invoice.paid` event; its invoice is the fixture's, which the fake Stripe holds (the
/// webhook reads it back).
fn invoice() -> serde_json::Value {
    let mut e = fixtures::load("stripe/invoice.paid.dahlia.json");
    fixtures::set(&mut e, "/id", json!(fixtures::event_id()));
    fixtures::set(&mut e, "/created", json!(fixtures::now()));
    e
}

fn bearer_event(user: &str, body: &str) -> String {
    FunctionUrlRequest::post("/", body.as_bytes())
        .bearer(&token(user))
        .event()
        .to_string()
}

fn chat_event(user: &str, text: &str) -> String {
    bearer_event(
        user,
        &json!({"messages": [{"role": "user", "content": text}]}).to_string(),
    )
}

/// The first (cold) event of a function, for a fresh user where one is needed.
async fn cold_event(up: &Upstreams, function: &str) -> (String, Expect) {
    match function {
        "webhook" => (webhook_event(&invoice()), Expect::status(200)),
        "checkout" => {
            let user = up.users(1).await.remove(0);
            (bearer_event(&user, ""), Expect::status(200))
        }
        _ => {
            let user = up.users(1).await.remove(0);
            (
                chat_event(&user, &format!("cold {}", uuid::Uuid::new_v4())),
                Expect {
                    status: 200,
                    source: Some("llm"),
                },
            )
        }
    }
}

/// Cold starts of one function, implementations (and settings: plain TCP or TLS) alternated run
/// by run.
#[derive(Default)]
struct Cold {
    total_ms: Vec<f64>,
    init_ms: Vec<f64>,
    /// The process's CPU from exec to the first response.
    cpu_ms: Vec<f64>,
    /// Peak RSS after the first response.
    rss_kib: Vec<u64>,
}

/// One implementation in one setting (`tls`: every peer behind TLS).
type Run = (Impl, bool);

async fn cold_starts(up: &Upstreams, function: &str, runs: &[Run], n: usize) -> Vec<Cold> {
    let mut out: Vec<Cold> = runs.iter().map(|_| Cold::default()).collect();
    for _ in 0..n {
        for (k, &(which, tls)) in runs.iter().enumerate() {
            if !which.runs_function(function) {
                continue;
            }
            match (&up.tls, tls) {
                (Some(peers), true) => set_issuer(&peers.rest.uri()),
                _ => set_issuer(&up.rest.uri()),
            }
            let (event, expect) = cold_event(up, function).await;
            let (mut p, started) = up.spawn_in(which, function, &[], tls).await;
            let first = p.invoke(event, &expect).await;
            let cold = &mut out[k];
            cold.total_ms
                .push(first.finished.duration_since(started).as_secs_f64() * 1e3);
            cold.init_ms
                .push(first.handed_out.duration_since(started).as_secs_f64() * 1e3);
            cold.cpu_ms.push(p.cpu_ns() as f64 / 1e6);
            cold.rss_kib.push(p.peak_rss_kib());
            p.stop().await;
        }
    }
    set_issuer(&up.rest.uri());
    out
}

/// Warm latency and CPU of one branch in one running process.
#[derive(Default, Clone)]
struct Warm {
    micros: Vec<f64>,
    cpu_ns: u64,
}

impl Warm {
    fn p(&self, q: usize) -> f64 {
        let mut v = self.micros.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get((v.len() * q / 100).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    }

    fn cpu_us(&self) -> f64 {
        self.cpu_ns as f64 / 1e3 / self.micros.len().max(1) as f64
    }
}

/// One benchmarked branch: its name, the expected answer, and the i-th event for a process.
struct Branch<'a> {
    name: &'static str,
    expect: Expect,
    event: Box<dyn FnMut(usize, usize) -> String + 'a>,
}

/// Runs every branch of `function` in one process per implementation, the implementations
/// interleaved in chunks so that they see the same machine; returns per-branch figures and each
/// process's peak RSS.
async fn warm_runs(
    up: &Upstreams,
    function: &str,
    impls: &[Impl],
    extra: &[(&str, &str)],
    mut branches: Vec<Branch<'_>>,
    n: usize,
) -> (Vec<(&'static str, Vec<Warm>)>, Vec<u64>) {
    let mut processes = Vec::new();
    for which in impls {
        let (p, _) = up.spawn(*which, function, extra).await;
        processes.push(p);
    }
    let chunk = 50;
    let mut rows = Vec::new();
    for branch in &mut branches {
        // One unmeasured event per process first (index n, past the measured range): the cold
        // start before the first branch, and the state each branch needs (the duplicate's first
        // delivery, the reused session's creation, the cached answer).
        for (k, p) in processes.iter_mut().enumerate() {
            p.invoke((branch.event)(k, n), &branch.expect).await;
        }
        let mut figures = vec![Warm::default(); impls.len()];
        let mut done = 0;
        while done < n {
            let take = chunk.min(n - done);
            for (k, p) in processes.iter_mut().enumerate() {
                let before = p.cpu_ns();
                for i in done..done + take {
                    let outcome = p.invoke((branch.event)(k, i), &branch.expect).await;
                    figures[k].micros.push(outcome.total().as_secs_f64() * 1e6);
                }
                // A thread that exited during the chunk takes its time with it: never wrap.
                figures[k].cpu_ns += p.cpu_ns().saturating_sub(before);
            }
            done += take;
        }
        rows.push((branch.name, figures));
    }
    let rss = processes.iter().map(Process::peak_rss_kib).collect();
    for p in processes {
        p.stop().await;
    }
    (rows, rss)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The branches of each function, events drawn from `users`: fresh ones per implementation
/// where a branch needs them.
async fn branches<'a>(
    up: &Upstreams,
    function: &str,
    impls: usize,
    n: usize,
    rules: bool,
) -> Vec<Branch<'a>> {
    match function {
        "webhook" => {
            let dup = invoice();
            let mut payments = Vec::new();
            for _ in 0..impls {
                payments.push(up.refunded_payment().await);
            }
            vec![
                Branch {
                    name: "new event",
                    expect: Expect::status(200),
                    event: Box::new(|_, _| webhook_event(&invoice())),
                },
                Branch {
                    name: "duplicate event",
                    expect: Expect::status(200),
                    event: Box::new(move |_, _| webhook_event(&dup)),
                },
                // The unmeasured first event pays the order; every measured one is a new
                // `charge.refunded` about the same payment: 3 Stripe reads and the store call.
                Branch {
                    name: "payment event",
                    expect: Expect::status(200),
                    event: Box::new(move |k, i| {
                        let (completed, refunded) = &payments[k];
                        if i == n {
                            webhook_event(completed)
                        } else {
                            webhook_event(&redelivered(refunded))
                        }
                    }),
                },
            ]
        }
        "checkout" => {
            let fresh = up.users((n + 1) * impls).await;
            let reuse = up.users(impls).await;
            let mut paid = Vec::new();
            for _ in 0..impls {
                paid.push(up.paid_user().await);
            }
            vec![
                Branch {
                    name: "new session",
                    expect: Expect::status(200),
                    event: Box::new(move |k, i| bearer_event(&fresh[k * (n + 1) + i], "")),
                },
                Branch {
                    name: "reused session",
                    expect: Expect::status(200),
                    event: Box::new(move |k, _| bearer_event(&reuse[k], "")),
                },
                Branch {
                    name: "already paid",
                    expect: Expect::status(409),
                    event: Box::new(move |k, _| bearer_event(&paid[k], "")),
                },
            ]
        }
        _ if rules => {
            let askers = up.users(impls).await;
            vec![Branch {
                name: "rules (no key)",
                expect: Expect {
                    status: 200,
                    source: Some("rules"),
                },
                event: Box::new(move |k, i| {
                    chat_event(&askers[k], &format!("how much is the full report {i}"))
                }),
            }]
        }
        _ => {
            let askers = up.users(impls).await;
            let again = askers.clone();
            vec![
                Branch {
                    name: "llm",
                    expect: Expect {
                        status: 200,
                        source: Some("llm"),
                    },
                    event: Box::new(move |k, i| chat_event(&askers[k], &format!("question {i}"))),
                },
                Branch {
                    name: "cache",
                    expect: Expect {
                        status: 200,
                        source: Some("cache"),
                    },
                    event: Box::new(move |k, _| chat_event(&again[k], "question 0")),
                },
            ]
        }
    }
}

/// The webhook against a PostgREST that answers `record_stripe_facts` at once: the function's own
/// cost per warm invocation besides the database (Rust through its PostgREST backend; the
/// `invoice.paid` event, so one read of the invoice at the local fake Stripe is included).
async fn instant_database(up: &Upstreams, impls: &[Impl], n: usize) -> Vec<(Impl, Warm)> {
    let instant = MockServer::start().await;
    Mock::given(method("POST"))
        .and(wiremock::matchers::path("/rest/v1/rpc/record_stripe_facts"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"outcome": "duplicate", "detail": "already recorded"})),
        )
        .mount(&instant)
        .await;
    let mut which: Vec<Impl> = impls
        .iter()
        .copied()
        .filter(|i| *i != Impl::RustDirect && i.runs_function("webhook"))
        .collect();
    which.push(Impl::RuntimeFloor);
    let event = webhook_event(&invoice());
    let branch = Branch {
        name: "instant database",
        expect: Expect::status(200),
        event: Box::new(move |_, _| event.clone()),
    };
    let uri = instant.uri();
    let (mut rows, _) = warm_runs(
        up,
        "webhook",
        &which,
        &[("SUPABASE_URL", &uri)],
        vec![branch],
        n,
    )
    .await;
    let figures = rows.pop().map(|(_, f)| f).unwrap_or_default();
    which.into_iter().zip(figures).collect()
}

/// Connecting to PostgreSQL and the first call in a new server session: the floor under a cold
/// start with a direct connection (median of `runs`). The call is the webhook's own, for a new
/// `invoice.paid` event, with the arguments the function sends.
async fn postgres_floor(up: &Upstreams, runs: usize) -> (f64, f64, f64) {
    let (mut connect, mut first, mut warm) = (vec![], vec![], vec![]);
    let call = "select public.record_stripe_facts(p_event => $1::jsonb, p_payload => $2::jsonb, \
                p_facts => $3::jsonb, p_actions => '[]'::jsonb)";
    for _ in 0..runs {
        let started = Instant::now();
        let (client, connection) = tokio_postgres::connect(&up.db.url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let task = tokio::spawn(connection);
        connect.push(started.elapsed().as_secs_f64() * 1e3);
        for sample in [&mut first, &mut warm] {
            let body = fixtures::body(&invoice());
            let parsed = shared::stripe::events::parse(&body).expect("invoice event");
            let shared::stripe::events::Event::Invoice { invoice, .. } = &parsed.event else {
                panic!("an invoice event")
            };
            let mut facts = shared::payments::Facts::at(fixtures::now() * 1000);
            facts
                .invoices
                .push(shared::payments::facts::InvoiceFact::of(invoice));
            let facts = serde_json::to_value(&facts).expect("facts");
            let head = json!({"id": parsed.id, "type": parsed.type_, "created": parsed.created,
                              "livemode": parsed.livemode, "api_version": parsed.api_version,
                              "received_at_ms": 0});
            let payload: serde_json::Value = serde_json::from_slice(&body).expect("payload");
            let started = Instant::now();
            // One round trip, as the function's own call (`query_typed`, no prepare).
            let jsonb = tokio_postgres::types::Type::JSONB;
            client
                .query_typed(
                    call,
                    &[
                        (&tokio_postgres::types::Json(&head), jsonb.clone()),
                        (&tokio_postgres::types::Json(&payload), jsonb.clone()),
                        (&tokio_postgres::types::Json(&facts), jsonb),
                    ],
                )
                .await
                .expect("record_stripe_facts");
            sample.push(started.elapsed().as_secs_f64() * 1e3);
        }
        drop(client);
        let _ = task.await;
    }
    (median(&connect), median(&first), median(&warm))
}

#[tokio::main]
async fn main() {
    let mut bin_dir = "target/release".to_owned();
    let mut node_dir = None;
    let mut pooler = None;
    let mut warm = 1000usize;
    let mut cold = 10usize;
    let mut args = std::env::args().skip(1);
    let clients = bench::tls::first_clients();
    let mut tls = false;
    let mut only: Option<String> = None;
    while let Some(arg) = args.next() {
        if arg == "--tls" {
            tls = true;
            continue;
        }
        match (arg.as_str(), args.next()) {
            ("--bin-dir", Some(v)) => bin_dir = v,
            ("--node", Some(v)) => node_dir = Some(v),
            ("--pooler", Some(v)) => pooler = Some(v),
            ("--warm", Some(v)) => warm = v.parse().unwrap_or(warm),
            ("--cold", Some(v)) => cold = v.parse().unwrap_or(cold),
            ("--only", Some(v)) => only = Some(v),
            _ => {
                eprintln!(
                    "usage: lambda-bench [--bin-dir DIR] [--node DIR_OF_BUNDLES] [--pooler URL] [--warm N] \
                     [--cold N] [--tls] [--only FUNCTION]\n  --only chat measures one function (a short run)\n  --node bench/node/dist adds the Node.js baseline, measured pair \
                     by pair\n  --pooler postgres://postgres@127.0.0.1:6432/postgres adds cold \
                     starts through that transaction-mode pooler (scripts/ensure-pgbouncer)\n  --tls adds cold starts with every peer behind TLS (a CA made for the run)"
                );
                std::process::exit(2);
            }
        }
    }
    let db = testkit::db::TestDb::new().await;
    let sql = db.client().await;
    let stripe = testkit::stripe_fake::FakeStripe::start().await;
    stripe.hold(&invoice()["data"]["object"]);
    let openai = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(testkit::llm_fake::completion(
                "Hello from the fake upstream.",
            )),
        )
        .mount(&openai)
        .await;
    let rest = PostgRest::start(&db.url, SERVICE_KEY).await;
    set_issuer(&rest.uri());
    let tls = if tls {
        Some(
            bench::tls::TlsPeers::start(
                &stripe.uri(),
                &openai.uri(),
                &rest.uri(),
                server_addr(&db.url),
                pooler.as_deref().map(server_addr),
            )
            .await,
        )
    } else {
        None
    };
    let up = Upstreams {
        tls,
        db,
        sql,
        stripe,
        openai,
        rest,
        node_dir,
        bin_dir,
        pooler,
    };
    let mut impls = vec![Impl::RustDirect, Impl::RustRest];
    if up.node_dir.is_some() {
        impls.push(Impl::Node);
    }
    let functions: Vec<&str> = ["webhook", "checkout", "chat"]
        .into_iter()
        .filter(|f| only.as_deref().is_none_or(|o| o == *f))
        .collect();

    let mut colds = Vec::new();
    let mut warms: Vec<(&str, &str, Vec<Warm>)> = Vec::new();
    let mut rss = Vec::new();
    let mut cold_impls = impls.clone();
    if up.pooler.is_some() {
        cold_impls.push(Impl::RustPooled);
    }
    let mut runs: Vec<Run> = cold_impls.iter().map(|i| (*i, false)).collect();
    if up.tls.is_some() {
        runs.extend(cold_impls.iter().map(|i| (*i, true)));
    }
    for &function in &functions {
        colds.push(cold_starts(&up, function, &runs, cold).await);
        // Node.js only where the baseline has the function: the same positions otherwise.
        let here: Vec<Impl> = impls
            .iter()
            .copied()
            .filter(|i| i.runs_function(function))
            .collect();
        let list = branches(&up, function, here.len(), warm, false).await;
        let (rows, peak) = warm_runs(&up, function, &here, &[], list, warm).await;
        rss.push(peak);
        warms.extend(rows.into_iter().map(|(b, f)| (function, b, f)));
        if function == "chat" {
            let list = branches(&up, function, here.len(), warm, true).await;
            let (rows, _) = warm_runs(
                &up,
                function,
                &here,
                &[("CHAT_CACHE_TTL_S", "0"), ("OPENAI_API_KEY", "")],
                list,
                warm,
            )
            .await;
            warms.extend(rows.into_iter().map(|(b, f)| (function, b, f)));
        }
    }
    let instant = if functions.contains(&"webhook") {
        instant_database(&up, &impls, warm).await
    } else {
        Vec::new()
    };
    let floor = postgres_floor(&up, cold).await;
    let trips = round_trips(&up.db, &up.stripe, &up.openai).await;
    let handshakes = match &up.tls {
        Some(peers) => Some(bench::tls::handshakes(peers, cold.max(5), clients).await),
        None => None,
    };

    let direct = 0;
    println!(
        "Lambda Runtime API stand-in, release binaries, median of {cold} cold starts and {warm} warm \
         invocations per branch; production configuration (direct PostgreSQL)"
    );
    println!();
    let pooled = cold_impls.iter().position(|i| *i == Impl::RustPooled);
    println!(
        "| function | cold start (spawn to first response) | of which init (spawn to first `next`) \
         | cold start through PgBouncer (transaction mode) | peak RSS | stripped binary |"
    );
    println!("|---|---|---|---|---|---|");
    for ((function, c), peak) in functions.iter().zip(&colds).zip(&rss) {
        let size = std::fs::metadata(format!("{}/{function}", up.bin_dir))
            .map(|m| m.len())
            .unwrap_or(0);
        let through_pooler = pooled
            .map(|k| format!("{:.2} ms", median(&c[k].total_ms)))
            .unwrap_or_else(|| "not run (--pooler)".into());
        println!(
            "| {function} | {:.2} ms | {:.2} ms | {through_pooler} | {:.1} MiB | {:.2} MB |",
            median(&c[direct].total_ms),
            median(&c[direct].init_ms),
            peak[direct] as f64 / 1024.0,
            size as f64 / 1e6
        );
    }
    println!();
    println!(
        "PostgreSQL floor under a direct cold start (median of {cold}): connect {:.2} ms, first \
         `record_stripe_facts` (an invoice read) in the new session {:.2} ms, the same call warm \
         {:.2} ms",
        floor.0, floor.1, floor.2
    );
    println!();
    println!("| function | branch | p50 | p99 | CPU per invocation | DB round trips |");
    println!("|---|---|---|---|---|---|");
    for (function, branch, figures) in &warms {
        let counted = trips
            .iter()
            .find(|(f, b, _)| f == function && b == branch)
            .map(|t| t.2.to_string())
            .unwrap_or_else(|| "?".into());
        let w = &figures[direct];
        println!(
            "| {function} | {branch} | {:.0} µs | {:.0} µs | {:.0} µs | {counted} |",
            w.p(50),
            w.p(99),
            w.cpu_us()
        );
    }
    println!();
    println!(
        "Webhook with the database answering instantly (a constant PostgREST reply): what one warm \
         invocation of the invoice event costs besides the database (its Stripe read, at the local \
         fake, included), through the same Runtime API stand-in"
    );
    println!();
    println!("| implementation | p50 | p99 | CPU per invocation |");
    println!("|---|---|---|---|");
    for (which, w) in &instant {
        println!(
            "| {} | {:.0} µs | {:.0} µs | {:.0} µs |",
            which.label(),
            w.p(50),
            w.p(99),
            w.cpu_us(),
        );
    }
    if impls.contains(&Impl::Node) {
        // Positions in the chat runs, the only function the baseline has.
        let (r, n) = (1, 2);
        println!();
        println!(
            "Node.js baseline (bench/node, chat only) against {} with the same fakes, runtime \
             stand-in and PostgREST stand-in, measured pair by pair in this run",
            impls[r].label()
        );
        println!();
        println!("| figure | Rust | Node.js | Node / Rust |");
        println!("|---|---|---|---|");
        let row = |name: String, rust: f64, node: f64, unit: &str| {
            println!(
                "| {name} | {rust:.2} {unit} | {node:.2} {unit} | {:.1}x |",
                node / rust.max(f64::MIN_POSITIVE)
            );
        };
        let with_node = |function: &str| Impl::Node.runs_function(function);
        for (function, c) in functions.iter().zip(&colds) {
            if !with_node(function) {
                continue;
            }
            row(
                format!("{function} cold start"),
                median(&c[r].total_ms),
                median(&c[n].total_ms),
                "ms",
            );
        }
        for (function, peak) in functions.iter().zip(&rss) {
            if !with_node(function) {
                continue;
            }
            row(
                format!("{function} peak RSS"),
                peak[r] as f64 / 1024.0,
                peak[n] as f64 / 1024.0,
                "MiB",
            );
        }
        for (function, branch, figures) in &warms {
            if !with_node(function) {
                continue;
            }
            row(
                format!("{function} {branch} p50"),
                figures[r].p(50),
                figures[n].p(50),
                "µs",
            );
            row(
                format!("{function} {branch} CPU"),
                figures[r].cpu_us(),
                figures[n].cpu_us(),
                "µs",
            );
        }
    }
    if let Some(handshakes) = handshakes {
        print_tls(&up, &functions, &colds, &runs, cold, &handshakes);
    }
}

/// The TLS setting's tables: each figure beside the plain-TCP one of the same run.
fn print_tls(
    up: &Upstreams,
    functions: &[&str],
    colds: &[Vec<Cold>],
    runs: &[Run],
    n: usize,
    hs: &bench::tls::Handshakes,
) {
    let Some(peers) = &up.tls else {
        return;
    };
    let pick = |c: &'_ [Cold], which: Impl, tls: bool| -> Option<usize> {
        runs.iter()
            .position(|r| *r == (which, tls))
            .filter(|k| *k < c.len() && !c[*k].total_ms.is_empty())
    };
    let total = |c: &[Cold], which, tls| pick(c, which, tls).map(|k| median(&c[k].total_ms));
    let cpu = |c: &[Cold], which, tls| pick(c, which, tls).map(|k| median(&c[k].cpu_ms));
    // The first request alone: from the event handed out to the answer.
    let first = |c: &[Cold], which, tls| {
        pick(c, which, tls).map(|k| {
            let v: Vec<f64> = c[k]
                .total_ms
                .iter()
                .zip(&c[k].init_ms)
                .map(|(t, i)| t - i)
                .collect();
            median(&v)
        })
    };
    let rss = |c: &[Cold], which, tls| {
        pick(c, which, tls).map(|k| {
            let v: Vec<f64> = c[k].rss_kib.iter().map(|r| *r as f64 / 1024.0).collect();
            median(&v)
        })
    };
    let ms = |v: Option<f64>| v.map_or("not run".into(), |v| format!("{v:.2} ms"));
    let mib = |v: Option<f64>| v.map_or("not run".into(), |v| format!("{v:.1} MiB"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.1}x", b / a.max(f64::MIN_POSITIVE)),
        _ => "not run".into(),
    };
    // The TLS figures mean nothing if a session went around TLS: stop the run instead.
    assert!(
        peers.db_plain_sessions() == 0,
        "database sessions in the TLS setting: {} over TLS, {} in plain text",
        peers.db_tls_sessions(),
        peers.db_plain_sessions()
    );
    println!();
    println!(
        "TLS setting: every peer behind TLS with a CA made for the run (database `sslmode=verify-full` \
         + `DATABASE_CA_CERT`, HTTPS stand-ins + `HTTPS_CA_CERT`, Node.js `NODE_EXTRA_CA_CERTS`), \
         median of {n} cold starts alternated with the plain-TCP ones; database sessions relayed over \
         TLS: {}, in plain text: {}",
        peers.db_tls_sessions(),
        peers.db_plain_sessions()
    );
    println!();
    println!(
        "| function | direct, plain | direct, TLS | through PgBouncer, plain | through PgBouncer, TLS \
         | TLS cost through PgBouncer | first request alone, PgBouncer TLS (plain) | CPU to first \
         answer, PgBouncer TLS (plain) | peak RSS, TLS (plain) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let (direct, pooled) = (Impl::RustDirect, Impl::RustPooled);
    for (function, c) in functions.iter().zip(colds) {
        let cost = total(c, pooled, true)
            .zip(total(c, pooled, false))
            .map(|(t, p)| t - p);
        println!(
            "| {function} | {} | {} | {} | {} | {} | {} ({}) | {} ({}) | {} ({}) |",
            ms(total(c, direct, false)),
            ms(total(c, direct, true)),
            ms(total(c, pooled, false)),
            ms(total(c, pooled, true)),
            ms(cost),
            ms(first(c, pooled, true)),
            ms(first(c, pooled, false)),
            ms(cpu(c, pooled, true)),
            ms(cpu(c, pooled, false)),
            mib(rss(c, pooled, true)),
            mib(rss(c, pooled, false)),
        );
    }
    println!();
    println!(
        "| function | Rust (PostgREST), plain | Rust, TLS | Node.js, plain | Node.js, TLS | Node / Rust, \
         TLS | Rust's first request alone, TLS (plain) | CPU to first answer, TLS: Rust / Node.js \
         | peak RSS, TLS: Rust / Node.js |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let (rest, node) = (Impl::RustRest, Impl::Node);
    for (function, c) in functions.iter().zip(colds) {
        println!(
            "| {function} | {} | {} | {} | {} | {} | {} ({}) | {} / {} | {} / {} |",
            ms(total(c, rest, false)),
            ms(total(c, rest, true)),
            ms(total(c, node, false)),
            ms(total(c, node, true)),
            ratio(total(c, rest, true), total(c, node, true)),
            ms(first(c, rest, true)),
            ms(first(c, rest, false)),
            ms(cpu(c, rest, true)),
            ms(cpu(c, node, true)),
            mib(rss(c, rest, true)),
            mib(rss(c, node, true)),
        );
    }
    println!();
    println!(
        "First connections from this harness (rustls with ring, the functions' configuration), \
         medians: TCP connect {:.3} ms; full TLS 1.3 handshake {:.3} ms; resumed {:.3} ms; \
         PostgreSQL SSLRequest + handshake {:.3} ms; first outbound client of a process (roots and \
         TLS configuration) {:.3} ms, a later one {:.3} ms",
        hs.tcp_ms,
        hs.tls_ms,
        hs.tls_resumed_ms,
        hs.pg_tls_ms,
        hs.first_client_ms,
        hs.next_client_ms
    );
}

/// `host:port` of a `postgres://user@host:port/...` URL.
fn server_addr(url: &str) -> std::net::SocketAddr {
    let after = url.split_once('@').map_or(url, |(_, rest)| rest);
    let host_port = after.split(['/', '?']).next().unwrap_or_default();
    host_port
        .parse()
        .unwrap_or_else(|e| panic!("{host_port} is not an ip:port ({e})"))
}

/// Database round trips per request of each branch, counted at the store (`Store::round_trips`)
/// with the handlers run in-process on the same database and fakes.
async fn round_trips(
    db: &testkit::db::TestDb,
    stripe: &testkit::stripe_fake::FakeStripe,
    openai: &MockServer,
) -> Vec<(&'static str, &'static str, u64)> {
    use shared::config::Secret;
    use shared::store::Store;
    use std::sync::Arc;
    let sql = db.client().await;
    let mut out = Vec::new();
    let store = Store::postgres(&db.url, 1).expect("store");
    let webhook_config = webhook::Config {
        secrets: vec![Secret::new(WEBHOOK_SECRET)],
        ..testkit::apps::webhook_config(testkit::apps::store_config(&db.url), &stripe.uri())
    };
    let (webhook, _) = testkit::apps::webhook_state(webhook_config, store.clone());
    let mut event = fixtures::load("stripe/invoice.paid.dahlia.json");
    fixtures::set(&mut event, "/id", json!(fixtures::event_id()));
    fixtures::set(&mut event, "/created", json!(fixtures::now()));
    for name in ["new event", "duplicate event"] {
        let before = store.round_trips();
        let request: lambda_http::Request = serde_json::from_str::<
            lambda_http::request::LambdaRequest,
        >(&webhook_event(&event))
        .map(|l| shared::lambda::into_request(l, lambda_http::Context::default()).expect("request"))
        .expect("event");
        let response = webhook::handle(&webhook, request).await;
        assert_eq!(response.status(), 200, "webhook {name}");
        out.push(("webhook", name, store.round_trips() - before));
    }
    let (completed, refunded) = refunded_payment(&sql, stripe).await;
    for (name, event) in [("paid first", completed), ("payment event", refunded)] {
        let before = store.round_trips();
        let request = shared::lambda::into_request(
            serde_json::from_str(&webhook_event(&event)).expect("event"),
            lambda_http::Context::default(),
        )
        .expect("request");
        let response = webhook::handle(&webhook, request).await;
        assert_eq!(response.status(), 200, "webhook {name}");
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
            "CHAT_DAILY_TOKEN_BUDGET" => Some("1000000000".into()),
            _ => None,
        }
    };
    let config =
        checkout::Config::read(shared::config::EnvReader::new(env)).expect("checkout config");
    let mut checkout = checkout::State::new(config).expect("checkout state");
    checkout.metrics = shared::telemetry::Metrics::in_memory("checkout").0;
    let buyer = db.create_user(&sql).await.to_string();
    let request = |user: &str| {
        let event = bearer_event(user, "");
        shared::lambda::into_request(
            serde_json::from_str(&event).expect("event"),
            lambda_http::Context::default(),
        )
        .expect("request")
    };
    // Paid at Stripe; the first click reads the session and records the payment (not counted,
    // as in the warm runs, whose first event of a branch is not measured).
    let (payer, _) = paid_order(&sql, stripe).await;
    let response = checkout::handle(&checkout, request(&payer)).await;
    assert_eq!(response.status(), 409, "checkout paid first");
    for (name, user) in [
        ("new session", buyer.clone()),
        ("reused session", buyer),
        ("already paid", payer),
    ] {
        let before = checkout.store.round_trips();
        let response = checkout::handle(&checkout, request(&user)).await;
        let expected = if name == "already paid" { 409 } else { 200 };
        assert_eq!(response.status(), expected, "checkout {name}");
        out.push(("checkout", name, checkout.store.round_trips() - before));
    }
    let config = chat::Config::read(shared::config::EnvReader::new(env)).expect("chat config");
    let mut chat = chat::State::new(config).expect("chat state");
    chat.metrics = shared::telemetry::Metrics::in_memory("chat").0;
    let chat = Arc::new(chat);
    let asker = db.create_user(&sql).await.to_string();
    let ask = |text: &str| {
        let event = chat_event(&asker, text);
        shared::lambda::into_request(
            serde_json::from_str(&event).expect("event"),
            lambda_http::Context::default(),
        )
        .expect("request")
    };
    for (name, text) in [("llm", "round trips?"), ("cache", "round trips?")] {
        let before = chat.store.round_trips();
        let response = chat::handle(chat.clone(), ask(text)).await;
        assert_eq!(response.status(), 200, "chat {name}");
        let _ = response.into_body().collect().await;
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
    let response = chat::handle(rules.clone(), ask("how much")).await;
    assert_eq!(response.status(), 200, "chat rules");
    let _ = response.into_body().collect().await;
    out.push(("chat", "rules (no key)", rules.store.round_trips() - before));
    out
}
