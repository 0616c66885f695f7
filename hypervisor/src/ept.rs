// SPDX-License-Identifier: MIT OR Apache-2.0
//! Extended page tables (SDM Vol. 3C 29.3): building a guest's EPT and walking it.
//!
//! Page-table frames come from a [`Frames`] source, so the same builder runs on the
//! hypervisor's identity-mapped memory and, in tests, on host memory. Mappings are
//! read/write/execute, write-back; 2-MiB pages where both addresses and the length allow,
//! 4-KiB pages otherwise. Nothing is mapped that the caller did not ask for.

/// Where page-table frames come from and how to reach them.
pub trait Frames {
    /// A zeroed 4-KiB frame's physical address.
    fn alloc(&mut self) -> Option<u64>;
    /// The table stored in frame `pa`.
    fn table(&mut self, pa: u64) -> &mut [u64; 512];
}

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const EXEC: u64 = 1 << 2;
const RWX: u64 = READ | WRITE | EXEC;
const MEMTYPE_WB: u64 = 6 << 3;
const LARGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const SIZE_2M: u64 = 2 << 20;
const SIZE_4K: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptError {
    /// No frame for a page table.
    OutOfFrames,
    /// Addresses or length not 4-KiB aligned, or beyond the 48-bit guest-physical space.
    Misaligned,
    /// Part of the range is already mapped.
    Overlap(u64),
}

/// The EPT pointer for a 4-level table at `pml4` (write-back, walk length 4).
pub const fn eptp(pml4: u64) -> u64 {
    pml4 | (3 << 3) | 6
}

/// Allocates an empty PML4 and returns its physical address.
pub fn new_root(f: &mut impl Frames) -> Result<u64, EptError> {
    f.alloc().ok_or(EptError::OutOfFrames)
}

fn index(gpa: u64, level: u32) -> usize {
    ((gpa >> (12 + 9 * level)) & 0x1ff) as usize
}

/// The next-level table under entry `i` of `table`, created if absent.
fn next(f: &mut impl Frames, table: u64, i: usize) -> Result<u64, EptError> {
    let e = f.table(table)[i];
    if e & RWX != 0 {
        if e & LARGE != 0 {
            return Err(EptError::Overlap(0));
        }
        return Ok(e & ADDR_MASK);
    }
    let t = f.alloc().ok_or(EptError::OutOfFrames)?;
    f.table(table)[i] = t | RWX;
    Ok(t)
}

/// Access a mapping allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    ReadWriteExecute,
    ReadWrite,
    Read,
}

impl Perm {
    const fn bits(self) -> u64 {
        match self {
            Perm::ReadWriteExecute => RWX,
            Perm::ReadWrite => READ | WRITE,
            Perm::Read => READ,
        }
    }
}

/// Maps guest-physical `[gpa, gpa + len)` to host-physical `[hpa, hpa + len)`, RWX.
pub fn map(f: &mut impl Frames, root: u64, gpa: u64, hpa: u64, len: u64) -> Result<(), EptError> {
    map_with(f, root, gpa, hpa, len, Perm::ReadWriteExecute)
}

/// Removes the leaves covering `[gpa, gpa + len)` (exactly as they were mapped: a large
/// page must be removed whole). Returns the bytes unmapped; the caller must INVEPT.
pub fn unmap(f: &mut impl Frames, root: u64, gpa: u64, len: u64) -> Result<u64, EptError> {
    if !(gpa | len).is_multiple_of(SIZE_4K) || gpa.checked_add(len).is_none_or(|e| e > 1 << 48) {
        return Err(EptError::Misaligned);
    }
    let mut off = 0;
    while off < len {
        let g = gpa + off;
        let mut table = root;
        let mut done = false;
        for level in (1..4).rev() {
            let e = f.table(table)[index(g, level)];
            if e & RWX == 0 {
                return Err(EptError::Overlap(g));
            }
            if level == 1 && e & LARGE != 0 {
                if !g.is_multiple_of(SIZE_2M) || len - off < SIZE_2M {
                    return Err(EptError::Misaligned);
                }
                f.table(table)[index(g, 1)] = 0;
                off += SIZE_2M;
                done = true;
                break;
            }
            table = e & ADDR_MASK;
        }
        if !done {
            let slot = &mut f.table(table)[index(g, 0)];
            if *slot & RWX == 0 {
                return Err(EptError::Overlap(g));
            }
            *slot = 0;
            off += SIZE_4K;
        }
    }
    Ok(len)
}

