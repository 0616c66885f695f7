// SPDX-License-Identifier: MIT OR Apache-2.0
//! What the bootloader tells us, copied out of the multiboot2 information (which GRUB places
//! in gaps between our segments, memory we may reuse later) into fixed-size values that
//! the hypervisor owns: memory map, command line, ACPI root pointer.

use core::fmt;
use vmcall_proto::config::{MAX_PROBE_MS, MIN_PROBE_MS};

/// Most memory-map entries kept; the rest are counted and reported.
pub const MAX_REGIONS: usize = 64;
/// Longest command line kept.
pub const MAX_CMDLINE: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemKind {
    Usable,
    Reserved,
    AcpiReclaimable,
    AcpiNvs,
    Defective,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    pub start: u64,
    pub end: u64,
    pub kind: MemKind,
}

/// Where the ACPI tables start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiRoot {
    /// ACPI 1.0: RSDT (32-bit pointers).
    Rsdt(u64),
    /// ACPI 2.0+: XSDT (64-bit pointers).
    Xsdt(u64),
}

/// The command line's `revoke=` (see `caps::Revoke`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeMode {
    Multicast,
    Broadcast,
    Tree,
}

/// Options from the hypervisor command line (`multiboot2 /boot/mkvisor cpus=2`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Bring up at most this many cores (the BSP included).
    pub cpus: Option<usize>,
    /// Log the raw VMX capability MSRs at boot.
    pub vmxcaps: bool,
    /// A fault to inject, for the whole-system tests of the failure paths.
    pub inject: Option<Inject>,
    /// Each guest's run budget in milliseconds of TSC time; past it the guest is stopped.
    pub budget_ms: Option<u64>,
    /// The capability protocol's deadline per level, in milliseconds (default 50): a core
    /// that does not answer within it is fenced.
    pub caps_deadline_ms: Option<u64>,
    /// How long the BSP waits for each AP to answer its STARTUP IPI, in milliseconds
    /// (default 200, `smp::AP_ANSWER_US`): longer where vCPUs are starved (QEMU's TCG with
    /// 64 vCPUs on a loaded host); an AP that misses it is withdrawn and its core left out.
    pub ap_answer_ms: Option<u64>,
    /// Trace every VM exit (`trace`): see `crate::trace`.
    pub trace: bool,
    /// The membership failure detector's probe period, in milliseconds (default 25; a core
    /// unanswered for eight periods is fenced; 0 turns the detector off).
    pub probe_ms: Option<u64>,
    /// The run's length in milliseconds of TSC time from the guests' planning: then every
    /// guest still running is stopped (`ended`), none restarted.
    pub duration_ms: Option<u64>,
    /// How a revoke reaches the holders' cores: `revoke=multicast` (the default),
    /// `revoke=broadcast` or `revoke=tree`, with `revoke_fanout=N` (2..=16, default 2) heads
    /// per level.
    pub revoke: Option<RevokeMode>,
    pub revoke_fanout: Option<u8>,
    /// Live figures (`stats_ms=N`, 1..=60000; default off): each core writes a `stats`
    /// record of its guest at most every N ms, at its membership probes.
    pub stats_ms: Option<u64>,
    /// Host control (`host_control=1`, from `[machine] host_control = true`): the host's
    /// requests on COM2 act on guests (see `crate::hostctl`); otherwise they are refused.
    pub host_control: bool,
}

/// Faults the hypervisor can inject into its own bring-up (`inject=...`), so that the
/// reporting paths are tested on the real system rather than assumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inject {
    /// The BSP sends no STARTUP IPI to the last core: it must be reported silent.
    SilentAp,
    /// Core 1 executes UD2 once online: its exception must be reported, the run failed.
    ApFault,
    /// Core 1 starts late: the BSP gives up on it (no STARTUP IPI in its window), opens
    /// core 2's trampoline block, and only then sends core 1 its SIPI. Core 1 must park
    /// without taking core 2's block (reported silent), and core 2 come up as itself.
    LateAp,
    /// Core N's hypervisor silently drops capability revokes (it still takes transfers;
    /// its guest runs on): the revoking core must fence it and finish.
    DeafCore(usize),
    /// Core N's hypervisor stops serving its inbox entirely (no message read, no probe
    /// answered or sent, no deadline looked at) for `ms` milliseconds, from `after_ms` into
    /// its guest's first run, while its guest keeps running (`inject=deaf-core:N:MS:AFTER`):
    /// the others' operations must stay bounded, and the failure detector must fence it if
    /// and only if the stretch outlasts its timeout.
    DeafFor { core: usize, ms: u64, after_ms: u64 },
    /// Core N's hypervisor stops answering anything (interrupts off, spinning) 20 ms into
    /// its guest's run: the others must detect it, fence it and finish.
    HungCore(usize),
}

