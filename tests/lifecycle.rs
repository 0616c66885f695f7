// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of guest lifecycles: restart policies, clean deaths, nothing of a
//! dead incarnation left for the next one, nothing leaked by the hypervisor.

use systests::{boot_config, Boot};
use xtask::cli::Emulator;
use xtask::report::GuestReport;

fn guest<'a>(b: &'a Boot, name: &str) -> &'a GuestReport {
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
/// loaded host starves vCPUs) the failure detector's period is 1 s, so that a starved but
/// live core is not fenced (8 s without an answer; docs/svm.md "Scale under QEMU").
fn boot(e: Emulator, cmdline: &str, config: &str) -> Boot {
    let cmdline = match e {
        Emulator::Qemu => format!("{cmdline} probe_ms=1000{}", qemu_budget(cmdline)),
        _ => cmdline.to_string(),
    };
    boot_config(e, None, None, cmdline.trim(), Some(config))
}

/// `phoenix` faults in incarnations 1-3 and lives in the 4th; `ashes` never lives and is
/// stopped for good after its 2 restarts; `steady` is not disturbed. No incarnation finds a
/// mark of the one before (memory and grant scrubbed), and every incarnation starts with the
/// same hypervisor frames in use (nothing leaked).
#[test]
fn restarts_follow_the_policy_and_leave_nothing_behind() {
    restarts_follow_the_policy_and_leave_nothing_behind_(Emulator::Bochs);
}

#[test]
fn restarts_follow_the_policy_and_leave_nothing_behind_on_qemu_svm() {
    restarts_follow_the_policy_and_leave_nothing_behind_(Emulator::Qemu);
}

fn restarts_follow_the_policy_and_leave_nothing_behind_(e: Emulator) {
    let b = boot(e, "", "configs/lifecycle.toml");
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

    // No register state crosses a restart (or comes from the firmware): the pass-through
    // MSRs, CR2, debug and SSE registers are reset before every incarnation.
    let ghost = guest(&b, "ghost");
    assert_eq!((ghost.state.as_str(), ghost.exit_status), ("exited", 0), "{ghost:?}");
    for n in 1..=3 {
        let said = format!("[ghost@c4] ghost: incarnation {n}: earlier marks none");
        assert!(b.serial.contains(&said), "missing: {said}\n{}", b.serial);
    }
    assert!(!b.serial.contains("EARLIER MARK"));
    // Fifty deaths in a row: the 51st lives, and it starts with what the first had.
    let fifty = guest(&b, "fifty");
    assert_eq!((fifty.state.as_str(), fifty.exit_status), ("exited", 0), "{fifty:?}");
    assert_eq!(fifty.incarnations.len(), 51);
    assert_eq!(fifty.exits.get("ept_violation"), Some(&50));
    for g in [p, a, fifty] {
        let frames: Vec<u64> = g.incarnations.iter().map(|i| i.frames_at_start).collect();
        assert!(frames.iter().all(|f| *f == frames[0] && *f > 0), "{}: {frames:?}", g.name);
        let caps: Vec<u64> = g.incarnations.iter().map(|i| i.caps_live).collect();
        assert!(caps.iter().all(|c| *c == caps[0]), "{}: {caps:?}", g.name);
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
    a_supervisor_restarts_stops_and_starts_guests_by_capability_(Emulator::Bochs);
}

#[test]
fn a_supervisor_restarts_stops_and_starts_guests_by_capability_on_qemu_svm() {
    a_supervisor_restarts_stops_and_starts_guests_by_capability_(Emulator::Qemu);
}

fn a_supervisor_restarts_stops_and_starts_guests_by_capability_(e: Emulator) {
    let b = boot(e, "", "configs/supervise.toml");
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
        "an unknown counter: Err(Ok(BadArgument)) as expected",
    ] {
        assert!(said(s), "missing: {s}\n{}", b.serial);
    }
    // Each target's counters, read from its core after it exited: its last incarnation's
    // VM exits and hypercalls, as the hypervisor's own record of that incarnation says.
    for (slot, name) in [(0, "worker"), (1, "sleeper")] {
        let line = b
            .serial
            .lines()
            .find(|l| l.contains(&format!("supervisor: slot {slot} counters: exits Ok(")))
            .unwrap_or_else(|| panic!("no counters for slot {slot}\n{}", b.serial));
        let nums: Vec<u64> =
            line.split("Ok(").skip(1).filter_map(|p| p.split(')').next()?.parse().ok()).collect();
        assert_eq!(nums.len(), 2, "{line}");
        assert!(nums[0] > 0 && nums[1] > 0, "{line}");
        let g = guest(&b, name);
        assert!(nums[0] <= g.exits.values().sum::<u64>(), "{line}: {:?}", g.exits);
    }
    let w = guest(&b, "worker");
    assert_eq!((w.state.as_str(), w.exit_status, w.incarnations.len()), ("exited", 0, 4));
    let s = guest(&b, "sleeper");
    assert_eq!(s.incarnations.len(), 2);
    assert_eq!(s.incarnations[0].fault.as_deref(), Some("stopped by its controller on core 0"));
    assert_eq!(s.incarnations[1].exit_status, Some(0));
    // The sleeper's second incarnation ran its whole 200 ms again from the start: a HLT per
    // 1-ms tick (the first may be stopped before its first tick, as the controller's stop
    // can arrive at once).
    let second = &s.incarnations[1].exits;
    assert!(second.get("hlt").copied().unwrap_or(0) >= 200, "{second:?}");
}

