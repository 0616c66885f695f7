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

/// The processor's side (the current VMCS).
#[cfg(target_os = "none")]
struct Hw;

#[cfg(target_os = "none")]
impl crate::fastexit::Cpu for Hw {
    #[inline(always)]
    fn read(&mut self, f: crate::fastexit::Field) -> u64 {
        use crate::fastexit::Field;
        // SAFETY: called from the exit landing: this core's guest VMCS is current.
        unsafe {
            match f {
                Field::SsAccessRights => g::SS_AR.get(),
                Field::Rflags => g::RFLAGS.get(),
                Field::InstructionLen => exit::INSTRUCTION_LEN.get(),
                Field::Rip => g::RIP.get(),
                Field::Interruptibility => g::INTERRUPTIBILITY.get(),
                Field::Timer => g::PREEMPTION_TIMER.get(),
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
                Field::SsAccessRights | Field::Rflags | Field::InstructionLen => {}
            }
        }
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
    let kind = super::exit::fast_kind(reason);
    crate::fastexit::answer(&mut Hw, regs, fx, kind, reason as u16) as u64
}
