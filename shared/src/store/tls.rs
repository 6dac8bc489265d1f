//! rustls client configurations for the database, from a [`TlsPolicy`].
//!
//! Host-name verification is rustls's own (`tokio-postgres-rustls` hands it the URL's host).
//! `verify-ca` checks the chain to the configured CA only: rustls has no switch for that, so a
//! verifier of our own runs rustls's own chain check and skips the name check; signatures of the
//! handshake are still verified by rustls's functions.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::database_url::{Roots, TlsPolicy};

/// Why no client configuration could be made: the variable at fault and what is wrong, never a
/// value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {what}")]
pub struct TlsConfigError {
    pub variable: &'static str,
    pub what: String,
}

fn problem(variable: &'static str, what: impl Into<String>) -> TlsConfigError {
    TlsConfigError {
        variable,
        what: what.into(),
    }
}

/// The client configuration for `policy`, or `None` for plain connections. `ca_pem` is
/// `DATABASE_CA_CERT`.
pub fn client_config(
    policy: &TlsPolicy,
    ca_pem: Option<&str>,
) -> Result<Option<rustls::ClientConfig>, TlsConfigError> {
    let TlsPolicy::Verified { check_host, roots } = policy else {
        return Ok(None);
    };
    let mut store = RootCertStore::empty();
    // verify-ca trusts the server's own CA only: with public roots any site's certificate passes.
    let web_pki = *check_host && matches!(roots, Roots::Default | Roots::System);
    if web_pki {
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Roots::File(path) = roots {
        let pem = std::fs::read_to_string(path).map_err(|_| {
            problem(
                "DATABASE_URL",
                "sslrootcert names a file that cannot be read",
            )
        })?;
        add_pem(&mut store, &pem, "DATABASE_URL", "sslrootcert's file")?;
    }
    if let (Some(pem), Roots::Default | Roots::File(_)) = (ca_pem, roots) {
        add_pem(&mut store, pem, "DATABASE_CA_CERT", "it")?;
    }
    if store.is_empty() {
        return Err(problem(
            "DATABASE_URL",
            "no certificate authority to verify the server against",
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| problem("DATABASE_URL", e.to_string()))?;
    let config = if *check_host {
        builder.with_root_certificates(store).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly {
                roots: Arc::new(store),
                provider,
            }))
            .with_no_client_auth()
    };
    Ok(Some(config))
}

fn add_pem(
    store: &mut RootCertStore,
    pem: &str,
    variable: &'static str,
    what: &str,
) -> Result<(), TlsConfigError> {
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert =
            cert.map_err(|_| problem(variable, format!("{what} holds no valid PEM certificate")))?;
        store
            .add(cert)
            .map_err(|_| problem(variable, format!("{what} holds an unusable certificate")))?;
        added += 1;
    }
    if added == 0 {
        return Err(problem(
            variable,
            format!("{what} holds no PEM certificate"),
        ));
    }
    Ok(())
}

/// `verify-ca`: the chain must lead to one of `roots`; the name in the certificate is not checked.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
