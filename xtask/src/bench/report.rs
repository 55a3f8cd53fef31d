//! BENCHMARKS.md: every figure with its same-run baseline, ratio, spread,
//! target and verdict; the kernel's per-program figures; and, for each
//! target missed, the measured figures that bound it.

use std::{fmt::Write as _, fs, process::Command, thread, time::Duration};

use super::{
    IDLE_PROCESSES, IdleCost, LATENCY_LIMIT_MIB, PID_MAX, Settings,
    latency::{Latency, Reaction},
    overshoot::{self, Overshoot},
    pairs::{HostCost, Pairs},
    storm::Storm,
    util::percentile,
};

pub struct Report<'a> {
    pub settings: &'a Settings,
    /// `rss_stat=btf, sched_process_exit=group_dead, ...`.
    pub forms: String,
    pub host: HostCost,
    pub ebpf: Latency,
    pub busy: Latency,
    pub busy_rt: Latency,
    pub s100: Latency,
    pub s1: Option<Latency>,
    pub reaction: Reaction,
    pub over_ebpf: Overshoot,
    pub over_sampling: Overshoot,
    pub hard_ebpf: Overshoot,
    pub hard_sampling: Overshoot,
    pub storm_audit: Storm,
    pub storm_supervised: Storm,
    pub ebpf_idle: IdleCost,
    pub sampling_idle: IdleCost,
}

/// One table row.
struct Row {
    measure: String,
    result: String,
    baseline: String,
    ratio: String,
    spread: String,
    target: String,
    /// None: no target.
    met: Option<bool>,
}

fn us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{v:.0} us")
    }
}

fn mib(bytes: f64) -> String {
    if bytes.abs() >= 1048576.0 {
        format!("{:.1} MiB", bytes / 1048576.0)
    } else {
        format!("{:.0} KiB", bytes / 1024.0)
    }
}

fn pct(ratio: f64) -> String {
    format!("{:+.1}%", (ratio - 1.0) * 100.0)
}

fn p(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    percentile(v, q)
}

