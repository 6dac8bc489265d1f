//! The money invariants of docs/payments.md, one scenario each, against the real SQL functions,
//! both handlers and the fake Stripe. The first eight reproduce the defects of issue 12 (each
//! failed on the code before the fix); the rest cover the new paths end to end.

use std::time::Duration;

use serde_json::{json, Value};
use testkit::apps;
use testkit::fixtures;
use testkit::money::{Setup, World};
use testkit::stripe_fake::AMOUNT;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, ResponseTemplate};

async fn world() -> World {
    World::new(Setup::default()).await
}

/// Clicks, pays the session at Stripe and delivers everything: the user owns the report.
async fn buy(w: &World, user: &str) -> (String, String) {
    let (status, body) = w.click(user).await;
    assert_eq!(status, 200, "{body}");
    let session = body["session_id"].as_str().unwrap().to_owned();
    let pi = w.stripe.pay(&session).unwrap();
    assert!(w.deliver_all().await.is_empty());
    assert!(w.owns(user).await);
    (session, pi)
}

/// The idempotency keys of every refund request the fake received, in order.
async fn refund_keys(w: &World) -> Vec<String> {
    w.stripe
        .requests_to("POST", "/v1/refunds")
        .await
        .iter()
        .filter_map(|r| {
            r.headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .collect()
}

/// Makes every paid transaction of `orders` hold for `ms` after it marks an order paid, before
/// it commits: the window a click can fall into, widened on purpose.
async fn widen_paid_window(w: &World, ms: u32) {
    w.sql
        .batch_execute(&format!(
            "create function public.test_hold_paid() returns trigger language plpgsql as $$
             begin perform pg_sleep({secs}); return new; end $$;
             create trigger test_hold_paid after update on public.orders for each row
             when (new.status = 'paid' and old.status is distinct from 'paid')
             execute function public.test_hold_paid();",
            secs = f64::from(ms) / 1000.0
        ))
        .await
        .unwrap();
}

// ---- Issue 12, defect 1: two payable sessions from one user --------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clicks_at_the_shortest_ttl_give_one_payable_session() {
    let w = World::new(Setup {
        instances: 4,
        session_ttl_s: 1860,
        ..Setup::default()
    })
    .await;
    let user = w.user().await;
    w.stripe.delay(Some(Duration::from_millis(700)));

    let answers = w.clicks(&user, 8).await;

    let ids: std::collections::BTreeSet<_> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "{body}");
            body["session_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "every click got the same session");
    assert_eq!(w.open_sessions_of(&user).len(), 1);
    assert_eq!(w.stripe.create_requests().await.len(), 1);
}

#[tokio::test]
async fn an_order_whose_lease_is_live_is_never_retired() {
    let w = World::new(Setup {
        instances: 1,
        ..Setup::default()
    })
    .await;
    let user = w.user().await;
    // Another instance took the lease 89 minutes into the order's life and is creating its
    // session right now (its Stripe call has not returned).
    w.sql
        .execute(
            "insert into orders (user_id, created_at, checkout_expires_at, session_claimed_until)
             values ($1::text::uuid, now() - interval '89 minutes', now() + interval '31 minutes',
                     now() + interval '30 seconds')",
            &[&user],
        )
        .await
        .unwrap();
    let mut config = w.checkouts[0].config.clone();
    config.max_wait = Duration::from_millis(300);
    let (quick, _) = apps::checkout_state(config, w.checkouts[0].store.clone());
    let request = fixtures::FunctionUrlRequest::post("/", b"").bearer(&World::token(&user));

    let response = checkout::handle(&quick, request.into_request().unwrap()).await;

    assert_eq!(
        response.status(),
        503,
        "the click waits for the lease holder"
    );
    assert_eq!(
        fixtures::json_body(&response)["error"]["code"],
        "checkout_in_progress"
    );
    assert_eq!(
        w.scalar::<String>("select string_agg(status, ',') from orders")
            .await,
        "pending",
        "the order in creation stays"
    );
    assert!(w.stripe.create_requests().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_made_while_the_user_paid_elsewhere_is_expired_not_handed_out() {
    let w = world().await;
    let user = w.user().await;
    // The user pays a Payment Link while a click is creating our session (slow at Stripe).
    let (_, _) = pay_link(&w, &user);
    let link_events = w.stripe.take_events();
    w.stripe.delay_creates(Some(Duration::from_millis(800)));
    let click = w.click(&user);
    let payment = async {
        tokio::time::sleep(Duration::from_millis(250)).await;
        w.deliver(&link_events[0]).await
    };

    let ((status, body), (paid, _)) = tokio::join!(click, payment);

    assert_eq!(paid, 200);
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("already_paid")),
        "{body}"
    );
    let ours: Vec<Value> = w
        .stripe
        .sessions()
        .into_iter()
        .filter(|s| s["metadata"]["order_id"].is_string())
        .collect();
    assert_eq!(ours.len(), 1, "the click's session was created");
    assert_eq!(ours[0]["status"], "expired", "and expired at once");
    assert!(w.open_sessions_of(&user).is_empty());
    assert!(w.checkout_metric("SessionsExpired") >= 1.0);
}

// ---- Issue 12, defect 2: a click racing the paid webhook -------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_while_the_payment_is_applied_is_already_paid() {
    let w = world().await;
    let user = w.user().await;
    let (_, first) = w.click(&user).await;
    let session = first["session_id"].as_str().unwrap().to_owned();
    w.stripe.pay(&session).unwrap();
    let events = w.stripe.take_events();
    widen_paid_window(&w, 600).await;

    let deliver = w.deliver(&events[0]);
    let click = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        w.click(&user).await
    };
    let ((delivered, _), (status, body)) = tokio::join!(deliver, click);

    assert_eq!(delivered, 200);
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("already_paid")),
        "{body}"
    );
    assert_eq!(w.stripe.sessions().len(), 1, "no second session");
    assert_eq!(w.scalar::<i64>("select count(*) from orders").await, 1);
}

// ---- Issue 12, defect 3: refunds and chargebacks ---------------------------------------------

#[tokio::test]
async fn a_full_refund_revokes_the_report_and_the_user_may_buy_again() {
    let w = world().await;
    let user = w.user().await;
    let (session, pi) = buy(&w, &user).await;

    w.stripe.refund(&pi, None).unwrap();
    assert!(w.deliver_all().await.is_empty());

    assert!(!w.owns(&user).await);
    let order = w.order_of(&session).await;
    assert_eq!(order["status"], "refunded");
    assert_eq!(order["amount_refunded"], AMOUNT);
    let (_, polled) = w.poll(&user, Some(&session)).await;
    assert_eq!(polled["status"], "refunded");
    assert_eq!(w.webhook_metric("Refunds"), 1.0);
    let (status, again) = w.click(&user).await;
    assert_eq!(status, 200, "{again}");
    assert_ne!(again["session_id"], json!(session));
    assert_eq!(
        w.scalar::<i64>("select count(*) from payment_audit where kind = 'order_refunded'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_partial_refund_keeps_the_report() {
    let w = world().await;
    let user = w.user().await;
    let (session, pi) = buy(&w, &user).await;

    w.stripe.refund(&pi, Some(500)).unwrap();
    w.deliver_all().await;

    assert!(w.owns(&user).await);
    let order = w.order_of(&session).await;
    assert_eq!(
        (order["status"].clone(), order["amount_refunded"].clone()),
        (json!("paid"), json!(500))
    );
    let (status, body) = w.click(&user).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("already_paid"))
    );
}

