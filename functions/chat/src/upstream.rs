//! Calls to the LLM upstream under the one retry loop (`shared::retry`): each attempt gets the
//! time left before the request's deadline, failures are classified, counted and logged.

use std::future::Future;
use std::time::{Duration, Instant};

use shared::llm::LlmError;
use shared::retry::{After, Deadline};
use shared::telemetry::MetricSet;

use crate::Config;

/// An attempt with less time than this left is not started.
const MIN_ATTEMPT: Duration = Duration::from_millis(250);

/// Calls `attempt` (given the time left) until it succeeds, fails for good, runs out of retries,
/// or the deadline leaves no room for another try. A `Retry-After` longer than the backoff's cap
/// ends the tries at once: the rules answer now rather than the user waiting.
pub(crate) async fn with_retries<T, F, Fut>(
    config: &Config,
    deadline: Instant,
    metrics: &mut MetricSet,
    mut attempt: F,
) -> Result<T, LlmError>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<T, LlmError>>,
{
    let max_delay = config.backoff.max_delay;
    let mut attempts = 0u64;
    let timed_attempt = |left| {
        attempts += 1;
        let call = attempt(left);
        async move {
            let started = Instant::now();
            call.await.map(|value| (value, started.elapsed()))
        }
    };
    let judge = |error: &LlmError, retry: u32| {
        metrics.count_by("LlmErrors", "Class", error.class(), 1);
        if *error == LlmError::Timeout {
            metrics.count("Timeouts", 1);
        }
        if let LlmError::Auth { status } = error {
            metrics.count("UpstreamAuthErrors", 1);
            tracing::error!(status, "the LLM upstream refused OPENAI_API_KEY: configuration error, answering from rules");
        } else {
            tracing::warn!(class = error.class(), retry, "LLM attempt failed");
        }
        match error.retry_after() {
            _ if !error.is_retryable() => After::Stop,
            Some(after) if after > max_delay => After::Stop,
            retry_after => After::Retry { retry_after },
        }
    };
    let deadline = Deadline {
        at: deadline,
        min_attempt: MIN_ATTEMPT,
    };
    let result = config
        .backoff
        .run(Some(deadline), timed_attempt, judge, |_, _, _| {})
        .await;
    if attempts > 1 {
        metrics.count("Retries", attempts - 1);
    }
    let (value, latency) = result?;
    metrics.millis("UpstreamLatency", latency);
    Ok(value)
}
