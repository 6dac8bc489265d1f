//! HTTPS in front of a plain-HTTP fake without touching it: a TCP listener that completes TLS with
//! a certificate from a [`crate::pg_tls::TestCa`] and relays the bytes to the fake. Used by the
//! `HTTPS_CA_CERT` tests and by the benchmark's TLS setting (Stripe, OpenAI, PostgREST, JWKS).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

/// A running TLS front on a free loopback port. Stops when dropped.
pub struct HttpsFront {
    pub addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsFront {
    /// Starts a front relaying to `target` (the fake's `host:port`) with `config`'s certificate.
    pub async fn start(target: SocketAddr, config: Arc<rustls::ServerConfig>) -> HttpsFront {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind HTTPS front");
        let addr = listener.local_addr().expect("HTTPS front addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        });
        HttpsFront {
            addr,
            handshakes,
            task,
        }
    }

    /// TLS handshakes completed so far (one per connection a client opened).
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// Starts a front for the fake at `uri` (`http://127.0.0.1:port`, as wiremock gives it).
    pub async fn for_uri(uri: &str, config: Arc<rustls::ServerConfig>) -> HttpsFront {
        let target = uri
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("the fake's URI is http://ip:port");
        HttpsFront::start(target, config).await
    }

    /// `https://127.0.0.1:port` (the certificate names the address).
    pub fn uri(&self) -> String {
        format!("https://{}", self.addr)
    }
}
