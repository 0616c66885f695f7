// SPDX-License-Identifier: MIT OR Apache-2.0
//! PCI: the machine's functions, found once at boot by the BSP, and the assignment of
//! functions to guests (the rules are in `vmcall_proto::device`).
//!
//! Owns: the function table ([`Functions`], written once by the BSP before any guest runs,
//! read-only afterwards), the resolution of config entries to functions ([`assign`]), and
//! the owner's view of configuration space ([`filter`]). The logic is written against the
//! [`ConfigSpace`] trait, so enumeration, sizing, resolution and filtering run in host tests
//! on a fake bus; [`Cf8`] is the real one (configuration mechanism #1, PCI Local Bus
//! Specification 3.0, 3.2.2.3.2).
//!
//! May call: `arch` (port I/O, in [`Cf8`] only), `vmcall_proto`. Nothing here calls guests,
//! exits or other cores.

pub mod filter;
pub mod ioapic;

use vmcall_proto::device::{self, bar_kind, Bdf, DeviceEntry, Selector, MAX_BARS};

/// Functions the table holds (a machine with more lists the first ones; the rest cannot be
/// assigned, and the log says so).
pub const MAX_FUNCTIONS: usize = 64;

/// Configuration-space offsets and bits (PCI Local Bus Specification 3.0, 6.1 and 6.2).
pub mod reg {
    pub const VENDOR: u16 = 0x00;
    pub const COMMAND: u16 = 0x04;
    pub const CLASS: u16 = 0x08;
    pub const BAR0: u16 = 0x10;
    pub const INTERRUPT_LINE: u16 = 0x3c;
    /// Command register bits.
    pub const CMD_IO: u16 = 1 << 0;
    pub const CMD_MEMORY: u16 = 1 << 1;
    pub const CMD_BUS_MASTER: u16 = 1 << 2;
    pub const CMD_INTX_DISABLE: u16 = 1 << 10;
    /// Status: the function has a capability list.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
}

/// Access to configuration space, 32 bits at a time at dword-aligned offsets.
pub trait ConfigSpace {
    fn read32(&mut self, f: Bdf, offset: u16) -> u32;
    fn write32(&mut self, f: Bdf, offset: u16, value: u32);
}

/// One BAR as found at boot (machine addresses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bar {
    /// One of `bar_kind`.
    pub kind: u32,
    /// A 64-bit memory BAR (it takes the next register too).
    pub wide: bool,
    /// The low flag bits of the register (memory: type and prefetchable; I/O: bit 0).
    pub flags: u32,
    /// Machine address (memory) or first port (I/O).
    pub base: u64,
    /// Bytes or ports; 0 when unimplemented.
    pub size: u64,
}

/// One function as found at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// Class, subclass, programming interface.
    pub class: u32,
    pub header_type: u8,
    /// INTx pin (0 none, 1..=4) and the line the firmware routed it to (0xff: none).
    pub pin: u8,
    pub line: u8,
    /// The command register as the firmware left it (restored at every clean death).
    pub command: u16,
    pub bars: [Bar; MAX_BARS],
}

impl Function {
    /// A bridge (class 06): it forwards accesses to other functions, so it is never given
    /// to a guest.
    pub fn is_bridge(&self) -> bool {
        self.class >> 16 == 0x06
    }
    /// A type-0 header (an endpoint; bridges and CardBus have others).
    pub fn is_endpoint(&self) -> bool {
        self.header_type & 0x7f == 0
    }
}

impl core::fmt::Display for Function {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} {:04x}:{:04x} class {:06x}", self.bdf, self.vendor, self.device, self.class)
    }
}

/// The machine's functions in bus order.
#[derive(Clone, Copy, Debug)]
pub struct Functions {
    list: [Option<Function>; MAX_FUNCTIONS],
    count: usize,
    /// Functions past [`MAX_FUNCTIONS`] that were seen but not kept.
    pub dropped: usize,
}

impl Functions {
    pub const fn empty() -> Self {
        Functions { list: [None; MAX_FUNCTIONS], count: 0, dropped: 0 }
    }
    pub fn iter(&self) -> impl Iterator<Item = &Function> {
        self.list[..self.count].iter().flatten()
    }
    pub fn get(&self, b: Bdf) -> Option<&Function> {
        self.iter().find(|f| f.bdf == b)
    }
    fn push(&mut self, f: Function) {
        if self.count < MAX_FUNCTIONS {
            self.list[self.count] = Some(f);
            self.count += 1;
        } else {
            self.dropped += 1;
        }
    }
    /// The function a config selector names, if the machine has it.
    pub fn find(&self, sel: Selector) -> Option<&Function> {
        match sel {
            Selector::Address(b) => self.get(b),
            Selector::Id { vendor, device, nth } => {
                self.iter().filter(|f| f.vendor == vendor && f.device == device).nth(nth as usize)
            }
        }
    }
}

