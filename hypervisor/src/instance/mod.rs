// SPDX-License-Identifier: MIT OR Apache-2.0
//! The per-core hypervisor instance: one guest on one core, its partition, EPT and vCPU (a
//! VMCS on VT-x), the loop that runs it, its lifecycle, and the messages between instances.
//!
//! The BSP decides at boot which guest goes where and posts each core a [`Launch`] message
//! (partition and private frames carved from the memory map). From then on everything here
//! runs on the guest's own core, on memory only that core touches: the core zeroes its
//! partition, loads the kernel ELF, writes the boot-info and boot page tables, builds the
//! EPT and the vCPU's control structure in its private region, and runs the guest until it exits or is stopped. The
//! result goes back as a [`GuestReport`] message.
//!
//! The parts, in the order a guest meets them: `run` (the guest across its incarnations:
//! does what the [`lifecycle`] says, waits while the guest is down, serves the other cores
//! once it is gone), `prepare` (one incarnation's setup, step by step: capabilities,
//! partition and kernel ([`loader`]), boot info, EPT, devices, status page, the backend's
//! vCPU), `live` (the running incarnation: each turn looks at the inbox, arms the entry,
//! enters, and hands the exit to `exits`, nothing else), `death` (the clean death's steps,
//! in the lifecycle's order); beside them [`lifecycle`] (what happens to the guest, a pure
//! state machine, host-tested), `setup` (the guest across incarnations, partition, frames,
//! devices quiesced, rings reset, leaving and rejoining the view), `vcpu` (the guest's
//! vCPU: `exits::Vcpu` and `caps::Env` over the backend's `vcpu::Vcpu`), `account`
//! (reports, telemetry, records), [`telemetry`] (the status page's traffic, controllers'
//! windows), [`xcore`] (the inter-core transport).
//!
//! Owns: each core's guest, its capability state and private frames, the inter-core rings.
//! May call: `exits` (the exit handlers), `fastexit`, `caps` and `members` (through `caps`),
//! `ept`, `vcpu` (the backend, only through its trait), `arch`, `pci`, `percpu`, `trace`,
//! `console`, `hostctl`, `vmcall_proto`. Called by `smp` (a core's launch, naming the
//! backend) and `guests` (the BSP's plan and collection).

pub mod lifecycle;
pub mod loader;
pub mod telemetry;
pub mod xcore;

use crate::ept;
use crate::exits::{Counters, StopReason};
use crate::vcpu::EXIT_CODES;
use vmcall_proto::guest::Telemetry;

/// What the BSP tells a core: run this guest here.
#[derive(Clone, Copy, Debug)]
pub struct Launch {
    pub guest_id: u32,
    pub entry: vmcall_proto::config::GuestEntry,
    /// Host-physical partition: guest-physical 0 maps here.
    pub partition: u64,
    pub partition_size: u64,
    /// Host-physical region for this core's EPT tables, VMCS and bitmaps.
    pub private: u64,
    pub private_size: u64,
    /// The guest kernel ELF (a multiboot2 module; read-only, shared by all cores).
    pub kernel: (u64, u64),
    pub watchdog_ms: u64,
    /// The capability protocol's deadline per level.
    pub caps_deadline_ms: u64,
    /// How this core's revokes reach the holders (`revoke=`, `revoke_fanout=`).
    pub revoke: crate::caps::Revoke,
    /// Fault injection: this core never answers capability revokes
    /// (`inject=deaf-core:N`).
    pub deaf: bool,
    /// Fault injection: this core serves no inbox for `deaf_ms` milliseconds from
    /// `deaf_after_ms` into its guest's first run, its guest running on
    /// (`inject=deaf-core:N:MS:AFTER`; 0: never).
    pub deaf_ms: u64,
    pub deaf_after_ms: u64,
    /// Fault injection: this core's hypervisor hangs 20 ms into its guest's first run
    /// (`inject=hung-core:N`).
    pub hang: bool,
    /// Core membership: the cores of view 0 (those given a guest) and the failure
    /// detector's probe period in milliseconds.
    pub members: u64,
    pub probe_ms: u64,
    /// Live figures: a `stats` record at most every this many milliseconds, at the
    /// membership's probes (0: none).
    pub stats_ms: u64,
    /// The guest's channels, in boot-info order.
    pub channels: [ChanMap; vmcall_proto::guest::MAX_CHANNELS_PER_GUEST],
    pub channel_count: usize,
    /// Memory granted by the config (`[[grant]]`): host-physical base and size, zeroed.
    /// Each becomes a memory capability (read, write, grant) in slot order.
    pub grants: [(u64, u64); MAX_GRANTS_PER_GUEST],
    pub grant_count: usize,
    /// Guests this one controls (`[[control]]`) that run: (core, guest index), each a
    /// guest-control capability after the endpoints.
    pub targets: [(u16, u16); vmcall_proto::config::MAX_GUESTS],
    pub target_count: usize,
    /// Each target's status frame ([`Launch::status_frame`] of its launch), mapped
    /// read-only into this guest at `vmcall_proto::guest::target_status(i)`.
    pub target_status: [u64; vmcall_proto::config::MAX_GUESTS],
    /// Cores of the guests that control this one (their requests are served, no one
    /// else's; it is reported once all of them have let go).
    pub controllers: u64,
    /// TSC past which a guest that is down stops waiting for its controllers (the BSP's
    /// collection gives up then).
    pub give_up_tsc: u64,
    /// TSC at which the run's length is over (`duration_ms`; `u64::MAX`: none): a guest
    /// still running is stopped then and not started again.
    pub end_tsc: u64,
    /// The PCI functions the guest owns (`pci::assign`), config order.
    pub devices: crate::pci::Assigned,
}

