// SPDX-License-Identifier: MIT OR Apache-2.0
//! The hypercall ABI.
//!
//! A guest issues `VMCALL` (Intel VT-x) or `VMMCALL` (AMD SVM: the CPUID vendor says which;
//! the ABI is the same) with the call number in RAX and up to four arguments in RDI, RSI,
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
    /// `guest_info() -> packed`: `guest id | core << 16 | memory in MiB << 32` (see
    /// [`GuestInfo`]).
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
    /// `cap_identify(slot) -> type | rights << 8 | pages << 16`.
    CapIdentify = 8,
    /// `cap_split(slot, offset) -> new slot`: a memory cap in two at a page offset.
    CapSplit = 9,
    /// `cap_map(slot, gpa, rights) -> 0`: map a memory cap into the caller's grant window
    /// (`GRANT_WINDOW`) at a page-aligned free address with at most the cap's rights.
    CapMap = 10,
    /// `cap_unmap(slot) -> gpa`: undo a mapping; returns where it was.
    CapUnmap = 11,
    /// `cap_transfer(slot, endpoint_slot, mode) -> slot in the peer's space`: give a
    /// capability to the peer of a channel endpoint the caller holds. `mode` bit 0: 0 move
    /// (the caller loses it and its mapping), 1 copy; bits 8-15: the copy's rights (at most
    /// the source's). Needs GRANT on the source.
    CapTransfer = 12,
    /// `cap_revoke(slot) -> n`: take back every copy derived from this capability, on every
    /// core, unmapped and their EPT translations invalidated before the call returns;
    /// returns how many were revoked.
    CapRevoke = 13,
    /// `cap_accept(endpoint_slot, n) -> previous quota`: the caller agrees to receive up to
    /// `n` more capabilities through this endpoint (0 refuses all). Transfers to a guest
    /// that has not accepted are refused with `NotAccepted` and cost it nothing.
    CapAccept = 14,
    /// `guest_control(slot, op) -> value`: act on the guest a guest-control capability
    /// names (see [`control`]): `QUERY` returns its state word, `STOP` stops it (its clean
    /// death is over when the call returns; it stays down until started), `START` starts a
    /// new incarnation of a guest that is down, `RESTART` does both. The operation runs on
    /// the target's core; the caller waits for that core's answer (bounded: `Timeout`).
    GuestControl = 15,
}

/// The answer of [`Hypercall::GuestInfo`], packed and unpacked here only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestInfo {
    pub id: u16,
    pub core: u16,
    pub memory_mib: u32,
}

impl GuestInfo {
    /// The word: `id | core << 16 | memory_mib << 32`.
    pub const fn pack(self) -> u64 {
        self.id as u64 | (self.core as u64) << 16 | (self.memory_mib as u64) << 32
    }

    pub const fn unpack(w: u64) -> Self {
        GuestInfo { id: w as u16, core: (w >> 16) as u16, memory_mib: (w >> 32) as u32 }
    }
}

/// Operations and the state word of [`Hypercall::GuestControl`].
pub mod control {
    pub const QUERY: u64 = 0;
    pub const STOP: u64 = 1;
    pub const START: u64 = 2;
    pub const RESTART: u64 = 3;
    /// Take the guest's core out of the machine: the guest stopped (as `STOP`), then the
    /// core leaves the membership view and its hypervisor instance parks; `START` or
    /// `RESTART` brings it back (into the view, with a new incarnation).
    pub const PARK: u64 = 4;
    /// `COUNTER | k << 8`: counter `k` (see [`counter`]) of the target's current
    /// incarnation, or of its last one when it is down.
    pub const COUNTER: u64 = 5;

    /// The counters `COUNTER` reads.
    pub mod counter {
        /// VM exits.
        pub const EXITS: u64 = 0;
        pub const HYPERCALLS: u64 = 1;
        /// Doorbells it rang.
        pub const DOORBELLS: u64 = 2;
        /// How many there are.
        pub const COUNT: u64 = 3;
    }

    /// Whether `operation` is one a controller may send.
    pub const fn valid(operation: u64) -> bool {
        let (op, k) = (operation & 0xff, operation >> 8);
        match op {
            QUERY | STOP | START | RESTART | PARK => k == 0,
            COUNTER => k < counter::COUNT,
            _ => false,
        }
    }

    /// State word: `state | incarnation << 8 | last exit status (low 32 bits) << 32`.
    pub const fn state_word(state: u8, incarnation: u32, status: u64) -> u64 {
        state as u64 | (incarnation as u64 & 0xff_ffff) << 8 | (status & 0xffff_ffff) << 32
    }
    /// Its incarnation is running.
    pub const RUNNING: u8 = 1;
    /// Down: it exited (the status is in the word).
    pub const EXITED: u8 = 2;
    /// Down: the hypervisor stopped it (fault, budget) and its policy does not restart it.
    pub const STOPPED: u8 = 3;
    /// Down: stopped by a controller's request.
    pub const HELD: u8 = 4;
    /// Down, and its core out of the machine (`PARK`).
    pub const PARKED: u8 = 5;
}

/// Guest-physical window where capabilities are mapped: 3 GiB to 4 GiB.
pub const GRANT_WINDOW: (u64, u64) = (0xc000_0000, 0x1_0000_0000);

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
            8 => Hypercall::CapIdentify,
            9 => Hypercall::CapSplit,
            10 => Hypercall::CapMap,
            11 => Hypercall::CapUnmap,
            12 => Hypercall::CapTransfer,
            13 => Hypercall::CapRevoke,
            14 => Hypercall::CapAccept,
            15 => Hypercall::GuestControl,
            _ => return Err(HvError::UnknownCall),
        })
    }
}

