//! Which form of each kernel program the running kernel took, and why a
//! fallback was used: told once at start-up, and in `watchdog status`.

use std::{collections::BTreeMap, fmt};

use serde::Serialize;

/// How `rss_stat` (the memory counters' tracepoint) is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RssStatForm {
    /// A typed (BTF) tracepoint: plain loads on every page fault.
    Btf,
    /// A raw tracepoint, where the verifier refuses the typed form.
    Raw,
}

/// Which `sched_process_exit` program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitForm {
    /// The kernel passes `group_dead` (6.16 and later).
    GroupDead,
    /// The program works out the last thread from `signal->live`.
    Legacy,
}

/// Which `mark_victim` program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VictimForm {
    /// The tracepoint passes the task (6.8 and later).
    Task,
    /// The tracepoint passes only the pid.
    Pid,
}

impl RssStatForm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Btf => "btf",
            Self::Raw => "raw",
        }
    }
}

impl ExitForm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GroupDead => "group_dead",
            Self::Legacy => "legacy",
        }
    }
}

impl VictimForm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Pid => "pid",
        }
    }
}

/// The forms the kernel programs were attached in, each fallback with its
/// reason (`None` for the preferred form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Forms {
    pub rss_stat: RssStatForm,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_stat_reason: Option<String>,
    pub exit: ExitForm,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_reason: Option<String>,
    /// `None`: the kernel has no `mark_victim` tracepoint.
    pub mark_victim: Option<VictimForm>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mark_victim_reason: Option<String>,
}

/// The program names, in the order they are told.
pub const PROGRAMS: [&str; 3] = ["rss_stat", "sched_process_exit", "mark_victim"];

impl Forms {
    /// Each program's name and its form, with the reason in parentheses
    /// when it is a fallback: `("rss_stat", "raw (...)")`.
    pub fn entries(&self) -> [(&'static str, String); 3] {
        let told = |form: &str, reason: &Option<String>| match reason {
            Some(reason) => format!("{form} ({reason})"),
            None => form.to_owned(),
        };
        [
            (
                PROGRAMS[0],
                told(self.rss_stat.as_str(), &self.rss_stat_reason),
            ),
            (PROGRAMS[1], told(self.exit.as_str(), &self.exit_reason)),
            (
                PROGRAMS[2],
                told(
                    self.mark_victim.map_or("none", VictimForm::as_str),
                    &self.mark_victim_reason,
                ),
            ),
        ]
    }

    /// The entries as a map (the status snapshot's `kernel_programs`).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.entries()
            .into_iter()
            .map(|(name, form)| (name.to_owned(), form))
            .collect()
    }
}

/// `rss_stat=btf, sched_process_exit=group_dead, mark_victim=task`, each
/// fallback followed by its reason in parentheses.
impl fmt::Display for Forms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, form)) in self.entries().iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name}={form}")?;
        }
        Ok(())
    }
}

/// The line of a verifier log that says why it refused a program: the
/// last line that is not an instruction, a register state, a source line
/// or a statistic. `None` when the log has no such line.
pub fn verifier_reason(log: &str) -> Option<&str> {
    log.lines().map(str::trim).rev().find(|line| {
        let numbered = line
            .split_once(':')
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        let register = line.starts_with('R')
            && line[1..].starts_with(|c: char| c.is_ascii_digit())
            && line.contains('=');
        !line.is_empty()
            && !numbered
            && !register
            && !line.starts_with(';')
            && !line.starts_with("from ")
            && !line.starts_with("processed ")
            && !line.starts_with("verification time")
            && !line.starts_with("stack depth")
            && !line.starts_with("func#")
            && !line.starts_with("last_idx")
            && !line.starts_with("regs=")
            && !line.starts_with("parent ")
            && !line.starts_with("-- ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preferred() -> Forms {
        Forms {
            rss_stat: RssStatForm::Btf,
            rss_stat_reason: None,
            exit: ExitForm::GroupDead,
            exit_reason: None,
            mark_victim: Some(VictimForm::Task),
            mark_victim_reason: None,
        }
    }

    fn fallbacks() -> Forms {
        Forms {
            rss_stat: RssStatForm::Raw,
            rss_stat_reason: Some(
                "BTF form refused by the verifier: Type 'atomic_long_t' is not a struct".into(),
            ),
            exit: ExitForm::Legacy,
            exit_reason: Some("no group_dead argument before 6.16".into()),
            mark_victim: None,
            mark_victim_reason: Some("no mark_victim tracepoint".into()),
        }
    }

    #[test]
    fn displays_each_program_and_each_fallback_reason() {
        assert_eq!(
            preferred().to_string(),
            "rss_stat=btf, sched_process_exit=group_dead, mark_victim=task"
        );
        assert_eq!(
            fallbacks().to_string(),
            "rss_stat=raw (BTF form refused by the verifier: Type 'atomic_long_t' is not a \
             struct), sched_process_exit=legacy (no group_dead argument before 6.16), \
             mark_victim=none (no mark_victim tracepoint)"
        );
        let pid = Forms {
            mark_victim: Some(VictimForm::Pid),
            mark_victim_reason: Some("the tracepoint passes a pid before 6.8".into()),
            ..preferred()
        };
        assert!(
            pid.to_string()
                .ends_with("mark_victim=pid (the tracepoint passes a pid before 6.8)"),
            "{pid}"
        );
    }

    #[test]
    fn serializes_forms_and_only_the_reasons_there_are() {
        let json = serde_json::to_value(preferred()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"rss_stat": "btf", "exit": "group_dead", "mark_victim": "task"})
        );
        let json = serde_json::to_value(fallbacks()).unwrap();
        assert_eq!(json["rss_stat"], "raw");
        assert_eq!(json["exit"], "legacy");
        assert_eq!(json["mark_victim"], serde_json::Value::Null);
        assert_eq!(
            json["exit_reason"], "no group_dead argument before 6.16",
            "{json}"
        );
        assert!(
            json["rss_stat_reason"]
                .as_str()
                .unwrap()
                .contains("atomic_long_t")
        );
    }

    #[test]
    fn the_map_names_every_program() {
        let map = fallbacks().to_map();
        assert_eq!(map.len(), 3);
        assert_eq!(
            map["sched_process_exit"],
            "legacy (no group_dead argument before 6.16)"
        );
        assert!(map["rss_stat"].starts_with("raw ("), "{map:?}");
        assert_eq!(map["mark_victim"], "none (no mark_victim tracepoint)");
        assert_eq!(preferred().to_map()["rss_stat"], "btf");
    }

    #[test]
    fn the_verifier_reason_is_its_error_line() {
        let log = "reg type unsupported for arg#0 function rss_stat#12\n\
                   0: R1=ctx() R10=fp0\n\
                   ; let mm = ctx.arg(0);\n\
                   0: (79) r6 = *(u64 *)(r1 +8)          ; R1=ctx() R6_w=ptr_mm_struct()\n\
                   1: (61) r2 = *(u32 *)(r6 +1040)\n\
                   Type 'atomic_long_t' is not a struct\n\
                   processed 2 insns (limit 1000000) max_states_per_insn 0 total_states 0 \
                   peak_states 0 mark_read 0\n";
        assert_eq!(
            verifier_reason(log),
            Some("Type 'atomic_long_t' is not a struct")
        );
        assert_eq!(verifier_reason("processed 0 insns\n\n"), None);
        assert_eq!(verifier_reason(""), None);
    }
}
