//! The model-based money test's operations and its reference model (docs/payments.md).
//!
//! A case is a sequence of [`Op`]s run against a [`World`]: the real SQL functions, both
//! handlers and the fake Stripe. Stripe's events wait in `pending` until an op delivers them
//! (late, twice at once, two at once, in the same second). After every op [`Run::check`] tests
//! the invariants that must hold at every moment; at the end, with every event delivered,
//! [`Run::finish`] compares the database with what the money at the fake says must be true.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};
use shared::store::orders::{Begin, BeginLimits, FULL_REPORT};

use crate::apps;
use crate::fixtures;
use crate::money::{Answer, Setup, World};

/// Users in every case (indexes wrap).
pub const USERS: usize = 2;

/// One step of a case. Indexes (`user`, `pick`) wrap around what exists.
#[derive(Clone, Debug)]
pub enum Op {
    /// `n` concurrent clicks of a user, spread over the instances.
    Clicks { user: u8, n: u8 },
    /// The success page polls the user's latest session.
    Poll { user: u8 },
    /// The customer pays the newest session handed to them, if Stripe lets them.
    Pay { user: u8 },
    /// The customer pays the oldest session handed to them (an old tab), if Stripe lets them.
    PayOldTab { user: u8 },
    /// An async payment (bank debit) on the newest session; settles later.
    PayAsync { user: u8 },
    /// The user's async payment in flight settles.
    SettleAsync { user: u8, succeeded: bool },
    /// Stripe expires the user's newest open session (its time ran out).
    StripeExpires { user: u8 },
    /// The user pays a Payment Link: for the report, or for something else for 1 unit.
    PaymentLink { user: u8, our_price: bool },
    /// A Dashboard refund of the user's newest paid payment, full or partial.
    Refund { user: u8, full: bool },
    /// The cardholder disputes the user's newest paid payment.
    Dispute { user: u8 },
    /// The user's newest open dispute is decided.
    CloseDispute { user: u8, won: bool },
    /// The cardholder's bank asks about the user's newest paid payment (nothing withdrawn).
    Inquiry { user: u8 },
    /// The user's newest inquiry becomes a chargeback.
    Escalate { user: u8 },
    /// The user's newest refund fails after it was made: the money is the merchant's again.
    FailRefund { user: u8 },
    /// A subscription's life (created, active, maybe canceled), its invoice, and the checkout
    /// session that names its owner: events queued in Stripe's order, delivered by other ops.
    Subscribe {
        user: u8,
        cancel: bool,
        same_second: bool,
    },
    /// Delivers pending event `pick`, once or twice at the same time.
    Deliver { pick: u8, twice: bool },
    /// Delivers two pending events at the same time.
    DeliverPair { a: u8, b: u8 },
    /// Delivers every pending event, in Stripe's order or reversed.
    DeliverAll { reversed: bool },
    /// Events emitted from now on share one `created` second (or no longer).
    SameSecond { on: bool },
    /// Every creation lease runs out (time passes; timestamps move, nobody sleeps).
    ExpireLeases,
    /// Pending orders without a session age by `minutes`.
    AgeOrders { minutes: u8 },
    /// An instance takes the lease, creates the session at Stripe, and dies before attaching.
    CrashMidCreate { user: u8 },
    /// A click lands inside the transaction that applies the user's payment (held open).
    ClickDuringPayment { user: u8 },
    /// A click is creating its session at Stripe (slow) while a payment of the user's arrives.
    ClickRacesPayment { user: u8 },
    /// The database goes away for one click and one delivery, then comes back.
    DatabaseCut { user: u8, pick: u8 },
}

/// A subscription's events in Stripe's order and what they end in.
struct Timeline {
    user: usize,
    subscription: String,
    final_status: &'static str,
}

/// The state of one case.
pub struct Run<'w> {
    pub w: &'w World,
    pub setup: Setup,
    users: Vec<String>,
    /// Events emitted and not yet taken by the webhook, in Stripe's order.
    pending: Vec<Value>,
    /// Sessions handed to each user by a 200 click, oldest first.
    handed: Vec<Vec<String>>,
    timelines: Vec<Timeline>,
    /// Clicks answered 200, with the database clock just before each (I2).
    clicks_ok: Vec<(usize, String)>,
    /// What happened, for the failure report.
    pub log: String,
}

const LIVE: [&str; 3] = ["active", "trialing", "past_due"];

