//! Running a supervised command: spawned from an argv (never a shell), in a
//! process group of its own, held before exec until the sensor has it (no
//! window in which a fast leak goes unseen), with privileges dropped to the
//! configured user, and reaped with its resource usage.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, Stdio},
};

use tokio::sync::oneshot;

use crate::exit::ExitStatus;

/// What to run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub user: Option<User>,
    /// Its oom_score_adj (the supervisor's own, -1000, is not inherited).
    pub oom_score_adj: i32,
    /// Keeps running when the supervisor dies (a later instance adopts
    /// it); otherwise the kernel kills it with the supervisor.
    pub outlive_supervisor: bool,
}

/// A user to run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// Home directory and login shell, for the service's environment.
    pub home: String,
    pub shell: String,
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
        // SAFETY: getpwnam_r filled these with NUL-terminated strings in
        // `buf` (or left them null).
        let text = |p: *const libc::c_char| {
            if p.is_null() {
                String::new()
            } else {
                unsafe { std::ffi::CStr::from_ptr(p) }
                    .to_string_lossy()
                    .into_owned()
            }
        };
        Ok(Self {
            name: name.to_owned(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            groups,
            home: text(pwd.pw_dir),
            shell: text(pwd.pw_shell),
        })
    }

    /// What a login as this user sets: HOME, USER, LOGNAME, SHELL.
    pub fn env(&self) -> [(String, String); 4] {
        [
            ("HOME".into(), self.home.clone()),
            ("USER".into(), self.name.clone()),
            ("LOGNAME".into(), self.name.clone()),
            ("SHELL".into(), self.shell.clone()),
        ]
    }
}

/// Forks the services' processes from one long-lived thread: the kernel
/// sends a child its parent-death signal when the *thread* that forked it
/// exits, so forking from a pool thread that retires when idle would kill
/// healthy services. This thread lives as long as the process.
#[derive(Clone)]
pub struct Spawner {
    jobs: std::sync::mpsc::Sender<Job>,
}

struct Job {
    cmd: Command,
    /// The child's ends of the pipes: open until the fork is done.
    keep: [OwnedFd; 2],
    done: oneshot::Sender<io::Result<()>>,
}

impl Spawner {
    pub fn new() -> io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                for mut job in rx {
                    // spawn() returns once exec succeeded or failed (and
                    // reaps the child itself when it failed).
                    let result = job.cmd.spawn().map(drop);
                    drop(job.keep);
                    let _ = job.done.send(result);
                }
            })?;
        Ok(Self { jobs })
    }
}

/// A child forked and held before exec, its pid known.
pub struct Launch {
    pub pid: u32,
    go: OwnedFd,
    done: oneshot::Receiver<io::Result<()>>,
}

