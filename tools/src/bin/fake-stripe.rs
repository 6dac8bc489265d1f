//! A local stand-in for the Stripe API, for `scripts/dev`: creates and retrieves Checkout
//! Sessions; a session's URL opens a pay page that completes it, delivers a signed
//! `checkout.session.completed` to the webhook and redirects to the success URL.
//!
//! Usage: fake-stripe [--port 12111] [--webhook-url URL] [--secret whsec_...]
//! It accepts the key `sk_test_fake_key_for_tests` only.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut port = 12111u16;
    let mut webhook = "http://127.0.0.1:9000/lambda-url/webhook/".to_owned();
    let mut secret = std::env::var("STRIPE_WEBHOOK_SECRET")
        .ok()
        .and_then(|s| s.split(',').next().map(str::to_owned))
        .unwrap_or_else(|| "whsec_local_dev_secret".into());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--port", Some(v)) => port = v.parse().unwrap_or(port),
            ("--webhook-url", Some(v)) => webhook = v,
            ("--secret", Some(v)) => secret = v,
            _ => {
                eprintln!(
                    "usage: fake-stripe [--port 12111] [--webhook-url URL] [--secret whsec_...]"
                );
                return std::process::ExitCode::from(2);
            }
        }
    }
    let listener = match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake-stripe: cannot listen on 127.0.0.1:{port}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let fake = testkit::stripe_fake::FakeStripe::start_local(listener, &webhook, &secret).await;
    println!(
        "fake-stripe: Stripe API on {} (key {}), webhooks to {webhook}",
        fake.uri(),
        testkit::stripe_fake::KEY
    );
    let _ = tokio::signal::ctrl_c().await;
    std::process::ExitCode::SUCCESS
}
