// SPDX-License-Identifier: MIT OR Apache-2.0
//! Channel workloads. Every message carries (sequence, origin) and five words derived from
//! them, so each receiver checks content and order; every figure printed is a `bench` line
//! the host tool reads (TSC ticks are emulated instructions under Bochs).
//!
//! * `ping` / `pong`: `n` round trips; ping measures the round trip and the cost of a send,
//!   pong the cost of a receive. `mode=poll` spins, `mode=doorbell` blocks on the doorbell,
//!   `mode=mwait` sleeps in MWAIT on the next message's line (exitless where offered).
//!   Both count the VM exits they took during the exchange (`exit_count` hypercall).
//! * `stream` / `sink`: `n` messages one way; instructions and exits per message.
//! * `relay`: forwards messages around a ring of `guests` guests (`from`, `to` channels);
//!   each originates `n` messages with at most `window` in flight, and checks that its own
//!   come back complete, once, in order.
//! * `scribble`: sends three messages, then writes garbage over the next control word, and
//!   stays until the peer has met it (a second at most).
//! * `trespass`: reads the window of channel `window`, which it is not part of.
//!
//! Exit statuses: 0 success, 1 a check failed, 2 the channel was corrupted (reported).

use crate::arch::rdtsc;
use crate::channel::{self, Chan};
use crate::hypercall::exit_count;
use core::ops::ControlFlow;
use core::sync::atomic::{AtomicU64, Ordering};
pub use vmcall_proto::channel::message;
use vmcall_proto::channel::{ChannelError, Payload, HEADER_BYTES};
use vmcall_proto::guest::BootInfo;

const CORRUPT: u64 = 2;
const MAX_SAMPLES: usize = 4096;
/// Messages `stream` and `sink` add after the timed ones, single-stepped
/// (`arch::count_instructions`): the instructions of the code per message, on its own CPU.
const STEPPED: u64 = 64;
/// Messages `stream` sends after the timed ones and `sink` drains only once they are all
/// in the ring (it waits [`BURST_SETTLE_TICKS`] first), timing the drain: receives that
/// never wait for the sender. At most the ring's 64 slots.
const BURST: u64 = 48;
const BURST_SETTLE_TICKS: u64 = 400_000;

fn open(bi: &BootInfo, name_key: &str) -> Option<Chan> {
    let c = channel::open(bi, bi.arg(name_key));
    if c.is_none() {
        log::error!("no channel {:?} in my boot info", bi.arg(name_key));
    }
    c.map(|mut c| {
        match bi.arg_word("mode") {
            "doorbell" => c.set_doorbells(true),
            "mwait" if !c.use_mwait() => {
                log::warn!("mode=mwait: MONITOR/MWAIT not offered (mwait = true?): doorbells")
            }
            _ => {}
        }
        c
    })
}

fn corrupt(what: &str, e: ChannelError) -> u64 {
    log::error!("{what}: channel corrupted: {e:?}; stopping cleanly");
    CORRUPT
}

struct Stats {
    samples: [u32; MAX_SAMPLES],
    n: usize,
}

impl Stats {
    fn new() -> Self {
        Stats { samples: [0; MAX_SAMPLES], n: 0 }
    }
    fn add(&mut self, v: u64) {
        if self.n < MAX_SAMPLES {
            self.samples[self.n] = v.min(u32::MAX as u64) as u32;
            self.n += 1;
        }
    }
    /// (median, 99th percentile).
    fn summary(&mut self) -> (u32, u32) {
        let s = &mut self.samples[..self.n];
        if s.is_empty() {
            return (0, 0);
        }
        s.sort_unstable();
        (s[s.len() / 2], s[(s.len() * 99 / 100).min(s.len() - 1)])
    }
}

/// Doorbell mode: poll this many times before sleeping (`polls=`, default 0: always sleep,
/// which is what the doorbell measurement wants).
fn polls(bi: &BootInfo) -> u32 {
    bi.arg_int("polls") as u32
}

// Inlined: the library's receive then compiles into the loop as a user's call does.
#[inline(always)]
fn receive(c: &mut Chan, polls: u32) -> Result<Payload, ChannelError> {
    if c.doorbells() || c.mwait() {
        c.wait(polls)
    } else {
        c.recv()
    }
}

