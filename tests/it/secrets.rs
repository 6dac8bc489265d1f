//! A full scenario run with recognisable secret values and the most verbose log level the
//! production filter allows: none of the secrets may appear in any log line, metric line or
//! response.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use shared::auth::AuthConfig;
use shared::config::{Secret, StoreConfig, StripeApi};
use shared::store::Store;
use shared::stripe::ids::PriceId;
use shared::telemetry::Metrics;
use testkit::apps;
use testkit::db::{url_for, TestDb};
use testkit::fixtures::{self, FunctionUrlRequest};
use testkit::tokens;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const WEBHOOK_SECRET: &str = "whsec_RECOGNISABLE0webhook0secret";
const STRIPE_KEY: &str = "sk_test_RECOGNISABLE0stripe0key";
const JWT_SECRET: &str = "RECOGNISABLE0jwt0secret0at0least0thirty0two";
const OPENAI_KEY: &str = "sk-RECOGNISABLE0openai0key";
const DB_PASSWORD: &str = "RECOGNISABLE0db0password";
const SECRETS: [&str; 5] = [
    WEBHOOK_SECRET,
    STRIPE_KEY,
    JWT_SECRET,
    OPENAI_KEY,
    DB_PASSWORD,
];

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_secret_reaches_logs_metrics_or_responses() {
    let logs = Capture(Arc::new(Mutex::new(Vec::new())));
    let writer = logs.clone();
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(move || writer.clone())
            .with_filter(shared::telemetry::log_filter("trace")),
    );
    let _guard = tracing::subscriber::set_default(subscriber);

    let db = TestDb::new().await;
    let sql = db.client().await;
    let user = db.create_user(&sql).await.to_string();
    // Trust auth ignores the password, so it can be a recognisable value.
    let url = url_for(
        &db.url
            .replacen("postgres@", &format!("postgres:{DB_PASSWORD}@"), 1),
        &db.name,
    );
    let mut responses = String::new();

    // Stripe refuses the key everywhere (its message quotes a masked key).
    let stripe = MockServer::start().await;
    Mock::given(wiremock::matchers::any()).respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": {
        "type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_****0key"}}))).mount(&stripe).await;
    let stripe_api = StripeApi {
        key: Secret::new(STRIPE_KEY),
        base: stripe.uri(),
        timeout: Duration::from_secs(2),
        retries: 0,
    };

    // Webhook: a good delivery (its session is read at Stripe, which refuses the key), a forged
    // one, a stale one.
    let webhook_config = webhook::Config {
        secrets: vec![Secret::new(WEBHOOK_SECRET)],
        stripe: stripe_api.clone(),
        price_id: Some(PriceId::parse("price_1").unwrap()),
        ..apps::webhook_config(
            StoreConfig::Postgres {
                url: Secret::new(&url),
                ca_pem: None,
            },
            &stripe.uri(),
        )
    };
    let (webhook_state, metric_lines) =
        apps::webhook_state(webhook_config, Store::postgres(&url, 1).unwrap());
    let event =
        fixtures::checkout_event("checkout.session.completed", "cs_test_s", "", &user, "paid");
    let body = fixtures::body(&event);
    for header in [
        fixtures::sign(&body, WEBHOOK_SECRET),
        fixtures::sign(&body, "whsec_other"),
        shared::stripe::signature::sign(&body, &Secret::new(WEBHOOK_SECRET), 1),
    ] {
        let request = FunctionUrlRequest::post("/", &body)
            .header("stripe-signature", &header)
            .into_request()
            .unwrap();
        responses.push_str(&String::from_utf8_lossy(
            webhook::handle(&webhook_state, request)
                .await
                .body()
                .as_ref(),
        ));
    }

    // Checkout: Stripe refuses the key, then a bad token.
    let checkout_config = checkout::Config {
        store: StoreConfig::Postgres {
            url: Secret::new(&url),
            ca_pem: None,
        },
        auth: AuthConfig {
            hs256_secret: Some(Secret::new(JWT_SECRET)),
            ..apps::auth_config()
        },
        stripe: stripe_api,
        max_wait: Duration::from_secs(2),
        ..apps::checkout_config(&url, &stripe.uri())
    };
    let (checkout_state, checkout_lines) =
        apps::checkout_state(checkout_config, Store::postgres(&url, 1).unwrap());
    // Another user: the first one has just paid through the webhook.
    let buyer = db.create_user(&sql).await.to_string();
    let token = tokens::hs256(&tokens::user_claims(&buyer, None), JWT_SECRET.as_bytes());
    for request in [
        FunctionUrlRequest::post("/", b"").bearer(&token),
        FunctionUrlRequest::post("/", b"").bearer("x.y.z"),
    ] {
        let response = checkout::handle(&checkout_state, request.into_request().unwrap()).await;
        responses.push_str(&String::from_utf8_lossy(response.body().as_ref()));
    }

    // Chat: the upstream refuses our key, then answers a stream.
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(testkit::llm_fake::error(
                "Incorrect API key provided: sk-RECO***key",
                "invalid_request_error",
                "invalid_api_key",
            )),
        )
        .up_to_n_times(1)
        .mount(&upstream)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(testkit::llm_fake::sse(&["ok"]), "text/event-stream"),
        )
        .mount(&upstream)
        .await;
    let (metrics, chat_lines) = Metrics::in_memory("chat");
    let mut chat_config = chat::Config::read(shared::config::EnvReader::new(|k| match k {
        "DATABASE_URL" => Some(url.clone()),
        "SUPABASE_JWT_SECRET" => Some(JWT_SECRET.into()),
        "OPENAI_API_KEY" => Some(OPENAI_KEY.into()),
        "OPENAI_BASE_URL" => Some(format!("{}/v1", upstream.uri())),
        _ => None,
    }))
    .unwrap();
    chat_config.timeout = Duration::from_secs(2);
    chat_config.openai_key = Some(Secret::new(OPENAI_KEY));
    let chat_state = Arc::new(
        chat::State::from_parts(chat_config, Store::postgres(&url, 1).unwrap(), metrics).unwrap(),
    );
    for stream in [false, true] {
        let body = json!({"messages": [{"role": "user", "content": format!("hello {stream}")}], "stream": stream}).to_string();
        let request = FunctionUrlRequest::post("/", body.as_bytes())
            .bearer(&token)
            .into_request()
            .unwrap();
        let response = chat::handle(chat_state.clone(), request).await;
        responses.push_str(&String::from_utf8_lossy(
            &response.into_body().collect().await,
        ));
    }

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let metrics: String = [metric_lines, checkout_lines, chat_lines]
        .iter()
        .flat_map(|l| l.lock().unwrap().clone())
        .collect();
    assert!(logs.lines().count() >= 8, "the scenario logged:\n{logs}");
    for expected in [
        "signature refused",
        "Stripe rejected our key",
        "refused OPENAI_API_KEY",
    ] {
        assert!(logs.contains(expected), "{expected} not logged:\n{logs}");
    }
    for secret in SECRETS {
        assert!(!logs.contains(secret), "{secret} in logs");
        assert!(!metrics.contains(secret), "{secret} in metrics");
        assert!(!responses.contains(secret), "{secret} in responses");
    }
    // Bodies and personal data stay out of the logs too.
    assert!(!logs.contains("张伟") && !logs.contains("zhang.wei@example.com"));
}

