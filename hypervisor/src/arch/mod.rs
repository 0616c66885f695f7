// SPDX-License-Identifier: MIT OR Apache-2.0
//! The x86-64 layer: every privileged-instruction wrapper and all assembly of the hypervisor.
//! The rest of the hypervisor is ordinary Rust that calls into here.
//!
//! Wrappers whose misuse can break memory safety or crash the machine are `unsafe fn` with
//! a `# Safety` section; those that cannot (reading the TSC, CPUID, pausing) are safe.

pub mod apic;
#[cfg(target_os = "none")]
mod boot;
pub mod gdt;
pub mod idt;
pub mod svm;
pub mod trampoline;
pub mod tsc;
pub mod vmx;

use core::arch::asm;

/// Reads a model-specific register.
///
/// # Safety
/// `msr` must exist on this processor (else #GP); the caller checked CPUID or the
/// architectural guarantee that covers it.
#[inline]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: the caller guarantees the MSR exists.
    unsafe { x86::msr::rdmsr(msr) }
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist and accept `value`; the write must not break an invariant the
/// hypervisor relies on (paging, segmentation, APIC state in use).
#[inline]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the MSR exists and the value is acceptable.
    unsafe { x86::msr::wrmsr(msr, value) }
}

/// Reads CR0.
pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effect; the hypervisor runs at CPL 0.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR0.
///
/// # Safety
/// The new value must keep protected mode, paging and every other mode the running code
/// depends on.
pub unsafe fn write_cr0(v: u64) {
    // SAFETY: the caller guarantees the value keeps the execution environment valid.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Reads CR3.
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Reads CR4.
pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effect.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR4.
///
/// # Safety
/// The new value must keep PAE (long mode) and anything else the running code depends on.
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: the caller guarantees the value keeps the execution environment valid.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// CR0.NW (not write-through) and CR0.CD (cache disable), SDM Vol. 3A 2.5, Table 11-5.
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
/// IA32_PAT's architectural power-on value (SDM Vol. 3A 11.12.4, Table 11-12): entries
/// WB, WT, UC-, UC, WB, WT, UC-, UC.
pub const PAT_POWER_ON: u64 = 0x0007_0406_0007_0406;

/// Turns this core's caches on in normal mode and resets its PAT, whatever firmware or an
/// earlier owner left (the reset value of CR0 has CD = NW = 1). The same steps, in the same
/// order, run in 32-bit assembly on the BSP's and the APs' first instructions
/// (`arch::boot`, `arch::trampoline`); this is the long-mode copy, run again before VMXON.
///
/// The order follows SDM Vol. 3A 11.11.8 ("MTRR considerations in MP systems"), which
/// 11.12.4 prescribes for changing the PAT: write back and invalidate the caches (WBINVD)
/// so no line cached under an old memory type survives, write IA32_PAT, flush the TLBs
/// (reloading CR3) so no translation carries an old PAT type, then clear CR0.CD and CR0.NW
/// together (Table 11-5: CD = 0, NW = 0 is normal cache mode; CD = 0 with NW = 1 is invalid,
/// 11.5.3 "Preventing caching" describes the reverse path).
///
/// # Safety
/// Paging is on with identity tables that stay valid across a CR3 reload; IA32_PAT exists
/// (every processor with VMX has it).
pub unsafe fn caches_on() {
    // SAFETY: WBINVD only writes back and drops cache lines; memory stays coherent.
    unsafe { asm!("wbinvd", options(nostack, preserves_flags)) };
    // SAFETY: the caller guarantees IA32_PAT exists; the power-on value is always valid.
    unsafe { wrmsr(x86::msr::IA32_PAT, PAT_POWER_ON) };
    let cr3 = read_cr3();
    // SAFETY: reloading the current CR3 keeps every mapping; it only flushes the TLBs.
    unsafe { asm!("mov cr3, {}", in(reg) cr3, options(nostack, preserves_flags)) };
    // SAFETY: only the cache-mode bits change; PE, PG, WP and the rest are kept.
    unsafe { write_cr0(read_cr0() & !(CR0_CD | CR0_NW)) };
}

/// This core's cache state: (CR0.CD, CR0.NW, IA32_PAT), for the boot log.
pub fn cache_state() -> (bool, bool, u64) {
    let cr0 = read_cr0();
    // SAFETY: IA32_PAT exists on every processor with VMX (the only ones that get this far).
    let pat = unsafe { rdmsr(x86::msr::IA32_PAT) };
    (cr0 & CR0_CD != 0, cr0 & CR0_NW != 0, pat)
}

/// Reads CR2, the faulting linear address of the last page fault.
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effect.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes one byte to an I/O port.
///
/// # Safety
/// The port's device must tolerate the write; some ports reset or power off the machine.
#[inline]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller guarantees the port write is acceptable.
    unsafe { x86::io::outb(port, value) }
}

