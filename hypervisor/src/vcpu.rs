// SPDX-License-Identifier: MIT OR Apache-2.0
//! The vCPU interface: the seam between the hypervisor and a CPU virtualization backend.
//! Intel VT-x implements it in `vmx/` (`vmx::vcpu::VmxVcpu` over a VMCS); AMD SVM
//! (issue 24) implements it in `svm/` over a VMCB. Everything above a backend (the exit
//! handlers in `exits`, the fast path in `fastexit`, the per-core instance in `instance`)
//! reaches the guest's processor state only through what is defined here, so no module
//! outside a backend names a VMCS field or a VMCB one (`cargo xtask imports` checks it, token
//! by token: `xtask::backends`; `vmx`'s host test looks for the module paths).
//!
//! Owns the backend-neutral vocabulary: [`ExitKind`] (what an exit was, decoded by the
//! backend from its own exit codes: VMX basic reasons stay inside `vmx/`, SVM exit codes
//! inside `svm/`), [`Field`] (guest state the handlers read and write), [`Event`]
//! (injection), [`CrAccess`], [`IoAccess`], [`NestedFault`] (an exit's details, decoded),
//! [`Setup`] (what a guest starts with), and the two traits: [`ExitInfo`] (one exit) and
//! [`Vcpu`] (one guest's virtual CPU on this core: registers, injection, timer, nested
//! paging, setup, world switch).
//!
//! May call: `arch::vmx::GuestRegs` (the register save area the world-switch assembly
//! fills; an SVM world switch saves the same registers), `ept` (the frame pool a backend
//! takes its control structures from), `vmcall_proto` (the telemetry numbering of exit
//! codes).
//! Nothing here calls a backend.
//!
//! # Writing a backend (what each part must do)
//!
//! * One `Vcpu` value is one incarnation of one guest on the core that runs it: created
//!   by [`Vcpu::setup`] (its control structure built and made current), entered again and
//!   again by [`Vcpu::enter`], ended by [`Vcpu::clear`]. It is never shared with, or
//!   touched by, another core.
//! * An exit is read once ([`Vcpu::exit`]) into the backend's [`ExitInfo`]; only its kind
//!   is decoded at once, every other detail when a handler asks (one VMREAD each on VMX; a
//!   VMCB field load on SVM), so a cheap exit pays for what it uses.
//! * Instruction length ([`ExitInfo::instruction_len`]): the handlers advance RIP by it
//!   for every emulated instruction. VMX reports it (the VM-exit instruction length). SVM
//!   reports it only with the "NRIP save" feature (CPUID 8000_000AH:EDX[3]; then it is
//!   `nRIP - RIP` from the VMCB), which QEMU's TCG does not offer: there the backend
//!   must decode the instruction at RIP itself (the exits that are advanced are
//!   VMMCALL, CPUID, HLT, RDMSR/WRMSR, IN/OUT, INVD, WBINVD, XSETBV, MOV CR, CLTS, LMSW,
//!   each with its legacy and REX prefixes). A guessed constant is wrong: prefixes change
//!   the length.
//! * Timer ([`Vcpu::set_timer`]): the guest must exit after at most the given number of TSC
//!   ticks, whatever it does (spins, sleeps in HLT or MWAIT): the watchdog, the guest's
//!   timer, the membership's probes and the run's end all rely on it. VMX has the
//!   VMX-preemption timer. SVM has none: use the local APIC timer (one-shot, TSC-deadline
//!   or counted) with "intercept INTR" on, or the pause filter and a bound on HLT; the
//!   exit it causes is [`ExitKind::Timer`] (or [`ExitKind::ExternalInterrupt`], which the
//!   handlers also just resume). `0` must exit before the guest runs an instruction: the
//!   run loop enters with it to take mail that arrived meanwhile.
//! * Kicks: other cores send this core an NMI when they post it mail. An NMI taken while
//!   the guest runs must exit ([`ExitKind::Nmi`]; VMX: "NMI exiting"; SVM: intercept NMI)
//!   and [`Vcpu::host_nmi`] must then undo whatever NMI blocking the guest would inherit.
//!   One taken in the hypervisor runs [`Vcpu::KICK_HOOK`], which must make the next entry
//!   exit at once (VMX: the preemption timer zeroed; SVM, which has no such timer: for
//!   example a self-IPI, or V_IRQ with the virtual-interrupt intercept, pending at VMRUN).
//! * Injection ([`Vcpu::inject`]): at most one event per entry, delivered before the
//!   guest's next instruction; an exit that interrupted the delivery of an event
//!   (VMX: IDT-vectoring information; SVM: EXITINTINFO) must have it delivered again by
//!   [`Vcpu::redeliver`], unless a handler injected one itself.
//! * Nested paging: the instance builds the guest's nested page tables through `ept` (EPT
//!   format today; an SVM backend needs the NPT format there too, issue 24) and gives the
//!   backend the root ([`Setup::nested_root`]); after the instance changes a mapping it
//!   calls [`Vcpu::flush_nested`] (VMX: INVEPT single-context; SVM: a TLB flush of the
//!   guest's ASID at the next VMRUN).
//! * Exit codes: reports and the guest's telemetry page count exits by the backend's own
//!   code ([`ExitInfo::code`], below [`EXIT_CODES`]), named by [`EXIT_NAMES`]: today the VMX
//!   basic reasons (the telemetry page's ABI). An SVM backend maps its codes into that
//!   numbering for counting (VMMCALL counts as `vmcall`, NPF as `ept_violation`, ...) until
//!   the report grows a backend tag.

