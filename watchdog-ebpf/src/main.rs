//! The watchdog kernel programs.
//!
//! Raw (and, for rss_stat where the kernel allows it, BTF) tracepoints only:
//! a classic tracepoint makes the kernel format its record for every event
//! on the host before any filter runs, while these hand over the `TP_PROTO`
//! arguments and cost nothing until the program looks at them. Every
//! program starts with the tgid's byte in `WATCH_FILTER` and returns at once
//! when the process is not watched: that is the whole cost paid by the rest
//! of the host.
//!
//! Kernel struct offsets come from userspace (resolved from the running
//! kernel's BTF) in the read-only global `OFFSETS`.
//!
//! A failure of a program (a kernel read that fails on an unexpected
//! layout) is counted in `COUNTERS` (`READ_FAILED`), which the daemon
//! reports like its other losses, and logged through aya-log when the
//! daemon logs at debug: the loader sets the read-only `AYA_LOG_LEVEL` to 0
//! otherwise, so the verifier drops the logging code and the failure path
//! costs a counter increment.
#![no_std]
#![no_main]
// The BPF target has no atomic types with read-modify-write methods (it
// declares no compare-and-swap), but BPF ISA v3 has the instructions, and
// the intrinsics emit them.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic intrinsics, see above")]

use aya_ebpf::{
    Global,
    bindings::BPF_F_MMAPABLE,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use aya_log_ebpf::error;
use watchdog_common::{
    COMM_LEN, EVENT_CHANGED, EVENT_CROSSING, EVENT_EXIT, EVENT_FORK, EVENT_OOM_VICTIM,
    EVENT_REARMED, Event, GRANULE_PAGES, GROUP_ARMED, GROUP_DISARMED, GROUP_WAIT_BELOW,
    GroupCounters, GroupLimits, KernelOffsets, MAX_EXITING, MAX_GROUPS, MAX_WATCHED, RINGBUF_BYTES,
    SIGNAL_GROUP_EXIT, WATCH_SHARED_MM, Watch, charged_pages, counter, group_slot,
};

/// A failure of a program: counted (`READ_FAILED`), and logged when the
/// daemon logs at debug (see the crate's documentation).
macro_rules! failed {
    ($ctx:expr, $($message:tt)+) => {{
        count(counter::READ_FAILED);
        error!($ctx, $($message)+);
    }};
}

/// Watched processes, keyed by tgid.
#[map]
static WATCHED: HashMap<u32, Watch> = HashMap::with_max_entries(MAX_WATCHED, 0);

/// One byte per possible tgid, non-zero when it is in `WATCHED`, packed
/// eight to an element: the unwatched path is an array load the verifier
/// inlines (a bounds check and a byte read), not a hash lookup. Sized to
/// pid_max / 8 by the loader (a tgid past it, after pid_max was raised,
/// falls through to `WATCHED`). Userspace maps it (BPF_F_MMAPABLE) and
/// stores single bytes, so neither side ever rewrites the other's bytes.
#[map]
static WATCH_FILTER: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Events for userspace.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RINGBUF_BYTES, 0);

/// Per-group limits, written by userspace.
#[map]
static GROUP_LIMITS: Array<GroupLimits> = Array::with_max_entries(MAX_GROUPS, 0);

/// Per-group running totals, updated here with atomic adds.
#[map]
static GROUP_COUNTERS: Array<GroupCounters> = Array::with_max_entries(MAX_GROUPS, 0);

/// Per-group trigger state (`GROUP_*`): armed, disarmed after a crossing,
/// or waiting to fall below the re-arm level. Userspace re-arms; the
/// programs disarm with a compare-and-swap, so one crossing fires once.
#[map]
static GROUP_STATE: Array<u32> = Array::with_max_entries(MAX_GROUPS, 0);

/// Legacy exit program, `audit --all`: the processes whose exit was
/// reported, keyed by tgid and `signal_struct`, with the time of the
/// report, so that the several threads of one process that see
/// `signal->live == 0` report it once.
#[map]
static EXIT_SEEN: LruHashMap<ExitKey, u64> = LruHashMap::with_max_entries(MAX_EXITING, 0);

