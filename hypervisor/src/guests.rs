// SPDX-License-Identifier: MIT OR Apache-2.0
//! The BSP's part in running guests: at boot, check the config blob and the guest kernel,
//! carve a partition and a private region per guest and post each core its launch
//! message; at the end, collect each core's report and print the records and the summary.
//! Between the two the BSP is just another core running its own guest.

use crate::bootinfo::{BootParams, RevokeMode};
use crate::cores::CoreList;
use crate::exits::StopReason;
use crate::instance::{ChanMap, Ending, Exits, Launch};
use crate::memory::{PhysAlloc, Range};
use crate::{arch, record, smp};
use core::fmt;
use vmcall_proto::channel;
use vmcall_proto::config::{self, MAX_GUESTS};
use vmcall_proto::guest::ChannelDesc;
use vmcall_proto::record::{guest_state, kind, Quoted};
use zerocopy::FromZeros;

/// Default per-guest run budget (milliseconds of TSC time).
pub const DEFAULT_BUDGET_MS: u64 = 10_000;
/// Private region per guest: EPT tables, VMCS, MSR bitmap (the config check counts it too).
const PRIVATE_SIZE: u64 = config::GUEST_PRIVATE_BYTES;
const ALIGN_2M: u64 = config::REGION_ALIGN;

/// The BARs of a function as record words: `index:kind:base+size` (hex), with
/// `gpa->` before the base of memory BARs mapped in an owner's device window.
struct BarWords<'a>(&'a crate::pci::Function, Option<&'a [u64; vmcall_proto::device::MAX_BARS]>);

impl fmt::Display for BarWords<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use vmcall_proto::device::bar_kind;
        let mut first = true;
        for (i, b) in self.0.bars.iter().enumerate().filter(|(_, b)| b.size > 0) {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            let kind = match b.kind {
                bar_kind::MEMORY if b.wide => "mem64",
                bar_kind::MEMORY => "mem32",
                _ => "io",
            };
            write!(f, "{i}:{kind}:")?;
            if let Some(gpa) = self.1.filter(|_| b.kind == bar_kind::MEMORY) {
                write!(f, "{:x}->", gpa[i])?;
            }
            write!(f, "{:x}+{:x}", b.base, b.size)?;
        }
        Ok(())
    }
}

/// Logs every PCI function the BSP found, one record each (the report's `devices`).
pub fn report_pci(fns: &crate::pci::Functions) {
    for f in fns.iter() {
        log::info!("PCI {f} pin {} line {}", f.pin, f.line);
        record!(
            kind::PCI,
            "bdf={} id={:04x}:{:04x} class={:06x} header={:02x} pin={} line={} bars={}",
            f.bdf,
            f.vendor,
            f.device,
            f.class,
            f.header_type,
            f.pin,
            f.line,
            Quoted(format_args!("{}", BarWords(f, None)))
        );
    }
    if fns.dropped > 0 {
        log::warn!("PCI: {} more functions not listed (table full)", fns.dropped);
    }
}

/// Logs the functions a guest was given (a `device` record each).
fn report_assigned(i: usize, name: &str, l: &Launch) {
    for o in l.devices.iter() {
        let f = &o.func;
        let dma = o.flags & vmcall_proto::device::flags::DMA_UNCONFINED != 0;
        if dma {
            log::warn!(
                "guest {name} owns {} with dma = unconfined: no IOMMU confines its DMA",
                f.bdf
            );
        }
        record!(
            kind::DEVICE,
            "guest={i} name={} bdf={} id={:04x}:{:04x} vector={} line={} dma={} bars={}",
            Quoted(name),
            f.bdf,
            f.vendor,
            f.device,
            o.vector,
            o.line().map_or(-1, |l| l as i32),
            if dma { "unconfined" } else { "off" },
            Quoted(format_args!("{}", BarWords(f, Some(&o.gpa))))
        );
    }
}

