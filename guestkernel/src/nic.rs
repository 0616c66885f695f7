// SPDX-License-Identifier: MIT OR Apache-2.0
//! A network card the guest owns, whichever its model: [`Nic::open`] picks the driver by
//! the function's identity ([`crate::e1000`] for the Intel 82540EM, [`crate::ne2k`] for
//! the RTL8029 NE2000), and every operation takes a deadline (TSC, see
//! [`crate::pci::deadline_ms`]). Frames are whole Ethernet frames without FCS.
//!
//! May call: `pci`, the drivers, `net` (constants), `vmcall_proto`.

use crate::net::Mac;
use crate::pci::EnableError;
use vmcall_proto::guest::BootInfo;

/// Frame counts of one card.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub sent: u64,
    pub received: u64,
    /// Frames the card delivered that the driver dropped (errors, too long, truncated).
    pub dropped: u64,
    /// Times the card said it ran out of receive buffers.
    pub overruns: u64,
}

/// Why a card operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicError {
    /// No device with this index in the boot info.
    NoDevice,
    /// The function is not a model this runtime drives (vendor, device).
    Unsupported(u16, u16),
    /// The function lacks the BAR its driver needs.
    NoBar,
    /// Its command register could not be set.
    Enable(EnableError),
    /// No memory for descriptor rings and buffers.
    NoMemory,
    /// The card did not answer in time (what was waited for).
    Timeout(&'static str),
    /// A frame longer than [`crate::net::MAX_FRAME`].
    TooLong,
    /// The card is in a state the driver cannot use (what it found).
    Hardware(&'static str),
}

impl core::fmt::Display for NicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NicError::NoDevice => f.write_str("no such device in the boot info"),
            NicError::Unsupported(v, d) => write!(f, "no driver for {v:04x}:{d:04x}"),
            NicError::NoBar => f.write_str("the BAR the driver needs is missing"),
            NicError::Enable(EnableError::Absent) => f.write_str("the function does not answer"),
            NicError::Enable(EnableError::NoDma) => {
                f.write_str("bus mastering needs dma = \"unconfined\" in the config")
            }
            NicError::Enable(EnableError::Refused(c)) => {
                write!(f, "the command register reads back {c:#06x}")
            }
            NicError::NoMemory => f.write_str("no memory for rings and buffers"),
            NicError::Timeout(what) => write!(f, "timed out waiting for {what}"),
            NicError::TooLong => f.write_str("frame too long"),
            NicError::Hardware(what) => write!(f, "card error: {what}"),
        }
    }
}

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
