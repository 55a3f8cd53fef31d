//! The real platform: processes forked from the spawner thread and reaped
//! on SIGCHLD, the sensor, the audit log, markers and hooks.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io,
    path::{Path, PathBuf},
};

use serde::Serialize;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, oneshot},
};
use tracing::{error, warn};

use super::{Effect, Happening, Input, Marker, Platform, Service, Spawned};
use crate::{
    auditlog::AuditLog,
    event::rfc3339,
    runner::{self, Spawner},
    sensor::{GroupId, Limits, Sensor, SensorEvent, Source},
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
    /// The cgroup's OOM-kill count when it started.
    oom_kills_before: Option<u64>,
}

pub struct Host {
    sensor: Sensor,
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
    sighup: Signal,
}

impl Host {
    /// Must be called inside the runtime, before anything is spawned.
    pub fn new(sensor: Sensor, audit: AuditLog) -> io::Result<Self> {
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        Ok(Self {
            source: sensor.source(),
            sensor,
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
            sighup: signal(SignalKind::hangup())?,
        })
    }

    pub fn sensor(&self) -> &Sensor {
        &self.sensor
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    fn spawn(&mut self, index: usize, service: &Service) {
        let spec = service.config().spec.clone();
        let spawner = self.spawner.clone();
        let tx = self.progress_tx.clone();
        self.forking += 1;
        tokio::spawn(async move {
            let launch = match runner::launch(&spec, &spawner).await {
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
                self.children.insert(
                    pid,
                    Child {
                        oom_kills_before: oom_kill_count(),
                    },
                );
                Ok(Spawned { pid, group })
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
            let before = child.and_then(|c| c.oom_kills_before);
            let cgroup_oom_kill = status.signal() == Some(libc::SIGKILL)
                && matches!((oom_kill_count(), before), (Some(now), Some(b)) if now > b);
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

    fn is_launching(&self, group: Option<GroupId>) -> bool {
        group.is_some() && self.launching.values().any(|&g| g == group)
    }

    fn members(&self, group: Option<GroupId>) -> Vec<u32> {
        group.map(|g| self.sensor.members(g)).unwrap_or_default()
    }

    fn write(&mut self, line: &super::AuditLine) {
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

impl Platform for Host {
    async fn next(&mut self) -> Happening {
        loop {
            if let Some(happening) = self.queue.pop_front() {
                return happening;
            }
            tokio::select! {
                event = self.sensor.next() => match event {
                    Ok(event) if self.is_launching(event.group()) => self.held.push(event),
                    Ok(event) => return Happening::Sensor(event),
                    Err(e) => return Happening::Failed(format!("the sensor failed: {e}")),
                },
                Some(progress) = self.progress_rx.recv() => match progress {
                    Progress::Ready { service, pid, reply } => {
                        let limits = self.limits.get(&service).copied().unwrap_or_default();
                        let _ = reply.send(self.ready(service, pid, limits));
                    }
                    Progress::Done { service, pid, result } => self.done(service, pid, result),
                },
                _ = self.sigchld.recv() => self.reap(),
                _ = self.sighup.recv() => self.audit.reopen(),
            }
        }
    }

    fn perform(&mut self, index: usize, service: &Service, effect: Effect) -> Option<Input> {
        match effect {
            Effect::Spawn => {
                self.limits.insert(index, limits(service));
                self.spawn(index, service);
            }
            Effect::Signal { pid, group, signal } => {
                runner::signal_tree(pid, &self.members(group), signal);
            }
            Effect::KillTree { pid, group } => {
                runner::signal_tree(pid, &self.members(group), libc::SIGKILL);
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
                    self.sensor.remove_group(group);
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
                if let Err(e) = self.sensor.rearm(group) {
                    warn!(service = service.name(), error = %e, "cannot re-arm the memory trigger");
                }
            }
            Effect::WriteMarker { path, marker } => {
                return Some(Input::MarkerWritten(
                    write_marker(&path, &marker)
                        .map(|()| path.clone())
                        .map_err(|e| e.to_string()),
                ));
            }
            Effect::RunHook { argv, env } => {
                let started = runner::start_hook(&argv, &env);
                if let Ok(pid) = started {
                    self.children.insert(
                        pid,
                        Child {
                            oom_kills_before: None,
                        },
                    );
                }
                return Some(Input::HookStarted(
                    started.map_err(|e| format!("failed to start {:?}: {e}", argv[0])),
                ));
            }
            Effect::Audit(line) => self.write(&line),
            Effect::Finished(_) => {}
        }
        None
    }
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

/// Writes the respawn-recommended marker atomically: a temporary file in
/// the same directory (never through a symlink), synced, then renamed over
/// the marker (rename replaces a symlink at the path rather than following
/// it).
fn write_marker(path: &Path, marker: &Marker) -> io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    #[derive(Serialize)]
    struct Body<'a> {
        #[serde(flatten)]
        marker: &'a Marker,
        ts: String,
    }
    let tmp: PathBuf = path.with_extension(format!("tmp.{}", std::process::id()));
    let body = serde_json::to_string(&Body {
        marker,
        ts: rfc3339(std::time::SystemTime::now()),
    })
    .map_err(io::Error::other)?;
    let _ = std::fs::remove_file(&tmp);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{body}\n").as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}
