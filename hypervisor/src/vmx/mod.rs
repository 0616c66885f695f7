// SPDX-License-Identifier: MIT OR Apache-2.0
//! VMX operation on one core: feature control, the CR0/CR4 fixed bits and VMXON
//! (SDM Vol. 3C 24.7, 24.8). Each core runs this on itself with its own VMXON region.

pub mod exit;
pub mod features;
pub mod setup;
pub mod vcpu;
pub mod vmcs;

pub use features::Features;

use core::cell::UnsafeCell;
use core::fmt;

/// A core's VMXON region (SDM Vol. 3C 25.11.5): a page-aligned 4-KiB page handed to the
/// processor by its core, written by that core only (hence the cell).
#[repr(C, align(4096))]
pub struct VmxonRegion(UnsafeCell<[u8; 4096]>);
const _: () = assert!(core::mem::size_of::<VmxonRegion>() == 4096);

// SAFETY: region i is touched only by core i (`enable_on_this_core`).
unsafe impl Sync for VmxonRegion {}

/// Each core's VMXON region, by slot index (`percpu`).
static VMXON: [VmxonRegion; crate::percpu::MAX_CORES] =
    [const { VmxonRegion(UnsafeCell::new([0; 4096])) }; crate::percpu::MAX_CORES];

impl VmxonRegion {
    /// Zeroes the page and writes the VMCS revision identifier into its first dword
    /// (SDM Vol. 3C 25.2: bit 31 clear for a VMXON region or ordinary VMCS); returns its
    /// address.
    ///
    /// # Safety
    /// The processor does not use the page yet (before VMXON), and only the owning core
    /// calls this.
    pub unsafe fn prepare(&self, revision: u32) -> u64 {
        let p = self.0.get();
        // SAFETY: owned by the calling core and not yet handed to the processor.
        unsafe {
            p.write_bytes(0, 1);
            (p as *mut u32).write(revision & 0x7fff_ffff);
        }
        p as u64
    }
}

/// Why VMXON did not happen on a core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// This core's IA32_FEATURE_CONTROL differs from the BSP's and is locked off.
    FeatureControlLocked,
    /// The VMX fixed bits of CR0 or CR4 would clear a bit the hypervisor needs.
    FixedBits,
    /// VMXON itself failed (VMfailInvalid or VMfailValid).
    VmxonFailed,
}

impl VmxError {
    /// Short reason for the core record.
    pub fn as_str(self) -> &'static str {
        match self {
            VmxError::FeatureControlLocked => "feature-control locked off",
            VmxError::FixedBits => "CR0/CR4 fixed bits conflict",
            VmxError::VmxonFailed => "VMXON failed",
        }
    }
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(target_os = "none")]
/// Enters VMX root operation on the calling core.
///
/// # Safety
/// Called once per core, after `percpu::init_this_core`, with the BSP's decoded features.
pub unsafe fn enable_on_this_core(f: &Features) -> Result<(), VmxError> {
    use crate::arch::{rdmsr, read_cr0, read_cr4, write_cr0, write_cr4, wrmsr};
    use features::feature_control::{LOCK, VMX_OUTSIDE_SMX};
    use x86::msr;

    // CPUID.VMX was checked by the probe on the BSP; all cores of a machine share a model.
    // SAFETY: IA32_FEATURE_CONTROL exists.
    let fc = unsafe { rdmsr(msr::IA32_FEATURE_CONTROL) };
    if fc & LOCK == 0 {
        // SAFETY: setting VMX-outside-SMX and the lock is the architected enabling sequence.
        unsafe { wrmsr(msr::IA32_FEATURE_CONTROL, fc | VMX_OUTSIDE_SMX | LOCK) };
    } else if fc & VMX_OUTSIDE_SMX == 0 {
        return Err(VmxError::FeatureControlLocked);
    }

    // Whatever ran on this core since boot, VMX starts from caches on and the reset PAT:
    // the host never runs with CR0.CD or CR0.NW set (a guest cannot change them either).
    // SAFETY: paging is on with the boot identity tables; IA32_PAT exists with VMX.
    unsafe { crate::arch::caches_on() };

    const CR0_KEEP: u64 = (1 << 31) | (1 << 16) | 1; // PG, WP, PE
    const CR4_KEEP: u64 = 1 << 5; // PAE
    const CR4_VMXE: u64 = 1 << 13;
    let raw = &f.raw;
    let no_cache_bits = crate::arch::CR0_CD | crate::arch::CR0_NW;
    if raw.cr0_fixed0 & no_cache_bits != 0 {
        return Err(VmxError::FixedBits);
    }
    let cr0 = features::fix_cr(read_cr0(), raw.cr0_fixed0, raw.cr0_fixed1, CR0_KEEP)
        .ok_or(VmxError::FixedBits)?;
    let cr4 = features::fix_cr(
        read_cr4() | CR4_VMXE,
        raw.cr4_fixed0,
        raw.cr4_fixed1,
        CR4_KEEP | CR4_VMXE,
    )
    .ok_or(VmxError::FixedBits)?;
    // SAFETY: both values keep PG/PE/WP/PAE (checked by fix_cr) and only add what VMX needs.
    unsafe {
        write_cr0(cr0);
        write_cr4(cr4);
    }
    // init_this_core ran (caller's guarantee), so this core has its slot index.
    let me = crate::percpu::current_index().expect("per-core state not initialised");
    // SAFETY: the region belongs to this core and the processor does not use it yet.
    let region = unsafe { VMXON[me].prepare(f.revision) };
    // SAFETY: region prepared above; CR0/CR4/feature control satisfy VMXON's requirements.
    unsafe { crate::arch::vmxon(region) }.map_err(|_| VmxError::VmxonFailed)
}

#[cfg(test)]
mod tests {
    /// What names a VMCS field: the field modules of `vmx::vmcs`, the `x86` crate's VMCS
    /// encodings and controls; and for the SVM backend (issue 24), its VMCB.
    /// The VMX basic reasons (`vmx::exit::reason`) stay inside the backend too: everything
    /// else dispatches on `vcpu::ExitKind`.
    const PATTERNS: [&str; 6] =
        ["vmx::vmcs", "vmcs::{", "x86::vmx::vmcs", "svm::vmcb", "vmcb::{", "exit::reason"];

    /// The backends: the only folders whose files may name those.
    const BACKENDS: [&str; 2] = ["vmx/", "svm/"];

    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).expect("reading the source tree") {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// Only a backend names its control structure's fields: everything else reaches the
    /// guest's state through the vCPU interface (`vcpu`). No exceptions (issue 23 emptied
    /// the list of files still to move).
    #[test]
    fn no_module_outside_vmx_names_a_vmcs_field() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&root, &mut files);
        let mut naming = Vec::new();
        for f in &files {
            let rel = f.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
            if BACKENDS.iter().any(|b| rel.starts_with(b)) {
                continue;
            }
            let text = std::fs::read_to_string(f).unwrap();
            let code = text.lines().filter(|l| !l.trim_start().starts_with("//"));
            if code.into_iter().any(|l| PATTERNS.iter().any(|p| l.contains(p))) {
                naming.push(rel);
            }
        }
        naming.sort();
        assert!(files.len() > 20, "the source tree was found");
        assert!(
            naming.is_empty(),
            "{naming:?} name a VMCS (or VMCB) field: only `vmx/` (and `svm/`) may; use the \
             vCPU interface (`vcpu`)"
        );
    }
}
