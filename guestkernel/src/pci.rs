// SPDX-License-Identifier: MIT OR Apache-2.0
//! The PCI functions a guest owns, from its side (the rules are `vmcall_proto::device`'s):
//! its devices from the boot info, configuration space through mechanism #1 (ports 0xCF8 and
//! 0xCFC..0xCFF, trapped and filtered by the hypervisor: only the owner's functions answer,
//! others read all ones), turning decoding and bus mastering on, the device window mapped
//! uncached, the DMA offset, and the device interrupts.
//!
//! Interrupts: the owner's device `i` interrupts at `device_vector(i)` through the guest's
//! own IDT, without a VM exit. The runtime's handler counts it, stamps the TSC, calls the
//! driver's [`IrqHandler`] (which must clear the cause in the device, so that the
//! level-triggered line drops), keeps the causes it returns, and writes the x2APIC EOI.
//! The guest runs with interrupts off except while it waits (`sti; hlt; cli`), so a
//! driver's own code never races its handler. Every wait has a deadline ([`wait_irq`]).
//!
//! May call: `arch` (port I/O, EOI, the device-window mapping, HLT), `timer`, and
//! `vmcall_proto`.

use crate::arch;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
use vmcall_proto::device::{
    bar_kind, device_vector, flags, Bdf, DeviceDesc, MAX_DEVICES_PER_GUEST, PCI_CONFIG_ADDRESS,
    PCI_CONFIG_DATA,
};
use vmcall_proto::guest::BootInfo;

/// Command register bits (PCI Local Bus 3.0, 6.2.2).
pub mod command {
    pub const IO_SPACE: u16 = 1 << 0;
    pub const MEMORY_SPACE: u16 = 1 << 1;
    pub const BUS_MASTER: u16 = 1 << 2;
    pub const INTX_DISABLE: u16 = 1 << 10;
}
/// Configuration-space offsets of the type-0 header.
pub mod reg {
    pub const VENDOR_ID: u8 = 0x00;
    pub const DEVICE_ID: u8 = 0x02;
    pub const COMMAND: u8 = 0x04;
    pub const STATUS: u8 = 0x06;
    pub const CLASS_REVISION: u8 = 0x08;
    pub const HEADER_TYPE: u8 = 0x0e;
    pub const BAR0: u8 = 0x10;
    pub const INTERRUPT_LINE: u8 = 0x3c;
    pub const INTERRUPT_PIN: u8 = 0x3d;
}

/// The functions this guest owns, in config order.
pub fn devices(bi: &BootInfo) -> &[DeviceDesc] {
    &bi.devices[..(bi.device_count as usize).min(MAX_DEVICES_PER_GUEST)]
}

/// The configuration-mechanism-#1 address of `off` (dword-aligned) in `bdf`.
pub const fn config_address(bdf: Bdf, off: u8) -> u32 {
    0x8000_0000 | bdf.cf8_bits() | (off as u32 & 0xfc)
}

fn select(bdf: Bdf, off: u8) {
    // The hypervisor traps and filters the configuration-address port.
    // SAFETY: selecting a register has no effect of its own.
    unsafe { arch::outl(PCI_CONFIG_ADDRESS, config_address(bdf, off)) };
}

/// Reads the vendor and device ids of `bdf` under a probe: `Err((vector, error code))`
/// if the configuration ports fault. A guest that owns no function has no PCI at all: its
/// accesses raise #GP (vector 13) instead of reading all ones.
pub fn try_read_id(bdf: Bdf) -> Result<u32, (u8, u64)> {
    let mut v: u32 = config_address(bdf, reg::VENDOR_ID);
    // The configuration ports are trapped: the hypervisor filters them or raises #GP,
    // which the probe catches.
    // SAFETY: selecting and reading have no side effects.
    let fault = unsafe {
        crate::probe!(
            "mov dx, 0xcf8\n out dx, eax\n mov dx, 0xcfc\n in eax, dx",
            inout("eax") v,
            out("edx") _
        )
    };
    match fault {
        None => Ok(v),
        Some(f) => Err(f),
    }
}

/// Reads 32 bits of configuration space at `off` (rounded down to a dword). Two VM exits.
pub fn read32(bdf: Bdf, off: u8) -> u32 {
    select(bdf, off);
    // The type-0 header has no read-to-clear registers.
    // SAFETY: configuration reads have no side effects on PCI functions.
    unsafe { arch::inl(PCI_CONFIG_DATA) }
}

/// Reads 16 bits at `off` (rounded down to a word), through data port 0xCFC or 0xCFE.
pub fn read16(bdf: Bdf, off: u8) -> u16 {
    select(bdf, off);
    // SAFETY: as in `read32`.
    unsafe { arch::inw(PCI_CONFIG_DATA + (off as u16 & 2)) }
}

