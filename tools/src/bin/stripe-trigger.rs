//! Makes something happen at the local Stripe stand-in (`scripts/dev`'s tools/fake-stripe), which
//! then delivers the events Stripe would, signed, to the webhook: like `stripe trigger`, offline.
//! Every event is only a notification (the webhook reads the objects back), so a money change is
//! made at the stand-in, never forged. Event types the stand-in cannot make are sent forged: the
//! webhook records them and reads whatever object they name.
//!
//! Usage: stripe-trigger <event-type> [--session cs_...] [--refunded AMOUNT] [--status STATUS]
//!                       [--refund re_...] [--dispute dp_...] [--subscription sub_...]
//!                       [--user UUID] [--url URL] [--secret SECRET] [--print]

use serde_json::{json, Value};
use testkit::fixtures;

const USAGE: &str = "usage: stripe-trigger <event-type> [--session ID] [--refunded AMOUNT] \
[--status STATUS] [--refund ID] [--dispute ID] [--subscription ID] [--user UUID] [--url URL] \
[--secret SECRET] [--print]

made at the stand-in ($STRIPE_API_BASE, default http://127.0.0.1:12111), which delivers the events:
  checkout.session.completed --session cs_...   the customer pays the session (its pay page)
  checkout.session.async_payment_succeeded|failed --session cs_...   a delayed payment settles
  checkout.session.expired --session cs_...     the session is expired
  charge.refunded --session cs_... [--refunded AMOUNT]   a Dashboard refund (default: the rest)
  refund.failed --session cs_... [--refund re_...]       the (latest) refund fails at the bank
  charge.dispute.created --session cs_... [--status warning_needs_response]   a chargeback (or
    an inquiry)
  charge.dispute.funds_withdrawn --session cs_...        the inquiry becomes a chargeback
  charge.dispute.closed --session cs_... --status won|lost
  customer.subscription.created [--user UUID]            a subscription bought through Checkout
  customer.subscription.updated|deleted --subscription sub_... [--status past_due|canceled|...]
  invoice.payment_failed --subscription sub_...          a renewal that fails once, then is paid
any other type: a forged event (a notification only), signed with --secret and posted to --url

defaults: --url http://127.0.0.1:9000/lambda-url/webhook/ --secret $STRIPE_WEBHOOK_SECRET (else
  whsec_local_dev_secret) --user 00000000-0000-4000-8000-000000000001 (the dev demo user)";

