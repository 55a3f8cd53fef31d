//! One cgroup v2 per supervised service (Linux).
//!
//! A service's processes are exactly the members of its cgroup: a double
//! fork, `setsid` or `setpgid` does not leave it, so the drain signal
//! reaches every member, the final kill is one write to `cgroup.kill`, and
//! where the memory controller is enabled its `memory.events` says how many
//! of the service's processes an OOM killer took. The core files
//! (`cgroup.procs`, `cgroup.kill`, `cgroup.events`) need no controller, so
//! this works on a hybrid host too, whose v2 hierarchy (mounted at
//! /sys/fs/cgroup/unified) has its controllers bound to v1.
//!
//! # Layout
//!
//! Every daemon instance keeps its services under one directory of its own,
//! the *base*, `<own>/<instance>/`, where `<own>` is the daemon's own cgroup
//! and `<instance>` the token the caller chose (`watchdog-<pid>-<nonce>`). A service
//! `web` lives in `<own>/<instance>/web/`. The base is recorded by the
//! caller, so a later instance can sweep what a crashed one left behind
//! ([`kill_recorded`]) without touching its own.
//!
//! The kernel lets a non-root cgroup that holds processes enable no domain
//! controller for its children. So when the daemon's own cgroup holds only
//! the daemon (a systemd unit with `Delegate=yes`), the daemon first moves
//! itself into a leaf `<own>/supervisor/`, which empties `<own>` and lets
//! `memory` and `pids` be enabled down to the services:
//!
//! ```text
//! <own>/                    the daemon's cgroup (e.g. watchdog.service)
//! ├── supervisor/           the daemon, when <own> held only the daemon
//! └── watchdog-1234/        the base
//!     ├── web/              one service's processes
//!     └── worker/
//! ```
//!
//! When `<own>` is the root of the hierarchy (exempt from that rule) or is
//! shared with other processes, the daemon stays where it is and the base is
//! created beside them; in a shared cgroup the controllers stay off.

#[cfg(all(test, target_os = "linux"))]
pub(crate) use linux::mount_points;
#[cfg(target_os = "linux")]
pub use linux::{Containment, RecordedCgroup, ServiceCgroup, kill_recorded, of_pid, recorded};
#[cfg(not(target_os = "linux"))]
pub use other::{Containment, RecordedCgroup, ServiceCgroup, kill_recorded, of_pid, recorded};

/// What one signal to every member of a cgroup did. A member that exited
/// before the signal reached it is in neither list.
#[derive(Debug, Default)]
pub struct Signalled {
    /// The members it reached.
    pub reached: Vec<u32>,
    /// The members it could not be sent to, and why.
    pub failed: Vec<(u32, std::io::Error)>,
}

/// The most characters of an instance or service name.
pub const MAX_NAME: usize = 64;

/// Whether `name` can name an instance or a service cgroup, and if not
/// why: 1 to [`MAX_NAME`] characters from `[A-Za-z0-9._-]`, never `.` or
/// `..`.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err("must be 1 to 64 characters long");
    }
    if name == "." || name == ".." {
        return Err("is not a directory name");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("may hold only A-Z, a-z, 0-9, '.', '_' and '-'");
    }
    Ok(())
}

