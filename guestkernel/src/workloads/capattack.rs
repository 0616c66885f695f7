// SPDX-License-Identifier: MIT OR Apache-2.0
//! Hostile guests against the capability system, one per class of break found before
//! (configs under `configs/hostile/caps-*.toml`, asserted by `tests/hostile_caps.rs`).
//! Every outcome line reads `capattack: <what>: <result> as expected` (or `ERROR ...`).
//!
//! * `revoker` (owner) copies its grant read-only to a `splitter` and with GRANT to a
//!   `passer`; the splitter splits its copy in three and maps the pieces, the passer tries
//!   to move its copy on (refused: only originals move) and copies it to a `far` guest.
//!   The owner's revoke must take back all of it, split pieces and copies of copies
//!   included (`Ok(3)`), and each holder reading its old mapping afterwards is stopped.
//! * `flooder` fires thousands of copies at a `quiet` guest that never accepted any: all
//!   refused, and the quiet guest's space and budget untouched; then the quiet guest
//!   accepts, the flooder fills its free slots, revokes them all, and the quiet guest's
//!   slots are usable again (revoked slots are reused).
//! * `revoker` with `deaf = 1`: one holder's core stops answering (fault injection);
//!   the owner's revoke returns `Timeout` within the deadline, and the run finishes.

use crate::channel::{self, Chan};
use crate::hypercall::{accept_all, call, call3, check, first_endpoint, transfer};
use vmcall_proto::guest::BootInfo;
use vmcall_proto::hypercall::{HvError, Hypercall, GRANT_WINDOW};

const READY: u64 = 1;
const REVOKED: u64 = 2;
const GO: u64 = 3;
const DONE: u64 = 4;
const R: u64 = 1;
const RW: u64 = 3;
const RG: u64 = 5;

fn recv(c: &mut Chan) -> [u64; 7] {
    c.recv().unwrap_or([0; 7])
}

fn send(c: &mut Chan, what: u64, a: u64) {
    let _ = c.send(&[what, a, 0, 0, 0, 0, 0]);
}

/// The endpoint handle of the channel called `name`.
fn endpoint(bi: &BootInfo, name: &str) -> Option<u64> {
    let first = first_endpoint()?;
    let pos = bi.channels().iter().position(|d| vmcall_proto::fixed::get(&d.name) == Some(name))?;
    Some(first + pos as u64)
}

fn peek(at: u64) -> u64 {
    // SAFETY: the caller mapped at least one readable page at `at`.
    unsafe { core::ptr::read_volatile(at as *const u64) }
}

/// Reads where a revoked copy was mapped: the hypervisor must stop this guest here.
fn touch_revoked(at: u64) -> u64 {
    log::info!("capattack: reading {at:#x}, where my revoked copy was mapped");
    let v = peek(at);
    log::error!("capattack: ERROR read {v:#x} through a revoked copy");
    1
}

/// The owner. Channels: `os` to the splitter, `op` to the passer (and, with `deaf`, the
/// splitter's core is the silent one).
pub fn revoker(bi: &BootInfo) -> u64 {
    let mut ok = true;
    let deaf = bi.arg_int("deaf") == 1;
    let (Some(mut s), Some(mut p)) = (channel::open(bi, Some("os")), channel::open(bi, Some("op")))
    else {
        return 1;
    };
    let (Some(ep_s), Some(ep_p)) = (endpoint(bi, "os"), endpoint(bi, "op")) else { return 1 };
    let w = GRANT_WINDOW.0;
    check("capattack", "map my region", call3(Hypercall::CapMap, 0, w, RW), Ok(0), &mut ok);
    // SAFETY: mapped read-write just above.
    unsafe { core::ptr::write_volatile(w as *mut u64, 0x0a11) };
    let to_s = transfer(0, ep_s, 1 | R << 8, 2000);
    let to_p = transfer(0, ep_p, 1 | RG << 8, 2000);
    log::info!("capattack: copies sent: {to_s:?} {to_p:?}");
    let (Ok(hs), Ok(hp)) = (to_s, to_p) else { return 1 };
    send(&mut s, GO, hs);
    send(&mut p, GO, hp);
    ok &= recv(&mut s)[0] == READY;
    ok &= recv(&mut p)[0] == READY;
    let want = if deaf { Err(HvError::Timeout) } else { Ok(3) };
    let what = if deaf {
        "revoke while one holder's core is silent"
    } else {
        "revoke split pieces and copies of copies"
    };
    check("capattack", what, call(Hypercall::CapRevoke, 0, 0), want, &mut ok);
    // What the owner writes from now on is for nobody else.
    // SAFETY: still mapped read-write: revoke takes back copies, not the original.
    unsafe { core::ptr::write_volatile(w as *mut u64, 0x5ec2e7) };
    check("capattack", "my own mapping after the revoke", Ok(peek(w)), Ok(0x5ec2e7), &mut ok);
    if deaf {
        check(
            "capattack",
            "copy to a fenced core",
            call3(Hypercall::CapTransfer, 0, ep_s, 1 | R << 8),
            Err(HvError::PeerGone),
            &mut ok,
        );
        // The copy on the fenced core was not confirmed gone: its record is back, so a new
        // revoke reports it again rather than claim success.
        check(
            "capattack",
            "revoke again: the unconfirmed copy is still reported",
            call(Hypercall::CapRevoke, 0, 0),
            Err(HvError::Timeout),
            &mut ok,
        );
    }
    send(&mut s, REVOKED, 0);
    send(&mut p, REVOKED, 0);
    if ok {
        log::info!("capattack: owner done");
        0
    } else {
        1
    }
}

