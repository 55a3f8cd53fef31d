//! The daemon's state directory: the instance lock (`watchdog.pid`) and a
//! record of every run this instance started (`runs/<service>.json`).
//!
//! The records outlive the daemon: when it is SIGKILLed, its runs keep
//! running, and the next instance reads what the previous one left and
//! either adopts those runs or terminates them ([`sweep`]). A record names
//! its process by pid *and* start time, so a pid that was freed and handed
//! to an unrelated process is recognised and left alone; a run with its own
//! cgroup is ended through the cgroup, which also reaches the processes
//! that left the run's process group or session.
//!
//! The directory must belong to the user the daemon runs as and be writable
//! by nobody else: whoever can write a record can make the next instance
//! signal the processes it names.

use std::{
    collections::BTreeSet,
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Read, Write},
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::{
    cgroup::{self, RecordedCgroup, Signalled},
    ownership::{self, Exposure},
    procs,
};

/// The instance lock's file name inside the state directory.
pub const PID_FILE: &str = "watchdog.pid";

/// The subdirectory that holds the run records.
const RUNS_DIR: &str = "runs";

/// A record is a few hundred bytes; anything much larger is not one.
const MAX_RECORD_BYTES: u64 = 64 * 1024;

/// Longest service name: the record's file name, and its temporary file's
/// (which adds a dot, the pid, a counter and `.tmp`), must stay well under
/// NAME_MAX (255).
const MAX_SERVICE_NAME: usize = 200;

/// How often the sweep looks whether what it signalled has exited.
const POLL: Duration = Duration::from_millis(25);

/// How long after the grace period the sweep waits for SIGKILLed processes
/// to disappear (so that their cgroup can be removed), within its bound of
/// grace + 1 s.
const AFTER_KILL: Duration = Duration::from_millis(900);

/// Why the state directory or its lock could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "refusing the state directory {}: it is a symbolic link, which whoever can \
         change it could point elsewhere; pass the directory it points to, or \
         choose another state-dir",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error(
        "refusing the state directory {}: it exists and is not a directory; \
         remove it or choose another state-dir",
        path.display()
    )]
    NotDirectory { path: PathBuf },
    #[error(
        "refusing the state directory {}: it is owned by uid {owner}, not by uid {user} \
         that runs the watchdog; `chown {user_name} {}` it, or choose another state-dir",
        path.display(), path.display()
    )]
    NotOwned {
        path: PathBuf,
        owner: u32,
        user: u32,
        user_name: String,
    },
    #[error(
        "refusing the state directory {}: group or others can write to it (mode \
         {mode:04o}), so they could plant run records that make the watchdog signal \
         other processes; `chmod go-w {}` it, or choose another state-dir",
        path.display(), path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "another watchdog ({}) is running on the state directory {}; stop it or use \
         another state-dir",
        holder(pid), path.display()
    )]
    Locked { path: PathBuf, pid: Option<u32> },
    // `error`, not `source`: the cause is in the message, and chained as a
    // source too it would be printed twice.
    #[error(
        "cannot {what} {}: {error}; check that the path is right and this user may \
         write there, or choose another state-dir",
        path.display()
    )]
    Io {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
}

fn holder(pid: &Option<u32>) -> String {
    pid.map_or_else(|| "unknown pid".into(), |pid| format!("pid {pid}"))
}

/// An opened, checked state directory.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    runs: PathBuf,
}

/// The instance lock: held while this value lives. Dropping it closes the
/// file, which releases the lock; the file stays, with the last holder's
/// pid in it, since the lock and not the file's presence is what counts.
#[derive(Debug)]
pub struct PidLock {
    // Held for its open file description, which carries the flock.
    _file: File,
    path: PathBuf,
}

impl Drop for PidLock {
    fn drop(&mut self) {
        crate::runner::release(self._file.as_raw_fd());
    }
}

impl PidLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One run this daemon started, as recorded in the state directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub service: String,
    pub pid: u32,
    /// When the process started, from [`start_time`] (Linux: field 22 of
    /// /proc/PID/stat, clock ticks since boot): with the pid, identifies the
    /// process across pid reuse.
    pub start_time: u64,
    /// Its cgroup directory, when it had one.
    pub cgroup: Option<PathBuf>,
    /// The daemon instance that started it.
    pub daemon_pid: u32,
    /// RFC 3339 UTC, when started (informational).
    pub started_at: String,
    /// Its session (the daemon's): what is left of its process group once
    /// its leader is gone is the run's only if it is still in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<u32>,
}

/// The session `pid` is in.
pub fn session_of(pid: u32) -> Option<u32> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: getsid has no preconditions; -1 when there is no such process.
    let sid = unsafe { libc::getsid(pid) };
    u32::try_from(sid).ok()
}

