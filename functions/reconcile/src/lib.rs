//! The reconciler: heals what webhooks miss ("Process undelivered webhook events", Stripe's
//! guide). On the schedule `template.yaml` defines, and by hand (`cargo run -p tools --bin
//! reconcile -- --since 3d`), one run:
//! 1. lists the events Stripe could not deliver (`GET /v1/events?delivery_success=false`) since
//!    a little before the last run that finished, and applies each through the webhook's own
//!    path (the event's object read again, stored, what is due carried out);
//! 2. lists the sessions still open that were created since a day before that, and stores those
//!    of ours (a session an instance created and died before attaching belongs to its order);
//! 3. reads again every fact in flight or due (sessions of ours Stripe may still let someone pay,
//!    payments in flight or due for a refund, facts never read) and carries out what is due;
//! 4. counts what it repaired (a stored fact that a read changed, a refund made, a session
//!    expired, an event never seen before): one metrics line and one log line.
//!
//! After one run the database says what Stripe's objects say, whatever deliveries were lost.

use std::time::Instant;

use serde::Serialize;
use shared::clock::Clock;
use shared::config::{self, ConfigError, EnvReader, StoreConfig, StripeApi};
use shared::payments::{target_of, Reader, SyncError, Synced, Syncer, Target};
use shared::store::payments::Delivery;
use shared::store::{Outcome, Store, StoreError};
use shared::stripe::client::{CallStats, StripeClient, StripeError};
use shared::stripe::ids::PriceId;
use shared::telemetry::{MetricSet, Metrics};

/// The route name in logs and metrics.
pub const ROUTE: &str = "reconcile";
/// How far before the last finished run the next one starts listing events (runs overlap: a
/// late event is never between two runs).
pub const OVERLAP_S: i64 = 600;

/// The reconciler's configuration: the webhook's store and Stripe key.
#[derive(Clone, Debug)]
pub struct Config {
    pub store: StoreConfig,
    pub stripe: StripeApi,
    pub price_id: Option<PriceId>,
    pub auto_refund: bool,
    /// `RECONCILE_MAX_READS`: sessions and payments read again per run, each.
    pub max_reads: u32,
}

impl Config {
    /// Reads through `env`: the store, `STRIPE_SECRET_KEY` (with Events read access),
    /// `STRIPE_FULL_REPORT_PRICE_ID`, `AUTO_REFUND_DUPLICATES`, `RECONCILE_MAX_READS`.
    pub fn read(mut env: EnvReader<'_>) -> Result<Self, ConfigError> {
        let app_env = env.app_env();
        let store = StoreConfig::read(&mut env, app_env);
        shared::http_client::check_extra_roots(&mut env);
        let stripe = config::read_stripe_secret_key(&mut env, app_env)
            .map(|(key, _)| StripeApi::read(&mut env, key, 8000, 2));
        let price_id = match env.optional("STRIPE_FULL_REPORT_PRICE_ID") {
            Some(_) => config::read_price_id(&mut env, "STRIPE_FULL_REPORT_PRICE_ID", app_env),
            None => None,
        };
        let auto_refund = env.parsed("AUTO_REFUND_DUPLICATES", true, "true or false", |raw| {
            raw.parse::<bool>().ok()
        });
        let max_reads = env.integer("RECONCILE_MAX_READS", 500, 1..=10_000) as u32;
        let config = match (store, stripe) {
            (Some(store), Some(stripe)) => Some(Config {
                store,
                stripe,
                price_id,
                auto_refund,
                max_reads,
            }),
            _ => None,
        };
        env.finish_required(config, "STRIPE_SECRET_KEY")
    }
}

/// Clients, built once per cold start.
#[derive(Clone, Debug)]
pub struct State {
    pub config: Config,
    pub store: Store,
    pub stripe: StripeClient,
    pub metrics: Metrics,
    pub clock: Clock,
}

impl State {
    /// Builds the clients (connections open lazily) and metrics on stdout.
    pub fn new(config: Config) -> Result<Self, String> {
        let store = Store::from_config(&config.store).map_err(|e| e.to_string())?;
        Self::from_parts(config, store, Metrics::stdout(ROUTE))
    }