/// Writes four bytes to an I/O port.
///
/// # Safety
/// As for [`outb`].
#[inline]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller guarantees the port write is acceptable.
    unsafe { x86::io::outl(port, value) }
}

/// Reads four bytes from an I/O port.
///
/// # Safety
/// As for [`inb`].
#[inline]
pub unsafe fn inl(port: u16) -> u32 {
    // SAFETY: the caller guarantees the port read is acceptable.
    unsafe { x86::io::inl(port) }
}

/// Reads one byte from an I/O port.
///
/// # Safety
/// Reads of some ports have side effects (they acknowledge or consume data).
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    // SAFETY: the caller guarantees the port read is acceptable.
    unsafe { x86::io::inb(port) }
}

/// The time-stamp counter. Inside Bochs with `clock: sync=none` it counts emulated
/// instructions, exactly.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed at CPL 0 and has no side effect.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Spin-loop hint.
#[inline]
pub fn pause() {
    core::hint::spin_loop();
}

/// Stops this core for good: interrupts off, halt forever. NMIs wake HLT, hence the loop.
pub fn park() -> ! {
    loop {
        // Callers report before parking, so nothing is left half-done.
        // SAFETY: CLI; HLT only stops this core.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// Runs the host NMI handler (`INT 2`). After a VM exit caused by an NMI the processor keeps
/// NMIs blocked until an IRET; the handler's IRET ends that, so later kicks get through
/// (KVM does the same).
pub fn unblock_nmis() {
    // SAFETY: vector 2's gate is the kick handler, which only returns (IRETQ).
    unsafe { asm!("int 2", options(nomem)) };
}

/// NMIs this core took while a guest vCPU was live (`PerCore::nmis`, counted by the NMI
/// handler): one load through GS, cheap enough for every VM entry.
#[inline(always)]
pub fn nmis_taken() -> u64 {
    let n: u64;
    // GS base points at this core's PerCore from its start (`percpu::init_this_core`), and
    // `nmis` is at offset 32 (asserted there).
    // SAFETY: an aligned load of this core's own counter.
    unsafe {
        asm!("mov {}, qword ptr gs:[32]", out(reg) n, options(nostack, readonly, preserves_flags))
    };
    n
}

/// Writes the GS base, which holds this core's [`crate::percpu`] pointer.
///
/// # Safety
/// `base` must point to this core's `PerCore` for the rest of its life.
pub unsafe fn write_gs_base(base: u64) {
    // SAFETY: IA32_GS_BASE exists on every x86-64 processor; the caller vouches for `base`.
    unsafe { wrmsr(x86::msr::IA32_GS_BASE, base) }
}

/// Reads the GS base.
pub fn read_gs_base() -> u64 {
    // SAFETY: IA32_GS_BASE exists on every x86-64 processor.
    unsafe { rdmsr(x86::msr::IA32_GS_BASE) }
}

/// Enters VMX operation (SDM Vol. 3C 24.7: VMXON, 24.11.5: VMXON region).
///
/// # Safety
/// `region` is the physical address of a 4-KiB-aligned, zeroed page owned by this core with
/// the VMCS revision id in its first dword; CR0/CR4 satisfy the VMX fixed bits and
/// CR4.VMXE is set; IA32_FEATURE_CONTROL allows VMXON outside SMX.
pub unsafe fn vmxon(region: u64) -> Result<(), x86::vmx::VmFail> {
    // SAFETY: the caller upholds the VMXON preconditions.
    unsafe { x86::bits64::vmx::vmxon(region) }
}

/// Puts XCR0 back to its reset value (x87 only), where the processor has XSAVE. For the SVM
/// backend, at every incarnation's setup: XSETBV exits by the SVM intercept, but not on
/// every implementation (QEMU 7.2's TCG has none), and XCR0 is not in the VMCB, so a
/// guest's XCR0 would otherwise stay on its core for the next incarnation. (VT-x: XSETBV
/// always exits, so XCR0 never leaves the reset value.)
///
/// # Safety
/// On this core, between guests, with interrupts off.
#[cfg(target_os = "none")]
pub unsafe fn reset_xcr0() {
    let r = raw_cpuid::native_cpuid::cpuid_count(1, 0);
    if r.ecx & 1 << 26 == 0 {
        return;
    }
    let cr4 = read_cr4();
    // CR4.OSXSAVE enables XSETBV for the write, then goes back as it was; XCR0 = 1 is
    // valid on every processor with XSAVE.
    // SAFETY: the caller's conditions and the above (the hypervisor uses no XSAVE state).
    unsafe {
        write_cr4(cr4 | 1 << 18);
        asm!("xsetbv", in("ecx") 0u32, in("eax") 1u32, in("edx") 0u32, options(nostack));
        write_cr4(cr4);
    }
}

/// Puts back to their reset values the registers a guest can change without a VM exit and
/// the VMCS does not hold, so that what one incarnation leaves on this core is not there
/// for the next (nor what the firmware left for the first): the MSRs guests reach directly
/// (STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE: `exits::MSR_PASSTHROUGH`), CR2, DR0-DR3,
/// DR6 and DR7, and the x87 and SSE registers (FNINIT, XMM0-15 zeroed, MXCSR 0x1F80).
/// SSE needs CR4.OSFXSR, set around the clearing and restored. AVX state cannot be dirty:
/// this hypervisor never enables XSAVE (XCR0 stays x87 only), so guests cannot use it
/// (on SVM, where an XSETBV might not exit, the backend resets XCR0: [`reset_xcr0`]).
///
/// # Safety
/// On this core, between guests (no guest state in these registers is wanted), with
/// CR0.EM and CR0.TS clear (as the boot code leaves them).
pub unsafe fn scrub_guest_registers(passthrough: &[u32]) {
    for &msr in passthrough {
        // SAFETY: architectural MSRs of every x86-64 processor; 0 is valid for each.
        unsafe { wrmsr(msr, 0) };
    }
    let mxcsr: u32 = 0x1f80;
    // The values are the reset values; CR4.OSFXSR is on for the SSE instructions and put
    // back after. The compiler uses no SSE registers in this target (soft float), so
    // clearing them clobbers nothing of ours.
    // SAFETY: the caller's conditions and the above.
    unsafe {
        asm!(
            "mov cr2, {z}",
            "mov dr0, {z}",
            "mov dr1, {z}",
            "mov dr2, {z}",
            "mov dr3, {z}",
            "mov dr6, {dr6}",
            "mov dr7, {dr7}",
            z = in(reg) 0u64,
            dr6 = in(reg) 0xffff_0ff0u64,
            dr7 = in(reg) 0x400u64,
            options(nostack, preserves_flags)
        );
        let cr4 = read_cr4();
        write_cr4(cr4 | 1 << 9);
        asm!(
            "fninit",
            "xorps xmm0, xmm0",
            "xorps xmm1, xmm1",
            "xorps xmm2, xmm2",
            "xorps xmm3, xmm3",
            "xorps xmm4, xmm4",
            "xorps xmm5, xmm5",
            "xorps xmm6, xmm6",
            "xorps xmm7, xmm7",
            "xorps xmm8, xmm8",
            "xorps xmm9, xmm9",
            "xorps xmm10, xmm10",
            "xorps xmm11, xmm11",
            "xorps xmm12, xmm12",
            "xorps xmm13, xmm13",
            "xorps xmm14, xmm14",
            "xorps xmm15, xmm15",
            "ldmxcsr [{m}]",
            m = in(reg) &mxcsr,
            options(nostack, preserves_flags)
        );
        write_cr4(cr4);
    }
}
