//! Loading the kernel programs: resolving struct offsets from the
//! kernel's BTF, loading and attaching the programs that fit this kernel,
//! and a self-check that proves the offsets and the event path right before
//! anything is reported.

use std::{
    collections::VecDeque,
    io,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::RawTracePoint,
};
use tokio::io::unix::AsyncFd;

use super::{
    Charge, KernelEvent, Probes,
    btf::{Btf, BtfError},
    forms::{ExitForm, Forms, RssStatForm, VictimForm, verifier_reason},
    groups::Groups,
    offsets::KernelLayout,
    ring::{decode, wait_readable},
    table::Filter,
};
use crate::{event::ProcessFork, exit::ExitStatus, privilege, sensor::Limits};

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
    pub(super) fn kernel(what: &'static str, err: impl std::error::Error + 'static) -> Self {
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

/// Test only: `WATCHDOG_FORCE_LEGACY_EXIT=1` attaches the exit program of
/// kernels before 6.16 (no `group_dead` argument) on a newer kernel, so
/// that its one-report-per-process rule is tested where the tests run.
fn force_legacy_exit() -> bool {
    let forced = std::env::var_os("WATCHDOG_FORCE_LEGACY_EXIT").is_some_and(|v| v == "1");
    if forced {
        tracing::warn!(
            "WATCHDOG_FORCE_LEGACY_EXIT=1: using the exit program of kernels before 6.16"
        );
    }
    forced
}

/// `WATCHDOG_TEST_FAULT_EXEC=1`: the exec program fails its read, to test
/// how the programs' failures are reported. Never set in production.
fn fault_exec() -> u32 {
    u32::from(std::env::var_os("WATCHDOG_TEST_FAULT_EXEC").is_some_and(|v| v == "1"))
}

/// Every level of the kernel programs' messages (aya-log's trace, 5).
const KERNEL_LOG_ALL: u8 = 5;

/// Hands the kernel programs' messages to the daemon's log, from a task of
/// the runtime (they are rare: failures only).
fn forward_kernel_log(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init_with_logger(ebpf, KernelLog) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::debug!(error = %e, "the kernel programs' messages cannot be read");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's descriptor for its whole
    // life and always reports the same one; the AsyncFd owns the logger.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(e) => {
            let (_, error) = e.into_parts();
            tracing::debug!(error = %error, "the kernel programs' messages cannot be read");
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// A `log::Log` that passes the kernel programs' records to tracing.
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error | log::Level::Warn => {
                tracing::warn!(target: "watchdog::kernel", "kernel program: {message}");
            }
            _ => tracing::debug!(target: "watchdog::kernel", "kernel program: {message}"),
        }
    }

    fn flush(&self) {}
}

