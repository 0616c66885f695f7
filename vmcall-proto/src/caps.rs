// SPDX-License-Identifier: MIT OR Apache-2.0
//! Capabilities: typed, rights-carrying references to memory regions and channel endpoints,
//! after Barrelfish's capability system and seL4's derivation tree, kept small.
//!
//! Each guest has a capability space ([`CSpace`]) owned by its core's hypervisor instance:
//! no other core reads or writes it. The guest names its caps by *handles*: the slot index
//! in bits 0-15 and the slot's generation in bits 32-62. A slot is reused after its cap is
//! revoked or moved away, under a new generation, so an old handle reads
//! [`CapError::Revoked`] (stale), never someone else's cap, and revoked slots cannot pile up.
//!
//! **Derivation.** Every cap belongs to a *node* named by a [`CapId`] (`core << 48 |
//! counter`, minted by the core that creates the node: unique without a shared counter). A
//! copy is a new node, a *child* of its source's node, recorded in the source as (core, id).
//! A split keeps the node: both parts carry the same id (*pieces* of one node), so the
//! parent's record reaches every piece. Revoking a node ([`CSpace::revoke_id`]) removes all
//! its pieces and hands back the union of their children for the caller to revoke in turn.
//!
//! Invariants kept here (and checked by the property tests against a reference model):
//! * rights never grow: a copy or a mapping has at most the source's rights;
//! * a copy is at most [`MAX_DEPTH`] levels below an original; only originals (depth 0)
//!   move: moving a copy would carry it out of its parent's record;
//! * a node records at most [`MAX_CHILDREN`] children over all its pieces;
//! * a region is mapped at most once per piece, only at an aligned guest address;
//! * split needs an unmapped piece without copies, and the parts exactly cover it;
//! * an id is never reused: a revoked node cannot come back under the same id.

use bitflags::bitflags;

bitflags! {
    /// What a holder may do with a capability.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Rights: u8 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        /// May be copied or moved to another guest.
        const GRANT = 1 << 2;
    }
}

/// Capability types.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CapType {
    /// A region of physical memory (`base`, `size`: host-physical, page-aligned).
    Memory = 1,
    /// A channel endpoint (`base` is the channel's number in the config).
    Endpoint = 2,
    /// Control over another guest (`base`: the core it runs on, `size`: its guest index);
    /// from the config's `[[control]]`, never transferred.
    Control = 3,
}

/// Slots per capability space.
pub const MAX_SLOTS: usize = 64;
/// Copies recorded per node (all pieces together).
pub const MAX_CHILDREN: usize = 16;
/// How many levels of copies of copies below an original.
pub const MAX_DEPTH: u8 = 4;
/// Page size for regions, splits and mappings.
pub const PAGE: u64 = 4096;
/// Generations stay below 2^31 so a handle is a positive RAX value.
const GEN_MASK: u64 = (1 << 31) - 1;

/// A capability id: `core << 48 | counter`, minted by the creating core.
pub type CapId = u64;

/// A copy made from a capability: which core's space holds it, under which id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Child {
    pub core: u16,
    pub id: CapId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cap {
    pub kind: CapType,
    pub rights: Rights,
    pub id: CapId,
    pub base: u64,
    pub size: u64,
    /// Copies between this cap and its original (0: an original).
    pub depth: u8,
    /// Guest-physical address where it is mapped in this space, if it is.
    pub mapped_at: Option<u64>,
    /// Mapped with these rights (at most `rights`).
    pub mapped_rights: Rights,
    children: [Option<Child>; MAX_CHILDREN],
}

impl Cap {
    pub fn new(kind: CapType, rights: Rights, base: u64, size: u64) -> Self {
        Cap {
            kind,
            rights,
            id: 0,
            base,
            size,
            depth: 0,
            mapped_at: None,
            mapped_rights: Rights::empty(),
            children: [None; MAX_CHILDREN],
        }
    }
    pub fn children(&self) -> impl Iterator<Item = Child> + '_ {
        self.children.iter().flatten().copied()
    }
    /// `identify` packing: type in bits 0-7, rights in bits 8-15, size in pages above.
    pub fn identify(&self) -> u64 {
        self.kind as u64 | (self.rights.bits() as u64) << 8 | (self.size / PAGE) << 16
    }
}

// Slots live inline in a fixed array: there is no allocator in the hypervisor to box into,
// and the table's size is fixed either way.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum State {
    /// Never used: the next cap keeps generation 0 (so the first handles are 0, 1, ...).
    Unused,
    /// Its cap moved away: a handle of the current generation reads `NoSuchSlot`.
    Moved,
    /// Its cap was revoked: a handle of the current generation reads `Revoked`.
    Revoked,
    Live(Cap),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Slot {
    generation: u64,
    state: State,
}

