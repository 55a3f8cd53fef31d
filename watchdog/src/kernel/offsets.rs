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
        ] = found;

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
        Ok(Self {
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
                reserved: 0,
            },
            exit_has_group_dead,
        })
    }
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
    }
}
