//! Exit storms: processes forking children that exit at once, one per
//! CPU, as fast as the machine allows, for a fixed time; with
//! `watchdog audit --all` writing every exit, and with the same storm as a
//! supervised service. Exits made against exit lines written, the kernel's
//! losses, and the daemon's CPU.

use std::{
    collections::HashSet,
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    Bench,
    util::{Daemon, cpu_ns},
};

pub struct Storm {
    pub seconds: f64,
    /// Processes that exited: the forkers' children and the forkers.
    pub exits: u64,
    /// Exit lines written for them (`audit --all`); None where the command
    /// writes no line per exit (`supervise` logs its service's runs).
    pub lines: Option<u64>,
    /// What the kernel programs reported lost (`events_lost` counts).
    pub lost: u64,
    /// The daemon's CPU time over the storm, in ns.
    pub cpu_ns: u64,
}

impl Storm {
    pub fn rate(&self) -> f64 {
        self.exits as f64 / self.seconds
    }
}

fn cpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// "forks N" from each forker.
fn forks(output: &str) -> u64 {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("forks ")?.trim().parse::<u64>().ok())
        .sum()
}

fn losses(lines: &[serde_json::Value]) -> u64 {
    lines
        .iter()
        .filter(|v| v["event"] == "events_lost")
        .filter_map(|v| v["count"].as_u64())
        .sum()
}

impl Bench {
    /// The storm with `watchdog audit --all` running.
    pub fn storm_audit(&self, length: Duration) -> Result<Storm> {
        let mut cmd = Command::new(&self.watchdog);
        cmd.args(["audit", "--all"]);
        let mut daemon = Daemon::start_until(cmd, "streaming exit events")?;
        let before = cpu_ns(daemon.pid())?;
        let started = Instant::now();
        let forkers: Vec<_> = (0..cpus())
            .map(|_| {
                Command::new(&self.helper)
                    .args(["fork-for", &length.as_millis().to_string()])
                    .stdout(Stdio::piped())
                    .spawn()
            })
            .collect::<Result<_, _>>()
            .context("failed to start the forkers")?;
        let pids: HashSet<u64> = forkers.iter().map(|c| u64::from(c.id())).collect();
        let mut made = 0;
        for forker in forkers {
            let out = forker.wait_with_output()?;
            made += forks(&String::from_utf8_lossy(&out.stdout)) + 1;
        }
        let seconds = started.elapsed().as_secs_f64();
        // What was sent is read and written by now, or lost.
        thread::sleep(Duration::from_millis(1500));
        let cpu = cpu_ns(daemon.pid())?.saturating_sub(before);
        let lines = daemon.stop()?;
        let written = lines
            .iter()
            .filter(|v| v["event"] == "exited")
            .filter(|v| {
                v["pid"].as_u64().is_some_and(|p| pids.contains(&p))
                    || v["ppid"].as_u64().is_some_and(|p| pids.contains(&p))
            })
            .count() as u64;
        Ok(Storm {
            seconds,
            exits: made,
            lines: Some(written),
            lost: losses(&lines),
            cpu_ns: cpu,
        })
    }

    /// The storm as a service under `watchdog supervise` (its tree is
    /// tracked: every fork and exit goes through the kernel programs'
    /// watched path).
    pub fn storm_supervised(&self, length: Duration) -> Result<Storm> {
        let dir = std::env::temp_dir().join(format!(
            "watchdog-bench-storm-{}-{}",
            std::process::id(),
            self.next_id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let log = dir.join("audit.jsonl");
        let out = dir.join("forks");
        // The service: one forker per CPU, their counts in a file.
        let mut child = Command::new(&self.watchdog)
            .args(["supervise", "--sensor", "ebpf", "--restart", "never"])
            .args(["--max-rss", "1GiB", "--audit-log"])
            .arg(&log)
            .arg("--")
            .arg(&self.helper)
            .args([
                "fork-for-all",
                &length.as_millis().to_string(),
                &cpus().to_string(),
            ])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start watchdog supervise")?;
        let supervisor = child.id();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !fs::read_to_string(&log).is_ok_and(|t| t.contains("\"event\":\"started\"")) {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("the supervised storm did not start");
            }
            thread::sleep(Duration::from_millis(10));
        }
        let before = cpu_ns(supervisor)?;
        let mut cpu = 0;
        let started = Instant::now();
        let status = loop {
            // Its CPU time up to its end, as last seen.
            if let Ok(now) = cpu_ns(supervisor) {
                cpu = now.saturating_sub(before);
            }
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > length + Duration::from_secs(60) {
                let _ = child.kill();
                bail!("the supervised storm did not end");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            bail!("watchdog supervise exited with {status}");
        }
        let made = forks(&fs::read_to_string(&out).unwrap_or_default()) + cpus() as u64 + 1;
        let lines: Vec<serde_json::Value> = fs::read_to_string(&log)?
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let _ = fs::remove_dir_all(&dir);
        Ok(Storm {
            seconds,
            exits: made,
            lines: None,
            lost: losses(&lines),
            cpu_ns: cpu,
        })
    }
}
