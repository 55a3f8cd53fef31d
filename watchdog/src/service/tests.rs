//! The service actor and its loop, driven on a scripted platform with
//! tokio's clock paused: each test is a regression test of a defect seen
//! with real programs.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::{
    mem::Charged,
    policy::{Config, MemoryAction, MemoryPolicy},
    sensor::Crossing,
};

/// How the scripted service behaves.
#[derive(Clone, Copy, Default)]
struct Behaviour {
    /// Its memory: what a crossing and a measurement report.
    charged: u64,
    /// It is over its limit as soon as it starts.
    over_at_start: bool,
    /// It ignores the drain signal (only SIGKILL ends it).
    ignores_term: bool,
    /// How long a spawn takes.
    spawn_takes: Duration,
    /// Marker writes fail.
    marker_fails: bool,
}

/// What the platform saw, shared with the test.
#[derive(Default)]
struct Seen {
    effects: Vec<(Instant, Effect)>,
    behaviour: Behaviour,
}

impl Seen {
    fn count(&self, want: impl Fn(&Effect) -> bool) -> usize {
        self.effects.iter().filter(|(_, e)| want(e)).count()
    }

    fn lines(&self) -> Vec<AuditLine> {
        self.effects
            .iter()
            .filter_map(|(_, e)| match e {
                Effect::Audit(line) => Some((**line).clone()),
                _ => None,
            })
            .collect()
    }

    fn events(&self) -> Vec<Event> {
        self.lines().iter().map(|l| l.event).collect()
    }

    /// When the first effect matching `want` was performed.
    fn when(&self, want: impl Fn(&Effect) -> bool) -> Option<Instant> {
        self.effects.iter().find(|(_, e)| want(e)).map(|(t, _)| *t)
    }
}

struct Scripted {
    seen: Arc<Mutex<Seen>>,
    queue: VecDeque<Happening>,
    inject: mpsc::UnboundedReceiver<Happening>,
    /// Spawns that report after a delay: (when, pid).
    spawning: Vec<(tokio::time::Instant, usize, u32)>,
    next_pid: u32,
}

impl Scripted {
    fn new(behaviour: Behaviour) -> (Self, Arc<Mutex<Seen>>, mpsc::UnboundedSender<Happening>) {
        let seen = Arc::new(Mutex::new(Seen {
            behaviour,
            ..Seen::default()
        }));
        let (tx, inject) = mpsc::unbounded_channel();
        let platform = Self {
            seen: Arc::clone(&seen),
            queue: VecDeque::new(),
            inject,
            spawning: Vec::new(),
            next_pid: 100,
        };
        (platform, seen, tx)
    }

    fn crossing(pid: u32, charged: u64) -> Happening {
        Happening::Sensor(SensorEvent::OverLimit(Crossing {
            group: GroupId(pid),
            pid: Some(pid),
            charged_bytes: charged,
            limit_bytes: 0,
            sensed_ns: 0,
            confirmed_ns: 0,
            members: 1,
            metric: Charged::AnonShmem,
        }))
    }

    fn reaped(pid: u32, signal: i32) -> Happening {
        Happening::Reaped {
            pid,
            status: ExitStatus::Signal {
                signal,
                core_dumped: false,
            },
            peak_rss_bytes: 4096,
            cgroup_oom_kill: false,
        }
    }
}

