// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask bench channels`: the channel ring measured against its neighbours.
//!
//! * Host, real cores: two threads pinned to two cores exchange 64-byte messages through
//!   the mkvisor ring (`vmcall_proto::channel`), the channel library's own code, a bare
//!   cache-line ping-pong (two lines, one per direction: the reference of the ratios), one
//!   line shared by both directions (the fewest lines a round trip can move), a bare ring
//!   whose replies go into the request's slot (the library's call, unchecked), a raw line
//!   ring (lines and a sequence word, nothing else: the streaming baseline),
//!   crossbeam-channel, std mpsc and a pair of Linux pipes. Round trips give median and p99
//!   latency (TSC, converted with a clock calibrated in the same run); a one-way burst
//!   gives throughput. Ratios are to the cache-line ping-pong and the raw line ring of the
//!   same run; the round trips are also measured against the ping-pong, and the ring's
//!   streaming against the raw line ring, in alternating pairs: the machine is noisy,
//!   ratios are less so. Every wait spins with a deadline.
//! * In Bochs: guest-measured instruction counts (the TSC counts emulated instructions)
//!   and VM exits from dedicated two-CPU configs, one pair alone per run: polling,
//!   doorbells, MWAIT (exitless notification), streaming.
//!
//! Calls: `crate::run` to boot, `vmcall_proto::channel` for the ring; nothing else of ours.
//!
//! These are benchmarks: they print figures, they do not pass or fail.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use vmcall_proto::channel::{ChannelError, OwnedRing, Payload, Receiver, Sender};
use vmcall_proto::endpoint::{ack_every, LinkWatch};

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct HostRow {
    pub name: String,
    pub rtt_median_ns: f64,
    pub rtt_p99_ns: f64,
    pub throughput_mmsg_s: f64,
    pub rtt_ratio_to_cacheline: f64,
    pub throughput_ratio_to_cacheline: f64,
    /// One-way throughput as a ratio to the raw line ring's (the streaming limit) in the
    /// same run.
    #[serde(default)]
    pub throughput_ratio_to_raw: f64,
    /// The round trips' latency histogram: log-spaced buckets (four per doubling), all
    /// repetitions together.
    #[serde(default)]
    pub rtt_histogram: Vec<Bucket>,
    /// Repetitions (`--repeat`): the figures above are medians over them.
    #[serde(default)]
    pub repeats: u32,
    /// Distribution-free confidence intervals of those medians (order statistics), and
    /// their confidence (at least 0.95 from 6 repetitions; less below, `[min, max]`).
    #[serde(default)]
    pub rtt_median_ns_ci: Option<[f64; 2]>,
    #[serde(default)]
    pub throughput_mmsg_s_ci: Option<[f64; 2]>,
    #[serde(default)]
    pub ci_confidence: f64,
}

/// The median of `v` with a distribution-free confidence interval: the order statistics
/// `x(j)`, `x(n-1-j)` around it, `j` as large as keeps the coverage (from the binomial
/// distribution with p = 1/2) at least 0.95, else `[min, max]`. Returns (median, low,
/// high, coverage).
pub fn median_ci(v: &[f64]) -> (f64, f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN, 0.0);
    }
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    // P(B < j) for B ~ Bin(n, 1/2).
    let below = |j: usize| -> f64 {
        let mut c = 1.0f64;
        let mut sum = 0.0;
        for i in 0..j {
            sum += c;
            c = c * (n - i) as f64 / (i + 1) as f64;
        }
        sum / 2f64.powi(n as i32)
    };
    // Interval [x(j), x(n-1-j)] (0-based) covers the median with 1 - 2 P(B <= j).
    let coverage = |j: usize| 1.0 - 2.0 * below(j + 1);
    let mut j = 0;
    while j + 1 < n / 2 && coverage(j + 1) >= 0.95 {
        j += 1;
    }
    (median, s[j], s[n - 1 - j], if n == 1 { 0.0 } else { coverage(j) })
}

/// How finely the host clocks measure: the smallest step seen between two readings.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct TimerResolution {
    /// `std::time::Instant` (CLOCK_MONOTONIC), ns.
    pub instant_ns: f64,
    /// The TSC as this process reads it (a VM may step it coarsely), ns.
    pub tsc_ns: f64,
    /// TSC ticks per ns, calibrated against `Instant` over 200 ms.
    pub tsc_ghz: f64,
}

/// Measures [`TimerResolution`].
pub fn timer_resolution() -> TimerResolution {
    let (t0, i0) = (rdtsc(), Instant::now());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let ghz = (rdtsc() - t0) as f64 / i0.elapsed().as_nanos() as f64;
    let mut instant = u128::MAX;
    let mut tsc = u64::MAX;
    for _ in 0..100_000 {
        let a = Instant::now();
        let b = Instant::now();
        let d = (b - a).as_nanos();
        if d > 0 {
            instant = instant.min(d);
        }
        let (x, y) = (rdtsc(), rdtsc());
        if y > x {
            tsc = tsc.min(y - x);
        }
    }
    TimerResolution { instant_ns: instant as f64, tsc_ns: tsc as f64 / ghz, tsc_ghz: ghz }
}

/// Where and when a benchmark ran.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct BenchMeta {
    pub tool_version: String,
    pub git_commit: Option<String>,
    pub date_utc: String,
    pub host: crate::report::Host,
    /// The load average again at the end: a busy host shows in both.
    pub load_average_after: [f64; 3],
    pub timer: TimerResolution,
}

/// One histogram bucket: round trips of at most `upper_ns` (and more than the previous
/// bucket's bound).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Bucket {
    pub upper_ns: f64,
    pub count: u64,
}

/// A log-spaced histogram of `samples` (ns) on a fixed grid: bounds `2^(i/4)` ns, so that
/// histograms of several runs add bucket by bucket; empty buckets kept between the first
/// and the last sample so that the shape reads true.
pub fn histogram(samples: &[f64]) -> Vec<Bucket> {
    // (Rounding aside: a sample on a bound belongs to the bucket below it.)
    let index = |x: f64| (x.max(1.0).log2() * 4.0 - 1e-9).ceil() as i64;
    let (Some(lo), Some(hi)) =
        (samples.iter().map(|&x| index(x)).min(), samples.iter().map(|&x| index(x)).max())
    else {
        return vec![];
    };
    let mut b: Vec<Bucket> =
        (lo..=hi).map(|i| Bucket { upper_ns: 2f64.powf(i as f64 / 4.0), count: 0 }).collect();
    for &x in samples {
        b[(index(x) - lo) as usize].count += 1;
    }
    b
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Emulated {
    pub send_instructions: u64,
    pub receive_instructions: u64,
    pub round_trip_instructions_median: u64,
    pub round_trip_instructions_p99: u64,
    pub stream_instructions_per_message_sender: u64,
    pub stream_instructions_per_message_receiver: u64,
    pub exits_per_message_polling: f64,
    pub doorbell_round_trip_instructions_median: u64,
    /// All VM exits both guests took during the doorbell exchange, per doorbell rung.
    pub exits_per_doorbell_both_sides: f64,
    /// Of those, the ones that were not the ringing hypercall itself, per doorbell taken:
    /// what receiving a doorbell costs in exits.
    pub exits_per_doorbell_receiver: f64,
    pub doorbells_rung: u64,
    pub doorbells_taken: u64,
    /// Exitless notification (`configs/bench-mwait.toml`: both sides wait in MWAIT on the
    /// next message's line): its figures, or why there are none.
    #[serde(default)]
    pub mwait: Option<MwaitFigures>,
    #[serde(default)]
    pub mwait_problem: Option<String>,
    /// The same polling round trip and stream on a bare ring over the same channel memory
    /// (the workloads' `raw=1`: no link word, no epochs, no checks), in the same run: what
    /// the library's own code and settings cost on top (absent in older files).
    #[serde(default)]
    pub raw: Option<RawFigures>,
    /// The instructions a stream's send and receive retire on their own CPU
    /// (`bench-stream.toml`'s single-stepped messages, `arch::count_instructions`): the
    /// code's cost alone, where the TSC figures are the time of the pair, waits and spins
    /// included (see the README, "The library against a bare ring").
    #[serde(default)]
    pub send_code: u64,
    #[serde(default)]
    pub receive_code: u64,
    /// The polling round trip made of a send and a receive, `pong` timing each receive (the
    /// second half of `bench-poll.toml`'s exchange: how the round trip was measured before
    /// `Chan::call` and `Chan::serve`; absent in older files).
    #[serde(default)]
    pub sendrecv_round_trip_instructions_median: u64,
}

/// The bare-ring baseline in Bochs (`raw=1` on `bench-poll.toml` and `bench-stream.toml`).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct RawFigures {
    /// The second half of the exchange, as for the library (`Emulated`).
    #[serde(default)]
    pub sendrecv_round_trip_instructions_median: u64,
    pub round_trip_instructions_median: u64,
    pub send_instructions: u64,
    pub receive_instructions: u64,
    pub stream_instructions_per_message_sender: u64,
    pub stream_instructions_per_message_receiver: u64,
    #[serde(default)]
    pub send_code: u64,
    #[serde(default)]
    pub receive_code: u64,
}

