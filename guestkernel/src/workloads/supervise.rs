// SPDX-License-Identifier: MIT OR Apache-2.0
//! `supervisor`: a guest that runs others through its guest-control capabilities (the
//! config's `[[control]]`). For each guest it controls, in slot order: a guest that is
//! `running` is waited for; one the hypervisor `stopped` (a fault, its budget) is
//! restarted, at most `tries` times; one that `exited` is done. With `hold = 1` it first
//! stops its last target while it runs, checks that it is held, starts it again and
//! checks that a second start is refused. With `park = 1` it then takes that target's core
//! out of the machine (`PARK`: the guest stopped, the core out of the membership view),
//! checks it is parked, leaves it out for `parked_ms`, and brings it back with `START` (the
//! core rejoins the view, a new incarnation runs). With `restart = 1` it restarts that target
//! while it runs (a new incarnation must answer). `after_ms` delays these until the target
//! has run that long. Bad requests are refused on the way; it counts its requests and those
//! never answered (`Timeout`), prints both and fails if any was not answered.

use crate::hypercall::{call, check};
use core::sync::atomic::{AtomicU64, Ordering};
use vmcall_proto::guest::BootInfo;
use vmcall_proto::hypercall::{control, HvError, Hypercall};

const CONTROL_CAP: u64 = 3;

/// Requests made, and those that ended `Timeout` (the target's core never answered): the
/// chaos campaign checks every request was answered.
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static UNANSWERED: AtomicU64 = AtomicU64::new(0);

