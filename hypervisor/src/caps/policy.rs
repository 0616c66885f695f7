// SPDX-License-Identifier: MIT OR Apache-2.0
//! What the capability protocol on a core is told ([`Policy`], [`Revoke`]: the command
//! line's tunables) and what it counts ([`Stats`], reported with its guest). Plain data,
//! shared by `caps` and `proto` (re-exported as `caps::{Policy, Revoke, Stats}`).
//!
//! May call: `members` (the number of cores addressed), `mcount` (the detector's counters),
//! nothing else.

use crate::members::MAX_PEERS;

/// Tunables, from the hypervisor command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Policy {
    /// Per-level protocol deadline, in TSC ticks: a core that does not answer within it
    /// (scaled by the levels below, see [`super::proto`]) is declared failed and fenced.
    pub deadline: u64,
    /// Least TSC ticks between two transfers from this core to the same core: bounds the
    /// request rate any one guest can aim at another.
    pub transfer_gap: u64,
    /// How this core's own revokes reach the holders of its copies (see [`super::proto`]).
    pub revoke: Revoke,
}

/// How a revoke reaches the cores holding the copies (the machine's `revoke` setting).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Revoke {
    /// The request written once into the revoker's multicast slot, every holder's core
    /// rung and kicked, each answering in its own reply line of that slot (see [`super::proto`],
    /// "Multicast").
    #[default]
    Multicast,
    /// One `REVOKE` from the revoker to every holder's core, every answer back to it.
    Broadcast,
    /// The revoker asks `fanout` holders' cores, each forwards to its share of the others
    /// and answers for its whole subtree (see [`super::proto`], "Trees").
    Tree { fanout: u8 },
}

impl Policy {
    /// 50 ms per level and at most 100 transfers per millisecond per peer; multicast.
    pub fn from_tsc_per_ms(tsc_per_ms: u64) -> Self {
        Policy {
            deadline: tsc_per_ms.saturating_mul(50),
            transfer_gap: tsc_per_ms / 100,
            revoke: Revoke::Multicast,
        }
    }
}

/// Counters of this core's capability work, reported with its guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stats {
    pub transfers: u32,
    /// Caps revoked in this space on other cores' behalf.
    pub revoked_here: u64,
    /// Requests received from each core (INSERT and REVOKE).
    pub requests_from: [u32; MAX_PEERS],
    /// INSERTs refused (no accept quota, no room, guest ended).
    pub refused: u32,
    /// Cores this one declared failed.
    pub fenced: u64,
    /// A revoke could not unmap a piece from this guest's EPT: the guest may still reach
    /// memory it no longer holds, so its core stops it.
    pub unmap_failed: bool,
    /// TSC ticks this core worked on its guest's own `cap_revoke`s: checks, requests and
    /// kicks sent, replies handled; not the polls that found the inbox empty (waiting).
    pub revoke_tsc: u64,
    /// The revoke protocol's own traffic through this core (see [`RevokeCounts`]).
    pub revoke: RevokeCounts,
    /// The membership failure detector's traffic through this core, and view-change
    /// messages no record had room for (see `caps::mcount`).
    pub probes: super::mcount::ProbeCounts,
}

/// What this core did for revokes, its own and other cores' (counted by `proto`, and by
/// the run loop for `exits`): only the revoke protocol's messages (`REVOKE`,
/// `REVOKE_REPLY`, multicast requests and answers), never inserts, guest control, links or
/// membership, so a run whose only revoke is one operation reads that operation's exact
/// cost on every core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevokeCounts {
    /// Ring messages sent (`REVOKE` and `REVOKE_REPLY`; each is followed by a kick).
    pub sent: u32,
    /// Ring messages received and handled (`REVOKE` and `REVOKE_REPLY`).
    pub received: u32,
    /// Cores named by this core's multicast requests (each rung, kicked at most once).
    pub mc_named: u32,
    /// Multicast requests of other cores this core served (an answer written in its line).
    pub mc_served: u32,
    /// Answers taken from the reply lines of this core's own multicast requests.
    pub mc_taken: u32,
    /// VM exits of this core's guest after which the run loop's serve did revoke work
    /// (a kick that brought a request or a reply): what the revoke cost the guest here.
    pub exits: u32,
    /// This core's own revokes that finished.
    pub own: u32,
    /// Rounds of this core's last own revoke: the longest chain of requests it caused,
    /// measured (each request carries its hop; each answer the longest below it): 1 when
    /// every holder was asked directly, a tree's depth, 1 more for a multicast's decline.
    pub rounds: u8,
}

impl RevokeCounts {
    /// Whether `self` shows revoke work done since `before`.
    pub fn worked_since(&self, before: &RevokeCounts) -> bool {
        self.received != before.received || self.mc_served != before.mc_served
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            transfers: 0,
            revoked_here: 0,
            requests_from: [0; MAX_PEERS],
            refused: 0,
            fenced: 0,
            unmap_failed: false,
            revoke_tsc: 0,
            revoke: RevokeCounts::default(),
            probes: super::mcount::ProbeCounts::default(),
        }
    }
}
