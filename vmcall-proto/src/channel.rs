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
//! | 0 | producer | `sent`: messages sent (statistics only; nobody waits on it) |
//! | 1 | consumer | `received`: messages consumed (published every `ack_every`), `sleeping` |
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
    _pad: [AtomicU64; 7],
}

/// The consumer's line.
#[repr(C, align(64))]
pub struct ConsumerLine {
    pub received: AtomicU64,
    /// Non-zero while the consumer is (about to be) blocked waiting for a doorbell.
    pub sleeping: AtomicU64,
    _pad: [AtomicU64; 6],
}

#[cfg(not(loom))]
const _: () = {
    assert!(core::mem::size_of::<Slot>() == 64);
    assert!(core::mem::size_of::<ProducerLine>() == 64);
    assert!(core::mem::size_of::<ConsumerLine>() == 64);
};

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

    /// What the producer says it sent (statistics; not trusted for anything).
    pub fn sent(&self) -> u64 {
        self.producer.sent.load(Ordering::Relaxed)
    }

    /// What the consumer says it received (statistics; not trusted for anything).
    pub fn received(&self) -> u64 {
        self.consumer.received.load(Ordering::Relaxed)
    }
}

/// What went wrong on a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelError {
    /// No free slot (only from `try_send`).
    Full,
    /// A slot's control word is neither the expected message nor the previous lap's.
    Corrupt { slot: u32, expected: u64, found: u64 },
    /// The control word changed while the payload was being read.
    Torn { slot: u32 },
    /// The consumer's `received` count went backwards or past what was sent.
    BadAck { received: u64, sent: u64 },
}

/// The sending end of a ring. Keeps its own count; never trusts the consumer's.
pub struct Sender<'a> {
    ring: Ring<'a>,
    next: u64,
    acked: u64,
}

/// The receiving end of a ring.
pub struct Receiver<'a> {
    ring: Ring<'a>,
    next: u64,
    ack_every: u64,
}

