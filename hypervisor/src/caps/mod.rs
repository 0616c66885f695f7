// SPDX-License-Identifier: MIT OR Apache-2.0
//! The capability system on one core: the guest's capability space, its channels' accept
//! quotas, and this core's half of the cross-core protocol ([`proto`]). One [`CapCore`]
//! per core, owned by that core; no other core reads or writes it. The rest of the
//! hypervisor reaches it through [`CapCore::hypercall`] (the `cap_*` hypercalls),
//! [`CapCore::poll`] (serve the inbox) and the setup calls; it reaches the hardware only
//! through [`Env`] (the EPT of this core's guest and the inter-core transport), so the
//! same code runs in the hypervisor, in host tests and in the model checker.
//!
//! May call: `vmcall_proto` (the capability space and ABI), [`proto`], [`control`],
//! [`links`], [`env`](mod@env) (the [`Env`] trait), [`mcast`] (the multicast request's layout),
//! [`op`] (message kinds), `policy` (settings and counters), `members` (core membership,
//! whose messages share the rings), [`mcount`] (membership's transport, counting), `console` (a turn at the UART while serving the inbox,
//! never while this core waits for its own operation). Nothing else of the hypervisor: `exits` calls into this
//! module, never the other way.

pub mod control;
pub mod env;
pub mod links;
pub mod mcast;
pub mod mcount;
#[cfg(test)]
mod model;
pub mod op;
mod policy;
pub mod proto;
#[cfg(test)]
mod tests;
mod wire;

use crate::members;
use proto::Proto;
pub use proto::Verdict;
use vmcall_proto::caps::{CSpace, Cap, CapType, Child, Rights};
use vmcall_proto::channel::Payload;
use vmcall_proto::guest::MAX_CHANNELS_PER_GUEST;
use vmcall_proto::hypercall::{HvError, Hypercall, GRANT_WINDOW};

/// Cores the protocol can address (the hypervisor's `percpu::MAX_CORES`).
pub const MAX_PEERS: usize = crate::members::MAX_PEERS;

pub use env::Env;
pub use policy::{Policy, Revoke, Stats};

// The kinds on the rings do not overlap: membership's follow the capability protocol's.
const _: () = assert!(op::LINK_UP < members::op::PING);

/// The most EPT leaf entries one step of a long `cap_map` or `cap_unmap` writes before the
/// inbox is served again: a page table's worth of 4-KiB pages (2 MiB), or a page directory's
/// worth of 2-MiB pages (1 GiB), plus at most one partial table at either end. With about
/// five instructions per entry that is a few thousand instructions between two looks at
/// the inbox (measured: see README "Core membership"), whatever the cap's size.
pub const EPT_STEP_ENTRIES: u64 = 512;

/// The step of an unmap whose host side is not known here (the rest of one a revoke
/// started, see [`Deferring`]): up to the next 2-MiB boundary of the guest side, which never
/// splits a leaf, so at most 512 entries (one for a 2-MiB page).
fn unmap_step(g: u64, end: u64) -> u64 {
    const SIZE_2M: u64 = 2 << 20;
    (SIZE_2M - g % SIZE_2M).min(end - g)
}

/// The environment the protocol's message handling sees ([`CapCore::deliver`]): the same,
/// except that the unmap of a revoked piece is only noted, and [`CapCore::poll`] does it a
/// step at a time with the inbox served between, before it returns (so before the guest runs
/// again: it does not run while its core handles messages). A `REVOKE` whose node has many
/// mapped pieces (up to the 64 slots of a space) costs its message only the records (no EPT
/// write at all), and no piece, small or large, keeps the core from its inbox for more than
/// one step. The reply may leave before the EPT is written; nothing can reach the memory
/// meanwhile (the holder's guest does not run, and its core serves no map for that range:
/// the guest asks for maps).
struct Deferring<'a, E: Env> {
    env: &'a mut E,
    rest: &'a mut [Option<(u64, u64)>; vmcall_proto::caps::MAX_SLOTS],
}

impl<E: Env> Env for Deferring<'_, E> {
    fn now(&mut self) -> u64 {
        self.env.now()
    }
    fn send(&mut self, to: usize, m: &Payload) -> bool {
        self.env.send(to, m)
    }
    fn recv(&mut self) -> Option<(usize, Payload)> {
        self.env.recv()
    }
    fn kick(&mut self, to: usize) {
        self.env.kick(to)
    }
    fn ept_map(&mut self, gpa: u64, hpa: u64, size: u64, write: bool) -> Result<(), HvError> {
        self.env.ept_map(gpa, hpa, size, write)
    }
    fn ept_unmap(&mut self, gpa: u64, size: u64) -> Result<(), HvError> {
        if size == 0 {
            return Ok(());
        }
        // At most one per slot of the space (each was a mapped piece, and `poll` empties
        // the list before anything can map again): never full.
        match self.rest.iter_mut().find(|r| r.is_none()) {
            Some(free) => *free = Some((gpa, size)),
            None => self.env.ept_unmap(gpa, size)?,
        }
        Ok(())
    }
    fn relax(&mut self) {
        self.env.relax()
    }
    fn link_down(&mut self, channel: u32) {
        self.env.link_down(channel)
    }
    fn served(&mut self) {
        self.env.served()
    }
    fn mc_publish(&mut self, me: usize, req: &mcast::Request) -> bool {
        self.env.mc_publish(me, req)
    }
    fn mc_rung(&mut self, me: usize) -> u64 {
        self.env.mc_rung(me)
    }
    fn mc_read(&mut self, from: usize, me: usize) -> Option<mcast::Request> {
        self.env.mc_read(from, me)
    }
    fn mc_answer(&mut self, me: usize, to: usize, word: u64) {
        self.env.mc_answer(me, to, word)
    }
    fn mc_answered(&mut self, me: usize) -> u64 {
        self.env.mc_answered(me)
    }
    fn mc_line(&mut self, me: usize, from: usize) -> u64 {
        self.env.mc_line(me, from)
    }
}