/// Sizes the BARs of an endpoint (PCI 3.0, 6.2.5.1): decoding off while each register is
/// written all ones and read back, then the register and the command word restored.
fn size_bars(cs: &mut impl ConfigSpace, b: Bdf, command: u16) -> [Bar; MAX_BARS] {
    let mut bars = [Bar::default(); MAX_BARS];
    let cmd_dword = cs.read32(b, reg::COMMAND);
    cs.write32(
        b,
        reg::COMMAND,
        (cmd_dword & 0xffff_0000) | (command & !(reg::CMD_IO | reg::CMD_MEMORY)) as u32,
    );
    let mut i = 0;
    while i < MAX_BARS {
        let off = reg::BAR0 + 4 * i as u16;
        let orig = cs.read32(b, off);
        cs.write32(b, off, u32::MAX);
        let mask = cs.read32(b, off);
        cs.write32(b, off, orig);
        if orig & 1 == 1 {
            let m = mask & !3 & 0xffff;
            if m != 0 {
                let size = (!m & 0xffff) as u64 + 1;
                bars[i] = Bar {
                    kind: bar_kind::IO,
                    wide: false,
                    flags: orig & 3,
                    base: (orig & !3) as u64,
                    size,
                };
            }
            i += 1;
            continue;
        }
        let wide = (orig >> 1) & 3 == 2 && i + 1 < MAX_BARS;
        let (mut base, mut mask64) = ((orig & !0xf) as u64, (mask & !0xf) as u64);
        if wide {
            let hi_off = off + 4;
            let hi = cs.read32(b, hi_off);
            cs.write32(b, hi_off, u32::MAX);
            let hi_mask = cs.read32(b, hi_off);
            cs.write32(b, hi_off, hi);
            base |= (hi as u64) << 32;
            mask64 |= (hi_mask as u64) << 32;
        } else if mask64 != 0 {
            mask64 |= 0xffff_ffff_0000_0000;
        }
        if mask64 != 0 {
            bars[i] = Bar {
                kind: bar_kind::MEMORY,
                wide,
                flags: orig & 0xf,
                base,
                size: (!mask64).wrapping_add(1),
            };
        }
        i += if wide { 2 } else { 1 };
    }
    cs.write32(b, reg::COMMAND, (cmd_dword & 0xffff_0000) | command as u32);
    bars
}

fn probe(cs: &mut impl ConfigSpace, b: Bdf) -> Option<Function> {
    let id = cs.read32(b, reg::VENDOR);
    if id & 0xffff == 0xffff {
        return None;
    }
    let class = cs.read32(b, reg::CLASS) >> 8;
    let header_type = (cs.read32(b, 0x0c) >> 16) as u8;
    let irq = cs.read32(b, reg::INTERRUPT_LINE);
    let command = cs.read32(b, reg::COMMAND) as u16;
    let mut f = Function {
        bdf: b,
        vendor: id as u16,
        device: (id >> 16) as u16,
        class,
        header_type,
        pin: (irq >> 8) as u8,
        line: irq as u8,
        command,
        bars: [Bar::default(); MAX_BARS],
    };
    if f.is_endpoint() && !f.is_bridge() {
        f.bars = size_bars(cs, b, command);
    }
    Some(f)
}

/// Every function on every bus reachable from bus 0 (a brute-force scan of the bus numbers
/// bridges name: their secondary buses), in bus order.
pub fn enumerate(cs: &mut impl ConfigSpace) -> Functions {
    let mut out = Functions::empty();
    let mut buses = [false; 256];
    buses[0] = true;
    for bus in 0..=255u8 {
        if !buses[bus as usize] {
            continue;
        }
        for dev in 0..32u8 {
            let Some(f0) = probe(cs, Bdf::new(bus, dev, 0)) else { continue };
            let multi = f0.header_type & 0x80 != 0;
            for func in 0..if multi { 8 } else { 1 } {
                let f = if func == 0 { Some(f0) } else { probe(cs, Bdf::new(bus, dev, func)) };
                let Some(f) = f else { continue };
                if f.header_type & 0x7f == 1 {
                    // PCI-to-PCI bridge: its secondary bus (byte 0x19).
                    let secondary = (cs.read32(f.bdf, 0x18) >> 8) as u8;
                    if secondary > bus {
                        buses[secondary as usize] = true;
                    }
                }
                out.push(f);
            }
        }
    }
    q35_inputs(&mut out);
    out
}

/// QEMU's q35 board (host bridge 8086:29c0, the Q35 MCH, with the ICH9 LPC 8086:2918 at
/// 00:1f.0): PCI interrupts reach the I/O APIC on inputs 16-23, one per PIRQ A-H, besides
/// the ISA line the firmware routed each PIRQ to (SeaBIOS: A, B to 10; C, D to 11), which
/// is what the interrupt-line register says. Functions on bus 0 are wired as QEMU's ACPI
/// `_PRT` describes (slots 0-24: INTx of slot `s` on PIRQ `(s + x) mod 4`, x = 0 for
/// INTA; slots 25-31: INTA on PIRQ A, and so on), so their own input is taken instead:
/// cards in neighbouring slots (00:02.0 on PIRQ C, 00:03.0 on PIRQ D) then do not share
/// a line, as they do at 11. Functions behind a bridge keep the firmware's ISA line. Any
/// other machine keeps the interrupt-line register as the input (i440FX/PIIX: Bochs, QEMU
/// `pc`).
fn q35_inputs(fns: &mut Functions) {
    let id = |fns: &Functions, b: Bdf| fns.get(b).map(|f| (f.vendor, f.device));
    if id(fns, Bdf::new(0, 0, 0)) != Some((0x8086, 0x29c0))
        || id(fns, Bdf::new(0, 0x1f, 0)) != Some((0x8086, 0x2918))
    {
        return;
    }
    for f in fns.list[..fns.count].iter_mut().flatten() {
        if f.bdf.bus != 0 || !(1..=4).contains(&f.pin) {
            continue;
        }
        let (slot, pin) = (f.bdf.device, f.pin - 1);
        f.line = match slot {
            0..=23 => 20 + (slot + pin) % 4,
            25..=31 => 16 + pin,
            _ => continue,
        };
    }
}

/// Why a config entry cannot be given to its guest on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssignError {
    /// No function matches the selector.
    Missing,
    /// A bridge, or not a type-0 header.
    Bridge,
    /// A memory BAR does not fit the device window.
    WindowFull,
    /// Its interrupt line is also the line of a device an earlier guest owns.
    SharedLine,
    /// An earlier guest (config order) owns the same function, named another way.
    Taken,
    /// A BAR the firmware left unplaced (address 0), not a power of two in size, on the
    /// interrupt controllers' pages, on ports the hypervisor or the chipset keep, or sharing
    /// a page with another function's registers.
    BadBar,
    /// Its interrupt line is one of the platform's own (timer, keyboard, cascade, RTC, FPU).
    SystemLine,
    /// A device that masters the bus (known by its identity) without `dma = "unconfined"`:
    /// some (Bochs's e1000) ignore the command register's bus-master bit.
    NeedsDma,
}

