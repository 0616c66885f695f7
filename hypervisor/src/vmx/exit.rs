// SPDX-License-Identifier: MIT OR Apache-2.0
//! VM exits as VMX reports them: the basic exit reasons by number (their names are the
//! telemetry ABI's, `vmcall_proto::guest::EXIT_NAMES`), their
//! decoding into the backend-neutral [`ExitKind`](crate::vcpu::ExitKind), and the exit
//! qualifications of control-register and I/O exits decoded into `vcpu`'s
//! [`CrAccess`]/[`IoAccess`]. Pure functions (host-tested); the VMCS reads are
//! `vmx::vcpu`'s. May call: `vcpu` (its types).

use crate::vcpu::{CrAccess, ExitKind, IoAccess, EXIT_CODES};

/// The basic exit reasons the hypervisor acts on by name (indices into
/// `vmcall_proto::guest::EXIT_NAMES`, the telemetry page's numbering): the one list the
/// decoder ([`kind`]) and the fast path's landing (`vmx::vcpu::fast_kind`) use.
pub mod reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INIT: u16 = 3;
    pub const INTERRUPT_WINDOW: u16 = 7;
    pub const CPUID: u16 = 10;
    pub const HLT: u16 = 12;
    pub const INVD: u16 = 13;
    pub const VMCALL: u16 = 18;
    /// VMCLEAR, VMLAUNCH, VMPTRLD, VMPTRST, VMREAD, VMRESUME, VMWRITE, VMXOFF, VMXON.
    pub const VMCLEAR: u16 = 19;
    pub const VMXON: u16 = 27;
    pub const CR_ACCESS: u16 = 28;
    pub const IO: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const MWAIT: u16 = 36;
    pub const MONITOR: u16 = 39;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIG: u16 = 49;
    pub const INVEPT: u16 = 50;
    pub const PREEMPTION_TIMER: u16 = 52;
    pub const INVVPID: u16 = 53;
    pub const WBINVD: u16 = 54;
    pub const XSETBV: u16 = 55;
    pub const VMFUNC: u16 = 59;
}

/// The kind of an exit of basic reason `reason` (bits 15:0 of the exit-reason field).
#[inline(always)]
pub fn kind(reason: u16) -> ExitKind {
    match KINDS.get(reason as usize) {
        Some(k) => *k,
        None => ExitKind::Other,
    }
}

/// [`kind`] as a table (one load on the exit path).
const KINDS: [ExitKind; EXIT_CODES] = {
    let mut t = [ExitKind::Other; EXIT_CODES];
    t[reason::EXCEPTION_OR_NMI as usize] = ExitKind::Nmi;
    t[reason::EXTERNAL_INTERRUPT as usize] = ExitKind::ExternalInterrupt;
    t[reason::TRIPLE_FAULT as usize] = ExitKind::TripleFault;
    t[reason::INIT as usize] = ExitKind::Init;
    t[reason::INTERRUPT_WINDOW as usize] = ExitKind::InterruptWindow;
    t[reason::CPUID as usize] = ExitKind::Cpuid;
    t[reason::HLT as usize] = ExitKind::Hlt;
    t[reason::INVD as usize] = ExitKind::Invd;
    t[reason::WBINVD as usize] = ExitKind::Wbinvd;
    t[reason::VMCALL as usize] = ExitKind::Hypercall;
    let mut r = reason::VMCLEAR;
    while r <= reason::VMXON {
        t[r as usize] = ExitKind::VirtualizationInstruction;
        r += 1;
    }
    t[reason::INVEPT as usize] = ExitKind::VirtualizationInstruction;
    t[reason::INVVPID as usize] = ExitKind::VirtualizationInstruction;
    t[reason::VMFUNC as usize] = ExitKind::VirtualizationInstruction;
    t[reason::CR_ACCESS as usize] = ExitKind::CrAccess;
    t[reason::IO as usize] = ExitKind::Io;
    t[reason::RDMSR as usize] = ExitKind::Rdmsr;
    t[reason::WRMSR as usize] = ExitKind::Wrmsr;
    t[reason::MWAIT as usize] = ExitKind::Mwait;
    t[reason::MONITOR as usize] = ExitKind::Monitor;
    t[reason::EPT_VIOLATION as usize] = ExitKind::NestedFault;
    t[reason::EPT_MISCONFIG as usize] = ExitKind::NestedMisconfig;
    t[reason::PREEMPTION_TIMER as usize] = ExitKind::Timer;
    t[reason::XSETBV as usize] = ExitKind::Xsetbv;
    t
};

