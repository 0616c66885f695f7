// SPDX-License-Identifier: MIT OR Apache-2.0
//! The virtual timer from a guest's side: the hypervisor's one-shot timer (`timer_oneshot`
//! hypercall) raises [`TIMER_VECTOR`] through the runtime's IDT, which counts [`ticks`].
//! May call the hypercalls and `arch`.

pub use crate::arch::TIMER_VECTOR;
use crate::hypercall::call;
use core::sync::atomic::Ordering;
use vmcall_proto::hypercall::{HvError, Hypercall};

/// Timer interrupts taken so far.
pub fn ticks() -> u64 {
    crate::arch::TICKS.load(Ordering::Relaxed)
}

/// TSC ticks per millisecond, as the hypervisor calibrated them.
pub fn tsc_per_ms() -> u64 {
    call(Hypercall::TscPerMs, 0, 0).unwrap_or(1).max(1)
}

/// Arms the one-shot timer `delta_tsc` TSC ticks from now (0 cancels).
pub fn arm(delta_tsc: u64) -> Result<(), Result<HvError, i64>> {
    call(Hypercall::TimerOneshot, delta_tsc, TIMER_VECTOR as u64).map(|_| ())
}

/// Sleeps at least `ms` milliseconds: arms the timer and halts until it fires.
pub fn sleep_ms(ms: u64) -> Result<(), Result<HvError, i64>> {
    let before = ticks();
    arm(ms.saturating_mul(tsc_per_ms()).max(1))?;
    while ticks() == before {
        crate::arch::wait_for_interrupt();
    }
    Ok(())
}
