// SPDX-License-Identifier: MIT OR Apache-2.0
//! The machine description as the hypervisor receives it: a versioned binary blob (a
//! multiboot2 module) compiled by `cargo xtask` from a TOML config.
//!
//! Layout, all little-endian, no padding between parts:
//! [`Header`] (32 bytes), then `guest_count` [`GuestEntry`], `channel_count`
//! [`ChannelEntry`], `grant_count` [`GrantEntry`], `device_count` [`DeviceEntry`]. `length`
//! is the whole blob; `checksum` is
//! FNV-1a (32-bit) over the whole blob with the checksum field read as zero.
//!
//! [`parse`] checks everything (magic, version, length, checksum, every count, bound, name
//! and reference) before handing out any of it; the hypervisor uses nothing else.

use crate::device::{self, DeviceEntry, MAX_DEVICES, MAX_DEVICES_PER_GUEST};
use crate::fixed;
use crate::guest::MAX_CHANNELS_PER_GUEST;
use core::fmt;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const MAGIC: [u8; 8] = *b"MKVCONF\0";
pub const VERSION: u32 = 4;
/// Kept below `config` and `guest`, which both bound by them.
pub use crate::limits::{MAX_CHANNELS, MAX_GUESTS};
pub const MAX_GRANTS: usize = 256;
/// Guest memory bounds, MiB (partitions are whole 2-MiB pages).
pub const MIN_GUEST_MIB: u32 = (crate::guest::MIN_PARTITION >> 20) as u32;
pub const MAX_GUEST_MIB: u32 = (crate::guest::MAX_PARTITION >> 20) as u32;
pub const MAX_SLOTS: u32 = 4096;
pub const MAX_GRANT_MIB: u32 = 1024;
/// Grants one guest may receive (they become its first capability slots).
pub const MAX_GRANTS_PER_GUEST: usize = 8;
/// Bytes a core sends to the UART in one turn of the hypervisor's console (CR LF included):
/// no core waits for another's line, so this is the console's whole share of a core's
/// longest stretch away from its inbox.
pub const CONSOLE_TURN_BYTES: u64 = 64;
/// One byte on the UART at 115200 baud, 8N1 (10 bits), nanoseconds, rounded up.
pub const UART_BYTE_NS: u64 = 86_806;
/// The longest stretch away from the inbox, in instructions, of any step a guest can cause
/// apart from the console: an EPT map step (at most 2,095 measured), an unmap step (1,490),
/// 32 KiB of zeroing or copying (4,096 `rep stosq` iterations), a `REVOKE` message's records
/// (no EPT write). Stated with a margin over what was measured.
pub const LONGEST_STEP_INSTRUCTIONS: u64 = 24_000;
/// The slowest machine the bound is stated for, instructions per second: Bochs as the
/// project runs it (`ips=4000000`); hardware is faster, so only the UART's time stays.
pub const IPS_FLOOR: u64 = 4_000_000;
/// The bound on a live core's stretch away from its inbox, microseconds: a console turn
/// plus the longest step at the slowest machine (5.6 ms + 6 ms).
pub const LONGEST_STRETCH_US: u64 = (CONSOLE_TURN_BYTES * UART_BYTE_NS).div_ceil(1000)
    + LONGEST_STEP_INSTRUCTIONS * 1_000_000 / IPS_FLOOR;
/// How many times the stated bound the detector's timeout (8 periods) must be, at least: the
/// measured stretches include what the bound leaves out (a console turn followed by a
/// record's formatting, up to 45,000 ticks measured in chaos runs; before the EPT build
/// served the inbox between its parts, guest setup took up to 89,000 in one stretch), so
/// the timeout keeps a wide margin.
pub const DETECTOR_MARGIN: u64 = 8;
/// The shortest failure-detector period (`probe_ms`), 0 (off) aside. A core is fenced after
/// 8 silent periods, which must outlast [`DETECTOR_MARGIN`] times the bound on the longest
/// stretch a live core spends away from its inbox ([`LONGEST_STRETCH_US`], about 11.6 ms):
/// 8 periods of 12 ms are 96 ms >= 8 x 11.6 ms = 92 ms (README "Core membership"). Derived,
/// not chosen: `cargo xtask check` and the hypervisor refuse a shorter period.
pub const MIN_PROBE_MS: u64 = (DETECTOR_MARGIN * LONGEST_STRETCH_US).div_ceil(8 * 1000);
const _: () = assert!(MIN_PROBE_MS == 12);
/// The longest failure-detector period.
pub const MAX_PROBE_MS: u64 = 10_000;

/// The multiboot2 module names of the guest kernels, by [`GuestEntry::kernel`] index: 0 is
/// the built-in `guestkernel` (the workloads), the others are kernels a config names
/// (`kernel = ...` on a guest), one module per distinct kernel.
pub const KERNEL_MODULES: [&str; 7] =
    ["guestkernel", "kernel1", "kernel2", "kernel3", "kernel4", "kernel5", "kernel6"];
/// Distinct kernels of a config's own (not counting the built-in one).
pub const MAX_KERNELS: usize = KERNEL_MODULES.len() - 1;
/// Largest guest kernel file, bytes (it is a multiboot2 module in machine memory).
pub const MAX_KERNEL_BYTES: u64 = 16 << 20;

