// SPDX-License-Identifier: MIT OR Apache-2.0
//! The run loop of this core: [`run`] does what the guest's [`lifecycle`](super::lifecycle)
//! says, one incarnation after another, and serves the other cores once it is down;
//! `incarnation` sets one up, enters it and dispatches its exits to `exits` until it ends,
//! then performs its clean death.
//!
//! Owns the loop's per-incarnation state. May call: the rest of `instance`, `exits`,
//! `fastexit`, `caps`, `trace`, `arch`, `vmx`.

use super::lifecycle::{self, Cause, Death, Effect, Event as Life, Lifecycle, Phase, Request};
use super::{account::*, setup::*, vcpu::*, *};
use crate::arch::{self, vmx::GuestRegs};
use crate::exits::GuestCtx;
use crate::exits::{self, Action};
use crate::vcpu::ExitInfo;
use vmcall_proto::guest::*;
use zerocopy::{FromZeros, IntoBytes};

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
    use crate::caps::control::Control;
    let tsc_per_ms = arch::tsc::ticks_per_ms();
    let policy = crate::caps::Policy {
        deadline: l.caps_deadline_ms.saturating_mul(tsc_per_ms),
        revoke: l.revoke,
        ..crate::caps::Policy::from_tsc_per_ms(tsc_per_ms)
    };
    let mut caps = caps_of_this_core(core as usize, policy);
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
    let keep_serving = |caps: &crate::caps::HvCaps| keep_serving(caps.members.fenced());
    if l.deaf {
        log::warn!("fault injection: this core will not answer capability revokes");
        caps.deafen();
    }
    let mut link = crate::instance::xcore::Link::new(core as usize);
    let mut total: Option<GuestReport> = None;
    let mut counts = [LinkCount::default(); MAX_CHANNELS_PER_GUEST];
    let mut lc = Lifecycle::new(lifecycle::Policy {
        restart: lifecycle::Restart::from_config(l.entry.restart),
        max_restarts: u32::from(l.entry.max_restarts),
        controllers: l.controllers,
    });
    // The lifecycle decides; this loop does what it says and tells it what happened.
    let mut fx = lc.begin();
    loop {
        let mut next = None;
        let mut gone = false;
        for e in fx.iter() {
            match e {
                Effect::Answer { to, req, answer } => Control::answer(&mut link, to, req, answer),
                Effect::Rebirth => rebirth(caps, &mut link),
                Effect::Start { n, cause } => {
                    match cause {
                        Cause::First => {}
                        Cause::Policy(k) => log::info!(
                            "guest {}: restarting ({k} of {})",
                            name(l),
                            l.entry.max_restarts
                        ),
                        Cause::Controller => {
                            log::info!("guest {}: starting again (its controller asked)", name(l))
                        }
                        Cause::Rejoined => log::info!("guest {}: its core is back in", name(l)),
                    }
                    let (r, back) =
                        incarnation::<B>(l, f, core, n, caps, &mut link, &mut lc, &mut counts);
                    caps = back;
                    next = Some(if lc.phase() == Phase::Setup {
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
                    });
                    match &mut total {
                        Some(t) => t.absorb(&r),
                        None => total = Some(r),
                    }
                }
                Effect::Leave => next = Some(Life::Left(leave(l, core, caps, &mut link))),
                Effect::Join { via } => {
                    next = Some(Life::Joined(join(l, core, caps, &mut link, via)))
                }
                Effect::Gone => gone = true,
                // Only while an incarnation runs or dies (`incarnation` performs them).
                Effect::Stop(_) | Effect::Die(_) => {}
            }
        }
        if gone {
            break;
        }
        let event = match (next, lc.phase()) {
            (Some(e), _) => e,
            // Down: its controllers may start it again until each has let go (unless the
            // hypervisor could not set it up or keep it isolated). Parked: no guest, not
            // probed; it still answers whatever other cores ask (revokes find nothing,
            // queries say parked) until a controller brings it back, or until none can.
            (None, phase @ (Phase::Down | Phase::Parked)) => {
                let until = if phase == Phase::Parked {
                    l.give_up_tsc.min(l.end_tsc)
                } else {
                    l.give_up_tsc
                };
                loop {
                    if l.controllers & !caps.ctl.released == 0
                        || (phase == Phase::Down && !keep_serving(caps))
                        || arch::rdtsc() >= until
                    {
                        break Life::Unattended;
                    }
                    caps.poll(&mut link);
                    log_views(caps, core);
                    if let Some((from, req, op)) = caps.ctl.take() {
                        break Life::Request(Request { from, req, op }, [0; 3]);
                    }
                    arch::pause();
                }
            }
            (None, phase) => {
                log::error!("guest {}: lifecycle stuck in {phase:?}: down for good", name(l));
                break;
            }
        };
        fx = lc.step(event);
    }
    // Gone for good: the guests it controlled no longer wait for it (all of them, even
    // if its space never got their caps).
    for &(t, _) in &l.targets[..l.target_count] {
        Control::release(&mut link, t as usize);
    }
    if let Some(mut r) = total {
        if let Some(ending) = lc.ending() {
            // The run's end noticed between two incarnations included.
            r.ending = ending;
        }
        r.xmsgs = link.sent;
        r.nmis = link.nmis;
        // SAFETY: this core's slot is initialised (it runs guests).
        r.longest_away = unsafe { crate::percpu::this_core() }.longest_away();
        log::info!("core {core}: longest stretch away from the inbox {} ticks", r.longest_away);
        // Where it went: the longest segment ending at each checkpoint (those of 1,000
        // ticks or more).
        for to in 0..crate::percpu::site::COUNT as u8 {
            // SAFETY: as above.
            let (ticks, from) = unsafe { crate::percpu::this_core() }.longest_segment(to);
            if ticks >= 1_000 {
                log::info!(
                    "core {core}: away segment to `{}`: {ticks} ticks at most (from `{from}`)",
                    crate::percpu::site::name(to as u64)
                );
            }
        }
        // What posting writes (the exit trace) takes a while: the inbox is served
        // between its records.
        let caps_now = &mut *caps;
        post(r, &mut || {
            caps_now.poll(&mut link);
        });
    }
    // The guest is gone but other cores may still revoke copies they made (their
    // requests find nothing here and are answered at once), or ask about it: keep
    // answering until told to stop.
    while keep_serving(caps) {
        caps.poll(&mut link);
        log_views(caps, core);
        if let Some((from, req, op)) = caps.ctl.take() {
            for e in lc.step(Life::Request(Request { from, req, op }, [0; 3])).iter() {
                if let Effect::Answer { to, req, answer } = e {
                    Control::answer(&mut link, to, req, answer);
                }
            }
        }
        arch::pause();
    }
    // The run ends: the other cores stop probing (none is taken for hung while the
    // BSP writes the summary).
    caps.members.end(&mut link);
    log_views(caps, core);
    caps.members.fenced()
}