/// `config` (a file under the workspace) with `raw = 1` added to every guest's `args`.
pub fn raw_variant(config: &str) -> Result<String> {
    let text = std::fs::read_to_string(crate::workspace_root().join(config))?;
    let out: Vec<String> = text
        .lines()
        .map(|l| match l.strip_prefix("args = {").and_then(|r| r.strip_suffix('}')) {
            Some(inner) => format!("args = {{{}, raw = 1 }}", inner.trim_end()),
            None => l.to_string(),
        })
        .collect();
    if !out.iter().any(|l| l.contains("raw = 1")) {
        bail!("{config}: no `args = {{ ... }}` line to add `raw = 1` to");
    }
    Ok(out.join("\n") + "\n")
}

/// Boots `config` with `raw = 1` (kept as `target/xtask/raw-FILE`); its serial log.
pub fn boot_raw(config: &str) -> Result<String> {
    let name = std::path::Path::new(config).file_name().and_then(|f| f.to_str()).unwrap_or("x");
    let r = boot_variant(&format!("raw-{name}"), &raw_variant(config)?, "")?;
    if r.outcome != "ok" {
        bail!("benchmark run {config} (raw) ended {}: {:?}", r.outcome, r.problems);
    }
    Ok(std::fs::read_to_string(&r.serial_log)?)
}

fn raw_figures() -> Result<RawFigures> {
    let poll = boot_raw("configs/bench-poll.toml")?;
    let st = boot_raw("configs/bench-stream.toml")?;
    Ok(RawFigures {
        round_trip_instructions_median: bench_value(&poll, "ping", "rtt_median")?,
        sendrecv_round_trip_instructions_median: bench_value(&poll, "ping", "sendrecv_rtt_median")?,
        send_instructions: bench_value(&poll, "ping", "send_median")?,
        receive_instructions: bench_value(&poll, "pong", "recv_median")?,
        stream_instructions_per_message_sender: bench_value(&st, "stream", "instr_per_msg")?,
        stream_instructions_per_message_receiver: bench_value(&st, "sink", "instr_per_msg")?,
        send_code: bench_value(&st, "stream", "code_per_send")?,
        receive_code: bench_value(&st, "sink", "code_per_recv")?,
    })
}

/// The MWAIT ping-pong's figures.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct MwaitFigures {
    pub round_trip_instructions_median: u64,
    pub round_trip_instructions_p99: u64,
    /// VM exits during the exchange per message received (each message is a notification):
    /// the sender's and the receiver's side.
    pub exits_per_notification_ping: f64,
    pub exits_per_notification_pong: f64,
    pub doorbells_rung: u64,
}

fn mwait_figures() -> Result<MwaitFigures> {
    let (r, serial) = run_report("configs/bench-mwait.toml")?;
    let _ = r;
    for g in ["ping", "pong"] {
        if bench_value(&serial, g, "mwait")? != 1 {
            bail!("{g} did not get MONITOR/MWAIT (fell back to doorbells)");
        }
    }
    let n = bench_value(&serial, "ping", "n")? as f64;
    Ok(MwaitFigures {
        round_trip_instructions_median: bench_value(&serial, "ping", "rtt_median")?,
        round_trip_instructions_p99: bench_value(&serial, "ping", "rtt_p99")?,
        exits_per_notification_ping: bench_value(&serial, "ping", "exits")? as f64 / n,
        exits_per_notification_pong: bench_value(&serial, "pong", "exits")? as f64 / n,
        doorbells_rung: bench_value(&serial, "ping", "doorbells_rung")?
            + bench_value(&serial, "pong", "doorbells_rung")?,
    })
}

/// The mkvisor ring's one-way throughput against the raw line ring's, measured in pairs
/// (raw, ring, raw, ring, ...: each pair close in time, so that a busy host slows both of
/// a pair alike), one ratio per pair.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct StreamPairs {
    pub pairs: u32,
    pub messages_per_stream: u64,
    pub ratio_median: f64,
    pub ratio_ci: [f64; 2],
    pub ci_confidence: f64,
    /// Medians of the two sides' throughput over the pairs.
    pub raw_mmsg_s_median: f64,
    pub ring_mmsg_s_median: f64,
}

/// Streams through the raw line ring and the mkvisor ring alternately, `pairs` times.
pub fn stream_pairs(pairs: u32, count: usize) -> StreamPairs {
    let (mut ratios, mut raw, mut ring) = (vec![], vec![], vec![]);
    for _ in 0..pairs {
        let (a, b) = raw_pair();
        let r = count as f64 / stream(a, b, count) / 1e6;
        let (a, b) = ring_pair(64);
        let m = count as f64 / stream(a, b, count) / 1e6;
        raw.push(r);
        ring.push(m);
        ratios.push(m / r);
    }
    let (ratio_median, lo, hi, ci_confidence) = median_ci(&ratios);
    StreamPairs {
        pairs,
        messages_per_stream: count as u64,
        ratio_median,
        ratio_ci: [lo, hi],
        ci_confidence,
        raw_mmsg_s_median: median_ci(&raw).0,
        ring_mmsg_s_median: median_ci(&ring).0,
    }
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Report {
    pub host: Vec<HostRow>,
    /// The ring's streaming against the raw line ring, paired (absent in older files).
    #[serde(default)]
    pub stream_pairs: Option<StreamPairs>,
    /// Round trips against the cache-line ping-pong, paired (absent in older files).
    #[serde(default)]
    pub rtt_pairs: Option<RttPairs>,
    /// Absent with `--host-only`.
    pub emulated: Option<Emulated>,
    #[serde(default)]
    pub meta: BenchMeta,
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC is available on every x86-64 host and has no side effect.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The cores this process may use, read once before any thread is pinned: a pinned
/// thread's children inherit its one-core mask, and `get_core_ids` would then report only
/// that core (which put both ends of a ping-pong on one core, found the hard way).
fn cores() -> &'static [core_affinity::CoreId] {
    static CORES: std::sync::OnceLock<Vec<core_affinity::CoreId>> = std::sync::OnceLock::new();
    CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default())
}

/// Pins the calling thread to core `i` of [`cores`] (if the machine has it).
fn pin(i: usize) {
    let ids = cores();
    if let Some(id) = ids.get(i % ids.len().max(1)) {
        core_affinity::set_for_current(*id);
    }
}

/// A two-party transport: one side's send and receive, boxed as closures per endpoint.
trait Endpoint: Send {
    fn send(&mut self, m: &Payload);
    fn recv(&mut self) -> Payload;
    /// One round trip, the client's side: a send, then the reply (a transport with a
    /// request/reply call of its own uses it: the guest library's `call`).
    fn call(&mut self, m: &Payload) -> Payload {
        self.send(m);
        self.recv()
    }
    /// Echoes `rounds` messages back, the server's side (the guest library: `serve`).
    fn echo(&mut self, rounds: usize) {
        for _ in 0..rounds {
            let m = self.recv();
            self.send(&m);
        }
    }
}

/// Runs `rounds` round trips; returns per-trip TSC ticks.
fn ping_pong(mut a: Box<dyn Endpoint>, mut b: Box<dyn Endpoint>, rounds: usize) -> Vec<u64> {
    let echo = std::thread::spawn(move || {
        pin(1);
        b.echo(rounds);
    });
    pin(0);
    let mut samples = Vec::with_capacity(rounds);
    let mut msg: Payload = [0; 7];
    for i in 0..rounds {
        msg[0] = i as u64;
        let t = rdtsc();
        let r = a.call(&msg);
        samples.push(rdtsc() - t);
        assert_eq!(r[0], i as u64, "echo out of order");
    }
    echo.join().expect("echo thread");
    samples
}

/// Sends `count` messages one way; returns elapsed seconds.
fn stream(mut a: Box<dyn Endpoint>, mut b: Box<dyn Endpoint>, count: usize) -> f64 {
    let rx = std::thread::spawn(move || {
        pin(1);
        for i in 0..count {
            let m = b.recv();
            assert_eq!(m[0], i as u64, "stream out of order");
        }
    });
    pin(0);
    let start = Instant::now();
    let mut msg: Payload = [0; 7];
    for i in 0..count {
        msg[0] = i as u64;
        a.send(&msg);
    }
    rx.join().expect("receiver thread");
    start.elapsed().as_secs_f64()
}

