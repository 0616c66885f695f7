// SPDX-License-Identifier: MIT OR Apache-2.0
//! Shared-memory message channels: single-producer single-consumer rings of 64-byte
//! messages, one cache line each with the control word last (after Barrelfish's UMP). A
//! channel is two rings, one per direction. Sending and receiving are plain memory
//! operations; no hypercall is on the message path.
//!
//! Layout of one ring (all lines 64 bytes):
//!
//! | line | written by | content |
//! |---|---|---|
//! | 0 | producer | `sent`: messages sent, epoch-tagged (statistics only; nobody waits on it); `replied`: replies it wrote into the other ring's slots (statistics) |
//! | 1 | consumer | `received`: messages consumed (published every `ack_every`), `sleeping`; `replies_taken`: replies it took from its own request slots (statistics) |
//! | 2.. | producer | `slots` slots: seven payload words, then the control word |
//!
//! Message `n` (counting from 0) goes in slot `n % slots` with control word `n + 1`. The
//! receiver expecting message `n` accepts control `n + 1`; it reads the slot as empty when
//! the control word still holds the previous lap's value (`n + 1 - slots`, or 0 on the first
//! lap). Any other value is corruption, reported as an error; so is a control word that
//! changes while the payload is being copied (a torn slot), and a `received` count that goes
//! backwards or past what was sent. Nothing here trusts the other side: every error is
//! returned, nothing panics, nothing waits.
//!
//! Calls ([`CALL`], [`REPLY`]): a request whose control word also has `CALL` is answered in
//! its own slot: the receiver writes the reply there with the word `n + 1 | REPLY`, and the
//! caller, who polls that slot, accepts exactly that word. A round trip then moves one
//! cache line (the request's slot) twice instead of two lines twice each.
//!
//! Epochs: a channel whose guest was restarted starts over in a new epoch (the hypervisor
//! resets its rings and tells both sides, see `guest::StatusPage`). Each side then makes a
//! new [`Sender`] and [`Receiver`] with the epoch's tag ([`Sender::with_epoch`]): control
//! words and the `received` count carry the tag in their top 16 bits, so a word a side of
//! the old epoch wrote late (after the reset) is never read as a message or an ack of the
//! new one: a slot with an earlier epoch's tag is empty, an ack with one says nothing; so
//! are a zeroed slot and a zeroed ack (the reset state), in every epoch. Tags are 16 bits:
//! epochs 65,536 apart share one, which is harmless because the rings are zeroed at every
//! reset and only the epoch just before can still write late.
//! After epoch 0 a new receiver publishes the count 0 with its tag at once, and a new
//! sender writes nothing until it has read a count of its epoch: a survivor's late reply
//! ([`CALL`]) goes into the ring its *peer* produces, and is over before the survivor
//! makes its new receiver.
//!
//! Memory ordering: the producer stores the payload (relaxed), then the control word
//! (release). The consumer loads the control word (acquire), copies the payload (relaxed),
//! then re-reads the control word after an acquire fence, seqlock style. The consumer
//! publishes `received` with release after it has copied the slot out; the producer loads
//! it with acquire before reusing a slot. Relaxed atomic loads and stores of aligned words
//! are plain moves on x86-64: the ring costs nothing for being data-race free, and the
//! protocol is model-checked with loom (`RUSTFLAGS="--cfg loom"`).

#[cfg(not(loom))]
use core::sync::atomic::{fence, AtomicU64, Ordering};
#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicU64, Ordering};

/// Payload words per message (the eighth word of the line is the control word).
pub const WORDS: usize = 7;
/// A message payload: 56 bytes.
pub type Payload = [u64; WORDS];

/// The message `seq` from `origin` that the built-in channel workloads exchange (`ping`
/// sends `message(i, 0)`, `pong` answers `message(i, 1)`): sequence, origin, then five
/// words derived from both, so a receiver checks content and order. A guest of one's own
/// (Rust or C: `mkv_message` in the C header's companion example) talks to them with it.
pub fn message(seq: u64, origin: u64) -> Payload {
    let mut m = [0u64; WORDS];
    m[0] = seq;
    m[1] = origin;
    for (j, w) in m.iter_mut().enumerate().skip(2) {
        *w = (seq ^ origin << 48).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(j as u32 * 7);
    }
    m
}

/// One message slot: one cache line, control word last.
#[repr(C, align(64))]
pub struct Slot {
    pub data: [AtomicU64; WORDS],
    pub control: AtomicU64,
}

/// The producer's line.
#[repr(C, align(64))]
pub struct ProducerLine {
    pub sent: AtomicU64,
    /// Replies this side wrote into its peer's request slots (in the other ring: see
    /// [`CALL`]), epoch-tagged; statistics only, counted with `sent` by [`Ring::sent`].
    pub replied: AtomicU64,
    _pad: [AtomicU64; 6],
}

/// The consumer's line.
#[repr(C, align(64))]
pub struct ConsumerLine {
    pub received: AtomicU64,
    /// Non-zero while the consumer is (about to be) blocked: [`SLEEP_DOORBELL`] (halted until
    /// a doorbell) or [`SLEEP_MWAIT`] (in MWAIT on the next slot's line).
    pub sleeping: AtomicU64,
    /// Replies this side took from its own request slots (the peer's [`ProducerLine::replied`]
    /// on this ring), epoch-tagged; statistics only, counted with `received` by
    /// [`Ring::received`]. The producer's flow control reads `received` alone.
    pub replies_taken: AtomicU64,
    _pad: [AtomicU64; 5],
}

#[cfg(not(loom))]
const _: () = {
    assert!(core::mem::size_of::<Slot>() == 64);
    assert!(core::mem::size_of::<ProducerLine>() == 64);
    assert!(core::mem::size_of::<ConsumerLine>() == 64);
};

/// `sleeping`: the consumer halts until a doorbell; a sender that sees it rings at once.
pub const SLEEP_DOORBELL: u64 = 1;
/// `sleeping`: the consumer sleeps in MWAIT on the line of the next slot. The sender's store
/// into that line is meant to wake it; a sender that sees the flag still set a bounded time
/// after its send rings the doorbell all the same (the monitor is not trusted alone).
pub const SLEEP_MWAIT: u64 = 2;

/// Control-word flag of a request whose reply comes back in its own slot (a call: see
/// [`Sender::try_call`]). The receiver takes it as the message it is (the word with the
/// flag cleared is the sequence it expects) and owes the reply: its side's next message on
/// the channel, written into that slot ([`Receiver::reply`]) instead of its own ring, with
/// the word `seq | REPLY`. A round trip then moves one cache line, twice (to the server
/// with the request, back with the reply), where a reply on the other ring moves two lines
/// twice each (the reader of a line does not write it, so each write takes the line back).
/// Counts stay below 2^46: the flags sit under the epoch tag.
pub const CALL: u64 = 0x8000_0000_0000; // bit 47
/// Control-word flag of a reply written by the receiver into the request's slot.
pub const REPLY: u64 = 0x4000_0000_0000; // bit 46

/// Header bytes of a ring (the two lines).
pub const HEADER_BYTES: usize = 128;

/// Bytes of one ring with `slots` slots.
pub const fn ring_bytes(slots: u32) -> u64 {
    HEADER_BYTES as u64 + 64 * slots as u64
}

/// Bytes of one direction rounded up to whole pages, so each ring starts on a page.
pub const fn ring_pages_bytes(slots: u32) -> u64 {
    (ring_bytes(slots) + 4095) & !4095
}

/// Bytes of a whole channel (two rings).
pub const fn channel_bytes(slots: u32) -> u64 {
    2 * ring_pages_bytes(slots)
}

/// A view of one ring.
#[derive(Clone, Copy)]
pub struct Ring<'a> {
    producer: &'a ProducerLine,
    consumer: &'a ConsumerLine,
    slots: &'a [Slot],
}

impl<'a> Ring<'a> {
    /// A ring over memory at `base` with `slots` slots.
    ///
    /// # Safety
    /// `base` is 64-byte aligned, points to [`ring_bytes`]`(slots)` bytes mapped for the
    /// life of the ring, and the memory is only ever accessed through these atomic types
    /// (by this side and the peer). `slots` is at least 1.
    #[cfg(not(loom))]
    pub unsafe fn from_raw(base: *mut u8, slots: u32) -> Ring<'a> {
        // Every bit pattern is a valid AtomicU64.
        // SAFETY: the caller guarantees alignment, size and lifetime.
        unsafe {
            Ring {
                producer: &*(base as *const ProducerLine),
                consumer: &*(base.add(64) as *const ConsumerLine),
                slots: core::slice::from_raw_parts(
                    base.add(HEADER_BYTES) as *const Slot,
                    slots as usize,
                ),
            }
        }
    }

    pub fn slots(&self) -> u32 {
        self.slots.len() as u32
    }

    /// What the producer says it sent (statistics; not trusted for anything), without its
    /// epoch tag: its messages on this ring and its replies in the other ring's slots.
    #[inline]
    pub fn sent(&self) -> u64 {
        (self.producer.sent.load(Ordering::Relaxed) & COUNT_MASK)
            .saturating_add(self.producer.replied.load(Ordering::Relaxed) & COUNT_MASK)
    }

    /// What the consumer says it received (statistics; not trusted for anything), without
    /// its epoch tag: messages from this ring and replies the producer wrote into the
    /// consumer's own request slots (so `sent() - received()` is what is in flight on this
    /// direction, replies included).
    #[inline]
    pub fn received(&self) -> u64 {
        (self.consumer.received.load(Ordering::Relaxed) & COUNT_MASK)
            .saturating_add(self.consumer.replies_taken.load(Ordering::Relaxed) & COUNT_MASK)
    }

    /// Zeroes every slot's control word, before anything else of the ring is zeroed (a
    /// reset): a receiver copying a slot while the ring is wiped then sees its control
    /// word change at the re-read and reports the copy torn, instead of accepting a
    /// payload already zeroed under an intact control word.
    pub fn void_controls(&self) {
        for s in self.slots {
            s.control.store(0, Ordering::Release);
        }
        core::sync::atomic::fence(Ordering::SeqCst);
    }
}

/// What went wrong on a channel.
///
/// Laid out word by word (a `u64` tag, every field a `u64`), so that in a receive's
/// `Result<Option<Payload>, ChannelError>` or `Result<Payload, ChannelError>` each word of
/// the error lies on a word of the payload: the compiler then moves a received message in
/// whole registers. With the default layout (a byte tag and a `u32` slot index on a
/// payload word) it split the message's first word in two halves on every receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ChannelError {
    /// No free slot (only from `try_send`).
    Full,
    /// A slot's control word is neither the expected message nor the previous lap's.
    Corrupt { slot: u64, expected: u64, found: u64 },
    /// The control word changed while the payload was being read.
    Torn { slot: u64 },
    /// The consumer's `received` count went backwards or past what was sent.
    BadAck { received: u64, sent: u64 },
    /// The peer is down (its guest died; a new incarnation is not up yet).
    PeerGone,
    /// The channel was reset into a new epoch: resynchronise (new sender and receiver).
    Reset,
}

/// Bits of a control word or `received` count below the epoch tag.
const COUNT_BITS: u32 = 48;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// The tag of epoch `epoch` as it sits in the top bits of a word.
const fn tag_of(epoch: u32) -> u64 {
    ((epoch & 0xffff) as u64) << COUNT_BITS
}

/// Whether `word` carries the tag of an epoch before the one tagged `tag` (in epoch 0 there
/// is none: every other tag there is corruption).
fn is_old(tag: u64, word: u64) -> bool {
    tag != 0 && word & !COUNT_MASK != tag
}

/// The sending end of a ring. Keeps its own count; never trusts the consumer's.
///
/// The hot path keeps the next slot (a pointer into the ring, advanced and wrapped), the
/// next control word and the last control word the consumer's count allows, so that a send
/// that finds room does no division, no tag arithmetic and no bounds check.
pub struct Sender<'a> {
    ring: Ring<'a>,
    /// The next slot: always inside `ring.slots`.
    cur: *const Slot,
    /// Just past the last slot (where `cur` wraps).
    end: *const Slot,
    /// `tag | (sent + 1)`: the control word of the next message.
    word: u64,
    /// `tag | (acked + slots)`: the control word of the last message the consumer's last
    /// count leaves room for (`tag` alone until `heard`).
    limit: u64,
    acked: u64,
    tag: u64,
    /// Whether the consumer has published a count of this epoch (its receiver exists:
    /// [`Receiver::with_epoch`]). Until then a sender of an epoch after the first sends
    /// nothing (`Full`): the consumer may be a survivor of the last epoch still about to
    /// write a late reply into this ring's slots ([`CALL`]), which it does before it
    /// makes its receiver of this epoch. Always true in epoch 0 (no earlier epoch).
    heard: bool,
    /// Replies this side wrote into the peer's request slots ([`Receiver::reply`] counts
    /// them here, in this ring's producer line).
    replied: u64,
    /// The slot of the last call ([`Sender::try_call`]) and its word without the flag.
    call: *const Slot,
    call_word: u64,
    /// Whether the caller gave up waiting for that call's reply ([`Sender::give_up_call`]):
    /// its slot is not written again until [`Sender::settle_call`] says the reply can no
    /// longer land there.
    held: bool,
}

/// The receiving end of a ring.
///
/// As the sender, it keeps the next slot and the control word it expects there, and counts
/// down to its next publication of `received` instead of dividing.
pub struct Receiver<'a> {
    ring: Ring<'a>,
    /// The next slot: always inside `ring.slots`.
    cur: *const Slot,
    /// Just past the last slot (where `cur` wraps).
    end: *const Slot,
    /// `tag | (received + 1)`: the control word of the next message.
    expected: u64,
    /// Messages to take before `received` is published again (`ack_every` when the
    /// published count is up to date).
    ack_left: u64,
    ack_every: u64,
    tag: u64,
    /// The control word of the last message taken (its slot is the one before `cur`): with
    /// [`CALL`] set, the reply is owed ([`Receiver::reply`] clears the flag).
    last_word: u64,
    /// Replies taken from this side's own request slots ([`Sender::poll_reply`] counts
    /// them here, in this ring's consumer line).
    replies_taken: u64,
}

// The raw slot pointers point into the ring the `Ring<'a>` borrows (shared atomics,
// `Sync`); an end is used by one thread at a time, like one holding the `Ring`.
// SAFETY: as just said, moving an end to another thread is moving its only user.
unsafe impl Send for Sender<'_> {}
// SAFETY: as for `Sender`.
unsafe impl Send for Receiver<'_> {}

impl<'a> Ring<'a> {
    /// The slot after `cur`, `end` being just past the last slot (wrapping there).
    #[inline(always)]
    fn after(&self, cur: *const Slot, end: *const Slot) -> *const Slot {
        let next = cur.wrapping_add(1);
        if next == end {
            self.slots.as_ptr()
        } else {
            next
        }
    }

