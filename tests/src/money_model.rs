//! The model-based money test's operations and its checks (docs/payments.md).
//!
//! A case is a sequence of [`Op`]s run against a [`World`]: the real SQL functions, both
//! handlers, the reconciler and the fake Stripe. Stripe's events wait in `pending` until an op
//! delivers them (late, twice at once, two at once, in the same second) or loses them for good.
//! After every op [`Run::check`] tests what must hold at every moment (the decisions stored on
//! orders and entitlements equal the decisions over the stored facts; one payable session; I2
//! at each click); at the end, once every event was delivered or the reconciler ran,
//! [`Run::finish`] compares the database with what Stripe's objects say: every fact, and every
//! decision against the reference model (`money_reference`).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};
use shared::store::orders::{Begin, BeginLimits, FULL_REPORT};

use crate::apps;
use crate::fixtures;
use crate::money::{Answer, Setup, World};
use crate::money_reference::{self, Purchase};

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
    /// A subscription bought through Checkout (created, the session naming its owner, active,
    /// its first invoice), maybe canceled later: events delivered by other ops.
    Subscribe { user: u8, cancel: bool },
    /// Stripe keeps a 500 under the key of the next expiry (or refund) it is asked for.
    StoredFailure { refund: bool },
    /// Stripe gives up delivering pending event `pick`: only the reconciler can find it.
    LoseEvent { pick: u8 },
    /// The reconciler runs.
    Reconcile,
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

/// A subscription and whose it is.
struct Timeline {
    user: usize,
    subscription: String,
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
    /// Events Stripe gave up delivering: the end needs the reconciler.
    lost: usize,
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
            lost: 0,
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
                    self.click_answer(i, &t0, answer, false).await?;
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
            Op::Subscribe { user, cancel } => self.subscribe(*user, *cancel),
            Op::StoredFailure { refund } => {
                if *refund {
                    self.w.stripe.fail_next_refunds(1);
                } else {
                    self.w.stripe.fail_next_expires(1);
                }
            }
            Op::LoseEvent { pick } => {
                if !self.pending.is_empty() {
                    let event = self.pending.remove(usize::from(*pick) % self.pending.len());
                    self.lost += 1;
                    self.note(format!(
                        "lost {} {}",
                        event["type"].as_str().unwrap_or_default(),
                        event["data"]["object"]["id"].as_str().unwrap_or_default()
                    ));
                }
            }
            Op::Reconcile => {
                let report = reconcile::handle(&self.w.reconciler, None, None)
                    .await
                    .map_err(|e| format!("the reconciler failed: {e}"))?;
                self.note(format!("reconciled: {report:?}"));
            }
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

