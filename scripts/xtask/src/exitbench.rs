// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask bench exits`: the cost of a VM exit and its VM entry per exit reason, in
//! Bochs where the TSC counts emulated instructions (exact and repeatable). One guest (the
//! `exitbench` workload, `configs/bench-exits.toml`) times round trips of each exit kind
//! and reads the hypervisor's own share from its telemetry page; the config is booted with
//! 2, 8 and 15 emulated CPUs (15 is Bochs's limit), the other cores running no guest, to
//! show whether the cost of a VM entry depends on the core count. A benchmark that prints
//! figures, not a pass/fail test; `--before` puts an earlier run's JSON next to them.
//!
//! Owns the config variants and the parsing of the `bench exits` lines; calls `run` and
//! the bench tables' helper.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// What Bochs itself spends on a VMCALL exit and the VMRESUME back (its own emulation of
/// the two transitions), as measured for `../shared/EMULATORS.md`: the floor under any
/// round trip. Not measured by this bench.
pub const FLOOR: u64 = 49;

/// The CPU counts measured by default.
pub const CPUS: [u32; 3] = [2, 8, 15];

/// The exits tabulated against the core count, and who answers them: the fast path (the
/// exit landing, `hypervisor::fastexit`) or the run loop (`hypervisor::exits`).
pub const SCALING: [(&str, &str); 4] = [
    ("null_hypercall", "fast path"),
    ("wrmsr_pat", "run loop"),
    ("io_out", "run loop"),
    ("hlt_timer", "run loop"),
];

/// One exit kind at one CPU count, in emulated instructions.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub cpus: u32,
    pub kind: String,
    pub n: u64,
    /// Median round trip as the guest times it (RDTSC before and after one exiting
    /// instruction, the pair's own cost `rdtsc_pair` included).
    pub rtt_median: u64,
    pub rtt_min: u64,
    pub rtt_max: u64,
    /// The hypervisor's time per exit, from the VM exit to the next VM entry (its
    /// telemetry's `hypervisor_tsc` over the exits, averaged over the timed ones).
    pub hv_per_exit: u64,
    pub exits: u64,
    /// Two RDTSCs back to back: what the timing adds to `rtt_median`.
    pub rdtsc_pair: u64,
}

impl Row {
    /// The round trip without the timing's own cost.
    pub fn round_trip(&self) -> u64 {
        self.rtt_median.saturating_sub(self.rdtsc_pair)
    }
}

/// The `key=value` words of a line.
fn fields(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split_whitespace().filter_map(|w| w.split_once('='))
}

/// The rows of one run's serial log (`bench exits kind=...` lines of guest `exits`).
pub fn parse(serial: &str, cpus: u32) -> Result<Vec<Row>> {
    let mut rows = vec![];
    for line in serial.lines().filter(|l| l.starts_with("[exits@") && l.contains("] bench exits "))
    {
        let text = |k: &str| fields(line).find(|(n, _)| *n == k).map(|(_, v)| v);
        let num = |k: &str| -> Result<u64> {
            text(k).and_then(|v| v.parse().ok()).with_context(|| format!("no {k} in {line}"))
        };
        rows.push(Row {
            cpus,
            kind: text("kind").context("no kind")?.to_string(),
            n: num("n")?,
            rtt_median: num("rtt_median")?,
            rtt_min: num("rtt_min")?,
            rtt_max: num("rtt_max")?,
            hv_per_exit: num("hv_per_exit")?,
            exits: num("exits")?,
            rdtsc_pair: num("rdtsc_pair")?,
        });
    }
    if rows.is_empty() {
        bail!("no `bench exits` lines");
    }
    Ok(rows)
}

fn config(cpus: u32) -> Result<String> {
    let base = std::fs::read_to_string(crate::workspace_root().join("configs/bench-exits.toml"))?;
    Ok(base.replacen("cpus = 2", &format!("cpus = {cpus}"), 1))
}

fn measure(cpus: u32) -> Result<Vec<Row>> {
    let r = crate::bench::boot_variant(&format!("bench-exits-{cpus}cpu.toml"), &config(cpus)?, "")?;
    if r.outcome != "ok" {
        bail!("the exits run with {cpus} CPUs ended {}: {:?}", r.outcome, r.problems);
    }
    parse(&std::fs::read_to_string(&r.serial_log)?, cpus)
        .with_context(|| format!("in {}", r.serial_log))
}

fn find<'a>(rows: &'a [Row], cpus: u32, kind: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.cpus == cpus && r.kind == kind)
}

