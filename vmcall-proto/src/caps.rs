// SPDX-License-Identifier: MIT OR Apache-2.0
//! Capabilities: typed, rights-carrying references to memory regions and channel endpoints,
//! after Barrelfish's capability system, kept small.
//!
//! Each guest has a capability space ([`CSpace`]) owned by its core's hypervisor instance:
//! no other core reads or writes it. Slots are small integers the guest names its caps by;
//! a slot whose cap was revoked keeps a tombstone, so a stale slot number gives
//! [`CapError::Revoked`], never someone else's cap. Every capability has an id minted by the
//! core that created it (`core << 48 | counter`: unique without a shared counter), and
//! records the copies made from it (core and id of each child), which is what a revoke
//! walks.
//!
//! Invariants kept by [`CSpace`] (and checked by the property tests):
//! * rights never grow: a copy or a mapping has at most the source's rights;
//! * a region is mapped at most once per space, only at a free, aligned guest address;
//! * split needs an unmapped cap without copies, and the halves exactly cover the original.

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapType {
    /// A region of physical memory (`base`, `size`: host-physical, page-aligned).
    Memory = 1,
    /// A channel endpoint (`base` is the channel's number in the guest's table).
    Endpoint = 2,
}

/// Slots per capability space.
pub const MAX_SLOTS: usize = 64;
/// Copies recorded per capability.
pub const MAX_CHILDREN: usize = 16;
/// Page size for regions, splits and mappings.
pub const PAGE: u64 = 4096;

/// A capability id: `core << 48 | counter`, minted by the creating core.
pub type CapId = u64;

/// A copy made from a capability: which core's space holds it, under which id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Child {
    pub core: u16,
    pub id: CapId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    pub kind: CapType,
    pub rights: Rights,
    pub id: CapId,
    pub base: u64,
    pub size: u64,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Empty,
    Live(Cap),
    Revoked,
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
}

/// One guest's capability space.
#[derive(Clone, Debug)]
pub struct CSpace {
    slots: [Slot; MAX_SLOTS],
    core: u16,
    minted: u64,
}

impl CSpace {
    pub fn new(core: u16) -> Self {
        CSpace { slots: [Slot::Empty; MAX_SLOTS], core, minted: 0 }
    }

    fn mint(&mut self) -> CapId {
        self.minted += 1;
        (self.core as u64) << 48 | self.minted
    }

    /// Puts `cap` in the lowest free slot under a fresh id; returns (slot, id).
    pub fn insert(&mut self, mut cap: Cap) -> Result<(u32, CapId), CapError> {
        let slot = self.slots.iter().position(|s| *s == Slot::Empty).ok_or(CapError::NoSpace)?;
        cap.id = self.mint();
        cap.mapped_at = None;
        cap.mapped_rights = Rights::empty();
        cap.children = [None; MAX_CHILDREN];
        self.slots[slot] = Slot::Live(cap);
        Ok((slot as u32, cap.id))
    }

    pub fn get(&self, slot: u64) -> Result<&Cap, CapError> {
        match self.slots.get(usize::try_from(slot).map_err(|_| CapError::NoSuchSlot)?) {
            Some(Slot::Live(c)) => Ok(c),
            Some(Slot::Revoked) => Err(CapError::Revoked),
            _ => Err(CapError::NoSuchSlot),
        }
    }

    fn get_mut(&mut self, slot: u64) -> Result<&mut Cap, CapError> {
        match self.slots.get_mut(usize::try_from(slot).map_err(|_| CapError::NoSuchSlot)?) {
            Some(Slot::Live(c)) => Ok(c),
            Some(Slot::Revoked) => Err(CapError::Revoked),
            _ => Err(CapError::NoSuchSlot),
        }
    }

    pub fn slot_of(&self, id: CapId) -> Option<u32> {
        self.slots.iter().position(|s| matches!(s, Slot::Live(c) if c.id == id)).map(|i| i as u32)
    }

