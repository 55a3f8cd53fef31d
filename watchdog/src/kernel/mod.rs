//! The kernel programs: loading, attaching, the watch table, and the event
//! stream, behind a small typed API.
//!
//! [`Probes::load`] resolves struct offsets from the kernel's BTF, loads and
//! attaches the programs, and proves the offsets right with a self-check
//! before anything is reported. [`Probes::next`] then yields typed events
//! from the ring buffer through tokio's `AsyncFd`, so callers add programs
//! and event kinds here without touching the plumbing.

pub mod btf;
pub mod offsets;

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsFd, AsRawFd},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::RawTracePoint,
};
use tokio::io::unix::AsyncFd;
use watchdog_common::{
    COMM_LEN, EVENT_CHANGED, EVENT_CROSSING, EVENT_EXIT, EVENT_FORK, EVENT_OOM_VICTIM,
    EVENT_REARMED, Event, GROUP_ARMED, GROUP_DISARMED, GROUP_WAIT_BELOW, GroupCounters,
    GroupLimits, MAX_GROUPS, Watch, counter,
};

use crate::{
    event::{ProcessExit, ProcessFork},
    exit::ExitStatus,
    privilege,
};
use btf::{Btf, BtfError};
use offsets::KernelLayout;

/// The compiled kernel programs, when this binary was built with them.
#[cfg(watchdog_ebpf)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/watchdog.bpf.o"
)));
#[cfg(not(watchdog_ebpf))]
static OBJECT: Option<&[u8]> = None;

/// Whether this binary carries the kernel programs.
pub fn built_in() -> bool {
    OBJECT.is_some()
}

/// Why the kernel programs could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this watchdog binary was built without its kernel programs; \
         build it with `cargo xtask build` (needs bpf-linker: `cargo xtask setup`)"
    )]
    NotBuiltIn,
    #[error(
        "loading kernel programs needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN), \
         which this process does not have ({detail}); run it as root, e.g. with sudo"
    )]
    Privilege { detail: String },
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("failed to {what}: {detail}")]
    Kernel { what: &'static str, detail: String },
    #[error(
        "the kernel programs failed their self-check ({0}); refusing to report \
         data read with wrong struct offsets"
    )]
    SelfCheck(String),
}

impl LoadError {
    /// Wraps an aya error, turning a permission failure into the clear
    /// privilege message.
    fn kernel(what: &'static str, err: impl std::error::Error + 'static) -> Self {
        let mut detail = error_chain(&err);
        // A verifier rejection carries the whole verifier log: keep the
        // message readable and leave the log to the debug level.
        if detail.len() > 1000 {
            tracing::debug!(what, log = %detail, "full kernel error");
            let cut = detail.floor_char_boundary(1000);
            detail.truncate(cut);
            detail.push_str(" [...] (full text with WATCHDOG_LOG=debug)");
        }
        if is_permission_error(&err) {
            return Self::Privilege { detail };
        }
        Self::Kernel { what, detail }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        out.push_str(": ");
        out.push_str(&inner.to_string());
        source = inner.source();
    }
    out
}

fn is_permission_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// What to watch from the start.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeOptions {
    /// Report the exit of every process on the host.
    pub watch_all: bool,
}

/// An event from the kernel programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    Exit(ProcessExit),
    Fork(ProcessFork),
    /// A group's (approximate) total crossed its limit; the group is
    /// disarmed until [`Probes::rearm`].
    Crossing(GroupSignal),
    /// A group waiting to re-arm fell below its re-arm level.
    Rearmed(GroupSignal),
    /// A group's total moved by at least its step.
    Changed(GroupSignal),
    /// The kernel's OOM killer chose this watched process.
    OomVictim {
        pid: u32,
        group: GroupId,
    },
}

/// A group-level event: which group, what its kernel total was, and which
/// process's update caused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupSignal {
    pub group: GroupId,
    pub pid: u32,
    /// The kernel's running total (approximate: per-CPU deltas of the
    /// counters are not folded in).
    pub bytes: i64,
    pub limit: u64,
    pub monotonic_ns: u64,
}

/// What a process is charged when it starts being watched: its resident
/// anonymous and shmem memory, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Charge {
    pub anon_bytes: u64,
    pub shmem_bytes: u64,
}

