// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask report diff A.json B.json`: two run reports side by side, figure by figure
//! (run-wide TSC figures, then per guest: state, status, hypercalls, life, exits by reason,
//! trace totals), with the difference B - A and its ratio, as a comfy-table table.
//! Owns only the comparison; reads `report::Report`.

use crate::report::{GuestReport, Report};
use anyhow::{Context, Result};
use comfy_table::{presets::UTF8_FULL_CONDENSED, CellAlignment, Table};
use std::collections::BTreeSet;
use std::path::Path;

/// One compared figure: its name, the two values (absent where a report lacks it), and
/// B - A when both are numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub figure: String,
    pub a: Option<String>,
    pub b: Option<String>,
    pub delta: Option<f64>,
    pub ratio: Option<f64>,
}

fn num_row(figure: String, a: Option<f64>, b: Option<f64>) -> Row {
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
    Row { figure, a: show(a), b: show(b), delta, ratio }
}

fn text_row(figure: String, a: Option<&str>, b: Option<&str>) -> Row {
    Row { figure, a: a.map(str::to_string), b: b.map(str::to_string), delta: None, ratio: None }
}

fn life(g: &GuestReport) -> Option<f64> {
    (g.tsc_first_entry > 0 && g.tsc_end >= g.tsc_first_entry)
        .then(|| (g.tsc_end - g.tsc_first_entry) as f64)
}

/// The rows comparing `a` and `b`. Guests are matched by name.
pub fn rows(a: &Report, b: &Report) -> Vec<Row> {
    let mut out = vec![
        text_row("outcome".into(), Some(&a.outcome), Some(&b.outcome)),
        text_row(
            "emulator / model".into(),
            Some(&format!("{} / {}", a.emulator, a.cpu_model)),
            Some(&format!("{} / {}", b.emulator, b.cpu_model)),
        ),
        text_row("tsc_unit".into(), Some(&a.tsc_unit), Some(&b.tsc_unit)),
        text_row("commit".into(), a.meta.git_commit.as_deref(), b.meta.git_commit.as_deref()),
        text_row(
            "config sha256".into(),
            a.meta.config.as_ref().map(|c| &c.sha256[..12]),
            b.meta.config.as_ref().map(|c| &c.sha256[..12]),
        ),
        num_row("cpus".into(), Some(a.cpus.into()), Some(b.cpus.into())),
        num_row("wall_seconds".into(), Some(a.wall_seconds), Some(b.wall_seconds)),
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
        out.push(num_row(name.into(), x.map(|v| v as f64), y.map(|v| v as f64)));
    }
    let mut names: Vec<&str> = a.guests.iter().map(|g| g.name.as_str()).collect();
    for g in &b.guests {
        if !names.contains(&g.name.as_str()) {
            names.push(&g.name);
        }
    }
    for name in names {
        let (ga, gb) =
            (a.guests.iter().find(|g| g.name == name), b.guests.iter().find(|g| g.name == name));
        let f = |k: &str| format!("{name}.{k}");
        out.push(text_row(f("state"), ga.map(|g| g.state.as_str()), gb.map(|g| g.state.as_str())));
        let status = |g: Option<&GuestReport>| {
            g.filter(|g| g.state == "exited").map(|g| g.exit_status as f64)
        };
        out.push(num_row(f("exit_status"), status(ga), status(gb)));
        out.push(num_row(
            f("hypercalls"),
            ga.map(|g| g.hypercalls as f64),
            gb.map(|g| g.hypercalls as f64),
        ));
        out.push(num_row(f("life_tsc"), ga.and_then(life), gb.and_then(life)));
        let total = |g: Option<&GuestReport>| g.map(|g| g.exits.values().sum::<u64>() as f64);
        out.push(num_row(f("exits"), total(ga), total(gb)));
        let reasons: BTreeSet<&String> =
            ga.iter().chain(gb.iter()).flat_map(|g| g.exits.keys()).collect();
        for reason in reasons {
            let n = |g: Option<&GuestReport>| {
                g.map(|g| g.exits.get(reason).copied().unwrap_or(0) as f64)
            };
            out.push(num_row(f(&format!("exits.{reason}")), n(ga), n(gb)));
        }
        let tr = |g: Option<&GuestReport>| g.and_then(|g| g.trace.clone());
        if tr(ga).is_some() || tr(gb).is_some() {
            out.push(num_row(
                f("trace.guest_tsc"),
                tr(ga).map(|t| t.guest_tsc as f64),
                tr(gb).map(|t| t.guest_tsc as f64),
            ));
            out.push(num_row(
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

fn load(p: &Path) -> Result<Report> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a run report", p.display()))
}

/// `cargo xtask report diff A B`: prints the table; the TSC unit and config of each first.
pub fn command(a: &Path, b: &Path) -> Result<()> {
    let (ra, rb) = (load(a)?, load(b)?);
    println!("A: {}\nB: {}", a.display(), b.display());
    if ra.tsc_unit != rb.tsc_unit {
        println!(
            "note: the TSC units differ ({} vs {}): TSC figures do not compare",
            ra.tsc_unit, rb.tsc_unit
        );
    }
    println!("{}", table(&rows(&ra, &rb)));
    Ok(())
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
}
