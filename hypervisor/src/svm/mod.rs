// SPDX-License-Identifier: MIT OR Apache-2.0
//! AMD SVM, the second CPU backend (issue 24, docs/svm.md): the feature probe, the VMCB,
//! the permission maps, nested page tables, exit decoding, SVM on each core (EFER.SVME,
//! VM_HSAVE_PA) and the world switch (`arch::svm::run`), checked on every core at bring-up
//! by running a tiny guest through its intercepts ([`check`]). Guests proper still run on
//! VT-x only: the vCPU interface they would go through comes next. May call `arch` (CPUID,
//! MSRs, the world switch), `ept` (the frame source and the permission type the partition
//! description uses) and `exits` (the MSR policy lists), nothing above them.

pub mod decode;
pub mod exit;
pub mod features;
pub mod maps;
pub mod vcpu;
pub mod virq;
pub mod vmcb;

pub use features::Features;

use core::fmt;

/// Why SVM could not be used on a core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmError {
    /// VMRUN refused the check guest's VMCB (exit code -1: a consistency check failed).
    VmrunInvalid,
    /// The check guest left by another exit than the one expected, or with wrong registers.
    CheckFailed,
}

impl SvmError {
    pub fn as_str(self) -> &'static str {
        match self {
            SvmError::VmrunInvalid => "VMRUN refused the VMCB",
            SvmError::CheckFailed => "the world-switch check failed",
        }
    }
}

impl fmt::Display for SvmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the world-switch check saw, in exit order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// #VMEXITs taken (each one VMRUN round trip).
    pub exits: u32,
    /// The guest's RCX at its VMMCALL: its RBX (set by the host) plus one.
    pub rcx_at_vmmcall: u64,
    /// The guest-physical address and error code of its write outside its memory.
    pub npf_gpa: u64,
    pub npf_error: u64,
    /// TSC ticks from the first VMRUN to the last #VMEXIT (emulated instructions in Bochs).
    pub ticks: u64,
}

/// The check guest: 16-bit real mode at guest-physical 0x1000, run under nested paging
/// with only that page mapped. Each step ends in an intercept the host checks:
/// 1. `mov ecx, ebx; inc ecx; vmmcall`: GPRs reach the guest and come back (RBX in, RCX out);
/// 2. `mov edx, eax; mov eax, 0; cpuid`: the host's answer in RAX (a VMCB field) reached it;
/// 3. `mov byte [0x3000], 0x5a`: a write outside its memory, a nested page fault;
/// 4. `hlt`.
pub const CHECK_GUEST: [u8; 29] = [
    0x66, 0x89, 0xd9, // mov ecx, ebx
    0x66, 0x41, // inc ecx
    0x0f, 0x01, 0xd9, // vmmcall
    0x66, 0x89, 0xc2, // mov edx, eax
    0x66, 0xb8, 0, 0, 0, 0, // mov eax, 0
    0x0f, 0xa2, // cpuid
    0xc6, 0x06, 0x00, 0x30, 0x5a, // mov byte [0x3000], 0x5a
    0xf4, // hlt
    0xf4, 0xf4, 0xf4, 0xf4, // (not reached)
];
/// Offsets of the instructions that exit, and the faulting store's length.
const CHECK_STORE_AT: u64 = 19;
const CHECK_STORE_LEN: u64 = 5;
/// Guest-physical address of the check guest's code.
pub const CHECK_GPA: u64 = 0x1000;
/// What the host puts in RBX, and answers in RAX at the VMMCALL.
const CHECK_RBX: u64 = 0x5356_4d21;
const CHECK_ANSWER: u64 = 0x6d6b_7673;

/// Real-mode guest state for the check guest (APM 15.5.1: EFER.SVME set, CR0.PE clear,
/// segments with their real-mode hidden parts, CPL 0).
pub fn set_real_mode_state(v: &mut vmcb::Vmcb, rip: u64) {
    let seg = |attrib| vmcb::Segment { selector: 0, attrib, limit: 0xffff, base: 0 };
    let s = &mut v.save;
    s.cs = seg(0x9b);
    for d in [&mut s.ds, &mut s.es, &mut s.ss, &mut s.fs, &mut s.gs] {
        *d = seg(0x93);
    }
    s.gdtr = seg(0);
    s.idtr = seg(0);
    s.ldtr = seg(0x82);
    s.tr = seg(0x8b);
    s.cpl = 0;
    s.efer = vmcb::EFER_SVME;
    s.cr0 = 0x10; // ET
    s.cr3 = 0;
    s.cr4 = 0;
    s.rflags = 2;
    s.rip = rip;
    s.rsp = 0;
    s.dr6 = 0xffff_0ff0;
    s.dr7 = 0x400;
    s.g_pat = 0x0007_0406_0007_0406;
}