/// The baseline `bench channels` measures the library against (`raw=1`): a bare ring over
/// the channel's own memory, in the ring's layout (seven payload words, then the control
/// word `n + 1`; the consumer's count in its line every `slots/4` messages), and nothing
/// else: no link word, no epoch tags, no check of a control word beyond "is it the next
/// one", no re-read after the copy, no notification. What a guest that trusts its peer and
/// never sees it restart could get away with.
struct Raw {
    tx: u64,
    rx: u64,
    slots: u64,
    sent: u64,
    acked: u64,
    received: u64,
    every: u64,
}

impl Raw {
    fn new(c: &Chan, bi: &BootInfo) -> Raw {
        let d = bi.channels()[c.number];
        let slots = d.slots.max(1) as u64;
        Raw {
            tx: d.tx_gpa,
            rx: d.rx_gpa,
            slots,
            sent: 0,
            acked: 0,
            received: 0,
            every: (slots / 4).max(1),
        }
    }

    /// The word at byte `offset` of a ring.
    fn word(&self, ring: u64, offset: u64) -> &'static AtomicU64 {
        // The ring lies in the channel window, mapped for the guest's life; every offset
        // used is inside it (a header line, or a slot below `slots`) and 8-byte aligned, and
        // both sides use the memory only through atomics.
        // SAFETY: as above.
        unsafe { AtomicU64::from_ptr((ring + offset) as *mut u64) }
    }

    fn slot(&self, n: u64) -> u64 {
        HEADER_BYTES as u64 + 64 * (n % self.slots)
    }

    fn send(&mut self, m: &Payload) {
        while !self.try_send(m) {
            core::hint::spin_loop();
        }
    }

    /// Sends `m` unless the ring is full (the consumer's count read again first).
    #[inline(always)]
    fn try_send(&mut self, m: &Payload) -> bool {
        if self.sent - self.acked >= self.slots {
            self.acked = self.word(self.tx, 64).load(Ordering::Acquire);
            if self.sent - self.acked >= self.slots {
                return false;
            }
        }
        let s = self.slot(self.sent);
        for (i, v) in m.iter().enumerate() {
            self.word(self.tx, s + 8 * i as u64).store(*v, Ordering::Relaxed);
        }
        self.sent += 1;
        self.word(self.tx, s + 56).store(self.sent, Ordering::Release);
        true
    }

    #[inline(always)]
    fn try_recv(&mut self) -> Option<Payload> {
        let s = self.slot(self.received);
        if self.word(self.rx, s + 56).load(Ordering::Acquire) != self.received + 1 {
            return None;
        }
        let m =
            core::array::from_fn(|i| self.word(self.rx, s + 8 * i as u64).load(Ordering::Relaxed));
        self.received += 1;
        if self.received.is_multiple_of(self.every) {
            self.word(self.rx, 64).store(self.received, Ordering::Release);
        }
        Some(m)
    }

    fn recv(&mut self) -> Payload {
        loop {
            if let Some(m) = self.try_recv() {
                return m;
            }
            core::hint::spin_loop();
        }
    }

    /// The counts in the rings' header lines, for the run report's channel counters: what
    /// this side sent...
    fn finish_tx(&self) {
        self.word(self.tx, 0).store(self.sent, Ordering::Relaxed);
    }

    /// ...and what it received.
    fn finish_rx(&self) {
        self.word(self.rx, 64).store(self.received, Ordering::Release);
    }
}

/// Whether the workload runs on the bare ring instead of the library (`raw=1`).
fn raw(bi: &BootInfo) -> bool {
    bi.arg_int("raw") == 1
}

