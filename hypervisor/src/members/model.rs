// SPDX-License-Identifier: MIT OR Apache-2.0
//! The view change, model-checked with stateright. Each core is the hypervisor's own
//! [`Members`] (the code that runs on the hardware, driven through its [`Net`]); the network
//! is one FIFO queue per ordered core pair, as the inter-core rings. Nondeterministic, within
//! budgets: any core may suspect any other at any time (a false suspicion of a live core,
//! as a starved vCPU causes), any core's timers may fire (its round's deadline passes: the
//! members that did not answer are suspected; its wish is told again), a core may stop for
//! good (what it queued stays in the rings and may still be delivered), a core may ask to
//! leave, a message may be lost; and any queued message may be delivered next (deliveries
//! interleave across pairs). Time is abstract: every deadline is "now", and a `Tick` is the
//! moment it is looked at.
//!
//! Property (over every reachable state): **one set per view number** (no two cores ever
//! install different member sets under the same number). With the old rule (a round's
//! quorum is every unsuspected member) the checker finds the split brain; with the
//! majority rule ([`super::is_quorum`]) it must find none.

use super::{bit, CoreSet, Members, Net, Timing};
use stateright::{Checker, Model, Property};
use std::collections::VecDeque;
use vmcall_proto::channel::Payload;

/// Messages a ring may hold in a state the checker explores further (a bound on the
/// search, well above what one round queues).
const RING_BOUND: usize = 6;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    cores: Vec<Members>,
    /// Queue `from * n + to`.
    net: Vec<VecDeque<Payload>>,
    dead: CoreSet,
    /// What is left of each budget.
    suspicions: u8,
    ticks: u8,
    stops: u8,
    leaves: u8,
    losses: u8,
    /// Ghost: the set each view number was first installed with, anywhere.
    views: Vec<Option<CoreSet>>,
    /// Ghost: a view number installed with two sets (the number, the two sets).
    split: Option<(u32, CoreSet, CoreSet)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// The first message of queue (from, to) is read by `to`.
    Deliver(usize, usize),
    /// The first message of queue (from, to) is lost.
    Lose(usize, usize),
    /// Core `.0` suspects core `.1` (rightly or not).
    Suspect(usize, usize),
    /// Core `.0`'s deadlines have passed.
    Tick(usize),
    /// Core `.0` stops for good.
    Stop(usize),
    /// Core `.0` asks to leave.
    Leave(usize),
}

/// The model: `n` cores in view 0, the budgets, and which quorum rule the cores run.
#[derive(Clone, Copy, Debug)]
pub struct ViewModel {
    pub n: usize,
    pub old_rule: bool,
    pub suspicions: u8,
    pub ticks: u8,
    pub stops: u8,
    pub leaves: u8,
    pub losses: u8,
    /// Ballot rounds (`ballot >> 8`) a core may reach: dueling coordinators outbid each
    /// other without end, so the search stops there.
    pub rounds: u64,
}

struct ModelNet<'a> {
    me: usize,
    n: usize,
    net: &'a mut [VecDeque<Payload>],
    dead: CoreSet,
}

impl Net for ModelNet<'_> {
    fn now(&mut self) -> u64 {
        0
    }
    fn send(&mut self, to: usize, m: &Payload) -> bool {
        // Nobody reads what goes to a stopped core: not kept (fewer states).
        if self.dead & bit(to) == 0 {
            self.net[self.me * self.n + to].push_back(*m);
        }
        true
    }
    fn kick(&mut self, _to: usize) {}
}

impl ViewModel {
    /// Runs `f` on core `c`, then records the views it installed.
    fn on(s: &mut State, n: usize, c: usize, f: impl FnOnce(&mut Members, &mut ModelNet)) {
        let mut env = ModelNet { me: c, n, net: &mut s.net, dead: s.dead };
        f(&mut s.cores[c], &mut env);
        s.cores[c].take_suspected();
        while let Some(ch) = s.cores[c].take_change() {
            let num = ch.new.num as usize;
            if s.views.len() <= num {
                s.views.resize(num + 1, None);
            }
            match s.views[num] {
                None => s.views[num] = Some(ch.new.set),
                Some(set) if set != ch.new.set && s.split.is_none() => {
                    s.split = Some((ch.new.num, set, ch.new.set));
                }
                Some(_) => {}
            }
        }
    }
}

