// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask bench backends`: the bench configs on each test bed, side by side (issue 24,
//! "Figures"): VT-x on Bochs (its default model), SVM on QEMU's TCG and SVM on Bochs's
//! `ryzen` model. Per operation: exits (exact counts from the guests' telemetry and the
//! report), the hypervisor's cross-core messages of the guests involved (whole run), and,
//! on Bochs, where the TSC counts emulated instructions, the guest-timed cost. QEMU's TSC is
//! host time: its instruction column stays empty. Writes `docs/bench/backends.json` with
//! `--json`; `cargo xtask figures` renders it into docs/svm.md, with the backends' code
//! size ([`code_size`], read from the tree).
//!
//! Owns the test beds, the operations and the code-size count. Calls `run` (the boots),
//! `bench` (the `bench` lines), `exitbench` (their parser), `cli` (run arguments).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A test bed: a backend on an emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Testbed {
    /// The key in the JSON and on the command line.
    pub key: &'static str,
    /// As the table heads it.
    pub title: &'static str,
    pub emulator: crate::cli::Emulator,
    pub cpu_model: Option<&'static str>,
}

/// Every test bed, in the table's order.
pub const TESTBEDS: [Testbed; 3] = [
    Testbed {
        key: "vmx-bochs",
        title: "VT-x, Bochs",
        emulator: crate::cli::Emulator::Bochs,
        cpu_model: None,
    },
    Testbed {
        key: "svm-qemu",
        title: "SVM, QEMU TCG",
        emulator: crate::cli::Emulator::Qemu,
        cpu_model: None,
    },
    Testbed {
        key: "svm-bochs-ryzen",
        title: "SVM, Bochs ryzen",
        emulator: crate::cli::Emulator::Bochs,
        cpu_model: Some("ryzen"),
    },
];

/// The configs booted on each test bed.
pub const CONFIGS: [&str; 5] = [
    "configs/bench-exits.toml",
    "configs/bench-poll.toml",
    "configs/bench-doorbell.toml",
    "configs/bench-caps-k1.toml",
    "configs/bench-caps-k14.toml",
];

/// One operation on one test bed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Figure {
    /// [`Testbed::key`].
    pub testbed: String,
    pub operation: String,
    /// Exits per operation (exact counts over the operations, divided).
    pub exits_per_op: f64,
    /// Cross-core messages the hypervisor handled for the guests the operation involves,
    /// over their whole run (the protocols above the vCPU interface are one code, so these
    /// should not depend on the backend).
    pub messages: u64,
    /// The guest-timed cost in emulated instructions (Bochs only).
    pub instructions: Option<u64>,
}

/// The committed JSON.
pub const JSON: &str = "docs/bench/backends.json";

/// The capability deadline under QEMU, whose vCPUs a loaded host starves for longer than
/// the default (a copy's reply then ends `Timeout`): counts do not depend on it.
const QEMU_CMDLINE: &str = "caps_deadline_ms=5000";

/// Boots `config` on `t`: its report and serial log.
fn boot(t: &Testbed, config: &str) -> Result<(crate::report::Report, String)> {
    let mut args = crate::cli::RunArgs::quiet(t.emulator, Some(config));
    args.cpu_model = t.cpu_model.map(str::to_string);
    if t.emulator == crate::cli::Emulator::Qemu {
        args.cmdline = QEMU_CMDLINE.into();
    }
    let r = crate::run::run(&args)?;
    if r.outcome != "ok" {
        bail!("{config} on {} ended {}: {:?}", t.key, r.outcome, r.problems);
    }
    let serial = std::fs::read_to_string(&r.serial_log)?;
    Ok((r, serial))
}

fn messages(r: &crate::report::Report, guests: &[&str]) -> u64 {
    r.guests.iter().filter(|g| guests.contains(&g.name.as_str())).map(|g| g.xmsgs).sum()
}

/// The `key=value` of `guest`'s `bench WHAT` line (`bench::bench_value` reads a guest's
/// first `bench` line only).
fn line_value(serial: &str, guest: &str, what: &str, key: &str) -> Result<u64> {
    let line = serial
        .lines()
        .find(|l| l.starts_with(&format!("[{guest}@")) && l.contains(&format!("] bench {what} ")))
        .with_context(|| format!("no `bench {what}` line from {guest}"))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in {line}"))
}