// The inter-core rings hold every message the protocols over them may have in flight at
// once (their flow control's bound), so a send never finds a ring full.
const _: () = assert!(crate::caps::proto::RING_SLOTS <= xcore::SLOTS);

/// Grants one guest can receive from the config (checked in the blob).
pub use vmcall_proto::config::MAX_GRANTS_PER_GUEST;

/// One channel endpoint: what the guest is told, and where its window's memory is.
#[derive(Clone, Copy, Debug)]
pub struct ChanMap {
    pub desc: vmcall_proto::guest::ChannelDesc,
    /// Host-physical base of the channel's two rings (mapped at `channel_window(index)`).
    pub hpa: u64,
    pub size: u64,
    /// The peer's core APIC id, when the peer runs (doorbells go there).
    pub peer_apic: Option<u32>,
    /// The peer's core index, when the peer runs (capability transfers go there).
    pub peer_core: Option<u16>,
}

impl Launch {
    pub fn channels(&self) -> &[ChanMap] {
        &self.channels[..self.channel_count]
    }

    /// The guest's status page: the last frame of its private region, the same frame for
    /// every incarnation (its controllers map it once, and it stays valid across restarts).
    /// The frame pool of an incarnation ends below it.
    pub fn status_frame(&self) -> u64 {
        self.private + self.private_size - 4096
    }
}

/// How a guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    Exited(u64),
    Stopped(StopReason),
}

/// What a core tells the BSP when its guest is over.
#[derive(Clone, Copy, Debug)]
pub struct GuestReport {
    pub ending: Ending,
    pub exits: [u32; EXIT_CODES],
    pub exits_other: u32,
    pub hypercalls: u32,
    /// Doorbells it rang.
    pub doorbells: u64,
    /// TSC at the first VM entry (0 if never entered).
    pub tsc_first_entry: u64,
    pub tsc_end: u64,
    /// Inter-core messages and NMI kicks this core sent while running the guest.
    pub xmsgs: u64,
    pub nmis: u64,
    /// The capability system's counters (requests per peer, refusals, fences).
    pub caps: crate::caps::Stats,
    /// TSC ticks spent serving other cores while the guest ran.
    pub foreign_tsc: u64,
    /// How many times the guest was started (1 + restarts).
    pub incarnations: u32,
    /// Revokes of its caps some core did not confirm at its (last) death.
    pub unconfirmed: u32,
    /// The longest stretch its core spent in the hypervisor without serving the inbox, in
    /// TSC ticks, up to the report (see `percpu::PerCore::served`).
    pub longest_away: u64,
}

