// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask report diff A.json B.json`: two run reports side by side, figure by figure
//! (run-wide TSC figures, then per guest: state, status, hypercalls, life, exits by reason,
//! trace totals, and its kernel when the kernels differ), with the difference B - A and its
//! ratio, as a comfy-table table or as JSON (`--json`); warnings when the configs, the guest
//! kernels or the outcomes differ; and an exit code like diff(1)'s: 0 the same, 1 they
//! differ (in what `--fail-on` counts), 2 trouble (a file that is not a run report).
//! Owns only the comparison; reads `report::Report`.

use crate::report::{GuestReport, KernelMeta, Report};
use anyhow::{Context, Result};
use comfy_table::{presets::UTF8_FULL_CONDENSED, CellAlignment, Table};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What a compared figure is about; `--fail-on` picks the kinds whose differences count.
#[derive(clap::ValueEnum, Serialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The run's outcome, each guest's state and exit status.
    Outcome,
    /// The config booted (its SHA-256).
    Config,
    /// The guest kernels booted (their SHA-256).
    Kernels,
    /// Emulator, CPU model, CPUs, TSC unit, commit.
    Setup,
    /// The machine's own figures: TSC figures, exits, hypercalls, life, trace totals.
    Figures,
    /// Host time (`wall_seconds`): never the same twice, so counted only when asked.
    Host,
}

/// `--fail-on`: the kinds of difference that make the exit code 1.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOn {
    /// Every kind but `host` (the default).
    Any,
    /// None: exit 0 unless the reports cannot be read.
    None,
    /// The run's outcome, a guest's state or exit status.
    Outcome,
    /// The config's SHA-256.
    Config,
    /// A guest's kernel (SHA-256).
    Kernels,
    /// Emulator, CPU model, CPUs, TSC unit, commit.
    Setup,
    /// TSC figures, exits, hypercalls, life, trace totals.
    Figures,
    /// `wall_seconds`.
    Host,
}

impl FailOn {
    fn counts(self, k: Kind) -> bool {
        match self {
            FailOn::Any => k != Kind::Host,
            FailOn::None => false,
            FailOn::Outcome => k == Kind::Outcome,
            FailOn::Config => k == Kind::Config,
            FailOn::Kernels => k == Kind::Kernels,
            FailOn::Setup => k == Kind::Setup,
            FailOn::Figures => k == Kind::Figures,
            FailOn::Host => k == Kind::Host,
        }
    }
}

/// One compared figure: its name and kind, the two values (absent where a report lacks
/// it), B - A when both are numbers, and whether the values differ.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub figure: String,
    pub kind: Kind,
    pub a: Option<String>,
    pub b: Option<String>,
    pub delta: Option<f64>,
    pub ratio: Option<f64>,
    pub differs: bool,
}

fn num_row(kind: Kind, figure: String, a: Option<f64>, b: Option<f64>) -> Row {
    let show = |v: Option<f64>| {
        v.map(|v| {
            if v.fract() == 0.0 && v.abs() < 1e15 {
                format!("{v:.0}")
            } else {
                format!("{v:.3}")
            }
        })
    };
    let delta = a.zip(b).map(|(a, b)| b - a);
    let ratio = a.zip(b).and_then(|(a, b)| (a != 0.0).then(|| b / a));
    Row { figure, kind, a: show(a), b: show(b), delta, ratio, differs: a != b }
}

fn text_row(kind: Kind, figure: String, a: Option<&str>, b: Option<&str>) -> Row {
    let (a, b) = (a.map(str::to_string), b.map(str::to_string));
    Row { figure, kind, differs: a != b, a, b, delta: None, ratio: None }
}

/// Each guest's kernel in a report, by guest name: `source [spec] sha256-prefix`.
fn kernels_by_guest(r: &Report) -> BTreeMap<&str, String> {
    let show = |k: &KernelMeta| {
        let spec = k.spec.as_deref().map(|s| format!(" {s}")).unwrap_or_default();
        format!("{}{spec} {}", k.source, k.sha256.get(..12).unwrap_or(&k.sha256))
    };
    let mut out = BTreeMap::new();
    for k in &r.meta.kernels {
        for g in &k.guests {
            out.insert(g.as_str(), show(k));
        }
    }
    out
}

