// SPDX-License-Identifier: MIT OR Apache-2.0
//! Workload `kvworker`: one shard of the key-value service (`vmcall_proto::kv` documents
//! the service and the protocol). It serves the front's requests from its channel, one at a
//! time, from a B-tree map on its heap; values the front grants by capability it maps in
//! its grant window, reads or writes, and unmaps before it answers.
//!
//! Fault injection (`mode`, from the `after`-th request of its first incarnation on; later
//! incarnations serve normally): `crash` (reads past its partition: the hypervisor stops
//! it, its restart policy starts it again, empty), `garbage` (answers words without the
//! magic), `mute` (takes requests, never answers), `hoard` (maps the next granted buffer,
//! never answers, never unmaps, and keeps reading it: the front's revoke takes it away and
//! the next read stops the worker).
//!
//! Console: `kvworker: up:` once, and at the end `bench kvworker:` (requests, work
//! instructions per request, items) and `kvworker: done:`. Exits 0 when the front is gone;
//! 2 without a channel.
//!
//! May call: `channel`, `caps`, `timer`, `arch`, `vmcall_proto::kv`, `alloc`.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use guestkernel::arch::rdtsc;
use guestkernel::caps;
use guestkernel::channel::{self, Chan, ChannelError};
use guestkernel::pci;
use vmcall_proto::guest::BootInfo;
use vmcall_proto::hypercall::GRANT_WINDOW;
use vmcall_proto::kv::{self, op, status, via, Reply, Request};

const NO_CHANNEL: u64 = 2;
/// How long a body message or a reply's room in the ring may take (ms).
const BODY_MS: u64 = 1000;
/// Polls before sleeping on a body message (it follows its header at once: a sleep, two
/// hypercalls, costs more than many polls).
const BODY_POLLS: u32 = 2000;
/// Where a granted buffer is mapped.
const BUFFER_AT: u64 = GRANT_WINDOW.0;

struct Item {
    flags: u32,
    value: Vec<u8>,
}

struct Shard {
    map: BTreeMap<Vec<u8>, Item>,
    bytes: u64,
    served: u64,
}

impl Shard {
    fn reply(&self, status: u8, seq: u32) -> Reply {
        Reply {
            status,
            seq,
            items: self.map.len() as u64,
            bytes: self.bytes,
            served: self.served,
            magic: kv::REPLY_MAGIC,
            ..Reply::default()
        }
    }

    fn insert(&mut self, key: Vec<u8>, item: Item) {
        self.bytes += item.value.len() as u64;
        if let Some(old) = self.map.insert(key, item) {
            self.bytes -= old.value.len() as u64;
        }
    }
}

/// A misbehaviour to inject.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Serve,
    Crash,
    Garbage,
    Mute,
    Hoard,
}

/// Reads `n` bytes of body messages.
fn body(c: &mut Chan, n: usize) -> Result<Vec<u8>, ChannelError> {
    let mut out = alloc::vec![0u8; n];
    for chunk in out.chunks_mut(56) {
        match c.recv_until(BODY_POLLS, pci::deadline_ms(BODY_MS))? {
            Some(m) => kv::unpack(&m, chunk),
            None => return Err(ChannelError::Full),
        }
    }
    Ok(out)
}

/// Sends a reply header and `value` (if any) in body messages.
fn send(c: &mut Chan, r: &Reply, value: &[u8]) -> Result<(), ChannelError> {
    c.send_until(&r.to_words(), pci::deadline_ms(BODY_MS))?;
    let mut res = Ok(());
    kv::pack(value, |m| {
        if res.is_ok() {
            res = c.send_until(m, pci::deadline_ms(BODY_MS));
        }
    });
    res
}

/// Maps the granted buffer `cap`, runs `f` on its first `len` bytes, unmaps it.
fn with_buffer(cap: u64, len: usize, write: bool, f: impl FnOnce(&mut [u8])) -> bool {
    if len > kv::MAX_VALUE {
        return false;
    }
    let rights = if write { 3 } else { 1 };
    if caps::map(cap, BUFFER_AT, rights).is_err() {
        return false;
    }
    // The buffer is mapped at BUFFER_AT with at least `len` bytes (MAX_VALUE, checked by
    // the map: the front grants whole buffers), read-only unless `write`; `f` reads it
    // only then.
    // SAFETY: see above; nothing else aliases the window while it is mapped.
    let buf = unsafe { core::slice::from_raw_parts_mut(BUFFER_AT as *mut u8, len) };
    f(buf);
    caps::unmap(cap).is_ok()
}

