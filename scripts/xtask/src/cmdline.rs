// SPDX-License-Identifier: MIT OR Apache-2.0
//! The hypervisor's command line (`--cmdline`), checked before anything is built.
//!
//! The grammar is the hypervisor's (`hypervisor/src/bootinfo.rs::parse_options`, which logs
//! any word it cannot use as ``command line: `word`: why (ignored)``). This mirrors it so that
//! a typo stops the run before a boot of minutes; should the two ever drift apart, the
//! hypervisor's own "ignored" lines still reach the report's `problems` (`report::Console`).

use vmcall_proto::config::{MAX_PROBE_MS, MIN_PROBE_MS};

/// One word the hypervisor would ignore, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadWord {
    pub word: String,
    pub why: &'static str,
    /// Its number has more digits than 64 bits hold (then `why` is still the option's own
    /// range, which says what would do).
    pub too_large: bool,
}

impl std::fmt::Display for BadWord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.too_large {
            write!(f, "`{}`: the number is too large (over 64 bits); {}", self.word, self.why)
        } else {
            write!(f, "`{}`: {}", self.word, self.why)
        }
    }
}

/// The fault injections of `cmdline` aimed at a core (`inject=deaf-core:N...`,
/// `inject=hung-core:N`) whose N is not a core of a machine of `cpus` cores: the
/// hypervisor would inject nothing there, and the run would look like a pass of a test that
/// never happened.
pub fn injections_past(cmdline: &str, cpus: u32) -> Vec<String> {
    cmdline
        .split_ascii_whitespace()
        .filter(|w| {
            let Some(rest) = w.strip_prefix("inject=") else { return false };
            let Some((kind, tail)) = rest.split_once(':') else { return false };
            let n = tail.split(':').next().and_then(|n| n.parse::<u64>().ok());
            matches!(kind, "deaf-core" | "hung-core") && n.is_some_and(|n| n >= u64::from(cpus))
        })
        .map(String::from)
        .collect()
}

/// Every word of `cmdline` the hypervisor would not accept.
pub fn check(cmdline: &str) -> Vec<BadWord> {
    let mut bad = vec![];
    for word in cmdline.split_ascii_whitespace() {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        let n = value.parse::<u64>().ok();
        let too_large =
            n.is_none() && !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
        let why = match key {
            "host_control" if value.is_empty() || value == "1" => None,
            "host_control" => Some("expected host_control or host_control=1"),
            "cpus" if n.is_some_and(|n| n >= 1) => None,
            "cpus" => Some("expected cpus=N with N >= 1"),
            "vmxcaps" if value.is_empty() || value == "1" => None,
            "vmxcaps" => Some("expected vmxcaps or vmxcaps=1"),
            "trace" if value.is_empty() || value == "1" => None,
            "trace" => Some("expected trace or trace=1"),
            "budget_ms" if n.is_some_and(|n| n >= 1) => None,
            "budget_ms" => Some("expected budget_ms=N with N >= 1"),
            "caps_deadline_ms" if n.is_some_and(|n| (1..=60_000).contains(&n)) => None,
            "caps_deadline_ms" => Some("expected caps_deadline_ms=N with 1 <= N <= 60000"),
            "ap_answer_ms" if n.is_some_and(|n| (1..=60_000).contains(&n)) => None,
            "ap_answer_ms" => Some("expected ap_answer_ms=N with 1 <= N <= 60000"),
            "duration_ms" if n.is_some_and(|n| (1..=86_400_000).contains(&n)) => None,
            "duration_ms" => Some("expected duration_ms=N with 1 <= N <= 86400000"),
            "probe_ms"
                if n.is_some_and(|n| n == 0 || (MIN_PROBE_MS..=MAX_PROBE_MS).contains(&n)) =>
            {
                None
            }
            "probe_ms" => Some(
                "expected probe_ms=0 (off) or probe_ms=N with 12 <= N <= 10000 (8 silent \
                 periods fence a core: they must outlast 8 times its longest stretch away \
                 from the inbox, 11.6 ms: vmcall_proto::config::LONGEST_STRETCH_US)",
            ),
            "stats_ms" if n.is_some_and(|n| (1..=60_000).contains(&n)) => None,
            "stats_ms" => Some("expected stats_ms=N with 1 <= N <= 60000"),
            "revoke" if ["multicast", "broadcast", "tree"].contains(&value) => None,
            "revoke" => Some("expected revoke=multicast, revoke=broadcast or revoke=tree"),
            "revoke_fanout" if n.is_some_and(|n| (2..=16).contains(&n)) => None,
            "revoke_fanout" => Some("expected revoke_fanout=N with 2 <= N <= 16"),
            "inject" => match value.split_once(':') {
                None if ["silent-ap", "ap-fault", "late-ap"].contains(&value) => None,
                Some(("deaf-core", k)) if k.parse::<usize>().is_ok_and(|k| k >= 1) => None,
                Some(("deaf-core", k)) if deaf_for(k) => None,
                Some(("hung-core", k)) if k.parse::<usize>().is_ok() => None,
                _ => Some(
                    "expected inject=silent-ap, inject=ap-fault, inject=late-ap, \
                     inject=deaf-core:N (N >= 1), \
                     inject=deaf-core:N:MS:AFTER (N >= 1, 1 <= MS <= 60000, AFTER <= 60000: \
                     core N serves no inbox for MS ms from AFTER ms into its guest's run) \
                     or inject=hung-core:N",
                ),
            },
            _ => Some(
                "unknown option (known: cpus=N, vmxcaps, trace, budget_ms=N, \
                 caps_deadline_ms=N, probe_ms=N, duration_ms=N, revoke=multicast|broadcast|tree, \
                 revoke_fanout=N, stats_ms=N, host_control, \
                 inject=silent-ap|ap-fault|late-ap|deaf-core:N|deaf-core:N:MS:AFTER|hung-core:N)",
            ),
        };
        if let Some(why) = why {
            let too_large = too_large && !why.starts_with("unknown option");
            bad.push(BadWord { word: word.to_string(), why, too_large });
        }
    }
    bad
}

