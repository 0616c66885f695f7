// SPDX-License-Identifier: MIT OR Apache-2.0
//! VMX instructions on the current VMCS, and the world switch into a guest and back.
//!
//! [`run`] saves the host's callee-saved registers, records the host RSP in the VMCS, loads
//! the guest's general-purpose registers from [`GuestRegs`] and executes VMLAUNCH or
//! VMRESUME. A VM exit lands at `vmx_exit_landing` (the VMCS host RIP) on that same stack:
//! the guest registers are stored back and `run` returns. RSP, RIP and RFLAGS of the guest
//! live in the VMCS, not here.

use x86::vmx::VmFail;

/// Guest general-purpose registers while the guest is not running. Field order is the
/// assembly's: do not reorder.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}
const _: () = assert!(core::mem::size_of::<GuestRegs>() == 15 * 8);

/// Makes the VMCS at `pa` current (SDM Vol. 3C 25.11.3).
///
/// # Safety
/// `pa` is a VMCS region owned by this core, prepared with the revision id; VMX is on.
pub unsafe fn vmptrld(pa: u64) -> Result<(), VmFail> {
    // SAFETY: the caller guarantees the region.
    unsafe { x86::bits64::vmx::vmptrld(pa) }
}

/// Clears the VMCS at `pa` (launch state clear, data flushed to memory).
///
/// # Safety
/// As for [`vmptrld`].
pub unsafe fn vmclear(pa: u64) -> Result<(), VmFail> {
    // SAFETY: the caller guarantees the region.
    unsafe { x86::bits64::vmx::vmclear(pa) }
}

/// Reads a field of the current VMCS, 0 if the read fails (VMREAD leaves its destination
/// unchanged on failure, SDM Vol. 3C 31.3): two instructions, for the exit path.
///
/// # Safety
/// A VMCS is current on this core.
#[inline(always)]
pub unsafe fn vmread_or_zero(field: u32) -> u64 {
    let mut value: u64 = 0;
    // SAFETY: the caller guarantees a current VMCS; VMREAD has no memory side effects.
    unsafe {
        core::arch::asm!("vmread {v}, {f}", f = in(reg) field as u64, v = inout(reg) value,
            options(nostack, readonly))
    };
    value
}

/// Reads a field of the current VMCS, without looking at the outcome (the fast exit path:
/// the VMCS is current and the field one it has, so the read cannot fail).
///
/// # Safety
/// As for [`vmread_or_zero`], and the read must not be able to fail.
#[inline(always)]
pub unsafe fn vmread_unchecked(field: u32) -> u64 {
    let value: u64;
    // VMREAD has no memory side effects.
    // SAFETY: the caller guarantees a current VMCS and a field it has.
    unsafe {
        core::arch::asm!("vmread {v}, {f}", f = in(reg) field as u64, v = lateout(reg) value,
            options(nostack, readonly))
    };
    value
}

/// Writes a field of the current VMCS, without looking at the outcome (a field the VMCS
/// has, on the exit path: the write cannot fail once the VMCS is current).
///
/// # Safety
/// As for [`vmwrite`].
#[inline(always)]
pub unsafe fn vmwrite_unchecked(field: u32, value: u64) {
    // SAFETY: the caller guarantees a current VMCS and a safe value.
    unsafe {
        core::arch::asm!("vmwrite {f}, {v}", f = in(reg) field as u64, v = in(reg) value,
            options(nostack))
    };
}

/// The VMX instruction outcome of CF and ZF (SDM Vol. 3C 31.2).
#[inline(always)]
fn vm_result(cf: u8, zf: u8) -> Result<(), VmFail> {
    match (cf, zf) {
        (0, 0) => Ok(()),
        (0, _) => Err(VmFail::VmFailValid),
        _ => Err(VmFail::VmFailInvalid),
    }
}

/// Writes a field of the current VMCS.
///
/// # Safety
/// A VMCS is current on this core, and the value keeps the guest contained (the caller
/// validates anything that came from the guest).
#[inline(always)]
pub unsafe fn vmwrite(field: u32, value: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: the caller guarantees a current VMCS and a safe value.
    unsafe {
        core::arch::asm!("vmwrite {f}, {v}", "setc {c}", "setz {z}", f = in(reg) field as u64,
            v = in(reg) value, c = lateout(reg_byte) cf, z = lateout(reg_byte) zf,
            options(nostack))
    };
    vm_result(cf, zf)
}

/// INVEPT single-context (type 1) for `eptp` (SDM Vol. 3C 29.4.3.1).
///
/// # Safety
/// VMX is on; `eptp` is an EPTP this core uses or used.
pub unsafe fn invept_single(eptp: u64) {
    let desc: [u64; 2] = [eptp, 0];
    // INVEPT only drops cached translations.
    // SAFETY: the descriptor is valid for the instruction's duration.
    unsafe {
        core::arch::asm!("invept {}, [{}]", in(reg) 1u64, in(reg) &desc, options(nostack));
    }
}

/// INVVPID single-context (type 1) for `vpid`.
///
/// # Safety
/// VMX is on; `vpid` is non-zero.
pub unsafe fn invvpid_single(vpid: u16) {
    let desc: [u64; 2] = [vpid as u64, 0];
    // SAFETY: as for invept_single.
    unsafe {
        core::arch::asm!("invvpid {}, [{}]", in(reg) 1u64, in(reg) &desc, options(nostack));
    }
}

