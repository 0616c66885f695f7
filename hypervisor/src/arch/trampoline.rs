// SPDX-License-Identifier: MIT OR Apache-2.0
//! The application processors' way from real mode to long mode.
//!
//! Its first instructions turn the caches on and reset IA32_PAT (an AP comes out of INIT
//! with CR0.CD = CR0.NW = 1); `arch::caches_on` explains the order.
//!
//! A STARTUP IPI starts an AP in real mode at `vector << 12`, so the code must sit below
//! 1 MiB at a page boundary. It is assembled inside the image (section `.ap_trampoline`,
//! never executed in place) and copied to [`BASE`]; all its absolute addresses are written
//! as `BASE + (label - start)`, constants the assembler resolves.
//!
//! The bootstrap processor starts one AP at a time, so one copy with one parameter block
//! suffices: before each SIPI it writes the CR3 (the boot page tables, below 4 GiB), the
//! AP's stack top, the 64-bit entry point and its argument into the block at the end.
//!
//! **A late AP never takes another's block.** An AP may reach the trampoline after the BSP
//! gave up on it and wrote the next AP's block (a starved vCPU under an emulator; on
//! hardware, an AP slow out of INIT): it would run as that AP, on its stack. So the block
//! carries a claim word, [`open`] for one APIC ID: before it touches the block's stack the
//! AP reads its own APIC ID from its local APIC (the x2APIC ID MSR in x2APIC mode, else
//! the xAPIC ID register; not CPUID's initial ID, which firmware may have made differ) and
//! swaps the word from `open(its id)` to [`TAKEN`] with `lock
//! cmpxchg`; it reads the block, then stores [`FREE`]. An AP whose swap fails (the block
//! is another's, or the BSP withdrew it) parks at once without a stack (`cli; hlt`). The
//! BSP withdraws a block by swapping `open(id)` to `FREE` itself; if the AP won the swap,
//! the BSP waits for `FREE` before writing the next block ([`claim_word`]).

/// Physical address of the trampoline page; SIPI vector [`SIPI_VECTOR`].
pub const BASE: u64 = 0x8000;
/// The STARTUP IPI vector that makes an AP start at [`BASE`].
pub const SIPI_VECTOR: u8 = (BASE >> 12) as u8;

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .ap_trampoline, "a"
    .global ap_trampoline_start, ap_trampoline_end, ap_tramp_params
    .code16
ap_trampoline_start:
    cli
    cld
    # Caches on, PAT at its power-on value, before anything else (see arch::caches_on,
    # SDM Vol. 3A 11.11.8 / 11.12.4 / Table 11-5). An AP leaves INIT with CR0.CD = NW = 1.
    wbinvd
    movl $0x277, %ecx                                  # IA32_PAT
    movl $0x00070406, %eax
    movl $0x00070406, %edx
    wrmsr
    movl %cr0, %eax
    andl $0x9fffffff, %eax                             # clear CR0.CD (30) and CR0.NW (29)
    movl %eax, %cr0
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl 0x8000 + ap_gdt_ptr - ap_trampoline_start
    movl %cr0, %eax
    orl $1, %eax                                       # CR0.PE
    movl %eax, %cr0
    ljmpl $0x18, $(0x8000 + ap_pm32 - ap_trampoline_start)

    .code32
ap_pm32:
    movw $0x20, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x20, %eax                                    # CR4.PAE
    movl %eax, %cr4
    movl 0x8000 + ap_tramp_params - ap_trampoline_start, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx                             # IA32_EFER.LME
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80010000, %eax                              # CR0.PG | CR0.WP
    movl %eax, %cr0
    ljmp $0x08, $(0x8000 + ap_lm64 - ap_trampoline_start)

    .code64
ap_lm64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    # This AP's APIC ID in %edi (no stack yet), as its local APIC has it: the ID the
    # MADT lists and the SIPI was matched against (CPUID's initial ID may differ where
    # firmware rewrote the register). IA32_APIC_BASE.EXTD set: the x2APIC ID (MSR 0x802);
    # else bits 31:24 of the xAPIC ID register (MMIO base + 0x20, mapped uncached in the
    # boot tables' last GiB). A base above 4 GiB is not mapped there: park.
    movl $0x1b, %ecx                                   # IA32_APIC_BASE
    rdmsr
    btl $10, %eax                                      # EXTD
    jnc 3f
    movl $0x802, %ecx                                  # x2APIC ID
    rdmsr
    movl %eax, %edi
    jmp 2f
3:  testl %edx, %edx
    jnz 1f
    andl $0xfffff000, %eax
    movl 0x20(%rax), %edi
    shrl $24, %edi
2:
    # Claim the block: open(id) = id | 1 << 32 -> TAKEN (3 << 32), else park.
    movl %edi, %eax
    btsq $32, %rax
    movabsq ${taken}, %rcx
    lock cmpxchgq %rcx, 0x8000 + ap_tramp_params - ap_trampoline_start + 32
    jne 1f
    movq 0x8000 + ap_tramp_params - ap_trampoline_start + 8, %rsp
    movq 0x8000 + ap_tramp_params - ap_trampoline_start + 24, %rdi
    movq 0x8000 + ap_tramp_params - ap_trampoline_start + 16, %rax
    # Read: the block is the BSP's again (FREE = 0; a store after the loads, TSO).
    movq $0, 0x8000 + ap_tramp_params - ap_trampoline_start + 32
    xorl %ebp, %ebp
    callq *%rax
