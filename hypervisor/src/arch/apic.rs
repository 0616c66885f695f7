// SPDX-License-Identifier: MIT OR Apache-2.0
//! The local APIC, as far as the hypervisor needs it: this core's id and the INIT and
//! STARTUP IPIs that wake application processors. x2APIC (MSR access, 32-bit ids) when
//! the processor has it, xAPIC (MMIO) otherwise; the driver logic is the `x86` crate's.

use raw_cpuid::CpuId;
use x86::apic::{x2apic::X2APIC, xapic::XAPIC, ApicControl, ApicId};

/// This core's initial APIC id: CPUID leaf 0xB (x2APIC id, 32 bits) where present, else
/// leaf 1 EBX[31:24].
pub fn current_id() -> u32 {
    let cpuid = CpuId::new();
    if let Some(mut topo) = cpuid.get_extended_topology_info() {
        if let Some(level) = topo.next() {
            return level.x2apic_id();
        }
    }
    cpuid.get_feature_info().map(|f| f.initial_local_apic_id() as u32).unwrap_or(0)
}

/// Whether this processor supports x2APIC mode.
pub fn has_x2apic() -> bool {
    CpuId::new().get_feature_info().is_some_and(|f| f.has_x2apic())
}

/// The bootstrap processor's handle to its local APIC, for sending IPIs.
pub enum LocalApic {
    X2(X2APIC),
    X(XAPIC),
}

impl LocalApic {
    /// Enables this core's local APIC, in x2APIC mode when available.
    ///
    /// # Safety
    /// Called once, on the BSP, before any IPI; the xAPIC MMIO page (from IA32_APIC_BASE) is
    /// identity-mapped uncached by the boot page tables.
    pub unsafe fn enable() -> Self {
        if has_x2apic() {
            let mut apic = X2APIC::new();
            apic.attach();
            // attach() leaves spurious vector 15, an exception vector; use 0xff instead.
            // SAFETY: x2APIC mode is on; the SIVR accepts any vector with bit 8 set.
            unsafe { super::wrmsr(MSR_X2APIC_SIVR, SIVR_ENABLED) };
            LocalApic::X2(apic)
        } else {
            XAPIC_IPIS.store(true, core::sync::atomic::Ordering::Relaxed);
            // SAFETY: IA32_APIC_BASE exists on every processor with an APIC.
            let base = unsafe { super::rdmsr(x86::msr::IA32_APIC_BASE) } & !0xfff;
            // The boot tables map the 4-KiB register page at `base` (uncached MMIO).
            // SAFETY: it is used only through this single handle.
            let regs = unsafe { core::slice::from_raw_parts_mut(base as *mut u32, 1024) };
            let mut apic = XAPIC::new(regs);
            apic.attach();
            LocalApic::X(apic)
        }
    }

    fn id(&self, apic_id: u32) -> ApicId {
        match self {
            LocalApic::X2(_) => ApicId::X2Apic(apic_id),
            LocalApic::X(_) => ApicId::XApic(apic_id as u8),
        }
    }

    fn ctl(&mut self) -> &mut dyn ApicControl {
        match self {
            LocalApic::X2(a) => a,
            LocalApic::X(a) => a,
        }
    }

    /// Sends INIT (assert, then the level de-assert older processors need).
    ///
    /// # Safety
    /// `apic_id` is an application processor that may be reset: nothing of ours runs on it.
    pub unsafe fn send_init(&mut self, apic_id: u32) {
        let id = self.id(apic_id);
        // SAFETY: the caller guarantees the target may be reset.
        unsafe {
            self.ctl().ipi_init(id);
            self.ctl().ipi_init_deassert();
        }
    }

    /// Sends a STARTUP IPI with `vector` (the AP starts at `vector << 12` in real mode).
    ///
    /// # Safety
    /// The trampoline must be installed at that page; `apic_id` is in wait-for-SIPI state.
    pub unsafe fn send_sipi(&mut self, apic_id: u32, vector: u8) {
        let id = self.id(apic_id);
        // SAFETY: the caller guarantees the trampoline is in place.
        unsafe { self.ctl().ipi_startup(id, vector) };
    }
}

const MSR_X2APIC_SIVR: u32 = 0x80f;
const MSR_X2APIC_ICR: u32 = 0x830;
/// The logical x2APIC ID (LDR), read-only in x2APIC mode (SDM Vol. 3A 11.12.10.1).
const MSR_X2APIC_LDR: u32 = 0x80d;
/// Spurious-interrupt vector: APIC software-enabled, spurious vector 0xff.
const SIVR_ENABLED: u64 = 0x1ff;

