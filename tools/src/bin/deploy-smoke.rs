//! Runs the artifacts `sam build` made: each function's `bootstrap` under `.aws-sam/build/`,
//! started as Lambda starts it (the test suite's Runtime API stand-in, the variables
//! template.yaml sets, Lambda's own), sent one real function-URL event, its answer checked:
//!
//! - webhook: a signed `customer.created` event, answered 200 and recorded `ignored` in the
//!   database (with a Stripe key and the Stripe stand-in, as deployed);
//! - checkout: an authenticated status request for a user with a paid order: 200 `paid`;
//! - chat: an OpenAI-format question without an LLM key: a rules answer, streamed;
//! - reconcile: a scheduled event (EventBridge's shape) while Stripe holds a paid session whose
//!   event was never delivered: the run answers ok, applies the event, the buyer owns the report.
//!
//! Each must also write its EMF metrics line (namespace `SaasFunctions`, dimension `Function`),
//! the line the dashboard reads. Against a fresh database (`supabase/bootstrap.sql` and every
//! migration) on the local PostgreSQL, dropped at the end. A build directory holding a function
//! this runner has no case for fails: a new function comes with its smoke case.
//!
//! Usage: deploy-smoke [--build-dir .aws-sam/build]

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::db::TestDb;
use testkit::fixtures::{self, FunctionUrlRequest};
use testkit::runtime_api::{Outcome, RuntimeApi};
use testkit::stripe_fake::FakeStripe;
use tokio::io::AsyncReadExt;

const WEBHOOK_SECRET: &str = "whsec_deploy_smoke";
const JWT_SECRET: &str = "deploy-smoke-jwt-secret-0123456789-abcdef";
const PRICE: &str = "price_deploy_smoke";
/// A cold start and one request; generous for a loaded CI machine.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The functions of template.yaml: logical id (the build directory's name), the name the
/// function reports in its metrics, its `MemorySize`.
const FUNCTIONS: &[(&str, &str, u32)] = &[
    ("WebhookFunction", "webhook", 128),
    ("CheckoutFunction", "checkout", 256),
    ("ChatFunction", "chat", 256),
    ("ReconcileFunction", "reconcile", 128),
];

#[tokio::main]
async fn main() -> ExitCode {
    let mut build_dir = PathBuf::from(".aws-sam/build");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--build-dir", Some(dir)) => build_dir = PathBuf::from(dir),
            _ => {
                eprintln!("usage: deploy-smoke [--build-dir .aws-sam/build]");
                return ExitCode::from(2);
            }
        }
    }
    match run(&build_dir).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("deploy-smoke: FAIL: {problem}");
            ExitCode::FAILURE
        }
    }
}

/// Everything the functions talk to, as a deployed stack would.
struct Peers {
    db: TestDb,
    stripe: FakeStripe,
}

async fn run(build_dir: &Path) -> Result<(), String> {
    let built = built_functions(build_dir)?;
    let peers = Peers {
        db: TestDb::new().await,
        stripe: FakeStripe::start().await,
    };
    println!(
        "deploy-smoke: {} functions from {}, database {}",
        built.len(),
        build_dir.display(),
        peers.db.name
    );
    for (logical_id, function, memory) in FUNCTIONS {
        let bootstrap = build_dir.join(logical_id).join("bootstrap");
        let started = Instant::now();
        let summary = match *function {
            "webhook" => webhook(&peers, &bootstrap, *memory).await,
            "checkout" => checkout(&peers, &bootstrap, *memory).await,
            "chat" => chat(&peers, &bootstrap, *memory).await,
            "reconcile" => reconcile(&peers, &bootstrap, *memory).await,
            other => Err(format!("no smoke case for {other}")),
        }
        .map_err(|e| format!("{logical_id} ({}): {e}", bootstrap.display()))?;
        println!(
            "  {logical_id:<18} {summary} ({} ms to start, answer and stop)",
            started.elapsed().as_millis()
        );
    }
    Ok(())
}

