// SPDX-License-Identifier: MIT OR Apache-2.0
//! Instruction lengths for the exits the handlers advance past, where the processor does
//! not report them (no nRIP save: QEMU's TCG; `vcpu`'s header lists the instructions).
//! Decodes 64-bit-mode code only (mkvisor guests run in long mode): legacy prefixes, one
//! REX prefix directly before the opcode, the opcode, and for MOV CR and LMSW the ModRM
//! byte with its SIB and displacement. Anything else is `None`: the caller stops the guest
//! rather than guess (AMD APM Vol. 3, 1.2 "Instruction prefixes", 1.4 "ModRM and SIB").
//! Pure, host-tested.

/// The architectural maximum (APM Vol. 3 1.1).
pub const MAX_LEN: usize = 15;

fn is_legacy_prefix(b: u8) -> bool {
    matches!(b, 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65)
}

/// Bytes a ModRM byte (and what it implies: SIB, displacement) takes, 64-bit addressing
/// (also the 32-bit addressing a 0x67 prefix selects in long mode: same forms).
fn modrm_len(bytes: &[u8]) -> Option<usize> {
    let modrm = *bytes.first()?;
    let (md, rm) = (modrm >> 6, modrm & 7);
    if md == 3 {
        return Some(1);
    }
    let mut len = 1;
    let mut disp = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = *bytes.get(1)?;
        len += 1;
        if md == 0 && sib & 7 == 5 {
            disp = 4;
        }
    } else if md == 0 && rm == 5 {
        disp = 4; // RIP-relative
    }
    Some(len + disp)
}

