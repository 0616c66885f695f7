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

use crate::device::{DeviceDesc, MAX_DEVICES_PER_GUEST};
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
// The device window (where an owner's memory BARs appear) lies past the largest partition
// and below the channel windows.
const _: () = assert!(crate::device::DEVICE_WINDOW.0 >= MAX_PARTITION);
const _: () = assert!(crate::device::DEVICE_WINDOW.1 <= CHANNEL_WINDOW_GPA);
/// Distance between channel windows (a channel of 4096 slots needs 2 x 260 KiB).
pub const CHANNEL_STRIDE: u64 = 1 << 20;
/// Interrupt vector of a channel doorbell, delivered through the guest's own IDT.
pub const DOORBELL_VECTOR: u8 = 0xf0;

/// Guest-physical address of the guest's status page ([`StatusPage`]): mapped read-only,
/// written only by the hypervisor, the last page of the GiB of channel windows (which the
/// guest's own page tables map anyway).
pub const STATUS_GPA: u64 = 0xbfff_f000;

/// Guest-physical base of the **target windows**: a guest holding guest-control
/// capabilities (the config's `[[control]]`) sees the status page of its `i`-th target
/// (the `i`-th guest-control capability of its space, targets in config order of guests)
/// read-only at [`target_status`]`(i)`, with no VM exit to read it. The window stays valid
/// across the target's restarts (its status page is one fixed frame for the whole run) and
/// shows nothing else of the target. Windows of targets it does not have are not mapped:
/// a guest without control capabilities has nothing here.
pub const TARGET_STATUS_GPA: u64 = 0xbff0_0000;
/// Target windows a guest can have (one per guest of a config).
pub const MAX_TARGET_WINDOWS: usize = crate::limits::MAX_GUESTS;

/// The window of target `i` (see [`TARGET_STATUS_GPA`]).
pub const fn target_status(i: u32) -> u64 {
    TARGET_STATUS_GPA + i as u64 * 4096
}

// The target windows lie between the last channel window and the status page.
const _: () = assert!(
    CHANNEL_WINDOW_GPA + crate::limits::MAX_CHANNELS as u64 * CHANNEL_STRIDE <= TARGET_STATUS_GPA
);
const _: () = assert!(TARGET_STATUS_GPA + MAX_TARGET_WINDOWS as u64 * 4096 <= STATUS_GPA);

/// What the hypervisor tells a running guest without an exit: the state of each of its
/// channels (boot-info order). A channel whose peer died is `down`; when the peer's new
/// incarnation is up the channel is `up` again in a new epoch, on reset rings (see
/// `channel` on epochs).
///
/// The page is one fixed frame per guest for the whole run; it is zeroed when an
/// incarnation starts (its counters are that incarnation's) and brought up to date once
/// more when it ends (a page of a guest that is down shows its last incarnation as it
/// ended). Each word is written whole (aligned 8-byte stores); words are not updated
/// together, so a reader on another core (a controller through its target window) may see
/// one entry's counters half-updated, each word exact or one step old.
#[repr(C)]
pub struct StatusPage {
    pub links: [LinkStatus; MAX_CHANNELS_PER_GUEST],
    /// Exit-free telemetry, kept by the hypervisor before every VM entry: the guest reads
    /// its own counters with plain loads (this incarnation's).
    pub telemetry: Telemetry,
    /// Which incarnation the page describes (1, 2, ... as `BootInfo::incarnation`).
    pub incarnation: u64,
    /// TSC when [`StatusPage::traffic`] was last copied from the rings (0: not yet).
    pub traffic_tsc: u64,
    /// Messages per channel (boot-info order), copied from the guest-written ring counters
    /// at most once per millisecond of TSC (see [`ChannelTraffic`]).
    pub traffic: [ChannelTraffic; MAX_CHANNELS_PER_GUEST],
    pub _reserved:
        [u64; 512 - 4 * MAX_CHANNELS_PER_GUEST - TELEMETRY_WORDS - 2 - 4 * MAX_CHANNELS_PER_GUEST],
}

/// Exit reasons the telemetry counts one by one (basic exit reasons 0..=69); the rest are
/// counted together in [`Telemetry::exits_other`].
pub const TELEMETRY_REASONS: usize = 70;
const TELEMETRY_WORDS: usize = TELEMETRY_REASONS + 6;

/// The names of [`Telemetry::exits`]' entries, as reports and records give them: the VMX
/// basic exit reasons 0..=69 (SDM Vol. 3D appendix C), the numbering the hypervisor counts
/// exits by whatever its CPU backend (`vcpu::EXIT_NAMES` in the hypervisor).
pub const EXIT_NAMES: [&str; TELEMETRY_REASONS] = [
    "exception_nmi",
    "external_interrupt",
    "triple_fault",
    "init",
    "sipi",
    "io_smi",
    "other_smi",
    "interrupt_window",
    "nmi_window",
    "task_switch",
    "cpuid",
    "getsec",
    "hlt",
    "invd",
    "invlpg",
    "rdpmc",
    "rdtsc",
    "rsm",
    "vmcall",
    "vmclear",
    "vmlaunch",
    "vmptrld",
    "vmptrst",
    "vmread",
    "vmresume",
    "vmwrite",
    "vmxoff",
    "vmxon",
    "cr_access",
    "dr_access",
    "io",
    "rdmsr",
    "wrmsr",
    "entry_fail_guest_state",
    "entry_fail_msr_load",
    "reason_35",
    "mwait",
    "monitor_trap",
    "reason_38",
    "monitor",
    "pause",
    "entry_fail_machine_check",
    "reason_42",
    "tpr_below",
    "apic_access",
    "virtualized_eoi",
    "gdtr_idtr",
    "ldtr_tr",
    "ept_violation",
    "ept_misconfig",
    "invept",
    "rdtscp",
    "preemption_timer",
    "invvpid",
    "wbinvd",
    "xsetbv",
    "apic_write",
    "rdrand",
    "invpcid",
    "vmfunc",
    "encls",
    "rdseed",
    "pml_full",
    "xsaves",
    "xrstors",
    "reason_65",
    "spp",
    "umwait",
    "tpause",
    "loadiwkey",
];