/// One step of the check: what the host expects at the `n`-th exit, and how it resumes.
/// Pure, so that the expectations are tested on the host too.
pub fn check_step(
    n: u32,
    e: exit::SvmExit,
    regs: &crate::arch::svm::GuestRegs,
    rax: u64,
) -> Result<Option<u64>, SvmError> {
    use exit::SvmExit as X;
    let ok = match (n, e) {
        (0, X::Vmmcall) => regs.rcx == CHECK_RBX + 1,
        (1, X::Cpuid) => rax == 0 && regs.rdx == CHECK_ANSWER,
        (2, X::NestedPageFault { gpa, error }) => gpa == 0x3000 && error & 2 != 0,
        (3, X::Hlt) => true,
        _ => false,
    };
    if !ok {
        return Err(SvmError::CheckFailed);
    }
    // The answer to put in RAX, if any.
    Ok(match n {
        0 => Some(CHECK_ANSWER),
        1 => Some(0),
        _ => None,
    })
}

#[cfg(target_os = "none")]
mod core_state {
    //! Each core's SVM pages, in static storage owned by that core.
    use super::maps::{Iopm, Msrpm};
    use super::vmcb::Vmcb;
    use core::cell::UnsafeCell;

    #[repr(C, align(4096))]
    pub struct Page(pub [u64; 512]);

    /// One core's pages: the host save area the processor uses (VM_HSAVE_PA), the host's
    /// VMSAVE page, the VMCB (the check guest's at bring-up, then the guests'), the check
    /// guest's code page and nested tables, the guests' permission maps.
    #[repr(C, align(4096))]
    pub struct CorePages {
        pub hsave: Page,
        pub host_vmsave: Page,
        pub vmcb: Vmcb,
        pub guest_code: Page,
        pub npt: [Page; 4],
        pub msrpm: Msrpm,
        pub iopm: Iopm,
    }

    /// Each core's run timer (`arch::apic::timer_init_this_core`), set when SVM goes on.
    pub static TIMER: [spin::Once<crate::arch::apic::TimerMode>; crate::percpu::MAX_CORES] =
        [const { spin::Once::new() }; crate::percpu::MAX_CORES];

    pub struct Slot(pub UnsafeCell<CorePages>);
    // SAFETY: each slot is used only by the core whose index it has.
    unsafe impl Sync for Slot {}

    pub static PAGES: [Slot; crate::percpu::MAX_CORES] = [const {
        // SAFETY: pages of integers; all-zero is valid.
        Slot(UnsafeCell::new(unsafe { core::mem::zeroed() }))
    }; crate::percpu::MAX_CORES];

    pub struct Maps(pub UnsafeCell<(Msrpm, Iopm)>);
    // SAFETY: written once by the BSP before any AP starts, read-only after.
    unsafe impl Sync for Maps {}
    pub static MAPS: Maps = Maps(UnsafeCell::new((Msrpm::intercept_all(), Iopm::intercept_all())));
}

/// Builds the MSR permission map shared by every core's check guest (read-only once APs
/// start): every MSR intercepted but those the guest policy passes through
/// (`Msrpm::allow_policy`). The I/O map intercepts every port.
///
/// # Safety
/// Once, on the BSP, before any AP starts.
#[cfg(target_os = "none")]
pub unsafe fn build_maps() {
    // SAFETY: no other core runs yet (the caller's promise).
    let (msrpm, _) = unsafe { &mut *core_state::MAPS.0.get() };
    msrpm.allow_policy();
}