impl<'w> Run<'w> {
    /// A case over `w` (already reset for `setup`) with fresh users.
    pub async fn new(w: &'w World, setup: Setup) -> Run<'w> {
        let mut users = Vec::new();
        for _ in 0..USERS {
            users.push(w.user().await);
        }
        Run {
            w,
            setup,
            users,
            pending: Vec::new(),
            handed: vec![Vec::new(); USERS],
            timelines: Vec::new(),
            clicks_ok: Vec::new(),
            log: String::new(),
        }
    }

    fn user(&self, i: u8) -> (usize, &str) {
        let i = usize::from(i) % self.users.len();
        (i, &self.users[i])
    }

    fn take_events(&mut self) {
        self.pending.extend(self.w.stripe.take_events());
    }

    fn note(&mut self, line: impl AsRef<str>) {
        let _ = writeln!(self.log, "    {}", line.as_ref());
    }

    /// Runs one op; `Err` when an answer breaks an invariant (a 5xx from a race, say).
    pub async fn step(&mut self, op: &Op) -> Result<(), String> {
        let _ = writeln!(self.log, "{op:?}");
        match op {
            Op::Clicks { user, n } => {
                let (i, id) = self.user(*user);
                let id = id.to_owned();
                let t0 = self.db_clock().await;
                let answers = self.w.clicks(&id, usize::from(*n).clamp(1, 4)).await;
                for answer in &answers {
                    self.click_answer(i, &t0, answer, false)?;
                }
            }
            Op::Poll { user } => {
                let (i, id) = self.user(*user);
                let session = self.handed[i].last().cloned();
                let (status, body) = self.w.poll(id, session.as_deref()).await;
                self.note(format!("poll {status} {body}"));
                if !matches!(status, 200 | 404) {
                    return Err(format!("poll answered {status}: {body}"));
                }
            }
            Op::Pay { user } | Op::PayOldTab { user } | Op::PayAsync { user } => {
                let (i, _) = self.user(*user);
                let session = match op {
                    Op::PayOldTab { .. } => self.handed[i].first().cloned(),
                    _ => self.handed[i].last().cloned(),
                };
                if let Some(session) = session {
                    let paid = match op {
                        Op::PayAsync { .. } => self.w.stripe.pay_async(&session),
                        _ => self.w.stripe.pay(&session),
                    };
                    self.note(format!("pay {session}: {paid:?}"));
                }
            }
            Op::SettleAsync { user, succeeded } => {
                let (_, id) = self.user(*user);
                let id = id.to_owned();
                for session in self.w.stripe.sessions() {
                    if session["client_reference_id"] == json!(id)
                        && session["status"] == "complete"
                        && session["payment_status"] == "unpaid"
                    {
                        let sid = session["id"].as_str().unwrap_or_default();
                        let settled = self.w.stripe.settle_async(sid, *succeeded);
                        self.note(format!("settle {sid}: {settled:?}"));
                        break;
                    }
                }
            }
            Op::StripeExpires { user } => {
                let (_, id) = self.user(*user);
                if let Some(session) = self.w.open_sessions_of(id).last() {
                    let expired = self.w.stripe.expire(session);
                    self.note(format!("stripe expired {session}: {expired}"));
                }
            }
            Op::PaymentLink { user, our_price } => {
                let (_, id) = self.user(*user);
                let (price, amount) = if *our_price {
                    (apps::PRICE, crate::stripe_fake::AMOUNT)
                } else {
                    ("price_other_thing", 1)
                };
                let session = self.w.stripe.foreign_session(id, price, amount);
                let paid = self.w.stripe.pay(&session);
                self.note(format!("payment link {session} {price}: {paid:?}"));
            }
            Op::Refund { user, full } => {
                if let Some(pi) =
                    self.newest_payment(*user, |c| c["paid"] == true && c["refunded"] == false)
                {
                    let amount = if *full { None } else { Some(300) };
                    let refund = self.w.stripe.refund(&pi, amount);
                    self.note(format!("refund {pi} {amount:?}: {}", refund.is_ok()));
                }
            }
            Op::Dispute { user } => {
                if let Some(pi) = self.newest_payment(*user, |c| c["paid"] == true) {
                    let dispute = self.w.stripe.dispute(&pi);
                    self.note(format!("dispute {pi}: {dispute:?}"));
                }
            }
            Op::Inquiry { user } => {
                if let Some(pi) = self.newest_payment(*user, |c| c["paid"] == true) {
                    let inquiry = self.w.stripe.inquiry(&pi);
                    self.note(format!("inquiry {pi}: {inquiry:?}"));
                }
            }
            Op::Escalate { user } => {
                let (_, id) = self.user(*user);
                let pis = self.payments_of(id);
                let inquiry = self.w.stripe.disputes().into_iter().find(|d| {
                    d["status"] == "warning_needs_response"
                        && d["payment_intent"]
                            .as_str()
                            .is_some_and(|p| pis.contains(p))
                });
                if let Some(d) = inquiry {
                    let did = d["id"].as_str().unwrap_or_default();
                    let escalated = self.w.stripe.escalate(did);
                    self.note(format!("escalate {did}: {escalated:?}"));
                }
            }
            Op::FailRefund { user } => {
                let (_, id) = self.user(*user);
                let pis = self.payments_of(id);
                let refund = self.w.stripe.refunds().into_iter().rev().find(|r| {
                    r["status"] == "succeeded"
                        && r["payment_intent"]
                            .as_str()
                            .is_some_and(|p| pis.contains(p))
                });
                if let Some(r) = refund {
                    let rid = r["id"].as_str().unwrap_or_default();
                    let failed = self.w.stripe.fail_refund(rid);
                    self.note(format!("refund {rid} fails: {failed:?}"));
                }
            }
            Op::CloseDispute { user, won } => {
                let (_, id) = self.user(*user);
                let pis = self.payments_of(id);
                let open = self.w.stripe.disputes().into_iter().find(|d| {
                    matches!(
                        d["status"].as_str(),
                        Some("needs_response" | "warning_needs_response")
                    ) && d["payment_intent"]
                        .as_str()
                        .is_some_and(|p| pis.contains(p))
                });
                if let Some(d) = open {
                    let did = d["id"].as_str().unwrap_or_default();
                    let closed = self.w.stripe.close_dispute(did, *won);
                    self.note(format!("close dispute {did} won={won}: {closed:?}"));
                }
            }
            Op::Subscribe {
                user,
                cancel,
                same_second,
            } => self.subscribe(*user, *cancel, *same_second),
            Op::Deliver { pick, twice } => {
                if !self.pending.is_empty() {
                    let event = self.pending.remove(usize::from(*pick) % self.pending.len());
                    let answers = if *twice {
                        let (a, b) = tokio::join!(self.w.deliver(&event), self.w.deliver(&event));
                        vec![a, b]
                    } else {
                        vec![self.w.deliver(&event).await]
                    };
                    self.delivered(&event, &answers, false)?;
                }
            }
            Op::DeliverPair { a, b } => {
                if self.pending.len() >= 2 {
                    let first = self.pending.remove(usize::from(*a) % self.pending.len());
                    let second = self.pending.remove(usize::from(*b) % self.pending.len());
                    let (x, y) = tokio::join!(self.w.deliver(&first), self.w.deliver(&second));
                    self.delivered(&first, &[x], false)?;
                    self.delivered(&second, &[y], false)?;
                }
            }
            Op::DeliverAll { reversed } => self.deliver_all(*reversed).await?,
            Op::SameSecond { on } => {
                let t = on.then(fixtures::now);
                self.w.stripe.set_event_time(t);
            }
            Op::ExpireLeases => self.expire_leases().await,
            Op::AgeOrders { minutes } => {
                let minutes = i32::from(*minutes);
                self.w
                    .sql
                    .execute(
                        "update orders set created_at = created_at - make_interval(mins => $1),
                           checkout_expires_at = checkout_expires_at - make_interval(mins => $1)
                         where status = 'pending' and stripe_checkout_session_id is null",
                        &[&minutes],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Op::CrashMidCreate { user } => self.crash_mid_create(*user).await?,
            Op::ClickDuringPayment { user } => self.click_during_payment(*user).await?,
            Op::ClickRacesPayment { user } => self.click_races_payment(*user).await?,
            Op::DatabaseCut { user, pick } => {
                let (_, id) = self.user(*user);
                let id = id.to_owned();
                self.w.proxy.down();
                let click = self.w.click(&id).await;
                let event = (!self.pending.is_empty())
                    .then(|| self.pending.remove(usize::from(*pick) % self.pending.len()));
                let delivery = match &event {
                    Some(event) => Some(self.w.deliver(event).await),
                    None => None,
                };
                self.w.proxy.up();
                self.note(format!("database down: click {} {}", click.0, click.1));
                if click.0 != 503 || click.1["error"]["code"] != "store_unavailable" {
                    return Err(format!("click without a database: {click:?}"));
                }
                if let (Some(event), Some(answer)) = (event, delivery) {
                    self.delivered(&event, &[answer], true)?;
                }
            }
        }
        self.take_events();
        Ok(())
    }

    async fn db_clock(&self) -> String {
        self.w
            .sql
            .query_one("select clock_timestamp()::text", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default()
    }

    fn click_answer(
        &mut self,
        user: usize,
        t0: &str,
        (status, body): &Answer,
        cut: bool,
    ) -> Result<(), String> {
        self.note(format!("click {status} {body}"));
        match (*status, body["error"]["code"].as_str()) {
            (200, _) => {
                let session = body["session_id"].as_str().unwrap_or_default().to_owned();
                if !self.handed[user].contains(&session) {
                    self.handed[user].push(session);
                }
                self.clicks_ok.push((user, t0.to_owned()));
                Ok(())
            }
            (409, Some("already_paid" | "payment_processing" | "payment_disputed")) => Ok(()),
            // A crashed instance's lease is live: a clear, retryable answer.
            (503, Some("checkout_in_progress")) => Ok(()),
            (503, Some("store_unavailable")) if cut => Ok(()),
            _ => Err(format!("click answered {status}: {body}")),
        }
    }

    fn delivered(&mut self, event: &Value, answers: &[Answer], cut: bool) -> Result<(), String> {
        let mut taken = false;
        for (status, body) in answers {
            self.note(format!(
                "deliver {} {} -> {status} {}",
                event["type"].as_str().unwrap_or_default(),
                event["data"]["object"]["id"].as_str().unwrap_or_default(),
                body
            ));
            match status {
                200 => taken = true,
                503 if cut => {}
                _ => return Err(format!("webhook answered {status}: {body}")),
            }
        }
        if !taken {
            // Stripe delivers again later.
            self.pending.push(event.clone());
        }
        Ok(())
    }

    async fn deliver_all(&mut self, reversed: bool) -> Result<(), String> {
        for _ in 0..10 {
            self.take_events();
            if self.pending.is_empty() {
                return Ok(());
            }
            let mut batch = std::mem::take(&mut self.pending);
            if reversed {
                batch.reverse();
            }
            for event in batch {
                let answer = self.w.deliver(&event).await;
                self.delivered(&event, &[answer], false)?;
            }
        }
        Err("events keep coming back undelivered".into())
    }

    async fn expire_leases(&self) {
        let _ = self
            .w
            .sql
            .execute(
                "update orders set session_claimed_until = now() - interval '1 second'
                 where session_claimed_until is not null",
                &[],
            )
            .await;
    }

    fn payments_of(&self, user: &str) -> BTreeSet<String> {
        self.w
            .stripe
            .sessions()
            .into_iter()
            .filter(|s| s["client_reference_id"] == json!(user))
            .filter_map(|s| s["payment_intent"].as_str().map(str::to_owned))
            .collect()
    }

    fn newest_payment(&self, user: u8, want: impl Fn(&Value) -> bool) -> Option<String> {
        let (_, id) = self.user(user);
        let pis = self.payments_of(id);
        self.w
            .stripe
            .sessions()
            .into_iter()
            .rev()
            .filter_map(|s| s["payment_intent"].as_str().map(str::to_owned))
            .filter(|pi| pis.contains(pi))
            .find(|pi| self.w.stripe.charge(pi).is_some_and(|c| want(&c)))
    }

    fn subscribe(&mut self, user: u8, cancel: bool, same_second: bool) {
        let (i, id) = self.user(user);
        let id = id.to_owned();
        let n = self.timelines.len();
        let subscription = format!("sub_model_{n}");
        let customer = format!("cus_model_{n}");
        let t = fixtures::now() - 3600 + 20 * n as i64;
        let step = if same_second { 0 } else { 1 };
        let sub = |type_: &str, status: &str, created: i64| {
            let mut e = fixtures::load("stripe/customer.subscription.updated.dahlia.json");
            fixtures::set(&mut e, "/id", json!(fixtures::event_id()));
            fixtures::set(&mut e, "/type", json!(type_));
            fixtures::set(&mut e, "/created", json!(created));
            fixtures::set(&mut e, "/data/object/id", json!(subscription));
            fixtures::set(&mut e, "/data/object/customer", json!(customer));
            fixtures::set(&mut e, "/data/object/status", json!(status));
            e
        };
        let mut events = vec![
            sub("customer.subscription.created", "incomplete", t),
            sub("customer.subscription.updated", "active", t + step),
        ];
        let mut invoice = fixtures::load("stripe/invoice.paid.dahlia.json");
        fixtures::set(&mut invoice, "/id", json!(fixtures::event_id()));
        fixtures::set(&mut invoice, "/created", json!(t + step));
        fixtures::set(
            &mut invoice,
            "/data/object/id",
            json!(format!("in_model_{n}")),
        );
        fixtures::set(&mut invoice, "/data/object/customer", json!(customer));
        fixtures::set(
            &mut invoice,
            "/data/object/parent/subscription_details/subscription",
            json!(subscription),
        );
        events.push(invoice);
        let mut link = fixtures::checkout_event(
            "checkout.session.completed",
            &format!("cs_test_model_sub_{n}"),
            "",
            &id,
            "paid",
        );
        fixtures::set(&mut link, "/created", json!(t + step));
        fixtures::set(&mut link, "/data/object/mode", json!("subscription"));
        fixtures::set(&mut link, "/data/object/customer", json!(customer));
        events.push(link);
        let final_status = if cancel {
            events.push(sub("customer.subscription.updated", "past_due", t + 2));
            events.push(sub(
                "customer.subscription.deleted",
                "canceled",
                t + 2 + step,
            ));
            "canceled"
        } else {
            "active"
        };
        self.note(format!(
            "{subscription} of user {i}: {} events",
            events.len()
        ));
        self.pending.extend(events);
        self.timelines.push(Timeline {
            user: i,
            subscription,
            final_status,
        });
    }

    async fn crash_mid_create(&mut self, user: u8) -> Result<(), String> {
        let (_, id) = self.user(user);
        let uid: uuid::Uuid = id.parse().map_err(|_| "user id")?;
        let state = &self.w.checkouts[self.w.checkouts.len() - 1];
        let limits = BeginLimits {
            per_window: None,
            window_s: 60,
            lease_s: state.config.lease_s(),
            session_ttl_s: state.config.session_ttl_s,
        };
        let email = format!("{}@example.com", &id[..8]);
        let begun = state
            .store
            .checkout_begin(uid, FULL_REPORT, Some(&email), uuid::Uuid::new_v4(), limits)
            .await
            .map_err(|e| e.to_string())?;
        if let Begin::CreateSession { order } = begun {
            let mut metrics = state.metrics.start();
            let created =
                checkout::purchase::create_at_stripe(state, uid, &order, &mut metrics).await;
            self.note(format!(
                "crashed holding the lease of {} after creating {:?}",
                order.order_id,
                created.map(|s| s.id)
            ));
        } else {
            self.note(format!("no lease to take: {begun:?}"));
        }
        Ok(())
    }

    async fn click_during_payment(&mut self, user: u8) -> Result<(), String> {
        let (i, id) = self.user(user);
        let id = id.to_owned();
        let paying = |pending: &[Value]| {
            pending.iter().position(|e| {
                e["data"]["object"]["client_reference_id"] == json!(id)
                    && e["data"]["object"]["payment_status"] == "paid"
                    && e["type"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("checkout.session."))
            })
        };
        if paying(&self.pending).is_none() {
            // No payment of theirs in flight: the user pays their newest session now.
            if let Some(session) = self.handed[i].last().cloned() {
                let paid = self.w.stripe.pay(&session);
                self.note(format!("pay {session}: {paid:?}"));
                self.take_events();
            }
        }
        let Some(at) = paying(&self.pending) else {
            return Ok(());
        };
        let event = self.pending.remove(at);
        hold_payments(self.w, 300).await;
        let (delivery, (t0, click)) = tokio::join!(self.w.deliver(&event), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // The click starts now: the payment's transaction is open (held), not committed.
            (self.db_clock().await, self.w.click(&id).await)
        });
        hold_payments(self.w, 0).await;
        self.delivered(&event, &[delivery], false)?;
        self.click_answer(i, &t0, &click, false)
    }

    async fn click_races_payment(&mut self, user: u8) -> Result<(), String> {
        let (i, id) = self.user(user);
        let id = id.to_owned();
        let Some(at) = self.pending.iter().position(|e| {
            e["data"]["object"]["client_reference_id"] == json!(id)
                && e["data"]["object"]["payment_status"] == "paid"
                && e["type"] == "checkout.session.completed"
        }) else {
            return Ok(());
        };
        let event = self.pending.remove(at);
        self.w
            .stripe
            .delay_creates(Some(Duration::from_millis(400)));
        let t0 = self.db_clock().await;
        let (click, delivery) = tokio::join!(self.w.click(&id), async {
            tokio::time::sleep(Duration::from_millis(120)).await;
            self.w.deliver(&event).await
        });
        self.w.stripe.delay_creates(None);
        self.delivered(&event, &[delivery], false)?;
        self.click_answer(i, &t0, &click, false)
    }

    /// The invariants that hold at every moment (after every op).
    pub async fn check(&self) -> Result<(), String> {
        let w = self.w;
        // I1: at most one open session handed out per user; with a key, each one's order is
        // open. (A session created by an instance that died before attaching it never left
        // that instance: nobody can pay it. It is handed out once a later click attaches it.)
        for (i, sessions) in self.handed.iter().enumerate() {
            let open: Vec<&String> = sessions
                .iter()
                .filter(|s| w.stripe.session(s).is_some_and(|s| s["status"] == "open"))
                .collect();
            if open.len() > 1 {
                return Err(format!("I1: user {i} holds open sessions {open:?}"));
            }
            if !self.setup.webhook_key {
                continue;
            }
            // Paid means paid: a user who owns the report holds nothing left to pay.
            if !open.is_empty() && w.owns(&self.users[i]).await {
                return Err(format!(
                    "I1/I2: user {i} owns the report and holds open {open:?}"
                ));
            }
            for session in open {
                let row = query_json(
                    w,
                    &format!(
                        "select coalesce((select to_jsonb(o) from orders o
                      where stripe_checkout_session_id = '{session}'), 'null')"
                    ),
                )
                .await;
                if row["status"] != "pending" {
                    return Err(format!(
                        "I1: open session {session} of a closed order {row}"
                    ));
                }
            }
        }
        // I2: no click answered 200 while the user owned the product: an order paid before the
        // click and not refunded at that moment (a full refund revokes; its failure restores,
        // and then the click's session must be expired, I1 above).
        for (user, t0) in &self.clicks_ok {
            let late: i64 = scalar(
                w,
                &format!(
                    "select count(*) from orders o where o.user_id = '{}'::uuid
                   and o.status in ('paid', 'disputed') and o.paid_at < '{t0}'::timestamptz
                   and coalesce((select a.kind from payment_audit a
                                 where a.order_id = o.id and a.created_at < '{t0}'::timestamptz
                                   and a.kind in ('order_refunded', 'refund_reversed')
                                 order by a.created_at desc, a.id desc limit 1),
                                'refund_reversed') <> 'order_refunded'",
                    self.users[*user]
                ),
            )
            .await;
            if late > 0 {
                return Err(format!(
                    "I2: user {user} got a session after paying (click at {t0})"
                ));
            }
        }
        // I3: one order_paid per order; every duplicate audited.
        let broken: i64 = scalar(w, "select
            (select count(*) from (select order_id from payment_audit where kind = 'order_paid'
                                   group by order_id having count(*) > 1) x)
          + (select count(*) from orders o where duplicate_of is not null and not exists (
                select 1 from payment_audit a where a.order_id = o.id and a.kind = 'duplicate_payment'))").await;
        if broken > 0 {
            return Err("I3: a payment counted twice or a duplicate not audited".into());
        }
        // I4: the entitlement is true to the orders, the orders to what Stripe reported.
        let wrong = query_json(w, "select coalesce(jsonb_agg(x), '[]') from (
              select o.user_id, bool_or(o.status = 'paid') as paid, coalesce(e.active, false) as active
              from orders o left join entitlements e on e.user_id = o.user_id and e.product = o.product
              group by o.user_id, e.active
              having bool_or(o.status = 'paid') <> coalesce(e.active, false)) x").await;
        if wrong != json!([]) {
            return Err(format!("I4: entitlements differ from orders: {wrong}"));
        }
        let wrong = query_json(w, "select coalesce(jsonb_agg(x), '[]') from (
              select o.id, o.status, case
                when coalesce(p.fully_refunded, false) or exists (select 1 from disputes d
                  where d.payment_intent_id = o.stripe_payment_intent_id and d.status = 'lost') then 'refunded'
                when exists (select 1 from disputes d
                  where d.payment_intent_id = o.stripe_payment_intent_id and not d.closed and d.funds_withdrawn) then 'disputed'
                else 'paid' end as expected
              from orders o left join payments p on p.payment_intent_id = o.stripe_payment_intent_id
              where o.paid_at is not null) x where status <> expected").await;
        if wrong != json!([]) {
            return Err(format!("I4: orders differ from their payments: {wrong}"));
        }
        // I5: every unlocked report rests on a session of ours or one that sold the report.
        let sources = query_json(
            w,
            "select coalesce(jsonb_agg(o.stripe_checkout_session_id), '[]')
            from entitlements e join orders o on o.id::text = e.source
            where e.product = 'full_report' and e.active",
        )
        .await;
        for session in sources
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let ours = w
                .stripe
                .session(session)
                .is_some_and(|s| s["metadata"]["order_id"].is_string());
            let verified = w
                .stripe
                .line_item_prices(session)
                .iter()
                .any(|p| p == apps::PRICE);
            if !(ours || verified) {
                return Err(format!(
                    "I5: report unlocked by unverified session {session}"
                ));
            }
        }
        // I7: known customers' subscriptions and invoices carry their owner; the subscription
        // entitlement follows them.
        let orphans: i64 = scalar(w, "select
            (select count(*) from subscriptions s join stripe_customers c using (stripe_customer_id)
             where s.user_id is distinct from c.user_id)
          + (select count(*) from invoices i join stripe_customers c using (stripe_customer_id)
             where i.user_id is distinct from c.user_id)
          + (select count(*) from (select s.user_id, bool_or(s.status in ('active', 'trialing', 'past_due')) live
                 from subscriptions s where s.user_id is not null group by s.user_id) l
             left join entitlements e on e.user_id = l.user_id and e.product = 'subscription'
             where coalesce(e.active, false) <> l.live)").await;
        if orphans > 0 {
            return Err(
                "I7: a known customer's subscription, invoice or entitlement is off".into(),
            );
        }
        Ok(())
    }

    /// One user's payments for the report as Stripe holds them, against the database (I3, I4):
    /// whether the user owns the report (a payment stands) and whether one is under a chargeback.
    async fn money_of(&self, i: usize, user: &str) -> Result<(bool, bool), String> {
        let w = self.w;
        let charges = w.stripe.charges();
        let disputes = w.stripe.disputes();
        let mut kept = 0;
        let mut counted = Vec::new();
        let mut standing = false;
        let mut disputed = false;
        for session in w
            .stripe
            .sessions()
            .iter()
            .filter(|s| s["client_reference_id"] == json!(user))
        {
            let Some(pi) = session["payment_intent"].as_str() else {
                continue;
            };
            let sid = session["id"].as_str().unwrap_or_default();
            let ours = session["metadata"]["order_id"].is_string();
            let report = w
                .stripe
                .line_item_prices(sid)
                .iter()
                .any(|p| p == apps::PRICE);
            let counts = ours || (report && self.setup.webhook_key);
            let Some((_, charge)) = charges.iter().find(|(p, _)| p == pi) else {
                continue;
            };
            if !counts || charge["paid"] != true {
                continue;
            }
            counted.push(pi.to_owned());
            let of_this: Vec<&Value> = disputes
                .iter()
                .filter(|d| d["payment_intent"] == json!(pi))
                .collect();
            let lost = of_this.iter().any(|d| d["status"] == "lost");
            let open = of_this.iter().any(|d| d["status"] == "needs_response");
            let refunded = charge["refunded"] == true;
            let expected = if refunded || lost {
                "refunded"
            } else if open {
                "disputed"
            } else {
                "paid"
            };
            // Kept: the merchant holds the money. An open chargeback holds it for the
            // cardholder (Stripe refuses a refund meanwhile); a won one gives it back.
            if !refunded && !lost && !open {
                kept += 1;
            }
            standing |= expected == "paid";
            disputed |= expected == "disputed";
            let row = query_json(w, &format!(
                "select coalesce((select jsonb_build_object('status', status, 'audits',
                    (select count(*) from payment_audit a where a.order_id = o.id and a.kind = 'order_paid'))
                  from orders o where stripe_payment_intent_id = '{pi}'), 'null')"
            )).await;
            if row["status"] != json!(expected) || row["audits"] != json!(1) {
                return Err(format!(
                    "I4: payment {pi} is {expected} at Stripe, order {row}"
                ));
            }
        }
        if self.setup.webhook_key && self.setup.auto_refund && kept > 1 {
            return Err(format!("I3: user {i} kept {kept} payments for one report"));
        }
        // I3: a duplicate is refunded only while another payment stands: the webhook never
        // gives back every payment a user made.
        let by_webhook = w
            .stripe
            .refunds()
            .iter()
            .filter(|r| {
                r["metadata"]["refunded_by"] == "webhook"
                    && matches!(r["status"].as_str(), Some("succeeded" | "pending"))
                    && r["payment_intent"]
                        .as_str()
                        .is_some_and(|p| counted.iter().any(|c| c == p))
            })
            .filter_map(|r| r["payment_intent"].as_str().map(str::to_owned))
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if !counted.is_empty() && by_webhook >= counted.len() {
            return Err(format!(
                "I3: the webhook refunded all {by_webhook} payments of user {i}"
            ));
        }
        if w.owns(user).await != standing {
            return Err(format!(
                "I4: user {i} owns={} but Stripe says {standing}",
                !standing
            ));
        }
        Ok((standing, disputed))
    }

    /// Delivers everything, lets every lease run out, and compares the database with what the
    /// money at the fake says (I3-I7, I9); then decides the chargebacks still open (all won or
    /// all lost, as the setup says) and compares again.
    pub async fn finish(&mut self) -> Result<(), String> {
        self.w.stripe.set_event_time(None);
        self.deliver_all(false).await?;
        self.check().await?;
        let w = self.w;
        let mut money = Vec::new();
        for (i, user) in self.users.iter().enumerate() {
            money.push(self.money_of(i, user).await?);
        }
        let open: Vec<String> = w
            .stripe
            .disputes()
            .iter()
            .filter(|d| {
                matches!(
                    d["status"].as_str(),
                    Some("needs_response" | "warning_needs_response")
                )
            })
            .filter_map(|d| d["id"].as_str().map(str::to_owned))
            .collect();
        if !open.is_empty() {
            let won = self.setup.open_disputes_end_won;
            for id in &open {
                let closed = w.stripe.close_dispute(id, won);
                self.note(format!(
                    "at the end: close dispute {id} won={won}: {closed:?}"
                ));
            }
            self.deliver_all(false).await?;
            self.check().await?;
            money.clear();
            for (i, user) in self.users.iter().enumerate() {
                money.push(self.money_of(i, user).await?);
            }
        }
        let sessions = w.stripe.sessions();
        for (i, user) in self.users.clone().iter().enumerate() {
            let (standing, disputed) = money[i];
            // I9: nobody is locked out: once leases ran out, a click is answered for good.
            self.expire_leases().await;
            let t0 = self.db_clock().await;
            let answer = w.click(user).await;
            self.click_answer(i, &t0, &answer, false)?;
            let code = answer.1["error"]["code"].as_str().unwrap_or("ok");
            let processing = sessions.iter().any(|s| {
                s["client_reference_id"] == json!(user)
                    && s["status"] == "complete"
                    && s["payment_status"] == "unpaid"
                    && s["metadata"]["order_id"].is_string()
                    && w.stripe
                        .charge(s["payment_intent"].as_str().unwrap_or_default())
                        .is_some_and(|c| c["status"] == "pending")
            });
            let want = if standing {
                "already_paid"
            } else if disputed {
                "payment_disputed"
            } else if processing {
                "payment_processing"
            } else {
                "ok"
            };
            if code != want {
                return Err(format!(
                    "I9: user {i} clicked and got {answer:?}, expected {want}"
                ));
            }
            if code == "ok" {
                let session = answer.1["session_id"].as_str().unwrap_or_default();
                if w.stripe
                    .session(session)
                    .is_none_or(|s| s["status"] != "open")
                {
                    return Err(format!(
                        "I9: user {i} was handed a session that is not open: {session}"
                    ));
                }
            }
        }
        // I6/I7: every subscription ended as its newest event says, owned by its user.
        for t in &self.timelines {
            let row = query_json(
                w,
                &format!(
                    "select coalesce((select jsonb_build_object('status', status, 'user', user_id)
                  from subscriptions where id = '{}'), 'null')",
                    t.subscription
                ),
            )
            .await;
            if row["status"] != json!(t.final_status) || row["user"] != json!(self.users[t.user]) {
                return Err(format!(
                    "I6/I7: {} is {row}, expected {} of user {}",
                    t.subscription, t.final_status, t.user
                ));
            }
        }
        for (i, user) in self.users.iter().enumerate() {
            let live = self
                .timelines
                .iter()
                .any(|t| t.user == i && LIVE.contains(&t.final_status));
            let has = self.timelines.iter().any(|t| t.user == i);
            let active: Option<bool> = w.sql.query_opt(
                "select active from entitlements where user_id = $1::text::uuid and product = 'subscription'",
                &[user],
            ).await.map_err(|e| e.to_string())?.map(|r| r.get(0));
            if has && active != Some(live) {
                return Err(format!(
                    "I7: user {i} subscription entitlement {active:?}, expected {live}"
                ));
            }
        }
        Ok(())
    }
}