impl AssignError {
    /// The reason the guest is reported `not_started` with.
    pub const fn reason(self) -> &'static str {
        match self {
            AssignError::Missing => "an assigned PCI device is not on this machine",
            AssignError::Bridge => "an assigned PCI device is a bridge (never assignable)",
            AssignError::WindowFull => "its devices' memory BARs do not fit the device window",
            AssignError::SharedLine => {
                "an assigned PCI device shares its interrupt line with another guest's device"
            }
            AssignError::Taken => "an assigned PCI device is already another guest's",
            AssignError::SystemLine => {
                "an assigned PCI device's interrupt line is one the platform itself uses"
            }
            AssignError::BadBar => {
                "an assigned PCI device has a BAR that cannot be given safely (unplaced, odd \
                 size, on reserved ports or pages, or sharing a page with another function)"
            }
            AssignError::NeedsDma => {
                "an assigned PCI device masters the bus and its entry lacks dma = \"unconfined\""
            }
        }
    }
}

/// One function given to a guest: what the guest is told and where things really are.
#[derive(Clone, Copy, Debug)]
pub struct Owned {
    pub func: Function,
    /// Guest-physical address of each memory BAR in the device window (0 for others).
    pub gpa: [u64; MAX_BARS],
    pub flags: u8,
    /// The vector its INTx arrives at in the owner (0: no interrupt routed).
    pub vector: u8,
}

impl Owned {
    /// The owner's boot-info entry.
    pub fn desc(&self) -> device::DeviceDesc {
        let f = &self.func;
        let mut bars = [device::BarDesc { kind: 0, wide: 0, addr: 0, size: 0 }; MAX_BARS];
        for (i, (d, b)) in bars.iter_mut().zip(f.bars).enumerate() {
            let addr = if b.kind == bar_kind::MEMORY { self.gpa[i] } else { b.base };
            *d = device::BarDesc { kind: b.kind, wide: b.wide as u32, addr, size: b.size };
        }
        device::DeviceDesc {
            bus: f.bdf.bus,
            device: f.bdf.device,
            function: f.bdf.function,
            irq_pin: f.pin,
            vector: self.vector,
            flags: self.flags,
            _reserved0: 0,
            vendor_id: f.vendor,
            device_id: f.device,
            class: f.class,
            bars,
        }
    }
    /// Whether the INTx line is routed (pin present, line set by the firmware).
    pub fn line(&self) -> Option<u8> {
        (self.func.pin != 0 && self.func.line != 0xff && self.func.line < 24)
            .then_some(self.func.line)
    }
}

/// The functions of one guest, in config order.
#[derive(Clone, Copy, Debug)]
pub struct Assigned {
    pub list: [Option<Owned>; device::MAX_DEVICES_PER_GUEST],
    pub count: usize,
}

impl Assigned {
    pub const fn none() -> Self {
        Assigned { list: [None; device::MAX_DEVICES_PER_GUEST], count: 0 }
    }
    pub fn iter(&self) -> impl Iterator<Item = &Owned> + Clone {
        self.list[..self.count].iter().flatten()
    }
    #[cfg(test)]
    pub fn get(&self, b: Bdf) -> Option<&Owned> {
        self.iter().find(|o| o.func.bdf == b)
    }
}

/// ISA interrupt lines the platform keeps: the timer, the keyboard, the PIC cascade, the
/// RTC, the FPU error line (an override in the MADT may move the timer to 2).
const SYSTEM_LINES: [u8; 5] = [0, 1, 2, 8, 13];

/// Pages no memory BAR given to a guest may touch: the I/O APIC's and the local APICs'.
const RESERVED_PAGES: [u64; 2] = [0xfec0_0000, 0xfee0_0000];

/// Ports no I/O BAR given to a guest may cover: the legacy chipset (PIC, PIT, keyboard
/// controller, port 0x92, DMA, CMOS) below 0x100, configuration mechanism #1 and the reset
/// control, the debug and POST ports, COM1 (the hypervisor's console), the Bochs/QEMU
/// shutdown and debug-exit ports.
const RESERVED_PORTS: [(u64, u64); 6] =
    [(0, 0x100), (0xcf8, 0xd00), (0x3f8, 0x400), (0x8900, 0x8901), (0x501, 0x502), (0xe9, 0xea)];

/// Whether `f`'s BARs can be handed to a guest (see [`AssignError::BadBar`]).
fn bars_acceptable(fns: &Functions, f: &Function) -> bool {
    for b in f.bars.iter().filter(|b| b.size > 0) {
        if b.base == 0 || !b.size.is_power_of_two() || b.base.checked_add(b.size).is_none() {
            return false;
        }
        let (start, end) = (b.base, b.base + b.size);
        if b.kind == bar_kind::IO {
            if end > 0x1_0000 || RESERVED_PORTS.iter().any(|&(s, e)| start < e && s < end) {
                return false;
            }
            continue;
        }
        // The pages it would be mapped with: no other function's BAR may share one.
        let (pstart, pend) = (start & !0xfff, (end + 0xfff) & !0xfff);
        if RESERVED_PAGES.iter().any(|&p| pstart <= p && p < pend) {
            return false;
        }
        let shared = fns.iter().filter(|o| o.bdf != f.bdf).any(|o| {
            o.bars.iter().any(|ob| {
                ob.kind == bar_kind::MEMORY
                    && ob.size > 0
                    && ob.base < pend
                    && pstart < ob.base + ob.size
            })
        });
        if shared {
            return false;
        }
    }
    true
}

