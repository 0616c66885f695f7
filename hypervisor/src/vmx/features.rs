// SPDX-License-Identifier: MIT OR Apache-2.0
//! The VMX feature probe: the raw CPUID bits and capability MSRs, read once on the BSP,
//! decoded into one [`Features`] value, or into the one [`Missing`] thing that stops us.
//!
//! Decoding is a pure function of [`RawCaps`], so it is tested on the host against values
//! recorded from the emulated processors (SDM Vol. 3D appendix A: VMX capability reporting).

use core::fmt;

/// Everything the probe reads, as read. MSRs that do not exist on the machine read as 0
/// (they are only read when CPUID/other MSRs say they exist).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawCaps {
    /// CPUID.01H:ECX.VMX[bit 5].
    pub cpuid_vmx: bool,
    pub feature_control: u64,
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    pub procbased2: u64,
    pub exit: u64,
    pub entry: u64,
    pub ept_vpid_cap: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    /// IA32_VMX_MISC: bits 4:0 give the preemption-timer rate.
    pub misc: u64,
}

/// IA32_FEATURE_CONTROL bits (SDM Vol. 3C 24.7).
pub mod feature_control {
    pub const LOCK: u64 = 1 << 0;
    pub const VMX_OUTSIDE_SMX: u64 = 1 << 2;
}

/// The one required thing the machine lacks. Its `Display` is the line the hypervisor prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    Vmx,
    VmxLockedOff,
    WriteBackVmcs,
    TrueControls,
    SecondaryControls,
    Ept,
    Vpid,
    UnrestrictedGuest,
    EptFourLevel,
    EptWriteBack,
    Invept,
    Invvpid,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Missing::Vmx => "VT-x (CPUID.01H:ECX.VMX[bit 5] is 0)",
            Missing::VmxLockedOff => {
                "VT-x disabled by firmware (IA32_FEATURE_CONTROL locked without VMX outside SMX)"
            }
            Missing::WriteBackVmcs => "write-back VMCS memory type (IA32_VMX_BASIC[53:50] != 6)",
            Missing::TrueControls => "TRUE VMX control MSRs (IA32_VMX_BASIC[bit 55] is 0)",
            Missing::SecondaryControls => {
                "secondary processor-based controls (IA32_VMX_PROCBASED_CTLS allowed-1 bit 31)"
            }
            Missing::Ept => "EPT (IA32_VMX_PROCBASED_CTLS2 allowed-1 bit 1)",
            Missing::Vpid => "VPID (IA32_VMX_PROCBASED_CTLS2 allowed-1 bit 5)",
            Missing::UnrestrictedGuest => {
                "unrestricted guest (IA32_VMX_PROCBASED_CTLS2 allowed-1 bit 7)"
            }
            Missing::EptFourLevel => "4-level EPT page walk (IA32_VMX_EPT_VPID_CAP bit 6)",
            Missing::EptWriteBack => "write-back EPT memory type (IA32_VMX_EPT_VPID_CAP bit 14)",
            Missing::Invept => "INVEPT single-context (IA32_VMX_EPT_VPID_CAP bits 20, 25)",
            Missing::Invvpid => "INVVPID single-context (IA32_VMX_EPT_VPID_CAP bits 32, 41)",
        })
    }
}

/// What the firmware left in IA32_FEATURE_CONTROL, and so what each core must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureControl {
    /// Locked with VMX outside SMX enabled: nothing to do.
    LockedOn,
    /// Unlocked: each core sets VMX-outside-SMX and the lock bit itself.
    Unlocked,
}

/// The decoded VMX capabilities mkvisor relies on (and a few it reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    pub revision: u32,
    pub vmxon_region_size: u32,
    pub feature_control: FeatureControl,
    pub ept_2m_pages: bool,
    pub ept_1g_pages: bool,
    pub ept_accessed_dirty: bool,
    pub preemption_timer: bool,
    pub apic_register_virtualization: bool,
    /// The VMX preemption timer counts down once every 2^shift TSC ticks.
    pub preemption_timer_shift: u32,
    pub raw: RawCaps,
}

/// A VMX control capability MSR: the low half lists bits that must be 1 (allowed-0
/// settings), the high half bits that may be 1 (allowed-1 settings). SDM Vol. 3D A.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlCaps(pub u64);