/// The guests whose kernels differ (both reports identify their kernels), with each side.
fn kernel_differences(a: &Report, b: &Report) -> Vec<(String, Option<String>, Option<String>)> {
    if a.meta.kernels.is_empty() || b.meta.kernels.is_empty() {
        return vec![];
    }
    let (ka, kb) = (kernels_by_guest(a), kernels_by_guest(b));
    let names: BTreeSet<&str> = ka.keys().chain(kb.keys()).copied().collect();
    names
        .into_iter()
        .filter(|n| ka.get(n) != kb.get(n))
        .map(|n| (n.to_string(), ka.get(n).cloned(), kb.get(n).cloned()))
        .collect()
}

/// What a reader must not miss: the configs, the guest kernels or the outcomes differ.
pub fn warnings(a: &Report, b: &Report) -> Vec<String> {
    let mut out = vec![];
    let (ca, cb) = (a.meta.config.as_ref(), b.meta.config.as_ref());
    if ca.map(|c| &c.sha256) != cb.map(|c| &c.sha256) {
        let show = |c: Option<&crate::report::ConfigMeta>| {
            c.map_or("no config".to_string(), |c| {
                format!("{} (sha256 {})", c.path, c.sha256.get(..12).unwrap_or(&c.sha256))
            })
        };
        out.push(format!("the configs differ: A {}, B {}", show(ca), show(cb)));
    }
    let kernels = kernel_differences(a, b);
    if !kernels.is_empty() {
        let list: Vec<String> = kernels
            .iter()
            .map(|(g, x, y)| {
                let show = |k: &Option<String>| k.clone().unwrap_or_else(|| "none".into());
                format!("{g} ({} vs {})", show(x), show(y))
            })
            .collect();
        out.push(format!("the guest kernels differ: {}", list.join(", ")));
    }
    for (r, side) in [(a, "A"), (b, "B")] {
        if r.meta.kernels.is_empty() && !r.guests.is_empty() {
            out.push(format!("{side} does not identify its guest kernels (an older report)"));
        }
    }
    let mut outcomes = vec![];
    if a.outcome != b.outcome {
        outcomes.push(format!("run {} vs {}", a.outcome, b.outcome));
    }
    let end = |g: &GuestReport| match g.state.as_str() {
        "exited" => format!("exited {}", crate::report::status_text(g.exit_status)),
        s => s.to_string(),
    };
    for ga in &a.guests {
        let eb = b.guests.iter().find(|g| g.name == ga.name).map(end);
        if eb.as_deref() != Some(end(ga).as_str()) {
            let eb = eb.unwrap_or_else(|| "absent".into());
            outcomes.push(format!("{} {} vs {eb}", ga.name, end(ga)));
        }
    }
    for gb in b.guests.iter().filter(|g| !a.guests.iter().any(|x| x.name == g.name)) {
        outcomes.push(format!("{} absent vs {}", gb.name, end(gb)));
    }
    if !outcomes.is_empty() {
        out.push(format!("the outcomes differ: {}", outcomes.join("; ")));
    }
    out
}

fn life(g: &GuestReport) -> Option<f64> {
    (g.tsc_first_entry > 0 && g.tsc_end >= g.tsc_first_entry)
        .then(|| (g.tsc_end - g.tsc_first_entry) as f64)
}

