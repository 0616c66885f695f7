// SPDX-License-Identifier: MIT OR Apache-2.0
//! Hostile guests against the capability system (guestkernel/src/workloads/capattack.rs): each
//! class of break found before gets its attack, its defined outcome, and bystanders that
//! finish intact.

use systests::boot_config;
use xtask::cli::Emulator;
use xtask::report::GuestReport;

fn guest<'a>(b: &'a systests::Boot, name: &str) -> &'a GuestReport {
    b.guest(name)
}

/// Under QEMU the run budget is host time too: a minute, unless `cmdline` sets one (on a
/// loaded 2-core host a TCG guest may run many times slower than alone).
fn qemu_budget(cmdline: &str) -> &'static str {
    if cmdline.contains("budget_ms") {
        ""
    } else {
        " budget_ms=60000"
    }
}

/// Boots `config` with `cmdline`. Under QEMU (AMD SVM, TCG: the TSC is host time and a
/// loaded host starves vCPUs) the deadlines are host time too: the capability protocol's
/// is 5 s (a starved but live core must not be fenced; `cmdline` may set its own), and
/// the failure detector's period 1 s.
fn boot(e: Emulator, cmdline: &str, config: &str) -> systests::Boot {
    let cmdline = match e {
        Emulator::Qemu if cmdline.contains("caps_deadline_ms") => {
            format!("{cmdline} probe_ms=1000{}", qemu_budget(cmdline))
        }
        Emulator::Qemu => {
            format!("{cmdline} caps_deadline_ms=5000 probe_ms=1000{}", qemu_budget(cmdline))
        }
        _ => cmdline.to_string(),
    };
    boot_config(e, None, None, cmdline.trim(), Some(config))
}

fn said(b: &systests::Boot, who: &str, what: &str) -> bool {
    b.serial.lines().any(|l| l.starts_with(&format!("[{who}@")) && l.contains(what))
}

/// No guest reported a check that failed (guest lines are `[name@cN] ...`).
fn assert_no_errors(b: &systests::Boot) {
    let bad: Vec<&str> = b
        .serial
        .lines()
        .filter(|l| l.split(']').next().is_some_and(|t| t.contains('@')) && l.contains("ERROR"))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn revoke_reaches_split_pieces_and_copies_of_copies() {
    revoke_reaches_split_pieces_and_copies_of_copies_(Emulator::Bochs);
}

#[test]
fn revoke_reaches_split_pieces_and_copies_of_copies_on_qemu_svm() {
    revoke_reaches_split_pieces_and_copies_of_copies_(Emulator::Qemu);
}

fn revoke_reaches_split_pieces_and_copies_of_copies_(e: Emulator) {
    let b = boot(e, "", "configs/hostile/caps-derivation.toml");
    assert_no_errors(&b);
    let owner = guest(&b, "owner");
    assert_eq!((owner.state.as_str(), owner.exit_status), ("exited", 0), "{owner:?}");
    assert!(said(&b, "owner", "revoke split pieces and copies of copies: Ok(3) as expected"));
    assert!(said(&b, "owner", "my own mapping after the revoke: Ok(6210279) as expected"));
    assert!(said(&b, "passer", "move a copy on: Err(Ok(NotOwner)) as expected"));
    assert!(said(&b, "passer", "copy with more rights than mine: Err(Ok(RightsEscalation))"));
    assert!(said(&b, "passer", "identify my revoked copy: Err(Ok(Revoked)) as expected"));
    assert!(said(&b, "splitter", "identify a revoked piece: Err(Ok(Revoked)) as expected"));
    let passer = guest(&b, "passer");
    assert_eq!((passer.state.as_str(), passer.exit_status), ("exited", 0), "{passer:?}");
    // The split piece and the copy of a copy: reading them after the revoke is stopped at
    // exactly the address where they were mapped.
    for (who, gpa) in [("splitter", 0xc080_0000u64), ("far", 0xc000_0000)] {
        let g = guest(&b, who);
        assert_eq!(g.state, "stopped", "{g:?}");
        let f = g.fault.as_deref().unwrap_or_default();
        assert!(
            f.starts_with(&format!("EPT violation: read at guest-physical {gpa:#x}")),
            "{who}: {f}"
        );
    }
    // The owner's core sent the revokes; the holders' cores each got theirs.
    assert!(guest(&b, "splitter").requests_from.get("0").is_some_and(|n| *n >= 2));
    assert!(guest(&b, "far").requests_from.get("2").is_some_and(|n| *n >= 2));
}

#[test]
fn a_flood_of_unwanted_copies_costs_the_target_nothing() {
    a_flood_of_unwanted_copies_costs_the_target_nothing_(Emulator::Bochs);
}

#[test]
fn a_flood_of_unwanted_copies_costs_the_target_nothing_on_qemu_svm() {
    a_flood_of_unwanted_copies_costs_the_target_nothing_(Emulator::Qemu);
}

fn a_flood_of_unwanted_copies_costs_the_target_nothing_(e: Emulator) {
    let b = boot(e, "", "configs/hostile/caps-flood.toml");
    assert_no_errors(&b);
    for who in ["flooder", "quiet"] {
        let g = guest(&b, who);
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}");
    }
    assert!(said(&b, "flooder", "copies at a guest that accepted none: refused: Ok(1000)"));
    assert!(said(&b, "quiet", "split my grant after the flood: Ok(16) as expected"));
    assert!(said(&b, "quiet", "split again into the revoked slots: Ok(40) as expected"));
    assert!(said(&b, "flooder", "take them all back: Ok(16) as expected"));
    let quiet = guest(&b, "quiet");
    assert!(quiet.cap_refused >= 1000, "{quiet:?}");
    // The time its core spent refusing was not charged to it.
    assert!(quiet.foreign_tsc > 0, "{quiet:?}");
}

