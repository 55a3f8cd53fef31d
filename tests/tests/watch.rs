//! `watchdog watch --match`: processes that start after the watchdog are
//! watched too, and the watchdog waits for them (kernel programs as root,
//! the sampler everywhere).

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use watchdog_tests::{WATCHING, Watchdog, privileged, watchdog_bin};

const HELPER: &str = env!("CARGO_BIN_EXE_wd-helper");

/// Guards against `watch --match` seeing only the processes that ran when
/// it started, and exiting once they were gone.
fn later_processes_are_watched(sensor: &str, extra: &[&str]) {
    let tag = format!("watch-later-{sensor}-{}", std::process::id());
    let mut cmd = Command::new(watchdog_bin());
    cmd.args(["watch", "--match", &tag, "--limit", "1GiB"])
        .args(["--sensor", sensor, "--interval", "100ms"])
        .args(extra);
    // Nothing matches yet: it waits instead of failing.
    let mut wd = Watchdog::spawn(&mut cmd, WATCHING);
    wd.wait_ready(Duration::from_secs(15));
    // Twice: the second process comes after every group is gone.
    for code in [3, 4] {
        let mut helper = Command::new(HELPER)
            .args(["tag", &tag, "wait-stdin", "exit", &code.to_string()])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = helper.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !wd.log().lines().any(|l| {
            l.contains("watching a new matching process") && l.contains(&format!("pid={pid} "))
        }) {
            assert!(
                Instant::now() < deadline,
                "pid {pid} not watched:\n{}",
                wd.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(helper.stdin.take());
        assert_eq!(helper.wait().unwrap().code(), Some(code));
        let line = wd
            .line_for(pid, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no exit line for {pid}:\n{}", wd.log()));
        assert_eq!(line["event"], "exited", "{line}");
    }
    let status = wd.stop_with(libc::SIGTERM, Duration::from_secs(10));
    assert!(status.success(), "{status:?}:\n{}", wd.log());
}

#[test]
fn match_watches_later_processes_sampling() {
    // The default rescan interval (2 s).
    later_processes_are_watched("sampling", &[]);
}

#[test]
fn match_watches_later_processes_ebpf() {
    if !privileged("match_watches_later_processes_ebpf") {
        return;
    }
    later_processes_are_watched("ebpf", &["--rescan", "200ms"]);
}

/// `--rescan` does nothing without `--match`: refused, naming the option.
#[test]
fn rescan_without_match_is_refused() {
    let me = std::process::id().to_string();
    let (code, stderr) = watchdog_tests::run_watchdog(
        &[
            "watch", "--pid", &me, "--limit", "1GiB", "--sensor", "sampling", "--rescan", "1s",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--rescan"), "{stderr}");
}

/// In a pid namespace of its own (a container without hostPID): `watch
/// --sensor auto` samples with one warning naming hostPID, `watch --sensor
/// ebpf` and `audit` are refused with exit 2 and a message naming hostPID.
#[test]
fn in_a_pid_namespace_watch_samples_and_ebpf_is_refused() {
    let test = "in_a_pid_namespace_watch_samples_and_ebpf_is_refused";
    if !watchdog_tests::pid_namespaces(test) {
        return;
    }
    let in_namespace = |args: &str| {
        // The helper runs inside the namespace, where the pid is found.
        let script = format!(
            "{HELPER} sleep 3000 & exec {} {}",
            watchdog_bin().display(),
            args.replace("PID", "$!")
        );
        let out = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "sh",
                "-c",
            ])
            .arg(script)
            .env("WATCHDOG_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = in_namespace(
        "watch --pid PID --limit 1GiB --sensor auto --interval 100ms --min-interval 20ms",
    );
    assert_eq!(code, Some(0), "{stderr}");
    let warnings = stderr
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("hostPID"))
        .count();
    assert_eq!(warnings, 1, "one warning naming hostPID: {stderr}");
    assert!(stderr.contains("source=procfs"), "{stderr}");
    assert!(
        stdout.contains("\"exited\""),
        "the exit is reported: {stdout}"
    );
    for args in [
        "watch --pid PID --limit 1GiB --sensor ebpf",
        "audit --pid PID",
    ] {
        let (code, _, stderr) = in_namespace(args);
        assert_eq!(code, Some(2), "{args}: {stderr}");
        assert!(stderr.contains("hostPID"), "{args}: {stderr}");
    }
}
