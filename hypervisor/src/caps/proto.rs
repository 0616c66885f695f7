// SPDX-License-Identifier: MIT OR Apache-2.0
//! The cross-core capability protocol: one instance per core, a state machine driven by
//! messages (no nested waits), model-checked in `caps::model` with the very same code.
//!
//! Messages (64-byte ring slots; word 0 = op | request << 32):
//! * `INSERT` [kind | rights << 8 | depth << 16 | copy << 24, base, size, channel, id]: put
//!   a cap into the receiver's guest space (a copy under the id its sender minted and has
//!   already recorded as a child; a move under a fresh id). Answered by `INSERT_REPLY`
//!   [handle or error].
//! * `REVOKE` [id, depth class | tree height << 8 | fan-out << 16 | hop << 24, members]:
//!   revoke node `id` in the receiver's space (every piece: unmapped and flushed), then the
//!   node's own children, and answer `REVOKE_REPLY` [nodes revoked, incomplete, members
//!   failed, members declined, rounds] only when all of them answered. The hop (1 for the
//!   revoker's own requests, one more per level below) and the rounds (the longest chain of
//!   requests below, answers included) only count: the revoke's `rounds` in
//!   `Stats::revoke`, measured; nothing decides by them.
//!
//! Invariants, and why the protocol cannot hang or overflow:
//! * **Records before copies.** A copy's child record exists before its `INSERT` leaves,
//!   and rings are FIFO per core pair, so a `REVOKE` that follows can only be served after
//!   the `INSERT` it chases: revoke misses no copy in flight.
//! * **Flow control, by class.** Requests travel in credit classes: `INSERT` in class 0, a
//!   `REVOKE` of a node of depth `d` in class `d`. A core has at most [`CREDITS`] requests
//!   of each class outstanding to any one core. An entry serving a class-`d` request only
//!   waits for class-`d + 1` requests, and nodes of depth `MAX_DEPTH` have no copies: the
//!   waits form no cycle, so two cores revoking chains of copies that alternate between them
//!   cannot hold each other's credits for ever (one shared class could: a colluding pair of
//!   guests made an honest revoke time out that way). A ring from `a` to `b` then holds at
//!   most `CREDITS x CLASSES` requests of `a` plus as many replies to `b`'s: with
//!   [`RING_SLOTS`] a send never finds the ring full, and a core serves at most `CREDITS x
//!   (MAX_DEPTH + TREE_HEIGHT)` revokes per peer at once (a class per depth and per tree
//!   height), which sizes the entry table ([`entries_for`]): there is no drop-on-full path.
//! * **No nested waits.** A request that needs further requests (a revoke with children)
//!   becomes an entry; replies complete entries; nothing blocks inside a handler, so two
//!   revokes racing in opposite directions, or a revoke meeting a transfer, both progress.
//! * **Deadlines.** Every entry has one. An entry revoking children of depth `c` waits at
//!   most `deadline x (MAX_DEPTH - c + 2)`: deeper entries expire first, so a silent core
//!   is blamed by the core waiting on it directly, not by its ancestors. When an entry
//!   expires, every core it still waits for is *fenced*: declared failed, its messages
//!   ignored from then on, no request sent to it again; the operations that waited on it
//!   finish as incomplete (`cap_revoke` returns `Timeout`), and the fence is reported.
//! * **Trees** (`Policy::revoke = Tree`). The revoker's own revoke may ask only `fanout`
//!   holders' cores (*heads*), each carrying its share of the other holders (*members*, at
//!   most 8, in the request's words 3-6); a head revokes its own copy, plans its members
//!   the same way (heads of its own, the rest asked directly), and answers only when its
//!   whole subtree answered: `REVOKE_REPLY` [nodes, own incomplete, members failed,
//!   members declined] (bit `p` = the request's member `p`). A member counts as gone only
//!   when its own core confirmed it, through the heads on the way. A request carrying a
//!   subtree of height `h` travels in credit class `MAX_DEPTH + h` and an entry serving
//!   it waits only for heights below `h` and for copies one level deeper, so the waits
//!   still form no cycle. Deadlines nest: with `L` what a direct revoke of the holders
//!   may take, an entry whose highest subtree has height `s` waits `(2s + 1) L`; a head it
//!   asked that has not answered by then is fenced and its members are asked directly, one
//!   `L` more; a head of height `h` thus answers within `2h L`, before its parent gives it
//!   up. A silent, dead or slow head costs its members at most that detour, never a false
//!   confirmation; a head without room for its members (its table full of its own
//!   copies' children) declines them and the asker sends them directly.
//! * **Multicast** (`Policy::revoke = Multicast`, the default). The revoker's own revoke
//!   writes one request naming every copy (ids and cores, see `caps::mcast`) once into its
//!   core's slot, before it sets up its own entry, rings every named core, then kicks them
//!   (the transport's business: one NMI per x2APIC cluster): no ring message, no
//!   per-holder request. Each named core serves it after draining its inbox (everything the revoker
//!   sent it before the request is handled first; today a transfer's guest waits for its
//!   `INSERT_REPLY`, so no `INSERT` of the revoker is ever behind it, but the order does not
//!   rely on that), revokes its copies there and then, and writes its answer [nodes,
//!   incomplete, declined] into its own reply line of the revoker's slot, setting its bit in
//!   the slot's answered word; the revoker, spinning in its wait, takes the answers with one
//!   load when none is new, and all of them in one pass once all are in (line by line only
//!   if one declines, doubts or answers an older request). A copy counts as gone only when its own core's line says so for
//!   this request's sequence number. A core whose copy has copies of its own (or whose
//!   revoke is under way there) declines all of its copies without touching them, and the
//!   revoker asks for each by a `REVOKE` on the ring (an entry with the usual classes,
//!   credits and deadlines: the multicast itself needs no credit, no entry at the holder,
//!   and never waits). A named core that does not answer by the entry's deadline is fenced
//!   as for a `REVOKE`; a late line from it names an old sequence number or a fenced core
//!   and is ignored. Only the revoker's own revoke is a multicast (one slot per core: its
//!   guest has one operation at a time); a holder revoking its copies of copies sends
//!   `REVOKE`s.
//! * **Incompleteness is sticky.** A local revoke that could not confirm a copy puts that
//!   copy's record back (a later revoke tries again and again reports `Timeout`, never `Ok`
//!   over a copy that may live); a core that ever finished a revoke incomplete has lost
//!   track of what lies below the nodes it removed, so it answers a revoke of a node it does
//!   not hold as incomplete too, and an ancestor's revoke cannot return `Ok` past it.
//!
//! May call: `vmcall_proto`, the [`Env`] of its core, `caps::mcast` (the multicast
//! request's layout), `caps::policy` (its settings and counters), `caps::op` (the kinds).

