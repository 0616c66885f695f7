// SPDX-License-Identifier: MIT OR Apache-2.0
//! VM exits: read once into a [`VmExit`], dispatched by one `match` in [`handle`], each
//! handler returning what happens next ([`Action`]). The handlers talk to the vCPU through
//! the [`Vcpu`] trait, so they run against a fake vCPU in host tests; the real one is
//! backed by the VMCS (`guest::VmcsVcpu`).
//!
//! Policy (the guest is never trusted):
//! * CPUID: passed through with VMX, x2APIC, MONITOR, the TSC deadline timer and the
//!   topology hidden (the guest sees one CPU); leaf 0x4000_0000 carries "mkvisor".
//! * VMCALL: the hypercall ABI of `vmcall_proto::hypercall`, from CPL 0 only (#GP otherwise).
//! * I/O: only writes to port 0xE9 (a debug console feeding the guest's console line) and to
//!   port 0x80 (POST, ignored); anything else gets #GP.
//! * MSRs: EFER (read; writes may only toggle SCE and NXE), FS/GS base, PAT (valid memory
//!   types only), TSC (read); the syscall MSRs and KERNEL_GS_BASE pass through (the host
//!   never uses them). Anything else gets #GP.
//! * CR0/CR4: the bits VMX or long mode depend on (PE, PG, NE, CD, NW; PAE, VMXE) are owned
//!   by the hypervisor; the guest sees CR4.VMXE clear; attempts to change them get #GP.
//!   CR8 is emulated (a stored value).
//! * VMX instructions, MONITOR/MWAIT: #UD. XSETBV: only XCR0 = 1 (x87, the reset value).
//! * EPT violation, EPT misconfiguration, triple fault, INIT, a failed VM entry, and any
//!   unknown exit: the guest is stopped and reported; the other guests carry on.
//! * HLT: sleeps until the guest's one-shot timer if it has one and interrupts are on,
//!   else the guest is stopped (it would never wake).

use crate::arch::vmx::GuestRegs;
use crate::caps::{HvCaps, Policy};
use vmcall_proto::hypercall::{
    HvError, Hypercall, CONSOLE_MAX, CPUID_SIGNATURE, CPUID_SIGNATURE_LEAF,
};

/// Basic exit reasons (SDM Vol. 3D appendix C) that have names in reports.
pub const REASON_NAMES: [&str; 70] = [
    "exception_nmi",
    "external_interrupt",
    "triple_fault",
    "init",
    "sipi",
    "io_smi",
    "other_smi",
    "interrupt_window",
    "nmi_window",
    "task_switch",
    "cpuid",
    "getsec",
    "hlt",
    "invd",
    "invlpg",
    "rdpmc",
    "rdtsc",
    "rsm",
    "vmcall",
    "vmclear",
    "vmlaunch",
    "vmptrld",
    "vmptrst",
    "vmread",
    "vmresume",
    "vmwrite",
    "vmxoff",
    "vmxon",
    "cr_access",
    "dr_access",
    "io",
    "rdmsr",
    "wrmsr",
    "entry_fail_guest_state",
    "entry_fail_msr_load",
    "reason_35",
    "mwait",
    "monitor_trap",
    "reason_38",
    "monitor",
    "pause",
    "entry_fail_machine_check",
    "reason_42",
    "tpr_below",
    "apic_access",
    "virtualized_eoi",
    "gdtr_idtr",
    "ldtr_tr",
    "ept_violation",
    "ept_misconfig",
    "invept",
    "rdtscp",
    "preemption_timer",
    "invvpid",
    "wbinvd",
    "xsetbv",
    "apic_write",
    "rdrand",
    "invpcid",
    "vmfunc",
    "encls",
    "rdseed",
    "pml_full",
    "xsaves",
    "xrstors",
    "reason_65",
    "spp",
    "umwait",
    "tpause",
    "loadiwkey",
];
pub const REASONS: usize = REASON_NAMES.len();

/// One VM exit, read once from the VMCS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmExit {
    pub reason: u16,
    pub entry_failed: bool,
    pub qualification: u64,
    pub instruction_len: u64,
    pub rip: u64,
    pub guest_physical: u64,
    pub guest_linear: u64,
}

/// Guest state the handlers read or change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Rip,
    Rsp,
    Rflags,
    Cr0,
    Cr0Shadow,
    Cr4,
    Cr4Shadow,
    Efer,
    FsBase,
    GsBase,
    Pat,
    Interruptibility,
    /// Access rights of SS: bits 6:5 are the CPL.
    SsAccessRights,
}

/// An event to inject at the next VM entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Exception { vector: u8, error_code: Option<u32> },
    Interrupt(u8),
}

/// Why the hypervisor stopped a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    EptViolation {
        gpa: u64,
        rip: u64,
        qualification: u64,
    },
    EptMisconfig {
        gpa: u64,
        rip: u64,
    },
    TripleFault {
        rip: u64,
    },
    Init {
        rip: u64,
    },
    EntryFailed {
        reason: u16,
        rip: u64,
    },
    HaltedForever {
        rip: u64,
    },
    Watchdog {
        rip: u64,
    },
    Unexpected {
        reason: u16,
        rip: u64,
    },
    /// The hypervisor could not set up or enter the guest (VMCS/ELF/memory problem).
    Setup(&'static str),
}

/// What happens after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Resume,
    Exit(u64),
    Stop(StopReason),
}