/// Whether `name` can name a service's record: letters, digits, `.`, `_`
/// and `-`, not `.` or `..`, at most 200 bytes. The name becomes a file
/// name, so nothing else (no `/`) may pass.
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl StateDir {
    /// Opens the state directory, creating it (and missing parents) with
    /// mode 0755. Refuses a symlink, something that is not a directory, a
    /// directory not owned by this user or writable by group or others: the
    /// records in it decide which processes a later instance signals. The
    /// `runs` subdirectory is created (0700) and checked the same way.
    pub fn open(path: &Path) -> Result<StateDir, StateError> {
        create_checked(path, 0o755, "create the state directory")?;
        let runs = path.join(RUNS_DIR);
        create_checked(&runs, 0o700, "create the run records directory")?;
        Ok(StateDir {
            path: path.to_owned(),
            runs,
        })
    }

    /// The state directory, as given to [`StateDir::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the instance lock: an exclusive, non-blocking flock on
    /// `<dir>/watchdog.pid` (opened close-on-exec, never through a symlink,
    /// created 0644), which then holds this process's pid. Another holder
    /// gives [`StateError::Locked`] with the pid it wrote. The kernel drops
    /// the lock when its holder dies, so a SIGKILLed instance never leaves
    /// a stale one behind.
    pub fn lock(&self) -> Result<PidLock, StateError> {
        let path = self.path.join(PID_FILE);
        let io_err = |what, error| StateError::Io {
            what,
            path: path.clone(),
            error,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io_err("open the lock file", e))?;
        let meta = file
            .metadata()
            .map_err(|e| io_err("inspect the lock file", e))?;
        if !meta.is_file() {
            return Err(io_err(
                "use the lock file",
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        loop {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => {
                    return Err(StateError::Locked {
                        path: self.path.clone(),
                        pid: read_pid(&file),
                    });
                }
                _ => return Err(io_err("lock", error)),
            }
        }
        file.set_len(0)
            .and_then(|()| file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0))
            .map_err(|e| io_err("write this pid into", e))?;
        crate::runner::withhold(file.as_raw_fd());
        Ok(PidLock { _file: file, path })
    }

    /// Records a run this instance started, in `runs/<service>.json`,
    /// atomically: a reader (the next instance, after a crash) finds the
    /// old record or the new one, never a torn one. The temporary file is
    /// created exclusively (0600, never through a symlink), written and
    /// synced, renamed over the record, and the directory synced, so the
    /// record survives a power loss too.
    pub fn record_run(&self, run: &RunRecord) -> io::Result<()> {
        check_service(&run.service)?;
        let mut data = serde_json::to_vec_pretty(run).map_err(io::Error::other)?;
        data.push(b'\n');
        write_atomically(&self.runs, &format!("{}.json", run.service), &data)
    }

    /// Removes a service's record (its run ended). A missing record is fine.
    pub fn forget_run(&self, service: &str) -> io::Result<()> {
        check_service(service)?;
        match fs::remove_file(self.runs.join(format!("{service}.json"))) {
            Ok(()) => sync_dir(&self.runs),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every run record present, by service name: at start-up, the runs a
    /// previous instance left. A record that cannot be read or is not a
    /// valid record for its file name is skipped with a warning naming the
    /// file, and removed, so it does not come back at every start.
    /// Temporary files that another instance left mid-write are removed.
    pub fn runs(&self) -> Vec<RunRecord> {
        let entries = match fs::read_dir(&self.runs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(error) => {
                warn!(dir = %self.runs.display(), %error, "cannot list the run records");
                return Vec::new();
            }
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            let path = entry.path();
            if let Some(owner) = temp_owner(name) {
                if owner != std::process::id() {
                    debug!(file = %path.display(), "removing a temporary record left mid-write");
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            let Some(service) = name.strip_suffix(".json") else {
                continue;
            };
            match read_record(&path, service) {
                Ok(record) => records.push(record),
                Err(error) => {
                    warn!(
                        file = %path.display(),
                        %error,
                        "skipping and removing an unreadable or corrupt run record"
                    );
                    if let Err(error) = fs::remove_file(&path) {
                        warn!(file = %path.display(), %error, "cannot remove the run record");
                    }
                }
            }
        }
        records.sort_by(|a, b| a.service.cmp(&b.service));
        records
    }
}

/// Creates `path` (with missing parents, `mode`) unless it exists, then
/// checks that it is a directory of ours that nobody else can write.
fn create_checked(path: &Path, mode: u32, what: &'static str) -> Result<(), StateError> {
    let io_err = |what, error| StateError::Io {
        what,
        path: path.to_owned(),
        error,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(path)
                .map_err(|e| io_err(what, e))?;
            fs::symlink_metadata(path).map_err(|e| io_err("inspect", e))?
        }
        Err(e) => return Err(io_err("inspect", e)),
    };
    if meta.file_type().is_symlink() {
        return Err(StateError::Symlink {
            path: path.to_owned(),
        });
    }
    if !meta.is_dir() {
        return Err(StateError::NotDirectory {
            path: path.to_owned(),
        });
    }
    ownership::check(&meta).map_err(|rule| match rule {
        Exposure::NotOwned {
            owner,
            user,
            user_name,
        } => StateError::NotOwned {
            path: path.to_owned(),
            owner,
            user,
            user_name,
        },
        Exposure::Writable { mode } => StateError::Writable {
            path: path.to_owned(),
            mode,
        },
    })
}

/// The pid the lock's holder wrote, if it is there and readable.
fn read_pid(file: &File) -> Option<u32> {
    let mut buf = [0u8; 32];
    let n = file.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&pid| pid > 0)
}

fn check_service(service: &str) -> io::Result<()> {
    if valid_service_name(service) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "service name {service:?} cannot name a run record: use letters, digits, \
                 '.', '_' and '-' only"
            ),
        ))
    }
}

/// Tells temporary files apart for [`write_atomically`], so that two writes
/// in one process never pick the same name.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The name of a temporary file for `name`: `.<name>.<pid>.<n>.tmp`. It
/// ends in `.tmp`, so it is never taken for a record (`.json`).
fn temp_name(name: &str, n: u64) -> String {
    format!(".{name}.{}.{n}.tmp", std::process::id())
}

/// The pid that wrote a temporary file, if `name` is one.
fn temp_owner(name: &str) -> Option<u32> {
    let stem = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = stem.rsplitn(3, '.');
    let _counter: u64 = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(pid)
}

/// Replaces `dir/name` with `data` atomically and durably.
fn write_atomically(dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
    let (tmp, mut file) = create_temp(dir, name)?;
    let result = file
        .write_all(data)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, dir.join(name)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir)
}

