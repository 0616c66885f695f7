// SPDX-License-Identifier: MIT OR Apache-2.0
//! `pool`: uses the memory capability its config grants it (slot 0) and checks every
//! answer the hypervisor gives: identify, split, map read-write, write and read back, unmap,
//! map read-only, and the refusals (forged slot, busy address, misaligned address, outside
//! the grant window, GRANT as a mapping right, splitting a mapped cap, mapping an endpoint).
//! With `touch_after_unmap=1` it finally reads its region after unmapping it, and must be
//! stopped there.
//!
//! Exit status 0 when every answer was the expected one, 1 otherwise.

use crate::hypercall::{call, call3, check};
use vmcall_proto::guest::BootInfo;
use vmcall_proto::hypercall::{HvError, Hypercall, GRANT_WINDOW};

const R: u64 = 1;
const RW: u64 = 3;

pub fn pool(bi: &BootInfo) -> u64 {
    let mut ok = true;
    let base = GRANT_WINDOW.0;
    let info = call(Hypercall::CapIdentify, 0, 0);
    let Ok(info) = info else {
        log::error!("cap: no capability in slot 0: {info:?}");
        return 1;
    };
    let (kind, rights, pages) = (info & 0xff, (info >> 8) & 0xff, info >> 16);
    log::info!("cap: slot 0 is type {kind}, rights {rights:#b}, {} KiB", pages * 4);
    ok &= kind == 1 && rights == 0b111 && pages >= 512;
    let half = pages / 2 * 4096;
    check(
        "cap",
        "split slot 0 in half",
        call(Hypercall::CapSplit, 0, half),
        Ok(1 + bi.channel_count as u64),
        &mut ok,
    );
    let second = 1 + bi.channel_count as u64;
    check("cap", "map slot 0 read-write", call3(Hypercall::CapMap, 0, base, RW), Ok(0), &mut ok);
    // SAFETY: slot 0 is now mapped read-write at `base` for `half` bytes (checked above).
    unsafe {
        for i in 0..(half / 4096) {
            core::ptr::write_volatile((base + i * 4096) as *mut u64, 0x5eed_0000 + i);
        }
    }
    // SAFETY: as above.
    let back = unsafe { core::ptr::read_volatile((base + half - 4096) as *const u64) };
    ok &= back == 0x5eed_0000 + half / 4096 - 1;
    log::info!("cap: wrote {} pages through the mapping, read back {back:#x}", half / 4096);
    check(
        "cap",
        "identify a forged slot",
        call(Hypercall::CapIdentify, 40, 0),
        Err(HvError::NoSuchSlot),
        &mut ok,
    );
    check(
        "cap",
        "map over a busy address",
        call3(Hypercall::CapMap, second, base, R),
        Err(HvError::AddressInUse),
        &mut ok,
    );
    check(
        "cap",
        "map misaligned",
        call3(Hypercall::CapMap, second, base + half + 0x800, R),
        Err(HvError::Misaligned),
        &mut ok,
    );
    check(
        "cap",
        "map outside the grant window",
        call3(Hypercall::CapMap, second, 0x4000_0000, R),
        Err(HvError::BadAddress),
        &mut ok,
    );
    check(
        "cap",
        "map with GRANT as a right",
        call3(Hypercall::CapMap, second, base + half, 4),
        Err(HvError::BadArgument),
        &mut ok,
    );
    check(
        "cap",
        "split a mapped cap",
        call(Hypercall::CapSplit, 0, 4096),
        Err(HvError::AlreadyMapped),
        &mut ok,
    );
    if bi.channel_count > 0 {
        let ep = 1;
        let t = call(Hypercall::CapIdentify, ep, 0).map(|i| i & 0xff);
        check("cap", "identify the channel endpoint", t, Ok(2), &mut ok);
        check(
            "cap",
            "map an endpoint",
            call3(Hypercall::CapMap, ep, base + half, R),
            Err(HvError::WrongType),
            &mut ok,
        );
    }
    check("cap", "unmap slot 0", call(Hypercall::CapUnmap, 0, 0), Ok(base), &mut ok);
    check(
        "cap",
        "unmap it again",
        call(Hypercall::CapUnmap, 0, 0),
        Err(HvError::NotMapped),
        &mut ok,
    );
    check(
        "cap",
        "map slot 0 read-only",
        call3(Hypercall::CapMap, 0, base + half, R),
        Ok(0),
        &mut ok,
    );
    // SAFETY: slot 0 is mapped read-only at `base + half`; reading is allowed.
    let again = unsafe { core::ptr::read_volatile((base + half) as *const u64) };
    ok &= again == 0x5eed_0000;
    log::info!("cap: the same memory, read-only at {:#x}: {again:#x}", base + half);
    check("cap", "unmap slot 0 again", call(Hypercall::CapUnmap, 0, 0), Ok(base + half), &mut ok);
    if bi.arg_int("touch_after_unmap") == 1 {
        log::info!("cap: reading {base:#x} after unmapping it");
        // SAFETY: deliberately touching memory no longer mapped for us: must be stopped.
        let v = unsafe { core::ptr::read_volatile(base as *const u64) };
        log::error!("cap: read {v:#x} after unmap: the mapping survived");
        return 1;
    }
    if ok {
        0
    } else {
        1
    }
}