/// The vCPU as the handlers see it.
pub trait Vcpu {
    fn regs(&mut self) -> &mut GuestRegs;
    fn read(&mut self, f: Field) -> u64;
    fn write(&mut self, f: Field, v: u64);
    fn inject(&mut self, e: Event);
    fn set_interrupt_window(&mut self, on: bool);
    /// Copies guest-physical memory out; `Err` if any byte is outside the partition.
    fn read_guest(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), HvError>;
    /// The host processor's CPUID, before filtering.
    fn host_cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// The time-stamp counter now.
    fn now(&mut self) -> u64;
    /// Sends a fixed interrupt `vector` to the core with x2APIC id `apic`.
    fn send_ipi(&mut self, apic: u32, vector: u8);
    /// Maps host-physical `[hpa, hpa + size)` at guest-physical `gpa` in this guest's EPT,
    /// read-only or read-write, and flushes the EPT translations.
    fn ept_map(&mut self, gpa: u64, hpa: u64, size: u64, write: bool) -> Result<(), HvError>;
    /// Unmaps `[gpa, gpa + size)` from this guest's EPT and flushes its translations.
    fn ept_unmap(&mut self, gpa: u64, size: u64) -> Result<(), HvError>;
    /// Puts a message on the inter-core ring to core `to`; `false` if the ring is full.
    fn x_send(&mut self, to: usize, m: &vmcall_proto::channel::Payload) -> bool;
    /// The next inter-core message for this core, with its sender.
    fn x_recv(&mut self) -> Option<(usize, vmcall_proto::channel::Payload)>;
    /// Kicks core `to` (an NMI).
    fn x_kick(&mut self, to: usize);
}

/// The vCPU as the capability system sees it (`caps` does not know [`Vcpu`]).
pub struct CapEnv<'a, V: Vcpu>(pub &'a mut V);

impl<V: Vcpu> crate::caps::Env for CapEnv<'_, V> {
    fn now(&mut self) -> u64 {
        self.0.now()
    }
    fn send(&mut self, to: usize, m: &vmcall_proto::channel::Payload) -> bool {
        self.0.x_send(to, m)
    }
    fn recv(&mut self) -> Option<(usize, vmcall_proto::channel::Payload)> {
        self.0.x_recv()
    }
    fn kick(&mut self, to: usize) {
        self.0.x_kick(to)
    }
    fn ept_map(&mut self, gpa: u64, hpa: u64, size: u64, write: bool) -> Result<(), HvError> {
        self.0.ept_map(gpa, hpa, size, write)
    }
    fn ept_unmap(&mut self, gpa: u64, size: u64) -> Result<(), HvError> {
        self.0.ept_unmap(gpa, size)
    }
    fn relax(&mut self) {
        crate::arch::pause();
    }
}

/// Where a guest's console lines go.
pub trait ConsoleSink {
    fn line(&mut self, text: &str);
}

/// Per-guest software state kept by its core's instance.
pub struct GuestCtx {
    pub id: u32,
    pub core: u32,
    pub memory_mib: u32,
    pub tsc_per_ms: u64,
    pub exits: [u32; REASONS],
    pub exits_other: u32,
    line: [u8; CONSOLE_MAX as usize],
    line_len: usize,
    /// The one-shot timer: TSC deadline and vector.
    pub timer: Option<(u64, u8)>,
    /// Past this TSC value the guest is stopped.
    pub watchdog: u64,
    pub cr8: u64,
    pub hypercalls: u32,
    /// Per channel of this guest (boot-info order): the peer core's APIC id, if the peer runs.
    pub doorbells: [Option<u32>; vmcall_proto::guest::MAX_CHANNELS_PER_GUEST],
    pub doorbells_rung: u32,
    /// This guest's capabilities and this core's part of the capability protocol.
    pub caps: HvCaps,
    /// TSC ticks spent on other cores' behalf while this guest ran (not charged to it).
    pub foreign_tsc: u64,
}

const RFLAGS_IF: u64 = 1 << 9;
const CR0_OWNED: u64 = (1 << 0) | (1 << 5) | (1 << 29) | (1 << 30) | (1 << 31); // PE NE NW CD PG
const CR4_VMXE: u64 = 1 << 13;
const CR4_OWNED: u64 = (1 << 5) | CR4_VMXE; // PAE, VMXE
pub const CR0_MASK: u64 = CR0_OWNED;
pub const CR4_MASK: u64 = CR4_OWNED;
const EFER_SCE: u64 = 1;
const EFER_NXE: u64 = 1 << 11;
const GP: Event = Event::Exception { vector: 13, error_code: Some(0) };
const UD: Event = Event::Exception { vector: 6, error_code: None };

impl GuestCtx {
    pub fn new(id: u32, core: u32, memory_mib: u32, tsc_per_ms: u64, watchdog: u64) -> Self {
        GuestCtx {
            id,
            core,
            memory_mib,
            tsc_per_ms,
            exits: [0; REASONS],
            exits_other: 0,
            line: [0; CONSOLE_MAX as usize],
            line_len: 0,
            timer: None,
            watchdog,
            cr8: 0,
            hypercalls: 0,
            doorbells: [None; vmcall_proto::guest::MAX_CHANNELS_PER_GUEST],
            doorbells_rung: 0,
            caps: HvCaps::new(core as u16, Policy::from_tsc_per_ms(tsc_per_ms)),
            foreign_tsc: 0,
        }
    }