/// A process, told apart from a later one that gets the same pid or the
/// same (freed and reused) signal_struct: both are needed to collide.
#[repr(C)]
struct ExitKey {
    signal: u64,
    tgid: u32,
    _pad: u32,
}

/// Per CPU: the process whose page fault this CPU handled last, its mm,
/// and the counter values its contribution was last brought up to date
/// with (a hint: `WATCHED` stays the truth).
#[map]
static FAULT_CACHE: PerCpuArray<FaultCache> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct FaultCache {
    tgid: u32,
    _pad: u32,
    mm: u64,
    anon: i64,
    shmem: i64,
}

/// Loss counters (`watchdog_common::counter`), per CPU so that counting never
/// contends.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Struct offsets for the running kernel, set by the loader.
#[unsafe(no_mangle)]
static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_pid: 0,
    task_tgid: 0,
    task_real_parent: 0,
    task_group_leader: 0,
    task_exit_code: 0,
    task_signal: 0,
    task_comm: 0,
    signal_live: 0,
    signal_flags: 0,
    signal_group_exit_code: 0,
    signal_maxrss: 0,
    task_mm: 0,
    mm_rss_stat: 0,
    rss_stride: 0,
    rss_count: 0,
    anon_index: 0,
    shmem_index: 0,
    page_shift: 12,
});

/// Non-zero: sched_process_exec fails as if the new mm could not be read
/// (tests of the failure path only; read-only, so the verifier drops the
/// branch when it is 0).
#[unsafe(no_mangle)]
static FAULT_EXEC: Global<u32> = Global::new(0);

/// Non-zero: report the exit of every process on the host (`audit --all`).
#[unsafe(no_mangle)]
static WATCH_ALL: Global<u32> = Global::new(0);

/// sched_process_exit on kernels >= 6.16: `(struct task_struct *p, bool group_dead)`.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(ctx: RawTracePointContext) -> i32 {
    let tgid = current_tgid();
    let Some(watch) = lookup_for_exit(tgid) else {
        return 0;
    };
    let task: *const u8 = ctx.arg(0);
    let group_dead: u64 = ctx.arg(1);
    if group_dead != 0
        // group_dead is true in exactly one thread: the one whose
        // atomic_dec_and_test(&signal->live) reached 0 (kernel/exit.c).
        && let Err(e) = report_exit(tgid, task, watch, Once::Already)
    {
        failed!(
            &ctx,
            "sched_process_exit: reading the task of {} failed: {}",
            tgid,
            e
        );
    }
    0
}

/// sched_process_exit before 6.16: `(struct task_struct *p)`, fired per
/// thread after exit_mm, long after `signal->live` was decremented
/// (kernel/exit.c, do_exit): every thread that gets here after the last
/// decrement sees it at 0, so several threads of one process can. Exactly
/// one of them reports: the one that removes the process's watch entry, or,
/// for a process without one (`audit --all`), the first to record it in
/// `EXIT_SEEN`.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit_legacy(ctx: RawTracePointContext) -> i32 {
    let tgid = current_tgid();
    let Some(watch) = lookup_for_exit(tgid) else {
        return 0;
    };
    let task: *const u8 = ctx.arg(0);
    let off = OFFSETS.load();
    let live = match read::<i32>(task, off.task_signal, off.signal_live) {
        Ok(live) => live,
        Err(e) => {
            failed!(
                &ctx,
                "sched_process_exit: reading signal->live of {} failed: {}",
                tgid,
                e
            );
            return 0;
        }
    };
    if live == 0 {
        let once = if WATCH_ALL.load() != 0 {
            Once::FirstSeen
        } else {
            Once::EntryRemoved
        };
        if let Err(e) = report_exit(tgid, task, watch, once) {
            failed!(
                &ctx,
                "sched_process_exit: reading the task of {} failed: {}",
                tgid,
                e
            );
        }
    }
    0
}

