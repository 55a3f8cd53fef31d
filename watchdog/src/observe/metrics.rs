//! `/metrics`: the snapshot and the loop's histograms in the OpenMetrics
//! text format (which Prometheus reads). Per-service series are made from
//! the snapshot at each scrape; a service removed from the configuration
//! stops being reported.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use super::Telemetry;
use crate::{
    policy::Cause,
    status::{Snapshot, State},
};

/// The causes of an exit a restart can follow, each a series of
/// `watchdog_service_restarts_total` from the start.
const RESTART_CAUSES: [Cause; 5] = [
    Cause::CleanExit,
    Cause::Crash,
    Cause::MemoryDrain,
    Cause::MemoryKill,
    Cause::OomKill,
];

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The Prometheus text format's, for clients that do not ask for
/// OpenMetrics.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (Prometheus does; a
/// plain `curl` and older parsers do not).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut params = part.split(';').map(str::trim);
            params
                .next()
                .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
                && !params.any(|p| {
                    p.split_once('=').is_some_and(|(k, v)| {
                        k.trim().eq_ignore_ascii_case("q")
                            && v.trim().parse::<f64>().is_ok_and(|q| q <= 0.0)
                    })
                })
        })
    })
}

/// An OpenMetrics exposition in the Prometheus text format (0.0.4): a
/// counter family is named with its `_total` and an info family with its
/// `_info` (as a gauge), and there is no `# UNIT` or `# EOF`. The samples
/// are the same.
pub fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
                _ => (name.to_owned(), "untyped"),
            };
            if let Some(help) = help.take() {
                let text = help.split_once(' ').map_or("", |(_, text)| text);
                // Only backslash and newline are escaped here, not quotes.
                out.push_str(&format!("# HELP {name} {}\n", text.replace("\\\"", "\"")));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some(help) = help.take() {
            out.push_str("# HELP ");
            out.push_str(help);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    service: String,
    kind: &'static str,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    service: String,
    kind: &'static str,
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabels {
    counter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Registers a family and returns it for filling.
fn family<L, M>(registry: &mut Registry, name: &str, help: &str) -> Family<L, M>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let family = Family::<L, M>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    registry.register(name, help, g);
}

fn float_gauge(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g = FloatGauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The exposition of `snapshot` and the loop's histograms.
pub fn encode(snapshot: &Snapshot, telemetry: &Telemetry) -> String {
    let mut r = Registry::default();

    r.register(
        "watchdog_build",
        "The daemon's version",
        Info::new(VersionLabels {
            version: env!("CARGO_PKG_VERSION"),
        }),
    );
    let sensor: Family<ModeLabels, Gauge> = family(
        &mut r,
        "watchdog_sensor",
        "Where memory readings come from (ebpf: the kernel programs; procfs, macos: sampling)",
    );
    // None chosen yet while the daemon starts.
    if !snapshot.sensor.is_empty() {
        sensor
            .get_or_create(&ModeLabels {
                mode: snapshot.sensor.clone(),
            })
            .set(1);
    }
    let health = &snapshot.health;
    gauge(
        &mut r,
        "watchdog_healthy",
        "1 while the service loop's heartbeat is fresh and the sensor works",
        i64::from(health.ok),
    );
    gauge(
        &mut r,
        "watchdog_snapshot_stale",
        "1 when the service loop did not answer this scrape within 1 s (services as of its last heartbeat)",
        i64::from(snapshot.stale),
    );
    float_gauge(
        &mut r,
        "watchdog_loop_heartbeat_age_seconds",
        "Time since the service loop's own timer last stamped its heartbeat",
        health.heartbeat_age_ms as f64 / 1e3,
    );
    float_gauge(
        &mut r,
        "watchdog_loop_lag_seconds",
        "How late the service loop's timer fired last",
        health.loop_lag_us as f64 / 1e6,
    );
    float_gauge(
        &mut r,
        "watchdog_loop_lag_max_seconds",
        "The largest service loop lag seen since start",
        health.loop_lag_max_us as f64 / 1e6,
    );
    float_gauge(
        &mut r,
        "watchdog_uptime_seconds",
        "How long the daemon has run",
        snapshot.uptime_ms as f64 / 1e3,
    );

    let lost: Family<CounterLabels, Counter> = family(
        &mut r,
        "watchdog_kernel_events_lost",
        "Events the kernel programs could not deliver or track, by counter",
    );
    for counter_name in ["ringbuf_full", "watch_table_full", "read_failed"] {
        drop(lost.get_or_create(&CounterLabels {
            counter: counter_name.to_owned(),
        }));
    }
    for (name, &total) in &snapshot.lost_events {
        lost.get_or_create(&CounterLabels {
            counter: name.clone(),
        })
        .inc_by(total);
    }
    counter(
        &mut r,
        "watchdog_unconfirmed_crossings",
        "Kernel crossings that the exact reading did not confirm",
        snapshot.unconfirmed_crossings,
    );
    counter(
        &mut r,
        "watchdog_audit_lines_lost",
        "Audit lines that could not be written",
        snapshot.audit_lines_lost,
    );
    counter(
        &mut r,
        "watchdog_log_lines_lost",
        "Log records dropped because standard error was not read fast enough",
        snapshot.log_lines_lost,
    );
    r.register(
        "watchdog_detection_latency_seconds",
        "Kernel crossing of a limit to its exact confirmation",
        telemetry.detection.clone(),
    );
    r.register(
        "watchdog_crossing_to_signal_seconds",
        "Kernel crossing of a limit to the drain (or memory) signal sent",
        telemetry.crossing_to_signal.clone(),
    );

    services(&mut r, snapshot);
    memory(&mut r, snapshot);

    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
        out = "# the metrics could not be encoded\n# EOF\n".into();
    }
    out
}

fn services(r: &mut Registry, snapshot: &Snapshot) {
    let state: Family<StateLabels, Gauge> = family(
        r,
        "watchdog_service_state",
        "1 for the state each service or watch target is in, 0 for the others",
    );
    let charged: Family<ServiceLabels, Gauge> = family(
        r,
        "watchdog_service_charged_bytes",
        "Charged memory of the run's tree (RssAnon+RssShmem, shared pages once)",
    );
    let limit: Family<ServiceLabels, Gauge> = family(
        r,
        "watchdog_service_limit_bytes",
        "The memory limit (max-rss)",
    );
    let hard: Family<ServiceLabels, Gauge> = family(
        r,
        "watchdog_service_hard_limit_bytes",
        "The hard memory limit",
    );
    let restarts: Family<CauseLabels, Counter> = family(
        r,
        "watchdog_service_restarts",
        "Restarts by the cause of the exit before them",
    );
    let crashes: Family<ServiceLabels, Gauge> = family(
        r,
        "watchdog_service_consecutive_crashes",
        "Crashes in a row (max-crashes gives up)",
    );
    let backoff: Family<ServiceLabels, FloatGauge> = family(
        r,
        "watchdog_service_backoff_seconds",
        "Time left before the next start",
    );
    let uptime: Family<ServiceLabels, FloatGauge> = family(
        r,
        "watchdog_service_uptime_seconds",
        "How long the current run has been up",
    );
    let processes: Family<ServiceLabels, Gauge> = family(
        r,
        "watchdog_service_processes",
        "Processes in the run's tree",
    );
    let marker: Family<ServiceLabels, Gauge> = family(
        r,
        "watchdog_service_marker",
        "1 while the respawn marker is written",
    );
    for s in &snapshot.services {
        let kind = match s.kind {
            crate::status::Kind::Service => "service",
            crate::status::Kind::Watch => "watch",
        };
        let labels = ServiceLabels {
            service: s.name.clone(),
            kind,
        };
        for each in State::ALL {
            state
                .get_or_create(&StateLabels {
                    service: s.name.clone(),
                    kind,
                    state: each.as_str(),
                })
                .set(i64::from(each == s.state));
        }
        if let Some(bytes) = s.charged_bytes {
            charged.get_or_create(&labels).set(clamp(bytes));
        }
        if let Some(bytes) = s.limit_bytes {
            limit.get_or_create(&labels).set(clamp(bytes));
        }
        if let Some(bytes) = s.hard_limit_bytes {
            hard.get_or_create(&labels).set(clamp(bytes));
        }
        // Every cause from the start, at 0 until it happens, so that a
        // rate over the first restart sees it. A watch target is never
        // restarted by the daemon: it has none.
        let causes = if s.kind == crate::status::Kind::Service {
            &RESTART_CAUSES[..]
        } else {
            &[]
        };
        for cause in causes {
            let n = s.restarts.get(cause.as_str()).copied().unwrap_or(0);
            restarts
                .get_or_create(&CauseLabels {
                    service: s.name.clone(),
                    kind,
                    cause: cause.as_str().to_owned(),
                })
                .inc_by(n);
        }
        for (cause, &n) in &s.restarts {
            if !RESTART_CAUSES.iter().any(|c| c.as_str() == cause) {
                restarts
                    .get_or_create(&CauseLabels {
                        service: s.name.clone(),
                        kind,
                        cause: cause.clone(),
                    })
                    .inc_by(n);
            }
        }
        crashes.get_or_create(&labels).set(i64::from(s.crash_count));
        backoff
            .get_or_create(&labels)
            .set(s.backoff_ms.unwrap_or(0) as f64 / 1e3);
        uptime
            .get_or_create(&labels)
            .set(s.uptime_ms.unwrap_or(0) as f64 / 1e3);
        processes.get_or_create(&labels).set(i64::from(s.processes));
        marker.get_or_create(&labels).set(i64::from(s.marker));
    }
}

fn memory(r: &mut Registry, snapshot: &Snapshot) {
    let Some(m) = &snapshot.memory else {
        return;
    };
    let scoped = |r: &mut Registry, name: &str, help: &str, value: u64| {
        let f: Family<ScopeLabels, Gauge> = family(r, name, help);
        f.get_or_create(&ScopeLabels {
            scope: m.scope.clone(),
        })
        .set(clamp(value));
    };
    scoped(
        r,
        "watchdog_memory_used_bytes",
        "Memory in use of the host (MemTotal - MemAvailable) or of the daemon's container (usage less inactive file pages)",
        m.used_bytes,
    );
    scoped(
        r,
        "watchdog_memory_total_bytes",
        "Memory there is: MemTotal, or the container's limit",
        m.total_bytes,
    );
    scoped(
        r,
        "watchdog_memory_warning_threshold_bytes",
        "Memory in use over which a warning is logged",
        m.warn_bytes,
    );
    scoped(
        r,
        "watchdog_memory_warning",
        "1 while memory in use is over its warning threshold (and not back under the recovery level)",
        u64::from(m.warning),
    );
    gauge(
        r,
        "watchdog_host_memory_available_bytes",
        "MemAvailable of /proc/meminfo",
        clamp(m.available_bytes),
    );
    if let Some(v) = m.cgroup_current_bytes {
        gauge(
            r,
            "watchdog_cgroup_memory_current_bytes",
            "The daemon's cgroup's memory usage (memory.current, v1 memory.usage_in_bytes)",
            clamp(v),
        );
    }
    if let Some(v) = m.cgroup_limit_bytes {
        gauge(
            r,
            "watchdog_cgroup_memory_limit_bytes",
            "The daemon's cgroup's memory limit",
            clamp(v),
        );
    }
    if let Some(v) = m.pressure_some_avg10 {
        float_gauge(
            r,
            "watchdog_memory_pressure_some_avg10_ratio",
            "PSI: share of the last 10 s in which some task stalled on memory",
            v / 100.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use super::*;
    use crate::status::ServiceStatus;

    #[test]
    fn openmetrics_only_when_asked() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(wants_openmetrics(Some("Application/OpenMetrics-Text")));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text; q=0, text/plain"
        )));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text;q=0.000,text/plain"
        )));
    }

    /// The Prometheus text format: every family declared once with a type
    /// it has, under the name its samples carry; no OpenMetrics-only lines.
    #[test]
    fn the_classic_format_names_families_as_their_samples() {
        let (telemetry, _queries) = Telemetry::new(Duration::from_secs(30), Duration::ZERO);
        let snapshot = Snapshot {
            sensor: "ebpf".into(),
            services: vec![
                ServiceStatus {
                    name: "leaky".into(),
                    restarts: [("memory_drain".to_owned(), 3)].into(),
                    ..ServiceStatus::default()
                },
                ServiceStatus {
                    name: "session".into(),
                    kind: crate::status::Kind::Watch,
                    ..ServiceStatus::default()
                },
            ],
            ..Snapshot::default()
        };
        let openmetrics = encode(&snapshot, &telemetry);
        assert!(openmetrics.ends_with("# EOF\n"));
        let classic = to_classic(&openmetrics);
        let mut types: HashMap<&str, &str> = HashMap::new();
        let mut helped = 0;
        for line in classic.lines() {
            assert!(
                !line.starts_with("# EOF") && !line.starts_with("# UNIT"),
                "{line}"
            );
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_default();
                assert!(
                    matches!(kind, "counter" | "gauge" | "histogram" | "untyped"),
                    "{line}"
                );
                assert!(types.insert(name, kind).is_none(), "{name} twice");
            } else if line.starts_with("# HELP ") {
                helped += 1;
            } else {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let family = [
                    name,
                    name.trim_end_matches("_bucket"),
                    name.trim_end_matches("_sum"),
                    name.trim_end_matches("_count"),
                ]
                .into_iter()
                .find(|f| types.contains_key(f));
                let kind = family.map(|f| types[f]);
                assert!(kind.is_some(), "{line}: no family\n{classic}");
                if kind == Some("counter") {
                    assert!(name.ends_with("_total"), "{line}");
                }
            }
        }
        assert_eq!(helped, types.len(), "a HELP line for each family");
        assert_eq!(types["watchdog_service_restarts_total"], "counter");
        assert_eq!(types["watchdog_build_info"], "gauge");
        assert_eq!(types["watchdog_detection_latency_seconds"], "histogram");
        assert!(classic.contains(
            "watchdog_service_restarts_total{service=\"leaky\",kind=\"service\",cause=\"memory_drain\"} 3\n"
        ));
        assert!(classic.contains(
            "watchdog_service_restarts_total{service=\"leaky\",kind=\"service\",cause=\"crash\"} 0\n"
        ));
        assert!(
            !classic.contains("watchdog_service_restarts_total{service=\"session\""),
            "a watch target is never restarted"
        );
    }
}
