// SPDX-License-Identifier: MIT OR Apache-2.0
//! The interrupts an SVM guest takes through its own IDT (its channel doorbells, its
//! devices' lines), kept as a local APIC would keep them: requested (IRR), delivered and
//! not yet acknowledged (ISR), and the priority rule between them (SDM Vol. 3A 11.8.3.1:
//! an interrupt is delivered only if its priority class, vector bits 7:4, is above that of
//! the highest one in service). Under VT-x the real local APIC does all of this for the
//! guest; under SVM every physical interrupt exits (the run timer needs the INTR
//! intercept), the host takes it (`arch::idt`) and the vCPU offers one virtual interrupt
//! at a time (V_IRQ, V_INTR_VECTOR: AMD APM Vol. 2 15.21.4), so the vCPU keeps this state.
//!
//! A pure state machine (host-tested): [`Virq::offer`] picks what the next entry offers,
//! [`Virq::entered`] records whether the guest took it, [`Virq::eoi`] retires the highest
//! in service at the guest's EOI and says whether it was a device's, which the vCPU then
//! acknowledges at the real APIC (the host's device stubs leave it in service there).
//!
//! Owns nothing shared. May call: `vmcall_proto` (the vectors).

use vmcall_proto::device::{DEVICE_VECTOR_BASE, MAX_DEVICES_PER_GUEST};
use vmcall_proto::guest::DOORBELL_VECTOR;

/// The doorbell's bit; bits `0..MAX_DEVICES_PER_GUEST` are the devices'.
pub const DOORBELL: u8 = 1 << 4;
const _: () = assert!(MAX_DEVICES_PER_GUEST <= 4);

/// The vector of bit `b` (a device's `0x50 + b`, or the doorbell's).
fn vector(b: u32) -> u8 {
    if 1 << b == DOORBELL {
        DOORBELL_VECTOR
    } else {
        DEVICE_VECTOR_BASE + b as u8
    }
}

/// The highest vector among `bits`, or `None`.
fn highest(bits: u8) -> Option<(u32, u8)> {
    (0..8u32).filter(|b| bits & 1 << b != 0).map(|b| (b, vector(b))).max_by_key(|&(_, v)| v)
}

/// The guest's virtual interrupt state (see the module header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Virq {
    /// Requested, not yet delivered.
    pending: u8,
    /// Delivered, not yet acknowledged.
    in_service: u8,
    /// The bit the last entry offered (0: none).
    offered: u8,
}

impl Virq {
    /// Interrupts the host took for the guest (bits as [`DOORBELL`] and the devices').
    pub fn request(&mut self, bits: u8) {
        self.pending |= bits;
    }

    /// The vector the next entry offers (V_IRQ): the highest requested one whose priority
    /// class is above that of the highest in service; `None` if none may be delivered.
    pub fn offer(&mut self) -> Option<u8> {
        let floor = highest(self.in_service).map_or(0, |(_, v)| v >> 4);
        let (b, v) = highest(self.pending).filter(|&(_, v)| v >> 4 > floor)?;
        self.offered = 1 << b;
        Some(v)
    }

    /// After an entry: `taken` if the guest took the offered interrupt (the processor
    /// cleared V_IRQ), which is then in service until its EOI.
    pub fn entered(&mut self, taken: bool) {
        if taken {
            self.pending &= !self.offered;
            self.in_service |= self.offered;
        }
        self.offered = 0;
    }

    /// A doorbell the hypervisor injected itself (EVENTINJ: a wake-up), in service until
    /// its EOI as one delivered from [`Virq::offer`].
    pub fn injected_doorbell(&mut self) {
        self.in_service |= DOORBELL;
    }

    /// The guest's EOI: retires the highest interrupt in service and returns the device
    /// index if it was a device's (`None` for a doorbell, or nothing in service: an EOI
    /// with nothing in service does nothing, as at a real APIC).
    pub fn eoi(&mut self) -> Option<usize> {
        let (b, _) = highest(self.in_service)?;
        self.in_service &= !(1 << b);
        (1 << b != DOORBELL).then_some(b as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_interrupt_is_offered_taken_and_retired_by_the_guests_eoi() {
        let mut q = Virq::default();
        assert_eq!(q.offer(), None);
        q.request(1);
        assert_eq!(q.offer(), Some(0x50));
        // Not taken (the guest had interrupts off): offered again.
        q.entered(false);
        assert_eq!(q.offer(), Some(0x50));
        q.entered(true);
        assert!(q.in_service & !DOORBELL != 0);
        assert_eq!(q.offer(), None);
        assert_eq!(q.eoi(), Some(0));
        assert_eq!(q.eoi(), None, "an EOI with nothing in service retires nothing");
        assert_eq!(q.offer(), None);
    }

    #[test]
    fn a_device_in_service_holds_back_its_class_but_not_the_doorbell() {
        let mut q = Virq::default();
        q.request(0b11);
        assert_eq!(q.offer(), Some(0x51), "the highest vector first");
        q.entered(true);
        // 0x50 shares class 5 with 0x51, in service: held.
        assert_eq!(q.offer(), None);
        q.request(DOORBELL);
        assert_eq!(q.offer(), Some(DOORBELL_VECTOR));
        q.entered(true);
        // The doorbell's EOI comes first (highest in service), then the device's.
        assert_eq!(q.eoi(), None);
        assert!(q.in_service & !DOORBELL != 0);
        assert_eq!(q.offer(), None);
        assert_eq!(q.eoi(), Some(1));
        assert_eq!(q.offer(), Some(0x50));
    }

    #[test]
    fn a_doorbell_in_service_holds_back_everything_and_an_injected_one_counts() {
        let mut q = Virq::default();
        q.injected_doorbell();
        q.request(1 | DOORBELL);
        assert_eq!(q.offer(), None);
        assert_eq!(q.eoi(), None);
        assert_eq!(q.offer(), Some(DOORBELL_VECTOR));
        q.entered(true);
        assert_eq!(q.eoi(), None);
        assert_eq!(q.offer(), Some(0x50));
        q.entered(true);
        assert_eq!(q.eoi(), Some(0));
    }
}
