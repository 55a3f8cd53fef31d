//! The watch table: which processes the kernel programs watch, and what
//! each is charged. The kernel owns the entries of the processes it sees
//! start; userspace adds the ones that were running before, and never
//! replaces or removes an entry that is not its own.

use std::{
    collections::HashSet,
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::MapData;
use watchdog_common::{Watch, charged_pages};

use super::{LoadError, Probes};
use crate::sensor::GroupId;

/// What a process is charged when it starts being watched, in bytes: its
/// resident anonymous and shmem memory (its mm's counters), and how much
/// of that is its own. A process of a tree shares pages with the others
/// (copy-on-write after fork, shared memory): it is charged its share, and
/// from then on its growth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Charge {
    pub anon_bytes: u64,
    pub shmem_bytes: u64,
    pub own_anon_bytes: u64,
    pub own_shmem_bytes: u64,
}

impl Charge {
    /// A running process on its own: charged all it has (nothing if it
    /// cannot be read; the kernel programs correct it on its next update).
    pub fn of(pid: u32) -> Self {
        match crate::mem::read(pid, crate::mem::Metric::Charged) {
            Ok(r) => {
                let anon = r.anon_bytes.unwrap_or(r.charged_bytes);
                let shmem = r.shmem_bytes.unwrap_or(0);
                Self {
                    anon_bytes: anon,
                    shmem_bytes: shmem,
                    own_anon_bytes: anon,
                    own_shmem_bytes: shmem,
                }
            }
            Err(_) => Self::default(),
        }
    }

    /// A running process of a tree: charged its share of its pages
    /// (Pss_Anon, Pss_Shmem), so that the tree's total counts each once.
    pub fn shared(pid: u32) -> Self {
        let all = Self::of(pid);
        match crate::mem::read_shared(pid) {
            Ok(r) if r.metric == crate::mem::Charged::PssAnonShmem => Self {
                own_anon_bytes: r.anon_bytes.unwrap_or(0).min(all.anon_bytes),
                own_shmem_bytes: r.shmem_bytes.unwrap_or(0).min(all.shmem_bytes),
                ..all
            },
            _ => all,
        }
    }

    /// What the process is charged.
    pub fn total(self) -> u64 {
        self.own_anon_bytes + self.own_shmem_bytes
    }
}