/// Maps guest-physical `[gpa, gpa + len)` to host-physical `[hpa, hpa + len)` with `perm`.
pub fn map_with(
    f: &mut impl Frames,
    root: u64,
    gpa: u64,
    hpa: u64,
    len: u64,
    perm: Perm,
) -> Result<(), EptError> {
    if !(gpa | hpa | len).is_multiple_of(SIZE_4K)
        || gpa.checked_add(len).is_none_or(|e| e > 1 << 48)
    {
        return Err(EptError::Misaligned);
    }
    let mut off = 0;
    while off < len {
        let (g, h) = (gpa + off, hpa + off);
        let pdpt = next(f, root, index(g, 3))?;
        let pd = next(f, pdpt, index(g, 2))?;
        if g % SIZE_2M == 0 && h % SIZE_2M == 0 && len - off >= SIZE_2M {
            let slot = &mut f.table(pd)[index(g, 1)];
            if *slot & RWX != 0 {
                return Err(EptError::Overlap(g));
            }
            *slot = h | perm.bits() | MEMTYPE_WB | LARGE;
            off += SIZE_2M;
        } else {
            let pt = next(f, pd, index(g, 1)).map_err(|_| EptError::Overlap(g))?;
            let slot = &mut f.table(pt)[index(g, 0)];
            if *slot & RWX != 0 {
                return Err(EptError::Overlap(g));
            }
            *slot = h | perm.bits() | MEMTYPE_WB;
            off += SIZE_4K;
        }
    }
    Ok(())
}

/// Translates `gpa` through the EPT at `root`: the host-physical address, or `None`.
pub fn translate(f: &mut impl Frames, root: u64, gpa: u64) -> Option<u64> {
    translate_perm(f, root, gpa).map(|(h, _)| h)
}

/// Like [`translate`], with the leaf's permission bits (R=1, W=2, X=4).
pub fn translate_perm(f: &mut impl Frames, root: u64, gpa: u64) -> Option<(u64, u64)> {
    let mut table = root;
    for level in (0..4).rev() {
        let e = f.table(table)[index(gpa, level)];
        if e & RWX == 0 {
            return None;
        }
        if level == 0 || (level == 1 && e & LARGE != 0) {
            let page = if level == 0 { SIZE_4K } else { SIZE_2M };
            return Some(((e & ADDR_MASK & !(page - 1)) + gpa % page, e & RWX));
        }
        table = e & ADDR_MASK;
    }
    None
}

