//! Linux: /proc/PID/status (and smaps_rollup for PSS).

use std::io;

use super::{Charged, MemError, Metric, Reading};

/// The memory lines of /proc/PID/status, in bytes, each `None` when the
/// line is absent (older kernels lack RssAnon/RssShmem/RssFile; kernel
/// threads have none of them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusMemory {
    pub vm_rss: Option<u64>,
    pub rss_anon: Option<u64>,
    pub rss_file: Option<u64>,
    pub rss_shmem: Option<u64>,
    pub vm_swap: Option<u64>,
}

/// A status line that is present but not a `<number> kB` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadField {
    pub field: String,
    pub value: String,
}

/// Parses the memory lines of /proc/PID/status by field presence: a field
/// that is there and zero is a valid zero, a field that is missing is
/// `None`, and a field that is there but malformed is an error, never a 0.
pub fn parse_status(text: &str) -> Result<StatusMemory, BadField> {
    let mut out = StatusMemory::default();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match name {
            "VmRSS" => &mut out.vm_rss,
            "RssAnon" => &mut out.rss_anon,
            "RssFile" => &mut out.rss_file,
            "RssShmem" => &mut out.rss_shmem,
            "VmSwap" => &mut out.vm_swap,
            _ => continue,
        };
        *slot = Some(parse_kb(value).ok_or_else(|| BadField {
            field: name.to_owned(),
            value: value.trim().to_owned(),
        })?);
    }
    Ok(out)
}

/// `"   1234 kB"` -> 1234 * 1024, checked.
fn parse_kb(value: &str) -> Option<u64> {
    let mut words = value.split_whitespace();
    let number: u64 = words.next()?.parse().ok()?;
    match (words.next(), words.next()) {
        (Some("kB"), None) => number.checked_mul(1024),
        _ => None,
    }
}

/// The lines of /proc/PID/smaps_rollup used here, in bytes, each `None`
/// when absent (Pss_Anon and Pss_Shmem exist since Linux 5.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmapsRollup {
    pub rss: Option<u64>,
    pub pss: Option<u64>,
    pub pss_anon: Option<u64>,
    pub pss_shmem: Option<u64>,
}

/// Parses /proc/PID/smaps_rollup by field presence, as [`parse_status`].
pub fn parse_smaps_rollup(text: &str) -> Result<SmapsRollup, BadField> {
    let mut out = SmapsRollup::default();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match name {
            "Rss" => &mut out.rss,
            "Pss" => &mut out.pss,
            "Pss_Anon" => &mut out.pss_anon,
            "Pss_Shmem" => &mut out.pss_shmem,
            _ => continue,
        };
        *slot = Some(parse_kb(value).ok_or_else(|| BadField {
            field: name.to_owned(),
            value: value.trim().to_owned(),
        })?);
    }
    Ok(out)
}

fn read_rollup(pid: u32) -> Result<SmapsRollup, MemError> {
    parse_smaps_rollup(&read_proc(pid, "smaps_rollup")?).map_err(|bad| MemError::Malformed {
        pid,
        file: "smaps_rollup",
        field: bad.field,
        value: bad.value,
    })
}

/// Reads one process of a tree: its share of its anonymous and shmem
/// pages (Pss_Anon + Pss_Shmem), so that pages it shares with others of
/// the tree (copy-on-write after fork, shared memory) are charged once
/// over the tree. Falls back to [`Metric::Charged`] on kernels without
/// those lines. Costs about 10 ms per GiB mapped.
pub fn read_shared(pid: u32) -> Result<Reading, MemError> {
    let rollup = match read_rollup(pid) {
        Ok(rollup) => rollup,
        // smaps_rollup needs ptrace access (PTRACE_MODE_READ, unlike
        // status): another user's process, read without privilege, is
        // charged all it has.
        Err(MemError::Io { source, .. })
            if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) =>
        {
            return read(pid, Metric::Charged);
        }
        Err(err) => return Err(err),
    };
    let (Some(anon), Some(shmem)) = (rollup.pss_anon, rollup.pss_shmem) else {
        // No mm (a zombie or kernel thread reads as empty), or a kernel
        // before 5.6.
        return read(pid, Metric::Charged);
    };
    Ok(Reading {
        pid,
        anon_bytes: Some(anon),
        shmem_bytes: Some(shmem),
        file_bytes: None,
        swap_bytes: None,
        vm_rss_bytes: rollup.rss,
        charged_bytes: anon.saturating_add(shmem),
        metric: Charged::PssAnonShmem,
    })
}

