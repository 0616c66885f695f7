// SPDX-License-Identifier: MIT OR Apache-2.0
//! Extended page tables (SDM Vol. 3C 29.3): building a guest's EPT, changing it, walking it.
//!
//! Page-table frames come from a [`Frames`] source, so the same code runs on the
//! hypervisor's identity-mapped memory and, in tests, on host memory; [`FramePool`] is the
//! source both use: one contiguous region, freed frames reused before the untouched rest.
//!
//! Invariants:
//! * [`map_with`] and [`unmap`] are all-or-nothing: they check the whole range first
//!   (alignment of the guest-physical address, the host-physical address and the length;
//!   the range inside the 48-bit guest-physical space; for a map nothing mapped anywhere in
//!   the range and no large page in the way; for an unmap everything mapped, large pages
//!   whole) and count the table frames a map needs against what the source can still hand
//!   out, and only then write. A call that fails leaves every table byte-identical.
//! * Every table below the root holds at least one present entry, except the directories
//!   [`prebuild`] made and marked kept: an unmap frees the tables it empties (never the root,
//!   never a kept one), so map/unmap cycles do not grow frame use.
//! * Map and unmap work a leaf table at a time (one walk per 2 MiB, then a tight loop over
//!   the entries), so their cost is a walk per 2 MiB plus a store per page.
//! * Leaves are write-back, 2-MiB pages where both addresses and the remaining length allow,
//!   4-KiB pages otherwise: nothing is mapped that the caller did not ask for. Only the
//!   partition itself is executable ([`map`]); everything else is mapped with a [`Perm`]
//!   without execute (W^X for shared memory).
//!
//! Two leaf formats, one tree ([`Format`], picked once at boot with the backend): EPT's
//! (VT-x) and AMD's nested page tables (SVM, APM Vol. 2 15.25: the long-mode format). They
//! agree on everything this module relies on outside the leaves: a table entry is the
//! next table's address with bits 2:0 set (EPT: R/W/X; NPT: P/RW/US), bit 7 marks a large
//! leaf, bits 51:12 hold the address, bit 11 and bits 61:52 of a table entry are ignored by
//! both (the software bits below), and every leaf written here has bit 0 set (EPT: R;
//! NPT: P), so "present" (any of bits 2:0) and "all present" (bit 0) read both the same.
//! Only a leaf's permission and memory-type bits differ ([`leaf_bits`], [`leaf_rwx`]).

use vmcall_proto::hypercall::HvError;

/// Where page-table frames come from and how to reach them.
pub trait Frames {
    /// A zeroed 4-KiB frame's physical address.
    fn alloc(&mut self) -> Option<u64>;
    /// Gives back a frame `alloc` handed out and nothing references any more.
    fn free(&mut self, pa: u64);
    /// How many more frames `alloc` will hand out for certain.
    fn available(&self) -> u64;
    /// The table stored in frame `pa`.
    fn table(&mut self, pa: u64) -> &mut [u64; 512];
}

/// Reaching a frame's memory by its physical address (identity map on the hypervisor).
pub trait FrameMemory {
    fn frame(&mut self, pa: u64) -> &mut [u64; 512];
}

/// Frames carved from one region `[start, end)`: a free list (linked through each free
/// frame's first word) is used before the never-used rest of the region. Accounting: frames
/// in use now, the most ever in use, and the limit (the region's size in frames).
pub struct FramePool<M> {
    mem: M,
    start: u64,
    next: u64,
    end: u64,
    free_head: Option<u64>,
    free_count: u64,
    in_use: u64,
    peak: u64,
}

/// Marks the end of the free list inside a free frame.
const FREE_END: u64 = u64::MAX;

impl<M: FrameMemory> FramePool<M> {
    /// A pool over `[start, end)` (4-KiB aligned) reached through `mem`.
    pub fn new(mem: M, start: u64, end: u64) -> Self {
        FramePool {
            mem,
            start,
            next: start,
            end,
            free_head: None,
            free_count: 0,
            in_use: 0,
            peak: 0,
        }
    }
    /// Frames handed out and not freed.
    pub fn in_use(&self) -> u64 {
        self.in_use
    }
    /// The most frames ever in use at once.
    pub fn peak(&self) -> u64 {
        self.peak
    }
    /// The most frames the pool can ever hand out at once.
    pub fn limit(&self) -> u64 {
        (self.end - self.start) / SIZE_4K
    }
}

impl<M: FrameMemory> Frames for FramePool<M> {
    fn alloc(&mut self) -> Option<u64> {
        let pa = match self.free_head {
            Some(pa) => {
                let link = self.mem.frame(pa)[0];
                self.free_head = (link != FREE_END).then_some(link);
                self.free_count -= 1;
                pa
            }
            None if self.next < self.end => {
                self.next += SIZE_4K;
                self.next - SIZE_4K
            }
            None => return None,
        };
        self.mem.frame(pa).fill(0);
        self.in_use += 1;
        self.peak = self.peak.max(self.in_use);
        Some(pa)
    }
    fn free(&mut self, pa: u64) {
        // A frame from elsewhere would corrupt the list: a broken caller invariant.
        assert!(
            pa >= self.start && pa < self.next && pa.is_multiple_of(SIZE_4K),
            "freeing a frame the pool never handed out: {pa:#x}"
        );
        let link = self.free_head.unwrap_or(FREE_END);
        self.mem.frame(pa)[0] = link;
        self.free_head = Some(pa);
        self.free_count += 1;
        self.in_use -= 1;
    }
    fn available(&self) -> u64 {
        self.free_count + (self.end - self.next) / SIZE_4K
    }
    fn table(&mut self, pa: u64) -> &mut [u64; 512] {
        self.mem.frame(pa)
    }
}

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const EXEC: u64 = 1 << 2;
const RWX: u64 = READ | WRITE | EXEC;
const MEMTYPE_WB: u64 = 6 << 3;
/// Uncacheable (EPT memory type 0, SDM Vol. 3C 29.3.7).
const MEMTYPE_UC: u64 = 0;
/// "Ignore PAT memory type" (SDM Vol. 3C 29.3.7.2): the EPT's write-back type applies
/// whatever the guest's PAT and page tables say. Set on shared memory, so that no guest can
/// access a page another guest also maps with a different memory type (SDM Vol. 3A 11.12.4:
/// aliased memory types can break coherency).
const IPAT: u64 = 1 << 6;
const LARGE: u64 = 1 << 7;
/// Software bit of a non-leaf entry (bit 11, ignored by the processor: SDM Vol. 3C 29.3.2,
/// Tables 29-1 to 29-5): the table it points to was built by [`prebuild`] and stays.
const KEEP: u64 = 1 << 11;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// In a page-directory entry that references a page table: how many of the table's
/// entries are present (bits 61:52, ignored by the processor, SDM Vol. 3C Table 29-5), kept
/// by [`map_with`] and [`unmap`] so that an unmap knows the table emptied without looking at
/// the entries it did not clear.
const COUNT_SHIFT: u32 = 52;
const COUNT_MASK: u64 = 0x3ff << COUNT_SHIFT;
const SIZE_2M: u64 = 2 << 20;
const SIZE_4K: u64 = 4096;
/// The guest-physical space a 4-level EPT translates.
const GPA_LIMIT: u64 = 1 << 48;
/// The host-physical addresses an EPT entry can hold (bits 51:12).
const HPA_LIMIT: u64 = 1 << 52;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptError {
    /// Not enough frames for the page tables the mapping needs.
    OutOfFrames,
    /// An address or the length not 4-KiB aligned, or part of a large page asked for.
    Misaligned,
    /// The range is empty or reaches past the 48-bit guest-physical (52-bit host-physical)
    /// space.
    OutOfRange,
    /// Part of the range is already mapped (the first such guest-physical address).
    Overlap(u64),
    /// Part of the range is not mapped (the first such guest-physical address).
    NotMapped(u64),
}