/// `bigmap`: maps its whole grant (slot 0) `rounds` times at `offset_kib` into the grant
/// window (4 KiB: every page a 4-KiB EPT entry, the longest mapping a cap can have; 0:
/// 2-MiB pages), touches its first and last page, unmaps it, and prints how long each map
/// and unmap took (TSC ticks, one per instruction in Bochs). Its core must keep answering
/// the other cores meanwhile: a test runs it with a small `probe_ms` and checks no core is
/// suspected. Exit status 0 when every call answered as expected.
pub fn bigmap(bi: &BootInfo) -> u64 {
    match bi.arg_word("role") {
        "owner" => return bigmap_owner(bi),
        "holder" => return bigmap_holder(bi),
        _ => {}
    }
    let mut ok = true;
    let Ok(info) = call(Hypercall::CapIdentify, 0, 0) else {
        log::error!("bigmap: no capability in slot 0");
        return 1;
    };
    let bytes = (info >> 16) * 4096;
    let at = GRANT_WINDOW.0 + bi.arg_int("offset_kib") * 1024;
    let rounds = bi.arg_int("rounds").max(1);
    for round in 0..rounds {
        let t0 = crate::arch::rdtsc();
        let mapped = call3(Hypercall::CapMap, 0, at, RW);
        let t1 = crate::arch::rdtsc();
        check("bigmap", "map the whole grant", mapped, Ok(0), &mut ok);
        if mapped.is_ok() {
            let last = at + bytes - 8;
            // SAFETY: slot 0 is mapped read-write at `at` for `bytes` bytes (just checked).
            let back = unsafe {
                core::ptr::write_volatile(at as *mut u64, round);
                core::ptr::write_volatile(last as *mut u64, round + 1);
                (
                    core::ptr::read_volatile(at as *const u64),
                    core::ptr::read_volatile(last as *const u64),
                )
            };
            ok &= back == (round, round + 1);
        }
        let t2 = crate::arch::rdtsc();
        let unmapped = call(Hypercall::CapUnmap, 0, 0);
        let t3 = crate::arch::rdtsc();
        check("bigmap", "unmap it", unmapped, Ok(at), &mut ok);
        log::info!(
            "bigmap: round {round}: {} MiB at {at:#x}: map {} ticks, unmap {} ticks",
            bytes >> 20,
            t1 - t0,
            t3 - t2
        );
    }
    if ok {
        0
    } else {
        1
    }
}

