// SPDX-License-Identifier: MIT OR Apache-2.0
//! Capability transfers between guests, scripted over their channels.
//!
//! `giver` (A), with a granted region in slot 0 and channels to B and C:
//! 1. splits its region, fills the first half and *moves* it to B (announced on the channel);
//! 2. maps the second half, fills it, *copies* it read-only to B and C;
//! 3. after both confirm, *revokes*: the call returns the number of copies taken back; A still
//!    reads its own mapping;
//! 4. checks refusals on the way (forged slot, a memory cap used as an endpoint, a copy with
//!    rights it lacks, the moved slot used again);
//! 5. at the very end reads the address where the moved half used to be mapped: it must be
//!    stopped there.
//!
//! `taker` (B or C): maps what it receives, verifies the content, checks that a read-only
//! copy can be neither mapped writable nor passed on, and after the revoke finds its slot
//! `Revoked` and, reading its old mapping, must be stopped.

use crate::channel::{self, Chan};
use crate::hypercall::{accept_all, call, call3, check, exit_count, first_endpoint, transfer};
use vmcall_proto::guest::BootInfo;
use vmcall_proto::hypercall::{HvError, Hypercall, GRANT_WINDOW};

const MOVED: u64 = 1;
const COPIED: u64 = 2;
const VERIFIED: u64 = 3;
const REVOKED: u64 = 4;
const R: u64 = 1;
const RW: u64 = 3;
/// Read and grant: a copy its holder may copy on (copies of copies).
const RG: u64 = 5;

/// The endpoint-cap slot of the channel called `name` (endpoint caps follow the grants, in
/// boot-info channel order).
fn endpoint(bi: &BootInfo, name: &str) -> Option<u64> {
    let first = first_endpoint()?;
    let pos = bi.channels().iter().position(|d| vmcall_proto::fixed::get(&d.name) == Some(name))?;
    Some(first + pos as u64)
}

fn fill(at: u64, pages: u64, seed: u64) {
    for i in 0..pages {
        // SAFETY: the caller mapped `pages` pages read-write at `at`.
        unsafe { core::ptr::write_volatile((at + i * 4096) as *mut u64, seed ^ i) };
    }
}

fn verify(at: u64, pages: u64, seed: u64) -> bool {
    (0..pages).all(|i| {
        // SAFETY: the caller mapped `pages` pages (at least readable) at `at`.
        let v = unsafe { core::ptr::read_volatile((at + i * 4096) as *const u64) };
        v == seed ^ i
    })
}

fn recv(c: &mut Chan) -> [u64; 7] {
    c.recv().unwrap_or([0; 7])
}

