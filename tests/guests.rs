// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of the guests layer: one guest kernel per core, each in its own EPT
//! partition, described by a config. Assertions are on the report and on what each guest
//! printed through the hypervisor's console, never on timing.

use systests::{boot_config, Boot};
use xtask::cli::Emulator;
use xtask::report::GuestReport;

fn guest<'a>(b: &'a Boot, name: &str) -> &'a GuestReport {
    b.guest(name)
}

/// What a `hello` guest must have printed: its identity, the checks, the right sum.
fn assert_hello(b: &Boot, name: &str, id: u32, core: u32, n: u64) {
    let g = guest(b, name);
    assert_eq!((g.state.as_str(), g.exit_status, g.core), ("exited", 0, core), "{g:?}");
    let tag = format!("[{name}@c{core}] ");
    let said = |s: &str| b.serial.contains(&format!("{tag}{s}"));
    assert!(
        said(&format!("hello from {name} (guest {id}) on core {core}: 16 MiB")),
        "{name} identity"
    );
    assert!(said("cpuid: signature \"mkvisor\", VMX hidden"));
    assert!(said("bad hypercalls refused: unknown number true, buffer past my memory true"));
    assert!(said(&format!("result: sum(1..={n}) = {} (closed form", n * (n + 1) / 2)));
    // Exit-free telemetry agrees with the exit_count hypercall (which counts its own exit).
    let line = b.serial.lines().find(|l| l.starts_with(&format!("{tag}telemetry: "))).unwrap();
    let nums: Vec<u64> =
        line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    let (page, entries, counted) =
        (nums[nums.len() - 4], nums[nums.len() - 2], nums[nums.len() - 1]);
    assert_eq!((counted, entries), (page + 1, page + 1), "{line}");
    assert!(page >= 6, "{line}");
    assert!(g.exits.get("vmcall").copied().unwrap_or(0) >= 5, "{:?}", g.exits);
    assert_eq!(g.exits.get("cpuid"), Some(&2), "the two CPUID probes of hello");
    assert!(g.fault.is_none());
}

#[test]
fn default_config_four_guests_on_four_cores() {
    default_config(Emulator::Bochs);
}

/// The same guests on AMD SVM under QEMU's TCG (issue 24): the same outcome, output and
/// exits per kind, TSC figures in host ticks.
#[test]
fn default_config_four_guests_on_four_cores_on_qemu_svm() {
    let b = default_config(Emulator::Qemu);
    assert!(b.serial.contains("[c0] backend: svm"), "{}", b.serial);
}

/// The failure detector's period under QEMU: its TSC is host time, and a loaded host
/// (CI runs two emulators on two cores) can leave a vCPU unscheduled past the default
/// 8 x 25 ms, which fences a live core (seen once at load 54); 8 x 500 ms is not met.
fn cmdline(emulator: Emulator) -> &'static str {
    match emulator {
        Emulator::Qemu => "probe_ms=500",
        _ => "",
    }
}

fn default_config(emulator: Emulator) -> Boot {
    let b = boot_config(emulator, None, None, cmdline(emulator), Some("configs/default.toml"));
    let r = &b.report;
    assert_eq!(r.outcome, "ok", "{:?}\n{}", r.problems, b.serial);
    assert_eq!(r.guests.len(), 4);
    assert_hello(&b, "alpha", 0, 0, 1000);
    assert_hello(&b, "beta", 1, 1, 2000);
    assert_hello(&b, "gamma", 2, 2, 3000);
    // The spin guest slept on its virtual timer: one HLT exit per tick of its 20 ms budget.
    let delta = guest(&b, "delta");
    assert_eq!((delta.state.as_str(), delta.exit_status), ("exited", 0));
    assert_eq!(delta.exits.get("hlt"), Some(&20), "{:?}", delta.exits);
    assert!(b.serial.contains("[delta@c3] spin: 20 ticks,"));
    // Distinct partitions: every guest started, each one's first entry after boot.
    assert!(r.tsc.to_all_guests_running.is_some());
    // The hypervisor's boot ends when its cores are up: before the BSP's own guest entered,
    // so no guest time is in it.
    let (entry, boot) = (r.tsc.hypervisor_entry.unwrap(), r.tsc.hypervisor_boot.unwrap());
    assert!(entry + boot <= guest(&b, "alpha").tsc_first_entry, "{:?}", r.tsc);
    assert!(entry + boot < r.tsc.end.unwrap());
    let (unit, version) = match emulator {
        Emulator::Qemu => ("tsc_ticks", "QEMU"),
        _ => ("emulated_instructions", "Bochs"),
    };
    assert_eq!(r.tsc_unit, unit);
    // The report says where it comes from, and has the layout its schema describes.
    assert_eq!(r.schema_version, xtask::report::SCHEMA_VERSION);
    let config = r.meta.config.as_ref().expect("config metadata");
    assert!(config.contents.contains("[[guest]]") && config.sha256.len() == 64);
    assert!(
        r.meta.emulator_version.as_deref().is_some_and(|v| v.contains(version)),
        "{:?}",
        r.meta
    );
    systests::assert_matches_schema(r);
    // Exit traces are off by default: no records, no totals, no CSV.
    assert!(!b.serial.contains("#mkv trace"));
    assert!(r.guests.iter().all(|g| g.trace.is_none()) && r.trace_csv.is_none());
    // No stray exits: the legacy PIC is masked and nothing else interrupts a guest (on SVM
    // the run timer's interrupt before its deadline would count here: it is disarmed after
    // every exit).
    assert!(r.guests.iter().all(|g| !g.exits.contains_key("external_interrupt")), "{:?}", r.guests);
    b
}