/// Resolves guest `guest`'s entries of `all` against the machine's functions: each must
/// exist and be an endpoint; memory BARs are laid out in the device window, each naturally
/// aligned to its size; its interrupt line must not be a line of a device an earlier guest
/// (config order) owns: the first owner keeps the line, the later one is not started.
/// Pure: the caller reports the error (the guest is then not started).
pub fn assign(
    fns: &Functions,
    all: impl Iterator<Item = DeviceEntry> + Clone,
    guest: u16,
) -> Result<Assigned, AssignError> {
    let mut out = Assigned::none();
    let (start, end) = device::DEVICE_WINDOW;
    let mut next = start;
    for (i, e) in all.clone().filter(|e| e.guest == guest).enumerate() {
        let f = *fns.find(e.selector()).ok_or(AssignError::Missing)?;
        if f.is_bridge() || !f.is_endpoint() {
            return Err(AssignError::Bridge);
        }
        // The same function named twice (by address and by identity): the earlier guest
        // keeps it; twice for one guest is refused too.
        let resolves_here =
            |o: &DeviceEntry| fns.find(o.selector()).is_some_and(|x| x.bdf == f.bdf);
        if all.clone().filter(|o| o.guest < guest).any(|o| resolves_here(&o))
            || out.iter().any(|o| o.func.bdf == f.bdf)
        {
            return Err(AssignError::Taken);
        }
        if device::known_bus_master(f.vendor, f.device)
            && e.flags & device::flags::DMA_UNCONFINED == 0
        {
            return Err(AssignError::NeedsDma);
        }

        if f.pin != 0 && SYSTEM_LINES.contains(&f.line) {
            return Err(AssignError::SystemLine);
        }
        if f.pin != 0 && f.line < 24 {
            let others = all
                .clone()
                .filter(|o| o.guest < guest)
                .filter_map(|o| fns.find(o.selector()))
                .any(|o| o.pin != 0 && o.line == f.line);
            if others {
                return Err(AssignError::SharedLine);
            }
        }
        let mut gpa = [0; MAX_BARS];
        for (g, b) in gpa.iter_mut().zip(f.bars) {
            if b.kind != bar_kind::MEMORY || b.size == 0 {
                continue;
            }
            // Whole pages, naturally aligned (sizes are powers of two).
            let size = b.size.max(4096);
            let at = next.checked_next_multiple_of(size).ok_or(AssignError::WindowFull)?;
            if at.checked_add(size).is_none_or(|e| e > end) || b.base % 4096 != 0 {
                return Err(AssignError::WindowFull);
            }
            *g = at;
            next = at + size;
        }
        if !bars_acceptable(fns, &f) {
            return Err(AssignError::BadBar);
        }
        let owned = Owned { func: f, gpa, flags: e.flags, vector: 0 };
        let vector = if owned.line().is_some() { device::device_vector(i) } else { 0 };
        out.list[i] = Some(Owned { vector, ..owned });
        out.count = i + 1;
    }
    Ok(out)
}

/// The machine's functions, found by the BSP at boot before any guest runs; read-only
/// afterwards (each core reads its guest's entries from its launch message, not from here).
static FUNCTIONS: spin::Once<Functions> = spin::Once::new();

/// Enumerates the machine once (the BSP, at boot) and logs every function.
pub fn discover(cs: &mut impl ConfigSpace) -> &'static Functions {
    FUNCTIONS.call_once(|| enumerate(cs))
}

/// The table, once [`discover`] ran.
pub fn functions() -> Option<&'static Functions> {
    FUNCTIONS.get()
}

/// Configuration mechanism #1 on this machine's ports 0xCF8/0xCFC. Only the hypervisor
/// touches these ports (guests' accesses exit and go through [`filter`]); the address and
/// data ports are one register pair, so an access is two port operations that must not
/// interleave with another core's: they run under one lock with interrupts as they are
/// (the hypervisor runs with them off).
#[cfg(target_os = "none")]
pub struct Cf8;

#[cfg(target_os = "none")]
static CF8_LOCK: spin::Mutex<()> = spin::Mutex::new(());

#[cfg(target_os = "none")]
impl ConfigSpace for Cf8 {
    fn read32(&mut self, f: Bdf, offset: u16) -> u32 {
        let _g = CF8_LOCK.lock();
        // Configuration mechanism #1: the address port, then the data port.
        // SAFETY: no other core uses the pair while the lock is held.
        unsafe {
            crate::arch::outl(
                device::PCI_CONFIG_ADDRESS,
                1 << 31 | f.cf8_bits() | (offset & 0xfc) as u32,
            );
            crate::arch::inl(device::PCI_CONFIG_DATA)
        }
    }
    fn write32(&mut self, f: Bdf, offset: u16, value: u32) {
        let _g = CF8_LOCK.lock();
        // Callers write only registers of functions the hypervisor decided to touch
        // (sizing at boot, the owner's filtered writes, quiescing at death).
        // SAFETY: as for `read32`: the pair is ours while the lock is held.
        unsafe {
            crate::arch::outl(
                device::PCI_CONFIG_ADDRESS,
                1 << 31 | f.cf8_bits() | (offset & 0xfc) as u32,
            );
            crate::arch::outl(device::PCI_CONFIG_DATA, value);
        }
    }
}