#[tokio::test]
async fn a_dispute_suspends_the_report_until_won_and_a_lost_one_revokes_it() {
    let w = world().await;
    let user = w.user().await;
    let (session, pi) = buy(&w, &user).await;

    let dispute = w.stripe.dispute(&pi).unwrap();
    w.deliver_all().await;
    assert!(!w.owns(&user).await, "suspended while disputed");
    assert_eq!(w.order_of(&session).await["status"], "disputed");
    assert_eq!(w.poll(&user, Some(&session)).await.1["status"], "disputed");
    let (status, body) = w.click(&user).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("payment_disputed"))
    );
    assert_eq!(w.webhook_metric("Disputes"), 1.0);

    w.stripe.close_dispute(&dispute, true).unwrap();
    w.deliver_all().await;
    assert!(w.owns(&user).await, "restored when won");
    assert_eq!(w.order_of(&session).await["status"], "paid");

    let second = w.stripe.dispute(&pi).unwrap();
    w.stripe.close_dispute(&second, false).unwrap();
    w.deliver_all().await;
    assert!(!w.owns(&user).await, "revoked when lost");
    assert_eq!(w.order_of(&session).await["status"], "refunded");
}

#[tokio::test]
async fn a_refund_that_arrives_before_the_payment_is_applied_when_it_is() {
    let w = world().await;
    let user = w.user().await;
    let (_, first) = w.click(&user).await;
    let session = first["session_id"].as_str().unwrap().to_owned();
    let pi = w.stripe.pay(&session).unwrap();
    w.stripe.refund(&pi, None).unwrap();
    let events = w.stripe.take_events();
    assert_eq!(events[1]["type"], "charge.refunded");

    assert_eq!(w.deliver(&events[1]).await.0, 200);
    assert_eq!(w.deliver(&events[0]).await.0, 200);

    assert!(!w.owns(&user).await);
    assert_eq!(w.order_of(&session).await["status"], "refunded");
}

// ---- Issue 12, defect 4: paid sessions trusted blindly ---------------------------------------

#[tokio::test]
async fn a_paid_session_without_an_order_is_granted_only_for_our_price() {
    let w = world().await;
    let cheap = w.user().await;
    let honest = w.user().await;
    let other = w.stripe.foreign_session(&cheap, "price_one_yen", 1);
    w.stripe.pay(&other).unwrap();
    let (ours, _) = pay_link(&w, &honest);

    assert!(w.deliver_all().await.is_empty());

    assert!(!w.owns(&cheap).await, "a 1 JPY session grants nothing");
    assert!(w.owns(&honest).await, "a Payment Link for the report does");
    assert_eq!(w.webhook_metric("UnverifiedSessions"), 1.0);
    assert_eq!(
        w.scalar::<String>(&format!(
            "select outcome from stripe_events
             where payload -> 'data' -> 'object' ->> 'id' = '{other}'"
        ))
        .await,
        "unmatched"
    );
    assert_eq!(
        w.scalar::<i64>(&format!(
            "select count(*) from payment_audit where kind = 'session_unverified' and reference = '{other}'"
        ))
        .await,
        1
    );
    assert_eq!(
        w.stripe
            .requests_to("GET", &format!("/v1/checkout/sessions/{ours}/line_items"))
            .await
            .len(),
        1,
        "line items are read once: the verdict is kept with the session"
    );
}

#[tokio::test]
async fn stripe_down_while_verifying_is_a_503_and_redelivery_grants() {
    let w = world().await;
    let user = w.user().await;
    let _ = pay_link(&w, &user);
    let events = w.stripe.take_events();
    w.stripe.delay(Some(Duration::from_secs(5)));

    let (status, body) = w.deliver(&events[0]).await;

    assert_eq!(
        (status, body["error"]["code"].clone()),
        (503, json!("payment_provider_unavailable"))
    );
    assert_eq!(
        w.scalar::<i64>("select count(*) from stripe_events").await,
        0,
        "nothing recorded"
    );
    w.stripe.delay(None);
    assert_eq!(w.deliver(&events[0]).await.0, 200);
    assert!(w.owns(&user).await);
}

// ---- Issue 12, defect 5: same-second subscription events -------------------------------------

#[tokio::test]
async fn events_of_one_second_in_any_order_leave_the_subscription_as_stripe_holds_it() {
    // Issue 12 (defect 5) ordered events by (created, rank); events are notifications now: in any
    // order, the subscription read back is Stripe's.
    let w = world().await;
    let user = w.user().await;
    w.stripe.set_event_time(Some(fixtures::now()));
    let sub = w.stripe.subscribe(&user, "price_monthly_plan");
    w.stripe.set_subscription_status(&sub, "past_due").unwrap();
    w.stripe.set_subscription_status(&sub, "canceled").unwrap();
    let mut events = w.stripe.take_events();
    events.reverse();

    for event in &events {
        assert_eq!(w.deliver(event).await.0, 200);
    }

    assert_eq!(
        w.scalar::<String>("select status from subscriptions").await,
        "canceled"
    );
    assert!(
        !w.scalar::<bool>("select active from entitlements where product = 'subscription'")
            .await
    );
}

// ---- Issue 12, defect 6: owners learned late --------------------------------------------------

#[tokio::test]
async fn subscriptions_and_invoices_that_came_first_get_their_owner() {
    let w = world().await;
    let user = w.user().await;
    w.stripe.subscribe(&user, "price_monthly_plan");
    let events = w.stripe.take_events();
    let (session, rest): (Vec<Value>, Vec<Value>) = events
        .into_iter()
        .partition(|e| e["type"] == "checkout.session.completed");
    for event in &rest {
        assert_eq!(w.deliver(event).await.0, 200);
    }
    assert_eq!(
        w.scalar::<i64>("select count(*) from subscriptions where user_id is null")
            .await,
        1
    );

    // The subscription's checkout session names the user and the customer.
    assert_eq!(w.deliver(&session[0]).await.0, 200);

    assert_eq!(
        w.scalar::<String>("select user_id::text from subscriptions")
            .await,
        user
    );
    assert_eq!(
        w.scalar::<String>("select string_agg(distinct user_id::text, ',') from invoices")
            .await,
        user
    );
    assert!(
        w.scalar::<bool>("select active from entitlements where product = 'subscription'")
            .await
    );
}

// ---- Issue 12, defect 7: two events of one order-less session at once ------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_events_of_one_orderless_session_at_once_are_no_500() {
    let w = world().await;
    let user = w.user().await;
    let ours = w.stripe.foreign_session(&user, apps::PRICE, AMOUNT);
    w.stripe.pay_async(&ours).unwrap();
    w.stripe.settle_async(&ours, true).unwrap();
    let mut events = w.stripe.take_events();
    // Both pay (completed with the payment already settled, and async_payment_succeeded), for a
    // guest: Payment Links create no customer for one-time payments by default (a shared
    // customer row would serialize the two by accident).
    fixtures::set(&mut events[0], "/data/object/payment_status", json!("paid"));
    for event in &mut events {
        fixtures::set(event, "/data/object/customer", json!(null));
    }
    // Both see no order, then both insert one: the window, widened.
    w.sql
        .batch_execute(
            "create function public.test_hold_insert() returns trigger language plpgsql as $$
             begin perform pg_sleep(0.3); return new; end $$;
             create trigger test_hold_insert before insert on public.orders for each row
             execute function public.test_hold_insert();",
        )
        .await
        .unwrap();

    let (a, b) = tokio::join!(w.deliver(&events[0]), w.deliver(&events[1]));

    assert_eq!((a.0, b.0), (200, 200), "{a:?} {b:?}");
    assert_eq!(w.scalar::<i64>("select count(*) from orders").await, 1);
    assert_eq!(
        w.scalar::<i64>("select count(*) from payment_audit where kind = 'order_paid'")
            .await,
        1
    );
    assert!(w.owns(&user).await);
}

