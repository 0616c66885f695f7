// SPDX-License-Identifier: MIT OR Apache-2.0
//! How a guest starts: its guest-physical memory layout and the boot-info structure the
//! hypervisor writes for it.
//!
//! Guest-physical layout of every partition (the partition maps guest-physical 0 up to its
//! size; nothing else is mapped):
//!
//! | address | what |
//! |---|---|
//! | `0x0000..0x1000` | unused (left unmapped by the boot page tables: null page) |
//! | [`BOOT_INFO_GPA`] | [`BootInfo`] |
//! | [`BOOT_PML4_GPA`].. | boot page tables: PML4, PDPT, PD identity-mapping the partition with 2-MiB pages (the first 2 MiB with 4-KiB pages, page 0 absent) |
//! | ..[`BOOT_STACK_TOP`] | initial stack |
//! | [`KERNEL_BASE`].. | the guest kernel ELF's segments |
//!
//! The vCPU starts in 64-bit mode, CPL 0, interrupts off, at the ELF entry point, with
//! RDI = [`BOOT_INFO_GPA`] and RSP = [`BOOT_STACK_TOP`]. Segment registers hold flat
//! descriptors but the GDTR and IDTR are empty: the guest installs its own.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const BOOT_INFO_GPA: u64 = 0x1000;
pub const BOOT_PML4_GPA: u64 = 0x2000;
pub const BOOT_PDPT_GPA: u64 = 0x3000;
pub const BOOT_PD_GPA: u64 = 0x4000;
/// Page table for the first 2 MiB (4-KiB pages, so page 0 can stay unmapped).
pub const BOOT_PT_GPA: u64 = 0x5000;
/// First byte past the boot structures.
pub const BOOT_AREA_END: u64 = 0x6000;
pub const BOOT_STACK_TOP: u64 = 0x8_0000;
/// Where the guest kernel is linked.
pub const KERNEL_BASE: u64 = 0x10_0000;
/// Smallest partition: kernel, stack and some room.
pub const MIN_PARTITION: u64 = 4 << 20;
/// Largest partition the boot page tables cover (one PD).
pub const MAX_PARTITION: u64 = 1 << 30;

/// Guest-physical base of the channel windows. Channel `k` of the config (global index)
/// has its window at `CHANNEL_WINDOW_GPA + k * CHANNEL_STRIDE` in both of its guests and is
/// mapped nowhere else: a guest touching another pair's window hits unmapped EPT.
pub const CHANNEL_WINDOW_GPA: u64 = 0x8000_0000;
/// Distance between channel windows (a channel of 4096 slots needs 2 x 260 KiB).
pub const CHANNEL_STRIDE: u64 = 1 << 20;
/// Interrupt vector of a channel doorbell, delivered through the guest's own IDT.
pub const DOORBELL_VECTOR: u8 = 0xf0;

/// The window of channel `index`.
pub const fn channel_window(index: u32) -> u64 {
    CHANNEL_WINDOW_GPA + index as u64 * CHANNEL_STRIDE
}

/// Workloads the guest kernel implements (its registry); configs may name only these.
pub const WORKLOADS: &[&str] = &[
    "hello", "spin", "fault", "ping", "pong", "stream", "sink", "relay", "scribble", "trespass",
    "pool", "giver", "taker", "racer", "capowner", "holder", "doomed", "revoker", "splitter",
    "passer", "far", "flooder", "quiet", "attack",
];

pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"MKVBOOT\0");
pub const BOOT_INFO_VERSION: u32 = 1;
/// Channel slots in [`BootInfo`]; the channels layer fills them.
pub const MAX_CHANNELS_PER_GUEST: usize = 16;

/// One channel this guest is an endpoint of (filled by the channels layer).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ChannelDesc {
    pub name: [u8; 32],
    /// Guest id of the other endpoint.
    pub peer: u32,
    /// Slots per direction.
    pub slots: u32,
    /// Guest-physical address of the ring this guest sends on.
    pub tx_gpa: u64,
    /// Guest-physical address of the ring this guest receives on.
    pub rx_gpa: u64,
    /// The channel's index in the config (its window is `channel_window(index)`).
    pub index: u32,
    pub _reserved: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<ChannelDesc>() == 64);

/// What the hypervisor tells a guest at start, at [`BOOT_INFO_GPA`].
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BootInfo {
    pub magic: u64,
    pub version: u32,
    pub guest_id: u32,
    /// Physical core (hypervisor core index) this guest is pinned to.
    pub core: u32,
    pub channel_count: u32,
    pub memory_bytes: u64,
    /// TSC ticks per millisecond, as calibrated by the hypervisor.
    pub tsc_per_ms: u64,
    pub name: [u8; 32],
    pub workload: [u8; 32],
    /// Workload arguments, `key=value` words separated by spaces, NUL-padded.
    pub args: [u8; 128],
    pub channels: [ChannelDesc; MAX_CHANNELS_PER_GUEST],
}
const _: () = assert!(core::mem::size_of::<BootInfo>() == 232 + 64 * MAX_CHANNELS_PER_GUEST);
const _: () = assert!(core::mem::size_of::<BootInfo>() as u64 <= BOOT_PML4_GPA - BOOT_INFO_GPA);

impl BootInfo {
    pub fn name(&self) -> &str {
        crate::fixed::get(&self.name).unwrap_or("?")
    }
    pub fn workload(&self) -> &str {
        crate::fixed::get(&self.workload).unwrap_or("")
    }
    pub fn args(&self) -> &str {
        crate::fixed::get(&self.args).unwrap_or("")
    }
    /// The value of `key=value` in the arguments.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args().split_ascii_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }
    /// The numeric value of `key=value` in the arguments, or `default`.
    pub fn arg_u64(&self, key: &str, default: u64) -> u64 {
        self.arg(key).and_then(|v| v.parse().ok()).unwrap_or(default)
    }
    /// The channels of this guest.
    pub fn channels(&self) -> &[ChannelDesc] {
        &self.channels[..(self.channel_count as usize).min(MAX_CHANNELS_PER_GUEST)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    #[test]
    fn args_lookup() {
        let mut b = BootInfo::new_zeroed();
        b.args = crate::fixed::put("n=10 mode=fast nn=3").unwrap();
        assert_eq!(b.arg("n"), Some("10"));
        assert_eq!(b.arg("mode"), Some("fast"));
        assert_eq!(b.arg("nn"), Some("3"));
        assert_eq!(b.arg("x"), None);
        assert_eq!((b.arg_u64("n", 7), b.arg_u64("mode", 7), b.arg_u64("x", 7)), (10, 7, 7));
    }

    #[test]
    fn layout_constants_are_ordered() {
        const {
            assert!(BOOT_INFO_GPA < BOOT_PML4_GPA);
            assert!(BOOT_PT_GPA < BOOT_AREA_END);
            assert!(BOOT_AREA_END <= BOOT_STACK_TOP - 0x8000);
            assert!(BOOT_STACK_TOP <= KERNEL_BASE);
        }
    }
}
