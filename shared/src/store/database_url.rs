//! `DATABASE_URL` read as libpq reads it, and the TLS policy it implies.
//!
//! tokio-postgres 0.7 parses only `sslmode=disable|prefer|require` and, with `prefer`, carries on
//! in plain text when the server (or a man in the middle) answers the SSLRequest with `N`. So the
//! TLS parameters are taken out of the connection string here, before tokio-postgres sees it:
//! `sslmode` (all six of libpq's values) and `sslrootcert` (a PEM file, or `system`), in both the
//! URL (`postgres://...?sslmode=verify-full`) and the key/value (`host=... sslmode=...`) forms.
//!
//! | `sslmode` | loopback host | any other host |
//! |---|---|---|
//! | none, `allow`, `prefer` | plain | TLS required, certificate and host name verified |
//! | `disable` | plain | plain |
//! | `require`, `verify-full` | TLS required, certificate and host name verified | same |
//! | `verify-ca` | TLS required, certificate chain verified, host name not | same |
//!
//! Never unverified TLS: libpq's `require` skips verification, which a man in the middle with any
//! certificate defeats; here it verifies like `verify-full`.
//!
//! "Loopback" means every `host` and every `hostaddr` is loopback: with a `hostaddr`,
//! tokio-postgres connects to that address and uses the host only as the name TLS verifies, so
//! `host=localhost hostaddr=192.0.2.2` is a remote host. A remote `hostaddr` without any host is
//! refused unless `sslmode=disable`: there is no name to verify a certificate against.

use std::borrow::Cow;

use tokio_postgres::config::Host;

/// What `sslmode` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// libpq's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the trusted roots come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Roots {
    /// No `sslrootcert`: the web PKI roots plus `DATABASE_CA_CERT`.
    Default,
    /// `sslrootcert=system`: the web PKI roots.
    System,
    /// `sslrootcert=<file>`: the PEM certificates in that file (plus `DATABASE_CA_CERT`).
    File(String),
}

/// How a connection is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS: an explicit `sslmode=disable`, or a loopback host without a stricter mode.
    Plain,
    /// TLS or no connection at all; the chain is always verified, the host name when `check_host`.
    Verified { check_host: bool, roots: Roots },
}

/// A connection string split into what tokio-postgres gets and the TLS policy.
#[derive(Clone, Debug)]
pub struct DatabaseUrl {
    /// The connection settings, without the TLS parameters (its `sslmode` is set from `tls`).
    pub config: tokio_postgres::Config,
    /// What `sslmode` said, `None` when absent.
    pub sslmode: Option<SslMode>,
    pub tls: TlsPolicy,
}

/// Why a connection string is refused. Never contains the string (it holds the password).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(pub String);

impl DatabaseUrl {
    /// Parses `url` (URL or key/value form). `has_ca` says whether `DATABASE_CA_CERT` is set.
    pub fn parse(url: &str, has_ca: bool) -> Result<Self, UrlError> {
        let split = split_tls_params(url)?;
        let sslmode = match split.sslmode.as_deref() {
            None => None,
            Some(value) => Some(SslMode::parse(value).ok_or_else(|| {
                UrlError(
                    "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full"
                        .into(),
                )
            })?),
        };
        let mut config: tokio_postgres::Config = split.rest.parse().map_err(|_| {
            UrlError(
                "is not a valid PostgreSQL connection string (postgres://user:password@host:port/db)"
                    .into(),
            )
        })?;
        let roots = match split.sslrootcert.as_deref() {
            None => Roots::Default,
            Some("system") => Roots::System,
            Some(path) => Roots::File(path.to_owned()),
        };
        let tls = policy(sslmode, is_loopback(&config), roots);
        if matches!(tls, TlsPolicy::Verified { .. }) && config.get_hosts().is_empty() {
            return Err(UrlError(
                "has a hostaddr that is not loopback but no host: TLS needs the server's name to \
                 verify its certificate against (add host=<name>, or the name before the port)"
                    .into(),
            ));
        }
        if let TlsPolicy::Verified {
            check_host: false,
            roots,
        } = &tls
        {
            let own_ca = matches!(roots, Roots::File(_)) || (*roots == Roots::Default && has_ca);
            if !own_ca {
                return Err(UrlError(
                    "sslmode=verify-ca needs the server's own CA (sslrootcert=<file> or DATABASE_CA_CERT): \
                     against the public web PKI roots any site's certificate would pass"
                        .into(),
                ));
            }
        }
        config.ssl_mode(match tls {
            TlsPolicy::Plain => tokio_postgres::config::SslMode::Disable,
            TlsPolicy::Verified { .. } => tokio_postgres::config::SslMode::Require,
        });
        Ok(Self {
            config,
            sslmode,
            tls,
        })
    }
}

