//! Direct PostgreSQL backend.
//!
//! Pooler-safe: every call is one `query_typed` (Parse/Bind/Execute/Sync with the unnamed
//! statement, parameter types given up front), so nothing depends on a named prepared statement
//! surviving between transactions, which Supabase's transaction pooler (port 6543) does not keep.
//! It is also one round trip per call.
//!
//! TLS follows [`super::database_url`]: required and verified for every host that is not
//! loopback unless `sslmode=disable` says otherwise, so a server (or a proxy in the middle) that
//! answers the SSLRequest with `N` gets no connection instead of a plain-text session.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use serde_json::Value;
use tokio_postgres::types::{Json, ToSql, Type};

use super::database_url::{DatabaseUrl, SslMode, TlsPolicy};
use super::{tls, Arg, Call, StoreError};

/// Connections per function instance: Lambda sends one request at a time.
pub const DEFAULT_POOL_SIZE: usize = 2;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool of direct connections.
#[derive(Clone)]
pub struct PgBackend {
    pool: Pool,
    /// Held while the connection opened at start-up ([`PgBackend::connect_early`]) is being
    /// made, so that the first call waits for it instead of opening a second one.
    opening: Arc<tokio::sync::Mutex<()>>,
    /// The TLS requirement in words, for error messages.
    tls_rule: Arc<str>,
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend").finish_non_exhaustive()
    }
}

impl PgBackend {
    /// A lazily connecting pool. Loopback hosts connect in plain text unless `sslmode` asks for
    /// more; every other host needs TLS, verified against the web PKI roots plus `ca_pem`
    /// (Supabase's database CA) or `sslrootcert`, unless `sslmode=disable`.
    pub fn new(url: &str, ca_pem: Option<&str>, pool_size: usize) -> Result<Self, StoreError> {
        let config_error = |message: String| StoreError::Database {
            code: "config".into(),
            message,
        };
        let DatabaseUrl {
            mut config,
            sslmode,
            tls: policy,
        } = DatabaseUrl::parse(url, ca_pem.is_some())
            .map_err(|e| config_error(format!("DATABASE_URL {e}")))?;
        let tls_rule: Arc<str> = match (&policy, sslmode) {
            (TlsPolicy::Plain, _) => "sslmode disable".into(),
            (_, Some(SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull)) => {
                format!("sslmode={}", sslmode.map_or("", SslMode::as_str)).into()
            }
            (_, mode) => format!(
                "verified TLS, required for a host that is not loopback unless sslmode=disable (sslmode={})",
                mode.map_or("none", SslMode::as_str)
            )
            .into(),
        };
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("saas-functions");
        }
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager =
            match tls::client_config(&policy, ca_pem).map_err(|e| config_error(e.to_string()))? {
                None => Manager::from_config(config, tokio_postgres::NoTls, manager_config),
                Some(tls) => Manager::from_config(
                    config,
                    tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                    manager_config,
                ),
            };
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(QUERY_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Self {
            pool,
            opening: Arc::new(tokio::sync::Mutex::new(())),
            tls_rule,
        })
    }

    /// Starts opening one connection in the background, so that connecting overlaps the rest of
    /// the cold start instead of following it. A failure is only logged: the first call connects
    /// again, so when the database does not answer at all that one call can wait two connect
    /// timeouts (2 x 5 s; every function's Lambda timeout is longer). Needs a Tokio runtime.
    pub fn connect_early(&self) {
        let Ok(guard) = self.opening.clone().try_lock_owned() else {
            return;
        };
        let pool = self.pool.clone();
        let tls_rule = self.tls_rule.clone();
        tokio::spawn(async move {
            // Dropping the pooled object returns the open connection to the pool.
            if let Err(e) = pool.get().await {
                let error = connect_error(&e, &tls_rule);
                tracing::warn!(%error, "early database connection failed; the first call will retry");
            }
            drop(guard);
        });
    }

    /// Runs one call. A connection found closed (the server restarted) is replaced and the call
    /// tried once more: every SQL function here is safe to repeat.
    pub async fn call(
        &self,
        call: &Call<'_>,
        round_trips: &AtomicU64,
    ) -> Result<Value, StoreError> {
        match self.call_once(call, round_trips).await {
            Err(Retry::Reconnect(_)) => match self.call_once(call, round_trips).await {
                Ok(v) => Ok(v),
                Err(Retry::Reconnect(e) | Retry::Final(e)) => Err(e),
            },
            Err(Retry::Final(e)) => Err(e),
            Ok(v) => Ok(v),
        }
    }

    async fn call_once(&self, call: &Call<'_>, round_trips: &AtomicU64) -> Result<Value, Retry> {
        drop(self.opening.lock().await);
        let client = self.pool.get().await.map_err(|e| {
            Retry::Final(StoreError::Unavailable(connect_error(&e, &self.tls_rule)))
        })?;
        let sql = sql_for(call);
        // `&RawValue` and `Value` go through the `Json` wrapper to be sent as jsonb.
        let values: Vec<(Box<dyn ToSql + Sync + Send + '_>, Type)> = call
            .args
            .iter()
            .map(|(_, arg)| -> (Box<dyn ToSql + Sync + Send + '_>, Type) {
                match arg {
                    Arg::Json(raw) => (Box::new(Json(*raw)), Type::JSONB),
                    Arg::Value(v) => (Box::new(Json(v)), Type::JSONB),
                    Arg::Text(t) => (Box::new(*t), Type::TEXT),
                    Arg::OptText(t) => (Box::new(*t), Type::TEXT),
                    Arg::Uuid(u) => (Box::new(*u), Type::UUID),
                    Arg::OptUuid(u) => (Box::new(*u), Type::UUID),
                    Arg::Int(i) => (Box::new(*i), Type::INT4),
                    Arg::BigInt(i) => (Box::new(*i), Type::INT8),
                    Arg::Bool(b) => (Box::new(*b), Type::BOOL),
                    Arg::OptJson(v) => (Box::new(v.as_ref().map(Json)), Type::JSONB),
                    Arg::TextArray(a) => (Box::new(*a), Type::TEXT_ARRAY),
                }
            })
            .collect();
        let typed: Vec<(&(dyn ToSql + Sync), Type)> = values
            .iter()
            .map(|(value, ty)| (value.as_ref() as &(dyn ToSql + Sync), ty.clone()))
            .collect();
        round_trips.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(QUERY_TIMEOUT, client.query_typed(&sql, &typed)).await;
        let rows = match result {
            Err(_) => {
                return Err(Retry::Final(StoreError::Unavailable(format!(
                    "{} timed out after {:?}",
                    call.function, QUERY_TIMEOUT
                ))))
            }
            Ok(Err(e)) if client.is_closed() => {
                return Err(Retry::Reconnect(StoreError::Unavailable(e.to_string())))
            }
            Ok(Err(e)) => return Err(Retry::Final(map_error(e))),
            Ok(Ok(rows)) => rows,
        };
        let row = rows
            .first()
            .ok_or_else(|| Retry::Final(StoreError::Decode("no row returned".into())))?;
        let Json(value): Json<Value> = row
            .try_get(0)
            .map_err(|e| Retry::Final(StoreError::Decode(e.to_string())))?;
        Ok(value)
    }
}