/// Holds a read-only copy (no GRANT), splits it in three, maps every piece.
pub fn splitter(bi: &BootInfo) -> u64 {
    accept_all(4);
    let mut ok = true;
    let Some(mut o) = channel::open(bi, None) else { return 1 };
    let m = recv(&mut o);
    if m[0] != GO {
        return 1;
    }
    let h = m[1];
    let pages = call(Hypercall::CapIdentify, h, 0).unwrap_or(0) >> 16;
    let third = (pages / 3).max(1) * 4096;
    let h2 = call(Hypercall::CapSplit, h, third);
    let h3 = h2.and_then(|h2| call(Hypercall::CapSplit, h2, third));
    log::info!("capattack: split my read-only copy: {h2:?} {h3:?}");
    let (Ok(h2), Ok(h3)) = (h2, h3) else { return 1 };
    let w = GRANT_WINDOW.0;
    for (i, piece) in [h, h2, h3].into_iter().enumerate() {
        let at = w + i as u64 * (4 << 20);
        check("capattack", "map a piece", call3(Hypercall::CapMap, piece, at, R), Ok(0), &mut ok);
    }
    check("capattack", "the owner's data through my copy", Ok(peek(w)), Ok(0x0a11), &mut ok);
    send(&mut o, READY, 0);
    let deaf = bi.arg_int("deaf") == 1;
    if recv(&mut o)[0] != REVOKED || !ok {
        return 1;
    }
    if deaf {
        // This core never served the revoke: the copy is still here. Nothing to prove.
        log::info!("capattack: my core was silent; ending");
        return 0;
    }
    check(
        "capattack",
        "identify a revoked piece",
        call(Hypercall::CapIdentify, h3, 0),
        Err(HvError::Revoked),
        &mut ok,
    );
    if !ok {
        return 1;
    }
    touch_revoked(w + 2 * (4 << 20))
}

/// Holds a copy with GRANT: may not move it on (only originals move), copies it on.
pub fn passer(bi: &BootInfo) -> u64 {
    accept_all(4);
    let mut ok = true;
    let (Some(mut o), Some(mut f)) = (channel::open(bi, Some("op")), channel::open(bi, Some("pf")))
    else {
        return 1;
    };
    let Some(ep_f) = endpoint(bi, "pf") else { return 1 };
    let m = recv(&mut o);
    if m[0] != GO {
        return 1;
    }
    let h = m[1];
    check(
        "capattack",
        "move a copy on",
        transfer(h, ep_f, 0, 2000),
        Err(HvError::NotOwner),
        &mut ok,
    );
    check(
        "capattack",
        "copy with more rights than mine",
        call3(Hypercall::CapTransfer, h, ep_f, 1 | 7 << 8),
        Err(HvError::RightsEscalation),
        &mut ok,
    );
    let c = transfer(h, ep_f, 1 | R << 8, 2000);
    log::info!("capattack: copied my copy on: {c:?}");
    let Ok(hf) = c else { return 1 };
    send(&mut f, GO, hf);
    ok &= recv(&mut f)[0] == READY;
    send(&mut o, READY, 0);
    ok &= recv(&mut o)[0] == REVOKED;
    check(
        "capattack",
        "identify my revoked copy",
        call(Hypercall::CapIdentify, h, 0),
        Err(HvError::Revoked),
        &mut ok,
    );
    send(&mut f, REVOKED, 0);
    if ok {
        0
    } else {
        1
    }
}

