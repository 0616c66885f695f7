// SPDX-License-Identifier: MIT OR Apache-2.0
//! The lifecycle of the guest on one core, as a pure state machine: what happens to it is fed
//! in as [`Event`]s (its setup done or failed, a controller's request, its incarnation over,
//! the clean death done, the core out of or back in the membership view, nobody left to
//! start it), and what the core must do comes out as [`Effect`]s, in order (answer a
//! controller, stop the guest, the clean-death steps, ready and start a new incarnation,
//! leave or rejoin the view, report it gone). The run loop performs the effects; every
//! decision is here, where host tests reach it.
//!
//! Promises (checked by the tests here, for any sequence of events):
//! - every controller request gets exactly one answer (at once, or when what it asked for
//!   is done: the guest down, the new incarnation entered, the core out of the view);
//! - restarts by the policy are at most `max_restarts` (a controller may start it as often
//!   as it likes);
//! - every incarnation that ended is followed by the clean-death steps, all of them and in
//!   [`DEATH`] order, before anything else happens to it;
//! - a guest the hypervisor could not set up or keep isolated, or whose memory a fenced core
//!   may still hold, is never started again, whatever the way back.
//!
//! Owns: the guest's phase, its incarnation number, its restart count, its last ending and
//! counters, the controller requests waiting for an answer. Calls only `vmcall_proto` (the
//! control operations and state word, the restart policy) and the ending types.

use super::Ending;
use crate::exits::StopReason;
use vmcall_proto::hypercall::{control, HvError};

/// When the hypervisor starts a guest again by itself (`restart` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Started once.
    Never,
    /// Started again when the hypervisor stopped it (fault, budget), not when it exited.
    OnFault,
    /// Started again however it ended.
    Always,
}

impl Restart {
    /// The config's value (`vmcall_proto::config::restart`); an unknown one never restarts.
    pub fn from_config(v: u8) -> Self {
        use vmcall_proto::config::restart;
        match v {
            restart::ON_FAULT => Restart::OnFault,
            restart::ALWAYS => Restart::Always,
            _ => Restart::Never,
        }
    }

    /// Whether a guest that ended so is started again. A guest the hypervisor could not set
    /// up, stopped to keep isolation, that a controller stopped, or whose run is over, never
    /// is.
    pub fn wants(self, ending: Ending) -> bool {
        match ending {
            Ending::Stopped(
                StopReason::Setup(_)
                | StopReason::Isolation(_)
                | StopReason::Requested { .. }
                | StopReason::RunEnded,
            ) => false,
            Ending::Exited(0) => self == Restart::Always,
            Ending::Exited(_) | Ending::Stopped(_) => self != Restart::Never,
        }
    }
}

/// The guest's part of the config that the lifecycle follows.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub restart: Restart,
    pub max_restarts: u32,
    /// Cores of the guests that control this one: only their requests are served.
    pub controllers: u64,
}

/// A controller's request: from core `from`, its request number `req`, the operation word
/// (`vmcall_proto::hypercall::control`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub from: usize,
    pub req: u32,
    pub op: u64,
}

/// An operation, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Query,
    Stop,
    Start,
    Restart,
    Park,
    Counter(usize),
}

impl Op {
    fn of(op: u64) -> Option<Op> {
        if !control::valid(op) {
            return None;
        }
        Some(match op & 0xff {
            control::QUERY => Op::Query,
            control::STOP => Op::Stop,
            control::START => Op::Start,
            control::RESTART => Op::Restart,
            control::PARK => Op::Park,
            _ => Op::Counter((op >> 8) as usize),
        })
    }
}

/// The counters `COUNTER` reads: exits, hypercalls, doorbells.
pub type Counters = [u64; control::counter::COUNT as usize];

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The new incarnation is set up and about to be entered.
    Entering,
    /// Its setup failed (why): it never ran.
    SetupFailed(&'static str),
    /// A controller asked something; `live` are the running incarnation's counters (read
    /// only while it runs).
    Request(Request, Counters),
    /// The running incarnation ended (exit, fault, budget, stop, run over).
    Ended(Ending),
    /// Its clean death is over: revokes of its caps some core did not confirm, its final
    /// counters, and whether the run's length is over.
    Dead { unconfirmed: u32, counters: Counters, run_over: bool },
    /// The core is out of the membership view (`true`) or could not leave in time.
    Left(bool),
    /// The core is back in the view (`true`) or could not rejoin in time.
    Joined(bool),
    /// Down or parked, and nobody will start it any more (every controller let go, or the
    /// wait for them is over).
    Unattended,
}