// --- the mkvisor ring ---
struct RingEnd {
    tx: Sender<'static>,
    rx: Receiver<'static>,
}
impl Endpoint for RingEnd {
    fn send(&mut self, m: &Payload) {
        let mut spin = Spin::new();
        while self.tx.try_send(m).is_err() {
            spin.wait("a free slot");
        }
    }
    fn recv(&mut self) -> Payload {
        let mut spin = Spin::new();
        loop {
            if let Ok(Some(m)) = self.rx.try_recv() {
                return m;
            }
            spin.wait("a message");
        }
    }
}
fn ring_pair(slots: u32) -> (Box<dyn Endpoint>, Box<dyn Endpoint>) {
    let ab: &'static OwnedRing = Box::leak(Box::new(OwnedRing::new()));
    let ba: &'static OwnedRing = Box::leak(Box::new(OwnedRing::new()));
    let ack = (slots / 4).max(1);
    (
        Box::new(RingEnd {
            tx: Sender::new(ab.ring(slots)),
            rx: Receiver::new(ba.ring(slots), ack),
        }),
        Box::new(RingEnd {
            tx: Sender::new(ba.ring(slots)),
            rx: Receiver::new(ab.ring(slots), ack),
        }),
    )
}

// --- the guest's channel library: the ring with its settings and its link policy ---
// What `guestkernel::channel::Chan` runs on a polling send and a blocking receive
// (`vmcall_proto::endpoint::LinkWatch::try_send_or_reply` and `LinkWatch::recv` over a
// sender and a receiver publishing its count as the library does, `endpoint::ack_every`),
// and for a round trip what `Chan::call` and `Chan::serve` run (`LinkWatch::call` and
// `serve`: the request sent as a call, the reply written into its slot), with the link
// word in host memory standing for the status page.
struct LibEnd {
    tx: Sender<'static>,
    rx: Receiver<'static>,
    link: LinkWatch<'static>,
}
impl Endpoint for LibEnd {
    fn send(&mut self, m: &Payload) {
        let mut spin = Spin::new();
        loop {
            // `Chan::try_send`'s code: the reply to a call goes into the call's slot.
            match self.link.try_send_or_reply(&mut self.tx, &mut self.rx, m) {
                Ok(_) => return,
                Err(ChannelError::Full) => spin.wait("a free slot"),
                Err(e) => panic!("bench: library send: {e:?}"),
            }
        }
    }
    fn recv(&mut self) -> Payload {
        let mut spin = Spin::new();
        match self.link.recv(&mut self.rx, || spin.wait("a message")) {
            Ok(m) => m,
            Err(e) => panic!("bench: library receive: {e:?}"),
        }
    }
    /// `Chan::call`'s code: `LinkWatch::call`.
    fn call(&mut self, m: &Payload) -> Payload {
        let mut spin = Spin::new();
        let mut reply = [0; 7];
        let r = self.link.call(
            &mut self.tx,
            &mut self.rx,
            m,
            &mut reply,
            |_| {},
            || spin.wait("a reply"),
        );
        match r {
            Ok(()) => reply,
            Err(e) => panic!("bench: library call: {e:?}"),
        }
    }
    /// `Chan::serve`'s code: `LinkWatch::serve`, the last message echoed with a send.
    fn echo(&mut self, rounds: usize) {
        if rounds == 0 {
            return;
        }
        let (mut spin, mut left) = (Spin::new(), rounds);
        let r = self.link.serve(
            &mut self.tx,
            &mut self.rx,
            |m| {
                left -= 1;
                if left == 0 {
                    std::ops::ControlFlow::Break(*m)
                } else {
                    std::ops::ControlFlow::Continue(*m)
                }
            },
            |_| {},
            || spin.wait("a request"),
        );
        match r {
            Ok(last) => self.send(&last),
            Err(e) => panic!("bench: library serve: {e:?}"),
        }
    }
}
fn library_pair(slots: u32) -> (Box<dyn Endpoint>, Box<dyn Endpoint>) {
    let ab: &'static OwnedRing = Box::leak(Box::new(OwnedRing::new()));
    let ba: &'static OwnedRing = Box::leak(Box::new(OwnedRing::new()));
    // Each end's link word, up in epoch 0, in a line of its own (as in a status page).
    let word = || -> &'static AtomicU64 {
        &Box::leak(Box::new(LinkWord(AtomicU64::new(vmcall_proto::guest::link_word(true, 0))))).0
    };
    (
        Box::new(LibEnd {
            tx: Sender::new(ab.ring(slots)),
            rx: Receiver::new(ba.ring(slots), ack_every(slots)),
            link: LinkWatch::new(word()),
        }),
        Box::new(LibEnd {
            tx: Sender::new(ba.ring(slots)),
            rx: Receiver::new(ab.ring(slots), ack_every(slots)),
            link: LinkWatch::new(word()),
        }),
    )
}
#[repr(C, align(64))]
struct LinkWord(AtomicU64);

// --- the bare cache line: a sequence word and the payload, one line per direction ---
// Each line sits alone in a 128-byte block: Intel's adjacent-line prefetcher moves lines in
// pairs, and two directions sharing a pair made this "limit" slower than the ring.
#[repr(C, align(128))]
struct Line {
    words: [AtomicU64; 7],
    seq: AtomicU64,
}
struct LineEnd {
    out: Arc<Line>,
    inp: Arc<Line>,
    sent: u64,
    got: u64,
}
impl Endpoint for LineEnd {
    fn send(&mut self, m: &Payload) {
        // One slot: wait until the peer took the last message (it bumps nothing; the
        // ping-pong alternation guarantees it, and the stream uses the ack below).
        for (w, v) in self.out.words.iter().zip(m) {
            w.store(*v, Ordering::Relaxed);
        }
        self.sent += 1;
        self.out.seq.store(self.sent, Ordering::Release);
    }
    fn recv(&mut self) -> Payload {
        let mut spin = Spin::new();
        while self.inp.seq.load(Ordering::Acquire) == self.got {
            spin.wait("the line");
        }
        self.got += 1;
        core::array::from_fn(|i| self.inp.words[i].load(Ordering::Relaxed))
    }
}
fn line_pair() -> (Box<dyn Endpoint>, Box<dyn Endpoint>) {
    let new = || {
        Arc::new(Line {
            words: core::array::from_fn(|_| AtomicU64::new(0)),
            seq: AtomicU64::new(0),
        })
    };
    let (ab, ba) = (new(), new());
    (
        Box::new(LineEnd { out: ab.clone(), inp: ba.clone(), sent: 0, got: 0 }),
        Box::new(LineEnd { out: ba, inp: ab, sent: 0, got: 0 }),
    )
}

// --- one line shared by both directions: the fewest lines a round trip can move ---
// The request and the reply in the same line, each side writing it in turn (a sequence word
// and the payload; odd words are one side's, even the other's). A round trip moves that one
// line twice: to the server when it reads the request, back when the client reads the
// reply; a reader that goes on to write the line it just read needs no second transfer
// (the line comes over for the read with ownership, or the write's upgrade finds no other
// copy). Two lines, one per direction (the ping-pong above), move each line twice per
// round trip: four transfers.
struct SharedEnd {
    line: Arc<Line>,
    /// The sequence word of this side's next message, and of the peer's next one.
    next_out: u64,
    next_in: u64,
}
impl Endpoint for SharedEnd {
    fn send(&mut self, m: &Payload) {
        // Only after the peer's message was taken (the ping-pong alternation): one slot.
        for (w, v) in self.line.words.iter().zip(m) {
            w.store(*v, Ordering::Relaxed);
        }
        self.line.seq.store(self.next_out, Ordering::Release);
        self.next_out += 2;
    }
    fn recv(&mut self) -> Payload {
        let mut spin = Spin::new();
        while self.line.seq.load(Ordering::Acquire) != self.next_in {
            spin.wait("the shared line");
        }
        self.next_in += 2;
        core::array::from_fn(|i| self.line.words[i].load(Ordering::Relaxed))
    }
}
fn shared_line_pair() -> (Box<dyn Endpoint>, Box<dyn Endpoint>) {
    let line = Arc::new(Line {
        words: core::array::from_fn(|_| AtomicU64::new(0)),
        seq: AtomicU64::new(0),
    });
    (
        Box::new(SharedEnd { line: line.clone(), next_out: 1, next_in: 2 }),
        Box::new(SharedEnd { line, next_out: 2, next_in: 1 }),
    )
}

