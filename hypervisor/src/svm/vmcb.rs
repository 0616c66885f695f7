// SPDX-License-Identifier: MIT OR Apache-2.0
//! The virtual machine control block (AMD APM Vol. 2, Appendix B "Layout of VMCB"): one
//! 4-KiB page, the control area at offset 0 (Table B-1) and the state-save area at 0x400
//! (Table B-2). Unlike a VMCS it is ordinary memory: the fields are plain `#[repr(C)]`
//! struct members, every offset checked at compile time against the APM's tables below.
//!
//! Only the fields this backend uses are named; the rest is reserved padding, which must
//! stay zero (APM 15.5.1: reserved VMCB fields are "should be zero").

use core::mem::{offset_of, size_of};

/// A segment register in the state-save area (APM Table B-2; attributes packed as in
/// 15.5.1: type 3:0, S 4, DPL 6:5, P 7, AVL 8, L 9, D/B 10, G 11).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}
const _: () = assert!(size_of::<Segment>() == 16);

/// The control area (APM Table B-1), 0x000-0x3ff.
#[repr(C)]
pub struct Control {
    /// 0x000: bits 15:0 intercept CRn reads, 31:16 CRn writes.
    pub intercept_cr: u32,
    /// 0x004: bits 15:0 DRn reads, 31:16 DRn writes.
    pub intercept_dr: u32,
    /// 0x008: one bit per exception vector.
    pub intercept_exceptions: u32,
    /// 0x00c: [`misc1`] bits.
    pub intercept_misc1: u32,
    /// 0x010: [`misc2`] bits.
    pub intercept_misc2: u32,
    /// 0x014: INVLPGB and later instructions; unused.
    pub intercept_misc3: u32,
    _reserved_018: [u8; 0x03c - 0x018],
    /// 0x03c, 0x03e: PAUSE filter threshold and count.
    pub pause_filter_threshold: u16,
    pub pause_filter_count: u16,
    /// 0x040: physical address of the I/O permission map (12 KiB, 4-KiB aligned).
    pub iopm_base_pa: u64,
    /// 0x048: physical address of the MSR permission map (8 KiB, 4-KiB aligned).
    pub msrpm_base_pa: u64,
    /// 0x050
    pub tsc_offset: u64,
    /// 0x058: guest ASID (bits 31:0); 0x05c: TLB_CONTROL (bits 39:32 of the quadword).
    pub guest_asid: u32,
    pub tlb_control: u8,
    _reserved_05d: [u8; 3],
    /// 0x060: V_TPR 7:0, V_IRQ 8, VGIF 9, V_INTR_PRIO 19:16, V_IGN_TPR 20,
    /// V_INTR_MASKING 24, V_INTR_VECTOR 39:32.
    pub v_intr: u64,
    /// 0x068: bit 0 interrupt shadow, bit 1 guest interrupt mask.
    pub interrupt_shadow: u64,
    /// 0x070: the exit code ([`super::exit::code`]).
    pub exit_code: u64,
    /// 0x078, 0x080
    pub exit_info1: u64,
    pub exit_info2: u64,
    /// 0x088: an event that was being delivered when the exit happened.
    pub exit_int_info: u64,
    /// 0x090: bit 0 NP_ENABLE (SEV bits above stay 0).
    pub np_enable: u64,
    /// 0x098: AVIC APIC_BAR; 0x0a0: GHCB address. Unused.
    _reserved_098: [u8; 0x0a8 - 0x098],
    /// 0x0a8: an event to inject at the next VMRUN (APM 15.20).
    pub event_inj: u64,
    /// 0x0b0: the nested page table root (nCR3).
    pub n_cr3: u64,
    /// 0x0b8: bit 0 LBR virtualization, bit 1 virtualized VMSAVE/VMLOAD.
    pub virt_ext: u64,
    /// 0x0c0: VMCB clean bits (0: the processor reloads everything).
    pub clean_bits: u32,
    _reserved_0c4: u32,
    /// 0x0c8: the next sequential instruction pointer (with nRIP save only).
    pub next_rip: u64,
    /// 0x0d0: bytes fetched and the bytes themselves (with decode assists only).
    pub insn_len: u8,
    pub insn_bytes: [u8; 15],
    _reserved_0e0: [u8; 0x400 - 0x0e0],
}
const _: () = assert!(size_of::<Control>() == 0x400);
const _: () = assert!(offset_of!(Control, intercept_misc1) == 0x00c);
const _: () = assert!(offset_of!(Control, intercept_misc2) == 0x010);
const _: () = assert!(offset_of!(Control, pause_filter_threshold) == 0x03c);
const _: () = assert!(offset_of!(Control, iopm_base_pa) == 0x040);
const _: () = assert!(offset_of!(Control, msrpm_base_pa) == 0x048);
const _: () = assert!(offset_of!(Control, tsc_offset) == 0x050);
const _: () = assert!(offset_of!(Control, guest_asid) == 0x058);
const _: () = assert!(offset_of!(Control, tlb_control) == 0x05c);
const _: () = assert!(offset_of!(Control, v_intr) == 0x060);
const _: () = assert!(offset_of!(Control, interrupt_shadow) == 0x068);
const _: () = assert!(offset_of!(Control, exit_code) == 0x070);
const _: () = assert!(offset_of!(Control, exit_info1) == 0x078);
const _: () = assert!(offset_of!(Control, exit_info2) == 0x080);
const _: () = assert!(offset_of!(Control, exit_int_info) == 0x088);
const _: () = assert!(offset_of!(Control, np_enable) == 0x090);
const _: () = assert!(offset_of!(Control, event_inj) == 0x0a8);
const _: () = assert!(offset_of!(Control, n_cr3) == 0x0b0);
const _: () = assert!(offset_of!(Control, virt_ext) == 0x0b8);
const _: () = assert!(offset_of!(Control, clean_bits) == 0x0c0);
const _: () = assert!(offset_of!(Control, next_rip) == 0x0c8);
const _: () = assert!(offset_of!(Control, insn_len) == 0x0d0);

