//! Lambda entry point of the checkout function: wiring only.

use shared::config::EnvReader;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    shared::telemetry::init_tracing();
    shared::sentry::init_from_env(checkout::ROUTE);
    let config =
        checkout::Config::read(EnvReader::from_env()).inspect_err(|e| tracing::error!("{e}"))?;
    let state = checkout::State::new(config).inspect_err(|e| tracing::error!("{e}"))?;
    state.store.connect_early();
    state.stripe.warm_up();
    state.verifier.prefetch().await;
    shared::lambda::run(|request| checkout::handle(&state, request)).await
}
