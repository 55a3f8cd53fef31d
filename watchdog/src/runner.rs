//! Running a supervised command: spawned from an argv (never a shell), in a
//! process group of its own, held before exec until the sensor has it (no
//! window in which a fast leak goes unseen), with privileges dropped to the
//! configured user, and reaped with its resource usage.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use tokio::sync::oneshot;

use crate::exit::ExitStatus;

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct Spec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub user: Option<User>,
}

/// A user to run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl User {
    /// Runs with this group as the primary one instead of the user's.
    pub fn with_group(mut self, name: &str) -> io::Result<Self> {
        let cname = CString::new(name).map_err(|_| io::Error::other("group name has a NUL"))?;
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: valid buffers of the sizes given.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc != 0 || result.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no group named {name:?}"),
            ));
        }
        self.gid = grp.gr_gid;
        if !self.groups.contains(&grp.gr_gid) {
            self.groups.push(grp.gr_gid);
        }
        Ok(self)
    }

    /// Looks up a user by name (its primary and supplementary groups too).
    pub fn lookup(name: &str) -> io::Result<Self> {
        let cname = CString::new(name).map_err(|_| io::Error::other("user name has a NUL"))?;
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: valid buffers of the sizes given.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc != 0 || result.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no user named {name:?}"),
            ));
        }
        let mut groups: Vec<u32> = vec![0; 256];
        let mut n = groups.len() as libc::c_int;
        // SAFETY: a buffer of n gids; n is updated to the count.
        let rc = unsafe {
            libc::getgrouplist(
                cname.as_ptr(),
                pwd.pw_gid as _,
                groups.as_mut_ptr().cast(),
                &mut n,
            )
        };
        groups.truncate(if rc < 0 { 0 } else { n.max(0) as usize });
        Ok(Self {
            name: name.to_owned(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            groups,
        })
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunExit {
    pub status: ExitStatus,
    /// Peak resident set of the run's main process (wait4's ru_maxrss).
    pub peak_rss_bytes: u64,
}

/// A started run.
pub struct Run {
    pub pid: u32,
    pub started: Instant,
    /// Resolves when the main process has exited and been reaped.
    pub exit: oneshot::Receiver<RunExit>,
}

/// Starts `spec`. The child stops before exec until `register(pid)` has
/// returned, so whatever watches it sees it from its first instruction.
/// An error from `register` kills the child.
pub async fn spawn(spec: &Spec, register: impl FnOnce(u32) -> io::Result<()>) -> io::Result<Run> {
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let mut cmd = Command::new(
        spec.argv
            .first()
            .ok_or_else(|| io::Error::other("empty command"))?,
    );
    cmd.args(&spec.argv[1..])
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    let (ready_w_fd, go_r_fd) = (ready_w.as_raw_fd(), go_r.as_raw_fd());
    let user = spec.user.clone();
    let groups: Vec<libc::gid_t> = user
        .as_ref()
        .map(|u| u.groups.iter().map(|&g| g as libc::gid_t).collect())
        .unwrap_or_default();
    // SAFETY: between fork and exec the closure calls only async-signal-safe
    // functions (setpgid, getpid, write, read, setgroups, setgid, setuid,
    // _exit) on values prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // A process group of its own: drain and kill reach every
            // descendant that stays in it.
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            let pid = libc::getpid().to_ne_bytes();
            if libc::write(ready_w_fd, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
                return Err(io::Error::last_os_error());
            }
            let mut go = 0u8;
            if libc::read(go_r_fd, (&raw mut go).cast(), 1) != 1 {
                // The supervisor went away, or refused: do not run.
                libc::_exit(127);
            }
            if let Some(user) = &user
                && (libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                    || libc::setgid(user.gid as libc::gid_t) != 0
                    || libc::setuid(user.uid as libc::uid_t) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // spawn() returns once exec succeeded or failed, which waits for our
    // go-ahead: run it on a blocking thread, and hear the pid meanwhile.
    // The child's ends stay open here until spawn() returns: the fork
    // happens on that thread, and must find them open.
    let spawning = tokio::task::spawn_blocking(move || {
        let result = cmd.spawn();
        drop((ready_w, go_r));
        result
    });
    let pid = tokio::task::spawn_blocking(move || read_pid(&ready_r))
        .await
        .map_err(io::Error::other)?;
    let pid = match pid {
        Ok(pid) => pid,
        // The child died before telling its pid (setpgid failed): spawn
        // reports why.
        Err(_) => {
            drop(go_w);
            let err = spawning
                .await
                .map_err(io::Error::other)?
                .err()
                .unwrap_or_else(|| io::Error::other("the child did not start"));
            return Err(err);
        }
    };
    let started = Instant::now();
    if let Err(e) = register(pid) {
        drop(go_w); // the child exits with 127 instead of running
        let _ = spawning.await;
        return Err(e);
    }
    // SAFETY: writing one byte to our own pipe.
    let go = [1u8];
    if unsafe { libc::write(go_w.as_raw_fd(), go.as_ptr().cast(), 1) } != 1 {
        return Err(io::Error::last_os_error());
    }
    drop(go_w);
    let child = spawning.await.map_err(io::Error::other)??;
    drop(child); // reaped below with wait4, for its resource usage
    let (tx, exit) = oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let _ = tx.send(wait(pid));
    });
    Ok(Run { pid, started, exit })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: a valid array of two ints.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors we now own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for fd in [&r, &w] {
        // Close-on-exec: inherited across the fork, gone after exec.
        // SAFETY: setting a flag on our own descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((r, w))
}

fn read_pid(fd: &OwnedFd) -> io::Result<u32> {
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into the rest of our buffer.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        if n <= 0 {
            let err = io::Error::last_os_error();
            if n < 0 && err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io::Error::other("the child closed its pipe"));
        }
        got += n as usize;
    }
    Ok(i32::from_ne_bytes(buf) as u32)
}