/// Puts this core's local APIC in x2APIC mode and software-enables it, so that it accepts
/// fixed IPIs (doorbells for the guest running here). Returns whether it could.
///
/// # Safety
/// Called once per core during bring-up, before the core's guest runs.
pub unsafe fn enable_x2apic_this_core() -> bool {
    if !has_x2apic() {
        XAPIC_IPIS.store(true, core::sync::atomic::Ordering::Relaxed);
        return false;
    }
    // Setting EN and EXTD is the architected switch to x2APIC mode; the SIVR write enables the APIC
    // with vector 0xff.
    // SAFETY: IA32_APIC_BASE exists (CPUID says x2APIC).
    unsafe {
        let base = super::rdmsr(x86::msr::IA32_APIC_BASE);
        super::wrmsr(x86::msr::IA32_APIC_BASE, base | (1 << 11) | (1 << 10));
        super::wrmsr(MSR_X2APIC_SIVR, SIVR_ENABLED);
    }
    true
}

/// Sends a fixed, physical-destination interrupt `vector` to APIC id `apic`.
pub fn send_fixed_ipi(apic: u32, vector: u8) {
    // A fixed IPI only raises `vector` on its target, whose guest handles it through its own
    // IDT.
    send_ipi(apic, vector as u32);
}

/// Sends an NMI to APIC id `apic` (the inter-core kick).
pub fn send_nmi(apic: u32) {
    // An NMI to a core makes its guest exit or runs the hypervisor's NMI handler, which only
    // returns: the kicked core then reads its inbox.
    send_ipi(apic, 4 << 8);
}

/// Set when the processor has no x2APIC (QEMU's TCG, Bochs's `ryzen`): the cores then run
/// their APICs in xAPIC mode and IPIs go through the xAPIC registers. Written at bring-up
/// (every core finds the same CPUID), before any core sends an IPI through [`send_ipi`].
static XAPIC_IPIS: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Writes the interrupt command `low` (vector, delivery mode) for `apic`: through the x2APIC
/// ICR (every core runs in x2APIC mode where the processor has it; one load decides, so the
/// kick and doorbell paths stay as short as before the xAPIC case), else through the
/// xAPIC's ICR pair.
#[inline]
fn send_ipi(apic: u32, low: u32) {
    if !XAPIC_IPIS.load(core::sync::atomic::Ordering::Relaxed) {
        // SAFETY: x2APIC mode is on; writing the ICR only sends the interrupt.
        unsafe { super::wrmsr(MSR_X2APIC_ICR, (apic as u64) << 32 | low as u64) };
    } else {
        send_ipi_xapic(apic, low);
    }
}

#[cold]
fn send_ipi_xapic(apic: u32, low: u32) {
    // The high half first (the destination), then the low half, which sends. Only this
    // core writes its ICR, from the hypervisor with interrupts off (the NMI handler sends
    // nothing), so the pair is not torn.
    // SAFETY: this core's xAPIC registers (identity-mapped, uncached).
    unsafe {
        xapic_write(XAPIC_ICR_HIGH, apic << 24);
        xapic_write(XAPIC_ICR_LOW, low);
    }
}

const XAPIC_ICR_LOW: u32 = 0x300;
const XAPIC_ICR_HIGH: u32 = 0x310;
const XAPIC_SIVR: u32 = 0x0f0;
const XAPIC_LVT_TIMER: u32 = 0x320;
const XAPIC_TIMER_INITIAL: u32 = 0x380;
const XAPIC_TIMER_CURRENT: u32 = 0x390;
const XAPIC_TIMER_DIVIDE: u32 = 0x3e0;
const XAPIC_EOI: u32 = 0x0b0;
/// The first of the eight in-service registers (x2APIC MSRs 0x810..0x817).
const XAPIC_ISR: u32 = 0x100;
const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// The address of this core's xAPIC register `offset` (IA32_APIC_BASE; the boot page tables
/// map the page identity, uncached).
fn xapic_reg(offset: u32) -> *mut u32 {
    // SAFETY: IA32_APIC_BASE exists on every processor with a local APIC.
    let base = unsafe { super::rdmsr(x86::msr::IA32_APIC_BASE) } & 0x000f_ffff_ffff_f000;
    (base + offset as u64) as *mut u32
}

/// # Safety
/// xAPIC mode; `offset` a writable register whose write the caller means.
unsafe fn xapic_write(offset: u32, v: u32) {
    // SAFETY: the caller's guarantee; the register page is mapped (see `xapic_reg`).
    unsafe { xapic_reg(offset).write_volatile(v) }
}