impl Charge {
    /// A running process's exact charge now (nothing if it cannot be read;
    /// the kernel programs correct it on its next update).
    pub fn of(pid: u32) -> Self {
        match crate::mem::read(pid, crate::mem::Metric::Charged) {
            Ok(r) => Self {
                anon_bytes: r.anon_bytes.unwrap_or(r.charged_bytes),
                shmem_bytes: r.shmem_bytes.unwrap_or(0),
            },
            Err(_) => Self::default(),
        }
    }

    pub fn total(self) -> u64 {
        self.anon_bytes + self.shmem_bytes
    }
}

/// A group slot in the kernel's group arrays (never 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u32);

/// A group's thresholds, in bytes; 0 disables each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupConfig {
    pub limit: u64,
    /// After a crossing, the group re-arms once its total is below this.
    pub rearm_below: u64,
    pub step: u64,
}

/// Counts of what the kernel side could not deliver or track.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// Events dropped because the ring buffer was full.
    pub ringbuf_full: u64,
    /// New processes of watched trees that the watch table had no room for.
    pub watch_table_full: u64,
}

/// The loaded and attached kernel programs.
pub struct Probes {
    // Owns the programs and their links: dropping it detaches them.
    _ebpf: Ebpf,
    watched: HashMap<MapData, u32, Watch>,
    filter: Filter,
    counters: PerCpuArray<MapData, u64>,
    group_limits: Array<MapData, GroupLimits>,
    group_counters: Array<MapData, GroupCounters>,
    group_state: Array<MapData, u32>,
    /// Group slots not in use.
    free_groups: Vec<u32>,
    ring: AsyncFd<RingBuf<MapData>>,
    /// Events read while looking for something else (during the self-check).
    pending: VecDeque<KernelEvent>,
    page_size: u64,
}

impl Probes {
    /// Loads, attaches and self-checks the kernel programs. Must be called
    /// inside a tokio runtime.
    pub fn load(options: ProbeOptions) -> Result<Self, LoadError> {
        let object = OBJECT.ok_or(LoadError::NotBuiltIn)?;
        if let Err(missing) = privilege::check_bpf() {
            return Err(LoadError::Privilege { detail: missing });
        }
        privilege::raise_memlock();

        let layout = KernelLayout::resolve(&Btf::from_kernel()?)?;
        let watch_all = u32::from(options.watch_all);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("WATCH_FILTER", pid_max().div_ceil(8))
            .override_global("OFFSETS", &layout.offsets, true)
            .override_global("WATCH_ALL", &watch_all, true)
            .load(object)
            .map_err(|e| LoadError::kernel("load the kernel programs", e))?;

        // Maps first: the programs write to them as soon as they attach.
        let watched = take_map(&mut ebpf, "WATCHED", HashMap::try_from)?;
        let filter = take_map(&mut ebpf, "WATCH_FILTER", Filter::map)?;
        let counters = take_map(&mut ebpf, "COUNTERS", PerCpuArray::try_from)?;
        let ring = take_map(&mut ebpf, "EVENTS", RingBuf::try_from)?;
        let group_limits = take_map(&mut ebpf, "GROUP_LIMITS", Array::try_from)?;
        let group_counters = take_map(&mut ebpf, "GROUP_COUNTERS", Array::try_from)?;
        let group_state = take_map(&mut ebpf, "GROUP_STATE", Array::try_from)?;

        let exit = if layout.exit_has_group_dead {
            "sched_process_exit"
        } else {
            "sched_process_exit_legacy"
        };
        attach_raw(&mut ebpf, "sched_process_fork", "sched_process_fork")?;
        attach_raw(&mut ebpf, exit, "sched_process_exit")?;
        attach_raw(&mut ebpf, "sched_process_exec", "sched_process_exec")?;
        // Typed (BTF) tracepoint where the kernel allows it: the counters
        // are then plain loads on every page fault of a watched process.
        match attach_btf(&mut ebpf, "rss_stat_btf", "rss_stat") {
            Ok(()) => tracing::debug!("rss_stat attached as a BTF tracepoint"),
            Err(e) => {
                tracing::debug!(error = %e, "rss_stat as a raw tracepoint instead");
                attach_raw(&mut ebpf, "rss_stat", "rss_stat")?;
            }
        }
        match layout.oom_victim_is_task {
            Some(true) => attach_raw(&mut ebpf, "mark_victim", "mark_victim")?,
            Some(false) => attach_raw(&mut ebpf, "mark_victim_pid", "mark_victim")?,
            None => tracing::warn!(
                "this kernel has no mark_victim tracepoint: OOM kills are told apart by the \
                 cgroup's memory.events only"
            ),
        }

        // SAFETY: the RingBuf owns its map descriptor for its whole life and
        // always reports the same one; the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| LoadError::kernel("watch the event ring buffer", e.into_parts().1))?;
        // SAFETY: sysconf has no preconditions.
        let page_size = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let mut probes = Self {
            _ebpf: ebpf,
            watched,
            filter,
            counters,
            group_limits,
            group_counters,
            group_state,
            free_groups: (1..MAX_GROUPS).rev().collect(),
            ring,
            pending: VecDeque::new(),
            page_size,
        };
        probes.self_check()?;
        release_freed_memory();
        Ok(probes)
    }