/// How the exit program knows that this thread is the one to report.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Once {
    /// The tracepoint fires once per process.
    Already,
    /// The thread that removes the watch entry reports.
    EntryRemoved,
    /// The first thread to record the process in `EXIT_SEEN` reports.
    FirstSeen,
}

/// Two threads of one exiting process reach the exit tracepoint within
/// this of each other (they are all in do_exit at once); an `EXIT_SEEN`
/// record older than this belongs to an earlier process (pid and
/// signal_struct both reused).
const SAME_EXIT_NS: u64 = 1_000_000_000;

/// Whether this is the first report of process `tgid`, whose signal_struct
/// is at `signal`.
fn first_report(tgid: u32, signal: u64) -> bool {
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = ExitKey {
        signal,
        tgid,
        _pad: 0,
    };
    match EXIT_SEEN.get_ptr_mut(&key) {
        Some(at) => {
            // SAFETY: a valid map value; the compare-and-swap lets one
            // thread claim a stale record.
            let seen = unsafe { atomic::load(at) };
            now.wrapping_sub(seen) >= SAME_EXIT_NS && unsafe { atomic::cas(at, seen, now) }
        }
        None => EXIT_SEEN.insert(&key, now, BPF_NOEXIST).is_ok(),
    }
}

/// `bpf_map_update_elem` flag (include/uapi/linux/bpf.h).
const BPF_NOEXIST: u64 = 1;

/// sched_process_fork: `(struct task_struct *parent, struct task_struct *child)`,
/// fired in the forking task for every clone, threads included.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    let parent = current_tgid();
    if !maybe_watched(parent) {
        return 0;
    }
    // SAFETY: the value is copied out before the map can change under it.
    let Some(watch) = (unsafe { WATCHED.get(parent) }).copied() else {
        return 0;
    };
    let child: *const u8 = ctx.arg(1);
    if let Err(e) = track_fork(parent, child, watch) {
        failed!(
            &ctx,
            "sched_process_fork: reading the child of {} failed: {}",
            parent,
            e
        );
    }
    0
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The first test of every program: whether `tgid` may be watched.
#[inline(always)]
fn maybe_watched(tgid: u32) -> bool {
    match WATCH_FILTER.get_ptr(tgid >> 3) {
        // SAFETY: a byte inside a valid map value.
        Some(word) => unsafe { *word.cast::<u8>().add((tgid & 7) as usize) != 0 },
        None => true,
    }
}

/// Sets `tgid`'s byte in the filter.
#[inline(always)]
fn set_filter(tgid: u32, value: u8) {
    if let Some(word) = WATCH_FILTER.get_ptr_mut(tgid >> 3) {
        // SAFETY: a byte inside a valid map value; a single byte store.
        unsafe { *word.cast::<u8>().add((tgid & 7) as usize) = value };
    }
}

/// The unwatched path: a global load and a filter load.
#[inline(always)]
fn lookup_for_exit(tgid: u32) -> Option<Watch> {
    let watched = if maybe_watched(tgid) {
        // SAFETY: the value is copied out before the map can change.
        unsafe { WATCHED.get(tgid) }.copied()
    } else {
        None
    };
    match watched {
        Some(w) => Some(w),
        None if WATCH_ALL.load() != 0 => Some(Watch::default()),
        None => None,
    }
}