fn ctl(slot: u64, op: u64) -> Result<u64, Result<HvError, i64>> {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
    let r = call(Hypercall::GuestControl, slot, op);
    if r == Err(Ok(HvError::Timeout)) {
        UNANSWERED.fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// (state, incarnation, status) of a state word.
fn fields(w: u64) -> (u8, u64, u64) {
    ((w & 0xff) as u8, (w >> 8) & 0xff_ffff, w >> 32)
}

fn state_name(s: u8) -> &'static str {
    match s {
        control::RUNNING => "running",
        control::EXITED => "exited",
        control::STOPPED => "stopped",
        control::HELD => "held",
        control::PARKED => "parked",
        _ => "?",
    }
}

fn pause_ms(bi: &BootInfo, ms: u64) {
    let t = crate::arch::rdtsc();
    while crate::arch::rdtsc() - t < ms * bi.tsc_per_ms {
        core::hint::spin_loop();
    }
}

/// Waits until the guest of control slot `h` runs: true, or false once it is down without
/// coming back by itself (exited, or stopped by the hypervisor) or a query fails.
fn wait_running(bi: &BootInfo, h: u64) -> bool {
    loop {
        match ctl(h, control::QUERY).map(|w| fields(w).0) {
            Ok(control::RUNNING) => return true,
            Ok(control::EXITED | control::STOPPED) | Err(_) => return false,
            Ok(_) => pause_ms(bi, 1),
        }
    }
}

/// Whether slot `h`'s guest runs, for the operation `what`; logged as skipped if it ended
/// first (a short target may finish before the time the campaign drew).
fn still_running(bi: &BootInfo, h: u64, what: &str) -> bool {
    let running = wait_running(bi, h);
    if !running {
        log::info!("supervisor: slot {h} ended before the {what}: skipped");
    }
    running
}

/// Sends `op` to slot `h`, logs the answer as `verb slot h: ...`; whether the guest is
/// then in state `want`.
fn expect(h: u64, op: u64, verb: &str, want: u8) -> bool {
    let r = ctl(h, op);
    log::info!("supervisor: {verb} slot {h}: {}", Word(r));
    r.is_ok_and(|w| fields(w).0 == want)
}

pub fn supervisor(bi: &BootInfo) -> u64 {
    let tries = bi.arg_int("tries");
    let hold = bi.arg_int("hold") == 1;
    let park = bi.arg_int("park") == 1;
    let restart = bi.arg_int("restart") == 1;
    let mut ok = true;
    let slots: [Option<u64>; 8] = {
        let mut s = [None; 8];
        let found = (0..vmcall_proto::caps::MAX_SLOTS as u64)
            .filter(|&h| call(Hypercall::CapIdentify, h, 0).is_ok_and(|i| i & 0xff == CONTROL_CAP));
        for (d, h) in s.iter_mut().zip(found) {
            *d = Some(h);
        }
        s
    };
    let Some(first) = slots[0] else {
        log::error!("supervisor: no guest-control capability");
        return 1;
    };
    check("supervisor", "an unknown operation", ctl(first, 9), Err(HvError::BadArgument), &mut ok);
    check(
        "supervisor",
        "an unknown counter",
        ctl(first, control::COUNTER | control::counter::COUNT << 8),
        Err(HvError::BadArgument),
        &mut ok,
    );
    check(
        "supervisor",
        "a forged slot",
        ctl(first | 7 << 32, 0),
        Err(HvError::NoSuchSlot),
        &mut ok,
    );
    if let Some(other) = (0..first).find(|&h| call(Hypercall::CapIdentify, h, 0).is_ok()) {
        check(
            "supervisor",
            "control through another cap",
            ctl(other, 0),
            Err(HvError::WrongType),
            &mut ok,
        );
    }
    let last = slots.iter().flatten().last().copied().unwrap_or(first);
    let after_ms = bi.arg_int("after_ms");
    if after_ms > 0 && (hold || restart || park) && wait_running(bi, last) {
        pause_ms(bi, after_ms);
    }
    if hold && still_running(bi, last, "stop") {
        // It runs: hold it.
        ok &= expect(last, control::STOP, "stop", control::HELD);
        ok &= expect(last, control::QUERY, "query", control::HELD);
        ok &= expect(last, control::START, "start", control::RUNNING);
        check(
            "supervisor",
            "start it again",
            ctl(last, control::START),
            Err(HvError::Busy),
            &mut ok,
        );
    }
    if restart && still_running(bi, last, "restart") {
        let before = ctl(last, control::QUERY).map(|w| fields(w).1).unwrap_or(0);
        let r = ctl(last, control::RESTART);
        log::info!("supervisor: restart slot {last}: {}", Word(r));
        // A new incarnation (the one that answered), unless the guest ended first.
        ok &= match r {
            Ok(w) => fields(w).0 == control::RUNNING && fields(w).1 > before,
            Err(Ok(HvError::Busy)) => false,
            Err(_) => false,
        };
    }
    if park && still_running(bi, last, "park") {
        ok &= expect(last, control::PARK, "park", control::PARKED);
        ok &= expect(last, control::QUERY, "query", control::PARKED);
        pause_ms(bi, bi.arg_int("parked_ms").max(1));
        ok &= expect(last, control::START, "start", control::RUNNING);
    }
    for h in slots.into_iter().flatten() {
        let mut restarts = 0;
        loop {
            let w = match ctl(h, control::QUERY) {
                Ok(w) => w,
                Err(e) => {
                    log::error!("supervisor: query slot {h}: {e:?}");
                    ok = false;
                    break;
                }
            };
            let (state, n, status) = fields(w);
            match state {
                control::RUNNING => pause_ms(bi, 1),
                control::STOPPED if restarts < tries => {
                    restarts += 1;
                    let r = ctl(h, control::RESTART);
                    log::info!(
                        "supervisor: slot {h} stopped in incarnation {n}: restart: {}",
                        Word(r)
                    );
                }
                _ => {
                    log::info!(
                        "supervisor: slot {h} {} (status {status}) in incarnation {n} after {restarts} restarts",
                        state_name(state)
                    );
                    // Its last incarnation's counters, read from the target's core.
                    let count = |k: u64| ctl(h, control::COUNTER | k << 8);
                    let (exits, calls) =
                        (count(control::counter::EXITS), count(control::counter::HYPERCALLS));
                    log::info!(
                        "supervisor: slot {h} counters: exits {exits:?}, hypercalls {calls:?}"
                    );
                    ok &= exits.is_ok_and(|e| e > 0) && calls.is_ok_and(|c| c > 0);
                    ok &= state == control::EXITED && status == 0;
                    break;
                }
            }
        }
    }
    let (requests, unanswered) =
        (REQUESTS.load(Ordering::Relaxed), UNANSWERED.load(Ordering::Relaxed));
    log::info!("supervisor: {requests} requests, {unanswered} unanswered");
    if ok && unanswered == 0 {
        0
    } else {
        1
    }
}

struct Word(Result<u64, Result<HvError, i64>>);
impl core::fmt::Display for Word {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Ok(w) => {
                let (s, n, st) = fields(w);
                write!(f, "{} in incarnation {n} (status {st})", state_name(s))
            }
            Err(e) => write!(f, "{e:?}"),
        }
    }
}
