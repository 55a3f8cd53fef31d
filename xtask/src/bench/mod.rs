//! `cargo xtask bench`: the performance figures, each against a baseline
//! measured in the same run, written to BENCHMARKS.md.
//!
//! 1. Host cost (`pairs`): page faults of an unwatched and of a watched
//!    process, and fork + exec + exit of an unwatched one, without the
//!    daemon and with it watching 1,000 processes, in interleaved pairs;
//!    then the kernel's own per-program figures.
//! 2. Detection latency (`latency`): eBPF vs the sampler at 100 ms and
//!    1 s; eBPF again with a CPU hog on every CPU.
//! 3. Supervisor reaction: confirmed crossing -> drain, exit -> respawn.
//! 4. Overshoot (`overshoot`): a worker racing past 256 MiB, eBPF vs
//!    sampling at 100 ms; and past a hard limit.
//! 5. Exit storms (`storm`): `audit --all` and a supervised storm.
//! 6. Idle cost and memory: daemon CPU over a window with 1,000 idle
//!    processes watched, eBPF vs sampling at 1 Hz; RssAnon and VmRSS.
//!
//! Everything runs at pid_max 4194304 (systemd's default), set for the run
//! and restored after it.

mod latency;
mod overshoot;
mod pairs;
mod report;
mod storm;
mod util;

use std::{
    cell::Cell,
    fs,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Project, is_root, run};
use latency::Load;
use util::{Daemon, Idle, cpu_ns, memory, raise_nofile};

const IDLE_PROCESSES: usize = 1000;
const LATENCY_LIMIT_MIB: u64 = 64;
/// The pid_max the figures are measured at, as systemd sets it.
const PID_MAX: u64 = 4_194_304;

/// How much of everything a run does.
pub struct Settings {
    pub quick: bool,
    /// Interleaved A/B pairs of the host-cost figures.
    pub pairs: usize,
    /// Rounds of 64 MiB per page-fault run (the best one counts).
    pub fault_rounds: usize,
    /// fork + exec + exit per lifecycle run.
    pub lifecycle_iterations: usize,
    pub ebpf_crossings: usize,
    pub sampling_crossings: usize,
    /// Crossings with the sampler at 1 s (0: not measured).
    pub slow_sampling_crossings: usize,
    pub overshoot_runs: usize,
    pub sampling_overshoot_runs: usize,
    pub storm: Duration,
    pub reaction: Duration,
    pub idle_window: Duration,
}

impl Settings {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                pairs: 5,
                fault_rounds: 4,
                lifecycle_iterations: 150,
                ebpf_crossings: 60,
                sampling_crossings: 10,
                slow_sampling_crossings: 0,
                overshoot_runs: 8,
                sampling_overshoot_runs: 4,
                storm: Duration::from_secs(3),
                reaction: Duration::from_secs(4),
                idle_window: Duration::from_secs(5),
            }
        } else {
            Self {
                quick,
                pairs: 30,
                fault_rounds: 16,
                lifecycle_iterations: 400,
                ebpf_crossings: 200,
                sampling_crossings: 50,
                slow_sampling_crossings: 50,
                overshoot_runs: 30,
                sampling_overshoot_runs: 15,
                storm: Duration::from_secs(10),
                reaction: Duration::from_secs(10),
                idle_window: Duration::from_secs(20),
            }
        }
    }
}

