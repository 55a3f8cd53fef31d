//! The real platform: processes forked from the spawner thread and reaped
//! on SIGCHLD, the sensor, the audit log, markers and hooks.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, oneshot},
};
use tracing::{error, info, warn};

use super::{
    Effect, Happening, Input, Marker, MarkerFormat, Platform, Selector, Service, Services, Spawned,
    Target,
};
use crate::{
    auditlog::AuditLog,
    cgroup::{Containment, ServiceCgroup},
    event::rfc3339,
    notify::Notifier,
    observe::{Query, Telemetry},
    policy::Event,
    procs,
    runner::{self, Spawner},
    sensor::{GroupId, Limits, Sensor, SensorEvent, Source},
    state::{self, RunRecord, StateDir, Swept},
};

/// How a spawn is going, reported by its task.
enum Progress {
    /// The child is forked and held before exec: register it, then say go.
    Ready {
        service: usize,
        pid: u32,
        reply: oneshot::Sender<bool>,
    },
    /// Exec succeeded or failed.
    Done {
        service: usize,
        pid: Option<u32>,
        result: io::Result<()>,
    },
}

/// A child of ours that we reap: a run or a hook.
struct Child {
    /// The OOM-kill count of its cgroup (or ours) when it started.
    oom_kills_before: Option<u64>,
    /// The service it runs for (runs only).
    service: Option<String>,
}

pub struct Host {
    sensor: Sensor,
    /// The sensor failed: it is not asked for events again (the loop drains
    /// every service and ends).
    sensor_failed: bool,
    source: Source,
    audit: AuditLog,
    spawner: Spawner,
    progress_tx: mpsc::UnboundedSender<Progress>,
    progress_rx: mpsc::UnboundedReceiver<Progress>,
    /// Spawns whose child's pid is not known yet.
    forking: usize,
    /// Children between "pid known" and "exec done": their spawn owns them.
    launching: HashMap<u32, Option<GroupId>>,
    /// Sensor events about a launching child's group, held until its
    /// service has heard that it started.
    held: Vec<SensorEvent>,
    children: HashMap<u32, Child>,
    /// Each service's sensor limits, for its next run.
    limits: HashMap<usize, Limits>,
    queue: VecDeque<Happening>,
    sigchld: Signal,
    /// Each service's name, by index.
    names: HashMap<usize, String>,
    /// Watch targets looking for their process: service index -> selector.
    pending: HashMap<usize, Selector>,
    /// Processes watch targets have found: pid -> service index.
    attached: HashMap<u32, usize>,
    /// How often pending watch targets look again.
    rescan: tokio::time::Interval,
    notifier: Option<Arc<Notifier>>,
    ready_sent: bool,
    containment: Option<Containment>,
    /// Each service's cgroup, by name (a reloaded service keeps it).
    cgroups: HashMap<String, ServiceCgroup>,
    /// Where the runs started are recorded, for the next instance.
    state: Option<StateDir>,
    /// Services taking over a previous instance's run: index -> record.
    adopting: HashMap<usize, RunRecord>,
    /// Where the loop's health and latencies are reported.
    telemetry: Option<Arc<Telemetry>>,
    queries: Option<mpsc::Receiver<Query>>,
    /// Crossings not yet answered by a signal: group -> when the kernel
    /// sensed them (CLOCK_MONOTONIC ns).
    crossings: HashMap<GroupId, u64>,
    /// Kernel loss counters reported so far: counter -> total.
    lost: std::collections::BTreeMap<String, u64>,
    /// The service whose memory drain (or memory signal) was just decided:
    /// its next signal answers the crossing.
    memory_signal: Option<usize>,
    /// The last STATUS= line sent to systemd.
    last_status: String,
}

impl Host {
    /// Must be called inside the runtime, before anything is spawned.
    pub fn new(sensor: Sensor, audit: AuditLog) -> io::Result<Self> {
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        Ok(Self {
            source: sensor.source(),
            sensor,
            sensor_failed: false,
            audit,
            spawner: Spawner::new()?,
            progress_tx,
            progress_rx,
            forking: 0,
            launching: HashMap::new(),
            held: Vec::new(),
            children: HashMap::new(),
            limits: HashMap::new(),
            queue: VecDeque::new(),
            sigchld: signal(SignalKind::child())?,
            names: HashMap::new(),
            pending: HashMap::new(),
            attached: HashMap::new(),
            rescan: rescan_timer(DEFAULT_RESCAN),
            notifier: None,
            ready_sent: false,
            containment: None,
            cgroups: HashMap::new(),
            state: None,
            adopting: HashMap::new(),
            telemetry: None,
            queries: None,
            crossings: HashMap::new(),
            lost: Default::default(),
            memory_signal: None,
            last_status: String::new(),
        })
    }