/// Parses a decimal number as memcached does for `incr` (digits only, fits in 64 bits).
fn number(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in v {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add((b - b'0') as u64)?;
    }
    Some(n)
}

/// Serves one request; returns the reply and its inline value.
fn serve(s: &mut Shard, q: &Request, key: Vec<u8>, inline: Vec<u8>) -> (Reply, Vec<u8>) {
    s.served += 1;
    let failed = |s: &Shard| (s.reply(status::FAILED, q.seq), Vec::new());
    match q.op {
        op::SET => {
            let value = match q.via {
                via::CAP => {
                    let mut v = alloc::vec![0u8; q.value_len as usize];
                    if !with_buffer(q.cap, v.len(), false, |b| v.copy_from_slice(b)) {
                        return failed(s);
                    }
                    v
                }
                _ => inline,
            };
            s.insert(key, Item { flags: q.flags, value });
            (s.reply(status::OK, q.seq), Vec::new())
        }
        op::GET | op::FETCH => {
            let Some(item) = s.map.get(&key) else {
                return (s.reply(status::NOT_FOUND, q.seq), Vec::new());
            };
            let (len, flags) = (item.value.len(), item.flags);
            let mut r = s.reply(status::VALUE, q.seq);
            r.value_len = len as u32;
            r.flags = flags;
            if q.op == op::FETCH {
                let v = &s.map[&key].value;
                if !with_buffer(q.cap, len, true, |b| b.copy_from_slice(v)) {
                    return failed(s);
                }
                r.via = via::CAP;
                (r, Vec::new())
            } else if len <= kv::INLINE_MAX || q.via == via::COPY {
                r.via = if len <= kv::INLINE_MAX { via::INLINE } else { via::COPY };
                (r, s.map[&key].value.clone())
            } else {
                r.status = status::BIG;
                (r, Vec::new())
            }
        }
        op::DELETE => match s.map.remove(&key) {
            Some(old) => {
                s.bytes -= old.value.len() as u64;
                (s.reply(status::OK, q.seq), Vec::new())
            }
            None => (s.reply(status::NOT_FOUND, q.seq), Vec::new()),
        },
        op::INCR | op::DECR => {
            let Some(item) = s.map.get_mut(&key) else {
                return (s.reply(status::NOT_FOUND, q.seq), Vec::new());
            };
            let Some(n) = number(&item.value) else {
                return (s.reply(status::NOT_NUMBER, q.seq), Vec::new());
            };
            let n = if q.op == op::INCR { n.wrapping_add(q.arg) } else { n.saturating_sub(q.arg) };
            let text = alloc::format!("{n}").into_bytes();
            let delta = text.len() as i64 - item.value.len() as i64;
            item.value = text;
            s.bytes = (s.bytes as i64 + delta) as u64;
            let mut r = s.reply(status::OK, q.seq);
            r.number = n;
            (r, Vec::new())
        }
        op::COUNT => (s.reply(status::OK, q.seq), Vec::new()),
        _ => failed(s),
    }
}

/// Stops this guest: reads past its partition.
fn crash(bi: &BootInfo) -> ! {
    let target = bi.memory_bytes + (2 << 20);
    log::info!("kvworker: crashing as told (reading {target:#x}, outside the partition)");
    // Deliberately out of bounds: the hypervisor stops this guest at the read.
    // SAFETY: our page tables map the address (EPT does not), so the read itself is valid.
    let v = unsafe { core::ptr::read_volatile(target as *const u64) };
    log::error!("kvworker: the read returned {v:#x}");
    guestkernel::hypercall::exit(1)
}