/// `inject=hung-core`: this core's hypervisor stops answering anything, for good
/// (interrupts stay off; a kick's NMI returns to the spin).
pub(super) fn hang(core: u32) -> ! {
    log::warn!("inject=hung-core: core {core} stops answering from now on");
    crate::record!(vmcall_proto::record::kind::HANG, "core={core} tsc={}", arch::rdtsc());
    loop {
        arch::pause();
    }
}

/// A checkpoint in a long path away from the inbox (see `percpu::PerCore::mark`).
pub(super) fn mark(site: u8) {
    // SAFETY: a core runs guests only after its `init_this_core`.
    unsafe { crate::percpu::this_core() }.mark(site);
}

/// `inject=deaf-core:N:MS:AFTER`: whether this core is deaf at `now` (from `*from` on, for
/// `l.deaf_ms`; the deafness starts here, logged with its window). While it lasts the
/// capability state's poll serves nothing, wherever it is called (see
/// `HvCaps::deafen_until`).
fn deaf_injection(ctx: &mut GuestCtx, l: &Launch, core: u32, now: u64, from: &mut u64) -> bool {
    if now < *from {
        return false;
    }
    if ctx.caps.deaf_until() == 0 {
        let until = now.saturating_add(ctx.tsc_per_ms.saturating_mul(l.deaf_ms));
        ctx.caps.deafen_until(until);
        log::warn!(
            "inject=deaf-core: core {core} serves no inbox for {} ms, tsc={now}..{until}",
            l.deaf_ms
        );
    }
    ctx.caps.deaf_at(now)
}

