//! Linux: from /proc.

use std::collections::{HashMap, HashSet};

use super::Stat;

/// Every pid in /proc now.
pub fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

/// The command line, arguments joined by spaces; `None` for kernel threads
/// (which have none) and processes that are gone.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then(|| args.join(" "))
}

/// Whether a process with this pid exists now.
pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` has exited and waits to be reaped.
pub fn is_zombie(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.zombie)
}

/// What /proc/PID/stat says of `pid`; `None` if there is no such process.
pub fn stat(pid: u32) -> Option<Stat> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses /proc/PID/stat. The command name (field 2) is in parentheses and
/// may itself hold spaces and parentheses, so the fields are counted from
/// the last `)`: the first after it is field 3.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).copied();
    let state = field(3)?;
    Some(Stat {
        zombie: matches!(state, "Z" | "X" | "x"),
        pgrp: field(5)?.parse().ok()?,
        start_time: field(22)?.parse().ok()?,
    })
}

/// The thread group (process) id of `pid`, which differs from `pid` when it
/// names a thread; `None` when there is no such task.
pub fn tgid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The parent of `pid`.
pub fn ppid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The process name (`comm`).
pub fn name(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end_matches('\n').to_owned())
}

/// The direct children of `pid`, from the `children` file of each of its
/// threads (CONFIG_PROC_CHILDREN, present in distribution kernels); `None`
/// when the kernel has no such files.
pub fn children(pid: u32) -> Option<Vec<u32>> {
    let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks,
        // ENOENT: the process is gone, so it has no children.
        Err(_) => return Some(Vec::new()),
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        match std::fs::read_to_string(task.path().join("children")) {
            Ok(text) => out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !has_children_files() => {
                return None;
            }
            // The thread exited meanwhile.
            Err(_) => {}
        }
    }
    Some(out)
}

fn has_children_files() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let me = std::process::id();
        std::path::Path::new(&format!("/proc/{me}/task/{me}/children")).exists()
    })
}

/// The live descendants of `root` (not including `root`), from one pass
/// over /proc: for kernels without children files.
pub(super) fn descendants_by_scan(root: u32) -> HashSet<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(all) = procfs::process::all_processes() else {
        return HashSet::new();
    };
    for process in all.flatten() {
        // ENOENT / ESRCH: the process exited during the scan; skip it.
        let Ok(stat) = process.stat() else { continue };
        if let (Ok(pid), Ok(ppid)) = (u32::try_from(stat.pid), u32::try_from(stat.ppid)) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = HashSet::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for &child in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            if found.insert(child) {
                stack.push(child);
            }
        }
    }
    found
}

/// Whether this process runs in a pid namespace of its own (a container
/// without hostPID), where the pids it sees are not the host's: its pid
/// namespace is not the initial one, whose inode the kernel fixes
/// (`PROC_PID_INIT_INO`).
pub fn in_child_pid_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    std::fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() != PROC_PID_INIT_INO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let found = super::super::descendants(std::process::id());
        let scanned = descendants_by_scan(std::process::id());
        let direct = children(std::process::id()).unwrap();
        let parent = ppid(child.id());
        child.kill().ok();
        child.wait().ok();
        assert!(found.contains(&child.id()), "{found:?}");
        assert!(scanned.contains(&child.id()), "{scanned:?}");
        assert!(direct.contains(&child.id()), "{direct:?}");
        assert_eq!(parent, Some(std::process::id()));
        assert!(!found.contains(&std::process::id()));
        assert!(exists(std::process::id()));
        assert!(all_pids().contains(&std::process::id()));
        let me = cmdline(std::process::id()).unwrap();
        assert!(me.contains("watchdog"), "{me}");
        assert_eq!(cmdline(2), None, "kthreadd has no command line");
        assert_eq!(tgid(std::process::id()), Some(std::process::id()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let live = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send((unsafe { libc::gettid() }) as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        assert_eq!(
            tgid(tid),
            Some(std::process::id()),
            "a thread maps to its process"
        );
        done_tx.send(()).unwrap();
        live.join().unwrap();
    }

    #[test]
    fn parses_stat_after_the_last_parenthesis() {
        let line = "4242 (a) b (c) d) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 200 18446744073709551615";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            Stat {
                zombie: false,
                pgrp: 4242,
                start_time: 987654
            }
        );
        assert!(parse_stat("12 (x) Z 1 12 12").is_none());
    }
}
