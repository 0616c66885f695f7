// SPDX-License-Identifier: MIT OR Apache-2.0
//! Core membership: which cores make up the machine, agreed by messages between the
//! hypervisor instances, never kept in a shared table. Each instance holds its own copy of
//! the current *view* (a number and a set of cores) and changes it only when a view change
//! is committed; every instance installs the same views in the same order.
//!
//! **Failure detector.** Every member probes the next member of its view (cyclically, by
//! core index): `PING(seq)` with a kick, answered `PONG(seq)` by any core that serves its
//! inbox. A probe unanswered for [`Timing::timeout`] makes the prober *suspect* that core:
//! from then on nothing it sends is read and nothing is sent to it (it is fenced), and the
//! coordinator removes it from the view. A core never heard from yet gets [`Timing::grace`]
//! (cores start at different times). One probe is outstanding per prober at a time.
//!
//! **View change, two phases (Paxos for each view number).** The coordinator is the highest
//! core of the view that this instance does not suspect. Members send it their wishes
//! (`WISH`: one core's intent, in or out, numbered by that core so that a late copy never
//! undoes a newer one, and the cores the sender suspects; acknowledged by `WISH_ACK`, one
//! outstanding). The coordinator picks a ballot higher than any it has seen and
//! 1. `PREPARE(ballot, n)` to every unsuspected member: each promises to take no lower
//!    ballot and answers `PROMISE` with the proposal for view `n` it accepted before, if
//!    any;
//! 2. `ACCEPT(ballot, view)`: the view is the highest-ballot proposal a member reported
//!    (a failed coordinator's change is completed, never contradicted), else its own
//!    change; members accept it unless they promised a higher ballot (`ACCEPTED`);
//! 3. once every member asked accepted, `COMMIT(view)` to the members of the old and the new
//!    view: they install it (a core that joins learns the view it joins in).
//!
//! **Quorums.** The promises and the accepts (the coordinator's own counted) must come from
//! a quorum of view n ([`is_quorum`]): more than half of its members, suspected ones counted
//! in the whole, or exactly half holding the view's highest core. A coordinator whose
//! unsuspected members are no quorum starts no round; a round whose accepts fall short (a
//! member suspected after its promise is not asked to accept) ends without a commit.
//!
//! A member that answers `NACK` has promised a higher ballot (the coordinator retries above
//! it) or has already installed view `n` or later (the coordinator installs that view: it
//! was committed). A coordinator that stops is suspected by its prober like any core; the
//! next highest takes over, and its `PREPARE` learns what the failed one got accepted.
//!
//! What travels with the views: a `COMMIT` carries the coordinator's suspects (every member
//! fences them too, not only the prober) and the intents it applied with their numbers; a
//! `PROMISE` carries the member's own latest intent (a coordinator that learnt views without
//! the intents behind them, by `CATCHUP`, is corrected before it picks a value); `CATCHUP`
//! and `NACK` carry the sender's suspects. A late copy of an older intent is ignored where
//! the newer one is known; a coordinator that knows neither may act on it once, and the
//! core's own intent, told again, undoes it in the next view (agreement is not at stake).
//!
//! Model and its limit: any two quorums of a view share a core, so the views agree even when
//! live cores are suspected (two sides that fence each other cannot both commit view n+1;
//! `model` checks it on this code). A core suspected while alive (a false suspicion)
//! learns it from the `COMMIT` that removes it (sent to old members too, and read even from
//! a core it suspects: a committed view had a quorum), or, when no view can be made
//! without it, from the answer to its probe (a suspected core's `PING`, or request, is
//! answered with the views and the suspects); from then on it stays out and takes no part:
//! [`Members::evicted`]. A core back from an absence of its own (a stall, a deafness:
//! [`Members::saw`]) suspects nobody on what it saw before: it probes afresh, and until
//! answered takes a silence as its own fencing ([`Members::silence`]), so a fenced core
//! never takes out the core that fenced it (of two, the higher is the tie-breaker). The
//! price is liveness: with half of a view stopped (without its highest core), no view
//! follows; in a view of two, the lower core cannot take the higher one out; a core back
//! from an absence that meets a silence before any answer gives up its guest even when
//! the silent core is the one that failed. The last member never leaves an empty machine, but if every member of the view
//! stops, the machine has ended: a core out of it that asks in is let in by nobody, and it
//! makes no view of its own (a stopped member may have committed a later one, still in some
//! ring).
//!
//! Ring budget: per ordered core pair at most a `PING`, a `PONG` and the `CATCHUP` it may
//! bring (a suspected prober gets the `CATCHUP` alone), a `WISH`, a `WISH_ACK` and its `CATCHUP`, two coordinator messages (a `COMMIT` and
//! the next round's first, or a `CATCHUP` and an `ACCEPT`), one answer and an `END`: 10
//! (counted in `caps::proto::RING_SLOTS`; the simulator checks 8 queued at most).
//!
//! Owns only this bookkeeping and its message kinds ([`op`]); calls nothing but the [`Net`]
//! it is handed and `vmcall_proto` (the message type). The capability system carries its
//! messages on the same rings and calls into it; it never calls the capability system.

use vmcall_proto::channel::Payload;

/// Cores a view can hold: one bit each in a [`CoreSet`].
pub const MAX_PEERS: usize = 64;

