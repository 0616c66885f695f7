// SPDX-License-Identifier: MIT OR Apache-2.0
//! The SVM implementation of the vCPU interface (`vcpu::Vcpu`): one guest's vCPU over its
//! VMCB on this core ([`SvmVcpu`]) and its exits ([`SvmExitInfo`]), the counterpart of
//! `vmx::vcpu` (AMD APM Vol. 2 chapter 15).
//!
//! How it meets the interface's contract where SVM differs from VT-x:
//! * Guest state: 64-bit mode with paging as `vmx::setup` sets it up, in the state-save
//!   area; RAX lives in the VMCB (copied to and from [`GuestRegs`] around VMRUN); EFER keeps
//!   SVME (the guest never sees it); CR0/CR4 writes are intercepted and the "read shadows"
//!   kept here (reads are not intercepted: the real values equal the shadows, since the
//!   handlers refuse any change of an owned bit).
//! * Run timer: no preemption timer. The local-APIC timer (TSC-deadline mode where the
//!   processor has it, else one-shot at a rate measured at bring-up) is armed for the
//!   ticks asked, the INTR intercept is on with V_INTR_MASKING and host RFLAGS.IF = 1 at
//!   VMRUN, so its interrupt exits whatever the guest does (spins, HLT, IF = 0); the host
//!   takes it at STGI (`arch::idt`'s host timer stub marks this core in `HOST_TIMERS` and
//!   EOIs it). An INTR exit whose interrupt was the timer's, or at or after the deadline,
//!   is reported as [`ExitKind::Timer`] (counted as VMX's `preemption_timer`).
//!   `0` enters nothing: the exit is made up at once (a `Timer` exit without a VMRUN), as
//!   VT-x's zero preemption timer exits before the first instruction.
//! * Kicks: NMIs are intercepted; the NMI stays pending over the exit and the host's
//!   handler takes it at STGI. One taken in the hypervisor after the run loop looked at
//!   its inbox marks `PerCore::kicked`; the world switch looks at it after CLGI and does
//!   not enter (a made-up NMI exit), which closes the window VT-x closes by zeroing the
//!   preemption timer from the NMI handler.
//! * Injection: EVENTINJ; an event cut short by the exit (EXITINTINFO) is put back there.
//!   The interrupt window: V_IRQ with the VINTR intercept.
//! * Nested paging: the instance's tables (`ept` in its NPT format) at nCR3; a flush is a
//!   TLB_CONTROL for the next VMRUN (this ASID where the processor can, else everything).
//! * Instruction length: nRIP where the processor saves it (Bochs), IOIO's EXITINFO2,
//!   else the bytes at RIP decoded (`svm::decode`), fetched through the guest's page
//!   tables and the nested tables (QEMU's TCG). An instruction that cannot be decoded
//!   turns the exit into [`ExitKind::Other`]: the guest is stopped, never advanced by a
//!   guess.
//! * A guest that takes its own interrupts (`Setup::direct_interrupts`: channel doorbells):
//!   VT-x lets them reach the guest's IDT; here every physical interrupt exits (the run
//!   timer needs the INTR intercept), so doorbells are virtualized. The host takes the
//!   doorbell at STGI (`arch::idt`'s doorbell stub marks this core in `HOST_DOORBELLS`
//!   and EOIs it), the vCPU raises it as a virtual interrupt (V_IRQ, the doorbell vector),
//!   which the processor delivers through the guest's IDT once the guest can take it, and
//!   the guest's EOI (a write of 0 to the x2APIC EOI MSR, intercepted) is completed here
//!   ([`ExitKind::Completed`]). HLT does not exit for such a guest, as on VT-x: a
//!   doorbell, the run timer or a kick ends it.
//! * Not yet: guests owning PCI functions (their device lines would need the same
//!   virtualization): their setup is refused, saying so.
//! * The fast path (`fastexit`): the world switch's landing (`arch::svm`) hands a CPUID or
//!   VMMCALL exit to [`mkv_svm_fast_exit`] with the host's state loaded and GIF still
//!   clear; it answers through [`Hw`] (RAX in the VMCB, the other registers as the
//!   landing saved them, the next RIP from nRIP or the decoder, as for the run loop) and
//!   the landing enters the guest again. An event injected at that entry, or an
//!   instruction whose end it cannot find, is left to the run loop.
//!
//! Owns this core's guest VMCB and permission maps (static, `svm::core_state`) while a guest
//! runs. May call: `svm` (its VMCB, maps, decoding), `arch` (the world switch, the APIC
//! timer), `ept` (walking the nested tables), `exits` (the MSR policy lists), `fastexit`
//! (the fast path it calls), `percpu`, `vcpu`.

#[cfg(target_os = "none")]
use super::exit::{self as sx, code};
use super::vmcb::{self, Segment};
#[cfg(target_os = "none")]
use super::vmcb::{event, misc1, misc2, tlb_control, v_intr, Vmcb};
#[cfg(target_os = "none")]
use crate::arch::svm::GuestRegs;
#[cfg(target_os = "none")]
use crate::vcpu::Field;
use crate::vcpu::{CrAccess, ExitKind};

