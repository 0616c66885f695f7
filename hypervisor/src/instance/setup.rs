// SPDX-License-Identifier: MIT OR Apache-2.0
//! What a guest is set up from and with, on this core: the guest across its incarnations
//! ([`Guest`], [`Incarnation`]), its capability state, its partition (bounds-checked
//! copies), its boot page tables, the policy of its vCPU (exitless waiting, its I/O
//! ports), its devices quiesced, and what a dead incarnation leaves scrubbed for the next
//! (owned memory, channel rings); the core's leave and rejoin of the membership view for a
//! park.
//!
//! Owns this core's capability slot and private frame pool. May call: `lifecycle` (the
//! guest's), `account`, `arch`, `ept`, `pci`, `caps`, `members` (through `caps`),
//! `percpu`, `xcore`.

use super::account::log_views;
use super::*;
use crate::arch::{self};
use vmcall_proto::guest::*;
use vmcall_proto::hypercall::HvError;

/// Bytes zeroed or copied between two looks at the inbox (partition, grants, kernel
/// segments): 4,096 `rep stosq` iterations, a few thousand instructions (see README "Core
/// membership" for the bound this keeps).
pub(super) const SERVE_EVERY_BYTES: u64 = 32 << 10;

/// This core's private region, reached through the identity map.
pub(super) struct Identity;

impl ept::FrameMemory for Identity {
    fn frame(&mut self, pa: u64) -> &mut [u64; 512] {
        // Only the frame pool and the EPT code of this core reach it, one table at a time.
        // The pool hands out and takes back only this core's private frames, and EPT
        // entries hold only table frames it handed out.
        // SAFETY: so `pa` is a frame of this core's private region, identity-mapped.
        unsafe { &mut *(pa as *mut [u64; 512]) }
    }
}

/// Each core's capability state, in static storage (tens of KiB: a stack is no place for
/// it), owned by that core.
pub(super) struct CapsSlot(
    pub(super) core::cell::UnsafeCell<core::mem::MaybeUninit<crate::caps::HvCaps>>,
);

// SAFETY: slot i is touched only by core i, in `caps_of_this_core`, once per run.
unsafe impl Sync for CapsSlot {}
pub(super) static CAPS: [CapsSlot; crate::percpu::MAX_CORES] =
    [const { CapsSlot(core::cell::UnsafeCell::new(core::mem::MaybeUninit::uninit())) };
        crate::percpu::MAX_CORES];

/// Initialises and hands out this core's capability state. Called once per core (a
/// restarted guest goes on with the state its predecessor's death left).
pub(super) fn caps_of_this_core(
    core: usize,
    policy: crate::caps::Policy,
) -> &'static mut crate::caps::HvCaps {
    let p = CAPS[core].0.get() as *mut crate::caps::HvCaps;
    // Slot `core` belongs to this core, which runs its guest once.
    // SAFETY: so this is the only reference; the slot is static and aligned, set up here.
    unsafe {
        crate::caps::HvCaps::init_at(p, core as u16, policy);
        &mut *p
    }
}

/// Frames for page tables and VMX structures: this core's private region, freed table
/// frames reused first.
pub(super) type Private = ept::FramePool<Identity>;

/// The partition, seen from the host: bounds-checked copies only, never references.
pub(super) struct Partition {
    pub(super) base: u64,
    pub(super) size: u64,
}

