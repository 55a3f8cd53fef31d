//! The kernel-program sensor: crossings are sensed in the kernel on the
//! page fault that makes them, and confirmed here with exact readings.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use super::{Crossing, GroupId, Limits, SensorError, SensorEvent, SensorStats, now_ns};
use crate::kernel::{self, Charge, GroupConfig, KernelEvent, ProbeOptions, Probes};

/// How often an unconfirmed kernel crossing is re-checked while the
/// kernel's approximate total stays over the limit.
const RECHECK: Duration = Duration::from_millis(10);

/// The exact charged total of a set of processes now.
fn exact_total(pids: impl IntoIterator<Item = u32>) -> u64 {
    crate::mem::read_group(pids, crate::mem::Metric::Charged).charged_bytes
}

struct Group {
    limits: Limits,
    members: HashSet<u32>,
    /// A kernel crossing that exact readings did not confirm yet: when to
    /// look again, and the kernel's timestamp of it.
    recheck: Option<(Instant, u64)>,
}

pub struct EbpfSensor {
    probes: Probes,
    groups: HashMap<GroupId, Group>,
    stats: SensorStats,
}

impl EbpfSensor {
    pub fn open() -> Result<Self, SensorError> {
        Ok(Self {
            probes: Probes::load(ProbeOptions::default())?,
            groups: HashMap::new(),
            stats: SensorStats::default(),
        })
    }

    pub fn watch_tree(&mut self, root: u32, limits: Limits) -> Result<GroupId, SensorError> {
        if !crate::procs::exists(root) {
            return Err(SensorError::NoProcess(root));
        }
        // Read the tree first: the group starts from the sum of what its
        // members have now, each member from its own reading.
        let mut start: HashMap<u32, Charge> = crate::procs::descendants(root)
            .into_iter()
            .chain([root])
            .map(|pid| (pid, Charge::of(pid)))
            .collect();
        let initial: u64 = start.values().map(|c| c.total()).sum();
        let id = self.probes.create_group(config(limits), initial)?;
        let members = match self
            .probes
            .watch_tree(root, Some(id), |pid| start.remove(&pid).unwrap_or_default())
        {
            Ok(members) => members,
            Err(err) => {
                self.probes.remove_group(id);
                return Err(err.into());
            }
        };
        let group = GroupId(id.0);
        self.groups.insert(
            group,
            Group {
                limits,
                members,
                recheck: None,
            },
        );
        if limits.limit > 0 && initial >= limits.limit {
            // Already over: the kernel started it disarmed; confirm now.
            self.schedule_recheck(group, now_ns());
        }
        Ok(group)
    }

    pub fn rearm(&mut self, group: GroupId) -> Result<(), SensorError> {
        let g = self
            .groups
            .get_mut(&group)
            .ok_or(SensorError::UnknownGroup(group))?;
        g.recheck = None;
        self.probes.rearm(kernel::GroupId(group.0), false)?;
        Ok(())
    }

    pub fn remove_group(&mut self, group: GroupId) {
        if let Some(g) = self.groups.remove(&group) {
            for pid in g.members {
                self.probes.unwatch(pid);
            }
            self.probes.remove_group(kernel::GroupId(group.0));
        }
    }

    pub fn members(&self, group: GroupId) -> Vec<u32> {
        self.groups
            .get(&group)
            .map(|g| g.members.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn stats(&self) -> SensorStats {
        SensorStats {
            lost_events: self.probes.losses().ringbuf_full,
            ..self.stats
        }
    }

    fn schedule_recheck(&mut self, group: GroupId, sensed_ns: u64) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.recheck = Some((Instant::now(), sensed_ns));
        }
    }

    pub async fn next(&mut self) -> Result<SensorEvent, SensorError> {
        loop {
            let due = self
                .groups
                .iter()
                .filter_map(|(&id, g)| g.recheck.map(|(at, _)| (at, id)))
                .min();
            let event = match due {
                Some((at, id)) => {
                    tokio::select! {
                        event = self.probes.next() => event?,
                        () = tokio::time::sleep_until(at.into()) => {
                            if let Some(event) = self.recheck(id)? {
                                return Ok(event);
                            }
                            continue;
                        }
                    }
                }
                None => self.probes.next().await?,
            };
            if let Some(event) = self.handle(event)? {
                return Ok(event);
            }
        }
    }

