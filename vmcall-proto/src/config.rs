// SPDX-License-Identifier: MIT OR Apache-2.0
//! The machine description as the hypervisor receives it: a versioned binary blob (a
//! multiboot2 module) compiled by `cargo xtask` from a TOML config.
//!
//! Layout, all little-endian, no padding between parts:
//! [`Header`] (32 bytes), then `guest_count` [`GuestEntry`], `channel_count`
//! [`ChannelEntry`], `grant_count` [`GrantEntry`]. `length` is the whole blob; `checksum` is
//! FNV-1a (32-bit) over the whole blob with the checksum field read as zero.
//!
//! [`parse`] checks everything (magic, version, length, checksum, every count, bound, name
//! and reference) before handing out any of it; the hypervisor uses nothing else.

use crate::fixed;
use core::fmt;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const MAGIC: [u8; 8] = *b"MKVCONF\0";
pub const VERSION: u32 = 1;
pub const MAX_GUESTS: usize = 64;
pub const MAX_CHANNELS: usize = 256;
pub const MAX_GRANTS: usize = 256;
/// Guest memory bounds, MiB (partitions are whole 2-MiB pages).
pub const MIN_GUEST_MIB: u32 = (crate::guest::MIN_PARTITION >> 20) as u32;
pub const MAX_GUEST_MIB: u32 = (crate::guest::MAX_PARTITION >> 20) as u32;
pub const MAX_SLOTS: u32 = 4096;
pub const MAX_GRANT_MIB: u32 = 1024;

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Header {
    pub magic: [u8; 8],
    pub version: u32,
    pub length: u32,
    pub checksum: u32,
    pub guest_count: u16,
    pub channel_count: u16,
    pub grant_count: u16,
    pub _reserved: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<Header>() == 32);

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct GuestEntry {
    pub name: [u8; 32],
    pub workload: [u8; 32],
    pub args: [u8; 128],
    /// Hypervisor core index (0 = the bootstrap processor).
    pub core: u32,
    pub memory_mib: u32,
    pub _reserved: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<GuestEntry>() == 208);

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ChannelEntry {
    pub name: [u8; 32],
    /// Guest indices of the two endpoints.
    pub a: u16,
    pub b: u16,
    pub slots: u32,
    pub _reserved: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<ChannelEntry>() == 48);

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct GrantEntry {
    pub name: [u8; 32],
    pub guest: u16,
    pub _reserved0: u16,
    pub memory_mib: u32,
    pub _reserved: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<GrantEntry>() == 48);

