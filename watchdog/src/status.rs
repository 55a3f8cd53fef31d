//! What the running daemon reports about itself: the snapshot that
//! `watchdog status` prints, `/healthz` summarises and `/metrics` exposes.
//! Its JSON form (`watchdog status --json`) is an interface for scripts:
//! fields are added, never renamed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The file name of the status socket in the state directory.
pub const SOCKET: &str = "status.sock";

/// The daemon and everything it runs, at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The daemon's version.
    pub version: String,
    /// The daemon's pid.
    pub pid: u32,
    /// Where memory readings come from: `ebpf`, `procfs` or `macos`.
    pub sensor: String,
    /// The form each kernel program was attached in, by program
    /// (`rss_stat`, `sched_process_exit`, `mark_victim`), with the reason
    /// for a fallback in parentheses: `"raw (BTF form refused by the
    /// verifier: ...)"`. Absent when sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_programs: Option<BTreeMap<String, String>>,
    /// How long the daemon has run.
    pub uptime_ms: u64,
    /// The loop's health.
    pub health: Health,
    /// Events the kernel programs could not deliver, by counter
    /// (`ringbuf_full`, `watch_table_full`), since start.
    pub lost_events: BTreeMap<String, u64>,
    /// Kernel crossings that exact readings did not confirm.
    pub unconfirmed_crossings: u64,
    /// Audit lines that could not be written (a full disk).
    pub audit_lines_lost: u64,
    /// Log records dropped because standard error was not read fast
    /// enough (the daemon's own, and with JSON logs the services' lines).
    #[serde(default)]
    pub log_lines_lost: u64,
    /// The host's (or the daemon's container's) memory, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<HostMemory>,
    /// Services and watch targets, in configuration order.
    pub services: Vec<ServiceStatus>,
    /// The service loop did not answer in time: the services are as of its
    /// last heartbeat (`health.heartbeat_age_ms` ago), their memory read
    /// now.
    #[serde(default)]
    pub stale: bool,
}

/// Whether the loop turns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// The heartbeat is fresh and the sensor works.
    pub ok: bool,
    /// The daemon is starting: its service loop has not begun (healthy
    /// until start-up has taken longer than health-timeout plus
    /// orphan-grace).
    #[serde(default)]
    pub starting: bool,
    /// Why not, when not (`null` when healthy).
    #[serde(default)]
    pub problem: Option<String>,
    /// Time since the loop's own timer last stamped its heartbeat.
    pub heartbeat_age_ms: u64,
    /// How late the loop's timer fired last (event-loop lag), in µs.
    pub loop_lag_us: u64,
    /// The largest lag seen since start, in µs.
    pub loop_lag_max_us: u64,
    /// A heartbeat older than this is unhealthy.
    pub threshold_ms: u64,
}

/// Whether a service runs processes or watches ones it did not start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    Service,
    Watch,
}

/// Where a service is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not started yet, or being started.
    #[default]
    Starting,
    Running,
    /// A watch target whose process is not found (yet).
    Waiting,
    /// Being stopped (a drain signal was sent).
    Draining,
    /// Waiting to start again after an exit.
    Backoff,
    /// Over: stopped on request or by its restart policy.
    Stopped,
    /// Over: its last run failed and its restart policy says no more.
    Failed,
    /// Over: too many crashes in a row.
    GaveUp,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Waiting => "waiting",
            Self::Draining => "draining",
            Self::Backoff => "backoff",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::GaveUp => "gave_up",
        }
    }

    /// Every state, for metrics that show one series per state.
    pub const ALL: [Self; 8] = [
        Self::Starting,
        Self::Running,
        Self::Waiting,
        Self::Draining,
        Self::Backoff,
        Self::Stopped,
        Self::Failed,
        Self::GaveUp,
    ];
}

/// One service or watch target.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub kind: Kind,
    pub state: State,
    /// The run's main process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Processes in the run's tree.
    pub processes: u32,
    /// The tree's charged memory (RssAnon + RssShmem of one process,
    /// Pss_Anon + Pss_Shmem of several), read when the snapshot was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charged_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_limit_bytes: Option<u64>,
    /// Restarts by the cause of the exit before them (the audit log's
    /// `cause` values: `crash`, `memory_drain`, ...).
    pub restarts: BTreeMap<String, u64>,
    /// Crashes in a row (reset by a run that stays up).
    pub crash_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit_cause: Option<String>,
    /// How long the current run has been up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// Time left before the next start (state `backoff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
    /// The respawn marker is written.
    pub marker: bool,
    /// The tree's processes, for reading its memory off the loop.
    #[serde(skip)]
    pub members: Vec<u32>,
}

/// The memory of the host, or of the daemon's container when its cgroup
/// has a limit: what the memory monitor last measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostMemory {
    /// `host` (MemTotal - MemAvailable of /proc/meminfo) or `cgroup` (the
    /// daemon's cgroup: usage less inactive file pages, against its limit).
    pub scope: String,
    /// In use, as the scope counts it.
    pub used_bytes: u64,
    /// What there is: MemTotal, or the cgroup's limit.
    pub total_bytes: u64,
    /// /proc/meminfo MemAvailable.
    pub available_bytes: u64,
    /// The daemon's cgroup's usage (v2 memory.current, v1
    /// memory.usage_in_bytes), when readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_current_bytes: Option<u64>,
    /// Its limit, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_limit_bytes: Option<u64>,
    /// PSI `some avg10` of the scope's memory pressure, when the kernel
    /// has PSI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure_some_avg10: Option<f64>,
    /// Over the warning threshold (and not yet back under the recovery
    /// level).
    pub warning: bool,
    /// The warning threshold and the recovery level, in bytes used.
    pub warn_bytes: u64,
    pub recover_bytes: u64,
}
