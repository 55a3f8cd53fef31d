//! The kernel facts the programs depend on, read from the running kernel's
//! BTF: struct member offsets and tracepoint prototypes.

use watchdog_common::KernelOffsets;

use super::btf::{Btf, BtfError};

/// What the loader needs to know about the running kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    pub offsets: KernelOffsets,
    /// sched_process_exit passes `group_dead` (Linux >= 6.16); before that
    /// the program works it out from `signal->live`.
    pub exit_has_group_dead: bool,
    /// mark_victim passes the task (6.8+), just its pid (before), or is
    /// missing (no OOM events then).
    pub oom_victim_is_task: Option<bool>,
}

/// Members read by the programs, with the size each must have.
const MEMBERS: &[(&str, &str, u32)] = &[
    ("task_struct", "pid", 4),
    ("task_struct", "tgid", 4),
    ("task_struct", "real_parent", 8),
    ("task_struct", "group_leader", 8),
    ("task_struct", "exit_code", 4),
    ("task_struct", "signal", 8),
    ("task_struct", "comm", 16),
    // atomic_t: its `counter` is its first and only member.
    ("signal_struct", "live", 4),
    ("signal_struct", "flags", 4),
    ("signal_struct", "group_exit_code", 4),
    ("signal_struct", "maxrss", 8),
    ("task_struct", "mm", 8),
];

impl KernelLayout {
    /// Resolves the layout from BTF.
    pub fn resolve(btf: &Btf) -> Result<Self, BtfError> {
        let mut found = [0u32; MEMBERS.len()];
        for (slot, &(strukt, name, size)) in found.iter_mut().zip(MEMBERS) {
            let member = btf.member(strukt, name)?;
            let actual = btf.size_of(member.type_id)?;
            if actual != size {
                return Err(BtfError::Malformed(format!(
                    "{strukt}.{name} is {actual} bytes, the programs expect {size}"
                )));
            }
            *slot = member.offset;
        }
        let [
            task_pid,
            task_tgid,
            task_real_parent,
            task_group_leader,
            task_exit_code,
            task_signal,
            task_comm,
            signal_live,
            signal_flags,
            signal_group_exit_code,
            signal_maxrss,
            task_mm,
        ] = found;
        let rss = RssCounters::resolve(btf)?;

        let exit_has_group_dead = match btf.raw_tracepoint_args("sched_process_exit")? {
            1 => false,
            2 => true,
            n => {
                return Err(BtfError::Malformed(format!(
                    "sched_process_exit has {n} arguments, expected 1 or 2"
                )));
            }
        };
        let fork_args = btf.raw_tracepoint_args("sched_process_fork")?;
        if fork_args != 2 {
            return Err(BtfError::Malformed(format!(
                "sched_process_fork has {fork_args} arguments, expected 2"
            )));
        }
        let oom_victim_is_task = btf.raw_tracepoint_args("mark_victim").ok().map(|n| n >= 2);
        Ok(Self {
            oom_victim_is_task,
            offsets: KernelOffsets {
                task_pid,
                task_tgid,
                task_real_parent,
                task_group_leader,
                task_exit_code,
                task_signal,
                task_comm,
                signal_live,
                signal_flags,
                signal_group_exit_code,
                signal_maxrss,
                task_mm,
                mm_rss_stat: rss.offset,
                rss_stride: rss.stride,
                rss_count: rss.count,
                anon_index: rss.anon,
                shmem_index: rss.shmem,
                page_shift: page_shift(),
            },
            exit_has_group_dead,
        })
    }
}

/// Where an mm's resident-page counters are.
struct RssCounters {
    offset: u32,
    stride: u32,
    count: u32,
    anon: u32,
    shmem: u32,
}

impl RssCounters {
    /// `mm->rss_stat` is `struct percpu_counter rss_stat[NR_MM_COUNTERS]`
    /// since 6.2 (read `.count`: the folded value, without per-CPU deltas),
    /// and `struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; }`
    /// before (read `.counter`).
    fn resolve(btf: &Btf) -> Result<Self, BtfError> {
        let member = btf.member("mm_struct", "rss_stat")?;
        let (offset, array) = match btf.array(member.type_id)? {
            Some(_) => (member.offset, member.type_id),
            None => {
                let inner = btf.member_of(member.type_id, "count")?;
                (member.offset + inner.offset, inner.type_id)
            }
        };
        let Some((elem, len)) = btf.array(array)? else {
            return Err(BtfError::Malformed(
                "mm_struct.rss_stat is not an array".into(),
            ));
        };
        let count = btf
            .member_of(elem, "count")
            .or_else(|_| btf.member_of(elem, "counter"))?;
        if btf.size_of(count.type_id)? != 8 {
            return Err(BtfError::Malformed(
                "rss_stat counters are not 64-bit".into(),
            ));
        }
        let index = |name: &str| -> Result<u32, BtfError> {
            let value = btf
                .enum_value(name)
                .ok_or_else(|| BtfError::Missing(format!("enumerator {name}")))?;
            u32::try_from(value)
                .ok()
                .filter(|&v| v < len)
                .ok_or_else(|| BtfError::Malformed(format!("{name} = {value} is out of range")))
        };
        Ok(Self {
            offset,
            stride: btf.size_of(elem)?,
            count: count.offset,
            anon: index("MM_ANONPAGES")?,
            shmem: index("MM_SHMEMPAGES")?,
        })
    }
}

fn page_shift() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).map_or(12, |s| s.trailing_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_running_kernel() {
        let Ok(btf) = Btf::from_kernel() else {
            eprintln!("skipped: no kernel BTF on this machine");
            return;
        };
        let layout = KernelLayout::resolve(&btf).unwrap();
        let o = layout.offsets;
        // Distinct members of one struct cannot share an offset.
        let task = [
            o.task_pid,
            o.task_tgid,
            o.task_real_parent,
            o.task_group_leader,
            o.task_exit_code,
            o.task_signal,
            o.task_comm,
        ];
        for (i, a) in task.iter().enumerate() {
            for b in &task[i + 1..] {
                assert_ne!(a, b, "{o:?}");
            }
        }
        // tgid follows pid in every kernel since 2.6.
        assert_eq!(o.task_tgid, o.task_pid + 4);
        assert!(o.rss_stride == 8 || o.rss_stride >= 16, "{o:?}");
        assert_ne!(o.anon_index, o.shmem_index);
        assert_eq!(1u32 << o.page_shift, 4096);
    }
}