/// The telemetry codes of the exits the vCPU makes up or tells apart, and of those the fast
/// path answers (VMX numbering, see `svm::exit::telemetry_code`).
const TELEMETRY_TIMER: u16 = 52;
const TELEMETRY_HYPERCALL: u16 = 18;
const TELEMETRY_CPUID: u16 = 10;
const TELEMETRY_NMI: u16 = 0;
/// A failed VMRUN (VMEXIT_INVALID) counts as VMX's "invalid guest state" entry failure.
const TELEMETRY_INVALID: u16 = 33;

/// DR6.BS.
const DR6_BS: u64 = 1 << 14;
/// The x2APIC EOI MSR (`exits::MSR_X2APIC_EOI`) and WRMSR's telemetry code.
const MSR_EOI: u32 = crate::exits::MSR_X2APIC_EOI;
const TELEMETRY_WRMSR: u16 = 32;
/// The guest's EFER as VMX starts it (LME, LMA), with SVME, which VMRUN requires.
const GUEST_EFER: u64 = 0x500 | vmcb::EFER_SVME;
/// CR0: PG, WP, NE, ET, MP, PE (as `vmx::setup`); CR4: PAE.
const GUEST_CR0: u64 = 0x8001_0033;
const GUEST_CR4: u64 = 0x20;

/// One exit, read from the VMCB at once (it is ordinary memory): the kind, and for the
/// exits a handler advances past, the instruction's length.
#[derive(Clone, Copy, Debug)]
pub struct SvmExitInfo {
    kind: ExitKind,
    code: u16,
    failed: bool,
    rip: u64,
    len: u64,
    cr: Option<CrAccess>,
    io: Option<crate::vcpu::IoAccess>,
    fault: crate::vcpu::NestedFault,
    /// The exit was made up (no VMRUN happened): nothing to re-deliver.
    synthetic: bool,
    /// A real NMI exit or a made-up one for a kick.
    nmi: bool,
    /// EXITINTINFO.
    int_info: u64,
}