    /// Tells systemd (when it started us) how the loop is doing.
    pub fn set_notifier(&mut self, notifier: Arc<Notifier>) {
        self.notifier = Some(notifier);
    }

    /// Reports the loop's health, latencies and state to `telemetry`, and
    /// answers its `queries`.
    pub fn set_telemetry(&mut self, telemetry: Arc<Telemetry>, queries: mpsc::Receiver<Query>) {
        self.telemetry = Some(telemetry);
        self.queries = Some(queries);
    }

    /// Notes what a sensor event tells the telemetry.
    fn observe(&mut self, happening: Happening) -> Happening {
        match &happening {
            Happening::Sensor(SensorEvent::OverLimit(c)) => {
                if let Some(t) = &self.telemetry {
                    let latency = c.confirmed_ns.saturating_sub(c.sensed_ns);
                    t.detection.observe(latency as f64 / 1e9);
                }
                self.crossings.insert(c.group, c.sensed_ns);
            }
            Happening::Sensor(SensorEvent::Lost { counter, total, .. }) => {
                self.lost.insert((*counter).to_owned(), *total);
            }
            Happening::Failed(reason) => {
                if let Some(t) = &self.telemetry {
                    t.sensor_failed(reason);
                }
            }
            _ => {}
        }
        happening
    }

    /// A signal went out: when it is the memory signal of a crossing,
    /// how long after the crossing.
    fn signalled(&mut self, index: usize, group: Option<GroupId>) {
        if self.memory_signal.take() != Some(index) {
            return;
        }
        if let Some(sensed) = group.and_then(|g| self.crossings.remove(&g))
            && let Some(t) = &self.telemetry
        {
            let now = crate::event::monotonic_now().as_nanos() as u64;
            t.crossing_to_signal
                .observe(now.saturating_sub(sensed) as f64 / 1e9);
        }
    }

    /// Runs each service in a cgroup of its own under `containment`.
    pub fn set_containment(&mut self, containment: Containment) {
        self.containment = Some(containment);
    }

    /// Records each run in `state` (and forgets it when it ends).
    pub fn set_state(&mut self, state: StateDir) {
        self.state = Some(state);
    }

    /// Writes what the start-up sweep did to a previous instance's run.
    pub fn orphan_swept(&mut self, record: &RunRecord, swept: &Swept) {
        let mut line =
            super::AuditLine::new(Event::OrphanTerminated, &record.service, record.pid, 0);
        line.reason = Some(swept.reason());
        match swept {
            Swept::Terminated { pids, killed } => {
                info!(service = %record.service, pid = record.pid, processes = pids.len(), killed, "terminated a run left by a previous instance");
                line.count = Some(pids.len() as u64);
            }
            Swept::Failed(error) => {
                warn!(service = %record.service, pid = record.pid, error = %error, "cannot terminate a run left by a previous instance");
                line.error = Some(error.clone());
            }
            Swept::Gone | Swept::PidReused => {}
        }
        self.write(&line);
        log(&line, false);
    }

    /// Has the service of `record` take over its run, if the process is
    /// still the one recorded and the service still exists; otherwise the
    /// record is dropped (a reused pid is never touched).
    pub fn adopt(&mut self, services: &mut super::Services, record: RunRecord) {
        // A zombie keeps its start time, but there is nothing to adopt.
        let alive =
            procs::stat(record.pid).is_some_and(|s| !s.zombie && s.start_time == record.start_time);
        let index = if alive {
            services.adopt(&record.service, record.pid, state::age(record.start_time))
        } else {
            None
        };
        match (alive, index) {
            (true, Some(index)) => {
                info!(service = %record.service, pid = record.pid, "adopting the run a previous instance left");
                self.adopting.insert(index, record);
            }
            _ => {
                let reason = if alive { "service_removed" } else { "gone" };
                let mut line =
                    super::AuditLine::new(Event::OrphanTerminated, &record.service, record.pid, 0);
                line.reason = Some(reason);
                if alive {
                    // Not wanted any more: stopped like any other orphan.
                    if let Some(dir) = &record.cgroup {
                        let _ = crate::cgroup::kill_recorded(dir);
                    }
                }
                self.write(&line);
                log(&line, false);
                if let Some(state) = &self.state {
                    let _ = state.forget_run(&record.service);
                }
            }
        }
    }