use super::env::Env;
use super::mcast;
use super::policy::{Policy, Revoke, Stats};
use crate::members::MAX_PEERS;
use vmcall_proto::caps::{CSpace, Cap, CapType, Child, Rights, MAX_CHILDREN, MAX_DEPTH};
use vmcall_proto::channel::Payload;
use vmcall_proto::hypercall::HvError;

/// Requests of one class outstanding from one core to another at most.
pub const CREDITS: u8 = 1;
/// Height of a revoke tree at most: `MAX_CHILDREN` (16) holders with a fan-out of 2 (the
/// least) give heads of 7 members: 7 -> 3 -> 1 -> 0.
pub const TREE_HEIGHT: u8 = 3;
/// Members one tree request carries at most (words 3-6, two per word).
const MAX_MEMBERS: usize = 8;
/// Credit classes: `INSERT`, a `REVOKE` for each depth 1..=MAX_DEPTH, and a tree `REVOKE`
/// for each height 1..=TREE_HEIGHT.
pub const CLASSES: usize = MAX_DEPTH as usize + 1 + TREE_HEIGHT as usize;
/// Inter-core ring slots needed (see the module header): requests and replies of every
/// class, rounded up to the power of two the ring wants.
/// Guest control adds at most three per ring (one request, one answer, one release), links
/// three (a down, an ack, an up), membership ten (see `members`).
pub const RING_SLOTS: u32 = (2 * CREDITS as u32 * CLASSES as u32 + 6 + 10).next_power_of_two();

/// Entries a core needs with `cores` cores: its own operation, and the requests of every
/// other core it may be serving at once.
pub const fn entries_for(cores: usize) -> usize {
    1 + CREDITS as usize * (MAX_DEPTH + TREE_HEIGHT) as usize * (cores - 1)
}

pub use super::op;

fn header(op: u64, req: u32) -> u64 {
    op | (req as u64) << 32
}
fn op_of(m: &Payload) -> u64 {
    m[0] & 0xff
}
fn req_of(m: &Payload) -> u32 {
    (m[0] >> 32) as u32
}

/// Whether `m` asks something (as opposed to answering).
pub fn is_request(m: &Payload) -> bool {
    matches!(op_of(m), op::INSERT | op::REVOKE)
}

/// Whether `m` is a `REVOKE`.
pub fn is_revoke(m: &Payload) -> bool {
    op_of(m) == op::REVOKE
}

/// Request numbers name the entry and the child they belong to, and the entry's use.
fn req(entry: usize, child: usize, seq: u16) -> u32 {
    (entry as u32) << 20 | (child as u32) << 16 | seq as u32
}

/// How this core's own operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The peer took the cap: its handle there.
    Inserted(u64),
    /// The peer refused it.
    Refused(HvError),
    /// A revoke finished: nodes revoked, and whether some core could not confirm.
    Revoked((u64, bool)),
    /// The peer was fenced before it answered.
    Unconfirmed,
}

/// An `INSERT` for the capability layer to decide on ([`Proto::reply_insert`] answers it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InsertRequest {
    pub from: usize,
    pub req: u32,
    pub cap: Cap,
    /// The copy's id (minted by the sender), or `None` for a move.
    pub id: Option<u64>,
    pub channel: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Free,
    LocalInsert,
    LocalRevoke,
    /// Serving a peer's `REVOKE`: answer `req` to core `to` when done.
    Forward {
        to: u16,
        req: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Entry {
    kind: Kind,
    seq: u16,
    /// The node whose copies this entry revokes (0 for an insert).
    node: u64,
    /// The credit class of what it sends: 0 for an insert, the children's depth for a
    /// revoke.
    class: u8,
    /// Children that were not confirmed (their core fenced, or their own revoke incomplete).
    failed: u16,
    ids: [u64; MAX_CHILDREN],
    cores: [u16; MAX_CHILDREN],
    /// Per child: the head whose request carries it (itself when asked directly), its
    /// position among that head's members, and the credit class of its request.
    via: [u8; MAX_CHILDREN],
    pos: [u8; MAX_CHILDREN],
    cls: [u8; MAX_CHILDREN],
    /// Per child of an entry serving a tree request: its position among the request's
    /// members ([`NONE`] for the node's own copies).
    up: [u8; MAX_CHILDREN],
    /// Members of the served request this entry had no room for (bit = position).
    declined: u16,
    /// The fan-out its tree requests are planned with, and the credit class of a direct
    /// request to a member (the depth of the served request's node).
    fanout: u8,
    mclass: u8,
    n: u8,
    sent: u16,
    done: u16,
    total: u64,
    /// Something of the node's own is unconfirmed (beyond failed children).
    incomplete: bool,
    deadline: u64,
    /// What a direct request of this entry may take (`L`): the detour past a silent head.
    wait: u64,
    /// The hop of the request this entry serves (its requests carry one more): 0 for the
    /// local revoke, 1 once a multicast's decline has it ask by `REVOKE`s.
    hop: u8,
    /// The longest chain of requests below it so far (its answers' rounds, and its hop).
    rounds: u8,
}

/// Not a member of the served request: the node's own copy.
const NONE: u8 = 0xff;
/// `via` of a child asked by this core's multicast request (not by a ring message).
const MC: u8 = 0xfe;

const FREE: Entry = Entry {
    kind: Kind::Free,
    seq: 0,
    node: 0,
    class: 0,
    failed: 0,
    ids: [0; MAX_CHILDREN],
    cores: [0; MAX_CHILDREN],
    via: [0; MAX_CHILDREN],
    pos: [0; MAX_CHILDREN],
    cls: [0; MAX_CHILDREN],
    up: [NONE; MAX_CHILDREN],
    declined: 0,
    fanout: 0,
    mclass: 0,
    n: 0,
    sent: 0,
    done: 0,
    total: 0,
    incomplete: false,
    deadline: 0,
    wait: 0,
    hop: 0,
    rounds: 0,
};

impl Entry {
    fn complete(&self) -> bool {
        self.done.count_ones() == self.n as u32
    }

    /// The slots of the node's own copies (not members of a served tree request).
    fn own_mask(&self) -> u16 {
        (0..self.n as usize).filter(|&j| self.up[j] == NONE).fold(0, |m, j| m | 1 << j)
    }

    /// Whether child `j` is a head carrying members.
    fn heads(&self, j: usize) -> bool {
        (0..self.n as usize).any(|x| x != j && self.via[x] as usize == j)
    }

    /// Asks head `j`'s members directly, if it has not answered for them (it was fenced,
    /// or declined them): they get `L` more.
    fn unfold(&mut self, j: usize, now: u64) {
        let mut any = false;
        for x in 0..self.n as usize {
            if x != j && self.via[x] as usize == j && self.done & (1 << x) == 0 {
                self.via[x] = x as u8;
                self.cls[x] = self.mclass;
                self.sent &= !(1 << x);
                any = true;
            }
        }
        if any {
            self.deadline = self.deadline.max(now.saturating_add(self.wait));
        }
    }

    /// Plans how `slots` are reached: with a fan-out below their number, the first
    /// `fanout` become heads and the rest are split evenly among them as members (sent
    /// with their head's request); otherwise each is asked directly. Returns the highest
    /// subtree height asked for (0: all direct).
    fn plan(&mut self, slots: &[u8], fanout: usize) -> u8 {
        for &x in slots {
            let x = x as usize;
            self.via[x] = x as u8;
            self.cls[x] = self.mclass;
        }
        let f = fanout.max(2);
        if slots.len() <= f {
            return 0;
        }
        let (heads, rest) = slots.split_at(f);
        let mut at = 0;
        let mut top = 0;
        for (i, &h) in heads.iter().enumerate() {
            let g = rest.len() / f + (i < rest.len() % f) as usize;
            let mut carried = 0;
            for (p, &x) in rest[at..at + g].iter().enumerate() {
                // A copy on the head's own core is asked directly (a core never sends to
                // itself).
                if self.cores[x as usize] == self.cores[h as usize] {
                    continue;
                }
                self.via[x as usize] = h;
                self.pos[x as usize] = p as u8;
                // Carried by the head's request.
                self.sent |= 1 << x;
                carried += 1;
            }
            at += g;
            let height = tree_height(carried, f);
            if height > 0 {
                self.cls[h as usize] = MAX_DEPTH + height;
            }
            top = top.max(height);
        }
        top
    }
}

/// The height of the subtree below a head carrying `g` members with fan-out `f` (>= 2):
/// 0 with none, 1 if it asks them all directly.
pub const fn tree_height(g: usize, f: usize) -> u8 {
    if g == 0 {
        0
    } else if g <= f {
        1
    } else {
        1 + tree_height((g - f).div_ceil(f), f)
    }
}

/// Members ride in 32 bits each: core + 1 (0: none) in bits 0-7, the low 24 bits of the
/// id in bits 8-31; the rest of the id is the head's (only such members are carried).
fn fits(member: u64, core: u16, head: u64) -> bool {
    (member ^ head) >> 24 == 0 && core < 0xff
}

/// A bug to put into the protocol on purpose, to show the model checker finds it.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Bug {
    #[default]
    None,
    /// A served `REVOKE` does not go on to the node's own children.
    NoRecursion,
    /// A head answers for its members without asking them.
    HeadVouches,
    /// A holder's core answers a multicast for a copy that has copies of its own instead
    /// of declining it (those copies are never chased).
    McNoDecline,
}

