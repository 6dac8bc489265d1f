//! TLS in front of a real PostgreSQL without reconfiguring it: a certificate authority made at
//! run time, server certificates it signs for any names, and a proxy that speaks PostgreSQL's
//! SSLRequest. In [`Mode::Terminate`] the proxy answers `S`, completes TLS with such a
//! certificate and relays the session in plain text to the server behind it; in
//! [`Mode::Downgrade`] it answers `N`, as a man in the middle stripping TLS does, and relays
//! whatever the client then sends. Each proxy counts the sessions it relayed with and without TLS.
//! Used by the database TLS tests and meant for TLS cold-start benchmarks too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// PostgreSQL's SSLRequest and GSSENCRequest codes (the first message's 4 bytes after its length).
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// A certificate authority for tests.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA (ECDSA P-256) named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA certificate, PEM (what `DATABASE_CA_CERT` or `sslrootcert` holds).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to a fresh file in the temporary directory (for `sslrootcert`).
    pub fn write_pem(&self) -> PathBuf {
        let path = std::env::temp_dir().join(format!("test-ca-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&path, self.pem()).expect("write CA file");
        path
    }

    /// A server configuration whose certificate this CA issued for `names` (DNS names or IPs).
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("server params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server certificate and key");
        Arc::new(config)
    }
}

/// What the proxy does with an SSLRequest.
#[derive(Clone)]
pub enum Mode {
    /// Answer `S`, complete TLS with this configuration, relay the session to the server.
    Terminate(Arc<rustls::ServerConfig>),
    /// Answer `N` (no TLS here) and relay the session in plain text: a downgrade attack.
    Downgrade,
}

#[derive(Default)]
struct Counters {
    tls: AtomicU64,
    plain: AtomicU64,
    refused: AtomicU64,
}

/// A running proxy on a free loopback port. Stops when dropped.
pub struct PgTlsProxy {
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PgTlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PgTlsProxy {
    /// Starts a proxy to `target` (e.g. `127.0.0.1:5432`).
    pub async fn start(target: SocketAddr, mode: Mode) -> PgTlsProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind TLS proxy");
        let addr = listener.local_addr().expect("TLS proxy addr");
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (mode, counters) = (mode.clone(), shared.clone());
                tokio::spawn(async move {
                    let _ = relay(client, target, mode, &counters).await;
                });
            }
        });
        PgTlsProxy {
            addr,
            counters,
            task,
        }
    }

    /// Sessions relayed over TLS.
    pub fn tls_sessions(&self) -> u64 {
        self.counters.tls.load(Ordering::SeqCst)
    }

    /// Sessions relayed in plain text (a client that accepted the downgrade, or never asked).
    pub fn plain_sessions(&self) -> u64 {
        self.counters.plain.load(Ordering::SeqCst)
    }

    /// Clients that hung up after being refused TLS (what a client requiring TLS does).
    pub fn refused_clients(&self) -> u64 {
        self.counters.refused.load(Ordering::SeqCst)
    }

    /// A `postgres://` URL naming `host` (what TLS verifies) while connecting to this proxy
    /// (`hostaddr`), for `user` and `database`, with extra `query` parameters (`a=b&c=d`).
    pub fn url(&self, user: &str, host: &str, database: &str, query: &str) -> String {
        let mut url = format!(
            "postgres://{user}@{host}:{}/{database}?hostaddr={}",
            self.addr.port(),
            self.addr.ip()
        );
        if !query.is_empty() {
            url.push('&');
            url.push_str(query);
        }
        url
    }
}

async fn relay(
    mut client: TcpStream,
    target: SocketAddr,
    mode: Mode,
    counters: &Counters,
) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    loop {
        let mut head = [0u8; 8];
        client.read_exact(&mut head).await?;
        let length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if length == 8 && code == GSSENC_REQUEST {
            client.write_all(b"N").await?;
            continue;
        }
        let mut server = TcpStream::connect(target).await?;
        server.set_nodelay(true)?;
        if length != 8 || code != SSL_REQUEST {
            // A plain startup: relay it as it came.
            counters.plain.fetch_add(1, Ordering::SeqCst);
            server.write_all(&head).await?;
            tokio::io::copy_bidirectional(&mut client, &mut server).await?;
            return Ok(());
        }
        match mode {
            Mode::Terminate(config) => {
                client.write_all(b"S").await?;
                let mut tls = tokio_rustls::TlsAcceptor::from(config)
                    .accept(client)
                    .await?;
                counters.tls.fetch_add(1, Ordering::SeqCst);
                tokio::io::copy_bidirectional(&mut tls, &mut server).await?;
            }
            Mode::Downgrade => {
                client.write_all(b"N").await?;
                let mut first = [0u8; 1];
                if client.read(&mut first).await? == 0 {
                    counters.refused.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                counters.plain.fetch_add(1, Ordering::SeqCst);
                server.write_all(&first).await?;
                tokio::io::copy_bidirectional(&mut client, &mut server).await?;
            }
        }
        return Ok(());
    }
}
