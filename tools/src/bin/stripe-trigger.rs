//! Signs a fixture Stripe event with the local webhook secret and posts it to the running webhook,
//! like `stripe trigger` but offline.
//!
//! Usage: stripe-trigger <event-type> [--url URL] [--secret SECRET] [--user UUID] [--order UUID]
//!                       [--session cs_...] [--created UNIX] [--livemode] [--print]

use serde_json::{json, Value};
use testkit::fixtures;

const USAGE: &str =
    "usage: stripe-trigger <event-type> [--url URL] [--secret SECRET] [--user UUID] \
[--order UUID] [--session ID] [--created UNIX] [--livemode] [--print]

event types: checkout.session.completed, checkout.session.async_payment_succeeded,
  checkout.session.async_payment_failed, checkout.session.expired,
  customer.subscription.created, customer.subscription.updated, customer.subscription.deleted,
  invoice.paid, invoice.payment_succeeded, invoice.payment_failed, or any other type (sent as is)

defaults: --url http://127.0.0.1:9000/lambda-url/webhook/ --secret $STRIPE_WEBHOOK_SECRET
  (else whsec_local_dev_secret) --user 00000000-0000-4000-8000-000000000001 (the dev demo user)";

struct Options {
    event_type: String,
    url: String,
    secret: String,
    user: String,
    order: String,
    session: String,
    created: Option<i64>,
    livemode: bool,
    print: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        event_type: String::new(),
        url: "http://127.0.0.1:9000/lambda-url/webhook/".into(),
        secret: std::env::var("STRIPE_WEBHOOK_SECRET")
            .ok()
            .and_then(|s| s.split(',').next().map(str::trim).map(str::to_owned))
            .unwrap_or_else(|| "whsec_local_dev_secret".into()),
        user: "00000000-0000-4000-8000-000000000001".into(),
        order: String::new(),
        session: format!("cs_test_{}", uuid::Uuid::new_v4().simple()),
        created: None,
        livemode: false,
        print: false,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--url" => options.url = value("--url")?,
            "--secret" => options.secret = value("--secret")?,
            "--user" => options.user = value("--user")?,
            "--order" => options.order = value("--order")?,
            "--session" => options.session = value("--session")?,
            "--created" => {
                options.created = Some(
                    value("--created")?
                        .parse()
                        .map_err(|_| "--created takes unix seconds")?,
                )
            }
            "--livemode" => options.livemode = true,
            "--print" => options.print = true,
            "-h" | "--help" => return Err(String::new()),
            other if other.starts_with("--") => return Err(format!("unknown option {other}")),
            other if options.event_type.is_empty() => options.event_type = other.to_owned(),
            other => return Err(format!("unexpected argument {other}")),
        }
    }
    if options.event_type.is_empty() {
        return Err("an event type is required".into());
    }
    Ok(options)
}

fn build_event(options: &Options) -> Value {
    let t = options.event_type.as_str();
    let mut event = if t.starts_with("checkout.session.") {
        let paid = matches!(
            t,
            "checkout.session.completed" | "checkout.session.async_payment_succeeded"
        );
        fixtures::checkout_event(
            t,
            &options.session,
            &options.order,
            &options.user,
            if paid { "paid" } else { "unpaid" },
        )
    } else if t.starts_with("customer.subscription.") {
        let mut e = fixtures::load("stripe/customer.subscription.updated.dahlia.json");
        fixtures::set(&mut e, "/data/object/metadata/user_id", json!(options.user));
        if t == "customer.subscription.deleted" {
            fixtures::set(&mut e, "/data/object/status", json!("canceled"));
            fixtures::set(&mut e, "/data/object/ended_at", json!(fixtures::now()));
        }
        e
    } else if t == "invoice.payment_failed" {
        fixtures::load("stripe/invoice.payment_failed.acacia.json")
    } else if t.starts_with("invoice.") {
        fixtures::load("stripe/invoice.paid.dahlia.json")
    } else {
        json!({"object": "event", "api_version": shared::stripe::API_VERSION, "data": {"object": {"id": "obj_local", "object": "unknown"}}})
    };
    fixtures::set(&mut event, "/id", json!(fixtures::event_id()));
    fixtures::set(&mut event, "/type", json!(t));
    fixtures::set(
        &mut event,
        "/created",
        json!(options.created.unwrap_or_else(fixtures::now)),
    );
    fixtures::set(&mut event, "/livemode", json!(options.livemode));
    event
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let options = match parse_args() {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("{message}\n");
            }
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    let event = build_event(&options);
    let body = fixtures::body(&event);
    let signature = fixtures::sign(&body, &options.secret);
    if options.print {
        println!(
            "Stripe-Signature: {signature}\n{}",
            String::from_utf8_lossy(&body)
        );
        return std::process::ExitCode::SUCCESS;
    }
    let response = reqwest::Client::new()
        .post(&options.url)
        .header("content-type", "application/json; charset=utf-8")
        .header("stripe-signature", signature)
        .body(body)
        .send()
        .await;
    match response {
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            println!(
                "{} {} -> {status} {text}",
                event["type"].as_str().unwrap_or(""),
                event["id"].as_str().unwrap_or("")
            );
            if status.is_success() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("could not reach {}: {error}", options.url);
            std::process::ExitCode::FAILURE
        }
    }
}
