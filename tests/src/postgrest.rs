//! A local stand-in for Supabase's PostgREST, RPC only: `POST /rest/v1/rpc/<function>` with a JSON
//! object of named arguments runs `public.<function>` on a real PostgreSQL and answers with its
//! JSON result, the way PostgREST 12 does:
//! - one transaction per request, `role` switched to `service_role` and `request.jwt.claims` set
//!   (so the migrations' grants are exercised as on Supabase), arguments bound through
//!   `json_to_record` with the function's declared types, overloads chosen by argument names;
//! - scalar results as JSON, `void` as `204 No Content`;
//! - errors as `{code, message, details, hint}` with PostgREST's SQLSTATE to HTTP status table.
//!
//! Beside it, Supabase Auth's `GET /auth/v1/.well-known/jwks.json` answers an empty key set, as
//! for a project still signing with the legacy HS256 secret.
//!
//! Not PostgREST: the only accepted key is the one given to [`PostgRest::start`] (sent as
//! `apikey` and `Authorization: Bearer`), it is not decoded as a JWT, and tables, views, filters,
//! set-returning functions and functions with OUT parameters are not served. Used by the PostgREST backend's tests and by the
//! benchmarks (the Rust functions' PostgREST backend and the Node.js baseline's supabase-js).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::RwLock;

/// PostgREST's default pool size.
const POOL_SIZE: usize = 10;

/// One overload of a function: argument names and types, how many trailing ones have defaults.
#[derive(Clone, Debug)]
struct Signature {
    args: Vec<(String, String)>,
    defaults: usize,
    returns_void: bool,
    returns_set: bool,
}

struct State {
    pool: Pool,
    key: String,
    functions: RwLock<HashMap<String, Vec<Signature>>>,
}

/// A running stand-in.
pub struct PostgRest {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PostgRest {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PostgRest {
    /// Serves the database at `database_url` on a free loopback port, accepting `key`.
    pub async fn start(database_url: &str, key: &str) -> PostgRest {
        let config: tokio_postgres::Config = database_url.parse().expect("database url");
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .build()
            .expect("pool");
        // Open the pool's connections up front, as PostgREST does at startup.
        let mut warm = Vec::new();
        for _ in 0..2 {
            warm.push(pool.get().await.expect("postgrest stand-in cannot connect"));
        }
        drop(warm);
        let state = Arc::new(State {
            pool,
            key: key.to_owned(),
            functions: RwLock::new(HashMap::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let _ = socket.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(serve(&state, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        PostgRest { addr, task }
    }

    /// The project URL to give as `SUPABASE_URL`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn reply(status: StatusCode, body: Option<String>) -> Response<Full<Bytes>> {
    let mut response = Response::builder().status(status);
    if body.is_some() {
        response = response.header("content-type", "application/json; charset=utf-8");
    }
    response
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap_or_default()
}

fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    details: Option<&str>,
) -> Response<Full<Bytes>> {
    reply(
        status,
        Some(
            json!({"code": code, "message": message, "details": details, "hint": null}).to_string(),
        ),
    )
}

async fn serve(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() == Method::GET && request.uri().path() == "/auth/v1/.well-known/jwks.json" {
        return reply(StatusCode::OK, Some(json!({"keys": []}).to_string()));
    }
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    if header("apikey") != state.key || header("authorization") != format!("Bearer {}", state.key) {
        // What Supabase's gateway answers before PostgREST sees the request.
        return reply(
            StatusCode::UNAUTHORIZED,
            Some(json!({"message": "Invalid API key"}).to_string()),
        );
    }
    let Some(function) = request
        .uri()
        .path()
        .strip_prefix("/rest/v1/rpc/")
        .map(str::to_owned)
    else {
        return error(
            StatusCode::NOT_FOUND,
            "PGRST125",
            "Invalid path specified in request URL",
            None,
        );
    };
    if request.method() != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "PGRST101",
            "Only POST is served by this stand-in",
            None,
        );
    }
    let content_type = header("content-type");
    let Ok(body) = request.into_body().collect().await.map(|b| b.to_bytes()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "PGRST102",
            "Could not read the request body",
            None,
        );
    };
    if !content_type.starts_with("application/json") {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "PGRST107",
            "Content-Type not acceptable",
            None,
        );
    }
    let args = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "PGRST102",
                "Expected a JSON object of named arguments",
                None,
            )
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "PGRST102",
                "Empty or invalid json",
                Some(&e.to_string()),
            )
        }
    };
    let signatures = match signatures(state, &function).await {
        Ok(s) => s,
        Err(e) => return database_error(&e),
    };
    let matching: Vec<&Signature> = signatures
        .iter()
        .filter(|s| {
            let required = &s.args[..s.args.len().saturating_sub(s.defaults)];
            args.keys()
                .all(|k| s.args.iter().any(|(name, _)| name == k))
                && required.iter().all(|(name, _)| args.contains_key(name))
        })
        .collect();
    if matching.len() > 1 {
        return error(
            StatusCode::MULTIPLE_CHOICES,
            "PGRST203",
            &format!(
                "Could not choose the best candidate function between overloads of public.{function}"
            ),
            None,
        );
    }
    let Some(signature) = matching.first().copied() else {
        return error(
            StatusCode::NOT_FOUND,
            "PGRST202",
            &format!(
                "Could not find the function public.{function}({}) in the schema cache",
                args.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            None,
        );
    };
    if signature.returns_set {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "PGRST000",
            "set-returning functions are not served by this stand-in",
            None,
        );
    }
    let given: Vec<&(String, String)> = signature
        .args
        .iter()
        .filter(|(name, _)| args.contains_key(name))
        .collect();
    let columns = given
        .iter()
        .map(|(name, ty)| format!("{} {ty}", quote(name)))
        .collect::<Vec<_>>()
        .join(", ");
    let named = given
        .iter()
        .map(|(name, _)| format!("{0} := _.{0}", quote(name)))
        .collect::<Vec<_>>()
        .join(", ");
    let call = format!("public.{}({named})", quote(&function));
    let sql = if signature.returns_void {
        format!("select {call} from json_to_record($1::text::json) as _({columns})")
    } else if given.is_empty() {
        format!("select coalesce(to_json({call})::text, 'null') where $1::text is not null")
    } else {
        format!(
            "select coalesce(to_json({call})::text, 'null') from json_to_record($1::text::json) as _({columns})"
        )
    };
    let payload = Value::Object(args).to_string();
    match run(state, &sql, &payload).await {
        Ok(_) if signature.returns_void => reply(StatusCode::NO_CONTENT, None),
        Ok(result) => reply(StatusCode::OK, Some(result)),
        Err(e) => database_error(&e),
    }
}

