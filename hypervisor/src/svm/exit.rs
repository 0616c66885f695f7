// SPDX-License-Identifier: MIT OR Apache-2.0
//! Reading a #VMEXIT: the exit code and its two information words (AMD APM Vol. 2,
//! Appendix C "SVM Intercept Exit Codes"; 15.10.2 for IOIO's EXITINFO1, 15.11 for MSR,
//! 15.25.6 for nested page faults) decoded once into an [`SvmExit`], and the next RIP of an
//! intercepted instruction where the processor does not save it (no nRIP save: QEMU's TCG).
//! Pure functions, tested on the host. Unknown codes become `Unexpected`, never a panic.

use crate::vcpu::{ExitKind, IoAccess, NestedFault};

/// Exit codes (APM Appendix C, Table C-1).
pub mod code {
    /// Writes to CR0..CR15: 0x010 + n.
    pub const CR_WRITE: u64 = 0x010;
    pub const EXCP_BASE: u64 = 0x040;
    pub const INTR: u64 = 0x060;
    pub const NMI: u64 = 0x061;
    pub const SMI: u64 = 0x062;
    pub const INIT: u64 = 0x063;
    pub const CPUID: u64 = 0x072;
    pub const RSM: u64 = 0x073;
    pub const HLT: u64 = 0x078;
    pub const IOIO: u64 = 0x07b;
    pub const MSR: u64 = 0x07c;
    pub const SHUTDOWN: u64 = 0x07f;
    pub const VMRUN: u64 = 0x080;
    pub const VMMCALL: u64 = 0x081;
    pub const VINTR: u64 = 0x064;
    pub const INVLPGA: u64 = 0x07a;
    pub const INVD: u64 = 0x076;
    pub const SKINIT: u64 = 0x086;
    pub const WBINVD: u64 = 0x089;
    pub const MONITOR: u64 = 0x08a;
    pub const MWAIT: u64 = 0x08b;
    pub const MWAIT_CONDITIONAL: u64 = 0x08c;
    pub const XSETBV: u64 = 0x08d;
    pub const NPF: u64 = 0x400;
    /// VMRUN found the VMCB's state invalid (15.5.1 consistency checks).
    pub const INVALID: u64 = u64::MAX;
}

/// EXITCODE as the APM defines it (a 64-bit field; the negative codes -1..-4 sign-extend),
/// from the VMCB's `raw` value. QEMU 7.2's TCG stores the code as 32 bits
/// (`cpu_vmexit` takes a `uint32_t`), so VMEXIT_INVALID reads 0xffff_ffff there: every
/// architectural code is either below 0x1_0000 or negative, so a raw value with bit 31 set
/// and bits 63:32 clear is that negative code.
pub fn normalize(raw: u64) -> u64 {
    if raw >> 32 == 0 && raw & (1 << 31) != 0 {
        raw as u32 as i32 as i64 as u64
    } else {
        raw
    }
}

/// An I/O instruction's intercept (EXITINFO1, APM Figure 15-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Io {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub input: bool,
    /// INS/OUTS (the string forms).
    pub string: bool,
    pub rep: bool,
}

/// One #VMEXIT, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmExit {
    Cpuid,
    Vmmcall,
    Hlt,
    Msr {
        write: bool,
    },
    Io(Io),
    /// A nested page fault: the guest-physical address and the error code's access bits
    /// (bit 0 present, 1 write, 4 instruction fetch).
    NestedPageFault {
        gpa: u64,
        error: u64,
    },
    Exception(u8),
    CrWrite(u8),
    Intr,
    Nmi,
    Smi,
    Init,
    Shutdown,
    /// A guest VMRUN (always intercepted).
    Vmrun,
    /// VMRUN refused the VMCB.
    Invalid,
    Unexpected(u64),
}

