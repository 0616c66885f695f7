// SPDX-License-Identifier: MIT OR Apache-2.0
//! When a channel end looks at its link: the guest library's policy for the link word
//! (`guest::StatusPage`, `epoch << 1 | up`), kept off the message path, in one place that
//! the guest's `channel::Chan` runs and the host bench (`bench channels`) measures.
//!
//! * A **send** looks first (one load, one compare with the last word seen up in this
//!   side's epoch): a send to a peer known gone fails with `PeerGone` (or `Reset` once its
//!   new incarnation is up) and writes nothing.
//! * A **receive** looks only when it finds nothing (or an error), and then only every
//!   [`LOOK_EVERY`]-th time in a row (or at once, [`LinkWatch::try_recv_now`], before the
//!   caller sleeps): a message whose control
//!   word carries this side's epoch tag and sequence was written by the peer in this epoch
//!   (the hypervisor only ever zeroes a ring, a new incarnation writes another tag, and a
//!   dead one writes nothing), so it is delivered whatever the link says now, like data
//!   before a socket's end of stream; once the ring is empty the receive reports the death
//!   (`PeerGone`) or the new epoch (`Reset`: the rings were zeroed before the link word
//!   said so, so a reset ring reads empty first).
//!
//! So no death goes unnoticed: a receiver that polls looks within [`LOOK_EVERY`] empty
//! polls, one about to sleep looks right before (and the hypervisor rings a sleeper's
//! doorbell when its link changes), a sender looks at every send. The same cadence bounds
//! how long a corrupt control word reads as "nothing yet" before it is reported. Every message has one fate: taken by the peer in this epoch, or counted
//! lost when the rings are reset (the ring counters the hypervisor reads then), or, for a
//! send that passed its look just before this side's core took the link down, written late
//! and read by nobody (the epoch tags keep it out of the next epoch; a window of one send
//! per death, as before this policy).
//!
//! Owns the policy only (no shared state of its own).
//! May call: [`crate::channel`] (the ring's ends) and [`crate::guest`] (link-word decoding).

use crate::channel::{ChannelError, Payload, Receiver, Sender};
use crate::guest::{link_epoch, link_up};
#[cfg(not(loom))]
use core::sync::atomic::{AtomicU64, Ordering};
#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};

/// A receive that finds nothing looks at the next slot's word again (empty or corrupt?) and
/// at the link only every this many times in a row: an empty poll is then one load and one
/// compare, as a bare ring's, and a death or a corrupt word is reported within this many
/// polls.
pub const LOOK_EVERY: u32 = 16;

/// How often the library's receiver publishes its count: after every message it takes (one
/// store of the control word it just accepted, which is the count with the epoch tag). The
/// count is then exact at every moment, which the hypervisor's accounting of messages lost
/// at a reset relies on (a message the dead incarnation took is not lost), at the cost of
/// one store into a line the sender reads only when its own count says the ring is full.
/// The guest's `Chan` and the host bench's library row both take it from here.
pub const fn ack_every(_slots: u32) -> u32 {
    1
}

/// What a channel end knows of its link: the word (read-only to the guest, written by the
/// hypervisor while the guest does not run), and the last value seen up in this epoch.
pub struct LinkWatch<'a> {
    word: &'a AtomicU64,
    /// The word this side's epoch began with (up, `epoch`); any other value is news.
    seen: u64,
    /// The epoch this side's sender and receiver are in.
    epoch: u32,
    /// Empty polls left before the next full look ([`LOOK_EVERY`]).
    quiet: u32,
}

/// How a call with a deadline ended ([`LinkWatch::call_until`]), when not with an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallEnd {
    /// The reply came and is in the caller's buffer.
    Replied,
    /// The deadline passed before the request could go (the ring stayed full, or an
    /// earlier call given up did not settle): nothing was sent.
    NotSent,
    /// The request went, the reply did not come in time: the call is given up (its reply,
    /// if it comes, is discarded).
    GivenUp,
}

/// What [`LinkWatch::look`] compares the link word with: the word itself if it says up
/// (then equal means up, in this epoch), else a value no link word has (`epoch << 1 | up`
/// with a 32-bit epoch), so that every look decodes the word until the link is up.
const fn fast_word(w: u64) -> u64 {
    if link_up(w) {
        w
    } else {
        u64::MAX
    }
}

impl<'a> LinkWatch<'a> {
    /// A watch on `word`, starting in the epoch the word says now.
    pub fn new(word: &'a AtomicU64) -> Self {
        let w = word.load(Ordering::Relaxed);
        LinkWatch { word, seen: fast_word(w), epoch: link_epoch(w), quiet: 1 }
    }

    /// The epoch this side is in.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The link word now (relaxed: the guest's status page is read-only memory, and a
    /// relaxed atomic load of a word is a plain load there).
    #[inline(always)]
    pub fn word(&self) -> u64 {
        self.word.load(Ordering::Relaxed)
    }

    /// `PeerGone` or `Reset` if the link word `w` says so.
    fn check(&self, w: u64) -> Result<(), ChannelError> {
        if !link_up(w) {
            Err(ChannelError::PeerGone)
        } else if link_epoch(w) != self.epoch {
            Err(ChannelError::Reset)
        } else {
            Ok(())
        }
    }

    /// The link as it is now: `Ok` if the peer is up in this side's epoch.
    pub fn link(&self) -> Result<(), ChannelError> {
        self.check(self.word())
    }

    /// One load and one compare; another word is decoded apart.
    #[inline(always)]
    pub fn look(&mut self) -> Result<(), ChannelError> {
        let w = self.word();
        if w == self.seen {
            return Ok(());
        }
        self.news(w)
    }

    #[cold]
    #[inline(never)]
    fn news(&mut self, w: u64) -> Result<(), ChannelError> {
        self.check(w)?;
        self.seen = w;
        Ok(())
    }

    /// Starts over in the epoch the word says now (after `Reset`): `PeerGone` while the
    /// peer is down; else the epoch, for new sender and receiver ends.
    pub fn resync(&mut self) -> Result<u32, ChannelError> {
        let w = self.word();
        if !link_up(w) {
            return Err(ChannelError::PeerGone);
        }
        self.epoch = link_epoch(w);
        self.seen = fast_word(w);
        Ok(self.epoch)
    }

    /// Sends on `tx` if the link is up in this epoch (see the module's policy).
    #[inline(always)]
    pub fn try_send(&mut self, tx: &mut Sender<'_>, m: &Payload) -> Result<(), ChannelError> {
        self.look()?;
        match tx.try_send(m) {
            Ok(()) => Ok(()),
            Err(e) => self.after(e),
        }
    }

