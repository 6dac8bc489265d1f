//! Lambda entry point of the Stripe webhook: wiring only.

use shared::config::EnvReader;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    shared::telemetry::init_tracing();
    shared::sentry::init_from_env(webhook::ROUTE);
    let config =
        webhook::Config::read(EnvReader::from_env()).inspect_err(|e| tracing::error!("{e}"))?;
    let state = webhook::State::new(config).inspect_err(|e| tracing::error!("{e}"))?;
    state.store.connect_early();
    state.stripe.warm_up();
    shared::lambda::run(|request| webhook::handle(&state, request)).await
}