impl Platform for Scripted {
    async fn next(&mut self) -> Happening {
        loop {
            if let Some(h) = self.queue.pop_front() {
                return h;
            }
            let due = self.spawning.iter().map(|s| s.0).min();
            let timer = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(h) = self.inject.recv() => return h,
                () = timer => {
                    let now = tokio::time::Instant::now();
                    let behaviour = self.seen.lock().unwrap().behaviour;
                    for (_, service, pid) in self.spawning.iter().filter(|s| s.0 <= now) {
                        self.queue.push_back(Happening::Spawned {
                            service: *service,
                            result: Ok(Spawned { pid: *pid, group: Some(GroupId(*pid)), foreign: false }),
                        });
                        if behaviour.over_at_start {
                            self.queue.push_back(Self::crossing(*pid, behaviour.charged));
                        }
                    }
                    self.spawning.retain(|s| s.0 > now);
                }
            }
        }
    }

    fn perform(&mut self, index: usize, _service: &Service, effect: Effect) -> Option<Input> {
        let behaviour = self.seen.lock().unwrap().behaviour;
        self.seen
            .lock()
            .unwrap()
            .effects
            .push((tokio::time::Instant::now().into_std(), effect.clone()));
        match effect {
            Effect::Spawn => {
                self.next_pid += 1;
                let at = tokio::time::Instant::now() + behaviour.spawn_takes;
                self.spawning.push((at, index, self.next_pid));
                None
            }
            Effect::Signal { pid, signal, .. } => {
                if !behaviour.ignores_term {
                    self.queue.push_back(Self::reaped(pid, signal));
                }
                None
            }
            Effect::KillTree { pid, .. } => {
                self.queue.push_back(Self::reaped(pid, libc::SIGKILL));
                None
            }
            Effect::Measure { .. } => Some(Input::Reading {
                charged: self.seen.lock().unwrap().behaviour.charged,
                metric: Charged::AnonShmem,
            }),
            Effect::WriteMarker { path, .. } => {
                Some(Input::MarkerWritten(if behaviour.marker_fails {
                    Err("No space left on device".into())
                } else {
                    Ok(path)
                }))
            }
            Effect::RunHook { .. } => {
                self.queue.push_back(Happening::Reaped {
                    pid: 7,
                    status: ExitStatus::Code(3),
                    peak_rss_bytes: 0,
                    cgroup_oom_kill: false,
                });
                Some(Input::HookStarted(Ok(7)))
            }
            _ => None,
        }
    }
}

fn service(memory: Option<MemoryPolicy>, tune: impl FnOnce(&mut Config)) -> Service {
    let mut policy = Config {
        memory,
        backoff_floor: Duration::from_secs(1),
        ..Config::default()
    };
    tune(&mut policy);
    Service::new(ServiceConfig {
        name: "svc".into(),
        target: super::Target::Spawn(crate::runner::Spec::default()),
        policy,
        marker: Some(super::MarkerSpec {
            path: "/run/marker".into(),
            format: super::MarkerFormat::KeyValue,
            clear_after: None,
        }),
        hook_timeout: Duration::from_secs(60),
    })
}

/// Runs `services` until `stop` resolves or they finish; returns them.
async fn run_until(
    services: Vec<Service>,
    mut platform: Scripted,
    stop: oneshot::Receiver<()>,
) -> Vec<Service> {
    let (control, mut controls) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        if stop.await.is_ok() {
            let _ = control.send(super::Control::Shutdown);
        }
    });
    let mut services = super::Services {
        list: services,
        waiting: HashMap::new(),
    };
    drive(&mut services, &mut platform, &mut controls, true)
        .await
        .expect("drive");
    services.list
}

fn is_spawn(e: &Effect) -> bool {
    matches!(e, Effect::Spawn)
}