/// This core's protocol state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Proto<const E: usize> {
    me: u16,
    entries: [Entry; E],
    /// Requests outstanding to each core, per credit class.
    outstanding: [[u8; CLASSES]; MAX_PEERS],
    /// Some revoke here finished incomplete: what lay below the nodes it removed may live.
    lost_track: bool,
    /// Copies a local revoke could not confirm, for the capability layer to record again.
    unconfirmed: [Option<Child>; MAX_CHILDREN],
    fenced: u64,
    local: Option<Verdict>,
    /// The `INSERT` of this core's own transfer, until it is sent.
    insert: Payload,
    seq: u16,
    /// Entries in use: when 0 (almost always), polling costs nothing but the inbox check.
    open: u32,
    /// One past the highest entry claimed since the table was last empty: scans stop there
    /// (entries are claimed lowest first, so this is the most ever open at once, not `E`).
    hi: usize,
    /// This core's last multicast request (0: none yet).
    mc_seq: u64,
    /// The cores whose answers to it the local revoke still awaits.
    mc_expect: u64,
    /// Per core: the local revoke's children (bit = slot) that this request asked there.
    mc_children: [u16; MAX_PEERS],
    #[cfg(test)]
    pub bug: Bug,
}

/// The credit class of a revoke of a node of depth `d` (inserts are class 0).
fn class_of(d: u8) -> u8 {
    d.clamp(1, MAX_DEPTH)
}

/// Deadline levels for an entry revoking children of depth `child_depth`.
fn levels(child_depth: u8) -> u64 {
    (MAX_DEPTH as u64 + 2).saturating_sub(child_depth as u64).max(1)
}

impl<const E: usize> Proto<E> {
    /// Writes a fresh instance at `p` without building one on the stack first (the entry
    /// table is tens of KiB: a by-value chain of constructors can overflow a hypervisor
    /// stack in unoptimised builds).
    ///
    /// # Safety
    /// `p` is valid for writes of a `Proto<E>` and properly aligned.
    pub unsafe fn init_at(p: *mut Self, me: u16) {
        // SAFETY: the caller vouches for `p`; every field is written before any read.
        unsafe {
            core::ptr::addr_of_mut!((*p).me).write(me);
            let entries = core::ptr::addr_of_mut!((*p).entries) as *mut Entry;
            for i in 0..E {
                entries.add(i).write(FREE);
            }
            core::ptr::addr_of_mut!((*p).outstanding).write([[0; CLASSES]; MAX_PEERS]);
            core::ptr::addr_of_mut!((*p).lost_track).write(false);
            core::ptr::addr_of_mut!((*p).unconfirmed).write([None; MAX_CHILDREN]);
            core::ptr::addr_of_mut!((*p).fenced).write(0);
            core::ptr::addr_of_mut!((*p).local).write(None);
            core::ptr::addr_of_mut!((*p).insert).write([0; 7]);
            core::ptr::addr_of_mut!((*p).seq).write(0);
            core::ptr::addr_of_mut!((*p).open).write(0);
            core::ptr::addr_of_mut!((*p).hi).write(0);
            core::ptr::addr_of_mut!((*p).mc_seq).write(0);
            core::ptr::addr_of_mut!((*p).mc_expect).write(0);
            core::ptr::addr_of_mut!((*p).mc_children).write([0; MAX_PEERS]);
            #[cfg(test)]
            core::ptr::addr_of_mut!((*p).bug).write(Bug::None);
        }
    }

    #[cfg(test)]
    pub fn new(me: u16) -> Self {
        Proto {
            me,
            entries: [FREE; E],
            outstanding: [[0; CLASSES]; MAX_PEERS],
            lost_track: false,
            unconfirmed: [None; MAX_CHILDREN],
            fenced: 0,
            local: None,
            insert: [0; 7],
            seq: 0,
            open: 0,
            hi: 0,
            mc_seq: 0,
            mc_expect: 0,
            mc_children: [0; MAX_PEERS],
            #[cfg(test)]
            bug: Bug::None,
        }
    }

