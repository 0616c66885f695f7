// SPDX-License-Identifier: MIT OR Apache-2.0
//! One guest on one core: its partition, EPT and VMCS, and the loop that runs it.
//!
//! The BSP decides at boot which guest goes where and posts each core a [`Launch`] message
//! (partition and private frames carved from the memory map). From then on everything here
//! runs on the guest's own core, on memory only that core touches: the core zeroes its
//! partition, loads the kernel ELF, writes the boot-info and boot page tables, builds the
//! EPT and VMCS in its private region, and runs the guest until it exits or is stopped. The
//! result goes back as a [`GuestReport`] message.

pub mod lifecycle;
pub mod loader;
pub mod telemetry;
pub mod xcore;

use crate::ept;
use crate::exits::{StopReason, REASONS};

/// What the BSP tells a core: run this guest here.
#[derive(Clone, Copy, Debug)]
pub struct Launch {
    pub guest_id: u32,
    pub entry: vmcall_proto::config::GuestEntry,
    /// Host-physical partition: guest-physical 0 maps here.
    pub partition: u64,
    pub partition_size: u64,
    /// Host-physical region for this core's EPT tables, VMCS and bitmaps.
    pub private: u64,
    pub private_size: u64,
    /// The guest kernel ELF (a multiboot2 module; read-only, shared by all cores).
    pub kernel: (u64, u64),
    pub watchdog_ms: u64,
    /// The capability protocol's deadline per level.
    pub caps_deadline_ms: u64,
    /// How this core's revokes reach the holders (`revoke=`, `revoke_fanout=`).
    pub revoke: crate::caps::Revoke,
    /// Fault injection: this core never answers capability revokes
    /// (`inject=deaf-core:N`).
    pub deaf: bool,
    /// Fault injection: this core's hypervisor hangs 20 ms into its guest's first run
    /// (`inject=hung-core:N`).
    pub hang: bool,
    /// Core membership: the cores of view 0 (those given a guest) and the failure
    /// detector's probe period in milliseconds.
    pub members: u64,
    pub probe_ms: u64,
    /// Live figures: a `stats` record at most every this many milliseconds, at the
    /// membership's probes (0: none).
    pub stats_ms: u64,
    /// The guest's channels, in boot-info order.
    pub channels: [ChanMap; vmcall_proto::guest::MAX_CHANNELS_PER_GUEST],
    pub channel_count: usize,
    /// Memory granted by the config (`[[grant]]`): host-physical base and size, zeroed.
    /// Each becomes a memory capability (read, write, grant) in slot order.
    pub grants: [(u64, u64); MAX_GRANTS_PER_GUEST],
    pub grant_count: usize,
    /// Guests this one controls (`[[control]]`) that run: (core, guest index), each a
    /// guest-control capability after the endpoints.
    pub targets: [(u16, u16); vmcall_proto::config::MAX_GUESTS],
    pub target_count: usize,
    /// Each target's status frame ([`Launch::status_frame`] of its launch), mapped
    /// read-only into this guest at `vmcall_proto::guest::target_status(i)`.
    pub target_status: [u64; vmcall_proto::config::MAX_GUESTS],
    /// Cores of the guests that control this one (their requests are served, no one
    /// else's; it is reported once all of them have let go).
    pub controllers: u64,
    /// TSC past which a guest that is down stops waiting for its controllers (the BSP's
    /// collection gives up then).
    pub give_up_tsc: u64,
    /// TSC at which the run's length is over (`duration_ms`; `u64::MAX`: none): a guest
    /// still running is stopped then and not started again.
    pub end_tsc: u64,
    /// The PCI functions the guest owns (`pci::assign`), config order.
    pub devices: crate::pci::Assigned,
}

/// Grants one guest can receive from the config (checked in the blob).
pub use vmcall_proto::config::MAX_GRANTS_PER_GUEST;

/// One channel endpoint: what the guest is told, and where its window's memory is.
#[derive(Clone, Copy, Debug)]
pub struct ChanMap {
    pub desc: vmcall_proto::guest::ChannelDesc,
    /// Host-physical base of the channel's two rings (mapped at `channel_window(index)`).
    pub hpa: u64,
    pub size: u64,
    /// The peer's core APIC id, when the peer runs (doorbells go there).
    pub peer_apic: Option<u32>,
    /// The peer's core index, when the peer runs (capability transfers go there).
    pub peer_core: Option<u16>,
}

impl Launch {
    pub fn channels(&self) -> &[ChanMap] {
        &self.channels[..self.channel_count]
    }

    /// The guest's status page: the last frame of its private region, the same frame for
    /// every incarnation (its controllers map it once, and it stays valid across restarts).
    /// The frame pool of an incarnation ends below it.
    pub fn status_frame(&self) -> u64 {
        self.private + self.private_size - 4096
    }
}

/// How a guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    Exited(u64),
    Stopped(StopReason),
}

/// What a core tells the BSP when its guest is over.
#[derive(Clone, Copy, Debug)]
pub struct GuestReport {
    pub ending: Ending,
    pub exits: [u32; REASONS],
    pub exits_other: u32,
    pub hypercalls: u32,
    /// Doorbells it rang.
    pub doorbells: u64,
    /// TSC at the first VM entry (0 if never entered).
    pub tsc_first_entry: u64,
    pub tsc_end: u64,
    /// Inter-core messages and NMI kicks this core sent while running the guest.
    pub xmsgs: u64,
    pub nmis: u64,
    /// The capability system's counters (requests per peer, refusals, fences).
    pub caps: crate::caps::Stats,
    /// TSC ticks spent serving other cores while the guest ran.
    pub foreign_tsc: u64,
    /// How many times the guest was started (1 + restarts).
    pub incarnations: u32,
    /// Revokes of its caps some core did not confirm at its (last) death.
    pub unconfirmed: u32,
    /// The longest stretch its core spent in the hypervisor without serving the inbox, in
    /// TSC ticks, up to the report (see `percpu::PerCore::served`).
    pub longest_away: u64,
}

/// A report's VM exits as `reason:count` words, zeros left out (the records' `exits`).
pub struct Exits<'a>(pub &'a GuestReport);

impl core::fmt::Display for Exits<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut first = true;
        let names = crate::exits::REASON_NAMES.iter();
        for (n, c) in names.zip(self.0.exits.iter()).filter(|(_, c)| **c > 0) {
            write!(f, "{}{n}:{c}", if first { "" } else { " " })?;
            first = false;
        }
        if self.0.exits_other > 0 {
            write!(f, "{}other:{}", if first { "" } else { " " }, self.0.exits_other)?;
        }
        Ok(())
    }
}

impl GuestReport {
    /// Adds a later incarnation: its ending and end time, every counter summed.
    pub fn absorb(&mut self, later: &GuestReport) {
        self.ending = later.ending;
        for (a, b) in self.exits.iter_mut().zip(later.exits) {
            *a = a.saturating_add(b);
        }
        self.exits_other = self.exits_other.saturating_add(later.exits_other);
        self.hypercalls = self.hypercalls.saturating_add(later.hypercalls);
        self.doorbells = self.doorbells.saturating_add(later.doorbells);
        if self.tsc_first_entry == 0 {
            self.tsc_first_entry = later.tsc_first_entry;
        }
        self.tsc_end = later.tsc_end;
        self.caps = later.caps;
        self.foreign_tsc = self.foreign_tsc.saturating_add(later.foreign_tsc);
        self.incarnations += 1;
        self.unconfirmed = later.unconfirmed;
        self.longest_away = self.longest_away.max(later.longest_away);
    }
}

/// The guest's name as text.
pub fn name(l: &Launch) -> &str {
    vmcall_proto::fixed::get(&l.entry.name).unwrap_or("?")
}

/// Builds a guest's EPT in `f`: the partition `[base, base + size)` read-write-execute at
/// guest-physical 0, then each channel window `(gpa, hpa, size)` read-write and never
/// executable (W^X: memory another guest writes must not become code here). Then checks
/// what it built (the isolation self-check): exactly the partition and the windows are
/// mapped, each at its base and with its permissions, nothing past the partition's end.
/// Returns the root table.
pub fn build_ept(
    f: &mut impl ept::Frames,
    base: u64,
    size: u64,
    windows: impl Iterator<Item = (u64, u64, u64)> + Clone,
) -> Result<u64, &'static str> {
    const FAILED: &str = "EPT construction failed";
    let root = ept::new_root(f).map_err(|_| FAILED)?;
    ept::map(f, root, 0, base, size).map_err(|_| FAILED)?;
    for (gpa, hpa, len) in windows.clone() {
        ept::map_with(f, root, gpa, hpa, len, ept::Perm::ReadWrite)
            .map_err(|_| "channel window mapping failed")?;
    }
    // The grant window's directories, built now and kept: a 2-MiB cap_map there writes one
    // entry, the first time as every time.
    let (wstart, wend) = vmcall_proto::hypercall::GRANT_WINDOW;
    ept::prebuild(f, root, wstart, wend - wstart).map_err(|_| FAILED)?;
    let rw = ept::Perm::ReadWrite.bits();
    let rwx = ept::Perm::ReadWriteExecute.bits();
    let mut ok = ept::translate_perm(f, root, 0) == Some((base, rwx))
        && ept::translate_perm(f, root, size - 1) == Some((base + size - 1, rwx))
        && ept::translate(f, root, size).is_none();
    let mut total = size;
    for (gpa, hpa, len) in windows {
        ok &= ept::translate_perm(f, root, gpa) == Some((hpa, rw))
            && ept::translate_perm(f, root, gpa + len - 1) == Some((hpa + len - 1, rw));
        total += len;
    }
    if !ok || ept::mapped_bytes(f, root) != total {
        return Err("EPT self-check failed");
    }
    Ok(root)
}

/// The secondary processor-based controls (SDM Vol. 3C 25.6.2, Table 25-7) for `caps`
/// (IA32_VMX_PROCBASED_CTLS2): EPT and VPID, required; RDTSCP where allowed (else it is
/// #UD in the guest); WBINVD exiting where allowed, so WBINVD is a counted no-op like INVD
/// instead of a cache flush that hits every core (the exit policy in `exits`).
pub fn secondary_controls(caps: crate::vmx::features::ControlCaps) -> Option<u32> {
    use x86::vmx::vmcs::control::SecondaryControls as S;
    let mut want = S::ENABLE_EPT | S::ENABLE_VPID;
    for optional in [S::ENABLE_RDTSCP, S::WBINVD_EXITING] {
        if caps.allows(optional.bits()) {
            want |= optional;
        }
    }
    caps.adjust(want.bits())
}

