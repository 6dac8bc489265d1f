//! The one path from "something changed at Stripe" to the database and back: read the objects
//! a target names, store them (one database round trip, which also settles the purchases they
//! concern and answers what is due), carry out what is due (refunds, expiries), and store what
//! that changed. The webhook runs it for every delivery, checkout for a session it finds
//! finished, the reconciler for whatever may have been missed.

use std::time::Duration;

use super::act;
use super::facts::{Facts, RefundFact, SessionFact};
use super::read::{Read, Reader};
use super::target::Target;
use crate::clock::Clock;
use crate::store::payments::{ActionFailure, Delivery, ExpiryDue, Recorded, RefundDue};
use crate::store::{Store, StoreError};
use crate::stripe::client::StripeError;

/// Rounds of actions one sync makes (an action's result can make another one due: a refund
/// that fails at once, a won dispute).
const ACTION_ROUNDS: usize = 2;

/// Runs syncs.
#[derive(Clone, Copy, Debug)]
pub struct Syncer<'a> {
    pub store: &'a Store,
    pub reader: Reader<'a>,
    pub clock: Clock,
    /// Make the refunds that are due (the webhook and the reconciler, unless
    /// `AUTO_REFUND_DUPLICATES=false`); checkout leaves them to those.
    pub refunds: bool,
}

/// Why a sync could not store what it read.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stripe could not be read now: nothing was stored.
    #[error("Stripe read failed: {0}")]
    Stripe(#[from] StripeError),
}

/// What a sync did: for the answer, the metrics and the logs.
#[derive(Debug, Default)]
pub struct Synced {
    /// The first record's answer: the event's outcome.
    pub recorded: Option<Recorded>,
    /// Stored objects that changed, over every record.
    pub changed: u32,
    pub refunds_made: u32,
    /// Refunds still due after Stripe refused them and the payment was read again: for a person.
    pub refunds_refused: Vec<(RefundDue, String)>,
    /// Refunds due that this caller does not make.
    pub refunds_left: Vec<RefundDue>,
    pub sessions_expired: u32,
    /// An action failed for now: answering so that the event comes again.
    pub unavailable: Option<StripeError>,
    /// Stripe errors met (for metrics by class).
    pub stripe_errors: Vec<&'static str>,
    pub stripe_time: Duration,
}

impl Synced {
    fn absorb(&mut self, recorded: Recorded) {
        self.changed += recorded.changed;
        if self.recorded.is_none() {
            self.recorded = Some(recorded);
        }
    }

    fn stripe_error(&mut self, error: &StripeError) {
        self.stripe_errors.push(error.class());
    }
}

