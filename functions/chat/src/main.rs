//! Lambda entry point of the chat function (response streaming): wiring only.

use std::sync::Arc;

use shared::config::EnvReader;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    shared::telemetry::init_tracing();
    shared::sentry::init_from_env(chat::ROUTE);
    let config =
        chat::Config::read(EnvReader::from_env()).inspect_err(|e| tracing::error!("{e}"))?;
    let state = Arc::new(chat::State::new(config).inspect_err(|e| tracing::error!("{e}"))?);
    state.store.connect_early();
    if let Some(llm) = &state.llm {
        llm.warm_up();
    }
    if let Some((fallback, ..)) = &state.fallback {
        fallback.warm_up();
    }
    state.verifier.prefetch().await;
    shared::lambda::run_streaming(|request| chat::handle(state.clone(), request)).await
}