/// One configured guest, as planned.
#[derive(Clone, Copy, Debug)]
pub struct Planned {
    pub name: [u8; 32],
    pub core: u32,
    /// The core index running it, or why it will not run.
    pub slot: Result<usize, &'static str>,
}

pub struct Plan {
    guests: [Option<Planned>; MAX_GUESTS],
    count: usize,
    /// How long the longest guest life can last, ms: every incarnation its budget and as
    /// much again of time served to other cores, plus a second for its death; twice that
    /// with controllers (a controlled guest lives at most as long as one of them, then its
    /// own life once more).
    life_ms: u64,
    /// TSC past which nobody waits for a guest any more (the collection's deadline from
    /// boot): the BSP stops serving, a controlled guest stops waiting for its controllers.
    pub give_up_tsc: u64,
    channels: [Option<ChanInfo>; config::MAX_CHANNELS],
    channel_count: usize,
}

/// A channel as the BSP keeps it, to report its counters at the end.
#[derive(Clone, Copy, Debug)]
struct ChanInfo {
    name: [u8; 32],
    a: u16,
    b: u16,
    hpa: u64,
    slots: u32,
}

/// Why no guest can be planned at all.
pub enum PlanError {
    BadBlob(config::BlobError),
    /// A guest's kernel module (`config::KERNEL_MODULES`) is not there.
    NoKernel(&'static str),
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::BadBlob(e) => write!(f, "config blob rejected: {e}; no guest started"),
            PlanError::NoKernel(m) => {
                write!(f, "a config but no `{m}` module for its guests; no guest started")
            }
        }
    }
}

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// The plan, built once by the BSP at boot and read-only afterwards.
static PLAN: spin::Once<Plan> = spin::Once::new();
/// The launch messages while the BSP builds them, before they are posted one per core:
/// 64 guests with 16 channels each are far more than a stack should carry. Only the BSP
/// takes this lock, once, at boot.
static LAUNCHES: spin::Mutex<[Option<Launch>; MAX_GUESTS]> = spin::Mutex::new([None; MAX_GUESTS]);

