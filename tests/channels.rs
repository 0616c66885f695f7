// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of the channels layer: message rings between guests on different
//! cores, doorbells, and guests that misbehave on them. Assertions are on what the guests
//! checked and printed, the report's channel counters and exit counts, never on timing.

use systests::{boot_config, Boot};
use xtask::cli::Emulator;
use xtask::report::GuestReport;

fn guest<'a>(b: &'a Boot, name: &str) -> &'a GuestReport {
    b.guest(name)
}

/// The `key=value` of a guest's `bench` line.
fn bench(b: &Boot, name: &str, key: &str) -> u64 {
    xtask::bench::bench_value(&b.serial, name, key).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn four_guests_relay_ten_thousand_messages_each_around_a_ring() {
    let b = boot_config(Emulator::Bochs, None, None, "", Some("configs/relay.toml"));
    assert_eq!(b.report.outcome, "ok", "{:?}", b.report.problems);
    for (i, name) in ["r0", "r1", "r2", "r3"].iter().enumerate() {
        let g = guest(&b, name);
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}");
        let want = format!(
            "[{name}@c{i}] relay: originated 10000, returned 10000, forwarded 30000; lost 0, duplicated 0, reordered 0, damaged 0;"
        );
        assert!(b.serial.contains(&want), "missing: {want}");
        // Polling relay: the message path takes no VM exit at all.
        assert_eq!(
            g.exits.values().sum::<u64>(),
            g.exits.get("vmcall").copied().unwrap_or(0),
            "{:?}",
            g.exits
        );
    }
    assert_eq!(b.report.channels.len(), 4);
    for c in &b.report.channels {
        assert_eq!((c.a_sent, c.b_received), (40_000, 40_000), "{c:?}");
    }
}

#[test]
fn ping_pong_polls_without_exits_and_doorbells_cost_one_exit_on_the_sender() {
    let b = boot_config(Emulator::Bochs, None, None, "", Some("configs/pingpong.toml"));
    assert_eq!(b.report.outcome, "ok", "{:?}", b.report.problems);
    // Polling mode: zero VM exits on both sides during the 1000 round trips.
    assert_eq!(bench(&b, "ping", "exits"), 0);
    assert_eq!(bench(&b, "pong", "exits"), 0);
    // Doorbell mode: every exit during the exchange is a doorbell hypercall by the sender,
    // and taking a doorbell costs the receiver no exit.
    let (rung_p, rung_q) =
        (bench(&b, "dping", "doorbells_rung"), bench(&b, "dpong", "doorbells_rung"));
    assert!(rung_p + rung_q > 0, "the doorbell pair must actually have slept");
    assert_eq!(bench(&b, "dping", "exits"), rung_p);
    assert_eq!(bench(&b, "dpong", "exits"), rung_q);
    let taken = bench(&b, "dping", "doorbells_taken") + bench(&b, "dpong", "doorbells_taken");
    assert!(taken > 0 && taken <= rung_p + rung_q, "taken {taken}, rung {}", rung_p + rung_q);
    for c in &b.report.channels {
        assert_eq!(
            (c.a_sent, c.b_received, c.b_sent, c.a_received),
            (c.a_sent, c.a_sent, c.a_sent, c.a_sent),
            "{c:?}"
        );
    }
}

