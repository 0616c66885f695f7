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
//! * The STI shadow across an exit: an INTR or NMI exit can land between `sti` and the
//!   instruction it shadows (physical interrupts follow the host's IF, not the guest's
//!   shadow); the VMCB's interrupt shadow bit says so and VMRUN must restore it. QEMU's TCG
//!   (7.2) does not: its VMRUN ignores the bit, so a virtual interrupt pending at that
//!   entry (the window's V_IRQ, a doorbell) is taken one instruction early. Before `sti;
//!   hlt` that delivers the guest's tick at the HLT, the guest's handler returns to the HLT
//!   and it halts with its tick gone ("HLT with no timer armed"). So an entry with the
//!   shadow set and a virtual interrupt pending does, when the shadowed instruction is HLT,
//!   what the processor would: the intercepted HLT's exit, made up without a VMRUN; or, for
//!   a guest whose HLT does not exit, HLT woken at once (RIP past it, the shadow over), then
//!   the entry ([`shadowed_entry`]).
//! * Nested paging: the instance's tables (`ept` in its NPT format) at nCR3; a flush is a
//!   TLB_CONTROL for the next VMRUN (this ASID where the processor can, else everything).
//! * Instruction length: nRIP where the processor saves it (Bochs), IOIO's EXITINFO2,
//!   else the bytes at RIP decoded (`svm::decode`), fetched through the guest's page
//!   tables and the nested tables (QEMU's TCG). An instruction that cannot be decoded
//!   turns the exit into [`ExitKind::Other`]: the guest is stopped, never advanced by a
//!   guess.
//! * A guest that takes its own interrupts (`Setup::direct_interrupts`: channel doorbells,
//!   its devices' lines): VT-x lets them reach the guest's IDT; here every physical
//!   interrupt exits (the run timer needs the INTR intercept), so they are virtualized.
//!   The host takes the interrupt at STGI: a doorbell's stub marks this core in
//!   `arch::idt::HOST_DOORBELLS` and EOIs it; a device's (vector `0x50 + i`) marks it in
//!   `HOST_DEVICE_IRQS[i]` and leaves it in service, so the real APIC holds back its
//!   class and the I/O APIC its level-triggered line (remote IRR), as under VT-x while
//!   the guest's handler runs. The vCPU keeps the guest's requested and in-service
//!   interrupts (`svm::virq`, a local APIC's rules) and offers the highest deliverable
//!   one as a virtual interrupt (V_IRQ, V_INTR_VECTOR, V_IGN_TPR), which the processor
//!   delivers through the guest's IDT once the guest can take it. The guest's EOI (a
//!   write of 0 to the x2APIC EOI MSR, intercepted) is completed here
//!   ([`ExitKind::Completed`]): it retires the highest virtual interrupt in service and,
//!   for a device's, EOIs the real APIC (in either APIC mode), which lets the I/O APIC
//!   send the line again. An offered interrupt the guest can take at once (RFLAGS.IF set,
//!   no shadow) goes in by EVENTINJ instead (Bochs 2.7 leaves V_IRQ masked after VMRUN
//!   until the guest itself changes IF, and never ends a HLT for it).
//! * The HLT state of such a guest: on VT-x its HLT does not exit and the VMCS keeps the
//!   activity state over exits; a VMCB keeps none, so VMRUN after any exit during the halt
//!   (the run timer, a kick) would resume it past its HLT as if woken. So its HLT exits
//!   too, and the backend keeps the state ([`Halted`]: RIP past the HLT, as VMX saves it):
//!   every entry either wakes it ([`halted_entry`]: an injected event, or an offered
//!   interrupt or the window with IF = 1) or halts it again, at its HLT with the intercept
//!   off, offered nothing and with RFLAGS.IF = 1 for that entry only (IF masks only
//!   virtual interrupts under V_INTR_MASKING; Bochs 2.7 does not end a HLT for an
//!   intercepted interrupt with the guest's IF clear), until an exit ends the entry
//!   ([`still_halted`]). The HLT exit itself is counted as `hlt`, the one exit per halt
//!   VT-x does not have.
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
const TELEMETRY_HLT: u16 = 12;
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

/// #GP(0) in EVENTINJ's format.
const GP_EVENT: u64 =
    vmcb::event::VALID | vmcb::event::TYPE_EXCEPTION | vmcb::event::ERROR_CODE_VALID | 13;