/// The guest-physical bytes of the step of an EPT change that starts at `g` (mapped to
/// `h`) and must not pass `end`: up to the next 2-MiB boundary where 4-KiB pages are used,
/// up to the next 1-GiB boundary where 2-MiB pages are (both sides congruent modulo 2 MiB).
/// Steps end on 2-MiB boundaries of the guest side, where the EPT writer's leaf runs end
/// too, so a mapping made in steps has exactly the leaves of one made at once, and can be
/// unmapped in the same steps.
pub fn ept_step(g: u64, h: u64, end: u64) -> u64 {
    const SIZE_2M: u64 = 2 << 20;
    let large = (g ^ h).is_multiple_of(SIZE_2M) && g.is_multiple_of(SIZE_2M);
    let step = if large { EPT_STEP_ENTRIES * SIZE_2M } else { SIZE_2M };
    (step - g % step).min(end - g)
}

/// Membership timing before the run loop sets it (in no view, nothing is timed).
const INERT: members::Timing = members::Timing { period: u64::MAX, timeout: u64::MAX, grace: 0 };

/// One channel of this core's guest, as the capability system sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
struct Chan {
    /// The channel's number in the config.
    index: u32,
    /// The peer's core, if the peer runs.
    peer: Option<u16>,
    /// Caps the guest still accepts through this channel (`cap_accept`).
    accept: u32,
    /// What this core knows of the peer (see [`links`]).
    link: links::Link,
}

/// A guest's capability state on its core. `E` is the protocol's table size (see
/// [`proto::entries_for`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CapCore<const E: usize> {
    space: CSpace,
    chans: [Chan; MAX_CHANNELS_PER_GUEST],
    nchans: usize,
    /// The guest has ended: inserts are refused, revokes still served.
    ended: bool,
    /// The guest's incarnation (1 for its first start).
    inc: u32,
    /// Some channel's link changed since the run loop last took it (one test per VM exit
    /// instead of a look at every channel).
    links_dirty: bool,
    /// Fault injection: revokes are dropped unanswered (a core that hangs mid-protocol).
    deaf: bool,
    /// Fault injection: no inbox served before this TSC (0: none).
    deaf_until: u64,
    proto: Proto<E>,
    /// What is left of the unmaps revokes started, `(gpa, size)` (see [`Deferring`]); empty
    /// whenever [`Self::poll`] returns.
    unmaps: [Option<(u64, u64)>; vmcall_proto::caps::MAX_SLOTS],
    /// `unmaps` may hold something (set by whatever may note an unmap, cleared by the poll
    /// that finds it empty): a poll with nothing to unmap does not scan it.
    unmaps_left: bool,
    /// Per core: the sequence number of its last multicast request this core took up.
    mc_seen: [u64; MAX_PEERS],
    /// Cores whose new multicast request was seen before the inbox was last drained: they
    /// are served after that drain (see [`Self::poll`]).
    mc_ready: u64,
    /// Guest control: this core's own request, and requests for its guest.
    pub ctl: control::Control,
    /// Core membership: this core's copy of the view, and its part in changing it.
    pub members: members::Members,
    /// Membership's view changes this core takes part in, counted (see [`mcount`]).
    pub views: mcount::ViewLog,
    /// Cores fenced since the run loop last logged it.
    pub suspected_unlogged: u64,
    last_transfer: [u64; MAX_PEERS],
    pub stats: Stats,
    pub policy: Policy,
    #[cfg(test)]
    pub bug: Bug,
}

/// What a guest's death took back ([`CapCore::retire`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retired {
    /// Copies of its caps revoked on other cores.
    pub revoked: u64,
    /// Caps whose revoke some core did not confirm (fenced; their records are kept).
    pub unconfirmed: u32,
    /// Copies it held, dropped.
    pub dropped: u32,
}

/// A transfer in flight, for [`CapCore::transfer_finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Transfer {
    h: u64,
    peer: u16,
    id: Option<u64>,
}

impl Transfer {
    /// The copy's id (`None` for a move).
    #[cfg(test)]
    pub fn id(&self) -> Option<u64> {
        self.id
    }
}

/// A bug to put in on purpose, to show the model checker finds it.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Bug {
    #[default]
    None,
    /// The copy's record is added when the peer confirms, not before the INSERT leaves
    /// (the bug that let a copy in flight survive a revoke).
    RecordAfterReply,
}

/// The hypervisor's instance: room for every core's requests.
pub type HvCaps = CapCore<{ proto::entries_for(MAX_PEERS) }>;

impl<const E: usize> CapCore<E> {
    /// Writes a fresh instance at `p`, in place (see [`Proto::init_at`]): the hypervisor
    /// keeps each core's instance in static storage, not on its stack.
    ///
    /// # Safety
    /// `p` is valid for writes of a `CapCore<E>` and properly aligned.
    pub unsafe fn init_at(p: *mut Self, core: u16, policy: Policy) {
        use core::ptr::addr_of_mut;
        // SAFETY: the caller vouches for `p`; every field is written before any read.
        unsafe {
            addr_of_mut!((*p).space).write(CSpace::new(core));
            addr_of_mut!((*p).chans).write([Chan::default(); MAX_CHANNELS_PER_GUEST]);
            addr_of_mut!((*p).nchans).write(0);
            addr_of_mut!((*p).ended).write(false);
            addr_of_mut!((*p).inc).write(1);
            addr_of_mut!((*p).links_dirty).write(false);
            addr_of_mut!((*p).deaf).write(false);
            addr_of_mut!((*p).deaf_until).write(0);
            Proto::init_at(addr_of_mut!((*p).proto), core);
            addr_of_mut!((*p).unmaps).write([None; vmcall_proto::caps::MAX_SLOTS]);
            addr_of_mut!((*p).unmaps_left).write(false);
            addr_of_mut!((*p).mc_seen).write([0; MAX_PEERS]);
            addr_of_mut!((*p).mc_ready).write(0);
            addr_of_mut!((*p).ctl).write(control::Control::default());
            addr_of_mut!((*p).members).write(members::Members::new(core as usize, 0, INERT, 0));
            addr_of_mut!((*p).views).write(mcount::ViewLog::default());
            addr_of_mut!((*p).suspected_unlogged).write(0);
            addr_of_mut!((*p).last_transfer).write([0; MAX_PEERS]);
            addr_of_mut!((*p).stats).write(Stats::default());
            addr_of_mut!((*p).policy).write(policy);
            #[cfg(test)]
            addr_of_mut!((*p).bug).write(Bug::None);
        }
    }

