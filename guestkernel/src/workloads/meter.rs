// SPDX-License-Identifier: MIT OR Apache-2.0
//! `meter`: exit-free telemetry, read and checked from inside guests (`configs/telemetry.toml`).
//!
//! * `watched`: makes `n` hypercalls and finds exactly `n` more hypercalls and VMCALL exits
//!   on its own status page (and as many entries as exits); sends `m` messages to its
//!   controller and, a refresh period later, finds them in its channel's traffic; counts the
//!   NMIs its controller's `queries` cost its core; then tells its controller what its page
//!   says and waits (polling, no exit) until the controller restarts it. Its second
//!   incarnation makes `n` hypercalls, logs its count and exits 0.
//! * `watcher` (holds a guest-control capability over `watched`): reads `watched`'s page
//!   through its read-only target window and finds exactly what `watched` said, reading it
//!   without a single VM exit of its own; restarts `watched` and reads the window again (the
//!   same address, now the second incarnation's page); with `write = 1` it then writes the
//!   window and must be stopped.
//! * `nosy` (no control capability): reads the target windows' address: nothing is mapped
//!   there, it must be stopped.

use crate::arch::rdtsc;
use crate::channel::{self, message, Chan, Payload};
use crate::hypercall::call;
use guestkernel::telemetry::{self, Snapshot};
use vmcall_proto::guest::{target_status, BootInfo};
use vmcall_proto::hypercall::{control, Hypercall};

/// Message tags (word 0) besides the `m` numbered messages.
const GOT: u64 = 0x6d65_7465_7201;
const QUERY_ME: u64 = 0x6d65_7465_7202;
const DONE: u64 = 0x6d65_7465_7203;
const COUNTERS: u64 = 0x6d65_7465_7204;

/// Where `hypercalls` is in a status page.
const HYPERCALLS_OFFSET: u64 = (vmcall_proto::guest::STATUS_TELEMETRY_OFFSET
    + core::mem::offset_of!(vmcall_proto::guest::Telemetry, hypercalls))
    as u64;

/// Type of a guest-control capability (`cap_identify`'s low byte).
const CONTROL_CAP: u64 = 3;

pub fn meter(bi: &BootInfo) -> u64 {
    match bi.arg_word("role") {
        "watched" if bi.incarnation > 1 => watched_again(bi),
        "watched" => watched(bi),
        "watcher" => watcher(bi),
        _ => nosy(),
    }
}

fn pause_ms(bi: &BootInfo, ms: u64) {
    let t = rdtsc();
    while rdtsc() - t < ms * bi.tsc_per_ms {
        core::hint::spin_loop();
    }
}

fn tagged(tag: u64, words: [u64; 6]) -> Payload {
    [tag, words[0], words[1], words[2], words[3], words[4], words[5]]
}

/// Receives a message tagged `tag` (polling: no exit), or `None` on a channel error or
/// another message.
fn expect(ch: &mut Chan, tag: u64) -> Option<Payload> {
    match ch.recv() {
        Ok(m) if m[0] == tag => Some(m),
        other => {
            log::error!("meter: expected tag {tag:#x}, got {other:?}");
            None
        }
    }
}

fn yields(n: u64) {
    for _ in 0..n {
        let _ = call(Hypercall::Yield, 0, 0);
    }
}

