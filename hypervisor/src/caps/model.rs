// SPDX-License-Identifier: MIT OR Apache-2.0
//! The capability protocol, model-checked with stateright. Each core is the hypervisor's
//! own [`CapCore`] (the code that runs on the hardware, not a re-description); the
//! network is one FIFO queue per ordered core pair, exactly as the inter-core rings; the
//! guests are nondeterministic: any guest not blocked in a hypercall may copy, move,
//! split, map, unmap or revoke any cap it holds, and any queued message may be delivered
//! next. The checker explores every interleaving up to the guests' operation budgets.
//!
//! Properties (over every reachable state):
//! * **revoke is complete**: when `cap_revoke` returns `Ok`, no node descending from the
//!   revoked piece lives in any space, nor travels in any `INSERT`;
//! * **mappings follow caps**: each core's EPT maps exactly its live caps' mappings;
//! * **rights never grow** along any copy;
//! * **rings never overflow** (flow control), **no deadlock** (a guest blocked in a
//!   hypercall always has a message on its way to unblock it), **every request answered**
//!   (when nothing is in flight, no core has an entry open).
//!
//! Multicast revokes (the default): a core's published request is one slot per core, each
//! core it names is rung, and serves it (an action of its own) only once every message its
//! publisher queued to it before the publish was delivered, the order `CapCore::poll` keeps
//! on the hardware (it drains its inbox after seeing a request, before serving it); the
//! answers are reply lines the publisher gathers (an action too), so every interleaving of
//! serving, answering and gathering with the ring messages is explored.
//!
//! Seeded bugs ([`Bug::RecordAfterReply`], [`proto::Bug::NoRecursion`],
//! [`proto::Bug::McNoDecline`]) must be found.

use super::proto::{self, entries_for, RING_SLOTS};
use super::{mcast, Bug, CapCore, Env, Policy, Revoke, Transfer};
use stateright::{Checker, Model, Property};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use vmcall_proto::caps::{CapType, Rights};
use vmcall_proto::channel::Payload;
use vmcall_proto::hypercall::{HvError, Hypercall};

const CORES: usize = 3;
type Core = CapCore<{ entries_for(CORES) }>;