    /// Appends console bytes; complete lines go to `sink`. Control characters are replaced,
    /// so a guest cannot drive the host's terminal.
    fn console_bytes(&mut self, bytes: &[u8], sink: &mut impl ConsoleSink) {
        for &b in bytes {
            match b {
                b'\n' => self.flush_line(sink),
                b'\r' => {}
                b'\t' | 0x20..=0x7e | 0x80..=0xff => self.push(b, sink),
                _ => self.push(b'?', sink),
            }
        }
    }

    fn push(&mut self, b: u8, sink: &mut impl ConsoleSink) {
        if self.line_len == self.line.len() {
            self.flush_line(sink);
        }
        self.line[self.line_len] = b;
        self.line_len += 1;
    }

    /// Writes out a partial line (at guest end).
    pub fn flush_line(&mut self, sink: &mut impl ConsoleSink) {
        if self.line_len == 0 {
            return;
        }
        let bytes = &self.line[..self.line_len];
        // Cut at the last complete UTF-8 character; invalid text is shown as such.
        match core::str::from_utf8(bytes) {
            Ok(s) => sink.line(s),
            Err(_) => sink.line("(invalid UTF-8 console output)"),
        }
        self.line_len = 0;
    }

    /// Work before each VM entry: deliver a due timer interrupt (or ask for an interrupt
    /// window), enforce the watchdog. Returns the preemption-timer value to program (TSC
    /// ticks until the next deadline), or a stop.
    pub fn before_entry(&mut self, v: &mut impl Vcpu) -> Result<u64, StopReason> {
        let now = v.now();
        if now >= self.watchdog {
            return Err(StopReason::Watchdog { rip: v.read(Field::Rip) });
        }
        let mut next = self.watchdog;
        if let Some((deadline, vector)) = self.timer {
            if now >= deadline {
                let interruptible = v.read(Field::Rflags) & RFLAGS_IF != 0
                    && v.read(Field::Interruptibility) & 3 == 0;
                if interruptible {
                    v.inject(Event::Interrupt(vector));
                    self.timer = None;
                    v.set_interrupt_window(false);
                } else {
                    v.set_interrupt_window(true);
                }
            } else {
                next = next.min(deadline);
            }
        }
        Ok(next.saturating_sub(now))
    }

    fn count(&mut self, reason: u16) {
        match self.exits.get_mut(reason as usize) {
            Some(c) => *c = c.saturating_add(1),
            None => self.exits_other = self.exits_other.saturating_add(1),
        }
    }
}

fn advance(v: &mut impl Vcpu, e: &VmExit) {
    let rip = v.read(Field::Rip);
    v.write(Field::Rip, rip.wrapping_add(e.instruction_len));
    // The emulated instruction ends any STI/MOV-SS blocking (SDM Vol. 3C 26.3.1.5).
    let blocking = v.read(Field::Interruptibility);
    if blocking & 3 != 0 {
        v.write(Field::Interruptibility, blocking & !3);
    }
}

fn gpr(v: &mut impl Vcpu, n: u64) -> u64 {
    let r = *v.regs();
    match n {
        0 => r.rax,
        1 => r.rcx,
        2 => r.rdx,
        3 => r.rbx,
        4 => v.read(Field::Rsp),
        5 => r.rbp,
        6 => r.rsi,
        7 => r.rdi,
        8 => r.r8,
        9 => r.r9,
        10 => r.r10,
        11 => r.r11,
        12 => r.r12,
        13 => r.r13,
        14 => r.r14,
        _ => r.r15,
    }
}

fn set_gpr(v: &mut impl Vcpu, n: u64, val: u64) {
    let r = v.regs();
    match n {
        0 => r.rax = val,
        1 => r.rcx = val,
        2 => r.rdx = val,
        3 => r.rbx = val,
        4 => v.write(Field::Rsp, val),
        5 => r.rbp = val,
        6 => r.rsi = val,
        7 => r.rdi = val,
        8 => r.r8 = val,
        9 => r.r9 = val,
        10 => r.r10 = val,
        11 => r.r11 = val,
        12 => r.r12 = val,
        13 => r.r13 = val,
        14 => r.r14 = val,
        _ => r.r15 = val,
    }
}

/// Handles one exit. `sink` receives the guest's console lines.
pub fn handle(
    ctx: &mut GuestCtx,
    v: &mut impl Vcpu,
    e: &VmExit,
    sink: &mut impl ConsoleSink,
) -> Action {
    ctx.count(e.reason);
    let rip = e.rip;
    if e.entry_failed {
        return Action::Stop(StopReason::EntryFailed { reason: e.reason, rip });
    }
    match e.reason {
        // Our controls make these exits; there is nothing to do for the guest.
        0 | 1 => Action::Resume,
        2 => Action::Stop(StopReason::TripleFault { rip }),
        3 => Action::Stop(StopReason::Init { rip }),
        7 => {
            // Interrupt window: before_entry delivers the pending timer interrupt.
            v.set_interrupt_window(false);
            Action::Resume
        }
        10 => cpuid(ctx, v, e),
        12 => hlt(ctx, v, e),
        18 => vmcall(ctx, v, e, sink),
        19..=27 | 50 | 53 | 59 => {
            v.inject(UD);
            Action::Resume
        }
        28 => cr_access(ctx, v, e),
        30 => io(ctx, v, e, sink),
        31 => rdmsr(v, e),
        32 => wrmsr(v, e),
        36 | 39 => {
            v.inject(UD);
            Action::Resume
        }
        48 => Action::Stop(StopReason::EptViolation {
            gpa: e.guest_physical,
            rip,
            qualification: e.qualification,
        }),
        49 => Action::Stop(StopReason::EptMisconfig { gpa: e.guest_physical, rip }),
        // Preemption timer: before_entry sees the deadline that passed.
        52 => Action::Resume,
        55 => xsetbv(v, e),
        other => Action::Stop(StopReason::Unexpected { reason: other, rip }),
    }
}