fn xapic_read(offset: u32) -> u32 {
    // SAFETY: reading a register of this core's xAPIC page has no side effect.
    unsafe { xapic_reg(offset).read_volatile() }
}

/// Writes local-APIC register `offset` (its xAPIC offset; the x2APIC MSR is 0x800 +
/// offset / 16) in whichever mode this core runs.
///
/// # Safety
/// As for the register's own write.
unsafe fn reg_write(offset: u32, v: u32) {
    if x2apic_mode() {
        // SAFETY: the caller's guarantee.
        unsafe { super::wrmsr(0x800 + offset / 16, v as u64) };
    } else {
        // SAFETY: the caller's guarantee.
        unsafe { xapic_write(offset, v) };
    }
}

fn reg_read(offset: u32) -> u32 {
    if x2apic_mode() {
        // SAFETY: reading an x2APIC register has no side effect.
        unsafe { super::rdmsr(0x800 + offset / 16) as u32 }
    } else {
        xapic_read(offset)
    }
}

/// How this core's local-APIC timer counts (the run timer of a backend without a
/// preemption timer: SVM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    /// TSC-deadline mode (CPUID.01H:ECX[24]): the deadline is a TSC value.
    Deadline,
    /// One-shot, counting down at `per_1024_tsc` APIC ticks per 1,024 TSC ticks (divide
    /// by 1), measured at set-up.
    OneShot { per_1024_tsc: u64 },
}

/// Software-enables this core's local APIC (in either mode) and points its timer at
/// `vector`, disarmed, in TSC-deadline mode where the processor has it, else one-shot
/// (its rate measured against the TSC over about `calibrate_ticks` TSC ticks).
///
/// # Safety
/// Once per core, during bring-up; the IDT has a handler for `vector` that acknowledges it.
pub unsafe fn timer_init_this_core(vector: u8, calibrate_ticks: u64) -> TimerMode {
    let deadline = CpuId::new().get_feature_info().is_some_and(|f| f.has_tsc_deadline());
    // The spurious vector 0xff is a reporting stub, never raised by a correct setup.
    // SAFETY: enables this core's APIC, then programs its own timer, masked or disarmed.
    unsafe {
        reg_write(XAPIC_SIVR, SIVR_ENABLED as u32);
        if deadline {
            reg_write(XAPIC_LVT_TIMER, vector as u32 | 2 << 17);
            super::wrmsr(MSR_TSC_DEADLINE, 0);
            return TimerMode::Deadline;
        }
        reg_write(XAPIC_TIMER_DIVIDE, 0xb); // divide by 1
        reg_write(XAPIC_LVT_TIMER, vector as u32 | 1 << 16); // masked while measured
        reg_write(XAPIC_TIMER_INITIAL, u32::MAX);
    }
    let t0 = super::rdtsc();
    while super::rdtsc().wrapping_sub(t0) < calibrate_ticks {
        super::pause();
    }
    let counted = u32::MAX - reg_read(XAPIC_TIMER_CURRENT);
    let tsc = super::rdtsc().wrapping_sub(t0).max(1);
    // SAFETY: stops the count, unmasks the LVT: disarmed until the first arm.
    unsafe {
        reg_write(XAPIC_TIMER_INITIAL, 0);
        reg_write(XAPIC_LVT_TIMER, vector as u32);
    }
    TimerMode::OneShot { per_1024_tsc: ((counted as u64) << 10) / tsc }
}

/// Arms this core's timer to fire `ticks` TSC ticks from now (at least one APIC tick).
///
/// # Safety
/// After [`timer_init_this_core`] on this core, with its `mode`.
#[inline]
pub unsafe fn timer_arm(mode: TimerMode, ticks: u64) {
    match mode {
        // SAFETY: the caller's guarantee.
        TimerMode::Deadline => unsafe {
            super::wrmsr(MSR_TSC_DEADLINE, super::rdtsc().saturating_add(ticks.max(1)))
        },
        TimerMode::OneShot { per_1024_tsc } => {
            let count = (ticks.saturating_mul(per_1024_tsc) >> 10).clamp(1, u32::MAX as u64);
            // SAFETY: the caller's guarantee.
            unsafe { reg_write(XAPIC_TIMER_INITIAL, count as u32) };
        }
    }
}

/// Disarms this core's timer (an interrupt it already raised stays pending).
///
/// # Safety
/// As for [`timer_arm`].
#[inline]
pub unsafe fn timer_disarm(mode: TimerMode) {
    match mode {
        // SAFETY: the caller's guarantee.
        TimerMode::Deadline => unsafe { super::wrmsr(MSR_TSC_DEADLINE, 0) },
        // SAFETY: the caller's guarantee.
        TimerMode::OneShot { .. } => unsafe { reg_write(XAPIC_TIMER_INITIAL, 0) },
    }
}

