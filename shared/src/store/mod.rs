//! The data store: the app's SQL functions, called through one of two backends.
//!
//! Both backends call the same SQL functions from `supabase/migrations/` with the same named
//! arguments, one call per operation, each one transaction and one round trip:
//! - [`postgres`]: a direct PostgreSQL connection (`DATABASE_URL`), pooler-safe (no named
//!   prepared statements, so it works behind Supabase's transaction pooler);
//! - [`postgrest`]: Supabase's PostgREST RPC endpoint (`SUPABASE_URL` + service role key).
//!
//! The typed operations live in [`orders`], [`payments`] and [`chat`], over [`Store::call`].

pub mod chat;
pub mod database_url;
pub mod orders;
pub mod payments;
pub mod postgres;
pub mod postgrest;
pub mod tls;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::StoreConfig;
pub use payments::Outcome;

/// A named argument of a SQL function call.
#[derive(Debug)]
pub enum Arg<'a> {
    /// A `jsonb` argument given as JSON text, sent verbatim.
    Json(&'a RawValue),
    /// A `jsonb` argument built from a value.
    Value(Value),
    /// A `text` argument.
    Text(&'a str),
    /// A nullable `text` argument.
    OptText(Option<&'a str>),
    /// A `uuid` argument.
    Uuid(uuid::Uuid),
    /// A nullable `uuid` argument.
    OptUuid(Option<uuid::Uuid>),
    /// A nullable `integer` argument.
    Int(Option<i32>),
    /// A nullable `bigint` argument.
    BigInt(Option<i64>),
    /// A `boolean` argument.
    Bool(bool),
    /// A nullable `jsonb` argument.
    OptJson(Option<Value>),
    /// A `text[]` argument.
    TextArray(&'a [String]),
}

impl Arg<'_> {
    /// The SQL type the argument is cast to.
    pub fn sql_type(&self) -> &'static str {
        match self {
            Arg::Json(_) | Arg::Value(_) | Arg::OptJson(_) => "jsonb",
            Arg::Bool(_) => "boolean",
            Arg::Text(_) | Arg::OptText(_) => "text",
            Arg::Uuid(_) | Arg::OptUuid(_) => "uuid",
            Arg::Int(_) => "integer",
            Arg::BigInt(_) => "bigint",
            Arg::TextArray(_) => "text[]",
        }
    }
}

/// One SQL function call: `public.<function>(name => value, ...)` returning `jsonb`.
#[derive(Debug)]
pub struct Call<'a> {
    pub function: &'static str,
    pub args: Vec<(&'static str, Arg<'a>)>,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is not answering in time: try again later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A unique constraint refused the write (SQLSTATE 23505).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database refused the call (bad argument, missing function, permission).
    #[error("database error {code}: {message}")]
    Database { code: String, message: String },
    /// The answer was not what the function returns.
    #[error("unexpected answer: {0}")]
    Decode(String),
}

/// The store used by every function. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    round_trips: Arc<AtomicU64>,
}

#[derive(Clone, Debug)]
enum Backend {
    Postgres(postgres::PgBackend),
    PostgRest(postgrest::RestBackend),
}

impl Store {
    /// Builds the backend `config` names. Connections open lazily, on first use.
    pub fn from_config(config: &StoreConfig) -> Result<Self, StoreError> {
        let backend = match config {
            StoreConfig::Postgres { url, ca_pem } => Backend::Postgres(postgres::PgBackend::new(
                url.expose(),
                ca_pem.as_deref(),
                postgres::DEFAULT_POOL_SIZE,
            )?),
            StoreConfig::PostgRest { url, service_key } => {
                Backend::PostgRest(postgrest::RestBackend::new(url, service_key.clone())?)
            }
        };
        Ok(Self::with_backend(backend))
    }

    /// A direct PostgreSQL store with `pool_size` connections (tests use several).
    pub fn postgres(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        Ok(Self::with_backend(Backend::Postgres(
            postgres::PgBackend::new(url, None, pool_size)?,
        )))
    }

    /// A PostgREST store.
    pub fn postgrest(url: &str, service_key: crate::config::Secret) -> Result<Self, StoreError> {
        Ok(Self::with_backend(Backend::PostgRest(
            postgrest::RestBackend::new(url, service_key)?,
        )))
    }

    fn with_backend(backend: Backend) -> Self {
        Self {
            backend,
            round_trips: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Database round trips made so far (one per call, retries included).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Starts connecting now (a PostgreSQL session, or PostgREST's HTTPS connection) so the first
    /// request does not wait for the whole connection set-up; call it once at start-up, inside the
    /// runtime.
    pub fn connect_early(&self) {
        match &self.backend {
            Backend::Postgres(pg) => pg.connect_early(),
            Backend::PostgRest(rest) => rest.connect_early(),
        }
    }

    /// Calls a SQL function and returns its `jsonb` result.
    pub async fn call(&self, call: Call<'_>) -> Result<Value, StoreError> {
        let counter = &self.round_trips;
        match &self.backend {
            Backend::Postgres(pg) => pg.call(&call, counter).await,
            Backend::PostgRest(rest) => rest.call(&call, counter).await,
        }
    }
}