/// Decodes an exit from the VMCB's EXITCODE, EXITINFO1 and EXITINFO2.
pub fn decode(exit_code: u64, info1: u64, info2: u64) -> SvmExit {
    match exit_code {
        code::CPUID => SvmExit::Cpuid,
        code::VMMCALL => SvmExit::Vmmcall,
        code::HLT => SvmExit::Hlt,
        code::MSR => SvmExit::Msr { write: info1 & 1 != 0 },
        code::IOIO => SvmExit::Io(Io {
            port: (info1 >> 16) as u16,
            size: match (info1 >> 4) & 7 {
                1 => 1,
                2 => 2,
                _ => 4,
            },
            input: info1 & 1 != 0,
            string: info1 & (1 << 2) != 0,
            rep: info1 & (1 << 3) != 0,
        }),
        code::NPF => SvmExit::NestedPageFault { gpa: info2, error: info1 },
        c @ code::EXCP_BASE..=0x05f => SvmExit::Exception((c - code::EXCP_BASE) as u8),
        c @ code::CR_WRITE..=0x01f => SvmExit::CrWrite((c - code::CR_WRITE) as u8),
        code::INTR => SvmExit::Intr,
        code::NMI => SvmExit::Nmi,
        code::SMI => SvmExit::Smi,
        code::INIT => SvmExit::Init,
        code::SHUTDOWN => SvmExit::Shutdown,
        code::VMRUN => SvmExit::Vmrun,
        code::INVALID => SvmExit::Invalid,
        other => SvmExit::Unexpected(other),
    }
}

/// The RIP after the intercepted instruction at `rip`: the processor's nRIP where it saves
/// one (`nrip`, with CPUID 8000_000A EDX.NRIPS), EXITINFO2 for IOIO (always saved, 15.10.2),
/// else the fixed length of the instructions that have one: VMMCALL (0F 01 D9) 3 bytes,
/// CPUID (0F A2), RDMSR (0F 32), WRMSR (0F 30) 2, HLT (F4) 1. `None` for an exit that
/// does not complete an instruction (faults, interrupts) or whose length varies.
pub fn next_rip(exit: SvmExit, rip: u64, nrip: Option<u64>, info2: u64) -> Option<u64> {
    let len = match exit {
        SvmExit::Io(_) => return Some(info2),
        SvmExit::Vmmcall => 3,
        SvmExit::Cpuid | SvmExit::Msr { .. } => 2,
        SvmExit::Hlt => 1,
        _ => return None,
    };
    // A prefix (rare, legal on CPUID) makes the fixed length wrong: nRIP is exact.
    Some(nrip.unwrap_or(rip + len))
}

/// The backend-neutral kind of an exit (`vcpu::ExitKind`) from its SVM exit code and, for
/// a nested page fault, EXITINFO1 (bit 3, RSV: a reserved bit set in a nested entry is
/// a misconfiguration, not an access the tables refused).
#[cfg_attr(not(test), allow(dead_code))] // for the SVM vCPU (docs/svm.md); host-tested
pub fn kind(exit_code: u64, info1: u64) -> ExitKind {
    use ExitKind as K;
    match exit_code {
        code::NMI => K::Nmi,
        // An SMI is the platform's (firmware's), taken by the host once the exit is over,
        // as on VT-x where an SMI never exits: the guest just resumes.
        code::INTR | code::SMI => K::ExternalInterrupt,
        code::SHUTDOWN => K::TripleFault,
        code::INIT => K::Init,
        code::VINTR => K::InterruptWindow,
        code::CPUID => K::Cpuid,
        code::HLT => K::Hlt,
        code::INVD => K::Invd,
        code::WBINVD => K::Wbinvd,
        code::VMMCALL => K::Hypercall,
        // The SVM instructions (the guest sees EFER.SVME clear: #UD, as on a processor
        // without SVM) and RSM (outside SMM it is #UD, as VT-x gives it).
        code::VMRUN..=code::SKINIT | code::INVLPGA | code::RSM => K::VirtualizationInstruction,
        0x000..=0x01f => K::CrAccess,
        code::IOIO => K::Io,
        code::MSR if info1 & 1 == 0 => K::Rdmsr,
        code::MSR => K::Wrmsr,
        code::MWAIT | code::MWAIT_CONDITIONAL => K::Mwait,
        code::MONITOR => K::Monitor,
        code::NPF if info1 & (1 << 3) != 0 => K::NestedMisconfig,
        code::NPF => K::NestedFault,
        code::XSETBV => K::Xsetbv,
        _ => K::Other,
    }
}

