// SPDX-License-Identifier: MIT OR Apache-2.0
//! The sharded key-value service (`kvfront`/`kvworker` workloads) as seen from outside:
//! which worker owns a key, the ports, and the error lines a client can get beyond the
//! memcached text protocol's own. Shared by the guests (front and workers) and the host's
//! load generator, whose model of the store must agree with the front on key placement.
//! Depends on nothing.

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
}