/// What membership needs from its core: the time and the inter-core transport.
pub trait Net {
    /// The time-stamp counter now.
    fn now(&mut self) -> u64;
    /// Puts a message on the inter-core ring to core `to`; `false` if it is full.
    fn send(&mut self, to: usize, m: &Payload) -> bool;
    /// Makes core `to` look at its inbox soon.
    fn kick(&mut self, to: usize);
    /// Message `m` was sent (`sent`) or is handled here, view `view` installed: for counting.
    fn count(&mut self, _view: u32, _sent: bool, _m: &Payload) {}
}

/// The membership messages' kinds (word 0, low byte), numbered among the other kinds
/// that share the inter-core rings (`caps::proto::op` re-exports them).
pub mod op {
    pub const PING: u64 = 11;
    pub const PONG: u64 = 12;
    pub const WISH: u64 = 13;
    pub const WISH_ACK: u64 = 14;
    pub const PREPARE: u64 = 15;
    pub const PROMISE: u64 = 16;
    pub const ACCEPT: u64 = 17;
    pub const ACCEPTED: u64 = 18;
    pub const NACK: u64 = 19;
    pub const COMMIT: u64 = 20;
    pub const END: u64 = 21;
    pub const CATCHUP: u64 = 22;
}

/// A set of cores, one bit per core index.
pub type CoreSet = u64;

const fn bit(core: usize) -> CoreSet {
    1 << core
}

/// One view of the machine: the `num`th agreed set of cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct View {
    pub num: u32,
    pub set: CoreSet,
}

/// The failure detector's clock, in TSC ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Timing {
    /// Time between two probes of the same core; 0: no failure detector (views change
    /// only as cores ask).
    pub period: u64,
    /// A probe unanswered for this long, or a round's answer missing for this long,
    /// makes the core suspected.
    pub timeout: u64,
    /// A core never heard from is not suspected before this long after start.
    pub grace: u64,
}

