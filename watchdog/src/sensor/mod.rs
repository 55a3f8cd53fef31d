//! One typed event stream (memory crossings, exits, forks) from whichever
//! sensor works here: the kernel programs (Linux, privileged), or sampling
//! (procfs on Linux, task_info / proc_pid_rusage on macOS).
//!
//! Memory is watched per group: a root process and all its descendants,
//! charged each page once (see [`crate::mem::read_tree`]). A group fires
//! once when it crosses its limit, then stays quiet until
//! [`Sensor::rearm`] and a dip below `limit - hysteresis`, so a value
//! hovering at the limit cannot flood anyone.

#[cfg(target_os = "linux")]
mod ebpf;
mod exits;
mod group;
mod sampler;

use std::fmt;

use serde::Serialize;

use crate::{
    event::{ProcessExit, ProcessFork},
    mem::{Charged, GroupReading},
};

pub use group::{Edge, GroupId, Limits, Trigger};
pub use sampler::SamplingOptions;

/// Which sensor to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SensorChoice {
    /// The kernel programs when they load, else sampling with one warning.
    #[default]
    Auto,
    /// The kernel programs, or fail.
    Ebpf,
    /// Sampling only.
    Sampling,
}

/// The command-line options that choose and tune the sensor.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct SensorArgs {
    /// Which sensor to use.
    #[arg(long, value_enum, default_value_t = SensorChoice::Auto)]
    pub sensor: SensorChoice,
    /// Sampling interval while far from the limit (sampling sensor).
    #[arg(long, value_name = "DURATION", value_parser = crate::config::de::parse_duration, default_value = "1s", allow_hyphen_values = true)]
    pub interval: std::time::Duration,
    /// Shortest sampling interval, used near the limit (sampling sensor).
    #[arg(long, value_name = "DURATION", value_parser = crate::config::de::parse_duration, default_value = "50ms", allow_hyphen_values = true)]
    pub min_interval: std::time::Duration,
}

impl SensorArgs {
    /// Refuses intervals that cannot work: the usage error's message.
    pub fn check(&self) -> Result<(), String> {
        if self.interval.is_zero() || self.min_interval.is_zero() {
            return Err("--interval and --min-interval must be more than 0".into());
        }
        if self.min_interval > self.interval {
            return Err(format!(
                "--min-interval ({}) is longer than --interval ({}); make the minimum the shorter",
                humantime::format_duration(self.min_interval),
                humantime::format_duration(self.interval)
            ));
        }
        Ok(())
    }

    /// Opens the sensor these options choose.
    pub fn open(&self) -> Result<Sensor, SensorError> {
        Sensor::open(
            self.sensor,
            SamplingOptions {
                interval: self.interval,
                min_interval: self.min_interval,
            },
        )
    }
}

/// Which sensor produced an event (the audit log's `source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Ebpf,
    Procfs,
    Macos,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ebpf => "ebpf",
            Self::Procfs => "procfs",
            Self::Macos => "macos",
        })
    }
}

/// A confirmed crossing: the group's exact charged total is at or over its
/// limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crossing {
    pub group: GroupId,
    /// The process whose growth crossed the line, when known.
    pub pid: Option<u32>,
    /// The exact total when confirmed.
    pub charged_bytes: u64,
    pub limit_bytes: u64,
    /// CLOCK_MONOTONIC ns when the crossing was sensed (the kernel's
    /// timestamp, or the sample's).
    pub sensed_ns: u64,
    /// CLOCK_MONOTONIC ns when the exact reading confirmed it.
    pub confirmed_ns: u64,
    /// Members read for the confirmation.
    pub members: usize,
    /// The measure that confirmed it: RssAnon + RssShmem for a single
    /// process, Pss_Anon + Pss_Shmem for a tree of several.
    pub metric: Charged,
}