/// A report's VM exits as `reason:count` words, zeros left out (the records' `exits`).
pub struct Exits<'a>(pub &'a GuestReport);

impl core::fmt::Display for Exits<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut first = true;
        let names = crate::vcpu::EXIT_NAMES.iter();
        for (n, c) in names.zip(self.0.exits.iter()).filter(|(_, c)| **c > 0) {
            write!(f, "{}{n}:{c}", if first { "" } else { " " })?;
            first = false;
        }
        if self.0.exits_other > 0 {
            write!(f, "{}other:{}", if first { "" } else { " " }, self.0.exits_other)?;
        }
        Ok(())
    }
}

impl GuestReport {
    /// The report's projection of an incarnation's counters `c` (the one copy, in the
    /// guest's context): ending, capability stats and times beside them; the figures only
    /// the BSP's collection adds (messages, NMIs, restarts, unconfirmed revokes, time away)
    /// start at their one-incarnation values.
    pub fn of(
        c: &Counters,
        ending: Ending,
        caps: crate::caps::Stats,
        tsc_first_entry: u64,
        tsc_end: u64,
    ) -> GuestReport {
        GuestReport {
            ending,
            exits: c.exits,
            exits_other: c.exits_other,
            hypercalls: c.hypercalls,
            doorbells: u64::from(c.doorbells_rung),
            tsc_first_entry,
            tsc_end,
            xmsgs: 0,
            nmis: 0,
            caps,
            foreign_tsc: c.foreign_tsc,
            incarnations: 1,
            unconfirmed: 0,
            longest_away: 0,
        }
    }

    /// Adds a later incarnation: its ending and end time, every counter summed.
    pub fn absorb(&mut self, later: &GuestReport) {
        self.ending = later.ending;
        for (a, b) in self.exits.iter_mut().zip(later.exits) {
            *a = a.saturating_add(b);
        }
        self.exits_other = self.exits_other.saturating_add(later.exits_other);
        self.hypercalls = self.hypercalls.saturating_add(later.hypercalls);
        self.doorbells = self.doorbells.saturating_add(later.doorbells);
        if self.tsc_first_entry == 0 {
            self.tsc_first_entry = later.tsc_first_entry;
        }
        self.tsc_end = later.tsc_end;
        self.caps = later.caps;
        self.foreign_tsc = self.foreign_tsc.saturating_add(later.foreign_tsc);
        self.incarnations += 1;
        self.unconfirmed = later.unconfirmed;
        self.longest_away = self.longest_away.max(later.longest_away);
    }
}

/// The telemetry page's projection of the counters `c`: every guest counter in `t` (its
/// `entries`, `hypervisor_tsc` and `nmis` are the hypervisor's and stay).
pub fn project_telemetry(c: &Counters, t: &mut Telemetry) {
    for (p, &n) in t.exits.iter_mut().zip(&c.exits) {
        *p = u64::from(n);
    }
    t.exits_other = u64::from(c.exits_other);
    t.hypercalls = u64::from(c.hypercalls);
    t.doorbells = u64::from(c.doorbells_rung);
}

/// The same projection brought up to date when only the counter of exit `reason` (if
/// any) and the hypercall and doorbell counters moved: a few stores per VM entry.
#[inline(always)]
pub fn project_telemetry_after(c: &Counters, t: &mut Telemetry, reason: Option<u16>) {
    match reason.map(usize::from) {
        Some(r) if r < t.exits.len() && r < c.exits.len() => t.exits[r] = u64::from(c.exits[r]),
        Some(_) => t.exits_other = u64::from(c.exits_other),
        None => {}
    }
    t.hypercalls = u64::from(c.hypercalls);
    t.doorbells = u64::from(c.doorbells_rung);
}

/// The guest's name as text.
pub fn name(l: &Launch) -> &str {
    vmcall_proto::fixed::get(&l.entry.name).unwrap_or("?")
}