/// The guest's counters in its [`StatusPage`].
#[repr(C)]
pub struct Telemetry {
    /// VM exits by basic exit reason (SDM Vol. 3C Appendix C). `exits[0]` counts NMI exits
    /// only: the exception bitmap is empty, so no exception exits.
    pub exits: [u64; TELEMETRY_REASONS],
    pub exits_other: u64,
    pub hypercalls: u64,
    /// Doorbells this guest rang.
    pub doorbells: u64,
    /// VM entries so far.
    pub entries: u64,
    /// TSC ticks spent in the hypervisor on this guest's exits (exit to the next entry).
    pub hypervisor_tsc: u64,
    /// NMIs its core took during this incarnation: the inter-core kicks (other cores'
    /// capability, control, link and membership messages), whether they interrupted the
    /// guest (a VM exit, also in `exits[0]`) or reached the hypervisor while it ran.
    /// Brought up to date before every VM entry.
    pub nmis: u64,
}
const _: () = assert!(core::mem::size_of::<Telemetry>() == 8 * TELEMETRY_WORDS);
const _: () = assert!(core::mem::size_of::<StatusPage>() == 4096);
const _: () = assert!(core::mem::offset_of!(StatusPage, telemetry) == STATUS_TELEMETRY_OFFSET);
const _: () = assert!(core::mem::offset_of!(StatusPage, incarnation) == STATUS_INCARNATION_OFFSET);
const _: () = assert!(core::mem::offset_of!(StatusPage, traffic_tsc) == STATUS_TRAFFIC_TSC_OFFSET);
const _: () = assert!(core::mem::offset_of!(StatusPage, traffic) == STATUS_TRAFFIC_OFFSET);

/// Byte offset of [`StatusPage::telemetry`] (a [`Telemetry`]) in the status page.
pub const STATUS_TELEMETRY_OFFSET: usize = 512;
/// Byte offset of [`StatusPage::incarnation`].
pub const STATUS_INCARNATION_OFFSET: usize = 1120;
/// Byte offset of [`StatusPage::traffic_tsc`].
pub const STATUS_TRAFFIC_TSC_OFFSET: usize = 1128;
/// Byte offset of [`StatusPage::traffic`] (an array of [`ChannelTraffic`]).
pub const STATUS_TRAFFIC_OFFSET: usize = 1136;

/// How often, at most, the hypervisor copies the ring counters into
/// [`StatusPage::traffic`]: at the first VM entry at least this many milliseconds of TSC
/// after the last copy, when the channels' links change, and when an incarnation ends.
/// Staleness: `traffic` is at most this long plus the time from there to the guest's next
/// VM exit behind the rings ([`StatusPage::traffic_tsc`] says exactly when it was taken).
pub const TRAFFIC_REFRESH_MS: u64 = 1;

/// One channel's message counts in the [`StatusPage`], copied from its rings' counters
/// in this epoch (a ring reset starts them at 0 again). The counters are written by the
/// guests, not by the hypervisor: these are what the guests said (reporting only), read
/// with bounded loads of the channel's own rings.
#[repr(C)]
pub struct ChannelTraffic {
    /// Messages this guest sent on the channel (its sending ring's `sent`).
    pub sent: u64,
    /// Messages this guest received (its receiving ring's published `received`).
    pub received: u64,
    /// Messages the peer sent to this guest (its receiving ring's `sent`): `inbound -
    /// received` were waiting for it.
    pub inbound: u64,
    pub _reserved: u64,
}
const _: () = assert!(core::mem::size_of::<ChannelTraffic>() == 32);

/// One channel's state in the [`StatusPage`].
#[repr(C)]
pub struct LinkStatus {
    /// `epoch << 1 | up` (see [`link_word`]).
    pub word: u64,
    /// Messages in flight (sent, not received, both directions) when the rings were last
    /// reset: lost because of the restart, as the ring counters said (guest-written).
    pub lost: u64,
    /// How many resets this channel has been through.
    pub resets: u64,
    pub _reserved: u64,
}
const _: () = assert!(core::mem::size_of::<LinkStatus>() == 32);

/// A link word: the epoch the rings are in, and whether the peer is up.
pub const fn link_word(up: bool, epoch: u32) -> u64 {
    (epoch as u64) << 1 | up as u64
}
/// The epoch of a link word.
pub const fn link_epoch(word: u64) -> u32 {
    (word >> 1) as u32
}
/// Whether a link word says the peer is up.
pub const fn link_up(word: u64) -> bool {
    word & 1 != 0
}

/// The window of channel `index`.
pub const fn channel_window(index: u32) -> u64 {
    CHANNEL_WINDOW_GPA + index as u64 * CHANNEL_STRIDE
}

/// Workloads the guest kernel implements (its registry); configs may name only these.
pub const WORKLOADS: &[&str] = &[
    "hello",
    "spin",
    "fault",
    "ping",
    "pong",
    "stream",
    "sink",
    "relay",
    "scribble",
    "trespass",
    "pool",
    "giver",
    "taker",
    "racer",
    "capowner",
    "holder",
    "doomed",
    "revoker",
    "splitter",
    "passer",
    "far",
    "flooder",
    "quiet",
    "attack",
    "phoenix",
    "supervisor",
    "streamer",
    "echoer",
    "ghost",
    "lifebench",
    "looper",
    "forwarder",
    "exitbench",
    "meter",
    "nic",
    "pciattack",
    "bigmap",
    "tcpecho",
    "kvfront",
    "kvworker",
    "impatient",
    "laggard",
];

