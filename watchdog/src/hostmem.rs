//! The host's memory (or the daemon's container's): pure telemetry that
//! warns when it runs short and says when it recovered, with hysteresis.
//! It never kills anything.
//!
//! # What is measured
//!
//! Every reading takes /proc/meminfo (MemTotal, MemAvailable) and the
//! memory files of the daemon's cgroup. The *scope* of the reading is:
//!
//! - `cgroup` when the daemon's cgroup, or one of its ancestors, has a
//!   memory limit below MemTotal (a container, a systemd unit with
//!   `MemoryMax=`): in use is the cgroup's usage less its inactive file
//!   pages (which the kernel reclaims before it runs short), out of the
//!   limit. The tightest limit on the way up to the root wins, so a daemon
//!   that moved itself into a leaf of its unit's cgroup still measures
//!   against the unit's limit.
//! - `host` otherwise: MemTotal - MemAvailable, out of MemTotal.
//!
//! Cgroup v2 is read from `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`
//! (memory.current, memory.max, memory.stat, memory.pressure,
//! memory.events); cgroup v1 from `/sys/fs/cgroup/memory`
//! (memory.usage_in_bytes, memory.limit_in_bytes, memory.stat). When the
//! path /proc/self/cgroup names does not exist under the mount (a container
//! whose cgroup is mounted as the root of the hierarchy), the mount's root
//! is the daemon's cgroup.
//!
//! # When it is measured
//!
//! [`spawn`] starts a thread of its own that reads every interval and
//! sooner when the kernel says something happened: a PSI trigger on the
//! scope's memory pressure file (`POLLPRI`), and an inotify watch on a v2
//! cgroup's memory.events (the kernel touches it when the cgroup hits its
//! `high` or `max` limit). Where the kernel refuses a trigger (no PSI, or a
//! container without the right to create one), it just reads every
//! interval. On macOS, the host's memory is read from the Mach VM
//! statistics, every interval.

use std::{
    fmt,
    io::{self, Write},
    os::fd::{AsRawFd, RawFd},
    os::unix::net::UnixStream,
    path::PathBuf,
    str::FromStr,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::{Deserialize, Deserializer, de::Error};
use tracing::{info, warn};

use crate::{size::Size, status::HostMemory};

/// A level of memory in use: a share of what there is, or a size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Threshold {
    /// Percent of the total, in (0, 100].
    Percent(f64),
    Bytes(u64),
}

impl Threshold {
    /// The level in bytes for a total of `total` bytes.
    pub fn bytes_of(self, total: u64) -> u64 {
        match self {
            Self::Percent(p) => (total as f64 * p / 100.0) as u64,
            Self::Bytes(b) => b,
        }
    }

    /// The default recovery level for this warning level: 5 points lower,
    /// or 95% of a size.
    pub fn default_recovery(self) -> Self {
        match self {
            Self::Percent(p) => Self::Percent((p - 5.0).max(p / 2.0)),
            Self::Bytes(b) => Self::Bytes(b / 20 * 19),
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Percent(p) => write!(f, "{p}%"),
            Self::Bytes(b) => write!(f, "{b}B"),
        }
    }
}

impl FromStr for Threshold {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if let Some(number) = t.strip_suffix('%') {
            return match number.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(Self::Percent(p)),
                _ => Err(format!(
                    "invalid share {text:?}: write a percentage above 0 and at most 100, such as \"90%\""
                )),
            };
        }
        match t.parse::<Size>() {
            Ok(size) if size.bytes() > 0 => Ok(Self::Bytes(size.bytes())),
            Ok(_) => Err(format!("invalid level {text:?}: it must be more than 0")),
            Err(e) => Err(format!(
                "{e}; or write a share of the total, such as \"90%\""
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d).map_err(|_| {
            D::Error::custom("expected a share or a size in quotes, such as \"90%\" or \"12GiB\"")
        })?;
        text.parse().map_err(D::Error::custom)
    }
}

/// A crossing of the warning or the recovery level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// In use reached the warning level.
    Warn,
    /// In use fell back to the recovery level.
    Recover,
}

/// The warning state with hysteresis: it warns when in use reaches the
/// warning level and recovers only once it is back at the (lower)
/// recovery level, so readings that wander inside the band between the
/// two say nothing. Percent levels are resolved against each reading's
/// total, so a cgroup limit that changes moves them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hysteresis {
    warn: Threshold,
    recover: Threshold,
    warning: bool,
}

impl Hysteresis {
    /// Not warning, with these levels.
    pub fn new(warn: Threshold, recover: Threshold) -> Self {
        Self {
            warn,
            recover,
            warning: false,
        }
    }

    /// Over the warning level and not yet back at the recovery level.
    pub fn warning(&self) -> bool {
        self.warning
    }

    /// The warning and the recovery levels in bytes for a total of `total`
    /// bytes. The recovery level is kept under the warning level, so one
    /// reading can never both warn and recover.
    pub fn levels(&self, total: u64) -> (u64, u64) {
        let warn = self.warn.bytes_of(total);
        let recover = self.recover.bytes_of(total).min(warn.saturating_sub(1));
        (warn, recover)
    }

    /// Takes one reading: `used` bytes in use out of `total`. Returns the
    /// crossing it makes, if any.
    pub fn update(&mut self, used: u64, total: u64) -> Option<Transition> {
        let (warn, recover) = self.levels(total);
        if !self.warning && used >= warn {
            self.warning = true;
            Some(Transition::Warn)
        } else if self.warning && used <= recover {
            self.warning = false;
            Some(Transition::Recover)
        } else {
            None
        }
    }
}

/// What /proc/meminfo says, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub total: u64,
    pub available: u64,
}

