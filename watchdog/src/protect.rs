//! Self-protection: the daemon must outlive what it watches. Under memory
//! pressure the kernel's OOM killer must pick a runaway service, not the
//! daemon that would have drained it; the daemon's pages must stay
//! resident, or it stalls on page faults exactly when it has to act; and
//! its event loop must get the CPU while services burn it.
//!
//! [`apply`] sets these for the daemon; [`ChildReset`] undoes them in each
//! service between fork and exec, so services do not inherit them.
//! Nothing here is fatal: each setting reports what it did, or why not.

use std::{fmt, io};

/// What the daemon asks for itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protection {
    /// Written to /proc/self/oom_score_adj: -1000 exempts the daemon from
    /// the OOM killer (lowering it needs CAP_SYS_RESOURCE).
    pub oom_score_adj: i32,
    /// Lock the daemon's memory (mlockall), so that reclaim under memory
    /// pressure cannot page out the code and data it needs to act.
    pub mlock: bool,
    /// The nice value of the calling thread (negative values need
    /// CAP_SYS_NICE).
    pub nice: i32,
    /// Run the calling thread SCHED_FIFO at priority 1, above every normal
    /// task, with SCHED_RESET_ON_FORK so that neither threads nor processes
    /// it creates inherit the policy (or a negative nice). Off by default:
    /// a real-time thread that spins would starve normal tasks on its CPU
    /// (the kernel's real-time throttling, 95% by default, is the only
    /// brake).
    pub realtime: bool,
}

impl Default for Protection {
    fn default() -> Self {
        Self {
            oom_score_adj: -1000,
            mlock: true,
            nice: -10,
            realtime: false,
        }
    }
}

/// What became of one setting, with one line of text saying what was done
/// or why not, for the caller's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// In effect, e.g. "oom_score_adj -1000".
    Done(String),
    /// Not asked for, e.g. "realtime off".
    Off(String),
    /// Asked for but refused, e.g. "mlockall refused: Operation not
    /// permitted (needs CAP_IPC_LOCK)": worth a warning.
    Refused(String),
    /// Not available on this system.
    Unsupported(String),
}

impl Applied {
    /// Whether the setting was asked for and refused.
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Refused(_))
    }

    /// The line of text.
    pub fn message(&self) -> &str {
        match self {
            Self::Done(m) | Self::Off(m) | Self::Refused(m) | Self::Unsupported(m) => m,
        }
    }
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// Applies `protection` to this process, and its nice value and scheduling
/// policy to the calling thread, returning one [`Applied`] per setting, in
/// the order oom_score_adj, mlockall, nice, realtime.
///
/// Linux keeps the nice value and the scheduling policy per thread, so
/// call this from the event loop thread, before that thread starts the
/// threads that should share its priority (new threads inherit the
/// creator's nice value; with `realtime`, SCHED_RESET_ON_FORK gives them
/// the normal policy and nice 0 instead). oom_score_adj and mlockall hold
/// for the whole process.
pub fn apply(protection: &Protection) -> Vec<Applied> {
    vec![
        sys::oom_score_adj(protection.oom_score_adj),
        if protection.mlock {
            sys::lock_memory()
        } else {
            Applied::Off("mlockall off".into())
        },
        sys::nice(protection.nice),
        if protection.realtime {
            sys::realtime()
        } else {
            Applied::Off("realtime off".into())
        },
    ]
}

/// Only the event loop's priority (nice, on the calling thread): for the
/// foreground commands, which report what they sense but protect nothing.
pub fn priority(nice: i32) -> Applied {
    sys::nice(nice)
}

/// Only SCHED_FIFO for the calling thread (see [`Protection::realtime`]).
pub fn realtime() -> Applied {
    sys::realtime()
}

/// What a service's process does between fork and exec so that it does
/// not inherit the daemon's protection: its own oom_score_adj (0, or the
/// service's configured value), nice 0, and the normal scheduling policy.
/// Memory locks are not inherited across fork, so there are none to undo.
///
/// Built before the fork ([`ChildReset::new`] formats the value), applied
/// in the child ([`ChildReset::apply`]) without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildReset {
    /// The value as written to /proc/self/oom_score_adj, newline included.
    oom_text: [u8; 12],
    oom_len: usize,
}