fn track_fork(parent: u32, child: *const u8, watch: Watch) -> Result<(), i64> {
    let off = OFFSETS.load();
    let pid = read_field::<u32>(child, off.task_pid)?;
    let tgid = read_field::<u32>(child, off.task_tgid)?;
    if pid != tgid {
        // A new thread of the watched process, not a new process.
        return Ok(());
    }
    // fork() copies the parent's resident counters into the child
    // (dup_mmap -> copy_page_range counts every copied pte, kernel/fork.c,
    // mm/memory.c) although the pages are shared copy-on-write: charge the
    // child only its growth from here. A CLONE_VM child (vfork,
    // posix_spawn) shares the parent's whole mm until it execs: charge it
    // nothing until then. This tracepoint fires after copy_process, with the
    // child's mm complete (kernel/fork.c, kernel_clone).
    let mut child_watch = Watch {
        group: watch.group,
        ..Watch::default()
    };
    let child_mm = read_field::<*const u8>(child, off.task_mm)?;
    if child_mm == current_mm(&off)? {
        child_watch.flags = WATCH_SHARED_MM;
    } else if !child_mm.is_null() {
        let anon = read_counter(child_mm, off.anon_index, &off)?;
        let shmem = read_counter(child_mm, off.shmem_index, &off)?;
        child_watch.last_anon = anon;
        child_watch.base_anon = anon;
        child_watch.last_shmem = shmem;
        child_watch.base_shmem = shmem;
        child_watch.mm = child_mm as u64;
    }
    // The kernel owns the entry of a new process: one left behind by a
    // process that held this pid before is replaced.
    if WATCHED.insert(tgid, child_watch, 0).is_err() {
        count(counter::WATCH_TABLE_FULL);
    } else {
        set_filter(tgid, 1);
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(counter::RINGBUF_FULL);
        return Ok(());
    };
    entry.write(Event {
        kind: EVENT_FORK,
        pid: tgid,
        ppid: parent,
        // SAFETY: the helper has no preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        group: watch.group,
        ..Event::default()
    });
    entry.submit(0);
    Ok(())
}

fn report_exit(tgid: u32, task: *const u8, watch: Watch, once: Once) -> Result<(), i64> {
    let off = OFFSETS.load();
    // Its memory no longer counts toward its group. Swapping each counter
    // to its base leaves nothing to subtract for a second thread.
    if let Some(entry) = WATCHED.get_ptr_mut(tgid) {
        // SAFETY: a valid map value; the swaps are atomic against the
        // process's other updates.
        let pages = unsafe {
            let base_anon = (*entry).base_anon;
            let base_shmem = (*entry).base_shmem;
            charged_pages(
                atomic::swap(&raw mut (*entry).last_anon, base_anon),
                base_anon,
            ) + charged_pages(
                atomic::swap(&raw mut (*entry).last_shmem, base_shmem),
                base_shmem,
            )
        };
        add_to_group(watch.group, tgid, -(pages << (off.page_shift & 63)));
    }
    // Forget the process: even if the event cannot be sent, the tgid must
    // not stay in the table to be reused by an unrelated process.
    set_filter(tgid, 0);
    let removed = WATCHED.remove(tgid).is_ok();
    let signal = read_field::<*const u8>(task, off.task_signal)?;
    let report = match once {
        Once::Already => true,
        Once::EntryRemoved => removed,
        Once::FirstSeen => first_report(tgid, signal as u64),
    };
    if !report {
        return Ok(());
    }
    let leader = read_field::<*const u8>(task, off.task_group_leader)?;
    let flags = read_field::<u32>(signal, off.signal_flags)?;
    // What wait(2) will report: the group exit code for exit_group() and
    // fatal signals, else the leader's own exit code (the leader called
    // exit() and another thread was the last to go).
    let wait_status = if flags & SIGNAL_GROUP_EXIT != 0 {
        read_field::<u32>(signal, off.signal_group_exit_code)?
    } else {
        read_field::<u32>(leader, off.task_exit_code)?
    };
    let parent = read_field::<*const u8>(task, off.task_real_parent)?;
    let ppid = read_field::<u32>(parent, off.task_tgid)?;
    let tgid_via_offsets = read_field::<u32>(task, off.task_tgid)?;
    let peak_rss_pages = read_field::<u64>(signal, off.signal_maxrss)?;
    let comm = read_field::<[u8; COMM_LEN]>(leader, off.task_comm)?;

    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(counter::RINGBUF_FULL);
        return Ok(());
    };
    entry.write(Event {
        kind: EVENT_EXIT,
        pid: tgid,
        ppid,
        wait_status,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        peak_rss_pages,
        group: watch.group,
        tgid_via_offsets,
        comm,
        ..Event::default()
    });
    entry.submit(0);
    Ok(())
}

