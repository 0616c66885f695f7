// SPDX-License-Identifier: MIT OR Apache-2.0
//! Host tests of the capability system: the hypercalls' checks, the receiver's consent,
//! fencing of a silent core, flow control, and the protocol on real threads (with a
//! deadline: a protocol that hangs fails the test instead of hanging CI).

use super::proto::CREDITS;
use super::*;
use std::collections::{BTreeSet, VecDeque};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Core = CapCore<{ proto::entries_for(4) }>;
const ALL: u64 = 7;

/// A deterministic network of cores: messages wait in per-pair queues until delivered.
struct Net {
    cores: Vec<Core>,
    queues: Vec<VecDeque<Payload>>,
    ept: Vec<BTreeSet<(u64, u64)>>,
    now: u64,
    /// EPT writes fail with this error while set.
    ept_fails: Option<HvError>,
    sends: Vec<(usize, usize)>,
    /// A core's own polls read its queues while set (otherwise only [`Net::deliver`] does).
    serve_inbox: bool,
    /// Ticks a core's `relax` lets pass (0: time stands still while it waits).
    relax_step: u64,
    mc: McNet,
}

/// Multicast slots, bells and reply lines of a [`Net`] (as `instance::xcore` keeps them).
#[derive(Default)]
struct McNet {
    slot: Vec<Option<mcast::Request>>,
    bells: Vec<u64>,
    answered: Vec<u64>,
    lines: Vec<Vec<u64>>,
    /// Requests published (one write each, however many cores they name).
    published: usize,
}

impl McNet {
    fn new(n: usize) -> Self {
        McNet {
            slot: vec![None; n],
            bells: vec![0; n],
            answered: vec![0; n],
            lines: vec![vec![0; n]; n],
            published: 0,
        }
    }
}

struct NetEnv<'a> {
    me: usize,
    n: usize,
    queues: &'a mut Vec<VecDeque<Payload>>,
    ept: &'a mut BTreeSet<(u64, u64)>,
    now: u64,
    ept_fails: Option<HvError>,
    sends: &'a mut Vec<(usize, usize)>,
    serve_inbox: bool,
    relax_step: u64,
    mc: &'a mut McNet,
}

impl Env for NetEnv<'_> {
    fn mc_publish(&mut self, me: usize, req: &mcast::Request) -> bool {
        self.mc.slot[me] = Some(*req);
        self.mc.answered[me] = 0;
        self.mc.published += 1;
        for t in (0..self.n).filter(|&t| t != me && req.targets() & 1 << t != 0) {
            self.mc.bells[t] |= 1 << me;
        }
        true
    }
    fn mc_rung(&mut self, me: usize) -> u64 {
        if !self.serve_inbox {
            return 0;
        }
        core::mem::take(&mut self.mc.bells[me])
    }
    fn mc_read(&mut self, from: usize, me: usize) -> Option<mcast::Request> {
        self.mc.slot[from].map(|r| r.only(me))
    }
    fn mc_answer(&mut self, me: usize, to: usize, word: u64) {
        self.mc.lines[to][me] = word;
        self.mc.answered[to] |= 1 << me;
    }
    fn mc_answered(&mut self, me: usize) -> u64 {
        self.mc.answered[me]
    }
    fn mc_line(&mut self, me: usize, from: usize) -> u64 {
        self.mc.lines[me][from]
    }
    fn now(&mut self) -> u64 {
        self.now
    }
    fn send(&mut self, to: usize, m: &Payload) -> bool {
        let q = &mut self.queues[self.me * self.n + to];
        if q.len() >= proto::RING_SLOTS as usize {
            return false;
        }
        q.push_back(*m);
        self.sends.push((self.me, to));
        true
    }
    fn recv(&mut self) -> Option<(usize, Payload)> {
        if !self.serve_inbox {
            return None;
        }
        let (me, n) = (self.me, self.n);
        (0..n).find_map(|from| Some((from, self.queues[from * n + me].pop_front()?)))
    }
    fn kick(&mut self, _to: usize) {}
    fn relax(&mut self) {
        self.now += self.relax_step;
    }
    fn ept_map(&mut self, gpa: u64, _hpa: u64, size: u64, _w: bool) -> Result<(), HvError> {
        if let Some(e) = self.ept_fails {
            return Err(e);
        }
        self.ept.insert((gpa, size));
        Ok(())
    }
    fn ept_unmap(&mut self, gpa: u64, size: u64) -> Result<(), HvError> {
        self.ept.remove(&(gpa, size)).then_some(()).ok_or(HvError::NotMapped)
    }
}

/// The channel between cores `a` and `b` of `n` (one per pair).
fn chan(n: usize, a: usize, b: usize) -> u32 {
    let (a, b) = (a.min(b), a.max(b));
    (a * n + b) as u32
}

impl Net {
    /// `n` cores, all joined; core 0 holds a 64 KiB grant in slot 0; endpoints follow in
    /// peer order. Every guest accepts `accept` caps per channel.
    fn new(n: usize, accept: u64) -> Self {
        Self::with_revoke(n, accept, Revoke::Multicast)
    }

    /// [`Net::new`] with revoke strategy `revoke`.
    fn with_revoke(n: usize, accept: u64, revoke: Revoke) -> Self {
        let policy = Policy { deadline: 1000, transfer_gap: 0, revoke };
        let mut net = Net {
            cores: (0..n).map(|c| Core::new(c as u16, policy)).collect(),
            queues: vec![VecDeque::new(); n * n],
            ept: vec![BTreeSet::new(); n],
            now: 0,
            ept_fails: None,
            sends: vec![],
            serve_inbox: false,
            relax_step: 0,
            mc: McNet::new(n),
        };
        net.cores[0].grant(0x100_0000, 0x1_0000).unwrap();
        for c in 0..n {
            for p in (0..n).filter(|&p| p != c) {
                let ep = net.cores[c].add_channel(chan(n, c, p), Some(p as u16)).unwrap();
                if accept > 0 {
                    assert_eq!(net.call(c, Hypercall::CapAccept, ep, accept, 0), Ok(0));
                }
            }
        }
        net
    }

    fn with<R>(&mut self, c: usize, f: impl FnOnce(&mut Core, &mut NetEnv) -> R) -> R {
        let n = self.cores.len();
        let mut env = NetEnv {
            me: c,
            n,
            queues: &mut self.queues,
            ept: &mut self.ept[c],
            now: self.now,
            ept_fails: self.ept_fails,
            sends: &mut self.sends,
            serve_inbox: self.serve_inbox,
            relax_step: self.relax_step,
            mc: &mut self.mc,
        };
        let r = f(&mut self.cores[c], &mut env);
        // The time its waits let pass (none unless `relax_step` is set).
        self.now = env.now;
        r
    }

    fn call(&mut self, c: usize, h: Hypercall, a: u64, b: u64, d: u64) -> Result<u64, HvError> {
        self.with(c, |core, env| core.hypercall(env, h, a, b, d)).unwrap()
    }

    /// The endpoint handle core `c` holds for its channel to `p`.
    fn ep(&self, c: usize, p: usize) -> u64 {
        let idx = chan(self.cores.len(), c, p) as u64;
        self.cores[c]
            .space()
            .live()
            .find(|(_, k)| k.kind == CapType::Endpoint && k.base == idx)
            .map(|(h, _)| h)
            .unwrap()
    }

    /// Delivers one message from `from` to `to`, if one waits.
    fn deliver(&mut self, from: usize, to: usize) -> bool {
        let n = self.cores.len();
        let Some(m) = self.queues[from * n + to].pop_front() else { return false };
        self.with(to, |core, env| core.deliver(env, from, &m));
        true
    }

    /// Delivers everything, except what goes to or comes from `deaf`, until quiet:
    /// ring messages, multicast requests (to a core once its ring from the publisher is
    /// empty, as `poll` serves them) and their answers.
    fn settle(&mut self, deaf: Option<usize>) {
        let n = self.cores.len();
        while (0..n * n).any(|i| {
            let (f, t) = (i / n, i % n);
            Some(f) != deaf && Some(t) != deaf && self.deliver(f, t)
        }) || self.mc_step(deaf)
        {}
    }

    /// Serves one multicast request or takes one core's answers, if any; not at `deaf`.
    fn mc_step(&mut self, deaf: Option<usize>) -> bool {
        let n = self.cores.len();
        for t in (0..n).filter(|&t| Some(t) != deaf) {
            for f in (0..n).filter(|&f| self.mc.bells[t] & 1 << f != 0) {
                if self.queues[f * n + t].is_empty() {
                    self.mc.bells[t] &= !(1 << f);
                    self.with(t, |core, env| core.mc_deliver(env, f));
                    return true;
                }
            }
        }
        for c in 0..n {
            if self.mc.answered[c] != 0
                && self.cores[c].mc_open()
                && self.with(c, |core, env| core.mc_gather(env)) > 0
            {
                return true;
            }
        }
        false
    }

    fn transfer(&mut self, c: usize, h: u64, p: usize, mode: u64) -> Result<u64, HvError> {
        let ep = self.ep(c, p);
        let t = self.with(c, |core, env| core.transfer_start(env, h, ep, mode))?;
        self.settle(None);
        let v = self.cores[c].take_verdict().expect("the transfer was answered");
        self.cores[c].transfer_finish(t, v)
    }

    fn revoke(&mut self, c: usize, h: u64, deaf: Option<usize>) -> Result<u64, HvError> {
        if !self.with(c, |core, env| core.revoke_start(env, h))? {
            return Ok(0);
        }
        self.settle(deaf);
        let v = match self.cores[c].take_verdict() {
            Some(v) => v,
            None => {
                // Nobody answered: let the deadline pass.
                self.now += 100_000;
                self.with(c, |core, env| core.poll(env));
                self.settle(deaf);
                self.cores[c].take_verdict().expect("decided at the deadline")
            }
        };
        self.cores[c].restore_unconfirmed(h);
        Core::revoke_finish(v)
    }

    fn live_memory(&self, c: usize) -> usize {
        self.cores[c].space().live().filter(|(_, k)| k.kind == CapType::Memory).count()
    }
}

#[test]
fn map_checks_everything_before_the_ept_changes() {
    let mut net = Net::new(2, 0);
    let c = &mut net;
    let piece = c.call(0, Hypercall::CapSplit, 0, 0x1000, 0).unwrap();
    assert_eq!(piece, 2, "after the grant and the endpoint");
    let err = Err;
    assert_eq!(c.call(0, Hypercall::CapMap, 0, 0xc000_0000, 3), Ok(0));
    assert!(c.ept[0].contains(&(0xc000_0000, 0x1000)));
    let m = |c: &mut Net, h, gpa, r| c.call(0, Hypercall::CapMap, h, gpa, r);
    assert_eq!(m(c, piece, 0x1000_0000, 1), err(HvError::BadAddress), "outside the window");
    assert_eq!(m(c, piece, 0xffff_f000, 1), err(HvError::BadAddress), "runs past it");
    assert_eq!(m(c, piece, u64::MAX - 0xfff, 1), err(HvError::BadAddress), "wraps");
    assert_eq!(m(c, piece, 0xc000_0000, 1), err(HvError::AddressInUse));
    assert_eq!(m(c, piece, 0xbfff_f000, 1), err(HvError::BadAddress));
    assert_eq!(m(c, piece, 0xc010_0800, 1), err(HvError::Misaligned));
    assert_eq!(m(c, piece, 0xc010_0000, 4), err(HvError::BadArgument), "GRANT is not a map right");
    assert_eq!(m(c, piece, 0xc010_0000, 256), err(HvError::BadArgument));
    assert_eq!(m(c, piece, 0xc010_0000, 2), err(HvError::RightsEscalation), "write-only");
    assert_eq!(m(c, piece, 0xc010_0000, 0), err(HvError::RightsEscalation));
    let ep = c.ep(0, 1);
    assert_eq!(m(c, ep, 0xc010_0000, 1), err(HvError::WrongType));
    assert_eq!(m(c, 99, 0xc010_0000, 1), err(HvError::NoSuchSlot));
    assert_eq!(c.ept[0].len(), 1, "no refused map touched the EPT");
    // The EPT writer fails (no table frames): the cap stays unmapped, the error is precise.
    c.ept_fails = Some(HvError::NoMemory);
    assert_eq!(m(c, piece, 0xc010_0000, 1), err(HvError::NoMemory));
    assert_eq!(c.cores[0].space().get(piece).unwrap().mapped_at, None);
    c.ept_fails = None;
    assert_eq!(m(c, piece, 0xc010_0000, 1), Ok(0), "and it can be mapped later");
    assert_eq!(c.call(0, Hypercall::CapUnmap, 0, 0, 0), Ok(0xc000_0000));
    assert_eq!(c.call(0, Hypercall::CapUnmap, 0, 0, 0), err(HvError::NotMapped));
    assert_eq!(c.ept[0].len(), 1);
}

