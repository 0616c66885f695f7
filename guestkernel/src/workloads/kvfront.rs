// SPDX-License-Identifier: MIT OR Apache-2.0
//! Workload `kvfront`: the front of the sharded key-value service (`vmcall_proto::kv`
//! documents the service, its failure semantics and the protocol to the workers). It owns
//! the guest's first card, serves memcached's text protocol on TCP port `port` through the
//! SDK's TCP/IP stack (`backlog` connections at once, requests pipelined on each), and
//! sends each key's request to the worker of its shard, one request at a time, waiting at
//! most `timeout_ms` for each message the worker owes; a worker that times out or answers
//! garbage is fenced, and restarted if the front holds a guest-control capability over it. Large values go by capability (`large = "cap"`: one
//! buffer per shard cut from its grant, copied to the worker per request and revoked after
//! it) or through the ring (`large = "copy"`).
//!
//! Console: `kvfront: up:` (card, port, workers, mode), one line per shard event (down,
//! fenced, back), `kvfront: connection N from ...` and `... closed`, and at the end a
//! `bench kvfront:` line (commands, worker requests, work instructions per command, the
//! latency percentiles in TSC ticks, capability and ring traffic) and `kvfront: done:`.
//! Exits 0 after `shutdown`; 2 the card did not come up, 3 no grant for `large = "cap"`,
//! 4 no channel, 5 `ms` passed first, 6 the port could not be listened on.
//!
//! May call: `tcpip` (and smoltcp through it), `channel`, `caps`, `pci` (deadlines),
//! `arch`, `vmcall_proto::kv`, `alloc`.

use alloc::vec::Vec;
use guestkernel::arch::rdtsc;
use guestkernel::caps;
use guestkernel::channel::{self, Chan, ChannelError};
use guestkernel::pci;
use guestkernel::tcpip::smoltcp::iface::SocketHandle;
use guestkernel::tcpip::smoltcp::socket::tcp::State;
use guestkernel::tcpip::{Config, Iface};
use vmcall_proto::guest::BootInfo;
use vmcall_proto::hypercall::GRANT_WINDOW;
use vmcall_proto::kv::{self, op, status, via, Reply, Request};

const NOT_UP: u64 = 2;
const NO_GRANT: u64 = 3;
const NO_CHANNEL: u64 = 4;
const SHORT: u64 = 5;
const NO_LISTEN: u64 = 6;
/// The longest command line taken (memcached's key limit and some).
const MAX_LINE: usize = 2048;
/// Output a connection may have pending before its next command waits.
const OUT_HIGH: usize = 128 * 1024;
/// Polls before sleeping on a body message (it follows its header at once: a sleep, two
/// hypercalls, costs more than many polls).
const BODY_POLLS: u32 = 2000;
/// Latencies kept for the percentiles.
const KEEP: usize = 100_000;

/// One shard: its worker's channel and the front's view of it.
struct Shard {
    chan: Chan,
    /// The channel's endpoint capability (for transfers).
    ep: u64,
    /// The shard's buffer (cap mode): its slot and where the front maps it.
    buf: u64,
    buf_at: u64,
    /// Down because the front fenced it (timeout, garbage): until a new epoch.
    fenced: bool,
    /// The guest-control capability over its worker, if the config gives one: a fenced
    /// worker is then restarted by the front.
    ctl: Option<u64>,
    /// Whether the front restarted the worker since it fenced it.
    restarted: bool,
    /// Whether the last look at the link found the worker gone.
    gone: bool,
    requests: u64,
    errors: u64,
    restarts: u64,
    timeouts: u64,
    garbage: u64,
    items: u64,
    bytes: u64,
}

/// Why a worker request failed: the client gets the shard's error line.
#[derive(Debug)]
struct Unavailable(u32);

/// The front's counters.
#[derive(Default)]
struct Counts {
    commands: u64,
    gets: u64,
    sets: u64,
    hits: u64,
    misses: u64,
    worker_requests: u64,
    unavailable: u64,
    caps_granted: u64,
    caps_revoked: u64,
    cap_bytes: u64,
    ring_value_bytes: u64,
    messages_sent: u64,
    messages_received: u64,
    connections: u64,
    controller_restarts: u64,
    work: u64,
    latencies: Vec<u32>,
}