/// Puts an owned function in its boot state when its owner dies (before the owner's memory
/// is scrubbed): bus mastering, memory and I/O decoding off and INTx disabled in one write
/// (PCI 3.0, 6.2.2: with bus mastering off the function starts no new transaction), read
/// back so the write has reached the function, then the firmware's command word restored
/// but with bus mastering left off and INTx disabled (the owner's driver turns it on). Conventional PCI has no function-level reset; a
/// function whose PCIe capability advertises FLR would get one here (none in Bochs).
pub fn quiesce(cs: &mut impl ConfigSpace, o: &Owned) {
    let b = o.func.bdf;
    // The status half written as zeros: its bits are write-one-to-clear.
    cs.write32(b, reg::COMMAND, reg::CMD_INTX_DISABLE as u32);
    let _ = cs.read32(b, reg::COMMAND);
    let boot = (o.func.command | reg::CMD_INTX_DISABLE) & !reg::CMD_BUS_MASTER;
    cs.write32(b, reg::COMMAND, boot as u32);
}

/// Disables the INTx of a function nobody owns (its command register's other bits as
/// they are), so it cannot assert a line an owned device shares.
pub fn silence(cs: &mut impl ConfigSpace, f: &Function) {
    let cmd = cs.read32(f.bdf, reg::COMMAND) as u16;
    if cmd & reg::CMD_INTX_DISABLE == 0 {
        cs.write32(f.bdf, reg::COMMAND, (cmd | reg::CMD_INTX_DISABLE) as u32);
    }
}

/// Stops a known bus master through its own registers (the command register's bus-master
/// bit is not enough for every device: Bochs's e1000 ignores it and keeps its receive and
/// transmit DMA going). For the 82540EM (Intel 8254x developer's manual, 13.4): all
/// interrupts masked (IMC), receive and transmit off (RCTL, TCTL), then a device reset
/// (CTRL.RST), waited for with a bound. Needs memory decoding on: call it before the
/// command register is quiesced. Returns whether the device came out of reset in time.
#[cfg(target_os = "none")]
pub fn quiesce_registers(o: &Owned) -> bool {
    if (o.func.vendor, o.func.device) != (0x8086, 0x100e) {
        return true;
    }
    let bar = o.func.bars[0];
    if bar.kind != bar_kind::MEMORY || bar.size < 0x1000 || bar.base >= 1 << 32 {
        return false;
    }
    let reg = |off: u64| (bar.base + off) as *mut u32;
    // The function's own BAR0 (sized at boot, checked by `assign`); its owner is not running.
    // SAFETY: in the uncached top GiB of the hypervisor's identity map, below 4 GiB (checked).
    unsafe {
        core::ptr::write_volatile(reg(0xd8), u32::MAX); // IMC
        core::ptr::write_volatile(reg(0x100), 0); // RCTL
        core::ptr::write_volatile(reg(0x400), 0); // TCTL
        let ctrl = core::ptr::read_volatile(reg(0));
        core::ptr::write_volatile(reg(0), ctrl | 1 << 26); // CTRL.RST
    }
    let deadline = crate::arch::tsc::deadline_us(10_000);
    while crate::arch::rdtsc() < deadline {
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(reg(0)) } & (1 << 26) == 0 {
            return true;
        }
        crate::arch::pause();
    }
    false
}

#[cfg(test)]
pub mod fake {
    //! A fake bus for host tests: functions with writable registers and BAR masks.
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    pub struct Bus {
        pub regs: HashMap<(Bdf, u16), u32>,
        /// BAR size masks: the bits a BAR register keeps when written.
        pub masks: HashMap<(Bdf, u16), u32>,
        pub writes: Vec<(Bdf, u16, u32)>,
    }

    impl Bus {
        /// Adds an endpoint with BARs `(offset, value, size_mask)`.
        pub fn add(
            &mut self,
            b: Bdf,
            id: u32,
            class: u32,
            header: u8,
            irq: (u8, u8),
            bars: &[(u16, u32, u32)],
        ) {
            self.regs.insert((b, 0), id);
            self.regs.insert((b, 4), 0x0010_0007);
            self.regs.insert((b, 8), class << 8);
            self.regs.insert((b, 0xc), (header as u32) << 16);
            self.regs.insert((b, 0x3c), (irq.0 as u32) << 8 | irq.1 as u32);
            // Unimplemented BARs and the ROM are hardwired to zero.
            for off in (0x10..=0x24).step_by(4).chain([0x30]) {
                self.masks.insert((b, off), 0);
            }
            for &(off, v, m) in bars {
                self.regs.insert((b, off), v);
                self.masks.insert((b, off), m);
            }
        }
    }

    impl ConfigSpace for Bus {
        fn read32(&mut self, f: Bdf, offset: u16) -> u32 {
            *self.regs.get(&(f, offset)).unwrap_or(if self.regs.contains_key(&(f, 0)) {
                &0
            } else {
                &u32::MAX
            })
        }
        fn write32(&mut self, f: Bdf, offset: u16, value: u32) {
            self.writes.push((f, offset, value));
            if !self.regs.contains_key(&(f, 0)) {
                return;
            }
            let v = match self.masks.get(&(f, offset)) {
                Some(&m) => {
                    let low = self.regs.get(&(f, offset)).copied().unwrap_or(0) & !m;
                    (value & m) | low
                }
                None => value,
            };
            self.regs.insert((f, offset), v);
        }
    }

