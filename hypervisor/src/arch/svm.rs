// SPDX-License-Identifier: MIT OR Apache-2.0
//! SVM instructions and the world switch into a guest and back (AMD APM Vol. 2 15.5
//! "VMRUN Instruction", 15.6 "#VMEXIT", 15.5.2 VMSAVE/VMLOAD, 15.17 GIF).
//!
//! [`run`] clears GIF, saves the host's VMSAVE state (FS, GS, TR, LDTR with their hidden
//! parts, KernelGsBase, STAR/LSTAR/CSTAR/SFMASK, SYSENTER) to a per-core page, loads the
//! guest's with VMLOAD, loads the guest's general-purpose registers from [`GuestRegs`]
//! (all but RAX, which the VMCB holds) and executes VMRUN. At #VMEXIT the processor has
//! restored the host's RSP, RAX (the VMCB address), segments and control registers from the
//! host save area (VM_HSAVE_PA); the assembly stores the guest's registers, VMSAVEs the
//! guest's state, VMLOADs the host's and sets GIF again.

pub use super::vmx::GuestRegs;

/// The MSR that holds the host save area's physical address (APM 15.30.4).
pub const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .text
    .global svm_run_asm
# Loads the guest's registers (all but RAX, which the VMCB holds) from `regs` (in rdi),
# rdi last.
.macro mkv_svm_load_guest
    mov rbx, [rdi + 8]
    mov rcx, [rdi + 16]
    mov rdx, [rdi + 24]
    mov rsi, [rdi + 32]
    mov rbp, [rdi + 48]
    mov r8,  [rdi + 56]
    mov r9,  [rdi + 64]
    mov r10, [rdi + 72]
    mov r11, [rdi + 80]
    mov r12, [rdi + 88]
    mov r13, [rdi + 96]
    mov r14, [rdi + 104]
    mov r15, [rdi + 112]
    mov rdi, [rdi + 40]
.endm
# u64 svm_run_asm(GuestRegs *regs /* rdi */, u64 vmcb_pa /* rsi */, u64 host_save_pa /* rdx */,
#                 u64 flags /* rcx */, void *fast /* r8 */)
# Frame after the pushes: [rsp] vmcb_pa, [rsp + 8] host_save_pa, [rsp + 16] regs,
# [rsp + 24] fast, [rsp + 32] padding (the landing's call needs RSP 16-byte aligned), then
# the callee-saved registers. Returns 1 when the guest ran, 0 when a kick was pending after
# CLGI (gs:[24], PerCore::kicked) and it did not. After a CPUID or VMMCALL exit, with `fast`
# not null, the landing calls mkv_svm_fast_exit(fast) with the host's state loaded and GIF
# still clear, which may answer it: then the guest is entered again from here (a kick's
# NMI, the run timer's or a doorbell's interrupt that came meanwhile is held by GIF and
# exits the guest at once, the NMI and INTR intercepts being on).
svm_run_asm:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    sub rsp, 8
    push r8
    push rdi
    push rdx
    push rsi
    clgi
    test ecx, 2                             # flags bit 1: look at the kick flag
    jz 2f
    cmp qword ptr gs:[24], 0
    jne 9f
2:  test ecx, 1                             # flags bit 0: host interrupts on in the guest
    jz 1f
    sti                                     # held by GIF = 0 until the guest runs
1:  mov rax, rdx
    vmsave                                  # host's FS/GS/TR/LDTR/... to its page
3:  mov rax, [rsp]
    vmload                                  # the guest's, from its VMCB
    mov rdi, [rsp + 16]
    mkv_svm_load_guest
    vmrun                                   # rax = VMCB; back here at #VMEXIT, rax restored
    .global svm_vmexit_landing              # (arch::idt's #DB stub knows this address)
