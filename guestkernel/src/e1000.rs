// SPDX-License-Identifier: MIT OR Apache-2.0
//! Driver for the Intel 82540EM (e1000, 8086:100e), after the PCI/PCI-X Family of Gigabit
//! Ethernet Controllers Software Developer's Manual (8254x SDM): registers through memory
//! BAR 0 (in the device window, uncached), legacy receive and transmit descriptors
//! (SDM 3.2.3, 3.3.3) in rings of the guest's own memory, programmed with machine
//! addresses (guest-physical + `BootInfo::dma_offset`), the MAC address from the EEPROM
//! (EERD, SDM 13.4.4; Bochs leaves RAL/RAH zero after reset, so the driver writes them),
//! interrupt-driven receive (IMS: RXT0, RXO, RXDMT0, LSC, TXDW).
//!
//! It owns the card's registers and the rings: the rings are allocated once and never
//! freed (the card may write them as long as bus mastering is on). Its interrupt handler
//! reads ICR, which clears every cause and drops the line.
//!
//! May call: `arch` (through `pci`), `pci`, `nic` (types), `net` (constants), `alloc`.

use crate::card::{NicError, Stats};
use crate::net::{Mac, MAX_FRAME, MIN_FRAME};
use crate::pci;
use core::sync::atomic::{fence, Ordering};
use vmcall_proto::guest::BootInfo;

pub const VENDOR: u16 = 0x8086;
pub const DEVICE: u16 = 0x100e;

/// Register offsets in BAR 0 (SDM 13.4).
pub mod reg {
    pub const CTRL: u32 = 0x0000;
    pub const STATUS: u32 = 0x0008;
    pub const EERD: u32 = 0x0014;
    pub const ICR: u32 = 0x00c0;
    pub const ICS: u32 = 0x00c8;
    pub const IMS: u32 = 0x00d0;
    pub const IMC: u32 = 0x00d8;
    pub const RCTL: u32 = 0x0100;
    pub const TCTL: u32 = 0x0400;
    pub const TIPG: u32 = 0x0410;
    pub const RDBAL: u32 = 0x2800;
    pub const RDBAH: u32 = 0x2804;
    pub const RDLEN: u32 = 0x2808;
    pub const RDH: u32 = 0x2810;
    pub const RDT: u32 = 0x2818;
    pub const TDBAL: u32 = 0x3800;
    pub const TDBAH: u32 = 0x3804;
    pub const TDLEN: u32 = 0x3808;
    pub const TDH: u32 = 0x3810;
    pub const TDT: u32 = 0x3818;
    pub const MTA: u32 = 0x5200;
    pub const RAL0: u32 = 0x5400;
    pub const RAH0: u32 = 0x5404;
    /// One past the last register the driver touches: BAR 0 must be at least this long.
    pub const END: u32 = 0x5408;
}

pub mod ctrl {
    pub const ASDE: u32 = 1 << 5;
    pub const SLU: u32 = 1 << 6;
    pub const RST: u32 = 1 << 26;
}
pub const STATUS_LU: u32 = 1 << 1;
pub mod eerd {
    pub const START: u32 = 1 << 0;
    pub const DONE: u32 = 1 << 4;
    pub const ADDR_SHIFT: u32 = 8;
    pub const DATA_SHIFT: u32 = 16;
}
/// Interrupt causes (ICR, ICS, IMS, IMC; SDM 13.4.17).
pub mod icr {
    pub const TXDW: u32 = 1 << 0;
    pub const TXQE: u32 = 1 << 1;
    pub const LSC: u32 = 1 << 2;
    pub const RXDMT0: u32 = 1 << 4;
    pub const RXO: u32 = 1 << 6;
    pub const RXT0: u32 = 1 << 7;
}
pub mod rctl {
    pub const EN: u32 = 1 << 1;
    pub const BAM: u32 = 1 << 15;
    /// Buffer size 2048: BSIZE 00 with BSEX 0.
    pub const BSIZE_2048: u32 = 0;
    pub const SECRC: u32 = 1 << 26;
}
pub mod tctl {
    pub const EN: u32 = 1 << 1;
    pub const PSP: u32 = 1 << 3;
    pub const CT_SHIFT: u32 = 4;
    pub const COLD_SHIFT: u32 = 12;
}
/// TIPG for the 82540EM on copper (SDM 13.4.34): IPGT 10, IPGR1 8, IPGR2 6.
pub const TIPG_COPPER: u32 = 10 | 8 << 10 | 6 << 20;
pub const RAH_AV: u32 = 1 << 31;