    /// This core's index.
    pub fn me(&self) -> usize {
        self.me as usize
    }

    pub fn fenced(&self, core: usize) -> bool {
        core >= MAX_PEERS || self.fenced & (1 << core) != 0
    }

    #[cfg(test)]
    pub fn idle(&self) -> bool {
        let free = self.entries.iter().all(|e| e.kind == Kind::Free);
        assert_eq!(free, self.open == 0, "the open count follows the table");
        free && self.local.is_none()
    }

    /// The copies the last local revoke could not confirm (their records go back).
    pub fn take_unconfirmed(&mut self) -> [Option<Child>; MAX_CHILDREN] {
        core::mem::replace(&mut self.unconfirmed, [None; MAX_CHILDREN])
    }

    /// Whether some entry is open (something to wait for, a deadline to watch).
    pub fn busy(&self) -> bool {
        self.open > 0
    }

    /// Whether this core's own operation (its guest's transfer or revoke) is in flight.
    pub fn waiting(&self) -> bool {
        self.entries.first().is_some_and(|e| e.kind != Kind::Free)
    }

    /// The verdict of this core's own operation, once there is one.
    pub fn take_local(&mut self) -> Option<Verdict> {
        self.local.take()
    }

    fn claim(&mut self, i: usize, kind: Kind, deadline: u64) {
        if self.entries[i].kind == Kind::Free {
            self.open += 1;
            self.hi = self.hi.max(i + 1);
        }
        self.seq = self.seq.wrapping_add(1);
        self.entries[i] = Entry { kind, seq: self.seq, deadline, ..FREE };
    }

    /// Frees entry `i`.
    fn release(&mut self, i: usize) {
        self.entries[i].kind = Kind::Free;
        self.open -= 1;
        if self.open == 0 {
            self.hi = 0;
        }
    }

    fn set_children(&mut self, i: usize, children: &[Option<Child>; MAX_CHILDREN]) {
        let e = &mut self.entries[i];
        for ch in children.iter().flatten() {
            let dup = (0..e.n as usize).any(|j| e.ids[j] == ch.id && e.cores[j] == ch.core);
            if !dup && (e.n as usize) < MAX_CHILDREN {
                let j = e.n as usize;
                e.ids[j] = ch.id;
                e.cores[j] = ch.core;
                e.via[j] = j as u8;
                e.cls[j] = e.class;
                e.n += 1;
            }
        }
    }

    /// The copies of `node` that revokes still in progress here are taking back: a new
    /// revoke of `node` must not answer before they are gone too.
    fn in_progress(&self, node: u64) -> [Option<Child>; MAX_CHILDREN] {
        let mut out = [None; MAX_CHILDREN];
        let mut k = 0;
        for e in self.entries[..self.hi].iter().filter(|e| e.kind != Kind::Free && e.node == node) {
            // The node's own copies only: members of a tree request are other nodes.
            for j in (0..e.n as usize).filter(|&j| e.up[j] == NONE) {
                let ch = Child { core: e.cores[j], id: e.ids[j] };
                if k < MAX_CHILDREN && !out[..k].contains(&Some(ch)) {
                    out[k] = Some(ch);
                    k += 1;
                }
            }
        }
        out
    }

    /// Starts this core's transfer of `cap` to `peer` (the caller checked and recorded it).
    #[allow(clippy::too_many_arguments)]
    pub fn start_insert(
        &mut self,
        env: &mut impl Env,
        now: u64,
        peer: u16,
        cap: &Cap,
        id: Option<u64>,
        channel: u32,
        policy: &Policy,
    ) {
        self.local = None;
        self.claim(0, Kind::LocalInsert, now.saturating_add(policy.deadline.saturating_mul(2)));
        let e = &mut self.entries[0];
        e.cores[0] = peer;
        e.ids[0] = id.unwrap_or(0);
        e.n = 1;
        let flags = cap.kind as u64
            | (cap.rights.bits() as u64) << 8
            | (cap.depth as u64) << 16
            | (id.is_some() as u64) << 24;
        self.insert = [0, flags, cap.base, cap.size, channel as u64, id.unwrap_or(0), 0];
        self.pump(env, &mut Stats::default());
    }

    /// Starts this core's revoke of `children` (copies of a cap of node `node`, depth
    /// `depth`).
    #[allow(clippy::too_many_arguments)]
    pub fn start_revoke(
        &mut self,
        env: &mut impl Env,
        now: u64,
        node: u64,
        depth: u8,
        children: [Option<Child>; MAX_CHILDREN],
        policy: &Policy,
        stats: &mut Stats,
    ) {
        self.local = None;
        // A multicast request leaves first: its holders work while the entry is set up
        // (nothing here reads their answers before this call returns).
        let asked = if policy.revoke == Revoke::Multicast {
            self.multicast(env, node, &children)
        } else {
            0
        };
        if asked != 0 {
            let named = self.mc_expect.count_ones();
            stats.revoke.mc_named = stats.revoke.mc_named.saturating_add(named);
        }
        let wait = policy.deadline.saturating_mul(levels(depth.saturating_add(1)));
        self.claim(0, Kind::LocalRevoke, now.saturating_add(wait));
        let e = &mut self.entries[0];
        e.node = node;
        e.class = class_of(depth.saturating_add(1));
        e.wait = wait;
        // One cap's records: distinct by construction (each names a copy minted once).
        let e = &mut self.entries[0];
        for ch in children.iter().flatten().take(MAX_CHILDREN) {
            let j = e.n as usize;
            (e.ids[j], e.cores[j], e.via[j], e.cls[j]) = (ch.id, ch.core, j as u8, e.class);
            e.n += 1;
        }
        if policy.revoke == Revoke::Multicast {
            self.mc_mark(asked);
        } else if let Revoke::Tree { fanout } = policy.revoke {
            // Copies whose ids ride with the first one's go in the tree, the rest direct.
            let e = &mut self.entries[0];
            let (first, mut slots, mut k) = (e.ids[0], [0u8; MAX_CHILDREN], 0);
            for j in (0..e.n as usize).filter(|&j| fits(e.ids[j], e.cores[j], first)) {
                slots[k] = j as u8;
                k += 1;
            }
            e.fanout = fanout.max(2);
            e.mclass = e.class;
            let top = e.plan(&slots[..k], fanout as usize);
            e.deadline = now.saturating_add(wait.saturating_mul(2 * top as u64 + 1));
        }
        self.pump(env, stats);
        self.finish_complete(env, stats);
    }