struct Front {
    shards: Vec<Shard>,
    copy: bool,
    timeout_ms: u64,
    polls: u32,
    seq: u32,
    n: Counts,
    shutdown: bool,
}

/// A client connection and its buffers.
struct Conn {
    h: SocketHandle,
    active: bool,
    n: u64,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    sent: usize,
    /// Bytes of an oversized `set`'s data block still to skip.
    swallow: usize,
    quit: bool,
}

/// Established from our side: the handshake is done and we have not yet seen it end.
fn connected(s: State) -> bool {
    !matches!(
        s,
        State::Closed | State::Listen | State::SynSent | State::SynReceived | State::TimeWait
    )
}

fn ended(s: State) -> bool {
    matches!(s, State::Closed | State::Listen | State::TimeWait)
}

impl Front {
    /// Whether shard `i` can take a request now: resyncs after a restart (its shard is
    /// then empty), says no while its worker is gone or fenced.
    fn ready(&mut self, i: usize) -> bool {
        let sh = &mut self.shards[i];
        match sh.chan.link() {
            Ok(()) => !sh.fenced,
            Err(ChannelError::Reset) => match sh.chan.resync() {
                Ok(epoch) => {
                    sh.restarts += 1;
                    sh.fenced = false;
                    sh.restarted = false;
                    sh.gone = false;
                    sh.items = 0;
                    sh.bytes = 0;
                    log::info!("kvfront: shard {i} back (epoch {epoch}), empty");
                    true
                }
                Err(_) => false,
            },
            Err(_) => {
                if !sh.gone {
                    sh.gone = true;
                    log::info!("kvfront: shard {i} down: its worker is gone");
                }
                false
            }
        }
    }

    fn fence(&mut self, i: usize, why: &str) {
        let sh = &mut self.shards[i];
        if why == "timeout" {
            sh.timeouts += 1;
        } else {
            sh.garbage += 1;
        }
        sh.fenced = true;
        log::warn!(
            "kvfront: shard {i} fenced ({why}): its requests fail until its worker restarts"
        );
    }

    /// Restarts every fenced worker the front controls (once per fencing): its shard comes
    /// back, empty, when its new incarnation's channel is up. Called between commands, so
    /// a buffer granted to the worker was revoked first.
    fn restart_fenced(&mut self) {
        for (i, sh) in self.shards.iter_mut().enumerate() {
            let Some(slot) = sh.ctl.filter(|_| sh.fenced && !sh.restarted) else { continue };
            sh.restarted = true;
            let r = guestkernel::hypercall::call(
                vmcall_proto::hypercall::Hypercall::GuestControl,
                slot,
                vmcall_proto::hypercall::control::RESTART,
            );
            self.n.controller_restarts += 1;
            log::info!("kvfront: shard {i}: restarting its worker (control slot {slot}): {r:?}");
        }
    }