/// Creates a new temporary file next to `name`: exclusively (a file left at
/// that name, or planted there, is never written through), mode 0600.
fn create_temp(dir: &Path, name: &str) -> io::Result<(PathBuf, File)> {
    let mut last = None;
    for _ in 0..16 {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(temp_name(name, n));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
}

/// Makes the directory's entries (a rename, a removal) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads and checks one record: a regular file (not followed through a
/// symlink) of sane size, holding a record for `service` whose pid could
/// name a process the sweep may signal.
fn read_record(path: &Path, service: &str) -> io::Result<RunRecord> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if meta.len() > MAX_RECORD_BYTES {
        return Err(invalid(format!("{} bytes, too large", meta.len())));
    }
    let mut data = Vec::new();
    file.take(MAX_RECORD_BYTES).read_to_end(&mut data)?;
    let record: RunRecord = serde_json::from_slice(&data).map_err(|e| invalid(e.to_string()))?;
    if !valid_service_name(service) || record.service != service {
        return Err(invalid(format!(
            "it records service {:?} under the file name of {service:?}",
            record.service
        )));
    }
    check_pid(record.pid).map_err(invalid)?;
    Ok(record)
}

/// Refuses pids that cannot be a run of ours, and that signalled would hit
/// something else entirely: 0 (our own process group), 1 (init), this
/// process, and values that turn negative as a pid_t (a process group).
fn check_pid(pid: u32) -> Result<libc::pid_t, String> {
    match libc::pid_t::try_from(pid) {
        Ok(p) if p > 1 && pid != std::process::id() => Ok(p),
        _ => Err(format!("pid {pid} cannot be a run of this watchdog")),
    }
}

/// The start time of a process: with its pid, it names the process across
/// pid reuse. `None` if there is no such process or it cannot be read. A
/// zombie (exited, not yet reaped) still has one: its pid is not free yet.
///
/// Linux: field 22 of /proc/PID/stat, clock ticks since boot. macOS: the
/// start time libproc reports, in microseconds since the epoch.
pub fn start_time(pid: u32) -> Option<u64> {
    procs::stat(pid).map(|s| s.start_time)
}

/// Whether `pid` is running (not gone, not a zombie).
fn running(pid: u32) -> bool {
    procs::stat(pid).is_some_and(|s| !s.zombie)
}

/// The running members of process group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(group) = libc::pid_t::try_from(pgid) else {
        return Vec::new();
    };
    // SAFETY: signal 0 only checks. ESRCH: no process (not even a zombie)
    // is left in the group, which spares the scan below.
    if unsafe { libc::kill(-group, 0) } != 0
        && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    {
        return Vec::new();
    }
    crate::procs::all_pids()
        .into_iter()
        .filter(|&pid| procs::stat(pid).is_some_and(|s| !s.zombie && s.pgrp == pgid))
        .collect()
}

/// This process's own process group.
fn own_group() -> u32 {
    // SAFETY: getpgid(0) cannot fail for the calling process.
    unsafe { libc::getpgid(0) as u32 }
}

/// How long a process that started at `start_time` (as [`start_time`]
/// reads it) has been running; zero when that cannot be told.
pub fn age(start_time: u64) -> Duration {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let uptime = fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok());
        match uptime {
            Some(up) if ticks > 0 => {
                Duration::from_secs_f64((up - start_time as f64 / ticks as f64).max(0.0))
            }
            _ => Duration::ZERO,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        // Microseconds since the epoch.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        now.saturating_sub(Duration::from_micros(start_time))
    }
}

/// What the sweep did to one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Swept {
    /// The recorded process was gone: nothing touched.
    Gone,
    /// The pid belongs to another process now (its start time differs):
    /// nothing touched.
    PidReused,
    /// Terminated: which pids were signalled (the cgroup's members, or the
    /// process group's), and whether SIGKILL was needed.
    Terminated { pids: Vec<u32>, killed: bool },
    /// Could not (not permitted, an unusable record, survivors): why. The
    /// record is kept for the next start.
    Failed(String),
}

/// Terminates the runs that `records` describe, bounded in number and time:
/// at most `max` records (the rest are left for the next start, with a
/// warning), all at once, each given `grace` after SIGTERM before SIGKILL,
/// the whole sweep taking at most about grace + 1 s. Polls with tokio
/// timers; the runtime thread waits only to remove a cgroup the kernel
/// still reports busy (up to 100 ms).
///
/// A record with a cgroup directory that still exists: every member of the
/// cgroup (and of cgroups below it) gets SIGTERM; once the cgroup is empty,
/// or after `grace`, `cgroup.kill` (on kernels without it, rounds of
/// SIGKILL for up to about a second more, all cgroups at once and off the
/// runtime thread); then the directory is removed. The directory must pass
/// [`cgroup::recorded`] (below a cgroup2 mount, owned by this user, not a
/// symlink, not holding this process): a corrupt record must not make the
/// daemon write elsewhere or kill itself. Without a cgroup, only a process
/// whose start time matches the record is touched: its process group (it
/// was started as a group leader) and itself get SIGTERM, then the group
/// SIGKILL if it is still running after `grace`.
///
/// Records that were dealt with (not [`Swept::Failed`]) are removed.
pub async fn sweep(
    dir: &StateDir,
    mut records: Vec<RunRecord>,
    grace: Duration,
    max: usize,
) -> Vec<(RunRecord, Swept)> {
    let start = tokio::time::Instant::now();
    // A grace too long to add is as good as forever.
    let grace = grace.min(Duration::from_secs(365 * 24 * 3600));
    if records.len() > max {
        let left: Vec<String> = records
            .split_off(max)
            .into_iter()
            .map(|r| r.service)
            .collect();
        warn!(
            count = left.len(),
            services = ?left,
            max,
            "more runs left behind than one sweep takes; the rest stay recorded for the next start"
        );
    }
    let mut targets: Vec<Target> = records.into_iter().map(Target::plan).collect();
    for target in &mut targets {
        target.terminate();
    }
    wait_for_exit(&mut targets, start + grace).await;
    let mut kills = Vec::new();
    for (i, target) in targets.iter_mut().enumerate() {
        if !target.exited()
            && let Some(kill) = target.kill()
        {
            kills.push((i, kill));
        }
    }
    for (i, kill) in kills {
        targets[i].after_kill(kill.await);
    }
    wait_for_exit(&mut targets, start + grace + AFTER_KILL).await;
    let mut out = Vec::with_capacity(targets.len());
    for target in targets {
        let (record, swept) = target.finish();
        match &swept {
            Swept::Failed(why) => {
                warn!(service = %record.service, pid = record.pid, reason = %why,
                    "could not end a run left by a previous instance; its record is kept");
            }
            _ => {
                if let Err(error) = dir.forget_run(&record.service) {
                    warn!(service = %record.service, %error, "cannot remove the run record");
                }
            }
        }
        out.push((record, swept));
    }
    out
}

