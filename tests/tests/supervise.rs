//! `watchdog supervise`: drains and respawns of leakers, kills after grace,
//! crash-loop backoff and giving up, the clean-restart budget, shutdown;
//! each with the kernel programs (as root) and with the sampler.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use watchdog_tests::{TempDir, privileged, sensors, wait_until, watchdog_bin};

const HELPER: &str = env!("CARGO_BIN_EXE_wd-helper");

/// A running `watchdog supervise` writing its audit log to a temp file.
struct Supervisor {
    child: Child,
    log: std::path::PathBuf,
    tag: String,
    _dir: TempDir,
}

impl Supervisor {
    fn start(sensor: &str, options: &[&str], steps: &[&str]) -> Self {
        let dir = TempDir::new("supervise");
        let log = dir.path().join("audit.jsonl");
        // A word on every run's command line, to find leftovers by: the
        // temp dir's name is unique.
        let tag = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let child = Command::new(watchdog_bin())
            .args(["supervise", "--audit-log"])
            .arg(&log)
            .args([
                "--sensor",
                sensor,
                "--interval",
                "100ms",
                "--min-interval",
                "20ms",
            ])
            .args(options)
            .arg("--")
            .arg(HELPER)
            .args(["tag", &tag])
            .args(steps)
            .env("WATCHDOG_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self {
            child,
            log,
            tag,
            _dir: dir,
        }
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line ({e}): {l:?}")))
            .collect()
    }