    /// Starts watching `tgid`: its exit is reported and the processes it
    /// starts are watched too. With a group, its memory is charged to it,
    /// starting from `start` (what it has now, or nothing for a process
    /// that has not run yet).
    pub fn watch(
        &mut self,
        tgid: u32,
        group: Option<GroupId>,
        start: Charge,
    ) -> Result<(), LoadError> {
        let pages = |bytes: u64| i64::try_from(bytes / self.page_size).unwrap_or(i64::MAX);
        let watch = Watch {
            group: group.map_or(0, |g| g.0),
            last_anon: pages(start.anon_bytes),
            last_shmem: pages(start.shmem_bytes),
            ..Watch::default()
        };
        self.watched
            .insert(tgid, watch, 0)
            .map_err(|e| LoadError::kernel("add a process to the watch table", e))?;
        // After the entry exists: the programs look in the filter first.
        self.filter.set(tgid, true);
        Ok(())
    }

    /// Watches `root` and its present descendants, charging each to `group`
    /// from `charged(pid)`, and returns the pids now watched. The fork
    /// program is already attached, so processes started from a watched
    /// one from now on are watched by the kernel; repeating the /proc scan
    /// until it finds nothing new catches those started before their parent
    /// was watched. A pid that exited meanwhile is left out, so that a reused
    /// pid does not inherit a stale entry.
    pub fn watch_tree(
        &mut self,
        root: u32,
        group: Option<GroupId>,
        mut charged: impl FnMut(u32) -> Charge,
    ) -> Result<std::collections::HashSet<u32>, LoadError> {
        let mut known = std::collections::HashSet::new();
        let mut next = vec![root];
        while !next.is_empty() {
            for pid in next {
                self.watch(pid, group, charged(pid))?;
                // ENOENT: it exited between the scan and now.
                if crate::procs::exists(pid) {
                    known.insert(pid);
                } else {
                    self.unwatch(pid);
                }
            }
            if !known.contains(&root) {
                break;
            }
            next = crate::procs::descendants(root)
                .into_iter()
                .filter(|pid| !known.contains(pid))
                .collect();
        }
        Ok(known)
    }

    /// Creates a group whose members will be charged against `config`,
    /// starting from `initial_bytes` (the sum of the `charged_bytes` its
    /// first members are then watched with). It starts armed, unless it is
    /// already at or over its limit, when it starts disarmed: the caller
    /// decides what that means.
    pub fn create_group(
        &mut self,
        config: GroupConfig,
        initial_bytes: u64,
    ) -> Result<GroupId, LoadError> {
        let slot = self.free_groups.pop().ok_or(LoadError::Kernel {
            what: "create a group",
            detail: format!("all {} group slots are in use", MAX_GROUPS - 1),
        })?;
        let total = i64::try_from(initial_bytes).unwrap_or(i64::MAX);
        let over = config.limit > 0 && initial_bytes >= config.limit;
        let result = self
            .set_limits_raw(slot, config)
            .and_then(|()| {
                self.group_counters.set(
                    slot,
                    GroupCounters {
                        total,
                        step_base: total,
                    },
                    0,
                )
            })
            .and_then(|()| {
                let state = if over { GROUP_DISARMED } else { GROUP_ARMED };
                self.group_state.set(slot, state, 0)
            });
        if let Err(e) = result {
            self.free_groups.push(slot);
            return Err(LoadError::kernel("create a group", e));
        }
        Ok(GroupId(slot))
    }

    /// Changes a group's thresholds.
    pub fn set_limits(&mut self, group: GroupId, config: GroupConfig) -> Result<(), LoadError> {
        self.set_limits_raw(group.0, config)
            .map_err(|e| LoadError::kernel("set group limits", e))
    }

