// SPDX-License-Identifier: MIT OR Apache-2.0
//! Per-core GDT and TSS. VM entry needs a real TR on the host side (SDM Vol. 3C 26.2.3:
//! host TR selector non-zero), so every core gets its own TSS, with an IST stack for the
//! faults that must not run on a possibly broken stack (#DF, NMI, #MC).

use core::arch::asm;
use x86::bits64::task::TaskStateSegment;

/// Code segment selector of the hypervisor.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data/stack segment selector of the hypervisor.
pub const DATA_SELECTOR: u16 = 0x10;
/// Task-state segment selector (a 16-byte system descriptor: entries 3 and 4).
pub const TSS_SELECTOR: u16 = 0x18;
/// The IST slot (1-based, as in the IDT gate) used for #DF, NMI and #MC.
pub const IST_CRITICAL: u8 = 1;

const CODE64: u64 = 0x00af_9b00_0000_ffff; // present, DPL 0, code, readable, accessed, L
const DATA: u64 = 0x00cf_9300_0000_ffff; // present, DPL 0, data, writable, accessed, 4 GiB

/// A core's GDT. Its TSS descriptor points at that core's own TSS.
#[repr(C, align(16))]
#[derive(Debug)]
pub struct Gdt([u64; 5]);
const _: () = assert!(core::mem::size_of::<Gdt>() == 48);

/// The two-quadword 64-bit TSS descriptor for a TSS at `base` of `limit + 1` bytes
/// (SDM Vol. 3A 8.2.3, figure 8-4): type 9 (available 64-bit TSS), present, DPL 0.
pub const fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let low = (limit as u64 & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40
        | ((limit as u64 >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}

impl Gdt {
    /// A GDT whose TSS descriptor refers to `tss`.
    pub fn new(tss: &'static TaskStateSegment) -> Self {
        let base = tss as *const TaskStateSegment as u64;
        let limit = core::mem::size_of::<TaskStateSegment>() as u32 - 1;
        let [lo, hi] = tss_descriptor(base, limit);
        Gdt([0, CODE64, DATA, lo, hi])
    }

    /// Loads this GDT, reloads every segment register and loads TR.
    ///
    /// # Safety
    /// `self` lives for the rest of the core's life; its TSS descriptor is not busy (each
    /// GDT is loaded once, on its own core).
    pub unsafe fn load(&'static self) {
        let ptr = x86::dtables::DescriptorTablePointer::new(&self.0);
        // SAFETY: the table is 'static and valid; the selectors used below index it.
        unsafe { x86::dtables::lgdt(&ptr) };
        // The far return reloads CS, then the data segments follow; LTR marks the TSS busy, which
        // the caller guarantees happens once.
        // SAFETY: CODE/DATA selectors are valid 64-bit descriptors of the table just loaded.
        unsafe {
            asm!(
                "push {cs}",
                "lea {tmp}, [rip + 2f]",
                "push {tmp}",
                "retfq",
                "2:",
                "mov ds, {ds:x}",
                "mov es, {ds:x}",
                "mov ss, {ds:x}",
                "ltr {tr:x}",
                cs = const CODE_SELECTOR as u64,
                ds = in(reg) DATA_SELECTOR as u64,
                tr = in(reg) TSS_SELECTOR as u64,
                tmp = out(reg) _,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tss_descriptor_splits_base_and_limit() {
        let [lo, hi] = tss_descriptor(0x1234_5678_9abc_def0, 0x67);
        assert_eq!(lo & 0xffff, 0x67);
        assert_eq!(lo >> 16 & 0xff_ffff, 0xbc_def0);
        assert_eq!(lo >> 40 & 0xff, 0x89);
        assert_eq!(lo >> 56, 0x9a);
        assert_eq!(hi, 0x1234_5678);
    }

    #[test]
    fn gdt_points_at_its_tss() {
        let tss: &'static TaskStateSegment = Box::leak(Box::new(TaskStateSegment::new()));
        let gdt = Gdt::new(tss);
        let base = tss as *const _ as u64;
        assert_eq!(gdt.0[3..5], tss_descriptor(base, 103));
        assert_eq!(gdt.0[1], CODE64);
    }
}