/// This core's logical x2APIC ID as its APIC holds it (the LDR, MSR 80DH: the cluster in
/// bits 31:16, this core's one bit of the cluster's sixteen in bits 15:0; SDM Vol. 3A
/// 11.12.10.1-2), or `None` if the APIC is not in x2APIC mode or the register does not
/// read as one core's ID. Read, not derived from the x2APIC ID: the register is what the
/// APIC matches a logical destination against.
pub fn logical_id() -> Option<u32> {
    if !x2apic_mode() {
        return None;
    }
    // SAFETY: x2APIC mode is on (checked above): the LDR MSR exists; reading it is inert.
    let read = || unsafe { super::rdmsr(MSR_X2APIC_LDR) } as u32;
    let mut ldr = read();
    if ldr == 0 {
        // Architecturally never 0 in x2APIC mode (one bit of the bitmask is always set).
        // Bochs 2.7 derives it only on a write of IA32_APIC_BASE made while the APIC is
        // already in x2APIC mode: write the same value again, the x2APIC-to-x2APIC "no
        // change" transition (SDM Vol. 3A 11.12.5), and read once more.
        // SAFETY: IA32_APIC_BASE exists; writing back the value just read changes no state.
        unsafe {
            let base = super::rdmsr(x86::msr::IA32_APIC_BASE);
            super::wrmsr(x86::msr::IA32_APIC_BASE, base);
        }
        ldr = read();
    }
    (ldr & 0xffff).is_power_of_two().then_some(ldr)
}

/// Sends one NMI to every core of x2APIC cluster `ldr >> 16` whose bit is set in
/// `ldr & 0xffff` (logical destination mode: one ICR write for up to 16 cores, SDM Vol. 3A
/// 11.6.1 and 11.12.10.1). `ldr` is a union of [`logical_id`]s of one cluster.
pub fn send_nmi_logical(ldr: u32) {
    // Delivery mode NMI (100b, the vector ignored), logical destination (bit 11), level
    // assert (bit 14: 1 for every delivery mode but INIT de-assert), edge trigger, no
    // shorthand; the destination in bits 63:32 (11.12.9: one 64-bit WRMSR, no delivery
    // status to poll).
    // x2APIC mode is on on every core that kicks (as for `send_nmi`).
    // SAFETY: x2APIC mode; the ICR write only sends this NMI.
    unsafe { super::wrmsr(MSR_X2APIC_ICR, (ldr as u64) << 32 | 1 << 14 | 1 << 11 | 4 << 8) };
}

/// Whether this core's local APIC is enabled in x2APIC mode (IA32_APIC_BASE bits 11 and 10).
pub fn x2apic_mode() -> bool {
    // SAFETY: IA32_APIC_BASE exists on every processor with a local APIC (all with VMX).
    let base = unsafe { super::rdmsr(x86::msr::IA32_APIC_BASE) };
    base & (3 << 10) == 3 << 10
}

/// Acknowledges the highest-priority interrupt in service on this core (SDM Vol. 3A
/// 11.8.5), in whichever mode its local APIC runs. For a level-triggered vector the APIC
/// also tells the I/O APIC, which clears that line's remote IRR.
///
/// # Safety
/// The interrupt in service is one the caller means to retire (the SVM vCPU: its guest's
/// device interrupt, which the guest acknowledged).
pub unsafe fn eoi() {
    // SAFETY: the caller's guarantee; an EOI write of 0 has no other effect.
    unsafe { reg_write(XAPIC_EOI, 0) };
}

/// Acknowledges every interrupt in service on this core (the in-service registers, xAPIC
/// offsets 0x100..0x170 or x2APIC MSRs 0x810..0x817; one EOI retires the highest, SDM
/// Vol. 3A 11.8.5) and returns how many. The hypervisor takes no interrupts itself (its
/// timer and doorbell stubs acknowledge theirs at once), so whatever is in service was its
/// guest's: a device interrupt the guest never acknowledged (VT-x: taken by the guest's
/// IDT; SVM: held by the host for the guest, `arch::idt::HOST_DEVICE_IRQS`).
pub fn eoi_in_service() -> u32 {
    let mut n = 0;
    // At most 256 vectors can be in service.
    while n < 256 {
        let any = (0..8).any(|i| reg_read(XAPIC_ISR + 0x10 * i) != 0);
        if !any {
            break;
        }
        // SAFETY: retires the highest in-service vector, a guest's (above).
        unsafe { eoi() };
        n += 1;
    }
    n
}