/// What the sensor reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SensorEvent {
    OverLimit(Crossing),
    /// A group that fired fell below its re-arm level and is armed again.
    Rearmed {
        group: GroupId,
        charged_bytes: u64,
    },
    /// A group's total moved by at least its step.
    Changed {
        group: GroupId,
        charged_bytes: u64,
    },
    /// A watched process exited (`group` is its group, if any).
    Exit {
        group: Option<GroupId>,
        exit: ProcessExit,
    },
    Fork {
        group: Option<GroupId>,
        fork: ProcessFork,
    },
    /// The kernel's OOM killer chose this watched process (kernel programs
    /// only; its exit follows).
    OomVictim {
        group: Option<GroupId>,
        pid: u32,
    },
    /// The kernel programs lost events or could not track processes
    /// (`counter`: `ringbuf_full`, `watch_table_full`): `count` since the
    /// last report, `total` since the sensor started. The sensor has
    /// resynchronised its groups from /proc and re-armed them; exits and
    /// forks lost meanwhile are not reported.
    Lost {
        counter: &'static str,
        count: u64,
        total: u64,
    },
}

impl SensorEvent {
    /// The group the event is about, if any.
    pub fn group(&self) -> Option<GroupId> {
        match self {
            Self::OverLimit(c) => Some(c.group),
            Self::Rearmed { group, .. } | Self::Changed { group, .. } => Some(*group),
            Self::Exit { group, .. } | Self::Fork { group, .. } | Self::OomVictim { group, .. } => {
                *group
            }
            Self::Lost { .. } => None,
        }
    }
}

/// Counters a status page shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SensorStats {
    /// Kernel crossings that exact readings did not confirm (re-armed).
    pub unconfirmed_crossings: u64,
    /// Exact re-readings of unconfirmed crossings (backing off while the
    /// kernel's total stays over the limit).
    pub rechecks: u64,
    /// Resynchronisations of the groups after kernel losses.
    pub resyncs: u64,
    /// Exact readings of groups whose processes share pages copy-on-write
    /// (kernel programs; see `sensor::ebpf`).
    pub shared_checks: u64,
    /// Exact readings of groups within the kernel counters' lag of their
    /// limit (kernel programs; see `sensor::ebpf`).
    pub near_checks: u64,
    /// Events the kernel could not deliver (ring buffer full).
    pub lost_events: u64,
    /// Samples taken (sampling sensors).
    pub samples: u64,
}

/// Why a sensor could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    #[cfg(target_os = "linux")]
    #[error(transparent)]
    Kernel(#[from] crate::kernel::LoadError),
    #[error("the kernel programs are only available on Linux")]
    NoKernelPrograms,
    #[error("no process with pid {0}")]
    NoProcess(u32),
    #[error("unknown group {0:?}")]
    UnknownGroup(GroupId),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(
        "the kernel programs cannot work in a pid namespace of its own (a container without \
         hostPID): they report host pids. Run with hostPID, or use --sensor sampling"
    )]
    PidNamespace,
}

/// The sensor in use.
pub enum Sensor {
    #[cfg(target_os = "linux")]
    Ebpf(Box<ebpf::EbpfSensor>),
    Sampler(Box<sampler::Sampler>),
}

impl Sensor {
    /// Opens the chosen sensor. `Auto` falls back to sampling with one
    /// warning that says why. Must be called inside a tokio runtime.
    /// In a pid namespace of its own (a container without hostPID), where
    /// the kernel programs' host pids mean nothing, `Auto` samples with
    /// one warning that says so and `Ebpf` is refused.
    pub fn open(choice: SensorChoice, sampling: SamplingOptions) -> Result<Self, SensorError> {
        if choice != SensorChoice::Sampling && crate::procs::in_child_pid_namespace() {
            if choice == SensorChoice::Ebpf {
                return Err(SensorError::PidNamespace);
            }
            tracing::warn!(
                interval = ?sampling.interval,
                "running in a pid namespace of its own (a container without hostPID): memory \
                 is sampled, since the kernel programs report host pids; run with hostPID to \
                 use them"
            );
            return Ok(Self::Sampler(Box::new(sampler::Sampler::new(sampling))));
        }
        match choice {
            SensorChoice::Sampling => Ok(Self::Sampler(Box::new(sampler::Sampler::new(sampling)))),
            SensorChoice::Ebpf => Self::open_ebpf(),
            SensorChoice::Auto => match Self::open_ebpf() {
                Ok(sensor) => Ok(sensor),
                Err(err) => {
                    tracing::warn!(
                        reason = %format!("{err:#}"),
                        interval = ?sampling.interval,
                        "kernel programs unavailable, sampling memory instead \
                         (slower to notice, costs more CPU)"
                    );
                    Ok(Self::Sampler(Box::new(sampler::Sampler::new(sampling))))
                }
            },
        }
    }

