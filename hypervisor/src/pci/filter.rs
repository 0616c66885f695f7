// SPDX-License-Identifier: MIT OR Apache-2.0
//! A guest's view of PCI configuration space: configuration mechanism #1 (ports 0xCF8 and
//! 0xCFC..0xCFF) emulated over the owner's functions and nothing else.
//!
//! The policy (what `vmcall_proto::device` promises):
//! * The address register (0xCF8, 32-bit accesses only) is a per-guest latch; the real
//!   register is written only by [`super::Cf8`] under its lock. Byte or word accesses to
//!   0xCF8..0xCFB are not configuration accesses (0xCF9 is the chipset's reset control):
//!   [`View::io`] returns `None` and the exit handler raises #GP.
//! * A function the guest does not own reads as absent (all ones) and its writes are
//!   dropped, whatever the register: bridges, other guests' devices, the host bridge.
//! * Owned functions: identity, class, header type, BIST, subsystem ids and the interrupt
//!   pin read through.
//!   The command register takes only I/O and memory decoding, INTx disable and (with
//!   `dma = "unconfined"`) bus mastering; the status register only its write-one-to-clear
//!   error bits. BARs are emulated: they read the device-window address (memory) or the
//!   real port base (I/O), sizing with all ones reads the size mask, and any other write is
//!   dropped: the real BARs never change. The expansion ROM BAR and the capability list
//!   are hidden (no MSI: the interrupt is INTx, routed by the hypervisor), the device-
//!   specific registers from 0x40 read as zero and take no writes, and the interrupt line
//!   reads 0xff (the guest is given its vector in the boot info instead).
//!
//! Pure logic over [`ConfigSpace`]: host-tested against a fake bus.
//! May call: `super` (the function table types), `vmcall_proto`.

use super::{reg, Assigned, ConfigSpace, Owned};
use vmcall_proto::device::{bar_kind, flags, Bdf, MAX_BARS, MAX_DEVICES_PER_GUEST};

/// One guest's configuration-space view.
#[derive(Clone, Copy, Debug)]
pub struct View {
    devices: Assigned,
    /// The guest's address register.
    latch: u32,
    /// Per owned device and BAR: the last write was all ones (a sizing read follows).
    sizing: [[bool; MAX_BARS]; MAX_DEVICES_PER_GUEST],
    /// Writes that were dropped (not owned, or not the guest's to make).
    pub dropped: u32,
    /// Configuration accesses served.
    pub accesses: u32,
}

/// Command-register bits an owner may set.
fn command_allowed(o: &Owned) -> u16 {
    let mut bits = reg::CMD_IO | reg::CMD_MEMORY | reg::CMD_INTX_DISABLE;
    if o.flags & flags::DMA_UNCONFINED != 0 {
        bits |= reg::CMD_BUS_MASTER;
    }
    bits
}

/// Status-register bits a write of one clears (PCI 3.0, 6.2.3): parity and abort errors.
const STATUS_W1C: u16 = 0xf900;

impl View {
    pub fn new(devices: &Assigned) -> Self {
        View {
            devices: *devices,
            latch: 0,
            sizing: [[false; MAX_BARS]; MAX_DEVICES_PER_GUEST],
            dropped: 0,
            accesses: 0,
        }
    }

    /// Whether the guest owns any function (a guest that owns none has no PCI at all: the
    /// ports raise #GP as every other port does).
    pub fn owns_any(&self) -> bool {
        self.devices.count > 0
    }

    /// A port access of `size` bytes (1, 2 or 4) at `port`, `write` carrying the value
    /// written. Returns the value read (for a write: 0), or `None` when this is not a
    /// configuration access (the caller raises #GP).
    pub fn io(
        &mut self,
        cs: &mut impl ConfigSpace,
        port: u16,
        size: u8,
        write: Option<u32>,
    ) -> Option<u32> {
        use vmcall_proto::device::{PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA};
        if !self.owns_any() || !matches!(size, 1 | 2 | 4) {
            return None;
        }
        if port == PCI_CONFIG_ADDRESS && size == 4 {
            match write {
                // Bits 1:0 of the address register read as zero (PCI 3.0, 3.2.2.3.2).
                Some(v) => self.latch = v & !3,
                None => return Some(self.latch),
            }
            return Some(0);
        }
        let lane = port.checked_sub(PCI_CONFIG_DATA)?;
        if lane > 3 || lane + size as u16 > 4 {
            return None;
        }
        self.accesses = self.accesses.saturating_add(1);
        let mask = if size == 4 { u32::MAX } else { (1u32 << (8 * size)) - 1 };
        let shift = 8 * lane as u32;
        // Enable bit clear, or reserved bits 30:24 set (extended registers of some
        // chipsets): nothing is addressed.
        let target = (self.latch & 0x8000_0000 != 0 && self.latch & 0x7f00_0000 == 0)
            .then(|| Bdf::from_cf8(self.latch))
            .and_then(|b| self.index(b));
        let offset = (self.latch & 0xfc) as u16;
        let Some(i) = target else {
            if write.is_some() {
                self.dropped = self.dropped.saturating_add(1);
                return Some(0);
            }
            return Some(mask);
        };
        match write {
            None => Some((self.read(cs, i, offset) >> shift) & mask),
            Some(v) => {
                self.write(cs, i, offset, (v & mask) << shift, mask << shift);
                Some(0)
            }
        }
    }