/// Plans the guests of the `config` module. `Ok(None)` when there is no config (the
/// platform-only run). Called once, on the BSP.
pub fn plan(
    boot: &BootParams,
    cores: &CoreList,
    opts: &crate::bootinfo::Options,
) -> Result<Option<&'static Plan>, PlanError> {
    let budget_ms = opts.budget_ms.unwrap_or(DEFAULT_BUDGET_MS);
    let deaf = match opts.inject {
        Some(crate::bootinfo::Inject::DeafCore(n)) => Some(n),
        _ => None,
    };
    let deaf_for = match opts.inject {
        Some(crate::bootinfo::Inject::DeafFor { core, ms, after_ms }) => Some((core, ms, after_ms)),
        _ => None,
    };
    let hung = match opts.inject {
        Some(crate::bootinfo::Inject::HungCore(n)) => Some(n),
        _ => None,
    };
    let Some(cfg_mod) = boot.module("config") else {
        log::info!("no config module: bringing up cores only");
        return Ok(None);
    };
    // SAFETY: module memory is identity-mapped and reserved from the allocator below.
    let blob = unsafe { cfg_mod.bytes() };
    let cfg = config::parse(blob).map_err(PlanError::BadBlob)?;
    // Each guest's kernel: the built-in one or a module the config's kernels became.
    let mut kernels = [(0, 0); config::KERNEL_MODULES.len()];
    for e in cfg.guests() {
        let m = config::KERNEL_MODULES[e.kernel as usize];
        let k = boot.module(m).ok_or(PlanError::NoKernel(m))?;
        kernels[e.kernel as usize] = (k.start, k.end);
    }

    let mut taken = [Range { start: 0, end: 0 }; 2 + crate::bootinfo::MAX_MODULES];
    taken[0] = Range {
        start: core::ptr::addr_of!(__image_start) as u64,
        end: core::ptr::addr_of!(__image_end) as u64,
    };
    taken[1] = Range { start: boot.mbi.0, end: boot.mbi.1 };
    for (t, m) in taken[2..].iter_mut().zip(boot.modules()) {
        *t = Range { start: m.start & !0xfff, end: (m.end + 0xfff) & !0xfff };
    }
    let usable = boot
        .regions()
        .iter()
        .filter(|r| r.kind == crate::bootinfo::MemKind::Usable)
        .map(|r| Range { start: r.start, end: r.end });
    let mut mem = PhysAlloc::new(usable, &taken);
    log::info!(
        "config: {} guests, {} channels, {} grants; {} MiB free for partitions",
        cfg.guest_count(),
        cfg.channels().count(),
        cfg.grants().count(),
        mem.free_bytes() >> 20
    );
    let needed = config::memory_needed(
        cfg.guests().map(|g| g.memory_mib),
        cfg.grants().map(|g| g.memory_mib),
        cfg.channels().map(|c| c.slots),
    );
    if needed > mem.free_bytes() {
        log::warn!(
            "config: needs {} MiB for partitions, private regions, grants and channels: \
             some of it will not be created",
            needed.div_ceil(1 << 20)
        );
    }

    let mut plan = Plan {
        guests: [None; MAX_GUESTS],
        count: cfg.guest_count(),
        life_ms: cfg
            .guests()
            .map(|e| {
                let budget = if e.budget_ms > 0 { e.budget_ms as u64 } else { budget_ms };
                (1 + e.max_restarts as u64) * (2 * budget + 1_000)
            })
            .max()
            .unwrap_or(0)
            // A controlled guest may be started again until its controller is gone.
            .saturating_mul(if opts.host_control || cfg.guests().any(|e| e.controls != 0) {
                2
            } else {
                1
            }),
        give_up_tsc: 0,
        channels: [None; config::MAX_CHANNELS],
        channel_count: 0,
    };
    plan.give_up_tsc = arch::tsc::deadline_us((plan.life_ms + 2_000) * 1000);
    let mut launches = LAUNCHES.lock();
    for (i, e) in cfg.guests().enumerate() {
        let name = vmcall_proto::fixed::get(&e.name).unwrap_or("?");
        let devices = match crate::pci::functions() {
            Some(fns) => crate::pci::assign(fns, cfg.devices(), i as u16),
            None if cfg.devices_of(i).next().is_some() => Err(crate::pci::AssignError::Missing),
            None => Ok(crate::pci::Assigned::none()),
        };
        let slot = if e.core as usize >= cores.len() {
            log::warn!(
                "guest {name} asks for core {} but only {} cores run: not started",
                e.core,
                cores.len()
            );
            Err("its core does not exist on this machine")
        } else if let Err(err) = devices {
            for d in cfg.devices_of(i) {
                log::warn!("guest {name}: device {}: {}: not started", d.selector(), err.reason());
            }
            Err(err.reason())
        } else {
            let size = e.memory_mib as u64 * (1 << 20);
            match (mem.alloc(size, ALIGN_2M), mem.alloc(PRIVATE_SIZE, ALIGN_2M)) {
                (Some(partition), Some(private)) => {
                    launches[i] = Some(Launch {
                        guest_id: i as u32,
                        entry: e,
                        partition,
                        partition_size: size,
                        private,
                        private_size: PRIVATE_SIZE,
                        kernel: kernels[e.kernel as usize],
                        watchdog_ms: if e.budget_ms > 0 { e.budget_ms as u64 } else { budget_ms },
                        caps_deadline_ms: opts.caps_deadline_ms.unwrap_or(50),
                        revoke: match opts.revoke {
                            Some(RevokeMode::Tree) => crate::caps::Revoke::Tree {
                                fanout: opts.revoke_fanout.unwrap_or(2),
                            },
                            Some(RevokeMode::Broadcast) => crate::caps::Revoke::Broadcast,
                            Some(RevokeMode::Multicast) | None => crate::caps::Revoke::Multicast,
                        },
                        deaf: deaf == Some(e.core as usize),
                        deaf_ms: deaf_for.filter(|d| d.0 == e.core as usize).map_or(0, |d| d.1),
                        deaf_after_ms: deaf_for.map_or(0, |d| d.2),
                        hang: hung == Some(e.core as usize),
                        members: 0,
                        probe_ms: opts.probe_ms.unwrap_or(25),
                        stats_ms: opts.stats_ms.unwrap_or(0),
                        channels: [ChanMap {
                            desc: ChannelDesc::new_zeroed(),
                            hpa: 0,
                            size: 0,
                            peer_apic: None,
                            peer_core: None,
                        };
                            vmcall_proto::guest::MAX_CHANNELS_PER_GUEST],
                        channel_count: 0,
                        grants: [(0, 0); crate::instance::MAX_GRANTS_PER_GUEST],
                        grant_count: 0,
                        targets: [(0, 0); MAX_GUESTS],
                        target_count: 0,
                        target_status: [0; MAX_GUESTS],
                        controllers: 0,
                        give_up_tsc: plan.give_up_tsc,
                        end_tsc: opts
                            .duration_ms
                            .map_or(u64::MAX, |ms| arch::tsc::deadline_us(ms.saturating_mul(1000))),
                        devices: devices.unwrap_or(crate::pci::Assigned::none()),
                    });
                    if let Some(l) = launches[i].as_ref() {
                        report_assigned(i, name, l);
                    }
                    Ok(e.core as usize)
                }
                _ => {
                    log::warn!("guest {name}: no {} MiB of memory left: not started", e.memory_mib);
                    Err("not enough free memory for its partition")
                }
            }
        };
        plan.guests[i] = Some(Planned { name: e.name, core: e.core, slot });
    }
    // Functions nobody owns keep quiet: INTx disabled, so none can assert a line an owner's
    // device shares (the owner could never clear its cause). Bridges are left as they are.
    if let Some(fns) = crate::pci::functions() {
        let owned =
            |b| launches.iter().flatten().any(|l| l.devices.iter().any(|o| o.func.bdf == b));
        for f in fns.iter().filter(|f| f.is_endpoint() && !f.is_bridge() && !owned(f.bdf)) {
            crate::pci::silence(&mut crate::pci::Cf8, f);
        }
    }
    // Control (`[[control]]`): a cap per running target in the controller's space, the
    // controllers' cores in each target's launch.
    let core_of = |g: usize| plan.guests[g].and_then(|p| p.slot.ok());
    for (i, e) in cfg.guests().enumerate() {
        let Some(ctl_core) = core_of(i) else { continue };
        for t in (0..cfg.guest_count()).filter(|t| e.controls & (1u64 << t) != 0) {
            let Some(t_core) = core_of(t) else { continue };
            let Some(t_status) = launches[t].as_ref().map(Launch::status_frame) else { continue };
            if let Some(l) = launches[i].as_mut() {
                l.targets[l.target_count] = (t_core as u16, t as u16);
                l.target_status[l.target_count] = t_status;
                l.target_count += 1;
            }
            if let Some(tl) = launches[t].as_mut() {
                tl.controllers |= 1u64 << ctl_core;
            }
        }
    }
    // Host control: every guest's controllers include the host, whose channel the lowest
    // core given a guest serves (it always serves its inbox, whatever its guest does).
    // The host's identity is core index `HOST`: a machine of 64 cores has none.
    let host_core = launches.iter().flatten().map(|l| l.entry.core as usize).min();
    let host_on = opts.host_control && cores.len() <= crate::caps::control::HOST;
    if opts.host_control && !host_on {
        log::warn!("host control needs at most 63 cores: off");
    }
    if let Some(core) = host_core {
        let mut targets = [None; config::MAX_GUESTS];
        for (i, (t, g)) in targets.iter_mut().zip(plan.guests[..plan.count].iter()).enumerate() {
            *t = g.map(|g| crate::hostctl::Target {
                name: g.name,
                core: match g.slot {
                    Ok(s) if launches[i].is_some() => Ok(s as u16),
                    Ok(_) => Err("the guest was not started (no memory for it)"),
                    Err(why) => Err(why),
                },
            });
        }
        crate::hostctl::configure(crate::hostctl::Config { core, enabled: host_on, targets });
        if host_on {
            for l in launches.iter_mut().flatten() {
                l.controllers |= 1u64 << crate::caps::control::HOST;
            }
        }
    }
    // Each status page reads as zeroes until its guest's core first writes it (a
    // controller may map and read it before that).
    for l in launches.iter().flatten() {
        // The last frame of a private region just carved for this guest, not yet handed to
        // its core; identity-mapped.
        // SAFETY: so only the BSP touches it now.
        unsafe { (l.status_frame() as *mut u8).write_bytes(0, 4096) };
    }
    // Core membership starts from the cores given a guest: every core computes the same
    // view 0 from its launch.
    let members = launches.iter().flatten().fold(0u64, |a, l| a | 1 << l.entry.core);
    for l in launches.iter_mut().flatten() {
        l.members = members;
    }
    for (k, c) in cfg.channels().enumerate() {
        let size = channel::channel_bytes(c.slots);
        let Some(hpa) = mem.alloc(size, 4096) else {
            log::warn!("channel {k}: no memory for its rings: not created");
            continue;
        };
        // Zero is the empty ring.
        // SAFETY: just allocated from usable RAM no one else owns, identity-mapped.
        unsafe { (hpa as *mut u8).write_bytes(0, size as usize) };
        let ring = channel::ring_pages_bytes(c.slots);
        let window = vmcall_proto::guest::channel_window(k as u32);
        let apic_of = |g: u16| {
            plan.guests[g as usize].and_then(|p| p.slot.ok()).map(|s| cores.cores()[s].apic_id)
        };
        for (me, peer, tx, rx) in [(c.a, c.b, 0, ring), (c.b, c.a, ring, 0)] {
            let peer_apic = if launches[peer as usize].is_some() { apic_of(peer) } else { None };
            let peer_core = if launches[peer as usize].is_some() {
                plan.guests[peer as usize].and_then(|p| p.slot.ok()).map(|s| s as u16)
            } else {
                None
            };
            let Some(l) = launches[me as usize].as_mut() else { continue };
            if l.channel_count == vmcall_proto::guest::MAX_CHANNELS_PER_GUEST {
                log::warn!(
                    "guest {}: more than {} channels; channel {k} left out",
                    me,
                    l.channel_count
                );
                continue;
            }
            l.channels[l.channel_count] = ChanMap {
                desc: ChannelDesc {
                    name: c.name,
                    peer: peer as u32,
                    slots: c.slots,
                    tx_gpa: window + tx,
                    rx_gpa: window + rx,
                    index: k as u32,
                    _reserved: [0; 4],
                },
                hpa,
                size,
                peer_apic,
                peer_core,
            };
            l.channel_count += 1;
        }
        plan.channels[k] = Some(ChanInfo { name: c.name, a: c.a, b: c.b, hpa, slots: c.slots });
        plan.channel_count = k + 1;
    }
    for (k, gr) in cfg.grants().enumerate() {
        let size = gr.memory_mib as u64 * (1 << 20);
        let Some(l) = launches[gr.guest as usize].as_mut() else { continue };
        if l.grant_count == crate::instance::MAX_GRANTS_PER_GUEST {
            log::warn!(
                "grant {k}: guest {} already has {} grants; left out",
                gr.guest,
                l.grant_count
            );
            continue;
        }
        let Some(base) = mem.alloc(size, ALIGN_2M) else {
            log::warn!("grant {k}: no {} MiB of memory left: not granted", gr.memory_mib);
            continue;
        };
        // A grant must not leak a previous owner's data.
        // SAFETY: just allocated from usable RAM nobody else owns, identity-mapped.
        unsafe { (base as *mut u8).write_bytes(0, size as usize) };
        l.grants[l.grant_count] = (base, size);
        l.grant_count += 1;
    }
    for l in launches.iter().flatten() {
        smp::post_launch(l.entry.core as usize, *l);
    }
    Ok(Some(PLAN.call_once(|| plan)))
}