/// Why a capability operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapError {
    NoSuchSlot,
    Revoked,
    WrongType,
    RightsEscalation,
    NoSpace,
    Misaligned,
    AddressInUse,
    NotMapped,
    AlreadyMapped,
    HasCopies,
    TooManyCopies,
    BadOffset,
    NotOwner,
    TooDeep,
}

/// The handle of slot `index` at `generation`.
pub const fn handle(index: usize, generation: u64) -> u64 {
    index as u64 | (generation & GEN_MASK) << 32
}

/// What a revoke found in one space: how many pieces went, and the node's children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Removed {
    pub pieces: u32,
    /// The node's depth (0 if nothing was removed).
    pub depth: u8,
    pub children: [Option<Child>; MAX_CHILDREN],
}

/// One guest's capability space.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CSpace {
    slots: [Slot; MAX_SLOTS],
    core: u16,
    minted: u64,
}

impl CSpace {
    pub fn new(core: u16) -> Self {
        CSpace { slots: [Slot { generation: 0, state: State::Unused }; MAX_SLOTS], core, minted: 0 }
    }

    /// A fresh id, never handed out before by this space's core.
    pub fn mint(&mut self) -> CapId {
        self.minted += 1;
        (self.core as u64) << 48 | self.minted
    }

    /// Slot index of a handle whose generation is current, or why not.
    fn index(&self, h: u64) -> Result<usize, CapError> {
        let i = (h & 0xffff) as usize;
        if h & !(0xffff | GEN_MASK << 32) != 0 || i >= MAX_SLOTS {
            return Err(CapError::NoSuchSlot);
        }
        let s = &self.slots[i];
        if (h >> 32) != s.generation {
            // A handle from a generation this slot has not reached yet is forged; one from
            // an earlier generation names a cap that is gone.
            return Err(if (h >> 32) > s.generation {
                CapError::NoSuchSlot
            } else {
                CapError::Revoked
            });
        }
        Ok(i)
    }

    /// Puts `cap` in the lowest free slot, under `id` if given (a copy whose id its sender
    /// minted) or a fresh one; returns (handle, id). The mapping and children are cleared.
    pub fn insert(&mut self, mut cap: Cap, id: Option<CapId>) -> Result<(u64, CapId), CapError> {
        let i = self
            .slots
            .iter()
            .position(|s| !matches!(s.state, State::Live(_)))
            .ok_or(CapError::NoSpace)?;
        cap.id = match id {
            Some(id) => id,
            None => self.mint(),
        };
        cap.mapped_at = None;
        cap.mapped_rights = Rights::empty();
        cap.children = [None; MAX_CHILDREN];
        let s = &mut self.slots[i];
        // A slot that held a cap moves to the next generation, so old handles go stale.
        if s.state != State::Unused {
            s.generation = (s.generation + 1) & GEN_MASK;
        }
        s.state = State::Live(cap);
        Ok((handle(i, s.generation), cap.id))
    }

    pub fn get(&self, h: u64) -> Result<&Cap, CapError> {
        let i = self.index(h)?;
        match &self.slots[i].state {
            State::Live(c) => Ok(c),
            State::Revoked => Err(CapError::Revoked),
            State::Unused | State::Moved => Err(CapError::NoSuchSlot),
        }
    }

    fn get_mut(&mut self, h: u64) -> Result<&mut Cap, CapError> {
        let i = self.index(h)?;
        match &mut self.slots[i].state {
            State::Live(c) => Ok(c),
            State::Revoked => Err(CapError::Revoked),
            State::Unused | State::Moved => Err(CapError::NoSuchSlot),
        }
    }