/// Receive descriptor status and transmit command/status bits.
pub mod desc {
    pub const DD: u8 = 1 << 0;
    pub const EOP: u8 = 1 << 1;
    pub const CMD_EOP: u8 = 1 << 0;
    pub const CMD_IFCS: u8 = 1 << 1;
    pub const CMD_RS: u8 = 1 << 3;
}

/// A legacy receive descriptor (SDM 3.2.3), as the card reads and writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxDesc {
    pub addr: u64,
    pub length: u16,
    pub checksum: u16,
    pub status: u8,
    pub errors: u8,
    pub special: u16,
}
const _: () = assert!(core::mem::size_of::<RxDesc>() == 16);
const _: () = assert!(core::mem::offset_of!(RxDesc, status) == 12);

/// A legacy transmit descriptor (SDM 3.3.3).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxDesc {
    pub addr: u64,
    pub length: u16,
    pub cso: u8,
    pub cmd: u8,
    pub status: u8,
    pub css: u8,
    pub special: u16,
}
const _: () = assert!(core::mem::size_of::<TxDesc>() == 16);
const _: () = assert!(core::mem::offset_of!(TxDesc, cmd) == 11);
const _: () = assert!(core::mem::offset_of!(TxDesc, status) == 12);

/// Receive descriptors; the ring's length must be a multiple of 128 bytes (RDLEN).
pub const RX_SLOTS: usize = 32;
/// Transmit descriptors (TDLEN likewise).
pub const TX_SLOTS: usize = 8;
/// Bytes per buffer (RCTL.BSIZE 2048): a whole frame fits one.
pub const BUF: usize = 2048;
const _: () = assert!((RX_SLOTS * 16).is_multiple_of(128) && (TX_SLOTS * 16).is_multiple_of(128));
const _: () = assert!(MAX_FRAME <= BUF);

/// The MAC address in EEPROM words 0..3 (low byte first).
pub fn mac_from_eeprom(words: [u16; 3]) -> Mac {
    let mut m = [0; 6];
    for (i, w) in words.iter().enumerate() {
        m[2 * i..2 * i + 2].copy_from_slice(&w.to_le_bytes());
    }
    m
}

/// RAL and RAH for `mac`, valid (AV).
pub fn receive_address(mac: Mac) -> (u32, u32) {
    let ral = u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]);
    let rah = u16::from_le_bytes([mac[4], mac[5]]) as u32 | RAH_AV;
    (ral, rah)
}

/// The MAC address in RAL/RAH, if valid.
pub fn mac_from_receive_address(ral: u32, rah: u32) -> Option<Mac> {
    let (l, h) = (ral.to_le_bytes(), rah.to_le_bytes());
    (rah & RAH_AV != 0).then_some([l[0], l[1], l[2], l[3], h[0], h[1]])
}

/// TCTL: enabled, short packets padded, collision threshold 15, collision distance 64
/// (full duplex; SDM 13.4.33).
pub const TCTL_VALUE: u32 =
    tctl::EN | tctl::PSP | 0x0f << tctl::CT_SHIFT | 0x40 << tctl::COLD_SHIFT;
