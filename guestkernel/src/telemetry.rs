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

/// A status page read word by word (each word as the hypervisor last stored it): the
/// guest's own ([`own`]) or, through a target window, a guest it controls ([`target`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every VM exit (all reasons).
    pub exits: u64,
    /// VMCALL exits (basic reason 18).
    pub vmcalls: u64,
    /// NMI exits (basic reason 0).
    pub nmi_exits: u64,
    pub hypercalls: u64,
    pub doorbells: u64,
    pub entries: u64,
    pub hypervisor_tsc: u64,
    pub nmis: u64,
    pub incarnation: u64,
    pub traffic_tsc: u64,
    /// Channel 0's (sent, received, inbound).
    pub traffic0: (u64, u64, u64),
}

/// Reads the status page at guest-physical `at` (identity-mapped by the runtime).
///
/// # Safety
/// `at` is a status page mapped for this guest (its own, or one of its target windows):
/// anything else is an EPT violation that stops the guest.
pub unsafe fn read_page(at: u64) -> Snapshot {
    let p = at as *const StatusPage;
    // SAFETY: the caller's condition; aligned u64 fields of that page, read one by one.
    unsafe {
        let t = core::ptr::addr_of!((*p).telemetry);
        let word = |w: *const u64| core::ptr::read_volatile(w);
        let exits =
            (0..TELEMETRY_REASONS).map(|i| word(core::ptr::addr_of!((*t).exits[i]))).sum::<u64>()
                + word(core::ptr::addr_of!((*t).exits_other));
        let tr = core::ptr::addr_of!((*p).traffic[0]);
        Snapshot {
            exits,
            vmcalls: word(core::ptr::addr_of!((*t).exits[18])),
            nmi_exits: word(core::ptr::addr_of!((*t).exits[0])),
            hypercalls: word(core::ptr::addr_of!((*t).hypercalls)),
            doorbells: word(core::ptr::addr_of!((*t).doorbells)),
            entries: word(core::ptr::addr_of!((*t).entries)),
            hypervisor_tsc: word(core::ptr::addr_of!((*t).hypervisor_tsc)),
            nmis: word(core::ptr::addr_of!((*t).nmis)),
            incarnation: word(core::ptr::addr_of!((*p).incarnation)),
            traffic_tsc: word(core::ptr::addr_of!((*p).traffic_tsc)),
            traffic0: (
                word(core::ptr::addr_of!((*tr).sent)),
                word(core::ptr::addr_of!((*tr).received)),
                word(core::ptr::addr_of!((*tr).inbound)),
            ),
        }
    }
}

/// This guest's own counters.
pub fn own() -> Snapshot {
    // SAFETY: the status page is mapped read-only for the guest's whole life.
    unsafe { read_page(STATUS_GPA) }
}

/// The counters of the `i`-th guest this one controls (its `i`-th guest-control
/// capability), through its read-only target window.
///
/// # Safety
/// The guest holds at least `i + 1` guest-control capabilities; otherwise the window is
/// not mapped and the read stops the guest.
pub unsafe fn target(i: u32) -> Snapshot {
    // SAFETY: the caller's condition.
    unsafe { read_page(vmcall_proto::guest::target_status(i)) }
}
