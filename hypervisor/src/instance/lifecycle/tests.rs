// SPDX-License-Identifier: MIT OR Apache-2.0
//! The lifecycle state machine on the host: each rule by example, then any sequence of
//! events (a driver that feeds what the run loop would, requests at any time, and events the
//! phase does not expect) against its promises.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

const CTL: usize = 2;
const OTHER: usize = 3;

fn policy(restart: Restart, max: u32) -> Policy {
    Policy { restart, max_restarts: max, controllers: 1 << CTL | 1 << 1 }
}

fn fx(l: &mut Lifecycle, e: Event) -> Vec<Effect> {
    l.step(e).iter().collect()
}

fn req(op: u64, n: u32) -> Request {
    Request { from: CTL, req: n, op }
}

fn ask(l: &mut Lifecycle, op: u64, n: u32) -> Vec<Effect> {
    fx(l, Event::Request(req(op, n), [10, 20, 30]))
}

fn answer(n: u32, answer: Result<u64, HvError>) -> Effect {
    Effect::Answer { to: CTL, req: n, answer }
}

fn word(state: u8, n: u32, status: u64) -> u64 {
    control::state_word(state, n, status)
}

fn death() -> Vec<Effect> {
    DEATH.iter().map(|&d| Effect::Die(d)).collect()
}

fn dead(unconfirmed: u32) -> Event {
    Event::Dead { unconfirmed, counters: [1, 2, 3], run_over: false }
}

/// A guest started and running its first incarnation.
fn running(p: Policy) -> Lifecycle {
    let mut l = Lifecycle::new(p);
    assert_eq!(l.begin().iter().collect::<Vec<_>>(), [Effect::Start { n: 1, cause: Cause::First }]);
    assert!(l.begin().is_empty(), "begins once");
    assert!(fx(&mut l, Event::Entering).is_empty());
    assert_eq!(l.phase(), Phase::Running);
    l
}

/// Ends the running incarnation so and finishes its clean death.
fn end(l: &mut Lifecycle, ending: Ending, unconfirmed: u32) -> Vec<Effect> {
    assert_eq!(fx(l, Event::Ended(ending)), death());
    assert_eq!(l.phase(), Phase::Dying);
    fx(l, dead(unconfirmed))
}

const FAULT: Ending = Ending::Stopped(StopReason::TripleFault { rip: 0 });

#[test]
fn the_restart_policy_by_ending() {
    use Restart::*;
    let iso = Ending::Stopped(StopReason::Isolation("x"));
    let setup = Ending::Stopped(StopReason::Setup("x"));
    let asked = Ending::Stopped(StopReason::Requested { by: 1 });
    let over = Ending::Stopped(StopReason::RunEnded);
    for (p, e, want) in [
        (Never, Ending::Exited(0), false),
        (Never, Ending::Exited(3), false),
        (Never, FAULT, false),
        (OnFault, Ending::Exited(0), false),
        (OnFault, Ending::Exited(3), true),
        (OnFault, FAULT, true),
        (Always, Ending::Exited(0), true),
        (Always, Ending::Exited(3), true),
        (Always, FAULT, true),
    ] {
        assert_eq!(p.wants(e), want, "{p:?} {e:?}");
    }
    for p in [Never, OnFault, Always] {
        for e in [iso, setup, asked, over] {
            assert!(!p.wants(e), "{p:?} {e:?}");
        }
    }
    use vmcall_proto::config::restart;
    assert_eq!(Restart::from_config(restart::NEVER), Never);
    assert_eq!(Restart::from_config(restart::ON_FAULT), OnFault);
    assert_eq!(Restart::from_config(restart::ALWAYS), Always);
    assert_eq!(Restart::from_config(9), Never);
}

#[test]
fn a_fault_restarts_up_to_the_bound_then_it_stays_down_until_nobody_waits() {
    let mut l = running(policy(Restart::OnFault, 2));
    for k in 1..=2 {
        let n = k + 1;
        let want = [Effect::Rebirth, Effect::Start { n, cause: Cause::Policy(k) }];
        assert_eq!(end(&mut l, FAULT, 0), want);
        assert_eq!(l.restarts(), k);
        assert!(fx(&mut l, Event::Entering).is_empty());
    }
    assert!(end(&mut l, FAULT, 0).is_empty(), "the bound reached");
    assert_eq!(l.phase(), Phase::Down);
    assert_eq!(l.incarnation(), 3);
    assert_eq!(ask(&mut l, control::QUERY, 7), [answer(7, Ok(word(control::STOPPED, 3, 0)))]);
    assert_eq!(ask(&mut l, control::COUNTER | 2 << 8, 8), [answer(8, Ok(3))], "the last's");
    assert_eq!(fx(&mut l, Event::Unattended), [Effect::Gone]);
    assert_eq!(l.phase(), Phase::Gone);
    assert!(fx(&mut l, Event::Unattended).is_empty(), "gone once");
    assert_eq!(ask(&mut l, control::QUERY, 9), [answer(9, Ok(word(control::STOPPED, 3, 0)))]);
}