struct Why(StopReason);

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether some guest that can still report has not yet: its core is up in VMX operation
/// and the collection's deadline has not passed.
/// `fenced`: the cores the BSP's membership view fenced (they will never report).
pub fn pending(fenced: u64) -> bool {
    PLAN.get().is_some_and(|plan| {
        arch::rdtsc() < plan.give_up_tsc
            && plan.guests[..plan.count].iter().flatten().any(|g| {
                g.slot.is_ok_and(|s| {
                    fenced & (1 << s) == 0
                        && smp::mailbox(s).read().vmx_on
                        && smp::report_of(s).is_none()
                })
            })
    })
}

/// Waits (bounded) for every running guest's report, prints one record per guest and a
/// summary. Returns whether every guest exited with status 0.
pub fn collect(plan: &Plan, fenced: u64) -> bool {
    // A guest runs at most its budget plus as much again of time its core spent serving
    // other cores (see instance::run), each incarnation.
    let deadline = arch::tsc::deadline_us((plan.life_ms + 2_000) * 1000);
    let guests = || plan.guests[..plan.count].iter().flatten();
    while guests()
        .any(|g| g.slot.is_ok_and(|s| fenced & (1 << s) == 0 && smp::report_of(s).is_none()))
        && arch::rdtsc() < deadline
    {
        arch::pause();
    }
    let mut all_ok = true;
    log::info!("guest summary:");
    for (i, g) in guests().enumerate() {
        let name = vmcall_proto::fixed::get(&g.name).unwrap_or("?");
        let report = g.slot.ok().and_then(smp::report_of);
        match (g.slot, report) {
            (Ok(_), Some(r)) => {
                let (state, status) = match r.ending {
                    Ending::Exited(s) => (guest_state::EXITED, s),
                    Ending::Stopped(StopReason::RunEnded) => (guest_state::ENDED, 0),
                    Ending::Stopped(_) => (guest_state::STOPPED, 0),
                };
                all_ok &=
                    matches!(r.ending, Ending::Exited(0) | Ending::Stopped(StopReason::RunEnded));
                let fault = match r.ending {
                    Ending::Stopped(StopReason::RunEnded) => None,
                    Ending::Stopped(why) => Some(Why(why)),
                    Ending::Exited(_) => None,
                };
                log::info!(
                    "  {name:<12} core {:<2} {state:<8} status {status:<4} exits: {}{}",
                    g.core,
                    Exits(r),
                    CommaWhy(fault.as_ref())
                );
                record!(
                    kind::GUEST,
                    "index={i} name={name} core={} state={state} exit_status={status} exits={} fault={} hypercalls={} tsc_first_entry={} tsc_end={} xmsgs={} nmis={} requests_from={} cap_refused={} foreign_tsc={} fenced={} incarnations={} revoke_tsc={} away_tsc={} rv_sent={} rv_received={} rv_mc_named={} rv_mc_served={} rv_mc_taken={} rv_exits={} rv_own={} rv_rounds={} mb_pings_sent={} mb_pings_received={} mb_pongs_sent={} mb_pongs_received={} mb_probe_exits={} mb_unattributed={}",
                    g.core,
                    Quoted(Exits(r)),
                    Quoted(OptWhy(fault.as_ref())),
                    r.hypercalls,
                    r.tsc_first_entry,
                    r.tsc_end,
                    r.xmsgs,
                    r.nmis,
                    Quoted(PerPeer(&r.caps.requests_from)),
                    r.caps.refused,
                    r.foreign_tsc,
                    Quoted(Fenced(r.caps.fenced)),
                    r.incarnations,
                    r.caps.revoke_tsc,
                    r.longest_away,
                    r.caps.revoke.sent,
                    r.caps.revoke.received,
                    r.caps.revoke.mc_named,
                    r.caps.revoke.mc_served,
                    r.caps.revoke.mc_taken,
                    r.caps.revoke.exits,
                    r.caps.revoke.own,
                    r.caps.revoke.rounds,
                    r.caps.probes.pings_sent,
                    r.caps.probes.pings_received,
                    r.caps.probes.pongs_sent,
                    r.caps.probes.pongs_received,
                    r.caps.probes.exits,
                    r.caps.probes.unattributed
                );
            }
            // A core that came up and was fenced later (one that never came up is reported
            // as such below, even though the others fence it too).
            (Ok(s), None) if fenced & (1 << s) != 0 && smp::mailbox(s).read().vmx_on => {
                all_ok = false;
                let why = "its core stopped answering and was fenced out of the view";
                log::info!("  {name:<12} core {:<2} fenced: {why}", g.core);
                record!(
                    kind::GUEST,
                    "index={i} name={name} core={} state={} exit_status=0 exits=\"\" fault={} hypercalls=0 tsc_first_entry=0 tsc_end=0",
                    g.core,
                    guest_state::FENCED,
                    Quoted(why)
                );
            }
            (slot, _) => {
                all_ok = false;
                let why = match slot {
                    Err(why) => why,
                    Ok(s) if !smp::mailbox(s).read().vmx_on => {
                        "its core did not come up in VMX operation"
                    }
                    Ok(_) => "its core never reported back",
                };
                log::info!("  {name:<12} core {:<2} not started: {why}", g.core);
                record!(
                    kind::GUEST,
                    "index={i} name={name} core={} state={} exit_status=0 exits=\"\" fault={} hypercalls=0 tsc_first_entry=0 tsc_end=0",
                    g.core,
                    guest_state::NOT_STARTED,
                    Quoted(why)
                );
            }
        }
    }
    for c in plan.channels[..plan.channel_count].iter().flatten() {
        report_channel(plan, c);
    }
    all_ok
}