/// Regression: `--max-rss 64KiB --grace 100ms -- sleep 100`
/// started 11 times, wrote `health_warn` and `restart_scheduled`, and then
/// never started again: the drain's wake-up replaced the backoff's.
#[tokio::test(start_paused = true)]
async fn drains_past_the_clean_budget_restart_after_the_backoff() {
    let mut memory = MemoryPolicy::new(64 << 10);
    memory.grace = Duration::from_millis(100);
    let svc = service(Some(memory), |_| {});
    let (platform, seen, _inject) = Scripted::new(Behaviour {
        charged: 1 << 20,
        over_at_start: true,
        ..Behaviour::default()
    });
    let (stop_tx, stop) = oneshot::channel();
    let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
    tokio::time::sleep(Duration::from_secs(20)).await;
    let _ = stop_tx.send(());
    task.await.unwrap();
    let seen = seen.lock().unwrap();
    let events = seen.events();
    assert!(events.contains(&Event::HealthWarn), "{events:?}");
    let scheduled = seen
        .lines()
        .into_iter()
        .find(|l| l.event == Event::RestartScheduled)
        .expect("restart_scheduled");
    let at = seen
        .when(|e| matches!(e, Effect::Audit(l) if l.event == Event::RestartScheduled))
        .unwrap();
    let spawns_after: Vec<Instant> = seen
        .effects
        .iter()
        .filter(|(t, e)| *t > at && is_spawn(e))
        .map(|(t, _)| *t)
        .collect();
    assert!(
        !spawns_after.is_empty(),
        "no start after the backoff: {events:?}"
    );
    let waited = spawns_after[0] - at;
    assert_eq!(waited.as_millis() as u64, scheduled.restart_in_ms.unwrap());
}

/// Regression: SIGTERM while a decision is deferred, the service
/// ignoring SIGTERM: the tree is SIGKILLed after grace and supervision
/// ends, instead of waiting until the service happened to exit.
#[tokio::test(start_paused = true)]
async fn shutdown_while_deferred_escalates_after_grace() {
    let mut memory = MemoryPolicy::new(100);
    memory.over_for = Some(Duration::from_secs(3));
    memory.grace = Duration::from_secs(6);
    let svc = service(Some(memory), |c| c.shutdown_grace = Duration::from_secs(6));
    let (platform, seen, _inject) = Scripted::new(Behaviour {
        charged: 150,
        over_at_start: true,
        ignores_term: true,
        ..Behaviour::default()
    });
    let (stop_tx, stop) = oneshot::channel();
    let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = tokio::time::Instant::now().into_std();
    let _ = stop_tx.send(());
    let services = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("supervision ends")
        .unwrap();
    assert_eq!(services[0].outcome(), Some(&Outcome::Stopped));
    let seen = seen.lock().unwrap();
    let killed = seen
        .when(|e| matches!(e, Effect::KillTree { .. }))
        .expect("the tree is killed");
    assert_eq!(killed - asked, Duration::from_secs(6), "after grace");
    let exit = seen
        .lines()
        .into_iter()
        .find(|l| l.event == Event::Exited)
        .unwrap();
    assert_eq!(exit.cause, Some(Cause::Shutdown));
}

/// Regression: a hard limit is acted on at once while a soft
/// decision is deferred (the sensor watches the hard limit meanwhile).
#[tokio::test(start_paused = true)]
async fn hard_limit_is_not_deferred() {
    let mut memory = MemoryPolicy::new(100);
    memory.over_for = Some(Duration::from_secs(10));
    memory.startup_grace = Some(Duration::from_secs(30));
    memory.hard_limit = Some(200);
    let svc = service(Some(memory), |c| {
        c.restart = crate::policy::RestartPolicy::Never
    });
    let (platform, seen, inject) = Scripted::new(Behaviour {
        charged: 150,
        over_at_start: true,
        ..Behaviour::default()
    });
    let (_stop_tx, stop) = oneshot::channel();
    let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        seen.lock()
            .unwrap()
            .count(|e| matches!(e, Effect::ArmAt { limit: 200, .. }))
            == 1,
        "the hard limit is armed while the soft decision waits"
    );
    let crossed = tokio::time::Instant::now().into_std();
    inject.send(Scripted::crossing(101, 250)).unwrap();
    task.await.unwrap();
    let seen = seen.lock().unwrap();
    let drained = seen
        .when(|e| matches!(e, Effect::Signal { .. }))
        .expect("drained");
    assert_eq!(drained, crossed, "at once");
    let over = seen
        .lines()
        .into_iter()
        .find(|l| l.event == Event::MemoryOverLimit)
        .unwrap();
    assert_eq!(over.reason, Some("hard_limit"));
}