/// The state-save area (APM Table B-2), at VMCB offset 0x400; offsets below are relative to
/// its start, as in the table.
#[repr(C)]
pub struct StateSave {
    pub es: Segment,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub gdtr: Segment,
    pub ldtr: Segment,
    pub idtr: Segment,
    pub tr: Segment,
    _reserved_0a0: [u8; 0x0cb - 0x0a0],
    /// 0x0cb: the current privilege level (must equal SS.DPL in protected mode).
    pub cpl: u8,
    _reserved_0cc: u32,
    /// 0x0d0
    pub efer: u64,
    _reserved_0d8: [u8; 0x148 - 0x0d8],
    /// 0x148-0x178
    pub cr4: u64,
    pub cr3: u64,
    pub cr0: u64,
    pub dr7: u64,
    pub dr6: u64,
    pub rflags: u64,
    pub rip: u64,
    _reserved_180: [u8; 0x1d8 - 0x180],
    /// 0x1d8
    pub rsp: u64,
    /// 0x1e0: S_CET, SSP, ISST_ADDR (shadow stacks); unused.
    _reserved_1e0: [u8; 0x1f8 - 0x1e0],
    /// 0x1f8: RAX lives here, not in the software-saved registers.
    pub rax: u64,
    /// 0x200-0x240: loaded and saved by VMLOAD/VMSAVE (STAR..SYSENTER) and by VMRUN (CR2).
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub cr2: u64,
    _reserved_248: [u8; 0x268 - 0x248],
    /// 0x268: the guest's PAT (used with nested paging).
    pub g_pat: u64,
    /// 0x270: DBGCTL and the LBR registers (with LBR virtualization only).
    pub dbgctl: u64,
    _rest: [u8; 0xc00 - 0x278],
}
const _: () = assert!(size_of::<StateSave>() == 0xc00);
const _: () = assert!(offset_of!(StateSave, cs) == 0x010);
const _: () = assert!(offset_of!(StateSave, ss) == 0x020);
const _: () = assert!(offset_of!(StateSave, ds) == 0x030);
const _: () = assert!(offset_of!(StateSave, fs) == 0x040);
const _: () = assert!(offset_of!(StateSave, gs) == 0x050);
const _: () = assert!(offset_of!(StateSave, gdtr) == 0x060);
const _: () = assert!(offset_of!(StateSave, ldtr) == 0x070);
const _: () = assert!(offset_of!(StateSave, idtr) == 0x080);
const _: () = assert!(offset_of!(StateSave, tr) == 0x090);
const _: () = assert!(offset_of!(StateSave, cpl) == 0x0cb);
const _: () = assert!(offset_of!(StateSave, efer) == 0x0d0);
const _: () = assert!(offset_of!(StateSave, cr4) == 0x148);
const _: () = assert!(offset_of!(StateSave, cr3) == 0x150);
const _: () = assert!(offset_of!(StateSave, cr0) == 0x158);
const _: () = assert!(offset_of!(StateSave, dr7) == 0x160);
const _: () = assert!(offset_of!(StateSave, dr6) == 0x168);
const _: () = assert!(offset_of!(StateSave, rflags) == 0x170);
const _: () = assert!(offset_of!(StateSave, rip) == 0x178);
const _: () = assert!(offset_of!(StateSave, rsp) == 0x1d8);
const _: () = assert!(offset_of!(StateSave, rax) == 0x1f8);
const _: () = assert!(offset_of!(StateSave, star) == 0x200);
const _: () = assert!(offset_of!(StateSave, kernel_gs_base) == 0x220);
const _: () = assert!(offset_of!(StateSave, sysenter_eip) == 0x238);
const _: () = assert!(offset_of!(StateSave, cr2) == 0x240);
const _: () = assert!(offset_of!(StateSave, g_pat) == 0x268);
const _: () = assert!(offset_of!(StateSave, dbgctl) == 0x270);

