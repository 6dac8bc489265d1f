//! `HTTPS_CA_CERT`: outbound HTTPS (Stripe, the LLM upstream, PostgREST, JWKS) trusts an extra root
//! besides the web PKI's, read once per process; without it a private CA's certificate is refused
//! as such, never retried into a hang.

use std::time::Duration;

use shared::config::Secret;
use shared::stripe::client::{CallStats, RetryPolicy, StripeClient};
use shared::stripe::ids::SessionId;
use testkit::https_front::HttpsFront;
use testkit::pg_tls::TestCa;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Where the child process finds the HTTPS fake.
const CHILD_URL: &str = "HTTPS_CA_TEST_URL";
const SECOND: Duration = Duration::from_secs(1);

/// A fake answering 200 `ok` to anything, behind HTTPS with a certificate from a fresh test CA.
async fn https_fake() -> (TestCa, MockServer, HttpsFront) {
    let ca = TestCa::new("HTTPS_CA_CERT test CA");
    let fake = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_string("ok"))
        .mount(&fake)
        .await;
    let front = HttpsFront::for_uri(&fake.uri(), ca.server_config(&["127.0.0.1"])).await;
    (ca, fake, front)
}

/// Runs the ignored test `name` of this binary in a child process whose `HTTPS_CA_CERT` is `ca`
/// (read once per process, so it cannot be set in this one) and which finds the fake at `front`;
/// the child's test must pass.
async fn run_child(name: &'static str, ca: &TestCa, front: &HttpsFront) {
    let (pem, url) = (ca.pem(), front.uri());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--ignored"])
            .env(shared::http_client::CA_VARIABLE, pem)
            .env(CHILD_URL, url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_client_trusting_the_test_ca_reaches_the_https_fake() {
    let (ca, _fake, front) = https_fake().await;
    let client = shared::http_client::build_trusting(2 * SECOND, 5 * SECOND, &ca.pem()).unwrap();
    let answer = client.get(front.uri()).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn without_the_ca_the_certificate_is_refused_as_untrusted() {
    let (_ca, fake, front) = https_fake().await;
    // This test binary never sets HTTPS_CA_CERT: the process's clients trust the web roots only.
    let client = shared::http_client::build(2 * SECOND, 5 * SECOND).unwrap();
    let error = client.get(front.uri()).send().await.expect_err("untrusted");
    assert!(
        shared::http_client::untrusted_certificate(&error),
        "{error:?}"
    );

    // Retries allowed: a refused certificate is not retried (only configuration helps).
    let stripe = StripeClient::new(
        &front.uri(),
        Secret::new("sk_test_https_ca"),
        RetryPolicy {
            max_retries: 2,
            ..RetryPolicy::default()
        },
        5 * SECOND,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let error = stripe
        .retrieve_checkout_session(
            &SessionId::parse("cs_test_https_ca").unwrap(),
            &mut CallStats::default(),
        )
        .await
        .expect_err("untrusted");
    assert_eq!(error.class(), "network", "{error}");
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "no backoff pause (0.5 s at least) before giving up: {:?}",
        started.elapsed()
    );
    assert!(fake.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_variable_is_trusted_by_a_fresh_process() {
    let (ca, fake, front) = https_fake().await;
    // The variable is read once per process: a child process of this test binary runs the check.
    run_child("https_ca::child_trusts_https_ca_cert", &ca, &front).await;
    assert_eq!(fake.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
#[ignore = "run by the_variable_is_trusted_by_a_fresh_process, with HTTPS_CA_CERT set"]
async fn child_trusts_https_ca_cert() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let client = shared::http_client::build(2 * SECOND, 5 * SECOND).unwrap();
    let answer = client.get(url).send().await.unwrap();
    assert_eq!(answer.status(), 200);
}

/// The LLM client's warm-up at init: a `HEAD` without the key opens the one TLS connection that
/// the first real call then uses (the client's own pool), so the handshake is paid during init.
#[tokio::test]
async fn the_warm_up_opens_the_connection_the_first_call_uses_without_the_key() {
    let ca = TestCa::new("warm-up test CA");
    let fake = MockServer::start().await;
    Mock::given(wiremock::matchers::method("HEAD"))
        .respond_with(ResponseTemplate::new(405))
        .mount(&fake)
        .await;
    Mock::given(wiremock::matchers::method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "id": "chatcmpl-warm", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}]})))
        .mount(&fake)
        .await;
    let front = HttpsFront::for_uri(&fake.uri(), ca.server_config(&["127.0.0.1"])).await;
    run_child("https_ca::child_warms_up_then_calls", &ca, &front).await;
    let requests = fake.received_requests().await.unwrap();
    let methods: Vec<&str> = requests.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["HEAD", "POST"]);
    assert!(
        !requests[0].headers.contains_key("authorization"),
        "the warm-up sends no key"
    );
    assert!(requests[1].headers.contains_key("authorization"));
    assert_eq!(
        front.handshakes(),
        1,
        "the call reused the warmed connection"
    );
}

#[tokio::test]
#[ignore = "run by the_warm_up_opens_the_connection_the_first_call_uses_without_the_key"]
async fn child_warms_up_then_calls() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let llm = shared::llm::LlmClient::new(&format!("{url}/v1"), Secret::new("sk-warm")).unwrap();
    llm.warm_up();
    // Init goes on while the handshake runs; the first request comes after it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages = [shared::llm::Message {
        role: "user".into(),
        content: "hello".into(),
    }];
    let request = shared::llm::Request {
        model: "m",
        messages: &messages,
        max_tokens: None,
        max_completion_tokens: None,
        temperature: None,
        stream: false,
        stream_options: None,
    };
    let answer = llm.complete(&request, 5 * SECOND).await.unwrap();
    assert_eq!(answer.content, "hi");
}

#[test]
fn the_extra_root_is_added_to_the_web_roots_never_instead() {
    let web = webpki_roots::TLS_SERVER_ROOTS.len();
    assert!(web > 100, "the web PKI roots are there: {web}");
    assert_eq!(shared::http_client::root_store(&[]).len(), web);
    let ca = TestCa::new("added root");
    let extra = shared::http_client::extra_roots(&ca.pem()).unwrap();
    assert_eq!(extra.len(), 1);
    assert_eq!(shared::http_client::root_store(&extra).len(), web + 1);
}

#[test]
fn a_bad_variable_stops_every_function_at_config() {
    let env = || {
        shared::config::EnvReader::new(|k| {
            (k == shared::http_client::CA_VARIABLE).then(|| "-----BEGIN CERTIFICATE-----\nx".into())
        })
    };
    let problems = [
        webhook::Config::read(env()).map(|_| ()).unwrap_err(),
        checkout::Config::read(env()).map(|_| ()).unwrap_err(),
        chat::Config::read(env()).map(|_| ()).unwrap_err(),
    ];
    for error in problems {
        assert!(
            error
                .problems
                .iter()
                .any(|p| p.variable == shared::http_client::CA_VARIABLE),
            "{error}"
        );
    }
}