use crate::arch::vmx::GuestRegs;

/// What an exit was, whatever the backend: the exit handlers dispatch on this, never on a
/// backend's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// An NMI (a kick from another core) or an exception the hypervisor intercepts (none
    /// today). VMX: basic reason 0; SVM: VMEXIT_NMI.
    Nmi,
    /// A host interrupt while the guest ran. VMX: 1; SVM: VMEXIT_INTR.
    ExternalInterrupt,
    /// The guest shut down (triple fault). VMX: 2; SVM: VMEXIT_SHUTDOWN.
    TripleFault,
    /// An INIT signal. VMX: 3; SVM: VMEXIT_INIT.
    Init,
    /// The guest can take interrupts now (asked for by [`Vcpu::set_interrupt_window`]).
    /// VMX: 7; SVM: VMEXIT_VINTR.
    InterruptWindow,
    Cpuid,
    Hlt,
    Invd,
    Wbinvd,
    /// The hypercall instruction. VMX: VMCALL (18); SVM: VMMCALL.
    Hypercall,
    /// A virtualization instruction the guest may not use (#UD). VMX: VMCLEAR..VMXON,
    /// INVEPT, INVVPID, VMFUNC; SVM: VMRUN, VMLOAD, VMSAVE, STGI, CLGI, SKINIT, INVLPGA.
    VirtualizationInstruction,
    /// MOV to/from a control register, CLTS, LMSW: details in [`ExitInfo::cr_access`].
    CrAccess,
    /// Port I/O: details in [`ExitInfo::io`].
    Io,
    Rdmsr,
    Wrmsr,
    Mwait,
    Monitor,
    /// An access the nested page tables do not allow: details in
    /// [`ExitInfo::nested_fault`]. VMX: EPT violation; SVM: VMEXIT_NPF.
    NestedFault,
    /// A malformed nested page-table entry. VMX: EPT misconfiguration; SVM: VMEXIT_NPF
    /// with the reserved-bit error code.
    NestedMisconfig,
    /// The timer of [`Vcpu::set_timer`] expired. VMX: preemption timer (52).
    Timer,
    Xsetbv,
    /// The backend completed the exiting instruction itself (RIP moved past it); the
    /// handlers only resume. SVM: a write of the x2APIC EOI register by a guest whose
    /// doorbells the backend virtualizes (the host acknowledged the real one already).
    Completed,
    /// Anything else: the guest is stopped and the report names [`ExitInfo::code`].
    Other,
}

/// Guest state the handlers read or change (the backend keeps it in its control structure
/// or, for the general registers, in [`GuestRegs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Rip,
    Rsp,
    Rflags,
    /// The real CR0 (what the processor uses).
    Cr0,
    /// CR0 as the guest sees it (VMX: the read shadow; SVM: the backend keeps it, with
    /// CR0 reads intercepted).
    Cr0Shadow,
    Cr4,
    Cr4Shadow,
    Efer,
    FsBase,
    GsBase,
    Pat,
    /// Interruptibility: bit 0 blocking by STI, bit 1 by MOV SS, bit 3 by NMI (VMX's
    /// encoding; SVM: INTERRUPT_SHADOW is bits 0-1 together).
    Interruptibility,
    /// Access rights of SS: bits 6:5 are the CPL (SVM: the VMCB's CPL field, shifted to
    /// bits 6:5).
    SsAccessRights,
    /// Pending debug exceptions (bit 14, BS: a single-step trap due after the entry; SVM:
    /// DR6.BS with RFLAGS.TF kept).
    PendingDebug,
}

/// An event to inject at the next entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Exception { vector: u8, error_code: Option<u32> },
    Interrupt(u8),
}

