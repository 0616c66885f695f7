// SPDX-License-Identifier: MIT OR Apache-2.0
//! Helpers for the whole-system tests: boot the real ISO in an emulator through the same
//! code path as `cargo xtask run`, and hand back the report and the serial log.

use xtask::cli::{Emulator, RunArgs};
use xtask::report::Report;

/// Builds the `cargo xtask` binary as `cargo xtask` does (release) and returns its path.
pub fn xtask_binary() -> std::path::PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let ok = std::process::Command::new(cargo)
        .args(["build", "--quiet", "--release", "--package", "xtask"])
        .current_dir(xtask::workspace_root())
        .status()
        .expect("cargo build")
        .success();
    assert!(ok, "building xtask failed");
    xtask::target_dir().join("release/xtask")
}

/// A finished boot: the report and the serial console text.
pub struct Boot {
    pub report: Report,
    pub serial: String,
}

impl Boot {
    /// The report of guest `name` (the test fails if there is none).
    pub fn guest(&self, name: &str) -> &xtask::report::GuestReport {
        self.report
            .guests
            .iter()
            .find(|g| g.name == name)
            .unwrap_or_else(|| panic!("no guest {name}: {:?}", self.report.guests))
    }
}

/// Boots with `cpus` emulated CPUs and the given hypervisor command line.
pub fn boot(emulator: Emulator, cpus: u32, model: Option<&str>, cmdline: &str) -> Boot {
    boot_config(emulator, Some(cpus), model, cmdline, None)
}

/// Boots `config` (a path under configs/), or no config (cores only) when `None`.
pub fn boot_config(
    emulator: Emulator,
    cpus: Option<u32>,
    model: Option<&str>,
    cmdline: &str,
    config: Option<&str>,
) -> Boot {
    let args = RunArgs {
        cpus,
        cpu_model: model.map(str::to_string),
        cmdline: cmdline.to_string(),
        ..RunArgs::quiet(emulator, config)
    };
    boot_args(args)
}

/// Boots with exactly these arguments.
pub fn boot_args(args: RunArgs) -> Boot {
    let report = xtask::run::run(&args).expect("the run could not be attempted");
    let serial = std::fs::read_to_string(&report.serial_log).expect("serial log");
    eprintln!("{}", xtask::run::summary(&report));
    Boot { report, serial }
}

/// Asserts that `report`, as JSON, is valid against the schema in the repository
/// (`schemas/report.schema.json`).
pub fn assert_matches_schema(report: &Report) {
    let path = xtask::workspace_root().join(xtask::schema::REPORT_SCHEMA);
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the report schema"))
            .expect("the schema is JSON");
    let json = serde_json::to_value(report).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("a valid JSON Schema");
    let errors: Vec<String> =
        validator.iter_errors(&json).map(|e| format!("{e} at {}", e.instance_path)).collect();
    assert!(errors.is_empty(), "the report does not match {}: {errors:#?}", path.display());
}

impl Boot {
    /// Asserts the run ended by itself with `ok` and every one of `n` cores in VMX operation.
    pub fn assert_all_cores_vmx_on(&self, n: usize) {
        let r = &self.report;
        assert_eq!(r.outcome, "ok", "problems: {:?}\n{}", r.problems, self.serial);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.cores.len(), n, "{:?}", r.cores);
        let mut apic_ids: Vec<u32> = r.cores.iter().map(|c| c.apic_id).collect();
        apic_ids.sort_unstable();
        apic_ids.dedup();
        assert_eq!(apic_ids.len(), n, "APIC ids must be distinct: {:?}", r.cores);
        for (i, c) in r.cores.iter().enumerate() {
            assert_eq!(c.index as usize, i);
            assert_eq!((c.state.as_str(), c.vmx.as_str()), ("up", "on"), "core {i}: {c:?}");
            assert_eq!(c.backend.as_deref(), Some("vmx"), "core {i}: {c:?}");
            // Each core says so itself, on its own log prefix.
            let own_line = format!("[c{i}] VMX root operation on");
            assert!(self.serial.contains(&own_line), "no `{own_line}` in the serial log");
        }
        assert!(r.tsc.hypervisor_boot.is_some_and(|t| t > 0));
    }
}
