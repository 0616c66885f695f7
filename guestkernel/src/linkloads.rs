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
use vmcall_proto::channel::ChannelError;
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
    let mut seq = 0;
    while seq < n {
        let r = c.send(&[seq, bi.guest_id as u64, 0, 0, 0, 0, 0]).and_then(|()| c.recv());
        match r {
            Ok(m) if m[0] == seq => echoed += 1,
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
                            "stream: peer gone for good: sent {sent} of {n}, echoed {echoed}, lost {lost}, bad {bad}"
                        );
                        return (echoed + lost != sent || bad != 0) as u64;
                    }
                    log::error!("stream: the peer did not come back");
                    return 1;
                }
                log::info!("stream: rejoined in epoch {} at message {}", c.epoch, seq + 1);
            }
            Err(e) => {
                log::error!("stream: message {seq}: {e:?}");
                return 1;
            }
        }
        seq += 1;
    }
    let _ = c.send(&[END; 7]);
    log::info!("stream: sent {n}, echoed {echoed}, lost {lost} in {resets} resets, bad {bad}");
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
