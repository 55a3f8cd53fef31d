//! The cost the kernel programs add to every process on the host, as
//! interleaved pairs: a baseline without the daemon (A) and the same work
//! with it watching 1,000 processes (B), alternating A B, B A, ... so that
//! a drift of the machine falls on both sides of each pair; the figure is
//! the median of the per-pair ratios, with their spread. Then, in a run of
//! its own (the statistics cost time themselves), what the kernel says
//! each program costs per invocation.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result};

use super::{Bench, Sensor, util::sorted};

/// A/B values, one of each per pair.
#[derive(Default)]
pub struct Pairs {
    pub baseline: Vec<f64>,
    pub treatment: Vec<f64>,
}

/// Order statistics of a pairs' ratios (treatment / baseline).
pub struct Ratio {
    pub median: f64,
    pub p25: f64,
    pub p75: f64,
    pub min: f64,
    pub max: f64,
}

impl Pairs {
    fn push(&mut self, baseline: f64, treatment: f64) {
        self.baseline.push(baseline);
        self.treatment.push(treatment);
    }

    pub fn len(&self) -> usize {
        self.baseline.len()
    }

    pub fn ratio(&self) -> Ratio {
        let r = sorted(
            self.baseline
                .iter()
                .zip(&self.treatment)
                .map(|(b, t)| t / b)
                .collect(),
        );
        let at = |p: f64| super::util::percentile(&r, p);
        Ratio {
            median: at(0.5),
            p25: at(0.25),
            p75: at(0.75),
            min: r[0],
            max: r[r.len() - 1],
        }
    }

    pub fn baseline_median(&self) -> f64 {
        super::util::median(&sorted(self.baseline.clone()))
    }

    pub fn treatment_median(&self) -> f64 {
        super::util::median(&sorted(self.treatment.clone()))
    }
}

/// What the interleaved pairs measured.
pub struct HostCost {
    /// ns per page fault with only a program that returns at once on
    /// rss_stat: the tracepoint's own dispatch, the floor under any
    /// program there.
    pub fault_floor: Pairs,
    /// ns per page fault: a process the daemon does not watch (while it
    /// watches 1,000 others).
    pub fault_unwatched: Pairs,
    /// ns per page fault: a process the daemon watches.
    pub fault_watched: Pairs,
    /// ns per fork + exec + exit of an unwatched process.
    pub lifecycle: Pairs,
    /// The kernel's own figures per program and phase.
    pub programs: Vec<ProgramCost>,
    pub faults_per_run: u64,
}

/// One program's invocations in one phase of the statistics run.
pub struct ProgramCost {
    pub program: String,
    pub phase: &'static str,
    pub count: u64,
    pub ns: u64,
}

impl ProgramCost {
    pub fn per_call(&self) -> f64 {
        self.ns as f64 / self.count.max(1) as f64
    }
}

/// The daemon's programs, by the names the kernel keeps (15 characters).
const PROGRAMS: &[&str] = &[
    "rss_stat",
    "rss_stat_null",
    "rss_stat_btf",
    "sched_process_e",
    "sched_process_f",
    "mark_victim",
    "mark_victim_pid",
];