/// The function directories `sam build` wrote, each checked against [`FUNCTIONS`].
fn built_functions(build_dir: &Path) -> Result<Vec<String>, String> {
    let entries = std::fs::read_dir(build_dir).map_err(|e| {
        format!(
            "{}: {e} (run `sam build` first: scripts/check-deploy)",
            build_dir.display()
        )
    })?;
    let mut built = Vec::new();
    for entry in entries.flatten() {
        if !entry.path().is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if !FUNCTIONS.iter().any(|(id, _, _)| *id == name) {
            return Err(format!(
                "{name} was built but deploy-smoke has no case for it: add one"
            ));
        }
        built.push(name);
    }
    for (id, _, _) in FUNCTIONS {
        let bootstrap = build_dir.join(id).join("bootstrap");
        if !bootstrap.is_file() {
            return Err(format!("{} is missing", bootstrap.display()));
        }
    }
    Ok(built)
}

/// The variables template.yaml's Globals give every function, with empty parameters left empty
/// (a deployed function sees them as empty strings, not as unset).
fn global_env(peers: &Peers) -> Vec<(&'static str, String)> {
    vec![
        // Not `production`: that demands https peers, and these are local.
        ("APP_ENV", "staging".into()),
        ("DATABASE_URL", peers.db.url.clone()),
        ("DATABASE_CA_CERT", String::new()),
        ("HTTPS_CA_CERT", String::new()),
        ("SUPABASE_URL", String::new()),
        ("SUPABASE_SERVICE_ROLE_KEY", String::new()),
        ("SENTRY_DSN", String::new()),
    ]
}

/// A running function: its process, its Runtime API and what it printed.
struct Function {
    child: tokio::process::Child,
    api: RuntimeApi,
    stdout: tokio::task::JoinHandle<String>,
}

impl Function {
    /// Starts `bootstrap` as Lambda would, with `env` on top of the Globals.
    async fn start(
        peers: &Peers,
        bootstrap: &Path,
        name: &str,
        memory: u32,
        env: &[(&str, String)],
    ) -> Result<Function, String> {
        let api = RuntimeApi::start().await;
        let mut command = tokio::process::Command::new(bootstrap);
        command
            .env_clear()
            .env("AWS_LAMBDA_RUNTIME_API", api.addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", format!("saas-functions-{name}"))
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory.to_string())
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            // LoggingConfig: JSON, INFO.
            .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
            .env("AWS_LAMBDA_LOG_LEVEL", "INFO")
            .env("AWS_REGION", "eu-west-1")
            .env("TZ", ":UTC")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in global_env(peers).iter().chain(env) {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start it: {e}"))?;
        let mut out = child.stdout.take().ok_or("no stdout")?;
        let stdout = tokio::spawn(async move {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text).await;
            text
        });
        Ok(Function { child, api, stdout })
    }

    /// Sends one event and waits for its answer.
    async fn invoke(&mut self, event: &Value) -> Result<Outcome, String> {
        self.api.invoke(event.to_string()).await;
        tokio::select! {
            outcome = self.api.outcome(ANSWER_TIMEOUT) => {
                outcome.ok_or_else(|| format!("no answer within {ANSWER_TIMEOUT:?}"))
            }
            status = self.child.wait() => Err(format!("exited before answering: {status:?}")),
        }
    }

