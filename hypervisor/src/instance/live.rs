// SPDX-License-Identifier: MIT OR Apache-2.0
//! A running incarnation of this core's guest ([`Live`]), made from what `prepare` set up.
//! [`Live::run_until_over`] turns until the incarnation is over; each turn looks at what
//! waits for the core ([`Live::look`]: kicks, injected faults and, when something is
//! there, the inbox and the controllers' requests), arms the entry ([`Live::arm`]: the
//! guest's events, the timer for the nearest deadline, the fast path), enters the guest
//! ([`Live::enter`]) and hands its exit to `exits`: nothing else.
//!
//! Owns the loop's per-incarnation state. May call: `prepare`, `setup`, `vcpu` (the
//! guest's), `account`, `lifecycle`, `exits`, `fastexit`, `caps`, `trace`, `percpu`, `arch`.

use super::account::*;
use super::lifecycle::{Effect, Event as Life, Request};
use super::prepare::{mark, Prepared};
use super::setup::*;
use super::vcpu::*;
use super::*;
use crate::arch::{self, vmx::GuestRegs};
use crate::caps::control::Control;
use crate::exits::{self, Action, GuestCtx};
use crate::vcpu::ExitInfo;
use vmcall_proto::guest::*;

/// A running incarnation: its guest's context and vCPU, and what the loop keeps from one
/// turn to the next.
pub(super) struct Live<'g, 'a, B: crate::vcpu::Vcpu> {
    pub(super) g: &'g mut Guest<'a, B>,
    pub(super) at: Incarnation,
    pub(super) ctx: GuestCtx,
    pub(super) vcpu: GuestVcpu<'g, B>,
    pub(super) sink: Console<'a>,
    /// This core's own state (kicks, NMIs, time away from the inbox).
    pub(super) me: &'static crate::percpu::PerCore,
    pub(super) traffic: telemetry::Traffic,
    /// Private frames and live caps when first entered.
    pub(super) start: Start,
    /// TSC of the first entry (0 before it) and of the last exit (the hypervisor's time
    /// runs from there to the next entry).
    pub(super) first_entry: u64,
    pub(super) last_exit: u64,
    /// The code of the last exit (its counter is the one the telemetry page needs).
    last_reason: Option<u16>,
    launched: bool,
    /// The exits the landing answers itself while armed (see `fastexit`), and whether it
    /// may ever be: nothing it cannot see may need an exit (exit tracing records every
    /// one, an injected hang counts entries).
    fast: crate::fastexit::FastExit,
    fast_allowed: bool,
    /// The guest's run budget, in TSC ticks.
    budget: u64,
    /// Hypervisor time spent on other cores' behalf (serving their requests, taking their
    /// NMI kicks) is not the guest's: its budget is extended by it. From when (a kick that
    /// exited the guest) until the inbox is served.
    kicked_at: Option<u64>,
    /// Live figures (`stats_ms`): looked at only when the loop serves its inbox or the
    /// membership's probes (nothing on the other entries).
    stats_period: u64,
    stats_next: u64,
    faults: Faults,
}

/// The faults injected into this core's run.
struct Faults {
    /// `inject=hung-core`: 20 ms into the guest's first run (`u64::MAX`: not yet, or never).
    hang_at: u64,
    /// `inject=deaf-core:N:MS:AFTER`: from when (once its first incarnation ran), and
    /// whether it is over (or never comes).
    deaf_from: u64,
    deaf_over: bool,
}

/// What the look before an entry found.
struct Look {
    now: u64,
    /// The membership's next probe or deadline.
    due: u64,
    /// This core is deaf (an injected fault): nothing was served.
    deaf: bool,
    /// The inbox was served.
    busy: bool,
}