#[derive(Default)]
struct Options {
    event_type: String,
    url: String,
    secret: String,
    user: String,
    session: Option<String>,
    refunded: Option<i64>,
    refund: Option<String>,
    dispute: Option<String>,
    subscription: Option<String>,
    status: Option<String>,
    print: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        url: "http://127.0.0.1:9000/lambda-url/webhook/".into(),
        secret: std::env::var("STRIPE_WEBHOOK_SECRET")
            .ok()
            .and_then(|s| s.split(',').next().map(str::trim).map(str::to_owned))
            .unwrap_or_else(|| "whsec_local_dev_secret".into()),
        user: "00000000-0000-4000-8000-000000000001".into(),
        ..Options::default()
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--url" => options.url = value("--url")?,
            "--secret" => options.secret = value("--secret")?,
            "--user" => options.user = value("--user")?,
            "--session" => options.session = Some(value("--session")?),
            "--refund" => options.refund = Some(value("--refund")?),
            "--dispute" => options.dispute = Some(value("--dispute")?),
            "--subscription" => options.subscription = Some(value("--subscription")?),
            "--status" => options.status = Some(value("--status")?),
            "--refunded" => {
                options.refunded = Some(
                    value("--refunded")?
                        .parse()
                        .map_err(|_| "--refunded takes an amount in the smallest unit")?,
                )
            }
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

/// The local stand-in's API.
struct StandIn {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl StandIn {
    fn from_env() -> Self {
        StandIn {
            base: std::env::var("STRIPE_API_BASE")
                .unwrap_or_else(|_| "http://127.0.0.1:12111".into()),
            key: std::env::var("STRIPE_SECRET_KEY")
                .unwrap_or_else(|_| testkit::stripe_fake::KEY.to_owned()),
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, String> {
        let response = request
            .bearer_auth(&self.key)
            .header("Stripe-Version", shared::stripe::API_VERSION)
            .timeout(std::time::Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("the Stripe stand-in at {} is not answering: {e}", self.base))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!("{status}: {}", body["error"]["message"]))
        }
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        self.send(self.http.get(format!("{}{path}", self.base)).query(query))
            .await
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Result<Value, String> {
        self.send(self.http.post(format!("{}{path}", self.base)).form(form))
            .await
    }

    async fn payment_intent(&self, session: &str) -> Result<String, String> {
        let session = self
            .get(&format!("/v1/checkout/sessions/{session}"), &[])
            .await?;
        session["payment_intent"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| "the session has no payment (pay it first)".into())
    }

    /// The newest dispute of a session's payment.
    async fn dispute(&self, session: &str) -> Result<String, String> {
        let pi = self.payment_intent(session).await?;
        let list = self.get("/v1/disputes", &[("payment_intent", &pi)]).await?;
        list["data"][0]["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| "the payment has no dispute".into())
    }
}

/// Makes `options.event_type` happen at the stand-in; `None` when it cannot (forged instead).
async fn make(options: &Options, stripe: &StandIn) -> Option<Result<String, String>> {
    let session = || {
        options
            .session
            .clone()
            .ok_or_else(|| "--session cs_... is required".to_owned())
    };
    let subscription = || {
        options
            .subscription
            .clone()
            .ok_or_else(|| "--subscription sub_... is required".to_owned())
    };
    let status = options.status.as_deref();
    let made = match options.event_type.as_str() {
        "checkout.session.completed" => {
            let id = session();
            async {
                let id = id?;
                let session = stripe
                    .get(&format!("/v1/checkout/sessions/{id}"), &[])
                    .await?;
                let page = format!("{}/pay/{id}", stripe.base);
                let paid = stripe
                    .http
                    .get(&page)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if paid.status().is_client_error() {
                    return Err(format!("the session is {}", session["status"]));
                }
                Ok(format!("paid {id}"))
            }
            .await
        }
        t @ ("checkout.session.async_payment_succeeded"
        | "checkout.session.async_payment_failed") => {
            let succeeded = if t.ends_with("succeeded") {
                "true"
            } else {
                "false"
            };
            async {
                let id = session()?;
                stripe
                    .post(
                        &format!("/_fake/checkout/sessions/{id}/settle"),
                        &[("succeeded", succeeded)],
                    )
                    .await?;
                Ok(format!("settled {id}"))
            }
            .await
        }
        "checkout.session.expired" => {
            async {
                let id = session()?;
                stripe
                    .post(&format!("/v1/checkout/sessions/{id}/expire"), &[])
                    .await?;
                Ok(format!("expired {id}"))
            }
            .await
        }
        "charge.refunded" => {
            async {
                let pi = stripe.payment_intent(&session()?).await?;
                let amount = options.refunded.map(|a| a.to_string());
                let mut form = vec![
                    ("payment_intent", pi.as_str()),
                    ("reason", "requested_by_customer"),
                ];
                if let Some(amount) = &amount {
                    form.push(("amount", amount));
                }
                let refund = stripe.post("/v1/refunds", &form).await?;
                Ok(format!("refund {} of {pi}", refund["id"]))
            }
            .await
        }
        "refund.failed" | "refund.updated" | "charge.refund.updated" => {
            async {
                let refund = match &options.refund {
                    Some(r) => r.clone(),
                    None => {
                        let pi = stripe.payment_intent(&session()?).await?;
                        let list = stripe
                            .get("/v1/refunds", &[("payment_intent", &pi)])
                            .await?;
                        list["data"][0]["id"]
                            .as_str()
                            .map(str::to_owned)
                            .ok_or("the payment has no refund")?
                    }
                };
                stripe
                    .post(&format!("/_fake/refunds/{refund}/fail"), &[])
                    .await?;
                Ok(format!("refund {refund} failed"))
            }
            .await
        }
        "charge.dispute.created" => {
            async {
                let pi = stripe.payment_intent(&session()?).await?;
                let inquiry = if status.is_some_and(|s| s.starts_with("warning")) {
                    "true"
                } else {
                    "false"
                };
                let dispute = stripe
                    .post(
                        &format!("/_fake/payment_intents/{pi}/dispute"),
                        &[("inquiry", inquiry)],
                    )
                    .await?;
                Ok(format!("dispute {} of {pi}", dispute["id"]))
            }
            .await
        }
        "charge.dispute.funds_withdrawn" => {
            async {
                let id = match &options.dispute {
                    Some(d) => d.clone(),
                    None => stripe.dispute(&session()?).await?,
                };
                stripe
                    .post(&format!("/_fake/disputes/{id}/escalate"), &[])
                    .await?;
                Ok(format!("dispute {id} escalated"))
            }
            .await
        }
        "charge.dispute.closed" => {
            async {
                let id = match &options.dispute {
                    Some(d) => d.clone(),
                    None => stripe.dispute(&session()?).await?,
                };
                let won = if status == Some("won") {
                    "true"
                } else {
                    "false"
                };
                stripe
                    .post(&format!("/_fake/disputes/{id}/close"), &[("won", won)])
                    .await?;
                Ok(format!("dispute {id} closed, won={won}"))
            }
            .await
        }
        "customer.subscription.created" => {
            async {
                let sub = stripe
                    .post("/_fake/subscriptions", &[("user", options.user.as_str())])
                    .await?;
                Ok(format!("subscription {}", sub["id"]))
            }
            .await
        }
        t @ ("customer.subscription.updated" | "customer.subscription.deleted") => {
            let to = if t.ends_with("deleted") {
                "canceled"
            } else {
                status.unwrap_or("past_due")
            };
            async {
                let id = subscription()?;
                stripe
                    .post(
                        &format!("/_fake/subscriptions/{id}/status"),
                        &[("status", to)],
                    )
                    .await?;
                Ok(format!("subscription {id} is {to}"))
            }
            .await
        }
        "invoice.payment_failed" | "invoice.paid" | "invoice.payment_succeeded" => {
            async {
                let id = subscription()?;
                let invoice = stripe
                    .post(&format!("/_fake/subscriptions/{id}/renew"), &[])
                    .await?;
                Ok(format!(
                    "renewal invoice {} failed once, then paid",
                    invoice["id"]
                ))
            }
            .await
        }
        _ => return None,
    };
    Some(made)
}

/// A forged event of `type_` (a notification the webhook records; it reads what it names).
fn forged(options: &Options) -> Value {
    json!({"id": fixtures::event_id(), "object": "event", "type": options.event_type,
           "api_version": shared::stripe::API_VERSION, "created": fixtures::now(), "livemode": false,
           "data": {"object": {"id": "obj_local", "object": "unknown"}}})
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
    if !options.print {
        if let Some(made) = make(&options, &StandIn::from_env()).await {
            return match made {
                Ok(what) => {
                    println!("{what}: the stand-in delivers the events to the webhook");
                    std::process::ExitCode::SUCCESS
                }
                Err(why) => {
                    eprintln!("{}: {why}", options.event_type);
                    std::process::ExitCode::FAILURE
                }
            };
        }
    }
    let event = forged(&options);
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
            println!("{} (forged) -> {status} {text}", options.event_type);
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