    /// A fresh instance by value (host tests and the model; the hypervisor uses
    /// [`Self::init_at`]).
    #[cfg(test)]
    pub fn new(core: u16, policy: Policy) -> Self {
        CapCore {
            space: CSpace::new(core),
            chans: [Chan::default(); MAX_CHANNELS_PER_GUEST],
            nchans: 0,
            ended: false,
            inc: 1,
            links_dirty: false,
            deaf: false,
            deaf_until: 0,
            proto: Proto::new(core),
            unmaps: [None; vmcall_proto::caps::MAX_SLOTS],
            unmaps_left: false,
            mc_seen: [0; MAX_PEERS],
            mc_ready: 0,
            ctl: control::Control::default(),
            members: members::Members::new(core as usize, 0, INERT, 0),
            views: mcount::ViewLog::default(),
            suspected_unlogged: 0,
            last_transfer: [0; MAX_PEERS],
            stats: Stats::default(),
            policy,
            #[cfg(test)]
            bug: Bug::None,
        }
    }

    #[cfg(test)]
    pub fn space(&self) -> &CSpace {
        &self.space
    }

    /// A config grant: memory the guest owns (read, write, grant), in the next slot.
    pub fn grant(&mut self, base: u64, size: u64) -> Result<u64, HvError> {
        let cap = Cap::new(CapType::Memory, Rights::all(), base, size);
        Ok(self.space.insert(cap, None)?.0)
    }

    /// Control over guest `guest`, which runs on core `core` (the config's `[[control]]`),
    /// in the next slot.
    pub fn add_control(&mut self, core: u16, guest: u32) -> Result<u64, HvError> {
        let cap =
            Cap::new(CapType::Control, Rights::READ | Rights::WRITE, core as u64, guest as u64);
        Ok(self.space.insert(cap, None)?.0)
    }

    /// `guest_control(slot, op)`: sent to the target's core, answered from there; the wait
    /// serves every other request meanwhile and ends at the deadline (64 protocol levels:
    /// the target's clean death may have revokes of its own to finish).
    fn control(&mut self, env: &mut impl Env, h: u64, operation: u64) -> Result<u64, HvError> {
        let c = *self.space.get(h)?;
        if c.kind != CapType::Control {
            return Err(HvError::WrongType);
        }
        let core = c.base as u16;
        if self.proto.fenced(core as usize) {
            return Err(HvError::PeerGone);
        }
        let deadline = self.policy.deadline.saturating_mul(64);
        self.ctl.start(env, core, operation, deadline)?;
        loop {
            self.poll(env);
            if let Some(r) = self.ctl.outcome(env.now()) {
                return r;
            }
            env.relax();
        }
    }

    /// One of the guest's channels (boot-info order), with its endpoint cap in the next
    /// slot. `peer`: the core running the other end, if it runs.
    pub fn add_channel(&mut self, index: u32, peer: Option<u16>) -> Result<u64, HvError> {
        let chan = self.chans.get_mut(self.nchans).ok_or(HvError::NoSpace)?;
        let link = links::Link { peer_up: peer.is_some(), peer_inc: 1, ..Default::default() };
        *chan = Chan { index, peer, accept: 0, link };
        self.nchans += 1;
        let cap = Cap::new(CapType::Endpoint, Rights::READ | Rights::WRITE, index as u64, 0);
        Ok(self.space.insert(cap, None)?.0)
    }

    /// The guest has ended: no more caps come in. Its own caps stay until revoked (their
    /// owners may still take them back, and that must keep working).
    #[cfg(test)]
    pub fn end(&mut self) {
        self.ended = true;
    }

    /// The guest has died: every copy made from its caps is revoked on every core (as
    /// `cap_revoke` would, bounded by the deadlines), every copy it held is dropped, every
    /// original is unmapped and kept for a next incarnation, and no channel accepts caps.
    /// Inserts are refused from here on until [`Self::reborn`].
    pub fn retire(&mut self, env: &mut impl Env) -> Retired {
        self.ended = true;
        let mut out = Retired::default();
        let mut owners = [None; vmcall_proto::caps::MAX_SLOTS];
        for (o, (h, _)) in
            owners.iter_mut().zip(self.space.live().filter(|(_, c)| c.children().next().is_some()))
        {
            *o = Some(h);
        }
        for h in owners.into_iter().flatten() {
            match self.revoke(env, h) {
                Ok(n) => out.revoked += n,
                Err(_) => out.unconfirmed += 1,
            }
        }
        // Mappings go a step at a time, serving (see `unmap`); the space's own retire
        // unmaps only what that could not.
        let mut mapped = [None; vmcall_proto::caps::MAX_SLOTS];
        for (m, (h, _)) in
            mapped.iter_mut().zip(self.space.live().filter(|(_, c)| c.mapped_at.is_some()))
        {
            *m = Some(h);
        }
        for h in mapped.into_iter().flatten() {
            let _ = self.unmap(env, h);
        }
        let mut failed = false;
        out.dropped = self.space.retire(|c| {
            if let Some(gpa) = c.mapped_at {
                failed |= env.ept_unmap(gpa, c.size).is_err();
            }
        });
        self.stats.unmap_failed |= failed;
        for c in &mut self.chans[..self.nchans] {
            c.accept = 0;
        }
        out
    }

    /// A new incarnation of the guest runs on what [`Self::retire`] left: caps come in again.
    pub fn reborn(&mut self) {
        self.ended = false;
        self.inc += 1;
    }

    /// Capabilities in the guest's space.
    pub fn live_caps(&self) -> usize {
        self.space.live().count()
    }

    /// The guest's incarnation.
    pub fn incarnation(&self) -> u32 {
        self.inc
    }