/// What changed, for the caller to act on and to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Change {
    pub old: View,
    pub new: View,
    /// The instance that coordinated it (as far as this one knows: the sender of the
    /// `COMMIT`, or itself).
    pub by: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Phase {
    Prepare,
    Accept,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Round {
    ballot: u64,
    phase: Phase,
    /// Members asked and not answered yet (every unsuspected member of the view at the
    /// start; those that promised, not suspected since, for the accepts).
    waiting: CoreSet,
    /// Members whose answer to this phase came (the coordinator's own included).
    got: CoreSet,
    /// The highest-ballot proposal for this view number a member reported.
    best: Option<(u64, View)>,
    value: View,
    deadline: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
struct Probe {
    target: Option<u8>,
    seq: u64,
    /// The probe in flight: when it was sent.
    sent: Option<u64>,
    next: u64,
}

const CHANGES: usize = 16;
/// Intents a view change applies at most (a `COMMIT` carries their numbers).
const INTENTS: usize = 2;

/// One instance's membership state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Members {
    me: u8,
    view: View,
    promised: u64,
    /// Highest ballot seen anywhere (a retry goes above it).
    seen: u64,
    accepted: Option<(u64, View)>,
    /// Cores this instance believes stopped: fenced for good.
    suspects: CoreSet,
    /// Cores ever heard from (the grace period is over for them).
    heard: CoreSet,
    /// Cores of any view installed here.
    ever: CoreSet,
    /// Wishes this instance knows of: cores to take out, cores to bring in.
    /// Each core's latest intent this instance knows: its number (0: none yet, which
    /// means in, as configured) and whether it wants in.
    intent_seq: [u32; MAX_PEERS],
    wants_in: CoreSet,
    /// What the coordinator `told.0` was told: intent numbers, suspects.
    told: (u8, [u32; MAX_PEERS], CoreSet),
    /// The coordinator whose `WISH_ACK` is awaited, and since when (told again after a
    /// timeout: one that takes this core for stopped never answers).
    wish_out: Option<u8>,
    wish_sent: u64,
    /// Out of the view and asking to come in: when to ask again, whom it asked last and
    /// whether that core acknowledged.
    join_retry: u64,
    join_asked: Option<(u8, bool)>,
    round: Option<Round>,
    probe: Probe,
    timing: Timing,
    start: u64,
    ended: bool,
    /// Removed from the view without asking to leave (or, back from an absence, it took
    /// itself for fenced: [`Members::evicted`]).
    evicted: bool,
    /// When this instance last looked at its membership (a tick that was due, a message,
    /// a call): a member with something due looks at least every period (the heartbeat in
    /// [`Members::due`]), so a longer gap is an absence of its own (a stall, a deafness).
    looked: u64,
    /// Back from an absence and not yet answered by the core it probes since: it may have
    /// been fenced meanwhile, so a silence it meets is taken as its own fencing, not the
    /// other core's failure.
    returned: bool,
    /// It took itself for fenced ([`Members::silence`]): it answers no probe any more.
    gave_up: bool,
    /// The same, not yet taken by the caller (to log it).
    self_fenced: bool,
    /// The last views installed, oldest first (the current one last): the last two are
    /// what a core that is behind is sent (`CATCHUP`).
    history: [View; 3],
    changes: [Option<Change>; CHANGES],
    change_head: usize,
    change_len: usize,
    /// Cores suspected since the caller last took them.
    newly_suspected: CoreSet,
    /// [`Members::due`], kept up to date.
    due_at: u64,
    /// Tests only: the old rule (any unsuspected members are a quorum), which the model
    /// must find splitting the views.
    #[cfg(test)]
    old_rule: bool,
    /// Tests only: the detector without the absence rule (a core back from an absence
    /// suspects on what it finds, as before), which the model must find fencing a live
    /// core's fencer.
    #[cfg(test)]
    old_detector: bool,
}

/// Whether `m` is a membership message.
pub fn is_member(m: &Payload) -> bool {
    (op::PING..=op::CATCHUP).contains(&(m[0] & 0xff))
}

fn msg(kind: u64, words: &[u64]) -> Payload {
    let mut m: Payload = [0; 7];
    m[0] = kind;
    m[1..=words.len()].copy_from_slice(words);
    m
}

/// The highest core of `set`.
fn highest(set: CoreSet) -> Option<u8> {
    (set != 0).then(|| 63 - set.leading_zeros() as u8)
}

/// Whether the members of `got` are a quorum of a view made of `set`: more than half of its
/// members (suspected ones count in the half), or exactly half with the view's highest core
/// (the tie-breaker). Any two quorums of one view share a core: two majorities overlap, a
/// majority and a half too, and two disjoint halves cannot both hold the highest core. So
/// two coordinators that suspect each other's side cannot both get view n+1 accepted.
pub fn is_quorum(set: CoreSet, got: CoreSet) -> bool {
    let (n, k) = (set.count_ones(), (got & set).count_ones());
    2 * k > n || 2 * k == n && highest(set).is_some_and(|h| got & bit(h as usize) != 0)
}

impl Members {
    /// The instance of core `me` at time `now`, in view 0 made of `initial` (the cores the
    /// configuration gives a guest: the same on every core).
    pub fn new(me: usize, initial: CoreSet, timing: Timing, now: u64) -> Self {
        let mut m = Members {
            me: me as u8,
            view: View { num: 0, set: initial },
            promised: 0,
            seen: 0,
            accepted: None,
            suspects: 0,
            heard: 0,
            ever: initial,
            intent_seq: [0; MAX_PEERS],
            wants_in: CoreSet::MAX,
            told: (u8::MAX, [0; MAX_PEERS], 0),
            wish_out: None,
            wish_sent: 0,
            join_retry: u64::MAX,
            join_asked: None,
            round: None,
            probe: Probe { next: now, ..Probe::default() },
            timing,
            start: now,
            ended: false,
            evicted: false,
            looked: now,
            returned: false,
            gave_up: false,
            self_fenced: false,
            history: [View { num: 0, set: initial }; 3],
            changes: [None; CHANGES],
            change_head: 0,
            change_len: 0,
            newly_suspected: 0,
            due_at: u64::MAX,
            #[cfg(test)]
            old_rule: false,
            #[cfg(test)]
            old_detector: false,
        };
        m.due_at = m.compute_due();
        m
    }

    #[cfg(test)]
    pub fn view(&self) -> View {
        self.view
    }

    /// Whether this core is in its own view.
    pub fn member(&self) -> bool {
        self.view.set & bit(self.me as usize) != 0
    }

    /// How long a probe or a round's answer may take.
    pub fn timeout(&self) -> u64 {
        self.timing.timeout
    }

    /// Cores this instance treats as stopped.
    #[cfg(test)]
    pub fn suspects(&self) -> CoreSet {
        self.suspects
    }

    /// Cores fenced as far as this instance knows: those it suspects, and those a view
    /// took out without their asking (another core suspected them).
    pub fn fenced(&self) -> CoreSet {
        self.suspects | (self.ever & !self.view.set & self.wants_in)
    }

    /// Whether this core was removed without asking (a false suspicion): it must stay out.
    pub fn evicted(&self) -> bool {
        self.evicted
    }

    /// Whether this core took itself for fenced since the last call: back from an absence,
    /// it met a silence before anyone answered it ([`Members::silence`]).
    pub fn take_self_fenced(&mut self) -> bool {
        core::mem::take(&mut self.self_fenced)
    }

    /// Whether a view change waits for [`Members::take_change`].
    pub fn has_change(&self) -> bool {
        self.change_len != 0
    }

    /// The next view change installed here, oldest first.
    pub fn take_change(&mut self) -> Option<Change> {
        if self.change_len == 0 {
            return None;
        }
        let c = self.changes[self.change_head].take();
        self.change_head = (self.change_head + 1) % CHANGES;
        self.change_len -= 1;
        c
    }

    /// Cores suspected since the last call.
    pub fn take_suspected(&mut self) -> CoreSet {
        core::mem::take(&mut self.newly_suspected)
    }

    fn coordinator(&self) -> Option<u8> {
        highest(self.view.set & !self.suspects)
    }

    /// The member this one probes: the next one above it, cyclically.
    fn successor(&self) -> Option<u8> {
        let others = self.view.set & !self.suspects & !bit(self.me as usize);
        let above = others & !((bit(self.me as usize) << 1).wrapping_sub(1));
        let pick = if above != 0 { above } else { others };
        (pick != 0).then(|| pick.trailing_zeros() as u8)
    }

    /// Cores that asked to come in and are not in the view.
    fn joining(&self) -> CoreSet {
        let asked: CoreSet =
            (0..MAX_PEERS).filter(|&c| self.intent_seq[c] != 0).map(bit).fold(0, |a, b| a | b);
        asked & self.wants_in & !self.view.set & !self.suspects
    }

    /// The set the coordinator wants next: the suspected out, and up to [`INTENTS`] cores
    /// in or out as they asked (what a `COMMIT` can carry). The last member stays until
    /// another is in (an empty machine could bring nobody back).
    fn desired(&self) -> CoreSet {
        let live = self.view.set & !self.suspects;
        let mut asked = (live & !self.wants_in) | self.joining();
        while asked.count_ones() as usize > INTENTS {
            asked &= !bit(63 - asked.leading_zeros() as usize);
        }
        let set = live ^ asked;
        if set == 0 {
            bit(self.me as usize)
        } else {
            set
        }
    }

    /// The run is ending: stop probing (a core busy with the final report must not be
    /// taken for a hung one). Rounds in progress still finish.
    pub fn end(&mut self, env: &mut impl Net) {
        self.saw(env.now());
        self.end_inner(env);
        self.due_at = self.compute_due();
    }

    fn end_inner(&mut self, env: &mut impl Net) {
        if !self.ended && self.member() {
            self.ended = true;
            for c in 0..MAX_PEERS {
                if self.view.set & !self.suspects & bit(c) != 0 && c != self.me as usize {
                    self.send(env, c, &msg(op::END, &[]), true);
                }
            }
        }
        self.ended = true;
    }

    /// This core asks to be taken out of the view.
    pub fn leave(&mut self, env: &mut impl Net) {
        self.saw(env.now());
        self.leave_inner(env);
        self.due_at = self.compute_due();
    }

    /// This core takes back its wish to leave (it did not happen in time): a newer intent,
    /// in, so that a late commit of the old one cannot take it out under a running guest.
    pub fn stay(&mut self, env: &mut impl Net) {
        self.saw(env.now());
        let me = self.me as usize;
        self.intent_seq[me] += 1;
        self.wants_in |= bit(me);
        self.advance(env);
        self.due_at = self.compute_due();
    }

    fn leave_inner(&mut self, env: &mut impl Net) {
        let me = self.me as usize;
        self.intent_seq[me] += 1;
        self.wants_in &= !bit(me);
        self.advance(env);
    }

    /// This core, out of the view, asks to be brought back through `via` (a member: the core
    /// of whoever asked, which forwards the wish to its coordinator).
    pub fn join(&mut self, env: &mut impl Net, via: usize) {
        self.saw(env.now());
        self.join_inner(env, via);
        self.due_at = self.compute_due();
    }

    fn join_inner(&mut self, env: &mut impl Net, via: usize) {
        self.evicted = false;
        let me = self.me as usize;
        self.intent_seq[me] += 1;
        self.wants_in |= bit(me);
        if via < MAX_PEERS && via != me {
            self.ask_in(env, via);
        }
    }

    /// Asks core `to` to bring this one in (again after a timeout, until it is in).
    fn ask_in(&mut self, env: &mut impl Net, to: usize) {
        let me = self.me as usize;
        let num = self.view.num as u64;
        let m = msg(op::WISH, &[me as u64, self.intent_seq[me] as u64, 1, 0, num]);
        self.join_asked = Some((to as u8, false));
        self.join_retry = env.now().saturating_add(self.timing.timeout);
        self.send(env, to, &m, true);
    }

    /// When [`Members::tick`] next has something to do: kept by every call that changes
    /// the state (one load on the VM entry path).
    pub fn due(&self) -> u64 {
        self.due_at
    }

    fn compute_due(&self) -> u64 {
        if !self.member() {
            let joining = self.wants_in & bit(self.me as usize) != 0;
            return if joining { self.join_retry } else { u64::MAX };
        }
        if self.ended || self.evicted {
            return u64::MAX;
        }
        let succ = if self.timing.period == 0 { None } else { self.successor() };
        let probe = match (self.probe.target, self.probe.sent) {
            // A member to probe that is not the one probed: at once.
            (t, _) if t != succ => 0,
            (None, _) => u64::MAX,
            (Some(_), None) => self.probe.next,
            (Some(t), Some(sent)) => self.probe_limit(t, sent),
        };
        let wish = self.wish_out.map_or(u64::MAX, |_| self.wish_sent + self.timing.timeout);
        let due = probe.min(self.round.map_or(u64::MAX, |r| r.deadline)).min(wish);
        if due != u64::MAX && self.timing.period != 0 {
            // The heartbeat: with something due, a look at least every period, so that an
            // absence of its own shows ([`Members::saw`]).
            due.min(self.looked.saturating_add(self.timing.period))
        } else {
            due
        }
    }

    fn probe_limit(&self, target: u8, sent: u64) -> u64 {
        // Back from an absence, the answer of a live core comes within a stretch: half the
        // timeout is ample, and the core's own fencing then shows within a timeout of its
        // return.
        let wait = if self.returned { self.timing.timeout / 2 } else { self.timing.timeout };
        let limit = sent.saturating_add(wait);
        if self.heard & bit(target as usize) != 0 {
            limit
        } else {
            limit.max(self.start.saturating_add(self.timing.grace))
        }
    }

    /// The failure detector and the round's deadline.
    pub fn tick(&mut self, env: &mut impl Net) {
        let now = env.now();
        if now < self.due_at {
            return;
        }
        self.saw(now);
        self.tick_inner(env);
        self.due_at = self.compute_due();
    }

    /// This instance looks at its membership at `now`. A member with something due looks
    /// at least every period (the heartbeat in [`Members::due`]; a live core's stretch away
    /// from its inbox is under a period), so a gap of more than half the timeout (and of
    /// two periods) is an absence of its own (a stall, a starved vCPU, a deafness), during which its prober
    /// may have fenced it. Back from one, its verdicts rest on what it sees from now on:
    /// the probe in flight is void (an answer to it is still read, but a new probe goes out
    /// at once and only its answer counts), the round's and the wish's deadlines start
    /// again, and until the core it probes answers, a silence is taken as its own fencing
    /// ([`Members::silence`]).
    fn saw(&mut self, now: u64) {
        let away = now.saturating_sub(self.looked);
        self.looked = now;
        #[cfg(test)]
        if self.old_detector {
            return;
        }
        let owed = self.due_at != u64::MAX && self.member();
        let limit = (self.timing.timeout / 2).max(self.timing.period.saturating_mul(2));
        if self.timing.period == 0 || !owed || away <= limit {
            return;
        }
        self.returned = true;
        self.probe.seq += 1;
        self.probe.sent = None;
        self.probe.next = now;
        let restart = now.saturating_add(self.timing.timeout);
        if let Some(r) = self.round.as_mut() {
            r.deadline = r.deadline.max(restart);
        }
        if self.wish_out.is_some() {
            self.wish_sent = self.wish_sent.max(now);
        }
    }

    /// The cores of `cores` did not answer in time (a probe, a round's phase, a wish):
    /// suspected. Unless this core is back from an absence and not answered since: then the
    /// silent core may be the one that fenced it meanwhile (and has stopped since, or is
    /// slow now), and taking it out on that would let a fenced core take out its fencer
    /// (of two cores, the higher is the tie-breaker: chaos seed 55). So it takes itself for
    /// fenced ([`Members::evicted`]: its guest stops for good), takes no further part, and
    /// answers no probe (so that its prober fences it and probes past it).
    fn silence(&mut self, env: &mut impl Net, cores: CoreSet) {
        if cores & !bit(self.me as usize) == 0 {
            return;
        }
        if self.returned {
            self.gave_up = true;
            self.self_fenced = true;
            self.evicted = true;
            self.round = None;
            self.wish_out = None;
            return;
        }
        self.suspect(env, cores);
    }

    fn tick_inner(&mut self, env: &mut impl Net) {
        let now = env.now();
        if let Some(r) = self.round {
            if now >= r.deadline {
                self.round = None;
                self.silence(env, r.waiting);
            }
        }
        if !self.member() {
            // Out and asking to come in: not in yet, so the one asked may have stopped
            // (or left) before passing it on: ask the next core of the latest view known
            // (a core asked sends the views this one missed).
            if self.wants_in & bit(self.me as usize) != 0 && now >= self.join_retry {
                if let Some((c, false)) = self.join_asked {
                    // No answer: taken for stopped here (this core is out: the suspicion
                    // goes nowhere until it is in again).
                    self.suspects |= bit(c as usize);
                }
                let members = self.view.set & !self.suspects & !bit(self.me as usize);
                if let Some(c) = highest(members) {
                    self.ask_in(env, c as usize);
                } else {
                    // Nobody known to ask (the last member stopped): look again a timeout
                    // later (a view may arrive meanwhile) rather than on every VM entry.
                    self.join_retry = now.saturating_add(self.timing.timeout);
                }
            }
            return;
        }
        if self.evicted {
            // Fenced while alive: it takes no further part (no probe, wish or round).
            return;
        }
        if let Some(c) = self.wish_out {
            if now >= self.wish_sent.saturating_add(self.timing.timeout) {
                // A coordinator that serves its inbox acknowledges at once, unless it fenced
                // this core: it has stopped, or it is on the other side. Fenced here too (its
                // prober may have stopped, and with no quorum no view says it), and the wish
                // goes to the next coordinator: told again, not piled up in its ring.
                self.wish_out = None;
                self.told = (u8::MAX, [0; MAX_PEERS], 0);
                self.silence(env, bit(c as usize));
            }
        }
        if self.evicted || self.ended {
            return;
        }
        let succ = if self.timing.period == 0 { None } else { self.successor() };
        if self.probe.target != succ {
            self.probe = Probe { target: succ, seq: self.probe.seq, sent: None, next: now };
        }
        if let Some(t) = succ {
            match self.probe.sent {
                Some(sent) if now >= self.probe_limit(t, sent) => {
                    self.probe.sent = None;
                    self.silence(env, bit(t as usize));
                }
                Some(_) => {}
                None if now >= self.probe.next => {
                    self.probe.seq += 1;
                    self.probe.sent = Some(now);
                    let seq = self.probe.seq;
                    let num = self.view.num as u64;
                    self.send(env, t as usize, &msg(op::PING, &[seq, num]), true);
                }
                None => {}
            }
        }
        self.advance(env);
    }

    fn send(&mut self, env: &mut impl Net, to: usize, m: &Payload, kick: bool) {
        if env.send(to, m) {
            env.count(self.view.num, true, m);
            if kick {
                env.kick(to);
            }
        } else if self.suspects & bit(to) == 0 {
            // The ring budget rules this out for a core that serves its inbox.
            self.suspects |= bit(to);
            self.newly_suspected |= bit(to);
        }
    }

    fn suspect(&mut self, env: &mut impl Net, cores: CoreSet) {
        let new = cores & !bit(self.me as usize) & !self.suspects;
        if new == 0 {
            return;
        }
        self.suspects |= new;
        self.newly_suspected |= new;
        if self.wish_out.is_some_and(|c| new & bit(c as usize) != 0) {
            self.wish_out = None;
        }
        self.advance(env);
    }

    /// Moves things on: the coordinator starts a round if there is a change to make; any
    /// other member tells the coordinator its wishes.
    fn advance(&mut self, env: &mut impl Net) {
        if self.evicted {
            return;
        }
        let Some(c) = self.coordinator() else { return };
        let me = self.me as usize;
        if self.member() && c as usize == me {
            let pending = self.accepted.is_some_and(|(_, v)| v.num > self.view.num);
            if self.round.is_none() && (self.desired() != self.view.set || pending) {
                self.start_round(env);
            }
            return;
        }
        if !self.member() {
            // Out: its own wish to come in goes through `join`; it passes on nothing.
            return;
        }
        // Any other member passes on what the coordinator was not told: intents, then
        // suspicions. One `WISH` in flight.
        if self.wish_out.is_some() {
            return;
        }
        if self.told.0 != c {
            self.told = (c, [0; MAX_PEERS], 0);
        }
        let untold = (0..MAX_PEERS).find(|&k| self.intent_seq[k] > self.told.1[k]);
        let suspects = self.suspects & self.view.set;
        let num = self.view.num as u64;
        let m = match untold {
            Some(k) => {
                self.told.1[k] = self.intent_seq[k];
                let want_in = self.wants_in & bit(k) != 0;
                msg(op::WISH, &[k as u64, self.intent_seq[k] as u64, want_in as u64, suspects, num])
            }
            None if suspects & !self.told.2 != 0 => {
                msg(op::WISH, &[MAX_PEERS as u64, 0, 0, suspects, num])
            }
            None => return,
        };
        self.told.2 |= suspects;
        self.wish_out = Some(c);
        self.wish_sent = env.now();
        self.send(env, c as usize, &m, true);
    }

    /// Whether the answers of `got` let a round of this view go on.
    fn quorum(&self, got: CoreSet) -> bool {
        #[cfg(test)]
        if self.old_rule {
            return true;
        }
        is_quorum(self.view.set, got)
    }

    fn start_round(&mut self, env: &mut impl Net) {
        let me = self.me as usize;
        let asked = self.view.set & !self.suspects;
        if !self.quorum(asked) {
            // Too few members left unsuspected to make a quorum: no round (it could not
            // commit). The view comes from the other side's `COMMIT`, if it has a quorum.
            return;
        }
        let ballot = (((self.seen.max(self.promised) >> 8) + 1) << 8) | me as u64;
        self.promised = ballot;
        self.seen = ballot;
        let best = self.accepted.filter(|(_, v)| v.num == self.view.num + 1);
        let deadline = env.now().saturating_add(self.timing.timeout);
        let waiting = asked & !bit(me);
        self.round = Some(Round {
            ballot,
            phase: Phase::Prepare,
            waiting,
            got: bit(me),
            best,
            value: View::default(),
            deadline,
        });
        let num = self.view.num as u64 + 1;
        for c in cores(waiting) {
            self.send(env, c, &msg(op::PREPARE, &[ballot, num]), true);
        }
        self.phase_done(env);
    }

    /// Every member asked has answered this phase: on to the next one. The promises are
    /// a quorum (every member asked, a quorum when the round began); the accepts may not
    /// be (a member suspected after its promise is not asked to accept): then the round
    /// cannot commit and ends.
    fn phase_done(&mut self, env: &mut impl Net) {
        let Some(r) = self.round else { return };
        if r.waiting != 0 {
            return;
        }
        if r.phase == Phase::Prepare {
            self.phase_two(env);
        } else if self.quorum(r.got) {
            self.commit(env);
        } else {
            self.round = None;
        }
    }

    fn phase_two(&mut self, env: &mut impl Net) {
        let Some(mut r) = self.round else { return };
        let me = self.me as usize;
        r.value = match r.best {
            Some((_, v)) => v,
            None => View { num: self.view.num + 1, set: self.desired() },
        };
        r.phase = Phase::Accept;
        // Those that promised and are not suspected since.
        r.waiting = r.got & !bit(me) & !self.suspects;
        r.got = bit(me);
        r.deadline = env.now().saturating_add(self.timing.timeout);
        self.accepted = Some((r.ballot, r.value));
        self.round = Some(r);
        for c in cores(r.waiting) {
            let m = msg(op::ACCEPT, &[r.ballot, r.value.num as u64, r.value.set]);
            self.send(env, c, &m, true);
        }
        self.phase_done(env);
    }

    fn commit(&mut self, env: &mut impl Net) {
        let Some(r) = self.round.take() else { return };
        let me = self.me as usize;
        // The old view's cores too, suspected ones included: a core fenced while it was
        // only slow learns from this `COMMIT` that it is out (and stops for good) before it
        // could take the others for stopped and make a view of its own. A core that has
        // really stopped never reads it.
        let to = (r.value.set | self.view.set) & !bit(me);
        // With the cores it suspects: every member fences them too.
        let mut m = msg(op::COMMIT, &[r.ballot, r.value.num as u64, r.value.set, self.suspects]);
        // The intents it applied (cores in or out not by suspicion), with their numbers:
        // every member's table then knows them, whoever coordinates next.
        let changed = (self.view.set ^ r.value.set) & !self.suspects;
        for (k, c) in cores(changed).take(INTENTS).enumerate() {
            let want_in = r.value.set & bit(c) != 0;
            m[5 + k] = intent(c, self.intent_seq[c], want_in);
        }
        for c in cores(to) {
            self.send(env, c, &m, true);
        }
        // A value adopted from a failed coordinator may have moved a core this table has
        // other news of: the view decides at the number known here.
        self.wants_in = self.wants_in & !changed | r.value.set & changed;
        self.install(r.value, self.me);
        self.advance(env);
    }

    fn install(&mut self, v: View, by: u8) {
        if v.num <= self.view.num {
            return;
        }
        let me = bit(self.me as usize);
        let old = self.view;
        if old.set & me != 0 && v.set & me == 0 && self.wants_in & me != 0 {
            self.evicted = true;
        }
        self.view = v;
        self.ever |= v.set;
        if self.accepted.is_some_and(|(_, a)| a.num <= v.num) {
            self.accepted = None;
        }
        // A round targets the view after the one installed before: now settled.
        self.round = None;
        if self.wish_out != self.coordinator() {
            // Its coordinator changed: the wishes go to the new one (a late ack is ignored).
            self.wish_out = None;
        }
        let slot = (self.change_head + self.change_len) % CHANGES;
        if self.change_len == CHANGES {
            // The caller takes changes after every poll; a full queue drops the oldest.
            self.change_head = (self.change_head + 1) % CHANGES;
        } else {
            self.change_len += 1;
        }
        self.changes[slot] = Some(Change { old, new: v, by });
        self.history = [self.history[1], self.history[2], v];
    }

    /// One membership message from core `from`.
    pub fn deliver(&mut self, env: &mut impl Net, from: usize, m: &Payload) {
        self.saw(env.now());
        self.deliver_inner(env, from, m);
        self.due_at = self.compute_due();
    }

    fn deliver_inner(&mut self, env: &mut impl Net, from: usize, m: &Payload) {
        if from >= MAX_PEERS || from == self.me as usize {
            return;
        }
        let kind = m[0] & 0xff;
        if self.suspects & bit(from) != 0 && kind != op::COMMIT && kind != op::CATCHUP {
            // Fenced: nothing it says is read, but a committed view (it had a quorum)
            // is a fact whoever sends it: a core fenced by the other side while alive
            // learns from it that it is out. And a fenced core that probes this one is
            // told it is fenced (the views and the suspects, itself among them): with no
            // quorum without it, no view may ever say so (the lower core of two). So is one
            // that asks anything else that waits for an answer (a wish, a round's phase): a
            // fenced core answered by a third core since its return (not fenced there) must
            // not take this silence for this core's failure (in place of the answer: the
            // ring budget is unchanged).
            if matches!(kind, op::PING | op::WISH | op::PREPARE | op::ACCEPT) {
                self.send_views(env, from);
            }
            return;
        }
        self.heard |= bit(from);
        env.count(self.view.num, false, m);
        let w = |i: usize| m[i];
        match m[0] & 0xff {
            // Out by its own verdict, it answers no probe: its prober fences it as it would a
            // stopped core, and the probes go round the others (a core it was the only
            // prober of, hung, is not left unfenced).
            op::PING if self.gave_up => {}
            op::PING => {
                self.send(env, from, &msg(op::PONG, &[w(1)]), false);
                self.catch_up(env, from, w(2));
            }
            op::PONG if self.probe.target == Some(from as u8) && w(1) == self.probe.seq => {
                self.probe.sent = None;
                self.probe.next = env.now().saturating_add(self.timing.period);
                // Answered since its return: not fenced by this core, a member again.
                self.returned = false;
            }
            op::WISH => {
                self.send(env, from, &msg(op::WISH_ACK, &[]), true);
                self.catch_up(env, from, w(5));
                // The intent goes into the table even here out of the view: the `WISH_ACK`
                // tells the sender it need not say it again, and this core may be the
                // coordinator of a view it has not installed yet (it learns it by `CATCHUP`).
                let me = bit(self.me as usize);
                let (core, seq) = (w(1) as usize, w(2) as u32);
                if core < MAX_PEERS && seq > self.intent_seq[core] {
                    self.intent_seq[core] = seq;
                    if w(3) != 0 {
                        self.wants_in |= bit(core);
                    } else {
                        self.wants_in &= !bit(core);
                    }
                }
                if !self.member() {
                    // Out: it cannot act on a wish (the asker tries another core).
                    return;
                }
                self.suspect(env, w(4) & self.view.set & !me);
                self.advance(env);
            }
            op::WISH_ACK => {
                if self.join_asked == Some((from as u8, false)) {
                    self.join_asked = Some((from as u8, true));
                }
                if self.wish_out == Some(from as u8) {
                    self.wish_out = None;
                    self.advance(env);
                }
            }
            op::PREPARE => {
                let (ballot, num) = (w(1), w(2));
                self.seen = self.seen.max(ballot);
                if num <= self.view.num as u64 || ballot <= self.promised {
                    self.nack(env, from, ballot);
                    return;
                }
                self.promised = ballot;
                let acc = self.accepted.filter(|(_, v)| v.num as u64 == num);
                let (ab, av) = acc.map_or((0, View::default()), |(b, v)| (b, v));
                let mine = self.view.num as u64;
                // With this core's own latest intent: the coordinator's table may be stale
                // (it learnt views without the intents behind them), this core is not.
                let me = self.me as usize;
                let intent = self.intent_word(me);
                let m = msg(op::PROMISE, &[ballot, ab, av.num as u64, av.set, mine, intent]);
                self.send(env, from, &m, true);
                // A new coordinator: it gets this member's wishes.
                if self.told.0 as usize != from {
                    self.wish_out = None;
                }
                self.advance(env);
            }
            op::ACCEPT => {
                let (ballot, v) = (w(1), View { num: w(2) as u32, set: w(3) });
                self.seen = self.seen.max(ballot);
                if v.num <= self.view.num || ballot < self.promised {
                    self.nack(env, from, ballot);
                    return;
                }
                self.promised = ballot;
                self.accepted = Some((ballot, v));
                self.send(env, from, &msg(op::ACCEPTED, &[ballot]), true);
            }
            op::PROMISE => {
                let Some(mut r) = self.round else { return };
                if r.ballot != w(1) || r.phase != Phase::Prepare || r.waiting & bit(from) == 0 {
                    return;
                }
                r.waiting &= !bit(from);
                r.got |= bit(from);
                // A member that missed views gets them before the ACCEPT.
                self.catch_up(env, from, w(5));
                self.merge_intent(w(6));
                if w(2) != 0 && r.best.is_none_or(|(b, _)| w(2) > b) {
                    r.best = Some((w(2), View { num: w(3) as u32, set: w(4) }));
                }
                self.round = Some(r);
                self.phase_done(env);
            }
            op::ACCEPTED => {
                let Some(mut r) = self.round else { return };
                if r.ballot != w(1) || r.phase != Phase::Accept || r.waiting & bit(from) == 0 {
                    return;
                }
                r.waiting &= !bit(from);
                r.got |= bit(from);
                self.round = Some(r);
                self.phase_done(env);
            }
            op::NACK => {
                let Some(r) = self.round else { return };
                if r.ballot != w(1) {
                    return;
                }
                self.seen = self.seen.max(w(2));
                self.round = None;
                let theirs = View { num: w(3) as u32, set: w(4) };
                if theirs.num > self.view.num {
                    // Installed there, so committed: this coordinator was behind.
                    self.install(theirs, from as u8);
                }
                self.merge_suspects(env, w(5));
                self.advance(env);
            }
            op::COMMIT => {
                self.seen = self.seen.max(w(1));
                self.install(View { num: w(2) as u32, set: w(3) }, from as u8);
                for k in 5..7 {
                    self.merge_intent(w(k));
                }
                self.merge_suspects(env, w(4));
                self.advance(env);
            }
            op::END => self.ended = true,
            op::CATCHUP => {
                for k in 0..2 {
                    self.install(View { num: w(1 + 2 * k) as u32, set: w(2 + 2 * k) }, from as u8);
                }
                self.merge_suspects(env, w(5));
                self.advance(env);
            }
            _ => {}
        }
    }

    /// Core `c`'s latest intent as this instance knows it, as one message word.
    fn intent_word(&self, c: usize) -> u64 {
        intent(c, self.intent_seq[c], self.wants_in & bit(c) != 0)
    }

    /// An intent from a message word ([`intent`]): taken if at least as new as what this
    /// instance knows.
    fn merge_intent(&mut self, i: u64) {
        let (c, seq) = ((i & 0xff) as usize, (i >> 16) as u32);
        if i >> 63 != 0 && c < MAX_PEERS && seq >= self.intent_seq[c] {
            self.intent_seq[c] = seq;
            self.wants_in = self.wants_in & !bit(c) | ((i >> 8) & 1) << c;
        }
    }

    /// Sends core `to`, whose view is number `theirs`, the views it missed (the last two at
    /// most: one further behind skips some) and the cores this one suspects.
    fn catch_up(&mut self, env: &mut impl Net, to: usize, theirs: u64) {
        if theirs < self.view.num as u64 {
            self.send_views(env, to);
        }
    }

    /// Sends core `to` the last two views installed here and the cores this one suspects.
    fn send_views(&mut self, env: &mut impl Net, to: usize) {
        let mut words = [0u64; 5];
        for (k, v) in self.history[1..].iter().enumerate() {
            words[2 * k] = v.num as u64;
            words[2 * k + 1] = v.set;
        }
        words[4] = self.suspects;
        self.send(env, to, &msg(op::CATCHUP, &words), true);
    }

    fn nack(&mut self, env: &mut impl Net, to: usize, ballot: u64) {
        let v = self.view;
        let m = msg(op::NACK, &[ballot, self.promised, v.num as u64, v.set, self.suspects]);
        self.send(env, to, &m, true);
    }

    /// Cores another instance suspects (sent with a view): fenced here too, so that every
    /// member treats a core the view change removed as failed, not only its prober. This
    /// core among them: it was taken for stopped while alive and must stay out.
    fn merge_suspects(&mut self, env: &mut impl Net, theirs: CoreSet) {
        let me = bit(self.me as usize);
        if theirs & me != 0 {
            // It takes no further part: a round of its own ends here.
            self.evicted = true;
            self.round = None;
        }
        self.suspect(env, theirs & !me);
    }
}

/// An intent as a message word: present bit, the core's number for it, in or out, the core.
fn intent(core: usize, seq: u32, want_in: bool) -> u64 {
    1 << 63 | (seq as u64) << 16 | (want_in as u64) << 8 | core as u64
}

/// The cores of `set`, lowest first.
fn cores(set: CoreSet) -> impl Iterator<Item = usize> {
    (0..MAX_PEERS).filter(move |&c| set & bit(c) != 0)
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