#[cfg(target_os = "none")]
pub use run::run;

#[cfg(target_os = "none")]
mod run {
    use super::lifecycle::{self, Cause, Death, Effect, Event as Life, Lifecycle, Phase, Request};
    use super::*;
    use crate::arch::{self, vmx::GuestRegs};
    use crate::exits::{self, Action};
    use crate::exits::{ConsoleSink, Event, ExitInfo, Field, GuestCtx, Vcpu};
    use crate::vmx::vmcs::{ctl, exit, g, h};
    use crate::vmx::Features;
    use vmcall_proto::guest::*;
    use vmcall_proto::hypercall::HvError;
    use x86::vmx::vmcs::control::{EntryControls, ExitControls, PinbasedControls, PrimaryControls};
    use zerocopy::{FromZeros, IntoBytes};

    /// Bytes zeroed or copied between two looks at the inbox (partition, grants, kernel
    /// segments): 4,096 `rep stosq` iterations, a few thousand instructions (see README "Core
    /// membership" for the bound this keeps).
    const SERVE_EVERY_BYTES: u64 = 32 << 10;

    /// This core's private region, reached through the identity map.
    struct Identity;

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
    struct CapsSlot(core::cell::UnsafeCell<core::mem::MaybeUninit<crate::caps::HvCaps>>);
    // SAFETY: slot i is touched only by core i, in `caps_of_this_core`, once per run.
    unsafe impl Sync for CapsSlot {}
    static CAPS: [CapsSlot; crate::percpu::MAX_CORES] =
        [const { CapsSlot(core::cell::UnsafeCell::new(core::mem::MaybeUninit::uninit())) };
            crate::percpu::MAX_CORES];

