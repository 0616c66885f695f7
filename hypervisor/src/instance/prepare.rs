// SPDX-License-Identifier: MIT OR Apache-2.0
//! An incarnation's setup, step by step ([`prepare`]): its capabilities (the first time),
//! its partition (zeroed, the kernel copied, boot info and boot page tables), its EPT and
//! devices, its status page, and the backend's vCPU, current on return. Each long step
//! serves the inbox between its pieces (a checkpoint of `percpu::site` after each).
//!
//! Owns nothing past the setup (what it builds goes to the running incarnation in
//! [`Prepared`]). May call: `setup` (partition, frames, devices), `loader`, `telemetry`,
//! `ept`, `pci`, `vcpu` (the backend's `setup`, through its trait), `percpu`, `arch`.

use super::setup::*;
use super::*;
use crate::exits::GuestCtx;
use vmcall_proto::guest::*;
use zerocopy::{FromZeros, IntoBytes};

/// What an incarnation's setup leaves ready to enter.
pub(super) struct Prepared<B> {
    pub(super) at: Incarnation,
    pub(super) part: Partition,
    pub(super) frames: Private,
    /// The backend's vCPU, set up and current.
    pub(super) hw: B,
    /// The guest's status page (a private frame).
    pub(super) status: u64,
    pub(super) traffic: telemetry::Traffic,
}

/// Sets up incarnation `at` of `g`'s guest (see the module header), serving the inbox
/// through `link` between its long steps. An error says why it cannot run.
pub(super) fn prepare<B: crate::vcpu::Vcpu>(
    g: &Guest<'_, B>,
    at: Incarnation,
    ctx: &mut GuestCtx,
    link: &mut crate::instance::xcore::Link,
) -> Result<Prepared<B>, &'static str> {
    let (l, n) = (g.l, at.n);
    // The guest's capabilities and channels first, before anything serves the inbox
    // (zeroing below, or the down state after a failed setup): a peer's `LINK_DOWN`, an
    // `INSERT` or a revoke that arrives meanwhile then finds the channel it names and
    // gets its defined answer (`LINK_ACK`; `NotAccepted` until the guest accepts).
    if n == 1 {
        capabilities(l, &mut *ctx.caps)?;
    }
    let part = Partition { base: l.partition, size: l.partition_size };
    // The pool ends below the status frame, which stays where it is for the whole run.
    let mut frames = Private::new(Identity, l.private, l.status_frame());
    let (image, plan) = kernel_plan(l, &part)?;
    // Its devices stop before the memory they may still write is scrubbed: the first
    // time from whatever state the firmware left them in (later incarnations follow a
    // death, which already quiesced them).
    if n == 1 {
        quiesce_devices(l);
    }
    mark(crate::percpu::site::SETUP_PLAN);
    copy_kernel(image, &plan, &part, &mut || {
        ctx.caps.poll(&mut *link);
    })?;
    mark(crate::percpu::site::SETUP_KERNEL);
    let mut bi = boot_info(l, g.core, n, &part);
    if boot_page_tables(&part).is_err() {
        return Err("partition too small for the boot structures");
    }
    mark(crate::percpu::site::SETUP_PAGE_TABLES);
    let windows = l
        .channels()
        .iter()
        .map(|ch| (vmcall_proto::guest::channel_window(ch.desc.index), ch.hpa, ch.size));
    // Thousands of entries written and walked (the self-check): the inbox between the
    // partition, each window, the grant window's directories and each directory counted.
    let mut serve = || {
        ctx.caps.poll(&mut *link);
    };
    let eptp = ept::eptp(build_ept(&mut frames, part.base, part.size, windows, &mut serve)?);
    mark(crate::percpu::site::SETUP_EPT);
    map_devices(l, &mut frames, eptp & !0xfff)?;
    ctx.pci = crate::pci::filter::View::new(&l.devices);
    mark(crate::percpu::site::SETUP_DEVICES);
    let status = status_page(l, n, &mut frames, eptp & !0xfff)?;
    mark(crate::percpu::site::SETUP_STATUS);
    let traffic =
        telemetry::Traffic::new(l.channels(), ctx.tsc_per_ms.saturating_mul(TRAFFIC_REFRESH_MS));
    for (i, ch) in l.channels().iter().enumerate() {
        bi.channels[i] = ch.desc;
        ctx.doorbells[i] = ch.peer_apic;
    }
    bi.channel_count = l.channel_count as u32;
    if part.write(BOOT_INFO_GPA, bi.as_bytes()).is_err() {
        return Err("partition too small for the boot structures");
    }
    let hw = backend_vcpu::<B>(g, plan.entry, eptp, &mut frames)?;
    mark(crate::percpu::site::SETUP_VMCS);
    // The VMCS written (a few thousand instructions), the lines below formatted (as many):
    // the inbox before and after them.
    ctx.caps.poll(&mut *link);
    ctx.mwait = exitless_mwait(l);
    if ctx.mwait && n == 1 {
        log::info!("guest {}: exitless waiting: MONITOR/MWAIT without VM exits", name(l));
    }
    log_setup(l, &bi, &plan);
    mark(crate::percpu::site::SETUP_DONE);
    ctx.caps.poll(&mut *link);
    Ok(Prepared { at, part, frames, hw, status, traffic })
}

