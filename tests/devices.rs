// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of device assignment (`vmcall-proto/src/device.rs` has the rules):
//! PCI functions given to guests in the config, their configuration space filtered, their
//! BARs and interrupts delivered to the owner alone, frames through the emulator's user-mode
//! network; and the attacks on all of it (`configs/hostile/pci*.toml`). Assertions are on
//! the report and on what each guest printed, never on timing.

use std::sync::OnceLock;
use systests::{boot_config, Boot};
use xtask::cli::Emulator;

fn boot(cell: &'static OnceLock<Boot>, config: &str) -> &'static Boot {
    cell.get_or_init(|| boot_config(Emulator::Bochs, None, None, "", Some(config)))
}

/// Two guests each own a card (e1000 with DMA, NE2000 by port I/O), a third owns none.
fn nics() -> &'static Boot {
    static B: OnceLock<Boot> = OnceLock::new();
    boot(&B, "configs/nic.toml")
}

fn said(b: &Boot, guest: &str, core: u32, text: &str) -> bool {
    let tag = format!("[{guest}@c{core}] ");
    b.serial.lines().any(|l| l.starts_with(&tag) && l.contains(text))
}

fn exits(b: &Boot, guest: &str, kind: &str) -> u32 {
    b.guest(guest).exits.get(kind).copied().unwrap_or(0)
}

#[test]
fn each_guest_sees_and_drives_only_its_own_card() {
    let b = nics();
    let r = &b.report;
    assert_eq!(r.outcome, "ok", "{:?}", r.problems);
    for (g, core, model, bdf) in [("intel", 0, "e1000", "00:02.0"), ("realtek", 1, "ne2k", "00:03.0")]
    {
        let s = b.guest(g);
        assert_eq!((s.state.as_str(), s.exit_status), ("exited", 0), "{g}: {s:?}");
        // Configuration space shows exactly its own function on bus 0.
        assert!(said(b, g, core, &format!("bus 0, function 0 of devices 0-31: {bdf} ")), "{g}");
        assert!(said(b, g, core, "isolation: I see exactly my 1 function(s)"), "{g}");
        // Frames out and back through slirp: the gateway's ARP answer and echo replies.
        assert!(said(b, g, core, &format!("{model}: ARP: 10.0.2.2 is at 52:55:0a:00:02:02")), "{g}");
        assert!(said(b, g, core, &format!("{model}: echo reply from 10.0.2.2 seq 3")), "{g}");
        // Its interrupts arrived through its own IDT, none on a vector it does not own.
        let done = b
            .serial
            .lines()
            .find(|l| l.starts_with(&format!("[{g}@c{core}] nic: done: {model} {bdf}: ")))
            .unwrap_or_else(|| panic!("{g}: no done line"));
        let taken: u64 = done.split(": ").nth(2).and_then(|w| w.split(' ').next()?.parse().ok()).unwrap();
        assert!(taken >= 1, "{done}");
        assert!(done.contains("0 unclaimed; exit 0"), "{done}");
        // Registers cost no exit: memory BARs are mapped, I/O BARs open in the bitmap. The
        // only port exits are configuration-space accesses (the bus-0 scan: 64 of them and
        // a few more to enable the card); no EPT violation, no interrupt exit.
        assert!(exits(b, g, "io") <= 128, "{g}: {:?}", s.exits);
        assert_eq!(exits(b, g, "ept_violation") + exits(b, g, "external_interrupt"), 0, "{g}");
    }
    // The guest without a device has no PCI at all.
    assert!(said(b, "nodev", 2, "configuration ports raise vector 13 (#GP): no PCI at all"));
    assert_eq!(b.guest("nodev").exit_status, 0);
    // The report lists every function found and who owns which.
    let dev = |bdf: &str| r.devices.iter().find(|d| d.bdf == bdf).unwrap_or_else(|| panic!("{bdf}: {:?}", r.devices));
    let e1000 = dev("00:02.0");
    assert_eq!((e1000.id.as_str(), e1000.owner.as_deref(), e1000.dma.as_deref()), ("8086:100e", Some("intel"), Some("unconfined")));
    assert_eq!(e1000.vector, Some(0x50));
    assert!(e1000.owner_bars.as_deref().unwrap().starts_with("0:mem32:40000000->"), "{e1000:?}");
    let ne2k = dev("00:03.0");
    assert_eq!((ne2k.id.as_str(), ne2k.owner.as_deref(), ne2k.dma.as_deref()), ("10ec:8029", Some("realtek"), Some("off")));
    let host = dev("00:00.0");
    assert_eq!((host.class.as_str(), host.owner.as_deref()), ("060000", None));
    assert_eq!(r.devices.iter().filter(|d| d.owner.is_some()).count(), 2);
    systests::assert_matches_schema(r);
}

