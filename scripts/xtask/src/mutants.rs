// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask mutants`: mutation testing, with cargo-mutants, of the files that guard
//! isolation. Each mutant is a small change to the code (an operator swapped, a function
//! body replaced by a constant); a mutant the tests still pass with is behaviour nothing
//! pins down. The tool runs cargo-mutants once per package over the chosen files, reads its
//! `outcomes.json`, prints a table per file and fails when a file's share of caught mutants
//! is under the threshold.
//!
//! Not part of `cargo xtask test`: it builds and tests every mutant, which takes minutes per
//! file. Mutants inside test modules are excluded by `.cargo/mutants.toml`.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// The files that guard isolation: the ABI's ring, capability space and config validation,
/// the VM-exit handler and the EPT builder.
pub const DEFAULT_FILES: &[&str] = &[
    "vmcall-proto/src/caps.rs",
    "vmcall-proto/src/channel.rs",
    "vmcall-proto/src/config.rs",
    "hypervisor/src/exits.rs",
    "hypervisor/src/ept.rs",
];

/// What cargo-mutants says about one scenario (`outcomes.json`, fields we use).
#[derive(Deserialize, Debug)]
struct Outcome {
    scenario: Scenario,
    summary: Summary,
}

#[derive(Deserialize, Debug)]
enum Scenario {
    Baseline,
    Mutant(Mutant),
}

#[derive(Deserialize, Debug)]
struct Mutant {
    name: String,
    file: String,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
enum Summary {
    Success,
    CaughtMutant,
    MissedMutant,
    Unviable,
    Failure,
    Timeout,
}

#[derive(Deserialize, Debug)]
struct Outcomes {
    outcomes: Vec<Outcome>,
}

/// Mutation figures for one file.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileStats {
    pub mutants: usize,
    pub caught: usize,
    pub missed: usize,
    pub timeouts: usize,
    pub unviable: usize,
    /// cargo-mutants' names of the missed mutants (file:line:column: what changed).
    pub missed_names: Vec<String>,
}

impl FileStats {
    /// Mutants that built: the ones the tests had a chance to catch.
    pub fn viable(&self) -> usize {
        self.mutants - self.unviable
    }

    /// Caught mutants as a percentage of viable ones (a timeout counts as not caught);
    /// `None` when no mutant built.
    pub fn caught_pct(&self) -> Option<f64> {
        (self.viable() > 0).then(|| 100.0 * self.caught as f64 / self.viable() as f64)
    }
}

/// Tallies cargo-mutants' `outcomes.json` per file. Every file of `files` gets a row, so a
/// file with no mutant at all shows as such; mutants of other files are left out.
pub fn tally(outcomes_json: &str, files: &[String]) -> Result<BTreeMap<String, FileStats>> {
    let parsed: Outcomes =
        serde_json::from_str(outcomes_json).context("reading cargo-mutants' outcomes.json")?;
    let mut stats: BTreeMap<String, FileStats> =
        files.iter().map(|f| (f.clone(), FileStats::default())).collect();
    for o in parsed.outcomes {
        let m = match o.scenario {
            Scenario::Baseline if o.summary == Summary::Success => continue,
            Scenario::Baseline => bail!("the unmutated baseline did not pass ({:?})", o.summary),
            Scenario::Mutant(m) => m,
        };
        let Some(s) = stats.get_mut(&m.file) else { continue };
        s.mutants += 1;
        match o.summary {
            Summary::CaughtMutant => s.caught += 1,
            Summary::MissedMutant => {
                s.missed += 1;
                s.missed_names.push(m.name);
            }
            Summary::Timeout => s.timeouts += 1,
            Summary::Unviable => s.unviable += 1,
            // Only with --check or an unclassified failure; neither tested nor caught.
            Summary::Success | Summary::Failure => {}
        }
    }
    Ok(stats)
}

/// The table: one row per file, then the missed mutants.
pub fn table(stats: &BTreeMap<String, FileStats>) -> String {
    let width = stats.keys().map(|f| f.len()).max().unwrap_or(0).max(4);
    let mut out = format!(
        "{:<width$}  {:>7}  {:>6}  {:>6}  {:>8}  {:>8}  {:>8}\n",
        "file", "mutants", "caught", "missed", "timeouts", "unviable", "caught %"
    );
    for (file, s) in stats {
        let pct = s.caught_pct().map_or("-".to_string(), |p| format!("{p:.1}"));
        out += &format!(
            "{file:<width$}  {:>7}  {:>6}  {:>6}  {:>8}  {:>8}  {pct:>8}\n",
            s.mutants, s.caught, s.missed, s.timeouts, s.unviable
        );
    }
    for s in stats.values() {
        for name in &s.missed_names {
            out += &format!("missed: {name}\n");
        }
    }
    out
}