/// What a control-register exit did (VMX: the exit qualification, SDM Vol. 3C Table 28-3;
/// SVM: the exit code says CR and direction, EXITINFO1 the register with decode assists,
/// else the backend decodes the instruction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    /// MOV to control register `cr` from general register `gpr` (0 = RAX ... 15 = R15,
    /// 4 = RSP).
    MovTo {
        cr: u8,
        gpr: u8,
    },
    /// MOV from control register `cr` into `gpr`.
    MovFrom {
        cr: u8,
        gpr: u8,
    },
    Clts,
    /// LMSW with its 16-bit source operand.
    Lmsw {
        source: u16,
    },
}

/// A port access (VMX: the exit qualification, Table 28-5; SVM: IOIO's EXITINFO1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoAccess {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub input: bool,
    /// INS/OUTS.
    pub string: bool,
}

/// A nested-paging fault: where, and `access`: bits 0-2 what the access was (read, write,
/// instruction fetch), bits 3-5 what the mapping there allowed (read, write, execute; all
/// clear when nothing is mapped). VMX: the EPT-violation qualification's own bits; SVM:
/// translated from the NPF error code (EXITINFO1) and a walk of the nested tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NestedFault {
    pub gpa: u64,
    pub access: u64,
}

/// What a guest starts with: the state its first entry loads and the policy its controls
/// carry. The backend turns it into its control structure ([`Vcpu::setup`]).
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// 64-bit mode with paging on, flat segments: RIP, RSP, CR3 (guest-physical).
    pub rip: u64,
    pub rsp: u64,
    pub cr3: u64,
    /// Host-physical root of the guest's nested page tables, as `ept` builds them (VMX:
    /// the EPTP, memory type and walk length included).
    pub nested_root: u64,
    /// The guest's TLB tag (VMX: VPID; SVM: ASID), non-zero and unique among the guests
    /// of the machine.
    pub tag: u16,
    /// The guest takes its own interrupts (its doorbells, its devices' lines) through its
    /// IDT: no exit for external interrupts, HLT halts for real (until the interrupt or
    /// the timer), and writes to the x2APIC EOI register pass. Otherwise both exit, so a
    /// HLT that can never wake is caught at once.
    pub direct_interrupts: bool,
    /// The guest owns PCI functions: their interrupt lines are routed to this core.
    pub devices: bool,
    /// MONITOR/MWAIT run without exits (`instance::setup::exitless_mwait`); else they exit
    /// ([`ExitKind::Monitor`], [`ExitKind::Mwait`]).
    pub exitless_mwait: bool,
}

/// One exit, as the backend read it.
pub trait ExitInfo {
    /// What it was.
    fn kind(&self) -> ExitKind;
    /// The backend's own exit code (VMX: the basic reason), for counters, reports and the
    /// exit trace: below [`EXIT_CODES`].
    fn code(&self) -> u16;
    /// The entry failed (the guest did not run; VMX: bit 31 of the exit reason; SVM:
    /// VMEXIT_INVALID).
    fn entry_failed(&self) -> bool;
    /// Length of the instruction that exited (see the module header for SVM).
    fn instruction_len(&self) -> u64;
    /// The guest RIP of the exiting instruction (before any handler moved it).
    fn rip(&self) -> u64;
    /// For [`ExitKind::CrAccess`].
    fn cr_access(&self) -> CrAccess;
    /// For [`ExitKind::Io`].
    fn io(&self) -> IoAccess;
    /// For [`ExitKind::NestedFault`] and [`ExitKind::NestedMisconfig`].
    fn nested_fault(&self) -> NestedFault;
}

/// Exit codes counted in reports and the telemetry page, and their names: the telemetry
/// ABI's numbering, the VMX basic reasons (see the module header).
pub use vmcall_proto::guest::EXIT_NAMES;
pub const EXIT_CODES: usize = vmcall_proto::guest::TELEMETRY_REASONS;

/// Why an entry did not happen (the guest did not run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryError {
    /// The backend's error number (VMX: the VM-instruction error field), for the log.
    pub code: u64,
}

/// Why [`Vcpu::setup`] failed: `reason` ends the incarnation (the report's "setup failed:
/// {reason}"), `detail` goes to the log when there is more to say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupError {
    pub reason: &'static str,
    pub detail: Option<&'static str>,
}