    fn set_limits_raw(
        &mut self,
        slot: u32,
        config: GroupConfig,
    ) -> Result<(), aya::maps::MapError> {
        let limits = GroupLimits {
            limit: config.limit,
            rearm_below: config.rearm_below,
            step: config.step,
        };
        self.group_limits.set(slot, limits, 0)
    }

    /// The kernel's running total for a group.
    pub fn group_total(&self, group: GroupId) -> i64 {
        self.group_counters.get(&group.0, 0).map_or(0, |c| c.total)
    }

    /// Re-arms a group after a crossing was handled: it fires again once
    /// its total has been below its re-arm level (at once, if it is below
    /// it now). With `immediately`, it is armed without waiting (for a
    /// crossing that did not confirm, once the total is back under the
    /// limit).
    pub fn rearm(&mut self, group: GroupId, immediately: bool) -> Result<(), LoadError> {
        let rearm_below = self
            .group_limits
            .get(&group.0, 0)
            .map_or(0, |l| l.rearm_below);
        let below = self.group_total(group) < i64::try_from(rearm_below).unwrap_or(i64::MAX);
        let state = if immediately || below {
            GROUP_ARMED
        } else {
            GROUP_WAIT_BELOW
        };
        self.group_state
            .set(group.0, state, 0)
            .map_err(|e| LoadError::kernel("re-arm a group", e))
    }

    /// Frees a group slot. Its members should be unwatched first.
    pub fn remove_group(&mut self, group: GroupId) {
        let _ = self.group_state.set(group.0, GROUP_DISARMED, 0);
        let _ = self.set_limits_raw(group.0, GroupConfig::default());
        let _ = self
            .group_counters
            .set(group.0, GroupCounters::default(), 0);
        if !self.free_groups.contains(&group.0) {
            self.free_groups.push(group.0);
        }
    }

    /// Stops watching `tgid` (a no-op when it was not watched).
    pub fn unwatch(&mut self, tgid: u32) {
        // ENOENT / out of range: it already exited, and the exit program
        // removed it, or it was never in the filter.
        self.filter.set(tgid, false);
        let _ = self.watched.remove(&tgid);
    }