impl From<EptError> for HvError {
    fn from(e: EptError) -> Self {
        match e {
            EptError::OutOfFrames => HvError::NoMemory,
            EptError::Misaligned => HvError::Misaligned,
            EptError::OutOfRange => HvError::BadAddress,
            EptError::Overlap(_) => HvError::AddressInUse,
            EptError::NotMapped(_) => HvError::NotMapped,
        }
    }
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

/// The leaf format of the nested page tables this machine's backend walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// VT-x EPT (SDM Vol. 3C 29.3.2): R/W/X in bits 2:0, memory type in bits 5:3.
    Ept,
    /// AMD SVM nested paging (APM Vol. 2 15.25, 5.3): P/RW/US, NX in bit 63, the memory
    /// type from PCD/PWT (and the host PAT); every guest access counts as a user access
    /// (15.25.5), so every entry sets US.
    Npt,
}

#[cfg(not(test))]
static NPT: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
#[cfg(test)]
std::thread_local! {
    // Per test thread: a test of the NPT format does not change its neighbours'.
    static NPT: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Picks the leaf format for every table built from now on. Once, on the BSP, before any
/// guest's tables are built (the SVM backend picks [`Format::Npt`]); tests per thread.
pub fn set_format(f: Format) {
    #[cfg(not(test))]
    NPT.store(f == Format::Npt, core::sync::atomic::Ordering::Relaxed);
    #[cfg(test)]
    NPT.with(|n| n.set(f == Format::Npt));
}

/// The leaf format in use.
#[inline(always)]
pub fn format() -> Format {
    #[cfg(not(test))]
    let npt = NPT.load(core::sync::atomic::Ordering::Relaxed);
    #[cfg(test)]
    let npt = NPT.with(|n| n.get());
    if npt {
        Format::Npt
    } else {
        Format::Ept
    }
}

/// NPT leaf bits (APM Vol. 2 5.4.1: P, RW, US, PWT, PCD; 5.6: NX).
pub mod npt_bits {
    pub const P: u64 = 1 << 0;
    pub const RW: u64 = 1 << 1;
    pub const US: u64 = 1 << 2;
    pub const PWT: u64 = 1 << 3;
    pub const PCD: u64 = 1 << 4;
    pub const NX: u64 = 1 << 63;
}

/// An NPT leaf's bits for `perm`: write-back through the host PAT's entry 0 (the reset
/// value the host keeps), a device's registers uncached (PCD+PWT: PAT entry 3, UC).
pub const fn npt_leaf(perm: Perm) -> u64 {
    use npt_bits::*;
    match perm {
        Perm::ReadWriteExecute => P | RW | US,
        Perm::ReadWrite => P | RW | US | NX,
        Perm::Read => P | US | NX,
        Perm::Device => P | RW | US | NX | PCD | PWT,
    }
}

/// A leaf's permission and memory-type bits for `perm` in the format in use.
#[inline(always)]
fn leaf_bits(perm: Perm) -> u64 {
    match format() {
        Format::Ept => perm.bits() | perm.memtype(),
        Format::Npt => npt_leaf(perm),
    }
}

/// What a leaf `e` allows, as EPT permission bits (R=1, W=2, X=4), whatever the format.
#[inline(always)]
fn leaf_rwx(e: u64) -> u64 {
    match format() {
        Format::Ept => e & RWX,
        Format::Npt => {
            use npt_bits::*;
            (e & P) | (e & RW) | if e & NX == 0 { EXEC } else { 0 }
        }
    }
}

fn present(e: u64) -> bool {
    e & RWX != 0
}

/// Whether any entry of `t` is present: one OR over all of them (no branch per entry; the
/// checks of a map and an unmap run over up to 512 entries).
fn any_present(t: &[u64]) -> bool {
    t.iter().fold(0, |acc, e| acc | e) & RWX != 0
}

/// Whether every entry of `t` is present. Every leaf this module writes has READ set
/// ([`Perm::bits`]), so an AND over READ suffices for them; an entry without READ (never
/// written here) is checked exactly.
fn all_present(t: &[u64]) -> bool {
    t.iter().fold(READ, |acc, e| acc & e) & READ != 0 || t.iter().all(|&e| present(e))
}

/// Access a mapping allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    /// The partition only: the guest's own code runs from it.
    ReadWriteExecute,
    ReadWrite,
    Read,
    /// A device's registers (a memory BAR): read-write, never executable, uncached
    /// whatever the guest's PAT says (SDM Vol. 3A 11.3: UC for memory-mapped I/O).
    Device,
}

impl Perm {
    /// Memory shared with or granted by others: read-only or read-write, never executable.
    pub const fn shared(write: bool) -> Perm {
        if write {
            Perm::ReadWrite
        } else {
            Perm::Read
        }
    }

    /// The entry's memory-type bits: write-back, and for shared memory (never executable)
    /// the guest's PAT ignored.
    pub const fn memtype(self) -> u64 {
        match self {
            Perm::ReadWriteExecute => MEMTYPE_WB,
            Perm::ReadWrite | Perm::Read => MEMTYPE_WB | IPAT,
            Perm::Device => MEMTYPE_UC | IPAT,
        }
    }

    /// The entry's permission bits (R=1, W=2, X=4).
    pub const fn bits(self) -> u64 {
        match self {
            Perm::ReadWriteExecute => RWX,
            Perm::ReadWrite | Perm::Device => READ | WRITE,
            Perm::Read => READ,
        }
    }
}