/// Builds a guest's EPT in `f`: the partition `[base, base + size)` read-write-execute at
/// guest-physical 0, then each channel window `(gpa, hpa, size)` read-write and never
/// executable (W^X: memory another guest writes must not become code here). Then checks
/// what it built (the isolation self-check): exactly the partition and the windows are
/// mapped, each at its base and with its permissions, nothing past the partition's end.
/// Returns the root table.
pub fn build_ept(
    f: &mut impl ept::Frames,
    base: u64,
    size: u64,
    windows: impl Iterator<Item = (u64, u64, u64)> + Clone,
    between: &mut dyn FnMut(),
) -> Result<u64, &'static str> {
    const FAILED: &str = "EPT construction failed";
    let root = ept::new_root(f).map_err(|_| FAILED)?;
    ept::map(f, root, 0, base, size).map_err(|_| FAILED)?;
    between();
    for (gpa, hpa, len) in windows.clone() {
        ept::map_with(f, root, gpa, hpa, len, ept::Perm::ReadWrite)
            .map_err(|_| "channel window mapping failed")?;
        between();
    }
    // The grant window's directories, built now and kept: a 2-MiB cap_map there writes one
    // entry, the first time as every time.
    let (wstart, wend) = vmcall_proto::hypercall::GRANT_WINDOW;
    ept::prebuild(f, root, wstart, wend - wstart).map_err(|_| FAILED)?;
    between();
    let rw = ept::Perm::ReadWrite.bits();
    let rwx = ept::Perm::ReadWriteExecute.bits();
    let mut ok = ept::translate_perm(f, root, 0) == Some((base, rwx))
        && ept::translate_perm(f, root, size - 1) == Some((base + size - 1, rwx))
        && ept::translate(f, root, size).is_none();
    let mut total = size;
    for (gpa, hpa, len) in windows {
        ok &= ept::translate_perm(f, root, gpa) == Some((hpa, rw))
            && ept::translate_perm(f, root, gpa + len - 1) == Some((hpa + len - 1, rw));
        total += len;
    }
    if !ok || ept::mapped_bytes_with(f, root, between) != total {
        return Err("EPT self-check failed");
    }
    Ok(root)
}

