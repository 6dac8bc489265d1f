//! The one wall clock: Unix time for tokens, signatures, deadlines and metric timestamps.
//!
//! Handlers take a [`Clock`] from their state instead of reading the system time themselves, so a
//! test can put a request at any instant (a token about to expire, a signature at the edge of the
//! tolerance) without sleeping.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock time, the system's own or shifted by a fixed offset (tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    offset_ms: i64,
}

impl Clock {
    /// The system clock.
    pub const fn system() -> Self {
        Self { offset_ms: 0 }
    }

    /// The system clock moved by `offset_ms` (negative: into the past).
    pub const fn shifted_ms(offset_ms: i64) -> Self {
        Self { offset_ms }
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> i64 {
        system_unix_ms().saturating_add(self.offset_ms)
    }

    /// Seconds since the Unix epoch.
    pub fn unix_s(&self) -> i64 {
        self.unix_ms().div_euclid(1000)
    }

    /// A Lambda invocation's deadline (Unix milliseconds) as an [`Instant`]; `None` for one in
    /// the past or further than Lambda's 15-minute limit (`cargo lambda watch` sends a constant
    /// in 1970).
    pub fn deadline_instant(&self, deadline_ms: u64) -> Option<Instant> {
        let left_ms = i64::try_from(deadline_ms)
            .unwrap_or(i64::MAX)
            .saturating_sub(self.unix_ms());
        (left_ms > 0 && left_ms <= 15 * 60 * 1000)
            .then(|| Instant::now() + Duration::from_millis(left_ms as u64))
    }
}

fn system_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shifted_clock_is_the_system_clock_plus_the_offset() {
        let system = Clock::system();
        let ahead = Clock::shifted_ms(3_600_000);
        let (a, b) = (system.unix_s(), ahead.unix_s());
        assert!((3599..=3601).contains(&(b - a)), "{a} {b}");
        assert!(system.unix_s() > 1_700_000_000);
    }

    #[test]
    fn a_deadline_is_kept_only_within_lambda_s_fifteen_minutes() {
        let clock = Clock::system();
        let now = clock.unix_ms() as u64;
        let left = clock
            .deadline_instant(now + 60_000)
            .expect("a minute ahead")
            .saturating_duration_since(Instant::now());
        assert!(
            left > Duration::from_secs(58) && left <= Duration::from_secs(60),
            "{left:?}"
        );
        assert_eq!(clock.deadline_instant(now - 1), None);
        assert_eq!(clock.deadline_instant(now + 16 * 60_000), None);
        assert_eq!(clock.deadline_instant(1_000), None);
    }
}