/// Checks alignment and range shared by map and unmap.
fn check_range(gpa: u64, hpa: u64, len: u64) -> Result<(), EptError> {
    if !(gpa | hpa | len).is_multiple_of(SIZE_4K) {
        return Err(EptError::Misaligned);
    }
    let fits = |a: u64, limit: u64| a.checked_add(len).is_some_and(|e| e <= limit);
    if len == 0 || !fits(gpa, GPA_LIMIT) || !fits(hpa, HPA_LIMIT) {
        return Err(EptError::OutOfRange);
    }
    Ok(())
}

/// Whether the chunk at offset `off` of a mapping is a 2-MiB page.
fn large_chunk(g: u64, h: u64, left: u64) -> bool {
    g.is_multiple_of(SIZE_2M) && h.is_multiple_of(SIZE_2M) && left >= SIZE_2M
}

/// Maps guest-physical `[gpa, gpa + len)` to host-physical `[hpa, hpa + len)`, RWX: the
/// partition only.
pub fn map(f: &mut impl Frames, root: u64, gpa: u64, hpa: u64, len: u64) -> Result<(), EptError> {
    map_with(f, root, gpa, hpa, len, Perm::ReadWriteExecute)
}

/// A piece of a mapping one leaf table holds: one 2-MiB leaf in a page directory, or a run of
/// 4-KiB leaves in one page table (never across a 2-MiB boundary of the guest side).
#[derive(Clone, Copy, Debug)]
struct Run {
    g: u64,
    h: u64,
    large: bool,
    /// 4-KiB pages it covers (512 for a large leaf).
    pages: usize,
}

/// The runs of mapping `[gpa, gpa + len)` to `[hpa, hpa + len)`, chunked by
/// [`large_chunk`]: a 2-MiB leaf where both sides are aligned and 2 MiB remain, else 4-KiB
/// leaves up to the next 2-MiB boundary of the guest side.
fn runs(gpa: u64, hpa: u64, len: u64) -> impl Iterator<Item = Run> {
    let mut off = 0;
    core::iter::from_fn(move || {
        if off >= len {
            return None;
        }
        let (g, h, left) = (gpa + off, hpa + off, len - off);
        let large = large_chunk(g, h, left);
        let size = if large { SIZE_2M } else { left.min(SIZE_2M - g % SIZE_2M) };
        off += size;
        Some(Run { g, h, large, pages: (size / SIZE_4K) as usize })
    })
}

/// The table frames mapping `[gpa, gpa + len)` (chunked as for `hpa`) would add, or why it
/// cannot be mapped. Writes nothing.
fn tables_needed(
    f: &mut impl Frames,
    root: u64,
    gpa: u64,
    hpa: u64,
    len: u64,
) -> Result<u64, EptError> {
    // Tables to create, identified by the address bits above what they translate; the walk
    // goes upwards through the range, so remembering the last one counted suffices.
    let mut last_new = [u64::MAX; 3]; // PDPT (per 512 GiB), PD (per 1 GiB), PT (per 2 MiB)
    let mut needed = 0;
    for r in runs(gpa, hpa, len) {
        let g = r.g;
        let levels = if r.large { 2 } else { 3 }; // tables between the root and the leaf
        let mut table = Some(root);
        for (depth, level) in (1..4).rev().take(levels).enumerate() {
            let key = g >> (12 + 9 * level);
            if let Some(t) = table {
                let e = f.table(t)[index(g, level)];
                if present(e) {
                    if e & LARGE != 0 {
                        return Err(EptError::Overlap(g));
                    }
                    table = Some(e & ADDR_MASK);
                    continue;
                }
                table = None;
            }
            if last_new[depth] != key {
                last_new[depth] = key;
                needed += 1;
            }
        }
        let Some(t) = table else { continue };
        if r.large {
            if present(f.table(t)[index(g, 1)]) {
                return Err(EptError::Overlap(g));
            }
        } else {
            let i0 = index(g, 0);
            let run = &f.table(t)[i0..i0 + r.pages];
            if any_present(run) {
                let j = run.iter().position(|&e| present(e)).unwrap_or(0);
                return Err(EptError::Overlap(g + j as u64 * SIZE_4K));
            }
        }
    }
    Ok(needed)
}

/// The next-level table under entry `i` of `table`, created if absent. Callers counted
/// and reserved every frame this can need.
fn next_or_new(f: &mut impl Frames, table: u64, i: usize) -> u64 {
    let e = f.table(table)[i];
    if present(e) {
        return e & ADDR_MASK;
    }
    let t = f.alloc().expect("frames reserved before the first write");
    f.table(table)[i] = t | RWX;
    t
}

/// Maps guest-physical `[gpa, gpa + len)` to host-physical `[hpa, hpa + len)` with `perm`,
/// all or nothing.
pub fn map_with(
    f: &mut impl Frames,
    root: u64,
    gpa: u64,
    hpa: u64,
    len: u64,
    perm: Perm,
) -> Result<(), EptError> {
    check_range(gpa, hpa, len)?;
    if tables_needed(f, root, gpa, hpa, len)? > f.available() {
        return Err(EptError::OutOfFrames);
    }
    let bits = leaf_bits(perm);
    for r in runs(gpa, hpa, len) {
        let pdpt = next_or_new(f, root, index(r.g, 3));
        let pd = next_or_new(f, pdpt, index(r.g, 2));
        if r.large {
            f.table(pd)[index(r.g, 1)] = r.h | bits | LARGE;
        } else {
            let pt = next_or_new(f, pd, index(r.g, 1));
            // Nothing in the run was present (checked above): the count grows by its length.
            f.table(pd)[index(r.g, 1)] += (r.pages as u64) << COUNT_SHIFT;
            let i0 = index(r.g, 0);
            let mut h = r.h | bits;
            for e in &mut f.table(pt)[i0..i0 + r.pages] {
                *e = h;
                h += SIZE_4K;
            }
        }
    }
    Ok(())
}

/// The page directory covering `g` and its entry for `g`, if the tables down to it exist.
fn pd_entry(f: &mut impl Frames, root: u64, g: u64) -> Option<(u64, u64)> {
    let mut table = root;
    for level in [3, 2] {
        let e = f.table(table)[index(g, level)];
        if !present(e) {
            return None;
        }
        table = e & ADDR_MASK;
    }
    Some((table, f.table(table)[index(g, 1)]))
}