pub fn giver(bi: &BootInfo) -> u64 {
    accept_all(16);
    let mut ok = true;
    let (Some(mut to_b), Some(mut to_c)) =
        (channel::open(bi, Some("ab")), channel::open(bi, Some("ac")))
    else {
        return 1;
    };
    let (Some(ep_b), Some(ep_c)) = (endpoint(bi, "ab"), endpoint(bi, "ac")) else { return 1 };
    let pages = (call(Hypercall::CapIdentify, 0, 0).unwrap_or(0) >> 16) / 2;
    let half = pages * 4096;
    let second = call(Hypercall::CapSplit, 0, half).unwrap_or(99);
    let (w1, w2) = (GRANT_WINDOW.0, GRANT_WINDOW.0 + half);
    // 1. Fill the first half and move it to B.
    check("xfer", "map the first half", call3(Hypercall::CapMap, 0, w1, RW), Ok(0), &mut ok);
    fill(w1, pages, 0xa11ce);
    let moved = transfer(0, ep_b, 0, 2000);
    log::info!("xfer: moved the first half to B: {moved:?}");
    let Ok(b_slot) = moved else { return 1 };
    let _ = to_b.send(&[MOVED, b_slot, 0xa11ce, pages, 0, 0, 0]);
    check(
        "xfer",
        "use the moved slot again",
        call(Hypercall::CapIdentify, 0, 0),
        Err(HvError::NoSuchSlot),
        &mut ok,
    );
    // Refusals: forged slot, a memory cap as the endpoint, rights the cap lacks.
    check(
        "xfer",
        "transfer a forged slot",
        call3(Hypercall::CapTransfer, 40, ep_b, 1 | 1 << 8),
        Err(HvError::NoSuchSlot),
        &mut ok,
    );
    check(
        "xfer",
        "transfer through a memory cap",
        call3(Hypercall::CapTransfer, second, second, 1 | 1 << 8),
        Err(HvError::WrongType),
        &mut ok,
    );
    // 2. Fill the second half; copy it read-only to B and C.
    check("xfer", "map the second half", call3(Hypercall::CapMap, second, w2, RW), Ok(0), &mut ok);
    fill(w2, pages, 0xb0b);
    for (c, ep, who) in [(&mut to_b, ep_b, "B"), (&mut to_c, ep_c, "C")] {
        let r = transfer(second, ep, 1 | R << 8, 2000);
        log::info!("xfer: copied the second half read-only to {who}: {r:?}");
        let Ok(s) = r else { return 1 };
        let _ = c.send(&[COPIED, s, 0xb0b, pages, 0, 0, 0]);
    }
    for c in [&mut to_b, &mut to_c] {
        ok &= recv(c)[0] == VERIFIED;
    }
    // Optionally a third copy to D, which gets itself stopped before the revoke: its core
    // must still take the copy back.
    let copies = 2;
    if let (Some(mut to_d), Some(ep_d)) = (channel::open(bi, Some("ad")), endpoint(bi, "ad")) {
        let r = transfer(second, ep_d, 1 | R << 8, 2000);
        log::info!("xfer: copied the second half read-only to D: {r:?}");
        let Ok(s) = r else { return 1 };
        let _ = to_d.send(&[COPIED, s, 0xb0b, pages, 0, 0, 0]);
        ok &= recv(&mut to_d)[0] == VERIFIED;
        // Read: D may stop now (before this, its death could race this receive).
        let _ = to_d.send(&[DONE, 0, 0, 0, 0, 0, 0]);
        // D stops itself right after confirming. Its death takes its copy with it (a clean
        // death drops what it held), so the revoke below finds two copies, not three, once
        // D's core has handled it: it retires D's capabilities, then takes D's links down,
        // and the link to D shows the peer gone. Waited for as that event, not as a time
        // (a fixed 200 ms was too short where a vCPU can be starved longer: QEMU's TCG on a
        // loaded host, whose TSC is host time); bounded at 10 s.
        let t = crate::arch::rdtsc();
        while to_d.link().is_ok() && crate::arch::rdtsc() - t < 10_000 * bi.tsc_per_ms {
            core::hint::spin_loop();
        }
        let gone = to_d.link() == Err(channel::ChannelError::PeerGone);
        log::info!("xfer: D's link shows it gone before the revoke: {gone}");
        ok &= gone;
    }
    // 3. Revoke: every copy gone everywhere before the call returns.
    let n = call(Hypercall::CapRevoke, second, 0);
    check("xfer", "revoke the copies", n, Ok(copies), &mut ok);
    let mine = verify(w2, pages, 0xb0b);
    log::info!("xfer: after the revoke my own mapping still reads back: {mine}");
    ok &= mine;
    for c in [&mut to_b, &mut to_c] {
        let _ = c.send(&[REVOKED, 0, 0, 0, 0, 0, 0]);
    }
    for c in [&mut to_b, &mut to_c] {
        ok &= recv(c)[0] == VERIFIED;
    }
    if !ok {
        return 1;
    }
    // 5. The moved half is no longer ours: reading where it was must stop us.
    log::info!("xfer: all checks passed; reading {w1:#x}, where the moved half was");
    // SAFETY: deliberately touching memory moved away from us.
    let v = unsafe { core::ptr::read_volatile(w1 as *const u64) };
    log::error!("xfer: read {v:#x} from a moved region");
    1
}