/// Channels across a restart: `echo` dies after 30 echoes and is restarted; `source` sees
/// the peer gone, counts the message the dead incarnation took as lost, rejoins the next
/// epoch and finishes. Every message is echoed once, in order, or counted lost; the rings
/// were reset once, before the new incarnation ran, and their counters at the end are the
/// new epoch's.
#[test]
fn a_channel_comes_back_in_a_new_epoch_when_its_peer_restarts() {
    a_channel_comes_back_in_a_new_epoch_when_its_peer_restarts_(Emulator::Bochs);
}

#[test]
fn a_channel_comes_back_in_a_new_epoch_when_its_peer_restarts_on_qemu_svm() {
    a_channel_comes_back_in_a_new_epoch_when_its_peer_restarts_(Emulator::Qemu);
}

fn a_channel_comes_back_in_a_new_epoch_when_its_peer_restarts_(e: Emulator) {
    let b = boot(e, "", "configs/rejoin.toml");
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

/// A controller whose core never comes up cannot keep the run from ending: its target (on
/// the BSP) stops waiting at the collection's deadline, every record is written.
#[test]
fn a_controller_that_never_runs_does_not_hold_up_the_run() {
    a_controller_that_never_runs_does_not_hold_up_the_run_(Emulator::Bochs);
}

#[test]
fn a_controller_that_never_runs_does_not_hold_up_the_run_on_qemu_svm() {
    a_controller_that_never_runs_does_not_hold_up_the_run_(Emulator::Qemu);
}

fn a_controller_that_never_runs_does_not_hold_up_the_run_(e: Emulator) {
    let b = boot(e, "inject=silent-ap", "configs/hostile/control-silent.toml");
    let r = &b.report;
    assert_eq!(r.outcome, "failed", "the boss never started: {:?}", r.problems);
    let t = guest(&b, "target");
    assert_eq!((t.state.as_str(), t.exit_status), ("exited", 0), "{t:?}");
    assert_eq!(guest(&b, "boss").state, "not_started");
}

/// A controller at the other end of its target's channel stops and starts it five times:
/// each stop returns with the channel already down (the target's core showed it in the
/// controller's status page while the controller waited in its hypercall), each start with
/// the new incarnation entered, and the channel comes back in the next epoch.
#[test]
fn a_controller_stops_and_starts_the_peer_of_its_channel() {
    a_controller_stops_and_starts_the_peer_of_its_channel_(Emulator::Bochs);
}

#[test]
fn a_controller_stops_and_starts_the_peer_of_its_channel_on_qemu_svm() {
    a_controller_stops_and_starts_the_peer_of_its_channel_(Emulator::Qemu);
}

fn a_controller_stops_and_starts_the_peer_of_its_channel_(e: Emulator) {
    let b = boot(e, "", "configs/bench-lifecycle.toml");
    let r = &b.report;
    assert_eq!(r.outcome, "ok", "{:?}\n{}", r.problems, b.serial);
    for k in 0..5 {
        assert!(b.serial.contains(&format!("[mgr@c0] lifebench: round={k} ")), "round {k}");
    }
    assert!(b.serial.contains("[mgr@c0] lifebench: 5 rounds, last echo true"));
    for n in 2..=6 {
        let said = format!("[echo@c1] echo: incarnation {n} in epoch {}", n - 1);
        assert!(b.serial.contains(&said), "missing: {said}");
    }
    let echo = guest(&b, "echo");
    assert_eq!(echo.incarnations.len(), 6);
    assert!(echo.incarnations[..5]
        .iter()
        .all(|i| i.fault.as_deref() == Some("stopped by its controller on core 0")));
}

/// The views each core installed, in order: (number, members, coordinator).
fn views_of(b: &Boot, core: u32) -> Vec<(u32, Vec<u32>, u32)> {
    b.report
        .views
        .iter()
        .filter(|v| v.core == core)
        .map(|v| (v.num, v.members.clone(), v.by))
        .collect()
}

/// Core membership: `mgr` parks the core of `sleeper` while it runs (the guest stopped, the
/// core out of the view) and brings it back. Every core, the parked one included, logs the
/// same two views; the sleeper's second incarnation runs to its end.
#[test]
fn a_core_taken_out_comes_back_and_every_core_logs_the_same_views() {
    a_core_taken_out_comes_back_and_every_core_logs_the_same_views_(Emulator::Bochs);
}

#[test]
fn a_core_taken_out_comes_back_and_every_core_logs_the_same_views_on_qemu_svm() {
    a_core_taken_out_comes_back_and_every_core_logs_the_same_views_(Emulator::Qemu);
}

fn a_core_taken_out_comes_back_and_every_core_logs_the_same_views_(e: Emulator) {
    let b = boot(e, "", "configs/membership.toml");
    let r = &b.report;
    assert_eq!(r.outcome, "ok", "{:?}\n{}", r.problems, b.serial);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    for c in 0..3 {
        let seq: Vec<(u32, Vec<u32>)> = views_of(&b, c).into_iter().map(|v| (v.0, v.1)).collect();
        assert_eq!(seq, [(1, vec![0, 1]), (2, vec![0, 1, 2])], "core {c}\n{}", b.serial);
    }
    for said in [
        "supervisor: park slot 0: parked in incarnation 1",
        "supervisor: query slot 0: parked in incarnation 1",
        "supervisor: start slot 0: running in incarnation 2",
        "supervisor: slot 0 exited (status 0) in incarnation 2",
    ] {
        assert!(b.serial.contains(said), "missing: {said}\n{}", b.serial);
    }
    let s = guest(&b, "sleeper");
    assert_eq!((s.state.as_str(), s.exit_status, s.incarnations.len()), ("exited", 0, 2), "{s:?}");
    // The core was out between the two views: the second incarnation started after view 1
    // was installed there and no earlier than view 2.
    let out = &r.views.iter().find(|v| v.core == 2 && v.num == 1).unwrap();
    let back = &r.views.iter().find(|v| v.core == 2 && v.num == 2).unwrap();
    assert!(s.incarnations[0].tsc_end <= out.tsc && back.tsc <= s.incarnations[1].tsc_start);
    assert_eq!(guest(&b, "worker").exit_status, 0);
    view_changes_are_counted(&b);
}

/// Each view change's own messages, as every core counted them (`vchange` records,
/// `view_changes` in the report), against the protocol (docs/membership.md):
/// * change 1 takes core 2 out, and core 2, the highest, coordinates it: one round with
///   the 2 others, a `PREPARE`, `PROMISE`, `ACCEPT` and `ACCEPTED` with each, and a `COMMIT`
///   to each: 2 of each kind, 10;
/// * change 2 brings core 2 back, and core 1, now the highest, coordinates it with the only
///   other member, core 0: one of each of the four, and a `COMMIT` to cores 0 and 2: 6.
///
/// A round's messages are sent and handled before either side installs the view, so each
/// counts on both sides in the same change. The `WISH`es (core 2 asks core 0 to come back,
/// core 0 passes it on; after a `COMMIT` the members re-tell the new coordinator the
/// intent it applied) depend on how the messages interleave (a `WISH` sent after one
/// side's install and handled before the other's counts in two changes): checked as
/// totals, every message counted once where it left and once where it was handled.
fn view_changes_are_counted(b: &Boot) {
    use xtask::report::MemberMessages;
    let r = &b.report;
    let round = |n: u64, commits: u64| MemberMessages {
        prepare: n,
        promise: n,
        accept: n,
        accepted: n,
        commit: commits,
        ..MemberMessages::default()
    };
    let only_rounds =
        |m: &MemberMessages| MemberMessages { wish: 0, wish_ack: 0, catchup: 0, ..*m };
    for (num, coordinator, want) in [(1, 2, round(2, 2)), (2, 1, round(1, 2))] {
        let vs: Vec<_> = r.view_changes.iter().filter(|v| v.num == num).collect();
        let cores: Vec<u32> = vs.iter().filter(|v| v.installed).map(|v| v.core).collect();
        assert_eq!(cores.len(), 3, "change {num}: every core installed it: {vs:?}");
        let (mut sent, mut received) = (MemberMessages::default(), MemberMessages::default());
        for v in &vs {
            sent.add(&only_rounds(&v.sent));
            received.add(&only_rounds(&v.received));
            let rounds = if v.core == coordinator { 1 } else { 0 };
            assert_eq!(v.rounds, rounds, "change {num}, core {}", v.core);
        }
        assert_eq!((sent, received), (want, want), "change {num}: {vs:?}");
        let c = vs.iter().find(|v| v.core == coordinator).unwrap();
        let (n, commit) = (want.prepare, want.commit);
        let asks = MemberMessages { prepare: n, accept: n, commit, ..MemberMessages::default() };
        assert_eq!(only_rounds(&c.sent), asks, "the coordinator asks, then commits: {c:?}");
    }
    // Core 2 asked to come back (counted for change 2: it had view 1 then).
    let back = r.view_changes.iter().find(|v| v.core == 2 && v.num == 2).unwrap();
    assert!(back.sent.wish >= 1, "{back:?}");
    // The worker's core took part while its guest ran: exits, at most one per message.
    for num in [1, 2] {
        let w = r.view_changes.iter().find(|v| v.core == 1 && v.num == num).unwrap();
        assert!((1..=w.received.total() + w.sent.total()).contains(&w.exits), "{w:?}");
    }
    let (mut sent, mut received) = (MemberMessages::default(), MemberMessages::default());
    for v in &r.view_changes {
        sent.add(&v.sent);
        received.add(&v.received);
    }
    assert_eq!(sent, received, "every message counted on both sides");
    assert_eq!(sent.nack, 0);
    // The failure detector's traffic is apart: probes answered on every member.
    for g in ["mgr", "worker", "sleeper"] {
        let p = guest(b, g).probes;
        assert!(p.pings_sent > 0 && p.pongs_received <= p.pings_sent, "{g}: {p:?}");
        assert_eq!(p.unattributed, 0, "{g}");
    }
}

/// A core that hangs (`inject=hung-core:2`, 20 ms into its guest's run) is detected by the
/// core probing it and fenced by a view change the two others agree on (core 2 was the
/// coordinator: core 1 takes over). Its channel peer sees it gone; the run ends with every
/// other guest done and without waiting for the hung core.
#[test]
fn a_hung_core_is_detected_fenced_and_the_others_finish() {
    a_hung_core_is_detected_fenced_and_the_others_finish_(Emulator::Bochs);
}

#[test]
fn a_hung_core_is_detected_fenced_and_the_others_finish_on_qemu_svm() {
    a_hung_core_is_detected_fenced_and_the_others_finish_(Emulator::Qemu);
}

fn a_hung_core_is_detected_fenced_and_the_others_finish_(e: Emulator) {
    let b = boot(e, "inject=hung-core:2", "configs/hung.toml");
    let r = &b.report;
    assert_eq!(r.outcome, "failed", "a guest was fenced");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    for c in [0, 1] {
        assert_eq!(views_of(&b, c), [(1, vec![0, 1], 1)], "core {c}\n{}", b.serial);
    }
    assert!(views_of(&b, 2).is_empty(), "the hung core logs nothing");
    let echo = guest(&b, "echo");
    assert_eq!(echo.state, "fenced", "{echo:?}");
    for g in ["spin", "stream"] {
        let g = guest(&b, g);
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}");
    }
    assert!(b.serial.contains("stream: peer gone for good"), "{}", b.serial);
    // Detection within the probe period plus the timeout (8 periods of 25 ms; under QEMU
    // of 1 s, `boot`) plus the view change, in TSC ticks (the hypervisor's ticks per ms
    // from its log).
    let per_ms: u64 = b
        .serial
        .lines()
        .find_map(|l| l.split("TSC: ").nth(1)?.strip_suffix(" ticks/ms")?.parse().ok())
        .expect("the TSC rate line");
    let [hang] = &r.hangs[..] else { panic!("one hang: {:?}", r.hangs) };
    assert_eq!(hang.core, 2);
    let fenced = r.views.iter().map(|v| v.tsc).max().unwrap();
    assert!(fenced > hang.tsc, "fenced after the hang");
    let period = if e == Emulator::Qemu { 1_000 } else { 25 };
    assert!(fenced - hang.tsc < 12 * period * per_ms, "took {} ticks", fenced - hang.tsc);
    if e == Emulator::Qemu {
        // Host time on a loaded host: how soon the run ended is QEMU's scheduling.
        return;
    }
    // The run did not wait for the hung core's report (its collection deadline is seconds).
    let end = r.tsc.end.expect("end record");
    assert!(
        end - hang.tsc < 2_000 * per_ms,
        "the run ended {} ticks after the hang",
        end - hang.tsc
    );
}

