//! Logs and metrics.
//!
//! Logs are `tracing` events, JSON by default, honouring Lambda's `AWS_LAMBDA_LOG_LEVEL` and
//! `AWS_LAMBDA_LOG_FORMAT`. Metrics are CloudWatch Embedded Metric Format (EMF) lines on stdout:
//! CloudWatch turns them into metrics with no network call from the function.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, Layer, Registry};

/// The CloudWatch namespace all functions publish under.
pub const NAMESPACE: &str = "SaasFunctions";

/// Crates whose debug/trace output would carry raw events, headers or bodies: capped at INFO
/// whatever level is asked for, so a TRACE setting never ships signatures or personal data.
const CAPPED: &str = "lambda_runtime=info,lambda_runtime_api_client=info,lambda_http=info,\
hyper=warn,hyper_util=warn,h2=warn,reqwest=warn,rustls=warn,tokio_postgres=warn,deadpool=warn";

/// Installs the global subscriber. Call once in `main`.
///
/// Filtering uses `Targets` rather than `EnvFilter`: same directive syntax for what we need,
/// without pulling a regex engine into every binary.
pub fn init_tracing() {
    let level = std::env::var("AWS_LAMBDA_LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned())
        .to_ascii_lowercase()
        .replace("fatal", "error");
    let targets = log_filter(&level);
    let text = std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("text"));
    let layer: Box<dyn Layer<Registry> + Send + Sync> = if text {
        Box::new(fmt::layer().with_ansi(false).with_writer(std::io::stdout))
    } else {
        Box::new(
            fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_writer(std::io::stdout),
        )
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(targets))
        .try_init();
}

/// The filter for `level` (`trace` ... `error`), with the crates that could log raw events,
/// headers or bodies capped at INFO whatever the level.
pub fn log_filter(level: &str) -> Targets {
    format!("{level},{CAPPED}")
        .parse()
        .or_else(|_| format!("info,{CAPPED}").parse())
        .unwrap_or_default()
}

/// The one log line per request: route, status, duration, request id and outcome.
pub fn log_request(route: &str, status: u16, duration: Duration, request_id: &str, outcome: &str) {
    let duration_ms = duration.as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::error!(route, status, duration_ms, request_id, outcome, "request");
    } else if status >= 400 {
        tracing::warn!(route, status, duration_ms, request_id, outcome, "request");
    } else {
        tracing::info!(route, status, duration_ms, request_id, outcome, "request");
    }
}

/// The one name of the per-request duration metric, in every function.
pub const DURATION_METRIC: &str = "Duration";

/// One request's telemetry: its metric set, its id and when it started. Closed once, by
/// [`RequestContext::finish`].
pub struct RequestContext {
    pub metrics: MetricSet,
    pub request_id: String,
    started: Instant,
}

impl RequestContext {
    /// Starts the request `request_id`: its metric set carries the id as a property.
    pub fn start(metrics: &Metrics, request_id: String) -> Self {
        let mut set = metrics.start();
        set.property("request_id", request_id.as_str());
        Self {
            metrics: set,
            request_id,
            started: Instant::now(),
        }
    }

    /// Closes the request: status and duration metrics, the metrics line, the one log line,
    /// and a Sentry report when the answer is a server error.
    pub async fn finish(self, status: u16, outcome: &str) {
        let Self {
            mut metrics,
            request_id,
            started,
        } = self;
        let elapsed = started.elapsed();
        let route = metrics.metrics.function;
        metrics.status(status);
        metrics.millis(DURATION_METRIC, elapsed);
        metrics.flush();
        log_request(route, status, elapsed, &request_id, outcome);
        if status >= 500 {
            crate::sentry::report_server_error(route, &request_id, outcome).await;
        }
    }
}

/// Where EMF lines go: stdout on Lambda, memory in tests.
#[derive(Clone, Debug)]
pub enum MetricsSink {
    Stdout,
    Memory(Arc<Mutex<Vec<String>>>),
}

/// A function's metrics publisher. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    function: &'static str,
    sink: MetricsSink,
}

/// A CloudWatch unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
        }
    }
}

impl Metrics {
    /// Metrics for `function` (the `Function` dimension) written to `sink`.
    pub fn new(function: &'static str, sink: MetricsSink) -> Self {
        Self { function, sink }
    }

    /// Metrics for `function` on stdout, where Lambda's log agent picks up EMF lines.
    pub fn stdout(function: &'static str) -> Self {
        Self::new(function, MetricsSink::Stdout)
    }

    /// A memory sink and the lines it collects, for tests.
    pub fn in_memory(function: &'static str) -> (Self, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        (
            Self::new(function, MetricsSink::Memory(lines.clone())),
            lines,
        )
    }

    /// Starts the metric set of one request; [`MetricSet::flush`] writes it as one line.
    pub fn start(&self) -> MetricSet {
        MetricSet {
            metrics: self.clone(),
            groups: Vec::new(),
            properties: Map::new(),
        }
    }

    fn write(&self, line: String) {
        match &self.sink {
            MetricsSink::Stdout => {
                let mut out = std::io::stdout().lock();
                // A failed stdout write cannot be reported anywhere better; drop it.
                let _ = writeln!(out, "{line}");
            }
            MetricsSink::Memory(lines) => {
                if let Ok(mut lines) = lines.lock() {
                    lines.push(line);
                }
            }
        }
    }
}