    /// Checks a click's answer; I2: a click answered 200 never finds the user owning the report
    /// since before it started (the entitlement active and unchanged since before `t0`).
    async fn click_answer(
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
                let owned: i64 = scalar(
                    self.w,
                    &format!(
                        "select count(*) from entitlements where user_id = '{}'::uuid
                         and product = 'full_report' and active and updated_at < '{t0}'::timestamptz",
                        self.users[user]
                    ),
                )
                .await;
                if owned > 0 {
                    return Err(format!(
                        "I2: user {user} got a session while owning the report (click at {t0})"
                    ));
                }
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

    fn subscribe(&mut self, user: u8, cancel: bool) {
        let (i, id) = self.user(user);
        let subscription = self.w.stripe.subscribe(id, "price_monthly_plan");
        if cancel {
            let canceled = self
                .w
                .stripe
                .set_subscription_status(&subscription, "canceled");
            self.note(format!("{subscription} canceled: {canceled:?}"));
        }
        self.note(format!("{subscription} of user {i}"));
        self.timelines.push(Timeline {
            user: i,
            subscription,
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
        self.click_answer(i, &t0, &click, false).await
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
        self.click_answer(i, &t0, &click, false).await
    }

    /// The invariants that hold at every moment (after every op).
    pub async fn check(&self) -> Result<(), String> {
        let w = self.w;
        // I1: at most one open session handed out per user, its order open; a user who owns the
        // report or has a payment in flight holds nothing left to pay (unless its expiry failed
        // for now and is being retried).
        for (i, sessions) in self.handed.iter().enumerate() {
            let open: Vec<&String> = sessions
                .iter()
                .filter(|s| w.stripe.session(s).is_some_and(|s| s["status"] == "open"))
                .collect();
            if open.len() > 1 {
                return Err(format!("I1: user {i} holds open sessions {open:?}"));
            }
            let blocked: bool = w
                .sql
                .query_one(
                    "select owns or in_flight from billing.ownership($1::text::uuid, 'full_report')",
                    &[&self.users[i]],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            for session in open {
                let retrying: i64 = scalar(
                    w,
                    &format!(
                        "select count(*) from internal.stripe_actions where kind = 'expire'
                     and object_id = '{session}' and last_error is not null"
                    ),
                )
                .await;
                if blocked && retrying == 0 {
                    return Err(format!(
                        "I1/I2: user {i} owns the report (or pays) and holds open {session}"
                    ));
                }
                let row = query_json(
                    w,
                    &format!(
                        "select coalesce((select to_jsonb(o) from orders o
                      where stripe_checkout_session_id = '{session}'), 'null')"
                    ),
                )
                .await;
                if !row["closed_reason"].is_null() {
                    return Err(format!(
                        "I1: open session {session} of a closed order {row}"
                    ));
                }
            }
        }
        // I3: one order_paid per order.
        let twice: i64 = scalar(
            w,
            "select count(*) from (select order_id from payment_audit
            where kind = 'order_paid' group by order_id having count(*) > 1) x",
        )
        .await;
        if twice > 0 {
            return Err("I3: a payment counted twice".into());
        }
        // I4: what is stored on orders and entitlements is the decision over the stored facts.
        let wrong = query_json(
            w,
            "select coalesce(jsonb_agg(x), '[]') from (
              select o.id, o.status, d.status as decided, o.closed_reason,
                     d.closed_reason as decided_closed
              from orders o cross join lateral billing.order_decision(o) d
              where o.status is distinct from d.status
                 or o.closed_reason is distinct from d.closed_reason) x",
        )
        .await;
        if wrong != json!([]) {
            return Err(format!(
                "I4: orders differ from the decisions over the facts: {wrong}"
            ));
        }
        let wrong = query_json(
            w,
            "select coalesce(jsonb_agg(x), '[]') from (
              select u.id, coalesce(e.active, false) as active, w.owns
              from auth.users u
              cross join lateral billing.ownership(u.id, 'full_report') w
              left join entitlements e on e.user_id = u.id and e.product = 'full_report'
              where coalesce(e.active, false) <> w.owns) x",
        )
        .await;
        if wrong != json!([]) {
            return Err(format!(
                "I4: entitlements differ from the decisions: {wrong}"
            ));
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
            let sells = w
                .stripe
                .line_item_prices(session)
                .iter()
                .any(|p| p == apps::PRICE);
            if !(ours || sells) {
                return Err(format!("I5: report unlocked by session {session}"));
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

    /// A user's purchases of the report as Stripe's objects say (the reference model's input):
    /// completed payment-mode sessions of ours, or of a Payment Link that sells the report.
    fn purchases_of(&self, user: &str) -> Vec<Purchase> {
        let w = self.w;
        let disputes = w.stripe.disputes();
        let refunds = w.stripe.refunds();
        w.stripe
            .sessions()
            .iter()
            .filter(|s| {
                s["client_reference_id"] == json!(user)
                    && s["mode"] == "payment"
                    && s["status"] == "complete"
            })
            .filter(|s| {
                let sid = s["id"].as_str().unwrap_or_default();
                s["metadata"]["order_id"].is_string()
                    || w.stripe
                        .line_item_prices(sid)
                        .iter()
                        .any(|p| p == apps::PRICE)
            })
            .map(|s| {
                let pi = s["payment_intent"].as_str().map(str::to_owned);
                let intent = pi.as_deref().and_then(|pi| w.stripe.payment_intent(pi));
                let charge = pi.as_deref().and_then(|pi| w.stripe.charge(pi));
                Purchase {
                    session: s["id"].as_str().unwrap_or_default().to_owned(),
                    session_paid: matches!(
                        s["payment_status"].as_str(),
                        Some("paid" | "no_payment_required")
                    ),
                    intent_status: intent
                        .as_ref()
                        .and_then(|i| i["status"].as_str().map(str::to_owned)),
                    refunded: charge.as_ref().is_some_and(|c| c["refunded"] == true),
                    disputes: disputes
                        .iter()
                        .filter(|d| pi.is_some() && d["payment_intent"] == json!(pi))
                        .filter_map(|d| d["status"].as_str().map(str::to_owned))
                        .collect(),
                    refund_waiting: refunds.iter().any(|r| {
                        pi.is_some()
                            && r["payment_intent"] == json!(pi)
                            && r["status"] == "requires_action"
                    }),
                    made_at: intent
                        .as_ref()
                        .and_then(|i| i["created"].as_i64())
                        .or_else(|| s["created"].as_i64())
                        .unwrap_or_default(),
                    payment_intent: pi,
                }
            })
            .collect()
    }

    /// The database says what Stripe's objects say: every fact the database should know equals
    /// the object at the fake, and every decision equals the reference model's. Returns, per
    /// user, the verdict.
    async fn compare_with_stripe(&self) -> Result<Vec<money_reference::Verdict>, String> {
        let w = self.w;
        let mut verdicts = Vec::new();
        for (i, user) in self.users.iter().enumerate() {
            let purchases = self.purchases_of(user);
            for p in &purchases {
                let row = query_json(w, &format!(
                    "select coalesce((select jsonb_build_object('session', s.status,
                       'payment_status', s.payment_status, 'intent', p.status,
                       'refunded', p.refunded, 'amount_refunded', p.amount_refunded,
                       'order', o.status)
                     from stripe_sessions s left join stripe_payments p on p.id = s.payment_intent_id
                     left join orders o on o.stripe_checkout_session_id = s.id
                     where s.id = '{}'), 'null')", p.session)).await;
                let charge = p
                    .payment_intent
                    .as_deref()
                    .and_then(|pi| w.stripe.charge(pi));
                let want = json!({
                    "session": "complete",
                    "payment_status": w.stripe.session(&p.session).map(|s| s["payment_status"].clone()),
                    "intent": p.intent_status,
                    "refunded": charge.as_ref().map(|c| c["refunded"].clone()),
                    "amount_refunded": charge.as_ref().map(|c| c["amount_refunded"].clone()),
                    "order": money_reference::money(p).order_status(),
                });
                if row != want {
                    return Err(format!(
                        "facts: user {i}'s purchase {} is {row} in the database, Stripe says {want}",
                        p.session
                    ));
                }
            }
            // Refunds and disputes of those payments, one by one.
            for p in purchases.iter().filter(|p| p.payment_intent.is_some()) {
                let pi = p.payment_intent.as_deref().unwrap_or_default();
                for refund in w
                    .stripe
                    .refunds()
                    .iter()
                    .filter(|r| r["payment_intent"] == json!(pi))
                {
                    let id = refund["id"].as_str().unwrap_or_default();
                    let stored = query_json(w, &format!(
                        "select coalesce((select to_jsonb(status) from stripe_refunds where id = '{id}'), 'null')")).await;
                    if stored != refund["status"] {
                        return Err(format!(
                            "facts: refund {id} is {stored} in the database, Stripe says {}",
                            refund["status"]
                        ));
                    }
                }
                for dispute in w
                    .stripe
                    .disputes()
                    .iter()
                    .filter(|d| d["payment_intent"] == json!(pi))
                {
                    let id = dispute["id"].as_str().unwrap_or_default();
                    let stored = query_json(w, &format!(
                        "select coalesce((select to_jsonb(status) from stripe_disputes where id = '{id}'), 'null')")).await;
                    if stored != dispute["status"] {
                        return Err(format!(
                            "facts: dispute {id} is {stored} in the database, Stripe says {}",
                            dispute["status"]
                        ));
                    }
                }
            }
            let verdict = money_reference::verdict(&purchases);
            if w.owns(user).await != verdict.owns {
                return Err(format!(
                    "I4: user {i} owns={} but Stripe's objects say {}",
                    !verdict.owns, verdict.owns
                ));
            }
            let source = query_json(w, &format!(
                "select coalesce((select to_jsonb(o.stripe_checkout_session_id) from entitlements e
                   join orders o on o.id::text = e.source
                   where e.user_id = '{user}'::uuid and e.product = 'full_report' and e.active), 'null')")).await;
            if source != json!(verdict.standing) {
                return Err(format!(
                    "I3: user {i}'s report rests on {source}, the reference says {:?}",
                    verdict.standing
                ));
            }
            // I3: with automatic refunds, the merchant keeps one payment (an open chargeback's
            // money is the cardholder's); and the webhook never gives back every payment.
            if self.setup.auto_refund && !verdict.refunds_due.is_empty() {
                return Err(format!(
                    "I3: user {i} kept payments due for a refund: {:?}",
                    verdict.refunds_due
                ));
            }
            let paid: Vec<&str> = purchases
                .iter()
                .filter(|p| p.intent_status.as_deref() == Some("succeeded"))
                .filter_map(|p| p.payment_intent.as_deref())
                .collect();
            let by_webhook: BTreeSet<String> = w
                .stripe
                .refunds()
                .iter()
                .filter(|r| {
                    r["metadata"]["refunded_by"] == "webhook"
                        && matches!(r["status"].as_str(), Some("succeeded" | "pending"))
                        && r["payment_intent"]
                            .as_str()
                            .is_some_and(|pi| paid.contains(&pi))
                })
                .filter_map(|r| r["payment_intent"].as_str().map(str::to_owned))
                .collect();
            if !paid.is_empty() && by_webhook.len() >= paid.len() {
                return Err(format!(
                    "I3: the webhook refunded all {} payments of user {i}",
                    paid.len()
                ));
            }
            verdicts.push(verdict);
        }
        // Subscriptions and invoices as Stripe holds them, owned by their users (I6, I7).
        for t in &self.timelines {
            let Some(sub) = w.stripe.subscription(&t.subscription) else {
                continue;
            };
            let row =
                query_json(
                    w,
                    &format!(
                "select coalesce((select jsonb_build_object('status', status, 'user', user_id)
                  from subscriptions where id = '{}'), 'null')", t.subscription),
                )
                .await;
            if row != json!({"status": sub["status"], "user": self.users[t.user]}) {
                return Err(format!(
                    "I6/I7: {} is {row}, Stripe says {} of user {}",
                    t.subscription, sub["status"], t.user
                ));
            }
        }
        for (i, user) in self.users.iter().enumerate() {
            let live = self.timelines.iter().any(|t| {
                t.user == i
                    && w.stripe
                        .subscription(&t.subscription)
                        .is_some_and(|s| LIVE.contains(&s["status"].as_str().unwrap_or_default()))
            });
            let has = self.timelines.iter().any(|t| t.user == i);
            let active: Option<bool> = w.sql.query_opt(
                "select active from entitlements where user_id = $1::text::uuid and product = 'subscription'",
                &[user],
            ).await.map_err(|e| e.to_string())?.map(|r| r.get(0));
            if has && active != Some(live) {
                return Err(format!(
                    "I7: user {i} subscription entitlement {active:?}, Stripe says {live}"
                ));
            }
        }
        Ok(verdicts)
    }

