//! The floor under every function: the same Lambda runtime client and function-URL adapter
//! (`shared::lambda::run`) with a handler that answers `200 {}` at once. `lambda-bench` runs it
//! beside the webhook to split a warm invocation's cost into the runtime's and the function's.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    shared::lambda::run(|_request| async {
        http::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(lambda_http::Body::from("{}"))
            .unwrap_or_default()
    })
    .await
}