/// The files whose caught share is under `min` percent (a file without viable mutants
/// passes: there is nothing to catch).
pub fn below(stats: &BTreeMap<String, FileStats>, min: f64) -> Vec<&str> {
    stats
        .iter()
        .filter(|(_, s)| s.caught_pct().is_some_and(|p| p < min))
        .map(|(f, _)| f.as_str())
        .collect()
}

/// The package a source file belongs to: the `[package] name` of the nearest Cargo.toml
/// above it (paths relative to the workspace root).
pub fn package_of(root: &Path, file: &str) -> Result<String> {
    let mut dir = root.join(file);
    if !dir.is_file() {
        bail!("{file}: no such file under {}", root.display());
    }
    while dir.pop() && dir.starts_with(root) {
        let manifest = dir.join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else { continue };
        let doc: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", manifest.display()))?;
        if let Some(name) = doc.get("package").and_then(|p| p.get("name")) {
            return name.as_str().map(str::to_string).context("package.name is not a string");
        }
    }
    bail!("{file}: not inside a package of this workspace")
}

/// Extra cargo-mutants arguments for a package. The bare-metal crates' binaries build only
/// for `x86_64-unknown-none`; on the host only their unit-test harness does. cargo-mutants
/// builds with `cargo test --no-run -p PKG`, which builds just that harness, and the tests
/// run as `cargo test -p PKG --bins` (what follows `--` goes to `cargo test`).
fn extra_args(package: &str) -> &'static [&'static str] {
    match package {
        "hypervisor" | "guestkernel" => &["--", "--bins"],
        _ => &[],
    }
}