#[test]
fn a_receiver_takes_only_what_it_accepted() {
    let mut net = Net::new(2, 0);
    let copy = 1 | 1 << 8;
    assert_eq!(net.transfer(0, 0, 1, copy), Err(HvError::NotAccepted));
    assert_eq!(net.cores[1].stats.refused, 1);
    assert_eq!(net.live_memory(1), 0);
    assert_eq!(net.cores[0].space().get(0).unwrap().children().count(), 0, "record removed");
    let ep = net.ep(1, 0);
    assert_eq!(net.call(1, Hypercall::CapAccept, ep, 1, 0), Ok(0));
    assert!(net.transfer(0, 0, 1, copy).is_ok());
    assert_eq!(net.transfer(0, 0, 1, copy), Err(HvError::NotAccepted), "quota used up");
    assert_eq!(net.live_memory(1), 1);
    assert_eq!(net.call(0, Hypercall::CapAccept, 0, 1, 0), Err(HvError::WrongType));
    assert_eq!(net.call(1, Hypercall::CapAccept, 99, 1, 0), Err(HvError::NoSuchSlot));
    assert_eq!(net.call(1, Hypercall::CapAccept, ep, 1 << 40, 0), Err(HvError::BadArgument));
    assert_eq!(net.call(1, Hypercall::CapAccept, ep, 3, 0), Ok(0), "returns the old quota");
    assert_eq!(net.call(1, Hypercall::CapAccept, ep, 0, 0), Ok(3));
    // A move refused: the cap stays with its owner, unmapped.
    assert_eq!(net.transfer(0, 0, 1, 0), Err(HvError::HasCopies));
    assert_eq!(net.revoke(0, 0, None), Ok(1));
    net.call(0, Hypercall::CapMap, 0, 0xc000_0000, 3).unwrap();
    assert_eq!(net.transfer(0, 0, 1, 0), Err(HvError::NotAccepted));
    let kept = *net.cores[0].space().get(0).unwrap();
    assert_eq!(kept.mapped_at, None);
    assert!(net.ept[0].is_empty());
    // The receiver ended: refused with PeerGone.
    net.call(1, Hypercall::CapAccept, ep, 5, 0).unwrap();
    net.cores[1].end();
    assert_eq!(net.transfer(0, 0, 1, 0), Err(HvError::PeerGone));
}

#[test]
fn forged_inserts_are_refused() {
    let mut net = Net::new(3, 4);
    // An INSERT naming a copy id minted by another core than its sender.
    let ch = chan(3, 0, 1) as u64;
    let evil = [1 | 42 << 32, 1 | 7 << 8 | 1 << 24, 0x5000_0000, 0x1000, ch, 2 << 48 | 9, 0];
    net.with(1, |core, env| core.deliver(env, 0, &evil));
    // Through a channel that does not join the two cores (channel of 1-2 from core 0).
    let mut wrong = evil;
    wrong[5] = 9;
    wrong[4] = chan(3, 1, 2) as u64;
    net.with(1, |core, env| core.deliver(env, 0, &wrong));
    // An endpoint, and a misaligned region.
    let mut ep = evil;
    ep[1] = 2 | 7 << 8;
    net.with(1, |core, env| core.deliver(env, 0, &ep));
    let mut odd = evil;
    odd[5] = 9;
    odd[3] = 0x1001;
    net.with(1, |core, env| core.deliver(env, 0, &odd));
    assert_eq!(net.live_memory(1), 0);
    let replies: Vec<u64> = net.queues[3].iter().map(|m| m[1]).collect();
    assert_eq!(
        replies,
        [
            HvError::BadArgument.to_rax(),
            HvError::BadArgument.to_rax(),
            HvError::WrongType.to_rax(),
            HvError::WrongType.to_rax()
        ]
    );
    assert_eq!(net.cores[1].stats.refused, 4);
    assert_eq!(net.cores[1].stats.requests_from[0], 4);
}

#[test]
fn revoke_reaches_split_pieces_and_copies_of_copies() {
    let mut net = Net::new(3, 4);
    let c1 = net.transfer(0, 0, 1, 1 | ALL << 8).unwrap();
    // The holder splits its copy and passes a piece on; maps the other.
    let p2 = net.call(1, Hypercall::CapSplit, c1, 0x8000, 0).unwrap();
    net.call(1, Hypercall::CapMap, c1, 0xc000_0000, 1).unwrap();
    let c2 = net.transfer(1, p2, 2, 1 | ALL << 8).unwrap();
    net.call(2, Hypercall::CapMap, c2, 0xc000_0000, 3).unwrap();
    // A copy cannot move on.
    assert_eq!(net.transfer(2, c2, 0, 0), Err(HvError::NotOwner));
    assert_eq!(net.revoke(0, 0, None), Ok(2));
    assert_eq!((net.live_memory(1), net.live_memory(2)), (0, 0));
    assert!(net.ept[1].is_empty() && net.ept[2].is_empty(), "every mapping gone");
    assert_eq!(net.call(1, Hypercall::CapIdentify, c1, 0, 0), Err(HvError::Revoked));
    assert_eq!(net.call(1, Hypercall::CapIdentify, p2, 0, 0), Err(HvError::Revoked));
    assert!(net.cores[0].idle() && net.cores[1].idle() && net.cores[2].idle());
}

#[test]
fn copies_go_only_so_deep() {
    let mut net = Net::new(2, 16);
    let mut h = 0;
    let mut on = 0;
    for _ in 0..vmcall_proto::caps::MAX_DEPTH {
        h = net.transfer(on, h, 1 - on, 1 | ALL << 8).unwrap();
        on = 1 - on;
    }
    assert_eq!(net.transfer(on, h, 1 - on, 1 | ALL << 8), Err(HvError::TooDeep));
    assert_eq!(net.revoke(0, 0, None), Ok(4));
}

#[test]
fn a_silent_core_is_fenced_and_revoke_returns_timeout() {
    let mut net = Net::new(3, 4);
    net.transfer(0, 0, 1, 1 | 1 << 8).unwrap();
    net.transfer(0, 0, 2, 1 | 1 << 8).unwrap();
    // Core 2 stops answering: the revoke ends at its deadline, core 2 fenced.
    assert_eq!(net.revoke(0, 0, Some(2)), Err(HvError::Timeout));
    assert_eq!(net.cores[0].stats.fenced, 1 << 2);
    assert_eq!(net.live_memory(1), 0, "the answering holder's copy is gone");
    assert!(net.cores[0].idle());
    // Nothing more goes to a fenced core; what it sends late is ignored.
    assert_eq!(net.transfer(0, 0, 2, 1 | 1 << 8), Err(HvError::PeerGone));
    net.settle(None);
    assert!(net.cores[0].idle());
    // The copy on the fenced core may still live: its record came back, so revoking again
    // says Timeout again, never Ok over it.
    let root = *net.cores[0].space().get(0).unwrap();
    assert_eq!(root.children().collect::<Vec<_>>().len(), 1, "the unconfirmed copy's record");
    // The others still work; the revoke takes back the new copy and still reports the
    // unconfirmed one.
    assert!(net.transfer(0, 0, 1, 1 | 1 << 8).is_ok());
    assert_eq!(net.revoke(0, 0, None), Err(HvError::Timeout));
    assert_eq!(net.live_memory(1), 0);
}

#[test]
fn copies_alternating_between_two_cores_do_not_deadlock_a_revoke() {
    // The review's attack: chains of copies that alternate between two colluding cores,
    // deeper than the credits: with one shared credit class the walk deadlocked until the
    // deadline (Timeout, a fenced core), and a later ancestor revoke returned Ok over live
    // copies. Credit classes by depth make it complete.
    let mut net = Net::new(3, 100);
    let a1 = net.transfer(0, 0, 1, 1 | ALL << 8).unwrap();
    for i in 0..4u64 {
        let b2 = net.transfer(1, a1, 2, 1 | ALL << 8).unwrap();
        let a3 = net.transfer(2, b2, 1, 1 | ALL << 8).unwrap();
        let b4 = net.transfer(1, a3, 2, 1 | 3 << 8).unwrap();
        net.call(2, Hypercall::CapMap, b4, 0xc000_0000 + (i << 20), 3).unwrap();
    }
    // The holder revokes its own copy's copies while the owner revokes the holder's copy.
    assert!(net.with(1, |core, env| core.revoke_start(env, a1)).unwrap());
    assert!(net.with(0, |core, env| core.revoke_start(env, 0)).unwrap());
    net.settle(None);
    // Between them the two revokes took back all 13 nodes (a1, and 4 chains of 3).
    let owner = Core::revoke_finish(net.cores[0].take_verdict().unwrap()).unwrap();
    let holder = Core::revoke_finish(net.cores[1].take_verdict().unwrap()).unwrap();
    assert_eq!(owner + holder, 13, "owner {owner}, holder {holder}");
    assert_eq!((net.live_memory(1), net.live_memory(2)), (0, 0));
    assert!(net.ept[2].is_empty(), "no copy of a copy stays mapped");
    assert_eq!(net.cores.iter().map(|c| c.stats.fenced).sum::<u64>(), 0, "nobody fenced");
}

#[test]
fn the_owner_alone_takes_back_alternating_chains() {
    let mut net = Net::new(3, 100);
    let a1 = net.transfer(0, 0, 1, 1 | ALL << 8).unwrap();
    for _ in 0..4 {
        let b2 = net.transfer(1, a1, 2, 1 | ALL << 8).unwrap();
        let a3 = net.transfer(2, b2, 1, 1 | ALL << 8).unwrap();
        net.transfer(1, a3, 2, 1 | 3 << 8).unwrap();
    }
    assert_eq!(net.revoke(0, 0, None), Ok(13));
    assert_eq!((net.live_memory(1), net.live_memory(2)), (0, 0));
}

#[test]
fn after_an_incomplete_revoke_an_ancestor_never_gets_ok() {
    // Owner 0 copies to 1, 1 copies on to 2, and 2 stops answering revokes. The holder's
    // own revoke is incomplete; the owner's later revoke must not return Ok past it.
    let mut net = Net::new(3, 4);
    let a1 = net.transfer(0, 0, 1, 1 | ALL << 8).unwrap();
    net.transfer(1, a1, 2, 1 | 1 << 8).unwrap();
    net.cores[2].deafen();
    assert_eq!(net.revoke(1, a1, None), Err(HvError::Timeout));
    assert_eq!(net.revoke(0, 0, None), Err(HvError::Timeout), "core 1 knows it lost track");
}

#[test]
fn flow_control_keeps_rings_from_overflowing() {
    // Sixteen copies on one core: the revoke sends at most CREDITS at a time.
    let mut net = Net::with_revoke(2, 64, Revoke::Broadcast);
    for _ in 0..vmcall_proto::caps::MAX_CHILDREN {
        net.transfer(0, 0, 1, 1 | 1 << 8).unwrap();
    }
    assert_eq!(net.transfer(0, 0, 1, 1 | 1 << 8), Err(HvError::TooManyCopies));
    net.sends.clear();
    assert!(net.with(0, |core, env| core.revoke_start(env, 0)).unwrap());
    assert_eq!(net.queues[1].len(), CREDITS as usize, "only CREDITS in flight");
    net.settle(None);
    let v = net.cores[0].take_verdict().unwrap();
    assert_eq!(Core::revoke_finish(v), Ok(16));
    assert_eq!(net.live_memory(1), 0);
    // Revoked slots are reused: the holder can take sixteen more.
    for _ in 0..16 {
        net.transfer(0, 0, 1, 1 | 1 << 8).unwrap();
    }
}

#[test]
fn racing_a_revoke_against_the_holders_own_revoke() {
    // The case the model checker found: the holder revokes its copy's copies while the
    // owner revokes the holder's copy; the owner's revoke must not return first.
    let mut net = Net::with_revoke(3, 4, Revoke::Broadcast);
    let c1 = net.transfer(0, 0, 1, 1 | ALL << 8).unwrap();
    net.transfer(1, c1, 2, 1 | ALL << 8).unwrap();
    assert!(net.with(1, |core, env| core.revoke_start(env, c1)).unwrap());
    assert!(net.with(0, |core, env| core.revoke_start(env, 0)).unwrap());
    // Owner's REVOKE reaches the holder before the holder's own REVOKE reaches core 2.
    assert!(net.deliver(0, 1));
    assert!(net.deliver(1, 0) || net.cores[0].take_verdict().is_none());
    assert_eq!(net.cores[0].take_verdict(), None, "the owner waits for core 2");
    assert_eq!(net.live_memory(2), 1);
    net.settle(None);
    assert_eq!(net.live_memory(2), 0);
    assert_eq!(Core::revoke_finish(net.cores[0].take_verdict().unwrap()), Ok(1));
}