/// The copy of a copy's holder.
pub fn far(bi: &BootInfo) -> u64 {
    accept_all(4);
    let mut ok = true;
    let Some(mut p) = channel::open(bi, None) else { return 1 };
    let m = recv(&mut p);
    if m[0] != GO {
        return 1;
    }
    let w = GRANT_WINDOW.0;
    check(
        "capattack",
        "map the copy of a copy",
        call3(Hypercall::CapMap, m[1], w, R),
        Ok(0),
        &mut ok,
    );
    check("capattack", "the owner's data two copies away", Ok(peek(w)), Ok(0x0a11), &mut ok);
    send(&mut p, READY, 0);
    if recv(&mut p)[0] != REVOKED || !ok {
        return 1;
    }
    touch_revoked(w)
}

/// Fires copies at a guest that never accepted any; then fills its free slots once it
/// does, and revokes them.
pub fn flooder(bi: &BootInfo) -> u64 {
    let mut ok = true;
    let Some(mut q) = channel::open(bi, None) else { return 1 };
    let Some(ep) = first_endpoint() else { return 1 };
    let n = bi.arg_int("n");
    let refused = (0..n)
        .filter(|_| {
            call3(Hypercall::CapTransfer, 0, ep, 1 | R << 8) == Err(Ok(HvError::NotAccepted))
        })
        .count() as u64;
    check(
        "capattack",
        "copies at a guest that accepted none: refused",
        Ok(refused),
        Ok(n),
        &mut ok,
    );
    send(&mut q, GO, 0);
    // The quiet guest now accepts plenty; fill what room it has.
    if recv(&mut q)[0] != READY {
        return 1;
    }
    let mut sent = 0;
    let last = loop {
        match call3(Hypercall::CapTransfer, 0, ep, 1 | R << 8) {
            Ok(_) => sent += 1,
            Err(e) => break e,
        }
    };
    log::info!("capattack: filled the quiet guest with {sent} copies, then {last:?}");
    ok &= last == Ok(HvError::NoSpace) || last == Ok(HvError::TooManyCopies);
    check("capattack", "take them all back", call(Hypercall::CapRevoke, 0, 0), Ok(sent), &mut ok);
    send(&mut q, DONE, sent);
    ok &= recv(&mut q)[0] == DONE;
    if ok {
        0
    } else {
        1
    }
}

/// Minds its own business while being flooded; its space stays its own.
pub fn quiet(bi: &BootInfo) -> u64 {
    let mut ok = true;
    let Some(mut f) = channel::open(bi, None) else { return 1 };
    // Work while the flood goes on (CPU-bound: any time the hypervisor spent on the flood
    // is visible as `foreign_tsc` in the report, not charged to this guest's budget).
    let mut acc = 0u64;
    while f.try_recv().ok().flatten().is_none() {
        for i in 0..1000u64 {
            acc = acc.wrapping_mul(31).wrapping_add(i);
        }
    }
    log::info!("capattack: worked through the flood ({acc:#x})");
    // All its slots are free but the grant's and the endpoint's: split the grant 16 ways.
    let mut h = 0;
    let mut splits = 0;
    for _ in 0..16 {
        match call(Hypercall::CapSplit, h, 4096) {
            Ok(n) => {
                h = n;
                splits += 1;
            }
            Err(_) => break,
        }
    }
    check("capattack", "split my grant after the flood", Ok(splits), Ok(16), &mut ok);
    accept_all(100);
    send(&mut f, READY, 0);
    if recv(&mut f)[0] != DONE {
        return 1;
    }
    // Every copy was revoked: those slots are free for this guest again.
    let mut more = 0;
    for _ in 0..40 {
        if let Ok(n) = call(Hypercall::CapSplit, h, 4096) {
            h = n;
            more += 1;
        }
    }
    check("capattack", "split again into the revoked slots", Ok(more), Ok(40), &mut ok);
    send(&mut f, DONE, 0);
    if ok {
        0
    } else {
        1
    }
}
