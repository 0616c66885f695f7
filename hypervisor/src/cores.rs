// SPDX-License-Identifier: MIT OR Apache-2.0
//! Which cores the machine has: the ACPI MADT's processor entries (local APIC and local
//! x2APIC), read with the `acpi` crate, turned into the list of cores this run uses.
//!
//! Rules (kept in [`CoreList::build`], a pure function tested on the host):
//! * only processors whose MADT entry has the Enabled flag are used; online-capable but
//!   disabled ones are counted as skipped;
//! * an APIC id listed twice (an xAPIC and an x2APIC entry) is one core;
//! * the bootstrap processor is core 0; it must be in the MADT (cross-check with CPUID);
//! * the `cpus=` cap and [`MAX_CORES`] keep the first entries in MADT order, BSP always.

use crate::percpu::MAX_CORES;
use core::fmt;

/// One processor entry of the MADT, as the hypervisor sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MadtCpu {
    pub apic_id: u32,
    pub enabled: bool,
    /// From a local x2APIC entry (type 9) rather than a local APIC entry (type 0).
    pub x2apic_entry: bool,
}

/// A core this run brings up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Core {
    pub apic_id: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoreListError {
    /// The MADT lists no enabled processor.
    Empty,
    /// The processor we run on is not in the MADT.
    BspNotListed(u32),
}

impl fmt::Display for CoreListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreListError::Empty => f.write_str("the MADT lists no enabled processor"),
            CoreListError::BspNotListed(id) => write!(
                f,
                "the bootstrap processor (APIC id {id} by CPUID) is not an enabled MADT entry"
            ),
        }
    }
}

/// The cores of this run, BSP first.
#[derive(Clone, Debug)]
pub struct CoreList {
    cores: [Core; MAX_CORES],
    len: usize,
    /// Enabled processors in the MADT (before the cap).
    pub enabled: usize,
    pub skipped_disabled: usize,
    pub skipped_capped: usize,
    pub skipped_unaddressable: usize,
}

impl CoreList {
    /// Builds the list from MADT processor entries. `addressable` says whether the BSP can
    /// send IPIs to an id (xAPIC mode reaches ids below 255 only).
    pub fn build(
        entries: impl IntoIterator<Item = MadtCpu>,
        bsp_apic: u32,
        cap: Option<usize>,
        addressable: impl Fn(u32) -> bool,
    ) -> Result<Self, CoreListError> {
        let limit = cap.unwrap_or(MAX_CORES).clamp(1, MAX_CORES);
        let mut l = CoreList {
            cores: [Core { apic_id: 0 }; MAX_CORES],
            len: 1,
            enabled: 0,
            skipped_disabled: 0,
            skipped_capped: 0,
            skipped_unaddressable: 0,
        };
        l.cores[0] = Core { apic_id: bsp_apic };
        let mut seen: [u32; 4 * MAX_CORES] = [0; 4 * MAX_CORES];
        let mut nseen = 0;
        let mut bsp_found = false;
        for e in entries {
            if seen[..nseen].contains(&e.apic_id) {
                continue;
            }
            if nseen < seen.len() {
                seen[nseen] = e.apic_id;
                nseen += 1;
            }
            if !e.enabled {
                l.skipped_disabled += 1;
                continue;
            }
            l.enabled += 1;
            if e.apic_id == bsp_apic {
                bsp_found = true;
                continue;
            }
            if !addressable(e.apic_id) {
                l.skipped_unaddressable += 1;
            } else if l.len >= limit {
                l.skipped_capped += 1;
            } else {
                l.cores[l.len] = Core { apic_id: e.apic_id };
                l.len += 1;
            }
        }
        if l.enabled == 0 {
            return Err(CoreListError::Empty);
        }
        if !bsp_found {
            return Err(CoreListError::BspNotListed(bsp_apic));
        }
        Ok(l)
    }

    pub fn cores(&self) -> &[Core] {
        &self.cores[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

/// Checks the MADT's entry list before anything iterates it: every entry at least a header
/// long, none running past the table, processor entries of their architected sizes. (The
/// `acpi` crate's iterator trusts entry lengths: a zero length would loop forever.)
pub fn check_madt_entries(madt: core::pin::Pin<&acpi::madt::Madt>) -> Result<(), MadtFault> {
    let len = { madt.header.length } as usize;
    let head = core::mem::size_of::<acpi::madt::Madt>();
    if len < head {
        return Err(MadtFault { offset: 0, what: "table shorter than its header" });
    }
    // The acpi crate found and checksummed the table over its `length` bytes.
    // SAFETY: all `len` bytes of the table are therefore mapped and readable.
    let bytes = unsafe { core::slice::from_raw_parts(&*madt as *const _ as *const u8, len) };
    let mut at = head;
    while at < len {
        if len - at < 2 {
            return Err(MadtFault { offset: at, what: "truncated entry header" });
        }
        let (ty, elen) = (bytes[at], bytes[at + 1] as usize);
        if elen < 2 || elen > len - at {
            return Err(MadtFault { offset: at, what: "entry length out of bounds" });
        }
        let want = match ty {
            0 => 8,
            9 => 16,
            _ => elen,
        };
        if elen != want {
            return Err(MadtFault { offset: at, what: "processor entry of the wrong size" });
        }
        at += elen;
    }
    Ok(())
}

/// A malformed MADT: where, and what is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MadtFault {
    pub offset: usize,
    pub what: &'static str,
}

impl fmt::Display for MadtFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed MADT at byte {}: {}", self.offset, self.what)
    }
}