/// The channel joining cores `a` and `b` (full mesh: 0-1 is 0, 0-2 is 1, 1-2 is 2).
fn chan(a: usize, b: usize) -> u32 {
    match (a.min(b), a.max(b)) {
        (0, 1) => 0,
        (0, 2) => 1,
        _ => 2,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Busy {
    Idle,
    Transfer(Transfer),
    /// Revoking the copies of this piece (core, handle).
    Revoke(usize, u64),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    cores: Vec<Core>,
    /// Queue `from * CORES + to`.
    net: Vec<VecDeque<Payload>>,
    busy: Vec<Busy>,
    budget: Vec<u8>,
    /// What each core's EPT maps in the grant window: (gpa, size).
    ept: Vec<BTreeSet<(u64, u64)>>,
    /// Ghost: copy id -> (parent node id, the piece copied from, the parent's rights).
    parent: BTreeMap<u64, (u64, (usize, u64), u8)>,
    violation: Option<&'static str>,
    mc: Mc,
}

/// The multicast slots, bells and reply lines.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
struct Mc {
    /// Each core's published request.
    slot: [Option<mcast::Request>; CORES],
    /// Per core: the publishers that rang it and it has not served yet.
    rung: [u8; CORES],
    /// Per queue `from * CORES + to`: messages queued before `from`'s last publish naming
    /// `to`, not yet delivered (`to` serves that request only after them).
    before: [u8; CORES * CORES],
    /// Per core's slot: the answered word and each core's line.
    answered: [u64; CORES],
    lines: [[u64; CORES]; CORES],
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Deliver(usize, usize),
    Copy(usize, u64, usize, u8),
    Move(usize, u64, usize),
    Split(usize, u64),
    Map(usize, u64),
    Unmap(usize, u64),
    Revoke(usize, u64),
    /// Core `to` serves core `from`'s multicast request.
    McServe(usize, usize),
    /// Core `c` takes the answers to its multicast request.
    McGather(usize),
}

/// One core's view of the world while it runs.
struct ModelEnv<'a> {
    me: usize,
    net: &'a mut Vec<VecDeque<Payload>>,
    ept: &'a mut BTreeSet<(u64, u64)>,
    overflow: &'a mut bool,
    mc: &'a mut Mc,
}

impl Env for ModelEnv<'_> {
    fn now(&mut self) -> u64 {
        0
    }
    fn send(&mut self, to: usize, m: &Payload) -> bool {
        let q = &mut self.net[self.me * CORES + to];
        if q.len() >= RING_SLOTS as usize {
            *self.overflow = true;
            return false;
        }
        q.push_back(*m);
        true
    }
    fn recv(&mut self) -> Option<(usize, Payload)> {
        None
    }
    fn kick(&mut self, _to: usize) {}
    fn ept_map(&mut self, gpa: u64, _hpa: u64, size: u64, _w: bool) -> Result<(), HvError> {
        if self.ept.iter().any(|&(g, s)| gpa < g + s && g < gpa + size) {
            return Err(HvError::AddressInUse);
        }
        self.ept.insert((gpa, size));
        Ok(())
    }
    fn ept_unmap(&mut self, gpa: u64, size: u64) -> Result<(), HvError> {
        if self.ept.remove(&(gpa, size)) {
            Ok(())
        } else {
            Err(HvError::NotMapped)
        }
    }
    fn mc_publish(&mut self, me: usize, req: &mcast::Request) -> bool {
        self.mc.slot[me] = Some(*req);
        self.mc.answered[me] = 0;
        for to in (0..CORES).filter(|&t| t != me && req.targets() & 1 << t != 0) {
            self.mc.rung[to] |= 1 << me;
            self.mc.before[me * CORES + to] = self.net[me * CORES + to].len() as u8;
        }
        true
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
}

pub struct CapModel {
    pub budget: [u8; CORES],
    pub bug: Bug,
    pub proto_bug: proto::Bug,
    /// How the cores' revokes reach the holders.
    pub revoke: Revoke,
}

impl CapModel {
    fn with_core<R>(s: &mut State, c: usize, f: impl FnOnce(&mut Core, &mut ModelEnv) -> R) -> R {
        let mut overflow = false;
        let r = {
            let mut env = ModelEnv {
                me: c,
                net: &mut s.net,
                ept: &mut s.ept[c],
                overflow: &mut overflow,
                mc: &mut s.mc,
            };
            f(&mut s.cores[c], &mut env)
        };
        if overflow {
            s.violation.get_or_insert("an inter-core ring overflowed");
        }
        r
    }

    fn endpoint(core: &Core, peer: usize) -> u64 {
        let idx = chan(core_index(core), peer) as u64;
        core.space()
            .live()
            .find(|(_, c)| c.kind == CapType::Endpoint && c.base == idx)
            .map(|(h, _)| h)
            .unwrap_or(u64::MAX)
    }

    /// Nodes descending from copies of the piece `(core, handle)`.
    fn descendants(s: &State, piece: (usize, u64)) -> BTreeSet<u64> {
        let mut d: BTreeSet<u64> =
            s.parent.iter().filter(|(_, p)| p.1 == piece).map(|(c, _)| *c).collect();
        loop {
            let more: Vec<u64> = s
                .parent
                .iter()
                .filter(|(c, p)| d.contains(&p.0) && !d.contains(*c))
                .map(|(c, _)| *c)
                .collect();
            if more.is_empty() {
                return d;
            }
            d.extend(more);
        }
    }

    /// Finishes core `c`'s hypercall if the protocol decided it.
    fn settle(&self, s: &mut State, c: usize) {
        let Some(v) = s.cores[c].take_verdict() else { return };
        match core::mem::replace(&mut s.busy[c], Busy::Idle) {
            Busy::Transfer(t) => {
                let _ = s.cores[c].transfer_finish(t, v);
            }
            Busy::Revoke(core, h) => {
                s.cores[c].restore_unconfirmed(h);
                if Core::revoke_finish(v).is_ok() {
                    let gone = Self::descendants(s, (core, h));
                    let live =
                        s.cores.iter().any(|x| x.space().live().any(|(_, k)| gone.contains(&k.id)));
                    let flying = s.net.iter().flatten().any(|m| {
                        m[0] & 0xff == proto::op::INSERT
                            && (m[1] >> 24) & 1 == 1
                            && gone.contains(&m[5])
                    });
                    if live || flying {
                        s.violation.get_or_insert("revoke returned with a descendant alive");
                    }
                }
            }
            Busy::Idle => {}
        }
    }
}

impl CapModel {
    /// Whether core `c` has answers to its open multicast request to take.
    fn gatherable(s: &State, c: usize) -> bool {
        s.cores[c].mc_open() && s.mc.answered[c] != 0 && {
            let seq = s.mc.slot[c].map_or(0, |r| r.seq);
            (0..CORES).any(|h| {
                s.mc.answered[c] & 1 << h != 0
                    && mcast::decode(s.mc.lines[c][h]).seq == seq as u32
                    && s.cores[c].mc_awaits(h)
            })
        }
    }

    /// Whether something is on its way: a ring message, a multicast request not yet served,
    /// an answer not yet taken.
    fn in_flight(s: &State) -> bool {
        s.net.iter().any(|q| !q.is_empty())
            || s.mc.rung.iter().any(|&r| r != 0)
            || (0..CORES).any(|c| Self::gatherable(s, c))
    }
}

fn core_index(core: &Core) -> usize {
    // Ids are `core << 48 | n`: any live cap tells; every core holds endpoint caps.
    core.space().live().next().map_or(0, |(_, c)| (c.id >> 48) as usize)
}

impl Model for CapModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let policy = Policy { deadline: u64::MAX / 64, transfer_gap: 0, revoke: self.revoke };
        let mut cores: Vec<Core> = (0..CORES).map(|c| Core::new(c as u16, policy)).collect();
        let mut net = vec![VecDeque::new(); CORES * CORES];
        let mut ept = vec![BTreeSet::new(); CORES];
        cores[0].grant(0x100_0000, 4 * 4096).unwrap();
        for (c, core) in cores.iter_mut().enumerate() {
            core.bug = self.bug;
            core.set_proto_bug(self.proto_bug);
            for p in (0..CORES).filter(|&p| p != c) {
                let ep = core.add_channel(chan(c, p), Some(p as u16)).unwrap();
                let mut overflow = false;
                let mut mc = Mc::default();
                let mut env = ModelEnv {
                    me: c,
                    net: &mut net,
                    ept: &mut ept[c],
                    overflow: &mut overflow,
                    mc: &mut mc,
                };
                core.hypercall(&mut env, Hypercall::CapAccept, ep, 2, 0).unwrap().unwrap();
            }
        }
        vec![State {
            cores,
            net,
            busy: vec![Busy::Idle; CORES],
            budget: self.budget.to_vec(),
            ept,
            parent: BTreeMap::new(),
            violation: None,
            mc: Mc::default(),
        }]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        for (i, q) in s.net.iter().enumerate() {
            if !q.is_empty() {
                out.push(Action::Deliver(i / CORES, i % CORES));
            }
        }
        for to in 0..CORES {
            for from in (0..CORES).filter(|&f| s.mc.rung[to] & 1 << f != 0) {
                if s.mc.before[from * CORES + to] == 0 {
                    out.push(Action::McServe(from, to));
                }
            }
            if Self::gatherable(s, to) {
                out.push(Action::McGather(to));
            }
        }
        for c in 0..CORES {
            if s.busy[c] != Busy::Idle || s.budget[c] == 0 {
                continue;
            }
            for (h, cap) in s.cores[c].space().live().filter(|(_, k)| k.kind == CapType::Memory) {
                for p in (0..CORES).filter(|&p| p != c) {
                    for r in [Rights::all(), Rights::READ] {
                        out.push(Action::Copy(c, h, p, r.bits()));
                    }
                    out.push(Action::Move(c, h, p));
                }
                if cap.size >= 2 * 4096 {
                    out.push(Action::Split(c, h));
                }
                if cap.mapped_at.is_some() {
                    out.push(Action::Unmap(c, h));
                } else {
                    out.push(Action::Map(c, h));
                }
                out.push(Action::Revoke(c, h));
            }
        }
    }

    fn next_state(&self, last: &State, a: Action) -> Option<State> {
        let mut s = last.clone();
        match a {
            Action::McServe(from, to) => {
                s.mc.rung[to] &= !(1 << from);
                Self::with_core(&mut s, to, |core, env| core.mc_deliver(env, from));
                self.settle(&mut s, to);
            }
            Action::McGather(c) => {
                Self::with_core(&mut s, c, |core, env| core.mc_gather(env));
                self.settle(&mut s, c);
            }
            Action::Deliver(from, to) => {
                let b = &mut s.mc.before[from * CORES + to];
                *b = b.saturating_sub(1);
                let m = s.net[from * CORES + to].pop_front()?;
                Self::with_core(&mut s, to, |core, env| core.deliver(env, from, &m));
                self.settle(&mut s, to);
            }
            Action::Copy(c, h, p, r) => {
                s.budget[c] -= 1;
                let src = *s.cores[c].space().get(h).ok()?;
                let ep = Self::endpoint(&s.cores[c], p);
                let mode = 1 | (r as u64) << 8;
                let t =
                    Self::with_core(&mut s, c, |core, env| core.transfer_start(env, h, ep, mode));
                if let Ok(t) = t {
                    if let Some(id) = t.id() {
                        s.parent.insert(id, (src.id, (c, h), src.rights.bits()));
                    }
                    s.busy[c] = Busy::Transfer(t);
                }
            }
            Action::Move(c, h, p) => {
                s.budget[c] -= 1;
                let ep = Self::endpoint(&s.cores[c], p);
                let t = Self::with_core(&mut s, c, |core, env| core.transfer_start(env, h, ep, 0));
                if let Ok(t) = t {
                    s.busy[c] = Busy::Transfer(t);
                }
            }
            Action::Split(c, h) => {
                s.budget[c] -= 1;
                let half = (s.cores[c].space().get(h).ok()?.size / 2) & !0xfff;
                Self::with_core(&mut s, c, |core, env| {
                    core.hypercall(env, Hypercall::CapSplit, h, half, 0)
                });
            }
            Action::Map(c, h) => {
                s.budget[c] -= 1;
                let gpa = 0xc000_0000 + (h & 0xffff) * 0x10_0000;
                Self::with_core(&mut s, c, |core, env| {
                    core.hypercall(env, Hypercall::CapMap, h, gpa, 1)
                });
            }
            Action::Unmap(c, h) => {
                s.budget[c] -= 1;
                Self::with_core(&mut s, c, |core, env| {
                    core.hypercall(env, Hypercall::CapUnmap, h, 0, 0)
                });
            }
            Action::Revoke(c, h) => {
                s.budget[c] -= 1;
                let started = Self::with_core(&mut s, c, |core, env| core.revoke_start(env, h));
                if started == Ok(true) {
                    s.busy[c] = Busy::Revoke(c, h);
                    self.settle(&mut s, c);
                }
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("revoke is complete and rings never overflow", |_, s: &State| {
                s.violation.is_none()
            }),
            Property::always("mappings follow caps", |_, s: &State| {
                s.cores.iter().zip(&s.ept).all(|(core, ept)| {
                    let want: BTreeSet<(u64, u64)> = core
                        .space()
                        .live()
                        .filter_map(|(_, c)| c.mapped_at.map(|g| (g, c.size)))
                        .collect();
                    want == *ept
                })
            }),
            Property::always("rights never grow", |_, s: &State| {
                s.cores.iter().all(|core| {
                    core.space().live().all(|(_, c)| {
                        c.rights.contains(c.mapped_rights)
                            && s.parent
                                .get(&c.id)
                                .is_none_or(|p| Rights::from_bits_truncate(p.2).contains(c.rights))
                    })
                })
            }),
            Property::always("no deadlock", |_, s: &State| {
                Self::in_flight(s) || s.busy.iter().all(|b| *b == Busy::Idle)
            }),
            Property::always("every request answered", |_, s: &State| {
                Self::in_flight(s) || s.cores.iter().all(|c| c.idle())
            }),
        ]
    }
}