/// mark_victim: `(struct task_struct *task, uid_t uid)` (6.8+): the OOM
/// killer chose `task`; it runs in whichever task hit the OOM, so the victim
/// comes from the argument, not from `current`. A rare event.
#[raw_tracepoint(tracepoint = "mark_victim")]
pub fn mark_victim(ctx: RawTracePointContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    let off = OFFSETS.load();
    match read_field::<u32>(task, off.task_tgid) {
        Ok(tgid) => report_oom_victim(tgid),
        Err(e) => {
            failed!(&ctx, "mark_victim: reading the victim's tgid failed: {}", e);
        }
    }
    0
}

/// mark_victim before 6.8: `(int pid)`, the victim's pid.
#[raw_tracepoint(tracepoint = "mark_victim")]
pub fn mark_victim_pid(ctx: RawTracePointContext) -> i32 {
    let pid: u64 = ctx.arg(0);
    report_oom_victim(pid as u32);
    0
}

fn report_oom_victim(tgid: u32) {
    if !maybe_watched(tgid) {
        return;
    }
    // SAFETY: the value is copied out before the map can change.
    let Some(watch) = (unsafe { WATCHED.get(tgid) }).copied() else {
        return;
    };
    emit(EVENT_OOM_VICTIM, tgid, watch.group, 0, 0);
}

/// rss_stat: `(struct mm_struct *mm, int member)` (6.2+; before, a third
/// `long count` follows, unused here). Fires on every change of an mm's
/// resident counters, for every process on the host.
#[raw_tracepoint(tracepoint = "rss_stat")]
pub fn rss_stat(ctx: RawTracePointContext) -> i32 {
    let tgid = current_tgid();
    if !maybe_watched(tgid) {
        return 0;
    }
    if let Err(e) = on_rss_stat::<false>(ctx.arg(0), ctx.arg::<u64>(1) as u32, tgid) {
        failed!(
            &ctx,
            "rss_stat: reading the counters of {} failed: {}",
            tgid,
            e
        );
    }
    0
}

/// rss_stat as a BTF tracepoint, where the kernel allows it: the same, but
/// `mm` is a typed pointer, so its counters are plain loads instead of
/// `bpf_probe_read_kernel` calls on every fault.
#[btf_tracepoint(function = "rss_stat")]
pub fn rss_stat_btf(ctx: BtfTracePointContext) -> i32 {
    let tgid = current_tgid();
    if !maybe_watched(tgid) {
        return 0;
    }
    if let Err(e) = on_rss_stat::<true>(ctx.arg(0), ctx.arg::<u64>(1) as u32, tgid) {
        failed!(
            &ctx,
            "rss_stat (BTF): reading the counters of {} failed: {}",
            tgid,
            e
        );
    }
    0
}

/// A program that does nothing, on rss_stat. The daemon never loads it:
/// `cargo xtask bench` attaches it alone, to measure what the tracepoint's
/// dispatch to any program costs a page fault.
#[btf_tracepoint(function = "rss_stat")]
pub fn rss_stat_null(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// sched_process_exec: `(struct task_struct *p, pid_t old_pid, struct
/// linux_binprm *bprm)`, after the new mm is in place: the process's
/// contribution becomes that of its new address space.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(ctx: RawTracePointContext) -> i32 {
    let tgid = current_tgid();
    if !maybe_watched(tgid) {
        return 0;
    }
    let Some(entry) = WATCHED.get_ptr_mut(tgid) else {
        return 0;
    };
    let off = OFFSETS.load();
    let mm = if FAULT_EXEC.load() != 0 {
        Err(-14)
    } else {
        current_mm(&off)
    };
    if let Err(e) = mm.and_then(|mm| recharge(entry, tgid, mm, &off)) {
        failed!(
            &ctx,
            "sched_process_exec: reading the new mm of {} failed: {}",
            tgid,
            e
        );
    }
    0
}