/// A command-line word the hypervisor does not understand. Reported and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadOption<'a> {
    pub word: &'a str,
    pub why: &'static str,
}

impl fmt::Display for BadOption<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command line: `{}`: {}", self.word, self.why)
    }
}

/// Parses the command line; good words set options, bad ones go to `bad`.
pub fn parse_options<'a>(cmdline: &'a str, mut bad: impl FnMut(BadOption<'a>)) -> Options {
    let mut o = Options::default();
    for word in cmdline.split_ascii_whitespace() {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        match key {
            "cpus" => match value.parse::<usize>() {
                Ok(n) if n >= 1 => o.cpus = Some(n),
                _ => bad(BadOption { word, why: "expected cpus=N with N >= 1" }),
            },
            "vmxcaps" if value.is_empty() || value == "1" => o.vmxcaps = true,
            "vmxcaps" => bad(BadOption { word, why: "expected vmxcaps or vmxcaps=1" }),
            "host_control" if value.is_empty() || value == "1" => o.host_control = true,
            "host_control" => {
                bad(BadOption { word, why: "expected host_control or host_control=1" })
            }
            "trace" if value.is_empty() || value == "1" => o.trace = true,
            "trace" => bad(BadOption { word, why: "expected trace or trace=1" }),
            "budget_ms" => match value.parse::<u64>() {
                Ok(n) if n >= 1 => o.budget_ms = Some(n),
                _ => bad(BadOption { word, why: "expected budget_ms=N with N >= 1" }),
            },
            "caps_deadline_ms" => match value.parse::<u64>() {
                Ok(n) if (1..=60_000).contains(&n) => o.caps_deadline_ms = Some(n),
                _ => {
                    bad(BadOption { word, why: "expected caps_deadline_ms=N with 1 <= N <= 60000" })
                }
            },
            "ap_answer_ms" => match value.parse::<u64>() {
                Ok(n) if (1..=60_000).contains(&n) => o.ap_answer_ms = Some(n),
                _ => bad(BadOption { word, why: "expected ap_answer_ms=N with 1 <= N <= 60000" }),
            },
            "duration_ms" => match value.parse::<u64>() {
                Ok(n) if (1..=86_400_000).contains(&n) => o.duration_ms = Some(n),
                _ => bad(BadOption { word, why: "expected duration_ms=N with 1 <= N <= 86400000" }),
            },
            "probe_ms" => match value.parse::<u64>() {
                Ok(n) if n == 0 || (MIN_PROBE_MS..=MAX_PROBE_MS).contains(&n) => {
                    o.probe_ms = Some(n)
                }
                _ => bad(BadOption {
                    word,
                    why: "expected probe_ms=0 (off) or probe_ms=N with 12 <= N <= 10000 (8 \
                          silent periods must outlast a live core's longest stretch away \
                          from its inbox)",
                }),
            },
            "stats_ms" => match value.parse::<u64>() {
                Ok(n) if (1..=60_000).contains(&n) => o.stats_ms = Some(n),
                _ => bad(BadOption { word, why: "expected stats_ms=N with 1 <= N <= 60000" }),
            },
            "revoke" => match value {
                "multicast" => o.revoke = Some(RevokeMode::Multicast),
                "broadcast" => o.revoke = Some(RevokeMode::Broadcast),
                "tree" => o.revoke = Some(RevokeMode::Tree),
                _ => bad(BadOption {
                    word,
                    why: "expected revoke=multicast, revoke=broadcast or revoke=tree",
                }),
            },
            "revoke_fanout" => match value.parse::<u8>() {
                Ok(n) if (2..=16).contains(&n) => o.revoke_fanout = Some(n),
                _ => bad(BadOption { word, why: "expected revoke_fanout=N with 2 <= N <= 16" }),
            },
            "inject" => match value.split_once(':') {
                Some(("deaf-core", rest)) if rest.contains(':') => match deaf_for(rest) {
                    Some(d) => o.inject = Some(d),
                    None => bad(BadOption {
                        word,
                        why: "expected inject=deaf-core:N:MS:AFTER with N >= 1, \
                              1 <= MS <= 60000 and AFTER <= 60000",
                    }),
                },
                None if value == "silent-ap" => o.inject = Some(Inject::SilentAp),
                None if value == "ap-fault" => o.inject = Some(Inject::ApFault),
                None if value == "late-ap" => o.inject = Some(Inject::LateAp),
                Some(("deaf-core", n)) if n.parse::<usize>().is_ok_and(|n| n >= 1) => {
                    o.inject = n.parse().ok().map(Inject::DeafCore)
                }
                Some(("hung-core", n)) if n.parse::<usize>().is_ok() => {
                    o.inject = n.parse().ok().map(Inject::HungCore)
                }
                _ => bad(BadOption {
                    word,
                    why:
                        "expected inject=silent-ap, inject=ap-fault, inject=deaf-core:N (N >= 1), \
                          inject=deaf-core:N:MS:AFTER or inject=hung-core:N",
                }),
            },
            _ => bad(BadOption { word, why: "unknown option" }),
        }
    }
    o
}