    /// Asks every holder of the local revoke's copies `children` (node `node`) at once: one
    /// request in this core's slot naming them all (see the module header, "Multicast").
    /// Returns the copies asked (bit `j`: the `j`th copy, as the entry lists them). Copies
    /// on a fenced core are left to [`Self::pump`] (which fails them); if the environment
    /// has no slots, nothing is asked and `pump` sends a `REVOKE` per copy.
    fn multicast(
        &mut self,
        env: &mut impl Env,
        node: u64,
        children: &[Option<Child>; MAX_CHILDREN],
    ) -> u16 {
        let me = self.me as usize;
        let mut req =
            mcast::Request { seq: self.mc_seq.wrapping_add(2).max(2), node, ..Default::default() };
        // One pass; fenced cores are left to `pump`.
        let skip = self.fenced | 1 << me;
        let (mut k, mut asked, mut targets) = (0, 0u16, 0u64);
        for (j, ch) in children.iter().flatten().take(MAX_CHILDREN).enumerate() {
            let core = ch.core;
            if core as usize >= MAX_PEERS || skip & 1 << core != 0 {
                continue;
            }
            (req.ids[k], req.cores[k]) = (ch.id, core);
            k += 1;
            asked |= 1 << j;
            targets |= 1 << core;
        }
        if k == 0 {
            return 0;
        }
        req.n = k as u8;
        if !env.mc_publish(me, &req) {
            return 0;
        }
        self.mc_seq = req.seq;
        self.mc_expect = targets;
        asked
    }

    /// Marks the local revoke's copies `asked` as asked by this core's multicast request.
    fn mc_mark(&mut self, asked: u16) {
        let e = &mut self.entries[0];
        e.sent |= asked;
        for j in 0..e.n as usize {
            self.mc_children[e.cores[j] as usize % MAX_PEERS] = 0;
        }
        let mut m = asked;
        while m != 0 {
            let j = m.trailing_zeros() as usize;
            m &= m - 1;
            e.via[j] = MC;
            self.mc_children[e.cores[j] as usize % MAX_PEERS] |= 1 << j;
        }
    }

    /// Whether this core's multicast request still awaits answers.
    pub fn mc_open(&self) -> bool {
        self.mc_expect != 0
    }

    /// Whether this core's multicast request still awaits core `c`'s answer.
    #[cfg(test)]
    pub fn mc_awaits(&self, c: usize) -> bool {
        c < 64 && self.mc_expect & (1 << c) != 0
    }

    /// Takes the answers to this core's multicast request that its holders' cores wrote
    /// (their reply lines); returns how many. Unless `all`, only once every awaited core
    /// has answered (one load of the answered word until then): the answers are taken in
    /// one go, not each in a poll of its own, which would put a poll per holder on the
    /// revoker's critical path. Deadlines and fences take whatever came first ([`Self::expire`],
    /// [`Self::fence`]). A declined answer has that core's copies asked by `REVOKE`s.
    pub fn mc_gather(&mut self, env: &mut impl Env, stats: &mut Stats, all: bool) -> u32 {
        if self.mc_expect == 0 {
            return 0;
        }
        let me = self.me as usize;
        let answered = env.mc_answered(me);
        if !all && answered & self.mc_expect != self.mc_expect {
            return 0;
        }
        if answered & self.mc_expect == self.mc_expect && self.entries[0].kind == Kind::LocalRevoke
        {
            // Every awaited core answered: in the usual case all in full, taken in one pass
            // and one update of the entry (no per-holder branches on the critical path).
            let seq = self.mc_seq;
            let (mut bits, mut ok, mut total, mut mine) = (self.mc_expect, true, 0u64, 0u16);
            while bits != 0 {
                let c = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                match mcast::full(env.mc_line(me, c), seq) {
                    Some(t) => total += t,
                    None => ok = false,
                }
                mine |= self.mc_children[c % MAX_PEERS];
            }
            if ok {
                let taken = self.mc_expect.count_ones();
                stats.revoke.mc_taken = stats.revoke.mc_taken.saturating_add(taken);
                self.mc_expect = 0;
                let e = &mut self.entries[0];
                e.done |= mine;
                e.rounds = e.rounds.max(1);
                e.total = e.total.saturating_add(total);
                if e.complete() {
                    self.finish_complete(env, stats);
                }
                return taken;
            }
            // A decline, a doubt or an older answer: each line on its own, below.
        }
        let mut bits = answered & self.mc_expect;
        let mut taken = 0;
        let mut unfolded = false;
        while bits != 0 {
            let c = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let a = mcast::decode(env.mc_line(me, c));
            if a.seq != self.mc_seq as u32 {
                // An answer to an earlier request (from a core fenced then): not this one's.
                continue;
            }
            self.mc_expect &= !(1 << c);
            taken += 1;
            stats.revoke.mc_taken = stats.revoke.mc_taken.saturating_add(1);
            let e = &mut self.entries[0];
            if e.kind != Kind::LocalRevoke {
                continue;
            }
            e.rounds = e.rounds.max(1);
            // This core's copies, not already settled (a fence settles them as failed).
            let mine = self.mc_children[c] & !e.done;
            if a.declined {
                // Asked again by `REVOKE`s: a round after the multicast's.
                e.hop = e.hop.max(1);
                let mut m = mine;
                while m != 0 {
                    let j = m.trailing_zeros() as usize;
                    m &= m - 1;
                    e.via[j] = j as u8;
                    e.cls[j] = e.class;
                    e.sent &= !(1 << j);
                }
                unfolded |= mine != 0;
            } else {
                e.done |= mine;
                if a.incomplete {
                    e.failed |= mine;
                }
                e.total = e.total.saturating_add(a.total);
            }
        }
        if unfolded {
            // The declined copies get a direct request's time from now.
            let now = env.now();
            let e = &mut self.entries[0];
            e.deadline = e.deadline.max(now.saturating_add(e.wait));
            self.pump(env, stats);
        }
        if taken > 0 && self.entries[0].complete() {
            self.finish_complete(env, stats);
        }
        taken
    }