// ---- Issue 12, defect 8: idempotency that cannot lock anyone out -----------------------------

#[tokio::test]
async fn a_changed_email_does_not_change_the_idempotent_create() {
    let mut w = world().await;
    // Stripe creates the session but answers after the client gave up: the key now holds it.
    w.checkouts[0].config.stripe.timeout = Duration::from_millis(200);
    w.checkouts[0].config.stripe.retries = 0;
    w.checkouts[0].stripe = apps::stripe_client(&w.checkouts[0].config.stripe);
    let user = w.user().await;
    w.stripe.delay(Some(Duration::from_millis(600)));
    let (status, _) = w.click(&user).await;
    assert_eq!(
        status, 503,
        "Stripe too slow: the lease is released, the order stays"
    );
    w.stripe.delay(None);
    // Until the first request under the key finishes, Stripe answers 409 for the key.
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The user changes their e-mail; the next token carries the new one.
    let mut claims = testkit::tokens::user_claims(&user, None);
    claims["email"] = json!("new-address@example.com");
    let token = testkit::tokens::hs256(&claims, apps::JWT_SECRET.as_bytes());
    let response = checkout::handle(
        &w.checkouts[0],
        fixtures::FunctionUrlRequest::post("/", b"")
            .bearer(&token)
            .into_request()
            .unwrap(),
    )
    .await;

    assert_eq!(response.status(), 200, "{}", fixtures::json_body(&response));
    assert_eq!(w.stripe.sessions().len(), 1, "the key's session, replayed");
    let creates = w.stripe.create_requests().await;
    let emails: std::collections::BTreeSet<_> = creates
        .iter()
        .map(|(_, form)| {
            form.iter()
                .find(|(k, _)| k == "customer_email")
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert_eq!(
        emails.len(),
        1,
        "every try sent the order's e-mail: {emails:?}"
    );
}

#[tokio::test]
async fn an_error_replayed_for_the_orders_key_retires_the_order() {
    let w = world().await;
    let user = w.user().await;
    w.stripe.script_stored_error(
        400,
        "invalid_request_error",
        Some("account_invalid"),
        "The account is not set up for this.",
    );
    let (status, body) = w.click(&user).await;
    assert_eq!(status, 502, "{body}");

    let (status, body) = w.click(&user).await;

    assert_eq!(status, 200, "a fresh order, a fresh key: {body}");
    assert_eq!(
        w.scalar::<String>("select string_agg(status || '/' || coalesce(closed_reason, '-'), ',' order by created_at) from orders").await,
        "expired/retired,pending/-"
    );
    assert_eq!(w.checkout_metric("OrdersRetired"), 1.0);
}

#[tokio::test]
async fn an_order_too_old_for_its_session_is_retired_and_replaced() {
    let w = World::new(Setup {
        session_ttl_s: 1860,
        ..Setup::default()
    })
    .await;
    let user = w.user().await;
    w.stripe
        .script((0..3).map(|_| testkit::stripe_fake::FakeStripe::server_error()));
    assert_eq!(w.click(&user).await.0, 503);
    // Time passes: the order's expires_at is now less than 30 minutes ahead.
    w.sql
        .execute(
            "update orders set created_at = created_at - interval '10 minutes',
                               checkout_expires_at = checkout_expires_at - interval '10 minutes'",
            &[],
        )
        .await
        .unwrap();

    let (status, body) = w.click(&user).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(
        w.scalar::<i64>("select count(*) from orders where closed_reason = 'retired'")
            .await,
        1
    );
    assert_eq!(w.open_sessions_of(&user).len(), 1);
}

// ---- I3: duplicates refunded automatically ---------------------------------------------------

#[tokio::test]
async fn a_second_payment_is_refunded_once_and_the_report_stays() {
    let w = world().await;
    let user = w.user().await;
    let (_, first) = w.click(&user).await;
    let session = first["session_id"].as_str().unwrap().to_owned();
    // The user also bought through a Payment Link in another tab, and then paid our session.
    let (_, link_pi) = pay_link(&w, &user);
    let pi = w.stripe.pay(&session).unwrap();
    let events = w.stripe.take_events();

    for event in &events {
        assert_eq!(w.deliver(event).await.0, 200);
    }
    // Redelivered: nothing more happens.
    assert_eq!(w.deliver(&events[1]).await.1["outcome"], "duplicate");
    w.deliver_all().await;

    assert!(w.owns(&user).await, "the first payment stands");
    let refunds = w.stripe.refunds();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0]["payment_intent"], json!(pi));
    assert_eq!(refunds[0]["reason"], "duplicate");
    assert_eq!(w.stripe.charge(&link_pi).unwrap()["refunded"], false);
    assert_eq!(w.order_of(&session).await["status"], "refunded");
    assert_eq!(w.webhook_metric("DuplicateRefunds"), 1.0);
    let keys = refund_keys(&w).await;
    assert_eq!(keys, vec![format!("refund-duplicate-{pi}")]);
    let health: Value = w.scalar("select public.payment_health(1)").await;
    assert_eq!(
        (
            health["duplicate_payments"].clone(),
            health["duplicates_unrefunded"].clone()
        ),
        (json!(1), json!(0))
    );
}

#[tokio::test]
async fn a_refund_key_holding_a_stored_500_gives_way_to_the_next_key() {
    // Stripe keeps a 500 of an endpoint that ran under its idempotency key: every retry with
    // that key gets the same 500, replayed. The refund must still be made, once.
    let w = world().await;
    let user = w.user().await;
    let _ = pay_link(&w, &user);
    let (second, pi) = pay_link(&w, &user);
    let events = w.stripe.take_events();
    assert_eq!(w.deliver(&events[0]).await.0, 200);
    w.stripe.fail_next_refunds(1);

    let (status, body) = w.deliver(&events[1]).await;

    assert_eq!(status, 200, "{body}");
    assert!(w.deliver_all().await.is_empty());
    assert_eq!(w.stripe.refunds().len(), 1);
    assert_eq!(w.order_of(&second).await["status"], "refunded");
    let keys = refund_keys(&w).await;
    assert_eq!(
        keys,
        vec![
            format!("refund-duplicate-{pi}"),
            format!("refund-duplicate-{pi}"),
            format!("refund-duplicate-{pi}-2")
        ],
        "the 500, its replay, then the next key"
    );
    assert!(w.owns(&user).await);
}

/// The user pays the report through a Payment Link: (session, payment intent), nothing delivered.
fn pay_link(w: &World, user: &str) -> (String, String) {
    let session = w.stripe.foreign_session(user, apps::PRICE, AMOUNT);
    let pi = w.stripe.pay(&session).unwrap();
    (session, pi)
}

/// Delivers what Stripe emits until it is quiet, keeping each event in `sent`.
async fn deliver_keeping(w: &World, sent: &mut Vec<Value>) {
    loop {
        let events = w.stripe.take_events();
        if events.is_empty() {
            return;
        }
        for event in events {
            assert_eq!(w.deliver(&event).await.0, 200);
            sent.push(event);
        }
    }
}

/// A user's checkout payment is applied first; their Payment Link payment, charged back at
/// Stripe, comes second and is the duplicate.
struct ChargedBack {
    user: String,
    session: String,
    link: String,
    link_pi: String,
    dispute: String,
    /// The link's events, not yet delivered: completed, dispute created, funds withdrawn.
    events: Vec<Value>,
}