impl crate::vcpu::ExitInfo for SvmExitInfo {
    fn kind(&self) -> ExitKind {
        self.kind
    }
    fn code(&self) -> u16 {
        self.code
    }
    fn entry_failed(&self) -> bool {
        self.failed
    }
    fn instruction_len(&self) -> u64 {
        self.len
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn cr_access(&self) -> CrAccess {
        // Only asked for a `CrAccess` exit, which has it (else the kind is `Other`).
        self.cr.unwrap_or(CrAccess::Clts)
    }
    fn io(&self) -> crate::vcpu::IoAccess {
        self.io.unwrap_or(crate::vcpu::IoAccess { port: 0, size: 1, input: true, string: true })
    }
    fn nested_fault(&self) -> crate::vcpu::NestedFault {
        self.fault
    }
}

/// The nested tables and the guest's memory, read through the identity map: the tables
/// are frames of this core's private region, guest memory is the partition.
struct Identity;

impl crate::ept::Frames for Identity {
    fn alloc(&mut self) -> Option<u64> {
        None
    }
    fn free(&mut self, _: u64) {}
    fn available(&self) -> u64 {
        0
    }
    fn table(&mut self, pa: u64) -> &mut [u64; 512] {
        // Only called with nCR3 and the table addresses in its entries: frames of this
        // core's private region (the `ept` code wrote them), read here while the guest is
        // out.
        // SAFETY: so `pa` is an identity-mapped table frame of this core.
        unsafe { &mut *(pa as *mut [u64; 512]) }
    }
}

/// The host-physical address of guest-physical `gpa` if the nested tables map it
/// executable (the partition only: guest code and the guest's page tables live there), so
/// that nothing here ever reads a device's registers or memory the guest only shares.
fn partition_hpa(ncr3: u64, gpa: u64) -> Option<u64> {
    match crate::ept::translate_perm(&mut Identity, ncr3, gpa) {
        Some((hpa, perm)) if perm & 7 == 7 => Some(hpa),
        _ => None,
    }
}

/// Translates guest-virtual `va` through the guest's 4-level tables at `cr3` (every table
/// in its partition), or returns it as is with paging off.
fn guest_phys(ncr3: u64, cr0: u64, cr3: u64, va: u64) -> Option<u64> {
    const P: u64 = 1;
    const PS: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    if cr0 & (1 << 31) == 0 {
        return Some(va);
    }
    let mut table = cr3 & ADDR;
    for level in (0..4u32).rev() {
        let slot = table + ((va >> (12 + 9 * level)) & 0x1ff) * 8;
        let hpa = partition_hpa(ncr3, slot)?;
        // An aligned u64 of the guest's partition (checked just above), identity-mapped;
        // the guest is out, so it does not change under the read.
        // SAFETY: so the read is of plain memory this core may read.
        let e = unsafe { (hpa as *const u64).read_volatile() };
        if e & P == 0 {
            return None;
        }
        if level == 0 || (level <= 2 && e & PS != 0) {
            let size = 1u64 << (12 + 9 * level);
            return Some((e & ADDR & !(size - 1)) | (va & (size - 1)));
        }
        table = e & ADDR;
    }
    None
}

/// Up to 15 bytes of guest code at `rip` (fewer where a page does not translate).
fn fetch(ncr3: u64, cr0: u64, cr3: u64, rip: u64) -> ([u8; super::decode::MAX_LEN], usize) {
    let mut buf = [0u8; super::decode::MAX_LEN];
    let mut n = 0;
    while n < buf.len() {
        let va = rip.wrapping_add(n as u64);
        let Some(hpa) = guest_phys(ncr3, cr0, cr3, va).and_then(|g| partition_hpa(ncr3, g)) else {
            break;
        };
        let in_page = (4096 - (va & 0xfff)) as usize;
        let take = in_page.min(buf.len() - n);
        // `take` bytes up to the end of one partition page (translated above).
        // SAFETY: identity-mapped partition memory, read while the guest is out.
        unsafe { core::ptr::copy_nonoverlapping(hpa as *const u8, buf[n..].as_mut_ptr(), take) };
        n += take;
    }
    (buf, n)
}

/// Whether an exit of `kind` completes an instruction a handler may advance past.
fn advanced(kind: ExitKind) -> bool {
    matches!(
        kind,
        ExitKind::Cpuid
            | ExitKind::Hlt
            | ExitKind::Invd
            | ExitKind::Wbinvd
            | ExitKind::Hypercall
            | ExitKind::CrAccess
            | ExitKind::Io
            | ExitKind::Rdmsr
            | ExitKind::Wrmsr
            | ExitKind::Xsetbv
    )
}

/// The length of the exiting instruction from nRIP (`next_rip`), if it is one an
/// instruction can have.
fn nrip_len(next_rip: u64, rip: u64) -> Option<u64> {
    next_rip.checked_sub(rip).filter(|l| (1..=15).contains(l))
}

/// VMX's interruptibility encoding of the VMCB's interrupt shadow (bit 0, "blocking by
/// STI", for STI or MOV SS alike), and back: for the run loop's `Field` and the fast path's.
fn shadow_as_blocking(interrupt_shadow: u64) -> u64 {
    interrupt_shadow & 1
}
fn blocking_as_shadow(blocking: u64) -> u64 {
    u64::from(blocking & 3 != 0)
}

/// VMX's SS access rights as far as the handlers read them: the CPL in bits 6:5.
fn cpl_as_ss_access_rights(cpl: u8) -> u64 {
    u64::from(cpl & 3) << 5
}

/// What the landing hands the fast path (`arch::svm::run`'s `fast`), built by
/// [`SvmVcpu`]'s `enter` for one run: the saved registers, this core's guest VMCB, the run
/// loop's `fastexit::FastExit`, and what finding the next RIP needs.
#[cfg(target_os = "none")]
#[repr(C)]
pub struct FastSide {
    regs: *mut GuestRegs,
    vmcb: *mut Vmcb,
    fx: *mut crate::fastexit::FastExit,
    ncr3: u64,
    nrip: bool,
}

/// The fast path's view of the guest (`fastexit::Cpu`): the VMCB (RIP, RFLAGS, CPL, the
/// interrupt shadow, RAX, nRIP) and the registers the landing saved.
#[cfg(target_os = "none")]
struct Hw<'a> {
    regs: &'a mut GuestRegs,
    vmcb: &'a mut Vmcb,
    ncr3: u64,
    nrip: bool,
}

#[cfg(target_os = "none")]
impl crate::fastexit::Cpu for Hw<'_> {
    #[inline(always)]
    fn is_hypercall(&self, code: u64) -> bool {
        code == u64::from(TELEMETRY_HYPERCALL)
    }
    #[inline(always)]
    fn is_cpuid(&self, code: u64) -> bool {
        code == u64::from(TELEMETRY_CPUID)
    }
    #[inline(always)]
    fn read(&mut self, f: crate::fastexit::Field) -> u64 {
        use crate::fastexit::Field as F;
        let v = &*self.vmcb;
        match f {
            F::SsAccessRights => cpl_as_ss_access_rights(v.save.cpl),
            F::Rflags => v.save.rflags,
            F::Rip => v.save.rip,
            F::Interruptibility => shadow_as_blocking(v.control.interrupt_shadow),
            // The APIC timer counts to its deadline by itself.
            F::Timer => 0,
            F::Rax => v.save.rax,
            F::Rbx => self.regs.rbx,
            F::Rcx => self.regs.rcx,
            F::Rdx => self.regs.rdx,
        }
    }
    #[inline(always)]
    fn write(&mut self, f: crate::fastexit::Field, val: u64) {
        use crate::fastexit::Field as F;
        let v = &mut *self.vmcb;
        match f {
            F::Rip => v.save.rip = val,
            F::Interruptibility => v.control.interrupt_shadow = blocking_as_shadow(val),
            // The run timer (the local APIC's, armed by `enter`) keeps its deadline over
            // the fast path's entries: nothing to program again.
            F::Timer => {}
            F::Rax => v.save.rax = val,
            F::Rbx => self.regs.rbx = val,
            F::Rcx => self.regs.rcx = val,
            F::Rdx => self.regs.rdx = val,
            F::SsAccessRights | F::Rflags => {}
        }
    }
    #[inline(always)]
    fn next_rip(&mut self) -> Option<u64> {
        let v = &*self.vmcb;
        let rip = v.save.rip;
        let len = if self.nrip {
            nrip_len(v.control.next_rip, rip)
        } else {
            let (bytes, n) = fetch(self.ncr3, v.save.cr0, v.save.cr3, rip);
            super::decode::insn_len(&bytes[..n])
        };
        len.map(|l| rip.wrapping_add(l))
    }
    #[inline(always)]
    fn rdtsc(&mut self) -> u64 {
        crate::arch::rdtsc()
    }
    #[inline(always)]
    fn cpuid(&mut self, leaf: u32, sub: u32) -> [u32; 4] {
        let r = raw_cpuid::native_cpuid::cpuid_count(leaf, sub);
        [r.eax, r.ebx, r.ecx, r.edx]
    }
}