/// Prints a channel's counters as its two guests left them in the ring headers: values a
/// guest wrote, so reported, not trusted.
fn report_channel(plan: &Plan, c: &ChanInfo) {
    let ring = channel::ring_pages_bytes(c.slots);
    // The guests that wrote them have ended (their reports are in). Reads only.
    // SAFETY: the rings were allocated and zeroed by this BSP and stay mapped.
    let (ab, ba) = unsafe {
        (
            channel::Ring::from_raw(c.hpa as *mut u8, c.slots),
            channel::Ring::from_raw((c.hpa + ring) as *mut u8, c.slots),
        )
    };
    let name_of = |g: u16| {
        plan.guests[g as usize]
            .as_ref()
            .and_then(|p| vmcall_proto::fixed::get(&p.name))
            .unwrap_or("?")
    };
    record!(
        kind::CHANNEL,
        "name={} a={} b={} slots={} a_sent={} b_received={} b_sent={} a_received={}",
        vmcall_proto::fixed::get(&c.name).unwrap_or("?"),
        name_of(c.a),
        name_of(c.b),
        c.slots,
        ab.sent(),
        ab.received(),
        ba.sent(),
        ba.received()
    );
}

/// Per-core counters as `core:count` words, zeros left out.
struct PerPeer<'a>(&'a [u32]);
impl fmt::Display for PerPeer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (core, n) in self.0.iter().enumerate().filter(|(_, n)| **n > 0) {
            write!(f, "{sep}{core}:{n}")?;
            sep = " ";
        }
        Ok(())
    }
}

/// A core bitmask as the list of its core indices.
struct Fenced(u64);
impl fmt::Display for Fenced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for core in (0..64).filter(|c| self.0 & (1 << c) != 0) {
            write!(f, "{sep}{core}")?;
            sep = " ";
        }
        Ok(())
    }
}

struct OptWhy<'a>(Option<&'a Why>);
impl fmt::Display for OptWhy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(w) => write!(f, "{w}"),
            None => Ok(()),
        }
    }
}

struct CommaWhy<'a>(Option<&'a Why>);
impl fmt::Display for CommaWhy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(w) => write!(f, "; stopped: {w}"),
            None => Ok(()),
        }
    }
}
