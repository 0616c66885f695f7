// SPDX-License-Identifier: MIT OR Apache-2.0
//! The sharded key-value service (`kvfront`/`kvworker` workloads) as seen from outside and
//! between its guests: which worker owns a key, the ports, the error lines a client can get
//! beyond the memcached text protocol's own, and the protocol between the front and its
//! workers. Shared by the guests (front and workers) and the host's load generator, whose
//! model of the store must agree with the front on key placement. Depends on nothing.
//!
//! # The service
//!
//! The front (`kvfront`) owns the NIC, terminates TCP on [`GUEST_PORT`] and speaks
//! memcached's text protocol: `set` (flags stored, exptime accepted and ignored: nothing
//! expires; `noreply`), `get k1 k2 ...`, `delete`, `incr`/`decr`, `version`, `stats`,
//! `quit`, and `shutdown` (the front answers `OK`, finishes its connections' output and
//! exits 0; its workers then exit 0). Errors: `ERROR` for an unknown command,
//! `CLIENT_ERROR bad command line format` for a malformed one (a key over [`MAX_KEY`]
//! bytes included), `CLIENT_ERROR bad data chunk` for a data block not ended by `\r\n`,
//! [`TOO_LARGE`] for a value over [`MAX_VALUE`] (its data block is skipped).
//! Key `k` lives on worker [`shard_of`]`(k, workers)`; worker `i` is the peer of the
//! front's `i`-th channel (boot-info order).
//!
//! # Failure semantics
//!
//! While worker `N` is down (dead, restarting, or fenced by the front after a timeout or a
//! garbage reply), every request for a key of shard `N` is answered at once with
//! `SERVER_ERROR shard N unavailable\r\n` ([`unavailable_line`]); a multi-key `get` with
//! any key on a down shard gets that line (for the first such shard) for the whole
//! request, and nothing else. The connection stays open. The front waits at most
//! [`DEADLINE_MS`] (its `timeout_ms`) for each step of a worker (its answer, each of its
//! body messages, room in the ring for the front's next one); then, or on a
//! reply that is not one (wrong magic, sequence, status, length), the shard is fenced:
//! the request gets the error line, a granted buffer is revoked, and the shard stays down
//! until the worker's channel shows a new epoch: the worker was restarted by its policy,
//! or by the front itself when the config gives it a guest-control capability over every
//! worker (`[[control]] guest = "front"`: it restarts a fenced worker right after the
//! command that fenced it). A
//! restarted worker's shard is empty: a client must treat every key of a shard it got
//! the error line for as unknown until its next `set`.
//!
//! # Front to worker protocol
//!
//! One request at a time per shard, over the channel's rings (56-byte messages): a
//! [`Request`] header message, then body messages (the key, then an inline value); the
//! worker answers with a [`Reply`] header, then body messages for an inline value. Each
//! header is seven little-endian words ([`Request::to_words`]); bytes are packed 56 to a
//! message ([`pack`], [`unpack`]). The worker checks nothing it does not need (a
//! request it cannot parse gets [`status::FAILED`]); the front checks everything: the
//! magic, its sequence number, a status the operation allows, a length within its
//! buffer.
//!
//! Values: up to [`INLINE_MAX`] bytes inline, in body messages. Larger ones, with the
//! front's `large = "cap"` (the default), by capability: the front's grant (config
//! `[[grant]]`, at least `workers * MAX_VALUE`) is split at start into one
//! [`MAX_VALUE`]-byte buffer per shard, each mapped read-write in the front's grant window.
//! A large `set`: the front writes the value into the shard's buffer, copies the buffer's
//! capability to the worker read-only (`cap_transfer` copy), sends `SET` with `via = CAP`
//! and the worker's slot; the worker maps it read-only, copies the value into its store,
//! unmaps it and answers `OK`. A large `get`: the worker answers `BIG` with the length;
//! the front copies the buffer to the worker read-write and sends `FETCH` with its slot;
//! the worker maps it, writes the value, unmaps it and answers `VALUE` with `via = CAP`.
//! Either way the front then revokes the copy (`cap_revoke`: gone from the worker, mapped
//! or not, before the call returns) and only then reads the buffer or reuses it; on a
//! timeout or a bad reply it revokes just the same. No large value is copied through the
//! ring. With `large = "copy"` a large value travels in body messages like a small one
//! (`via = COPY`; 1,171 messages for 64 KiB), for comparison.