pub fn taker(bi: &BootInfo) -> u64 {
    accept_all(16);
    let mut ok = true;
    let Some(mut from_a) = channel::open(bi, None) else { return 1 };
    let ep = first_endpoint().unwrap_or(0);
    let base = GRANT_WINDOW.0;
    let mut copy_at = 0;
    let mut copy_slot = 0;
    loop {
        let m = recv(&mut from_a);
        match m[0] {
            MOVED => {
                check(
                    "xfer",
                    "map the moved region",
                    call3(Hypercall::CapMap, m[1], base, RW),
                    Ok(0),
                    &mut ok,
                );
                let good = verify(base, m[3], m[2]);
                log::info!("xfer: the moved region holds A's data: {good}");
                ok &= good;
            }
            COPIED => {
                copy_slot = m[1];
                copy_at = base + (m[3] * 4096).max(2 << 20);
                let info = call(Hypercall::CapIdentify, copy_slot, 0).unwrap_or(0);
                log::info!(
                    "xfer: got a copy in slot {copy_slot}, rights {:#b}",
                    (info >> 8) & 0xff
                );
                check(
                    "xfer",
                    "map the read-only copy writable",
                    call3(Hypercall::CapMap, copy_slot, copy_at, RW),
                    Err(HvError::RightsEscalation),
                    &mut ok,
                );
                check(
                    "xfer",
                    "pass the copy on",
                    call3(Hypercall::CapTransfer, copy_slot, ep, 1 | R << 8),
                    Err(HvError::RightsEscalation),
                    &mut ok,
                );
                check(
                    "xfer",
                    "map the copy read-only",
                    call3(Hypercall::CapMap, copy_slot, copy_at, R),
                    Ok(0),
                    &mut ok,
                );
                let good = verify(copy_at, m[3], m[2]);
                log::info!("xfer: the copy holds A's data: {good}");
                ok &= good;
                let _ = from_a.send(&[VERIFIED, 0, 0, 0, 0, 0, 0]);
            }
            REVOKED => {
                check(
                    "xfer",
                    "identify the revoked copy",
                    call(Hypercall::CapIdentify, copy_slot, 0),
                    Err(HvError::Revoked),
                    &mut ok,
                );
                let _ = from_a.send(&[VERIFIED, 0, 0, 0, 0, 0, 0]);
                break;
            }
            other => {
                log::error!("xfer: unexpected message {other}");
                return 1;
            }
        }
    }
    if !ok {
        return 1;
    }
    log::info!("xfer: all checks passed; reading {copy_at:#x}, where the revoked copy was");
    // SAFETY: deliberately touching a mapping that was revoked: must be stopped here.
    let v = unsafe { core::ptr::read_volatile(copy_at as *const u64) };
    log::error!("xfer: read {v:#x} from a revoked copy");
    1
}

/// `racer`: two guests each copy their granted region to the other, map the other's copy,
/// then revoke at the same moment: two revokes crossing between two cores. Each must
/// return 1 (its one copy), find the peer's copy revoked, and keep its own region.
pub fn racer(bi: &BootInfo) -> u64 {
    accept_all(16);
    let mut ok = true;
    let Some(mut ch) = channel::open(bi, None) else { return 1 };
    let Some(ep) = first_endpoint() else { return 1 };
    let pages = call(Hypercall::CapIdentify, 0, 0).unwrap_or(0) >> 16;
    let (mine, theirs) = (GRANT_WINDOW.0, GRANT_WINDOW.0 + (pages << 12));
    check("xfer", "map my region", call3(Hypercall::CapMap, 0, mine, RW), Ok(0), &mut ok);
    fill(mine, pages, bi.guest_id as u64);
    let copy = transfer(0, ep, 1 | R << 8, 2000);
    let Ok(slot) = copy else {
        log::error!("xfer: copy to my peer failed: {copy:?}");
        return 1;
    };
    let _ = ch.send(&[COPIED, slot, bi.guest_id as u64, pages, 0, 0, 0]);
    let m = recv(&mut ch);
    check("xfer", "map my peer's copy", call3(Hypercall::CapMap, m[1], theirs, R), Ok(0), &mut ok);
    ok &= verify(theirs, m[3], m[2]);
    // Meet, then revoke together.
    let _ = ch.send(&[VERIFIED, 0, 0, 0, 0, 0, 0]);
    ok &= recv(&mut ch)[0] == VERIFIED;
    check("xfer", "revoke while my peer revokes", call(Hypercall::CapRevoke, 0, 0), Ok(1), &mut ok);
    let _ = ch.send(&[REVOKED, 0, 0, 0, 0, 0, 0]);
    ok &= recv(&mut ch)[0] == REVOKED;
    check(
        "xfer",
        "identify my peer's revoked copy",
        call(Hypercall::CapIdentify, m[1], 0),
        Err(HvError::Revoked),
        &mut ok,
    );
    ok &= verify(mine, pages, bi.guest_id as u64);
    log::info!(
        "xfer: racing revokes done; my own region intact: {}",
        verify(mine, pages, bi.guest_id as u64)
    );
    if ok {
        0
    } else {
        1
    }
}

const DONE: u64 = 5;

fn ticks<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let t = crate::arch::rdtsc();
    let r = f();
    (r, crate::arch::rdtsc() - t)
}