impl<'g, 'a, B: crate::vcpu::Vcpu> Live<'g, 'a, B> {
    /// The incarnation `p` set up, ready for its first entry: its vCPU, its registers
    /// scrubbed, its budget started, its channels up and the lifecycle told it is entered.
    pub(super) fn new(
        g: &'g mut Guest<'a, B>,
        mut ctx: GuestCtx,
        p: Prepared<B>,
        link: &'g mut crate::instance::xcore::Link,
    ) -> Self {
        let (l, core) = (g.l, g.core);
        let start =
            Start { tsc: p.at.tsc_start, frames: p.frames.in_use(), caps: ctx.caps.live_caps() };
        let (part, frames, status, chans) = (p.part, p.frames, p.status, l.channels());
        let mut vcpu =
            GuestVcpu { hw: p.hw, part, frames, link, status, chans, pci: crate::pci::Cf8 };
        *vcpu.hw.regs() = GuestRegs { rdi: BOOT_INFO_GPA, ..Default::default() };
        crate::record!(
            vmcall_proto::record::kind::START,
            "guest={} n={} core={core} tsc={}",
            name(l),
            p.at.n,
            arch::rdtsc()
        );
        // Nothing of an earlier incarnation (or the firmware) left in the registers the
        // guest reaches without an exit.
        // SAFETY: on this core, before its guest runs; the boot code leaves CR0.EM/TS clear.
        unsafe { arch::scrub_guest_registers(&exits::MSR_PASSTHROUGH) };
        // The budget is the guest's time: it starts now, not before its setup.
        let budget = l.watchdog_ms.saturating_mul(ctx.tsc_per_ms);
        ctx.watchdog = arch::rdtsc().saturating_add(budget);
        let last_exit = arch::rdtsc();
        // SAFETY: this core's slot is initialised.
        let me = unsafe { crate::percpu::this_core() };
        // This incarnation's NMIs, for its telemetry.
        me.nmis.store(0, core::sync::atomic::Ordering::Relaxed);
        // From now on a kick taken in the hypervisor makes the next entry exit at once.
        me.vcpu_live(B::KICK_HOOK);
        let fast = fast_path(&ctx, me, status, vcpu.hw.timer_shift());
        let mut live = Live {
            at: p.at,
            sink: Console { name: name(l), core },
            me,
            traffic: p.traffic,
            start,
            first_entry: 0,
            last_exit,
            last_reason: None,
            launched: false,
            fast,
            fast_allowed: !crate::trace::enabled() && !l.hang,
            budget,
            kicked_at: None,
            stats_period: l.stats_ms.saturating_mul(ctx.tsc_per_ms),
            stats_next: u64::MAX,
            faults: Faults {
                hang_at: u64::MAX,
                deaf_from: u64::MAX,
                deaf_over: l.deaf_ms == 0 || p.at.n > 1,
            },
            g,
            ctx,
            vcpu,
        };
        live.entering();
        live
    }

    /// The guest's channels as the incarnation starts (after a restart the rings start
    /// over and the links come up again), shown in its status page; then the lifecycle
    /// hears that it is entered.
    fn entering(&mut self) {
        let (l, n) = (self.g.l, self.at.n);
        if n > 1 {
            // The last incarnation's death took the channels down and every peer's core
            // acknowledged (or was given up on): nobody uses the rings. Start them over.
            for (pos, ch) in l.channels().iter().enumerate() {
                let c = &mut self.g.counts[pos];
                c.lost = c.lost.saturating_add(reset_rings(ch));
                c.resets += 1;
                // Up to 16 channels of up to 512 KiB each: the inbox between two.
                self.ctx.caps.poll(&mut self.vcpu);
            }
        }
        publish_links(self.vcpu.status, l, self.ctx.caps, &self.g.counts);
        if n > 1 {
            self.ctx.caps.links_up(&mut self.vcpu);
        }
        for e in self.g.lc.step(Life::Entering).iter() {
            if let Effect::Answer { to, req, answer } = e {
                Control::answer(&mut self.vcpu, to, req, answer);
            }
        }
        mark(crate::percpu::site::ENTERING);
        if self.stats_period > 0 {
            self.stats_next = arch::rdtsc();
        }
    }

    /// Runs the guest, turn after turn, until the incarnation is over: how it ended.
    pub(super) fn run_until_over(&mut self) -> Ending {
        let ending = loop {
            if let Err(end) = self.turn() {
                break end;
            }
        };
        self.ctx.flush_line(&mut self.sink);
        mark(crate::percpu::site::DEATH);
        ending
    }

    /// One turn: look, arm, enter, dispatch the exit. `Err`: the incarnation is over.
    #[inline(always)]
    fn turn(&mut self) -> Result<(), Ending> {
        let look = self.look()?;
        self.arm(&look)?;
        let e = self.enter()?;
        match exits::handle(&mut self.ctx, &mut self.vcpu, &e, &mut self.sink) {
            Action::Resume => {}
            Action::Exit(status) => return Err(Ending::Exited(status)),
            Action::Stop(why) => return Err(Ending::Stopped(why)),
        }
        self.vcpu.hw.redeliver(&e);
        Ok(())
    }