#[test]
fn a_multicast_revoke_writes_one_request_and_no_ring_message() {
    // Four holders, and sixteen copies on one core: one request each time, every answer
    // in a reply line, nothing on the rings.
    for (n, per_core) in [(5, 1), (2, 16)] {
        let mut net = Net::new(n, 64);
        for h in 1..n {
            for _ in 0..per_core {
                net.transfer(0, 0, h, 1 | 1 << 8).unwrap();
            }
        }
        net.sends.clear();
        let k = ((n - 1) * per_core) as u64;
        assert_eq!(net.revoke(0, 0, None), Ok(k));
        assert_eq!(net.mc.published, 1);
        assert!(net.sends.is_empty(), "no ring message: {:?}", net.sends);
        assert!((1..n).all(|h| net.live_memory(h) == 0));
        assert!(net.cores.iter().all(|c| c.idle()));
        assert_eq!(net.cores[1].stats.requests_from[0], 1 + per_core as u32, "inserts + one");
    }
}

#[test]
fn a_multicast_holder_with_copies_of_its_own_declines_and_is_asked_on_the_ring() {
    let mut net = Net::new(4, 4);
    let c1 = net.transfer(0, 0, 1, 1 | ALL << 8).unwrap();
    net.transfer(0, 0, 3, 1 | ALL << 8).unwrap();
    let c2 = net.transfer(1, c1, 2, 1 | ALL << 8).unwrap();
    net.call(2, Hypercall::CapMap, c2, 0xc000_0000, 1).unwrap();
    net.sends.clear();
    assert_eq!(net.revoke(0, 0, None), Ok(3));
    assert!((1..4).all(|h| net.live_memory(h) == 0) && net.ept[2].is_empty());
    // Core 3 answered in its line; core 1 declined: one REVOKE to it, one on to core 2.
    assert_eq!(net.sends, [(0, 1), (1, 2), (2, 1), (1, 0)]);
    assert!(net.cores.iter().all(|c| c.idle()));
}

#[test]
fn racing_a_multicast_revoke_against_the_holders_own_revoke() {
    // As the broadcast case above: the holder's own revoke of its copy's copies is under
    // way when the owner's request arrives; the holder declines, and the REVOKE it is then
    // sent waits for core 2.
    let mut net = Net::new(3, 4);
    let c1 = net.transfer(0, 0, 1, 1 | ALL << 8).unwrap();
    net.transfer(1, c1, 2, 1 | ALL << 8).unwrap();
    assert!(net.with(1, |core, env| core.revoke_start(env, c1)).unwrap());
    assert!(net.with(0, |core, env| core.revoke_start(env, 0)).unwrap());
    net.with(1, |core, env| core.mc_deliver(env, 0));
    assert_eq!(net.with(0, |core, env| core.mc_gather(env)), 1);
    assert!(net.deliver(0, 1), "declined: asked by REVOKE");
    assert_eq!(net.cores[0].take_verdict(), None, "the owner waits for core 2");
    assert_eq!(net.live_memory(2), 1);
    net.settle(None);
    assert_eq!(net.live_memory(2), 0);
    assert!(Core::revoke_finish(net.cores[0].take_verdict().unwrap()).is_ok());
}

#[test]
fn a_late_multicast_answer_from_a_fenced_core_is_never_taken() {
    let mut net = Net::new(3, 4);
    net.transfer(0, 0, 1, 1 | 1 << 8).unwrap();
    net.transfer(0, 0, 2, 1 | 1 << 8).unwrap();
    assert_eq!(net.revoke(0, 0, Some(2)), Err(HvError::Timeout));
    assert_eq!(net.cores[0].stats.fenced, 1 << 2);
    // Core 2 answers the old request late: it names that request, and a fenced core.
    net.with(2, |core, env| core.mc_deliver(env, 0));
    assert_ne!(net.mc.answered[0] & 1 << 2, 0);
    // The record of core 2's copy came back: a later revoke reports it again.
    net.transfer(0, 0, 1, 1 | 1 << 8).unwrap();
    assert_eq!(net.revoke(0, 0, Some(2)), Err(HvError::Timeout));
    assert_eq!(net.live_memory(1), 0);
    assert!(net.cores[0].idle());
}

// ---- The protocol on real threads ---------------------------------------------------

type Maps = Arc<Mutex<Vec<(u64, u64)>>>;

struct ThreadEnv {
    me: usize,
    inbox: Receiver<(usize, Payload)>,
    peers: Vec<Sender<(usize, Payload)>>,
    maps: Arc<Mutex<Vec<(u64, u64)>>>,
    start: Instant,
}