svm_vmexit_landing:
    vmsave                                  # the guest's FS/GS/... into its VMCB
    push rdi
    mov rdi, [rsp + 24]                     # regs
    mov [rdi + 8], rbx
    mov [rdi + 16], rcx
    mov [rdi + 24], rdx
    mov [rdi + 32], rsi
    mov [rdi + 48], rbp
    mov [rdi + 56], r8
    mov [rdi + 64], r9
    mov [rdi + 72], r10
    mov [rdi + 80], r11
    mov [rdi + 88], r12
    mov [rdi + 96], r13
    mov [rdi + 104], r14
    mov [rdi + 112], r15
    pop rax
    mov [rdi + 40], rax
    mov rax, [rsp + 8]
    vmload                                  # the host's segments and MSRs back
    mov rdi, [rsp + 24]                     # the fast path, if armed for this run
    test rdi, rdi
    jz 4f
    mov rax, [rsp]
    mov rax, [rax + 0x70]                   # EXITCODE: CPUID (0x72) or VMMCALL (0x81)?
    cmp eax, 0x72
    je 5f
    cmp eax, 0x81
    jne 4f
5:  call mkv_svm_fast_exit                  # fastexit: answered here?
    test eax, eax
    jnz 3b                                  # the host's VMSAVE state is still in its page
4:  stgi                                    # a held interrupt or NMI is taken here
    cli
    mov eax, 1
    jmp 8f
9:  stgi
    xor eax, eax
8:  add rsp, 40
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
"#
);

#[cfg(target_os = "none")]
extern "C" {
    /// The SVM backend's kick hook (`vcpu::Vcpu::KICK_HOOK` of `svm::vcpu::SvmVcpu`),
    /// called by the NMI handler (`arch::idt`) for a kick taken in the hypervisor while a
    /// guest VMCB is live: nothing to do, it returns at once. There is no VMCS timer to
    /// zero; the NMI handler's mark (`PerCore::kicked`, gs:[24]) is what [`run`] looks at
    /// after CLGI, and it does not enter ([`RUN_KICKS`]). Preserves every register.
    pub fn svm_kick_hook();
}

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .text
    .global svm_kick_hook
svm_kick_hook:
    ret
"#
);

/// [`run`]'s flags: host interrupts are on while the guest runs (so that, with the INTR
/// intercept and V_INTR_MASKING, any physical interrupt exits, and is taken by the host's
/// IDT at the STGI after the exit: the run timer's).
pub const RUN_INTERRUPTS: u64 = 1;
/// [`run`]'s flags: do not enter if this core took a kick (`PerCore::kicked` set) before
/// CLGI; one after CLGI is held and exits the guest at once (NMI intercept).
pub const RUN_KICKS: u64 = 2;

/// Runs the guest of the VMCB at `vmcb_pa` until its next #VMEXIT that the fast path (if
/// `fast` is not null) does not answer; the exit code and information are then in the
/// VMCB, the guest's registers (but RAX) in `regs`. Returns false if it did not enter (a
/// kick pending, with [`RUN_KICKS`]).
///
/// # Safety
/// SVM is on for this core (EFER.SVME, VM_HSAVE_PA set); `vmcb_pa` is a VMCB this core owns,
/// fully set up (intercepts including VMRUN, ASID not 0, nested paging isolating the guest);
/// `host_save_pa` is a 4-KiB page this core owns for VMSAVE; `regs` is valid and unused
/// elsewhere until this returns; with [`RUN_INTERRUPTS`], every vector that can be raised on
/// this core has a handler in its IDT; GS points at this core's `PerCore`; `fast` is null
/// or what `svm::vcpu::mkv_svm_fast_exit` takes, valid and unused elsewhere until this
/// returns.
#[cfg(target_os = "none")]
pub unsafe fn run(
    regs: *mut GuestRegs,
    vmcb_pa: u64,
    host_save_pa: u64,
    flags: u64,
    fast: *mut core::ffi::c_void,
) -> bool {
    extern "C" {
        fn svm_run_asm(
            regs: *mut GuestRegs,
            vmcb_pa: u64,
            host_save_pa: u64,
            flags: u64,
            fast: *mut core::ffi::c_void,
        ) -> u64;
    }
    // The assembly preserves every callee-saved register and returns on this stack.
    // SAFETY: the caller guarantees the VMCB, the pages and the pointers.
    unsafe { svm_run_asm(regs, vmcb_pa, host_save_pa, flags, fast) != 0 }
}
