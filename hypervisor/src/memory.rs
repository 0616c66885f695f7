// SPDX-License-Identifier: MIT OR Apache-2.0
//! Physical memory for partitions: the usable RAM of the memory map minus everything that
//! is already someone's (the hypervisor image, multiboot2 modules and information, the
//! first MiB with the AP trampoline), clipped to what the hypervisor's identity map reaches.
//! The BSP carves every partition at boot, before any guest runs; afterwards each region
//! belongs to one core.

/// Most free ranges tracked.
const MAX_RANGES: usize = 64;
/// The hypervisor maps the first 4 GiB; partitions must be reachable.
pub const LIMIT: u64 = 4 << 30;
/// Below this nothing is handed out (real-mode area, trampoline, BIOS data).
pub const FLOOR: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

/// A first-fit allocator over free physical ranges.
#[derive(Clone, Debug)]
pub struct PhysAlloc {
    free: [Range; MAX_RANGES],
    n: usize,
}

impl PhysAlloc {
    /// Free memory = `usable` minus `taken`, within [`FLOOR`, [`LIMIT`]).
    pub fn new(usable: impl Iterator<Item = Range>, taken: &[Range]) -> Self {
        let mut a = PhysAlloc { free: [Range { start: 0, end: 0 }; MAX_RANGES], n: 0 };
        for r in usable {
            a.add(Range { start: r.start.max(FLOOR), end: r.end.min(LIMIT) });
        }
        for t in taken {
            a.remove(*t);
        }
        a
    }

    fn add(&mut self, r: Range) {
        if r.start < r.end && self.n < MAX_RANGES {
            self.free[self.n] = r;
            self.n += 1;
        }
    }

    /// Removes `t` from every free range (splitting one if `t` is inside it).
    fn remove(&mut self, t: Range) {
        let mut i = 0;
        while i < self.n {
            let r = self.free[i];
            if t.end <= r.start || r.end <= t.start {
                i += 1;
                continue;
            }
            let (left, right) =
                (Range { start: r.start, end: t.start }, Range { start: t.end, end: r.end });
            self.free[i] = self.free[self.n - 1];
            self.n -= 1;
            self.add(left);
            self.add(right);
        }
    }

    /// `size` bytes aligned to `align` (a power of two), lowest address first.
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let best = (0..self.n)
            .filter_map(|i| {
                let r = self.free[i];
                let start = r.start.checked_add(align - 1)? & !(align - 1);
                (start.checked_add(size)? <= r.end).then_some(start)
            })
            .min()?;
        self.remove(Range { start: best, end: best + size });
        Some(best)
    }

    pub fn free_bytes(&self) -> u64 {
        self.free[..self.n].iter().map(|r| r.end - r.start).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn taken_memory_is_never_handed_out() {
        let usable = [Range { start: 0, end: 0x9f000 }, Range { start: MB, end: 256 * MB }];
        let taken = [Range { start: MB, end: 5 * MB }, Range { start: 9 * MB, end: 9 * MB + 4096 }];
        let mut a = PhysAlloc::new(usable.into_iter(), &taken);
        assert_eq!(a.free_bytes(), 256 * MB - 5 * MB - 4096);
        let p = a.alloc(4 * MB, 2 * MB).unwrap();
        assert_eq!(p, 10 * MB, "6..10 MiB would cross the taken page at 9 MiB");
        let q = a.alloc(2 * MB, 2 * MB).unwrap();
        assert_eq!(q, 6 * MB);
        assert!(a.alloc(1 << 40, 2 * MB).is_none());
    }

    proptest! {
        #[test]
        fn allocations_are_disjoint_aligned_and_free(
            sizes in prop::collection::vec(1u64..64, 1..20),
            taken_at in prop::collection::vec(0u64..256, 0..6),
        ) {
            let usable = [Range { start: 0, end: 256 * MB }];
            let taken: Vec<Range> = taken_at.iter().map(|t| Range { start: t * MB, end: t * MB + MB / 2 }).collect();
            let mut a = PhysAlloc::new(usable.into_iter(), &taken);
            let mut got: Vec<Range> = Vec::new();
            for s in sizes {
                if let Some(p) = a.alloc(s * MB, 2 * MB) {
                    let r = Range { start: p, end: p + s * MB };
                    prop_assert_eq!(p % (2 * MB), 0);
                    prop_assert!(p >= FLOOR && r.end <= LIMIT);
                    for o in got.iter().chain(taken.iter()) {
                        prop_assert!(r.end <= o.start || o.end <= r.start, "{:?} overlaps {:?}", r, o);
                    }
                    got.push(r);
                }
            }
        }
    }
}
