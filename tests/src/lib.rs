//! The test harness: fresh databases with the migrations applied, Stripe fixtures signed like
//! Stripe signs them, real function-URL events, a TCP proxy that can cut the database off, and TLS
//! in front of the database (a test CA, a TLS-terminating and a downgrading proxy).

pub mod apps;
pub mod db;
pub mod fixtures;
pub mod https_front;
pub mod llm_fake;
pub mod money;
pub mod money_model;
pub mod money_reference;
pub mod pg_tls;
pub mod postgrest;
pub mod proxy;
pub mod runtime_api;
pub mod storm;
pub mod stripe_fake;
pub mod tokens;

/// The workspace root (for `supabase/` and `tests/fixtures/`).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs `work` to completion on a new thread with its own current-thread runtime, and returns
/// the thread's handle: for code that runs outside any runtime (`Drop`) or must not block the
/// caller's (a wiremock responder).
pub fn on_own_runtime<F>(work: F) -> std::thread::JoinHandle<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            runtime.block_on(work);
        }
    })
}