    /// Brings the database up to date with Stripe: every pending event delivered (in Stripe's
    /// order), or, when some were lost or the setup says so, one reconciler run instead.
    async fn catch_up(&mut self) -> Result<(), String> {
        self.take_events();
        if self.lost > 0 || self.setup.finish_by_reconciler {
            let lost = std::mem::take(&mut self.pending);
            self.note(format!(
                "catch up through the reconciler ({} pending)",
                lost.len()
            ));
            let report = reconcile::handle(&self.w.reconciler, None, None)
                .await
                .map_err(|e| format!("the reconciler failed: {e}"))?;
            self.note(format!("reconciled: {report:?}"));
            if !report.failures.is_empty() {
                return Err(format!("the reconciler left {:?}", report.failures));
            }
            // What its own actions emitted is news of what it already stored.
            self.w.stripe.take_events();
            Ok(())
        } else {
            self.deliver_all(false).await
        }
    }

    /// Catches up, compares the database with Stripe's objects, decides the chargebacks still
    /// open (all won or all lost, as the setup says), catches up and compares again; then one
    /// click per user gets the answer their money says (I9).
    pub async fn finish(&mut self) -> Result<(), String> {
        self.w.stripe.set_event_time(None);
        self.catch_up().await?;
        self.check().await?;
        let mut verdicts = self.compare_with_stripe().await?;
        let w = self.w;
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
            self.catch_up().await?;
            self.check().await?;
            verdicts = self.compare_with_stripe().await?;
        }
        for (i, user) in self.users.clone().iter().enumerate() {
            let verdict = &verdicts[i];
            // I9: nobody is locked out: once leases ran out, a click is answered for good.
            self.expire_leases().await;
            let t0 = self.db_clock().await;
            let answer = w.click(user).await;
            self.click_answer(i, &t0, &answer, false).await?;
            let code = answer.1["error"]["code"].as_str().unwrap_or("ok");
            let want = if verdict.owns {
                "already_paid"
            } else if verdict.in_flight {
                "payment_processing"
            } else if verdict.disputed {
                "payment_disputed"
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