/// Reads 8 bits at `off`, through data port 0xCFC + (off & 3).
pub fn read8(bdf: Bdf, off: u8) -> u8 {
    select(bdf, off);
    // SAFETY: as in `read32`.
    unsafe { arch::inb(PCI_CONFIG_DATA + (off as u16 & 3)) }
}

/// Writes 32 bits of configuration space.
///
/// # Safety
/// The write must not let the function break memory safety: turning on bus mastering of
/// a device whose DMA is not programmed, or moving a BAR under memory in use.
pub unsafe fn write32(bdf: Bdf, off: u8, v: u32) {
    select(bdf, off);
    // SAFETY: per the caller's contract.
    unsafe { arch::outl(PCI_CONFIG_DATA, v) };
}

/// Writes 16 bits (see [`write32`]).
///
/// # Safety
/// As [`write32`].
pub unsafe fn write16(bdf: Bdf, off: u8, v: u16) {
    select(bdf, off);
    // SAFETY: per the caller's contract.
    unsafe { arch::outw(PCI_CONFIG_DATA + (off as u16 & 2), v) };
}

/// Writes 8 bits (see [`write32`]).
///
/// # Safety
/// As [`write32`].
pub unsafe fn write8(bdf: Bdf, off: u8, v: u8) {
    select(bdf, off);
    // SAFETY: per the caller's contract.
    unsafe { arch::outb(PCI_CONFIG_DATA + (off as u16 & 3), v) };
}

/// The command bits a driver of `d` needs: decoding for each kind of BAR it has, bus
/// mastering only if `master` and the config allows it (`dma = "unconfined"`), INTx on.
pub fn command_bits(d: &DeviceDesc, master: bool) -> u16 {
    let mut c = 0;
    if d.bars.iter().any(|b| b.kind == bar_kind::IO) {
        c |= command::IO_SPACE;
    }
    if d.bars.iter().any(|b| b.kind == bar_kind::MEMORY) {
        c |= command::MEMORY_SPACE;
    }
    if master && d.flags & flags::DMA_UNCONFINED != 0 {
        c |= command::BUS_MASTER;
    }
    c
}

/// Why a device could not be turned on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnableError {
    /// The function does not answer at its address (vendor id all ones).
    Absent,
    /// Bus mastering was asked for without `dma = "unconfined"` in the config.
    NoDma,
    /// The command register does not read back what was written (the `u16` it reads).
    Refused(u16),
}

/// Turns on what a driver of `d` needs ([`command_bits`]) and maps the device window if
/// it has memory BARs; returns the command register as it reads back.
///
/// # Safety
/// With `master`, the device's DMA must be quiescent or point at memory the driver owns
/// (bus mastering lets it write anywhere: there is no IOMMU).
pub unsafe fn enable(d: &DeviceDesc, master: bool) -> Result<u16, EnableError> {
    let bdf = d.bdf();
    if read16(bdf, reg::VENDOR_ID) == 0xffff {
        return Err(EnableError::Absent);
    }
    if master && d.flags & flags::DMA_UNCONFINED == 0 {
        return Err(EnableError::NoDma);
    }
    let want = command_bits(d, master);
    let old = read16(bdf, reg::COMMAND);
    let new = (old & !command::INTX_DISABLE) | want;
    // Decoding only makes the BARs answer at addresses the hypervisor placed (memory in
    // the device window, I/O ports opened for this guest).
    // SAFETY: bus mastering per the caller's contract; decoding is harmless (above).
    unsafe { write16(bdf, reg::COMMAND, new) };
    let got = read16(bdf, reg::COMMAND);
    if got & want != want {
        return Err(EnableError::Refused(got));
    }
    if want & command::MEMORY_SPACE != 0 {
        // SAFETY: after the runtime's init, on the one vCPU, no page-table reference alive.
        unsafe { arch::map_device_window() };
    }
    Ok(got)
}

/// Machine address of a partition address, for a device's DMA (see
/// `BootInfo::dma_offset`); `None` outside the partition (channel and grant windows have
/// no such offset).
pub fn dma_address(bi: &BootInfo, gpa: u64, len: u64) -> Option<u64> {
    let end = gpa.checked_add(len)?;
    (end <= bi.memory_bytes).then(|| gpa + bi.dma_offset)
}

/// A driver's interrupt handler: called with interrupts off and the driver's context word
/// ([`set_handler`]); must clear the cause in the device (so the level-triggered line
/// drops before the EOI) and return the causes it found, which [`take_causes`] hands back.
pub type IrqHandler = fn(ctx: u64) -> u32;