fn cpuid(ctx: &mut GuestCtx, v: &mut impl Vcpu, e: &VmExit) -> Action {
    let (leaf, sub) = (v.regs().rax as u32, v.regs().rcx as u32);
    let mut r = v.host_cpuid(leaf, sub);
    match leaf {
        1 => {
            r[1] = (r[1] & 0x0000_ffff) | (1 << 16) | (ctx.core << 24); // one logical CPU
            r[2] &= !((1 << 5) | (1 << 3) | (1 << 21) | (1 << 24)); // VMX, MONITOR, x2APIC, TSC deadline
            r[2] |= 1 << 31; // hypervisor present
            r[3] &= !(1 << 28); // HTT
        }
        4 => r[0] &= 0x3fff, // one core, one thread per cache
        0xb | 0x1f => {
            r = if sub == 0 { [0, 1, 1 << 8, ctx.core] } else { [0, 0, sub & 0xff, ctx.core] };
        }
        CPUID_SIGNATURE_LEAF => {
            let w = |i: usize| {
                u32::from_le_bytes([
                    CPUID_SIGNATURE[i],
                    CPUID_SIGNATURE[i + 1],
                    CPUID_SIGNATURE[i + 2],
                    CPUID_SIGNATURE[i + 3],
                ])
            };
            r = [CPUID_SIGNATURE_LEAF + 1, w(0), w(4), w(8)];
        }
        0x4000_0001..=0x4000_00ff => r = [0; 4],
        _ => {}
    }
    let regs = v.regs();
    regs.rax = r[0] as u64;
    regs.rbx = r[1] as u64;
    regs.rcx = r[2] as u64;
    regs.rdx = r[3] as u64;
    advance(v, e);
    Action::Resume
}

fn hlt(ctx: &mut GuestCtx, v: &mut impl Vcpu, e: &VmExit) -> Action {
    advance(v, e);
    match ctx.timer {
        Some((deadline, _)) if v.read(Field::Rflags) & RFLAGS_IF != 0 => {
            // Sleep until the timer; before_entry then injects it.
            while v.now() < deadline.min(ctx.watchdog) {
                crate::arch::pause();
            }
            Action::Resume
        }
        _ => Action::Stop(StopReason::HaltedForever { rip: e.rip }),
    }
}

fn vmcall(
    ctx: &mut GuestCtx,
    v: &mut impl Vcpu,
    e: &VmExit,
    sink: &mut impl ConsoleSink,
) -> Action {
    if v.read(Field::SsAccessRights) >> 5 & 3 != 0 {
        v.inject(GP);
        return Action::Resume;
    }
    ctx.hypercalls = ctx.hypercalls.saturating_add(1);
    let r = *v.regs();
    let result: Result<u64, HvError> = match Hypercall::try_from(r.rax) {
        Err(err) => Err(err),
        Ok(Hypercall::ConsoleWrite) => {
            let (gpa, len) = (r.rdi, r.rsi);
            if len > CONSOLE_MAX {
                Err(HvError::BadLength)
            } else {
                let mut buf = [0u8; CONSOLE_MAX as usize];
                let buf = &mut buf[..len as usize];
                v.read_guest(gpa, buf).map(|()| {
                    ctx.console_bytes(buf, sink);
                    len
                })
            }
        }
        Ok(Hypercall::GuestInfo) => Ok(ctx.id as u64 & 0xffff
            | (ctx.core as u64 & 0xffff) << 16
            | (ctx.memory_mib as u64) << 32),
        Ok(Hypercall::Exit) => {
            ctx.flush_line(sink);
            return Action::Exit(r.rdi);
        }
        Ok(Hypercall::Yield) => Ok(0),
        Ok(Hypercall::TimerOneshot) => {
            let (delta, vector) = (r.rdi, r.rsi);
            if !(32..=255).contains(&vector) {
                Err(HvError::BadArgument)
            } else if delta == 0 {
                ctx.timer = None;
                Ok(0)
            } else {
                ctx.timer = Some((v.now().saturating_add(delta), vector as u8));
                Ok(0)
            }
        }
        Ok(Hypercall::TscPerMs) => Ok(ctx.tsc_per_ms),
        Ok(
            call @ (Hypercall::CapIdentify
            | Hypercall::CapSplit
            | Hypercall::CapMap
            | Hypercall::CapUnmap
            | Hypercall::CapTransfer
            | Hypercall::CapRevoke
            | Hypercall::CapAccept),
        ) => ctx
            .caps
            .hypercall(&mut CapEnv(v), call, r.rdi, r.rsi, r.rdx)
            .unwrap_or(Err(HvError::UnknownCall)),
        Ok(Hypercall::ExitCount) => {
            Ok(ctx.exits.iter().map(|&c| c as u64).sum::<u64>() + ctx.exits_other as u64)
        }
        Ok(Hypercall::Doorbell) => match ctx.doorbells.get(r.rdi as usize).copied().flatten() {
            Some(apic) => {
                v.send_ipi(apic, vmcall_proto::guest::DOORBELL_VECTOR);
                ctx.doorbells_rung = ctx.doorbells_rung.saturating_add(1);
                Ok(0)
            }
            None => Err(HvError::BadArgument),
        },
    };
    v.regs().rax = match result {
        Ok(x) => x,
        Err(err) => err.to_rax(),
    };
    advance(v, e);
    Action::Resume
}

