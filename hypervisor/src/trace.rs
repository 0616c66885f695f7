// SPDX-License-Identifier: MIT OR Apache-2.0
//! Exit traces (hypervisor command-line word `trace`, `cargo xtask run --trace`).
//!
//! Owns one bounded ring per core of its guest's latest VM exits (reason, VM-entry TSC,
//! exit TSC) with exact totals (exits, time in the guest, time in the hypervisor between
//! an exit and the next entry), and the on/off switch. Ring `i` is touched only by core
//! `i`: the exit path pushes, and the same core writes the ring to the console as `trace`
//! and `tracesum` records (`vmcall_proto::record`) once its guest has ended, so no lock and
//! no cross-core access. Calls: the console, `vcpu::EXIT_NAMES`.
//!
//! Off (the default), an exit pays one load of a flag set once at boot and one branch.

use crate::percpu::MAX_CORES;
use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};
use vmcall_proto::record::{kind, trace::Word, trace::WORDS_PER_RECORD, Quoted};

/// Exits each core's ring keeps (the newest; older ones still count in the totals).
pub const CAPACITY: usize = 512;

/// One traced exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// TSC at the hypervisor's last look before the VM entry that this exit ended.
    pub entry: u64,
    /// TSC right after the exit.
    pub exit: u64,
    /// Basic exit reason (SDM Vol. 3D Appendix C).
    pub reason: u32,
    _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Event>() == 24);

/// One core's ring and totals.
#[derive(Debug)]
pub struct Ring {
    events: [Event; CAPACITY],
    /// Exits pushed so far (the next goes to `total % CAPACITY`).
    total: u64,
    guest_tsc: u64,
    hv_tsc: u64,
    last_exit: u64,
}

impl Ring {
    pub const fn new() -> Self {
        const ZERO: Event = Event { entry: 0, exit: 0, reason: 0, _pad: 0 };
        Ring { events: [ZERO; CAPACITY], total: 0, guest_tsc: 0, hv_tsc: 0, last_exit: 0 }
    }

    /// Records one exit: the guest ran from `entry` to `exit`.
    pub fn push(&mut self, reason: u16, entry: u64, exit: u64) {
        self.guest_tsc = self.guest_tsc.saturating_add(exit.saturating_sub(entry));
        if self.total > 0 {
            self.hv_tsc = self.hv_tsc.saturating_add(entry.saturating_sub(self.last_exit));
        }
        self.last_exit = exit;
        self.events[(self.total % CAPACITY as u64) as usize] =
            Event { entry, exit, reason: reason.into(), _pad: 0 };
        self.total += 1;
    }

    /// The kept exits, oldest first.
    pub fn kept(&self) -> impl Iterator<Item = &Event> {
        let n = (self.total as usize).min(CAPACITY);
        let start = if self.total as usize > CAPACITY {
            (self.total % CAPACITY as u64) as usize
        } else {
            0
        };
        (0..n).map(move |i| &self.events[(start + i) % CAPACITY])
    }

    pub fn total(&self) -> u64 {
        self.total
    }
    pub fn guest_tsc(&self) -> u64 {
        self.guest_tsc
    }
    pub fn hv_tsc(&self) -> u64 {
        self.hv_tsc
    }
}

impl Default for Ring {
    fn default() -> Self {
        Self::new()
    }
}

struct CoreRing(UnsafeCell<Ring>);

// See the module header and the callers of `exit` and `drain`, which pass their own core
// index.
// SAFETY: ring `i` is read and written only by core `i`.
unsafe impl Sync for CoreRing {}

static RINGS: [CoreRing; MAX_CORES] = [const { CoreRing(UnsafeCell::new(Ring::new())) }; MAX_CORES];
static ON: AtomicBool = AtomicBool::new(false);

/// Turns tracing on or off. Called once by the BSP, before any AP starts.
pub fn enable(on: bool) {
    ON.store(on, Ordering::Release);
}

/// Whether the run is traced.
pub fn enabled() -> bool {
    ON.load(Ordering::Acquire)
}

/// The exit path's one call: core `core` (the caller's own) took an exit with `reason`
/// after its guest ran from `entry` to `exit`.
#[inline(always)]
pub fn exit(core: u32, reason: u16, entry: u64, exit: u64) {
    if ON.load(Ordering::Relaxed) {
        push(core as usize, reason, entry, exit);
    }
}