    /// Slot `cur`'s index (for errors and the cold paths).
    fn index(&self, cur: *const Slot) -> usize {
        (cur as usize - self.slots.as_ptr() as usize) / core::mem::size_of::<Slot>()
    }
}

impl<'a> Sender<'a> {
    pub fn new(ring: Ring<'a>) -> Self {
        Self::with_epoch(ring, 0)
    }

    /// A sender for epoch `epoch` of the channel (counting from 0), on reset rings. After
    /// epoch 0 it writes its first message only once the consumer's receiver of this epoch
    /// has published its count (`Full` until then): a survivor's late reply of the last
    /// epoch, which goes into this ring's slots, is over by then.
    pub fn with_epoch(ring: Ring<'a>, epoch: u32) -> Self {
        let tag = tag_of(epoch);
        let n = ring.slots.len() as u64;
        let (cur, end) = (ring.slots.as_ptr(), ring.slots.as_ptr_range().end);
        Sender {
            ring,
            cur,
            end,
            word: tag | 1,
            // Epoch 0 has no earlier epoch: no late writer to wait out.
            limit: if tag == 0 { n } else { tag },
            acked: 0,
            tag,
            heard: tag == 0,
            replied: 0,
            call: cur,
            call_word: 0,
            held: false,
        }
    }

    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        (self.word & COUNT_MASK) - 1
    }

    fn is_old(&self, word: u64) -> bool {
        is_old(self.tag, word)
    }

    /// Sends `msg`, or `Full` (the consumer's count is read only when this side's own count
    /// says the ring may be full).
    #[inline(always)]
    pub fn try_send(&mut self, msg: &Payload) -> Result<(), ChannelError> {
        self.put(msg, 0)
    }

    /// Sends `msg` as a call ([`CALL`]): the receiver writes its reply into the same slot,
    /// which [`Sender::poll_reply`] waits for. `Full` as [`Sender::try_send`], and while a
    /// call given up is held ([`Sender::call_held`]: one call at a time, the held call's
    /// slot and word are kept until [`Sender::settle_call`] frees them).
    #[inline(always)]
    pub fn try_call(&mut self, msg: &Payload) -> Result<(), ChannelError> {
        if self.held {
            return Err(ChannelError::Full);
        }
        self.call = self.cur;
        self.call_word = self.word;
        let r = self.put(msg, CALL);
        if r.is_err() {
            // Only a call sent is outstanding (`call_pending`).
            self.call_word = 0;
        }
        r
    }

    /// The send: the payload, then the control word (`flags` on it) with release.
    #[inline(always)]
    fn put(&mut self, msg: &Payload, flags: u64) -> Result<(), ChannelError> {
        if self.word > self.limit {
            self.refresh_acked()?;
        }
        // SAFETY: `cur` is always a slot of the ring (set from it, advanced by `after`).
        let slot = unsafe { &*self.cur };
        for (w, v) in slot.data.iter().zip(msg) {
            w.store(*v, Ordering::Relaxed);
        }
        slot.control.store(self.word | flags, Ordering::Release);
        // The count with the epoch tag, as `received` (`Ring::sent` takes the tag off).
        self.ring.producer.sent.store(self.word, Ordering::Relaxed);
        self.word += 1;
        self.cur = self.ring.after(self.cur, self.end);
        Ok(())
    }

    /// The ring looked full: reads the consumer's count; `Full` if it still is.
    #[cold]
    #[inline(never)]
    fn refresh_acked(&mut self) -> Result<(), ChannelError> {
        let n = self.ring.slots.len() as u64;
        let next = self.sent();
        let word = self.ring.consumer.received.load(Ordering::Acquire);
        // A reset count (0) or an earlier epoch's (written late) says nothing about
        // this one.
        let fresh = word != 0 && !self.is_old(word);
        let r = if fresh { word ^ self.tag } else { self.acked };
        if r > next || r < self.acked {
            return Err(ChannelError::BadAck { received: r, sent: next });
        }
        if !self.heard {
            // No receiver of this epoch yet: the last epoch's may still write late.
            if !fresh {
                return Err(ChannelError::Full);
            }
            self.heard = true;
        }
        self.acked = r;
        self.limit = self.tag | (r + n);
        if next - r >= n {
            return Err(ChannelError::Full);
        }
        if self.held {
            // A call given up: its slot stays the reply's until `settle_call` frees it.
            self.limit = self.limit.min(self.call_word + n - 1);
            if self.word > self.limit {
                return Err(ChannelError::Full);
            }
        }
        Ok(())
    }

    /// Whether a call ([`Sender::try_call`]) is outstanding: sent, its reply not taken.
    pub fn call_pending(&self) -> bool {
        self.call_word != 0
    }

    /// Whether a call was given up ([`Sender::give_up_call`]) and is not settled yet.
    pub fn call_held(&self) -> bool {
        self.held
    }

    /// The caller stops waiting for the outstanding call's reply (a deadline passed). The
    /// peer may still write the reply into the call's slot, at any time, so that slot is
    /// not written again (sends that would reuse it get `Full`) until
    /// [`Sender::settle_call`] finds the reply there (and discards it) or finds that the
    /// peer has taken a later message (an honest peer then owes nothing: its reply goes
    /// into the slot of the last message it took, `Receiver::reply`). Nothing with no call
    /// outstanding.
    ///
    /// The limit the hot path compares with needs no change here: it was computed from a
    /// count read before the call was sent (at most the call's sequence less one), so it
    /// stops the sends at the call's slot or before, and every later computation of it
    /// (`refresh_acked`) holds it below the slot while the call is held.
    #[cold]
    pub fn give_up_call(&mut self) {
        self.held = self.call_word != 0;
    }

    /// Settles a call given up ([`Sender::give_up_call`]), if it can be: its reply, if it
    /// is in the slot, is taken as [`Sender::poll_reply`] takes one (checked and counted
    /// in `rx`) and discarded; or the peer's count says it took a later message (no reply
    /// can come). Then the slot is free again and `true`; `false` while the reply may
    /// still come (or with no call given up: `true`). An error is the reply's
    /// (`Torn`), a slot word that is neither the call, its reply nor a reset (`Corrupt`),
    /// or a count past what was sent or gone backwards (`BadAck`, as the flow control
    /// reads it); the call stays held then.
    #[cold]
    #[inline(never)]
    pub fn settle_call(&mut self, rx: &mut Receiver<'_>) -> Result<bool, ChannelError> {
        if !self.held {
            return Ok(true);
        }
        let mut discard = [0u64; WORDS];
        // The peer's count before the slot (acquire): a reply it wrote before it took a
        // later message is then seen in the slot below and taken (counted), not left there
        // uncounted under a count that frees the slot.
        let word = self.ring.consumer.received.load(Ordering::Acquire);
        let settled = match self.poll_reply(rx, 1, &mut discard, || {}) {
            Some(r) => {
                r?;
                true
            }
            None => {
                self.not_replied()?;
                // A reset count (0) or an earlier epoch's says nothing; one the flow
                // control refuses (`refresh_acked`) frees nothing either.
                if word == 0 || self.is_old(word) {
                    false
                } else {
                    let (r, sent) = (word ^ self.tag, self.sent());
                    if r > sent || r < self.acked {
                        return Err(ChannelError::BadAck { received: r, sent });
                    }
                    // The peer's count past the call: it took a later message.
                    r > self.call_word & COUNT_MASK
                }
            }
        };
        if settled {
            // The limit stays where the hold left it: the next send past it reads the
            // count again (`refresh_acked`), without the hold.
            self.held = false;
            self.call_word = 0;
        }
        Ok(settled)
    }

    /// The cache line of the last message sent (none yet: the first slot's).
    pub fn last_line(&self) -> *const u8 {
        let n = self.ring.slots.len() as u64;
        let last = (self.sent() + n - 1) % n;
        &self.ring.slots[last as usize] as *const Slot as *const u8
    }

    /// Stores the last message's control word again, the same value (nothing if none was
    /// sent): a second store into its line that changes nothing a receiver can see (the
    /// slot cannot have been reused: only this side writes it, and it has not sent since;
    /// the store is a compare-exchange of the word with itself, so the reply to a call,
    /// which the receiver writes into the slot, is never overwritten: the exchange then
    /// fails and stores nothing new). For a waiter's monitor that missed the first store
    /// (see the guest's `Chan`).
    pub fn restore_last(&self) {
        let sent = self.sent();
        if sent == 0 {
            return;
        }
        let n = self.ring.slots.len() as u64;
        let slot = &self.ring.slots[((sent - 1) % n) as usize];
        let last = self.word - 1;
        let word = if self.call_word == last { last | CALL } else { last };
        let _ = slot.control.compare_exchange(word, word, Ordering::Release, Ordering::Relaxed);
    }

    /// Polls the last call's slot ([`Sender::try_call`]) until the reply's word is there,
    /// at most `polls` times (at least once; `pause` between polls), and takes the reply as
    /// [`Receiver::poll_take`] takes a message: the payload copied straight into `out`, the
    /// word re-read after an acquire fence (`Torn` if it changed: only a peer writing what
    /// it should not does that), the reply counted in `rx`'s consumer line (the ring the
    /// peer's ordinary messages come on; statistics). `None` if it did not come.
    ///
    /// Only for a call outstanding (after [`Sender::try_call`], until a reply is taken, as
    /// [`crate::endpoint::LinkWatch::call`] uses it): with none, it polls for the word
    /// `REPLY` alone (count 0, which no honest reply carries) and would take it from a
    /// peer that writes it.
    #[inline(always)]
    pub fn poll_reply(
        &mut self,
        rx: &mut Receiver<'_>,
        polls: u32,
        out: &mut Payload,
        mut pause: impl FnMut(),
    ) -> Option<Result<(), ChannelError>> {
        let want = self.call_word | REPLY;
        // SAFETY: `call` is always a slot of the ring (set from `cur`).
        let slot = unsafe { &*self.call };
        let mut left = polls.max(1);
        while slot.control.load(Ordering::Acquire) != want {
            left -= 1;
            if left == 0 {
                return None;
            }
            pause();
        }
        for (v, w) in out.iter_mut().zip(&slot.data) {
            *v = w.load(Ordering::Relaxed);
        }
        fence(Ordering::Acquire);
        if slot.control.load(Ordering::Relaxed) != want {
            return Some(Err(ChannelError::Torn { slot: self.ring.index(self.call) as u64 }));
        }
        // The call is answered: a second reply would be corruption.
        self.call_word = 0;
        rx.replies_taken += 1;
        rx.ring.consumer.replies_taken.store(rx.tag | rx.replies_taken, Ordering::Relaxed);
        Some(Ok(()))
    }

    /// What is in the last call's slot when [`Sender::poll_reply`] found no reply: the
    /// request still unanswered (or a zeroed or earlier epoch's word: a reset, which the
    /// link word will say; or the reply, arrived since), or corruption.
    pub fn not_replied(&self) -> Result<(), ChannelError> {
        // SAFETY: as in `poll_reply`.
        let c = unsafe { &*self.call }.control.load(Ordering::Acquire);
        let w = self.call_word;
        if w != 0 && (c == w | CALL || c == w | REPLY) || c == 0 || self.is_old(c) {
            Ok(())
        } else {
            Err(ChannelError::Corrupt {
                slot: self.ring.index(self.call) as u64,
                expected: w | REPLY,
                found: c,
            })
        }
    }

    /// Whether the consumer said it is going to sleep (then it wants a doorbell).
    pub fn peer_sleeping(&self) -> bool {
        self.peer_sleep() != 0
    }

    /// How the consumer said it sleeps: 0 (awake), [`SLEEP_DOORBELL`] or [`SLEEP_MWAIT`]
    /// (anything else a peer wrote: treat as a doorbell sleeper).
    pub fn peer_sleep(&self) -> u64 {
        // Pairs with the consumer's SeqCst fence after its store, before its final re-check
        // (Dekker): either we see it sleeping, or it sees our message.
        fence(Ordering::SeqCst);
        self.peer_sleep_now()
    }

    /// The consumer's `sleeping` word again, without the fence: for a sender that already
    /// made its decision with [`Sender::peer_sleep`] and now waits for the word to clear.
    pub fn peer_sleep_now(&self) -> u64 {
        self.ring.consumer.sleeping.load(Ordering::Relaxed)
    }
}

impl<'a> Receiver<'a> {
    /// `ack_every`: how many messages between publications of `received` (1 = each).
    pub fn new(ring: Ring<'a>, ack_every: u32) -> Self {
        Self::with_epoch(ring, ack_every, 0)
    }

    /// A receiver for epoch `epoch` of the channel (see [`Sender::with_epoch`]). After
    /// epoch 0 it publishes the count 0 of its epoch at once: the peer's sender of this
    /// epoch waits for it.
    pub fn with_epoch(ring: Ring<'a>, ack_every: u32, epoch: u32) -> Self {
        let ack_every = (ack_every as u64).clamp(1, ring.slots.len().max(1) as u64);
        let tag = tag_of(epoch);
        if tag != 0 {
            // The count 0 of this epoch, with release: what this side wrote in the last
            // epoch (a late reply into a request's slot of this very ring) is done before
            // the peer's sender of this epoch, which waits for this word, writes a slot.
            ring.consumer.received.store(tag, Ordering::Release);
        }
        Receiver {
            ring,
            cur: ring.slots.as_ptr(),
            end: ring.slots.as_ptr_range().end,
            expected: tag | 1,
            ack_left: ack_every,
            ack_every,
            tag,
            last_word: 0,
            replies_taken: 0,
        }
    }

    /// Messages received so far.
    pub fn received(&self) -> u64 {
        (self.expected & COUNT_MASK) - 1
    }

    /// The next message, `Ok(None)` if there is none yet. A receive that finds the ring
    /// empty also publishes the count if messages were taken since the last publication:
    /// the count is exact whenever the receiver looks and finds nothing (it waits), and
    /// lags by at most `ack_every - 1` while it drains a backlog.
    #[inline(always)]
    pub fn try_recv(&mut self) -> Result<Option<Payload>, ChannelError> {
        match self.take() {
            Some(r) => r.map(Some),
            None => self.not_next().map(|()| None),
        }
    }

    /// The next message if its control word is in the next slot (`Torn` if that word
    /// changed during the copy); `None` if the slot holds anything else, which is not
    /// looked at further ([`Receiver::not_next`] does): the hot path of a receive.
    #[inline(always)]
    pub fn take(&mut self) -> Option<Result<Payload, ChannelError>> {
        // The slot in a local (as in `poll_take`); the word found is the expected one
        // from the compare on, so `c` stands for it (an empty poll stays one load of the
        // slot pointer, one of the word and one compare with the expected word in place).
        let cur = self.cur;
        // SAFETY: `cur` is always a slot of the ring (set from it, advanced by `after`).
        let slot = unsafe { &*cur };
        let c = slot.control.load(Ordering::Acquire);
        if c | CALL != self.expected | CALL {
            return None;
        }
        let mut msg = [0u64; WORDS];
        Some(self.take_at(cur, c, &mut msg).map(|()| msg))
    }

