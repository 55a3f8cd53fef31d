//! macOS: from libproc and sysctl.

use super::Stat;

/// Whether a process with this pid exists now.
pub fn exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks; EPERM means it exists but is not ours.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__error() == libc::EPERM }
}

/// Every pid now.
pub fn all_pids() -> Vec<u32> {
    list(|buf, size| unsafe { libc::proc_listallpids(buf, size) })
}

/// The direct children of `pid`.
pub fn children(pid: u32) -> Option<Vec<u32>> {
    let Ok(ppid) = libc::pid_t::try_from(pid) else {
        return Some(Vec::new());
    };
    Some(list(|buf, size| unsafe {
        libc::proc_listchildpids(ppid, buf, size)
    }))
}

/// The parent of `pid`.
pub fn ppid(pid: u32) -> Option<u32> {
    bsdinfo(pid).map(|info| info.pbi_ppid)
}

/// Whether `pid` has exited and waits to be reaped.
pub fn is_zombie(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.zombie)
}

/// What libproc says of `pid`; `None` if there is no such process.
pub fn stat(pid: u32) -> Option<Stat> {
    let info = bsdinfo(pid)?;
    Some(Stat {
        zombie: info.pbi_status == libc::SZOMB,
        pgrp: info.pbi_pgid,
        start_time: info
            .pbi_start_tvsec
            .saturating_mul(1_000_000)
            .saturating_add(info.pbi_start_tvusec),
    })
}

/// The process's BSD info from libproc.
fn bsdinfo(pid: u32) -> Option<libc::proc_bsdinfo> {
    let pid = libc::c_int::try_from(pid).ok().filter(|&p| p > 0)?;
    let mut info = std::mem::MaybeUninit::<libc::proc_bsdinfo>::zeroed();
    let size = size_of::<libc::proc_bsdinfo>() as libc::c_int;
    // SAFETY: a buffer of the size passed, for this flavor.
    let n = unsafe {
        libc::proc_pidinfo(
            pid,
            libc::PROC_PIDTBSDINFO,
            0,
            info.as_mut_ptr().cast(),
            size,
        )
    };
    // SAFETY: filled when the whole struct was returned.
    (n == size).then(|| unsafe { info.assume_init() })
}

/// The process name.
pub fn name(pid: u32) -> Option<String> {
    let pid = libc::c_int::try_from(pid).ok()?;
    let mut buf = [0u8; 256];
    // SAFETY: a buffer of the size passed.
    let n = unsafe { libc::proc_name(pid, buf.as_mut_ptr().cast(), buf.len() as u32) };
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned())
}

/// Calls a libproc lister with a buffer that grows until it fits.
fn list(call: impl Fn(*mut libc::c_void, libc::c_int) -> libc::c_int) -> Vec<u32> {
    let mut capacity = 1024usize;
    loop {
        let mut buf = vec![0 as libc::pid_t; capacity];
        let bytes = (capacity * size_of::<libc::pid_t>()) as libc::c_int;
        let n = call(buf.as_mut_ptr().cast(), bytes);
        if n < 0 {
            return Vec::new();
        }
        let n = n as usize;
        if n < capacity {
            buf.truncate(n);
            return buf
                .into_iter()
                .filter(|&p| p > 0)
                .map(|p| p as u32)
                .collect();
        }
        capacity *= 2;
    }
}

/// The command line from KERN_PROCARGS2: argc, the executable path, NUL
/// padding, then argc NUL-terminated arguments.
pub fn cmdline(pid: u32) -> Option<String> {
    let pid = libc::c_int::try_from(pid).ok()?;
    let mut mib = [libc::CTL_KERN, libc::KERN_PROCARGS2, pid];
    let mut size: libc::size_t = 0;
    // SAFETY: size query with a null buffer.
    let rc = unsafe {
        libc::sysctl(
            mib.as_mut_ptr(),
            3,
            std::ptr::null_mut(),
            &mut size,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 || size < 4 {
        return None;
    }
    let mut buf = vec![0u8; size];
    // SAFETY: a buffer of the size the kernel asked for.
    let rc = unsafe {
        libc::sysctl(
            mib.as_mut_ptr(),
            3,
            buf.as_mut_ptr().cast(),
            &mut size,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return None;
    }
    buf.truncate(size);
    let argc = i32::from_ne_bytes(buf.get(..4)?.try_into().ok()?);
    let rest = &buf[4..];
    let path_end = rest.iter().position(|&b| b == 0)?;
    let args_start = path_end + rest[path_end..].iter().position(|&b| b != 0)?;
    let args: Vec<String> = rest[args_start..]
        .split(|&b| b == 0)
        .take(usize::try_from(argc).ok()?)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then(|| args.join(" "))
}