/// Whether an exit of basic reason `reason` is caused by an instruction (SDM Vol. 3C 26.1.2,
/// 26.1.3): such an exit never happens during event delivery, so its IDT-vectoring
/// information is never valid (SDM Vol. 3C 28.2.4) and need not be read.
#[inline(always)]
pub fn instruction_exit(reason: u16) -> bool {
    const MASK: u64 = {
        let mut m = 0u64;
        let mut r = 0;
        while r < 64 {
            if matches!(r, 10..=28 | 30..=32 | 36 | 39 | 50 | 51 | 53..=55 | 57..=59 | 61) {
                m |= 1 << r;
            }
            r += 1;
        }
        m
    };
    reason < 64 && MASK & (1 << reason) != 0
}

/// A control-register access's exit qualification (SDM Vol. 3C 28.2.1, Table 28-3).
pub fn cr_access(q: u64) -> CrAccess {
    let (cr, gpr) = ((q & 0xf) as u8, ((q >> 8) & 0xf) as u8);
    match (q >> 4) & 3 {
        0 => CrAccess::MovTo { cr, gpr },
        1 => CrAccess::MovFrom { cr, gpr },
        2 => CrAccess::Clts,
        _ => CrAccess::Lmsw { source: (q >> 16) as u16 },
    }
}

/// An I/O instruction's exit qualification (SDM Vol. 3C 28.2.1, Table 28-5).
pub fn io(q: u64) -> IoAccess {
    IoAccess {
        port: (q >> 16) as u16,
        size: ((q & 7) + 1) as u8,
        input: q & 8 != 0,
        string: q & 16 != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcall_proto::guest::EXIT_NAMES as NAMES;

    #[test]
    fn named_reasons_are_their_names_in_reports() {
        use super::reason::*;
        for (r, name) in [
            (EXCEPTION_OR_NMI, "exception_nmi"),
            (EXTERNAL_INTERRUPT, "external_interrupt"),
            (TRIPLE_FAULT, "triple_fault"),
            (INIT, "init"),
            (INTERRUPT_WINDOW, "interrupt_window"),
            (CPUID, "cpuid"),
            (HLT, "hlt"),
            (INVD, "invd"),
            (VMCALL, "vmcall"),
            (VMCLEAR, "vmclear"),
            (VMXON, "vmxon"),
            (CR_ACCESS, "cr_access"),
            (IO, "io"),
            (RDMSR, "rdmsr"),
            (WRMSR, "wrmsr"),
            (MWAIT, "mwait"),
            (MONITOR, "monitor"),
            (EPT_VIOLATION, "ept_violation"),
            (EPT_MISCONFIG, "ept_misconfig"),
            (INVEPT, "invept"),
            (PREEMPTION_TIMER, "preemption_timer"),
            (INVVPID, "invvpid"),
            (WBINVD, "wbinvd"),
            (XSETBV, "xsetbv"),
            (VMFUNC, "vmfunc"),
        ] {
            assert_eq!(NAMES[r as usize], name);
        }
    }

    #[test]
    fn every_reason_decodes_to_its_kind() {
        assert_eq!(kind(reason::VMCALL), ExitKind::Hypercall);
        assert_eq!(kind(reason::EXCEPTION_OR_NMI), ExitKind::Nmi);
        for r in reason::VMCLEAR..=reason::VMXON {
            assert_eq!(kind(r), ExitKind::VirtualizationInstruction, "{r}");
        }
        assert_eq!(kind(reason::EPT_VIOLATION), ExitKind::NestedFault);
        assert_eq!(kind(reason::PREEMPTION_TIMER), ExitKind::Timer);
        for r in [5, 29, 35, 69, 70, 200, u16::MAX] {
            assert_eq!(kind(r), ExitKind::Other, "{r}");
        }
        // Every kind but `Other` comes from a named reason.
        let named = (0..NAMES.len() as u16).filter(|&r| kind(r) != ExitKind::Other).count();
        assert_eq!(named, 32);
    }

    #[test]
    fn qualifications_decode() {
        assert_eq!(cr_access(0x0300), CrAccess::MovTo { cr: 0, gpr: 3 });
        assert_eq!(cr_access(0x0918), CrAccess::MovFrom { cr: 8, gpr: 9 });
        assert_eq!(cr_access(0x20), CrAccess::Clts);
        assert_eq!(cr_access(0xabcd_0030), CrAccess::Lmsw { source: 0xabcd });
        let q = (0xcfc << 16) | 8 | 3;
        assert_eq!(io(q), IoAccess { port: 0xcfc, size: 4, input: true, string: false });
        assert_eq!(
            io(0xe9 << 16 | 16),
            IoAccess { port: 0xe9, size: 1, input: false, string: true }
        );
    }
}
