// SPDX-License-Identifier: MIT OR Apache-2.0
//! The vCPU of this core's guest as the exit handlers and the capability system see it
//! ([`GuestVcpu`]: `exits::Vcpu` and `caps::Env`, implemented directly): the backend's
//! vCPU (`vcpu::Vcpu`: registers, injection, timer, nested paging) with the guest's
//! partition, private frames, status page and channels, and this core's transport. A core
//! whose guest is down serves the other cores with the transport alone (`caps::Env` for
//! `xcore::Link`).
//!
//! Owns nothing past one incarnation. May call: `vcpu` (the backend, through its trait),
//! `arch`, `ept`, `pci` (config space), `xcore` (the transport), `percpu`, `console`,
//! `hostctl`.

use super::setup::{Partition, Private};
use super::*;
use crate::arch::{self, vmx::GuestRegs};
use crate::exits::{ConsoleSink, Event, Field, Vcpu};
use vmcall_proto::guest::*;
use vmcall_proto::hypercall::HvError;

/// The `caps::Env` methods that are this core's whatever its guest's state (the inbox
/// served, host control, the multicast slots of `xcore`): one body for the guest's vCPU and
/// for the transport of a core whose guest is down, so the two cannot drift apart (a
/// multicast method left out would fall back silently to `Env`'s ring-message default).
macro_rules! this_cores_services {
    () => {
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
    };
}

/// The guest's vCPU: the backend's `hw` and what the instance gives it.
pub(super) struct GuestVcpu<'a, B: crate::vcpu::Vcpu> {
    pub(super) hw: B,
    pub(super) part: Partition,
    pub(super) frames: Private,
    pub(super) link: &'a mut crate::instance::xcore::Link,
    /// The guest's status page (a private frame) and its channels, in boot-info order.
    pub(super) status: u64,
    pub(super) chans: &'a [ChanMap],
    /// The machine's configuration space, which the guest reaches through its filtered
    /// view (`exits::Vcpu::config_space`).
    pub(super) pci: crate::pci::Cf8,
}

impl<B: crate::vcpu::Vcpu> Vcpu for GuestVcpu<'_, B> {
    #[inline(always)]
    fn regs(&mut self) -> &mut GuestRegs {
        self.hw.regs()
    }
    #[inline(always)]
    fn read(&mut self, f: Field) -> u64 {
        self.hw.read(f)
    }
    #[inline(always)]
    fn write(&mut self, f: Field, v: u64) {
        self.hw.write(f, v)
    }
    #[inline(always)]
    fn inject(&mut self, e: Event) {
        self.hw.inject(e)
    }
    #[inline(always)]
    fn set_interrupt_window(&mut self, on: bool) {
        self.hw.set_interrupt_window(on)
    }
    fn read_guest(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), HvError> {
        self.part.read(gpa, buf)
    }
    fn host_cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = raw_cpuid::native_cpuid::cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }
    fn send_ipi(&mut self, apic: u32, vector: u8) {
        arch::apic::send_fixed_ipi(apic, vector);
    }
    type Pci = crate::pci::Cf8;
    fn config_space(&mut self) -> &mut crate::pci::Cf8 {
        &mut self.pci
    }
}

impl<B: crate::vcpu::Vcpu> crate::caps::Env for GuestVcpu<'_, B> {
    fn now(&mut self) -> u64 {
        arch::rdtsc()
    }
    fn send(&mut self, to: usize, m: &vmcall_proto::channel::Payload) -> bool {
        self.link.try_send(to, m)
    }
    fn recv(&mut self) -> Option<(usize, vmcall_proto::channel::Payload)> {
        self.link.try_recv()
    }
    fn kick(&mut self, to: usize) {
        self.link.kick(to);
    }
    fn ept_map(&mut self, gpa: u64, hpa: u64, size: u64, write: bool) -> Result<(), HvError> {
        let perm = ept::Perm::shared(write);
        ept::map_with(&mut self.frames, self.hw.nested_root() & !0xfff, gpa, hpa, size, perm)?;
        self.hw.flush_nested();
        Ok(())
    }
    fn ept_unmap(&mut self, gpa: u64, size: u64) -> Result<(), HvError> {
        ept::unmap(&mut self.frames, self.hw.nested_root() & !0xfff, gpa, size)?;
        // No stale translation survives the unmap.
        self.hw.flush_nested();
        Ok(())
    }
    fn relax(&mut self) {
        arch::pause();
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
    this_cores_services!();
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

/// This core serves its inbox now (see `percpu::PerCore::served`).
pub(super) fn served_now() {
    // SAFETY: a core runs guests only after its `init_this_core`.
    unsafe { crate::percpu::this_core() }.served(arch::rdtsc());
}

/// The hypervisor side of a core whose guest is down (between incarnations, parked, or
/// over for good): the transport alone, no guest to enter, no EPT to change (the dead
/// guest's space holds nothing mapped and takes nothing in).
impl crate::caps::Env for crate::instance::xcore::Link {
    fn now(&mut self) -> u64 {
        arch::rdtsc()
    }
    fn send(&mut self, to: usize, m: &vmcall_proto::channel::Payload) -> bool {
        self.try_send(to, m)
    }
    fn recv(&mut self) -> Option<(usize, vmcall_proto::channel::Payload)> {
        self.try_recv()
    }
    fn kick(&mut self, to: usize) {
        crate::instance::xcore::Link::kick(self, to)
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
    this_cores_services!();
}
