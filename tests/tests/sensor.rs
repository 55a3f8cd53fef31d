//! Memory sensing through `watchdog watch`: crossings of real children,
//! with the kernel programs (as root) and with the sampler (everywhere,
//! and without privilege).

use std::{
    io::Write,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use watchdog_tests::{
    TempDir, WATCHING, Watchdog, privileged, unprivileged_watchdog, watchdog_bin,
};

const HELPER: &str = env!("CARGO_BIN_EXE_wd-helper");
const MIB: u64 = 1 << 20;
/// Sampling settings for the sampler runs: the bound its detection must meet.
const INTERVAL: &str = "100ms";
const MIN_INTERVAL: &str = "20ms";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The kernel programs, as root.
    Ebpf,
    /// `--sensor sampling`.
    Sampling,
    /// `--sensor auto` without privilege: must fall back to sampling.
    Unprivileged,
}

/// A helper held at its first `wait-stdin` while `watchdog watch` starts on
/// it, then let go.
struct Scenario {
    helper: Child,
    wd: Watchdog,
    _dir: Option<TempDir>,
}

impl Scenario {
    fn start(mode: Mode, steps: &[&str], limit: &str, extra: &[&str]) -> Self {
        let helper = Command::new(HELPER)
            .arg("wait-stdin")
            .args(steps)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let (dir, mut cmd) = match mode {
            Mode::Unprivileged => {
                let (dir, cmd) = unprivileged_watchdog();
                (Some(dir), cmd)
            }
            _ => (None, Command::new(watchdog_bin())),
        };
        let sensor = match mode {
            Mode::Ebpf => "ebpf",
            Mode::Sampling => "sampling",
            Mode::Unprivileged => "auto",
        };
        let pid = helper.id().to_string();
        cmd.args(["watch", "--pid", &pid, "--limit", limit, "--sensor", sensor])
            .args(["--interval", INTERVAL, "--min-interval", MIN_INTERVAL])
            .args(extra);
        let mut wd = Watchdog::spawn(&mut cmd, WATCHING);
        wd.wait_ready(Duration::from_secs(15));
        let mut scenario = Self {
            helper,
            wd,
            _dir: dir,
        };
        scenario.send_line();
        scenario
    }

    fn pid(&self) -> u32 {
        self.helper.id()
    }

    fn send_line(&mut self) {
        let stdin = self.helper.stdin.as_mut().expect("piped");
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// The next `memory_*` line within `timeout`, skipping other lines.
    fn next_memory(&self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self
                .wd
                .next_line(deadline.saturating_duration_since(Instant::now()))?;
            if line["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("memory_"))
            {
                return Some(line);
            }
        }
    }

    fn expect_memory(&self, event: &str, timeout: Duration) -> Value {
        let line = self
            .next_memory(timeout)
            .unwrap_or_else(|| panic!("no {event} within {timeout:?}; log:\n{}", self.wd.log()));
        assert_eq!(line["event"], event, "{line}");
        line
    }

    /// Lets the helper finish, stops the watchdog, and returns its log.
    fn finish(mut self) -> String {
        drop(self.helper.stdin.take());
        let _ = self.helper.wait();
        let status = self.wd.stop_with(libc::SIGTERM, Duration::from_secs(10));
        assert!(
            status.success(),
            "watchdog exit {status:?}:\n{}",
            self.wd.log()
        );
        self.wd.log()
    }
}

fn modes(test: &str) -> Vec<Mode> {
    let mut modes = vec![Mode::Sampling, Mode::Unprivileged];
    if privileged(test) {
        modes.insert(0, Mode::Ebpf);
    }
    modes
}

/// How long a crossing may take to be reported: the kernel path is far
/// faster; the sampler's bound is its shortest interval plus a sample.
fn bound(mode: Mode) -> Duration {
    match mode {
        Mode::Ebpf => Duration::from_secs(1),
        _ => Duration::from_secs(2),
    }
}

fn source(mode: Mode) -> &'static str {
    match mode {
        Mode::Ebpf => "ebpf",
        _ => "procfs",
    }
}

#[test]
fn crossing_fires_once_with_exact_bytes() {
    for mode in modes("crossing_fires_once_with_exact_bytes") {
        let s = Scenario::start(mode, &["alloc", "48", "wait-stdin"], "32MiB", &[]);
        let line = s.expect_memory("memory_over_limit", bound(mode));
        assert_eq!(line["pid"], s.pid(), "{mode:?}: {line}");
        assert_eq!(line["limit_bytes"], 32 * MIB, "{mode:?}: {line}");
        let charged = line["charged_bytes"].as_u64().unwrap();
        assert!(
            charged >= 32 * MIB,
            "{mode:?}: exact bytes {charged} below the limit"
        );
        assert!(
            charged < 64 * MIB,
            "{mode:?}: {charged} is more than the helper has"
        );
        assert_eq!(line["members"], 1, "{mode:?}: {line}");
        assert_eq!(line["source"], source(mode), "{mode:?}: {line}");
        let sensed = line["sensed_monotonic_ns"].as_u64().unwrap();
        let confirmed = line["confirmed_monotonic_ns"].as_u64().unwrap();
        assert!(confirmed >= sensed, "{line}");
        if let Some(again) = s.next_memory(Duration::from_millis(500)) {
            panic!("{mode:?}: a second memory event while still over: {again}");
        }
        let log = s.finish();
        if mode == Mode::Unprivileged {
            assert!(
                log.contains("kernel programs unavailable, sampling memory instead"),
                "the fallback says so: {log}"
            );
        }
    }
}