    /// Receives from `rx`: a message is delivered without a look; a receive that finds
    /// nothing classifies the slot and looks at the link every [`LOOK_EVERY`]-th time in a
    /// row (else `Ok(None)` at once); an error or a change of the link is the news.
    #[inline(always)]
    pub fn try_recv(&mut self, rx: &mut Receiver<'_>) -> Result<Option<Payload>, ChannelError> {
        match rx.take() {
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(e)) => self.after(e),
            None => {
                self.quiet -= 1;
                if self.quiet != 0 {
                    return Ok(None);
                }
                self.idle(rx)
            }
        }
    }

    /// [`LinkWatch::try_recv`] with the full look whenever it finds nothing: what a
    /// receiver does right before it sleeps.
    #[inline]
    pub fn try_recv_now(&mut self, rx: &mut Receiver<'_>) -> Result<Option<Payload>, ChannelError> {
        match rx.take() {
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(e)) => self.after(e),
            None => self.idle(rx),
        }
    }

    /// Receives from `rx`, waiting as long as it takes: the blocking receive of the library
    /// (`Chan::recv` in the guest, the host bench's library row). The wait is
    /// [`Receiver::poll`], one load and one compare per poll with `pause` between polls, and
    /// after every [`LOOK_EVERY`] empty polls in a row the full look (the slot's word, the
    /// link), as [`LinkWatch::try_recv`] polled that often would do; the message is taken as
    /// there ([`Receiver::take`]: the acquire load, the copy and the re-read).
    #[inline(always)]
    pub fn recv(
        &mut self,
        rx: &mut Receiver<'_>,
        pause: impl FnMut(),
    ) -> Result<Payload, ChannelError> {
        let mut m = [0; crate::channel::WORDS];
        self.recv_into(rx, &mut m, pause)?;
        Ok(m)
    }

    /// [`LinkWatch::recv`] into the caller's buffer: the message is copied once, from its
    /// slot into `out` ([`Receiver::poll_take`]: the poll's acquire load is the take's first,
    /// the copy is re-checked as always). On an
    /// error `out` holds whatever was read and nothing was taken.
    #[inline(always)]
    pub fn recv_into(
        &mut self,
        rx: &mut Receiver<'_>,
        out: &mut Payload,
        mut pause: impl FnMut(),
    ) -> Result<(), ChannelError> {
        loop {
            if let Some(r) = rx.poll_take(LOOK_EVERY, out, &mut pause) {
                return match r {
                    Ok(()) => Ok(()),
                    Err(e) => self.after(e),
                };
            }
            if let Err(e) = self.idle_look(rx) {
                // As in `idle`: what the peer wrote before the link changed comes first.
                return match rx.poll_take(1, out, &mut pause) {
                    Some(Ok(())) => Ok(()),
                    _ => Err(e),
                };
            }
            pause();
        }
    }

    /// One request/reply turn (the client's side of a remote call): sends `req` on `tx` as
    /// a call ([`Sender::try_call`]: the control word says [`crate::channel::CALL`];
    /// spinning with `pause` while the ring is full, as a blocking send does), runs `sent`
    /// (the guest's notification of a sleeping peer), then waits for the reply in the
    /// request's own slot ([`Sender::poll_reply`], the reply counted in `rx`'s consumer
    /// line) and copies it into `reply`. The peer's side writes it there: its next message
    /// after taking the request, however it takes and answers it ([`LinkWatch::serve`], or a
    /// receive and a send). Nothing is checked or skipped that a send and a receive do not
    /// check: the link look before the send, the reply's word (this request's tag and
    /// sequence with the reply flag, nothing else), the re-read after the copy, a look
    /// every [`LOOK_EVERY`] empty polls (the slot's word classified: the request still
    /// unanswered, or corruption; and the link). Messages the peer sent on `rx` before
    /// answering stay there for the next receive.
    ///
    /// One function for the whole turn, so the compiler keeps the hot state (the slot
    /// pointer, the control words) in registers from the send through the wait to the
    /// copy. One cache line moves per round trip, twice: the request's slot, to the peer
    /// and back (see docs/channels.md, "Which lines a round trip moves").
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn call(
        &mut self,
        tx: &mut Sender<'_>,
        rx: &mut Receiver<'_>,
        req: &Payload,
        reply: &mut Payload,
        sent: impl FnOnce(&Sender<'_>),
        pause: impl FnMut(),
    ) -> Result<(), ChannelError> {
        match self.call_until(tx, rx, req, reply, sent, pause, || false) {
            Ok(CallEnd::Replied) => Ok(()),
            // `expired` never says so: the turn ends only with the reply or an error.
            Ok(CallEnd::NotSent | CallEnd::GivenUp) => unreachable!(),
            Err(e) => Err(e),
        }
    }

    /// [`LinkWatch::call`] with a way out: `expired` is asked before every retry of a full
    /// ring and every [`LOOK_EVERY`] empty polls for the reply; once it says so the turn
    /// ends: [`CallEnd::NotSent`] (the ring stayed full, or a call given up earlier did not
    /// settle in time) or [`CallEnd::GivenUp`] (sent, and given up:
    /// [`Sender::give_up_call`]: its reply, if it comes, is discarded, and its slot is not
    /// written again until then, or until the peer has taken a later message).
    /// [`CallEnd::Replied`]: the reply is in `reply`. A call given up earlier is settled
    /// first (waiting for that, as long as `expired` allows: its slot may be needed, and
    /// there is one call at a time: [`Sender::try_call`] is `Full` until then).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn call_until(
        &mut self,
        tx: &mut Sender<'_>,
        rx: &mut Receiver<'_>,
        req: &Payload,
        reply: &mut Payload,
        sent: impl FnOnce(&Sender<'_>),
        mut pause: impl FnMut(),
        mut expired: impl FnMut() -> bool,
    ) -> Result<CallEnd, ChannelError> {
        loop {
            self.look()?;
            match tx.try_call(req) {
                Ok(()) => break,
                Err(ChannelError::Full) => {
                    // A call given up and not settled holds the sender (`try_call` is
                    // `Full`): settled now, the call goes at once.
                    if tx.call_held() && self.settled(tx, rx)? {
                        continue;
                    }
                    if expired() {
                        return Ok(CallEnd::NotSent);
                    }
                    pause()
                }
                Err(e) => return self.after(e),
            }
        }
        sent(tx);
        loop {
            if let Some(r) = tx.poll_reply(rx, LOOK_EVERY, reply, &mut pause) {
                return match r {
                    Ok(()) => Ok(CallEnd::Replied),
                    Err(e) => self.after(e),
                };
            }
            self.quiet = LOOK_EVERY;
            match tx.not_replied() {
                Ok(()) => self.look()?,
                Err(e) => return self.after(e),
            }
            if expired() {
                tx.give_up_call();
                return Ok(CallEnd::GivenUp);
            }
            pause();
        }
    }

    /// Settles the call given up on `tx` if it can be ([`Sender::settle_call`]): whether
    /// it was; errors as the settle's.
    #[cold]
    #[inline(never)]
    fn settled(
        &mut self,
        tx: &mut Sender<'_>,
        rx: &mut Receiver<'_>,
    ) -> Result<bool, ChannelError> {
        match tx.settle_call(rx) {
            Ok(settled) => Ok(settled),
            Err(e) => self.after(e),
        }
    }

    /// This side's next message on the channel: the reply to the call it took last, if it
    /// owes one ([`Receiver::owes`]: written into the call's slot, [`Receiver::reply`]),
    /// else a send on `tx` ([`LinkWatch::try_send`]). Either after the link look. Returns
    /// whether it was a reply (then there is nothing to notify: the caller polls).
    #[inline(always)]
    pub fn try_send_or_reply(
        &mut self,
        tx: &mut Sender<'_>,
        rx: &mut Receiver<'_>,
        m: &Payload,
    ) -> Result<bool, ChannelError> {
        if rx.owes() {
            self.look()?;
            rx.reply(tx, m);
            return Ok(true);
        }
        self.try_send(tx, m).map(|()| false)
    }

    /// A send that found the ring full: if a call given up holds a slot
    /// ([`Sender::call_held`]), settles that call if it can, without waiting
    /// ([`Sender::settle_call`]), so the send can go next time; errors as the settle's. The
    /// cold path of a blocking send (the hot path does not look: a call given up holds its
    /// slot only through the `Full` it causes).
    #[cold]
    #[inline(never)]
    pub fn after_full(
        &mut self,
        tx: &mut Sender<'_>,
        rx: &mut Receiver<'_>,
    ) -> Result<(), ChannelError> {
        if tx.call_held() {
            if let Err(e) = tx.settle_call(rx) {
                return self.after(e);
            }
        }
        Ok(())
    }

    /// The server's side of [`LinkWatch::call`]: waits for a request on `rx` (as
    /// [`LinkWatch::recv_into`], into a buffer of its own), hands it to `handle`, and
    /// answers with the reply `handle` returns (`ControlFlow::Continue`): into the
    /// request's slot if it was a call ([`LinkWatch::try_send_or_reply`]), else sent on
    /// `tx` (spinning while the ring is full, then `sent`, the guest's notification); and
    /// waits for the next; until `handle` says `Break(b)` (then nothing is sent for that
    /// request, and `Ok(b)`; a server that answers its last request sends that answer
    /// itself, with a send, which replies into the slot as here) or an error. Every check
    /// of a receive and a send is made, as in `call`; the loop keeps both ends' state in
    /// registers from one request to the next.
    #[inline(always)]
    pub fn serve<B>(
        &mut self,
        tx: &mut Sender<'_>,
        rx: &mut Receiver<'_>,
        mut handle: impl FnMut(&Payload) -> core::ops::ControlFlow<B, Payload>,
        mut sent: impl FnMut(&Sender<'_>),
        mut pause: impl FnMut(),
    ) -> Result<B, ChannelError> {
        let mut req = [0; crate::channel::WORDS];
        loop {
            self.recv_into(rx, &mut req, &mut pause)?;
            let reply = match handle(&req) {
                core::ops::ControlFlow::Continue(reply) => reply,
                core::ops::ControlFlow::Break(b) => return Ok(b),
            };
            if rx.owes() {
                self.look()?;
                rx.reply(tx, &reply);
            } else {
                self.send_spin(tx, rx, &reply, &mut pause)?;
                sent(tx);
            }
        }
    }

    /// Sends on `tx` as [`LinkWatch::try_send`], running `pause` while the ring is full
    /// (and trying to settle a call given up that holds a slot: [`Sender::settle_call`]).
    #[inline(always)]
    fn send_spin(
        &mut self,
        tx: &mut Sender<'_>,
        rx: &mut Receiver<'_>,
        m: &Payload,
        mut pause: impl FnMut(),
    ) -> Result<(), ChannelError> {
        loop {
            match self.try_send(tx, m) {
                Ok(()) => return Ok(()),
                Err(ChannelError::Full) => {
                    self.after_full(tx, rx)?;
                    pause()
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives from `rx` if a message comes within `polls` polls (at least one; `pause`
    /// between them), with the full look after the last empty one: `Ok(None)` then. At
    /// most [`LOOK_EVERY`] polls pass without a look.
    #[inline(always)]
    pub fn recv_within(
        &mut self,
        rx: &mut Receiver<'_>,
        polls: u32,
        mut pause: impl FnMut(),
    ) -> Result<Option<Payload>, ChannelError> {
        let mut left = polls.max(1);
        loop {
            let n = left.min(LOOK_EVERY);
            if rx.poll(n, &mut pause) {
                match rx.take() {
                    Some(Ok(m)) => return Ok(Some(m)),
                    Some(Err(e)) => return self.after(e),
                    // Changed between the poll and the take (only a peer writing what it
                    // should not does that): classified below.
                    None => {}
                }
            }
            self.idle_look(rx)?;
            left -= n;
            if left == 0 {
                return Ok(None);
            }
            pause();
        }
    }

    /// Nothing in the ring: the slot's word (empty or corrupt) and the link.
    #[inline(always)]
    fn idle(&mut self, rx: &mut Receiver<'_>) -> Result<Option<Payload>, ChannelError> {
        match self.idle_look(rx) {
            Ok(()) => Ok(None),
            // The link changed after the ring was found empty: a message the peer wrote
            // before it (the hypervisor marks the link only after the peer's last write)
            // is taken first, and the change is reported at the next call.
            Err(e) => match rx.take() {
                Some(Ok(m)) => Ok(Some(m)),
                _ => Err(e),
            },
        }
    }

    #[inline(never)]
    fn idle_look(&mut self, rx: &mut Receiver<'_>) -> Result<(), ChannelError> {
        self.quiet = LOOK_EVERY;
        match rx.not_next() {
            Ok(()) => self.look(),
            Err(e) => self.after(e),
        }
    }

    /// An error from the ring: the link's change if there is one, else the error.
    #[cold]
    #[inline(never)]
    fn after<T>(&mut self, e: ChannelError) -> Result<T, ChannelError> {
        self.look()?;
        Err(e)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::channel::OwnedRing;
    use crate::guest::link_word;

    fn msg(n: u64) -> Payload {
        [n; crate::channel::WORDS]
    }

    /// `pause` with a bound: a wait that never ends fails the test instead of hanging it.
    fn bounded(mut pause: impl FnMut()) -> impl FnMut() {
        let mut left = 1_000_000u32;
        move || {
            left = left.checked_sub(1).expect("the wait never ended");
            pause()
        }
    }

    #[test]
    fn a_dead_peers_messages_come_before_peer_gone_and_sends_fail_at_once() {
        let st = Box::new(OwnedRing::new());
        let word = AtomicU64::new(link_word(true, 0));
        let mut w = LinkWatch::new(&word);
        let (mut tx, mut rx) = (Sender::new(st.ring(8)), Receiver::new(st.ring(8), 2));
        for i in 0..3 {
            w.try_send(&mut tx, &msg(i)).unwrap();
        }
        word.store(link_word(false, 0), Ordering::Relaxed);
        assert_eq!(w.try_send(&mut tx, &msg(9)), Err(ChannelError::PeerGone), "no write");
        assert_eq!(tx.sent(), 3);
        for i in 0..3 {
            assert_eq!(w.try_recv(&mut rx), Ok(Some(msg(i))), "drained first");
        }
        assert_eq!(w.try_recv_now(&mut rx), Err(ChannelError::PeerGone));
        assert_eq!(st.ring(8).received(), 3, "the empty look published the count");
        // The new incarnation: the rings are zeroed, then the word says the next epoch.
        let st2 = Box::new(OwnedRing::new());
        let mut rx = Receiver::new(st2.ring(8), 2);
        word.store(link_word(true, 1), Ordering::Relaxed);
        // A polling receiver notices within LOOK_EVERY polls.
        let polls = (1..=LOOK_EVERY).find(|_| w.try_recv(&mut rx).is_err());
        assert!(polls.is_some_and(|p| p <= LOOK_EVERY), "{polls:?}");
        assert_eq!(w.try_recv_now(&mut rx), Err(ChannelError::Reset));
        assert_eq!(w.try_send(&mut tx, &msg(9)), Err(ChannelError::Reset));
        assert_eq!(w.resync(), Ok(1));
        let (mut tx, mut rx) =
            (Sender::with_epoch(st2.ring(8), 1), Receiver::with_epoch(st2.ring(8), 2, 1));
        w.try_send(&mut tx, &msg(5)).unwrap();
        assert_eq!(w.try_recv(&mut rx), Ok(Some(msg(5))));
        assert_eq!(w.try_recv_now(&mut rx), Ok(None));
    }

    /// The race the look after an empty poll meets: the peer's last message and its death
    /// both land between the receiver's empty take and its look. The message comes first
    /// (seen on Bochs: the giver of `configs/transfer.toml` lost a holder's confirmation,
    /// its receive answering `PeerGone` with the message in the ring).
    #[test]
    fn a_message_that_lands_with_the_peers_death_between_poll_and_look_comes_first() {
        let st = Box::new(OwnedRing::new());
        let word = AtomicU64::new(link_word(true, 0));
        let mut w = LinkWatch::new(&word);
        let (mut tx, mut rx) = (Sender::new(st.ring(8)), Receiver::new(st.ring(8), 2));
        assert!(rx.take().is_none(), "the receiver finds the ring empty");
        w.try_send(&mut tx, &msg(4)).unwrap();
        word.store(link_word(false, 0), Ordering::Relaxed);
        assert_eq!(w.idle(&mut rx), Ok(Some(msg(4))), "the message before the death");
        assert_eq!(w.try_recv_now(&mut rx), Err(ChannelError::PeerGone));
    }

    #[test]
    fn the_blocking_receive_takes_what_comes_and_looks_every_look_every_polls() {
        let st = Box::new(OwnedRing::new());
        let word = AtomicU64::new(link_word(true, 0));
        let mut w = LinkWatch::new(&word);
        let (mut tx, mut rx) = (Sender::new(st.ring(4)), Receiver::new(st.ring(4), 1));
        // A message sent while the receiver waits (here: during its fifth pause) is taken,
        // and the count published with it.
        let mut polls = 0;
        let got = w.recv(&mut rx, || {
            polls += 1;
            if polls == 5 {
                tx.try_send(&msg(7)).unwrap();
            }
        });
        assert_eq!((got, polls), (Ok(msg(7)), 5));
        assert_eq!(st.ring(4).received(), 1);
        // Within a bounded wait: nothing, after exactly that many polls and a look.
        let mut polls = 0;
        assert_eq!(w.recv_within(&mut rx, 40, || polls += 1), Ok(None));
        assert_eq!(polls, 39, "a pause between polls, none after the last");
        // A dead peer's last messages come first, then its death, within LOOK_EVERY polls.
        tx.try_send(&msg(8)).unwrap();
        word.store(link_word(false, 0), Ordering::Relaxed);
        assert_eq!(w.recv(&mut rx, || {}), Ok(msg(8)));
        let mut polls = 0;
        assert_eq!(w.recv(&mut rx, || polls += 1), Err(ChannelError::PeerGone));
        assert!(polls < LOOK_EVERY, "{polls}");
        // Up again in this epoch: a corrupt control word in the next slot is reported
        // within LOOK_EVERY polls, never taken for a message.
        word.store(link_word(true, 0), Ordering::Relaxed);
        st.slot(2).control.store(0xdead, Ordering::Relaxed);
        let mut polls = 0;
        let got = w.recv(&mut rx, || polls += 1);
        assert!(matches!(got, Err(ChannelError::Corrupt { slot: 2, .. })), "{got:?}");
        assert!(polls < LOOK_EVERY, "{polls}");
    }

    #[test]
    fn an_error_while_the_link_changed_reports_the_change() {
        let st = Box::new(OwnedRing::new());
        let word = AtomicU64::new(link_word(true, 2));
        let mut w = LinkWatch::new(&word);
        let mut rx = Receiver::with_epoch(st.ring(4), 1, 2);
        st.slot(0).control.store(2 << 48 | 99, Ordering::Relaxed);
        assert!(matches!(w.try_recv_now(&mut rx), Err(ChannelError::Corrupt { .. })));
        word.store(link_word(false, 2), Ordering::Relaxed);
        assert_eq!(w.try_recv_now(&mut rx), Err(ChannelError::PeerGone));
        // A word that says down is decoded at every look until it is up again.
        word.store(link_word(true, 2), Ordering::Relaxed);
        st.slot(0).control.store(0, Ordering::Relaxed);
        assert_eq!(w.try_recv_now(&mut rx), Ok(None));
        // Polling: a corrupt word is reported within LOOK_EVERY polls.
        st.slot(0).control.store(2 << 48 | 99, Ordering::Relaxed);
        let polls = (1..=LOOK_EVERY).find(|_| w.try_recv(&mut rx).is_err());
        assert!(polls.is_some(), "corruption reported within LOOK_EVERY polls");
    }

    #[test]
    fn a_call_sends_notifies_and_takes_the_reply_into_the_callers_buffer() {
        let (ab, ba) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
        let word = AtomicU64::new(link_word(true, 0));
        let mut w = LinkWatch::new(&word);
        let (mut tx, mut rx) = (Sender::new(ab.ring(2)), Receiver::new(ba.ring(2), 1));
        // The peer: its own ends, run from the caller's pauses.
        let (mut ptx, mut prx) = (Sender::new(ba.ring(2)), Receiver::new(ab.ring(2), 1));
        for i in 0..5u64 {
            let (mut reply, mut notified, mut pauses) = ([0; crate::channel::WORDS], 0, 0);
            let got = w.call(
                &mut tx,
                &mut rx,
                &msg(i),
                &mut reply,
                |t| notified = t.sent(),
                || {
                    pauses += 1;
                    // The peer answers on the third pause: the caller waits until then. It
                    // takes the request as any message; its reply goes into the call's slot.
                    if pauses == 3 {
                        let m = prx.try_recv().unwrap().expect("the request was sent");
                        assert!(prx.owes());
                        let r = m.map(|x| x + 100);
                        assert!(prx.reply(&mut ptx, &r));
                    }
                },
            );
            assert_eq!(got, Ok(()));
            assert_eq!((reply, notified, pauses), (msg(i).map(|x| x + 100), i + 1, 3));
            assert_eq!(ba.ring(2).received(), i + 1, "the reply counted as received");
            assert_eq!(ba.ring(2).sent(), i + 1, "and as sent");
            assert_eq!(rx.received(), 0, "the ring the peer's messages come on: untouched");
        }
        // A message the peer sent before answering stays for the next receive.
        ptx.try_send(&msg(50)).unwrap();
        // A full ring: the call spins (pauses) until the peer makes room, then sends.
        tx.try_send(&msg(7)).unwrap();
        tx.try_send(&msg(8)).unwrap();
        assert_eq!(tx.try_send(&msg(9)), Err(ChannelError::Full));
        let mut pauses = 0;
        let mut reply = [0; crate::channel::WORDS];
        let got = w.call(
            &mut tx,
            &mut rx,
            &msg(9),
            &mut reply,
            |_| {},
            || {
                pauses += 1;
                if pauses == 1 {
                    assert_eq!(prx.try_recv(), Ok(Some(msg(7))));
                    // Publishes the count the sender will find (ack_every 1).
                }
                if pauses == 2 {
                    assert_eq!(prx.try_recv(), Ok(Some(msg(8))));
                    assert!(!prx.owes(), "a plain message");
                    assert_eq!(prx.try_recv(), Ok(Some(msg(9))));
                    assert!(prx.reply(&mut ptx, &msg(42)));
                }
            },
        );
        assert_eq!((got, reply), (Ok(()), msg(42)));
        assert!(pauses >= 2, "{pauses}");
        assert_eq!(w.recv(&mut rx, || {}), Ok(msg(50)));
    }

    /// `call_until`: a ring that stays full ends the turn with nothing sent; a reply that
    /// does not come ends it with the call given up, whose late reply is then discarded
    /// (by a send that needs its slot, or by the next call) and never taken for the next
    /// call's reply; and the next call's reply is its own.
    #[test]
    fn a_call_with_a_deadline_gives_up_and_its_late_reply_is_discarded() {
        let (ab, ba) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
        let word = AtomicU64::new(link_word(true, 0));
        let mut w = LinkWatch::new(&word);
        let (mut tx, mut rx) = (Sender::new(ab.ring(2)), Receiver::new(ba.ring(2), 1));
        let (mut ptx, mut prx) = (Sender::new(ba.ring(2)), Receiver::new(ab.ring(2), 1));
        let mut reply = [0; crate::channel::WORDS];
        // Full ring, deadline at the third look: nothing sent.
        tx.try_send(&msg(1)).unwrap();
        tx.try_send(&msg(2)).unwrap();
        let mut looks = 0;
        let got = w.call_until(
            &mut tx,
            &mut rx,
            &msg(3),
            &mut reply,
            |_| {},
            || {},
            || {
                looks += 1;
                looks == 3
            },
        );
        assert_eq!((got, looks), (Ok(CallEnd::NotSent), 3));
        assert!(!tx.call_pending(), "the request never left");
        assert_eq!(w.recv(&mut prx, || {}), Ok(msg(1)));
        assert_eq!(w.recv(&mut prx, || {}), Ok(msg(2)));
        // The peer takes the request and sits on it: the call is given up.
        let got = w.call_until(
            &mut tx,
            &mut rx,
            &msg(4),
            &mut reply,
            |_| {},
            || {},
            || {
                if prx.owes() {
                    return true;
                }
                assert_eq!(prx.try_recv(), Ok(Some(msg(4))));
                false
            },
        );
        assert_eq!(got, Ok(CallEnd::GivenUp));
        assert!(tx.call_held() && prx.owes());
        // A send into the other slot goes; the next would reuse the call's: Full.
        assert_eq!(w.try_send_or_reply(&mut tx, &mut rx, &msg(5)), Ok(false));
        assert_eq!(w.try_send_or_reply(&mut tx, &mut rx, &msg(6)), Err(ChannelError::Full));
        assert_eq!(w.after_full(&mut tx, &mut rx), Ok(()));
        assert!(tx.call_held(), "no reply yet: still held");
        // The late reply comes: a blocking send's full path discards it, freeing the slot.
        assert!(prx.reply(&mut ptx, &msg(400)));
        assert_eq!(w.try_send_or_reply(&mut tx, &mut rx, &msg(6)), Err(ChannelError::Full));
        assert_eq!(w.after_full(&mut tx, &mut rx), Ok(()));
        assert_eq!(w.try_send_or_reply(&mut tx, &mut rx, &msg(6)), Ok(false));
        assert!(!tx.call_held());
        assert_eq!(ba.ring(2).received(), 1, "the discarded reply was taken (counted)");
        assert_eq!(w.recv(&mut prx, || {}), Ok(msg(5)));
        assert_eq!(w.recv(&mut prx, || {}), Ok(msg(6)));
        // Given up again; the next call waits for it to settle, then gets its own reply.
        let got = w.call_until(
            &mut tx,
            &mut rx,
            &msg(7),
            &mut reply,
            |_| {},
            || {},
            || {
                if !prx.owes() {
                    assert_eq!(prx.try_recv(), Ok(Some(msg(7))));
                }
                true
            },
        );
        assert_eq!(got, Ok(CallEnd::GivenUp));
        let mut pauses = 0;
        let got = w.call(
            &mut tx,
            &mut rx,
            &msg(8),
            &mut reply,
            |_| {},
            || {
                pauses += 1;
                if pauses == 2 {
                    assert!(prx.reply(&mut ptx, &msg(700)), "the late reply to 7");
                }
                if pauses == 4 {
                    assert_eq!(prx.try_recv(), Ok(Some(msg(8))));
                    assert!(prx.reply(&mut ptx, &msg(800)));
                }
            },
        );
        assert_eq!((got, reply), (Ok(()), msg(800)), "the reply to 8, not the late one to 7");
        assert_eq!(ba.ring(2).received(), 3);
    }

    /// Rings reset while a call given up is held (the peer restarted): before this side's
    /// link word says so, the new incarnation's count (its epoch's 0) frees nothing (in
    /// epoch 0 it reads as `BadAck`, as the flow control reads it; later, as an other
    /// epoch's count, it says nothing: the call stays held, `NotSent`); once the word says
    /// so, the next call ends with `Reset`; nothing is written into the reset ring; after
    /// the resync the new epoch's ends call as usual.
    #[test]
    fn a_reset_while_a_call_is_held_frees_nothing_and_ends_with_reset() {
        for epoch in [0u32, 1] {
            let (ab, ba) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
            let word = AtomicU64::new(link_word(true, epoch));
            let mut w = LinkWatch::new(&word);
            let mut tx = Sender::with_epoch(ab.ring(2), epoch);
            let mut rx = Receiver::with_epoch(ba.ring(2), 1, epoch);
            let mut prx = Receiver::with_epoch(ab.ring(2), 1, epoch);
            let mut reply = [0; crate::channel::WORDS];
            let took = |prx: &mut Receiver<'_>| {
                let _ = prx.try_recv();
                true
            };
            let got = w.call_until(
                &mut tx,
                &mut rx,
                &msg(1),
                &mut reply,
                |_| {},
                || {},
                || took(&mut prx),
            );
            assert_eq!(got, Ok(CallEnd::GivenUp));
            assert!(prx.owes());
            // The peer dies and comes back: both rings zeroed (control words first), its
            // new receiver publishes the next epoch's count 0.
            for st in [&ab, &ba] {
                st.ring(2).void_controls();
                st.consumer().received.store(0, Ordering::Relaxed);
            }
            let next = epoch + 1;
            let _ = Receiver::with_epoch(ab.ring(2), 1, next);
            let got = w.call_until(&mut tx, &mut rx, &msg(2), &mut reply, |_| {}, || {}, || true);
            if epoch == 0 {
                assert!(matches!(got, Err(ChannelError::BadAck { .. })), "{got:?}");
            } else {
                assert_eq!(got, Ok(CallEnd::NotSent));
            }
            assert!(tx.call_held(), "a reset's count frees nothing");
            word.store(link_word(true, next), Ordering::Relaxed);
            let got = w.call_until(&mut tx, &mut rx, &msg(2), &mut reply, |_| {}, || {}, || true);
            assert_eq!(got, Err(ChannelError::Reset));
            for i in 0..2 {
                assert_eq!(
                    ab.slot(i).control.load(Ordering::Relaxed),
                    0,
                    "written after the reset"
                );
            }
            // The resync: new ends in the new epoch; a call goes and is answered.
            assert_eq!(w.resync(), Ok(next));
            let (mut tx, mut rx) =
                (Sender::with_epoch(ab.ring(2), next), Receiver::with_epoch(ba.ring(2), 1, next));
            let (mut prx, mut ptx) =
                (Receiver::with_epoch(ab.ring(2), 1, next), Sender::with_epoch(ba.ring(2), next));
            let got = w.call_until(
                &mut tx,
                &mut rx,
                &msg(3),
                &mut reply,
                |_| {},
                || {},
                || {
                    if let Ok(Some(m)) = prx.try_recv() {
                        assert_eq!(m, msg(3));
                        assert!(prx.reply(&mut ptx, &msg(30)));
                    }
                    false
                },
            );
            assert_eq!((got, reply), (Ok(CallEnd::Replied), msg(30)));
        }
    }

    #[test]
    fn a_call_reports_a_corrupt_reply_a_torn_copy_and_a_death() {
        let (ab, ba) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
        let word = AtomicU64::new(link_word(true, 0));
        let mut w = LinkWatch::new(&word);
        let (mut tx, mut rx) = (Sender::new(ab.ring(4)), Receiver::new(ba.ring(4), 1));
        let mut reply = [0; crate::channel::WORDS];
        // The call's slot gets a word that is neither the request nor its reply (here the
        // reply to another request): reported within LOOK_EVERY polls, nothing taken.
        let mut polls = 0;
        let got = w.call(
            &mut tx,
            &mut rx,
            &msg(1),
            &mut reply,
            |_| {},
            || {
                polls += 1;
                ab.slot(0).control.store(2 | crate::channel::REPLY, Ordering::Relaxed);
            },
        );
        assert!(matches!(got, Err(ChannelError::Corrupt { slot: 0, .. })), "{got:?}");
        assert!(polls < LOOK_EVERY, "{polls}");
        assert_eq!(ba.ring(4).received(), 0, "nothing taken");
        // A reply on the ring instead of the slot is no reply to a call.
        let mut polls = 0;
        let mut otx = Sender::new(ba.ring(4));
        let got = w.call(
            &mut tx,
            &mut rx,
            &msg(1),
            &mut reply,
            |_| {},
            || {
                polls += 1;
                if polls == 1 {
                    otx.try_send(&msg(5)).unwrap();
                }
                if polls == 2 * LOOK_EVERY {
                    ab.slot(1).control.store(0xdead, Ordering::Relaxed);
                }
            },
        );
        assert!(matches!(got, Err(ChannelError::Corrupt { slot: 1, .. })), "{got:?}");
        assert!(polls > LOOK_EVERY, "waited for the slot, not the ring: {polls}");
        ba.slot(0).control.store(0, Ordering::Relaxed);
        // The word the poll found changes before the copy is re-checked: torn, nothing
        // taken, and the message taken once it is whole.
        let mut ptx = Sender::new(ba.ring(4));
        ba.slot(0).control.store(0, Ordering::Relaxed);
        ptx.try_send(&msg(2)).unwrap();
        assert!(rx.poll(1, || {}));
        ba.slot(0).control.store(0xbad, Ordering::Relaxed);
        let mut out = [0; crate::channel::WORDS];
        assert_eq!(rx.take_polled(&mut out), Err(ChannelError::Torn { slot: 0 }));
        assert_eq!(rx.received(), 0, "nothing taken");
        ba.slot(0).control.store(1, Ordering::Relaxed);
        assert!(rx.poll(1, || {}));
        assert_eq!(rx.take_polled(&mut out), Ok(()));
        assert_eq!((out, rx.received(), ba.ring(4).received()), (msg(2), 1, 1));
        // The peer dies while the caller waits: PeerGone within LOOK_EVERY polls...
        let mut polls = 0;
        let got = w.call(
            &mut tx,
            &mut rx,
            &msg(3),
            &mut reply,
            |_| {},
            || {
                polls += 1;
                word.store(link_word(false, 0), Ordering::Relaxed);
            },
        );
        assert_eq!(got, Err(ChannelError::PeerGone));
        assert!(polls <= LOOK_EVERY, "{polls}");
        // ...and a call to a peer known gone sends nothing.
        let sent = tx.sent();
        let got = w.call(&mut tx, &mut rx, &msg(4), &mut reply, |_| panic!("sent"), || {});
        assert_eq!((got, tx.sent()), (Err(ChannelError::PeerGone), sent));
    }

    #[test]
    fn a_server_answers_each_request_until_its_handler_stops() {
        let (ab, ba) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
        let word = AtomicU64::new(link_word(true, 0));
        let mut w = LinkWatch::new(&word);
        // The server receives on `ab` and answers on `ba`; the client runs in its pauses.
        let (mut tx, mut rx) = (Sender::new(ba.ring(2)), Receiver::new(ab.ring(2), 1));
        let (mut ctx, mut crx) = (Sender::new(ab.ring(2)), Receiver::new(ba.ring(2), 1));
        let (mut asked, mut answers, mut rung) = (0u64, vec![], 0);
        let got = w.serve(
            &mut tx,
            &mut rx,
            |req| {
                if req[0] == 4 {
                    core::ops::ControlFlow::Break(req[0])
                } else {
                    core::ops::ControlFlow::Continue(msg(req[0] + 100))
                }
            },
            |_| rung += 1,
            || {
                if let Ok(Some(m)) = crx.try_recv() {
                    answers.push(m[0]);
                }
                if asked == answers.len() as u64 {
                    ctx.try_send(&msg(asked)).unwrap();
                    asked += 1;
                }
            },
        );
        assert_eq!(got, Ok(4), "stopped at the request its handler refused");
        assert_eq!((answers, rung), (vec![100, 101, 102, 103], 4));
        assert_eq!(ab.ring(2).received(), 5, "every request taken, counts published");
        // A corrupt request: reported within LOOK_EVERY polls, the handler never runs.
        ab.slot(rx.received() as usize % 2).control.store(0xdead, Ordering::Relaxed);
        let mut polls = 0;
        let got = w.serve(
            &mut tx,
            &mut rx,
            |_| -> core::ops::ControlFlow<(), Payload> { panic!("handled") },
            |_| {},
            || polls += 1,
        );
        assert!(matches!(got, Err(ChannelError::Corrupt { .. })), "{got:?}");
        assert!(polls < LOOK_EVERY, "{polls}");
        // The client dies while the server waits: PeerGone within LOOK_EVERY polls.
        ab.slot(rx.received() as usize % 2).control.store(0, Ordering::Relaxed);
        let mut polls = 0;
        let got = w.serve(
            &mut tx,
            &mut rx,
            |_| -> core::ops::ControlFlow<(), Payload> { panic!("handled") },
            |_| {},
            || {
                polls += 1;
                word.store(link_word(false, 0), Ordering::Relaxed);
            },
        );
        assert_eq!(got, Err(ChannelError::PeerGone));
        assert!(polls <= LOOK_EVERY, "{polls}");
    }

    #[test]
    fn a_server_answers_calls_in_their_slots_and_plain_requests_on_its_ring() {
        let (ab, ba) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
        let word = AtomicU64::new(link_word(true, 0));
        let mut w = LinkWatch::new(&word);
        let (mut tx, mut rx) = (Sender::new(ba.ring(2)), Receiver::new(ab.ring(2), 1));
        let (mut ctx, mut crx) = (Sender::new(ab.ring(2)), Receiver::new(ba.ring(2), 1));
        // The client alternates: a call (reply in the slot), a plain request (reply on the
        // server's ring), from the server's pauses.
        let (mut asked, mut answers, mut rung) = (0u64, vec![], 0);
        let mut out = [0; crate::channel::WORDS];
        let got = w.serve(
            &mut tx,
            &mut rx,
            |req| {
                if req[0] == 6 {
                    core::ops::ControlFlow::Break(())
                } else {
                    core::ops::ControlFlow::Continue([req[0] + 100; crate::channel::WORDS])
                }
            },
            |_| rung += 1,
            bounded(|| {
                if asked % 2 == 1 {
                    if let Some(r) = ctx.poll_reply(&mut crx, 1, &mut out, || {}) {
                        r.unwrap();
                        answers.push(out[0]);
                    }
                } else if let Ok(Some(m)) = crx.try_recv() {
                    answers.push(m[0]);
                }
                if asked == answers.len() as u64 {
                    let m = [asked; crate::channel::WORDS];
                    if asked % 2 == 0 {
                        ctx.try_call(&m).unwrap();
                    } else {
                        ctx.try_send(&m).unwrap();
                    }
                    asked += 1;
                }
            }),
        );
        assert_eq!(got, Ok(()));
        assert_eq!(answers, vec![100, 101, 102, 103, 104, 105]);
        assert_eq!(rung, 3, "only the replies on the ring notify");
        assert_eq!((ba.ring(2).sent(), ba.ring(2).received()), (6, 6));
        // The call the handler stopped at is still owed: the server's next send answers it.
        assert!(rx.owes());
        assert_eq!(w.try_send_or_reply(&mut tx, &mut rx, &[7; crate::channel::WORDS]), Ok(true));
        assert_eq!(ctx.poll_reply(&mut crx, 1, &mut out, || {}), Some(Ok(())));
        assert_eq!(out, [7; crate::channel::WORDS]);
        assert_eq!(w.try_send_or_reply(&mut tx, &mut rx, &[8; crate::channel::WORDS]), Ok(false));
        assert_eq!(crx.try_recv(), Ok(Some([8; crate::channel::WORDS])));
    }

    /// A peer that replies twice, replies with the last call's word again (a stale reply),
    /// or writes a reply word of count 0 (what a caller with no call outstanding would
    /// poll for): the next call never takes any of them; a stale reply in the new call's
    /// slot is reported as corruption, and the honest reply is taken once.
    #[test]
    fn a_call_takes_no_second_stale_or_empty_reply() {
        use crate::channel::{CALL, REPLY};
        let (ab, ba) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
        let word = AtomicU64::new(link_word(true, 0));
        let mut w = LinkWatch::new(&word);
        let (mut tx, mut rx) = (Sender::new(ab.ring(4)), Receiver::new(ba.ring(4), 1));
        let (mut ptx, mut prx) = (Sender::new(ba.ring(4)), Receiver::new(ab.ring(4), 1));
        let mut reply = [0; crate::channel::WORDS];
        // An honest first round trip.
        let got = w.call(
            &mut tx,
            &mut rx,
            &msg(1),
            &mut reply,
            |_| {},
            bounded(|| {
                if prx.try_recv().unwrap().is_some() {
                    assert!(prx.reply(&mut ptx, &msg(101)));
                }
            }),
        );
        assert_eq!((got, reply), (Ok(()), msg(101)));
        // The peer answers the same call again, and writes the empty reply word, into the
        // answered slot: the caller is not waiting there any more.
        ab.slot(0).control.store(1 | REPLY, Ordering::Relaxed);
        ab.slot(0).control.store(REPLY, Ordering::Relaxed);
        // The second call: the honest reply comes after the peer's forgeries in other
        // slots; none of them is taken.
        let mut polls = 0;
        let got = w.call(
            &mut tx,
            &mut rx,
            &msg(2),
            &mut reply,
            |_| {},
            bounded(|| {
                polls += 1;
                ab.slot(0).control.store(1 | REPLY, Ordering::Relaxed);
                ab.slot(2).control.store(2 | REPLY, Ordering::Relaxed);
                ab.slot(3).control.store(REPLY, Ordering::Relaxed);
                if polls == 40 {
                    assert_eq!(prx.try_recv(), Ok(Some(msg(2))));
                    assert!(prx.reply(&mut ptx, &msg(102)));
                }
            }),
        );
        assert_eq!((got, reply), (Ok(()), msg(102)));
        assert!(polls >= 40, "no forged reply taken before the honest one: {polls}");
        assert_eq!((ba.ring(4).sent(), ba.ring(4).received()), (2, 2), "each reply once");
        // A stale reply (the first call's word) in the third call's slot: corruption,
        // reported within a look, never taken.
        let mut polls = 0;
        let got = w.call(
            &mut tx,
            &mut rx,
            &msg(3),
            &mut reply,
            |_| {},
            bounded(|| {
                polls += 1;
                ab.slot(2).control.store(1 | REPLY, Ordering::Relaxed);
            }),
        );
        assert_eq!(
            got,
            Err(ChannelError::Corrupt { slot: 2, expected: 3 | REPLY, found: 1 | REPLY })
        );
        assert!(polls <= LOOK_EVERY, "{polls}");
        // Both flags at once in the slot: corruption too.
        ab.slot(2).control.store(3 | CALL | REPLY, Ordering::Relaxed);
        assert!(matches!(tx.not_replied(), Err(ChannelError::Corrupt { .. })));
        assert_eq!(ba.ring(4).received(), 2, "nothing more taken");
    }

    /// A replying peer's steps: `None` an honest reply, `Some((slot, word))` a word into a
    /// control word.
    fn reply_ops() -> impl proptest::strategy::Strategy<Value = Vec<Option<(usize, u64)>>> {
        use proptest::prelude::*;
        let op = prop_oneof![
            3 => Just(None),
            2 => (0usize..8, any::<u64>()).prop_map(Some),
        ];
        proptest::collection::vec(op, 0..40)
    }

    proptest::proptest! {
        /// A hostile peer answering calls: between the caller's polls it writes what it
        /// likes into the ring the replies come on (any control word of another epoch or
        /// none, its honest reply, its sleeping flag), and after its last step it dies. A
        /// call never panics, always ends, and returns only the peer's honest replies, in
        /// order, each copied whole; otherwise an error.
        #[test]
        fn a_call_takes_only_honest_replies_from_a_hostile_peer(
            slots in 1u32..9,
            epoch in 0u32..5,
            ops in reply_ops(),
            calls in 1usize..6,
        ) {
            let (ours, theirs) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
            let word = AtomicU64::new(link_word(true, epoch));
            let mut w = LinkWatch::new(&word);
            let mut tx = Sender::with_epoch(ours.ring(slots), epoch);
            let mut rx = Receiver::with_epoch(theirs.ring(slots), 1, epoch);
            let mut prx = Receiver::with_epoch(ours.ring(slots), 1, epoch);
            let mut ptx = Sender::with_epoch(theirs.ring(slots), epoch);
            let tag = ((epoch & 0xffff) as u64) << 48;
            let (mut replied, mut taken) = (0u64, 0u64);
            let mut ops = ops.into_iter();
            for _ in 0..calls {
                let mut reply = [0; crate::channel::WORDS];
                let got = w.call(&mut tx, &mut rx, &msg(0), &mut reply, |_| {}, || {
                    match ops.next() {
                        // An honest reply: the request taken, the reply into its slot.
                        Some(None) => {
                            let _ = prx.try_recv();
                            if prx.reply(&mut ptx, &msg(replied)) {
                                replied += 1;
                            }
                        }
                        // Any word with another tag (or 0) into any control word of the
                        // ring the requests go on, where the replies come.
                        Some(Some((slot, v))) => {
                            let v = if v != 0 && v & !((1 << 48) - 1) == tag { v ^ 1 << 63 } else { v };
                            ours.slot(slot % slots as usize).control.store(v, Ordering::Relaxed);
                        }
                        // Out of steps: the peer dies.
                        None => word.store(link_word(false, epoch), Ordering::Relaxed),
                    }
                });
                match got {
                    Ok(()) => {
                        proptest::prop_assert_eq!(reply, msg(taken), "forged or out of order");
                        taken += 1;
                    }
                    Err(_) => break,
                }
                proptest::prop_assert!(taken <= replied);
            }
        }
    }

    /// What a peer answering calls late, and lying at times, does while a caller with a
    /// deadline waits.
    #[derive(Clone, Debug)]
    enum Late {
        /// Takes the next request (an honest receive; a reply still owed is forgotten).
        Take,
        /// Answers the request taken last, if it owes the answer (an honest reply).
        Answer,
        /// Any word of another epoch (or 0) into any control word of the requests' ring.
        Control { slot: usize, v: u64 },
        /// A word into its published count of requests: `k` with this epoch's tag (`how`
        /// 0 or 1), with the next epoch's (2), or any word `v` (3).
        Count { k: u64, how: u64, v: u64 },
        /// The caller's deadline passes.
        Expire,
    }

    fn late_ops() -> impl proptest::strategy::Strategy<Value = Vec<Late>> {
        use proptest::prelude::*;
        let op = prop_oneof![
            3 => Just(Late::Take),
            3 => Just(Late::Answer),
            1 => (0usize..8, any::<u64>()).prop_map(|(slot, v)| Late::Control { slot, v }),
            1 => (0u64..12, 0u64..4, any::<u64>()).prop_map(|(k, how, v)| Late::Count { k, how, v }),
            2 => Just(Late::Expire),
        ];
        proptest::collection::vec(op, 0..120)
    }

    proptest::proptest! {
        /// `call_until` against a peer that answers late, forgets answers, scribbles over
        /// control words and publishes any count: every turn ends (the deadline is asked
        /// in every wait); `Replied` only with the caller's own call's answer (never a
        /// late answer to a call given up, never a forged one); `NotSent` with nothing
        /// sent, `GivenUp` with the call sent and held; the peer's honest receiver takes
        /// only the caller's requests, whole and in order, whatever its lying count let
        /// the caller overwrite (a late answer over a new request reads as empty or
        /// corrupt, never as a message); errors are reported and the next turn keeps
        /// every promise; no arithmetic overflows (debug build).
        #[test]
        fn a_call_with_a_deadline_keeps_its_promises_against_a_lying_late_peer(
            slots in 1u32..5,
            epoch in 0u32..3,
            ops in late_ops(),
            calls in 1usize..12,
        ) {
            let (ours, theirs) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
            let word = AtomicU64::new(link_word(true, epoch));
            let mut w = LinkWatch::new(&word);
            let mut prx = Receiver::with_epoch(ours.ring(slots), 1, epoch);
            let mut ptx = Sender::with_epoch(theirs.ring(slots), epoch);
            let mut tx = Sender::with_epoch(ours.ring(slots), epoch);
            let mut rx = Receiver::with_epoch(theirs.ring(slots), 1, epoch);
            let tag = ((epoch & 0xffff) as u64) << 48;
            let answer = |seq: u64| msg(1_000_000 + seq);
            let mut ops = ops.into_iter();
            let mut bad: Option<String> = None;
            for _ in 0..calls {
                let seq = tx.sent();
                let mut reply = [0; crate::channel::WORDS];
                let got = w.call_until(&mut tx, &mut rx, &msg(seq), &mut reply, |_| {}, || {}, || {
                    match ops.next() {
                        Some(Late::Take) => {
                            if let Ok(Some(m)) = prx.try_recv() {
                                if m != msg(prx.received() - 1) && bad.is_none() {
                                    bad = Some(format!("took {:?} as request {}", &m[..2], prx.received() - 1));
                                }
                            }
                            false
                        }
                        Some(Late::Answer) => {
                            if prx.owes() {
                                prx.reply(&mut ptx, &answer(prx.received() - 1));
                            }
                            false
                        }
                        Some(Late::Control { slot, v }) => {
                            let v = if v != 0 && v & !((1 << 48) - 1) == tag { v ^ 1 << 63 } else { v };
                            ours.slot(slot % slots as usize).control.store(v, Ordering::Relaxed);
                            false
                        }
                        Some(Late::Count { k, how, v }) => {
                            let v = match how {
                                3 => v,
                                2 => ((epoch as u64 + 1) & 0xffff) << 48 | k,
                                _ => tag | k,
                            };
                            ours.consumer().received.store(v, Ordering::Relaxed);
                            false
                        }
                        Some(Late::Expire) | None => true,
                    }
                });
                proptest::prop_assert!(bad.is_none(), "{:?}", bad);
                match got {
                    Ok(CallEnd::Replied) => {
                        proptest::prop_assert_eq!(reply, answer(seq), "another call's reply");
                        proptest::prop_assert!(!tx.call_pending());
                    }
                    Ok(CallEnd::NotSent) => proptest::prop_assert_eq!(tx.sent(), seq, "NotSent sent"),
                    Ok(CallEnd::GivenUp) => {
                        proptest::prop_assert_eq!(tx.sent(), seq + 1, "GivenUp not sent");
                        proptest::prop_assert!(tx.call_held());
                    }
                    Err(_) => {}
                }
            }
        }
    }

    /// What a hostile peer does between two steps of the honest side.
    #[derive(Clone, Debug)]
    enum Peer {
        /// Its next message, as an honest sender writes it (within the ring's room).
        Send,
        /// Any word into a control word of the ring it sends on, with another epoch's tag
        /// (or 0): never the honest side's own tag, which only its messages carry.
        Control { slot: usize, v: u64 },
        /// Any word into the count it publishes for the ring the honest side sends on.
        Received(u64),
        /// Any word into its sleeping flag.
        Sleeping(u64),
        /// The honest side takes a message (or finds none).
        Recv,
        /// The honest side sends.
        SendHonest,
    }

    fn peer_ops() -> impl proptest::strategy::Strategy<Value = Vec<Peer>> {
        use proptest::prelude::*;
        let op = prop_oneof![
            3 => Just(Peer::Send),
            3 => Just(Peer::Recv),
            3 => Just(Peer::SendHonest),
            // Any word, 0, or a count near the honest side's under any tag.
            2 => (0usize..8, any::<u64>(), 0u64..4).prop_map(|(slot, v, kind)| {
                let near = (v & 0xffff << 48) | (v & 0xf);
                Peer::Control { slot, v: match kind { 0 => 0, 1 => v, 2 => near, _ => v & 0xf } }
            }),
            1 => (any::<u64>(), 0u64..4).prop_map(|(v, kind)| {
                Peer::Received(match kind { 0 => v, 1 => v & 0xffff, 2 => v >> 16, _ => 0 })
            }),
            1 => any::<u64>().prop_map(Peer::Sleeping),
        ];
        proptest::collection::vec(op, 0..60)
    }

    proptest::proptest! {
        /// A hostile peer writing what it likes into everything it can write in both rings
        /// (the control words of the ring it sends on, the count and sleeping flag of the
        /// ring it receives on): the honest side never panics or reads outside its rings,
        /// delivers only the peer's messages of its own epoch, in order, never sends past
        /// the room the peer's valid counts gave it, and learns of the peer's death within
        /// a ring and `LOOK_EVERY` polls once the peer is gone.
        #[test]
        fn a_hostile_peer_cannot_forge_hide_its_death_or_push_out_of_bounds(
            slots in 1u32..9,
            ack in 1u32..4,
            epoch in 0u32..5,
            ops in peer_ops(),
        ) {
            let (ours, theirs) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
            let word = AtomicU64::new(link_word(true, epoch));
            let mut w = LinkWatch::new(&word);
            let mut tx = Sender::with_epoch(ours.ring(slots), epoch);
            let mut rx = Receiver::with_epoch(theirs.ring(slots), ack, epoch);
            let tag = ((epoch & 0xffff) as u64) << 48;
            let n = slots as u64;
            // The peer's honest sends so far; the largest count of ours it ever published
            // with our tag: all the room we may use.
            let (mut peer_sent, mut delivered, mut valid_ack) = (0u64, 0u64, 0u64);
            for op in &ops {
                match *op {
                    Peer::Send => {
                        if peer_sent - rx.received() < n {
                            let s = theirs.slot((peer_sent % n) as usize);
                            for (d, v) in s.data.iter().zip(msg(peer_sent)) {
                                d.store(v, Ordering::Relaxed);
                            }
                            s.control.store(tag | (peer_sent + 1), Ordering::Release);
                            peer_sent += 1;
                        }
                    }
                    Peer::Control { slot, v } => {
                        let v = if v != 0 && v & !((1 << 48) - 1) == tag { v ^ 1 << 63 } else { v };
                        theirs.slot(slot % slots as usize).control.store(v, Ordering::Relaxed);
                    }
                    Peer::Received(v) => {
                        // (A count past what we sent is refused when read; one that
                        // lies ahead of the peer's reading costs only the peer.)
                        if v & !((1 << 48) - 1) == tag {
                            valid_ack = valid_ack.max(v & ((1 << 48) - 1));
                        }
                        ours.consumer().received.store(v, Ordering::Relaxed);
                    }
                    Peer::Sleeping(v) => ours.consumer().sleeping.store(v, Ordering::Relaxed),
                    Peer::Recv => {
                        if let Ok(Some(m)) = w.try_recv(&mut rx) {
                            proptest::prop_assert_eq!(m, msg(delivered), "forged or out of order");
                            delivered += 1;
                        }
                    }
                    Peer::SendHonest => {
                        let _ = w.try_send(&mut tx, &msg(99));
                        proptest::prop_assert!(
                            tx.sent() <= valid_ack + n,
                            "sent {} with room for {} + {n}", tx.sent(), valid_ack
                        );
                        let _ = tx.peer_sleep();
                    }
                }
                proptest::prop_assert!(delivered <= peer_sent);
            }
            // The peer dies: it writes nothing more, its core takes the link down.
            word.store(link_word(false, epoch), Ordering::Relaxed);
            proptest::prop_assert_eq!(w.try_send(&mut tx, &msg(7)), Err(ChannelError::PeerGone));
            let mut told = false;
            for _ in 0..(n + LOOK_EVERY as u64 + 1) {
                match w.try_recv(&mut rx) {
                    Ok(Some(m)) => {
                        proptest::prop_assert_eq!(m, msg(delivered), "forged after death");
                        delivered += 1;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        proptest::prop_assert_eq!(e, ChannelError::PeerGone);
                        told = true;
                        break;
                    }
                }
            }
            proptest::prop_assert!(told, "the death went unnoticed");
            proptest::prop_assert_eq!(w.try_recv_now(&mut rx), Err(ChannelError::PeerGone));
        }
    }
}