fn read_proc(pid: u32, file: &str) -> Result<String, MemError> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|source| {
        match source.raw_os_error() {
            // ENOENT: no such process; ESRCH: it exited while being read.
            Some(libc::ENOENT | libc::ESRCH) => MemError::NoProcess(pid),
            _ if source.kind() == io::ErrorKind::NotFound => MemError::NoProcess(pid),
            _ => MemError::Io { pid, source },
        }
    })
}

/// Reads one process.
pub fn read(pid: u32, metric: Metric) -> Result<Reading, MemError> {
    let status = parse_status(&read_proc(pid, "status")?).map_err(|bad| MemError::Malformed {
        pid,
        file: "status",
        field: bad.field,
        value: bad.value,
    })?;
    let (charged_bytes, metric) = match metric {
        Metric::Charged => match (status.rss_anon, status.rss_shmem, status.vm_rss) {
            (Some(anon), Some(shmem), _) => (anon.saturating_add(shmem), Charged::AnonShmem),
            (_, _, Some(rss)) => (rss, Charged::VmrssFallback),
            _ => return Err(MemError::NoMemory(pid)),
        },
        Metric::Rss => (status.vm_rss.ok_or(MemError::NoMemory(pid))?, Charged::Rss),
        Metric::Pss => {
            let pss = read_rollup(pid)?.pss.ok_or(MemError::NoMemory(pid))?;
            (pss, Charged::Pss)
        }
    };
    Ok(Reading {
        pid,
        anon_bytes: status.rss_anon,
        shmem_bytes: status.rss_shmem,
        file_bytes: status.rss_file,
        swap_bytes: status.vm_swap,
        vm_rss_bytes: status.vm_rss,
        charged_bytes,
        metric,
    })
}

/// Whether `pid` shares its address space with its parent, itself one of
/// `members` (a CLONE_VM child: vfork, posix_spawn, before exec). Asked of
/// the kernel with kcmp(KCMP_VM); `false` where kcmp is unavailable.
pub(super) fn shares_parent_mm(pid: u32, members: &std::collections::HashSet<u32>) -> bool {
    /// include/uapi/linux/kcmp.h
    const KCMP_VM: libc::c_long = 1;
    let Some(parent) = crate::procs::ppid(pid).filter(|p| members.contains(p)) else {
        return false;
    };
    // SAFETY: kcmp takes two pids, a type and two unused arguments, and
    // returns 0 when the resource is the same.
    let same = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            libc::c_long::from(pid as libc::pid_t),
            libc::c_long::from(parent as libc::pid_t),
            KCMP_VM,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    same == 0
}