    /// A `LINK_*` message from core `from` about channels it is the peer's core of. A
    /// `LINK_DOWN` is shown in the guest's status page at once (the guest does not run
    /// meanwhile, see [`Env::link_down`]) and acknowledged: from then on the guest leaves
    /// the rings alone, whatever this core is busy with (even a wait inside one of the
    /// guest's own hypercalls).
    fn link_message(&mut self, env: &mut impl Env, from: usize, m: &Payload) {
        let (kind, inc, alive) = (m[0] & 0xff, m[5] as u32, m[6] != 0);
        // An ack names the death it answers: a late one for an earlier death (after a give
        // up) is not an ack of this one, but it unmutes the peer's core, which is then told
        // of the current incarnation (if it runs).
        if kind == proto::op::LINK_ACK && (m[0] >> 32) as u32 != self.inc {
            let mut unmuted = false;
            for c in self.chans[..self.nchans].iter_mut() {
                if c.peer.map(usize::from) == Some(from) && links::names(m, c.index) {
                    unmuted |= c.link.muted;
                    c.link.muted = false;
                    c.link.peer_inc = inc;
                    c.link.peer_up = alive;
                    c.link.changed = true;
                    self.links_dirty = true;
                }
            }
            if unmuted && !self.ended {
                self.links_send(env, proto::op::LINK_UP, Some(from));
            }
            return;
        }
        let mut down = false;
        for c in self.chans[..self.nchans].iter_mut() {
            if c.peer.map(usize::from) != Some(from) || !links::names(m, c.index) {
                continue;
            }
            let l = &mut c.link;
            l.peer_inc = inc;
            l.changed = true;
            self.links_dirty = true;
            match kind {
                proto::op::LINK_DOWN => {
                    l.peer_up = false;
                    down = true;
                    if !self.ended {
                        env.link_down(c.index);
                    }
                }
                proto::op::LINK_ACK => {
                    l.acked = true;
                    l.peer_up = alive;
                }
                _ => l.peer_up = true,
            }
        }
        if down {
            let named = self.chans[..self.nchans]
                .iter()
                .filter(|c| c.peer.map(usize::from) == Some(from) && links::names(m, c.index));
            let mut ack =
                links::message(proto::op::LINK_ACK, named.map(|c| c.index), self.inc, !self.ended);
            ack[0] |= (inc as u64) << 32;
            links::send(env, from, &ack);
        }
    }

    /// Tells the peers' cores that the guest died (`LINK_DOWN`), one message per core.
    pub fn links_down(&mut self, env: &mut impl Env) {
        self.links_send(env, proto::op::LINK_DOWN, None);
    }

    /// Tells the peers' cores that a new incarnation runs (`LINK_UP`).
    pub fn links_up(&mut self, env: &mut impl Env) {
        self.links_send(env, proto::op::LINK_UP, None);
    }

    /// Sends a `kind` link message to each peer core (only to `only`, if given).
    fn links_send(&mut self, env: &mut impl Env, kind: u64, only: Option<usize>) {
        let mut done = 0u64;
        for i in 0..self.nchans {
            let Some(peer) = self.chans[i].peer.map(usize::from) else { continue };
            if only.is_some_and(|o| o != peer) || done & (1u64 << (peer % 64)) != 0 {
                continue;
            }
            done |= 1u64 << (peer % 64);
            let to_peer =
                self.chans[..self.nchans].iter().filter(|c| c.peer.map(usize::from) == Some(peer));
            let m = links::message(kind, to_peer.map(|c| c.index), self.inc, !self.ended);
            let muted = self.chans[..self.nchans]
                .iter()
                .any(|c| c.peer.map(usize::from) == Some(peer) && c.link.muted);
            // A fenced core is down for good: nothing is sent there, nothing awaited.
            let sent = !muted && !self.proto.fenced(peer) && links::send(env, peer, &m);
            for c in self.chans[..self.nchans]
                .iter_mut()
                .filter(|c| c.peer.map(usize::from) == Some(peer))
            {
                // A muted or unreachable peer is taken as down and done with.
                c.link.acked = !sent || kind != proto::op::LINK_DOWN;
                if !sent {
                    c.link.peer_up = false;
                }
            }
        }
    }

    /// Whether every peer core acknowledged the last `LINK_DOWN`.
    pub fn links_acked(&self) -> bool {
        self.chans[..self.nchans].iter().all(|c| c.peer.is_none() || c.link.acked)
    }

    /// Gives up on the acks still missing: those peers count as down, and their cores are
    /// muted until their late acks come.
    pub fn links_give_up(&mut self) {
        for c in self.chans[..self.nchans].iter_mut().filter(|c| !c.link.acked) {
            c.link.acked = true;
            c.link.peer_up = false;
            c.link.muted = true;
        }
    }

    /// The link of the guest's channel at boot-info position `pos`, taking its `changed`
    /// mark.
    pub fn take_link(&mut self, pos: usize) -> Option<links::Link> {
        let c = self.chans.get_mut(pos).filter(|_| pos < self.nchans)?;
        let l = c.link;
        c.link.changed = false;
        self.links_dirty = self.chans[..self.nchans].iter().any(|c| c.link.changed);
        Some(l)
    }

    /// Whether any link changed since the run loop last looked.
    pub fn links_changed(&self) -> bool {
        self.links_dirty
    }

    /// Whether the run loop has anything to do here before the next VM entry, inbox and
    /// the membership's timing aside (`members.due()`, which the loop reads once per entry
    /// anyway): an operation open (its deadlines), a view change to log or this core
    /// evicted, a changed link, a controller's request, a failed unmap. A few loads; false
    /// on almost every entry.
    #[inline]
    pub fn attention(&self) -> bool {
        self.proto.busy()
            || self.links_dirty
            || self.ctl.pending()
            || self.stats.unmap_failed
            || self.members.has_change()
            || self.members.evicted()
    }

    /// Memory caps this space owns (originals): the next incarnation inherits them, so the
    /// hypervisor scrubs them first.
    pub fn owned_memory(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.space
            .live()
            .filter(|(_, c)| c.depth == 0 && c.kind == CapType::Memory)
            .map(|(_, c)| (c.base, c.size))
    }

    /// Fault injection (`inject=deaf-core:N`): from now on this core drops every revoke
    /// request without an answer, as a core hung in the middle of the protocol would.
    pub fn deafen(&mut self) {
        self.deaf = true;
    }

    /// Fault injection (`inject=deaf-core:N:MS:AFTER`): [`Self::poll`] serves nothing
    /// (no message read, no probe sent, no deadline looked at) until TSC `until`.
    pub fn deafen_until(&mut self, until: u64) {
        self.deaf_until = until;
    }

    /// The end of the injected deafness (0: none was injected).
    pub fn deaf_until(&self) -> u64 {
        self.deaf_until
    }

    /// Whether an injected deafness lasts at `now`.
    pub fn deaf_at(&self, now: u64) -> bool {
        now < self.deaf_until
    }