    /// Sends request `q` with `body` (key, then an inline value) to shard `i` and takes
    /// the answer; `want_value` bounds an inline value in it. A link change, a timeout or
    /// a bad answer is `Unavailable` (the last two fence the shard).
    fn exchange(
        &mut self,
        i: usize,
        mut q: Request,
        body: &[&[u8]],
    ) -> Result<(Reply, Vec<u8>), Unavailable> {
        let un = Unavailable(i as u32);
        if !self.ready(i) {
            return Err(un);
        }
        self.seq = self.seq.wrapping_add(1);
        q.seq = self.seq;
        self.n.worker_requests += 1;
        // The worker's every step has `timeout_ms`: room in the ring for our next message,
        // its answer, its next body message (a value copied through the ring is hundreds).
        let step = self.timeout_ms;
        let mut bytes = Vec::with_capacity(body.iter().map(|b| b.len()).sum());
        for b in body {
            bytes.extend_from_slice(b);
        }
        let sh = &mut self.shards[i];
        sh.requests += 1;
        let mut sent = 1u64;
        let mut r = sh.chan.send_until(&q.to_words(), pci::deadline_ms(step));
        kv::pack(&bytes, |m| {
            if r.is_ok() {
                r = sh.chan.send_until(m, pci::deadline_ms(step));
                sent += 1;
            }
        });
        self.n.messages_sent += sent;
        match r {
            Ok(()) => {}
            Err(ChannelError::Full) => {
                self.fence(i, "timeout");
                return Err(un);
            }
            Err(_) => {
                self.ready(i);
                return Err(un);
            }
        }
        let polls = self.polls;
        let got = self.shards[i].chan.recv_until(polls, pci::deadline_ms(step));
        let m = match got {
            Ok(Some(m)) => m,
            Ok(None) => {
                self.fence(i, "timeout");
                return Err(un);
            }
            Err(_) => {
                self.ready(i);
                return Err(un);
            }
        };
        self.n.messages_received += 1;
        let r = Reply::from_words(&m);
        let ok_status = match q.op {
            op::SET => matches!(r.status, status::OK | status::FAILED),
            op::GET => {
                matches!(r.status, status::VALUE | status::BIG | status::NOT_FOUND | status::FAILED)
            }
            op::FETCH => matches!(r.status, status::VALUE | status::NOT_FOUND | status::FAILED),
            op::DELETE => matches!(r.status, status::OK | status::NOT_FOUND | status::FAILED),
            op::INCR | op::DECR => matches!(
                r.status,
                status::OK | status::NOT_FOUND | status::NOT_NUMBER | status::FAILED
            ),
            _ => r.status == status::OK,
        };
        let len = r.value_len as usize;
        let inline = r.status == status::VALUE && r.via != via::CAP;
        let len_ok = match (r.status, r.via) {
            (status::VALUE, via::INLINE) => len <= kv::INLINE_MAX,
            (status::VALUE, via::COPY) => len <= kv::MAX_VALUE && q.via == via::COPY,
            (status::VALUE, via::CAP) => len <= kv::MAX_VALUE && q.op == op::FETCH,
            (status::VALUE, _) => false,
            (status::BIG, _) => len > kv::INLINE_MAX && len <= kv::MAX_VALUE,
            _ => true,
        };
        if r.magic != kv::REPLY_MAGIC || r.seq != q.seq || !ok_status || !len_ok {
            self.fence(i, "garbage");
            return Err(un);
        }
        let mut value = Vec::new();
        if inline {
            value.resize(len, 0);
            let sh = &mut self.shards[i];
            for chunk in value.chunks_mut(56) {
                match sh.chan.recv_until(BODY_POLLS, pci::deadline_ms(step)) {
                    Ok(Some(m)) => kv::unpack(&m, chunk),
                    Ok(None) => {
                        self.fence(i, "timeout");
                        return Err(un);
                    }
                    Err(_) => {
                        self.ready(i);
                        return Err(un);
                    }
                }
                self.n.messages_received += 1;
            }
            self.n.ring_value_bytes += len as u64;
        }
        let sh = &mut self.shards[i];
        (sh.items, sh.bytes) = (r.items, r.bytes);
        Ok((r, value))
    }

    /// Copies shard `i`'s buffer to its worker with `rights`; its slot there.
    fn grant(&mut self, i: usize, rights: u64) -> Result<u64, Unavailable> {
        let sh = &self.shards[i];
        match caps::transfer_when_accepted(sh.buf, sh.ep, 1 | rights << 8, self.timeout_ms) {
            Ok(slot) => {
                self.n.caps_granted += 1;
                Ok(slot)
            }
            Err(e) => {
                log::warn!("kvfront: shard {i}: granting its buffer failed: {e:?}");
                self.ready(i);
                Err(Unavailable(i as u32))
            }
        }
    }

    /// Takes shard `i`'s buffer back from its worker, whatever the worker did with it.
    fn revoke(&mut self, i: usize) {
        match caps::revoke(self.shards[i].buf) {
            Ok(n) => self.n.caps_revoked += n,
            Err(e) => log::warn!("kvfront: shard {i}: revoke failed: {e:?}"),
        }
    }

    fn buffer(&mut self, i: usize) -> &mut [u8] {
        // The shard's buffer is mapped read-write at `buf_at` for the front's whole life,
        // MAX_VALUE bytes; the worker touches it only between `grant` and `revoke`, which
        // this guest sequences around its own accesses.
        // SAFETY: see above; one mutable view at a time (callers do not keep it).
        unsafe { core::slice::from_raw_parts_mut(self.shards[i].buf_at as *mut u8, kv::MAX_VALUE) }
    }

