// SPDX-License-Identifier: MIT OR Apache-2.0
//! Driver for the NE2000-compatible Realtek RTL8029 (10ec:8029), a DP8390 core behind
//! one I/O BAR (32 ports): registers at `base + 0..16` in three pages (CR.PS), the
//! remote-DMA data port at `base + 0x10` (16-bit, DCR.WTS), reset at `base + 0x1f`. No
//! bus mastering: frames move through the card's own 16 KiB buffer by port I/O, which
//! the hypervisor opens in this guest's I/O bitmap only.
//!
//! Buffer layout (256-byte pages): transmit at [`TX_PAGE`] (6 pages, one frame), the
//! receive ring from [`RX_START`] to [`RX_STOP`]. The card writes each frame at CURR
//! behind a 4-byte header (status, next page, length with FCS); the driver reads at
//! [`Ne2k`]'s `next` and keeps BNRY one page behind it, so the card never overwrites
//! what is unread.
//!
//! Not implemented: the DP8390's recovery from a receive-ring overwrite (OVW: stop, resend,
//! restart); the driver only counts it. Bochs never overwrites (a frame that does not fit
//! the free pages is dropped), and a driver that reads promptly keeps the ring free.
//!
//! Invariant: whenever interrupts are open (only inside `pci::wait_irq`), register page
//! 0 is selected and no remote DMA is under way; the interrupt handler relies on it (it
//! reads ISR and writes the bits back to clear them, which drops the line).
//!
//! May call: `arch` (port I/O), `pci`, `nic` (types), `net` (constants).

use crate::arch::{inb, inw, outb, outw};
use crate::card::{NicError, Stats};
use crate::net::{Mac, MAX_FRAME, MIN_FRAME};
use crate::pci;
use vmcall_proto::guest::BootInfo;

pub const VENDOR: u16 = 0x10ec;
pub const DEVICE: u16 = 0x8029;

/// Page-0 registers (read / write names where they differ).
pub mod reg {
    pub const CR: u16 = 0x00;
    pub const PSTART: u16 = 0x01;
    pub const PSTOP: u16 = 0x02;
    pub const BNRY: u16 = 0x03;
    pub const TPSR: u16 = 0x04;
    pub const TBCR0: u16 = 0x05;
    pub const TBCR1: u16 = 0x06;
    pub const ISR: u16 = 0x07;
    pub const RSAR0: u16 = 0x08;
    pub const RSAR1: u16 = 0x09;
    pub const RBCR0: u16 = 0x0a;
    pub const RBCR1: u16 = 0x0b;
    pub const RCR: u16 = 0x0c;
    pub const TCR: u16 = 0x0d;
    pub const DCR: u16 = 0x0e;
    pub const IMR: u16 = 0x0f;
    /// Page 1: the station address, 6 registers.
    pub const PAR0: u16 = 0x01;
    /// Page 1: the page the card writes the next frame to.
    pub const CURR: u16 = 0x07;
    /// Page 1: the multicast hash, 8 registers.
    pub const MAR0: u16 = 0x08;
    pub const DATA: u16 = 0x10;
    pub const RESET: u16 = 0x1f;
}

/// Command register bits.
pub mod cr {
    pub const STP: u8 = 0x01;
    pub const STA: u8 = 0x02;
    pub const TXP: u8 = 0x04;
    pub const RD_READ: u8 = 0x08;
    pub const RD_WRITE: u8 = 0x10;
    /// Abort or complete remote DMA.
    pub const RD_NONE: u8 = 0x20;
    pub const PAGE0: u8 = 0x00;
    pub const PAGE1: u8 = 0x40;
}

/// Interrupt status and mask bits.
pub mod isr {
    pub const PRX: u8 = 0x01;
    pub const PTX: u8 = 0x02;
    pub const RXE: u8 = 0x04;
    pub const TXE: u8 = 0x08;
    pub const OVW: u8 = 0x10;
    pub const CNT: u8 = 0x20;
    pub const RDC: u8 = 0x40;
    pub const RST: u8 = 0x80;
}