/// `capowner` (benchmark): costs of map, unmap, copy to each of its `k` holders (every
/// channel it has), revoke of all copies, and a move; printed as one `bench caps` line.
/// The copies carry GRANT: a `holder` with channels of its own copies its copy on (copies
/// of copies), and says how many holders its copy reached; the revoke must take back all
/// of them (`holders=` on the `caps-exits` line).
pub fn capowner(bi: &BootInfo) -> u64 {
    accept_all(16);
    let k = bi.channels().len();
    let Some(first_ep) = first_endpoint() else { return 1 };
    let mut chans: [Option<Chan>; 16] = Default::default();
    for (i, c) in chans.iter_mut().enumerate().take(k) {
        *c = channel::open(bi, vmcall_proto::fixed::get(&bi.channels()[i].name));
    }
    let w = GRANT_WINDOW.0;
    let whole_kib = (call(Hypercall::CapIdentify, 0, 0).unwrap_or(0) >> 16) * 4;
    // The whole grant (2 MiB in the bench configs: one large EPT page), mapped and unmapped
    // twice: the first map is this guest's first, then a repeat; then 4 KiB off a 2-MiB
    // boundary (4-KiB EPT pages).
    let mut whole = [0u64; 6];
    for (i, pair) in whole.chunks_mut(2).enumerate() {
        let at = if i == 2 { w + 4096 } else { w };
        let (r, map) = ticks(|| call3(Hypercall::CapMap, 0, at, RW));
        let (u, unmap) = ticks(|| call(Hypercall::CapUnmap, 0, 0));
        if r.is_err() || u.is_err() {
            log::error!("bench caps: whole map {r:?} unmap {u:?}");
            return 1;
        }
        pair.copy_from_slice(&[map, unmap]);
    }
    let half = (call(Hypercall::CapIdentify, 0, 0).unwrap_or(0) >> 16) / 2 * 4096;
    let spare = call(Hypercall::CapSplit, 0, half).unwrap_or(99);
    // Its first half (4-KiB pages where the half is not 2-MiB sized), twice as well.
    let mut halves = [0u64; 4];
    // The exits of these two maps and two unmaps, off the telemetry page (no exit: an
    // `exit_count` hypercall here would add the run loop's fold of the fast path's count
    // to the first map's time).
    let e_maps = guestkernel::telemetry::exits();
    for pair in halves.chunks_mut(2) {
        let (r, map) = ticks(|| call3(Hypercall::CapMap, 0, w, RW));
        let (u, unmap) = ticks(|| call(Hypercall::CapUnmap, 0, 0));
        if r.is_err() || u.is_err() {
            log::error!("bench caps: map {r:?} unmap {u:?}");
            return 1;
        }
        pair.copy_from_slice(&[map, unmap]);
    }
    let map_unmap_exits = guestkernel::telemetry::exits() - e_maps;
    let [map, unmap, map_again, unmap_again] = halves;
    let [map_whole, unmap_whole, map_whole_again, unmap_whole_again, map_whole_4k, unmap_whole_4k] =
        whole;
    let mut copy_total = 0;
    for (i, chan) in chans.iter_mut().enumerate().take(k) {
        let (s, t) = ticks(|| transfer(0, first_ep + i as u64, 1 | RG << 8, 2000));
        copy_total += t;
        let Ok(s) = s else {
            log::error!("bench caps: copy to holder {i}: {s:?}");
            return 1;
        };
        if let Some(c) = chan.as_mut() {
            let _ = c.send(&[COPIED, s, 0, half / 4096, 0, 0, 0]);
        }
    }
    // Every holder reached: the direct ones and those they copied on to.
    let mut holders = 0u64;
    for c in chans.iter_mut().take(k).flatten() {
        let m = recv(c);
        if m[0] != VERIFIED {
            return 1;
        }
        holders += m[1].max(1);
    }
    let e0 = exit_count();
    let (n, revoke) = ticks(|| call(Hypercall::CapRevoke, 0, 0));
    let revoke_exits = exit_count() - e0 - 1;
    if n != Ok(holders) {
        log::error!("bench caps: revoke returned {n:?} for {holders} copies");
        return 1;
    }
    let (m, mv) = ticks(|| transfer(spare, first_ep, 0, 2000));
    if m.is_err() {
        log::error!("bench caps: move: {m:?}");
        return 1;
    }
    for c in chans.iter_mut().take(k).flatten() {
        let _ = c.send(&[DONE, 0, 0, 0, 0, 0, 0]);
    }
    log::info!(
        "bench caps k={k} map={map} unmap={unmap} map_again={map_again} unmap_again={unmap_again} \
         map_whole={map_whole} unmap_whole={unmap_whole} map_whole_again={map_whole_again} \
         unmap_whole_again={unmap_whole_again} map_whole_4k={map_whole_4k} \
         unmap_whole_4k={unmap_whole_4k} whole_kib={whole_kib} copy={} revoke={revoke} \
         revoke_exits={revoke_exits} move={mv}",
        copy_total / k.max(1) as u64
    );
    // A line of its own (the one above reaches the console's 256 characters, and passes
    // them where the TSC is host time).
    // The revoke's latency again: under QEMU (TSC = host time) the line above passes the
    // console's 256 characters and loses its end.
    log::info!(
        "bench caps-exits map_unmap_exits={map_unmap_exits} revoke_exits={revoke_exits} \
         holders={holders} revoke={revoke}"
    );
    0
}