    fn set(&mut self, key: &[u8], flags: u32, value: &[u8]) -> Result<u8, Unavailable> {
        let i = kv::shard_of(key, self.shards.len() as u32) as usize;
        let mut q = Request {
            op: op::SET,
            key_len: key.len() as u16,
            value_len: value.len() as u32,
            flags,
            ..Request::default()
        };
        if value.len() > kv::INLINE_MAX && !self.copy {
            if !self.ready(i) {
                return Err(Unavailable(i as u32));
            }
            self.buffer(i)[..value.len()].copy_from_slice(value);
            q.via = via::CAP;
            q.cap = self.grant(i, 1)?;
            let r = self.exchange(i, q, &[key]);
            self.revoke(i);
            self.n.cap_bytes += value.len() as u64;
            return r.map(|(r, _)| r.status);
        }
        q.via = if value.len() > kv::INLINE_MAX { via::COPY } else { via::INLINE };
        self.n.ring_value_bytes += value.len() as u64;
        self.exchange(i, q, &[key, value]).map(|(r, _)| r.status)
    }

    /// The value of `key` and its flags, if any.
    fn get(&mut self, key: &[u8]) -> Result<Option<(u32, Vec<u8>)>, Unavailable> {
        let i = kv::shard_of(key, self.shards.len() as u32) as usize;
        let mut q = Request { op: op::GET, key_len: key.len() as u16, ..Request::default() };
        q.via = if self.copy { via::COPY } else { via::INLINE };
        let (r, v) = self.exchange(i, q, &[key])?;
        match r.status {
            status::VALUE => Ok(Some((r.flags, v))),
            status::BIG => {
                let q = Request {
                    op: op::FETCH,
                    via: via::CAP,
                    key_len: key.len() as u16,
                    cap: self.grant(i, 3)?,
                    ..Request::default()
                };
                let r = self.exchange(i, q, &[key]);
                self.revoke(i);
                let (r, _) = r?;
                if r.status != status::VALUE {
                    return Ok(None);
                }
                let len = r.value_len as usize;
                self.n.cap_bytes += len as u64;
                Ok(Some((r.flags, self.buffer(i)[..len].to_vec())))
            }
            _ => Ok(None),
        }
    }

    fn simple(&mut self, o: u8, key: &[u8], arg: u64) -> Result<Reply, Unavailable> {
        let i = kv::shard_of(key, self.shards.len() as u32) as usize;
        let q = Request { op: o, key_len: key.len() as u16, arg, ..Request::default() };
        self.exchange(i, q, &[key]).map(|(r, _)| r)
    }

    /// Runs every complete command in `c.inbuf`, appending the answers to `c.out`.
    fn run_commands(&mut self, c: &mut Conn) {
        loop {
            if c.swallow > 0 {
                let k = c.swallow.min(c.inbuf.len());
                c.inbuf.drain(..k);
                c.swallow -= k;
                if c.swallow > 0 {
                    return;
                }
            }
            if c.quit || self.shutdown || c.out.len() - c.sent > OUT_HIGH {
                return;
            }
            let Some(nl) = c.inbuf.iter().position(|&b| b == b'\n') else {
                if c.inbuf.len() > MAX_LINE {
                    c.out.extend_from_slice(b"CLIENT_ERROR line too long\r\n");
                    c.inbuf.clear();
                }
                return;
            };
            let t0 = rdtsc();
            let idle0: u64 = self.shards.iter().map(|s| s.chan.idle_tsc).sum();
            let line_end = if nl > 0 && c.inbuf[nl - 1] == b'\r' { nl - 1 } else { nl };
            let line: Vec<u8> = c.inbuf[..line_end].to_vec();
            let consumed = match self.command(&line, nl + 1, c) {
                Some(n) => n,
                None => return, // a data block still coming
            };
            self.restart_fenced();
            c.inbuf.drain(..consumed.min(c.inbuf.len()));
            let t = rdtsc() - t0;
            let idle: u64 = self.shards.iter().map(|s| s.chan.idle_tsc).sum::<u64>() - idle0;
            self.n.commands += 1;
            self.n.work += t.saturating_sub(idle);
            if self.n.latencies.len() < KEEP {
                self.n.latencies.push(t.min(u32::MAX as u64) as u32);
            }
        }
    }