    /// Waits for the next event.
    pub async fn next(&mut self) -> io::Result<KernelEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let mut guard = self.ring.readable_mut().await?;
            let raw = guard.get_inner_mut().next().map(|item| decode(&item));
            match raw {
                Some(Some(raw)) => return Ok(self.convert(&raw)),
                // A record of a size this build does not know: skip it.
                Some(None) => continue,
                None => guard.clear_ready(),
            }
        }
    }

    /// Returns an event that is already waiting, without blocking.
    pub fn try_next(&mut self) -> Option<KernelEvent> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        loop {
            let raw = self.ring.get_mut().next().map(|item| decode(&item))?;
            if let Some(raw) = raw {
                return Some(self.convert(&raw));
            }
        }
    }

    /// What the kernel side has lost so far (summed over CPUs).
    pub fn losses(&self) -> Losses {
        let read = |index: u32| {
            self.counters
                .get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        Losses {
            ringbuf_full: read(counter::RINGBUF_FULL),
            watch_table_full: read(counter::WATCH_TABLE_FULL),
        }
    }

    fn convert(&self, raw: &Event) -> KernelEvent {
        let signal = || GroupSignal {
            group: GroupId(raw.group),
            pid: raw.pid,
            bytes: raw.bytes,
            limit: raw.limit,
            monotonic_ns: raw.ktime_ns,
        };
        match raw.kind {
            EVENT_CROSSING => KernelEvent::Crossing(signal()),
            EVENT_REARMED => KernelEvent::Rearmed(signal()),
            EVENT_CHANGED => KernelEvent::Changed(signal()),
            EVENT_OOM_VICTIM => KernelEvent::OomVictim {
                pid: raw.pid,
                group: GroupId(raw.group),
            },
            EVENT_FORK => KernelEvent::Fork(ProcessFork {
                parent: raw.ppid,
                child: raw.pid,
                group: raw.group,
                monotonic_ns: raw.ktime_ns,
            }),
            _ => KernelEvent::Exit(ProcessExit {
                pid: raw.pid,
                ppid: raw.ppid,
                comm: comm_string(&raw.comm),
                status: ExitStatus::from_wait_status(raw.wait_status),
                peak_rss_bytes: raw.peak_rss_pages.saturating_mul(self.page_size),
                monotonic_ns: raw.ktime_ns,
                group: raw.group,
            }),
        }
    }

    /// Proves the offsets and the whole event path right before anything is
    /// reported: a child of ours forks a grandchild, both exit with known
    /// codes, and the kernel's reports of them must match what we know.
    fn self_check(&mut self) -> Result<(), LoadError> {
        let fail = |what: String| LoadError::SelfCheck(what);
        let me = std::process::id();
        // The child inherits this thread's name, which is what the kernel
        // will report as its comm.
        let comm = std::fs::read_to_string("/proc/thread-self/comm")
            .map(|s| s.trim_end().to_owned())
            .map_err(|e| fail(format!("cannot read /proc/thread-self/comm: {e}")))?;

        let child = SelfCheckChild::spawn().map_err(|e| fail(format!("fork failed: {e}")))?;
        let pid = child.pid;
        // The child's memory goes to a group whose limit is what it has now
        // plus half of what it will touch: proof that the mm offsets and
        // counter indices are right, and that crossings fire.
        let start = Charge::of(pid);
        let limit = start.total() + SelfCheckChild::TOUCH_BYTES as u64 / 2;
        let registered = self
            .create_group(
                GroupConfig {
                    limit,
                    ..GroupConfig::default()
                },
                start.total(),
            )
            .and_then(|group| self.watch(pid, Some(group), start).map(|()| group));
        let released = child.release_and_reap();
        let group = registered?;
        released.map_err(|e| fail(format!("self-check child failed: {e}")))?;

        let deadline = Instant::now() + Duration::from_secs(3);
        let (mut fork, mut child_exit, mut grandchild_exit) = (None, None, None);
        let mut crossing = None;
        while fork.is_none()
            || child_exit.is_none()
            || grandchild_exit.is_none()
            || crossing.is_none()
        {
            let Some(raw) = self.ring.get_mut().next().map(|item| decode(&item)) else {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(fail(format!(
                        "not every event came from the kernel programs within 3 s \
                         (fork seen: {}, exits seen: {}, memory crossing seen: {})",
                        fork.is_some(),
                        usize::from(child_exit.is_some()) + usize::from(grandchild_exit.is_some()),
                        crossing.is_some(),
                    )));
                }
                wait_readable(self.ring.get_ref(), left);
                continue;
            };
            let Some(raw) = raw else { continue };
            let grandchild = fork.map(|f: ProcessFork| f.child);
            match self.convert(&raw) {
                KernelEvent::Fork(f) if f.parent == pid => fork = Some(f),
                KernelEvent::Crossing(c) if c.group == group => crossing = Some(c),
                KernelEvent::Rearmed(c) | KernelEvent::Changed(c) if c.group == group => {}
                KernelEvent::OomVictim { pid: victim, .. } if victim == pid => {}
                KernelEvent::Exit(e) if e.pid == pid => child_exit = Some((e, raw)),
                KernelEvent::Exit(e) if Some(e.pid) == grandchild || e.ppid == pid => {
                    grandchild_exit = Some((e, raw))
                }
                other => self.pending.push_back(other),
            }
        }
        self.unwatch(pid);
        let total_after = self.group_total(group);
        self.remove_group(group);

        let (Some(fork), Some((child_exit, child_raw)), Some((gc_exit, gc_raw)), Some(crossing)) =
            (fork, child_exit, grandchild_exit, crossing)
        else {
            unreachable!("loop ends only when all four were seen");
        };
        // What the child touched, plus slack for the counters' per-CPU lag.
        let most = (start.total() + SelfCheckChild::TOUCH_BYTES as u64 + (64 << 20)) as i64;
        let checks = [
            (
                fork.group == group.0,
                format!("fork reported group {}, expected {}", fork.group, group.0),
            ),
            (
                crossing.pid == pid && crossing.bytes >= limit as i64 && crossing.bytes <= most,
                format!(
                    "memory crossing of pid {} at {} bytes, expected pid {pid} between {limit} \
                     and {most} (mm_struct.rss_stat offsets or MM_* indices wrong?)",
                    crossing.pid, crossing.bytes
                ),
            ),
            (
                total_after.unsigned_abs() <= 64 << 20,
                format!("group total {total_after} bytes after every member exited, expected ~0"),
            ),
            (
                gc_exit.pid == fork.child,
                format!(
                    "grandchild exit pid {} but fork reported {}",
                    gc_exit.pid, fork.child
                ),
            ),
            (
                child_raw.tgid_via_offsets == pid && gc_raw.tgid_via_offsets == gc_exit.pid,
                format!(
                    "task->tgid read as {} and {}, expected {pid} and {}",
                    child_raw.tgid_via_offsets, gc_raw.tgid_via_offsets, gc_exit.pid
                ),
            ),
            (
                child_exit.ppid == me && gc_exit.ppid == pid,
                format!(
                    "parents read as {} and {}, expected {me} and {pid}",
                    child_exit.ppid, gc_exit.ppid
                ),
            ),
            (
                child_exit.status == ExitStatus::Code(SelfCheckChild::CHILD_CODE)
                    && gc_exit.status == ExitStatus::Code(SelfCheckChild::GRANDCHILD_CODE),
                format!(
                    "exit statuses read as {:?} and {:?}, expected codes {} and {}",
                    child_exit.status,
                    gc_exit.status,
                    SelfCheckChild::CHILD_CODE,
                    SelfCheckChild::GRANDCHILD_CODE
                ),
            ),
            (
                child_exit.comm == comm,
                format!("comm read as {:?}, expected {comm:?}", child_exit.comm),
            ),
            (
                child_exit.peak_rss_bytes > 0 && child_exit.peak_rss_bytes < (1 << 50),
                format!("peak RSS read as {} bytes", child_exit.peak_rss_bytes),
            ),
        ];
        for (ok, what) in checks {
            if !ok {
                return Err(fail(what));
            }
        }
        Ok(())
    }
}

