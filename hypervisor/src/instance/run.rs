// SPDX-License-Identifier: MIT OR Apache-2.0
//! The run of this core's guest: [`run`] does what the guest's
//! [`lifecycle`](super::lifecycle) says, one incarnation after another (each one set up by
//! `prepare`, run until it is over by `live`, then its clean death by `death`), waits for
//! its controllers while it is down, and serves the other cores once it is gone.
//!
//! Owns the guest across its incarnations (`setup::Guest`). May call: the rest of
//! `instance`, `caps`, `members` (through `caps`), `percpu`, `arch`.

use super::account::*;
use super::death::Dying;
use super::lifecycle::{self, Cause, Effect, Effects, Event as Life, Lifecycle, Phase, Request};
use super::live::Live;
use super::prepare::prepare;
use super::setup::*;
use super::*;
use crate::arch;
use crate::caps::control::Control;
use crate::caps::HvCaps;
use crate::exits::GuestCtx;
use crate::instance::xcore::Link;
use vmcall_proto::guest::*;

/// Sets up and runs the guest of `l` on this core, again as its restart policy and its
/// controllers say (each time a new incarnation from the same kernel and config, after a
/// clean death of the last one), hands its report to `post` once it is down for good,
/// then keeps serving inter-core requests while `keep_serving` says so.
pub fn run<B: crate::vcpu::Vcpu>(
    l: &Launch,
    f: &B::Features,
    core: u32,
    post: impl FnOnce(GuestReport, &mut dyn FnMut()),
    keep_serving: impl Fn(u64) -> bool,
) -> u64 {
    let mut caps = this_cores_caps(l, core);
    let keep_serving = |caps: &HvCaps| keep_serving(caps.members.fenced());
    let mut link = Link::new(core as usize);
    let mut g = Guest::<B> {
        l,
        f,
        core,
        lc: Lifecycle::new(lifecycle::Policy {
            restart: lifecycle::Restart::from_config(l.entry.restart),
            max_restarts: u32::from(l.entry.max_restarts),
            controllers: l.controllers,
        }),
        counts: [LinkCount::default(); MAX_CHANNELS_PER_GUEST],
        total: None,
    };
    // The lifecycle decides; this loop does what it says and tells it what happened.
    let mut fx = g.lc.begin();
    loop {
        let (flow, back) = g.perform(&fx, caps, &mut link);
        caps = back;
        let event = match flow {
            Flow::Gone => break,
            Flow::Next(e) => e,
            Flow::Idle => match g.wait(caps, &mut link, &keep_serving) {
                Some(e) => e,
                None => break,
            },
        };
        fx = g.lc.step(event);
    }
    // Gone for good: the guests it controlled no longer wait for it (all of them, even
    // if its space never got their caps).
    for &(t, _) in &l.targets[..l.target_count] {
        Control::release(&mut link, t as usize);
    }
    // The view changes it counted messages of and has not installed: printed now, before
    // the BSP can end the run (it waits for this core's report, not for what follows);
    // what this core counts later is printed when it installs a view, or at its end.
    log_open_changes(caps, core);
    if let Some(r) = g.final_report(&link) {
        // What posting writes (the exit trace) takes a while: the inbox is served
        // between its records.
        let caps_now = &mut *caps;
        post(r, &mut || {
            caps_now.poll(&mut link);
        });
    }
    g.serve_while(caps, &mut link, &keep_serving);
    // The run ends: the other cores stop probing (none is taken for hung while the
    // BSP writes the summary).
    caps.with_members(&mut link, |m, net| m.end(net));
    log_views(caps, core);
    log_open_changes(caps, core);
    caps.members.fenced()
}