#[test]
fn an_exit_restarts_only_under_always() {
    let mut l = running(policy(Restart::OnFault, 5));
    assert!(end(&mut l, Ending::Exited(0), 0).is_empty());
    assert_eq!(ask(&mut l, control::QUERY, 1), [answer(1, Ok(word(control::EXITED, 1, 0)))]);
    let mut l = running(policy(Restart::OnFault, 5));
    assert_eq!(end(&mut l, Ending::Exited(4), 0).len(), 2, "a failure status restarts");
    let mut l = running(policy(Restart::Always, 5));
    assert_eq!(end(&mut l, Ending::Exited(0), 0).len(), 2);
    let mut l = running(policy(Restart::Never, 5));
    assert!(end(&mut l, Ending::Exited(4), 0).is_empty());
    assert_eq!(ask(&mut l, control::QUERY, 1), [answer(1, Ok(word(control::EXITED, 1, 4)))]);
}

#[test]
fn unconfirmed_revokes_or_isolation_keep_it_down_whoever_asks() {
    for (ending, unconfirmed) in [
        (FAULT, 1),
        (Ending::Stopped(StopReason::Isolation("fenced")), 0),
        (Ending::Stopped(StopReason::Setup("VM entry failed")), 0),
    ] {
        let mut l = running(policy(Restart::Always, 5));
        assert!(end(&mut l, ending, unconfirmed).is_empty(), "{ending:?}");
        assert!(!l.startable());
        for (i, op) in [control::START, control::RESTART].into_iter().enumerate() {
            assert_eq!(ask(&mut l, op, i as u32), [answer(i as u32, Err(HvError::Busy))]);
        }
        // Parking does not launder it.
        assert_eq!(ask(&mut l, control::PARK, 5), [Effect::Leave]);
        assert_eq!(fx(&mut l, Event::Left(true)), [answer(5, Ok(word(control::PARKED, 1, 0)))]);
        assert_eq!(ask(&mut l, control::START, 6), [answer(6, Err(HvError::Busy))]);
        assert_eq!(l.phase(), Phase::Parked);
    }
}

#[test]
fn a_stop_is_answered_once_the_guest_is_down_and_held() {
    let mut l = running(policy(Restart::Always, 5));
    let by = StopReason::Requested { by: CTL as u16 };
    assert_eq!(ask(&mut l, control::STOP, 1), [Effect::Stop(by)]);
    assert_eq!(ask(&mut l, control::QUERY, 2), [answer(2, Err(HvError::Busy))], "stopping");
    assert_eq!(ask(&mut l, control::COUNTER, 3), [answer(3, Ok(10))], "live counters");
    let held = word(control::HELD, 1, 0);
    assert_eq!(end(&mut l, Ending::Stopped(by), 0), [answer(1, Ok(held))], "not restarted");
    assert_eq!(ask(&mut l, control::COUNTER | 1 << 8, 4), [answer(4, Ok(2))]);
    assert_eq!(
        ask(&mut l, control::START, 5),
        [Effect::Rebirth, Effect::Start { n: 2, cause: Cause::Controller }]
    );
    assert_eq!(l.phase(), Phase::Setup);
    assert_eq!(fx(&mut l, Event::Entering), [answer(5, Ok(word(control::RUNNING, 2, 0)))]);
}

#[test]
fn a_restart_is_answered_when_the_new_incarnation_runs_or_its_setup_fails() {
    let mut l = running(policy(Restart::Never, 0));
    assert_eq!(ask(&mut l, control::START, 1), [answer(1, Err(HvError::Busy))], "it runs");
    assert_eq!(ask(&mut l, control::QUERY, 2), [answer(2, Ok(word(control::RUNNING, 1, 0)))]);
    let by = StopReason::Requested { by: CTL as u16 };
    assert_eq!(ask(&mut l, control::RESTART, 3), [Effect::Stop(by)]);
    assert_eq!(
        end(&mut l, Ending::Stopped(by), 0),
        [Effect::Rebirth, Effect::Start { n: 2, cause: Cause::Controller }]
    );
    let setup = "kernel ELF rejected";
    assert_eq!(
        fx(&mut l, Event::SetupFailed(setup)),
        [answer(3, Ok(word(control::STOPPED, 2, 0)))]
    );
    assert_eq!(l.phase(), Phase::Down);
    assert_eq!(ask(&mut l, control::COUNTER, 4), [answer(4, Ok(0))], "it never ran");
}

