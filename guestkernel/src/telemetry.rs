// SPDX-License-Identifier: MIT OR Apache-2.0
//! The guest's own counters, read from its status page with plain loads (no VM exit): the
//! hypervisor updates them before every VM entry (`vmcall_proto::guest::Telemetry`). Owns
//! nothing; calls nothing but memory reads.

use vmcall_proto::guest::{StatusPage, STATUS_GPA, TELEMETRY_REASONS};

fn page() -> *const StatusPage {
    STATUS_GPA as *const StatusPage
}

/// VM exits so far (every reason).
pub fn exits() -> u64 {
    let p = page();
    // The status page is mapped read-only for the guest's life, and the guest's page
    // tables map it with the channel windows; the hypervisor writes it only while the
    // guest does not run.
    // SAFETY: aligned u64 fields of that page, read one by one.
    unsafe {
        let t = core::ptr::addr_of!((*p).telemetry);
        let each = (0..TELEMETRY_REASONS)
            .map(|i| core::ptr::read_volatile(core::ptr::addr_of!((*t).exits[i])))
            .sum::<u64>();
        each + core::ptr::read_volatile(core::ptr::addr_of!((*t).exits_other))
    }
}

/// Hypercalls so far and VM entries so far.
pub fn hypercalls_and_entries() -> (u64, u64) {
    let p = page();
    // SAFETY: as for `exits`.
    unsafe {
        let t = core::ptr::addr_of!((*p).telemetry);
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*t).hypercalls)),
            core::ptr::read_volatile(core::ptr::addr_of!((*t).entries)),
        )
    }
}

/// The hypervisor's time on this guest's exits so far (TSC ticks) and VM entries so far.
pub fn hypervisor_tsc_and_entries() -> (u64, u64) {
    let p = page();
    // SAFETY: as for `exits`.
    unsafe {
        let t = core::ptr::addr_of!((*p).telemetry);
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*t).hypervisor_tsc)),
            core::ptr::read_volatile(core::ptr::addr_of!((*t).entries)),
        )
    }
}