/// This core's capability state for the run: its protocol's policy, its membership
/// (view 0, the failure detector's timing), an injected deafness.
fn this_cores_caps(l: &Launch, core: u32) -> &'static mut HvCaps {
    let tsc_per_ms = arch::tsc::ticks_per_ms();
    let policy = crate::caps::Policy {
        deadline: l.caps_deadline_ms.saturating_mul(tsc_per_ms),
        revoke: l.revoke,
        ..crate::caps::Policy::from_tsc_per_ms(tsc_per_ms)
    };
    let caps = caps_of_this_core(core as usize, policy);
    let period = l.probe_ms.saturating_mul(tsc_per_ms);
    let timing = crate::members::Timing {
        period,
        // Eight periods; with the detector off, what a view change's answers may take.
        timeout: if period == 0 {
            tsc_per_ms.saturating_mul(200)
        } else {
            period.saturating_mul(8)
        },
        // Cores start seconds apart (the BSP enters its guest after every AP is up).
        grace: tsc_per_ms.saturating_mul(4_000),
    };
    caps.members = crate::members::Members::new(core as usize, l.members, timing, arch::rdtsc());
    if l.deaf {
        log::warn!("fault injection: this core will not answer capability revokes");
        caps.deafen();
    }
    caps
}

/// Where a batch of the lifecycle's effects leaves the run.
enum Flow {
    /// What happened, for the lifecycle.
    Next(Life),
    /// Nothing yet: the guest is down or parked until a controller asks.
    Idle,
    /// The guest is gone for good.
    Gone,
}

