//! The one wall clock: Unix time for tokens, signatures, deadlines and metric timestamps.
//!
//! Handlers take a [`Clock`] from their state instead of reading the system time themselves, so a
//! test can put a request at any instant (a token about to expire, a signature at the edge of the
//! tolerance) without sleeping.

use std::time::{SystemTime, UNIX_EPOCH};

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
}
