//! What every benchmark uses: the daemon under test, idle processes to
//! watch, CPU and memory readings, and order statistics.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// `watchdog watch` running, its stdout lines collected.
pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts `watchdog watch`, ready once it says it is watching.
    pub fn start(cmd: Command) -> Result<Self> {
        Self::start_until(cmd, "watching memory")
    }

    /// Starts a watchdog command, ready once its log has a line with `ready`.
    pub fn start_until(mut cmd: Command, ready: &str) -> Result<Self> {
        let mut child = cmd
            .env("WATCHDOG_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("failed to start watchdog")?;
        let out = lines(child.stdout.take().context("piped")?);
        let log = lines(child.stderr.take().context("piped")?);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match log.recv_timeout(left) {
                Ok(line) if line.contains(ready) => break,
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(_) => {
                    let _ = child.kill();
                    bail!("watchdog did not get ready ({ready:?}):\n{seen}");
                }
            }
        }
        Ok(Self {
            child,
            lines: out,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.try_iter().collect::<Vec<_>>().join("\n")
    }

    /// SIGTERM, wait, and the JSON lines it wrote.
    pub fn stop(&mut self) -> Result<Vec<serde_json::Value>> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("watchdog exited with {status}:\n{}", self.log());
        }
        // Everything it wrote: the reader ends at the pipe's end.
        let mut out = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            if let Ok(v) = serde_json::from_str(&line) {
                out.push(v);
            }
        }
        Ok(out)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

/// Idle processes to watch, killed on drop.
pub struct Idle(Vec<Child>);

impl Idle {
    pub fn start(helper: &Path, n: usize) -> Result<Self> {
        let children = (0..n)
            .map(|_| {
                Command::new(helper)
                    .args(["sleep", "3600000"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
            })
            .collect::<Result<_, _>>()
            .context("failed to start the idle processes")?;
        Ok(Self(children))
    }

    pub fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// Reads lines on a thread, so that a full pipe never blocks the writer.
pub fn lines(source: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(source).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// CPU time of every live thread of `pid`, in ns (schedstat: exact, not
/// ticks; a thread that ended takes its time with it).
pub fn cpu_ns(pid: u32) -> Result<u64> {
    let mut total = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let text = fs::read_to_string(task?.path().join("schedstat"))?;
        total += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .context("unexpected schedstat")?;
    }
    Ok(total)
}

/// RssAnon and VmRSS of `pid`, in bytes.
pub fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(kb * 1024)
    };
    Ok((field("RssAnon:")?, field("VmRSS:")?))
}

/// Sorts in place and hands the slice back.
pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

pub fn median(sorted: &[f64]) -> f64 {
    sorted[sorted.len() / 2]
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Lets this process and its children hold the descriptors 1,000 watched
/// processes need.
pub fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// `2026-11-24T22:14:07.774317Z` -> seconds since midnight.
pub fn seconds_of_day(ts: &str) -> Option<f64> {
    let time = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}