    /// Every live cap with its handle.
    pub fn live(&self) -> impl Iterator<Item = (u64, &Cap)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| match &s.state {
            State::Live(c) => Some((handle(i, s.generation), c)),
            _ => None,
        })
    }

    /// Splits a memory cap at `offset` bytes: the slot keeps `[base, base + offset)`, a new
    /// slot gets the rest with the same rights, depth and id (a piece of the same node, so
    /// whatever revokes the node reaches both). Returns the new handle.
    pub fn split(&mut self, h: u64, offset: u64) -> Result<u64, CapError> {
        let c = *self.get(h)?;
        if c.kind != CapType::Memory {
            return Err(CapError::WrongType);
        }
        if offset == 0 || offset >= c.size || !offset.is_multiple_of(PAGE) {
            return Err(CapError::BadOffset);
        }
        if c.mapped_at.is_some() {
            return Err(CapError::AlreadyMapped);
        }
        if c.children().next().is_some() {
            return Err(CapError::HasCopies);
        }
        let mut rest = Cap::new(CapType::Memory, c.rights, c.base + offset, c.size - offset);
        rest.depth = c.depth;
        let (new, _) = self.insert(rest, Some(c.id))?;
        self.get_mut(h)?.size = offset;
        Ok(new)
    }

    /// Records that `h` is mapped at `gpa` with `rights` (the caller has checked the
    /// address is free in the guest's map). Checks type, rights and alignment.
    pub fn map(&mut self, h: u64, gpa: u64, rights: Rights) -> Result<Cap, CapError> {
        self.check_map(h, gpa, rights)?;
        let c = self.get_mut(h)?;
        c.mapped_at = Some(gpa);
        c.mapped_rights = rights;
        Ok(*c)
    }

    /// Whether [`Self::map`] of `h` at `gpa` with `rights` would succeed (it changes
    /// nothing): a caller that builds a long mapping in steps checks first and records the
    /// mapping only once it is complete.
    pub fn check_map(&self, h: u64, gpa: u64, rights: Rights) -> Result<Cap, CapError> {
        let c = self.get(h)?;
        if c.kind != CapType::Memory {
            return Err(CapError::WrongType);
        }
        if !c.rights.contains(rights) || !rights.intersects(Rights::READ | Rights::WRITE) {
            return Err(CapError::RightsEscalation);
        }
        if rights.contains(Rights::WRITE) && !rights.contains(Rights::READ) {
            // EPT cannot express write-only.
            return Err(CapError::RightsEscalation);
        }
        if !gpa.is_multiple_of(PAGE) {
            return Err(CapError::Misaligned);
        }
        if c.mapped_at.is_some() {
            return Err(CapError::AlreadyMapped);
        }
        Ok(*c)
    }

    /// Forgets `h`'s mapping; returns the cap as it was (with its old address).
    pub fn unmap(&mut self, h: u64) -> Result<Cap, CapError> {
        let c = self.get_mut(h)?;
        let old = *c;
        if old.mapped_at.is_none() {
            return Err(CapError::NotMapped);
        }
        c.mapped_at = None;
        c.mapped_rights = Rights::empty();
        Ok(old)
    }

    /// Children of node `id` over all its pieces here.
    fn node_children(&self, id: CapId) -> usize {
        self.live().filter(|(_, c)| c.id == id).map(|(_, c)| c.children().count()).sum()
    }

    /// What a copy of `h` with `rights` would be, one level deeper (for the receiving
    /// space to insert). Needs GRANT on the source, no rights it lacks, room for the record.
    pub fn copy_of(&self, h: u64, rights: Rights) -> Result<Cap, CapError> {
        let c = self.get(h)?;
        if !c.rights.contains(Rights::GRANT) || !c.rights.contains(rights) {
            return Err(CapError::RightsEscalation);
        }
        if c.depth >= MAX_DEPTH {
            return Err(CapError::TooDeep);
        }
        if self.node_children(c.id) >= MAX_CHILDREN {
            return Err(CapError::TooManyCopies);
        }
        let mut copy = Cap::new(c.kind, rights, c.base, c.size);
        copy.depth = c.depth + 1;
        Ok(copy)
    }

    /// Records a copy of `h` living at `child`. The protocol records it *before* the copy
    /// is sent, so a revoke of `h` meanwhile reaches it.
    pub fn add_child(&mut self, h: u64, child: Child) -> Result<(), CapError> {
        let id = self.get(h)?.id;
        if self.node_children(id) >= MAX_CHILDREN {
            return Err(CapError::TooManyCopies);
        }
        let c = self.get_mut(h)?;
        let free = c.children.iter_mut().find(|x| x.is_none()).ok_or(CapError::TooManyCopies)?;
        *free = Some(child);
        Ok(())
    }

    /// Forgets the record of `child` wherever it is (a copy that never arrived).
    pub fn remove_child(&mut self, child: Child) {
        for s in self.slots.iter_mut() {
            if let State::Live(c) = &mut s.state {
                for x in c.children.iter_mut() {
                    if *x == Some(child) {
                        *x = None;
                    }
                }
            }
        }
    }

    /// Removes `h` for a move: it must be an original (a copy stays where its parent's
    /// record points), carry GRANT, have no copies and be unmapped (the caller unmaps
    /// first). The slot becomes free.
    pub fn take_for_move(&mut self, h: u64) -> Result<Cap, CapError> {
        self.movable(h)?;
        let c = *self.get(h)?;
        if c.mapped_at.is_some() {
            return Err(CapError::AlreadyMapped);
        }
        let i = self.index(h)?;
        // The next occupant gets a new generation: this handle will not name it.
        self.slots[i].state = State::Moved;
        Ok(c)
    }

    /// Whether `h` may move once unmapped: an original with GRANT and no copies.
    pub fn movable(&self, h: u64) -> Result<(), CapError> {
        let c = self.get(h)?;
        if !c.rights.contains(Rights::GRANT) {
            return Err(CapError::RightsEscalation);
        }
        if c.depth > 0 {
            return Err(CapError::NotOwner);
        }
        if c.children().next().is_some() {
            return Err(CapError::HasCopies);
        }
        Ok(())
    }

    /// Takes the list of copies of `h` (the revoke walk sends each a revoke message).
    pub fn take_children(&mut self, h: u64) -> Result<[Option<Child>; MAX_CHILDREN], CapError> {
        let c = self.get_mut(h)?;
        Ok(core::mem::replace(&mut c.children, [None; MAX_CHILDREN]))
    }

    /// Clears the space of a guest that died, once the copies made from its caps have been
    /// revoked: every copy it held leaves its slot (old handles read `Revoked`; the owner's
    /// later revoke finds nothing here and returns at once), every original stays, unmapped,
    /// for the next incarnation. `unmap` is called for each cap that was mapped. Returns the
    /// copies dropped.
    pub fn retire(&mut self, mut unmap: impl FnMut(&Cap)) -> u32 {
        let mut dropped = 0;
        for s in self.slots.iter_mut() {
            let State::Live(c) = &mut s.state else { continue };
            if c.mapped_at.is_some() {
                unmap(c);
                c.mapped_at = None;
                c.mapped_rights = Rights::empty();
            }
            if c.depth > 0 {
                s.state = State::Revoked;
                dropped += 1;
            }
        }
        dropped
    }

    /// Revokes node `id` in this space (a copy being taken back): every piece's slot becomes
    /// free (old handles read `Revoked`); `unmap` is called for each piece that was mapped
    /// (the caller removes it from the EPT). Returns the pieces removed and their children
    /// for the caller to revoke in turn; nothing if no piece lives here (already gone: a
    /// revoke is idempotent, which is what makes racing revokes safe).
    pub fn revoke_id(&mut self, id: CapId, mut unmap: impl FnMut(&Cap)) -> Removed {
        let mut out = Removed::default();
        let mut next = 0;
        for s in self.slots.iter_mut() {
            let State::Live(c) = s.state else { continue };
            if c.id != id {
                continue;
            }
            if c.mapped_at.is_some() {
                unmap(&c);
            }
            for ch in c.children() {
                // At most MAX_CHILDREN over all pieces (add_child keeps that).
                if let Some(d) = out.children.get_mut(next) {
                    *d = Some(ch);
                    next += 1;
                }
            }
            s.state = State::Revoked;
            out.pieces += 1;
            out.depth = c.depth;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    const RW: Rights = Rights::READ.union(Rights::WRITE);
    const ALL: Rights = Rights::all();

    fn pool(cs: &mut CSpace) -> u64 {
        cs.insert(Cap::new(CapType::Memory, ALL, 0x100_0000, 16 * PAGE), None).unwrap().0
    }

    #[test]
    fn retire_drops_copies_and_unmaps_originals() {
        let mut cs = CSpace::new(1);
        let own = pool(&mut cs);
        let piece = cs.split(own, 4 * PAGE).unwrap();
        cs.map(piece, 0xc000_0000, RW).unwrap();
        let mut copy = Cap::new(CapType::Memory, Rights::READ, 0x200_0000, PAGE);
        copy.depth = 2;
        let (held, _) = cs.insert(copy, Some(7 << 48 | 1)).unwrap();
        cs.map(held, 0xc100_0000, Rights::READ).unwrap();
        let mut unmapped = vec![];
        assert_eq!(cs.retire(|c| unmapped.push((c.base, c.mapped_at))), 1);
        unmapped.sort();
        assert_eq!(
            unmapped,
            [(0x100_0000 + 4 * PAGE, Some(0xc000_0000)), (0x200_0000, Some(0xc100_0000))]
        );
        assert_eq!(cs.get(held), Err(CapError::Revoked), "the copy is gone");
        assert_eq!(cs.get(piece).unwrap().mapped_at, None, "originals stay, unmapped");
        assert_eq!(cs.get(own).unwrap().size, 4 * PAGE);
        assert_eq!(cs.live().count(), 2);
        assert_eq!(cs.retire(|_| panic!("nothing mapped")), 0, "idempotent");
    }

    #[test]
    fn identify_split_map_unmap() {
        let mut cs = CSpace::new(3);
        let s = pool(&mut cs);
        assert_eq!(s, 0);
        assert_eq!(cs.get(s).unwrap().identify(), 1 | 7 << 8 | 16 << 16);
        assert_eq!(cs.get(s).unwrap().id >> 48, 3);
        let t = cs.split(s, 4 * PAGE).unwrap();
        assert_eq!(t, 1);
        assert_eq!((cs.get(s).unwrap().size, cs.get(t).unwrap().size), (4 * PAGE, 12 * PAGE));
        assert_eq!(cs.get(t).unwrap().base, 0x100_0000 + 4 * PAGE);
        assert_eq!(cs.get(t).unwrap().id, cs.get(s).unwrap().id, "pieces share the node id");
        assert_eq!(cs.split(s, 3), Err(CapError::BadOffset));
        assert_eq!(cs.split(s, 4 * PAGE), Err(CapError::BadOffset));
        assert_eq!(cs.split(s, 0), Err(CapError::BadOffset));
        assert_eq!(cs.map(t, 0xc000_0000, RW).unwrap().mapped_rights, RW, "read-write maps");
        cs.unmap(t).unwrap();
        assert_eq!(cs.map(t, 0xc000_0000, Rights::WRITE), Err(CapError::RightsEscalation));
        cs.map(t, 0xc000_0000, Rights::READ).unwrap();
        assert_eq!(cs.map(t, 0xc000_0000, Rights::READ), Err(CapError::AlreadyMapped));
        assert_eq!(cs.split(t, PAGE), Err(CapError::AlreadyMapped));
        assert_eq!(cs.unmap(t).unwrap().mapped_at, Some(0xc000_0000));
        assert_eq!(cs.unmap(t), Err(CapError::NotMapped));
        assert_eq!(cs.map(t, 0xc000_0001, Rights::READ), Err(CapError::Misaligned));
        assert_eq!(cs.map(t, 0xc000_0000, Rights::WRITE), Err(CapError::RightsEscalation));
        assert_eq!(cs.map(t, 0xc000_0000, Rights::GRANT), Err(CapError::RightsEscalation));
        assert_eq!(cs.map(t, 0xc000_0000, Rights::empty()), Err(CapError::RightsEscalation));
        let ep = cs.insert(Cap::new(CapType::Endpoint, RW, 0, 0), None).unwrap().0;
        assert_eq!(cs.map(ep, 0xc000_0000, Rights::READ), Err(CapError::WrongType));
        assert_eq!(cs.split(ep, PAGE), Err(CapError::WrongType));
        assert_eq!(cs.get(63), Err(CapError::NoSuchSlot));
        assert_eq!(cs.get(64), Err(CapError::NoSuchSlot));
        assert_eq!(cs.get(u64::MAX), Err(CapError::NoSuchSlot));
        assert_eq!(cs.get(1 << 16), Err(CapError::NoSuchSlot), "bits between index and gen");
        assert_eq!(cs.get(1 << 32), Err(CapError::NoSuchSlot), "a future generation");
    }

    #[test]
    fn copies_need_grant_never_gain_rights_and_go_only_so_deep() {
        let mut cs = CSpace::new(0);
        let s = cs.insert(Cap::new(CapType::Memory, RW, 0, PAGE), None).unwrap().0;
        assert_eq!(cs.copy_of(s, Rights::READ), Err(CapError::RightsEscalation), "no GRANT");
        let g = pool(&mut cs);
        assert_eq!(cs.copy_of(g, ALL).unwrap().depth, 1);
        let c = cs.copy_of(g, Rights::READ).unwrap();
        assert_eq!(c.rights, Rights::READ);
        let mut other = CSpace::new(1);
        let id = cs.mint();
        let (slot, got) = other.insert(c, Some(id)).unwrap();
        assert_eq!(got, id, "the sender's id travels with the copy");
        assert_eq!(other.copy_of(slot, Rights::READ), Err(CapError::RightsEscalation));
        assert_eq!(other.map(slot, 0, RW), Err(CapError::RightsEscalation));
        cs.add_child(g, Child { core: 1, id }).unwrap();
        assert_eq!(cs.take_for_move(g), Err(CapError::HasCopies));
        assert_eq!(cs.split(g, PAGE), Err(CapError::HasCopies));
        // Depth: copies of copies stop at MAX_DEPTH.
        let mut d = cs.insert(Cap::new(CapType::Memory, ALL, 0, PAGE), None).unwrap().0;
        for level in 1..=MAX_DEPTH {
            let c = cs.copy_of(d, ALL).unwrap();
            assert_eq!(c.depth, level);
            d = cs.insert(c, None).unwrap().0;
        }
        assert_eq!(cs.copy_of(d, ALL), Err(CapError::TooDeep));
        // A copy cannot move, even with GRANT.
        assert_eq!(cs.take_for_move(d), Err(CapError::NotOwner));
        // Revoke at the copy's space: the slot goes stale, then it is idempotent.
        let r = other.revoke_id(id, |_| {});
        assert_eq!(r.pieces, 1);
        assert_eq!(other.get(slot), Err(CapError::Revoked));
        assert_eq!(other.revoke_id(id, |_| {}).pieces, 0);
    }

    #[test]
    fn revoked_slots_are_reused_and_old_handles_stay_stale() {
        let mut cs = CSpace::new(0);
        let mut ids = vec![];
        for _ in 0..MAX_SLOTS {
            let id = cs.mint();
            cs.insert(Cap::new(CapType::Memory, RW, 0, PAGE), Some(id)).unwrap();
            ids.push(id);
        }
        let c = Cap::new(CapType::Memory, RW, 0, PAGE);
        assert_eq!(cs.insert(c, None), Err(CapError::NoSpace));
        // Revoke and refill many times over: the space never fills with tombstones.
        let mut h = 5;
        for round in 0..1000u64 {
            let id = cs.get(h).unwrap().id;
            assert_eq!(cs.revoke_id(id, |_| {}).pieces, 1);
            assert_eq!(cs.get(h), Err(CapError::Revoked), "round {round}");
            let (nh, _) = cs.insert(c, None).unwrap();
            assert_eq!(nh & 0xffff, 5, "the freed slot is reused");
            assert_ne!(nh, h);
            assert_eq!(cs.get(h), Err(CapError::Revoked), "the old handle stays stale");
            assert!(cs.get(nh).is_ok());
            h = nh;
        }
        // A moved-away slot: its old handle does not name the next occupant.
        let old = h;
        let g = cs.insert(Cap::new(CapType::Memory, ALL, 0, PAGE), None);
        assert_eq!(g, Err(CapError::NoSpace));
        let id = cs.get(old).unwrap().id;
        cs.revoke_id(id, |_| {});
        let (g, _) = cs.insert(Cap::new(CapType::Memory, ALL, 0, PAGE), None).unwrap();
        cs.take_for_move(g).unwrap();
        assert_eq!(cs.get(g), Err(CapError::NoSuchSlot), "moved away");
        let (n, _) = cs.insert(c, None).unwrap();
        assert_ne!(n, g);
        assert_eq!(cs.get(g), Err(CapError::Revoked));
    }

    #[test]
    fn split_pieces_of_a_copy_are_revoked_together() {
        let mut owner = CSpace::new(0);
        let mut holder = CSpace::new(1);
        let root = pool(&mut owner);
        let copy = owner.copy_of(root, Rights::READ).unwrap();
        let id = owner.mint();
        owner.add_child(root, Child { core: 1, id }).unwrap();
        let (h, _) = holder.insert(copy, Some(id)).unwrap();
        let p2 = holder.split(h, 4 * PAGE).unwrap();
        let p3 = holder.split(p2, 4 * PAGE).unwrap();
        holder.map(p3, 0xc000_0000, Rights::READ).unwrap();
        let mut unmapped = vec![];
        let r = holder.revoke_id(id, |c| unmapped.push(c.mapped_at));
        assert_eq!(r.pieces, 3);
        assert_eq!(unmapped, [Some(0xc000_0000)]);
        assert_eq!(holder.live().count(), 0);
        for x in [h, p2, p3] {
            assert_eq!(holder.get(x), Err(CapError::Revoked));
        }
    }

    #[test]
    fn children_are_counted_per_node_and_can_be_forgotten() {
        let mut cs = CSpace::new(0);
        let root = pool(&mut cs);
        let other = cs.split(root, PAGE).unwrap();
        for i in 0..MAX_CHILDREN as u64 {
            let on = if i % 2 == 0 { root } else { other };
            cs.copy_of(on, Rights::READ).unwrap();
            cs.add_child(on, Child { core: 1, id: 100 + i }).unwrap();
        }
        assert_eq!(cs.copy_of(root, Rights::READ), Err(CapError::TooManyCopies));
        assert_eq!(cs.add_child(other, Child { core: 1, id: 1 }), Err(CapError::TooManyCopies));
        cs.remove_child(Child { core: 1, id: 100 });
        assert!(cs.copy_of(root, Rights::READ).is_ok());
        let id = cs.get(root).unwrap().id;
        let r = cs.revoke_id(id, |_| {});
        assert_eq!(r.children.iter().flatten().count(), MAX_CHILDREN - 1);
    }

    // ---- Property test against a reference model --------------------------------------

    /// (id, base, size, rights, mapped rights, depth)
    type Entry = (CapId, u64, u64, Rights, Option<Rights>, u8);

    /// The reference: a flat list of caps with explicit parent links (what the CSpace's
    /// records must be equivalent to).
    #[derive(Clone, Debug, Default)]
    struct Model {
        /// handle -> (space, id, base, size, rights, mapped rights, depth)
        caps: HashMap<(usize, u64), Entry>,
        /// child node -> (its parent node, the space and handle of the piece copied from)
        parent: HashMap<CapId, (CapId, (usize, u64))>,
    }

    #[derive(Debug, Clone)]
    enum Op {
        Split(usize, u8, u8),
        Map(usize, u8, u8, u8),
        Unmap(usize, u8),
        Copy(usize, u8, u8),
        Move(usize, u8),
        Revoke(usize, u8),
        Forge(usize, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let sp = 0usize..3;
        prop_oneof![
            (sp.clone(), any::<u8>(), 0u8..20).prop_map(|(a, s, o)| Op::Split(a, s, o)),
            (sp.clone(), any::<u8>(), 0u8..8, 0u8..8).prop_map(|(a, s, g, r)| Op::Map(a, s, g, r)),
            (sp.clone(), any::<u8>()).prop_map(|(a, s)| Op::Unmap(a, s)),
            (sp.clone(), any::<u8>(), 0u8..8).prop_map(|(a, s, r)| Op::Copy(a, s, r)),
            (sp.clone(), any::<u8>()).prop_map(|(a, s)| Op::Move(a, s)),
            (sp.clone(), any::<u8>()).prop_map(|(a, s)| Op::Revoke(a, s)),
            (sp, any::<u64>()).prop_map(|(a, h)| Op::Forge(a, h)),
        ]
    }

    fn pick(cs: &CSpace, s: u8) -> Option<u64> {
        let v: Vec<u64> = cs.live().map(|(h, _)| h).collect();
        (!v.is_empty()).then(|| v[s as usize % v.len()])
    }

    /// Every node descending from copies of the piece `(space, handle)`.
    fn descendants(m: &Model, piece: (usize, u64)) -> HashSet<CapId> {
        let mut d: HashSet<CapId> =
            m.parent.iter().filter(|(_, p)| p.1 == piece).map(|(c, _)| *c).collect();
        loop {
            let more: Vec<CapId> = m
                .parent
                .iter()
                .filter(|(c, p)| d.contains(&p.0) && !d.contains(*c))
                .map(|(c, _)| *c)
                .collect();
            if more.is_empty() {
                return d;
            }
            d.extend(more);
        }
    }

    proptest! {
        /// Random operations on three spaces, the protocol's steps played out in order.
        /// Checked after every step, against the model: the same caps live with the same
        /// rights and ranges; rights never grow along a parent link; mapped rights are
        /// within rights; depth is the parent's plus one; no node has more than
        /// MAX_CHILDREN children; after a revoke no descendant of the revoked node lives
        /// anywhere (split, copied on, or both) and its mappings were all removed.
        #[test]
        fn capability_space_matches_the_reference(ops in prop::collection::vec(op(), 1..80)) {
            let mut sp = [CSpace::new(0), CSpace::new(1), CSpace::new(2)];
            let mut m = Model::default();
            let mut mapped: HashSet<(usize, u64)> = HashSet::new();
            let root = pool(&mut sp[0]);
            let c = *sp[0].get(root).unwrap();
            m.caps.insert((0, root), (c.id, c.base, c.size, c.rights, None, 0));
            for op in ops {
                match op {
                    Op::Split(a, s, o) => {
                        let Some(h) = pick(&sp[a], s) else { continue };
                        let before = *sp[a].get(h).unwrap();
                        if let Ok(n) = sp[a].split(h, o as u64 * PAGE) {
                            let off = o as u64 * PAGE;
                            prop_assert!(before.mapped_at.is_none());
                            prop_assert!(before.children().next().is_none());
                            let e = m.caps.get_mut(&(a, h)).unwrap();
                            e.2 = off;
                            m.caps.insert((a, n), (before.id, before.base + off, before.size - off, before.rights, None, before.depth));
                        }
                    }
                    Op::Map(a, s, g, r) => {
                        let Some(h) = pick(&sp[a], s) else { continue };
                        let r = Rights::from_bits_truncate(r);
                        if sp[a].map(h, 0xc000_0000 + g as u64 * PAGE, r).is_ok() {
                            let e = m.caps.get_mut(&(a, h)).unwrap();
                            prop_assert!(e.3.contains(r) && e.4.is_none());
                            e.4 = Some(r);
                            mapped.insert((a, h));
                        }
                    }
                    Op::Unmap(a, s) => {
                        let Some(h) = pick(&sp[a], s) else { continue };
                        if sp[a].unmap(h).is_ok() {
                            m.caps.get_mut(&(a, h)).unwrap().4 = None;
                            mapped.remove(&(a, h));
                        }
                    }
                    Op::Copy(a, s, r) => {
                        let Some(h) = pick(&sp[a], s) else { continue };
                        let to = (a + 1 + (s as usize % 2)) % 3;
                        let r = Rights::from_bits_truncate(r);
                        if let Ok(c) = sp[a].copy_of(h, r) {
                            let id = sp[a].mint();
                            // Recorded before it is sent, as the protocol does.
                            sp[a].add_child(h, Child { core: to as u16, id }).unwrap();
                            match sp[to].insert(c, Some(id)) {
                                Ok((nh, _)) => {
                                    let src = m.caps[&(a, h)];
                                    m.parent.insert(id, (src.0, (a, h)));
                                    m.caps.insert((to, nh), (id, c.base, c.size, r, None, src.5 + 1));
                                }
                                Err(_) => sp[a].remove_child(Child { core: to as u16, id }),
                            }
                        }
                    }
                    Op::Move(a, s) => {
                        let Some(h) = pick(&sp[a], s) else { continue };
                        let to = (a + 1 + (s as usize % 2)) % 3;
                        if let Ok(c) = sp[a].take_for_move(h) {
                            let e = m.caps.remove(&(a, h)).unwrap();
                            prop_assert_eq!(e.5, 0, "only originals move");
                            if let Ok((nh, id)) = sp[to].insert(c, None) {
                                m.caps.insert((to, nh), (id, c.base, c.size, c.rights, None, 0));
                            }
                        }
                    }
                    Op::Revoke(a, s) => {
                        let Some(h) = pick(&sp[a], s) else { continue };
                        let gone = descendants(&m, (a, h));
                        // Walk: revoke every child node, recursively, in every space.
                        let mut todo: Vec<Child> = sp[a].take_children(h).unwrap().into_iter().flatten().collect();
                        while let Some(ch) = todo.pop() {
                            let core = ch.core as usize;
                            let mut un = vec![];
                            let r = sp[core].revoke_id(ch.id, |c| un.push(c.mapped_at.unwrap()));
                            for (hh, e) in m.caps.clone() {
                                if hh.0 == core && e.0 == ch.id {
                                    m.caps.remove(&hh);
                                    mapped.remove(&hh);
                                }
                            }
                            todo.extend(r.children.into_iter().flatten());
                        }
                        // No descendant of the piece lives anywhere, nor is mapped.
                        for (hh, e) in &m.caps {
                            prop_assert!(!gone.contains(&e.0), "descendant {:?} survived", hh);
                        }
                        prop_assert!(mapped.iter().all(|k| m.caps.contains_key(k)));
                    }
                    Op::Forge(a, h) => {
                        let known = m.caps.contains_key(&(a, h));
                        prop_assert_eq!(sp[a].get(h).is_ok(), known);
                    }
                }
                // The spaces hold exactly the model's caps.
                for (i, s) in sp.iter().enumerate() {
                    let live: HashMap<u64, Cap> = s.live().map(|(h, c)| (h, *c)).collect();
                    prop_assert_eq!(live.len(), m.caps.keys().filter(|k| k.0 == i).count());
                    for (h, c) in live {
                        let e = m.caps[&(i, h)];
                        prop_assert_eq!((c.id, c.base, c.size, c.rights, c.depth), (e.0, e.1, e.2, e.3, e.5));
                        prop_assert_eq!(c.mapped_at.map(|_| c.mapped_rights), e.4);
                        prop_assert!(c.rights.contains(c.mapped_rights));
                        prop_assert!(c.depth <= MAX_DEPTH);
                        if let Some((p, _)) = m.parent.get(&c.id) {
                            // Rights never grow: every live piece of the parent has at least these.
                            for (_, pc) in m.caps.iter().filter(|(_, pe)| pe.0 == *p) {
                                prop_assert!(pc.3.contains(c.rights));
                                prop_assert_eq!(pc.5 + 1, c.depth);
                            }
                        }
                        let kids: usize = sp.iter().map(|x| x.node_children(c.id)).max().unwrap_or(0);
                        prop_assert!(kids <= MAX_CHILDREN);
                    }
                }
            }
        }

        /// Any handle a guest may pass gives a cap or an error, never a panic.
        #[test]
        fn forged_handles_are_errors(h: u64, off: u64, gpa: u64, r: u8) {
            let mut cs = CSpace::new(0);
            pool(&mut cs);
            let _ = cs.get(h);
            let _ = cs.split(h, off);
            let _ = cs.map(h, gpa, Rights::from_bits_truncate(r));
            let _ = cs.unmap(h);
            let _ = cs.copy_of(h, Rights::from_bits_truncate(r));
            let _ = cs.take_for_move(h);
            let _ = cs.take_children(h);
            prop_assert!(h == 0 || cs.get(h).is_err());
        }
    }
}
