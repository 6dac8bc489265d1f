//! Lambda entry point of the reconciler (an EventBridge schedule invokes it): wiring only.

use lambda_runtime::{service_fn, LambdaEvent};
use shared::config::EnvReader;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    shared::telemetry::init_tracing();
    shared::sentry::init_from_env(reconcile::ROUTE);
    let config =
        reconcile::Config::read(EnvReader::from_env()).inspect_err(|e| tracing::error!("{e}"))?;
    let state = reconcile::State::new(config).inspect_err(|e| tracing::error!("{e}"))?;
    state.store.connect_early();
    state.stripe.warm_up();
    let state = &state;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            let deadline = shared::clock::Clock::system().deadline_instant(event.context.deadline);
            // A failed run is counted (`Errors`, ReconcilerFailingAlarm) and logged, and the
            // invocation still succeeds: Lambda does not retry it, the next scheduled run starts
            // before it. Crashes and timeouts are Lambda's invocation errors.
            let answer = match reconcile::handle(state, None, deadline).await {
                Ok(report) => serde_json::json!({"ok": true, "report": report}),
                Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
            };
            Ok::<_, lambda_runtime::Error>(answer)
        },
    ))
    .await
}