    /// The state over a given store and metrics sink (tests and the tool).
    pub fn from_parts(config: Config, store: Store, metrics: Metrics) -> Result<Self, String> {
        let stripe = StripeClient::from_config(&config.stripe).map_err(|e| e.to_string())?;
        Ok(Self {
            config,
            store,
            stripe,
            metrics,
            clock: Clock::system(),
        })
    }

    fn syncer(&self) -> Syncer<'_> {
        Syncer {
            store: &self.store,
            reader: Reader {
                stripe: &self.stripe,
                price: self.config.price_id.as_ref(),
            },
            clock: self.clock,
            refunds: self.config.auto_refund,
        }
    }
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("Stripe: {0}")]
    Stripe(#[from] StripeError),
    /// The invocation's deadline came before every event listed was applied: the run counts as
    /// failed, so the next one lists them again.
    #[error("out of time with {0} listed events left (the next run lists them again)")]
    OutOfTime(usize),
}

/// Time kept in hand before the invocation's deadline: one Stripe read and its store call.
pub const DEADLINE_RESERVE: std::time::Duration = std::time::Duration::from_secs(30);

fn out_of_time(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| d.saturating_duration_since(Instant::now()) < DEADLINE_RESERVE)
}

impl From<SyncError> for ReconcileError {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Store(e) => ReconcileError::Store(e),
            SyncError::Stripe(e) => ReconcileError::Stripe(e),
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    pub run: i64,
    /// Unix seconds: events were listed from here.
    pub since: i64,
    /// Undelivered events listed, and of those never recorded before.
    pub events_listed: u32,
    pub events_new: u32,
    pub sessions_read: u32,
    pub payments_read: u32,
    /// Stored facts a read changed, refunds made, sessions expired, events never seen.
    pub repaired: u32,
    /// Objects that could not be read or acted on now (the next run tries again).
    pub failures: Vec<String>,
}

/// One run, with its metrics line and log line; `since` (Unix seconds) overrides where the
/// event listing starts; `deadline` (the invocation's) stops it [`DEADLINE_RESERVE`] before.
pub async fn handle(
    state: &State,
    since: Option<i64>,
    deadline: Option<Instant>,
) -> Result<Report, ReconcileError> {
    let mut metrics = state.metrics.start();
    let started = Instant::now();
    let result = run(state, since, deadline, &mut metrics).await;
    metrics.millis(shared::telemetry::DURATION_METRIC, started.elapsed());
    match &result {
        Ok(report) => {
            metrics.count("ReconcileRuns", 1);
            metrics.count("ReconcileEvents", u64::from(report.events_new));
            metrics.count("ReconcileRepairs", u64::from(report.repaired));
            metrics.count("ReconcileFailures", report.failures.len() as u64);
            tracing::info!(
                run = report.run,
                since = report.since,
                events_listed = report.events_listed,
                events_new = report.events_new,
                sessions_read = report.sessions_read,
                payments_read = report.payments_read,
                repaired = report.repaired,
                failures = report.failures.len(),
                "reconciled"
            );
            for failure in &report.failures {
                tracing::warn!(failure, "left for the next run");
            }
        }
        Err(e) => {
            metrics.count("Errors", 1);
            tracing::error!(error = %e, "reconciler run failed");
        }
    }
    metrics.flush();
    result
}

async fn run(
    state: &State,
    since: Option<i64>,
    deadline: Option<Instant>,
    metrics: &mut MetricSet,
) -> Result<Report, ReconcileError> {
    let plan = state
        .store
        .reconcile_begin(since, state.config.max_reads)
        .await?;
    let mut report = Report {
        run: plan.run,
        since: plan.since,
        ..Report::default()
    };
    let outcome = steps(state, &plan, deadline, &mut report, metrics).await;
    let error = outcome.as_ref().err().map(ToString::to_string);
    state
        .store
        .reconcile_finish(
            plan.run,
            report.events_new,
            report.repaired,
            error.as_deref(),
        )
        .await?;
    outcome.map(|()| report)
}