    /// What waits for the core before an entry: the inter-core inbox, the capability
    /// protocol's deadlines, the membership's probes, link changes and controllers'
    /// requests are served only when the mail word or the capability state says there is
    /// something, or something is due (a few loads otherwise, whatever the core count).
    #[inline(always)]
    fn look(&mut self) -> Result<Look, Ending> {
        // Kicks from here on are seen by the look below, or zero the timer further down
        // (one taken before it is for mail the look sees: no extra exit for it).
        self.me.take_kick();
        let now = arch::rdtsc();
        let mut due = self.ctx.caps.members.due();
        // One flag test per entry once no deafness is pending (the injection is cold).
        let deaf = !self.faults.deaf_over && self.deafness(now);
        let busy = (self.kicked_at.is_some()
            || self.vcpu.link.has_mail()
            || now >= due
            || self.ctx.caps.attention())
            && !deaf;
        if busy {
            self.serve(now)?;
            due = self.ctx.caps.members.due();
        }
        let l = self.g.l;
        // `hang_at` stays u64::MAX unless `inject=hung-core` (set at the first entry).
        if now >= self.faults.hang_at {
            hang(self.g.core);
        }
        if now >= l.end_tsc {
            return Err(Ending::Stopped(StopReason::RunEnded));
        }
        Ok(Look { now, due, deaf, busy })
    }

    /// `inject=deaf-core:N:MS:AFTER`: whether this core is deaf at `now` (from
    /// `deaf_from` on, for `deaf_ms`; the deafness's start and end logged). While it
    /// lasts the capability state's poll serves nothing, wherever it is called (see
    /// `HvCaps::deafen_until`).
    #[cold]
    #[inline(never)]
    fn deafness(&mut self, now: u64) -> bool {
        if now < self.faults.deaf_from {
            return false;
        }
        let (core, caps) = (self.g.core, &mut *self.ctx.caps);
        if caps.deaf_until() == 0 {
            let until = now.saturating_add(self.ctx.tsc_per_ms.saturating_mul(self.g.l.deaf_ms));
            caps.deafen_until(until);
            log::warn!(
                "inject=deaf-core: core {core} serves no inbox for {} ms, tsc={now}..{until}",
                self.g.l.deaf_ms
            );
        }
        if caps.deaf_at(now) {
            // Nothing served: the kicks' time is nobody's to charge.
            self.kicked_at = None;
            return true;
        }
        self.faults.deaf_over = true;
        log::warn!("inject=deaf-core: core {core} serves its inbox again, tsc={now}");
        false
    }

    /// Serves the inbox, the controllers and the live figures; the time it took is the
    /// other cores', not the guest's. `Err`: the incarnation must end.
    fn serve(&mut self, now: u64) -> Result<(), Ending> {
        let t0 = arch::rdtsc();
        let before = self.ctx.caps.stats.revoke;
        let caps = &mut *self.ctx.caps;
        caps.views.untouch(&mut caps.stats.probes);
        let served = caps.poll(&mut self.vcpu);
        let t1 = arch::rdtsc();
        let after = &mut self.ctx.caps.stats.revoke;
        if after.worked_since(&before) {
            // The exit this serve follows brought revoke work (a kick, or work met there).
            after.exits = after.exits.saturating_add(1);
        }
        // And membership work: each view change (and the detector) it counted a message of.
        let caps = &mut *self.ctx.caps;
        caps.views.exit_served(&mut caps.stats.probes);
        log_views(self.ctx.caps, self.g.core);
        if self.ctx.caps.members.evicted() {
            // Taken for stopped while alive: the others fenced this core and go on
            // without it, so its guest must not run again.
            return Err(Ending::Stopped(StopReason::Isolation(
                "its core was fenced out of the membership view",
            )));
        }
        let foreign = match self.kicked_at.take() {
            Some(t) => t1.saturating_sub(t),
            None if served > 0 => t1.saturating_sub(t0),
            None => 0,
        };
        // At most one budget's worth: a guest's life stays bounded (the BSP's collection
        // waits two budgets).
        let c = &mut self.ctx.counters;
        let room = self.budget.saturating_sub(c.foreign_tsc);
        self.ctx.watchdog = self.ctx.watchdog.saturating_add(foreign.min(room));
        c.foreign_tsc = c.foreign_tsc.saturating_add(foreign);
        if self.ctx.caps.links_changed() {
            publish_links(self.vcpu.status, self.g.l, self.ctx.caps, &self.g.counts);
            // Wake the guest if it sleeps on a doorbell: its channel changed.
            self.ctx.wake = true;
        }
        self.request()?;
        if now >= self.stats_next {
            self.stats_next = now.saturating_add(self.stats_period);
            let r = report(&self.ctx, Ending::Exited(0), self.first_entry);
            stats_record(self.g.l, self.at.n, self.g.core, &r, self.vcpu.status, now);
        }
        if self.ctx.caps.stats.unmap_failed {
            return Err(Ending::Stopped(StopReason::Isolation(
                "a revoked capability could not be unmapped from its EPT",
            )));
        }
        Ok(())
    }