/// Installs cargo-mutants with `cargo install --locked` if `cargo mutants` is not there.
pub fn ensure_cargo_mutants() -> Result<()> {
    let have = Command::new("cargo")
        .args(["mutants", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if have {
        return Ok(());
    }
    eprintln!("setup: installing cargo-mutants (mutation testing for `cargo xtask mutants`)");
    let status = Command::new("cargo")
        .args(["install", "cargo-mutants", "--locked"])
        .status()
        .context("running cargo install")?;
    if !status.success() {
        bail!("`cargo install cargo-mutants --locked` failed with {status}");
    }
    Ok(())
}

/// Runs cargo-mutants over `files` (default [`DEFAULT_FILES`]), prints the table and
/// returns whether every file reached `min` percent.
pub fn run(files: &[String], min: f64, jobs: u32) -> Result<bool> {
    let root = crate::workspace_root();
    let files: Vec<String> = if files.is_empty() {
        DEFAULT_FILES.iter().map(|f| f.to_string()).collect()
    } else {
        files.to_vec()
    };
    let mut by_package: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in &files {
        by_package.entry(package_of(&root, f)?).or_default().push(f.clone());
    }
    ensure_cargo_mutants()?;
    let mut stats = BTreeMap::new();
    for (package, files) in &by_package {
        let out = crate::target_dir().join("mutants").join(package);
        std::fs::create_dir_all(&out)?;
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(&root)
            .args(["mutants", "--no-shuffle", "--jobs", &jobs.to_string(), "--package", package])
            .arg("--output")
            .arg(&out);
        for f in files {
            cmd.args(["--file", f]);
        }
        cmd.args(extra_args(package));
        eprintln!("mutants: {package}: {}", files.join(", "));
        let status = cmd.status().context("running cargo mutants")?;
        // 0: all caught, 2: some missed, 3: some timed out; anything else is no result.
        if !matches!(status.code(), Some(0 | 2 | 3)) {
            bail!("cargo mutants on {package} failed with {status} (see {})", out.display());
        }
        let json_path = out.join("mutants.out/outcomes.json");
        let json = std::fs::read_to_string(&json_path)
            .with_context(|| format!("reading {}", json_path.display()))?;
        stats.extend(tally(&json, files)?);
    }
    print!("{}", table(&stats));
    let low = below(&stats, min);
    for f in &low {
        eprintln!("error: mutants: {f}: under {min}% of viable mutants caught");
    }
    Ok(low.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape cargo-mutants 27 writes, trimmed to a few scenarios.
    const OUTCOMES: &str = r#"{
      "outcomes": [
        {"scenario": "Baseline", "summary": "Success", "log_path": "log/baseline.log",
         "diff_path": null, "phase_results": []},
        {"scenario": {"Mutant": {"name": "a.rs:1:1: replace f -> u64 with 0", "package": "p",
          "file": "a.rs", "function": null, "span": null, "replacement": "0",
          "genre": "FnValue"}}, "summary": "CaughtMutant", "phase_results": []},
        {"scenario": {"Mutant": {"name": "a.rs:2:1: replace + with -", "package": "p",
          "file": "a.rs"}}, "summary": "MissedMutant"},
        {"scenario": {"Mutant": {"name": "a.rs:3:1: x", "package": "p", "file": "a.rs"}},
         "summary": "Timeout"},
        {"scenario": {"Mutant": {"name": "a.rs:4:1: y", "package": "p", "file": "a.rs"}},
         "summary": "Unviable"},
        {"scenario": {"Mutant": {"name": "a.rs:5:1: z", "package": "p", "file": "a.rs"}},
         "summary": "CaughtMutant"},
        {"scenario": {"Mutant": {"name": "b.rs:1:1: w", "package": "p", "file": "b.rs"}},
         "summary": "Unviable"},
        {"scenario": {"Mutant": {"name": "c.rs:1:1: v", "package": "p", "file": "c.rs"}},
         "summary": "MissedMutant"}
      ],
      "total_mutants": 7, "missed": 2, "caught": 2, "timeout": 1, "unviable": 2, "success": 0
    }"#;

    fn files(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn tally_counts_per_file() {
        let stats = tally(OUTCOMES, &files(&["a.rs", "b.rs", "d.rs"])).unwrap();
        let a = &stats["a.rs"];
        assert_eq!(
            (a.mutants, a.caught, a.missed, a.timeouts, a.unviable, a.viable()),
            (5, 2, 1, 1, 1, 4)
        );
        assert_eq!(a.missed_names, ["a.rs:2:1: replace + with -"]);
        assert_eq!(a.caught_pct(), Some(50.0));
        assert_eq!(stats["b.rs"].caught_pct(), None, "nothing viable");
        assert_eq!(stats["d.rs"], FileStats::default(), "asked for, no mutants");
        assert!(!stats.contains_key("c.rs"), "not asked for");
    }

    #[test]
    fn threshold_and_table() {
        let stats = tally(OUTCOMES, &files(&["a.rs", "b.rs"])).unwrap();
        assert_eq!(below(&stats, 90.0), ["a.rs"]);
        assert_eq!(below(&stats, 50.0), Vec::<&str>::new());
        let t = table(&stats);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            words(lines[0]),
            ["file", "mutants", "caught", "missed", "timeouts", "unviable", "caught", "%"]
        );
        assert_eq!(words(lines[1]), ["a.rs", "5", "2", "1", "1", "1", "50.0"]);
        assert_eq!(words(lines[2]), ["b.rs", "1", "0", "0", "0", "1", "-"]);
        assert_eq!(lines[3], "missed: a.rs:2:1: replace + with -");
    }

    #[test]
    fn a_failed_baseline_or_bad_json_is_an_error() {
        let failed = OUTCOMES.replacen(r#""summary": "Success""#, r#""summary": "Failure""#, 1);
        assert!(tally(&failed, &files(&["a.rs"])).is_err());
        assert!(tally("{}", &files(&["a.rs"])).is_err());
        assert!(tally("not json", &files(&["a.rs"])).is_err());
    }

    #[test]
    fn files_map_to_their_packages() {
        let root = crate::workspace_root();
        for (f, p) in [
            ("vmcall-proto/src/channel.rs", "vmcall-proto"),
            ("hypervisor/src/ept.rs", "hypervisor"),
            ("scripts/xtask/src/mutants.rs", "xtask"),
        ] {
            assert_eq!(package_of(&root, f).unwrap(), p);
        }
        assert!(package_of(&root, "vmcall-proto/src/nope.rs").is_err());
        assert!(package_of(&root, "README.md").is_err(), "the root manifest has no package");
        for f in DEFAULT_FILES {
            assert!(root.join(f).is_file(), "{f}");
        }
    }
}