/// DCR: word-wide transfers, normal operation (not loopback), FIFO threshold 8 bytes.
pub const DCR_VALUE: u8 = 0x49;
/// RCR: accept broadcasts and runts (slirp's ARP replies are 42 bytes, unpadded).
pub const RCR_VALUE: u8 = 0x06;
/// Interrupts the driver takes: received, transmitted, their errors, ring overwrite.
pub const IMR_VALUE: u8 = isr::PRX | isr::PTX | isr::RXE | isr::TXE | isr::OVW;

/// First page of the transmit buffer (pages 0x40.. are the card's RAM).
pub const TX_PAGE: u8 = 0x40;
/// The receive ring, `[RX_START, RX_STOP)` pages.
pub const RX_START: u8 = 0x46;
pub const RX_STOP: u8 = 0x80;
const _: () = assert!((RX_START - TX_PAGE) as usize * 256 >= MAX_FRAME);

/// The 4-byte header the card writes before each received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxHeader {
    pub status: u8,
    pub next: u8,
    /// Frame bytes, without the FCS.
    pub len: usize,
}

/// Parses and checks a receive header: the next page inside the ring, a length a frame
/// can have (the card counts the 4 FCS bytes; runts are accepted).
pub fn parse_header(h: [u8; 4]) -> Option<RxHeader> {
    let total = u16::from_le_bytes([h[2], h[3]]) as usize;
    let len = total.checked_sub(4)?;
    ((RX_START..RX_STOP).contains(&h[1]) && (14..=MAX_FRAME).contains(&len)).then_some(RxHeader {
        status: h[0],
        next: h[1],
        len,
    })
}

/// BNRY once everything before page `next` has been read: the page just before it, in the
/// ring.
pub fn boundary_before(next: u8) -> u8 {
    if next <= RX_START {
        RX_STOP - 1
    } else {
        next - 1
    }
}

/// The byte count a word-wide remote DMA moves for `len` bytes (rounded up to even).
pub fn dma_count(len: usize) -> u16 {
    (len as u16 + 1) & !1
}

pub struct Ne2k {
    index: usize,
    io: u16,
    mac: Mac,
    /// The page the next unread frame starts at.
    next: u8,
    stats: Stats,
}

/// The interrupt handler: page 0 is selected (the driver's invariant); reading ISR and
/// writing the bits back clears them, and the line drops.
fn handle_irq(io: u64) -> u32 {
    let io = io as u16;
    // ISR reads have no side effect, and writing ones clears exactly those causes.
    // SAFETY: the card's own ports, opened for this guest.
    unsafe {
        let s = inb(io + reg::ISR) & !isr::RST;
        outb(io + reg::ISR, s);
        s as u32
    }
}

impl Ne2k {
    fn inb(&self, r: u16) -> u8 {
        // Register reads other than the data port have no side effect, and the data port
        // is read only inside a remote DMA this driver set up.
        // SAFETY: a port of the card's I/O BAR (checked at open), opened for this guest.
        unsafe { inb(self.io + r) }
    }

    fn outb(&self, r: u16, v: u8) {
        // SAFETY: a port of the card's I/O BAR; the card never masters the bus.
        unsafe { outb(self.io + r, v) }
    }

    fn poll_isr(&self, bit: u8, deadline: u64) -> bool {
        loop {
            if self.inb(reg::ISR) & bit != 0 {
                return true;
            }
            if crate::arch::rdtsc() >= deadline {
                return false;
            }
            core::hint::spin_loop();
        }
    }

    /// Sets up a remote DMA of `count` bytes at card address `addr` with command `rd`.
    fn remote(&self, addr: u16, count: u16, rd: u8) {
        self.outb(reg::ISR, isr::RDC);
        self.outb(reg::RBCR0, count as u8);
        self.outb(reg::RBCR1, (count >> 8) as u8);
        self.outb(reg::RSAR0, addr as u8);
        self.outb(reg::RSAR1, (addr >> 8) as u8);
        self.outb(reg::CR, rd | cr::STA | cr::PAGE0);
    }