/// Longest console write.
pub const CONSOLE_MAX: u64 = 256;

/// Hypercall error codes, returned negated in RAX.
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HvError {
    /// No such hypercall.
    UnknownCall = -1,
    /// An address (or address + length) outside the caller's partition.
    BadAddress = -2,
    /// A length over the call's limit.
    BadLength = -3,
    /// Another argument out of range (e.g. a timer vector below 32).
    BadArgument = -4,
    /// No capability in that slot.
    NoSuchSlot = -5,
    /// The slot's capability was revoked.
    Revoked = -6,
    /// The capability is not of the type the call needs.
    WrongType = -7,
    /// The call asks for rights the capability does not carry.
    RightsEscalation = -8,
    /// The capability space is full.
    NoSpace = -9,
    /// An address or offset not page-aligned.
    Misaligned = -10,
    /// The guest-physical range is already used by another mapping.
    AddressInUse = -11,
    /// The capability is not mapped.
    NotMapped = -12,
    /// The capability is mapped (and must not be for this call, or is already).
    AlreadyMapped = -13,
    /// The capability has live copies.
    HasCopies = -14,
    /// No room to record another copy.
    TooManyCopies = -15,
    /// A split offset outside the region.
    BadOffset = -16,
    /// The channel peer is not running (never started, or ended).
    PeerGone = -17,
    /// The hypervisor has no memory left for this operation (e.g. EPT table frames).
    NoMemory = -18,
    /// A core did not answer within the protocol's deadline; it is now fenced (failed).
    Timeout = -19,
    /// The operation needs an original capability, not a copy (e.g. moving a copy).
    NotOwner = -20,
    /// Copies of copies go at most `caps::MAX_DEPTH` deep.
    TooDeep = -21,
    /// The receiver has not accepted capabilities on that endpoint (see `cap_accept`), or not
    /// yet: also while it is being set up. Retryable (README "Guest ABI" says, per error,
    /// whether to retry).
    NotAccepted = -22,
    /// The guest is in a state the operation does not apply to (e.g. starting a guest that
    /// runs), or another operation on it is still under way.
    Busy = -23,
}

impl From<crate::caps::CapError> for HvError {
    fn from(e: crate::caps::CapError) -> Self {
        use crate::caps::CapError as C;
        match e {
            C::NoSuchSlot => HvError::NoSuchSlot,
            C::Revoked => HvError::Revoked,
            C::WrongType => HvError::WrongType,
            C::RightsEscalation => HvError::RightsEscalation,
            C::NoSpace => HvError::NoSpace,
            C::Misaligned => HvError::Misaligned,
            C::AddressInUse => HvError::AddressInUse,
            C::NotMapped => HvError::NotMapped,
            C::AlreadyMapped => HvError::AlreadyMapped,
            C::HasCopies => HvError::HasCopies,
            C::TooManyCopies => HvError::TooManyCopies,
            C::BadOffset => HvError::BadOffset,
            C::NotOwner => HvError::NotOwner,
            C::TooDeep => HvError::TooDeep,
        }
    }
}

pub const ALL_ERRORS: [HvError; 23] = [
    HvError::UnknownCall,
    HvError::BadAddress,
    HvError::BadLength,
    HvError::BadArgument,
    HvError::NoSuchSlot,
    HvError::Revoked,
    HvError::WrongType,
    HvError::RightsEscalation,
    HvError::NoSpace,
    HvError::Misaligned,
    HvError::AddressInUse,
    HvError::NotMapped,
    HvError::AlreadyMapped,
    HvError::HasCopies,
    HvError::TooManyCopies,
    HvError::BadOffset,
    HvError::PeerGone,
    HvError::NoMemory,
    HvError::Timeout,
    HvError::NotOwner,
    HvError::TooDeep,
    HvError::NotAccepted,
    HvError::Busy,
];

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
        Err(ALL_ERRORS.iter().find(|e| **e as i64 == v).copied().ok_or(v))
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
    fn guest_info_packs_each_field_in_its_place() {
        let i = GuestInfo { id: 0x1234, core: 0xabcd, memory_mib: 0x8765_4321 };
        assert_eq!(i.pack(), 0x8765_4321_abcd_1234);
        assert_eq!(GuestInfo::unpack(i.pack()), i);
        assert_eq!(GuestInfo::unpack(u64::MAX).pack(), u64::MAX);
    }

    #[test]
    fn numbers_round_trip_and_unknown_is_an_error() {
        for n in 0..16 {
            assert_eq!(Hypercall::try_from(n).unwrap() as u64, n);
        }
        assert_eq!(Hypercall::try_from(16), Err(HvError::UnknownCall));
        assert_eq!(Hypercall::try_from(u64::MAX), Err(HvError::UnknownCall));
    }

    #[test]
    fn control_state_word_packs_its_fields() {
        let w = control::state_word(control::EXITED, 7, 0x1_0000_0005);
        assert_eq!((w & 0xff, (w >> 8) & 0xff_ffff, w >> 32), (2, 7, 5));
        assert!((w as i64) >= 0, "never read as an error");
    }

    #[test]
    fn errors_are_negative_in_rax() {
        for (i, e) in ALL_ERRORS.into_iter().enumerate() {
            assert_eq!(e as i64, -(i as i64) - 1, "codes are dense and stable");
            assert!((e.to_rax() as i64) < 0);
            assert_eq!(HvError::from_rax(e.to_rax()), Err(Ok(e)));
        }
        assert_eq!(HvError::from_rax(5), Ok(5));
        assert_eq!(HvError::from_rax(-99i64 as u64), Err(Err(-99)));
    }
}