/// RCTL: enabled, broadcasts accepted, 2048-byte buffers, CRC stripped.
pub const RCTL_VALUE: u32 = rctl::EN | rctl::BAM | rctl::BSIZE_2048 | rctl::SECRC;
/// Interrupts the driver takes.
pub const IMS_VALUE: u32 = icr::RXT0 | icr::RXO | icr::RXDMT0 | icr::LSC | icr::TXDW;

/// What a receive descriptor the card wrote back says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// Not written back yet.
    Empty,
    /// A whole good frame of this length.
    Frame(usize),
    /// Written back but unusable (an error, or part of a frame longer than a buffer).
    Bad,
}

/// Classifies a descriptor the card may have written back.
pub fn rx_outcome(d: &RxDesc) -> RxOutcome {
    if d.status & desc::DD == 0 {
        RxOutcome::Empty
    } else if d.status & desc::EOP == 0 || d.errors != 0 || d.length as usize > BUF {
        RxOutcome::Bad
    } else {
        RxOutcome::Frame(d.length as usize)
    }
}

/// The transmit descriptor for a frame of `len` bytes at machine address `addr`: one
/// descriptor per frame (EOP), the card appends the FCS (IFCS) and reports (RS).
pub fn tx_desc(addr: u64, len: usize) -> TxDesc {
    TxDesc {
        addr,
        length: len as u16,
        cmd: desc::CMD_EOP | desc::CMD_IFCS | desc::CMD_RS,
        ..TxDesc::default()
    }
}

/// Memory the card reads and writes by DMA: page-aligned, zeroed, in the partition,
/// never freed.
struct DmaRegion {
    va: *mut u8,
    machine: u64,
}

impl DmaRegion {
    fn new(bi: &BootInfo, len: usize) -> Result<Self, NicError> {
        let layout =
            core::alloc::Layout::from_size_align(len, 4096).map_err(|_| NicError::NoMemory)?;
        // SAFETY: a non-zero size (the rings and buffers).
        let va = unsafe { alloc::alloc::alloc_zeroed(layout) };
        if va.is_null() {
            return Err(NicError::NoMemory);
        }
        // The heap lies in the partition, identity-mapped: the address is guest-physical.
        let machine = pci::dma_address(bi, va as u64, len as u64)
            .ok_or(NicError::Hardware("heap outside the partition"))?;
        Ok(DmaRegion { va, machine })
    }
}

pub struct E1000 {
    index: usize,
    /// BAR 0's guest-physical (identity-mapped) base.
    regs: u64,
    rx_ring: DmaRegion,
    tx_ring: DmaRegion,
    rx_bufs: DmaRegion,
    tx_bufs: DmaRegion,
    rx_next: usize,
    tx_next: usize,
    mac: Mac,
    stats: Stats,
}

/// The interrupt handler: reading ICR returns the causes and clears them (the line drops).
fn handle_irq(regs: u64) -> u32 {
    // Reading ICR has the wanted side effect only.
    // SAFETY: `regs` is the card's BAR 0, mapped uncached by `pci::enable`.
    unsafe { core::ptr::read_volatile((regs + reg::ICR as u64) as *const u32) }
}

impl E1000 {
    fn read(&self, r: u32) -> u32 {
        // SAFETY: a register inside BAR 0 (checked at open), mapped uncached.
        unsafe { core::ptr::read_volatile((self.regs + r as u64) as *const u32) }
    }

    fn write(&self, r: u32, v: u32) {
        // SAFETY: as in `read`; the DMA addresses the driver writes point at its own rings.
        unsafe { core::ptr::write_volatile((self.regs + r as u64) as *mut u32, v) }
    }

    /// Polls until `f(self)` holds or the TSC passes `deadline`.
    fn poll(&self, deadline: u64, mut f: impl FnMut(&Self) -> bool) -> bool {
        loop {
            if f(self) {
                return true;
            }
            if crate::arch::rdtsc() >= deadline {
                return false;
            }
            core::hint::spin_loop();
        }
    }