/// Builds the page-directory-pointer tables and page directories for `[gpa, gpa + len)`
/// (1-GiB aligned) ahead of any map there, and marks them kept: [`unmap`] never frees
/// them, so a 2-MiB map in that range writes one entry and allocates nothing, the first
/// time or the hundredth. Maps nothing (an empty directory translates nothing). All or
/// nothing.
pub fn prebuild(f: &mut impl Frames, root: u64, gpa: u64, len: u64) -> Result<(), EptError> {
    const GIB: u64 = 1 << 30;
    check_range(gpa, 0, len)?;
    if !(gpa | len).is_multiple_of(GIB) {
        return Err(EptError::Misaligned);
    }
    // Count first: PDPTs and PDs missing (a large 1-GiB leaf is never written here).
    let mut needed = 0;
    let mut last_pdpt = u64::MAX;
    for g in (gpa..gpa + len).step_by(GIB as usize) {
        let e3 = f.table(root)[index(g, 3)];
        if !present(e3) {
            if last_pdpt != g >> 39 {
                last_pdpt = g >> 39;
                needed += 1;
            }
            needed += 1;
        } else if !present(f.table(e3 & ADDR_MASK)[index(g, 2)]) {
            needed += 1;
        }
    }
    if needed > f.available() {
        return Err(EptError::OutOfFrames);
    }
    for g in (gpa..gpa + len).step_by(GIB as usize) {
        let pdpt = next_or_new(f, root, index(g, 3));
        f.table(root)[index(g, 3)] |= KEEP;
        next_or_new(f, pdpt, index(g, 2));
        f.table(pdpt)[index(g, 2)] |= KEEP;
    }
    Ok(())
}

/// Removes the leaves covering `[gpa, gpa + len)` (exactly as they were mapped: a large
/// page must be removed whole), all or nothing, and frees the tables that become empty
/// (unless [`prebuild`] kept them). Returns the bytes unmapped; the caller must INVEPT.
pub fn unmap(f: &mut impl Frames, root: u64, gpa: u64, len: u64) -> Result<u64, EptError> {
    check_range(gpa, 0, len)?;
    // Check everything first: each 2-MiB step is one large leaf or one run of a page table.
    let mut off = 0;
    while off < len {
        let (g, left) = (gpa + off, len - off);
        let e = match pd_entry(f, root, g) {
            Some((_, e)) if present(e) => e,
            _ => return Err(EptError::NotMapped(g)),
        };
        if e & LARGE != 0 {
            if !g.is_multiple_of(SIZE_2M) || left < SIZE_2M {
                return Err(EptError::Misaligned);
            }
            off += SIZE_2M;
        } else {
            let n = left.min(SIZE_2M - g % SIZE_2M) / SIZE_4K;
            let i0 = index(g, 0);
            let run = &f.table(e & ADDR_MASK)[i0..i0 + n as usize];
            if !all_present(run) {
                let j = run.iter().position(|&e| !present(e)).unwrap_or(0);
                return Err(EptError::NotMapped(g + j as u64 * SIZE_4K));
            }
            off += n * SIZE_4K;
        }
    }
    let mut off = 0;
    while off < len {
        let g = gpa + off;
        let pdpt = f.table(root)[index(g, 3)] & ADDR_MASK;
        let pd = f.table(pdpt)[index(g, 2)] & ADDR_MASK;
        let e = f.table(pd)[index(g, 1)];
        if e & LARGE != 0 {
            f.table(pd)[index(g, 1)] = 0;
            off += SIZE_2M;
        } else {
            let n = (len - off).min(SIZE_2M - g % SIZE_2M) / SIZE_4K;
            let (i0, pt) = (index(g, 0), e & ADDR_MASK);
            f.table(pt)[i0..i0 + n as usize].fill(0);
            off += n * SIZE_4K;
            // Every entry of the run was present (checked above): the count drops by its
            // length, and the table is empty when it reaches zero.
            let left = (e & COUNT_MASK) - (n << COUNT_SHIFT);
            if left != 0 {
                f.table(pd)[index(g, 1)] = e & !COUNT_MASK | left;
                continue;
            }
            f.table(pd)[index(g, 1)] = 0;
            f.free(pt);
        }
        // Free the directories this emptied, bottom up, unless kept.
        for (table, parent, level) in [(pd, pdpt, 2), (pdpt, root, 3)] {
            let entry = f.table(parent)[index(g, level)];
            if entry & KEEP != 0 || any_present(f.table(table)) {
                break;
            }
            f.table(parent)[index(g, level)] = 0;
            f.free(table);
        }
    }
    Ok(len)
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
            return Some(((e & ADDR_MASK & !(page - 1)) + gpa % page, leaf_rwx(e)));
        }
        table = e & ADDR_MASK;
    }
    None
}

/// Counts the bytes mapped under `root` (every leaf's page size).
#[cfg(test)]
pub fn mapped_bytes(f: &mut impl Frames, root: u64) -> u64 {
    mapped_bytes_with(f, root, &mut || {})
}