async fn duplicate_charged_back(w: &World) -> ChargedBack {
    let user = w.user().await;
    let (session, _) = buy(w, &user).await;
    let (link, link_pi) = pay_link(w, &user);
    let dispute = w.stripe.dispute(&link_pi).unwrap();
    let events = w.stripe.take_events();
    ChargedBack {
        user,
        session,
        link,
        link_pi,
        dispute,
        events,
    }
}

/// Where a charged-back duplicate whose dispute is won ends: its money back once, the checkout
/// payment standing, no alarm.
async fn assert_only_the_duplicate_refunded(w: &World, c: &ChargedBack) {
    let refunds = w.stripe.refunds();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0]["payment_intent"], json!(c.link_pi));
    assert_eq!(w.order_of(&c.link).await["status"], "refunded");
    assert_eq!(w.order_of(&c.session).await["status"], "paid");
    assert!(w.owns(&c.user).await);
    assert_eq!(w.webhook_metric("DuplicateRefundFailures"), 0.0);
}

#[tokio::test]
async fn a_charged_back_duplicate_is_refunded_when_its_dispute_is_won() {
    // Found by the payments model: the duplicate is under a chargeback, so its money is with the
    // cardholder and Stripe refuses to refund it; a won dispute gives it back to us, twice paid.
    let mut w = world().await;
    w.webhook.config.stripe.timeout = Duration::from_millis(200);
    w.webhook.stripe = apps::stripe_client(&w.webhook.config.stripe);
    let c = duplicate_charged_back(&w).await;
    // The dispute's events first: kept until the payment is applied.
    for event in c.events.iter().rev() {
        assert_eq!(w.deliver(event).await.0, 200);
    }

    assert_eq!(w.order_of(&c.link).await["status"], "disputed");
    assert!(
        refund_keys(&w).await.is_empty(),
        "nothing to refund while charged back"
    );
    assert!(w.owns(&c.user).await, "the checkout payment stands");

    w.stripe.close_dispute(&c.dispute, true).unwrap();
    let closed = w.stripe.take_events();
    // Stripe answers too late: the refund is made there, the webhook does not hear of it, and
    // Stripe's next delivery of the same event finishes the job.
    w.stripe.delay_refunds(Some(Duration::from_millis(500)));
    assert_eq!(w.deliver(&closed[0]).await.0, 503);
    w.stripe.delay_refunds(None);
    let (status, body) = w.deliver(&closed[0]).await;
    assert_eq!(
        (status, body["outcome"].clone()),
        (200, json!("duplicate")),
        "{body}"
    );
    assert!(w.deliver_all().await.is_empty());

    let keys = refund_keys(&w).await;
    assert!(
        keys.len() >= 2
            && keys
                .iter()
                .all(|k| *k == format!("refund-duplicate-{}", c.link_pi)),
        "the first try and its replays: {keys:?}"
    );
    assert_only_the_duplicate_refunded(&w, &c).await;
}

#[tokio::test]
async fn a_charged_back_duplicate_is_not_asked_to_be_refunded_until_its_dispute_is_won() {
    // The duplicate's disputes are read with it: nothing is asked of Stripe while the chargeback
    // holds the money (Stripe would refuse: `charge_disputed`), whatever order the events come in.
    let w = world().await;
    let c = duplicate_charged_back(&w).await;
    let (status, body) = w.deliver(&c.events[0]).await;
    assert_eq!(
        (status, body["outcome"].clone()),
        (200, json!("applied")),
        "{body}"
    );
    assert!(refund_keys(&w).await.is_empty(), "nothing asked");
    assert_eq!(w.order_of(&c.link).await["status"], "disputed");
    for event in &c.events[1..] {
        assert_eq!(w.deliver(event).await.0, 200);
    }
    assert_eq!(w.webhook_metric("DuplicateRefundFailures"), 0.0);

    w.stripe.close_dispute(&c.dispute, true).unwrap();
    assert!(w.deliver_all().await.is_empty());

    let key = format!("refund-duplicate-{}", c.link_pi);
    assert_eq!(
        refund_keys(&w).await,
        vec![key],
        "asked once, when it was due"
    );
    assert_only_the_duplicate_refunded(&w, &c).await;
}

#[tokio::test]
async fn a_forged_won_dispute_refunds_nothing_while_stripe_holds_the_chargeback() {
    // An event's payload says the dispute was won; Stripe says it is open: the facts read are
    // Stripe's, so nothing is due and nothing is asked.
    let w = world().await;
    let c = duplicate_charged_back(&w).await;
    for event in &c.events {
        assert_eq!(w.deliver(event).await.0, 200);
    }
    let mut won = c.events[2].clone();
    fixtures::set(&mut won, "/id", json!("evt_won_too_early"));
    fixtures::set(&mut won, "/type", json!("charge.dispute.closed"));
    fixtures::set(&mut won, "/data/object/status", json!("won"));

    let (status, body) = w.deliver(&won).await;

    assert_eq!(status, 200, "{body}");
    assert!(refund_keys(&w).await.is_empty());
    assert_eq!(w.order_of(&c.link).await["status"], "disputed");
    assert_eq!(w.webhook_metric("DuplicateRefundFailures"), 0.0);
}

#[tokio::test]
async fn stripe_refusing_a_refund_that_is_due_is_an_alarm() {
    // A refusal the facts do not explain (the payment read again still owes it): a person looks.
    let w = world().await;
    Mock::given(method("POST"))
        .and(path("/v1/refunds"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "type": "invalid_request_error", "code": "charge_expired_for_refund",
            "message": "This charge is too old to be refunded."}})))
        .with_priority(1)
        .mount(&w.stripe.server)
        .await;
    let user = w.user().await;
    buy(&w, &user).await;
    let (link, _) = pay_link(&w, &user);

    assert!(w.deliver_all().await.is_empty());

    assert_eq!(w.webhook_metric("DuplicateRefundFailures"), 1.0);
    assert!(w.stripe.refunds().is_empty());
    assert_eq!(w.order_of(&link).await["status"], "paid");
    let health: Value = w.scalar("select public.payment_health(1)").await;
    assert_eq!(health["duplicates_unrefunded"], 1);
    assert_eq!(
        refund_keys(&w).await.len(),
        1,
        "a refusal is not retried in the same run"
    );
}

#[tokio::test]
async fn a_charged_back_duplicate_whose_dispute_is_lost_is_not_refunded() {
    let w = world().await;
    let c = duplicate_charged_back(&w).await;
    w.stripe.close_dispute(&c.dispute, false).unwrap();

    for event in &c.events {
        assert_eq!(w.deliver(event).await.0, 200);
    }
    assert!(w.deliver_all().await.is_empty());

    assert!(refund_keys(&w).await.len() <= 1, "at most the refused try");
    assert_eq!(
        w.stripe.refunds().len(),
        0,
        "the cardholder has that money already"
    );
    assert_eq!(w.order_of(&c.link).await["status"], "refunded");
    assert_eq!(w.order_of(&c.session).await["status"], "paid");
    assert!(w.owns(&c.user).await);
}

