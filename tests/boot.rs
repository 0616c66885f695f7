// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of the boot layer: real ISO, real emulator, assertions on the report
//! and the serial log (never on timing).

use systests::boot;

// These runs carry no config: the platform layer alone (cores and VMX).
use xtask::cli::Emulator;

#[test]
fn bochs_one_cpu_vmx_on() {
    boot(Emulator::Bochs, 1, None, "").assert_all_cores_vmx_on(1);
}

#[test]
fn bochs_two_cpus_vmx_on() {
    let b = boot(Emulator::Bochs, 2, None, "");
    b.assert_all_cores_vmx_on(2);
    // Every core turned its caches on and reset its PAT itself, whatever firmware left.
    for i in 0..2 {
        let line = format!("[c{i}] caches on: CR0.CD=0 NW=0 PAT=0x7040600070406");
        assert!(b.serial.contains(&line), "core {i}: no `{line}`\n{}", b.serial);
    }
}

#[test]
fn bochs_four_cpus_vmx_on() {
    let b = boot(Emulator::Bochs, 4, None, "");
    b.assert_all_cores_vmx_on(4);
    assert_eq!(b.report.cpus_listed, Some(4));
}

#[test]
fn bochs_tigerlake_model_vmx_on() {
    let b = boot(Emulator::Bochs, 2, Some("tigerlake"), "");
    b.assert_all_cores_vmx_on(2);
    assert_eq!(b.report.cpu_model, "tigerlake");
    // The VMCS revision differs between models; the hypervisor reads it, not assumes it.
    assert!(b.serial.contains("VMX: revision 0x4,"), "tigerlake reports VMCS revision 4");
}

#[test]
fn cpus_option_caps_the_cores() {
    let b = boot(Emulator::Bochs, 4, None, "cpus=2");
    b.assert_all_cores_vmx_on(2);
    assert_eq!(b.report.cpus_listed, Some(4));
    assert_eq!(b.report.cores_used, Some(2));
}

#[test]
fn a_silent_core_is_reported_not_waited_for() {
    let b = boot(Emulator::Bochs, 2, None, "inject=silent-ap");
    let r = &b.report;
    assert_eq!(r.outcome, "failed");
    assert_eq!(r.cores.len(), 2);
    assert_eq!((r.cores[0].state.as_str(), r.cores[0].vmx.as_str()), ("up", "on"));
    assert_eq!((r.cores[1].state.as_str(), r.cores[1].vmx.as_str()), ("silent", "off"));
    assert_eq!(r.cores[1].reason.as_deref(), Some("no answer to INIT-SIPI-SIPI"));
}

/// An AP that starts after the BSP gave up on it (`inject=late-ap`: core 1 gets its SIPI
/// only once core 2's trampoline block is open) parks without taking that block: it is
/// reported silent, and core 2 comes up as itself on its own stack. Without the block's
/// claim word core 1 ran as core 2, two cores on one stack.
#[test]
fn a_late_core_does_not_take_the_next_cores_start_up_block() {
    let b = boot(Emulator::Bochs, 3, None, "inject=late-ap");
    let r = &b.report;
    assert_eq!(r.outcome, "failed", "{:?}\n{}", r.problems, b.serial);
    assert_eq!(r.cores.len(), 3);
    assert!(b.serial.contains("inject=late-ap: core 1 gets its STARTUP IPI late"), "{}", b.serial);
    assert_eq!((r.cores[1].state.as_str(), r.cores[1].vmx.as_str()), ("silent", "off"));
    for c in [0, 2] {
        assert_eq!((r.cores[c].state.as_str(), r.cores[c].vmx.as_str()), ("up", "on"), "core {c}");
    }
    assert!(!b.serial.contains("exception"), "{}", b.serial);
    // Sent back to waiting for a SIPI once every AP is started (it parked in the trampoline).
    assert!(b.serial.contains("core 1 (APIC id 1): INIT again, it stays out"), "{}", b.serial);
}

#[test]
fn an_exception_on_an_ap_is_reported_and_contained() {
    let b = boot(Emulator::Bochs, 2, None, "inject=ap-fault");
    let r = &b.report;
    assert_eq!(r.outcome, "failed");
    assert_eq!((r.cores[0].state.as_str(), r.cores[0].vmx.as_str()), ("up", "on"));
    assert_eq!(r.cores[1].state, "failed");
    let reason = r.cores[1].reason.as_deref().unwrap_or_default();
    assert!(reason.starts_with("exception #UD invalid opcode (vector 6) at rip=0x"), "{reason}");
    // The faulting core printed vector, error code, RIP under its own prefix.
    assert!(b.serial.contains("[c1] ERROR hypervisor exception: #UD invalid opcode (vector 6)"));
}