    fn index(&self, b: Bdf) -> Option<usize> {
        self.devices.list[..self.devices.count]
            .iter()
            .position(|o| o.is_some_and(|o| o.func.bdf == b))
    }

    fn owned(&self, i: usize) -> Owned {
        self.devices.list[i].expect("index() only returns present entries")
    }

    /// The dword at `offset` as the owner sees it.
    fn read(&mut self, cs: &mut impl ConfigSpace, i: usize, offset: u16) -> u32 {
        let o = self.owned(i);
        let b = o.func.bdf;
        match offset {
            reg::COMMAND => cs.read32(b, offset) & !((reg::STATUS_CAP_LIST as u32) << 16),
            0x10..=0x24 => self.bar(i, ((offset - reg::BAR0) / 4) as usize),
            reg::INTERRUPT_LINE => (cs.read32(b, offset) & 0xffff_ff00) | 0xff,
            // Identity, class, header type; the subsystem ids.
            0x00..=0x0c | 0x2c => cs.read32(b, offset),
            // The expansion ROM BAR, the capability pointer, device-specific registers.
            _ => 0,
        }
    }

    /// BAR register `k` of owned device `i` as the owner sees it.
    fn bar(&self, i: usize, k: usize) -> u32 {
        let o = self.owned(i);
        let sizing = self.sizing[i][k];
        let bar = o.func.bars[k];
        // The upper half of a 64-bit BAR: the window is below 4 GiB; the size mask's
        // upper half is all ones (no BAR we map is 4 GiB or more).
        if k > 0 && o.func.bars[k - 1].wide && o.func.bars[k - 1].kind == bar_kind::MEMORY {
            return if sizing { u32::MAX } else { 0 };
        }
        match bar.kind {
            bar_kind::MEMORY if bar.size > 0 => {
                let value = if sizing { !(bar.size - 1) } else { o.gpa[k] };
                (value as u32 & !0xf) | bar.flags
            }
            bar_kind::IO if bar.size > 0 => {
                let value = if sizing { !(bar.size - 1) as u32 } else { bar.base as u32 };
                (value & !3) | 1
            }
            _ => 0,
        }
    }