/// Counts the bytes mapped under `root` (every leaf's page size).
pub fn mapped_bytes(f: &mut impl Frames, root: u64) -> u64 {
    fn walk(f: &mut impl Frames, table: u64, level: u32) -> u64 {
        let entries = *f.table(table);
        entries
            .iter()
            .filter(|e| *e & RWX != 0)
            .map(|e| match level {
                0 => SIZE_4K,
                1 if e & LARGE != 0 => SIZE_2M,
                _ => walk(f, e & ADDR_MASK, level - 1),
            })
            .sum()
    }
    walk(f, root, 3)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Frames on the host heap, at fake physical addresses.
    #[derive(Default)]
    pub struct HostFrames {
        tables: HashMap<u64, Box<[u64; 512]>>,
        next: u64,
    }

    impl Frames for HostFrames {
        fn alloc(&mut self) -> Option<u64> {
            self.next += SIZE_4K;
            let pa = 0x7000_0000_0000 + self.next;
            self.tables.insert(pa, Box::new([0; 512]));
            Some(pa)
        }
        fn table(&mut self, pa: u64) -> &mut [u64; 512] {
            self.tables.get_mut(&pa).expect("a table frame")
        }
    }

    #[test]
    fn partition_is_mapped_with_large_pages() {
        let mut f = HostFrames::default();
        let root = new_root(&mut f).unwrap();
        map(&mut f, root, 0, 0x4000_0000, 16 << 20).unwrap();
        assert_eq!(translate(&mut f, root, 0), Some(0x4000_0000));
        assert_eq!(translate(&mut f, root, 0x12_3456), Some(0x4012_3456));
        assert_eq!(translate(&mut f, root, (16 << 20) - 1), Some(0x40ff_ffff));
        assert_eq!(translate(&mut f, root, 16 << 20), None);
        assert_eq!(mapped_bytes(&mut f, root), 16 << 20);
        // PML4, PDPT, PD: nothing more for 2-MiB pages.
        assert_eq!(f.tables.len(), 3);
    }

    #[test]
    fn permissions_and_unmap() {
        let mut f = HostFrames::default();
        let root = new_root(&mut f).unwrap();
        map(&mut f, root, 0, 0x4000_0000, 4 << 20).unwrap();
        map_with(&mut f, root, 0xc000_0000, 0x8000_0000, 2 << 20, Perm::Read).unwrap();
        map_with(&mut f, root, 0xc020_0000, 0x8020_0000, 8192, Perm::ReadWrite).unwrap();
        assert_eq!(translate_perm(&mut f, root, 0xc000_1234), Some((0x8000_1234, 1)));
        assert_eq!(translate_perm(&mut f, root, 0xc020_1000), Some((0x8020_1000, 3)));
        assert_eq!(mapped_bytes(&mut f, root), (6 << 20) + 8192);
        assert_eq!(unmap(&mut f, root, 0xc020_0000, 8192), Ok(8192));
        assert_eq!(translate(&mut f, root, 0xc020_0000), None);
        assert_eq!(
            unmap(&mut f, root, 0xc000_0000, 4096),
            Err(EptError::Misaligned),
            "half a large page"
        );
        assert_eq!(unmap(&mut f, root, 0xc000_0000, 2 << 20), Ok(2 << 20));
        assert!(
            matches!(unmap(&mut f, root, 0xc000_0000, 4096), Err(EptError::Overlap(_))),
            "nothing there"
        );
        assert_eq!(mapped_bytes(&mut f, root), 4 << 20, "the partition is untouched");
    }

    #[test]
    fn overlaps_and_misalignment_are_refused() {
        let mut f = HostFrames::default();
        let root = new_root(&mut f).unwrap();
        map(&mut f, root, 0, 0x20_0000, 4 << 20).unwrap();
        assert!(matches!(map(&mut f, root, 0x20_0000, 0x80_0000, 4096), Err(EptError::Overlap(_))));
        assert_eq!(map(&mut f, root, 0x1234, 0, 4096), Err(EptError::Misaligned));
        assert_eq!(map(&mut f, root, 1 << 48, 0, 4096), Err(EptError::Misaligned));
    }

    proptest! {
        /// The EPT maps exactly the partition: every guest-physical address inside it goes
        /// to the same offset in the host range, nothing outside it is mapped, and the total
        /// mapped equals the partition size.
        #[test]
        fn maps_exactly_the_partition(
            pages_4k in 1u64..3000,
            base_4k in 0u64..100_000,
            probes in prop::collection::vec(0u64..(1 << 34), 64),
        ) {
            let size = pages_4k * SIZE_4K;
            let base = 0x1_0000_0000 + base_4k * SIZE_4K;
            let mut f = HostFrames::default();
            let root = new_root(&mut f).unwrap();
            map(&mut f, root, 0, base, size).unwrap();
            prop_assert_eq!(mapped_bytes(&mut f, root), size);
            for g in probes.iter().copied().chain([0, size - 1, size]) {
                let t = translate(&mut f, root, g);
                if g < size {
                    prop_assert_eq!(t, Some(base + g));
                } else {
                    prop_assert_eq!(t, None);
                }
            }
        }
    }
}