struct Group {
    dimension: Option<(&'static str, String)>,
    values: Vec<(&'static str, Unit, f64)>,
}

/// Metrics recorded while handling one request.
pub struct MetricSet {
    metrics: Metrics,
    groups: Vec<Group>,
    properties: Map<String, Value>,
}

impl MetricSet {
    fn group(&mut self, dimension: Option<(&'static str, String)>) -> &mut Group {
        let index = match self.groups.iter().position(|g| g.dimension == dimension) {
            Some(i) => i,
            None => {
                self.groups.push(Group {
                    dimension,
                    values: Vec::new(),
                });
                self.groups.len() - 1
            }
        };
        &mut self.groups[index]
    }

    /// Adds `n` to a count metric.
    pub fn count(&mut self, name: &'static str, n: u64) {
        self.add(None, name, Unit::Count, n as f64);
    }

    /// Records a duration in milliseconds.
    pub fn millis(&mut self, name: &'static str, duration: Duration) {
        self.add(
            None,
            name,
            Unit::Milliseconds,
            duration.as_secs_f64() * 1000.0,
        );
    }

    /// Adds `n` to a count metric under an extra dimension (e.g. `EventType`).
    pub fn count_by(&mut self, name: &'static str, dimension: &'static str, value: &str, n: u64) {
        self.add(
            Some((dimension, value.to_owned())),
            name,
            Unit::Count,
            n as f64,
        );
    }

    /// Counts the answer's status class: `Http4xx` or `Http5xx` (for alarms on server errors).
    pub fn status(&mut self, status: u16) {
        match status {
            500..=599 => self.count("Http5xx", 1),
            400..=499 => self.count("Http4xx", 1),
            _ => {}
        }
    }

    /// Adds a searchable property (not a metric), such as the request id.
    pub fn property(&mut self, key: &str, value: impl Into<Value>) {
        self.properties.insert(key.to_owned(), value.into());
    }

    fn add(
        &mut self,
        dimension: Option<(&'static str, String)>,
        name: &'static str,
        unit: Unit,
        v: f64,
    ) {
        let group = self.group(dimension);
        match group
            .values
            .iter_mut()
            .find(|(n, u, _)| *n == name && *u == unit)
        {
            Some(existing) if unit == Unit::Count => existing.2 += v,
            Some(existing) => existing.2 = v,
            None => group.values.push((name, unit, v)),
        }
    }

    /// Writes the set as one EMF line (nothing when empty).
    pub fn flush(self) {
        if let Some(line) = self.to_emf(crate::clock::Clock::system().unix_ms() as u64) {
            self.metrics.write(line);
        }
    }

    /// The EMF document for this set, `None` when no metric was recorded.
    pub fn to_emf(&self, timestamp_ms: u64) -> Option<String> {
        if self.groups.iter().all(|g| g.values.is_empty()) {
            return None;
        }
        let mut root = self.properties.clone();
        root.insert("Function".into(), Value::from(self.metrics.function));
        let mut directives = Vec::new();
        for group in &self.groups {
            // A by-dimension metric is also published per function alone, so alarms and
            // dashboards can use the total without knowing every dimension value.
            let dims = match &group.dimension {
                Some((name, value)) => {
                    root.insert((*name).to_owned(), Value::from(value.clone()));
                    json!([["Function"], ["Function", name]])
                }
                None => json!([["Function"]]),
            };
            let defs: Vec<Value> = group
                .values
                .iter()
                .map(|(name, unit, _)| json!({"Name": name, "Unit": unit.as_str()}))
                .collect();
            for (name, _, value) in &group.values {
                root.insert((*name).to_owned(), json!(value));
            }
            directives.push(json!({"Namespace": NAMESPACE, "Dimensions": dims, "Metrics": defs}));
        }
        root.insert(
            "_aws".into(),
            json!({"Timestamp": timestamp_ms, "CloudWatchMetrics": directives}),
        );
        serde_json::to_string(&Value::Object(root)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emf_line_declares_every_metric_with_its_dimensions() {
        let (metrics, lines) = Metrics::in_memory("webhook");
        let mut set = metrics.start();
        set.count("Received", 1);
        set.count("Received", 1);
        set.millis("Duration", Duration::from_millis(12));
        set.count_by("Processed", "EventType", "invoice.paid", 1);
        set.property("request_id", "r-1");
        let doc: Value = serde_json::from_str(&set.to_emf(1000).unwrap()).unwrap();
        set.flush();
        assert_eq!(lines.lock().unwrap().len(), 1);

        assert_eq!(doc["Function"], "webhook");
        assert_eq!(doc["Received"], 2.0);
        assert_eq!(doc["Duration"], 12.0);
        assert_eq!(doc["Processed"], 1.0);
        assert_eq!(doc["EventType"], "invoice.paid");
        assert_eq!(doc["request_id"], "r-1");
        let directives = doc["_aws"]["CloudWatchMetrics"].as_array().unwrap();
        assert_eq!(directives.len(), 2);
        assert_eq!(directives[0]["Dimensions"], json!([["Function"]]));
        assert_eq!(
            directives[0]["Metrics"][1],
            json!({"Name": "Duration", "Unit": "Milliseconds"})
        );
        assert_eq!(
            directives[1]["Dimensions"],
            json!([["Function"], ["Function", "EventType"]])
        );
        assert_eq!(doc["_aws"]["Timestamp"], 1000);
    }

    #[test]
    fn empty_set_writes_nothing() {
        let (metrics, lines) = Metrics::in_memory("webhook");
        metrics.start().flush();
        assert!(lines.lock().unwrap().is_empty());
    }
}
