// SPDX-License-Identifier: MIT OR Apache-2.0
//! Time: the TSC, calibrated once against PIT channel 2, for delays and deadlines.
//!
//! Inside Bochs with `clock: sync=none` both the PIT and the TSC advance with emulated
//! instructions, so calibration and every deadline are deterministic.

use core::sync::atomic::{AtomicU64, Ordering};

/// PIT input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
/// Calibration window: 10 ms.
const CAL_MS: u64 = 10;
/// Used when the PIT never answers: a plausible rate that keeps timeouts finite.
const FALLBACK_TICKS_PER_MS: u64 = 1_000_000;

static TICKS_PER_MS: AtomicU64 = AtomicU64::new(FALLBACK_TICKS_PER_MS);

/// Measures TSC ticks per millisecond against a one-shot PIT channel 2 countdown.
/// Returns `None` (and keeps the fallback) if the PIT's output never rises.
///
/// # Safety
/// Called once, on the BSP, before any other core runs; uses PIT channel 2 and port 0x61.
pub unsafe fn calibrate() -> Option<u64> {
    use super::{inb, outb, rdtsc};
    let count = (PIT_HZ * CAL_MS / 1000) as u16;
    // 0x43/0x42 program channel 2 in mode 0 (interrupt on terminal count), lobyte/hibyte.
    // SAFETY: port 0x61 bit 0 gates PIT channel 2, bit 1 drives the speaker (kept off).
    let ok = unsafe {
        let ctl = inb(0x61);
        outb(0x61, (ctl & !0x02) | 0x01);
        outb(0x43, 0b1011_0000);
        outb(0x42, count as u8);
        outb(0x42, (count >> 8) as u8);
        let start = rdtsc();
        let mut spins: u64 = 0;
        // Bit 5 of port 0x61 mirrors channel 2's OUT, which rises at terminal count.
        while inb(0x61) & 0x20 == 0 {
            spins += 1;
            if spins > 50_000_000 {
                break;
            }
        }
        let end = rdtsc();
        outb(0x61, ctl);
        (spins <= 50_000_000).then(|| (end - start) / CAL_MS)
    };
    if let Some(t) = ok.filter(|t| *t > 0) {
        TICKS_PER_MS.store(t, Ordering::Relaxed);
        Some(t)
    } else {
        None
    }
}

/// TSC ticks per millisecond (calibrated, or the fallback).
pub fn ticks_per_ms() -> u64 {
    TICKS_PER_MS.load(Ordering::Relaxed)
}

/// The TSC value `us` microseconds from now.
pub fn deadline_us(us: u64) -> u64 {
    super::rdtsc() + ticks_per_ms() * us / 1000
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    let end = deadline_us(us);
    while super::rdtsc() < end {
        super::pause();
    }
}
