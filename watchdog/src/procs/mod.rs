//! Process-table queries: existence, command lines, descendants.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "macos")]
mod macos;

#[cfg(target_os = "linux")]
pub use linux::{all_pids, children, cmdline, exists, name, ppid, tgid};
#[cfg(target_os = "macos")]
pub use macos::{all_pids, children, cmdline, exists, name, ppid};

use std::collections::HashSet;

/// The live descendants of `root` (not including `root`), walking the
/// process tree down from it.
pub fn descendants(root: u32) -> HashSet<u32> {
    let mut found = HashSet::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        let Some(kids) = children(pid) else {
            // A Linux kernel without children files: one pass over /proc.
            #[cfg(target_os = "linux")]
            return linux::descendants_by_scan(root);
            #[cfg(not(target_os = "linux"))]
            return found;
        };
        for child in kids {
            if found.insert(child) {
                stack.push(child);
            }
        }
    }
    found
}

/// The processes whose full command line (arguments joined by spaces)
/// matches `pattern`, leaving out this process. Matching the whole command
/// line, not the short name, is what finds `bun opencode` and `node
/// opencode` alike.
pub fn matching(pattern: &regex::Regex) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found: Vec<(u32, String)> = all_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter_map(|pid| cmdline(pid).map(|cmd| (pid, cmd)))
        .filter(|(_, cmd)| pattern.is_match(cmd))
        .collect();
    found.sort_unstable_by_key(|&(pid, _)| pid);
    found
}

/// The pids of `pids` that do not descend from another of them: counting
/// each one's tree then counts every process once.
pub fn outermost(pids: &[u32]) -> Vec<u32> {
    let mut inside = HashSet::new();
    for &pid in pids {
        inside.extend(descendants(pid));
    }
    pids.iter()
        .copied()
        .filter(|p| !inside.contains(p))
        .collect()
}