impl<'a> Sender<'a> {
    pub fn new(ring: Ring<'a>) -> Self {
        Sender { ring, next: 0, acked: 0 }
    }

    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        self.next
    }

    /// Free slots as far as this side knows (refreshes from the consumer's count).
    pub fn try_send(&mut self, msg: &Payload) -> Result<(), ChannelError> {
        let n = self.ring.slots.len() as u64;
        if self.next - self.acked >= n {
            let r = self.ring.consumer.received.load(Ordering::Acquire);
            if r > self.next || r < self.acked {
                return Err(ChannelError::BadAck { received: r, sent: self.next });
            }
            self.acked = r;
            if self.next - r >= n {
                return Err(ChannelError::Full);
            }
        }
        let slot = &self.ring.slots[(self.next % n) as usize];
        for (w, v) in slot.data.iter().zip(msg) {
            w.store(*v, Ordering::Relaxed);
        }
        slot.control.store(self.next + 1, Ordering::Release);
        self.next += 1;
        self.ring.producer.sent.store(self.next, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the consumer said it is going to sleep (then it wants a doorbell).
    pub fn peer_sleeping(&self) -> bool {
        // Pairs with the consumer's SeqCst store before its final re-check (Dekker): either
        // we see it sleeping, or it sees our message.
        fence(Ordering::SeqCst);
        self.ring.consumer.sleeping.load(Ordering::Relaxed) != 0
    }
}

impl<'a> Receiver<'a> {
    /// `ack_every`: how many messages between publications of `received` (1 = each).
    pub fn new(ring: Ring<'a>, ack_every: u32) -> Self {
        let ack_every = (ack_every as u64).clamp(1, ring.slots.len().max(1) as u64);
        Receiver { ring, next: 0, ack_every }
    }

    /// Messages received so far.
    pub fn received(&self) -> u64 {
        self.next
    }

    /// The next message, `Ok(None)` if there is none yet.
    pub fn try_recv(&mut self) -> Result<Option<Payload>, ChannelError> {
        let n = self.ring.slots.len() as u64;
        let index = (self.next % n) as u32;
        let slot = &self.ring.slots[index as usize];
        let expected = self.next + 1;
        let c = slot.control.load(Ordering::Acquire);
        if c != expected {
            let empty = if self.next >= n { expected - n } else { 0 };
            return if c == empty {
                Ok(None)
            } else {
                Err(ChannelError::Corrupt { slot: index, expected, found: c })
            };
        }
        let mut msg = [0u64; WORDS];
        for (v, w) in msg.iter_mut().zip(&slot.data) {
            *v = w.load(Ordering::Relaxed);
        }
        fence(Ordering::Acquire);
        if slot.control.load(Ordering::Relaxed) != c {
            return Err(ChannelError::Torn { slot: index });
        }
        self.next += 1;
        if self.next.is_multiple_of(self.ack_every) {
            self.ring.consumer.received.store(self.next, Ordering::Release);
        }
        Ok(Some(msg))
    }

    /// Publishes the received count now (e.g. at the end, for statistics).
    pub fn flush_ack(&self) {
        self.ring.consumer.received.store(self.next, Ordering::Release);
    }

    /// Announces that this side is about to block (`true`) or is awake (`false`). After
    /// announcing sleep, call [`Receiver::try_recv`] once more before blocking: a sender
    /// that did not see the flag has published its message by then.
    pub fn set_sleeping(&self, on: bool) {
        self.ring.consumer.sleeping.store(on as u64, Ordering::Relaxed);
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
                _pad: core::array::from_fn(|_| AtomicU64::new(0)),
            },
            consumer: ConsumerLine {
                received: AtomicU64::new(0),
                sleeping: AtomicU64::new(0),
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
    fn a_lying_consumer_cannot_make_the_sender_overwrite() {
        let st = Box::new(OwnedRing::new());
        let mut tx = Sender::new(st.ring(2));
        tx.try_send(&msg(0)).unwrap();
        tx.try_send(&msg(1)).unwrap();
        st.consumer().received.store(5, Ordering::Relaxed);
        assert_eq!(tx.try_send(&msg(2)), Err(ChannelError::BadAck { received: 5, sent: 2 }));
    }

    /// Real threads, real cores: a ping-pong and a stream through two rings.
    #[test]
    fn two_threads_ping_pong_and_stream() {
        let ab: &'static OwnedRing = Box::leak(Box::new(OwnedRing::new()));
        let ba: &'static OwnedRing = Box::leak(Box::new(OwnedRing::new()));
        const N: u64 = 20_000;
        const SLOTS: u32 = 64;
        let echo = std::thread::spawn(move || {
            let (mut tx, mut rx) =
                (Sender::new(ba.ring(SLOTS)), Receiver::new(ab.ring(SLOTS), SLOTS / 4));
            let mut got = 0;
            while got < 2 * N {
                match rx.try_recv() {
                    Ok(Some(m)) => {
                        assert_eq!(m, msg(got));
                        got += 1;
                        if got <= N {
                            while tx.try_send(&m) == Err(ChannelError::Full) {
                                std::hint::spin_loop();
                            }
                        }
                    }
                    Ok(None) => std::hint::spin_loop(),
                    Err(e) => panic!("{e:?}"),
                }
            }
        });
        let (mut tx, mut rx) =
            (Sender::new(ab.ring(SLOTS)), Receiver::new(ba.ring(SLOTS), SLOTS / 4));
        for i in 0..N {
            tx.try_send(&msg(i)).unwrap();
            let m = loop {
                if let Some(m) = rx.try_recv().unwrap() {
                    break m;
                }
                std::hint::spin_loop();
            };
            assert_eq!(m, msg(i));
        }
        for i in N..2 * N {
            while tx.try_send(&msg(i)) == Err(ChannelError::Full) {
                std::hint::spin_loop();
            }
        }
        echo.join().unwrap();
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
            for op in ops {
                match op {
                    Op::Send(k) => for _ in 0..k {
                        let published = received - received % ack_every;
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
                            Some(m) => { prop_assert_eq!(got, Some(msg(m))); received += 1; }
                            None => prop_assert_eq!(got, None),
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
                while let Ok(Some(m)) = rx.try_recv() {
                    // Control words are guarded; payload words are the application's to check.
                    let _ = m;
                    next_expected += 1;
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
                producer: ProducerLine { sent: z(), _pad: core::array::from_fn(|_| z()) },
                consumer: ConsumerLine {
                    received: z(),
                    sleeping: z(),
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