    /// Bochs-like: host bridge, ISA bridge, an e1000 (128 KiB memory BAR, I/O BAR, INTA on
    /// line 11) and an NE2000 (I/O BAR, INTA on line 10).
    pub fn bochs() -> Bus {
        let mut bus = Bus::default();
        bus.add(Bdf::new(0, 0, 0), 0x1237_8086, 0x06_00_00, 0, (0, 0), &[]);
        bus.add(Bdf::new(0, 1, 0), 0x7000_8086, 0x06_01_00, 0x80, (0, 0), &[]);
        bus.add(
            Bdf::new(0, 2, 0),
            0x100e_8086,
            0x02_00_00,
            0,
            (1, 11),
            &[(0x10, 0xfebc_0000, 0xfffe_0000), (0x14, 0xc001, 0xffff_ffc0)],
        );
        bus.add(
            Bdf::new(0, 3, 0),
            0x8029_10ec,
            0x02_00_00,
            0,
            (1, 10),
            &[(0x10, 0xc101, 0xffff_ffe0)],
        );
        bus
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcall_proto::device::{device_entry, flags, parse_selector};

    #[test]
    fn enumeration_finds_functions_and_sizes_bars() {
        let mut bus = fake::bochs();
        let fns = enumerate(&mut bus);
        let list: Vec<_> = fns.iter().map(|f| f.bdf.to_string()).collect();
        assert_eq!(list, ["00:00.0", "00:01.0", "00:02.0", "00:03.0"]);
        let nic = fns.get(Bdf::new(0, 2, 0)).unwrap();
        assert_eq!(
            (nic.vendor, nic.device, nic.class, nic.pin, nic.line),
            (0x8086, 0x100e, 0x020000, 1, 11)
        );
        assert_eq!(
            nic.bars[0],
            Bar {
                kind: bar_kind::MEMORY,
                wide: false,
                flags: 0,
                base: 0xfebc_0000,
                size: 0x2_0000
            }
        );
        assert_eq!(
            nic.bars[1],
            Bar { kind: bar_kind::IO, wide: false, flags: 1, base: 0xc000, size: 0x40 }
        );
        assert_eq!(nic.bars[2].size, 0);
        // Sizing left every register as it was, decoding back on.
        assert_eq!(bus.regs[&(Bdf::new(0, 2, 0), 0x10)], 0xfebc_0000);
        assert_eq!(bus.regs[&(Bdf::new(0, 2, 0), 4)] & 3, 3);
        // Decoding was off while a BAR held all ones.
        let w = &bus.writes;
        let ones = w
            .iter()
            .position(|&(b, o, v)| b == Bdf::new(0, 2, 0) && o == 0x10 && v == u32::MAX)
            .unwrap();
        let off =
            w[..ones].iter().rposition(|&(b, o, _)| b == Bdf::new(0, 2, 0) && o == 4).unwrap();
        assert_eq!(w[off].2 & 3, 0);
        // Bridges are not sized.
        assert!(fns.get(Bdf::new(0, 0, 0)).unwrap().bars.iter().all(|b| b.size == 0));
    }

    #[test]
    fn sixty_four_bit_bars_take_two_registers() {
        let mut bus = fake::Bus::default();
        let b = Bdf::new(0, 5, 0);
        bus.add(
            b,
            0x1234_1af4,
            0x01_00_00,
            0,
            (1, 5),
            &[(0x10, 0x8000_000c, 0xffff_c000), (0x14, 0x1, 0xffff_ffff)],
        );
        let f = *enumerate(&mut bus).get(b).unwrap();
        assert_eq!(
            (f.bars[0].kind, f.bars[0].wide, f.bars[0].base, f.bars[0].size),
            (bar_kind::MEMORY, true, 0x1_8000_0000, 0x4000)
        );
        assert_eq!(f.bars[1].size, 0);
    }

    fn entries(list: &[(u16, &str)]) -> Vec<DeviceEntry> {
        list.iter()
            .map(|&(g, s)| device_entry(g, parse_selector(s).unwrap(), flags::DMA_UNCONFINED))
            .collect()
    }

    #[test]
    fn assignment_resolves_lays_out_and_refuses() {
        let fns = enumerate(&mut fake::bochs());
        let e = entries(&[(0, "8086:100e"), (1, "00:03.0")]);
        let a = assign(&fns, e.iter().copied(), 0).unwrap();
        let o = a.get(Bdf::new(0, 2, 0)).unwrap();
        assert_eq!(o.gpa[0], device::DEVICE_WINDOW.0);
        assert_eq!((o.vector, o.line()), (device::device_vector(0), Some(11)));
        let d = o.desc();
        assert_eq!(
            (d.bars[0].addr, d.bars[0].size, d.bars[1].addr),
            (0x4000_0000, 0x2_0000, 0xc000)
        );
        assert_eq!(assign(&fns, e.iter().copied(), 1).unwrap().count, 1);
        assert_eq!(assign(&fns, e.iter().copied(), 2).unwrap().count, 0);
        let missing = entries(&[(0, "00:09.0")]);
        assert_eq!(assign(&fns, missing.iter().copied(), 0).unwrap_err(), AssignError::Missing);
        let second = entries(&[(0, "8086:100e#1")]);
        assert_eq!(assign(&fns, second.iter().copied(), 0).unwrap_err(), AssignError::Missing);
        let bridge = entries(&[(0, "00:01.0")]);
        assert_eq!(assign(&fns, bridge.iter().copied(), 0).unwrap_err(), AssignError::Bridge);
        // Two guests' devices on one line.
        let mut bus = fake::bochs();
        bus.regs.insert((Bdf::new(0, 3, 0), 0x3c), 0x010b);
        let fns = enumerate(&mut bus);
        let e = entries(&[(0, "00:02.0"), (1, "00:03.0")]);
        assert_eq!(assign(&fns, e.iter().copied(), 1).unwrap_err(), AssignError::SharedLine);
        assert_eq!(assign(&fns, e.iter().copied(), 0).unwrap().count, 1, "the first keeps it");
        // ... but one guest may own both.
        let e = entries(&[(0, "00:02.0"), (0, "00:03.0")]);
        assert_eq!(assign(&fns, e.iter().copied(), 0).unwrap().count, 2);
    }

    #[test]
    fn bars_that_do_not_fit_the_window_are_refused() {
        let mut bus = fake::Bus::default();
        let b = Bdf::new(0, 4, 0);
        // A 2-GiB BAR: larger than the 1-GiB window.
        bus.add(b, 0x1111_1234, 0x03_00_00, 0, (0, 0xff), &[(0x10, 0x8000_0000, 0x8000_0000)]);
        let fns = enumerate(&mut bus);
        let e = entries(&[(0, "00:04.0")]);
        assert_eq!(assign(&fns, e.iter().copied(), 0).unwrap_err(), AssignError::WindowFull);
    }

    // ---- Review of the device-assignment change (branch `review`). Each test states the
    // behaviour the rules promise; the ignored ones fail on the code as reviewed (run them
    // with `cargo test -p hypervisor --bins pci:: -- --ignored`).

    /// A Bochs-like bus plus the PIIX3 IDE function (00:01.1: no INTx pin, a 16-port
    /// bus-master I/O BAR) and the PIIX4-style ACPI function (00:01.3: pin A, line 9).
    fn bochs_with_piix_functions() -> fake::Bus {
        let mut bus = fake::bochs();
        bus.add(
            Bdf::new(0, 1, 1),
            0x7010_8086,
            0x01_01_80,
            0,
            (0, 0),
            &[(0x20, 0xc081, 0xffff_fff0)],
        );
        bus.add(Bdf::new(0, 1, 3), 0x7113_8086, 0x06_80_00, 0, (1, 9), &[]);
        bus
    }

    #[test]
    fn a_function_named_by_address_and_by_identity_has_one_owner() {
        let fns = enumerate(&mut bochs_with_piix_functions());
        // The blob check compares selectors, not functions: both entries pass it.
        let e = entries(&[(0, "00:01.1"), (1, "8086:7010")]);
        assert_ne!(e[0].selector(), e[1].selector());
        let first = assign(&fns, e.iter().copied(), 0).expect("guest 0 owns the IDE function");
        assert_eq!(first.count, 1);
        // Guest 1 must not own the same function: today it does (no INTx pin, so the shared-
        // line rule, which catches this by accident for the NICs, does not apply).
        let second = assign(&fns, e.iter().copied(), 1);
        assert!(second.is_err(), "00:01.1 owned by guest 0 AND guest 1: {second:?}");
    }

    #[test]
    fn a_pinned_function_named_twice_is_refused_as_taken() {
        // The same e1000 by address for guest 0 and by identity for guest 1: guest 1 is not
        // started, for the right reason; and one guest naming it twice is refused too.
        let fns = enumerate(&mut fake::bochs());
        let e = entries(&[(0, "00:02.0"), (1, "8086:100e")]);
        assert_eq!(assign(&fns, e.iter().copied(), 1).unwrap_err(), AssignError::Taken);
        let twice = entries(&[(0, "00:02.0"), (0, "8086:100e")]);
        assert_eq!(assign(&fns, twice.iter().copied(), 0).unwrap_err(), AssignError::Taken);
    }

    #[test]
    fn known_bus_masters_need_the_dma_rule_and_reserved_ports_are_refused() {
        let fns = enumerate(&mut fake::bochs());
        let no_dma = [device_entry(0, parse_selector("00:02.0").unwrap(), 0)];
        assert_eq!(assign(&fns, no_dma.into_iter(), 0).unwrap_err(), AssignError::NeedsDma);
        // An I/O BAR over COM1, the hypervisor's console: refused.
        let mut bus = fake::Bus::default();
        let b = Bdf::new(0, 5, 0);
        bus.add(b, 0x1234_1af4, 0x02_00_00, 0, (0, 0xff), &[(0x10, 0x3f9, 0xffff_fff9)]);
        let fns = enumerate(&mut bus);
        let e = entries(&[(0, "00:05.0")]);
        assert_eq!(assign(&fns, e.iter().copied(), 0).unwrap_err(), AssignError::BadBar);
    }

    #[test]
    fn unassigned_bars_are_refused() {
        let mut bus = fake::Bus::default();
        let b = Bdf::new(0, 5, 0);
        // A 16-MiB memory BAR and a 256-port I/O BAR the firmware did not place (both 0).
        bus.add(
            b,
            0x1234_1af4,
            0x03_00_00,
            0,
            (0, 0xff),
            &[(0x10, 0, 0xff00_0000), (0x14, 1, 0xffff_ff01)],
        );
        let fns = enumerate(&mut bus);
        let f = fns.get(b).unwrap();
        assert_eq!((f.bars[0].base, f.bars[0].size), (0, 0x100_0000));
        assert_eq!((f.bars[1].base, f.bars[1].size), (0, 0x100));
        let e = entries(&[(0, "00:05.0")]);
        // Today: accepted; the EPT would map GPA 0x4000_0000.. to MACHINE 0..16 MiB (the
        // hypervisor, other partitions) and the I/O bitmap would open ports 0..0xff (PIC,
        // PIT, keyboard controller 0x64 reset, port 0x92 fast reset).
        let r = assign(&fns, e.iter().copied(), 0);
        assert!(
            r.is_err(),
            "BARs at machine address 0 / port 0 accepted: {:?}",
            r.map(|a| a.list[0].unwrap().gpa)
        );
        assert_eq!(r.unwrap_err(), AssignError::BadBar);
    }

    #[test]
    fn a_sub_page_bar_sharing_its_page_with_another_function_is_refused() {
        let mut bus = fake::Bus::default();
        // Two functions whose 256-byte BARs the firmware packed into one page (what PC
        // firmware does for small BARs, e.g. EHCI/SMBus on Intel chipsets).
        let (a, b) = (Bdf::new(0, 5, 0), Bdf::new(0, 6, 0));
        bus.add(a, 0x1111_8086, 0x0c_03_20, 0, (0, 0xff), &[(0x10, 0xfebf_0000, 0xffff_ff00)]);
        bus.add(b, 0x2222_8086, 0x0c_03_20, 0, (0, 0xff), &[(0x10, 0xfebf_0100, 0xffff_ff00)]);
        let fns = enumerate(&mut bus);
        let e = entries(&[(0, "00:05.0"), (1, "00:06.0")]);
        let r = assign(&fns, e.iter().copied(), 0);
        // Today guest 0 is given the whole page 0xfebf_0000..0xfebf_1000 (the caller maps
        // `size.max(4096)`), 00:06.0's registers included.
        assert!(r.is_err(), "page 0xfebf_0000 (00:06.0's BAR at +0x100) mapped to guest 0");
    }

    #[test]
    fn quiescing_leaves_intx_disabled() {
        let mut bus = fake::bochs();
        let fns = enumerate(&mut bus);
        let e = entries(&[(0, "00:02.0")]);
        let o = *assign(&fns, e.iter().copied(), 0).unwrap().get(Bdf::new(0, 2, 0)).unwrap();
        bus.regs.insert((o.func.bdf, 4), 0x0000_0007);
        quiesce(&mut bus, &o);
        let last = bus.regs[&(o.func.bdf, 4)];
        assert_ne!(last & reg::CMD_INTX_DISABLE as u32, 0, "command {last:#x}: INTx enabled");
    }

    #[test]
    fn on_qemus_q35_bus_zero_functions_take_their_own_pirq_input() {
        let mut bus = fake::Bus::default();
        bus.add(Bdf::new(0, 0, 0), 0x29c0_8086, 0x06_00_00, 0, (0, 0), &[]);
        bus.add(Bdf::new(0, 2, 0), 0x100e_8086, 0x02_00_00, 0, (1, 11), &[]);
        bus.add(Bdf::new(0, 3, 0), 0x8029_10ec, 0x02_00_00, 0, (1, 11), &[]);
        bus.add(Bdf::new(0, 4, 0), 0x8029_10ec, 0x02_00_00, 0, (1, 10), &[]);
        bus.add(Bdf::new(0, 0x1f, 0), 0x2918_8086, 0x06_01_00, 0x80, (0, 0), &[]);
        bus.add(Bdf::new(0, 0x1f, 2), 0x2922_8086, 0x01_06_01, 0, (1, 10), &[]);
        let fns = enumerate(&mut bus);
        let line = |d, f| fns.get(Bdf::new(0, d, f)).unwrap().line;
        // PIRQ G, H, E: inputs 22, 23, 20 (SeaBIOS routed G and H both to 11).
        assert_eq!((line(2, 0), line(3, 0), line(4, 0)), (22, 23, 20));
        assert_eq!(line(0x1f, 2), 16);
        assert_eq!(line(0, 0), 0, "no pin, no input");
        // Not a q35 (no ICH9 LPC): the firmware's lines stay.
        let mut bus = fake::Bus::default();
        bus.add(Bdf::new(0, 0, 0), 0x29c0_8086, 0x06_00_00, 0, (0, 0), &[]);
        bus.add(Bdf::new(0, 2, 0), 0x100e_8086, 0x02_00_00, 0, (1, 11), &[]);
        assert_eq!(enumerate(&mut bus).get(Bdf::new(0, 2, 0)).unwrap().line, 11);
    }

    #[test]
    fn a_line_shared_with_an_unowned_function_is_routed() {
        // The e1000 given line 9, which the ACPI function (SCI) also uses: nothing refuses or
        // reports it; its interrupts would arrive at the owner's vector, and the owner can
        // never clear their cause.
        let mut bus = bochs_with_piix_functions();
        bus.regs.insert((Bdf::new(0, 2, 0), 0x3c), 0x0109);
        let fns = enumerate(&mut bus);
        let e = entries(&[(0, "00:02.0")]);
        let a = assign(&fns, e.iter().copied(), 0).unwrap();
        assert_eq!(a.list[0].unwrap().line(), Some(9));
    }

    #[test]
    fn a_device_on_a_system_line_is_refused() {
        let mut bus = fake::bochs();
        bus.regs.insert((Bdf::new(0, 3, 0), 0x3c), 0x0100);
        let fns = enumerate(&mut bus);
        let e = entries(&[(0, "00:03.0")]);
        assert_eq!(assign(&fns, e.iter().copied(), 0).unwrap_err(), AssignError::SystemLine);
    }

    #[test]
    fn silencing_disables_intx_and_keeps_the_rest() {
        let mut bus = fake::bochs();
        let fns = enumerate(&mut bus);
        let f = *fns.get(Bdf::new(0, 3, 0)).unwrap();
        bus.regs.insert((f.bdf, 4), 0x0010_0003);
        bus.writes.clear();
        silence(&mut bus, &f);
        assert_eq!(bus.regs[&(f.bdf, 4)], 0x0000_0403, "status half written as zeros");
        bus.writes.clear();
        silence(&mut bus, &f);
        assert!(bus.writes.is_empty(), "nothing to do the second time");
    }

    #[test]
    fn quiescing_turns_off_mastering_and_interrupts() {
        let mut bus = fake::bochs();
        let fns = enumerate(&mut bus);
        let e = entries(&[(0, "00:02.0")]);
        let o = *assign(&fns, e.iter().copied(), 0).unwrap().get(Bdf::new(0, 2, 0)).unwrap();
        bus.regs.insert((o.func.bdf, 4), 0x0000_0007);
        bus.writes.clear();
        quiesce(&mut bus, &o);
        let (_, _, first) = bus.writes[0];
        assert_eq!(first & 0x7, 0, "decoding and mastering off first");
        assert_ne!(first & reg::CMD_INTX_DISABLE as u32, 0);
        let last = bus.regs[&(o.func.bdf, 4)];
        assert_eq!(last & reg::CMD_BUS_MASTER as u32, 0, "mastering stays off");
    }
}
