//! What the database says must be read again: sessions of ours an instance created and died
//! before attaching (Stripe's list of open sessions), and the plan `reconcile_begin` made
//! (sessions Stripe may still let someone pay, payments in flight or due). The plan holds the most
//! pressing and then the least recently read, so runs move through more than one run's limit.

use std::time::Instant;

use shared::payments::target::PaymentRef;
use shared::payments::{Syncer, Target};
use shared::store::payments::ReconcilePlan;
use shared::stripe::client::CallStats;
use shared::telemetry::MetricSet;

use crate::{concerns_one_object, count, out_of_time, ReconcileError, Report, State};

/// Reads again the open sessions of ours and what the plan names; carries out what is due.
pub(crate) async fn read_again(
    state: &State,
    syncer: &Syncer<'_>,
    plan: &ReconcilePlan,
    deadline: Option<Instant>,
    report: &mut Report,
    metrics: &mut MetricSet,
) -> Result<(), ReconcileError> {
    let mut stats = CallStats::default();
    let open = state
        .stripe
        .list_open_sessions(plan.since - 86_400, &mut stats)
        .await?;
    metrics.millis("StripeLatency", stats.elapsed);
    if !open.complete {
        report.failures.push(format!(
            "more open sessions than one listing holds: the newest {} read",
            open.items.len()
        ));
    }
    let mut sessions: Vec<String> = open
        .items
        .iter()
        .filter(|s| s.metadata("order_id").is_some())
        .map(|s| s.id.clone())
        .collect();
    sessions.extend(plan.sessions.iter().cloned());
    sessions.sort();
    sessions.dedup();
    let left = (plan.sessions_due as usize).saturating_sub(plan.sessions.len())
        + (plan.payments_due as usize).saturating_sub(plan.payments.len());
    if left > 0 {
        report.failures.push(format!(
            "{left} reads due beyond this run's limit: the next runs read them"
        ));
    }
    // The plan's payments first: refunds due lead it.
    let mut targets: Vec<Target> = plan
        .payments
        .iter()
        .map(|pi| Target::Payment(PaymentRef::Intent(pi.clone())))
        .collect();
    report.payments_read = targets.len() as u32;
    report.sessions_read = sessions.len() as u32;
    targets.extend(sessions.into_iter().map(Target::Session));
    for (done, target) in targets.iter().enumerate() {
        if out_of_time(deadline) {
            report.failures.push(format!(
                "out of time with {} reads left for the next run",
                targets.len() - done
            ));
            break;
        }
        match syncer.sync(None, Some(target), None).await {
            Ok(synced) => count(&synced, report, &format!("{target:?}"), metrics),
            Err(e) if concerns_one_object(&e) => {
                report.failures.push(format!("{target:?}: {e}"));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