/// Why a blob is rejected. Entry errors carry the entry's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobError {
    TooShort,
    BadMagic,
    BadVersion(u32),
    BadLength { header: u32, actual: usize },
    BadChecksum { header: u32, computed: u32 },
    TooMany(&'static str),
    NoGuests,
    BadName(&'static str, usize),
    DuplicateName(&'static str, usize),
    BadWorkload(usize),
    BadArgs(usize),
    BadMemory(&'static str, usize),
    SharedCore(usize),
    BadEndpoint(usize),
    BadSlots(usize),
    BadGrantGuest(usize),
}

impl fmt::Display for BlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use BlobError::*;
        match *self {
            TooShort => f.write_str("shorter than its header"),
            BadMagic => f.write_str("bad magic (not an mkvisor config blob)"),
            BadVersion(v) => write!(f, "version {v}, expected {VERSION}"),
            BadLength { header, actual } => write!(f, "length field {header} but {actual} bytes"),
            BadChecksum { header, computed } => {
                write!(f, "checksum {header:#010x}, computed {computed:#010x}")
            }
            TooMany(what) => write!(f, "too many {what}"),
            NoGuests => f.write_str("no guests"),
            BadName(what, i) => write!(f, "{what} {i}: bad name"),
            DuplicateName(what, i) => write!(f, "{what} {i}: duplicate name"),
            BadWorkload(i) => write!(f, "guest {i}: bad workload name"),
            BadArgs(i) => write!(f, "guest {i}: bad arguments"),
            BadMemory(what, i) => write!(f, "{what} {i}: memory size out of bounds or odd"),
            SharedCore(i) => write!(f, "guest {i}: core already taken by another guest"),
            BadEndpoint(i) => write!(f, "channel {i}: endpoint is not another guest"),
            BadSlots(i) => {
                write!(f, "channel {i}: slots must be a power of two in 1..={MAX_SLOTS}")
            }
            BadGrantGuest(i) => write!(f, "grant {i}: unknown guest"),
        }
    }
}

/// FNV-1a, 32-bit, over `blob` with the checksum field taken as zero.
pub fn checksum(blob: &[u8]) -> u32 {
    const OFF: usize = core::mem::offset_of!(Header, checksum);
    let mut h: u32 = 0x811c_9dc5;
    for (i, &b) in blob.iter().enumerate() {
        let b = if (OFF..OFF + 4).contains(&i) { 0 } else { b };
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A validated blob.
#[derive(Clone, Copy, Debug)]
pub struct Config<'a> {
    pub header: Header,
    blob: &'a [u8],
}

fn entry<T: FromBytes>(blob: &[u8], offset: usize, i: usize) -> T {
    let size = core::mem::size_of::<T>();
    let start = offset + i * size;
    // Bounds were checked against the header counts in `parse`.
    T::read_from_bytes(&blob[start..start + size]).expect("entry within the checked blob")
}

impl<'a> Config<'a> {
    fn guests_at(&self) -> usize {
        core::mem::size_of::<Header>()
    }
    fn channels_at(&self) -> usize {
        self.guests_at() + self.header.guest_count as usize * core::mem::size_of::<GuestEntry>()
    }
    fn grants_at(&self) -> usize {
        self.channels_at()
            + self.header.channel_count as usize * core::mem::size_of::<ChannelEntry>()
    }
    pub fn guest_count(&self) -> usize {
        self.header.guest_count as usize
    }
    pub fn guest(&self, i: usize) -> GuestEntry {
        entry(self.blob, self.guests_at(), i)
    }
    pub fn guests(&self) -> impl Iterator<Item = GuestEntry> + '_ {
        (0..self.guest_count()).map(|i| self.guest(i))
    }
    pub fn channel(&self, i: usize) -> ChannelEntry {
        entry(self.blob, self.channels_at(), i)
    }
    pub fn channels(&self) -> impl Iterator<Item = ChannelEntry> + '_ {
        (0..self.header.channel_count as usize).map(|i| self.channel(i))
    }
    pub fn grants(&self) -> impl Iterator<Item = GrantEntry> + '_ {
        (0..self.header.grant_count as usize).map(|i| entry(self.blob, self.grants_at(), i))
    }
}

/// The rule for guest, channel and grant names (and argument keys): letters, digits, `-`
/// and `_`, at least one. Host tools check it on the TOML, the hypervisor on the blob.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_name_field(field: &[u8]) -> bool {
    fixed::get(field).is_some_and(valid_name)
}

/// Total blob length for these counts.
pub const fn blob_len(guests: usize, channels: usize, grants: usize) -> usize {
    core::mem::size_of::<Header>()
        + guests * core::mem::size_of::<GuestEntry>()
        + channels * core::mem::size_of::<ChannelEntry>()
        + grants * core::mem::size_of::<GrantEntry>()
}