    /// Serves core `from`'s multicast request `req` (the caller guarantees that everything
    /// `from` sent this core before it was received first): this core's copies it names go
    /// at once and the answer is written, unless one of them has copies of its own or a
    /// revoke of it is under way here, which need an entry: then all are declined, and
    /// `from` asks for them by `REVOKE`s on the ring. Returns whether `req` named this core.
    pub fn serve_multicast(
        &mut self,
        env: &mut impl Env,
        from: usize,
        req: &mcast::Request,
        space: &mut CSpace,
        stats: &mut Stats,
    ) -> bool {
        let me = self.me as usize;
        if from == me || self.fenced(from) || req.on(me).next().is_none() {
            return false;
        }
        #[cfg(test)]
        let decline_ok = self.bug != Bug::McNoDecline;
        #[cfg(not(test))]
        let decline_ok = true;
        let needs = req.on(me).any(|id| {
            space.live().any(|(_, c)| c.id == id && c.children().next().is_some())
                || self.in_progress(id).iter().any(Option::is_some)
        });
        let word = if needs && decline_ok {
            mcast::answer(req.seq, 0, false, true)
        } else {
            let (mut total, mut unsure) = (0u64, false);
            for id in req.on(me) {
                let mut unmap_failed = false;
                let removed = space.revoke_id(id, |c| {
                    if let Err(e) = env.ept_unmap(c.mapped_at.unwrap_or(0), c.size) {
                        log::error!("revoke of {id:#x}: EPT unmap failed: {e:?}");
                        unmap_failed = true;
                    }
                });
                stats.unmap_failed |= unmap_failed;
                let found = (removed.pieces > 0) as u64;
                total += found;
                unsure |= removed.pieces == 0 && self.lost_track;
            }
            stats.revoked_here = stats.revoked_here.saturating_add(total);
            mcast::answer(req.seq, total, unsure, false)
        };
        stats.revoke.mc_served = stats.revoke.mc_served.saturating_add(1);
        env.mc_answer(me, from, word);
        true
    }

    /// Sends whatever entries still have to send, as far as credits allow.
    fn pump(&mut self, env: &mut impl Env, stats: &mut Stats) {
        // A fenced head's members are asked directly, possibly in an earlier slot.
        let mut again = true;
        while again {
            again = false;
            let mut i = 0;
            while i < self.hi {
                if self.entries[i].kind != Kind::Free {
                    again |= self.pump_entry(env, i, stats);
                }
                i += 1;
            }
        }
    }

    /// [`Self::pump`] for entry `i`; `true` if a head's members were unfolded.
    fn pump_entry(&mut self, env: &mut impl Env, i: usize, stats: &mut Stats) -> bool {
        let mut unfolded = false;
        {
            for j in 0..self.entries[i].n as usize {
                let bit = 1 << j;
                let e = &self.entries[i];
                if e.sent & bit != 0 {
                    continue;
                }
                let (to, id, class, kind, seq) =
                    (e.cores[j] as usize, e.ids[j], e.cls[j], e.kind, e.seq);
                if self.fenced(to) {
                    let now = env.now();
                    let e = &mut self.entries[i];
                    e.sent |= bit;
                    e.done |= bit;
                    e.failed |= bit;
                    if e.heads(j) {
                        e.unfold(j, now);
                        unfolded = true;
                    }
                    continue;
                }
                if self.outstanding[to][class as usize] >= CREDITS {
                    continue;
                }
                let r = req(i, j, seq);
                let m = match kind {
                    Kind::LocalInsert => {
                        let mut m = self.insert;
                        m[0] = header(op::INSERT, r);
                        m
                    }
                    // Word 2: the target node's depth class; for a head, its subtree's
                    // height and the fan-out to plan it with, its members in words 3-6.
                    // Bits 24-31: the request's hop (rounds, see `RevokeCounts`).
                    _ if class > MAX_DEPTH => self.tree_request(i, j, r),
                    _ => {
                        let hop = (e.hop as u64 + 1) << 24;
                        [header(op::REVOKE, r), id, class as u64 | hop, 0, 0, 0, 0]
                    }
                };
                self.entries[i].sent |= bit;
                if env.send(to, &m) {
                    if kind != Kind::LocalInsert {
                        stats.revoke.sent = stats.revoke.sent.saturating_add(1);
                    }
                    self.outstanding[to][class as usize] += 1;
                    env.kick(to);
                } else {
                    // Flow control makes this impossible with a live peer.
                    self.fence(env, to, stats);
                    unfolded = true;
                }
            }
        }
        unfolded
    }

    /// The `REVOKE` to head `j` of entry `i`, its members in words 3-6.
    fn tree_request(&self, i: usize, j: usize, r: u32) -> Payload {
        let e = &self.entries[i];
        let height = (e.cls[j] - MAX_DEPTH) as u64;
        let hop = e.hop as u64 + 1;
        let word2 = e.mclass as u64 | height << 8 | (e.fanout as u64) << 16 | hop << 24;
        let mut m = [header(op::REVOKE, r), e.ids[j], word2, 0, 0, 0, 0];
        for x in (0..e.n as usize).filter(|&x| x != j && e.via[x] as usize == j) {
            let p = e.pos[x] as usize;
            let v = (e.cores[x] as u64 + 1) | (e.ids[x] & 0xff_ffff) << 8;
            m[3 + p / 2] |= v << (32 * (p % 2));
        }
        m
    }

    /// Finishes every entry whose children all answered.
    fn finish_complete(&mut self, env: &mut impl Env, stats: &mut Stats) {
        // `hi` is read again each time: answering may fence a core and finish others.
        let mut i = 0;
        while i < self.hi {
            // Look before copying: the table is large and mostly free.
            let live = &self.entries[i];
            i += 1;
            if live.kind == Kind::Free || !live.complete() {
                continue;
            }
            let e = *live;
            self.release(i - 1);
            // What of the node's own could not be confirmed; failed members of a served tree
            // request are reported apart (they are not below this node).
            // (Loops over the children only when some failed: not on a revoke's usual path.)
            let own = e.incomplete || (e.failed != 0 && e.failed & e.own_mask() != 0);
            let members = if e.failed == 0 {
                0
            } else {
                (0..e.n as usize)
                    .filter(|&j| e.up[j] != NONE && e.failed & (1 << j) != 0)
                    .fold(0u64, |m, j| m | 1 << e.up[j])
            };
            if own {
                self.lost_track = true;
            }
            if e.kind == Kind::LocalRevoke {
                stats.revoke.own = stats.revoke.own.saturating_add(1);
                stats.revoke.rounds = e.rounds;
                self.mc_expect = 0;
                self.unconfirmed = [None; MAX_CHILDREN];
                let mut m = e.failed;
                while m != 0 {
                    let j = m.trailing_zeros() as usize;
                    m &= m - 1;
                    self.unconfirmed[j] = Some(Child { core: e.cores[j], id: e.ids[j] });
                }
            }
            match e.kind {
                Kind::Forward { to, req } => {
                    let (total, declined) = (e.total, e.declined as u64);
                    let rounds = e.rounds as u64;
                    let m = [
                        header(op::REVOKE_REPLY, req),
                        total,
                        own as u64,
                        members,
                        declined,
                        rounds,
                        0,
                    ];
                    self.answer(env, to as usize, &m, stats);
                }
                Kind::LocalRevoke => self.local = Some(Verdict::Revoked((e.total, own))),
                // Decided by its reply or by a fence, never by completion alone.
                Kind::LocalInsert => self.local = Some(Verdict::Unconfirmed),
                Kind::Free => {}
            }
        }
    }