pub fn bench(project: &Project, quick: bool) -> Result<()> {
    if !is_root() {
        bail!("the benchmarks load the kernel programs: run `cargo xtask bench` as root");
    }
    let started = Instant::now();
    project.setup()?;
    let watchdog = project.build()?;
    run(Command::new("cargo").current_dir(&project.root).args([
        "build",
        "--release",
        "--package",
        "watchdog-tests",
        "--bin",
        "wd-helper",
    ]))?;
    raise_nofile();
    let settings = Settings::new(quick);
    let b = Bench {
        watchdog,
        helper: project.root.join("target/release/wd-helper"),
        object: project.ebpf_object(),
        settings,
        ids: Cell::new(0),
    };
    // Before any daemon starts: the programs size their filter by it.
    let pid_max = PidMax::set(PID_MAX)?;
    let s = &b.settings;

    println!("bench: starting {IDLE_PROCESSES} idle processes");
    let idle = Idle::start(&b.helper, IDLE_PROCESSES)?;
    println!(
        "bench: host cost, {} interleaved pairs (without / with the daemon)",
        s.pairs
    );
    let host = b.host_cost(&idle.pids())?;
    println!("bench: idle cost and memory");
    let ebpf_idle = b.idle(&idle, None)?;
    let sampling_idle = b.idle(&idle, Some(Duration::from_secs(1)))?;
    drop(idle);

    println!("bench: detection latency (eBPF)");
    let ebpf = b.latency(Sensor::Ebpf, s.ebpf_crossings, Load::Idle)?;
    println!("bench: detection latency (eBPF, every CPU busy)");
    let busy = b.latency(Sensor::Ebpf, s.ebpf_crossings, Load::Busy)?;
    println!("bench: detection latency (eBPF, every CPU busy, --realtime)");
    let busy_rt = b.latency(Sensor::Ebpf, s.ebpf_crossings, Load::BusyRealtime)?;
    println!("bench: detection latency (sampling every 100 ms)");
    let s100 = b.latency(
        Sensor::Sampling(Duration::from_millis(100)),
        s.sampling_crossings,
        Load::Idle,
    )?;
    let s1 = if s.slow_sampling_crossings > 0 {
        println!("bench: detection latency (sampling every 1 s)");
        Some(b.latency(
            Sensor::Sampling(Duration::from_secs(1)),
            s.slow_sampling_crossings,
            Load::Idle,
        )?)
    } else {
        None
    };
    println!("bench: supervisor reaction (drain and respawn)");
    let reaction = b.reaction()?;

    println!("bench: overshoot past {} MiB", overshoot::LIMIT_MIB);
    let sampler = Sensor::Sampling(Duration::from_millis(100));
    let over_ebpf = b.overshoot(Sensor::Ebpf, overshoot::Limit::Soft, s.overshoot_runs)?;
    let over_sampling = b.overshoot(sampler, overshoot::Limit::Soft, s.sampling_overshoot_runs)?;
    let hard_ebpf = b.overshoot(Sensor::Ebpf, overshoot::Limit::Hard, s.overshoot_runs)?;
    let hard_sampling = b.overshoot(sampler, overshoot::Limit::Hard, s.sampling_overshoot_runs)?;

    println!("bench: exit storms ({} s each)", s.storm.as_secs());
    let storm_audit = b.storm_audit(s.storm)?;
    let storm_supervised = b.storm_supervised(s.storm)?;
    drop(pid_max);

    let report = report::Report {
        settings: &b.settings,
        forms: forms(&b.watchdog),
        host,
        ebpf,
        busy,
        busy_rt,
        s100,
        s1,
        reaction,
        over_ebpf,
        over_sampling,
        hard_ebpf,
        hard_sampling,
        storm_audit,
        storm_supervised,
        ebpf_idle,
        sampling_idle,
    }
    .markdown(started.elapsed());
    println!("\n{report}");
    let path = if quick {
        project.root.join("target/BENCHMARKS.quick.md")
    } else {
        project.root.join("BENCHMARKS.md")
    };
    fs::write(&path, &report).with_context(|| format!("failed to write {}", path.display()))?;
    println!(
        "bench: wrote {} in {} s",
        path.display(),
        started.elapsed().as_secs()
    );
    Ok(())
}