    /// Removes the services' cgroups (killing anything left in them).
    pub fn close(&mut self) {
        for (_, cgroup) in self.cgroups.drain() {
            let _ = cgroup.remove();
        }
        if let Some(containment) = self.containment.take() {
            containment.remove();
        }
    }

    /// The cgroup of a service, created on first use.
    fn cgroup(&mut self, name: &str) -> Option<&ServiceCgroup> {
        let containment = self.containment.as_ref()?;
        // Removed behind our back (by hand, by a cleaner): made again.
        if self.cgroups.get(name).is_some_and(|c| !c.path().is_dir()) {
            warn!(
                service = name,
                "the service's cgroup is gone; creating it again"
            );
            self.cgroups.remove(name);
        }
        if !self.cgroups.contains_key(name) {
            match containment.create(name) {
                Ok(cgroup) => {
                    self.cgroups.insert(name.to_owned(), cgroup);
                }
                Err(e) => {
                    warn!(service = name, error = %e, "cannot create the service's cgroup; it runs without one");
                    return None;
                }
            }
        }
        self.cgroups.get(name)
    }

    /// Takes over the run of a previous instance: watched from now on,
    /// its processes moved into this instance's cgroup of the service.
    fn take_over(&mut self, service: &Service, record: RunRecord) -> Result<Spawned, String> {
        let limits = limits(service);
        if let Some(old) = &record.cgroup {
            let members = std::fs::read_to_string(old.join("cgroup.procs")).unwrap_or_default();
            if let Some(cgroup) = self.cgroup(service.name()) {
                let procs = cgroup.path().join("cgroup.procs");
                for pid in members.lines() {
                    let _ = std::fs::write(&procs, pid);
                }
            }
            let _ = std::fs::remove_dir(old);
        }
        match self.sensor.watch_tree(record.pid, limits) {
            Ok(group) => {
                // Recorded again as this instance's, in its cgroup.
                self.record(Some(service.name()), record.pid);
                Ok(Spawned {
                    pid: record.pid,
                    group: Some(group),
                    foreign: true,
                })
            }
            Err(e) => {
                // Not watched, so not supervised: it must not run on
                // beside the fresh run that replaces it.
                runner::signal_tree(record.pid, &[], libc::SIGKILL);
                if let Some(cgroup) = self.cgroups.get(service.name()) {
                    let _ = cgroup.kill();
                }
                Err(format!("cannot watch the adopted run: {e}"))
            }
        }
    }

    /// How often watch targets without a process look for one (a new
    /// process, or one that exec'd into a matching command line).
    pub fn set_rescan(&mut self, every: std::time::Duration) {
        self.rescan = rescan_timer(every);
    }

    /// Reopens the audit log (after rotation).
    pub fn reopen_audit(&mut self) {
        self.audit.reopen();
    }

    /// Looks for the process of a watch target; registers it with the
    /// sensor when found (reported as spawned, foreign).
    fn attach(&mut self, index: usize) {
        let Some(selector) = self.pending.get(&index) else {
            return;
        };
        let taken: HashSet<u32> = self.attached.keys().copied().collect();
        let Some(pid) = resolve(selector, &taken) else {
            return;
        };
        let limits = self.limits.get(&index).copied().unwrap_or_default();
        match self.sensor.watch_tree(pid, limits) {
            Ok(group) => {
                self.pending.remove(&index);
                self.attached.insert(pid, index);
                self.queue.push_back(Happening::Spawned {
                    service: index,
                    result: Ok(Spawned {
                        pid,
                        group: Some(group),
                        foreign: true,
                    }),
                });
            }
            // Gone before it could be watched: look again later.
            Err(e) => tracing::debug!(pid, error = %e, "cannot watch the process found"),
        }
    }

