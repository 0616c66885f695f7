// SPDX-License-Identifier: MIT OR Apache-2.0
//! Instruction wrappers every other module may use, below them all: the time-stamp
//! counter. (`arch` keeps the CPU tables and the privileged rest, and calls
//! `hypercall` to exit on a fault; `hypercall` times its waits with [`rdtsc`], so it cannot
//! live in `arch`.)
//!
//! May call: nothing of this crate.

/// The time-stamp counter (RDTSC).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}
