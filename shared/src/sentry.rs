//! Optional error reporting to Sentry (`SENTRY_DSN`), without the Sentry SDK: one envelope POST
//! per server error or panic, with the function, request id and error code; never a body, a
//! header or a secret. Unset, nothing is installed and nothing costs anything.

use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;

static REPORTER: OnceLock<Reporter> = OnceLock::new();

/// Where and how to send events.
#[derive(Clone, Debug)]
pub struct Reporter {
    endpoint: String,
    auth: String,
    environment: String,
    client: reqwest::Client,
}

impl Reporter {
    /// A reporter for a DSN (`https://<key>@<host>/<project>`), `None` if it is not one.
    pub fn from_dsn(dsn: &str, environment: &str) -> Option<Self> {
        let (scheme, rest) = dsn.trim().split_once("://")?;
        let (key, rest) = rest.split_once('@')?;
        let key = key.split(':').next()?;
        let (host, project) = rest.rsplit_once('/')?;
        if key.is_empty()
            || host.is_empty()
            || project.is_empty()
            || !project.chars().all(|c| c.is_ascii_digit())
        {
            return None;
        }
        Some(Self {
            endpoint: format!("{scheme}://{host}/api/{project}/envelope/"),
            auth: format!(
                "Sentry sentry_version=7, sentry_key={key}, sentry_client=saas-functions/{}",
                env!("CARGO_PKG_VERSION")
            ),
            environment: environment.to_owned(),
            client: crate::http_client::build(Duration::from_secs(1), Duration::from_secs(2))
                .ok()?,
        })
    }

    /// The envelope for one event.
    pub fn envelope(&self, function: &str, request_id: &str, level: &str, message: &str) -> String {
        let event_id = uuid::Uuid::new_v4().simple().to_string();
        let timestamp = crate::clock::Clock::system().unix_ms() as f64 / 1000.0;
        let header = json!({"event_id": event_id});
        let item = json!({
            "event_id": event_id,
            "timestamp": timestamp,
            "platform": "other",
            "level": level,
            "logger": function,
            "environment": self.environment,
            "release": concat!("saas-functions@", env!("CARGO_PKG_VERSION")),
            "message": {"formatted": message},
            "tags": {"function": function, "request_id": request_id},
        });
        format!("{header}\n{}\n{item}\n", json!({"type": "event"}))
    }

    /// Sends one event; failures are logged, never raised.
    pub async fn send(&self, function: &str, request_id: &str, level: &str, message: &str) {
        let body = self.envelope(function, request_id, level, message);
        let result = self
            .client
            .post(&self.endpoint)
            .header("X-Sentry-Auth", &self.auth)
            .header("Content-Type", "application/x-sentry-envelope")
            .body(body)
            .send()
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e.without_url(), "could not report to Sentry");
        }
    }
}

/// Installs the reporter from `SENTRY_DSN` and a panic hook that reports panics. Call in `main`.
pub fn init_from_env(function: &'static str) {
    let Some(dsn) = std::env::var("SENTRY_DSN")
        .ok()
        .filter(|d| !d.trim().is_empty())
    else {
        return;
    };
    let environment = std::env::var("APP_ENV").unwrap_or_else(|_| "development".into());
    let Some(reporter) = Reporter::from_dsn(&dsn, &environment) else {
        tracing::error!("SENTRY_DSN is not a Sentry DSN; error reporting is off");
        return;
    };
    if REPORTER.set(reporter).is_err() {
        return;
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = format!("panic{location}");
        // Report from another thread with its own runtime: the panicking one may be a runtime worker.
        let _ = std::thread::spawn(move || {
            if let (Some(reporter), Ok(rt)) = (
                REPORTER.get(),
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build(),
            ) {
                rt.block_on(reporter.send(function, "", "fatal", &message));
            }
        })
        .join();
        previous(info);
    }));
}

/// Reports a server error answer (5xx) by its code, when Sentry is configured.
pub async fn report_server_error(function: &str, request_id: &str, code: &str) {
    if let Some(reporter) = REPORTER.get() {
        reporter
            .send(
                function,
                request_id,
                "error",
                &format!("{function} answered {code}"),
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_gives_the_envelope_endpoint_and_auth() {
        let r =
            Reporter::from_dsn("https://abc123@o42.ingest.sentry.io/4505", "production").unwrap();
        assert_eq!(
            r.endpoint,
            "https://o42.ingest.sentry.io/api/4505/envelope/"
        );
        assert!(r
            .auth
            .starts_with("Sentry sentry_version=7, sentry_key=abc123, "));
        for bad in [
            "",
            "not a dsn",
            "https://o42.ingest.sentry.io/4505",
            "https://k@host/notanumber",
        ] {
            assert!(Reporter::from_dsn(bad, "x").is_none(), "{bad}");
        }
    }

    #[test]
    fn envelope_carries_request_id_and_code_only() {
        let r = Reporter::from_dsn("https://k@h.example/1", "staging").unwrap();
        let envelope = r.envelope(
            "webhook",
            "req-9",
            "error",
            "webhook answered store_unavailable",
        );
        let lines: Vec<serde_json::Value> = envelope
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["type"], "event");
        assert_eq!(lines[2]["tags"]["request_id"], "req-9");
        assert_eq!(lines[2]["environment"], "staging");
        assert_eq!(
            lines[2]["message"]["formatted"],
            "webhook answered store_unavailable"
        );
        assert_eq!(lines[0]["event_id"], lines[2]["event_id"]);
    }
}