    /// One command line (without its end of line; `after` is where its data block starts
    /// in `c.inbuf`): the bytes of `c.inbuf` it consumed, or `None` if its data block is
    /// not all there yet.
    fn command(&mut self, line: &[u8], after: usize, c: &mut Conn) -> Option<usize> {
        let words: Vec<&[u8]> = line.split(|&b| b == b' ').filter(|w| !w.is_empty()).collect();
        let out = &mut c.out;
        let bad = b"CLIENT_ERROR bad command line format\r\n";
        let Some(&cmd) = words.first() else {
            out.extend_from_slice(b"ERROR\r\n");
            return Some(after);
        };
        let key_ok = |k: &[u8]| !k.is_empty() && k.len() <= kv::MAX_KEY;
        match cmd {
            b"get" | b"gets" => {
                if words.len() < 2 {
                    out.extend_from_slice(b"ERROR\r\n");
                    return Some(after);
                }
                if !words[1..].iter().all(|k| key_ok(k)) {
                    out.extend_from_slice(bad);
                    return Some(after);
                }
                let mut answer = Vec::new();
                for k in &words[1..] {
                    self.n.gets += 1;
                    match self.get(k) {
                        Ok(Some((flags, v))) => {
                            self.n.hits += 1;
                            answer.extend_from_slice(b"VALUE ");
                            answer.extend_from_slice(k);
                            answer.extend_from_slice(
                                alloc::format!(" {flags} {}\r\n", v.len()).as_bytes(),
                            );
                            answer.extend_from_slice(&v);
                            answer.extend_from_slice(b"\r\n");
                        }
                        Ok(None) => self.n.misses += 1,
                        Err(Unavailable(s)) => {
                            self.n.unavailable += 1;
                            self.shards[s as usize].errors += 1;
                            unavailable(&mut c.out, s);
                            return Some(after);
                        }
                    }
                }
                answer.extend_from_slice(b"END\r\n");
                c.out.extend_from_slice(&answer);
                Some(after)
            }
            b"set" => {
                let noreply = words.len() == 6 && words[5] == b"noreply";
                let parsed = (words.len() == 5 || noreply)
                    .then(|| {
                        Some((
                            num::<u32>(words[2])?,
                            num::<i64>(words[3])?,
                            num::<usize>(words[4])?,
                        ))
                    })
                    .flatten();
                let Some((flags, _exptime, n)) = parsed.filter(|_| key_ok(words[1])) else {
                    out.extend_from_slice(bad);
                    return Some(after);
                };
                if n > kv::MAX_VALUE {
                    out.extend_from_slice(kv::TOO_LARGE.as_bytes());
                    c.swallow = n + 2;
                    return Some(after);
                }
                if c.inbuf.len() < after + n + 2 {
                    return None;
                }
                if &c.inbuf[after + n..after + n + 2] != b"\r\n" {
                    c.out.extend_from_slice(b"CLIENT_ERROR bad data chunk\r\n");
                    return Some(after + n + 2);
                }
                let value = c.inbuf[after..after + n].to_vec();
                self.n.sets += 1;
                let answer: &[u8] = match self.set(words[1], flags, &value) {
                    Ok(status::OK) => b"STORED\r\n",
                    Ok(_) => b"SERVER_ERROR out of memory storing object\r\n",
                    Err(Unavailable(s)) => {
                        self.n.unavailable += 1;
                        self.shards[s as usize].errors += 1;
                        unavailable(&mut c.out, s);
                        return Some(after + n + 2);
                    }
                };
                if !noreply {
                    c.out.extend_from_slice(answer);
                }
                Some(after + n + 2)
            }
            b"delete" | b"incr" | b"decr" => {
                let counter = cmd != b"delete";
                let min = if counter { 3 } else { 2 };
                let noreply = words.len() == min + 1 && words[min] == b"noreply";
                if !(words.len() == min || noreply) || !key_ok(words[1]) {
                    out.extend_from_slice(bad);
                    return Some(after);
                }
                let delta = if counter {
                    match num::<u64>(words[2]) {
                        Some(d) => d,
                        None => {
                            out.extend_from_slice(
                                b"CLIENT_ERROR invalid numeric delta argument\r\n",
                            );
                            return Some(after);
                        }
                    }
                } else {
                    0
                };
                let o = match cmd {
                    b"incr" => op::INCR,
                    b"decr" => op::DECR,
                    _ => op::DELETE,
                };
                let answer = match self.simple(o, words[1], delta) {
                    Ok(r) => match (r.status, counter) {
                        (status::OK, true) => alloc::format!("{}\r\n", r.number).into_bytes(),
                        (status::OK, false) => b"DELETED\r\n".to_vec(),
                        (status::NOT_FOUND, _) => b"NOT_FOUND\r\n".to_vec(),
                        (status::NOT_NUMBER, _) => {
                            b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
                                .to_vec()
                        }
                        _ => b"SERVER_ERROR the worker failed\r\n".to_vec(),
                    },
                    Err(Unavailable(s)) => {
                        self.n.unavailable += 1;
                        self.shards[s as usize].errors += 1;
                        unavailable(&mut c.out, s);
                        return Some(after);
                    }
                };
                if !noreply {
                    c.out.extend_from_slice(&answer);
                }
                Some(after)
            }
            b"version" => {
                out.extend_from_slice(kv::VERSION.as_bytes());
                Some(after)
            }
            b"stats" => {
                self.stats(&mut c.out);
                Some(after)
            }
            b"quit" => {
                c.quit = true;
                Some(after)
            }
            b"shutdown" => {
                out.extend_from_slice(b"OK\r\n");
                self.shutdown = true;
                Some(after)
            }
            _ => {
                out.extend_from_slice(b"ERROR\r\n");
                Some(after)
            }
        }
    }

