// SPDX-License-Identifier: MIT OR Apache-2.0
//! What a core tells about its guest: the report of an incarnation, its telemetry in the
//! status page, its records (incarnation, stats, membership views).
//!
//! Owns nothing. May call: `exits` (the counters), `telemetry`, `caps` (its stats), `arch`
//! (TSC, NMI count), the record macro.

use super::*;
use crate::arch::{self};
use crate::exits::GuestCtx;
use vmcall_proto::guest::*;

pub(super) fn report(ctx: &GuestCtx, ending: Ending, first: u64) -> GuestReport {
    GuestReport::of(&ctx.counters, ending, ctx.caps.stats, first, arch::rdtsc())
}

/// The counters `COUNTER` reads, from an incarnation's report.
pub(super) fn counters_of(r: &GuestReport) -> [u64; 3] {
    let exits = r.exits.iter().map(|&e| u64::from(e)).sum::<u64>() + u64::from(r.exits_other);
    [exits, u64::from(r.hypercalls), r.doorbells]
}

/// Logs the membership views this core installed since the last call.
pub(super) fn log_views(caps: &mut crate::caps::HvCaps, core: u32) {
    use vmcall_proto::record::{kind, Quoted};
    let suspected = core::mem::take(&mut caps.suspected_unlogged);
    for target in (0..64).filter(|c| suspected & (1 << c) != 0) {
        crate::record!(kind::SUSPECT, "core={core} target={target} tsc={}", arch::rdtsc());
    }
    if caps.members.take_self_fenced() {
        log::warn!(
            "core {core}: back from an absence of its own, no answer since: takes itself for \
             fenced (it may have been, and must not take out the core that did)"
        );
    }
    while let Some(ch) = caps.members.take_change() {
        let (gone, new) = (ch.old.set & !ch.new.set, ch.new.set & !ch.old.set);
        log::info!(
            "membership view {}: cores {} (out: {}, in: {}; coordinated by core {})",
            ch.new.num,
            CoreSet(ch.new.set),
            CoreSet(gone),
            CoreSet(new),
            ch.by
        );
        crate::record!(
            kind::VIEW,
            "core={core} num={} members={} by={} tsc={}",
            ch.new.num,
            Quoted(CoreSet(ch.new.set)),
            ch.by,
            arch::rdtsc()
        );
        // What this core did for the changes up to this view: complete now (see
        // `caps::mcount`); a change skipped here (installed with a later one) has its own.
        while let Some(v) = caps.views.take_upto(ch.new.num) {
            log_change(&v, core, v.num == ch.new.num);
        }
    }
}

/// Logs the view changes this core counted messages of and has not installed (when its
/// guest is down for good, and at its end); a later record of the same change (its core
/// counted more, then installed it) adds to this one.
pub(super) fn log_open_changes(caps: &mut crate::caps::HvCaps, core: u32) {
    while let Some(v) = caps.views.take_any() {
        log_change(&v, core, false);
    }
}

/// One view change's record (`vchange`): what this core sent and handled for it.
fn log_change(v: &crate::caps::mcount::ViewCounts, core: u32, installed: bool) {
    use crate::caps::mcount::Kinds;
    use vmcall_proto::record::{kind, Quoted};
    crate::record!(
        kind::VCHANGE,
        "core={core} num={} installed={} sent={} received={} rounds={} exits={} tsc_first={} tsc_last={}",
        v.num,
        installed as u8,
        Quoted(Kinds(&v.sent)),
        Quoted(Kinds(&v.received)),
        v.rounds,
        v.exits,
        v.first,
        v.last
    );
}

/// Core indices of a set, space-separated.
pub(super) struct CoreSet(pub(super) u64);

impl core::fmt::Display for CoreSet {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut first = true;
        for c in (0..64).filter(|c| self.0 & (1 << c) != 0) {
            if !first {
                f.write_str(" ")?;
            }
            write!(f, "{c}")?;
            first = false;
        }
        Ok(())
    }
}

/// A channel's counters across incarnations: messages lost to resets, resets.
#[derive(Clone, Copy, Default)]
pub(super) struct LinkCount {
    pub(super) lost: u64,
    pub(super) resets: u64,
}

/// Brings the status page at `page` up to date with what this core knows of the
/// channels' peers.
pub(super) fn publish_links(
    page: u64,
    l: &Launch,
    caps: &mut crate::caps::HvCaps,
    counts: &[LinkCount; MAX_CHANNELS_PER_GUEST],
) {
    let n = caps.incarnation();
    for (pos, count) in counts.iter().enumerate().take(l.channel_count) {
        let Some(link) = caps.take_link(pos) else { continue };
        // A frame of this core's private region, identity-mapped; the guest maps it
        // read-only and is not running now.
        // SAFETY: `page` is that frame; a StatusPage is exactly one page of u64s.
        let sp = unsafe { &mut *(page as *mut StatusPage) };
        let ls = &mut sp.links[pos];
        ls.word = link_word(link.peer_up, link.epoch(n));
        ls.lost = count.lost;
        ls.resets = count.resets;
    }
}

/// Brings the telemetry in the status page at `page` up to date before a VM entry:
/// `reason` is the exit just handled (its counter is the only one that moved),
/// `hv_ticks` the hypervisor's time since that exit. A dozen stores per entry.
pub(super) fn publish_telemetry(page: u64, ctx: &GuestCtx, hv_ticks: u64, reason: Option<u16>) {
    // A frame of this core's private region, identity-mapped, read-only to the guest,
    // which is not running now.
    // SAFETY: `page` is that frame; a StatusPage is exactly one page of u64s.
    let t = unsafe { &mut (*(page as *mut StatusPage)).telemetry };
    project_telemetry_after(&ctx.counters, t, reason);
    t.entries += 1;
    t.hypervisor_tsc = t.hypervisor_tsc.saturating_add(hv_ticks);
    t.nmis = arch::nmis_taken();
}