impl Bench {
    /// A fault-bench worker held until a line on its stdin.
    fn held_worker(&self) -> Result<Child> {
        Command::new(&self.helper)
            .arg("wait-stdin")
            .args(self.fault_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("failed to start a fault worker")
    }

    fn fault_args(&self) -> [String; 3] {
        [
            "fault-bench".into(),
            FAULT_MIB.to_string(),
            self.settings.fault_rounds.to_string(),
        ]
    }

    /// ns per fault, the best round of a run: a fresh worker, or a held
    /// (watched) one let go.
    fn fault_run(&self, held: Option<&mut Child>) -> Result<f64> {
        let output = match held {
            Some(worker) => {
                worker.stdin.take().context("piped")?.write_all(b"\n")?;
                let mut out = String::new();
                BufReader::new(worker.stdout.take().context("piped")?).read_line(&mut out)?;
                worker.wait()?;
                out
            }
            None => {
                let out = Command::new(&self.helper)
                    .args(self.fault_args())
                    .output()
                    .context("failed to run the fault benchmark")?;
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
        };
        output
            .split_whitespace()
            .find_map(|w| w.strip_prefix("min_ns=")?.parse().ok())
            .with_context(|| format!("unexpected fault-bench output {output:?}"))
    }

    /// ns per fork + exec + exit.
    fn lifecycle_run(&self) -> Result<f64> {
        let out = Command::new(&self.helper)
            .args([
                "lifecycle-bench",
                &self.settings.lifecycle_iterations.to_string(),
            ])
            .output()
            .context("failed to run the lifecycle benchmark")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .find_map(|w| w.strip_prefix("ns=")?.parse().ok())
            .with_context(|| format!("unexpected lifecycle-bench output {text:?}"))
    }

    pub fn host_cost(&self, idle: &[u32]) -> Result<HostCost> {
        let mut cost = HostCost {
            fault_floor: Pairs::default(),
            fault_unwatched: Pairs::default(),
            fault_watched: Pairs::default(),
            lifecycle: Pairs::default(),
            programs: Vec::new(),
            faults_per_run: FAULT_MIB * 256,
        };
        for pair in 0..self.settings.pairs {
            // A (baseline), B (the daemon), C (the empty program), in
            // that order in even pairs and reversed in odd ones.
            let forward = pair % 2 == 0;
            let mut a = None;
            let mut c = None;
            if forward {
                a = Some((self.fault_run(None)?, self.lifecycle_run()?));
            } else {
                c = Some(self.floor_run()?);
            }
            let mut worker = self.held_worker()?;
            let mut pids = idle.to_vec();
            pids.push(worker.id());
            let mut daemon = self.watch(Sensor::Ebpf, &pids, "1TiB", "1GiB")?;
            let unwatched = self.fault_run(None)?;
            let watched = self.fault_run(Some(&mut worker))?;
            let life = self.lifecycle_run()?;
            daemon.stop()?;
            let floor = match c {
                Some(c) => c,
                None => self.floor_run()?,
            };
            let (base_fault, base_life) = match a {
                Some(a) => a,
                None => (self.fault_run(None)?, self.lifecycle_run()?),
            };
            cost.fault_floor.push(base_fault, floor);
            cost.fault_unwatched.push(base_fault, unwatched);
            cost.fault_watched.push(base_fault, watched);
            cost.lifecycle.push(base_life, life);
            println!(
                "bench: pair {}/{}: fault {base_fault:.0} ns -> {unwatched:.0} ns unwatched, \
                 {watched:.0} ns watched, {floor:.0} ns with an empty program; lifecycle \
                 {:.0} us -> {:.0} us",
                pair + 1,
                self.settings.pairs,
                base_life / 1000.0,
                life / 1000.0
            );
        }
        cost.programs = self.program_costs(idle)?;
        Ok(cost)
    }

    /// The same B side once more, with the kernel's run-time statistics on
    /// (BPF_ENABLE_STATS, i.e. kernel.bpf_stats_enabled, off again when
    /// its descriptor closes): each program's invocations and time, phase
    /// by phase.
    fn program_costs(&self, idle: &[u32]) -> Result<Vec<ProgramCost>> {
        let mut worker = self.held_worker()?;
        let mut pids = idle.to_vec();
        pids.push(worker.id());
        let mut daemon = self.watch(Sensor::Ebpf, &pids, "1TiB", "1GiB")?;
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("failed to turn on the kernel's BPF run-time statistics")?;
        let mut phases = Vec::new();
        let mut last = snapshot()?;
        self.fault_run(None)?;
        record(&mut phases, "page faults, unwatched process", &mut last)?;
        self.fault_run(Some(&mut worker))?;
        record(&mut phases, "page faults, watched process", &mut last)?;
        self.lifecycle_run()?;
        record(
            &mut phases,
            "fork + exec + exit, unwatched process",
            &mut last,
        )?;
        daemon.stop()?;
        let floor = Floor::attach(&self.object)?;
        let mut last = snapshot()?;
        self.fault_run(None)?;
        record(
            &mut phases,
            "page faults, the empty program alone",
            &mut last,
        )?;
        drop(floor);
        drop(stats);
        Ok(phases)
    }

    /// ns per page fault with only the empty program attached.
    fn floor_run(&self) -> Result<f64> {
        let _floor = Floor::attach(&self.object)?;
        self.fault_run(None)
    }
}

/// The kernel object's `rss_stat_null`, attached alone; detached on drop.
struct Floor {
    _ebpf: aya::Ebpf,
}

impl Floor {
    fn attach(object: &std::path::Path) -> Result<Self> {
        let mut ebpf = aya::Ebpf::load_file(object)
            .with_context(|| format!("failed to load {}", object.display()))?;
        let btf = aya::Btf::from_sys_fs().context("failed to read the kernel's BTF")?;
        let program: &mut aya::programs::BtfTracePoint = ebpf
            .program_mut("rss_stat_null")
            .context("the kernel object has no rss_stat_null program")?
            .try_into()
            .context("rss_stat_null is not a BTF tracepoint")?;
        program
            .load("rss_stat", &btf)
            .context("failed to load rss_stat_null")?;
        program.attach().context("failed to attach rss_stat_null")?;
        Ok(Self { _ebpf: ebpf })
    }
}

/// 64 MiB per round: 16,384 faults.
const FAULT_MIB: u64 = 64;

type Snapshot = BTreeMap<u32, (String, u64, u64)>;

/// Adds what each program did since `last` as `phase`, and moves `last`.
fn record(phases: &mut Vec<ProgramCost>, phase: &'static str, last: &mut Snapshot) -> Result<()> {
    let now = snapshot()?;
    for (id, (program, count, ns)) in &now {
        let (c0, n0) = last.get(id).map_or((0, 0), |&(_, c, n)| (c, n));
        if *count > c0 {
            phases.push(ProgramCost {
                program: program.clone(),
                phase,
                count: count - c0,
                ns: ns.saturating_sub(n0),
            });
        }
    }
    *last = now;
    Ok(())
}

/// The daemon's programs now loaded: id -> (name, runs, ns).
fn snapshot() -> Result<Snapshot> {
    let mut out = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("failed to list the loaded BPF programs")?;
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if !PROGRAMS.contains(&name) {
            continue;
        }
        out.insert(
            info.id(),
            (
                name.to_owned(),
                info.run_count(),
                info.run_time().as_nanos() as u64,
            ),
        );
    }
    Ok(out)
}