impl Report<'_> {
    fn pairs_row(
        &self,
        measure: String,
        pairs: &Pairs,
        unit: &str,
        scale: f64,
        target: f64,
    ) -> Row {
        let r = pairs.ratio();
        Row {
            measure,
            result: format!("{:.0} {unit}", pairs.treatment_median() / scale),
            baseline: format!("{:.0} {unit} (no daemon)", pairs.baseline_median() / scale),
            ratio: format!("{:.3} ({})", r.median, pct(r.median)),
            spread: format!(
                "IQR {:.3}-{:.3}, range {:.3}-{:.3} ({} pairs)",
                r.p25,
                r.p75,
                r.min,
                r.max,
                pairs.len()
            ),
            target: format!("<= {target:.2}"),
            met: Some(r.median <= target),
        }
    }

    fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        let h = &self.host;
        rows.push(self.pairs_row(
            format!(
                "page fault (map, touch, unmap), unwatched process, {IDLE_PROCESSES} others watched"
            ),
            &h.fault_unwatched,
            "ns",
            1.0,
            1.03,
        ));
        let mut floor = self.pairs_row(
            "page fault (map, touch, unmap), no daemon, a program that returns at once attached \
             to rss_stat alone: the tracepoint's own dispatch, under any program there"
                .into(),
            &h.fault_floor,
            "ns",
            1.0,
            1.03,
        );
        floor.baseline = floor.baseline.replace("(no daemon)", "(nothing attached)");
        floor.target = "- (reference)".into();
        floor.met = None;
        rows.push(floor);
        rows.push(self.pairs_row(
            "page fault (map, touch, unmap), watched process".into(),
            &h.fault_watched,
            "ns",
            1.0,
            1.06,
        ));
        rows.push(self.pairs_row(
            format!(
                "process lifecycle (fork + exec /bin/true + exit + wait), unwatched process, \
                 {IDLE_PROCESSES} others watched"
            ),
            &h.lifecycle,
            "us",
            1000.0,
            1.03,
        ));

        let e = &self.ebpf;
        let (w50, w99) = (p(&e.from_write, 0.5), p(&e.from_write, 0.99));
        let mut sampled = vec![("100 ms", &self.s100)];
        if let Some(s1) = &self.s1 {
            sampled.push(("1 s", s1));
        }
        for (name, l) in sampled {
            let (s50, s99) = (p(&l.from_write, 0.5), p(&l.from_write, 0.99));
            rows.push(Row {
                measure: format!(
                    "detection latency p50 / p99, worker's crossing write -> confirmed event: \
                     eBPF (n={}) vs sampling every {name} (n={})",
                    e.from_write.len(),
                    l.from_write.len()
                ),
                result: format!("{} / {}", us(w50), us(w99)),
                baseline: format!("{} / {}", us(s50), us(s99)),
                ratio: format!("{:.4} (p99)", w99 / s99),
                spread: format!("max {}", us(*e.from_write.last().unwrap_or(&0.0))),
                target: "p99 <= 1 ms".into(),
                met: Some(w99 <= 1000.0),
            });
        }
        let (k50, k99) = (p(&e.from_kernel, 0.5), p(&e.from_kernel, 0.99));
        rows.push(Row {
            measure: format!(
                "detection latency p50 / p99, kernel's crossing -> confirmed event (eBPF, n={})",
                e.from_kernel.len()
            ),
            result: format!("{} / {}", us(k50), us(k99)),
            baseline: "-".into(),
            ratio: "-".into(),
            spread: format!("max {}", us(*e.from_kernel.last().unwrap_or(&0.0))),
            target: "p99 <= 1 ms".into(),
            met: Some(k99 <= 1000.0),
        });
        let b = &self.busy;
        let (b50, b99) = (p(&b.from_write, 0.5), p(&b.from_write, 0.99));
        let cpus = thread::available_parallelism().map_or(0, |n| n.get());
        rows.push(Row {
            measure: format!(
                "detection latency p50 / p99 with a CPU hog on each of the {cpus} CPUs besides \
                 the worker (eBPF, n={}; the event loop at nice -10)",
                b.from_write.len()
            ),
            result: format!("{} / {}", us(b50), us(b99)),
            baseline: format!("{} / {} (idle, above)", us(w50), us(w99)),
            ratio: format!("{:.2} (p99)", b99 / w99),
            spread: format!("max {}", us(*b.from_write.last().unwrap_or(&0.0))),
            target: "p99 <= 1 ms".into(),
            met: Some(b99 <= 1000.0),
        });
        let rt = &self.busy_rt;
        let (r50, r99) = (p(&rt.from_write, 0.5), p(&rt.from_write, 0.99));
        rows.push(Row {
            measure: format!(
                "the same with the event loop SCHED_FIFO (`watch --realtime`, the daemon's \
                 `realtime = true`; n={})",
                rt.from_write.len()
            ),
            result: format!("{} / {}", us(r50), us(r99)),
            baseline: format!("{} / {} (nice -10, above)", us(b50), us(b99)),
            ratio: format!("{:.2} (p99)", r99 / b99),
            spread: format!("max {}", us(*rt.from_write.last().unwrap_or(&0.0))),
            target: "p99 <= 1 ms".into(),
            met: Some(r99 <= 1000.0),
        });
        let r = &self.reaction;
        rows.push(Row {
            measure: format!(
                "supervise: confirmed crossing -> drain signal, p50 / p99 (n={})",
                r.to_drain.len()
            ),
            result: format!("{} / {}", us(p(&r.to_drain, 0.5)), us(p(&r.to_drain, 0.99))),
            baseline: "-".into(),
            ratio: "-".into(),
            spread: "-".into(),
            target: "-".into(),
            met: None,
        });
        rows.push(Row {
            measure: format!(
                "supervise: service exit -> respawned, p50 / p99 (n={})",
                r.to_respawn.len()
            ),
            result: format!(
                "{} / {}",
                us(p(&r.to_respawn, 0.5)),
                us(p(&r.to_respawn, 0.99))
            ),
            baseline: "-".into(),
            ratio: "-".into(),
            spread: "-".into(),
            target: "-".into(),
            met: None,
        });

        let limit = (overshoot::LIMIT_MIB << 20) as f64;
        let one_percent = limit / 100.0;
        for (what, e, s, target) in [
            (
                "overshoot at the drain signal (bytes over the limit in the reading it was \
                 decided on)",
                &self.over_ebpf.at_signal,
                &self.over_sampling.at_signal,
                true,
            ),
            (
                "overshoot when the worker stopped (its own count when SIGTERM reached it)",
                &self.over_ebpf.peak,
                &self.over_sampling.peak,
                false,
            ),
            (
                "hard limit: bytes past it in the reading the kill was decided on",
                &self.hard_ebpf.at_signal,
                &self.hard_sampling.at_signal,
                false,
            ),
            (
                "hard limit: bytes past it before the tree stopped running (the worker's last \
                 page before SIGKILL)",
                &self.hard_ebpf.peak,
                &self.hard_sampling.peak,
                false,
            ),
        ] {
            let (e50, e99) = (p(e, 0.5), p(e, 0.99));
            let (s50, s99) = (p(s, 0.5), p(s, 0.99));
            rows.push(Row {
                measure: format!(
                    "{what}, p50 / p99, a worker allocating as fast as it can past {} MiB: eBPF \
                     (n={}) vs sampling every 100 ms (n={})",
                    overshoot::LIMIT_MIB,
                    e.len(),
                    s.len()
                ),
                result: format!("{} / {}", mib(e50), mib(e99)),
                baseline: format!("{} / {}", mib(s50), mib(s99)),
                ratio: format!("{:.3} (p99)", e99 / s99),
                spread: format!("eBPF max {}", mib(*e.last().unwrap_or(&0.0))),
                target: if target {
                    format!("p99 <= 1% of the limit ({})", mib(one_percent))
                } else {
                    "-".into()
                },
                met: target.then_some(e99 <= one_percent),
            });
        }

        for (what, storm) in [
            ("`watchdog audit --all`", &self.storm_audit),
            (
                "a supervised service forking at that rate (its tree tracked)",
                &self.storm_supervised,
            ),
        ] {
            let (result, baseline, ratio) = match storm.lines {
                Some(lines) => (
                    format!("{lines} exit lines, {} lost", storm.lost),
                    format!("{} exits made", storm.exits),
                    format!("{:.4}", lines as f64 / storm.exits.max(1) as f64),
                ),
                None => (
                    format!("{} lost", storm.lost),
                    format!("{} exits made", storm.exits),
                    "-".into(),
                ),
            };
            let complete = storm.lost == 0 && storm.lines.is_none_or(|l| l >= storm.exits);
            rows.push(Row {
                measure: format!(
                    "exit storm, {:.0} s at the highest rate this machine made ({:.0} exits/s), \
                     {what}; the daemon's CPU time, storm and catching up, {:.0}% of the storm's \
                     length",
                    storm.seconds,
                    storm.rate(),
                    storm.cpu_ns as f64 / (storm.seconds * 1e9) * 100.0
                ),
                result,
                baseline,
                ratio,
                spread: "-".into(),
                target: "no loss up to 10,000 exits/s".into(),
                met: Some(complete),
            });
        }

        let window = self.settings.idle_window.as_secs();
        let (ei, si) = (&self.ebpf_idle, &self.sampling_idle);
        // schedstat counts in ns; a daemon that never ran in the window
        // shows 0, and the ratio is then a lower bound against 1 us.
        let (ebpf_cpu, ratio) = if ei.cpu_ns < 1000 {
            (
                "< 1 us (eBPF)".to_owned(),
                format!("> {:.0}x less", si.cpu_ns as f64 / 1000.0),
            )
        } else {
            (
                format!("{} (eBPF)", us(ei.cpu_ns as f64 / 1000.0)),
                format!("{:.0}x less", si.cpu_ns as f64 / ei.cpu_ns as f64),
            )
        };
        rows.push(Row {
            measure: format!("daemon CPU over {window} s, {IDLE_PROCESSES} idle processes watched"),
            result: ebpf_cpu,
            baseline: format!("{} (sampling at 1 Hz)", us(si.cpu_ns as f64 / 1000.0)),
            ratio,
            spread: "-".into(),
            target: ">= 10x less".into(),
            met: Some(si.cpu_ns >= ei.cpu_ns.max(1) * 10),
        });
        rows.push(Row {
            measure: format!("daemon RssAnon / VmRSS, {IDLE_PROCESSES} processes watched"),
            result: format!(
                "{} / {} (eBPF)",
                mib(ei.rss_anon as f64),
                mib(ei.vm_rss as f64)
            ),
            baseline: format!(
                "{} / {} (sampling)",
                mib(si.rss_anon as f64),
                mib(si.vm_rss as f64)
            ),
            ratio: format!(
                "{:.2} (RssAnon)",
                ei.rss_anon as f64 / si.rss_anon.max(1) as f64
            ),
            spread: "-".into(),
            target: "RssAnon <= 8 MiB".into(),
            met: Some(ei.rss_anon <= 8 << 20),
        });
        rows
    }

    pub fn markdown(&self, took: Duration) -> String {
        let mut out = String::new();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("model name")?
                        .split(':')
                        .nth(1)
                        .map(|s| s.trim().to_owned())
                })
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cpus = thread::available_parallelism().map_or(0, |n| n.get());
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let _ = writeln!(out, "# Benchmarks\n");
        let _ = writeln!(
            out,
            "Measured by `cargo xtask bench{}` on {date} in {} s: Linux {}, {cpu} ({cpus} CPUs), \
             pid_max {PID_MAX} (set for the run, restored after). Every figure is compared with \
             a baseline measured in the same run. The kernel programs were attached in the \
             forms this kernel takes: `{}` (as the daemon's start-up line says).\n",
            if self.settings.quick { " --quick" } else { "" },
            took.as_secs(),
            kernel.trim(),
            self.forms
        );
        let _ = writeln!(
            out,
            "| measure | result | baseline (same run) | ratio | spread | target | |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        let rows = self.rows();
        for r in &rows {
            let verdict = match r.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {verdict} |",
                r.measure, r.result, r.baseline, r.ratio, r.spread, r.target
            );
        }

        let _ = writeln!(out, "\n## The kernel programs' own cost\n");
        let _ = writeln!(
            out,
            "From the kernel's run-time statistics (BPF_ENABLE_STATS, the switch behind \
             `kernel.bpf_stats_enabled`: run_time_ns / run_cnt per program), in a run of their \
             own after the pairs, since keeping them adds a clock read to every invocation. One \
             page-fault run is {} faults; one lifecycle run {} fork + exec + exit.\n",
            self.settings.fault_rounds as u64 * self.host.faults_per_run,
            self.settings.lifecycle_iterations
        );
        let _ = writeln!(
            out,
            "Programs are named as the kernel keeps them, cut to 15 characters: \
             `sched_process_e` is the exec program and the exit program (one line each).\n"
        );
        let _ = writeln!(out, "| phase | program | invocations | ns per invocation |");
        let _ = writeln!(out, "|---|---|---|---|");
        for c in &self.host.programs {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1} |",
                c.phase,
                c.program,
                c.count,
                c.per_call()
            );
        }

        let s = self.settings;
        let _ = writeln!(
            out,
            "\n## Method\n\n\
             - Host cost: {} interleaved pairs. Each pair runs the baseline (no daemon) and the \
             treatment (`watchdog watch` with the kernel programs, {IDLE_PROCESSES} idle \
             processes and the watched worker under watch, started for the pair and stopped \
             after it), A then B in even pairs and B then A in odd ones; the figure is the \
             median of the per-pair ratios, with their interquartile range and range. A \
             page-fault run is the best of {} rounds, each mapping 64 MiB, touching every page \
             and unmapping it; a lifecycle run is the mean of {} fork + execve(/bin/true) + \
             exit + wait.\n\
             - Detection latency: a worker grows past a {LATENCY_LIMIT_MIB} MiB limit, page by \
             page near the line, and notes the time right after the write that crossed; the \
             daemon's `memory_over_limit` line gives when it confirmed. Sampling runs use a \
             fixed interval (no adaptive shortening). \"Every CPU busy\": one spinning process \
             per CPU besides the worker, at the default priority; `watchdog watch` runs its \
             event loop at the daemon's nice -10.\n\
             - Overshoot: `watchdog supervise --max-rss {}MiB` runs a worker that touches fresh \
             pages (memset) as fast as it can, up to {} MiB; each run is drained and respawned. \
             The hard-limit runs use `--max-rss {}MiB --over-for 1h --hard-limit {}MiB`, so \
             only the hard limit acts. The worker keeps its progress in a shared file, read \
             after it is gone. The kernel programs do not stop or kill the faulting task \
             themselves: the daemon decides on an exact reading and signals.\n\
             - Exit storms: one process per CPU forks children that `_exit` at once, as fast \
             as it can, for {} s.",
            s.pairs,
            s.fault_rounds,
            s.lifecycle_iterations,
            overshoot::LIMIT_MIB,
            overshoot::CAP_MIB,
            overshoot::LIMIT_MIB / 2,
            overshoot::LIMIT_MIB,
            s.storm.as_secs()
        );

        let notes = self.missed_notes(&rows);
        if !notes.is_empty() {
            let _ = writeln!(out, "\n## Targets missed, and what bounds them\n");
            for note in notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }

    /// Measured figures beside each missed target.
    fn missed_notes(&self, rows: &[Row]) -> Vec<String> {
        let mut notes = Vec::new();
        let missed = |prefix: &str| {
            rows.iter()
                .any(|r| r.measure.starts_with(prefix) && r.met == Some(false))
        };
        let per_call = |phase: &str, program: &str| {
            self.host
                .programs
                .iter()
                .filter(|c| c.phase.starts_with(phase) && c.program.starts_with(program))
                .map(|c| (c.count, c.ns))
                .fold((0, 0), |(c, n), (c2, n2)| (c + c2, n + n2))
        };
        let faults = (self.settings.fault_rounds as u64 * self.host.faults_per_run).max(1);
        for (prefix, phase, pairs) in [
            (
                "page fault (map, touch, unmap), unwatched",
                "page faults, unwatched",
                &self.host.fault_unwatched,
            ),
            (
                "page fault (map, touch, unmap), watched",
                "page faults, watched",
                &self.host.fault_watched,
            ),
        ] {
            if !missed(prefix) {
                continue;
            }
            let (count, ns) = per_call(phase, "rss_stat_btf");
            let (count, ns) = if count == 0 {
                per_call(phase, "rss_stat")
            } else {
                (count, ns)
            };
            let (null_count, null_ns) = per_call("page faults, the empty program", "rss_stat_null");
            let ratio = pairs.ratio().median;
            let floor = self.host.fault_floor.ratio().median;
            notes.push(format!(
                "{prefix}: {} per fault against the baseline; a program that returns at once on \
                 the same tracepoint costs {} by itself (median of the same pairs), so the \
                 daemon's program adds {:.1} points over the dispatch. By the kernel's own \
                 statistics the daemon's program runs {:.2} times per fault at {:.1} ns, and the \
                 empty one {:.1} ns (that figure is mostly the statistics' own clock reads).",
                pct(ratio),
                pct(floor),
                (ratio - floor) * 100.0,
                count as f64 / faults as f64,
                ns as f64 / count.max(1) as f64,
                null_ns as f64 / null_count.max(1) as f64,
            ));
        }
        if missed("process lifecycle") {
            let (count, ns) = ["sched_process_e", "sched_process_f"]
                .iter()
                .map(|p| per_call("fork + exec", p))
                .fold((0, 0), |(c, n), (c2, n2)| (c + c2, n + n2));
            let runs = self.settings.lifecycle_iterations.max(1) as f64;
            notes.push(format!(
                "process lifecycle: the fork, exec and exit programs ran {:.1} times per \
                 iteration at {:.0} ns each: {:.0} ns of the {:.0} us an iteration takes.",
                count as f64 / runs,
                ns as f64 / count.max(1) as f64,
                ns as f64 / runs,
                self.host.lifecycle.baseline_median() / 1000.0
            ));
        }
        if missed("detection latency p50 / p99 with a CPU hog") {
            let b = &self.busy.from_write;
            let rt = &self.busy_rt.from_write;
            notes.push(format!(
                "detection latency with every CPU busy, at the default priority (nice -10 and \
                 the kernel's shortest slice): p90 {}, p99 {}, worst {} (idle p99 {}). With the \
                 event loop SCHED_FIFO, on the same load: p90 {}, p99 {}, worst {}. The \
                 difference is the wake-up waiting for a CPU whose running task is not \
                 preempted at once; real time is opt-in (`realtime = true`, `watch \
                 --realtime`) because a real-time thread that spins would starve its CPU.",
                us(p(b, 0.9)),
                us(p(b, 0.99)),
                us(*b.last().unwrap_or(&0.0)),
                us(p(&self.ebpf.from_write, 0.99)),
                us(p(rt, 0.9)),
                us(p(rt, 0.99)),
                us(*rt.last().unwrap_or(&0.0)),
            ));
        }
        if missed("overshoot at the drain signal") {
            notes.push(format!(
                "overshoot at the drain signal: p50 {}, p99 {} with the kernel programs. The \
                 worker adds a page every ~{:.1} us; the reading the drain is decided on is \
                 taken after the kernel's crossing reaches the daemon (detection p50 {} above), \
                 and the worker keeps faulting meanwhile.",
                mib(p(&self.over_ebpf.at_signal, 0.5)),
                mib(p(&self.over_ebpf.at_signal, 0.99)),
                self.host.fault_watched.treatment_median() / 1000.0,
                us(p(&self.ebpf.from_kernel, 0.5))
            ));
        }
        for storm in [&self.storm_audit, &self.storm_supervised] {
            if storm.lost > 0 || storm.lines.is_some_and(|l| l < storm.exits) {
                notes.push(format!(
                    "exit storm at {:.0} exits/s: {} events lost, {} lines for {} exits; the \
                     daemon used {:.0}% of a CPU.",
                    storm.rate(),
                    storm.lost,
                    storm
                        .lines
                        .map_or_else(|| "no".to_owned(), |l| l.to_string()),
                    storm.exits,
                    storm.cpu_ns as f64 / (storm.seconds * 1e9) * 100.0
                ));
            }
        }
        notes
    }
}