#[cold]
#[inline(never)]
fn push(core: usize, reason: u16, entry: u64, exit: u64) {
    if let Some(r) = RINGS.get(core) {
        // SAFETY: the caller runs on core `core`, the only one touching this ring.
        unsafe { (*r.0.get()).push(reason, entry, exit) };
    }
}

/// The name of an exit reason, as in the guest records.
fn reason_name(reason: u32) -> &'static str {
    crate::vcpu::EXIT_NAMES.get(reason as usize).copied().unwrap_or("other")
}

/// Up to [`WORDS_PER_RECORD`] exits as `trace` words (the first with gap 0).
struct Words<'a>(&'a [Event]);

impl fmt::Display for Words<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut prev: Option<u64> = None;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            let gap = prev.map_or(0, |p| e.entry.saturating_sub(p));
            let word =
                Word { reason: reason_name(e.reason), gap, guest: e.exit.saturating_sub(e.entry) };
            write!(f, "{word}")?;
            prev = Some(e.exit);
        }
        Ok(())
    }
}

/// Calls `line(base, words)` for each record's worth of `ring`'s kept exits, in order.
fn records(ring: &Ring, mut line: impl FnMut(u64, &Words<'_>)) {
    let mut chunk = [Event::default(); WORDS_PER_RECORD];
    let mut n = 0;
    for e in ring.kept() {
        chunk[n] = *e;
        n += 1;
        if n == WORDS_PER_RECORD {
            line(chunk[0].entry, &Words(&chunk[..n]));
            n = 0;
        }
    }
    if n > 0 {
        line(chunk[0].entry, &Words(&chunk[..n]));
    }
}

/// Writes core `core`'s trace (the caller's own core, its guest ended) to the console.
/// `between` runs after each record: the core serves its inbox there (a long trace at UART
/// speed must not make it look hung to the membership's failure detector).
pub fn drain(core: usize, mut between: impl FnMut()) {
    let Some(r) = RINGS.get(core) else { return };
    if !enabled() {
        return;
    }
    // SAFETY: the caller runs on core `core`, the only one touching this ring.
    let ring = unsafe { &*r.0.get() };
    records(ring, |base, words| {
        crate::record!(kind::TRACE, "core={core} base={base} ev={}", Quoted(words));
        between();
    });
    crate::record!(
        kind::TRACE_SUM,
        "core={core} exits={} kept={} guest_tsc={} hv_tsc={}",
        ring.total(),
        ring.kept().count(),
        ring.guest_tsc(),
        ring.hv_tsc()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcall_proto::record::trace::events;

    #[test]
    fn the_ring_keeps_the_newest_and_counts_all() {
        let mut r = Ring::new();
        for i in 0..(CAPACITY as u64 + 3) {
            // In the guest 10 ticks, then 5 in the hypervisor.
            r.push(18, i * 15, i * 15 + 10);
        }
        assert_eq!(r.total(), CAPACITY as u64 + 3);
        let kept: Vec<_> = r.kept().collect();
        assert_eq!(kept.len(), CAPACITY);
        assert_eq!(kept[0].entry, 3 * 15, "the three oldest were overwritten");
        assert_eq!(kept.last().unwrap().entry, (CAPACITY as u64 + 2) * 15);
        assert_eq!(r.guest_tsc(), 10 * (CAPACITY as u64 + 3));
        assert_eq!(r.hv_tsc(), 5 * (CAPACITY as u64 + 2));
    }

    #[test]
    fn records_read_back_as_the_exits_that_were_pushed() {
        let mut r = Ring::new();
        let pushed: Vec<(u16, u64, u64)> = (0..40u64)
            .map(|i| ((i % 3) as u16 * 6 + 12, 1000 + i * 100, 1000 + i * 100 + 7 * (i % 10)))
            .collect();
        for &(reason, entry, exit) in &pushed {
            r.push(reason, entry, exit);
        }
        let mut lines = vec![];
        records(&r, |base, words| lines.push((base, words.to_string())));
        assert_eq!(lines.len(), 3, "40 exits in records of {WORDS_PER_RECORD}");
        let mut back = vec![];
        for (base, ev) in &lines {
            for e in events(ev, *base) {
                let e = e.expect("well-formed");
                back.push((e.reason.to_string(), e.entry, e.exit));
            }
        }
        let want: Vec<_> =
            pushed.iter().map(|&(r, a, b)| (reason_name(r.into()).to_string(), a, b)).collect();
        assert_eq!(back, want);
        assert_eq!(reason_name(12), "hlt");
        assert_eq!(reason_name(18), "vmcall");
        assert_eq!(reason_name(9999), "other");
    }
}