/// One incarnation (the `n`th) of the guest: set up from the kernel and config, run until
/// it ends, then its clean death (its capabilities retired, its VMCS cleared; the
/// private region goes back whole, the partition is zeroed before the next use).
/// `lc` hears that it is entered, the controllers' requests while it runs, and its
/// ending, and says what to answer and the steps of its death. Returns its report and the
/// capability state for the next incarnation.
#[allow(clippy::too_many_arguments)]
pub(super) fn incarnation<B: crate::vcpu::Vcpu>(
    l: &Launch,
    f: &B::Features,
    core: u32,
    n: u32,
    caps: &'static mut crate::caps::HvCaps,
    link: &mut crate::instance::xcore::Link,
    lc: &mut Lifecycle,
    counts: &mut [LinkCount; MAX_CHANNELS_PER_GUEST],
) -> (GuestReport, &'static mut crate::caps::HvCaps) {
    use crate::caps::control::Control;
    let tsc_start = arch::rdtsc();
    let tsc_per_ms = arch::tsc::ticks_per_ms();
    let budget_ticks = l.watchdog_ms.saturating_mul(tsc_per_ms);
    let watchdog = arch::rdtsc().saturating_add(budget_ticks);
    let mut ctx = GuestCtx::new(l.guest_id, core, l.entry.memory_mib, tsc_per_ms, watchdog, caps);
    // Setup failures end the incarnation before it ran.
    let stop = |ctx: GuestCtx, why: &'static str| {
        let r = report(&ctx, Ending::Stopped(StopReason::Setup(why)), 0);
        let start = Start { tsc: tsc_start, frames: 0, caps: 0 };
        incarnation_record(l, n, &r, start, &Default::default(), LinkCount::default());
        (r, ctx.caps)
    };
    let Prepared { part, mut frames, hw, status, mut traffic } =
        match prepare::<B>(l, f, core, n, &mut ctx, link) {
            Ok(p) => p,
            Err(why) => return stop(ctx, why),
        };
    let mut sink = Console { name: name(l), core };
    let frames_at_start = frames.in_use();
    let caps_at_start = ctx.caps.live_caps();
    let mut vcpu =
        GuestVcpu { hw, part: &part, frames: &mut frames, link, status, chans: l.channels() };
    *vcpu.hw.regs() = GuestRegs { rdi: BOOT_INFO_GPA, ..Default::default() };
    crate::record!(
        vmcall_proto::record::kind::START,
        "guest={} n={n} core={core} tsc={}",
        name(l),
        arch::rdtsc()
    );
    // Nothing of an earlier incarnation (or the firmware) left in the registers the
    // guest reaches without an exit.
    // SAFETY: on this core, before its guest runs; the boot code leaves CR0.EM/TS clear.
    unsafe { arch::scrub_guest_registers(&exits::MSR_PASSTHROUGH) };
    // The budget is the guest's time: it starts now, not before its setup.
    ctx.watchdog = arch::rdtsc().saturating_add(budget_ticks);
    let mut launched = false;
    let mut first_entry = 0;
    // TSC and basic reason of the last VM exit (hypervisor time runs from there to the
    // next entry).
    let mut last_exit = arch::rdtsc();
    let mut last_reason = None;
    // Hypervisor time spent on other cores' behalf (serving their requests, taking their
    // NMI kicks) is not the guest's: its budget is extended by it.
    let mut kicked_at: Option<u64> = None;
    // SAFETY: this core's slot is initialised.
    let me = unsafe { crate::percpu::this_core() };
    // This incarnation's NMIs, for its telemetry.
    me.nmis.store(0, core::sync::atomic::Ordering::Relaxed);
    // From now on a kick taken in the hypervisor zeroes this VMCS's preemption timer.
    me.vmcs_live.store(1, core::sync::atomic::Ordering::Release);
    // The exits the landing answers itself while armed (see `fastexit`).
    // The status page is a frame of this core's private region, identity-mapped, alive
    // for the whole incarnation; the guest only reads it.
    let page = status as *mut StatusPage;
    // SAFETY: `page` is valid for the incarnation (above); no reference is made.
    let telemetry = unsafe { core::ptr::addr_of_mut!((*page).telemetry) };
    let mut fast = crate::fastexit::FastExit::new(
        core,
        crate::instance::xcore::mail_word(core as usize),
        &me.kicked,
        telemetry,
    );
    fast.timer_shift = vcpu.hw.timer_shift();
    fast.mwait = ctx.mwait;
    fast.info = ctx.info();
    fast.tsc_per_ms = ctx.tsc_per_ms;
    // Nothing the fast path cannot see may need an exit: exit tracing records every one,
    // an injected hang counts entries.
    let fast_allowed = !crate::trace::enabled() && !l.hang;
    if n > 1 {
        // The last incarnation's death took the channels down and every peer's core
        // acknowledged (or was given up on): nobody uses the rings. Start them over.
        for (pos, ch) in l.channels().iter().enumerate() {
            counts[pos].lost = counts[pos].lost.saturating_add(reset_rings(ch));
            counts[pos].resets += 1;
            // Up to 16 channels of up to 512 KiB each: the inbox between two.
            ctx.caps.poll(&mut vcpu);
        }
    }
    publish_links(status, l, ctx.caps, counts);
    if n > 1 {
        ctx.caps.links_up(&mut vcpu);
    }
    for e in lc.step(Life::Entering).iter() {
        if let Effect::Answer { to, req, answer } = e {
            Control::answer(&mut vcpu, to, req, answer);
        }
    }
    mark(crate::percpu::site::ENTERING);
    // Live figures (`stats_ms`): looked at only when the loop serves its inbox or the
    // membership's probes (nothing on the other entries).
    let stats_period = l.stats_ms.saturating_mul(tsc_per_ms);
    let mut stats_next = if stats_period > 0 { arch::rdtsc() } else { u64::MAX };
    // `inject=hung-core`: 20 ms into the guest's first run.
    let mut hang_at = u64::MAX;
    // `inject=deaf-core:N:MS:AFTER`: from when (once its first incarnation ran), and
    // whether the end was logged.
    let mut deaf_from = u64::MAX;
    let mut deaf_over = l.deaf_ms == 0 || n > 1;
    let ending = loop {
        // Kicks from here on are seen by the look below, or zero the timer further down
        // (one taken before it is for mail the look sees: no extra exit for it).
        me.take_kick();
        // The inter-core inbox, the capability protocol's deadlines, the membership's
        // probes, link changes and controllers' requests: only when the mail word or the
        // capability state says there is something, or something is due (a few loads
        // otherwise, whatever the core count).
        let now = arch::rdtsc();
        let mut due = ctx.caps.members.due();
        let deaf = !deaf_over && deaf_injection(&mut ctx, l, core, now, &mut deaf_from);
        if deaf {
            // Nothing served: the kicks' time is nobody's to charge.
            kicked_at = None;
        } else if !deaf_over && ctx.caps.deaf_until() != 0 {
            deaf_over = true;
            log::warn!("inject=deaf-core: core {core} serves its inbox again, tsc={now}");
        }
        let busy = !deaf
            && (kicked_at.is_some() || vcpu.link.has_mail() || now >= due || ctx.caps.attention());
        if busy {
            let t0 = arch::rdtsc();
            let served = ctx.caps.poll(&mut vcpu);
            let t1 = arch::rdtsc();
            log_views(ctx.caps, core);
            if ctx.caps.members.evicted() {
                // Taken for stopped while alive: the others fenced this core and go on
                // without it, so its guest must not run again.
                break Ending::Stopped(StopReason::Isolation(
                    "its core was fenced out of the membership view",
                ));
            }
            let foreign = match kicked_at.take() {
                Some(t) => t1.saturating_sub(t),
                None if served > 0 => t1.saturating_sub(t0),
                None => 0,
            };
            // At most one budget's worth: a guest's life stays bounded (the BSP's
            // collection waits two budgets).
            let room = budget_ticks.saturating_sub(ctx.counters.foreign_tsc);
            ctx.watchdog = ctx.watchdog.saturating_add(foreign.min(room));
            ctx.counters.foreign_tsc = ctx.counters.foreign_tsc.saturating_add(foreign);
            if ctx.caps.links_changed() {
                publish_links(status, l, ctx.caps, counts);
                // Wake the guest if it sleeps on a doorbell: its channel changed.
                ctx.wake = true;
            }
            if let Some((from, req, op)) = ctx.caps.ctl.take() {
                let live = ctx.counters.live();
                let mut stop = None;
                for e in lc.step(Life::Request(Request { from, req, op }, live)).iter() {
                    match e {
                        Effect::Answer { to, req, answer } => {
                            Control::answer(&mut vcpu, to, req, answer)
                        }
                        Effect::Stop(why) => stop = Some(why),
                        _ => {}
                    }
                }
                if let Some(why) = stop {
                    break Ending::Stopped(why);
                }
            }
            if now >= stats_next {
                stats_next = now.saturating_add(stats_period);
                let r = report(&ctx, Ending::Exited(0), first_entry);
                stats_record(l, n, core, &r, status, now);
            }
            if ctx.caps.stats.unmap_failed {
                break Ending::Stopped(StopReason::Isolation(
                    "a revoked capability could not be unmapped from its EPT",
                ));
            }
            due = ctx.caps.members.due();
        }
        if l.hang && launched && now >= hang_at {
            hang(core);
        }
        if now >= l.end_tsc {
            break Ending::Stopped(StopReason::RunEnded);
        }
        // The membership failure detector's next probe or deadline, the end of the run
        // (and an injected hang) come even if the guest never exits.
        let also = due.min(l.end_tsc);
        let also = if l.hang { also.min(hang_at) } else { also };
        // Deaf: the guest runs until the deafness ends (no probe is due meanwhile), and
        // the deafness starts on time even if the guest never exits.
        let also = if deaf { l.end_tsc.min(ctx.caps.deaf_until()) } else { also };
        let also = if deaf_over { also } else { also.min(deaf_from) };
        let timer = match ctx.before_entry(&mut vcpu, also) {
            Ok(t) => t,
            Err(why) => break Ending::Stopped(why),
        };
        vcpu.hw.set_timer(timer);
        // The fast path answers until the deadline the timer aims at, if nothing waits
        // for the run loop (`now` was read before `before_entry`'s: not later than it).
        fast.until = if fast_allowed
            && !ctx.eventful
            && !(busy && (ctx.caps.attention() || vcpu.link.has_mail()))
        {
            now.saturating_add(timer)
        } else {
            0
        };
        fast.exits_base = ctx.counters.exits_total;
        if me.take_kick() {
            // A kick came after the look at the mail word: its message waits. Enter for no instruction
            // (a zero timer exits at once, SDM Vol. 3C 26.7.4) and poll again. A kick
            // after this line zeroes the timer itself (arch::idt).
            vcpu.hw.set_timer(0);
            fast.until = 0;
        }
        // Exit-free telemetry: the guest's counters as of this entry.
        let t_entry = arch::rdtsc();
        publish_telemetry(status, &ctx, t_entry.saturating_sub(last_exit), last_reason);
        if traffic.due(t_entry) {
            refresh_traffic(&mut traffic, status, t_entry);
        }
        // It stops answering at the next traffic copy (the copy needs an entry of the
        // run loop) without making the timer fire for it.
        fast.answer_until = fast.until.min(traffic.next_due());
        if !launched {
            first_entry = t_entry;
        }
        let fast_ptr = core::ptr::addr_of_mut!(fast).cast();
        me.entering_guest(arch::rdtsc());
        // `fast` lives on this frame and is armed for this guest (its telemetry page, this
        // core's mail word and kick flag).
        // SAFETY: the vCPU is set up for this core and guest; EPT confines the guest.
        let entered = unsafe { vcpu.hw.enter(fast_ptr) };
        let t_exit = arch::rdtsc();
        me.left_guest(t_exit);
        // The exits the fast path answered count even if its last VMRESUME failed.
        let (hypercalls, cpuids) = fast.take();
        ctx.fold_fast((B::HYPERCALL_CODE, hypercalls), (B::CPUID_CODE, cpuids));
        if let Err(crate::vcpu::EntryError { code }) = entered {
            log::error!("guest {}: VM entry failed, VM-instruction error {code}", name(l));
            break Ending::Stopped(StopReason::Setup("VM entry failed (VM-instruction error)"));
        }
        if !launched {
            hang_at = first_entry.saturating_add(tsc_per_ms.saturating_mul(20));
            if !deaf_over {
                deaf_from = first_entry.saturating_add(tsc_per_ms.saturating_mul(l.deaf_after_ms));
            }
        }
        launched = true;
        last_exit = t_exit;
        let e = vcpu.hw.exit();
        let reason = e.code();
        last_reason = Some(reason);
        crate::trace::exit(core, reason, t_entry, t_exit);
        if vcpu.hw.host_nmi(&e) {
            // A kick for this core's hypervisor, not the guest's (the backend undid the
            // NMI blocking). That INT 2 ran the kick handler, which marked a kick: this one
            // is being served (the loop polls next), so it needs no extra exit.
            kicked_at = Some(t_exit);
            me.take_kick();
        }
        match exits::handle(&mut ctx, &mut vcpu, &e, &mut sink) {
            Action::Resume => {}
            Action::Exit(status) => break Ending::Exited(status),
            Action::Stop(why) => break Ending::Stopped(why),
        }
        vcpu.hw.redeliver(&e);
    };
    ctx.flush_line(&mut sink);
    mark(crate::percpu::site::DEATH);
    let start = Start { tsc: tsc_start, frames: frames_at_start, caps: caps_at_start };
    let dying = Dying {
        l,
        n,
        ending,
        ctx,
        vcpu,
        me,
        status,
        traffic,
        counts,
        start,
        first_entry,
        last_exit,
        report: None,
        retired: crate::caps::Retired::default(),
    };
    dying.die(lc)
}