    pub fn sensor(&self) -> &Sensor {
        &self.sensor
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    fn spawn(&mut self, index: usize, service: &Service) {
        let spec = match &service.config().target {
            Target::Spawn(spec) => spec.clone(),
            Target::Watch(selector) => {
                self.pending.insert(index, selector.clone());
                self.attach(index);
                return;
            }
        };
        let cgroup = self.cgroup(service.name()).map(ServiceCgroup::procs_fd);
        let spawner = self.spawner.clone();
        let tx = self.progress_tx.clone();
        let name = service.name().to_owned();
        self.forking += 1;
        tokio::spawn(async move {
            let launch = match runner::launch(&name, &spec, &spawner, cgroup).await {
                Ok(launch) => launch,
                Err(result) => {
                    let _ = tx.send(Progress::Done {
                        service: index,
                        pid: None,
                        result: Err(result),
                    });
                    return;
                }
            };
            let pid = launch.pid;
            let (reply, go) = oneshot::channel();
            let _ = tx.send(Progress::Ready {
                service: index,
                pid,
                reply,
            });
            let go = go.await.unwrap_or(false);
            let result = launch.finish(go).await;
            let _ = tx.send(Progress::Done {
                service: index,
                pid: Some(pid),
                result,
            });
        });
    }

    /// Registers a forked child with the sensor before it runs.
    fn ready(&mut self, service: usize, pid: u32, limits: Limits) -> bool {
        self.forking = self.forking.saturating_sub(1);
        match self.sensor.watch_tree(pid, limits) {
            Ok(group) => {
                self.launching.insert(pid, Some(group));
                true
            }
            Err(e) => {
                error!(service, pid, error = %e, "cannot watch the new run; not starting it");
                self.launching.insert(pid, None);
                false
            }
        }
    }

    fn done(&mut self, service: usize, pid: Option<u32>, result: io::Result<()>) {
        if pid.is_none() {
            self.forking = self.forking.saturating_sub(1);
        }
        let group = pid.and_then(|p| self.launching.remove(&p)).flatten();
        let result = match (pid, result) {
            (Some(pid), Ok(())) => {
                let name = self.names.get(&service).cloned();
                let oom_kills_before = self.oom_kills(name.as_deref());
                self.record(name.as_deref(), pid);
                self.children.insert(
                    pid,
                    Child {
                        oom_kills_before,
                        service: name,
                    },
                );
                Ok(Spawned {
                    pid,
                    group,
                    foreign: false,
                })
            }
            (_, Err(e)) => {
                if let Some(group) = group {
                    self.sensor.remove_group(group);
                }
                Err(e.to_string())
            }
            (None, Ok(())) => Err("the child did not start".into()),
        };
        let started = result.as_ref().ok().map(|s| s.pid);
        self.queue.push_back(Happening::Spawned { service, result });
        // What the sensor said of the run while it was starting follows.
        if let Some(group) = group {
            let (ours, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|e| e.group() == Some(group));
            self.held = others;
            if started.is_some() {
                self.queue.extend(ours.into_iter().map(Happening::Sensor));
            }
        }
        // It may have exited before it was ours to reap.
        if let Some(pid) = started {
            self.reap_one(pid);
        }
    }

    fn reap_one(&mut self, pid: u32) {
        if !self.children.contains_key(&pid) {
            return;
        }
        if let Some((status, peak_rss_bytes)) = runner::try_wait(pid) {
            let child = self.children.remove(&pid);
            let name = child.as_ref().and_then(|c| c.service.clone());
            let before = child.and_then(|c| c.oom_kills_before);
            let cgroup_oom_kill = status.signal() == Some(libc::SIGKILL)
                && matches!((self.oom_kills(name.as_deref()), before), (Some(now), Some(b)) if now > b);
            self.queue.push_back(Happening::Reaped {
                pid,
                status,
                peak_rss_bytes,
                cgroup_oom_kill,
            });
        }
    }

    /// SIGCHLD: reaps our children that exited (runs and hooks, whose exit
    /// is reported), and orphans of the services reparented to us (we are
    /// their subreaper). Children whose spawn is still deciding are left
    /// to it.
    fn reap(&mut self) {
        let ours: Vec<u32> = self.children.keys().copied().collect();
        for pid in ours {
            self.reap_one(pid);
        }
        if self.forking > 0 {
            // A child whose pid we do not know yet may be failing its exec:
            // the spawn reaps it. Orphans wait for the next SIGCHLD.
            return;
        }
        let me = std::process::id();
        let known: HashSet<u32> = self.launching.keys().copied().collect();
        for pid in crate::procs::children(me).unwrap_or_default() {
            if !known.contains(&pid) && !self.children.contains_key(&pid) {
                runner::try_wait(pid);
            }
        }
    }

    /// The OOM-kill count that attributes kills to a service's run: its
    /// cgroup's when the memory controller is on there, else ours.
    fn oom_kills(&self, service: Option<&str>) -> Option<u64> {
        service
            .and_then(|name| self.cgroups.get(name))
            .and_then(ServiceCgroup::oom_kills)
            .or_else(oom_kill_count)
    }

    /// Records a run that started, for the orphan sweep of a later
    /// instance should this one be killed.
    fn record(&self, service: Option<&str>, pid: u32) {
        let (Some(state), Some(name)) = (&self.state, service) else {
            return;
        };
        let Some(start_time) = state::start_time(pid) else {
            return;
        };
        let record = RunRecord {
            service: name.to_owned(),
            pid,
            start_time,
            cgroup: self.cgroups.get(name).map(|c| c.path().to_owned()),
            daemon_pid: std::process::id(),
            started_at: rfc3339(std::time::SystemTime::now()),
            session: state::session_of(pid),
        };
        if let Err(e) = state.record_run(&record) {
            warn!(service = name, error = %e, "cannot record the run in the state directory");
        }
    }

    fn is_launching(&self, group: Option<GroupId>) -> bool {
        group.is_some() && self.launching.values().any(|&g| g == group)
    }

    fn members(&self, group: Option<GroupId>) -> Vec<u32> {
        // A failed sensor's member lists are as of its failure: pids in
        // them may be others' now. Signals then go by process group and
        // cgroup only.
        if self.sensor_failed {
            return Vec::new();
        }
        group.map(|g| self.sensor.members(g)).unwrap_or_default()
    }

    pub fn write(&mut self, line: &super::AuditLine) {
        #[derive(Serialize)]
        struct Stamped<'a> {
            ts: String,
            #[serde(flatten)]
            line: &'a super::AuditLine,
            source: Source,
        }
        self.audit.write(&Stamped {
            ts: rfc3339(std::time::SystemTime::now()),
            line,
            source: self.source,
        });
    }
}

