//! Group slots in the kernel's arrays: their limits, running totals and
//! triggers. A group's id is its handle: the slot plus a generation, which
//! the kernel programs check on every update (`watchdog_common::group_slot`).

use aya::maps::{Array, MapData, MapError};
use watchdog_common::{
    GROUP_ARMED, GROUP_SLOT_BITS, GROUP_WAIT_BELOW, GroupCounters, GroupLimits, MAX_GROUPS,
    group_slot,
};

use super::{LoadError, Probes};
use crate::sensor::{GroupId, Limits, Trigger};

/// The group arrays and which slots are in use.
pub(super) struct Groups {
    limits: Array<MapData, GroupLimits>,
    counters: Array<MapData, GroupCounters>,
    state: Array<MapData, u32>,
    /// The handle of each slot's group, 0 for a free slot.
    handles: Vec<u32>,
    /// The generation each slot's next group gets.
    generations: Vec<u16>,
}

impl Groups {
    pub(super) fn new(
        limits: Array<MapData, GroupLimits>,
        counters: Array<MapData, GroupCounters>,
        state: Array<MapData, u32>,
    ) -> Self {
        Self {
            limits,
            counters,
            state,
            handles: vec![0; MAX_GROUPS as usize],
            generations: vec![1; MAX_GROUPS as usize],
        }
    }

    /// The slot of a group that is in use.
    fn slot(&self, group: GroupId) -> Option<u32> {
        let slot = group_slot(group.0);
        (group.0 != 0 && self.handles.get(slot as usize) == Some(&group.0)).then_some(slot)
    }

    /// Sets a slot's running total (and the base of its change steps).
    fn set_total(&mut self, slot: u32, total: i64) -> Result<(), MapError> {
        self.counters.set(
            slot,
            GroupCounters {
                total,
                step_base: total,
            },
            0,
        )
    }

    fn write_limits(&mut self, slot: u32, handle: u32, limits: Limits) -> Result<(), MapError> {
        let value = GroupLimits {
            limit: limits.limit,
            rearm_below: limits.rearm_below(),
            step: limits.step,
            handle,
            _pad: 0,
        };
        self.limits.set(slot, value, 0)
    }
}

impl Probes {
    /// Creates a group whose members will be charged against `limits`,
    /// starting from `initial_bytes` (the sum of the charges its first
    /// members are then watched with). It starts armed, unless it is
    /// already at or over its limit, when it starts disarmed: the caller
    /// decides what that means.
    pub fn create_group(
        &mut self,
        limits: Limits,
        initial_bytes: u64,
    ) -> Result<GroupId, LoadError> {
        let g = &mut self.groups;
        let slot = (1..MAX_GROUPS)
            .find(|&slot| g.handles[slot as usize] == 0)
            .ok_or(LoadError::Kernel {
                what: "create a group",
                detail: format!("all {} group slots are in use", MAX_GROUPS - 1),
            })?;
        let generation = g.generations[slot as usize];
        g.generations[slot as usize] = generation.checked_add(1).unwrap_or(1);
        let handle = slot | u32::from(generation) << GROUP_SLOT_BITS;
        let total = i64::try_from(initial_bytes).unwrap_or(i64::MAX);
        let over = limits.limit > 0 && initial_bytes >= limits.limit;
        let state = if over {
            Trigger::Disarmed
        } else {
            Trigger::Armed
        };
        // The handle last: until it is there, the programs ignore the slot.
        let result = g
            .set_total(slot, total)
            .and_then(|()| g.state.set(slot, state.kernel(), 0))
            .and_then(|()| g.write_limits(slot, handle, limits));
        if let Err(e) = result {
            return Err(LoadError::kernel("create a group", e));
        }
        g.handles[slot as usize] = handle;
        Ok(GroupId(handle))
    }

    /// Changes a group's thresholds.
    pub fn set_limits(&mut self, group: GroupId, limits: Limits) -> Result<(), LoadError> {
        let slot = self.groups.slot(group).ok_or_else(|| unknown(group))?;
        self.groups
            .write_limits(slot, group.0, limits)
            .map_err(|e| LoadError::kernel("set group limits", e))
    }

    /// Sets a group's trigger.
    pub fn set_trigger(&mut self, group: GroupId, trigger: Trigger) -> Result<(), LoadError> {
        let slot = self.groups.slot(group).ok_or_else(|| unknown(group))?;
        self.groups
            .state
            .set(slot, trigger.kernel(), 0)
            .map_err(|e| LoadError::kernel("set a group's trigger", e))
    }

    /// A group's trigger now.
    pub fn trigger(&self, group: GroupId) -> Option<Trigger> {
        let slot = self.groups.slot(group)?;
        match self.groups.state.get(&slot, 0).ok()? {
            GROUP_ARMED => Some(Trigger::Armed),
            GROUP_WAIT_BELOW => Some(Trigger::WaitBelow),
            _ => Some(Trigger::Disarmed),
        }
    }