/// Regression: limit 100, over-for 2s, the service at 103, then
/// 97, then 400: it must be heard at 400 (a dip just under the limit made
/// the group wait to fall below the hysteresis level, deaf).
#[tokio::test(start_paused = true)]
async fn a_dip_under_the_limit_rearms() {
    let mut memory = MemoryPolicy::new(100);
    memory.over_for = Some(Duration::from_secs(2));
    let svc = service(Some(memory), |c| {
        c.restart = crate::policy::RestartPolicy::Never
    });
    let (platform, seen, inject) = Scripted::new(Behaviour {
        charged: 103,
        over_at_start: true,
        ..Behaviour::default()
    });
    let (_stop_tx, stop) = oneshot::channel();
    let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    seen.lock().unwrap().behaviour.charged = 97;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        seen.lock()
            .unwrap()
            .count(|e| matches!(e, Effect::ArmAt { limit: 100, .. })),
        1,
        "re-armed at the limit on learning it is under"
    );
    seen.lock().unwrap().behaviour.charged = 400;
    inject.send(Scripted::crossing(101, 400)).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("drained after the window")
        .unwrap();
    assert!(
        seen.lock()
            .unwrap()
            .events()
            .contains(&Event::MemoryOverLimit)
    );
}

/// Regression: shutdown while a spawn is in flight still drains
/// what was started.
#[tokio::test(start_paused = true)]
async fn shutdown_during_a_spawn_drains_the_run() {
    let svc = service(None, |_| {});
    let (platform, seen, _inject) = Scripted::new(Behaviour {
        spawn_takes: Duration::from_secs(1),
        ..Behaviour::default()
    });
    let (stop_tx, stop) = oneshot::channel();
    let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("supervision ends")
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.count(|e| matches!(
            e,
            Effect::Signal {
                signal: libc::SIGTERM,
                ..
            }
        )),
        1
    );
    assert_eq!(
        seen.events(),
        [Event::Started, Event::DrainStarted, Event::Exited],
        "started, drained, ended"
    );
}

/// Regression: a marker that cannot be written is `marker_failed`, never
/// `respawn_recommended`; a hook's start, status and duration are recorded.
#[tokio::test(start_paused = true)]
async fn marker_and_hook_outcomes_are_recorded() {
    for (action, marker_fails, want) in [
        (MemoryAction::Marker, true, vec![Event::MarkerFailed]),
        (MemoryAction::Marker, false, vec![Event::RespawnRecommended]),
        (
            MemoryAction::Exec(vec!["/bin/hook".into()]),
            false,
            vec![Event::HookStarted, Event::HookExited],
        ),
    ] {
        let mut memory = MemoryPolicy::new(100);
        memory.action = action.clone();
        let svc = service(Some(memory), |_| {});
        let (platform, seen, _inject) = Scripted::new(Behaviour {
            charged: 150,
            over_at_start: true,
            marker_fails,
            ..Behaviour::default()
        });
        let (stop_tx, stop) = oneshot::channel();
        let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stop_tx.send(());
        task.await.unwrap();
        let seen = seen.lock().unwrap();
        let events: Vec<Event> = seen
            .events()
            .into_iter()
            .filter(|e| {
                !matches!(
                    e,
                    Event::Started | Event::MemoryOverLimit | Event::DrainStarted | Event::Exited
                )
            })
            .collect();
        assert_eq!(events, want, "{action:?}");
        let lines = seen.lines();
        if marker_fails {
            let failed = lines
                .iter()
                .find(|l| l.event == Event::MarkerFailed)
                .unwrap();
            assert_eq!(failed.error.as_deref(), Some("No space left on device"));
        }
        if let Some(exited) = lines.iter().find(|l| l.event == Event::HookExited) {
            assert_eq!(exited.hook_pid, Some(7));
            assert_eq!(exited.status.as_ref().unwrap().exit_code, Some(3));
            assert!(exited.duration_ms.is_some());
        }
    }
}
