// SPDX-License-Identifier: MIT OR Apache-2.0
//! Guest control between cores: the controller's half of `guest_control` (send the request
//! to the target's core, wait for its answer under a deadline) and the target's inbox of
//! requests (taken by the target's run loop, which alone touches its guest). Messages:
//! `CONTROL(op)` and its `CONTROL_REPLY(result)`, and `RELEASE`, sent once by a controller's
//! core when its guest is gone for good (its targets no longer wait for it).
//!
//! Flow control: a controller has at most one request outstanding per core (a call while
//! one is unanswered, after a timeout, is `Busy`), and sends `RELEASE` once: with the
//! capability protocol's messages this keeps every inter-core ring within its slots (see
//! `proto::RING_SLOTS`).
//!
//! The host (`crate::hostctl`, the host's control channel) is one more controller with an
//! identity of its own, [`HOST`]: its requests travel as `CONTROL` messages marked
//! [`HOST_MARK`] from the core serving the channel (or straight into this core's inbox when
//! the target's core is that one), wait in the inbox under the sender's core like any
//! request, and are taken as coming from [`HOST`]; their answers go back through
//! [`Wire::host_answer`]. A host request to a core shares the serving core's
//! one-request-per-core budget with its own guest's (`Busy` for whichever comes second), so
//! the rings keep their bound. The host holds a guest it stopped or parked (it waits down
//! for the host's `START`, as for a controller's), and lets go when it starts it again.
//!
//! Owns only this bookkeeping; calls nothing but the [`Wire`] it is handed.

use super::op;
use super::wire::Wire;
use crate::members::MAX_PEERS;
use vmcall_proto::channel::Payload;
use vmcall_proto::hypercall::{control, HvError};

/// The host's identity as a controller: a pseudo-core index (a bit of `Launch::controllers`
/// when host control is on, the `by` of a guest it stopped). Host control needs a machine
/// of at most 63 cores.
pub const HOST: usize = MAX_PEERS - 1;

/// Word 2 of a host's `CONTROL` request, word 3 of the answer to one.
pub const HOST_MARK: u64 = 0x686f_7374_6374_6c21;

/// The control state of one core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Control {
    /// This core's own request: the target core, its number, its deadline.
    out: Option<(u16, u32, u64)>,
    /// The answer to it, once here.
    answer: Option<(u32, Result<u64, HvError>)>,
    seq: u32,
    /// Requests from each controller core, not yet taken by the run loop.
    inbox: [Option<(u32, u64)>; MAX_PEERS],
    /// The cores with a request in `inbox` (so that the run loop's look on every VM exit
    /// costs one test, not a scan).
    waiting: u64,
    /// Controller cores that have released this core's guest ([`HOST`] while the host
    /// does not hold it).
    pub released: u64,
    /// The cores whose `inbox` entry is the host's request (taken as from [`HOST`]).
    host: u64,
    /// The cores a host request from this core is outstanding to (its answer not back).
    pub host_out: u64,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            out: None,
            answer: None,
            seq: 0,
            inbox: [None; MAX_PEERS],
            waiting: 0,
            released: 1 << HOST,
            host: 0,
            host_out: 0,
        }
    }
}

/// Whether `m` is a control message (the capability protocol's are not).
pub fn is_control(m: &Payload) -> bool {
    matches!(m[0] & 0xff, op::CONTROL | op::CONTROL_REPLY | op::RELEASE)
}

fn encode(r: Result<u64, HvError>) -> (u64, u64) {
    match r {
        Ok(v) => (0, v),
        Err(e) => (e.to_rax(), 0),
    }
}

fn decode(status: u64, value: u64) -> Result<u64, HvError> {
    if status == 0 {
        return Ok(value);
    }
    match HvError::from_rax(status) {
        Err(Ok(e)) => Err(e),
        _ => Err(HvError::BadArgument),
    }
}

impl Control {
    /// Takes in a control message from core `from`.
    pub fn deliver(&mut self, from: usize, m: &Payload) {
        let req = (m[0] >> 32) as u32;
        match m[0] & 0xff {
            op::CONTROL if from < MAX_PEERS && m[2] == HOST_MARK => {
                self.host_request(from, req, m[1]);
            }
            op::CONTROL if from < MAX_PEERS => {
                // One outstanding per controller: a second one before the answer is a
                // broken peer; the first stays.
                self.inbox[from].get_or_insert((req, m[1]));
                self.waiting |= 1 << from;
            }
            op::CONTROL_REPLY => {
                if let Some((core, r, _)) = self.out {
                    if core as usize == from && r == req {
                        self.out = None;
                        self.answer = Some((req, decode(m[1], m[2])));
                    }
                }
            }
            op::RELEASE if from < MAX_PEERS => self.released |= 1 << from,
            _ => {}
        }
    }

    /// A host request `req` for `operation`, served by core `from` (this one, when the
    /// channel is served here): it waits in that core's inbox entry (one outstanding per
    /// core, as for any controller), and the host holds or lets go of the guest as it asks.
    pub fn host_request(&mut self, from: usize, req: u32, operation: u64) {
        if from >= MAX_PEERS || self.inbox[from].is_some() {
            return;
        }
        self.inbox[from] = Some((req, operation));
        self.waiting |= 1 << from;
        self.host |= 1 << from;
        match operation {
            control::STOP | control::PARK => self.released &= !(1 << HOST),
            control::START | control::RESTART => self.released |= 1 << HOST,
            _ => {}
        }
    }

