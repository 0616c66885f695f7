// SPDX-License-Identifier: MIT OR Apache-2.0
//! The SVM feature probe: CPUID Fn8000_0001 (SVM present), Fn8000_000A (revision, ASIDs,
//! features) and the VM_CR MSR (firmware lock), read once on the BSP and decoded into one
//! [`Features`] value or the one [`Missing`] thing a backend would need (AMD APM Vol. 2,
//! 15.4 "Enabling SVM", 15.25 "Nested Paging"; CPUID specification for Fn8000_000A).
//!
//! Decoding is a pure function of [`RawSvm`], tested on the host against values recorded
//! from QEMU's TCG `max` CPU and Bochs's `ryzen` model.

use core::fmt;

/// Everything the probe reads, as read; all zero when CPUID says there is no SVM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawSvm {
    /// CPUID Fn8000_0001 ECX bit 2.
    pub cpuid_svm: bool,
    /// CPUID Fn8000_000A EAX (bits 7:0: SVM revision).
    pub eax: u32,
    /// CPUID Fn8000_000A EBX: the number of address space identifiers.
    pub ebx: u32,
    /// CPUID Fn8000_000A EDX: the feature bits.
    pub edx: u32,
    /// MSR VM_CR (C001_0114h).
    pub vm_cr: u64,
}

/// Bits of CPUID Fn8000_000A EDX.
pub mod edx {
    pub const NESTED_PAGING: u32 = 1 << 0;
    pub const NRIP_SAVE: u32 = 1 << 3;
    pub const VMCB_CLEAN: u32 = 1 << 5;
    pub const FLUSH_BY_ASID: u32 = 1 << 6;
    pub const DECODE_ASSISTS: u32 = 1 << 7;
    pub const PAUSE_FILTER: u32 = 1 << 10;
    pub const VGIF: u32 = 1 << 16;
}

/// Bits of VM_CR (APM Vol. 2 15.30.1).
pub mod vm_cr {
    /// SVM lock: SVMDIS cannot be changed.
    pub const LOCK: u64 = 1 << 3;
    /// EFER.SVME cannot be set.
    pub const SVMDIS: u64 = 1 << 4;
}

/// The MSR number of VM_CR.
pub const MSR_VM_CR: u32 = 0xc001_0114;

/// The one required thing the machine lacks. Its `Display` names the bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    Svm,
    DisabledByFirmware,
    Disabled,
    NestedPaging,
    Asids,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Missing::Svm => "AMD SVM (CPUID.80000001H:ECX.SVM[bit 2] is 0)",
            Missing::DisabledByFirmware => {
                "AMD SVM disabled by firmware (VM_CR.SVMDIS set and locked)"
            }
            Missing::Disabled => "AMD SVM disabled (VM_CR.SVMDIS set)",
            Missing::NestedPaging => "nested paging (CPUID.8000000AH:EDX.NP[bit 0] is 0)",
            Missing::Asids => "a guest ASID (CPUID.8000000AH:EBX < 2)",
        })
    }
}

/// What an SVM backend can count on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    pub revision: u8,
    /// Address space identifiers, ASID 0 (the host) included.
    pub asids: u32,
    /// `nRIP` in the VMCB on intercepted instructions; without it the backend must decode
    /// instruction lengths itself (QEMU's TCG lacks it).
    pub nrip_save: bool,
    pub vmcb_clean: bool,
    pub flush_by_asid: bool,
    pub decode_assists: bool,
    pub pause_filter: bool,
    pub vgif: bool,
}