/// `bigmap` as `owner`: copies its grant (slot 0) read-write to the peer of its first
/// channel, waits until the holder says it mapped it, revokes it (the holder's core unmaps
/// it: as long as the map, for a copy in 4-KiB pages) and checks the revoke took one copy.
fn bigmap_owner(bi: &BootInfo) -> u64 {
    let mut ok = true;
    let Some(mut c) = crate::channel::open(bi, None) else { return 1 };
    let Some(ep) = crate::hypercall::first_endpoint() else { return 1 };
    // With `deaf_ok`, the holder's core may stop serving its inbox for longer than the
    // deadlines: the transfer or the revoke then ends `Timeout` (or the channel down), and
    // the run checks that core was fenced. The line ends "its holder's core deaf".
    let deaf_ok = bi.arg_int("deaf_ok") == 1;
    let copy = crate::hypercall::transfer(0, ep, 1 | RW << 8, 2_000);
    if deaf_ok && copy.is_err() {
        log::info!("bigmap: copy the grant to the holder: {copy:?}, its holder's core deaf");
        return 0;
    }
    check("bigmap", "copy the grant to the holder", copy.map(|_| 0), Ok(0), &mut ok);
    let said = c.recv();
    if deaf_ok && said.is_err() {
        log::info!("bigmap: the holder's answer: {said:?}, its holder's core deaf");
    } else {
        ok &= said.is_ok_and(|m| m[0] == 1);
    }
    let t0 = crate::arch::rdtsc();
    let revoked = call(Hypercall::CapRevoke, 0, 0);
    let t1 = crate::arch::rdtsc();
    if deaf_ok && revoked == Err(Ok(HvError::Timeout)) {
        // The holder's core was deaf past the deadline: the run checks it was fenced.
        log::info!("bigmap: revoke the mapped copy: Err(Timeout), its holder's core deaf");
    } else {
        check("bigmap", "revoke the mapped copy", revoked, Ok(1), &mut ok);
    }
    log::info!("bigmap: revoke of the holder's mapped copy: {} ticks", t1 - t0);
    if ok {
        0
    } else {
        1
    }
}

/// `bigmap` as `holder`: accepts one cap, maps it at `offset_kib` once it arrives, tells
/// the owner, then waits for the revoke to take it (its handle reads `Revoked`).
fn bigmap_holder(bi: &BootInfo) -> u64 {
    let mut ok = true;
    let Some(mut c) = crate::channel::open(bi, None) else { return 1 };
    crate::hypercall::accept_all(1);
    let Some(ep) = crate::hypercall::first_endpoint() else { return 1 };
    let slot = ep + 1;
    while call(Hypercall::CapIdentify, slot, 0).is_err() {
        core::hint::spin_loop();
    }
    let at = GRANT_WINDOW.0 + bi.arg_int("offset_kib") * 1024;
    let t0 = crate::arch::rdtsc();
    let mapped = call3(Hypercall::CapMap, slot, at, RW);
    let t1 = crate::arch::rdtsc();
    check("bigmap", "map the copy", mapped, Ok(0), &mut ok);
    log::info!("bigmap: map of the copy: {} ticks", t1 - t0);
    // With `probe`: one page of the copy, written and read back through the mapping now
    // (it is reachable), read again once the revoke took it (it must not be).
    let probe = bi.arg_int("probe") == 1;
    let pages = call(Hypercall::CapIdentify, slot, 0).map_or(1, |i| (i >> 16).max(1));
    let gpa = at + (bi.arg_int("probe_page") % pages) * 4096;
    if probe && mapped.is_ok() {
        // `gpa` is one of the copy's pages.
        // SAFETY: the copy is mapped read-write at `at` (just checked).
        let back = unsafe {
            core::ptr::write_volatile(gpa as *mut u64, 0x9b0b_e000 ^ gpa);
            core::ptr::read_volatile(gpa as *const u64)
        };
        ok &= back == 0x9b0b_e000 ^ gpa;
        let same = back == 0x9b0b_e000 ^ gpa;
        log::info!("bigmap: probe page {gpa:#x} reachable before the revoke: {same}");
    }
    ok &= c.send(&[1, 0, 0, 0, 0, 0, 0]).is_ok();
    while call(Hypercall::CapIdentify, slot, 0).is_ok() {
        core::hint::spin_loop();
    }
    check(
        "bigmap",
        "the copy is revoked",
        call(Hypercall::CapIdentify, slot, 0),
        Err(HvError::Revoked),
        &mut ok,
    );
    if probe && ok {
        // The revoke returned: nothing of the copy may be reachable. This read must stop
        // the guest (the run checks the EPT violation is at `gpa`); if it returns, it read
        // memory the revoke took.
        log::info!("bigmap: probing {gpa:#x} after the revoke");
        // Nothing of the guest's own memory is involved.
        // SAFETY: a read of the grant window, which faults if unmapped (the probe's point).
        let v = unsafe { core::ptr::read_volatile(gpa as *const u64) };
        log::error!("bigmap: {gpa:#x} still reachable after the revoke (read {v:#x})");
        return 1;
    }
    if ok {
        0
    } else {
        1
    }
}