/// `ping` on the bare ring ([`Raw`]): the same exchange, the same figures.
/// The same `2n` round trips as the library's `ping` makes (see `pong_raw`); the figures
/// are the first `n`'s, which `pong_raw` answers without timing anything (as the library's
/// `pong` answers with `Chan::serve`).
fn ping_raw(bi: &BootInfo, c: &Chan) -> u64 {
    let mut r = Raw::new(c, bi);
    let n = bi.arg_int("n");
    let (mut rtt, mut send, mut rtt_sr) = (Stats::new(), Stats::new(), Stats::new());
    let mut e = 0;
    let e0 = exit_count();
    for i in 0..2 * n {
        if i == n {
            e = exit_count() - e0 - 1;
        }
        let t0 = rdtsc();
        r.send(&message(i, 0));
        let t1 = rdtsc();
        let reply = r.recv();
        let t2 = rdtsc();
        if reply != message(i, 1) {
            log::error!("ping: reply {i} wrong: {:?}", &reply[..2]);
            return 1;
        }
        if i < n {
            send.add(t1 - t0);
            rtt.add(t2 - t0);
        } else {
            rtt_sr.add(t2 - t0);
        }
    }
    r.finish_tx();
    r.finish_rx();
    let ((rm, rp), (sm, _), (srm, _)) = (rtt.summary(), send.summary(), rtt_sr.summary());
    log::info!(
        "bench ping mode=poll raw=1 n={n} rtt_median={rm} rtt_p99={rp} send_median={sm} \
         sendrecv_rtt_median={srm} exits={e} \
         doorbells_rung=0 doorbells_taken=0 mwait=0"
    );
    0
}

/// `pong` on the bare ring ([`Raw`]).
fn pong_raw(bi: &BootInfo, c: &Chan) -> u64 {
    let mut r = Raw::new(c, bi);
    let n = bi.arg_int("n");
    let mut recv = Stats::new();
    let e0 = exit_count();
    // The round trips: answered untimed (as the library's `pong` does with `Chan::serve`).
    for i in 0..n {
        let m = r.recv();
        if m != message(i, 0) {
            log::error!("pong: message {i} wrong: {:?}", &m[..2]);
            return 1;
        }
        r.send(&message(i, 1));
    }
    let e = exit_count() - e0 - 1;
    for i in n..2 * n {
        // Time only the successful receive, as `pong` does.
        let m = loop {
            let t0 = rdtsc();
            if let Some(m) = r.try_recv() {
                recv.add(rdtsc() - t0);
                break m;
            }
            core::hint::spin_loop();
        };
        if m != message(i, 0) {
            log::error!("pong: message {i} wrong: {:?}", &m[..2]);
            return 1;
        }
        r.send(&message(i, 1));
    }
    r.finish_tx();
    r.finish_rx();
    log::info!(
        "bench pong mode=poll raw=1 n={n} recv_median={} exits={e} doorbells_taken=0 \
         doorbells_rung=0 mwait=0",
        recv.summary().0
    );
    0
}

pub fn ping(bi: &BootInfo) -> u64 {
    let Some(mut c) = open(bi, "channel") else { return 1 };
    if raw(bi) {
        return ping_raw(bi, &c);
    }
    // Read once: `arg_int` searches the workload table and parses the arguments (about
    // 1,600 instructions), which inside the loop was most of what a message cost.
    let polls = polls(bi);
    // One loop per mode, each with its one receive call, as a program that uses one mode
    // is written (a choice inside the loop would make the compiler merge the two receives'
    // results in memory on every message).
    if c.doorbells() || c.mwait() {
        ping_loop(bi, &mut c, |c| c.wait(polls))
    } else {
        ping_calls(bi, &mut c)
    }
}

/// `ping` polling: `n` round trips with [`Chan::call`], the request/reply call the library
/// offers for it (the round trip figures), then `n` more with [`Chan::send`] and
/// [`Chan::recv`] (the cost of a send alone, and the round trip those two make:
/// `sendrecv_rtt_median`). `pong` answers all `2n` the same way.
fn ping_calls(bi: &BootInfo, c: &mut Chan) -> u64 {
    let n = bi.arg_int("n");
    let (mut rtt, mut send, mut rtt_sr) = (Stats::new(), Stats::new(), Stats::new());
    let e0 = exit_count();
    let mut reply = [0u64; vmcall_proto::channel::WORDS];
    for i in 0..n {
        let t0 = rdtsc();
        if let Err(e) = c.call(&message(i, 0), &mut reply) {
            return corrupt("ping", e);
        }
        let t1 = rdtsc();
        if reply != message(i, 1) {
            log::error!("ping: reply {i} wrong: {:?}", &reply[..2]);
            return 1;
        }
        rtt.add(t1 - t0);
    }
    // The exits of the round trips (the figure is per round trip).
    let e = exit_count() - e0 - 1;
    for i in n..2 * n {
        let t0 = rdtsc();
        if let Err(e) = c.send(&message(i, 0)) {
            return corrupt("ping", e);
        }
        let t1 = rdtsc();
        let reply = match c.recv() {
            Ok(m) => m,
            Err(e) => return corrupt("ping", e),
        };
        let t2 = rdtsc();
        if reply != message(i, 1) {
            log::error!("ping: reply {i} wrong: {:?}", &reply[..2]);
            return 1;
        }
        send.add(t1 - t0);
        rtt_sr.add(t2 - t0);
    }
    c.rx.flush_ack();
    let ((rm, rp), (sm, _), (srm, _)) = (rtt.summary(), send.summary(), rtt_sr.summary());
    log::info!(
        "bench ping mode=poll n={n} rtt_median={rm} rtt_p99={rp} send_median={sm} \
         sendrecv_rtt_median={srm} exits={e} doorbells_rung={} doorbells_taken=0 mwait=0",
        c.rung,
    );
    0
}