impl Probes {
    /// Starts watching `tgid`: its exit is reported and the processes it
    /// starts are watched too. With a group, its memory is charged to it,
    /// starting from `start`. Whether it was added: a process already in
    /// the table keeps its entry (the kernel added it when it started, and
    /// knows better).
    pub fn watch(
        &mut self,
        tgid: u32,
        group: Option<GroupId>,
        start: Charge,
    ) -> Result<bool, LoadError> {
        let pages = |bytes: u64| i64::try_from(bytes / self.page_size).unwrap_or(i64::MAX);
        let (anon, shmem) = (pages(start.anon_bytes), pages(start.shmem_bytes));
        let watch = Watch {
            group: group.map_or(0, |g| g.0),
            last_anon: anon,
            last_shmem: shmem,
            base_anon: anon - pages(start.own_anon_bytes).min(anon),
            base_shmem: shmem - pages(start.own_shmem_bytes).min(shmem),
            ..Watch::default()
        };
        match self.watched.insert(tgid, watch, BPF_NOEXIST) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(LoadError::kernel("add a process to the watch table", e)),
        }
        // After the entry exists: the programs look in the filter first.
        self.filter.set(tgid, true);
        Ok(true)
    }

    /// Stops watching `tgid` if it is watched for `group` (a no-op when it
    /// is not: it exited and the exit program removed it, or its pid now
    /// belongs to another process, whose entry is not ours to remove).
    pub fn unwatch(&mut self, tgid: u32, group: Option<GroupId>) {
        let handle = group.map_or(0, |g| g.0);
        // ENOENT: it already exited, and the exit program removed it.
        if self.watched.get(&tgid, 0).is_ok_and(|w| w.group == handle) {
            self.filter.set(tgid, false);
            let _ = self.watched.remove(&tgid);
        }
    }

    /// Watches `root` and its present descendants, charging each to `group`
    /// from `charged(pid)`, and returns the pids now watched.
    pub fn watch_tree(
        &mut self,
        root: u32,
        group: Option<GroupId>,
        charged: impl FnMut(u32) -> Charge,
    ) -> Result<HashSet<u32>, LoadError> {
        let mut known = HashSet::new();
        self.watch_descendants(&[root], group, &mut known, charged)?;
        Ok(known)
    }

    /// Watches `roots` and their present descendants that are not `known`
    /// yet, adding them to `known`. The fork program is already attached,
    /// so processes started from a watched one from now on are watched by
    /// the kernel; repeating the /proc scan until it finds nothing new
    /// catches those started before their parent was watched. A pid that
    /// exited meanwhile is left out, so that a reused pid does not inherit
    /// a stale entry.
    pub fn watch_descendants(
        &mut self,
        roots: &[u32],
        group: Option<GroupId>,
        known: &mut HashSet<u32>,
        mut charged: impl FnMut(u32) -> Charge,
    ) -> Result<(), LoadError> {
        let mut next: Vec<u32> = roots
            .iter()
            .copied()
            .filter(|pid| !known.contains(pid))
            .collect();
        let mut parents: Vec<u32> = roots.to_vec();
        while !next.is_empty() {
            for pid in next {
                let added = self.watch(pid, group, charged(pid))?;
                // ENOENT: it exited between the scan and now.
                if crate::procs::exists(pid) {
                    known.insert(pid);
                    parents.push(pid);
                } else if added {
                    self.unwatch(pid, group);
                }
            }
            parents.retain(|&pid| known.contains(&pid));
            next = parents
                .iter()
                .flat_map(|&pid| crate::procs::descendants(pid))
                .filter(|pid| !known.contains(pid))
                .collect::<HashSet<u32>>()
                .into_iter()
                .collect();
        }
        Ok(())
    }

    /// Whether any of `members` of `group` is charged less than all its
    /// resident pages because it shares some with its tree: a forked child
    /// before exec, or a process registered with its share of a tree.
    pub fn shares_pages(&self, group: GroupId, members: impl IntoIterator<Item = u32>) -> bool {
        members
            .into_iter()
            .filter_map(|pid| self.watched.get(&pid, 0).ok())
            .any(|w| w.group == group.0 && (w.base_anon > 0 || w.base_shmem > 0))
    }

    /// What the kernel programs charge `members` of `group` now, in bytes:
    /// the sum of their entries' contributions.
    pub fn charged_in_table(&self, group: GroupId, members: impl IntoIterator<Item = u32>) -> u64 {
        members
            .into_iter()
            .filter_map(|pid| self.watched.get(&pid, 0).ok())
            .filter(|w| w.group == group.0)
            .map(|w| {
                let pages = charged_pages(w.last_anon, w.base_anon)
                    + charged_pages(w.last_shmem, w.base_shmem);
                u64::try_from(pages).unwrap_or(0) * self.page_size
            })
            .sum()
    }
}

/// `bpf_map_update_elem` flag (include/uapi/linux/bpf.h): fail with EEXIST
/// rather than replace an entry.
const BPF_NOEXIST: u64 = 1;

/// The `WATCH_FILTER` array, mapped into this process: one byte per tgid,
/// written with single-byte stores so that the kernel's own stores to
/// neighbouring bytes (for forks) are never overwritten.
pub(super) struct Filter {
    _map: MapData,
    bytes: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only touched through
// atomic byte stores.
unsafe impl Send for Filter {}

impl Filter {
    pub(super) fn map(map: aya::maps::Map) -> Result<Self, io::Error> {
        let aya::maps::Map::Array(data) = map else {
            return Err(io::Error::other("WATCH_FILTER is not an array"));
        };
        let info = data.info().map_err(io::Error::other)?;
        let len = info.max_entries() as usize * info.value_size() as usize;
        // SAFETY: mapping a BPF_F_MMAPABLE array's own descriptor, shared,
        // for exactly its size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let bytes = std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("null"))?;
        Ok(Self {
            _map: data,
            bytes,
            len,
        })
    }

    /// Marks or clears `tgid`. A tgid past the filter (pid_max raised since
    /// loading) needs nothing: the programs look it up in WATCHED.
    fn set(&mut self, tgid: u32, watched: bool) {
        let index = tgid as usize;
        if index < self.len {
            // SAFETY: inside the mapping; a single atomic byte store.
            let byte =
                unsafe { std::sync::atomic::AtomicU8::from_ptr(self.bytes.as_ptr().add(index)) };
            byte.store(u8::from(watched), std::sync::atomic::Ordering::Release);
        }
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.bytes.as_ptr().cast(), self.len) };
    }
}