// --- a bare ring whose reply goes into the request's slot: the library's call, unchecked ---
// One ring of 64-byte slots (seven payload words, then the control word), used by both
// sides: request `n` goes in slot `n % SLOT_REPLY_SLOTS` with control word `2n + 1`, and
// the server writes its reply into that same slot with control word `2n + 2`; each reader
// loads the word (acquire), copies, and re-reads it (the library's seqlock check). A round
// trip then moves one line twice, as the shared line does, where a ring per direction
// moves two lines twice each. The request slots still rotate; the slot is the client's again
// once it has read the reply. The library's `call` and `serve` do the same with their
// checks (the `CALL` and `REPLY` flags, tags, the link look, counts; see docs/channels.md,
// "Which lines a round trip moves"); this is that design with nothing else, as the raw
// line ring is for the ring.
const SLOT_REPLY_SLOTS: usize = 64;
struct SlotRing {
    slots: [RawLine; SLOT_REPLY_SLOTS],
}
struct SlotReplyEnd {
    ring: Arc<SlotRing>,
    /// Requests this side sent (client) or took (server).
    n: u64,
}
impl SlotReplyEnd {
    fn slot(&self) -> &RawLine {
        &self.ring.slots[self.n as usize % SLOT_REPLY_SLOTS]
    }
    /// Waits for `word` in the current slot and copies the payload out, re-reading the word
    /// after the copy.
    fn take(&self, word: u64, what: &str) -> Payload {
        let line = self.slot();
        let mut spin = Spin::new();
        while line.seq.load(Ordering::Acquire) != word {
            spin.wait(what);
        }
        let m = core::array::from_fn(|i| line.words[i].load(Ordering::Relaxed));
        std::sync::atomic::fence(Ordering::Acquire);
        assert_eq!(line.seq.load(Ordering::Relaxed), word, "bench: slot changed under the copy");
        m
    }
    fn put(&self, m: &Payload, word: u64) {
        let line = self.slot();
        for (w, v) in line.words.iter().zip(m) {
            w.store(*v, Ordering::Relaxed);
        }
        line.seq.store(word, Ordering::Release);
    }
}
impl Endpoint for SlotReplyEnd {
    /// The client's request (`call`) or the server's reply (`echo`).
    fn send(&mut self, m: &Payload) {
        self.put(m, 2 * self.n + 1);
    }
    fn recv(&mut self) -> Payload {
        let m = self.take(2 * self.n + 2, "a reply");
        self.n += 1;
        m
    }
    fn call(&mut self, m: &Payload) -> Payload {
        self.send(m);
        self.recv()
    }
    fn echo(&mut self, rounds: usize) {
        for _ in 0..rounds {
            let m = self.take(2 * self.n + 1, "a request");
            self.put(&m, 2 * self.n + 2);
            self.n += 1;
        }
    }
}
fn slot_reply_pair() -> (Box<dyn Endpoint>, Box<dyn Endpoint>) {
    let ring = Arc::new(SlotRing {
        slots: core::array::from_fn(|_| RawLine {
            words: core::array::from_fn(|_| AtomicU64::new(0)),
            seq: AtomicU64::new(0),
        }),
    });
    (Box::new(SlotReplyEnd { ring: ring.clone(), n: 0 }), Box::new(SlotReplyEnd { ring, n: 0 }))
}

// --- the raw line ring: the streaming limit ---
// What one-way streaming of 64-byte lines costs with nothing but the lines themselves: a ring
// of lines, each seven payload words and a plain sequence word (message `i` in line
// `i % LINES` with sequence `i + 1`), and the consumer's count in a line of its own,
// published every quarter ring (the flow control any bounded ring needs). No checks of any
// kind: what is left of the mkvisor ring's cost above it is its checks and bookkeeping.
const RAW_LINES: usize = 64;
#[repr(C, align(64))]
struct RawLine {
    words: [AtomicU64; 7],
    seq: AtomicU64,
}
#[repr(C, align(128))]
struct RawCount(AtomicU64);
struct RawRing {
    lines: [RawLine; RAW_LINES],
    consumed: RawCount,
}
const _: () = assert!(core::mem::size_of::<RawLine>() == 64);
const _: () = assert!(core::mem::size_of::<RawCount>() == 128);

/// Spinning with a deadline: a bench whose peer died or never answers stops with a message
/// instead of hanging.
/// The clock is read only once a wait has spun 65,536 times, so that a send or receive that
/// does not wait costs nothing for it.
struct Spin {
    until: Option<Instant>,
    n: u32,
}
impl Spin {
    fn new() -> Self {
        Spin { until: None, n: 0 }
    }
    fn wait(&mut self, what: &str) {
        std::hint::spin_loop();
        self.n = self.n.wrapping_add(1);
        if self.n.is_multiple_of(1 << 16) {
            let now = Instant::now();
            let until = *self.until.get_or_insert(now + std::time::Duration::from_secs(30));
            if now > until {
                panic!("bench: no progress for 30 s waiting for {what}");
            }
        }
    }
}

struct RawEnd {
    out: Arc<RawRing>,
    inp: Arc<RawRing>,
    sent: u64,
    /// The peer's consumed count as last read (the sender never rereads it before it
    /// needs a slot).
    acked: u64,
    got: u64,
}
impl Endpoint for RawEnd {
    fn send(&mut self, m: &Payload) {
        let mut spin = Spin::new();
        while self.sent - self.acked >= RAW_LINES as u64 {
            self.acked = self.out.consumed.0.load(Ordering::Acquire);
            if self.sent - self.acked >= RAW_LINES as u64 {
                spin.wait("a free line");
            }
        }
        let line = &self.out.lines[self.sent as usize % RAW_LINES];
        for (w, v) in line.words.iter().zip(m) {
            w.store(*v, Ordering::Relaxed);
        }
        self.sent += 1;
        line.seq.store(self.sent, Ordering::Release);
    }
    fn recv(&mut self) -> Payload {
        let line = &self.inp.lines[self.got as usize % RAW_LINES];
        let mut spin = Spin::new();
        while line.seq.load(Ordering::Acquire) != self.got + 1 {
            spin.wait("a line");
        }
        let m = core::array::from_fn(|i| line.words[i].load(Ordering::Relaxed));
        self.got += 1;
        if self.got.is_multiple_of(RAW_LINES as u64 / 4) {
            self.inp.consumed.0.store(self.got, Ordering::Release);
        }
        m
    }
}
fn raw_pair() -> (Box<dyn Endpoint>, Box<dyn Endpoint>) {
    let new = || {
        Arc::new(RawRing {
            lines: core::array::from_fn(|_| RawLine {
                words: core::array::from_fn(|_| AtomicU64::new(0)),
                seq: AtomicU64::new(0),
            }),
            consumed: RawCount(AtomicU64::new(0)),
        })
    };
    let (ab, ba) = (new(), new());
    (
        Box::new(RawEnd { out: ab.clone(), inp: ba.clone(), sent: 0, acked: 0, got: 0 }),
        Box::new(RawEnd { out: ba, inp: ab, sent: 0, acked: 0, got: 0 }),
    )
}

// --- crossbeam and std mpsc ---
struct Cb {
    tx: crossbeam_channel::Sender<Payload>,
    rx: crossbeam_channel::Receiver<Payload>,
}
impl Endpoint for Cb {
    fn send(&mut self, m: &Payload) {
        self.tx.send(*m).expect("crossbeam send");
    }
    fn recv(&mut self) -> Payload {
        self.rx.recv().expect("crossbeam recv")
    }
}
fn crossbeam_pair() -> (Box<dyn Endpoint>, Box<dyn Endpoint>) {
    let (t1, r1) = crossbeam_channel::bounded(64);
    let (t2, r2) = crossbeam_channel::bounded(64);
    (Box::new(Cb { tx: t1, rx: r2 }), Box::new(Cb { tx: t2, rx: r1 }))
}
struct Mpsc {
    tx: std::sync::mpsc::SyncSender<Payload>,
    rx: std::sync::mpsc::Receiver<Payload>,
}
impl Endpoint for Mpsc {
    fn send(&mut self, m: &Payload) {
        self.tx.send(*m).expect("mpsc send");
    }
    fn recv(&mut self) -> Payload {
        self.rx.recv().expect("mpsc recv")
    }
}
fn mpsc_pair() -> (Box<dyn Endpoint>, Box<dyn Endpoint>) {
    let (t1, r1) = std::sync::mpsc::sync_channel(64);
    let (t2, r2) = std::sync::mpsc::sync_channel(64);
    (Box::new(Mpsc { tx: t1, rx: r2 }), Box::new(Mpsc { tx: t2, rx: r1 }))
}