1:  cli
    hlt
    jmp 1b

    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00af9a000000ffff                           # 0x08: 64-bit code
    .quad 0x00cf92000000ffff                           # 0x10: data
    .quad 0x00cf9a000000ffff                           # 0x18: 32-bit code
    .quad 0x00cf92000000ffff                           # 0x20: 32-bit data
ap_gdt_end:
ap_gdt_ptr:
    .short ap_gdt_end - ap_gdt - 1
    .long 0x8000 + ap_gdt - ap_trampoline_start
    .balign 8
ap_tramp_params:                                       # struct Params, written by the BSP
    .quad 0, 0, 0, 0, 0
ap_trampoline_end:
"#,
    taken = const TAKEN,
    options(att_syntax)
);

/// The parameter block at `ap_tramp_params`; its layout is fixed by the assembly above.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Page-table root for the AP (must be below 4 GiB: loaded in 32-bit mode).
    pub cr3: u64,
    /// Initial stack pointer (16-byte aligned top of the AP's stack).
    pub stack_top: u64,
    /// `extern "C" fn(arg: u64) -> !` to call in long mode.
    pub entry: u64,
    /// Argument passed in RDI.
    pub arg: u64,
    /// The claim word: [`FREE`] when written; opened for one AP by [`claim_word`].
    pub claim: u64,
}
const _: () = assert!(core::mem::size_of::<Params>() == 40);
// The assembly reads the claim word at offset 32.
const _: () = assert!(core::mem::offset_of!(Params, claim) == 32);

/// The claim word of a block nobody may take (written so, or read, or withdrawn).
pub const FREE: u64 = 0;
/// The claim word while an AP reads the block.
pub const TAKEN: u64 = 3 << 32;

/// The claim word that lets the AP with initial APIC ID `apic_id` (and no other) take the
/// block.
pub const fn open(apic_id: u32) -> u64 {
    1 << 32 | apic_id as u64
}

#[cfg(target_os = "none")]
mod install {
    use super::{Params, BASE};

    extern "C" {
        static ap_trampoline_start: u8;
        static ap_trampoline_end: u8;
        static ap_tramp_params: u8;
    }

    fn bounds() -> (usize, usize, usize) {
        // Only the addresses of the linker symbols are taken, never their contents.
        (
            core::ptr::addr_of!(ap_trampoline_start) as usize,
            core::ptr::addr_of!(ap_trampoline_end) as usize,
            core::ptr::addr_of!(ap_tramp_params) as usize,
        )
    }

    /// The trampoline's code and CR3 are in the page: later blocks change only the rest.
    static COPIED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

    /// Fills the parameter block, the first time after copying the trampoline to [`BASE`].
    /// Afterwards only the stack, entry and argument are written: a late AP may still be
    /// running the code or about to load CR3 from the block (its claim then fails), so
    /// neither ever changes under it. The claim word is left [`super::FREE`].
    ///
    /// # Safety
    /// The page at [`BASE`] is usable RAM that nothing else uses, identity-mapped, and no AP
    /// holds the block (its claim word is free); `params.cr3` is the same at every call.
    pub unsafe fn install(params: Params) {
        use core::sync::atomic::Ordering::{Acquire, Release};
        let (start, end, params_at) = bounds();
        let slot = (BASE as usize + (params_at - start)) as *mut Params;
        if !COPIED.load(Acquire) {
            let len = end - start;
            assert!(len <= 4096, "AP trampoline larger than a page");
            let dst = BASE as *mut u8;
            // SAFETY: the caller guarantees the page is ours; `len` fits in it (checked above).
            unsafe { core::ptr::copy_nonoverlapping(start as *const u8, dst, len) };
            let params = Params { claim: super::FREE, ..params };
            // Volatile because the only reader is another processor running the copied code.
            // SAFETY: the block lies in the copied page, 8-byte aligned by `.balign 8`.
            unsafe { core::ptr::write_volatile(slot, params) };
            COPIED.store(true, Release);
            return;
        }
        // SAFETY: as above; each field 8-byte aligned, the claim word (not written) free.
        unsafe {
            core::ptr::write_volatile(&raw mut (*slot).stack_top, params.stack_top);
            core::ptr::write_volatile(&raw mut (*slot).entry, params.entry);
            core::ptr::write_volatile(&raw mut (*slot).arg, params.arg);
        }
    }

    /// The block's claim word, shared with the AP running the copied code (`lock cmpxchg`).
    ///
    /// # Safety
    /// [`install`] has run (the page is the trampoline's, identity-mapped).
    pub unsafe fn claim_word() -> &'static core::sync::atomic::AtomicU64 {
        let (start, _, params_at) = bounds();
        let at = BASE as usize + (params_at - start) + core::mem::offset_of!(Params, claim);
        // The AP writes it only with `lock cmpxchg` or a plain aligned store (atomic on x86).
        // SAFETY: 8-byte aligned inside the installed page, the trampoline's for the boot.
        unsafe { &*(at as *const core::sync::atomic::AtomicU64) }
    }
}
#[cfg(target_os = "none")]
pub use install::{claim_word, install};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_block_is_never_free_or_taken_and_names_one_apic_id() {
        for id in [0, 1, 2, 63, 255, 256, 0xffff_fffe, u32::MAX] {
            assert_ne!(open(id), FREE);
            assert_ne!(open(id), TAKEN);
            assert_eq!(open(id) as u32, id);
        }
        assert_ne!(open(0), open(1));
    }
}