/// Run length: with `duration_ms=1000` a guest that would spin for an hour and one that is
/// restarted every time it exits are both stopped where they are when the second is over
/// (state `ended`; the second one `exited` if the end finds it between two incarnations),
/// none is restarted after it, and the run ends `ok`.
#[test]
fn a_run_ends_at_its_duration_with_every_guest_stopped_where_it_was() {
    a_run_ends_at_its_duration_with_every_guest_stopped_where_it_was_(Emulator::Bochs);
}

/// Ignored on QEMU/SVM: there the run's second is host time, and on a loaded host the
/// guests' setup may take longer than it (one run of three with three QEMUs at once:
/// `cycler` never started, the run `failed`). It also met, before the fix of
/// `svm::vcpu`'s interrupt window in a shadow, the "HLT with no timer armed" stop
/// (docs/svm.md). Run it with `--ignored` on a quiet host.
#[test]
#[ignore = "QEMU/SVM: a host-time second is shorter than the setup on a loaded host"]
fn a_run_ends_at_its_duration_with_every_guest_stopped_where_it_was_on_qemu_svm() {
    a_run_ends_at_its_duration_with_every_guest_stopped_where_it_was_(Emulator::Qemu);
}

fn a_run_ends_at_its_duration_with_every_guest_stopped_where_it_was_(e: Emulator) {
    let b = boot(e, "duration_ms=1000", "configs/duration.toml");
    let r = &b.report;
    assert_eq!(r.outcome, "ok", "{:?}\n{}", r.problems, b.serial);
    let forever = guest(&b, "forever");
    assert_eq!(forever.state, "ended", "{forever:?}");
    let cycler = guest(&b, "cycler");
    let n = cycler.incarnations.len();
    // Under QEMU a cycle is host time (a TCG setup is slow): at least one restart.
    let at_least = if e == Emulator::Qemu { 2 } else { 3 };
    assert!(n >= at_least, "restarted while the run lasted: {n}");
    let (last, before) = (&cycler.incarnations[n - 1], &cycler.incarnations[..n - 1]);
    assert!(before.iter().all(|i| i.exit_status == Some(0)), "{before:?}");
    // Where the end of the run finds `cycler` depends on where its cycle (setup, 20 ms of
    // run, clean death) stands then, which moves with every change of the hypervisor's
    // timing: running or being set up, it is stopped there; in the clean death after an
    // exit, it is not started again (its last incarnation exited 0).
    let stopped = last.fault.as_deref() == Some("the run's duration ended");
    assert!(stopped || last.exit_status == Some(0), "{last:?}");
    assert!(cycler.state == "ended" || cycler.state == "exited", "{cycler:?}");
    // Both stopped at the end of the run's second (give or take the setup of an
    // incarnation that had begun just before it, a few hundred thousand instructions).
    let per_ms: u64 = b
        .serial
        .lines()
        .find_map(|l| l.split("TSC: ").nth(1)?.strip_suffix(" ticks/ms")?.parse().ok())
        .expect("the TSC rate line");
    let (a, c) = (forever.tsc_end, last.tsc_end);
    // The second counts from the guests' planning, early in the hypervisor's boot: nothing
    // ends before it. Under QEMU (host time, starved vCPUs) that is all that is exact.
    let entry = r.tsc.hypervisor_entry.expect("boot record");
    let after = a - entry;
    assert!(after >= 1_000 * per_ms, "ended {after} after entry");
    if e == Emulator::Qemu {
        return;
    }
    assert!(a.abs_diff(c) < 250 * per_ms, "ends {a} and {c} differ by {}", a.abs_diff(c));
    assert!(after < 1_200 * per_ms, "ended {after} after entry");
}

