//! Shared harness for the integration tests: finding the binaries, deciding
//! whether privileged tests run, and driving a running `watchdog` whose
//! JSON lines and log are read on background threads.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The watchdog binary under test: `$WATCHDOG_BIN` (set by `cargo xtask
/// test`), else the workspace's release or debug build.
pub fn watchdog_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("WATCHDOG_BIN") {
        return PathBuf::from(path);
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    for profile in ["release", "debug"] {
        let candidate = target.join(profile).join("watchdog");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("no watchdog binary: run `cargo xtask build` or set WATCHDOG_BIN");
}

/// Whether this run must execute every privileged test (CI=true).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Decides whether a privileged (eBPF) test can run here. Prints why when
/// it cannot; under CI=true it fails the test instead of skipping it.
pub fn privileged(test: &str) -> bool {
    let reason = if !is_root() {
        Some("needs root for CAP_BPF and CAP_PERFMON".to_owned())
    } else {
        let version = Command::new(watchdog_bin())
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        (!version.contains("with kernel programs")).then(|| {
            format!(
                "{} was built without kernel programs",
                watchdog_bin().display()
            )
        })
    };
    match reason {
        None => true,
        Some(reason) if in_ci() => panic!("{test}: cannot run ({reason}), and CI=true requires it"),
        Some(reason) => {
            eprintln!("skipped {test}: {reason}");
            false
        }
    }
}

/// Whether `unshare` (util-linux) can put a test in a pid namespace of its
/// own: on top of [`privileged`]; missing, the test skips with a reason,
/// except under CI=true, where it fails.
pub fn pid_namespaces(test: &str) -> bool {
    if !privileged(test) {
        return false;
    }
    if Command::new("unshare").arg("--version").output().is_ok() {
        return true;
    }
    let reason = "no unshare (util-linux)";
    assert!(
        !in_ci(),
        "{test}: cannot run ({reason}), and CI=true requires it"
    );
    eprintln!("skipped {test}: {reason}");
    false
}

/// The sensors a test runs with: the kernel programs where privileged
/// tests run (see [`privileged`]), and sampling always.
pub fn sensors(test: &str) -> Vec<&'static str> {
    let mut sensors = vec!["sampling"];
    if privileged(test) {
        sensors.insert(0, "ebpf");
    }
    sensors
}

/// Waits until `ok` holds; fails the test, naming `what`, after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A running `watchdog` with its stdout lines parsed as JSON and its
/// stderr collected. Killed on drop if still running.
pub struct Watchdog {
    child: Child,
    lines: Receiver<Value>,
    log: Arc<Mutex<Vec<String>>>,
    ready: Receiver<()>,
    /// Signalled when its standard error reached its end.
    log_done: Receiver<()>,
}

/// What `watchdog audit` logs on stderr once it is attached and streaming.
pub const READY: &str = "streaming exit events";
/// What `watchdog watch` logs once it watches.
pub const WATCHING: &str = "watching memory";

impl Watchdog {
    /// Starts `watchdog ARGS`; ready when it logs [`READY`].
    pub fn start(args: &[&str]) -> Self {
        Self::spawn(Command::new(watchdog_bin()).args(args), READY)
    }

    /// Starts a prepared `watchdog` command; ready when it logs `ready`.
    pub fn spawn(cmd: &mut Command, marker: &'static str) -> Self {
        let mut child = cmd
            .env("WATCHDOG_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start watchdog");
        let (line_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line:?}"));
                if line_tx.send(value).is_err() {
                    break;
                }
            }
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped");
        let log_writer = Arc::clone(&log);
        let (done_tx, log_done) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("watchdog: {line}");
                if line.contains(marker) {
                    let _ = ready_tx.send(());
                }
                log_writer.lock().unwrap().push(line);
            }
            let _ = done_tx.send(());
        });
        Self {
            child,
            lines,
            log,
            ready,
            log_done,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the kernel programs are attached; panics with the log
    /// after `timeout`.
    pub fn wait_ready(&mut self, timeout: Duration) {
        if self.ready.recv_timeout(timeout).is_err() {
            let status = self.child.try_wait().ok().flatten();
            panic!(
                "watchdog not ready within {timeout:?} (status {status:?}); log:\n{}",
                self.log()
            );
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The next JSON line within `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<Value> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The first line for `pid` within `timeout`, skipping others.
    pub fn line_for(&self, pid: u32, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.next_line(left)?;
            if line["pid"] == pid {
                return Some(line);
            }
        }
    }

    /// Every line that arrives within `window`.
    pub fn lines_within(&self, window: Duration) -> Vec<Value> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(line) = self.next_line(deadline.saturating_duration_since(Instant::now())) {
            out.push(line);
        }
        out
    }

    /// Sends `signal` and waits up to `timeout` for the exit.
    pub fn stop_with(&mut self, signal: i32, timeout: Duration) -> ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.wait_timeout(timeout)
    }

    /// Waits up to `timeout` for the exit; kills it and panics after that.
    pub fn wait_timeout(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Its last lines (the one that says it stopped) are read
                // before anyone looks at the log.
                let _ = self.log_done.recv_timeout(Duration::from_secs(5));
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "watchdog did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A command running the watchdog binary without privilege: as root, a
/// copy that `nobody` can execute, run as `nobody`; otherwise the binary as
/// the current (unprivileged) user. Keep the directory while it runs.
pub fn unprivileged_watchdog() -> (TempDir, Command) {
    use std::os::unix::{fs::PermissionsExt, process::CommandExt};
    let dir = TempDir::new("unpriv");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("watchdog");
    copy_executable(&watchdog_bin(), &bin);
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.current_dir(dir.path());
    if is_root() {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    (dir, cmd)
}

/// Runs `watchdog ARGS` to its end (killed after `timeout`, so a command
/// that should have been refused cannot hang the test): its exit code (none
/// when killed) and standard error.
pub fn run_watchdog(args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(watchdog_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start watchdog");
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Copies a program to be executed. The copy is written by a child (`cp`):
/// a write descriptor of it open in this multi-threaded test process would
/// leak into children other tests fork meanwhile, and exec of the copy
/// would fail with ETXTBSY until they exec.
pub fn copy_executable(from: &Path, to: &Path) {
    let copied = Command::new("cp")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(copied.success(), "cp {} failed: {copied:?}", from.display());
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("watchdog-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The charged memory (RssAnon + RssShmem) of `pid`, in bytes; 0 once it
/// is gone.
pub fn charged(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    ["RssAnon:", "RssShmem:"]
        .iter()
        .filter_map(|f| status.lines().find(|l| l.starts_with(f)))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// Whether the running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}