/// Brings every counter of the telemetry up to date once an incarnation is over (the
/// exit that ended it included), `hv_ticks` the hypervisor's time since that exit. Not
/// an entry: `entries` stays.
pub(super) fn publish_final(page: u64, ctx: &GuestCtx, hv_ticks: u64) {
    // SAFETY: as in `publish_telemetry`; the guest no longer runs.
    let t = unsafe { &mut (*(page as *mut StatusPage)).telemetry };
    project_telemetry(&ctx.counters, t);
    t.hypervisor_tsc = t.hypervisor_tsc.saturating_add(hv_ticks);
    t.nmis = arch::nmis_taken();
}

/// Copies the channels' message counts into the status page at `page` (see
/// `telemetry::Traffic`).
#[cold]
#[inline(never)]
pub(super) fn refresh_traffic(traffic: &mut telemetry::Traffic, page: u64, now: u64) {
    // The page is a frame of this core's private region, identity-mapped; the rings were
    // allocated by the BSP for the whole run, identity-mapped, accessed atomically.
    // SAFETY: so both `Traffic::refresh`'s condition and the reference hold.
    unsafe { traffic.refresh(&mut *(page as *mut StatusPage), now) };
}

/// An incarnation's start: TSC when its setup began, private frames and live caps when
/// it was first entered (equal for every incarnation unless something leaks).
#[derive(Clone, Copy)]
pub(super) struct Start {
    pub(super) tsc: u64,
    pub(super) frames: u64,
    pub(super) caps: usize,
}

/// One incarnation's record (see `vmcall_proto::record::kind::INCARNATION`), written in
/// one stretch (a setup that failed: nothing was mapped, no inbox to serve yet).
pub(super) fn incarnation_record(
    l: &Launch,
    n: u32,
    r: &GuestReport,
    start: Start,
    retired: &crate::caps::Retired,
    links: LinkCount,
) {
    incarnation_record_in_parts(l, n, r, start, retired, links, &mut || {});
}

/// One incarnation's record, formatted in parts with `serve` called between two (the
/// inbox served): one line, queued whole at the end. Formatting it at once was the
/// longest segment of a death (14,000-24,000 instructions in Bochs, most of it the exit
/// counts and the twenty numbers); each part is a few thousand.
pub(super) fn incarnation_record_in_parts(
    l: &Launch,
    n: u32,
    r: &GuestReport,
    start: Start,
    retired: &crate::caps::Retired,
    links: LinkCount,
    serve: &mut dyn FnMut(),
) {
    use core::fmt::Write as _;
    use vmcall_proto::record::Quoted;
    let Start { tsc: tsc_start, frames, caps: caps_live } = start;
    let (ending, status, fault) = match r.ending {
        Ending::Exited(s) => ("exited", s, None),
        Ending::Stopped(why) => ("stopped", 0, Some(why)),
    };
    // A part that does not fit is cut with the line (`console::MAX_LINE`), as one
    // `record!` would be: the writes cannot fail otherwise.
    let mut line = crate::console::Staged::record(vmcall_proto::record::kind::INCARNATION);
    let _ = write!(
        line,
        "guest={} n={n} ending={ending} exit_status={status} fault={}",
        name(l),
        Quoted(OptFault(fault))
    );
    serve();
    let _ = write!(
        line,
        " tsc_start={tsc_start} tsc_first_entry={} tsc_end={} frames_at_start={frames}",
        r.tsc_first_entry, r.tsc_end
    );
    serve();
    let _ = write!(
        line,
        " caps_revoked={} caps_unconfirmed={} caps_dropped={} caps_live={caps_live} link_resets={} link_lost={}",
        retired.revoked, retired.unconfirmed, retired.dropped, links.resets, links.lost
    );
    serve();
    let _ = write!(line, " exits={}", Quoted(Exits(r)));
    serve();
    let _ = write!(line, " hypercalls={}", r.hypercalls);
    line.commit();
}

/// The live figures of a running incarnation (see `vmcall_proto::record::kind::STATS`):
/// its exits and hypercalls so far, and each channel's messages as its status page
/// last copied them.
#[cold]
#[inline(never)]
pub(super) fn stats_record(l: &Launch, n: u32, core: u32, r: &GuestReport, page: u64, now: u64) {
    // A frame of this core's private region, identity-mapped, read-only to the guest,
    // which is not running now.
    // SAFETY: `page` is that frame; a StatusPage is exactly one page of u64s.
    let page = unsafe { &*(page as *const StatusPage) };
    struct Traffic<'a>(&'a Launch, &'a StatusPage);
    impl core::fmt::Display for Traffic<'_> {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            for (i, (c, t)) in self.0.channels().iter().zip(&self.1.traffic).enumerate() {
                let name = vmcall_proto::fixed::get(&c.desc.name).unwrap_or("?");
                let sep = if i > 0 { " " } else { "" };
                write!(f, "{sep}{name}:{}:{}", t.sent, t.received)?;
            }
            Ok(())
        }
    }
    crate::record!(
        vmcall_proto::record::kind::STATS,
        "guest={} n={n} core={core} tsc={now} exits={} hypercalls={} traffic={}",
        name(l),
        vmcall_proto::record::Quoted(Exits(r)),
        r.hypercalls,
        vmcall_proto::record::Quoted(Traffic(l, page))
    );
}

pub(super) struct OptFault(pub(super) Option<StopReason>);

impl core::fmt::Display for OptFault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(w) => w.fmt(f),
            None => Ok(()),
        }
    }
}