// --- Linux pipes, 64 bytes per message (56 payload + 8 padding) ---
struct Pipe {
    w: std::io::PipeWriter,
    r: std::io::PipeReader,
}
impl Endpoint for Pipe {
    fn send(&mut self, m: &Payload) {
        use std::io::Write;
        let mut buf = [0u8; 64];
        for (i, w) in m.iter().enumerate() {
            buf[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        self.w.write_all(&buf).expect("pipe write");
    }
    fn recv(&mut self) -> Payload {
        use std::io::Read;
        let mut buf = [0u8; 64];
        self.r.read_exact(&mut buf).expect("pipe read");
        core::array::from_fn(|i| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap()))
    }
}
fn pipe_pair() -> Result<(Box<dyn Endpoint>, Box<dyn Endpoint>)> {
    let (r1, w1) = std::io::pipe().context("pipe(2)")?;
    let (r2, w2) = std::io::pipe().context("pipe(2)")?;
    Ok((Box::new(Pipe { w: w1, r: r2 }), Box::new(Pipe { w: w2, r: r1 })))
}

fn percentile(s: &mut [u64], p: f64) -> u64 {
    s.sort_unstable();
    s[((s.len() as f64 * p) as usize).min(s.len() - 1)]
}

/// Measures every host transport in one run.
pub fn host() -> Result<Vec<HostRow>> {
    if cores().len() < 2 {
        bail!("the host benchmark needs two cores; this process may use {}", cores().len());
    }
    // TSC rate against the wall clock, in this run.
    let (t0, i0) = (rdtsc(), Instant::now());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let ns_per_tick = i0.elapsed().as_nanos() as f64 / (rdtsc() - t0) as f64;
    type Make = fn() -> Result<(Box<dyn Endpoint>, Box<dyn Endpoint>)>;
    let transports: [(&str, Make, usize, usize); 9] = [
        (LINE_NAME, || Ok(line_pair()), 200_000, 0),
        (SHARED_NAME, || Ok(shared_line_pair()), 200_000, 0),
        (RAW_NAME, || Ok(raw_pair()), 200_000, 2_000_000),
        (RING_NAME, || Ok(ring_pair(64)), 200_000, 2_000_000),
        (LIBRARY_NAME, || Ok(library_pair(64)), 200_000, 2_000_000),
        (SLOT_REPLY_NAME, || Ok(slot_reply_pair()), 200_000, 0),
        ("crossbeam-channel", || Ok(crossbeam_pair()), 100_000, 1_000_000),
        ("std mpsc", || Ok(mpsc_pair()), 100_000, 1_000_000),
        ("pipe", pipe_pair, 20_000, 200_000),
    ];
    // Untimed warm-up: the first transport measured otherwise pays for frequency ramp-up
    // and for both vCPUs being scheduled in (it made the baseline look slower than the ring).
    let (a, b) = line_pair();
    ping_pong(a, b, 200_000);
    let mut rows = Vec::new();
    for (name, make, rounds, count) in transports {
        eprintln!("bench:   {name}");
        let (a, b) = make()?;
        let mut s = ping_pong(a, b, rounds);
        let (med, p99) = (percentile(&mut s, 0.5), percentile(&mut s, 0.99));
        // The bare lines and the bare slot-reply ring have no flow control for a one-way
        // stream: their one-way figure is the round trip halved, the best a channel that
        // waits for each answer can do.
        let tput = if count == 0 {
            1e3 / (med as f64 * ns_per_tick)
        } else {
            let (a, b) = make()?;
            count as f64 / stream(a, b, count) / 1e6
        };
        let ns: Vec<f64> = s.iter().map(|&t| t as f64 * ns_per_tick).collect();
        rows.push(HostRow {
            name: name.into(),
            rtt_median_ns: med as f64 * ns_per_tick,
            rtt_p99_ns: p99 as f64 * ns_per_tick,
            throughput_mmsg_s: tput,
            rtt_ratio_to_cacheline: 0.0,
            throughput_ratio_to_cacheline: 0.0,
            throughput_ratio_to_raw: 0.0,
            rtt_histogram: histogram(&ns),
            repeats: 1,
            rtt_median_ns_ci: None,
            throughput_mmsg_s_ci: None,
            ci_confidence: 0.0,
        });
    }
    ratios(&mut rows);
    Ok(rows)
}

/// The row name of the guest library's code (ring, settings and link policy).
pub const LIBRARY_NAME: &str = "channel library (guest's code)";

/// The row name of the raw line ring.
const RAW_NAME: &str = "raw line ring (stream limit)";
/// The row names of the two bare lines, the plain ring and the bare slot-reply ring.
const LINE_NAME: &str = "cache-line ping-pong";
const SHARED_NAME: &str = "one line, both directions";
const RING_NAME: &str = "mkvisor ring";
const SLOT_REPLY_NAME: &str = "reply in request's slot (bare)";

/// Round trips measured against the cache-line ping-pong in pairs (the line, then the
/// transport, close in time: a busy host slows both of a pair alike), one ratio of medians
/// per pair: the side-by-side comparison the table's medians of separate runs are too
/// noisy for on a shared VM.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct RttPairs {
    pub pairs: u32,
    pub round_trips_per_run: u64,
    pub rows: Vec<RttPairRow>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct RttPairRow {
    pub name: String,
    /// The median over the pairs of (this transport's median / the line's median).
    pub ratio_median: f64,
    pub ratio_ci: [f64; 2],
    pub ci_confidence: f64,
    /// Medians over the pairs of the two sides' median round trips.
    pub rtt_median_ns: f64,
    pub line_rtt_median_ns: f64,
}

/// [`RttPairs`]: `pairs` rounds; in each, every transport's `rounds` round trips right
/// after a run of the cache-line ping-pong's.
pub fn rtt_pairs(pairs: u32, rounds: usize) -> RttPairs {
    let ns_per_tick = 1.0 / timer_resolution().tsc_ghz;
    type Make = fn() -> (Box<dyn Endpoint>, Box<dyn Endpoint>);
    let others: [(&str, Make); 5] = [
        (SHARED_NAME, shared_line_pair),
        (RAW_NAME, raw_pair),
        (RING_NAME, || ring_pair(64)),
        (LIBRARY_NAME, || library_pair(64)),
        (SLOT_REPLY_NAME, slot_reply_pair),
    ];
    let median = |make: Make| -> f64 {
        let (a, b) = make();
        let mut s = ping_pong(a, b, rounds);
        percentile(&mut s, 0.5) as f64 * ns_per_tick
    };
    let mut got: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); others.len()];
    for _ in 0..pairs {
        for (i, (_, make)) in others.iter().enumerate() {
            let line = median(line_pair);
            let it = median(*make);
            got[i].0.push(it / line);
            got[i].1.push(it);
            got[i].2.push(line);
        }
    }
    let rows = others
        .iter()
        .zip(got)
        .map(|((name, _), (ratios, it, line))| {
            let (ratio_median, lo, hi, ci_confidence) = median_ci(&ratios);
            RttPairRow {
                name: name.to_string(),
                ratio_median,
                ratio_ci: [lo, hi],
                ci_confidence,
                rtt_median_ns: median_ci(&it).0,
                line_rtt_median_ns: median_ci(&line).0,
            }
        })
        .collect();
    RttPairs { pairs, round_trips_per_run: rounds as u64, rows }
}

/// Fills the ratio columns: to the cache-line ping-pong (the first row) and to the raw line
/// ring's one-way throughput.
fn ratios(rows: &mut [HostRow]) {
    let (base_rtt, base_tput) = (rows[0].rtt_median_ns, rows[0].throughput_mmsg_s);
    let raw = rows.iter().find(|r| r.name == RAW_NAME).map_or(f64::NAN, |r| r.throughput_mmsg_s);
    for r in rows {
        r.rtt_ratio_to_cacheline = r.rtt_median_ns / base_rtt;
        r.throughput_ratio_to_cacheline = r.throughput_mmsg_s / base_tput;
        r.throughput_ratio_to_raw = r.throughput_mmsg_s / raw;
    }
}

/// [`host`] `repeat` times: each figure the median over the repetitions, with its
/// confidence interval; the histograms of all repetitions summed (bucketed afresh).
pub fn host_repeated(repeat: u32) -> Result<Vec<HostRow>> {
    let runs: Vec<Vec<HostRow>> = (0..repeat.max(1))
        .map(|i| {
            if repeat > 1 {
                eprintln!("bench: host repetition {}/{repeat}", i + 1);
            }
            host()
        })
        .collect::<Result<_>>()?;
    let mut rows = runs[0].clone();
    for (t, row) in rows.iter_mut().enumerate() {
        let pick = |f: fn(&HostRow) -> f64| runs.iter().map(|r| f(&r[t])).collect::<Vec<_>>();
        let (rtt, rlo, rhi, conf) = median_ci(&pick(|r| r.rtt_median_ns));
        let (tput, tlo, thi, _) = median_ci(&pick(|r| r.throughput_mmsg_s));
        row.rtt_median_ns = rtt;
        row.rtt_median_ns_ci = (runs.len() > 1).then_some([rlo, rhi]);
        row.rtt_p99_ns = median_ci(&pick(|r| r.rtt_p99_ns)).0;
        row.throughput_mmsg_s = tput;
        row.throughput_mmsg_s_ci = (runs.len() > 1).then_some([tlo, thi]);
        row.ci_confidence = conf;
        row.repeats = runs.len() as u32;
        // Sum the buckets by bound (the same first bound in every run is not guaranteed).
        let mut merged: std::collections::BTreeMap<u64, u64> = Default::default();
        for r in &runs {
            for b in &r[t].rtt_histogram {
                *merged.entry((b.upper_ns * 1000.0) as u64).or_default() += b.count;
            }
        }
        row.rtt_histogram = merged
            .into_iter()
            .map(|(u, count)| Bucket { upper_ns: u as f64 / 1000.0, count })
            .collect();
    }
    ratios(&mut rows);
    Ok(rows)
}