fn cr_access(ctx: &mut GuestCtx, v: &mut impl Vcpu, e: &VmExit) -> Action {
    let q = e.qualification;
    let (cr, kind, reg) = (q & 0xf, (q >> 4) & 3, (q >> 8) & 0xf);
    match (cr, kind) {
        (0, 0) => {
            let new = gpr(v, reg);
            let real = v.read(Field::Cr0);
            if (new ^ real) & CR0_OWNED != 0 {
                v.inject(GP);
                return Action::Resume;
            }
            v.write(Field::Cr0, (new & !CR0_OWNED) | (real & CR0_OWNED));
            v.write(Field::Cr0Shadow, new);
        }
        (4, 0) => {
            let new = gpr(v, reg);
            let shadow = v.read(Field::Cr4Shadow);
            if (new ^ shadow) & CR4_OWNED != 0 {
                v.inject(GP);
                return Action::Resume;
            }
            let real = v.read(Field::Cr4);
            v.write(Field::Cr4, (new & !CR4_OWNED) | (real & CR4_OWNED));
            v.write(Field::Cr4Shadow, new);
        }
        (8, 0) => {
            let val = gpr(v, reg);
            if val > 15 {
                v.inject(GP);
                return Action::Resume;
            }
            ctx.cr8 = val;
        }
        (8, 1) => {
            let val = ctx.cr8;
            set_gpr(v, reg, val);
        }
        // CLTS and LMSW touch only TS / the low CR0 bits we do not own...
        (0, 2) => {
            let real = v.read(Field::Cr0);
            v.write(Field::Cr0, real & !(1 << 3));
            let sh = v.read(Field::Cr0Shadow);
            v.write(Field::Cr0Shadow, sh & !(1 << 3));
        }
        // ...but LMSW could clear PE: refuse it, rare in 64-bit code anyway.
        _ => {
            v.inject(GP);
            return Action::Resume;
        }
    }
    advance(v, e);
    Action::Resume
}

fn io(ctx: &mut GuestCtx, v: &mut impl Vcpu, e: &VmExit, sink: &mut impl ConsoleSink) -> Action {
    let q = e.qualification;
    let (size, input, string, port) = ((q & 7) + 1, q & 8 != 0, q & 16 != 0, (q >> 16) as u16);
    match (port, input, string, size) {
        (0xe9, false, false, 1) => {
            let b = v.regs().rax as u8;
            ctx.console_bytes(&[b], sink);
        }
        (0x80, false, false, _) => {}
        _ => {
            v.inject(GP);
            return Action::Resume;
        }
    }
    advance(v, e);
    Action::Resume
}

const MSR_EFER: u32 = 0xc000_0080;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_PAT: u32 = 0x277;
const MSR_TSC: u32 = 0x10;

fn rdmsr(v: &mut impl Vcpu, e: &VmExit) -> Action {
    let msr = v.regs().rcx as u32;
    let val = match msr {
        MSR_EFER => v.read(Field::Efer),
        MSR_FS_BASE => v.read(Field::FsBase),
        MSR_GS_BASE => v.read(Field::GsBase),
        MSR_PAT => v.read(Field::Pat),
        MSR_TSC => v.now(),
        _ => {
            v.inject(GP);
            return Action::Resume;
        }
    };
    let r = v.regs();
    r.rax = val & 0xffff_ffff;
    r.rdx = val >> 32;
    advance(v, e);
    Action::Resume
}

fn canonical(a: u64) -> bool {
    let top = (a as i64) >> 47;
    top == 0 || top == -1
}

fn wrmsr(v: &mut impl Vcpu, e: &VmExit) -> Action {
    let r = *v.regs();
    let (msr, val) = (r.rcx as u32, (r.rdx << 32) | (r.rax & 0xffff_ffff));
    let ok = match msr {
        MSR_EFER => {
            let cur = v.read(Field::Efer);
            let allowed = (val ^ cur) & !(EFER_SCE | EFER_NXE) == 0;
            if allowed {
                v.write(Field::Efer, val);
            }
            allowed
        }
        MSR_FS_BASE | MSR_GS_BASE if canonical(val) => {
            v.write(if msr == MSR_FS_BASE { Field::FsBase } else { Field::GsBase }, val);
            true
        }
        MSR_PAT if val.to_le_bytes().iter().all(|t| matches!(t, 0 | 1 | 4 | 5 | 6 | 7)) => {
            v.write(Field::Pat, val);
            true
        }
        _ => false,
    };
    if !ok {
        v.inject(GP);
        return Action::Resume;
    }
    advance(v, e);
    Action::Resume
}

fn xsetbv(v: &mut impl Vcpu, e: &VmExit) -> Action {
    let r = *v.regs();
    if r.rcx as u32 == 0 && (r.rdx << 32 | (r.rax & 0xffff_ffff)) == 1 {
        advance(v, e);
    } else {
        v.inject(GP);
    }
    Action::Resume
}

/// The x2APIC EOI register: written directly by guests that take doorbells.
pub const MSR_X2APIC_EOI: u32 = 0x80b;