#[cfg(target_os = "linux")]
mod linux {
    use std::{
        collections::HashSet,
        ffi::{CStr, CString},
        io::{self, Read},
        os::{
            fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd},
            unix::{ffi::OsStrExt, fs::MetadataExt},
        },
        path::{Component, Path, PathBuf},
        sync::{Arc, Mutex, PoisonError},
        time::{Duration, Instant},
    };

    use tracing::{debug, warn};

    use super::{Signalled, check_name};

    /// `statfs.f_type` of a cgroup2 filesystem.
    const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

    /// The leaf the daemon moves itself into when its own cgroup is to hold
    /// only the daemon's services.
    const SUPERVISOR: &CStr = c"supervisor";

    /// The controllers turned on for the services where the kernel allows.
    const CONTROLLERS: [&str; 2] = ["memory", "pids"];

    /// How long a kill may take to empty a cgroup before it counts as
    /// failed: SIGKILL is not instant for a process in uninterruptible sleep
    /// or with a large address space to tear down.
    const EMPTY_WAIT: Duration = Duration::from_secs(1);

    /// How long `rmdir` is retried while the kernel still reports the
    /// cgroup busy (its last members are exiting).
    const RMDIR_WAIT: Duration = Duration::from_millis(100);

    /// The leaf (namespace-relative cgroup path) this process moved itself
    /// into, so that a second [`Containment::open`] in the same process
    /// treats the leaf's parent as its own cgroup instead of nesting
    /// another leaf. Held while deciding, so two opens do not race.
    static MOVED: Mutex<Option<String>> = Mutex::new(None);

    /// Where this daemon instance puts its services' cgroups (see the
    /// module documentation for the layout).
    #[derive(Debug)]
    pub struct Containment {
        /// The base directory, `<own>/<instance>`.
        base: PathBuf,
        /// The directory of `<own>`, which holds the base.
        own: OwnedFd,
        /// The base directory itself, shared with the service cgroups for
        /// their `rmdir`.
        dir: Arc<OwnedFd>,
        instance: CString,
        /// Whether this process moved itself into `<own>/supervisor`.
        moved: bool,
    }

    impl Containment {
        /// Finds the daemon's own cgroup v2 (the `0::` line of
        /// /proc/self/cgroup, under the cgroup2 mount found in
        /// /proc/self/mountinfo: /sys/fs/cgroup on a v2 host,
        /// /sys/fs/cgroup/unified on a hybrid one) and creates the base
        /// `<own>/<instance>` for the services' cgroups. When `<own>` is not
        /// the hierarchy's root and holds no process but this one, this
        /// process first moves into the leaf `<own>/supervisor`, so that
        /// controllers can be enabled below `<own>`. `memory` and `pids` are
        /// enabled on the way down where the kernel allows; they are a
        /// bonus, and nothing else depends on them.
        ///
        /// A leftover base of the same name (the same token in an earlier
        /// run, as with pid 1 in a fresh container) is reused after its
        /// processes are killed and its cgroups removed.
        ///
        /// `Err` says what was tried and why it failed (no v2 hierarchy,
        /// read-only cgroupfs, no permission); the caller falls back to
        /// process groups.
        pub fn open(instance: &str) -> Result<Containment, String> {
            check_name(instance)
                .map_err(|why| format!("cgroup instance name {instance:?} {why}"))?;
            let mut moved = MOVED.lock().unwrap_or_else(PoisonError::into_inner);
            let me = read_own_cgroup()?;
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
                .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
            let already_moved = moved.as_deref() == Some(me.as_str());
            let own_rel = if already_moved {
                parent_rel(&me).to_owned()
            } else {
                me
            };
            let own_path = locate(&mountinfo, &own_rel).ok_or_else(|| {
                format!(
                    "no cgroup2 mount in /proc/self/mountinfo holds this process's cgroup \
                     {own_rel:?} (a cgroup v1-only host, or v2 is not mounted here)"
                )
            })?;
            let own = open_dir(&own_path).map_err(|e| {
                format!(
                    "cannot open this process's cgroup {}: {e}",
                    own_path.display()
                )
            })?;
            if !is_cgroup2(&own) {
                return Err(format!(
                    "{} is not on a cgroup2 filesystem",
                    own_path.display()
                ));
            }
            let mut is_moved = already_moved;
            if !already_moved && !is_root(&own) && holds_only_me(&own) {
                match move_into_leaf(&own) {
                    Ok(()) => {
                        let leaf = format!("{}/supervisor", own_rel.trim_end_matches('/'));
                        *moved = Some(leaf);
                        is_moved = true;
                    }
                    // The services still get cgroups beside this process,
                    // only without controllers.
                    Err(e) => debug!(
                        "staying in {} (moving into supervisor/ failed: {e}); \
                         service cgroups get no controllers",
                        own_path.display()
                    ),
                }
            }
            enable_controllers(&own);

            let base = own_path.join(instance);
            let name = CString::new(instance).map_err(|e| e.to_string())?;
            let existed = match mkdir_at(&own, &name) {
                Ok(()) => false,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => true,
                Err(e) => {
                    return Err(format!(
                        "cannot create {}, the cgroup v2 directory for the services \
                         (this process is in {own_rel:?}): {e}",
                        base.display()
                    ));
                }
            };
            let dir = open_dir_at(&own, &name).map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    format!("refusing {}: it is a symlink", base.display())
                } else {
                    format!("cannot open the cgroup {}: {e}", base.display())
                }
            })?;
            if existed {
                empty(&dir).map_err(|e| {
                    format!("cannot empty the leftover cgroup {}: {e}", base.display())
                })?;
            }
            enable_controllers(&dir);
            // Joining a service cgroup is a write to a cgroup.procs like
            // this one: find out now rather than in every child.
            open_at(&dir, c"cgroup.procs", libc::O_WRONLY).map_err(|e| {
                format!(
                    "cannot write {}/cgroup.procs to move processes in: {e}",
                    base.display()
                )
            })?;
            Ok(Containment {
                base,
                own,
                dir: Arc::new(dir),
                instance: name,
                moved: is_moved,
            })
        }

        /// The directory that holds the service cgroups, to record in state
        /// for a later instance's [`kill_recorded`].
        pub fn base(&self) -> &Path {
            &self.base
        }

        /// Whether this process moved itself into `<own>/supervisor`.
        pub fn moved_into_leaf(&self) -> bool {
            self.moved
        }

        /// The controllers the service cgroups get (the base's
        /// `cgroup.subtree_control`), e.g. `["memory", "pids"]`; empty where
        /// none could be enabled.
        pub fn controllers(&self) -> Vec<String> {
            read_at(&self.dir, c"cgroup.subtree_control")
                .map(|text| text.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default()
        }

        /// Creates the cgroup of `service`, or reuses a leftover one after
        /// killing its processes and removing its sub-cgroups. Names are
        /// 1 to 64 characters from `[A-Za-z0-9._-]`, never `.` or `..`;
        /// others are refused. Blocks for up to a second while a leftover
        /// empties.
        pub fn create(&self, service: &str) -> io::Result<ServiceCgroup> {
            check_name(service).map_err(|why| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("service name {service:?} {why}"),
                )
            })?;
            let name = CString::new(service).map_err(io::Error::other)?;
            let existed = match mkdir_at(&self.dir, &name) {
                Ok(()) => false,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => true,
                Err(e) => return Err(e),
            };
            let dir = open_dir_at(&self.dir, &name)?;
            if existed {
                empty(&dir)?;
            }
            let procs = open_at(&dir, c"cgroup.procs", libc::O_WRONLY)?;
            Ok(ServiceCgroup {
                path: self.base.join(service),
                name,
                parent: Arc::clone(&self.dir),
                dir,
                procs,
            })
        }

        /// Removes the empty bases other instances left when they were
        /// killed (`watchdog-<pid>-...` of a pid that is no longer a
        /// watchdog). Only `rmdir`: a base that still holds a process is
        /// left for the orphan sweep of its own state directory. Returns
        /// how many were removed.
        pub fn remove_stale(&self) -> usize {
            let Ok(names) = subdirs(&self.own) else {
                return 0;
            };
            let mut removed = 0;
            for name in names {
                let text = name.to_string_lossy();
                let Some(pid) = text
                    .strip_prefix("watchdog-")
                    .and_then(|p| p.split('-').next())
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if name.as_c_str() == self.instance.as_c_str() {
                    continue;
                }
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "watchdog" {
                    continue;
                }
                if remove_tree(&self.own, &name, Instant::now()).is_ok() {
                    removed += 1;
                }
            }
            removed
        }

        /// Removes the whole base at daemon exit: kills what is left, waits
        /// up to a second for it to empty, and removes the cgroups leaves
        /// first. Never follows symlinks. Failures are logged: the next
        /// instance sweeps what remains.
        pub fn remove(self) {
            if let Err(e) = kill_tree(&self.dir) {
                warn!("cannot kill what is left in {}: {e}", self.base.display());
            }
            if !wait_empty(&self.dir, EMPTY_WAIT) {
                warn!(
                    "{} still has processes {} ms after the kill",
                    self.base.display(),
                    EMPTY_WAIT.as_millis()
                );
            }
            if let Err(e) = remove_tree(&self.own, &self.instance, Instant::now() + RMDIR_WAIT) {
                warn!("cannot remove {}: {e}", self.base.display());
            }
        }
    }

    /// One service's cgroup: its directory and its `cgroup.procs`, open
    /// for writing before any fork so that a child can join it.
    #[derive(Debug)]
    pub struct ServiceCgroup {
        path: PathBuf,
        name: CString,
        /// The base directory that holds it.
        parent: Arc<OwnedFd>,
        dir: OwnedFd,
        procs: OwnedFd,
    }

    impl ServiceCgroup {
        /// Its directory, `<base>/<service>`.
        pub fn path(&self) -> &Path {
            &self.path
        }

        /// The cgroup's `cgroup.procs`, open `O_WRONLY | O_CLOEXEC`: a child
        /// calls [`ServiceCgroup::join`] with it in its `pre_exec` hook, so
        /// the service's program is a member from its first instruction.
        /// Close-on-exec, so the service never holds it.
        pub fn procs_fd(&self) -> RawFd {
            self.procs.as_raw_fd()
        }

        /// Moves the calling process into the cgroup whose `cgroup.procs`
        /// is open as `procs_fd`: one write(2) of `"0"`, no allocation,
        /// async-signal-safe (for a child between fork and exec). Call it
        /// before dropping privileges: kernels before 5.16 check the
        /// writer's credentials, not the opener's.
        pub fn join(procs_fd: RawFd) -> io::Result<()> {
            loop {
                // SAFETY: a one-byte write from a static buffer.
                let n = unsafe { libc::write(procs_fd, b"0".as_ptr().cast(), 1) };
                if n == 1 {
                    return Ok(());
                }
                let err = io::Error::last_os_error();
                if n < 0 && err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(if n < 0 {
                    err
                } else {
                    io::Error::from_raw_os_error(libc::EIO)
                });
            }
        }

        /// The pids in it now: its `cgroup.procs` and those of any cgroups
        /// a service created below it, sorted.
        pub fn members(&self) -> Vec<u32> {
            tree_members(&self.dir)
        }

        /// Sends `signal` to every member; returns how many it reached. A
        /// pid that left the cgroup (and was perhaps reused) between the
        /// listing and the signal is not signalled, nor are 0, 1 and this
        /// process, which cannot be a service's.
        pub fn signal(&self, signal: i32) -> usize {
            signal_tree(&self.dir, signal).reached.len()
        }

        /// Kills every member: a write to `cgroup.kill` (Linux 5.14+), which
        /// reaches processes forked while it runs; on older kernels, freezes
        /// the cgroup where it can and sends SIGKILL to every member until
        /// none is left (giving up after about a second). Returns before the
        /// members are gone with `cgroup.kill`: see [`Self::populated`].
        pub fn kill(&self) -> io::Result<()> {
            kill_tree(&self.dir)
        }

        /// Whether any process is in it or below it (`cgroup.events`
        /// `populated`). A killed process counts until it has exited, not
        /// until it is reaped.
        pub fn populated(&self) -> bool {
            populated(&self.dir)
        }

        /// The `oom_kill` count of its `memory.events` (processes in it that
        /// an OOM killer took); `None` when the memory controller is not
        /// enabled for it.
        pub fn oom_kills(&self) -> Option<u64> {
            let events = read_at(&self.dir, c"memory.events").ok()?;
            field(&events, "oom_kill")
        }

        /// Removes it: kills it first if it has processes, then removes it
        /// (and any cgroups below it), retrying for up to about 100 ms while
        /// the kernel still reports it busy.
        pub fn remove(self) -> io::Result<()> {
            if self.populated() {
                self.kill()?;
            }
            remove_tree(&self.parent, &self.name, Instant::now() + RMDIR_WAIT)
        }

        /// The pre-5.14 kill, for the kernels without `cgroup.kill`.
        #[cfg(test)]
        pub(super) fn kill_by_signal(&self) -> io::Result<()> {
            kill_by_signal(&self.dir)
        }

        /// The cgroup's `cgroup.freeze` (1 while frozen).
        #[cfg(test)]
        pub(super) fn read_freeze(&self) -> Option<u64> {
            read_at(&self.dir, c"cgroup.freeze")
                .ok()?
                .trim()
                .parse()
                .ok()
        }
    }

    /// For a later daemon instance's orphan sweep: kills everything in the
    /// cgroup directory `path` that an earlier instance recorded (its
    /// cgroups below included), waits up to a second for it to empty and
    /// removes it. Returns the pids that were in it.
    ///
    /// Refuses (`InvalidInput`) what [`recorded`] refuses. `NotFound` when
    /// there is no such cgroup (nothing to sweep).
    pub fn kill_recorded(path: &Path) -> io::Result<Vec<u32>> {
        let cgroup = recorded(path)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no cgroup {} to sweep", path.display()),
            )
        })?;
        let pids = tree_members(&cgroup.dir);
        cgroup.kill()?;
        if !wait_empty(&cgroup.dir, EMPTY_WAIT) {
            return Err(io::Error::other(format!(
                "{} still has processes {} ms after the kill",
                path.display(),
                EMPTY_WAIT.as_millis()
            )));
        }
        cgroup.remove()?;
        Ok(pids)
    }

    /// A cgroup directory that an earlier daemon instance recorded, checked
    /// by [`recorded`] and held open: what is done to it is done to the
    /// directory that was checked, even if the path is swapped meanwhile.
    #[derive(Debug)]
    pub struct RecordedCgroup {
        path: PathBuf,
        /// The directory that holds it, for its `rmdir`.
        parent: OwnedFd,
        name: CString,
        dir: OwnedFd,
    }

    impl RecordedCgroup {
        /// The recorded path.
        pub fn path(&self) -> &Path {
            &self.path
        }

        /// The pids in it and in the cgroups below it, sorted. A cgroup
        /// removed meanwhile has none; a `cgroup.procs` that cannot be
        /// read is an error, since what it holds cannot be known.
        pub fn members(&self) -> io::Result<Vec<u32>> {
            let (pids, error) = list_members(&self.dir);
            match error {
                None => Ok(pids),
                Some(e) => Err(io::Error::new(
                    e.kind(),
                    format!("cannot list the members of {}: {e}", self.path.display()),
                )),
            }
        }

        /// Sends `signal` to every member, as [`ServiceCgroup::signal`]
        /// does, and says which it reached and which it could not signal.
        pub fn signal(&self, signal: i32) -> Signalled {
            signal_tree(&self.dir, signal)
        }

        /// Kills every member, as [`ServiceCgroup::kill`] does: at once
        /// with `cgroup.kill`, in up to about a second of SIGKILL rounds on
        /// kernels without it.
        pub fn kill(&self) -> io::Result<()> {
            kill_tree(&self.dir)
        }

        /// Removes it and the cgroups below it, leaves first, retrying for
        /// up to about 100 ms while the kernel still reports one busy. A
        /// cgroup that still has members cannot be removed.
        pub fn remove(self) -> io::Result<()> {
            remove_tree(&self.parent, &self.name, Instant::now() + RMDIR_WAIT)
        }
    }

    /// The cgroup v2 path of `pid` (its /proc/PID/cgroup `0::` line,
    /// relative to the root of the hierarchy as this process's cgroup
    /// namespace sees it), e.g. `/watchdog-123/web`.
    pub fn of_pid(pid: u32) -> Option<String> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        v2_line(&text)
    }

    /// The `0::` path in a /proc/PID/cgroup text.
    pub(super) fn v2_line(text: &str) -> Option<String> {
        text.lines()
            .find_map(|line| line.strip_prefix("0::"))
            .map(str::to_owned)
    }

    fn read_own_cgroup() -> Result<String, String> {
        let text = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        v2_line(&text).ok_or_else(|| {
            "no cgroup v2 hierarchy: /proc/self/cgroup has no 0:: line (a cgroup v1-only host)"
                .to_owned()
        })
    }

    /// The parent of a cgroup path (`/` for a top-level one).
    pub(super) fn parent_rel(rel: &str) -> &str {
        match rel.trim_end_matches('/').rsplit_once('/') {
            Some(("", _)) | None => "/",
            Some((parent, _)) => parent,
        }
    }

    /// A cgroup2 mount from /proc/self/mountinfo.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Mount {
        /// The cgroup path mounted there (`/` unless only a subtree is).
        pub(super) root: String,
        pub(super) point: PathBuf,
    }

    /// The cgroup2 mounts in a /proc/self/mountinfo text.
    pub(super) fn cgroup2_mounts(mountinfo: &str) -> Vec<Mount> {
        mountinfo
            .lines()
            .filter_map(|line| {
                let (fields, rest) = line.split_once(" - ")?;
                if rest.split(' ').next()? != "cgroup2" {
                    return None;
                }
                let mut fields = fields.split(' ');
                let root = unescape(fields.nth(3)?);
                let point = PathBuf::from(unescape(fields.next()?));
                Some(Mount { root, point })
            })
            .collect()
    }

    /// Undoes mountinfo's octal escapes (`\040` for a space).
    fn unescape(field: &str) -> String {
        let bytes = field.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let digits = bytes.get(i + 1..i + 4);
            if bytes[i] == b'\\'
                && let Some(digits) = digits
                && digits.iter().all(|d| (b'0'..=b'7').contains(d))
            {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |code, d| code.wrapping_mul(8).wrapping_add(d - b'0')),
                );
                i += 4;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The directory of cgroup `rel` under the cgroup2 mounts: a mount
    /// whose root holds `rel`, /sys/fs/cgroup or /sys/fs/cgroup/unified
    /// first.
    pub(super) fn locate(mountinfo: &str, rel: &str) -> Option<PathBuf> {
        let standard = |m: &Mount| {
            m.point == Path::new("/sys/fs/cgroup") || m.point == Path::new("/sys/fs/cgroup/unified")
        };
        let mut mounts = cgroup2_mounts(mountinfo);
        // Stable: among equals, the first in mountinfo.
        mounts.sort_by_key(|m| (!standard(m), usize::MAX - m.root.len()));
        mounts.iter().find_map(|m| under_mount(m, rel))
    }

    /// The directory of cgroup `rel` under mount `m`, if `m` shows it.
    fn under_mount(m: &Mount, rel: &str) -> Option<PathBuf> {
        let rest = rel.strip_prefix(m.root.trim_end_matches('/'))?;
        match rest.trim_start_matches('/') {
            _ if !(rest.is_empty() || rest.starts_with('/')) => None,
            "" => Some(m.point.clone()),
            rest => Some(m.point.join(rest)),
        }
    }

    /// Whether `dir` is the root of its hierarchy, which has no
    /// `cgroup.events` (and is exempt from the rule that a cgroup with
    /// processes enables no controllers for its children).
    fn is_root(dir: &OwnedFd) -> bool {
        matches!(open_at(dir, c"cgroup.events", libc::O_RDONLY), Err(e)
            if e.raw_os_error() == Some(libc::ENOENT))
    }

    fn is_cgroup2(dir: &OwnedFd) -> bool {
        // SAFETY: a zeroed statfs is a valid out buffer.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: our descriptor and a valid out pointer.
        let ok = unsafe { libc::fstatfs(dir.as_raw_fd(), &mut st) } == 0;
        ok && st.f_type as u64 == CGROUP2_SUPER_MAGIC
    }

    /// Whether the cgroup `dir` itself holds no process but this one.
    fn holds_only_me(dir: &OwnedFd) -> bool {
        let me = std::process::id();
        read_at(dir, c"cgroup.procs").is_ok_and(|text| pids(&text).iter().all(|&pid| pid == me))
    }

    /// Moves this process (all its threads) into `<dir>/supervisor`.
    fn move_into_leaf(dir: &OwnedFd) -> io::Result<()> {
        match mkdir_at(dir, SUPERVISOR) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
            _ => {}
        }
        let leaf = open_dir_at(dir, SUPERVISOR)?;
        write_at(&leaf, c"cgroup.procs", b"0")
    }

    /// Enables [`CONTROLLERS`] for the children of `dir`, each on its own
    /// and where available; refusals (busy, not available, not supported
    /// for this cgroup) leave the services without that controller.
    fn enable_controllers(dir: &OwnedFd) {
        let available = read_at(dir, c"cgroup.controllers").unwrap_or_default();
        let enabled = read_at(dir, c"cgroup.subtree_control").unwrap_or_default();
        for controller in CONTROLLERS {
            let has = |text: &str| text.split_whitespace().any(|c| c == controller);
            if !has(&available) || has(&enabled) {
                continue;
            }
            if let Err(e) = write_at(
                dir,
                c"cgroup.subtree_control",
                format!("+{controller}").as_bytes(),
            ) {
                debug!("cannot enable the {controller} controller for the services: {e}");
            }
        }
    }

    /// Kills everything in `dir` and below, waits for it to empty, thaws it
    /// and removes the cgroups below it: a leftover made ready for reuse.
    fn empty(dir: &OwnedFd) -> io::Result<()> {
        let _ = write_at(dir, c"cgroup.freeze", b"0");
        kill_tree(dir)?;
        if !wait_empty(dir, EMPTY_WAIT) {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "still has processes {} ms after the kill",
                    EMPTY_WAIT.as_millis()
                ),
            ));
        }
        let deadline = Instant::now() + RMDIR_WAIT;
        for sub in subdirs(dir)? {
            remove_tree(dir, &sub, deadline)?;
        }
        Ok(())
    }

    /// Kills everything in `dir` and below: `cgroup.kill`, or signals on a
    /// kernel without it.
    fn kill_tree(dir: &OwnedFd) -> io::Result<()> {
        match write_at(dir, c"cgroup.kill", b"1") {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => kill_by_signal(dir),
            other => other,
        }
    }

    /// SIGKILL to every member of `dir` and below, round after round until
    /// none is left, with the cgroup frozen where the kernel has the v2
    /// freezer (5.2+), so that members cannot fork faster than they die (a
    /// frozen process still dies of SIGKILL). Gives up after 50 rounds.
    fn kill_by_signal(dir: &OwnedFd) -> io::Result<()> {
        let frozen = write_at(dir, c"cgroup.freeze", b"1").is_ok();
        let mut empty = false;
        for _ in 0..50 {
            if tree_members(dir).is_empty() {
                empty = true;
                break;
            }
            signal_tree(dir, libc::SIGKILL);
            if wait_empty(dir, Duration::from_millis(20)) {
                empty = true;
                break;
            }
        }
        if frozen {
            let _ = write_at(dir, c"cgroup.freeze", b"0");
        }
        if empty {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "members were left after 50 rounds of SIGKILL",
            ))
        }
    }

    /// Sends `signal` to every member of `dir` and below. Each pid is
    /// pinned with a pidfd and signalled only if it is still listed after
    /// that: the process the pidfd holds is then the listed member, or has
    /// exited and the signal goes nowhere.
    ///
    /// Never signalled: 0 (how `cgroup.procs` lists a process outside this
    /// pid namespace, and to kill(2) this process's own group), 1 (init),
    /// this process, and pids that do not fit a pid_t (negative, they name
    /// a process group).
    fn signal_tree(dir: &OwnedFd, signal: i32) -> Signalled {
        let me = std::process::id();
        let pinned: Vec<(u32, Option<OwnedFd>)> = tree_members(dir)
            .into_iter()
            .filter(|&pid| pid > 1 && pid != me && libc::pid_t::try_from(pid).is_ok())
            .filter_map(|pid| match pidfd_open(pid) {
                Ok(fd) => Some((pid, Some(fd))),
                // Gone already.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => None,
                // No pidfds (before 5.3) or no descriptor to spare: the
                // plain kill below.
                Err(_) => Some((pid, None)),
            })
            .collect();
        let still: HashSet<u32> = tree_members(dir).into_iter().collect();
        let mut out = Signalled::default();
        for (pid, fd) in pinned.into_iter().filter(|(pid, _)| still.contains(pid)) {
            let sent = match fd {
                // SAFETY: a pidfd we own, no siginfo, no flags.
                Some(fd) => unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        signal,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    ) == 0
                },
                // The plain kill, with its small window for a reused pid.
                // SAFETY: a signal to a pid listed in the cgroup.
                None => unsafe { libc::kill(pid as libc::pid_t, signal) == 0 },
            };
            if sent {
                out.reached.push(pid);
            } else {
                let error = io::Error::last_os_error();
                // ESRCH: it exited meanwhile.
                if error.raw_os_error() != Some(libc::ESRCH) {
                    out.failed.push((pid, error));
                }
            }
        }
        out
    }

    fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor (close-on-exec by default) we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// The pids in `dir` and in the cgroups below it, sorted.
    fn tree_members(dir: &OwnedFd) -> Vec<u32> {
        list_members(dir).0
    }

    /// The pids in `dir` and in the cgroups below it, sorted, with the
    /// first error met opening a cgroup or reading its `cgroup.procs`. A
    /// cgroup removed meanwhile is no error: it has no members.
    fn list_members(dir: &OwnedFd) -> (Vec<u32>, Option<io::Error>) {
        let mut found = Vec::new();
        let mut error = None;
        collect_members(dir, 0, &mut found, &mut error);
        found.sort_unstable();
        found.dedup();
        (found, error)
    }

    /// How deep below a service's cgroup members are looked for.
    const MAX_DEPTH: usize = 16;

    fn collect_members(
        dir: &OwnedFd,
        depth: usize,
        found: &mut Vec<u32>,
        error: &mut Option<io::Error>,
    ) {
        // ENODEV: removed while open.
        let gone = |e: &io::Error| matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV));
        match read_at(dir, c"cgroup.procs") {
            Ok(text) => found.extend(pids(&text)),
            Err(e) if gone(&e) => {}
            Err(e) => {
                error.get_or_insert(e);
            }
        }
        if depth >= MAX_DEPTH {
            return;
        }
        for sub in subdirs(dir).unwrap_or_default() {
            match open_dir_at(dir, &sub) {
                Ok(sub) => collect_members(&sub, depth + 1, found, error),
                Err(e) if gone(&e) => {}
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
    }

    fn pids(text: &str) -> Vec<u32> {
        text.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// `populated` from `dir`'s `cgroup.events`; a cgroup that is gone has
    /// no processes.
    fn populated(dir: &OwnedFd) -> bool {
        read_at(dir, c"cgroup.events")
            .ok()
            .and_then(|events| field(&events, "populated"))
            .is_some_and(|n| n != 0)
    }

    /// The value of `key` in a flat-keyed file (`key value` lines).
    pub(super) fn field(text: &str, key: &str) -> Option<u64> {
        text.lines().find_map(|line| {
            let (k, v) = line.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
    }

    /// Waits up to `timeout` for `dir` and the cgroups below it to hold no
    /// process: woken by the kernel's notification on `cgroup.events`, and
    /// re-reading it at least every 50 ms in case one is missed.
    fn wait_empty(dir: &OwnedFd, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(events) = open_at(dir, c"cgroup.events", libc::O_RDONLY) else {
            return !populated(dir);
        };
        let mut buf = [0u8; 256];
        loop {
            // Reading re-arms the notification.
            // SAFETY: reading into our buffer from offset 0.
            let n =
                unsafe { libc::pread(events.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return !populated(dir);
            }
            let text = String::from_utf8_lossy(&buf[..n as usize]);
            if field(&text, "populated") == Some(0) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut pfd = libc::pollfd {
                fd: events.as_raw_fd(),
                events: libc::POLLPRI,
                revents: 0,
            };
            let ms = left.min(Duration::from_millis(50)).as_millis().max(1) as libc::c_int;
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }

    /// Removes the cgroup `name` in `parent` and every cgroup below it,
    /// leaves first, retrying each while the kernel reports it busy and
    /// `deadline` has not passed.
    fn remove_tree(parent: &OwnedFd, name: &CStr, deadline: Instant) -> io::Result<()> {
        remove_below(parent, name, deadline, 0)
    }

    fn remove_below(
        parent: &OwnedFd,
        name: &CStr,
        deadline: Instant,
        depth: usize,
    ) -> io::Result<()> {
        if depth < MAX_DEPTH {
            let dir = match open_dir_at(parent, name) {
                Ok(dir) => dir,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(e) => return Err(e),
            };
            for sub in subdirs(&dir)? {
                remove_below(&dir, &sub, deadline, depth + 1)?;
            }
        }
        loop {
            // SAFETY: a NUL-terminated name relative to our descriptor.
            if unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) } == 0
            {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOENT) => return Ok(()),
                Some(libc::EBUSY | libc::EINTR) if Instant::now() < deadline => {
                    // The last members are still exiting.
                    std::thread::sleep(Duration::from_millis(2));
                }
                _ => return Err(err),
            }
        }
    }

    /// Checks a cgroup directory that an earlier instance recorded and
    /// opens it, for an orphan sweep ([`kill_recorded`], or one that
    /// signals the members itself). `Ok(None)` when it is gone: the run it
    /// held has ended (a cgroup with members cannot be removed).
    ///
    /// A corrupt or planted record must not make the daemon write outside
    /// the cgroups, or kill itself or the whole system, so it refuses
    /// (`InvalidInput`) a path that is not absolute or holds `.` or `..`,
    /// that is not strictly below a cgroup2 mount point, that is or goes
    /// through a symlink, that is not a directory on a cgroup2 filesystem,
    /// that is not owned by this process's effective uid, that is the root
    /// of a hierarchy, or that holds this process (its own cgroup or an
    /// ancestor of it, or any member below it).
    pub fn recorded(path: &Path) -> io::Result<Option<RecordedCgroup>> {
        let plain = path.is_absolute()
            && path
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !plain {
            return Err(refused(path, "is not an absolute path without . or .."));
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(refused(path, "names no cgroup"));
        };
        let context = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
        };
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| context("find the cgroup2 mounts for", e))?;
        let mounts = cgroup2_mounts(&mountinfo);
        if !mounts
            .iter()
            .any(|m| path.starts_with(&m.point) && path != m.point)
        {
            return Err(refused(path, "is not below a cgroup2 mount"));
        }
        let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(context("inspect the cgroup", e)),
        };
        if meta.file_type().is_symlink() {
            return Err(refused(path, "is a symbolic link"));
        }
        if !meta.is_dir() {
            return Err(refused(path, "is not a directory"));
        }
        // Any symlink on the way makes the resolved path differ.
        match std::fs::canonicalize(path) {
            Ok(real) if real == path => {}
            Ok(_) => return Err(refused(path, "goes through a symlink")),
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(context("resolve the cgroup", e)),
        }
        let name = CString::new(name.as_bytes()).map_err(io::Error::other)?;
        let parent = open_dir(parent).map_err(|e| context("open the parent of", e))?;
        let dir = match open_dir_at(&parent, &name) {
            Ok(dir) => dir,
            Err(e) if gone(&e) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(refused(path, "is a symbolic link"));
            }
            Err(e) => return Err(context("open the cgroup", e)),
        };
        // Checked on the directory opened, not on the path.
        let owner = dir
            .try_clone()
            .and_then(|fd| std::fs::File::from(fd).metadata())
            .map_err(|e| context("inspect the cgroup", e))?
            .uid();
        // SAFETY: geteuid cannot fail.
        let user = unsafe { libc::geteuid() };
        if owner != user {
            return Err(refused(
                path,
                &format!("is owned by uid {owner}, not by uid {user} that runs the watchdog"),
            ));
        }
        if !is_cgroup2(&dir) {
            return Err(refused(path, "is not on a cgroup2 filesystem"));
        }
        if is_root(&dir) {
            return Err(refused(path, "is the root of a cgroup hierarchy"));
        }
        let own = read_own_cgroup().ok();
        let holds_own = own.as_deref().is_some_and(|own| {
            mounts
                .iter()
                .filter_map(|m| under_mount(m, own))
                .any(|dir| dir.starts_with(path))
        });
        if holds_own || tree_members(&dir).contains(&std::process::id()) {
            return Err(refused(path, "holds this process"));
        }
        Ok(Some(RecordedCgroup {
            path: path.to_owned(),
            parent,
            name,
            dir,
        }))
    }

    /// The cgroup2 mount points, for tests that make cgroups of their own.
    #[cfg(test)]
    pub(crate) fn mount_points() -> Vec<PathBuf> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        cgroup2_mounts(&mountinfo)
            .into_iter()
            .map(|m| m.point)
            .collect()
    }

    fn refused(path: &Path, why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to sweep {}: it {why}", path.display()),
        )
    }

    /// The names of the directories (cgroups) in `dir`.
    fn subdirs(dir: &OwnedFd) -> io::Result<Vec<CString>> {
        // A fresh open of its own, so that listing does not move a shared
        // offset.
        let raw = open_at(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY)?.into_raw_fd();
        // SAFETY: fdopendir takes over the descriptor (closedir closes it).
        let stream = unsafe { libc::fdopendir(raw) };
        if stream.is_null() {
            let err = io::Error::last_os_error();
            // SAFETY: still ours when fdopendir failed.
            unsafe { libc::close(raw) };
            return Err(err);
        }
        let mut names = Vec::new();
        loop {
            // SAFETY: a valid stream; the entry is read before the next call.
            let entry = unsafe { libc::readdir(stream) };
            if entry.is_null() {
                break;
            }
            // SAFETY: readdir returned a valid entry with a NUL-terminated name.
            let (kind, name) =
                unsafe { ((*entry).d_type, CStr::from_ptr((*entry).d_name.as_ptr())) };
            if name == c"." || name == c".." {
                continue;
            }
            let is_dir = match kind {
                libc::DT_DIR => true,
                libc::DT_UNKNOWN => {
                    // SAFETY: a zeroed stat is a valid out buffer.
                    let mut st: libc::stat = unsafe { std::mem::zeroed() };
                    // SAFETY: a name in the stream's directory, a valid out buffer.
                    (unsafe {
                        libc::fstatat(
                            libc::dirfd(stream),
                            name.as_ptr(),
                            &mut st,
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    } == 0)
                        && st.st_mode & libc::S_IFMT == libc::S_IFDIR
                }
                _ => false,
            };
            if is_dir {
                names.push(name.to_owned());
            }
        }
        // SAFETY: the stream from fdopendir, closed once.
        unsafe { libc::closedir(stream) };
        Ok(names)
    }

    fn open_dir(path: &Path) -> io::Result<OwnedFd> {
        let cpath = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        open_raw(libc::AT_FDCWD, &cpath, libc::O_RDONLY | libc::O_DIRECTORY)
    }

    /// Opens the directory `name` in `dir`; `ELOOP` when it is a symlink.
    fn open_dir_at(dir: &OwnedFd, name: &CStr) -> io::Result<OwnedFd> {
        open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY)
    }

    /// Opens `name` in `dir`, never through a symlink, close-on-exec.
    fn open_at(dir: &OwnedFd, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
        open_raw(dir.as_raw_fd(), name, flags)
    }

    fn open_raw(dir: RawFd, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
        loop {
            // SAFETY: a NUL-terminated name; the result is checked.
            let fd = unsafe {
                libc::openat(
                    dir,
                    name.as_ptr(),
                    flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh descriptor we now own.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }

    fn mkdir_at(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
        // SAFETY: a NUL-terminated name relative to our descriptor.
        if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn read_at(dir: &OwnedFd, name: &CStr) -> io::Result<String> {
        let mut text = String::new();
        std::fs::File::from(open_at(dir, name, libc::O_RDONLY)?).read_to_string(&mut text)?;
        Ok(text)
    }

    /// One write(2) of `data` to `name` in `dir`: cgroup interface files
    /// take a command per write.
    fn write_at(dir: &OwnedFd, name: &CStr, data: &[u8]) -> io::Result<()> {
        let fd = open_at(dir, name, libc::O_WRONLY)?;
        loop {
            // SAFETY: writing our buffer to our descriptor.
            let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n >= 0 && n as usize == data.len() {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if n < 0 && err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(if n < 0 {
                err
            } else {
                io::Error::other("short write to a cgroup file")
            });
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use std::{io, os::fd::RawFd, path::Path};

    use super::Signalled;

    /// Cannot exist off Linux: [`Containment::open`] always fails there.
    #[derive(Debug)]
    enum Never {}

    /// Where this daemon instance puts its services' cgroups; off Linux
    /// there are none, and [`Containment::open`] says so.
    #[derive(Debug)]
    pub struct Containment {
        never: Never,
    }

    impl Containment {
        pub fn open(instance: &str) -> Result<Containment, String> {
            let _ = instance;
            Err("cgroups are a Linux feature".to_owned())
        }

        pub fn base(&self) -> &Path {
            match self.never {}
        }

        pub fn moved_into_leaf(&self) -> bool {
            match self.never {}
        }

        pub fn controllers(&self) -> Vec<String> {
            match self.never {}
        }

        pub fn create(&self, service: &str) -> io::Result<ServiceCgroup> {
            let _ = service;
            match self.never {}
        }

        pub fn remove_stale(&self) -> usize {
            match self.never {}
        }

        pub fn remove(self) {
            match self.never {}
        }
    }

    /// One service's cgroup; off Linux there are none.
    #[derive(Debug)]
    pub struct ServiceCgroup {
        never: Never,
    }

    impl ServiceCgroup {
        pub fn path(&self) -> &Path {
            match self.never {}
        }

        pub fn procs_fd(&self) -> RawFd {
            match self.never {}
        }

        /// Off Linux: `Unsupported`, and `procs_fd` is not touched.
        pub fn join(procs_fd: RawFd) -> io::Result<()> {
            let _ = procs_fd;
            Err(io::ErrorKind::Unsupported.into())
        }

        pub fn members(&self) -> Vec<u32> {
            match self.never {}
        }

        pub fn signal(&self, signal: i32) -> usize {
            let _ = signal;
            match self.never {}
        }

        pub fn kill(&self) -> io::Result<()> {
            match self.never {}
        }

        pub fn populated(&self) -> bool {
            match self.never {}
        }

        pub fn oom_kills(&self) -> Option<u64> {
            match self.never {}
        }

        pub fn remove(self) -> io::Result<()> {
            match self.never {}
        }
    }

    /// Off Linux: `Unsupported`.
    pub fn kill_recorded(path: &Path) -> io::Result<Vec<u32>> {
        let _ = path;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "cgroups are a Linux feature",
        ))
    }

    /// A recorded cgroup directory; off Linux there are none.
    #[derive(Debug)]
    pub struct RecordedCgroup {
        never: Never,
    }

    impl RecordedCgroup {
        pub fn path(&self) -> &Path {
            match self.never {}
        }

        pub fn members(&self) -> io::Result<Vec<u32>> {
            match self.never {}
        }

        pub fn signal(&self, signal: i32) -> Signalled {
            let _ = signal;
            match self.never {}
        }

        pub fn kill(&self) -> io::Result<()> {
            match self.never {}
        }

        pub fn remove(self) -> io::Result<()> {
            match self.never {}
        }
    }

    /// Off Linux: `Unsupported`, naming the path: a record that names a
    /// cgroup cannot be from this system.
    pub fn recorded(path: &Path) -> io::Result<Option<RecordedCgroup>> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "cannot sweep the cgroup {}: cgroups are a Linux feature",
                path.display()
            ),
        ))
    }

    /// Off Linux: `None`.
    pub fn of_pid(pid: u32) -> Option<String> {
        let _ = pid;
        None
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::{
        io,
        os::unix::process::CommandExt,
        path::Path,
        process::Command,
        time::{Duration, Instant},
    };

    use super::{check_name, linux::*};

    #[test]
    fn names_are_checked() {
        for good in ["web", "web-1.x_y", "A", &"a".repeat(64)] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", "a\0b", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mountinfo_finds_the_v2_mount() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            locate(hybrid, "/").as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            locate(hybrid, "/system.slice/watchdog.service").as_deref(),
            Some(Path::new(
                "/sys/fs/cgroup/unified/system.slice/watchdog.service"
            ))
        );
        // A container that sees only its own subtree, mounted with a
        // space in the mount point.
        let subtree = "\
50 40 0:38 /docker/abc /other rw - cgroup2 cgroup2 rw
51 40 0:38 /docker/abc /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            locate(subtree, "/docker/abc/app").as_deref(),
            Some(Path::new("/other/app"))
        );
        assert_eq!(locate(subtree, "/docker/abcd"), None);
        assert_eq!(
            cgroup2_mounts(subtree)[1].point,
            Path::new("/sys/fs/cgroup x")
        );
        assert_eq!(locate("", "/"), None);
        // Optional fields before the separator; v1 mounts are not cgroup2.
        let tagged = "\
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:8 - cgroup cgroup rw,memory
";
        assert_eq!(
            cgroup2_mounts(tagged),
            [Mount {
                root: "/".into(),
                point: "/sys/fs/cgroup/unified".into()
            }]
        );
    }

    #[test]
    fn cgroup_paths_and_keyed_files_parse() {
        assert_eq!(parent_rel("/a/b"), "/a");
        assert_eq!(parent_rel("/a"), "/");
        assert_eq!(parent_rel("/"), "/");
        assert_eq!(
            v2_line("4:memory:/x\n0::/watchdog-1/web\n").as_deref(),
            Some("/watchdog-1/web")
        );
        assert_eq!(v2_line("4:memory:/x\n"), None);
        let events = "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(field(events, "oom_kill"), Some(1));
        assert_eq!(field(events, "oom"), Some(2));
        assert_eq!(field(events, "missing"), None);
    }

    /// Whether the root-only tests can run; under CI=true they must.
    fn can_run() -> bool {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "needs root to create cgroups, and CI=true requires it");
        eprintln!("skipped: needs root to create cgroups");
        false
    }

    /// A containment no other test (or test run) shares.
    fn containment(test: &str) -> Containment {
        let instance = format!("watchdog-test-{}-{test}", std::process::id());
        Containment::open(&instance).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Polls `done` until it holds or `timeout` passes.
    fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts, inside `cgroup`, a shell whose background child calls
    /// setsid (leaving the shell's session and process group) and waits
    /// until both are members; returns the shell and the session leader.
    /// Kills a test's tree if the test fails before it does: stopped or
    /// sleeping leftovers would hold the test runner's output open.
    struct KillOnPanic(Vec<u32>);

    impl Drop for KillOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                for &pid in &self.0 {
                    // SAFETY: kill has no memory preconditions.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        }
    }

    fn escaping_tree(cgroup: &ServiceCgroup) -> (std::process::Child, u32) {
        let fd = cgroup.procs_fd();
        let mut cmd = Command::new("sh");
        // The shell becomes the second sleep: no foreground child to appear
        // after the members are read.
        cmd.args(["-c", "setsid sleep 100 & exec sleep 100"]);
        // SAFETY: join is async-signal-safe.
        unsafe { cmd.pre_exec(move || ServiceCgroup::join(fd)) };
        let child = cmd.spawn().unwrap();
        let shell = child.id();
        let mut leader = 0;
        let found = eventually(Duration::from_secs(5), || {
            let members = cgroup.members();
            leader = members
                .iter()
                .copied()
                // SAFETY: getsid has no preconditions.
                .find(|&pid| {
                    pid != shell
                        && unsafe { libc::getsid(pid as libc::pid_t) } == pid as libc::pid_t
                })
                .unwrap_or(0);
            members.contains(&shell) && leader != 0
        });
        assert!(
            found,
            "members {:?} lack the shell {shell} or the setsid child",
            cgroup.members()
        );
        (child, leader)
    }

    fn state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }

    fn gone(pid: u32) -> bool {
        matches!(state(pid), None | Some('Z' | 'X'))
    }

    /// The whole life of a service cgroup: a grandchild that calls
    /// setsid is still a member, a signal reaches every member,
    /// cgroup.kill empties it, and nothing is left behind.
    #[test]
    fn a_setsid_grandchild_stays_in_the_service_cgroup() {
        if !can_run() {
            return;
        }
        let containment = containment("life");
        let base = containment.base().to_owned();
        let cgroup = containment.create("web").unwrap();
        assert!(cgroup.path().is_dir());
        assert!(!cgroup.populated());
        let (mut child, leader) = escaping_tree(&cgroup);
        let _kill_cgroup = KillOnPanic(vec![child.id(), leader]);
        let members = cgroup.members();
        assert!(cgroup.populated());
        let rel = of_pid(child.id()).unwrap();
        assert!(
            rel.ends_with(&format!(
                "/{}/web",
                base.file_name().unwrap().to_str().unwrap()
            )),
            "{rel}"
        );
        assert_eq!(of_pid(leader), Some(rel));
        let memory = containment.controllers().iter().any(|c| c == "memory");
        assert_eq!(cgroup.oom_kills(), memory.then_some(0));

        assert_eq!(cgroup.signal(libc::SIGSTOP), members.len());
        assert!(
            eventually(Duration::from_secs(2), || members
                .iter()
                .all(|&pid| state(pid) == Some('T'))),
            "not every member of {members:?} stopped"
        );
        assert_eq!(cgroup.signal(libc::SIGCONT), members.len());

        cgroup.kill().unwrap();
        assert!(
            eventually(Duration::from_secs(1), || !cgroup.populated()),
            "still populated after cgroup.kill: {:?}",
            cgroup.members()
        );
        assert!(members.iter().all(|&pid| gone(pid)));
        child.wait().unwrap();
        let path = cgroup.path().to_owned();
        cgroup.remove().unwrap();
        assert!(!path.exists());
        containment.remove();
        assert!(!base.exists());
    }

    /// The signal-by-signal kill for kernels without cgroup.kill.
    #[test]
    fn the_fallback_kill_empties_the_cgroup() {
        if !can_run() {
            return;
        }
        let containment = containment("fallback");
        let cgroup = containment.create("web").unwrap();
        let (mut child, leader) = escaping_tree(&cgroup);
        let _kill_cgroup = KillOnPanic(vec![child.id(), leader]);
        cgroup.kill_by_signal().unwrap();
        assert!(!cgroup.populated());
        assert!(gone(leader));
        child.wait().unwrap();
        assert_eq!(cgroup.read_freeze(), Some(0), "left frozen");
        cgroup.remove().unwrap();
        let base = containment.base().to_owned();
        containment.remove();
        assert!(!base.exists());
    }

    /// Removing the containment kills what its services left and
    /// removes their cgroups too; a second create of a name empties
    /// the leftover.
    #[test]
    fn leftovers_are_killed_on_reuse_and_removal() {
        if !can_run() {
            return;
        }
        let containment = containment("leftover");
        let first = containment.create("web").unwrap();
        let (mut child, leader) = escaping_tree(&first);
        let _kill_first = KillOnPanic(vec![child.id(), leader]);
        drop(first);
        let again = containment.create("web").unwrap();
        assert!(again.members().is_empty());
        assert!(gone(leader));
        child.wait().unwrap();

        let other = containment.create("worker").unwrap();
        let (mut child, leader) = escaping_tree(&other);
        let _kill_other = KillOnPanic(vec![child.id(), leader]);
        let base = containment.base().to_owned();
        containment.remove();
        assert!(!base.exists());
        assert!(gone(leader));
        child.wait().unwrap();
        assert_eq!(again.oom_kills(), None, "no memory.events once removed");
    }

    /// A later instance sweeps a recorded base: its processes die and
    /// the cgroups go.
    #[test]
    fn a_recorded_base_is_swept() {
        if !can_run() {
            return;
        }
        let containment = containment("sweep");
        let cgroup = containment.create("web").unwrap();
        let (mut child, leader) = escaping_tree(&cgroup);
        let _kill_cgroup = KillOnPanic(vec![child.id(), leader]);
        let base = containment.base().to_owned();
        let pids = kill_recorded(&base).unwrap();
        assert!(
            pids.contains(&child.id()) && pids.contains(&leader),
            "{pids:?}"
        );
        assert!(!base.exists());
        assert!(gone(leader));
        child.wait().unwrap();
        assert_eq!(
            kill_recorded(&base).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    /// Paths that are not a cgroup of a cgroup2 mount, go through a
    /// symlink, are a hierarchy's root or a mount point, belong to
    /// another user or hold this process are refused before anything is
    /// read or killed.
    #[test]
    fn a_sweep_outside_cgroupfs_is_refused() {
        let refused = |path: &Path| {
            recorded(path).err().map(|e| e.kind()) == Some(io::ErrorKind::InvalidInput)
        };
        let tmp = std::env::temp_dir().join(format!("watchdog-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        assert!(refused(&tmp));
        assert!(kill_recorded(&tmp).is_err());
        assert!(refused(Path::new("relative/path")));
        assert!(refused(Path::new("/sys/fs/cgroup/../cgroup")));
        assert!(refused(Path::new("/sys/fs/cgroup/unified/../../../tmp")));
        assert!(refused(Path::new("/")));
        // Every mount point, a hierarchy's root or a subtree's.
        for point in mount_points() {
            let err = recorded(&point).unwrap_err();
            assert!(
                err.to_string().contains("is not below a cgroup2 mount"),
                "{err}"
            );
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        if let Some(root) = locate(&mountinfo, "/") {
            // The v2 root itself.
            assert!(refused(&root));
            if can_run() {
                let containment = containment("symlink");
                let link = tmp.join("link");
                std::os::unix::fs::symlink(containment.base(), &link).unwrap();
                assert!(refused(&link));
                let cgroup = containment.create("web").unwrap();
                std::os::unix::fs::chown(cgroup.path(), Some(65534), None).unwrap();
                let err = recorded(cgroup.path()).unwrap_err();
                assert!(err.to_string().contains("owned by uid 65534"), "{err}");
                std::os::unix::fs::chown(cgroup.path(), Some(0), None).unwrap();
                let swept = recorded(cgroup.path()).unwrap().unwrap();
                assert!(swept.members().unwrap().is_empty());
                swept.remove().unwrap();
                containment.remove();
                // This process's own cgroup, unless it is a mount point.
                let own = locate(&mountinfo, &of_pid(std::process::id()).unwrap()).unwrap();
                if !mount_points().contains(&own) {
                    let err = recorded(&own).unwrap_err();
                    assert!(err.to_string().contains("holds this process"), "{err}");
                }
            }
        }
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