/// One VMCB: 4 KiB, page-aligned (VMRUN takes its physical address in RAX).
#[repr(C, align(4096))]
pub struct Vmcb {
    pub control: Control,
    pub save: StateSave,
}
const _: () = assert!(size_of::<Vmcb>() == 4096);
const _: () = assert!(offset_of!(Vmcb, save) == 0x400);

/// Bits of the intercept word at 0x00c (APM Table B-1, "Intercept vector 3").
pub mod misc1 {
    pub const INTR: u32 = 1 << 0;
    pub const NMI: u32 = 1 << 1;
    pub const SMI: u32 = 1 << 2;
    pub const INIT: u32 = 1 << 3;
    /// A virtual interrupt (V_IRQ) could be taken: the interrupt window.
    pub const VINTR: u32 = 1 << 4;
    pub const CPUID: u32 = 1 << 18;
    pub const RSM: u32 = 1 << 19;
    pub const INVD: u32 = 1 << 22;
    pub const HLT: u32 = 1 << 24;
    pub const INVLPGA: u32 = 1 << 26;
    pub const IOIO_PROT: u32 = 1 << 27;
    pub const MSR_PROT: u32 = 1 << 28;
    pub const TASK_SWITCH: u32 = 1 << 29;
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Bits of the intercept word at 0x010 (APM Table B-1, "Intercept vector 4").
pub mod misc2 {
    /// Must be set: VMRUN with it clear fails the consistency checks (APM 15.5.1).
    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
    pub const VMLOAD: u32 = 1 << 2;
    pub const VMSAVE: u32 = 1 << 3;
    pub const STGI: u32 = 1 << 4;
    pub const CLGI: u32 = 1 << 5;
    pub const SKINIT: u32 = 1 << 6;
    pub const WBINVD: u32 = 1 << 9;
    pub const MONITOR: u32 = 1 << 10;
    pub const MWAIT: u32 = 1 << 11;
    pub const XSETBV: u32 = 1 << 13;
}

/// Intercept-word bits for writes to CR0 and CR4 (offset 0x000, bits 16 + n).
pub const CR0_WRITE: u32 = 1 << 16;
pub const CR4_WRITE: u32 = 1 << 20;
/// Reads and writes of CR8 (bits 8 and 24).
pub const CR8_READ: u32 = 1 << 8;
pub const CR8_WRITE: u32 = 1 << 24;

/// TLB_CONTROL values (APM Table B-1, offset 0x05c; 15.16.2).
pub mod tlb_control {
    pub const NOTHING: u8 = 0;
    /// Flush the whole TLB (every ASID).
    pub const FLUSH_ALL: u8 = 1;
    /// Flush this guest's ASID only (with CPUID 8000_000A EDX[6], flush by ASID).
    pub const FLUSH_ASID: u8 = 3;
}

/// Bits of V_INTR (offset 0x060, APM Table B-1; 15.21).
pub mod v_intr {
    /// A virtual interrupt is pending (with VINTR intercepted: the interrupt-window exit).
    pub const V_IRQ: u64 = 1 << 8;
    /// The virtual interrupt ignores the virtual TPR.
    pub const V_IGN_TPR: u64 = 1 << 20;
    /// Virtual interrupt masking: the guest's RFLAGS.IF and CR8 act on virtual interrupts
    /// only; physical interrupts are masked by the host's RFLAGS.IF (so they exit whatever
    /// the guest's IF, with the INTR intercept), and guest CR8 writes go to V_TPR.
    pub const V_INTR_MASKING: u64 = 1 << 24;
}

/// EVENTINJ and EXITINTINFO (offsets 0x0a8, 0x088; APM 15.20): vector 7:0, type 10:8, EV
/// (an error code in 63:32) bit 11, V (valid) bit 31.
pub mod event {
    pub const VALID: u64 = 1 << 31;
    pub const ERROR_CODE_VALID: u64 = 1 << 11;
    pub const TYPE_INTR: u64 = 0 << 8;
    pub const TYPE_EXCEPTION: u64 = 3 << 8;
}

/// EFER.SVME (APM 15.4): must be set in the host to execute SVM instructions, and in a
/// guest's saved EFER for VMRUN to accept it (15.5.1).
pub const EFER_SVME: u64 = 1 << 12;

impl Vmcb {
    /// An all-zero VMCB (every intercept off, every reserved field zero).
    pub const fn zeroed() -> Self {
        // SAFETY: every field is an integer or an array of them; all-zero is valid.
        unsafe { core::mem::zeroed() }
    }