/// `N:MS:AFTER` of `inject=deaf-core:N:MS:AFTER`.
fn deaf_for(rest: &str) -> Option<Inject> {
    let mut it = rest.split(':').map(|w| w.parse::<u64>().ok());
    let (Some(Some(core)), Some(Some(ms)), Some(Some(after_ms)), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return None;
    };
    let ok = core >= 1 && (1..=60_000).contains(&ms) && after_ms <= 60_000;
    ok.then_some(Inject::DeafFor { core: core as usize, ms, after_ms })
}

/// Most multiboot2 modules kept.
pub const MAX_MODULES: usize = 8;

/// A multiboot2 module: where GRUB put it and the name on its `module2` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module {
    pub start: u64,
    pub end: u64,
    name: [u8; 32],
    name_len: usize,
}

impl Module {
    pub fn name(&self) -> &str {
        core::str::from_utf8(&self.name[..self.name_len]).unwrap_or("")
    }
    /// The module's bytes.
    ///
    /// # Safety
    /// The module memory is identity-mapped and reserved (never handed to a partition).
    pub unsafe fn bytes(&self) -> &'static [u8] {
        // SAFETY: the caller guarantees the range is mapped and stays untouched.
        unsafe {
            core::slice::from_raw_parts(self.start as *const u8, (self.end - self.start) as usize)
        }
    }
}

/// Everything we keep from the multiboot2 information.
pub struct BootParams {
    modules: [Module; MAX_MODULES],
    module_count: usize,
    /// Where the multiboot2 information itself lies (reserved until parsed).
    pub mbi: (u64, u64),
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    regions: [MemRegion; MAX_REGIONS],
    region_count: usize,
    /// Memory-map entries beyond [`MAX_REGIONS`], dropped.
    pub regions_dropped: usize,
    pub acpi: Option<AcpiRoot>,
    /// The bootloader's name, if it said.
    loader: [u8; 32],
    loader_len: usize,
}

impl BootParams {
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }
    pub fn loader(&self) -> &str {
        core::str::from_utf8(&self.loader[..self.loader_len]).unwrap_or("")
    }
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions[..self.region_count]
    }
    pub fn modules(&self) -> &[Module] {
        &self.modules[..self.module_count]
    }
    pub fn module(&self, name: &str) -> Option<&Module> {
        self.modules().iter().find(|m| m.name() == name)
    }
    /// Whether `[start, end)` lies entirely inside one usable region.
    pub fn is_usable(&self, start: u64, end: u64) -> bool {
        self.regions().iter().any(|r| r.kind == MemKind::Usable && r.start <= start && end <= r.end)
    }
    /// Total usable bytes.
    pub fn usable_bytes(&self) -> u64 {
        self.regions().iter().filter(|r| r.kind == MemKind::Usable).map(|r| r.end - r.start).sum()
    }
}

fn copy_str(dst: &mut [u8], s: &str) -> usize {
    // Truncate on a character boundary so the copy stays valid UTF-8.
    let mut n = s.len().min(dst.len());
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
    n
}