/// What the daemon's cgroup (or its ancestor with the tightest limit)
/// says, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CgroupUsage {
    /// Usage: v2 memory.current, v1 memory.usage_in_bytes.
    pub current: u64,
    /// The limit, when it has one (see [`effective_limit`]).
    pub limit: Option<u64>,
    /// Inactive file pages: v2 `inactive_file`, v1 `total_inactive_file`
    /// of memory.stat.
    pub inactive_file: Option<u64>,
    /// `some avg10` of its memory.pressure (v2 only).
    pub pressure_some_avg10: Option<f64>,
}

/// One reading, before the levels are applied.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measure {
    pub meminfo: MemInfo,
    /// The daemon's cgroup, when its memory files are readable.
    pub cgroup: Option<CgroupUsage>,
    /// `some avg10` of /proc/pressure/memory, when the kernel has PSI.
    pub host_pressure_some_avg10: Option<f64>,
}

/// A cgroup limit as one that counts: none when it is the kernel's
/// "unlimited" (v2 `max`, v1 a page-aligned `LONG_MAX`, anything from 2^62
/// on) or more than the host has.
pub fn effective_limit(raw: Option<u64>, mem_total: u64) -> Option<u64> {
    raw.filter(|&limit| limit < 1 << 62 && limit <= mem_total)
}

/// Applies the scope rule (see the module's documentation) and the levels
/// to one reading: the report to publish, and the crossing it makes.
pub fn evaluate(measure: &Measure, state: &mut Hysteresis) -> (HostMemory, Option<Transition>) {
    let MemInfo { total, available } = measure.meminfo;
    let limited = measure
        .cgroup
        .filter(|cg| cg.limit.is_some_and(|limit| limit < total));
    let (scope, used, total, pressure) = match limited {
        Some(cg) => (
            "cgroup",
            cg.current.saturating_sub(cg.inactive_file.unwrap_or(0)),
            cg.limit.unwrap_or(total),
            cg.pressure_some_avg10,
        ),
        None => (
            "host",
            total.saturating_sub(available),
            total,
            measure.host_pressure_some_avg10,
        ),
    };
    let transition = state.update(used, total);
    let (warn_bytes, recover_bytes) = state.levels(total);
    let report = HostMemory {
        scope: scope.to_owned(),
        used_bytes: used,
        total_bytes: total,
        available_bytes: available,
        cgroup_current_bytes: measure.cgroup.map(|cg| cg.current),
        cgroup_limit_bytes: measure.cgroup.and_then(|cg| cg.limit),
        pressure_some_avg10: pressure,
        warning: state.warning(),
        warn_bytes,
        recover_bytes,
    };
    (report, transition)
}

/// A reading and where the kernel can say that the next one is due.
struct Reading {
    measure: Measure,
    /// The scope's PSI file, for a trigger.
    #[cfg_attr(not(target_os = "linux"), expect(dead_code, reason = "no PSI"))]
    pressure_file: Option<PathBuf>,
    /// The v2 cgroup's memory.events, for an inotify watch.
    #[cfg_attr(not(target_os = "linux"), expect(dead_code, reason = "no inotify"))]
    events_file: Option<PathBuf>,
}

/// The running monitor thread (see [`spawn`]).
///
/// Dropping it leaves the thread running until the process exits, like
/// dropping a [`JoinHandle`]; [`Monitor::stop`] ends it.
#[derive(Debug)]
pub struct Monitor {
    stop: UnixStream,
    thread: JoinHandle<()>,
}

impl Monitor {
    /// Ends the thread (at once, even in the middle of a wait) and waits
    /// for it. An error means the thread panicked (in `publish`).
    pub fn stop(self) -> std::thread::Result<()> {
        // The thread holds the other end and a clone of this one, so the
        // byte is the only thing that ever makes its end readable. A full
        // buffer (a byte already sent) is as good.
        let _ = (&self.stop).write(&[1]);
        self.thread.join()
    }

    /// The thread ended (it only does when stopped, or when `publish`
    /// panicked).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

/// How soon after one reading a kernel notification may cause the next.
const MIN_GAP: Duration = Duration::from_millis(100);

/// Starts the monitor on a thread of its own, `watchdog-memory`, so
/// readings never hold up the daemon's event loop.
///
/// It reads at once, then every `interval`, and sooner when the kernel
/// notifies memory pressure or a cgroup limit event (at most one reading
/// per 100 ms). Every reading is handed to `publish`; the daemon keeps the
/// latest for its status and metrics. A warning is logged once when in use
/// reaches `warn`, and an info line once when it is back at `recover`. A
/// reading that fails is logged once and retried every interval; the
/// first one that works again is logged too.
///
/// The thread runs until [`Monitor::stop`]. On systems other than Linux and
/// macOS it cannot read anything and the call fails with
/// [`io::ErrorKind::Unsupported`].
pub fn spawn(
    warn: Threshold,
    recover: Threshold,
    interval: Duration,
    publish: impl FnMut(HostMemory) + Send + 'static,
) -> io::Result<Monitor> {
    if !cfg!(any(target_os = "linux", target_os = "macos")) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the host memory monitor works on Linux and macOS only",
        ));
    }
    let (stop, stopped) = UnixStream::pair()?;
    stopped.set_nonblocking(true)?;
    stop.set_nonblocking(true)?;
    // Kept by the thread so that dropping the Monitor does not stop it.
    let keep = stop.try_clone()?;
    let interval = interval.max(Duration::from_millis(10));
    let thread = std::thread::Builder::new()
        .name("watchdog-memory".into())
        .spawn(move || {
            let _keep = keep;
            run(Hysteresis::new(warn, recover), interval, &stopped, publish);
        })?;
    Ok(Monitor { stop, thread })
}

/// What woke a wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    Stop,
    Due,
    #[cfg_attr(
        not(target_os = "linux"),
        expect(dead_code, reason = "only Linux has kernel wake-ups")
    )]
    Kernel,
}