/// Polls until every target has exited or `deadline` passes.
async fn wait_for_exit(targets: &mut [Target], deadline: tokio::time::Instant) {
    loop {
        if targets.iter_mut().all(Target::exited) {
            return;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return;
        }
        tokio::time::sleep(POLL.min(deadline - now)).await;
    }
}

/// A cgroup after its kill: handed back to its target, with what the
/// signals sent instead did when the kill through the cgroup failed.
struct CgroupKill {
    cgroup: RecordedCgroup,
    fallback: Option<Signalled>,
}

/// One record being swept.
struct Target {
    record: RunRecord,
    /// Decided before any signal: nothing to do, or nothing allowed.
    settled: Option<Swept>,
    /// The run's cgroup, checked and present.
    cgroup: Option<RecordedCgroup>,
    /// The run's process group (its leader's pid), when the leader is
    /// verified by start time and still running, or gone with members of
    /// its group left.
    group: Option<u32>,
    /// The group's leader is gone (or a zombie): only the group is
    /// signalled.
    leaderless: bool,
    /// Seen with nothing left running; never looked at again, so a pid
    /// freed meanwhile and taken by another process is not mistaken for
    /// the run.
    done: bool,
    signalled: BTreeSet<u32>,
    killed: bool,
    errors: BTreeSet<String>,
}

impl Target {
    /// Decides what may be signalled, before anything is.
    fn plan(record: RunRecord) -> Target {
        let mut target = Target {
            record,
            settled: None,
            cgroup: None,
            group: None,
            leaderless: false,
            done: false,
            signalled: BTreeSet::new(),
            killed: false,
            errors: BTreeSet::new(),
        };
        if let Err(why) = check_pid(target.record.pid) {
            target.settled = Some(Swept::Failed(why));
            return target;
        }
        let pid = target.record.pid;
        let leader = procs::stat(pid);
        let verified = leader.is_some_and(|s| s.start_time == target.record.start_time);
        if let Some(path) = &target.record.cgroup {
            match cgroup::recorded(path) {
                Err(why) => {
                    target.settled = Some(Swept::Failed(why.to_string()));
                    return target;
                }
                Ok(Some(cg)) => target.cgroup = Some(cg),
                // Removed already: the run ended (a cgroup with members
                // cannot be removed), unless its leader was moved out.
                Ok(None) => {}
            }
        }
        if verified && running(pid) {
            let member = target
                .cgroup
                .as_ref()
                .is_some_and(|cg| cg.members().is_ok_and(|m| m.contains(&pid)));
            if !member {
                if target.cgroup.is_some() {
                    warn!(service = %target.record.service, pid,
                        "the recorded process is not in its cgroup; ending its process group too");
                }
                if pid == own_group() {
                    target.settled = Some(Swept::Failed(format!(
                        "process group {pid} holds this watchdog itself"
                    )));
                    return target;
                }
                target.group = Some(pid);
            }
        }
        // The leader is gone (or a zombie) but members of its group are
        // left: a process group's number is not handed out as a pid while
        // the group exists, so they are the run's if every one of them is
        // in the run's session and started after it did (a group another
        // process made after the run's had ended has others).
        if target.cgroup.is_none()
            && target.group.is_none()
            && leader.is_none_or(|s| s.zombie && verified)
            && pid != own_group()
            && let Some(session) = target.record.session
        {
            let left = group_members(pid);
            let the_runs = left.iter().all(|&m| {
                session_of(m) == Some(session)
                    && procs::stat(m).is_some_and(|s| s.start_time >= target.record.start_time)
            });
            if the_runs && !left.is_empty() {
                warn!(service = %target.record.service, pid, left = left.len(),
                    "the recorded process is gone, but its process group is not: ending it");
                target.group = Some(pid);
                target.leaderless = true;
            }
        }
        if target.cgroup.is_none() && target.group.is_none() {
            target.settled = Some(match leader {
                Some(_) if !verified => Swept::PidReused,
                _ => Swept::Gone,
            });
        }
        target
    }

    /// Sends SIGTERM to everything the target covers.
    fn terminate(&mut self) {
        if self.settled.is_some() {
            return;
        }
        // A cgroup whose members cannot be listed is signalled nowhere;
        // `exited` keeps the error.
        if let Some(sent) = self.cgroup.as_ref().map(|cg| cg.signal(libc::SIGTERM)) {
            self.note(sent);
        }
        if let Some(pgid) = self.group {
            self.signalled.extend(group_members(pgid));
            self.signal_group(pgid, libc::SIGTERM);
            if !self.leaderless {
                self.signal(pgid, libc::SIGTERM);
            }
        }
    }