fn watched(bi: &BootInfo) -> u64 {
    let (n, m, queries) = (bi.arg_int("n"), bi.arg_int("m"), bi.arg_int("queries"));
    let Some(mut ch) = channel::open(bi, None) else { return 1 };
    let mut ok = true;

    // Hypercalls: exactly n more, each one VMCALL exit, one entry per exit.
    let a = telemetry::own();
    yields(n);
    let b = telemetry::own();
    let d = |f: fn(&Snapshot) -> u64| f(&b) - f(&a);
    log::info!(
        "meter: {n} hypercalls: hypercalls +{}, vmcall exits +{}, exits +{}, entries +{}",
        d(|s| s.hypercalls),
        d(|s| s.vmcalls),
        d(|s| s.exits),
        d(|s| s.entries)
    );
    ok &= d(|s| s.hypercalls) == n && d(|s| s.vmcalls) == n && d(|s| s.entries) == d(|s| s.exits);

    // Messages: m sent, the controller's one answer received; a refresh period (1 ms) and
    // one exit later the page has them.
    for i in 0..m {
        ok &= ch.send(&message(i, 0)).is_ok();
    }
    ok &= expect(&mut ch, GOT).is_some_and(|g| g[1] == m);
    pause_ms(bi, 2);
    yields(1);
    let t = telemetry::own();
    log::info!(
        "meter: channel 0 after {m} messages: sent {}, received {}, inbound {} (copied at tsc {})",
        t.traffic0.0,
        t.traffic0.1,
        t.traffic0.2,
        t.traffic_tsc
    );
    ok &= t.traffic0 == (m, 1, 1) && t.traffic_tsc > 0;

    // NMIs: each of the controller's queries kicks this core once.
    let before = telemetry::own();
    ok &= ch.send(&tagged(QUERY_ME, [queries, 0, 0, 0, 0, 0])).is_ok();
    ok &= expect(&mut ch, DONE).is_some();
    let after = telemetry::own();
    let (nmis, nmi_exits) = (after.nmis - before.nmis, after.nmi_exits - before.nmi_exits);
    log::info!("meter: {queries} queries by its controller: nmis +{nmis}, nmi exits +{nmi_exits}");
    ok &= nmis >= queries && nmi_exits <= nmis;

    // What the page says now goes to the controller; nothing exits until it has read it.
    let s = telemetry::own();
    let words = [s.hypercalls, s.entries, s.nmis, s.exits, s.traffic0.0, ok as u64];
    log::info!(
        "meter: watched checks {}; telling its controller hypercalls {} entries {} nmis {} exits {} sent {}",
        if ok { "passed" } else { "FAILED" },
        words[0],
        words[1],
        words[2],
        words[3],
        words[4]
    );
    // The log line above exited: read the page again for what goes out.
    let s = telemetry::own();
    let words = [s.hypercalls, s.entries, s.nmis, s.exits, s.traffic0.0, ok as u64];
    if ch.send(&tagged(COUNTERS, words)).is_err() {
        return 1;
    }
    // Until the controller restarts this incarnation (polling, no exit; the run budget
    // ends it if the controller never does).
    loop {
        let _ = ch.try_recv();
        core::hint::spin_loop();
    }
}

fn watched_again(bi: &BootInfo) -> u64 {
    let n = bi.arg_int("n");
    yields(n);
    let s = telemetry::own();
    // The log hypercall is one more, the exit another: the final page says hypercalls + 2.
    log::info!(
        "meter: incarnation {}: hypercalls {} before its last log and exit",
        s.incarnation,
        s.hypercalls
    );
    0
}