/// A run's length shorter than the guests' setup: the hypervisor stops them before their
/// first VM entry (its records: `ended`, no first entry, an `ok` end); the report says
/// they never entered (`not_started`) and the run is not `ok`.
#[test]
fn a_duration_shorter_than_guest_setup_is_not_an_ok_run() {
    a_duration_shorter_than_guest_setup_is_not_an_ok_run_(Emulator::Bochs);
}

#[test]
fn a_duration_shorter_than_guest_setup_is_not_an_ok_run_on_qemu_svm() {
    a_duration_shorter_than_guest_setup_is_not_an_ok_run_(Emulator::Qemu);
}

fn a_duration_shorter_than_guest_setup_is_not_an_ok_run_(e: Emulator) {
    let b = boot(e, "duration_ms=1", "configs/pair.toml");
    let r = &b.report;
    assert!(b.serial.contains("#mkv end outcome=ok"), "the hypervisor's view: {}", b.serial);
    assert_eq!(r.outcome, "failed", "{:?}", r.problems);
    for g in &r.guests {
        assert_eq!(g.state, "not_started", "{g:?}");
        assert_eq!(g.fault.as_deref(), Some(xtask::report::NEVER_ENTERED), "{g:?}");
        assert_eq!(g.tsc_first_entry, 0, "{g:?}");
        assert!(!b.serial.contains(&format!("[{}@c", g.name)), "{} said something", g.name);
    }
    assert_eq!(r.guests.len(), 2);
    assert!(r.problems.iter().any(|p| p.contains("never entered")), "{:?}", r.problems);
    systests::assert_matches_schema(r);
}