#[tokio::test]
async fn stripe_unreachable_for_a_refund_is_a_503_and_the_redelivery_refunds_once() {
    let mut w = world().await;
    w.webhook.config.stripe.timeout = Duration::from_millis(200);
    w.webhook.stripe = apps::stripe_client(&w.webhook.config.stripe);
    let user = w.user().await;
    let (_, first) = w.click(&user).await;
    let session = first["session_id"].as_str().unwrap().to_owned();
    let _ = pay_link(&w, &user);
    w.stripe.pay(&session).unwrap();
    let events = w.stripe.take_events();
    // Our session's payment (made second) is heard of first; the link's (made first) then makes
    // it the duplicate.
    assert_eq!(w.deliver(&events[1]).await.0, 200);
    // Stripe answers too late: the refund is made there, the webhook does not hear of it.
    w.stripe.delay_refunds(Some(Duration::from_millis(500)));

    let (status, body) = w.deliver(&events[0]).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (503, json!("payment_provider_unavailable"))
    );
    w.stripe.delay_refunds(None);
    // Stripe redelivers minutes later; by then the slow refund has finished there.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, body) = w.deliver(&events[0]).await;

    assert_eq!(
        (status, body["outcome"].clone()),
        (200, json!("duplicate")),
        "{body}"
    );
    assert!(w.deliver_all().await.is_empty());
    assert_eq!(
        w.stripe.refunds().len(),
        1,
        "one refund: the timed-out key was not spent, and its retry got the refund Stripe made"
    );
    let keys: Vec<String> = w
        .stripe
        .requests_to("POST", "/v1/refunds")
        .await
        .into_iter()
        .filter_map(|r| {
            r.headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .collect();
    assert!(keys.len() >= 2, "{keys:?}");
    assert!(
        keys.iter().all(|k| !k.ends_with("-2")),
        "a timeout spends no key: {keys:?}"
    );
    assert_eq!(w.order_of(&session).await["status"], "refunded");
    assert!(w.owns(&user).await);
}

#[tokio::test]
async fn a_refund_waiting_for_the_customer_is_not_money_back_yet() {
    let w = world().await;
    let user = w.user().await;
    let _ = pay_link(&w, &user);
    let (second, _) = pay_link(&w, &user);
    w.stripe.next_refund_status(Some("requires_action"));

    assert!(w.deliver_all().await.is_empty());

    let health: Value = w.scalar("select public.payment_health(1)").await;
    assert_eq!(
        (
            health["duplicate_refunds"].clone(),
            health["duplicates_unrefunded"].clone()
        ),
        (json!(0), json!(1)),
        "asked for, not back: {health}"
    );
    assert_eq!(w.order_of(&second).await["status"], "paid");
    assert_eq!(w.stripe.refunds().len(), 1, "not asked twice");

    let refund = w.stripe.refunds()[0]["id"].as_str().unwrap().to_owned();
    w.stripe.complete_refund(&refund).unwrap();
    assert!(w.deliver_all().await.is_empty());
    let health: Value = w.scalar("select public.payment_health(1)").await;
    assert_eq!(health["duplicates_unrefunded"], 0, "back now: {health}");
    assert_eq!(w.order_of(&second).await["status"], "refunded");
    assert!(w.owns(&user).await);
}

/// A duplicate's refund waits for the customer, then is canceled: the duplicate is due again and
/// is refunded under the next key (the first key replays the canceled refund forever).
#[tokio::test]
async fn a_duplicates_refund_canceled_while_waiting_is_made_again_under_the_next_key() {
    let w = world().await;
    let user = w.user().await;
    let (first, _) = pay_link(&w, &user);
    let (second, _) = pay_link(&w, &user);
    w.stripe.next_refund_status(Some("requires_action"));
    assert!(w.deliver_all().await.is_empty());
    w.stripe.next_refund_status(None);
    let waiting = w.stripe.refunds()[0]["id"].as_str().unwrap().to_owned();

    w.stripe.cancel_refund(&waiting).unwrap();
    assert!(w.deliver_all().await.is_empty());

    let refunds = w.stripe.refunds();
    assert_eq!(refunds.len(), 2, "{refunds:?}");
    assert_eq!(refunds[0]["status"], "canceled");
    assert_eq!(refunds[1]["status"], "succeeded");
    assert_eq!(refunds[1]["payment_intent"], refunds[0]["payment_intent"]);
    assert_eq!(w.order_of(&second).await["status"], "refunded");
    assert_eq!(w.order_of(&first).await["status"], "paid");
    assert!(w.owns(&user).await);
    let mut keys = refund_keys(&w).await;
    keys.dedup();
    assert_eq!(
        keys.len(),
        2,
        "two keys, the first replayed at most: {keys:?}"
    );
}

/// Two instances refund one duplicate at the same moment under the same key (a delivery and the
/// reconciler, say). Stripe answers the second 409 while the first runs and keeps nothing for it;
/// Stripe refunds once and, once everything is delivered, the duplicate is refunded and the first
/// payment stands.
#[tokio::test]
async fn two_instances_refunding_one_duplicate_at_once_refund_it_once() {
    let w = world().await;
    let user = w.user().await;
    let (first, _) = pay_link(&w, &user);
    assert!(w.deliver_all().await.is_empty());
    let (second, pi) = pay_link(&w, &user);
    // Delivered while Stripe fails refunds: the refund is left due, its first keys spent.
    w.stripe.fail_next_refunds(100);
    let _ = w.deliver_all().await;
    w.stripe.fail_next_refunds(0);
    let order: uuid::Uuid = w
        .scalar(&format!(
            "select order_id from billing.decisions where payment_intent_id = '{pi}' and refund_due"
        ))
        .await;
    let attempt: i32 = w
        .scalar(&format!(
            "select attempt from internal.stripe_actions where object_id = '{pi}'"
        ))
        .await;
    let due = shared::store::payments::RefundDue {
        order_id: order,
        payment_intent_id: pi.clone(),
        attempt: attempt as u32,
        standing: None,
    };
    w.stripe
        .delay_refunds(Some(std::time::Duration::from_millis(1500)));
    let syncer = w.webhook.config.syncer(&w.webhook);

    let (a, b) = tokio::join!(
        syncer.carry_out(vec![due.clone()], Vec::new()),
        syncer.carry_out(vec![due], Vec::new())
    );

    w.stripe.delay_refunds(None);
    let (a, b) = (a.unwrap(), b.unwrap());
    let asked = w.stripe.requests_to("POST", "/v1/refunds").await.len();
    assert!(asked >= 2, "both asked: {a:?} {b:?}");
    // The one answered 409 waited for the first request to end and was given its refund.
    assert!(
        a.stripe_time.max(b.stripe_time) > std::time::Duration::from_millis(2500),
        "{a:?} {b:?}"
    );
    assert!(w.deliver_all().await.is_empty());
    assert_eq!(w.stripe.refunds().len(), 1, "{:?}", w.stripe.refunds());
    assert_eq!(w.order_of(&second).await["status"], "refunded");
    assert_eq!(w.order_of(&first).await["status"], "paid");
    assert!(w.owns(&user).await);
}

#[tokio::test]
async fn a_refund_that_fails_gives_the_report_back() {
    let w = world().await;
    let user = w.user().await;
    let (session, pi) = buy(&w, &user).await;
    let refund = w.stripe.refund(&pi, None).unwrap();
    assert!(w.deliver_all().await.is_empty());
    assert!(!w.owns(&user).await);

    w.stripe
        .fail_refund(refund["id"].as_str().unwrap())
        .unwrap();
    assert!(w.deliver_all().await.is_empty());

    assert!(w.owns(&user).await, "the money is the merchant's again");
    let order = w.order_of(&session).await;
    assert_eq!(
        (order["status"].clone(), order["amount_refunded"].clone()),
        (json!("paid"), json!(0))
    );
    assert_eq!(
        w.scalar::<i64>("select count(*) from payment_audit where kind = 'refund_reversed'")
            .await,
        1
    );
}

/// Found by the payments model (500 cases): a user refunded in full may buy again and clicks; then
/// the refund fails and the report comes back. The session handed out meanwhile must not stay
/// payable (I1, I2): the reversal closes its order and the webhook expires it at Stripe.
#[tokio::test]
async fn a_refund_that_fails_after_a_new_click_expires_the_new_session() {
    let w = world().await;
    let user = w.user().await;
    let (_, pi) = buy(&w, &user).await;
    let refund = w.stripe.refund(&pi, None).unwrap();
    assert!(w.deliver_all().await.is_empty());
    let (status, again) = w.click(&user).await;
    assert_eq!(status, 200, "refunded: the user may buy again: {again}");
    let new_session = again["session_id"].as_str().unwrap().to_owned();
    assert_eq!(
        w.open_sessions_of(&user),
        std::slice::from_ref(&new_session)
    );

    w.stripe
        .fail_refund(refund["id"].as_str().unwrap())
        .unwrap();
    assert!(w.deliver_all().await.is_empty());

    assert!(w.owns(&user).await, "the money is the merchant's again");
    assert!(
        w.open_sessions_of(&user).is_empty(),
        "the new session was expired at Stripe"
    );
    let order = w.order_of(&new_session).await;
    assert_eq!(
        (order["status"].clone(), order["closed_reason"].clone()),
        (json!("expired"), json!("expired"))
    );
    let (status, body) = w.click(&user).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("already_paid"))
    );
}

