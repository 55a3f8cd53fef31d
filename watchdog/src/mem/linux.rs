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

/// The `Pss:` line of /proc/PID/smaps_rollup, in bytes.
pub fn parse_smaps_pss(text: &str) -> Result<Option<u64>, BadField> {
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("Pss:") {
            return parse_kb(value).map(Some).ok_or_else(|| BadField {
                field: "Pss".to_owned(),
                value: value.trim().to_owned(),
            });
        }
    }
    Ok(None)
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
            let text = read_proc(pid, "smaps_rollup")?;
            let pss = parse_smaps_pss(&text)
                .map_err(|bad| MemError::Malformed {
                    pid,
                    file: "smaps_rollup",
                    field: bad.field,
                    value: bad.value,
                })?
                .ok_or(MemError::NoMemory(pid))?;
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
        let text =
            "55fd-7ffe ---p 0 00:00 0 [rollup]\nRss:\t1744 kB\nPss:\t632 kB\nPss_Anon:\t112 kB\n";
        assert_eq!(parse_smaps_pss(text).unwrap(), Some(632 * 1024));
        assert_eq!(parse_smaps_pss("Rss: 1 kB\n").unwrap(), None);
        assert!(parse_smaps_pss("Pss: x kB\n").is_err());
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