/// An incarnation that ended, on its way through the clean death: what the death's steps
/// use, one method per step ([`Death`]), taken in the order the lifecycle lists them.
struct Dying<'a, 'v, B: crate::vcpu::Vcpu> {
    l: &'a Launch,
    n: u32,
    ending: Ending,
    ctx: GuestCtx,
    vcpu: GuestVcpu<'v, B>,
    me: &'static crate::percpu::PerCore,
    status: u64,
    traffic: telemetry::Traffic,
    counts: &'a [LinkCount; MAX_CHANNELS_PER_GUEST],
    start: Start,
    first_entry: u64,
    /// TSC of the last VM exit (the hypervisor's time runs from there).
    last_exit: u64,
    /// Made by the `Account` step (or at the end, without it).
    report: Option<GuestReport>,
    /// What the `Retire` step retired.
    retired: crate::caps::Retired,
}

impl<B: crate::vcpu::Vcpu> Dying<'_, '_, B> {
    /// The clean death, step by step as `lc` lists them. Returns the incarnation's report
    /// and the capability state for the next incarnation.
    fn die(mut self, lc: &mut Lifecycle) -> (GuestReport, &'static mut crate::caps::HvCaps) {
        for e in lc.step(Life::Ended(self.ending)).iter() {
            let Effect::Die(step) = e else { continue };
            match step {
                Death::Quiesce => self.quiesce(),
                Death::Account => self.account(),
                Death::Retire => self.retire(),
                Death::LinksDown => self.links_down(),
                Death::ClearVmcs => self.clear_vmcs(),
                Death::Record => self.record(),
            }
        }
        let mut r = self.final_report();
        r.caps = self.ctx.caps.stats;
        r.unconfirmed = self.retired.unconfirmed;
        (r, self.ctx.caps)
    }