    /// After taking the message with control word `c` (`tag | received` now): publishes
    /// the count when `ack_every` messages were taken since it last did. Every message
    /// (the channel library's setting, and the hypervisor's): one store, no countdown.
    #[inline(always)]
    fn taken(&mut self, c: u64) {
        if self.ack_every == 1 {
            self.ring.consumer.received.store(c, Ordering::Release);
            return;
        }
        self.ack_left -= 1;
        if self.ack_left == 0 {
            self.ring.consumer.received.store(c, Ordering::Release);
            self.ack_left = self.ack_every;
        }
    }

    /// Polls the next slot until its control word is the next message's, at most `polls`
    /// times (at least once), running `pause` after each poll that finds nothing but the
    /// last; whether it came. Each poll is one load and one compare (the slot and the word
    /// it waits for are kept in registers, as a bare ring's receiver keeps them): the wait
    /// of a blocking receive. The load that finds the word is an acquire load (a plain
    /// load on x86-64); take the message with [`Receiver::take`] (which loads the word
    /// again), or poll and take in one with [`Receiver::poll_take`] (which does not). It
    /// says nothing of any other word in the slot; classify a slot that never gets it with
    /// [`Receiver::not_next`].
    #[inline(always)]
    pub fn poll(&self, polls: u32, mut pause: impl FnMut()) -> bool {
        // `cur` always points at a slot of this receiver's ring (moved only by `Ring::after`).
        // SAFETY: `cur` is a valid slot of the ring, which outlives `self`.
        let control = unsafe { &(*self.cur).control };
        let want = self.expected | CALL;
        let mut left = polls.max(1);
        loop {
            if control.load(Ordering::Acquire) | CALL == want {
                return true;
            }
            left -= 1;
            if left == 0 {
                return false;
            }
            pause();
        }
    }

    /// Takes the message [`Receiver::poll`] just found (it returned `true`), copying its
    /// payload straight into `out`: the second half of [`Receiver::take`], whose first
    /// acquire load of the control word the poll made. The copy is checked as there: the
    /// control word is re-read after it (acquire fence), and a word that changed since the
    /// poll saw it makes the receive `Torn` (only a peer writing what it should not does
    /// that; `out` then holds whatever was read, and nothing is taken). The message moves
    /// once, from the slot to where the caller wants it.
    ///
    /// Only right after a `poll` of this receiver that returned `true`: the seqlock needs
    /// that acquire load to have seen the word *before* the copy (without it, a message
    /// written during the copy would pass the re-read half copied). Hence for the tests
    /// only (they change the word between the poll and the take); a receiver polls and
    /// takes with [`Receiver::poll_take`], which makes both.
    #[cfg(test)]
    pub(crate) fn take_polled(&mut self, out: &mut Payload) -> Result<(), ChannelError> {
        // The slot and the word in locals, read before the copy: the compiler cannot tell
        // that the stores into `out` leave `self` alone, and would load them again.
        // (The tests' messages are plain: the word the poll found is the expected one.)
        let (cur, c) = (self.cur, self.expected);
        self.take_at(cur, c, out)
    }

    /// Polls as [`Receiver::poll`] and takes the message it finds, in one: polls up to
    /// `polls` times (`pause` between polls) and, when the word comes, copies the payload
    /// straight into `out`, re-reads the word after an acquire fence (`Torn` if it changed:
    /// only a peer writing what it should not does that; `out` then holds whatever was
    /// read, and nothing is taken), advances and publishes the count (`None` if the word
    /// did not come). The poll's acquire load is the take's first: no second load and
    /// compare, and the message moves once, from the slot to where the caller wants it. The slot and the word it waits for stay in registers from the first
    /// poll to the count's publication.
    #[inline(always)]
    pub fn poll_take(
        &mut self,
        polls: u32,
        out: &mut Payload,
        mut pause: impl FnMut(),
    ) -> Option<Result<(), ChannelError>> {
        let (cur, want) = (self.cur, self.expected | CALL);
        // SAFETY: as in `take`.
        let control = unsafe { &(*cur).control };
        let mut left = polls.max(1);
        let c = loop {
            let c = control.load(Ordering::Acquire);
            if c | CALL == want {
                break c;
            }
            left -= 1;
            if left == 0 {
                return None;
            }
            pause();
        };
        Some(self.take_at(cur, c, out))
    }

    /// Takes the message whose word `c` (the expected one, perhaps with [`CALL`]) an
    /// acquire load just found in slot `cur` (the next slot), into `out`: the copy, the
    /// re-read, the advance, the count; a call's slot and word are kept for the reply.
    #[inline(always)]
    fn take_at(&mut self, cur: *const Slot, c: u64, out: &mut Payload) -> Result<(), ChannelError> {
        // SAFETY: `cur` is the next slot (the caller read it from `self.cur`).
        let slot = unsafe { &*cur };
        for (v, w) in out.iter_mut().zip(&slot.data) {
            *v = w.load(Ordering::Relaxed);
        }
        fence(Ordering::Acquire);
        if slot.control.load(Ordering::Relaxed) != c {
            return Err(self.torn());
        }
        let seq = c & !CALL;
        self.expected = seq + 1;
        self.last_word = c;
        self.cur = self.ring.after(cur, self.end);
        self.taken(seq);
        Ok(())
    }

    /// Whether the last message taken was a call whose reply is not written yet: then this
    /// side's next message on the channel is that reply ([`Receiver::reply`]).
    #[inline(always)]
    pub fn owes(&self) -> bool {
        self.last_word & CALL != 0
    }

    /// Writes `m` as the reply to the call taken last ([`Receiver::owes`]) into its slot:
    /// the payload, then the word `seq | REPLY` with release (the slot is the caller's
    /// again: it reads the reply and sends its next message into another slot, and into
    /// this one only after the ring has come round, which the count this side published
    /// when it took the request allows); the reply counted in `tx`'s producer line (the
    /// ring this side's ordinary messages go on; statistics). Returns whether a reply was
    /// owed (if not, nothing is written).
    #[inline(always)]
    pub fn reply(&mut self, tx: &mut Sender<'_>, m: &Payload) -> bool {
        if !self.owes() {
            return false;
        }
        // The call's slot: the one before `cur` (a take since would have replaced the word
        // that says the reply is owed).
        let cur = self.cur;
        let last = if cur == self.ring.slots.as_ptr() {
            self.end.wrapping_sub(1)
        } else {
            cur.wrapping_sub(1)
        };
        // `cur` is a slot of the ring, and so is the one before it (wrapping to the last).
        // SAFETY: `last` is a slot of the ring (above).
        let slot = unsafe { &*last };
        for (w, v) in slot.data.iter().zip(m) {
            w.store(*v, Ordering::Relaxed);
        }
        let word = self.last_word & !CALL;
        slot.control.store(word | REPLY, Ordering::Release);
        self.last_word = word;
        tx.replied += 1;
        tx.ring.producer.replied.store(tx.tag | tx.replied, Ordering::Relaxed);
        true
    }

    /// What is in the next slot when [`Receiver::take`] found no message there: empty (the
    /// previous lap's message; 0: nothing yet, or the rings were reset under this side,
    /// which its link word will say; a word an earlier epoch wrote late; or the next
    /// message, arrived since), or corruption. An empty ring publishes a pending count.
    #[inline]
    pub fn not_next(&mut self) -> Result<(), ChannelError> {
        // SAFETY: as in `take`.
        let c = unsafe { &*self.cur }.control.load(Ordering::Acquire);
        let n = self.ring.slots.len() as u64;
        let empty = if self.received() >= n { self.expected - n } else { 0 };
        // The previous lap's word (none on the first lap) may carry a call's flag (a call
        // this side never answered) or be the reply to it.
        let lap = c == empty || empty != 0 && (c == empty | CALL || c == empty | REPLY);
        if lap || c == 0 || c | CALL == self.expected | CALL || is_old(self.tag, c) {
            if self.ack_left != self.ack_every {
                self.flush_ack();
            }
            Ok(())
        } else {
            Err(self.corrupt(c))
        }
    }

    #[cold]
    fn corrupt(&self, found: u64) -> ChannelError {
        let slot = self.ring.index(self.cur) as u64;
        ChannelError::Corrupt { slot, expected: self.expected, found }
    }

    #[cold]
    fn torn(&self) -> ChannelError {
        ChannelError::Torn { slot: self.ring.index(self.cur) as u64 }
    }

    /// The cache line the next message will be written to (its slot): what a receiver
    /// waiting with MONITOR/MWAIT arms the monitor on. The sender's first store into it
    /// wakes the waiter.
    pub fn next_line(&self) -> *const u8 {
        self.cur as *const u8
    }

    /// Publishes the received count if this side has caught up with the sender (the next
    /// slot does not hold the next message yet) and has not published it already. Since
    /// [`Receiver::try_recv`] publishes a pending count when it finds the ring empty, a
    /// caller needs this only to make the count exact right after taking a message,
    /// before it looks again. Publishing more often than `ack_every` is always allowed: the
    /// sender takes any count between what it knew and what it sent. Returns whether it
    /// published.
    #[inline]
    pub fn ack_if_caught_up(&mut self) -> bool {
        if self.ack_left == self.ack_every {
            return false; // published already
        }
        // SAFETY: as in `take`.
        let c = unsafe { &*self.cur }.control.load(Ordering::Relaxed);
        if c == self.expected {
            return false; // more to come: the batch publishes it
        }
        self.flush_ack();
        true
    }

    /// Publishes the received count now (e.g. at the end, for statistics).
    pub fn flush_ack(&mut self) {
        self.ring.consumer.received.store(self.expected - 1, Ordering::Release);
        self.ack_left = self.ack_every;
    }

    /// Announces that this side is about to block (`true`) or is awake (`false`). After
    /// announcing sleep, call [`Receiver::try_recv`] once more before blocking: a sender
    /// that did not see the flag has published its message by then.
    pub fn set_sleeping(&self, on: bool) {
        self.set_sleep(if on { SLEEP_DOORBELL } else { 0 });
    }

    /// [`Receiver::set_sleeping`] with the way this side sleeps: 0 (awake),
    /// [`SLEEP_DOORBELL`] or [`SLEEP_MWAIT`].
    pub fn set_sleep(&self, how: u64) {
        self.ring.consumer.sleeping.store(how, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }
}

/// Owned ring storage for host tests, benchmarks and models.
pub struct OwnedRing {
    producer: ProducerLine,
    consumer: ConsumerLine,
    slots: alloc_free::Slots,
}

mod alloc_free {
    //! Storage without `alloc`: a fixed maximum, enough for tests and benchmarks.
    use super::{AtomicU64, Slot, WORDS};
    pub const MAX: usize = 1024;
    pub struct Slots(pub [Slot; MAX]);
    pub fn zeroed_slot() -> Slot {
        Slot {
            data: core::array::from_fn::<_, WORDS, _>(|_| AtomicU64::new(0)),
            control: AtomicU64::new(0),
        }
    }
}

impl OwnedRing {
    pub const MAX_SLOTS: usize = alloc_free::MAX;

    pub fn new() -> Self {
        OwnedRing {
            producer: ProducerLine {
                sent: AtomicU64::new(0),
                replied: AtomicU64::new(0),
                _pad: core::array::from_fn(|_| AtomicU64::new(0)),
            },
            consumer: ConsumerLine {
                received: AtomicU64::new(0),
                sleeping: AtomicU64::new(0),
                replies_taken: AtomicU64::new(0),
                _pad: core::array::from_fn(|_| AtomicU64::new(0)),
            },
            slots: alloc_free::Slots(core::array::from_fn(|_| alloc_free::zeroed_slot())),
        }
    }

    /// A ring view with the first `slots` slots (1..=MAX_SLOTS).
    pub fn ring(&self, slots: u32) -> Ring<'_> {
        let slots = (slots as usize).clamp(1, Self::MAX_SLOTS);
        Ring { producer: &self.producer, consumer: &self.consumer, slots: &self.slots.0[..slots] }
    }

    /// The raw slots, for tests that corrupt them on purpose.
    pub fn slot(&self, i: usize) -> &Slot {
        &self.slots.0[i]
    }

    pub fn consumer(&self) -> &ConsumerLine {
        &self.consumer
    }
}

impl Default for OwnedRing {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    fn msg(n: u64) -> Payload {
        core::array::from_fn(|i| n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64)
    }

    #[test]
    fn send_receive_wrap_full_empty() {
        let st = Box::new(OwnedRing::new());
        let (mut tx, mut rx) = (Sender::new(st.ring(4)), Receiver::new(st.ring(4), 1));
        assert_eq!(rx.try_recv(), Ok(None));
        for round in 0..5u64 {
            for i in 0..4 {
                tx.try_send(&msg(round * 4 + i)).unwrap();
            }
            assert_eq!(tx.try_send(&msg(99)), Err(ChannelError::Full));
            for i in 0..4 {
                assert_eq!(rx.try_recv(), Ok(Some(msg(round * 4 + i))));
            }
            assert_eq!(rx.try_recv(), Ok(None));
        }
        assert_eq!((st.ring(4).sent(), st.ring(4).received()), (20, 20));
    }

    #[test]
    fn restoring_the_last_control_word_changes_nothing() {
        let st = Box::new(OwnedRing::new());
        let (mut tx, mut rx) = (Sender::new(st.ring(2)), Receiver::new(st.ring(2), 1));
        tx.restore_last();
        assert_eq!(rx.try_recv(), Ok(None), "nothing sent: nothing stored");
        for i in 0..5 {
            tx.try_send(&msg(i)).unwrap();
            tx.restore_last();
            assert_eq!(tx.last_line(), st.slot(i as usize % 2) as *const Slot as *const u8);
            assert_eq!(rx.try_recv(), Ok(Some(msg(i))));
            tx.restore_last();
            assert_eq!(rx.try_recv(), Ok(None), "no message twice");
        }
    }

    /// Two ends of a channel over two rings: (client's sender, client's receiver,
    /// server's sender, server's receiver).
    fn channel(
        ab: &'static OwnedRing,
        ba: &'static OwnedRing,
        n: u32,
    ) -> (Sender<'static>, Receiver<'static>, Sender<'static>, Receiver<'static>) {
        (
            Sender::new(ab.ring(n)),
            Receiver::new(ba.ring(n), 1),
            Sender::new(ba.ring(n)),
            Receiver::new(ab.ring(n), 1),
        )
    }