#[inline(always)]
fn ping_loop(
    bi: &BootInfo,
    c: &mut Chan,
    mut receive: impl FnMut(&mut Chan) -> Result<Payload, ChannelError>,
) -> u64 {
    let n = bi.arg_int("n");
    let (mut rtt, mut send) = (Stats::new(), Stats::new());
    let e0 = exit_count();
    for i in 0..n {
        let t0 = rdtsc();
        if let Err(e) = c.send(&message(i, 0)) {
            return corrupt("ping", e);
        }
        let t1 = rdtsc();
        let reply = match receive(c) {
            Ok(m) => m,
            Err(e) => return corrupt("ping", e),
        };
        let t2 = rdtsc();
        if reply != message(i, 1) {
            log::error!("ping: reply {i} wrong: {:?}", &reply[..2]);
            return 1;
        }
        send.add(t1 - t0);
        rtt.add(t2 - t0);
    }
    let e = exit_count() - e0 - 1;
    c.rx.flush_ack();
    let ((rm, rp), (sm, _)) = (rtt.summary(), send.summary());
    let d = crate::arch::DOORBELLS.load(core::sync::atomic::Ordering::Relaxed);
    log::info!(
        "bench ping mode={} n={n} rtt_median={rm} rtt_p99={rp} send_median={sm} exits={e} \
         doorbells_rung={} doorbells_taken={d} mwait={}",
        bi.arg_word("mode"),
        c.rung,
        c.mwait() as u8
    );
    0
}

pub fn pong(bi: &BootInfo) -> u64 {
    let Some(mut c) = open(bi, "channel") else { return 1 };
    if raw(bi) {
        return pong_raw(bi, &c);
    }
    // Read once: `arg_int` searches the workload table and parses the arguments (about
    // 1,600 instructions), which inside the loop was most of what a message cost.
    let polls = polls(bi);
    // One loop per mode, as in `ping`.
    let n = bi.arg_int("n");
    if c.doorbells() || c.mwait() {
        let e0 = exit_count();
        return pong_loop(bi, 0..n, e0, &mut c, |c, _| c.wait(polls));
    }
    // Polling: `ping`'s `n` calls answered with `Chan::serve` (the round trip: nothing
    // timed here), then its `n` sends and receives with `try_recv` and `send`, each
    // successful receive timed.
    let e0 = exit_count();
    if n > 0 {
        let mut i = 0;
        let served = c.serve(|req| {
            if *req != message(i, 0) {
                return ControlFlow::Break(Err(i));
            }
            if i + 1 == n {
                return ControlFlow::Break(Ok(()));
            }
            i += 1;
            ControlFlow::Continue(message(i - 1, 1))
        });
        match served {
            Err(e) => return corrupt("pong", e),
            Ok(Err(i)) => {
                log::error!("pong: request {i} wrong");
                return 1;
            }
            // The last request: answered as a server that stops answers it.
            Ok(Ok(())) => {
                if let Err(e) = c.send(&message(n - 1, 1)) {
                    return corrupt("pong", e);
                }
            }
        }
    }
    let e = exit_count() - e0 - 1;
    pong_loop(bi, n..2 * n, e, &mut c, |c, recv| {
        // Time only the successful receive: polling misses are not a receive's cost.
        loop {
            let t0 = rdtsc();
            match c.try_recv() {
                Ok(Some(m)) => {
                    recv.add(rdtsc() - t0);
                    return Ok(m);
                }
                Ok(None) => core::hint::spin_loop(),
                Err(e) => return Err(e),
            }
        }
    })
}