    /// A controller's request, if one waits: answered as the lifecycle says, and the
    /// incarnation ended if it says so.
    fn request(&mut self) -> Result<(), Ending> {
        let Some((from, req, op)) = self.ctx.caps.ctl.take() else {
            return Ok(());
        };
        let live = self.ctx.counters.live();
        let mut stop = None;
        for e in self.g.lc.step(Life::Request(Request { from, req, op }, live)).iter() {
            match e {
                Effect::Answer { to, req, answer } => {
                    Control::answer(&mut self.vcpu, to, req, answer)
                }
                Effect::Stop(why) => stop = Some(why),
                _ => {}
            }
        }
        stop.map_or(Ok(()), |why| Err(Ending::Stopped(why)))
    }

    /// Arms the entry: the guest's timer and watchdog (`GuestCtx::before_entry`), the
    /// backend's timer for the nearest deadline, the fast path up to it, a kick that came
    /// since the look.
    #[inline(always)]
    fn arm(&mut self, look: &Look) -> Result<(), Ending> {
        let also = self.deadline(look);
        let timer = self.ctx.before_entry(&mut self.vcpu, also).map_err(Ending::Stopped)?;
        self.vcpu.hw.set_timer(timer);
        // The fast path answers until the deadline the timer aims at, if nothing waits
        // for the run loop (`now` was read before `before_entry`'s: not later than it).
        let waits = look.busy && (self.ctx.caps.attention() || self.vcpu.link.has_mail());
        self.fast.until = if self.fast_allowed && !self.ctx.eventful && !waits {
            look.now.saturating_add(timer)
        } else {
            0
        };
        if self.me.take_kick() {
            // A kick came after the look at the mail word: its message waits. Enter for no
            // instruction (a zero timer exits at once, SDM Vol. 3C 26.7.4) and poll again.
            // A kick after this line zeroes the timer itself (arch::idt).
            self.vcpu.hw.set_timer(0);
            self.fast.until = 0;
        }
        Ok(())
    }

    /// The loop's own next deadline: the membership's next probe or deadline, the end of
    /// the run (and an injected hang) come even if the guest never exits. Deaf: the guest
    /// runs until the deafness ends (no probe is due meanwhile), and the deafness starts
    /// on time even if the guest never exits.
    #[inline(always)]
    fn deadline(&self, look: &Look) -> u64 {
        let (l, f) = (self.g.l, &self.faults);
        let also = look.due.min(l.end_tsc).min(f.hang_at);
        if f.deaf_over {
            also
        } else if look.deaf {
            l.end_tsc.min(self.ctx.caps.deaf_until())
        } else {
            also.min(f.deaf_from)
        }
    }