impl Partition {
    pub(super) fn check(&self, gpa: u64, len: u64) -> Result<u64, HvError> {
        let end = gpa.checked_add(len).ok_or(HvError::BadAddress)?;
        if end > self.size {
            return Err(HvError::BadAddress);
        }
        Ok(self.base + gpa)
    }
    pub(super) fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), HvError> {
        let hpa = self.check(gpa, bytes.len() as u64)?;
        // The guest is not running while its core is in the hypervisor.
        // SAFETY: inside this core's partition (checked), identity-mapped host memory.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), hpa as *mut u8, bytes.len()) };
        Ok(())
    }
    pub(super) fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), HvError> {
        let hpa = self.check(gpa, buf.len() as u64)?;
        // SAFETY: as for `write`.
        unsafe { core::ptr::copy_nonoverlapping(hpa as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
    /// Zeroes the partition a chunk at a time, calling `between` after each (the
    /// core serves its inbox there: zeroing a large partition takes longer than a
    /// membership probe may go unanswered).
    pub(super) fn zero(&self, mut between: impl FnMut()) {
        let mut at = 0;
        while at < self.size {
            let len = SERVE_EVERY_BYTES.min(self.size - at);
            // SAFETY: the whole partition belongs to this core and is not yet in use.
            unsafe { ((self.base + at) as *mut u8).write_bytes(0, len as usize) };
            at += len;
            between();
        }
    }
    pub(super) fn write_u64(&self, gpa: u64, v: u64) -> Result<(), HvError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

/// Writes the guest's boot page tables (see `vmcall_proto::guest`).
pub(super) fn boot_page_tables(p: &Partition) -> Result<(), HvError> {
    const PW: u64 = 0x3;
    p.write_u64(BOOT_PML4_GPA, BOOT_PDPT_GPA | PW)?;
    p.write_u64(BOOT_PDPT_GPA, BOOT_PD_GPA | PW)?;
    p.write_u64(BOOT_PD_GPA, BOOT_PT_GPA | PW)?;
    for i in 1..512u64 {
        p.write_u64(BOOT_PT_GPA + 8 * i, (i << 12) | PW)?;
    }
    for j in 1..(p.size >> 21) {
        p.write_u64(BOOT_PD_GPA + 8 * j, (j << 21) | PW | 0x80)?;
    }
    Ok(())
}

/// Whether `l`'s guest waits exitless: MONITOR and MWAIT without VM exits (SDM Vol. 3C
/// 26.1.3: with "MWAIT exiting" and "MONITOR exiting" 0 they execute normally in VMX
/// non-root operation). Only a guest with channels that asked for it (`mwait = true`),
/// on a processor with MONITOR/MWAIT (CPUID.01H:ECX[3]).
///
/// What a guest can do with them, and why that is safe: MONITOR arms on a line the
/// guest can read (it is a read for EPT purposes: a line outside its EPT is a violation
/// and stops it), so it learns when a line it could poll is written, nothing more.
/// MWAIT sleeps its own core until that line is written or an event comes; NMIs still
/// exit (NMI exiting), so the inter-core kicks and the capability protocol are served
/// as before, and the VMX-preemption timer still ends the run budget: a guest that
/// sleeps forever is stopped as one that spins forever. The hints (EAX) pick the
/// C-state of the guest's own core; on hardware a deep one costs that core wake-up
/// latency and cache contents, nothing of another guest's.
pub(super) fn exitless_mwait(l: &Launch) -> bool {
    let asked = l.entry.flags & vmcall_proto::config::flags::MWAIT != 0;
    let has = raw_cpuid::native_cpuid::cpuid_count(1, 0).ecx & (1 << 3) != 0;
    asked && l.channel_count > 0 && has
}

/// The ports of the guest's own I/O BARs (opened in its I/O bitmap). The configuration
/// ports are never among them: a BAR is sized from the device, and 0xCF8..0xCFF are
/// the chipset's.
pub(super) fn io_ports(l: &Launch) -> impl Iterator<Item = u16> + Clone + '_ {
    l.devices
        .iter()
        .flat_map(|o| o.func.bars.iter())
        .filter(|b| b.kind == vmcall_proto::device::bar_kind::IO && b.size > 0)
        .flat_map(|b| b.base..(b.base + b.size).min(0x1_0000))
        .map(|p| p as u16)
        .filter(|p| !(0xcf8..=0xcff).contains(p))
}

/// Puts the guest's devices in their boot state (no bus mastering, interrupt line
/// masked, nothing in service on this core): before an incarnation starts and when one
/// ends, before its memory is scrubbed or handed on.
pub(super) fn quiesce_devices(l: &Launch) {
    // The device first (its own registers, then the command register: no DMA, no
    // INTx), then whatever it raised and the guest never acknowledged (while the line's
    // entry still carries its vector, so the EOI clears its remote IRR), then the line.
    for o in l.devices.iter() {
        if !crate::pci::quiesce_registers(o) {
            log::warn!("guest {}: {} did not come out of its reset in time", name(l), o.func.bdf);
        }
        crate::pci::quiesce(&mut crate::pci::Cf8, o);
    }
    if l.devices.count > 0 {
        // An interrupt the dead guest took and never acknowledged would block every
        // lower vector for the next one, and keep its line's remote IRR set.
        let n = crate::arch::apic::eoi_in_service();
        if n > 0 {
            log::info!("guest {}: {n} interrupts left in service, acknowledged", name(l));
        }
    }
    for o in l.devices.iter() {
        if let Some(line) = o.line() {
            crate::pci::ioapic::mask(line, o.vector);
        }
    }
}

/// Readies what a dead incarnation leaves for the next: memory the guest owns scrubbed,
/// capabilities accepted again.
pub(super) fn rebirth(caps: &mut crate::caps::HvCaps, link: &mut crate::instance::xcore::Link) {
    let mut owned = [(0u64, 0u64); vmcall_proto::caps::MAX_SLOTS];
    let mut count = 0;
    for m in caps.owned_memory().take(owned.len()) {
        owned[count] = m;
        count += 1;
    }
    for &(base, size) in &owned[..count] {
        // A chunk at a time, serving the inbox between (see `Partition::zero`).
        for at in (0..size).step_by(SERVE_EVERY_BYTES as usize) {
            let len = SERVE_EVERY_BYTES.min(size - at);
            // Its guest is not running and nothing maps it now.
            // SAFETY: memory this core's guest owns (a grant or one moved to it), identity-mapped.
            unsafe { ((base + at) as *mut u8).write_bytes(0, len as usize) };
            caps.poll(link);
        }
    }
    caps.reborn();
}

/// Takes this core out of the membership view (a controller's `PARK`, its guest down):
/// whether it is out in time. If not, it stays in (a later start must not run the guest
/// while the old leave commits).
pub(super) fn leave<B: crate::vcpu::Vcpu>(
    g: &Guest<'_, B>,
    caps: &mut crate::caps::HvCaps,
    link: &mut crate::instance::xcore::Link,
) -> bool {
    let (l, core) = (g.l, g.core);
    let wait = caps.members.timeout().saturating_mul(4);
    caps.with_members(link, |m, net| m.leave(net));
    let deadline = arch::rdtsc().saturating_add(wait);
    let out = |c: &crate::caps::HvCaps| !c.members.member();
    if !caps.serve_until(link, deadline, |c| log_views(c, core), out) {
        log::warn!("guest {}: its core could not leave the view in time", name(l));
        caps.with_members(link, |m, net| m.stay(net));
        return false;
    }
    log::info!("guest {}: its core is out of the view, parked", name(l));
    true
}

/// Brings this parked core back into the membership view through core `via` (a
/// controller's start): whether it is back in time.
pub(super) fn join<B: crate::vcpu::Vcpu>(
    g: &Guest<'_, B>,
    caps: &mut crate::caps::HvCaps,
    link: &mut crate::instance::xcore::Link,
    via: usize,
) -> bool {
    let (l, core) = (g.l, g.core);
    let wait = caps.members.timeout().saturating_mul(4);
    caps.with_members(link, |m, net| m.join(net, via));
    let deadline = arch::rdtsc().saturating_add(wait);
    let back = |c: &crate::caps::HvCaps| c.members.member();
    if !caps.serve_until(link, deadline, |c| log_views(c, core), back) {
        log::warn!("guest {}: its core could not rejoin the view in time", name(l));
    }
    caps.members.member()
}

/// Resets a channel's rings (zeroes both) and returns how many messages were in flight
/// (sent and not received, both directions, as the guest-written counters say). Only
/// before a new incarnation starts, once the peer's core acknowledged the channel down
/// (or its guest is dead or its core does not answer: the epoch tags keep what it
/// writes late out of the new epoch).
pub(super) fn reset_rings(ch: &ChanMap) -> u64 {
    let slots = ch.desc.slots;
    let ring = vmcall_proto::channel::ring_pages_bytes(slots);
    // The channel's rings: allocated by the BSP, identity-mapped, `ch.size` bytes.
    // SAFETY: reads through the ring's atomics only, then zeroed while nobody uses it.
    let lost = unsafe {
        let a = vmcall_proto::channel::Ring::from_raw(ch.hpa as *mut u8, slots);
        let b = vmcall_proto::channel::Ring::from_raw((ch.hpa + ring) as *mut u8, slots);
        // Guest-written counters: saturating, never trusted.
        let lost = a
            .sent()
            .saturating_sub(a.received())
            .saturating_add(b.sent().saturating_sub(b.received()));
        // Control words first: a copy racing the wipe reads as torn, never as a message.
        a.void_controls();
        b.void_controls();
        lost
    };
    // SAFETY: as above; no end is using the rings (the caller's condition).
    unsafe { (ch.hpa as *mut u8).write_bytes(0, ch.size as usize) };
    lost
}

/// This core's guest across its incarnations: what each one is set up from, and what
/// carries over from one to the next (its lifecycle, its channels' counts, the sum of
/// the reports so far).
pub(super) struct Guest<'a, B: crate::vcpu::Vcpu> {
    pub(super) l: &'a Launch,
    /// What the backend probed at boot.
    pub(super) f: &'a B::Features,
    pub(super) core: u32,
    /// What happens to the guest (see `lifecycle`): it hears what happened and says
    /// what to do.
    pub(super) lc: super::lifecycle::Lifecycle,
    /// Each channel's messages lost to ring resets, and its resets, over the incarnations.
    pub(super) counts: [super::account::LinkCount; MAX_CHANNELS_PER_GUEST],
    /// The incarnations' reports summed (none before the first).
    pub(super) total: Option<GuestReport>,
}

/// Which incarnation of the guest this is (1 for the first) and when its setup began.
#[derive(Clone, Copy)]
pub(super) struct Incarnation {
    pub(super) n: u32,
    pub(super) tsc_start: u64,
}
