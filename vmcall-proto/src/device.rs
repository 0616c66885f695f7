// SPDX-License-Identifier: MIT OR Apache-2.0
//! Devices a guest owns: PCI functions assigned in the config, as the config blob carries
//! them ([`DeviceEntry`]) and as the owner's boot info describes them ([`DeviceDesc`]).
//!
//! The rules, the same on every side (host tool, hypervisor, guest runtime):
//! * A PCI function belongs to at most one guest for the whole run. The config names it by
//!   address (`"00:03.0"`) or by identity (`"8086:100e"`, optionally `"8086:100e#1"` for
//!   the second such function in bus order); the hypervisor resolves identities at boot.
//! * The owner sees its functions at their real bus:device.function through configuration
//!   mechanism #1 (ports 0xCF8/0xCFC, trapped and filtered by the hypervisor); every other
//!   function reads as absent (all ones) and writes to it are dropped.
//! * Memory BARs appear to the owner at guest-physical addresses in the device window
//!   ([`DEVICE_WINDOW`], GiB 1, between the partition and the channel windows): the BAR
//!   registers read back those addresses, sizing (writing all ones) works, and any other
//!   write to a BAR is dropped, so a guest can never point a device's decoder at another
//!   partition. The window maps the BAR uncached and never executable. I/O BARs keep their
//!   real port range, opened in the owner's I/O bitmap and nowhere else.
//! * The device's legacy interrupt (INTx) is routed by the hypervisor through the I/O APIC
//!   to the owner's core, level-triggered, at vector [`device_vector`]`(i)` for the owner's
//!   `i`-th device, and taken through the owner's own IDT without a VM exit. The owner
//!   acknowledges it the usual way: clear the cause in the device, then write the x2APIC EOI
//!   register (MSR 0x80b). Until that EOI an I/O APIC sends nothing more from that line
//!   (remote IRR; Bochs's has none), and the line reaches no other core, so an interrupt
//!   storm only ever costs the owner's own core.
//! * DMA: without an IOMMU a bus-mastering device reaches all machine memory. A config must
//!   say `dma = "unconfined"` for a device it gives a guest that may use bus mastering; the
//!   owner's partition is contiguous in machine memory, and [`BootInfo::dma_offset`]
//!   (`machine = guest-physical + dma_offset` for partition addresses) is what a driver adds
//!   to program descriptors. Without `dma = "unconfined"` the hypervisor never lets the
//!   bus-master bit of the command register be set, and refuses devices it knows master
//!   the bus regardless of that bit (Bochs's e1000 does).
//!
//! [`BootInfo::dma_offset`]: crate::guest::BootInfo::dma_offset

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Devices a config may assign in all.
pub const MAX_DEVICES: usize = 16;
/// Devices one guest may own (its boot-info table).
pub const MAX_DEVICES_PER_GUEST: usize = 4;
/// Base address registers of a type-0 configuration header.
pub const MAX_BARS: usize = 6;

/// Guest-physical window where an owner's memory BARs appear, `[start, end)`: GiB 1, past
/// the largest partition and below the channel windows (checked in `guest`, which owns
/// that layout).
pub const DEVICE_WINDOW: (u64, u64) = (0x4000_0000, 0x8000_0000);

/// First interrupt vector of devices: the owner's device `i` interrupts at
/// `DEVICE_VECTOR_BASE + i` (below the doorbell, [`crate::guest::DOORBELL_VECTOR`]).
pub const DEVICE_VECTOR_BASE: u8 = 0x50;
/// The vector of the owner's `i`-th device.
pub const fn device_vector(i: usize) -> u8 {
    DEVICE_VECTOR_BASE + i as u8
}
const _: () = assert!((DEVICE_VECTOR_BASE as usize) + MAX_DEVICES_PER_GUEST <= 0xf0);

/// How a [`DeviceEntry`] names its function.
pub mod select {
    /// By `bus`, `device`, `function`.
    pub const ADDRESS: u8 = 0;
    /// By `vendor_id`, `device_id` and `nth` (0: the first such function in bus order).
    pub const ID: u8 = 1;
}

/// Bits of [`DeviceEntry::flags`] and [`DeviceDesc::flags`].
pub mod flags {
    /// `dma = "unconfined"`: the owner may turn on bus mastering; the device can then reach
    /// all machine memory (no IOMMU).
    pub const DMA_UNCONFINED: u8 = 1;
    /// Every bit defined.
    pub const ALL: u8 = DMA_UNCONFINED;
}

/// One assignment in the config blob: a function and its owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DeviceEntry {
    /// Owner (guest index).
    pub guest: u16,
    /// One of the [`select`] values.
    pub select: u8,
    /// A set of [`flags`] bits.
    pub flags: u8,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
    /// With [`select::ID`]: which match, in bus order (0 the first).
    pub nth: u8,
    pub vendor_id: u16,
    pub device_id: u16,
    pub _reserved: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<DeviceEntry>() == 16);

