//! Detection latency (a worker's crossing -> the daemon's confirmed
//! event), idle or with every CPU busy, and the supervisor's reaction
//! (confirmed crossing -> drain, exit -> respawn).

use std::{
    fs,
    io::Write,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::{
    Bench, LATENCY_LIMIT_MIB, Sensor,
    util::{lines, seconds_of_day},
};

/// Latencies in microseconds, sorted.
pub struct Latency {
    /// Worker's crossing write -> daemon's confirmed event.
    pub from_write: Vec<f64>,
    /// Kernel's crossing -> daemon's confirmed event (eBPF only).
    pub from_kernel: Vec<f64>,
}

/// What runs beside the worker and the daemon.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Load {
    Idle,
    /// A CPU hog on every CPU; the daemon at its default priority.
    Busy,
    /// The same, the daemon's event loop SCHED_FIFO (`--realtime`).
    BusyRealtime,
}

/// A busy loop on every CPU, at the default priority; killed on drop.
struct Hogs(Vec<Child>);

impl Hogs {
    fn start(helper: &Path) -> Result<Self> {
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        // Pushed one by one: those started are killed if a later one fails.
        let mut hogs = Self(Vec::new());
        for _ in 0..cpus {
            hogs.0.push(
                Command::new(helper)
                    .args(["spin", "600000"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .context("failed to start a CPU hog")?,
            );
        }
        Ok(hogs)
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for hog in &mut self.0 {
            let _ = hog.kill();
            let _ = hog.wait();
        }
    }
}

impl Bench {
    /// `cycles` crossings of a worker's limit, each reported by the
    /// daemon; with `busy`, a CPU hog on every CPU meanwhile.
    pub fn latency(&self, sensor: Sensor, cycles: usize, load: Load) -> Result<Latency> {
        let busy = load != Load::Idle;
        let (hold, rest) = match sensor {
            Sensor::Ebpf => (30, 20),
            Sensor::Sampling(every) => {
                let ms = every.as_millis() as u64;
                (ms * 3 / 2, ms * 3 / 2)
            }
        };
        let mut worker = Command::new(&self.helper)
            .args(["wait-stdin", "cross-cycles"])
            .args([
                cycles.to_string(),
                LATENCY_LIMIT_MIB.to_string(),
                hold.to_string(),
                rest.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("failed to start the worker")?;
        let limit = format!("{LATENCY_LIMIT_MIB}MiB");
        let extra: &[&str] = if load == Load::BusyRealtime {
            &["--realtime"]
        } else {
            &[]
        };
        let mut daemon = self.watch_with(sensor, &[worker.id()], &limit, "32MiB", extra)?;
        let hogs = if busy {
            Some(Hogs::start(&self.helper)?)
        } else {
            None
        };
        let crosses = lines(worker.stdout.take().context("piped")?);
        worker
            .stdin
            .take()
            .context("piped")?
            .write_all(b"\n")
            .context("failed to start the worker")?;
        let status = worker.wait()?;
        drop(hogs);
        if !status.success() {
            bail!("the latency worker failed: {status}");
        }
        // The last event may still be on its way.
        thread::sleep(Duration::from_millis(200));
        let events = daemon.stop()?;
        let crosses: Vec<u64> = crosses
            .try_iter()
            .filter_map(|l| l.strip_prefix("cross ")?.trim().parse().ok())
            .collect();
        // (sensed, confirmed, from a kernel crossing): one found by an
        // exact reading alone (a near check) has no trigger pid, and its
        // sensed time is its confirmation's.
        let over: Vec<(u64, u64, bool)> = events
            .iter()
            .filter(|e| e["event"] == "memory_over_limit")
            .filter_map(|e| {
                Some((
                    e["sensed_monotonic_ns"].as_u64()?,
                    e["confirmed_monotonic_ns"].as_u64()?,
                    e["trigger_pid"].as_u64().is_some(),
                ))
            })
            .collect();
        let mut from_write = Vec::new();
        let mut from_kernel = Vec::new();
        for (i, &at) in crosses.iter().enumerate() {
            let next = crosses.get(i + 1).copied().unwrap_or(u64::MAX);
            // The event for this crossing: the first confirmed after the
            // write, before the next crossing's write.
            if let Some(&(sensed, confirmed, kernel)) = over
                .iter()
                .find(|&&(_, confirmed, _)| confirmed >= at && confirmed < next)
            {
                from_write.push((confirmed - at) as f64 / 1000.0);
                if matches!(sensor, Sensor::Ebpf) && kernel {
                    from_kernel.push(confirmed.saturating_sub(sensed) as f64 / 1000.0);
                }
            }
        }
        if from_write.len() < cycles * 9 / 10 {
            bail!(
                "only {} of {} crossings were reported; daemon log:\n{}",
                from_write.len(),
                crosses.len(),
                daemon.log()
            );
        }
        from_write.sort_by(f64::total_cmp);
        from_kernel.sort_by(f64::total_cmp);
        Ok(Latency {
            from_write,
            from_kernel,
        })
    }
}

/// Supervisor reaction times in microseconds, sorted.
pub struct Reaction {
    /// memory_over_limit -> drain_started (the drain signal follows at once).
    pub to_drain: Vec<f64>,
    /// exited -> started.
    pub to_respawn: Vec<f64>,
}

impl Bench {
    /// A leaker under `watchdog supervise` for a few seconds: every run
    /// crosses the limit, is drained and respawned; the audit log's
    /// timestamps give the reaction times.
    pub fn reaction(&self) -> Result<Reaction> {
        let dir = std::env::temp_dir().join(format!("watchdog-bench-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let log = dir.join("audit.jsonl");
        let mut child = Command::new(&self.watchdog)
            .args([
                "supervise",
                "--sensor",
                "ebpf",
                "--max-rss",
                "32MiB",
                "--grace",
                "5s",
            ])
            .args(["--clean-budget", "100000", "--audit-log"])
            .arg(&log)
            .arg("--")
            .arg(&self.helper)
            .args(["leak", "48", "1", "sleep", "100000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start watchdog supervise")?;
        thread::sleep(self.settings.reaction);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait()?;
        let text = fs::read_to_string(&log)?;
        let _ = fs::remove_dir_all(&dir);
        let lines: Vec<(String, f64)> = text
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                Some((
                    v["event"].as_str()?.to_owned(),
                    seconds_of_day(v["ts"].as_str()?)?,
                ))
            })
            .collect();
        let mut to_drain = Vec::new();
        let mut to_respawn = Vec::new();
        for pair in lines.windows(2) {
            let ((a, ta), (b, tb)) = (&pair[0], &pair[1]);
            let us = (tb - ta).rem_euclid(86_400.0) * 1e6;
            match (a.as_str(), b.as_str()) {
                ("memory_over_limit", "drain_started") => to_drain.push(us),
                ("exited", "started") => to_respawn.push(us),
                _ => {}
            }
        }
        let least = self.settings.reaction.as_secs() as usize * 2;
        if to_drain.len() < least || to_respawn.len() < least {
            bail!(
                "too few drains ({}) or respawns ({}) in {:?}",
                to_drain.len(),
                to_respawn.len(),
                self.settings.reaction
            );
        }
        to_drain.sort_by(f64::total_cmp);
        to_respawn.sort_by(f64::total_cmp);
        Ok(Reaction {
            to_drain,
            to_respawn,
        })
    }
}