    /// The report made by `Account`, or one made now.
    fn final_report(&mut self) -> GuestReport {
        let (ctx, ending, first) = (&self.ctx, self.ending, self.first_entry);
        *self.report.get_or_insert_with(|| report(ctx, ending, first))
    }

    /// Its devices stop first: no DMA into memory about to be scrubbed or handed on.
    fn quiesce(&mut self) {
        quiesce_devices(self.l);
        mark(crate::percpu::site::DEATH_QUIESCE);
    }

    /// The page shows the incarnation as it ended (its last exit included) while the
    /// guest is down; the report is made.
    fn account(&mut self) {
        let t_end = arch::rdtsc();
        publish_final(self.status, &self.ctx, t_end.saturating_sub(self.last_exit));
        refresh_traffic(&mut self.traffic, self.status, t_end);
        self.report = Some(report(&self.ctx, self.ending, self.first_entry));
        mark(crate::percpu::site::DEATH_ACCOUNT);
    }

    /// Every copy made from its caps revoked everywhere, every copy it held dropped, its
    /// originals unmapped (while its EPT still exists to unmap them).
    fn retire(&mut self) {
        self.retired = self.ctx.caps.retire(&mut self.vcpu);
        mark(crate::percpu::site::DEATH_RETIRE);
    }