/// Largest device number on a bus, function number in a device.
pub const MAX_DEVICE_NUMBER: u8 = 31;
pub const MAX_FUNCTION_NUMBER: u8 = 7;

impl DeviceEntry {
    /// The selector as the config writes it (`00:03.0`, `8086:100e`, `8086:100e#1`).
    pub fn selector(&self) -> Selector {
        match self.select {
            select::ADDRESS => Selector::Address(Bdf::new(self.bus, self.device, self.function)),
            _ => Selector::Id { vendor: self.vendor_id, device: self.device_id, nth: self.nth },
        }
    }
}

/// A PCI function's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl Bdf {
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Bdf { bus, device, function }
    }
    /// Whether the device and function numbers are in range.
    pub const fn valid(self) -> bool {
        self.device <= MAX_DEVICE_NUMBER && self.function <= MAX_FUNCTION_NUMBER
    }
    /// Bits 23:8 of a configuration-mechanism-#1 address.
    pub const fn cf8_bits(self) -> u32 {
        (self.bus as u32) << 16 | (self.device as u32) << 11 | (self.function as u32) << 8
    }
    /// The function a configuration-mechanism-#1 address names.
    pub const fn from_cf8(addr: u32) -> Self {
        Bdf::new((addr >> 16) as u8, ((addr >> 11) & 31) as u8, ((addr >> 8) & 7) as u8)
    }
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// How the config names a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selector {
    Address(Bdf),
    Id { vendor: u16, device: u16, nth: u8 },
}

impl core::fmt::Display for Selector {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Selector::Address(b) => write!(f, "{b}"),
            Selector::Id { vendor, device, nth: 0 } => write!(f, "{vendor:04x}:{device:04x}"),
            Selector::Id { vendor, device, nth } => write!(f, "{vendor:04x}:{device:04x}#{nth}"),
        }
    }
}

/// Why a selector string is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectorError {
    /// Neither `BB:DD.F` nor `VVVV:DDDD[#N]`.
    Syntax,
    /// Device number past 31 or function past 7.
    OutOfRange,
    /// Vendor 0xffff (no function has it).
    BadVendor,
}

impl core::fmt::Display for SelectorError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SelectorError::Syntax => {
                "expected a PCI address `BB:DD.F` (hex bus and device, function 0-7) or an \
                 identity `VVVV:DDDD` (hex vendor and device id, `#N` for the N-th such)"
            }
            SelectorError::OutOfRange => "device number past 1f or function past 7",
            SelectorError::BadVendor => "vendor ffff names no function",
        })
    }
}

fn hex(s: &str, digits: usize) -> Option<u32> {
    (s.len() == digits && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
}

/// Parses a config's device selector: `BB:DD.F` or `VVVV:DDDD` or `VVVV:DDDD#N`.
pub fn parse_selector(s: &str) -> Result<Selector, SelectorError> {
    let (left, right) = s.split_once(':').ok_or(SelectorError::Syntax)?;
    if let Some((dev, func)) = right.split_once('.') {
        let (bus, dev) = (hex(left, 2), hex(dev, 2));
        let func = (func.len() == 1).then(|| func.parse::<u8>().ok()).flatten();
        let (Some(bus), Some(dev), Some(func)) = (bus, dev, func) else {
            return Err(SelectorError::Syntax);
        };
        let b = Bdf::new(bus as u8, dev as u8, func);
        if !b.valid() || dev > 31 {
            return Err(SelectorError::OutOfRange);
        }
        return Ok(Selector::Address(b));
    }
    let (id, nth) = match right.split_once('#') {
        Some((id, n)) => (id, n.parse::<u8>().map_err(|_| SelectorError::Syntax)?),
        None => (right, 0),
    };
    let (Some(vendor), Some(device)) = (hex(left, 4), hex(id, 4)) else {
        return Err(SelectorError::Syntax);
    };
    if vendor == 0xffff {
        return Err(SelectorError::BadVendor);
    }
    Ok(Selector::Id { vendor: vendor as u16, device: device as u16, nth })
}

/// A config entry for `guest` with this selector and flags.
pub fn device_entry(guest: u16, sel: Selector, flags: u8) -> DeviceEntry {
    let mut e = DeviceEntry {
        guest,
        select: select::ADDRESS,
        flags,
        bus: 0,
        device: 0,
        function: 0,
        nth: 0,
        vendor_id: 0,
        device_id: 0,
        _reserved: [0; 4],
    };
    match sel {
        Selector::Address(b) => (e.bus, e.device, e.function) = (b.bus, b.device, b.function),
        Selector::Id { vendor, device, nth } => {
            (e.select, e.vendor_id, e.device_id, e.nth) = (select::ID, vendor, device, nth)
        }
    }
    e
}

/// Kinds of [`BarDesc`].
pub mod bar_kind {
    /// No BAR here (unimplemented, or the upper half of a 64-bit BAR).
    pub const NONE: u32 = 0;
    /// Memory, mapped at [`super::BarDesc::addr`] in the device window.
    pub const MEMORY: u32 = 1;
    /// I/O ports `addr..addr + size`, opened in the owner's I/O bitmap.
    pub const IO: u32 = 2;
}

/// One BAR of an owned function, as its owner sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BarDesc {
    /// One of the [`bar_kind`] values.
    pub kind: u32,
    /// 1 for a 64-bit memory BAR (it also takes the next register), 0 otherwise.
    pub wide: u32,
    /// Guest-physical address (memory) or first port (I/O).
    pub addr: u64,
    /// Bytes (memory) or ports (I/O).
    pub size: u64,
}
const _: () = assert!(core::mem::size_of::<BarDesc>() == 24);