/// One guest's virtual CPU on this core (see the module header for what an implementation
/// must do). The instance owns one per incarnation and calls nothing of the backend but
/// this.
pub trait Vcpu: Sized {
    /// What the backend probed once at boot (VMX: `vmx::Features`).
    type Features;
    type Exit: ExitInfo;
    /// The exit codes ([`ExitInfo::code`]) of a hypercall and a CPUID exit: the fast path
    /// counts the exits it answers under them.
    const HYPERCALL_CODE: u16;
    const CPUID_CODE: u16;
    /// The kick hook: what the NMI handler (`arch::idt`) runs for another core's kick that
    /// arrives while this core is in the hypervisor with this vCPU live (the instance
    /// arms it with `percpu::PerCore::vcpu_live` once [`Vcpu::setup`] succeeded and
    /// disarms it before [`Vcpu::clear`]). It must make the vCPU's next [`Vcpu::enter`]
    /// exit before the guest runs an instruction, so that the run loop reads the mail the
    /// kick announced (VMX: the preemption timer of the current VMCS zeroed). An assembly
    /// routine, called with `call` on the NMI's stack with NMIs blocked: it preserves every
    /// register but RFLAGS and returns with `ret`.
    const KICK_HOOK: unsafe extern "C" fn();

    /// Builds this guest's control structure in frames of `frames` (identity-mapped frames
    /// of this core's private region), with every control the hypervisor's policy needs (the exits listed in
    /// `exits`' header; the MSRs of `exits::MSR_PASSTHROUGH` and `exits::MSR_SWITCHED`
    /// without exits; the ports `io_ports` without exits, every other port exiting; CR0
    /// and CR4 bits of `exits::CR0_MASK`/`CR4_MASK` owned by the hypervisor, the guest
    /// seeing the rest; the host state to return to), flushes any stale translation of its
    /// tag and nested root, and makes it current on this core. The registers start zeroed.
    /// `Err` says what failed (the control structure is then no longer in use); the frames
    /// taken stay in the pool's count until the incarnation's private region goes back
    /// whole.
    fn setup(
        f: &Self::Features,
        s: &Setup,
        frames: &mut impl crate::ept::Frames,
        io_ports: impl Iterator<Item = u16> + Clone,
    ) -> Result<Self, SetupError>;

    /// The general registers, saved at the exit and loaded at the entry.
    fn regs(&mut self) -> &mut GuestRegs;
    fn read(&mut self, f: Field) -> u64;
    /// Writes guest state; the exit handlers validated `v`.
    fn write(&mut self, f: Field, v: u64);
    /// Delivers `e` at the next entry; a guest halted (HLT without an exit) wakes for it.
    fn inject(&mut self, e: Event);
    /// Exit ([`ExitKind::InterruptWindow`]) as soon as the guest can take an interrupt.
    fn set_interrupt_window(&mut self, on: bool);
    /// The guest exits after at most `ticks` TSC ticks of running (0: at once).
    fn set_timer(&mut self, ticks: u64);
    /// The fast path's timer is `ticks >> timer_shift()` (`fastexit`'s `Cpu::write` of
    /// `Timer`); VMX: IA32_VMX_MISC[4:0].
    fn timer_shift(&self) -> u32;

    /// The world switch: runs the guest until its next exit that the fast path does not
    /// answer. `fast` points at the run loop's `fastexit::FastExit`, armed for this entry:
    /// the backend's exit landing hands it, with the saved registers and the exit code, to
    /// `fastexit::answer` (through the backend's `fastexit::Cpu`), and resumes the guest at
    /// once when that answers. (An opaque pointer here, as the assembly takes it: this
    /// module does not import `fastexit`, which imports the exit policy.) `Err`: the entry
    /// failed and the guest did not run.
    ///
    /// # Safety
    /// The vCPU was set up on this core and is current; `fast` points at a live
    /// `fastexit::FastExit` not otherwise used until this returns.
    unsafe fn enter(&mut self, fast: *mut core::ffi::c_void) -> Result<(), EntryError>;
    /// The exit the last `enter` ended with.
    fn exit(&mut self) -> Self::Exit;
    /// Whether `e` was an NMI for the host (another core's kick), not the guest's: if so
    /// the guest inherits no NMI blocking from it and NMIs are unblocked on the host side.
    fn host_nmi(&mut self, e: &Self::Exit) -> bool;
    /// After the handlers of `e`: an event whose delivery `e` interrupted is delivered
    /// again, unless a handler injected one.
    fn redeliver(&mut self, e: &Self::Exit);

    /// The root of the nested page tables this vCPU uses (what [`Setup::nested_root`] was).
    fn nested_root(&self) -> u64;
    /// Drops cached translations of the nested page tables (after a mapping changed).
    fn flush_nested(&mut self);
    /// Ends the use of the control structure on this core (VMX: VMCLEAR), so its frame may
    /// be reused as memory.
    fn clear(&mut self);
}
