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