fn or_dash(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The two tables: per exit kind at the fewest CPUs measured, and the null hypercall at
/// every CPU count; `before` columns where an earlier run is given.
pub fn render(rows: &[Row], before: &[Row]) -> String {
    let mut out = String::new();
    let Some(first) = rows.iter().map(|r| r.cpus).min() else { return out };
    out += &format!(
        "VM exit round trips in Bochs at {first} CPUs (emulated instructions; round trip = the \
         guest's median, less its RDTSC pair;\nhypervisor = its own time from the exit to the \
         next entry; the rest is the VMX transitions and the entry/exit stub)\n"
    );
    let mut t = crate::bench::table(&[
        "exit",
        "round trip before",
        "round trip",
        "hypervisor before",
        "hypervisor",
        "transitions + stub",
    ]);
    for r in rows.iter().filter(|r| r.cpus == first) {
        let b = find(before, first, &r.kind);
        t.add_row([
            r.kind.clone(),
            or_dash(b.map(Row::round_trip)),
            r.round_trip().to_string(),
            or_dash(b.map(|b| b.hv_per_exit)),
            r.hv_per_exit.to_string(),
            r.round_trip().saturating_sub(r.hv_per_exit).to_string(),
        ]);
    }
    t.add_row([
        "floor (VMCALL exit + VMRESUME)".to_string(),
        String::new(),
        FLOOR.to_string(),
        String::new(),
        "0".into(),
        FLOOR.to_string(),
    ]);
    out += &format!("{t}\n");
    out += "(the floor is Bochs's own cost of the two transitions, from ../shared/EMULATORS.md, \
            not measured here)\n\nA VM entry against the core count (emulated instructions): \
            the null hypercall, which the exit landing answers (fast path), and exits that take \
            the run loop\n(hlt_timer is two exits: `timer_oneshot`, then HLT resumed with the \
            timer injected; its hypervisor figure is per exit)\n";
    let mut t = crate::bench::table(&[
        "exit",
        "path",
        "CPUs",
        "round trip before",
        "round trip",
        "hypervisor before",
        "hypervisor",
    ]);
    let mut cpus: Vec<u32> = rows.iter().map(|r| r.cpus).collect();
    cpus.sort_unstable();
    cpus.dedup();
    for (kind, path) in SCALING {
        for &c in &cpus {
            let (Some(r), b) = (find(rows, c, kind), find(before, c, kind)) else {
                continue;
            };
            t.add_row([
                kind.to_string(),
                path.to_string(),
                c.to_string(),
                or_dash(b.map(Row::round_trip)),
                r.round_trip().to_string(),
                or_dash(b.map(|b| b.hv_per_exit)),
                r.hv_per_exit.to_string(),
            ]);
        }
    }
    out += &format!("{t}\n");
    out
}

pub fn exits(
    json: Option<&std::path::Path>,
    before: Option<&std::path::Path>,
    cpus: &[u32],
) -> Result<()> {
    let before: Vec<Row> = match before {
        Some(p) => serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{} is not a `bench exits --json` file", p.display()))?,
        None => vec![],
    };
    let mut rows = vec![];
    for &c in cpus {
        eprintln!("bench: exits with {c} CPUs...");
        rows.extend(measure(c)?);
    }
    print!("{}", render(&rows, &before));
    crate::bench::save(json, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "[exits@c0] bench exits kind=null_hypercall n=1000 rtt_median=140 \
                       rtt_min=139 rtt_max=900 hv_per_exit=40 exits=1000 rdtsc_pair=2\n\
                       [other@c1] bench exits kind=cpuid n=1 rtt_median=1 rtt_min=1 rtt_max=1 \
                       hv_per_exit=1 exits=1 rdtsc_pair=1\n";

    #[test]
    fn lines_of_the_exits_guest_parse() {
        let rows = parse(LOG, 8).unwrap();
        assert_eq!(rows.len(), 1, "another guest's line is not ours");
        let r = &rows[0];
        assert_eq!(
            (r.cpus, r.kind.as_str(), r.rtt_median, r.hv_per_exit),
            (8, "null_hypercall", 140, 40)
        );
        assert_eq!(r.round_trip(), 138);
        assert!(parse("nothing", 2).is_err());
    }

    #[test]
    fn tables_show_before_and_after_per_cpu_count() {
        let after = parse(LOG, 2).unwrap();
        let mut before = after.clone();
        before[0].rtt_median = 757;
        let t = render(&after, &before);
        assert!(t.contains("755") && t.contains("138"), "{t}");
        assert!(t.contains("floor"), "{t}");
        assert!(!t.contains("hlt_timer  "), "no run-loop row without its figures: {t}");
        let mut more = after.clone();
        more.push(Row { cpus: 15, kind: "hlt_timer".into(), rtt_median: 999, ..after[0].clone() });
        let t = render(&more, &before);
        assert!(t.contains("hlt_timer  ") && t.contains("run loop ┆") && t.contains("997"), "{t}");
        let json = serde_json::to_string(&after).unwrap();
        assert_eq!(serde_json::from_str::<Vec<Row>>(&json).unwrap(), after);
    }

    #[test]
    fn configs_change_only_the_cpu_count() {
        let c = config(15).unwrap();
        assert!(c.contains("cpus = 15"));
        assert!(crate::config::compile("x.toml", &c).is_ok(), "{c}");
    }
}
