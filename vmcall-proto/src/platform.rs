// SPDX-License-Identifier: MIT OR Apache-2.0
//! How a run ends: the ports the hypervisor writes to leave the emulator.
//!
//! Both are written unconditionally; on the other emulator (or on hardware) the port is
//! unclaimed and the write is ignored, so the hypervisor need not know where it runs.

/// Bochs: writing the ASCII bytes of [`BOCHS_SHUTDOWN_MAGIC`] to this port ends the
/// simulation (exit status 1, whatever the outcome: the host reads the serial log).
pub const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;
/// The byte string Bochs expects on [`BOCHS_SHUTDOWN_PORT`].
pub const BOCHS_SHUTDOWN_MAGIC: &[u8] = b"Shutdown";

/// QEMU `isa-debug-exit` device (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
/// A 32-bit write of `v` makes QEMU exit with status `(v << 1) | 1`.
pub const QEMU_DEBUG_EXIT_PORT: u16 = 0xf4;

/// Value written to [`QEMU_DEBUG_EXIT_PORT`] for each outcome.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    /// Everything asked of the run succeeded (QEMU exit status 33).
    Ok = 0x10,
    /// The run ended but something failed (QEMU exit status 35).
    Failed = 0x11,
    /// The machine lacks a required feature; nothing was started (QEMU exit status 37).
    Refused = 0x12,
}

impl ExitCode {
    /// The host-side exit status QEMU reports for this code.
    pub const fn qemu_status(self) -> i32 {
        ((self as u32) << 1 | 1) as i32
    }
}

/// The first free COM1 port on a PC; the hypervisor's console.
pub const COM1_PORT: u16 = 0x3f8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_statuses_are_distinct_and_not_plain_failures() {
        let all = [ExitCode::Ok, ExitCode::Failed, ExitCode::Refused];
        for (i, a) in all.iter().enumerate() {
            // 0 and 1 are what QEMU returns on its own; an outcome must not look like them.
            assert!(a.qemu_status() > 1);
            for b in &all[i + 1..] {
                assert_ne!(a.qemu_status(), b.qemu_status());
            }
        }
        assert_eq!(ExitCode::Ok.qemu_status(), 33);
    }
}