#[inline(always)]
fn on_rss_stat<const TYPED: bool>(mm: *const u8, member: u32, tgid: u32) -> Result<(), i64> {
    let off = OFFSETS.load();
    let anon = member == off.anon_index;
    if !anon && member != off.shmem_index {
        return Ok(());
    }
    // The common case, a process faulting page after page on one CPU:
    // that CPU's cache says what it last brought up to date, and a counter
    // that moved less than a granule since needs no hash lookup at all.
    let cache = FAULT_CACHE.get_ptr_mut(0);
    let mut pages = None;
    if let Some(cache) = cache {
        // SAFETY: this CPU's own slot, with preemption off.
        let c = unsafe { &mut *cache };
        if c.tgid == tgid && c.mm == mm as u64 {
            let now = counter::<TYPED>(mm, anon, &off)?;
            let seen = if anon { c.anon } else { c.shmem };
            if (now - seen).abs() < GRANULE_PAGES {
                return Ok(());
            }
            pages = Some(now);
        }
    }
    let Some(entry) = WATCHED.get_ptr_mut(tgid) else {
        return Ok(());
    };
    // A vfork child's updates are to its parent's pages: charged to the
    // parent when it next faults, and to the child from its exec on.
    // SAFETY: a valid map value; each field is read once.
    if unsafe { (*entry).flags } & WATCH_SHARED_MM != 0 {
        return Ok(());
    }
    // SAFETY: as above.
    let (last, base) = if anon {
        unsafe { (&raw mut (*entry).last_anon, (*entry).base_anon) }
    } else {
        unsafe { (&raw mut (*entry).last_shmem, (*entry).base_shmem) }
    };
    // Updates to another process's mm (kswapd, ptrace, process_vm_writev,
    // an mm being torn down after exit) are not this process's doing. The
    // process's own mm is learned once, and changes only at exec.
    // SAFETY: as above.
    let known = unsafe { atomic::load(&raw const (*entry).mm) };
    if known == 0 {
        if mm != current_mm(&off)? {
            return Ok(());
        }
        // SAFETY: as above.
        unsafe { (*entry).mm = mm as u64 };
    } else if known != mm as u64 {
        return Ok(());
    }
    let pages = match pages {
        Some(pages) => pages,
        None => counter::<TYPED>(mm, anon, &off)?,
    };
    // Remember for the next fault on this CPU what this one saw.
    if let Some(cache) = cache {
        // SAFETY: this CPU's own slot, with preemption off; the entry is a
        // valid map value.
        unsafe {
            let c = &mut *cache;
            c.tgid = tgid;
            c.mm = mm as u64;
            c.anon = if anon {
                pages
            } else {
                atomic::load(&raw const (*entry).last_anon)
            };
            c.shmem = if anon {
                atomic::load(&raw const (*entry).last_shmem)
            } else {
                pages
            };
        }
    }
    // The contribution moved less than a granule: nothing to add yet.
    // SAFETY: as above.
    if (pages - unsafe { atomic::load(last) }).abs() < GRANULE_PAGES {
        return Ok(());
    }
    // SAFETY: as above. Swapping (not read-then-write) makes concurrent
    // updates from several threads telescope to the right sum.
    let before = unsafe { atomic::swap(last, pages) };
    // SAFETY: as above.
    let group = unsafe { (*entry).group };
    let delta = charged_pages(pages, base) - charged_pages(before, base);
    add_to_group(group, tgid, delta << (off.page_shift & 63));
    Ok(())
}

fn current_mm(off: &KernelOffsets) -> Result<*const u8, i64> {
    // SAFETY: the helper returns the running task, valid while we run.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    read_field::<*const u8>(task, off.task_mm)
}