/// Answers the messages `seq` (`message(i, 0)` with `message(i, 1)`) with `receive`, and
/// prints pong's line. `exits`: an exit count taken before the exchange (the loop's exits
/// are counted from it), or, in polling mode, the exits of the round trips already
/// counted (printed as they are).
#[inline(always)]
fn pong_loop(
    bi: &BootInfo,
    seq: core::ops::Range<u64>,
    exits: u64,
    c: &mut Chan,
    mut receive: impl FnMut(&mut Chan, &mut Stats) -> Result<Payload, ChannelError>,
) -> u64 {
    let polling = !(c.doorbells() || c.mwait());
    let n = seq.end - seq.start;
    let mut recv = Stats::new();
    let d0 = crate::arch::DOORBELLS.load(core::sync::atomic::Ordering::Relaxed);
    let first = seq.start;
    for i in seq {
        let m = match receive(c, &mut recv) {
            Ok(m) => m,
            // Polling: a peer that made its `n` round trips and left (any guest that uses
            // `pong` as an n-echo, not `ping` with its second, timed half) ends it cleanly.
            Err(ChannelError::PeerGone) if polling && first > 0 && i == first => {
                log::info!("pong: the peer left after {first} round trips");
                break;
            }
            Err(e) => return corrupt("pong", e),
        };
        if m != message(i, 0) {
            log::error!("pong: message {i} wrong: {:?}", &m[..2]);
            return 1;
        }
        if let Err(e) = c.send(&message(i, 1)) {
            return corrupt("pong", e);
        }
    }
    let e = if polling { exits } else { exit_count() - exits - 1 };
    c.rx.flush_ack();
    let d = crate::arch::DOORBELLS.load(core::sync::atomic::Ordering::Relaxed) - d0;
    log::info!(
        "bench pong mode={} n={n} recv_median={} exits={e} doorbells_taken={d} doorbells_rung={} \
         mwait={}",
        bi.arg_word("mode"),
        recv.summary().0,
        c.rung,
        c.mwait() as u8
    );
    0
}

pub fn stream(bi: &BootInfo) -> u64 {
    let Some(mut c) = open(bi, "channel") else { return 1 };
    let n = bi.arg_int("n");
    let mut raw = raw(bi).then(|| Raw::new(&c, bi));
    let e0 = exit_count();
    let t0 = rdtsc();
    if let Some(r) = raw.as_mut() {
        for i in 0..n {
            r.send(&message(i, 0));
        }
        r.finish_tx();
    } else {
        for i in 0..n {
            if let Err(e) = c.send(&message(i, 0)) {
                return corrupt("stream", e);
            }
        }
    }
    let t = rdtsc() - t0;
    let e = exit_count() - e0 - 1;
    let full_spins = c.full_spins;
    // Then a burst the sink drains at its own pace once it is all in the ring (see `sink`).
    for i in n..n + BURST {
        let m = message(i, 0);
        match raw.as_mut() {
            Some(r) => r.send(&m),
            None => {
                if let Err(e) = c.send(&m) {
                    return corrupt("stream", e);
                }
            }
        }
    }
    // Then STEPPED more, each send single-stepped: the instructions of a send that finds
    // room (an attempt that finds the ring full is counted apart, per attempt).
    let (mut code, mut full, mut full_code) = (0u64, 0u64, 0u64);
    for i in n + BURST..n + BURST + STEPPED {
        let m = message(i, 0);
        loop {
            let (done, k) = crate::arch::count_instructions(|| match raw.as_mut() {
                Some(r) => Ok(r.try_send(&m)),
                None => match c.try_send(&m) {
                    Ok(()) => Ok(true),
                    Err(ChannelError::Full) => Ok(false),
                    Err(e) => Err(e),
                },
            });
            match done {
                Ok(true) => {
                    code += k;
                    break;
                }
                Ok(false) => (full, full_code) = (full + 1, full_code + k),
                Err(e) => return corrupt("stream", e),
            }
        }
    }
    if let Some(r) = &raw {
        r.finish_tx();
    }
    log::info!(
        "bench stream n={n} instr_per_msg={} exits={e} doorbells_rung={} raw={} \
         code_per_send={} code_per_full_try={} full_spins={}",
        t / n.max(1),
        c.rung,
        raw.is_some() as u8,
        code / STEPPED,
        full_code.checked_div(full).unwrap_or(0),
        full_spins
    );
    // Stay until the sink says it took everything: exiting takes the channel down, and a
    // receiver is told `PeerGone` rather than handed what is still in the ring.
    let deadline = rdtsc() + 5_000 * bi.tsc_per_ms;
    while rdtsc() < deadline {
        match c.try_recv() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) => core::hint::spin_loop(),
        }
    }
    0
}