/// A payment applied after its full refund (charge.refunded delivered first) is audited as
/// refunded too, as it would be had the refund come after.
#[tokio::test]
async fn a_payment_applied_after_its_refund_is_audited_refunded() {
    let w = world().await;
    let user = w.user().await;
    let (_, first) = w.click(&user).await;
    let session = first["session_id"].as_str().unwrap().to_owned();
    let pi = w.stripe.pay(&session).unwrap();
    w.stripe.refund(&pi, None).unwrap();
    let events = w.stripe.take_events();
    // The refund's facts are stored before any purchase names the payment.
    assert_eq!(w.deliver(&events[1]).await.1["outcome"], "applied");
    assert_eq!(w.deliver(&events[0]).await.1["outcome"], "applied");

    let kinds: Vec<String> = w
        .scalar::<Vec<String>>(
            "select array_agg(kind order by id) from payment_audit where kind like 'order_%'",
        )
        .await;
    assert_eq!(kinds, ["order_paid", "order_refunded"]);
}

#[tokio::test]
async fn a_duplicates_refund_that_fails_is_made_again_under_the_next_key() {
    let w = world().await;
    let user = w.user().await;
    let _ = pay_link(&w, &user);
    let (second, pi) = pay_link(&w, &user);
    assert!(w.deliver_all().await.is_empty());
    let first_refund = w.stripe.refunds()[0]["id"].as_str().unwrap().to_owned();

    w.stripe.fail_refund(&first_refund).unwrap();
    assert!(w.deliver_all().await.is_empty());

    let refunds = w.stripe.refunds();
    assert_eq!(refunds.len(), 2, "{refunds:?}");
    assert_eq!(refunds[1]["status"], "succeeded");
    let keys = refund_keys(&w).await;
    assert_eq!(keys.last(), Some(&format!("refund-duplicate-{pi}-2")));
    assert_eq!(w.order_of(&second).await["status"], "refunded");
    assert!(w.owns(&user).await);
}

#[tokio::test]
async fn a_key_replaying_a_refund_that_failed_since_gives_way_to_the_next_key() {
    // Found in review: key 1 holds a stored 500, key 2 made a refund that later failed. The
    // refund due is then asked for under key 2 again (one failed refund known), and Stripe
    // replays the old success: the refund known to have failed must not count.
    let w = world().await;
    let user = w.user().await;
    let _ = pay_link(&w, &user);
    let (second, pi) = pay_link(&w, &user);
    w.stripe.fail_next_refunds(1);
    assert!(w.deliver_all().await.is_empty());
    let first_refund = w.stripe.refunds()[0]["id"].as_str().unwrap().to_owned();

    w.stripe.fail_refund(&first_refund).unwrap();
    assert!(w.deliver_all().await.is_empty());

    let refunds = w.stripe.refunds();
    assert_eq!(refunds.len(), 2, "{refunds:?}");
    assert_eq!(refunds[1]["status"], "succeeded");
    assert_eq!(
        refund_keys(&w).await.last(),
        Some(&format!("refund-duplicate-{pi}-3"))
    );
    assert_eq!(w.order_of(&second).await["status"], "refunded");
    assert!(w.owns(&user).await);
    assert_eq!(w.webhook_metric("DuplicateRefundFailures"), 0.0);
}

#[tokio::test]
async fn a_refund_reversal_after_a_won_dispute_keeps_one_payment() {
    // Found in review of the old design (two orders naming each other duplicates, both refunded):
    // the first payment is refunded in the Dashboard, the charged-back second one wins its
    // dispute and stands, then the first one's refund fails. Both are held again: the earliest
    // made stands, the other is refunded; never both.
    let w = world().await;
    let c = duplicate_charged_back(&w).await;
    let mut sent = c.events.clone();
    for event in &c.events {
        assert_eq!(w.deliver(event).await.0, 200);
    }
    let owner_pi = w.order_of(&c.session).await["stripe_payment_intent_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let owner_refund = w.stripe.refund(&owner_pi, None).unwrap();
    deliver_keeping(&w, &mut sent).await;
    w.stripe.close_dispute(&c.dispute, true).unwrap();
    deliver_keeping(&w, &mut sent).await;
    assert_eq!(
        w.order_of(&c.link).await["status"],
        "paid",
        "the purchase now"
    );
    assert!(w
        .stripe
        .refunds()
        .iter()
        .all(|r| r["payment_intent"] != json!(c.link_pi)));

    w.stripe
        .fail_refund(owner_refund["id"].as_str().unwrap())
        .unwrap();
    deliver_keeping(&w, &mut sent).await;
    // Every event of both payments again, as Stripe's redeliveries would.
    for event in &sent {
        assert_eq!(w.deliver(event).await.0, 200);
    }

    let refunded: Vec<Value> = w
        .stripe
        .refunds()
        .into_iter()
        .filter(|r| r["status"] == "succeeded")
        .map(|r| r["payment_intent"].clone())
        .collect();
    assert_eq!(refunded, vec![json!(c.link_pi)], "only the later payment");
    assert_eq!(w.order_of(&c.session).await["status"], "paid");
    assert_eq!(w.order_of(&c.link).await["status"], "refunded");
    assert!(w.owns(&c.user).await);
}

#[tokio::test]
async fn a_user_who_pays_again_under_a_chargeback_keeps_that_payment_until_it_is_won() {
    let w = world().await;
    let user = w.user().await;
    let (session, pi) = buy(&w, &user).await;
    let dispute = w.stripe.dispute(&pi).unwrap();
    assert!(w.deliver_all().await.is_empty());
    assert!(!w.owns(&user).await);
    // The user pays again (a Payment Link): the money the merchant holds is this payment.
    let (link, _) = pay_link(&w, &user);
    assert!(w.deliver_all().await.is_empty());
    assert!(w.owns(&user).await, "through the second payment");
    assert_eq!(
        w.stripe.refunds().len(),
        0,
        "not refunded while the first is charged back"
    );

    w.stripe.close_dispute(&dispute, true).unwrap();
    assert!(w.deliver_all().await.is_empty());

    let refunds = w.stripe.refunds();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(w.order_of(&link).await["status"], "refunded");
    assert_eq!(w.order_of(&session).await["status"], "paid");
    assert!(w.owns(&user).await);
}

#[tokio::test]
async fn a_user_who_pays_again_under_a_chargeback_that_is_lost_keeps_the_report() {
    let w = world().await;
    let user = w.user().await;
    let (session, pi) = buy(&w, &user).await;
    let dispute = w.stripe.dispute(&pi).unwrap();
    assert!(w.deliver_all().await.is_empty());
    let (link, _) = pay_link(&w, &user);
    assert!(w.deliver_all().await.is_empty());

    w.stripe.close_dispute(&dispute, false).unwrap();
    assert!(w.deliver_all().await.is_empty());

    assert_eq!(w.stripe.refunds().len(), 0);
    assert_eq!(w.order_of(&session).await["status"], "refunded");
    assert_eq!(w.order_of(&link).await["status"], "paid");
    assert!(w.owns(&user).await);
}

#[tokio::test]
async fn a_third_payment_under_a_chargeback_is_refunded() {
    // Found in review: the second payment stands while the first is charged back; a third one
    // is a duplicate of it, whoever the first one's order names.
    let w = world().await;
    let user = w.user().await;
    let (session, pi) = buy(&w, &user).await;
    let dispute = w.stripe.dispute(&pi).unwrap();
    assert!(w.deliver_all().await.is_empty());
    let (second, _) = pay_link(&w, &user);
    assert!(w.deliver_all().await.is_empty());
    let (_, third_pi) = pay_link(&w, &user);

    assert!(w.deliver_all().await.is_empty());

    let refunds = w.stripe.refunds();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0]["payment_intent"], json!(third_pi));
    assert_eq!(w.order_of(&second).await["status"], "paid");
    w.stripe.close_dispute(&dispute, false).unwrap();
    assert!(w.deliver_all().await.is_empty());
    assert_eq!(w.stripe.refunds().len(), 1, "the second payment stays");
    assert_eq!(w.order_of(&session).await["status"], "refunded");
    assert!(w.owns(&user).await);
}

