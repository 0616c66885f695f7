// SPDX-License-Identifier: MIT OR Apache-2.0
//! Multiboot2 header and the bootstrap processor's way from 32-bit protected mode (as GRUB
//! leaves it: paging off, flat segments, EAX = magic, EBX = information address) to long
//! mode and [`crate::hv_entry_bsp`].
//!
//! A processor without long mode is refused here, in 32-bit code, the way the 64-bit
//! feature probe refuses a missing VMX feature: one line, the `refused` and `end` records
//! (see `vmcall_proto::record`), written to COM1 byte by byte once the transmitter is empty,
//! then the emulators' exit ports (`vmcall_proto::platform`).
//!
//! Its first instructions turn the caches on (CR0.CD = CR0.NW = 0) and reset IA32_PAT, as
//! `arch::caches_on` describes: the reset value of CR0 has both cache bits set, and the
//! hypervisor never relies on firmware having cleared them.
//!
//! The boot page tables identity-map the first 4 GiB with 2-MiB pages; the last GiB (local
//! APIC, I/O APIC, other MMIO) is mapped uncached. Every core, the APs included, runs on
//! these tables: the hypervisor's own address space is identity.

core::arch::global_asm!(
    r##"
    .section .multiboot2_header, "a"
    .balign 8
mb2_header_start:
    .long 0xe85250d6                                   # multiboot2 magic
    .long 0                                            # architecture: i386 protected mode
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - (0xe85250d6 + 0 + (mb2_header_end - mb2_header_start))
    .balign 8
    .short 0, 0                                        # end tag
    .long 8
mb2_header_end:

    .section .bss.boot_tables, "aw", @nobits
    .balign 4096
    .global boot_pml4
boot_pml4:  .skip 4096
boot_pdpt:  .skip 4096
boot_pd:    .skip 4096 * 4
    .balign 16
boot_stack_bottom:
    .skip 262144
boot_stack_top:

    .section .rodata
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff                           # 0x08: 64-bit code
    .quad 0x00cf92000000ffff                           # 0x10: data
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt
    # The refusal, as the 64-bit probe words it (main.rs), then the records of
    # vmcall_proto::record: `refused` with what is missing, `end` with outcome=refused.
no_long_mode_msg:
    .ascii "mkvisor needs long mode (CPUID.80000001H:EDX.LM[bit 29] is 0); "
    .ascii "this machine lacks it. Nothing started.\r\n"
    .ascii "#mkv refused missing=\"long mode (CPUID.80000001H:EDX.LM[bit 29] is 0)\"\r\n"
    .asciz "#mkv end outcome=refused\r\n"

    .section .text.boot, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    movl %eax, %edi                                    # multiboot2 magic
    movl %ebx, %esi                                    # multiboot2 information address

    # Caches on, PAT at its power-on value, before anything else (see arch::caches_on,
    # SDM Vol. 3A 11.11.8 / 11.12.4 / Table 11-5). Paging is off: no TLB entry to flush.
    wbinvd
    movl $0x277, %ecx                                  # IA32_PAT
    movl $0x00070406, %eax
    movl $0x00070406, %edx
    wrmsr
    movl %cr0, %eax
    andl $0x9fffffff, %eax                             # clear CR0.CD (30) and CR0.NW (29)
    movl %eax, %cr0

    movl $boot_stack_top, %esp

    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb 9f
    movl $0x80000001, %eax
    cpuid
    btl $29, %edx                                      # CPUID.80000001H:EDX.LM
    jnc 9f

    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4
    movl $boot_pd, %eax
    orl $0x3, %eax
    movl %eax, boot_pdpt
    addl $4096, %eax
    movl %eax, boot_pdpt + 8
    addl $4096, %eax
    movl %eax, boot_pdpt + 16
    addl $4096, %eax
    movl %eax, boot_pdpt + 24

    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax                                    # present, writable, 2-MiB page
    cmpl $1536, %ecx
    jb 2f
    orl $0x18, %eax                                    # 4th GiB: PCD|PWT (MMIO)
2:  movl %eax, boot_pd(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 1b

    movl %cr4, %eax
    orl $0x20, %eax                                    # CR4.PAE
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx                             # IA32_EFER
    rdmsr
    orl $0x100, %eax                                   # EFER.LME
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax                              # CR0.PG | CR0.WP | CR0.PE
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $3f

    # No long mode: say so on COM1 (waiting for the transmitter before every byte, or the
    # UART drops what it cannot hold), then leave the emulator as power::end_run does.
9:  movl $no_long_mode_msg, %esi
4:  movw ${com1} + 5, %dx                              # line status register
7:  inb %dx, %al
    testb $0x20, %al                                   # THR empty
    jz 7b
    lodsb
    testb %al, %al
    jz 5f
    movw ${com1}, %dx
    outb %al, %dx
    jmp 4b
5:  movw ${qemu_exit}, %dx
    movl ${refused}, %eax
    outl %eax, %dx
    movl ${magic}, %esi
    movl ${magic_len}, %ecx
    movw ${bochs_port}, %dx
8:  lodsb
    outb %al, %dx
    loop 8b
10: cli
    hlt
    jmp 10b

    .code64
3:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movl %edi, %edi                                    # upper halves are undefined after
    movl %esi, %esi                                    # the switch: zero-extend both
    movq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    call hv_entry_bsp
6:  cli
    hlt
    jmp 6b
"##,
    com1 = const COM1_PORT,
    qemu_exit = const QEMU_DEBUG_EXIT_PORT,
    refused = const ExitCode::Refused as u32,
    bochs_port = const BOCHS_SHUTDOWN_PORT,
    magic = sym BOCHS_MAGIC,
    magic_len = const BOCHS_SHUTDOWN_MAGIC.len(),
    options(att_syntax)
);

use vmcall_proto::platform::{
    ExitCode, BOCHS_SHUTDOWN_MAGIC, BOCHS_SHUTDOWN_PORT, COM1_PORT, QEMU_DEBUG_EXIT_PORT,
};

/// [`BOCHS_SHUTDOWN_MAGIC`] where the 32-bit refusal path can read it.
static BOCHS_MAGIC: [u8; BOCHS_SHUTDOWN_MAGIC.len()] = {
    let mut out = [0; BOCHS_SHUTDOWN_MAGIC.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = BOCHS_SHUTDOWN_MAGIC[i];
        i += 1;
    }
    out
};