/// Whether `a` is a canonical 48-bit address (bits 63:47 all equal).
fn canonical(a: u64) -> bool {
    let top = (a as i64) >> 47;
    top == 0 || top == -1
}

/// The VMCB's copy of LSTAR, CSTAR or KERNEL_GS_BASE, if `msr` is one of them.
fn syscall_msr(s: &mut vmcb::StateSave, msr: u32) -> Option<&mut u64> {
    match msr {
        0xc000_0082 => Some(&mut s.lstar),
        0xc000_0083 => Some(&mut s.cstar),
        0xc000_0102 => Some(&mut s.kernel_gs_base),
        _ => None,
    }
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

/// HLT's opcode.
#[cfg_attr(not(any(test, target_os = "none")), allow(dead_code))]
const HLT: u8 = 0xf4;

/// What an entry does about the guest's STI/MOV-SS interrupt shadow (see the module
/// header): the processor must let the shadowed instruction run before it takes a
/// virtual interrupt, and QEMU's TCG does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(any(test, target_os = "none")), allow(dead_code))]
enum Shadowed {
    /// Enter as usual: no shadow, nothing pending that it holds back, an event to inject
    /// (EVENTINJ ignores the shadow on every processor), or an instruction other than HLT
    /// (the interrupt may come one instruction early under TCG; only HLT makes that a lost
    /// wake-up).
    Enter,
    /// The shadowed instruction is an intercepted HLT: its exit, made up (no VMRUN).
    HltExit,
    /// The shadowed instruction is a HLT that does not exit: halted and woken at once by
    /// the pending interrupt, so RIP moves past it and the shadow ends before the entry.
    PastHlt,
}

/// The decision for an entry: `shadow` the VMCB's interrupt shadow bit, `virq` a virtual
/// interrupt pending (the window's or a doorbell or device interrupt), `event` an EVENTINJ
/// pending, `insn` the first byte at RIP (`None`: not readable), `if_set` the guest's
/// RFLAGS.IF (with it clear nothing is taken early, shadow or not: a MOV SS shadow), and
/// `hlt_exits` whether the guest's HLT exits (else it halts, see [`halted_entry`]).
#[cfg_attr(not(any(test, target_os = "none")), allow(dead_code))]
fn shadowed_entry(
    shadow: bool,
    virq: bool,
    event: bool,
    insn: Option<u8>,
    if_set: bool,
    hlt_exits: bool,
) -> Shadowed {
    if !shadow || !virq || event || !if_set || insn != Some(HLT) {
        Shadowed::Enter
    } else if hlt_exits {
        Shadowed::HltExit
    } else {
        Shadowed::PastHlt
    }
}

/// The HLT a guest that takes its own interrupts halted at: the activity state a VMCB does
/// not keep (the backend keeps it; see the module header). Its address and length: while
/// halted the VMCB's RIP is past it, as VMX saves a guest in the HLT state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(any(test, target_os = "none")), allow(dead_code))]
struct Halted {
    rip: u64,
    len: u64,
}

/// What the entry of a halted guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(any(test, target_os = "none")), allow(dead_code))]
enum HaltedEntry {
    /// It wakes: enters past its HLT, with the event or interrupt delivered there.
    Wake,
    /// It halts again: entered at its HLT with the HLT intercept off, offered nothing, so
    /// that only an exit (the run timer, a kick, a host interrupt) ends that entry.
    Stay,
}

/// Whether a halted guest wakes at this entry: `event` an event to inject (EVENTINJ: the
/// run loop's timer tick or wake-up, an exception), `virq` a virtual interrupt to offer or
/// the interrupt window asked for, `if_set` the guest's RFLAGS.IF. What ends the HLT state
/// of a processor (SDM Vol. 3C on VM entry: an injected event takes the guest out of the
/// HLT activity state; AMD APM Vol. 3, HLT): an unmasked maskable interrupt (IF = 1; the
/// HLT ended any STI shadow), an NMI, SMI or INIT (never given to these guests: their
/// kicks, SMIs and INITs are the host's). With IF = 0 a pending interrupt leaves it halted,
/// as VT-x does.
#[cfg_attr(not(any(test, target_os = "none")), allow(dead_code))]
fn halted_entry(event: bool, virq: bool, if_set: bool) -> HaltedEntry {
    if event || (virq && if_set) {
        HaltedEntry::Wake
    } else {
        HaltedEntry::Stay
    }
}

/// After an entry that halted the guest again ([`HaltedEntry::Stay`]): whether it is still
/// halted. So if the exit was asynchronous (a host interrupt or an NMI, or no entry at all:
/// a kick), no event delivery was cut short, and RIP is at the HLT (the exit came before
/// it) or just past it (during the halt); anything else means the guest ran on, and it is
/// then awake wherever it is.
#[cfg_attr(not(any(test, target_os = "none")), allow(dead_code))]
fn still_halted(asynchronous: bool, cut_short: bool, rip: u64, h: Halted) -> bool {
    asynchronous && !cut_short && (rip == h.rip || rip == h.rip.wrapping_add(h.len))
}

/// How an entry offers the guest's next doorbell or device interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(any(test, target_os = "none")), allow(dead_code))]
enum Offer {
    /// None to offer, or the guest halts again (offered when it wakes).
    Nothing,
    /// As an injected external interrupt (EVENTINJ): the guest can take it now.
    Inject,
    /// As V_IRQ: delivered by the processor once the guest can take it.
    Virq,
}

/// The offer's way in: `offer` an interrupt to offer, `stays_halted` the guest halts
/// again, `event` an EVENTINJ already pending (one event per entry: the offer then waits
/// in V_IRQ), `interruptible` RFLAGS.IF set and no interrupt shadow.
#[cfg_attr(not(any(test, target_os = "none")), allow(dead_code))]
fn offer_by(offer: bool, stays_halted: bool, event: bool, interruptible: bool) -> Offer {
    if !offer || stays_halted {
        Offer::Nothing
    } else if interruptible && !event {
        Offer::Inject
    } else {
        Offer::Virq
    }
}

/// RFLAGS.IF.
#[cfg_attr(not(any(test, target_os = "none")), allow(dead_code))]
const RFLAGS_IF: u64 = 1 << 9;

/// An exit the vCPU makes up without entering the guest.
#[cfg(target_os = "none")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MadeUp {
    /// A kick was pending: an NMI exit.
    Kick,
    /// A zero run timer: a timer exit.
    Timer,
    /// An intercepted HLT in an STI shadow with an interrupt pending ([`Shadowed::HltExit`]).
    Hlt,
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
    fn rip_after(&mut self) -> Option<u64> {
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
    let (side, vmcb, regs, fx) =
        // SAFETY: the caller's guarantee; nothing else touches them while the guest is out.
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
    /// The last entry made up its exit (no VMRUN), and which.
    made_up: Option<MadeUp>,
    /// Entries that met an STI shadow over HLT with an interrupt pending ([`shadowed_entry`]).
    shadowed_hlts: u32,
    /// The guest is halted at this HLT (a guest taking its own interrupts: [`Halted`]).
    halted: Option<Halted>,
    /// Its HLTs (for the log at its end).
    halts: u32,
    /// The host took the run timer's interrupt during the last entry.
    timer_fired: bool,
    nrip: bool,
    flush: u8,
    /// The guest takes its own interrupts (doorbells virtualized, see the module header).
    direct: bool,
    /// The interrupt window was asked for (VINTR intercepted, V_IRQ set).
    window: bool,
    /// The guest's doorbells and device interrupts: requested, in service.
    virq: super::virq::Virq,
    /// The guest owns devices (their lines are routed to this core).
    devices: bool,
    /// This core's bit in `arch::idt::HOST_DOORBELLS` and `HOST_DEVICE_IRQS`.
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
        let Some(index) = crate::percpu::current_index() else {
            return Err(SetupError { reason: "no per-core state", detail: None });
        };
        let Some(&timer_mode) = super::core_state::TIMER[index].get() else {
            return Err(SetupError { reason: "SVM is not on for this core", detail: None });
        };
        // Nothing of an earlier incarnation's interrupts carries over (its death
        // acknowledged whatever was in service at the APIC).
        for w in &crate::arch::idt::HOST_DEVICE_IRQS {
            w.fetch_and(!(1 << (index % 64)), core::sync::atomic::Ordering::AcqRel);
        }
        // XCR0 as every incarnation starts it (`arch::reset_xcr0`: not every SVM
        // implementation intercepts XSETBV).
        // SAFETY: on this core, between guests, interrupts off (the run loop's setup).
        unsafe { crate::arch::reset_xcr0() };
        let pages = super::core_state::PAGES[index].0.get();
        // SAFETY: this core's slot, used by this core alone; its check guest is over.
        let p = unsafe { &mut *pages };
        p.msrpm = super::maps::Msrpm::intercept_all();
        p.msrpm.allow_policy();
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
        // HLT exits for every guest, those that take their own interrupts included: the
        // backend keeps their halted state (`Halted`, the module header), which VMRUN would
        // otherwise lose at the first exit during the halt.
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
            shadowed_hlts: 0,
            halted: None,
            halts: 0,
            timer_fired: false,
            nrip: f.nrip_save,
            flush: if f.flush_by_asid { tlb_control::FLUSH_ASID } else { tlb_control::FLUSH_ALL },
            direct: s.direct_interrupts,
            window: false,
            virq: super::virq::Virq::default(),
            devices: s.devices,
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
            Event::Interrupt(vector) => {
                if self.direct && vector == vmcall_proto::guest::DOORBELL_VECTOR {
                    // A wake-up: the guest's handler EOIs it as any doorbell.
                    self.virq.injected_doorbell();
                }
                event::VALID | event::TYPE_INTR | u64::from(vector)
            }
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
        // The guest's highest deliverable doorbell or device interrupt, if any.
        let offer = self.virq.offer();
        let (window, direct, halted) = (self.window, self.direct, self.halted);
        let v = self.vmcb();
        v.save.rax = rax;
        let mut event_pending = v.control.event_inj & event::VALID != 0;
        let mut shadow = v.control.interrupt_shadow & 1 != 0;
        let if_set = v.save.rflags & RFLAGS_IF != 0;
        let (cr0, cr3, rip) = (v.save.cr0, v.save.cr3, v.save.rip);
        self.made_up = None;
        // A halted guest (an HLT of a guest taking its own interrupts, see the module
        // header): woken by what wakes a halted processor, else it halts again.
        let mut stay = None;
        if let Some(h) = halted {
            match halted_entry(event_pending, offer.is_some() || window, if_set) {
                // RIP is past the HLT already: the event or interrupt is delivered there.
                HaltedEntry::Wake => self.halted = None,
                HaltedEntry::Stay => stay = Some(h),
            }
        }
        if stay.is_none() && shadow && (offer.is_some() || window) && !event_pending {
            // Rare (an exit inside the shadow with an interrupt pending): the code byte is
            // read only then. A guest that takes its own interrupts halts in the backend,
            // so its HLT is done here as one that does not exit.
            let (bytes, n) = fetch(self.ncr3, cr0, cr3, rip);
            let insn = (n > 0).then_some(bytes[0]);
            match shadowed_entry(shadow, true, event_pending, insn, if_set, !direct) {
                Shadowed::Enter => {}
                Shadowed::HltExit => {
                    self.shadowed_hlts = self.shadowed_hlts.saturating_add(1);
                    self.made_up = Some(MadeUp::Hlt);
                    self.injected = false;
                    self.virq.entered(false);
                    return Ok(());
                }
                Shadowed::PastHlt => {
                    self.shadowed_hlts = self.shadowed_hlts.saturating_add(1);
                    let v = self.vmcb();
                    v.save.rip = rip.wrapping_add(1);
                    v.control.interrupt_shadow = 0;
                    shadow = false;
                }
            }
        }
        if timer == 0 && !event_pending {
            // A zero timer exits before the guest's first instruction: no entry at all.
            self.made_up = Some(MadeUp::Timer);
            self.injected = false;
            self.virq.entered(false);
            return Ok(());
        }
        // How the offered interrupt goes in: by EVENTINJ when the guest can take it now
        // (what VMRUN delivers before the first instruction on every implementation;
        // Bochs 2.7 leaves a V_IRQ masked after VMRUN until the guest changes its IF, and
        // does not wake from HLT for it), else as V_IRQ, delivered once the guest can
        // take it. A halted guest that stays halted is offered nothing.
        let how = offer_by(offer.is_some(), stay.is_some(), event_pending, if_set && !shadow);
        let vector = u64::from(offer.unwrap_or(vmcall_proto::guest::DOORBELL_VECTOR));
        // The interrupt window (exits at VINTR before its V_IRQ is taken) or the offer.
        let virq = if stay.is_none() && (window || how == Offer::Virq) {
            v_intr::V_IRQ | v_intr::V_IGN_TPR | 0xf << 16 | vector << 32
        } else {
            0
        };
        let v = self.vmcb();
        v.control.v_intr = v_intr::V_INTR_MASKING | virq;
        if how == Offer::Inject {
            v.control.event_inj = event::VALID | event::TYPE_INTR | vector;
            event_pending = true;
        }
        if let Some(h) = stay {
            // Halts again: at its HLT with the intercept off, so that the processor halts
            // until an interrupt or NMI exits. RFLAGS.IF = 1 for that entry: with
            // V_INTR_MASKING it masks only virtual interrupts, and none is offered; Bochs
            // 2.7 does not end a HLT for an intercepted interrupt while the guest's IF is
            // clear. Both are put back after the entry.
            v.save.rip = h.rip;
            v.save.rflags |= RFLAGS_IF;
            v.control.intercept_misc1 &= !misc1::HLT;
        }
        // With an event to deliver the guest must enter (the event is consumed then, as
        // on VT-x): a zero timer becomes the shortest one, and a kick does not hold the
        // entry back (its mail waits for that timer). An interrupt offered by EVENTINJ is
        // not such an event: a kick holds it back (below).
        let kicks = if event_pending && how != Offer::Inject { 0 } else { svm::RUN_KICKS };
        let flags = svm::RUN_INTERRUPTS | kicks;
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
        if let Some(h) = stay {
            let v = self.vmcb();
            v.control.intercept_misc1 |= misc1::HLT;
            if !if_set {
                v.save.rflags &= !RFLAGS_IF;
            }
            let xc = sx::normalize(v.control.exit_code);
            let asynchronous = !ran || xc == code::INTR || xc == code::NMI;
            let cut_short = ran && v.control.exit_int_info & event::VALID != 0;
            if still_halted(asynchronous, cut_short, v.save.rip, h) {
                v.save.rip = h.rip.wrapping_add(h.len);
                v.control.interrupt_shadow = 0;
            } else {
                self.halted = None;
            }
        }
        if !ran {
            self.made_up = Some(MadeUp::Kick);
            if how == Offer::Inject {
                // Not delivered: offered again at the next entry.
                self.vmcb().control.event_inj = 0;
            }
            self.virq.entered(false);
            return Ok(());
        }
        let v = self.vmcb();
        let rax = v.save.rax;
        // The offered interrupt was taken if EVENTINJ delivered it (an exit cutting the
        // delivery short gives it back in EXITINTINFO: `redeliver`), or if the processor
        // cleared V_IRQ (a VINTR exit, the window's, leaves it set: it comes before the
        // delivery).
        let taken = match how {
            Offer::Inject => true,
            Offer::Virq => {
                v.control.v_intr & v_intr::V_IRQ == 0 && v.control.exit_code != code::VINTR
            }
            Offer::Nothing => false,
        };
        v.control.tlb_control = tlb_control::NOTHING;
        // Delivered, or back in EXITINTINFO (re-delivered by `redeliver`).
        v.control.event_inj = 0;
        self.regs.rax = rax;
        self.virq.entered(taken);
        // What the host took during this entry (at STGI) is offered from the next.
        use core::sync::atomic::Ordering::AcqRel;
        let bit = self.core_bit;
        let mut got = 0;
        if crate::arch::idt::HOST_DOORBELLS.fetch_and(!bit, AcqRel) & bit != 0 && self.direct {
            got |= super::virq::DOORBELL;
        }
        if self.devices {
            for (i, w) in crate::arch::idt::HOST_DEVICE_IRQS.iter().enumerate() {
                if w.fetch_and(!bit, AcqRel) & bit != 0 {
                    got |= 1 << i;
                }
            }
        }
        self.virq.request(got);
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
            Some(MadeUp::Kick) => {
                (e.kind, e.code, e.nmi) = (ExitKind::Nmi, TELEMETRY_NMI, true);
                return e;
            }
            Some(MadeUp::Timer) => {
                (e.kind, e.code) = (ExitKind::Timer, TELEMETRY_TIMER);
                return e;
            }
            Some(MadeUp::Hlt) => {
                // The exit the processor makes for the intercepted HLT at RIP (one byte).
                (e.kind, e.code, e.len) = (ExitKind::Hlt, TELEMETRY_HLT, 1);
                return e;
            }
            None => {}
        }
        let c = &v.control;
        let xc = sx::normalize(c.exit_code);
        let (info1, info2, next_rip) = (c.exit_info1, c.exit_info2, c.next_rip);
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
        if direct && e.kind == ExitKind::Hlt {
            // The guest takes its own interrupts: its HLT halts it, as on VT-x where it
            // does not exit. The backend keeps the activity state a VMCB does not (the
            // module header): RIP past the HLT as VMX saves it, the STI shadow ended by
            // the HLT; the next entry wakes it or halts it again ([`halted_entry`]).
            v.save.rip = rip.wrapping_add(len);
            v.control.interrupt_shadow = 0;
            e.kind = ExitKind::Completed;
            self.halted = Some(Halted { rip, len });
            self.halts = self.halts.saturating_add(1);
            return e;
        }
        if e.kind == ExitKind::Wbinvd && super::decode::is_invd(&bytes[..n]) {
            // QEMU's TCG gives INVD WBINVD's exit code (`decode::is_invd`): count it as
            // what the guest ran (both are emulated as no-ops).
            (e.kind, e.code) = (ExitKind::Invd, sx::telemetry_code(code::INVD, 0));
        }
        if direct
            && e.kind == ExitKind::Wrmsr
            && regs.rcx as u32 == MSR_EOI
            && regs.rax as u32 == 0
            && regs.rdx as u32 == 0
        {
            // The guest acknowledges its highest virtual interrupt in service: a doorbell
            // the host acknowledged at the real APIC already, or a device's, which the host
            // left in service there for this EOI.
            v.save.rip = rip.wrapping_add(len);
            v.control.interrupt_shadow = 0;
            (e.kind, e.code) = (ExitKind::Completed, TELEMETRY_WRMSR);
            if self.virq.eoi().is_some() {
                // Only the guest's device vectors are ever left in service at this core's
                // APIC while it runs (the host's own stubs acknowledge theirs at once), so
                // the highest in service is the one the guest retired.
                // SAFETY: so this EOI retires that device interrupt.
                unsafe { crate::arch::apic::eoi() };
            }
            return e;
        }
        if e.kind == ExitKind::Wrmsr {
            let val = regs.rdx << 32 | (regs.rax & 0xffff_ffff);
            if let Some(slot) = syscall_msr(&mut v.save, regs.rcx as u32) {
                // LSTAR, CSTAR, KERNEL_GS_BASE: VT-x passes them through and the
                // processor checks the address; here the write exited (`maps::CANONICAL_MSRS`)
                // and no neutral field holds them, so it completes here. FS and GS base go
                // to the policy's handler, which checks them the same way.
                if canonical(val) {
                    *slot = val;
                    v.save.rip = rip.wrapping_add(len);
                    v.control.interrupt_shadow = 0;
                } else {
                    v.control.event_inj = GP_EVENT;
                    self.injected = true;
                }
                (e.kind, e.code) = (ExitKind::Completed, TELEMETRY_WRMSR);
                return e;
            }
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
        if self.shadowed_hlts > 0 {
            log::info!(
                "svm: {} entries in an STI shadow over HLT with an interrupt pending: \
                 HLT done by the vCPU (the processor must not drop the shadow)",
                self.shadowed_hlts
            );
        }
        if self.halts > 0 {
            log::debug!("svm: {} HLTs halted in the backend", self.halts);
        }
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

    /// The STI shadow over HLT (`sti; hlt`) with a virtual interrupt pending: the HLT
    /// happens first, as the processor must do it, whether or not VMRUN keeps the shadow.
    #[test]
    fn an_sti_shadow_over_hlt_lets_the_hlt_happen_before_the_interrupt() {
        use Shadowed::*;
        // The case of the 64-core stops: the tick waits for the window (V_IRQ), an exit
        // came between STI and HLT, HLT exits.
        assert_eq!(shadowed_entry(true, true, false, Some(HLT), true, true), HltExit);
        // A guest taking its own interrupts: halted, woken at once.
        assert_eq!(shadowed_entry(true, true, false, Some(HLT), true, false), PastHlt);
        // No shadow, no pending virtual interrupt, an event to inject, another
        // instruction, code not readable, IF clear (a MOV SS shadow: nothing is taken
        // early, and a halt with IF = 0 is not woken by an interrupt): the entry as always.
        assert_eq!(shadowed_entry(false, true, false, Some(HLT), true, true), Enter);
        assert_eq!(shadowed_entry(true, false, false, Some(HLT), true, true), Enter);
        assert_eq!(shadowed_entry(true, true, true, Some(HLT), true, true), Enter);
        assert_eq!(shadowed_entry(true, true, false, Some(0xf3), true, true), Enter);
        assert_eq!(shadowed_entry(true, true, false, None, true, true), Enter);
        assert_eq!(shadowed_entry(true, true, false, Some(HLT), false, false), Enter);
        assert_eq!(shadowed_entry(true, true, false, Some(HLT), false, true), Enter);
    }

    /// A halted guest (HLT of a guest taking its own interrupts) wakes for what wakes a
    /// processor in the HLT state, and for nothing else: `napper` (CLI; HLT, no timer)
    /// stays halted over every run-timer expiry and kick until its budget, as on VT-x.
    #[test]
    fn a_halted_guest_wakes_only_for_an_event_or_an_interrupt_it_can_take() {
        use HaltedEntry::*;
        // Interrupts off, nothing pending, or pending and masked: halted again.
        assert_eq!(halted_entry(false, false, false), Stay);
        assert_eq!(halted_entry(false, true, false), Stay, "a doorbell with IF = 0");
        // Interrupts on and nothing pending (`sti; hlt` waiting for a doorbell).
        assert_eq!(halted_entry(false, false, true), Stay);
        // The doorbell (or the window) with IF = 1; an injected event whatever IF says
        // (VT-x: any injection ends the HLT state).
        assert_eq!(halted_entry(false, true, true), Wake);
        assert_eq!(halted_entry(true, false, false), Wake);
        assert_eq!(halted_entry(true, false, true), Wake);
    }

    /// The exit after an entry that halted the guest again: still halted after an
    /// interrupt or NMI exit at the HLT or past it; awake after anything that shows the
    /// guest ran on.
    #[test]
    fn a_halted_guest_stays_halted_over_interrupt_and_nmi_exits() {
        let h = Halted { rip: 0x10_0000, len: 1 };
        assert!(still_halted(true, false, 0x10_0001, h), "the timer during the halt");
        assert!(still_halted(true, false, 0x10_0000, h), "an exit before the HLT ran");
        // A prefixed HLT (`f3 f4`): its whole length.
        assert!(still_halted(true, false, 0x10_0002, Halted { rip: 0x10_0000, len: 2 }));
        assert!(!still_halted(false, false, 0x10_0001, h), "an instruction exit");
        assert!(!still_halted(true, true, 0x10_0001, h), "a delivery cut short");
        assert!(!still_halted(true, false, 0x20_0000, h), "RIP elsewhere: it ran");
    }

    /// The offered doorbell or device interrupt goes in by EVENTINJ when the guest can take
    /// it at once (Bochs 2.7 delivers no V_IRQ before the guest changes IF itself: the
    /// doorbell handlers that never ran on Bochs `ryzen`), else as V_IRQ.
    #[test]
    fn an_interrupt_the_guest_can_take_now_is_injected_else_offered_as_v_irq() {
        use Offer::*;
        assert_eq!(offer_by(true, false, false, true), Inject);
        assert_eq!(offer_by(true, false, false, false), Virq, "IF = 0 or a shadow");
        assert_eq!(offer_by(true, false, true, true), Virq, "one event per entry");
        assert_eq!(offer_by(true, true, false, true), Nothing, "halts again");
        assert_eq!(offer_by(false, false, false, true), Nothing);
    }

    #[test]
    fn the_syscall_msrs_are_the_vmcb_fields_and_must_be_canonical() {
        let mut s = zeroed_save();
        *syscall_msr(&mut s, 0xc000_0082).unwrap() = 1;
        *syscall_msr(&mut s, 0xc000_0083).unwrap() = 2;
        *syscall_msr(&mut s, 0xc000_0102).unwrap() = 3;
        assert_eq!((s.lstar, s.cstar, s.kernel_gs_base), (1, 2, 3));
        assert!(syscall_msr(&mut s, 0xc000_0081).is_none()); // STAR: any value
        assert!(syscall_msr(&mut s, 0xc000_0100).is_none()); // FS base: the policy's
        for msr in [0xc000_0082u32, 0xc000_0083, 0xc000_0102] {
            assert!(super::super::maps::CANONICAL_MSRS.contains(&msr));
        }
        assert!(canonical(0x0000_7fff_ffff_f000) && canonical(0xffff_8000_0000_0000));
        assert!(!canonical(0x0000_8000_0000_0000) && !canonical(0xffff_0000_0000_0000));
        assert_eq!(GP_EVENT, 0x8000_0b0d);
    }

    fn zeroed_save() -> vmcb::StateSave {
        vmcb::Vmcb::zeroed().save
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
