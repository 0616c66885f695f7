// SPDX-License-Identifier: MIT OR Apache-2.0
//! Programming a guest's VMCS (SDM Vol. 3C chapter 25): its controls adjusted to what the
//! processor allows, its MSR and I/O bitmaps, the host state of this core and the guest's
//! initial state, from the backend-neutral `vcpu::Setup`. The policy it carries is the exit
//! handlers' (`exits`: the owned CR bits, the pass-through MSRs).
//!
//! Owns nothing past the call. May call: `vmx::vmcs`, `vmx::features`, `arch` (host state),
//! `ept` (frames for the bitmaps), `percpu` (this core's tables), `exits` (policy
//! constants), `vcpu` (`Setup`).

use super::features::ControlCaps;
#[cfg(target_os = "none")]
use super::vmcs::{ctl, g, h};
#[cfg(target_os = "none")]
use super::Features;
#[cfg(target_os = "none")]
use crate::vcpu::Setup;
#[cfg(target_os = "none")]
use crate::{arch, ept, exits};
#[cfg(target_os = "none")]
use x86::vmx::vmcs::control::{EntryControls, ExitControls, PinbasedControls, PrimaryControls};

#[cfg(target_os = "none")]
fn adjust(caps: u64, wanted: u32, what: &'static str) -> Result<u32, &'static str> {
    ControlCaps(caps).adjust(wanted).ok_or(what)
}

/// The secondary processor-based controls (SDM Vol. 3C 25.6.2, Table 25-7) for `caps`
/// (IA32_VMX_PROCBASED_CTLS2): EPT and VPID, required; RDTSCP where allowed (else it is
/// #UD in the guest); WBINVD exiting where allowed, so WBINVD is a counted no-op like INVD
/// instead of a cache flush that hits every core (the exit policy in `exits`).
pub fn secondary_controls(caps: ControlCaps) -> Option<u32> {
    use x86::vmx::vmcs::control::SecondaryControls as S;
    let mut want = S::ENABLE_EPT | S::ENABLE_VPID;
    for optional in [S::ENABLE_RDTSCP, S::WBINVD_EXITING] {
        if caps.allows(optional.bits()) {
            want |= optional;
        }
    }
    caps.adjust(want.bits())
}

#[cfg(target_os = "none")]
/// Programs the current VMCS for a guest (see `vcpu::Vcpu::setup` for what it must hold):
/// its controls from the capability MSRs in `f`, its MSR and I/O bitmaps in frames of
/// `frames`, the host state of this core, the guest state of `s`. Returns the primary
/// processor-based controls as set.
pub fn program(
    f: &Features,
    s: &Setup,
    frames: &mut impl ept::Frames,
    io_ports: impl Iterator<Item = u16> + Clone,
) -> Result<u32, &'static str> {
    let raw = &f.raw;
    // A guest with channels takes its doorbells straight through its own IDT: no exit
    // for external interrupts, and HLT really halts until the doorbell (or the
    // preemption timer) comes. Guests without channels keep both exits, so that a HLT
    // that can never wake is caught at once.
    let direct = s.direct_interrupts;
    let mwait = s.exitless_mwait;
    // The guest's own I/O BARs pass without exits: then I/O bitmaps, else every port exits.
    let io_bitmap = io_ports.clone().next().is_some();
    let mut pin_want = PinbasedControls::NMI_EXITING | PinbasedControls::VMX_PREEMPTION_TIMER;
    if !direct {
        pin_want |= PinbasedControls::EXTERNAL_INTERRUPT_EXITING;
    }
    let pin = adjust(raw.pinbased, pin_want.bits(), "pin-based controls")?;
    let cr8 = (1 << 19) | (1 << 20); // CR8-load and CR8-store exiting
    let proc = adjust(
        raw.procbased,
        (if direct { PrimaryControls::empty() } else { PrimaryControls::HLT_EXITING }
            | if io_bitmap {
                PrimaryControls::USE_IO_BITMAPS
            } else {
                PrimaryControls::UNCOND_IO_EXITING
            }
            | PrimaryControls::USE_MSR_BITMAPS
            | if mwait {
                PrimaryControls::empty()
            } else {
                PrimaryControls::MWAIT_EXITING | PrimaryControls::MONITOR_EXITING
            }
            | PrimaryControls::SECONDARY_CONTROLS)
            .bits()
            | cr8,
        "primary processor-based controls",
    )?;
    adjust(
        raw.procbased,
        PrimaryControls::INTERRUPT_WINDOW_EXITING.bits(),
        "interrupt-window exiting",
    )?;
    let proc2 = secondary_controls(ControlCaps(raw.procbased2)).ok_or("secondary controls")?;
    let exitc = adjust(
        raw.exit,
        (ExitControls::HOST_ADDRESS_SPACE_SIZE
            | ExitControls::ACK_INTERRUPT_ON_EXIT
            | ExitControls::SAVE_IA32_EFER
            | ExitControls::LOAD_IA32_EFER
            | ExitControls::SAVE_IA32_PAT
            | ExitControls::LOAD_IA32_PAT)
            .bits(),
        "exit controls",
    )?;
    let entryc = adjust(
        raw.entry,
        (EntryControls::IA32E_MODE_GUEST
            | EntryControls::LOAD_IA32_EFER
            | EntryControls::LOAD_IA32_PAT)
            .bits(),
        "entry controls",
    )?;

    // MSR bitmap: every access exits but the pass-through and switched lists (SDM Vol.
    // 3C 25.6.9).
    let bitmap = ept::Frames::alloc(frames).ok_or("private region exhausted")?;
    // SAFETY: a frame of this core's private region, identity-mapped.
    let bm = unsafe { core::slice::from_raw_parts_mut(bitmap as *mut u8, 4096) };
    bm.fill(0xff);
    for msr in exits::MSR_PASSTHROUGH.into_iter().chain(exits::MSR_SWITCHED) {
        let bit = (msr & 0x1fff) as usize;
        let high = if msr >= 0xc000_0000 { 1024 } else { 0 };
        for base in [high, 2048 + high] {
            bm[base + bit / 8] &= !(1 << (bit % 8));
        }
    }
    if direct {
        // Writes to the x2APIC EOI register: the doorbell and device handlers acknowledge
        // their own interrupts. EOI only retires the highest in-service vector, which on
        // this core can only be the guest's own (its doorbell or its devices' vectors):
        // the hypervisor takes no interrupts, and device lines reach only their owner.
        let bit = exits::MSR_X2APIC_EOI as usize;
        bm[2048 + bit / 8] &= !(1 << (bit % 8));
    }

    // SAFETY: this core's slot is initialised; reading its own tables' addresses.
    let me = unsafe { crate::percpu::this_core() };
    // SAFETY: EFER exists on every processor with long mode.
    let efer = unsafe { arch::rdmsr(x86::msr::IA32_EFER) };
    // SAFETY: PAT exists on every processor with VMX (the VMCS has a field for it).
    let pat = unsafe { arch::rdmsr(x86::msr::IA32_PAT) };
    let guest_cr0 =
        super::features::fix_cr(0x8001_0033, raw.cr0_fixed0, raw.cr0_fixed1, 0x8000_0001)
            .ok_or("guest CR0 fixed bits")?;
    let guest_cr4 = (0x20 | raw.cr4_fixed0) & raw.cr4_fixed1;
    let w = |fld: super::vmcs::Rw, v: u64| -> Result<(), &'static str> {
        // Values computed above from the capability MSRs and our own tables.
        // SAFETY: this core's fresh VMCS is current.
        unsafe { fld.write(v) }.map_err(|_| "VMWRITE failed")
    };
    w(ctl::PINBASED, pin as u64)?;
    w(ctl::PROCBASED, proc as u64)?;
    w(ctl::PROCBASED2, proc2 as u64)?;
    w(ctl::EXIT, exitc as u64)?;
    w(ctl::ENTRY, entryc as u64)?;
    w(ctl::EXCEPTION_BITMAP, 0)?;
    w(ctl::CR3_TARGET_COUNT, 0)?;
    w(ctl::MSR_BITMAP, bitmap)?;
    if io_bitmap {
        // I/O bitmaps (SDM Vol. 3C 25.6.4): every port exits but the owner's I/O BARs.
        let a = ept::Frames::alloc(frames).ok_or("private region exhausted")?;
        let b = ept::Frames::alloc(frames).ok_or("private region exhausted")?;
        for frame in [a, b] {
            // SAFETY: fresh frames of this core's private region, identity-mapped.
            unsafe { (frame as *mut u8).write_bytes(0xff, 4096) };
        }
        for port in io_ports {
            let (frame, bit) = if port < 0x8000 { (a, port) } else { (b, port - 0x8000) };
            // SAFETY: as above; `bit / 8` < 4096.
            unsafe { *((frame + bit as u64 / 8) as *mut u8) &= !(1 << (bit % 8)) };
        }
        w(ctl::IO_BITMAP_A, a)?;
        w(ctl::IO_BITMAP_B, b)?;
    }
    w(ctl::EPTP, s.nested_root)?;
    w(ctl::VPID, u64::from(s.tag))?;
    w(ctl::CR0_MASK, exits::CR0_MASK)?;
    w(ctl::CR0_SHADOW, guest_cr0)?;
    w(ctl::CR4_MASK, exits::CR4_MASK)?;
    w(ctl::CR4_SHADOW, guest_cr4 & !(1 << 13))?;

    w(h::CR0, arch::read_cr0())?;
    w(h::CR3, arch::read_cr3())?;
    w(h::CR4, arch::read_cr4())?;
    w(h::CS_SEL, crate::arch::gdt::CODE_SELECTOR as u64)?;
    for s in [h::SS_SEL, h::DS_SEL, h::ES_SEL] {
        w(s, crate::arch::gdt::DATA_SELECTOR as u64)?;
    }
    w(h::FS_SEL, 0)?;
    w(h::GS_SEL, 0)?;
    w(h::TR_SEL, crate::arch::gdt::TSS_SELECTOR as u64)?;
    w(h::FS_BASE, 0)?;
    w(h::GS_BASE, arch::read_gs_base())?;
    w(h::TR_BASE, &me.tss as *const _ as u64)?;
    w(h::GDTR_BASE, me.gdt.as_ptr() as u64)?;
    w(h::IDTR_BASE, &me.idt as *const _ as u64)?;
    w(h::EFER, efer)?;
    w(h::PAT, pat)?;
    w(h::SYSENTER_CS, 0)?;
    w(h::SYSENTER_ESP, 0)?;
    w(h::SYSENTER_EIP, 0)?;
    w(h::RIP, arch::vmx::exit_landing())?;

    w(g::CR0, guest_cr0)?;
    w(g::CR3, s.cr3)?;
    w(g::CR4, guest_cr4)?;
    w(g::DR7, 0x400)?;
    w(g::RSP, s.rsp)?;
    w(g::RIP, s.rip)?;
    w(g::RFLAGS, 0x2)?;
    w(g::CS_SEL, 0x08)?;
    w(g::CS_BASE, 0)?;
    w(g::CS_LIMIT, 0xffff_ffff)?;
    w(g::CS_AR, 0xa09b)?;
    for (sel, base, limit, ar) in [
        (g::SS_SEL, g::SS_BASE, g::SS_LIMIT, g::SS_AR),
        (g::DS_SEL, g::DS_BASE, g::DS_LIMIT, g::DS_AR),
        (g::ES_SEL, g::ES_BASE, g::ES_LIMIT, g::ES_AR),
        (g::FS_SEL, g::FS_BASE, g::FS_LIMIT, g::FS_AR),
        (g::GS_SEL, g::GS_BASE, g::GS_LIMIT, g::GS_AR),
    ] {
        w(sel, 0x10)?;
        w(base, 0)?;
        w(limit, 0xffff_ffff)?;
        w(ar, 0xc093)?;
    }
    w(g::LDTR_SEL, 0)?;
    w(g::LDTR_BASE, 0)?;
    w(g::LDTR_LIMIT, 0)?;
    w(g::LDTR_AR, 0x1_0000)?; // unusable
    w(g::TR_SEL, 0)?;
    w(g::TR_BASE, 0)?;
    w(g::TR_LIMIT, 0x67)?;
    w(g::TR_AR, 0x8b)?; // busy 64-bit TSS
    w(g::GDTR_BASE, 0)?;
    w(g::GDTR_LIMIT, 0)?;
    w(g::IDTR_BASE, 0)?;
    w(g::IDTR_LIMIT, 0)?;
    w(g::EFER, 0x500)?; // LME | LMA
    w(g::PAT, pat)?;
    w(g::INTERRUPTIBILITY, 0)?;
    w(g::ACTIVITY, 0)?;
    w(g::PENDING_DBG, 0)?;
    w(g::LINK_PTR, u64::MAX)?;
    w(g::SYSENTER_CS, 0)?;
    w(g::SYSENTER_ESP, 0)?;
    w(g::SYSENTER_EIP, 0)?;
    Ok(proc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wbinvd_exits_where_the_processor_allows_it() {
        let (ept, vpid, rdtscp, wbinvd) = (1u64 << 1, 1u64 << 5, 1u64 << 3, 1u64 << 6);
        let all = ControlCaps((ept | vpid | rdtscp | wbinvd) << 32);
        assert_eq!(secondary_controls(all), Some((ept | vpid | rdtscp | wbinvd) as u32));
        let no_wbinvd = ControlCaps((ept | vpid | rdtscp) << 32);
        assert_eq!(secondary_controls(no_wbinvd), Some((ept | vpid | rdtscp) as u32));
        let bare = ControlCaps((ept | vpid) << 32);
        assert_eq!(secondary_controls(bare), Some((ept | vpid) as u32));
        assert_eq!(secondary_controls(ControlCaps(ept << 32)), None, "VPID is required");
    }
}