#[test]
fn a_restart_with_revokes_unconfirmed_is_refused_once_down() {
    let mut l = running(policy(Restart::Always, 5));
    let by = StopReason::Requested { by: CTL as u16 };
    assert_eq!(ask(&mut l, control::RESTART, 1), [Effect::Stop(by)]);
    assert_eq!(end(&mut l, Ending::Stopped(by), 1), [answer(1, Err(HvError::Busy))]);
    assert_eq!(l.phase(), Phase::Down);
}

#[test]
fn park_then_start_brings_the_core_back_with_a_new_incarnation() {
    let mut l = running(policy(Restart::Never, 0));
    let by = StopReason::Requested { by: CTL as u16 };
    assert_eq!(ask(&mut l, control::PARK, 1), [Effect::Stop(by)]);
    assert_eq!(end(&mut l, Ending::Stopped(by), 0), [Effect::Leave]);
    assert_eq!(l.phase(), Phase::Leaving);
    assert_eq!(ask(&mut l, control::QUERY, 2), [answer(2, Err(HvError::Busy))]);
    let parked = word(control::PARKED, 1, 0);
    assert_eq!(fx(&mut l, Event::Left(true)), [answer(1, Ok(parked))]);
    assert_eq!(ask(&mut l, control::QUERY, 3), [answer(3, Ok(parked))]);
    assert_eq!(ask(&mut l, control::PARK, 4), [answer(4, Ok(parked))]);
    assert_eq!(ask(&mut l, control::START, 5), [Effect::Join { via: CTL }]);
    assert_eq!(fx(&mut l, Event::Joined(false)), [answer(5, Err(HvError::Timeout))]);
    assert_eq!(l.phase(), Phase::Parked);
    assert_eq!(ask(&mut l, control::RESTART, 6), [Effect::Join { via: CTL }]);
    assert_eq!(
        fx(&mut l, Event::Joined(true)),
        [Effect::Rebirth, Effect::Start { n: 2, cause: Cause::Rejoined }]
    );
    assert_eq!(fx(&mut l, Event::Entering), [answer(6, Ok(word(control::RUNNING, 2, 0)))]);
}

#[test]
fn a_core_that_cannot_leave_stays_down_in_the_view() {
    let mut l = running(policy(Restart::Never, 0));
    assert!(end(&mut l, Ending::Exited(0), 0).is_empty());
    assert_eq!(ask(&mut l, control::PARK, 1), [Effect::Leave]);
    assert_eq!(fx(&mut l, Event::Left(false)), [answer(1, Err(HvError::Timeout))]);
    assert_eq!(l.phase(), Phase::Down);
    // Parked with nobody left to start it: down, then gone.
    assert_eq!(ask(&mut l, control::PARK, 2), [Effect::Leave]);
    assert_eq!(fx(&mut l, Event::Left(true)).len(), 1);
    assert!(fx(&mut l, Event::Unattended).is_empty());
    assert_eq!(l.phase(), Phase::Down);
    assert_eq!(fx(&mut l, Event::Unattended), [Effect::Gone]);
}

#[test]
fn only_controllers_are_served_and_bad_operations_are_refused() {
    let mut l = running(policy(Restart::Never, 0));
    let r = Request { from: OTHER, req: 1, op: control::STOP };
    let not = Effect::Answer { to: OTHER, req: 1, answer: Err(HvError::NotOwner) };
    assert_eq!(fx(&mut l, Event::Request(r, [0; 3])), [not]);
    let far = Request { from: 200, req: 1, op: control::STOP };
    assert_eq!(fx(&mut l, Event::Request(far, [0; 3])).len(), 1);
    assert_eq!(ask(&mut l, 99, 2), [answer(2, Err(HvError::BadArgument))]);
    assert_eq!(ask(&mut l, control::COUNTER | 3 << 8, 3), [answer(3, Err(HvError::BadArgument))]);
    assert_eq!(ask(&mut l, control::QUERY | 1 << 8, 4), [answer(4, Err(HvError::BadArgument))]);
    assert_eq!(l.phase(), Phase::Running);
}