/// The policy table of the module documentation.
pub fn policy(sslmode: Option<SslMode>, loopback: bool, roots: Roots) -> TlsPolicy {
    match sslmode {
        Some(SslMode::Disable) => TlsPolicy::Plain,
        None | Some(SslMode::Allow | SslMode::Prefer) if loopback => TlsPolicy::Plain,
        Some(SslMode::VerifyCa) => TlsPolicy::Verified {
            check_host: false,
            roots,
        },
        _ => TlsPolicy::Verified {
            check_host: true,
            roots,
        },
    }
}

/// True when every host is loopback (`localhost`, 127.0.0.0/8, `::1`) or a Unix socket, and so
/// is every `hostaddr`: tokio-postgres connects to `hostaddr` when it is given (the host only
/// names the server for TLS), so a remote address behind `host=localhost` is a remote host.
pub fn is_loopback(config: &tokio_postgres::Config) -> bool {
    let hosts = config.get_hosts().iter().all(|host| match host {
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Host::Unix(_) => true,
    });
    hosts && config.get_hostaddrs().iter().all(|ip| ip.is_loopback())
}

struct Split<'a> {
    rest: Cow<'a, str>,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of `url`, leaving the rest as it was.
fn split_tls_params(url: &str) -> Result<Split<'_>, UrlError> {
    let mut split = Split {
        rest: Cow::Borrowed(url),
        sslmode: None,
        sslrootcert: None,
    };
    let mut take = |key: &str, value: String| -> Result<bool, UrlError> {
        match key {
            "sslmode" => split.sslmode = Some(value),
            "sslrootcert" => split.sslrootcert = Some(value),
            "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" => {
                return Err(UrlError(format!(
                    "{key} is not supported (client certificates and CRLs); the server's CA goes in sslrootcert or DATABASE_CA_CERT"
                )))
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok(split);
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(&percent_decode(key)?, percent_decode(value)?)? {
                kept.push(pair);
            }
        }
        split.rest = Cow::Owned(if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        });
    } else {
        let mut rest = String::with_capacity(url.len());
        for token in key_values(url)? {
            if !take(&token.key, token.value)? {
                rest.push_str(&url[token.span.0..token.span.1]);
                rest.push(' ');
            }
        }
        split.rest = Cow::Owned(rest.trim_end().to_owned());
    }
    Ok(split)
}

fn percent_decode(text: &str) -> Result<String, UrlError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| UrlError("has a malformed %-escape in its parameters".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError("has parameters that are not UTF-8".into()))
}

struct KeyValue {
    key: String,
    value: String,
    span: (usize, usize),
}