/// The attacker owns the NE2000 and attacks every other function; the victim owns the e1000.
fn attacks() -> &'static Boot {
    static B: OnceLock<Boot> = OnceLock::new();
    boot(&B, "configs/hostile/pci.toml")
}

#[test]
fn configuration_space_attacks_are_refused_and_the_owner_is_unharmed() {
    let b = attacks();
    // Written out here, independently of the attacker's own table.
    let expected = [
        ("read-other", 3),
        ("write-other", 3),
        ("move-own-bar", 4),
        ("size-own-bar", 1),
        ("own-bus-master", 1),
        ("hidden-registers", 1),
        ("reset-control", 1),
        ("narrow-address", 1),
    ];
    for (name, n) in expected {
        let good = b
            .serial
            .lines()
            .filter(|l| l.starts_with(&format!("[attacker@c1] pciattack {name}: ")) && l.ends_with(" as expected"))
            .count();
        assert_eq!(good, n, "{name}");
    }
    assert!(!b.serial.contains("UNEXPECTED"));
    assert!(said(b, "attacker", 1, "pciattacks done: 15 run, 15 as expected"));
    // Its last attack reads the device window, where only the victim's BAR is: stopped.
    let a = b.guest("attacker");
    assert_eq!(a.state, "stopped");
    let fault = a.fault.as_deref().unwrap_or("");
    assert!(fault.contains("EPT violation: read at guest-physical 0x40000000"), "{fault}");
    // The victim's card was never moved or stopped: its traffic completed.
    let v = b.guest("victim");
    assert_eq!((v.state.as_str(), v.exit_status), ("exited", 0), "{v:?}");
    assert!(said(b, "victim", 0, "bench nic-ping e1000: 5 echo replies"));
    assert_eq!(b.guest("bystander").exit_status, 0);
}

/// An interrupt storm on the stormer's own line, and a device whose line is taken.
fn storm() -> &'static Boot {
    static B: OnceLock<Boot> = OnceLock::new();
    boot(&B, "configs/hostile/pci-stop.toml")
}

#[test]
fn an_interrupt_storm_costs_only_its_owner_and_shared_lines_are_refused() {
    let b = storm();
    let s = b.guest("stormer");
    // The line stayed up after each EOI and the interrupt came back: its own core only.
    assert!(said(b, "stormer", 1, "pciattack storm: 8 interrupts with the cause left set"));
    assert_eq!(s.state, "stopped", "{s:?}");
    assert!(s.fault.as_deref().unwrap_or("").contains("exceeded its run budget"), "{s:?}");
    // Its hypervisor instance kept serving: it took the other cores' NMI kicks and its
    // preemption timer while the storm went on.
    assert!(exits(b, "stormer", "preemption_timer") >= 1 && exits(b, "stormer", "exception_nmi") >= 1);
    let v = b.guest("victim");
    assert_eq!((v.state.as_str(), v.exit_status), ("exited", 0), "{v:?}");
    assert!(said(b, "victim", 0, "bench nic-ping e1000: 20 echo replies"));
    // 00:04.0's line is the victim's (the firmware routed both to 9): not started.
    let sharer = b.guest("sharer");
    assert_eq!(sharer.state, "not_started");
    assert!(sharer.fault.as_deref().unwrap_or("").contains("shares its interrupt line"), "{sharer:?}");
    assert_eq!(b.guest("bystander").exit_status, 0);
    assert_eq!(b.report.outcome, "failed", "a guest was not started");
}
