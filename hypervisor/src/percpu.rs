// SPDX-License-Identifier: MIT OR Apache-2.0
//! Per-core state. Each hypervisor instance owns its [`PerCore`]: the BSP fills in nothing
//! but the slot number it hands an AP, and from then on only that core touches its slot.
//! GS base points at the slot, so `current_index()` is one load.
//!
//! What a core tells the others goes through [`Mailbox`]es (one writer each), never by
//! writing into another core's state.

use crate::arch::gdt::{Gdt, IST_CRITICAL};
use crate::arch::idt::Idt;
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU64, Ordering};
use x86::bits64::task::TaskStateSegment;

/// Most cores the hypervisor will bring up; a machine with more is capped, with a warning.
pub const MAX_CORES: usize = 64;
/// Each core's main stack.
pub const STACK_SIZE: usize = 256 * 1024;
/// Each core's IST stack for #DF, NMI and #MC.
pub const IST_STACK_SIZE: usize = 16 * 1024;

/// One core's own state, whatever the virtualization backend. `index` must stay the first
/// field: it is read as `gs:[0]`; the NMI handler reads `kick_hook` as `gs:[16]`, writes
/// `kicked` as `gs:[24]` and counts `nmis` as `gs:[32]`.
#[repr(C, align(4096))]
pub struct PerCore {
    pub index: u64,
    pub apic_id: u64,
    /// While this core has a guest vCPU set up ([`PerCore::vcpu_live`] ..
    /// [`PerCore::vcpu_gone`]): the address of its backend's kick hook
    /// (`vcpu::Vcpu::KICK_HOOK`), which the NMI handler calls for a kick that arrives in
    /// the hypervisor, so that the next entry exits at once and the inbox is read (see
    /// `arch::idt`). 0 otherwise.
    kick_hook: AtomicU64,
    /// Set by the NMI handler on every kick taken in the hypervisor while a vCPU is live.
    pub kicked: AtomicU64,
    /// NMIs taken while a vCPU is live (every kick: one that exits the guest reaches the
    /// handler too, through `arch::unblock_nmis`). Incremented by the NMI handler only
    /// (on this core, NMIs blocked: no other writer can interleave); its guest's telemetry
    /// reports it, reset when an incarnation starts.
    pub nmis: AtomicU64,
    /// TSC at which this core last served its inbox or left its guest (0: in its guest, or
    /// not started): the start of the stretch it is now away from the inbox.
    away_since: AtomicU64,
    /// The longest such stretch so far, in TSC ticks (reported with its guest).
    away_longest: AtomicU64,
    /// Where the time of a stretch goes: the TSC and [`site`] of the last checkpoint in
    /// the current stretch (the inbox served, the guest left, a [`PerCore::mark`] in a long
    /// path; 0: none), and by the checkpoint a segment ends at, the longest segment so far
    /// and the checkpoint it began at. Only this core writes them.
    seg_at: AtomicU64,
    seg_site: AtomicU64,
    seg_longest: [AtomicU64; site::COUNT],
    seg_from: [AtomicU64; site::COUNT],
    pub idt: Idt,
    pub tss: TaskStateSegment,
    pub gdt: MaybeUninit<Gdt>,
}

/// The checkpoints of [`PerCore::mark`]: where a segment of a stretch away from the inbox
/// begins and ends.
pub mod site {
    pub const POLL: u8 = 0;
    /// The start of a stretch: the inbox served, or the guest left.
    pub const POLL_OR_EXIT: u8 = 1;
    pub const ENTRY: u8 = 2;
    pub const SETUP_PLAN: u8 = 3;
    pub const SETUP_KERNEL: u8 = 4;
    pub const SETUP_PAGE_TABLES: u8 = 5;
    pub const SETUP_EPT: u8 = 6;
    pub const SETUP_DEVICES: u8 = 7;
    pub const SETUP_STATUS: u8 = 8;
    pub const SETUP_VMCS: u8 = 9;
    pub const SETUP_DONE: u8 = 10;
    pub const ENTERING: u8 = 11;
    pub const DEATH: u8 = 12;
    pub const DEATH_QUIESCE: u8 = 13;
    pub const DEATH_ACCOUNT: u8 = 14;
    pub const DEATH_RETIRE: u8 = 15;
    pub const DEATH_LINKS_DOWN: u8 = 16;
    pub const DEATH_CLEAR_VMCS: u8 = 17;
    pub const DEATH_RECORD: u8 = 18;
    /// A part of the incarnation record formatted (the inbox is served next).
    pub const DEATH_RECORD_PART: u8 = 19;
    /// The inbox served between two parts of the record (the segment since the part: the
    /// poll's own work, a console turn included).
    pub const DEATH_RECORD_SERVED: u8 = 20;
    pub const COUNT: usize = 21;
    const NAMES: [&str; COUNT] = [
        "poll",
        "poll or guest exit",
        "guest entry",
        "setup: ELF plan",
        "setup: kernel copied",
        "setup: boot page tables",
        "setup: EPT built",
        "setup: devices",
        "setup: status page",
        "setup: VMCS",
        "setup: done",
        "first entry prepared",
        "death begins",
        "death: devices quiesced",
        "death: accounted",
        "death: caps retired",
        "death: links down",
        "death: VMCS cleared",
        "death: recorded",
        "death: a part of the record",
        "death: the inbox served for the record",
    ];
    pub fn name(site: u64) -> &'static str {
        NAMES.get(site as usize).copied().unwrap_or("?")
    }
}