    /// Ends a remote DMA: waits for its completion and acknowledges it.
    fn remote_done(&self, deadline: u64) -> Result<(), NicError> {
        if !self.poll_isr(isr::RDC, deadline) {
            return Err(NicError::Timeout("a remote DMA to complete"));
        }
        self.outb(reg::ISR, isr::RDC);
        Ok(())
    }

    /// Reads `out.len()` bytes (word-wide) from card address `addr`, then the rest of a
    /// transfer of `total` bytes is drained.
    fn read_card(
        &self,
        addr: u16,
        out: &mut [u8],
        total: usize,
        deadline: u64,
    ) -> Result<(), NicError> {
        let count = dma_count(total);
        self.remote(addr, count, cr::RD_READ);
        for k in 0..count as usize / 2 {
            // SAFETY: the data port, inside the remote read just set up.
            let w = unsafe { inw(self.io + reg::DATA) }.to_le_bytes();
            for (j, b) in w.iter().enumerate() {
                if let Some(o) = out.get_mut(2 * k + j) {
                    *o = *b;
                }
            }
        }
        self.remote_done(deadline)
    }

    /// Brings the card up (see [`crate::nic::Nic::open`]).
    pub fn open(bi: &BootInfo, index: usize, deadline: u64) -> Result<Ne2k, NicError> {
        let d = *pci::devices(bi).get(index).ok_or(NicError::NoDevice)?;
        if (d.vendor_id, d.device_id) != (VENDOR, DEVICE) {
            return Err(NicError::Unsupported(d.vendor_id, d.device_id));
        }
        let bar = d.first_io_bar().ok_or(NicError::NoBar)?;
        if bar.size < 32 || bar.addr > 0xffff - 32 {
            return Err(NicError::NoBar);
        }
        // SAFETY: I/O decoding only; the card has no bus mastering.
        unsafe { pci::enable(&d, false) }.map_err(NicError::Enable)?;
        let nic = Ne2k {
            index,
            io: bar.addr as u16,
            mac: [0; 6],
            next: RX_START + 1,
            stats: Stats::default(),
        };
        // Reset: a read of the reset port starts it, a write ends it; ISR.RST says done.
        let r = nic.inb(reg::RESET);
        nic.outb(reg::RESET, r);
        if !nic.poll_isr(isr::RST, deadline) {
            return Err(NicError::Timeout("the reset to end"));
        }
        // Stopped, page 0: data path, the ring, no interrupts (DP8390 datasheet,
        // initialisation sequence). Loopback until the station address is set.
        nic.outb(reg::CR, cr::STP | cr::RD_NONE | cr::PAGE0);
        nic.outb(reg::DCR, DCR_VALUE);
        nic.outb(reg::RBCR0, 0);
        nic.outb(reg::RBCR1, 0);
        nic.outb(reg::RCR, 0x20); // monitor: nothing stored yet
        nic.outb(reg::TCR, 0x02); // internal loopback
        nic.outb(reg::PSTART, RX_START);
        nic.outb(reg::PSTOP, RX_STOP);
        nic.outb(reg::BNRY, boundary_before(nic.next));
        nic.outb(reg::TPSR, TX_PAGE);
        nic.outb(reg::ISR, 0xff);
        nic.outb(reg::IMR, 0);
        nic.outb(reg::CR, cr::STP | cr::RD_NONE | cr::PAGE1);
        nic.outb(reg::CURR, nic.next);
        nic.outb(reg::CR, cr::STP | cr::RD_NONE | cr::PAGE0);
        // The station address PROM: 16 words at card address 0, each byte doubled.
        let mut prom = [0u8; 12];
        nic.read_card(0, &mut prom, 12, deadline)?;
        let mut mac = [0; 6];
        for (i, m) in mac.iter_mut().enumerate() {
            *m = prom[2 * i];
        }
        if mac == [0; 6] || mac == [0xff; 6] {
            return Err(NicError::Hardware("no station address in the PROM"));
        }
        let nic = Ne2k { mac, ..nic };
        nic.outb(reg::CR, cr::STP | cr::RD_NONE | cr::PAGE1);
        for (i, b) in mac.iter().enumerate() {
            nic.outb(reg::PAR0 + i as u16, *b);
        }
        for i in 0..8 {
            nic.outb(reg::MAR0 + i, 0);
        }
        nic.outb(reg::CR, cr::STA | cr::RD_NONE | cr::PAGE0);
        pci::set_handler(index, handle_irq, nic.io as u64);
        nic.outb(reg::TCR, 0);
        nic.outb(reg::RCR, RCR_VALUE);
        nic.outb(reg::ISR, 0xff);
        nic.outb(reg::IMR, IMR_VALUE);
        Ok(nic)
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

    fn note_causes(&mut self) -> u32 {
        let c = pci::take_causes(self.index);
        if c & isr::OVW as u32 != 0 {
            self.stats.overruns += 1;
        }
        c
    }

    /// Copies `frame` into the transmit buffer and transmits it; returns once the card
    /// reports it sent (PTX) or failed (TXE).
    pub fn send(&mut self, frame: &[u8], deadline: u64) -> Result<(), NicError> {
        if frame.len() > MAX_FRAME {
            return Err(NicError::TooLong);
        }
        let len = frame.len().max(MIN_FRAME);
        let count = dma_count(len);
        self.remote((TX_PAGE as u16) << 8, count, cr::RD_WRITE);
        for k in 0..count as usize / 2 {
            let b = |j: usize| frame.get(j).copied().unwrap_or(0);
            // SAFETY: the data port, inside the remote write just set up.
            unsafe { outw(self.io + reg::DATA, u16::from_le_bytes([b(2 * k), b(2 * k + 1)])) };
        }
        self.remote_done(deadline)?;
        let _ = self.note_causes();
        self.outb(reg::TPSR, TX_PAGE);
        self.outb(reg::TBCR0, len as u8);
        self.outb(reg::TBCR1, (len >> 8) as u8);
        self.outb(reg::CR, cr::STA | cr::TXP | cr::RD_NONE | cr::PAGE0);
        loop {
            // The handler reports PTX/TXE; without a routed interrupt, ISR says it itself.
            let mut c = self.note_causes() as u8;
            let s = self.inb(reg::ISR) & (isr::PTX | isr::TXE);
            if s != 0 {
                self.outb(reg::ISR, s);
                c |= s;
            }
            if c & isr::TXE != 0 {
                return Err(NicError::Hardware("transmit error"));
            }
            if c & isr::PTX != 0 {
                self.stats.sent += 1;
                return Ok(());
            }
            if !pci::wait_irq(self.index, deadline) {
                return Err(NicError::Timeout("a transmit to complete"));
            }
        }
    }

    fn curr(&self) -> u8 {
        self.outb(reg::CR, cr::STA | cr::RD_NONE | cr::PAGE1);
        let c = self.inb(reg::CURR);
        self.outb(reg::CR, cr::STA | cr::RD_NONE | cr::PAGE0);
        c
    }

    /// Receives the next frame into `buf`; returns its length.
    pub fn recv(&mut self, buf: &mut [u8], deadline: u64) -> Result<usize, NicError> {
        match self.next_frame(buf, deadline, true)? {
            Some(len) => Ok(len),
            None => Err(NicError::Timeout("a frame")),
        }
    }

    /// The next frame if the card holds one, without waiting for one (see
    /// [`crate::nic::Nic::try_recv`]); `deadline` bounds only the card's remote reads.
    pub fn try_recv(&mut self, buf: &mut [u8], deadline: u64) -> Result<Option<usize>, NicError> {
        self.next_frame(buf, deadline, false)
    }

    /// The next good frame; with `wait`, sleeps on the card's interrupt for it until
    /// `deadline` (then `None`), else `None` as soon as the ring is empty.
    fn next_frame(
        &mut self,
        buf: &mut [u8],
        deadline: u64,
        wait: bool,
    ) -> Result<Option<usize>, NicError> {
        loop {
            let _ = self.note_causes();
            if self.curr() != self.next {
                let page = (self.next as u16) << 8;
                let mut h = [0u8; 4];
                self.read_card(page, &mut h, 4, deadline)?;
                let Some(hdr) = parse_header(h) else {
                    // A header that makes no sense: drop everything the card holds.
                    self.stats.dropped += 1;
                    self.next = self.curr();
                    self.outb(reg::BNRY, boundary_before(self.next));
                    continue;
                };
                let n = hdr.len.min(buf.len());
                // The frame follows its header, wrapping at RX_STOP (the remote DMA wraps
                // with the ring).
                self.read_card(page + 4, &mut buf[..n], hdr.len, deadline)?;
                self.next = hdr.next;
                self.outb(reg::BNRY, boundary_before(hdr.next));
                if hdr.len > buf.len() {
                    self.stats.dropped += 1;
                    continue;
                }
                self.stats.received += 1;
                return Ok(Some(hdr.len));
            }
            if !wait || !pci::wait_irq(self.index, deadline) {
                return Ok(None);
            }
        }
    }

    /// See [`crate::nic::Nic::interrupt_latency`]: a remote read of zero bytes completes
    /// at once, with the remote-DMA-complete interrupt unmasked for it.
    pub fn interrupt_latency(&mut self, deadline: u64) -> Option<u64> {
        self.outb(reg::IMR, IMR_VALUE | isr::RDC);
        self.outb(reg::RBCR0, 0);
        self.outb(reg::RBCR1, 0);
        let io = self.io;
        let t = pci::irq_latency(
            self.index,
            // SAFETY: the card's command register: a remote read of zero bytes.
            || unsafe { outb(io + reg::CR, cr::RD_READ | cr::STA | cr::PAGE0) },
            deadline,
        );
        self.outb(reg::CR, cr::STA | cr::RD_NONE | cr::PAGE0);
        self.outb(reg::IMR, IMR_VALUE);
        self.outb(reg::ISR, isr::RDC);
        let _ = self.note_causes();
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_checked() {
        // A 60-byte frame (64 with FCS) whose successor starts at page 0x47.
        assert_eq!(
            parse_header([0x01, 0x47, 64, 0]),
            Some(RxHeader { status: 1, next: 0x47, len: 60 })
        );
        // A 42-byte runt (slirp's ARP reply) is fine.
        assert_eq!(parse_header([0x01, 0x47, 46, 0]).map(|h| h.len), Some(42));
        assert_eq!(parse_header([0x01, 0x20, 64, 0]), None, "next page below the ring");
        assert_eq!(parse_header([0x01, RX_STOP, 64, 0]), None, "next page past the ring");
        assert_eq!(parse_header([0x01, 0x47, 2, 0]), None, "shorter than its FCS");
        let too_long = (MAX_FRAME + 5) as u16;
        assert_eq!(parse_header([0x01, 0x47, too_long as u8, (too_long >> 8) as u8]), None);
    }

    #[test]
    fn the_boundary_stays_one_page_behind_and_wraps() {
        assert_eq!(boundary_before(RX_START + 1), RX_START);
        assert_eq!(boundary_before(0x60), 0x5f);
        assert_eq!(boundary_before(RX_START), RX_STOP - 1);
    }

    #[test]
    fn word_transfers_round_up() {
        assert_eq!(dma_count(60), 60);
        assert_eq!(dma_count(61), 62);
        assert_eq!(dma_count(4), 4);
        assert_eq!(dma_count(MAX_FRAME), 1514);
    }
}