/// The log's account of an audit line: one record with its fields, for a
/// terminal or a log shipper.
fn log(line: &super::AuditLine, watch: bool) {
    use crate::policy::Cause;
    let (warn, message) = match line.event {
        Event::Started if watch => (false, "found the process to watch"),
        Event::Exited if watch => (false, "the watched process exited"),
        Event::Started => (false, "started"),
        Event::Adopted => (false, "adopted the run a previous instance left"),
        Event::MemoryOverLimit => (true, "over its memory limit"),
        Event::DrainStarted => (false, "draining"),
        Event::EscalatedKill => (true, "still running after its grace: killing its tree"),
        Event::Exited => (
            matches!(line.cause, Some(Cause::Crash | Cause::OomKill)),
            "exited",
        ),
        Event::RestartScheduled => (false, "restart scheduled"),
        Event::HealthWarn => (true, "restarting too often"),
        Event::MaxCrashesExceeded => (true, "too many crashes in a row: giving up"),
        Event::RespawnRecommended => (false, "marker written: respawn recommended"),
        Event::MarkerFailed => (true, "cannot write the marker"),
        Event::MarkerRemoved => (false, "marker removed"),
        Event::HookStarted => (false, "hook started"),
        Event::HookFailed => (true, "cannot start the hook"),
        Event::HookExited => (false, "hook exited"),
        Event::HookTimedOut => (true, "hook overran its timeout: killed"),
        Event::EventsLost => (true, "the kernel lost events"),
        Event::OrphanTerminated => (false, "run of a previous instance dealt with"),
    };
    let cause = line.cause.and_then(|c| serde_json::to_value(c).ok());
    let cause = cause.as_ref().and_then(|c| c.as_str());
    macro_rules! record {
        ($level:ident) => {
            tracing::$level!(
                service = %line.service,
                pid = line.pid,
                cause,
                charged_bytes = line.charged_bytes,
                limit_bytes = line.limit_bytes,
                reason = line.reason,
                restart_in_ms = line.restart_in_ms,
                error = line.error.as_deref(),
                "{message}"
            )
        };
    }
    if warn {
        record!(warn);
    } else {
        record!(info);
    }
}

