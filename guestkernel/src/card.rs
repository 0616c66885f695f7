// SPDX-License-Identifier: MIT OR Apache-2.0
//! What every network card driver reports, whichever its model: its frame counts
//! ([`Stats`]) and why an operation failed ([`NicError`]). The drivers ([`crate::e1000`],
//! [`crate::ne2k`]) return these and [`crate::nic`] (which picks the driver) passes them on,
//! so they live below both.
//!
//! May call: `pci` (the enable error it wraps).

use crate::pci::EnableError;

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
