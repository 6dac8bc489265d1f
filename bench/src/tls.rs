//! The benchmark's TLS setting: every peer the functions talk to behind TLS with a CA made for the
//! run, as production pays it. HTTPS fronts relay to the Stripe, OpenAI and PostgREST (and JWKS)
//! stand-ins; PostgreSQL-protocol TLS proxies (SSLRequest, then TLS) sit in front of the shared
//! PostgreSQL and of PgBouncer, which are not reconfigured. Each front adds a loopback relay hop
//! that production does not have, so the TLS figures are slightly pessimistic.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::https_front::HttpsFront;
use testkit::pg_tls::{Mode, PgTlsProxy, TestCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The name the database certificates carry (the URL's host; `hostaddr` says where to connect).
const DB_HOST: &str = "localhost";

/// The TLS fronts of one run.
pub struct TlsPeers {
    ca: TestCa,
    /// The CA as a file, for `NODE_EXTRA_CA_CERTS` (Node.js reads only files).
    ca_file: PathBuf,
    pub stripe: HttpsFront,
    pub openai: HttpsFront,
    pub rest: HttpsFront,
    db: PgTlsProxy,
    pooler: Option<PgTlsProxy>,
}

impl Drop for TlsPeers {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ca_file);
    }
}

impl TlsPeers {
    /// Fronts for the stand-ins at these `http://` URIs and the PostgreSQL-protocol servers at
    /// `db` and `pooler`.
    pub async fn start(
        stripe: &str,
        openai: &str,
        rest: &str,
        db: SocketAddr,
        pooler: Option<SocketAddr>,
    ) -> TlsPeers {
        let ca = TestCa::new("lambda-bench run CA");
        let https = ca.server_config(&["127.0.0.1"]);
        let pg = Mode::Terminate(ca.server_config(&[DB_HOST]));
        let pooler = match pooler {
            Some(addr) => Some(PgTlsProxy::start(addr, pg.clone()).await),
            None => None,
        };
        TlsPeers {
            ca_file: ca.write_pem(),
            stripe: HttpsFront::for_uri(stripe, https.clone()).await,
            openai: HttpsFront::for_uri(openai, https.clone()).await,
            rest: HttpsFront::for_uri(rest, https).await,
            db: PgTlsProxy::start(db, pg).await,
            pooler,
            ca,
        }
    }

    /// What every process of the TLS setting is given: the CA as PEM text for the Rust functions
    /// (as a Lambda environment would carry it), as a file for Node.js.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HTTPS_CA_CERT", self.ca.pem()),
            ("DATABASE_CA_CERT", self.ca.pem()),
            ("NODE_EXTRA_CA_CERTS", self.ca_file.display().to_string()),
        ]
    }

    /// `DATABASE_URL` of `database` straight to PostgreSQL, TLS verified (`verify-full`).
    pub fn db_url(&self, database: &str) -> String {
        self.db
            .url("postgres", DB_HOST, database, "sslmode=verify-full")
    }

    /// `DATABASE_URL` of `database` through the pooler, TLS verified.
    pub fn pooler_url(&self, database: &str) -> Option<String> {
        self.pooler
            .as_ref()
            .map(|p| p.url("postgres", DB_HOST, database, "sslmode=verify-full"))
    }

    /// Sessions the database proxies relayed over TLS (a check that the setting is what it says).
    pub fn db_tls_sessions(&self) -> u64 {
        self.db.tls_sessions() + self.pooler.as_ref().map_or(0, |p| p.tls_sessions())
    }

    /// Sessions the database proxies relayed in plain text (must stay 0).
    pub fn db_plain_sessions(&self) -> u64 {
        self.db.plain_sessions() + self.pooler.as_ref().map_or(0, |p| p.plain_sessions())
    }
}

/// The parts of a first connection, medians over fresh connections, in milliseconds.
pub struct Handshakes {
    /// TCP connect to an HTTPS front.
    pub tcp_ms: f64,
    /// A full TLS 1.3 handshake after it (rustls with ring, the functions' configuration).
    pub tls_ms: f64,
    /// The same with a resumed session (a ticket from an earlier handshake).
    pub tls_resumed_ms: f64,
    /// SSLRequest plus TLS handshake to the PostgreSQL proxy (after its TCP connect).
    pub pg_tls_ms: f64,
    /// The process's first outbound client (`shared::http_client::build`: roots and TLS
    /// configuration made once) and a later one.
    pub first_client_ms: f64,
    pub next_client_ms: f64,
}

/// How long the process's first outbound client takes to build (the roots and the TLS
/// configuration are made then) and a second one: call before any client exists.
pub fn first_clients() -> (f64, f64) {
    let started = Instant::now();
    let _ = shared::http_client::build(Duration::from_secs(1), Duration::from_secs(1));
    let first = ms(started);
    let started = Instant::now();
    let _ = shared::http_client::build(Duration::from_secs(1), Duration::from_secs(1));
    (first, ms(started))
}

/// Measures the parts of a first connection `runs` times; `clients` is [`first_clients`]'s.
pub async fn handshakes(peers: &TlsPeers, runs: usize, clients: (f64, f64)) -> Handshakes {
    let (first_client_ms, next_client_ms) = clients;

    let config = client_config(&peers.ca.pem());
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let ip = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("an IP name");
    let db_name = rustls::pki_types::ServerName::try_from(DB_HOST).expect("a DNS name");
    let (mut tcp, mut tls, mut resumed, mut pg) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs.max(1) {
        // A fresh configuration has no ticket: a full handshake.
        let fresh = tokio_rustls::TlsConnector::from(client_config(&peers.ca.pem()));
        let started = Instant::now();
        let stream = TcpStream::connect(peers.stripe.addr)
            .await
            .expect("connect");
        tcp.push(ms(started));
        let started = Instant::now();
        let _ = fresh.connect(ip.clone(), stream).await.expect("handshake");
        tls.push(ms(started));
        // The shared configuration keeps tickets: after the first, handshakes resume.
        for sample in [None, Some(&mut resumed)] {
            let stream = TcpStream::connect(peers.stripe.addr)
                .await
                .expect("connect");
            let started = Instant::now();
            let mut session = connector
                .connect(ip.clone(), stream)
                .await
                .expect("handshake");
            if let Some(sample) = sample {
                sample.push(ms(started));
            }
            // Tickets arrive after the handshake: read until the server has sent them.
            let _ = tokio::time::timeout(Duration::from_millis(5), session.read(&mut [0; 1])).await;
        }
        let mut stream = TcpStream::connect(peers.db.addr).await.expect("connect");
        let started = Instant::now();
        stream
            .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .expect("SSLRequest");
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await.expect("S");
        let _ = tokio_rustls::TlsConnector::from(client_config(&peers.ca.pem()))
            .connect(db_name.clone(), stream)
            .await
            .expect("database handshake");
        pg.push(ms(started));
    }
    Handshakes {
        tcp_ms: median(&tcp),
        tls_ms: median(&tls),
        tls_resumed_ms: median(&resumed),
        pg_tls_ms: median(&pg),
        first_client_ms,
        next_client_ms,
    }
}

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in shared::http_client::extra_roots(ca_pem).expect("the run's CA") {
        roots.add(cert).expect("the run's CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

fn ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e3
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