impl Platform for Host {
    async fn next(&mut self) -> Happening {
        loop {
            if let Some(happening) = self.queue.pop_front() {
                return self.observe(happening);
            }
            let queries = async {
                match &mut self.queries {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = self.sensor.next(), if !self.sensor_failed => match event {
                    Ok(event) if self.is_launching(event.group()) => self.held.push(event),
                    Ok(event) => return self.observe(Happening::Sensor(event)),
                    Err(e) => {
                        self.sensor_failed = true;
                        return self.observe(Happening::Failed(e.to_string()));
                    }
                },
                Some(query) = queries => match query {
                    Query::Snapshot(reply) => return Happening::Snapshot(reply),
                    Query::Stall(duration) => {
                        tracing::warn!(ms = duration.as_millis() as u64, "blocking the service loop, as a test asked");
                        std::thread::sleep(duration);
                    }
                },
                Some(progress) = self.progress_rx.recv() => match progress {
                    Progress::Ready { service, pid, reply } => {
                        let limits = self.limits.get(&service).copied().unwrap_or_default();
                        let _ = reply.send(self.ready(service, pid, limits));
                    }
                    Progress::Done { service, pid, result } => self.done(service, pid, result),
                },
                _ = self.sigchld.recv() => self.reap(),
                _ = self.rescan.tick(), if !self.pending.is_empty() => {
                    let mut pending: Vec<usize> = self.pending.keys().copied().collect();
                    pending.sort_unstable();
                    for index in pending {
                        self.attach(index);
                    }
                }
            }
        }
    }

    fn perform(&mut self, index: usize, service: &Service, effect: Effect) -> Option<Input> {
        match effect {
            Effect::Spawn => {
                self.limits.insert(index, limits(service));
                self.names.insert(index, service.name().to_owned());
                self.spawn(index, service);
            }
            // Answered at once, so that no stop can come between.
            Effect::Adopt => {
                self.names.insert(index, service.name().to_owned());
                return Some(Input::Spawned(match self.adopting.remove(&index) {
                    Some(record) => self.take_over(service, record),
                    None => Err("no run to adopt".into()),
                }));
            }
            // A process we did not start: only it gets the signal.
            Effect::Signal { pid, group, signal } if service.config().is_watch() => {
                // SAFETY: a signal to the watched process, as configured.
                unsafe { libc::kill(pid as libc::pid_t, signal) };
                self.signalled(index, group);
            }
            Effect::Signal { pid, group, signal } => {
                runner::signal_tree(pid, &self.members(group), signal);
                self.signalled(index, group);
                if let Some(cgroup) = self.cgroups.get(service.name()) {
                    cgroup.signal(signal);
                }
            }
            Effect::Detach { group } => {
                self.attached.retain(|_, &mut i| i != index);
                if let Some(group) = group {
                    self.crossings.remove(&group);
                    self.sensor.remove_group(group);
                }
            }
            Effect::KillTree { pid, group } => {
                runner::signal_tree(pid, &self.members(group), libc::SIGKILL);
                if let Some(cgroup) = self.cgroups.get(service.name()) {
                    let _ = cgroup.kill();
                }
            }
            Effect::EndRun { pid: reaped, group } => {
                // Whatever the run left behind goes with it. The main
                // process is reaped: its pid may be someone else's now.
                for pid in self.members(group).into_iter().filter(|&p| p != reaped) {
                    // SAFETY: SIGKILL to a leftover of the run; ESRCH if
                    // it is gone.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
                if let Some(group) = group {
                    self.crossings.remove(&group);
                    self.sensor.remove_group(group);
                }
                if let Some(cgroup) = self.cgroups.get(service.name()) {
                    let _ = cgroup.kill();
                }
                if let Some(state) = &self.state
                    && let Err(e) = state.forget_run(service.name())
                {
                    warn!(service = service.name(), error = %e, "cannot remove the run's record");
                }
            }
            Effect::Measure { group } => {
                return match self.sensor.read(group) {
                    Ok(reading) => Some(Input::Reading {
                        charged: reading.charged_bytes,
                        // Nothing could be read: every member is gone, which
                        // the reaper reports next.
                        metric: reading.metric.unwrap_or(crate::mem::Charged::AnonShmem),
                    }),
                    Err(e) => {
                        warn!(service = service.name(), error = %e, "cannot read the run's memory");
                        None
                    }
                };
            }
            Effect::ArmAt { group, limit } => {
                if let Err(e) = self.sensor.arm_at(group, limit) {
                    warn!(service = service.name(), error = %e, "cannot arm the memory trigger");
                }
            }
            Effect::Rearm { group } => {
                // Back under (or acted on without a signal): no signal
                // answers that crossing any more.
                if self.memory_signal != Some(index) {
                    self.crossings.remove(&group);
                }
                if let Err(e) = self.sensor.rearm(group) {
                    warn!(service = service.name(), error = %e, "cannot re-arm the memory trigger");
                }
            }
            Effect::WriteMarker {
                path,
                format,
                marker,
            } => {
                return Some(Input::MarkerWritten(
                    write_marker(&path, format, &marker)
                        .map(|()| path.clone())
                        .map_err(|e| e.to_string()),
                ));
            }
            Effect::RemoveMarker { path, reason } => {
                let result = match std::fs::remove_file(&path) {
                    Ok(()) => Ok(path),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path),
                    Err(e) => Err(format!("{}: {e}", path.display())),
                };
                return Some(Input::MarkerRemoved { result, reason });
            }
            Effect::KillHook { pid } => runner::signal_group(pid, libc::SIGKILL),
            Effect::CheckGone { pid } => {
                if !procs::exists(pid) || procs::is_zombie(pid) {
                    return Some(Input::Reaped {
                        pid,
                        status: crate::exit::ExitStatus::Unknown,
                        peak_rss_bytes: 0,
                    });
                }
            }
            Effect::RunHook { argv, env, user } => {
                let started = runner::start_hook(&argv, &env, user.as_ref());
                if let Ok(pid) = started {
                    self.children.insert(
                        pid,
                        Child {
                            oom_kills_before: None,
                            service: None,
                        },
                    );
                }
                return Some(Input::HookStarted(
                    started.map_err(|e| format!("failed to start {:?}: {e}", argv[0])),
                ));
            }
            Effect::Audit(line) => {
                if line.event == Event::DrainStarted && line.charged_bytes.is_some() {
                    self.memory_signal = Some(index);
                }
                self.write(&line);
                log(&line, service.config().is_watch());
            }
            Effect::Finished(_) => {
                self.pending.remove(&index);
            }
        }
        None
    }

    fn heartbeat_every(&self) -> Option<std::time::Duration> {
        let notifier = self.notifier.as_ref().filter(|n| n.is_active());
        let systemd = notifier.map(|n| n.watchdog_interval().unwrap_or(HEARTBEAT));
        match (self.telemetry.is_some(), systemd) {
            (true, Some(every)) => Some(every.min(HEARTBEAT)),
            (true, None) => Some(HEARTBEAT),
            (false, systemd) => systemd,
        }
    }

    fn heartbeat(&mut self, services: &Services, lag: std::time::Duration) {
        if let Some(telemetry) = &self.telemetry {
            telemetry.beat(lag, self.snapshot(services));
        }
        let Some(notifier) = &self.notifier else {
            return;
        };
        if !self.ready_sent {
            self.ready_sent = true;
            notifier.ready();
        }
        notifier.watchdog_ping();
        let status = summary(services.all());
        if status != self.last_status {
            notifier.status(&status);
            self.last_status = status;
        }
    }

    fn snapshot(&self, services: &Services) -> crate::status::Snapshot {
        let now = tokio::time::Instant::now().into_std();
        let stats = self.sensor.stats();
        let mut lost = self.lost.clone();
        let ringbuf = lost.entry("ringbuf_full".to_owned()).or_default();
        *ringbuf = (*ringbuf).max(stats.lost_events);
        crate::status::Snapshot {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            sensor: self.source.to_string(),
            kernel_programs: self.sensor.kernel_programs(),
            lost_events: lost,
            unconfirmed_crossings: stats.unconfirmed_crossings,
            audit_lines_lost: self.audit.lost(),
            services: services
                .current()
                .map(|s| {
                    let mut members = self.members(s.group());
                    if members.is_empty() {
                        members.extend(s.pid());
                    }
                    s.status(now, members)
                })
                .collect(),
            ..Default::default()
        }
    }

    fn reloaded(&mut self) {
        self.audit.reopen();
    }
}

/// How often the loop stamps its heartbeat (and measures its lag) when
/// someone watches it.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// One line for systemd's STATUS=: how many services run, how many watch
/// targets have found their process.
fn summary(services: &[Service]) -> String {
    let current: Vec<&Service> = services.iter().filter(|s| !s.finished()).collect();
    let (watches, runs): (Vec<&Service>, Vec<&Service>) =
        current.iter().partition(|s| s.config().is_watch());
    format!(
        "{} of {} services running, {} of {} watch targets found, {} markers",
        runs.iter().filter(|s| s.pid().is_some()).count(),
        runs.len(),
        watches.iter().filter(|s| s.pid().is_some()).count(),
        watches.len(),
        current.iter().filter(|s| s.marked()).count()
    )
}

/// The sensor limits of a service's runs: its soft limit (a hard one is
/// armed while a soft decision is deferred), or none.
fn limits(service: &Service) -> Limits {
    service
        .config()
        .policy
        .memory
        .as_ref()
        .map_or_else(Limits::default, |m| Limits::new(m.limit))
}

/// `oom_kill` of memory.events for this process's cgroup (v2).
fn oom_kill_count() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let file = format!("{root}{path}/memory.events");
        if let Ok(text) = std::fs::read_to_string(&file) {
            return text
                .lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|v| v.trim().parse().ok());
        }
    }
    None
}