enum Retry {
    Reconnect(StoreError),
    Final(StoreError),
}

/// `select public.f(a => $1::jsonb, b => $2::text)`: explicit casts keep overload resolution
/// independent of the parameter types the driver sends.
fn sql_for(call: &Call<'_>) -> String {
    let mut sql = format!("select public.{}(", call.function);
    for (i, (name, arg)) in call.args.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        let cast = arg.sql_type();
        sql.push_str(&format!("{name} => ${}::{cast}", i + 1));
    }
    sql.push_str(")::jsonb");
    sql
}

fn map_error(error: tokio_postgres::Error) -> StoreError {
    let Some(db) = error.as_db_error() else {
        return StoreError::Unavailable(error.to_string());
    };
    let code = db.code().code();
    match code {
        "23505" => StoreError::Conflict(db.message().to_owned()),
        // serialization failure, deadlock, query canceled, admin shutdown, cannot connect now,
        // too many connections: transient.
        "40001" | "40P01" | "57014" | "57P01" | "57P02" | "57P03" | "53300" | "08000" | "08003"
        | "08006" => StoreError::Unavailable(format!("{code}: {}", db.message())),
        _ => StoreError::Database {
            code: code.to_owned(),
            message: db.message().to_owned(),
        },
    }
}

/// Why a connection could not be made, saying so plainly when TLS was refused or failed.
fn connect_error(error: &PoolError, tls_rule: &str) -> String {
    // tokio-postgres keeps the cause (rustls's reason) out of its own message: follow the chain.
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    if text.contains("server does not support TLS") {
        format!(
            "connect: the database server refused TLS (it answered the SSLRequest with N) but \
             {tls_rule} requires it; not connecting in plain text. A proxy may be stripping TLS"
        )
    } else if text.contains("TLS handshake") || text.contains("certificate") {
        format!("connect: TLS with the database failed ({tls_rule}): {text}")
    } else {
        format!("connect: {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_sql_names_and_casts_every_argument() {
        let raw = serde_json::value::RawValue::from_string("{}".into()).unwrap();
        let call = Call {
            function: "apply_stripe_event",
            args: vec![
                ("p_event", Arg::Value(serde_json::json!({}))),
                ("p_payload", Arg::Json(&raw)),
                ("p_note", Arg::Text("x")),
            ],
        };
        assert_eq!(
            sql_for(&call),
            "select public.apply_stripe_event(p_event => $1::jsonb, p_payload => $2::jsonb, p_note => $3::text)::jsonb"
        );
    }

    #[test]
    fn loopback_hosts_are_detected() {
        let local: tokio_postgres::Config = "postgres://u@127.0.0.1/db".parse().unwrap();
        let remote: tokio_postgres::Config = "postgres://u@db.x.supabase.co/db".parse().unwrap();
        assert!(super::super::database_url::is_loopback(&local));
        assert!(!super::super::database_url::is_loopback(&remote));
    }
}