/// Called by `svm_run_asm` (arch::svm) after a CPUID or VMMCALL #VMEXIT, the guest's
/// registers (but RAX) saved, the host's VMLOAD state back, GIF clear: non-zero =
/// answered, enter the guest again now.
///
/// # Safety
/// Called only by the landing, with the `fast` [`SvmVcpu`]'s `enter` gave `arch::svm::run`
/// (its pointers live and this core's for the whole run).
#[cfg(target_os = "none")]
#[no_mangle]
pub unsafe extern "C" fn mkv_svm_fast_exit(side: *mut FastSide) -> u64 {
    // SAFETY: the caller's guarantee; nothing else touches them while the guest is out.
    let (side, vmcb, regs, fx) =
        unsafe { (&*side, &mut *(*side).vmcb, &mut *(*side).regs, &mut *(*side).fx) };
    let code = match vmcb.control.exit_code {
        code::VMMCALL => TELEMETRY_HYPERCALL,
        code::CPUID => TELEMETRY_CPUID,
        _ => return 0,
    };
    // An event injected at this entry: the run loop clears EVENTINJ (`enter`).
    if vmcb.control.event_inj & event::VALID != 0 {
        return 0;
    }
    let mut hw = Hw { regs, vmcb, ncr3: side.ncr3, nrip: side.nrip };
    if !crate::fastexit::answer(&mut hw, fx, u64::from(code)) {
        return 0;
    }
    // A flush asked for was done by the VMRUN that just ended.
    hw.vmcb.control.tlb_control = tlb_control::NOTHING;
    1
}

/// One guest's vCPU over this core's guest VMCB (`vcpu::Vcpu`).
#[cfg(target_os = "none")]
pub struct SvmVcpu {
    regs: GuestRegs,
    /// This core's pages (static, this core's alone).
    pages: *mut super::core_state::CorePages,
    vmcb_pa: u64,
    host_save_pa: u64,
    /// What `Setup::nested_root` was (the EPTP-style value), and nCR3 from it.
    nested_root: u64,
    ncr3: u64,
    cr0_shadow: u64,
    cr4_shadow: u64,
    /// A handler injected an event since the last exit.
    injected: bool,
    /// TSC ticks the next entry may run.
    timer: u64,
    timer_mode: crate::arch::apic::TimerMode,
    /// TSC at which the last entry's timer was due.
    deadline: u64,
    /// The last entry made up its exit: `Some(true)` a kick, `Some(false)` a zero timer.
    made_up: Option<bool>,
    /// The host took the run timer's interrupt during the last entry.
    timer_fired: bool,
    nrip: bool,
    flush: u8,
    /// The guest takes its own interrupts (doorbells virtualized, see the module header).
    direct: bool,
    /// The interrupt window was asked for (VINTR intercepted, V_IRQ set).
    window: bool,
    /// A doorbell taken by the host and not yet delivered to the guest (V_IRQ set).
    doorbell: bool,
    /// This core's bit in `arch::idt::HOST_DOORBELLS`.
    core_bit: u64,
}

#[cfg(target_os = "none")]
impl SvmVcpu {
    fn vmcb(&mut self) -> &mut Vmcb {
        // SAFETY: this core's pages; the vCPU is used on this core alone, the guest is out.
        unsafe { &mut (*self.pages).vmcb }
    }
}

/// A flat 64-bit segment of the VMX guest state (access rights 0xa09b / 0xc093) in the
/// VMCB's packing (APM 15.5.1: type..P in 7:0, AVL/L/D/G in 11:8).
fn flat(selector: u16, vmx_ar: u16) -> Segment {
    Segment {
        selector,
        attrib: (vmx_ar & 0xff) | (vmx_ar >> 4 & 0xf00),
        limit: 0xffff_ffff,
        base: 0,
    }
}

