// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask plot`: SVG figures (plotters) from what runs and benchmarks wrote.
//!
//! * a run report (`run --report`): its boot phases and guest lifetimes on one time axis
//!   (`*.boot.svg`); with a trace (`run --trace`), each guest's cumulative VM exits over
//!   time (`*.exits.svg`);
//! * `bench channels --json`: the host round-trip latency histograms (`*.rtt.svg`);
//! * `bench caps --json`: revoke cost against the number of copies k (`*.revoke.svg`);
//! * `bench kv --json`: the key-value service's requests/s and instructions per request
//!   against workers (`*.scaling.svg`).
//!
//! Owns only the drawing; reads the report and bench types of `report` and `bench` (which
//! never calls this: `cargo xtask bench --plot` calls [`after_bench`]).

use crate::report::Report;
use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// `bench ... --json F --plot`: draws the figures the bench just wrote to `json` next to it
/// (a failed plot is a warning: the figures are written).
pub fn after_bench(json: Option<&Path>) {
    let Some(p) = json else { return };
    match files(&[p.to_path_buf()], None) {
        Ok(w) => w.iter().for_each(|p| eprintln!("bench: plot {}", p.display())),
        Err(e) => crate::exit::warn(format_args!("no plot: {e:#}")),
    }
}

const SIZE: (u32, u32) = (960, 540);
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// What a plotted file holds.
enum Input {
    Report(Box<Report>),
    Channels(Box<crate::bench::Report>),
    Caps(Vec<crate::bench::CapsRow>),
    Kv(Box<crate::kvbench::KvBench>),
}

fn read(path: &Path) -> Result<Input> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    if v.get("outcome").is_some() && v.get("guests").is_some() {
        return Ok(Input::Report(Box::new(serde_json::from_value(v)?)));
    }
    if v.get("host").is_some() && v.get("emulated").is_some() {
        return Ok(Input::Channels(Box::new(serde_json::from_value(v)?)));
    }
    if v.get("kv_scaling").is_some() {
        return Ok(Input::Kv(Box::new(serde_json::from_value(v)?)));
    }
    if v.as_array().is_some_and(|a| a.first().is_some_and(|r| r.get("revoke").is_some())) {
        return Ok(Input::Caps(serde_json::from_value(v)?));
    }
    bail!(
        "{}: neither a run report, nor `bench channels --json`, `bench caps --json` or `bench \
         kv --json` output",
        path.display()
    )
}

/// Where the figure `what` of `input` goes: next to it, or in `out`.
fn output(input: &Path, out: Option<&Path>, what: &str) -> PathBuf {
    let stem = input.file_stem().map_or("plot".into(), |s| s.to_string_lossy().into_owned());
    let dir = out
        .map_or_else(|| input.parent().unwrap_or(Path::new(".")).to_path_buf(), Path::to_path_buf);
    dir.join(format!("{stem}.{what}.svg"))
}

/// Plots every file; returns the SVGs written.
pub fn files(inputs: &[PathBuf], out: Option<&Path>) -> Result<Vec<PathBuf>> {
    if let Some(o) = out {
        std::fs::create_dir_all(o)?;
    }
    let mut written = vec![];
    for input in inputs {
        // Not a report or benchmark output: an input error (exit code 2), as `report diff`.
        match read(input).map_err(|e| crate::exit::coded(crate::exit::USAGE, e))? {
            Input::Report(r) => {
                let p = output(input, out, "boot");
                boot_phases(&r, &p)?;
                written.push(p);
                if let Some(csv) = &r.trace_csv {
                    let p = output(input, out, "exits");
                    let text = std::fs::read_to_string(csv)
                        .with_context(|| format!("reading the trace {csv}"))?;
                    exits_over_time(&text, &r.tsc_unit, &p)?;
                    written.push(p);
                }
            }
            Input::Channels(c) => {
                let p = output(input, out, "rtt");
                rtt_histograms(&c.host, &p)?;
                written.push(p);
            }
            // `--revoke`: strategies side by side; otherwise the costs of one machine.
            Input::Caps(rows) if rows.iter().any(|r| !r.strategy.is_empty()) => {
                let p = output(input, out, "strategies");
                revoke_strategies(&rows, &p)?;
                written.push(p);
            }
            Input::Caps(rows) => {
                let p = output(input, out, "revoke");
                revoke_against_k(&rows, &p)?;
                written.push(p);
            }
            Input::Kv(b) => {
                let p = output(input, out, "scaling");
                kv_scaling(&b.kv_scaling, &p)?;
                written.push(p);
            }
        }
    }
    Ok(written)
}

