//! `watchdog mem-check`: one exact reading of a process (tree), or of every
//! process whose command line matches, against an optional limit.

use std::process::ExitCode;

use serde::Serialize;

use crate::{
    cmd::CliError,
    mem::{self, Charged, Metric, Reading},
    procs,
    size::Size,
};

/// Arguments of `watchdog mem-check`.
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("target").required(true).multiple(false).args(["pid", "pattern"]))]
pub struct MemCheckArgs {
    /// The process to read.
    pub pid: Option<u32>,
    /// Read every process whose full command line (not just its name)
    /// matches this regular expression, each as its own target.
    #[arg(long = "match", value_name = "REGEX")]
    pub pattern: Option<String>,
    /// Include each target's descendants in its total.
    #[arg(long)]
    pub tree: bool,
    /// Exit 1 when a target's charged memory is at or over this size
    /// (512MiB, 2GiB, 8192MB).
    // Hyphen values reach the size parser, which says why `-5MiB` is wrong.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub limit: Option<Size>,
    /// What to charge: RssAnon+RssShmem (phys_footprint on macOS), VmRSS,
    /// or PSS.
    #[arg(long, value_enum, default_value_t = Metric::Charged)]
    pub metric: Metric,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    #[serde(skip_serializing_if = "Option::is_none")]
    limit_bytes: Option<u64>,
    targets: Vec<Target>,
}

#[derive(Debug, Serialize)]
struct Target {
    pid: u32,
    command: String,
    /// The sum over `members`: what the limit is compared against.
    charged_bytes: u64,
    metric: Charged,
    #[serde(skip_serializing_if = "Option::is_none")]
    over_limit: Option<bool>,
    members: Vec<Member>,
}

#[derive(Debug, Serialize)]
struct Member {
    #[serde(flatten)]
    reading: Reading,
    command: String,
}

pub fn run(args: MemCheckArgs) -> Result<ExitCode, CliError> {
    let roots: Vec<u32> = match (&args.pattern, args.pid) {
        (Some(pattern), _) => {
            let matched = crate::cmd::matching(pattern)?;
            if args.tree {
                procs::outermost(&matched)
            } else {
                matched
            }
        }
        (None, Some(pid)) => vec![pid],
        (None, None) => unreachable!("clap requires a pid or --match"),
    };

    let mut targets = Vec::new();
    for root in roots {
        let mut pids = vec![root];
        if args.tree {
            // Leave out this very process when it runs inside the tree.
            let me = std::process::id();
            let mut rest: Vec<u32> = procs::descendants(root)
                .into_iter()
                .filter(|&p| p != me)
                .collect();
            rest.sort_unstable();
            pids.extend(rest);
        }
        let root_reading = match mem::read(root, args.metric) {
            Ok(r) => r,
            // A matched process that exited since the scan is simply gone.
            Err(mem::MemError::NoProcess(_)) if args.pattern.is_some() => continue,
            Err(err @ (mem::MemError::NoProcess(_) | mem::MemError::NoMemory(_))) => {
                return Err(CliError::Usage(err.to_string()));
            }
            Err(err) => return Err(CliError::Failed(err.into())),
        };
        // A tree is charged as the limits charge it: each page once (the
        // shares of what its processes share), not the sum of their RSS.
        let shared = args.tree && args.metric == mem::Metric::Charged && pids.len() > 1;
        let (metric, charged_bytes, readings) = if shared {
            let tree = mem::read_tree(&pids);
            for err in &tree.errors {
                tracing::warn!(error = %err, "member skipped");
            }
            (
                tree.metric.unwrap_or(root_reading.metric),
                tree.charged_bytes,
                tree.members,
            )
        } else {
            let group = mem::read_group(pids.iter().copied().skip(1), args.metric);
            for err in &group.errors {
                tracing::warn!(error = %err, "member skipped");
            }
            let charged = root_reading.charged_bytes + group.charged_bytes;
            let metric = root_reading.metric;
            let readings = std::iter::once(root_reading).chain(group.members).collect();
            (metric, charged, readings)
        };
        let members: Vec<Member> = readings
            .into_iter()
            .map(|reading| Member {
                command: procs::cmdline(reading.pid).unwrap_or_default(),
                reading,
            })
            .collect();
        targets.push(Target {
            pid: root,
            command: members
                .first()
                .map(|m| m.command.clone())
                .unwrap_or_default(),
            charged_bytes,
            metric,
            over_limit: args.limit.map(|l| charged_bytes >= l.bytes()),
            members,
        });
    }
    if targets.is_empty() {
        return Err(CliError::Usage(
            "every matching process exited before it could be read".into(),
        ));
    }

    let report = Report {
        limit_bytes: args.limit.map(Size::bytes),
        targets,
    };
    if args.json {
        let text = serde_json::to_string(&report).map_err(|e| CliError::Failed(e.into()))?;
        println!("{text}");
    } else {
        print_table(&report, args.tree);
    }
    let over = report.targets.iter().any(|t| t.over_limit == Some(true));
    Ok(if over {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_table(report: &Report, tree: bool) {
    let cell = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |b| Size(b).to_string());
    println!(
        "{:>8}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  COMMAND",
        "PID", "ANON", "SHMEM", "FILE", "SWAP", "VMRSS", "CHARGED"
    );
    for target in &report.targets {
        for m in &target.members {
            let r = &m.reading;
            let mut command = m.command.clone();
            if command.len() > 60 {
                command.truncate(command.floor_char_boundary(57));
                command.push_str("...");
            }
            println!(
                "{:>8}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {command}",
                r.pid,
                cell(r.anon_bytes),
                cell(r.shmem_bytes),
                cell(r.file_bytes),
                cell(r.swap_bytes),
                cell(r.vm_rss_bytes),
                Size(r.charged_bytes).to_string(),
            );
        }
        let what = match target.metric {
            Charged::AnonShmem => "RssAnon+RssShmem",
            Charged::PssAnonShmem => "Pss_Anon+Pss_Shmem",
            Charged::VmrssFallback => "VmRSS (this kernel has no RssAnon/RssShmem)",
            Charged::Rss => "VmRSS",
            Charged::Pss => "PSS",
            Charged::PhysFootprint => "phys_footprint",
        };
        let scope = if tree {
            format!(
                "pid {} and descendants ({} processes)",
                target.pid,
                target.members.len()
            )
        } else {
            format!("pid {}", target.pid)
        };
        let verdict = match (target.over_limit, report.limit_bytes) {
            (Some(true), Some(limit)) => format!(", OVER the limit of {}", Size(limit)),
            (Some(false), Some(limit)) => format!(", under the limit of {}", Size(limit)),
            _ => String::new(),
        };
        println!(
            "{scope}: charged {} ({what}){verdict}",
            Size(target.charged_bytes)
        );
    }
}