impl ChildReset {
    /// A reset to `oom_score_adj` (the kernel accepts -1000..=1000).
    pub fn new(oom_score_adj: i32) -> Self {
        let text = format!("{oom_score_adj}\n");
        let mut oom_text = [0; 12];
        // At most 11 characters for an i32, and the newline.
        oom_text[..text.len()].copy_from_slice(text.as_bytes());
        Self {
            oom_text,
            oom_len: text.len(),
        }
    }

    /// Resets the calling process. Async-signal-safe (open, write, close,
    /// sched_setscheduler, setpriority; errors are read from errno), for
    /// use in `pre_exec`.
    ///
    /// Call it before dropping privileges: a write of oom_score_adj by a
    /// process holding CAP_SYS_RESOURCE also sets the floor below which
    /// the process may not lower it again without that capability, so the
    /// service cannot undo its reset later. A value below a floor the
    /// process already has is refused by the kernel and left at the
    /// (higher) current one, as is a positive nice value inherited from
    /// whoever started the daemon: neither is protection the service would
    /// inherit, so neither is an error. Any other failure is, and makes the
    /// spawn fail rather than run the service protected like the daemon.
    /// Off Linux it resets the nice value only.
    pub fn apply(&self) -> io::Result<()> {
        sys::reset_child(&self.oom_text[..self.oom_len])
    }
}

impl Default for ChildReset {
    fn default() -> Self {
        Self::new(0)
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use std::io;

    use super::Applied;

    /// Capability numbers (include/uapi/linux/capability.h).
    const CAP_IPC_LOCK: u32 = 14;

    const OOM_SCORE_ADJ: &std::ffi::CStr = c"/proc/self/oom_score_adj";

    pub(super) fn oom_score_adj(value: i32) -> Applied {
        if !(-1000..=1000).contains(&value) {
            return Applied::Refused(format!(
                "oom_score_adj {value} refused: out of range (-1000 to 1000)"
            ));
        }
        match std::fs::write("/proc/self/oom_score_adj", format!("{value}\n")) {
            Ok(()) => Applied::Done(format!("oom_score_adj {value}")),
            Err(err) => Applied::Refused(format!(
                "oom_score_adj {value} refused: {}{}",
                describe(&err),
                needs(&err, "CAP_SYS_RESOURCE")
            )),
        }
    }

    /// mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT): every mapping,
    /// present and future, stays resident once touched. MCL_ONFAULT (Linux
    /// 4.4) locks pages as they fault in instead of populating every
    /// mapping at once, which would make thread stacks and large reserved
    /// mappings resident in full.
    pub(super) fn lock_memory() -> Applied {
        // With MCL_FUTURE every later mapping counts against
        // RLIMIT_MEMLOCK unless the process holds CAP_IPC_LOCK: under a
        // finite limit, allocations would start failing at the limit. Not
        // locking is the lesser harm.
        let limit = memlock_limit();
        if limit != Some(libc::RLIM_INFINITY) && !has_capability(CAP_IPC_LOCK) {
            let limit = limit.map_or("unknown".into(), |l| format!("{} KiB", l / 1024));
            return Applied::Refused(format!(
                "mlockall skipped: RLIMIT_MEMLOCK is {limit} without CAP_IPC_LOCK, and locking \
                 future mappings would make allocations fail at that limit (needs CAP_IPC_LOCK \
                 or an unlimited RLIMIT_MEMLOCK)"
            ));
        }
        // SAFETY: mlockall takes flags only.
        let locked =
            unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
        if locked == 0 {
            return Applied::Done("mlockall (current and future mappings, on fault)".into());
        }
        let err = io::Error::last_os_error();
        let why = match err.raw_os_error() {
            Some(libc::EPERM) => " (needs CAP_IPC_LOCK)",
            Some(libc::ENOMEM) => " (exceeds RLIMIT_MEMLOCK; needs CAP_IPC_LOCK)",
            Some(libc::EINVAL) => " (MCL_ONFAULT needs Linux 4.4)",
            _ => "",
        };
        Applied::Refused(format!("mlockall refused: {}{why}", describe(&err)))
    }

    /// The calling thread's nice value: setpriority(PRIO_PROCESS, tid),
    /// since Linux keeps it per thread.
    pub(super) fn nice(value: i32) -> Applied {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        // SAFETY: setpriority on our own thread.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, value) } == 0 {
            let slice = short_slice(tid, value);
            return Applied::Done(format!("nice {value}, {slice} (event loop thread)"));
        }
        let err = io::Error::last_os_error();
        Applied::Refused(format!(
            "nice {value} refused: {}{}",
            describe(&err),
            needs(&err, "CAP_SYS_NICE")
        ))
    }

