// SPDX-License-Identifier: MIT OR Apache-2.0
//! Nested page tables (AMD APM Vol. 2 15.25): what EPT is to VT-x. The format is the
//! ordinary x86-64 long-mode one (Vol. 2 5.3, "Long-Mode Page Translation"), four levels
//! from nCR3, not EPT's: P/RW/US bits instead of R/W/X, NX in bit 63 (honoured because the
//! backend turns host EFER.NXE on), no memory type in the entry (PAT/PCD/PWT pick it), and
//! every guest access counts as a user access (15.25.5), so every entry sets U/S.
//!
//! Built from the same partition description as the EPT ([`ept::Perm`] per range), with
//! the same frame source ([`ept::Frames`]) and the same all-or-nothing contract: a map that
//! fails leaves the tables unchanged. Unlike `ept` it has no unmap yet (see docs/svm.md).

use crate::ept::{EptError, Frames, Perm};

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
#[cfg(test)]
const PWT: u64 = 1 << 3;
#[cfg(test)]
const PCD: u64 = 1 << 4;
const PS: u64 = 1 << 7;
#[cfg(test)]
const NX: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const SIZE_4K: u64 = 4096;
const SIZE_2M: u64 = 2 << 20;
/// The guest-physical space four levels translate, and the host-physical addresses an
/// entry can hold (bits 51:12).
const GPA_LIMIT: u64 = 1 << 48;
const HPA_LIMIT: u64 = 1 << 52;
/// What a table entry (not a leaf) allows: everything; the leaf decides.
const TABLE: u64 = P | RW | US;

/// A leaf's bits for `perm` (APM Vol. 2 5.4.1 for P/RW/US/PWT/PCD, 5.6 for NX).
pub const fn leaf_bits(perm: Perm) -> u64 {
    // One encoding: the guests' tables use it through `ept`'s NPT format.
    crate::ept::npt_leaf(perm)
}

/// Allocates an empty top-level table (the nCR3 value: its physical address).
pub fn new_root(f: &mut impl Frames) -> Result<u64, EptError> {
    f.alloc().ok_or(EptError::OutOfFrames)
}

fn index(gpa: u64, level: u32) -> usize {
    ((gpa >> (12 + 9 * level)) & 0x1ff) as usize
}

/// The pieces of a mapping: `(gpa, hpa, large)`, a 2-MiB leaf where both sides are aligned
/// and 2 MiB remain, else 4-KiB leaves.
fn pieces(gpa: u64, hpa: u64, len: u64) -> impl Iterator<Item = (u64, u64, bool)> {
    let mut off = 0;
    core::iter::from_fn(move || {
        if off >= len {
            return None;
        }
        let (g, h) = (gpa + off, hpa + off);
        let large = g.is_multiple_of(SIZE_2M) && h.is_multiple_of(SIZE_2M) && len - off >= SIZE_2M;
        off += if large { SIZE_2M } else { SIZE_4K };
        Some((g, h, large))
    })
}

/// Walks towards the leaf for `g` at `leaf_level` (0: 4 KiB, 1: 2 MiB). `Ok(tables)` gives
/// the number of missing tables on the way (0..=3 for a 4-KiB leaf); `Err` the overlap.
fn missing_tables(f: &mut impl Frames, root: u64, g: u64, leaf_level: u32) -> Result<u64, u64> {
    let mut table = root;
    for level in (leaf_level..4).rev() {
        let e = f.table(table)[index(g, level)];
        if level == leaf_level {
            return if e & P != 0 { Err(g) } else { Ok(0) };
        }
        if e & P == 0 {
            return Ok(level as u64 - leaf_level as u64);
        }
        if e & PS != 0 {
            return Err(g);
        }
        table = e & ADDR_MASK;
    }
    Ok(0)
}

fn next_or_new(f: &mut impl Frames, table: u64, i: usize) -> u64 {
    let e = f.table(table)[i];
    if e & P != 0 {
        return e & ADDR_MASK;
    }
    let t = f.alloc().expect("frames counted before the first write");
    f.table(table)[i] = t | TABLE;
    t
}

/// Maps guest-physical `[gpa, gpa + len)` to host-physical `[hpa, hpa + len)` with `perm`,
/// all or nothing: alignment, range, overlap and frames are checked before any write.
pub fn map_with(
    f: &mut impl Frames,
    root: u64,
    gpa: u64,
    hpa: u64,
    len: u64,
    perm: Perm,
) -> Result<(), EptError> {
    if !(gpa | hpa | len).is_multiple_of(SIZE_4K) {
        return Err(EptError::Misaligned);
    }
    let fits = |a: u64, limit: u64| a.checked_add(len).is_some_and(|e| e <= limit);
    if len == 0 || !fits(gpa, GPA_LIMIT) || !fits(hpa, HPA_LIMIT) {
        return Err(EptError::OutOfRange);
    }
    // Frames: an upper bound, counting the missing tables of each new 2-MiB region once
    // (pieces inside one 2-MiB region share their page table).
    let mut needed = 0;
    let mut last_region = u64::MAX;
    for (g, _, large) in pieces(gpa, hpa, len) {
        let missing =
            missing_tables(f, root, g, if large { 1 } else { 0 }).map_err(EptError::Overlap)?;
        if g / SIZE_2M != last_region {
            last_region = g / SIZE_2M;
            needed += missing;
        }
    }
    if needed > f.available() {
        return Err(EptError::OutOfFrames);
    }
    let bits = leaf_bits(perm);
    for (g, h, large) in pieces(gpa, hpa, len) {
        let pdpt = next_or_new(f, root, index(g, 3));
        let pd = next_or_new(f, pdpt, index(g, 2));
        if large {
            f.table(pd)[index(g, 1)] = h | bits | PS;
        } else {
            let pt = next_or_new(f, pd, index(g, 1));
            f.table(pt)[index(g, 0)] = h | bits;
        }
    }
    Ok(())
}