impl Launch {
    /// Lets the child exec (`go`), or makes it exit 127 without running
    /// anything; resolves once exec succeeded or failed.
    pub async fn finish(self, go: bool) -> io::Result<()> {
        if go {
            let byte = [1u8];
            // SAFETY: writing one byte to our own pipe.
            if unsafe { libc::write(self.go.as_raw_fd(), byte.as_ptr().cast(), 1) } != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        drop(self.go);
        let result = self
            .done
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the spawner thread is gone")));
        match result {
            Ok(()) if !go => Err(io::Error::other("refused before exec")),
            other => other,
        }
    }
}

/// Forks `spec` on `spawner`. The child stops before exec until
/// [`Launch::finish`], so whatever watches it sees it from its first
/// instruction.
///
/// `cgroup` is an open `cgroup.procs` of the cgroup the child joins before
/// anything else (so that nothing it starts can be outside it).
pub async fn launch(
    name: &str,
    spec: &Spec,
    spawner: &Spawner,
    cgroup: Option<RawFd>,
) -> io::Result<Launch> {
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let mut cmd = Command::new(
        spec.argv
            .first()
            .ok_or_else(|| io::Error::other("empty command"))?,
    );
    // The user's login variables first: the service's own --env wins.
    let login = spec.user.as_ref().map(User::env).unwrap_or_default();
    cmd.args(&spec.argv[1..])
        .envs(login.iter().map(|(k, v)| (k, v)))
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    // A run that outlives the daemon (to be adopted) must not write into
    // pipes only the daemon reads: it would die of SIGPIPE with it.
    let forwarded = child_output(&mut cmd, spec.outlive_supervisor);
    // The working directory is entered after privileges are dropped (below),
    // so the service can enter only what its user may.
    let cwd = spec
        .cwd
        .as_ref()
        .map(|dir| {
            use std::os::unix::ffi::OsStrExt;
            CString::new(dir.as_os_str().as_bytes())
                .map_err(|_| io::Error::other("the working directory has a NUL"))
        })
        .transpose()?;
    let (ready_w_fd, go_r_fd, go_w_fd) = (ready_w.as_raw_fd(), go_r.as_raw_fd(), go_w.as_raw_fd());
    let user = spec.user.clone();
    let groups: Vec<libc::gid_t> = user
        .as_ref()
        .map(|u| u.groups.iter().map(|&g| g as libc::gid_t).collect())
        .unwrap_or_default();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let reset = crate::protect::ChildReset::new(spec.oom_score_adj);
    let outlive = spec.outlive_supervisor;
    let withheld = withheld();
    // SAFETY: between fork and exec the closure calls only async-signal-safe
    // functions (setpgid, getpid, getppid, write, read, setgroups, setgid,
    // setuid, chdir, prctl, _exit) on values prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // A process group of its own: drain and kill reach every
            // descendant that stays in it.
            // While it waits for the go, it must not outlive the
            // supervisor: it would wait forever, holding inherited
            // descriptors (the instance lock among them) until exec.
            // The parent's end of the go pipe is not its to hold either.
            #[cfg(target_os = "linux")]
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            libc::close(go_w_fd);
            close_withheld(&withheld);
            if libc::getppid() != parent {
                libc::_exit(127);
            }
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = cgroup {
                crate::cgroup::ServiceCgroup::join(fd)?;
            }
            // Not the supervisor's shield: its own oom_score_adj, nice 0.
            reset.apply()?;
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
            if let Some(dir) = &cwd
                && libc::chdir(dir.as_ptr()) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if outlive {
                // Adopted by the next instance if this one dies.
                #[cfg(target_os = "linux")]
                libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0);
            } else {
                die_with_parent(parent);
            }
            Ok(())
        });
    }
    let (done_tx, done) = oneshot::channel();
    // The child's pipe ends must stay open until the fork, which happens on
    // the spawner thread: they go with the job.
    spawner
        .jobs
        .send(Job {
            cmd,
            keep: [ready_w, go_r],
            done: done_tx,
        })
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    let pid = tokio::task::spawn_blocking(move || read_pid(&ready_r))
        .await
        .map_err(io::Error::other)?;
    match pid {
        Ok(pid) => {
            for (fd, stream) in forwarded {
                if let Err(e) = crate::output::forward(fd, name, pid, stream, false) {
                    tracing::warn!(service = name, pid, error = %e, "cannot forward the service's {stream}");
                }
            }
            Ok(Launch {
                pid,
                go: go_w,
                done,
            })
        }
        // The child died before telling its pid (setpgid failed): the
        // spawn reports why.
        Err(_) => {
            drop(go_w);
            Err(done
                .await
                .ok()
                .and_then(Result::err)
                .unwrap_or_else(|| io::Error::other("the child did not start")))
        }
    }
}

/// Descriptors no child may hold even for a moment between fork and exec
/// (-1: a free slot): the instance lock, the status socket, the HTTP
/// listener. They are close-on-exec, but a child killed before its exec
/// (its supervisor died) would keep the next instance from taking them.
static WITHHELD: [std::sync::atomic::AtomicI32; 8] =
    [const { std::sync::atomic::AtomicI32::new(-1) }; 8];