/// The `key=value` of `guest`'s `bench` line in a serial log (what the guest workloads print).
pub fn bench_value(serial: &str, guest: &str, key: &str) -> Result<u64> {
    let line = serial
        .lines()
        .find(|l| l.starts_with(&format!("[{guest}@")) && l.contains("] bench "))
        .with_context(|| format!("no bench line from {guest}"))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in {line}"))
}

fn boot(config: &str) -> Result<String> {
    run_report(config).map(|(_, serial)| serial)
}

/// Measures inside Bochs.
pub fn emulated() -> Result<Emulated> {
    let poll = boot("configs/bench-poll.toml")?;
    let bell = boot("configs/bench-doorbell.toml")?;
    let st = boot("configs/bench-stream.toml")?;
    let n = bench_value(&poll, "ping", "n")? as f64;
    let rung = bench_value(&bell, "ping", "doorbells_rung")?
        + bench_value(&bell, "pong", "doorbells_rung")?;
    let taken = bench_value(&bell, "ping", "doorbells_taken")?
        + bench_value(&bell, "pong", "doorbells_taken")?;
    let all_exits = bench_value(&bell, "ping", "exits")? + bench_value(&bell, "pong", "exits")?;
    // A run that fails (e.g. a wake-up the emulator loses: see README, "Exitless
    // notification") is reported as such, not taken for figures.
    let mwait = mwait_figures();
    let raw = raw_figures()?;
    Ok(Emulated {
        send_instructions: bench_value(&poll, "ping", "send_median")?,
        receive_instructions: bench_value(&poll, "pong", "recv_median")?,
        round_trip_instructions_median: bench_value(&poll, "ping", "rtt_median")?,
        round_trip_instructions_p99: bench_value(&poll, "ping", "rtt_p99")?,
        sendrecv_round_trip_instructions_median: bench_value(&poll, "ping", "sendrecv_rtt_median")?,
        stream_instructions_per_message_sender: bench_value(&st, "stream", "instr_per_msg")?,
        stream_instructions_per_message_receiver: bench_value(&st, "sink", "instr_per_msg")?,
        exits_per_message_polling: (bench_value(&poll, "ping", "exits")?
            + bench_value(&poll, "pong", "exits")?) as f64
            / (2.0 * n),
        doorbell_round_trip_instructions_median: bench_value(&bell, "ping", "rtt_median")?,
        // A doorbell is one hypercall on the sender by construction; what is measured is
        // whether anything else exits: the total over both sides, and what is left once the
        // ringing hypercalls are taken out (the receiving side's share).
        exits_per_doorbell_both_sides: if rung > 0 {
            all_exits as f64 / rung as f64
        } else {
            f64::NAN
        },
        exits_per_doorbell_receiver: if taken > 0 {
            all_exits.saturating_sub(rung) as f64 / taken as f64
        } else {
            f64::NAN
        },
        doorbells_rung: rung,
        doorbells_taken: taken,
        mwait: mwait.as_ref().ok().cloned(),
        mwait_problem: mwait.as_ref().err().map(|e| format!("{e:#}")),
        raw: Some(raw),
        send_code: bench_value(&st, "stream", "code_per_send")?,
        receive_code: bench_value(&st, "sink", "code_per_recv")?,
    })
}

/// Boots a config variant a benchmark wrote (`contents`, kept as `target/xtask/FILE` for a
/// look afterwards) in Bochs, quietly, with `cmdline`; the run's report.
pub fn boot_variant(file: &str, contents: &str, cmdline: &str) -> Result<crate::report::Report> {
    let dir = crate::target_dir().join("xtask");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(file);
    std::fs::write(&path, contents)?;
    let mut args = crate::cli::RunArgs::quiet(crate::cli::Emulator::Bochs, path.to_str());
    args.cmdline = cmdline.to_string();
    crate::run::run(&args)
}

/// A table with the bench tables' style: header, figures right-aligned.
pub fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED).set_header(header.to_vec());
    for i in 1..header.len() {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    t
}

pub fn print(r: &Report) {
    let m = &r.meta;
    println!(
        "Host {} ({}, {} CPUs, load {:.2} before, {:.2} after); timer resolution: Instant {:.0} ns, TSC {:.1} ns ({:.3} GHz)",
        m.host.hostname, m.host.cpu, m.host.cpus, m.host.load_average[0], m.load_average_after[0],
        m.timer.instant_ns, m.timer.tsc_ns, m.timer.tsc_ghz
    );
    let reps = r.host.first().map_or(1, |h| h.repeats.max(1));
    println!(
        "Host, real cores (two pinned threads, 64-byte messages; ratios to the cache-line ping-pong of this run{})",
        if reps > 1 {
            format!("; medians of {reps} repetitions, [interval] at {:.0}% confidence", 100.0 * r.host[0].ci_confidence)
        } else {
            String::new()
        }
    );
    let mut t = table(&[
        "transport",
        "RTT median ns",
        "RTT p99 ns",
        "x line",
        "one-way Mmsg/s",
        "x line",
        "x raw stream",
    ]);
    for h in &r.host {
        let ci = |v: f64, c: Option<[f64; 2]>, digits: usize| match c {
            Some([lo, hi]) => format!("{v:.digits$} [{lo:.digits$}, {hi:.digits$}]"),
            None => format!("{v:.digits$}"),
        };
        t.add_row([
            h.name.clone(),
            ci(h.rtt_median_ns, h.rtt_median_ns_ci, 0),
            format!("{:.0}", h.rtt_p99_ns),
            format!("{:.2}", h.rtt_ratio_to_cacheline),
            ci(h.throughput_mmsg_s, h.throughput_mmsg_s_ci, 2),
            format!("{:.2}", h.throughput_ratio_to_cacheline),
            format!("{:.2}", h.throughput_ratio_to_raw),
        ]);
    }
    println!("{t}");
    if let Some(p) = &r.rtt_pairs {
        println!(
            "Round trips, paired (the cache-line ping-pong, then the transport; {} pairs of {} round trips each; ratio of the two medians, median over the pairs):",
            p.pairs, p.round_trips_per_run
        );
        for row in &p.rows {
            println!(
                "  {:<34} {:.2} [{:.2}, {:.2}] at {:.0}% confidence ({:.0} ns against the line's {:.0})",
                format!("{} / line", row.name),
                row.ratio_median,
                row.ratio_ci[0],
                row.ratio_ci[1],
                100.0 * row.ci_confidence,
                row.rtt_median_ns,
                row.line_rtt_median_ns
            );
        }
    }
    if let Some(p) = &r.stream_pairs {
        println!(
            "Streaming, paired (raw line ring then mkvisor ring, {} pairs of {} messages, 64 lines, ack every 16):",
            p.pairs, p.messages_per_stream
        );
        println!(
            "  mkvisor ring / raw line ring = {:.2} [{:.2}, {:.2}] at {:.0}% confidence (medians: ring {:.2}, raw {:.2} Mmsg/s)",
            p.ratio_median,
            p.ratio_ci[0],
            p.ratio_ci[1],
            100.0 * p.ci_confidence,
            p.ring_mmsg_s_median,
            p.raw_mmsg_s_median
        );
    }
    if let Some(e) = &r.emulated {
        println!();
        print_emulated(e);
    }
}

