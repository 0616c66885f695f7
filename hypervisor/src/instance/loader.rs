// SPDX-License-Identifier: MIT OR Apache-2.0
//! The guest kernel ELF, validated before a byte of it is copied: 64-bit little-endian
//! x86-64 executable; loadable segments identity-addressed (`p_vaddr == p_paddr`), inside the
//! partition above [`KERNEL_BASE`], within the file, not overlapping each other; the entry
//! point in an executable segment. The result is a [`LoadPlan`] of plain numbers.

use core::fmt;
use elf::{abi, endian::LittleEndian, file::Class, ElfBytes};
use vmcall_proto::guest::KERNEL_BASE;

pub const MAX_SEGMENTS: usize = 8;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub gpa: u64,
    pub file_offset: u64,
    pub file_size: u64,
    pub mem_size: u64,
    pub exec: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadPlan {
    pub entry: u64,
    segments: [Segment; MAX_SEGMENTS],
    n: usize,
}

impl LoadPlan {
    pub fn segments(&self) -> &[Segment] {
        &self.segments[..self.n]
    }
    /// Highest guest-physical address used (exclusive).
    pub fn end(&self) -> u64 {
        self.segments().iter().map(|s| s.gpa + s.mem_size).max().unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Larger than `vmcall_proto::config::MAX_KERNEL_BYTES`.
    TooLarge(u64),
    Unparsable,
    NotElf64,
    NotX86_64,
    NotExecutable,
    NoSegments,
    TooManySegments,
    VirtNotPhys(u64),
    OutsidePartition(u64),
    FileSizeOverMemSize(u64),
    BeyondFile(u64),
    Overlap(u64),
    EntryNotExecutable(u64),
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ElfError::*;
        match self {
            TooLarge(n) => write!(f, "{n} bytes: larger than a kernel may be"),
            Unparsable => f.write_str("not a parsable ELF file"),
            NotElf64 => f.write_str("not a 64-bit little-endian ELF"),
            NotX86_64 => f.write_str("not an x86-64 ELF"),
            NotExecutable => f.write_str("not an executable (ET_EXEC)"),
            NoSegments => f.write_str("no loadable segment"),
            TooManySegments => write!(f, "more than {MAX_SEGMENTS} loadable segments"),
            VirtNotPhys(a) => write!(f, "segment at {a:#x}: virtual and physical addresses differ"),
            OutsidePartition(a) => {
                write!(f, "segment at {a:#x}: outside the partition's kernel area")
            }
            FileSizeOverMemSize(a) => write!(f, "segment at {a:#x}: file size over memory size"),
            BeyondFile(a) => write!(f, "segment at {a:#x}: data beyond the end of the file"),
            Overlap(a) => write!(f, "segment at {a:#x}: overlaps another segment"),
            EntryNotExecutable(a) => write!(f, "entry point {a:#x} not in an executable segment"),
        }
    }
}