/// The monitor's loop.
fn run(
    mut state: Hysteresis,
    interval: Duration,
    stopped: &UnixStream,
    mut publish: impl FnMut(HostMemory),
) {
    let mut sources = Sources::default();
    let mut failing = false;
    let mut warned_at: Option<Instant> = None;
    // Said once: a warning level above all there is never warns.
    let mut told_unreachable = false;
    loop {
        let read_at = Instant::now();
        match sys::read() {
            Ok(reading) => {
                if failing {
                    info!("host memory readings work again");
                    failing = false;
                }
                let (report, transition) = evaluate(&reading.measure, &mut state);
                if report.warn_bytes > report.total_bytes && !told_unreachable {
                    told_unreachable = true;
                    warn!(
                        scope = %report.scope,
                        warn_bytes = report.warn_bytes,
                        total_bytes = report.total_bytes,
                        "host-memory-warn ({}) is more than the {} there is: it never warns; \
                         set it lower, or as a share (\"90%\")",
                        Size(report.warn_bytes),
                        Size(report.total_bytes),
                    );
                }
                log_transition(transition, &report, &mut warned_at);
                publish(report);
                sources.follow(&reading);
            }
            Err(error) => {
                if !failing {
                    warn!(%error, "cannot read the host's memory; trying again every {}",
                        humantime::format_duration(interval));
                    failing = true;
                }
            }
        }
        // Wait for the interval, or for the kernel (but not sooner than
        // MIN_GAP after this reading).
        let due = read_at + interval;
        match sources.wait(stopped, due) {
            Wake::Stop => return,
            Wake::Due => {}
            Wake::Kernel => {
                let soonest = (read_at + MIN_GAP).min(due);
                if wait_fd(stopped, soonest) {
                    return;
                }
            }
        }
    }
}

/// Logs a crossing.
fn log_transition(
    transition: Option<Transition>,
    report: &HostMemory,
    warned_at: &mut Option<Instant>,
) {
    match transition {
        Some(Transition::Warn) => {
            *warned_at = Some(Instant::now());
            warn!(
                scope = %report.scope,
                used_bytes = report.used_bytes,
                total_bytes = report.total_bytes,
                warn_bytes = report.warn_bytes,
                pressure_some_avg10 = report.pressure_some_avg10,
                "memory is running short: {} of {} in use, the warning level is {}",
                Size(report.used_bytes),
                Size(report.total_bytes),
                Size(report.warn_bytes),
            );
        }
        Some(Transition::Recover) => {
            let lasted = warned_at.take().map_or(Duration::ZERO, |at| at.elapsed());
            info!(
                scope = %report.scope,
                used_bytes = report.used_bytes,
                total_bytes = report.total_bytes,
                recover_bytes = report.recover_bytes,
                pressure_some_avg10 = report.pressure_some_avg10,
                lasted_ms = lasted.as_millis() as u64,
                "memory recovered: {} of {} in use after {} short",
                Size(report.used_bytes),
                Size(report.total_bytes),
                humantime::format_duration(Duration::from_secs(lasted.as_secs())),
            );
        }
        None => {}
    }
}

/// Milliseconds for poll(2) until `deadline`, rounded up so a wait never
/// ends just before it.
fn poll_timeout(deadline: Instant) -> libc::c_int {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = left.as_nanos().div_ceil(1_000_000);
    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
}

/// Polls `fds` until one is ready or `deadline`; `false` when the deadline
/// came. Interrupted calls are repeated.
fn poll_until(fds: &mut [libc::pollfd], deadline: Instant) -> bool {
    loop {
        let timeout = poll_timeout(deadline);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if ready > 0 {
            return true;
        }
        if ready == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            if ready < 0 {
                // Cannot poll (should not happen): do not spin.
                std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            }
            return false;
        }
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Waits for the stop signal until `deadline`: `true` when it came.
fn wait_fd(stopped: &UnixStream, deadline: Instant) -> bool {
    let mut fds = [pollfd(stopped.as_raw_fd(), libc::POLLIN)];
    poll_until(&mut fds, deadline) && fds[0].revents != 0
}

/// The PSI trigger this monitor writes: wake when tasks stalled on memory
/// for `stall` in a `window` (`some <stall µs> <window µs>`). Unprivileged
/// writers need a window that is a multiple of 2 s; the kernel takes the
/// last byte written for a terminator, hence the NUL.
pub fn psi_trigger(stall: Duration, window: Duration) -> String {
    format!("some {} {}\0", stall.as_micros(), window.as_micros())
}

/// Tasks stalled on memory for this long ...
#[cfg_attr(not(target_os = "linux"), expect(dead_code, reason = "no PSI"))]
const PSI_STALL: Duration = Duration::from_millis(150);
/// ... in this window wake the monitor.
#[cfg_attr(not(target_os = "linux"), expect(dead_code, reason = "no PSI"))]
const PSI_WINDOW: Duration = Duration::from_secs(2);

#[cfg(target_os = "linux")]
use linux::Sources;

#[cfg(not(target_os = "linux"))]
/// Nothing but the interval wakes the monitor here.
#[derive(Default)]
struct Sources {}

#[cfg(not(target_os = "linux"))]
impl Sources {
    fn follow(&mut self, _reading: &Reading) {}

    fn wait(&mut self, stopped: &UnixStream, due: Instant) -> Wake {
        if wait_fd(stopped, due) {
            Wake::Stop
        } else {
            Wake::Due
        }
    }
}

/// Pure parsers of the kernel's memory files.
pub mod parse {
    use super::MemInfo;

    /// MemTotal and MemAvailable of /proc/meminfo, in bytes.
    pub fn meminfo(text: &str) -> Option<MemInfo> {
        let field = |key: &str| {
            text.lines().find_map(|line| {
                let rest = line.strip_prefix(key)?.strip_prefix(':')?;
                let mut words = rest.split_whitespace();
                let value: u64 = words.next()?.parse().ok()?;
                match words.next() {
                    Some("kB") => value.checked_mul(1024),
                    None => Some(value),
                    Some(_) => None,
                }
            })
        };
        let total = field("MemTotal").filter(|&t| t > 0)?;
        Some(MemInfo {
            total,
            available: field("MemAvailable")?,
        })
    }

    /// The daemon's cgroup paths in /proc/self/cgroup: the v2 one (the
    /// `0::` line) and the v1 memory controller's.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct ProcCgroup {
        pub v2: Option<String>,
        pub v1_memory: Option<String>,
    }

    /// Parses /proc/self/cgroup (`id:controllers:path` lines).
    pub fn proc_cgroup(text: &str) -> ProcCgroup {
        let mut found = ProcCgroup::default();
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if id == "0" && controllers.is_empty() {
                found.v2.get_or_insert_with(|| path.to_owned());
            } else if controllers.split(',').any(|c| c == "memory") {
                found.v1_memory.get_or_insert_with(|| path.to_owned());
            }
        }
        found
    }

    /// A `key value` line of a flat keyed file (memory.stat, memory.events).
    pub fn keyed(text: &str, key: &str) -> Option<u64> {
        text.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == key).then(|| words.next()?.parse().ok())?
        })
    }

    /// A number file (memory.current, memory.usage_in_bytes).
    pub fn number(text: &str) -> Option<u64> {
        text.trim().parse().ok()
    }

    /// A limit file: `max` (v2) is no limit (`Some(None)`), a number is a
    /// limit, anything else does not parse (`None`).
    pub fn limit(text: &str) -> Option<Option<u64>> {
        match text.trim() {
            "max" => Some(None),
            other => other.parse().ok().map(Some),
        }
    }

    /// `avg10` of the `some` line of a PSI file.
    pub fn pressure_some_avg10(text: &str) -> Option<f64> {
        let line = text.lines().find_map(|l| l.strip_prefix("some "))?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("avg10="))?
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
    }
}

