// SPDX-License-Identifier: MIT OR Apache-2.0
//! The VMX implementation of the vCPU interface (`vcpu::Vcpu`): one guest's vCPU over its
//! VMCS on this core ([`VmxVcpu`]), its exits read from the VMCS ([`VmxExit`]), the fast
//! path's view of the current VMCS ([`Hw`]) and the landing's entry into it
//! ([`mkv_fast_exit`]).
//!
//! Owns the VMCS of each incarnation while it is current. May call: `vmx::vmcs` (its
//! fields), `vmx::exit` (decoding), `vmx::setup` (programming a VMCS), `arch` (VMX
//! instructions, the world switch), `fastexit` (the fast path it calls), `vcpu`.

#[cfg(target_os = "none")]
use crate::arch::vmx::GuestRegs;
#[cfg(target_os = "none")]
use crate::vmx::vmcs::{exit, g};

/// Whether an exit the landing hands the fast path is a VMCALL, a CPUID: `reason` is the
/// whole exit-reason field (bit 31 set: a failed entry, never answered there).
#[inline(always)]
pub fn fast_hypercall(reason: u64) -> bool {
    reason == u64::from(super::exit::reason::VMCALL)
}
#[inline(always)]
pub fn fast_cpuid(reason: u64) -> bool {
    reason == u64::from(super::exit::reason::CPUID)
}

/// The processor's side: the current VMCS, and the guest's registers as the landing saved
/// them.
#[cfg(target_os = "none")]
struct Hw<'a> {
    regs: &'a mut GuestRegs,
}

#[cfg(target_os = "none")]
impl crate::fastexit::Cpu for Hw<'_> {
    #[inline(always)]
    fn is_hypercall(&self, code: u64) -> bool {
        fast_hypercall(code)
    }
    #[inline(always)]
    fn is_cpuid(&self, code: u64) -> bool {
        fast_cpuid(code)
    }
    #[inline(always)]
    fn read(&mut self, f: crate::fastexit::Field) -> u64 {
        use crate::fastexit::Field;
        // SAFETY: called from the exit landing: this core's guest VMCS is current.
        unsafe {
            match f {
                Field::SsAccessRights => g::SS_AR.get(),
                Field::Rflags => g::RFLAGS.get(),
                Field::Rip => g::RIP.get(),
                Field::Interruptibility => g::INTERRUPTIBILITY.get(),
                Field::Timer => g::PREEMPTION_TIMER.get(),
                Field::Rax => self.regs.rax,
                Field::Rbx => self.regs.rbx,
                Field::Rcx => self.regs.rcx,
                Field::Rdx => self.regs.rdx,
            }
        }
    }
    #[inline(always)]
    fn write(&mut self, f: crate::fastexit::Field, v: u64) {
        use crate::fastexit::Field;
        // RIP past the answered instruction, blocking bits cleared, a timer value.
        // SAFETY: as for `read`; those values keep the guest contained.
        unsafe {
            match f {
                Field::Rip => g::RIP.set(v),
                Field::Interruptibility => g::INTERRUPTIBILITY.set(v),
                Field::Timer => g::PREEMPTION_TIMER.set(v),
                Field::Rax => self.regs.rax = v,
                Field::Rbx => self.regs.rbx = v,
                Field::Rcx => self.regs.rcx = v,
                Field::Rdx => self.regs.rdx = v,
                Field::SsAccessRights | Field::Rflags => {}
            }
        }
    }
    #[inline(always)]
    fn rip_after(&mut self) -> Option<u64> {
        // The VM-exit instruction length, valid for CPUID and VMCALL exits.
        // SAFETY: as for `read`.
        Some(unsafe { g::RIP.get().wrapping_add(exit::INSTRUCTION_LEN.get()) })
    }
}

/// Called by `vmx_exit_landing` (arch::vmx) after a VM exit with basic reason CPUID or
/// VMCALL (`reason`, the exit reason field as read), the guest's registers saved in
/// `regs`: non-zero = answered, resume the guest now.
///
/// # Safety
/// Called only by the exit landing, with the pointers the run loop gave `arch::vmx::run`
/// (both live and this core's for the whole run), its guest's VMCS current.
#[cfg(target_os = "none")]
#[no_mangle]
pub unsafe extern "C" fn mkv_fast_exit(
    regs: *mut GuestRegs,
    fx: *mut crate::fastexit::FastExit,
    reason: u64,
) -> u64 {
    // SAFETY: the caller's guarantee; nothing else touches them while the guest is out.
    let (regs, fx) = unsafe { (&mut *regs, &mut *fx) };
    crate::fastexit::answer(&mut Hw { regs }, fx, reason) as u64
}

