// SPDX-License-Identifier: MIT OR Apache-2.0
//! The multicast revoke's data (see `proto`, "Multicast"): the request a revoking core
//! writes once into its own slot for every holder's core to read, and the one-word answer
//! each holder's core writes into its own reply line of that slot. Layout and encoding
//! only: the slots are the transport's (`instance::xcore` on the hardware), what is done
//! with them the protocol's.
//!
//! May call: `vmcall_proto` (the capability limits), nothing of this crate.

use vmcall_proto::caps::MAX_CHILDREN;

/// Copies one request names at most: every child of one node.
pub const MAX: usize = MAX_CHILDREN;

/// One revoke, to every core holding a copy: the copies' ids and their cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Request {
    /// Even and nonzero, 2 more for each request of its core (a reader that finds it odd
    /// or changed while it read has a torn copy: the slot is a seqlock, one writer).
    pub seq: u64,
    /// The node whose copies go (for the logs; the ids say what).
    pub node: u64,
    pub n: u8,
    pub ids: [u64; MAX],
    pub cores: [u16; MAX],
}

impl Request {
    /// The cores this request names, one bit each (the transports compute it as they
    /// write the slot; the model and the host tests' transport use this).
    #[cfg(test)]
    pub fn targets(&self) -> u64 {
        self.cores[..self.len()].iter().fold(0, |m, &c| m | 1u64 << (c % 64))
    }

    /// The copies named: `n`, at most [`MAX`] (a request is never built with more; a
    /// larger `n` is read as `MAX`, as `instance::xcore::mc_publish` writes it, never
    /// past the arrays).
    fn len(&self) -> usize {
        (self.n as usize).min(MAX)
    }

    /// This request as core `core` reads it: only its copies (what [`super::Env::mc_read`]
    /// returns; the model and the host tests use it).
    #[cfg(test)]
    pub fn only(&self, core: usize) -> Request {
        let mut r = Request { seq: self.seq, node: self.node, ..Default::default() };
        for id in self.on(core) {
            r.ids[r.n as usize] = id;
            r.cores[r.n as usize] = core as u16;
            r.n += 1;
        }
        r
    }

    /// The ids of the copies on core `core`.
    pub fn on(&self, core: usize) -> impl Iterator<Item = u64> + '_ {
        (0..self.len()).filter(move |&j| self.cores[j] as usize == core).map(|j| self.ids[j])
    }
}

/// A holder core's answer to request `seq`: nodes it revoked, whether it could not confirm
/// something (it lost track earlier), and whether it declined (a copy there has copies of
/// its own, or a revoke of it is under way: the revoker then asks for each of that core's
/// copies by a `REVOKE` on the ring, which can wait for the rest).
pub fn answer(seq: u64, total: u64, incomplete: bool, declined: bool) -> u64 {
    (seq & 0xffff_ffff) << 32
        | total.min(0x3fff_ffff)
        | (incomplete as u64) << 30
        | (declined as u64) << 31
}

/// The nodes revoked, if `w` answers request `seq` in full (neither declined nor
/// incomplete): what the revoker's one-pass gather takes; `None` sends it to [`decode`].
#[inline]
pub fn full(w: u64, seq: u64) -> Option<u64> {
    (w >> 30 == (seq & 0xffff_ffff) << 2).then_some(w & 0x3fff_ffff)
}

/// An answer word, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The low 32 bits of the request's sequence number.
    pub seq: u32,
    pub total: u64,
    pub incomplete: bool,
    pub declined: bool,
}

pub fn decode(w: u64) -> Answer {
    Answer {
        seq: (w >> 32) as u32,
        total: w & 0x3fff_ffff,
        incomplete: w >> 30 & 1 == 1,
        declined: w >> 31 & 1 == 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_name_their_request() {
        let a = decode(answer(0x1_0000_0004, 3, true, false));
        assert_eq!(a, Answer { seq: 4, total: 3, incomplete: true, declined: false });
        let d = decode(answer(6, 0, false, true));
        assert!(d.declined && !d.incomplete && d.seq == 6 && d.total == 0);
    }

    #[test]
    fn only_a_full_answer_to_the_same_request_is_taken_in_one_pass() {
        assert_eq!(full(answer(6, 3, false, false), 6), Some(3));
        assert_eq!(full(answer(0x1_0000_0006, 3, false, false), 6), Some(3), "low 32 bits");
        assert_eq!(full(answer(8, 3, false, false), 6), None, "another request");
        assert_eq!(full(answer(6, 3, true, false), 6), None, "incomplete");
        assert_eq!(full(answer(6, 0, false, true), 6), None, "declined");
    }

    #[test]
    fn a_count_past_the_arrays_reads_as_full_never_out_of_bounds() {
        let mut r = Request { seq: 2, node: 9, n: u8::MAX, ..Default::default() };
        r.cores = [3; MAX];
        r.cores[MAX - 1] = 5;
        assert_eq!(r.targets(), 1 << 3 | 1 << 5);
        assert_eq!(r.on(3).count(), MAX - 1);
        assert_eq!(r.on(5).count(), 1);
    }

    #[test]
    fn a_request_names_its_cores_and_their_copies() {
        let mut r = Request { seq: 2, node: 9, n: 3, ..Default::default() };
        r.ids[..3].copy_from_slice(&[10, 11, 12]);
        r.cores[..3].copy_from_slice(&[1, 4, 1]);
        assert_eq!(r.targets(), 0b10010);
        assert_eq!(r.on(1).collect::<Vec<_>>(), [10, 12]);
        assert_eq!(r.on(2).count(), 0);
    }
}
