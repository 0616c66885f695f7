// SPDX-License-Identifier: MIT OR Apache-2.0
//! Reading a #VMEXIT: the exit code and its two information words (AMD APM Vol. 2,
//! Appendix C "SVM Intercept Exit Codes"; 15.10.2 for IOIO's EXITINFO1, 15.11 for MSR,
//! 15.25.6 for nested page faults) decoded once into an [`SvmExit`], and the next RIP of an
//! intercepted instruction where the processor does not save it (no nRIP save: QEMU's TCG).
//! Pure functions, tested on the host. Unknown codes become `Unexpected`, never a panic.

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
    pub const HLT: u64 = 0x078;
    pub const IOIO: u64 = 0x07b;
    pub const MSR: u64 = 0x07c;
    pub const SHUTDOWN: u64 = 0x07f;
    pub const VMRUN: u64 = 0x080;
    pub const VMMCALL: u64 = 0x081;
    pub const NPF: u64 = 0x400;
    /// VMRUN found the VMCB's state invalid (15.5.1 consistency checks).
    pub const INVALID: u64 = u64::MAX;
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

#[cfg(test)]
mod tests {
    use super::*;

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
