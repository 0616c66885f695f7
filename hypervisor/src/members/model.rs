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
//!
//! [`DetectorModel`] adds what that one abstracts away: the failure detector's own probes
//! and time, and a core that stops receiving for a while and comes back (a deafness, a
//! starved vCPU). Time moves in probe periods, and only once every live core that hears has
//! read its inbox and done what was due (the detector's assumption: a running core answers
//! within a period); the period is 1 and the timeout a few periods. No suspicion comes from
//! anywhere but the detector's own deadlines. Properties: one set per view number; a core
//! fenced by another's verdict never takes that core for stopped afterwards (chaos seed 55:
//! the deaf higher core of two, fenced by the lower one, which then ended its run, took it
//! out as the tie-breaker); and a core is suspected only if it was deaf or stopped. With
//! the old detector (no absence rule) the checker finds seed 55's schedule.

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
    now: u64,
}

impl Net for ModelNet<'_> {
    fn now(&mut self) -> u64 {
        self.now
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
        let mut env = ModelNet { me: c, n, net: &mut s.net, dead: s.dead, now: 0 };
        f(&mut s.cores[c], &mut env);
        s.cores[c].take_suspected();
        record_views(&mut s.cores[c], &mut s.views, &mut s.split);
    }
}

/// Takes core `m`'s new views into the ghost record: the set each number was first
/// installed with, and the first number installed with two sets.
fn record_views(
    m: &mut Members,
    views: &mut Vec<Option<CoreSet>>,
    split: &mut Option<(u32, CoreSet, CoreSet)>,
) {
    while let Some(ch) = m.take_change() {
        let num = ch.new.num as usize;
        if views.len() <= num {
            views.resize(num + 1, None);
        }
        match views[num] {
            None => views[num] = Some(ch.new.set),
            Some(set) if set != ch.new.set && split.is_none() => {
                *split = Some((ch.new.num, set, ch.new.set));
            }
            Some(_) => {}
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

/// The failure detector's model: `n` cores probing each other, one of them deaf for a
/// while, some stopping; see the module's comment.
#[derive(Clone, Copy, Debug)]
pub struct DetectorModel {
    pub n: usize,
    /// The cores run the detector without the absence rule.
    pub old_detector: bool,
    /// The detector's timeout, in probe periods.
    pub timeout: u64,
    /// The last period the search explores.
    pub horizon: u64,
    /// Deafnesses and stops the search may make.
    pub deafs: u8,
    pub stops: u8,
    /// The last period a deafness may begin in (once the probes run, every period looks
    /// the same: a later start repeats an earlier one, shifted; this bounds the search).
    pub deaf_by: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DetState {
    cores: Vec<Members>,
    /// Queue `from * n + to`.
    net: Vec<VecDeque<Payload>>,
    /// The time, in probe periods.
    clock: u64,
    dead: CoreSet,
    /// Cores that read nothing and look at no deadline now (their rings fill).
    deaf: CoreSet,
    deafs: u8,
    stops: u8,
    /// Ghost: cores that were ever deaf or stopped (the only ones a suspicion may name).
    failed: CoreSet,
    /// Ghost: for each core, the cores whose own verdict (a deadline passed) fenced it.
    fencers: Vec<CoreSet>,
    /// Ghost: the set each view number was first installed with; a number with two sets.
    views: Vec<Option<CoreSet>>,
    split: Option<(u32, CoreSet, CoreSet)>,
    /// Ghost: a core fenced by another took that one for stopped (the fenced, the fencer).
    fencer_fenced: Option<(usize, usize)>,
    /// Ghost: a core took for stopped one that was never deaf nor stopped.
    false_suspicion: Option<(usize, usize)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DetAction {
    /// The first message of queue (from, to) is read by `to`.
    Deliver(usize, usize),
    /// Core `.0` looks at what is due (its inbox read first, as `HvCaps::poll` does).
    Tick(usize),
    /// A probe period passes.
    Time,
    /// Core `.0` stops reading its inbox and looking at its deadlines.
    Deaf(usize),
    /// Core `.0` hears again.
    Hear(usize),
    /// Core `.0` stops for good (or ends its run: it answers nothing any more).
    Stop(usize),
}

impl DetectorModel {
    fn inbox_empty(&self, s: &DetState, c: usize) -> bool {
        (0..self.n).all(|f| s.net[f * self.n + c].is_empty())
    }

    /// Whether core `c` reads and looks now.
    fn running(s: &DetState, c: usize) -> bool {
        (s.dead | s.deaf) & bit(c) == 0
    }
}

impl Model for DetectorModel {
    type State = DetState;
    type Action = DetAction;

    fn init_states(&self) -> Vec<DetState> {
        let n = self.n;
        let all: CoreSet = (1 << n) - 1;
        let timing = Timing { period: 1, timeout: self.timeout, grace: 0 };
        let cores = (0..n)
            .map(|c| {
                let mut m = Members::new(c, all, timing, 0);
                m.old_detector = self.old_detector;
                m
            })
            .collect();
        vec![DetState {
            cores,
            net: vec![VecDeque::new(); n * n],
            clock: 0,
            dead: 0,
            deaf: 0,
            deafs: self.deafs,
            stops: self.stops,
            failed: 0,
            fencers: vec![0; n],
            views: vec![Some(all)],
            split: None,
            fencer_fenced: None,
            false_suspicion: None,
        }]
    }

    fn actions(&self, s: &DetState, out: &mut Vec<DetAction>) {
        let n = self.n;
        let mut quiet = true;
        for c in (0..n).filter(|&c| Self::running(s, c)) {
            for from in 0..n {
                if !s.net[from * n + c].is_empty() {
                    out.push(DetAction::Deliver(from, c));
                }
            }
            let empty = self.inbox_empty(s, c);
            let due = s.cores[c].due() <= s.clock;
            if empty && due {
                out.push(DetAction::Tick(c));
            }
            quiet &= empty && !due;
        }
        if quiet && s.clock < self.horizon {
            out.push(DetAction::Time);
        }
        for c in (0..n).filter(|&c| s.dead & bit(c) == 0) {
            if s.deaf & bit(c) != 0 {
                out.push(DetAction::Hear(c));
            } else if s.deafs > 0 && s.clock <= self.deaf_by {
                out.push(DetAction::Deaf(c));
            }
            if s.stops > 0 && s.dead.count_ones() + 1 < n as u32 {
                out.push(DetAction::Stop(c));
            }
        }
    }

    fn next_state(&self, last: &DetState, a: DetAction) -> Option<DetState> {
        let n = self.n;
        let mut s = last.clone();
        let run = |s: &mut DetState, c: usize, f: &dyn Fn(&mut Members, &mut ModelNet)| {
            let before = s.cores[c].suspects;
            let mut env = ModelNet { me: c, n, net: &mut s.net, dead: s.dead, now: s.clock };
            f(&mut s.cores[c], &mut env);
            s.cores[c].take_suspected();
            record_views(&mut s.cores[c], &mut s.views, &mut s.split);
            before
        };
        match a {
            DetAction::Deliver(from, to) => {
                let m = s.net[from * n + to].pop_front()?;
                run(&mut s, to, &|core, env| core.deliver(env, from, &m));
            }
            DetAction::Tick(c) => {
                let before = run(&mut s, c, &|core, env| core.tick(env));
                // The cores this tick's own verdicts fenced (a deadline passed here).
                let new = s.cores[c].suspects & !before;
                for d in (0..n).filter(|&d| new & bit(d) != 0) {
                    if s.fencers[c] & bit(d) != 0 && s.fencer_fenced.is_none() {
                        s.fencer_fenced = Some((c, d));
                    }
                    if s.failed & bit(d) == 0 && s.false_suspicion.is_none() {
                        s.false_suspicion = Some((c, d));
                    }
                    s.fencers[d] |= bit(c);
                }
            }
            DetAction::Time => s.clock += 1,
            DetAction::Deaf(c) => {
                s.deafs -= 1;
                s.deaf |= bit(c);
                s.failed |= bit(c);
            }
            DetAction::Hear(c) => s.deaf &= !bit(c),
            DetAction::Stop(c) => {
                s.stops -= 1;
                s.dead |= bit(c);
                s.deaf &= !bit(c);
                s.failed |= bit(c);
                for from in 0..n {
                    s.net[from * n + c].clear();
                }
            }
        }
        Some(s)
    }

    fn within_boundary(&self, s: &DetState) -> bool {
        s.net.iter().all(|q| q.len() <= RING_BOUND)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("one set per view number", |_, s: &DetState| s.split.is_none()),
            Property::always("a fenced core never fences its fencer", |_, s: &DetState| {
                s.fencer_fenced.is_none()
            }),
            Property::always("only a deaf or stopped core is suspected", |_, s: &DetState| {
                s.false_suspicion.is_none()
            }),
            // The search reaches what the properties are about.
            Property::sometimes("a deaf core is fenced", |_, s: &DetState| {
                s.fencers.iter().enumerate().any(|(c, &f)| f != 0 && s.failed & bit(c) != 0)
            }),
            Property::sometimes("a view without a deaf core is committed", |_, s: &DetState| {
                s.views.len() > 1
            }),
            Property::sometimes(
                "a core back from deafness hears it was fenced",
                |_, s: &DetState| {
                    s.cores.iter().enumerate().any(|(c, m)| {
                        m.evicted
                            && s.dead & bit(c) == 0
                            && s.deaf & bit(c) == 0
                            && s.failed & bit(c) != 0
                    })
                },
            ),
        ]
    }
}

/// Checks the detector's `model` to the end: the properties broken (a counterexample
/// printed for each), the examples found, and the distinct states explored.
pub fn check_detector(model: DetectorModel) -> (Vec<&'static str>, Vec<&'static str>, usize) {
    let checker = model.checker().threads(1).spawn_bfs().join();
    let mut broken = Vec::new();
    let mut found = Vec::new();
    for (name, path) in checker.discoveries() {
        if name.starts_with("a ") && name != "a fenced core never fences its fencer" {
            found.push(name);
        } else {
            eprintln!("{name}: counterexample {:?}", path.clone().into_actions());
            broken.push(name);
        }
    }
    found.sort_unstable();
    (broken, found, checker.unique_state_count())
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
    /// cores (1,368 states); at 3 cores three suspicions (enough for two sides each
    /// suspecting the other) with a timeout and a stop (90,025), and with a lost message
    /// (22,583). Release builds (`cargo xtask test`) add 4 cores with three suspicions and a
    /// timeout (3.3 million states, 20 s). `MKVISOR_VIEW_MODEL=3,3,1,0,1,1,2`
    /// (cores, suspicions, ticks, stops, leaves, losses, rounds) checks that one model
    /// instead (2.6 million states, 68 s in release, before a fenced core's requests were
    /// answered: more now).
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

    /// The detector's models: (cores, timeout in periods, horizon in periods, deafnesses,
    /// stops); a deafness begins in the first three periods. Debug builds (`cargo test`):
    /// two cores (45,333 states, under a second). Release builds (`cargo xtask test`) add
    /// three cores with a timeout of 3 periods over 7 (800,370 states, 6 s in release, 37 s
    /// in a debug build). `MKVISOR_DETECTOR_MODEL=3,4,10,1,1` checks that one instead
    /// (1.44 million states, 37 s; `3,3,8,1,1`: 1.03 million, 36 s; both held).
    fn detector_budgets() -> Vec<(usize, u64, u64, u8, u8)> {
        let custom = std::env::var("MKVISOR_DETECTOR_MODEL").ok().and_then(|v| {
            let b: Vec<u64> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            (b.len() == 5).then(|| (b[0] as usize, b[1], b[2], b[3] as u8, b[4] as u8))
        });
        let mut all = vec![(2, 4, 10, 1, 1)];
        if !cfg!(debug_assertions) {
            all.push((3, 3, 7, 1, 1));
        }
        custom.map_or(all, |b| vec![b])
    }

    fn old_budget() -> (usize, u64, u64, u8, u8) {
        let v = std::env::var("MKVISOR_DETECTOR_OLD").ok();
        let b: Vec<u64> =
            v.iter().flat_map(|v| v.split(',')).filter_map(|x| x.trim().parse().ok()).collect();
        if b.len() == 5 {
            (b[0] as usize, b[1], b[2], b[3] as u8, b[4] as u8)
        } else {
            OLD
        }
    }

    fn detector(b: (usize, u64, u64, u8, u8), old_detector: bool) -> DetectorModel {
        let (n, timeout, horizon, deafs, stops) = b;
        DetectorModel { n, old_detector, timeout, horizon, deafs, stops, deaf_by: 2 }
    }

    fn run_detector(m: DetectorModel) -> (Vec<&'static str>, Vec<&'static str>, usize) {
        let t = std::time::Instant::now();
        let r = check_detector(m);
        eprintln!("detector model {m:?}: {} states, {:.1?}", r.2, t.elapsed());
        r
    }

    #[test]
    fn a_core_back_from_deafness_never_fences_its_fencer() {
        for b in detector_budgets() {
            let (broken, found, states) = run_detector(detector(b, false));
            assert!(broken.is_empty(), "{b:?}: broken {broken:?}");
            let all = [
                "a core back from deafness hears it was fenced",
                "a deaf core is fenced",
                "a view without a deaf core is committed",
            ];
            assert_eq!(found, all, "{b:?}");
            assert!(states > 500, "the model explored too little to mean anything");
        }
    }

    /// Chaos seed 55's schedule: core 1 (the higher of two) deaf, fenced by core 0, which
    /// then stops (it ended its run); core 1, back, probes core 0, gets no answer and takes
    /// it for stopped, and as the tie-breaker takes it out of the view.
    /// The old detector's model: `MKVISOR_DETECTOR_OLD` overrides it.
    const OLD: (usize, u64, u64, u8, u8) = (2, 4, 9, 1, 1);

    #[test]
    fn the_old_detector_lets_a_deaf_core_fence_its_fencer() {
        let (broken, _, _) = run_detector(detector(old_budget(), true));
        assert_eq!(broken, ["a fenced core never fences its fencer"]);
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