/// The hardening paths with the same recognisable secrets: a database connection refused by a
/// downgrading proxy and one failing certificate verification (the URL holds the password), a
/// chat over its token budget, an anonymous session refused at checkout and rate-limited in chat.
#[tokio::test]
async fn no_secret_reaches_logs_on_the_refusal_paths() {
    use testkit::pg_tls::{Mode, PgTlsProxy, TestCa};

    let logs = Capture(Arc::new(Mutex::new(Vec::new())));
    let writer = logs.clone();
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(move || writer.clone())
            .with_filter(shared::telemetry::log_filter("trace")),
    );
    let _guard = tracing::subscriber::set_default(subscriber);
    let db = TestDb::new().await;
    let sql = db.client().await;
    let user = db.create_user(&sql).await.to_string();
    let mut responses = String::new();

    // Webhook: the database behind a downgrading proxy, then behind TLS from an unknown CA.
    let target: std::net::SocketAddr = {
        let config: tokio_postgres::Config = db.url.parse().unwrap();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        format!("127.0.0.1:{port}").parse().unwrap()
    };
    let user_part = format!("postgres:{DB_PASSWORD}");
    let downgrade = PgTlsProxy::start(target, Mode::Downgrade).await;
    let unknown_ca = PgTlsProxy::start(
        target,
        Mode::Terminate(TestCa::new("unknown CA").server_config(&["db.secrets.test"])),
    )
    .await;
    for proxy in [&downgrade, &unknown_ca] {
        let url = proxy.url(&user_part, "db.secrets.test", &db.name, "");
        let env = [
            ("DATABASE_URL", url),
            ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
            ("STRIPE_SECRET_KEY", STRIPE_KEY.to_owned()),
            ("STRIPE_API_BASE", "http://127.0.0.1:9".to_owned()),
        ];
        let config = webhook::Config::read(shared::config::EnvReader::new(|k| {
            env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        }))
        .unwrap();
        let mut state = webhook::State::new(config).unwrap();
        state.metrics = Metrics::in_memory("webhook").0;
        let event = fixtures::ignored_event();
        let body = fixtures::body(&event);
        let request = FunctionUrlRequest::post("/", &body)
            .header("stripe-signature", &fixtures::sign(&body, WEBHOOK_SECRET))
            .into_request()
            .unwrap();
        let response = webhook::handle(&state, request).await;
        assert_eq!(response.status(), 503);
        responses.push_str(&String::from_utf8_lossy(response.body().as_ref()));
    }

    // Checkout: an anonymous session.
    let env = [
        ("DATABASE_URL", db.url.clone()),
        ("SUPABASE_JWT_SECRET", JWT_SECRET.to_owned()),
        ("STRIPE_SECRET_KEY", STRIPE_KEY.to_owned()),
        ("STRIPE_API_BASE", "http://127.0.0.1:9".to_owned()),
        ("STRIPE_FULL_REPORT_PRICE_ID", "price_1".to_owned()),
    ];
    let config = checkout::Config::read(shared::config::EnvReader::new(|k| {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    }))
    .unwrap();
    let mut checkout_state = checkout::State::new(config).unwrap();
    let (metrics, checkout_lines) = Metrics::in_memory("checkout");
    checkout_state.metrics = metrics;
    let guest = db.create_user(&sql).await.to_string();
    let mut anonymous = tokens::user_claims(&guest, None);
    anonymous["is_anonymous"] = json!(true);
    let anonymous = tokens::hs256(&anonymous, JWT_SECRET.as_bytes());
    let request = FunctionUrlRequest::post("/", b"").bearer(&anonymous);
    let response = checkout::handle(&checkout_state, request.into_request().unwrap()).await;
    assert_eq!(response.status(), 403);
    responses.push_str(&String::from_utf8_lossy(response.body().as_ref()));

    // Chat: a budget spent by the first answer, then an anonymous session over its rate.
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(testkit::llm_fake::completion("fine")),
        )
        .mount(&upstream)
        .await;
    let base = format!("{}/v1", upstream.uri());
    let env = [
        ("DATABASE_URL", db.url.clone()),
        ("SUPABASE_JWT_SECRET", JWT_SECRET.to_owned()),
        ("OPENAI_API_KEY", OPENAI_KEY.to_owned()),
        ("OPENAI_BASE_URL", base),
        // "first" reserves 3 + (9 + 4) + (5 + 4) + 10 = 35 and costs 19: nothing more fits.
        ("CHAT_SYSTEM_PROMPT", "Be brief.".to_owned()),
        ("CHAT_MAX_TOKENS", "10".to_owned()),
        ("CHAT_DAILY_TOKEN_BUDGET", "40".to_owned()),
        ("CHAT_ANONYMOUS_RATE_LIMIT_PER_MIN", "1".to_owned()),
    ];
    let chat_config = chat::Config::read(shared::config::EnvReader::new(|k| {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    }))
    .unwrap();
    let (chat_state, chat_lines) =
        apps::chat_state(chat_config, Store::postgres(&db.url, 1).unwrap());
    let chat_state = Arc::new(chat_state);
    let member = tokens::hs256(&tokens::user_claims(&user, None), JWT_SECRET.as_bytes());
    let mut statuses = Vec::new();
    for (token, question) in [
        (&member, "first"),
        (&member, "second"),
        (&anonymous, "third"),
        (&anonymous, "fourth"),
    ] {
        let body = json!({"messages": [{"role": "user", "content": question}]}).to_string();
        let request = FunctionUrlRequest::post("/", body.as_bytes())
            .bearer(token)
            .into_request()
            .unwrap();
        let response = chat::handle(chat_state.clone(), request).await;
        statuses.push(response.status().as_u16());
        responses.push_str(&String::from_utf8_lossy(
            &response.into_body().collect().await,
        ));
    }
    assert_eq!(statuses, [200, 429, 200, 429]);

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let metrics: String = [checkout_lines, chat_lines]
        .iter()
        .flat_map(|l| l.lock().unwrap().clone())
        .collect();
    for expected in [
        "the database server refused TLS",
        "TLS with the database failed",
        "daily token budget reached",
    ] {
        assert!(logs.contains(expected), "{expected} not logged:\n{logs}");
    }
    for secret in SECRETS {
        assert!(!logs.contains(secret), "{secret} in logs");
        assert!(!metrics.contains(secret), "{secret} in metrics");
        assert!(!responses.contains(secret), "{secret} in responses");
    }
}
