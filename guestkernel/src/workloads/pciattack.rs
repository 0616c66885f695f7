// SPDX-License-Identifier: MIT OR Apache-2.0
//! Workload `pciattack`: a guest that owns a PCI function attacks the others through
//! configuration space, its own BARs, the device window and its interrupt line. Each attack
//! prints `pciattack NAME: ... as expected` or `pciattack NAME: UNEXPECTED: ...`; the run
//! ends with `pciattacks done: N run, M as expected` (exit 0 only if all were).
//!
//! `which=all` (the default) runs the attacks the attacker survives, then the last one,
//! which stops it (`window`: it reads the device window, where another guest's BAR is and
//! nothing of its own). `which=window` runs that one alone; `which=storm` needs a guest of
//! its own:
//! * `storm`: unmasks its card's interrupt, raises it, and acknowledges only the local APIC,
//!   never the card: the level-triggered line stays up and the interrupt comes back at
//!   once, forever. Its own core is all it can spend; the run budget ends it.
//!
//! The victim (another guest owning the e1000 at `victim`) must be unharmed: its function
//! still answers the victim with its own BAR, and the victim's traffic completes (checked
//! by the test from the victim's own lines).
//!
//! May call: the runtime (`guestkernel::pci`, `arch`), `vmcall_proto`.

use guestkernel::{arch, pci};
use vmcall_proto::device::{Bdf, DEVICE_WINDOW};
use vmcall_proto::guest::BootInfo;

/// The victim's function (the e1000 in `configs/hostile/pci.toml`).
const VICTIM: Bdf = Bdf::new(0, 2, 0);
/// The PIIX3 ISA bridge and the host bridge: never anyone's.
const BRIDGES: [Bdf; 2] = [Bdf::new(0, 1, 0), Bdf::new(0, 0, 0)];

struct Tally {
    run: u64,
    good: u64,
}

impl Tally {
    fn check(&mut self, name: &str, ok: bool, what: core::fmt::Arguments<'_>) {
        self.run += 1;
        if ok {
            self.good += 1;
            log::info!("pciattack {name}: {what} as expected");
        } else {
            log::error!("pciattack {name}: UNEXPECTED: {what}");
        }
    }
}

/// The workload.
pub fn run(bi: &BootInfo) -> u64 {
    pci::init(bi);
    let Some(mine) = pci::devices(bi).first().copied() else {
        log::error!("pciattack: I own no device: nothing to attack from");
        return 1;
    };
    match bi.arg_word("which") {
        "window" => window(),
        "storm" => storm(bi, &mine),
        _ => all(&mine),
    }
}

fn all(mine: &vmcall_proto::device::DeviceDesc) -> u64 {
    let mut t = Tally { run: 0, good: 0 };
    let me = mine.bdf();
    // Another guest's function and the bridges read as absent, whatever the register.
    for b in [VICTIM].iter().chain(&BRIDGES) {
        let id = pci::read32(*b, 0);
        let bar = pci::read32(*b, 0x10);
        let cmd = pci::read16(*b, 4);
        t.check(
            "read-other",
            id == u32::MAX && bar == u32::MAX && cmd == 0xffff,
            format_args!("{b}: id {id:#x}, BAR0 {bar:#x}, command {cmd:#x}"),
        );
    }
    // Writes to them: BAR0 moved over low memory, bus mastering on, bridge windows (the
    // ISA bridge's and a type-1 header's base/limit registers at 0x1c..0x2c), the interrupt
    // line. Dropped: they still read as absent, and the victim's traffic (its own lines)
    // shows its device untouched.
    for b in [VICTIM].iter().chain(&BRIDGES) {
        // SAFETY: the hypervisor drops every one of these writes (that is the attack).
        unsafe {
            pci::write32(*b, 0x10, 0x0010_0000);
            pci::write16(*b, 4, 0x0007);
            for off in (0x18..=0x2c).step_by(4) {
                pci::write32(*b, off, 0xffff_0000);
            }
            pci::write8(*b, 0x3c, 3);
        }
        t.check(
            "write-other",
            pci::read32(*b, 0) == u32::MAX,
            format_args!("{b}: BAR, command, windows and line written; still absent"),
        );
    }
    // Its own BAR: sizing works, moving it does not (over another partition, into the grant
    // window, onto the I/O APIC).
    let bar0 = pci::read32(me, 0x10);
    for to in [0x0010_0000u32, 0xc000_0000, 0xfec0_0000, 0x0] {
        // SAFETY: the hypervisor drops BAR writes that are not sizing probes.
        unsafe { pci::write32(me, 0x10, to) };
        let now = pci::read32(me, 0x10);
        t.check(
            "move-own-bar",
            now == bar0,
            format_args!("BAR0 written {to:#x}, reads {now:#x} (was {bar0:#x})"),
        );
    }
    // SAFETY: a sizing probe, then the register restored (the hypervisor emulates both).
    let size = unsafe {
        pci::write32(me, 0x10, u32::MAX);
        let s = pci::read32(me, 0x10);
        pci::write32(me, 0x10, bar0);
        s
    };
    t.check("size-own-bar", size != 0 && size != u32::MAX, format_args!("sizing reads {size:#x}"));
    // Bus mastering of its own card without `dma = "unconfined"`: refused.
    // SAFETY: the hypervisor refuses the bit for this guest (no DMA allowed).
    unsafe { pci::write16(me, 4, 0x0007) };
    let cmd = pci::read16(me, 4);
    t.check(
        "own-bus-master",
        cmd & pci::command::BUS_MASTER == 0,
        format_args!("command {cmd:#x} after asking for bus mastering"),
    );
    // The expansion ROM, the capability list (MSI), device-specific registers: hidden.
    let (rom, cap, spec) = (pci::read32(me, 0x30), pci::read8(me, 0x34), pci::read32(me, 0x40));
    t.check(
        "hidden-registers",
        rom == 0 && cap == 0 && spec == 0,
        format_args!("ROM {rom:#x}, capability pointer {cap:#x}, 0x40 {spec:#x}"),
    );
    // The chipset's reset control at 0xCF9 and odd-sized address-port accesses: #GP.
    // SAFETY: the hypervisor intercepts both ports; the probe catches the #GP it raises.
    let reset = unsafe { arch::probe!("out dx, al", in("dx") 0xcf9u16, in("al") 0x06u8) };
    t.check("reset-control", matches!(reset, Some((13, _))), format_args!("out 0xcf9: {reset:?}"));
    // SAFETY: as above.
    let narrow = unsafe { arch::probe!("out dx, al", in("dx") 0xcf8u16, in("al") 0x80u8) };
    t.check(
        "narrow-address",
        matches!(narrow, Some((13, _))),
        format_args!("byte out 0xcf8: {narrow:?}"),
    );
    log::info!("pciattacks done: {} run, {} as expected", t.run, t.good);
    if t.good != t.run {
        return 1;
    }
    window()
}