impl<B: crate::vcpu::Vcpu> Guest<'_, B> {
    /// Does what the lifecycle says (`fx`): answers, rebirths, incarnations, leaving and
    /// rejoining the view. Returns where that leaves the run, and the capability state.
    fn perform(
        &mut self,
        fx: &Effects,
        mut caps: &'static mut HvCaps,
        link: &mut Link,
    ) -> (Flow, &'static mut HvCaps) {
        let (mut next, mut gone) = (None, false);
        for e in fx.iter() {
            match e {
                Effect::Answer { to, req, answer } => Control::answer(link, to, req, answer),
                Effect::Rebirth => rebirth(caps, link),
                Effect::Start { n, cause } => {
                    self.log_start(cause);
                    let (event, back) = self.incarnation(n, caps, link);
                    caps = back;
                    next = Some(event);
                }
                Effect::Leave => next = Some(Life::Left(leave(self, caps, link))),
                Effect::Join { via } => next = Some(Life::Joined(join(self, caps, link, via))),
                Effect::Gone => gone = true,
                // Only while an incarnation runs or dies (`live` and `death` perform them).
                Effect::Stop(_) | Effect::Die(_) => {}
            }
        }
        let flow = match (gone, next) {
            (true, _) => Flow::Gone,
            (false, Some(e)) => Flow::Next(e),
            (false, None) => Flow::Idle,
        };
        (flow, caps)
    }

    fn log_start(&self, cause: Cause) {
        let (l, who) = (self.l, name(self.l));
        match cause {
            Cause::First => {}
            Cause::Policy(k) => {
                log::info!("guest {who}: restarting ({k} of {})", l.entry.max_restarts)
            }
            Cause::Controller => log::info!("guest {who}: starting again (its controller asked)"),
            Cause::Rejoined => log::info!("guest {who}: its core is back in"),
        }
    }

    /// Incarnation `n`: set up, run until it is over, its clean death (a failed setup
    /// ends it before it ran). Returns what the lifecycle is to hear of it, and the
    /// capability state for the next incarnation; its report joins the total.
    fn incarnation(
        &mut self,
        n: u32,
        caps: &'static mut HvCaps,
        link: &mut Link,
    ) -> (Life, &'static mut HvCaps) {
        let at = Incarnation { n, tsc_start: arch::rdtsc() };
        let l = self.l;
        let tsc_per_ms = arch::tsc::ticks_per_ms();
        // Past it the guest is stopped (started again once it is entered).
        let watchdog = arch::rdtsc().saturating_add(l.watchdog_ms.saturating_mul(tsc_per_ms));
        let mut ctx =
            GuestCtx::new(l.guest_id, self.core, l.entry.memory_mib, tsc_per_ms, watchdog, caps);
        let (r, caps) = match prepare::<B>(self, at, &mut ctx, link) {
            Ok(p) => {
                let mut live = Live::new(self, ctx, p, link);
                let ending = live.run_until_over();
                Dying::new(live, ending).die()
            }
            Err(why) => setup_failed(l, at, ctx, why),
        };
        let event = if self.lc.phase() == Phase::Setup {
            match r.ending {
                Ending::Stopped(StopReason::Setup(why)) => Life::SetupFailed(why),
                _ => Life::SetupFailed("setup failed"),
            }
        } else {
            Life::Dead {
                unconfirmed: r.unconfirmed,
                counters: counters_of(&r),
                run_over: arch::rdtsc() >= l.end_tsc,
            }
        };
        match &mut self.total {
            Some(t) => t.absorb(&r),
            None => self.total = Some(r),
        }
        (event, caps)
    }

    /// Down: its controllers may start it again until each has let go (unless the
    /// hypervisor could not set it up or keep it isolated). Parked: no guest, not probed;
    /// it still answers whatever other cores ask (revokes find nothing, queries say
    /// parked) until a controller brings it back, or until none can. What happens next,
    /// for the lifecycle (`None`: it is stuck in a phase that cannot wait, down for good).
    fn wait(
        &mut self,
        caps: &mut HvCaps,
        link: &mut Link,
        keep_serving: &impl Fn(&HvCaps) -> bool,
    ) -> Option<Life> {
        let (l, phase) = (self.l, self.lc.phase());
        if !matches!(phase, Phase::Down | Phase::Parked) {
            log::error!("guest {}: lifecycle stuck in {phase:?}: down for good", name(l));
            return None;
        }
        let until =
            if phase == Phase::Parked { l.give_up_tsc.min(l.end_tsc) } else { l.give_up_tsc };
        loop {
            if l.controllers & !caps.ctl.released == 0
                || (phase == Phase::Down && !keep_serving(caps))
                || arch::rdtsc() >= until
            {
                return Some(Life::Unattended);
            }
            caps.poll(link);
            log_views(caps, self.core);
            if let Some((from, req, op)) = caps.ctl.take() {
                return Some(Life::Request(Request { from, req, op }, [0; 3]));
            }
            arch::pause();
        }
    }

    /// The guest's report once it is down for good: every incarnation's, its ending (the
    /// run's end noticed between two incarnations included), this core's messages, kicks
    /// and time away from the inbox (logged with where it went).
    fn final_report(&self, link: &Link) -> Option<GuestReport> {
        let mut r = self.total?;
        if let Some(ending) = self.lc.ending() {
            r.ending = ending;
        }
        r.xmsgs = link.sent;
        r.nmis = link.nmis;
        // SAFETY: this core's slot is initialised (it runs guests).
        let me = unsafe { crate::percpu::this_core() };
        r.longest_away = me.longest_away();
        let core = self.core;
        log::info!("core {core}: longest stretch away from the inbox {} ticks", r.longest_away);
        // Where it went: the longest segment ending at each checkpoint (those of 1,000
        // ticks or more).
        for to in 0..crate::percpu::site::COUNT as u8 {
            let (ticks, from) = me.longest_segment(to);
            if ticks >= 1_000 {
                log::info!(
                    "core {core}: away segment to `{}`: {ticks} ticks at most (from `{from}`)",
                    crate::percpu::site::name(to as u64)
                );
            }
        }
        Some(r)
    }

    /// The guest is gone but other cores may still revoke copies they made (their
    /// requests find nothing here and are answered at once), or ask about it: keeps
    /// answering until told to stop.
    fn serve_while(
        &mut self,
        caps: &mut HvCaps,
        link: &mut Link,
        keep_serving: &impl Fn(&HvCaps) -> bool,
    ) {
        while keep_serving(caps) {
            caps.poll(link);
            log_views(caps, self.core);
            if let Some((from, req, op)) = caps.ctl.take() {
                for e in self.lc.step(Life::Request(Request { from, req, op }, [0; 3])).iter() {
                    if let Effect::Answer { to, req, answer } = e {
                        Control::answer(link, to, req, answer);
                    }
                }
            }
            arch::pause();
        }
    }
}

/// An incarnation whose setup failed (`why`), ended before it ran: its report, its
/// record, and the capability state back from its context.
fn setup_failed(
    l: &Launch,
    at: Incarnation,
    ctx: GuestCtx,
    why: &'static str,
) -> (GuestReport, &'static mut HvCaps) {
    let r = report(&ctx, Ending::Stopped(StopReason::Setup(why)), 0);
    let start = Start { tsc: at.tsc_start, frames: 0, caps: 0 };
    incarnation_record(l, at.n, &r, start, &Default::default(), LinkCount::default());
    (r, ctx.caps)
}
