// SPDX-License-Identifier: MIT OR Apache-2.0
//! Messages between hypervisor instances. Each ordered pair of cores has one ring (the same
//! `vmcall_proto::channel` ring guests use) in hypervisor memory: core `a` is the only
//! producer of ring `[a][b]`, core `b` its only consumer. A message is followed by an NMI
//! to the target core: a running guest takes an NMI exit, a core in the hypervisor takes
//! the NMI through its IDT (which just returns); either way the core looks at its inbox
//! before it next enters its guest or while it waits for a reply.
//!
//! The doorbell: each core has one mail word ([`MAIL`]`[b]`), a bitmask of the cores that
//! put something on a ring to `b`. A sender sets its bit (Release) after the ring write and
//! before the kick; the receiver swaps the word to 0 (Acquire) and reads only the rings it
//! names, so a VM entry with no mail costs one load whatever the core count, not a look at
//! every ring. The word is single-purpose message-passing signalling, never state: it is
//! the only word other cores write that a core reads on its entry path. Mail is never
//! lost: a bit taken means its ring is read until found empty, and a message written after
//! that has its bit set again after it, which the next look sees. Nothing else is shared
//! between cores on these paths: no lock, no table another core writes. What travels here
//! (the capability protocol) is defined in `caps::proto`; this module only carries it.
//!
//!
//! The multicast slots ([`mc_publish`] and the rest): one per core, written by that core
//! alone (a seqlock: its sequence number odd while it is rewritten), read by every core
//! it names: the capability protocol's multicast revoke, a request written once for many
//! holders (the layout is `caps::mcast`'s). Each reader answers in its own reply line of
//! the slot (one writer per line) and sets its bit in the slot's answered word, a doorbell
//! like the mail word. A publish rings each named core twice (its mail word, so its run
//! loop looks, and its multicast bell, which says whose slot to read), then kicks them all
//! at once: one NMI per x2APIC cluster in logical destination mode (each core publishes the
//! logical ID its own APIC holds, [`publish_logical_id`]), by physical ID only for a core
//! without one.
//!
//! Owns the rings, the mail words, the multicast slots and bells, and the core-to-APIC
//! tables (physical and logical IDs). Calls `vmcall_proto::channel` (the ring), `arch::apic` (the NMI) and
//! `caps::mcast` (the request's layout), nothing else.

use crate::caps::mcast;
use crate::percpu::MAX_CORES;
use core::cell::UnsafeCell;
use core::sync::atomic::{fence, AtomicU64, Ordering};
use vmcall_proto::channel::{self, Payload, Receiver, Ring, Sender};

/// Slots per inter-core ring (a power of two, as the ring wants). The transport's own
/// size: the protocols it carries keep their worst case within it (the capability
/// protocol's flow control, guest control, links and membership: `caps::proto::RING_SLOTS`,
/// checked against this where the two meet, in `instance`).
pub const SLOTS: u32 = 32;
const RING_BYTES: usize = channel::ring_bytes(SLOTS) as usize;

#[repr(C, align(64))]
struct RingMem(UnsafeCell<[u8; RING_BYTES]>);
// SAFETY: ring memory is only accessed through the ring's atomics, by its one producer
// and its one consumer.
unsafe impl Sync for RingMem {}

static RINGS: [[RingMem; MAX_CORES]; MAX_CORES] =
    [const { [const { RingMem(UnsafeCell::new([0; RING_BYTES])) }; MAX_CORES] }; MAX_CORES];

/// One core's mail word, alone on its cache line (the senders' writes to one core's word
/// do not disturb the others').
#[repr(C, align(64))]
pub struct Mail(AtomicU64);
const _: () = assert!(core::mem::size_of::<Mail>() == 64);
const _: () = assert!(MAX_CORES <= 64, "one bit per sending core");

/// Per destination core: bit `a` set means core `a` put a message on its ring to this core
/// since this core last took the word (see the module comment).
pub static MAIL: [Mail; MAX_CORES] = [const { Mail(AtomicU64::new(0)) }; MAX_CORES];

/// Core `core`'s mail word, for a look that takes nothing (the fast exit path's).
pub fn mail_word(core: usize) -> &'static AtomicU64 {
    &MAIL[core].0
}

/// One word alone on its cache line (a reply line, an answered word).
#[repr(C, align(64))]
struct Line(AtomicU64);
const _: () = assert!(core::mem::size_of::<Line>() == 64);