/// The figures of one test bed from its runs of [`CONFIGS`] (report and serial log each,
/// in that order).
pub fn figures(t: &Testbed, runs: &[(crate::report::Report, String)]) -> Result<Vec<Figure>> {
    let [exits, poll, bell, k1, k14] = runs else { bail!("{} runs, not 5", runs.len()) };
    let bochs = t.emulator == crate::cli::Emulator::Bochs;
    // Read only on Bochs: elsewhere the timings are host time (and may run a `bench caps`
    // line past the console's 256 characters).
    let instr = |v: &dyn Fn() -> Result<u64>| if bochs { v().map(Some) } else { Ok(None) };
    let fig =
        |operation: &str, exits_per_op: f64, messages: u64, instructions: Option<u64>| Figure {
            testbed: t.key.into(),
            operation: operation.into(),
            exits_per_op,
            messages,
            instructions,
        };
    let mut out = vec![];
    let rows = crate::exitbench::parse(&exits.1, exits.0.cpus)?;
    for (kind, op) in [("null_hypercall", "null hypercall"), ("cpuid", "CPUID")] {
        let r = rows.iter().find(|r| r.kind == kind).with_context(|| format!("no {kind}"))?;
        out.push(fig(
            op,
            r.exits as f64 / r.n.max(1) as f64,
            messages(&exits.0, &["exits"]),
            instr(&|| Ok(r.round_trip()))?,
        ));
    }
    let v = crate::bench::bench_value;
    let (p, s) = (&poll.1, &messages(&poll.0, &["ping", "pong"]));
    let n = v(p, "ping", "n")?;
    out.push(fig(
        "channel round trip (polling)",
        (v(p, "ping", "exits")? + v(p, "pong", "exits")?) as f64 / n.max(1) as f64,
        *s,
        instr(&|| v(p, "ping", "rtt_median"))?,
    ));
    let b = &bell.1;
    let rung = v(b, "ping", "doorbells_rung")? + v(b, "pong", "doorbells_rung")?;
    let taken = v(b, "ping", "doorbells_taken")? + v(b, "pong", "doorbells_taken")?;
    let all = v(b, "ping", "exits")? + v(b, "pong", "exits")?;
    let bell_msgs = messages(&bell.0, &["ping", "pong"]);
    out.push(fig(
        "doorbell round trip, exits per doorbell (both sides)",
        all as f64 / rung.max(1) as f64,
        bell_msgs,
        instr(&|| v(b, "ping", "rtt_median"))?,
    ));
    // The exits besides the ringing hypercalls, per doorbell rung: the receiving side's
    // (VT-x delivers a doorbell through the guest's IDT without an exit; SVM virtualizes it).
    out.push(fig(
        "doorbell, other exits per doorbell rung (the receiver's)",
        all.saturating_sub(rung) as f64 / rung.max(1) as f64,
        bell_msgs,
        None,
    ));
    // How many the guests' own doorbell handlers counted (the rest woke them otherwise).
    out.push(fig(
        "doorbell, taken by the guests' handlers per doorbell rung",
        taken as f64 / rung.max(1) as f64,
        bell_msgs,
        None,
    ));
    let c = &k1.1;
    let maps = line_value(c, "owner", "caps-exits", "map_unmap_exits")? as f64 / 4.0;
    let owner = messages(&k1.0, &["owner"]);
    out.push(fig("cap map (1 MiB)", maps, owner, instr(&|| v(c, "owner", "map"))?));
    out.push(fig("cap unmap (1 MiB)", maps, owner, instr(&|| v(c, "owner", "unmap"))?));
    for (k, run) in [(1, k1), (14, k14)] {
        let c = &run.1;
        out.push(fig(
            &format!("revoke, k = {k} (owner's exits; owner's messages)"),
            line_value(c, "owner", "caps-exits", "revoke_exits")? as f64,
            messages(&run.0, &["owner"]),
            instr(&|| v(c, "owner", "revoke"))?,
        ));
    }
    Ok(out)
}