/// The relay ring with one member restarted mid-stream: `f2` dies with message 100 in hand
/// and is restarted; its neighbours see their channels go down, wait for the new epoch and
/// go on; `loop` counts the one message the restart took and every other message comes
/// back once, in order.
#[test]
fn a_ring_keeps_going_when_a_relay_restarts_and_every_message_is_accounted_for() {
    a_ring_keeps_going_when_a_relay_restarts_and_every_message_is_accounted_for_(None);
}

/// On SVM, as Bochs's `ryzen` model emulates it.
#[test]
fn a_ring_keeps_going_when_a_relay_restarts_and_every_message_is_accounted_for_on_bochs_svm() {
    a_ring_keeps_going_when_a_relay_restarts_and_every_message_is_accounted_for_(Some("ryzen"));
}

/// On SVM under QEMU's TCG, with the run budget and the detector's period of host time
/// ([`boot`]): 300 round trips of four polling relays took longer than the default 10 s
/// budget on a loaded host (docs/svm.md).
#[test]
fn a_ring_keeps_going_when_a_relay_restarts_and_every_message_is_accounted_for_on_qemu_svm() {
    let b = boot(Emulator::Qemu, "", "configs/ring-restart.toml");
    assert!(b.serial.contains("[c0] backend: svm"), "{}", b.serial);
    ring_checks(&b);
}

