// SPDX-License-Identifier: MIT OR Apache-2.0
//! Workloads for channels whose peer comes and goes.
//!
//! * `streamer`: sends `n` numbered messages, one at a time, each echoed back by its peer.
//!   When the peer dies (`PeerGone`) the message it was waiting on is counted lost; it waits
//!   (bounded) for the peer's new incarnation, resynchronises and goes on with the next
//!   number. It checks every echo (the number it sent, in order, never twice) and exits 0 if
//!   every message was echoed once or counted lost. With `gone_ok = 1` a peer that does not
//!   come back within `rejoin_ms` (its core was fenced) ends the stream early, still exit 0
//!   if every message sent so far was accounted for.
//! * `echoer`: echoes every message; in its first incarnation it faults on purpose after
//!   `die_after` echoes (so it is restarted mid-stream); stops at the end marker.

use crate::channel::{self, Chan};
use vmcall_proto::channel::{ChannelError, Payload};
use vmcall_proto::guest::BootInfo;

const END: u64 = u64::MAX;

/// Waits up to `ms` for the peer to be up in a new epoch and resynchronises.
fn rejoin(c: &mut Chan, bi: &BootInfo, ms: u64) -> bool {
    let t = crate::arch::rdtsc();
    while crate::arch::rdtsc() - t < ms * bi.tsc_per_ms {
        if c.resync().is_ok() {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

pub fn streamer(bi: &BootInfo) -> u64 {
    let n = bi.arg_int("n");
    let gone_ok = bi.arg_int("gone_ok") == 1;
    let rejoin_ms = bi.arg_int("rejoin_ms").max(1);
    let Some(mut c) = channel::open(bi, None) else { return 1 };
    let (mut echoed, mut lost, mut resets, mut bad) = (0u64, 0u64, 0u64, 0u64);
    // Since the rings were last reset (what the hypervisor's channel record counts): sent
    // into them, and echoes taken from them.
    let (mut epoch_sent, mut epoch_echoed) = (0u64, 0u64);
    let mut seq = 0;
    while seq < n {
        let r = c.send(&[seq, bi.guest_id as u64, 0, 0, 0, 0, 0]).and_then(|()| {
            epoch_sent += 1;
            c.recv()
        });
        match r {
            Ok(m) if m[0] == seq => {
                echoed += 1;
                epoch_echoed += 1;
            }
            Ok(m) => {
                log::error!("stream: echo {} for message {seq}", m[0]);
                bad += 1;
            }
            Err(ChannelError::PeerGone | ChannelError::Reset) => {
                lost += 1;
                resets += 1;
                log::info!("stream: peer gone at message {seq} (epoch {})", c.epoch);
                if !rejoin(&mut c, bi, rejoin_ms) {
                    if gone_ok {
                        let sent = seq + 1;
                        log::info!(
                            "stream: peer gone for good: sent {sent} of {n}, echoed {echoed}, lost {lost}, bad {bad}; epoch_sent={epoch_sent} epoch_echoed={epoch_echoed}"
                        );
                        return (echoed + lost != sent || bad != 0) as u64;
                    }
                    log::error!("stream: the peer did not come back");
                    return 1;
                }
                (epoch_sent, epoch_echoed) = (0, 0);
                log::info!("stream: rejoined in epoch {} at message {}", c.epoch, seq + 1);
            }
            Err(e) => {
                log::error!("stream: message {seq}: {e:?}");
                return 1;
            }
        }
        seq += 1;
    }
    if c.send(&[END; 7]).is_ok() {
        epoch_sent += 1;
    }
    log::info!(
        "stream: sent {n}, echoed {echoed}, lost {lost} in {resets} resets, bad {bad}; epoch_sent={epoch_sent} epoch_echoed={epoch_echoed}"
    );
    (echoed + lost != n || bad != 0) as u64
}

pub fn echoer(bi: &BootInfo) -> u64 {
    let die_after = bi.arg_int("die_after");
    let Some(mut c) = channel::open(bi, None) else { return 1 };
    log::info!("echo: incarnation {} in epoch {}", bi.incarnation, c.epoch);
    let mut echoed = 0u64;
    loop {
        let m = match c.recv() {
            Ok(m) => m,
            Err(e) => {
                log::error!("echo: {e:?}");
                return 1;
            }
        };
        if m[0] == END {
            log::info!("echo: {echoed} echoed, end");
            return 0;
        }
        if bi.incarnation == 1 && echoed == die_after {
            log::info!("echo: message {} taken, dying before its echo", m[0]);
            // SAFETY: mapped by our page tables, not by EPT: the hypervisor stops us here.
            unsafe { core::ptr::read_volatile((bi.memory_bytes + (2 << 20)) as *const u64) };
        }
        if c.send(&m).is_err() {
            return 1;
        }
        echoed += 1;
    }
}

/// The guest-control slot of the first guest this one controls.
fn first_control() -> Option<u64> {
    (0..vmcall_proto::caps::MAX_SLOTS as u64).find(|&h| {
        crate::hypercall::call(vmcall_proto::hypercall::Hypercall::CapIdentify, h, 0)
            .is_ok_and(|i| i & 0xff == vmcall_proto::caps::CapType::Control as u64)
    })
}

/// Exchanges one message with the peer, resynchronising first if the channel was reset;
/// waits (bounded) while the peer is down.
fn exchange(c: &mut Chan, bi: &BootInfo, seq: u64) -> bool {
    let t = crate::arch::rdtsc();
    while crate::arch::rdtsc() - t < 5_000 * bi.tsc_per_ms {
        match c.send(&[seq, 0, 0, 0, 0, 0, 0]).and_then(|()| c.recv()) {
            Ok(m) => return m[0] == seq,
            Err(ChannelError::Reset) => {
                let _ = c.resync();
            }
            Err(ChannelError::PeerGone) => core::hint::spin_loop(),
            Err(_) => return false,
        }
    }
    false
}

/// `lifebench`: measures, `rounds` times, a controller stopping and starting the guest at
/// the other end of its channel: the stop call, until its own channel says `PeerGone`; the
/// start call (answered as the new incarnation is entered), until the channel is up again in
/// the next epoch. Prints one line per round (TSC ticks) for `cargo xtask bench lifecycle`.
pub fn lifebench(bi: &BootInfo) -> u64 {
    use vmcall_proto::hypercall::{control, Hypercall};
    let rounds = bi.arg_int("rounds");
    let (Some(mut c), Some(ctl)) = (channel::open(bi, None), first_control()) else {
        log::error!("lifebench: needs a channel and a guest to control");
        return 1;
    };
    let call = |op| crate::hypercall::call(Hypercall::GuestControl, ctl, op);
    let now = crate::arch::rdtsc;
    for k in 0..rounds {
        if !exchange(&mut c, bi, k) {
            log::error!("lifebench: round {k}: no echo");
            return 1;
        }
        let t0 = now();
        let stopped = call(control::STOP);
        let t1 = now();
        while c.link() != Err(ChannelError::PeerGone) {
            if now() - t0 > 5_000 * bi.tsc_per_ms {
                log::error!("lifebench: round {k}: the channel never went down");
                return 1;
            }
        }
        let t2 = now();
        let started = call(control::START);
        let t3 = now();
        while c.resync().is_err() {
            if now() - t2 > 5_000 * bi.tsc_per_ms {
                log::error!("lifebench: round {k}: the channel never came back");
                return 1;
            }
        }
        let t4 = now();
        if stopped.is_err() || started.is_err() {
            log::error!("lifebench: round {k}: stop {stopped:?}, start {started:?}");
            return 1;
        }
        log::info!(
            "lifebench: round={k} stop_call={} peer_gone={} start_at={t2} start_call={} link_up={}",
            t1 - t0,
            t2 - t0,
            t3 - t2,
            t4 - t2
        );
    }
    let ok = exchange(&mut c, bi, rounds);
    let _ = c.send(&[END; 7]);
    log::info!("lifebench: {rounds} rounds, last echo {ok}");
    (!ok) as u64
}

/// Opens the channel whose name is the argument `key`.
fn open_arg(bi: &BootInfo, key: &str) -> Option<Chan> {
    let c = channel::open(bi, bi.arg(key));
    if c.is_none() {
        log::error!("no channel {:?} in my boot info", bi.arg(key));
    }
    c
}

/// Waits (bounded by `ms`) until `c` is up, resynchronising it if it was reset. `false`
/// if it stays down.
fn settle(c: &mut Chan, bi: &BootInfo, ms: u64) -> bool {
    let t = crate::arch::rdtsc();
    loop {
        match c.link() {
            Ok(()) => return true,
            Err(ChannelError::Reset) if c.resync().is_ok() => return true,
            _ => {}
        }
        if crate::arch::rdtsc() - t > ms * bi.tsc_per_ms {
            return false;
        }
        core::hint::spin_loop();
    }
}

/// A forwarder saw one of its channels reset (a neighbour restarted): what was in flight
/// there may be lost. Passed on around the ring to the looper.
const NOTICE: u64 = u64::MAX - 1;

/// `looper`: originates `n` numbered messages around a ring of relays (`to`, `from`), one at
/// a time. When a channel of the ring goes down (a relay restarting: its own channels, or a
/// `NOTICE` from a forwarder further round), the message in flight may be lost with it: the
/// looper waits for its own channels to settle in the new epoch, then gives what was in
/// flight `grace_ms` to come back (a relay downstream may have had it) and counts it lost
/// otherwise; one that comes back after all (its grace is TSC time, which under an
/// emulator whose TSC is host time can be shorter than a starved relay's hop) is told
/// apart: counted back, no longer lost, never twice. After the last message it sends the
/// end marker and waits (bounded) for it to come back round, so that it leaves only after
/// every relay passed it on (leaving earlier would take its channels down under a relay
/// still sending the marker). Exits 0 if every message came back once or was counted lost.
pub fn looper(bi: &BootInfo) -> u64 {
    let n = bi.arg_int("n");
    let grace = bi.arg_int("grace_ms").max(1);
    let (Some(mut to), Some(mut from)) = (open_arg(bi, "to"), open_arg(bi, "from")) else {
        return 1;
    };
    let (mut back, mut lost, mut bad, mut outages) = (0u64, 0u64, 0u64, 0u64);
    // The messages counted lost so far (a few: one a restart), so that a late one is told
    // apart from a duplicate or a stray.
    let mut gone = [u64::MAX; 16];
    let mut seq = 0;
    while seq < n {
        if !settle(&mut to, bi, 5_000) || !settle(&mut from, bi, 5_000) {
            log::error!("loop: the ring did not come back");
            return 1;
        }
        if to.send(&[seq, bi.guest_id as u64, 0, 0, 0, 0, 0]).is_err() {
            continue; // went down before it left: sent again once up
        }
        // Wait for it; a channel of ours going down means a relay died.
        let mut outage = false;
        let mut deadline: Option<u64> = None;
        let got = loop {
            match from.try_recv() {
                Ok(Some(m)) if m[0] == seq => break true,
                Ok(Some(m)) if m[0] == NOTICE => outage = true,
                Ok(Some(m)) if late(&mut gone, m[0]) => {
                    // Counted lost too early: back after all.
                    (back, lost) = (back + 1, lost - 1);
                    log::info!("loop: message {} came back late", m[0]);
                }
                Ok(Some(m)) => {
                    log::error!("loop: message {} while waiting for {seq}", m[0]);
                    bad += 1;
                }
                Ok(None) => {}
                Err(_) => {
                    outage = true;
                    let _ = settle(&mut from, bi, 5_000);
                }
            }
            if to.link().is_err() {
                outage = true;
                let _ = settle(&mut to, bi, 5_000);
            }
            if outage && deadline.is_none() {
                deadline = Some(crate::arch::rdtsc() + grace * bi.tsc_per_ms);
            }
            if deadline.is_some_and(|d| crate::arch::rdtsc() > d) {
                break false;
            }
            core::hint::spin_loop();
        };
        outages += outage as u64;
        if got {
            back += 1;
        } else {
            lost += 1;
            if let Some(g) = gone.iter_mut().find(|g| **g == u64::MAX) {
                *g = seq;
            }
            log::info!("loop: message {seq} lost in a relay's restart (epoch {})", to.epoch);
        }
        seq += 1;
    }
    let _ = to.send(&[END; 7]);
    // The marker back round (a late message first, if any), within 10 s.
    let t = crate::arch::rdtsc();
    let mut ended = false;
    while !ended && crate::arch::rdtsc() - t < 10_000 * bi.tsc_per_ms {
        match from.try_recv() {
            Ok(Some(m)) if m[0] == END => ended = true,
            Ok(Some(m)) if late(&mut gone, m[0]) => {
                (back, lost) = (back + 1, lost - 1);
                log::info!("loop: message {} came back late", m[0]);
            }
            Ok(Some(m)) if m[0] == NOTICE => {}
            Ok(Some(m)) => {
                log::error!("loop: message {} while waiting for the end marker", m[0]);
                bad += 1;
            }
            Ok(None) => core::hint::spin_loop(),
            Err(_) => break,
        }
    }
    if !ended {
        log::error!("loop: the end marker did not come back");
    }
    log::info!("loop: sent {n}, back {back}, lost {lost}, bad {bad}, outages {outages}");
    (back + lost != n || bad != 0 || !ended) as u64
}

/// Whether `seq` was counted lost (`gone`, free entries `u64::MAX`): then it is no longer.
fn late(gone: &mut [u64; 16], seq: u64) -> bool {
    match gone.iter_mut().find(|g| **g == seq && seq != u64::MAX) {
        Some(g) => {
            *g = u64::MAX;
            true
        }
        None => false,
    }
}

/// Sends `m` on `to`, waiting out an outage (bounded); after a reset of `to` (what was in
/// it is gone) a `NOTICE` goes first. `false` if `to` stays down.
fn send_settled(to: &mut Chan, bi: &BootInfo, m: &Payload, outages: &mut u64) -> bool {
    loop {
        match to.send(m) {
            Ok(()) => return true,
            Err(_) => {
                *outages += 1;
                if !settle(to, bi, 5_000) {
                    return false;
                }
                if m[0] != NOTICE && to.send(&[NOTICE; 7]).is_err() {
                    continue;
                }
            }
        }
    }
}

/// `forwarder`: passes every message from `from` to `to`; when either channel goes down
/// (its neighbour restarting) it waits for it to come back in the new epoch and goes on.
/// In its first incarnation it faults on purpose after `die_after` messages (so it is
/// restarted mid-stream). Stops at the end marker, passing it on.
pub fn forwarder(bi: &BootInfo) -> u64 {
    let die_after = bi.arg_int("die_after");
    let (Some(mut to), Some(mut from)) = (open_arg(bi, "to"), open_arg(bi, "from")) else {
        return 1;
    };
    let (mut passed, mut outages) = (0u64, 0u64);
    log::info!("forward: incarnation {} in epochs {}/{}", bi.incarnation, from.epoch, to.epoch);
    loop {
        let m = match from.try_recv() {
            Ok(Some(m)) => m,
            Ok(None) => {
                core::hint::spin_loop();
                continue;
            }
            Err(_) => {
                outages += 1;
                if !settle(&mut from, bi, 5_000) {
                    log::error!("forward: upstream never came back");
                    return 1;
                }
                // What was in that ring is gone: tell the looper, round the ring.
                let _ = send_settled(&mut to, bi, &[NOTICE; 7], &mut outages);
                continue;
            }
        };
        if bi.incarnation == 1 && passed == die_after {
            log::info!("forward: message {} taken, dying with it", m[0]);
            // SAFETY: mapped by our page tables, not by EPT: the hypervisor stops us here.
            unsafe { core::ptr::read_volatile((bi.memory_bytes + (2 << 20)) as *const u64) };
        }
        // Downstream down: what we hold goes once it is back (a message is not dropped by
        // a live relay).
        if !send_settled(&mut to, bi, &m, &mut outages) {
            log::error!("forward: downstream never came back");
            return 1;
        }
        if m[0] == END {
            log::info!("forward: {passed} passed, {outages} outages, end");
            return 0;
        }
        passed += 1;
    }
}