/// The processor entries of a MADT, in table order. Call [`check_madt_entries`] first.
pub fn madt_cpus(madt: core::pin::Pin<&acpi::madt::Madt>) -> impl Iterator<Item = MadtCpu> + '_ {
    use acpi::madt::MadtEntry;
    const ENABLED: u32 = 1;
    madt.entries().filter_map(|e| match e {
        MadtEntry::LocalApic(a) => Some(MadtCpu {
            apic_id: a.apic_id as u32,
            enabled: { a.flags } & ENABLED != 0,
            x2apic_entry: false,
        }),
        MadtEntry::LocalX2Apic(a) => Some(MadtCpu {
            apic_id: a.x2apic_id,
            enabled: { a.flags } & ENABLED != 0,
            x2apic_entry: true,
        }),
        _ => None,
    })
}

/// The first I/O APIC and the ISA interrupt source overrides of a MADT (call
/// [`check_madt_entries`] first): what device interrupts are routed through.
pub fn madt_ioapic(madt: core::pin::Pin<&acpi::madt::Madt>) -> crate::pci::ioapic::Platform {
    use acpi::madt::MadtEntry;
    let mut p = crate::pci::ioapic::Platform::default();
    for e in madt.entries() {
        match e {
            MadtEntry::IoApic(a) if p.base == 0 => {
                p.base = { a.io_apic_address } as u64;
                p.gsi_base = a.global_system_interrupt_base;
            }
            MadtEntry::InterruptSourceOverride(o) if p.override_count < p.overrides.len() => {
                p.overrides[p.override_count] =
                    ({ o.irq }, { o.global_system_interrupt }, { o.flags });
                p.override_count += 1;
            }
            _ => {}
        }
    }
    p
}

/// `acpi` handler for our identity-mapped address space: a physical address is its own
/// virtual address, so mapping is free and unmapping does nothing.
#[derive(Clone, Copy, Debug)]
pub struct IdentityMapped;

