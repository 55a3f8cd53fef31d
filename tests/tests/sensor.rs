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
        Self::start_with(mode, steps, limit, extra, &[])
    }

    /// As [`Self::start`], with environment variables for the watchdog.
    fn start_with(
        mode: Mode,
        steps: &[&str],
        limit: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_limited(mode, steps, |_| limit.to_owned(), extra, env)
    }

    /// As [`Self::start_with`], the limit made from the held helper's pid.
    fn start_limited(
        mode: Mode,
        steps: &[&str],
        limit: impl FnOnce(u32) -> String,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
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
        let limit = limit(helper.id());
        cmd.args([
            "watch", "--pid", &pid, "--limit", &limit, "--sensor", sensor,
        ])
        .args(["--interval", INTERVAL, "--min-interval", MIN_INTERVAL])
        .args(extra)
        .envs(env.iter().copied());
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

/// The kernel's counters can be behind a process's true count by a batch
/// of pages per CPU (per thread before 6.2): a process that stops a few
/// pages past its limit may never move them past it. It is reported all
/// the same, by the exact readings a group that near its limit gets.
/// Before 6.2 /proc's RssAnon is that same lagging count (a thread's
/// cached updates reach it every 64 faults), so nothing reads fewer pages
/// than that there: the helper then touches enough to pass it.
#[test]
fn a_few_pages_past_the_limit_are_reported() {
    let pages = if watchdog_tests::kernel_at_least(6, 2) {
        "12"
    } else {
        "80"
    };
    for mode in modes("a_few_pages_past_the_limit_are_reported") {
        let s = Scenario::start_limited(
            mode,
            &["alloc-pages", pages, "wait-stdin"],
            // 4 pages above what it has while held (as /proc says).
            |pid| (watchdog_tests::charged(pid) + 4 * 4096).to_string(),
            &[],
            &[],
        );
        let line = s.expect_memory("memory_over_limit", Duration::from_secs(3));
        assert_eq!(line["pid"], s.pid(), "{mode:?}: {line}");
        let charged = line["charged_bytes"].as_u64().unwrap();
        assert!(
            charged >= line["limit_bytes"].as_u64().unwrap(),
            "{mode:?}: {line}"
        );
        // Once: it stays over, and is read again and again (past the
        // slowest exact reading's interval) without being reported again.
        if let Some(again) = s.next_memory(Duration::from_secs(3)) {
            panic!("{mode:?}: a second memory event while still over: {again}");
        }
        s.finish();
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

/// The modes that read a tree's shared pages: the kernel programs, and
/// sampling with the privilege to read smaps_rollup (unprivileged sampling
/// of another user's processes cannot, and charges their whole RSS).
fn tree_modes(test: &str) -> Vec<Mode> {
    let mut modes = vec![Mode::Sampling];
    if privileged(test) {
        modes.insert(0, Mode::Ebpf);
    }
    modes
}

fn bytes(line: &Value) -> u64 {
    line["charged_bytes"].as_u64().unwrap()
}

/// Regression: a prefork server (a 100 MiB parent and four children
/// that only sleep, sharing its pages copy-on-write) is charged ~100 MiB,
/// not 500: under a 200 MiB limit it is never over, and the kernel's
/// running total (the `memory_changed` steps) stays near 100 MiB.
#[test]
fn a_prefork_tree_is_charged_each_page_once() {
    for mode in tree_modes("a_prefork_tree_is_charged_each_page_once") {
        let steps = ["prefork", "100", "4", "wait-stdin"];
        // A step well under the 4 MiB between 96 MiB and the tree's
        // 100: a total is reported once it moved a step from the last one
        // reported, so the last line is within a step of the total however
        // the samples fall while the parent touches its pages (slowly,
        // under emulation, when samples catch it half way).
        let s = Scenario::start(mode, &steps, "200MiB", &["--step", "1MiB"]);
        // Until the parent's 100 MiB is seen (its children are forked
        // right after), then as long again as a sampler needs. The bound
        // is generous: under emulation touching 100 MiB alone takes
        // seconds.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = 0;
        while seen < 96 * MIB {
            let line = s
                .next_memory(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|| panic!("{mode:?}: 100 MiB never seen; log:\n{}", s.wd.log()));
            assert_eq!(line["event"], "memory_changed", "{mode:?}: {line}");
            seen = seen.max(bytes(&line));
        }
        let window = Instant::now() + Duration::from_millis(1500);
        while let Some(line) = s.next_memory(window.saturating_duration_since(Instant::now())) {
            assert_eq!(line["event"], "memory_changed", "{mode:?}: {line}");
            assert!(
                bytes(&line) < 150 * MIB,
                "{mode:?}: the tree charged {} MiB: {line}",
                bytes(&line) / MIB
            );
        }
        let log = s.finish();
        assert!(
            log.contains("unconfirmed_crossings=0"),
            "{mode:?}: the kernel total crossed 200 MiB: {log}"
        );
    }
}

/// The other side of charging a forked child only its growth: children
/// that write to the pages they share with their parent get their own
/// copies without any counter moving (60 MiB becomes 240). The tree is
/// still caught going over 150 MiB, by the exact reading of trees whose
/// processes share pages.
#[test]
fn prefork_children_writing_their_pages_are_caught() {
    for mode in tree_modes("prefork_children_writing_their_pages_are_caught") {
        let steps = ["prefork-write", "60", "3", "wait-stdin"];
        let s = Scenario::start(mode, &steps, "150MiB", &[]);
        let line = s.expect_memory("memory_over_limit", Duration::from_secs(4));
        assert!(bytes(&line) >= 150 * MIB, "{mode:?}: {line}");
        assert_eq!(line["members"], 4, "{mode:?}: {line}");
        // Re-armed by `watch`, it waits to fall below the re-arm level by
        // the same exact reading: no crossing again every second.
        if let Some(again) = s.next_memory(Duration::from_millis(2500)) {
            panic!("{mode:?}: a second memory event while still over: {again}");
        }
        s.finish();
    }
}

/// Regression: a process of 80 MiB starting short children, as
/// Python's `subprocess.run` does (fork children lingering before exec,
/// and posix_spawn children sharing its mm until exec), is never over a
/// 120 MiB limit; when it then grows past the limit on its own, that is
/// the first crossing, of one process.
#[test]
fn a_spawning_process_is_not_charged_for_its_children() {
    for mode in tree_modes("a_spawning_process_is_not_charged_for_its_children") {
        let dir = TempDir::new("spawn-loop");
        let done = dir.path().join("done");
        let steps = [
            "alloc",
            "80",
            "spawn-loop",
            "100",
            "touch",
            done.to_str().unwrap(),
            "alloc",
            "60",
            "wait-stdin",
        ];
        let s = Scenario::start(mode, &steps, "120MiB", &[]);
        let line = s.expect_memory("memory_over_limit", Duration::from_secs(20));
        assert!(
            done.exists(),
            "{mode:?}: confirmed over at {} MiB while starting children: {line}",
            bytes(&line) / MIB
        );
        assert!(bytes(&line) < 150 * MIB, "{mode:?}: {line}");
        assert_eq!(line["members"], 1, "{mode:?}: {line}");
        s.finish();
    }
}

/// Regression: shared memory touched by four processes is
/// charged once by the exact reading (no crossing of 128 MiB by 64 MiB of
/// pages), although the kernel's running total counts it in each (256
/// MiB): that kernel crossing stays unconfirmed, and is re-read with
/// backoff, not every 10 ms (about 250 times in 2.5 s).
#[test]
fn unconfirmed_crossings_back_off() {
    for mode in tree_modes("unconfirmed_crossings_back_off") {
        let steps = ["shared-fork", "64", "3", "wait-stdin"];
        let s = Scenario::start(mode, &steps, "128MiB", &[]);
        if let Some(line) = s.next_memory(Duration::from_millis(2500)) {
            panic!("{mode:?}: 64 MiB of shared pages confirmed over 128 MiB: {line}");
        }
        let log = s.finish();
        if mode == Mode::Ebpf {
            let stat = |name: &str| -> u64 {
                let at = log
                    .rfind(&format!("{name}="))
                    .unwrap_or_else(|| panic!("no {name} in {log}"));
                log[at + name.len() + 1..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            assert!(
                stat("unconfirmed_crossings") >= 1,
                "the kernel total did not cross: {log}"
            );
            let rechecks = stat("rechecks");
            assert!(
                (1..=20).contains(&rechecks),
                "{rechecks} rechecks in 2.5 s: {log}"
            );
        }
    }
}

/// Regression: with the exit program of kernels before 6.16 (forced
/// here), each process is reported exactly once, though several of its
/// threads can see `signal->live == 0`: 64 threads exiting at once
/// (exit_group), and many rounds of 4 (where the last two threads most
/// often exit side by side on two CPUs: about 1.7% of rounds were reported
/// twice before), for a watched tree and for `audit --all`.
#[test]
fn legacy_exit_reports_each_process_once() {
    if !privileged("legacy_exit_reports_each_process_once") {
        return;
    }
    let storms: [(&str, usize); 2] = [("64", 200), ("4", 3000)];
    let legacy = ("WATCHDOG_FORCE_LEGACY_EXIT", "1");
    for audit_all in [false, true] {
        let (wd, mut helper) = if audit_all {
            let mut wd = Watchdog::spawn(
                Command::new(watchdog_bin())
                    .args(["audit", "--all"])
                    .env(legacy.0, legacy.1),
                watchdog_tests::READY,
            );
            wd.wait_ready(Duration::from_secs(15));
            let mut helper = Command::new(HELPER);
            for (threads, rounds) in storms {
                helper.args(["thread-storm", threads, &rounds.to_string()]);
            }
            (wd, helper.spawn().unwrap())
        } else {
            let mut steps = vec![];
            let rounds: Vec<String> = storms.iter().map(|(_, r)| r.to_string()).collect();
            for ((threads, _), rounds) in storms.iter().zip(&rounds) {
                steps.extend(["thread-storm", threads, rounds]);
            }
            let s = Scenario::start_with(Mode::Ebpf, &steps, "1GiB", &[], &[legacy]);
            (s.wd, s.helper)
        };
        let pid = u64::from(helper.id());
        assert!(helper.wait().unwrap().success());
        let lines = wd.lines_within(Duration::from_secs(1));
        // pid -> when last reported; a pid reported twice within 100 ms is
        // one process reported twice (pids are reused in a run this long).
        let mut last: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        let (mut exits, mut twice) = (0, 0);
        for line in lines
            .iter()
            .filter(|l| l["event"] == "exited" && l["ppid"] == pid)
        {
            assert_eq!(line["exit_code"], 7, "{line}");
            exits += 1;
            let at = line["monotonic_ns"].as_u64().unwrap();
            if let Some(before) = last.insert(line["pid"].as_u64().unwrap(), at)
                && at - before < 100_000_000
            {
                twice += 1;
            }
        }
        assert!(wd.log().contains(legacy.0), "{}", wd.log());
        assert_eq!(
            twice, 0,
            "audit --all {audit_all}: processes reported twice"
        );
        let rounds: usize = storms.iter().map(|(_, r)| r).sum();
        assert_eq!(
            exits, rounds,
            "audit --all {audit_all}: one line per process"
        );
    }
}

/// Regression: a reader stalled through a fork storm loses
/// events (the ring buffer is full), and the group crosses its limit while
/// the buffer is still full. The crossing that could not be reported must
/// not leave the group disarmed: the sensor reports the loss in its stream
/// (`ringbuf_full`, with counts), resynchronises its groups from /proc,
/// and so finds and reports the crossing.
#[test]
fn lost_events_are_reported_and_resynchronised() {
    if !privileged("lost_events_are_reported_and_resynchronised") {
        return;
    }
    let dir = TempDir::new("lost");
    let done = dir.path().join("done");
    let steps = [
        "wait-stdin",
        "fork-storm",
        // A fork and an exit event each: 20,000 events, more than the
        // ring buffer holds (1 MiB of 80-byte records, 13,107).
        "10000",
        "alloc",
        "48",
        "touch",
        done.to_str().unwrap(),
        "wait-stdin",
    ];
    let mut s = Scenario::start(Mode::Ebpf, &steps, "32MiB", &[]);
    let wd = s.wd.pid() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(wd, libc::SIGSTOP) };
    s.send_line();
    // Only a bound on a hang: 10,000 forks take a minute or more under emulation.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done.exists() {
        assert!(Instant::now() < deadline, "the fork storm did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(wd, libc::SIGCONT) };
    let line = s.expect_memory("memory_over_limit", Duration::from_secs(10));
    assert!(bytes(&line) >= 32 * MIB, "{line}");
    let log = s.finish();
    assert!(log.contains("counter=\"ringbuf_full\""), "{log}");
    assert!(log.contains("resyncs=1"), "{log}");
}