fn watcher(bi: &BootInfo) -> u64 {
    let (m, queries) = (bi.arg_int("m"), bi.arg_int("queries"));
    let Some(mut ch) = channel::open(bi, None) else { return 1 };
    let Some(slot) = (0..vmcall_proto::caps::MAX_SLOTS as u64)
        .find(|&h| call(Hypercall::CapIdentify, h, 0).is_ok_and(|i| i & 0xff == CONTROL_CAP))
    else {
        log::error!("meter: no guest-control capability");
        return 1;
    };
    let mut ok = true;
    for i in 0..m {
        ok &= ch.recv() == Ok(message(i, 0));
    }
    ok &= ch.send(&tagged(GOT, [m, 0, 0, 0, 0, 0])).is_ok();

    ok &= expect(&mut ch, QUERY_ME).is_some();
    let mine = telemetry::own();
    for _ in 0..queries {
        let w = call(Hypercall::GuestControl, slot, control::QUERY);
        ok &= w.is_ok_and(|w| w & 0xff == u64::from(control::RUNNING));
    }
    let nmis = telemetry::own().nmis - mine.nmis;
    ok &= ch.send(&tagged(DONE, [0; 6])).is_ok();
    log::info!("meter: {queries} queries made: its own nmis +{nmis} (the answers' kicks)");

    let Some(said) = expect(&mut ch, COUNTERS) else { return 1 };
    // Read the target's page through the window, many times, with no exit of our own.
    const READS: u64 = 1000;
    let e0 = telemetry::own();
    let t0 = rdtsc();
    let mut w = Snapshot::default();
    for _ in 0..READS {
        // SAFETY: this guest holds one guest-control capability: window 0 is mapped.
        w = unsafe { telemetry::target(0) };
    }
    let t1 = rdtsc();
    let mut hc = 0;
    for _ in 0..READS {
        // SAFETY: as above; one aligned word of window 0.
        hc = unsafe {
            core::ptr::read_volatile((target_status(0) + HYPERCALLS_OFFSET) as *const u64)
        };
    }
    let t2 = rdtsc();
    let e1 = telemetry::own();
    let window = [w.hypercalls, w.entries, w.nmis, w.exits, w.traffic0.0];
    log::info!(
        "meter: window 0: incarnation {} hypercalls {} entries {} nmis {} exits {} sent {}; its own exits while reading it {}x: +{} (entries +{}); instructions per read: whole page {}, one counter {}",
        w.incarnation,
        window[0],
        window[1],
        window[2],
        window[3],
        window[4],
        READS,
        e1.exits - e0.exits,
        e1.entries - e0.entries,
        (t1 - t0) / READS,
        (t2 - t1) / READS
    );
    ok &= said[6] == 1 && said[1..6] == window && hc == w.hypercalls && w.incarnation == 1;
    ok &= e1.exits == e0.exits && e1.entries == e0.entries;

    // The window survives the target's restart: same address, the new incarnation's page.
    let r = call(Hypercall::GuestControl, slot, control::RESTART);
    ok &= r.is_ok_and(|w| w & 0xff == u64::from(control::RUNNING));
    let mut tries = 0;
    while call(Hypercall::GuestControl, slot, control::QUERY)
        .is_ok_and(|w| w & 0xff != u64::from(control::EXITED))
        && tries < 10_000
    {
        pause_ms(bi, 1);
        tries += 1;
    }
    // SAFETY: as above.
    let w2 = unsafe { telemetry::target(0) };
    log::info!(
        "meter: window 0 after the restart: incarnation {} hypercalls {} vmcall exits {}",
        w2.incarnation,
        w2.hypercalls,
        w2.vmcalls
    );
    ok &= w2.incarnation == 2 && w2.hypercalls >= bi.arg_int("n");
    log::info!("meter: watcher checks {}", if ok { "passed" } else { "FAILED" });
    if bi.arg_int("write") == 1 {
        log::info!("meter: writing its target window (must be stopped)");
        // SAFETY: a deliberate write to a read-only mapping: the hypervisor stops us here.
        unsafe { core::ptr::write_volatile(target_status(0) as *mut u64, 1) };
        log::error!("meter: UNEXPECTED: the write to the window returned");
        return 1;
    }
    if ok {
        0
    } else {
        1
    }
}

fn nosy() -> u64 {
    let s = telemetry::own();
    log::info!(
        "meter: own page: incarnation {} entries {}; reading the target windows (none mapped: must be stopped)",
        s.incarnation,
        s.entries
    );
    // SAFETY: a deliberate read where nothing is mapped: the hypervisor stops us here.
    let v = unsafe { core::ptr::read_volatile(target_status(0) as *const u64) };
    log::error!("meter: UNEXPECTED: the window read returned {v:#x}");
    1
}