    fn eeprom_word(&self, word: u32, deadline: u64) -> Option<u16> {
        self.write(reg::EERD, word << eerd::ADDR_SHIFT | eerd::START);
        let mut v = 0;
        self.poll(deadline, |s| {
            v = s.read(reg::EERD);
            v & eerd::DONE != 0
        })
        .then_some((v >> eerd::DATA_SHIFT) as u16)
    }

    /// Brings the card up (see [`crate::nic::Nic::open`]).
    pub fn open(bi: &BootInfo, index: usize, deadline: u64) -> Result<E1000, NicError> {
        let d = *pci::devices(bi).get(index).ok_or(NicError::NoDevice)?;
        if (d.vendor_id, d.device_id) != (VENDOR, DEVICE) {
            return Err(NicError::Unsupported(d.vendor_id, d.device_id));
        }
        let bar = d.first_memory_bar().ok_or(NicError::NoBar)?;
        if bar.size < reg::END as u64 {
            return Err(NicError::NoBar);
        }
        // Decoding first, bus mastering only once the rings are programmed.
        // SAFETY: without bus mastering the card cannot reach memory.
        unsafe { pci::enable(&d, false) }.map_err(NicError::Enable)?;
        let mut nic = E1000 {
            index,
            regs: bar.addr,
            rx_ring: DmaRegion::new(bi, RX_SLOTS * 16)?,
            tx_ring: DmaRegion::new(bi, TX_SLOTS * 16)?,
            rx_bufs: DmaRegion::new(bi, RX_SLOTS * BUF)?,
            tx_bufs: DmaRegion::new(bi, TX_SLOTS * BUF)?,
            rx_next: 0,
            tx_next: 0,
            mac: [0; 6],
            stats: Stats::default(),
        };
        // Reset (SDM 14.5): interrupts masked, the global reset bit, masked again.
        nic.write(reg::IMC, u32::MAX);
        nic.write(reg::CTRL, nic.read(reg::CTRL) | ctrl::RST);
        if !nic.poll(deadline, |s| s.read(reg::CTRL) & ctrl::RST == 0) {
            return Err(NicError::Timeout("the reset to end"));
        }
        nic.write(reg::IMC, u32::MAX);
        nic.write(reg::RCTL, 0);
        nic.write(reg::TCTL, 0);
        let _ = nic.read(reg::ICR);
        // The MAC address: the EEPROM's first three words; RAL/RAH if the EEPROM fails.
        let words = [0, 1, 2].map(|w| nic.eeprom_word(w, deadline));
        nic.mac = match words {
            [Some(a), Some(b), Some(c)] => mac_from_eeprom([a, b, c]),
            _ => mac_from_receive_address(nic.read(reg::RAL0), nic.read(reg::RAH0))
                .ok_or(NicError::Hardware("no MAC address in the EEPROM or RAL/RAH"))?,
        };
        let (ral, rah) = receive_address(nic.mac);
        nic.write(reg::RAL0, ral);
        nic.write(reg::RAH0, rah);
        for i in 0..128 {
            nic.write(reg::MTA + 4 * i, 0);
        }
        // Receive ring: every descriptor owns a buffer; the card may fill all but one.
        for i in 0..RX_SLOTS {
            let dsc = RxDesc { addr: nic.rx_bufs.machine + (i * BUF) as u64, ..RxDesc::default() };
            // SAFETY: slot `i` of the ring we allocated, 16-byte aligned.
            unsafe { core::ptr::write_volatile(nic.rx_desc(i), dsc) };
        }
        fence(Ordering::SeqCst);
        let (rx, tx) = (nic.rx_ring.machine, nic.tx_ring.machine);
        nic.write(reg::RDBAL, rx as u32);
        nic.write(reg::RDBAH, (rx >> 32) as u32);
        nic.write(reg::RDLEN, (RX_SLOTS * 16) as u32);
        nic.write(reg::RDH, 0);
        nic.write(reg::RDT, (RX_SLOTS - 1) as u32);
        nic.write(reg::TDBAL, tx as u32);
        nic.write(reg::TDBAH, (tx >> 32) as u32);
        nic.write(reg::TDLEN, (TX_SLOTS * 16) as u32);
        nic.write(reg::TDH, 0);
        nic.write(reg::TDT, 0);
        nic.write(reg::TIPG, TIPG_COPPER);
        // The rings point at our memory: the card may master the bus now.
        // SAFETY: every DMA address the card holds is in the regions allocated above.
        unsafe { pci::enable(&d, true) }.map_err(NicError::Enable)?;
        pci::set_handler(index, handle_irq, nic.regs);
        nic.write(reg::CTRL, (nic.read(reg::CTRL) | ctrl::SLU | ctrl::ASDE) & !ctrl::RST);
        nic.write(reg::TCTL, TCTL_VALUE);
        nic.write(reg::RCTL, RCTL_VALUE);
        nic.write(reg::IMS, IMS_VALUE);
        if !nic.poll(deadline, |s| s.read(reg::STATUS) & STATUS_LU != 0) {
            return Err(NicError::Timeout("the link to come up"));
        }
        Ok(nic)
    }