impl Syncer<'_> {
    /// Reads `target` (nothing for an event the app does not act on), stores it with
    /// `delivery`, and carries out what is due. `buyer_waits`: a session of another channel and
    /// its user, whose clicks see a payment in flight while it is read.
    pub async fn sync(
        &self,
        delivery: Option<Delivery<'_>>,
        target: Option<&Target>,
        buyer_waits: Option<(&str, &str)>,
    ) -> Result<Synced, SyncError> {
        let mut synced = Synced::default();
        let sells_known = match buyer_waits {
            Some((session, user)) => self.store.stripe_sync_begin(session, user).await?,
            None => None,
        };
        let read = match target {
            Some(target) => {
                let read = self
                    .reader
                    .read(target, self.clock.unix_ms(), sells_known)
                    .await;
                match read {
                    Ok(read) => Some(read),
                    Err(e) => {
                        synced.stripe_error(&e);
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        if let Some(read) = &read {
            synced.stripe_time += read.elapsed;
        }
        let facts = read.as_ref().map(|r| (&r.facts, r.missing.as_deref()));
        let recorded = self.record(delivery, facts, &[]).await?;
        let due = (recorded.refunds.clone(), recorded.expiries.clone());
        synced.absorb(recorded);
        self.act(due, &mut synced).await?;
        Ok(synced)
    }

    /// Carries out refunds and expiries a caller was told are due (checkout's
    /// `expire_first`, a session attached when it must not be paid).
    pub async fn carry_out(
        &self,
        refunds: Vec<RefundDue>,
        expiries: Vec<ExpiryDue>,
    ) -> Result<Synced, SyncError> {
        let mut synced = Synced::default();
        self.act((refunds, expiries), &mut synced).await?;
        Ok(synced)
    }

    /// Stores facts; a unique violation means another transaction got there first, and the call
    /// is made once more (it is one transaction: nothing of the first try remains).
    async fn record(
        &self,
        delivery: Option<Delivery<'_>>,
        facts: Option<(&Facts, Option<&str>)>,
        failures: &[ActionFailure],
    ) -> Result<Recorded, StoreError> {
        match self
            .store
            .record_stripe_facts(delivery, facts, failures)
            .await
        {
            Err(StoreError::Conflict(detail)) => {
                tracing::warn!(detail, "unique violation; storing again");
                self.store
                    .record_stripe_facts(delivery, facts, failures)
                    .await
            }
            other => other,
        }
    }

    /// Carries out the refunds and expiries due, stores what Stripe answered (the refunded
    /// payment read again), and goes on with what is due then.
    async fn act(
        &self,
        (mut refunds, mut expiries): (Vec<RefundDue>, Vec<ExpiryDue>),
        synced: &mut Synced,
    ) -> Result<(), SyncError> {
        let stripe = self.reader.stripe;
        let mut refused: Vec<(RefundDue, String)> = Vec::new();
        for _ in 0..ACTION_ROUNDS {
            if !self.refunds {
                synced.refunds_left = std::mem::take(&mut refunds);
            }
            if !refunds.is_empty() {
                refunds = self.confirm_standing(refunds, synced).await?;
            }
            if refunds.is_empty() && expiries.is_empty() {
                break;
            }
            let mut facts = Facts::at(self.clock.unix_ms());
            let mut failures = Vec::new();
            for due in &expiries {
                if due.attempt > act::MAX_ATTEMPTS {
                    tracing::error!(session = %due.session_id, attempts = due.attempt - 1,
                        "Stripe keeps refusing to expire a session that must not be paid; see the runbook");
                    continue;
                }
                let acted = act::expire(stripe, due).await;
                synced.stripe_time += acted.elapsed;
                failures.extend(acted.spent);
                match acted.result {
                    Ok((session, _))
                        if session.status
                            == Some(crate::stripe::events::SessionStatus::Expired) =>
                    {
                        synced.sessions_expired += 1;
                        facts.sessions.push(SessionFact::of(&session, None));
                    }
                    Ok((session, _)) => {
                        // Paid (or still open) before it could be expired: read it whole, its
                        // payment with it, as any session is read.
                        let target = Target::Session(session.id.clone());
                        match self.reader.read(&target, self.clock.unix_ms(), None).await {
                            Ok(read) => {
                                synced.stripe_time += read.elapsed;
                                facts.extend(read.facts);
                            }
                            Err(e) => {
                                synced.stripe_error(&e);
                                if e.is_transient() {
                                    synced.unavailable.get_or_insert(e);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        synced.stripe_error(&e);
                        tracing::warn!(session = %due.session_id, error = %e, "could not expire a session that must not be paid");
                        if e.is_transient() {
                            synced.unavailable.get_or_insert(e);
                        }
                    }
                }
            }
            for due in &refunds {
                if due.attempt > act::MAX_ATTEMPTS {
                    // Stripe keeps refusing this one: a person refunds it (runbook), the alarm
                    // holds until then.
                    refused.push((
                        due.clone(),
                        format!("{} idempotency keys spent", due.attempt - 1),
                    ));
                    continue;
                }
                let acted = act::refund(stripe, due).await;
                synced.stripe_time += acted.elapsed;
                failures.extend(acted.spent);
                match acted.result {
                    Ok((refund, attempt)) if !refund.is_dead() => {
                        synced.refunds_made += 1;
                        tracing::warn!(order_id = %due.order_id, refund = %refund.id,
                            status = refund.status.as_deref().unwrap_or(""), "refunded a duplicate payment");
                        // Stripe replays a key's first answer: a refund that failed since shows
                        // as it was. The payment read again says how it is; a dead one spends
                        // the key.
                        self.reread(&due.payment_intent_id, &mut facts, synced)
                            .await?;
                        if facts.refunds.iter().any(|r| r.id == refund.id && dead(r)) {
                            failures.push(ActionFailure {
                                kind: crate::store::payments::ActionKind::Refund,
                                object_id: due.payment_intent_id.clone(),
                                attempt,
                                error: "the refund under this key failed since".into(),
                            });
                        }
                    }
                    Ok(_) => {
                        // Every key of this run gave a refund that failed at once.
                        refused.push((due.clone(), "every refund made failed at once".into()));
                        self.reread(&due.payment_intent_id, &mut facts, synced)
                            .await?;
                    }
                    Err(e) if e.is_transient() => {
                        synced.stripe_error(&e);
                        tracing::error!(order_id = %due.order_id, error = %e, "the duplicate's refund failed for now; it is made again");
                        synced.unavailable.get_or_insert(e);
                    }
                    Err(e) => {
                        // Refused (already refunded, charged back, ...): the payment read again
                        // says whether anything is still due.
                        synced.stripe_error(&e);
                        tracing::warn!(order_id = %due.order_id, error = %e, "Stripe refused a duplicate's refund; reading the payment again");
                        refused.push((due.clone(), e.to_string()));
                        self.reread(&due.payment_intent_id, &mut facts, synced)
                            .await?;
                    }
                }
            }
            if facts.is_empty() && failures.is_empty() {
                break;
            }
            let recorded = self.record(None, Some((&facts, None)), &failures).await?;
            synced.changed += recorded.changed;
            // What is due now, less what this run could not do (the next delivery or the
            // reconciler tries again, under the next key).
            let tried_refunds: Vec<String> = refunds
                .iter()
                .map(|r| r.payment_intent_id.clone())
                .collect();
            let tried_expiries: Vec<String> =
                expiries.iter().map(|e| e.session_id.clone()).collect();
            let still_refused = recorded.refunds.clone();
            refunds = recorded
                .refunds
                .into_iter()
                .filter(|r| !tried_refunds.contains(&r.payment_intent_id))
                .collect();
            expiries = recorded
                .expiries
                .into_iter()
                .filter(|e| !tried_expiries.contains(&e.session_id))
                .collect();
            refused.retain(|(due, _)| {
                still_refused
                    .iter()
                    .any(|r| r.payment_intent_id == due.payment_intent_id)
            });
        }
        synced.refunds_refused = refused;
        Ok(())
    }

    /// Reads the payments that stand against the refunds due again and stores them, and answers
    /// what is due then. Which payment is a duplicate was decided over stored facts, and the one
    /// that stands is only as fresh as its last event: a Dashboard refund or a chargeback of it
    /// whose event is late would otherwise have its duplicate refunded too, leaving the merchant
    /// nothing. A refund whose standing payment cannot be read now is left to the next run.
    async fn confirm_standing(
        &self,
        refunds: Vec<RefundDue>,
        synced: &mut Synced,
    ) -> Result<Vec<RefundDue>, SyncError> {
        let mut standing: Vec<&str> = refunds
            .iter()
            .filter_map(|r| r.standing.as_deref())
            .collect();
        standing.sort_unstable();
        standing.dedup();
        if standing.is_empty() {
            return Ok(refunds);
        }
        let mut facts = Facts::at(self.clock.unix_ms());
        let mut unread: Vec<String> = Vec::new();
        for pi in standing {
            let mut read = Read::default();
            match self.reader.payment(pi, &mut read).await {
                Ok(()) => {
                    synced.stripe_time += read.elapsed;
                    facts.extend(read.facts);
                }
                Err(e) => {
                    synced.stripe_error(&e);
                    tracing::warn!(payment_intent = pi, error = %e,
                        "could not read the payment that stands; its duplicate's refund waits");
                    if e.is_transient() {
                        synced.unavailable.get_or_insert(e);
                    }
                    unread.push(pi.to_owned());
                }
            }
        }
        let unconfirmed = |r: &RefundDue| r.standing.as_ref().is_some_and(|pi| unread.contains(pi));
        if facts.is_empty() {
            return Ok(refunds.into_iter().filter(|r| !unconfirmed(r)).collect());
        }
        let recorded = self.record(None, Some((&facts, None)), &[]).await?;
        synced.changed += recorded.changed;
        // What is due now, for the purchases read; a refund due with no standing payment named
        // (none expected: a duplicate has one) is kept as it was.
        let mut due: Vec<RefundDue> = recorded
            .refunds
            .into_iter()
            .filter(|r| !unconfirmed(r))
            .collect();
        due.extend(refunds.into_iter().filter(|r| r.standing.is_none()));
        Ok(due)
    }

    /// Reads a payment again into `facts` (after a refund call): a failure to read leaves it to
    /// the next run.
    async fn reread(
        &self,
        pi: &str,
        facts: &mut Facts,
        synced: &mut Synced,
    ) -> Result<(), SyncError> {
        let mut read = Read::default();
        match self.reader.payment(pi, &mut read).await {
            Ok(()) => {
                synced.stripe_time += read.elapsed;
                facts.extend(read.facts);
            }
            Err(e) => {
                synced.stripe_error(&e);
                tracing::warn!(payment_intent = pi, error = %e, "could not read a refunded payment again");
                if e.is_transient() {
                    synced.unavailable.get_or_insert(e);
                }
            }
        }
        Ok(())
    }
}

fn dead(refund: &RefundFact) -> bool {
    matches!(refund.status.as_deref(), Some("failed" | "canceled"))
}
