//! `watchdog audit`: exit events from the real kernel programs (as root),
//! and its behaviour without privilege and on bad input (everywhere).

use std::{
    os::unix::process::ExitStatusExt,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use watchdog_tests::{TempDir, Watchdog, privileged, watchdog_bin};

const HELPER: &str = env!("CARGO_BIN_EXE_wd-helper");
/// How long an exit event may take to arrive (the product promises far less).
const DELIVERY: Duration = Duration::from_secs(1);
const START: Duration = Duration::from_secs(15);

fn audit_all() -> Watchdog {
    let mut wd = Watchdog::start(&["audit", "--all"]);
    wd.wait_ready(START);
    wd
}

/// Runs the helper with `steps` in `dir`, waits for it, and returns its pid
/// and status as wait(2) saw it, and when it was reaped.
fn run_helper(steps: &[&str], dir: Option<&TempDir>) -> (u32, ExitStatus, Instant) {
    let mut cmd = Command::new(HELPER);
    cmd.args(steps).stdin(Stdio::null());
    if let Some(dir) = dir {
        cmd.current_dir(dir.path());
    }
    let mut child = cmd.spawn().expect("spawn helper");
    let status = child.wait().expect("wait helper");
    (child.id(), status, Instant::now())
}

/// Waits for the line of `pid` and checks it arrived within DELIVERY of the
/// exit being reaped.
fn expect_line(wd: &Watchdog, pid: u32, reaped: Instant) -> Value {
    let line = wd
        .line_for(pid, DELIVERY)
        .unwrap_or_else(|| panic!("no exit event for pid {pid} within {DELIVERY:?}"));
    assert!(reaped.elapsed() <= DELIVERY + Duration::from_millis(50));
    line
}

/// The fields every exit line has, and the status fields matching what
/// wait(2) reported to us.
fn check_common(line: &Value, pid: u32, status: ExitStatus) {
    assert_eq!(line["event"], "exited", "{line}");
    assert_eq!(line["pid"], pid, "{line}");
    assert_eq!(line["ppid"], std::process::id(), "{line}");
    assert_eq!(line["comm"], "wd-helper", "{line}");
    assert_eq!(line["source"], "ebpf", "{line}");
    let ts = humantime::parse_rfc3339(line["ts"].as_str().expect("ts is a string"))
        .unwrap_or_else(|e| panic!("ts not RFC 3339 ({e}): {line}"));
    let age = SystemTime::now().duration_since(ts).unwrap_or_default();
    assert!(age < Duration::from_secs(5), "ts {ts:?} is not now: {line}");
    assert!(
        line["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0),
        "{line}"
    );
    match status.code() {
        Some(code) => {
            assert_eq!(line["exit_code"], code, "{line}");
            assert!(line.get("signal").is_none(), "{line}");
        }
        None => {
            let signal = status.signal().expect("exited or signalled");
            assert_eq!(line["signal"], signal, "{line}");
            assert!(line.get("exit_code").is_none(), "{line}");
        }
    }
    assert_eq!(line["core_dumped"], status.core_dumped(), "{line}");
}

#[test]
fn exit_code_is_reported() {
    if !privileged("exit_code_is_reported") {
        return;
    }
    let mut wd = audit_all();
    let (pid, status, reaped) = run_helper(&["exit", "3"], None);
    let line = expect_line(&wd, pid, reaped);
    check_common(&line, pid, status);
    assert_eq!(line["exit_code"], 3);
    assert_eq!(line["core_dumped"], false);
    assert!(
        wd.stop_with(libc::SIGTERM, START).success(),
        "SIGTERM must exit 0"
    );
}

#[test]
fn sigkill_is_reported_as_signal() {
    if !privileged("sigkill_is_reported_as_signal") {
        return;
    }
    let wd = audit_all();
    let mut child = Command::new(HELPER)
        .args(["sleep", "60000"])
        .spawn()
        .unwrap();
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let line = expect_line(&wd, child.id(), Instant::now());
    check_common(&line, child.id(), status);
    assert_eq!(line["signal"], 9);
    assert_eq!(line["signal_name"], "SIGKILL");
}

#[test]
fn segv_and_core_dumps_are_reported() {
    if !privileged("segv_and_core_dumps_are_reported") {
        return;
    }
    let wd = audit_all();
    let dir = TempDir::new("core");
    // Without a core limit: SIGSEGV, no core.
    let (pid, status, reaped) = run_helper(&["core-limit", "off", "segv"], Some(&dir));
    let line = expect_line(&wd, pid, reaped);
    check_common(&line, pid, status);
    assert_eq!(line["signal"], 11);
    assert_eq!(line["signal_name"], "SIGSEGV");
    assert_eq!(line["core_dumped"], false);
    // With one: whether a core is written depends on the host's
    // core_pattern; the event must agree with what wait(2) says.
    let (pid, status, reaped) = run_helper(&["core-limit", "on", "abort"], Some(&dir));
    let line = expect_line(&wd, pid, reaped);
    check_common(&line, pid, status);
    assert_eq!(line["signal"], 6);
    eprintln!(
        "abort with core limit: core_dumped = {}",
        status.core_dumped()
    );
}

#[test]
fn threads_exiting_first_give_one_event() {
    if !privileged("threads_exiting_first_give_one_event") {
        return;
    }
    let wd = audit_all();
    let (pid, status, reaped) = run_helper(&["threads", "8", "exit", "5"], None);
    let line = expect_line(&wd, pid, reaped);
    check_common(&line, pid, status);
    assert_eq!(line["exit_code"], 5);
    let again = wd.lines_within(Duration::from_millis(500));
    assert!(
        again.iter().all(|l| l["pid"] != pid),
        "a second event for pid {pid}: {again:?}"
    );
}

/// Guards the exit status of a process whose main thread exited alone
/// before its last thread. Which code wait(2) reports differs by kernel
/// (since 5.17 the last thread's, before that the leader's); the event must
/// report the same as wait(2), once.
#[test]
fn last_thread_not_the_leader() {
    if !privileged("last_thread_not_the_leader") {
        return;
    }
    let wd = audit_all();
    let (pid, status, reaped) = run_helper(&["leader-exits-first", "9"], None);
    let line = expect_line(&wd, pid, reaped);
    check_common(&line, pid, status);
    let again = wd.lines_within(Duration::from_millis(300));
    assert!(again.iter().all(|l| l["pid"] != pid), "{again:?}");
}

#[test]
fn peak_rss_covers_what_was_touched() {
    if !privileged("peak_rss_covers_what_was_touched") {
        return;
    }
    let wd = audit_all();
    let (pid, status, reaped) = run_helper(&["alloc", "64", "exit", "0"], None);
    let line = expect_line(&wd, pid, reaped);
    check_common(&line, pid, status);
    let peak = line["peak_rss_bytes"].as_u64().unwrap();
    assert!(peak >= 64 << 20, "peak {peak} < 64 MiB: {line}");
    assert!(peak < 512 << 20, "peak {peak} implausibly large: {line}");
}

#[test]
fn pid_mode_follows_the_tree_and_nothing_else() {
    if !privileged("pid_mode_follows_the_tree_and_nothing_else") {
        return;
    }
    let mut child = Command::new(HELPER)
        .args(["wait-stdin", "fork-child", "7", "exit", "0"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut wd = Watchdog::start(&["audit", "--pid", &pid.to_string()]);
    wd.wait_ready(START);
    // An unrelated process exiting meanwhile must not be reported.
    let (outsider, _, _) = run_helper(&["exit", "9"], None);
    drop(child.stdin.take()); // end of input: the helper goes on
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));

    let lines = wd.lines_within(DELIVERY);
    assert_eq!(
        lines.len(),
        2,
        "exactly the child and grandchild: {lines:?}"
    );
    let grandchild = &lines[0];
    assert_eq!(grandchild["exit_code"], 7, "{grandchild}");
    assert_eq!(grandchild["ppid"], pid, "{grandchild}");
    let parent = &lines[1];
    check_common(parent, pid, status);
    assert!(lines.iter().all(|l| l["pid"] != outsider));
    assert!(
        wd.stop_with(libc::SIGINT, START).success(),
        "SIGINT must exit 0"
    );
}

#[test]
fn output_file_gets_whole_lines() {
    if !privileged("output_file_gets_whole_lines") {
        return;
    }
    let dir = TempDir::new("output");
    let path = dir.path().join("exits.jsonl");
    let mut wd = Watchdog::start(&["audit", "--all", "--output", path.to_str().unwrap()]);
    wd.wait_ready(START);
    let (pid, _, reaped) = run_helper(&["exit", "4"], None);
    let found = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line ({e}): {l:?}")))
            .collect();
        if let Some(line) = lines.into_iter().find(|l| l["pid"] == pid) {
            break line;
        }
        assert!(
            reaped.elapsed() < DELIVERY,
            "no line for {pid} in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(found["exit_code"], 4);
    assert!(wd.stop_with(libc::SIGTERM, START).success());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.ends_with('\n'), "the file ends with a whole line");
    assert!(
        wd.next_line(Duration::ZERO).is_none(),
        "nothing on stdout with --output"
    );
}

/// Runs without privilege everywhere: as root, the binary is copied where
/// `nobody` can run it and run as `nobody`; otherwise it runs as the
/// current (unprivileged) user.
#[test]
fn unprivileged_run_fails_clearly() {
    let (dir, mut cmd) = watchdog_tests::unprivileged_watchdog();
    let bin = dir.path().join("watchdog");
    cmd.args(["audit", "--all"]);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(out.stdout.is_empty());
    assert!(!stderr.contains("panicked"), "{stderr}");
    let version = Command::new(&bin).arg("--version").output().unwrap();
    if String::from_utf8_lossy(&version.stdout).contains("without kernel programs") {
        assert!(
            stderr.contains("built without its kernel programs"),
            "{stderr}"
        );
        return;
    }
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("CAP_PERFMON") && stderr.contains("root"),
        "the message names what is missing and what to do: {stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.contains("error")).count(),
        1,
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let run = |args: &[&str]| {
        let out = Command::new(watchdog_bin()).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&["audit"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stderr) = run(&["audit", "--pid", "nope"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stderr) = run(&["audit", "--pid", "2147483647"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("no process with pid 2147483647"),
        "{stderr}"
    );
    // A thread id is not a process: say which process it belongs to.
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        let _ = done_rx.recv();
    });
    let tid = tid_rx.recv().unwrap().to_string();
    let (code, stderr) = run(&["audit", "--pid", &tid]);
    done_tx.send(()).unwrap();
    thread.join().unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("is a thread of process {}", std::process::id())),
        "{stderr}"
    );
    let (code, stderr) = run(&["frobnicate"]);
    assert_eq!(code, Some(2), "{stderr}");
}