#[cfg(target_os = "linux")]
use linux as sys;

#[cfg(target_os = "linux")]
mod linux {
    use std::{
        fs::{self, File, OpenOptions},
        io::{self, Write},
        os::{
            fd::{AsRawFd, FromRawFd, OwnedFd},
            unix::{ffi::OsStrExt, fs::OpenOptionsExt, net::UnixStream},
        },
        path::{Component, Path, PathBuf},
        time::Instant,
    };

    use tracing::debug;

    use super::{
        CgroupUsage, Measure, PSI_STALL, PSI_WINDOW, Reading, Wake, effective_limit, parse,
        poll_until, pollfd, psi_trigger,
    };

    const HOST_PRESSURE: &str = "/proc/pressure/memory";
    const V2_MOUNTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
    const V1_MOUNT: &str = "/sys/fs/cgroup/memory";

    /// One reading.
    pub(super) fn read() -> Result<Reading, String> {
        let text = fs::read_to_string("/proc/meminfo")
            .map_err(|e| format!("cannot read /proc/meminfo: {e}"))?;
        let meminfo =
            parse::meminfo(&text).ok_or("/proc/meminfo has no MemTotal or MemAvailable")?;
        let host_pressure = fs::read_to_string(HOST_PRESSURE)
            .ok()
            .and_then(|t| parse::pressure_some_avg10(&t));
        let own = fs::read_to_string("/proc/self/cgroup")
            .map(|t| parse::proc_cgroup(&t))
            .unwrap_or_default();
        let cgroup = own
            .v2
            .as_deref()
            .and_then(|path| {
                V2_MOUNTS.iter().find_map(|mount| {
                    read_cgroup(Version::V2, Path::new(mount), path, meminfo.total)
                })
            })
            .or_else(|| {
                own.v1_memory.as_deref().and_then(|path| {
                    read_cgroup(Version::V1, Path::new(V1_MOUNT), path, meminfo.total)
                })
            });
        let (usage, pressure_file, events_file) = match cgroup {
            Some(found) => (Some(found.usage), found.pressure_file, found.events_file),
            None => (None, None, None),
        };
        let cgroup_scope = usage.is_some_and(|u| u.limit.is_some_and(|l| l < meminfo.total));
        let host_pressure_file = Path::new(HOST_PRESSURE)
            .exists()
            .then(|| PathBuf::from(HOST_PRESSURE));
        Ok(Reading {
            measure: Measure {
                meminfo,
                cgroup: usage,
                host_pressure_some_avg10: host_pressure,
            },
            // A v1 cgroup has no PSI of its own: the host's wakes us then.
            pressure_file: if cgroup_scope {
                pressure_file.or(host_pressure_file)
            } else {
                host_pressure_file
            },
            events_file,
        })
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Version {
        V1,
        V2,
    }

    impl Version {
        fn current(self) -> &'static str {
            match self {
                Self::V1 => "memory.usage_in_bytes",
                Self::V2 => "memory.current",
            }
        }

        fn limit(self) -> &'static str {
            match self {
                Self::V1 => "memory.limit_in_bytes",
                Self::V2 => "memory.max",
            }
        }