    /// The verdict of this core's own operation, once the protocol has one.
    pub fn take_verdict(&mut self) -> Option<Verdict> {
        self.proto.take_local()
    }

    /// Puts a protocol bug in on purpose (the model checker must find it).
    #[cfg(test)]
    pub fn set_proto_bug(&mut self, b: proto::Bug) {
        self.proto.bug = b;
    }

    /// Whether this core is waiting on nothing (no request of its own or of others open).
    #[cfg(test)]
    pub fn idle(&self) -> bool {
        self.proto.idle()
    }

    /// Serves the inbox: every message waiting, then the rest of the unmaps revokes started
    /// (a step at a time, the inbox looked at before each), then deadlines. Returns how many
    /// messages were handled (the caller charges that time to nobody's guest).
    pub fn poll(&mut self, env: &mut impl Env) -> u32 {
        if self.deaf_until != 0 && self.deaf_at(env.now()) {
            return 0;
        }
        // Whether this core waits for its own operation's answers (see the console below).
        let waiting = self.proto.waiting();
        let mut n = 0;
        loop {
            env.served();
            let mut got = false;
            while let Some((from, m)) = env.recv() {
                n += 1;
                got = true;
                self.deliver_one(env, from, &m);
            }
            if got {
                // Look again before any unmap step: steps follow a look that found nothing.
                continue;
            }
            // Multicast requests seen before the drain just done: everything their cores sent
            // here before them is now received (an `INSERT` a revoke chases is in its space).
            if self.mc_ready != 0 {
                let from = self.mc_ready.trailing_zeros() as usize;
                self.mc_ready &= !(1 << from);
                // Not the request seen (its core fenced this one and went on): dropped; a
                // newer one naming this core rings again.
                let me = self.proto.me();
                if let Some(req) = env.mc_read(from, me).filter(|r| r.seq == self.mc_seen[from]) {
                    n += 1;
                    self.deliver_multicast(env, from, &req);
                }
                continue;
            }
            // New requests: seen now, served after one more drain of the inbox.
            let me = self.proto.me();
            let mut rung = env.mc_rung(me);
            while rung != 0 {
                let from = rung.trailing_zeros() as usize;
                rung &= rung - 1;
                let Some(req) = env.mc_read(from, me) else { continue };
                if from < MAX_PEERS && req.seq != self.mc_seen[from] && req.n > 0 {
                    self.mc_seen[from] = req.seq;
                    self.mc_ready |= 1 << from;
                }
            }
            if self.mc_ready != 0 {
                continue;
            }
            // Answers to this core's own multicast request (no ring message: their lines),
            // once all are in.
            if self.proto.mc_open() {
                let taken = self.proto.mc_gather(env, &mut self.stats, false);
                if taken > 0 {
                    n += taken;
                    continue;
                }
            }
            // The rest of the unmaps revokes started: a step, then the inbox again.
            if !self.unmaps_left {
                break;
            }
            let Some(slot) = self.unmaps.iter_mut().find(|u| u.is_some()) else {
                self.unmaps_left = false;
                break;
            };
            let Some((g, size)) = slot.take() else { break };
            let step = unmap_step(g, g + size);
            if env.ept_unmap(g, step).is_err() {
                // The guest may still reach what is left: its core stops it.
                self.stats.unmap_failed = true;
            } else if step < size {
                *slot = Some((g + step, size - step));
            }
        }
        // Lines other cores (or this one) queued: one turn at the UART, at most
        // `console::PUMP_BYTES` bytes (about 22,000 instructions in Bochs), and none if
        // another core is taking one. Taken after the inbox (a request's answer leaves
        // first), and not while this core waits for its own operation's answers: a turn
        // there sat on the revoker's critical path (revoke at k = 14 took 48,995
        // instructions instead of 18,920, 23,000 of them one turn). The cores that wait for
        // nothing keep the console moving. Nor in the poll that took the last answer: its
        // caller is about to return to the guest that waits for it.
        if !waiting && !self.proto.waiting() {
            crate::console::pump();
        }
        env.host_serve(&mut self.ctl);
        let due = self.members.due();
        if self.proto.busy() || due != u64::MAX {
            let now = env.now();
            if self.proto.busy() {
                self.proto.expire(env, now, &mut self.stats);
            }
            if now >= due {
                self.with_members(env, |m, net| m.tick(net));
                self.members_effects(env);
            }
        }
        n
    }

