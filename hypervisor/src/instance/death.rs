// SPDX-License-Identifier: MIT OR Apache-2.0
//! An incarnation's clean death ([`Dying`]): the steps the lifecycle lists
//! (`lifecycle::Death`), one method each, in its order: devices quiesced, the incarnation
//! accounted, its capabilities retired, its channels down, its vCPU cleared, its record.
//! The private region then goes back whole; the partition is zeroed before the next use.
//!
//! Owns the ended incarnation until its report is made. May call: `live` (what the
//! incarnation leaves), `setup`, `account`, `lifecycle`, `prepare` (its checkpoints),
//! `caps`, `percpu`, `arch`.

use super::account::*;
use super::lifecycle::{Death, Effect, Event as Life};
use super::live::Live;
use super::prepare::mark;
use super::setup::quiesce_devices;
use super::*;
use crate::arch;

/// An incarnation that ended, on its way through the clean death.
pub(super) struct Dying<'g, 'a, B: crate::vcpu::Vcpu> {
    live: Live<'g, 'a, B>,
    ending: Ending,
    /// Made by the `Account` step (or at the end, without it).
    report: Option<GuestReport>,
    /// What the `Retire` step retired.
    retired: crate::caps::Retired,
}

impl<'g, 'a, B: crate::vcpu::Vcpu> Dying<'g, 'a, B> {
    pub(super) fn new(live: Live<'g, 'a, B>, ending: Ending) -> Self {
        Dying { live, ending, report: None, retired: crate::caps::Retired::default() }
    }

    /// The clean death, step by step as the lifecycle lists them. Returns the
    /// incarnation's report and the capability state for the next incarnation.
    pub(super) fn die(mut self) -> (GuestReport, &'static mut crate::caps::HvCaps) {
        for e in self.live.g.lc.step(Life::Ended(self.ending)).iter() {
            let Effect::Die(step) = e else { continue };
            match step {
                Death::Quiesce => self.quiesce(),
                Death::Account => self.account(),
                Death::Retire => self.retire(),
                Death::LinksDown => self.links_down(),
                Death::ClearVmcs => self.clear_vcpu(),
                Death::Record => self.record(),
            }
        }
        let mut r = self.final_report();
        r.caps = self.live.ctx.caps.stats;
        r.unconfirmed = self.retired.unconfirmed;
        (r, self.live.ctx.caps)
    }

    /// The report made by `Account`, or one made now.
    fn final_report(&mut self) -> GuestReport {
        let (ctx, ending, first) = (&self.live.ctx, self.ending, self.live.first_entry);
        *self.report.get_or_insert_with(|| report(ctx, ending, first))
    }

    /// Its devices stop first: no DMA into memory about to be scrubbed or handed on.
    fn quiesce(&mut self) {
        quiesce_devices(self.live.g.l);
        mark(crate::percpu::site::DEATH_QUIESCE);
    }

    /// The page shows the incarnation as it ended (its last exit included) while the
    /// guest is down; the report is made.
    fn account(&mut self) {
        let (t_end, status) = (arch::rdtsc(), self.live.vcpu.status);
        publish_final(status, &self.live.ctx, t_end.saturating_sub(self.live.last_exit));
        refresh_traffic(&mut self.live.traffic, status, t_end);
        self.report = Some(report(&self.live.ctx, self.ending, self.live.first_entry));
        mark(crate::percpu::site::DEATH_ACCOUNT);
    }

    /// Every copy made from its caps revoked everywhere, every copy it held dropped, its
    /// originals unmapped (while its EPT still exists to unmap them).
    fn retire(&mut self) {
        self.retired = self.live.ctx.caps.retire(&mut self.live.vcpu);
        mark(crate::percpu::site::DEATH_RETIRE);
    }

    /// Its channels go down: each peer's core acknowledges once its guest knows (or is
    /// given up on); the rings are reset only if a next incarnation starts.
    fn links_down(&mut self) {
        if self.live.g.l.channel_count > 0 {
            let (caps, env) = (&mut self.live.ctx.caps, &mut self.live.vcpu);
            caps.links_down(env);
            let deadline = arch::rdtsc().saturating_add(caps.policy.deadline.saturating_mul(80));
            if !caps.serve_until(env, deadline, |_| {}, |c| c.links_acked()) {
                log::warn!(
                    "guest {}: a channel peer's core did not acknowledge in time",
                    self.live.sink.name
                );
                caps.links_give_up();
            }
        }
        mark(crate::percpu::site::DEATH_LINKS_DOWN);
    }

    /// Its vCPU cleared (VMX: its VMCS): no kick reaches it any more.
    fn clear_vcpu(&mut self) {
        let name = self.live.sink.name;
        let live = &mut self.live;
        live.me.vcpu_gone();
        live.vcpu.hw.clear();
        mark(crate::percpu::site::DEATH_CLEAR_VMCS);
        let frames = &live.vcpu.frames;
        log::info!(
            "guest {name}: private frames in use {}, peak {}, limit {}",
            frames.in_use(),
            frames.peak(),
            frames.limit()
        );
        // A console line takes milliseconds at the UART's baud rate: the inbox between two
        // (nothing is mapped any more, so no EPT is needed to serve it).
        live.ctx.caps.poll(&mut *live.vcpu.link);
    }

    /// The incarnation's record, with its capability stats and link counts.
    fn record(&mut self) {
        let links = self.live.g.counts.iter().fold(LinkCount::default(), |a, c| LinkCount {
            lost: a.lost.saturating_add(c.lost),
            resets: a.resets.saturating_add(c.resets),
        });
        let mut r = self.final_report();
        r.caps = self.live.ctx.caps.stats;
        r.unconfirmed = self.retired.unconfirmed;
        self.report = Some(r);
        let (l, n, start) = (self.live.g.l, self.live.at.n, self.live.start);
        mark(crate::percpu::site::DEATH_RECORD_SERVED);
        let (caps, link) = (&mut self.live.ctx.caps, &mut *self.live.vcpu.link);
        let serve = &mut || {
            mark(crate::percpu::site::DEATH_RECORD_PART);
            caps.poll(link);
            mark(crate::percpu::site::DEATH_RECORD_SERVED);
        };
        incarnation_record_in_parts(l, n, &r, start, &self.retired, links, serve);
        mark(crate::percpu::site::DEATH_RECORD);
        self.live.ctx.caps.poll(&mut *self.live.vcpu.link);
    }
}