#[test]
fn the_run_ending_between_incarnations_ends_it_for_good() {
    let mut l = running(policy(Restart::Always, 5));
    assert_eq!(fx(&mut l, Event::Ended(FAULT)), death());
    let e = Event::Dead { unconfirmed: 0, counters: [0; 3], run_over: true };
    assert!(fx(&mut l, e).is_empty());
    assert_eq!(l.ending(), Some(Ending::Stopped(StopReason::RunEnded)));
    assert!(!l.startable());
    assert_eq!(ask(&mut l, control::START, 1), [answer(1, Err(HvError::Busy))]);
}

#[test]
fn events_out_of_turn_change_nothing() {
    let mut l = running(policy(Restart::Always, 5));
    for e in [
        Event::Entering,
        Event::SetupFailed("x"),
        dead(0),
        Event::Left(true),
        Event::Joined(true),
        Event::Unattended,
    ] {
        assert!(fx(&mut l, e).is_empty(), "{e:?}");
        assert_eq!(l.phase(), Phase::Running);
    }
    assert_eq!(fx(&mut l, Event::Ended(FAULT)).len(), DEATH.len());
    assert!(fx(&mut l, Event::Ended(FAULT)).is_empty(), "one death per incarnation");
    assert_eq!(ask(&mut l, control::STOP, 1), [answer(1, Err(HvError::Busy))], "dying");
}

/// The operations a controller may send, and some it may not.
const OPS: [u64; 9] = [
    control::QUERY,
    control::STOP,
    control::START,
    control::RESTART,
    control::PARK,
    control::COUNTER,
    control::COUNTER | 2 << 8,
    control::COUNTER | 7 << 8,
    0x77,
];

const ENDINGS: [Ending; 6] = [
    Ending::Exited(0),
    Ending::Exited(2),
    Ending::Stopped(StopReason::TripleFault { rip: 1 }),
    Ending::Stopped(StopReason::Watchdog { rip: 1 }),
    Ending::Stopped(StopReason::Isolation("unmap failed")),
    Ending::Stopped(StopReason::Setup("VM entry failed")),
];

/// Drives one lifecycle as the run loop would and checks every promise after every event.
struct Driver {
    l: Lifecycle,
    max: u32,
    /// Requests not answered yet.
    open: BTreeMap<u32, Request>,
    next_req: u32,
    /// The stop the run loop must end the incarnation with.
    stopping: Option<StopReason>,
    policy_starts: u32,
    /// Something was fed after which it must never start again.
    poisoned: bool,
    gone: u32,
}

impl Driver {
    fn new(restart: u8, max: u32) -> Self {
        let p = Policy {
            restart: Restart::from_config(restart),
            max_restarts: max,
            controllers: 0b0110,
        };
        let mut d = Driver {
            l: Lifecycle::new(p),
            max,
            open: BTreeMap::new(),
            next_req: 0,
            stopping: None,
            policy_starts: 0,
            poisoned: false,
            gone: 0,
        };
        let fx = d.l.begin();
        d.check(None, fx);
        d
    }

    fn feed(&mut self, e: Event) {
        let before = self.l.phase();
        match e {
            Event::Request(r, _) => {
                self.open.insert(r.req, r);
            }
            Event::SetupFailed(_) if before == Phase::Setup => self.poisoned = true,
            Event::Ended(Ending::Stopped(
                StopReason::Isolation(_) | StopReason::Setup(_) | StopReason::RunEnded,
            )) if before == Phase::Running => self.poisoned = true,
            Event::Dead { unconfirmed, .. } if before == Phase::Dying && unconfirmed > 0 => {
                self.poisoned = true
            }
            _ => {}
        }
        let fx = self.l.step(e);
        self.check(Some((before, e)), fx);
        if let Event::Dead { run_over: true, .. } = e {
            if self.l.ending() == Some(Ending::Stopped(StopReason::RunEnded)) {
                self.poisoned = true;
            }
        }
    }