/// Why the multiboot2 information is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    BadMagic(u32),
    Unreadable,
    NoMemoryMap,
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootInfoError::BadMagic(m) => {
                write!(f, "not started by a multiboot2 loader (EAX = {m:#x}, expected 0x36d76289)")
            }
            BootInfoError::Unreadable => f.write_str("multiboot2 information is malformed"),
            BootInfoError::NoMemoryMap => f.write_str("multiboot2 information has no memory map"),
        }
    }
}

/// The EAX value a multiboot2 loader hands over.
pub const MULTIBOOT2_MAGIC: u32 = 0x36d7_6289;

/// Copies what we need out of the multiboot2 information at `mbi`.
///
/// # Safety
/// `mbi` is the address GRUB passed in EBX, identity-mapped and not yet overwritten.
pub unsafe fn parse(magic: u32, mbi: u64) -> Result<BootParams, BootInfoError> {
    use multiboot2::{BootInformation, BootInformationHeader, MemoryAreaType};
    if magic != MULTIBOOT2_MAGIC {
        return Err(BootInfoError::BadMagic(magic));
    }
    // SAFETY: the caller guarantees `mbi` is the loader's untouched information block.
    let info = unsafe { BootInformation::load(mbi as *const BootInformationHeader) }
        .map_err(|_| BootInfoError::Unreadable)?;
    let mut p = BootParams {
        modules: [Module { start: 0, end: 0, name: [0; 32], name_len: 0 }; MAX_MODULES],
        module_count: 0,
        mbi: (info.start_address() as u64, info.end_address() as u64),
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
        regions: [MemRegion { start: 0, end: 0, kind: MemKind::Reserved }; MAX_REGIONS],
        region_count: 0,
        regions_dropped: 0,
        acpi: None,
        loader: [0; 32],
        loader_len: 0,
    };
    if let Some(Ok(s)) = info.command_line_tag().map(|t| t.cmdline()) {
        p.cmdline_len = copy_str(&mut p.cmdline, s);
    }
    if let Some(Ok(s)) = info.boot_loader_name_tag().map(|t| t.name()) {
        p.loader_len = copy_str(&mut p.loader, s);
    }
    for m in info.module_tags().take(MAX_MODULES) {
        let mut module = Module {
            start: m.start_address() as u64,
            end: m.end_address() as u64,
            name: [0; 32],
            name_len: 0,
        };
        module.name_len = copy_str(&mut module.name, m.cmdline().unwrap_or(""));
        if module.start < module.end {
            p.modules[p.module_count] = module;
            p.module_count += 1;
        }
    }
    let mmap = info.memory_map_tag().ok_or(BootInfoError::NoMemoryMap)?;
    for area in mmap.memory_areas() {
        let kind = match area.typ() {
            MemoryAreaType::Available => MemKind::Usable,
            MemoryAreaType::AcpiAvailable => MemKind::AcpiReclaimable,
            MemoryAreaType::ReservedHibernate => MemKind::AcpiNvs,
            MemoryAreaType::Defective => MemKind::Defective,
            _ => MemKind::Reserved,
        };
        let r = MemRegion { start: area.start_address(), end: area.end_address(), kind };
        if p.region_count < MAX_REGIONS {
            p.regions[p.region_count] = r;
            p.region_count += 1;
        } else {
            p.regions_dropped += 1;
        }
    }
    p.acpi = if let Some(t) = info.rsdp_v2_tag().filter(|t| t.checksum_is_valid()) {
        Some(AcpiRoot::Xsdt(t.xsdt_address() as u64))
    } else {
        info.rsdp_v1_tag()
            .filter(|t| t.checksum_is_valid())
            .map(|t| AcpiRoot::Rsdt(t.rsdt_address() as u64))
    };
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> (Options, Vec<String>) {
        let mut bad = Vec::new();
        let o = parse_options(s, |b| bad.push(b.to_string()));
        (o, bad)
    }

    #[test]
    fn cpus_cap() {
        assert_eq!(opts("cpus=2").0.cpus, Some(2));
        assert_eq!(opts("").0, Options::default());
        assert_eq!(
            opts("  cpus=8   vmxcaps ").0,
            Options {
                cpus: Some(8),
                vmxcaps: true,
                inject: None,
                budget_ms: None,
                caps_deadline_ms: None,
                ap_answer_ms: None,
                trace: false,
                probe_ms: None,
                duration_ms: None,
                revoke: None,
                revoke_fanout: None,
                stats_ms: None,
                host_control: false,
            }
        );
        assert!(opts("host_control").0.host_control && opts("host_control=1").0.host_control);
        assert_eq!(opts("host_control=yes").1.len(), 1);
        assert_eq!(opts("stats_ms=100").0.stats_ms, Some(100));
        assert_eq!(opts("stats_ms=0").1.len(), 1);
        assert!(opts("trace").0.trace && opts("trace=1").0.trace);
        assert!(!opts("").0.trace);
        assert_eq!(opts("trace=yes").1.len(), 1);
        assert_eq!(opts("inject=ap-fault").0.inject, Some(Inject::ApFault));
        assert_eq!(opts("inject=silent-ap").0.inject, Some(Inject::SilentAp));
        assert_eq!(opts("inject=late-ap").0.inject, Some(Inject::LateAp));
        assert_eq!(opts("inject=everything").1.len(), 1);
        assert_eq!(opts("inject=deaf-core:2").0.inject, Some(Inject::DeafCore(2)));
        assert_eq!(opts("inject=hung-core:0").0.inject, Some(Inject::HungCore(0)));
        assert_eq!(opts("probe_ms=12").0.probe_ms, Some(12));
        assert_eq!(opts("probe_ms=0").0.probe_ms, Some(0));
        assert_eq!(opts("probe_ms=11").1.len(), 1, "shorter than a live core's longest stretch");
        assert_eq!(opts("duration_ms=500").0.duration_ms, Some(500));
        assert_eq!(opts("duration_ms=0").1.len(), 1);
        assert_eq!(opts("probe_ms=10001").1.len(), 1);
        assert_eq!(
            opts("inject=deaf-core:2:150:30").0.inject,
            Some(Inject::DeafFor { core: 2, ms: 150, after_ms: 30 })
        );
        for bad in [
            "inject=deaf-core:0",
            "inject=deaf-core:x",
            "inject=deaf-core",
            "inject=deaf-core:0:10:0",
            "inject=deaf-core:1:0:0",
            "inject=deaf-core:1:10",
            "inject=deaf-core:1:10:0:5",
            "inject=deaf-core:1:60001:0",
        ] {
            let why = opts(bad).1;
            assert_eq!(why.len(), 1, "{bad}");
            // The reason is printed as is: one line, single spaces.
            assert!(!why[0].contains("  ") && !why[0].contains('\n'), "{bad}: {:?}", why[0]);
        }
        assert_eq!(opts("caps_deadline_ms=5").0.caps_deadline_ms, Some(5));
        assert_eq!(opts("caps_deadline_ms=0").1.len(), 1);
        assert_eq!(opts("ap_answer_ms=2000").0.ap_answer_ms, Some(2000));
        assert_eq!(opts("ap_answer_ms=0").1.len(), 1);
        assert_eq!(opts("revoke=tree").0.revoke, Some(RevokeMode::Tree));
        assert_eq!(opts("revoke=broadcast").0.revoke, Some(RevokeMode::Broadcast));
        assert_eq!(opts("revoke=multicast").0.revoke, Some(RevokeMode::Multicast));
        assert_eq!(opts("revoke_fanout=3").0.revoke_fanout, Some(3));
        for bad in
            ["revoke=star", "revoke", "revoke_fanout=1", "revoke_fanout=17", "revoke_fanout=x"]
        {
            assert_eq!(opts(bad).1.len(), 1, "{bad}");
        }
    }

    #[test]
    fn bad_words_are_named_and_ignored() {
        let (o, bad) = opts("cpus=0 cpus=x frob vmxcaps=2");
        assert_eq!(o, Options::default());
        assert_eq!(bad.len(), 4);
        assert!(bad[0].contains("`cpus=0`"));
        assert!(bad[2].contains("`frob`: unknown option"));
    }

    #[test]
    fn copy_str_truncates_on_char_boundary() {
        let mut buf = [0u8; 3];
        let n = copy_str(&mut buf, "aλλ");
        assert_eq!(core::str::from_utf8(&buf[..n]).unwrap(), "aλ");
    }
}