/// The MSRs a guest may access without an exit (the host never uses them).
pub const MSR_PASSTHROUGH: [u32; 5] =
    [0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084, 0xc000_0102];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A vCPU made of plain values; guest memory is a vector.
    struct FakeVcpu {
        regs: GuestRegs,
        fields: HashMap<&'static str, u64>,
        injected: Vec<Event>,
        window: bool,
        mem: Vec<u8>,
        tsc: u64,
        ipis: Vec<(u32, u8)>,
        maps: Vec<(u64, u64, u64, bool)>,
    }

    impl FakeVcpu {
        fn new() -> Self {
            let mut fields = HashMap::new();
            fields.insert("Rip", 0x10_0000);
            fields.insert("Rflags", 0x2);
            fields.insert("Cr0", 0x8005_0033);
            fields.insert("Cr0Shadow", 0x8005_0033);
            fields.insert("Cr4", 0x2020);
            fields.insert("Cr4Shadow", 0x20);
            fields.insert("Efer", 0xd00);
            fields.insert("Pat", 0x0007_0406_0007_0406);
            FakeVcpu {
                regs: GuestRegs::default(),
                fields,
                injected: vec![],
                window: false,
                mem: vec![0; 1 << 20],
                tsc: 1000,
                ipis: vec![],
                maps: vec![],
            }
        }
        fn key(f: Field) -> &'static str {
            match f {
                Field::Rip => "Rip",
                Field::Rsp => "Rsp",
                Field::Rflags => "Rflags",
                Field::Cr0 => "Cr0",
                Field::Cr0Shadow => "Cr0Shadow",
                Field::Cr4 => "Cr4",
                Field::Cr4Shadow => "Cr4Shadow",
                Field::Efer => "Efer",
                Field::FsBase => "FsBase",
                Field::GsBase => "GsBase",
                Field::Pat => "Pat",
                Field::Interruptibility => "Intr",
                Field::SsAccessRights => "SsAr",
            }
        }
        fn get(&self, f: Field) -> u64 {
            *self.fields.get(Self::key(f)).unwrap_or(&0)
        }
    }

    impl Vcpu for FakeVcpu {
        fn regs(&mut self) -> &mut GuestRegs {
            &mut self.regs
        }
        fn read(&mut self, f: Field) -> u64 {
            self.get(f)
        }
        fn write(&mut self, f: Field, v: u64) {
            self.fields.insert(Self::key(f), v);
        }
        fn inject(&mut self, e: Event) {
            self.injected.push(e);
        }
        fn set_interrupt_window(&mut self, on: bool) {
            self.window = on;
        }
        fn read_guest(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), HvError> {
            let end = gpa.checked_add(buf.len() as u64).ok_or(HvError::BadAddress)?;
            if end > self.mem.len() as u64 {
                return Err(HvError::BadAddress);
            }
            buf.copy_from_slice(&self.mem[gpa as usize..end as usize]);
            Ok(())
        }
        fn host_cpuid(&mut self, _leaf: u32, _sub: u32) -> [u32; 4] {
            [0xffff_ffff; 4]
        }
        fn now(&mut self) -> u64 {
            self.tsc
        }
        fn send_ipi(&mut self, apic: u32, vector: u8) {
            self.ipis.push((apic, vector));
        }
        fn ept_map(&mut self, gpa: u64, hpa: u64, size: u64, write: bool) -> Result<(), HvError> {
            self.maps.push((gpa, hpa, size, write));
            Ok(())
        }
        fn x_send(&mut self, _to: usize, _m: &vmcall_proto::channel::Payload) -> bool {
            false
        }
        fn x_recv(&mut self) -> Option<(usize, vmcall_proto::channel::Payload)> {
            None
        }
        fn x_kick(&mut self, _to: usize) {}
        fn ept_unmap(&mut self, gpa: u64, size: u64) -> Result<(), HvError> {
            let i = self
                .maps
                .iter()
                .position(|m| m.0 == gpa && m.2 == size)
                .ok_or(HvError::NotMapped)?;
            self.maps.remove(i);
            Ok(())
        }
    }

    #[derive(Default)]
    struct Lines(Vec<String>);
    impl ConsoleSink for Lines {
        fn line(&mut self, t: &str) {
            self.0.push(t.to_string());
        }
    }

    fn ctx() -> GuestCtx {
        GuestCtx::new(2, 3, 16, 4000, u64::MAX)
    }
    fn exit(reason: u16, len: u64) -> VmExit {
        VmExit { reason, instruction_len: len, rip: 0x10_0000, ..VmExit::default() }
    }

    #[test]
    fn cpuid_hides_vmx_and_topology_and_signs() {
        let (mut c, mut v, mut s) = (ctx(), FakeVcpu::new(), Lines::default());
        v.regs.rax = 1;
        assert_eq!(handle(&mut c, &mut v, &exit(10, 2), &mut s), Action::Resume);
        assert_eq!(v.regs.rcx & (1 << 5), 0, "VMX hidden");
        assert_ne!(v.regs.rcx & (1 << 31), 0, "hypervisor bit");
        assert_eq!((v.regs.rbx >> 16) & 0xff, 1, "one logical CPU");
        assert_eq!(v.get(Field::Rip), 0x10_0002, "RIP advanced by the reported length");
        v.regs.rax = CPUID_SIGNATURE_LEAF as u64;
        handle(&mut c, &mut v, &exit(10, 2), &mut s);
        let sig: Vec<u8> = [v.regs.rbx, v.regs.rcx, v.regs.rdx]
            .iter()
            .flat_map(|r| (*r as u32).to_le_bytes())
            .collect();
        assert_eq!(&sig[..7], b"mkvisor");
        assert_eq!(c.exits[10], 2);
    }

    #[test]
    fn console_hypercall_checks_its_arguments() {
        let (mut c, mut v, mut s) = (ctx(), FakeVcpu::new(), Lines::default());
        v.mem[0x2000..0x2000 + 13].copy_from_slice(b"hello\x1b[2J\nab\n");
        v.regs = GuestRegs { rax: 0, rdi: 0x2000, rsi: 13, ..Default::default() };
        handle(&mut c, &mut v, &exit(18, 3), &mut s);
        assert_eq!(v.regs.rax, 13);
        assert_eq!(s.0, ["hello?[2J", "ab"], "escape sequences neutralised");
        v.regs = GuestRegs { rax: 0, rdi: (1 << 20) - 4, rsi: 8, ..Default::default() };
        handle(&mut c, &mut v, &exit(18, 3), &mut s);
        assert_eq!(v.regs.rax, HvError::BadAddress.to_rax());
        v.regs = GuestRegs { rax: 0, rdi: u64::MAX - 2, rsi: 8, ..Default::default() };
        handle(&mut c, &mut v, &exit(18, 3), &mut s);
        assert_eq!(v.regs.rax, HvError::BadAddress.to_rax(), "wrap-around is an error");
        v.regs = GuestRegs { rax: 0, rdi: 0x2000, rsi: CONSOLE_MAX + 1, ..Default::default() };
        handle(&mut c, &mut v, &exit(18, 3), &mut s);
        assert_eq!(v.regs.rax, HvError::BadLength.to_rax());
        v.regs = GuestRegs { rax: 77, ..Default::default() };
        handle(&mut c, &mut v, &exit(18, 3), &mut s);
        assert_eq!(v.regs.rax, HvError::UnknownCall.to_rax());
        assert!(v.injected.is_empty());
    }

    #[test]
    fn hypercalls_from_user_mode_get_gp() {
        let (mut c, mut v, mut s) = (ctx(), FakeVcpu::new(), Lines::default());
        v.write(Field::SsAccessRights, 0x60f3);
        assert_eq!(handle(&mut c, &mut v, &exit(18, 3), &mut s), Action::Resume);
        assert_eq!(v.injected, [GP]);
        assert_eq!(v.get(Field::Rip), 0x10_0000, "not advanced: the fault is on the VMCALL");
    }

    #[test]
    fn exit_info_and_timer_hypercalls() {
        let (mut c, mut v, mut s) = (ctx(), FakeVcpu::new(), Lines::default());
        v.regs = GuestRegs { rax: 1, ..Default::default() };
        handle(&mut c, &mut v, &exit(18, 3), &mut s);
        assert_eq!(v.regs.rax, 2 | 3 << 16 | 16 << 32);
        v.regs = GuestRegs { rax: 4, rdi: 500, rsi: 8, ..Default::default() };
        handle(&mut c, &mut v, &exit(18, 3), &mut s);
        assert_eq!(v.regs.rax, HvError::BadArgument.to_rax(), "vector below 32");
        v.regs = GuestRegs { rax: 4, rdi: 500, rsi: 40, ..Default::default() };
        handle(&mut c, &mut v, &exit(18, 3), &mut s);
        assert_eq!(c.timer, Some((1500, 40)));
        v.regs = GuestRegs { rax: 2, rdi: 7, ..Default::default() };
        assert_eq!(handle(&mut c, &mut v, &exit(18, 3), &mut s), Action::Exit(7));
    }

    #[test]
    fn doorbells_ring_only_channel_peers() {
        let (mut c, mut v, mut s) = (ctx(), FakeVcpu::new(), Lines::default());
        c.doorbells[0] = Some(7);
        c.doorbells[1] = None; // a channel whose peer never started
        let bad = HvError::BadArgument.to_rax();
        for (ch, want) in [(0u64, 0u64), (1, bad), (16, bad), (u64::MAX, bad)] {
            v.regs = GuestRegs { rax: 6, rdi: ch, ..Default::default() };
            assert_eq!(handle(&mut c, &mut v, &exit(18, 3), &mut s), Action::Resume);
            assert_eq!(v.regs.rax, want, "channel {ch}");
        }
        assert_eq!(v.ipis, [(7, vmcall_proto::guest::DOORBELL_VECTOR)]);
        assert_eq!(c.doorbells_rung, 1);
    }

    fn call(c: &mut GuestCtx, v: &mut FakeVcpu, nr: u64, a: u64, b: u64, d: u64) -> u64 {
        v.regs = GuestRegs { rax: nr, rdi: a, rsi: b, rdx: d, ..Default::default() };
        let mut s = Lines::default();
        assert_eq!(handle(c, v, &exit(18, 3), &mut s), Action::Resume);
        v.regs.rax
    }

    proptest::proptest! {
        /// Random hypercall numbers and arguments only ever produce a result in RAX (an
        /// error code for nonsense): never a panic, never an injected fault, never a stop.
        #[test]
        fn random_hypercalls_only_give_error_codes(nr in 0u64..17, a: u64, b: u64, d: u64) {
            let (mut c, mut v) = (ctx(), FakeVcpu::new());
            c.caps.grant(0x4000_0000, 2 << 20).unwrap();
            if nr == 2 {
                return Ok(()); // exit: ends the guest by design
            }
            v.regs = GuestRegs { rax: nr, rdi: a, rsi: b, rdx: d, ..Default::default() };
            let mut s = Lines::default();
            let act = handle(&mut c, &mut v, &exit(18, 3), &mut s);
            proptest::prop_assert_eq!(act, Action::Resume);
            proptest::prop_assert!(v.injected.is_empty());
        }
    }

    #[test]
    fn timer_is_delivered_only_when_interruptible() {
        let (mut c, mut v) = (ctx(), FakeVcpu::new());
        c.timer = Some((900, 40));
        v.write(Field::Rflags, 0x2);
        assert!(c.before_entry(&mut v).is_ok());
        assert!(v.window && v.injected.is_empty(), "IF=0: wait for a window");
        v.write(Field::Rflags, 0x202);
        c.before_entry(&mut v).unwrap();
        assert_eq!(v.injected, [Event::Interrupt(40)]);
        assert_eq!(c.timer, None);
        c.watchdog = 1000;
        assert!(matches!(c.before_entry(&mut v), Err(StopReason::Watchdog { .. })));
    }

    #[test]
    fn hlt_without_a_way_to_wake_stops_the_guest() {
        let (mut c, mut v, mut s) = (ctx(), FakeVcpu::new(), Lines::default());
        assert!(matches!(
            handle(&mut c, &mut v, &exit(12, 1), &mut s),
            Action::Stop(StopReason::HaltedForever { .. })
        ));
        c.timer = Some((900, 40));
        v.write(Field::Rflags, 0x202);
        assert_eq!(handle(&mut c, &mut v, &exit(12, 1), &mut s), Action::Resume);
    }

    #[test]
    fn msr_allow_list() {
        let (mut c, mut v, mut s) = (ctx(), FakeVcpu::new(), Lines::default());
        v.regs.rcx = 0x1b; // APIC base
        handle(&mut c, &mut v, &exit(31, 2), &mut s);
        assert_eq!(v.injected, [GP]);
        v.injected.clear();
        v.regs.rcx = MSR_EFER as u64;
        handle(&mut c, &mut v, &exit(31, 2), &mut s);
        assert_eq!(v.regs.rax, 0xd00);
        // Clearing LME is refused; toggling NXE is fine.
        v.regs = GuestRegs { rcx: MSR_EFER as u64, rax: 0x400, ..Default::default() };
        handle(&mut c, &mut v, &exit(32, 2), &mut s);
        assert_eq!(v.injected, [GP]);
        v.injected.clear();
        v.regs = GuestRegs { rcx: MSR_EFER as u64, rax: 0x500, ..Default::default() };
        handle(&mut c, &mut v, &exit(32, 2), &mut s);
        assert!(v.injected.is_empty());
        assert_eq!(v.get(Field::Efer), 0x500);
        v.regs =
            GuestRegs { rcx: MSR_FS_BASE as u64, rax: 0, rdx: 0x8000_0000, ..Default::default() };
        handle(&mut c, &mut v, &exit(32, 2), &mut s);
        assert_eq!(v.injected, [GP], "non-canonical base");
    }

    #[test]
    fn owned_control_register_bits_are_protected() {
        let (mut c, mut v, mut s) = (ctx(), FakeVcpu::new(), Lines::default());
        // mov cr4, rax with VMXE set: refused.
        v.regs.rax = 0x2020;
        let mut e = exit(28, 3);
        e.qualification = 4;
        handle(&mut c, &mut v, &e, &mut s);
        assert_eq!(v.injected, [GP]);
        v.injected.clear();
        // mov cr4, rax setting OSFXSR (bit 9): allowed, VMXE kept in the real value.
        v.regs.rax = 0x220;
        handle(&mut c, &mut v, &e, &mut s);
        assert!(v.injected.is_empty());
        assert_eq!((v.get(Field::Cr4), v.get(Field::Cr4Shadow)), (0x2220, 0x220));
        // mov cr0, rbx clearing PG: refused.
        v.regs.rbx = 0x0005_0033;
        e.qualification = 3 << 8;
        handle(&mut c, &mut v, &e, &mut s);
        assert_eq!(v.injected, [GP]);
    }

    #[test]
    fn io_allow_list_and_stops() {
        let (mut c, mut v, mut s) = (ctx(), FakeVcpu::new(), Lines::default());
        for b in b"hi\n" {
            v.regs.rax = *b as u64;
            let mut e = exit(30, 1);
            e.qualification = 0xe9 << 16;
            handle(&mut c, &mut v, &e, &mut s);
        }
        assert_eq!(s.0, ["hi"]);
        let mut e = exit(30, 1);
        e.qualification = (0x3f8 << 16) | 8; // in al, dx from COM1
        handle(&mut c, &mut v, &e, &mut s);
        assert_eq!(v.injected, [GP]);
        let mut e = exit(48, 0);
        e.guest_physical = 0x123_4000;
        assert!(matches!(
            handle(&mut c, &mut v, &e, &mut s),
            Action::Stop(StopReason::EptViolation { gpa: 0x123_4000, .. })
        ));
        assert!(matches!(
            handle(&mut c, &mut v, &exit(2, 0), &mut s),
            Action::Stop(StopReason::TripleFault { .. })
        ));
        assert!(matches!(handle(&mut c, &mut v, &exit(20, 3), &mut s), Action::Resume));
        assert_eq!(v.injected.last(), Some(&UD), "VMLAUNCH in a guest is #UD");
        assert!(matches!(
            handle(&mut c, &mut v, &exit(66, 0), &mut s),
            Action::Stop(StopReason::Unexpected { reason: 66, .. })
        ));
        assert!(matches!(
            handle(&mut c, &mut v, &exit(999, 0), &mut s),
            Action::Stop(StopReason::Unexpected { reason: 999, .. })
        ));
        assert_eq!(c.exits_other, 1);
    }
}