/// `holder` (benchmark): maps the copy it is given, reads it, confirms, and keeps running
/// (polling its channel) until told it is done, so the revoke reaches a running guest.
/// Its first channel leads to whoever gives it the copy; if it has more (a relay), it
/// copies its copy on, read-only, over each of the others to a holder of its own, waits
/// for theirs to confirm, and confirms with the number of holders below and including it
/// (copies of copies: the owner's revoke must reach them all); it passes `DONE` on.
pub fn holder(bi: &BootInfo) -> u64 {
    accept_all(16);
    let Some(mut c) = channel::open(bi, None) else { return 1 };
    let n = bi.channels().len().min(16);
    let mut below: [Option<Chan>; 16] = Default::default();
    for (i, b) in below.iter_mut().enumerate().take(n).skip(1) {
        *b = channel::open_index(bi, i);
    }
    loop {
        let m = recv(&mut c);
        match m[0] {
            COPIED => {
                if call3(Hypercall::CapMap, m[1], GRANT_WINDOW.0, R).is_err() {
                    return 1;
                }
                // The cap was just mapped read-only at the grant window's first page.
                // SAFETY: an aligned read of a page this guest has mapped readable.
                let _ = unsafe { core::ptr::read_volatile(GRANT_WINDOW.0 as *const u64) };
                let mut reached = 1u64;
                if n > 1 {
                    let Some(first_ep) = first_endpoint() else { return 1 };
                    for (i, b) in below.iter_mut().enumerate().take(n).skip(1) {
                        let s = transfer(m[1], first_ep + i as u64, 1 | R << 8, 2000);
                        let Ok(s) = s else {
                            log::error!("holder: copy on to channel {i}: {s:?}");
                            return 1;
                        };
                        if let Some(b) = b.as_mut() {
                            let _ = b.send(&[COPIED, s, 0, m[3], 0, 0, 0]);
                        }
                    }
                    for b in below.iter_mut().take(n).flatten() {
                        let a = recv(b);
                        if a[0] != VERIFIED {
                            return 1;
                        }
                        reached += a[1].max(1);
                    }
                }
                let _ = c.send(&[VERIFIED, reached, 0, 0, 0, 0, 0]);
            }
            DONE => {
                for b in below.iter_mut().take(n).flatten() {
                    let _ = b.send(&[DONE, 0, 0, 0, 0, 0, 0]);
                }
                return 0;
            }
            _ => {}
        }
    }
}

/// `doomed`: takes a copy, maps and verifies it, confirms, then reads outside its memory and
/// is stopped, still holding the copy: the revoke must not depend on it.
pub fn doomed(bi: &BootInfo) -> u64 {
    accept_all(16);
    let Some(mut c) = channel::open(bi, None) else { return 1 };
    let m = recv(&mut c);
    let at = GRANT_WINDOW.0;
    let mapped = call3(Hypercall::CapMap, m[1], at, R);
    let good = mapped.is_ok() && verify(at, m[3], m[2]);
    log::info!(
        "xfer: got my copy, mapped {mapped:?}, holds A's data: {good}; now faulting on purpose"
    );
    let _ = c.send(&[VERIFIED, 0, 0, 0, 0, 0, 0]);
    // Stopped only once the giver has read the confirmation (it says so), at most 10 s
    // later: a death right after the send could race the giver's receive (seen on Bochs,
    // the giver's `recv` finding the link gone and the confirmation not taken).
    // Polled, not `recv_until`: the giver's channel is in polling mode and never rings a
    // doorbell, so a sleep would last to the deadline (it did on SVM once the backend kept
    // a halted guest halted: before, any exit woke it).
    let deadline = crate::arch::rdtsc().saturating_add(10_000 * bi.tsc_per_ms);
    let read = loop {
        match c.try_recv() {
            Ok(None) if crate::arch::rdtsc() < deadline => core::hint::spin_loop(),
            other => break other,
        }
    };
    log::info!(
        "xfer: the giver read my confirmation: {}",
        matches!(read, Ok(Some(m)) if m[0] == DONE)
    );
    // SAFETY: deliberately out of bounds: the hypervisor stops this guest here.
    let v = unsafe { core::ptr::read_volatile((bi.memory_bytes + (2 << 20)) as *const u64) };
    log::error!("xfer: read {v:#x} outside my memory");
    1
}