    /// The slice asked for the event loop thread (the kernel's minimum).
    const SLICE_NS: u64 = 100_000;

    impl SchedAttr {
        /// SCHED_OTHER at `nice`, with `runtime` as the slice (0: the
        /// default one).
        pub(super) const fn fair(nice: i32, runtime: u64) -> Self {
            Self {
                size: std::mem::size_of::<Self>() as u32,
                policy: libc::SCHED_OTHER as u32,
                flags: 0,
                nice,
                priority: 0,
                runtime,
                deadline: 0,
                period: 0,
            }
        }
    }

    /// sched_attr (include/uapi/linux/sched/types.h), up to sched_period.
    #[repr(C)]
    pub(super) struct SchedAttr {
        pub(super) size: u32,
        pub(super) policy: u32,
        pub(super) flags: u64,
        pub(super) nice: i32,
        pub(super) priority: u32,
        pub(super) runtime: u64,
        pub(super) deadline: u64,
        pub(super) period: u64,
    }

    /// From Linux 6.12 a fair task's sched_runtime is its slice: a thread
    /// with a short one that wakes preempts the running task at once
    /// (EEVDF), rather than when that task's slice ends, which on a busy
    /// CPU is up to a few milliseconds. Earlier kernels take the call and
    /// ignore the runtime. Services do not keep it (`reset_child` gives the
    /// default back); threads the event loop starts later do.
    fn short_slice(tid: libc::pid_t, nice: i32) -> String {
        let attr = SchedAttr::fair(nice, SLICE_NS);
        // SAFETY: a valid sched_attr of the size it declares, for our own
        // thread.
        let set = unsafe {
            libc::syscall(
                libc::SYS_sched_setattr,
                tid,
                &attr as *const SchedAttr,
                0u32,
            )
        };
        if set != 0 {
            let err = io::Error::last_os_error();
            return format!("default slice (sched_setattr: {})", describe(&err));
        }
        // Read back: a kernel that ignores it reports no runtime.
        let mut back = SchedAttr { runtime: 0, ..attr };
        // SAFETY: a buffer of the size given, for our own thread.
        let got = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                tid,
                &mut back as *mut SchedAttr,
                std::mem::size_of::<SchedAttr>() as u32,
                0u32,
            )
        };
        if got == 0 && back.runtime == SLICE_NS {
            format!("slice {} us", SLICE_NS / 1000)
        } else {
            "default slice (custom slices need Linux 6.12)".into()
        }
    }

    pub(super) fn realtime() -> Applied {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: pid 0 is the calling thread; param is a valid pointer.
        let set = unsafe {
            libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
        };
        if set == 0 {
            return Applied::Done(
                "SCHED_FIFO priority 1, reset on fork (event loop thread)".into(),
            );
        }
        let err = io::Error::last_os_error();
        let why = match err.raw_os_error() {
            // Also refused to a privileged thread in a cgroup without a
            // real-time runtime budget (CONFIG_RT_GROUP_SCHED).
            Some(libc::EPERM) => " (needs CAP_SYS_NICE, and a real-time budget in its cgroup)",
            _ => "",
        };
        Applied::Refused(format!("SCHED_FIFO refused: {}{why}", describe(&err)))
    }

    pub(super) fn reset_child(oom_text: &[u8]) -> io::Result<()> {
        // SAFETY: a NUL-terminated path; the flags are valid.
        let fd = unsafe { libc::open(OOM_SCORE_ADJ.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: writing a buffer we own to the descriptor just opened.
        let written = unsafe { libc::write(fd, oom_text.as_ptr().cast(), oom_text.len()) };
        let write_error = io::Error::last_os_error();
        // SAFETY: closing the descriptor opened above, once.
        unsafe { libc::close(fd) };
        if written < 0 && write_error.raw_os_error() != Some(libc::EACCES) {
            // EACCES: below this process's floor (see ChildReset::apply).
            return Err(write_error);
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling process (one thread after fork).
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // The slice too: sched_setscheduler keeps a custom one (6.12+),
        // sched_setattr with no runtime gives the default back. Kernels
        // without custom slices have nothing to undo, whatever it returns.
        let attr = SchedAttr::fair(0, 0);
        // SAFETY: a valid sched_attr of the size it declares, for ourselves.
        unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
        // SAFETY: setpriority on ourselves.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 0) } != 0 {
            let err = io::Error::last_os_error();
            // EACCES: a positive nice value we may not lower (see
            // ChildReset::apply).
            if err.raw_os_error() != Some(libc::EACCES) {
                return Err(err);
            }
        }
        Ok(())
    }

    fn memlock_limit() -> Option<libc::rlim_t> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid resource and a pointer to a struct we own.
        (unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0)
            .then_some(limit.rlim_cur)
    }

    /// Whether `cap` is in this process's effective set.
    pub(super) fn has_capability(cap: u32) -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
                u64::from_str_radix(hex.trim(), 16).ok()
            })
            .is_some_and(|effective| effective & (1 << cap) != 0)
    }

    /// The error's text without the "(os error N)" suffix.
    fn describe(err: &io::Error) -> String {
        let text = err.to_string();
        match text.find(" (os error") {
            Some(end) => text[..end].to_owned(),
            None => text,
        }
    }

    /// " (needs CAP)" when the error is a refusal of privilege.
    fn needs(err: &io::Error, cap: &str) -> String {
        match err.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => format!(" (needs {cap})"),
            _ => String::new(),
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;

    use super::Applied;

    pub(super) fn oom_score_adj(value: i32) -> Applied {
        Applied::Unsupported(format!(
            "oom_score_adj {value}: not supported on this system"
        ))
    }

    pub(super) fn lock_memory() -> Applied {
        Applied::Unsupported("mlockall: not supported on this system".into())
    }

    /// The process's nice value (per process here, unlike Linux).
    pub(super) fn nice(value: i32) -> Applied {
        // SAFETY: setpriority on ourselves.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, value) } == 0 {
            return Applied::Done(format!("nice {value}"));
        }
        let err = io::Error::last_os_error();
        Applied::Refused(format!("nice {value} refused: {err}"))
    }

    pub(super) fn realtime() -> Applied {
        Applied::Unsupported("SCHED_FIFO: not supported on this system".into())
    }

    pub(super) fn reset_child(_oom_text: &[u8]) -> io::Result<()> {
        // SAFETY: setpriority on ourselves.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 0) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EACCES) {
                return Err(err);
            }
        }
        Ok(())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::{
        os::unix::process::CommandExt,
        process::Command,
        sync::{Mutex, MutexGuard},
    };

    use super::*;

    /// oom_score_adj and memory locks belong to the whole test process:
    /// the tests that change them take turns.
    fn process_wide() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a root-only test may run; under CI=true it must.
    fn root_or_skip(what: &str) -> bool {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "{what} needs root, and CI=true requires it");
        eprintln!("skipped: {what} needs root");
        false
    }

    /// Whether this process may lower oom_score_adj below 0: root in a
    /// container may lack CAP_SYS_RESOURCE.
    fn has_sys_resource() -> bool {
        const CAP_SYS_RESOURCE: u32 = 24;
        sys::has_capability(CAP_SYS_RESOURCE)
    }

    fn status_kib(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
        line.trim().trim_end_matches("kB").trim().parse().unwrap()
    }

    /// Fields of /proc/PATH/stat by their number in proc(5) (1-based).
    fn stat_field(path: &str, number: usize) -> i64 {
        let stat = std::fs::read_to_string(format!("/proc/{path}/stat")).unwrap();
        // The name (field 2) may hold spaces; fields after it do not.
        let after_name = &stat[stat.rfind(')').unwrap() + 1..];
        after_name
            .split_whitespace()
            .nth(number - 3)
            .unwrap()
            .parse()
            .unwrap()
    }

    const NICE: usize = 19;
    const POLICY: usize = 41;

    fn read_oom_score_adj(pid: &str) -> i32 {
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn set_oom_score_adj(value: i32) {
        std::fs::write("/proc/self/oom_score_adj", value.to_string()).unwrap();
    }

    #[test]
    fn child_reset_formats_its_value_before_the_fork() {
        let reset = ChildReset::new(-1000);
        assert_eq!(&reset.oom_text[..reset.oom_len], b"-1000\n");
        let widest = ChildReset::new(i32::MIN);
        assert_eq!(&widest.oom_text[..widest.oom_len], b"-2147483648\n");
        assert_eq!(ChildReset::default(), ChildReset::new(0));
    }

    #[test]
    fn off_settings_are_reported_as_off() {
        let items = apply(&Protection {
            oom_score_adj: 2000,
            mlock: false,
            nice: 0,
            realtime: false,
        });
        assert_eq!(items.len(), 4);
        assert!(items[0].is_refused(), "{}", items[0]);
        assert!(items[0].message().contains("out of range"));
        assert_eq!(items[1], Applied::Off("mlockall off".into()));
        assert_eq!(items[3], Applied::Off("realtime off".into()));
    }

    /// The defaults, plus real time, as root: each applies, on a thread of
    /// its own so the test harness's threads keep their priority.
    #[test]
    fn applies_every_setting_as_root() {
        if !root_or_skip("applying protection") {
            return;
        }
        let _turn = process_wide();
        let before = read_oom_score_adj("self");
        let protection = Protection {
            realtime: true,
            ..Protection::default()
        };
        let (items, nice, policy) = std::thread::spawn(move || {
            let items = apply(&protection);
            let nice = stat_field("thread-self", NICE);
            let policy = stat_field("thread-self", POLICY);
            (items, nice, policy)
        })
        .join()
        .unwrap();
        let oom = read_oom_score_adj("self");
        let locked = status_kib("VmLck");
        set_oom_score_adj(before);
        // SAFETY: munlockall takes no arguments.
        unsafe { libc::munlockall() };

        for item in &items {
            eprintln!("protection: {item}");
        }
        if has_sys_resource() {
            assert_eq!(items[0], Applied::Done("oom_score_adj -1000".into()));
            assert_eq!(oom, -1000);
        } else {
            // Root without CAP_SYS_RESOURCE (a container's bounding set).
            assert_eq!(
                items[0],
                Applied::Refused(
                    "oom_score_adj -1000 refused: Permission denied (needs CAP_SYS_RESOURCE)"
                        .into()
                )
            );
            assert_eq!(oom, before);
        }
        assert!(matches!(items[1], Applied::Done(_)), "{}", items[1]);
        assert!(locked > 0, "VmLck is 0 after mlockall");
        let nice_done = items[2].to_string();
        assert!(
            matches!(items[2], Applied::Done(_))
                && nice_done.starts_with("nice -10, ")
                && nice_done.ends_with(" (event loop thread)"),
            "{nice_done}"
        );
        assert_eq!(nice, -10);
        // A container's cgroup may have no real-time budget: refused then,
        // with the reason.
        match &items[3] {
            Applied::Done(_) => assert_eq!(policy, i64::from(libc::SCHED_FIFO)),
            Applied::Refused(why) => eprintln!("real time not available here: {why}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// mlockall with MCL_ONFAULT locks what is resident and what faults in
    /// later, without making every mapping (thread stacks, reserved heap)
    /// resident at once.
    #[test]
    fn locking_on_fault_does_not_fault_everything_in() {
        if !root_or_skip("mlockall") {
            return;
        }
        let _turn = process_wide();
        let (rss_before, anon_before, lck_before) = (
            status_kib("VmRSS"),
            status_kib("RssAnon"),
            status_kib("VmLck"),
        );
        let applied = sys::lock_memory();
        let (rss_after, anon_after, lck_after) = (
            status_kib("VmRSS"),
            status_kib("RssAnon"),
            status_kib("VmLck"),
        );
        // SAFETY: munlockall takes no arguments.
        unsafe { libc::munlockall() };
        // For comparison: MCL_CURRENT alone populates every mapping.
        // SAFETY: mlockall takes flags only.
        let eager = unsafe { libc::mlockall(libc::MCL_CURRENT) } == 0;
        let rss_eager = status_kib("VmRSS");
        // SAFETY: munlockall takes no arguments.
        unsafe { libc::munlockall() };

        eprintln!(
            "{applied}: VmRSS {rss_before} -> {rss_after} kB (RssAnon {anon_before} -> \
             {anon_after} kB), VmLck {lck_before} -> {lck_after} kB; MCL_CURRENT without \
             MCL_ONFAULT{}: VmRSS {rss_eager} kB",
            if eager { "" } else { " (refused)" }
        );
        assert!(matches!(applied, Applied::Done(_)), "{applied}");
        assert!(lck_after > lck_before, "nothing was locked");
        assert!(
            rss_after < rss_before + 4 * 1024,
            "VmRSS rose from {rss_before} to {rss_after} kB"
        );
    }

    /// A service forked by a protected daemon gets its own oom_score_adj,
    /// nice 0 and SCHED_OTHER, whatever the forking thread had.
    #[test]
    fn a_child_does_not_inherit_the_protection() {
        if !root_or_skip("resetting a child's protection") {
            return;
        }
        let _turn = process_wide();
        let before = read_oom_score_adj("self");
        // The daemon's protection is a negative value, which needs
        // CAP_SYS_RESOURCE; without it a positive one still shows that the
        // child writes its own value rather than keeping the inherited one.
        let inherited = if has_sys_resource() { -500 } else { 500 };
        if inherited > 0 {
            eprintln!("no CAP_SYS_RESOURCE: the parent's oom_score_adj is {inherited}, not -500");
        }
        set_oom_score_adj(inherited);
        let (fifo, children) = std::thread::spawn(|| {
            // The forking thread is protected like the event loop: nice
            // and (where the cgroup allows) SCHED_FIFO, not reset on fork.
            assert!(matches!(sys::nice(-5), Applied::Done(_)));
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: the calling thread; param is a valid pointer.
            let fifo = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0;
            // Without a reset first: what a service would inherit.
            let children =
                [None, Some(0), Some(300)].map(|target| (target, spawn_and_read(target)));
            (fifo, children)
        })
        .join()
        .unwrap();
        set_oom_score_adj(before);

        if !fifo {
            eprintln!("SCHED_FIFO not available here: the policy reset was not exercised");
        }
        let inherited_policy = if fifo {
            libc::SCHED_FIFO
        } else {
            libc::SCHED_OTHER
        };
        for (target, observed) in children {
            let expected = match target {
                None => (inherited, -5, i64::from(inherited_policy)),
                Some(oom) => (oom, 0, i64::from(libc::SCHED_OTHER)),
            };
            assert_eq!(
                observed, expected,
                "(oom_score_adj, nice, policy) of a child with reset {target:?}"
            );
        }
    }

    /// The slice (sched_runtime) of `pid`, as sched_getattr reports it.
    fn slice_of(pid: u32) -> u64 {
        let mut attr = sys::SchedAttr::fair(0, 0);
        // SAFETY: a buffer of the size given.
        let got = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                pid,
                &mut attr as *mut sys::SchedAttr,
                std::mem::size_of::<sys::SchedAttr>() as u32,
                0u32,
            )
        };
        assert_eq!(got, 0, "sched_getattr({pid})");
        attr.runtime
    }

    /// The event loop's short slice stays with it: a service, reset
    /// between fork and exec, runs with the default one.
    #[test]
    fn services_do_not_keep_the_short_slice() {
        if !root_or_skip("scheduling slices") {
            return;
        }
        let _turn = process_wide();
        std::thread::spawn(|| {
            let applied = priority(-5);
            if !applied.message().contains("slice 100 us") {
                eprintln!("custom slices not available here: {applied}");
                return;
            }
            let spawn = |reset: bool| {
                let mut sleeper = Command::new("sleep");
                sleeper.arg("10");
                if reset {
                    let reset = ChildReset::new(0);
                    // SAFETY: ChildReset::apply is async-signal-safe.
                    unsafe { sleeper.pre_exec(move || reset.apply()) };
                }
                let mut child = sleeper.spawn().unwrap();
                let slice = slice_of(child.id());
                child.kill().unwrap();
                child.wait().unwrap();
                slice
            };
            assert_eq!(spawn(false), 100_000, "inherited without the reset");
            assert_ne!(spawn(true), 100_000, "kept across the reset");
        })
        .join()
        .unwrap();
    }

    /// Spawns a sleeping child, with a [`ChildReset`] to `target` in its
    /// pre_exec if given, and reads its (oom_score_adj, nice, policy).
    fn spawn_and_read(target: Option<i32>) -> (i32, i64, i64) {
        let mut sleeper = Command::new("sleep");
        sleeper.arg("10");
        if let Some(target) = target {
            let reset = ChildReset::new(target);
            // SAFETY: ChildReset::apply is async-signal-safe.
            unsafe { sleeper.pre_exec(move || reset.apply()) };
        }
        let mut child = sleeper.spawn().unwrap();
        let pid = child.id().to_string();
        // spawn returns once the child has exec'd, so pre_exec has run.
        let observed = (
            read_oom_score_adj(&pid),
            stat_field(&pid, NICE),
            stat_field(&pid, POLICY),
        );
        child.kill().unwrap();
        child.wait().unwrap();
        observed
    }
}