const _: () = assert!(core::mem::offset_of!(PerCore, kick_hook) == 16);
const _: () = assert!(core::mem::offset_of!(PerCore, kicked) == 24);
const _: () = assert!(core::mem::offset_of!(PerCore, nmis) == 32);

impl PerCore {
    /// A guest vCPU is set up on this core: from now on a kick taken in the hypervisor
    /// runs `hook` (its backend's `vcpu::Vcpu::KICK_HOOK`) and is counted in `nmis`.
    pub fn vcpu_live(&self, hook: unsafe extern "C" fn()) {
        self.kick_hook.store(hook as usize as u64, Ordering::Release);
    }

    /// This core's vCPU is about to be cleared: no kick reaches it any more.
    pub fn vcpu_gone(&self) {
        self.kick_hook.store(0, Ordering::Release);
    }

    /// The core serves its inbox at `now`: the stretch away from it ends (kept if it is
    /// the longest) and the next begins.
    pub fn served(&self, now: u64) {
        self.away_ends(now, site::POLL);
        self.away_since.store(now, Ordering::Relaxed);
    }

    /// The core enters its guest at `now`: while the guest runs, a kick exits it (the
    /// inbox is looked at next), so the core is not away; the stretch ends here.
    pub fn entering_guest(&self, now: u64) {
        self.away_ends(now, site::ENTRY);
        self.away_since.store(0, Ordering::Relaxed);
    }

    /// The core left its guest at `now`: a stretch away from the inbox begins.
    pub fn left_guest(&self, now: u64) {
        self.away_since.store(now, Ordering::Relaxed);
    }

    /// A checkpoint at `site` inside a long path away from the inbox (setup, death): the
    /// segment since the last checkpoint ends here (kept if it is the longest).
    pub fn mark(&self, site: u8) {
        let now = crate::arch::rdtsc();
        self.segment_ends(now, site);
        self.seg_at.store(now, Ordering::Relaxed);
        self.seg_site.store(site as u64, Ordering::Relaxed);
    }

    fn away_ends(&self, now: u64, site: u8) {
        // Only this core writes these (no read-modify-write needed).
        let since = self.away_since.load(Ordering::Relaxed);
        if since == 0 {
            return;
        }
        let stretch = now.saturating_sub(since);
        if stretch > self.away_longest.load(Ordering::Relaxed) {
            self.away_longest.store(stretch, Ordering::Relaxed);
        }
        // Segments only where a mark split the stretch (the exit paths pay one compare).
        if self.seg_at.load(Ordering::Relaxed) > since {
            self.segment_ends(now, site);
        }
    }

    fn segment_ends(&self, now: u64, site: u8) {
        // The segment begins at the last mark of this stretch, else at its start (the inbox
        // served or the guest left: not told apart, to keep those paths as they were).
        let since = self.away_since.load(Ordering::Relaxed);
        let (at, from) = match self.seg_at.load(Ordering::Relaxed) {
            at if at > since => (at, self.seg_site.load(Ordering::Relaxed)),
            _ => (since, site::POLL_OR_EXIT as u64),
        };
        let gap = now.saturating_sub(at);
        let i = site as usize % site::COUNT;
        if at != 0 && gap > self.seg_longest[i].load(Ordering::Relaxed) {
            self.seg_longest[i].store(gap, Ordering::Relaxed);
            self.seg_from[i].store(from, Ordering::Relaxed);
        }
    }

    /// The longest segment that ended at checkpoint `to`, in TSC ticks, and where it
    /// began.
    pub fn longest_segment(&self, to: u8) -> (u64, &'static str) {
        let i = to as usize % site::COUNT;
        let from = self.seg_from[i].load(Ordering::Relaxed);
        (self.seg_longest[i].load(Ordering::Relaxed), site::name(from))
    }

    /// The longest stretch this core spent away from its inbox, in TSC ticks.
    pub fn longest_away(&self) -> u64 {
        self.away_longest.load(Ordering::Relaxed)
    }

    /// Whether a kick arrived while this core was in the hypervisor since the last call.
    pub fn take_kick(&self) -> bool {
        self.kicked.swap(0, Ordering::AcqRel) != 0
    }
}

#[repr(C, align(16))]
struct Stack<const N: usize>(UnsafeCell<[u8; N]>);

struct Slot(UnsafeCell<MaybeUninit<PerCore>>);

// SAFETY: slot i is written only by core i (or by the BSP before core i exists), see the
// module comment; no two cores ever access the same slot.
unsafe impl Sync for Slot {}
// SAFETY: each stack is used by exactly one core, as handed out by `stack_top`.
unsafe impl<const N: usize> Sync for Stack<N> {}