/// Reads the start of the device window: the attacker's own memory BARs would be there,
/// but it owns only I/O BARs, so nothing is mapped and the read is an EPT violation
/// (the victim's e1000 BAR is in the victim's window only).
fn window() -> u64 {
    log::info!("pciattack window: expecting to be stopped reading {:#x}", DEVICE_WINDOW.0);
    // The read below is meant to fault in the EPT.
    // SAFETY: after the runtime's init, on the one vCPU, no page-table reference alive.
    unsafe { arch::map_device_window() };
    // SAFETY: as above.
    let v = unsafe { core::ptr::read_volatile(DEVICE_WINDOW.0 as *const u32) };
    log::error!("pciattack window: UNEXPECTED: survived, read {v:#x}");
    1
}

/// An interrupt storm on its own line: see the module header.
fn storm(bi: &BootInfo, mine: &vmcall_proto::device::DeviceDesc) -> u64 {
    let Some(io) = mine.first_io_bar().map(|b| b.addr as u16) else {
        log::error!("pciattack storm: my card has no I/O BAR");
        return 1;
    };
    // The runtime's driver brings the card up (reset, started, interrupts routed).
    if let Err(e) = guestkernel::nic::Nic::open(bi, 0, pci::deadline_ms(2000)) {
        log::error!("pciattack storm: cannot open my card: {e:?}");
        return 1;
    }
    // First a measured storm: the handler leaves the cause for the first interrupts and
    // clears it at the STORM-th, so the loop gets its core back and can say how long they
    // took. (Bochs's I/O APIC sends a still-asserted level line again only when something
    // else makes it look at its inputs, not at once after the EOI as hardware does: in
    // Bochs this is a slow storm; on hardware the interrupt comes back at once.)
    pci::set_handler(0, storm_handler, io as u64);
    let t0 = arch::rdtsc();
    raise(io);
    let deadline = pci::deadline_ms(2000);
    while pci::interrupts(0) < STORM && arch::rdtsc() < deadline {
        arch::wait_for_interrupt();
    }
    let n = pci::interrupts(0);
    if n < STORM {
        log::error!("pciattack storm: UNEXPECTED: only {n} interrupts in 2 s");
        return 1;
    }
    log::info!(
        "pciattack storm: {STORM} interrupts with the cause left set (the line stays up after \
         each EOI), {} TSC ticks; now for good",
        pci::last_interrupt_tsc(0) - t0
    );
    log::info!(
        "pciattack storm: expecting to be stopped by my budget: my line stays up ({} device(s))",
        bi.device_count
    );
    STORM_FOREVER.store(true, core::sync::atomic::Ordering::Relaxed);
    raise(io);
    let deadline = pci::deadline_ms(60_000);
    while arch::rdtsc() < deadline {
        arch::wait_for_interrupt();
    }
    log::error!("pciattack storm: UNEXPECTED: survived 60 s, {} interrupts", pci::interrupts(0));
    1
}

/// Interrupts of the measured storm.
const STORM: u64 = 2;

/// Once set, the handler never clears the cause.
static STORM_FOREVER: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Remote-DMA-complete unmasked, then a zero-byte remote read: it completes at once and
/// sets the cause.
fn raise(io: u16) {
    use guestkernel::ne2k::{cr, isr, reg, IMR_VALUE};
    // SAFETY: the card's own I/O BAR, opened for this guest.
    unsafe {
        arch::outb(io + reg::IMR, IMR_VALUE | isr::RDC);
        arch::outb(io + reg::RBCR0, 0);
        arch::outb(io + reg::RBCR1, 0);
        arch::outb(io + reg::CR, cr::RD_READ | cr::STA | cr::PAGE0);
    }
}

/// Leaves the cause in the card (that is the storm), but for the STORM-th interrupt of the
/// measured one.
fn storm_handler(io: u64) -> u32 {
    use guestkernel::ne2k::{isr, reg, IMR_VALUE};
    let forever = STORM_FOREVER.load(core::sync::atomic::Ordering::Relaxed);
    if !forever && pci::interrupts(0) >= STORM {
        // SAFETY: the card's own I/O BAR: acknowledge and mask remote DMA complete.
        unsafe {
            arch::outb(io as u16 + reg::IMR, IMR_VALUE);
            arch::outb(io as u16 + reg::ISR, isr::RDC);
        }
    }
    0
}