#[cfg(target_os = "none")]
impl crate::vcpu::Vcpu for SvmVcpu {
    type Features = super::Features;
    type Exit = SvmExitInfo;
    // The telemetry codes the exits count under (`svm::exit::telemetry_code`).
    const HYPERCALL_CODE: u16 = TELEMETRY_HYPERCALL;
    const CPUID_CODE: u16 = TELEMETRY_CPUID;
    const KICK_HOOK: unsafe extern "C" fn() = crate::arch::svm::svm_kick_hook;

    fn setup(
        f: &super::Features,
        s: &crate::vcpu::Setup,
        _frames: &mut impl crate::ept::Frames,
        io_ports: impl Iterator<Item = u16> + Clone,
    ) -> Result<Self, crate::vcpu::SetupError> {
        use crate::vcpu::SetupError;
        if s.devices {
            return Err(SetupError {
                reason: "the SVM backend does not yet virtualize a device's interrupts \
                         (guests owning PCI functions run on VT-x only)",
                detail: None,
            });
        }
        let Some(index) = crate::percpu::current_index() else {
            return Err(SetupError { reason: "no per-core state", detail: None });
        };
        let Some(&timer_mode) = super::core_state::TIMER[index].get() else {
            return Err(SetupError { reason: "SVM is not on for this core", detail: None });
        };
        let pages = super::core_state::PAGES[index].0.get();
        // SAFETY: this core's slot, used by this core alone; its check guest is over.
        let p = unsafe { &mut *pages };
        p.msrpm = super::maps::Msrpm::intercept_all();
        for msr in crate::exits::MSR_PASSTHROUGH.into_iter().chain(crate::exits::MSR_SWITCHED) {
            p.msrpm.allow(msr);
        }
        p.iopm = super::maps::Iopm::intercept_all();
        for port in io_ports {
            p.iopm.allow(port);
        }
        let (msrpm_pa, iopm_pa) = (p.msrpm.0.as_ptr() as u64, p.iopm.0.as_ptr() as u64);
        let v = &mut p.vmcb;
        *v = Vmcb::zeroed();
        v.set_policy_intercepts(iopm_pa, msrpm_pa);
        if s.exitless_mwait {
            v.control.intercept_misc2 &= !(misc2::MONITOR | misc2::MWAIT);
        }
        if s.direct_interrupts {
            // HLT halts for real: a doorbell, the run timer or a kick ends it (all exit).
            v.control.intercept_misc1 &= !misc1::HLT;
        }
        // ASIDs tag this core's TLB only: the guest's tag folded into the range the
        // processor has (one guest per core; every new incarnation flushes below).
        let tag = u32::from(s.tag.max(1));
        v.control.guest_asid = 1 + (tag - 1) % (f.asids - 1);
        v.control.tlb_control = tlb_control::FLUSH_ALL;
        v.control.np_enable = 1;
        v.control.n_cr3 = s.nested_root & !0xfff;
        v.control.v_intr = v_intr::V_INTR_MASKING;
        let st = &mut v.save;
        st.cs = flat(0x08, 0xa09b);
        for seg in [&mut st.ss, &mut st.ds, &mut st.es, &mut st.fs, &mut st.gs] {
            *seg = flat(0x10, 0xc093);
        }
        st.ldtr = Segment::default();
        st.tr = Segment { selector: 0, attrib: 0x8b, limit: 0x67, base: 0 };
        st.gdtr = Segment::default();
        st.idtr = Segment::default();
        st.cpl = 0;
        st.efer = GUEST_EFER;
        st.cr0 = GUEST_CR0;
        st.cr3 = s.cr3;
        st.cr4 = GUEST_CR4;
        st.dr6 = 0xffff_0ff0;
        st.dr7 = 0x400;
        st.rflags = 2;
        st.rip = s.rip;
        st.rsp = s.rsp;
        // SAFETY: PAT exists on every processor with SVM.
        st.g_pat = unsafe { crate::arch::rdmsr(x86::msr::IA32_PAT) };
        Ok(SvmVcpu {
            regs: GuestRegs::default(),
            pages,
            vmcb_pa: core::ptr::addr_of!(p.vmcb) as u64,
            host_save_pa: p.host_vmsave.0.as_ptr() as u64,
            nested_root: s.nested_root,
            ncr3: s.nested_root & !0xfff,
            cr0_shadow: GUEST_CR0,
            cr4_shadow: GUEST_CR4,
            injected: false,
            timer: 0,
            timer_mode,
            deadline: 0,
            made_up: None,
            timer_fired: false,
            nrip: f.nrip_save,
            flush: if f.flush_by_asid { tlb_control::FLUSH_ASID } else { tlb_control::FLUSH_ALL },
            direct: s.direct_interrupts,
            window: false,
            doorbell: false,
            core_bit: 1 << (index % 64),
        })
    }