    /// The intercepts every mkvisor guest runs with, whatever its mode: the instructions
    /// the guest policy answers (CPUID, HLT, VMMCALL, I/O and MSRs through their maps),
    /// what would let a guest reach the machine or the other guests (INIT, SHUTDOWN, the
    /// SVM instructions, INVD, task switches; CR3 is left to nested paging), the control
    /// registers the policy owns or emulates (below), and VMRUN, which the architecture
    /// requires. Not ICEBP (INT1): it raises
    /// #DB in the guest, as on VT-x, where it never exits.
    pub fn set_policy_intercepts(&mut self, iopm_pa: u64, msrpm_pa: u64) {
        use misc1 as m1;
        use misc2 as m2;
        let c = &mut self.control;
        c.intercept_misc1 = m1::INTR
            | m1::NMI
            | m1::SMI
            | m1::INIT
            | m1::CPUID
            | m1::RSM
            | m1::INVD
            | m1::HLT
            | m1::INVLPGA
            | m1::IOIO_PROT
            | m1::MSR_PROT
            | m1::TASK_SWITCH
            | m1::SHUTDOWN;
        c.intercept_misc2 = m2::VMRUN
            | m2::VMMCALL
            | m2::VMLOAD
            | m2::VMSAVE
            | m2::STGI
            | m2::CLGI
            | m2::SKINIT
            | m2::WBINVD
            | m2::MONITOR
            | m2::MWAIT
            | m2::XSETBV;
        // Writes to CR0 and CR4 (bits 16 + n): the guest's own paging stays its own
        // (nested paging isolates it), but the cache and feature bits are policy. CR8 both
        // ways: the policy emulates it (a stored value, #GP above 15), as VT-x's CR8-load
        // and CR8-store exiting do; not every SVM implementation checks the reserved bits
        // of its V_TPR write (QEMU 7.2's TCG stores them).
        c.intercept_cr = CR0_WRITE | CR4_WRITE | CR8_READ | CR8_WRITE;
        // #MC would otherwise reach the guest; it is the machine's, not the guest's.
        c.intercept_exceptions = 1 << 18;
        c.iopm_base_pa = iopm_pa;
        c.msrpm_base_pa = msrpm_pa;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_intercepts_include_what_vmrun_requires_and_what_guests_answer() {
        let mut v = Box::new(Vmcb::zeroed());
        v.set_policy_intercepts(0x1000, 0x4000);
        assert_ne!(v.control.intercept_misc2 & misc2::VMRUN, 0);
        for bit in [misc1::CPUID, misc1::HLT, misc1::INIT, misc1::SHUTDOWN, misc1::MSR_PROT] {
            assert_ne!(v.control.intercept_misc1 & bit, 0);
        }
        assert_ne!(v.control.intercept_misc2 & misc2::VMMCALL, 0);
        assert_eq!((v.control.iopm_base_pa, v.control.msrpm_base_pa), (0x1000, 0x4000));
        // APM Table B-1: intercept vector 3 bit 18 is CPUID, 24 HLT, 31 SHUTDOWN.
        assert_eq!((misc1::CPUID, misc1::HLT, misc1::SHUTDOWN), (0x4_0000, 0x100_0000, 1 << 31));
    }

    #[test]
    fn a_vmcb_is_one_aligned_page() {
        assert_eq!(core::mem::align_of::<Vmcb>(), 4096);
        let v = Box::new(Vmcb::zeroed());
        assert_eq!(&v.save as *const _ as usize - &*v as *const _ as usize, 0x400);
    }
}