    /// Enters the guest (the telemetry page brought up to date first) until an exit the
    /// fast path does not answer, and reads that exit. `Err`: the entry failed.
    #[inline(always)]
    fn enter(&mut self) -> Result<B::Exit, Ending> {
        // Exit-free telemetry: the guest's counters as of this entry.
        let t_entry = arch::rdtsc();
        let (status, hv) = (self.vcpu.status, t_entry.saturating_sub(self.last_exit));
        publish_telemetry(status, &self.ctx, hv, self.last_reason);
        self.fast.base(self.ctx.counters.exits_total);
        if self.traffic.due(t_entry) {
            refresh_traffic(&mut self.traffic, status, t_entry);
        }
        // It stops answering at the next traffic copy (the copy needs an entry of the
        // run loop) without making the timer fire for it.
        self.fast.answer_until = self.fast.until.min(self.traffic.next_due());
        if !self.launched {
            self.first_entry = t_entry;
        }
        let fast_ptr = core::ptr::addr_of_mut!(self.fast).cast();
        self.me.entering_guest(arch::rdtsc());
        // `fast` lives as long as this incarnation and is armed for this guest (its
        // telemetry page, this core's mail word and kick flag).
        // SAFETY: the vCPU is set up for this core and guest; EPT confines the guest.
        let entered = unsafe { self.vcpu.hw.enter(fast_ptr) };
        let t_exit = arch::rdtsc();
        self.me.left_guest(t_exit);
        // The exits the fast path answered (its tally: the telemetry page) count even if
        // its last VMRESUME failed.
        let c = &self.ctx.counters;
        let (hypercalls, cpuids) = self.fast.answered(c.exits_total, c.hypercalls);
        self.ctx.fold_fast((B::HYPERCALL_CODE, hypercalls), (B::CPUID_CODE, cpuids));
        if let Err(crate::vcpu::EntryError { code }) = entered {
            log::error!("guest {}: VM entry failed, VM-instruction error {code}", self.sink.name);
            return Err(Ending::Stopped(StopReason::Setup(
                "VM entry failed (VM-instruction error)",
            )));
        }
        if !self.launched {
            self.launched = true;
            self.first_run();
        }
        self.last_exit = t_exit;
        let e = self.vcpu.hw.exit();
        let reason = e.code();
        self.last_reason = Some(reason);
        crate::trace::exit(self.g.core, reason, t_entry, t_exit);
        if self.vcpu.hw.host_nmi(&e) {
            // A kick for this core's hypervisor, not the guest's (the backend undid the
            // NMI blocking). That INT 2 ran the kick handler, which marked a kick: this one
            // is being served (the loop polls next), so it needs no extra exit.
            self.kicked_at = Some(t_exit);
            self.me.take_kick();
        }
        Ok(e)
    }

    /// The guest ran for the first time: the injected faults' clocks start.
    #[cold]
    fn first_run(&mut self) {
        let (l, per_ms) = (self.g.l, self.ctx.tsc_per_ms);
        if l.hang {
            self.faults.hang_at = self.first_entry.saturating_add(per_ms.saturating_mul(20));
        }
        if !self.faults.deaf_over {
            self.faults.deaf_from =
                self.first_entry.saturating_add(per_ms.saturating_mul(l.deaf_after_ms));
        }
    }
}

/// The fast path of an incarnation (see `fastexit`), off until the loop arms it: the
/// guest's telemetry in its status page `status`, this core's mail word and kick flag,
/// what its answers say, the backend's timer `shift`.
fn fast_path(
    ctx: &GuestCtx,
    me: &'static crate::percpu::PerCore,
    status: u64,
    shift: u32,
) -> crate::fastexit::FastExit {
    // The status page is a frame of this core's private region, identity-mapped, alive
    // for the whole incarnation; the guest only reads it.
    let page = status as *mut StatusPage;
    // SAFETY: `page` is valid for the incarnation (above); no reference is made.
    let telemetry = unsafe { core::ptr::addr_of_mut!((*page).telemetry) };
    let mail = crate::instance::xcore::mail_word(ctx.core as usize);
    let mut fast = crate::fastexit::FastExit::new(ctx.core, mail, &me.kicked, telemetry);
    fast.timer_shift = shift;
    fast.mwait = ctx.mwait;
    fast.info = ctx.info();
    fast.tsc_per_ms = ctx.tsc_per_ms;
    fast
}

/// `inject=hung-core`: this core's hypervisor stops answering anything, for good
/// (interrupts stay off; a kick's NMI returns to the spin).
fn hang(core: u32) -> ! {
    log::warn!("inject=hung-core: core {core} stops answering from now on");
    crate::record!(vmcall_proto::record::kind::HANG, "core={core} tsc={}", arch::rdtsc());
    loop {
        arch::pause();
    }
}