/// Turns SVM on for the calling core: EFER.SVME (and EFER.NXE, so that nested page tables
/// can forbid execution), and the host save area's address in VM_HSAVE_PA (APM 15.4, 15.30.4).
///
/// # Safety
/// Once per core, after `percpu::init_this_core`, with SVM usable (the BSP's probe).
#[cfg(target_os = "none")]
pub unsafe fn enable_on_this_core(index: usize) {
    use crate::arch::{rdmsr, wrmsr};
    const EFER_NXE: u64 = 1 << 11;
    let pages = core_state::PAGES[index].0.get();
    // EFER exists in long mode; SVME is allowed (VM_CR.SVMDIS clear, probed) and NXE only
    // adds the NX bit to page-table formats our own tables do not use.
    // SAFETY: as said above, setting SVME and NXE changes no running translation.
    unsafe { wrmsr(x86::msr::IA32_EFER, rdmsr(x86::msr::IA32_EFER) | vmcb::EFER_SVME | EFER_NXE) };
    // SAFETY: this core's own page, 4-KiB aligned, identity-mapped, used by nothing else.
    unsafe { wrmsr(crate::arch::svm::MSR_VM_HSAVE_PA, core::ptr::addr_of!((*pages).hsave) as u64) };
    // The guests' run timer (no preemption timer on SVM): the local-APIC timer, its
    // interrupt acknowledged by the host's handler (`arch::idt`); a one-shot timer's rate
    // measured over half a millisecond.
    let calibrate = crate::arch::tsc::ticks_per_ms() / 2;
    // SAFETY: once per core, at bring-up; the IDT has the handler for the vector.
    let mode = unsafe {
        crate::arch::apic::timer_init_this_core(crate::arch::idt::HOST_TIMER_VECTOR, calibrate)
    };
    log::info!("SVM run timer: local APIC {mode:?}");
    core_state::TIMER[index].call_once(|| mode);
}

/// The world-switch check on the calling core: builds the check guest (its own ASID, nested
/// tables mapping one page, the policy intercepts) and runs it to its HLT, checking every
/// exit ([`check_step`]).
///
/// # Safety
/// After [`enable_on_this_core`] on this core and [`build_maps`] on the BSP; once per core.
#[cfg(target_os = "none")]
pub unsafe fn check(index: usize, f: &Features) -> Result<CheckReport, SvmError> {
    use crate::arch::svm::{run, GuestRegs};
    // SAFETY: this core's slot, used by this core alone.
    let p = unsafe { &mut *core_state::PAGES[index].0.get() };
    // SAFETY: read-only since the BSP built them.
    let (msrpm, iopm) = unsafe { &*core_state::MAPS.0.get() };
    let pa = |r: *const u8| r as u64;

    // The guest's code page, and nested tables mapping it alone.
    let code = p.guest_code.0.as_mut_ptr() as *mut u8;
    // SAFETY: this core's own page; CHECK_GUEST fits in it.
    unsafe { code.copy_from_nonoverlapping(CHECK_GUEST.as_ptr(), CHECK_GUEST.len()) };
    let mut frames = StaticFrames { pages: &mut p.npt, used: 0 };
    // `ept` writes AMD's format on this machine (`ept::set_format`, on the BSP before any
    // core got here).
    let root = crate::ept::new_root(&mut frames).map_err(|_| SvmError::CheckFailed)?;
    crate::ept::map_with(
        &mut frames,
        root,
        CHECK_GPA,
        code as u64,
        4096,
        crate::ept::Perm::ReadWriteExecute,
    )
    .map_err(|_| SvmError::CheckFailed)?;

    let v = &mut p.vmcb;
    *v = vmcb::Vmcb::zeroed();
    v.set_policy_intercepts(pa(iopm.0.as_ptr()), pa(msrpm.0.as_ptr()));
    // ASID 0 is the host's; each core's check guest has its own (guests would take theirs
    // from their id, as VPIDs are on VT-x).
    v.control.guest_asid = 1 + (index as u32 % (f.asids - 1));
    v.control.tlb_control = vmcb::tlb_control::FLUSH_ALL;
    v.control.np_enable = 1;
    v.control.n_cr3 = root;
    set_real_mode_state(v, CHECK_GPA);

    let vmcb_pa = v as *mut vmcb::Vmcb as u64;
    // SAFETY: this core's code page, 4 KiB, only read from here on.
    let code_bytes = unsafe { core::slice::from_raw_parts(code as *const u8, 4096) };
    let host_save = pa(p.host_vmsave.0.as_ptr() as *const u8);
    let mut regs = GuestRegs { rbx: CHECK_RBX, ..GuestRegs::default() };
    let mut report = CheckReport::default();
    let start = crate::arch::rdtsc();
    let mut n = 0;
    // Four steps; a physical interrupt or NMI (intercepted, left pending for the host) may
    // add exits between them, a bounded number.
    while n < 4 {
        if report.exits >= 16 {
            return Err(SvmError::CheckFailed);
        }
        // SVM is on for this core; the VMCB is this core's, its intercepts include VMRUN,
        // its ASID is not 0 and nested paging maps one page of this core's.
        // No fast path: the check looks at every exit.
        // SAFETY: a valid VMCB for VMRUN (APM 15.5.1), as said above.
        unsafe { run(&mut regs, vmcb_pa, host_save, 0, core::ptr::null_mut()) };
        let v = &mut p.vmcb;
        report.exits += 1;
        v.control.tlb_control = vmcb::tlb_control::NOTHING;
        let c = &v.control;
        let e = exit::decode(exit::normalize(c.exit_code), c.exit_info1, c.exit_info2);
        match e {
            exit::SvmExit::Invalid => return Err(SvmError::VmrunInvalid),
            exit::SvmExit::Intr | exit::SvmExit::Nmi => continue,
            exit::SvmExit::NestedPageFault { gpa, error } => {
                (report.npf_gpa, report.npf_error) = (gpa, error)
            }
            exit::SvmExit::Vmmcall => report.rcx_at_vmmcall = regs.rcx,
            _ => {}
        }
        let answer = check_step(n, e, &regs, v.save.rax).inspect_err(|_| {
            log::error!(
                "SVM check: step {n} exit {e:?} (rip {:#x}, rax {:#x}, {regs:x?})",
                v.save.rip,
                v.save.rax
            )
        })?;
        if let Some(rax) = answer {
            v.save.rax = rax;
        }
        // Without nRIP save the instruction at RIP is decoded (the check guest's page).
        let nrip = if f.nrip_save {
            Some(v.control.next_rip)
        } else {
            let at = (v.save.rip - CHECK_GPA) as usize;
            decode::insn_len(code_bytes.get(at..).unwrap_or(&[])).map(|l| v.save.rip + l)
        };
        v.save.rip = exit::next_rip(e, v.save.rip, nrip, v.control.exit_info2)
            .unwrap_or(v.save.rip + if n == 2 { CHECK_STORE_LEN } else { 0 });
        debug_assert!(n != 2 || v.save.rip == CHECK_GPA + CHECK_STORE_AT + CHECK_STORE_LEN);
        n += 1;
    }
    report.ticks = crate::arch::rdtsc() - start;
    Ok(report)
}