    /// Sends a reply (always room: see the module header).
    fn answer(&mut self, env: &mut impl Env, to: usize, m: &Payload, stats: &mut Stats) {
        if self.fenced(to) {
            return;
        }
        if env.send(to, m) {
            if op_of(m) == op::REVOKE_REPLY {
                stats.revoke.sent = stats.revoke.sent.saturating_add(1);
            }
            env.kick(to);
        } else {
            self.fence(env, to, stats);
        }
    }

    /// Declares `core` failed: nothing more is sent to it or taken from it, and whatever
    /// waited on it finishes as incomplete.
    pub fn fence(&mut self, env: &mut impl Env, core: usize, stats: &mut Stats) {
        if self.fenced(core) {
            return;
        }
        // Answers already in count before the fence settles the rest as failed.
        self.mc_gather(env, stats, true);
        self.fenced |= 1 << core;
        self.mc_expect &= !(1 << core);
        stats.fenced |= 1 << core;
        self.outstanding[core] = [0; CLASSES];
        let now = env.now();
        let mut unfolded = false;
        for e in self.entries[..self.hi].iter_mut().filter(|e| e.kind != Kind::Free) {
            for j in 0..e.n as usize {
                if e.cores[j] as usize == core && e.done & (1 << j) == 0 {
                    e.sent |= 1 << j;
                    e.done |= 1 << j;
                    e.failed |= 1 << j;
                    // A head's members are not lost with it: they are asked directly.
                    if e.heads(j) {
                        e.unfold(j, now);
                        unfolded = true;
                    }
                }
            }
        }
        if unfolded {
            self.pump(env, stats);
        }
        self.finish_complete(env, stats);
    }

    /// [`Proto::fence`] for a core that did not answer this protocol in time.
    fn fence_silent(&mut self, env: &mut impl Env, core: usize, stats: &mut Stats) {
        if !self.fenced(core) {
            log::error!("core {core} did not answer the capability protocol in time: fenced");
        }
        self.fence(env, core, stats);
    }

    /// Fences every core an expired entry still waits for.
    pub fn expire(&mut self, env: &mut impl Env, now: u64, stats: &mut Stats) {
        if self.open == 0 {
            return;
        }
        if self.mc_expect != 0 && now > self.entries[0].deadline {
            // The multicast's answers that came: taken before the silent are fenced.
            self.mc_gather(env, stats, true);
        }
        let mut i = 0;
        while i < self.hi {
            let live = &self.entries[i];
            i += 1;
            if live.kind == Kind::Free || now <= live.deadline {
                continue;
            }
            // The cores asked directly (a head's members wait on their head: when it is
            // fenced they are asked directly and get their own time).
            let (n, done, cores, via) = (live.n, live.done, live.cores, live.via);
            for (j, &core) in cores.iter().enumerate().take(n as usize) {
                if done & (1 << j) == 0 && (via[j] as usize == j || via[j] == MC) {
                    self.fence_silent(env, core as usize, stats);
                }
            }
        }
    }

    /// Answers an `INSERT` the capability layer decided on.
    pub fn reply_insert(
        &mut self,
        env: &mut impl Env,
        to: usize,
        req: u32,
        result: Result<u64, HvError>,
        stats: &mut Stats,
    ) {
        let code = match result {
            Ok(h) => h,
            Err(e) => e.to_rax(),
        };
        self.answer(env, to, &[header(op::INSERT_REPLY, req), code, 0, 0, 0, 0, 0], stats);
    }

    /// One message from core `from`. Revokes and replies are handled here; an `INSERT` is
    /// handed back for the capability layer to decide (then [`Self::reply_insert`]).
    pub fn deliver(
        &mut self,
        env: &mut impl Env,
        from: usize,
        m: &Payload,
        space: &mut CSpace,
        policy: &Policy,
        stats: &mut Stats,
    ) -> Option<InsertRequest> {
        if from == self.me as usize || self.fenced(from) {
            return None;
        }
        let r = req_of(m);
        match op_of(m) {
            op::INSERT => return Some(decode_insert(from, r, m)),
            op::REVOKE => {
                stats.revoke.received = stats.revoke.received.saturating_add(1);
                self.serve_revoke(env, from, r, m, space, policy, stats)
            }
            op::REVOKE_REPLY => {
                stats.revoke.received = stats.revoke.received.saturating_add(1);
                self.take_reply(env, from, r, m, stats)
            }
            op::INSERT_REPLY => self.take_reply(env, from, r, m, stats),
            other => log::error!("unknown inter-core message {other} from core {from}"),
        }
        None
    }