/// The code an exit counts under in reports and the guest's telemetry page: the telemetry
/// ABI's numbering (the VMX basic reasons, `vmcall_proto::guest::EXIT_NAMES`), so that
/// VMMCALL counts as `vmcall`, a nested page fault as `ept_violation`; an exit with no
/// counterpart counts as `reason_35` (35, unused by VMX), so it is seen, not lost.
#[cfg_attr(not(test), allow(dead_code))] // for the SVM vCPU (docs/svm.md); host-tested
#[inline] // with `kind` (the exit path computes both from the same code)
pub fn telemetry_code(exit_code: u64, info1: u64) -> u16 {
    use ExitKind as K;
    match kind(exit_code, info1) {
        K::Nmi => 0,
        K::ExternalInterrupt => 1,
        K::TripleFault => 2,
        K::Init => 3,
        K::InterruptWindow => 7,
        K::Cpuid => 10,
        K::Hlt => 12,
        K::Invd => 13,
        K::Hypercall => 18,
        // Counted as VMXON, the VMX instruction a guest would most plausibly try.
        K::VirtualizationInstruction => 27,
        K::CrAccess => 28,
        K::Io => 30,
        K::Rdmsr => 31,
        K::Wrmsr => 32,
        K::Mwait => 36,
        K::Monitor => 39,
        K::NestedFault => 48,
        K::NestedMisconfig => 49,
        K::Timer => 52,
        K::Wbinvd => 54,
        K::Xsetbv => 55,
        // Never a kind of an SVM exit code (the vCPU makes it, counting it itself).
        K::Completed | K::Other => 35,
    }
}

/// An IOIO exit's access, in the neutral form.
#[cfg_attr(not(test), allow(dead_code))] // for the SVM vCPU (docs/svm.md); host-tested
pub fn io_access(io: Io) -> IoAccess {
    IoAccess { port: io.port, size: io.size, input: io.input, string: io.string }
}