    fn handle(&mut self, event: KernelEvent) -> Result<Option<SensorEvent>, SensorError> {
        Ok(match event {
            KernelEvent::Fork(fork) => {
                let group = self.group_of(fork.group);
                if let Some(g) = group.and_then(|id| self.groups.get_mut(&id)) {
                    g.members.insert(fork.child);
                }
                Some(SensorEvent::Fork { group, fork })
            }
            KernelEvent::Exit(exit) => {
                let group = self.group_of(exit.group);
                if let Some(g) = group.and_then(|id| self.groups.get_mut(&id)) {
                    g.members.remove(&exit.pid);
                }
                Some(SensorEvent::Exit { group, exit })
            }
            KernelEvent::Crossing(signal) => {
                let Some(group) = self.group_of(signal.group.0) else {
                    return Ok(None);
                };
                let event = self.confirm(group, Some(signal.pid), signal.monotonic_ns);
                if event.is_none() {
                    self.stats.unconfirmed_crossings += 1;
                    tracing::debug!(
                        group = group.0,
                        kernel_bytes = signal.bytes,
                        "kernel crossing not confirmed by exact readings; rechecking"
                    );
                    self.schedule_recheck(group, signal.monotonic_ns);
                }
                event
            }
            KernelEvent::Rearmed(signal) => {
                self.group_of(signal.group.0)
                    .map(|group| SensorEvent::Rearmed {
                        group,
                        charged_bytes: signal.bytes.max(0) as u64,
                    })
            }
            KernelEvent::OomVictim { pid, group } => Some(SensorEvent::OomVictim {
                group: self.group_of(group.0),
                pid,
            }),
            KernelEvent::Changed(signal) => {
                self.group_of(signal.group.0)
                    .map(|group| SensorEvent::Changed {
                        group,
                        charged_bytes: signal.bytes.max(0) as u64,
                    })
            }
        })
    }

    fn group_of(&self, slot: u32) -> Option<GroupId> {
        let id = GroupId(slot);
        self.groups.contains_key(&id).then_some(id)
    }

    /// Reads the group exactly; the crossing event when it is over.
    fn confirm(&mut self, group: GroupId, pid: Option<u32>, sensed_ns: u64) -> Option<SensorEvent> {
        let g = self.groups.get_mut(&group)?;
        let charged = exact_total(g.members.iter().copied());
        if g.limits.limit == 0 || charged < g.limits.limit {
            return None;
        }
        g.recheck = None;
        Some(SensorEvent::OverLimit(Crossing {
            group,
            pid,
            charged_bytes: charged,
            limit_bytes: g.limits.limit,
            sensed_ns,
            confirmed_ns: now_ns(),
            members: g.members.len(),
            metric: crate::mem::Charged::AnonShmem,
        }))
    }

    /// Looks again at a crossing that did not confirm: confirmed now, or
    /// re-armed once the kernel's total is back under the limit, or
    /// checked again shortly.
    fn recheck(&mut self, group: GroupId) -> Result<Option<SensorEvent>, SensorError> {
        let Some((_, sensed_ns)) = self.groups.get(&group).and_then(|g| g.recheck) else {
            return Ok(None);
        };
        if let Some(event) = self.confirm(group, None, sensed_ns) {
            return Ok(Some(event));
        }
        let kernel_group = kernel::GroupId(group.0);
        let limit = self.groups[&group].limits.limit;
        if self.probes.group_total(kernel_group) < i64::try_from(limit).unwrap_or(i64::MAX) {
            self.probes.rearm(kernel_group, true)?;
            if let Some(g) = self.groups.get_mut(&group) {
                g.recheck = None;
            }
        } else if let Some(g) = self.groups.get_mut(&group) {
            g.recheck = Some((Instant::now() + RECHECK, sensed_ns));
        }
        Ok(None)
    }
}

fn config(limits: Limits) -> GroupConfig {
    GroupConfig {
        limit: limits.limit,
        rearm_below: limits.rearm_below(),
        step: limits.step,
    }
}