/// The rows comparing `a` and `b`. Guests are matched by name.
pub fn rows(a: &Report, b: &Report) -> Vec<Row> {
    let mut out = vec![
        text_row(Kind::Outcome, "outcome".into(), Some(&a.outcome), Some(&b.outcome)),
        text_row(
            Kind::Setup,
            "emulator / model".into(),
            Some(&format!("{} / {}", a.emulator, a.cpu_model)),
            Some(&format!("{} / {}", b.emulator, b.cpu_model)),
        ),
        text_row(Kind::Setup, "tsc_unit".into(), Some(&a.tsc_unit), Some(&b.tsc_unit)),
        text_row(
            Kind::Setup,
            "commit".into(),
            a.meta.git_commit.as_deref(),
            b.meta.git_commit.as_deref(),
        ),
        text_row(
            Kind::Config,
            "config sha256".into(),
            a.meta.config.as_ref().map(|c| &c.sha256[..12]),
            b.meta.config.as_ref().map(|c| &c.sha256[..12]),
        ),
        num_row(Kind::Setup, "cpus".into(), Some(a.cpus.into()), Some(b.cpus.into())),
        num_row(Kind::Host, "wall_seconds".into(), Some(a.wall_seconds), Some(b.wall_seconds)),
    ];
    let tsc = |r: &Report| {
        [
            ("tsc.hypervisor_entry", r.tsc.hypervisor_entry),
            ("tsc.hypervisor_boot", r.tsc.hypervisor_boot),
            ("tsc.to_all_guests_running", r.tsc.to_all_guests_running),
            ("tsc.end", r.tsc.end),
        ]
    };
    for ((name, x), (_, y)) in tsc(a).into_iter().zip(tsc(b)) {
        out.push(num_row(Kind::Figures, name.into(), x.map(|v| v as f64), y.map(|v| v as f64)));
    }
    let mut names: Vec<&str> = a.guests.iter().map(|g| g.name.as_str()).collect();
    for g in &b.guests {
        if !names.contains(&g.name.as_str()) {
            names.push(&g.name);
        }
    }
    let kernels = kernel_differences(a, b);
    for name in names {
        let (ga, gb) =
            (a.guests.iter().find(|g| g.name == name), b.guests.iter().find(|g| g.name == name));
        let f = |k: &str| format!("{name}.{k}");
        if let Some((_, x, y)) = kernels.iter().find(|k| k.0 == name) {
            out.push(text_row(Kind::Kernels, f("kernel"), x.as_deref(), y.as_deref()));
        }
        let state = |g: Option<&GuestReport>| g.map(|g| g.state.clone());
        out.push(text_row(Kind::Outcome, f("state"), state(ga).as_deref(), state(gb).as_deref()));
        // A status is a code, not a quantity: shown as the summary shows it, no B - A.
        let status = |g: Option<&GuestReport>| {
            g.filter(|g| g.state == "exited").map(|g| crate::report::status_text(g.exit_status))
        };
        let (sa, sb) = (status(ga), status(gb));
        out.push(text_row(Kind::Outcome, f("exit_status"), sa.as_deref(), sb.as_deref()));
        out.push(num_row(
            Kind::Figures,
            f("hypercalls"),
            ga.map(|g| g.hypercalls as f64),
            gb.map(|g| g.hypercalls as f64),
        ));
        out.push(num_row(Kind::Figures, f("life_tsc"), ga.and_then(life), gb.and_then(life)));
        let total = |g: Option<&GuestReport>| g.map(|g| g.exits.values().sum::<u64>() as f64);
        out.push(num_row(Kind::Figures, f("exits"), total(ga), total(gb)));
        let reasons: BTreeSet<&String> =
            ga.iter().chain(gb.iter()).flat_map(|g| g.exits.keys()).collect();
        for reason in reasons {
            let n = |g: Option<&GuestReport>| {
                g.map(|g| g.exits.get(reason).copied().unwrap_or(0) as f64)
            };
            out.push(num_row(Kind::Figures, f(&format!("exits.{reason}")), n(ga), n(gb)));
        }
        let tr = |g: Option<&GuestReport>| g.and_then(|g| g.trace.clone());
        if tr(ga).is_some() || tr(gb).is_some() {
            out.push(num_row(
                Kind::Figures,
                f("trace.guest_tsc"),
                tr(ga).map(|t| t.guest_tsc as f64),
                tr(gb).map(|t| t.guest_tsc as f64),
            ));
            out.push(num_row(
                Kind::Figures,
                f("trace.hypervisor_tsc"),
                tr(ga).map(|t| t.hypervisor_tsc as f64),
                tr(gb).map(|t| t.hypervisor_tsc as f64),
            ));
        }
    }
    out
}

