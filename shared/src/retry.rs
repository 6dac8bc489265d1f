//! Exponential backoff with jitter, as a value: how many retries, from what delay, up to what cap.
//! Stripe and the LLM client use the same schedule; each decides what is retryable.

use std::time::Duration;

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

    #[test]
    fn jitter_is_in_range() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }
}