/// A forked child for the self-check: it waits for a byte on a pipe, maps
/// and touches [`Self::TOUCH_BYTES`] of anonymous memory, forks a
/// grandchild that exits with [`Self::GRANDCHILD_CODE`], reaps it, and
/// exits with [`Self::CHILD_CODE`].
struct SelfCheckChild {
    pid: u32,
    release: std::os::fd::OwnedFd,
}

impl SelfCheckChild {
    const CHILD_CODE: i32 = 42;
    const GRANDCHILD_CODE: i32 = 43;
    const TOUCH_BYTES: usize = 8 << 20;

    fn spawn() -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two fresh descriptors that we now own.
        let (read_end, write_end) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        // SAFETY: the child calls only async-signal-safe functions (close,
        // read, mmap, fork, waitpid, _exit) and writes to its own mapping
        // before it exits, as fork in a multi-threaded process requires.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            unsafe {
                libc::close(write_end.as_raw_fd());
                let mut byte = 0u8;
                libc::read(read_end.as_raw_fd(), (&raw mut byte).cast(), 1);
                let block = libc::mmap(
                    std::ptr::null_mut(),
                    Self::TOUCH_BYTES,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if block != libc::MAP_FAILED {
                    for offset in (0..Self::TOUCH_BYTES).step_by(4096) {
                        block.cast::<u8>().add(offset).write_volatile(1);
                    }
                }
                let grandchild = libc::fork();
                if grandchild == 0 {
                    libc::_exit(Self::GRANDCHILD_CODE);
                }
                if grandchild > 0 {
                    libc::waitpid(grandchild, std::ptr::null_mut(), 0);
                }
                libc::_exit(Self::CHILD_CODE);
            }
        }
        drop(read_end);
        Ok(Self {
            pid: pid as u32,
            release: write_end,
        })
    }

    /// Lets the child go on and reaps it.
    fn release_and_reap(self) -> io::Result<()> {
        drop(self.release);
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child with a valid status pointer.
            let r = unsafe { libc::waitpid(self.pid as i32, &mut status, 0) };
            if r >= 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        let got = ExitStatus::from_wait_status(status as u32);
        if got != ExitStatus::Code(Self::CHILD_CODE) {
            return Err(io::Error::other(format!("it ended with {got:?}")));
        }
        Ok(())
    }
}