/// The Bochs tables of `bench channels`.
pub fn print_emulated(e: &Emulated) {
    println!("In Bochs (TSC = emulated instructions, exact; one pair alone on two CPUs)");
    let rows: [(&str, String); 11] = [
        ("instructions per send (median)", e.send_instructions.to_string()),
        ("instructions per receive (median)", e.receive_instructions.to_string()),
        ("round trip, polling (median ticks)", e.round_trip_instructions_median.to_string()),
        ("round trip, polling (p99 ticks)", e.round_trip_instructions_p99.to_string()),
        (
            "stream: sender instructions per message",
            e.stream_instructions_per_message_sender.to_string(),
        ),
        (
            "stream: receiver instructions per message",
            e.stream_instructions_per_message_receiver.to_string(),
        ),
        ("VM exits per message, polling", format!("{:.3}", e.exits_per_message_polling)),
        (
            "round trip, doorbells (median ticks)",
            e.doorbell_round_trip_instructions_median.to_string(),
        ),
        ("doorbells rung / taken", format!("{} / {}", e.doorbells_rung, e.doorbells_taken)),
        ("VM exits per doorbell, both sides", format!("{:.3}", e.exits_per_doorbell_both_sides)),
        ("VM exits per doorbell taken, receiver", format!("{:.3}", e.exits_per_doorbell_receiver)),
    ];
    let mut t = table(&["figure", "value"]);
    for (k, v) in rows {
        t.add_row([k.to_string(), v]);
    }
    match (&e.mwait, &e.mwait_problem) {
        (Some(m), _) => {
            t.add_row([
                "round trip, MWAIT (median ticks)".to_string(),
                m.round_trip_instructions_median.to_string(),
            ]);
            t.add_row([
                "VM exits per notification, MWAIT: ping / pong".to_string(),
                format!(
                    "{:.3} / {:.3}",
                    m.exits_per_notification_ping, m.exits_per_notification_pong
                ),
            ]);
        }
        (None, Some(p)) => {
            t.add_row(["round trip, MWAIT".to_string(), format!("no figure: {p}")]);
        }
        (None, None) => {}
    }
    println!("{t}");
    if let Some(raw) = &e.raw {
        println!(
            "The channel library against a bare ring over the same memory, same guests, same run \
             (`raw=1`: no link word, no epochs, no checks)"
        );
        let mut t = table(&["figure", "library", "bare ring", "x bare"]);
        let x =
            |a: u64, b: u64| if b > 0 { format!("{:.2}", a as f64 / b as f64) } else { "-".into() };
        for (k, a, b) in [
            (
                "round trip, polling (median)",
                e.round_trip_instructions_median,
                raw.round_trip_instructions_median,
            ),
            ("send (median)", e.send_instructions, raw.send_instructions),
            ("receive (median)", e.receive_instructions, raw.receive_instructions),
            (
                "stream: sender per message",
                e.stream_instructions_per_message_sender,
                raw.stream_instructions_per_message_sender,
            ),
            (
                "stream: receiver per message",
                e.stream_instructions_per_message_receiver,
                raw.stream_instructions_per_message_receiver,
            ),
            ("send: instructions retired (single-stepped)", e.send_code, raw.send_code),
            ("receive: instructions retired (single-stepped)", e.receive_code, raw.receive_code),
        ] {
            t.add_row([k.to_string(), a.to_string(), b.to_string(), x(a, b)]);
        }
        println!("{t}");
        println!(
            "(the TSC rows are the pair's time: Bochs 2.7 as installed, built with its \
             debugger, runs each CPU 5 instructions in turn and advances the one TSC by the \
             most any CPU executed, so a CPU's TSC counts its rounds, spins included; the \
             retired rows count the code alone, single-stepped on its own CPU)"
        );
    }
}

/// The meta data of a bench that began on `before` with the timer `timer`.
pub fn bench_meta(timer: TimerResolution, before: crate::report::Host) -> BenchMeta {
    BenchMeta {
        tool_version: env!("CARGO_PKG_VERSION").into(),
        git_commit: crate::meta::collect(None).git_commit,
        date_utc: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        host: before,
        load_average_after: crate::meta::load_average(),
        timer,
    }
}

/// Writes a bench's figures to `json` if asked (pretty JSON); `plot::after_bench` draws
/// them (`--plot`).
pub fn save(json: Option<&std::path::Path>, figures: &impl Serialize) -> Result<()> {
    let Some(p) = json else { return Ok(()) };
    std::fs::write(p, serde_json::to_string_pretty(figures)? + "\n")?;
    Ok(())
}

/// `cargo xtask bench channels`.
pub fn channels(
    json: Option<&std::path::Path>,
    repeat: u32,
    host_only: bool,
    bochs_only: bool,
) -> Result<()> {
    if bochs_only {
        eprintln!(
            "bench: Bochs runs (poll, doorbell, mwait, stream; poll and stream on a bare ring)..."
        );
        let e = emulated()?;
        print_emulated(&e);
        return save(json, &e);
    }
    let before = crate::meta::host();
    let timer = timer_resolution();
    eprintln!("bench: host transports (a few seconds per repetition)...");
    let host = host_repeated(repeat)?;
    eprintln!("bench: round trips against the cache-line ping-pong, in 20 pairs...");
    let rtt = rtt_pairs(20, 50_000);
    eprintln!("bench: raw line ring and mkvisor ring streaming, in 20 pairs...");
    let pairs = stream_pairs(20, 1_000_000);
    let emulated = if host_only {
        None
    } else {
        eprintln!(
            "bench: Bochs runs (poll, doorbell, mwait, stream; poll and stream on a bare ring)..."
        );
        Some(emulated()?)
    };
    let r = Report {
        host,
        stream_pairs: Some(pairs),
        rtt_pairs: Some(rtt),
        emulated,
        meta: bench_meta(timer, before),
    };
    print(&r);
    save(json, &r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transport_round_trips_and_streams_in_order() {
        let _ = cores();
        for (a, b) in [
            line_pair(),
            shared_line_pair(),
            slot_reply_pair(),
            raw_pair(),
            ring_pair(64),
            library_pair(64),
            crossbeam_pair(),
            mpsc_pair(),
            pipe_pair().unwrap(),
        ] {
            assert_eq!(ping_pong(a, b, 500).len(), 500);
        }
        for (a, b) in [
            raw_pair(),
            ring_pair(8),
            library_pair(8),
            crossbeam_pair(),
            mpsc_pair(),
            pipe_pair().unwrap(),
        ] {
            assert!(stream(a, b, 5000) > 0.0);
        }
    }

    #[test]
    fn histogram_buckets_are_log_spaced_and_count_every_sample() {
        let h = histogram(&[100.0, 100.0, 150.0, 400.0]);
        assert_eq!(h.iter().map(|b| b.count).sum::<u64>(), 4);
        // Bounds 2^(i/4): 100 falls in (2^(26/4), 2^(27/4)] = (90.5, 107.6].
        assert!((h[0].upper_ns - 2f64.powf(6.75)).abs() < 1e-9);
        assert_eq!(h[0].count, 2);
        // 400 in (2^(34/4), 2^(35/4)]: nine buckets from 27 to 35.
        assert_eq!(h.len(), 9);
        assert_eq!(h[8].count, 1);
        // A sample on a bound is in the bucket it bounds.
        let h = histogram(&[128.0, 256.0]);
        assert_eq!((h[0].upper_ns, h.last().unwrap().upper_ns), (128.0, 256.0));
        assert!(histogram(&[]).is_empty());
    }

    #[test]
    fn median_confidence_intervals_from_order_statistics() {
        // 10 values: the 95% interval is [x(1), x(8)] (coverage 0.979); x(2)..x(7) would
        // cover only 0.891.
        let v: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        let (m, lo, hi, c) = median_ci(&v);
        assert_eq!((m, lo, hi), (5.5, 2.0, 9.0));
        assert!((c - 0.978_515_625).abs() < 1e-9, "{c}");
        // 3 values cannot reach 95%: min and max, 75% coverage, said so.
        let (m, lo, hi, c) = median_ci(&[3.0, 1.0, 2.0]);
        assert_eq!((m, lo, hi, c), (2.0, 1.0, 3.0, 0.75));
        assert_eq!(median_ci(&[7.0]).3, 0.0, "one run has no interval");
    }

    #[test]
    fn timer_resolution_is_measured() {
        let t = timer_resolution();
        assert!(t.instant_ns > 0.0 && t.instant_ns < 1e6, "{t:?}");
        assert!(t.tsc_ghz > 0.01 && t.tsc_ns > 0.0, "{t:?}");
    }
}

/// One row of `bench caps`: every cost in `unit` (emulated instructions).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct CapsRow {
    pub k: u64,
    /// The unit of the costs (`map` to `revoke_per_copy`): `emulated_instructions`.
    #[serde(default)]
    pub unit: String,
    /// Map and unmap of the first half of the grant (1 MiB: 4-KiB EPT pages), after the
    /// whole grant was mapped and unmapped twice.
    pub map: u64,
    pub unmap: u64,
    /// The same again.
    #[serde(default)]
    pub map_again: u64,
    #[serde(default)]
    pub unmap_again: u64,
    /// The whole grant (2 MiB, aligned: one large EPT page): the guest's first map and
    /// unmap, then a repeat.
    #[serde(default)]
    pub map_whole: u64,
    #[serde(default)]
    pub unmap_whole: u64,
    #[serde(default)]
    pub map_whole_again: u64,
    #[serde(default)]
    pub unmap_whole_again: u64,
    /// The whole grant 4 KiB off a 2-MiB boundary: 4-KiB EPT pages.
    #[serde(default)]
    pub map_whole_4k: u64,
    #[serde(default)]
    pub unmap_whole_4k: u64,
    /// The whole grant's size (KiB).
    #[serde(default)]
    pub whole_kib: u64,
    pub copy_per_copy: u64,
    pub move_: u64,
    pub revoke: u64,
    pub revoke_per_copy: u64,
    /// VM exits the owner took during its revoke (its own hypercall included; the replies'
    /// kicks arrive while it waits in the hypervisor and cost no exit).
    pub revoke_exits_owner: u64,
    /// NMI exits the holders took over the whole run (kicks for inserts and revokes).
    pub holder_nmi_exits: u64,
    /// NMI kicks and inter-core messages sent by the owner's core.
    pub owner_nmis: u64,
    pub owner_messages: u64,
    /// The revoker's own cost: what the owner's core worked on its revoke (the report's
    /// `revoke_tsc`: requests and kicks sent, replies handled, not the waiting).
    #[serde(default)]
    pub revoke_own: u64,
    /// How the revoke reached the holders (`broadcast`, `tree/F` with fan-out F) and the
    /// machine's CPUs; empty and 0 in the fixed-config runs before `--revoke` existed.
    #[serde(default)]
    pub strategy: String,
    #[serde(default)]
    pub cpus: u64,
}

