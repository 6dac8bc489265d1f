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

    let stripe = StripeClient::new(
        &front.uri(),
        Secret::new("sk_test_https_ca"),
        RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        },
        5 * SECOND,
    )
    .unwrap();
    let error = stripe
        .retrieve_checkout_session(
            &SessionId::parse("cs_test_https_ca").unwrap(),
            &mut CallStats::default(),
        )
        .await
        .expect_err("untrusted");
    assert_eq!(error.class(), "network", "{error}");
    assert!(fake.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_variable_is_trusted_by_a_fresh_process() {
    let (ca, fake, front) = https_fake().await;
    let (pem, url) = (ca.pem(), front.uri());
    // The variable is read once per process: a child process of this test binary runs the check.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "https_ca::child_trusts_https_ca_cert",
                "--ignored",
            ])
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
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