#[tokio::test]
async fn a_duplicates_refund_that_fails_after_the_user_bought_again_leaves_one_payment() {
    // Found in review: the duplicate's refund fails after its owner was refunded and the user
    // bought again. Two payments are held: the earliest made stands, the other is refunded.
    let w = world().await;
    let user = w.user().await;
    let (_, pi) = buy(&w, &user).await;
    let (link, link_pi) = pay_link(&w, &user);
    assert!(w.deliver_all().await.is_empty());
    let link_refund = w.stripe.refunds()[0]["id"].as_str().unwrap().to_owned();
    w.stripe.refund(&pi, None).unwrap();
    assert!(w.deliver_all().await.is_empty());
    let (again, again_pi) = buy(&w, &user).await;

    w.stripe.fail_refund(&link_refund).unwrap();
    assert!(w.deliver_all().await.is_empty());

    assert_eq!(
        w.order_of(&link).await["status"],
        "paid",
        "made before the new one"
    );
    assert_eq!(w.order_of(&again).await["status"], "refunded");
    assert_eq!(w.stripe.charge(&link_pi).unwrap()["refunded"], false);
    assert_eq!(w.stripe.charge(&again_pi).unwrap()["refunded"], true);
    assert!(w.owns(&user).await);
}

#[tokio::test]
async fn a_refund_that_fails_after_a_lost_chargeback_refunds_the_payment_that_then_is_due() {
    // Found in review: the user's duplicate was refunded, their first payment charged back and
    // a third one made; the chargeback is lost, then the duplicate's refund fails. The refund
    // event changes which payment stands: it carries the refund of the other one.
    let w = world().await;
    let user = w.user().await;
    let (_, pi) = buy(&w, &user).await;
    let (_, link_pi) = pay_link(&w, &user);
    assert!(w.deliver_all().await.is_empty());
    let link_refund = w.stripe.refunds()[0]["id"].as_str().unwrap().to_owned();
    let dispute = w.stripe.dispute(&pi).unwrap();
    assert!(w.deliver_all().await.is_empty());
    let (_, third_pi) = pay_link(&w, &user);
    assert!(w.deliver_all().await.is_empty());
    w.stripe.close_dispute(&dispute, false).unwrap();
    assert!(w.deliver_all().await.is_empty());

    w.stripe.fail_refund(&link_refund).unwrap();
    assert!(w.deliver_all().await.is_empty());

    let held: Vec<&String> = [&link_pi, &third_pi]
        .into_iter()
        .filter(|p| w.stripe.charge(p).unwrap()["refunded"] == false)
        .collect();
    assert_eq!(held.len(), 1, "the merchant holds one payment: {held:?}");
    assert!(w.owns(&user).await);
}

#[tokio::test]
async fn an_async_payment_in_flight_after_its_order_was_closed_still_counts() {
    // Found by the payments model: the user pays our session with an async method and a Payment
    // Link too; the link is applied first and closes our order; then the link is refunded. Our
    // session's payment is still on its way: a click is a payment in flight, not a new session.
    let w = world().await;
    let user = w.user().await;
    let (_, first) = w.click(&user).await;
    let session = first["session_id"].as_str().unwrap().to_owned();
    w.stripe.pay_async(&session).unwrap();
    let (_, link_pi) = pay_link(&w, &user);
    for event in w.stripe.take_events().iter().rev() {
        assert_eq!(w.deliver(event).await.0, 200);
    }
    w.stripe.refund(&link_pi, None).unwrap();
    assert!(w.deliver_all().await.is_empty());
    assert!(!w.owns(&user).await);

    let (status, body) = w.click(&user).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("payment_processing")),
        "{body}"
    );

    w.stripe.settle_async(&session, true).unwrap();
    assert!(w.deliver_all().await.is_empty());
    assert_eq!(w.order_of(&session).await["status"], "paid");
    assert!(w.owns(&user).await);
    assert_eq!(w.stripe.refunds().len(), 1, "only the refunded link");
}

#[tokio::test]
async fn a_refund_that_fails_after_the_user_bought_again_refunds_the_later_payment() {
    let w = world().await;
    let user = w.user().await;
    let (first, pi) = buy(&w, &user).await;
    let refund = w.stripe.refund(&pi, None).unwrap();
    assert!(w.deliver_all().await.is_empty());
    let (second, _) = buy(&w, &user).await;

    // The first refund fails: that money is the merchant's again, and the user paid twice. The
    // earliest payment stands; the later one is refunded.
    w.stripe
        .fail_refund(refund["id"].as_str().unwrap())
        .unwrap();
    assert!(w.deliver_all().await.is_empty());

    assert_eq!(w.order_of(&first).await["status"], "paid");
    assert_eq!(w.order_of(&second).await["status"], "refunded");
    let kept: Vec<_> = w
        .stripe
        .charges()
        .into_iter()
        .filter(|(_, c)| c["refunded"] == false)
        .collect();
    assert_eq!(kept.len(), 1, "one payment kept: {kept:?}");
    assert!(w.owns(&user).await);
}

#[tokio::test]
async fn an_inquiry_keeps_the_report_until_it_becomes_a_chargeback() {
    let w = world().await;
    let user = w.user().await;
    let (session, pi) = buy(&w, &user).await;

    let inquiry = w.stripe.inquiry(&pi).unwrap();
    w.deliver_all().await;
    assert!(w.owns(&user).await, "an inquiry withdraws nothing");
    assert_eq!(w.order_of(&session).await["status"], "paid");

    w.stripe.escalate(&inquiry).unwrap();
    w.deliver_all().await;
    assert!(!w.owns(&user).await, "a chargeback withdraws the money");
    assert_eq!(w.order_of(&session).await["status"], "disputed");

    w.stripe.close_dispute(&inquiry, true).unwrap();
    w.deliver_all().await;
    assert!(w.owns(&user).await);
}