/// Decodes the probe; the first requirement missing, in the order a backend needs them.
pub fn decode(raw: &RawSvm) -> Result<Features, Missing> {
    if !raw.cpuid_svm {
        return Err(Missing::Svm);
    }
    if raw.vm_cr & vm_cr::SVMDIS != 0 {
        return Err(if raw.vm_cr & vm_cr::LOCK != 0 {
            Missing::DisabledByFirmware
        } else {
            Missing::Disabled
        });
    }
    if raw.edx & edx::NESTED_PAGING == 0 {
        return Err(Missing::NestedPaging);
    }
    if raw.ebx < 2 {
        return Err(Missing::Asids);
    }
    let has = |bit: u32| raw.edx & bit != 0;
    Ok(Features {
        revision: (raw.eax & 0xff) as u8,
        asids: raw.ebx,
        nrip_save: has(edx::NRIP_SAVE),
        vmcb_clean: has(edx::VMCB_CLEAN),
        flush_by_asid: has(edx::FLUSH_BY_ASID),
        decode_assists: has(edx::DECODE_ASSISTS),
        pause_filter: has(edx::PAUSE_FILTER),
        vgif: has(edx::VGIF),
    })
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "revision {}, {} ASIDs, NPT, nRIP save={}, VMCB clean={}, flush by ASID={}, \
             decode assists={}, pause filter={}, vGIF={}",
            self.revision,
            self.asids,
            self.nrip_save,
            self.vmcb_clean,
            self.flush_by_asid,
            self.decode_assists,
            self.pause_filter,
            self.vgif
        )
    }
}

/// Reads the probe on this core.
#[cfg(target_os = "none")]
pub fn read() -> RawSvm {
    let id = raw_cpuid::CpuId::new();
    let cpuid_svm =
        id.get_extended_processor_and_feature_identifiers().is_some_and(|e| e.has_svm());
    if !cpuid_svm {
        return RawSvm::default();
    }
    let r = raw_cpuid::native_cpuid::cpuid_count(0x8000_000a, 0);
    // VM_CR exists on every processor with CPUID.80000001H:ECX.SVM set (APM Vol. 2 15.30.1).
    // SAFETY: the MSR exists (SVM was checked above) and reading it has no side effect.
    let vm_cr = unsafe { crate::arch::rdmsr(MSR_VM_CR) };
    RawSvm { cpuid_svm, eax: r.eax, ebx: r.ebx, edx: r.edx, vm_cr }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded from QEMU 7.2's TCG, `-cpu max` (logged at boot with `vmxcaps=1`).
    const QEMU_TCG_MAX: RawSvm =
        RawSvm { cpuid_svm: true, eax: 0x1, ebx: 0x10, edx: 0x1001_0001, vm_cr: 0 };
    /// Recorded from Bochs 2.7 (Debian), `cpu: model=ryzen`.
    const BOCHS_RYZEN: RawSvm =
        RawSvm { cpuid_svm: true, eax: 0x1, ebx: 0x8000, edx: 0x44f, vm_cr: 0 };

    #[test]
    fn qemu_tcg_has_nested_paging_but_no_next_rip() {
        let f = decode(&QEMU_TCG_MAX).expect("usable");
        assert_eq!((f.revision, f.asids), (1, 16));
        assert!(!f.nrip_save && !f.decode_assists && !f.vmcb_clean && f.vgif);
    }

    #[test]
    fn bochs_ryzen_has_nested_paging_and_next_rip() {
        let f = decode(&BOCHS_RYZEN).expect("usable");
        assert_eq!((f.revision, f.asids), (1, 0x8000));
        assert!(f.nrip_save && f.flush_by_asid && f.pause_filter && !f.vgif);
    }

    #[test]
    fn no_svm_in_cpuid() {
        assert_eq!(decode(&RawSvm::default()), Err(Missing::Svm));
    }

    #[test]
    fn firmware_lock_is_told_apart_from_a_plain_disable() {
        let mut raw =
            RawSvm { cpuid_svm: true, ebx: 16, edx: edx::NESTED_PAGING, ..RawSvm::default() };
        raw.vm_cr = vm_cr::SVMDIS | vm_cr::LOCK;
        assert_eq!(decode(&raw), Err(Missing::DisabledByFirmware));
        raw.vm_cr = vm_cr::SVMDIS;
        assert_eq!(decode(&raw), Err(Missing::Disabled));
        raw.vm_cr = vm_cr::LOCK;
        assert!(decode(&raw).is_ok());
    }

    #[test]
    fn nested_paging_and_an_asid_are_required() {
        let raw = RawSvm { cpuid_svm: true, ebx: 16, ..RawSvm::default() };
        assert_eq!(decode(&raw), Err(Missing::NestedPaging));
        let raw = RawSvm { cpuid_svm: true, ebx: 1, edx: edx::NESTED_PAGING, ..RawSvm::default() };
        assert_eq!(decode(&raw), Err(Missing::Asids));
    }
}