async fn steps(
    state: &State,
    plan: &shared::store::payments::ReconcilePlan,
    deadline: Option<Instant>,
    report: &mut Report,
    metrics: &mut MetricSet,
) -> Result<(), ReconcileError> {
    let syncer = state.syncer();
    // 1. Events Stripe could not deliver.
    let types: Vec<&str> = shared::stripe::events::handled_event_types().collect();
    let mut stats = CallStats::default();
    let events = state
        .stripe
        .list_undelivered_events(plan.since, &types, &mut stats)
        .await?;
    metrics.millis("StripeLatency", stats.elapsed);
    report.events_listed = events.len() as u32;
    // Oldest first, as Stripe sent them.
    let mut parsed_events = Vec::with_capacity(events.len());
    for raw in events.iter().rev() {
        match shared::stripe::events::parse(raw.get().as_bytes()) {
            Ok(parsed) => parsed_events.push(parsed),
            Err(e) => report
                .failures
                .push(format!("an event Stripe listed is not readable: {e}")),
        }
    }
    // Those applied before (delivered late, or by a run cut short) cost no Stripe read: a
    // backlog longer than one run shrinks run after run.
    let ids: Vec<&str> = parsed_events.iter().map(|p| p.id.as_str()).collect();
    let unknown: std::collections::HashSet<String> = state
        .store
        .stripe_events_unknown(&ids)
        .await?
        .into_iter()
        .collect();
    parsed_events.retain(|p| unknown.contains(&p.id));
    let todo = parsed_events.len();
    for (done, parsed) in parsed_events.iter().enumerate() {
        if out_of_time(deadline) {
            return Err(ReconcileError::OutOfTime(todo - done));
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
            Err(SyncError::Stripe(e)) if !e.is_transient() && e.class() != "authentication" => {
                report.failures.push(format!("event {}: {e}", parsed.id));
            }
            Err(e) => return Err(e.into()),
        }
    }
    // 2. Open sessions of ours the database may not know (made by an instance that died).
    let mut stats = CallStats::default();
    let open = state
        .stripe
        .list_open_sessions(plan.since - 86_400, &mut stats)
        .await?;
    metrics.millis("StripeLatency", stats.elapsed);
    let mut sessions: Vec<String> = open
        .iter()
        .filter(|s| s.metadata("order_id").is_some())
        .map(|s| s.id.clone())
        .collect();
    // 3. Facts in flight or due.
    sessions.extend(plan.sessions.iter().cloned());
    sessions.sort();
    sessions.dedup();
    let mut targets: Vec<Target> = sessions.into_iter().map(Target::Session).collect();
    report.sessions_read = targets.len() as u32;
    report.payments_read = plan.payments.len() as u32;
    targets.extend(
        plan.payments
            .iter()
            .map(|pi| Target::Payment(shared::payments::target::PaymentRef::Intent(pi.clone()))),
    );
    for (done, target) in targets.iter().enumerate() {
        if out_of_time(deadline) {
            // Each run plans these again from the database: the next one reads the rest.
            report.failures.push(format!(
                "out of time with {} reads left for the next run",
                targets.len() - done
            ));
            break;
        }
        match syncer.sync(None, Some(target), None).await {
            Ok(synced) => count(&synced, report, &format!("{target:?}"), metrics),
            Err(SyncError::Stripe(e)) if !e.is_transient() && e.class() != "authentication" => {
                report.failures.push(format!("{target:?}: {e}"));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Adds a sync's repairs to the report.
fn count(synced: &Synced, report: &mut Report, what: &str, metrics: &mut MetricSet) {
    report.repaired += synced.changed + synced.refunds_made + synced.sessions_expired;
    metrics.millis("StripeLatency", synced.stripe_time);
    for class in &synced.stripe_errors {
        metrics.count_by("StripeErrors", "Class", class, 1);
    }
    if synced.refunds_made > 0 {
        metrics.count("DuplicateRefunds", u64::from(synced.refunds_made));
    }
    if synced.sessions_expired > 0 {
        metrics.count("SessionsExpired", u64::from(synced.sessions_expired));
    }
    for (due, error) in &synced.refunds_refused {
        metrics.count("DuplicateRefundFailures", 1);
        report.failures.push(format!(
            "the refund of {} is due and Stripe refused it: {error}",
            due.payment_intent_id
        ));
    }
    if let Some(e) = &synced.unavailable {
        report.failures.push(format!("{what}: {e}"));
    }
}