impl ControlCaps {
    pub fn may_be_one(self) -> u32 {
        (self.0 >> 32) as u32
    }
    pub fn allows(self, bits: u32) -> bool {
        self.may_be_one() & bits == bits
    }
    /// `wanted` with the bits that must be one added; `None` if it asks for a bit that may
    /// not be one.
    pub fn adjust(self, wanted: u32) -> Option<u32> {
        (wanted & !self.may_be_one() == 0).then_some(wanted | self.0 as u32)
    }
}

mod bits {
    pub const BASIC_MEMTYPE_SHIFT: u32 = 50;
    pub const BASIC_TRUE_CTLS: u64 = 1 << 55;
    pub const PROC_SECONDARY: u32 = 1 << 31;
    pub const PROC2_EPT: u32 = 1 << 1;
    pub const PROC2_VPID: u32 = 1 << 5;
    pub const PROC2_UNRESTRICTED: u32 = 1 << 7;
    pub const PROC2_APIC_REG_VIRT: u32 = 1 << 8;
    pub const PIN_PREEMPTION_TIMER: u32 = 1 << 6;
    pub const EPT_WALK4: u64 = 1 << 6;
    pub const EPT_WB: u64 = 1 << 14;
    pub const EPT_2M: u64 = 1 << 16;
    pub const EPT_1G: u64 = 1 << 17;
    pub const EPT_INVEPT: u64 = 1 << 20;
    pub const EPT_AD: u64 = 1 << 21;
    pub const EPT_INVEPT_SINGLE: u64 = 1 << 25;
    pub const INVVPID: u64 = 1 << 32;
    pub const INVVPID_SINGLE: u64 = 1 << 41;
}

/// Decodes the probe. The first missing requirement, in the order a reader would check
/// them, is the error.
pub fn decode(raw: &RawCaps) -> Result<Features, Missing> {
    use bits::*;
    if !raw.cpuid_vmx {
        return Err(Missing::Vmx);
    }
    let fc = raw.feature_control;
    let feature_control = if fc & feature_control::LOCK == 0 {
        FeatureControl::Unlocked
    } else if fc & feature_control::VMX_OUTSIDE_SMX != 0 {
        FeatureControl::LockedOn
    } else {
        return Err(Missing::VmxLockedOff);
    };
    if (raw.basic >> BASIC_MEMTYPE_SHIFT) & 0xf != 6 {
        return Err(Missing::WriteBackVmcs);
    }
    if raw.basic & BASIC_TRUE_CTLS == 0 {
        return Err(Missing::TrueControls);
    }
    if !ControlCaps(raw.procbased).allows(PROC_SECONDARY) {
        return Err(Missing::SecondaryControls);
    }
    let proc2 = ControlCaps(raw.procbased2);
    if !proc2.allows(PROC2_EPT) {
        return Err(Missing::Ept);
    }
    if !proc2.allows(PROC2_VPID) {
        return Err(Missing::Vpid);
    }
    if !proc2.allows(PROC2_UNRESTRICTED) {
        return Err(Missing::UnrestrictedGuest);
    }
    let cap = raw.ept_vpid_cap;
    if cap & EPT_WALK4 == 0 {
        return Err(Missing::EptFourLevel);
    }
    if cap & EPT_WB == 0 {
        return Err(Missing::EptWriteBack);
    }
    if cap & (EPT_INVEPT | EPT_INVEPT_SINGLE) != EPT_INVEPT | EPT_INVEPT_SINGLE {
        return Err(Missing::Invept);
    }
    if cap & (INVVPID | INVVPID_SINGLE) != INVVPID | INVVPID_SINGLE {
        return Err(Missing::Invvpid);
    }
    Ok(Features {
        revision: (raw.basic & 0x7fff_ffff) as u32,
        vmxon_region_size: ((raw.basic >> 32) & 0x1fff) as u32,
        feature_control,
        ept_2m_pages: cap & EPT_2M != 0,
        ept_1g_pages: cap & EPT_1G != 0,
        ept_accessed_dirty: cap & EPT_AD != 0,
        preemption_timer: ControlCaps(raw.pinbased).allows(PIN_PREEMPTION_TIMER),
        apic_register_virtualization: proc2.allows(PROC2_APIC_REG_VIRT),
        preemption_timer_shift: (raw.misc & 0x1f) as u32,
        raw: *raw,
    })
}

