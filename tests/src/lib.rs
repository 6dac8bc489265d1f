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