/// Whether `pid` still has its memory: not gone, not a zombie (whose
/// /proc/PID/statm reads all zeros once its mm is released).
pub(super) fn has_memory(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .is_some_and(|pages| pages > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODERN: &str = "Name:\tnode\nVmPeak:\t  900 kB\nVmRSS:\t    7340032 kB\n\
        RssAnon:\t  102400 kB\nRssFile:\t 7237632 kB\nRssShmem:\t       0 kB\nVmSwap:\t       8 kB\n";

    #[test]
    fn reads_fields_by_presence() {
        let m = parse_status(MODERN).unwrap();
        assert_eq!(m.vm_rss, Some(7_340_032 * 1024));
        assert_eq!(m.rss_anon, Some(102_400 * 1024));
        assert_eq!(m.rss_file, Some(7_237_632 * 1024));
        assert_eq!(m.rss_shmem, Some(0), "present and zero is a valid zero");
        assert_eq!(m.vm_swap, Some(8 * 1024));
    }

    #[test]
    fn anon_zero_with_shmem_is_a_reading() {
        let m = parse_status("RssAnon:\t0 kB\nRssShmem:\t512 kB\nVmRSS:\t900 kB\n").unwrap();
        assert_eq!(m.rss_anon, Some(0));
        assert_eq!(m.rss_shmem, Some(512 * 1024));
    }

    #[test]
    fn missing_fields_are_none() {
        // An old kernel: VmRSS only.
        let m = parse_status("Name:\tx\nVmRSS:\t100 kB\n").unwrap();
        assert_eq!(m.vm_rss, Some(100 * 1024));
        assert_eq!(m.rss_anon, None);
        assert_eq!(m.rss_shmem, None);
        // A kernel thread: nothing at all.
        assert_eq!(
            parse_status("Name:\tkthreadd\n").unwrap(),
            StatusMemory::default()
        );
    }

    #[test]
    fn malformed_values_are_errors_not_zero() {
        for text in [
            "RssAnon:\tlots kB\n",
            "RssAnon:\t12 MB\n",
            "RssAnon:\t12\n",
            "RssAnon:\t\n",
            "RssAnon:\t-4 kB\n",
            "RssAnon:\t12 kB extra\n",
        ] {
            let err = parse_status(text).unwrap_err();
            assert_eq!(err.field, "RssAnon", "{text:?}");
        }
    }

    #[test]
    fn huge_values() {
        // The largest kB count that fits in bytes, and one past it.
        let max_kb = u64::MAX / 1024;
        let m = parse_status(&format!("RssAnon:\t{max_kb} kB\n")).unwrap();
        assert_eq!(m.rss_anon, Some(max_kb * 1024));
        assert!(parse_status(&format!("RssAnon:\t{} kB\n", max_kb + 1)).is_err());
        assert!(parse_status("RssAnon:\t99999999999999999999999 kB\n").is_err());
    }

    #[test]
    fn pss_from_smaps_rollup() {
        let text = "55fd-7ffe ---p 0 00:00 0 [rollup]\nRss:\t1744 kB\nPss:\t632 kB\n\
            Pss_Dirty:\t100 kB\nPss_Anon:\t112 kB\nPss_File:\t520 kB\nPss_Shmem:\t0 kB\n";
        let r = parse_smaps_rollup(text).unwrap();
        assert_eq!(r.rss, Some(1744 * 1024));
        assert_eq!(r.pss, Some(632 * 1024));
        assert_eq!(r.pss_anon, Some(112 * 1024));
        assert_eq!(r.pss_shmem, Some(0), "present and zero");
        assert_eq!(parse_smaps_rollup("Rss: 1 kB\n").unwrap().pss, None);
        assert!(parse_smaps_rollup("Pss: x kB\n").is_err());
        assert!(parse_smaps_rollup("Pss_Anon: 1 MB\n").is_err());
    }

    /// A forked child shares its parent's pages: RssAnon counts them in
    /// both, Pss_Anon splits them, so the tree's sum counts them once.
    #[test]
    fn shared_pages_are_charged_once_over_a_tree() {
        const LEN: usize = 32 << 20;
        // SAFETY: a fresh private anonymous mapping, touched below.
        let block = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(block, libc::MAP_FAILED);
        for offset in (0..LEN).step_by(4096) {
            // SAFETY: inside the mapping.
            unsafe { block.cast::<u8>().add(offset).write_volatile(1) };
        }
        // SAFETY: the child only waits for signals (async-signal-safe)
        // until it is killed.
        let child = unsafe { libc::fork() };
        if child == 0 {
            loop {
                // SAFETY: as above.
                unsafe { libc::pause() };
            }
        }
        assert!(child > 0);
        let me = std::process::id();
        let pids = [me, child as u32];
        let rss = super::super::read_group(pids, Metric::Charged).charged_bytes;
        let tree = super::super::read_tree(&pids);
        // SAFETY: our own child and mapping.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
            libc::munmap(block, LEN);
        }
        assert_eq!(tree.metric, Some(Charged::PssAnonShmem));
        assert_eq!(tree.members.len(), 2);
        assert!(
            rss >= tree.charged_bytes + 24 * (1 << 20),
            "{rss} vs {tree:?}"
        );
        let one = super::super::read_tree(&[me]);
        assert_eq!(one.metric, Some(Charged::AnonShmem), "one process: its own");
    }

    #[test]
    fn reads_this_process() {
        let me = read(std::process::id(), Metric::Charged).unwrap();
        assert_eq!(me.metric, Charged::AnonShmem);
        assert_eq!(
            me.charged_bytes,
            me.anon_bytes.unwrap() + me.shmem_bytes.unwrap()
        );
        assert!(me.vm_rss_bytes.unwrap() >= me.anon_bytes.unwrap());
        let pss = read(std::process::id(), Metric::Pss).unwrap();
        assert_eq!(pss.metric, Charged::Pss);
        assert!(pss.charged_bytes > 0);
        assert!(matches!(
            read(u32::MAX / 2, Metric::Charged),
            Err(MemError::NoProcess(_))
        ));
    }
}