    #[inline(always)]
    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn read(&mut self, f: Field) -> u64 {
        let (c0, c4) = (self.cr0_shadow, self.cr4_shadow);
        let v = self.vmcb();
        let s = &v.save;
        match f {
            Field::Rip => s.rip,
            Field::Rsp => s.rsp,
            Field::Rflags => s.rflags,
            Field::Cr0 => s.cr0,
            Field::Cr0Shadow => c0,
            Field::Cr4 => s.cr4,
            Field::Cr4Shadow => c4,
            Field::Efer => s.efer & !vmcb::EFER_SVME,
            Field::FsBase => s.fs.base,
            Field::GsBase => s.gs.base,
            Field::Pat => s.g_pat,
            Field::Interruptibility => shadow_as_blocking(v.control.interrupt_shadow),
            Field::SsAccessRights => cpl_as_ss_access_rights(s.cpl),
            Field::PendingDebug => s.dr6 & DR6_BS,
        }
    }

    fn write(&mut self, f: Field, val: u64) {
        match f {
            Field::Cr0Shadow => self.cr0_shadow = val,
            Field::Cr4Shadow => self.cr4_shadow = val,
            Field::PendingDebug => {
                // No pending-debug field: the single-step trap the exit suppressed is
                // delivered as a #DB at the entry (DR6.BS set), unless another event is.
                let injected = self.injected;
                let v = self.vmcb();
                if val & DR6_BS != 0 {
                    v.save.dr6 |= DR6_BS;
                    if !injected {
                        v.control.event_inj = event::VALID | event::TYPE_EXCEPTION | 1;
                    }
                }
            }
            _ => {
                let v = self.vmcb();
                let s = &mut v.save;
                match f {
                    Field::Rip => s.rip = val,
                    Field::Rsp => s.rsp = val,
                    Field::Rflags => s.rflags = val,
                    Field::Cr0 => s.cr0 = val,
                    Field::Cr4 => s.cr4 = val,
                    Field::Efer => s.efer = val | vmcb::EFER_SVME,
                    Field::FsBase => s.fs.base = val,
                    Field::GsBase => s.gs.base = val,
                    Field::Pat => s.g_pat = val,
                    Field::Interruptibility => v.control.interrupt_shadow = blocking_as_shadow(val),
                    // The CPL follows the guest's own segment loads; nothing writes it.
                    Field::SsAccessRights => {}
                    Field::Cr0Shadow | Field::Cr4Shadow | Field::PendingDebug => {}
                }
            }
        }
    }

    fn inject(&mut self, e: crate::vcpu::Event) {
        use crate::vcpu::Event;
        let word = match e {
            Event::Exception { vector, error_code: Some(c) } => {
                event::VALID
                    | event::TYPE_EXCEPTION
                    | event::ERROR_CODE_VALID
                    | u64::from(vector)
                    | u64::from(c) << 32
            }
            Event::Exception { vector, error_code: None } => {
                event::VALID | event::TYPE_EXCEPTION | u64::from(vector)
            }
            Event::Interrupt(vector) => event::VALID | event::TYPE_INTR | u64::from(vector),
        };
        self.vmcb().control.event_inj = word;
        self.injected = true;
    }

    fn set_interrupt_window(&mut self, on: bool) {
        // V_IRQ itself is set at the entry (for the window or a doorbell).
        self.window = on;
        let c = &mut self.vmcb().control;
        if on {
            c.intercept_misc1 |= misc1::VINTR;
        } else {
            c.intercept_misc1 &= !misc1::VINTR;
        }
    }

    #[inline(always)]
    fn set_timer(&mut self, ticks: u64) {
        self.timer = ticks;
    }
    fn timer_shift(&self) -> u32 {
        0
    }