static SLOTS: [Slot; MAX_CORES] =
    [const { Slot(UnsafeCell::new(MaybeUninit::uninit())) }; MAX_CORES];
static STACKS: [Stack<STACK_SIZE>; MAX_CORES] =
    [const { Stack(UnsafeCell::new([0; STACK_SIZE])) }; MAX_CORES];
static IST_STACKS: [Stack<IST_STACK_SIZE>; MAX_CORES] =
    [const { Stack(UnsafeCell::new([0; IST_STACK_SIZE])) }; MAX_CORES];

/// The top of core `index`'s main stack (the BSP keeps its boot stack; index 0 is unused).
pub fn stack_top(index: usize) -> u64 {
    STACKS[index].0.get() as u64 + STACK_SIZE as u64
}

/// Sets up the calling core's slot `index`: descriptor tables, TSS, GS base.
///
/// # Safety
/// Called once per core, on that core, with an index no other core uses.
pub unsafe fn init_this_core(index: usize, apic_id: u32) -> &'static PerCore {
    assert!(index < MAX_CORES);
    let slot = SLOTS[index].0.get();
    let ist_top = IST_STACKS[index].0.get() as u64 + IST_STACK_SIZE as u64;
    // It is initialised field by field in place (the IDT is 4 KiB, too large to build on the stack
    // twice), then only shared references are handed out.
    // SAFETY: the slot is this core's alone (caller's guarantee).
    unsafe {
        let p = (*slot).as_mut_ptr();
        core::ptr::addr_of_mut!((*p).index).write(index as u64);
        core::ptr::addr_of_mut!((*p).apic_id).write(apic_id as u64);
        core::ptr::addr_of_mut!((*p).kick_hook).write(AtomicU64::new(0));
        core::ptr::addr_of_mut!((*p).kicked).write(AtomicU64::new(0));
        core::ptr::addr_of_mut!((*p).nmis).write(AtomicU64::new(0));
        core::ptr::addr_of_mut!((*p).away_since).write(AtomicU64::new(0));
        core::ptr::addr_of_mut!((*p).away_longest).write(AtomicU64::new(0));
        core::ptr::addr_of_mut!((*p).seg_at).write(AtomicU64::new(0));
        core::ptr::addr_of_mut!((*p).seg_site).write(AtomicU64::new(0));
        core::ptr::addr_of_mut!((*p).seg_longest).write([const { AtomicU64::new(0) }; site::COUNT]);
        core::ptr::addr_of_mut!((*p).seg_from).write([const { AtomicU64::new(0) }; site::COUNT]);
        core::ptr::addr_of_mut!((*p).idt).write(Idt::new());
        let mut tss = TaskStateSegment::new();
        tss.set_ist(IST_CRITICAL as usize - 1, ist_top);
        tss.iomap_base = core::mem::size_of::<TaskStateSegment>() as u16;
        core::ptr::addr_of_mut!((*p).tss).write(tss);
        let tss_ref: &'static TaskStateSegment = &*core::ptr::addr_of!((*p).tss);
        core::ptr::addr_of_mut!((*p).gdt).write(MaybeUninit::new(Gdt::new(tss_ref)));
        let me: &'static PerCore = &*p;
        me.gdt.assume_init_ref().load();
        me.idt.load();
        crate::arch::write_gs_base(p as u64);
        if index < 64 {
            // Release: the IDT is loaded before another core sees the bit.
            NMI_READY.fetch_or(1 << index, Ordering::Release);
        }
        me
    }
}

/// Cores whose IDT is loaded (bit per slot index): only those may be sent an NMI. An NMI
/// to a core still in its bring-up (another core's membership probe or link kick) would
/// find no IDT and reset the machine (a triple fault, found by the chaos campaign at seed 5).
static NMI_READY: AtomicU64 = AtomicU64::new(0);

/// Whether core `index` can take an NMI (its IDT is loaded).
pub fn nmi_ready(index: usize) -> bool {
    index < 64 && NMI_READY.load(Ordering::Acquire) & (1 << index) != 0
}

/// The cores that can take an NMI (bit per slot index; see [`nmi_ready`]), in one load.
pub fn nmi_ready_set() -> u64 {
    NMI_READY.load(Ordering::Acquire)
}

/// The calling core's slot index, or `None` before its `init_this_core`.
pub fn current_index() -> Option<usize> {
    if crate::arch::read_gs_base() == 0 {
        return None;
    }
    let v: u64;
    // SAFETY: GS base points at this core's PerCore whose first field is `index`.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) v, options(nostack, readonly, preserves_flags))
    };
    Some(v as usize)
}

/// The calling core's own state.
///
/// # Safety
/// `init_this_core` has run on this core.
pub unsafe fn this_core() -> &'static PerCore {
    let i = current_index().expect("per-core state not initialised");
    // SAFETY: initialised (caller's guarantee) and never mutated through another path.
    unsafe { (*SLOTS[i].0.get()).assume_init_ref() }
}