#[test]
fn freeing_below_the_hysteresis_rearms() {
    for mode in modes("freeing_below_the_hysteresis_rearms") {
        let steps = [
            "alloc",
            "48",
            "sleep",
            "400",
            "free",
            "sleep",
            "400",
            "alloc",
            "48",
            "wait-stdin",
        ];
        let s = Scenario::start(mode, &steps, "32MiB", &["--hysteresis", "8MiB"]);
        s.expect_memory("memory_over_limit", bound(mode));
        let rearmed = s.expect_memory("memory_rearmed", Duration::from_secs(3));
        assert!(
            rearmed["charged_bytes"].as_u64().unwrap() < 24 * MIB,
            "{rearmed}"
        );
        let again = s.expect_memory("memory_over_limit", Duration::from_secs(3));
        assert!(
            again["charged_bytes"].as_u64().unwrap() >= 32 * MIB,
            "{again}"
        );
        s.finish();
    }
}

#[test]
fn a_grandchild_trips_its_group() {
    for mode in modes("a_grandchild_trips_its_group") {
        let s = Scenario::start(mode, &["fork-alloc", "48", "wait-stdin"], "32MiB", &[]);
        let line = s.expect_memory("memory_over_limit", bound(mode));
        assert_eq!(line["pid"], s.pid(), "the group is the helper's: {line}");
        assert_eq!(line["members"], 2, "{mode:?}: {line}");
        if mode == Mode::Ebpf {
            let trigger = line["trigger_pid"].as_u64().unwrap();
            assert_ne!(
                trigger,
                u64::from(s.pid()),
                "the grandchild crossed: {line}"
            );
        }
        s.finish();
    }
}

/// Guards the reset at exec: the old image's 40 MiB must leave the group
/// when the new one starts (at exec, or at the new mm's first update at the
/// latest), or the kernel's total would cross the 64 MiB limit while the
/// exact total is far below (an unconfirmed crossing).
#[test]
fn exec_resets_the_contribution() {
    if !privileged("exec_resets_the_contribution") {
        return;
    }
    let steps = [
        "alloc",
        "40",
        "exec",
        "alloc",
        "40",
        "sleep",
        "300",
        "alloc",
        "30",
        "wait-stdin",
    ];
    let s = Scenario::start(Mode::Ebpf, &steps, "64MiB", &[]);
    let line = s.expect_memory("memory_over_limit", Duration::from_secs(3));
    let charged = line["charged_bytes"].as_u64().unwrap();
    assert!((64 * MIB..80 * MIB).contains(&charged), "{line}");
    assert!(s.next_memory(Duration::from_millis(300)).is_none());
    let log = s.finish();
    assert!(log.contains("unconfirmed_crossings=0"), "{log}");
}

/// Four threads allocating at once share one mm: counted once, not four
/// times (which would cross 48 MiB early and fail to confirm).
#[test]
fn threads_are_counted_once() {
    for mode in modes("threads_are_counted_once") {
        let steps = [
            "thread-alloc",
            "4",
            "10",
            "sleep",
            "500",
            "alloc",
            "16",
            "wait-stdin",
        ];
        let s = Scenario::start(mode, &steps, "48MiB", &[]);
        let line = s.expect_memory("memory_over_limit", Duration::from_secs(3));
        let charged = line["charged_bytes"].as_u64().unwrap();
        assert!((48 * MIB..64 * MIB).contains(&charged), "{mode:?}: {line}");
        let log = s.finish();
        if mode == Mode::Ebpf {
            assert!(log.contains("unconfirmed_crossings=0"), "{log}");
        }
    }
}

/// `--step` reports each move of the total by at least that much.
#[test]
fn steps_report_changes() {
    for mode in modes("steps_report_changes") {
        let steps = ["alloc", "16", "sleep", "300", "alloc", "16", "wait-stdin"];
        let s = Scenario::start(mode, &steps, "1GiB", &["--step", "8MiB"]);
        let first = s.expect_memory("memory_changed", Duration::from_secs(3));
        let second = s.expect_memory("memory_changed", Duration::from_secs(3));
        let (a, b) = (
            first["charged_bytes"].as_u64().unwrap(),
            second["charged_bytes"].as_u64().unwrap(),
        );
        assert!(
            a >= 8 * MIB && b >= a + 8 * MIB,
            "{mode:?}: {first} then {second}"
        );
        s.finish();
    }
}
