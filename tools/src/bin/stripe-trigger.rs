//! Signs a fixture Stripe event with the local webhook secret and posts it to the running webhook,
//! like `stripe trigger` but offline.
//!
//! Usage: stripe-trigger <event-type> [--url URL] [--secret SECRET] [--user UUID] [--order UUID]
//!                       [--session cs_...] [--payment-intent pi_...] [--refunded AMOUNT]
//!                       [--dispute dp_...] [--status STATUS] [--created UNIX] [--livemode] [--print]

use serde_json::{json, Value};
use testkit::fixtures;

const USAGE: &str =
    "usage: stripe-trigger <event-type> [--url URL] [--secret SECRET] [--user UUID] \
[--order UUID] [--session ID] [--payment-intent ID] [--refunded AMOUNT] [--dispute ID] \
[--refund ID] [--status STATUS] [--created UNIX] [--livemode] [--print]

event types: checkout.session.completed, checkout.session.async_payment_succeeded,
  checkout.session.async_payment_failed, checkout.session.expired,
  customer.subscription.created, customer.subscription.updated, customer.subscription.deleted,
  invoice.paid, invoice.payment_succeeded, invoice.payment_failed,
  charge.refunded (--payment-intent of the paid session; --refunded 1900 is a full refund of the
  1900 charged, less is partial), charge.refund.updated / refund.updated / refund.failed (the
  refund --refund of --refunded, now --status, default failed: the money is back),
  charge.dispute.created, charge.dispute.funds_withdrawn, charge.dispute.closed (--status won or
  lost; --dispute names the dispute), or any other type (sent as is)

defaults: --url http://127.0.0.1:9000/lambda-url/webhook/ --secret $STRIPE_WEBHOOK_SECRET
  (else whsec_local_dev_secret) --user 00000000-0000-4000-8000-000000000001 (the dev demo user)
  --payment-intent the session's, asked of the Stripe API at $STRIPE_API_BASE (scripts/dev's
    stand-in, http://127.0.0.1:12111) with $STRIPE_SECRET_KEY; else pi_<session id>, the one
    this tool's checkout.session.completed carries
  --refunded 1900 --dispute dp_local --status needs_response (created) / lost (closed)";

struct Options {
    event_type: String,
    url: String,
    secret: String,
    user: String,
    order: String,
    session: String,
    payment_intent: Option<String>,
    refunded: i64,
    dispute: String,
    refund: String,
    status: Option<String>,
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
        payment_intent: None,
        refunded: 1900,
        dispute: "dp_local".into(),
        refund: "re_local".into(),
        status: None,
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
            "--payment-intent" => options.payment_intent = Some(value("--payment-intent")?),
            "--refunded" => {
                options.refunded = value("--refunded")?
                    .parse()
                    .map_err(|_| "--refunded takes an amount in the smallest unit")?
            }
            "--dispute" => options.dispute = value("--dispute")?,
            "--refund" => options.refund = value("--refund")?,
            "--status" => options.status = Some(value("--status")?),
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

/// The payment intent of `session` as the Stripe API (the local stand-in) holds it.
async fn payment_intent_of(session: &str) -> Option<String> {
    let base = std::env::var("STRIPE_API_BASE").unwrap_or_else(|_| "http://127.0.0.1:12111".into());
    let key =
        std::env::var("STRIPE_SECRET_KEY").unwrap_or_else(|_| testkit::stripe_fake::KEY.to_owned());
    let response = reqwest::Client::new()
        .get(format!("{base}/v1/checkout/sessions/{session}"))
        .bearer_auth(key)
        .header("Stripe-Version", shared::stripe::API_VERSION)
        .timeout(std::time::Duration::from_secs(3))
        .send()
        .await
        .ok()?;
    let session: Value = response.json().await.ok()?;
    session["payment_intent"].as_str().map(str::to_owned)
}

fn build_event(options: &Options, known_payment_intent: Option<String>) -> Value {
    let t = options.event_type.as_str();
    let payment_intent = options
        .payment_intent
        .clone()
        .or(known_payment_intent)
        .unwrap_or_else(|| format!("pi_{}", options.session.trim_start_matches("cs_")));
    let mut event = if t == "charge.refunded" {
        fixtures::charge_refunded_event(&payment_intent, 1900, options.refunded)
    } else if matches!(
        t,
        "charge.refund.updated" | "refund.updated" | "refund.failed"
    ) {
        let status = options.status.clone().unwrap_or_else(|| "failed".into());
        fixtures::refund_event(
            t,
            &options.refund,
            &payment_intent,
            options.refunded,
            &status,
        )
    } else if t.starts_with("charge.dispute.") {
        let status = options.status.clone().unwrap_or_else(|| {
            if t == "charge.dispute.closed" {
                "lost"
            } else {
                "needs_response"
            }
            .to_owned()
        });
        fixtures::dispute_event(t, &options.dispute, &payment_intent, &status)
    } else if t.starts_with("checkout.session.") {
        let paid = matches!(
            t,
            "checkout.session.completed" | "checkout.session.async_payment_succeeded"
        );
        let mut e = fixtures::checkout_event(
            t,
            &options.session,
            &options.order,
            &options.user,
            if paid { "paid" } else { "unpaid" },
        );
        fixtures::set(&mut e, "/data/object/payment_intent", json!(payment_intent));
        e
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
    let known = if options.payment_intent.is_none() && options.event_type.starts_with("charge.") {
        payment_intent_of(&options.session).await
    } else {
        None
    };
    let event = build_event(&options, known);
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