/// A checkpoint in a long path away from the inbox (see `percpu::PerCore::mark`).
pub(super) fn mark(site: u8) {
    // SAFETY: a core runs guests only after its `init_this_core`.
    unsafe { crate::percpu::this_core() }.mark(site);
}

/// The capabilities the config gives the guest: its grants, channels and controls, in
/// that order (slot order).
fn capabilities(l: &Launch, caps: &mut crate::caps::HvCaps) -> Result<(), &'static str> {
    const FULL: &str = "capability space full";
    for &(base, size) in &l.grants[..l.grant_count] {
        caps.grant(base, size).map_err(|_| FULL)?;
    }
    for ch in l.channels() {
        caps.add_channel(ch.desc.index, ch.peer_core).map_err(|_| FULL)?;
    }
    for &(core, guest) in &l.targets[..l.target_count] {
        caps.add_control(core, guest as u32).map_err(|_| FULL)?;
    }
    Ok(())
}

/// The kernel ELF (a multiboot2 module) and where its segments go in `part`.
fn kernel_plan(
    l: &Launch,
    part: &Partition,
) -> Result<(&'static [u8], loader::LoadPlan), &'static str> {
    // SAFETY: the kernel module is reserved memory, identity-mapped, never written.
    let image = unsafe {
        core::slice::from_raw_parts(l.kernel.0 as *const u8, (l.kernel.1 - l.kernel.0) as usize)
    };
    match loader::plan(image, part.size) {
        Ok(p) => Ok((image, p)),
        Err(e) => {
            log::error!("guest {}: kernel ELF rejected: {e}", name(l));
            Err("kernel ELF rejected")
        }
    }
}

/// Zeroes `part` (nothing of a previous incarnation, or of whoever had the memory before,
/// survives) and copies the kernel's segments in, calling `serve` between chunks.
fn copy_kernel(
    image: &[u8],
    plan: &loader::LoadPlan,
    part: &Partition,
    serve: &mut dyn FnMut(),
) -> Result<(), &'static str> {
    part.zero(&mut *serve);
    for s in plan.segments() {
        let data = &image[s.file_offset as usize..(s.file_offset + s.file_size) as usize];
        // A kernel may be 16 MiB: copied a chunk at a time, serving between.
        for (k, piece) in data.chunks(SERVE_EVERY_BYTES as usize).enumerate() {
            if part.write(s.gpa + (k as u64 * SERVE_EVERY_BYTES), piece).is_err() {
                return Err("kernel segment outside the partition");
            }
            serve();
        }
    }
    Ok(())
}

/// The boot info of incarnation `n` (its channels filled in later, with the status page).
fn boot_info(l: &Launch, core: u32, n: u32, part: &Partition) -> BootInfo {
    let mut bi = BootInfo::new_zeroed();
    bi.magic = BOOT_INFO_MAGIC;
    bi.version = BOOT_INFO_VERSION;
    bi.guest_id = l.guest_id;
    bi.core = core;
    bi.memory_bytes = part.size;
    bi.tsc_per_ms = crate::arch::tsc::ticks_per_ms();
    bi.name = l.entry.name;
    bi.workload = l.entry.workload;
    bi.args = l.entry.args;
    bi.incarnation = n;
    bi.dma_offset = part.base;
    for (d, o) in bi.devices.iter_mut().zip(l.devices.iter()) {
        *d = o.desc();
    }
    bi.device_count = l.devices.count as u32;
    bi
}

