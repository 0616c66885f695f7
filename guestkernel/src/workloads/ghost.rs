// SPDX-License-Identifier: MIT OR Apache-2.0
//! `ghost`: looks for register state an earlier incarnation (or the firmware) left on its
//! core: CPU state that is neither in the VMCS nor in the partition, which the hypervisor
//! must reset itself between incarnations: the pass-through MSRs (STAR, LSTAR, CSTAR,
//! SFMASK, KERNEL_GS_BASE), CR2, DR0-DR3 and the SSE registers. Each incarnation reads
//! them, reports what it found, writes its own mark in each, and faults (so it is
//! restarted) until incarnation `live_at`, which exits 0 only if no mark was found.
//! (Found by an independent review of the restart path.)

use vmcall_proto::guest::BootInfo;

const MARK: u64 = 0x6405_7000_0000_0000;
const MSRS: [(u32, &str); 5] = [
    (0xc000_0081, "STAR"),
    (0xc000_0082, "LSTAR"),
    (0xc000_0083, "CSTAR"),
    (0xc000_0084, "SFMASK"),
    (0xc000_0102, "KERNEL_GS_BASE"),
];

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: these MSRs pass through (no exit) and exist on every x86-64 processor.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack))
    };
    (hi as u64) << 32 | lo as u64
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: as for rdmsr; the values written are canonical addresses / plain bits.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack))
    };
}

pub fn ghost(bi: &BootInfo) -> u64 {
    let n = bi.incarnation as u64;
    let live_at = bi.arg_int("live_at");
    let mut found = 0u32;
    // SSE on (CR4.OSFXSR is the guest's bit).
    // SAFETY: setting OSFXSR only; CR0.EM is clear in this kernel.
    unsafe {
        let mut cr4: u64;
        core::arch::asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        cr4 |= 1 << 9;
        core::arch::asm!("mov cr4, {}", in(reg) cr4, options(nostack));
    }
    let mut seen = |what: &str, v: u64| {
        let mark = v != 0 && (v >> 44 == 0x64057 || v >> 28 == 0x64057 || v >> 12 == 0x64057);
        found += mark as u32;
        log::info!(
            "ghost: incarnation {n}: {what} = {v:#x}{}",
            if mark { " (EARLIER MARK)" } else { "" }
        );
    };
    for (msr, name) in MSRS {
        seen(name, rdmsr(msr));
    }
    let (cr2, dr0, dr1, xmm0): (u64, u64, u64, u64);
    // SAFETY: reading CR2, DR0, DR1 and XMM0 has no side effect (no exits configured).
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack));
        core::arch::asm!("mov {}, dr0", out(reg) dr0, options(nomem, nostack));
        core::arch::asm!("mov {}, dr1", out(reg) dr1, options(nomem, nostack));
        core::arch::asm!("movq {}, xmm0", out(reg) xmm0, options(nomem, nostack));
    }
    seen("CR2", cr2);
    seen("DR0", dr0);
    seen("DR1", dr1);
    seen("XMM0", xmm0);
    log::info!(
        "ghost: incarnation {n}: earlier marks {}",
        if found == 0 { "none" } else { "FOUND" }
    );
    // Leave this incarnation's marks (canonical addresses where the MSR wants one).
    let canon = 0x0000_6405_7000_0000 | n << 12;
    for (msr, _) in MSRS {
        match msr {
            0xc000_0081 => wrmsr(msr, (MARK >> 32) << 32),
            0xc000_0084 => wrmsr(msr, 0x6405_7000 | n),
            _ => wrmsr(msr, canon),
        }
    }
    let m = MARK | n;
    // SAFETY: writing CR2, DR0, DR1 (breakpoints stay disabled: DR7 untouched) and XMM0.
    unsafe {
        core::arch::asm!("mov cr2, {}", in(reg) m, options(nostack));
        core::arch::asm!("mov dr0, {}", in(reg) canon, options(nostack));
        core::arch::asm!("mov dr1, {}", in(reg) m, options(nostack));
        core::arch::asm!("movq xmm0, {}", in(reg) m, options(nostack));
    }
    if n < live_at {
        log::info!("ghost: incarnation {n} faults on purpose");
        // SAFETY: our page tables map the address (EPT does not): the hypervisor stops us.
        unsafe { core::ptr::read_volatile((bi.memory_bytes + (2 << 20)) as *const u64) };
        return 1;
    }
    if found == 0 {
        0
    } else {
        2
    }
}