    fn check(&mut self, cause: Option<(Phase, Event)>, fx: Effects) {
        let list: Vec<Effect> = fx.iter().collect();
        assert!(list.len() <= Effects::CAP);
        let ended = matches!(cause, Some((Phase::Running, Event::Ended(_))));
        let dies: Vec<Effect> =
            list.iter().copied().filter(|e| matches!(e, Effect::Die(_))).collect();
        if ended {
            assert_eq!(list, death(), "every death: the clean-death steps, in order, only them");
        } else {
            assert!(dies.is_empty(), "death steps only after an ending: {cause:?} {list:?}");
        }
        for (i, e) in list.iter().enumerate() {
            match *e {
                Effect::Answer { to, req, .. } => {
                    let r = self.open.remove(&req).unwrap_or_else(|| {
                        panic!("answer to {req}, not open or answered twice: {cause:?}")
                    });
                    assert_eq!(r.from, to);
                }
                Effect::Start { n, cause: why } => {
                    assert_eq!(i, list.len() - 1, "a start comes last");
                    assert_eq!(n, self.l.incarnation());
                    assert!(!self.poisoned, "started again after {cause:?}");
                    if why != Cause::First {
                        assert_eq!(list.get(i.wrapping_sub(1)), Some(&Effect::Rebirth));
                    }
                    if let Cause::Policy(k) = why {
                        self.policy_starts += 1;
                        assert_eq!(k, self.policy_starts);
                        assert!(k <= self.max, "restarts bounded");
                    }
                    assert_eq!(self.l.phase(), Phase::Setup);
                }
                Effect::Stop(s) => {
                    assert!(self.stopping.is_none());
                    self.stopping = Some(s);
                }
                Effect::Gone => {
                    self.gone += 1;
                    assert_eq!(self.gone, 1);
                    assert_eq!(self.l.phase(), Phase::Gone);
                }
                Effect::Leave => assert_eq!(self.l.phase(), Phase::Leaving),
                Effect::Join { .. } => assert_eq!(self.l.phase(), Phase::Joining),
                Effect::Rebirth | Effect::Die(_) => {}
            }
        }
        assert!(self.l.restarts() <= self.max);
    }

    /// What the run loop does next in this phase (`pick`, `flag` choose among the options).
    fn natural(&mut self, pick: usize, flag: bool) -> Event {
        match self.l.phase() {
            Phase::Setup if flag && pick.is_multiple_of(4) => Event::SetupFailed("x"),
            Phase::Setup => Event::Entering,
            Phase::Running => match self.stopping.take() {
                Some(s) => Event::Ended(Ending::Stopped(s)),
                None => Event::Ended(ENDINGS[pick % ENDINGS.len()]),
            },
            Phase::Dying => Event::Dead {
                unconfirmed: u32::from(flag && pick.is_multiple_of(3)),
                counters: [pick as u64, 1, 2],
                run_over: pick.is_multiple_of(5),
            },
            Phase::Leaving => Event::Left(flag),
            Phase::Joining => Event::Joined(flag),
            Phase::Down | Phase::Parked | Phase::Gone => Event::Unattended,
        }
    }

    fn request(&mut self, from: usize, op: u64) -> Event {
        self.next_req += 1;
        Event::Request(Request { from, req: self.next_req, op }, [5, 6, 7])
    }

    /// Runs the loop to its end: nothing more asked, every wait over as it may end.
    fn finish(&mut self) {
        for k in 0..10_000 {
            if self.l.phase() == Phase::Gone {
                break;
            }
            let e = self.natural(k, true);
            self.feed(e);
        }
        assert_eq!(self.l.phase(), Phase::Gone, "the lifecycle ends");
        assert_eq!(self.gone, 1);
        assert!(self.open.is_empty(), "every request answered: {:?}", self.open);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_events_keep_the_promises(
        restart in 0u8..3,
        max in 0u32..4,
        steps in proptest::collection::vec((0u8..10, 0usize..64, any::<bool>()), 0..80),
    ) {
        let mut d = Driver::new(restart, max);
        for (kind, pick, flag) in steps {
            let e = match kind {
                // A controller (or another core) asks something, at any time.
                0..=3 => d.request(pick % 4, OPS[pick % OPS.len()]),
                // Something the phase does not expect.
                4 => {
                    let ending = ENDINGS[pick % ENDINGS.len()];
                    [
                        Event::Entering,
                        Event::SetupFailed("y"),
                        Event::Ended(ending),
                        Event::Dead { unconfirmed: 0, counters: [0; 3], run_over: flag },
                        Event::Left(flag),
                        Event::Joined(flag),
                        Event::Unattended,
                    ][pick % 7]
                }
                _ => {
                    if d.l.phase() == Phase::Running && d.stopping.is_some() {
                        // The run loop ends a stopped incarnation at once.
                        d.natural(pick, flag)
                    } else if matches!(d.l.phase(), Phase::Down | Phase::Parked) && kind < 8 {
                        // Down and parked wait for requests most of the time.
                        d.request(CTL, OPS[pick % 5])
                    } else {
                        d.natural(pick, flag)
                    }
                }
            };
            // An unexpected ending while stopping stands for the stop itself.
            let e = match (e, d.stopping) {
                (Event::Ended(_), Some(s)) if d.l.phase() == Phase::Running => {
                    d.stopping = None;
                    Event::Ended(Ending::Stopped(s))
                }
                _ => e,
            };
            d.feed(e);
        }
        d.finish();
    }
}