    #[allow(clippy::too_many_arguments)]
    fn serve_revoke(
        &mut self,
        env: &mut impl Env,
        from: usize,
        r: u32,
        m: &Payload,
        space: &mut CSpace,
        policy: &Policy,
        stats: &mut Stats,
    ) {
        let (id, depth, hop) = (m[1], m[2] & 0xff, (m[2] >> 24 & 0xff) as u8);
        // A tree request: the subtree's height, the fan-out, the members (see the header).
        let (height, fanout) = ((m[2] >> 8 & 0xff) as u8, (m[2] >> 16 & 0xff) as u8);
        let mut members = [None; MAX_MEMBERS];
        #[cfg(test)]
        let height = if self.bug == Bug::HeadVouches { 0 } else { height };
        if height > 0 {
            for (p, slot) in members.iter_mut().enumerate() {
                let v = m[3 + p / 2] >> (32 * (p % 2)) & 0xffff_ffff;
                if v & 0xff != 0 {
                    let core = (v & 0xff) as u16 - 1;
                    *slot = Some(Child { core, id: id & !0xff_ffff | v >> 8 });
                }
            }
        }
        let mut unmap_failed = false;
        let removed = space.revoke_id(id, |c| {
            if let Err(e) = env.ept_unmap(c.mapped_at.unwrap_or(0), c.size) {
                log::error!("revoke of {id:#x}: EPT unmap failed: {e:?}");
                unmap_failed = true;
            }
        });
        stats.unmap_failed |= unmap_failed;
        // The node's children, and those a revoke of the node already under way here is
        // taking back: chasing them again (revoke is idempotent, and the earlier REVOKE is
        // ahead on the same ring) makes this answer wait until they are gone.
        let mut children = removed.children;
        let pending = self.in_progress(id);
        for ch in pending.iter().flatten() {
            if !children.contains(&Some(*ch)) {
                if let Some(free) = children.iter_mut().find(|c| c.is_none()) {
                    *free = Some(*ch);
                }
            }
        }
        #[cfg(test)]
        if self.bug == Bug::NoRecursion {
            children = [None; MAX_CHILDREN];
        }
        let found = (removed.pieces > 0) as u64;
        stats.revoked_here = stats.revoked_here.saturating_add(found);
        let reply = |total, incomplete: bool| {
            [header(op::REVOKE_REPLY, r), total, incomplete as u64, 0, 0, hop as u64, 0]
        };
        // Not here (any more): complete, unless this core lost track of what it removed.
        let unsure = removed.pieces == 0 && self.lost_track;
        if children.iter().all(Option::is_none) && members.iter().all(Option::is_none) {
            self.answer(env, from, &reply(found, unsure), stats);
            return;
        }
        let Some(i) = (1..E).find(|&i| self.entries[i].kind == Kind::Free) else {
            // Flow control bounds what a core serves at once; this is a broken invariant.
            // Members are declined: the asker reaches them directly.
            log::error!("capability protocol: no entry for a revoke from core {from}");
            let mut m = reply(found, true);
            m[4] = members
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_some())
                .fold(0, |b, (p, _)| b | 1 << p);
            self.answer(env, from, &m, stats);
            return;
        };
        let deadline = if removed.pieces > 0 {
            let wait = policy.deadline.saturating_mul(levels(removed.depth.saturating_add(1)));
            env.now().saturating_add(wait)
        } else {
            // Only chasing a revoke under way: its deadline is ours.
            self.entries[..self.hi]
                .iter()
                .filter(|e| e.kind != Kind::Free && e.node == id)
                .map(|e| e.deadline)
                .max()
                .unwrap_or(0)
        };
        self.claim(i, Kind::Forward { to: from as u16, req: r }, deadline);
        self.entries[i].node = id;
        // The node's depth: what it holds says, else what the sender said (a chase).
        let node_depth = if removed.pieces > 0 { removed.depth as u64 } else { depth };
        self.entries[i].class = class_of(node_depth.min(MAX_DEPTH as u64) as u8 + 1);
        self.set_children(i, &children);
        let e = &mut self.entries[i];
        e.total = found;
        e.incomplete = unsure;
        (e.hop, e.rounds) = (hop, hop);
        if height > 0 {
            // Members are of the node's own depth: `L` is what a direct request to them
            // may take; this entry waits `(2s + 1) L` for subtrees of height s < height.
            let now = env.now();
            e.wait = policy.deadline.saturating_mul(levels(depth.min(MAX_DEPTH as u64) as u8));
            e.fanout = fanout.max(2);
            let member_class = class_of(depth.min(MAX_DEPTH as u64) as u8);
            let mut slots = [0u8; MAX_MEMBERS];
            let mut k = 0;
            for (p, ch) in members.iter().enumerate() {
                let Some(ch) = ch else { continue };
                if (e.n as usize) < MAX_CHILDREN {
                    let j = e.n as usize;
                    (e.ids[j], e.cores[j], e.up[j]) = (ch.id, ch.core, p as u8);
                    e.n += 1;
                    slots[k] = j as u8;
                    k += 1;
                } else {
                    e.declined |= 1 << p;
                }
            }
            e.mclass = member_class;
            let top = e.plan(&slots[..k], e.fanout as usize);
            let until = now.saturating_add(e.wait.saturating_mul(2 * top as u64 + 1));
            e.deadline = e.deadline.max(until);
        }
        self.pump(env, stats);
        self.finish_complete(env, stats);
    }

    fn take_reply(
        &mut self,
        env: &mut impl Env,
        from: usize,
        r: u32,
        m: &Payload,
        stats: &mut Stats,
    ) {
        let (i, j, seq) = ((r >> 20) as usize, (r >> 16 & 0xf) as usize, r as u16);
        let Some(e) = self.entries.get(i).copied() else { return };
        let bit = 1 << j;
        let expected = e.kind != Kind::Free
            && e.seq == seq
            && j < e.n as usize
            && e.sent & bit != 0
            && e.done & bit == 0
            && e.cores[j] as usize == from
            && (op_of(m) == op::INSERT_REPLY) == (e.kind == Kind::LocalInsert);
        if !expected {
            log::warn!("stale or unexpected reply {r:#x} from core {from}: ignored");
            return;
        }
        let class = e.cls[j] as usize;
        self.outstanding[from][class] = self.outstanding[from][class].saturating_sub(1);
        let now = env.now();
        let e = &mut self.entries[i];
        e.done |= bit;
        if e.kind == Kind::LocalInsert {
            self.release(i);
            self.local = Some(match HvError::from_rax(m[1]) {
                Ok(h) => Verdict::Inserted(h),
                Err(Ok(err)) => Verdict::Refused(err),
                Err(Err(_)) => Verdict::Refused(HvError::PeerGone),
            });
        } else {
            e.total = e.total.saturating_add(m[1]);
            e.rounds = e.rounds.max(m[5].min(0xff) as u8);
            if m[2] != 0 {
                e.failed |= bit;
            }
            // Its members: confirmed through it, failed (bit set in word 3), or declined
            // (word 4: asked directly now). Only members it was asked for count.
            let (failed, declined) = (m[3], m[4]);
            let mut unfold = false;
            for x in 0..e.n as usize {
                let xb = 1 << x;
                if x == j || e.via[x] as usize != j || e.done & xb != 0 {
                    continue;
                }
                let p = e.pos[x] as u64;
                if declined >> p & 1 != 0 {
                    unfold = true;
                    continue;
                }
                e.done |= xb;
                if failed >> p & 1 != 0 {
                    e.failed |= xb;
                }
            }
            if unfold {
                e.unfold(j, now);
            }
        }
        self.pump(env, stats);
        self.finish_complete(env, stats);
    }
}

fn decode_insert(from: usize, req: u32, m: &Payload) -> InsertRequest {
    let kind =
        if m[1] & 0xff == CapType::Endpoint as u64 { CapType::Endpoint } else { CapType::Memory };
    let mut cap = Cap::new(kind, Rights::from_bits_truncate((m[1] >> 8) as u8), m[2], m[3]);
    cap.depth = ((m[1] >> 16) as u8).min(MAX_DEPTH);
    let copy = (m[1] >> 24) & 1 == 1;
    InsertRequest { from, req, cap, id: copy.then_some(m[5]), channel: m[4] as u32 }
}