/// One step of an incarnation's clean death.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Death {
    /// Its devices stop: no DMA into memory about to be scrubbed or handed on.
    Quiesce,
    /// Its counters final: the status page shows it as it ended, its report is made.
    Account,
    /// Every copy made from its caps revoked everywhere, every copy it held dropped, its
    /// originals unmapped (while its EPT exists).
    Retire,
    /// Its channels down, each peer's core acknowledging (or given up on).
    LinksDown,
    /// Its VMCS cleared: the private region goes back whole.
    ClearVmcs,
    /// Its record written.
    Record,
}

/// The clean death, in order.
pub const DEATH: [Death; 6] = [
    Death::Quiesce,
    Death::Account,
    Death::Retire,
    Death::LinksDown,
    Death::ClearVmcs,
    Death::Record,
];

/// Why an incarnation starts (for the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The first.
    First,
    /// Its restart policy: the `k`th restart.
    Policy(u32),
    /// A controller asked (`START` or `RESTART`).
    Controller,
    /// A controller asked while the core was parked; it is back in the view.
    Rejoined,
}

/// What the core does, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Answer a controller's request.
    Answer { to: usize, req: u32, answer: Result<u64, HvError> },
    /// Stop the running incarnation: it ends so ([`Event::Ended`] follows).
    Stop(StopReason),
    /// A step of the clean death (all of [`DEATH`], in order, after every
    /// [`Event::Ended`]; [`Event::Dead`] follows).
    Die(Death),
    /// Ready what the dead incarnation leaves for the next: its memory scrubbed, its
    /// capability state accepting again.
    Rebirth,
    /// Set up and run incarnation `n` ([`Event::Entering`] or [`Event::SetupFailed`]
    /// follows).
    Start { n: u32, cause: Cause },
    /// Take the core out of the membership view ([`Event::Left`] follows).
    Leave,
    /// Bring the core back into the view through core `via` ([`Event::Joined`] follows).
    Join { via: usize },
    /// Down for good: the guests it controls no longer wait for it, its report goes out.
    Gone,
}

/// The effects of one event (at most [`Effects::CAP`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Effects {
    list: [Option<Effect>; Effects::CAP],
    len: usize,
}

impl Effects {
    pub const CAP: usize = 8;

    fn push(&mut self, e: Effect) {
        self.list[self.len] = Some(e);
        self.len += 1;
    }

    fn answer(&mut self, r: Request, answer: Result<u64, HvError>) {
        self.push(Effect::Answer { to: r.from, req: r.req, answer });
    }

    pub fn iter(&self) -> impl Iterator<Item = Effect> + '_ {
        self.list[..self.len].iter().flatten().copied()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where the guest is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// An incarnation is being set up.
    Setup,
    /// It runs (a controller's stop may be under way: it is then answered once down).
    Running,
    /// It ended; its clean death is under way.
    Dying,
    /// Down: its controllers may start it again.
    Down,
    /// Down, and its core leaving the view for a controller's `PARK`.
    Leaving,
    /// Down, its core out of the view.
    Parked,
    /// Parked, and its core rejoining the view for a controller's start.
    Joining,
    /// Down for good; reported.
    Gone,
}

/// The lifecycle of one core's guest.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    policy: Policy,
    phase: Phase,
    /// The incarnation set up or running, or the last one (1 from the first start).
    n: u32,
    /// Restarts by the policy so far.
    restarts: u32,
    /// How the last incarnation ended (`None` before the first ended).
    ending: Option<Ending>,
    unconfirmed: u32,
    /// The last incarnation's counters (what `COUNTER` reads while it is down).
    last: Counters,
    /// A controller's start, answered once the new incarnation is entered (or its setup
    /// failed).
    starting: Option<Request>,
    /// The request that stopped the running incarnation (`STOP`, `RESTART`, `PARK`),
    /// answered once it is down; or the `PARK`/start waiting for the view.
    asked: Option<Request>,
}