#[tokio::test]
async fn a_lost_dispute_that_names_only_the_charge_revokes_the_report() {
    let w = world().await;
    let user = w.user().await;
    let (session, pi) = buy(&w, &user).await;
    let dispute = w.stripe.dispute(&pi).unwrap();
    w.stripe.close_dispute(&dispute, false).unwrap();

    for mut event in w.stripe.take_events() {
        fixtures::set(&mut event, "/data/object/payment_intent", Value::Null);
        assert_eq!(w.deliver(&event).await.0, 200);
    }

    assert!(
        !w.owns(&user).await,
        "the webhook asked Stripe for the charge's payment intent"
    );
    assert_eq!(w.order_of(&session).await["status"], "refunded");
}

#[tokio::test]
async fn a_click_on_a_session_refunded_before_its_webhook_may_buy_again() {
    let w = world().await;
    let user = w.user().await;
    let (_, first) = w.click(&user).await;
    let session = first["session_id"].as_str().unwrap().to_owned();
    let pi = w.stripe.pay(&session).unwrap();
    w.stripe.refund(&pi, None).unwrap();
    let events = w.stripe.take_events();
    assert_eq!(w.deliver(&events[1]).await.0, 200, "the refund first");

    let (status, body) = w.click(&user).await;

    assert_eq!(status, 200, "{body}");
    assert_ne!(body["session_id"], json!(session));
    assert_eq!(w.order_of(&session).await["status"], "refunded");
}

#[tokio::test]
async fn an_email_stripe_refuses_gives_a_session_without_it() {
    let w = world().await;
    let user = w.user().await;
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .and(body_string_contains("customer_email="))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "type": "invalid_request_error", "code": "email_invalid",
            "param": "customer_email", "message": "Invalid email address"}})))
        .with_priority(1)
        .mount(&w.stripe.server)
        .await;

    let (status, body) = w.click(&user).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(
        w.scalar::<String>("select string_agg(status || '/' || coalesce(customer_email, '-'), ',' order by created_at) from orders").await,
        format!("expired/{}@example.com,pending/-", &user[..8])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_while_a_payment_link_is_verified_is_a_payment_in_flight() {
    let w = world().await;
    let user = w.user().await;
    let (link, _) = pay_link(&w, &user);
    let events = w.stripe.take_events();
    w.stripe
        .slow_line_items(&link, apps::PRICE, Duration::from_millis(800))
        .await;

    let click = async {
        tokio::time::sleep(Duration::from_millis(250)).await;
        w.click(&user).await
    };
    let ((delivered, _), (status, body)) = tokio::join!(w.deliver(&events[0]), click);

    assert_eq!(delivered, 200);
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("payment_processing")),
        "{body}"
    );
    assert!(w.owns(&user).await);
    assert_eq!(w.stripe.sessions().len(), 1, "no session of ours was made");
}

#[tokio::test]
async fn a_session_whose_expiry_failed_is_handed_out_again_once_the_user_owns_nothing() {
    let w = world().await;
    let user = w.user().await;
    let (_, first) = w.click(&user).await;
    let old = first["session_id"].as_str().unwrap().to_owned();
    // Stripe cannot expire that session for a while.
    Mock::given(method("POST"))
        .and(path(format!("/v1/checkout/sessions/{old}/expire")))
        .respond_with(ResponseTemplate::new(503).set_body_json(json!({"error": {
            "type": "api_error", "message": "Service unavailable"}})))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&w.stripe.server)
        .await;
    // The user buys through a Payment Link meanwhile: the expiry fails for now (503: Stripe
    // delivers again), then support refunds the link.
    let (_, link_pi) = pay_link(&w, &user);
    let failed = w.deliver_all().await;
    assert_eq!(failed.len(), 1, "the payment's event comes again");
    assert_eq!(
        w.stripe.session(&old).unwrap()["status"],
        "open",
        "the expiry failed"
    );
    w.stripe.refund(&link_pi, None).unwrap();
    assert!(w.deliver_all().await.is_empty());
    assert!(!w.owns(&user).await);

    let (status, second) = w.click(&user).await;

    assert_eq!(status, 200, "{second}");
    assert_eq!(
        second["session_id"],
        json!(old),
        "the open session is the user's again"
    );
    assert_eq!(w.open_sessions_of(&user), vec![old]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_made_but_not_recorded_is_recorded_by_the_redelivery() {
    let w = world().await;
    let user = w.user().await;
    let (_, first) = w.click(&user).await;
    let session = first["session_id"].as_str().unwrap().to_owned();
    let _ = pay_link(&w, &user);
    w.stripe.pay(&session).unwrap();
    let events = w.stripe.take_events();
    assert_eq!(w.deliver(&events[0]).await.0, 200);
    // The refund call takes 600 ms; the database goes away while it is in flight (once Stripe
    // has the request, whatever the machine's load).
    w.stripe.delay(Some(Duration::from_millis(600)));
    let cut = async {
        while w.stripe.requests_to("POST", "/v1/refunds").await.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        w.proxy.down();
    };

    let ((status, _), ()) = tokio::join!(w.deliver(&events[1]), cut);
    assert!(status >= 500, "{status}");
    assert_eq!(w.stripe.refunds().len(), 1, "the refund was made at Stripe");
    w.proxy.up();
    let (status, body) = w.deliver(&events[1]).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(
        w.stripe.refunds().len(),
        1,
        "the retry was answered from the idempotency key"
    );
    assert_eq!(
        w.scalar::<i64>("select count(*) from payment_audit where kind = 'duplicate_refunded'")
            .await,
        1
    );
    w.stripe.delay(None);
    w.deliver_all().await;
    assert_eq!(w.order_of(&session).await["status"], "refunded");
    assert!(w.owns(&user).await);
}

#[tokio::test]
async fn without_automatic_refunds_a_duplicate_is_audited_and_alarmed() {
    let w = World::new(Setup {
        auto_refund: false,
        ..Setup::default()
    })
    .await;
    let user = w.user().await;
    buy(&w, &user).await;
    let _ = pay_link(&w, &user);

    assert!(w.deliver_all().await.is_empty());

    assert!(w.stripe.refunds().is_empty());
    assert_eq!(w.webhook_metric("DuplicatePayments"), 1.0);
    let health: Value = w.scalar("select public.payment_health(1)").await;
    assert_eq!(health["duplicates_unrefunded"], 1);
    // The reconciler does not refund it either: a person does (runbook).
    w.reconcile(None).await;
    assert!(w.stripe.refunds().is_empty());
}

#[tokio::test]
async fn a_refund_stripe_keeps_failing_is_left_to_a_person_after_ten_keys() {
    let w = world().await;
    let user = w.user().await;
    buy(&w, &user).await;
    let (link, _) = pay_link(&w, &user);
    w.stripe.next_refund_status(Some("failed"));

    w.deliver_all().await;
    let mut runs = 0;
    while refund_keys(&w).await.len() < 10 && runs < 10 {
        w.reconcile(None).await;
        runs += 1;
    }
    let tried = refund_keys(&w).await;
    w.reconcile(None).await;
    w.reconcile(None).await;

    assert_eq!(tried.len(), 10, "{tried:?}");
    assert_eq!(refund_keys(&w).await, tried, "no eleventh key");
    assert_eq!(w.order_of(&link).await["status"], "paid");
    assert!(w.webhook_metric("DuplicateRefundFailures") >= 1.0);
    assert!(
        apps::metric_total(&w.reconcile_metrics, "DuplicateRefundFailures") >= 2.0,
        "every run says so until a person acts"
    );
}