/// CR0 or CR4 forced into the VMX fixed bits: `(value | fixed0) & fixed1` (SDM Vol. 3D A.7,
/// A.8). Returns `None` if that would clear a bit of `keep` (bits the running code needs).
pub fn fix_cr(value: u64, fixed0: u64, fixed1: u64, keep: u64) -> Option<u64> {
    let v = (value | fixed0) & fixed1;
    (v & keep == value & keep).then_some(v)
}

#[cfg(target_os = "none")]
/// Reads the raw capabilities of the calling core.
pub fn read() -> RawCaps {
    use crate::arch::rdmsr;
    use x86::msr::*;
    let cpuid_vmx = raw_cpuid::CpuId::new().get_feature_info().is_some_and(|f| f.has_vmx());
    if !cpuid_vmx {
        return RawCaps::default();
    }
    // SDM Vol. 3D A.1: CPUID.VMX = 1 guarantees these MSRs.
    // SAFETY: IA32_FEATURE_CONTROL and the basic VMX capability MSRs 0x480-0x48a exist.
    let mut raw = unsafe {
        RawCaps {
            cpuid_vmx,
            feature_control: rdmsr(IA32_FEATURE_CONTROL),
            basic: rdmsr(IA32_VMX_BASIC),
            cr0_fixed0: rdmsr(IA32_VMX_CR0_FIXED0),
            cr0_fixed1: rdmsr(IA32_VMX_CR0_FIXED1),
            cr4_fixed0: rdmsr(IA32_VMX_CR4_FIXED0),
            cr4_fixed1: rdmsr(IA32_VMX_CR4_FIXED1),
            misc: rdmsr(IA32_VMX_MISC),
            ..RawCaps::default()
        }
    };
    let true_ctls = raw.basic & bits::BASIC_TRUE_CTLS != 0;
    // SAFETY: the TRUE_* MSRs exist when IA32_VMX_BASIC[55] is set; the legacy ones always.
    unsafe {
        let (pin, proc, exit, entry) = if true_ctls {
            (
                IA32_VMX_TRUE_PINBASED_CTLS,
                IA32_VMX_TRUE_PROCBASED_CTLS,
                IA32_VMX_TRUE_EXIT_CTLS,
                IA32_VMX_TRUE_ENTRY_CTLS,
            )
        } else {
            (
                IA32_VMX_PINBASED_CTLS,
                IA32_VMX_PROCBASED_CTLS,
                IA32_VMX_EXIT_CTLS,
                IA32_VMX_ENTRY_CTLS,
            )
        };
        raw.pinbased = rdmsr(pin);
        raw.procbased = rdmsr(proc);
        raw.exit = rdmsr(exit);
        raw.entry = rdmsr(entry);
    }
    if ControlCaps(raw.procbased).allows(bits::PROC_SECONDARY) {
        // SAFETY: PROCBASED_CTLS2 exists when secondary controls may be enabled (A.3.3).
        raw.procbased2 = unsafe { rdmsr(IA32_VMX_PROCBASED_CTLS2) };
        let p2 = ControlCaps(raw.procbased2);
        if p2.allows(bits::PROC2_EPT) || p2.allows(bits::PROC2_VPID) {
            // SAFETY: EPT_VPID_CAP exists when EPT or VPID may be enabled (A.10).
            raw.ept_vpid_cap = unsafe { rdmsr(IA32_VMX_EPT_VPID_CAP) };
        }
    }
    raw
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Recorded from Bochs 2.7, `cpu: model=corei7_skylake_x` (the hypervisor logs these
    /// at boot with `vmxcaps=1` on its command line).
    /// IA32_VMX_MISC as Bochs reports it (logged with `vmxcaps`): preemption-timer rate 0.
    const MISC_RECORDED: u64 = 0x6004_01e0;

    pub const BOCHS_SKYLAKE_X: RawCaps = RawCaps {
        cpuid_vmx: true,
        feature_control: 0x5,
        basic: 0x00d8_1000_0000_002b,
        pinbased: 0x0000_007f_0000_0016,
        procbased: 0xf7f9_fffe_0400_6172,
        procbased2: 0x0217_7fff_0000_0000,
        exit: 0x007f_ffff_0003_6dfb,
        entry: 0x0000_ffff_0000_11fb,
        ept_vpid_cap: 0x0000_0f01_0633_4141,
        cr0_fixed0: 0x8000_0021,
        cr0_fixed1: 0xffff_ffff,
        cr4_fixed0: 0x2000,
        cr4_fixed1: 0x0037_27ff,
        misc: MISC_RECORDED,
    };

    #[test]
    fn bochs_skylake_has_everything() {
        let f = decode(&BOCHS_SKYLAKE_X).expect("all features");
        assert_eq!(f.revision, 0x2b);
        assert_eq!(f.vmxon_region_size, 0x1000);
        assert_eq!(f.feature_control, FeatureControl::LockedOn);
        assert!(f.ept_2m_pages && f.ept_1g_pages && f.ept_accessed_dirty);
        assert!(f.preemption_timer && f.apic_register_virtualization);
        assert_eq!(f.preemption_timer_shift, 0);
    }

    #[test]
    fn no_vmx_in_cpuid() {
        assert_eq!(decode(&RawCaps::default()), Err(Missing::Vmx));
    }

    #[test]
    fn locked_feature_control_without_vmx() {
        let raw = RawCaps { feature_control: feature_control::LOCK, ..BOCHS_SKYLAKE_X };
        assert_eq!(decode(&raw), Err(Missing::VmxLockedOff));
        // Locked with only the SMX bit (bit 1) is still off outside SMX.
        let raw = RawCaps { feature_control: 0x3, ..BOCHS_SKYLAKE_X };
        assert_eq!(decode(&raw), Err(Missing::VmxLockedOff));
    }

    #[test]
    fn unlocked_feature_control_is_ours_to_set() {
        let raw = RawCaps { feature_control: 0, ..BOCHS_SKYLAKE_X };
        assert_eq!(decode(&raw).unwrap().feature_control, FeatureControl::Unlocked);
    }

    #[test]
    fn machine_without_ept() {
        let raw = RawCaps {
            procbased2: BOCHS_SKYLAKE_X.procbased2 & !(1 << 33),
            ept_vpid_cap: 0,
            ..BOCHS_SKYLAKE_X
        };
        let err = decode(&raw).unwrap_err();
        assert_eq!(err, Missing::Ept);
        assert!(err.to_string().starts_with("EPT "));
    }

    #[test]
    fn machine_without_vpid_or_unrestricted_guest() {
        let raw =
            RawCaps { procbased2: BOCHS_SKYLAKE_X.procbased2 & !(1 << 37), ..BOCHS_SKYLAKE_X };
        assert_eq!(decode(&raw), Err(Missing::Vpid));
        let raw =
            RawCaps { procbased2: BOCHS_SKYLAKE_X.procbased2 & !(1 << 39), ..BOCHS_SKYLAKE_X };
        assert_eq!(decode(&raw), Err(Missing::UnrestrictedGuest));
    }

    #[test]
    fn ept_capability_gaps() {
        let raw =
            RawCaps { ept_vpid_cap: BOCHS_SKYLAKE_X.ept_vpid_cap & !(1 << 6), ..BOCHS_SKYLAKE_X };
        assert_eq!(decode(&raw), Err(Missing::EptFourLevel));
        let raw =
            RawCaps { ept_vpid_cap: BOCHS_SKYLAKE_X.ept_vpid_cap & !(1 << 14), ..BOCHS_SKYLAKE_X };
        assert_eq!(decode(&raw), Err(Missing::EptWriteBack));
        let raw = RawCaps { basic: BOCHS_SKYLAKE_X.basic & !(1 << 55), ..BOCHS_SKYLAKE_X };
        assert_eq!(decode(&raw), Err(Missing::TrueControls));
    }

    #[test]
    fn control_adjustment() {
        let caps = ControlCaps(0x0000_00ff_0000_0016);
        assert_eq!(caps.adjust(0x40), Some(0x56));
        assert_eq!(caps.adjust(0x100), None);
    }

    #[test]
    fn cr_fixing_keeps_paging() {
        let cr0 = 0x8001_0033;
        assert_eq!(fix_cr(cr0, 0x8000_0021, 0xffff_ffff, 0x8000_0001), Some(0x8001_0033));
        // A fixed1 that forbids PG cannot be honoured.
        assert_eq!(fix_cr(cr0, 0x21, 0x7fff_ffff, 0x8000_0001), None);
        // CR4.VMXE (bit 13) gets forced on by fixed0.
        assert_eq!(fix_cr(0x20, 0x2000, 0x17_67ff, 0x20), Some(0x2020));
    }
}