/// Holds the granted buffer `cap` mapped and reads it every few milliseconds, never
/// answering: the front's revoke unmaps it and the next read stops this guest. Returns if
/// the map fails or the front is gone.
fn hoard(c: &mut Chan, cap: u64) {
    if caps::map(cap, BUFFER_AT, 1).is_err() {
        log::info!("kvworker: hoard: could not map slot {cap}");
        return;
    }
    log::info!("kvworker: hoarding the buffer in slot {cap}: never answering, never unmapping");
    loop {
        // Mapped just above; after the front's revoke this read is stopped by the
        // hypervisor (the point of the exercise).
        // SAFETY: mapped read-only at BUFFER_AT (until the front revokes it).
        let _ = unsafe { core::ptr::read_volatile(BUFFER_AT as *const u64) };
        if c.link() == Err(ChannelError::PeerGone) {
            return;
        }
        let _ = guestkernel::timer::sleep_ms(2);
    }
}

pub fn kvworker(bi: &BootInfo) -> u64 {
    let name = match bi.arg("channel") {
        Some(n) => Some(n),
        None => bi.channels().first().and_then(|d| vmcall_proto::fixed::get(&d.name)),
    };
    let Some(mut c) = channel::open(bi, name) else {
        log::error!("kvworker: no channel");
        return NO_CHANNEL;
    };
    c.set_doorbells(true);
    // Every transfer consumes one acceptance: take (practically) any number.
    caps::accept_all(u32::MAX as u64);
    let first = bi.incarnation == 1;
    let mode = match bi.arg_word("mode") {
        "crash" => Mode::Crash,
        "garbage" => Mode::Garbage,
        "mute" => Mode::Mute,
        "hoard" => Mode::Hoard,
        _ => Mode::Serve,
    };
    let mode = if first { mode } else { Mode::Serve };
    let after = bi.arg_int("after");
    let polls = bi.arg_int("polls") as u32;
    log::info!(
        "kvworker: up: incarnation {}, channel {}, epoch {}, mode {}{}",
        bi.incarnation,
        name.unwrap_or("?"),
        c.epoch,
        bi.arg_word("mode"),
        if first { "" } else { " (first incarnation only: serving)" }
    );
    let mut s = Shard { map: BTreeMap::new(), bytes: 0, served: 0 };
    let (mut work, mut garbage) = (0u64, 0u64);
    let end = loop {
        let m = match c.wait(polls) {
            Ok(m) => m,
            Err(ChannelError::Reset) => {
                // The front came back: start over with it (the store stays: the front
                // was restarted, not us).
                let _ = c.resync();
                continue;
            }
            Err(e) => break e,
        };
        let t0 = rdtsc();
        let q = Request::from_words(&m);
        let inline = if q.via == via::CAP { 0 } else { q.value_len as usize };
        let (key_len, total) = (q.key_len as usize, q.key_len as usize + inline);
        let bytes = match body(&mut c, total) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("kvworker: request {}: its body did not come: {e:?}", q.seq);
                continue;
            }
        };
        let misbehave = mode != Mode::Serve && s.served >= after;
        if misbehave {
            match mode {
                Mode::Crash => crash(bi),
                Mode::Garbage => {
                    garbage += 1;
                    let w = (q.seq as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    let _ = c.send_until(&[w, !w, w >> 3, 0, 7, 7, 7], pci::deadline_ms(BODY_MS));
                    continue;
                }
                Mode::Mute => continue,
                Mode::Hoard if q.via == via::CAP => {
                    hoard(&mut c, q.cap);
                    break ChannelError::PeerGone;
                }
                _ => {}
            }
        }
        let (mut key, value) = (bytes, Vec::new());
        let value = if inline > 0 { key.split_off(key_len) } else { value };
        let (r, v) =
            if key_len == 0 || key_len > kv::MAX_KEY || q.value_len as usize > kv::MAX_VALUE {
                s.served += 1;
                (s.reply(status::FAILED, q.seq), Vec::new())
            } else {
                serve(&mut s, &q, key, value)
            };
        if let Err(e) = send(&mut c, &r, &v) {
            log::warn!("kvworker: request {}: the reply did not go: {e:?}", q.seq);
        }
        work += rdtsc() - t0;
    };
    log::info!(
        "bench kvworker: {} requests, {} work instructions per request; {} items, {} bytes; {} \
         garbage replies; {} doorbells rung",
        s.served,
        work.checked_div(s.served).unwrap_or(0),
        s.map.len(),
        s.bytes,
        garbage,
        c.rung
    );
    log::info!("kvworker: done: the front is gone ({end:?}); exit 0");
    0
}