/// One guest's vCPU over its VMCS on this core (`vcpu::Vcpu`).
#[cfg(target_os = "none")]
pub struct VmxVcpu {
    regs: GuestRegs,
    /// The VMCS region (host-physical, a frame of the core's private region).
    vmcs: u64,
    /// The EPTP (the nested root with its memory type and walk length).
    eptp: u64,
    /// The primary processor-based controls as set (interrupt-window exiting toggles).
    procbased: u32,
    /// A handler injected an event since the last exit (then nothing is re-delivered).
    injected: bool,
    /// VMLAUNCH done: the next entry is a VMRESUME.
    launched: bool,
    /// The preemption timer counts at the TSC rate shifted right by this.
    timer_shift: u32,
}

/// The exit of the current VMCS: the reason is read at once, every other field when a
/// handler asks (one VMREAD each).
#[cfg(target_os = "none")]
pub struct VmxExit {
    /// The full exit-reason field (bit 31: the VM entry failed).
    raw: u64,
}

#[cfg(target_os = "none")]
impl crate::vcpu::ExitInfo for VmxExit {
    #[inline(always)]
    fn kind(&self) -> crate::vcpu::ExitKind {
        super::exit::kind(self.raw as u16)
    }
    #[inline(always)]
    fn code(&self) -> u16 {
        self.raw as u16
    }
    #[inline(always)]
    fn entry_failed(&self) -> bool {
        self.raw & (1 << 31) != 0
    }
    fn instruction_len(&self) -> u64 {
        // SAFETY: the guest's VMCS is current until the next VM entry.
        unsafe { exit::INSTRUCTION_LEN.read() }
    }
    fn rip(&self) -> u64 {
        // Handlers move RIP only after they last ask for it (`advance` ends a handler).
        // SAFETY: as above.
        unsafe { g::RIP.read() }
    }
    fn cr_access(&self) -> crate::vcpu::CrAccess {
        // SAFETY: as above.
        super::exit::cr_access(unsafe { exit::QUALIFICATION.read() })
    }
    fn io(&self) -> crate::vcpu::IoAccess {
        // SAFETY: as above.
        super::exit::io(unsafe { exit::QUALIFICATION.read() })
    }
    fn nested_fault(&self) -> crate::vcpu::NestedFault {
        // The EPT-violation qualification's bits 0-5 are the neutral access bits.
        // SAFETY: as above.
        let (gpa, access) = unsafe { (exit::GUEST_PHYSICAL.read(), exit::QUALIFICATION.read()) };
        crate::vcpu::NestedFault { gpa, access }
    }
}

/// The VMCS field of a [`Field`](crate::vcpu::Field).
#[cfg(target_os = "none")]
#[inline(always)]
fn field(f: crate::vcpu::Field) -> super::vmcs::Rw {
    use super::vmcs::ctl;
    use crate::vcpu::Field;
    match f {
        Field::Rip => g::RIP,
        Field::Rsp => g::RSP,
        Field::Rflags => g::RFLAGS,
        Field::Cr0 => g::CR0,
        Field::Cr0Shadow => ctl::CR0_SHADOW,
        Field::Cr4 => g::CR4,
        Field::Cr4Shadow => ctl::CR4_SHADOW,
        Field::Efer => g::EFER,
        Field::FsBase => g::FS_BASE,
        Field::GsBase => g::GS_BASE,
        Field::Pat => g::PAT,
        Field::Interruptibility => g::INTERRUPTIBILITY,
        Field::SsAccessRights => g::SS_AR,
        Field::PendingDebug => g::PENDING_DBG,
    }
}

/// Whether a VM-exit interruption-information value says an NMI (valid, type 2; SDM
/// Vol. 3C 25.9.2).
#[cfg(target_os = "none")]
fn is_nmi(intr: u64) -> bool {
    intr & (1 << 31) != 0 && (intr >> 8) & 7 == 2
}

#[cfg(target_os = "none")]
impl crate::vcpu::Vcpu for VmxVcpu {
    type Features = super::Features;
    type Exit = VmxExit;
    const HYPERCALL_CODE: u16 = super::exit::reason::VMCALL;
    const CPUID_CODE: u16 = super::exit::reason::CPUID;
    const KICK_HOOK: unsafe extern "C" fn() = crate::arch::vmx::vmx_kick_hook;

