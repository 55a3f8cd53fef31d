//! Exact memory readings of processes and process groups: the charged
//! metric that limits are compared against.
//!
//! Linux charges RssAnon + RssShmem from /proc/PID/status: memory the
//! process made, not file-backed pages it merely maps (VmRSS counts those,
//! and made a 100 MB heap look like 7 GB next to git packfiles). A tree of
//! several processes is charged Pss_Anon + Pss_Shmem from
//! /proc/PID/smaps_rollup summed over its members, which counts each page
//! once: a forked child shares its parent's pages copy-on-write, and
//! summing RssAnon would charge them once per process. macOS charges
//! phys_footprint, what Activity Monitor shows.

use serde::Serialize;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "macos")]
mod macos;

#[cfg(target_os = "linux")]
use linux::{has_memory, shares_parent_mm};
#[cfg(target_os = "linux")]
pub use linux::{read, read_shared};
#[cfg(target_os = "macos")]
use macos::{has_memory, shares_parent_mm};
#[cfg(target_os = "macos")]
pub use macos::{read, read_shared};

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
    /// Pss_Anon + Pss_Shmem (smaps_rollup): each page shared by several
    /// processes split between them, so a tree's sum counts it once.
    PssAnonShmem,
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
    sum(pids, |pid| read(pid, metric))
}

/// A process tree's charge, each page counted once: one process is
/// charged its own memory ([`Metric::Charged`]), several the sum of their
/// shares of it ([`read_shared`]). What both sensors confirm crossings
/// with.
pub fn read_tree(pids: &[u32]) -> GroupReading {
    if pids.len() <= 1 {
        return sum(pids.iter().copied(), |pid| read(pid, Metric::Charged));
    }
    // A vfork / posix_spawn child shares its parent's whole mm until it
    // execs: its smaps_rollup is its parent's, and is charged once.
    let members: std::collections::HashSet<u32> = pids.iter().copied().collect();
    let own: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|&pid| !shares_parent_mm(pid, &members))
        .collect();
    // A member that exits while the others are read hands its share of
    // every page it shared to those read after it, which then count what
    // it was already counted for (seen: a postgres tree whose backends come
    // and go, 286 MiB, read as 485 MiB). A reading is kept only when every
    // member read still has its memory afterwards; else it is taken again,
    // and after a few tries the lowest stands.
    let mut lowest: Option<GroupReading> = None;
    for _ in 0..TREE_READ_TRIES {
        let reading = sum(own.iter().copied(), read_shared);
        if reading.members.iter().all(|r| has_memory(r.pid)) {
            return reading;
        }
        if lowest
            .as_ref()
            .is_none_or(|l| reading.charged_bytes < l.charged_bytes)
        {
            lowest = Some(reading);
        }
    }
    lowest.unwrap_or_else(|| sum(own.iter().copied(), read_shared))
}

/// How many times [`read_tree`] reads a tree whose members keep exiting.
const TREE_READ_TRIES: usize = 4;

/// [`read_tree`], to be compared with `limit`: a tree reading at or over
/// it is taken again, and the second decides. Members are read one after
/// another, not at one instant, and a page that changes hands between two
/// reads is counted by both: a child read while it shares its parent's
/// pages, which execs before its parent is read, leaves the parent with
/// them all. Two such races in a row are far rarer than one.
pub fn read_tree_against(pids: &[u32], limit: u64) -> GroupReading {
    let first = read_tree(pids);
    if first.members.len() <= 1 || limit == 0 || first.charged_bytes < limit {
        return first;
    }
    read_tree(pids)
}

fn sum(
    pids: impl IntoIterator<Item = u32>,
    mut read: impl FnMut(u32) -> Result<Reading, MemError>,
) -> GroupReading {
    let mut group = GroupReading {
        members: Vec::new(),
        charged_bytes: 0,
        metric: None,
        errors: Vec::new(),
    };
    for pid in pids {
        match read(pid) {
            Ok(reading) => {
                group.charged_bytes += reading.charged_bytes;
                group.metric.get_or_insert(reading.metric);
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
    /// Which figure `charged_bytes` is (that of the first member read;
    /// `None` when none was).
    pub metric: Option<Charged>,
    /// Members that could not be read for a reason other than exiting.
    pub errors: Vec<String>,
}