/// What to watch from the start.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeOptions {
    /// Report the exit of every process on the host.
    pub watch_all: bool,
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
        // The programs' own messages only when the daemon logs at debug:
        // a read-only level of 0 lets the verifier drop their logging code.
        let log_level: u8 = if tracing::enabled!(target: "watchdog::kernel", tracing::Level::DEBUG)
        {
            KERNEL_LOG_ALL
        } else {
            0
        };
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("WATCH_FILTER", pid_max().div_ceil(8))
            .override_global("OFFSETS", &layout.offsets, true)
            .override_global("WATCH_ALL", &watch_all, true)
            .override_global("AYA_LOG_LEVEL", &log_level, true)
            .override_global("FAULT_EXEC", &fault_exec(), true)
            .load(object)
            .map_err(|e| LoadError::kernel("load the kernel programs", e))?;
        if log_level > 0 {
            forward_kernel_log(&mut ebpf);
        }

        // Maps first: the programs write to them as soon as they attach.
        let watched = take_map(&mut ebpf, "WATCHED", HashMap::try_from)?;
        let filter = take_map(&mut ebpf, "WATCH_FILTER", Filter::map)?;
        let counters = take_map(&mut ebpf, "COUNTERS", PerCpuArray::try_from)?;
        let ring = take_map(&mut ebpf, "EVENTS", RingBuf::try_from)?;
        let groups = Groups::new(
            take_map(&mut ebpf, "GROUP_LIMITS", Array::try_from)?,
            take_map(&mut ebpf, "GROUP_COUNTERS", Array::try_from)?,
            take_map(&mut ebpf, "GROUP_STATE", Array::try_from)?,
        );

        // Read (and logged) on every kernel, so that a forced run says so
        // even where the legacy program is the only one.
        let forced = force_legacy_exit();
        let (exit, exit_form, exit_reason) = if !layout.exit_has_group_dead {
            (
                "sched_process_exit_legacy",
                ExitForm::Legacy,
                Some("no group_dead argument before 6.16".to_owned()),
            )
        } else if forced {
            (
                "sched_process_exit_legacy",
                ExitForm::Legacy,
                Some("forced by WATCHDOG_FORCE_LEGACY_EXIT=1".to_owned()),
            )
        } else {
            ("sched_process_exit", ExitForm::GroupDead, None)
        };
        attach_raw(&mut ebpf, "sched_process_fork", "sched_process_fork")?;
        attach_raw(&mut ebpf, exit, "sched_process_exit")?;
        attach_raw(&mut ebpf, "sched_process_exec", "sched_process_exec")?;
        // Typed (BTF) tracepoint where the kernel allows it: the counters
        // are then plain loads on every page fault of a watched process.
        let (rss_stat, rss_stat_reason) = match attach_btf(&mut ebpf, "rss_stat_btf", "rss_stat") {
            Ok(()) => (RssStatForm::Btf, None),
            Err(reason) => {
                attach_raw(&mut ebpf, "rss_stat", "rss_stat")?;
                (RssStatForm::Raw, Some(reason))
            }
        };
        let (mark_victim, mark_victim_reason) = match layout.oom_victim_is_task {
            Some(true) => {
                attach_raw(&mut ebpf, "mark_victim", "mark_victim")?;
                (Some(VictimForm::Task), None)
            }
            Some(false) => {
                attach_raw(&mut ebpf, "mark_victim_pid", "mark_victim")?;
                (
                    Some(VictimForm::Pid),
                    Some("the tracepoint passes only a pid before 6.8".to_owned()),
                )
            }
            None => {
                tracing::warn!(
                    "this kernel has no mark_victim tracepoint: OOM kills are told apart by \
                     the cgroup's memory.events only"
                );
                (None, Some("no mark_victim tracepoint".to_owned()))
            }
        };
        let forms = Forms {
            rss_stat,
            rss_stat_reason,
            exit: exit_form,
            exit_reason,
            mark_victim,
            mark_victim_reason,
        };

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
            groups,
            ring,
            pending: VecDeque::new(),
            drained: false,
            read_since_empty: false,
            page_size,
            counter_lag: counter_lag_pages(layout.offsets.rss_stride) * page_size,
            forms,
        };
        probes.self_check()?;
        release_freed_memory();
        tracing::info!("kernel programs attached: {}", probes.forms);
        Ok(probes)
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
                Limits {
                    limit,
                    ..Limits::default()
                },
                start.total(),
            )
            .and_then(|group| self.watch(pid, Some(group), start).map(|_| group));
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
        self.unwatch(pid, Some(group));
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

/// How many pages one resident-page counter of an mm can be behind the
/// truth. From 6.2 each counter is a `percpu_counter` whose per-CPU parts
/// are folded in once they reach the batch, `max(32, 2 * online CPUs)`
/// (mm/percpu_counter.c, compute_batch_value): each CPU may hold up to a
/// batch. Before, an `atomic_long_t` that each thread's cached updates
/// reach every 64 events (TASK_RSS_EVENTS_THRESH): up to 64 pages per
/// thread, counted here once per CPU that can run one at a time.
fn counter_lag_pages(rss_stride: u32) -> u64 {
    let cpus = online_cpus();
    if rss_stride == 8 {
        64 * cpus
    } else {
        (2 * cpus).max(32) * cpus
    }
}

/// The number of online CPUs (/sys/devices/system/cpu/online, "0-3,6"),
/// 1 when unreadable.
fn online_cpus() -> u64 {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map(|s| {
            s.trim()
                .split(',')
                .filter_map(|range| {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    let (a, b) = (a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?);
                    (b + 1).checked_sub(a)
                })
                .sum::<u64>()
        })
        .unwrap_or(1)
        .max(1)
}

/// The number of pids the kernel can hand out (/proc/sys/kernel/pid_max),
/// which sizes the watch filter: one bit each.
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

/// Loads and attaches a typed (BTF) tracepoint program; when it cannot,
/// one line that says why (the full error at the debug level).
fn attach_btf(ebpf: &mut Ebpf, program: &str, tracepoint: &str) -> Result<(), String> {
    let refused = |what: &str, err: &dyn std::error::Error| {
        tracing::debug!(program, error = %error_chain(err), "the BTF form failed to {what}");
        format!("BTF form failed to {what}: {err}")
    };
    let btf = aya::Btf::from_sys_fs().map_err(|e| refused("read the kernel's BTF", &e))?;
    let prog: &mut aya::programs::BtfTracePoint =
        find_program(ebpf, program).map_err(|e| refused("open", &e))?;
    match prog.load(tracepoint, &btf) {
        Ok(()) => {}
        Err(aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            let log = verifier_log.to_string();
            tracing::debug!(program, error = %io_error, log = %log, "the verifier refused the BTF form");
            return Err(match verifier_reason(&log) {
                Some(line) => format!("BTF form refused by the verifier: {line}"),
                None => format!("BTF form refused by the verifier: {io_error}"),
            });
        }
        Err(e) => return Err(refused("load", &e)),
    }
    prog.attach().map_err(|e| refused("attach", &e))?;
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