    /// Whether nothing the target covers is running any more. Something
    /// that cannot be known (the cgroup cannot be read) counts as exited,
    /// with the error kept: waiting would not tell more.
    fn exited(&mut self) -> bool {
        if self.settled.is_some() || self.done {
            return true;
        }
        if let Some(cg) = &self.cgroup {
            match cg.members() {
                Ok(members) if !members.is_empty() => return false,
                Ok(_) => {}
                Err(e) => {
                    self.errors.insert(e.to_string());
                }
            }
        }
        if self.group_running() {
            return false;
        }
        self.done = true;
        true
    }

    /// Whether the leader is still the recorded process and running.
    fn leader_running(&self) -> bool {
        procs::stat(self.record.pid)
            .is_some_and(|s| !s.zombie && s.start_time == self.record.start_time)
    }

    /// Whether the run's process group (or its leader, wherever it moved)
    /// still has a running member. A pid is not handed out again while a
    /// process group still bears it, so if the leader's pid now names a
    /// process with another start time, the run's group is gone, whatever
    /// group that process leads.
    fn group_running(&self) -> bool {
        let Some(pgid) = self.group else {
            return false;
        };
        match procs::stat(pgid) {
            Some(s) if s.start_time != self.record.start_time => false,
            Some(s) if !s.zombie => true,
            _ => !group_members(pgid).is_empty(),
        }
    }

    /// Kills what is left after the grace period. The cgroup is killed on
    /// a blocking thread, which hands it back with the outcome for
    /// [`Target::after_kill`].
    fn kill(&mut self) -> Option<tokio::task::JoinHandle<CgroupKill>> {
        self.killed = true;
        let job = self.cgroup.take().map(|cg| {
            let members = cg.members().unwrap_or_default();
            self.signalled
                .extend(members.into_iter().filter(|&p| check_pid(p).is_ok()));
            tokio::task::spawn_blocking(move || {
                let fallback = cg.kill().err().map(|e| {
                    debug!(cgroup = %cg.path().display(), error = %e,
                        "cannot kill through the cgroup; killing each member");
                    cg.signal(libc::SIGKILL)
                });
                CgroupKill {
                    cgroup: cg,
                    fallback,
                }
            })
        });
        if let Some(pgid) = self.group
            && self.group_running()
        {
            self.signalled.extend(group_members(pgid));
            self.signal_group(pgid, libc::SIGKILL);
            if self.leader_running() {
                self.signal(pgid, libc::SIGKILL);
            }
        }
        job
    }

    /// Takes the cgroup back from the kill [`Target::kill`] started.
    fn after_kill(&mut self, kill: Result<CgroupKill, tokio::task::JoinError>) {
        match kill {
            Ok(CgroupKill { cgroup, fallback }) => {
                self.cgroup = Some(cgroup);
                if let Some(sent) = fallback {
                    self.note(sent);
                }
            }
            Err(e) => {
                let path = self.record.cgroup.as_deref().unwrap_or(Path::new(""));
                self.errors
                    .insert(format!("killing cgroup {} failed: {e}", path.display()));
            }
        }
    }

    /// The outcome, after removing the cgroup.
    fn finish(mut self) -> (RunRecord, Swept) {
        if let Some(swept) = self.settled.take() {
            return (self.record, swept);
        }
        if let Some(cg) = self.cgroup.take() {
            match cg.members() {
                Ok(members) if members.is_empty() => {
                    let path = cg.path().to_owned();
                    if let Err(e) = cg.remove() {
                        self.errors
                            .insert(format!("cannot remove {}: {e}", path.display()));
                    }
                }
                Ok(members) => {
                    self.errors.insert(format!(
                        "{} still holds {members:?} after SIGKILL",
                        cg.path().display()
                    ));
                }
                // Already in the errors.
                Err(_) => {}
            }
        }
        if let Some(pgid) = self.group
            && self.group_running()
        {
            self.errors.insert(format!(
                "process group {pgid} still has {:?} running after SIGKILL",
                group_members(pgid)
            ));
        }
        let swept = if !self.errors.is_empty() {
            Swept::Failed(self.errors.into_iter().collect::<Vec<_>>().join("; "))
        } else if self.signalled.is_empty() {
            Swept::Gone
        } else {
            Swept::Terminated {
                pids: self.signalled.into_iter().collect(),
                killed: self.killed,
            }
        };
        (self.record, swept)
    }

    /// Signals one process; skips pids that cannot be ours
    /// ([`check_pid`]). Gone is fine.
    fn signal(&mut self, pid: u32, signal: libc::c_int) {
        let Ok(p) = check_pid(pid) else {
            return;
        };
        // SAFETY: a signal to a member of a run this daemon started.
        if unsafe { libc::kill(p, signal) } == 0 {
            self.signalled.insert(pid);
        } else {
            self.note_signal_error(&format!("pid {pid}"));
        }
    }

    fn signal_group(&mut self, pgid: u32, signal: libc::c_int) {
        let Ok(p) = check_pid(pgid) else {
            return;
        };
        // SAFETY: a signal to the process group of a run this daemon
        // started, its leader verified by start time.
        if unsafe { libc::killpg(p, signal) } != 0 {
            self.note_signal_error(&format!("process group {pgid}"));
        }
    }

    /// Keeps what a signal to the cgroup's members did.
    fn note(&mut self, sent: Signalled) {
        self.signalled.extend(sent.reached);
        for (pid, error) in sent.failed {
            self.errors
                .insert(format!("cannot signal pid {pid}: {error}"));
        }
    }