const N: usize = MAX_DEVICES_PER_GUEST;
#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
/// Interrupts taken, per device.
static TAKEN: [AtomicU64; N] = [ZERO; N];
/// What [`wait_irq`] last saw of `TAKEN`, per device.
static SEEN: [AtomicU64; N] = [ZERO; N];
/// TSC at the handler's entry, last interrupt, per device.
static LAST_TSC: [AtomicU64; N] = [ZERO; N];
/// The handler (a `fn` as an address, 0: none) and its context, per device.
static HANDLER: [AtomicU64; N] = [ZERO; N];
static CONTEXT: [AtomicU64; N] = [ZERO; N];
/// Causes the handler returned and nobody took yet, per device.
static CAUSES: [AtomicU64; N] = [ZERO; N];
/// Waits that an interrupt ended after they had halted, per device, and the TSC ticks from
/// the handler's entry to the waiter's return: fewest and most.
static WAKES: [AtomicU64; N] = [ZERO; N];
static WAKE_MIN: [AtomicU64; N] = [const { AtomicU64::new(u64::MAX) }; N];
static WAKE_MAX: [AtomicU64; N] = [ZERO; N];
/// Interrupts taken with no handler registered (the cause stays: the line stays up).
static UNCLAIMED: AtomicU64 = AtomicU64::new(0);

/// Registers `handler` for device `i`, with `ctx` (the driver's register base, say).
/// Register before the device may interrupt; interrupts are off outside waits.
pub fn set_handler(i: usize, handler: IrqHandler, ctx: u64) {
    if i < N {
        CONTEXT[i].store(ctx, Relaxed);
        HANDLER[i].store(handler as usize as u64, Relaxed);
    }
}

/// Interrupts device `i` has taken so far.
pub fn interrupts(i: usize) -> u64 {
    TAKEN.get(i).map_or(0, |t| t.load(Relaxed))
}

/// Interrupts taken on device vectors with no handler registered.
pub fn unclaimed() -> u64 {
    UNCLAIMED.load(Relaxed)
}

/// TSC when device `i`'s handler last started (0: never).
pub fn last_interrupt_tsc(i: usize) -> u64 {
    LAST_TSC.get(i).map_or(0, |t| t.load(Relaxed))
}

/// How [`wait_irq`] woke on device `i`'s interrupts: waits that had halted and an
/// interrupt ended, and the TSC ticks from the handler's entry to the waiter's return
/// (fewest, most; 0 and 0 with no such wait).
pub fn wakes(i: usize) -> (u64, u64, u64) {
    if i >= N {
        return (0, 0, 0);
    }
    let n = WAKES[i].load(Relaxed);
    let lo = if n == 0 { 0 } else { WAKE_MIN[i].load(Relaxed) };
    (n, lo, WAKE_MAX[i].load(Relaxed))
}

/// The causes device `i`'s handler reported since the last call, cleared.
pub fn take_causes(i: usize) -> u32 {
    CAUSES.get(i).map_or(0, |c| c.swap(0, Relaxed) as u32)
}

/// Called by the IDT stub of device vector `0x50 + i`, interrupts off.
#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn guest_device_irq(i: u32) {
    let i = i as usize % N;
    LAST_TSC[i].store(arch::rdtsc(), Relaxed);
    TAKEN[i].fetch_add(1, Relaxed);
    let h = HANDLER[i].load(Relaxed);
    if h != 0 {
        // SAFETY: only `set_handler` stores here, and it stores an `IrqHandler`.
        let f: IrqHandler = unsafe { core::mem::transmute::<usize, IrqHandler>(h as usize) };
        let cause = f(CONTEXT[i].load(Relaxed));
        CAUSES[i].fetch_or(cause as u64, Relaxed);
    } else {
        UNCLAIMED.fetch_add(1, Relaxed);
    }
    // SAFETY: this is the handler of the interrupt in service, and it EOIs once.
    unsafe { arch::x2apic_eoi() };
}

/// TSC ticks per millisecond (from the boot info; see [`init`]).
static TSC_PER_MS: AtomicU64 = AtomicU64::new(1_000_000);
/// Whether device `i` has its interrupt routed (a vector): without, waits poll.
static ROUTED: [AtomicU64; N] = [ZERO; N];