/// How often pending watch targets look for their process by default.
pub const DEFAULT_RESCAN: std::time::Duration = std::time::Duration::from_secs(2);

fn rescan_timer(every: std::time::Duration) -> tokio::time::Interval {
    let mut timer = tokio::time::interval(every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}

/// The process a selector names now, leaving out those already `taken`
/// by other watch targets.
fn resolve(selector: &Selector, taken: &HashSet<u32>) -> Option<u32> {
    match selector {
        Selector::Pid(pid) => {
            (procs::exists(*pid) && !procs::is_zombie(*pid) && !taken.contains(pid)).then_some(*pid)
        }
        Selector::Match(pattern) => {
            // Never the daemon's own services (nor their hooks).
            let ours = procs::descendants(std::process::id());
            let matched: Vec<u32> = procs::matching(&pattern.0)
                .into_iter()
                .map(|(pid, _)| pid)
                .filter(|pid| !taken.contains(pid) && !ours.contains(pid))
                .collect();
            procs::outermost(&matched).into_iter().min()
        }
        Selector::AncestorMatch { pattern, from } => {
            let mut pid = from.unwrap_or_else(std::process::id);
            // Bounded: a cycle cannot happen in a process tree, but a
            // racing /proc could show a stale parent.
            for _ in 0..4096 {
                pid = procs::ppid(pid).filter(|&p| p > 0)?;
                if procs::cmdline(pid).is_some_and(|line| pattern.0.is_match(&line)) {
                    return (!taken.contains(&pid)).then_some(pid);
                }
            }
            None
        }
    }
}

/// Writes the respawn-recommended marker atomically: a temporary file in
/// the same directory (never through a symlink), synced, then renamed over
/// the marker (rename replaces a symlink at the path rather than following
/// it); the directory is synced so the rename survives a crash.
fn write_marker(path: &Path, format: MarkerFormat, marker: &Marker) -> io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let ts = rfc3339(std::time::SystemTime::now());
    let body = match format {
        MarkerFormat::Json => {
            #[derive(Serialize)]
            struct Body<'a> {
                #[serde(flatten)]
                marker: &'a Marker,
                timestamp: &'a str,
            }
            let mut text = serde_json::to_string(&Body {
                marker,
                timestamp: &ts,
            })
            .map_err(io::Error::other)?;
            text.push('\n');
            text
        }
        MarkerFormat::KeyValue => {
            let metric = marker
                .metric
                .and_then(|m| serde_json::to_value(m).ok())
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            format!(
                "name={}\npid={}\ncharged_bytes={}\nlimit_bytes={}\nmetric={}\ntimestamp={}\nreason={}\n",
                marker.name,
                marker.pid,
                marker.charged_bytes,
                marker.limit_bytes,
                metric,
                ts,
                marker.reason
            )
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp: PathBuf = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(body.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| std::fs::File::open(dir)?.sync_all());
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}