#[cfg(target_os = "none")]
extern "C" {
    /// The VMX backend's kick hook (`vcpu::Vcpu::KICK_HOOK` of `vmx::vcpu::VmxVcpu`),
    /// called by the NMI handler (`arch::idt`) for a kick taken in the hypervisor while a
    /// guest VMCS is current: zeroes that VMCS's VMX-preemption timer (field 0x482E), so
    /// the next VM entry exits before the guest runs an instruction (SDM Vol. 3C
    /// 26.7.4) and the run loop reads its inbox. Preserves every register but RFLAGS
    /// (which VMWRITE changes and the handler's IRETQ restores).
    pub fn vmx_kick_hook();
}

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .text
    .global vmx_kick_hook
vmx_kick_hook:
    push rax
    push rcx
    mov eax, 0x482e
    xor ecx, ecx
    vmwrite rax, rcx
    pop rcx
    pop rax
    ret
"#
);

/// The host RIP to put in the VMCS: where every VM exit on this design lands.
pub fn exit_landing() -> u64 {
    #[cfg(target_os = "none")]
    {
        extern "C" {
            static vmx_exit_landing: u8;
        }
        core::ptr::addr_of!(vmx_exit_landing) as u64
    }
    #[cfg(not(target_os = "none"))]
    0
}

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .text
    .global vmx_run_asm, vmx_exit_landing
# Loads the guest's registers from `regs` (in rax), rax last.
.macro mkv_load_guest
    mov rbx, [rax + 8]
    mov rcx, [rax + 16]
    mov rdx, [rax + 24]
    mov rsi, [rax + 32]
    mov rdi, [rax + 40]
    mov rbp, [rax + 48]
    mov r8,  [rax + 56]
    mov r9,  [rax + 64]
    mov r10, [rax + 72]
    mov r11, [rax + 80]
    mov r12, [rax + 88]
    mov r13, [rax + 96]
    mov r14, [rax + 104]
    mov r15, [rax + 112]
    mov rax, [rax]
.endm
# Drops the frame (after its `pop rdi`) and restores the callee-saved registers.
.macro mkv_unwind
    add rsp, 16
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
.endm
# u64 vmx_run_asm(GuestRegs *regs /* rdi */, u64 launched /* rsi */, void *fast /* rdx */)
# After a CPUID or VMCALL exit the landing calls mkv_fast_exit(regs, fast, reason), which
# may answer it: then the guest is resumed from here. Returns 0 after a VM exit left to the
# caller, 1 if VMLAUNCH/VMRESUME failed (RFLAGS.CF or ZF). Frame: [rsp] regs, [rsp + 8] fast, [rsp + 16] padding (the landing's
# call needs RSP 16-byte aligned), then the callee-saved registers.
vmx_run_asm:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    sub rsp, 8
    push rdx
    push rdi
    mov rax, 0x6c14                         # HOST_RSP
    vmwrite rax, rsp
    jc 8f
    jz 8f
    mov rax, rdi
    cmp rsi, 0
    jne 3f
    mkv_load_guest
    vmlaunch
    jmp 8f
3:  mkv_load_guest
    vmresume
8:  pop rdi                                 # VM entry failed: host state is intact
    mkv_unwind
    mov eax, 1
    ret

vmx_exit_landing:                           # RSP = HOST_RSP: the frame above
    push rax
    mov rax, [rsp + 8]
    mov [rax + 8], rbx
    mov [rax + 16], rcx
    mov [rax + 24], rdx
    mov [rax + 32], rsi
    mov [rax + 40], rdi
    mov [rax + 48], rbp
    mov [rax + 56], r8
    mov [rax + 64], r9
    mov [rax + 72], r10
    mov [rax + 80], r11
    mov [rax + 88], r12
    mov [rax + 96], r13
    mov [rax + 104], r14
    mov [rax + 112], r15
    pop rbx
    mov [rax], rbx
    mov edx, 0x4402                         # EXIT_REASON: CPUID (10) or VMCALL (18)?
    vmread rdx, rdx
    cmp edx, 10
    je 6f
    cmp edx, 18
    jne 7f
6:  mov rdi, rax
    mov rsi, [rsp + 8]
    call mkv_fast_exit                      # fastexit: answered here?
    test eax, eax
    jz 7f
    mov rax, [rsp]
    mkv_load_guest
    vmresume
    jmp 8b
7:  pop rdi
    mkv_unwind
    xor eax, eax
    ret
"#
);

/// Enters the guest of the current VMCS (VMLAUNCH the first time, VMRESUME after) and
/// returns at its next VM exit. `Err` if the entry itself failed (read the VM-instruction
/// error field).
///
/// # Safety
/// The current VMCS is fully set up for this core (host state of this core, guest state
/// valid, EPT isolating the guest); `launched` says whether VMLAUNCH already succeeded;
/// `regs` and `fast` (what `fastexit::mkv_fast_exit` takes, called by the landing) are
/// valid and not otherwise used until this returns.
#[cfg(target_os = "none")]
pub unsafe fn run(
    regs: *mut GuestRegs,
    launched: bool,
    fast: *mut core::ffi::c_void,
) -> Result<(), ()> {
    extern "C" {
        fn vmx_run_asm(regs: *mut GuestRegs, launched: u64, fast: *mut core::ffi::c_void) -> u64;
    }
    // The assembly preserves every callee-saved register and returns on this stack.
    // SAFETY: the caller guarantees the VMCS and the pointers.
    match unsafe { vmx_run_asm(regs, launched as u64, fast) } {
        0 => Ok(()),
        _ => Err(()),
    }
}