impl acpi::AcpiHandler for IdentityMapped {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> acpi::PhysicalMapping<Self, T> {
        let ptr =
            core::ptr::NonNull::new(physical_address as *mut T).expect("ACPI table at address 0");
        // The caller (the acpi crate) guarantees a valid T lives there.
        // SAFETY: identity mapping: the physical range is accessible at the same address.
        unsafe { acpi::PhysicalMapping::new(physical_address, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &acpi::PhysicalMapping<Self, T>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(apic_id: u32, enabled: bool) -> MadtCpu {
        MadtCpu { apic_id, enabled, x2apic_entry: false }
    }
    fn ids(l: &CoreList) -> Vec<u32> {
        l.cores().iter().map(|c| c.apic_id).collect()
    }

    #[test]
    fn bsp_first_then_madt_order() {
        let l = CoreList::build(
            [cpu(0, true), cpu(1, true), cpu(2, true), cpu(3, true)],
            2,
            None,
            |_| true,
        )
        .unwrap();
        assert_eq!(ids(&l), [2, 0, 1, 3]);
        assert_eq!(l.enabled, 4);
    }

    #[test]
    fn disabled_and_duplicate_entries() {
        let x2 = MadtCpu { apic_id: 1, enabled: true, x2apic_entry: true };
        let l = CoreList::build([cpu(0, true), cpu(1, true), x2, cpu(5, false)], 0, None, |_| true)
            .unwrap();
        assert_eq!(ids(&l), [0, 1]);
        assert_eq!(l.skipped_disabled, 1);
    }

    #[test]
    fn cap_keeps_the_bsp() {
        let all = [cpu(0, true), cpu(1, true), cpu(2, true), cpu(3, true)];
        let l = CoreList::build(all, 3, Some(2), |_| true).unwrap();
        assert_eq!(ids(&l), [3, 0]);
        assert_eq!(l.skipped_capped, 2);
        let l = CoreList::build(all, 0, Some(1), |_| true).unwrap();
        assert_eq!(ids(&l), [0]);
    }

    #[test]
    fn bsp_must_be_listed_and_enabled() {
        assert_eq!(
            CoreList::build([cpu(0, true), cpu(1, true)], 7, None, |_| true).unwrap_err(),
            CoreListError::BspNotListed(7)
        );
        assert_eq!(
            CoreList::build([cpu(0, false)], 0, None, |_| true).unwrap_err(),
            CoreListError::Empty
        );
        assert_eq!(CoreList::build([], 0, None, |_| true).unwrap_err(), CoreListError::Empty);
    }

    #[test]
    fn unaddressable_ids_are_skipped() {
        let l = CoreList::build([cpu(0, true), cpu(300, true)], 0, None, |id| id < 255).unwrap();
        assert_eq!(ids(&l), [0]);
        assert_eq!(l.skipped_unaddressable, 1);
    }

    fn madt_bytes(entries: &[&[u8]]) -> Vec<u64> {
        let mut t: Vec<u8> = Vec::new();
        t.extend_from_slice(b"APIC");
        t.extend_from_slice(&0u32.to_le_bytes()); // length, patched below
        t.extend_from_slice(&[1, 0]); // revision, checksum
        t.extend_from_slice(b"BOCHS BXPCAPIC"); // OEM id (6) and table id (8)
        t.extend_from_slice(&[0; 12]);
        t.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
        t.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT
        for e in entries {
            t.extend_from_slice(e);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        // Firmware tables are at least 8-byte aligned; copy into u64s to get that.
        let mut words = vec![0u64; t.len().div_ceil(8)];
        for (i, b) in t.iter().enumerate() {
            words[i / 8] |= (*b as u64) << (8 * (i % 8));
        }
        words
    }

    fn as_madt(words: &[u64]) -> core::pin::Pin<&acpi::madt::Madt> {
        // Test only.
        // SAFETY: the buffer holds a MADT built by `madt_bytes`, never moved while borrowed.
        unsafe { core::pin::Pin::new_unchecked(&*(words.as_ptr() as *const acpi::madt::Madt)) }
    }

    #[test]
    fn malformed_entry_lists_are_rejected() {
        let zero = madt_bytes(&[&[0, 8, 0, 0, 1, 0, 0, 0], &[3, 0]]);
        assert_eq!(
            check_madt_entries(as_madt(&zero)).unwrap_err().what,
            "entry length out of bounds"
        );
        let long = madt_bytes(&[&[0, 200, 0, 0, 1, 0, 0, 0]]);
        assert_eq!(check_madt_entries(as_madt(&long)).unwrap_err().offset, 44);
        let short_lapic = madt_bytes(&[&[0, 6, 0, 0, 1, 0]]);
        assert_eq!(
            check_madt_entries(as_madt(&short_lapic)).unwrap_err().what,
            "processor entry of the wrong size"
        );
        let tail = madt_bytes(&[&[0, 8, 0, 0, 1, 0, 0, 0], &[7]]);
        assert_eq!(check_madt_entries(as_madt(&tail)).unwrap_err().what, "truncated entry header");
    }

    /// A MADT as the Bochs BIOS builds it for 4 CPUs, plus an x2APIC entry and a disabled
    /// processor, parsed by the `acpi` crate from raw bytes.
    #[test]
    fn parses_raw_madt_bytes() {
        let x2: Vec<u8> =
            [&[9u8, 16, 0, 0][..], &260u32.to_le_bytes(), &1u32.to_le_bytes(), &5u32.to_le_bytes()]
                .concat();
        let words = madt_bytes(&[
            &[0, 8, 0, 0, 1, 0, 0, 0],
            &[0, 8, 1, 1, 1, 0, 0, 0],
            &[0, 8, 2, 2, 1, 0, 0, 0],
            &[0, 8, 3, 3, 1, 0, 0, 0],
            &[0, 8, 4, 4, 0, 0, 0, 0],                    // disabled
            &[1, 12, 4, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0], // I/O APIC
            &x2,
        ]);
        let pinned = as_madt(&words);
        check_madt_entries(pinned).unwrap();
        let cpus: Vec<MadtCpu> = madt_cpus(pinned).collect();
        assert_eq!(cpus.len(), 6);
        assert_eq!(cpus[5], MadtCpu { apic_id: 260, enabled: true, x2apic_entry: true });
        let l = CoreList::build(cpus, 0, None, |_| true).unwrap();
        assert_eq!(ids(&l), [0, 1, 2, 3, 260]);
        assert_eq!(l.skipped_disabled, 1);
        let l = CoreList::build(madt_cpus(pinned), 0, None, |id| id < 255).unwrap();
        assert_eq!(l.skipped_unaddressable, 1);
    }
}