    /// Calls membership `f` with this core's transport, which counts its messages
    /// ([`mcount`]): every call into `members` that may send or handle a message goes
    /// through here.
    pub fn with_members<N: Env, R>(
        &mut self,
        env: &mut N,
        f: impl FnOnce(&mut members::Members, &mut mcount::Counted<'_, N>) -> R,
    ) -> R {
        let mut net = mcount::Counted { env, log: &mut self.views, probes: &mut self.stats.probes };
        f(&mut self.members, &mut net)
    }

    /// Serves the inbox until `done` holds or `deadline` (TSC) has passed: whether `done`.
    /// `between` runs after each poll (the caller's logging). The deadline decides only
    /// after a poll that read the inbox at or after it: what arrived before it counts, also
    /// when this core could not look for a while (a stall, `inject=deaf-core`), so a wait
    /// never gives up on an answer that is in its inbox. The waits of a guest's death and
    /// of a core's leave and join use it.
    pub fn serve_until(
        &mut self,
        env: &mut impl Env,
        deadline: u64,
        mut between: impl FnMut(&mut Self),
        done: impl Fn(&Self) -> bool,
    ) -> bool {
        loop {
            let now = env.now();
            self.poll(env);
            between(self);
            if done(self) {
                return true;
            }
            if now >= deadline && !self.deaf_at(now) {
                return false;
            }
            env.relax();
        }
    }

    /// Acts on cores the membership protocol suspects: fenced for the capability protocol
    /// (what waits on them ends incomplete), their guests' channels down here, their
    /// control over this core's guest gone, a request of this core to them answered.
    fn members_effects(&mut self, env: &mut impl Env) {
        let suspected = self.members.take_suspected();
        self.suspected_unlogged |= suspected;
        for c in (0..MAX_PEERS).filter(|&c| suspected & (1 << c) != 0) {
            log::error!("core {c} did not answer membership probes in time: fenced");
            self.proto.fence(env, c, &mut self.stats);
            self.ctl.peer_gone(c);
            for ch in self.chans[..self.nchans].iter_mut() {
                if ch.peer.map(usize::from) == Some(c) {
                    ch.link.peer_up = false;
                    ch.link.changed = true;
                    self.links_dirty = true;
                    if !self.ended {
                        env.link_down(ch.index);
                    }
                }
            }
        }
    }

    /// One inter-core message, the unmaps it started included (all at once): the host
    /// tests' and the model's way in; the hypervisor's is [`Self::poll`], which serves the
    /// inbox between their steps.
    #[cfg(test)]
    pub fn deliver(&mut self, env: &mut impl Env, from: usize, m: &Payload) {
        self.deliver_one(env, from, m);
        for slot in self.unmaps.iter_mut() {
            if let Some((g, size)) = slot.take() {
                if env.ept_unmap(g, size).is_err() {
                    self.stats.unmap_failed = true;
                }
            }
        }
    }

    /// One inter-core message; the unmaps of the pieces a `REVOKE` took are left in
    /// `self.unmaps` (see [`Deferring`]).
    fn deliver_one(&mut self, env: &mut impl Env, from: usize, m: &Payload) {
        if members::is_member(m) {
            self.with_members(env, |me, net| me.deliver(net, from, m));
            self.members_effects(env);
            return;
        }
        if links::is_link(m) {
            // Even from a core the capability protocol fenced: a link message asks for no
            // wait, and a peer that is never told of a death would read reset rings.
            if from != self.proto.me() && from < MAX_PEERS {
                self.link_message(env, from, m);
            }
            return;
        }
        if control::is_control(m) {
            if from != self.proto.me() && !self.proto.fenced(from) {
                if let Some((req, result)) = control::Control::host_reply(m) {
                    self.ctl.host_out &= !(1 << from);
                    env.host_answer(req, result);
                } else {
                    self.ctl.deliver(from, m);
                }
            }
            return;
        }
        if from < MAX_PEERS && proto::is_request(m) {
            self.stats.requests_from[from] = self.stats.requests_from[from].saturating_add(1);
        }
        if self.deaf && proto::is_revoke(m) {
            return;
        }
        self.unmaps_left = true;
        let mut d = Deferring { env, rest: &mut self.unmaps };
        let Some(ins) =
            self.proto.deliver(&mut d, from, m, &mut self.space, &self.policy, &mut self.stats)
        else {
            return;
        };
        let result = self.accept_insert(&ins);
        if result.is_err() {
            self.stats.refused = self.stats.refused.saturating_add(1);
        }
        self.proto.reply_insert(env, ins.from, ins.req, result, &mut self.stats);
    }

    /// Core `from`'s multicast request, its copies' unmaps left in `self.unmaps` as a
    /// `REVOKE`'s are.
    fn deliver_multicast(&mut self, env: &mut impl Env, from: usize, req: &mcast::Request) {
        if from >= MAX_PEERS || self.deaf {
            return;
        }
        self.unmaps_left = true;
        let mut d = Deferring { env, rest: &mut self.unmaps };
        if self.proto.serve_multicast(&mut d, from, req, &mut self.space, &mut self.stats) {
            self.stats.requests_from[from] = self.stats.requests_from[from].saturating_add(1);
        }
    }

    /// Core `from`'s published multicast request, served at once with its unmaps: the
    /// model's way in (the model itself keeps the order [`Self::poll`] keeps).
    #[cfg(test)]
    pub fn mc_deliver(&mut self, env: &mut impl Env, from: usize) {
        let Some(req) = env.mc_read(from, self.proto.me()) else { return };
        self.deliver_multicast(env, from, &req);
        for slot in self.unmaps.iter_mut() {
            if let Some((g, size)) = slot.take() {
                if env.ept_unmap(g, size).is_err() {
                    self.stats.unmap_failed = true;
                }
            }
        }
    }

    /// Whether this core's multicast request still awaits answers.
    #[cfg(test)]
    pub fn mc_open(&self) -> bool {
        self.proto.mc_open()
    }

    /// Whether this core's multicast request still awaits core `c`'s answer.
    #[cfg(test)]
    pub fn mc_awaits(&self, c: usize) -> bool {
        self.proto.mc_awaits(c)
    }

    /// Takes the answers to this core's multicast request (the model's way in).
    #[cfg(test)]
    pub fn mc_gather(&mut self, env: &mut impl Env) -> u32 {
        self.proto.mc_gather(env, &mut self.stats, false)
    }

    /// Decides an `INSERT`: the channel must join this guest and the sender's core, the
    /// guest must have accepted a cap on it, and its space must have room. A refusal costs
    /// this guest nothing but the reply.
    fn accept_insert(&mut self, ins: &proto::InsertRequest) -> Result<u64, HvError> {
        if self.ended {
            return Err(HvError::PeerGone);
        }
        let from = ins.from;
        let c = self.chans[..self.nchans]
            .iter_mut()
            .find(|c| c.index == ins.channel && c.peer.map(usize::from) == Some(from))
            .ok_or(HvError::BadArgument)?;
        let cap = ins.cap;
        if cap.kind != CapType::Memory
            || cap.size == 0
            || !(cap.base | cap.size).is_multiple_of(vmcall_proto::caps::PAGE)
        {
            return Err(HvError::WrongType);
        }
        // A copy's id is minted by its sender's core: no core can name another's nodes.
        if ins.id.is_some_and(|id| id >> 48 != from as u64 || id == 0) {
            return Err(HvError::BadArgument);
        }
        if c.accept == 0 {
            return Err(HvError::NotAccepted);
        }
        let (h, _) = self.space.insert(cap, ins.id)?;
        c.accept -= 1;
        Ok(h)
    }

    /// A `cap_*` hypercall; `None` if `call` is not one.
    pub fn hypercall(
        &mut self,
        env: &mut impl Env,
        call: Hypercall,
        a: u64,
        b: u64,
        c: u64,
    ) -> Option<Result<u64, HvError>> {
        Some(match call {
            Hypercall::CapIdentify => self.space.get(a).map(|c| c.identify()).map_err(Into::into),
            Hypercall::CapSplit => self.space.split(a, b).map_err(Into::into),
            Hypercall::CapMap => self.map(env, a, b, c),
            Hypercall::CapUnmap => self.unmap(env, a),
            Hypercall::CapTransfer => self.transfer(env, a, b, c),
            Hypercall::CapRevoke => self.revoke(env, a),
            Hypercall::CapAccept => self.accept(a, b),
            Hypercall::GuestControl => self.control(env, a, b),
            _ => return None,
        })
    }

    /// `cap_map(slot, gpa, rights)`: only inside the grant window, only where nothing else
    /// of this guest is mapped, only with rights the cap carries. The EPT is written only
    /// after every check passed; if the EPT writer fails, it changed nothing and neither
    /// does this.
    fn map(&mut self, env: &mut impl Env, h: u64, gpa: u64, rights: u64) -> Result<u64, HvError> {
        let rights = u8::try_from(rights)
            .ok()
            .and_then(Rights::from_bits)
            .filter(|r| !r.contains(Rights::GRANT))
            .ok_or(HvError::BadArgument)?;
        let cap = *self.space.get(h)?;
        if cap.kind != CapType::Memory {
            return Err(HvError::WrongType);
        }
        let end = gpa.checked_add(cap.size).ok_or(HvError::BadAddress)?;
        if gpa < GRANT_WINDOW.0 || end > GRANT_WINDOW.1 {
            return Err(HvError::BadAddress);
        }
        let busy = self
            .space
            .live()
            .filter_map(|(_, c)| c.mapped_at.map(|m| (m, m + c.size)))
            .any(|(m, e)| gpa < e && m < end);
        if busy {
            return Err(HvError::AddressInUse);
        }
        // Every check first (the record's: rights and alignment), then the EPT a step at a
        // time with the inbox served between steps (a large cap in 4-KiB pages is hundreds
        // of thousands of entries: done at once it would keep this core deaf to the others
        // for longer than a membership probe may go unanswered). The record is written only
        // once the mapping is complete: a revoke served meanwhile finds the cap unmapped, and
        // what was mapped of it is taken out again here before the guest runs.
        self.space.check_map(h, gpa, rights)?;
        let write = rights.contains(Rights::WRITE);
        let mut g = gpa;
        while g < end {
            let len = ept_step(g, cap.base + (g - gpa), end);
            let stepped = env.ept_map(g, cap.base + (g - gpa), len, write);
            if stepped.is_ok() {
                g += len;
                if g < end {
                    self.poll(env);
                }
            }
            // A revoke served between two steps may have taken the cap.
            let gone = self.space.get(h).is_err();
            if let Err(e) = stepped.and(if gone { Err(HvError::Revoked) } else { Ok(()) }) {
                if g > gpa && self.ept_unmap_serving(env, gpa, cap.base, g - gpa).is_err() {
                    self.stats.unmap_failed = true;
                }
                return Err(e);
            }
        }
        if let Err(e) = self.space.map(h, gpa, rights) {
            // Checked above and nothing but a revoke changes the cap meanwhile (just
            // checked): unreachable, but never leave a mapping without its record.
            if self.ept_unmap_serving(env, gpa, cap.base, cap.size).is_err() {
                self.stats.unmap_failed = true;
            }
            return Err(e.into());
        }
        Ok(0)
    }

    /// Unmaps `[gpa, gpa + size)`, mapped to `hpa` (the steps depend on both), a step at a
    /// time with the inbox served between steps, as [`Self::map`] mapped it. The first
    /// step's failure changed nothing (the EPT writer is all-or-nothing); a later one would
    /// leave the rest mapped, which its caller reports as a failed unmap.
    fn ept_unmap_serving(
        &mut self,
        env: &mut impl Env,
        gpa: u64,
        hpa: u64,
        size: u64,
    ) -> Result<(), HvError> {
        let end = gpa + size;
        let mut g = gpa;
        while g < end {
            let len = ept_step(g, hpa + (g - gpa), end);
            env.ept_unmap(g, len)?;
            g += len;
            if g < end {
                self.poll(env);
            }
        }
        Ok(())
    }

    /// `cap_unmap(slot) -> gpa`. The record goes first (a revoke served between the steps
    /// finds the cap unmapped and leaves the EPT to this call); the first step's failure puts
    /// it back (nothing changed), a later one stops the guest (it may still reach part).
    fn unmap(&mut self, env: &mut impl Env, h: u64) -> Result<u64, HvError> {
        let c = self.space.unmap(h)?;
        let gpa = c.mapped_at.ok_or(HvError::NotMapped)?;
        let first = ept_step(gpa, c.base, gpa + c.size);
        if let Err(e) = env.ept_unmap(gpa, first) {
            let _ = self.space.map(h, gpa, c.mapped_rights);
            return Err(e);
        }
        if first < c.size {
            self.poll(env);
            let rest = self.ept_unmap_serving(env, gpa + first, c.base + first, c.size - first);
            if let Err(e) = rest {
                self.stats.unmap_failed = true;
                return Err(e);
            }
        }
        Ok(gpa)
    }

    /// `cap_accept(endpoint, n) -> previous`.
    fn accept(&mut self, ep: u64, n: u64) -> Result<u64, HvError> {
        let idx = self.endpoint(ep)?;
        let n = u32::try_from(n).map_err(|_| HvError::BadArgument)?;
        let chan = &mut self.chans[idx];
        Ok(core::mem::replace(&mut chan.accept, n) as u64)
    }

    /// The position in `chans` of the channel behind endpoint handle `ep`.
    fn endpoint(&self, ep: u64) -> Result<usize, HvError> {
        let e = self.space.get(ep)?;
        if e.kind != CapType::Endpoint {
            return Err(HvError::WrongType);
        }
        self.chans[..self.nchans]
            .iter()
            .position(|c| c.index as u64 == e.base)
            .ok_or(HvError::BadArgument)
    }

    /// `cap_transfer(slot, endpoint, mode)`: a copy (mode bit 0 set; bits 8-15 its rights)
    /// or a move of `slot` to the peer behind `endpoint`. Waits for the answer, serving.
    fn transfer(&mut self, env: &mut impl Env, h: u64, ep: u64, mode: u64) -> Result<u64, HvError> {
        let t = self.transfer_start(env, h, ep, mode)?;
        let (v, _) = self.wait(env);
        self.transfer_finish(t, v)
    }

    /// The checks and records of a transfer, and its `INSERT` on the way.
    pub fn transfer_start(
        &mut self,
        env: &mut impl Env,
        h: u64,
        ep: u64,
        mode: u64,
    ) -> Result<Transfer, HvError> {
        let chan = self.chans[self.endpoint(ep)?];
        let peer = chan.peer.ok_or(HvError::PeerGone)?;
        if mode & !0xff01 != 0 {
            return Err(HvError::BadArgument);
        }
        let copy = mode & 1 == 1;
        let src = *self.space.get(h)?;
        if src.kind != CapType::Memory {
            return Err(HvError::WrongType);
        }
        if self.proto.fenced(peer as usize) {
            return Err(HvError::PeerGone);
        }
        let (cap, id) = if copy {
            let rights = Rights::from_bits((mode >> 8) as u8).ok_or(HvError::BadArgument)?;
            let cap = self.space.copy_of(h, rights)?;
            (cap, Some(self.space.mint()))
        } else {
            // Everything take_for_move checks but the mapping, before the mapping goes.
            self.space.movable(h)?;
            (src, None)
        };
        // Bound the rate at which this guest can aim requests at one peer: it waits
        // (serving), on its own budget.
        let gap = self.policy.transfer_gap;
        while gap > 0 && env.now().wrapping_sub(self.last_transfer[peer as usize]) < gap {
            self.poll(env);
            env.relax();
        }
        self.last_transfer[peer as usize] = env.now();
        if src.mapped_at.is_some() && !copy {
            // The receiver may map it at once: this guest's access goes first (in steps,
            // serving; a revoke meanwhile makes the move fail here).
            self.unmap(env, h)?;
            self.space.movable(h)?;
        }
        if let Some(id) = id {
            #[cfg(test)]
            let early = self.bug != Bug::RecordAfterReply;
            #[cfg(not(test))]
            let early = true;
            // Recorded before it is sent: a revoke of `h` from now on reaches the copy,
            // even while it is in flight (the REVOKE follows the INSERT on the same ring).
            if early {
                self.space.add_child(h, Child { core: peer, id })?;
            }
        }
        let now = env.now();
        self.proto.start_insert(env, now, peer, &cap, id, chan.index, &self.policy);
        Ok(Transfer { h, peer, id })
    }

    /// The end of a transfer, once the protocol has a verdict.
    pub fn transfer_finish(&mut self, t: Transfer, v: Verdict) -> Result<u64, HvError> {
        let copy = t.id.is_some();
        match v {
            Verdict::Inserted(slot) => {
                #[cfg(test)]
                if let (Bug::RecordAfterReply, Some(id)) = (self.bug, t.id) {
                    let _ = self.space.add_child(t.h, Child { core: t.peer, id });
                }
                if !copy {
                    let _ = self.space.take_for_move(t.h);
                }
                self.stats.transfers = self.stats.transfers.saturating_add(1);
                Ok(slot)
            }
            Verdict::Refused(e) => {
                if let Some(id) = t.id {
                    self.space.remove_child(Child { core: t.peer, id });
                }
                // A refused move leaves the cap here, unmapped.
                Err(e)
            }
            Verdict::Unconfirmed => {
                // The peer was fenced before it answered: it may hold the cap. A copy stays
                // recorded (a later revoke reports it unconfirmed); a move is given up by
                // this side too, so at most the fenced core holds it.
                if !copy {
                    let _ = self.space.take_for_move(t.h);
                }
                Err(HvError::Timeout)
            }
            Verdict::Revoked(_) => Err(HvError::PeerGone),
        }
    }

    /// `cap_revoke(slot) -> copies revoked`: every copy derived from `slot`, on every core,
    /// gone (unmapped, translations flushed) before it returns; `Timeout` if some core did
    /// not confirm within the deadline (that core is fenced and reported).
    fn revoke(&mut self, env: &mut impl Env, h: u64) -> Result<u64, HvError> {
        let t0 = env.now();
        let started = self.revoke_start(env, h);
        let mut work = env.now().wrapping_sub(t0);
        let v = match started {
            Ok(true) => {
                let (v, busy) = self.wait(env);
                let t1 = env.now();
                self.restore_unconfirmed(h);
                work = work.wrapping_add(busy).wrapping_add(env.now().wrapping_sub(t1));
                Self::revoke_finish(v)
            }
            Ok(false) => Ok(0),
            Err(e) => Err(e),
        };
        self.stats.revoke_tsc = self.stats.revoke_tsc.saturating_add(work);
        v
    }

    /// Records again, under `h`, the copies the last revoke of `h` could not confirm: a
    /// later revoke tries them again (and reports `Timeout` again), never `Ok(0)` over a copy
    /// that may still live. If `h` itself is gone meanwhile, its parent's revoke chased them.
    pub fn restore_unconfirmed(&mut self, h: u64) {
        for ch in self.proto.take_unconfirmed().into_iter().flatten() {
            let _ = self.space.add_child(h, ch);
        }
    }

    /// Starts a revoke; `false` if `h` has no copies (nothing to wait for).
    pub fn revoke_start(&mut self, env: &mut impl Env, h: u64) -> Result<bool, HvError> {
        let c = *self.space.get(h)?;
        let children = self.space.take_children(h)?;
        if children.iter().all(Option::is_none) {
            return Ok(false);
        }
        let now = env.now();
        self.proto.start_revoke(env, now, c.id, c.depth, children, &self.policy, &mut self.stats);
        Ok(true)
    }

    pub fn revoke_finish(v: Verdict) -> Result<u64, HvError> {
        match v {
            Verdict::Revoked((n, false)) => Ok(n),
            Verdict::Revoked((_, true)) | Verdict::Unconfirmed => Err(HvError::Timeout),
            Verdict::Inserted(_) | Verdict::Refused(_) => Err(HvError::PeerGone),
        }
    }

    /// Serves until this core's own operation is decided (the protocol's deadlines bound
    /// the wait: `expire` decides it at the latest then). Also returns the ticks spent in
    /// polls that handled messages (work, as opposed to waiting).
    fn wait(&mut self, env: &mut impl Env) -> (Verdict, u64) {
        let mut busy = 0u64;
        loop {
            let t = env.now();
            if self.poll(env) > 0 {
                busy = busy.wrapping_add(env.now().wrapping_sub(t));
            }
            if let Some(v) = self.take_verdict() {
                return (v, busy);
            }
            env.relax();
        }
    }
}