    /// Its channels go down: each peer's core acknowledges once its guest knows (or is
    /// given up on); the rings are reset only if a next incarnation starts.
    fn links_down(&mut self) {
        if self.l.channel_count > 0 {
            let (caps, env) = (&mut self.ctx.caps, &mut self.vcpu);
            caps.links_down(env);
            let deadline = arch::rdtsc().saturating_add(caps.policy.deadline.saturating_mul(80));
            if !caps.serve_until(env, deadline, |_| {}, |c| c.links_acked()) {
                log::warn!(
                    "guest {}: a channel peer's core did not acknowledge in time",
                    name(self.l)
                );
                caps.links_give_up();
            }
        }
        mark(crate::percpu::site::DEATH_LINKS_DOWN);
    }

    /// Its VMCS cleared: no kick zeroes its timer any more.
    fn clear_vmcs(&mut self) {
        self.me.vmcs_live.store(0, core::sync::atomic::Ordering::Release);
        self.vcpu.hw.clear();
        mark(crate::percpu::site::DEATH_CLEAR_VMCS);
        log::info!(
            "guest {}: private frames in use {}, peak {}, limit {}",
            name(self.l),
            self.vcpu.frames.in_use(),
            self.vcpu.frames.peak(),
            self.vcpu.frames.limit()
        );
        // A console line takes milliseconds at the UART's baud rate: the inbox between two
        // (nothing is mapped any more, so no EPT is needed to serve it).
        self.ctx.caps.poll(&mut *self.vcpu.link);
    }

    /// The incarnation's record, with its capability stats and link counts.
    fn record(&mut self) {
        let links = self.counts.iter().fold(LinkCount::default(), |a, c| LinkCount {
            lost: a.lost.saturating_add(c.lost),
            resets: a.resets.saturating_add(c.resets),
        });
        let mut r = self.final_report();
        r.caps = self.ctx.caps.stats;
        r.unconfirmed = self.retired.unconfirmed;
        self.report = Some(r);
        mark(crate::percpu::site::DEATH_RECORD_SERVED);
        let (caps, link) = (&mut self.ctx.caps, &mut *self.vcpu.link);
        let serve = &mut || {
            mark(crate::percpu::site::DEATH_RECORD_PART);
            caps.poll(link);
            mark(crate::percpu::site::DEATH_RECORD_SERVED);
        };
        incarnation_record_in_parts(self.l, self.n, &r, self.start, &self.retired, links, serve);
        mark(crate::percpu::site::DEATH_RECORD);
        self.ctx.caps.poll(&mut *self.vcpu.link);
    }
}