/// What values a workload argument takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// A whole number in `min..=max`.
    Int { min: u64, max: u64 },
    /// One of these words.
    Word(&'static [&'static str]),
    /// The name of one of the guest's own channels.
    Channel,
}

/// What a guest gets when its config leaves an argument out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgDefault {
    /// The config must give it.
    Required,
    Int(u64),
    Word(&'static str),
    /// The guest's first channel (the config must give the guest at least one).
    FirstChannel,
}

/// One argument a workload reads from its `args`.
#[derive(Clone, Copy, Debug)]
pub struct ArgSpec {
    pub key: &'static str,
    pub kind: ArgKind,
    pub default: ArgDefault,
    pub meaning: &'static str,
}

/// A workload: its name (as in [`WORKLOADS`], same order), what it does, every argument
/// its code reads.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadSpec {
    pub name: &'static str,
    pub summary: &'static str,
    pub args: &'static [ArgSpec],
}

impl WorkloadSpec {
    pub fn arg(&self, key: &str) -> Option<&'static ArgSpec> {
        self.args.iter().find(|a| a.key == key)
    }
}

/// The spec of workload `name`.
pub fn workload_spec(name: &str) -> Option<&'static WorkloadSpec> {
    WORKLOAD_SPECS.iter().find(|w| w.name == name)
}

const fn int(
    key: &'static str,
    min: u64,
    max: u64,
    default: u64,
    meaning: &'static str,
) -> ArgSpec {
    ArgSpec { key, kind: ArgKind::Int { min, max }, default: ArgDefault::Int(default), meaning }
}
const fn flag(key: &'static str, meaning: &'static str) -> ArgSpec {
    int(key, 0, 1, 0, meaning)
}
const fn channel(key: &'static str, default: ArgDefault, meaning: &'static str) -> ArgSpec {
    ArgSpec { key, kind: ArgKind::Channel, default, meaning }
}

const MODE: ArgSpec = ArgSpec {
    key: "mode",
    kind: ArgKind::Word(&["poll", "doorbell", "mwait"]),
    default: ArgDefault::Word("poll"),
    meaning: "`poll` the ring, sleep until the peer rings the doorbell, or sleep in MWAIT on \
              the line the next message lands in (no doorbell, no VM exit; needs `mwait = true` \
              for the guest, else the doorbell)",
};
const POLLS: ArgSpec =
    int("polls", 0, u32::MAX as u64, 0, "in doorbell and mwait modes, polls before sleeping");
const CHANNEL: ArgSpec = channel("channel", ArgDefault::FirstChannel, "the channel to use");
const RAW: ArgSpec = flag(
    "raw",
    "1: a bare ring over the same memory instead of the channel library (no link word, no \
     epochs, no checks; polling only): the baseline `bench channels` compares the library with",
);
const DEAF: ArgSpec =
    flag("deaf", "1: the run injects a silent core (the revoke must time out, not hang)");
/// Channel indexes a config can have.
const CHANNEL_INDEX: u64 = crate::limits::MAX_CHANNELS as u64 - 1;

