//! Lambda entry point of the checkout function: wiring only.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    shared::telemetry::init_tracing();
    shared::lambda::run(checkout::handle).await
}