    fn setup(
        f: &super::Features,
        s: &crate::vcpu::Setup,
        frames: &mut impl crate::ept::Frames,
        io_ports: impl Iterator<Item = u16> + Clone,
    ) -> Result<Self, crate::vcpu::SetupError> {
        use crate::arch;
        use crate::vcpu::SetupError;
        // A device's interrupt reaches the guest's IDT directly and the guest acknowledges
        // it at the real APIC through the x2APIC EOI MSR (passed through): x2APIC mode only.
        if s.devices && !arch::apic::x2apic_mode() {
            return Err(SetupError {
                reason: "its core's local APIC is not in x2APIC mode: device interrupts \
                         could not be acknowledged",
                detail: None,
            });
        }
        let Some(vmcs) = crate::ept::Frames::alloc(frames) else {
            return Err(SetupError { reason: "private region exhausted", detail: None });
        };
        // A fresh page of this core's private region (identity-mapped); VMX is on here.
        // SAFETY: the page is this core's alone and VMCLEAR/VMPTRLD take it as a VMCS.
        let loaded = unsafe {
            (vmcs as *mut u32).write(f.revision);
            arch::vmx::vmclear(vmcs).and_then(|()| arch::vmx::vmptrld(vmcs))
        };
        if loaded.is_err() {
            return Err(SetupError { reason: "VMCLEAR/VMPTRLD failed", detail: None });
        }
        // Flush any stale translation (a previous incarnation's included).
        // SAFETY: VMX on; the VPID and EPTP are this guest's.
        unsafe {
            arch::vmx::invvpid_single(s.tag);
            arch::vmx::invept_single(s.nested_root);
        }
        match super::setup::program(f, s, frames, io_ports) {
            Ok(procbased) => Ok(VmxVcpu {
                regs: GuestRegs::default(),
                vmcs,
                eptp: s.nested_root,
                procbased,
                injected: false,
                launched: false,
                timer_shift: f.preemption_timer_shift,
            }),
            Err(what) => {
                // A failure clears the VMCS before it ends the incarnation: its frame goes
                // back to the pool, and an active VMCS must not be written as memory (SDM
                // Vol. 3C 25.11.1).
                // SAFETY: the VMCS is this core's, current; clearing it ends its use.
                let _ = unsafe { arch::vmx::vmclear(vmcs) };
                Err(SetupError { reason: "VMCS setup failed", detail: Some(what) })
            }
        }
    }

