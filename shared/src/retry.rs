//! The one retry loop, for Stripe and the LLM: the schedule is a value (how many retries, from
//! what delay, up to what cap, exponential with jitter), the loop is [`RetryPolicy::run`], and
//! each caller only says what a failure means ([`After`]).

use std::future::Future;
use std::time::{Duration, Instant};

/// When and how often to retry: a value, not a loop scattered in code.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 2,
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The pause before retry number `retry` (1-based), `jitter` in [0, 1), honouring a
    /// `Retry-After` no longer than the cap.
    pub fn delay(&self, retry: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
        let exponential = self
            .initial_delay
            .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)))
            .min(self.max_delay);
        let jittered = exponential.mul_f64(0.5 * (1.0 + jitter.clamp(0.0, 1.0)));
        let base = jittered.max(self.initial_delay);
        match retry_after {
            Some(after) if after <= self.max_delay => base.max(after),
            _ => base,
        }
    }
}

/// What a failed attempt means for the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Try again after the policy's delay (at least `retry_after`, if the peer asked for one no
    /// longer than the cap).
    Retry { retry_after: Option<Duration> },
    /// Give up: the failure is final.
    Stop,
}

/// When the work must be done, and the least time worth starting an attempt with.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    pub at: Instant,
    pub min_attempt: Duration,
}

/// The deadline left less than the minimum for the next attempt (before the first, or after a
/// pause that overran). Callers turn it into their own timeout error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfTime;

impl RetryPolicy {
    /// Calls `attempt` (given the time left before the deadline, or [`Duration::MAX`]) until it
    /// succeeds, `judge` says [`After::Stop`], the retries run out, or the deadline leaves no room
    /// for the pause and another attempt of at least `min_attempt`. `judge` sees each failure
    /// with the number of retries made so far (for metrics); `pausing` is told just before each
    /// pause, with the retry it leads to and its length (for logs). Returns the last failure, or
    /// [`OutOfTime`] when no time is left for an attempt.
    pub async fn run<T, E, A, Fut, J, P>(
        &self,
        deadline: Option<Deadline>,
        mut attempt: A,
        mut judge: J,
        mut pausing: P,
    ) -> Result<T, E>
    where
        E: From<OutOfTime>,
        A: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        J: FnMut(&E, u32) -> After,
        P: FnMut(&E, u32, Duration),
    {
        let left = || match deadline {
            Some(d) => d.at.saturating_duration_since(Instant::now()),
            None => Duration::MAX,
        };
        let min_attempt = deadline.map_or(Duration::ZERO, |d| d.min_attempt);
        let mut retry = 0;
        loop {
            if left() < min_attempt {
                return Err(OutOfTime.into());
            }
            let error = match attempt(left()).await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            let retry_after = match judge(&error, retry) {
                After::Stop => return Err(error),
                After::Retry { retry_after } => retry_after,
            };
            if retry >= self.max_retries {
                return Err(error);
            }
            retry += 1;
            let delay = self.delay(retry, jitter(), retry_after);
            if delay.saturating_add(min_attempt) > left() {
                return Err(error);
            }
            pausing(&error, retry, delay);
            tokio::time::sleep(delay).await;
        }
    }
}

/// A random number in [0, 1) for jitter.
pub fn jitter() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 10_000) as f64 / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1, 0.0, None), Duration::from_millis(500));
        assert_eq!(p.delay(2, 0.0, None), Duration::from_millis(500));
        assert_eq!(p.delay(2, 0.999_999, None).as_millis(), 999);
        assert_eq!(p.delay(3, 0.5, None), Duration::from_millis(1500));
        assert_eq!(p.delay(10, 0.999_999, None).as_millis(), 4999);
        assert_eq!(
            p.delay(1, 0.0, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            p.delay(1, 0.0, Some(Duration::from_secs(60))),
            Duration::from_millis(500)
        );
    }

    #[derive(Debug, PartialEq)]
    enum Failure {
        Transient,
        Final,
        NoTime,
    }

    impl From<OutOfTime> for Failure {
        fn from(_: OutOfTime) -> Self {
            Failure::NoTime
        }
    }

    fn fast(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        }
    }

    fn judge(f: &Failure, _: u32) -> After {
        match f {
            Failure::Transient => After::Retry { retry_after: None },
            _ => After::Stop,
        }
    }

    #[tokio::test]
    async fn retries_transient_failures_at_most_max_retries_times() {
        let mut calls = 0;
        let mut pauses = Vec::new();
        let result: Result<(), Failure> = fast(2)
            .run(
                None,
                |_| {
                    calls += 1;
                    async { Err(Failure::Transient) }
                },
                judge,
                |_: &Failure, retry, _| pauses.push(retry),
            )
            .await;
        assert_eq!(result, Err(Failure::Transient));
        assert_eq!(calls, 3, "one attempt and two retries");
        assert_eq!(
            pauses,
            [1, 2],
            "told of each pause, never after the last failure"
        );
    }

    #[tokio::test]
    async fn a_final_failure_stops_at_once_and_success_returns() {
        let mut calls = 0;
        let result: Result<(), Failure> = fast(5)
            .run(
                None,
                |_| {
                    calls += 1;
                    async { Err(Failure::Final) }
                },
                judge,
                |_: &Failure, _, _| {},
            )
            .await;
        assert_eq!((result, calls), (Err(Failure::Final), 1));
        let mut calls = 0;
        let result: Result<u32, Failure> = fast(5)
            .run(
                None,
                |_| {
                    calls += 1;
                    let n = calls;
                    async move {
                        if n < 3 {
                            Err(Failure::Transient)
                        } else {
                            Ok(n)
                        }
                    }
                },
                judge,
                |_: &Failure, _, _| {},
            )
            .await;
        assert_eq!(result, Ok(3));
    }

    #[tokio::test]
    async fn the_deadline_bounds_attempts_and_pauses() {
        let past = Deadline {
            at: Instant::now(),
            min_attempt: Duration::from_millis(50),
        };
        let result: Result<(), Failure> = fast(2)
            .run(Some(past), |_| async { Ok(()) }, judge, |_, _, _| {})
            .await;
        assert_eq!(result, Err(Failure::NoTime), "no attempt without time");

        // Room for one attempt, not for a pause of 200 ms and another attempt.
        let slow = RetryPolicy {
            max_retries: 2,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_millis(200),
        };
        let soon = Deadline {
            at: Instant::now() + Duration::from_millis(150),
            min_attempt: Duration::from_millis(10),
        };
        let mut lefts = Vec::new();
        let result: Result<(), Failure> = slow
            .run(
                Some(soon),
                |left| {
                    lefts.push(left);
                    async { Err(Failure::Transient) }
                },
                judge,
                |_: &Failure, _, _| {},
            )
            .await;
        assert_eq!(result, Err(Failure::Transient));
        assert_eq!(lefts.len(), 1);
        assert!(lefts[0] <= Duration::from_millis(150));
    }

    #[test]
    fn jitter_is_in_range() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }
}