/// Reaps `pid`, with its peak resident set.
fn wait(pid: u32) -> RunExit {
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: our own child, valid out pointers.
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
        if r >= 0 {
            break;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // ECHILD: reaped elsewhere; its status is lost.
            return RunExit {
                status: ExitStatus::Unknown,
                peak_rss_bytes: 0,
            };
        }
    }
    // ru_maxrss is in KiB on Linux, in bytes on macOS.
    let scale = if cfg!(target_os = "macos") { 1 } else { 1024 };
    RunExit {
        status: ExitStatus::from_wait_status(status as u32),
        peak_rss_bytes: (usage.ru_maxrss.max(0) as u64) * scale,
    }
}

/// Sends `signal` to the run's process group. ESRCH (all gone) is fine.
pub fn signal_group(pgid: u32, signal: i32) {
    // SAFETY: a signal to a process group we created.
    unsafe { libc::killpg(pgid as libc::pid_t, signal) };
}

/// SIGKILLs every descendant of this process (in single-service mode, the
/// whole service tree, whatever group or session it moved to), until none
/// is left or `rounds` passes found them respawning faster. `running` is
/// the run's main process, left for its own waiter to reap; `spare` (hooks
/// the supervisor started) and their descendants are left alone.
pub fn kill_descendants(rounds: usize, running: Option<u32>, spare: &[u32]) {
    let me = std::process::id();
    for _ in 0..rounds {
        let mut spared: std::collections::HashSet<u32> = spare.iter().copied().collect();
        for &pid in spare {
            spared.extend(crate::procs::descendants(pid));
        }
        // Zombies waiting to be reaped are already dead.
        let left: Vec<u32> = crate::procs::descendants(me)
            .into_iter()
            .filter(|&pid| !spared.contains(&pid) && !is_zombie(pid))
            .collect();
        if left.is_empty() {
            return;
        }
        for pid in left {
            // SAFETY: SIGKILL to a descendant; ESRCH if it just went.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        reap_orphans(running);
    }
}

fn is_zombie(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        false
    }
}

/// Reaps exited children other than `except` (orphans reparented to us as
/// subreaper), so none stays a zombie.
pub fn reap_orphans(except: Option<u32>) {
    let me = std::process::id();
    for pid in crate::procs::children(me).unwrap_or_default() {
        if Some(pid) == except {
            continue;
        }
        let mut status = 0;
        // SAFETY: a specific child; WNOHANG never blocks.
        unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    }
}

/// Starts a memory hook: an argv (never a shell), in a process group of its
/// own, with what it is about in its environment. Not waited for: it is
/// reaped with the orphans.
pub fn start_hook(argv: &[String], env: &[(&str, String)]) -> io::Result<u32> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::other("empty hook"))?;
    let child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()?;
    Ok(child.id())
}

/// Makes this process the reaper of its orphaned descendants (Linux), so a
/// service's daemonized grandchildren stay in reach.
pub fn become_subreaper() {
    #[cfg(target_os = "linux")]
    // SAFETY: a prctl on ourselves.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}