/// Keeps `fd` from every child started from now on (closed first thing
/// after fork). For descriptors held until the daemon exits.
pub fn withhold(fd: std::os::fd::RawFd) {
    use std::sync::atomic::Ordering;
    for slot in &WITHHELD {
        if slot
            .compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return;
        }
    }
    tracing::debug!(fd, "no slot left to keep a descriptor from children");
}

/// Undoes [`withhold`] (before `fd` is closed: its number may be reused).
pub fn release(fd: std::os::fd::RawFd) {
    use std::sync::atomic::Ordering;
    for slot in &WITHHELD {
        let _ = slot.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// The withheld descriptors, read before a fork.
fn withheld() -> [libc::c_int; 8] {
    WITHHELD
        .each_ref()
        .map(|s| s.load(std::sync::atomic::Ordering::Acquire))
}

/// Closes the withheld descriptors (async-signal-safe).
fn close_withheld(fds: &[libc::c_int; 8]) {
    for &fd in fds {
        if fd >= 0 {
            // SAFETY: close on a descriptor number this child inherited.
            unsafe { libc::close(fd) };
        }
    }
}

/// After dropping privileges (a change of credentials clears it): the
/// run's main process gets SIGKILL when the supervisor dies, so it does not
/// outlive a killed supervisor. Exits at once if that already happened.
/// Async-signal-safe.
fn die_with_parent(parent: libc::pid_t) {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl and getppid on ourselves; _exit never returns.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() != parent {
            libc::_exit(127);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = parent;
}

/// A pipe whose ends are close-on-exec: (read, write).
pub fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    pipe()
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // Close-on-exec from the start: the spawner thread may fork another
    // service at any moment, which must not inherit these.
    #[cfg(target_os = "linux")]
    // SAFETY: a valid array of two ints.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    #[cfg(not(target_os = "linux"))]
    // SAFETY: a valid array of two ints. (No pipe2 here: the flag is set
    // just after, and the fork waits for the job that carries them.)
    let rc = unsafe { libc::pipe(fds.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors we now own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    #[cfg(not(target_os = "linux"))]
    for fd in [&r, &w] {
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

/// Reaps `pid` if it has exited, with its peak resident set in bytes
/// (wait4's ru_maxrss); `None` while it runs. A pid that is not (or no
/// longer) our child reads as gone with an unknown status.
pub fn try_wait(pid: u32) -> Option<(ExitStatus, u64)> {
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out buffer.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: a specific pid, valid out pointers; WNOHANG never blocks.
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, libc::WNOHANG, &mut usage) };
        if r == 0 {
            return None;
        }
        if r > 0 {
            break;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            // ECHILD: reaped elsewhere; its status is lost.
            _ => return Some((ExitStatus::Unknown, 0)),
        }
    }
    // ru_maxrss is in KiB on Linux, in bytes on macOS.
    let scale = if cfg!(target_os = "macos") { 1 } else { 1024 };
    Some((
        ExitStatus::from_wait_status(status as u32),
        (usage.ru_maxrss.max(0) as u64) * scale,
    ))
}

/// Sends `signal` to the run's process group. ESRCH (all gone) is fine.
pub fn signal_group(pgid: u32, signal: i32) {
    // SAFETY: a signal to a process group we created.
    unsafe { libc::killpg(pgid as libc::pid_t, signal) };
}

/// Sends `signal` to a run's tree: its process group, and each of `members`
/// (the sensor's view of the tree) that left the group (setsid, setpgid).
/// ESRCH (gone already) is fine.
pub fn signal_tree(pid: u32, members: &[u32], signal: i32) {
    signal_group(pid, signal);
    for &member in members {
        // SAFETY: getpgid has no preconditions; -1 when the process is gone.
        let pgid = unsafe { libc::getpgid(member as libc::pid_t) };
        if pgid >= 0 && pgid as u32 != pid {
            // SAFETY: a signal to a member of the service's tree.
            unsafe { libc::kill(member as libc::pid_t, signal) };
        }
    }
}

/// Marks every descriptor above standard error close-on-exec: what the
/// process that started the daemon left open (a pipe of the shell's, a
/// socket of the service manager's) must not reach the services it runs.
pub fn close_inherited_on_exec() {
    let dir = if cfg!(target_os = "linux") {
        "/proc/self/fd"
    } else {
        "/dev/fd"
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let fds: Vec<libc::c_int> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD on a descriptor number; EBADF (the
        // listing's own, closed since) is harmless.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// SIGKILLs every descendant of this process (whatever group or session it
/// moved to), until none is left or `rounds` passes found them respawning
/// faster; `spare` (hooks) and their descendants are left alone. The last
/// sweep when supervision ends.
pub fn kill_descendants(rounds: usize, spare: &[u32]) {
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
        for pid in crate::procs::children(me).unwrap_or_default() {
            try_wait(pid);
        }
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

/// Starts a memory hook: an argv (never a shell), in a process group of its
/// own, as `user` when given (the service's user), with what it is about in
/// its environment. Not waited for here: the caller reaps it.
pub fn start_hook(argv: &[String], env: &[(&str, String)], user: Option<&User>) -> io::Result<u32> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::other("empty hook"))?;
    let mut cmd = Command::new(program);
    let login = user.map(User::env).unwrap_or_default();
    cmd.args(args)
        .envs(login.iter().map(|(k, v)| (k, v)))
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::null())
        .process_group(0);
    let forwarded = child_output(&mut cmd, false);
    let user = user.cloned();
    let groups: Vec<libc::gid_t> = user
        .as_ref()
        .map(|u| u.groups.iter().map(|&g| g as libc::gid_t).collect())
        .unwrap_or_default();
    // Not the supervisor's shield: oom_score_adj 0, nice 0.
    let reset = crate::protect::ChildReset::new(0);
    let withheld = withheld();
    // SAFETY: between fork and exec only close, the reset (documented
    // async-signal-safe), setgroups, setgid and setuid, on values prepared
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            close_withheld(&withheld);
            reset.apply()?;
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
    let pid = cmd.spawn()?.id();
    let name = env
        .iter()
        .find(|(k, _)| *k == "WATCHDOG_NAME")
        .map_or("", |(_, v)| v.as_str());
    for (fd, stream) in forwarded {
        if let Err(e) = crate::output::forward(fd, name, pid, stream, true) {
            tracing::warn!(hook = %name, pid, error = %e, "cannot forward the hook's {stream}");
        }
    }
    Ok(pid)
}

/// Sets a child's standard output and error as [`crate::output::mode`]
/// says (the daemon's own when that cannot be done, or for a run that
/// outlives it); the read ends to forward, with their stream's name.
fn child_output(cmd: &mut Command, outlives: bool) -> Vec<(OwnedFd, &'static str)> {
    use std::os::fd::AsFd;
    let set = match crate::output::mode() {
        crate::output::ChildOutput::Inherit => return Vec::new(),
        crate::output::ChildOutput::StdoutToStderr => {
            io::stderr().as_fd().try_clone_to_owned().map(|fd| {
                cmd.stdout(Stdio::from(fd));
                Vec::new()
            })
        }
        crate::output::ChildOutput::JsonRecords if outlives => return Vec::new(),
        crate::output::ChildOutput::JsonRecords => crate::output::ready().and_then(|()| {
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            cmd.stdout(Stdio::from(out_w)).stderr(Stdio::from(err_w));
            Ok(vec![(out_r, "stdout"), (err_r, "stderr")])
        }),
    };
    set.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot redirect a child's output: it shares the daemon's");
        Vec::new()
    })
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