    fn rx_desc(&self, i: usize) -> *mut RxDesc {
        (self.rx_ring.va as *mut RxDesc).wrapping_add(i % RX_SLOTS)
    }

    fn tx_desc(&self, i: usize) -> *mut TxDesc {
        (self.tx_ring.va as *mut TxDesc).wrapping_add(i % TX_SLOTS)
    }

    pub fn index(&self) -> usize {
        self.index
    }
    pub fn mac(&self) -> Mac {
        self.mac
    }
    pub fn stats(&self) -> Stats {
        self.stats
    }

    fn note_causes(&mut self) {
        if pci::take_causes(self.index) & icr::RXO != 0 {
            self.stats.overruns += 1;
        }
    }

    /// Sends `frame` and waits until the card wrote its descriptor back.
    pub fn send(&mut self, frame: &[u8], deadline: u64) -> Result<(), NicError> {
        if frame.len() > MAX_FRAME {
            return Err(NicError::TooLong);
        }
        let i = self.tx_next;
        let len = frame.len().max(MIN_FRAME);
        // The card reads buffer `i` only after the tail moves past it, below.
        // SAFETY: buffer `i` of our transmit region, BUF bytes, no other reference alive.
        let buf = unsafe { core::slice::from_raw_parts_mut(self.tx_bufs.va.add(i * BUF), BUF) };
        buf[..frame.len()].copy_from_slice(frame);
        buf[frame.len()..len].fill(0);
        let dsc = tx_desc(self.tx_bufs.machine + (i * BUF) as u64, len);
        // Every send waits for its descriptor to be written back: the card is done with it.
        // SAFETY: slot `i` of our transmit ring, which the card no longer reads.
        unsafe { core::ptr::write_volatile(self.tx_desc(i), dsc) };
        fence(Ordering::SeqCst);
        self.tx_next = (i + 1) % TX_SLOTS;
        self.write(reg::TDT, self.tx_next as u32);
        loop {
            // SAFETY: as above; the card writes the status byte back by DMA.
            let st = unsafe { core::ptr::read_volatile(&raw const (*self.tx_desc(i)).status) };
            if st & desc::DD != 0 {
                self.stats.sent += 1;
                self.note_causes();
                return Ok(());
            }
            if !pci::wait_irq(self.index, deadline) {
                return Err(NicError::Timeout("a transmit to complete"));
            }
        }
    }

    /// Receives the next good frame into `buf`; returns its length.
    pub fn recv(&mut self, buf: &mut [u8], deadline: u64) -> Result<usize, NicError> {
        match self.next_frame(buf, deadline, true) {
            Some(len) => Ok(len),
            None => Err(NicError::Timeout("a frame")),
        }
    }