pub fn sink(bi: &BootInfo) -> u64 {
    let Some(mut c) = open(bi, "channel") else { return 1 };
    let n = bi.arg_int("n");
    // Read once: `arg_int` searches the workload table and parses the arguments (about
    // 1,600 instructions), which inside the loop was most of what a message cost.
    let polls = polls(bi);
    let e0 = exit_count();
    let t0 = rdtsc();
    let (mut lost, mut dup, mut bad) = (0u64, 0u64, 0u64);
    let mut expect = 0u64;
    let mut raw = raw(bi).then(|| Raw::new(&c, bi));
    while expect < n {
        let m = match raw.as_mut() {
            Some(r) => r.recv(),
            None => match receive(&mut c, polls) {
                Ok(m) => m,
                Err(e) => {
                    c.rx.flush_ack();
                    return corrupt("sink", e);
                }
            },
        };
        match m[0] {
            s if s == expect => {}
            s if s < expect => dup += 1,
            s => lost += s - expect,
        }
        if m != message(m[0], 0) {
            bad += 1;
        }
        expect = expect.max(m[0] + 1);
    }
    let t = rdtsc() - t0;
    let e = exit_count() - e0 - 1;
    let empty_polls = c.empty_polls;
    // Then the burst: wait until the sender has had ample time to fill the ring, then time
    // the receives of messages already there (no waiting for the sender: what receiving
    // costs in TSC ticks with the peer spinning on a full ring). Only a `stream` peer sends
    // the burst and the stepped messages after the timed ones: with any other peer (e.g.
    // the hostile suite's flooder) nothing is there after the wait, and both are skipped.
    let settle = rdtsc() + BURST_SETTLE_TICKS;
    while rdtsc() < settle {
        core::hint::spin_loop();
    }
    let t1 = rdtsc();
    let first = match raw.as_mut() {
        Some(r) => Ok(r.try_recv()),
        None => c.try_recv(),
    };
    let (mut burst, mut code, mut empty, mut empty_code) = (0u64, 0u64, 0u64, 0u64);
    match first {
        // A peer that sent only the timed messages may have left meanwhile: nothing more.
        Ok(None) | Err(ChannelError::PeerGone) => {}
        Err(e) => {
            c.rx.flush_ack();
            return corrupt("sink", e);
        }
        Ok(Some(m0)) => {
            bad += (m0 != message(n, 0)) as u64;
            for i in n + 1..n + BURST {
                let m = match raw.as_mut() {
                    Some(r) => r.recv(),
                    None => match c.recv() {
                        Ok(m) => m,
                        Err(e) => {
                            c.rx.flush_ack();
                            return corrupt("sink", e);
                        }
                    },
                };
                bad += (m != message(i, 0)) as u64;
            }
            burst = (rdtsc() - t1) / BURST;
            // Then the stream's STEPPED more, each receive single-stepped: the instructions
            // of a receive that finds a message (an empty poll is counted apart, per poll).
            for i in n + BURST..n + BURST + STEPPED {
                let m = loop {
                    let (got, k) = crate::arch::count_instructions(|| match raw.as_mut() {
                        Some(r) => Ok(r.try_recv()),
                        None => c.try_recv(),
                    });
                    match got {
                        Ok(Some(m)) => {
                            code += k;
                            break m;
                        }
                        Ok(None) => (empty, empty_code) = (empty + 1, empty_code + k),
                        Err(e) => {
                            c.rx.flush_ack();
                            return corrupt("sink", e);
                        }
                    }
                };
                bad += (m != message(i, 0)) as u64;
            }
        }
    }
    match &raw {
        Some(r) => r.finish_rx(),
        None => c.rx.flush_ack(),
    }
    // All taken: the stream may go.
    let _ = c.send(&message(n, 1));
    log::info!(
        "bench sink n={n} instr_per_msg={} exits={e} lost={lost} duplicated={dup} damaged={bad} \
         raw={} code_per_recv={} code_per_empty_poll={} burst_per_recv={burst} \
         empty_polls={empty_polls}",
        t / n.max(1),
        raw.is_some() as u8,
        code / STEPPED,
        empty_code.checked_div(empty).unwrap_or(0)
    );
    if lost + dup + bad == 0 {
        0
    } else {
        1
    }
}