/// The length of the instruction starting at `bytes[0]`, if it is one of those an exit
/// is advanced past: VMMCALL, CPUID, HLT, RDMSR, WRMSR, IN/OUT/INS/OUTS, INVD, WBINVD,
/// XSETBV, MONITOR, MWAIT, MOV to/from CR, CLTS, LMSW.
pub fn insn_len(bytes: &[u8]) -> Option<u64> {
    let bytes = &bytes[..bytes.len().min(MAX_LEN)];
    let mut i = 0;
    while i < bytes.len() && is_legacy_prefix(bytes[i]) {
        i += 1;
    }
    if bytes.get(i).is_some_and(|b| b & 0xf0 == 0x40) {
        i += 1; // REX
    }
    let op = *bytes.get(i)?;
    let len = match op {
        0xf4 | 0xec..=0xef | 0x6c..=0x6f => i + 1, // HLT, IN/OUT DX, INS/OUTS
        0xe4..=0xe7 => i + 2,                      // IN/OUT imm8
        0x0f => {
            let op2 = *bytes.get(i + 1)?;
            match op2 {
                0xa2 | 0x30 | 0x32 | 0x08 | 0x09 | 0x06 => i + 2, // CPUID WRMSR RDMSR INVD WBINVD CLTS
                0x20 | 0x22 => i + 2 + modrm_len(bytes.get(i + 2..)?)?, // MOV CR
                0x01 => {
                    let modrm = *bytes.get(i + 2)?;
                    match modrm {
                        0xd9 | 0xd1 | 0xc8 | 0xc9 => i + 3, // VMMCALL XSETBV MONITOR MWAIT
                        m if (m >> 3) & 7 == 6 => i + 2 + modrm_len(bytes.get(i + 2..)?)?, // LMSW
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    (len <= bytes.len()).then_some(len as u64)
}

/// Whether the instruction at `bytes[0]` is INVD (0F 08, after any legacy or REX
/// prefixes). QEMU 7.2's TCG reports an intercepted INVD with WBINVD's exit code (its
/// translator tests the wrong opcode bit); the bytes tell them apart.
pub fn is_invd(bytes: &[u8]) -> bool {
    let bytes = &bytes[..bytes.len().min(MAX_LEN)];
    let mut i = 0;
    while i < bytes.len() && is_legacy_prefix(bytes[i]) {
        i += 1;
    }
    if bytes.get(i).is_some_and(|b| b & 0xf0 == 0x40) {
        i += 1;
    }
    bytes.get(i..i + 2) == Some(&[0x0f, 0x08][..])
}

/// What a control-register instruction does, decoded from its bytes (for a CR exit
/// without decode assists: the exit code names the register and direction, not the
/// general register; APM Vol. 3 "MOV CRn", "CLTS", "LMSW").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrInsn {
    /// MOV CRn, reg (`to`) or MOV reg, CRn: the control register (REX.R extends it; a LOCK
    /// prefix selects CR8 on AMD) and the general register (REX.B).
    Mov {
        to: bool,
        cr: u8,
        gpr: u8,
    },
    Clts,
    /// LMSW from a general register.
    LmswReg {
        gpr: u8,
    },
    /// LMSW from memory: not decoded further (the caller stops the guest).
    LmswMem,
}

/// Decodes the control-register instruction at `bytes[0]` (64-bit mode), or `None`.
pub fn cr_insn(bytes: &[u8]) -> Option<CrInsn> {
    let bytes = &bytes[..bytes.len().min(MAX_LEN)];
    let mut i = 0;
    let mut lock = false;
    while i < bytes.len() && is_legacy_prefix(bytes[i]) {
        lock |= bytes[i] == 0xf0;
        i += 1;
    }
    let mut rex = 0;
    if bytes.get(i).is_some_and(|b| b & 0xf0 == 0x40) {
        rex = bytes[i];
        i += 1;
    }
    if *bytes.get(i)? != 0x0f {
        return None;
    }
    let op = *bytes.get(i + 1)?;
    if op == 0x06 {
        return Some(CrInsn::Clts);
    }
    let modrm = *bytes.get(i + 2)?;
    let reg = (modrm >> 3) & 7;
    let rm = (modrm & 7) | (rex & 1) << 3;
    match op {
        0x20 | 0x22 => {
            let cr = reg | (rex & 4) << 1 | if lock { 8 } else { 0 };
            Some(CrInsn::Mov { to: op == 0x22, cr, gpr: rm })
        }
        0x01 if reg == 6 && modrm >> 6 == 3 => Some(CrInsn::LmswReg { gpr: rm }),
        0x01 if reg == 6 => Some(CrInsn::LmswMem),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invd_is_told_from_wbinvd_by_its_bytes() {
        assert!(is_invd(&[0x0f, 0x08]));
        assert!(is_invd(&[0xf3, 0x48, 0x0f, 0x08, 0x90]));
        assert!(!is_invd(&[0x0f, 0x09]));
        assert!(!is_invd(&[0x0f]));
        assert!(!is_invd(&[]));
    }

    #[test]
    fn control_register_instructions_name_their_registers() {
        // mov cr0, rax; mov cr4, r9; mov rbx, cr0; mov cr8, rax (REX.R and the LOCK form).
        assert_eq!(cr_insn(&[0x0f, 0x22, 0xc0]), Some(CrInsn::Mov { to: true, cr: 0, gpr: 0 }));
        assert_eq!(
            cr_insn(&[0x41, 0x0f, 0x22, 0xe1]),
            Some(CrInsn::Mov { to: true, cr: 4, gpr: 9 })
        );
        assert_eq!(cr_insn(&[0x0f, 0x20, 0xc3]), Some(CrInsn::Mov { to: false, cr: 0, gpr: 3 }));
        assert_eq!(
            cr_insn(&[0x44, 0x0f, 0x22, 0xc0]),
            Some(CrInsn::Mov { to: true, cr: 8, gpr: 0 })
        );
        assert_eq!(
            cr_insn(&[0xf0, 0x0f, 0x22, 0xc0]),
            Some(CrInsn::Mov { to: true, cr: 8, gpr: 0 })
        );
        assert_eq!(cr_insn(&[0x0f, 0x06]), Some(CrInsn::Clts));
        assert_eq!(cr_insn(&[0x0f, 0x01, 0xf2]), Some(CrInsn::LmswReg { gpr: 2 }));
        assert_eq!(cr_insn(&[0x0f, 0x01, 0x30]), Some(CrInsn::LmswMem));
        assert_eq!(cr_insn(&[0x0f, 0xa2]), None);
        assert_eq!(cr_insn(&[0x0f, 0x22]), None);
    }

    #[test]
    fn plain_instructions() {
        assert_eq!(insn_len(&[0x0f, 0x01, 0xd9]), Some(3)); // vmmcall
        assert_eq!(insn_len(&[0x0f, 0xa2]), Some(2)); // cpuid
        assert_eq!(insn_len(&[0xf4]), Some(1)); // hlt
        assert_eq!(insn_len(&[0x0f, 0x32]), Some(2)); // rdmsr
        assert_eq!(insn_len(&[0x0f, 0x30]), Some(2)); // wrmsr
        assert_eq!(insn_len(&[0xe6, 0x80]), Some(2)); // out 0x80, al
        assert_eq!(insn_len(&[0xec]), Some(1)); // in al, dx
        assert_eq!(insn_len(&[0x0f, 0x01, 0xd1]), Some(3)); // xsetbv
        assert_eq!(insn_len(&[0x0f, 0x09]), Some(2)); // wbinvd
    }

    #[test]
    fn prefixes_count() {
        assert_eq!(insn_len(&[0x66, 0xef]), Some(2)); // out dx, ax
        assert_eq!(insn_len(&[0xf3, 0x6e]), Some(2)); // rep outsb
        assert_eq!(insn_len(&[0xf3, 0x48, 0x6f]), Some(3)); // rep outsq-like, REX.W
        assert_eq!(insn_len(&[0x2e, 0x0f, 0xa2]), Some(3)); // cs cpuid
        assert_eq!(insn_len(&[0x41, 0x0f, 0x22, 0xc0]), Some(4)); // mov cr0, r8
        assert_eq!(insn_len(&[0x44, 0x0f, 0x20, 0xc0]), Some(4)); // mov rax, cr8
    }

    #[test]
    fn modrm_forms_of_lmsw() {
        assert_eq!(insn_len(&[0x0f, 0x01, 0xf0]), Some(3)); // lmsw ax
        assert_eq!(insn_len(&[0x0f, 0x01, 0x30]), Some(3)); // lmsw [rax]
        assert_eq!(insn_len(&[0x0f, 0x01, 0x70, 0x08]), Some(4)); // lmsw [rax+8]
        assert_eq!(insn_len(&[0x0f, 0x01, 0x34, 0x24]), Some(4)); // lmsw [rsp]
        assert_eq!(insn_len(&[0x0f, 0x01, 0x35, 1, 2, 3, 4]), Some(7)); // lmsw [rip+d32]
        assert_eq!(insn_len(&[0x0f, 0x01, 0x34, 0x25, 1, 2, 3, 4]), Some(8)); // [d32] via SIB
        assert_eq!(insn_len(&[0x0f, 0x01, 0xb0, 1, 2, 3, 4]), Some(7)); // lmsw [rax+d32]
    }

    #[test]
    fn anything_else_or_truncated_is_refused() {
        assert_eq!(insn_len(&[0x90]), None);
        assert_eq!(insn_len(&[0x0f, 0x01]), None);
        assert_eq!(insn_len(&[0x0f, 0x01, 0x70]), None); // displacement missing
        assert_eq!(insn_len(&[0x0f, 0x01, 0xc1]), None); // VMCALL is not an SVM hypercall
        assert_eq!(insn_len(&[0x66; 16]), None);
        assert_eq!(insn_len(&[]), None);
    }
}