    /// A call given up (`give_up_call`): its slot is not reused while the reply may come;
    /// the late reply is taken, counted and discarded, and the slot is free again; or the
    /// receiver's count past the request frees it (an honest receiver owes nothing then).
    #[test]
    fn a_call_given_up_keeps_its_slot_until_the_reply_can_no_longer_land() {
        for late_reply in [true, false] {
            let (ab, ba): (&'static OwnedRing, &'static OwnedRing) =
                (Box::leak(Box::new(OwnedRing::new())), Box::leak(Box::new(OwnedRing::new())));
            let (mut ctx, mut crx, mut stx, mut srx) = channel(ab, ba, 4);
            ctx.try_call(&msg(1)).unwrap();
            ctx.give_up_call();
            assert!(ctx.call_held() && ctx.call_pending());
            // The server takes the call (publishing its count: the slot would be free for
            // flow control) but has not answered yet.
            assert_eq!(srx.try_recv(), Ok(Some(msg(1))));
            assert!(srx.owes());
            for i in 2..=4 {
                ctx.try_send(&msg(i)).unwrap();
            }
            // The fifth message would go into the call's slot: held.
            assert_eq!(ctx.try_send(&msg(5)), Err(ChannelError::Full));
            assert_eq!(ctx.settle_call(&mut crx), Ok(false), "the reply may still come");
            assert_eq!(ctx.try_send(&msg(5)), Err(ChannelError::Full));
            if late_reply {
                // The late reply lands in the slot, untouched by any message.
                assert!(srx.reply(&mut stx, &msg(100)));
                assert_eq!(ab.slot(0).control.load(Ordering::Relaxed), 1 | REPLY);
            } else {
                // No reply: the server took a later message (it owes nothing now).
                assert_eq!(srx.try_recv(), Ok(Some(msg(2))));
                assert!(!srx.owes());
            }
            assert_eq!(ctx.settle_call(&mut crx), Ok(true));
            assert!(!ctx.call_held() && !ctx.call_pending());
            ctx.try_send(&msg(5)).unwrap();
            // Every message comes out whole and in order; the reply was counted taken.
            let first = if late_reply { 2 } else { 3 };
            for i in first..=5 {
                assert_eq!(srx.try_recv(), Ok(Some(msg(i))));
            }
            assert_eq!(crx.try_recv(), Ok(None), "the discarded reply is not a message");
            let (sent_b, taken_b) = (ba.ring(4).sent(), ba.ring(4).received());
            assert_eq!((sent_b, taken_b), if late_reply { (1, 1) } else { (0, 0) });
            assert_eq!((ab.ring(4).sent(), ab.ring(4).received()), (5, 5));
        }
    }

    /// The hold stops exactly at the call's slot: the message before it (a lap less one)
    /// goes, found by a count read while the call is held.
    #[test]
    fn a_call_given_up_holds_its_slot_and_not_the_one_before() {
        let (ab, ba): (&'static OwnedRing, &'static OwnedRing) =
            (Box::leak(Box::new(OwnedRing::new())), Box::leak(Box::new(OwnedRing::new())));
        let (mut ctx, mut crx, _stx, mut srx) = channel(ab, ba, 4);
        ctx.try_send(&msg(1)).unwrap();
        ctx.try_send(&msg(2)).unwrap();
        ctx.try_call(&msg(3)).unwrap();
        ctx.give_up_call();
        assert_eq!(srx.try_recv(), Ok(Some(msg(1))));
        ctx.try_send(&msg(4)).unwrap();
        // Read with the call held: the peer's count 1 allows message 5.
        ctx.try_send(&msg(5)).unwrap();
        assert_eq!(srx.try_recv(), Ok(Some(msg(2))));
        assert_eq!(srx.try_recv(), Ok(Some(msg(3))));
        assert!(srx.owes());
        // The peer's count 3 allows up to 7 but the call's slot is 7's: 6 goes, 7 waits.
        ctx.try_send(&msg(6)).unwrap();
        assert_eq!(ctx.try_send(&msg(7)), Err(ChannelError::Full));
        assert_eq!(ctx.settle_call(&mut crx), Ok(false));
        // The peer takes 4 (it owes nothing now): the slot is free.
        assert_eq!(srx.try_recv(), Ok(Some(msg(4))));
        assert_eq!(ctx.settle_call(&mut crx), Ok(true));
        ctx.try_send(&msg(7)).unwrap();
        for i in 5..=7 {
            assert_eq!(srx.try_recv(), Ok(Some(msg(i))));
        }
    }

    /// A call whose ring stays full is never sent, so there is nothing to give up; a
    /// forged slot word met while settling is corruption, not a free slot.
    #[test]
    fn settling_a_call_refuses_a_forged_word() {
        let (ab, ba): (&'static OwnedRing, &'static OwnedRing) =
            (Box::leak(Box::new(OwnedRing::new())), Box::leak(Box::new(OwnedRing::new())));
        let (mut ctx, mut crx, _stx, mut srx) = channel(ab, ba, 2);
        assert_eq!(ctx.settle_call(&mut crx), Ok(true), "nothing given up");
        ctx.give_up_call();
        assert!(!ctx.call_held(), "no call outstanding: nothing to hold");
        ctx.try_call(&msg(1)).unwrap();
        ctx.give_up_call();
        assert_eq!(srx.try_recv(), Ok(Some(msg(1))));
        ab.slot(0).control.store(7 | REPLY, Ordering::Relaxed);
        assert!(matches!(ctx.settle_call(&mut crx), Err(ChannelError::Corrupt { .. })));
        assert!(ctx.call_held(), "still held after a forged word");
    }

    /// A count the flow control refuses (`BadAck`: past what was sent, or backwards) does
    /// not free a held slot either: with the request already counted taken (`acked` at the
    /// call), freeing it would let the next send into the call's slot without reading the
    /// count again, where a late reply can still land. Failed before its fix: a count of
    /// 1000 (two messages sent) settled the call and message 3 went into its slot.
    #[test]
    fn settling_a_call_refuses_a_count_the_flow_control_refuses() {
        for (bad, fresh) in [(1000, 1000), (0, 0), (2 | tag_of(5), 2 | tag_of(5))] {
            let (ab, ba): (&'static OwnedRing, &'static OwnedRing) =
                (Box::leak(Box::new(OwnedRing::new())), Box::leak(Box::new(OwnedRing::new())));
            let (mut ctx, mut crx, _stx, mut srx) = channel(ab, ba, 2);
            ctx.try_call(&msg(1)).unwrap();
            ctx.give_up_call();
            assert_eq!(srx.try_recv(), Ok(Some(msg(1))));
            ctx.try_send(&msg(2)).unwrap();
            // The sender reads the count (1: the call taken) and keeps the call's slot.
            assert_eq!(ctx.try_send(&msg(3)), Err(ChannelError::Full));
            ab.consumer().received.store(bad, Ordering::Release);
            let got = ctx.settle_call(&mut crx);
            if fresh == 0 {
                // A zeroed count (a reset) says nothing: still held, no error.
                assert_eq!(got, Ok(false));
            } else {
                assert_eq!(got, Err(ChannelError::BadAck { received: fresh, sent: 2 }));
            }
            assert!(ctx.call_held(), "{bad:#x}: still held");
            assert_ne!(
                ctx.try_send(&msg(3)),
                Ok(()),
                "{bad:#x}: the call's slot stays the reply's"
            );
            assert_eq!(ab.slot(0).control.load(Ordering::Relaxed), 1 | CALL);
        }
    }

    /// A call on the bare sender while one given up is held (`Chan::tx` is public; the
    /// library's `call_until` settles first): `Full`, the held call untouched. Failed before
    /// its fix: the second call went and took over `call` and `call_word`, the hold moved
    /// to its slot, message 3 went into the first call's slot (server still owing its
    /// reply) and the late reply destroyed it.
    #[test]
    fn a_call_while_one_given_up_is_held_is_full() {
        let (ab, ba): (&'static OwnedRing, &'static OwnedRing) =
            (Box::leak(Box::new(OwnedRing::new())), Box::leak(Box::new(OwnedRing::new())));
        let (mut ctx, mut crx, mut stx, mut srx) = channel(ab, ba, 2);
        ctx.try_call(&msg(1)).unwrap();
        ctx.give_up_call();
        assert_eq!(srx.try_recv(), Ok(Some(msg(1))));
        assert_eq!(ctx.try_call(&msg(2)), Err(ChannelError::Full), "one call at a time");
        assert!(ctx.call_held() && ctx.call_pending());
        ctx.try_send(&msg(2)).unwrap();
        assert_eq!(ctx.try_send(&msg(3)), Err(ChannelError::Full), "the call's slot is held");
        assert!(srx.reply(&mut stx, &msg(100)));
        assert_eq!(ctx.settle_call(&mut crx), Ok(true));
        ctx.try_call(&msg(3)).unwrap();
        assert_eq!(srx.try_recv(), Ok(Some(msg(2))));
        assert_eq!(srx.try_recv(), Ok(Some(msg(3))));
        assert!(srx.owes() && srx.reply(&mut stx, &msg(300)));
        let mut out = [0; WORDS];
        assert_eq!(ctx.poll_reply(&mut crx, 1, &mut out, || {}), Some(Ok(())));
        assert_eq!(out, msg(300), "the second call's own reply");
        assert_eq!((ba.ring(2).sent(), ba.ring(2).received()), (2, 2));
    }

    /// What an honest caller that gives up calls and an honest, slow server do, in any
    /// order.
    #[derive(Debug, Clone)]
    enum Impatient {
        /// A plain send (`false`) or a call (`true`; only with no call waited for, after
        /// settling one given up, as `LinkWatch::call_until` does); after `Full`, a settle
        /// (as the library's blocking sends do).
        Send(bool),
        /// One look for the reply to the call waited for.
        Poll,
        /// The caller gives up the call it waits for.
        GiveUp,
        /// The server takes the next message (forgetting a reply it still owes).
        Take,
        /// The server answers the call it took last, if it owes the answer.
        Answer,
    }

    proptest! {
        /// An honest caller that gives up calls (`give_up_call`, `settle_call`) against an
        /// honest server that answers late or never (a later take forgets the answer):
        /// every message the server takes is the one sent, whole and in order (a late
        /// reply never lands on a message); every reply the caller takes is its own call's;
        /// nothing reports an error; once both are done (the server answers what it owes,
        /// the caller settles), every reply written was counted taken, once.
        #[test]
        fn a_late_reply_never_lands_on_a_message_nor_answers_another_call(
            slots in 1u32..5,
            epoch in 0u32..3,
            ops in prop::collection::vec(prop_oneof![
                3 => any::<bool>().prop_map(Impatient::Send),
                2 => Just(Impatient::Poll),
                1 => Just(Impatient::GiveUp),
                3 => Just(Impatient::Take),
                2 => Just(Impatient::Answer),
            ], 1..100),
        ) {
            let (ab, ba) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
            let mut srx = Receiver::with_epoch(ab.ring(slots), 1, epoch);
            let mut crx = Receiver::with_epoch(ba.ring(slots), 1, epoch);
            let mut ctx = Sender::with_epoch(ab.ring(slots), epoch);
            let mut stx = Sender::with_epoch(ba.ring(slots), epoch);
            let answer = |seq: u64| msg(1_000_000 + seq);
            let mut queue: VecDeque<u64> = VecDeque::new();
            // The call the caller waits for (its message number), and the server's last take.
            let mut waiting: Option<u64> = None;
            let mut taken_last = 0u64;
            let mut out = [0u64; WORDS];
            for op in ops {
                match op {
                    Impatient::Send(call) => {
                        if waiting.is_some() {
                            continue;
                        }
                        if call && ctx.call_held() && !ctx.settle_call(&mut crx).unwrap() {
                            continue;
                        }
                        let seq = ctx.sent();
                        let r = if call { ctx.try_call(&msg(seq)) } else { ctx.try_send(&msg(seq)) };
                        match r {
                            Ok(()) => {
                                queue.push_back(seq);
                                if call {
                                    waiting = Some(seq);
                                }
                            }
                            Err(ChannelError::Full) => {
                                prop_assert!(!(call && ctx.call_pending()), "a call not sent is not pending");
                                ctx.settle_call(&mut crx).unwrap();
                            }
                            Err(e) => prop_assert!(false, "{:?}", e),
                        }
                    }
                    Impatient::Poll => {
                        if let Some(seq) = waiting {
                            if let Some(r) = ctx.poll_reply(&mut crx, 1, &mut out, || {}) {
                                r.unwrap();
                                prop_assert_eq!(out, answer(seq), "the reply to another call");
                                waiting = None;
                            } else {
                                ctx.not_replied().unwrap();
                            }
                        }
                    }
                    Impatient::GiveUp => {
                        if waiting.take().is_some() {
                            ctx.give_up_call();
                            prop_assert!(ctx.call_held());
                        }
                    }
                    Impatient::Take => match srx.try_recv().unwrap() {
                        Some(m) => {
                            let seq = queue.pop_front();
                            prop_assert_eq!(Some(m), seq.map(msg), "a message overwritten");
                            taken_last = seq.unwrap();
                        }
                        None => prop_assert!(queue.is_empty(), "a message lost: {:?}", queue),
                    },
                    Impatient::Answer => {
                        if srx.owes() {
                            prop_assert!(srx.reply(&mut stx, &answer(taken_last)));
                        }
                    }
                }
            }
            // The end: the server answers what it owes, the caller takes or settles.
            if srx.owes() {
                prop_assert!(srx.reply(&mut stx, &answer(taken_last)));
            }
            if let Some(seq) = waiting {
                if let Some(r) = ctx.poll_reply(&mut crx, 1, &mut out, || {}) {
                    r.unwrap();
                    prop_assert_eq!(out, answer(seq));
                }
            }
            ctx.settle_call(&mut crx).unwrap();
            let b = ba.ring(slots);
            prop_assert_eq!(b.sent(), b.received(), "every reply written counted taken, once");
        }
    }

    #[test]
    fn a_calls_reply_comes_back_in_its_slot_and_is_counted() {
        let (ab, ba): (&'static OwnedRing, &'static OwnedRing) =
            (Box::leak(Box::new(OwnedRing::new())), Box::leak(Box::new(OwnedRing::new())));
        let (mut ctx, mut crx, mut stx, mut srx) = channel(ab, ba, 2);
        let mut out = [0; WORDS];
        for i in 0..5u64 {
            ctx.try_call(&msg(i)).unwrap();
            assert!(ctx.poll_reply(&mut crx, 3, &mut out, || {}).is_none(), "no reply yet");
            assert_eq!(ctx.not_replied(), Ok(()), "the request, unanswered");
            ctx.restore_last();
            assert_eq!(srx.try_recv(), Ok(Some(msg(i))), "a call is a message");
            assert!(srx.owes());
            assert_eq!(ctx.not_replied(), Ok(()));
            // A plain message between: the client's own ring, untouched by the reply.
            assert!(srx.reply(&mut stx, &msg(100 + i)));
            assert!(!srx.owes() && !srx.reply(&mut stx, &msg(7)), "one reply per call");
            ctx.restore_last();
            assert_eq!(
                ab.slot(i as usize % 2).control.load(Ordering::Relaxed),
                (i + 1) | REPLY,
                "restore_last leaves a reply alone"
            );
            assert_eq!(ctx.poll_reply(&mut crx, 1, &mut out, || {}), Some(Ok(())));
            assert_eq!(out, msg(100 + i));
            assert!(ctx.poll_reply(&mut crx, 1, &mut out, || {}).is_none(), "no reply twice");
            // The server's ring and the client's receiver saw nothing.
            assert_eq!(crx.try_recv(), Ok(None));
            assert_eq!(srx.try_recv(), Ok(None), "a replied slot of the last lap is empty");
        }
        // Counts: requests on ab, replies counted on ba, both exact.
        assert_eq!((ab.ring(2).sent(), ab.ring(2).received()), (5, 5));
        assert_eq!((ba.ring(2).sent(), ba.ring(2).received()), (5, 5));
        // Ordinary messages still flow both ways, and the counts add up.
        stx.try_send(&msg(9)).unwrap();
        assert_eq!(crx.try_recv(), Ok(Some(msg(9))));
        assert_eq!((ba.ring(2).sent(), ba.ring(2).received()), (6, 6));
    }

