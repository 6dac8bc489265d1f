//! The one outbound HTTP client setup (reqwest on rustls with ring), so every client in the
//! workspace shares one TLS stack and one trust store: the web PKI roots plus the extra roots of
//! `HTTPS_CA_CERT` (a corporate proxy's CA, a test CA), read once per process. Extra roots add to
//! the web roots, never replace them.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use crate::config::EnvReader;

/// The variable holding extra trusted roots for outbound HTTPS: PEM text or a path to a PEM file.
pub const CA_VARIABLE: &str = "HTTPS_CA_CERT";

/// A warm-up that has not finished by then is of no use to the first request.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// A client with explicit connect and total timeouts.
pub fn build(connect_timeout: Duration, timeout: Duration) -> reqwest::Result<reqwest::Client> {
    builder(connect_timeout, timeout, tls_config().clone()).build()
}

/// A client trusting the web PKI roots plus the certificates in `extra_pem` instead of the
/// process's `HTTPS_CA_CERT` (tests, tools).
pub fn build_trusting(
    connect_timeout: Duration,
    timeout: Duration,
    extra_pem: &str,
) -> Result<reqwest::Client, String> {
    let roots = extra_roots(extra_pem)?;
    builder(connect_timeout, timeout, client_config(&roots))
        .build()
        .map_err(|e| e.to_string())
}

fn builder(
    connect_timeout: Duration,
    timeout: Duration,
    tls: rustls::ClientConfig,
) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .user_agent(concat!("saas-functions/", env!("CARGO_PKG_VERSION")))
}

/// Opens a connection to `url`'s host in the background (a `HEAD` whose answer, whatever it is,
/// is read and dropped), so that the client's pool holds a connection with its TLS handshake done
/// when the first real request comes. Called during init: the handshake overlaps the runtime's
/// first `next` and the work before the first call. Needs a Tokio runtime.
pub fn warm_up(client: &reqwest::Client, url: String) {
    let client = client.clone();
    tokio::spawn(async move {
        match client.head(&url).timeout(WARM_UP_TIMEOUT).send().await {
            Ok(answer) => {
                let _ = answer.bytes().await;
            }
            Err(error) => log_if_untrusted(&error, "warm-up"),
        }
    });
}

/// Records a problem when `HTTPS_CA_CERT` is set but holds no usable certificate, so a bad value
/// stops the cold start with a configuration error naming the variable (the clients built later
/// would otherwise go without the extra roots).
pub fn check_extra_roots(env: &mut EnvReader<'_>) {
    if let Some(value) = env.optional(CA_VARIABLE) {
        if let Err(what) = extra_roots(&value) {
            env.problem(CA_VARIABLE, what);
        }
    }
}

/// True when `error` is a TLS handshake refused because the server's certificate does not chain
/// to a trusted root (a private CA missing from `HTTPS_CA_CERT`), as opposed to a network failure.
pub fn untrusted_certificate(error: &reqwest::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref() {
            return true;
        }
        // io::Error's `source` skips the error it wraps: step into it instead.
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner),
            None => e.source(),
        };
    }
    false
}

/// Logs, once per failure, that a certificate was refused: retrying cannot help, configuration can.
pub fn log_if_untrusted(error: &reqwest::Error, peer: &str) {
    if untrusted_certificate(error) {
        tracing::error!(
            peer,
            "TLS certificate not trusted: a private or proxy CA belongs in {CA_VARIABLE}"
        );
    }
}

/// The certificates of `value`: PEM text, or a path to a PEM file.
pub fn extra_roots(value: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = if value.trim_start().starts_with("-----BEGIN") {
        value.to_owned()
    } else {
        std::fs::read_to_string(value)
            .map_err(|_| "is neither PEM text nor a readable PEM file".to_owned())?
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| "holds no valid PEM certificate".to_owned())?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".to_owned());
    }
    let mut probe = RootCertStore::empty();
    for cert in &certs {
        probe
            .add(cert.clone())
            .map_err(|_| "holds an unusable certificate".to_owned())?;
    }
    Ok(certs)
}

/// The process's TLS configuration, made on first use: the web PKI roots, `HTTPS_CA_CERT`'s roots
/// (read as [`check_extra_roots`] reads it, trimmed; a bad value fails the config read, which
/// every function does before it serves: a client built earlier, Sentry's, logs it and trusts the
/// web roots only), ring, TLS 1.2 and 1.3, HTTP/1.1 by ALPN. One configuration for every client, so the roots are loaded once and
/// TLS sessions are resumed across clients.
fn tls_config() -> &'static rustls::ClientConfig {
    static CONFIG: OnceLock<rustls::ClientConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let extra = match std::env::var(CA_VARIABLE) {
            Ok(value) if !value.trim().is_empty() => {
                extra_roots(value.trim()).unwrap_or_else(|what| {
                    tracing::error!(
                        "{CA_VARIABLE} {what}; outbound HTTPS trusts the web roots only"
                    );
                    Vec::new()
                })
            }
            _ => Vec::new(),
        };
        client_config(&extra)
    })
}

/// The roots outbound HTTPS trusts: every web PKI root, then `extra` added to them (never instead
/// of them).
pub fn root_store(extra: &[CertificateDer<'static>]) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        // Checked by `extra_roots`.
        let _ = roots.add(cert.clone());
    }
    roots
}

fn client_config(extra: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    let roots = root_store(extra);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        let cases = [
            ("/nonexistent/ca.pem", "neither PEM text nor a readable"),
            (
                "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
                "no valid PEM",
            ),
            (
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "no PEM certificate",
            ),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "unusable certificate",
            ),
        ];
        for (value, why) in cases {
            let err = extra_roots(value).expect_err(value);
            assert!(err.contains(why), "{value}: {err}");
        }
    }

    #[test]
    fn a_bad_variable_is_a_config_problem_naming_it() {
        let mut env = EnvReader::new(|k| (k == CA_VARIABLE).then(|| "not a pem".to_owned()));
        check_extra_roots(&mut env);
        let err = env.finish(()).expect_err("bad HTTPS_CA_CERT");
        assert_eq!(err.problems[0].variable, CA_VARIABLE);
        assert!(!err.to_string().contains("not a pem"), "never the value");
    }

    #[test]
    fn unset_is_fine() {
        let mut env = EnvReader::new(|_| None);
        check_extra_roots(&mut env);
        assert!(env.finish(()).is_ok());
    }
}