/// Validates a blob completely.
pub fn parse(blob: &[u8]) -> Result<Config<'_>, BlobError> {
    use BlobError::*;
    let header = Header::read_from_prefix(blob).map_err(|_| TooShort)?.0;
    if header.magic != MAGIC {
        return Err(BadMagic);
    }
    if header.version != VERSION {
        return Err(BadVersion(header.version));
    }
    if header.length as usize != blob.len() {
        return Err(BadLength { header: header.length, actual: blob.len() });
    }
    let computed = checksum(blob);
    if computed != header.checksum {
        return Err(BadChecksum { header: header.checksum, computed });
    }
    let (g, c, r) =
        (header.guest_count as usize, header.channel_count as usize, header.grant_count as usize);
    if g > MAX_GUESTS {
        return Err(TooMany("guests"));
    }
    if c > MAX_CHANNELS {
        return Err(TooMany("channels"));
    }
    if r > MAX_GRANTS {
        return Err(TooMany("grants"));
    }
    if g == 0 {
        return Err(NoGuests);
    }
    if blob_len(g, c, r) != blob.len() {
        return Err(BadLength { header: header.length, actual: blob_len(g, c, r) });
    }
    let cfg = Config { header, blob };
    for i in 0..g {
        let e = cfg.guest(i);
        if !valid_name_field(&e.name) {
            return Err(BadName("guest", i));
        }
        if (0..i).any(|j| cfg.guest(j).name == e.name) {
            return Err(DuplicateName("guest", i));
        }
        if !valid_name_field(&e.workload) {
            return Err(BadWorkload(i));
        }
        if fixed::get(&e.args).is_none() {
            return Err(BadArgs(i));
        }
        if !(MIN_GUEST_MIB..=MAX_GUEST_MIB).contains(&e.memory_mib)
            || !e.memory_mib.is_multiple_of(2)
        {
            return Err(BadMemory("guest", i));
        }
        if (0..i).any(|j| cfg.guest(j).core == e.core) {
            return Err(SharedCore(i));
        }
    }
    for i in 0..c {
        let e = cfg.channel(i);
        if !valid_name_field(&e.name) {
            return Err(BadName("channel", i));
        }
        if (0..i).any(|j| cfg.channel(j).name == e.name) {
            return Err(DuplicateName("channel", i));
        }
        if e.a as usize >= g || e.b as usize >= g || e.a == e.b {
            return Err(BadEndpoint(i));
        }
        if e.slots == 0 || e.slots > MAX_SLOTS || !e.slots.is_power_of_two() {
            return Err(BadSlots(i));
        }
    }
    for (i, e) in cfg.grants().enumerate() {
        if !valid_name_field(&e.name) {
            return Err(BadName("grant", i));
        }
        if cfg.grants().take(i).any(|o| o.name == e.name) {
            return Err(DuplicateName("grant", i));
        }
        if e.guest as usize >= g {
            return Err(BadGrantGuest(i));
        }
        if e.memory_mib == 0 || e.memory_mib > MAX_GRANT_MIB || e.memory_mib % 2 != 0 {
            return Err(BadMemory("grant", i));
        }
    }
    Ok(cfg)
}

