// SPDX-License-Identifier: MIT OR Apache-2.0
//! `exitbench` (`cargo xtask bench exits`): the cost of one VM exit and its VM entry, per
//! exit reason, as the guest sees it (a round trip timed with RDTSC around one exiting
//! instruction, which counts emulated instructions exactly under Bochs) and as the
//! hypervisor spends it (its own time from the exit to the next entry, read from the
//! telemetry page with no exit). One `bench exits kind=...` line per exit kind, parsed by
//! `scripts/xtask/src/exitbench.rs`.
//!
//! Calls the hypercall wrappers, the telemetry page and `arch::rdtsc` only.

use core::sync::atomic::{AtomicU64, Ordering};
use guestkernel::arch::rdtsc;
use guestkernel::hypercall;
use vmcall_proto::guest::BootInfo;
use vmcall_proto::hypercall::Hypercall;

/// Round trips timed per kind (the median is printed; samples past this are not kept).
const MAX_SAMPLES: usize = 2048;

/// The exits measured: name, and one exiting instruction.
const KINDS: [(&str, fn()); 9] = [
    ("null_hypercall", null_hypercall),
    ("exit_count_hypercall", exit_count_hypercall),
    ("cpuid", cpuid),
    ("io_out", io_out),
    ("rdmsr", rdmsr),
    ("wrmsr", wrmsr),
    ("rdmsr_pat", rdmsr_pat),
    ("wrmsr_pat", wrmsr_pat),
    ("hlt_timer", hlt_timer),
];

/// `yield`: a hypercall that does nothing and returns 0.
fn null_hypercall() {
    let _ = hypercall::raw(Hypercall::Yield as u64, 0, 0);
}

fn exit_count_hypercall() {
    let _ = hypercall::raw(Hypercall::ExitCount as u64, 0, 0);
}

fn cpuid() {
    let _ = core::hint::black_box(core::arch::x86_64::__cpuid(0));
}

/// A write to the POST port (0x80), which the hypervisor accepts and ignores.
fn io_out() {
    // SAFETY: port 0x80 is the POST port; the write exits and is ignored.
    unsafe { core::arch::asm!("out 0x80, al", in("al") 0u8, options(nomem, nostack)) };
}

const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_PAT: u32 = 0x277;

/// FS base and PAT as found at the start: the writes put them back unchanged.
static FS_BASE: AtomicU64 = AtomicU64::new(0);
static PAT: AtomicU64 = AtomicU64::new(0);

/// RDMSR. FS base no longer exits (VMX switches it: it passes through); PAT does.
fn read_msr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: FS base and PAT exist in long mode; reading them changes nothing.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi,
            options(nomem, nostack))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// WRMSR of the value `msr` already holds: nothing changes.
fn write_msr(msr: u32, v: u64) {
    // SAFETY: the value the MSR already holds (a valid one).
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") v as u32,
            in("edx") (v >> 32) as u32, options(nomem, nostack))
    };
}

fn rdmsr() {
    core::hint::black_box(read_msr(MSR_FS_BASE));
}

fn wrmsr() {
    write_msr(MSR_FS_BASE, FS_BASE.load(Ordering::Relaxed));
}

fn rdmsr_pat() {
    core::hint::black_box(read_msr(MSR_PAT));
}

fn wrmsr_pat() {
    write_msr(MSR_PAT, PAT.load(Ordering::Relaxed));
}

/// Two exits that take the run loop: `timer_oneshot` one tick ahead (a hypercall the fast
/// path leaves to the run loop), then `sti; hlt` (HLT exits: this guest has no channel, so
/// it runs with HLT exiting), which finds the deadline past and resumes at once with the
/// timer interrupt injected; the guest's handler counts it. The round trip is both exits,
/// the injection and the handler; the timer is what bounds the wait.
fn hlt_timer() {
    let before = guestkernel::timer::ticks();
    if guestkernel::timer::arm(1).is_ok() {
        // One interrupt per HLT: the timer fired before HLT ended (the hypervisor injects
        // it on the entry that ends the sleep), so the loop runs once.
        while guestkernel::timer::ticks() == before {
            guestkernel::arch::wait_for_interrupt();
        }
    }
}

pub fn exitbench(bi: &BootInfo) -> u64 {
    let n = (bi.arg_int("n") as usize).clamp(1, MAX_SAMPLES);
    let mut samples = [0u32; MAX_SAMPLES];
    FS_BASE.store(read_msr(MSR_FS_BASE), Ordering::Relaxed);
    PAT.store(read_msr(MSR_PAT), Ordering::Relaxed);
    for (name, op) in KINDS {
        // Warm up (the first exits of a kind touch code and data the later ones find).
        for _ in 0..16 {
            op();
        }
        let (hv0, entries0) = guestkernel::telemetry::hypervisor_tsc_and_entries();
        for s in samples.iter_mut().take(n) {
            let t0 = rdtsc();
            op();
            let t1 = rdtsc();
            *s = t1.wrapping_sub(t0).min(u32::MAX as u64) as u32;
        }
        let (hv1, entries1) = guestkernel::telemetry::hypervisor_tsc_and_entries();
        // The same instructions with no exit between the two reads: what RDTSC and the
        // call around the exiting instruction cost by themselves.
        let mut base = u64::MAX;
        for _ in 0..16 {
            let t0 = rdtsc();
            let t1 = rdtsc();
            base = base.min(t1.wrapping_sub(t0));
        }
        let s = &mut samples[..n];
        s.sort_unstable();
        let (median, min, max) = (s[n / 2], s[0], s[n - 1]);
        let exits = entries1.wrapping_sub(entries0);
        let hv = hv1.wrapping_sub(hv0).checked_div(exits).unwrap_or(0);
        log::info!(
            "bench exits kind={name} n={n} rtt_median={median} rtt_min={min} rtt_max={max} \
             hv_per_exit={hv} exits={exits} rdtsc_pair={base}"
        );
    }
    0
}