/// What an incarnation's setup leaves ready to enter.
pub(super) struct Prepared<B> {
    part: Partition,
    frames: Private,
    /// The backend's vCPU, set up and current.
    hw: B,
    /// The guest's status page (a private frame).
    status: u64,
    traffic: telemetry::Traffic,
}

/// Sets up incarnation `n` of `l`'s guest: its capabilities (the first time), partition
/// (zeroed, the kernel loaded, boot info and page tables), EPT, devices, status page and
/// vCPU (current on return). An error says why it cannot run.
fn prepare<B: crate::vcpu::Vcpu>(
    l: &Launch,
    f: &B::Features,
    core: u32,
    n: u32,
    ctx: &mut GuestCtx,
    link: &mut crate::instance::xcore::Link,
) -> Result<Prepared<B>, &'static str> {
    let tsc_per_ms = ctx.tsc_per_ms;
    // The guest's capabilities and channels first, before anything serves the inbox
    // (zeroing below, or the down state after a failed setup): a peer's `LINK_DOWN`, an
    // `INSERT` or a revoke that arrives meanwhile then finds the channel it names and
    // gets its defined answer (`LINK_ACK`; `NotAccepted` until the guest accepts).
    if n == 1 {
        for &(base, size) in &l.grants[..l.grant_count] {
            if ctx.caps.grant(base, size).is_err() {
                return Err("capability space full");
            }
        }
        for ch in l.channels() {
            if ctx.caps.add_channel(ch.desc.index, ch.peer_core).is_err() {
                return Err("capability space full");
            }
        }
        for &(core, guest) in &l.targets[..l.target_count] {
            if ctx.caps.add_control(core, guest as u32).is_err() {
                return Err("capability space full");
            }
        }
    }
    let part = Partition { base: l.partition, size: l.partition_size };
    // The pool ends below the status frame, which stays where it is for the whole run.
    let mut frames = Private::new(Identity, l.private, l.status_frame());

    // SAFETY: the kernel module is reserved memory, identity-mapped, never written.
    let image = unsafe {
        core::slice::from_raw_parts(l.kernel.0 as *const u8, (l.kernel.1 - l.kernel.0) as usize)
    };
    let plan = match loader::plan(image, part.size) {
        Ok(p) => p,
        Err(e) => {
            log::error!("guest {}: kernel ELF rejected: {e}", name(l));
            return Err("kernel ELF rejected");
        }
    };
    // Its devices stop before the memory they may still write is scrubbed: the first
    // time from whatever state the firmware left them in (later incarnations follow a
    // death, which already quiesced them).
    if n == 1 {
        quiesce_devices(l);
    }
    mark(crate::percpu::site::SETUP_PLAN);
    // Nothing of a previous incarnation (or of whoever had the memory before) survives.
    part.zero(|| {
        ctx.caps.poll(&mut *link);
    });
    for s in plan.segments() {
        let data = &image[s.file_offset as usize..(s.file_offset + s.file_size) as usize];
        // A kernel may be 16 MiB: copied a chunk at a time, serving between.
        for (k, piece) in data.chunks(SERVE_EVERY_BYTES as usize).enumerate() {
            if part.write(s.gpa + (k as u64 * SERVE_EVERY_BYTES), piece).is_err() {
                return Err("kernel segment outside the partition");
            }
            ctx.caps.poll(&mut *link);
        }
    }
    mark(crate::percpu::site::SETUP_KERNEL);
    let mut bi = BootInfo::new_zeroed();
    bi.magic = BOOT_INFO_MAGIC;
    bi.version = BOOT_INFO_VERSION;
    bi.guest_id = l.guest_id;
    bi.core = core;
    bi.memory_bytes = part.size;
    bi.tsc_per_ms = tsc_per_ms;
    bi.name = l.entry.name;
    bi.workload = l.entry.workload;
    bi.args = l.entry.args;
    bi.incarnation = n;
    bi.dma_offset = part.base;
    for (d, o) in bi.devices.iter_mut().zip(l.devices.iter()) {
        *d = o.desc();
    }
    bi.device_count = l.devices.count as u32;
    if boot_page_tables(&part).is_err() {
        return Err("partition too small for the boot structures");
    }
    mark(crate::percpu::site::SETUP_PAGE_TABLES);

    let windows = l
        .channels()
        .iter()
        .map(|ch| (vmcall_proto::guest::channel_window(ch.desc.index), ch.hpa, ch.size));
    // Thousands of entries written and walked (the self-check): the inbox between the
    // partition, each window, the grant window's directories and each directory counted.
    let mut serve = || {
        ctx.caps.poll(&mut *link);
    };
    let eptp = match build_ept(&mut frames, part.base, part.size, windows, &mut serve) {
        Ok(root) => ept::eptp(root),
        Err(why) => return Err(why),
    };
    mark(crate::percpu::site::SETUP_EPT);
    // The owner's memory BARs in its device window, uncached, never executable; each
    // checked as built.
    if l.devices.count > 0 && !crate::arch::apic::x2apic_mode() {
        return Err("its core's local APIC is not in x2APIC mode: device interrupts could not be acknowledged");
    }
    for o in l.devices.iter() {
        for (b, &gpa) in o.func.bars.iter().zip(&o.gpa) {
            if b.kind != vmcall_proto::device::bar_kind::MEMORY || b.size == 0 {
                continue;
            }
            let len = b.size.max(4096);
            let root = eptp & !0xfff;
            let rw = ept::Perm::Device.bits();
            let ok = ept::map_with(&mut frames, root, gpa, b.base, len, ept::Perm::Device).is_ok()
                && ept::translate_perm(&mut frames, root, gpa) == Some((b.base, rw))
                && ept::translate(&mut frames, root, gpa + len - 1) == Some(b.base + len - 1);
            if !ok {
                return Err("device BAR mapping failed");
            }
        }
        if let Some(line) = o.line() {
            // SAFETY: this core's slot is initialised.
            let apic = unsafe { crate::percpu::this_core() }.apic_id as u32;
            if let Err(why) = crate::pci::ioapic::route(line, o.vector, apic) {
                log::error!("guest {}: {}: interrupt not routed: {why}", name(l), o.func.bdf);
                return Err("a device's interrupt could not be routed to its core");
            }
        }
    }
    ctx.pci = crate::pci::filter::View::new(&l.devices);
    mark(crate::percpu::site::SETUP_DEVICES);
    // The status page: the fixed last frame of the private region, read-only to the
    // guest (and to its controllers, through their target windows), zeroed for each
    // incarnation.
    let status = l.status_frame();
    // The frame is this core's private region's last, identity-mapped, outside the pool;
    // others only read it.
    // SAFETY: so this core may write it whole.
    unsafe {
        (status as *mut u8).write_bytes(0, 4096);
        (*(status as *mut StatusPage)).incarnation = u64::from(n);
    }
    if ept::map_with(&mut frames, eptp & !0xfff, STATUS_GPA, status, 4096, ept::Perm::Read).is_err()
    {
        return Err("status page mapping failed");
    }
    // The status pages of the guests it controls, read-only, one window each.
    telemetry::map_target_windows(&mut frames, eptp & !0xfff, &l.target_status[..l.target_count])?;
    mark(crate::percpu::site::SETUP_STATUS);
    let traffic =
        telemetry::Traffic::new(l.channels(), tsc_per_ms.saturating_mul(TRAFFIC_REFRESH_MS));
    for (i, ch) in l.channels().iter().enumerate() {
        bi.channels[i] = ch.desc;
        ctx.doorbells[i] = ch.peer_apic;
    }
    bi.channel_count = l.channel_count as u32;
    if part.write(BOOT_INFO_GPA, bi.as_bytes()).is_err() {
        return Err("partition too small for the boot structures");
    }
    let setup = crate::vcpu::Setup {
        rip: plan.entry,
        rsp: BOOT_STACK_TOP,
        cr3: BOOT_PML4_GPA,
        nested_root: eptp,
        tag: (l.guest_id + 1) as u16,
        direct_interrupts: l.channel_count > 0 || l.devices.count > 0,
        exitless_mwait: exitless_mwait(l),
    };
    let hw = match B::setup(f, &setup, &mut frames, io_ports(l)) {
        Ok(hw) => hw,
        Err(e) => {
            if let Some(what) = e.detail {
                log::error!("guest {}: VMCS setup: {what}", name(l));
            }
            return Err(e.reason);
        }
    };
    mark(crate::percpu::site::SETUP_VMCS);
    // The VMCS written (a few thousand instructions), the line below formatted (as many):
    // the inbox before and after it.
    ctx.caps.poll(&mut *link);
    ctx.mwait = exitless_mwait(l);
    if ctx.mwait && n == 1 {
        log::info!("guest {}: exitless waiting: MONITOR/MWAIT without VM exits", name(l));
    }
    log::info!(
        "guest {} (id {}, incarnation {n}): {} MiB at {:#x}, kernel {:#x}..{:#x} entry {:#x}, workload {:?}",
        name(l),
        l.guest_id,
        part.size >> 20,
        part.base,
        vmcall_proto::guest::KERNEL_BASE,
        plan.end(),
        plan.entry,
        bi.workload()
    );
    mark(crate::percpu::site::SETUP_DONE);
    ctx.caps.poll(&mut *link);
    Ok(Prepared { part, frames, hw, status, traffic })
}
