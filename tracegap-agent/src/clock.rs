//! Kernel timestamps (CLOCK_MONOTONIC, `bpf_ktime_get_ns`) to wall-clock time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The current CLOCK_MONOTONIC time in nanoseconds, as the kernel stamps events.
pub fn monotonic_ns() -> u64 {
    now(libc::CLOCK_MONOTONIC)
}

/// Maps monotonic nanoseconds to wall-clock time. The offset is measured
/// once; call [`WallClock::resync`] now and then to follow clock steps (NTP).
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// realtime - monotonic, in nanoseconds.
    offset_ns: i128,
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

impl WallClock {
    pub fn new() -> Self {
        // Take monotonic between two realtime reads and use the midpoint,
        // so the offset error is at most half the read gap.
        let r1 = now(libc::CLOCK_REALTIME) as i128;
        let m = now(libc::CLOCK_MONOTONIC) as i128;
        let r2 = now(libc::CLOCK_REALTIME) as i128;
        Self {
            offset_ns: (r1 + r2) / 2 - m,
        }
    }

    pub fn resync(&mut self) {
        *self = Self::new();
    }

    /// Unix nanoseconds for a monotonic timestamp.
    pub fn unix_ns(&self, monotonic_ns: u64) -> u64 {
        (monotonic_ns as i128 + self.offset_ns).max(0) as u64
    }

    pub fn system_time(&self, monotonic_ns: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.unix_ns(monotonic_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_now_maps_to_about_now() {
        let clock = WallClock::new();
        let wall = clock.system_time(monotonic_ns());
        let diff = SystemTime::now()
            .duration_since(wall)
            .unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_millis(50), "{diff:?}");
    }
}