/// Why a request could not be run.
enum Failure {
    Database(tokio_postgres::Error),
    Pool(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Database(e)
    }
}

async fn connection(state: &State) -> Result<deadpool_postgres::Object, Failure> {
    state.pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => Failure::Database(e),
        other => Failure::Pool(other.to_string()),
    })
}

/// One transaction: begin, switch role and claims, call, commit. The four statements are
/// pipelined (sent together, each Parse/Bind/Execute without a prepare round trip), so a request
/// costs one round trip to PostgreSQL, as PostgREST's pipelined transaction does. After a failed
/// call PostgreSQL answers the `commit` with a rollback.
async fn run(state: &State, sql: &str, payload: &str) -> Result<String, Failure> {
    let client = connection(state).await?;
    let params: [(
        &(dyn tokio_postgres::types::ToSql + Sync),
        tokio_postgres::types::Type,
    ); 1] = [(&payload, tokio_postgres::types::Type::TEXT)];
    let (begin, role, call, commit) = tokio::join!(
        client.query_typed("begin", &[]),
        client.query_typed(
            "select set_config('role', 'service_role', true), \
             set_config('request.jwt.claims', '{\"role\":\"service_role\"}', true)",
            &[],
        ),
        client.query_typed(sql, &params),
        client.query_typed("commit", &[]),
    );
    begin?;
    role?;
    let rows = call?;
    commit?;
    let result = rows
        .first()
        .and_then(|row| row.try_get::<_, Option<String>>(0).ok().flatten())
        .unwrap_or_default();
    Ok(result)
}

async fn signatures(state: &State, function: &str) -> Result<Vec<Signature>, Failure> {
    if let Some(found) = state.functions.read().await.get(function) {
        return Ok(found.clone());
    }
    let client = connection(state).await?;
    let rows = client
        .query(
            "select coalesce(p.proargnames[1:p.pronargs], '{}')::text[],
                    array(select format_type(t, null) from unnest(p.proargtypes) t)::text[],
                    p.pronargdefaults::int, p.prorettype = 'void'::regtype, p.proretset
             from pg_proc p join pg_namespace n on n.oid = p.pronamespace
             where n.nspname = 'public' and p.proname = $1",
            &[&function],
        )
        .await?;
    let found: Vec<Signature> = rows
        .iter()
        .map(|row| {
            let names: Vec<String> = row.get(0);
            let types: Vec<String> = row.get(1);
            Signature {
                args: names.into_iter().zip(types).collect(),
                defaults: usize::try_from(row.get::<_, i32>(2)).unwrap_or(0),
                returns_void: row.get(3),
                returns_set: row.get(4),
            }
        })
        .collect();
    // A miss is not cached: a function created later is found on the next request.
    if !found.is_empty() {
        state
            .functions
            .write()
            .await
            .insert(function.to_owned(), found.clone());
    }
    Ok(found)
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// PostgREST's mapping of SQLSTATEs to HTTP statuses (docs: "Errors", PostgreSQL errors).
fn status_for(sqlstate: &str) -> StatusCode {
    let class = sqlstate.get(..2).unwrap_or("");
    match sqlstate {
        "23503" | "23505" => return StatusCode::CONFLICT,
        "25006" => return StatusCode::METHOD_NOT_ALLOWED,
        "42883" | "42P01" => return StatusCode::NOT_FOUND,
        "42501" => return StatusCode::FORBIDDEN,
        "P0001" => return StatusCode::BAD_REQUEST,
        "53400" => return StatusCode::INTERNAL_SERVER_ERROR,
        _ => {}
    }
    match class {
        "08" | "53" => StatusCode::SERVICE_UNAVAILABLE,
        "0L" | "0P" | "28" => StatusCode::FORBIDDEN,
        "09" | "25" | "2D" | "38" | "39" | "3B" | "40" | "54" | "55" | "57" | "58" | "F0"
        | "HV" | "P0" | "XX" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn database_error(failure: &Failure) -> Response<Full<Bytes>> {
    let e = match failure {
        Failure::Database(e) => e,
        Failure::Pool(message) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "PGRST003",
                "Timed out acquiring connection from connection pool.",
                Some(message),
            )
        }
    };
    match e.as_db_error() {
        Some(db) => reply(
            status_for(db.code().code()),
            Some(
                json!({"code": db.code().code(), "message": db.message(),
                       "details": db.detail(), "hint": db.hint()})
                .to_string(),
            ),
        ),
        // Connection trouble: PostgREST answers 503 with PGRST000/PGRST001.
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "PGRST001",
            "Database client error. Retrying the connection.",
            Some(&e.to_string()),
        ),
    }
}
