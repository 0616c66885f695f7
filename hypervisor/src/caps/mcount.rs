// SPDX-License-Identifier: MIT OR Apache-2.0
//! Membership's traffic through this core, counted at its transport: [`Counted`] is the
//! [`members::Net`] the capability system hands the membership protocol, and every message
//! the protocol sends or handles passes through its [`members::Net::count`] with the view
//! number installed here at that moment.
//!
//! **Per view change** ([`ViewLog`]): a view-change message (`WISH`, `WISH_ACK`, `PREPARE`,
//! `PROMISE`, `ACCEPT`, `ACCEPTED`, `NACK`, `COMMIT`, `CATCHUP`) sent or handled while view
//! `n` is installed counts for the change to view `n + 1`: the one this core is working
//! towards (a coordinator's `COMMIT`s leave before it installs; a member installs on the
//! `COMMIT` it handles; what either sends afterwards is for the next change). A change's
//! record is complete once its view is installed here, and the run loop prints it then (a
//! `vchange` record). The coordinator's rounds are the ballots of the `PREPARE`, `ACCEPT`
//! and `COMMIT` messages it sent for the change (a retry above a `NACK` is a new ballot; a
//! view of one member, which sends nothing, counts none). The exits are those of the guest
//! after which the run loop's serve counted a message of the change (the kick, the timer
//! or the exit that brought the work).
//!
//! **Detector** ([`ProbeCounts`], per run, in the guest's [`super::Stats`]): `PING` and
//! `PONG`, sent and received, and the exits after which the serve counted one. `END`
//! (the run's end) is counted nowhere.
//!
//! Bounded: [`VIEW_RECORDS`] changes open at once (the one worked towards, and the ones a
//! core skipped by installing a later view directly); with every record open, a message
//! of another change is counted only in [`ViewLog::unattributed`] (reported with the
//! guest). No allocation.
//!
//! May call: `members` (the transport trait, the message kinds), [`super::env`] (the
//! environment it wraps), `vmcall_proto` (the message type).

use super::env::Env;
use crate::members::{self, op};
use vmcall_proto::channel::Payload;

/// View changes with a record open at once.
pub const VIEW_RECORDS: usize = 8;

/// View-change message kinds counted, in the order of [`KIND_NAMES`].
pub const KINDS: usize = 9;

/// The kinds' names, as records print them.
pub const KIND_NAMES: [&str; KINDS] =
    ["wish", "wish_ack", "prepare", "promise", "accept", "accepted", "nack", "commit", "catchup"];

/// The index in [`KIND_NAMES`] of a view-change message kind.
fn kind_index(kind: u64) -> Option<usize> {
    match kind {
        op::WISH..=op::COMMIT => Some((kind - op::WISH) as usize),
        op::CATCHUP => Some(KINDS - 1),
        _ => None,
    }
}

/// One view change as this core took part in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ViewCounts {
    /// The view the change installs (0: a free record).
    pub num: u32,
    /// Messages sent, by kind ([`KIND_NAMES`]).
    pub sent: [u32; KINDS],
    /// Messages received and handled, by kind.
    pub received: [u32; KINDS],
    /// Ballots this core tried as the change's coordinator.
    pub rounds: u32,
    /// Guest exits after which the serve counted a message of this change.
    pub exits: u32,
    /// TSC of the first and of the last message counted.
    pub first: u64,
    pub last: u64,
    /// The ballot of the last `PREPARE`, `ACCEPT` or `COMMIT` sent.
    ballot: u64,
}

impl ViewCounts {
    /// Messages sent, all kinds.
    #[cfg(test)]
    pub fn sent_total(&self) -> u32 {
        self.sent.iter().sum()
    }

    /// Messages received, all kinds.
    #[cfg(test)]
    pub fn received_total(&self) -> u32 {
        self.received.iter().sum()
    }
}

/// `kind:count` words of a per-kind array, zeros left out (the records' `sent` and
/// `received`).
pub struct Kinds<'a>(pub &'a [u32; KINDS]);

impl core::fmt::Display for Kinds<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut first = true;
        for (name, n) in KIND_NAMES.iter().zip(self.0.iter()).filter(|(_, n)| **n > 0) {
            write!(f, "{}{name}:{n}", if first { "" } else { " " })?;
            first = false;
        }
        Ok(())
    }
}

/// The failure detector's traffic through this core over the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ProbeCounts {
    pub pings_sent: u32,
    pub pings_received: u32,
    pub pongs_sent: u32,
    pub pongs_received: u32,
    /// Guest exits after which the serve counted a probe or an answer.
    pub exits: u32,
    /// View-change messages no record had room for ([`VIEW_RECORDS`] changes open).
    pub unattributed: u32,
    touched: bool,
}