impl Env for ThreadEnv {
    fn now(&mut self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
    fn send(&mut self, to: usize, m: &Payload) -> bool {
        self.peers[to].send((self.me, *m)).is_ok()
    }
    fn recv(&mut self) -> Option<(usize, Payload)> {
        self.inbox.try_recv().ok()
    }
    fn kick(&mut self, _to: usize) {}
    fn ept_map(&mut self, gpa: u64, _hpa: u64, size: u64, _w: bool) -> Result<(), HvError> {
        self.maps.lock().unwrap().push((gpa, size));
        Ok(())
    }
    fn ept_unmap(&mut self, gpa: u64, size: u64) -> Result<(), HvError> {
        let mut m = self.maps.lock().unwrap();
        let i = m.iter().position(|&x| x == (gpa, size)).ok_or(HvError::NotMapped)?;
        m.remove(i);
        Ok(())
    }
    fn relax(&mut self) {
        std::thread::yield_now();
    }
}

/// Runs `work` on one thread per core; each keeps serving until all are done. Fails (does
/// not hang) if the protocol does not finish within 60 s.
fn threads(n: usize, work: fn(usize, &mut Core, &mut ThreadEnv)) -> Vec<(Core, Maps)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| channel()).unzip();
    let done = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = rxs
        .into_iter()
        .enumerate()
        .map(|(me, inbox)| {
            let peers = txs.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                // 1 s per level: generous, so only a real hang trips it.
                let policy =
                    Policy { deadline: 1_000_000, transfer_gap: 0, revoke: Revoke::Broadcast };
                let mut core = Core::new(me as u16, policy);
                core.grant(0x100_0000 * (me as u64 + 1), 0x1_0000).unwrap();
                for p in (0..n).filter(|&p| p != me) {
                    let ep = core.add_channel(chan(n, me, p), Some(p as u16)).unwrap();
                    let mut env = ThreadEnv {
                        me,
                        inbox: channel().1,
                        peers: vec![],
                        maps: Default::default(),
                        start: Instant::now(),
                    };
                    core.hypercall(&mut env, Hypercall::CapAccept, ep, 100, 0);
                }
                let maps = Arc::new(Mutex::new(Vec::new()));
                let mut env =
                    ThreadEnv { me, inbox, peers, maps: maps.clone(), start: Instant::now() };
                work(me, &mut core, &mut env);
                done.fetch_add(1, Ordering::SeqCst);
                while done.load(Ordering::SeqCst) < n {
                    core.poll(&mut env);
                    std::thread::yield_now();
                }
                core.poll(&mut env);
                (core, maps)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !handles.iter().all(|h| h.is_finished()) {
        assert!(Instant::now() < deadline, "the protocol did not finish in 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    handles.into_iter().map(|h| h.join().expect("core thread")).collect()
}

/// A holder's part: serve until the read-only copy arrives, then map it (the threads'
/// harness bounds the wait).
fn map_the_copy(core: &mut Core, env: &mut ThreadEnv) {
    let h = loop {
        core.poll(env);
        let got = core.space().live().find(|(_, k)| k.rights == Rights::READ);
        if let Some((h, _)) = got {
            break h;
        }
        std::thread::yield_now();
    };
    assert_eq!(core.hypercall(env, Hypercall::CapMap, h, 0xc000_0000, 1), Some(Ok(0)));
}

/// After the revoke: no core but the owner holds or maps a copy.
fn no_holder_keeps_a_copy(out: &[(Core, Maps)]) {
    for (i, (core, maps)) in out.iter().enumerate().skip(1) {
        assert!(core.space().live().all(|(_, k)| k.rights != Rights::READ), "core {i}");
        assert!(maps.lock().unwrap().is_empty(), "core {i} still maps a revoked copy");
    }
}

fn ep_of(core: &Core, n: usize, me: usize, p: usize) -> u64 {
    let idx = chan(n, me, p) as u64;
    core.space()
        .live()
        .find(|(_, k)| k.kind == CapType::Endpoint && k.base == idx)
        .map(|(h, _)| h)
        .unwrap()
}

#[test]
fn copies_to_two_cores_are_revoked_everywhere_on_threads() {
    let out = threads(3, |me, core, env| {
        if me == 0 {
            for p in [1, 2] {
                let ep = ep_of(core, 3, 0, p);
                core.hypercall(env, Hypercall::CapTransfer, 0, ep, 1 | 1 << 8).unwrap().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
            let n = core.hypercall(env, Hypercall::CapRevoke, 0, 0, 0).unwrap();
            assert_eq!(n, Ok(2));
        } else {
            // Wait for the copy (serving), map it.
            map_the_copy(core, env);
        }
    });
    no_holder_keeps_a_copy(&out);
}

#[test]
fn racing_revokes_in_opposite_directions_finish_on_threads() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static READY: AtomicUsize = AtomicUsize::new(0);
    for _ in 0..30 {
        READY.store(0, Ordering::SeqCst);
        let out = threads(2, |me, core, env| {
            let ep = ep_of(core, 2, me, 1 - me);
            core.hypercall(env, Hypercall::CapTransfer, 0, ep, 1 | 5 << 8).unwrap().unwrap();
            // Wait until the peer's copy arrived, then pass it back and revoke at once.
            let h = loop {
                core.poll(env);
                if let Some((h, _)) = core.space().live().find(|(_, k)| k.depth == 1) {
                    break h;
                }
                std::thread::yield_now();
            };
            let _ = core.hypercall(env, Hypercall::CapTransfer, h, ep, 1 | 1 << 8);
            READY.fetch_add(1, Ordering::SeqCst);
            while READY.load(Ordering::SeqCst) < 2 {
                core.poll(env);
                std::thread::yield_now();
            }
            let r = core.hypercall(env, Hypercall::CapRevoke, 0, 0, 0).unwrap();
            assert!(r.is_ok(), "{r:?}");
        });
        for (core, _) in &out {
            assert!(core.space().get(0).is_ok(), "own region kept");
            assert!(core.space().live().all(|(_, k)| k.depth == 0), "no copy survives");
            assert!(core.idle());
        }
    }
}

#[test]
fn a_revoke_that_cannot_unmap_marks_the_guest_for_stopping() {
    let mut net = Net::new(2, 4);
    let h = net.transfer(0, 0, 1, 1 | 1 << 8).unwrap();
    net.call(1, Hypercall::CapMap, h, 0xc000_0000, 1).unwrap();
    assert!(!net.cores[1].stats.unmap_failed);
    // The EPT and the record disagree (a broken invariant): the revoke still completes,
    // and the holder's core learns it must stop its guest.
    net.ept[1].clear();
    assert_eq!(net.revoke(0, 0, None), Ok(1));
    assert!(net.cores[1].stats.unmap_failed);
    assert!(!net.cores[0].stats.unmap_failed);
}

#[test]
fn policy_defaults_follow_the_tsc_rate() {
    let p = Policy::from_tsc_per_ms(4000);
    assert_eq!(
        p,
        Policy { deadline: 200_000, transfer_gap: 40, revoke: Revoke::Multicast },
        "50 ms per level, 100/ms"
    );
}

#[test]
fn endpoints_carry_read_and_write_only() {
    let net = Net::new(2, 0);
    let ep = net.ep(0, 1);
    let cap = *net.cores[0].space().get(ep).unwrap();
    assert_eq!((cap.kind, cap.rights), (CapType::Endpoint, Rights::READ | Rights::WRITE));
}

#[test]
fn a_deafened_core_drops_revokes_and_is_fenced() {
    let mut net = Net::new(2, 4);
    net.transfer(0, 0, 1, 1 | 1 << 8).unwrap();
    net.cores[1].deafen();
    assert_eq!(net.revoke(0, 0, None), Err(HvError::Timeout));
    assert_eq!(net.cores[0].stats.fenced, 1 << 1);
    assert_eq!(net.live_memory(1), 1, "the deaf core never revoked its copy");
}

/// An Env whose inbox is a queue, to see what `poll` does with it.
struct Inbox(VecDeque<(usize, Payload)>, Vec<(usize, Payload)>);

impl Env for Inbox {
    fn now(&mut self) -> u64 {
        0
    }
    fn send(&mut self, to: usize, m: &Payload) -> bool {
        self.1.push((to, *m));
        true
    }
    fn recv(&mut self) -> Option<(usize, Payload)> {
        self.0.pop_front()
    }
    fn kick(&mut self, _to: usize) {}
    fn ept_map(&mut self, _g: u64, _h: u64, _s: u64, _w: bool) -> Result<(), HvError> {
        Ok(())
    }
    fn ept_unmap(&mut self, _g: u64, _s: u64) -> Result<(), HvError> {
        Ok(())
    }
}

#[test]
fn poll_serves_every_waiting_message_and_counts_them() {
    let mut core =
        Core::new(1, Policy { deadline: 10, transfer_gap: 0, revoke: Revoke::Broadcast });
    let revoke = |req: u64| [proto::op::REVOKE | req << 32, 0xdead, 0, 0, 0, 0, 0];
    let mut env = Inbox((1..=3).map(|r| (0, revoke(r))).collect(), vec![]);
    assert_eq!(core.poll(&mut env), 3);
    assert_eq!(core.poll(&mut env), 0);
    // Each unknown id is answered at once: nothing revoked, complete.
    let replies: Vec<(u64, u64, u64)> =
        env.1.iter().map(|(to, m)| (*to as u64, m[0] & 0xff, m[1])).collect();
    assert_eq!(replies, [(0, proto::op::REVOKE_REPLY, 0); 3]);
    assert_eq!(core.stats.requests_from[0], 3);
    // A stray reply is no request; a message from beyond the last core is ignored.
    let reply = [proto::op::REVOKE_REPLY | 9 << 32, 1, 0, 0, 0, 0, 0];
    let mut env = Inbox([(0, reply), (MAX_PEERS, revoke(4))].into_iter().collect(), vec![]);
    assert_eq!(core.poll(&mut env), 2);
    assert_eq!(core.stats.requests_from[0], 3, "replies are not counted as requests");
    assert!(env.1.is_empty(), "nothing answered");
}

#[test]
fn in_place_initialisation_equals_a_fresh_instance() {
    let policy = Policy { deadline: 7, transfer_gap: 3, revoke: Revoke::Broadcast };
    let mut slot = Box::new(core::mem::MaybeUninit::<Core>::uninit());
    // SAFETY: a boxed, aligned slot for exactly one Core.
    let built = unsafe {
        Core::init_at(slot.as_mut_ptr(), 5, policy);
        slot.assume_init_ref().clone()
    };
    assert_eq!(built, Core::new(5, policy));
}

/// Three cores: 0 copies its region to 1, 1 copies on to 2 (each maps what it got). Then
/// 1 dies: its own copy is dropped and unmapped, 2's copy (made from 1's) is revoked.
/// Then 0 revokes: nothing is left on 1 or 2, so it returns at once, having taken nothing. Then 0 dies holding copies of nothing: nothing to revoke.
#[test]
fn a_dying_guest_takes_its_copies_with_it_and_leaves_its_originals() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static STEP: AtomicUsize = AtomicUsize::new(0);
    fn wait_step(core: &mut Core, env: &mut ThreadEnv, s: usize) {
        while STEP.load(Ordering::SeqCst) < s {
            core.poll(env);
            std::thread::yield_now();
        }
    }
    fn copy_arrives(core: &mut Core, env: &mut ThreadEnv) -> u64 {
        loop {
            core.poll(env);
            if let Some((h, _)) = core.space().live().find(|(_, k)| k.depth > 0) {
                return h;
            }
            std::thread::yield_now();
        }
    }
    STEP.store(0, Ordering::SeqCst);
    let out = threads(3, |me, core, env| match me {
        0 => {
            let ep = ep_of(core, 3, 0, 1);
            core.hypercall(env, Hypercall::CapTransfer, 0, ep, 1 | 7 << 8).unwrap().unwrap();
            wait_step(core, env, 2);
            // 1 died: its copy and the copy made from it are gone already, so the revoke
            // finds nothing to take (0) and returns as soon as core 1 answers.
            assert_eq!(core.hypercall(env, Hypercall::CapRevoke, 0, 0, 0), Some(Ok(0)));
            let r = core.retire(env);
            assert_eq!(r, Retired::default(), "nothing left to take back");
            assert!(core.space().get(0).is_ok(), "the original stays");
            STEP.store(3, Ordering::SeqCst);
        }
        1 => {
            let h = copy_arrives(core, env);
            core.hypercall(env, Hypercall::CapMap, h, 0xc000_0000, 3).unwrap().unwrap();
            let ep = ep_of(core, 3, 1, 2);
            core.hypercall(env, Hypercall::CapTransfer, h, ep, 1 | 1 << 8).unwrap().unwrap();
            wait_step(core, env, 1);
            let r = core.retire(env);
            assert_eq!(r, Retired { revoked: 1, unconfirmed: 0, dropped: 1 });
            assert_eq!(core.space().get(h).err(), Some(vmcall_proto::caps::CapError::Revoked));
            assert!(core.space().get(0).is_ok(), "its own grant stays for the next incarnation");
            // Dead: a new copy is refused until it is reborn.
            STEP.store(2, Ordering::SeqCst);
            wait_step(core, env, 3);
        }
        _ => {
            let h = copy_arrives(core, env);
            core.hypercall(env, Hypercall::CapMap, h, 0xc000_0000, 1).unwrap().unwrap();
            STEP.store(1, Ordering::SeqCst);
            wait_step(core, env, 2);
            assert!(core.space().live().all(|(_, k)| k.depth == 0), "the copy of a copy went");
            wait_step(core, env, 3);
        }
    });
    for (i, (core, maps)) in out.iter().enumerate() {
        assert!(maps.lock().unwrap().is_empty(), "core {i} still maps a copy");
        assert!(core.space().live().all(|(_, k)| k.depth == 0), "core {i}");
        assert!(core.idle(), "core {i}");
    }
}

/// Guest control on threads: core 0 controls core 1's guest. Core 1 answers its first
/// request; it sits on the second past the deadline (`Timeout`), a third request while that
/// one is unanswered is `Busy`, and once the late answer is in, requests work again. Bad
/// requests are refused before anything is sent.
#[test]
fn guest_control_is_answered_bounded_and_one_at_a_time() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static STEP: AtomicUsize = AtomicUsize::new(0);
    STEP.store(0, Ordering::SeqCst);
    let out = threads(2, |me, core, env| {
        let word = vmcall_proto::hypercall::control::state_word(1, 1, 0);
        if me == 0 {
            core.policy.deadline = 2_000; // µs in this harness: 128 ms to answer
            let h = core.add_control(1, 1).unwrap();
            let call = |core: &mut Core, env: &mut ThreadEnv, h, op| {
                core.hypercall(env, Hypercall::GuestControl, h, op, 0).unwrap()
            };
            assert_eq!(call(core, env, 0, 0), Err(HvError::WrongType), "a memory cap");
            assert_eq!(call(core, env, h | 1 << 32, 0), Err(HvError::NoSuchSlot));
            assert_eq!(call(core, env, h, 6), Err(HvError::BadArgument));
            assert_eq!(call(core, env, h, 5 | 3 << 8), Err(HvError::BadArgument), "no counter 3");
            assert_eq!(
                call(core, env, h, 1 | 1 << 8),
                Err(HvError::BadArgument),
                "STOP takes none"
            );
            let ep = ep_of(core, 2, 0, 1);
            let moved = core.hypercall(env, Hypercall::CapTransfer, h, ep, 1 | 7 << 8);
            assert_eq!(moved, Some(Err(HvError::WrongType)), "control is never passed on");
            assert_eq!(call(core, env, h, 0), Ok(word));
            assert_eq!(call(core, env, h, 0), Err(HvError::Timeout), "core 1 sits on it");
            assert_eq!(call(core, env, h, 0), Err(HvError::Busy), "one at a time");
            STEP.store(1, Ordering::SeqCst);
            while STEP.load(Ordering::SeqCst) < 2 {
                core.poll(env);
                std::thread::yield_now();
            }
            core.poll(env);
            assert_eq!(call(core, env, h, 0), Ok(word), "the late answer cleared the way");
            STEP.store(3, Ordering::SeqCst);
        } else {
            let take = |core: &mut Core, env: &mut ThreadEnv| loop {
                core.poll(env);
                if let Some(r) = core.ctl.take() {
                    return r;
                }
                std::thread::yield_now();
            };
            let (from, req, op) = take(core, env);
            assert_eq!((from, op), (0, 0));
            control::Control::answer(env, from, req, Ok(word));
            let (from, late, _) = take(core, env);
            while STEP.load(Ordering::SeqCst) < 1 {
                core.poll(env);
                std::thread::yield_now();
            }
            assert!(core.ctl.take().is_none(), "the Busy call sent nothing");
            control::Control::answer(env, from, late, Ok(word));
            STEP.store(2, Ordering::SeqCst);
            let (from, req, _) = take(core, env);
            control::Control::answer(env, from, req, Ok(word));
            while STEP.load(Ordering::SeqCst) < 3 {
                core.poll(env);
                std::thread::yield_now();
            }
        }
    });
    assert_eq!(out[0].0.ctl.released & !(1 << super::control::HOST), 0, "no controller let go");
}

// ---- From the hostile review of channels across restarts (each failed before its fix) ----

/// L1 (from the review of channels across restarts): after a give-up (the peer's core was
/// slow), a late ack of the first death must not count for a later one, and the dying core
/// must never reset the rings while the peer's guest may still run with the channel up.
/// Muting the peer's core after the give-up (no `LINK_UP` until its late ack) keeps the
/// peer's view down until it hears of the current incarnation; its late ack then brings
/// both ends to the next epoch.
#[test]
fn a_late_ack_never_answers_a_later_death() {
    let mut net = Net::new(2, 0);
    let pos1 = 0; // core 1's only channel
                  // Core 0's guest dies; core 1 is slow: core 0 gives up on the ack.
    net.with(0, |c, env| {
        c.retire(env);
        c.links_down(env);
    });
    assert!(!net.cores[0].links_acked());
    net.cores[0].links_give_up();
    // Incarnation 2 starts: core 1 is muted, so no LINK_UP leaves.
    net.cores[0].reborn();
    net.with(0, |c, env| c.links_up(env));
    assert_eq!(net.queues[1].len(), 1, "only DOWN(1) is queued for core 1");
    // Incarnation 2 dies before core 1 answers: nothing is sent (muted), the peer counts
    // as down, and core 1's guest has not been told of any incarnation after the first.
    net.with(0, |c, env| {
        c.retire(env);
        c.links_down(env);
    });
    assert!(net.cores[0].links_acked(), "a muted peer is given up on at once");
    assert!(net.deliver(0, 1), "core 1 catches up: DOWN(1)");
    assert!(!net.cores[1].take_link(pos1).unwrap().peer_up, "core 1 shows the channel down");
    // Its late ack (of incarnation 1) unmutes core 1 and tells it of the current one.
    net.cores[0].reborn();
    assert!(net.deliver(1, 0));
    assert!(net.deliver(0, 1), "LINK_UP of incarnation 3");
    let (l0, l1) = (net.cores[0].take_link(0).unwrap(), net.cores[1].take_link(pos1).unwrap());
    assert!(l0.peer_up && l1.peer_up, "{l0:?} {l1:?}");
    assert_eq!(l0.epoch(net.cores[0].incarnation()), l1.epoch(net.cores[1].incarnation()));
}

/// L2 (fixed: a slow peer's core is muted after a give-up): how many link messages can sit in one inter-core ring when the receiving core does
/// not serve (or is slow) while the sender's guest dies again and again (give-up after the
/// deadline each time): one DOWN and one UP per restart, with no bound but the ring. When
/// it is full, `links_send` takes the peer as "down and done with" and the messages the
/// budget was reserved for (capability requests, guest control) now share a full ring.
#[test]
fn repeated_deaths_with_a_slow_peer_keep_its_ring_within_budget() {
    let mut net = Net::new(2, 0);
    for _ in 0..(proto::RING_SLOTS as usize) {
        net.with(0, |c, env| {
            c.retire(env);
            c.links_down(env);
        });
        net.cores[0].links_give_up();
        net.cores[0].reborn();
        net.with(0, |c, env| c.links_up(env));
    }
    assert!(
        net.queues[1].len() <= 3,
        "{} link messages queued 0->1 (the ring budget reserves 3 for links)",
        net.queues[1].len()
    );
}

/// L3 (fixed: link messages pass capability fences): once a core has fenced another (one revoke it waited on timed out, e.g. while that
/// core was busy zeroing for a restart), it drops every link message from it. The fenced
/// core's guest then dies: its `LINK_DOWN` is ignored, it waits out the ack deadline, gives
/// up and resets the rings, while the honest guest on the fencing core still runs with its
/// status page saying "up" in the old epoch (and never hears of the new incarnation's
/// `LINK_UP` either): it reads the reset rings as `Corrupt`/`BadAck`, or waits for ever.
#[test]
fn a_fenced_peer_still_hears_of_a_death() {
    let mut net = Net::new(2, 4);
    // Core 0's guest copies a cap to core 1's; core 1 is slow to answer the revoke.
    net.transfer(0, 0, 1, 1 | 1 << 8).unwrap();
    assert_eq!(net.revoke(0, 0, Some(1)), Err(HvError::Timeout));
    assert_eq!(net.cores[0].stats.fenced, 1 << 1);
    net.settle(None);
    let _ = net.cores[0].take_link(0);
    // Core 1's guest dies (it is free to restart: the unconfirmed copy is core 0's worry).
    net.with(1, |c, env| {
        c.retire(env);
        c.links_down(env);
    });
    net.settle(None);
    let core1_acked = net.cores[1].links_acked();
    let link0 = net.cores[0].take_link(0).unwrap();
    assert!(
        !link0.peer_up || core1_acked,
        "core 0 ignored the LINK_DOWN (link still {link0:?}) and core 1 got no ack: it will \
         give up after 80 deadlines and reset the rings under core 0's running guest"
    );
}

/// Checked sound: both ends die at once and restart, every delivery order of the four
/// messages between the deaths and the `LINK_UP`s: both ends end up in the same epoch, up.
#[test]
fn both_ends_restarting_agree_on_the_epoch() {
    // Orders in which the two cores serve their inboxes between the steps.
    for order in 0..8u32 {
        let mut net = Net::new(2, 0);
        for c in 0..2 {
            net.with(c, |k, env| {
                k.retire(env);
                k.links_down(env);
            });
        }
        // Acks (delivery order varies).
        if order & 1 == 0 {
            net.deliver(0, 1);
            net.deliver(1, 0);
        } else {
            net.deliver(1, 0);
            net.deliver(0, 1);
        }
        net.settle(None);
        assert!(net.cores[0].links_acked() && net.cores[1].links_acked());
        // Restarts: core 0 first, core 1 may see its LINK_UP before its own restart.
        net.cores[0].reborn();
        net.with(0, |k, env| k.links_up(env));
        if order & 2 != 0 {
            net.settle(None);
        }
        net.cores[1].reborn();
        net.with(1, |k, env| k.links_up(env));
        if order & 4 != 0 {
            net.deliver(1, 0);
        }
        net.settle(None);
        let l0 = net.cores[0].take_link(0).unwrap();
        let l1 = net.cores[1].take_link(0).unwrap();
        let (i0, i1) = (net.cores[0].incarnation(), net.cores[1].incarnation());
        assert!(l0.peer_up && l1.peer_up, "order {order}: {l0:?} {l1:?}");
        assert_eq!(l0.epoch(i0), l1.epoch(i1), "order {order}");
    }
}

/// Review (issue 11): a hung core is fenced by its prober and by the coordinator (they
/// suspect it), but every other member only learns from the `COMMIT` that it is out of the
/// view, and `members_effects` acts on suspicions alone: there, its guests' channels never go
/// down (no `PeerGone`) and a controller's request to it is not answered at once. README:
/// "fences that core: ... its guests' channels go down at their peers (PeerGone), its
/// control over other guests ends, and a controller's request to it fails at once".
#[test]
fn a_hung_core_is_fenced_by_every_member_not_only_its_prober_and_the_coordinator() {
    let mut net = Net::new(4, 0);
    let timing = members::Timing { period: 50, timeout: 400, grace: 0 };
    for c in 0..4 {
        net.cores[c].members = members::Members::new(c, 0b1111, timing, 0);
    }
    // Core 2 hangs from the start: core 1 probes it, core 3 coordinates, core 0 neither.
    let hung = 2;
    for _ in 0..200 {
        net.now += 10;
        for c in [0, 1, 3] {
            net.with(c, |k, env| k.poll(env));
        }
        net.settle(Some(hung));
    }
    for c in [0, 1, 3] {
        let fenced = net.cores[c].members.fenced();
        assert!(fenced & (1 << hung) != 0, "core {c}'s view has core 2 out");
    }
    // Core 0's channel to core 2 (its second, peers in order 1, 2, 3).
    let link = net.cores[0].take_link(1).unwrap();
    assert!(!link.peer_up, "core 0's guest still sees its peer on the hung core up: {link:?}");
}

/// Trees: `n` cores revoking with fan-out `fanout`; core 0 copies its grant (read-only) to
/// every other core.
fn tree_net(n: usize, fanout: u8) -> Net {
    let mut net = Net::new(n, 4);
    for c in &mut net.cores {
        c.policy.revoke = Revoke::Tree { fanout };
    }
    for p in 1..n {
        net.transfer(0, 0, p, 1 | 1 << 8).unwrap();
    }
    assert!((1..n).all(|p| net.live_memory(p) == 1));
    net
}

impl Net {
    /// Core `c`'s revoke with time passing in steps of a tenth of a deadline unit, every core
    /// polled at each (so each core's deadlines fire in their order, as on hardware); cores in
    /// `deaf` get nothing delivered and say nothing.
    fn revoke_in_time(&mut self, c: usize, h: u64, deaf: &[usize]) -> Result<u64, HvError> {
        if !self.with(c, |core, env| core.revoke_start(env, h))? {
            return Ok(0);
        }
        let n = self.cores.len();
        for _ in 0..10_000 {
            while (0..n * n).any(|i| {
                let (f, t) = (i / n, i % n);
                !deaf.contains(&f) && !deaf.contains(&t) && self.deliver(f, t)
            }) {}
            if let Some(v) = self.cores[c].take_verdict() {
                self.cores[c].restore_unconfirmed(h);
                return Core::revoke_finish(v);
            }
            self.now += 100;
            for k in (0..n).filter(|k| !deaf.contains(k)) {
                self.with(k, |core, env| core.poll(env));
            }
        }
        panic!("the revoke was not decided in 1000 deadline units");
    }

    /// `REVOKE`s core `c` sent since `since` (an index into `sends`).
    fn revokes_from(&self, c: usize, since: usize) -> usize {
        self.sends[since..].iter().filter(|&&(f, _)| f == c).count()
    }
}

#[test]
fn tree_heights_follow_the_fanout() {
    use super::proto::{tree_height, TREE_HEIGHT};
    assert_eq!([0, 1, 2, 3, 4, 5, 7].map(|g| tree_height(g, 2)), [0, 1, 1, 2, 2, 2, 3]);
    assert_eq!([1, 3, 4, 5].map(|g| tree_height(g, 3)), [1, 1, 2, 2]);
    // The biggest subtree a head gets (16 copies, fan-out 2: 7 members) fits the classes.
    let most = (2..=16usize).map(|f| tree_height((16 - f).div_ceil(f), f)).max();
    assert_eq!(most, Some(TREE_HEIGHT));
}

#[test]
fn a_tree_revoke_reaches_every_holder_and_the_revoker_asks_only_its_heads() {
    for (n, fanout, asked) in [(15, 2, 2), (15, 3, 3), (8, 2, 2), (4, 3, 3), (15, 16, 14)] {
        let mut net = tree_net(n, fanout);
        let since = net.sends.len();
        assert_eq!(net.revoke(0, 0, None), Ok(n as u64 - 1), "n={n} fanout={fanout}");
        assert_eq!(net.revokes_from(0, since), asked, "n={n} fanout={fanout}");
        assert!((1..n).all(|p| net.live_memory(p) == 0), "n={n} fanout={fanout}");
        assert!(net.ept.iter().all(BTreeSet::is_empty));
        assert!(net.cores.iter().all(Core::idle), "n={n} fanout={fanout}");
        assert_eq!(net.cores[0].space().get(0).unwrap().children().count(), 0);
        assert!(net.cores.iter().all(|c| c.stats.fenced == 0));
    }
}

#[test]
fn holders_mapping_their_copies_lose_the_mappings_through_the_tree() {
    let mut net = tree_net(15, 2);
    for p in 1..15 {
        let h = net.cores[p].space().live().find(|(_, k)| k.rights == Rights::READ).unwrap().0;
        assert_eq!(net.call(p, Hypercall::CapMap, h, 0xc000_0000, 1), Ok(0));
    }
    assert_eq!(net.revoke(0, 0, None), Ok(14));
    assert!(net.ept.iter().all(BTreeSet::is_empty), "every mapping gone");
}

#[test]
fn a_deaf_head_is_fenced_and_its_members_are_asked_directly() {
    let mut net = tree_net(15, 2);
    // Core 1 is the first head (6 members below it): it drops every revoke.
    net.cores[1].deafen();
    let since = net.sends.len();
    assert_eq!(net.revoke_in_time(0, 0, &[]), Err(HvError::Timeout));
    assert_eq!(net.cores[0].stats.fenced, 1 << 1, "only the deaf head is blamed");
    assert_eq!(net.live_memory(1), 1, "the deaf core kept its copy");
    assert!((2..15).all(|p| net.live_memory(p) == 0), "every other copy is gone");
    // Its members were asked directly: 2 heads, then the first head's 6 members.
    assert_eq!(net.revokes_from(0, since), 2 + 6);
    // Only the deaf core's copy is still recorded: a later revoke says Timeout again.
    let root = *net.cores[0].space().get(0).unwrap();
    assert_eq!(root.children().map(|c| c.core).collect::<Vec<_>>(), [1]);
    assert!(net.cores.iter().enumerate().all(|(i, c)| i == 1 || c.idle()));
    assert_eq!(net.revoke_in_time(0, 0, &[]), Err(HvError::Timeout));
}

#[test]
fn a_dead_intermediate_deep_in_the_tree_is_blamed_by_its_own_head() {
    // 14 holders, fan-out 2: heads 1 and 2; head 1 carries 3..=8 and asks 3 and 4 itself,
    // 3 carrying 5 and 6, 4 carrying 7 and 8. Core 3 is dead (nothing reaches it, nothing comes back).
    let mut net = tree_net(15, 2);
    assert_eq!(net.revoke_in_time(0, 0, &[3]), Err(HvError::Timeout));
    assert_eq!(net.cores[1].stats.fenced, 1 << 3, "head 1 fenced its silent head");
    assert_eq!(net.cores[0].stats.fenced, 0, "the revoker fenced nobody: head 1 answered");
    assert_eq!(net.live_memory(3), 1);
    assert!((1..15).filter(|&p| p != 3).all(|p| net.live_memory(p) == 0));
    let root = *net.cores[0].space().get(0).unwrap();
    assert_eq!(root.children().map(|c| c.core).collect::<Vec<_>>(), [3], "only 3 unconfirmed");
}

#[test]
fn a_dead_head_and_a_dead_member_below_it_both_end_unconfirmed_in_bounded_time() {
    for dead in [[1, 3], [1, 9], [2, 14], [1, 2]] {
        let mut net = tree_net(15, 2);
        let t0 = net.now;
        assert_eq!(net.revoke_in_time(0, 0, &dead), Err(HvError::Timeout), "{dead:?}");
        // Heads of height 2: (2 * 2 + 1) L before the revoker gives them up, L for their
        // members; L = 5 units of 1000 ticks (depth 1) here.
        assert!(net.now - t0 <= 6 * 5 * 1000 + 200, "{dead:?}: took {}", net.now - t0);
        for p in 1..15 {
            assert_eq!(net.live_memory(p), dead.contains(&p) as usize, "{dead:?}: core {p}");
        }
        let root = *net.cores[0].space().get(0).unwrap();
        let mut left: Vec<_> = root.children().map(|c| c.core as usize).collect();
        left.sort();
        assert_eq!(left, dead, "exactly the dead cores' copies stay recorded");
    }
}

#[test]
fn a_head_fenced_by_membership_mid_revoke_hands_its_members_back() {
    let mut net = tree_net(15, 2);
    let since = net.sends.len();
    assert_eq!(net.with(0, |core, env| core.revoke_start(env, 0)), Ok(true));
    // The membership protocol declares head 2 failed before anything was delivered.
    net.with(0, |core, env| {
        let mut stats = Stats::default();
        core.proto.fence(env, 2, &mut stats)
    });
    assert_eq!(net.revokes_from(0, since), 2 + 6, "head 2's members asked directly at once");
    net.settle(Some(2));
    let v = net.cores[0].take_verdict().expect("decided without a deadline");
    net.cores[0].restore_unconfirmed(0);
    assert_eq!(Core::revoke_finish(v), Err(HvError::Timeout));
    assert!((1..15).filter(|&p| p != 2).all(|p| net.live_memory(p) == 0));
}

#[test]
fn copies_of_copies_below_tree_members_are_revoked_too() {
    // Holder 5 copies its copy on to core 9, which copies it on to core 12: the revoke
    // through the tree takes back the whole derivation.
    let mut net = Net::new(15, 4);
    for c in &mut net.cores {
        c.policy.revoke = Revoke::Tree { fanout: 2 };
    }
    let mut h5 = 0;
    for p in 1..15 {
        let h = net.transfer(0, 0, p, 1 | ALL << 8).unwrap();
        if p == 5 {
            h5 = h;
        }
    }
    let h9 = net.transfer(5, h5, 9, 1 | ALL << 8).unwrap();
    net.transfer(9, h9, 12, 1 | 1 << 8).unwrap();
    assert_eq!((net.live_memory(9), net.live_memory(12)), (2, 2));
    assert_eq!(net.revoke(0, 0, None), Ok(16));
    assert!((1..15).all(|p| net.live_memory(p) == 0));
    assert!(net.cores.iter().all(Core::idle));
}

#[test]
fn several_copies_on_one_core_go_through_the_tree() {
    // Two copies on each of cores 1..=7: the heads carry copies on their own core too.
    let mut net = Net::new(8, 4);
    for c in &mut net.cores {
        c.policy.revoke = Revoke::Tree { fanout: 2 };
    }
    for p in (1..8).chain(1..8) {
        net.transfer(0, 0, p, 1 | 1 << 8).unwrap();
    }
    assert_eq!(net.revoke(0, 0, None), Ok(14));
    assert!((1..8).all(|p| net.live_memory(p) == 0));
    assert!(net.cores.iter().all(Core::idle));
}

#[test]
fn a_tree_revoke_on_threads_takes_back_every_copy() {
    const N: usize = 9;
    let out = threads(N, |me, core, env| {
        if me == 0 {
            core.policy.revoke = Revoke::Tree { fanout: 2 };
            for p in 1..N {
                let ep = ep_of(core, N, 0, p);
                core.hypercall(env, Hypercall::CapTransfer, 0, ep, 1 | 1 << 8).unwrap().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
            let n = core.hypercall(env, Hypercall::CapRevoke, 0, 0, 0).unwrap();
            assert_eq!(n, Ok(N as u64 - 1));
        } else {
            map_the_copy(core, env);
        }
    });
    no_holder_keeps_a_copy(&out);
}

/// A core over a real EPT (host frames) that counts the leaf entries written between two
/// looks at the inbox (`Env::served`).
struct StepEnv {
    frames: crate::ept::tests::HostFrames,
    root: u64,
    since_served: u64,
    most: u64,
    calls: u64,
    /// Host minus guest address of the last mapping (every test maps one cap at a time).
    delta: u64,
    inbox: VecDeque<(usize, Payload)>,
    outbox: Vec<(usize, Payload)>,
}

impl StepEnv {
    fn new() -> Self {
        let mut frames = crate::ept::tests::host_frames(2048);
        let root = crate::ept::new_root(&mut frames).unwrap();
        let (inbox, outbox) = (VecDeque::new(), Vec::new());
        StepEnv { frames, root, since_served: 0, most: 0, calls: 0, delta: 0, inbox, outbox }
    }
    /// The leaves mapping `[g, g + len)` to `h` has (the EPT writer's rule: 2 MiB where
    /// both sides are aligned and 2 MiB remain, else 4 KiB).
    fn leaves(g: u64, h: u64, len: u64) -> u64 {
        const M2: u64 = 2 << 20;
        let (mut n, mut off) = (0, 0);
        while off < len {
            let big =
                (g + off).is_multiple_of(M2) && (h + off).is_multiple_of(M2) && len - off >= M2;
            off += if big { M2 } else { 4096 };
            n += 1;
        }
        n
    }
    fn wrote(&mut self, n: u64) {
        self.calls += 1;
        self.since_served += n;
        self.most = self.most.max(self.since_served);
    }
}

impl Env for StepEnv {
    fn now(&mut self) -> u64 {
        0
    }
    fn send(&mut self, to: usize, m: &Payload) -> bool {
        self.outbox.push((to, *m));
        true
    }
    fn recv(&mut self) -> Option<(usize, Payload)> {
        self.inbox.pop_front()
    }
    fn kick(&mut self, _to: usize) {}
    fn ept_map(&mut self, gpa: u64, hpa: u64, size: u64, w: bool) -> Result<(), HvError> {
        let perm = crate::ept::Perm::shared(w);
        crate::ept::map_with(&mut self.frames, self.root, gpa, hpa, size, perm)?;
        self.delta = hpa.wrapping_sub(gpa);
        self.wrote(Self::leaves(gpa, hpa, size));
        Ok(())
    }
    fn ept_unmap(&mut self, gpa: u64, size: u64) -> Result<(), HvError> {
        let hpa = gpa.wrapping_add(self.delta);
        crate::ept::unmap(&mut self.frames, self.root, gpa, size)?;
        self.wrote(Self::leaves(gpa, hpa, size));
        Ok(())
    }
    fn served(&mut self) {
        self.since_served = 0;
    }
}

/// The longest mapping a guest can ask for (a 512 MiB cap at a window offset that forces
/// 4-KiB pages: 131,072 entries) and its unmapping are written a step of at most
/// `EPT_STEP_ENTRIES` entries at a time with the inbox served between steps, and end with
/// exactly the mapping asked for; with 2-MiB pages too (fewer, larger steps).
#[test]
fn long_maps_and_unmaps_serve_the_inbox_between_steps() {
    let policy = Policy::from_tsc_per_ms(1000);
    let (base, size) = (0x4000_0000, 512 << 20);
    for (offset, most) in [(4096, EPT_STEP_ENTRIES), (0, EPT_STEP_ENTRIES)] {
        let mut core = Core::new(0, policy);
        let mut env = StepEnv::new();
        core.grant(base, size).unwrap();
        let gpa = GRANT_WINDOW.0 + offset;
        assert_eq!(core.hypercall(&mut env, Hypercall::CapMap, 0, gpa, 3), Some(Ok(0)));
        assert!(env.most <= most, "offset {offset}: {} entries in one stretch", env.most);
        let f = &mut env.frames;
        assert_eq!(crate::ept::mapped_bytes(f, env.root), size);
        assert_eq!(crate::ept::translate(f, env.root, gpa), Some(base));
        assert_eq!(crate::ept::translate(f, env.root, gpa + size - 1), Some(base + size - 1));
        assert_eq!(core.space().get(0).unwrap().mapped_at, Some(gpa));
        let steps = env.calls;
        assert!(steps > 1 || offset == 0, "offset {offset}: in {steps} steps");
        env.most = 0;
        assert_eq!(core.hypercall(&mut env, Hypercall::CapUnmap, 0, 0, 0), Some(Ok(gpa)));
        assert!(env.most <= most, "unmap, offset {offset}: {} entries in one stretch", env.most);
        assert_eq!(crate::ept::mapped_bytes(&mut env.frames, env.root), 0);
        assert_eq!(env.calls, 2 * steps, "unmapped in the steps it was mapped in");
    }
}

/// A revoke served between two steps of a mapping takes the cap: the map returns `Revoked`
/// and nothing of the cap is left mapped (the record was never written, the steps done are
/// undone before the guest runs again); the revoker gets its answer.
#[test]
fn a_revoke_served_between_map_steps_leaves_nothing_mapped() {
    let mut net = Net::new(2, 1);
    let big = net.cores[0].grant(0x4000_0000, 8 << 20).unwrap();
    let copy = net.transfer(0, big, 1, 1 | 3 << 8).unwrap();
    assert!(net.with(0, |core, env| core.revoke_start(env, big)).unwrap());
    net.serve_inbox = true;
    let gpa = GRANT_WINDOW.0 + 4096;
    assert_eq!(net.call(1, Hypercall::CapMap, copy, gpa, 1), Err(HvError::Revoked));
    assert!(net.ept[1].is_empty(), "left mapped: {:?}", net.ept[1]);
    assert!(!net.cores[1].stats.unmap_failed);
    assert_eq!(net.live_memory(1), 0);
    net.serve_inbox = false;
    net.settle(None);
    let v = net.cores[0].take_verdict().expect("answered");
    assert_eq!(Core::revoke_finish(v), Ok(1));
}

/// Every message a core receives has a defined fate in every state of its guest (the
/// hypervisor registers a guest's channels before its core first serves the inbox, so these
/// are all the states there are): set up and not accepting yet, running and accepting, dead
/// (retired: dying or down), reborn and not accepting yet (restarting), parked (dead, its
/// core asked out of the view). A controller's request is queued for the run loop in each. An `INSERT` through a real channel is answered
/// with a verdict that says what to do, never `BadArgument`: `NotAccepted` while the guest
/// does not accept (retry), `PeerGone` while it is dead (retry once the link is up again); a
/// `LINK_DOWN` is shown and acknowledged with whether the guest is alive; a `REVOKE` is
/// answered in every state.
#[test]
fn every_message_has_a_defined_fate_in_every_state_of_the_receiver() {
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum State {
        SetUp,
        Accepting,
        Dead,
        Reborn,
        /// Dead, and its core asked out of the membership view (`PARK`).
        Parked,
    }
    for state in [State::SetUp, State::Accepting, State::Dead, State::Reborn, State::Parked] {
        let mut net = Net::new(2, 0);
        let ep = net.ep(1, 0);
        if state != State::SetUp {
            assert_eq!(net.call(1, Hypercall::CapAccept, ep, 1, 0), Ok(0));
        }
        if matches!(state, State::Dead | State::Reborn | State::Parked) {
            net.with(1, |c, env| c.retire(env));
        }
        if state == State::Parked {
            net.with(1, |c, env| c.members.leave(env));
            // Its intent goes to the coordinator; the view change is the membership tests'.
            net.queues.iter_mut().for_each(|q| q.clear());
        }
        if state == State::Reborn {
            net.cores[1].reborn();
        }
        let copy = net.transfer(0, 0, 1, 1 | 3 << 8);
        match state {
            State::Accepting => assert!(copy.is_ok(), "{state:?}: {copy:?}"),
            State::Dead | State::Parked => assert_eq!(copy, Err(HvError::PeerGone), "{state:?}"),
            State::SetUp | State::Reborn => {
                assert_eq!(copy, Err(HvError::NotAccepted), "{state:?}")
            }
        }
        // The owner's revoke: a REVOKE reaches core 1 only if it holds the copy; answered.
        let held = u64::from(copy.is_ok());
        assert_eq!(net.revoke(0, 0, None), Ok(held), "{state:?}");
        assert_eq!(net.live_memory(1), 0, "{state:?}");
        // A LINK_DOWN from the peer's core: shown and acknowledged.
        let index = chan(2, 0, 1);
        let down = links::message(proto::op::LINK_DOWN, [index].into_iter(), 1, false);
        net.with(1, |c, env| c.deliver(env, 0, &down));
        let ack = net.queues[2].pop_back().expect("acknowledged");
        assert_eq!(ack[0] & 0xff, proto::op::LINK_ACK, "{state:?}");
        assert!(links::names(&ack, index), "{state:?}");
        let alive = !matches!(state, State::Dead | State::Parked);
        assert_eq!(ack[6] != 0, alive, "{state:?}: alive");
        assert!(!net.cores[1].take_link(0).unwrap().peer_up, "{state:?}");
        assert!(net.queues.iter().all(|q| q.is_empty()), "{state:?}: nothing else waits");
        // A controller's request: queued for the run loop, which answers it in every state
        // of the guest (running, down, parked), never dropped.
        let req: Payload =
            [proto::op::CONTROL | 7 << 32, vmcall_proto::hypercall::control::QUERY, 0, 0, 0, 0, 0];
        net.with(1, |c, env| c.deliver(env, 0, &req));
        assert!(net.cores[1].ctl.pending(), "{state:?}: the request waits for the run loop");
        assert_eq!(
            net.cores[1].ctl.take().map(|(from, r, _)| (from, r)),
            Some((0, 7)),
            "{state:?}"
        );
    }
}

/// Moves what `from` sent to `to` into `to`'s inbox.
fn post(from: (usize, &mut StepEnv), to: (usize, &mut StepEnv)) {
    for (dest, m) in core::mem::take(&mut from.1.outbox) {
        assert_eq!(dest, to.0);
        to.1.inbox.push_back((from.0, m));
    }
}

/// A revoke that reaches a holder with a large copy mapped in 4-KiB pages: the holder's core
/// unmaps it a step at a time with the inbox served between (the first step at once, the
/// rest before its poll returns), answers, and nothing of it stays mapped.
#[test]
fn a_revoke_of_a_large_mapped_copy_unmaps_it_in_steps() {
    let policy = Policy { deadline: 1000, transfer_gap: 0, revoke: Revoke::Broadcast };
    let (mut owner, mut holder) = (Core::new(0, policy), Core::new(1, policy));
    let (mut e0, mut e1) = (StepEnv::new(), StepEnv::new());
    let grant = owner.grant(0x4000_0000, 512 << 20).unwrap();
    let ep0 = owner.add_channel(7, Some(1)).unwrap();
    let ep1 = holder.add_channel(7, Some(0)).unwrap();
    assert_eq!(holder.hypercall(&mut e1, Hypercall::CapAccept, ep1, 1, 0), Some(Ok(0)));
    let t = owner.transfer_start(&mut e0, grant, ep0, 1 | 3 << 8).unwrap();
    post((0, &mut e0), (1, &mut e1));
    holder.poll(&mut e1);
    post((1, &mut e1), (0, &mut e0));
    owner.poll(&mut e0);
    let v = owner.take_verdict().unwrap();
    let copy = owner.transfer_finish(t, v).unwrap();
    let gpa = GRANT_WINDOW.0 + 4096;
    assert_eq!(holder.hypercall(&mut e1, Hypercall::CapMap, copy, gpa, 1), Some(Ok(0)));
    assert_eq!(crate::ept::mapped_bytes(&mut e1.frames, e1.root), 512 << 20);
    assert!(owner.revoke_start(&mut e0, grant).unwrap());
    post((0, &mut e0), (1, &mut e1));
    (e1.most, e1.since_served, e1.calls) = (0, 0, 0);
    holder.poll(&mut e1);
    assert!(e1.most <= EPT_STEP_ENTRIES, "{} entries in one stretch", e1.most);
    assert!(e1.calls > 1, "in {} steps", e1.calls);
    assert_eq!(crate::ept::mapped_bytes(&mut e1.frames, e1.root), 0);
    assert!(!holder.stats.unmap_failed);
    post((1, &mut e1), (0, &mut e0));
    owner.poll(&mut e0);
    assert_eq!(Core::revoke_finish(owner.take_verdict().unwrap()), Ok(1));
}

/// A revoke whose node the holder split into many pieces, each mapped in 4-KiB pages: the
/// `REVOKE` message itself writes no EPT entry (every piece's unmap is left to the poll), and
/// the poll unmaps them a step at a time with the inbox served between, so no stretch writes
/// more than `EPT_STEP_ENTRIES` entries, however many pieces the message takes. Before, each
/// piece's first step was written while the message was handled (16 pieces: 16 steps in one
/// stretch, 8,192 entries).
#[test]
fn a_revoke_of_many_mapped_pieces_writes_one_step_per_stretch() {
    let policy = Policy { deadline: 1000, transfer_gap: 0, revoke: Revoke::Broadcast };
    let (mut owner, mut holder) = (Core::new(0, policy), Core::new(1, policy));
    let (mut e0, mut e1) = (StepEnv::new(), StepEnv::new());
    const PIECES: u64 = 16;
    const PIECE: u64 = 4 << 20;
    let grant = owner.grant(0x4000_0000, PIECES * PIECE).unwrap();
    let ep0 = owner.add_channel(7, Some(1)).unwrap();
    let ep1 = holder.add_channel(7, Some(0)).unwrap();
    assert_eq!(holder.hypercall(&mut e1, Hypercall::CapAccept, ep1, 1, 0), Some(Ok(0)));
    let t = owner.transfer_start(&mut e0, grant, ep0, 1 | 3 << 8).unwrap();
    post((0, &mut e0), (1, &mut e1));
    holder.poll(&mut e1);
    post((1, &mut e1), (0, &mut e0));
    owner.poll(&mut e0);
    let v = owner.take_verdict().unwrap();
    let copy = owner.transfer_finish(t, v).unwrap();
    let mut pieces = vec![copy];
    for _ in 1..PIECES {
        let last = *pieces.last().unwrap();
        let rest = holder.hypercall(&mut e1, Hypercall::CapSplit, last, PIECE, 0).unwrap();
        pieces.push(rest.unwrap());
    }
    // Each piece 4 KiB past a 2-MiB boundary (4-KiB pages throughout), 8 MiB apart.
    for (k, &p) in pieces.iter().enumerate() {
        let gpa = GRANT_WINDOW.0 + 4096 + k as u64 * 2 * PIECE;
        assert_eq!(holder.hypercall(&mut e1, Hypercall::CapMap, p, gpa, 1), Some(Ok(0)));
    }
    assert_eq!(crate::ept::mapped_bytes(&mut e1.frames, e1.root), PIECES * PIECE);
    assert!(owner.revoke_start(&mut e0, grant).unwrap());
    post((0, &mut e0), (1, &mut e1));
    (e1.most, e1.since_served, e1.calls) = (0, 0, 0);
    holder.poll(&mut e1);
    assert!(e1.most <= EPT_STEP_ENTRIES, "{} entries in one stretch", e1.most);
    assert!(e1.calls >= PIECES * 2, "in {} steps", e1.calls);
    assert_eq!(crate::ept::mapped_bytes(&mut e1.frames, e1.root), 0);
    assert!(!holder.stats.unmap_failed);
    post((1, &mut e1), (0, &mut e0));
    owner.poll(&mut e0);
    assert_eq!(Core::revoke_finish(owner.take_verdict().unwrap()), Ok(1));
}

// ---- Issue 20: what expired while a core was deaf is decided on its inbox ----

/// A deaf core (`inject=deaf-core:N:MS:AFTER`, a stall) looks at no deadline while deaf.
/// When it hears again, what expired meanwhile is decided on what its inbox holds, at its
/// first poll: the answers that came are taken (its revoke `Ok(1)`, the core it probes not
/// suspected), and only what truly never came fails (the silent core fenced by the
/// capability protocol, its revoke `Timeout`), at once, not a period later. A poll that
/// looked at its deadlines before its inbox would fence the live core in the first case.
/// The membership's own verdict on the silent core is not made on what it saw before its
/// deafness: it probes again and, unanswered, takes itself for fenced.
#[test]
fn a_deaf_core_decides_what_expired_meanwhile_on_its_inbox_at_its_first_poll() {
    for silent in [false, true] {
        let mut net = Net::new(3, 4);
        net.transfer(0, 0, 1, 1 | ALL << 8).unwrap();
        let copy = |net: &Net, c: usize| {
            let mut mem = net.cores[c].space().live().filter(|(_, k)| k.kind == CapType::Memory);
            mem.next().map(|(h, _)| h).unwrap()
        };
        let h1 = copy(&net, 1);
        net.transfer(1, h1, 2, 1 | 1 << 8).unwrap();
        assert_eq!(net.live_memory(2), 1);
        // Only core 1's detector is quick enough to matter here (the others never suspect).
        let quick = members::Timing { period: 50, timeout: 400, grace: 0 };
        let patient = members::Timing { period: 50, timeout: 1 << 40, grace: 0 };
        for c in 0..3 {
            let t = if c == 1 { quick } else { patient };
            net.cores[c].members = members::Members::new(c, 0b111, t, 0);
        }
        net.serve_inbox = true;
        let poll = |net: &mut Net, c: usize| net.with(c, |k, env| k.poll(env));
        for _ in 0..20 {
            net.now += 10;
            for c in 0..3 {
                poll(&mut net, c);
            }
        }
        // Core 1's revoke of core 2's copy goes out, then its probe of core 2; it goes deaf
        // with both in flight (their deadlines: 4 x 1,000 and 400 ticks).
        assert_eq!(net.with(1, |k, env| k.revoke_start(env, h1)), Ok(true));
        while !net.queues[3 + 2].iter().any(|m| m[0] & 0xff == members::op::PING) {
            net.now += 10;
            poll(&mut net, 1);
        }
        let deaf_end = net.now + 10_000;
        net.cores[1].deafen_until(deaf_end);
        let inbox = |net: &Net| [1, 4, 7].map(|q| net.queues[q].len()).iter().sum::<usize>();
        while net.now + 100 < deaf_end {
            net.now += 100;
            let waiting = inbox(&net);
            assert_eq!(poll(&mut net, 1), 0, "deaf: nothing served");
            assert_eq!(inbox(&net), waiting, "deaf: nothing read");
            poll(&mut net, 0);
            if !silent {
                poll(&mut net, 2);
            }
        }
        assert!(net.cores[1].take_verdict().is_none(), "nothing decided while deaf");
        assert_eq!(net.cores[1].members.suspects(), 0, "nothing suspected while deaf");
        assert!(silent || inbox(&net) > 0, "the answers wait in its inbox");
        net.now = deaf_end;
        poll(&mut net, 1);
        let v = net.cores[1].take_verdict().expect("decided at the first poll after it");
        net.cores[1].restore_unconfirmed(h1);
        let revoked = Core::revoke_finish(v);
        let suspects = net.cores[1].members.suspects();
        if silent {
            assert_eq!(revoked, Err(HvError::Timeout));
            assert_eq!(net.cores[1].stats.fenced, 1 << 2, "the silent core fenced");
            // The membership's verdicts rest on what it sees from its return on (the core
            // was away 10,000 ticks, over half its timeout): the probe sent before is void,
            // a new one goes out, and a silence before any answer is taken as its own
            // fencing, not the silent core's failure (members::Members::silence).
            assert_eq!(suspects, 0, "a probe sent before its deafness suspects nobody");
            let back = net.now;
            while net.now < back + 400 / 2 + 10 {
                net.now += 10;
                poll(&mut net, 1);
                poll(&mut net, 0);
            }
            let m = &net.cores[1].members;
            assert_eq!(m.suspects(), 0, "the silent core is not taken out by this one");
            assert!(m.evicted(), "unanswered since its return: it takes itself for fenced");
        } else {
            assert_eq!(revoked, Ok(1), "the answer in its inbox counted");
            assert_eq!(net.cores[1].stats.fenced, 0, "no live core fenced");
            assert_eq!(suspects, 0, "the PONG in its inbox counted");
            assert_eq!(net.live_memory(2), 0);
        }
    }
}

/// The waits a core does with a deadline of its own (a dying guest's core waiting for its
/// peers' `LINK_ACK`s, a core's leave or join: `serve_until`) decide only after a poll that
/// read the inbox at or after the deadline: an ack that came while the core was deaf, past
/// the deadline, is taken, not given up on (which counted the peer down and muted its core,
/// as a wait that looked at the clock first did). With nothing in the inbox it gives up at
/// the deadline, not before.
#[test]
fn a_wait_that_outlives_a_deafness_takes_the_answer_waiting_in_the_inbox() {
    for (deaf, acked) in [(5_000, true), (500, false)] {
        let mut net = Net::new(2, 0);
        net.serve_inbox = true;
        net.relax_step = 10;
        net.with(0, |c, env| {
            c.retire(env);
            c.links_down(env);
        });
        assert!(!net.cores[0].links_acked());
        if acked {
            // Core 1 answers at once; core 0 cannot look until well past its deadline.
            net.with(1, |c, env| c.poll(env));
        }
        let start = net.now;
        net.cores[0].deafen_until(start + deaf);
        let deadline = start + 1_000;
        let done = net.with(0, |c, env| c.serve_until(env, deadline, |_| {}, |c| c.links_acked()));
        assert_eq!(done, acked, "deaf for {deaf}");
        let decided = net.now;
        let first_look = deadline.max(start + deaf);
        assert!((first_look..=first_look + 10).contains(&decided), "decided at {decided}");
    }
}

/// Core 0's grant copied to `direct` holders (cores 1..=direct), each of which copies its
/// copy on to `per` holders of its own (the cores after them): copies of copies, as the
/// `holder` workload relays them. Returns the leaves' cores by relay.
fn relay_net(direct: usize, per: usize, revoke: Revoke) -> (Net, Vec<Vec<usize>>) {
    let n = 1 + direct * (1 + per);
    let mut net = Net::with_revoke(n, 4, revoke);
    let mut leaves = vec![];
    for d in 1..=direct {
        let c = net.transfer(0, 0, d, 1 | ALL << 8).unwrap();
        let mine: Vec<usize> = (0..per).map(|i| 1 + direct + (d - 1) * per + i).collect();
        for &l in &mine {
            net.transfer(d, c, l, 1 | 1 << 8).unwrap();
        }
        leaves.push(mine);
    }
    net.sends.clear();
    (net, leaves)
}

#[test]
fn a_revoke_counts_its_own_messages_and_rounds_on_every_core() {
    use super::policy::RevokeCounts;
    // (strategy, direct holders, holders each relays to).
    for (revoke, direct, per) in [
        (Revoke::Broadcast, 2, 2),
        (Revoke::Broadcast, 3, 1),
        (Revoke::Multicast, 2, 2),
        (Revoke::Tree { fanout: 2 }, 4, 1),
    ] {
        let (mut net, leaves) = relay_net(direct, per, revoke);
        let before: Vec<RevokeCounts> = net.cores.iter().map(|c| c.stats.revoke).collect();
        assert!(before.iter().all(|b| *b == RevokeCounts::default()), "copies are not revokes");
        let k = (direct * (1 + per)) as u64;
        assert_eq!(net.revoke(0, 0, None), Ok(k), "{revoke:?}");
        assert!((1..net.cores.len()).all(|h| net.live_memory(h) == 0), "{revoke:?}");
        let r: Vec<RevokeCounts> = net.cores.iter().map(|c| c.stats.revoke).collect();
        // Every ring message the revoke caused was counted once where it left and once
        // where it arrived, and nothing else was (the copies' inserts came before).
        let sent: u32 = r.iter().map(|c| c.sent).sum();
        let received: u32 = r.iter().map(|c| c.received).sum();
        assert_eq!((sent as usize, received as usize), (net.sends.len(), net.sends.len()));
        for (d, mine) in leaves.iter().enumerate() {
            for &l in mine {
                // A leaf: one request in, one answer out, from and to its relay.
                assert_eq!((r[l].sent, r[l].received), (1, 1), "{revoke:?} leaf {l}");
            }
            let d = d + 1;
            let p = per as u32;
            if revoke == Revoke::Multicast {
                // It declined the multicast (its copy has copies), was asked on the ring.
                assert_eq!((r[d].mc_served, r[d].sent, r[d].received), (1, p + 1, p + 1));
            } else if revoke == Revoke::Broadcast {
                assert_eq!((r[d].sent, r[d].received), (p + 1, p + 1), "{revoke:?} {d}");
            }
        }
        let owner = &r[0];
        assert_eq!(owner.own, 1);
        match revoke {
            Revoke::Broadcast => {
                assert_eq!((owner.sent, owner.received), (direct as u32, direct as u32));
                assert_eq!(owner.rounds, 2, "the holders, then theirs");
                assert_eq!(sent, 2 * k as u32);
            }
            Revoke::Multicast => {
                // One request naming both relays; both declined, so both were asked again.
                assert_eq!((owner.mc_named, owner.mc_taken), (direct as u32, direct as u32));
                assert_eq!((owner.sent, owner.received), (direct as u32, direct as u32));
                assert_eq!(owner.rounds, 3, "the multicast, the ring, the relays' holders");
                assert_eq!(sent, 2 * k as u32);
            }
            Revoke::Tree { .. } => {
                // Two heads carrying one member each; every relay asks its one holder.
                assert_eq!((owner.sent, owner.received), (2, 2));
                assert_eq!(owner.rounds, 3, "heads, members, the members' holders");
                assert_eq!(sent, 2 * k as u32);
            }
        }
        assert!(net.cores.iter().all(|c| c.idle()));
    }
}

/// Membership view changes counted per change on every core (`caps::mcount`): 4 cores in
/// view 0, no failure detector (only the change's own messages). Core 1 asks out, then
/// back in through core 0; the cores are polled round robin (what each poll counts is one
/// exit of the run loop). Expected figures from the protocol (members/mod.rs):
/// * change 1 (core 1 out; coordinator 3, the highest): core 1's `WISH` and its
///   `WISH_ACK`, then one round: `PREPARE`, `PROMISE`, `ACCEPT`, `ACCEPTED` with each of
///   the 3 others, and a `COMMIT` to each (old view's cores): 2 + 5 x 3 = 17 messages.
/// * change 2 (core 1 back, through core 0): after the first `COMMIT` cores 0 and 2 tell
///   the coordinator the intent that `COMMIT` applied (a `WISH` each, acknowledged: the
///   protocol re-tells an applied intent, 4 messages); core 1 asks core 0 (`WISH`, ack),
///   core 0 passes it on (`WISH`, ack); the round asks the 2 others of view 1 (4 x 2) and
///   commits to cores 0, 1 and 2 (3): 4 + 4 + 8 + 3 = 19.
/// * change 3 (never made): cores 1 and 2 re-tell core 1's intent after the second
///   `COMMIT` (2 `WISH`, 2 acks): open records when the run ends.
///
/// A message counts for the change after the view its core had installed then, on each
/// side: here every message is sent and handled in the same change.
#[test]
fn membership_counts_each_view_changes_messages_rounds_and_exits_on_every_core() {
    use super::mcount::{ViewCounts, KIND_NAMES};
    let mut net = Net::new(4, 0);
    let timing = members::Timing { period: 0, timeout: 1 << 40, grace: 0 };
    for c in 0..4 {
        net.cores[c].members = members::Members::new(c, 0b1111, timing, 0);
    }
    net.serve_inbox = true;
    // Polls round robin until every ring is empty, as the run loop's serve after an exit.
    let quiesce = |net: &mut Net| {
        for _ in 0..100 {
            for c in 0..4 {
                net.with(c, |k, env| {
                    k.views.untouch(&mut k.stats.probes);
                    k.poll(env);
                    k.views.exit_served(&mut k.stats.probes);
                });
            }
            if net.queues.iter().all(|q| q.is_empty()) {
                return;
            }
        }
        panic!("the rings never emptied");
    };
    // (sent, received) by kind name, and rounds and exits, of a record.
    type Kinds = Vec<(&'static str, u32)>;
    let kinds = |v: &ViewCounts| -> (Kinds, Kinds) {
        let pick = |a: &[u32]| {
            KIND_NAMES.iter().zip(a).filter(|(_, n)| **n > 0).map(|(k, n)| (*k, *n)).collect()
        };
        (pick(&v.sent), pick(&v.received))
    };
    let take = |net: &mut Net, c: usize, num: u32| -> ViewCounts {
        let v = net.cores[c].views.take_upto(num).expect("a record");
        assert_eq!(v.num, num, "core {c}: the oldest open record");
        v
    };
    net.with(1, |k, env| k.with_members(env, |m, n| m.leave(n)));
    quiesce(&mut net);
    assert!(net.cores.iter().all(|k| k.members.view().num == 1));
    let one: Vec<ViewCounts> = (0..4).map(|c| take(&mut net, c, 1)).collect();
    for c in [0, 2] {
        let want = (
            vec![("promise", 1), ("accepted", 1)],
            vec![("prepare", 1), ("accept", 1), ("commit", 1)],
        );
        assert_eq!(kinds(&one[c]), want, "core {c}");
    }
    let want = (
        vec![("wish", 1), ("promise", 1), ("accepted", 1)],
        vec![("wish_ack", 1), ("prepare", 1), ("accept", 1), ("commit", 1)],
    );
    assert_eq!(kinds(&one[1]), want, "core 1");
    let want = (
        vec![("wish_ack", 1), ("prepare", 3), ("accept", 3), ("commit", 3)],
        vec![("wish", 1), ("promise", 3), ("accepted", 3)],
    );
    assert_eq!(kinds(&one[3]), want, "core 3, the coordinator");
    assert_eq!(one.iter().map(|v| v.rounds).collect::<Vec<_>>(), [0, 0, 0, 1]);
    assert_eq!(one.iter().map(ViewCounts::sent_total).sum::<u32>(), 2 + 5 * 3);
    assert_eq!(one.iter().map(ViewCounts::received_total).sum::<u32>(), 2 + 5 * 3);
    // Polls that counted one: the PREPARE (with the WISH_ACK on core 1), the ACCEPT, the
    // COMMIT; the coordinator's: the WISH, the 3 PROMISEs (one poll), the 3 ACCEPTEDs.
    assert_eq!(one.iter().map(|v| v.exits).collect::<Vec<_>>(), [3, 3, 3, 3]);

    net.with(1, |k, env| k.with_members(env, |m, n| m.join(n, 0)));
    quiesce(&mut net);
    assert!(net.cores.iter().all(|k| k.members.view() == members::View { num: 2, set: 0b1111 }));
    let two: Vec<ViewCounts> = (0..4).map(|c| take(&mut net, c, 2)).collect();
    let want = (
        vec![("wish", 2), ("wish_ack", 1), ("promise", 1), ("accepted", 1)],
        vec![("wish", 1), ("wish_ack", 2), ("prepare", 1), ("accept", 1), ("commit", 1)],
    );
    assert_eq!(kinds(&two[0]), want, "core 0: re-tells, then passes core 1's wish on");
    assert_eq!(kinds(&two[1]), (vec![("wish", 1)], vec![("wish_ack", 1), ("commit", 1)]));
    let want = (
        vec![("wish", 1), ("promise", 1), ("accepted", 1)],
        vec![("wish_ack", 1), ("prepare", 1), ("accept", 1), ("commit", 1)],
    );
    assert_eq!(kinds(&two[2]), want, "core 2");
    let want = (
        vec![("wish_ack", 3), ("prepare", 2), ("accept", 2), ("commit", 3)],
        vec![("wish", 3), ("promise", 2), ("accepted", 2)],
    );
    assert_eq!(kinds(&two[3]), want, "core 3");
    assert_eq!(two.iter().map(|v| v.rounds).collect::<Vec<_>>(), [0, 0, 0, 1]);
    assert_eq!(two.iter().map(ViewCounts::sent_total).sum::<u32>(), 4 + 4 + 8 + 3);
    assert_eq!(two.iter().map(ViewCounts::received_total).sum::<u32>(), 19);
    // Core 0: the first COMMIT (its WISH left), that WISH's ack, core 1's WISH, the ack
    // with the PREPARE, the ACCEPT, the COMMIT; core 1: the ack, the COMMIT; core 2 as
    // core 0 without core 1's wish; core 3: two WISHes, then one, the PROMISEs, the
    // ACCEPTEDs.
    assert_eq!(two.iter().map(|v| v.exits).collect::<Vec<_>>(), [6, 2, 5, 4]);

    // Change 3 was never made: its records stay open (the run loop prints them at its end).
    assert!(net.cores[0].views.take_any().is_none(), "core 0 told nothing more");
    let three: Vec<ViewCounts> = [1, 2, 3].map(|c| take(&mut net, c, 3)).to_vec();
    assert_eq!(kinds(&three[0]), (vec![("wish", 1)], vec![("wish_ack", 1)]));
    assert_eq!(kinds(&three[1]), (vec![("wish", 1)], vec![("wish_ack", 1)]));
    assert_eq!(kinds(&three[2]), (vec![("wish_ack", 2)], vec![("wish", 2)]));
    assert!(net.cores.iter_mut().all(|k| k.views.take_any().is_none()));
    // No detector: no probe; nothing went unattributed.
    assert!(net.cores.iter().all(|k| k.stats.probes == Default::default()));
}

/// With every record open, a message of one more change is counted as unattributed (no
/// allocation, nothing overwritten); a record taken makes room again.
#[test]
fn membership_counts_beyond_the_open_records_are_unattributed() {
    use super::mcount::{Counted, ProbeCounts, ViewLog, VIEW_RECORDS};
    use members::Net as _;
    let mut net = Net::new(2, 0);
    let (mut log, mut probes) = (ViewLog::default(), ProbeCounts::default());
    let wish: Payload = [members::op::WISH, 0, 0, 0, 0, 0, 0];
    let ping: Payload = [members::op::PING, 0, 0, 0, 0, 0, 0];
    net.with(0, |_, env| {
        let mut n = Counted { env, log: &mut log, probes: &mut probes };
        for view in 0..=VIEW_RECORDS as u32 {
            n.count(view, true, &wish);
        }
        n.count(0, true, &ping);
        n.count(0, false, &ping);
    });
    assert_eq!(probes.unattributed, 1);
    assert_eq!((probes.pings_sent, probes.pings_received), (1, 1));
    let first = log.take_upto(1).unwrap();
    assert_eq!((first.num, first.sent[0]), (1, 1));
    net.with(0, |_, env| {
        Counted { env, log: &mut log, probes: &mut probes }.count(VIEW_RECORDS as u32, true, &wish)
    });
    assert_eq!(probes.unattributed, 1, "room again");
    let nums: Vec<u32> = std::iter::from_fn(|| log.take_any()).map(|v| v.num).collect();
    assert_eq!(nums, (2..=VIEW_RECORDS as u32 + 1).collect::<Vec<_>>());
}
