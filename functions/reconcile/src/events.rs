//! Events Stripe could not deliver (`GET /v1/events?delivery_success=false`), listed in time
//! slices from `since` to now: a slice is listed whole (at most `MAX_PAGES` pages, else it is
//! halved), its events the ledger does not hold are applied through the webhook's path, and only
//! then does `listed_through` move to its end. A run cut short (deadline, outage) leaves the mark
//! where the last whole slice ended; the next run lists from there, and events already applied
//! cost it no read. The order of the events does not matter: each one makes the webhook's path
//! read its object as it is now.

use std::time::Instant;

use shared::payments::{target_of, Syncer};
use shared::store::payments::Delivery;
use shared::store::Outcome;
use shared::stripe::client::CallStats;
use shared::telemetry::MetricSet;

use crate::{concerns_one_object, count, out_of_time, ReconcileError, Report, State};

/// Lists and applies every undelivered event created from `since` to now.
pub(crate) async fn apply_undelivered(
    state: &State,
    syncer: &Syncer<'_>,
    since: i64,
    deadline: Option<Instant>,
    report: &mut Report,
    metrics: &mut MetricSet,
) -> Result<(), ReconcileError> {
    let types: Vec<&str> = shared::stripe::events::handled_event_types().collect();
    // Up to the next second: an event of this second is in this run's last slice.
    let now = state.clock.unix_s() + 1;
    let mut from = since;
    while from < now {
        if out_of_time(deadline) {
            report.failures.push(format!(
                "out of time: undelivered events from {from} are listed by the next run"
            ));
            return Ok(());
        }
        let mut to = now;
        let listed = loop {
            let mut stats = CallStats::default();
            let listed = state
                .stripe
                .list_undelivered_events(from..to, &types, &mut stats)
                .await;
            metrics.millis("StripeLatency", stats.elapsed);
            let listed = listed?;
            if listed.complete || to - from <= 1 {
                if !listed.complete {
                    report.failures.push(format!(
                        "more undelivered events created in second {from} than one listing holds"
                    ));
                }
                break listed;
            }
            to = from + (to - from) / 2;
        };
        report.events_listed += listed.items.len() as u32;
        let mut events = Vec::with_capacity(listed.items.len());
        for raw in &listed.items {
            match shared::stripe::events::parse(raw.get().as_bytes()) {
                Ok(parsed) => events.push(parsed),
                Err(e) => report
                    .failures
                    .push(format!("an event Stripe listed is not readable: {e}")),
            }
        }
        let ids: Vec<&str> = events.iter().map(|p| p.id.as_str()).collect();
        let unknown: std::collections::HashSet<String> = state
            .store
            .stripe_events_unknown(&ids)
            .await?
            .into_iter()
            .collect();
        // Oldest first, as Stripe sent them (the list is newest first).
        for parsed in events.iter().rev().filter(|p| unknown.contains(&p.id)) {
            if out_of_time(deadline) {
                report.failures.push(format!(
                    "out of time: undelivered events from {from} are listed by the next run"
                ));
                return Ok(());
            }
            let target = target_of(&parsed.event);
            let delivery = Delivery {
                event: parsed,
                received_at_ms: state.clock.unix_ms(),
            };
            match syncer.sync(Some(delivery), target.as_ref(), None).await {
                Ok(synced) => {
                    if synced
                        .recorded
                        .as_ref()
                        .is_some_and(|r| r.outcome != Outcome::Duplicate)
                    {
                        report.events_new += 1;
                        report.repaired += 1;
                    }
                    count(&synced, report, &parsed.id, metrics);
                }
                Err(e) if concerns_one_object(&e) => {
                    report.failures.push(format!("event {}: {e}", parsed.id));
                }
                Err(e) => return Err(e.into()),
            }
        }
        report.listed_through = Some(to);
        from = to;
    }
    Ok(())
}