/// The attacks of workload `attack` (`which=`), in the order the guest kernel's table has
/// them; `all` runs the batch ones, `fence` serves the capability attacks.
pub const ATTACK_NAMES: &[&str] = &[
    "msr-apic-base-read",
    "msr-apic-base-write",
    "msr-feature-control-read",
    "msr-feature-control-write",
    "msr-vmx-basic-read",
    "msr-vmx-ept-vpid-cap-read",
    "msr-vmx-true-procbased-read",
    "msr-vmx-basic-write",
    "msr-sysenter-cs-read",
    "msr-sysenter-esp-write",
    "msr-sysenter-eip-write",
    "msr-mtrr-cap-read",
    "msr-mtrr-def-type-write",
    "msr-mtrr-physbase0-write",
    "msr-misc-enable-read",
    "msr-debugctl-write",
    "msr-smm-monitor-ctl-write",
    "msr-tsc-write",
    "msr-tsc-adjust-write",
    "msr-x2apic-id-read",
    "msr-x2apic-tpr-write",
    "msr-x2apic-icr-init",
    "msr-x2apic-icr-sipi",
    "msr-x2apic-icr-nmi",
    "msr-x2apic-self-ipi",
    "msr-random-read",
    "msr-hyperv-guest-os-id-write",
    "msr-amd-vm-cr-read",
    "msr-x2apic-eoi-read",
    "msr-tsc-deadline-write",
    "msr-spec-ctrl-write",
    "msr-xss-write",
    "msr-kernel-gs-base-noncanonical",
    "msr-lstar-noncanonical",
    "msr-efer-clear-lme",
    "msr-efer-clear-lma",
    "msr-efer-set-svme",
    "msr-efer-set-reserved",
    "msr-pat-type-2",
    "msr-pat-type-3",
    "msr-pat-type-8",
    "msr-pat-type-ff",
    "msr-fs-base-noncanonical",
    "msr-gs-base-noncanonical",
    "io-com1-out",
    "io-com1-in",
    "io-pic-eoi",
    "io-pic-mask",
    "io-pit-mode",
    "io-pit-read",
    "io-pci-config-address",
    "io-pci-config-data",
    "io-keyboard-reset",
    "io-reset-control",
    "io-fast-a20-reset",
    "io-apm-smi",
    "io-qemu-debug-exit",
    "io-bochs-shutdown",
    "io-e9-word",
    "io-e9-dword",
    "io-e9-rep-outsb",
    "io-e9-in",
    "io-80-in",
    "cr0-clear-pe",
    "cr0-clear-pg",
    "cr0-clear-ne",
    "cr0-set-cd",
    "cr0-set-nw",
    "cr0-set-cd-nw",
    "cr0-set-reserved-bit-32",
    "cr4-set-reserved-bit-63",
    "cr4-set-vmxe",
    "cr4-clear-pae",
    "cr8-reserved",
    "vmxon",
    "vmxoff",
    "vmlaunch",
    "vmresume",
    "vmread",
    "vmwrite",
    "vmptrld",
    "vmptrst",
    "vmclear",
    "invept",
    "invvpid",
    "vmfunc",
    "monitor",
    "mwait",
    "getsec",
    "svm-vmrun",
    "svm-vmload",
    "svm-vmsave",
    "svm-stgi",
    "svm-clgi",
    "svm-skinit",
    "svm-invlpga",
    "vmcall-from-ring3",
    "vmcall-single-stepped",
    "xsetbv-xcr1",
    "xsetbv-xcr0-avx",
    "xsetbv-xcr0-zero",
    "xsetbv-xcr0-reserved",
    "wbinvd",
    "invd",
    "hc-unknown-16",
    "hc-unknown-max",
    "hc-unknown-2pow32",
    "hc-unknown-exit-high-bit",
    "hc-console-past-end",
    "hc-console-straddle-end",
    "hc-console-wrap",
    "hc-console-too-long",
    "hc-console-len-max",
    "hc-console-channel-window",
    "hc-console-grant-window",
    "hc-console-lapic",
    "hc-timer-vector-31",
    "hc-timer-vector-nmi",
    "hc-timer-vector-256",
    "hc-timer-vector-max",
    "hc-doorbell-channel-not-mine",
    "hc-doorbell-channel-16",
    "hc-doorbell-channel-max",
    "cap-identify-slot-64",
    "cap-identify-slot-2pow40",
    "cap-identify-slot-max",
    "cap-map-slot-64",
    "cap-map-slot-max",
    "cap-unmap-slot-2pow40",
    "cap-split-slot-max",
    "cap-revoke-slot-64",
    "cap-transfer-slot-max",
    "cap-map-readonly-copy-writable",
    "cap-map-write-only",
    "cap-map-no-rights",
    "cap-map-grant-right",
    "cap-map-unknown-right",
    "cap-map-rights-above-byte",
    "cap-map-over-kernel",
    "cap-map-over-channel-window",
    "cap-map-below-window",
    "cap-map-across-4gib",
    "cap-map-above-4gib",
    "cap-map-wrapping",
    "cap-map-over-own-mapping",
    "cap-map-overlapping-own-mapping",
    "cap-map-misaligned",
    "cap-unmap-not-mapped",
    "cap-split-endpoint",
    "cap-split-misaligned",
    "cap-transfer-through-memory-cap",
    "cap-copy-more-rights",
    "cap-move-without-grant",
    "cap-transfer-bad-mode",
    "console-c0",
    "console-ansi",
    "console-c1",
    "console-bidi",
    "console-invalid-utf8",
    "console-e9-escape",
    "console-e9-bidi",
    "console-split-bidi",
    "console-split-c1",
    "console-overlong-escape",
    "console-format-controls",
    "console-truncated-at-newline",
    "control-through-memory-cap",
    "control-slot-64",
    "control-stale-generation",
    "status-page-read",
    "hc-storm",
    "read-past-end",
    "status-page-write",
    "write-past-end",
    "exec-past-end",
    "rep-stos-across-end",
    "read-4gib",
    "read-top-of-physical",
    "lapic-icr-init",
    "ioapic-write",
    "foreign-channel",
    "write-readonly-cap",
    "exec-channel-window",
    "triple-fault",
    "halt-forever",
    "halt-timer-masked",
    "spin-forever",
    "mwait-forever",
    "doorbell-flood",
];

const WHICH: &[&str] = &{
    let mut out = [""; ATTACK_NAMES.len() + 2];
    out[0] = "all";
    out[1] = "fence";
    let mut i = 0;
    while i < ATTACK_NAMES.len() {
        out[i + 2] = ATTACK_NAMES[i];
        i += 1;
    }
    out
};

