// SPDX-License-Identifier: MIT OR Apache-2.0
//! A network card the guest owns, whichever its model: [`Nic::open`] picks the driver by
//! the function's identity ([`crate::e1000`] for the Intel 82540EM, [`crate::ne2k`] for
//! the RTL8029 NE2000), and every operation takes a deadline (TSC, see
//! [`crate::pci::deadline_ms`]). Frames are whole Ethernet frames without FCS.
//!
//! May call: `pci`, the drivers, `card` (what they report), `net` (constants), `vmcall_proto`.

use crate::net::Mac;
use vmcall_proto::guest::BootInfo;

/// Defined below the drivers (which report them) in [`crate::card`].
pub use crate::card::{NicError, Stats};

/// A card, with the driver of its model.
pub enum Nic {
    E1000(crate::e1000::E1000),
    Ne2k(crate::ne2k::Ne2k),
}

impl Nic {
    /// Brings up the guest's device `i`: resets it, reads its MAC address, sets up
    /// reception and interrupts; waits for the link until `deadline`.
    pub fn open(bi: &BootInfo, i: usize, deadline: u64) -> Result<Nic, NicError> {
        let d = crate::pci::devices(bi).get(i).ok_or(NicError::NoDevice)?;
        match (d.vendor_id, d.device_id) {
            (crate::e1000::VENDOR, crate::e1000::DEVICE) => {
                crate::e1000::E1000::open(bi, i, deadline).map(Nic::E1000)
            }
            (crate::ne2k::VENDOR, crate::ne2k::DEVICE) => {
                crate::ne2k::Ne2k::open(bi, i, deadline).map(Nic::Ne2k)
            }
            (v, dev) => Err(NicError::Unsupported(v, dev)),
        }
    }

    /// The model's name.
    pub fn model(&self) -> &'static str {
        match self {
            Nic::E1000(_) => "e1000",
            Nic::Ne2k(_) => "ne2k",
        }
    }

    /// The guest's device index of this card.
    pub fn index(&self) -> usize {
        match self {
            Nic::E1000(n) => n.index(),
            Nic::Ne2k(n) => n.index(),
        }
    }

    /// Full-size frames the card holds before it must drop one: what a peer may send
    /// back to back (a TCP window larger than that loses frames when they come at once).
    pub fn rx_frames(&self) -> usize {
        match self {
            Nic::E1000(_) => crate::e1000::RX_SLOTS,
            // 256-byte pages; a full frame and its 4-byte header take six.
            Nic::Ne2k(_) => {
                (crate::ne2k::RX_STOP - crate::ne2k::RX_START) as usize
                    / (crate::net::MAX_FRAME + 4).div_ceil(256)
            }
        }
    }

    pub fn mac(&self) -> Mac {
        match self {
            Nic::E1000(n) => n.mac(),
            Nic::Ne2k(n) => n.mac(),
        }
    }

    pub fn stats(&self) -> Stats {
        match self {
            Nic::E1000(n) => n.stats(),
            Nic::Ne2k(n) => n.stats(),
        }
    }

    /// Sends one frame (padded to the Ethernet minimum); returns once the card says it
    /// went out, or fails at `deadline`.
    pub fn send(&mut self, frame: &[u8], deadline: u64) -> Result<(), NicError> {
        match self {
            Nic::E1000(n) => n.send(frame, deadline),
            Nic::Ne2k(n) => n.send(frame, deadline),
        }
    }

    /// Receives the next frame that fits `buf` (longer ones are dropped and counted in
    /// [`Stats::dropped`]); returns its length, or fails at `deadline` with `Timeout`.
    pub fn recv(&mut self, buf: &mut [u8], deadline: u64) -> Result<usize, NicError> {
        match self {
            Nic::E1000(n) => n.recv(buf, deadline),
            Nic::Ne2k(n) => n.recv(buf, deadline),
        }
    }

    /// The next frame that fits `buf` if the card holds one, else `None` at once: never
    /// sleeps waiting for one (a poll loop such as [`crate::tcpip`] sleeps on the card's
    /// interrupt itself). `deadline` bounds only the card's own work (the NE2000's remote
    /// reads).
    pub fn try_recv(&mut self, buf: &mut [u8], deadline: u64) -> Result<Option<usize>, NicError> {
        match self {
            Nic::E1000(n) => Ok(n.try_recv(buf)),
            Nic::Ne2k(n) => n.try_recv(buf, deadline),
        }
    }

    /// Makes the card raise its interrupt now (an interrupt cause set by software) and
    /// returns the TSC ticks from just before the trigger to the handler's first
    /// instruction, interrupts open meanwhile; `None` if none came by `deadline`.
    pub fn interrupt_latency(&mut self, deadline: u64) -> Option<u64> {
        match self {
            Nic::E1000(n) => n.interrupt_latency(deadline),
            Nic::Ne2k(n) => n.interrupt_latency(deadline),
        }
    }
}