pub fn relay(bi: &BootInfo) -> u64 {
    let (Some(mut to), Some(mut from)) = (open(bi, "to"), open(bi, "from")) else { return 1 };
    let n = bi.arg_int("n");
    let guests = bi.arg_int("guests").max(2);
    let window = bi.arg_int("window").max(1);
    let me = bi.guest_id as u64;
    let (mut originated, mut returned, mut forwarded) = (0u64, 0u64, 0u64);
    let (mut dup, mut lost, mut reordered, mut damaged) = (0u64, 0u64, 0u64, 0u64);
    let must_forward = (guests - 1) * n;
    let t0 = rdtsc();
    while returned < n || forwarded < must_forward {
        if originated < n && originated - returned < window {
            match to.try_send(&message(originated, me)) {
                Ok(()) => originated += 1,
                Err(ChannelError::Full) => {}
                Err(e) => return corrupt("relay", e),
            }
        }
        let m = match from.try_recv() {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => return corrupt("relay", e),
        };
        if m != message(m[0], m[1]) {
            damaged += 1;
        }
        if m[1] == me {
            match m[0] {
                s if s == returned => {}
                s if s < returned => dup += 1,
                s if s >= originated => lost += 1,
                _ => reordered += 1,
            }
            returned += 1;
        } else {
            if let Err(e) = to.send(&m) {
                return corrupt("relay", e);
            }
            forwarded += 1;
        }
    }
    from.rx.flush_ack();
    log::info!(
        "relay: originated {originated}, returned {returned}, forwarded {forwarded}; lost {lost}, \
         duplicated {dup}, reordered {reordered}, damaged {damaged}; {} instructions",
        rdtsc() - t0
    );
    if lost + dup + reordered + damaged == 0 {
        0
    } else {
        1
    }
}

pub fn scribble(bi: &BootInfo) -> u64 {
    let Some(mut c) = open(bi, "channel") else { return 1 };
    for i in 0..3 {
        if c.send(&message(i, 0)).is_err() {
            return 1;
        }
    }
    let d = bi.channels()[c.number];
    let control = d.tx_gpa + vmcall_proto::channel::HEADER_BYTES as u64 + 64 * 3 + 56;
    log::info!("scribble: writing garbage over the control word of slot 3 at {control:#x}");
    // The peer must detect it. Volatile: the write must happen.
    // SAFETY: deliberately corrupting our own outgoing ring (shared memory we may write).
    unsafe { core::ptr::write_volatile(control as *mut u64, 0xdead_beef_dead_beef) };
    // Alive until the peer has taken the three messages and met the garbage (its error
    // path publishes its count: 3), a second at most. Dying at once would race the peer's
    // look: a receiver whose link is already down reports `PeerGone` first (the library's
    // rule, `vmcall_proto::endpoint`), and whether it is depends on how far the two cores'
    // setups are apart, not on the corruption this proves.
    // `tx_gpa`, `slots`: the channel's memory, mapped for us.
    // SAFETY: our own outgoing ring, read through its atomics only.
    let ring = unsafe { vmcall_proto::channel::Ring::from_raw(d.tx_gpa as *mut u8, d.slots) };
    let deadline = rdtsc() + 1_000 * bi.tsc_per_ms;
    while ring.received() < 3 && rdtsc() < deadline {
        core::hint::spin_loop();
    }
    0
}