impl Model for ViewModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let n = self.n;
        let all: CoreSet = (1 << n) - 1;
        let timing = Timing { period: 0, timeout: 0, grace: 0 };
        let cores = (0..n)
            .map(|c| {
                let mut m = Members::new(c, all, timing, 0);
                m.old_rule = self.old_rule;
                m
            })
            .collect();
        vec![State {
            cores,
            net: vec![VecDeque::new(); n * n],
            dead: 0,
            suspicions: self.suspicions,
            ticks: self.ticks,
            stops: self.stops,
            leaves: self.leaves,
            losses: self.losses,
            views: vec![Some(all)],
            split: None,
        }]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        let n = self.n;
        for c in (0..n).filter(|&c| s.dead & bit(c) == 0) {
            for from in 0..n {
                if !s.net[from * n + c].is_empty() {
                    out.push(Action::Deliver(from, c));
                    if s.losses > 0 {
                        out.push(Action::Lose(from, c));
                    }
                }
            }
            let m = &s.cores[c];
            if s.suspicions > 0 && m.member() {
                for d in (0..n).filter(|&d| d != c && m.suspects & bit(d) == 0) {
                    out.push(Action::Suspect(c, d));
                }
            }
            if s.ticks > 0 && (m.round.is_some() || m.wish_out.is_some()) {
                out.push(Action::Tick(c));
            }
            if s.stops > 0 {
                out.push(Action::Stop(c));
            }
            if s.leaves > 0 && m.member() && m.wants_in & bit(c) != 0 {
                out.push(Action::Leave(c));
            }
        }
    }

    fn next_state(&self, last: &State, a: Action) -> Option<State> {
        let n = self.n;
        let mut s = last.clone();
        match a {
            Action::Deliver(from, to) => {
                let m = s.net[from * n + to].pop_front()?;
                Self::on(&mut s, n, to, |core, env| core.deliver(env, from, &m));
            }
            Action::Lose(from, to) => {
                s.losses -= 1;
                s.net[from * n + to].pop_front()?;
            }
            Action::Suspect(c, d) => {
                s.suspicions -= 1;
                Self::on(&mut s, n, c, |core, env| {
                    core.suspect(env, bit(d));
                    core.due_at = core.compute_due();
                });
            }
            Action::Tick(c) => {
                s.ticks -= 1;
                Self::on(&mut s, n, c, |core, env| core.tick(env));
            }
            Action::Stop(c) => {
                s.stops -= 1;
                s.dead |= bit(c);
                for from in 0..n {
                    s.net[from * n + c].clear();
                }
            }
            Action::Leave(c) => {
                s.leaves -= 1;
                Self::on(&mut s, n, c, |core, env| core.leave(env));
            }
        }
        Some(s)
    }

    fn within_boundary(&self, s: &State) -> bool {
        s.net.iter().all(|q| q.len() <= RING_BOUND)
            && s.cores.iter().all(|m| m.seen >> 8 <= self.rounds)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("one set per view number", |_, s: &State| s.split.is_none()),
            // The search reaches commits at all (else the property above means nothing).
            Property::sometimes("a view is committed", |_, s: &State| s.views.len() > 1),
            // And a view made without a core that is alive (a false suspicion acted on).
            Property::sometimes("a live core is voted out", |m: &ViewModel, s: &State| {
                s.views.iter().flatten().any(|&v| (0..m.n).any(|c| v & bit(c) == 0))
                    && s.dead == 0
                    && s.leaves == m.leaves
            }),
        ]
    }
}

/// Checks `model` to the end: the properties broken (with a counterexample printed), the
/// examples found, and the distinct states explored.
pub fn check(model: ViewModel) -> (Vec<&'static str>, Vec<&'static str>, usize) {
    let checker = model.checker().threads(1).spawn_dfs().join();
    let mut broken = Vec::new();
    let mut found = Vec::new();
    for (name, path) in checker.discoveries() {
        if name == "one set per view number" {
            eprintln!("{name}: counterexample {:?}", path.clone().into_actions());
            let last = path.last_state();
            eprintln!("  split: {:?}", last.split);
            broken.push(name);
        } else {
            found.push(name);
        }
    }
    found.sort_unstable();
    (broken, found, checker.unique_state_count())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Budgets per model: (cores, suspicions, ticks, stops, leaves, losses, rounds).
    type Budget = (usize, u8, u8, u8, u8, u8, u64);

    fn model(b: Budget, old_rule: bool) -> ViewModel {
        let (n, suspicions, ticks, stops, leaves, losses, rounds) = b;
        ViewModel { n, old_rule, suspicions, ticks, stops, leaves, losses, rounds }
    }

    /// The models checked (debug builds, `cargo test`, a few seconds): every budget at 2
    /// cores (1,108 states); at 3 cores three suspicions (enough for two sides each
    /// suspecting the other) with a timeout and a stop (54,009), and with a lost message
    /// (16,874). Release builds (`cargo xtask test`) add 4 cores with three suspicions and a
    /// timeout (1.4 million states, 29 s on a loaded host). `MKVISOR_VIEW_MODEL=3,3,1,0,1,1,2`
    /// (cores, suspicions, ticks, stops, leaves, losses, rounds) checks that one model
    /// instead (2.6 million states, 68 s in release).
    fn budgets() -> Vec<Budget> {
        let custom = std::env::var("MKVISOR_VIEW_MODEL").ok().and_then(|v| {
            let b: Vec<u64> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            let u = |i: usize| b[i] as u8;
            (b.len() == 7).then(|| (b[0] as usize, u(1), u(2), u(3), u(4), u(5), b[6]))
        });
        let mut all = vec![(2, 3, 1, 1, 1, 1, 3), (3, 3, 1, 1, 0, 0, 2), (3, 3, 0, 0, 0, 1, 2)];
        if !cfg!(debug_assertions) {
            all.push((4, 3, 1, 0, 0, 0, 1));
        }
        custom.map_or(all, |b| vec![b])
    }

    fn run(m: ViewModel) -> (Vec<&'static str>, Vec<&'static str>, usize) {
        let t = std::time::Instant::now();
        let r = check(m);
        eprintln!("membership model {m:?}: {} states, {:.1?}", r.2, t.elapsed());
        r
    }

    #[test]
    fn the_majority_rule_installs_one_set_per_view_number() {
        for b in budgets() {
            let (broken, found, states) = run(model(b, false));
            assert!(broken.is_empty(), "{b:?}: broken {broken:?}");
            assert_eq!(found, ["a live core is voted out", "a view is committed"], "{b:?}");
            assert!(states > 500, "the model explored too little to mean anything");
        }
    }

    /// Two cores each suspecting the other, or core 2 suspecting 0 and 1 while 1 suspects
    /// 2: each side commits view 1 without the other.
    #[test]
    fn the_old_rule_splits_the_views() {
        for b in [(2, 2, 0, 0, 0, 0, 1), (3, 3, 0, 0, 0, 0, 1)] {
            let (broken, _, _) = run(model(b, true));
            assert_eq!(broken, ["one set per view number"], "{b:?}");
        }
    }
}