/// Loading parses the kernel's BTF twice (here for offsets, in aya for
/// relocations): tens of MiB, all freed by now. Hand them back to the
/// system so a daemon that waits for weeks does not sit on them.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The `WATCH_FILTER` array, mapped into this process: one byte per tgid,
/// written with single-byte stores so that the kernel's own stores to
/// neighbouring bytes (for forks) are never overwritten.
struct Filter {
    _map: MapData,
    bytes: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only touched through
// atomic byte stores.
unsafe impl Send for Filter {}

impl Filter {
    fn map(map: aya::maps::Map) -> Result<Self, io::Error> {
        let aya::maps::Map::Array(data) = map else {
            return Err(io::Error::other("WATCH_FILTER is not an array"));
        };
        let info = data.info().map_err(io::Error::other)?;
        let len = info.max_entries() as usize * info.value_size() as usize;
        // SAFETY: mapping a BPF_F_MMAPABLE array's own descriptor, shared,
        // for exactly its size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let bytes = std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("null"))?;
        Ok(Self {
            _map: data,
            bytes,
            len,
        })
    }

    /// Marks or clears `tgid`. A tgid past the filter (pid_max raised since
    /// loading) needs nothing: the programs look it up in WATCHED.
    fn set(&mut self, tgid: u32, watched: bool) {
        let index = tgid as usize;
        if index < self.len {
            // SAFETY: inside the mapping; a single atomic byte store.
            let byte =
                unsafe { std::sync::atomic::AtomicU8::from_ptr(self.bytes.as_ptr().add(index)) };
            byte.store(u8::from(watched), std::sync::atomic::Ordering::Release);
        }
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.bytes.as_ptr().cast(), self.len) };
    }
}

/// The number of pids the kernel can hand out (/proc/sys/kernel/pid_max),
/// which sizes the watch filter: one byte each.
fn pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 22)
}

fn take_map<M, E: std::error::Error + 'static>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<M, E>,
) -> Result<M, LoadError> {
    let map = ebpf.take_map(name).ok_or(LoadError::Kernel {
        what: "find a map in the kernel object",
        detail: name.to_owned(),
    })?;
    convert(map).map_err(|e| LoadError::kernel("open a map of the kernel programs", e))
}

fn attach_btf(ebpf: &mut Ebpf, program: &str, tracepoint: &str) -> Result<(), LoadError> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| LoadError::kernel("read kernel BTF", e))?;
    let prog: &mut aya::programs::BtfTracePoint = find_program(ebpf, program)?;
    prog.load(tracepoint, &btf)
        .map_err(|e| LoadError::kernel("load a kernel program", e))?;
    prog.attach()
        .map_err(|e| LoadError::kernel("attach to a BTF tracepoint", e))?;
    Ok(())
}

fn attach_raw(ebpf: &mut Ebpf, program: &str, tracepoint: &str) -> Result<(), LoadError> {
    let prog: &mut RawTracePoint = find_program(ebpf, program)?;
    prog.load()
        .map_err(|e| LoadError::kernel("load a kernel program", e))?;
    prog.attach(tracepoint)
        .map_err(|e| LoadError::kernel("attach to a raw tracepoint", e))?;
    Ok(())
}

/// A program of the object, as its type.
fn find_program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::Kernel {
            what: "find a program in the kernel object",
            detail: name.to_owned(),
        })?
        .try_into()
        .map_err(|e| LoadError::kernel("open a kernel program", e))
}

/// Reads one ring-buffer record; `None` for a record of unknown size.
fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: Event is plain integers, and the length was checked.
    let event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
    matches!(
        event.kind,
        EVENT_EXIT | EVENT_FORK | EVENT_CROSSING | EVENT_REARMED | EVENT_CHANGED | EVENT_OOM_VICTIM
    )
    .then_some(event)
}

fn comm_string(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Blocks until `fd` is readable or `timeout` passes (used only before the
/// event loop runs, during the self-check).
fn wait_readable(fd: &impl AsFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd. EINTR just makes the caller look again.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_records() {
        let mut event = Event {
            kind: EVENT_EXIT,
            pid: 7,
            ..Event::default()
        };
        event.comm[..2].copy_from_slice(b"sh");
        // SAFETY: Event is plain integers.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<Event>())
        };
        assert_eq!(decode(bytes), Some(event));
        assert_eq!(decode(&bytes[..10]), None, "short record");
        assert_eq!(comm_string(&event.comm), "sh");
        assert_eq!(comm_string(&[b'x'; COMM_LEN]), "x".repeat(COMM_LEN));
        event.kind = 99;
        // SAFETY: as above.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<Event>())
        };
        assert_eq!(decode(bytes), None, "unknown kind");
    }
}
