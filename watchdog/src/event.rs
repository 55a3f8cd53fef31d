//! What the sensors report, independent of how it was sensed.

use std::time::{Duration, SystemTime};

use crate::exit::ExitStatus;

/// A process (a whole thread group) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessExit {
    pub pid: u32,
    /// The parent at the time of exit (a reaper, if the parent died first).
    pub ppid: u32,
    /// The process name (the thread group leader's comm).
    pub comm: String,
    pub status: ExitStatus,
    /// The process's peak resident set, in bytes.
    pub peak_rss_bytes: u64,
    /// CLOCK_MONOTONIC time of the exit, in nanoseconds.
    pub monotonic_ns: u64,
    /// The watched tree it belonged to (its root pid), 0 for none.
    pub group: u32,
}

/// A watched process started a new process, which is now watched too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessFork {
    pub parent: u32,
    pub child: u32,
    pub group: u32,
    pub monotonic_ns: u64,
}

/// Turns CLOCK_MONOTONIC readings (what the kernel stamps events with) into
/// wall-clock time, using the offset between the two clocks when created.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    realtime_at: SystemTime,
    monotonic_at: Duration,
}

impl WallClock {
    pub fn new() -> Self {
        // Read the monotonic clock on both sides of the wall clock and use
        // the midpoint, so the offset is off by at most half that window.
        let before = monotonic_now();
        let realtime_at = SystemTime::now();
        let after = monotonic_now();
        Self {
            realtime_at,
            monotonic_at: before + (after - before) / 2,
        }
    }

    /// The wall-clock time of a CLOCK_MONOTONIC reading in nanoseconds.
    pub fn at(&self, monotonic_ns: u64) -> SystemTime {
        let t = Duration::from_nanos(monotonic_ns);
        if t >= self.monotonic_at {
            self.realtime_at + (t - self.monotonic_at)
        } else {
            self.realtime_at - (self.monotonic_at - t)
        }
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

/// CLOCK_MONOTONIC now.
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer; it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// RFC 3339 UTC with microseconds, the audit log's `ts` format.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_monotonic_to_wall_clock() {
        let clock = WallClock::new();
        let now_mono = monotonic_now().as_nanos() as u64;
        let wall = clock.at(now_mono);
        let skew = SystemTime::now()
            .duration_since(wall)
            .unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_millis(50), "skew {skew:?}");
        let earlier = clock.at(now_mono - 1_000_000_000);
        assert_eq!(
            wall.duration_since(earlier).unwrap(),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn formats_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123456Z");
    }
}