/// Issue 24: the same pairs on AMD SVM under QEMU's TCG. Polling takes no exit there
/// either; a doorbell costs the sender its hypercall as on VT-x, and the receiver the
/// virtualization of it (SVM exits on every physical interrupt: the host takes the
/// doorbell and raises it as a virtual interrupt, and the guest's EOI exits): one WRMSR
/// exit per doorbell taken, and at most one interrupt exit per doorbell.
#[test]
fn ping_pong_on_qemu_svm_polls_without_exits_and_doorbells_are_virtualized() {
    let b = boot_config(Emulator::Qemu, None, None, "", Some("configs/pingpong.toml"));
    assert_eq!(b.report.outcome, "ok", "{:?}\n{}", b.report.problems, b.serial);
    assert!(b.serial.contains("[c0] backend: svm"));
    // Polling: the message path takes no exit. Under TCG the exchange lasts long enough in
    // host time for the run timer (its one-shot count is bounded: a few seconds) or a kick
    // to fall in it; those are the only exits it may see.
    for name in ["ping", "pong"] {
        let g = guest(&b, name);
        let timing = ["preemption_timer", "exception_nmi"]
            .iter()
            .map(|k| g.exits.get(*k).copied().unwrap_or(0))
            .sum::<u64>();
        assert!(bench(&b, name, "exits") <= timing, "{name}: {:?}", g.exits);
        assert!(
            g.exits
                .keys()
                .all(|k| ["vmcall", "preemption_timer", "exception_nmi"].contains(&k.as_str())),
            "{name}: {:?}",
            g.exits
        );
    }
    let mut rung_total = 0;
    for name in ["dping", "dpong"] {
        let (rung, taken) = (bench(&b, name, "doorbells_rung"), bench(&b, name, "doorbells_taken"));
        let exits = bench(&b, name, "exits");
        assert!(taken > 0, "{name} took no doorbell");
        // Each rung: its hypercall; each taken: its EOI, at most one interrupt exit (none
        // when it arrived while the core was in the hypervisor anyway) and at most one HLT
        // exit (the sleep it ended: the backend keeps the halted state, docs/svm.md); a
        // kick's or the run timer's exit may fall in the exchange too.
        assert!(
            rung + taken <= exits && exits <= rung + 3 * taken + 2,
            "{name}: exits {exits}, rung {rung}, taken {taken}"
        );
        let g = guest(&b, name);
        assert_eq!(g.exits.get("wrmsr"), Some(&taken), "one EOI per doorbell: {:?}", g.exits);
        rung_total += rung;
    }
    assert!(rung_total > 0);
    for c in &b.report.channels {
        assert_eq!(
            (c.a_sent, c.b_received, c.b_sent, c.a_received),
            (c.a_sent, c.a_sent, c.a_sent, c.a_sent),
            "{c:?}"
        );
    }
}

/// Doorbells on SVM as Bochs's `ryzen` model emulates it: every doorbell reaches the
/// receiver's handler (its EOI exits once per doorbell). Bochs 2.7 leaves a V_IRQ masked
/// after VMRUN until the guest changes its IF itself and never ends a HLT for one, so the
/// handlers took none while the virtual interrupt was offered as V_IRQ only; the backend
/// injects it when the guest can take it at once (docs/svm.md).
#[test]
fn doorbells_reach_the_receivers_handlers_on_bochs_svm() {
    let config = Some("configs/bench-doorbell.toml");
    let b = boot_config(Emulator::Bochs, None, Some("ryzen"), "", config);
    assert_eq!(b.report.outcome, "ok", "{:?}\n{}", b.report.problems, b.serial);
    assert!(b.serial.contains("[c0] backend: svm"));
    for name in ["ping", "pong"] {
        let (rung, taken) = (bench(&b, name, "doorbells_rung"), bench(&b, name, "doorbells_taken"));
        assert_eq!((rung, taken), (500, 500), "{name}");
        let g = guest(&b, name);
        assert_eq!(g.exits.get("wrmsr"), Some(&500), "one EOI per doorbell: {:?}", g.exits);
    }
}

#[test]
fn a_scribbler_cannot_crash_its_peer_and_a_trespasser_is_stopped() {
    misbehave(Emulator::Bochs);
}

/// The same outcomes on SVM: the trespasser's nested page fault is reported as the EPT
/// violation is on VT-x.
#[test]
fn a_scribbler_cannot_crash_its_peer_and_a_trespasser_is_stopped_on_qemu_svm() {
    misbehave(Emulator::Qemu);
}

fn misbehave(emulator: Emulator) {
    let b = boot_config(emulator, None, None, "", Some("configs/misbehave.toml"));
    // The victim detects the corruption and exits cleanly with status 2.
    let v = guest(&b, "victim");
    assert_eq!((v.state.as_str(), v.exit_status), ("exited", 2), "{v:?}");
    let corrupt = "[victim@c1] ERROR sink: channel corrupted: Corrupt { slot: 3, expected: 4, found: 16045690984833335023 }";
    // Under QEMU's TCG the scribbler may be dead (its channel down) before the victim
    // reaches slot 3: it then stops at the peer's death instead, as cleanly (exit 2).
    let gone = "[victim@c1] ERROR sink: channel corrupted: PeerGone; stopping cleanly";
    assert!(
        b.serial.contains(corrupt) || (emulator == Emulator::Qemu && b.serial.contains(gone)),
        "{}",
        b.serial
    );
    assert_eq!(guest(&b, "scribbler").exit_status, 0);
    // Reading another pair's channel window: stopped at the EPT violation.
    let t = guest(&b, "trespasser");
    assert_eq!(t.state, "stopped");
    let f = t.fault.as_deref().unwrap_or_default();
    assert!(
        f.starts_with(
            "EPT violation: read at guest-physical 0x80000000 (not mapped for this guest)"
        ),
        "{f}"
    );
    // The others carry on.
    let by = guest(&b, "bystander");
    assert_eq!((by.state.as_str(), by.exit_status), ("exited", 0));
    let dirty = b.report.channels.iter().find(|c| c.name == "dirty").expect("dirty channel");
    assert_eq!((dirty.a_sent, dirty.b_received), (3, 3));
}