    pub fn live(&self) -> impl Iterator<Item = (u32, &Cap)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| match s {
            Slot::Live(c) => Some((i as u32, c)),
            _ => None,
        })
    }

    /// Splits a memory cap at `offset` bytes: the slot keeps `[base, base + offset)`, a new
    /// slot gets the rest with the same rights. Returns the new slot.
    pub fn split(&mut self, slot: u64, offset: u64) -> Result<u32, CapError> {
        let c = *self.get(slot)?;
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
        let rest = Cap::new(CapType::Memory, c.rights, c.base + offset, c.size - offset);
        let (new, _) = self.insert(rest)?;
        self.get_mut(slot)?.size = offset;
        Ok(new)
    }

    /// Records that `slot` is mapped at `gpa` with `rights` (the caller has checked the
    /// address is free in the guest's map). Checks type, rights and alignment.
    pub fn map(&mut self, slot: u64, gpa: u64, rights: Rights) -> Result<Cap, CapError> {
        let c = self.get_mut(slot)?;
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
        c.mapped_at = Some(gpa);
        c.mapped_rights = rights;
        Ok(*c)
    }

    /// Forgets `slot`'s mapping; returns the cap as it was (with its old address).
    pub fn unmap(&mut self, slot: u64) -> Result<Cap, CapError> {
        let c = self.get_mut(slot)?;
        let old = *c;
        if old.mapped_at.is_none() {
            return Err(CapError::NotMapped);
        }
        c.mapped_at = None;
        c.mapped_rights = Rights::empty();
        Ok(old)
    }

    /// What a copy of `slot` with `rights` would be (for the receiving space to insert).
    /// Needs GRANT on the source and no rights it lacks.
    pub fn copy_of(&self, slot: u64, rights: Rights) -> Result<Cap, CapError> {
        let c = self.get(slot)?;
        if !c.rights.contains(Rights::GRANT) || !c.rights.contains(rights) {
            return Err(CapError::RightsEscalation);
        }
        if c.children().count() == MAX_CHILDREN {
            return Err(CapError::TooManyCopies);
        }
        Ok(Cap::new(c.kind, rights, c.base, c.size))
    }

    /// Records a copy of `slot` now living at `child`.
    pub fn add_child(&mut self, slot: u64, child: Child) -> Result<(), CapError> {
        let c = self.get_mut(slot)?;
        let free = c.children.iter_mut().find(|x| x.is_none()).ok_or(CapError::TooManyCopies)?;
        *free = Some(child);
        Ok(())
    }

    /// Removes `slot` for a move: it must have GRANT, no copies, and be unmapped (the
    /// caller unmaps first). The slot becomes free.
    pub fn take_for_move(&mut self, slot: u64) -> Result<Cap, CapError> {
        let c = *self.get(slot)?;
        if !c.rights.contains(Rights::GRANT) {
            return Err(CapError::RightsEscalation);
        }
        if c.children().next().is_some() {
            return Err(CapError::HasCopies);
        }
        if c.mapped_at.is_some() {
            return Err(CapError::AlreadyMapped);
        }
        self.slots[slot as usize] = Slot::Empty;
        Ok(c)
    }

    /// Takes the list of copies of `slot` (the revoke walk sends each a revoke message).
    pub fn take_children(&mut self, slot: u64) -> Result<[Option<Child>; MAX_CHILDREN], CapError> {
        let c = self.get_mut(slot)?;
        Ok(core::mem::replace(&mut c.children, [None; MAX_CHILDREN]))
    }

    /// Revokes the cap with `id` in this space (a copy being taken back): the slot becomes
    /// a tombstone. Returns the cap as it was (mapping and children, for the caller to undo
    /// and to forward the revoke), or `None` if no such cap lives here (already gone: a
    /// revoke is idempotent, which is what makes racing revokes safe).
    pub fn revoke_id(&mut self, id: CapId) -> Option<Cap> {
        let slot = self.slot_of(id)? as usize;
        let Slot::Live(c) = self.slots[slot] else { return None };
        self.slots[slot] = Slot::Revoked;
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RW: Rights = Rights::READ.union(Rights::WRITE);
    const ALL: Rights = Rights::all();

    fn pool(cs: &mut CSpace) -> u64 {
        cs.insert(Cap::new(CapType::Memory, ALL, 0x100_0000, 16 * PAGE)).unwrap().0 as u64
    }

    #[test]
    fn identify_split_map_unmap() {
        let mut cs = CSpace::new(3);
        let s = pool(&mut cs);
        assert_eq!(cs.get(s).unwrap().identify(), 1 | 7 << 8 | 16 << 16);
        assert_eq!(cs.get(s).unwrap().id >> 48, 3);
        let t = cs.split(s, 4 * PAGE).unwrap() as u64;
        assert_eq!((cs.get(s).unwrap().size, cs.get(t).unwrap().size), (4 * PAGE, 12 * PAGE));
        assert_eq!(cs.get(t).unwrap().base, 0x100_0000 + 4 * PAGE);
        assert_eq!(cs.split(s, 3), Err(CapError::BadOffset));
        assert_eq!(cs.split(s, 4 * PAGE), Err(CapError::BadOffset));
        cs.map(t, 0xc000_0000, Rights::READ).unwrap();
        assert_eq!(cs.map(t, 0xc000_0000, Rights::READ), Err(CapError::AlreadyMapped));
        assert_eq!(cs.split(t, PAGE), Err(CapError::AlreadyMapped));
        assert_eq!(cs.unmap(t).unwrap().mapped_at, Some(0xc000_0000));
        assert_eq!(cs.unmap(t), Err(CapError::NotMapped));
        assert_eq!(cs.map(t, 0xc000_0001, Rights::READ), Err(CapError::Misaligned));
        assert_eq!(cs.map(t, 0xc000_0000, Rights::WRITE), Err(CapError::RightsEscalation));
        assert_eq!(cs.get(99), Err(CapError::NoSuchSlot));
        assert_eq!(cs.get(u64::MAX), Err(CapError::NoSuchSlot));
    }

    #[test]
    fn copies_need_grant_and_never_gain_rights() {
        let mut cs = CSpace::new(0);
        let s = cs.insert(Cap::new(CapType::Memory, RW, 0, PAGE)).unwrap().0 as u64;
        assert_eq!(cs.copy_of(s, Rights::READ), Err(CapError::RightsEscalation), "no GRANT");
        let g = pool(&mut cs);
        let c = cs.copy_of(g, Rights::READ).unwrap();
        assert_eq!(c.rights, Rights::READ);
        let mut other = CSpace::new(1);
        let (slot, id) = other.insert(c).unwrap();
        assert_eq!(other.copy_of(slot as u64, Rights::READ), Err(CapError::RightsEscalation));
        assert_eq!(other.map(slot as u64, 0, RW), Err(CapError::RightsEscalation));
        cs.add_child(g, Child { core: 1, id }).unwrap();
        assert_eq!(cs.take_for_move(g), Err(CapError::HasCopies));
        assert_eq!(cs.split(g, PAGE), Err(CapError::HasCopies));
        // Revoke at the copy's space: tombstone, then idempotent.
        assert!(other.revoke_id(id).is_some());
        assert_eq!(other.get(slot as u64), Err(CapError::Revoked));
        assert!(other.revoke_id(id).is_none());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Split(u8, u8),
        Map(u8, u8, u8),
        Unmap(u8),
        Copy(u8, u8),
        Revoke(u8),
        Move(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), 0u8..20).prop_map(|(s, o)| Op::Split(s % 8, o)),
            (any::<u8>(), 0u8..8, 0u8..8).prop_map(|(s, a, r)| Op::Map(s % 8, a, r)),
            any::<u8>().prop_map(|s| Op::Unmap(s % 8)),
            (any::<u8>(), 0u8..8).prop_map(|(s, r)| Op::Copy(s % 8, r)),
            any::<u8>().prop_map(|s| Op::Revoke(s % 8)),
            any::<u8>().prop_map(|s| Op::Move(s % 8)),
        ]
    }

    proptest! {
        /// Random operations on two spaces (the owner and a peer it copies/moves to):
        /// rights never grow along any copy; every live memory cap stays inside the pool;
        /// pieces held by the owner never overlap; no cap is mapped with rights it lacks;
        /// after a revoke walk no copy of the revoked cap survives.
        #[test]
        fn capability_invariants(ops in prop::collection::vec(op(), 1..60)) {
            let (mut a, mut b) = (CSpace::new(0), CSpace::new(1));
            let root = pool(&mut a);
            let _ = root;
            for op in ops {
                match op {
                    Op::Split(s, o) => { let _ = a.split(s as u64, o as u64 * PAGE); }
                    Op::Map(s, at, r) => {
                        let r = Rights::from_bits_truncate(r);
                        let before = a.get(s as u64).ok().copied();
                        if let Ok(c) = a.map(s as u64, at as u64 * PAGE, r) {
                            let before = before.unwrap();
                            prop_assert!(before.rights.contains(c.mapped_rights));
                        }
                    }
                    Op::Unmap(s) => { let _ = a.unmap(s as u64); }
                    Op::Copy(s, r) => {
                        let r = Rights::from_bits_truncate(r);
                        if let Ok(c) = a.copy_of(s as u64, r) {
                            prop_assert!(a.get(s as u64).unwrap().rights.contains(c.rights));
                            if let Ok((_, id)) = b.insert(c) {
                                a.add_child(s as u64, Child { core: 1, id }).unwrap();
                            }
                        }
                    }
                    Op::Revoke(s) => {
                        if let Ok(children) = a.take_children(s as u64) {
                            for ch in children.iter().flatten() {
                                b.revoke_id(ch.id);
                                prop_assert!(b.slot_of(ch.id).is_none());
                            }
                        }
                    }
                    Op::Move(s) => {
                        if let Ok(c) = a.take_for_move(s as u64) {
                            prop_assert!(c.rights.contains(Rights::GRANT));
                            prop_assert!(c.mapped_at.is_none());
                            let _ = b.insert(c);
                        }
                    }
                }
                // Pieces in `a` never overlap and stay inside the pool.
                let pieces: Vec<Cap> = a.live().map(|(_, c)| *c).collect();
                for (i, p) in pieces.iter().enumerate() {
                    prop_assert!(p.base >= 0x100_0000 && p.base + p.size <= 0x100_0000 + 16 * PAGE);
                    prop_assert!(p.rights.contains(p.mapped_rights));
                    for q in &pieces[i + 1..] {
                        prop_assert!(p.base + p.size <= q.base || q.base + q.size <= p.base);
                    }
                }
                for (_, c) in b.live() {
                    prop_assert!(c.rights.contains(c.mapped_rights));
                }
            }
        }

        /// Copies of copies across three spaces (the protocol's recursion, played out here):
        /// a revoke at the root leaves no descendant alive anywhere, and every copy along the
        /// way had at most its parent's rights.
        #[test]
        fn revoke_removes_every_descendant(steps in prop::collection::vec((0usize..3, 0usize..3, 0u8..8), 1..40)) {
            let mut spaces = [CSpace::new(0), CSpace::new(1), CSpace::new(2)];
            let root = pool(&mut spaces[0]);
            let root_id = spaces[0].get(root).unwrap().id;
            for (from, to, r) in steps {
                if from == to { continue; }
                let r = Rights::from_bits_truncate(r);
                // Copy from any live cap of `from` that descends from the root.
                let src: Vec<(u32, Rights)> = spaces[from].live().map(|(s, c)| (s, c.rights)).collect();
                let Some(&(slot, rights)) = src.first() else { continue };
                if let Ok(c) = spaces[from].copy_of(slot as u64, r) {
                    prop_assert!(rights.contains(c.rights), "rights grew");
                    if let Ok((_, id)) = spaces[to].insert(c) {
                        spaces[from].add_child(slot as u64, Child { core: to as u16, id }).unwrap();
                    }
                }
            }
            // Revoke at the root: walk the tree through every space, as the cores would.
            fn walk(spaces: &mut [CSpace; 3], children: [Option<Child>; MAX_CHILDREN]) {
                for ch in children.into_iter().flatten() {
                    if let Some(c) = spaces[ch.core as usize].revoke_id(ch.id) {
                        let mut next = [None; MAX_CHILDREN];
                        for (d, x) in next.iter_mut().zip(c.children()) {
                            *d = Some(x);
                        }
                        walk(spaces, next);
                    }
                }
            }
            let slot = spaces[0].slot_of(root_id).unwrap() as u64;
            let children = spaces[0].take_children(slot).unwrap();
            walk(&mut spaces, children);
            prop_assert_eq!(spaces[1].live().count(), 0);
            prop_assert_eq!(spaces[2].live().count(), 0);
            prop_assert!(spaces[0].get(slot).is_ok(), "the root itself stays");
            prop_assert_eq!(spaces[0].live().count(), 1, "copies that came back to the root's space go too");
        }

        /// Any slot number a guest may pass gives a cap or an error, never a panic.
        #[test]
        fn forged_slots_are_errors(slot: u64, off: u64, gpa: u64, r: u8) {
            let mut cs = CSpace::new(0);
            pool(&mut cs);
            let _ = cs.get(slot);
            let _ = cs.split(slot, off);
            let _ = cs.map(slot, gpa, Rights::from_bits_truncate(r));
            let _ = cs.unmap(slot);
            let _ = cs.copy_of(slot, Rights::from_bits_truncate(r));
            let _ = cs.take_for_move(slot);
        }
    }
}