    #[cfg(target_os = "linux")]
    fn open_ebpf() -> Result<Self, SensorError> {
        Ok(Self::Ebpf(Box::new(ebpf::EbpfSensor::open()?)))
    }

    #[cfg(not(target_os = "linux"))]
    fn open_ebpf() -> Result<Self, SensorError> {
        Err(SensorError::NoKernelPrograms)
    }

    pub fn source(&self) -> Source {
        match self {
            #[cfg(target_os = "linux")]
            Self::Ebpf(_) => Source::Ebpf,
            Self::Sampler(_) => sampler::SOURCE,
        }
    }

    /// The form each kernel program was attached in, by program name (see
    /// [`crate::kernel::Forms`]); `None` when sampling.
    pub fn kernel_programs(&self) -> Option<std::collections::BTreeMap<String, String>> {
        match self {
            #[cfg(target_os = "linux")]
            Self::Ebpf(s) => Some(s.forms().to_map()),
            Self::Sampler(_) => None,
        }
    }

    /// Watches a running process and its descendants as one group,
    /// registered with their current memory.
    pub fn watch_tree(&mut self, root: u32, limits: Limits) -> Result<GroupId, SensorError> {
        match self {
            #[cfg(target_os = "linux")]
            Self::Ebpf(s) => s.watch_tree(root, limits),
            Self::Sampler(s) => s.watch_tree(root, limits),
        }
    }

    /// Re-arms a group after its crossing was handled: it fires again
    /// once it has been below `limit - hysteresis`.
    pub fn rearm(&mut self, group: GroupId) -> Result<(), SensorError> {
        match self {
            #[cfg(target_os = "linux")]
            Self::Ebpf(s) => s.rearm(group),
            Self::Sampler(s) => s.rearm(group),
        }
    }

    /// Makes `limit_bytes` the group's limit (the hysteresis kept in
    /// proportion) and arms it now. A group already at or over it is
    /// reported at once ([`SensorEvent::OverLimit`] follows), never left
    /// silent.
    pub fn arm_at(&mut self, group: GroupId, limit_bytes: u64) -> Result<(), SensorError> {
        match self {
            #[cfg(target_os = "linux")]
            Self::Ebpf(s) => s.arm_at(group, limit_bytes),
            Self::Sampler(s) => s.arm_at(group, limit_bytes),
        }
    }

    /// An exact reading of the group now, by the measure crossings are
    /// confirmed with (each page counted once).
    pub fn read(&self, group: GroupId) -> Result<GroupReading, SensorError> {
        match self {
            #[cfg(target_os = "linux")]
            Self::Ebpf(s) => s.read(group),
            Self::Sampler(s) => s.read(group),
        }
    }

    /// Stops watching a group and its members.
    pub fn remove_group(&mut self, group: GroupId) {
        match self {
            #[cfg(target_os = "linux")]
            Self::Ebpf(s) => s.remove_group(group),
            Self::Sampler(s) => s.remove_group(group),
        }
    }

    /// The group's members now.
    pub fn members(&self, group: GroupId) -> Vec<u32> {
        match self {
            #[cfg(target_os = "linux")]
            Self::Ebpf(s) => s.members(group),
            Self::Sampler(s) => s.members(group),
        }
    }

    pub fn stats(&self) -> SensorStats {
        match self {
            #[cfg(target_os = "linux")]
            Self::Ebpf(s) => s.stats(),
            Self::Sampler(s) => s.stats(),
        }
    }

    /// The next event.
    pub async fn next(&mut self) -> Result<SensorEvent, SensorError> {
        match self {
            #[cfg(target_os = "linux")]
            Self::Ebpf(s) => s.next().await,
            Self::Sampler(s) => s.next().await,
        }
    }
}

/// CLOCK_MONOTONIC now, in ns.
fn now_ns() -> u64 {
    crate::event::monotonic_now().as_nanos() as u64
}