/// One core's multicast slot (see the module comment). The request's words are written
/// only by their core, between an odd and the next even `seq`.
#[repr(C, align(64))]
struct McSlot {
    seq: AtomicU64,
    node: AtomicU64,
    n: AtomicU64,
    /// The copies' cores, four 16-bit cores a word.
    cores: [AtomicU64; mcast::MAX / 4],
    _pad: AtomicU64,
    ids: [AtomicU64; mcast::MAX],
    /// Bit `c`: core `c` wrote its line since the last publish.
    answered: Line,
    lines: [Line; MAX_CORES],
}
const _: () = assert!(core::mem::size_of::<McSlot>() == 64 * (4 + MAX_CORES));
const _: () = assert!(mcast::MAX.is_multiple_of(4));

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static MC_SLOTS: [McSlot; MAX_CORES] = [const {
    McSlot {
        seq: ZERO,
        node: ZERO,
        n: ZERO,
        cores: [ZERO; mcast::MAX / 4],
        _pad: ZERO,
        ids: [ZERO; mcast::MAX],
        answered: Line(ZERO),
        lines: [const { Line(ZERO) }; MAX_CORES],
    }
}; MAX_CORES];

/// Per core: bit `a` set means core `a` published a multicast request naming it since it
/// last took the word.
static BELLS: [Mail; MAX_CORES] = [const { Mail(AtomicU64::new(0)) }; MAX_CORES];

/// Publishes core `me`'s request `req` in its slot, rings and kicks every core it names.
pub fn mc_publish(me: usize, req: &mcast::Request) -> bool {
    if me >= MAX_CORES || req.seq & 1 != 0 {
        return false;
    }
    let s = &MC_SLOTS[me];
    // Odd: readers that overlap this write see a torn copy and drop it.
    s.seq.store(req.seq.wrapping_sub(1), Ordering::Relaxed);
    fence(Ordering::Release);
    s.node.store(req.node, Ordering::Relaxed);
    let n = (req.n as usize).min(mcast::MAX);
    s.n.store(n as u64, Ordering::Relaxed);
    // The named cores (one bit each) gathered in the same pass.
    let mut t = 0u64;
    for j in 0..n {
        s.ids[j].store(req.ids[j], Ordering::Relaxed);
        t |= 1 << (req.cores[j] % 64);
    }
    // Four 16-bit cores a word (past `n`, whatever the request holds: never read).
    for (w, c) in s.cores.iter().zip(req.cores.chunks_exact(4)).take(n.div_ceil(4)) {
        w.store(
            c[0] as u64 | (c[1] as u64) << 16 | (c[2] as u64) << 32 | (c[3] as u64) << 48,
            Ordering::Relaxed,
        );
    }
    s.answered.0.store(0, Ordering::Relaxed);
    s.seq.store(req.seq, Ordering::Release);
    // Each named core: its bell and mail bit (after the slot); then all of them kicked,
    // after every bell (a kicked core finds its bell rung): the cores of one x2APIC cluster
    // by one ICR write, gathered in the same pass, the rest by `kick_set`.
    let ready = crate::percpu::nmi_ready_set();
    let (mut t, mut dest, mut rest) = (t & !(1 << me), 0u32, 0u64);
    while t != 0 {
        let to = t.trailing_zeros() as usize;
        t &= t - 1;
        if to >= MAX_CORES {
            continue;
        }
        BELLS[to].0.fetch_or(1 << me, Ordering::Release);
        MAIL[to].0.fetch_or(1 << me, Ordering::Release);
        let l = LOGICAL[to].load(Ordering::Acquire);
        if ready & 1 << to != 0 && joins(dest, l) {
            dest |= l;
        } else {
            rest |= 1 << to;
        }
    }
    if dest != 0 {
        crate::arch::apic::send_nmi_logical(dest);
    }
    kick_set(rest);
    true
}

/// The cores that rang core `me`'s multicast bell since it last asked.
pub fn mc_rung(me: usize) -> u64 {
    match BELLS.get(me) {
        // Unlikely set: one load, no write, on every look.
        Some(b) if b.0.load(Ordering::Relaxed) != 0 => b.0.swap(0, Ordering::Acquire),
        _ => 0,
    }
}