/// Which form of each kernel program the figures were measured with.
fn forms(watchdog: &std::path::Path) -> String {
    Command::new(watchdog)
        .args(["version", "--verbose"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("kernel programs: ").map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// /proc/sys/kernel/pid_max set for the run, restored on drop.
struct PidMax {
    was: String,
}

const PID_MAX_PATH: &str = "/proc/sys/kernel/pid_max";

/// The value to restore, for the signal handler.
static SAVED_TEXT: [std::sync::atomic::AtomicU8; 24] =
    [const { std::sync::atomic::AtomicU8::new(0) }; 24];
static SAVED_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// SIGINT or SIGTERM during the run: pid_max back first (atomic loads,
/// open, write and close are async-signal-safe), then the signal's
/// default action.
extern "C" fn restore_and_die(signal: libc::c_int) {
    use std::sync::atomic::Ordering::SeqCst;
    let len = SAVED_LEN.load(SeqCst).min(SAVED_TEXT.len());
    let mut text = [0u8; 24];
    for (byte, saved) in text.iter_mut().zip(&SAVED_TEXT).take(len) {
        *byte = saved.load(SeqCst);
    }
    if len > 0 {
        // SAFETY: a NUL-terminated path and a buffer of `len` bytes.
        unsafe {
            let fd = libc::open(c"/proc/sys/kernel/pid_max".as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, text.as_ptr().cast(), len);
                libc::close(fd);
            }
        }
    }
    // SAFETY: resetting and raising a signal.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

impl PidMax {
    fn set(value: u64) -> Result<Self> {
        let was = fs::read_to_string(PID_MAX_PATH)
            .with_context(|| format!("failed to read {PID_MAX_PATH}"))?;
        let text = was.trim().as_bytes();
        if text.len() <= SAVED_TEXT.len() {
            for (saved, &byte) in SAVED_TEXT.iter().zip(text) {
                saved.store(byte, std::sync::atomic::Ordering::SeqCst);
            }
            SAVED_LEN.store(text.len(), std::sync::atomic::Ordering::SeqCst);
            // SAFETY: installing a handler that only does the above.
            unsafe {
                libc::signal(
                    libc::SIGINT,
                    restore_and_die as *const () as libc::sighandler_t,
                );
                libc::signal(
                    libc::SIGTERM,
                    restore_and_die as *const () as libc::sighandler_t,
                );
            }
        }
        fs::write(PID_MAX_PATH, value.to_string())
            .with_context(|| format!("failed to set {PID_MAX_PATH} to {value}"))?;
        println!("bench: pid_max {} -> {value} for the run", was.trim());
        Ok(Self { was })
    }
}

impl Drop for PidMax {
    fn drop(&mut self) {
        match fs::write(PID_MAX_PATH, self.was.trim()) {
            Ok(()) => println!("bench: pid_max restored to {}", self.was.trim()),
            Err(e) => eprintln!(
                "bench: could not restore {PID_MAX_PATH} to {}: {e}",
                self.was.trim()
            ),
        }
    }
}

pub struct Bench {
    watchdog: PathBuf,
    helper: PathBuf,
    /// The kernel object, for the empty program the host-cost pairs attach.
    object: PathBuf,
    settings: Settings,
    ids: Cell<u32>,
}

#[derive(Clone, Copy)]
pub enum Sensor {
    Ebpf,
    Sampling(Duration),
}

impl Sensor {
    /// The options that select it (sampling at a fixed interval, no
    /// adaptive shortening).
    fn args(self) -> Vec<String> {
        match self {
            Sensor::Ebpf => vec!["--sensor".into(), "ebpf".into()],
            Sensor::Sampling(every) => {
                let every = format!("{}ms", every.as_millis());
                [
                    "--sensor",
                    "sampling",
                    "--interval",
                    &every,
                    "--min-interval",
                    &every,
                ]
                .map(str::to_owned)
                .to_vec()
            }
        }
    }
}

/// Daemon CPU and memory over a window with the idle processes watched.
pub struct IdleCost {
    pub cpu_ns: u64,
    pub rss_anon: u64,
    pub vm_rss: u64,
}

impl Bench {
    /// A number for names unique within the run.
    fn next_id(&self) -> u32 {
        let id = self.ids.get();
        self.ids.set(id + 1);
        id
    }

    fn watch(&self, sensor: Sensor, pids: &[u32], limit: &str, hysteresis: &str) -> Result<Daemon> {
        self.watch_with(sensor, pids, limit, hysteresis, &[])
    }

    fn watch_with(
        &self,
        sensor: Sensor,
        pids: &[u32],
        limit: &str,
        hysteresis: &str,
        extra: &[&str],
    ) -> Result<Daemon> {
        let mut cmd = Command::new(&self.watchdog);
        cmd.args(["watch", "--limit", limit, "--hysteresis", hysteresis]);
        cmd.args(extra);
        cmd.args(sensor.args());
        for pid in pids {
            cmd.arg("--pid").arg(pid.to_string());
        }
        Daemon::start(cmd)
    }

    fn idle(&self, idle: &Idle, sampling: Option<Duration>) -> Result<IdleCost> {
        let sensor = sampling.map_or(Sensor::Ebpf, Sensor::Sampling);
        let mut daemon = self.watch(sensor, &idle.pids(), "1TiB", "1GiB")?;
        // Let registration finish before the window opens.
        thread::sleep(Duration::from_secs(2));
        let before = cpu_ns(daemon.pid())?;
        thread::sleep(self.settings.idle_window);
        let cpu = cpu_ns(daemon.pid())?.saturating_sub(before);
        let (rss_anon, vm_rss) = memory(daemon.pid())?;
        daemon.stop()?;
        Ok(IdleCost {
            cpu_ns: cpu,
            rss_anon,
            vm_rss,
        })
    }
}