    unsafe fn enter(
        &mut self,
        fast: *mut core::ffi::c_void,
    ) -> Result<(), crate::vcpu::EntryError> {
        use crate::arch::{apic, rdtsc, svm};
        let rax = self.regs.rax;
        let (mode, timer) = (self.timer_mode, self.timer);
        let (vmcb_pa, host_save_pa) = (self.vmcb_pa, self.host_save_pa);
        // A virtual interrupt for the window (exits at VINTR before it is taken) or the
        // doorbell (taken through the guest's IDT when it can be), highest priority.
        let virq = if self.window || self.doorbell {
            v_intr::V_IRQ
                | v_intr::V_IGN_TPR
                | 0xf << 16
                | u64::from(vmcall_proto::guest::DOORBELL_VECTOR) << 32
        } else {
            0
        };
        let v = self.vmcb();
        v.save.rax = rax;
        v.control.v_intr = v_intr::V_INTR_MASKING | virq;
        let event_pending = v.control.event_inj & event::VALID != 0;
        self.made_up = None;
        if timer == 0 && !event_pending {
            // A zero timer exits before the guest's first instruction: no entry at all.
            self.made_up = Some(false);
            self.injected = false;
            return Ok(());
        }
        // With an event to deliver the guest must enter (the event is consumed then, as
        // on VT-x): a zero timer becomes the shortest one, and a kick does not hold the
        // entry back (its mail waits for that timer).
        let flags = svm::RUN_INTERRUPTS | if event_pending { 0 } else { svm::RUN_KICKS };
        self.deadline = rdtsc().saturating_add(timer.max(1));
        // SAFETY: after `timer_init_this_core` on this core (SVM on), with its mode.
        unsafe { apic::timer_arm(mode, timer.max(1)) };
        // The VMCB is this core's, complete (APM 15.5.1 checks), nested paging confining
        // the guest; the timer's vector and the NMI have host handlers.
        let regs = core::ptr::addr_of_mut!(self.regs);
        let mut side = FastSide {
            regs,
            // SAFETY: this core's pages (a place, no reference made).
            vmcb: unsafe { core::ptr::addr_of_mut!((*self.pages).vmcb) },
            fx: fast.cast(),
            ncr3: self.ncr3,
            nrip: self.nrip,
        };
        let side = if fast.is_null() {
            core::ptr::null_mut()
        } else {
            core::ptr::addr_of_mut!(side).cast()
        };
        // `side` lives on this stack until `run` returns, its pointers (this vCPU's
        // registers and VMCB, the caller's `fast`) valid and used by nothing else meanwhile.
        // SAFETY: the caller's guarantee (set up on this core) and the above.
        let ran = unsafe { svm::run(regs, vmcb_pa, host_save_pa, flags, side) };
        // SAFETY: as for the arm.
        unsafe { apic::timer_disarm(mode) };
        self.injected = false;
        if !ran {
            self.made_up = Some(true);
            return Ok(());
        }
        let v = self.vmcb();
        let rax = v.save.rax;
        let virq_left = v.control.v_intr & v_intr::V_IRQ != 0;
        v.control.tlb_control = tlb_control::NOTHING;
        // Delivered, or back in EXITINTINFO (re-delivered by `redeliver`).
        v.control.event_inj = 0;
        self.regs.rax = rax;
        // The doorbell was delivered if the processor took V_IRQ (it clears it then);
        // one the host took during this entry (at STGI) is raised at the next.
        if !virq_left {
            self.doorbell = false;
        }
        let bit = self.core_bit;
        let taken = crate::arch::idt::HOST_DOORBELLS
            .fetch_and(!bit, core::sync::atomic::Ordering::AcqRel)
            & bit;
        self.doorbell |= taken != 0 && self.direct;
        self.timer_fired = crate::arch::idt::HOST_TIMERS
            .fetch_and(!bit, core::sync::atomic::Ordering::AcqRel)
            & bit
            != 0;
        Ok(())
    }

    fn exit(&mut self) -> SvmExitInfo {
        let (ncr3, nrip_save, deadline, made_up, direct) =
            (self.ncr3, self.nrip, self.deadline, self.made_up, self.direct);
        let timer_fired = self.timer_fired;
        let regs = self.regs;
        let v = self.vmcb();
        let rip = v.save.rip;
        let mut e = SvmExitInfo {
            kind: ExitKind::Other,
            code: 35,
            failed: false,
            rip,
            len: 0,
            cr: None,
            io: None,
            fault: crate::vcpu::NestedFault { gpa: 0, access: 0 },
            synthetic: made_up.is_some(),
            nmi: false,
            int_info: 0,
        };
        match made_up {
            Some(true) => {
                (e.kind, e.code, e.nmi) = (ExitKind::Nmi, TELEMETRY_NMI, true);
                return e;
            }
            Some(false) => {
                (e.kind, e.code) = (ExitKind::Timer, TELEMETRY_TIMER);
                return e;
            }
            None => {}
        }
        let c = &v.control;
        let (xc, info1, info2, next_rip) = (c.exit_code, c.exit_info1, c.exit_info2, c.next_rip);
        e.int_info = c.exit_int_info;
        if xc == code::INVALID {
            (e.failed, e.code) = (true, TELEMETRY_INVALID);
            return e;
        }
        e.kind = sx::kind(xc, info1);
        e.code = sx::telemetry_code(xc, info1);
        match e.kind {
            // The run timer's interrupt (its stub ran at STGI), or its deadline passed (a
            // one-shot APIC timer's rate is measured, not exact).
            ExitKind::ExternalInterrupt if timer_fired || crate::arch::rdtsc() >= deadline => {
                (e.kind, e.code) = (ExitKind::Timer, TELEMETRY_TIMER);
            }
            ExitKind::Nmi => e.nmi = true,
            ExitKind::Io => {
                if let sx::SvmExit::Io(io) = sx::decode(xc, info1, info2) {
                    e.io = Some(sx::io_access(io));
                }
            }
            ExitKind::NestedFault | ExitKind::NestedMisconfig => {
                let allowed =
                    crate::ept::translate_perm(&mut Identity, ncr3, info2).map_or(0, |(_, p)| p);
                e.fault = sx::nested_fault(info2, info1, allowed);
            }
            _ => {}
        }
        if !advanced(e.kind) {
            return e;
        }
        let (cr0, cr3) = (v.save.cr0, v.save.cr3);
        let needs_bytes = e.kind == ExitKind::CrAccess || (!nrip_save && e.kind != ExitKind::Io);
        let (bytes, n) = if needs_bytes { fetch(ncr3, cr0, cr3, rip) } else { ([0; 15], 0) };
        let len = if nrip_save {
            nrip_len(next_rip, rip)
        } else if e.kind == ExitKind::Io {
            info2.checked_sub(rip).filter(|l| (1..=15).contains(l))
        } else {
            super::decode::insn_len(&bytes[..n])
        };
        let Some(len) = len else {
            // Not decodable (or a length no instruction has): stop rather than guess.
            e.kind = ExitKind::Other;
            return e;
        };
        e.len = len;
        if direct
            && e.kind == ExitKind::Wrmsr
            && regs.rcx as u32 == MSR_EOI
            && regs.rax as u32 == 0
            && regs.rdx as u32 == 0
        {
            // The guest acknowledges a virtualized doorbell: the host did at the real APIC.
            v.save.rip = rip.wrapping_add(len);
            v.control.interrupt_shadow = 0;
            (e.kind, e.code) = (ExitKind::Completed, TELEMETRY_WRMSR);
            return e;
        }
        if e.kind == ExitKind::CrAccess {
            use super::decode::CrInsn;
            let write = xc & 0x10 != 0;
            let cr_of_exit = (xc & 0xf) as u8;
            e.cr = match super::decode::cr_insn(&bytes[..n]) {
                Some(CrInsn::Mov { to, cr, gpr }) if to == write && cr == cr_of_exit => {
                    Some(if to {
                        CrAccess::MovTo { cr, gpr }
                    } else {
                        CrAccess::MovFrom { cr, gpr }
                    })
                }
                Some(CrInsn::Clts) if write && cr_of_exit == 0 => Some(CrAccess::Clts),
                Some(CrInsn::LmswReg { gpr }) if write && cr_of_exit == 0 => {
                    let r = [
                        regs.rax, regs.rcx, regs.rdx, regs.rbx, v.save.rsp, regs.rbp, regs.rsi,
                        regs.rdi, regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13,
                        regs.r14, regs.r15,
                    ];
                    Some(CrAccess::Lmsw { source: r[gpr as usize & 15] as u16 })
                }
                _ => None,
            };
            if e.cr.is_none() {
                e.kind = ExitKind::Other;
            }
        }
        e
    }