    fn stats(&mut self, out: &mut Vec<u8>) {
        // Fresh counts from every shard that is up.
        for i in 0..self.shards.len() {
            let q = Request { op: op::COUNT, key_len: 1, ..Request::default() };
            let _ = self.exchange(i, q, &[b"-"]);
        }
        let n = &self.n;
        let mut w =
            |k: &str, v: u64| out.extend_from_slice(alloc::format!("STAT {k} {v}\r\n").as_bytes());
        w("workers", self.shards.len() as u64);
        w("total_connections", n.connections);
        w("cmd_total", n.commands);
        w("cmd_get", n.gets);
        w("cmd_set", n.sets);
        w("get_hits", n.hits);
        w("get_misses", n.misses);
        w("worker_requests", n.worker_requests);
        w("unavailable_errors", n.unavailable);
        w("controller_restarts", n.controller_restarts);
        w("caps_granted", n.caps_granted);
        w("caps_revoked", n.caps_revoked);
        w("cap_value_bytes", n.cap_bytes);
        w("ring_value_bytes", n.ring_value_bytes);
        w("ring_messages_sent", n.messages_sent);
        w("ring_messages_received", n.messages_received);
        w("work_instructions_per_command", n.work.checked_div(n.commands).unwrap_or(0));
        let (mut items, mut bytes) = (0, 0);
        for (i, s) in self.shards.iter().enumerate() {
            let up = !s.fenced && s.chan.link().is_ok();
            w(&alloc::format!("shard_{i}:up"), up as u64);
            w(&alloc::format!("shard_{i}:items"), if up { s.items } else { 0 });
            w(&alloc::format!("shard_{i}:requests"), s.requests);
            w(&alloc::format!("shard_{i}:errors"), s.errors);
            w(&alloc::format!("shard_{i}:restarts"), s.restarts);
            w(&alloc::format!("shard_{i}:timeouts"), s.timeouts);
            w(&alloc::format!("shard_{i}:garbage"), s.garbage);
            if up {
                items += s.items;
                bytes += s.bytes;
            }
        }
        w("curr_items", items);
        w("bytes", bytes);
        out.extend_from_slice(b"END\r\n");
    }
}

/// Appends shard `s`'s error line.
fn unavailable(out: &mut Vec<u8>, s: u32) {
    let mut line = [0u8; 48];
    let n = kv::unavailable_line(s, &mut line);
    out.extend_from_slice(&line[..n]);
}

/// A decimal number of type `T` (as memcached parses its fields).
fn num<T: core::str::FromStr>(w: &[u8]) -> Option<T> {
    core::str::from_utf8(w).ok()?.parse().ok()
}