/// The rows as a table: figure, A, B, B - A, B / A.
pub fn table(rows: &[Row]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["figure", "A", "B", "B - A", "B / A"]);
    for r in rows {
        let dash = || "-".to_string();
        t.add_row([
            r.figure.clone(),
            r.a.clone().unwrap_or_else(dash),
            r.b.clone().unwrap_or_else(dash),
            r.delta.map_or_else(dash, |d| {
                if d.fract() == 0.0 {
                    format!("{d:+.0}")
                } else {
                    format!("{d:+.3}")
                }
            }),
            r.ratio.map_or_else(dash, |q| format!("{q:.3}")),
        ]);
    }
    for i in 1..=4 {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// Reads a run report; any failure is "trouble" (exit code 2).
fn load(p: &Path) -> Result<Report> {
    let read = || -> Result<Report> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a run report", p.display()))
    };
    read().map_err(|e| crate::exit::coded(crate::exit::USAGE, e))
}

/// The comparison as a whole: rows, warnings, and the kinds in which the reports differ.
#[derive(Debug, Serialize)]
pub struct Diff {
    pub a: String,
    pub b: String,
    /// The kinds of figure that differ (`host` included), in order.
    pub differ_in: Vec<Kind>,
    /// Whether the reports are the same in what `--fail-on` counts (exit code 0).
    pub same: bool,
    pub warnings: Vec<String>,
    pub rows: Vec<Row>,
}

/// Compares `a` and `b`; `same` is false when a row of a kind `fail_on` counts differs.
pub fn compare(a: &Report, b: &Report, fail_on: &[FailOn]) -> (Vec<Row>, Vec<String>, bool) {
    let rows = rows(a, b);
    let same = !rows.iter().any(|r| r.differs && fail_on.iter().any(|f| f.counts(r.kind)));
    (rows, warnings(a, b), same)
}