    /// Waits until the audit log has lines whose events start with `events`
    /// (as a subsequence, in order).
    fn wait_for(&self, events: &[&str], timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            let mut want = events.iter().peekable();
            for line in &lines {
                if want.peek().is_some_and(|e| line["event"] == **e) {
                    want.next();
                }
            }
            if want.peek().is_none() {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "no {events:?} within {timeout:?}; log: {:#?}",
                lines.iter().map(|l| l["event"].clone()).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("supervise did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the supervisor and reaps it.
    fn wait_exit_after_kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(15))
    }

    /// Processes of the service (any run) still alive.
    fn leftovers(&self) -> Vec<u32> {
        let mut left = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            if !zombie && String::from_utf8_lossy(&cmd).contains(&self.tag) {
                left.push(pid);
            }
        }
        left
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn events(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["event"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_leaker_is_drained_and_respawned() {
    for sensor in sensors("a_leaker_is_drained_and_respawned") {
        let mut sv = Supervisor::start(
            sensor,
            &["--max-rss", "32MiB", "--grace", "5s"],
            &["leak", "64", "5", "sleep", "100000"],
        );
        let seq = [
            "started",
            "memory_over_limit",
            "drain_started",
            "exited",
            "started",
        ];
        let lines = sv.wait_for(&seq, Duration::from_secs(20));
        let exit = lines.iter().find(|l| l["event"] == "exited").unwrap();
        assert_eq!(exit["cause"], "memory_drain", "{sensor}: {exit}");
        assert_eq!(exit["crash_count"], 0, "{exit}");
        assert_eq!(exit["restart_in_ms"], 0, "restarted at once: {exit}");
        assert!(
            exit["charged_bytes"].as_u64().unwrap() >= 32 << 20,
            "{exit}"
        );
        assert_eq!(exit["limit_bytes"], 32u64 << 20);
        assert_eq!(exit["signal_name"], "SIGTERM");
        for field in [
            "ts",
            "service",
            "pid",
            "uptime_ms",
            "peak_rss_bytes",
            "source",
        ] {
            assert!(exit.get(field).is_some(), "{field} in {exit}");
        }
        let over = lines
            .iter()
            .find(|l| l["event"] == "memory_over_limit")
            .unwrap();
        assert_eq!(over["pid"], exit["pid"]);
        assert!(sv.stop().success(), "SIGTERM exits 0");
        assert_eq!(
            sv.leftovers(),
            Vec::<u32>::new(),
            "{sensor}: nothing of the tree remains"
        );
    }
}

#[test]
fn a_term_ignorer_is_killed_with_its_tree() {
    for sensor in sensors("a_term_ignorer_is_killed_with_its_tree") {
        let mut sv = Supervisor::start(
            sensor,
            &[
                "--max-rss",
                "32MiB",
                "--grace",
                "500ms",
                "--restart",
                "never",
            ],
            &[
                "ignore-term",
                "fork-alloc",
                "4",
                "leak",
                "64",
                "5",
                "sleep",
                "100000",
            ],
        );
        let status = sv.wait_exit(Duration::from_secs(20));
        assert!(
            status.success(),
            "{sensor}: ends after its only run: {status:?}"
        );
        let lines = sv.lines();
        let seq = events(&lines);
        assert_eq!(
            seq,
            [
                "started",
                "memory_over_limit",
                "drain_started",
                "escalated_kill",
                "exited"
            ],
            "{sensor}"
        );
        let exit = lines.last().unwrap();
        assert_eq!(exit["cause"], "memory_kill", "{exit}");
        assert_eq!(exit["signal"], 9, "{exit}");
        assert_eq!(
            sv.leftovers(),
            Vec::<u32>::new(),
            "{sensor}: the forked child went too"
        );
    }
}

#[test]
fn crash_loops_back_off_and_give_up() {
    for sensor in sensors("crash_loops_back_off_and_give_up") {
        let mut sv = Supervisor::start(
            sensor,
            &["--max-crashes", "4", "--backoff-floor", "100ms"],
            &["sleep", "20", "exit", "3"],
        );
        let status = sv.wait_exit(Duration::from_secs(20));
        assert_eq!(status.code(), Some(1), "{sensor}: giving up exits 1");
        let lines = sv.lines();
        let exits: Vec<&Value> = lines.iter().filter(|l| l["event"] == "exited").collect();
        assert_eq!(exits.len(), 4, "{sensor}: {:?}", events(&lines));
        let delays: Vec<u64> = exits[..3]
            .iter()
            .map(|e| e["restart_in_ms"].as_u64().unwrap())
            .collect();
        assert!(
            delays.windows(2).all(|w| w[1] > w[0]),
            "growing: {delays:?}"
        );
        assert!(delays[0] >= 100, "{delays:?}");
        for (i, e) in exits.iter().enumerate() {
            assert_eq!(e["cause"], "crash");
            assert_eq!(e["exit_code"], 3);
            assert_eq!(e["crash_count"], i as u64 + 1);
        }
        assert_eq!(lines.last().unwrap()["event"], "max_crashes_exceeded");
    }
}

#[test]
fn clean_exits_past_the_budget_warn() {
    for sensor in sensors("clean_exits_past_the_budget_warn") {
        let mut sv = Supervisor::start(
            sensor,
            &[
                "--clean-budget",
                "3",
                "--clean-window",
                "60s",
                "--backoff-floor",
                "100ms",
            ],
            &["sleep", "30", "exit", "0"],
        );
        let lines = sv.wait_for(&["health_warn"], Duration::from_secs(20));
        let warn = lines.iter().find(|l| l["event"] == "health_warn").unwrap();
        assert_eq!(warn["reason"], "clean_restart_budget_exceeded", "{warn}");
        let exits: Vec<&Value> = lines.iter().filter(|l| l["event"] == "exited").collect();
        assert_eq!(exits.len(), 4, "{sensor}: warned at the 4th clean exit");
        assert!(exits[..3].iter().all(|e| e["restart_in_ms"] == 0));
        assert!(exits[3]["restart_in_ms"].as_u64().unwrap() >= 100);
        assert!(
            exits
                .iter()
                .all(|e| e["cause"] == "clean_exit" && e["crash_count"] == 0)
        );
        assert!(sv.stop().success());
    }
}

#[test]
fn sigterm_drains_the_child_and_exits_0() {
    for sensor in sensors("sigterm_drains_the_child_and_exits_0") {
        let mut sv = Supervisor::start(
            sensor,
            &["--grace", "5s"],
            &["fork-alloc", "4", "sleep", "100000"],
        );
        sv.wait_for(&["started"], Duration::from_secs(10));
        let asked = Instant::now();
        assert!(sv.stop().success());
        assert!(asked.elapsed() < Duration::from_secs(5), "within grace");
        let lines = sv.lines();
        let exit = lines.last().unwrap();
        assert_eq!(exit["event"], "exited");
        assert_eq!(exit["cause"], "shutdown", "{exit}");
        assert_eq!(sv.leftovers(), Vec::<u32>::new(), "{sensor}");
    }
}

/// The kernel's OOM killer is told apart from any other SIGKILL: the run is
/// moved into a memory cgroup too small for it.
#[test]
fn oom_kills_are_told_apart() {
    if !privileged("oom_kills_are_told_apart") {
        return;
    }
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory");
    let (cgroup, limit_file) = if v1.join("memory.limit_in_bytes").exists() {
        (
            v1.join(format!("watchdog-test-{}", std::process::id())),
            "memory.limit_in_bytes",
        )
    } else {
        (
            std::path::Path::new("/sys/fs/cgroup")
                .join(format!("watchdog-test-{}", std::process::id())),
            "memory.max",
        )
    };
    std::fs::create_dir_all(&cgroup).expect("create a memory cgroup");
    let _cleanup = CgroupDir(cgroup.clone());
    std::fs::write(cgroup.join(limit_file), "48M").expect("set the cgroup's memory limit");
    let mut sv = Supervisor::start(
        "ebpf",
        &["--restart", "never"],
        &["sleep", "500", "alloc", "96", "sleep", "100000"],
    );
    let lines = sv.wait_for(&["started"], Duration::from_secs(10));
    let pid = lines[0]["pid"].as_u64().unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()).expect("move the run");
    let status = sv.wait_exit(Duration::from_secs(20));
    // An OOM kill is a failure: with nothing to restart, supervision
    // ends with exit code 1.
    assert_eq!(status.code(), Some(1), "{status:?}");
    let exit = sv
        .lines()
        .into_iter()
        .find(|l| l["event"] == "exited")
        .unwrap();
    assert_eq!(exit["cause"], "oom_kill", "{exit}");
    assert_eq!(exit["reason"], "ebpf_mark_victim", "{exit}");
    assert_eq!(exit["signal"], 9, "{exit}");
}

/// Removes a cgroup directory once its processes are gone.
struct CgroupDir(std::path::PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGHUP reopens the audit log, as logrotate expects.
#[test]
fn sighup_reopens_the_audit_log() {
    let mut sv = Supervisor::start(
        "sampling",
        &[
            "--max-crashes",
            "1000",
            "--backoff-floor",
            "50ms",
            "--backoff-cap",
            "50ms",
        ],
        &["sleep", "20", "exit", "1"],
    );
    sv.wait_for(&["exited", "exited"], Duration::from_secs(10));
    let rotated = sv.log.with_extension("jsonl.1");
    std::fs::rename(&sv.log, &rotated).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(sv.child.id() as i32, libc::SIGHUP) };
    let fresh = sv.wait_for(&["exited"], Duration::from_secs(10));
    assert!(!fresh.is_empty());
    assert!(sv.stop().success());
    let old = std::fs::read_to_string(&rotated).unwrap();
    for line in old
        .lines()
        .chain(std::fs::read_to_string(&sv.log).unwrap().lines())
    {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("torn ({e}): {line:?}"));
    }
}

/// `--user` runs the service as that user.
#[test]
fn user_drops_privileges() {
    if !privileged("user_drops_privileges") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // A copy of the helper that `nobody` may execute wherever the tree is.
    let dir = TempDir::new("user");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let helper = dir.path().join("wd-helper");
    watchdog_tests::copy_executable(HELPER.as_ref(), &helper);
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("audit.jsonl");
    let mut child = Command::new(watchdog_bin())
        .args([
            "supervise",
            "--user",
            "nobody",
            "--group",
            "nogroup",
            "--cwd",
            "/",
        ])
        .arg("--audit-log")
        .arg(&log)
        .arg("--")
        .arg(&helper)
        .args(["sleep", "100000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            let v: Value = serde_json::from_str(line).unwrap();
            break v["pid"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_owned();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let gid_line = status
        .lines()
        .find(|l| l.starts_with("Gid:"))
        .unwrap()
        .to_owned();
    let uids: Vec<&str> = uid_line.split_whitespace().skip(1).collect();
    assert_eq!(uids, ["65534"; 4], "{uid_line}");
    let gids: Vec<&str> = gid_line.split_whitespace().skip(1).collect();
    assert_eq!(gids, ["65534"; 4], "{gid_line}");
}

/// `--on-memory marker` writes the marker and leaves the run alone.
#[test]
fn marker_recommends_without_touching() {
    for sensor in sensors("marker_recommends_without_touching") {
        let marker_dir = TempDir::new("marker");
        let marker = marker_dir.path().join("respawn.json");
        let marker_arg = marker.to_string_lossy().into_owned();
        let mut sv = Supervisor::start(
            sensor,
            &[
                "--max-rss",
                "32MiB",
                "--on-memory",
                "marker",
                "--marker-format",
                "json",
                "--marker-file",
                &marker_arg,
            ],
            &["leak", "48", "2", "sleep", "100000"],
        );
        let lines = sv.wait_for(
            &["started", "memory_over_limit", "respawn_recommended"],
            Duration::from_secs(20),
        );
        let pid = lines[0]["pid"].clone();
        // The audit line comes first, then the marker (the record is made
        // before the decision takes effect).
        let deadline = Instant::now() + Duration::from_secs(5);
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&marker) {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "{sensor}: no marker at {}",
                marker.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let written: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(written["pid"], pid, "{written}");
        assert_eq!(written["reason"], "limit");
        assert_eq!(written["name"], "wd-helper", "{written}");
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            sv.lines()
                .iter()
                .all(|l| l["event"] != "exited" && l["event"] != "drain_started"),
            "{sensor}: the run was touched"
        );
        assert!(sv.stop().success());
    }
}

/// `--on-memory exec` runs the hook with what it is about, and leaves the
/// run alone.
#[test]
fn exec_hook_runs_with_its_context() {
    for sensor in sensors("exec_hook_runs_with_its_context") {
        let out_dir = TempDir::new("hook");
        let out = out_dir.path().join("hook.env");
        let out_arg = out.to_string_lossy().into_owned();
        let mut sv = Supervisor::start(
            sensor,
            &[
                "--name",
                "hooked",
                "--max-rss",
                "32MiB",
                "--on-memory",
                "exec",
                "--hook",
                HELPER,
                "--hook-arg",
                "write-env",
                "--hook-arg",
                &out_arg,
            ],
            &["leak", "48", "2", "sleep", "100000"],
        );
        let lines = sv.wait_for(&["started", "memory_over_limit"], Duration::from_secs(20));
        let pid = lines[0]["pid"].as_u64().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&out)
                && !text.is_empty()
            {
                break text;
            }
            assert!(Instant::now() < deadline, "{sensor}: the hook never ran");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(text.contains("WATCHDOG_SERVICE=hooked\n"), "{text}");
        assert!(text.contains(&format!("WATCHDOG_PID={pid}\n")), "{text}");
        assert!(
            text.contains(&format!("WATCHDOG_LIMIT_BYTES={}\n", 32u64 << 20)),
            "{text}"
        );
        let charged: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("WATCHDOG_CHARGED_BYTES="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(charged >= 32 << 20, "{text}");
        assert!(
            sv.lines().iter().all(|l| l["event"] != "exited"),
            "the run was left alone"
        );
        assert!(sv.stop().success());
    }
}

/// A program that can no longer be started (replaced during a deploy) is a
/// failed run for the policy, not the end of supervision.
#[test]
fn a_vanished_program_is_a_crash() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("vanish");
    let helper = dir.path().join("wd-helper");
    watchdog_tests::copy_executable(HELPER.as_ref(), &helper);
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("audit.jsonl");
    let mut child = Command::new(watchdog_bin())
        .args(["supervise", "--sensor", "sampling", "--max-crashes", "3"])
        .args(["--backoff-floor", "50ms", "--audit-log"])
        .arg(&log)
        .arg("--")
        .arg(&helper)
        .args(["sleep", "300", "exit", "0"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Remove the program once the first run has started (waiting for the
    // line, not for a fixed time: start-up is slow under emulation).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("\"event\":\"started\"")
    {
        assert!(Instant::now() < deadline, "the first run never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_file(&helper).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "supervise did not give up");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1), "gave up after the failed starts");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let exits: Vec<&Value> = lines.iter().filter(|l| l["event"] == "exited").collect();
    assert_eq!(exits[0]["cause"], "clean_exit", "{text}");
    assert!(
        exits[1..]
            .iter()
            .all(|e| e["cause"] == "crash" && e["exit_code"] == 127 && e["pid"] == 0),
        "{text}"
    );
    assert_eq!(
        lines.last().unwrap()["event"],
        "max_crashes_exceeded",
        "{text}"
    );
}

fn first_pid(lines: &[Value]) -> u64 {
    lines
        .iter()
        .find(|l| l["event"] == "started")
        .and_then(|l| l["pid"].as_u64())
        .expect("a started line")
}

/// Regression: memory drains past the clean-restart budget scheduled a
/// restart that never came (`--max-rss 64KiB --grace 100ms -- sleep 100`
/// started 11 times, then stayed down).
#[test]
fn drains_past_the_clean_budget_restart_after_backoff() {
    for sensor in sensors("drains_past_the_clean_budget_restart_after_backoff") {
        let mut sv = Supervisor::start(
            sensor,
            &[
                "--max-rss",
                "64KiB",
                "--grace",
                "100ms",
                "--clean-budget",
                "3",
                "--backoff-floor",
                "300ms",
            ],
            &["sleep", "100000"],
        );
        let lines = sv.wait_for(
            &["health_warn", "restart_scheduled", "started"],
            Duration::from_secs(30),
        );
        let warn = lines.iter().find(|l| l["event"] == "health_warn").unwrap();
        assert_eq!(warn["reason"], "clean_restart_budget_exceeded", "{sensor}");
        assert!(sv.stop().success(), "{sensor}");
    }
}

/// Regression: SIGTERM while a memory decision was deferred (`--over-for`)
/// never escalated: a service ignoring SIGTERM kept the supervisor waiting
/// until it happened to exit. It is SIGKILLed after grace, and the
/// supervisor exits 0 within grace + 1 s.
#[test]
fn sigterm_while_deferred_kills_after_grace() {
    for sensor in sensors("sigterm_while_deferred_kills_after_grace") {
        let mut sv = Supervisor::start(
            sensor,
            // The grace ends after the deferred decision would have been
            // due: the decision's wake-up must not replace the grace's.
            &["--max-rss", "32MiB", "--over-for", "2s", "--grace", "4s"],
            &["ignore-term", "alloc", "64", "sleep", "100000"],
        );
        let pid = first_pid(&sv.wait_for(&["started"], Duration::from_secs(20)));
        wait_until("the run over its limit", Duration::from_secs(10), || {
            watchdog_tests::charged(pid as u32) > 40 << 20
        });
        // Time for the sensor to hear the crossing and defer it.
        std::thread::sleep(Duration::from_millis(300));
        let asked = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(sv.child.id() as i32, libc::SIGTERM) };
        let status = sv.wait_exit(Duration::from_secs(10));
        let took = asked.elapsed();
        assert!(status.success(), "{sensor}: {status:?}");
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(5),
            "{sensor}: grace 4s, took {took:?}"
        );
        let lines = sv.lines();
        let exit = lines.iter().find(|l| l["event"] == "exited").unwrap();
        assert_eq!(exit["cause"], "shutdown", "{sensor}: {exit}");
        assert_eq!(exit["signal"], 9, "{sensor}: {exit}");
        assert_eq!(sv.leftovers(), Vec::<u32>::new(), "{sensor}");
    }
}

/// Regression: `--hard-limit` was deferred by `--over-for` with the kernel
/// programs (a tree at 86.7 MiB over a 50 MiB hard limit was acted on only
/// when over-for expired). Neither `--over-for` nor `--startup-grace`
/// defers it, with either sensor.
#[test]
fn hard_limit_is_never_deferred() {
    for sensor in sensors("hard_limit_is_never_deferred") {
        for deferral in ["--over-for", "--startup-grace"] {
            let mut sv = Supervisor::start(
                sensor,
                &[
                    "--max-rss",
                    "20MiB",
                    "--hard-limit",
                    "50MiB",
                    deferral,
                    "60s",
                    "--grace",
                    "1s",
                    "--restart",
                    "never",
                ],
                &[
                    "alloc", "30", "sleep", "1000", "alloc", "60", "sleep", "100000",
                ],
            );
            sv.wait_for(&["started"], Duration::from_secs(20));
            let started = Instant::now();
            // It passes the hard limit about a second in; deferred, it
            // would be acted on a minute later.
            let status = sv.wait_exit(Duration::from_secs(10));
            assert!(status.success(), "{sensor} {deferral}: {status:?}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{sensor} {deferral}: ended {:?} after it started",
                started.elapsed()
            );
            let lines = sv.lines();
            let over = lines
                .iter()
                .find(|l| l["event"] == "memory_over_limit")
                .unwrap();
            assert_eq!(over["reason"], "hard_limit", "{sensor} {deferral}: {over}");
            assert_eq!(over["limit_bytes"], 50u64 << 20);
            let exit = lines.iter().find(|l| l["event"] == "exited").unwrap();
            assert_eq!(exit["cause"], "memory_drain", "{sensor} {deferral}: {exit}");
        }
    }
}

/// Regression: limit 100 MiB, `--over-for 2s`, the service at 103 MiB,
/// then 97, then 400: no `memory_over_limit` at all (the sensor waited for
/// it to fall below the re-arm level, 95 MiB).
#[test]
fn a_dip_under_the_limit_does_not_deafen() {
    for sensor in sensors("a_dip_under_the_limit_does_not_deafen") {
        let mut sv = Supervisor::start(
            sensor,
            &["--max-rss", "100MiB", "--over-for", "2s", "--grace", "1s"],
            // 97 MiB, 103, back to 97 (under the limit, over the re-arm
            // level of 95), then 400.
            &[
                "alloc",
                "96",
                "alloc",
                "6",
                "sleep",
                "300",
                "free-last",
                "sleep",
                "4000",
                "alloc",
                "300",
                "sleep",
                "100000",
            ],
        );
        let lines = sv.wait_for(&["started", "memory_over_limit"], Duration::from_secs(20));
        let over = lines
            .iter()
            .find(|l| l["event"] == "memory_over_limit")
            .unwrap();
        assert!(
            over["charged_bytes"].as_u64().unwrap() > 300 << 20,
            "{sensor}: acted on the growth to 400 MiB, not the first crossing: {over}"
        );
        assert!(sv.stop().success(), "{sensor}");
    }
}

/// A marker that cannot be written at run time is `marker_failed` with
/// the error, never `respawn_recommended`.
#[test]
fn a_failed_marker_is_recorded_as_failed() {
    for sensor in sensors("a_failed_marker_is_recorded_as_failed") {
        let dir = TempDir::new("marker-fail");
        let marker_dir = dir.path().join("markers");
        std::fs::create_dir(&marker_dir).unwrap();
        let marker = marker_dir.join("respawn");
        let mut sv = Supervisor::start(
            sensor,
            &[
                "--max-rss",
                "32MiB",
                "--on-memory",
                "marker",
                "--marker-file",
                marker.to_str().unwrap(),
            ],
            &["sleep", "1500", "alloc", "48", "sleep", "100000"],
        );
        sv.wait_for(&["started"], Duration::from_secs(20));
        // The directory goes away after start-up checked it.
        std::fs::remove_dir(&marker_dir).unwrap();
        let lines = sv.wait_for(
            &["memory_over_limit", "marker_failed"],
            Duration::from_secs(20),
        );
        let failed = lines
            .iter()
            .find(|l| l["event"] == "marker_failed")
            .unwrap();
        assert!(
            failed["error"].as_str().unwrap().contains("respawn"),
            "{sensor}: names the marker: {failed}"
        );
        assert!(
            lines.iter().all(|l| l["event"] != "respawn_recommended"),
            "{sensor}: {lines:?}"
        );
        assert!(sv.stop().success());
    }
}

/// A hook's start, exit status and duration are recorded.
#[test]
fn a_hook_exit_is_recorded() {
    let mut sv = Supervisor::start(
        "sampling",
        &[
            "--max-rss",
            "32MiB",
            "--on-memory",
            "exec",
            "--hook",
            HELPER,
            "--hook-arg",
            "sleep",
            "--hook-arg",
            "200",
            "--hook-arg",
            "exit",
            "--hook-arg",
            "3",
        ],
        &["alloc", "48", "sleep", "100000"],
    );
    let lines = sv.wait_for(
        &["memory_over_limit", "hook_started", "hook_exited"],
        Duration::from_secs(20),
    );
    let exited = lines.iter().find(|l| l["event"] == "hook_exited").unwrap();
    assert_eq!(exited["exit_code"], 3, "{exited}");
    assert!(exited["duration_ms"].as_u64().unwrap() >= 200, "{exited}");
    assert!(sv.stop().success());
}

/// The service's main process does not outlive a killed supervisor
/// (PR_SET_PDEATHSIG, set after dropping privileges).
#[test]
fn a_killed_supervisor_takes_its_run_along() {
    for sensor in sensors("a_killed_supervisor_takes_its_run_along") {
        let mut sv = Supervisor::start(sensor, &[], &["sleep", "100000"]);
        let pid = first_pid(&sv.wait_for(&["started"], Duration::from_secs(20)));
        sv.wait_exit_after_kill();
        wait_until(
            "the run gone after SIGKILL of the supervisor",
            Duration::from_secs(5),
            || !std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid),
        );
    }
}

/// The drain signal reaches a descendant that left the process group
/// (setsid), not only the group.
#[test]
fn the_drain_signal_reaches_a_new_session() {
    for sensor in sensors("the_drain_signal_reaches_a_new_session") {
        let dir = TempDir::new("session");
        let pid_file = dir.path().join("child.pid");
        let mut sv = Supervisor::start(
            sensor,
            &["--max-rss", "32MiB", "--on-memory", "signal"],
            &[
                "spawn-session",
                "48",
                pid_file.to_str().unwrap(),
                "ignore-term",
                "sleep",
                "100000",
            ],
        );
        sv.wait_for(&["started", "memory_over_limit"], Duration::from_secs(20));
        let child: u64 = std::fs::read_to_string(&pid_file)
            .expect("the session child wrote its pid")
            .parse()
            .unwrap();
        wait_until("the session child gone", Duration::from_secs(5), || {
            !std::path::Path::new(&format!("/proc/{child}")).exists() || is_zombie(child)
        });
        assert!(
            sv.child.try_wait().unwrap().is_none(),
            "{sensor}: supervision goes on"
        );
        assert!(sv.stop().success());
    }
}

fn is_zombie(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Options that cannot work are refused before anything starts: exit 2
/// and a message naming the option.
#[test]
fn bad_options_are_refused_with_exit_2() {
    let dir = TempDir::new("badopts");
    let missing = dir.path().join("missing/marker");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--max-rss", "0"], "--max-rss"),
        (
            vec![
                "--max-rss",
                "1MiB",
                "--on-memory",
                "exec",
                "--hook",
                "/nonexistent",
            ],
            "--hook",
        ),
        (
            vec![
                "--max-rss",
                "1MiB",
                "--on-memory",
                "marker",
                "--marker-file",
                missing.to_str().unwrap(),
            ],
            "--marker-file",
        ),
        (
            vec!["--backoff-floor", "5s", "--backoff-cap", "1s"],
            "--backoff-floor",
        ),
        (
            vec!["--max-rss", "2MiB", "--hard-limit", "1MiB"],
            "--hard-limit",
        ),
        (vec!["--over-for", "1s"], "--max-rss"),
        (vec!["--cwd", "/nonexistent-dir"], "/nonexistent-dir"),
    ];
    for (args, needle) in cases {
        let full: Vec<&str> = ["supervise"]
            .into_iter()
            .chain(args.iter().copied())
            .chain(["--sensor", "sampling", "--", HELPER, "sleep", "10"])
            .collect();
        let (code, err) = watchdog_tests::run_watchdog(&full, Duration::from_secs(10));
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Events the kernel could not deliver are reported in the audit log
/// itself (`events_lost`), not only on standard error: the supervisor is
/// stopped while its service forks faster than the ring buffer holds.
#[test]
fn lost_kernel_events_are_in_the_audit_log() {
    if !privileged("lost_kernel_events_are_in_the_audit_log") {
        return;
    }
    let dir = TempDir::new("storm");
    let done = dir.path().join("done");
    let mut sv = Supervisor::start(
        "ebpf",
        &[],
        &[
            "sleep",
            "300",
            "fork-storm",
            // 24,000 fork and exit events: more than the ring buffer holds.
            "12000",
            "write-env",
            done.to_str().unwrap(),
            "sleep",
            "100000",
        ],
    );
    sv.wait_for(&["started"], Duration::from_secs(20));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(sv.child.id() as i32, libc::SIGSTOP) };
    // Only a bound on a hang: 12,000 forks take a minute or more under emulation.
    wait_until("the fork storm done", Duration::from_secs(300), || {
        done.exists()
    });
    // SAFETY: as above.
    unsafe { libc::kill(sv.child.id() as i32, libc::SIGCONT) };
    let lines = sv.wait_for(&["events_lost"], Duration::from_secs(10));
    let lost = lines.iter().find(|l| l["event"] == "events_lost").unwrap();
    assert_eq!(lost["counter"], "ringbuf_full", "{lost}");
    assert!(lost["count"].as_u64().unwrap() > 0, "{lost}");
    assert!(lost["total"].as_u64().unwrap() >= lost["count"].as_u64().unwrap());
    assert!(sv.stop().success());
}

/// A failure inside the kernel programs (here a read made to fail, in the
/// exec program) is counted and reported in the audit log as
/// `events_lost` with counter `read_failed`; its message reaches the log
/// through aya-log only when the daemon logs at debug.
#[test]
fn kernel_program_failures_are_counted_and_logged_at_debug() {
    if !privileged("kernel_program_failures_are_counted_and_logged_at_debug") {
        return;
    }
    for debug in [true, false] {
        let dir = TempDir::new("kfault");
        let log = dir.path().join("audit.jsonl");
        let err = dir.path().join("stderr");
        let filter = if debug {
            "info,watchdog::kernel=debug"
        } else {
            "info"
        };
        let child = Command::new(watchdog_bin())
            .args(["supervise", "--sensor", "ebpf", "--max-rss", "512MiB"])
            .arg("--audit-log")
            .arg(&log)
            .arg("--")
            .arg(HELPER)
            .args(["exec", "sleep", "60000"])
            .env("WATCHDOG_LOG", filter)
            .env("WATCHDOG_TEST_FAULT_EXEC", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        // Killed however the test ends.
        let mut sv = Supervisor {
            child,
            log: log.clone(),
            tag: String::new(),
            _dir: dir,
        };
        let read_failed = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["event"] == "events_lost" && l["counter"] == "read_failed")
        };
        wait_until(
            "an events_lost line for read_failed",
            Duration::from_secs(30),
            || read_failed().is_some(),
        );
        let line = read_failed().unwrap();
        assert!(line["count"].as_u64() >= Some(1), "{line}");
        assert!(sv.stop().success());
        let stderr = std::fs::read_to_string(&err).unwrap();
        let message = "kernel program: sched_process_exec: reading the new mm of";
        assert_eq!(
            stderr.contains(message),
            debug,
            "debug {debug}: the kernel's message {}:\n{stderr}",
            if debug { "is missing" } else { "came out" }
        );
    }
}

/// `unshare --pid --fork --mount-proc watchdog supervise ARGS -- HELPER
/// STEPS`: a supervisor in a pid namespace of its own, as in a container
/// without hostPID, its standard error in a file. `None` (with the reason
/// printed) where this cannot run.
fn in_a_pid_namespace(
    test: &str,
    dir: &TempDir,
    args: &[&str],
    steps: &[&str],
) -> Option<(Child, std::path::PathBuf)> {
    if !watchdog_tests::pid_namespaces(test) {
        return None;
    }
    let stderr = dir.path().join("stderr.log");
    let child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(watchdog_bin())
        .arg("supervise")
        .args(args)
        .arg("--")
        .arg(HELPER)
        .args(steps)
        .env("WATCHDOG_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    Some((child, stderr))
}

/// In a pid namespace of its own, `--sensor auto` samples, with one
/// warning that says why and names hostPID, and still drains a leaker.
#[test]
fn in_a_pid_namespace_supervise_samples_with_one_warning() {
    let test = "in_a_pid_namespace_supervise_samples_with_one_warning";
    let dir = TempDir::new("pidns");
    let log = dir.path().join("audit.jsonl");
    let log_arg = log.display().to_string();
    let Some((mut child, stderr)) = in_a_pid_namespace(
        test,
        &dir,
        &[
            "--audit-log",
            &log_arg,
            "--sensor",
            "auto",
            "--interval",
            "100ms",
            "--min-interval",
            "20ms",
            "--max-rss",
            "32MiB",
            "--grace",
            "5s",
        ],
        &["leak", "64", "5", "sleep", "100000"],
    ) else {
        return;
    };
    let lines = |path: &std::path::Path| -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_until("a drain in the audit log", Duration::from_secs(20), || {
        lines(&log)
            .iter()
            .any(|l| l["event"] == "exited" && l["cause"] == "memory_drain")
    });
    let audit = lines(&log);
    let text = std::fs::read_to_string(&stderr).unwrap();
    let exit = audit
        .iter()
        .find(|l| l["event"] == "exited" && l["cause"] == "memory_drain")
        .unwrap();
    assert_eq!(exit["source"], "procfs", "{exit}");
    assert!(audit.iter().all(|l| l["source"] == "procfs"), "{audit:#?}");
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("hostPID"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning naming hostPID: {text}");
    assert!(warnings[0].contains("pid namespace"), "{}", warnings[0]);
    assert!(!text.contains("kernel programs attached"), "{text}");
    assert!(!text.contains("self-check"), "{text}");

    // SIGTERM to the supervisor (pid 1 of the namespace) drains and ends.
    let unshare = child.id();
    let inner: i32 = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .expect("the supervisor under unshare")
        .parse()
        .unwrap();
    // SAFETY: signalling the supervisor this test started.
    unsafe { libc::kill(inner, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the supervisor did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

/// In a pid namespace of its own, `--sensor ebpf` is refused: exit 2,
/// with a message that names hostPID.
#[test]
fn in_a_pid_namespace_sensor_ebpf_is_refused() {
    let test = "in_a_pid_namespace_sensor_ebpf_is_refused";
    let dir = TempDir::new("pidns");
    let log = dir.path().join("audit.jsonl");
    let log_arg = log.display().to_string();
    let Some((mut child, stderr)) = in_a_pid_namespace(
        test,
        &dir,
        &[
            "--audit-log",
            &log_arg,
            "--sensor",
            "ebpf",
            "--max-rss",
            "32MiB",
        ],
        &["sleep", "100000"],
    ) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("supervise --sensor ebpf was not refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(text.contains("hostPID"), "{text}");
    assert!(text.contains("--sensor ebpf"), "{text}");
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("\"started\""),
        "nothing was started"
    );
}

/// Without --audit-log, into a pipe, standard output carries whole audit
/// lines and nothing else: the service's own output (an unfinished line
/// included) goes to standard error.
#[test]
fn audit_lines_on_standard_output_stay_whole() {
    let out = Command::new(watchdog_bin())
        .args(["supervise", "--max-rss", "64MiB", "--max-crashes", "2"])
        .args(["--backoff-floor", "10ms", "--"])
        .args(["/bin/sh", "-c", "printf partial; echo ' err' >&2; exit 1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn ({e}): {l:?}")))
        .collect();
    assert!(
        lines.iter().filter(|l| l["event"] == "exited").count() >= 2,
        "{stdout}"
    );
    assert!(stderr.contains("partial err"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}