/// Nested-table frames from a core's static pages (the check guest needs four at most).
#[cfg(target_os = "none")]
struct StaticFrames<'a> {
    pages: &'a mut [core_state::Page; 4],
    used: usize,
}

#[cfg(target_os = "none")]
impl crate::ept::Frames for StaticFrames<'_> {
    fn alloc(&mut self) -> Option<u64> {
        let page = self.pages.get_mut(self.used)?;
        page.0 = [0; 512];
        self.used += 1;
        Some(page.0.as_ptr() as u64)
    }
    fn free(&mut self, _pa: u64) {}
    fn available(&self) -> u64 {
        (self.pages.len() - self.used) as u64
    }
    fn table(&mut self, pa: u64) -> &mut [u64; 512] {
        let page = self.pages.iter_mut().find(|p| p.0.as_ptr() as u64 == pa);
        &mut page.expect("a frame this source handed out").0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::svm::GuestRegs;
    use exit::SvmExit as X;

    #[test]
    fn the_check_expects_each_exit_in_turn() {
        let regs = GuestRegs { rbx: CHECK_RBX, rcx: CHECK_RBX + 1, ..GuestRegs::default() };
        assert_eq!(check_step(0, X::Vmmcall, &regs, 0), Ok(Some(CHECK_ANSWER)));
        let regs = GuestRegs { rdx: CHECK_ANSWER, ..regs };
        assert_eq!(check_step(1, X::Cpuid, &regs, 0), Ok(Some(0)));
        let npf = X::NestedPageFault { gpa: 0x3000, error: 0x6 };
        assert_eq!(check_step(2, npf, &regs, 0), Ok(None));
        assert_eq!(check_step(3, X::Hlt, &regs, 0), Ok(None));
        // Wrong exits, or registers that did not make the round trip, fail it.
        assert_eq!(check_step(0, X::Hlt, &regs, 0), Err(SvmError::CheckFailed));
        let lost = GuestRegs { rcx: 0, ..regs };
        assert_eq!(check_step(0, X::Vmmcall, &lost, 0), Err(SvmError::CheckFailed));
        let read = X::NestedPageFault { gpa: 0x3000, error: 0x4 };
        assert_eq!(check_step(2, read, &regs, 0), Err(SvmError::CheckFailed));
    }

    #[test]
    fn the_check_guest_exits_where_the_host_expects() {
        assert_eq!(&CHECK_GUEST[5..8], &[0x0f, 0x01, 0xd9]); // VMMCALL
        assert_eq!(&CHECK_GUEST[17..19], &[0x0f, 0xa2]); // CPUID
        let s = CHECK_STORE_AT as usize;
        assert_eq!(CHECK_GUEST[s], 0xc6);
        assert_eq!(CHECK_GUEST[s + CHECK_STORE_LEN as usize], 0xf4); // HLT
    }
}
