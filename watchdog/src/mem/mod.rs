//! Exact memory readings of processes and process groups: the charged
//! metric that limits are compared against.
//!
//! Linux charges RssAnon + RssShmem from /proc/PID/status: memory the
//! process made, not file-backed pages it merely maps (VmRSS counts those,
//! and made a 100 MB heap look like 7 GB next to git packfiles). macOS
//! charges phys_footprint, what Activity Monitor shows.

use serde::Serialize;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "macos")]
mod macos;

#[cfg(target_os = "linux")]
pub use linux::{parse_smaps_pss, parse_status, read};
#[cfg(target_os = "macos")]
pub use macos::read;

/// What to charge a process for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// RssAnon + RssShmem on Linux, phys_footprint on macOS.
    #[default]
    Charged,
    /// VmRSS: all resident pages, file-backed ones included.
    Rss,
    /// Proportional set size (smaps_rollup): shared pages split between
    /// their users. Slow for large processes (about 10 ms per GiB).
    Pss,
}

/// Which figure a reading's `charged_bytes` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Charged {
    /// RssAnon + RssShmem.
    AnonShmem,
    /// VmRSS, because this kernel has no RssAnon / RssShmem lines.
    VmrssFallback,
    Rss,
    Pss,
    /// macOS phys_footprint.
    PhysFootprint,
}

/// One process's memory. Fields the platform does not report are `None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reading {
    pub pid: u32,
    pub anon_bytes: Option<u64>,
    pub shmem_bytes: Option<u64>,
    pub file_bytes: Option<u64>,
    pub swap_bytes: Option<u64>,
    pub vm_rss_bytes: Option<u64>,
    /// What the process is charged: compare this against limits.
    pub charged_bytes: u64,
    pub metric: Charged,
}

/// Why a process could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The process does not exist (or exited while being read).
    #[error("no process with pid {0}")]
    NoProcess(u32),
    /// It has no user memory: a kernel thread, or a zombie.
    #[error("process {0} has no memory to read (a kernel thread or a zombie)")]
    NoMemory(u32),
    #[error("failed to read memory of process {pid}: {source}")]
    Io { pid: u32, source: std::io::Error },
    #[error("malformed {field} in {file} of process {pid}: {value:?}")]
    Malformed {
        pid: u32,
        file: &'static str,
        field: String,
        value: String,
    },
    #[error("reading process memory is not supported on this system")]
    Unsupported,
}

/// The charged sum over a set of processes (a group), skipping members
/// that exited while being read.
pub fn read_group(pids: impl IntoIterator<Item = u32>, metric: Metric) -> GroupReading {
    let mut group = GroupReading::default();
    for pid in pids {
        match read(pid, metric) {
            Ok(reading) => {
                group.charged_bytes += reading.charged_bytes;
                group.members.push(reading);
            }
            // Exited between listing and reading: it no longer counts.
            Err(MemError::NoProcess(_) | MemError::NoMemory(_)) => {}
            Err(err) => group.errors.push(err.to_string()),
        }
    }
    group
}

/// The members read and their sum.
#[derive(Debug, Default)]
pub struct GroupReading {
    pub members: Vec<Reading>,
    pub charged_bytes: u64,
    /// Members that could not be read for a reason other than exiting.
    pub errors: Vec<String>,
}
