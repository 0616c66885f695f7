// SPDX-License-Identifier: MIT OR Apache-2.0
//! Capabilities from a guest's side: one function per capability hypercall
//! (`vmcall_proto::hypercall` documents each), plus the helpers to accept transfers on
//! every endpoint and to retry a transfer while the peer has not accepted yet. A config's
//! grants are the guest's first slots, its channel endpoints follow. May call the
//! hypercalls only.

pub use crate::hypercall::{accept_all, first_endpoint, transfer as transfer_when_accepted};
use crate::hypercall::{call, call3};
use vmcall_proto::hypercall::{HvError, Hypercall};

/// What a capability hypercall returns: its value, or the hypervisor's error (`Err(n)`
/// for a code this ABI does not know).
pub type CapResult = Result<u64, Result<HvError, i64>>;

/// Rights (READ, WRITE, GRANT): `Rights::READ.bits()` is what the calls take.
pub use vmcall_proto::caps::Rights;

/// `type | rights << 8 | pages << 16` of the capability in `slot`.
pub fn identify(slot: u64) -> CapResult {
    call(Hypercall::CapIdentify, slot, 0)
}
/// Splits a memory capability at a page `offset`; returns the new slot.
pub fn split(slot: u64, offset: u64) -> CapResult {
    call(Hypercall::CapSplit, slot, offset)
}
/// Maps a memory capability at `gpa` in the grant window with `rights`.
pub fn map(slot: u64, gpa: u64, rights: u64) -> CapResult {
    call3(Hypercall::CapMap, slot, gpa, rights)
}
/// Unmaps it; returns where it was mapped.
pub fn unmap(slot: u64) -> CapResult {
    call(Hypercall::CapUnmap, slot, 0)
}
/// Gives `slot` to the peer of endpoint `ep`: `mode` 0 moves, 1 copies (bits 8-15: the
/// copy's rights). Returns the slot in the peer's space.
pub fn transfer(slot: u64, ep: u64, mode: u64) -> CapResult {
    call3(Hypercall::CapTransfer, slot, ep, mode)
}
/// Takes back every copy derived from `slot`; returns how many.
pub fn revoke(slot: u64) -> CapResult {
    call(Hypercall::CapRevoke, slot, 0)
}
/// Accepts up to `n` more capabilities through endpoint `ep`.
pub fn accept(ep: u64, n: u64) -> CapResult {
    call(Hypercall::CapAccept, ep, n)
}