/// Every workload's arguments. `cargo xtask` checks configs against it and generates the
/// README's workload list from it; the guest kernel reads defaults from it
/// ([`BootInfo::arg_int`], [`BootInfo::arg_word`]).
pub const WORKLOAD_SPECS: &[WorkloadSpec] = &[
    WorkloadSpec {
        name: "hello",
        summary: "prints its identity, checks what the hypervisor shows it (boot info against \
                  the guest-info hypercall, CPUID, bad hypercalls refused), computes \
                  `sum(1..=n)` two ways; exits 0 if all agree",
        args: &[int("n", 0, 1_000_000_000, 100, "the sum's upper bound")],
    },
    WorkloadSpec {
        name: "spin",
        summary: "takes 1-ms virtual-timer interrupts until `ms` are used, exits 0",
        args: &[int("ms", 1, 3_600_000, 10, "milliseconds of timer ticks to take")],
    },
    WorkloadSpec {
        name: "fault",
        summary: "reads 2 MiB past the end of its partition; must be stopped there",
        args: &[],
    },
    WorkloadSpec {
        name: "ping",
        summary: "sends `n` messages on its channel, waits for each reply, prints round-trip \
                  figures (polling: `n` with `Chan::call`, then `n` more with send and receive)",
        args: &[CHANNEL, int("n", 1, 100_000_000, 1000, "messages"), MODE, POLLS, RAW],
    },
    WorkloadSpec {
        name: "pong",
        summary: "answers `n` messages of a `ping` (polling: its `2n`, the first `n` with \
                  `Chan::serve`)",
        args: &[CHANNEL, int("n", 1, 100_000_000, 1000, "messages"), MODE, POLLS, RAW],
    },
    WorkloadSpec {
        name: "stream",
        summary: "sends `n` messages as fast as the ring takes them",
        args: &[CHANNEL, int("n", 1, 100_000_000, 10_000, "messages"), MODE, RAW],
    },
    WorkloadSpec {
        name: "sink",
        summary: "receives `n` messages of a `stream`, counts lost, duplicated and damaged ones",
        args: &[CHANNEL, int("n", 1, 100_000_000, 10_000, "messages"), MODE, POLLS, RAW],
    },
    WorkloadSpec {
        name: "relay",
        summary: "one guest of a ring: originates `n` messages on `to`, forwards the others' \
                  from `from` to `to`, checks its own come back in order",
        args: &[
            channel("to", ArgDefault::Required, "the channel to the next guest of the ring"),
            channel("from", ArgDefault::Required, "the channel from the previous guest"),
            int("n", 1, 100_000_000, 1000, "messages this guest originates"),
            int("guests", 2, 64, 4, "guests in the ring"),
            int("window", 1, 4096, 16, "own messages in flight at most"),
            MODE,
        ],
    },
    WorkloadSpec {
        name: "scribble",
        summary: "sends three messages, then overwrites a control word of its ring (the peer \
                  must detect it)",
        args: &[CHANNEL, MODE],
    },
    WorkloadSpec {
        name: "trespass",
        summary: "reads the window of another pair's channel; must be stopped there",
        args: &[int("window", 0, CHANNEL_INDEX, 0, "index of the channel whose window to read")],
    },
    WorkloadSpec {
        name: "pool",
        summary: "uses its granted memory capability (identify, split, map, unmap) and \
                  checks every answer and refusal",
        args: &[flag("touch_after_unmap", "1: touch a grant after unmapping it (must be stopped)")],
    },
    WorkloadSpec {
        name: "giver",
        summary: "splits its grant, moves one half and copies the other read-only to its \
                  `taker`s over channels `ab` and `ac`, then revokes",
        args: &[],
    },
    WorkloadSpec {
        name: "taker",
        summary: "maps what a `giver` sends, verifies it, must be stopped after the revoke",
        args: &[],
    },
    WorkloadSpec {
        name: "racer",
        summary: "copies its grant to its peer and revokes at the same moment as the peer",
        args: &[],
    },
    WorkloadSpec {
        name: "capowner",
        summary: "benchmark: costs of map, unmap, copy to each holder, revoke and move",
        args: &[],
    },
    WorkloadSpec {
        name: "holder",
        summary: "benchmark: maps the copy it is given (copies it on over its other channels, if any) and keeps running until told to stop",
        args: &[],
    },
    WorkloadSpec {
        name: "doomed",
        summary: "takes and verifies a copy, then is stopped holding it",
        args: &[],
    },
    WorkloadSpec {
        name: "revoker",
        summary: "copies its grant to a `splitter` (`os`) and a `passer` (`op`), revokes \
                  all of it",
        args: &[DEAF],
    },
    WorkloadSpec {
        name: "splitter",
        summary: "splits its read-only copy in three and maps the pieces",
        args: &[DEAF],
    },
    WorkloadSpec {
        name: "passer",
        summary: "tries to move its copy on (refused), copies it to `far` over `pf`",
        args: &[],
    },
    WorkloadSpec { name: "far", summary: "holds a copy of a copy", args: &[] },
    WorkloadSpec {
        name: "flooder",
        summary: "fires `n` copies at a `quiet` guest, then fills and revokes its slots",
        args: &[int("n", 1, 1_000_000, 2000, "requests")],
    },
    WorkloadSpec {
        name: "quiet",
        summary: "accepts nothing at first; its space and budget must stay untouched",
        args: &[],
    },
    WorkloadSpec {
        name: "attack",
        summary: "runs attacks on the hypervisor, one (`which=NAME`) or the batch \
                  (`which=all`); each must end as the policy says",
        args: &[
            ArgSpec {
                key: "which",
                kind: ArgKind::Word(WHICH),
                default: ArgDefault::Word("all"),
                meaning: "`all`, `fence` (serve the capability attacks) or one attack's name",
            },
            int("window", 0, CHANNEL_INDEX, 0, "`foreign-channel`: the channel index to read"),
            int("n", 1, 1_000_000, 100, "`doorbell-flood`: messages"),
            int("rings", 0, 1_000_000, 50, "`doorbell-flood`: doorbells per message"),
        ],
    },
    WorkloadSpec {
        name: "phoenix",
        summary: "checks that nothing of an earlier incarnation is left (a mark in its last \
                  page and in its first grant, mapped), leaves its own mark, then faults on \
                  purpose (reads past its partition) until incarnation `live_at`, where it \
                  exits 0 if every check held",
        args: &[int("live_at", 1, 1001, 4, "the incarnation that exits instead of faulting")],
    },
    WorkloadSpec {
        name: "supervisor",
        summary: "runs the guests it controls (`[[control]]`): waits while one runs, restarts \
                  one the hypervisor stopped (at most `tries` times), is done when it exited; \
                  exits 0 if each exited 0. With `hold = 1` it first stops its last guest, \
                  checks it is held, starts it again; with `restart = 1` it restarts that \
                  guest while it runs (a new incarnation); with `park = 1` it takes that \
                  guest's core out of the machine, checks it is parked, and brings it back \
                  after `parked_ms`; `after_ms` after the guest first runs (the chaos \
                  campaign draws it)",
        args: &[
            int("tries", 0, 1000, 10, "restarts it asks for, per guest"),
            flag("hold", "stop and start the last guest first"),
            flag("restart", "restart the last guest while it runs"),
            flag("park", "take the last guest's core out and bring it back"),
            int("parked_ms", 1, 60_000, 50, "how long the core stays out"),
            int("after_ms", 0, 60_000, 0, "how long the last guest runs before the first of these"),
        ],
    },
    WorkloadSpec {
        name: "streamer",
        summary: "sends `n` numbered messages one at a time, each echoed by its peer; when the \
                  peer dies it counts the message lost, waits for the new incarnation, \
                  resynchronises and goes on; exits 0 if every message was echoed once, in \
                  order, or counted lost",
        args: &[
            int("n", 1, 1_000_000, 100, "messages to send"),
            flag("gone_ok", "a peer that never comes back ends the stream (exit 0)"),
            int("rejoin_ms", 1, 60_000, 5_000, "how long to wait for the peer to come back"),
        ],
    },
    WorkloadSpec {
        name: "echoer",
        summary: "echoes every message back on its first channel; its first incarnation \
                  faults on purpose after `die_after` echoes; exits 0 at the end marker",
        args: &[int("die_after", 0, 1_000_000, 30, "echoes before the first incarnation dies")],
    },
    WorkloadSpec {
        name: "ghost",
        summary: "reports register state an earlier incarnation (or the firmware) left on its \
                  core (pass-through MSRs, CR2, DR0/DR1, XMM0), leaves its own, faults until \
                  incarnation `live_at`, which exits 0 only if nothing was found",
        args: &[int("live_at", 1, 1001, 2, "the incarnation that exits instead of faulting")],
    },
    WorkloadSpec {
        name: "lifebench",
        summary: "stops and starts the guest it controls at the other end of its channel, \
                  `rounds` times, timing the stop until its channel says the peer is gone \
                  and the start until the channel is up again (`cargo xtask bench \
                  lifecycle`); exits 0 if every round worked and the peer echoes at the end",
        args: &[int("rounds", 1, 1000, 5, "stop/start rounds")],
    },
    WorkloadSpec {
        name: "looper",
        summary: "originates `n` numbered messages around a ring of forwarders, one at a \
                  time; when a channel of the ring goes down (a forwarder restarting) it \
                  waits for the new epoch, gives the message in flight `grace_ms` to come \
                  back and counts it lost otherwise; exits 0 if every message came back \
                  once, in order, or was counted lost",
        args: &[
            channel("to", ArgDefault::Required, "the channel to the next guest of the ring"),
            channel("from", ArgDefault::Required, "the channel from the previous guest"),
            int("n", 1, 1_000_000, 1000, "messages to send around"),
            int("grace_ms", 1, 10_000, 20, "how long a message in flight may still come back"),
        ],
    },
    WorkloadSpec {
        name: "forwarder",
        summary: "passes every message from `from` to `to`, waiting out a neighbour's \
                  restart (the new epoch) without dropping what it holds; its first \
                  incarnation faults on purpose after `die_after` messages; exits 0 at the \
                  end marker",
        args: &[
            channel("to", ArgDefault::Required, "the channel to the next guest of the ring"),
            channel("from", ArgDefault::Required, "the channel from the previous guest"),
            int(
                "die_after",
                0,
                1_000_000_000,
                1_000_000_000,
                "messages before the first incarnation dies",
            ),
        ],
    },
    WorkloadSpec {
        name: "exitbench",
        summary: "times `n` VM exit round trips of each kind (null and `exit_count` \
                  hypercalls, CPUID, an I/O write, RDMSR and WRMSR of FS base (no exit: \
                  VMX switches it) and of PAT) and the hypervisor's share from its \
                  telemetry page (`cargo xtask bench exits`); exits 0",
        args: &[int("n", 1, 2048, 1000, "round trips timed per kind")],
    },
    WorkloadSpec {
        name: "meter",
        summary: "reads exit-free telemetry: as `watched` it checks its own counters (after \
                  `n` hypercalls, `m` messages on its first channel, the NMIs of its \
                  controller's `queries`) and tells them to its controller; as `watcher` (its \
                  controller) it checks them in its read-only target window, counts its own \
                  exits while reading it (none), restarts it and reads the window of the new \
                  incarnation; as `nosy` (no control capability) it reads the target windows' \
                  address and must be stopped",
        args: &[
            ArgSpec {
                key: "role",
                kind: ArgKind::Word(&["watched", "watcher", "nosy"]),
                default: ArgDefault::Required,
                meaning: "`watched`, `watcher` (controls the watched guest, a channel to it \
                          first) or `nosy`",
            },
            int("n", 1, 100_000, 100, "hypercalls counted (each incarnation of `watched`)"),
            int("m", 1, 4096, 40, "messages `watched` sends to `watcher`"),
            int("queries", 1, 1000, 20, "control queries `watcher` makes (NMIs at the target)"),
            flag("write", "`watcher`: 1: write its target window at the end (must be stopped)"),
        ],
    },
    WorkloadSpec {
        name: "nic",
        summary: "lists the PCI functions it owns and checks that bus 0 shows exactly those \
                  (all ones elsewhere; a guest with no device must see none); then, on each \
                  card (e1000 or ne2k), times software-raised interrupts, asks the slirp \
                  gateway 10.0.2.2 its MAC address (ARP, as 10.0.2.15) and pings it; with \
                  `udp_port`, echoes UDP datagrams to that port back to their sender (first \
                  card); ends with a `nic: done:` line of interrupts and frames per card; \
                  exits 0 if all of it worked",
        args: &[
            int("pings", 0, 1000, 3, "ICMP echo requests to the gateway, per card"),
            int(
                "reply_ms",
                1,
                600_000,
                2000,
                "how long a card may take to come up, and each reply",
            ),
            int("latency", 0, 64, 8, "software-raised interrupts timed per card (0: none)"),
            int("udp_port", 0, 65535, 0, "0: no UDP echo; else the port whose datagrams it echoes"),
            int("datagrams", 1, 1_000_000, 1, "datagrams to echo before it ends"),
            int("echo_ms", 1, 3_600_000, 30_000, "how long the echo phase may last"),
            flag(
                "crash",
                "1: the first incarnation dies with echo replies due; later ones check their \
                 cards were quiesced, then run again (give the guest a restart policy)",
            ),
        ],
    },
    WorkloadSpec {
        name: "pciattack",
        summary: "owns a PCI function and attacks the others through configuration space \
                  (reads, BAR moves, bus mastering, bridge windows, the reset port), its own \
                  BAR and command register, then reads the device window where nothing of \
                  its own is (stopped); `window` does only that, `storm` leaves its card's \
                  interrupt asserted (stopped by its budget); one `pciattack NAME:` line \
                  per attack",
        args: &[ArgSpec {
            key: "which",
            kind: ArgKind::Word(&["all", "window", "storm"]),
            default: ArgDefault::Word("all"),
            meaning: "`all` (the attacks it survives, then `window`), `window` or `storm`",
        }],
    },
    WorkloadSpec {
        name: "bigmap",
        summary: "maps its whole grant (slot 0) `rounds` times at `offset_kib` into the grant \
                  window, touches it, unmaps it, and prints how long each map and unmap took; \
                  or, by `role`, revokes a copy its peer mapped so",
        args: &[
            int(
                "offset_kib",
                0,
                1 << 20,
                4,
                "offset in the grant window, KiB: 4 forces \
                4-KiB pages (the longest mapping), 0 allows 2-MiB pages",
            ),
            int("rounds", 1, 100, 3, "maps and unmaps"),
            ArgSpec {
                key: "role",
                kind: ArgKind::Word(&["mapper", "owner", "holder"]),
                default: ArgDefault::Word("mapper"),
                meaning: "`mapper` (maps its grant), `owner` (copies its grant to the peer of \
                          its first channel and revokes it once the peer mapped it) or \
                          `holder` (maps the copy at `offset_kib`, tells the owner)",
            },
            int(
                "deaf_ok",
                0,
                1,
                0,
                "owner: 1 also takes `Timeout` for the revoke (the holder's core may be \
                made deaf; the run then checks that core was fenced)",
            ),
            int(
                "probe",
                0,
                1,
                0,
                "holder: 1 reads page `probe_page` of the copy once the revoke took it: \
                the read must stop the guest (an EPT violation at that address)",
            ),
            int(
                "probe_page",
                0,
                1 << 20,
                0,
                "holder: the page of the copy `probe` reads (modulo its pages), written and \
                read back through the mapping before the revoke",
            ),
        ],
    },
    WorkloadSpec {
        name: "tcpecho",
        summary: "a TCP echo server on the SDK's TCP/IP stack (`guestkernel::tcpip`, \
                  smoltcp) over its first card, at slirp's 10.0.2.15: listens on `port` \
                  (`backlog` sockets), accepts connections and echoes every byte, closing \
                  when the peer does; one line per connection, then a `bench tcpecho` line \
                  (work instructions per read, frames, sleeps) and `tcpecho: done:`; exits \
                  0 after `connections` connections, 5 if `ms` came first",
        args: &[
            int("port", 1, 65535, 7777, "the TCP port it listens on"),
            int("connections", 1, 1_000_000, 1, "connections served before it ends"),
            int("ms", 1, 3_600_000, 600_000, "how long it may wait for them all"),
            int("buffer", 512, 65536, 8192, "bytes of receive and send buffer, per socket"),
            int("backlog", 1, 8, 2, "sockets listening at once (connections served at once)"),
            int(
                "udp_port",
                0,
                65535,
                0,
                "0: no UDP; else it also echoes datagrams to this port back to their sender",
            ),
            flag("trace", "1: log every frame either way, decoded (`tcpip: rx`, `tcpip: tx`)"),
        ],
    },
    WorkloadSpec {
        name: "kvfront",
        summary: "the front of the sharded key-value service (`vmcall_proto::kv`): owns its \
                  first card, serves memcached's text protocol on TCP `port` (`set`, `get` \
                  of several keys, `delete`, `incr`, `decr`, `version`, `stats`, `quit`, \
                  `shutdown`) and sends each key's request to the worker of its shard (the \
                  peer of its `i`-th channel); large values by capability (its grant, one \
                  buffer per worker) or by copy through the ring; a worker down, silent or \
                  talking garbage makes its shard answer `SERVER_ERROR shard N \
                  unavailable` (and is restarted if the front controls it); ends with a `bench kvfront:` line; exits 0 after `shutdown`",
        args: &[
            int("port", 1, 65535, crate::kv::GUEST_PORT as u64, "the TCP port it listens on"),
            int("backlog", 1, 8, 4, "sockets listening at once (connections served at once)"),
            int("buffer", 1024, 65536, 16384, "bytes of receive and send buffer, per socket"),
            ArgSpec {
                key: "large",
                kind: ArgKind::Word(&["cap", "copy"]),
                default: ArgDefault::Word("cap"),
                meaning: "how values over the inline size travel: `cap` (the front's buffer \
                          granted to the worker, revoked after) or `copy` (through the ring)",
            },
            int(
                "timeout_ms",
                1,
                60_000,
                crate::kv::DEADLINE_MS,
                "how long it waits for a worker's answer before fencing its shard",
            ),
            int("polls", 0, 1_000_000, 200, "polls of a worker's ring before sleeping on it"),
            int("ms", 1, 3_600_000, 3_600_000, "how long it may run before it ends (exit 5)"),
        ],
    },
    WorkloadSpec {
        name: "kvworker",
        summary: "one shard of the key-value service: serves the front's requests from its \
                  channel, values in a B-tree map on its heap, large ones read from or \
                  written to the buffer the front grants; exits 0 when the front is gone; \
                  `mode` injects a fault from request `after` of its first incarnation on",
        args: &[
            channel("channel", ArgDefault::FirstChannel, "the channel to the front"),
            ArgSpec {
                key: "mode",
                kind: ArgKind::Word(&["serve", "crash", "garbage", "mute", "hoard"]),
                default: ArgDefault::Word("serve"),
                meaning: "`serve`, or (first incarnation only) `crash` (faults: give it a \
                          restart policy), `garbage` (answers without the magic), `mute` \
                          (never answers) or `hoard` (maps the next granted buffer, never \
                          answers or unmaps it, keeps reading it: stopped after the revoke)",
            },
            int("after", 0, 1_000_000, 0, "requests served normally before `mode` applies"),
            int("polls", 0, 1_000_000, 100, "polls of the ring before sleeping on it"),
        ],
    },
    WorkloadSpec {
        name: "impatient",
        summary: "a client that gives up: `n` calls with `Chan::call_until`, each with a \
                  deadline of `ms`; checks that every reply it gets is its own request's \
                  and counts the calls it gave up (a `laggard` answers some late)",
        args: &[
            CHANNEL,
            int("n", 1, 1_000_000, 100, "calls"),
            int("ms", 1, 60_000, 5, "each call's deadline"),
        ],
    },
    WorkloadSpec {
        name: "laggard",
        summary: "a server that answers late: takes `n` calls and answers each, every \
                  `every`-th one only after `lag_ms` (an `impatient` client gives those up); \
                  checks every request is whole and in order",
        args: &[
            CHANNEL,
            int("n", 1, 1_000_000, 100, "requests"),
            int("every", 1, 1_000_000, 4, "which requests are answered late (every `every`-th)"),
            int("lag_ms", 0, 60_000, 8, "how late"),
        ],
    },
];

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const _: () = {
    assert!(WORKLOAD_SPECS.len() == WORKLOADS.len());
    let mut i = 0;
    while i < WORKLOADS.len() {
        assert!(str_eq(WORKLOAD_SPECS[i].name, WORKLOADS[i]));
        i += 1;
    }
};