/// The guest TCP port the front listens on (memcached's own).
pub const GUEST_PORT: u16 = 11211;
/// The host port the shipped configs forward to [`GUEST_PORT`].
pub const HOST_PORT: u16 = 21211;
/// Longest key the memcached text protocol allows.
pub const MAX_KEY: usize = 250;

/// FNV-1a, 32-bit, of `key`.
pub const fn fnv1a32(key: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < key.len() {
        h ^= key[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    h
}

/// The shard (worker index, `0..workers`) that holds `key`; `workers` must be at least 1.
pub const fn shard_of(key: &[u8], workers: u32) -> u32 {
    fnv1a32(key) % workers
}

/// The largest value the service stores (bytes): the size of each shard's capability
/// buffer, and what a `set` may carry. A `set` of more gets
/// [`TOO_LARGE`] and its data block is skipped.
pub const MAX_VALUE: usize = 64 * 1024;
/// Values up to this many bytes travel inline in the ring (in body messages after the
/// header, with the key); larger ones by capability (or, with the front's `large =
/// "copy"`, through the ring as well).
pub const INLINE_MAX: usize = 1024;
/// Pages of each shard's capability buffer ([`MAX_VALUE`] bytes).
pub const BUFFER_PAGES: u64 = (MAX_VALUE as u64).div_ceil(4096);
/// How long the front waits for each step of a worker (its answer, room in the ring for
/// the front's next message, its next body message) before it declares the shard down
/// (machine milliseconds; the front's `timeout_ms` argument, this default).
pub const DEADLINE_MS: u64 = 200;
/// The front's answer to the `version` command.
pub const VERSION: &str = "VERSION mkvisor-kv 1\r\n";
/// A `set` whose value is larger than [`MAX_VALUE`] (memcached's own line).
pub const TOO_LARGE: &str = "SERVER_ERROR object too large for cache\r\n";

/// The error line for every request touching shard `shard` while its worker is down,
/// timed out or misbehaved: `SERVER_ERROR shard N unavailable\r\n`.
pub fn unavailable_line(shard: u32, out: &mut [u8; 48]) -> usize {
    let mut n = 0;
    for b in b"SERVER_ERROR shard " {
        out[n] = *b;
        n += 1;
    }
    let mut digits = [0u8; 10];
    let (mut v, mut d) = (shard, 0);
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        out[n] = digits[d];
        n += 1;
    }
    for b in b" unavailable\r\n" {
        out[n] = *b;
        n += 1;
    }
    n
}

/// Operations (front to worker, [`Request::op`]).
pub mod op {
    /// Store the value under the key (memcached `set`).
    pub const SET: u8 = 1;
    /// The value of the key ([`super::status::VALUE`], [`super::status::BIG`] or
    /// [`super::status::NOT_FOUND`]).
    pub const GET: u8 = 2;
    /// Remove the key.
    pub const DELETE: u8 = 3;
    /// Add [`super::Request::arg`] to the key's decimal value (wrapping at 2^64).
    pub const INCR: u8 = 4;
    /// Subtract [`super::Request::arg`], stopping at 0.
    pub const DECR: u8 = 5;
    /// Write the key's value into the buffer granted with the request (after a `BIG`).
    pub const FETCH: u8 = 6;
    /// Nothing: the shard's counts only (`stats`).
    pub const COUNT: u8 = 7;
}

/// How a request's or a reply's value travels ([`Request::via`], [`Reply::via`]).
pub mod via {
    /// No value, or in body messages after the header (up to [`super::INLINE_MAX`]).
    pub const INLINE: u8 = 0;
    /// In the buffer the front granted with the request; [`super::Request::cap`] is its
    /// slot in the worker's capability space.
    pub const CAP: u8 = 1;
    /// In body messages, whatever its size (the front's `large = "copy"`): a `GET` with it
    /// is answered with the value in the ring, never `BIG`.
    pub const COPY: u8 = 2;
}

/// Reply statuses ([`Reply::status`]).
pub mod status {
    /// Done (`set`, `delete`; `incr`/`decr` with the result in [`super::Reply::number`]).
    pub const OK: u8 = 1;
    /// The key has no value.
    pub const NOT_FOUND: u8 = 2;
    /// A hit: the value follows in body messages ([`super::via::INLINE`] or `COPY`), or it
    /// is in the granted buffer (`FETCH`, [`super::via::CAP`]).
    pub const VALUE: u8 = 3;
    /// A hit too large to inline: [`super::Reply::value_len`] bytes; the front asks again
    /// with `FETCH` and a buffer.
    pub const BIG: u8 = 4;
    /// `incr`/`decr` of a value that is not a decimal number.
    pub const NOT_NUMBER: u8 = 5;
    /// The worker could not take the request (a buffer it could not map, a malformed
    /// request, no memory): the front answers `SERVER_ERROR` and marks nothing down.
    pub const FAILED: u8 = 6;
}

/// The first message of a request, front to worker: one ring message (56 bytes). Then
/// `ceil((key_len + inline value bytes) / 56)` body messages: the key's bytes followed by
/// the value's when [`Request::via`] is `INLINE` or `COPY`, packed 56 to a message.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// [`op`].
    pub op: u8,
    /// [`via`]: how the value travels (`SET`), or how the front takes one (`GET`).
    pub via: u8,
    /// Key bytes, 1..=[`MAX_KEY`].
    pub key_len: u16,
    /// The front's request number; the reply carries it back.
    pub seq: u32,
    /// Value bytes (`SET`), at most [`MAX_VALUE`].
    pub value_len: u32,
    /// memcached's client flags (`SET`), stored and returned.
    pub flags: u32,
    /// `INCR`/`DECR`: the delta.
    pub arg: u64,
    /// `via = CAP`: the granted buffer's slot in the worker's capability space.
    pub cap: u64,
    pub _reserved: [u64; 3],
}
const _: () = assert!(core::mem::size_of::<Request>() == 56);