/// Private region the hypervisor carves for each guest next to its partition: EPT tables,
/// VMCS, MSR bitmap.
pub const GUEST_PRIVATE_BYTES: u64 = 2 << 20;
/// Alignment of partitions, private regions and grants (EPT maps them with 2-MiB pages).
pub const REGION_ALIGN: u64 = 2 << 20;
/// Machine memory a config may not count on, MiB: the hypervisor image, the firmware and
/// ACPI tables, the first MiB, the multiboot2 modules and the alignment lost between them.
pub const HOST_RESERVED_MIB: u32 = 32;

const fn align_up(n: u64, to: u64) -> u64 {
    (n + to - 1) & !(to - 1)
}

/// Bytes of machine memory the hypervisor carves for a config: every guest's partition
/// and private region, every grant (each 2-MiB aligned) and every channel's rings. The
/// config check and the hypervisor's plan both use this; a config fits a machine of
/// `machine_mib` when it is at most [`available_bytes`]`(machine_mib)`.
pub fn memory_needed(
    guest_mib: impl IntoIterator<Item = u32>,
    grant_mib: impl IntoIterator<Item = u32>,
    channel_slots: impl IntoIterator<Item = u32>,
) -> u64 {
    let mib = |m: u32| align_up(m as u64 * (1 << 20), REGION_ALIGN);
    let guests: u64 = guest_mib.into_iter().map(|m| mib(m) + GUEST_PRIVATE_BYTES).sum();
    let grants: u64 = grant_mib.into_iter().map(mib).sum();
    let channels: u64 = channel_slots.into_iter().map(crate::channel::channel_bytes).sum();
    guests + grants + channels
}

/// Bytes a config may use on a machine of `machine_mib`: all but [`HOST_RESERVED_MIB`].
pub const fn available_bytes(machine_mib: u32) -> u64 {
    (machine_mib.saturating_sub(HOST_RESERVED_MIB) as u64) << 20
}

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
    pub device_count: u16,
    pub _reserved: [u8; 4],
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
    /// Which kernel the guest runs: an index into [`KERNEL_MODULES`] (0: the built-in one).
    pub kernel: u16,
    pub _reserved: [u8; 6],
    /// Run budget of each incarnation, ms (0: the command line's `budget_ms`).
    pub budget_ms: u32,
    /// When the guest is started again: one of the [`restart`] values.
    pub restart: u8,
    /// Optional behaviours: a set of [`flags`] bits.
    pub flags: u8,
    /// Restarts allowed after the first start (at most [`MAX_RESTARTS`]).
    pub max_restarts: u16,
    /// Guests this one controls (stop, start, restart, query), as a bitmask of guest
    /// indices: each becomes a guest-control capability in its space.
    pub controls: u64,
}
const _: () = assert!(core::mem::size_of::<GuestEntry>() == 224);

/// Bits of [`GuestEntry::flags`].
pub mod flags {
    /// Exitless waiting (`mwait = true`): the guest may wait with MONITOR/MWAIT, which then
    /// cause no VM exit (where the processor has them; a guest with channels only).
    pub const MWAIT: u8 = 1;
    /// Every bit defined.
    pub const ALL: u8 = MWAIT;
}

/// Restart policies ([`GuestEntry::restart`]).
pub mod restart {
    /// Started once.
    pub const NEVER: u8 = 0;
    /// Started again when it was stopped (fault, budget), not when it exited.
    pub const ON_FAULT: u8 = 1;
    /// Started again however it ended (until `max_restarts`).
    pub const ALWAYS: u8 = 2;
    /// The names the config uses, by value.
    pub const NAMES: [&str; 3] = ["never", "on-fault", "always"];
}
/// Bound on `max_restarts`.
pub const MAX_RESTARTS: u16 = 1000;
/// Bound on a guest's `budget_ms` (one hour).
pub const MAX_BUDGET_MS: u32 = 3_600_000;

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
    BadLength {
        header: u32,
        actual: usize,
    },
    BadChecksum {
        header: u32,
        computed: u32,
    },
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
    /// A guest is an endpoint of more channels than its boot-info table holds.
    GuestChannels(usize),
    BadGrantGuest(usize),
    /// A guest receives more grants than the capability slots set aside for them.
    GuestGrants(usize),
    /// A guest's kernel index is past [`KERNEL_MODULES`].
    BadKernel(usize),
    /// A restart policy, restart bound or budget out of range.
    BadLifecycle(usize),
    /// A guest controls itself or a guest that does not exist.
    BadControl(usize),
    /// Guests control each other in a cycle (each would wait for the other to let go).
    ControlCycle(usize),
    /// A device entry names no guest, an unknown selector kind or flag, or an address out
    /// of range.
    BadDevice(usize),
    /// A device entry names the same function (address, or identity and match) as an
    /// earlier one.
    DuplicateDevice(usize),
    /// A guest owns more devices than its boot-info table holds.
    GuestDevices(usize),
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
            GuestChannels(i) => {
                write!(f, "guest {i}: endpoint of more than {MAX_CHANNELS_PER_GUEST} channels")
            }
            BadGrantGuest(i) => write!(f, "grant {i}: unknown guest"),
            GuestGrants(i) => write!(f, "guest {i}: more than {MAX_GRANTS_PER_GUEST} grants"),
            BadKernel(i) => write!(f, "guest {i}: kernel index past the {MAX_KERNELS} allowed"),
            BadLifecycle(i) => write!(
                f,
                "guest {i}: restart policy, max_restarts (at most {MAX_RESTARTS}), budget_ms \
                 (at most {MAX_BUDGET_MS}) out of range, or an unknown flag"
            ),
            BadControl(i) => write!(f, "guest {i}: controls itself or a guest that does not exist"),
            ControlCycle(i) => {
                write!(f, "guest {i}: is in a cycle of guests controlling each other")
            }
            BadDevice(i) => write!(f, "device {i}: unknown guest, selector, flag or address"),
            DuplicateDevice(i) => write!(f, "device {i}: names a function already assigned"),
            GuestDevices(i) => {
                write!(f, "guest {i}: owns more than {MAX_DEVICES_PER_GUEST} devices")
            }
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
    fn devices_at(&self) -> usize {
        self.grants_at() + self.header.grant_count as usize * core::mem::size_of::<GrantEntry>()
    }
    /// The device assignments, in config order.
    pub fn devices(&self) -> impl Iterator<Item = DeviceEntry> + Clone + '_ {
        (0..self.header.device_count as usize).map(|i| entry(self.blob, self.devices_at(), i))
    }
    /// The devices guest `g` owns, in config order (its boot-info order).
    pub fn devices_of(&self, g: usize) -> impl Iterator<Item = DeviceEntry> + '_ {
        self.devices().filter(move |d| d.guest as usize == g)
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

