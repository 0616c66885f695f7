// SPDX-License-Identifier: MIT OR Apache-2.0
//! Typed access to the current VMCS. Fields are grouped by access: [`Rw`] fields (controls,
//! guest and host state) can be read and written, [`Ro`] fields (exit information) only
//! read. Encodings come from the `x86` crate (SDM Vol. 3D appendix B).

use crate::arch::vmx::{vmread_or_zero, vmread_unchecked, vmwrite, vmwrite_unchecked};
use x86::vmx::vmcs::{control, guest, host, ro};

/// A read-write VMCS field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rw(pub u32);
/// A read-only VMCS field (VM-exit information).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ro(pub u32);

/// A VMREAD/VMWRITE failed: the field and which access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmcsError {
    pub field: u32,
    pub write: bool,
}

impl Rw {
    /// # Safety
    /// A VMCS is current on this core.
    #[inline(always)]
    pub unsafe fn read(self) -> u64 {
        // SAFETY: caller guarantees a current VMCS; every `Rw` is a valid encoding.
        unsafe { vmread_or_zero(self.0) }
    }
    /// # Safety
    /// A VMCS is current on this core and `v` keeps the guest contained.
    pub unsafe fn write(self, v: u64) -> Result<(), VmcsError> {
        // SAFETY: caller guarantees a current VMCS and a safe value.
        unsafe { vmwrite(self.0, v) }.map_err(|_| VmcsError { field: self.0, write: true })
    }
    /// Reads with no fallback value (the fast exit path).
    ///
    /// # Safety
    /// A VMCS is current on this core (the read then cannot fail).
    #[inline(always)]
    pub unsafe fn get(self) -> u64 {
        // SAFETY: caller guarantees a current VMCS; every `Rw` is a valid encoding.
        unsafe { vmread_unchecked(self.0) }
    }
    /// Writes without looking at the outcome: for the exit path, where the VMCS is current
    /// and the field one it has (the write cannot fail).
    ///
    /// # Safety
    /// As for [`Rw::write`].
    #[inline(always)]
    pub unsafe fn set(self, v: u64) {
        // SAFETY: caller guarantees a current VMCS and a safe value.
        unsafe { vmwrite_unchecked(self.0, v) }
    }
}

impl Ro {
    /// # Safety
    /// A VMCS is current on this core.
    #[inline(always)]
    pub unsafe fn read(self) -> u64 {
        // SAFETY: caller guarantees a current VMCS; every `Ro` is a valid encoding.
        unsafe { vmread_or_zero(self.0) }
    }
    /// Reads with no fallback value (the fast exit path).
    ///
    /// # Safety
    /// A VMCS is current on this core (the read then cannot fail).
    #[inline(always)]
    pub unsafe fn get(self) -> u64 {
        // SAFETY: caller guarantees a current VMCS; every `Ro` is a valid encoding.
        unsafe { vmread_unchecked(self.0) }
    }
}

pub mod ctl {
    use super::*;
    pub const VPID: Rw = Rw(control::VPID);
    pub const PINBASED: Rw = Rw(control::PINBASED_EXEC_CONTROLS);
    pub const PROCBASED: Rw = Rw(control::PRIMARY_PROCBASED_EXEC_CONTROLS);
    pub const PROCBASED2: Rw = Rw(control::SECONDARY_PROCBASED_EXEC_CONTROLS);
    pub const EXIT: Rw = Rw(control::VMEXIT_CONTROLS);
    pub const ENTRY: Rw = Rw(control::VMENTRY_CONTROLS);
    pub const EXCEPTION_BITMAP: Rw = Rw(control::EXCEPTION_BITMAP);
    pub const MSR_BITMAP: Rw = Rw(control::MSR_BITMAPS_ADDR_FULL);
    pub const IO_BITMAP_A: Rw = Rw(control::IO_BITMAP_A_ADDR_FULL);
    pub const IO_BITMAP_B: Rw = Rw(control::IO_BITMAP_B_ADDR_FULL);
    pub const EPTP: Rw = Rw(control::EPTP_FULL);
    pub const CR0_MASK: Rw = Rw(control::CR0_GUEST_HOST_MASK);
    pub const CR4_MASK: Rw = Rw(control::CR4_GUEST_HOST_MASK);
    pub const CR0_SHADOW: Rw = Rw(control::CR0_READ_SHADOW);
    pub const CR4_SHADOW: Rw = Rw(control::CR4_READ_SHADOW);
    pub const CR3_TARGET_COUNT: Rw = Rw(control::CR3_TARGET_COUNT);
    pub const ENTRY_INTR_INFO: Rw = Rw(control::VMENTRY_INTERRUPTION_INFO_FIELD);
    pub const ENTRY_EXCEPTION_ERR: Rw = Rw(control::VMENTRY_EXCEPTION_ERR_CODE);
    pub const ENTRY_INSTR_LEN: Rw = Rw(control::VMENTRY_INSTRUCTION_LEN);
}