impl Lifecycle {
    /// A guest not started yet; [`Lifecycle::begin`] starts it.
    pub fn new(policy: Policy) -> Self {
        Lifecycle {
            policy,
            phase: Phase::Setup,
            n: 0,
            restarts: 0,
            ending: None,
            unconfirmed: 0,
            last: [0; 3],
            starting: None,
            asked: None,
        }
    }

    /// The first incarnation's start.
    pub fn begin(&mut self) -> Effects {
        let mut fx = Effects::default();
        if self.n == 0 {
            self.start(&mut fx, Cause::First);
        }
        fx
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The incarnation set up or running, or the last one.
    #[cfg(test)]
    pub fn incarnation(&self) -> u32 {
        self.n
    }

    /// How the last incarnation ended, as the report says it (the run's end noticed
    /// between two incarnations included).
    pub fn ending(&self) -> Option<Ending> {
        self.ending
    }

    /// Restarts by the policy so far.
    #[cfg(test)]
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Whether it may be started again: not if the hypervisor could not set it up or keep
    /// it isolated, nor once its run is over, nor while a fenced core may still hold a copy
    /// of its memory (never handed to a new incarnation), whatever the way back (`START`,
    /// `RESTART`, `PARK` then `START`).
    pub fn startable(&self) -> bool {
        !matches!(
            self.ending,
            Some(Ending::Stopped(
                StopReason::Setup(_) | StopReason::Isolation(_) | StopReason::RunEnded
            ))
        ) && self.unconfirmed == 0
    }

    /// The state word a controller's query gets.
    pub fn state_word(&self) -> u64 {
        let n = self.n;
        match (self.phase, self.ending) {
            (Phase::Running, _) | (Phase::Setup, None) => {
                control::state_word(control::RUNNING, n, 0)
            }
            (Phase::Parked | Phase::Joining, _) => control::state_word(control::PARKED, n, 0),
            (_, Some(Ending::Exited(s))) => control::state_word(control::EXITED, n, s),
            (_, Some(Ending::Stopped(StopReason::Requested { .. }))) => {
                control::state_word(control::HELD, n, 0)
            }
            (_, _) => control::state_word(control::STOPPED, n, 0),
        }
    }

    /// Takes `e`; returns what to do, in order.
    pub fn step(&mut self, e: Event) -> Effects {
        let mut fx = Effects::default();
        match (self.phase, e) {
            (_, Event::Request(r, live)) => self.request(&mut fx, r, live),
            (Phase::Setup, Event::Entering) => {
                self.phase = Phase::Running;
                if let Some(s) = self.starting.take() {
                    fx.answer(s, Ok(self.state_word()));
                }
            }
            (Phase::Setup, Event::SetupFailed(why)) => {
                self.ending = Some(Ending::Stopped(StopReason::Setup(why)));
                self.unconfirmed = 0;
                self.last = [0; 3];
                self.phase = Phase::Dying;
                self.settle(&mut fx, false);
            }
            (Phase::Running, Event::Ended(ending)) => {
                self.ending = Some(ending);
                self.phase = Phase::Dying;
                for d in DEATH {
                    fx.push(Effect::Die(d));
                }
            }
            (Phase::Dying, Event::Dead { unconfirmed, counters, run_over }) => {
                self.unconfirmed = unconfirmed;
                self.last = counters;
                self.settle(&mut fx, run_over);
            }
            (Phase::Leaving, Event::Left(out)) => {
                let r = self.asked.take();
                if out {
                    self.phase = Phase::Parked;
                    if let Some(r) = r {
                        fx.answer(r, Ok(self.state_word()));
                    }
                } else {
                    // It stays in the view, down; a later start may run it.
                    self.phase = Phase::Down;
                    if let Some(r) = r {
                        fx.answer(r, Err(HvError::Timeout));
                    }
                }
            }
            (Phase::Joining, Event::Joined(back)) => {
                let r = self.asked.take();
                if back {
                    self.starting = r;
                    fx.push(Effect::Rebirth);
                    self.start(&mut fx, Cause::Rejoined);
                } else {
                    self.phase = Phase::Parked;
                    if let Some(r) = r {
                        fx.answer(r, Err(HvError::Timeout));
                    }
                }
            }
            (Phase::Down, Event::Unattended) => {
                self.phase = Phase::Gone;
                fx.push(Effect::Gone);
            }
            // Nobody can bring it back: down, as any guest whose controllers let go.
            (Phase::Parked, Event::Unattended) => self.phase = Phase::Down,
            // Events the phase does not expect change nothing.
            _ => {}
        }
        fx
    }

    fn start(&mut self, fx: &mut Effects, cause: Cause) {
        self.n += 1;
        self.phase = Phase::Setup;
        fx.push(Effect::Start { n: self.n, cause });
    }

    /// The incarnation is down (setup failed, or its clean death is over): answers what
    /// waited for that, then what its controller asked or its policy says.
    fn settle(&mut self, fx: &mut Effects, run_over: bool) {
        self.phase = Phase::Down;
        if let Some(s) = self.starting.take() {
            // It never ran.
            fx.answer(s, Ok(self.state_word()));
        }
        let ending = self.ending.unwrap_or(Ending::Exited(0));
        match self.asked.take() {
            Some(r) => match Op::of(r.op) {
                Some(Op::Park) => self.leave(fx, r),
                Some(Op::Restart) if self.startable() => self.start_for(fx, r, Cause::Controller),
                // A fenced core may still hold a copy of its memory: it stays down.
                Some(Op::Restart) => fx.answer(r, Err(HvError::Busy)),
                _ => fx.answer(r, Ok(self.state_word())),
            },
            None if !self.policy.restart.wants(ending)
                || self.restarts >= self.policy.max_restarts
                || self.unconfirmed > 0 => {}
            None if run_over => {
                // The run's length ended while it was due to start again: it ends with the
                // run, as it would have a moment later in its next incarnation's setup.
                self.ending = Some(Ending::Stopped(StopReason::RunEnded));
            }
            None => {
                self.restarts += 1;
                fx.push(Effect::Rebirth);
                self.start(fx, Cause::Policy(self.restarts));
            }
        }
    }

    fn leave(&mut self, fx: &mut Effects, r: Request) {
        self.phase = Phase::Leaving;
        self.asked = Some(r);
        fx.push(Effect::Leave);
    }

    fn start_for(&mut self, fx: &mut Effects, r: Request, cause: Cause) {
        self.starting = Some(r);
        fx.push(Effect::Rebirth);
        self.start(fx, cause);
    }

    fn request(&mut self, fx: &mut Effects, r: Request, live: Counters) {
        if self.policy.controllers & (1u64.checked_shl(r.from as u32).unwrap_or(0)) == 0 {
            return fx.answer(r, Err(HvError::NotOwner));
        }
        let Some(op) = Op::of(r.op) else {
            return fx.answer(r, Err(HvError::BadArgument));
        };
        let counter = |c: &Counters, k: usize| c.get(k).copied().ok_or(HvError::BadArgument);
        match (self.phase, op) {
            (_, Op::Counter(k)) if self.phase == Phase::Running => fx.answer(r, counter(&live, k)),
            (_, Op::Counter(k)) => fx.answer(r, counter(&self.last, k)),
            // While an incarnation is set up or dies, or the core changes its view, the run
            // loop takes no request; one that came anyway is told to ask again.
            (Phase::Setup | Phase::Dying | Phase::Leaving | Phase::Joining, _) => {
                fx.answer(r, Err(HvError::Busy))
            }
            (Phase::Running, _) if self.asked.is_some() => fx.answer(r, Err(HvError::Busy)),
            (Phase::Running, Op::Query) => fx.answer(r, Ok(self.state_word())),
            (Phase::Running, Op::Start) => fx.answer(r, Err(HvError::Busy)),
            (Phase::Running, _) => {
                // Answered once it is down (see `settle`).
                self.asked = Some(r);
                fx.push(Effect::Stop(StopReason::Requested { by: r.from as u16 }));
            }
            (Phase::Down | Phase::Parked, Op::Start | Op::Restart) if !self.startable() => {
                // Parking does not launder a guest that must stay down.
                fx.answer(r, Err(HvError::Busy))
            }
            (Phase::Down, Op::Start | Op::Restart) => self.start_for(fx, r, Cause::Controller),
            (Phase::Down, Op::Park) => self.leave(fx, r),
            (Phase::Parked, Op::Start | Op::Restart) => {
                self.phase = Phase::Joining;
                self.asked = Some(r);
                fx.push(Effect::Join { via: r.from });
            }
            (Phase::Down | Phase::Parked | Phase::Gone, _) => fx.answer(r, Ok(self.state_word())),
        }
    }
}

#[cfg(test)]
mod tests;