/// A guest on a cycle of control (`controls[i]`: the guests guest `i` controls, a
/// bitmask), if there is one: a controlled guest waits for its controllers to let go, so a
/// cycle would wait for ever. The lowest such index.
pub fn control_cycle(controls: &[u64]) -> Option<usize> {
    let n = controls.len().min(MAX_GUESTS);
    let mut alive: u64 = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
    // Take away, again and again, the guests that control no guest still there: what
    // remains is on a cycle or leads into one.
    loop {
        let leaves = (0..n).filter(|&i| alive & (1 << i) != 0 && controls[i] & alive == 0);
        let gone = leaves.fold(0u64, |m, i| m | 1 << i);
        if gone == 0 {
            break;
        }
        alive &= !gone;
    }
    (alive != 0).then(|| alive.trailing_zeros() as usize)
}

/// Total blob length for these counts.
pub const fn blob_len(guests: usize, channels: usize, grants: usize, devices: usize) -> usize {
    core::mem::size_of::<Header>()
        + guests * core::mem::size_of::<GuestEntry>()
        + channels * core::mem::size_of::<ChannelEntry>()
        + grants * core::mem::size_of::<GrantEntry>()
        + devices * core::mem::size_of::<DeviceEntry>()
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
    let (g, c, r, d) = (
        header.guest_count as usize,
        header.channel_count as usize,
        header.grant_count as usize,
        header.device_count as usize,
    );
    if g > MAX_GUESTS {
        return Err(TooMany("guests"));
    }
    if c > MAX_CHANNELS {
        return Err(TooMany("channels"));
    }
    if r > MAX_GRANTS {
        return Err(TooMany("grants"));
    }
    if d > MAX_DEVICES {
        return Err(TooMany("devices"));
    }
    if g == 0 {
        return Err(NoGuests);
    }
    if blob_len(g, c, r, d) != blob.len() {
        return Err(BadLength { header: header.length, actual: blob_len(g, c, r, d) });
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
        if e.kernel as usize >= KERNEL_MODULES.len() {
            return Err(BadKernel(i));
        }
        if e.restart as usize >= restart::NAMES.len()
            || e.max_restarts > MAX_RESTARTS
            || e.budget_ms > MAX_BUDGET_MS
            || e.flags & !flags::ALL != 0
        {
            return Err(BadLifecycle(i));
        }
        let others = if g == 64 { u64::MAX } else { (1u64 << g) - 1 } & !(1u64 << i);
        if e.controls & !others != 0 {
            return Err(BadControl(i));
        }
    }
    let controls: [u64; MAX_GUESTS] =
        core::array::from_fn(|i| if i < g { cfg.guest(i).controls } else { 0 });
    if let Some(i) = control_cycle(&controls[..g]) {
        return Err(ControlCycle(i));
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
    for i in 0..g {
        let ends = cfg.channels().filter(|e| e.a as usize == i || e.b as usize == i).count();
        if ends > MAX_CHANNELS_PER_GUEST {
            return Err(GuestChannels(i));
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
    for i in 0..g {
        if cfg.grants().filter(|e| e.guest as usize == i).count() > MAX_GRANTS_PER_GUEST {
            return Err(GuestGrants(i));
        }
    }
    for (i, e) in cfg.devices().enumerate() {
        let address_ok = device::Bdf::new(e.bus, e.device, e.function).valid();
        let select_ok = match e.select {
            device::select::ADDRESS => address_ok,
            device::select::ID => e.vendor_id != 0xffff,
            _ => false,
        };
        if e.guest as usize >= g || !select_ok || e.flags & !device::flags::ALL != 0 {
            return Err(BadDevice(i));
        }
        if cfg.devices().take(i).any(|o| o.selector() == e.selector()) {
            return Err(DuplicateDevice(i));
        }
    }
    for i in 0..g {
        if cfg.devices_of(i).count() > MAX_DEVICES_PER_GUEST {
            return Err(GuestDevices(i));
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
    devices: &[DeviceEntry],
    out: &mut [u8],
) -> Option<()> {
    if out.len() != blob_len(guests.len(), channels.len(), grants.len(), devices.len())
        || guests.len() > u16::MAX as usize
        || channels.len() > u16::MAX as usize
        || grants.len() > u16::MAX as usize
        || devices.len() > u16::MAX as usize
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
        device_count: devices.len() as u16,
        _reserved: [0; 4],
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
    devices.iter().for_each(|e| put(e.as_bytes()));
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
        kernel: 0,
        _reserved: [0; 6],
        budget_ms: 0,
        restart: restart::NEVER,
        flags: 0,
        max_restarts: 0,
        controls: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_needed_counts_private_regions_and_alignment() {
        const MIB: u64 = 1 << 20;
        // Four 56-MiB guests on 256 MiB: the partitions alone fit in 224 MiB, with their
        // private regions they do not (the fourth guest would not start).
        let four = memory_needed([56; 4], [], []);
        assert_eq!(four, 4 * 58 * MIB);
        assert!(four > available_bytes(256));
        assert!(memory_needed([54; 4], [], []) <= available_bytes(256));
        // Odd sizes are carved as whole 2-MiB pages; channels take their ring pages.
        assert_eq!(memory_needed([5], [3], []), (6 + 2 + 4) * MIB);
        assert_eq!(memory_needed([], [], [1, 1]), 4 * 4096);
        assert_eq!(available_bytes(16), 0);
    }
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
        let mut out = vec![0; blob_len(g.len(), c.len(), r.len(), 0)];
        encode(g, c, r, &[], &mut out).unwrap();
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

    #[test]
    fn kernel_index_is_bounded_by_the_module_names() {
        let (g, c, r) = sample();
        let mut g2 = g.clone();
        g2[1].kernel = MAX_KERNELS as u16;
        assert_eq!(parse(&blob(&g2, &c, &r)).unwrap().guest(1).kernel, MAX_KERNELS as u16);
        g2[1].kernel = MAX_KERNELS as u16 + 1;
        assert_eq!(parse(&blob(&g2, &c, &r)).unwrap_err(), BlobError::BadKernel(1));
    }

    fn guests(n: usize) -> Vec<GuestEntry> {
        (0..n).map(|i| guest_entry(&format!("g{i}"), "hello", "", i as u32, 4).unwrap()).collect()
    }

    fn chan(name: &str, a: u16, b: u16, slots: u32) -> ChannelEntry {
        ChannelEntry { name: fixed::put(name).unwrap(), a, b, slots, _reserved: [0; 8] }
    }

    fn grant(name: &str, guest: u16, memory_mib: u32) -> GrantEntry {
        let name = fixed::put(name).unwrap();
        GrantEntry { name, guest, _reserved0: 0, memory_mib, _reserved: [0; 8] }
    }

    /// Recomputes the checksum after a test edited the blob.
    fn reseal(b: &mut [u8]) {
        let sum = checksum(b);
        b[16..20].copy_from_slice(&sum.to_le_bytes());
    }

    fn parsed(g: &[GuestEntry], c: &[ChannelEntry], r: &[GrantEntry]) -> Result<(), BlobError> {
        parse(&blob(g, c, r)).map(|_| ())
    }

    /// FNV-1a, 32-bit, written out from its definition.
    fn fnv1a(bytes: &[u8]) -> u32 {
        bytes.iter().fold(2_166_136_261u32, |h, &b| (h ^ b as u32).wrapping_mul(16_777_619))
    }

    #[test]
    fn checksum_is_fnv1a_with_the_checksum_field_read_as_zero() {
        assert_eq!(core::mem::offset_of!(Header, checksum), 16);
        // Published FNV-1a test vectors (no byte falls in the checksum field).
        assert_eq!(checksum(b""), 0x811c_9dc5);
        assert_eq!(checksum(b"a"), 0xe40c_292c);
        assert_eq!(checksum(b"foobar"), 0xbf9c_f968);
        let bytes: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
        let mut zeroed = bytes.clone();
        zeroed[16..20].fill(0);
        assert_eq!(checksum(&bytes), fnv1a(&zeroed));
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            let in_field = (16..20).contains(&i);
            assert_eq!(checksum(&b) == checksum(&bytes), in_field, "byte {i}");
        }
    }

    #[test]
    fn header_fields_are_checked_in_order() {
        let (g, c, r) = sample();
        let good = blob(&g, &c, &r);
        let len = good.len();
        assert_eq!(len, blob_len(2, 1, 1, 0));
        assert_eq!(len, 32 + 2 * 224 + 48 + 48);
        assert_eq!(u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize, len);
        assert_eq!(parse(&good[..31]).unwrap_err(), BlobError::TooShort);
        assert_eq!(parse(&[]).unwrap_err(), BlobError::TooShort);
        for i in 0..8 {
            let mut b = good.clone();
            b[i] ^= 0x20;
            assert_eq!(parse(&b).unwrap_err(), BlobError::BadMagic, "magic byte {i}");
        }
        for v in [0, 1, 2, 3, 5, u32::MAX] {
            let mut b = good.clone();
            b[8..12].copy_from_slice(&v.to_le_bytes());
            assert_eq!(parse(&b).unwrap_err(), BlobError::BadVersion(v));
        }
        // The length field against the bytes handed over: short, long, or edited.
        let header = len as u32;
        assert_eq!(
            parse(&good[..len - 1]).unwrap_err(),
            BlobError::BadLength { header, actual: len - 1 }
        );
        let mut long = good.clone();
        long.push(0);
        assert_eq!(parse(&long).unwrap_err(), BlobError::BadLength { header, actual: len + 1 });
        let mut b = good.clone();
        b[12..16].copy_from_slice(&(header + 48).to_le_bytes());
        assert_eq!(
            parse(&b).unwrap_err(),
            BlobError::BadLength { header: header + 48, actual: len }
        );
        // The checksum covers every byte, the header included.
        let stored = u32::from_le_bytes(good[16..20].try_into().unwrap());
        for i in (0..len).filter(|i| !(16..20).contains(i) && !(8..16).contains(i)) {
            let mut b = good.clone();
            b[i] ^= 0x01;
            let computed = checksum(&b);
            let want = if i < 8 {
                BlobError::BadMagic
            } else {
                BlobError::BadChecksum { header: stored, computed }
            };
            assert_eq!(parse(&b).unwrap_err(), want, "byte {i}");
        }
        let mut b = good.clone();
        b[16] ^= 1;
        let header = stored ^ 1;
        assert_eq!(parse(&b).unwrap_err(), BlobError::BadChecksum { header, computed: stored });
    }

    #[test]
    fn counts_must_match_the_length() {
        let (g, c, r) = sample();
        let good = blob(&g, &c, &r);
        // (offset of the count, value): each disagrees with the 2/1/1 entries present.
        for (at, n, counts) in
            [(20, 3u16, (3, 1, 1)), (20, 1, (1, 1, 1)), (22, 2, (2, 2, 1)), (24, 0, (2, 1, 0))]
        {
            let mut b = good.clone();
            b[at..at + 2].copy_from_slice(&n.to_le_bytes());
            reseal(&mut b);
            let actual = blob_len(counts.0, counts.1, counts.2, 0);
            assert_eq!(
                parse(&b).unwrap_err(),
                BlobError::BadLength { header: good.len() as u32, actual },
                "count at {at} = {n}"
            );
        }
    }

    #[test]
    fn table_limits() {
        assert_eq!((MAX_GUESTS, MAX_CHANNELS, MAX_GRANTS), (64, 256, 256));
        let g = guests(64);
        assert_eq!(parsed(&g, &[], &[]), Ok(()));
        assert_eq!(parsed(&guests(65), &[], &[]), Err(BlobError::TooMany("guests")));
        // 256 channels spread over 64 guests (8 each), then one more.
        let ring = |k: usize| chan(&format!("c{k}"), (k % 64) as u16, ((k + 1) % 64) as u16, 1);
        let c: Vec<_> = (0..256).map(ring).collect();
        assert_eq!(parsed(&g, &c, &[]), Ok(()));
        let c: Vec<_> = (0..257).map(ring).collect();
        assert_eq!(parsed(&g, &c, &[]), Err(BlobError::TooMany("channels")));
        let r: Vec<_> = (0..256).map(|k| grant(&format!("r{k}"), (k % 64) as u16, 2)).collect();
        assert_eq!(parsed(&g, &[], &r), Ok(()));
        let r: Vec<_> = (0..257).map(|k| grant(&format!("r{k}"), (k % 64) as u16, 2)).collect();
        assert_eq!(parsed(&g, &[], &r), Err(BlobError::TooMany("grants")));
        assert_eq!(parsed(&[], &[], &[]), Err(BlobError::NoGuests));
        assert_eq!(parsed(&guests(1), &[], &[]), Ok(()));
    }

    #[test]
    fn at_most_eight_grants_per_guest() {
        assert_eq!(MAX_GRANTS_PER_GUEST, 8);
        let g = guests(3);
        let r: Vec<_> = (0..8).map(|k| grant(&format!("r{k}"), 2, 2)).collect();
        assert_eq!(parsed(&g, &[], &r), Ok(()));
        let mut more = r.clone();
        more.push(grant("r8", 2, 2));
        assert_eq!(parsed(&g, &[], &more), Err(BlobError::GuestGrants(2)));
        assert_eq!(BlobError::GuestGrants(2).to_string(), "guest 2: more than 8 grants");
    }

    #[test]
    fn at_most_sixteen_channels_per_guest() {
        assert_eq!(MAX_CHANNELS_PER_GUEST, 16);
        let g = guests(20);
        // Guest 0 is `a` of 16 channels, guest 19 is `b` of 16: the limit itself is fine.
        let mut c: Vec<_> = (1..=16).map(|k| chan(&format!("a{k}"), 0, k as u16, 1)).collect();
        c.extend((1..=16).map(|k| chan(&format!("b{k}"), k as u16 + 1, 19, 1)));
        assert_eq!(parsed(&g, &c, &[]), Ok(()));
        let mut more = c.clone();
        more.push(chan("a17", 0, 17, 1));
        assert_eq!(parsed(&g, &more, &[]), Err(BlobError::GuestChannels(0)));
        let mut more = c.clone();
        more.push(chan("b17", 0, 19, 1));
        // Guest 0 now has 17 too; the first guest over the limit is reported.
        assert_eq!(parsed(&g, &more, &[]), Err(BlobError::GuestChannels(0)));
        let mut more = c;
        more.push(chan("b17", 18, 19, 1));
        assert_eq!(parsed(&g, &more, &[]), Err(BlobError::GuestChannels(19)));
    }

    #[test]
    fn guest_memory_bounds() {
        assert_eq!((MIN_GUEST_MIB, MAX_GUEST_MIB), (4, 1024));
        for (mib, ok) in [
            (0, false),
            (2, false),
            (3, false),
            (4, true),
            (5, false),
            (6, true),
            (1022, true),
            (1023, false),
            (1024, true),
            (1026, false),
            (u32::MAX, false),
        ] {
            let mut g = guests(2);
            g[1].memory_mib = mib;
            let want = if ok { Ok(()) } else { Err(BlobError::BadMemory("guest", 1)) };
            assert_eq!(parsed(&g, &[], &[]), want, "{mib} MiB");
        }
    }

    #[test]
    fn names_workloads_and_args() {
        for good in ["a", "A-z_09", "x-", "_", "n".repeat(32).as_str()] {
            assert!(valid_name(good), "{good:?}");
        }
        for bad in ["", " ", "a b", "a.b", "a/b", "é", "a\n", "a:b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        // Each table's name field: empty, a bad character, junk after the NUL, not UTF-8.
        let spoil: [fn(&mut [u8; 32]); 4] =
            [|n| *n = [0; 32], |n| n[0] = b'.', |n| n[10] = b'x', |n| n[0] = 0xff];
        for s in spoil {
            let mut g = guests(3);
            s(&mut g[2].name);
            assert_eq!(parsed(&g, &[], &[]), Err(BlobError::BadName("guest", 2)));
            let mut c = vec![chan("c0", 0, 1, 1), chan("c1", 1, 2, 1)];
            s(&mut c[1].name);
            assert_eq!(parsed(&guests(3), &c, &[]), Err(BlobError::BadName("channel", 1)));
            let mut r = vec![grant("r0", 0, 2), grant("r1", 1, 2)];
            s(&mut r[1].name);
            assert_eq!(parsed(&guests(3), &[], &r), Err(BlobError::BadName("grant", 1)));
            let mut g = guests(3);
            s(&mut g[1].workload);
            assert_eq!(parsed(&g, &[], &[]), Err(BlobError::BadWorkload(1)));
        }
        // A 32-byte name needs no NUL.
        let mut g = guests(2);
        g[1].name = [b'n'; 32];
        assert_eq!(parsed(&g, &[], &[]), Ok(()));
        // Arguments are free text, but NUL-padded UTF-8.
        let mut g = guests(2);
        g[1].args = fixed::put("n=5 flag=true word=x-y").unwrap();
        assert_eq!(parsed(&g, &[], &[]), Ok(()));
        g[1].args[100] = b'x';
        assert_eq!(parsed(&g, &[], &[]), Err(BlobError::BadArgs(1)));
        g[1].args = [0; 128];
        g[1].args[0] = 0xc3;
        assert_eq!(parsed(&g, &[], &[]), Err(BlobError::BadArgs(1)));
    }

    #[test]
    fn restart_policy_budget_and_control_are_checked() {
        let mut g = guests(3);
        g[1].restart = restart::ALWAYS;
        g[1].max_restarts = MAX_RESTARTS;
        g[1].budget_ms = MAX_BUDGET_MS;
        g[0].controls = 0b110;
        g[2].flags = flags::MWAIT;
        assert_eq!(parsed(&g, &[], &[]), Ok(()));
        for bad in [
            |e: &mut GuestEntry| e.restart = 3,
            |e: &mut GuestEntry| e.max_restarts = MAX_RESTARTS + 1,
            |e: &mut GuestEntry| e.budget_ms = MAX_BUDGET_MS + 1,
            |e: &mut GuestEntry| e.flags = 2,
            |e: &mut GuestEntry| e.flags = 0x80,
        ] {
            let mut g = guests(3);
            bad(&mut g[2]);
            assert_eq!(parsed(&g, &[], &[]), Err(BlobError::BadLifecycle(2)));
        }
        for mask in [0b10u64, 0b1000, 1 << 63] {
            let mut g = guests(3);
            g[1].controls = mask;
            assert_eq!(parsed(&g, &[], &[]), Err(BlobError::BadControl(1)), "{mask:#b}");
        }
        let mut g = guests(64);
        g[63].controls = u64::MAX >> 1;
        assert_eq!(parsed(&g, &[], &[]), Ok(()), "all 63 others");
        // Cycles of control are refused (each guest would wait for the other to let go).
        let mut g = guests(4);
        g[1].controls = 0b100;
        g[2].controls = 0b1000;
        assert_eq!(parsed(&g, &[], &[]), Ok(()), "a chain");
        g[3].controls = 0b10;
        assert_eq!(parsed(&g, &[], &[]), Err(BlobError::ControlCycle(1)));
        g[3].controls = 0b1;
        g[0].controls = 0b1000;
        assert_eq!(control_cycle(&[0b1000, 0b100, 0b1000, 0b1]), Some(0));
        assert_eq!(control_cycle(&[0b10, 0b100, 0b1000, 0]), None);
        assert_eq!(control_cycle(&[]), None);
        // Restartable and controlled guests may have channels (reset between epochs).
        let c = [chan("ab", 0, 1, 4)];
        let mut g = guests(3);
        g[1].restart = restart::ON_FAULT;
        g[2].controls = 0b1;
        assert_eq!(parsed(&g, &c, &[]), Ok(()));
    }

    #[test]
    fn names_and_cores_are_unique() {
        let mut g = guests(3);
        g[2].name = g[0].name;
        assert_eq!(parsed(&g, &[], &[]), Err(BlobError::DuplicateName("guest", 2)));
        let mut g = guests(3);
        g[2].core = 0;
        assert_eq!(parsed(&g, &[], &[]), Err(BlobError::SharedCore(2)));
        let mut g = guests(3);
        g[1].core = 7;
        g[2].core = 7;
        assert_eq!(parsed(&g, &[], &[]), Err(BlobError::SharedCore(2)));
        let c = [chan("x", 0, 1, 1), chan("y", 1, 2, 1), chan("x", 0, 2, 1)];
        assert_eq!(parsed(&guests(3), &c, &[]), Err(BlobError::DuplicateName("channel", 2)));
        let r = [grant("x", 0, 2), grant("y", 1, 2), grant("x", 2, 2)];
        assert_eq!(parsed(&guests(3), &[], &r), Err(BlobError::DuplicateName("grant", 2)));
        // The tables are separate name spaces.
        let (c, r) = ([chan("g0", 0, 1, 1)], [grant("g0", 0, 2)]);
        assert_eq!(parsed(&guests(3), &c, &r), Ok(()));
    }

    #[test]
    fn channel_endpoints_and_slots() {
        let g = guests(3);
        for (a, b, ok) in
            [(0, 2, true), (2, 0, true), (3, 0, false), (0, 3, false), (1, 1, false), (9, 9, false)]
        {
            let c = [chan("ok", 0, 1, 1), chan("c", a, b, 1)];
            let want = if ok { Ok(()) } else { Err(BlobError::BadEndpoint(1)) };
            assert_eq!(parsed(&g, &c, &[]), want, "{a} - {b}");
        }
        assert_eq!(MAX_SLOTS, 4096);
        for (slots, ok) in [
            (0, false),
            (1, true),
            (2, true),
            (3, false),
            (64, true),
            (96, false),
            (4096, true),
            (4095, false),
            (8192, false),
            (1 << 31, false),
        ] {
            let c = [chan("ok", 0, 1, 1), chan("c", 1, 2, slots)];
            let want = if ok { Ok(()) } else { Err(BlobError::BadSlots(1)) };
            assert_eq!(parsed(&g, &c, &[]), want, "{slots} slots");
        }
    }

    #[test]
    fn grant_guests_and_sizes() {
        assert_eq!(MAX_GRANT_MIB, 1024);
        let g = guests(3);
        assert_eq!(parsed(&g, &[], &[grant("ok", 0, 2), grant("r", 2, 2)]), Ok(()));
        assert_eq!(
            parsed(&g, &[], &[grant("ok", 0, 2), grant("r", 3, 2)]),
            Err(BlobError::BadGrantGuest(1))
        );
        for (mib, ok) in [
            (0, false),
            (1, false),
            (2, true),
            (3, false),
            (1022, true),
            (1023, false),
            (1024, true),
            (1025, false),
            (1026, false),
            (u32::MAX, false),
        ] {
            let r = [grant("ok", 0, 2), grant("r", 1, mib)];
            let want = if ok { Ok(()) } else { Err(BlobError::BadMemory("grant", 1)) };
            assert_eq!(parsed(&g, &[], &r), want, "{mib} MiB");
        }
    }

    #[test]
    fn every_entry_reads_back_as_written() {
        let g: Vec<_> = (0..3)
            .map(|i| {
                let args = format!("n={i}");
                guest_entry(&format!("guest{i}"), "spin", &args, 2 - i, 4 + 2 * i).unwrap()
            })
            .collect();
        let c = [chan("c0", 0, 1, 1), chan("c1", 1, 2, 2), chan("c2", 2, 0, 4)];
        let r = [grant("r0", 2, 2), grant("r1", 0, 6)];
        let b = blob(&g, &c, &r);
        let cfg = parse(&b).unwrap();
        assert_eq!(cfg.guest_count(), 3);
        assert_eq!(cfg.header.guest_count, 3);
        assert_eq!(cfg.header.channel_count, 3);
        assert_eq!(cfg.header.grant_count, 2);
        assert_eq!(cfg.header.length as usize, b.len());
        for (i, e) in cfg.guests().enumerate() {
            assert_eq!(e.as_bytes(), g[i].as_bytes());
            assert_eq!(cfg.guest(i).as_bytes(), g[i].as_bytes());
        }
        assert_eq!(cfg.guests().count(), 3);
        for (i, e) in cfg.channels().enumerate() {
            assert_eq!(e.as_bytes(), c[i].as_bytes());
            assert_eq!(cfg.channel(i).as_bytes(), c[i].as_bytes());
        }
        assert_eq!(cfg.channels().count(), 3);
        let got: Vec<_> = cfg.grants().map(|e| e.as_bytes().to_vec()).collect();
        assert_eq!(got, r.iter().map(|e| e.as_bytes().to_vec()).collect::<Vec<_>>());
        // The layout: header, guests, channels, grants, back to back.
        assert_eq!(&b[32..32 + 224], g[0].as_bytes());
        assert_eq!(&b[32 + 3 * 224..32 + 3 * 224 + 48], c[0].as_bytes());
        assert_eq!(&b[b.len() - 48..], r[1].as_bytes());
    }

    #[test]
    fn encode_refuses_a_wrong_buffer_or_counts_past_u16() {
        let (g, c, r) = sample();
        let len = blob_len(2, 1, 1, 0);
        for wrong in [0, len - 1, len + 1] {
            let mut out = vec![0; wrong];
            assert_eq!(encode(&g, &c, &r, &[], &mut out), None, "{wrong} bytes");
        }
        let mut out = vec![0xaa; len];
        assert_eq!(encode(&g, &c, &r, &[], &mut out), Some(()));
        assert_eq!(out, blob(&g, &c, &r), "every byte is written");
        // u16::MAX entries fit the header's counts; one more does not.
        let max = u16::MAX as usize;
        for n in [max, max + 1] {
            let fits = n == max;
            let gs = vec![g[0]; n];
            let mut out = vec![0; blob_len(n, 0, 0, 0)];
            assert_eq!(encode(&gs, &[], &[], &[], &mut out).is_some(), fits, "{n} guests");
            let cs = vec![c[0]; n];
            let mut out = vec![0; blob_len(1, n, 0, 0)];
            assert_eq!(encode(&g[..1], &cs, &[], &[], &mut out).is_some(), fits, "{n} channels");
            let rs = vec![r[0]; n];
            let mut out = vec![0; blob_len(1, 0, n, 0)];
            assert_eq!(encode(&g[..1], &[], &rs, &[], &mut out).is_some(), fits, "{n} grants");
        }
    }

    #[test]
    fn guest_entry_refuses_what_does_not_fit() {
        let e = guest_entry("n", "w", "a=1", 3, 8).unwrap();
        assert_eq!((fixed::get(&e.name), fixed::get(&e.workload)), (Some("n"), Some("w")));
        assert_eq!((fixed::get(&e.args), e.core, e.memory_mib), (Some("a=1"), 3, 8));
        let (n32, n33) = ("n".repeat(32), "n".repeat(33));
        assert!(guest_entry(&n32, &n32, &"a".repeat(128), 0, 4).is_some());
        assert!(guest_entry(&n33, "w", "", 0, 4).is_none());
        assert!(guest_entry("n", &n33, "", 0, 4).is_none());
        assert!(guest_entry("n", "w", &"a".repeat(129), 0, 4).is_none());
    }

    #[test]
    fn errors_say_what_and_where() {
        let cases = [
            (BlobError::TooShort, "shorter than its header"),
            (BlobError::BadMagic, "bad magic"),
            (BlobError::BadVersion(7), "version 7, expected 4"),
            (BlobError::BadLength { header: 9, actual: 8 }, "length field 9 but 8 bytes"),
            (BlobError::BadChecksum { header: 1, computed: 2 }, "0x00000001, computed 0x00000002"),
            (BlobError::TooMany("guests"), "too many guests"),
            (BlobError::NoGuests, "no guests"),
            (BlobError::BadName("channel", 3), "channel 3: bad name"),
            (BlobError::DuplicateName("grant", 4), "grant 4: duplicate name"),
            (BlobError::BadWorkload(5), "guest 5: bad workload"),
            (BlobError::BadArgs(6), "guest 6: bad arguments"),
            (BlobError::BadMemory("grant", 7), "grant 7: memory size"),
            (BlobError::SharedCore(8), "guest 8: core already taken"),
            (BlobError::BadEndpoint(9), "channel 9: endpoint"),
            (BlobError::BadSlots(10), "channel 10: slots must be a power of two in 1..=4096"),
            (BlobError::GuestChannels(11), "guest 11: endpoint of more than 16 channels"),
            (BlobError::BadGrantGuest(12), "grant 12: unknown guest"),
            (BlobError::BadKernel(13), "guest 13: kernel index past the 6 allowed"),
            (BlobError::BadLifecycle(13), "guest 13: restart policy"),
            (BlobError::BadControl(14), "guest 14: controls itself"),
            (BlobError::ControlCycle(15), "guest 15: is in a cycle"),
        ];
        for (e, text) in cases {
            assert!(e.to_string().contains(text), "{e:?}: {e}");
        }
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

    fn with_devices(d: &[DeviceEntry]) -> Result<(), BlobError> {
        let (g, c, r) = sample();
        let mut out = vec![0; blob_len(g.len(), c.len(), r.len(), d.len())];
        encode(&g, &c, &r, d, &mut out).unwrap();
        let cfg = parse(&out)?;
        assert_eq!(cfg.devices().collect::<Vec<_>>(), d);
        Ok(())
    }

    #[test]
    fn device_entries_are_checked() {
        use crate::device::{device_entry, flags as df, parse_selector, Bdf, Selector};
        let sel = |s: &str| parse_selector(s).unwrap();
        let a = device_entry(0, sel("00:03.0"), df::DMA_UNCONFINED);
        let b = device_entry(1, sel("8086:100e"), 0);
        assert_eq!(with_devices(&[a, b]), Ok(()));
        assert_eq!(with_devices(&[a, device_entry(1, sel("8086:100e#1"), 0), b]), Ok(()));
        // Unknown guest, selector kind, flag, out-of-range address, vendor ffff.
        let bad_guest = device_entry(2, sel("00:04.0"), 0);
        let mut bad_select = a;
        bad_select.select = 2;
        let mut bad_flag = a;
        bad_flag.flags = 0x80;
        let mut bad_addr = a;
        bad_addr.device = 32;
        let mut bad_vendor = b;
        bad_vendor.vendor_id = 0xffff;
        for e in [bad_guest, bad_select, bad_flag, bad_addr, bad_vendor] {
            assert_eq!(with_devices(&[b, e]), Err(BlobError::BadDevice(1)), "{e:?}");
        }
        // The same function twice, even for the same guest.
        assert_eq!(with_devices(&[a, b, a]), Err(BlobError::DuplicateDevice(2)));
        let other = device_entry(1, Selector::Address(Bdf::new(0, 3, 0)), 0);
        assert_eq!(with_devices(&[a, other]), Err(BlobError::DuplicateDevice(1)));
        // Four per guest, not five; sixteen in all.
        let mine = |n: u8| device_entry(0, Selector::Address(Bdf::new(0, n, 0)), 0);
        let four: Vec<_> = (1..=4).map(mine).collect();
        assert_eq!(with_devices(&four), Ok(()));
        let five: Vec<_> = (1..=5).map(mine).collect();
        assert_eq!(with_devices(&five), Err(BlobError::GuestDevices(0)));
        let many: Vec<_> = (0..17)
            .map(|n| device_entry(n % 2, Selector::Id { vendor: 1, device: 1, nth: n as u8 }, 0))
            .collect();
        assert_eq!(with_devices(&many), Err(BlobError::TooMany("devices")));
    }
}