pub mod g {
    use super::*;
    pub const ES_SEL: Rw = Rw(guest::ES_SELECTOR);
    pub const CS_SEL: Rw = Rw(guest::CS_SELECTOR);
    pub const SS_SEL: Rw = Rw(guest::SS_SELECTOR);
    pub const DS_SEL: Rw = Rw(guest::DS_SELECTOR);
    pub const FS_SEL: Rw = Rw(guest::FS_SELECTOR);
    pub const GS_SEL: Rw = Rw(guest::GS_SELECTOR);
    pub const LDTR_SEL: Rw = Rw(guest::LDTR_SELECTOR);
    pub const TR_SEL: Rw = Rw(guest::TR_SELECTOR);
    pub const LINK_PTR: Rw = Rw(guest::LINK_PTR_FULL);
    pub const EFER: Rw = Rw(guest::IA32_EFER_FULL);
    pub const PAT: Rw = Rw(guest::IA32_PAT_FULL);
    pub const ES_LIMIT: Rw = Rw(guest::ES_LIMIT);
    pub const CS_LIMIT: Rw = Rw(guest::CS_LIMIT);
    pub const SS_LIMIT: Rw = Rw(guest::SS_LIMIT);
    pub const DS_LIMIT: Rw = Rw(guest::DS_LIMIT);
    pub const FS_LIMIT: Rw = Rw(guest::FS_LIMIT);
    pub const GS_LIMIT: Rw = Rw(guest::GS_LIMIT);
    pub const LDTR_LIMIT: Rw = Rw(guest::LDTR_LIMIT);
    pub const TR_LIMIT: Rw = Rw(guest::TR_LIMIT);
    pub const GDTR_LIMIT: Rw = Rw(guest::GDTR_LIMIT);
    pub const IDTR_LIMIT: Rw = Rw(guest::IDTR_LIMIT);
    pub const ES_AR: Rw = Rw(guest::ES_ACCESS_RIGHTS);
    pub const CS_AR: Rw = Rw(guest::CS_ACCESS_RIGHTS);
    pub const SS_AR: Rw = Rw(guest::SS_ACCESS_RIGHTS);
    pub const DS_AR: Rw = Rw(guest::DS_ACCESS_RIGHTS);
    pub const FS_AR: Rw = Rw(guest::FS_ACCESS_RIGHTS);
    pub const GS_AR: Rw = Rw(guest::GS_ACCESS_RIGHTS);
    pub const LDTR_AR: Rw = Rw(guest::LDTR_ACCESS_RIGHTS);
    pub const TR_AR: Rw = Rw(guest::TR_ACCESS_RIGHTS);
    pub const INTERRUPTIBILITY: Rw = Rw(guest::INTERRUPTIBILITY_STATE);
    pub const ACTIVITY: Rw = Rw(guest::ACTIVITY_STATE);
    pub const PREEMPTION_TIMER: Rw = Rw(guest::VMX_PREEMPTION_TIMER_VALUE);
    pub const CR0: Rw = Rw(guest::CR0);
    pub const CR3: Rw = Rw(guest::CR3);
    pub const CR4: Rw = Rw(guest::CR4);
    pub const ES_BASE: Rw = Rw(guest::ES_BASE);
    pub const CS_BASE: Rw = Rw(guest::CS_BASE);
    pub const SS_BASE: Rw = Rw(guest::SS_BASE);
    pub const DS_BASE: Rw = Rw(guest::DS_BASE);
    pub const FS_BASE: Rw = Rw(guest::FS_BASE);
    pub const GS_BASE: Rw = Rw(guest::GS_BASE);
    pub const LDTR_BASE: Rw = Rw(guest::LDTR_BASE);
    pub const TR_BASE: Rw = Rw(guest::TR_BASE);
    pub const GDTR_BASE: Rw = Rw(guest::GDTR_BASE);
    pub const IDTR_BASE: Rw = Rw(guest::IDTR_BASE);
    pub const DR7: Rw = Rw(guest::DR7);
    pub const RSP: Rw = Rw(guest::RSP);
    pub const RIP: Rw = Rw(guest::RIP);
    pub const RFLAGS: Rw = Rw(guest::RFLAGS);
    pub const PENDING_DBG: Rw = Rw(guest::PENDING_DBG_EXCEPTIONS);
    pub const SYSENTER_CS: Rw = Rw(guest::IA32_SYSENTER_CS);
    pub const SYSENTER_ESP: Rw = Rw(guest::IA32_SYSENTER_ESP);
    pub const SYSENTER_EIP: Rw = Rw(guest::IA32_SYSENTER_EIP);
}