/// Issue 21: six guests on six cores, three ping-pong pairs, every side waiting in MWAIT.
/// Each ping checks the content and order of all 1000 replies and exits 0 only after the
/// last; a lost wake-up leaves a pair asleep until its run budget ends (stopped, not 0).
/// Probes off: nothing but the channel wakes a sleeper (no NMI or timer exit to rescue it),
/// and every VM exit during the exchange is a backstop doorbell. Probes on: the same with
/// the failure detector's NMIs and timer exits arriving at any point of a wait.
fn six_mwait_guests(probe_ms: u32) {
    let cmdline = format!("probe_ms={probe_ms}");
    let b = boot_config(Emulator::Bochs, None, None, &cmdline, Some("configs/mwait-six.toml"));
    let mut problems = Vec::new();
    for pair in 0..3 {
        for side in ["ping", "pong"] {
            let name = format!("{side}{pair}");
            let g = guest(&b, &name);
            if (g.state.as_str(), g.exit_status) != ("exited", 0) {
                problems.push(format!("{name}: {} {} {:?}", g.state, g.exit_status, g.fault));
                continue;
            }
            // Really in MWAIT (not the doorbell fallback), all 1000 round trips.
            assert_eq!(bench(&b, &name, "mwait"), 1, "{name}");
            assert_eq!(bench(&b, &name, "n"), 1000, "{name}");
            let (exits, rung) = (bench(&b, &name, "exits"), bench(&b, &name, "doorbells_rung"));
            eprintln!("{name}: exits {exits}, backstop doorbells rung {rung}");
            if probe_ms == 0 {
                assert_eq!(exits, rung, "{name}: an exit other than a backstop doorbell");
            }
        }
    }
    assert!(problems.is_empty(), "a pair did not finish (lost wake-up?): {problems:#?}");
    assert_eq!(b.report.outcome, "ok", "{:?}", b.report.problems);
    assert_eq!(b.report.channels.len(), 3);
    for c in &b.report.channels {
        assert_eq!((c.a_sent, c.b_received, c.b_sent, c.a_received), (1000, 1000, 1000, 1000));
    }
}

#[test]
fn six_guests_waiting_in_mwait_lose_no_wake_up_with_probes_off() {
    six_mwait_guests(0);
}

#[test]
fn six_guests_waiting_in_mwait_lose_no_wake_up_with_probes_on() {
    six_mwait_guests(25);
}

/// A client that gives up (`Chan::call_until`, 5 ms) against a server that answers every
/// fourth of 30 calls 8 ms late: those 7 are given up, the 23 others answered in time,
/// each reply checked to be its own call's (a late reply is discarded by the library,
/// never taken for the next call's), every request whole and in order at the server, and
/// the discarded replies still counted as taken (the channel's counts balance).
#[test]
fn a_call_with_a_deadline_gives_up_and_its_late_reply_never_answers_the_next_call() {
    let b = boot_config(Emulator::Bochs, None, None, "", Some("configs/impatient.toml"));
    assert_eq!(b.report.outcome, "ok", "{:?}", b.report.problems);
    for (name, core, line) in [
        ("server", 1, "laggard: 30 requests whole and in order, 7 answered 8 ms late"),
        (
            "client",
            0,
            "impatient: 30 calls, 23 replied in time, 7 given up, 0 not sent; every reply its own call's; still held at the end: 0",
        ),
    ] {
        let g = guest(&b, name);
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}");
        let want = format!("[{name}@c{core}] {line}");
        assert!(b.serial.contains(&want), "missing: {want}");
    }
    let c = &b.report.channels[0];
    assert_eq!((c.a_sent, c.b_received, c.b_sent, c.a_received), (30, 30, 30, 30), "{c:?}");
}
