//! The reconciler: heals what webhooks miss ("Process undelivered webhook events", Stripe's
//! guide). On the schedule `template.yaml` defines, and by hand (`cargo run -p tools --bin
//! reconcile-now -- --since 3d`), one run:
//! 1. lists the events Stripe could not deliver, from a little before where the runs before it
//!    listed through, in time slices small enough to list whole, and applies those the ledger
//!    does not hold through the webhook's own path (`events`);
//! 2. stores the open sessions of ours an instance created and died before attaching, and reads
//!    again what the database says is in flight or due, the most pressing and the least recently
//!    read first (`reads`);
//! 3. counts what it repaired: one metrics line and one log line.
//!
//! After one run the database says what Stripe's objects say, whatever deliveries were lost. A
//! run stops before its deadline; what it did not get to, the next run does.

mod events;
mod reads;

use std::time::Instant;

use serde::Serialize;
use shared::clock::Clock;
use shared::config::{self, ConfigError, EnvReader, StoreConfig, StripeApi};
use shared::payments::{Reader, SyncError, Synced, Syncer};
use shared::store::{Store, StoreError};
use shared::stripe::client::{StripeClient, StripeError};
use shared::stripe::ids::PriceId;
use shared::telemetry::{MetricSet, Metrics};

/// The route name in logs and metrics.
pub const ROUTE: &str = "reconcile";
/// How far before where the runs listed through the next one starts listing (runs overlap: a
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
}

/// Time kept in hand before the invocation's deadline: one Stripe read and its store call.
pub const DEADLINE_RESERVE: std::time::Duration = std::time::Duration::from_secs(30);

pub(crate) fn out_of_time(deadline: Option<Instant>) -> bool {
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
    /// Unix seconds: events were listed from here...
    pub since: i64,
    /// ... through here (every undelivered event created before it was applied).
    pub listed_through: Option<i64>,
    /// Undelivered events listed, and of those never recorded before.
    pub events_listed: u32,
    pub events_new: u32,
    pub sessions_read: u32,
    pub payments_read: u32,
    /// Sessions and payments due to be read again, this run's and the rest.
    pub sessions_due: u32,
    pub payments_due: u32,
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
        sessions_due: plan.sessions_due,
        payments_due: plan.payments_due,
        ..Report::default()
    };
    let syncer = state.syncer();
    let mut outcome =
        events::apply_undelivered(state, &syncer, plan.since, deadline, &mut report, metrics).await;
    if outcome.is_ok() {
        outcome = reads::read_again(state, &syncer, &plan, deadline, &mut report, metrics).await;
    }
    let error = outcome.as_ref().err().map(ToString::to_string);
    // How far the events were listed counts even when a later step failed.
    state
        .store
        .reconcile_finish(
            plan.run,
            report.events_new,
            report.repaired,
            error.as_deref(),
            report.listed_through,
        )
        .await?;
    outcome.map(|()| report)
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

/// A Stripe error that concerns one object (it does not know it, refuses the request): noted,
/// and the run goes on. Outages, timeouts and a refused key stop the run.
fn concerns_one_object(e: &SyncError) -> bool {
    matches!(e, SyncError::Stripe(e) if !e.is_transient() && e.class() != "authentication")
}