    #[inline(always)]
    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }
    #[inline(always)]
    fn read(&mut self, f: crate::vcpu::Field) -> u64 {
        // SAFETY: this core's guest VMCS is current for the whole run loop.
        unsafe { field(f).read() }
    }
    #[inline(always)]
    fn write(&mut self, f: crate::vcpu::Field, v: u64) {
        // SAFETY: current VMCS; the exit handlers validated `v`.
        unsafe { field(f).set(v) };
    }
    fn inject(&mut self, e: crate::vcpu::Event) {
        use super::vmcs::ctl;
        use crate::vcpu::Event;
        let info: u64 = match e {
            Event::Exception { vector, error_code: Some(_) } => {
                (1 << 31) | (1 << 11) | (3 << 8) | vector as u64
            }
            Event::Exception { vector, error_code: None } => (1 << 31) | (3 << 8) | vector as u64,
            Event::Interrupt(vector) => (1 << 31) | vector as u64,
        };
        // SAFETY: current VMCS; a well-formed interruption-information value.
        unsafe {
            ctl::ENTRY_INTR_INFO.set(info);
            if let Event::Exception { error_code: Some(code), .. } = e {
                ctl::ENTRY_EXCEPTION_ERR.set(code as u64);
            }
        }
        self.injected = true;
        // A guest halted without HLT exiting wakes for the injected event.
        // SAFETY: current VMCS; 0 is the active state.
        unsafe { g::ACTIVITY.set(0) };
    }
    #[inline(always)]
    fn set_interrupt_window(&mut self, on: bool) {
        use x86::vmx::vmcs::control::PrimaryControls;
        let bit = PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
        let new = if on { self.procbased | bit } else { self.procbased & !bit };
        if new != self.procbased {
            self.procbased = new;
            // SAFETY: current VMCS; interrupt-window exiting is allowed (checked at setup).
            unsafe { super::vmcs::ctl::PROCBASED.set(new as u64) };
        }
    }
    #[inline(always)]
    fn set_timer(&mut self, ticks: u64) {
        // The preemption timer counts at the TSC rate shifted by IA32_VMX_MISC[4:0].
        // SAFETY: current VMCS.
        unsafe { g::PREEMPTION_TIMER.set((ticks >> self.timer_shift).min(u32::MAX as u64)) };
    }
    fn timer_shift(&self) -> u32 {
        self.timer_shift
    }

    #[inline(always)]
    unsafe fn enter(
        &mut self,
        fast: *mut core::ffi::c_void,
    ) -> Result<(), crate::vcpu::EntryError> {
        // SAFETY: the caller's guarantee (the VMCS is complete and current; `fast` valid).
        let entered = unsafe { crate::arch::vmx::run(&mut self.regs, self.launched, fast) };
        self.injected = false;
        match entered {
            Ok(()) => {
                self.launched = true;
                Ok(())
            }
            Err(()) => {
                // SAFETY: current VMCS.
                let code = unsafe { exit::INSTRUCTION_ERROR.read() };
                Err(crate::vcpu::EntryError { code })
            }
        }
    }
    #[inline(always)]
    fn exit(&mut self) -> VmxExit {
        // SAFETY: the guest's VMCS is current; exit-information fields are readable.
        VmxExit { raw: unsafe { exit::REASON.read() } }
    }
    #[inline(always)]
    fn host_nmi(&mut self, e: &VmxExit) -> bool {
        if e.raw as u16 != super::exit::reason::EXCEPTION_OR_NMI {
            return false;
        }
        // SAFETY: current VMCS.
        if !is_nmi(unsafe { exit::INTR_INFO.read() }) {
            return false;
        }
        // The NMI was a kick for this core's hypervisor, not the guest's: do not let the
        // guest inherit NMI blocking (it would hold every later kick until the guest
        // happens to IRET), and unblock NMIs on the host side.
        // SAFETY: current VMCS; clearing "blocking by NMI" (bit 3) only.
        unsafe {
            let s = g::INTERRUPTIBILITY.read();
            let _ = g::INTERRUPTIBILITY.write(s & !(1 << 3));
        }
        crate::arch::unblock_nmis();
        true
    }
    /// An exit during event delivery leaves the event in the IDT-vectoring field; it must
    /// be delivered again unless a handler injected something itself (SDM Vol. 3C 28.2.4).
    /// An exit caused by an instruction never happens during event delivery.
    #[inline(always)]
    fn redeliver(&mut self, e: &VmxExit) {
        use super::vmcs::ctl;
        if self.injected || super::exit::instruction_exit(e.raw as u16) {
            return;
        }
        // SAFETY: current VMCS.
        let info = unsafe { exit::IDT_VECTORING_INFO.read() };
        if info & (1 << 31) == 0 {
            return;
        }
        // SAFETY: current VMCS; re-delivering the processor's own event description.
        unsafe {
            let _ = ctl::ENTRY_INTR_INFO.write(info & !(1 << 12));
            if info & (1 << 11) != 0 {
                let code = exit::IDT_VECTORING_ERR.read();
                let _ = ctl::ENTRY_EXCEPTION_ERR.write(code);
            }
            let len = exit::INSTRUCTION_LEN.read();
            let _ = ctl::ENTRY_INSTR_LEN.write(len);
        }
    }

    fn nested_root(&self) -> u64 {
        self.eptp
    }
    fn flush_nested(&mut self) {
        // SAFETY: VMX on; this guest's EPTP.
        unsafe { crate::arch::vmx::invept_single(self.eptp) };
    }
    fn clear(&mut self) {
        // The frame goes back with the private region.
        // SAFETY: the VMCS is this core's; clearing it ends its use.
        let _ = unsafe { crate::arch::vmx::vmclear(self.vmcs) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_landing_hands_the_fast_path_only_cpuid_and_vmcall() {
        assert!(fast_hypercall(18) && !fast_cpuid(18));
        assert!(fast_cpuid(10) && !fast_hypercall(10));
        // A failed entry (bit 31) is never answered there, nor is any other reason.
        for r in [0, 1, 12, 30, 48, 52, 18 | 1 << 31, 10 | 1 << 31, 1 << 16 | 18] {
            assert!(!fast_hypercall(r) && !fast_cpuid(r), "{r:#x}");
        }
    }
}