/// Checks `model` to the end; returns the names of the properties it found broken.
pub fn check(model: CapModel) -> (Vec<&'static str>, usize) {
    let checker = model.checker().threads(1).spawn_dfs().join();
    for (name, path) in checker.discoveries() {
        eprintln!("{name}: counterexample {:?}", path.into_actions());
    }
    let mut broken: Vec<&'static str> = checker.discoveries().into_keys().collect();
    broken.sort_unstable();
    (broken, checker.unique_state_count())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operation budgets per guest: `MKVISOR_MODEL_BUDGET=3,2,2` explores further (2 M
    /// states for 3,2,1: minutes). Release builds (`cargo xtask test`) check 2,2,2 (1.1 M
    /// states, under a minute); debug builds a smaller model.
    fn budget() -> [u8; CORES] {
        let default = if cfg!(debug_assertions) { [2, 1, 1] } else { [2, 2, 2] };
        std::env::var("MKVISOR_MODEL_BUDGET")
            .ok()
            .and_then(|v| {
                let b: Vec<u8> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
                b.try_into().ok()
            })
            .unwrap_or(default)
    }

    #[test]
    fn the_protocol_keeps_every_property() {
        let budget = budget();
        let (broken, states) = check(CapModel {
            budget,
            bug: Bug::None,
            proto_bug: proto::Bug::None,
            revoke: Revoke::Multicast,
        });
        eprintln!("capability model (multicast), budgets {budget:?}: {states} distinct states");
        assert!(broken.is_empty(), "broken: {broken:?}");
        assert!(states > 1000, "the model explored too little to mean anything");
    }

    #[test]
    fn the_broadcast_protocol_keeps_every_property() {
        let budget = budget();
        let (broken, states) = check(CapModel {
            budget,
            bug: Bug::None,
            proto_bug: proto::Bug::None,
            revoke: Revoke::Broadcast,
        });
        eprintln!("capability model (broadcast), budgets {budget:?}: {states} distinct states");
        assert!(broken.is_empty(), "broken: {broken:?}");
        assert!(states > 1000, "the model explored too little to mean anything");
    }

    /// The checker must find a seeded bug within a small budget (copy, copy on, revoke).
    fn assert_caught(bug: Bug, proto_bug: proto::Bug) {
        for revoke in [Revoke::Broadcast, Revoke::Multicast] {
            let (broken, _) = check(CapModel { budget: [2, 1, 0], bug, proto_bug, revoke });
            assert!(
                broken.contains(&"revoke is complete and rings never overflow"),
                "{revoke:?}: {broken:?}"
            );
        }
    }

    /// Revoke trees: the owner makes three copies (with fan-out 2 a head carries the
    /// third when it is on the other core) and revokes, while core 1's guest may act once
    /// (copy on, move, revoke its own...) in release builds.
    #[test]
    fn revoke_trees_keep_every_property() {
        let budget = if cfg!(debug_assertions) { [4, 0, 0] } else { [4, 1, 0] };
        let tree = Revoke::Tree { fanout: 2 };
        let (broken, states) =
            check(CapModel { budget, bug: Bug::None, proto_bug: proto::Bug::None, revoke: tree });
        eprintln!("capability model with revoke trees, budgets {budget:?}: {states} states");
        assert!(broken.is_empty(), "broken: {broken:?}");
        assert!(states > 1000, "the model explored too little to mean anything");
    }

    #[test]
    fn a_head_that_answers_for_members_it_never_asked_is_caught() {
        let tree = Revoke::Tree { fanout: 2 };
        let model = CapModel {
            budget: [4, 0, 0],
            bug: Bug::None,
            proto_bug: proto::Bug::HeadVouches,
            revoke: tree,
        };
        let (broken, _) = check(model);
        assert!(broken.contains(&"revoke is complete and rings never overflow"), "{broken:?}");
    }

    #[test]
    fn a_copy_recorded_after_its_reply_is_caught() {
        assert_caught(Bug::RecordAfterReply, proto::Bug::None);
    }

    #[test]
    fn a_revoke_that_does_not_recurse_is_caught() {
        assert_caught(Bug::None, proto::Bug::NoRecursion);
    }

    /// Multicast: a holder's copy that has copies of its own, answered for instead of
    /// declined (copy, copy on, revoke).
    #[test]
    fn a_multicast_answer_for_a_copy_with_copies_is_caught() {
        let model = CapModel {
            budget: [2, 1, 0],
            bug: Bug::None,
            proto_bug: proto::Bug::McNoDecline,
            revoke: Revoke::Multicast,
        };
        let (broken, _) = check(model);
        assert!(broken.contains(&"revoke is complete and rings never overflow"), "{broken:?}");
    }
}