/// Core `from`'s published request as core `me` reads it (only `me`'s copies), or `None`
/// while it is being rewritten.
pub fn mc_read(from: usize, me: usize) -> Option<mcast::Request> {
    let s = MC_SLOTS.get(from)?;
    let seq = s.seq.load(Ordering::Acquire);
    if seq == 0 || seq & 1 != 0 {
        return None;
    }
    let mut r = mcast::Request { seq, node: s.node.load(Ordering::Relaxed), ..Default::default() };
    let n = (s.n.load(Ordering::Relaxed) as usize).min(mcast::MAX);
    let mut k = 0;
    for (i, w) in s.cores.iter().enumerate().take(n.div_ceil(4)) {
        let v = w.load(Ordering::Relaxed);
        for q in 0..4 {
            let j = 4 * i + q;
            if j < n && (v >> (16 * q)) as u16 as usize == me {
                r.ids[k] = s.ids[j].load(Ordering::Relaxed);
                r.cores[k] = me as u16;
                k += 1;
            }
        }
    }
    r.n = k as u8;
    fence(Ordering::Acquire);
    (s.seq.load(Ordering::Relaxed) == seq).then_some(r)
}

/// Core `me`'s answer `word` in its line of core `to`'s slot, then its answered bit.
pub fn mc_answer(me: usize, to: usize, word: u64) {
    if me < MAX_CORES && to < MAX_CORES {
        MC_SLOTS[to].lines[me].0.store(word, Ordering::Release);
        MC_SLOTS[to].answered.0.fetch_or(1 << me, Ordering::Release);
    }
}

/// The answered word of core `me`'s slot.
pub fn mc_answered(me: usize) -> u64 {
    MC_SLOTS.get(me).map_or(0, |s| s.answered.0.load(Ordering::Acquire))
}

/// Core `from`'s line in core `me`'s slot.
pub fn mc_line(me: usize, from: usize) -> u64 {
    match (MC_SLOTS.get(me), from < MAX_CORES) {
        (Some(s), true) => s.lines[from].0.load(Ordering::Acquire),
        _ => 0,
    }
}

/// Kicks every core in `set` (bit per core index) that can take an NMI: one ICR write per
/// x2APIC cluster for the cores whose logical ID is known ([`publish_logical_id`]), one
/// per core for the others. A multicast's holders all on one cluster (up to 16 cores, all
/// of Bochs's 15) cost the sender one write, not one per holder; see
/// `docs/capabilities.md`, "One kick to many", for why this is sound on hardware.
fn kick_set(set: u64) {
    let Some((ids, cores)) = APIC_OF.get() else { return };
    let all = if *cores >= 64 { u64::MAX } else { (1u64 << *cores) - 1 };
    let mut rest = set & all & crate::percpu::nmi_ready_set();
    while rest != 0 {
        match one_cluster(rest, |c| LOGICAL[c].load(Ordering::Acquire)) {
            (0, _) => {
                // The lowest core has no logical ID: its own ICR write.
                crate::arch::apic::send_nmi(ids[rest.trailing_zeros() as usize]);
                rest &= rest - 1;
            }
            (dest, left) => {
                crate::arch::apic::send_nmi_logical(dest);
                rest = left;
            }
        }
    }
}

/// Whether a core of logical ID `l` (0: none) can share the logical destination `dest`
/// (0: none yet): the same x2APIC cluster (bits 31:16), whose bitmask then names both.
fn joins(dest: u32, l: u32) -> bool {
    l != 0 && (dest == 0 || l >> 16 == dest >> 16)
}

/// The logical destination naming the lowest core of `set` and every other core of `set`
/// in its x2APIC cluster (`logical(c)`: core `c`'s logical ID, 0 if none), and the cores of
/// `set` it leaves; `(0, set)` if the lowest core has no logical ID.
fn one_cluster(set: u64, logical: impl Fn(usize) -> u32) -> (u32, u64) {
    let (mut dest, mut left, mut m) = (0u32, set, set);
    while m != 0 {
        let c = m.trailing_zeros() as usize;
        m &= m - 1;
        let l = if c < MAX_CORES { logical(c) } else { 0 };
        if dest == 0 && l == 0 {
            return (0, set);
        }
        if joins(dest, l) {
            dest |= l;
            left &= !(1 << c);
        }
    }
    (dest, left)
}

/// Per core: its logical x2APIC ID as its own APIC reads it (cluster in bits 31:16, its bit
/// in 15:0), written once by that core ([`publish_logical_id`]); 0 until then or if it has
/// none (then it is kicked by its physical ID).
static LOGICAL: [core::sync::atomic::AtomicU32; MAX_CORES] =
    [const { core::sync::atomic::AtomicU32::new(0) }; MAX_CORES];

/// Core `core` (the caller, on its own core, once its APIC is in x2APIC mode) publishes its
/// logical x2APIC ID, so that kicks to it can share an ICR write with its cluster.
pub fn publish_logical_id(core: usize) {
    if let (Some(l), Some(slot)) = (crate::arch::apic::logical_id(), LOGICAL.get(core)) {
        slot.store(l, Ordering::Release);
    }
}