/// Takes the TSC rate and each device's routing from the boot info; logs a device whose
/// vector is not the one the ABI gives its index. Call once before the drivers.
pub fn init(bi: &BootInfo) {
    TSC_PER_MS.store(bi.tsc_per_ms.max(1), Relaxed);
    for (i, d) in devices(bi).iter().enumerate() {
        let routed = d.vector != 0;
        if routed && d.vector != device_vector(i) {
            log::warn!(
                "pci: device {i} ({}) interrupts at {:#x}, not {:#x}: its interrupts go \
                 to another device's handler",
                d.bdf(),
                d.vector,
                device_vector(i)
            );
        }
        ROUTED[i].store(routed as u64, Relaxed);
    }
}

/// The TSC `ms` milliseconds from now.
pub fn deadline_ms(ms: u64) -> u64 {
    arch::rdtsc().saturating_add(ms.saturating_mul(TSC_PER_MS.load(Relaxed)))
}

/// TSC ticks per millisecond as [`init`] took it.
pub fn tsc_per_ms() -> u64 {
    TSC_PER_MS.load(Relaxed)
}

/// Waits until device `i` has taken an interrupt since the last `wait_irq` on it returned
/// `true` (at once if one came meanwhile), or until the TSC passes `deadline`: `true` if an
/// interrupt came. Sleeps in HLT with the virtual timer armed for the deadline (interrupts
/// on only while halted). A device without an interrupt routed is polled: the wait returns
/// `true` after a short pause, so the driver looks at the device again.
pub fn wait_irq(i: usize, deadline: u64) -> bool {
    if i >= N {
        return false;
    }
    if ROUTED[i].load(Relaxed) == 0 {
        let until = arch::rdtsc().saturating_add(TSC_PER_MS.load(Relaxed) / 20).min(deadline);
        while arch::rdtsc() < until {
            core::hint::spin_loop();
        }
        return arch::rdtsc() < deadline;
    }
    let (mut armed, mut halted) = (false, false);
    loop {
        let taken = TAKEN[i].load(Relaxed);
        if taken != SEEN[i].load(Relaxed) {
            SEEN[i].store(taken, Relaxed);
            if halted {
                let t = arch::rdtsc().wrapping_sub(LAST_TSC[i].load(Relaxed));
                WAKES[i].fetch_add(1, Relaxed);
                WAKE_MIN[i].fetch_min(t, Relaxed);
                WAKE_MAX[i].fetch_max(t, Relaxed);
            }
            if armed {
                // Cancel the deadline's timer, so no stray tick ends a later sleep early.
                let _ = crate::timer::arm(0);
            }
            return true;
        }
        let now = arch::rdtsc();
        if now >= deadline {
            return false;
        }
        if !armed {
            // One timer for the whole wait: it wakes the HLT at the deadline at the latest.
            armed = crate::timer::arm((deadline - now).max(1)).is_ok();
        }
        if armed {
            arch::wait_for_interrupt();
            halted = true;
        } else {
            // No timer: open an interrupt window and spin.
            arch::interrupt_window();
        }
    }
}

/// Runs `trigger` (which makes device `i` interrupt) and opens interrupts until the
/// device's handler has run: the TSC ticks from just before `trigger` to the handler's
/// entry (emulated instructions under Bochs), or `None` if nothing came by `deadline`.
/// The interrupt counts as seen by [`wait_irq`].
pub fn irq_latency(i: usize, trigger: impl FnOnce(), deadline: u64) -> Option<u64> {
    if i >= N || ROUTED[i].load(Relaxed) == 0 {
        return None;
    }
    let before = TAKEN[i].load(Relaxed);
    let t0 = arch::rdtsc();
    trigger();
    loop {
        arch::interrupt_window();
        let taken = TAKEN[i].load(Relaxed);
        if taken != before {
            SEEN[i].store(taken, Relaxed);
            return Some(LAST_TSC[i].load(Relaxed).wrapping_sub(t0));
        }
        if arch::rdtsc() >= deadline {
            return None;
        }
    }
}

/// One function a bus scan found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
}

/// Function 0 of every device on bus 0 that answers (vendor id not all ones), in order;
/// `f` is called for each. 32 pairs of configuration reads.
pub fn scan_bus0(mut f: impl FnMut(Found)) {
    for dev in 0..=vmcall_proto::device::MAX_DEVICE_NUMBER {
        let bdf = Bdf::new(0, dev, 0);
        let id = read32(bdf, reg::VENDOR_ID);
        if id & 0xffff != 0xffff {
            f(Found { bdf, vendor: id as u16, device: (id >> 16) as u16 });
        }
    }
}

/// How a bus scan compares with the devices a guest owns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanCheck {
    /// Functions seen that the guest owns, with the identity its boot info gives.
    pub own: u32,
    /// Functions seen that it does not own (or whose identity differs): leaks.
    pub foreign: u32,
    /// Owned functions 0 on bus 0 that the scan did not see.
    pub missing: u32,
}

