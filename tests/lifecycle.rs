// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of guest lifecycles: restart policies, clean deaths, nothing of a
//! dead incarnation left for the next one, nothing leaked by the hypervisor.

use systests::{boot_config, Boot};
use xtask::cli::Emulator;
use xtask::report::GuestReport;

fn guest<'a>(b: &'a Boot, name: &str) -> &'a GuestReport {
    b.report
        .guests
        .iter()
        .find(|g| g.name == name)
        .unwrap_or_else(|| panic!("no guest {name}: {:?}", b.report.guests))
}

/// `phoenix` faults in incarnations 1-3 and lives in the 4th; `ashes` never lives and is
/// stopped for good after its 2 restarts; `steady` is not disturbed. No incarnation finds a
/// mark of the one before (memory and grant scrubbed), and every incarnation starts with the
/// same hypervisor frames in use (nothing leaked).
#[test]
fn restarts_follow_the_policy_and_leave_nothing_behind() {
    let b = boot_config(Emulator::Bochs, None, None, "", Some("configs/lifecycle.toml"));
    let r = &b.report;
    assert_eq!(r.outcome, "failed", "ashes never lives: {:?}", r.problems);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    let steady = guest(&b, "steady");
    assert_eq!((steady.state.as_str(), steady.exit_status), ("exited", 0));
    assert_eq!(steady.incarnations.len(), 1);

    let p = guest(&b, "phoenix");
    assert_eq!((p.state.as_str(), p.exit_status), ("exited", 0), "{p:?}");
    assert_eq!(p.incarnations.iter().map(|i| i.n).collect::<Vec<_>>(), [1, 2, 3, 4]);
    for i in &p.incarnations[..3] {
        assert_eq!(i.ending, "stopped", "{i:?}");
        assert!(i.fault.as_deref().unwrap_or("").starts_with("EPT violation: read"), "{i:?}");
    }
    assert_eq!(p.incarnations[3].exit_status, Some(0));
    assert_eq!(p.exits.get("ept_violation"), Some(&3), "summed over incarnations");
    for n in 1..=4 {
        let said = format!(
            "[phoenix@c1] phoenix: incarnation {n}: earlier marks none (memory 0x0, grant 0x0)"
        );
        assert!(b.serial.contains(&said), "missing: {said}\n{}", b.serial);
    }

    let a = guest(&b, "ashes");
    assert_eq!(a.state, "stopped");
    assert_eq!(a.incarnations.len(), 3, "first start and max_restarts = 2");
    assert!(b
        .serial
        .contains("[ashes@c2] phoenix: incarnation 3: earlier marks none (memory 0x0, no grant)"));
    assert!(!b.serial.contains("[ashes@c2] phoenix: incarnation 4"), "no fourth start");

    for g in [p, a] {
        let frames: Vec<u64> = g.incarnations.iter().map(|i| i.frames_at_start).collect();
        assert!(frames.iter().all(|f| *f == frames[0] && *f > 0), "{}: {frames:?}", g.name);
        // Each incarnation starts after the one before ended.
        for w in g.incarnations.windows(2) {
            assert!(w[1].tsc_start >= w[0].tsc_end, "{w:?}");
        }
    }
}

/// `mgr` runs `worker` and `sleeper` through guest-control capabilities: it restarts the
/// worker each time the hypervisor stops it (three faults, then it lives), and stops the
/// sleeper while it runs, finds it held, starts it again (a second start is refused).
#[test]
fn a_supervisor_restarts_stops_and_starts_guests_by_capability() {
    let b = boot_config(Emulator::Bochs, None, None, "", Some("configs/supervise.toml"));
    let r = &b.report;
    assert_eq!(r.outcome, "ok", "{:?}\n{}", r.problems, b.serial);
    let said = |s: &str| b.serial.contains(&format!("[mgr@c0] supervisor: {s}"));
    for s in [
        "an unknown operation: Err(Ok(BadArgument)) as expected",
        "a forged slot: Err(Ok(NoSuchSlot)) as expected",
        "stop slot 1: held in incarnation 1 (status 0)",
        "query slot 1: held in incarnation 1 (status 0)",
        "start slot 1: running in incarnation 2 (status 0)",
        "start it again: Err(Ok(Busy)) as expected",
        "slot 0 stopped in incarnation 3: restart: running in incarnation 4 (status 0)",
        "slot 0 exited (status 0) in incarnation 4 after 3 restarts",
        "slot 1 exited (status 0) in incarnation 2 after 0 restarts",
    ] {
        assert!(said(s), "missing: {s}\n{}", b.serial);
    }
    let w = guest(&b, "worker");
    assert_eq!((w.state.as_str(), w.exit_status, w.incarnations.len()), ("exited", 0, 4));
    let s = guest(&b, "sleeper");
    assert_eq!(s.incarnations.len(), 2);
    assert_eq!(s.incarnations[0].fault.as_deref(), Some("stopped by its controller on core 0"));
    assert_eq!(s.incarnations[1].exit_status, Some(0));
    // The sleeper's second incarnation ran its whole 200 ms again from the start.
    assert!(s.exits.get("hlt").copied().unwrap_or(0) > 200, "{:?}", s.exits);
}

/// Channels across a restart: `echo` dies after 30 echoes and is restarted; `source` sees
/// the peer gone, counts the message the dead incarnation took as lost, rejoins the next
/// epoch and finishes. Every message is echoed once, in order, or counted lost; the rings
/// were reset once, before the new incarnation ran, and their counters at the end are the
/// new epoch's.
#[test]
fn a_channel_comes_back_in_a_new_epoch_when_its_peer_restarts() {
    let b = boot_config(Emulator::Bochs, None, None, "", Some("configs/rejoin.toml"));
    let r = &b.report;
    assert_eq!(r.outcome, "ok", "{:?}\n{}", r.problems, b.serial);
    for s in [
        "[echo@c1] echo: message 30 taken, dying before its echo",
        "[source@c0] stream: peer gone at message 30 (epoch 0)",
        "[source@c0] stream: rejoined in epoch 1 at message 31",
        "[echo@c1] echo: incarnation 2 in epoch 1",
        "[echo@c1] echo: 69 echoed, end",
        "[source@c0] stream: sent 100, echoed 99, lost 1 in 1 resets, bad 0",
    ] {
        assert!(b.serial.contains(s), "missing: {s}\n{}", b.serial);
    }
    let echo = guest(&b, "echo");
    assert_eq!(echo.incarnations.len(), 2);
    let second = &echo.incarnations[1];
    assert_eq!((second.link_resets, second.link_lost), (1, 0), "{second:?}");
    let c = &r.channels[0];
    assert_eq!((c.a_sent, c.b_received, c.b_sent, c.a_received), (70, 70, 69, 69), "{c:?}");
}
