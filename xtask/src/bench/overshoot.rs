//! Overshoot: a worker that allocates as fast as it can (fresh pages,
//! memset) past a 256 MiB limit under `watchdog supervise`, drained and
//! respawned run after run. Per run: the bytes over the limit in the
//! reading the drain was decided on (the audit log's `drain_started`), and
//! the bytes over it when the worker stopped: its own count when SIGTERM
//! reached it, or its last count before a SIGKILL (`--hard-limit`).

use std::{
    collections::HashMap,
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{Bench, Sensor, util::sorted};

pub const LIMIT_MIB: u64 = 256;
/// The worker stops allocating here: an overshoot this large reads as
/// "at least".
pub const CAP_MIB: u64 = 1536;

/// Bytes over the limit, per run, sorted.
pub struct Overshoot {
    /// In the reading the drain (or kill) was decided on.
    pub at_signal: Vec<f64>,
    /// When the worker stopped (SIGTERM handled, or its last page before
    /// SIGKILL).
    pub peak: Vec<f64>,
}

/// What the limit is.
#[derive(Clone, Copy)]
pub enum Limit {
    /// `--max-rss 256MiB`: drained (SIGTERM).
    Soft,
    /// `--max-rss 128MiB --over-for 1h --hard-limit 256MiB`: the soft
    /// decision waits, the hard limit kills at once.
    Hard,
}

impl Bench {
    pub fn overshoot(&self, sensor: Sensor, limit: Limit, runs: usize) -> Result<Overshoot> {
        let dir = std::env::temp_dir().join(format!(
            "watchdog-bench-race-{}-{}",
            std::process::id(),
            self.next_id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let log = dir.join("audit.jsonl");
        let progress = dir.join("runs");
        fs::create_dir_all(&progress)?;
        let mut cmd = Command::new(&self.watchdog);
        cmd.arg("supervise");
        cmd.args(sensor.args());
        match limit {
            Limit::Soft => cmd.args(["--max-rss", &format!("{LIMIT_MIB}MiB")]),
            Limit::Hard => cmd.args([
                "--max-rss",
                &format!("{}MiB", LIMIT_MIB / 2),
                "--over-for",
                "1h",
                "--hard-limit",
                &format!("{LIMIT_MIB}MiB"),
            ]),
        };
        let mut child = cmd
            .args(["--grace", "5s", "--clean-budget", "100000", "--audit-log"])
            .arg(&log)
            .arg("--")
            .arg(&self.helper)
            .args(["race", &CAP_MIB.to_string()])
            .arg(&progress)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start watchdog supervise")?;
        let deadline = Instant::now() + Duration::from_secs(30 + runs as u64 * 2);
        let signalled = |text: &str| text.matches("\"event\":\"exited\"").count();
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if signalled(&text) >= runs {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "only {} of {runs} runs ended within the time allowed; audit log:\n{text}",
                    signalled(&text)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait()?;
        let text = fs::read_to_string(&log)?;
        let limit_bytes = (LIMIT_MIB << 20) as f64;
        // The reading each run's drain or kill was decided on, by pid.
        let mut decided: HashMap<u64, f64> = HashMap::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let reason_hard = v["reason"] == "hard_limit";
            let wanted = match limit {
                Limit::Soft => v["event"] == "drain_started" && v["reason"].is_null(),
                Limit::Hard => v["event"] == "memory_over_limit" && reason_hard,
            };
            if let (true, Some(pid), Some(charged)) =
                (wanted, v["pid"].as_u64(), v["charged_bytes"].as_u64())
            {
                decided.entry(pid).or_insert(charged as f64 - limit_bytes);
            }
        }
        let mut at_signal = Vec::new();
        let mut peak = Vec::new();
        for (pid, over) in decided {
            let Ok(words) = fs::read(progress.join(pid.to_string())) else {
                continue;
            };
            let word = |i: usize| {
                words
                    .get(i * 8..i * 8 + 8)
                    .map_or(0, |b| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8])))
            };
            let (base, touched, at_term) = (word(0), word(1), word(2));
            let stopped = if at_term > 0 { at_term } else { touched };
            at_signal.push(over);
            peak.push((base + stopped) as f64 - limit_bytes);
        }
        let _ = fs::remove_dir_all(&dir);
        if at_signal.len() < runs * 9 / 10 {
            bail!(
                "only {} of {runs} runs could be measured; audit log:\n{text}",
                at_signal.len()
            );
        }
        Ok(Overshoot {
            at_signal: sorted(at_signal),
            peak: sorted(peak),
        })
    }
}