/// The first message of a reply, worker to front: one ring message (56 bytes), then the
/// value's bytes in body messages (status `VALUE` with `via` `INLINE` or `COPY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// [`status`].
    pub status: u8,
    /// [`via`]: where the value is (`VALUE`).
    pub via: u8,
    pub _pad: u16,
    /// The request's [`Request::seq`].
    pub seq: u32,
    /// The value's bytes (`VALUE`, `BIG`).
    pub value_len: u32,
    /// Its client flags.
    pub flags: u32,
    /// `INCR`/`DECR`: the new value.
    pub number: u64,
    /// Keys the shard holds now.
    pub items: u64,
    /// Value bytes the shard holds now.
    pub bytes: u64,
    /// Requests this worker incarnation served (this one included).
    pub served: u64,
    /// [`REPLY_MAGIC`]: anything else is garbage.
    pub magic: u64,
}
const _: () = assert!(core::mem::size_of::<Reply>() == 56);

/// What every [`Reply::magic`] says (`"kvreply1"`): a reply without it is garbage.
pub const REPLY_MAGIC: u64 = u64::from_le_bytes(*b"kvreply1");

/// Body messages needed for `n` bytes.
pub const fn body_messages(n: usize) -> usize {
    n.div_ceil(56)
}

/// A header as the 7 words of a ring message (and back: [`Request::from_words`]).
impl Request {
    pub fn to_words(&self) -> [u64; 7] {
        [
            self.op as u64
                | (self.via as u64) << 8
                | (self.key_len as u64) << 16
                | (self.seq as u64) << 32,
            self.value_len as u64 | (self.flags as u64) << 32,
            self.arg,
            self.cap,
            self._reserved[0],
            self._reserved[1],
            self._reserved[2],
        ]
    }
    pub fn from_words(w: &[u64; 7]) -> Request {
        Request {
            op: w[0] as u8,
            via: (w[0] >> 8) as u8,
            key_len: (w[0] >> 16) as u16,
            seq: (w[0] >> 32) as u32,
            value_len: w[1] as u32,
            flags: (w[1] >> 32) as u32,
            arg: w[2],
            cap: w[3],
            _reserved: [w[4], w[5], w[6]],
        }
    }
}