#[cfg(target_os = "none")]
mod account;
#[cfg(target_os = "none")]
mod death;
#[cfg(target_os = "none")]
mod live;
#[cfg(target_os = "none")]
mod prepare;
#[cfg(target_os = "none")]
pub mod run;
#[cfg(target_os = "none")]
mod setup;
#[cfg(target_os = "none")]
mod vcpu;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ept::tests::host_frames;
    use vmcall_proto::guest::channel_window;

    #[test]
    fn channel_windows_are_read_write_never_executable() {
        let mut f = host_frames(64);
        let windows =
            [(channel_window(0), 0x9000_0000, 0x2000), (channel_window(3), 0x9100_0000, 0x4000)];
        let mut steps = 0;
        let root =
            build_ept(&mut f, 0x4000_0000, 16 << 20, windows.into_iter(), &mut || steps += 1)
                .unwrap();
        // The partition, each window, the grant window's directories, each directory
        // counted: the caller serves its inbox between.
        assert!(steps >= 4, "{steps}");
        for (gpa, hpa, len) in windows {
            for g in [gpa, gpa + len - 1] {
                let t = ept::translate_perm(&mut f, root, g);
                assert_eq!(t, Some((hpa + g - gpa, 3)), "window at {gpa:#x}: RW, no X");
            }
        }
        assert_eq!(ept::translate_perm(&mut f, root, 0x1234), Some((0x4000_1234, 7)));
        assert_eq!(ept::mapped_bytes(&mut f, root), (16 << 20) + 0x6000);
        // A window over the partition is refused, not merged.
        let bad = [(0x10_0000, 0x9000_0000, 0x1000)];
        let mut f = host_frames(64);
        assert_eq!(
            build_ept(&mut f, 0x4000_0000, 16 << 20, bad.into_iter(), &mut || {}),
            Err("channel window mapping failed")
        );
    }

    /// Counters with a history: every exit code, the codes past the page's table, each
    /// other counter, near and at saturation.
    fn busy_counters() -> Counters {
        let mut c = Counters::ZERO;
        for (i, e) in c.exits.iter_mut().enumerate() {
            *e = (i as u32).wrapping_mul(0x9e37_79b9) >> (i % 7);
        }
        c.exits[18] = u32::MAX;
        c.exits_other = 77;
        c.exits_total = c.exits.iter().map(|&e| u64::from(e)).sum::<u64>() + 77;
        c.hypercalls = u32::MAX - 1;
        c.doorbells_rung = 12345;
        c.foreign_tsc = 1 << 40;
        c
    }

    #[test]
    fn the_report_and_the_telemetry_page_agree_with_the_counters() {
        let c = busy_counters();
        let ending = Ending::Exited(3);
        let r = GuestReport::of(&c, ending, crate::caps::Stats::default(), 10, 20);
        // SAFETY: plain u64s, all-zero is valid.
        let mut t: Telemetry = unsafe { core::mem::zeroed() };
        t.entries = 5;
        t.hypervisor_tsc = 6;
        t.nmis = 7;
        project_telemetry(&c, &mut t);
        assert_eq!(r.exits, c.exits);
        assert_eq!(c.exits.len(), t.exits.len(), "the page shows every exit code");
        for (i, &e) in c.exits.iter().enumerate() {
            assert_eq!(t.exits[i], u64::from(e), "exit code {i}");
        }
        assert_eq!((r.exits_other, t.exits_other), (c.exits_other, u64::from(c.exits_other)));
        assert_eq!((r.hypercalls, t.hypercalls), (c.hypercalls, u64::from(c.hypercalls)));
        assert_eq!((r.doorbells, t.doorbells), (12345, 12345));
        assert_eq!(r.foreign_tsc, c.foreign_tsc);
        assert_eq!((r.ending, r.tsc_first_entry, r.tsc_end, r.incarnations), (ending, 10, 20, 1));
        // The two agree with each other: the report's exit total is the counters' total.
        let total = r.exits.iter().map(|&e| u64::from(e)).sum::<u64>() + u64::from(r.exits_other);
        assert_eq!(total, c.exits_total);
        assert_eq!(
            t.exits.iter().sum::<u64>() + t.exits_other,
            c.exits_total,
            "the page's exits add up to the same total"
        );
        // The hypervisor's own words are not the guest's counters.
        assert_eq!((t.entries, t.hypervisor_tsc, t.nmis), (5, 6, 7));
    }

    #[test]
    fn the_per_entry_projection_keeps_the_page_equal_to_the_full_one() {
        let (mut inc, mut full): (Telemetry, Telemetry) =
            // SAFETY: plain u64s, all-zero is valid.
            unsafe { (core::mem::zeroed(), core::mem::zeroed()) };
        let mut c = Counters::ZERO;
        let reasons = [Some(18u16), Some(10), None, Some(0), Some(69), Some(70), Some(u16::MAX)];
        for (k, &reason) in reasons.iter().cycle().take(100).enumerate() {
            // What an exit of `reason` moves: its counter (or the other exits), and maybe a
            // hypercall and a doorbell.
            match reason.map(usize::from) {
                Some(r) if r < c.exits.len() => c.exits[r] += 1,
                Some(_) => c.exits_other += 1,
                None => {}
            }
            c.exits_total += u64::from(reason.is_some());
            c.hypercalls += (k % 3 == 0) as u32;
            c.doorbells_rung += (k % 5 == 0) as u32;
            project_telemetry_after(&c, &mut inc, reason);
            project_telemetry(&c, &mut full);
            assert_eq!(inc.exits, full.exits, "after exit {reason:?}");
            assert_eq!(
                (inc.exits_other, inc.hypercalls, inc.doorbells),
                (full.exits_other, full.hypercalls, full.doorbells)
            );
        }
        assert_eq!(full.exits[18], 15);
        assert_eq!(full.exits_other, 28);
    }

    #[test]
    fn shared_memory_permissions_never_execute() {
        for p in [ept::Perm::Read, ept::Perm::ReadWrite] {
            assert_eq!(p.bits() & 4, 0, "{p:?}");
        }
        assert_eq!(ept::Perm::shared(false), ept::Perm::Read);
        assert_eq!(ept::Perm::shared(true), ept::Perm::ReadWrite);
    }
}
