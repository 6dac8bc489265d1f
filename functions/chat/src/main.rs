//! Lambda entry point of the chat function: wiring only.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    shared::telemetry::init_tracing();
    shared::lambda::run(chat::handle).await
}
