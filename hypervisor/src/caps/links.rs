// SPDX-License-Identifier: MIT OR Apache-2.0
//! Channel links between incarnations: what each core knows of the peers of its guest's
//! channels, kept consistent by messages (replicated state, not a shared table).
//!
//! * `LINK_DOWN(mask, inc)`: the sender's guest (incarnation `inc`) died; `mask` names the
//!   channels (config indices, 256 bits) it was an end of. The receiving core marks them
//!   down and answers with
//! * `LINK_ACK(mask, inc, alive)`: its own incarnation and whether its guest is alive, and
//!   (in the header) the incarnation whose death it answers; sent
//!   once the guest's status page says `down` (written on the spot: the guest does not run
//!   while its core handles messages), so from then on that guest leaves the rings alone.
//! * `LINK_UP(mask, inc)`: incarnation `inc` of the sender's guest runs on the channels,
//!   whose rings the sender's core reset (zeroed, in-flight messages counted lost) after the
//!   acks and before this message: the peer's guest starts over in the next epoch.
//!
//! So a channel's rings are reset only by the core of a guest about to start again, while
//! neither end uses them; a guest that is gone for good leaves its rings as they were (their
//! counters are reported at the end).
//!
//! A core acts only on channels whose peer is the sender, also when the capability protocol
//! fenced that core (links ask for no wait). A death whose acks do not come in time is given
//! up on: that peer counts as down, its core is *muted* (sent nothing more, so its ring
//! never fills) until the late ack comes; then it is sent the current incarnation's
//! `LINK_UP`, and both ends meet in the next epoch. One of each message per core
//! pair is in flight at a time at most (a death waits for its acks, bounded, before the
//! next incarnation sends `LINK_UP`), which `proto::RING_SLOTS` counts.
//!
//! Owns the link fields of the guest's channels; calls only the [`Wire`] it is handed.

use super::op;
use super::wire::Wire;
use vmcall_proto::channel::Payload;

/// What a core knows of one channel's peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Link {
    /// The peer's guest runs (as its core last said).
    pub peer_up: bool,
    /// The peer's incarnation (1 for its first start).
    pub peer_inc: u32,
    /// Changed since the run loop last looked.
    pub changed: bool,
    /// The peer's core acknowledged this core's last `LINK_DOWN`.
    pub acked: bool,
    /// A `LINK_DOWN` to the peer's core was given up on: nothing more is sent there until
    /// its (late) ack comes, so a slow core's ring holds at most that one, and an `UP`.
    pub muted: bool,
}

impl Link {
    /// The epoch of the channel's rings: how many restarts its two ends have had.
    pub fn epoch(&self, my_inc: u32) -> u32 {
        my_inc.saturating_sub(1).saturating_add(self.peer_inc.saturating_sub(1))
    }
}

/// Whether `m` is a link message.
pub fn is_link(m: &Payload) -> bool {
    matches!(m[0] & 0xff, op::LINK_DOWN | op::LINK_ACK | op::LINK_UP)
}

/// A message of kind `kind` about the channels in `indices`.
pub fn message(kind: u64, indices: impl Iterator<Item = u32>, inc: u32, alive: bool) -> Payload {
    let mut m = [kind, 0, 0, 0, 0, inc as u64, alive as u64];
    for i in indices.filter(|i| *i < 256) {
        m[1 + (i / 64) as usize] |= 1 << (i % 64);
    }
    m
}

/// Whether channel `index` is in the message's mask.
pub fn names(m: &Payload, index: u32) -> bool {
    index < 256 && m[1 + (index / 64) as usize] & (1 << (index % 64)) != 0
}

/// Sends `m` to core `to` and kicks it; `false` if its ring is full.
pub fn send(env: &mut impl Wire, to: usize, m: &Payload) -> bool {
    let ok = env.send(to, m);
    if ok {
        env.kick(to);
    }
    ok
}
