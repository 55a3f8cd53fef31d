//! macOS: phys_footprint, from task_info(TASK_VM_INFO) where a task port can
//! be had (our own process, or root with the right entitlements), else from
//! proc_pid_rusage(RUSAGE_INFO_V4), which any process may ask of its own
//! user's processes.

use std::mem::{MaybeUninit, size_of};

use mach2::{
    kern_return::KERN_SUCCESS,
    mach_port::mach_port_deallocate,
    message::mach_msg_type_number_t,
    port::{MACH_PORT_NULL, mach_port_name_t},
    task::task_info,
    task_info::{TASK_VM_INFO, task_vm_info},
    traps::{mach_task_self, task_for_pid},
    vm_types::natural_t,
};

use super::{Charged, MemError, Metric, Reading};

/// Reads one process. Only the charged figure (phys_footprint) exists on
/// macOS; `rss` asks for the resident size instead and `pss` is not
/// available.
pub fn read(pid: u32, metric: Metric) -> Result<Reading, MemError> {
    let Ok(cpid) = libc::c_int::try_from(pid) else {
        return Err(MemError::NoProcess(pid));
    };
    let (footprint, resident) = match task_vm_info_of(cpid) {
        Some(info) => (info.phys_footprint, Some(info.resident_size)),
        None => rusage_footprint(pid, cpid)?,
    };
    let (charged_bytes, charged) = match metric {
        Metric::Charged => (footprint, Charged::PhysFootprint),
        Metric::Rss => (resident.ok_or(MemError::Unsupported)?, Charged::Rss),
        Metric::Pss => return Err(MemError::Unsupported),
    };
    Ok(Reading {
        pid,
        anon_bytes: None,
        shmem_bytes: None,
        file_bytes: None,
        swap_bytes: None,
        vm_rss_bytes: resident,
        charged_bytes,
        metric: charged,
    })
}

/// Reads one process of a tree. macOS reports no per-process share of a
/// page (nothing like PSS), so a tree is charged its members'
/// phys_footprint.
pub fn read_shared(pid: u32) -> Result<Reading, MemError> {
    read(pid, Metric::Charged)
}

/// A vfork child on macOS shares nothing it is charged for: never.
pub(super) fn shares_parent_mm(_pid: u32, _members: &std::collections::HashSet<u32>) -> bool {
    false
}

/// task_info(TASK_VM_INFO) through a task port, when one can be had.
fn task_vm_info_of(pid: libc::c_int) -> Option<task_vm_info> {
    let mut task: mach_port_name_t = MACH_PORT_NULL;
    // SAFETY: valid out pointer; failure (no right to the port) is reported
    // through the return code.
    let kr = unsafe { task_for_pid(mach_task_self(), pid, &mut task) };
    if kr != KERN_SUCCESS {
        return None;
    }
    let mut info = MaybeUninit::<task_vm_info>::zeroed();
    let mut count = (size_of::<task_vm_info>() / size_of::<natural_t>()) as mach_msg_type_number_t;
    // SAFETY: the buffer holds `count` natural_t words; the kernel fills at
    // most that many (older systems fewer, leaving zeros).
    let kr = unsafe { task_info(task, TASK_VM_INFO, info.as_mut_ptr().cast(), &mut count) };
    // SAFETY: releasing the send right task_for_pid gave us.
    unsafe { mach_port_deallocate(mach_task_self(), task) };
    // SAFETY: zero-initialized plain integers, filled by the kernel.
    (kr == KERN_SUCCESS).then(|| unsafe { info.assume_init() })
}

/// proc_pid_rusage(RUSAGE_INFO_V4): phys_footprint and resident size.
fn rusage_footprint(pid: u32, cpid: libc::c_int) -> Result<(u64, Option<u64>), MemError> {
    let mut info = MaybeUninit::<libc::rusage_info_v4>::zeroed();
    // SAFETY: a buffer the size of the V4 struct, as the flavor requires.
    let rc = unsafe { libc::proc_pid_rusage(cpid, libc::RUSAGE_INFO_V4, info.as_mut_ptr().cast()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::ESRCH) => MemError::NoProcess(pid),
            _ => MemError::Io { pid, source: err },
        });
    }
    // SAFETY: filled by the kernel on success.
    let info = unsafe { info.assume_init() };
    Ok((info.ri_phys_footprint, Some(info.ri_resident_size)))
}

/// Whether `pid` is still there to be read.
pub(super) fn has_memory(pid: u32) -> bool {
    crate::procs::exists(pid)
}