/// One function a guest owns, in its boot info.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DeviceDesc {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
    /// Interrupt pin, 0 none, 1..=4 INTA#..INTD#.
    pub irq_pin: u8,
    /// The vector its interrupt arrives at in this guest (0: it has none routed).
    pub vector: u8,
    /// A set of [`flags`] bits.
    pub flags: u8,
    pub _reserved0: u16,
    pub vendor_id: u16,
    pub device_id: u16,
    /// Class code, subclass and programming interface (configuration bytes 0x0b..0x09).
    pub class: u32,
    pub bars: [BarDesc; MAX_BARS],
}
const _: () = assert!(core::mem::size_of::<DeviceDesc>() == 16 + 24 * MAX_BARS);

impl DeviceDesc {
    pub fn bdf(&self) -> Bdf {
        Bdf::new(self.bus, self.device, self.function)
    }
    /// The first memory BAR (what most drivers map), if any.
    pub fn first_memory_bar(&self) -> Option<&BarDesc> {
        self.bars.iter().find(|b| b.kind == bar_kind::MEMORY)
    }
    /// The first I/O BAR, if any.
    pub fn first_io_bar(&self) -> Option<&BarDesc> {
        self.bars.iter().find(|b| b.kind == bar_kind::IO)
    }
}

/// Functions known to master the bus whatever their command register says (vendor, device):
/// the hypervisor gives them only with `dma = "unconfined"` and stops them through their own
/// registers at their owner's death; `cargo xtask check` refuses them without the rule.
/// (Bochs's e1000 ignores the command register's bus-master bit.)
pub const KNOWN_BUS_MASTERS: [(u16, u16); 1] = [(0x8086, 0x100e)];

/// Whether `vendor:device` is in [`KNOWN_BUS_MASTERS`].
pub fn known_bus_master(vendor: u16, device: u16) -> bool {
    KNOWN_BUS_MASTERS.contains(&(vendor, device))
}

/// Configuration-mechanism-#1 ports.
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
pub const PCI_CONFIG_DATA: u16 = 0xcfc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_and_print_back() {
        for s in ["00:03.0", "00:1f.7", "8086:100e", "10ec:8029#1"] {
            assert_eq!(parse_selector(s).unwrap().to_string(), s);
        }
        assert_eq!(parse_selector("00:04.0"), Ok(Selector::Address(Bdf::new(0, 4, 0))));
        assert_eq!(
            parse_selector("8086:100E#2"),
            Ok(Selector::Id { vendor: 0x8086, device: 0x100e, nth: 2 })
        );
    }

    #[test]
    fn bad_selectors_say_why() {
        for s in [
            "",
            "0:3.0",
            "00:3.0",
            "00:03.8",
            "00:03",
            "8086",
            "8086:100",
            "xx:03.0",
            "8086:100e#",
            "8086:100e#300",
            "00:03.0.1",
            "00:03.a",
        ] {
            assert!(parse_selector(s).is_err(), "{s}");
        }
        assert_eq!(parse_selector("00:20.0"), Err(SelectorError::OutOfRange));
        assert_eq!(parse_selector("ffff:1234"), Err(SelectorError::BadVendor));
    }

    #[test]
    fn entries_keep_their_selector() {
        for sel in
            [Selector::Address(Bdf::new(1, 2, 3)), Selector::Id { vendor: 1, device: 2, nth: 3 }]
        {
            assert_eq!(device_entry(5, sel, flags::DMA_UNCONFINED).selector(), sel);
        }
    }

    #[test]
    fn cf8_addresses_round_trip() {
        let b = Bdf::new(0x12, 0x1f, 7);
        assert_eq!(Bdf::from_cf8(0x8000_0000 | b.cf8_bits() | 0xfc), b);
    }
}