/// A nested page fault in the neutral form: bits 0-2 the access (a write when EXITINFO1
/// bit 1, an instruction fetch when bit 4, else a read), bits 3-5 what the leaf at `gpa`
/// allowed (`allowed`: R=1, W=2, X=4, 0 when nothing is mapped; from a walk of the tables).
#[cfg_attr(not(test), allow(dead_code))] // for the SVM vCPU (docs/svm.md); host-tested
pub fn nested_fault(gpa: u64, error: u64, allowed: u64) -> NestedFault {
    let access = if error & (1 << 1) != 0 {
        2
    } else if error & (1 << 4) != 0 {
        4
    } else {
        1
    };
    NestedFault { gpa, access: access | (allowed & 7) << 3 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_map_to_the_neutral_kinds_and_the_telemetry_numbering() {
        assert_eq!(kind(0x81, 0), ExitKind::Hypercall);
        assert_eq!(telemetry_code(0x81, 0), 18); // "vmcall"
        assert_eq!(kind(0x72, 0), ExitKind::Cpuid);
        assert_eq!(telemetry_code(0x72, 0), 10);
        assert_eq!((kind(0x7c, 0), kind(0x7c, 1)), (ExitKind::Rdmsr, ExitKind::Wrmsr));
        assert_eq!(kind(0x400, 0x6), ExitKind::NestedFault);
        assert_eq!(telemetry_code(0x400, 0x6), 48); // "ept_violation"
        assert_eq!(kind(0x400, 0x9), ExitKind::NestedMisconfig);
        assert_eq!(kind(0x7f, 0), ExitKind::TripleFault);
        for c in [0x80, 0x82, 0x83, 0x84, 0x85, 0x86, 0x7a] {
            assert_eq!(kind(c, 0), ExitKind::VirtualizationInstruction, "{c:#x}");
        }
        assert_eq!(kind(0x010, 0), ExitKind::CrAccess);
        assert_eq!(kind(0x61, 0), ExitKind::Nmi);
        assert_eq!(kind(0x401, 0), ExitKind::Other);
        assert_eq!(kind(0x62, 0), ExitKind::ExternalInterrupt); // SMI: resumed
        assert_eq!(kind(0x73, 0), ExitKind::VirtualizationInstruction); // RSM: #UD
        assert_eq!(vmcall_proto::guest::EXIT_NAMES[telemetry_code(0x401, 0) as usize], "reason_35");
        for (c, name) in [(0x81, "vmcall"), (0x7b, "io"), (0x78, "hlt"), (0x89, "wbinvd")] {
            assert_eq!(vmcall_proto::guest::EXIT_NAMES[telemetry_code(c, 0) as usize], name);
        }
    }

    #[test]
    fn a_nested_fault_says_what_the_access_was_and_what_was_allowed() {
        // A write to a read-only page: error P|RW|US, allowed R.
        assert_eq!(nested_fault(0x5000, 0x7, 1), NestedFault { gpa: 0x5000, access: 2 | 1 << 3 });
        // A fetch from nothing mapped.
        assert_eq!(nested_fault(0x6000, 0x14, 0).access, 4);
        assert_eq!(nested_fault(0x6000, 0x4, 0).access, 1);
    }

    #[test]
    fn exit_codes_decode_as_the_apm_lists_them() {
        assert_eq!(decode(0x72, 0, 0), SvmExit::Cpuid);
        assert_eq!(decode(0x81, 0, 0), SvmExit::Vmmcall);
        assert_eq!(decode(0x78, 0, 0), SvmExit::Hlt);
        assert_eq!(decode(0x7c, 1, 0), SvmExit::Msr { write: true });
        assert_eq!(decode(0x7c, 0, 0), SvmExit::Msr { write: false });
        assert_eq!(decode(0x4e, 0, 0), SvmExit::Exception(14));
        assert_eq!(decode(0x10, 0, 0), SvmExit::CrWrite(0));
        assert_eq!(decode(0x7f, 0, 0), SvmExit::Shutdown);
        assert_eq!(decode(u64::MAX, 0, 0), SvmExit::Invalid);
        // QEMU's TCG writes VMEXIT_INVALID as 32 bits.
        assert_eq!(normalize(0xffff_ffff), code::INVALID);
        assert_eq!(normalize(0xffff_fffe), u64::MAX - 1);
        for c in [0x72, 0x400, 0x403, u64::MAX] {
            assert_eq!(normalize(c), c);
        }
        assert_eq!(decode(0x401, 0, 0), SvmExit::Unexpected(0x401));
        assert_eq!(
            decode(0x400, 0b1_0110, 0x1234_5000),
            SvmExit::NestedPageFault { gpa: 0x1234_5000, error: 0x16 }
        );
    }

    #[test]
    fn an_io_exit_names_port_size_and_direction() {
        // `in al, 0x60`: port 0x60, SZ8 (bit 4), TYPE=IN (bit 0).
        let e = decode(0x7b, (0x60 << 16) | (1 << 4) | 1, 0x1002);
        assert_eq!(
            e,
            SvmExit::Io(Io { port: 0x60, size: 1, input: true, string: false, rep: false })
        );
        // `rep outsw` to 0x3f8.
        let e = decode(0x7b, (0x3f8 << 16) | (2 << 4) | (1 << 3) | (1 << 2), 0);
        assert_eq!(
            e,
            SvmExit::Io(Io { port: 0x3f8, size: 2, input: false, string: true, rep: true })
        );
        assert_eq!(next_rip(e, 0x1000, None, 0x1002), Some(0x1002));
    }

    #[test]
    fn without_nrip_the_fixed_lengths_apply() {
        assert_eq!(next_rip(SvmExit::Vmmcall, 0x1000, None, 0), Some(0x1003));
        assert_eq!(next_rip(SvmExit::Cpuid, 0x1000, None, 0), Some(0x1002));
        assert_eq!(next_rip(SvmExit::Msr { write: true }, 0x1000, None, 0), Some(0x1002));
        assert_eq!(next_rip(SvmExit::Hlt, 0x1000, None, 0), Some(0x1001));
        assert_eq!(next_rip(SvmExit::Cpuid, 0x1000, Some(0x1003), 0), Some(0x1003));
        assert_eq!(next_rip(SvmExit::Exception(6), 0x1000, None, 0), None);
    }
}