        fn inactive_file(self) -> &'static str {
            match self {
                Self::V1 => "total_inactive_file",
                Self::V2 => "inactive_file",
            }
        }
    }

    struct Found {
        usage: CgroupUsage,
        pressure_file: Option<PathBuf>,
        events_file: Option<PathBuf>,
    }

    /// The daemon's cgroup under `mount`, or the ancestor with the
    /// tightest limit; `None` when its usage cannot be read there.
    fn read_cgroup(version: Version, mount: &Path, path: &str, mem_total: u64) -> Option<Found> {
        let dirs = chain(mount, path, |p| p.is_dir());
        let limits = dirs.iter().map(|dir| {
            let raw = fs::read_to_string(dir.join(version.limit()))
                .ok()
                .and_then(|t| parse::limit(&t))
                .flatten();
            effective_limit(raw, mem_total)
        });
        let (dir, limit) = pick(dirs.iter().zip(limits))?;
        let current = fs::read_to_string(dir.join(version.current()))
            .ok()
            .and_then(|t| parse::number(&t))?;
        let inactive_file = fs::read_to_string(dir.join("memory.stat"))
            .ok()
            .and_then(|t| parse::keyed(&t, version.inactive_file()));
        let (pressure_file, events_file) = match version {
            Version::V1 => (None, None),
            Version::V2 => {
                let events = dir.join("memory.events");
                (
                    Some(dir.join("memory.pressure")),
                    events.exists().then_some(events),
                )
            }
        };
        let pressure_some_avg10 = pressure_file
            .as_ref()
            .and_then(|f| fs::read_to_string(f).ok())
            .and_then(|t| parse::pressure_some_avg10(&t));
        Some(Found {
            usage: CgroupUsage {
                current,
                limit,
                inactive_file,
                pressure_some_avg10,
            },
            pressure_file: pressure_file.filter(|f| f.exists()),
            events_file,
        })
    }

    /// The cgroup to report from a chain of (directory, limit), nearest
    /// first: the one with the tightest limit (the nearest of equals), or
    /// the nearest when none has one.
    pub(super) fn pick<'a>(
        chain: impl Iterator<Item = (&'a PathBuf, Option<u64>)>,
    ) -> Option<(&'a PathBuf, Option<u64>)> {
        let mut first = None;
        let mut tightest: Option<(&PathBuf, u64)> = None;
        for (dir, limit) in chain {
            first.get_or_insert((dir, None));
            if let Some(limit) = limit
                && tightest.is_none_or(|(_, t)| limit < t)
            {
                tightest = Some((dir, limit));
            }
        }
        tightest.map(|(dir, limit)| (dir, Some(limit))).or(first)
    }

    /// The directories of the cgroup `path` (as /proc/self/cgroup writes
    /// it) under `mount` and of its ancestors up to the mount's root,
    /// nearest first. When the path does not exist there (a container whose
    /// own cgroup is mounted as the root), or leaves the mount (`..`, a
    /// cgroup outside the namespace), only the root.
    pub(super) fn chain(mount: &Path, path: &str, is_dir: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
        let relative = Path::new(path.trim_start_matches('/'));
        let plain = relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        let own = mount.join(relative);
        if !plain || own == mount || !is_dir(&own) {
            return vec![mount.to_path_buf()];
        }
        let mut dirs: Vec<PathBuf> = own
            .ancestors()
            .take_while(|dir| dir.starts_with(mount))
            .map(Path::to_path_buf)
            .collect();
        dirs.dedup();
        dirs
    }

    /// The kernel's wake-ups: a PSI trigger and an inotify watch on a v2
    /// memory.events, following the files the latest reading named.
    #[derive(Default)]
    pub(super) struct Sources {
        psi: Watch,
        events: Watch,
    }

    /// One kernel source: the file it is for (also when arming it
    /// failed, so that a refusal is not repeated every reading) and its fd.
    #[derive(Default)]
    struct Watch {
        file: Option<PathBuf>,
        fd: Option<OwnedFd>,
    }

    impl Sources {
        /// Arms the sources for the reading's files, when they changed.
        pub(super) fn follow(&mut self, reading: &Reading) {
            if self.psi.file != reading.pressure_file {
                self.psi.fd = None;
                self.psi.file.clone_from(&reading.pressure_file);
                if let Some(file) = &self.psi.file {
                    match arm_psi(file) {
                        Ok(fd) => {
                            debug!(file = %file.display(), "memory pressure trigger armed");
                            self.psi.fd = Some(fd);
                        }
                        Err(error) => debug!(
                            file = %file.display(), %error,
                            "cannot arm a memory pressure trigger; reading every interval"
                        ),
                    }
                }
            }
            if self.events.file != reading.events_file {
                self.events.fd = None;
                self.events.file.clone_from(&reading.events_file);
                if let Some(file) = &self.events.file {
                    match watch_modify(file) {
                        Ok(fd) => {
                            debug!(file = %file.display(), "watching the cgroup's memory events");
                            self.events.fd = Some(fd);
                        }
                        Err(error) => debug!(
                            file = %file.display(), %error,
                            "cannot watch the cgroup's memory events"
                        ),
                    }
                }
            }
        }

        /// Waits until `due`, the stop signal or a kernel notification.
        pub(super) fn wait(&mut self, stopped: &UnixStream, due: Instant) -> Wake {
            loop {
                let mut fds = vec![pollfd(stopped.as_raw_fd(), libc::POLLIN)];
                if let Some(fd) = &self.psi.fd {
                    fds.push(pollfd(fd.as_raw_fd(), libc::POLLPRI));
                }
                if let Some(fd) = &self.events.fd {
                    fds.push(pollfd(fd.as_raw_fd(), libc::POLLIN));
                }
                if !poll_until(&mut fds, due) {
                    return Wake::Due;
                }
                if fds[0].revents != 0 {
                    return Wake::Stop;
                }
                let mut woke = false;
                for entry in &fds[1..] {
                    let psi = self
                        .psi
                        .fd
                        .as_ref()
                        .is_some_and(|fd| fd.as_raw_fd() == entry.fd);
                    let bad = entry.revents & (libc::POLLERR | libc::POLLNVAL | libc::POLLHUP) != 0;
                    if psi {
                        if bad {
                            // The trigger is gone (its cgroup was removed):
                            // interval readings until the file changes.
                            debug!("the memory pressure trigger stopped working");
                            self.psi.fd = None;
                        } else if entry.revents & libc::POLLPRI != 0 {
                            woke = true;
                        }
                    } else if bad {
                        self.events.fd = None;
                    } else if entry.revents & libc::POLLIN != 0 {
                        if let Some(fd) = &self.events.fd {
                            drain(fd);
                        }
                        woke = true;
                    }
                }
                if woke {
                    return Wake::Kernel;
                }
            }
        }
    }

    /// Opens a PSI file for a trigger and writes it.
    pub(super) fn arm_psi(file: &Path) -> io::Result<OwnedFd> {
        let mut handle: File = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(file)?;
        handle.write_all(psi_trigger(PSI_STALL, PSI_WINDOW).as_bytes())?;
        Ok(handle.into())
    }

    /// An inotify instance watching `file` for IN_MODIFY.
    fn watch_modify(file: &Path) -> io::Result<OwnedFd> {
        // SAFETY: plain syscall; the fd is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(file.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a valid inotify fd and a NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_MODIFY) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }

    /// Reads every pending event of a non-blocking inotify fd.
    fn drain(fd: &OwnedFd) {
        let mut buf = [0u8; 4096];
        // SAFETY: reading into our own buffer of that size.
        while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

#[cfg(target_os = "macos")]
use macos as sys;

#[cfg(target_os = "macos")]
mod macos {
    use std::mem::{MaybeUninit, size_of};

    use mach2::{
        kern_return::KERN_SUCCESS, mach_init::mach_host_self, mach_port::mach_port_deallocate,
        message::mach_msg_type_number_t, traps::mach_task_self, vm_statistics::vm_statistics64,
    };

    use super::{Measure, MemInfo, Reading};

    /// One reading of the host: hw.memsize, and in use as Activity Monitor
    /// counts it (app memory, wired and compressed pages).
    pub(super) fn read() -> Result<Reading, String> {
        let total = sysctl_u64(c"hw.memsize").ok_or("cannot read sysctl hw.memsize")?;
        let page = sysctl_u64(c"hw.pagesize").ok_or("cannot read sysctl hw.pagesize")?;
        let vm = vm_statistics().ok_or("host_statistics64 failed")?;
        let pages = u64::from(vm.internal_page_count).saturating_sub(u64::from(vm.purgeable_count))
            + u64::from(vm.wire_count)
            + u64::from(vm.compressor_page_count);
        let used = pages.saturating_mul(page).min(total);
        Ok(Reading {
            measure: Measure {
                meminfo: MemInfo {
                    total,
                    available: total - used,
                },
                cgroup: None,
                host_pressure_some_avg10: None,
            },
            pressure_file: None,
            events_file: None,
        })
    }

    fn sysctl_u64(name: &std::ffi::CStr) -> Option<u64> {
        let mut value: u64 = 0;
        let mut len = size_of::<u64>();
        // SAFETY: a NUL-terminated name and an out buffer of `len` bytes.
        let rc = unsafe {
            libc::sysctlbyname(
                name.as_ptr(),
                (&raw mut value).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        // hw.pagesize may be 4 bytes wide on some systems.
        match (rc, len) {
            (0, 8) => Some(value),
            (0, 4) => Some(u64::from(value as u32)),
            _ => None,
        }
        .filter(|&v| v > 0)
    }

    fn vm_statistics() -> Option<vm_statistics64> {
        let mut info = MaybeUninit::<vm_statistics64>::zeroed();
        let mut count =
            (size_of::<vm_statistics64>() / size_of::<libc::integer_t>()) as mach_msg_type_number_t;
        // SAFETY: a send right to the host port, released below.
        let host = unsafe { mach_host_self() };
        // SAFETY: the buffer holds `count` integer_t words; the kernel
        // fills at most that many.
        let kr = unsafe {
            libc::host_statistics64(
                host,
                libc::HOST_VM_INFO64,
                info.as_mut_ptr().cast(),
                &mut count,
            )
        };
        // SAFETY: releasing the right mach_host_self gave us.
        unsafe { mach_port_deallocate(mach_task_self(), host) };
        // SAFETY: zero-initialized plain integers, filled by the kernel.
        (kr == KERN_SUCCESS).then(|| unsafe { info.assume_init() })
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
mod sys {
    use super::Reading;

    pub(super) fn read() -> Result<Reading, String> {
        Err("the host memory monitor works on Linux and macOS only".into())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    const GIB: u64 = 1 << 30;

    fn host(total: u64, available: u64) -> Measure {
        Measure {
            meminfo: MemInfo { total, available },
            cgroup: None,
            host_pressure_some_avg10: Some(0.5),
        }
    }

    #[test]
    fn warns_and_recovers_once_across_a_crossing_and_back() {
        let mut h = Hysteresis::new(Threshold::Percent(90.0), Threshold::Percent(85.0));
        let total = 100 * GIB;
        let seen: Vec<_> = [50, 80, 89, 90, 95, 99, 92, 86, 85, 70, 60]
            .iter()
            .map(|used| h.update(used * GIB, total))
            .collect();
        let mut expected = vec![None; 11];
        expected[3] = Some(Transition::Warn);
        expected[8] = Some(Transition::Recover);
        assert_eq!(seen, expected);
        assert!(!h.warning());
    }

    #[test]
    fn no_repeats_while_oscillating_inside_the_band() {
        let mut h = Hysteresis::new(Threshold::Bytes(900), Threshold::Bytes(800));
        assert_eq!(h.update(950, 1000), Some(Transition::Warn));
        for used in [850, 910, 801, 899, 900, 1000, 820] {
            assert_eq!(h.update(used, 1000), None, "at {used}");
            assert!(h.warning());
        }
        assert_eq!(h.update(800, 1000), Some(Transition::Recover));
        for used in [801, 850, 899, 100] {
            assert_eq!(h.update(used, 1000), None, "at {used}");
        }
        assert_eq!(h.update(900, 1000), Some(Transition::Warn));
    }

    #[test]
    fn percent_levels_follow_a_changing_total() {
        let mut h = Hysteresis::new(Threshold::Percent(90.0), Threshold::Percent(80.0));
        // 850 MiB of a 1 GiB limit: under 90%.
        assert_eq!(h.update(850 << 20, GIB), None);
        // The limit is lowered to 900 MiB: the same usage is now 94%.
        assert_eq!(h.update(850 << 20, 900 << 20), Some(Transition::Warn));
        assert_eq!(h.levels(900 << 20), (810 << 20, 720 << 20));
        // The limit is raised to 2 GiB: 42%, back under 80%.
        assert_eq!(h.update(850 << 20, 2 * GIB), Some(Transition::Recover));
    }

    #[test]
    fn recovery_level_is_kept_under_the_warning_level() {
        let h = Hysteresis::new(Threshold::Bytes(100), Threshold::Bytes(500));
        assert_eq!(h.levels(1000), (100, 99));
        let mut tiny = Hysteresis::new(Threshold::Bytes(1), Threshold::Bytes(1).default_recovery());
        assert_eq!(tiny.levels(1000), (1, 0));
        assert_eq!(tiny.update(1, 1000), Some(Transition::Warn));
        assert_eq!(tiny.update(1, 1000), None);
    }

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:       24684084 kB\nMemFree:        14574964 kB\n\
                    MemAvailable:   24197832 kB\nBuffers:          123 kB\n";
        assert_eq!(
            parse::meminfo(text),
            Some(MemInfo {
                total: 24_684_084 * 1024,
                available: 24_197_832 * 1024
            })
        );
        assert_eq!(parse::meminfo("MemTotal: 100 kB\n"), None);
        assert_eq!(parse::meminfo("MemTotal: 0 kB\nMemAvailable: 0 kB\n"), None);
        assert_eq!(parse::meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n"), None);
        // MemTotalX is not MemTotal.
        assert_eq!(
            parse::meminfo("MemTotalX: 5 kB\nMemAvailable: 1 kB\n"),
            None
        );
    }

    #[test]
    fn parses_proc_self_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/792a\n3:cpuset:/\n0::/\n";
        assert_eq!(
            parse::proc_cgroup(hybrid),
            parse::ProcCgroup {
                v2: Some("/".into()),
                v1_memory: Some("/process_api/792a".into())
            }
        );
        let v2 = "0::/system.slice/watchdog.service\n";
        assert_eq!(
            parse::proc_cgroup(v2),
            parse::ProcCgroup {
                v2: Some("/system.slice/watchdog.service".into()),
                v1_memory: None
            }
        );
        let comma = "7:cpu,memory,cpuacct:/docker/abc:def\n";
        assert_eq!(
            parse::proc_cgroup(comma).v1_memory.as_deref(),
            Some("/docker/abc:def")
        );
        // memory_recursiveprot is not memory, nor is a name= hierarchy.
        let other = "1:name=memory:/x\n2:memorycg:/y\n";
        assert_eq!(parse::proc_cgroup(other), parse::ProcCgroup::default());
    }

    #[test]
    fn parses_cgroup_files() {
        assert_eq!(parse::number("3072000\n"), Some(3_072_000));
        assert_eq!(parse::number("x"), None);
        assert_eq!(parse::limit("max\n"), Some(None));
        assert_eq!(parse::limit("536870912\n"), Some(Some(512 << 20)));
        assert_eq!(parse::limit(""), None);
        let stat = "cache 1\ninactive_file 94208\ntotal_inactive_file 6090780672\n";
        assert_eq!(parse::keyed(stat, "inactive_file"), Some(94_208));
        assert_eq!(
            parse::keyed(stat, "total_inactive_file"),
            Some(6_090_780_672)
        );
        assert_eq!(parse::keyed(stat, "active_file"), None);
        let events = "low 0\nhigh 12\nmax 3\noom 0\noom_kill 0\n";
        assert_eq!(parse::keyed(events, "max"), Some(3));
    }

    #[test]
    fn parses_pressure() {
        let text = "some avg10=1.25 avg60=0.40 avg300=0.00 total=12868\n\
                    full avg10=0.50 avg60=0.00 avg300=0.00 total=4429\n";
        assert_eq!(parse::pressure_some_avg10(text), Some(1.25));
        assert_eq!(parse::pressure_some_avg10("full avg10=0.50\n"), None);
        assert_eq!(parse::pressure_some_avg10(""), None);
    }

    #[test]
    fn unlimited_and_oversized_limits_do_not_count() {
        let total = 24 * GIB;
        assert_eq!(effective_limit(None, total), None);
        assert_eq!(
            effective_limit(Some(9_223_372_036_854_771_712), total),
            None
        );
        assert_eq!(effective_limit(Some(1 << 62), total), None);
        assert_eq!(effective_limit(Some(32 * GIB), total), None);
        assert_eq!(effective_limit(Some(total), total), Some(total));
        assert_eq!(effective_limit(Some(2 * GIB), total), Some(2 * GIB));
    }

    #[test]
    fn host_scope_without_a_limit() {
        let mut h = Hysteresis::new(Threshold::Percent(90.0), Threshold::Percent(85.0));
        let mut m = host(16 * GIB, 4 * GIB);
        m.cgroup = Some(CgroupUsage {
            current: GIB,
            limit: None,
            inactive_file: Some(GIB / 2),
            pressure_some_avg10: Some(9.0),
        });
        let (report, transition) = evaluate(&m, &mut h);
        assert_eq!(transition, None);
        assert_eq!(
            report,
            HostMemory {
                scope: "host".into(),
                used_bytes: 12 * GIB,
                total_bytes: 16 * GIB,
                available_bytes: 4 * GIB,
                cgroup_current_bytes: Some(GIB),
                cgroup_limit_bytes: None,
                pressure_some_avg10: Some(0.5),
                warning: false,
                warn_bytes: Threshold::Percent(90.0).bytes_of(16 * GIB),
                recover_bytes: Threshold::Percent(85.0).bytes_of(16 * GIB),
            }
        );
    }

    #[test]
    fn cgroup_scope_with_a_limit_under_the_host() {
        let mut h = Hysteresis::new(Threshold::Percent(90.0), Threshold::Percent(85.0));
        let mut m = host(16 * GIB, 10 * GIB);
        m.cgroup = Some(CgroupUsage {
            current: 2 * GIB,
            limit: Some(2 * GIB),
            inactive_file: Some(GIB / 4),
            pressure_some_avg10: None,
        });
        let (report, transition) = evaluate(&m, &mut h);
        assert_eq!(transition, None, "7/8 of the limit is under 90%");
        assert_eq!(report.scope, "cgroup");
        assert_eq!(report.used_bytes, 2 * GIB - GIB / 4);
        assert_eq!(report.total_bytes, 2 * GIB);
        assert_eq!(report.available_bytes, 10 * GIB);
        assert_eq!(report.cgroup_limit_bytes, Some(2 * GIB));
        assert_eq!(
            report.pressure_some_avg10, None,
            "the cgroup's, not the host's"
        );
        // Page cache gone, the same usage is now all in use.
        m.cgroup = m.cgroup.map(|cg| CgroupUsage {
            inactive_file: None,
            ..cg
        });
        let (report, transition) = evaluate(&m, &mut h);
        assert_eq!(transition, Some(Transition::Warn));
        assert!(report.warning);
        // A limit equal to MemTotal is the host.
        m.cgroup = m.cgroup.map(|cg| CgroupUsage {
            limit: Some(16 * GIB),
            ..cg
        });
        let (report, transition) = evaluate(&m, &mut h);
        assert_eq!(report.scope, "host");
        assert_eq!(report.used_bytes, 6 * GIB);
        assert_eq!(transition, Some(Transition::Recover));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn cgroup_chain_walks_up_or_falls_back_to_the_root() {
        use std::path::Path;

        let mount = Path::new("/sys/fs/cgroup/memory");
        let all = |_: &Path| true;
        assert_eq!(
            linux::chain(mount, "/a/b", all),
            vec![mount.join("a/b"), mount.join("a"), mount.to_path_buf()]
        );
        assert_eq!(linux::chain(mount, "/", all), vec![mount.to_path_buf()]);
        // Missing under the mount: the mount's root is the container's.
        assert_eq!(
            linux::chain(mount, "/docker/abc", |_| false),
            vec![mount.to_path_buf()]
        );
        // Outside the cgroup namespace.
        assert_eq!(linux::chain(mount, "/../x", all), vec![mount.to_path_buf()]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_tightest_limit_on_the_way_up_wins() {
        let dirs: Vec<PathBuf> = ["leaf", "unit", "slice", "root"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let pick = |limits: [Option<u64>; 4]| {
            linux::pick(dirs.iter().zip(limits))
                .map(|(dir, limit)| (dir.to_str().unwrap_or_default().to_owned(), limit))
        };
        assert_eq!(pick([None, None, None, None]), Some(("leaf".into(), None)));
        assert_eq!(
            pick([None, Some(4), Some(8), None]),
            Some(("unit".into(), Some(4)))
        );
        assert_eq!(
            pick([Some(8), Some(8), Some(2), None]),
            Some(("slice".into(), Some(2)))
        );
        assert_eq!(
            pick([Some(3), Some(3), None, None]),
            Some(("leaf".into(), Some(3)))
        );
        assert_eq!(linux::pick(std::iter::empty()), None);
    }

    #[test]
    fn psi_trigger_is_terminated_and_unprivileged_friendly() {
        assert_eq!(psi_trigger(PSI_STALL, PSI_WINDOW), "some 150000 2000000\0");
        assert_eq!(PSI_WINDOW.as_micros() % 2_000_000, 0);
        assert!(PSI_STALL < PSI_WINDOW);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn spawn_reads_publishes_warns_and_stops() {
        let (tx, rx) = mpsc::channel();
        let monitor = spawn(
            Threshold::Bytes(1),
            Threshold::Bytes(1).default_recovery(),
            Duration::from_millis(20),
            move |report| {
                let _ = tx.send(report);
            },
        )
        .expect("spawn");
        let first = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a first reading");
        let second = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a second reading");
        for report in [&first, &second] {
            assert!(report.total_bytes > 0, "{report:?}");
            assert!(report.used_bytes > 0, "{report:?}");
            assert!(report.used_bytes <= report.total_bytes, "{report:?}");
            assert!(report.available_bytes > 0, "{report:?}");
            assert!(report.warning, "{report:?}");
            assert_eq!((report.warn_bytes, report.recover_bytes), (1, 0));
            assert!(report.scope == "host" || report.scope == "cgroup");
        }
        let started = Instant::now();
        monitor.stop().expect("the thread ends cleanly");
        assert!(started.elapsed() < Duration::from_secs(2));
        // Nothing is published after the thread ended.
        while rx.try_recv().is_ok() {}
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stop_interrupts_a_long_wait() {
        let monitor = spawn(
            Threshold::Percent(99.9),
            Threshold::Percent(95.0),
            Duration::from_secs(3600),
            |_| {},
        )
        .expect("spawn");
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        monitor.stop().expect("the thread ends cleanly");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn dropping_the_handle_detaches_the_thread() {
        let (tx, rx) = mpsc::channel();
        let mut sent = 0;
        drop(
            spawn(
                Threshold::Percent(99.9),
                Threshold::Percent(95.0),
                Duration::from_millis(10),
                move |report| {
                    sent += 1;
                    let _ = tx.send(report);
                    // Enough: park the detached thread for the rest of the
                    // test run rather than let it read every 10 ms.
                    if sent >= 3 {
                        loop {
                            std::thread::park();
                        }
                    }
                },
            )
            .expect("spawn"),
        );
        for _ in 0..3 {
            assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok());
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_machine() {
        let reading = linux::read().expect("a reading");
        let m = reading.measure;
        assert!(m.meminfo.total > 0);
        assert!(m.meminfo.available <= m.meminfo.total);
        if let Some(file) = &reading.pressure_file {
            assert!(file.exists());
        }
    }
}