/// This core's open view-change records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ViewLog {
    open: [ViewCounts; VIEW_RECORDS],
    /// Bit `i`: `open[i]` counted a message since the run loop last looked
    /// ([`ViewLog::exit_served`]); one store to clear on every serve.
    touched: u8,
}

const _: () = assert!(VIEW_RECORDS <= 8, "one bit each in `touched`");

impl ViewLog {
    /// Counts message `m`, sent or received at `now` while view `view` was installed.
    fn count(&mut self, probes: &mut ProbeCounts, view: u32, sent: bool, m: &Payload, now: u64) {
        let kind = m[0] & 0xff;
        match (kind, sent) {
            (op::PING, true) => probes.pings_sent += 1,
            (op::PING, false) => probes.pings_received += 1,
            (op::PONG, true) => probes.pongs_sent += 1,
            (op::PONG, false) => probes.pongs_received += 1,
            _ => {}
        }
        if matches!(kind, op::PING | op::PONG) {
            probes.touched = true;
            return;
        }
        let Some(k) = kind_index(kind) else { return };
        let key = view.saturating_add(1);
        let Some(at) = self.record(key) else {
            probes.unattributed = probes.unattributed.saturating_add(1);
            return;
        };
        self.touched |= 1 << at;
        let r = &mut self.open[at];
        if sent {
            r.sent[k] = r.sent[k].saturating_add(1);
            if matches!(kind, op::PREPARE | op::ACCEPT | op::COMMIT) && m[1] != r.ballot {
                r.ballot = m[1];
                r.rounds = r.rounds.saturating_add(1);
            }
        } else {
            r.received[k] = r.received[k].saturating_add(1);
        }
        if r.first == 0 {
            r.first = now;
        }
        r.last = now;
    }

    /// Where the open record of the change to view `num` is, opened if there is room.
    fn record(&mut self, num: u32) -> Option<usize> {
        match self.open.iter().position(|r| r.num == num) {
            Some(i) => Some(i),
            None => {
                let i = self.open.iter().position(|r| r.num == 0)?;
                self.open[i] = ViewCounts { num, ..ViewCounts::default() };
                Some(i)
            }
        }
    }

    /// Forgets which records were counted into (before a serve of the run loop): two
    /// stores.
    #[inline]
    pub fn untouch(&mut self, probes: &mut ProbeCounts) {
        probes.touched = false;
        self.touched = 0;
    }

    /// After a serve that followed a guest exit: every change (and the detector) that
    /// counted a message in it counts the exit. Two loads when none did.
    #[inline]
    pub fn exit_served(&mut self, probes: &mut ProbeCounts) {
        if core::mem::take(&mut probes.touched) {
            probes.exits = probes.exits.saturating_add(1);
        }
        let mut t = core::mem::take(&mut self.touched);
        while t != 0 {
            let r = &mut self.open[t.trailing_zeros() as usize];
            t &= t - 1;
            r.exits = r.exits.saturating_add(1);
        }
    }

    /// The oldest open record of a change to view `num` or earlier, taken (the record is
    /// free again): after view `num` was installed here, called until `None`.
    pub fn take_upto(&mut self, num: u32) -> Option<ViewCounts> {
        let at = (0..VIEW_RECORDS)
            .filter(|&i| self.open[i].num != 0 && self.open[i].num <= num)
            .min_by_key(|&i| self.open[i].num)?;
        self.touched &= !(1 << at);
        Some(core::mem::take(&mut self.open[at]))
    }

    /// The oldest open record, taken (at the run's end: changes not installed here).
    pub fn take_any(&mut self) -> Option<ViewCounts> {
        self.take_upto(u32::MAX)
    }
}

/// The environment as membership's transport, counting what passes.
pub struct Counted<'a, E> {
    pub env: &'a mut E,
    pub log: &'a mut ViewLog,
    pub probes: &'a mut ProbeCounts,
}

impl<E: Env> members::Net for Counted<'_, E> {
    fn now(&mut self) -> u64 {
        self.env.now()
    }
    fn send(&mut self, to: usize, m: &Payload) -> bool {
        self.env.send(to, m)
    }
    fn kick(&mut self, to: usize) {
        self.env.kick(to)
    }
    fn count(&mut self, view: u32, sent: bool, m: &Payload) {
        let now = self.env.now();
        self.log.count(self.probes, view, sent, m, now);
    }
}