/// Core index to APIC id, written once by the BSP before any AP starts, read-only after:
/// replicated configuration, not shared state.
static APIC_OF: spin::Once<([u32; MAX_CORES], usize)> = spin::Once::new();

pub fn publish_cores(apics: &[u32]) {
    APIC_OF.call_once(|| {
        let mut t = [0; MAX_CORES];
        t[..apics.len()].copy_from_slice(apics);
        (t, apics.len())
    });
}

fn ring(from: usize, to: usize) -> Ring<'static> {
    // SAFETY: static, 64-byte aligned, RING_BYTES long, accessed only through the ring.
    unsafe { Ring::from_raw(RINGS[from][to].0.get() as *mut u8, SLOTS) }
}

/// One core's ends of all its rings, and its counters. Lives in the core's guest context.
pub struct Link {
    me: usize,
    tx: [Option<Sender<'static>>; MAX_CORES],
    rx: [Option<Receiver<'static>>; MAX_CORES],
    next_from: usize,
    /// Rings this core took from its mail word and has not yet found empty.
    pending: u64,
    pub sent: u64,
    pub received: u64,
    pub nmis: u64,
}

impl Link {
    pub fn new(me: usize) -> Self {
        Link {
            me,
            tx: [const { None }; MAX_CORES],
            rx: [const { None }; MAX_CORES],
            next_from: 0,
            pending: 0,
            sent: 0,
            received: 0,
            nmis: 0,
        }
    }

    fn cores(&self) -> usize {
        APIC_OF.get().map_or(0, |t| t.1)
    }

    /// Puts `m` on the ring to `to`. `false` if it is full (the caller serves its own
    /// inbox and retries: the peer is doing the same, so rings drain).
    pub fn try_send(&mut self, to: usize, m: &Payload) -> bool {
        if to >= self.cores() || to == self.me {
            return false;
        }
        let me = self.me;
        let tx = self.tx[to].get_or_insert_with(|| Sender::new(ring(me, to)));
        let ok = tx.try_send(m).is_ok();
        if ok {
            // After the ring write (the ring's own Release store), before the kick.
            MAIL[to].0.fetch_or(1 << me, Ordering::Release);
        }
        self.sent += ok as u64;
        ok
    }

    /// Whether mail may be waiting: one load of this core's mail word (and of what it took
    /// earlier and has not drained), whatever the core count.
    #[inline]
    pub fn has_mail(&self) -> bool {
        self.pending != 0 || MAIL[self.me].0.load(Ordering::Relaxed) != 0
    }

    /// Sends an NMI to core `to`.
    pub fn kick(&mut self, to: usize) {
        if let Some((t, n)) = APIC_OF.get() {
            // A core still in its bring-up is not kicked: it reads its mail word when it
            // first serves its inbox.
            if to < *n && crate::percpu::nmi_ready(to) {
                crate::arch::apic::send_nmi(t[to]);
                self.nmis += 1;
            }
        }
    }

    /// The next message from any core (round robin among the rings the mail word named),
    /// with its sender.
    pub fn try_recv(&mut self) -> Option<(usize, Payload)> {
        if self.pending == 0 {
            // Acquire: the ring writes before each bit's Release are visible from here.
            self.pending = MAIL[self.me].0.swap(0, Ordering::Acquire);
        }
        let n = self.cores();
        while self.pending != 0 {
            // The first named core at or after `next_from` (round robin), else the lowest.
            let after = self.pending & (u64::MAX << (self.next_from % 64));
            let from = if after != 0 { after } else { self.pending }.trailing_zeros() as usize;
            if from >= n || from == self.me {
                // Not a core that can send here (a corrupted word): nothing to read.
                self.pending &= !(1 << from);
                continue;
            }
            let me = self.me;
            let rx = self.rx[from].get_or_insert_with(|| Receiver::new(ring(from, me), 1));
            match rx.try_recv() {
                Ok(Some(m)) => {
                    // Its bit stays: the ring may hold more.
                    self.next_from = (from + 1) % n;
                    self.received += 1;
                    return Some((from, m));
                }
                Ok(None) => self.pending &= !(1 << from),
                Err(e) => {
                    self.pending &= !(1 << from);
                    log::error!("inter-core ring from core {from} is corrupt: {e:?}")
                }
            }
            if self.pending == 0 {
                // Drained what was named: anything sent meanwhile set its bit again.
                self.pending = MAIL[self.me].0.swap(0, Ordering::Acquire);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cores 59..64 belong to these tests (the rings and mail words are statics).
    fn setup() {
        let apics: [u32; MAX_CORES] = core::array::from_fn(|i| i as u32);
        publish_cores(&apics);
    }

    fn msg(i: u64) -> Payload {
        let mut m: Payload = Default::default();
        m[0] = i;
        m
    }

    #[test]
    fn no_mail_no_look_and_mail_is_read_from_the_named_rings_only() {
        setup();
        let (mut a, mut b, mut c) = (Link::new(60), Link::new(61), Link::new(62));
        assert!(!c.has_mail() && c.try_recv().is_none());
        assert!(a.try_send(62, &msg(1)) && b.try_send(62, &msg(2)) && a.try_send(62, &msg(3)));
        assert!(c.has_mail());
        let mut got = vec![];
        while let Some((from, m)) = c.try_recv() {
            got.push((from, m[0]));
        }
        got.sort();
        assert_eq!(got, [(60, 1), (60, 3), (61, 2)]);
        assert!(!c.has_mail(), "drained: the word and the pending set are empty");
        assert_eq!(c.received, 3);
    }

    #[test]
    fn a_multicast_is_written_once_read_whole_and_answered_line_by_line() {
        setup();
        let mut req = mcast::Request { seq: 2, node: 7, n: 3, ..Default::default() };
        req.ids[..3].copy_from_slice(&[70, 71, 72]);
        req.cores[..3].copy_from_slice(&[59, 61, 59]);
        // Core 58 publishes (no core is NMI-ready in a host test: no kick).
        assert!(mc_publish(58, &req));
        assert_eq!(mc_rung(59), 1 << 58);
        assert_eq!(mc_rung(59), 0, "taken");
        assert_eq!(mc_rung(61), 1 << 58);
        assert_ne!(MAIL[61].0.load(Ordering::Relaxed) & 1 << 58, 0, "its run loop looks");
        assert_eq!(mc_read(58, 59), Some(req.only(59)));
        assert_eq!(mc_read(58, 59).map(|r| r.n), Some(2));
        assert_eq!(mc_read(58, 60).map(|r| r.n), Some(0), "not named");
        assert_eq!(mc_answered(58), 0);
        mc_answer(61, 58, mcast::answer(2, 1, false, false));
        assert_eq!(mc_answered(58), 1 << 61);
        assert_eq!(mcast::decode(mc_line(58, 61)).total, 1);
        // The next request clears the answered word; a torn read is refused.
        req.seq = 4;
        assert!(mc_publish(58, &req));
        assert_eq!(mc_answered(58), 0);
        MC_SLOTS[58].seq.store(5, Ordering::Relaxed);
        assert_eq!(mc_read(58, 59), None, "odd: being rewritten");
        MC_SLOTS[58].seq.store(4, Ordering::Relaxed);
        assert!(!mc_publish(58, &mcast::Request { seq: 3, ..req }), "odd numbers are refused");
        MAIL[59].0.store(0, Ordering::Relaxed);
        MAIL[61].0.store(0, Ordering::Relaxed);
    }

    #[test]
    fn kicks_share_an_icr_write_per_x2apic_cluster_only() {
        // Cores 0-3 in cluster 0, 4 and 6 in cluster 1 (x2APIC ids 0x10 and 0x13), core 5
        // without a logical ID.
        let ldr = |c: usize| match c {
            0..=3 => 1 << c,
            4 => 1 << 16 | 1,
            6 => 1 << 16 | 1 << 3,
            _ => 0,
        };
        assert_eq!(one_cluster(0b111_1111, ldr), (0b1111, 0b111_0000));
        assert_eq!(one_cluster(0b111_0000, ldr), (1 << 16 | 0b1001, 0b010_0000));
        assert_eq!(one_cluster(0b010_0000, ldr), (0, 0b010_0000), "kicked physically");
        assert_eq!(one_cluster(0b110_0010, ldr), (0b10, 0b110_0000), "lowest core's cluster");
        assert!(joins(0, 4) && joins(0b11, 4) && !joins(0b11, 1 << 16 | 1) && !joins(0b11, 0));
    }

    #[test]
    fn mail_sent_while_the_receiver_drains_is_never_lost() {
        setup();
        const N: u64 = 20_000;
        let sender = std::thread::spawn(|| {
            let mut s = Link::new(63);
            for i in 0..N {
                while !s.try_send(59, &msg(i)) {
                    std::hint::spin_loop();
                }
            }
        });
        let mut r = Link::new(59);
        let mut next = 0;
        while next < N {
            if let Some((from, m)) = r.try_recv() {
                assert_eq!((from, m[0]), (63, next), "in order, none lost");
                next += 1;
            }
        }
        sender.join().unwrap();
        assert!(r.try_recv().is_none() && !r.has_mail());
    }
}