/// Makes every transaction that marks an order paid hold for `ms` before it commits (0: off).
pub async fn hold_payments(w: &World, ms: i32) {
    let _ = w
        .sql
        .execute("update public.test_hold set ms = $1", &[&ms])
        .await;
}

/// Installs the hold that [`hold_payments`] switches (once per database).
pub async fn install_hold(w: &World) {
    w.sql
        .batch_execute(
            "create table if not exists public.test_hold (ms integer not null);
             insert into public.test_hold select 0 where not exists (select 1 from public.test_hold);
             create or replace function public.test_hold_paid() returns trigger language plpgsql as $$
             declare v integer;
             begin select ms into v from public.test_hold; if v > 0 then perform pg_sleep(v / 1000.0); end if;
                   return new; end $$;
             drop trigger if exists test_hold_paid on public.orders;
             create trigger test_hold_paid after update on public.orders for each row
             when (new.status = 'paid' and old.status is distinct from 'paid')
             execute function public.test_hold_paid();",
        )
        .await
        .expect("install the hold");
}

async fn scalar(w: &World, sql: &str) -> i64 {
    w.sql
        .query_one(sql, &[])
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn query_json(w: &World, sql: &str) -> Value {
    w.sql
        .query_one(sql, &[])
        .await
        .map(|r| r.get::<_, Option<Value>>(0).unwrap_or(Value::Null))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}