fn run_report(config: &str) -> Result<(crate::report::Report, String)> {
    let args = crate::cli::RunArgs::quiet(crate::cli::Emulator::Bochs, Some(config));
    let r = crate::run::run(&args)?;
    if r.outcome != "ok" {
        bail!("benchmark run {config} ended {}: {:?}", r.outcome, r.problems);
    }
    let serial = std::fs::read_to_string(&r.serial_log)?;
    Ok((r, serial))
}

/// One `bench caps` row from a run with `k` holders (its report and serial log).
pub fn caps_row(k: u64, r: &crate::report::Report, serial: &str) -> Result<CapsRow> {
    let v = |key: &str| bench_value(serial, "owner", key);
    let owner = r.guests.iter().find(|g| g.name == "owner").context("owner guest")?;
    let holders: u64 = r
        .guests
        .iter()
        .filter(|g| g.name.starts_with('h'))
        .map(|g| g.exits.get("exception_nmi").copied().unwrap_or(0))
        .sum();
    let revoke = v("revoke")?;
    Ok(CapsRow {
        k,
        unit: "emulated_instructions".into(),
        map: v("map")?,
        unmap: v("unmap")?,
        map_again: v("map_again")?,
        unmap_again: v("unmap_again")?,
        map_whole: v("map_whole")?,
        unmap_whole: v("unmap_whole")?,
        map_whole_again: v("map_whole_again")?,
        unmap_whole_again: v("unmap_whole_again")?,
        map_whole_4k: v("map_whole_4k")?,
        unmap_whole_4k: v("unmap_whole_4k")?,
        whole_kib: v("whole_kib")?,
        copy_per_copy: v("copy")?,
        move_: v("move")?,
        revoke,
        revoke_per_copy: revoke / k,
        revoke_exits_owner: v("revoke_exits")?,
        holder_nmi_exits: holders,
        owner_nmis: owner.nmis,
        owner_messages: owner.xmsgs,
        revoke_own: owner.revoke_tsc,
        strategy: String::new(),
        cpus: 0,
    })
}

/// The `bench caps` config for `k` holders on 15 CPUs with revoke strategy `strategy`
/// (`broadcast` or `tree`, the tree with `fanout`): one owner on core 0, a holder on each
/// of cores 1..=k, a channel to each, a 2-MiB grant; no failure detector (its probes would
/// land inside the measured calls).
pub fn caps_config(k: u64, strategy: &str, fanout: u8) -> String {
    let mut t = format!(
        "# Generated by `cargo xtask bench caps --revoke`: {k} holders, revoke = {strategy}.\n\
         [machine]\ncpus = 15\nmemory_mib = 256\nprobe_ms = 0\nrevoke = \"{strategy}\"\n"
    );
    if strategy == "tree" {
        t += &format!("revoke_fanout = {fanout}\n");
    }
    t += "\n[[guest]]\nname = \"owner\"\ncore = 0\nmemory_mib = 4\nworkload = \"capowner\"\n";
    for i in 1..=k {
        t += &format!(
            "\n[[guest]]\nname = \"h{i}\"\ncore = {i}\nmemory_mib = 4\nworkload = \"holder\"\n"
        );
    }
    for i in 1..=k {
        t += &format!(
            "\n[[channel]]\nname = \"oh{i}\"\nbetween = [\"owner\", \"h{i}\"]\nslots = 8\n"
        );
    }
    t += "\n[[grant]]\nname = \"owner-pool\"\nguest = \"owner\"\nmemory_mib = 2\n";
    t
}

/// `cargo xtask bench caps --revoke S,...`: for each k and strategy, the revoke latency (the
/// owner's `cap_revoke` round trip until every holder confirmed) and the revoker's own cost
/// (what its core worked on it), all on 15 CPUs.
pub fn caps_strategies(
    json: Option<&std::path::Path>,
    only: &[u64],
    strategies: &[String],
    fanout: u8,
) -> Result<()> {
    let ks: Vec<u64> = if only.is_empty() { (1..=14).collect() } else { only.to_vec() };
    let mut rows = Vec::new();
    for &k in &ks {
        for s in strategies {
            let name = if s == "tree" { format!("tree/{fanout}") } else { s.clone() };
            eprintln!("bench: caps with {k} holders, revoke {name}, 15 CPUs...");
            let file = format!("bench-caps-k{k}-{}.toml", name.replace('/', "-"));
            let r = boot_variant(&file, &caps_config(k, s, fanout), "")?;
            if r.outcome != "ok" {
                bail!("benchmark run {file} ended {}: {:?}", r.outcome, r.problems);
            }
            let serial = std::fs::read_to_string(&r.serial_log)?;
            let mut row = caps_row(k, &r, &serial)?;
            row.strategy = name;
            row.cpus = 15;
            rows.push(row);
        }
    }
    println!("Revoke strategies in Bochs (TSC = emulated instructions; one owner on core 0, k holders on");
    println!("cores 1..k, 15 CPUs; latency: the owner's cap_revoke round trip until every copy is confirmed");
    println!("gone; own cost: what the owner's core worked on it, not the waiting; msgs: inter-core messages");
    println!("the owner's core sent over the whole run, k inserts included)");
    let mut header = vec!["k".to_string()];
    for s in strategies {
        let name = if s == "tree" { format!("tree/{fanout}") } else { s.clone() };
        header.extend([format!("{name} latency"), format!("{name} own"), format!("{name} msgs")]);
    }
    let mut t = table(&header.iter().map(String::as_str).collect::<Vec<_>>());
    for &k in &ks {
        let mut cells = vec![k.to_string()];
        for r in rows.iter().filter(|r| r.k == k) {
            cells.extend([r.revoke, r.revoke_own, r.owner_messages].map(|v| v.to_string()));
        }
        t.add_row(cells);
    }
    println!("{t}");
    save(json, &rows)
}

/// `cargo xtask bench caps`: capability operations in Bochs, for 1 to 14 copies (15 CPUs,
/// Bochs's limit, for 14).
pub fn caps(json: Option<&std::path::Path>, only: &[u64]) -> Result<()> {
    if let Some(k) = only.iter().find(|k| ![1, 2, 4, 7, 10, 14].contains(*k)) {
        bail!("no configs/bench-caps-k{k}.toml: any k of 1..=14 runs with --revoke");
    }
    let mut rows = Vec::new();
    for k in [1u64, 2, 4, 7, 10, 14] {
        if !only.is_empty() && !only.contains(&k) {
            continue;
        }
        eprintln!("bench: caps with {k} holders...");
        let (r, serial) = run_report(&format!("configs/bench-caps-k{k}.toml"))?;
        rows.push(caps_row(k, &r, &serial)?);
    }

    println!("Capability operations in Bochs (TSC = emulated instructions; one owner, k holders on k other cores;");
    println!(
        "revoke kicks every holder at once: all REVOKE messages and NMIs first, then the replies)"
    );
    let mut t = table(&[
        "k",
        "map",
        "unmap",
        "copy/each",
        "move",
        "revoke",
        "revoke/k",
        "owner exits",
        "holder NMIs",
        "owner NMIs",
        "owner msgs",
    ]);
    for r in &rows {
        t.add_row(
            [
                r.k,
                r.map,
                r.unmap,
                r.copy_per_copy,
                r.move_,
                r.revoke,
                r.revoke_per_copy,
                r.revoke_exits_owner,
                r.holder_nmi_exits,
                r.owner_nmis,
                r.owner_messages,
            ]
            .map(|v| v.to_string()),
        );
    }
    println!("{t}");
    println!();
    println!(
        "Map and unmap (hypercall round trips from the guest, EPT change and INVEPT included):"
    );
    println!("the whole grant (aligned: one large EPT page) first and again, at 4 KiB past a 2-MiB boundary (4-KiB pages),");
    println!("then its first half (4-KiB pages) twice");
    let mut t = table(&[
        "k",
        "whole KiB",
        "map first",
        "unmap first",
        "map again",
        "unmap again",
        "+4 KiB: map",
        "unmap",
        "half: map",
        "unmap",
        "map again",
        "unmap again",
    ]);
    for r in &rows {
        t.add_row(
            [
                r.k,
                r.whole_kib,
                r.map_whole,
                r.unmap_whole,
                r.map_whole_again,
                r.unmap_whole_again,
                r.map_whole_4k,
                r.unmap_whole_4k,
                r.map,
                r.unmap,
                r.map_again,
                r.unmap_again,
            ]
            .map(|v| v.to_string()),
        );
    }
    println!("{t}");
    save(json, &rows)
}
