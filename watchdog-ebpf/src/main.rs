//! The watchdog kernel programs.
//!
//! Raw tracepoints only: a classic tracepoint makes the kernel format its
//! record for every event on the host before any filter runs, while a raw
//! tracepoint hands over the `TP_PROTO` arguments and costs nothing until the
//! program looks at them. Every program starts with a tgid lookup in
//! `WATCHED` and returns at once when the process is not watched: that is the
//! whole cost paid by the rest of the host.
//!
//! Kernel struct offsets come from userspace (resolved from the running
//! kernel's BTF) in the read-only global `OFFSETS`.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use watchdog_common::{
    COMM_LEN, EVENT_EXIT, EVENT_FORK, Event, KernelOffsets, MAX_WATCHED, RINGBUF_BYTES,
    SIGNAL_GROUP_EXIT, Watch, counter,
};

/// Watched processes, keyed by tgid.
#[map]
static WATCHED: HashMap<u32, Watch> = HashMap::with_max_entries(MAX_WATCHED, 0);

/// Events for userspace.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RINGBUF_BYTES, 0);

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
    reserved: 0,
});

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
    if group_dead != 0 {
        let _ = report_exit(tgid, task, watch);
    }
    0
}

/// sched_process_exit before 6.16: `(struct task_struct *p)`, fired per
/// thread after `signal->live` was decremented, so the thread that sees it at
/// zero is the last one.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit_legacy(ctx: RawTracePointContext) -> i32 {
    let tgid = current_tgid();
    let Some(watch) = lookup_for_exit(tgid) else {
        return 0;
    };
    let task: *const u8 = ctx.arg(0);
    let off = OFFSETS.load();
    let live = read::<i32>(task, off.task_signal, off.signal_live).unwrap_or(1);
    if live == 0 {
        let _ = report_exit(tgid, task, watch);
    }
    0
}

/// sched_process_fork: `(struct task_struct *parent, struct task_struct *child)`,
/// fired in the forking task for every clone, threads included.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    let parent = current_tgid();
    // SAFETY: the value is copied out before the map can change under it.
    let Some(watch) = (unsafe { WATCHED.get(parent) }).copied() else {
        return 0;
    };
    let child: *const u8 = ctx.arg(1);
    let _ = track_fork(parent, child, watch);
    0
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The unwatched path: one global load and one hash lookup.
#[inline(always)]
fn lookup_for_exit(tgid: u32) -> Option<Watch> {
    // SAFETY: the value is copied out before the map can change under it.
    match unsafe { WATCHED.get(tgid) } {
        Some(w) => Some(*w),
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
    if WATCHED.insert(tgid, watch, 0).is_err() {
        count(counter::WATCH_TABLE_FULL);
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(counter::RINGBUF_FULL);
        return Ok(());
    };
    entry.write(Event {
        kind: EVENT_FORK,
        pid: tgid,
        ppid: parent,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        group: watch.group,
        ..Event::default()
    });
    entry.submit(0);
    Ok(())
}

fn report_exit(tgid: u32, task: *const u8, watch: Watch) -> Result<(), i64> {
    // Forget the process first: even if the event cannot be sent, the tgid
    // must not stay in the table to be reused by an unrelated process.
    let _ = WATCHED.remove(tgid);
    let off = OFFSETS.load();
    let signal = read_field::<*const u8>(task, off.task_signal)?;
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
    });
    entry.submit(0);
    Ok(())
}

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