/// Writes a blob for these entries into `out` (exactly [`blob_len`] bytes) and fills in
/// length and checksum. Returns `None` if `out` has the wrong size or a count is too large.
pub fn encode(
    guests: &[GuestEntry],
    channels: &[ChannelEntry],
    grants: &[GrantEntry],
    out: &mut [u8],
) -> Option<()> {
    if out.len() != blob_len(guests.len(), channels.len(), grants.len())
        || guests.len() > u16::MAX as usize
        || channels.len() > u16::MAX as usize
        || grants.len() > u16::MAX as usize
    {
        return None;
    }
    let header = Header {
        magic: MAGIC,
        version: VERSION,
        length: out.len() as u32,
        checksum: 0,
        guest_count: guests.len() as u16,
        channel_count: channels.len() as u16,
        grant_count: grants.len() as u16,
        _reserved: [0; 6],
    };
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        out[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(header.as_bytes());
    guests.iter().for_each(|e| put(e.as_bytes()));
    channels.iter().for_each(|e| put(e.as_bytes()));
    grants.iter().for_each(|e| put(e.as_bytes()));
    let sum = checksum(out);
    let off = core::mem::offset_of!(Header, checksum);
    out[off..off + 4].copy_from_slice(&sum.to_le_bytes());
    Some(())
}

/// A guest entry from its parts (host tools and tests). `None` if a string does not fit.
pub fn guest_entry(
    name: &str,
    workload: &str,
    args: &str,
    core: u32,
    memory_mib: u32,
) -> Option<GuestEntry> {
    Some(GuestEntry {
        name: fixed::put(name)?,
        workload: fixed::put(workload)?,
        args: fixed::put(args)?,
        core,
        memory_mib,
        _reserved: [0; 8],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> (Vec<GuestEntry>, Vec<ChannelEntry>, Vec<GrantEntry>) {
        let g = vec![
            guest_entry("alpha", "hello", "", 0, 16).unwrap(),
            guest_entry("beta", "spin", "ms=5", 1, 8).unwrap(),
        ];
        let c = vec![ChannelEntry {
            name: fixed::put("ab").unwrap(),
            a: 0,
            b: 1,
            slots: 64,
            _reserved: [0; 8],
        }];
        let r = vec![GrantEntry {
            name: fixed::put("pool").unwrap(),
            guest: 1,
            _reserved0: 0,
            memory_mib: 4,
            _reserved: [0; 8],
        }];
        (g, c, r)
    }

    fn blob(g: &[GuestEntry], c: &[ChannelEntry], r: &[GrantEntry]) -> Vec<u8> {
        let mut out = vec![0; blob_len(g.len(), c.len(), r.len())];
        encode(g, c, r, &mut out).unwrap();
        out
    }

    #[test]
    fn round_trip() {
        let (g, c, r) = sample();
        let b = blob(&g, &c, &r);
        let cfg = parse(&b).unwrap();
        assert_eq!(cfg.guest_count(), 2);
        assert_eq!(fixed::get(&cfg.guest(1).name), Some("beta"));
        assert_eq!(fixed::get(&cfg.guest(1).args), Some("ms=5"));
        assert_eq!(cfg.channels().next().unwrap().slots, 64);
        assert_eq!(cfg.grants().next().unwrap().memory_mib, 4);
    }

    #[test]
    fn header_damage_is_caught() {
        let (g, c, r) = sample();
        let good = blob(&g, &c, &r);
        assert_eq!(parse(&good[..10]).unwrap_err(), BlobError::TooShort);
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(parse(&b).unwrap_err(), BlobError::BadMagic);
        let mut b = good.clone();
        b[8] = 9;
        assert_eq!(parse(&b).unwrap_err(), BlobError::BadVersion(9));
        assert!(matches!(parse(&good[..good.len() - 1]), Err(BlobError::BadLength { .. })));
        let mut b = good.clone();
        let last = b.len() - 1;
        b[last] ^= 1;
        assert!(matches!(parse(&b), Err(BlobError::BadChecksum { .. })));
    }

    #[test]
    fn semantic_errors_are_caught_even_with_a_good_checksum() {
        let (g, c, r) = sample();
        let mut g2 = g.clone();
        g2[1].core = 0;
        assert_eq!(parse(&blob(&g2, &c, &r)).unwrap_err(), BlobError::SharedCore(1));
        let mut g2 = g.clone();
        g2[1].name = g2[0].name;
        assert_eq!(parse(&blob(&g2, &c, &r)).unwrap_err(), BlobError::DuplicateName("guest", 1));
        let mut g2 = g.clone();
        g2[0].memory_mib = 0;
        assert_eq!(parse(&blob(&g2, &c, &r)).unwrap_err(), BlobError::BadMemory("guest", 0));
        g2[0].memory_mib = 5;
        assert_eq!(parse(&blob(&g2, &c, &r)).unwrap_err(), BlobError::BadMemory("guest", 0));
        let mut c2 = c.clone();
        c2[0].b = 0;
        assert_eq!(parse(&blob(&g, &c2, &r)).unwrap_err(), BlobError::BadEndpoint(0));
        c2[0].b = 7;
        assert_eq!(parse(&blob(&g, &c2, &r)).unwrap_err(), BlobError::BadEndpoint(0));
        let mut c2 = c.clone();
        c2[0].slots = 3;
        assert_eq!(parse(&blob(&g, &c2, &r)).unwrap_err(), BlobError::BadSlots(0));
        let mut r2 = r.clone();
        r2[0].guest = 2;
        assert_eq!(parse(&blob(&g, &c, &r2)).unwrap_err(), BlobError::BadGrantGuest(0));
        let mut g2 = g.clone();
        g2[0].name[3] = b' ';
        assert_eq!(parse(&blob(&g2, &c, &r)).unwrap_err(), BlobError::BadName("guest", 0));
        assert_eq!(parse(&blob(&[], &[], &[])).unwrap_err(), BlobError::NoGuests);
    }

    proptest! {
        /// Any corruption of a valid blob is either rejected or still fully valid; parsing
        /// never panics.
        #[test]
        fn corrupted_blobs_never_panic(pos in 0usize..600, val: u8, cut in 0usize..700) {
            let (g, c, r) = sample();
            let mut b = blob(&g, &c, &r);
            let p = pos % b.len();
            b[p] = val;
            let _ = parse(&b);
            let _ = parse(&b[..cut.min(b.len())]);
        }
    }
}