impl ScanCheck {
    /// Whether the guest sees exactly its own functions.
    pub fn exact(&self) -> bool {
        self.foreign == 0 && self.missing == 0
    }
}

/// Compares what a scan of bus 0 found with the owned devices (pure: host-tested).
pub fn check_scan(owned: &[DeviceDesc], found: &[Found]) -> ScanCheck {
    let mut c = ScanCheck::default();
    for f in found {
        let mine = owned
            .iter()
            .any(|d| d.bdf() == f.bdf && d.vendor_id == f.vendor && d.device_id == f.device);
        if mine {
            c.own += 1;
        } else {
            c.foreign += 1;
        }
    }
    c.missing = owned
        .iter()
        .filter(|d| d.bus == 0 && d.function == 0)
        .filter(|d| !found.iter().any(|f| f.bdf == d.bdf()))
        .count() as u32;
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcall_proto::device::BarDesc;

    fn desc(dev: u8, vendor: u16, device: u16, bars: &[(u32, u64, u64)], fl: u8) -> DeviceDesc {
        let mut d = DeviceDesc {
            bus: 0,
            device: dev,
            function: 0,
            irq_pin: 1,
            vector: device_vector(0),
            flags: fl,
            _reserved0: 0,
            vendor_id: vendor,
            device_id: device,
            class: 0x020000,
            bars: [BarDesc { kind: bar_kind::NONE, wide: 0, addr: 0, size: 0 }; 6],
        };
        for (i, &(kind, addr, size)) in bars.iter().enumerate() {
            d.bars[i] = BarDesc { kind, wide: 0, addr, size };
        }
        d
    }

    #[test]
    fn config_addresses_follow_mechanism_1() {
        let b = Bdf::new(0, 3, 0);
        assert_eq!(config_address(b, 0x00), 0x8000_1800);
        assert_eq!(config_address(b, 0x3d), 0x8000_183c);
        assert_eq!(config_address(Bdf::new(1, 31, 7), 0x10), 0x8001_ff10);
        assert_eq!(Bdf::from_cf8(config_address(b, 0x10)), b);
    }

    #[test]
    fn command_bits_follow_the_bars_and_the_dma_rule() {
        let e1000 = desc(
            2,
            0x8086,
            0x100e,
            &[(bar_kind::MEMORY, 0x4000_0000, 0x20000), (bar_kind::IO, 0xc000, 64)],
            flags::DMA_UNCONFINED,
        );
        assert_eq!(command_bits(&e1000, true), 0b111);
        assert_eq!(command_bits(&e1000, false), 0b011);
        let confined = DeviceDesc { flags: 0, ..e1000 };
        assert_eq!(command_bits(&confined, true), 0b011);
        let ne2k = desc(3, 0x10ec, 0x8029, &[(bar_kind::IO, 0xc100, 32)], 0);
        assert_eq!(command_bits(&ne2k, true), command::IO_SPACE);
    }

    #[test]
    fn scans_are_checked_against_what_is_owned() {
        let mine = [desc(2, 0x8086, 0x100e, &[], 0)];
        let f = |dev, vendor, device| Found { bdf: Bdf::new(0, dev, 0), vendor, device };
        let c = check_scan(&mine, &[f(2, 0x8086, 0x100e)]);
        assert!(c.exact() && c.own == 1);
        // The host bridge leaking through, another card, a wrong identity, a missing one.
        assert_eq!(check_scan(&mine, &[f(0, 0x8086, 0x1237), f(2, 0x8086, 0x100e)]).foreign, 1);
        assert_eq!(check_scan(&mine, &[f(2, 0x10ec, 0x8029)]).foreign, 1);
        assert_eq!(check_scan(&mine, &[]).missing, 1);
        assert!(check_scan(&[], &[]).exact());
        assert!(!check_scan(&[], &[f(3, 0x10ec, 0x8029)]).exact());
    }

    #[test]
    fn dma_addresses_stay_in_the_partition() {
        let mut bi: BootInfo = zerocopy::FromZeros::new_zeroed();
        bi.memory_bytes = 16 << 20;
        bi.dma_offset = 0x1000_0000;
        assert_eq!(dma_address(&bi, 0x20_0000, 4096), Some(0x1020_0000));
        assert_eq!(dma_address(&bi, (16 << 20) - 4096, 4096), Some(0x10ff_f000));
        assert_eq!(dma_address(&bi, (16 << 20) - 4096, 4097), None);
        assert_eq!(dma_address(&bi, 0x8000_0000, 64), None);
        assert_eq!(dma_address(&bi, u64::MAX, 2), None);
    }
}