/// The anon or shmem counter of `mm`: a plain load through a typed
/// pointer (each branch at an offset the verifier knows, from the
/// read-only `OFFSETS`), or a probe read.
#[inline(always)]
fn counter<const TYPED: bool>(mm: *const u8, anon: bool, off: &KernelOffsets) -> Result<i64, i64> {
    if !TYPED {
        let member = if anon {
            off.anon_index
        } else {
            off.shmem_index
        };
        return read_counter(mm, member, off);
    }
    let at = if anon {
        off.mm_rss_stat + off.anon_index * off.rss_stride + off.rss_count
    } else {
        off.mm_rss_stat + off.shmem_index * off.rss_stride + off.rss_count
    };
    // SAFETY: a BTF-typed mm_struct pointer from the tracepoint; the
    // verifier checks the access against the struct's layout.
    Ok(unsafe { core::ptr::read_volatile(mm.add(at as usize).cast::<i64>()) }.max(0))
}

/// One resident-page counter of `mm`. The counters are approximate
/// (per-CPU deltas not folded in) and can dip below zero; userspace
/// confirms every decision exactly.
#[inline(always)]
fn read_counter(mm: *const u8, member: u32, off: &KernelOffsets) -> Result<i64, i64> {
    let at = off.mm_rss_stat + member * off.rss_stride + off.rss_count;
    Ok(read_field::<i64>(mm, at)?.max(0))
}

/// Makes `mm` the process's own address space (at exec) and its
/// contribution all of `mm`'s counters, adding the difference to its group.
fn recharge(entry: *mut Watch, tgid: u32, mm: *const u8, off: &KernelOffsets) -> Result<(), i64> {
    let anon = read_counter(mm, off.anon_index, off)?;
    let shmem = read_counter(mm, off.shmem_index, off)?;
    // SAFETY: a valid map value. exec leaves a single thread (de_thread,
    // fs/exec.c), so nothing updates the entry concurrently; the swaps
    // keep it consistent anyway.
    let before = unsafe {
        (*entry).mm = mm as u64;
        (*entry).flags &= !WATCH_SHARED_MM;
        let base_anon = atomic::swap(&raw mut (*entry).base_anon, 0);
        let base_shmem = atomic::swap(&raw mut (*entry).base_shmem, 0);
        charged_pages(atomic::swap(&raw mut (*entry).last_anon, anon), base_anon)
            + charged_pages(
                atomic::swap(&raw mut (*entry).last_shmem, shmem),
                base_shmem,
            )
    };
    // SAFETY: as above.
    let group = unsafe { (*entry).group };
    add_to_group(
        group,
        tgid,
        (anon + shmem - before) << (off.page_shift & 63),
    );
    Ok(())
}

/// Adds `delta` to a group's total and fires its edge-triggered events.
fn add_to_group(group: u32, tgid: u32, delta: i64) {
    if delta == 0 || group == 0 {
        return;
    }
    let slot = group_slot(group);
    let (Some(counters), Some(state), Some(limits)) = (
        GROUP_COUNTERS.get_ptr_mut(slot),
        GROUP_STATE.get_ptr_mut(slot),
        GROUP_LIMITS.get(slot),
    ) else {
        return;
    };
    // A member of an earlier group in this slot (forking or exiting after
    // that group was removed) is not charged to this one.
    if limits.handle != group {
        return;
    }
    // SAFETY (all atomics below): valid map values of this group, which
    // the programs change only atomically.
    let before = unsafe { atomic::fetch_add(&raw mut (*counters).total, delta) };
    let total = before + delta;
    let limit = limits.limit as i64;
    let rearm_below = limits.rearm_below as i64;

    // Re-arm first, judging by the total before or after this change, so a
    // single jump from below the re-arm level to over the limit still fires.
    if unsafe { atomic::load(state) } == GROUP_WAIT_BELOW
        && (before < rearm_below || total < rearm_below)
        && unsafe { atomic::cas(state, GROUP_WAIT_BELOW, GROUP_ARMED) }
    {
        emit(EVENT_REARMED, tgid, group, total, limits.limit);
    }
    if limit > 0 && total >= limit && unsafe { atomic::load(state) } == GROUP_ARMED {
        // The record first: a crossing that cannot be reported leaves the
        // group armed (it fires on a later update, or userspace finds it
        // when it sees the loss), never disarmed for good.
        let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
            count(counter::RINGBUF_FULL);
            return;
        };
        if unsafe { atomic::cas(state, GROUP_ARMED, GROUP_DISARMED) } {
            entry.write(group_event(
                EVENT_CROSSING,
                tgid,
                group,
                total,
                limits.limit,
            ));
            entry.submit(BPF_RB_FORCE_WAKEUP);
        } else {
            // Another CPU's update fired it.
            entry.discard(0);
        }
    }
    if limits.step > 0 {
        let base_ref = unsafe { &raw mut (*counters).step_base };
        let base = unsafe { atomic::load(base_ref) };
        if (total - base).unsigned_abs() >= limits.step
            && unsafe { atomic::cas(base_ref, base, total) }
        {
            emit(EVENT_CHANGED, tgid, group, total, limits.limit);
        }
    }
}

