// SPDX-License-Identifier: MIT OR Apache-2.0
//! The hypercall ABI.
//!
//! A guest issues `VMCALL` with the call number in RAX and up to four arguments in RDI, RSI,
//! RDX and R10 (the System V argument registers, R10 instead of RCX as Linux syscalls do).
//! The result comes back in RAX: zero or positive on success, a negative [`HvError`] code on
//! failure. Other registers are preserved. Unknown numbers return
//! [`HvError::UnknownCall`], never success.
//!
//! Addresses passed to the hypervisor are guest-physical. The hypervisor checks every
//! address and length against the caller's partition before touching it.

/// Hypercall numbers.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// `console_write(buf: gpa, len: u64) -> len`: one line (or part of one) of console text,
    /// at most [`CONSOLE_MAX`] bytes, valid UTF-8 not required (invalid bytes are replaced).
    ConsoleWrite = 0,
    /// `guest_info() -> packed`: `guest id | core << 16 | memory in MiB << 32`.
    GuestInfo = 1,
    /// `exit(status: u64) -> !`: the guest is done; the status is reported.
    Exit = 2,
    /// `yield() -> 0`: give up the rest of the time slice (a no-op with one guest per core).
    Yield = 3,
    /// `timer_oneshot(delta_tsc: u64, vector: u64) -> 0`: raise interrupt `vector` (32..=255)
    /// once, `delta_tsc` TSC ticks from now; 0 cancels. Delivered when RFLAGS.IF allows.
    TimerOneshot = 4,
    /// `tsc_per_ms() -> ticks`: the TSC rate the hypervisor calibrated.
    TscPerMs = 5,
    /// `doorbell(channel: u64) -> 0`: interrupt the peer of the caller's channel number
    /// `channel` (its position in the boot-info channel table) with `DOORBELL_VECTOR`.
    /// Only a channel peer can be rung; anything else is `BadArgument`.
    Doorbell = 6,
    /// `exit_count() -> n`: VM exits this guest has taken so far (this call's included), for
    /// measuring exits per operation from inside.
    ExitCount = 7,
}

impl TryFrom<u64> for Hypercall {
    type Error = HvError;
    fn try_from(v: u64) -> Result<Self, HvError> {
        Ok(match v {
            0 => Hypercall::ConsoleWrite,
            1 => Hypercall::GuestInfo,
            2 => Hypercall::Exit,
            3 => Hypercall::Yield,
            4 => Hypercall::TimerOneshot,
            5 => Hypercall::TscPerMs,
            6 => Hypercall::Doorbell,
            7 => Hypercall::ExitCount,
            _ => return Err(HvError::UnknownCall),
        })
    }
}

/// Longest console write.
pub const CONSOLE_MAX: u64 = 256;

/// Hypercall error codes, returned negated in RAX.
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HvError {
    /// No such hypercall.
    UnknownCall = -1,
    /// An address (or address + length) outside the caller's partition.
    BadAddress = -2,
    /// A length over the call's limit.
    BadLength = -3,
    /// Another argument out of range (e.g. a timer vector below 32).
    BadArgument = -4,
}

impl HvError {
    /// The RAX value for this error.
    pub const fn to_rax(self) -> u64 {
        self as i64 as u64
    }

    /// Decodes a RAX result: `Ok(value)` or the error.
    pub fn from_rax(rax: u64) -> Result<u64, Result<HvError, i64>> {
        let v = rax as i64;
        if v >= 0 {
            return Ok(rax);
        }
        Err(match v {
            -1 => Ok(HvError::UnknownCall),
            -2 => Ok(HvError::BadAddress),
            -3 => Ok(HvError::BadLength),
            -4 => Ok(HvError::BadArgument),
            other => Err(other),
        })
    }
}

/// CPUID leaf with the hypervisor signature (EBX, ECX, EDX = "mkvisor\0\0\0\0\0").
pub const CPUID_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// The signature, as the 12 bytes of EBX, ECX, EDX.
pub const CPUID_SIGNATURE: [u8; 12] = *b"mkvisor\0\0\0\0\0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_unknown_is_an_error() {
        for n in 0..8 {
            assert_eq!(Hypercall::try_from(n).unwrap() as u64, n);
        }
        assert_eq!(Hypercall::try_from(8), Err(HvError::UnknownCall));
        assert_eq!(Hypercall::try_from(u64::MAX), Err(HvError::UnknownCall));
    }

    #[test]
    fn errors_are_negative_in_rax() {
        for e in
            [HvError::UnknownCall, HvError::BadAddress, HvError::BadLength, HvError::BadArgument]
        {
            assert!((e.to_rax() as i64) < 0);
            assert_eq!(HvError::from_rax(e.to_rax()), Err(Ok(e)));
        }
        assert_eq!(HvError::from_rax(5), Ok(5));
        assert_eq!(HvError::from_rax(-99i64 as u64), Err(Err(-99)));
    }
}