/// Whether `N:MS:AFTER` of `inject=deaf-core:N:MS:AFTER` is valid (the hypervisor's
/// `bootinfo` takes the same).
fn deaf_for(rest: &str) -> bool {
    let n: Vec<Option<u64>> = rest.split(':').map(|w| w.parse().ok()).collect();
    matches!(n[..], [Some(core), Some(ms), Some(after)]
        if core >= 1 && (1..=60_000).contains(&ms) && after <= 60_000)
}

/// A line the hypervisor logged about a command-line word it ignored, as a report problem.
pub fn ignored_by_hypervisor(line: &str) -> Option<String> {
    let at = line.find("command line: `")?;
    let what = line[at..].strip_suffix("(ignored)")?.trim_end();
    Some(format!("the hypervisor ignored a word of its {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(cmdline: &str) -> Vec<String> {
        check(cmdline).into_iter().map(|b| b.word).collect::<Vec<_>>()
    }

    #[test]
    fn good_options_pass() {
        assert!(check("").is_empty());
        let all = "cpus=2 vmxcaps vmxcaps=1 trace trace=1 budget_ms=5 caps_deadline_ms=1 caps_deadline_ms=60000 \
                   inject=silent-ap inject=ap-fault inject=late-ap inject=deaf-core:1 inject=deaf-core:2:150:0 revoke=tree revoke=broadcast \
                   revoke_fanout=2 revoke_fanout=16";
        assert_eq!(check(all), []);
    }

    #[test]
    fn unknown_and_malformed_options_are_named() {
        assert_eq!(words("cpu=2 vmxcap --verbose"), ["cpu=2", "vmxcap", "--verbose"]);
        assert_eq!(
            words("cpus=0 cpus=x cpus vmxcaps=2 budget_ms=0 budget_ms=-1 trace=2"),
            ["cpus=0", "cpus=x", "cpus", "vmxcaps=2", "budget_ms=0", "budget_ms=-1", "trace=2"]
        );
        assert_eq!(
            words(
                "caps_deadline_ms=0 caps_deadline_ms=60001 inject inject=deaf-core:0 inject=x \
                 inject=deaf-core:0:5:5 inject=deaf-core:1:0:5 inject=deaf-core:1:5"
            ),
            [
                "caps_deadline_ms=0",
                "caps_deadline_ms=60001",
                "inject",
                "inject=deaf-core:0",
                "inject=x",
                "inject=deaf-core:0:5:5",
                "inject=deaf-core:1:0:5",
                "inject=deaf-core:1:5"
            ]
        );
        assert_eq!(
            words("revoke=star revoke revoke_fanout=1 revoke_fanout=17"),
            ["revoke=star", "revoke", "revoke_fanout=1", "revoke_fanout=17"]
        );
        // The failure detector's period: off, or long enough for a live core's longest
        // stretch away from its inbox (`vmcall_proto::config::MIN_PROBE_MS`).
        assert_eq!(check("probe_ms=0 probe_ms=12 probe_ms=10000"), []);
        assert_eq!(
            words("probe_ms=1 probe_ms=11 probe_ms=10001"),
            ["probe_ms=1", "probe_ms=11", "probe_ms=10001"]
        );
        assert!(check("probe_ms=2")[0].why.contains("longest stretch away from the inbox"));
        // A number past 64 bits: said, with the option's own range.
        let b = &check("budget_ms=99999999999999999999")[0];
        assert_eq!(
            b.to_string(),
            "`budget_ms=99999999999999999999`: the number is too large (over 64 bits); \
             expected budget_ms=N with N >= 1"
        );
        assert!(!check("frob=99999999999999999999")[0].too_large);
        let b = &check("cpus=2 frob")[0];
        assert_eq!(b.word, "frob");
        assert!(b.to_string().starts_with("`frob`: unknown option"), "{b}");
    }

    #[test]
    fn the_hypervisors_ignored_lines_become_problems() {
        assert_eq!(
            ignored_by_hypervisor("[c0] WARN command line: `frob`: unknown option (ignored)")
                .as_deref(),
            Some("the hypervisor ignored a word of its command line: `frob`: unknown option")
        );
        assert_eq!(ignored_by_hypervisor("[c0] command line: cpus=2"), None);
        assert_eq!(ignored_by_hypervisor("[alpha@c0] hello"), None);
    }

    #[test]
    fn an_injection_past_the_last_core_is_named() {
        let line = "cpus=4 inject=deaf-core:3:10:0 inject=deaf-core:4 inject=hung-core:9 \
                    inject=silent-ap inject=hung-core:1";
        assert_eq!(injections_past(line, 4), ["inject=deaf-core:4", "inject=hung-core:9"]);
        assert!(injections_past(line, 10).is_empty());
    }
}