fn unit_label(tsc_unit: &str) -> &'static str {
    if tsc_unit == "emulated_instructions" {
        "emulated instructions (Bochs TSC)"
    } else {
        "TSC clock ticks"
    }
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e}")
}

/// An axis label for a count: the whole numbers only (`5`, never `5.0`), nothing between
/// them (a tick at 2.5 exits or 1.5 workers would be a label for what cannot be).
fn whole(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{:.0}", v)
    } else {
        String::new()
    }
}

/// The path of a cumulative count through `points` (sorted by x): flat until the next
/// event, then up, so that the count is never drawn between two values it never had.
fn staircase(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut path = Vec::with_capacity(points.len() * 2);
    for &(x, y) in points {
        if let Some(&(_, prev)) = path.last() {
            path.push((x, prev));
        }
        path.push((x, y));
    }
    path
}

/// One line with a dot per point, colour `i`, and its legend entry; with `steps`, the
/// line is a staircase (a cumulative count).
fn series<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    points: &[(f64, f64)],
    i: usize,
    label: String,
    dot: u32,
    steps: bool,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let c = colour(i);
    chart
        .draw_series(LineSeries::new(
            if steps { staircase(points) } else { points.to_vec() },
            c.stroke_width(2),
        ))
        .map_err(err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    chart.draw_series(points.iter().map(|&q| Circle::new(q, dot, c.filled()))).map_err(err)?;
    Ok(())
}

/// The legend box at `at`.
fn legend<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    at: SeriesLabelPosition,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

/// Each guest's cumulative exits against time since hypervisor entry, from a trace CSV
/// (`report::Console::trace_csv`).
pub fn exits_over_time(csv: &str, tsc_unit: &str, path: &Path) -> Result<()> {
    // guest -> (exit time, cumulative exits), seq gives the count of exits before the ring.
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = vec![];
    for (n, line) in csv.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (Some(g), Some(seq), Some(exit)) = (f.first(), f.get(2), f.get(5)) else {
            bail!("trace CSV line {}: too few fields", n + 1)
        };
        let (seq, exit): (f64, f64) = (seq.parse()?, exit.parse()?);
        match lines.iter_mut().find(|s| s.0 == *g) {
            Some(s) => s.1.push((exit, seq + 1.0)),
            None => lines.push((g.to_string(), vec![(exit, seq + 1.0)])),
        }
    }
    if lines.is_empty() {
        bail!("the trace has no exits");
    }
    let pts = || lines.iter().flat_map(|s| s.1.iter());
    let x_max = pts().map(|p| p.0).fold(0.0, f64::max) * 1.02;
    let x_min = pts().map(|p| p.0).fold(f64::MAX, f64::min) * 0.98;
    let y_max = pts().map(|p| p.1).fold(0.0, f64::max) * 1.1 + 1.0;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("VM exits over time, per guest (cumulative)", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(format!("time since hypervisor entry, {}", unit_label(tsc_unit)))
        .y_desc("exits so far")
        .x_label_formatter(&|x| format!("{:.3e}", x))
        .y_label_formatter(&whole)
        .draw()
        .map_err(err)?;
    for (i, (g, p)) in lines.iter_mut().enumerate() {
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        let label = format!("{g} ({} exits)", p.last().map_or(0.0, |l| l.1));
        series(&mut chart, p, i, label, 2, true)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(err)?;
    Ok(())
}

/// The run's phases on one time axis from hypervisor entry: the hypervisor's boot, then
/// each guest from its first entry to its end (firmware and GRUB, before, are in the title:
/// drawn, they would dwarf the rest).
pub fn boot_phases(r: &Report, path: &Path) -> Result<()> {
    let Some(entry) = r.tsc.hypervisor_entry else {
        bail!("the report has no hypervisor entry TSC: nothing to plot")
    };
    let since = |t: u64| t.saturating_sub(entry) as f64;
    let mut bars: Vec<(String, f64, f64)> = vec![];
    if let Some(b) = r.tsc.hypervisor_boot {
        bars.push(("hypervisor boot (all cores up)".into(), 0.0, b as f64));
    }
    for g in &r.guests {
        if g.tsc_first_entry > 0 && g.tsc_end >= g.tsc_first_entry {
            bars.push((
                format!("guest {} (core {}, {})", g.name, g.core, g.state),
                since(g.tsc_first_entry),
                since(g.tsc_end),
            ));
        }
    }
    if bars.is_empty() {
        bail!("the report has no phases after hypervisor entry");
    }
    let end = r.tsc.end.map(since).unwrap_or_else(|| bars.iter().map(|b| b.2).fold(0.0, f64::max));
    let n = bars.len();
    let root = SVGBackend::new(path, (SIZE.0, 150 + 45 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Run phases: {} {} CPUs, outcome {}; firmware + GRUB before: {:.3e}",
                r.emulator, r.cpus, r.outcome, entry as f64
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..end * 1.2, 0.0..n as f64)
        .map_err(err)?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            let i = y.floor() as usize;
            if (y - y.floor() - 0.5).abs() < 1e-6 && i < labels.len() {
                labels[n - 1 - i].clone()
            } else {
                String::new()
            }
        })
        .x_desc(format!("since hypervisor entry, {}", unit_label(&r.tsc_unit)))
        .x_label_formatter(&|x| format!("{:.2e}", x))
        .draw()
        .map_err(err)?;
    for (i, (_, a, b)) in bars.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(*a, y + 0.2), (*b, y + 0.8)],
                colour(i).filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{:.3e}", b - a),
                (*b + end * 0.01, y + 0.6),
                ("sans-serif", 13),
            )))
            .map_err(err)?;
    }
    // The end record: a vertical line, labelled where it is drawn (a legend of one entry
    // would cover the bars).
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(end, 0.0), (end, n as f64)],
            BLACK.stroke_width(1),
        )))
        .map_err(err)?;
    chart
        .draw_series(std::iter::once(Text::new(
            format!("end of run ({})", r.outcome),
            (end + end * 0.01, n as f64 - 0.05),
            ("sans-serif", 13),
        )))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Round-trip latency histograms of the host transports (`bench channels`), one line per