/// `cargo xtask report diff A B [--json] [--fail-on K,...]`: prints the table (or the JSON
/// document) and the warnings (on stderr); returns whether the reports are the same in
/// what `fail_on` counts.
pub fn command(a: &Path, b: &Path, json: bool, fail_on: &[FailOn]) -> Result<bool> {
    let (ra, rb) = (load(a)?, load(b)?);
    let (rows, warnings, same) = compare(&ra, &rb, fail_on);
    let differ_in: BTreeSet<Kind> = rows.iter().filter(|r| r.differs).map(|r| r.kind).collect();
    if json {
        let d = Diff {
            a: a.display().to_string(),
            b: b.display().to_string(),
            differ_in: differ_in.iter().copied().collect(),
            same,
            warnings: warnings.clone(),
            rows,
        };
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        println!("A: {}\nB: {}", a.display(), b.display());
        if ra.tsc_unit != rb.tsc_unit {
            println!(
                "note: the TSC units differ ({} vs {}): TSC figures do not compare",
                ra.tsc_unit, rb.tsc_unit
            );
        }
        println!("{}", table(&rows));
    }
    for w in &warnings {
        crate::exit::warn(w);
    }
    if !json {
        let kinds: Vec<String> =
            differ_in.iter().map(|k| format!("{k:?}").to_lowercase()).collect();
        eprintln!(
            "report diff: {}",
            if kinds.is_empty() {
                "the same".to_string()
            } else {
                format!("they differ in {}", kinds.join(", "))
            }
        );
    }
    Ok(same)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Console;

    fn report(lines: &str) -> Report {
        let mut c = Console::default();
        for l in lines.lines() {
            c.feed(l);
        }
        crate::report::for_tests(&mut c)
    }

    const A: &str = "#mkv boot abi=1 tsc=100 cmdline=\"\"\n#mkv ready tsc=200\n\
        #mkv guest index=0 name=alpha core=0 state=exited exit_status=0 exits=\"cpuid:2 vmcall:8\" fault=\"\" hypercalls=8 tsc_first_entry=300 tsc_end=1300\n\
        #mkv end outcome=ok tsc=1400\n";

    #[test]
    fn rows_give_both_values_and_the_delta() {
        let b = A
            .replace("vmcall:8", "vmcall:10 hlt:3")
            .replace("tsc_end=1300", "tsc_end=1800")
            .replace("#mkv end", "#mkv guest index=1 name=beta core=1 state=stopped exit_status=0 exits=\"ept_violation:1\" fault=\"x\" hypercalls=0 tsc_first_entry=310 tsc_end=400\n#mkv end");
        let rows = rows(&report(A), &report(&b));
        let get = |f: &str| {
            rows.iter().find(|r| r.figure == f).unwrap_or_else(|| panic!("{f}: {rows:#?}"))
        };
        let v = get("alpha.exits.vmcall");
        assert_eq!((v.a.as_deref(), v.b.as_deref(), v.delta), (Some("8"), Some("10"), Some(2.0)));
        assert_eq!(v.ratio, Some(1.25));
        // A reason only B has: 0 in A.
        assert_eq!(get("alpha.exits.hlt").delta, Some(3.0));
        assert_eq!(get("alpha.life_tsc").delta, Some(500.0));
        assert_eq!(get("alpha.exits").delta, Some(5.0));
        // A guest only B has: no value, no delta, on A's side.
        let s = get("beta.state");
        assert_eq!((s.a.as_deref(), s.b.as_deref()), (None, Some("stopped")));
        assert_eq!(get("beta.exits").delta, None);
        assert_eq!(get("tsc.hypervisor_boot").delta, Some(0.0));
        let text = table(&rows).to_string();
        assert!(
            text.contains("alpha.exits.vmcall") && text.contains("+2") && text.contains("1.250"),
            "{text}"
        );
    }

    fn kernel(source: &str, spec: Option<&str>, sha: &str, guests: &[&str]) -> KernelMeta {
        KernelMeta {
            source: source.into(),
            spec: spec.map(str::to_string),
            path: "/x/k.elf".into(),
            sha256: sha.repeat(64 / sha.len()),
            size: 4096,
            entry: Some(0x10_0000),
            guests: guests.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn with_kernels(mut r: Report, k: Vec<KernelMeta>) -> Report {
        r.meta.kernels = k;
        r
    }

    #[test]
    fn the_same_run_twice_is_the_same_and_host_time_does_not_count() {
        let k = vec![kernel("builtin", None, "ab", &["alpha"])];
        let a = with_kernels(report(A), k.clone());
        let mut b = with_kernels(report(A), k);
        b.wall_seconds += 3.0;
        let (rows, warnings, same) = compare(&a, &b, &[FailOn::Any]);
        assert!(same && warnings.is_empty(), "{warnings:?}");
        assert!(!rows.iter().any(|r| r.figure.ends_with(".kernel")), "no kernel row: same");
        let wall = rows.iter().find(|r| r.figure == "wall_seconds").unwrap();
        assert!(wall.differs && wall.kind == Kind::Host);
        // Counted when asked for.
        assert!(!compare(&a, &b, &[FailOn::Host]).2);
        assert!(compare(&a, &b, &[FailOn::Outcome, FailOn::Figures]).2);
    }

    #[test]
    fn different_kernels_configs_and_outcomes_are_rows_and_warnings() {
        let a = with_kernels(report(A), vec![kernel("builtin", None, "ab", &["alpha"])]);
        let b_text =
            A.replace("exit_status=0", "exit_status=57005").replace("outcome=ok", "outcome=failed");
        let mut b =
            with_kernels(report(&b_text), vec![kernel("file", Some("k.elf"), "cd", &["alpha"])]);
        // (Reports of records without core records say `failed`: set the outcomes.)
        let mut a = a;
        (a.outcome, b.outcome) = ("ok".into(), "failed".into());
        b.meta.config = Some(crate::report::ConfigMeta {
            path: "b.toml".into(),
            sha256: "ef".repeat(32),
            contents: String::new(),
        });
        let (rows, warnings, same) = compare(&a, &b, &[FailOn::Any]);
        assert!(!same);
        let row = rows.iter().find(|r| r.figure == "alpha.kernel").expect("a kernel row");
        assert_eq!(
            (row.a.as_deref(), row.b.as_deref(), row.kind),
            (Some("builtin abababababab"), Some("file k.elf cdcdcdcdcdcd"), Kind::Kernels)
        );
        // A status reads as the summary prints it (hex above 255), with no B - A.
        let row = rows.iter().find(|r| r.figure == "alpha.exit_status").expect("a status row");
        assert_eq!(
            (row.a.as_deref(), row.b.as_deref(), row.delta),
            (Some("0"), Some("0xdead"), None)
        );
        let text = warnings.join("\n");
        assert!(
            text.contains("the configs differ: A no config, B b.toml (sha256 efefefefefef)"),
            "{text}"
        );
        assert!(
            text.contains(
                "the guest kernels differ: alpha (builtin abababababab vs file k.elf cdcdcdcdcdcd)"
            ),
            "{text}"
        );
        assert!(
            text.contains("the outcomes differ: run ok vs failed; alpha exited 0 vs exited 0xdead"),
            "{text}"
        );
        // Each kind counts on its own; `none` never does.
        for (f, differs) in [
            (FailOn::Kernels, true),
            (FailOn::Config, true),
            (FailOn::Outcome, true),
            (FailOn::Setup, false),
            (FailOn::Figures, false),
            (FailOn::None, false),
        ] {
            assert_eq!(!compare(&a, &b, &[f]).2, differs, "{f:?}");
        }
        // A report that does not identify its kernels: said, not taken for a difference.
        let old = Report { outcome: "ok".into(), ..with_kernels(report(A), vec![]) };
        let (rows, warnings, _) = compare(&old, &a, &[FailOn::Kernels]);
        assert!(!rows.iter().any(|r| r.kind == Kind::Kernels));
        assert_eq!(warnings, ["A does not identify its guest kernels (an older report)"]);
    }

    #[test]
    fn the_command_gives_json_and_diff_exit_codes() {
        let tmp = tempfile::tempdir().unwrap();
        let write = |name: &str, r: &Report| {
            let p = tmp.path().join(name);
            std::fs::write(&p, serde_json::to_string(r).unwrap()).unwrap();
            p
        };
        let a = write("a.json", &report(A));
        let b = write("b.json", &report(&A.replace("vmcall:8", "vmcall:9")));
        assert!(command(&a, &a, true, &[FailOn::Any]).unwrap());
        assert!(!command(&a, &b, true, &[FailOn::Any]).unwrap());
        assert!(command(&a, &b, false, &[FailOn::Outcome]).unwrap());
        // Trouble: exit code 2, whatever the other file.
        let junk = tmp.path().join("junk.json");
        std::fs::write(&junk, "{\"not\": \"a report\"}").unwrap();
        for bad in [junk, tmp.path().join("missing.json")] {
            let e = command(&a, &bad, false, &[FailOn::Any]).unwrap_err();
            assert_eq!(crate::exit::of_error(&e), 2, "{e:#}");
        }
        // The JSON document: what differs, by kind.
        let d = Diff {
            a: "a".into(),
            b: "b".into(),
            differ_in: vec![Kind::Figures],
            same: false,
            warnings: vec![],
            rows: rows(&report(A), &report(&A.replace("vmcall:8", "vmcall:9"))),
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["differ_in"], serde_json::json!(["figures"]));
        let row =
            v["rows"].as_array().unwrap().iter().find(|r| r["figure"] == "alpha.exits.vmcall");
        let row = row.expect("the vmcall row");
        assert_eq!(
            (row["a"].as_str(), row["b"].as_str(), row["delta"].as_f64()),
            (Some("8"), Some("9"), Some(1.0))
        );
        assert_eq!((row["kind"].as_str(), row["differs"].as_bool()), (Some("figures"), Some(true)));
    }
}
