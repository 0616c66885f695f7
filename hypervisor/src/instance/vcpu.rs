// SPDX-License-Identifier: MIT OR Apache-2.0
//! The vCPU of this core's guest, backed by the current VMCS: what the exit handlers and
//! the capability system reach the guest and the hardware through (`exits::Vcpu`,
//! `exits::ExitInfo`, `caps::Env`), and the environment of a core whose guest is down
//! (`Serving`).
//!
//! Owns nothing past one incarnation. May call: `vmx::vmcs` (its fields), `arch`, `ept`,
//! `pci` (config space), `xcore` (the transport), `percpu`, `console`.

use super::*;
use crate::arch::{self, vmx::GuestRegs};
use crate::exits::{ConsoleSink, Event, ExitInfo, Field, Vcpu};
use crate::vmx::vmcs::{ctl, exit, g};
use vmcall_proto::guest::*;
use vmcall_proto::hypercall::HvError;
use x86::vmx::vmcs::control::PrimaryControls;

/// The vCPU of the current VMCS.
pub(super) struct VmcsVcpu<'a> {
    pub(super) regs: GuestRegs,
    pub(super) part: &'a Partition,
    pub(super) procbased: u32,
    pub(super) injected: bool,
    pub(super) frames: &'a mut Private,
    pub(super) eptp: u64,
    pub(super) link: &'a mut crate::instance::xcore::Link,
    /// The guest's status page (a private frame) and its channels, in boot-info order.
    pub(super) status: u64,
    pub(super) chans: &'a [ChanMap],
}

pub(super) fn field(f: Field) -> crate::vmx::vmcs::Rw {
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
            Event::Exception { vector, error_code: None } => (1 << 31) | (3 << 8) | vector as u64,
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

pub(super) struct Console<'a> {
    pub(super) name: &'a str,
    pub(super) core: u32,
}

impl ConsoleSink for Console<'_> {
    fn line(&mut self, text: &str) {
        crate::console::line(format_args!("[{}@c{}] {}", self.name, self.core, text));
    }
}

/// The exit of the current VMCS: the reason is read at once, every other field when a
/// handler asks (one VMREAD each).
pub(super) struct VmcsExit {
    /// The full exit-reason field (bit 31: the VM entry failed).
    pub(super) raw: u64,
}

impl VmcsExit {
    pub(super) fn read() -> Self {
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

/// This core serves its inbox now (see `percpu::PerCore::served`).
pub(super) fn served_now() {
    // SAFETY: a core runs guests only after its `init_this_core`.
    unsafe { crate::percpu::this_core() }.served(arch::rdtsc());
}

/// The hypervisor side of a core once its guest is over for good: no guest to enter,
/// no EPT to change (the dead guest's space holds nothing mapped and takes nothing in).
pub(super) struct Serving<'a>(pub(super) &'a mut crate::instance::xcore::Link);

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
    fn host_serve(&mut self, ctl: &mut crate::caps::control::Control) {
        crate::hostctl::serve(self, ctl)
    }
    fn host_answer(&mut self, req: u32, result: Result<u64, HvError>) {
        crate::hostctl::answer(self, req, result)
    }
    fn mc_publish(&mut self, me: usize, req: &crate::caps::mcast::Request) -> bool {
        crate::instance::xcore::mc_publish(me, req)
    }
    fn mc_rung(&mut self, me: usize) -> u64 {
        crate::instance::xcore::mc_rung(me)
    }
    fn mc_read(&mut self, from: usize, me: usize) -> Option<crate::caps::mcast::Request> {
        crate::instance::xcore::mc_read(from, me)
    }
    fn mc_answer(&mut self, me: usize, to: usize, word: u64) {
        crate::instance::xcore::mc_answer(me, to, word)
    }
    fn mc_answered(&mut self, me: usize) -> u64 {
        crate::instance::xcore::mc_answered(me)
    }
    fn mc_line(&mut self, me: usize, from: usize) -> u64 {
        crate::instance::xcore::mc_line(me, from)
    }
}

/// Whether a VM-exit interruption-information value says an NMI (valid, type 2; SDM
/// Vol. 3C 25.9.2).
pub(super) fn is_nmi(intr: u64) -> bool {
    intr & (1 << 31) != 0 && (intr >> 8) & 7 == 2
}

/// An exit during event delivery leaves the event in the IDT-vectoring field; it must be
/// delivered again unless a handler injected something itself (SDM Vol. 3C 28.2.4).
pub(super) fn reinject_vectoring(v: &mut VmcsVcpu<'_>) {
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
