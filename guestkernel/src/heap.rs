// SPDX-License-Identifier: MIT OR Apache-2.0
//! The guest's heap, so that `alloc` (`Box`, `Vec`, `format!`) works in a guest: a
//! linked-list allocator (`linked_list_allocator`) over the partition's memory above the
//! kernel image, from the linker script's `__guest_end` to the end of the partition. The
//! runtime sets it up before the guest's entry; only the one vCPU uses it.

use linked_list_allocator::LockedHeap;

#[cfg_attr(target_os = "none", global_allocator)]
static HEAP: LockedHeap = LockedHeap::empty();

/// Gives the allocator `[image end, memory_bytes)`. Called once by the runtime at boot.
#[cfg(target_os = "none")]
pub(crate) fn init(memory_bytes: u64) {
    extern "C" {
        static __guest_end: u8;
    }
    let start = (core::ptr::addr_of!(__guest_end) as u64 + 4095) & !4095;
    if memory_bytes > start {
        // The range is this partition's RAM above the image: mapped (the runtime's page
        // tables identity-map the first GiB), unused by anything else, never freed.
        // SAFETY: see above; init runs once, before anything allocates.
        unsafe { HEAP.lock().init(start as *mut u8, (memory_bytes - start) as usize) };
    }
}

/// Heap bytes not allocated now.
pub fn free_bytes() -> usize {
    HEAP.lock().free()
}

/// Heap bytes in all.
pub fn size_bytes() -> usize {
    HEAP.lock().size()
}