pub fn trespass(bi: &BootInfo) -> u64 {
    let k = bi.arg_int("window") as u32;
    let addr = vmcall_proto::guest::channel_window(k);
    if bi.channels().iter().any(|d| d.index == k) {
        log::error!("trespass: channel {k} is mine; nothing to prove");
        return 1;
    }
    log::info!("trespass: reading the window of channel {k} at {addr:#x}, which is not mine");
    // Deliberately touching memory EPT does not back for us: the hypervisor must stop us here.
    // SAFETY: our page tables map the address, so the read itself is valid.
    let v = unsafe { core::ptr::read_volatile(addr as *const u64) };
    log::error!("trespass: read {v:#x}: another pair's channel is reachable");
    1
}

/// `impatient`: `n` calls with [`Chan::call_until`], each with a deadline of `ms`. Every
/// reply it gets must be its own request's (a late reply to a call it gave up is the
/// library's to discard, never this call's reply); it counts the calls it gave up. Exits 0
/// when every reply it got was right.
pub fn impatient(bi: &BootInfo) -> u64 {
    use crate::channel::CallEnd;
    let Some(mut c) = open(bi, "channel") else { return 1 };
    let (n, ms) = (bi.arg_int("n"), bi.arg_int("ms"));
    let (mut replied, mut gave_up, mut not_sent) = (0u64, 0u64, 0u64);
    let mut reply = [0u64; vmcall_proto::channel::WORDS];
    for i in 0..n {
        // The first call waits up to 10 s: the server may still be starting.
        let wait = if i == 0 { 10_000 } else { ms };
        let deadline = rdtsc().saturating_add(wait.saturating_mul(bi.tsc_per_ms));
        match c.call_until(&message(i, 0), &mut reply, deadline) {
            Ok(CallEnd::Replied) if reply == message(i, 1) => replied += 1,
            Ok(CallEnd::Replied) => {
                log::error!("impatient: the reply to call {i} is not its own: {:?}", &reply[..2]);
                return 1;
            }
            Ok(CallEnd::GivenUp) => gave_up += 1,
            Ok(CallEnd::NotSent) => {
                // The server expects every request in order: one not sent ends the run.
                not_sent += 1;
                log::error!("impatient: call {i} could not be sent in time");
                break;
            }
            Err(e) => return corrupt("impatient", e),
        }
    }
    log::info!(
        "impatient: {n} calls, {replied} replied in time, {gave_up} given up, {not_sent} not \
         sent; every reply its own call's; still held at the end: {}",
        c.call_held() as u8
    );
    (not_sent != 0) as u64
}

/// `laggard`: takes `n` requests (polling, each within 10 s) and answers each with its reply,
/// every `every`-th only after spinning `lag_ms`. Exits 0 when every request came whole
/// and in order.
pub fn laggard(bi: &BootInfo) -> u64 {
    let Some(mut c) = open(bi, "channel") else { return 1 };
    let (n, every, lag) = (bi.arg_int("n"), bi.arg_int("every"), bi.arg_int("lag_ms"));
    let mut late = 0u64;
    for i in 0..n {
        // Polling (the client does not ring), each request within 10 s.
        let deadline = rdtsc().saturating_add(10_000 * bi.tsc_per_ms);
        let req = loop {
            match c.try_recv() {
                Ok(Some(m)) => break m,
                Ok(None) if rdtsc() >= deadline => {
                    log::error!("laggard: request {i} did not come within 10 s");
                    return 1;
                }
                Ok(None) => core::hint::spin_loop(),
                Err(e) => return corrupt("laggard", e),
            }
        };
        if req != message(i, 0) {
            log::error!("laggard: request {i} wrong: {:?}", &req[..2]);
            return 1;
        }
        if (i + 1) % every == 0 {
            let t = rdtsc();
            while rdtsc() - t < lag * bi.tsc_per_ms {
                core::hint::spin_loop();
            }
            late += 1;
        }
        if let Err(e) = c.send(&message(i, 1)) {
            return corrupt("laggard", e);
        }
    }
    log::info!("laggard: {n} requests whole and in order, {late} answered {lag} ms late");
    0
}