    /// Stops the process and checks that it wrote `function`'s EMF metrics line.
    async fn stop(mut self, function: &str) -> Result<Value, String> {
        let _ = self.child.kill().await;
        let stdout = self.stdout.await.unwrap_or_default();
        stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l.get("_aws").is_some())
            .filter(|line| {
                line["Function"] == function
                    && line["_aws"]["CloudWatchMetrics"][0]["Namespace"]
                        == shared::telemetry::NAMESPACE
            })
            .ok_or_else(|| {
                format!(
                    "no EMF line for Function={function} in its output:\n{}",
                    tail(&stdout)
                )
            })
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The status and headers of an answer (streamed: from the prelude; buffered: the response).
fn head(outcome: &Outcome) -> Value {
    match &outcome.prelude {
        Some(prelude) => serde_json::from_str(prelude).unwrap_or_default(),
        None => serde_json::from_slice(&outcome.body).unwrap_or_default(),
    }
}

/// The payload of an answer: a buffered answer's `body` field, a streamed one's bytes.
fn payload(outcome: &Outcome) -> Value {
    if outcome.prelude.is_some() {
        return serde_json::from_slice(&outcome.body).unwrap_or_default();
    }
    let body = head(outcome)["body"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    serde_json::from_str(&body).unwrap_or(Value::String(body))
}

fn expect_status(outcome: &Outcome, status: u64) -> Result<(), String> {
    let got = head(outcome)["statusCode"].as_u64().unwrap_or(0);
    if outcome.kind == "response" && got == status {
        return Ok(());
    }
    Err(format!(
        "expected {status}, got {} {got}: {}",
        outcome.kind,
        String::from_utf8_lossy(&outcome.body)
            .chars()
            .take(600)
            .collect::<String>()
    ))
}

async fn webhook(peers: &Peers, bootstrap: &Path, memory: u32) -> Result<String, String> {
    let env = [
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
        ("STRIPE_SECRET_KEY", testkit::stripe_fake::KEY.to_owned()),
        ("STRIPE_API_BASE", peers.stripe.uri()),
        ("STRIPE_FULL_REPORT_PRICE_ID", PRICE.to_owned()),
        ("AUTO_REFUND_DUPLICATES", "true".to_owned()),
    ];
    let mut function = Function::start(peers, bootstrap, "webhook", memory, &env).await?;
    let event_id = fixtures::event_id();
    let event = json!({
        "id": event_id, "object": "event", "api_version": shared::stripe::API_VERSION,
        "created": fixtures::now(), "livemode": false, "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null}, "type": "customer.created",
        "data": {"object": {"id": "cus_DeploySmoke01", "object": "customer",
                            "email": "smoke@example.com", "created": fixtures::now()}},
    });
    let body = fixtures::body(&event);
    let signature = fixtures::sign(&body, WEBHOOK_SECRET);
    let request = FunctionUrlRequest::post("/", &body).header("stripe-signature", &signature);
    let outcome = function.invoke(request.event()).await?;
    expect_status(&outcome, 200)?;
    let answer = payload(&outcome);
    if answer["outcome"] != "ignored" || answer["event_id"] != event_id.as_str() {
        return Err(format!("expected outcome ignored for {event_id}: {answer}"));
    }
    let client = peers.db.client().await;
    let row = client
        .query_opt(
            "select outcome from stripe_events where id = $1",
            &[&event_id],
        )
        .await
        .map_err(|e| format!("stripe_events: {e}"))?
        .ok_or_else(|| format!("{event_id} is not in stripe_events"))?;
    let stored: String = row.get(0);
    if stored != "ignored" {
        return Err(format!("stripe_events says {stored}, not ignored"));
    }
    function.stop("webhook").await?;
    Ok(format!("200, {event_id} recorded ignored, EMF line"))
}

async fn checkout(peers: &Peers, bootstrap: &Path, memory: u32) -> Result<String, String> {
    let client = peers.db.client().await;
    let user = peers.db.create_user(&client).await;
    let order: uuid::Uuid = client
        .query_one(
            "insert into orders (user_id, status, paid_at) values ($1, 'paid', now()) returning id",
            &[&user],
        )
        .await
        .map_err(|e| format!("paid order: {e}"))?
        .get(0);
    let env = [
        ("SUPABASE_JWT_SECRET", JWT_SECRET.to_owned()),
        ("STRIPE_SECRET_KEY", testkit::stripe_fake::KEY.to_owned()),
        ("STRIPE_API_BASE", peers.stripe.uri()),
        ("STRIPE_FULL_REPORT_PRICE_ID", PRICE.to_owned()),
        (
            "CHECKOUT_SUCCESS_URL",
            "https://app.example.com/report/success?session_id={CHECKOUT_SESSION_ID}".to_owned(),
        ),
        (
            "CHECKOUT_CANCEL_URL",
            "https://app.example.com/report?checkout=cancelled".to_owned(),
        ),
    ];
    let mut function = Function::start(peers, bootstrap, "checkout", memory, &env).await?;
    let token = testkit::tokens::hs256(
        &testkit::tokens::user_claims(&user.to_string(), None),
        JWT_SECRET.as_bytes(),
    );
    let request = FunctionUrlRequest::get("/", "").bearer(&token);
    let outcome = function.invoke(request.event()).await?;
    expect_status(&outcome, 200)?;
    let answer = payload(&outcome);
    if answer["status"] != "paid" || answer["order_id"] != order.to_string().as_str() {
        return Err(format!("expected order {order} paid: {answer}"));
    }
    function.stop("checkout").await?;
    Ok(format!("200, order {order} paid, EMF line"))
}

async fn chat(peers: &Peers, bootstrap: &Path, memory: u32) -> Result<String, String> {
    let client = peers.db.client().await;
    let user = peers.db.create_user(&client).await;
    // As template.yaml's defaults, without an LLM key: the rule engine answers.
    let env = [
        ("SUPABASE_JWT_SECRET", JWT_SECRET.to_owned()),
        ("OPENAI_API_KEY", String::new()),
        ("OPENAI_BASE_URL", "https://api.openai.com/v1".to_owned()),
        ("LLM_MODEL", "gpt-4o-mini".to_owned()),
        ("LLM_TIMEOUT_MS", "30000".to_owned()),
        ("LLM_TOTAL_BUDGET_MS", "55000".to_owned()),
        ("CHAT_RULES_ONLY", "false".to_owned()),
        ("CHAT_DAILY_TOKEN_BUDGET", "200000".to_owned()),
        ("CHAT_ANONYMOUS_DAILY_TOKEN_BUDGET", "20000".to_owned()),
        ("CHAT_ANONYMOUS_RATE_LIMIT_PER_MIN", "5".to_owned()),
    ];
    let mut function = Function::start(peers, bootstrap, "chat", memory, &env).await?;
    let token = testkit::tokens::hs256(
        &testkit::tokens::user_claims(&user.to_string(), None),
        JWT_SECRET.as_bytes(),
    );
    let body = json!({"messages": [{"role": "user", "content": "how do I get a refund?"}]});
    let request = FunctionUrlRequest::post("/v1/chat/completions", body.to_string().as_bytes())
        .bearer(&token);
    let outcome = function.invoke(request.event()).await?;
    expect_status(&outcome, 200)?;
    if !outcome.streaming {
        return Err("the answer was not streamed (InvokeMode RESPONSE_STREAM)".into());
    }
    let source = head(&outcome)["headers"]["x-chat-source"].clone();
    let answer = payload(&outcome);
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    if source != "rules" || content.is_empty() {
        return Err(format!(
            "expected a rules answer, got source {source}: {answer}"
        ));
    }
    function.stop("chat").await?;
    Ok(format!(
        "200 streamed, rules answer of {} characters, EMF line",
        content.chars().count()
    ))
}

async fn reconcile(peers: &Peers, bootstrap: &Path, memory: u32) -> Result<String, String> {
    let client = peers.db.client().await;
    let user = peers.db.create_user(&client).await;
    // Paid through a Payment Link while the webhook endpoint was down: only Stripe's list of
    // undelivered events knows of it.
    let session =
        peers
            .stripe
            .foreign_session(&user.to_string(), PRICE, testkit::stripe_fake::AMOUNT);
    peers.stripe.pay(&session)?;
    let env = [
        ("STRIPE_SECRET_KEY", testkit::stripe_fake::KEY.to_owned()),
        ("STRIPE_API_BASE", peers.stripe.uri()),
        ("STRIPE_FULL_REPORT_PRICE_ID", PRICE.to_owned()),
        ("AUTO_REFUND_DUPLICATES", "true".to_owned()),
        ("RECONCILE_MAX_READS", "500".to_owned()),
    ];
    let mut function = Function::start(peers, bootstrap, "reconcile", memory, &env).await?;
    let scheduled = json!({
        "version": "0", "id": uuid::Uuid::new_v4().to_string(),
        "detail-type": "Scheduled Event", "source": "aws.events",
        "account": "123456789012", "time": "2026-12-07T12:00:00Z", "region": "eu-west-1",
        "resources": ["arn:aws:events:eu-west-1:123456789012:rule/saas-functions-EveryTenMinutes"],
        "detail": {},
    });
    let outcome = function.invoke(&scheduled).await?;
    let answer: Value = serde_json::from_slice(&outcome.body).unwrap_or_default();
    if outcome.kind != "response" || answer["ok"] != true {
        return Err(format!(
            "expected a run that finished, got {}: {}",
            outcome.kind,
            String::from_utf8_lossy(&outcome.body)
        ));
    }
    let events = answer["report"]["events_new"].as_u64().unwrap_or(0);
    let owns: bool = client
        .query_one(
            "select coalesce((select active from entitlements
                              where user_id = $1 and product = 'full_report'), false)",
            &[&user],
        )
        .await
        .map_err(|e| format!("entitlements: {e}"))?
        .get(0);
    if events != 1 || !owns {
        return Err(format!(
            "expected the lost event applied and the buyer owning the report: {answer}, owns {owns}"
        ));
    }
    function.stop("reconcile").await?;
    Ok(format!(
        "run {} applied the undelivered event, the buyer owns the report, EMF line",
        answer["report"]["run"]
    ))
}
