//! Supabase PostgREST backend: `POST {SUPABASE_URL}/rest/v1/rpc/<function>` with the service
//! role key, named arguments as the JSON body.
//!
//! Uses the workspace's own reqwest (one HTTP/TLS stack); the `postgrest` crate would add a
//! second one (see docs/decisions.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::{Arg, Call, StoreError};
use crate::config::Secret;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A PostgREST RPC client.
#[derive(Clone, Debug)]
pub struct RestBackend {
    client: reqwest::Client,
    rpc_base: String,
    key: Secret,
}

/// PostgREST's error body.
#[derive(Debug, Default, Deserialize)]
pub struct PostgRestError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub details: Option<Value>,
    #[serde(default)]
    pub hint: Option<Value>,
}

impl RestBackend {
    /// A client for the project at `supabase_url`.
    pub fn new(supabase_url: &str, key: Secret) -> Result<Self, StoreError> {
        let client = crate::http_client::build(CONNECT_TIMEOUT, REQUEST_TIMEOUT)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Self {
            client,
            rpc_base: format!("{}/rest/v1/rpc/", supabase_url.trim_end_matches('/')),
            key,
        })
    }

    /// Opens the connection to PostgREST in the background (no key sent), for the first call.
    pub fn connect_early(&self) {
        crate::http_client::warm_up(&self.client, self.rpc_base.clone());
    }

    /// Calls the function and returns its JSON result.
    pub async fn call(
        &self,
        call: &Call<'_>,
        round_trips: &AtomicU64,
    ) -> Result<Value, StoreError> {
        let body = body_for(call)?;
        round_trips.fetch_add(1, Ordering::Relaxed);
        let response = self
            .client
            .post(format!("{}{}", self.rpc_base, call.function))
            .header("apikey", self.key.expose())
            .bearer_auth(self.key.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("{}: {}", call.function, without_url(&e)))
            })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| {
            StoreError::Unavailable(format!("{}: {}", call.function, without_url(&e)))
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Decode(format!("{}: {e}", call.function)));
        }
        let error: PostgRestError = serde_json::from_slice(&bytes).unwrap_or_default();
        Err(map_error(status, error))
    }
}

/// The JSON body: each named argument, JSON arguments embedded verbatim.
fn body_for(call: &Call<'_>) -> Result<String, StoreError> {
    let mut body = Vec::with_capacity(256);
    body.push(b'{');
    for (i, (name, arg)) in call.args.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        let written = serde_json::to_writer(&mut body, name).and_then(|()| {
            body.push(b':');
            match arg {
                Arg::Json(raw) => {
                    body.extend_from_slice(raw.get().as_bytes());
                    Ok(())
                }
                Arg::Value(v) => serde_json::to_writer(&mut body, v),
                Arg::Text(t) => serde_json::to_writer(&mut body, t),
                Arg::OptText(t) => serde_json::to_writer(&mut body, t),
                Arg::Uuid(u) => serde_json::to_writer(&mut body, u),
                Arg::OptUuid(u) => serde_json::to_writer(&mut body, u),
                Arg::Int(i) => serde_json::to_writer(&mut body, i),
                Arg::BigInt(i) => serde_json::to_writer(&mut body, i),
                Arg::Bool(b) => serde_json::to_writer(&mut body, b),
                Arg::OptJson(v) => serde_json::to_writer(&mut body, v),
                Arg::TextArray(a) => serde_json::to_writer(&mut body, a),
            }
        });
        written.map_err(|e| StoreError::Decode(e.to_string()))?;
    }
    body.push(b'}');
    String::from_utf8(body).map_err(|e| StoreError::Decode(e.to_string()))
}

fn map_error(status: reqwest::StatusCode, error: PostgRestError) -> StoreError {
    let code = error
        .code
        .unwrap_or_else(|| format!("http_{}", status.as_u16()));
    let message = error.message.unwrap_or_else(|| status.to_string());
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        // 502/503/504 from the gateway, PGRST connection errors, statement timeouts.
        return match code.as_str() {
            "23505" => StoreError::Conflict(message),
            c if c.starts_with("PGRST0")
                || c.starts_with("http_")
                || c == "57014"
                || c == "40001"
                || c == "40P01" =>
            {
                StoreError::Unavailable(format!("{code}: {message}"))
            }
            _ => StoreError::Database { code, message },
        };
    }
    match code.as_str() {
        "23505" => StoreError::Conflict(message),
        _ => StoreError::Database { code, message },
    }
}

/// reqwest errors carry the URL; keep hosts and paths out of logs anyway.
fn without_url(error: &reqwest::Error) -> String {
    let kind = if crate::http_client::untrusted_certificate(error) {
        "TLS certificate not trusted (HTTPS_CA_CERT?)"
    } else if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect error"
    } else {
        "request error"
    };
    kind.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_embeds_raw_json_verbatim() {
        let raw =
            serde_json::value::RawValue::from_string("{\"b\": 1,  \"a\":\"张\"}".into()).unwrap();
        let call = Call {
            function: "f",
            args: vec![
                ("p_payload", Arg::Json(&raw)),
                ("p_note", Arg::Text("x\"y")),
            ],
        };
        assert_eq!(
            body_for(&call).unwrap(),
            "{\"p_payload\":{\"b\": 1,  \"a\":\"张\"},\"p_note\":\"x\\\"y\"}"
        );
    }

    #[test]
    fn errors_are_classified() {
        let e = |status: u16, code: &str| {
            map_error(
                reqwest::StatusCode::from_u16(status).unwrap(),
                PostgRestError {
                    code: Some(code.into()),
                    message: Some("m".into()),
                    ..Default::default()
                },
            )
        };
        assert!(matches!(e(409, "23505"), StoreError::Conflict(_)));
        assert!(matches!(e(503, "PGRST001"), StoreError::Unavailable(_)));
        assert!(matches!(e(500, "57014"), StoreError::Unavailable(_)));
        assert!(matches!(e(404, "PGRST202"), StoreError::Database { .. }));
        assert!(matches!(e(400, "22023"), StoreError::Database { .. }));
        assert!(matches!(
            map_error(reqwest::StatusCode::BAD_GATEWAY, PostgRestError::default()),
            StoreError::Unavailable(_)
        ));
    }
}
