//! Database TLS against the local PostgreSQL behind the test proxies (`testkit::pg_tls`): a host
//! that is not loopback gets verified TLS or no session at all, a downgrading man in the middle
//! gets nothing, and libpq's `sslmode=verify-ca` / `verify-full` with `sslrootcert` work as a
//! connection string copied from Supabase or used with psql expects.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use shared::config::{AppEnv, EnvReader, StoreConfig};
use shared::store::{Call, Store, StoreError};
use shared::telemetry::Metrics;
use testkit::db::TestDb;
use testkit::fixtures::{self, FunctionUrlRequest};
use testkit::pg_tls::{Mode, PgTlsProxy, TestCa};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// The name the test certificates are issued to; it resolves nowhere, `hostaddr` reaches the proxy.
const HOST: &str = "db.pg-tls.test";
const WEBHOOK_SECRET: &str = "whsec_db_tls_tests";

/// The test server's address, from its URL.
async fn server(db: &TestDb) -> SocketAddr {
    let config: tokio_postgres::Config = db.url.parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        other => panic!("the test database must be reached over TCP, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let mut addrs = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap();
    addrs.next().unwrap()
}

/// The store as a function builds it from `DATABASE_URL` (and `DATABASE_CA_CERT`).
fn store(url: &str, ca_pem: Option<&str>) -> Result<Store, String> {
    let mut env = EnvReader::new(|k| match k {
        "DATABASE_URL" => Some(url.to_owned()),
        "DATABASE_CA_CERT" => ca_pem.map(str::to_owned),
        _ => None,
    });
    let config = StoreConfig::read(&mut env, AppEnv::Production);
    env.finish(()).map_err(|e| e.to_string())?;
    Store::from_config(&config.ok_or("no store config")?).map_err(|e| e.to_string())
}

async fn ask(store: &Store) -> Result<Value, StoreError> {
    store
        .call(Call {
            function: "schema_status",
            args: vec![],
        })
        .await
}

#[tokio::test]
async fn a_downgrading_proxy_gets_no_session_and_the_webhook_answers_503_saying_why() {
    let db = TestDb::new().await;
    let mitm = PgTlsProxy::start(server(&db).await, Mode::Downgrade).await;
    let ca = TestCa::new("db-tls test CA");
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = logs.clone();
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(move || Capture(writer.clone()))
            .with_filter(shared::telemetry::log_filter("info")),
    );
    let _guard = tracing::subscriber::set_default(subscriber);
    let deliver = |url: String| {
        let ca = ca.pem();
        async move {
            let env = [
                ("DATABASE_URL", url),
                ("DATABASE_CA_CERT", ca),
                ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
                ("STRIPE_SECRET_KEY", "sk_test_unused_here".to_owned()),
                ("STRIPE_API_BASE", "http://127.0.0.1:9".to_owned()),
            ];
            let config = webhook::Config::read(EnvReader::new(|k| {
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
            webhook::handle(&state, request).await
        }
    };

    let mut refused = Vec::new();
    for query in [
        "",
        "sslmode=prefer",
        "sslmode=require",
        "sslmode=verify-full",
    ] {
        refused.push(deliver(mitm.url("postgres", HOST, &db.name, query)).await);
    }
    let stored_while_refused: i64 = db
        .client()
        .await
        .query_one("select count(*) from stripe_events", &[])
        .await
        .unwrap()
        .get(0);
    // Only an explicit sslmode=disable goes plain: the proxy really is a man in the middle.
    let plain = deliver(mitm.url("postgres", HOST, &db.name, "sslmode=disable")).await;

    for response in &refused {
        assert_eq!(response.status(), 503);
        assert_eq!(
            fixtures::json_body(response)["error"]["code"],
            "store_unavailable"
        );
    }
    assert_eq!(stored_while_refused, 0);
    assert_eq!(
        mitm.plain_sessions(),
        1,
        "the sslmode=disable delivery only"
    );
    assert!(mitm.refused_clients() >= 4);
    assert_eq!(plain.status(), 200);
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("the database server refused TLS")
            && logs.contains("not connecting in plain text"),
        "the log says why:\n{logs}"
    );
}

#[tokio::test]
async fn libpq_verify_full_and_verify_ca_work_with_a_certificate_made_here() {
    let db = TestDb::new().await;
    let ca = TestCa::new("db-tls test CA");
    let stranger = TestCa::new("another CA");
    let tls = PgTlsProxy::start(
        server(&db).await,
        Mode::Terminate(ca.server_config(&[HOST, "127.0.0.1"])),
    )
    .await;
    let root = ca.write_pem();
    let other_root = stranger.write_pem();
    let rootcert = format!("sslrootcert={}", root.display());
    let other_rootcert = format!("sslrootcert={}", other_root.display());
    let url = |host: &str, query: &str| tls.url("postgres", host, &db.name, query);

    let good = [
        (
            "verify-full",
            url(HOST, &format!("sslmode=verify-full&{rootcert}")),
            None,
        ),
        (
            "verify-ca, another name",
            url("other-name.test", &format!("sslmode=verify-ca&{rootcert}")),
            None,
        ),
        (
            "no sslmode, DATABASE_CA_CERT",
            url(HOST, ""),
            Some(ca.pem()),
        ),
        (
            "verify-ca, DATABASE_CA_CERT",
            url("other-name.test", "sslmode=verify-ca"),
            Some(ca.pem()),
        ),
        (
            "key/value form",
            format!(
                "host={HOST} hostaddr=127.0.0.1 port={} user=postgres dbname={} sslmode=verify-full sslrootcert='{}'",
                tls.addr.port(),
                db.name,
                root.display()
            ),
            None,
        ),
        (
            "loopback, verify-full",
            format!(
                "postgres://postgres@127.0.0.1:{}/{}?sslmode=verify-full&{rootcert}",
                tls.addr.port(),
                db.name
            ),
            None,
        ),
    ];
    for (name, url, ca_pem) in &good {
        let store = store(url, ca_pem.as_deref()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let status = ask(&store).await;
        assert!(status.is_ok(), "{name}: {status:?}");
    }
    assert_eq!(tls.tls_sessions(), good.len() as u64);

    let bad = [
        (
            "verify-full, another name",
            url(
                "other-name.test",
                &format!("sslmode=verify-full&{rootcert}"),
            ),
            "certificate not valid for name \"other-name.test\"",
        ),
        (
            "verify-full, another CA",
            url(HOST, &format!("sslmode=verify-full&{other_rootcert}")),
            "UnknownIssuer",
        ),
        (
            "verify-ca, another CA",
            url(HOST, &format!("sslmode=verify-ca&{other_rootcert}")),
            "UnknownIssuer",
        ),
        (
            "no sslmode, no CA: the web PKI does not know this one",
            url(HOST, ""),
            "UnknownIssuer",
        ),
    ];
    for (name, url, why) in bad {
        let store = store(&url, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        match ask(&store).await {
            Err(StoreError::Unavailable(message)) => {
                assert!(
                    message.contains("TLS with the database failed") && message.contains(why),
                    "{name}: {message}"
                );
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(tls.plain_sessions(), 0);

    // Loopback without sslmode keeps today's local default: plain text.
    let local = format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        tls.addr.port(),
        db.name
    );
    ask(&store(&local, None).unwrap()).await.unwrap();
    assert_eq!(tls.plain_sessions(), 1);
    std::fs::remove_file(root).ok();
    std::fs::remove_file(other_root).ok();
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
