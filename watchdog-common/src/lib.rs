//! Types shared by the kernel programs (`watchdog-ebpf`) and the daemon.
//!
//! Everything here is `#[repr(C)]` with fixed-width integers and explicit
//! padding, so both sides agree on the layout byte for byte and the types can
//! be `aya::Pod` (no implicit padding, no `bool`).
#![no_std]

/// Length of `task_struct::comm` (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;

/// [`Event::kind`]: a process (thread group) exited.
pub const EVENT_EXIT: u32 = 1;
/// [`Event::kind`]: a watched process forked a new process, now watched too.
pub const EVENT_FORK: u32 = 2;
/// [`Event::kind`]: a group's charged total crossed its limit upward while
/// armed; the group is now disarmed until userspace re-arms it.
pub const EVENT_CROSSING: u32 = 3;
/// [`Event::kind`]: a group waiting to re-arm fell below its re-arm level
/// and is armed again.
pub const EVENT_REARMED: u32 = 4;
/// [`Event::kind`]: a group's total moved by at least its step.
pub const EVENT_CHANGED: u32 = 5;
/// [`Event::kind`]: the kernel's OOM killer chose a watched process.
pub const EVENT_OOM_VICTIM: u32 = 6;

/// One record in the `EVENTS` ring buffer.
///
/// A single fixed layout for every kind keeps the ring buffer reader simple;
/// the fields a kind does not use are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `EVENT_*`.
    pub kind: u32,
    /// Exit: the exiting tgid (from `bpf_get_current_pid_tgid`).
    /// Fork: the new child's tgid.
    pub pid: u32,
    /// Exit: the parent's tgid (`real_parent->tgid`). Fork: the forking tgid.
    pub ppid: u32,
    /// Exit: the status in wait(2) form (`code << 8`, or signal | 0x80 core).
    pub wait_status: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the event was produced.
    pub ktime_ns: u64,
    /// Exit: peak resident set of the process in pages (`signal->maxrss`).
    pub peak_rss_pages: u64,
    /// The group handle (see [`group_slot`]) the process belonged to, 0
    /// for none.
    pub group: u32,
    /// Exit: `task->tgid` read through the BTF offsets; it must equal `pid`.
    /// Userspace uses it to check the offsets are right.
    pub tgid_via_offsets: u32,
    /// Exit: the process name (`group_leader->comm`), NUL padded.
    pub comm: [u8; COMM_LEN],
    /// Crossing / re-armed / changed: the group's charged total in bytes.
    pub bytes: i64,
    /// Crossing: the limit it crossed.
    pub limit: u64,
}

/// Value of the `WATCHED` map, keyed by tgid.
///
/// A process is charged `max(0, last - base)` pages per counter: its
/// growth since `base`. A forked child starts with `base` at the counters
/// it inherited (fork copies the parent's resident counts although the
/// pages are shared copy-on-write), so each page is charged once; exec
/// resets `base` to 0 (a new mm owns all its pages).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watch {
    /// The group handle (see [`group_slot`]) this process is charged to; 0
    /// for none (exits only).
    pub group: u32,
    /// `WATCH_*` bits.
    pub flags: u32,
    /// The counters (MM_ANONPAGES, MM_SHMEMPAGES) as last brought up to
    /// date, in pages. Swapped atomically, so concurrent updates from the
    /// process's threads telescope to the right sum.
    pub last_anon: i64,
    pub last_shmem: i64,
    /// Pages of each counter not charged to this process (see above).
    pub base_anon: i64,
    pub base_shmem: i64,
    /// The process's mm, set at fork or learned on its first update (0
    /// until then), so that updates to other address spaces are told apart
    /// without reading `current->mm` on every page fault.
    pub mm: u64,
}

/// [`Watch::flags`]: the process shares its parent's mm (vfork,
/// posix_spawn, clone with CLONE_VM): every page is the parent's, and it is
/// charged nothing until it execs.
pub const WATCH_SHARED_MM: u32 = 1;

/// The contribution of one counter: growth above `base`, never negative.
#[inline(always)]
pub const fn charged_pages(counter: i64, base: i64) -> i64 {
    let pages = counter - base;
    if pages > 0 { pages } else { 0 }
}

/// A process's contribution is brought up to date when a counter moved by
/// at least this many pages since (64 KiB with 4 KiB pages): most page
/// faults then cost a read and a compare. Totals lag by less than this
/// per counter and process, well inside the counters' own per-CPU slack.
pub const GRANULE_PAGES: i64 = 16;

/// Number of group slots (slot 0 means "no group").
pub const MAX_GROUPS: u32 = 4096;