fn emit(kind: u32, tgid: u32, group: u32, bytes: i64, limit: u64) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(counter::RINGBUF_FULL);
        return;
    };
    entry.write(group_event(kind, tgid, group, bytes, limit));
    // Group events are rare and waited for: wake the reader now rather
    // than leave it to the ring buffer's adaptive notification.
    entry.submit(BPF_RB_FORCE_WAKEUP);
}

#[inline(always)]
fn group_event(kind: u32, tgid: u32, group: u32, bytes: i64, limit: u64) -> Event {
    Event {
        kind,
        pid: tgid,
        // SAFETY: the helper has no preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        group,
        bytes,
        limit,
        ..Event::default()
    }
}

/// `bpf_ringbuf_submit` flag (include/uapi/linux/bpf.h).
const BPF_RB_FORCE_WAKEUP: u64 = 1 << 1;

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only touched by this CPU with preemption off.
        unsafe { *slot += 1 };
    }
}

/// Reads a `T` at `base + offset` from kernel memory.
#[inline(always)]
fn read_field<T>(base: *const u8, offset: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }
        .map_err(i64::from)
}

/// Reads a `T` at `(*(base + ptr_offset)) + offset`.
#[inline(always)]
fn read<T>(base: *const u8, ptr_offset: u32, offset: u32) -> Result<T, i64> {
    let inner = read_field::<*const u8>(base, ptr_offset)?;
    read_field(inner, offset)
}

/// Sequentially consistent atomics on map values.
mod atomic {
    use core::intrinsics::{self, AtomicOrdering::SeqCst};

    /// Stores `value` and returns what was there.
    ///
    /// # Safety
    /// `ptr` must be valid and aligned for the whole operation.
    #[inline(always)]
    pub unsafe fn swap(ptr: *mut i64, value: i64) -> i64 {
        unsafe { intrinsics::atomic_xchg::<i64, { SeqCst }>(ptr, value) }
    }

    /// Adds `delta` and returns the value before.
    ///
    /// # Safety
    /// As [`swap`].
    #[inline(always)]
    pub unsafe fn fetch_add(ptr: *mut i64, delta: i64) -> i64 {
        unsafe { intrinsics::atomic_xadd::<i64, i64, { SeqCst }>(ptr, delta) }
    }

    /// Replaces `old` with `new`; whether it did.
    ///
    /// # Safety
    /// As [`swap`].
    #[inline(always)]
    pub unsafe fn cas<T: Copy>(ptr: *mut T, old: T, new: T) -> bool {
        unsafe { intrinsics::atomic_cxchg::<T, { SeqCst }, { SeqCst }>(ptr, old, new).1 }
    }

    /// A single aligned load (BPF has no seq_cst loads; an aligned load of
    /// up to 8 bytes is never torn, and the cas that follows decides).
    ///
    /// # Safety
    /// As [`swap`].
    #[inline(always)]
    pub unsafe fn load<T: Copy>(ptr: *const T) -> T {
        unsafe { core::ptr::read_volatile(ptr) }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
