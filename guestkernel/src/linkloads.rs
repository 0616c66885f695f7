// SPDX-License-Identifier: MIT OR Apache-2.0
//! Workloads for channels whose peer comes and goes.
//!
//! * `streamer`: sends `n` numbered messages, one at a time, each echoed back by its peer.
//!   When the peer dies (`PeerGone`) the message it was waiting on is counted lost; it waits
//!   (bounded) for the peer's new incarnation, resynchronises and goes on with the next
//!   number. It checks every echo (the number it sent, in order, never twice) and exits 0 if
//!   every message was echoed once or counted lost.
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
                if !rejoin(&mut c, bi, 5_000) {
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