/// `cargo xtask bench backends`: every config on every test bed of `keys` (all when
/// empty), the test beds in parallel (each emulator one thread), the configs of one in turn.
/// With `--json`, the figures of test beds not run (or failed) this time are kept from the
/// file; a failed test bed is an error after the rest are written.
pub fn backends(json: Option<&Path>, keys: &[String]) -> Result<()> {
    let beds: Vec<Testbed> = TESTBEDS
        .iter()
        .copied()
        .filter(|t| keys.is_empty() || keys.iter().any(|k| k == t.key))
        .collect();
    if beds.is_empty() {
        bail!("no test bed named {keys:?}: {}", TESTBEDS.map(|t| t.key).join(", "));
    }
    crate::build::images(false)?;
    let handles: Vec<_> = beds
        .iter()
        .map(|t| {
            let t = *t;
            std::thread::spawn(move || -> Result<Vec<Figure>> {
                let mut runs = vec![];
                for c in CONFIGS {
                    eprintln!("bench backends: {c} on {}", t.key);
                    runs.push(boot(&t, c)?);
                }
                figures(&t, &runs)
            })
        })
        .collect();
    let mut new = vec![];
    let mut failed = vec![];
    for (t, h) in beds.iter().zip(handles) {
        match h.join().map_err(|_| anyhow::anyhow!("a bench run panicked")).and_then(|r| r) {
            Ok(f) => new.extend(f),
            Err(e) => {
                eprintln!("bench backends: {} failed: {e:#}", t.key);
                failed.push(t.key);
            }
        }
    }
    let old: Vec<Figure> = match json.filter(|p| p.exists()) {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)
            .with_context(|| format!("{} is not a `bench backends --json` file", p.display()))?,
        None => vec![],
    };
    let all = merge(old, new);
    print!("{}", render(&all)?);
    crate::bench::save(json, &all)?;
    if !failed.is_empty() {
        bail!("test beds failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `old`'s figures of the test beds `new` has none of, then `new`'s, in [`TESTBEDS`] order.
fn merge(old: Vec<Figure>, new: Vec<Figure>) -> Vec<Figure> {
    let mut all: Vec<Figure> =
        old.into_iter().filter(|f| !new.iter().any(|n| n.testbed == f.testbed)).collect();
    all.extend(new);
    let order = |f: &Figure| TESTBEDS.iter().position(|t| t.key == f.testbed);
    all.sort_by_key(order);
    all
}

fn fmt_exits(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The side-by-side table (markdown): exits per operation, messages, instructions.
pub fn render(figures: &[Figure]) -> Result<String> {
    let mut ops: Vec<&str> = vec![];
    for f in figures {
        if !ops.contains(&f.operation.as_str()) {
            ops.push(&f.operation);
        }
    }
    let beds: Vec<&Testbed> =
        TESTBEDS.iter().filter(|t| figures.iter().any(|f| f.testbed == t.key)).collect();
    let bochs: Vec<&&Testbed> =
        beds.iter().filter(|t| t.emulator == crate::cli::Emulator::Bochs).collect();
    let mut header = vec!["operation".to_string()];
    header.extend(beds.iter().map(|t| format!("exits/op: {}", t.title)));
    header.extend(beds.iter().map(|t| format!("messages: {}", t.title)));
    header.extend(bochs.iter().map(|t| format!("instructions: {}", t.title)));
    let mut out = format!("| {} |\n|---|", header.join(" | "));
    out += &"---:|".repeat(header.len() - 1);
    out += "\n";
    for op in ops {
        let get = |t: &Testbed| figures.iter().find(|f| f.operation == op && f.testbed == t.key);
        let mut row = vec![op.to_string()];
        row.extend(beds.iter().map(|t| get(t).map_or("-".into(), |f| fmt_exits(f.exits_per_op))));
        row.extend(beds.iter().map(|t| get(t).map_or("-".into(), |f| f.messages.to_string())));
        row.extend(
            bochs
                .iter()
                .map(|t| get(t).and_then(|f| f.instructions).map_or("-".into(), |i| i.to_string())),
        );
        out += &format!("| {} |\n", row.join(" | "));
    }
    Ok(out)
}

/// Lines of one backend's code: every `.rs` file under its folder and its `arch` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeSize {
    pub backend: &'static str,
    pub files: usize,
    pub lines: usize,
    /// Without the host tests (a file's `#[cfg(test)] mod tests` to its end).
    pub without_tests: usize,
}

/// The backends' code, read from the tree under `root` (the workspace).
pub fn code_size(root: &Path) -> Result<Vec<CodeSize>> {
    let src = root.join("hypervisor/src");
    let mut out = vec![];
    for (backend, dir, arch) in [("vmx", "vmx", "arch/vmx.rs"), ("svm", "svm", "arch/svm.rs")] {
        let mut files = vec![src.join(arch)];
        for e in std::fs::read_dir(src.join(dir)).with_context(|| format!("{dir}/"))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
        let (mut lines, mut without_tests) = (0, 0);
        for f in &files {
            let text = std::fs::read_to_string(f).with_context(|| f.display().to_string())?;
            let (all, code) = count(&text);
            lines += all;
            without_tests += code;
        }
        out.push(CodeSize { backend, files: files.len(), lines, without_tests });
    }
    Ok(out)
}

/// A file's lines, and those before its host tests (`#[cfg(test)]` directly above
/// `mod tests`).
fn count(text: &str) -> (usize, usize) {
    let lines: Vec<&str> = text.lines().collect();
    let tests = lines
        .windows(2)
        .position(|w| w[0].trim() == "#[cfg(test)]" && w[1].trim_start().starts_with("mod tests"))
        .unwrap_or(lines.len());
    (lines.len(), tests)
}

/// The code-size table (markdown), from the tree.
pub fn render_code_size(root: &Path) -> Result<String> {
    let mut out =
        String::from("| backend | files | lines | without host tests |\n|---|---:|---:|---:|\n");
    for c in code_size(root)? {
        let place = format!("`{0}/` + `arch/{0}.rs`", c.backend);
        out += &format!("| {place} | {} | {} | {} |\n", c.files, c.lines, c.without_tests);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_bench_line_is_found_after_the_first() {
        let log = "[owner@c0] bench caps k=1 map=3\n[h1@c1] bench caps-exits x=9\n\
                   [owner@c0] bench caps-exits map_unmap_exits=4\n";
        assert_eq!(line_value(log, "owner", "caps-exits", "map_unmap_exits").unwrap(), 4);
        assert!(line_value(log, "owner", "caps-exits", "x").is_err());
        assert!(line_value(log, "h2", "caps-exits", "x").is_err());
    }

    #[test]
    fn a_run_of_some_test_beds_keeps_the_others() {
        let f = |bed: &str, i: u64| Figure {
            testbed: bed.into(),
            operation: "CPUID".into(),
            exits_per_op: 1.0,
            messages: 0,
            instructions: Some(i),
        };
        let old = vec![f("vmx-bochs", 1), f("svm-qemu", 2), f("svm-bochs-ryzen", 3)];
        let all = merge(old, vec![f("svm-qemu", 20)]);
        assert_eq!(all, [f("vmx-bochs", 1), f("svm-qemu", 20), f("svm-bochs-ryzen", 3)]);
    }

    #[test]
    fn host_tests_are_counted_apart() {
        let text = "a\nb\n#[cfg(test)]\nmod tests {\n    x\n}\n";
        assert_eq!(count(text), (6, 2));
        assert_eq!(count("a\n#[cfg(test)]\nfn f() {}\n"), (3, 3), "only a tests module");
    }

    #[test]
    fn both_backends_are_found_in_the_tree() {
        let c = code_size(&crate::workspace_root()).unwrap();
        assert_eq!(c.iter().map(|c| c.backend).collect::<Vec<_>>(), ["vmx", "svm"]);
        assert!(c
            .iter()
            .all(|c| c.files >= 2 && c.without_tests > 100 && c.lines >= c.without_tests));
    }

    #[test]
    fn the_table_puts_test_beds_side_by_side() {
        let f = |bed: &str, exits: f64, i: Option<u64>| Figure {
            testbed: bed.into(),
            operation: "null hypercall".into(),
            exits_per_op: exits,
            messages: 0,
            instructions: i,
        };
        let t = render(&[
            f("vmx-bochs", 1.0, Some(135)),
            f("svm-qemu", 1.0, None),
            f("svm-bochs-ryzen", 1.5, Some(160)),
        ])
        .unwrap();
        assert!(t.contains("| null hypercall | 1 | 1 | 1.50 | 0 | 0 | 0 | 135 | 160 |"), "{t}");
        assert!(t.contains("instructions: SVM, Bochs ryzen"), "{t}");
        assert!(!t.contains("instructions: SVM, QEMU"), "{t}");
    }
}