/// A group handle is its slot in the low [`GROUP_SLOT_BITS`] bits and a
/// generation above them, so that a member of an earlier use of the slot
/// (still forking or exiting after its group was removed) is never
/// credited to the group that uses the slot now.
pub const GROUP_SLOT_BITS: u32 = 16;

/// The slot of a group handle.
#[inline(always)]
pub const fn group_slot(handle: u32) -> u32 {
    handle & ((1 << GROUP_SLOT_BITS) - 1)
}

const _: () = assert!(MAX_GROUPS <= 1 << GROUP_SLOT_BITS);

/// `GROUP_LIMITS` value: set by userspace, read by the kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupLimits {
    /// Crossing upward fires [`EVENT_CROSSING`] when armed; 0 disables it.
    pub limit: u64,
    /// A group in [`GROUP_WAIT_BELOW`] re-arms when its total is below this.
    pub rearm_below: u64,
    /// Emit [`EVENT_CHANGED`] when the total moved this much since the last
    /// one; 0 disables it.
    pub step: u64,
    /// The handle of the group using this slot now; 0 when free. Updates
    /// carrying another handle are ignored.
    pub handle: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// `GROUP_COUNTERS` value: owned by the kernel programs once the group has
/// members (userspace writes it only when creating the group).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupCounters {
    /// Sum of the members' `last_bytes`.
    pub total: i64,
    /// The total at the last [`EVENT_CHANGED`].
    pub step_base: i64,
}

/// `GROUP_STATE` values (userspace mirrors them as `sensor::Trigger`).
pub const GROUP_DISARMED: u32 = 0;
pub const GROUP_ARMED: u32 = 1;
pub const GROUP_WAIT_BELOW: u32 = 2;

/// Byte offsets of the kernel struct fields the programs read, resolved at
/// start-up from the running kernel's BTF (`/sys/kernel/btf/vmlinux`), since
/// Rust eBPF programs get no CO-RE relocations. Passed as a read-only global.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_real_parent: u32,
    pub task_group_leader: u32,
    pub task_exit_code: u32,
    pub task_signal: u32,
    pub task_comm: u32,
    pub signal_live: u32,
    pub signal_flags: u32,
    pub signal_group_exit_code: u32,
    pub signal_maxrss: u32,
    pub task_mm: u32,
    /// Offset of `mm_struct::rss_stat`.
    pub mm_rss_stat: u32,
    /// Distance between two counters of `rss_stat` (a `percpu_counter`
    /// since 6.2, an `atomic_long_t` before).
    pub rss_stride: u32,
    /// Offset of the value within one counter (`percpu_counter::count`).
    pub rss_count: u32,
    /// `MM_ANONPAGES` and `MM_SHMEMPAGES`.
    pub anon_index: u32,
    pub shmem_index: u32,
    /// log2 of the page size.
    pub page_shift: u32,
}

/// `signal_struct::flags` bit set once the whole thread group is exiting
/// (include/linux/sched/signal.h, unchanged since 2.6); the process's exit
/// status is then `signal->group_exit_code`, else the leader's `exit_code`.
pub const SIGNAL_GROUP_EXIT: u32 = 0x0000_0004;

/// Indices of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Ring-buffer reservations that failed (an event was lost).
    pub const RINGBUF_FULL: u32 = 0;
    /// New processes of a watched tree that did not fit in `WATCHED`.
    pub const WATCH_TABLE_FULL: u32 = 1;
    /// Reads of kernel structures that failed (an unexpected layout): the
    /// event or the update they were for was dropped.
    pub const READ_FAILED: u32 = 2;
    /// Number of counters.
    pub const COUNT: u32 = 3;
}

/// Capacity of the `EXIT_SEEN` map: processes whose exit the legacy exit
/// program reports at the same time, far more than can be exiting at once.
pub const MAX_EXITING: u32 = 8192;

/// Capacity of the `WATCHED` map.
pub const MAX_WATCHED: u32 = 65_536;

/// Size of the `EVENTS` ring buffer in bytes (a power of two, page multiple):
/// room for 16,384 events before userspace must read.
pub const RINGBUF_BYTES: u32 = 1 << 20;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), made only of integers, with no padding.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::Watch {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::GroupLimits {}
    unsafe impl aya::Pod for super::GroupCounters {}
}

// The layouts are part of the kernel/user contract: fail the build, not the
// verifier, if they change by accident.
const _: () = assert!(core::mem::size_of::<Event>() == 72);
const _: () = assert!(core::mem::size_of::<Watch>() == 48);
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 72);
const _: () = assert!(core::mem::size_of::<GroupLimits>() == 32);
const _: () = assert!(core::mem::size_of::<GroupCounters>() == 16);
