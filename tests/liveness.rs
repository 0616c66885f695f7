// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of liveness: no legal operation keeps a core from its inbox long
//! enough for the failure detector to take it for dead (README "Core membership": the bound
//! on every stretch away from the inbox, and the detector's timeout above it).

use systests::{boot_config, Boot};
use xtask::cli::Emulator;

/// The hypervisor's TSC ticks per millisecond, from its log.
fn ticks_per_ms(b: &Boot) -> u64 {
    b.serial
        .lines()
        .find_map(|l| l.split("TSC: ").nth(1)?.strip_suffix(" ticks/ms")?.parse().ok())
        .expect("the TSC rate line")
}

/// `mapper` maps its 1000 MiB grant in 4-KiB pages (256,000 EPT entries) twice with the
/// failure detector at its shortest period, 12 ms (fenced after 96 ms of silence): its core
/// serves the inbox between steps of each mapping and unmapping, so no core is suspected,
/// both guests finish, and the longest stretch any core spent away from its inbox
/// (`away_tsc`, console lines included) stays below the detector's timeout. On a hypervisor
/// that maps the whole cap in one stretch (about a million instructions, 250 ms in Bochs)
/// the mapping core is fenced during the first map.
#[test]
fn mapping_a_large_grant_in_small_pages_keeps_its_core_alive() {
    let b = boot_config(Emulator::Bochs, None, None, "", Some("configs/bigmap.toml"));
    let r = &b.report;
    assert!(r.suspicions.is_empty(), "a live core was suspected: {:?}\n{}", r.suspicions, b.serial);
    assert!(r.views.is_empty(), "the view changed: {:?}", r.views);
    assert_eq!(r.outcome, "ok", "{:?}\n{}", r.problems, b.serial);
    for name in ["spin", "mapper"] {
        let g = b.guest(name);
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}");
    }
    let rounds = b.serial.lines().filter(|l| l.contains("bigmap: round")).count();
    assert_eq!(rounds, 2, "{}", b.serial);
    // The detector's timeout: 8 periods of 12 ms. Every core stayed inside it.
    let timeout = 8 * 12 * ticks_per_ms(&b);
    for g in &r.guests {
        eprintln!("{}: longest stretch away from the inbox {} ticks", g.name, g.away_tsc);
        assert!(g.away_tsc > 0, "{}: no stretch measured", g.name);
        assert!(g.away_tsc < timeout, "{}: away {} ticks, timeout {timeout}", g.name, g.away_tsc);
    }
}

/// No message is lost while a guest is set up: `quick` exits while its channel peer
/// `late`'s core is still zeroing a 512 MiB partition (serving its inbox between chunks).
/// That core already knows the channel (it registers its guest's capabilities and channels
/// before it first serves the inbox), so `quick`'s `LINK_DOWN` is acknowledged at once (no
/// "did not acknowledge in time" after the 4 s deadline) and `late` starts with its peer
/// shown gone. On a hypervisor that adds the channels after zeroing, the message is consumed
/// without an ack and `late` waits for an echo that never comes.
#[test]
fn a_peer_that_dies_during_its_partners_setup_is_acknowledged_and_seen_gone() {
    a_peer_that_dies_during_its_partners_setup_(Emulator::Bochs, "");
}

/// The same on QEMU/SVM (the failure detector at 500 ms: host time under TCG).
#[test]
fn a_peer_that_dies_during_its_partners_setup_is_acknowledged_and_seen_gone_on_qemu_svm() {
    a_peer_that_dies_during_its_partners_setup_(Emulator::Qemu, "probe_ms=500");
}

fn a_peer_that_dies_during_its_partners_setup_(e: Emulator, cmdline: &str) {
    let b = boot_config(e, None, None, cmdline, Some("configs/setup-race.toml"));
    let r = &b.report;
    assert!(!b.serial.contains("did not acknowledge in time"), "{}", b.serial);
    let quick = b.guest("quick");
    assert_eq!((quick.state.as_str(), quick.exit_status), ("exited", 0), "{quick:?}");
    let late = b.guest("late");
    assert_eq!((late.state.as_str(), late.exit_status), ("exited", 0), "{late:?}\n{}", b.serial);
    assert!(b.serial.contains("stream: peer gone for good: sent 1 of 10"), "{}", b.serial);
    // `quick` died before `late` was first entered (the race this test is about).
    let died = quick.incarnations[0].tsc_end;
    let entered = late.tsc_first_entry;
    assert!(died < entered, "quick ended at {died}, late entered at {entered}");
    assert_eq!(r.outcome, "ok", "{:?}", r.problems);
}

/// `owner` revokes a 1000 MiB copy that `holder` mapped in 4-KiB pages, with the failure
/// detector at 12 ms: the holder's core unmaps it on the owner's request a step at a time,
/// serving its inbox between, so no core is suspected and the revoke takes the copy (`Ok(1)`).
#[test]
fn revoking_a_large_copy_mapped_in_small_pages_keeps_the_holders_core_alive() {
    let b = boot_config(Emulator::Bochs, None, None, "", Some("configs/bigrevoke.toml"));
    let r = &b.report;
    assert!(r.suspicions.is_empty(), "a live core was suspected: {:?}\n{}", r.suspicions, b.serial);
    assert_eq!(r.outcome, "ok", "{:?}\n{}", r.problems, b.serial);
    for name in ["owner", "holder"] {
        let g = b.guest(name);
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}\n{}", b.serial);
    }
    assert!(b.serial.contains("bigmap: revoke the mapped copy: Ok(1) as expected"), "{}", b.serial);
    let timeout = 8 * 12 * ticks_per_ms(&b);
    for g in &r.guests {
        eprintln!("{}: longest stretch away from the inbox {} ticks", g.name, g.away_tsc);
        assert!(g.away_tsc < timeout, "{}: away {} ticks, timeout {timeout}", g.name, g.away_tsc);
    }
}