    /// The next good frame if the ring holds one, without waiting for one (see
    /// [`crate::nic::Nic::try_recv`]).
    pub fn try_recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        self.next_frame(buf, 0, false)
    }

    /// The next good frame; with `wait`, sleeps on the card's interrupt for it until
    /// `deadline` (then `None`), else `None` as soon as the ring is empty.
    fn next_frame(&mut self, buf: &mut [u8], deadline: u64, wait: bool) -> Option<usize> {
        loop {
            let i = self.rx_next;
            // SAFETY: slot `i` of our receive ring, written back by the card by DMA.
            let dsc = unsafe { core::ptr::read_volatile(self.rx_desc(i)) };
            let outcome = rx_outcome(&dsc);
            if outcome != RxOutcome::Empty {
                fence(Ordering::Acquire);
                let got = match outcome {
                    RxOutcome::Frame(len) => {
                        let n = len.min(buf.len());
                        // The card filled buffer `i` before it set DD and does not touch it
                        // again until the tail passes it.
                        let at = self.rx_bufs.va.wrapping_add(i * BUF);
                        // SAFETY: `n` bytes of buffer `i` of our receive region, filled.
                        let src = unsafe { core::slice::from_raw_parts(at, n) };
                        buf[..n].copy_from_slice(src);
                        Some(len)
                    }
                    _ => None,
                };
                // Hand the descriptor back: status cleared, then the tail moves onto it.
                let fresh = RxDesc { addr: dsc.addr, ..RxDesc::default() };
                // SAFETY: as above.
                unsafe { core::ptr::write_volatile(self.rx_desc(i), fresh) };
                fence(Ordering::SeqCst);
                self.write(reg::RDT, i as u32);
                self.rx_next = (i + 1) % RX_SLOTS;
                match got {
                    Some(len) if len <= buf.len() => {
                        self.stats.received += 1;
                        return Some(len);
                    }
                    _ => {
                        self.stats.dropped += 1;
                        continue;
                    }
                }
            }
            self.note_causes();
            if !wait || !pci::wait_irq(self.index, deadline) {
                return None;
            }
        }
    }

    /// See [`crate::nic::Nic::interrupt_latency`]: sets the link-status-change cause
    /// through ICS.
    pub fn interrupt_latency(&mut self, deadline: u64) -> Option<u64> {
        let t = pci::irq_latency(self.index, || self.write(reg::ICS, icr::LSC), deadline);
        self.note_causes();
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_come_low_byte_first() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        assert_eq!(mac_from_eeprom([0x5452, 0x1200, 0x5634]), mac);
        let (ral, rah) = receive_address(mac);
        assert_eq!((ral, rah), (0x1200_5452, 0x8000_5634));
        assert_eq!(mac_from_receive_address(ral, rah), Some(mac));
        assert_eq!(mac_from_receive_address(ral, rah & !RAH_AV), None);
    }

    #[test]
    fn descriptors_are_classified() {
        let mut d = RxDesc { addr: 0x1000, length: 60, ..RxDesc::default() };
        assert_eq!(rx_outcome(&d), RxOutcome::Empty);
        d.status = desc::DD | desc::EOP;
        assert_eq!(rx_outcome(&d), RxOutcome::Frame(60));
        d.errors = 0x80; // RXE
        assert_eq!(rx_outcome(&d), RxOutcome::Bad);
        d.errors = 0;
        d.status = desc::DD; // part of a longer frame
        assert_eq!(rx_outcome(&d), RxOutcome::Bad);
        let t = tx_desc(0x1234_5000, 60);
        assert_eq!((t.addr, t.length, t.cmd, t.status), (0x1234_5000, 60, 0x0b, 0));
    }

    #[test]
    fn control_values_match_the_manual() {
        assert_eq!(TCTL_VALUE, 0x0004_00fa);
        assert_eq!(RCTL_VALUE, 0x0400_8002);
        assert_eq!(TIPG_COPPER, 0x0060_200a);
        assert_eq!(IMS_VALUE, 0xd5);
    }
}