    /// Re-arms a group after a crossing was handled: it fires again once
    /// its total has been below its re-arm level (at once, if it is below
    /// it now).
    pub fn rearm(&mut self, group: GroupId, limits: &Limits) -> Result<(), LoadError> {
        let total = u64::try_from(self.group_total(group)).unwrap_or(0);
        self.set_trigger(group, Trigger::after_crossing(total, limits))
    }

    /// The kernel's running total for a group.
    pub fn group_total(&self, group: GroupId) -> i64 {
        self.groups
            .slot(group)
            .and_then(|slot| self.groups.counters.get(&slot, 0).ok())
            .map_or(0, |c| c.total)
    }

    /// Replaces a group's running total (after a resynchronisation). An
    /// update the programs make between the caller's reading and this
    /// write is lost; the caller resynchronises only after losses, which
    /// are rarer still.
    pub fn set_group_total(&mut self, group: GroupId, bytes: u64) -> Result<(), LoadError> {
        let slot = self.groups.slot(group).ok_or_else(|| unknown(group))?;
        let total = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.groups
            .set_total(slot, total)
            .map_err(|e| LoadError::kernel("set a group's total", e))
    }

    /// Frees a group slot. Its members should be unwatched first; any that
    /// are not (a late fork) carry a handle the slot no longer accepts.
    pub fn remove_group(&mut self, group: GroupId) {
        let Some(slot) = self.groups.slot(group) else {
            return;
        };
        let g = &mut self.groups;
        let _ = g.write_limits(slot, 0, Limits::default());
        let _ = g.state.set(slot, Trigger::Disarmed.kernel(), 0);
        let _ = g.counters.set(slot, GroupCounters::default(), 0);
        g.handles[slot as usize] = 0;
    }
}

fn unknown(group: GroupId) -> LoadError {
    LoadError::Kernel {
        what: "find a group",
        detail: format!("no group with handle {:#x}", group.0),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        time::Duration,
    };

    use watchdog_common::group_slot;

    use super::*;
    use crate::kernel::{Charge, ProbeOptions};

    #[test]
    fn handles_keep_slot_and_generation_apart() {
        let handle = 4095 | u32::from(u16::MAX) << GROUP_SLOT_BITS;
        assert_eq!(group_slot(handle), 4095);
        assert_ne!(handle, 4095 | 1 << GROUP_SLOT_BITS);
    }

    /// Regression: a member of a removed group (still running after
    /// its group's slot was freed and reused) is not credited to the group
    /// that uses the slot now. Needs root and the kernel programs; under
    /// CI=true their absence fails the test.
    #[tokio::test]
    async fn a_late_member_of_a_removed_group_is_not_credited_to_the_next() {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root || !crate::kernel::built_in() {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "needs root and the kernel programs, and CI=true requires them"
            );
            eprintln!("skipped: needs root and a build with the kernel programs");
            return;
        }
        let mut probes = Probes::load(ProbeOptions::default()).unwrap();
        let (child, go) = toucher(16 << 20);
        let old = probes.create_group(Limits::default(), 0).unwrap();
        assert!(probes.watch(child, Some(old), Charge::of(child)).unwrap());
        // Removed while its member still runs (its exit, or a fork, may
        // come later): the member keeps the old handle.
        probes.remove_group(old);
        let new = probes.create_group(Limits::default(), 0).unwrap();
        assert_eq!(group_slot(new.0), group_slot(old.0), "the slot is reused");
        assert_ne!(new, old);
        // Not ours to remove: the entry is the old group's.
        probes.unwatch(child, Some(new));
        drop(go);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let credited = probes.group_total(new);
        // The member is still watched, charged to its own group only.
        let own = probes.charged_in_table(old, [child]);
        // SAFETY: our own child.
        unsafe {
            libc::kill(child as i32, libc::SIGKILL);
            libc::waitpid(child as i32, std::ptr::null_mut(), 0);
        }
        assert!(
            credited < 1 << 20,
            "the new group was credited {credited} bytes of the old group's member"
        );
        assert!(
            own >= 8 << 20,
            "the member's growth was not seen: {own} bytes"
        );
    }

    /// A child that touches `bytes` of anonymous memory once the returned
    /// descriptor is closed, then waits to be killed.
    fn toucher(bytes: usize) -> (u32, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: a valid array of two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors that we now own.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child calls only async-signal-safe functions.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                libc::close(write_end.as_raw_fd());
                let mut byte = 0u8;
                libc::read(read_end.as_raw_fd(), (&raw mut byte).cast(), 1);
                let block = libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if block != libc::MAP_FAILED {
                    for offset in (0..bytes).step_by(4096) {
                        block.cast::<u8>().add(offset).write_volatile(1);
                    }
                }
                loop {
                    libc::pause();
                }
            }
        }
        (pid as u32, write_end)
    }
}