/// transport on a log latency axis.
pub fn rtt_histograms(rows: &[crate::bench::HostRow], path: &Path) -> Result<()> {
    let with: Vec<_> = rows.iter().filter(|r| !r.rtt_histogram.is_empty()).collect();
    if with.is_empty() {
        bail!("no round-trip histograms in this bench output (written by newer `bench channels`)");
    }
    let x_min =
        with.iter().flat_map(|r| &r.rtt_histogram).map(|b| b.upper_ns).fold(f64::MAX, f64::min);
    let x_max = with.iter().flat_map(|r| &r.rtt_histogram).map(|b| b.upper_ns).fold(0.0, f64::max);
    let frac = |r: &crate::bench::HostRow| {
        let total: u64 = r.rtt_histogram.iter().map(|b| b.count).sum();
        r.rtt_histogram
            .iter()
            .map(|b| (b.upper_ns, b.count as f64 / total.max(1) as f64))
            .collect::<Vec<_>>()
    };
    let y_max = with.iter().flat_map(|r| frac(r)).map(|p| p.1).fold(0.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Host round trips, 64-byte messages: latency histogram", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x_min * 0.8..x_max * 1.25).log_scale(), 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("round trip, ns (bucket upper bound, log scale)")
        .y_desc("fraction of round trips")
        .draw()
        .map_err(err)?;
    for (i, r) in with.iter().enumerate() {
        let label = format!("{} (median {:.0} ns)", r.name, r.rtt_median_ns);
        series(&mut chart, &frac(r), i, label, 2, false)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Revoke cost, total and per copy, against the number of copies k (`bench caps`).
pub fn revoke_against_k(rows: &[crate::bench::CapsRow], path: &Path) -> Result<()> {
    if rows.is_empty() {
        bail!("no rows in this bench caps output");
    }
    let k_max = rows.iter().map(|r| r.k).max().unwrap_or(1) as f64;
    let y_max = rows.iter().map(|r| r.revoke).max().unwrap_or(1) as f64 * 1.1;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Capability revoke cost against copies k (Bochs)", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..k_max + 1.0, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("k: copies on k other cores")
        .x_label_formatter(&whole)
        .y_desc("emulated instructions")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    type Figure = fn(&crate::bench::CapsRow) -> u64;
    let figures: [(&str, Figure); 3] = [
        ("revoke (total)", |r| r.revoke),
        ("revoke per copy", |r| r.revoke_per_copy),
        ("copy (each)", |r| r.copy_per_copy),
    ];
    for (i, (name, f)) in figures.into_iter().enumerate() {
        let p: Vec<(f64, f64)> = rows.iter().map(|r| (r.k as f64, f(r) as f64)).collect();
        series(&mut chart, &p, i, name.to_string(), 4, false)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Revoke latency and the revoker's own cost against k, one line per strategy (`bench caps
/// --revoke`): two panels side by side.
pub fn revoke_strategies(rows: &[crate::bench::CapsRow], path: &Path) -> Result<()> {
    if rows.is_empty() {
        bail!("no rows in this bench caps output");
    }
    let mut strategies: Vec<&str> = vec![];
    for r in rows {
        if !strategies.contains(&r.strategy.as_str()) {
            strategies.push(&r.strategy);
        }
    }
    let k_max = rows.iter().map(|r| r.k).max().unwrap_or(1) as f64;
    let root = SVGBackend::new(path, (SIZE.0 * 3 / 2, SIZE.1)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(SIZE.0 * 3 / 4);
    type Figure = fn(&crate::bench::CapsRow) -> u64;
    let panels: [(_, &str, Figure); 2] = [
        (left, "Revoke latency (until every copy confirmed)", |r| r.revoke),
        (right, "The revoker's own cost (its core's work)", |r| r.revoke_own),
    ];
    for (area, title, f) in panels {
        let y_max = rows.iter().map(f).max().unwrap_or(1).max(1) as f64 * 1.1;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..k_max + 1.0, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("k: copies on k other cores (15 CPUs)")
            .x_label_formatter(&whole)
            .y_desc("emulated instructions")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(err)?;
        for (i, s) in strategies.iter().enumerate() {
            let p: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.strategy == *s)
                .map(|r| (r.k as f64, f(r) as f64))
                .collect();
            series(&mut chart, &p, i, s.to_string(), 4, false)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// The key-value service against its workers (`bench kv`): host requests/s on the left,
/// the front's emulated instructions per request on the right.
pub fn kv_scaling(rows: &[crate::kvbench::Row], path: &Path) -> Result<()> {
    if rows.is_empty() {
        bail!("no scaling rows in this bench kv output");
    }
    let w_max = rows.iter().map(|r| r.workers).max().unwrap_or(1) as f64;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    type Figure = fn(&crate::kvbench::Row) -> f64;
    let panels: [(&DrawingArea<SVGBackend, plotters::coord::Shift>, &str, &str, Figure); 2] = [
        (&left, "Requests per second (host time)", "requests/s", |r| r.requests_per_second),
        (&right, "Front's instructions per request (Bochs)", "emulated instructions", |r| {
            r.instructions_per_request.unwrap_or(0) as f64
        }),
    ];
    for (i, (area, caption, y, f)) in panels.into_iter().enumerate() {
        let y_max = rows.iter().map(f).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..w_max + 1.0, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("workers")
            .x_label_formatter(&whole)
            .y_desc(y)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(err)?;
        let p: Vec<(f64, f64)> = rows.iter().map(|r| (f64::from(r.workers), f(r))).collect();
        series(&mut chart, &p, i, y.to_string(), 4, false)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{histogram, CapsRow, HostRow};

    #[test]
    fn a_kv_bench_is_drawn_against_workers() {
        let b = crate::kvbench::tests::sample();
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("kv.json");
        std::fs::write(&json, serde_json::to_string(&b).unwrap()).unwrap();
        let written = files(&[json], None).unwrap();
        assert_eq!(written, [dir.path().join("kv.scaling.svg")]);
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert!(svg.contains("workers") && svg.contains("requests/s"));
    }

    #[test]
    fn each_kind_of_input_gets_its_figure() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = |name: &str| dir.path().join(name);
        // Bench caps: revoke against k, every k a point.
        let rows: Vec<CapsRow> = [1u64, 2, 4]
            .iter()
            .map(|&k| CapsRow {
                k,
                unit: "emulated_instructions".into(),
                map: 100,
                unmap: 90,
                copy_per_copy: 500,
                move_: 700,
                revoke: 1000 * k,
                revoke_per_copy: 1000,
                revoke_exits_owner: 1,
                holder_nmi_exits: k,
                owner_nmis: k,
                owner_messages: 2 * k,
                ..Default::default()
            })
            .collect();
        let caps = tmp("caps.json");
        std::fs::write(&caps, serde_json::to_string(&rows).unwrap()).unwrap();
        // Bench channels: histograms.
        let host = vec![HostRow {
            name: "mkvisor ring".into(),
            rtt_median_ns: 150.0,
            rtt_p99_ns: 300.0,
            throughput_mmsg_s: 10.0,
            rtt_ratio_to_cacheline: 1.1,
            throughput_ratio_to_cacheline: 0.9,
            throughput_ratio_to_raw: 0.8,
            rtt_histogram: histogram(&[100.0, 150.0, 150.0, 300.0]),
            repeats: 1,
            rtt_median_ns_ci: None,
            throughput_mmsg_s_ci: None,
            ci_confidence: 0.0,
        }];
        let ch = tmp("channels.json");
        let bench = crate::bench::Report {
            host,
            stream_pairs: None,
            rtt_pairs: None,
            emulated: None,
            meta: Default::default(),
        };
        std::fs::write(&ch, serde_json::to_string(&bench).unwrap()).unwrap();
        let out = files(&[caps.clone(), ch.clone()], None).unwrap();
        assert_eq!(out, [tmp("caps.revoke.svg"), tmp("channels.rtt.svg")]);
        let svg = std::fs::read_to_string(&out[0]).unwrap();
        assert!(svg.contains("revoke per copy") && svg.contains("copies on k other cores"));
        assert_eq!(svg.matches("<circle").count(), 9, "three series of three k");
        let svg = std::fs::read_to_string(&out[1]).unwrap();
        assert!(svg.contains("mkvisor ring (median 150 ns)"), "{svg}");
        // Something else is refused, by name.
        let other = tmp("other.json");
        std::fs::write(&other, "{\"x\": 1}").unwrap();
        assert!(files(&[other], None).unwrap_err().to_string().contains("neither a run report"));
    }

    #[test]
    fn revoke_strategies_get_a_line_each_in_both_panels() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<CapsRow> = (1..=3u64)
            .flat_map(|k| {
                ["broadcast", "tree/2"].map(|s| CapsRow {
                    k,
                    revoke: 1000 * k,
                    revoke_own: 100 * k,
                    strategy: s.into(),
                    cpus: 15,
                    ..Default::default()
                })
            })
            .collect();
        let caps = dir.path().join("s.json");
        std::fs::write(&caps, serde_json::to_string(&rows).unwrap()).unwrap();
        let out = files(&[caps], None).unwrap();
        assert_eq!(out, [dir.path().join("s.strategies.svg")]);
        let svg = std::fs::read_to_string(&out[0]).unwrap();
        assert!(svg.contains("tree/2") && svg.contains("own cost"), "{svg}");
        assert_eq!(svg.matches("<circle").count(), 12, "two strategies of three k, two panels");
    }

    #[test]
    fn exits_over_time_has_one_series_per_guest() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = |name: &str| dir.path().join(name);
        let csv = "guest,core,seq,reason,entry_tsc,exit_tsc,guest_tsc,hypervisor_tsc_before\n\
                   a,0,5,vmcall,10,20,10,\na,0,6,hlt,30,40,10,10\nb,1,0,cpuid,15,25,10,\n";
        let p = tmp("t.exits.svg");
        exits_over_time(csv, "tsc_ticks", &p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        // The ring dropped a's first five exits: its count starts at 6.
        assert!(svg.contains("a (7 exits)") && svg.contains("b (1 exits)"), "{svg}");
        assert!(svg.contains("TSC clock ticks"));
        assert!(exits_over_time("guest\n", "tsc_ticks", &p).is_err());
        // Counts as whole numbers, never `5.0`, and no label between two of them.
        assert!(!svg.contains(".0<") && !svg.contains(".5<"), "{svg}");
    }

    #[test]
    fn the_boot_plot_labels_its_end_line() {
        let mut c = crate::report::Console::default();
        for l in [
            "#mkv boot abi=1 tsc=100 cmdline=\"\"",
            "#mkv ready tsc=150",
            "#mkv guest index=0 name=a core=0 state=exited exit_status=0 exits=\"vmcall:2\" fault=\"\" hypercalls=2 tsc_first_entry=160 tsc_end=200",
            "#mkv end outcome=ok tsc=250",
        ] {
            c.feed(l);
        }
        let r = crate::report::for_tests(&mut c);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.boot.svg");
        boot_phases(&r, &p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.contains("guest a (core 0, exited)"), "{svg}");
        assert!(svg.contains(&format!("end of run ({})", r.outcome)), "{svg}");
    }

    #[test]
    fn cumulative_counts_are_steps_and_counts_are_whole() {
        assert_eq!(
            staircase(&[(1.0, 1.0), (3.0, 2.0), (4.0, 5.0)]),
            [(1.0, 1.0), (3.0, 1.0), (3.0, 2.0), (4.0, 2.0), (4.0, 5.0)]
        );
        assert!(staircase(&[]).is_empty());
        assert_eq!(whole(&5.0), "5");
        assert_eq!(whole(&2.5), "");
        assert_eq!(whole(&0.0), "0");
    }
}