/// The `key = value` pairs of a libpq key/value string (values may be single-quoted, with
/// backslash escapes), each with its byte span in `text`.
fn key_values(text: &str) -> Result<Vec<KeyValue>, UrlError> {
    let bad = || UrlError("is not a valid PostgreSQL connection string (key=value pairs)".into());
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|(_, c)| *c);
    let offset = |i: usize| chars.get(i).map_or(text.len(), |(o, _)| *o);
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        let Some(_) = at(i) else { break };
        let start = i;
        let mut key = String::new();
        while let Some(c) = at(i).filter(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
            i += 1;
        }
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if at(i) != Some('=') || key.is_empty() {
            return Err(bad());
        }
        i += 1;
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        let mut value = String::new();
        if at(i) == Some('\'') {
            i += 1;
            loop {
                match at(i) {
                    None => return Err(bad()),
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        value.push(at(i + 1).ok_or_else(bad)?);
                        i += 2;
                    }
                    Some(c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while let Some(c) = at(i).filter(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(at(i + 1).ok_or_else(bad)?);
                    i += 2;
                } else {
                    value.push(c);
                    i += 1;
                }
            }
        }
        out.push(KeyValue {
            key,
            value,
            span: (offset(start), offset(i)),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<DatabaseUrl, UrlError> {
        DatabaseUrl::parse(url, false)
    }

    fn verified(check_host: bool, roots: Roots) -> TlsPolicy {
        TlsPolicy::Verified { check_host, roots }
    }

    #[test]
    fn remote_hosts_require_verified_tls_unless_disabled() {
        let remote = "postgres://u:p@db.abc.supabase.co:5432/postgres";
        for (query, want) in [
            ("", verified(true, Roots::Default)),
            ("?sslmode=prefer", verified(true, Roots::Default)),
            ("?sslmode=allow", verified(true, Roots::Default)),
            ("?sslmode=require", verified(true, Roots::Default)),
            ("?sslmode=verify-full", verified(true, Roots::Default)),
            (
                "?sslmode=verify-full&sslrootcert=/tmp/ca.pem",
                verified(true, Roots::File("/tmp/ca.pem".into())),
            ),
            (
                "?sslrootcert=system&sslmode=verify-full",
                verified(true, Roots::System),
            ),
            (
                "?sslmode=verify-ca&sslrootcert=%2Ftmp%2Fca%20x.pem",
                verified(false, Roots::File("/tmp/ca x.pem".into())),
            ),
            ("?sslmode=disable", TlsPolicy::Plain),
        ] {
            let parsed = parse(&format!("{remote}{query}")).unwrap();
            assert_eq!(parsed.tls, want, "{query}");
            let expected_mode = if want == TlsPolicy::Plain {
                tokio_postgres::config::SslMode::Disable
            } else {
                tokio_postgres::config::SslMode::Require
            };
            assert_eq!(parsed.config.get_ssl_mode(), expected_mode, "{query}");
        }
    }

    #[test]
    fn loopback_keeps_plain_text_unless_asked() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/x",
            "postgres://postgres@localhost/x?sslmode=prefer",
            "postgres://postgres@[::1]/x?application_name=t",
        ] {
            assert_eq!(parse(url).unwrap().tls, TlsPolicy::Plain, "{url}");
        }
        assert_eq!(
            parse("postgres://postgres@localhost/x?sslmode=verify-full")
                .unwrap()
                .tls,
            verified(true, Roots::Default)
        );
    }

    /// tokio-postgres connects to `hostaddr` when it is given (the host name only names the
    /// server for TLS): a remote address behind `localhost`, or with no host at all, is remote.
    #[test]
    fn a_remote_hostaddr_is_a_remote_host_in_every_form() {
        for url in [
            "postgres://app_user:S3cret@localhost:15432/postgres?hostaddr=192.0.2.2",
            "postgres://app_user:S3cret@127.0.0.1:15432/postgres?hostaddr=192.0.2.2&sslmode=prefer",
            "host=localhost hostaddr=192.0.2.2 port=15432 user=app_user password=S3cret",
            "host=localhost hostaddr=2001:db8::2 user=app_user password=S3cret sslmode=allow",
        ] {
            let parsed = parse(url).unwrap();
            assert!(!is_loopback(&parsed.config), "{url}");
            assert_eq!(parsed.tls, verified(true, Roots::Default), "{url}");
            assert_eq!(
                parsed.config.get_ssl_mode(),
                tokio_postgres::config::SslMode::Require,
                "{url}"
            );
        }
        // Without a host there is no name to verify a certificate against: refused, never plain.
        for url in [
            "postgres://app_user:S3cret@/postgres?hostaddr=192.0.2.2&port=15432",
            "postgresql:///postgres?hostaddr=192.0.2.2",
            "hostaddr=192.0.2.2 port=15432 user=app_user password=S3cret dbname=postgres",
        ] {
            let err = parse(url).unwrap_err();
            assert!(err.0.contains("hostaddr"), "{url}: {err}");
            assert!(!err.0.contains("S3cret"));
        }
        // sslmode=disable stays the operator's explicit choice (preflight fails it in production).
        let disabled = parse("hostaddr=192.0.2.2 user=u sslmode=disable").unwrap();
        assert_eq!(disabled.tls, TlsPolicy::Plain);
        assert!(!is_loopback(&disabled.config));
        // Loopback addresses stay loopback, with or without a host name.
        for url in [
            "postgres://postgres@localhost:5432/x?hostaddr=127.0.0.1",
            "hostaddr=127.0.0.1 port=5432 user=postgres",
            "host=localhost hostaddr=::1 user=postgres",
        ] {
            let parsed = parse(url).unwrap();
            assert!(is_loopback(&parsed.config), "{url}");
            assert_eq!(parsed.tls, TlsPolicy::Plain, "{url}");
        }
        // A remote name reached through a loopback address (a tunnel) still verifies that name.
        let tunnel = parse("postgres://u@db.example.com/x?hostaddr=127.0.0.1").unwrap();
        assert_eq!(tunnel.tls, verified(true, Roots::Default));
    }

    #[test]
    fn other_parameters_reach_tokio_postgres_untouched() {
        let parsed = parse(
            "postgresql://postgres.ref:p%40ss@aws-0-eu.pooler.supabase.com:6543/postgres?sslmode=verify-full&application_name=fn&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(parsed.config.get_user(), Some("postgres.ref"));
        assert_eq!(parsed.config.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(parsed.config.get_application_name(), Some("fn"));
        assert_eq!(
            parsed.config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        assert_eq!(parsed.sslmode, Some(SslMode::VerifyFull));
    }

    #[test]
    fn key_value_strings_are_read_too() {
        let parsed = parse(
            "host=db.example.com port=5432 user=app password='it''s \\'quoted\\'' sslmode = verify-ca sslrootcert='/etc/ca dir/root.crt' dbname=app",
        );
        // A doubled quote is not an escape in libpq: this one is malformed.
        assert!(parsed.is_err());
        let parsed = parse(
            "host=db.example.com port=5432 user=app password='it\\'s' sslmode = verify-ca sslrootcert='/etc/ca dir/root.crt' dbname=app",
        )
        .unwrap();
        assert_eq!(
            parsed.tls,
            verified(false, Roots::File("/etc/ca dir/root.crt".into()))
        );
        assert_eq!(parsed.config.get_password(), Some(&b"it's"[..]));
        assert_eq!(parsed.config.get_dbname(), Some("app"));
        assert_eq!(
            parse("host=127.0.0.1 user=postgres").unwrap().tls,
            TlsPolicy::Plain
        );
    }

    #[test]
    fn refusals_say_why_without_the_url() {
        let secret = "s3cr3t-password";
        for (url, why) in [
            (
                format!("postgres://u:{secret}@db.example.com/x?sslmode=verify"),
                "sslmode must be one of",
            ),
            (
                format!("postgres://u:{secret}@db.example.com/x?sslmode=verify-ca"),
                "needs the server's own CA",
            ),
            (
                format!(
                    "postgres://u:{secret}@db.example.com/x?sslmode=verify-ca&sslrootcert=system"
                ),
                "needs the server's own CA",
            ),
            (
                format!("postgres://u:{secret}@db.example.com/x?sslcert=/c.pem"),
                "sslcert is not supported",
            ),
            (
                format!("postgres://u:{secret}@db.example.com/x?sslmode=%zz"),
                "malformed %-escape",
            ),
            (
                format!("postgres://u:{secret}@db.example.com/x?nonsense=1"),
                "not a valid PostgreSQL connection string",
            ),
            (
                format!("host=db password={secret} sslmode"),
                "not a valid PostgreSQL connection string",
            ),
        ] {
            let err = parse(&url).unwrap_err();
            assert!(err.0.contains(why), "{url}: {err}");
            assert!(!err.0.contains(secret));
        }
        // With DATABASE_CA_CERT, verify-ca has a CA of its own.
        assert!(
            DatabaseUrl::parse("postgres://u@db.example.com/x?sslmode=verify-ca", true).is_ok()
        );
    }
}