    #[test]
    fn a_call_refuses_a_forged_or_torn_reply_and_its_slot_reads_empty_next_lap() {
        let (ab, ba): (&'static OwnedRing, &'static OwnedRing) =
            (Box::leak(Box::new(OwnedRing::new())), Box::leak(Box::new(OwnedRing::new())));
        let (mut ctx, mut crx, _stx, mut srx) = channel(ab, ba, 2);
        let mut out = [0; WORDS];
        ctx.try_call(&msg(0)).unwrap();
        // A reply with another sequence, or flags both set, or a plain word: corruption.
        for bad in [2 | REPLY, 1 | REPLY | CALL, 2, 0xdead] {
            ab.slot(0).control.store(bad, Ordering::Relaxed);
            assert!(ctx.poll_reply(&mut crx, 1, &mut out, || {}).is_none());
            assert_eq!(
                ctx.not_replied(),
                Err(ChannelError::Corrupt { slot: 0, expected: 1 | REPLY, found: bad })
            );
        }
        // A reset (zeroed) slot is not corruption: the link word tells.
        ab.slot(0).control.store(0, Ordering::Relaxed);
        assert_eq!(ctx.not_replied(), Ok(()));
        // A plain receiver takes a call as a message; next lap, the slot's old word, with
        // the call's flag (never answered) or the reply's, is empty; other flags are not.
        ab.slot(0).control.store(1 | CALL, Ordering::Relaxed);
        assert_eq!(srx.try_recv(), Ok(Some(msg(0))));
        ctx.try_send(&msg(1)).unwrap();
        assert_eq!(srx.try_recv(), Ok(Some(msg(1))));
        for (word, ok) in [
            (1 | CALL, true),
            (1 | REPLY, true),
            (1, true),
            (1 | CALL | REPLY, false),
            (2 | REPLY, false),
        ] {
            ab.slot(0).control.store(word, Ordering::Relaxed);
            assert_eq!(srx.try_recv().is_ok(), ok, "{word:#x}");
        }
        // A call before the first lap is over: only the right word is the next message.
        ab.slot(0).control.store(3 | REPLY, Ordering::Relaxed);
        assert!(matches!(srx.try_recv(), Err(ChannelError::Corrupt { .. })));
    }

    #[test]
    fn corrupted_control_words_are_errors_never_messages() {
        let st = Box::new(OwnedRing::new());
        let (mut tx, mut rx) = (Sender::new(st.ring(8)), Receiver::new(st.ring(8), 1));
        tx.try_send(&msg(0)).unwrap();
        st.slot(0).control.store(0xdead_beef, Ordering::Relaxed);
        assert_eq!(
            rx.try_recv(),
            Err(ChannelError::Corrupt { slot: 0, expected: 1, found: 0xdead_beef })
        );
        // The error is stable: asking again does not skip the slot or hang.
        assert!(rx.try_recv().is_err());
        assert_eq!(rx.received(), 0);
        // A future lap's value is corruption too, not a message.
        st.slot(0).control.store(9, Ordering::Relaxed);
        assert!(matches!(rx.try_recv(), Err(ChannelError::Corrupt { .. })));
    }

    #[test]
    fn a_new_epoch_ignores_what_the_old_one_wrote_late() {
        let st = Box::new(OwnedRing::new());
        // Epoch 0 runs, then the rings are reset (zeroed) for epoch 1...
        let mut old_tx = Sender::new(st.ring(4));
        let mut old_rx = Receiver::new(st.ring(4), 1);
        for i in 0..3 {
            old_tx.try_send(&msg(i)).unwrap();
        }
        old_rx.try_recv().unwrap().unwrap();
        for i in 0..4 {
            st.slot(i).control.store(0, Ordering::Relaxed);
        }
        st.consumer().received.store(0, Ordering::Relaxed);
        let (mut tx, mut rx) =
            (Sender::with_epoch(st.ring(4), 1), Receiver::with_epoch(st.ring(4), 1, 1));
        assert_eq!(rx.try_recv(), Ok(None));
        // The new sender's first message, once it has read the new receiver's count 0
        // (after epoch 0 it waits for it: see `Sender::with_epoch`).
        tx.try_send(&msg(10)).unwrap();
        // ...and the old sides, not yet told, write once more: a message in slot 3 and an
        // ack of 3. Neither is read as the new epoch's.
        old_tx.try_send(&msg(99)).unwrap();
        st.consumer().received.store(3, Ordering::Relaxed);
        assert_eq!(old_rx.received(), 1);
        for i in 1..4 {
            tx.try_send(&msg(10 + i)).unwrap();
        }
        assert_eq!(tx.try_send(&msg(14)), Err(ChannelError::Full), "the old ack freed nothing");
        for i in 0..4 {
            assert_eq!(rx.try_recv(), Ok(Some(msg(10 + i))), "message {i} of the new epoch");
        }
        assert_eq!(rx.try_recv(), Ok(None));
        tx.try_send(&msg(14)).unwrap();
        assert_eq!(rx.try_recv(), Ok(Some(msg(14))));
        // Epochs wrap at 16 bits; a tagged count reads back without its tag.
        assert_eq!(st.ring(4).received(), 5);
        assert_eq!(tag_of(0x1_0003), tag_of(3));
    }

    #[test]
    fn a_lying_consumer_cannot_make_the_sender_overwrite() {
        let st = Box::new(OwnedRing::new());
        let mut tx = Sender::new(st.ring(2));
        tx.try_send(&msg(0)).unwrap();
        tx.try_send(&msg(1)).unwrap();
        st.consumer().received.store(5, Ordering::Relaxed);
        assert_eq!(tx.try_send(&msg(2)), Err(ChannelError::BadAck { received: 5, sent: 2 }));
    }

    #[test]
    fn memory_sizes_follow_the_layout() {
        // Two header lines, then one line per slot.
        assert_eq!(
            HEADER_BYTES,
            core::mem::size_of::<ProducerLine>() + core::mem::size_of::<ConsumerLine>()
        );
        assert_eq!(ring_bytes(1), 128 + 64);
        assert_eq!(ring_bytes(64), 128 + 64 * 64);
        assert_eq!(ring_bytes(4096), 128 + 4096 * 64);
        assert_eq!(ring_bytes(u32::MAX), 128 + 64 * u32::MAX as u64, "no 32-bit overflow");
        // Whole pages, the fewest that hold the ring.
        assert_eq!(ring_pages_bytes(1), 4096);
        assert_eq!(ring_pages_bytes(62), 4096, "128 + 62 * 64 is exactly one page");
        assert_eq!(ring_pages_bytes(63), 8192);
        assert_eq!(ring_pages_bytes(64), 8192);
        assert_eq!(ring_pages_bytes(4096), 4096 * 65);
        // Two rings, each on its own pages.
        assert_eq!(channel_bytes(1), 2 * 4096);
        assert_eq!(channel_bytes(64), 2 * 8192);
        assert_eq!(channel_bytes(4096), 2 * 4096 * 65);
        for slots in (1..=4096).chain([u32::MAX]) {
            let (ring, pages) = (ring_bytes(slots), ring_pages_bytes(slots));
            assert!(pages.is_multiple_of(4096) && pages >= ring && pages - ring < 4096);
            assert_eq!(channel_bytes(slots), 2 * pages);
        }
    }