#[cfg(test)]
/// Translates `gpa` through the nested tables at `root`: the host-physical address and the
/// leaf's bits, or `None`.
pub fn translate(f: &mut impl Frames, root: u64, gpa: u64) -> Option<(u64, u64)> {
    let mut table = root;
    for level in (0..4).rev() {
        let e = f.table(table)[index(gpa, level)];
        if e & P == 0 {
            return None;
        }
        if level == 0 || (level == 1 && e & PS != 0) {
            let page = if level == 0 { SIZE_4K } else { SIZE_2M };
            return Some(((e & ADDR_MASK & !(page - 1)) + gpa % page, e & !ADDR_MASK));
        }
        table = e & ADDR_MASK;
    }
    None
}

#[cfg(test)]
/// The EPT-style permission (R=1, W=2, X=4) a nested leaf's bits grant.
pub fn rwx(bits: u64) -> u64 {
    let r = (bits & P != 0) as u64;
    let w = (bits & RW != 0) as u64 * 2;
    let x = (bits & NX == 0) as u64 * 4;
    r | w | x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ept;
    use crate::ept::tests::host_frames;

    /// A partition description as `instance::setup` gives the EPT builder: the partition
    /// (RWX, not 2-MiB aligned on the host side at first), shared pages read-only and
    /// read-write, a device BAR.
    const LAYOUT: [(u64, u64, u64, Perm); 5] = [
        (0, 0x0400_0000, 16 << 20, Perm::ReadWriteExecute),
        (0x0100_0000, 0x0300_1000, 0x3000, Perm::Read),
        (0x0101_0000, 0x0300_8000, 0x1000, Perm::ReadWrite),
        (0x4000_0000, 0x0220_0000, 4 << 20, Perm::ReadWrite),
        (0xfeb0_0000, 0xfeb0_0000, 0x4000, Perm::Device),
    ];

    #[test]
    fn the_same_description_gives_the_same_translations_as_the_ept() {
        let mut fe = host_frames(64);
        let mut fn_ = host_frames(64);
        let (re, rn) = (ept::new_root(&mut fe).unwrap(), new_root(&mut fn_).unwrap());
        for (g, h, len, perm) in LAYOUT {
            ept::map_with(&mut fe, re, g, h, len, perm).unwrap();
            map_with(&mut fn_, rn, g, h, len, perm).unwrap();
        }
        let probes = LAYOUT
            .iter()
            .flat_map(|&(g, _, len, _)| [g, g + 8, g + len / 2, g + len - 1, g + len])
            .chain([0x0200_0000, 0xffff_f000, 0x1_0000_0000]);
        for gpa in probes {
            let e = ept::translate_perm(&mut fe, re, gpa);
            let n = translate(&mut fn_, rn, gpa).map(|(h, bits)| (h, rwx(bits)));
            assert_eq!(e, n, "gpa {gpa:#x}");
        }
        // Large leaves where both sides allow them: the 16-MiB partition is eight.
        assert_eq!(translate(&mut fn_, rn, 0x20_0000).unwrap().1 & PS, PS);
        assert_eq!(translate(&mut fn_, rn, 0xfeb0_1000).unwrap().1 & (PCD | PWT), PCD | PWT);
    }

    #[test]
    fn a_failing_map_changes_nothing() {
        let mut f = host_frames(8);
        let root = new_root(&mut f).unwrap();
        map_with(&mut f, root, 0x20_0000, 0x100_0000, 0x1000, Perm::Read).unwrap();
        let used = f.in_use();
        // Overlaps the page above, at its end.
        let e = map_with(&mut f, root, 0x1f_0000, 0x200_0000, 0x11000, Perm::Read);
        assert_eq!(e, Err(EptError::Overlap(0x20_0000)));
        assert_eq!(translate(&mut f, root, 0x1f_0000), None);
        assert_eq!(f.in_use(), used);
        assert_eq!(
            map_with(&mut f, root, 0x1000, 0x1001, 0x1000, Perm::Read),
            Err(EptError::Misaligned)
        );
        assert_eq!(
            map_with(&mut f, root, GPA_LIMIT - 0x1000, 0, 0x2000, Perm::Read),
            Err(EptError::OutOfRange)
        );
        // Far apart: three new tables each, more than the pool has left.
        let e = map_with(&mut f, root, 0x80_0000_0000, 0, 0x1000, Perm::Read)
            .and_then(|_| map_with(&mut f, root, 0x100_0000_0000, 0, 0x1000, Perm::Read));
        assert_eq!(e, Err(EptError::OutOfFrames));
        assert_eq!(translate(&mut f, root, 0x100_0000_0000), None);
    }
}