fn a_ring_keeps_going_when_a_relay_restarts_and_every_message_is_accounted_for_(
    model: Option<&str>,
) {
    let b = boot_config(Emulator::Bochs, None, model, "", Some("configs/ring-restart.toml"));
    if model.is_some() {
        assert!(b.serial.contains("[c0] backend: svm"), "{}", b.serial);
    }
    ring_checks(&b);
}

fn ring_checks(b: &Boot) {
    let r = &b.report;
    assert_eq!(r.outcome, "ok", "{:?}\n{}", r.problems, b.serial);
    assert!(b.serial.contains("[f2@c2] forward: message 100 taken, dying with it"));
    assert!(b.serial.contains("[loop@c0] loop: message 100 lost in a relay's restart"));
    assert!(b.serial.contains("[loop@c0] loop: sent 300, back 299, lost 1, bad 0"), "{}", b.serial);
    let f2 = guest(b, "f2");
    assert_eq!(f2.incarnations.len(), 2, "{f2:?}");
    assert!(f2.incarnations[0].fault.as_deref().unwrap_or("").starts_with("EPT violation"));
    for g in ["loop", "f1", "f2", "f3"] {
        assert_eq!(guest(b, g).exit_status, 0, "{g}");
    }
    // Its neighbours each saw one outage; the ring's other member none.
    assert!(b.serial.contains("[f1@c1] forward: 300 passed, 1 outages, end"));
    assert!(b.serial.contains("[f3@c3] forward: 300 passed, 1 outages, end"));
}