    #[test]
    fn from_raw_lays_the_ring_out_as_documented() {
        #[repr(C, align(4096))]
        struct Mem([u8; 4096]);
        let mut mem = Box::new(Mem([0; 4096]));
        let base = mem.0.as_mut_ptr();
        // SAFETY: 4096-byte aligned, 384 bytes needed, used only through the ring meanwhile.
        let ring = unsafe { Ring::from_raw(base, 4) };
        assert_eq!(ring.slots(), 4);
        let (mut tx, mut rx) = (Sender::new(ring), Receiver::new(ring, 1));
        tx.try_send(&[0x1111; WORDS]).unwrap();
        tx.try_send(&[0x2222; WORDS]).unwrap();
        rx.try_recv().unwrap().unwrap();
        let word = |i: usize| u64::from_le_bytes(mem.0[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(word(0), 2, "line 0: sent");
        assert_eq!(word(8), 1, "line 1: received");
        // Slot 1 is line 3: seven payload words, then its control word (message 1 + 1).
        assert!((24..31).all(|i| word(i) == 0x2222));
        assert_eq!(word(31), 2);
        assert_eq!(word(23), 1, "slot 0's control word ends line 2");
    }

    #[test]
    fn counts_and_statistics() {
        let st = Box::new(OwnedRing::new());
        assert_eq!(st.ring(8).slots(), 8);
        assert_eq!(st.ring(0).slots(), 1, "a ring has at least one slot");
        assert_eq!(st.ring(u32::MAX).slots(), OwnedRing::MAX_SLOTS as u32);
        let (mut tx, mut rx) = (Sender::new(st.ring(8)), Receiver::new(st.ring(8), 1));
        for i in 0..6 {
            assert_eq!((tx.sent(), st.ring(8).sent()), (i, i), "sent is published per message");
            tx.try_send(&msg(i)).unwrap();
        }
        for i in 0..4 {
            assert_eq!((rx.received(), st.ring(8).received()), (i, i));
            rx.try_recv().unwrap().unwrap();
        }
        assert_eq!((tx.sent(), rx.received()), (6, 4));
        assert_eq!((st.ring(8).sent(), st.ring(8).received()), (6, 4));
    }

    #[test]
    fn received_is_published_every_ack_every_messages_and_on_flush() {
        let st = Box::new(OwnedRing::new());
        let (mut tx, mut rx) = (Sender::new(st.ring(8)), Receiver::new(st.ring(8), 3));
        for i in 0..8 {
            tx.try_send(&msg(i)).unwrap();
        }
        let mut published = vec![];
        for _ in 0..7 {
            rx.try_recv().unwrap().unwrap();
            published.push(st.ring(8).received());
        }
        assert_eq!(published, [0, 0, 3, 3, 3, 6, 6]);
        rx.flush_ack();
        assert_eq!(st.ring(8).received(), 7);
        // The sender sees only what was published: with 3 acknowledged, 3 slots are free.
        let st = Box::new(OwnedRing::new());
        let (mut tx, mut rx) = (Sender::new(st.ring(4)), Receiver::new(st.ring(4), 2));
        (0..4).for_each(|i| tx.try_send(&msg(i)).unwrap());
        rx.try_recv().unwrap().unwrap();
        assert_eq!(tx.try_send(&msg(4)), Err(ChannelError::Full), "nothing published yet");
        rx.try_recv().unwrap().unwrap();
        rx.try_recv().unwrap().unwrap();
        assert_eq!(st.ring(4).received(), 2);
        tx.try_send(&msg(4)).unwrap();
        tx.try_send(&msg(5)).unwrap();
        assert_eq!(tx.try_send(&msg(6)), Err(ChannelError::Full));
        rx.flush_ack();
        tx.try_send(&msg(6)).unwrap();
        assert_eq!(tx.try_send(&msg(7)), Err(ChannelError::Full));
    }

    #[test]
    fn ack_if_caught_up_publishes_only_an_empty_rings_count() {
        let st = Box::new(OwnedRing::new());
        let (mut tx, mut rx) = (Sender::new(st.ring(8)), Receiver::new(st.ring(8), 4));
        assert!(!rx.ack_if_caught_up(), "nothing taken: 0 is published");
        for i in 0..6 {
            tx.try_send(&msg(i)).unwrap();
        }
        let mut published = vec![];
        for _ in 0..6 {
            rx.try_recv().unwrap().unwrap();
            let did = rx.ack_if_caught_up();
            published.push((st.ring(8).received(), did));
        }
        // A backlog: batched (4); the last message empties the ring: exact.
        assert_eq!(
            published,
            [(0, false), (0, false), (0, false), (4, false), (4, false), (6, true)]
        );
        // Ping-pong: exact after every message.
        for i in 6..12 {
            tx.try_send(&msg(i)).unwrap();
            rx.try_recv().unwrap().unwrap();
            rx.ack_if_caught_up();
            assert_eq!(st.ring(8).received(), i + 1);
        }
        // In a later epoch, with the tag.
        let st = Box::new(OwnedRing::new());
        let (mut tx, mut rx) =
            (Sender::with_epoch(st.ring(8), 3), Receiver::with_epoch(st.ring(8), 4, 3));
        tx.try_send(&msg(0)).unwrap();
        tx.try_send(&msg(1)).unwrap();
        rx.try_recv().unwrap().unwrap();
        assert!(!rx.ack_if_caught_up());
        rx.try_recv().unwrap().unwrap();
        assert!(rx.ack_if_caught_up());
        assert_eq!(st.consumer().received.load(Ordering::Relaxed), tag_of(3) | 2);
    }

    #[test]
    fn ack_every_is_clamped_to_the_ring() {
        // 0 means every message; more than the ring holds would never free a slot, so it is
        // cut to the slot count.
        for (slots, asked, every) in [(4, 0, 1), (4, 1, 1), (4, 4, 4), (4, 5, 4), (4, 99, 4)] {
            let st = Box::new(OwnedRing::new());
            let (mut tx, mut rx) =
                (Sender::new(st.ring(slots)), Receiver::new(st.ring(slots), asked));
            let mut published = vec![];
            for i in 0..8 {
                tx.try_send(&msg(i)).unwrap();
                rx.try_recv().unwrap().unwrap();
                published.push(st.ring(slots).received());
            }
            let want: Vec<u64> = (1..=8).map(|n| n - n % every).collect();
            assert_eq!(published, want, "slots {slots}, ack_every {asked}");
        }
    }

    #[test]
    fn the_sender_reads_received_only_when_its_own_count_says_full() {
        // The consumer's line is not touched while the sender knows of free slots (no
        // cache-line traffic per message), so a lie there is not even looked at...
        let st = Box::new(OwnedRing::new());
        let mut tx = Sender::new(st.ring(4));
        tx.try_send(&msg(0)).unwrap();
        st.consumer().received.store(99, Ordering::Relaxed);
        tx.try_send(&msg(1)).unwrap();
        tx.try_send(&msg(2)).unwrap();
        tx.try_send(&msg(3)).unwrap();
        // ...until the sender needs it, and then it is refused.
        assert_eq!(tx.try_send(&msg(4)), Err(ChannelError::BadAck { received: 99, sent: 4 }));
        assert_eq!(tx.sent(), 4);
        // The same once the sender has seen progress: with 2 of 5 acknowledged it knows of
        // a free slot and does not look.
        let st = Box::new(OwnedRing::new());
        let mut tx = Sender::new(st.ring(4));
        (0..4).for_each(|i| tx.try_send(&msg(i)).unwrap());
        st.consumer().received.store(2, Ordering::Relaxed);
        tx.try_send(&msg(4)).unwrap();
        st.consumer().received.store(99, Ordering::Relaxed);
        tx.try_send(&msg(5)).unwrap();
        assert_eq!(tx.try_send(&msg(6)), Err(ChannelError::BadAck { received: 99, sent: 6 }));
    }

    #[test]
    fn a_received_count_going_backwards_is_bad_ack() {
        let st = Box::new(OwnedRing::new());
        let (mut tx, mut rx) = (Sender::new(st.ring(2)), Receiver::new(st.ring(2), 1));
        for i in 0..2 {
            tx.try_send(&msg(i)).unwrap();
        }
        rx.try_recv().unwrap().unwrap();
        rx.try_recv().unwrap().unwrap();
        tx.try_send(&msg(2)).unwrap(); // the sender has now seen received = 2
        tx.try_send(&msg(3)).unwrap();
        assert_eq!(tx.try_send(&msg(4)), Err(ChannelError::Full), "2 acknowledged, 4 sent");
        st.consumer().received.store(1, Ordering::Relaxed);
        assert_eq!(tx.try_send(&msg(4)), Err(ChannelError::BadAck { received: 1, sent: 4 }));
        // The limits themselves are honest: everything received, or nothing new.
        st.consumer().received.store(2, Ordering::Relaxed);
        assert_eq!(tx.try_send(&msg(4)), Err(ChannelError::Full));
        st.consumer().received.store(4, Ordering::Relaxed);
        tx.try_send(&msg(4)).unwrap();
        // One past what was sent is a lie.
        tx.try_send(&msg(5)).unwrap();
        st.consumer().received.store(7, Ordering::Relaxed);
        assert_eq!(tx.try_send(&msg(6)), Err(ChannelError::BadAck { received: 7, sent: 6 }));
        // A refused send stores nothing.
        assert_eq!(tx.sent(), 6);
        assert_eq!(st.slot(0).control.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn only_the_expected_value_is_a_message_and_only_the_last_lap_is_empty() {
        for slots in [1u32, 2, 3, 4, 8] {
            let n = slots as u64;
            for laps in 0..4u64 {
                let st = Box::new(OwnedRing::new());
                let (mut tx, mut rx) =
                    (Sender::new(st.ring(slots)), Receiver::new(st.ring(slots), 1));
                for i in 0..laps * n {
                    tx.try_send(&msg(i)).unwrap();
                    assert_eq!(rx.try_recv(), Ok(Some(msg(i))));
                }
                let next = laps * n; // message `next` goes in slot 0
                let expected = next + 1;
                let empty = if laps == 0 { 0 } else { expected - n };
                let control = &st.slot(0).control;
                assert_eq!(control.load(Ordering::Relaxed), empty);
                assert_eq!(rx.try_recv(), Ok(None));
                let mut bad = vec![expected + 1, expected + n, u64::MAX, empty + 1];
                // (0 is the reset state: empty in every lap, see the module header.)
                bad.extend([empty.wrapping_sub(1), empty.wrapping_sub(n)].iter().copied());
                for found in bad.into_iter().filter(|&v| v != empty && v != expected && v != 0) {
                    control.store(found, Ordering::Relaxed);
                    assert_eq!(
                        rx.try_recv(),
                        Err(ChannelError::Corrupt { slot: 0, expected, found }),
                        "slots {slots}, lap {laps}"
                    );
                }
                control.store(empty, Ordering::Relaxed);
                tx.try_send(&msg(next)).unwrap();
                assert_eq!(rx.try_recv(), Ok(Some(msg(next))));
                assert_eq!(rx.received(), next + 1);
            }
        }
        // The error names the slot: message 5 of a 4-slot ring is in slot 1.
        let st = Box::new(OwnedRing::new());
        let (mut tx, mut rx) = (Sender::new(st.ring(4)), Receiver::new(st.ring(4), 1));
        for i in 0..5 {
            tx.try_send(&msg(i)).unwrap();
            rx.try_recv().unwrap().unwrap();
        }
        tx.try_send(&msg(5)).unwrap();
        st.slot(1).control.store(3, Ordering::Relaxed);
        assert_eq!(rx.try_recv(), Err(ChannelError::Corrupt { slot: 1, expected: 6, found: 3 }));
    }

    #[test]
    fn the_sleeping_flag() {
        let st = Box::new(OwnedRing::new());
        let (tx, rx) = (Sender::new(st.ring(4)), Receiver::new(st.ring(4), 1));
        assert!(!tx.peer_sleeping());
        rx.set_sleeping(true);
        assert_eq!(st.consumer().sleeping.load(Ordering::Relaxed), 1);
        assert!(tx.peer_sleeping());
        rx.set_sleeping(false);
        assert_eq!(st.consumer().sleeping.load(Ordering::Relaxed), 0);
        assert!(!tx.peer_sleeping());
        // Any non-zero value is asleep: the flag is the consumer's word, not a bool.
        st.consumer().sleeping.store(2, Ordering::Relaxed);
        assert!(tx.peer_sleeping());
        // How it sleeps: the doorbell or MWAIT; the sender reads the same word.
        for how in [SLEEP_MWAIT, SLEEP_DOORBELL, 0] {
            rx.set_sleep(how);
            assert_eq!((tx.peer_sleep(), tx.peer_sleep_now()), (how, how));
        }
        assert!(!tx.peer_sleeping());
    }

    /// How long a threaded test waits for one step (a message, a free slot, the other
    /// thread's end) before it fails: a broken ring fails the test instead of hanging it.
    const STALL: Duration = Duration::from_secs(5);

    /// Polls `f` until it gives a value, spinning first and then yielding the core (the
    /// test machine may have fewer free cores than threads); panics after [`STALL`].
    fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        for spins in 0u64.. {
            if let Some(v) = f() {
                return v;
            }
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
                assert!(start.elapsed() < STALL, "{what}: no progress in {STALL:?}");
            }
        }
        unreachable!()
    }

    /// Sends `m`, waiting for a free slot; any error but `Full` fails.
    fn send(tx: &mut Sender<'_>, m: &Payload, what: &str) {
        wait_for(what, || match tx.try_send(m) {
            Ok(()) => Some(()),
            Err(ChannelError::Full) => None,
            Err(e) => panic!("{what}: {e:?}"),
        })
    }

    /// The next message, waiting for it; an error fails.
    fn recv(rx: &mut Receiver<'_>, what: &str) -> Payload {
        wait_for(what, || rx.try_recv().unwrap_or_else(|e| panic!("{what}: {e:?}")))
    }

    /// Joins `h` within [`STALL`], passing its panic on.
    fn join_within(h: std::thread::JoinHandle<()>, what: &str) {
        wait_for(what, || h.is_finished().then_some(()));
        if let Err(e) = h.join() {
            std::panic::resume_unwind(e);
        }
    }

    /// Real threads, real cores: a ping-pong and a stream through two rings. Every wait is
    /// bounded by [`STALL`], so a ring that loses a message or an acknowledgement fails here
    /// within seconds.
    #[test]
    fn two_threads_ping_pong_and_stream() {
        let ab: &'static OwnedRing = Box::leak(Box::new(OwnedRing::new()));
        let ba: &'static OwnedRing = Box::leak(Box::new(OwnedRing::new()));
        const N: u64 = 20_000;
        const SLOTS: u32 = 64;
        let echo = std::thread::spawn(move || {
            let (mut tx, mut rx) =
                (Sender::new(ba.ring(SLOTS)), Receiver::new(ab.ring(SLOTS), SLOTS / 4));
            for got in 0..2 * N {
                let m = recv(&mut rx, "echo: waiting for a message");
                assert_eq!(m, msg(got));
                if got < N {
                    send(&mut tx, &m, "echo: waiting for a slot");
                }
            }
        });
        let (mut tx, mut rx) =
            (Sender::new(ab.ring(SLOTS)), Receiver::new(ba.ring(SLOTS), SLOTS / 4));
        for i in 0..N {
            send(&mut tx, &msg(i), "main: waiting for a slot");
            assert_eq!(recv(&mut rx, "main: waiting for the echo"), msg(i));
        }
        for i in N..2 * N {
            send(&mut tx, &msg(i), "main: waiting for a slot (stream)");
        }
        join_within(echo, "main: waiting for the echo thread to end");
        assert_eq!((tx.sent(), rx.received()), (2 * N, N));
    }

    /// A reset voids every control word before it wipes the rest: the messages waiting
    /// are gone (read as empty, not as corruption), and the payload words are untouched by
    /// this step (the wipe that follows clears them).
    #[test]
    fn voided_controls_read_as_empty() {
        let r = OwnedRing::new();
        let mut tx = Sender::new(r.ring(8));
        for i in 0..3 {
            tx.try_send(&message(i, 1)).unwrap();
        }
        r.ring(8).void_controls();
        assert!((0..8).all(|i| r.slot(i).control.load(Ordering::Relaxed) == 0));
        let payload =
            (0..8).flat_map(|i| r.slot(i).data.iter()).any(|w| w.load(Ordering::Relaxed) != 0);
        assert!(payload, "payload left for the wipe");
        let mut rx = Receiver::new(r.ring(8), 2);
        assert_eq!(rx.try_recv(), Ok(None));
    }

    /// A control word that changes while the payload is being copied is reported as torn
    /// (never as a message nor as corruption of the slot's value itself): one thread keeps
    /// flipping slot 0 between the expected value and garbage while receivers read it.
    #[test]
    fn a_control_word_changing_during_the_copy_is_torn() {
        let st: &'static OwnedRing = Box::leak(Box::new(OwnedRing::new()));
        let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        st.slot(0).control.store(1, Ordering::Relaxed);
        let flipper = std::thread::spawn(move || {
            let mut spins = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Each value stays a while, about as long as a receiver's copy.
                for v in [0x7777, 1] {
                    st.slot(0).control.store(v, Ordering::Relaxed);
                    (0..4).for_each(|_| std::hint::spin_loop());
                }
                spins += 1;
                if spins.is_multiple_of(4096) {
                    std::thread::yield_now();
                }
            }
        });
        // Stops the flipper however this test ends.
        struct Stop(&'static AtomicBool);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let stopper = Stop(stop);
        // No yielding here: a torn read needs both threads on a core at once, and a reader
        // that gives its core up whenever it fails would rarely be running (on a loaded
        // machine, for seconds). It takes milliseconds; the limit is for a broken ring, and
        // generous because on a loaded two-core machine the two threads can go seconds
        // without sharing the processors (10 s was once not enough there).
        let (start, limit) = (Instant::now(), Duration::from_secs(60));
        for tries in 1u64.. {
            // A fresh receiver each time, so it always expects message 0 in slot 0.
            match Receiver::new(st.ring(4), 1).try_recv() {
                Err(ChannelError::Torn { slot: 0 }) => break,
                // `Ok(None)`: `take` saw the garbage and `not_next` then saw the message
                // (it "arrived since"), which `try_recv` reports as nothing yet.
                Ok(Some(_) | None)
                | Err(ChannelError::Corrupt { slot: 0, expected: 1, found: 0x7777 }) => {}
                other => panic!("unexpected {other:?}"),
            }
            if tries.is_multiple_of(4096) {
                assert!(start.elapsed() < limit, "no torn read in {tries} tries ({limit:?})");
            }
        }
        drop(stopper);
        join_within(flipper, "waiting for the flipper");
    }

    // ---- From the hostile review of channels across restarts (each failed before its fix) ----

    /// Zeroes a ring as `guest::reset_rings` does.
    fn reset(st: &OwnedRing, slots: usize) {
        st.producer.sent.store(0, Ordering::Relaxed);
        st.consumer.received.store(0, Ordering::Relaxed);
        st.consumer.sleeping.store(0, Ordering::Relaxed);
        for i in 0..slots {
            for w in &st.slot(i).data {
                w.store(0, Ordering::Relaxed);
            }
            st.slot(i).control.store(0, Ordering::Relaxed);
        }
    }

    /// R1: an honest sender of epoch E (E != 1) whose ring is full when the rings are reset
    /// under it (it passed its link check, then was held while the peer's core reset)
    /// reports `BadAck`, a hard error, instead of anything benign; the guest library's
    /// `try_send` does not re-check the link word after an error (try_recv does).
    #[test]
    fn a_reset_under_a_full_sender_is_no_error() {
        for epoch in [0u32, 2, 5] {
            let st = Box::new(OwnedRing::new());
            let (mut tx, mut rx) =
                (Sender::with_epoch(st.ring(4), epoch), Receiver::with_epoch(st.ring(4), 1, epoch));
            for i in 0..4 {
                tx.try_send(&msg(i)).unwrap();
            }
            rx.try_recv().unwrap().unwrap(); // the consumer published 1
            for i in 4..5 {
                tx.try_send(&msg(i)).unwrap();
            }
            assert_eq!(tx.try_send(&msg(9)), Err(ChannelError::Full));
            reset(&st, 4);
            let r = tx.try_send(&msg(9));
            assert!(
                !matches!(r, Err(ChannelError::BadAck { .. })),
                "epoch {epoch}: a reset ring under an honest sender gives {r:?}"
            );
        }
    }

    /// R2: a receiver of epoch E whose rings are reset while it still runs in E (the link
    /// was given up on: the peer core did not ack in time / its ring was full) reads a
    /// zeroed slot as `Corrupt` once it is past the first lap (any E), and on the first lap
    /// unless E == 1.
    #[test]
    fn a_reset_under_a_live_receiver_reads_empty() {
        let st = Box::new(OwnedRing::new());
        let (mut tx, mut rx) =
            (Sender::with_epoch(st.ring(4), 3), Receiver::with_epoch(st.ring(4), 1, 3));
        for i in 0..6 {
            tx.try_send(&msg(i)).unwrap();
            rx.try_recv().unwrap().unwrap();
        }
        reset(&st, 4);
        let r = rx.try_recv();
        assert_eq!(r, Ok(None), "a reset ring under a live receiver gives {r:?}");
    }

    /// R3: the epoch jumps by two (both ends restarted, or the peer died twice before this
    /// side ran again): a late write of the survivor's epoch E lands in a ring of epoch
    /// E + 2, whose receiver calls it `Corrupt` (only E + 1 counts as "the previous epoch").
    #[test]
    fn a_late_write_two_epochs_back_reads_empty() {
        let st = Box::new(OwnedRing::new());
        // Epoch 4 runs: one message (its sender has heard its receiver's count).
        let (mut old, mut old_rx) =
            (Sender::with_epoch(st.ring(4), 4), Receiver::with_epoch(st.ring(4), 1, 4));
        old.try_send(&msg(0)).unwrap();
        assert_eq!(old_rx.try_recv(), Ok(Some(msg(0))));
        reset(&st, 4);
        let mut rx = Receiver::with_epoch(st.ring(4), 1, 6);
        let mut tx = Sender::with_epoch(st.ring(4), 6);
        tx.try_send(&msg(60)).unwrap();
        assert_eq!(rx.try_recv(), Ok(Some(msg(60))));
        old.try_send(&msg(1)).unwrap(); // the late store of epoch 4, in slot 1
        let r = rx.try_recv();
        assert_eq!(r, Ok(None), "a late write two epochs back gives {r:?}");
    }

    // ---- Hostile review of calls answered in the request's slot (CALL / REPLY) ----

    /// Zeroes a ring as `reset_rings` does: control words first, then everything,
    /// the reply counters included.
    fn wipe(st: &OwnedRing, slots: u32) {
        st.ring(slots).void_controls();
        for w in [&st.producer.sent, &st.producer.replied] {
            w.store(0, Ordering::Relaxed);
        }
        for w in [&st.consumer.received, &st.consumer.sleeping, &st.consumer.replies_taken] {
            w.store(0, Ordering::Relaxed);
        }
        for i in 0..slots as usize {
            for w in &st.slot(i).data {
                w.store(0, Ordering::Relaxed);
            }
        }
    }

    /// What `reset_rings` counts lost on a channel of rings `ab` and `ba`.
    fn in_flight(ab: &OwnedRing, ba: &OwnedRing, slots: u32) -> u64 {
        let (a, b) = (ab.ring(slots), ba.ring(slots));
        a.sent().saturating_sub(a.received()).saturating_add(b.sent().saturating_sub(b.received()))
    }

    /// A reset finds a call in one of three states, and each message gets a defined fate
    /// in the hypervisor's count: a request not yet taken is counted lost; a request taken
    /// whose reply is still owed was delivered (nothing lost; the caller's look says the
    /// link changed); a reply written and not yet taken is counted lost.
    #[test]
    fn a_reset_counts_an_untaken_call_and_an_untaken_reply_lost_and_an_owed_reply_not() {
        let (ab, ba): (&'static OwnedRing, &'static OwnedRing) =
            (Box::leak(Box::new(OwnedRing::new())), Box::leak(Box::new(OwnedRing::new())));
        let (mut ctx, mut crx, mut stx, mut srx) = channel(ab, ba, 4);
        let mut out = [0; WORDS];
        // One honest round trip first: nothing in flight.
        ctx.try_call(&msg(0)).unwrap();
        assert_eq!(srx.try_recv(), Ok(Some(msg(0))));
        assert!(srx.reply(&mut stx, &msg(100)));
        assert_eq!(ctx.poll_reply(&mut crx, 1, &mut out, || {}), Some(Ok(())));
        assert_eq!(in_flight(ab, ba, 4), 0);
        // 1. The request sent, not taken: one lost.
        ctx.try_call(&msg(1)).unwrap();
        assert_eq!(in_flight(ab, ba, 4), 1, "an untaken call");
        // 2. Taken, the reply owed: the request was delivered; nothing is in flight.
        assert_eq!(srx.try_recv(), Ok(Some(msg(1))));
        assert!(srx.owes());
        assert_eq!(in_flight(ab, ba, 4), 0, "an owed reply is not a message yet");
        // 3. The reply written, not taken: one lost.
        assert!(srx.reply(&mut stx, &msg(101)));
        assert_eq!(in_flight(ab, ba, 4), 1, "an untaken reply");
        // The reset voids the reply's word before the copy's re-read: a caller copying
        // it then reports the copy torn (never a zeroed reply under an intact word).
        wipe(ab, 4);
        wipe(ba, 4);
        assert_eq!(in_flight(ab, ba, 4), 0);
        assert!(ctx.poll_reply(&mut crx, 1, &mut out, || {}).is_none(), "no reply after a reset");
        assert_eq!(ctx.not_replied(), Ok(()), "a zeroed slot: the link word tells");
    }

    /// The counters a peer writes (its `sent`, `replied`, `received`, `replies_taken`),
    /// read by the hypervisor for telemetry, the report and the loss count at a reset:
    /// any values, the largest included, give bounded sums (below 2^49) and no overflow.
    #[test]
    fn any_counter_values_sum_without_overflow() {
        let (ab, ba) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
        for v in [0, 1, u64::MAX, COUNT_MASK, 1 << 63 | 5, REPLY | CALL] {
            for st in [&ab, &ba] {
                for w in [&st.producer.sent, &st.producer.replied] {
                    w.store(v, Ordering::Relaxed);
                }
                for w in [&st.consumer.received, &st.consumer.replies_taken] {
                    w.store(v, Ordering::Relaxed);
                }
                let (sent, received) = (st.ring(4).sent(), st.ring(4).received());
                assert!(sent < 1 << 49 && received < 1 << 49, "{v:#x}: {sent} {received}");
            }
            assert!(in_flight(&ab, &ba, 4) < 1 << 50);
        }
    }

    /// What a hostile caller does between two steps of an honest server.
    #[derive(Debug, Clone)]
    enum Caller {
        /// An honest send (`false`) or call (`true`), if the ring has room.
        Send(bool),
        /// A word near the server's next sequence, with any flags, into any control word.
        Near { slot: usize, ahead: u64, flags: u64 },
        /// Any word into any control word.
        Any { slot: usize, v: u64 },
        /// The server's step: a receive, then a reply if it owes one, else (sometimes) a
        /// message of its own on its ring.
        Serve(bool),
    }

    fn caller_ops() -> impl Strategy<Value = Vec<Caller>> {
        let flags = prop_oneof![Just(0), Just(CALL), Just(REPLY), Just(CALL | REPLY)];
        let op = prop_oneof![
            3 => any::<bool>().prop_map(Caller::Send),
            3 => (0usize..8, 0u64..10, flags).prop_map(|(slot, ahead, flags)| Caller::Near { slot, ahead, flags }),
            1 => (0usize..8, any::<u64>()).prop_map(|(slot, v)| Caller::Any { slot, v }),
            4 => any::<bool>().prop_map(Caller::Serve),
        ];
        prop::collection::vec(op, 1..80)
    }

    proptest! {
        /// An honest server against a caller that writes any control word, with or without
        /// the flags, into the ring it sends on, between honest sends and calls. The server
        /// takes a slot only when its word is exactly the next sequence (with CALL or
        /// without): never a reply's word (REPLY) as a new request, never with both flags;
        /// a reply goes only into the slot of the call it took last, once; its own ring
        /// carries exactly its plain messages; nothing panics or reads out of bounds.
        #[test]
        fn an_honest_server_never_takes_a_reply_for_a_request_nor_writes_outside_the_call_slot(
            slots in 1u32..6,
            epoch in 0u32..3,
            ops in caller_ops(),
        ) {
            let (ab, ba) = (Box::new(OwnedRing::new()), Box::new(OwnedRing::new()));
            let tag = tag_of(epoch);
            let mut ctx = Sender::with_epoch(ab.ring(slots), epoch);
            let mut srx = Receiver::with_epoch(ab.ring(slots), 1, epoch);
            let mut stx = Sender::with_epoch(ba.ring(slots), epoch);
            let n = slots as usize;
            let (mut replies, mut plain) = (0u64, 0u64);
            for op in ops {
                match op {
                    Caller::Send(call) => {
                        let m = msg(ctx.sent());
                        let _ = if call { ctx.try_call(&m) } else { ctx.try_send(&m) };
                    }
                    Caller::Near { slot, ahead, flags } => {
                        let v = tag | (srx.received() + ahead) | flags;
                        ab.slot(slot % n).control.store(v, Ordering::Relaxed);
                    }
                    Caller::Any { slot, v } => ab.slot(slot % n).control.store(v, Ordering::Relaxed),
                    Caller::Serve(speak) => {
                        let before = srx.received();
                        let next = (before % slots as u64) as usize;
                        let word = ab.slot(next).control.load(Ordering::Relaxed);
                        match srx.try_recv() {
                            Ok(Some(_)) => {
                                prop_assert!(
                                    word == tag | (before + 1) || word == tag | (before + 1) | CALL,
                                    "took slot {} with word {:#x}, expecting {:#x}", next, word, tag | (before + 1)
                                );
                                prop_assert_eq!(srx.received(), before + 1);
                                prop_assert_eq!(srx.owes(), word & CALL != 0);
                            }
                            Ok(None) | Err(_) => prop_assert_eq!(srx.received(), before),
                        }
                        let owed = srx.owes();
                        let snapshot: Vec<u64> =
                            (0..n).map(|i| ab.slot(i).control.load(Ordering::Relaxed)).collect();
                        let r = msg(1000 + replies);
                        if owed {
                            prop_assert!(srx.reply(&mut stx, &r));
                            replies += 1;
                            prop_assert!(!srx.owes() && !srx.reply(&mut stx, &r), "one reply per call");
                            // Only the call's slot (the one taken last) changed: the reply.
                            let call = (srx.received() as usize + n - 1) % n;
                            for (i, &was) in snapshot.iter().enumerate() {
                                let now = ab.slot(i).control.load(Ordering::Relaxed);
                                if i == call {
                                    prop_assert_eq!(now, tag | srx.received() | REPLY);
                                    let data: Vec<u64> =
                                        ab.slot(i).data.iter().map(|w| w.load(Ordering::Relaxed)).collect();
                                    prop_assert_eq!(&data[..], &r[..]);
                                } else {
                                    prop_assert_eq!(now, was, "a reply wrote slot {}", i);
                                }
                            }
                        } else if speak {
                            prop_assert!(!srx.reply(&mut stx, &r), "no reply without a call");
                            if stx.try_send(&r).is_ok() {
                                plain += 1;
                            }
                        }
                        // The server's own ring: its plain messages, its replies counted beside.
                        prop_assert_eq!(stx.sent(), plain);
                        prop_assert_eq!(ba.ring(slots).sent(), plain + replies);
                    }
                }
            }
        }
    }

    /// A reply is the first write of one side into the ring its *peer* produces. A
    /// survivor that took a call, passed its link look and is held (its vCPU descheduled,
    /// a long exit) until the restarting peer's new incarnation writes, must not write its
    /// late reply over the new epoch's messages: the old epoch's word would replace the
    /// new message's (which then reads as empty: lost, not counted, the survivor's
    /// receiver waiting there for ever), or its payload words land under the new word (a
    /// torn message accepted whole). (A late *send* goes into the survivor's own ring,
    /// which only it writes: the tags alone suffice there.) Failed before its fix: the
    /// new epoch's first message read as `Ok(None)`, for ever.
    #[test]
    fn a_late_reply_from_the_old_epoch_never_destroys_a_new_epochs_message() {
        let (ab, ba): (&'static OwnedRing, &'static OwnedRing) =
            (Box::leak(Box::new(OwnedRing::new())), Box::leak(Box::new(OwnedRing::new())));
        // Epoch 0: the peer (about to die) calls on ab; the survivor takes the call.
        let (mut old_caller, _, mut survivor_tx, mut survivor_rx) = channel(ab, ba, 4);
        old_caller.try_call(&msg(0)).unwrap();
        assert_eq!(survivor_rx.try_recv(), Ok(Some(msg(0))));
        assert!(survivor_rx.owes(), "the survivor passes its link look here, then is held");
        // The peer dies; its core resets both rings; its next incarnation (epoch 1)
        // opens the channel and wants to send into the slot the call used.
        wipe(ab, 4);
        wipe(ba, 4);
        let mut new_peer = Sender::with_epoch(ab.ring(4), 1);
        let _new_peer_rx = Receiver::with_epoch(ba.ring(4), 1, 1);
        assert_eq!(
            new_peer.try_send(&msg(7)),
            Err(ChannelError::Full),
            "nothing written before the survivor has a receiver of the new epoch"
        );
        // The survivor runs again: its reply, owed since before the reset, lands late.
        survivor_rx.reply(&mut survivor_tx, &msg(666));
        // Then it looks, sees the reset and resynchronises; the new peer sends.
        let mut rx = Receiver::with_epoch(ab.ring(4), 1, 1);
        assert_eq!(rx.try_recv(), Ok(None), "the late reply is no message of the new epoch");
        for i in 0..4 {
            new_peer.try_send(&msg(7 + i)).unwrap();
        }
        for i in 0..4 {
            assert_eq!(rx.try_recv(), Ok(Some(msg(7 + i))), "the new epoch's message {i}");
        }
        // The survivor's own new sender waited for the new peer's receiver, made above.
        let mut tx = Sender::with_epoch(ba.ring(4), 1);
        tx.try_send(&msg(1)).unwrap();
        // In epoch 0 nobody waits: there is no earlier epoch to write late.
        let fresh = Box::new(OwnedRing::new());
        Sender::new(fresh.ring(4)).try_send(&msg(0)).unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Send(u8),
        Recv(u8),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![(1u8..12).prop_map(Op::Send), (1u8..12).prop_map(Op::Recv)],
            1..80,
        )
    }

    proptest! {
        /// Against a queue model: same messages in the same order; `Full` exactly when the
        /// producer's view (the consumer's last published count) leaves no slot.
        #[test]
        fn behaves_like_a_bounded_queue(slots in 1u32..9, ack_every in 1u32..5, ops in ops()) {
            let st = Box::new(OwnedRing::new());
            let (mut tx, mut rx) = (Sender::new(st.ring(slots)), Receiver::new(st.ring(slots), ack_every));
            let ack_every = (ack_every as u64).clamp(1, slots as u64);
            let mut model: VecDeque<u64> = VecDeque::new();
            let (mut sent, mut received) = (0u64, 0u64);
            // What the consumer published: every `ack_every` taken, and all it took
            // whenever a receive finds the ring empty.
            let (mut published, mut since) = (0u64, 0u64);
            for op in ops {
                match op {
                    Op::Send(k) => for _ in 0..k {
                        let r = tx.try_send(&msg(sent));
                        if sent - published >= slots as u64 {
                            prop_assert_eq!(r, Err(ChannelError::Full));
                        } else {
                            prop_assert_eq!(r, Ok(()));
                            model.push_back(sent);
                            sent += 1;
                        }
                    },
                    Op::Recv(k) => for _ in 0..k {
                        let got = rx.try_recv().unwrap();
                        match model.pop_front() {
                            Some(m) => {
                                prop_assert_eq!(got, Some(msg(m)));
                                received += 1;
                                since += 1;
                                if since == ack_every {
                                    (published, since) = (received, 0);
                                }
                            }
                            None => {
                                prop_assert_eq!(got, None);
                                (published, since) = (received, 0);
                            }
                        }
                    },
                }
            }
        }

        /// Random scribbling over slots and the consumer line: the receiver only ever
        /// returns messages that were sent, in order, or an error; nothing panics.
        #[test]
        fn scribbles_never_produce_phantom_messages(
            writes in prop::collection::vec((0usize..4, 0usize..8, any::<u64>()), 0..6),
            sends in 0u64..10,
        ) {
            let st = Box::new(OwnedRing::new());
            let (mut tx, mut rx) = (Sender::new(st.ring(4)), Receiver::new(st.ring(4), 1));
            let mut next_expected = 0u64;
            for s in 0..sends {
                let _ = tx.try_send(&msg(s));
                if s % 3 == 0 {
                    for &(slot, word, v) in &writes {
                        if word == 7 { st.slot(slot).control.store(v, Ordering::Relaxed); }
                    }
                }
                // Bounded: a receiver handing out phantoms forever fails here, not hangs.
                // Control words are guarded; payload words are the application's to check.
                for _ in 0..=tx.sent() - next_expected {
                    match rx.try_recv() {
                        Ok(Some(_)) => next_expected += 1,
                        _ => break,
                    }
                }
                prop_assert!(next_expected <= tx.sent());
            }
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    /// Three messages through a two-slot ring under every interleaving loom explores: the
    /// consumer sees each payload whole and in order, and the producer never overwrites a
    /// slot the consumer is still reading.
    #[test]
    fn payloads_are_never_torn_or_reordered() {
        loom::model(|| {
            let st = Arc::new(LoomRing::new(2));
            let p = st.clone();
            let producer = loom::thread::spawn(move || {
                let mut tx = Sender::new(p.ring());
                let mut n = 0;
                while n < 3 {
                    match tx.try_send(&[n + 1; WORDS]) {
                        Ok(()) => n += 1,
                        Err(ChannelError::Full) => loom::thread::yield_now(),
                        Err(e) => panic!("{e:?}"),
                    }
                }
            });
            let mut rx = Receiver::new(st.ring(), 1);
            let mut n = 0;
            while n < 3 {
                match rx.try_recv() {
                    Ok(Some(m)) => {
                        assert_eq!(m, [n + 1; WORDS]);
                        n += 1;
                    }
                    Ok(None) => loom::thread::yield_now(),
                    Err(e) => panic!("{e:?}"),
                }
            }
            producer.join().unwrap();
        });
    }

    /// The blocking receive's path ([`Receiver::poll_take`]: the poll's acquire load is the
    /// take's first, the payload copied straight into the caller's buffer, then re-read):
    /// the same guarantees as [`Receiver::try_recv`] under every interleaving.
    #[test]
    fn polled_takes_are_never_torn_or_reordered() {
        loom::model(|| {
            let st = Arc::new(LoomRing::new(2));
            let p = st.clone();
            let producer = loom::thread::spawn(move || {
                let mut tx = Sender::new(p.ring());
                let mut n = 0;
                while n < 3 {
                    match tx.try_send(&[n + 1; WORDS]) {
                        Ok(()) => n += 1,
                        Err(ChannelError::Full) => loom::thread::yield_now(),
                        Err(e) => panic!("{e:?}"),
                    }
                }
            });
            let mut rx = Receiver::new(st.ring(), 1);
            let mut out = [0; WORDS];
            for n in 0..3 {
                loop {
                    match rx.poll_take(1, &mut out, || {}) {
                        Some(r) => {
                            r.unwrap();
                            break;
                        }
                        None => loom::thread::yield_now(),
                    }
                }
                assert_eq!(out, [n + 1; WORDS]);
            }
            producer.join().unwrap();
        });
    }

    /// The guest library's settings: `received` published every other message of a two-slot
    /// ring (`ack_every` = slots, the most it allows) and whenever the consumer has caught
    /// up ([`Receiver::ack_if_caught_up`]): the same guarantees, and the producer is never
    /// left waiting on a count the consumer holds back.
    #[test]
    fn batched_acks_published_when_caught_up() {
        loom::model(|| {
            let st = Arc::new(LoomRing::new(2));
            let p = st.clone();
            let producer = loom::thread::spawn(move || {
                let mut tx = Sender::new(p.ring());
                let mut n = 0;
                while n < 3 {
                    match tx.try_send(&[n + 1; WORDS]) {
                        Ok(()) => n += 1,
                        Err(ChannelError::Full) => loom::thread::yield_now(),
                        Err(e) => panic!("{e:?}"),
                    }
                }
            });
            let mut rx = Receiver::new(st.ring(), 2);
            let mut n = 0;
            while n < 3 {
                match rx.try_recv() {
                    Ok(Some(m)) => {
                        assert_eq!(m, [n + 1; WORDS]);
                        n += 1;
                        rx.ack_if_caught_up();
                    }
                    Ok(None) => loom::thread::yield_now(),
                    Err(e) => panic!("{e:?}"),
                }
            }
            producer.join().unwrap();
        });
    }

    /// Calls answered in the request's slot ([`Sender::try_call`], [`Receiver::reply`],
    /// [`Sender::poll_reply`]), three through a two-slot ring so that a slot is reused
    /// after its reply: each side reads the other's payload whole (request and reply), the
    /// reply never overwrites a request not yet taken and a new request never a reply not
    /// yet read, and the counts come out exact.
    #[test]
    fn calls_answered_in_the_slot_are_never_torn() {
        loom::model(|| {
            let (ab, ba) = (Arc::new(LoomRing::new(2)), Arc::new(LoomRing::new(2)));
            let (sab, sba) = (ab.clone(), ba.clone());
            let server = loom::thread::spawn(move || {
                let mut rx = Receiver::new(sab.ring(), 1);
                let mut tx = Sender::new(sba.ring());
                let mut req = [0; WORDS];
                for n in 0..3 {
                    loop {
                        match rx.poll_take(1, &mut req, || {}) {
                            Some(r) => {
                                r.unwrap();
                                break;
                            }
                            None => loom::thread::yield_now(),
                        }
                    }
                    assert_eq!(req, [n + 1; WORDS]);
                    assert!(rx.owes());
                    assert!(rx.reply(&mut tx, &[n + 10; WORDS]));
                    assert!(!rx.owes());
                }
            });
            let mut tx = Sender::new(ab.ring());
            let mut rx = Receiver::new(ba.ring(), 1);
            let mut reply = [0; WORDS];
            for n in 0..3 {
                loop {
                    match tx.try_call(&[n + 1; WORDS]) {
                        Ok(()) => break,
                        Err(ChannelError::Full) => loom::thread::yield_now(),
                        Err(e) => panic!("{e:?}"),
                    }
                }
                loop {
                    match tx.poll_reply(&mut rx, 1, &mut reply, || {}) {
                        Some(r) => {
                            r.unwrap();
                            break;
                        }
                        None => {
                            tx.not_replied().unwrap();
                            loom::thread::yield_now()
                        }
                    }
                }
                assert_eq!(reply, [n + 10; WORDS]);
            }
            server.join().unwrap();
            assert_eq!((ab.ring().sent(), ab.ring().received()), (3, 3));
            assert_eq!((ba.ring().sent(), ba.ring().received()), (3, 3));
        });
    }

    /// A survivor's late reply against the restarted peer's first message (the epoch
    /// gate of [`Sender::with_epoch`]): the survivor took a call in epoch 0; the rings are
    /// reset; the peer's new incarnation sends one message in epoch 1 while the survivor,
    /// not yet told, writes its reply into the call's slot, then resynchronises. Under
    /// every interleaving the new message comes out whole, never overwritten or torn.
    #[test]
    fn a_late_reply_never_lands_on_the_next_epochs_message() {
        loom::model(|| {
            let (ab, ba) = (Arc::new(LoomRing::new(1)), Arc::new(LoomRing::new(1)));
            let mut survivor_rx = Receiver::new(ab.ring(), 1);
            let mut survivor_tx = Sender::new(ba.ring());
            Sender::new(ab.ring()).try_call(&[1; WORDS]).unwrap();
            assert_eq!(survivor_rx.try_recv(), Ok(Some([1; WORDS])));
            // The reset: control words first, then the rest (only what matters here).
            ab.ring().void_controls();
            ab.consumer.received.store(0, Ordering::Relaxed);
            let peer_ring = ab.clone();
            let peer = loom::thread::spawn(move || {
                let mut tx = Sender::with_epoch(peer_ring.ring(), 1);
                loop {
                    match tx.try_send(&[7; WORDS]) {
                        Ok(()) => break,
                        Err(ChannelError::Full) => loom::thread::yield_now(),
                        Err(e) => panic!("{e:?}"),
                    }
                }
            });
            survivor_rx.reply(&mut survivor_tx, &[666; WORDS]);
            let mut rx = Receiver::with_epoch(ab.ring(), 1, 1);
            loop {
                match rx.try_recv() {
                    Ok(Some(m)) => {
                        assert_eq!(m, [7; WORDS]);
                        break;
                    }
                    Ok(None) => loom::thread::yield_now(),
                    Err(e) => panic!("{e:?}"),
                }
            }
            peer.join().unwrap();
        });
    }

    /// A call given up while the server is about to answer it: the client, past its
    /// deadline after one look, sends its next message, which on a one-slot ring goes into
    /// the call's slot; the server takes the call, writes its (late) reply, then takes the
    /// next message. Under every interleaving the message comes out whole and the reply
    /// never lands on it (without `give_up_call`'s hold the client overwrote the slot and
    /// the reply destroyed the message).
    #[test]
    fn a_late_reply_to_a_call_given_up_never_lands_on_a_message() {
        loom::model(|| {
            let (ab, ba) = (Arc::new(LoomRing::new(1)), Arc::new(LoomRing::new(1)));
            let (ab2, ba2) = (ab.clone(), ba.clone());
            // Set by the client once its second message is written: a receive that then
            // finds nothing means the message was destroyed (not a wait).
            let done = Arc::new(loom::sync::atomic::AtomicBool::new(false));
            let done2 = done.clone();
            let server = loom::thread::spawn(move || {
                let mut rx = Receiver::new(ab2.ring(), 1);
                let mut tx = Sender::new(ba2.ring());
                assert_eq!(rx_wait(&mut rx), [1; WORDS]);
                assert!(rx.reply(&mut tx, &[10; WORDS]));
                loop {
                    let sent = done2.load(Ordering::Acquire);
                    match rx.try_recv() {
                        Ok(Some(m)) => {
                            assert_eq!(m, [2; WORDS]);
                            break;
                        }
                        Ok(None) if sent => panic!("the message was overwritten by the reply"),
                        Ok(None) => loom::thread::yield_now(),
                        Err(e) => panic!("{e:?}"),
                    }
                }
            });
            let mut tx = Sender::new(ab.ring());
            let mut rx = Receiver::new(ba.ring(), 1);
            tx.try_call(&[1; WORDS]).unwrap();
            let mut reply = [0; WORDS];
            if tx.poll_reply(&mut rx, 1, &mut reply, || {}).is_none() {
                tx.give_up_call();
            }
            loop {
                match tx.try_send(&[2; WORDS]) {
                    Ok(()) => break,
                    Err(ChannelError::Full) => {
                        tx.settle_call(&mut rx).unwrap();
                        loom::thread::yield_now()
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
            done.store(true, Ordering::Release);
            server.join().unwrap();
            assert_eq!((ab.ring().sent(), ab.ring().received()), (2, 2));
        });
    }

    /// A call given up, settled while the server answers it late and then takes the
    /// client's next message: whichever way `settle_call` frees the slot (the reply found
    /// in it, or the server's count past the call), a reply the server wrote is counted
    /// taken, once (`Ring::sent` and `Ring::received` of the server's ring agree: nothing
    /// reads as in flight for ever). Failed before its fix: the settle looked at the slot
    /// (the request still there), the server then replied and took the next message, and
    /// the settle read the count past the call and freed the slot with the reply in it,
    /// never counted.
    #[test]
    fn a_late_reply_freed_by_the_count_is_still_counted_taken() {
        loom::model(|| {
            let (ab, ba) = (Arc::new(LoomRing::new(2)), Arc::new(LoomRing::new(2)));
            let (ab2, ba2) = (ab.clone(), ba.clone());
            let server = loom::thread::spawn(move || {
                let mut rx = Receiver::new(ab2.ring(), 1);
                let mut tx = Sender::new(ba2.ring());
                assert_eq!(rx_wait(&mut rx), [1; WORDS]);
                assert!(rx.reply(&mut tx, &[10; WORDS]));
                assert_eq!(rx_wait(&mut rx), [2; WORDS]);
            });
            let mut tx = Sender::new(ab.ring());
            let mut rx = Receiver::new(ba.ring(), 1);
            tx.try_call(&[1; WORDS]).unwrap();
            tx.give_up_call();
            tx.try_send(&[2; WORDS]).unwrap();
            while !tx.settle_call(&mut rx).unwrap() {
                loom::thread::yield_now();
            }
            server.join().unwrap();
            // The reply was written before the server took message 2, and the slot was
            // freed only after that or after the reply was found: it is counted.
            assert_eq!((ba.ring().sent(), ba.ring().received()), (1, 1), "the reply counted taken");
        });
    }

    /// Receives, yielding while the ring is empty.
    fn rx_wait(rx: &mut Receiver<'_>) -> Payload {
        loop {
            match rx.try_recv() {
                Ok(Some(m)) => return m,
                Ok(None) => loom::thread::yield_now(),
                Err(e) => panic!("{e:?}"),
            }
        }
    }

    /// Small ring storage for loom (its atomics are not const-constructible).
    struct LoomRing {
        producer: ProducerLine,
        consumer: ConsumerLine,
        slots: Vec<Slot>,
    }

    impl LoomRing {
        fn new(n: usize) -> Self {
            let z = || AtomicU64::new(0);
            LoomRing {
                producer: ProducerLine {
                    sent: z(),
                    replied: z(),
                    _pad: core::array::from_fn(|_| z()),
                },
                consumer: ConsumerLine {
                    received: z(),
                    sleeping: z(),
                    replies_taken: z(),
                    _pad: core::array::from_fn(|_| z()),
                },
                slots: (0..n)
                    .map(|_| Slot { data: core::array::from_fn(|_| z()), control: z() })
                    .collect(),
            }
        }
        fn ring(&self) -> Ring<'_> {
            Ring { producer: &self.producer, consumer: &self.consumer, slots: &self.slots }
        }
    }
}