    /// The answer to a host request, if `m` is one: (request, result).
    pub fn host_reply(m: &Payload) -> Option<(u32, Result<u64, HvError>)> {
        (m[0] & 0xff == op::CONTROL_REPLY && m[3] == HOST_MARK)
            .then(|| ((m[0] >> 32) as u32, decode(m[1], m[2])))
    }

    /// The answer to host request `req` as a message to the core serving the channel.
    pub fn host_reply_message(req: u32, result: Result<u64, HvError>) -> Payload {
        let (status, value) = encode(result);
        [op::CONTROL_REPLY | (req as u64) << 32, status, value, HOST_MARK, 0, 0, 0]
    }

    /// Sends host request `req` (`operation`) to core `to`: `Busy` while this core has a
    /// request there unanswered (its guest's or the host's), `PeerGone` if the ring refuses.
    pub fn host_send(
        &mut self,
        env: &mut impl Wire,
        to: usize,
        req: u32,
        operation: u64,
    ) -> Result<(), HvError> {
        if !control::valid(operation) || to >= MAX_PEERS {
            return Err(HvError::BadArgument);
        }
        if self.host_out & (1 << to) != 0 || self.out.is_some_and(|(c, _, _)| c as usize == to) {
            return Err(HvError::Busy);
        }
        let m = [op::CONTROL | (req as u64) << 32, operation, HOST_MARK, 0, 0, 0, 0];
        if !env.send(to, &m) {
            return Err(HvError::PeerGone);
        }
        env.kick(to);
        self.host_out |= 1 << to;
        Ok(())
    }

    /// Core `core` was fenced: a request of this core to it is answered `PeerGone` at once,
    /// and it controls this core's guest no more.
    pub fn peer_gone(&mut self, core: usize) {
        if let Some((c, r, _)) = self.out {
            if c as usize == core {
                self.out = None;
                self.answer = Some((r, Err(HvError::PeerGone)));
            }
        }
        if core < MAX_PEERS {
            self.released |= 1 << core;
            self.inbox[core] = None;
            self.waiting &= !(1 << core);
            self.host &= !(1 << core);
            self.host_out &= !(1 << core);
        }
    }

    /// Whether a request for this core's guest waits.
    pub fn pending(&self) -> bool {
        self.waiting != 0
    }

    /// The next request for this core's guest: (controller core, request, operation).
    pub fn take(&mut self) -> Option<(usize, u32, u64)> {
        if self.waiting == 0 {
            return None;
        }
        let from = self.waiting.trailing_zeros() as usize;
        self.waiting &= !(1 << from);
        let (req, operation) = self.inbox[from].take()?;
        if self.host & (1 << from) != 0 {
            self.host &= !(1 << from);
            return Some((HOST, req, operation));
        }
        Some((from, req, operation))
    }

    /// Answers request `req` of core `to` (of the host: [`HOST`]).
    pub fn answer(env: &mut impl Wire, to: usize, req: u32, result: Result<u64, HvError>) {
        if to == HOST {
            env.host_answer(req, result);
            return;
        }
        let (status, value) = encode(result);
        let m = [op::CONTROL_REPLY | (req as u64) << 32, status, value, 0, 0, 0, 0];
        if env.send(to, &m) {
            env.kick(to);
        }
    }

    /// Tells core `to` this core's guest is gone for good: it controls nothing any more.
    pub fn release(env: &mut impl Wire, to: usize) {
        if env.send(to, &[op::RELEASE, 0, 0, 0, 0, 0, 0]) {
            env.kick(to);
        }
    }

    /// Sends `operation` to core `to`; `Busy` while an earlier request there is unanswered.
    pub fn start(
        &mut self,
        env: &mut impl Wire,
        to: u16,
        operation: u64,
        deadline: u64,
    ) -> Result<(), HvError> {
        if !control::valid(operation) {
            return Err(HvError::BadArgument);
        }
        if self.out.is_some() || self.host_out & (1 << to) != 0 {
            return Err(HvError::Busy);
        }
        self.seq = self.seq.wrapping_add(1);
        let m = [op::CONTROL | (self.seq as u64) << 32, operation, 0, 0, 0, 0, 0];
        if !env.send(to as usize, &m) {
            return Err(HvError::PeerGone);
        }
        env.kick(to as usize);
        self.out = Some((to, self.seq, env.now().saturating_add(deadline)));
        self.answer = None;
        Ok(())
    }

    /// The answer to this core's request, `Timeout` past its deadline (the request stays
    /// outstanding: a late answer is taken and dropped), `None` while it is pending.
    pub fn outcome(&mut self, now: u64) -> Option<Result<u64, HvError>> {
        if let Some((_, r)) = self.answer.take() {
            return Some(r);
        }
        match self.out {
            Some((_, _, deadline)) if now > deadline => Some(Err(HvError::Timeout)),
            Some(_) => None,
            None => Some(Err(HvError::Timeout)),
        }
    }
}