pub mod h {
    use super::*;
    pub const ES_SEL: Rw = Rw(host::ES_SELECTOR);
    pub const CS_SEL: Rw = Rw(host::CS_SELECTOR);
    pub const SS_SEL: Rw = Rw(host::SS_SELECTOR);
    pub const DS_SEL: Rw = Rw(host::DS_SELECTOR);
    pub const FS_SEL: Rw = Rw(host::FS_SELECTOR);
    pub const GS_SEL: Rw = Rw(host::GS_SELECTOR);
    pub const TR_SEL: Rw = Rw(host::TR_SELECTOR);
    pub const EFER: Rw = Rw(host::IA32_EFER_FULL);
    pub const PAT: Rw = Rw(host::IA32_PAT_FULL);
    pub const SYSENTER_CS: Rw = Rw(host::IA32_SYSENTER_CS);
    pub const CR0: Rw = Rw(host::CR0);
    pub const CR3: Rw = Rw(host::CR3);
    pub const CR4: Rw = Rw(host::CR4);
    pub const FS_BASE: Rw = Rw(host::FS_BASE);
    pub const GS_BASE: Rw = Rw(host::GS_BASE);
    pub const TR_BASE: Rw = Rw(host::TR_BASE);
    pub const GDTR_BASE: Rw = Rw(host::GDTR_BASE);
    pub const IDTR_BASE: Rw = Rw(host::IDTR_BASE);
    pub const SYSENTER_ESP: Rw = Rw(host::IA32_SYSENTER_ESP);
    pub const SYSENTER_EIP: Rw = Rw(host::IA32_SYSENTER_EIP);
    pub const RIP: Rw = Rw(host::RIP);
}

pub mod exit {
    use super::*;
    pub const GUEST_PHYSICAL: Ro = Ro(ro::GUEST_PHYSICAL_ADDR_FULL);
    pub const INSTRUCTION_ERROR: Ro = Ro(ro::VM_INSTRUCTION_ERROR);
    pub const REASON: Ro = Ro(ro::EXIT_REASON);
    pub const INTR_INFO: Ro = Ro(ro::VMEXIT_INTERRUPTION_INFO);
    pub const IDT_VECTORING_INFO: Ro = Ro(ro::IDT_VECTORING_INFO);
    pub const IDT_VECTORING_ERR: Ro = Ro(ro::IDT_VECTORING_ERR_CODE);
    pub const INSTRUCTION_LEN: Ro = Ro(ro::VMEXIT_INSTRUCTION_LEN);
    pub const QUALIFICATION: Ro = Ro(ro::EXIT_QUALIFICATION);
}