    /// Initialises and hands out this core's capability state. Called once per core (a
    /// restarted guest goes on with the state its predecessor's death left).
    fn caps_of_this_core(
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
    type Private = ept::FramePool<Identity>;

    /// The partition, seen from the host: bounds-checked copies only, never references.
    struct Partition {
        base: u64,
        size: u64,
    }

    impl Partition {
        fn check(&self, gpa: u64, len: u64) -> Result<u64, HvError> {
            let end = gpa.checked_add(len).ok_or(HvError::BadAddress)?;
            if end > self.size {
                return Err(HvError::BadAddress);
            }
            Ok(self.base + gpa)
        }
        fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), HvError> {
            let hpa = self.check(gpa, bytes.len() as u64)?;
            // The guest is not running while its core is in the hypervisor.
            // SAFETY: inside this core's partition (checked), identity-mapped host memory.
            unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), hpa as *mut u8, bytes.len()) };
            Ok(())
        }
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), HvError> {
            let hpa = self.check(gpa, buf.len() as u64)?;
            // SAFETY: as for `write`.
            unsafe {
                core::ptr::copy_nonoverlapping(hpa as *const u8, buf.as_mut_ptr(), buf.len())
            };
            Ok(())
        }
        /// Zeroes the partition a chunk at a time, calling `between` after each (the
        /// core serves its inbox there: zeroing a large partition takes longer than a
        /// membership probe may go unanswered).
        fn zero(&self, mut between: impl FnMut()) {
            let mut at = 0;
            while at < self.size {
                let len = SERVE_EVERY_BYTES.min(self.size - at);
                // SAFETY: the whole partition belongs to this core and is not yet in use.
                unsafe { ((self.base + at) as *mut u8).write_bytes(0, len as usize) };
                at += len;
                between();
            }
        }
        fn write_u64(&self, gpa: u64, v: u64) -> Result<(), HvError> {
            self.write(gpa, &v.to_le_bytes())
        }
    }

    /// The vCPU of the current VMCS.
    struct VmcsVcpu<'a> {
        regs: GuestRegs,
        part: &'a Partition,
        procbased: u32,
        injected: bool,
        frames: &'a mut Private,
        eptp: u64,
        link: &'a mut crate::instance::xcore::Link,
        /// The guest's status page (a private frame) and its channels, in boot-info order.
        status: u64,
        chans: &'a [ChanMap],
    }

    fn field(f: Field) -> crate::vmx::vmcs::Rw {
        match f {
            Field::Rip => g::RIP,
            Field::Rsp => g::RSP,
            Field::Rflags => g::RFLAGS,
            Field::Cr0 => g::CR0,
            Field::Cr0Shadow => ctl::CR0_SHADOW,
            Field::Cr4 => g::CR4,
            Field::Cr4Shadow => ctl::CR4_SHADOW,
            Field::Efer => g::EFER,
            Field::FsBase => g::FS_BASE,
            Field::GsBase => g::GS_BASE,
            Field::Pat => g::PAT,
            Field::Interruptibility => g::INTERRUPTIBILITY,
            Field::SsAccessRights => g::SS_AR,
            Field::PendingDebug => g::PENDING_DBG,
        }
    }

    impl Vcpu for VmcsVcpu<'_> {
        fn regs(&mut self) -> &mut GuestRegs {
            &mut self.regs
        }
        #[inline(always)]
        fn read(&mut self, f: Field) -> u64 {
            // SAFETY: this core's guest VMCS is current for the whole run loop.
            unsafe { field(f).read() }
        }
        #[inline(always)]
        fn write(&mut self, f: Field, v: u64) {
            // SAFETY: current VMCS; the exit handlers validated `v`.
            unsafe { field(f).set(v) };
        }
        fn inject(&mut self, e: Event) {
            let info: u64 = match e {
                Event::Exception { vector, error_code: Some(_) } => {
                    (1 << 31) | (1 << 11) | (3 << 8) | vector as u64
                }
                Event::Exception { vector, error_code: None } => {
                    (1 << 31) | (3 << 8) | vector as u64
                }
                Event::Interrupt(vector) => (1 << 31) | vector as u64,
            };
            // SAFETY: current VMCS; a well-formed interruption-information value.
            unsafe {
                ctl::ENTRY_INTR_INFO.set(info);
                if let Event::Exception { error_code: Some(code), .. } = e {
                    ctl::ENTRY_EXCEPTION_ERR.set(code as u64);
                }
            }
            self.injected = true;
            // A guest halted without HLT exiting wakes for the injected event.
            // SAFETY: current VMCS; 0 is the active state.
            unsafe { g::ACTIVITY.set(0) };
        }
        fn set_interrupt_window(&mut self, on: bool) {
            let bit = PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
            let new = if on { self.procbased | bit } else { self.procbased & !bit };
            if new != self.procbased {
                self.procbased = new;
                // SAFETY: current VMCS; interrupt-window exiting is allowed (checked at setup).
                unsafe { ctl::PROCBASED.set(new as u64) };
            }
        }
        fn read_guest(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), HvError> {
            self.part.read(gpa, buf)
        }
        fn host_cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
            let r = raw_cpuid::native_cpuid::cpuid_count(leaf, subleaf);
            [r.eax, r.ebx, r.ecx, r.edx]
        }
        fn now(&mut self) -> u64 {
            arch::rdtsc()
        }
        fn send_ipi(&mut self, apic: u32, vector: u8) {
            arch::apic::send_fixed_ipi(apic, vector);
        }
        fn ept_map(&mut self, gpa: u64, hpa: u64, size: u64, write: bool) -> Result<(), HvError> {
            let perm = ept::Perm::shared(write);
            ept::map_with(self.frames, self.eptp & !0xfff, gpa, hpa, size, perm)?;
            // SAFETY: VMX on; this guest's EPTP.
            unsafe { arch::vmx::invept_single(self.eptp) };
            Ok(())
        }
        fn x_send(&mut self, to: usize, m: &vmcall_proto::channel::Payload) -> bool {
            self.link.try_send(to, m)
        }
        fn x_recv(&mut self) -> Option<(usize, vmcall_proto::channel::Payload)> {
            self.link.try_recv()
        }
        fn x_kick(&mut self, to: usize) {
            self.link.kick(to);
        }
        fn ept_unmap(&mut self, gpa: u64, size: u64) -> Result<(), HvError> {
            ept::unmap(self.frames, self.eptp & !0xfff, gpa, size)?;
            // SAFETY: VMX on; this guest's EPTP: no stale translation survives the unmap.
            unsafe { arch::vmx::invept_single(self.eptp) };
            Ok(())
        }
        fn pci_read32(&mut self, f: vmcall_proto::device::Bdf, offset: u16) -> u32 {
            crate::pci::ConfigSpace::read32(&mut crate::pci::Cf8, f, offset)
        }
        fn pci_write32(&mut self, f: vmcall_proto::device::Bdf, offset: u16, value: u32) {
            crate::pci::ConfigSpace::write32(&mut crate::pci::Cf8, f, offset, value)
        }
        fn link_down(&mut self, channel: u32) {
            let Some(pos) = self.chans.iter().position(|c| c.desc.index == channel) else {
                return;
            };
            // The status page: a frame of this core's private region, identity-mapped,
            // read-only to the guest, which is not running now.
            // SAFETY: `status` is that frame; a StatusPage is one page of u64s.
            let sp = unsafe { &mut *(self.status as *mut StatusPage) };
            sp.links[pos].word &= !1;
        }
        fn served(&mut self) {
            served_now();
        }
    }

    struct Console<'a> {
        name: &'a str,
        core: u32,
    }

    impl ConsoleSink for Console<'_> {
        fn line(&mut self, text: &str) {
            crate::console::line(format_args!("[{}@c{}] {}", self.name, self.core, text));
        }
    }

    fn adjust(caps: u64, wanted: u32, what: &'static str) -> Result<u32, &'static str> {
        crate::vmx::features::ControlCaps(caps).adjust(wanted).ok_or(what)
    }

    /// Writes the guest's boot page tables (see `vmcall_proto::guest`).
    fn boot_page_tables(p: &Partition) -> Result<(), HvError> {
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
    fn exitless_mwait(l: &Launch) -> bool {
        let asked = l.entry.flags & vmcall_proto::config::flags::MWAIT != 0;
        let has = raw_cpuid::native_cpuid::cpuid_count(1, 0).ecx & (1 << 3) != 0;
        asked && l.channel_count > 0 && has
    }

    /// The ports of the guest's own I/O BARs (opened in its I/O bitmap). The configuration
    /// ports are never among them: a BAR is sized from the device, and 0xCF8..0xCFF are
    /// the chipset's.
    fn io_ports(l: &Launch) -> impl Iterator<Item = u16> + '_ {
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
    fn quiesce_devices(l: &Launch) {
        // The device first (its own registers, then the command register: no DMA, no
        // INTx), then whatever it raised and the guest never acknowledged (while the line's
        // entry still carries its vector, so the EOI clears its remote IRR), then the line.
        for o in l.devices.iter() {
            if !crate::pci::quiesce_registers(o) {
                log::warn!(
                    "guest {}: {} did not come out of its reset in time",
                    name(l),
                    o.func.bdf
                );
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

    fn setup_vmcs(
        l: &Launch,
        f: &Features,
        frames: &mut Private,
        eptp: u64,
        entry: u64,
    ) -> Result<u32, &'static str> {
        let raw = &f.raw;
        // A guest with channels takes its doorbells straight through its own IDT: no exit
        // for external interrupts, and HLT really halts until the doorbell (or the
        // preemption timer) comes. Guests without channels keep both exits, so that a HLT
        // that can never wake is caught at once.
        let direct = l.channel_count > 0 || l.devices.count > 0;
        let mwait = exitless_mwait(l);
        // The guest's own I/O BARs pass without exits: then I/O bitmaps, else every port exits.
        let io_bitmap = io_ports(l).next().is_some();
        let mut pin_want = PinbasedControls::NMI_EXITING | PinbasedControls::VMX_PREEMPTION_TIMER;
        if !direct {
            pin_want |= PinbasedControls::EXTERNAL_INTERRUPT_EXITING;
        }
        let pin = adjust(raw.pinbased, pin_want.bits(), "pin-based controls")?;
        let cr8 = (1 << 19) | (1 << 20); // CR8-load and CR8-store exiting
        let proc = adjust(
            raw.procbased,
            (if direct { PrimaryControls::empty() } else { PrimaryControls::HLT_EXITING }
                | if io_bitmap {
                    PrimaryControls::USE_IO_BITMAPS
                } else {
                    PrimaryControls::UNCOND_IO_EXITING
                }
                | PrimaryControls::USE_MSR_BITMAPS
                | if mwait {
                    PrimaryControls::empty()
                } else {
                    PrimaryControls::MWAIT_EXITING | PrimaryControls::MONITOR_EXITING
                }
                | PrimaryControls::SECONDARY_CONTROLS)
                .bits()
                | cr8,
            "primary processor-based controls",
        )?;
        adjust(
            raw.procbased,
            PrimaryControls::INTERRUPT_WINDOW_EXITING.bits(),
            "interrupt-window exiting",
        )?;
        let proc2 = secondary_controls(crate::vmx::features::ControlCaps(raw.procbased2))
            .ok_or("secondary controls")?;
        let exitc = adjust(
            raw.exit,
            (ExitControls::HOST_ADDRESS_SPACE_SIZE
                | ExitControls::ACK_INTERRUPT_ON_EXIT
                | ExitControls::SAVE_IA32_EFER
                | ExitControls::LOAD_IA32_EFER
                | ExitControls::SAVE_IA32_PAT
                | ExitControls::LOAD_IA32_PAT)
                .bits(),
            "exit controls",
        )?;
        let entryc = adjust(
            raw.entry,
            (EntryControls::IA32E_MODE_GUEST
                | EntryControls::LOAD_IA32_EFER
                | EntryControls::LOAD_IA32_PAT)
                .bits(),
            "entry controls",
        )?;

        // MSR bitmap: every access exits but the pass-through and switched lists (SDM Vol.
        // 3C 25.6.9).
        let bitmap = ept::Frames::alloc(frames).ok_or("private region exhausted")?;
        // SAFETY: a frame of this core's private region, identity-mapped.
        let bm = unsafe { core::slice::from_raw_parts_mut(bitmap as *mut u8, 4096) };
        bm.fill(0xff);
        for msr in exits::MSR_PASSTHROUGH.into_iter().chain(exits::MSR_SWITCHED) {
            let bit = (msr & 0x1fff) as usize;
            let high = if msr >= 0xc000_0000 { 1024 } else { 0 };
            for base in [high, 2048 + high] {
                bm[base + bit / 8] &= !(1 << (bit % 8));
            }
        }
        if direct {
            // Writes to the x2APIC EOI register: the doorbell and device handlers acknowledge
            // their own interrupts. EOI only retires the highest in-service vector, which on
            // this core can only be the guest's own (its doorbell or its devices' vectors):
            // the hypervisor takes no interrupts, and device lines reach only their owner.
            let bit = exits::MSR_X2APIC_EOI as usize;
            bm[2048 + bit / 8] &= !(1 << (bit % 8));
        }

        // SAFETY: this core's slot is initialised; reading its own tables' addresses.
        let me = unsafe { crate::percpu::this_core() };
        // SAFETY: EFER exists on every processor with long mode.
        let efer = unsafe { arch::rdmsr(x86::msr::IA32_EFER) };
        // SAFETY: PAT exists on every processor with VMX (the VMCS has a field for it).
        let pat = unsafe { arch::rdmsr(x86::msr::IA32_PAT) };
        let guest_cr0 =
            crate::vmx::features::fix_cr(0x8001_0033, raw.cr0_fixed0, raw.cr0_fixed1, 0x8000_0001)
                .ok_or("guest CR0 fixed bits")?;
        let guest_cr4 = (0x20 | raw.cr4_fixed0) & raw.cr4_fixed1;
        let w = |fld: crate::vmx::vmcs::Rw, v: u64| -> Result<(), &'static str> {
            // Values computed above from the capability MSRs and our own tables.
            // SAFETY: this core's fresh VMCS is current.
            unsafe { fld.write(v) }.map_err(|_| "VMWRITE failed")
        };
        w(ctl::PINBASED, pin as u64)?;
        w(ctl::PROCBASED, proc as u64)?;
        w(ctl::PROCBASED2, proc2 as u64)?;
        w(ctl::EXIT, exitc as u64)?;
        w(ctl::ENTRY, entryc as u64)?;
        w(ctl::EXCEPTION_BITMAP, 0)?;
        w(ctl::CR3_TARGET_COUNT, 0)?;
        w(ctl::MSR_BITMAP, bitmap)?;
        if io_bitmap {
            // I/O bitmaps (SDM Vol. 3C 25.6.4): every port exits but the owner's I/O BARs.
            let a = ept::Frames::alloc(frames).ok_or("private region exhausted")?;
            let b = ept::Frames::alloc(frames).ok_or("private region exhausted")?;
            for frame in [a, b] {
                // SAFETY: fresh frames of this core's private region, identity-mapped.
                unsafe { (frame as *mut u8).write_bytes(0xff, 4096) };
            }
            for port in io_ports(l) {
                let (frame, bit) = if port < 0x8000 { (a, port) } else { (b, port - 0x8000) };
                // SAFETY: as above; `bit / 8` < 4096.
                unsafe { *((frame + bit as u64 / 8) as *mut u8) &= !(1 << (bit % 8)) };
            }
            w(ctl::IO_BITMAP_A, a)?;
            w(ctl::IO_BITMAP_B, b)?;
        }
        w(ctl::EPTP, eptp)?;
        w(ctl::VPID, (l.guest_id + 1) as u64)?;
        w(ctl::CR0_MASK, exits::CR0_MASK)?;
        w(ctl::CR0_SHADOW, guest_cr0)?;
        w(ctl::CR4_MASK, exits::CR4_MASK)?;
        w(ctl::CR4_SHADOW, guest_cr4 & !(1 << 13))?;

        w(h::CR0, arch::read_cr0())?;
        w(h::CR3, arch::read_cr3())?;
        w(h::CR4, arch::read_cr4())?;
        w(h::CS_SEL, crate::arch::gdt::CODE_SELECTOR as u64)?;
        for s in [h::SS_SEL, h::DS_SEL, h::ES_SEL] {
            w(s, crate::arch::gdt::DATA_SELECTOR as u64)?;
        }
        w(h::FS_SEL, 0)?;
        w(h::GS_SEL, 0)?;
        w(h::TR_SEL, crate::arch::gdt::TSS_SELECTOR as u64)?;
        w(h::FS_BASE, 0)?;
        w(h::GS_BASE, arch::read_gs_base())?;
        w(h::TR_BASE, &me.tss as *const _ as u64)?;
        w(h::GDTR_BASE, me.gdt.as_ptr() as u64)?;
        w(h::IDTR_BASE, &me.idt as *const _ as u64)?;
        w(h::EFER, efer)?;
        w(h::PAT, pat)?;
        w(h::SYSENTER_CS, 0)?;
        w(h::SYSENTER_ESP, 0)?;
        w(h::SYSENTER_EIP, 0)?;
        w(h::RIP, arch::vmx::exit_landing())?;

        w(g::CR0, guest_cr0)?;
        w(g::CR3, BOOT_PML4_GPA)?;
        w(g::CR4, guest_cr4)?;
        w(g::DR7, 0x400)?;
        w(g::RSP, BOOT_STACK_TOP)?;
        w(g::RIP, entry)?;
        w(g::RFLAGS, 0x2)?;
        w(g::CS_SEL, 0x08)?;
        w(g::CS_BASE, 0)?;
        w(g::CS_LIMIT, 0xffff_ffff)?;
        w(g::CS_AR, 0xa09b)?;
        for (sel, base, limit, ar) in [
            (g::SS_SEL, g::SS_BASE, g::SS_LIMIT, g::SS_AR),
            (g::DS_SEL, g::DS_BASE, g::DS_LIMIT, g::DS_AR),
            (g::ES_SEL, g::ES_BASE, g::ES_LIMIT, g::ES_AR),
            (g::FS_SEL, g::FS_BASE, g::FS_LIMIT, g::FS_AR),
            (g::GS_SEL, g::GS_BASE, g::GS_LIMIT, g::GS_AR),
        ] {
            w(sel, 0x10)?;
            w(base, 0)?;
            w(limit, 0xffff_ffff)?;
            w(ar, 0xc093)?;
        }
        w(g::LDTR_SEL, 0)?;
        w(g::LDTR_BASE, 0)?;
        w(g::LDTR_LIMIT, 0)?;
        w(g::LDTR_AR, 0x1_0000)?; // unusable
        w(g::TR_SEL, 0)?;
        w(g::TR_BASE, 0)?;
        w(g::TR_LIMIT, 0x67)?;
        w(g::TR_AR, 0x8b)?; // busy 64-bit TSS
        w(g::GDTR_BASE, 0)?;
        w(g::GDTR_LIMIT, 0)?;
        w(g::IDTR_BASE, 0)?;
        w(g::IDTR_LIMIT, 0)?;
        w(g::EFER, 0x500)?; // LME | LMA
        w(g::PAT, pat)?;
        w(g::INTERRUPTIBILITY, 0)?;
        w(g::ACTIVITY, 0)?;
        w(g::PENDING_DBG, 0)?;
        w(g::LINK_PTR, u64::MAX)?;
        w(g::SYSENTER_CS, 0)?;
        w(g::SYSENTER_ESP, 0)?;
        w(g::SYSENTER_EIP, 0)?;
        Ok(proc)
    }

    /// The exit of the current VMCS: the reason is read at once, every other field when a
    /// handler asks (one VMREAD each).
    struct VmcsExit {
        /// The full exit-reason field (bit 31: the VM entry failed).
        raw: u64,
    }

    impl VmcsExit {
        fn read() -> Self {
            // SAFETY: the guest's VMCS is current; exit-information fields are readable.
            VmcsExit { raw: unsafe { exit::REASON.read() } }
        }
    }

    impl ExitInfo for VmcsExit {
        fn reason(&self) -> u16 {
            self.raw as u16
        }
        fn entry_failed(&self) -> bool {
            self.raw & (1 << 31) != 0
        }
        fn qualification(&self) -> u64 {
            // SAFETY: the guest's VMCS is current until the next VM entry.
            unsafe { exit::QUALIFICATION.read() }
        }
        fn instruction_len(&self) -> u64 {
            // SAFETY: as above.
            unsafe { exit::INSTRUCTION_LEN.read() }
        }
        fn rip(&self) -> u64 {
            // Handlers move RIP only after they last ask for it (`advance` ends a handler).
            // SAFETY: as above.
            unsafe { g::RIP.read() }
        }
        fn guest_physical(&self) -> u64 {
            // SAFETY: as above.
            unsafe { exit::GUEST_PHYSICAL.read() }
        }
    }

    fn report(ctx: &GuestCtx, ending: Ending, first: u64) -> GuestReport {
        GuestReport {
            ending,
            exits: ctx.exits,
            exits_other: ctx.exits_other,
            hypercalls: ctx.hypercalls,
            doorbells: u64::from(ctx.doorbells_rung),
            tsc_first_entry: first,
            tsc_end: arch::rdtsc(),
            xmsgs: 0,
            nmis: 0,
            caps: ctx.caps.stats,
            foreign_tsc: ctx.foreign_tsc,
            incarnations: 1,
            unconfirmed: 0,
            longest_away: 0,
        }
    }

    /// This core serves its inbox now (see `percpu::PerCore::served`).
    fn served_now() {
        // SAFETY: a core runs guests only after its `init_this_core`.
        unsafe { crate::percpu::this_core() }.served(arch::rdtsc());
    }

    /// The hypervisor side of a core once its guest is over for good: no guest to enter,
    /// no EPT to change (the dead guest's space holds nothing mapped and takes nothing in).
    struct Serving<'a>(&'a mut crate::instance::xcore::Link);

    impl crate::caps::Env for Serving<'_> {
        fn now(&mut self) -> u64 {
            arch::rdtsc()
        }
        fn send(&mut self, to: usize, m: &vmcall_proto::channel::Payload) -> bool {
            self.0.try_send(to, m)
        }
        fn recv(&mut self) -> Option<(usize, vmcall_proto::channel::Payload)> {
            self.0.try_recv()
        }
        fn kick(&mut self, to: usize) {
            self.0.kick(to)
        }
        fn ept_map(&mut self, _: u64, _: u64, _: u64, _: bool) -> Result<(), HvError> {
            Err(HvError::PeerGone)
        }
        fn ept_unmap(&mut self, _: u64, _: u64) -> Result<(), HvError> {
            Err(HvError::NotMapped)
        }
        fn relax(&mut self) {
            arch::pause();
        }
        fn served(&mut self) {
            served_now();
        }
    }

    /// The counters `COUNTER` reads, from an incarnation's report.
    fn counters_of(r: &GuestReport) -> [u64; 3] {
        let exits = r.exits.iter().map(|&e| u64::from(e)).sum::<u64>() + u64::from(r.exits_other);
        [exits, u64::from(r.hypercalls), r.doorbells]
    }

    /// Readies what a dead incarnation leaves for the next: memory the guest owns scrubbed,
    /// capabilities accepted again.
    fn rebirth(caps: &mut crate::caps::HvCaps, link: &mut crate::instance::xcore::Link) {
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
                caps.poll(&mut Serving(link));
            }
        }
        caps.reborn();
    }

    /// Sets up and runs the guest of `l` on this core, again as its restart policy and its
    /// controllers say (each time a new incarnation from the same kernel and config, after a
    /// clean death of the last one), hands its report to `post` once it is down for good,
    /// then keeps serving inter-core requests while `keep_serving` says so.
    pub fn run(
        l: &Launch,
        f: &Features,
        core: u32,
        post: impl FnOnce(GuestReport, &mut dyn FnMut()),
        keep_serving: impl Fn(u64) -> bool,
    ) -> u64 {
        use crate::caps::control::Control;
        let tsc_per_ms = arch::tsc::ticks_per_ms();
        let policy = crate::caps::Policy {
            deadline: l.caps_deadline_ms.saturating_mul(tsc_per_ms),
            revoke: l.revoke,
            ..crate::caps::Policy::from_tsc_per_ms(tsc_per_ms)
        };
        let mut caps = caps_of_this_core(core as usize, policy);
        let period = l.probe_ms.saturating_mul(tsc_per_ms);
        let timing = crate::members::Timing {
            period,
            // Eight periods; with the detector off, what a view change's answers may take.
            timeout: if period == 0 {
                tsc_per_ms.saturating_mul(200)
            } else {
                period.saturating_mul(8)
            },
            // Cores start seconds apart (the BSP enters its guest after every AP is up).
            grace: tsc_per_ms.saturating_mul(4_000),
        };
        caps.members =
            crate::members::Members::new(core as usize, l.members, timing, arch::rdtsc());
        let keep_serving = |caps: &crate::caps::HvCaps| keep_serving(caps.members.fenced());
        if l.deaf {
            log::warn!("fault injection: this core will not answer capability revokes");
            caps.deafen();
        }
        let mut link = crate::instance::xcore::Link::new(core as usize);
        let mut total: Option<GuestReport> = None;
        let mut counts = [LinkCount::default(); MAX_CHANNELS_PER_GUEST];
        let mut lc = Lifecycle::new(lifecycle::Policy {
            restart: lifecycle::Restart::from_config(l.entry.restart),
            max_restarts: u32::from(l.entry.max_restarts),
            controllers: l.controllers,
        });
        // The lifecycle decides; this loop does what it says and tells it what happened.
        let mut fx = lc.begin();
        loop {
            let mut next = None;
            let mut gone = false;
            for e in fx.iter() {
                match e {
                    Effect::Answer { to, req, answer } => {
                        Control::answer(&mut Serving(&mut link), to, req, answer)
                    }
                    Effect::Rebirth => rebirth(caps, &mut link),
                    Effect::Start { n, cause } => {
                        match cause {
                            Cause::First => {}
                            Cause::Policy(k) => log::info!(
                                "guest {}: restarting ({k} of {})",
                                name(l),
                                l.entry.max_restarts
                            ),
                            Cause::Controller => {
                                log::info!(
                                    "guest {}: starting again (its controller asked)",
                                    name(l)
                                )
                            }
                            Cause::Rejoined => log::info!("guest {}: its core is back in", name(l)),
                        }
                        let (r, back) =
                            incarnation(l, f, core, n, caps, &mut link, &mut lc, &mut counts);
                        caps = back;
                        next = Some(if lc.phase() == Phase::Setup {
                            match r.ending {
                                Ending::Stopped(StopReason::Setup(why)) => Life::SetupFailed(why),
                                _ => Life::SetupFailed("setup failed"),
                            }
                        } else {
                            Life::Dead {
                                unconfirmed: r.unconfirmed,
                                counters: counters_of(&r),
                                run_over: arch::rdtsc() >= l.end_tsc,
                            }
                        });
                        match &mut total {
                            Some(t) => t.absorb(&r),
                            None => total = Some(r),
                        }
                    }
                    Effect::Leave => next = Some(Life::Left(leave(l, core, caps, &mut link))),
                    Effect::Join { via } => {
                        next = Some(Life::Joined(join(l, core, caps, &mut link, via)))
                    }
                    Effect::Gone => gone = true,
                    // Only while an incarnation runs or dies (`incarnation` performs them).
                    Effect::Stop(_) | Effect::Die(_) => {}
                }
            }
            if gone {
                break;
            }
            let event = match (next, lc.phase()) {
                (Some(e), _) => e,
                // Down: its controllers may start it again until each has let go (unless the
                // hypervisor could not set it up or keep it isolated). Parked: no guest, not
                // probed; it still answers whatever other cores ask (revokes find nothing,
                // queries say parked) until a controller brings it back, or until none can.
                (None, phase @ (Phase::Down | Phase::Parked)) => {
                    let until = if phase == Phase::Parked {
                        l.give_up_tsc.min(l.end_tsc)
                    } else {
                        l.give_up_tsc
                    };
                    loop {
                        if l.controllers & !caps.ctl.released == 0
                            || (phase == Phase::Down && !keep_serving(caps))
                            || arch::rdtsc() >= until
                        {
                            break Life::Unattended;
                        }
                        caps.poll(&mut Serving(&mut link));
                        log_views(caps, core);
                        if let Some((from, req, op)) = caps.ctl.take() {
                            break Life::Request(Request { from, req, op }, [0; 3]);
                        }
                        arch::pause();
                    }
                }
                (None, phase) => {
                    log::error!("guest {}: lifecycle stuck in {phase:?}: down for good", name(l));
                    break;
                }
            };
            fx = lc.step(event);
        }
        // Gone for good: the guests it controlled no longer wait for it (all of them, even
        // if its space never got their caps).
        for &(t, _) in &l.targets[..l.target_count] {
            Control::release(&mut Serving(&mut link), t as usize);
        }
        if let Some(mut r) = total {
            if let Some(ending) = lc.ending() {
                // The run's end noticed between two incarnations included.
                r.ending = ending;
            }
            r.xmsgs = link.sent;
            r.nmis = link.nmis;
            // SAFETY: this core's slot is initialised (it runs guests).
            r.longest_away = unsafe { crate::percpu::this_core() }.longest_away();
            // What posting writes (the exit trace) takes a while: the inbox is served
            // between its records.
            let caps_now = &mut *caps;
            post(r, &mut || {
                caps_now.poll(&mut Serving(&mut link));
            });
        }
        // The guest is gone but other cores may still revoke copies they made (their
        // requests find nothing here and are answered at once), or ask about it: keep
        // answering until told to stop.
        while keep_serving(caps) {
            caps.poll(&mut Serving(&mut link));
            log_views(caps, core);
            if let Some((from, req, op)) = caps.ctl.take() {
                for e in lc.step(Life::Request(Request { from, req, op }, [0; 3])).iter() {
                    if let Effect::Answer { to, req, answer } = e {
                        Control::answer(&mut Serving(&mut link), to, req, answer);
                    }
                }
            }
            arch::pause();
        }
        // The run ends: the other cores stop probing (none is taken for hung while the
        // BSP writes the summary).
        caps.members.end(&mut Serving(&mut link));
        log_views(caps, core);
        caps.members.fenced()
    }

    /// `inject=hung-core`: this core's hypervisor stops answering anything, for good
    /// (interrupts stay off; a kick's NMI returns to the spin).
    fn hang(core: u32) -> ! {
        log::warn!("inject=hung-core: core {core} stops answering from now on");
        crate::record!(vmcall_proto::record::kind::HANG, "core={core} tsc={}", arch::rdtsc());
        loop {
            arch::pause();
        }
    }

    /// Logs the membership views this core installed since the last call.
    fn log_views(caps: &mut crate::caps::HvCaps, core: u32) {
        use vmcall_proto::record::{kind, Quoted};
        let suspected = core::mem::take(&mut caps.suspected_unlogged);
        for target in (0..64).filter(|c| suspected & (1 << c) != 0) {
            crate::record!(kind::SUSPECT, "core={core} target={target} tsc={}", arch::rdtsc());
        }
        while let Some(ch) = caps.members.take_change() {
            let (gone, new) = (ch.old.set & !ch.new.set, ch.new.set & !ch.old.set);
            log::info!(
                "membership view {}: cores {} (out: {}, in: {}; coordinated by core {})",
                ch.new.num,
                CoreSet(ch.new.set),
                CoreSet(gone),
                CoreSet(new),
                ch.by
            );
            crate::record!(
                kind::VIEW,
                "core={core} num={} members={} by={} tsc={}",
                ch.new.num,
                Quoted(CoreSet(ch.new.set)),
                ch.by,
                arch::rdtsc()
            );
        }
    }

    /// Core indices of a set, space-separated.
    struct CoreSet(u64);

    impl core::fmt::Display for CoreSet {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            let mut first = true;
            for c in (0..64).filter(|c| self.0 & (1 << c) != 0) {
                if !first {
                    f.write_str(" ")?;
                }
                write!(f, "{c}")?;
                first = false;
            }
            Ok(())
        }
    }

    /// Takes this core out of the membership view (a controller's `PARK`, its guest down):
    /// whether it is out in time. If not, it stays in (a later start must not run the guest
    /// while the old leave commits).
    fn leave(
        l: &Launch,
        core: u32,
        caps: &mut crate::caps::HvCaps,
        link: &mut crate::instance::xcore::Link,
    ) -> bool {
        let wait = caps.members.timeout().saturating_mul(4);
        caps.members.leave(&mut Serving(link));
        let deadline = arch::rdtsc().saturating_add(wait);
        while caps.members.member() && arch::rdtsc() < deadline {
            caps.poll(&mut Serving(link));
            log_views(caps, core);
            arch::pause();
        }
        if caps.members.member() {
            log::warn!("guest {}: its core could not leave the view in time", name(l));
            caps.members.stay(&mut Serving(link));
            return false;
        }
        log::info!("guest {}: its core is out of the view, parked", name(l));
        true
    }

    /// Brings this parked core back into the membership view through core `via` (a
    /// controller's start): whether it is back in time.
    fn join(
        l: &Launch,
        core: u32,
        caps: &mut crate::caps::HvCaps,
        link: &mut crate::instance::xcore::Link,
        via: usize,
    ) -> bool {
        let wait = caps.members.timeout().saturating_mul(4);
        caps.members.join(&mut Serving(link), via);
        let deadline = arch::rdtsc().saturating_add(wait);
        while !caps.members.member() && arch::rdtsc() < deadline {
            caps.poll(&mut Serving(link));
            log_views(caps, core);
            arch::pause();
        }
        if !caps.members.member() {
            log::warn!("guest {}: its core could not rejoin the view in time", name(l));
        }
        caps.members.member()
    }

    /// A channel's counters across incarnations: messages lost to resets, resets.
    #[derive(Clone, Copy, Default)]
    struct LinkCount {
        lost: u64,
        resets: u64,
    }

    /// Resets a channel's rings (zeroes both) and returns how many messages were in flight
    /// (sent and not received, both directions, as the guest-written counters say). Only
    /// before a new incarnation starts, once the peer's core acknowledged the channel down
    /// (or its guest is dead or its core does not answer: the epoch tags keep what it
    /// writes late out of the new epoch).
    fn reset_rings(ch: &ChanMap) -> u64 {
        let slots = ch.desc.slots;
        let ring = vmcall_proto::channel::ring_pages_bytes(slots);
        // The channel's rings: allocated by the BSP, identity-mapped, `ch.size` bytes.
        // SAFETY: reads through the ring's atomics only, then zeroed while nobody uses it.
        let lost = unsafe {
            let a = vmcall_proto::channel::Ring::from_raw(ch.hpa as *mut u8, slots);
            let b = vmcall_proto::channel::Ring::from_raw((ch.hpa + ring) as *mut u8, slots);
            // Guest-written counters: saturating, never trusted.
            a.sent()
                .saturating_sub(a.received())
                .saturating_add(b.sent().saturating_sub(b.received()))
        };
        // SAFETY: as above; no end is using the rings (the caller's condition).
        unsafe { (ch.hpa as *mut u8).write_bytes(0, ch.size as usize) };
        lost
    }

    /// Brings the status page at `page` up to date with what this core knows of the
    /// channels' peers.
    fn publish_links(
        page: u64,
        l: &Launch,
        caps: &mut crate::caps::HvCaps,
        counts: &[LinkCount; MAX_CHANNELS_PER_GUEST],
    ) {
        let n = caps.incarnation();
        for (pos, count) in counts.iter().enumerate().take(l.channel_count) {
            let Some(link) = caps.take_link(pos) else { continue };
            // A frame of this core's private region, identity-mapped; the guest maps it
            // read-only and is not running now.
            // SAFETY: `page` is that frame; a StatusPage is exactly one page of u64s.
            let sp = unsafe { &mut *(page as *mut StatusPage) };
            let ls = &mut sp.links[pos];
            ls.word = link_word(link.peer_up, link.epoch(n));
            ls.lost = count.lost;
            ls.resets = count.resets;
        }
    }

    /// Brings the telemetry in the status page at `page` up to date before a VM entry:
    /// `reason` is the exit just handled (its counter is the only one that moved),
    /// `hv_ticks` the hypervisor's time since that exit. A dozen stores per entry.
    fn publish_telemetry(page: u64, ctx: &GuestCtx, hv_ticks: u64, reason: Option<u16>) {
        // A frame of this core's private region, identity-mapped, read-only to the guest,
        // which is not running now.
        // SAFETY: `page` is that frame; a StatusPage is exactly one page of u64s.
        let t = unsafe { &mut (*(page as *mut StatusPage)).telemetry };
        match reason.map(usize::from) {
            Some(r) if r < t.exits.len() && r < ctx.exits.len() => t.exits[r] = ctx.exits[r] as u64,
            Some(_) => t.exits_other = ctx.exits_other as u64,
            None => {}
        }
        t.hypercalls = ctx.hypercalls as u64;
        t.doorbells = ctx.doorbells_rung as u64;
        t.entries += 1;
        t.hypervisor_tsc = t.hypervisor_tsc.saturating_add(hv_ticks);
        t.nmis = arch::nmis_taken();
    }

    /// Brings every counter of the telemetry up to date once an incarnation is over (the
    /// exit that ended it included), `hv_ticks` the hypervisor's time since that exit. Not
    /// an entry: `entries` stays.
    fn publish_final(page: u64, ctx: &GuestCtx, hv_ticks: u64) {
        // SAFETY: as in `publish_telemetry`; the guest no longer runs.
        let t = unsafe { &mut (*(page as *mut StatusPage)).telemetry };
        for (p, &c) in t.exits.iter_mut().zip(&ctx.exits) {
            *p = u64::from(c);
        }
        t.exits_other = u64::from(ctx.exits_other);
        t.hypercalls = u64::from(ctx.hypercalls);
        t.doorbells = u64::from(ctx.doorbells_rung);
        t.hypervisor_tsc = t.hypervisor_tsc.saturating_add(hv_ticks);
        t.nmis = arch::nmis_taken();
    }

    /// Copies the channels' message counts into the status page at `page` (see
    /// `telemetry::Traffic`).
    #[cold]
    #[inline(never)]
    fn refresh_traffic(traffic: &mut telemetry::Traffic, page: u64, now: u64) {
        // The page is a frame of this core's private region, identity-mapped; the rings were
        // allocated by the BSP for the whole run, identity-mapped, accessed atomically.
        // SAFETY: so both `Traffic::refresh`'s condition and the reference hold.
        unsafe { traffic.refresh(&mut *(page as *mut StatusPage), now) };
    }

    /// One incarnation (the `n`th) of the guest: set up from the kernel and config, run until
    /// it ends, then its clean death (its capabilities retired, its VMCS cleared; the
    /// private region goes back whole, the partition is zeroed before the next use).
    /// `lc` hears that it is entered, the controllers' requests while it runs, and its
    /// ending, and says what to answer and the steps of its death. Returns its report and the
    /// capability state for the next incarnation.
    #[allow(clippy::too_many_arguments)]
    fn incarnation(
        l: &Launch,
        f: &Features,
        core: u32,
        n: u32,
        caps: &'static mut crate::caps::HvCaps,
        link: &mut crate::instance::xcore::Link,
        lc: &mut Lifecycle,
        counts: &mut [LinkCount; MAX_CHANNELS_PER_GUEST],
    ) -> (GuestReport, &'static mut crate::caps::HvCaps) {
        use crate::caps::control::Control;
        let tsc_start = arch::rdtsc();
        let tsc_per_ms = arch::tsc::ticks_per_ms();
        let budget_ticks = l.watchdog_ms.saturating_mul(tsc_per_ms);
        let watchdog = arch::rdtsc().saturating_add(budget_ticks);
        let mut ctx =
            GuestCtx::new(l.guest_id, core, l.entry.memory_mib, tsc_per_ms, watchdog, caps);
        // Setup failures end the incarnation before it ran.
        let stop = |ctx: GuestCtx, why: &'static str| {
            let r = report(&ctx, Ending::Stopped(StopReason::Setup(why)), 0);
            let start = Start { tsc: tsc_start, frames: 0, caps: 0 };
            incarnation_record(l, n, &r, start, &Default::default(), LinkCount::default());
            (r, ctx.caps)
        };
        // The guest's capabilities and channels first, before anything serves the inbox
        // (zeroing below, or the down state after a failed setup): a peer's `LINK_DOWN`, an
        // `INSERT` or a revoke that arrives meanwhile then finds the channel it names and
        // gets its defined answer (`LINK_ACK`; `NotAccepted` until the guest accepts).
        if n == 1 {
            for &(base, size) in &l.grants[..l.grant_count] {
                if ctx.caps.grant(base, size).is_err() {
                    return stop(ctx, "capability space full");
                }
            }
            for ch in l.channels() {
                if ctx.caps.add_channel(ch.desc.index, ch.peer_core).is_err() {
                    return stop(ctx, "capability space full");
                }
            }
            for &(core, guest) in &l.targets[..l.target_count] {
                if ctx.caps.add_control(core, guest as u32).is_err() {
                    return stop(ctx, "capability space full");
                }
            }
        }
        let part = Partition { base: l.partition, size: l.partition_size };
        // The pool ends below the status frame, which stays where it is for the whole run.
        let mut frames = Private::new(Identity, l.private, l.status_frame());

        // SAFETY: the kernel module is reserved memory, identity-mapped, never written.
        let image = unsafe {
            core::slice::from_raw_parts(l.kernel.0 as *const u8, (l.kernel.1 - l.kernel.0) as usize)
        };
        let plan = match loader::plan(image, part.size) {
            Ok(p) => p,
            Err(e) => {
                log::error!("guest {}: kernel ELF rejected: {e}", name(l));
                return stop(ctx, "kernel ELF rejected");
            }
        };
        // Its devices stop before the memory they may still write is scrubbed: the first
        // time from whatever state the firmware left them in (later incarnations follow a
        // death, which already quiesced them).
        if n == 1 {
            quiesce_devices(l);
        }
        // Nothing of a previous incarnation (or of whoever had the memory before) survives.
        part.zero(|| {
            ctx.caps.poll(&mut Serving(link));
        });
        for s in plan.segments() {
            let data = &image[s.file_offset as usize..(s.file_offset + s.file_size) as usize];
            // A kernel may be 16 MiB: copied a chunk at a time, serving between.
            for (k, piece) in data.chunks(SERVE_EVERY_BYTES as usize).enumerate() {
                if part.write(s.gpa + (k as u64 * SERVE_EVERY_BYTES), piece).is_err() {
                    return stop(ctx, "kernel segment outside the partition");
                }
                ctx.caps.poll(&mut Serving(link));
            }
        }
        let mut bi = BootInfo::new_zeroed();
        bi.magic = BOOT_INFO_MAGIC;
        bi.version = BOOT_INFO_VERSION;
        bi.guest_id = l.guest_id;
        bi.core = core;
        bi.memory_bytes = part.size;
        bi.tsc_per_ms = tsc_per_ms;
        bi.name = l.entry.name;
        bi.workload = l.entry.workload;
        bi.args = l.entry.args;
        bi.incarnation = n;
        bi.dma_offset = part.base;
        for (d, o) in bi.devices.iter_mut().zip(l.devices.iter()) {
            *d = o.desc();
        }
        bi.device_count = l.devices.count as u32;
        if boot_page_tables(&part).is_err() {
            return stop(ctx, "partition too small for the boot structures");
        }

        let windows = l
            .channels()
            .iter()
            .map(|ch| (vmcall_proto::guest::channel_window(ch.desc.index), ch.hpa, ch.size));
        let eptp = match build_ept(&mut frames, part.base, part.size, windows) {
            Ok(root) => ept::eptp(root),
            Err(why) => return stop(ctx, why),
        };
        // The owner's memory BARs in its device window, uncached, never executable; each
        // checked as built.
        if l.devices.count > 0 && !crate::arch::apic::x2apic_mode() {
            return stop(ctx, "its core's local APIC is not in x2APIC mode: device interrupts could not be acknowledged");
        }
        for o in l.devices.iter() {
            for (b, &gpa) in o.func.bars.iter().zip(&o.gpa) {
                if b.kind != vmcall_proto::device::bar_kind::MEMORY || b.size == 0 {
                    continue;
                }
                let len = b.size.max(4096);
                let root = eptp & !0xfff;
                let rw = ept::Perm::Device.bits();
                let ok = ept::map_with(&mut frames, root, gpa, b.base, len, ept::Perm::Device)
                    .is_ok()
                    && ept::translate_perm(&mut frames, root, gpa) == Some((b.base, rw))
                    && ept::translate(&mut frames, root, gpa + len - 1) == Some(b.base + len - 1);
                if !ok {
                    return stop(ctx, "device BAR mapping failed");
                }
            }
            if let Some(line) = o.line() {
                // SAFETY: this core's slot is initialised.
                let apic = unsafe { crate::percpu::this_core() }.apic_id as u32;
                if let Err(why) = crate::pci::ioapic::route(line, o.vector, apic) {
                    log::error!("guest {}: {}: interrupt not routed: {why}", name(l), o.func.bdf);
                    return stop(ctx, "a device's interrupt could not be routed to its core");
                }
            }
        }
        ctx.pci = crate::pci::filter::View::new(&l.devices);
        // The status page: the fixed last frame of the private region, read-only to the
        // guest (and to its controllers, through their target windows), zeroed for each
        // incarnation.
        let status = l.status_frame();
        // The frame is this core's private region's last, identity-mapped, outside the pool;
        // others only read it.
        // SAFETY: so this core may write it whole.
        unsafe {
            (status as *mut u8).write_bytes(0, 4096);
            (*(status as *mut StatusPage)).incarnation = u64::from(n);
        }
        if ept::map_with(&mut frames, eptp & !0xfff, STATUS_GPA, status, 4096, ept::Perm::Read)
            .is_err()
        {
            return stop(ctx, "status page mapping failed");
        }
        // The status pages of the guests it controls, read-only, one window each.
        if let Err(why) = telemetry::map_target_windows(
            &mut frames,
            eptp & !0xfff,
            &l.target_status[..l.target_count],
        ) {
            return stop(ctx, why);
        }
        let mut traffic =
            telemetry::Traffic::new(l.channels(), tsc_per_ms.saturating_mul(TRAFFIC_REFRESH_MS));
        for (i, ch) in l.channels().iter().enumerate() {
            bi.channels[i] = ch.desc;
            ctx.doorbells[i] = ch.peer_apic;
        }
        bi.channel_count = l.channel_count as u32;
        if part.write(BOOT_INFO_GPA, bi.as_bytes()).is_err() {
            return stop(ctx, "partition too small for the boot structures");
        }
        let Some(vmcs) = ept::Frames::alloc(&mut frames) else {
            return stop(ctx, "private region exhausted");
        };
        // SAFETY: a fresh page of this core's private region; VMX is on for this core.
        let loaded = unsafe {
            (vmcs as *mut u32).write(f.revision);
            arch::vmx::vmclear(vmcs).and_then(|()| arch::vmx::vmptrld(vmcs))
        };
        if loaded.is_err() {
            return stop(ctx, "VMCLEAR/VMPTRLD failed");
        }
        // Flush any stale translation (a previous incarnation's included).
        // SAFETY: VMX on; the VPID and EPTP are this guest's.
        unsafe {
            arch::vmx::invvpid_single((l.guest_id + 1) as u16);
            arch::vmx::invept_single(eptp);
        }
        // From here a failure clears the VMCS before it ends the incarnation: its frame goes
        // back to the pool, and an active VMCS must not be written as memory (SDM Vol. 3C
        // 25.11.1).
        let unload = |ctx: GuestCtx, why: &'static str| {
            // SAFETY: the VMCS is this core's, current; clearing it ends its use.
            let _ = unsafe { arch::vmx::vmclear(vmcs) };
            stop(ctx, why)
        };
        let procbased = match setup_vmcs(l, f, &mut frames, eptp, plan.entry) {
            Ok(p) => p,
            Err(what) => {
                log::error!("guest {}: VMCS setup: {what}", name(l));
                return unload(ctx, "VMCS setup failed");
            }
        };
        ctx.mwait = exitless_mwait(l);
        if ctx.mwait && n == 1 {
            log::info!("guest {}: exitless waiting: MONITOR/MWAIT without VM exits", name(l));
        }
        let mut sink = Console { name: name(l), core };
        let frames_at_start = frames.in_use();
        let caps_at_start = ctx.caps.live_caps();
        let mut vcpu = VmcsVcpu {
            regs: GuestRegs { rdi: BOOT_INFO_GPA, ..Default::default() },
            part: &part,
            procbased,
            injected: false,
            frames: &mut frames,
            eptp,
            link,
            status,
            chans: l.channels(),
        };
        log::info!(
            "guest {} (id {}, incarnation {n}): {} MiB at {:#x}, kernel {:#x}..{:#x} entry {:#x}, workload {:?}",
            name(l),
            l.guest_id,
            part.size >> 20,
            part.base,
            vmcall_proto::guest::KERNEL_BASE,
            plan.end(),
            plan.entry,
            bi.workload()
        );
        crate::record!(
            vmcall_proto::record::kind::START,
            "guest={} n={n} core={core} tsc={}",
            name(l),
            arch::rdtsc()
        );
        // Nothing of an earlier incarnation (or the firmware) left in the registers the
        // guest reaches without an exit.
        // SAFETY: on this core, before its guest runs; the boot code leaves CR0.EM/TS clear.
        unsafe { arch::scrub_guest_registers(&exits::MSR_PASSTHROUGH) };
        // The budget is the guest's time: it starts now, not before its setup.
        ctx.watchdog = arch::rdtsc().saturating_add(budget_ticks);
        let mut launched = false;
        let mut first_entry = 0;
        // TSC and basic reason of the last VM exit (hypervisor time runs from there to the
        // next entry).
        let mut last_exit = arch::rdtsc();
        let mut last_reason = None;
        // Hypervisor time spent on other cores' behalf (serving their requests, taking their
        // NMI kicks) is not the guest's: its budget is extended by it.
        let mut kicked_at: Option<u64> = None;
        // SAFETY: this core's slot is initialised.
        let me = unsafe { crate::percpu::this_core() };
        // This incarnation's NMIs, for its telemetry.
        me.nmis.store(0, core::sync::atomic::Ordering::Relaxed);
        // From now on a kick taken in the hypervisor zeroes this VMCS's preemption timer.
        me.vmcs_live.store(1, core::sync::atomic::Ordering::Release);
        // The exits the landing answers itself while armed (see `fastexit`).
        // The status page is a frame of this core's private region, identity-mapped, alive
        // for the whole incarnation; the guest only reads it.
        let page = status as *mut StatusPage;
        // SAFETY: `page` is valid for the incarnation (above); no reference is made.
        let telemetry = unsafe { core::ptr::addr_of_mut!((*page).telemetry) };
        let mut fast = crate::fastexit::FastExit::new(
            core,
            crate::instance::xcore::mail_word(core as usize),
            &me.kicked,
            telemetry,
        );
        fast.timer_shift = f.preemption_timer_shift;
        fast.mwait = ctx.mwait;
        fast.info = u64::from(l.guest_id & 0xffff)
            | u64::from(core & 0xffff) << 16
            | u64::from(l.entry.memory_mib) << 32;
        fast.tsc_per_ms = ctx.tsc_per_ms;
        // Nothing the fast path cannot see may need an exit: exit tracing records every one,
        // an injected hang counts entries.
        let fast_allowed = !crate::trace::enabled() && !l.hang;
        if n > 1 {
            // The last incarnation's death took the channels down and every peer's core
            // acknowledged (or was given up on): nobody uses the rings. Start them over.
            for (pos, ch) in l.channels().iter().enumerate() {
                counts[pos].lost = counts[pos].lost.saturating_add(reset_rings(ch));
                counts[pos].resets += 1;
                // Up to 16 channels of up to 512 KiB each: the inbox between two.
                ctx.caps.poll(&mut exits::CapEnv(&mut vcpu));
            }
        }
        publish_links(status, l, ctx.caps, counts);
        if n > 1 {
            ctx.caps.links_up(&mut exits::CapEnv(&mut vcpu));
        }
        for e in lc.step(Life::Entering).iter() {
            if let Effect::Answer { to, req, answer } = e {
                Control::answer(&mut exits::CapEnv(&mut vcpu), to, req, answer);
            }
        }
        // Live figures (`stats_ms`): looked at only when the loop serves its inbox or the
        // membership's probes (nothing on the other entries).
        let stats_period = l.stats_ms.saturating_mul(tsc_per_ms);
        let mut stats_next = if stats_period > 0 { arch::rdtsc() } else { u64::MAX };
        // `inject=hung-core`: 20 ms into the guest's first run.
        let mut hang_at = u64::MAX;
        let ending = loop {
            // Kicks from here on are seen by the look below, or zero the timer further down
            // (one taken before it is for mail the look sees: no extra exit for it).
            me.take_kick();
            // The inter-core inbox, the capability protocol's deadlines, the membership's
            // probes, link changes and controllers' requests: only when the mail word or the
            // capability state says there is something, or something is due (a few loads
            // otherwise, whatever the core count).
            let now = arch::rdtsc();
            let mut due = ctx.caps.members.due();
            let busy =
                kicked_at.is_some() || vcpu.link.has_mail() || now >= due || ctx.caps.attention();
            if busy {
                let t0 = arch::rdtsc();
                let served = ctx.caps.poll(&mut exits::CapEnv(&mut vcpu));
                let t1 = arch::rdtsc();
                log_views(ctx.caps, core);
                if ctx.caps.members.evicted() {
                    // Taken for stopped while alive: the others fenced this core and go on
                    // without it, so its guest must not run again.
                    break Ending::Stopped(StopReason::Isolation(
                        "its core was fenced out of the membership view",
                    ));
                }
                let foreign = match kicked_at.take() {
                    Some(t) => t1.saturating_sub(t),
                    None if served > 0 => t1.saturating_sub(t0),
                    None => 0,
                };
                // At most one budget's worth: a guest's life stays bounded (the BSP's
                // collection waits two budgets).
                let room = budget_ticks.saturating_sub(ctx.foreign_tsc);
                ctx.watchdog = ctx.watchdog.saturating_add(foreign.min(room));
                ctx.foreign_tsc = ctx.foreign_tsc.saturating_add(foreign);
                if ctx.caps.links_changed() {
                    publish_links(status, l, ctx.caps, counts);
                    // Wake the guest if it sleeps on a doorbell: its channel changed.
                    ctx.wake = true;
                }
                if let Some((from, req, op)) = ctx.caps.ctl.take() {
                    let live =
                        [ctx.exits_total, u64::from(ctx.hypercalls), u64::from(ctx.doorbells_rung)];
                    let mut stop = None;
                    for e in lc.step(Life::Request(Request { from, req, op }, live)).iter() {
                        match e {
                            Effect::Answer { to, req, answer } => {
                                Control::answer(&mut exits::CapEnv(&mut vcpu), to, req, answer)
                            }
                            Effect::Stop(why) => stop = Some(why),
                            _ => {}
                        }
                    }
                    if let Some(why) = stop {
                        break Ending::Stopped(why);
                    }
                }
                if now >= stats_next {
                    stats_next = now.saturating_add(stats_period);
                    let r = report(&ctx, Ending::Exited(0), first_entry);
                    stats_record(l, n, core, &r, status, now);
                }
                if ctx.caps.stats.unmap_failed {
                    break Ending::Stopped(StopReason::Isolation(
                        "a revoked capability could not be unmapped from its EPT",
                    ));
                }
                due = ctx.caps.members.due();
            }
            if l.hang && launched && now >= hang_at {
                hang(core);
            }
            if now >= l.end_tsc {
                break Ending::Stopped(StopReason::RunEnded);
            }
            vcpu.injected = false;
            // The membership failure detector's next probe or deadline, the end of the run
            // (and an injected hang) come even if the guest never exits.
            let also = due.min(l.end_tsc);
            let also = if l.hang { also.min(hang_at) } else { also };
            let timer = match ctx.before_entry(&mut vcpu, also) {
                Ok(t) => t,
                Err(why) => break Ending::Stopped(why),
            };
            // The preemption timer counts at the TSC rate shifted by IA32_VMX_MISC[4:0].
            // SAFETY: current VMCS.
            unsafe {
                g::PREEMPTION_TIMER.set((timer >> f.preemption_timer_shift).min(u32::MAX as u64))
            };
            // The fast path answers until the deadline the timer aims at, if nothing waits
            // for the run loop (`now` was read before `before_entry`'s: not later than it).
            fast.until = if fast_allowed
                && !ctx.eventful
                && !(busy && (ctx.caps.attention() || vcpu.link.has_mail()))
            {
                now.saturating_add(timer)
            } else {
                0
            };
            fast.exits_base = ctx.exits_total;
            if me.take_kick() {
                // A kick came after the look at the mail word: its message waits. Enter for no instruction
                // (a zero timer exits at once, SDM Vol. 3C 26.7.4) and poll again. A kick
                // after this line zeroes the timer itself (arch::idt).
                // SAFETY: current VMCS.
                unsafe { g::PREEMPTION_TIMER.set(0) };
                fast.until = 0;
            }
            // Exit-free telemetry: the guest's counters as of this entry.
            let t_entry = arch::rdtsc();
            publish_telemetry(status, &ctx, t_entry.saturating_sub(last_exit), last_reason);
            if traffic.due(t_entry) {
                refresh_traffic(&mut traffic, status, t_entry);
            }
            // It stops answering at the next traffic copy (the copy needs an entry of the
            // run loop) without making the timer fire for it.
            fast.answer_until = fast.until.min(traffic.next_due());
            if !launched {
                first_entry = t_entry;
            }
            let fast_ptr = core::ptr::addr_of_mut!(fast).cast();
            me.entering_guest(arch::rdtsc());
            // `fast` lives on this frame and is armed for this guest (its telemetry page, this
            // core's mail word and kick flag).
            // SAFETY: the VMCS is complete for this core and guest; EPT confines the guest.
            let entered = unsafe { arch::vmx::run(&mut vcpu.regs, launched, fast_ptr) };
            let t_exit = arch::rdtsc();
            me.left_guest(t_exit);
            // The exits the fast path answered count even if its last VMRESUME failed.
            let (hypercalls, cpuids) = fast.take();
            ctx.fold_fast(hypercalls, cpuids);
            if entered.is_err() {
                // SAFETY: current VMCS.
                let code = unsafe { exit::INSTRUCTION_ERROR.read() };
                log::error!("guest {}: VM entry failed, VM-instruction error {code}", name(l));
                break Ending::Stopped(StopReason::Setup("VM entry failed (VM-instruction error)"));
            }
            if !launched {
                hang_at = first_entry.saturating_add(tsc_per_ms.saturating_mul(20));
            }
            launched = true;
            last_exit = t_exit;
            let e = VmcsExit::read();
            let reason = e.reason();
            last_reason = Some(reason);
            crate::trace::exit(core, reason, t_entry, t_exit);
            // SAFETY: current VMCS.
            if reason == 0 && is_nmi(unsafe { exit::INTR_INFO.read() }) {
                kicked_at = Some(t_exit);
                // The NMI was a kick for this core's hypervisor, not the guest's: do not let
                // the guest inherit NMI blocking (it would hold every later kick until the
                // guest happens to IRET), and unblock NMIs on the host side.
                // SAFETY: current VMCS; clearing "blocking by NMI" (bit 3) only.
                unsafe {
                    let s = g::INTERRUPTIBILITY.read();
                    let _ = g::INTERRUPTIBILITY.write(s & !(1 << 3));
                }
                arch::unblock_nmis();
                // That INT 2 ran the kick handler, which marked a kick: this one is being
                // served (the loop polls next), so it needs no extra exit.
                me.take_kick();
            }
            vcpu.injected = false;
            match exits::handle(&mut ctx, &mut vcpu, &e, &mut sink) {
                Action::Resume => {}
                Action::Exit(status) => break Ending::Exited(status),
                Action::Stop(why) => break Ending::Stopped(why),
            }
            if !exits::instruction_exit(reason) {
                reinject_vectoring(&mut vcpu);
            }
        };
        ctx.flush_line(&mut sink);
        // The clean death, step by step as the lifecycle lists them.
        let mut r = None;
        let mut retired = crate::caps::Retired::default();
        for e in lc.step(Life::Ended(ending)).iter() {
            let Effect::Die(step) = e else { continue };
            match step {
                // Its devices stop first: no DMA into memory about to be scrubbed or handed on.
                Death::Quiesce => quiesce_devices(l),
                Death::Account => {
                    // The page shows the incarnation as it ended (its last exit included)
                    // while the guest is down.
                    let t_end = arch::rdtsc();
                    publish_final(status, &ctx, t_end.saturating_sub(last_exit));
                    refresh_traffic(&mut traffic, status, t_end);
                    r = Some(report(&ctx, ending, first_entry));
                }
                Death::Retire => {
                    // Every copy made from its caps revoked everywhere, every copy it held
                    // dropped, its originals unmapped (while its EPT still exists to unmap
                    // them).
                    retired = ctx.caps.retire(&mut exits::CapEnv(&mut vcpu));
                }
                Death::LinksDown => {
                    // Its channels go down: each peer's core acknowledges once its guest
                    // knows (or is given up on); the rings are reset only if a next
                    // incarnation starts.
                    if l.channel_count > 0 {
                        let env = &mut exits::CapEnv(&mut vcpu);
                        ctx.caps.links_down(env);
                        let deadline = arch::rdtsc()
                            .saturating_add(ctx.caps.policy.deadline.saturating_mul(80));
                        while !ctx.caps.links_acked() && arch::rdtsc() < deadline {
                            ctx.caps.poll(env);
                            arch::pause();
                        }
                        if !ctx.caps.links_acked() {
                            log::warn!(
                                "guest {}: a channel peer's core did not acknowledge in time",
                                name(l)
                            );
                            ctx.caps.links_give_up();
                        }
                    }
                }
                Death::ClearVmcs => {
                    me.vmcs_live.store(0, core::sync::atomic::Ordering::Release);
                    // The frame goes back with the private region.
                    // SAFETY: the VMCS is this core's; clearing it ends its use.
                    let _ = unsafe { arch::vmx::vmclear(vmcs) };
                    log::info!(
                        "guest {}: private frames in use {}, peak {}, limit {}",
                        name(l),
                        vcpu.frames.in_use(),
                        vcpu.frames.peak(),
                        vcpu.frames.limit()
                    );
                    // A console line takes milliseconds at the UART's baud rate: the inbox
                    // between two (nothing is mapped any more, so no EPT is needed to serve
                    // it).
                    ctx.caps.poll(&mut Serving(&mut *vcpu.link));
                }
                Death::Record => {
                    let links = counts.iter().fold(LinkCount::default(), |a, c| LinkCount {
                        lost: a.lost.saturating_add(c.lost),
                        resets: a.resets.saturating_add(c.resets),
                    });
                    let start =
                        Start { tsc: tsc_start, frames: frames_at_start, caps: caps_at_start };
                    let r = r.get_or_insert_with(|| report(&ctx, ending, first_entry));
                    r.caps = ctx.caps.stats;
                    r.unconfirmed = retired.unconfirmed;
                    incarnation_record(l, n, r, start, &retired, links);
                    ctx.caps.poll(&mut Serving(&mut *vcpu.link));
                }
            }
        }
        let mut r = r.unwrap_or_else(|| report(&ctx, ending, first_entry));
        r.caps = ctx.caps.stats;
        r.unconfirmed = retired.unconfirmed;
        (r, ctx.caps)
    }

    /// An incarnation's start: TSC when its setup began, private frames and live caps when
    /// it was first entered (equal for every incarnation unless something leaks).
    struct Start {
        tsc: u64,
        frames: u64,
        caps: usize,
    }

    /// One incarnation's record (see `vmcall_proto::record::kind::INCARNATION`).
    fn incarnation_record(
        l: &Launch,
        n: u32,
        r: &GuestReport,
        start: Start,
        retired: &crate::caps::Retired,
        links: LinkCount,
    ) {
        let Start { tsc: tsc_start, frames, caps: caps_live } = start;
        let (ending, status, fault) = match r.ending {
            Ending::Exited(s) => ("exited", s, None),
            Ending::Stopped(why) => ("stopped", 0, Some(why)),
        };
        crate::record!(
            vmcall_proto::record::kind::INCARNATION,
            "guest={} n={n} ending={ending} exit_status={status} fault={} tsc_start={tsc_start} tsc_first_entry={} tsc_end={} frames_at_start={frames} caps_revoked={} caps_unconfirmed={} caps_dropped={} caps_live={} link_resets={} link_lost={} exits={} hypercalls={}",
            name(l),
            vmcall_proto::record::Quoted(OptFault(fault)),
            r.tsc_first_entry,
            r.tsc_end,
            retired.revoked,
            retired.unconfirmed,
            retired.dropped,
            caps_live,
            links.resets,
            links.lost,
            vmcall_proto::record::Quoted(Exits(r)),
            r.hypercalls
        );
    }

    /// The live figures of a running incarnation (see `vmcall_proto::record::kind::STATS`):
    /// its exits and hypercalls so far, and each channel's messages as its status page
    /// last copied them.
    #[cold]
    #[inline(never)]
    fn stats_record(l: &Launch, n: u32, core: u32, r: &GuestReport, page: u64, now: u64) {
        // A frame of this core's private region, identity-mapped, read-only to the guest,
        // which is not running now.
        // SAFETY: `page` is that frame; a StatusPage is exactly one page of u64s.
        let page = unsafe { &*(page as *const StatusPage) };
        struct Traffic<'a>(&'a Launch, &'a StatusPage);
        impl core::fmt::Display for Traffic<'_> {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                for (i, (c, t)) in self.0.channels().iter().zip(&self.1.traffic).enumerate() {
                    let name = vmcall_proto::fixed::get(&c.desc.name).unwrap_or("?");
                    let sep = if i > 0 { " " } else { "" };
                    write!(f, "{sep}{name}:{}:{}", t.sent, t.received)?;
                }
                Ok(())
            }
        }
        crate::record!(
            vmcall_proto::record::kind::STATS,
            "guest={} n={n} core={core} tsc={now} exits={} hypercalls={} traffic={}",
            name(l),
            vmcall_proto::record::Quoted(Exits(r)),
            r.hypercalls,
            vmcall_proto::record::Quoted(Traffic(l, page))
        );
    }

    struct OptFault(Option<StopReason>);
    impl core::fmt::Display for OptFault {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self.0 {
                Some(w) => w.fmt(f),
                None => Ok(()),
            }
        }
    }

    /// Whether a VM-exit interruption-information value says an NMI (valid, type 2; SDM
    /// Vol. 3C 25.9.2).
    fn is_nmi(intr: u64) -> bool {
        intr & (1 << 31) != 0 && (intr >> 8) & 7 == 2
    }

    /// An exit during event delivery leaves the event in the IDT-vectoring field; it must be
    /// delivered again unless a handler injected something itself (SDM Vol. 3C 28.2.4).
    fn reinject_vectoring(v: &mut VmcsVcpu<'_>) {
        if v.injected {
            return;
        }
        // SAFETY: current VMCS.
        let info = unsafe { exit::IDT_VECTORING_INFO.read() };
        if info & (1 << 31) == 0 {
            return;
        }
        // SAFETY: current VMCS; re-delivering the processor's own event description.
        unsafe {
            let _ = ctl::ENTRY_INTR_INFO.write(info & !(1 << 12));
            if info & (1 << 11) != 0 {
                let code = exit::IDT_VECTORING_ERR.read();
                let _ = ctl::ENTRY_EXCEPTION_ERR.write(code);
            }
            let len = exit::INSTRUCTION_LEN.read();
            let _ = ctl::ENTRY_INSTR_LEN.write(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ept::tests::host_frames;
    use vmcall_proto::guest::channel_window;

    #[test]
    fn channel_windows_are_read_write_never_executable() {
        let mut f = host_frames(64);
        let windows =
            [(channel_window(0), 0x9000_0000, 0x2000), (channel_window(3), 0x9100_0000, 0x4000)];
        let root = build_ept(&mut f, 0x4000_0000, 16 << 20, windows.into_iter()).unwrap();
        for (gpa, hpa, len) in windows {
            for g in [gpa, gpa + len - 1] {
                let t = ept::translate_perm(&mut f, root, g);
                assert_eq!(t, Some((hpa + g - gpa, 3)), "window at {gpa:#x}: RW, no X");
            }
        }
        assert_eq!(ept::translate_perm(&mut f, root, 0x1234), Some((0x4000_1234, 7)));
        assert_eq!(ept::mapped_bytes(&mut f, root), (16 << 20) + 0x6000);
        // A window over the partition is refused, not merged.
        let bad = [(0x10_0000, 0x9000_0000, 0x1000)];
        let mut f = host_frames(64);
        assert_eq!(
            build_ept(&mut f, 0x4000_0000, 16 << 20, bad.into_iter()),
            Err("channel window mapping failed")
        );
    }

    #[test]
    fn wbinvd_exits_where_the_processor_allows_it() {
        use crate::vmx::features::ControlCaps;
        let (ept, vpid, rdtscp, wbinvd) = (1u64 << 1, 1u64 << 5, 1u64 << 3, 1u64 << 6);
        let all = ControlCaps((ept | vpid | rdtscp | wbinvd) << 32);
        assert_eq!(secondary_controls(all), Some((ept | vpid | rdtscp | wbinvd) as u32));
        let no_wbinvd = ControlCaps((ept | vpid | rdtscp) << 32);
        assert_eq!(secondary_controls(no_wbinvd), Some((ept | vpid | rdtscp) as u32));
        let bare = ControlCaps((ept | vpid) << 32);
        assert_eq!(secondary_controls(bare), Some((ept | vpid) as u32));
        assert_eq!(secondary_controls(ControlCaps(ept << 32)), None, "VPID is required");
    }

    #[test]
    fn shared_memory_permissions_never_execute() {
        for p in [ept::Perm::Read, ept::Perm::ReadWrite] {
            assert_eq!(p.bits() & 4, 0, "{p:?}");
        }
        assert_eq!(ept::Perm::shared(false), ept::Perm::Read);
        assert_eq!(ept::Perm::shared(true), ept::Perm::ReadWrite);
    }
}