/// `"MKVBOOT\0"` read as a little-endian word (a literal, so the C header carries it).
pub const BOOT_INFO_MAGIC: u64 = 0x0054_4f4f_4256_4b4d;
const _: () = assert!(BOOT_INFO_MAGIC == u64::from_le_bytes(*b"MKVBOOT\0"));
pub const BOOT_INFO_VERSION: u32 = 3;
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
    /// Which start of this guest this is: 1, then 2 after its first restart, ...
    pub incarnation: u32,
    /// Entries of [`BootInfo::devices`] in use.
    pub device_count: u32,
    /// Machine address minus guest-physical address of the partition (`0..memory_bytes`),
    /// which is contiguous in machine memory: what a driver adds to a partition address to
    /// program a device's DMA (see [`crate::device`]). Other guest-physical ranges
    /// (channel and grant windows) have no such offset.
    pub dma_offset: u64,
    pub _reserved: [u8; 48],
    /// The PCI functions this guest owns, config order (see [`crate::device`]).
    pub devices: [DeviceDesc; MAX_DEVICES_PER_GUEST],
}
const _: () = assert!(
    core::mem::size_of::<BootInfo>()
        == 296 + 64 * MAX_CHANNELS_PER_GUEST + 160 * MAX_DEVICES_PER_GUEST
);
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
    /// Integer argument `key` of this guest's workload, or its default from
    /// [`WORKLOAD_SPECS`] (0 for a key the table does not declare: `cargo xtask` refuses
    /// configs that give one).
    pub fn arg_int(&self, key: &str) -> u64 {
        let default = match workload_spec(self.workload()).and_then(|w| w.arg(key)) {
            Some(ArgSpec { default: ArgDefault::Int(d), .. }) => *d,
            _ => 0,
        };
        self.arg_u64(key, default)
    }
    /// Word argument `key` of this guest's workload, or its default from
    /// [`WORKLOAD_SPECS`] (`""` when it has none).
    pub fn arg_word(&self, key: &str) -> &str {
        let default = match workload_spec(self.workload()).and_then(|w| w.arg(key)) {
            Some(ArgSpec { default: ArgDefault::Word(d), .. }) => d,
            _ => "",
        };
        self.arg(key).unwrap_or(default)
    }
    /// The channels of this guest.
    pub fn channels(&self) -> &[ChannelDesc] {
        &self.channels[..(self.channel_count as usize).min(MAX_CHANNELS_PER_GUEST)]
    }
    /// The devices this guest owns.
    pub fn devices(&self) -> &[DeviceDesc] {
        &self.devices[..(self.device_count as usize).min(MAX_DEVICES_PER_GUEST)]
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
    fn arguments_default_from_the_workload_table() {
        let mut b = BootInfo::new_zeroed();
        b.workload = crate::fixed::put("relay").unwrap();
        b.args = crate::fixed::put("n=10 mode=doorbell").unwrap();
        assert_eq!((b.arg_int("n"), b.arg_int("window"), b.arg_int("guests")), (10, 16, 4));
        assert_eq!(b.arg_word("mode"), "doorbell");
        b.workload = crate::fixed::put("attack").unwrap();
        b.args = [0; 128];
        assert_eq!((b.arg_word("which"), b.arg_int("rings"), b.arg_int("nope")), ("all", 50, 0));
    }

    #[test]
    fn workload_specs_are_consistent() {
        for w in WORKLOAD_SPECS {
            for (i, a) in w.args.iter().enumerate() {
                assert!(w.args[..i].iter().all(|b| b.key != a.key), "{}: {} twice", w.name, a.key);
                let ok = match (a.kind, a.default) {
                    (ArgKind::Int { min, max }, ArgDefault::Int(d)) => min <= d && d <= max,
                    (ArgKind::Word(ws), ArgDefault::Word(d)) => ws.contains(&d),
                    (ArgKind::Channel, ArgDefault::Required | ArgDefault::FirstChannel) => true,
                    (_, ArgDefault::Required) => true,
                    _ => false,
                };
                assert!(ok, "{}: {}'s default does not fit its kind", w.name, a.key);
            }
        }
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