#[test]
fn a_faulting_guest_is_stopped_and_the_others_finish() {
    a_faulting_guest(Emulator::Bochs);
}

/// On SVM the nested page fault is reported as the VT-x EPT violation is.
#[test]
fn a_faulting_guest_is_stopped_and_the_others_finish_on_qemu_svm() {
    a_faulting_guest(Emulator::Qemu);
}

fn a_faulting_guest(emulator: Emulator) {
    let b = boot_config(emulator, None, None, cmdline(emulator), Some("configs/fault.toml"));
    let r = &b.report;
    assert_eq!(r.outcome, "failed", "a stopped guest makes the run not ok");
    assert!(r.problems.iter().all(|p| p.contains("mallory")), "{:?}", r.problems);
    let m = guest(&b, "mallory");
    assert_eq!(m.state, "stopped");
    assert_eq!(m.exits.get("ept_violation"), Some(&1));
    // 8 MiB partition; the guest reads 2 MiB past its end.
    let fault = m.fault.as_deref().unwrap_or_default();
    assert!(fault.starts_with("EPT violation: read at guest-physical 0xa00000"), "{fault}");
    assert!(b.serial.contains("[mallory@c1] fault: reading guest-physical 0xa00000"));
    assert!(!b.serial.contains("[mallory@c1] ERROR fault: the read returned"));
    assert_hello(&b, "alpha", 0, 0, 1000);
    assert_hello(&b, "gamma", 2, 2, 3000);
    assert_eq!(guest(&b, "delta").exit_status, 0);
}

#[test]
fn a_guest_on_a_missing_core_is_reported_and_skipped() {
    // The default config wants 4 cores; the machine has 2, and the user asked to boot anyway.
    let b = systests::boot_args(xtask::cli::RunArgs {
        cpus: Some(2),
        allow_missing_cores: true,
        ..xtask::cli::RunArgs::quiet(Emulator::Bochs, Some("configs/default.toml"))
    });
    let r = &b.report;
    assert_eq!(r.outcome, "failed");
    assert_hello(&b, "alpha", 0, 0, 1000);
    assert_hello(&b, "beta", 1, 1, 2000);
    for name in ["gamma", "delta"] {
        let g = guest(&b, name);
        assert_eq!(g.state, "not_started");
        assert_eq!(g.fault.as_deref(), Some("its core does not exist on this machine"));
    }
}

#[test]
fn a_malformed_config_is_rejected_before_any_boot() {
    let args =
        xtask::cli::RunArgs::quiet(Emulator::Bochs, Some("configs/bad-two-guests-one-core.toml"));
    let err = xtask::run::run(&args).expect_err("a bad config must not boot").to_string();
    assert!(
        err.contains(
            "bad-two-guests-one-core.toml:14:8: guest[1].core: core 1 already runs guest `one`"
        ),
        "{err}"
    );
    assert!(err.contains(":16:12: guest[1].workload: unknown workload `hullo`"), "{err}");
}

#[test]
fn two_core_config_with_a_large_partition() {
    large_partition(Emulator::Bochs);
}

#[test]
fn two_core_config_with_a_large_partition_on_qemu_svm() {
    large_partition(Emulator::Qemu);
}

fn large_partition(emulator: Emulator) {
    let b = boot_config(emulator, None, None, cmdline(emulator), Some("configs/pair.toml"));
    assert_eq!(b.report.outcome, "ok", "{:?}", b.report.problems);
    let big = guest(&b, "big");
    assert_eq!((big.state.as_str(), big.exit_status), ("exited", 0));
    assert!(b.serial.contains("[big@c0] hello from big (guest 0) on core 0: 64 MiB"));
    assert!(b.serial.contains("[big@c0] result: sum(1..=100000) = 5000050000"));
    assert_eq!(guest(&b, "small").exit_status, 0);
}