impl Reply {
    pub fn to_words(&self) -> [u64; 7] {
        [
            self.status as u64
                | (self.via as u64) << 8
                | (self._pad as u64) << 16
                | (self.seq as u64) << 32,
            self.value_len as u64 | (self.flags as u64) << 32,
            self.number,
            self.items,
            self.bytes,
            self.served,
            self.magic,
        ]
    }
    pub fn from_words(w: &[u64; 7]) -> Reply {
        Reply {
            status: w[0] as u8,
            via: (w[0] >> 8) as u8,
            _pad: (w[0] >> 16) as u16,
            seq: (w[0] >> 32) as u32,
            value_len: w[1] as u32,
            flags: (w[1] >> 32) as u32,
            number: w[2],
            items: w[3],
            bytes: w[4],
            served: w[5],
            magic: w[6],
        }
    }
}

/// Packs `bytes` into ring messages, 56 bytes each (little-endian words, the last one
/// zero-padded).
pub fn pack(bytes: &[u8], mut emit: impl FnMut(&[u64; 7])) {
    for chunk in bytes.chunks(56) {
        let mut m = [0u64; 7];
        for (i, b) in chunk.iter().enumerate() {
            m[i / 8] |= (*b as u64) << (8 * (i % 8));
        }
        emit(&m);
    }
}

/// Unpacks one body message into `out` (at most 56 bytes: `out.len()`).
pub fn unpack(m: &[u64; 7], out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate().take(56) {
        *b = (m[i / 8] >> (8 * (i % 8))) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_published_vectors() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn every_key_has_a_shard_in_range() {
        for n in 1..=8 {
            for k in 0..100u32 {
                assert!(shard_of(&k.to_le_bytes(), n) < n);
            }
        }
    }

    #[test]
    fn headers_survive_the_ring_words() {
        let q = Request {
            op: op::SET,
            via: via::CAP,
            key_len: 250,
            seq: 0xdead_beef,
            value_len: MAX_VALUE as u32,
            flags: u32::MAX,
            arg: 7,
            cap: 12,
            _reserved: [1, 2, 3],
        };
        assert_eq!(Request::from_words(&q.to_words()), q);
        let r = Reply {
            status: status::BIG,
            via: via::COPY,
            _pad: 9,
            seq: 3,
            value_len: 4000,
            flags: 1 << 31,
            number: u64::MAX,
            items: 5,
            bytes: 6,
            served: 7,
            magic: REPLY_MAGIC,
        };
        assert_eq!(Reply::from_words(&r.to_words()), r);
    }

    #[test]
    fn bytes_pack_into_messages_and_back() {
        for n in [0usize, 1, 55, 56, 57, 1000, INLINE_MAX] {
            let v: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
            let mut msgs = Vec::new();
            pack(&v, |m| msgs.push(*m));
            assert_eq!(msgs.len(), body_messages(n));
            let mut back = vec![0u8; n];
            for (m, chunk) in msgs.iter().zip(back.chunks_mut(56)) {
                unpack(m, chunk);
            }
            assert_eq!(back, v);
        }
    }

    #[test]
    fn the_unavailable_line_is_exact() {
        let mut b = [0u8; 48];
        for (s, want) in [
            (0, "SERVER_ERROR shard 0 unavailable\r\n"),
            (7, "SERVER_ERROR shard 7 unavailable\r\n"),
            (4_000_000_000, "SERVER_ERROR shard 4000000000 unavailable\r\n"),
        ] {
            let n = unavailable_line(s, &mut b);
            assert_eq!(core::str::from_utf8(&b[..n]).unwrap(), want);
        }
    }
}