pub fn kvfront(bi: &BootInfo) -> u64 {
    let port = bi.arg_int("port") as u16;
    let buffer = bi.arg_int("buffer") as usize;
    let copy = bi.arg_word("large") == "copy";
    let ms = bi.arg_int("ms");
    // Shards: the channels, in boot-info order; endpoint caps follow the grants.
    let workers = bi.channels().len();
    let Some(first_ep) = caps::first_endpoint() else {
        log::error!("kvfront: no channel to a worker");
        return NO_CHANNEL;
    };
    if workers == 0 {
        log::error!("kvfront: no channel to a worker");
        return NO_CHANNEL;
    }
    // Cut one buffer per shard from the grant (slot 0) and map each.
    let buf_bytes = kv::BUFFER_PAGES * 4096;
    let grant_pages = if first_ep > 0 { caps::identify(0).map_or(0, |i| i >> 16) } else { 0 };
    let mut bufs = Vec::new();
    if grant_pages >= kv::BUFFER_PAGES * workers as u64 {
        let mut cur = 0;
        for i in 0..workers {
            let at = GRANT_WINDOW.0 + i as u64 * buf_bytes;
            let next = if i + 1 < workers { caps::split(cur, buf_bytes) } else { Ok(cur) };
            if caps::map(cur, at, 3).is_err() || next.is_err() {
                log::error!("kvfront: could not cut and map buffer {i} from the grant");
                return NO_GRANT;
            }
            bufs.push((cur, at));
            cur = next.unwrap_or(cur);
        }
    } else if !copy {
        log::error!(
            "kvfront: large = \"cap\" needs a grant of {} pages (one {} KiB buffer per worker); \
             it has {grant_pages}",
            kv::BUFFER_PAGES * workers as u64,
            kv::MAX_VALUE / 1024
        );
        return NO_GRANT;
    }
    let mut shards = Vec::new();
    for i in 0..workers {
        let Some(mut chan) = channel::open_index(bi, i) else { return NO_CHANNEL };
        chan.set_doorbells(true);
        let (buf, buf_at) = bufs.get(i).copied().unwrap_or((u64::MAX, 0));
        // Guest-control capabilities follow the endpoints, in the config's order of guests
        // (the workers', as their channels).
        let ctl = first_ep + (workers + i) as u64;
        let ctl = caps::identify(ctl).is_ok_and(|t| t & 0xff == 3).then_some(ctl);
        shards.push(Shard {
            chan,
            ep: first_ep + i as u64,
            buf,
            buf_at,
            fenced: false,
            ctl,
            restarted: false,
            gone: false,
            requests: 0,
            errors: 0,
            restarts: 0,
            timeouts: 0,
            garbage: 0,
            items: 0,
            bytes: 0,
        });
    }
    let mut f = Front {
        shards,
        copy,
        timeout_ms: bi.arg_int("timeout_ms"),
        polls: bi.arg_int("polls") as u32,
        seq: 0,
        n: Counts::default(),
        shutdown: false,
    };
    let mut net = match Iface::open(bi, 0, &Config::SLIRP, pci::deadline_ms(2000)) {
        Ok(n) => n,
        Err(e) => {
            log::error!("kvfront: the card did not come up: {e}");
            return NOT_UP;
        }
    };
    let mut conns = Vec::new();
    for _ in 0..bi.arg_int("backlog") {
        let h = net.add_tcp(buffer, buffer);
        let s = net.tcp(h);
        s.set_nagle_enabled(false);
        if let Err(e) = s.listen(port) {
            log::error!("kvfront: listen on {port}: {e}");
            return NO_LISTEN;
        }
        conns.push(Conn {
            h,
            active: false,
            n: 0,
            inbuf: Vec::new(),
            out: Vec::new(),
            sent: 0,
            swallow: 0,
            quit: false,
        });
    }
    log::info!(
        "kvfront: up: {}, 10.0.2.15 port {port} (host port {} in the shipped configs), {workers} \
         worker(s), large values by {}, {} ms per request",
        net.nic().model(),
        kv::HOST_PORT,
        if copy { "copy through the ring" } else { "capability" },
        f.timeout_ms
    );
    let deadline = pci::deadline_ms(ms);
    let mut chunk = alloc::vec![0u8; buffer];
    let t_start = rdtsc();
    let idle_net0 = net.stats().idle_tsc;
    let mut flushed_at: Option<u64> = None;
    loop {
        net.poll();
        for c in conns.iter_mut() {
            let s = net.tcp(c.h);
            if !c.active && connected(s.state()) {
                f.n.connections += 1;
                c.active = true;
                c.n = f.n.connections;
                (c.quit, c.swallow, c.sent) = (false, 0, 0);
                c.inbuf.clear();
                c.out.clear();
                match s.remote_endpoint() {
                    Some(r) => log::info!("kvfront: connection {} from {r}", c.n),
                    None => log::info!("kvfront: connection {}", c.n),
                }
            }
            if !c.active {
                continue;
            }
            while s.can_recv() && c.inbuf.len() < kv::MAX_VALUE + 2 * MAX_LINE {
                let room = (kv::MAX_VALUE + 2 * MAX_LINE - c.inbuf.len()).min(chunk.len());
                match s.recv_slice(&mut chunk[..room]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => c.inbuf.extend_from_slice(&chunk[..n]),
                }
            }
            f.run_commands(c);
            let s = net.tcp(c.h);
            while c.sent < c.out.len() && s.can_send() {
                match s.send_slice(&c.out[c.sent..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => c.sent += n,
                }
            }
            if c.sent == c.out.len() {
                (c.sent, c.out) = (0, Vec::new());
                let peer_done = s.state() == State::CloseWait && !s.can_recv();
                if c.quit || peer_done {
                    s.close();
                }
            }
            if ended(s.state()) {
                log::info!("kvfront: connection {} closed ({})", c.n, s.state());
                c.active = false;
            }
            if !s.is_open() && !f.shutdown {
                if let Err(e) = s.listen(port) {
                    log::error!("kvfront: listen on {port} again: {e}");
                    return NO_LISTEN;
                }
            }
        }
        if f.shutdown {
            // Everything answered is out of our buffers and acknowledged, or a second
            // passed: close and stop.
            let pending = conns.iter().any(|c| {
                let s = net.tcp(c.h);
                c.active && (c.sent < c.out.len() || s.send_queue() > 0)
            });
            let t = *flushed_at.get_or_insert_with(|| pci::deadline_ms(1000));
            if !pending || rdtsc() >= t {
                break;
            }
        }
        if rdtsc() >= deadline {
            break;
        }
        net.wait(deadline);
    }
    // Close every connection and give the closes a moment to go out.
    for c in conns.iter() {
        net.tcp(c.h).close();
    }
    let close_by = pci::deadline_ms(200);
    while rdtsc() < close_by && conns.iter().any(|c| !ended(net.tcp(c.h).state())) {
        net.poll();
        net.wait(close_by);
    }
    net.poll();
    let n = &mut f.n;
    n.latencies.sort_unstable();
    let pct = |p: usize| {
        n.latencies
            .get((n.latencies.len() * p / 100).min(n.latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let total = rdtsc() - t_start;
    let idle = net.stats().idle_tsc - idle_net0;
    log::info!(
        "bench kvfront: {} commands ({} get keys, {} sets; {} hits, {} misses; {} unavailable) \
         in {} worker requests; work {} instructions per command; latency p50 {} p90 {} p99 {} \
         max {} TSC ticks",
        n.commands,
        n.gets,
        n.sets,
        n.hits,
        n.misses,
        n.unavailable,
        n.worker_requests,
        n.work.checked_div(n.commands).unwrap_or(0),
        pct(50),
        pct(90),
        pct(99),
        n.latencies.last().copied().unwrap_or(0),
    );
    log::info!(
        "bench kvfront traffic: {} capabilities granted, {} revoked; {} value bytes by \
         capability, {} by ring; ring messages {} sent, {} received; run {} TSC ticks, {} \
         halted",
        n.caps_granted,
        n.caps_revoked,
        n.cap_bytes,
        n.ring_value_bytes,
        n.messages_sent,
        n.messages_received,
        total,
        idle
    );
    for (i, s) in f.shards.iter().enumerate() {
        log::info!(
            "kvfront: shard {i}: {} requests, {} errors, {} restarts seen, {} timeouts, {} \
             garbage replies, {} items",
            s.requests,
            s.errors,
            s.restarts,
            s.timeouts,
            s.garbage,
            s.items
        );
    }
    let status = if f.shutdown { 0 } else { SHORT };
    log::info!(
        "kvfront: done: {} connection(s), {} commands; exit {status}",
        f.n.connections,
        f.n.commands
    );
    status
}