    /// A write of `value` (already shifted to its byte lanes) to the bytes of `mask` of the
    /// dword at `offset` of owned device `i`.
    fn write(&mut self, cs: &mut impl ConfigSpace, i: usize, offset: u16, value: u32, mask: u32) {
        let o = self.owned(i);
        let b = o.func.bdf;
        match offset {
            reg::COMMAND => {
                let allowed = command_allowed(&o) as u32 & mask & 0xffff;
                let asked = value & mask & 0xffff;
                let cur = cs.read32(b, offset) & 0xffff;
                let cmd = (cur & !allowed) | (asked & allowed);
                let w1c = value & mask & ((STATUS_W1C as u32) << 16);
                if asked & !allowed != 0 || (value & mask) >> 16 & !(STATUS_W1C as u32) != 0 {
                    self.dropped = self.dropped.saturating_add(1);
                }
                cs.write32(b, offset, w1c | cmd);
            }
            0x10..=0x24 => {
                let k = ((offset - reg::BAR0) / 4) as usize;
                // All ones in every byte written: a sizing probe. Anything else would move
                // the BAR: dropped (the register keeps its address).
                let probe = value & mask == mask;
                if !probe {
                    self.dropped = self.dropped.saturating_add(1);
                }
                self.sizing[i][k] = probe;
            }
            _ => self.dropped = self.dropped.saturating_add(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{assign, enumerate, fake};
    use super::*;
    use vmcall_proto::device::{device_entry, parse_selector, DEVICE_WINDOW};

    const CF8: u16 = 0xcf8;
    const CFC: u16 = 0xcfc;

    fn addr(b: Bdf, off: u8) -> u32 {
        0x8000_0000 | b.cf8_bits() | off as u32
    }

    /// A view for a guest owning the e1000 at 00:02.0 (`dma` says whether it may master).
    fn setup(dma: bool) -> (fake::Bus, View) {
        let mut bus = fake::bochs();
        let fns = enumerate(&mut bus);
        let e = [device_entry(0, parse_selector("00:02.0").unwrap(), flags::DMA_UNCONFINED)];
        let mut a = assign(&fns, e.iter().copied(), 0).unwrap();
        if !dma {
            // The filter's rule on its own: `assign` refuses the e1000 without the flag.
            a.list[0].as_mut().unwrap().flags = 0;
        }
        bus.writes.clear();
        (bus, View::new(&a))
    }

    fn rd(v: &mut View, bus: &mut fake::Bus, b: Bdf, off: u8, size: u8) -> u32 {
        assert_eq!(v.io(bus, CF8, 4, Some(addr(b, off & 0xfc))), Some(0));
        v.io(bus, CFC + (off & 3) as u16, size, None).unwrap()
    }

    fn wr(v: &mut View, bus: &mut fake::Bus, b: Bdf, off: u8, size: u8, val: u32) {
        v.io(bus, CF8, 4, Some(addr(b, off & 0xfc))).unwrap();
        assert_eq!(v.io(bus, CFC + (off & 3) as u16, size, Some(val)), Some(0));
    }

    const NIC: Bdf = Bdf::new(0, 2, 0);

    #[test]
    fn the_owner_sees_only_its_function() {
        let (mut bus, mut v) = setup(true);
        assert_eq!(rd(&mut v, &mut bus, NIC, 0, 4), 0x100e_8086);
        assert_eq!(rd(&mut v, &mut bus, NIC, 2, 2), 0x100e);
        assert_eq!(rd(&mut v, &mut bus, NIC, 0x0b, 1), 0x02);
        for other in [Bdf::new(0, 0, 0), Bdf::new(0, 1, 0), Bdf::new(0, 3, 0), Bdf::new(0, 9, 0)] {
            assert_eq!(rd(&mut v, &mut bus, other, 0, 4), u32::MAX, "{other}");
            assert_eq!(rd(&mut v, &mut bus, other, 0x10, 4), u32::MAX, "{other}");
            assert_eq!(rd(&mut v, &mut bus, other, 0, 2), 0xffff, "{other}");
        }
        // Enable bit off, or reserved bits set: nothing.
        v.io(&mut bus, CF8, 4, Some(NIC.cf8_bits())).unwrap();
        assert_eq!(v.io(&mut bus, CFC, 4, None), Some(u32::MAX));
        v.io(&mut bus, CF8, 4, Some(addr(NIC, 0) | 0x0100_0000)).unwrap();
        assert_eq!(v.io(&mut bus, CFC, 4, None), Some(u32::MAX));
        // The latch reads back.
        v.io(&mut bus, CF8, 4, Some(0x1234_5678)).unwrap();
        assert_eq!(v.io(&mut bus, CF8, 4, None), Some(0x1234_5678));
        v.io(&mut bus, CF8, 4, Some(0x8000_0003)).unwrap();
        assert_eq!(v.io(&mut bus, CF8, 4, None), Some(0x8000_0000), "bits 1:0 read as zero");
    }

    #[test]
    fn writes_to_other_functions_never_reach_them() {
        let (mut bus, mut v) = setup(true);
        for other in [Bdf::new(0, 0, 0), Bdf::new(0, 1, 0), Bdf::new(0, 3, 0)] {
            for off in [0x04, 0x10, 0x14, 0x18, 0x1c, 0x20, 0x3c, 0x40] {
                wr(&mut v, &mut bus, other, off, 4, 0xffff_ffff);
                wr(&mut v, &mut bus, other, off, 1, 0x07);
            }
        }
        assert!(bus.writes.is_empty(), "{:x?}", bus.writes);
        assert_eq!(v.dropped, 48);
    }

    #[test]
    fn bars_read_the_window_size_and_never_move() {
        let (mut bus, mut v) = setup(true);
        assert_eq!(rd(&mut v, &mut bus, NIC, 0x10, 4), DEVICE_WINDOW.0 as u32);
        assert_eq!(rd(&mut v, &mut bus, NIC, 0x14, 4), 0xc001);
        wr(&mut v, &mut bus, NIC, 0x10, 4, u32::MAX);
        assert_eq!(rd(&mut v, &mut bus, NIC, 0x10, 4), 0xfffe_0000);
        wr(&mut v, &mut bus, NIC, 0x14, 4, u32::MAX);
        assert_eq!(rd(&mut v, &mut bus, NIC, 0x14, 4), 0xffff_ffc1);
        // Moving it anywhere (over another partition, into the grant window) is dropped.
        for to in [0x0010_0000, 0xc000_0000, 0xfec0_0000] {
            wr(&mut v, &mut bus, NIC, 0x10, 4, to);
            assert_eq!(rd(&mut v, &mut bus, NIC, 0x10, 4), DEVICE_WINDOW.0 as u32);
        }
        wr(&mut v, &mut bus, NIC, 0x14, 2, 0x2000);
        assert_eq!(rd(&mut v, &mut bus, NIC, 0x14, 4), 0xc001);
        // Unimplemented BARs, the ROM, capabilities and device-specific registers: zero.
        for off in [0x18, 0x1c, 0x20, 0x24, 0x30, 0x34, 0x40, 0xfc] {
            assert_eq!(rd(&mut v, &mut bus, NIC, off, 4), 0, "{off:#x}");
        }
        assert!(bus.writes.is_empty(), "no BAR write reached the device: {:x?}", bus.writes);
        assert_eq!(bus.regs[&(NIC, 0x10)], 0xfebc_0000);
    }

    #[test]
    fn a_64_bit_bar_reads_its_window_address_and_sizes_in_both_halves() {
        let mut bus = fake::Bus::default();
        let b = Bdf::new(0, 5, 0);
        bus.add(
            b,
            0x1234_1af4,
            0x01_00_00,
            0,
            (1, 5),
            &[(0x10, 0xe000_000c, 0xffff_c000), (0x14, 0, 0xffff_ffff)],
        );
        let fns = enumerate(&mut bus);
        let e = [device_entry(0, parse_selector("00:05.0").unwrap(), 0)];
        let mut v = View::new(&assign(&fns, e.iter().copied(), 0).unwrap());
        assert_eq!(rd(&mut v, &mut bus, b, 0x10, 4), DEVICE_WINDOW.0 as u32 | 0xc);
        assert_eq!(rd(&mut v, &mut bus, b, 0x14, 4), 0, "the window is below 4 GiB");
        wr(&mut v, &mut bus, b, 0x10, 4, u32::MAX);
        wr(&mut v, &mut bus, b, 0x14, 4, u32::MAX);
        assert_eq!(rd(&mut v, &mut bus, b, 0x10, 4), 0xffff_c00c);
        assert_eq!(rd(&mut v, &mut bus, b, 0x14, 4), u32::MAX, "upper half of the size mask");
        wr(&mut v, &mut bus, b, 0x14, 4, 0x1);
        assert_eq!(rd(&mut v, &mut bus, b, 0x14, 4), 0, "moving the upper half is dropped");
    }

    #[test]
    fn the_command_register_takes_only_the_owners_bits() {
        let (mut bus, mut v) = setup(false);
        bus.regs.insert((NIC, 4), 0x0010_0000);
        wr(&mut v, &mut bus, NIC, 0x04, 2, 0xffff);
        let cmd = bus.regs[&(NIC, 4)] & 0xffff;
        assert_eq!(cmd, (reg::CMD_IO | reg::CMD_MEMORY | reg::CMD_INTX_DISABLE) as u32);
        assert_eq!(v.dropped, 1, "bus mastering and the rest refused");
        // With dma = "unconfined", bus mastering too.
        let (mut bus, mut v) = setup(true);
        bus.regs.insert((NIC, 4), 0);
        wr(&mut v, &mut bus, NIC, 0x04, 2, 0x0007);
        assert_eq!(bus.regs[&(NIC, 4)] & 0xffff, 7);
        // Status: only the write-one-to-clear bits go through; the capability list hidden.
        wr(&mut v, &mut bus, NIC, 0x06, 2, 0xffff);
        assert_eq!(bus.writes.last().unwrap().2 >> 16, 0xf900);
        bus.regs.insert((NIC, 4), 0x0010_0007);
        assert_eq!(rd(&mut v, &mut bus, NIC, 0x06, 2) & 0x10, 0);
        // The interrupt line reads 0xff, the pin through.
        assert_eq!(rd(&mut v, &mut bus, NIC, 0x3c, 2), 0x01ff);
    }

    /// Review: every way of reaching the bus-master bit, another function or a register
    /// the owner may not write, through lanes, widths, the latch's reserved and low bits,
    /// bus and function numbers.
    #[test]
    fn hostile_lanes_widths_and_latches_reach_nothing() {
        let (mut bus, mut v) = setup(false);
        bus.regs.insert((NIC, 4), 0x0000_0003);
        // Bus mastering without `dma = "unconfined"`: byte at 4, word at 4, dword at 4 with
        // status bits, and the same through the latch's low bits 1:0 set.
        wr(&mut v, &mut bus, NIC, 0x04, 1, 0x07);
        wr(&mut v, &mut bus, NIC, 0x04, 2, 0xffff);
        wr(&mut v, &mut bus, NIC, 0x04, 4, 0xffff_ffff);
        v.io(&mut bus, CF8, 4, Some(addr(NIC, 4) | 3)).unwrap();
        v.io(&mut bus, CFC, 4, Some(0x0000_0007)).unwrap();
        assert_eq!(bus.regs[&(NIC, 4)] & reg::CMD_BUS_MASTER as u32, 0);
        // Every write that reached the device was to the command dword, and none set it.
        assert!(bus.writes.iter().all(|&(b, o, val)| b == NIC && o == 4 && val & 4 == 0));
        // Lanes of other functions: the same device number on another bus, other function
        // numbers, the reserved bits 30:24, the enable bit clear.
        let before = bus.writes.len();
        for latch in [
            addr(Bdf::new(1, 2, 0), 4),
            addr(Bdf::new(0, 2, 1), 4),
            addr(Bdf::new(0, 2, 7), 4),
            addr(NIC, 4) | 0x0100_0000,
            addr(NIC, 4) | 0x4000_0000,
            addr(NIC, 4) & !0x8000_0000,
        ] {
            v.io(&mut bus, CF8, 4, Some(latch)).unwrap();
            for (port, size) in [(CFC, 4), (CFC, 2), (0xcfd, 1), (0xcfe, 2), (0xcff, 1)] {
                assert_eq!(
                    v.io(&mut bus, port, size, None),
                    Some(if size == 4 { u32::MAX } else { (1 << (8 * size)) - 1 }),
                    "{latch:#x} {port:#x}"
                );
                assert_eq!(v.io(&mut bus, port, size, Some(0xffff_ffff)), Some(0));
            }
        }
        assert_eq!(bus.writes.len(), before, "nothing reached the bus");
        // Widths that cross the data port's end or the address port: not configuration
        // accesses (#GP): a dword at 0xCF9..0xCFB, a word at 0xCFA/0xCFB/0xCFF.
        for (port, size) in [
            (0xcf9, 4),
            (0xcfa, 4),
            (0xcfb, 4),
            (0xcfa, 2),
            (0xcfb, 2),
            (0xcff, 2),
            (0xcfd, 4),
            (0xcfb, 1),
        ] {
            assert_eq!(v.io(&mut bus, port, size, Some(0)), None, "{port:#x}/{size}");
        }
        // Its own interrupt line, header fields, the ROM BAR: dropped.
        for off in [0x0c, 0x30, 0x3c, 0x40, 0xfc] {
            wr(&mut v, &mut bus, NIC, off, 4, 0xffff_ffff);
        }
        assert_eq!(bus.writes.len(), before);
    }

    #[test]
    fn odd_accesses_are_not_configuration_accesses() {
        let (mut bus, mut v) = setup(true);
        // 0xCF9 (reset control), byte and word accesses to the address register.
        assert_eq!(v.io(&mut bus, 0xcf9, 1, Some(6)), None);
        assert_eq!(v.io(&mut bus, CF8, 1, Some(0)), None);
        assert_eq!(v.io(&mut bus, CF8, 2, None), None);
        assert_eq!(v.io(&mut bus, 0xcfe, 4, None), None, "crosses the data port's end");
        assert_eq!(v.io(&mut bus, 0xcfd, 2, None), Some(0x100e & 0xffff).map(|_| 0xffff));
        assert_eq!(v.io(&mut bus, CFC, 3, None), None);
        // A guest that owns nothing has no PCI at all.
        let mut none = View::new(&Assigned::none());
        assert_eq!(none.io(&mut bus, CF8, 4, Some(addr(NIC, 0))), None);
        assert_eq!(none.io(&mut bus, CFC, 4, None), None);
        assert!(bus.writes.is_empty());
    }
}