/// [`mapped_bytes`], calling `between` after each page directory (with its page tables)
/// is counted: the walk of a whole tree is thousands of entries, and the caller may have
/// to serve its inbox between (at most 512 entries and their tables at a time).
pub fn mapped_bytes_with(f: &mut impl Frames, root: u64, between: &mut dyn FnMut()) -> u64 {
    fn walk(f: &mut impl Frames, table: u64, level: u32, between: &mut dyn FnMut()) -> u64 {
        let entries = *f.table(table);
        let sum = entries
            .iter()
            .filter(|e| *e & RWX != 0)
            .map(|e| match level {
                0 => SIZE_4K,
                1 if e & LARGE != 0 => SIZE_2M,
                _ => walk(f, e & ADDR_MASK, level - 1, between),
            })
            .sum();
        if level == 1 {
            between();
        }
        sum
    }
    walk(f, root, 3, between)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    /// Frame memory on the host heap, at fake physical addresses.
    #[derive(Clone, Default, PartialEq, Eq, Debug)]
    pub struct HostMem(HashMap<u64, Box<[u64; 512]>>);

    impl FrameMemory for HostMem {
        fn frame(&mut self, pa: u64) -> &mut [u64; 512] {
            // Fresh memory is neither zero nor a present entry: alloc must clear it.
            self.0.entry(pa).or_insert_with(|| Box::new([0x5a5a_5a5a_5a5a_5a58; 512]))
        }
    }

    const POOL_BASE: u64 = 0x7000_0000_0000;

    pub type HostFrames = FramePool<HostMem>;

    /// A pool of `n` frames on the host.
    pub fn host_frames(n: u64) -> HostFrames {
        FramePool::new(HostMem::default(), POOL_BASE, POOL_BASE + n * SIZE_4K)
    }

    fn pool() -> HostFrames {
        host_frames(512)
    }

    /// Everything that could change: every frame's bytes and the pool's counters.
    fn snapshot(f: &HostFrames) -> (HostMem, u64, u64, Option<u64>, u64) {
        (f.mem.clone(), f.in_use, f.next, f.free_head, f.free_count)
    }

    #[test]
    fn partition_is_mapped_with_large_pages() {
        let mut f = pool();
        let root = new_root(&mut f).unwrap();
        map(&mut f, root, 0, 0x4000_0000, 16 << 20).unwrap();
        assert_eq!(translate(&mut f, root, 0), Some(0x4000_0000));
        assert_eq!(translate(&mut f, root, 0x12_3456), Some(0x4012_3456));
        assert_eq!(translate(&mut f, root, (16 << 20) - 1), Some(0x40ff_ffff));
        assert_eq!(translate(&mut f, root, 16 << 20), None);
        assert_eq!(translate_perm(&mut f, root, 0x12_3456), Some((0x4012_3456, 7)));
        assert_eq!(mapped_bytes(&mut f, root), 16 << 20);
        // PML4, PDPT, PD: nothing more for 2-MiB pages.
        assert_eq!(f.in_use(), 3);
    }

    #[test]
    fn permissions_and_unmap() {
        let mut f = pool();
        let root = new_root(&mut f).unwrap();
        map(&mut f, root, 0, 0x4000_0000, 4 << 20).unwrap();
        map_with(&mut f, root, 0xc000_0000, 0x8000_0000, 2 << 20, Perm::Read).unwrap();
        map_with(&mut f, root, 0xc020_0000, 0x8020_0000, 8192, Perm::ReadWrite).unwrap();
        assert_eq!(translate_perm(&mut f, root, 0xc000_1234), Some((0x8000_1234, 1)));
        assert_eq!(translate_perm(&mut f, root, 0xc020_1000), Some((0x8020_1000, 3)));
        assert_eq!(mapped_bytes(&mut f, root), (6 << 20) + 8192);
        assert_eq!(unmap(&mut f, root, 0xc020_0000, 8192), Ok(8192));
        assert_eq!(translate(&mut f, root, 0xc020_0000), None);
        let before = snapshot(&f);
        assert_eq!(
            unmap(&mut f, root, 0xc000_0000, 4096),
            Err(EptError::Misaligned),
            "half a large page"
        );
        assert_eq!(
            unmap(&mut f, root, 0xc000_0000, (2 << 20) + 4096),
            Err(EptError::NotMapped(0xc020_0000)),
            "a hole after the large page"
        );
        assert!(snapshot(&f) == before, "failed unmaps change nothing");
        assert_eq!(unmap(&mut f, root, 0xc000_0000, 2 << 20), Ok(2 << 20));
        assert_eq!(
            unmap(&mut f, root, 0xc000_0000, 4096),
            Err(EptError::NotMapped(0xc000_0000)),
            "nothing there"
        );
        assert_eq!(mapped_bytes(&mut f, root), 4 << 20, "the partition is untouched");
        assert_eq!(f.in_use(), 3, "the window's PDPT entry and tables are gone again");
    }

    #[test]
    fn overlaps_and_misalignment_are_refused() {
        let mut f = pool();
        let root = new_root(&mut f).unwrap();
        map(&mut f, root, 0, 0x20_0000, 4 << 20).unwrap();
        let before = snapshot(&f);
        let e = map(&mut f, root, 0x20_0000, 0x80_0000, 4096);
        assert_eq!(e, Err(EptError::Overlap(0x20_0000)), "inside a large page");
        let e = map(&mut f, root, 0x3f_f000, 0x80_0000, 8192);
        assert_eq!(e, Err(EptError::Overlap(0x3f_f000)), "straddling a large page");
        // Free at the start, mapped at the end: refused, and the free part stays free.
        let e = map(&mut f, root, 0x1000_0000, 0x1000_0000, 4096);
        assert_eq!(e, Ok(()));
        let mid = snapshot(&f);
        let e = map(&mut f, root, 0xff_f000, 0x80_0000, 0x0f00_2000);
        assert_eq!(e, Err(EptError::Overlap(0x1000_0000)));
        assert!(snapshot(&f) == mid, "nothing written before the overlap either");
        assert_eq!(unmap(&mut f, root, 0x1000_0000, 4096), Ok(4096));
        assert!(snapshot(&f).0 != before.0 || snapshot(&f).1 == before.1);
        assert_eq!(f.in_use(), before.1);
        assert_eq!(map(&mut f, root, 0x1234, 0, 4096), Err(EptError::Misaligned));
        // Misaligned by the same amount: still misaligned (no bit trick may cancel them).
        assert_eq!(map(&mut f, root, 0x1000_0800, 0x8000_0800, 4096), Err(EptError::Misaligned));
        assert_eq!(map(&mut f, root, 0x1000_0000, 0x8000_0800, 0x800), Err(EptError::Misaligned));
        assert_eq!(map(&mut f, root, 0x1000_0800, 0x8000_0000, 0x800), Err(EptError::Misaligned));
        assert_eq!(map(&mut f, root, 0x1000, 0, 0x800), Err(EptError::Misaligned));
        assert_eq!(map(&mut f, root, 1 << 48, 0, 4096), Err(EptError::OutOfRange));
        assert_eq!(map(&mut f, root, (1 << 48) - 4096, 0, 8192), Err(EptError::OutOfRange));
        assert_eq!(map(&mut f, root, !0xfff, 0, 8192), Err(EptError::OutOfRange));
        assert_eq!(map(&mut f, root, 0x1000_0000, 0, 0), Err(EptError::OutOfRange), "empty");
        assert_eq!(unmap(&mut f, root, 0x800, 4096), Err(EptError::Misaligned));
        assert_eq!(unmap(&mut f, root, 0, 0x800), Err(EptError::Misaligned));
        assert_eq!(unmap(&mut f, root, 1 << 48, 4096), Err(EptError::OutOfRange));
    }

    #[test]
    fn misaligned_or_too_wide_hpa_never_reaches_an_entry() {
        let mut f = pool();
        let root = new_root(&mut f).unwrap();
        let before = snapshot(&f);
        // The low bits would be permissions and memory type, the high ones "suppress #VE".
        for hpa in [0x8000_0007, 0x8000_0800, 0x8000_0001, 0x8000_0040] {
            let e = map_with(&mut f, root, 0xc000_0000, hpa, 4096, Perm::Read);
            assert_eq!(e, Err(EptError::Misaligned), "hpa {hpa:#x}");
        }
        for hpa in [1 << 52, (1 << 63) | 0x8000_0000, (1 << 52) - 4096] {
            let e = map_with(&mut f, root, 0xc000_0000, hpa, 8192, Perm::Read);
            assert_eq!(e, Err(EptError::OutOfRange), "hpa {hpa:#x}");
        }
        assert!(snapshot(&f) == before);
        assert_eq!(map_with(&mut f, root, 0, (1 << 52) - 4096, 4096, Perm::Read), Ok(()));
        assert_eq!(translate(&mut f, root, 0x123), Some((1 << 52) - 4096 + 0x123));
    }

    #[test]
    fn a_short_tail_maps_exactly_that_much() {
        let mut f = pool();
        let root = new_root(&mut f).unwrap();
        let (g, h) = (0x4000_0000, 0x8000_0000);
        map_with(&mut f, root, g, h, (2 << 20) + 4096, Perm::ReadWrite).unwrap();
        assert_eq!(mapped_bytes(&mut f, root), (2 << 20) + 4096);
        assert_eq!(translate(&mut f, root, g + (2 << 20)), Some(h + (2 << 20)));
        assert_eq!(translate(&mut f, root, g + (2 << 20) + 4096), None);
        assert_eq!(translate(&mut f, root, g + (4 << 20) - 1), None);
        // One 2-MiB page and one 4-KiB page: PML4, PDPT, PD and one PT.
        assert_eq!(f.in_use(), 4);
        // The same with the host side not 2-MiB aligned: 4-KiB pages throughout.
        let mut f = pool();
        let root = new_root(&mut f).unwrap();
        map_with(&mut f, root, g, h + 4096, (2 << 20) + 4096, Perm::ReadWrite).unwrap();
        assert_eq!(mapped_bytes(&mut f, root), (2 << 20) + 4096);
        assert_eq!(translate(&mut f, root, g + (2 << 20) + 4096), None);
        assert_eq!(translate(&mut f, root, g + 0x1234), Some(h + 0x2234));
    }

    #[test]
    fn out_of_frames_changes_nothing_and_says_so() {
        // Root + PDPT + PD fit; the PT a 4-KiB mapping needs does not.
        let mut f = host_frames(3);
        let root = new_root(&mut f).unwrap();
        map(&mut f, root, 0, 0x20_0000, 2 << 20).unwrap();
        let before = snapshot(&f);
        let e = map_with(&mut f, root, 0x40_0000, 0x40_0000, 4096, Perm::Read);
        assert_eq!(e, Err(EptError::OutOfFrames));
        // A new PDPT and PD would be needed far away: also refused, also untouched.
        let e = map_with(&mut f, root, 1 << 40, 0, 2 << 20, Perm::Read);
        assert_eq!(e, Err(EptError::OutOfFrames));
        assert!(snapshot(&f) == before);
        assert_eq!(HvError::from(EptError::OutOfFrames), HvError::NoMemory);
        // 2 MiB and a 4-KiB tail, aligned: the tail needs a PT there is no frame for.
        let e = map_with(&mut f, root, 0x40_0000, 0x40_0000, (2 << 20) + 4096, Perm::Read);
        assert_eq!(e, Err(EptError::OutOfFrames));
        assert!(snapshot(&f) == before);
        // A 2-MiB page in the existing PD needs no frame at all.
        assert_eq!(map_with(&mut f, root, 0x40_0000, 0x40_0000, 2 << 20, Perm::Read), Ok(()));
    }

    #[test]
    fn eptp_and_leaf_entries_have_the_architected_bits() {
        // EPTP: memory type WB (6) in bits 2:0, walk length minus one (3) in bits 5:3.
        assert_eq!(eptp(0x1234_5000), 0x1234_501e);
        let mut f = pool();
        let root = new_root(&mut f).unwrap();
        map(&mut f, root, 0, 0x4000_0000, 2 << 20).unwrap();
        map_with(&mut f, root, 0x20_0000, 0x8000_1000, 4096, Perm::Read).unwrap();
        let pdpt = f.table(root)[0];
        assert_eq!(pdpt & 0xfff, 7, "non-leaf entries: RWX, nothing else");
        let pd = f.table(pdpt & ADDR_MASK)[0];
        // A 2-MiB leaf: RWX, memory type WB in bits 5:3, "ignore PAT" clear, bit 7 large.
        assert_eq!(f.table(pd & ADDR_MASK)[0], 0x4000_0000 | 7 | 6 << 3 | 1 << 7);
        let pt = f.table(pd & ADDR_MASK)[1] & ADDR_MASK;
        // Shared memory: read-only, WB, "ignore PAT" set (no memory-type aliasing).
        assert_eq!(f.table(pt)[0], 0x8000_1000 | 1 | 6 << 3 | 1 << 6, "a 4-KiB leaf, read-only");
        map_with(&mut f, root, 0x40_0000, 0x8020_0000, 2 << 20, Perm::ReadWrite).unwrap();
        let big = f.table(pd & ADDR_MASK)[2];
        assert_eq!(big, 0x8020_0000 | 3 | 6 << 3 | 1 << 6 | 1 << 7, "a shared 2-MiB leaf");
    }

    #[test]
    fn the_npt_format_writes_long_mode_leaves_and_reads_them_back_as_rwx() {
        use npt_bits::*;
        set_format(Format::Npt);
        let mut f = pool();
        let root = new_root(&mut f).unwrap();
        map(&mut f, root, 0, 0x4000_0000, 2 << 20).unwrap();
        map_with(&mut f, root, 0x20_0000, 0x8000_1000, 4096, Perm::Read).unwrap();
        map_with(&mut f, root, 0x40_0000, 0xfeb0_0000, 4096, Perm::Device).unwrap();
        let pdpt = f.table(root)[0];
        assert_eq!(pdpt & 0xfff, P | RW | US, "table entries: P, RW, US");
        let pd = f.table(pdpt & ADDR_MASK)[0] & ADDR_MASK;
        assert_eq!(f.table(pd)[0], 0x4000_0000 | P | RW | US | 1 << 7, "a 2-MiB RWX leaf");
        let pt = f.table(pd)[1] & ADDR_MASK;
        assert_eq!(f.table(pt)[0], 0x8000_1000 | P | US | NX, "read-only, never executable");
        let dev = f.table(pd)[2] & ADDR_MASK;
        assert_eq!(f.table(dev)[0], 0xfeb0_0000 | P | RW | US | NX | PCD | PWT);
        assert_eq!(translate_perm(&mut f, root, 0x1234), Some((0x4000_1234, 7)));
        assert_eq!(translate_perm(&mut f, root, 0x20_0008), Some((0x8000_1008, 1)));
        assert_eq!(translate_perm(&mut f, root, 0x40_0000), Some((0xfeb0_0000, 3)));
        // Unmap frees the emptied tables in this format too.
        let used = f.in_use();
        assert_eq!(unmap(&mut f, root, 0x20_0000, 4096), Ok(4096));
        assert_eq!(translate(&mut f, root, 0x20_0000), None);
        assert!(f.in_use() < used);
        set_format(Format::Ept);
    }

    #[test]
    fn errors_map_to_the_abi() {
        assert_eq!(HvError::from(EptError::OutOfFrames), HvError::NoMemory);
        assert_eq!(HvError::from(EptError::Misaligned), HvError::Misaligned);
        assert_eq!(HvError::from(EptError::OutOfRange), HvError::BadAddress);
        assert_eq!(HvError::from(EptError::Overlap(0)), HvError::AddressInUse);
        assert_eq!(HvError::from(EptError::NotMapped(0)), HvError::NotMapped);
    }

    #[test]
    fn map_unmap_cycles_do_not_grow_frame_use() {
        let mut f = host_frames(8);
        let root = new_root(&mut f).unwrap();
        map(&mut f, root, 0, 0x20_0000, 16 << 20).unwrap();
        let base = f.in_use();
        for i in 0..1000u64 {
            // A 2-MiB page in a fresh PDPT slot (1 TiB away), then 512 4-KiB pages.
            let g = (1 << 40) + (i % 7) * (1 << 30);
            map_with(&mut f, root, g, 0x8000_0000, 2 << 20, Perm::ReadWrite).unwrap();
            assert_eq!(unmap(&mut f, root, g, 2 << 20), Ok(2 << 20));
            assert_eq!(f.in_use(), base, "cycle {i}, 2 MiB");
            map_with(&mut f, root, 0xc000_0000, 0x8000_1000, 2 << 20, Perm::Read).unwrap();
            assert_eq!(unmap(&mut f, root, 0xc000_0000, 2 << 20), Ok(2 << 20));
            assert_eq!(f.in_use(), base, "cycle {i}, 4 KiB");
        }
        assert_eq!(f.peak(), base + 2, "a PDPT and a PD, or a PD and a PT");
        assert_eq!(mapped_bytes(&mut f, root), 16 << 20);
    }

    #[test]
    fn prebuilt_directories_stay_and_2m_maps_there_allocate_nothing() {
        let mut f = pool();
        let root = new_root(&mut f).unwrap();
        map(&mut f, root, 0, 0x20_0000, 4 << 20).unwrap();
        let w = 0xc000_0000;
        let before = snapshot(&f);
        assert_eq!(prebuild(&mut f, root, w + 4096, 1 << 30), Err(EptError::Misaligned));
        assert_eq!(prebuild(&mut f, root, w, 1 << 20), Err(EptError::Misaligned));
        assert_eq!(prebuild(&mut f, root, 1 << 48, 1 << 30), Err(EptError::OutOfRange));
        assert!(snapshot(&f) == before, "a refused prebuild writes nothing");
        prebuild(&mut f, root, w, 1 << 30).unwrap();
        let base = f.in_use();
        assert_eq!(base, 4, "root, PDPT and PD of the partition, the window's PD");
        assert_eq!(mapped_bytes(&mut f, root), 4 << 20, "a kept directory maps nothing");
        assert_eq!(translate(&mut f, root, w), None);
        for _ in 0..3 {
            map_with(&mut f, root, w + (4 << 20), 0x8000_0000, 2 << 20, Perm::ReadWrite).unwrap();
            assert_eq!(f.in_use(), base, "one entry written, nothing allocated");
            assert_eq!(translate(&mut f, root, w + (5 << 20)), Some(0x8010_0000));
            assert_eq!(unmap(&mut f, root, w + (4 << 20), 2 << 20), Ok(2 << 20));
            assert_eq!(f.in_use(), base, "the directory stays");
        }
        // 4-KiB pages need a page table, freed again; the directory stays.
        map_with(&mut f, root, w + 4096, 0x8000_0000, 2 << 20, Perm::Read).unwrap();
        assert_eq!(f.in_use(), base + 2, "two page tables");
        assert_eq!(translate(&mut f, root, w + (2 << 20) + 0x123), Some(0x801f_f123));
        assert_eq!(unmap(&mut f, root, w + 4096, 2 << 20), Ok(2 << 20));
        assert_eq!(f.in_use(), base);
        // Again over tables that exist: nothing more.
        let before = snapshot(&f);
        prebuild(&mut f, root, w, 1 << 30).unwrap();
        assert!(snapshot(&f) == before, "prebuilding twice changes nothing");
        // Two GiB far away need a PDPT and two PDs: with two frames left, refused whole.
        let mut g = host_frames(3);
        let root = new_root(&mut g).unwrap();
        let before = snapshot(&g);
        assert_eq!(prebuild(&mut g, root, 1 << 40, 2 << 30), Err(EptError::OutOfFrames));
        assert!(snapshot(&g) == before);
        assert_eq!(prebuild(&mut g, root, 1 << 40, 1 << 30), Ok(()));
    }

    #[test]
    fn pool_reuses_freed_frames_first_and_keeps_count() {
        let mut f = host_frames(3);
        assert_eq!((f.limit(), f.available(), f.in_use()), (3, 3, 0));
        let a = f.alloc().unwrap();
        let b = f.alloc().unwrap();
        assert_eq!((a, b), (POOL_BASE, POOL_BASE + 4096));
        f.table(b)[7] = 99;
        f.free(a);
        f.free(b);
        assert_eq!((f.available(), f.in_use(), f.peak()), (3, 0, 2));
        assert_eq!(f.alloc(), Some(b), "last freed first");
        assert!(f.table(b).iter().all(|&e| e == 0), "handed out zeroed");
        assert_eq!(f.alloc(), Some(a));
        assert_eq!(f.alloc(), Some(POOL_BASE + 8192), "then the untouched rest");
        assert_eq!(f.alloc(), None);
        assert_eq!((f.available(), f.in_use(), f.peak()), (0, 3, 3));
        f.free(a);
        assert_eq!(f.available(), 1);
        assert_eq!(f.alloc(), Some(a));
        assert_eq!(f.alloc(), None);
    }

    #[test]
    #[should_panic(expected = "never handed out")]
    fn pool_refuses_foreign_frames() {
        let mut f = host_frames(3);
        f.alloc();
        f.free(POOL_BASE + 4096);
    }

    /// One leaf of the model: where its page starts and how big it is.
    #[derive(Clone, Copy, Debug)]
    struct Leaf {
        start: u64,
        size: u64,
        hpa: u64,
        perm: u64,
    }

    #[derive(Clone, Debug)]
    enum Op {
        Map { gpa: u64, hpa: u64, len: u64, perm: Perm },
        Unmap { gpa: u64, len: u64 },
    }

    /// Guest-physical regions the operations land in: low memory, across a 1-GiB and a
    /// 512-GiB boundary, and the top of the 48-bit space.
    const REGIONS: [u64; 4] =
        [0, (1 << 30) - (4 << 20), (1 << 39) - (4 << 20), (1 << 48) - (8 << 20)];

    fn addr() -> impl Strategy<Value = u64> {
        (0..REGIONS.len(), 0u64..2048, prop::bool::weighted(0.3))
            .prop_map(|(r, page, big)| REGIONS[r] + if big { (page % 4) << 21 } else { page << 12 })
    }

    fn op() -> impl Strategy<Value = Op> {
        let len = prop_oneof![1u64..4, 510u64..515, Just(1024u64)].prop_map(|p| p << 12);
        let perm = prop_oneof![Just(Perm::Read), Just(Perm::ReadWrite)];
        let hpa = prop_oneof![(1u64..64).prop_map(|m| m << 21), (1u64..4096).prop_map(|p| p << 12)];
        prop_oneof![
            (addr(), hpa, len.clone(), perm).prop_map(|(gpa, hpa, len, perm)| Op::Map {
                gpa,
                hpa,
                len,
                perm
            }),
            (addr(), len).prop_map(|(gpa, len)| Op::Unmap { gpa, len }),
        ]
    }

    /// The model: guest-physical page -> its leaf.
    type Model = BTreeMap<u64, Leaf>;

    fn model_map(m: &mut Model, gpa: u64, hpa: u64, len: u64, perm: Perm) -> Result<(), EptError> {
        if !(gpa | hpa | len).is_multiple_of(SIZE_4K) {
            return Err(EptError::Misaligned);
        }
        if gpa + len > GPA_LIMIT {
            return Err(EptError::OutOfRange);
        }
        if let Some((&p, _)) = m.range(gpa..gpa + len).next() {
            // The first chunk of the request that touches p.
            let mut off = 0;
            while off < len {
                let size =
                    if large_chunk(gpa + off, hpa + off, len - off) { SIZE_2M } else { SIZE_4K };
                if p < gpa + off + size {
                    return Err(EptError::Overlap(gpa + off));
                }
                off += size;
            }
        }
        let mut off = 0;
        while off < len {
            let size = if large_chunk(gpa + off, hpa + off, len - off) { SIZE_2M } else { SIZE_4K };
            let leaf = Leaf { start: gpa + off, size, hpa: hpa + off, perm: perm.bits() };
            for p in (0..size).step_by(SIZE_4K as usize) {
                m.insert(gpa + off + p, leaf);
            }
            off += size;
        }
        Ok(())
    }

    fn model_unmap(m: &mut Model, gpa: u64, len: u64) -> Result<u64, EptError> {
        if gpa + len > GPA_LIMIT {
            return Err(EptError::OutOfRange);
        }
        let mut off = 0;
        while off < len {
            let Some(l) = m.get(&(gpa + off)) else {
                return Err(EptError::NotMapped(gpa + off));
            };
            if l.start != gpa + off || l.size > len - off {
                return Err(EptError::Misaligned);
            }
            off += l.size;
        }
        for p in (gpa..gpa + len).step_by(SIZE_4K as usize) {
            m.remove(&p);
        }
        Ok(len)
    }

    /// The first page-directory entry whose count of present page-table entries is wrong:
    /// (its guest-physical address, the count it holds, the entries present).
    fn miscounted(f: &mut impl Frames, root: u64) -> Option<(u64, u64, u64)> {
        for i3 in 0..512u64 {
            let e3 = f.table(root)[i3 as usize];
            if !present(e3) {
                continue;
            }
            for i2 in 0..512u64 {
                let e2 = f.table(e3 & ADDR_MASK)[i2 as usize];
                if !present(e2) {
                    continue;
                }
                for i1 in 0..512u64 {
                    let e1 = f.table(e2 & ADDR_MASK)[i1 as usize];
                    if !present(e1) || e1 & LARGE != 0 {
                        continue;
                    }
                    let held = (e1 & COUNT_MASK) >> COUNT_SHIFT;
                    let real = f.table(e1 & ADDR_MASK).iter().filter(|&&e| present(e)).count();
                    if held != real as u64 {
                        return Some((i3 << 39 | i2 << 30 | i1 << 21, held, real as u64));
                    }
                }
            }
        }
        None
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Random maps and unmaps against the model: a failed call leaves every table
        /// byte-identical, translations equal the model's after every call, and unmapping
        /// everything brings frame use back to the root alone.
        #[test]
        fn map_unmap_matches_the_model(
            ops in prop::collection::vec(op(), 1..40),
            frames in 4u64..24,
            prebuilt in prop::bool::ANY,
        ) {
            let mut f = host_frames(frames);
            let root = new_root(&mut f).unwrap();
            // Directories kept for the first GiB (what the grant window gets): they change
            // nothing the model sees, and stay when emptied.
            let kept = if prebuilt { prebuild(&mut f, root, 0, 1 << 30).unwrap(); 2 } else { 0 };
            let mut m = Model::new();
            for op in ops {
                let before = snapshot(&f);
                let mut model = m.clone();
                let (got, want) = match op {
                    Op::Map { gpa, hpa, len, perm } => (
                        map_with(&mut f, root, gpa, hpa, len, perm).map(|()| len),
                        model_map(&mut model, gpa, hpa, len, perm).map(|()| len),
                    ),
                    Op::Unmap { gpa, len } => {
                        (unmap(&mut f, root, gpa, len), model_unmap(&mut model, gpa, len))
                    }
                };
                if got == Err(EptError::OutOfFrames) {
                    prop_assert!(want.is_ok(), "out of frames only where the model maps");
                } else {
                    prop_assert_eq!(got, want, "{:?}", op);
                    m = model;
                }
                if got.is_err() {
                    prop_assert!(snapshot(&f) == before, "failed {:?} changed the tables", op);
                }
                prop_assert_eq!(mapped_bytes(&mut f, root), m.len() as u64 * SIZE_4K);
                prop_assert_eq!(miscounted(&mut f, root), None);
                for (&p, l) in m.iter().step_by(7) {
                    let want = (l.hpa + (p - l.start) + 0x123, l.perm);
                    prop_assert_eq!(translate_perm(&mut f, root, p + 0x123), Some(want));
                }
                for r in REGIONS {
                    for p in (r..r + (8 << 20)).step_by(61 * SIZE_4K as usize) {
                        if !m.contains_key(&p) {
                            prop_assert_eq!(translate(&mut f, root, p), None);
                        }
                    }
                }
            }
            let leaves: Vec<Leaf> = m.values().copied().collect();
            for l in leaves {
                if m.contains_key(&l.start) {
                    prop_assert_eq!(unmap(&mut f, root, l.start, l.size), Ok(l.size));
                    prop_assert_eq!(model_unmap(&mut m, l.start, l.size), Ok(l.size));
                }
            }
            prop_assert_eq!(f.in_use(), 1 + kept, "only the root (and the kept tables) left");
            prop_assert_eq!(mapped_bytes(&mut f, root), 0);
        }

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
            let mut f = pool();
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