/// Asserts an SVM boot: every core up, SVM on, and its world-switch check passed with the
/// four exits it must take (VMMCALL, CPUID, a nested page fault on its write to 0x3000,
/// HLT), read from the core's own log line. `extra_ok`: an exit more is allowed (under
/// QEMU's TCG a host timer interrupt or a kick may land during the check on a loaded host;
/// Bochs counts exactly).
fn assert_all_cores_svm_checked(b: &systests::Boot, n: usize, extra_ok: bool) {
    let r = &b.report;
    assert_eq!(r.outcome, "ok", "problems: {:?}\n{}", r.problems, b.serial);
    assert_eq!(r.cores.len(), n, "{:?}", r.cores);
    assert!(b.serial.contains("[c0] backend: svm"), "{}", b.serial);
    assert!(!b.serial.contains("backend: vmx"));
    for (i, c) in r.cores.iter().enumerate() {
        assert_eq!((c.state.as_str(), c.vmx.as_str()), ("up", "on"), "core {i}: {c:?}");
        assert_eq!(c.backend.as_deref(), Some("svm"), "core {i}: {c:?}");
        let head = format!("[c{i}] SVM on; world-switch check: ");
        let line = b.serial.lines().find_map(|l| l.strip_prefix(head.as_str()));
        let line = line.unwrap_or_else(|| panic!("no `{head}`\n{}", b.serial));
        let (count, rest) = line.split_once(" exits (").expect("N exits (...)");
        let count: u32 = count.parse().expect("a count of exits");
        assert!(count == 4 || (extra_ok && count > 4), "core {i}: {line}");
        assert!(
            rest.starts_with("VMMCALL rcx=0x53564d22, CPUID, nested page fault at 0x3000 error 0x")
                && rest.contains(", HLT)"),
            "core {i}: {line}"
        );
    }
}

#[test]
fn qemu_tcg_picks_svm_and_every_core_passes_the_world_switch_check() {
    let b = boot(Emulator::Qemu, 4, None, "");
    assert_all_cores_svm_checked(&b, 4, true);
    // TCG's `max` CPU: SVM with nested paging, no nRIP save (next RIPs computed).
    assert!(b.serial.contains("SVM: revision 1, 16 ASIDs, NPT, nRIP save=false"), "{}", b.serial);
    assert_eq!(b.report.tsc_unit, "tsc_ticks");
}

/// Past Bochs's 15 CPUs (docs/svm.md, "Scale under QEMU"): 16 cores under QEMU TCG, every
/// one up with SVM and its check passed, the default config's guests run to their end and the
/// other 12 cores idle (5.3 s of emulated wall time on a loaded 2-core host).
#[test]
fn qemu_tcg_sixteen_cores_run_the_default_config_on_svm() {
    let b = systests::boot_config(Emulator::Qemu, Some(16), None, "", Some("configs/default.toml"));
    assert_all_cores_svm_checked(&b, 16, true);
    assert!(b.serial.contains("[c0] MADT: 16 enabled processors"), "{}", b.serial);
    for (name, core, n) in [("alpha", 0, 1000u64), ("beta", 1, 2000), ("gamma", 2, 3000)] {
        let g = b.guest(name);
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}");
        let line = format!("[{name}@c{core}] result: sum(1..={n}) = {}", n * (n + 1) / 2);
        assert!(b.serial.contains(&line), "{line}\n{}", b.serial);
    }
    assert_eq!(b.guest("delta").exits.get("hlt"), Some(&20), "{:?}", b.guest("delta").exits);
}

#[test]
fn bochs_ryzen_picks_svm_and_passes_the_world_switch_check() {
    let b = boot(Emulator::Bochs, 2, Some("ryzen"), "");
    assert_all_cores_svm_checked(&b, 2, false);
    // Bochs's Ryzen saves nRIP: the processor's next RIP is used there.
    assert!(b.serial.contains("32768 ASIDs, NPT, nRIP save=true"), "{}", b.serial);
}

/// Guests run on SVM under Bochs's Ryzen too (nRIP save there: no decoding), with the same
/// output and exits as on VT-x.
#[test]
fn bochs_ryzen_runs_the_default_config_on_svm() {
    let b = systests::boot_config(
        Emulator::Bochs,
        None,
        Some("ryzen"),
        "",
        Some("configs/default.toml"),
    );
    let r = &b.report;
    assert_eq!(r.outcome, "ok", "{:?}\n{}", r.problems, b.serial);
    assert!(b.serial.contains("[c0] backend: svm"), "{}", b.serial);
    for (name, core, n) in [("alpha", 0, 1000u64), ("beta", 1, 2000), ("gamma", 2, 3000)] {
        let g = b.guest(name);
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}");
        let line = format!("[{name}@c{core}] result: sum(1..={n}) = {}", n * (n + 1) / 2);
        assert!(b.serial.contains(&line), "{line}\n{}", b.serial);
        assert_eq!(g.exits.get("cpuid"), Some(&2), "{:?}", g.exits);
    }
    // The spin guest's 20 timer ticks, each a HLT exit, as on VT-x.
    assert_eq!(b.guest("delta").exits.get("hlt"), Some(&20), "{:?}", b.guest("delta").exits);
}

#[test]
fn bochs_without_long_mode_is_refused_with_the_missing_feature() {
    // A Pentium 4 (Willamette) has no long mode: the 32-bit boot code must say so on the
    // serial port and end the run, not hang until the timeout.
    let b = boot(Emulator::Bochs, 1, Some("p4_willamette"), "");
    let r = &b.report;
    assert_eq!(r.outcome, "refused", "{:?}\n{}", r.problems, b.serial);
    let missing = "long mode (CPUID.80000001H:EDX.LM[bit 29] is 0)";
    assert_eq!(r.missing.as_deref(), Some(missing));
    assert!(b.serial.contains(&format!("mkvisor needs {missing}; this machine lacks it.")));
    assert!(r.cores.is_empty(), "no core may be started when refusing");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}