/// The owner's memory BARs in its device window (EPT root `root`), uncached, never
/// executable, each checked as built; its devices' interrupt lines routed to this core.
/// (How the guest acknowledges them is the backend's: VMX needs this core's APIC in x2APIC
/// mode and refuses the guest otherwise; SVM virtualizes the EOI in either mode.)
fn map_devices(l: &Launch, frames: &mut Private, root: u64) -> Result<(), &'static str> {
    for o in l.devices.iter() {
        for (b, &gpa) in o.func.bars.iter().zip(&o.gpa) {
            if b.kind != vmcall_proto::device::bar_kind::MEMORY || b.size == 0 {
                continue;
            }
            let len = b.size.max(4096);
            let rw = ept::Perm::Device.bits();
            let ok = ept::map_with(frames, root, gpa, b.base, len, ept::Perm::Device).is_ok()
                && ept::translate_perm(frames, root, gpa) == Some((b.base, rw))
                && ept::translate(frames, root, gpa + len - 1) == Some(b.base + len - 1);
            if !ok {
                return Err("device BAR mapping failed");
            }
        }
        if let Some(line) = o.line() {
            // SAFETY: this core's slot is initialised.
            let apic = unsafe { crate::percpu::this_core() }.apic_id as u32;
            if let Err(why) = crate::pci::ioapic::route(line, o.vector, apic) {
                log::error!("guest {}: {}: interrupt not routed: {why}", name(l), o.func.bdf);
                return Err("a device's interrupt could not be routed to its core");
            }
        }
    }
    Ok(())
}

/// The status page: the fixed last frame of the private region, zeroed for incarnation
/// `n`, mapped read-only to the guest (EPT root `root`; and to its controllers, through
/// their target windows); the status pages of the guests it controls mapped read-only,
/// one window each. Returns the frame.
fn status_page(l: &Launch, n: u32, frames: &mut Private, root: u64) -> Result<u64, &'static str> {
    let status = l.status_frame();
    // The frame is this core's private region's last, identity-mapped, outside the pool;
    // others only read it.
    // SAFETY: so this core may write it whole.
    unsafe {
        (status as *mut u8).write_bytes(0, 4096);
        (*(status as *mut StatusPage)).incarnation = u64::from(n);
    }
    if ept::map_with(frames, root, STATUS_GPA, status, 4096, ept::Perm::Read).is_err() {
        return Err("status page mapping failed");
    }
    telemetry::map_target_windows(frames, root, &l.target_status[..l.target_count])?;
    Ok(status)
}

/// The backend's vCPU for `g`'s guest, entering at `rip` with nested root `eptp`, its
/// control structure in `frames`; current on return.
fn backend_vcpu<B: crate::vcpu::Vcpu>(
    g: &Guest<'_, B>,
    rip: u64,
    eptp: u64,
    frames: &mut Private,
) -> Result<B, &'static str> {
    let l = g.l;
    let setup = crate::vcpu::Setup {
        rip,
        rsp: BOOT_STACK_TOP,
        cr3: BOOT_PML4_GPA,
        nested_root: eptp,
        tag: (l.guest_id + 1) as u16,
        direct_interrupts: l.channel_count > 0 || l.devices.count > 0,
        devices: l.devices.count > 0,
        exitless_mwait: exitless_mwait(l),
    };
    B::setup(g.f, &setup, frames, io_ports(l)).map_err(|e| {
        if let Some(what) = e.detail {
            log::error!("guest {}: VMCS setup: {what}", name(l));
        }
        e.reason
    })
}

/// The setup's line: which incarnation (`bi`), where it is, its kernel (`plan`).
fn log_setup(l: &Launch, bi: &BootInfo, plan: &loader::LoadPlan) {
    log::info!(
        "guest {} (id {}, incarnation {}): {} MiB at {:#x}, kernel {:#x}..{:#x} entry {:#x}, workload {:?}",
        name(l),
        l.guest_id,
        bi.incarnation,
        bi.memory_bytes >> 20,
        bi.dma_offset,
        vmcall_proto::guest::KERNEL_BASE,
        plan.end(),
        plan.entry,
        bi.workload()
    );
}