    fn note_signal_error(&mut self, whom: &str) {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            self.errors.insert(format!("cannot signal {whom}: {error}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{BufRead, BufReader},
        os::unix::{
            fs::{MetadataExt, PermissionsExt},
            process::CommandExt,
        },
        process::{Child, Command, Stdio},
    };

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("watchdog-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Whether this test may run its root-only part: it skips without root,
    /// except under CI=true, which requires it.
    fn root_or_skip(test: &str) -> bool {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "{test} needs root, and CI=true requires it");
        eprintln!("skipped: {test} needs root");
        false
    }

    fn record(service: &str, pid: u32, start_time: u64) -> RunRecord {
        RunRecord {
            service: service.into(),
            pid,
            start_time,
            cgroup: None,
            daemon_pid: std::process::id(),
            started_at: crate::event::rfc3339(std::time::SystemTime::now()),
            session: session_of(pid),
        }
    }

    /// A child in its own process group.
    fn spawn_group(argv: &[&str]) -> Child {
        Command::new(argv[0])
            .args(&argv[1..])
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn read_line(child: &mut Child) -> String {
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.trim().to_owned()
    }

    #[test]
    fn a_second_lock_fails_naming_the_holder_until_the_first_is_dropped() {
        let base = temp_dir("lock");
        let dir = StateDir::open(&base.join("state")).unwrap();
        let first = dir.lock().unwrap();
        assert_eq!(
            fs::read_to_string(first.path()).unwrap(),
            format!("{}\n", std::process::id())
        );
        let err = dir.lock().unwrap_err();
        let StateError::Locked { pid, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(*pid, Some(std::process::id()));
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("another state-dir"), "{text}");
        drop(first);
        let again = dir.lock().unwrap();
        assert!(again.path().exists());
        drop(again);
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_holder_whose_pid_cannot_be_read_is_unknown() {
        let err = StateError::Locked {
            path: "/run/watchdog".into(),
            pid: None,
        };
        assert_eq!(
            err.to_string(),
            "another watchdog (unknown pid) is running on the state directory \
             /run/watchdog; stop it or use another state-dir"
        );
    }

    #[test]
    fn open_creates_the_directory_with_parents() {
        let base = temp_dir("create");
        let path = base.join("a/b/state");
        let dir = StateDir::open(&path).unwrap();
        assert_eq!(dir.path(), path);
        let mode = fs::metadata(&path).unwrap().mode();
        assert_eq!(mode & 0o022, 0, "{mode:o}");
        // Opening an existing directory is fine too.
        StateDir::open(&path).unwrap();
        fs::remove_dir_all(&base).unwrap();
    }

    /// Guards against trusting a directory others could plant records in,
    /// or one that is not a directory at all; each message names the path.
    #[test]
    fn open_refuses_symlinks_writable_dirs_and_files() {
        let base = temp_dir("refuse");
        let real = base.join("real");
        fs::create_dir(&real).unwrap();
        let link = base.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = StateDir::open(&link).unwrap_err();
        assert!(matches!(err, StateError::Symlink { .. }), "{err}");
        assert!(
            err.to_string().contains(&link.display().to_string()),
            "{err}"
        );

        fs::set_permissions(&real, fs::Permissions::from_mode(0o777)).unwrap();
        let err = StateDir::open(&real).unwrap_err();
        assert!(
            matches!(err, StateError::Writable { mode: 0o777, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod go-w"), "{err}");

        let file = base.join("file");
        fs::write(&file, b"").unwrap();
        let err = StateDir::open(&file).unwrap_err();
        assert!(matches!(err, StateError::NotDirectory { .. }), "{err}");
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn open_refuses_a_directory_of_another_user() {
        if !root_or_skip("open_refuses_a_directory_of_another_user") {
            return;
        }
        let base = temp_dir("owner");
        let other = base.join("other");
        fs::create_dir(&other).unwrap();
        std::os::unix::fs::chown(&other, Some(65534), Some(65534)).unwrap();
        let err = StateDir::open(&other).unwrap_err();
        assert!(
            matches!(err, StateError::NotOwned { owner: 65534, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chown root"), "{err}");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn records_round_trip_and_are_forgotten() {
        let base = temp_dir("records");
        let dir = StateDir::open(&base.join("state")).unwrap();
        assert!(dir.runs().is_empty());
        let mut web = record("web", 1234, 99);
        web.cgroup = Some("/sys/fs/cgroup/watchdog/web".into());
        let db = record("db.main", 5678, 7);
        dir.record_run(&web).unwrap();
        dir.record_run(&db).unwrap();
        assert_eq!(dir.runs(), vec![db.clone(), web.clone()]);
        // Rewriting replaces, leaving no temporary file behind.
        web.pid = 4321;
        dir.record_run(&web).unwrap();
        assert_eq!(dir.runs(), vec![db.clone(), web.clone()]);
        let names: Vec<String> = fs::read_dir(base.join("state/runs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let mode = fs::metadata(base.join("state/runs/web.json"))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        dir.forget_run("web").unwrap();
        dir.forget_run("web").unwrap();
        assert_eq!(dir.runs(), vec![db]);
        fs::remove_dir_all(&base).unwrap();
    }

    /// Guards against a service name escaping the records directory.
    #[test]
    fn refuses_service_names_that_are_not_file_names() {
        let base = temp_dir("names");
        let dir = StateDir::open(&base.join("state")).unwrap();
        for bad in ["", "../x", "a/b", ".", "..", "a b", "ü"] {
            let err = dir.record_run(&record(bad, 1234, 1)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert!(dir.forget_run(bad).is_err(), "{bad:?}");
        }
        assert!(valid_service_name("web-1.a_b"));
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn corrupt_records_are_skipped_and_removed() {
        let base = temp_dir("corrupt");
        let dir = StateDir::open(&base.join("state")).unwrap();
        let good = record("good", 1234, 1);
        dir.record_run(&good).unwrap();
        let runs = base.join("state/runs");
        fs::write(runs.join("bad.json"), b"{not json").unwrap();
        // A record filed under another service's name.
        let mut other = serde_json::to_vec(&record("elsewhere", 1234, 1)).unwrap();
        fs::write(runs.join("misfiled.json"), &other).unwrap();
        // A pid that would signal our own process group.
        other = serde_json::to_vec(&record("zero", 0, 1)).unwrap();
        fs::write(runs.join("zero.json"), &other).unwrap();
        // Left mid-write by another instance.
        fs::write(runs.join(".good.json.4000000.0.tmp"), b"{").unwrap();
        assert_eq!(dir.runs(), vec![good]);
        for gone in [
            "bad.json",
            "misfiled.json",
            "zero.json",
            ".good.json.4000000.0.tmp",
        ] {
            assert!(!runs.join(gone).exists(), "{gone}");
        }
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn temporary_names_carry_their_writer() {
        assert_eq!(
            temp_owner(&temp_name("web.json", 3)),
            Some(std::process::id())
        );
        assert_eq!(temp_owner(".a.b.json.77.0.tmp"), Some(77));
        assert_eq!(temp_owner("web.json"), None);
        assert_eq!(temp_owner(".web.json"), None);
    }

    #[test]
    fn start_time_is_stable_and_absent_for_dead_pids() {
        let me = std::process::id();
        let first = start_time(me).unwrap();
        assert_eq!(start_time(me), Some(first));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(start_time(pid), None);
    }

    #[tokio::test]
    async fn sweep_terminates_a_recorded_run_and_removes_its_record() {
        let base = temp_dir("sweep");
        let dir = StateDir::open(&base.join("state")).unwrap();
        let mut child = spawn_group(&["sleep", "100"]);
        let run = record("sleeper", child.id(), start_time(child.id()).unwrap());
        dir.record_run(&run).unwrap();
        let swept = sweep(&dir, dir.runs(), Duration::from_secs(5), 8).await;
        assert_eq!(
            swept,
            vec![(
                run,
                Swept::Terminated {
                    pids: vec![child.id()],
                    killed: false
                }
            )]
        );
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert!(dir.runs().is_empty());
        fs::remove_dir_all(&base).unwrap();
    }

    /// A run whose leader is gone with members of its process group left
    /// (no cgroup): the group is ended, not reported gone.
    #[tokio::test]
    async fn sweep_ends_the_group_a_dead_leader_left() {
        let base = temp_dir("leaderless");
        let dir = StateDir::open(&base.join("state")).unwrap();
        let (pid, run, left) = leaderless("leaderless");
        dir.record_run(&run).unwrap();
        let swept = sweep(&dir, dir.runs(), Duration::from_secs(5), 8).await;
        assert_eq!(
            swept,
            vec![(
                run,
                Swept::Terminated {
                    pids: left.clone(),
                    killed: false
                }
            )]
        );
        assert!(group_members(pid).is_empty());
        assert!(dir.runs().is_empty());

        // Members in another session than the run's: not the run's group.
        let (pid, mut other, _) = leaderless("other");
        other.session = other.session.map(|s| s + 1);
        dir.record_run(&other).unwrap();
        let swept = sweep(&dir, dir.runs(), Duration::from_secs(1), 8).await;
        assert_eq!(swept, vec![(other, Swept::Gone)]);
        let left = group_members(pid);
        assert_eq!(left.len(), 1, "must be untouched");
        // SAFETY: killing the test's own leftover group.
        unsafe { libc::killpg(pid as libc::pid_t, libc::SIGKILL) };
        fs::remove_dir_all(&base).unwrap();
    }

    /// A run whose leader is gone, leaving a sleep in its process group:
    /// the group, the run's record, and what is left in it.
    fn leaderless(service: &str) -> (u32, RunRecord, Vec<u32>) {
        let mut leader = spawn_group(&["sh", "-c", "sleep 100 & echo started"]);
        let pid = leader.id();
        let run = record(service, pid, start_time(pid).unwrap());
        leader.wait().unwrap();
        for _ in 0..200 {
            let left = group_members(pid);
            if !left.is_empty() {
                assert_eq!(left.len(), 1, "the background sleep");
                return (pid, run, left);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the background sleep never showed");
    }

    /// Guards against signalling a process that merely reuses a recorded
    /// pid: a start time that differs leaves it untouched.
    #[tokio::test]
    async fn sweep_leaves_a_reused_pid_alone_and_reports_dead_ones_gone() {
        let base = temp_dir("reuse");
        let dir = StateDir::open(&base.join("state")).unwrap();
        let mut other = spawn_group(&["sleep", "100"]);
        let reused = record("reused", other.id(), start_time(other.id()).unwrap() + 1);
        let mut dead = Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        let gone = record("gone", dead_pid, 1);
        dir.record_run(&reused).unwrap();
        dir.record_run(&gone).unwrap();
        let swept = sweep(&dir, dir.runs(), Duration::from_secs(1), 8).await;
        assert_eq!(swept, vec![(gone, Swept::Gone), (reused, Swept::PidReused)]);
        assert!(other.try_wait().unwrap().is_none(), "must be untouched");
        assert!(dir.runs().is_empty());
        other.kill().unwrap();
        other.wait().unwrap();
        fs::remove_dir_all(&base).unwrap();
    }

    #[tokio::test]
    async fn sweep_takes_at_most_max_records_and_keeps_the_rest() {
        let base = temp_dir("max");
        let dir = StateDir::open(&base.join("state")).unwrap();
        let mut dead = Command::new("true").spawn().unwrap();
        let pid = dead.id();
        dead.wait().unwrap();
        for name in ["a", "b", "c"] {
            dir.record_run(&record(name, pid, 1)).unwrap();
        }
        let swept = sweep(&dir, dir.runs(), Duration::from_secs(1), 2).await;
        assert_eq!(swept.len(), 2);
        let left: Vec<String> = dir.runs().into_iter().map(|r| r.service).collect();
        assert_eq!(left, ["c"]);
        fs::remove_dir_all(&base).unwrap();
    }

    /// Runs that ignore SIGTERM are killed once the grace period is over,
    /// all of them at once: the sweep takes about the grace period.
    #[tokio::test]
    async fn sweep_kills_what_ignores_sigterm_after_grace() {
        let base = temp_dir("stubborn");
        let dir = StateDir::open(&base.join("state")).unwrap();
        let mut children = Vec::new();
        for name in ["one", "two"] {
            let mut child = spawn_group(&["sh", "-c", "trap '' TERM; echo ready; sleep 100"]);
            assert_eq!(read_line(&mut child), "ready");
            let pid = child.id();
            dir.record_run(&record(name, pid, start_time(pid).unwrap()))
                .unwrap();
            children.push(child);
        }
        let grace = Duration::from_millis(500);
        let began = std::time::Instant::now();
        let swept = sweep(&dir, dir.runs(), grace, 8).await;
        let took = began.elapsed();
        // Generous: the sweep's own bound is grace + 1 s.
        assert!(took < grace + Duration::from_secs(3), "{took:?}");
        for (_, outcome) in &swept {
            let Swept::Terminated { pids, killed } = outcome else {
                panic!("{outcome:?}");
            };
            assert!(killed, "{outcome:?}");
            // The shell and its sleep.
            assert_eq!(pids.len(), 2, "{pids:?}");
        }
        for mut child in children {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        }
        assert!(dir.runs().is_empty());
        fs::remove_dir_all(&base).unwrap();
    }

    /// Puts a shell into a fresh cgroup below the first cgroup2 mount,
    /// where it starts a sleep with setsid (leaving the shell's process
    /// group and session), which ignores SIGTERM if `stubborn`; records it
    /// as a run and sweeps it with `grace`. Checks that the shell and the session were both signalled
    /// and are gone, and that the cgroup and the record are removed;
    /// returns whether SIGKILL was needed. `None` when the test cannot run
    /// (no root, or no cgroup2 mount).
    #[cfg(target_os = "linux")]
    async fn sweep_a_cgroup_run(test: &str, stubborn: bool, grace: Duration) -> Option<bool> {
        if !root_or_skip(test) {
            return None;
        }
        let Some(mount) = crate::cgroup::mount_points().into_iter().next() else {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "no cgroup2 mount, and CI=true requires one");
            eprintln!("skipped: no cgroup2 mount");
            return None;
        };
        let cg = mount.join(format!("watchdog-state-{test}-{}", std::process::id()));
        let _ = fs::remove_dir(&cg);
        fs::create_dir(&cg).unwrap();
        let base = temp_dir(test);
        let dir = StateDir::open(&base.join("state")).unwrap();
        // The session says its pid once it is set up.
        let trap = if stubborn { "trap \"\" TERM; " } else { "" };
        let script = format!("read go; setsid sh -c '{trap}echo $$; exec sleep 100' & wait");
        let mut child = spawn_group(&["sh", "-c", &script]);
        fs::write(cg.join("cgroup.procs"), child.id().to_string()).unwrap();
        writeln!(child.stdin.take().unwrap(), "go").unwrap();
        let grandchild: u32 = read_line(&mut child).parse().unwrap();
        let mut run = record("grouped", child.id(), start_time(child.id()).unwrap());
        run.cgroup = Some(cg.clone());
        dir.record_run(&run).unwrap();
        let swept = sweep(&dir, dir.runs(), grace, 8).await;
        assert_eq!(swept.len(), 1);
        let Swept::Terminated { pids, killed } = &swept[0].1 else {
            panic!("{:?}", swept[0].1);
        };
        assert!(pids.contains(&child.id()), "{pids:?}");
        assert!(pids.contains(&grandchild), "{pids:?}");
        child.wait().unwrap();
        assert!(!running(grandchild), "the setsid grandchild must be gone");
        assert!(!cg.exists(), "the cgroup must be removed");
        assert!(dir.runs().is_empty());
        fs::remove_dir_all(&base).unwrap();
        Some(*killed)
    }

    /// A run with a cgroup is ended through it: members that left the
    /// process group and session (setsid) are reached too, one that
    /// ignores SIGTERM is killed through the cgroup once the grace period
    /// is over, and the cgroup is removed. Needs root and a cgroup2 mount.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn sweep_ends_a_cgroup_with_everything_in_it() {
        let test = "sweep_ends_a_cgroup_with_everything_in_it";
        let killed = sweep_a_cgroup_run(test, false, Duration::from_secs(5)).await;
        assert_ne!(killed, Some(true), "SIGTERM was enough");
        let killed = sweep_a_cgroup_run(test, true, Duration::from_millis(300)).await;
        assert_ne!(killed, Some(false), "SIGKILL was needed");
    }

    /// Guards against a record that points its cgroup somewhere the daemon
    /// must not write: it fails, and its record is kept.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn sweep_refuses_a_cgroup_outside_cgroup2() {
        let base = temp_dir("badcg");
        let dir = StateDir::open(&base.join("state")).unwrap();
        let fake = base.join("fake-cgroup");
        fs::create_dir(&fake).unwrap();
        let mut run = record("odd", 999_999, 1);
        run.cgroup = Some(fake.clone());
        dir.record_run(&run).unwrap();
        let swept = sweep(&dir, dir.runs(), Duration::from_secs(1), 8).await;
        let Swept::Failed(why) = &swept[0].1 else {
            panic!("{:?}", swept[0].1);
        };
        assert!(why.contains("not below a cgroup2 mount"), "{why}");
        assert_eq!(dir.runs(), vec![run]);
        assert!(fake.exists());
        fs::remove_dir_all(&base).unwrap();
    }
}