#[test]
fn a_core_that_stops_answering_is_fenced_and_the_run_finishes() {
    a_core_that_stops_answering_is_fenced_and_the_run_finishes_(Emulator::Bochs);
}

#[test]
fn a_core_that_stops_answering_is_fenced_and_the_run_finishes_on_qemu_svm() {
    a_core_that_stops_answering_is_fenced_and_the_run_finishes_(Emulator::Qemu);
}

fn a_core_that_stops_answering_is_fenced_and_the_run_finishes_(e: Emulator) {
    // The silent core's deadline: 20 ms on Bochs; under QEMU 2 s of host time, so that
    // only the silent core misses it.
    let deadline = if e == Emulator::Qemu { 2_000 } else { 20 };
    let cmdline = format!("inject=deaf-core:1 caps_deadline_ms={deadline}");
    let b = boot(e, &cmdline, "configs/hostile/caps-deaf.toml");
    assert_no_errors(&b);
    assert!(b
        .serial
        .contains("[c0] ERROR core 1 did not answer the capability protocol in time: fenced"));
    assert!(said(&b, "owner", "revoke while one holder's core is silent: Err(Ok(Timeout))"));
    assert!(said(&b, "owner", "copy to a fenced core: Err(Ok(PeerGone)) as expected"));
    let owner = guest(&b, "owner");
    assert_eq!((owner.state.as_str(), owner.exit_status), ("exited", 0), "{owner:?}");
    assert_eq!(owner.fenced, [1], "{owner:?}");
    // The answering branch was revoked all the same.
    assert!(said(&b, "passer", "identify my revoked copy: Err(Ok(Revoked)) as expected"));
    let far = guest(&b, "far");
    assert_eq!(far.state, "stopped", "{far:?}");
    // Every guest has its record: the run did not hang on the silent core.
    assert_eq!(b.report.guests.len(), 4);
    for who in ["splitter", "passer"] {
        let g = guest(&b, who);
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}");
    }
}
