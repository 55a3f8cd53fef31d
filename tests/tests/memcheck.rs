//! `watchdog mem-check`: exact readings, matching on the command line,
//! trees, limits and exit codes. Needs no privilege.

use std::{
    io::Write,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use watchdog_tests::watchdog_bin;

const HELPER: &str = env!("CARGO_BIN_EXE_wd-helper");

/// A helper that allocates and then waits for its standard input to close.
struct Idle(Child);

impl Idle {
    fn start(steps: &[&str]) -> Self {
        let child = Command::new(HELPER)
            .args(steps)
            .arg("wait-stdin")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        Self(child)
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let _ = self.0.wait();
    }
}

/// RssAnon + RssShmem of `pid`, read by hand.
fn by_hand(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |field: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    kb("RssAnon:") + kb("RssShmem:")
}

/// The anonymous memory `pid` maps, from its page tables (smaps_rollup):
/// exact on every kernel, where RssAnon before 6.2 lags by up to 64 pages
/// per thread (counted per task, folded into the total in batches).
fn anonymous(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let line = rollup
        .lines()
        .find(|l| l.starts_with("Anonymous:"))
        .unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Waits until `pid` has at least `bytes` charged (it is still allocating).
fn wait_charged(pid: u32, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while anonymous(pid) < bytes {
        assert!(
            Instant::now() < deadline,
            "pid {pid} never reached {bytes} bytes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn mem_check(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(watchdog_bin())
        .arg("mem-check")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn match_reports_the_same_bytes_as_by_hand() {
    let tag = format!("memcheck-match-{}", std::process::id());
    let idle = Idle::start(&["tag", &tag, "alloc", "24"]);
    wait_charged(idle.pid(), 24 << 20);
    let (code, stdout, stderr) = mem_check(&["--match", &tag, "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 1, "{stdout}");
    let target = &targets[0];
    assert_eq!(target["pid"], idle.pid());
    assert_eq!(target["metric"], "anon_shmem");
    assert_eq!(target["charged_bytes"], by_hand(idle.pid()), "{stdout}");
    assert!(target["command"].as_str().unwrap().contains(&tag));
    let member = &target["members"][0];
    assert_eq!(
        member["charged_bytes"].as_u64().unwrap(),
        member["anon_bytes"].as_u64().unwrap() + member["shmem_bytes"].as_u64().unwrap()
    );
    assert!(member["vm_rss_bytes"].as_u64().unwrap() >= member["anon_bytes"].as_u64().unwrap());
}

#[test]
fn limit_decides_the_exit_code() {
    let idle = Idle::start(&["alloc", "32"]);
    wait_charged(idle.pid(), 32 << 20);
    let pid = idle.pid().to_string();
    let (code, stdout, stderr) = mem_check(&[&pid, "--limit", "16MiB"]);
    assert_eq!(code, Some(1), "over the limit: {stdout}{stderr}");
    assert!(stdout.contains("OVER the limit of 16 MiB"), "{stdout}");
    let (code, stdout, stderr) = mem_check(&[&pid, "--limit", "1GiB"]);
    assert_eq!(code, Some(0), "under the limit: {stdout}{stderr}");
    for column in ["ANON", "SHMEM", "FILE", "SWAP", "VMRSS", "CHARGED"] {
        assert!(stdout.contains(column), "{column} in {stdout}");
    }
}

#[test]
fn tree_sums_descendants() {
    let idle = Idle::start(&["alloc", "8", "fork-alloc", "16"]);
    wait_charged(idle.pid(), 8 << 20);
    let pid = idle.pid().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let (code, stdout, stderr) = mem_check(&[&pid, "--tree", "--json"]);
        assert_eq!(code, Some(0), "{stderr}");
        let report: Value = serde_json::from_str(&stdout).unwrap();
        if report["targets"][0]["charged_bytes"].as_u64().unwrap() >= 24 << 20 {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "the child never allocated: {stdout}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let target = &report["targets"][0];
    let members = target["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{target}");
    let sum: u64 = members
        .iter()
        .map(|m| m["charged_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(target["charged_bytes"], sum);
    let (_, stdout, _) = mem_check(&[&pid, "--json"]);
    let alone: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(alone["targets"][0]["members"].as_array().unwrap().len(), 1);
}

#[test]
fn bad_input_exits_2_with_a_clear_message() {
    let cases: [(&[&str], &str); 6] = [
        (&["2147483647"], "no process with pid 2147483647"),
        (
            &["--match", "no-such-process-zzz-memcheck"],
            "no process has a command line matching",
        ),
        (&["--match", "(unclosed"], "invalid --match pattern"),
        (&["1", "--limit", "12XB"], "unknown unit \"XB\""),
        (&["1", "--limit", "-5MiB"], "cannot be negative"),
        (&[], "required"),
    ];
    for (args, message) in cases {
        let (code, _, stderr) = mem_check(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Guards against `--match` reporting the shell that runs the watchdog
/// (seen: `sh -c "watchdog mem-check --match opencode"` reported the `sh`,
/// whose command line holds the pattern too, and exited 0).
#[test]
fn match_leaves_out_the_shell_that_runs_it() {
    let tag = format!("memcheck-shell-{}", std::process::id());
    // `; exit $?` keeps the shell from exec-ing the watchdog in its place.
    let script = format!(
        "{} mem-check --match {tag} --json; exit $?",
        watchdog_bin().display()
    );
    let run = || {
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run();
    assert_eq!(code, Some(2), "nothing else matches: {stdout}{stderr}");
    assert!(
        stderr.contains("no process has a command line matching"),
        "{stderr}"
    );
    // With a real match, only it is reported.
    let idle = Idle::start(&["tag", &tag]);
    let (code, stdout, stderr) = run();
    assert_eq!(code, Some(0), "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let pids: Vec<&Value> = report["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["pid"])
        .collect();
    assert_eq!(pids, [idle.pid()], "{stdout}");
}

/// `mem-check --tree` charges a tree as the limits do, each page once: a
/// prefork tree (64 MiB in the parent, four children sharing it
/// copy-on-write) reads ~64 MiB, not 320, and is under a 128 MiB limit.
#[test]
fn a_tree_is_read_as_the_limits_read_it() {
    let idle = Idle::start(&["prefork", "64", "4"]);
    let pid = idle.pid();
    wait_charged(pid, 64 << 20);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .count()
        < 4
    {
        assert!(Instant::now() < deadline, "the children never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (code, out, err) = mem_check(&["--tree", "--json", "--limit", "128MiB", &pid.to_string()]);
    assert_eq!(code, Some(0), "{out} {err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let target = &report["targets"][0];
    assert_eq!(target["metric"], "pss_anon_shmem", "{target}");
    let charged = target["charged_bytes"].as_u64().unwrap();
    assert!(
        (60 << 20..100 << 20).contains(&charged),
        "charged {} MiB: {target}",
        charged >> 20
    );
}