    fn host_nmi(&mut self, e: &SvmExitInfo) -> bool {
        // The NMI stayed pending over the exit and the host's handler took it at STGI (or
        // it was taken before CLGI and the entry did not happen): nothing is blocked.
        e.nmi
    }

    fn redeliver(&mut self, e: &SvmExitInfo) {
        if self.injected || e.synthetic || e.int_info & event::VALID == 0 {
            return;
        }
        // EXITINTINFO has EVENTINJ's format (APM 15.7.2).
        self.vmcb().control.event_inj = e.int_info;
    }

    fn nested_root(&self) -> u64 {
        self.nested_root
    }
    fn flush_nested(&mut self) {
        let flush = self.flush;
        self.vmcb().control.tlb_control = flush;
    }
    fn clear(&mut self) {
        // The VMCB and maps are this core's static pages, not frames of the private
        // region: nothing to hand back. The timer is disarmed after every entry.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_segments_pack_the_vmx_access_rights_as_the_vmcb_wants() {
        // Code: P, DPL 0, S, type 0xb; L set, D clear, G set.
        assert_eq!(flat(0x08, 0xa09b).attrib, 0xa9b);
        assert_eq!(flat(0x10, 0xc093).attrib, 0xc93);
    }

    #[test]
    fn the_vmcb_state_reads_as_the_vmx_encodings_the_handlers_use() {
        // STI or MOV SS: both "blocking by STI"; clearing STI/MOV-SS blocking clears it.
        assert_eq!((shadow_as_blocking(0), shadow_as_blocking(1)), (0, 1));
        assert_eq!(
            (blocking_as_shadow(1), blocking_as_shadow(2), blocking_as_shadow(8)),
            (1, 1, 0)
        );
        assert_eq!(crate::exits::unblocked(shadow_as_blocking(1)).map(blocking_as_shadow), Some(0));
        // The CPL where the handlers read SS.DPL: only CPL 0 passes the hypercall check.
        assert!(crate::exits::ring0(cpl_as_ss_access_rights(0)));
        assert!((1..=3).all(|cpl| !crate::exits::ring0(cpl_as_ss_access_rights(cpl))));
    }

    #[test]
    fn nrip_gives_a_length_only_an_instruction_can_have() {
        assert_eq!(nrip_len(0x1003, 0x1000), Some(3));
        assert_eq!(nrip_len(0x1000, 0x1000), None, "not saved (0) or no progress");
        assert_eq!(nrip_len(0x1010, 0x1000), None, "16 bytes");
        assert_eq!(nrip_len(0, 0x1000), None);
    }

    #[test]
    fn only_instruction_exits_are_advanced() {
        assert!(advanced(ExitKind::Hypercall) && advanced(ExitKind::Io));
        assert!(!advanced(ExitKind::NestedFault) && !advanced(ExitKind::Timer));
    }
}
