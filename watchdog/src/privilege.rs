//! Privilege checks for loading kernel programs.

/// Capability numbers (include/uapi/linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Checks that this process may load and attach tracing programs: CAP_BPF
/// and CAP_PERFMON, or CAP_SYS_ADMIN (which implies both). Returns what is
/// missing, in words, when it may not.
pub fn check_bpf() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    let effective = parse_cap_eff(&status).ok_or("no CapEff line in /proc/self/status")?;
    missing_bpf_caps(effective).map_or(Ok(()), Err)
}

/// The effective capability set from the text of /proc/PID/status.
fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn missing_bpf_caps(effective: u64) -> Option<String> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return None;
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|&(cap, _)| !has(cap))
        .map(|(_, name)| name)
        .collect();
    Some(format!("missing {}", missing.join(" and ")))
}

/// Lifts RLIMIT_MEMLOCK as far as allowed: kernels before 5.11 charge BPF
/// maps to it, and its default is too small for the ring buffer. Newer
/// kernels charge the memory cgroup instead, so a failure is not an error.
pub fn raise_memlock() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid resource and pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_capabilities() {
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(root), Some(0x1ff_ffff_ffff));
        assert_eq!(missing_bpf_caps(0x1ff_ffff_ffff), None);
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn names_missing_capabilities() {
        assert_eq!(
            missing_bpf_caps(0).as_deref(),
            Some("missing CAP_BPF and CAP_PERFMON")
        );
        assert_eq!(
            missing_bpf_caps(1 << CAP_BPF).as_deref(),
            Some("missing CAP_PERFMON")
        );
        assert_eq!(missing_bpf_caps((1 << CAP_BPF) | (1 << CAP_PERFMON)), None);
        assert_eq!(missing_bpf_caps(1 << CAP_SYS_ADMIN), None);
    }
}