/// Validates `image` for a partition of `partition_size` bytes.
pub fn plan(image: &[u8], partition_size: u64) -> Result<LoadPlan, ElfError> {
    use ElfError::*;
    if image.len() as u64 > vmcall_proto::config::MAX_KERNEL_BYTES {
        return Err(TooLarge(image.len() as u64));
    }
    let file = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(|_| Unparsable)?;
    let h = &file.ehdr;
    if h.class != Class::ELF64 {
        return Err(NotElf64);
    }
    if h.e_machine != abi::EM_X86_64 {
        return Err(NotX86_64);
    }
    if h.e_type != abi::ET_EXEC {
        return Err(NotExecutable);
    }
    let mut p = LoadPlan { entry: h.e_entry, segments: [Segment::default(); MAX_SEGMENTS], n: 0 };
    for ph in file.segments().ok_or(NoSegments)?.iter().filter(|ph| ph.p_type == abi::PT_LOAD) {
        let a = ph.p_paddr;
        if ph.p_vaddr != a {
            return Err(VirtNotPhys(a));
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(FileSizeOverMemSize(a));
        }
        let end = a.checked_add(ph.p_memsz).ok_or(OutsidePartition(a))?;
        if a < KERNEL_BASE || end > partition_size {
            return Err(OutsidePartition(a));
        }
        if ph.p_offset.checked_add(ph.p_filesz).is_none_or(|e| e > image.len() as u64) {
            return Err(BeyondFile(a));
        }
        if p.segments().iter().any(|s| a < s.gpa + s.mem_size && s.gpa < end) {
            return Err(Overlap(a));
        }
        if p.n == MAX_SEGMENTS {
            return Err(TooManySegments);
        }
        p.segments[p.n] = Segment {
            gpa: a,
            file_offset: ph.p_offset,
            file_size: ph.p_filesz,
            mem_size: ph.p_memsz,
            exec: ph.p_flags & abi::PF_X != 0,
        };
        p.n += 1;
    }
    if p.n == 0 {
        return Err(NoSegments);
    }
    if !p.segments().iter().any(|s| s.exec && s.gpa <= p.entry && p.entry < s.gpa + s.mem_size) {
        return Err(EntryNotExecutable(p.entry));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (vaddr, paddr, offset, filesz, memsz, flags)
    type Ph = (u64, u64, u64, u64, u64, u32);

    fn elf(machine: u16, e_type: u16, entry: u64, phs: &[Ph], file_len: usize) -> Vec<u8> {
        let mut b = vec![0u8; file_len.max(64 + 56 * phs.len())];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // little-endian
        b[6] = 1; // version
        b[16..18].copy_from_slice(&e_type.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[56..58].copy_from_slice(&(phs.len() as u16).to_le_bytes());
        for (i, &(va, pa, off, fsz, msz, flags)) in phs.iter().enumerate() {
            let o = 64 + 56 * i;
            b[o..o + 4].copy_from_slice(&abi::PT_LOAD.to_le_bytes());
            b[o + 4..o + 8].copy_from_slice(&flags.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&off.to_le_bytes());
            b[o + 16..o + 24].copy_from_slice(&va.to_le_bytes());
            b[o + 24..o + 32].copy_from_slice(&pa.to_le_bytes());
            b[o + 32..o + 40].copy_from_slice(&fsz.to_le_bytes());
            b[o + 40..o + 48].copy_from_slice(&msz.to_le_bytes());
        }
        b
    }

    const M: u64 = 0x10_0000;
    const RX: u32 = abi::PF_R | abi::PF_X;
    const RW: u32 = abi::PF_R | abi::PF_W;
    const PART: u64 = 16 << 20;

    fn good() -> Vec<u8> {
        elf(
            abi::EM_X86_64,
            abi::ET_EXEC,
            M + 0x10,
            &[
                (M, M, 0x1000, 0x800, 0x800, RX),
                (M + 0x1000, M + 0x1000, 0x1800, 0x100, 0x4000, RW),
            ],
            0x2000,
        )
    }

    #[test]
    fn a_good_image_gives_a_plan() {
        let p = plan(&good(), PART).unwrap();
        assert_eq!(p.entry, M + 0x10);
        assert_eq!(p.segments().len(), 2);
        assert_eq!(p.end(), M + 0x5000);
        assert!(p.segments()[0].exec && !p.segments()[1].exec);
    }

    #[test]
    fn an_image_over_the_kernel_limit_is_refused_unread() {
        let mut big = good();
        big.resize(vmcall_proto::config::MAX_KERNEL_BYTES as usize + 1, 0);
        assert_eq!(plan(&big, 1 << 30), Err(ElfError::TooLarge(big.len() as u64)));
        big.pop();
        assert!(plan(&big, 1 << 30).is_ok());
    }

    #[test]
    fn header_checks() {
        assert_eq!(plan(b"garbage", PART), Err(ElfError::Unparsable));
        let mut b = good();
        b[4] = 1;
        assert!(matches!(plan(&b, PART), Err(ElfError::NotElf64 | ElfError::Unparsable)));
        let b = elf(abi::EM_386, abi::ET_EXEC, M, &[(M, M, 0x1000, 0x10, 0x10, RX)], 0x2000);
        assert_eq!(plan(&b, PART), Err(ElfError::NotX86_64));
        let b = elf(abi::EM_X86_64, abi::ET_DYN, M, &[(M, M, 0x1000, 0x10, 0x10, RX)], 0x2000);
        assert_eq!(plan(&b, PART), Err(ElfError::NotExecutable));
        let b = elf(abi::EM_X86_64, abi::ET_EXEC, M, &[], 0x2000);
        assert_eq!(plan(&b, PART), Err(ElfError::NoSegments));
    }

    #[test]
    fn segment_checks() {
        let one = |ph: Ph, entry: u64| {
            plan(&elf(abi::EM_X86_64, abi::ET_EXEC, entry, &[ph], 0x2000), PART)
        };
        assert_eq!(one((M + 1, M, 0x1000, 0x10, 0x10, RX), M), Err(ElfError::VirtNotPhys(M)));
        assert_eq!(
            one((0x8000, 0x8000, 0x1000, 0x10, 0x10, RX), 0x8000),
            Err(ElfError::OutsidePartition(0x8000))
        );
        assert_eq!(
            one((PART - 8, PART - 8, 0x1000, 0x10, 0x10, RX), PART - 8),
            Err(ElfError::OutsidePartition(PART - 8))
        );
        assert_eq!(one((M, M, 0, 0, u64::MAX, RX), M), Err(ElfError::OutsidePartition(M)));
        assert_eq!(one((M, M, 0x1000, 0x20, 0x10, RX), M), Err(ElfError::FileSizeOverMemSize(M)));
        assert_eq!(one((M, M, 0x1f00, 0x200, 0x200, RX), M), Err(ElfError::BeyondFile(M)));
        assert_eq!(one((M, M, 0x1000, 0x10, 0x10, RW), M), Err(ElfError::EntryNotExecutable(M)));
        assert_eq!(
            one((M, M, 0x1000, 0x10, 0x10, RX), M + 0x10),
            Err(ElfError::EntryNotExecutable(M + 0x10))
        );
        let two = elf(
            abi::EM_X86_64,
            abi::ET_EXEC,
            M,
            &[(M, M, 0x1000, 0x10, 0x2000, RX), (M + 0x1000, M + 0x1000, 0x1000, 0x10, 0x10, RW)],
            0x2000,
        );
        assert_eq!(plan(&two, PART), Err(ElfError::Overlap(M + 0x1000)));
    }
}
