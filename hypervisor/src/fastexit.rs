// SPDX-License-Identifier: MIT OR Apache-2.0
//! The exits answered in the exit landing, before the run loop sees them. Owns [`FastExit`]
//! (what the fast path may use: armed by the run loop before each entry it makes) and
//! [`answer`], which the backend's exit landing calls with every guest register saved (VMX:
//! `vmx::vcpu::mkv_fast_exit`, SVM: `svm::vcpu::mkv_svm_fast_exit`, each called by symbol
//! from the world-switch assembly of `arch::vmx`, `arch::svm`); a `true` answer sends the
//! guest straight back (VMRESUME, VMRUN).
//! May call: `exits` (the CPUID policy, the checks, the answering hypercalls: one
//! implementation with the run loop's handlers), `vmcall_proto`. Called by the backends
//! (`vmx::vcpu`, `svm::vcpu`) and armed by `instance`.
//! Reaches the guest's state only through [`Cpu`], which each backend implements over its
//! own control structure (VMX: the current VMCS and the saved registers; SVM: the VMCB,
//! which holds RAX, and the saved registers): which exits are answered, the privilege
//! check and the answers are here, once, for both.
//!
//! What it answers: CPUID, and the hypercalls that only answer (`yield`, `guest_info`,
//! `tsc_per_ms`, `exit_count`) from CPL 0. Everything else, and these too when the fast path
//! is not armed, goes to the run loop as before. The run loop arms it only when nothing is
//! pending for the guest or the core (no event to inject, no capability work, no exit
//! tracing, no injected fault) and only until the next deadline of anything it watches (the
//! watchdog, the guest's timer, the membership's next tick, the end of the run): the target
//! it programs the backend's run timer for; and it stops answering (without a timer for
//! it) when the next per-channel traffic copy for the telemetry page is due. So an exit
//! answered here is one the run loop would have answered the same way, with nothing else
//! to do.
//!
//! Each answer, before it changes anything: the TSC is before the deadline; the run timer
//! is programmed again for the deadline (VMX: VM entry reloads the preemption timer from
//! the VMCS, so without this a guest exiting often would push it out; SVM's APIC timer
//! keeps counting to its deadline and needs nothing); then the core's mail word and kick
//! flag are both zero (VMX: a kick arriving after the timer write zeroes the timer in the
//! NMI handler, `arch::idt`, so the guest exits at once and the run loop reads the mail;
//! SVM: the landing runs with GIF clear, so a kick's NMI stays pending and exits the guest
//! at the VMRUN); then the backend knows where the instruction ends ([`Cpu::rip_after`]:
//! VMX's exit instruction length, SVM's nRIP or its decoder; an instruction it cannot
//! decode is left to the run loop). Then it answers, advances RIP (ending any STI/MOV-SS
//! blocking, as the run loop's handlers do) and counts itself, once: in the telemetry page
//! (exact whenever the guest reads it), its one running tally, which the run loop folds
//! into `exits::Counters` after its next exit ([`FastExit::answered`]: the page's `entries`
//! and `hypercalls` against what the run loop published at its entry).

use core::sync::atomic::{AtomicU64, Ordering};
use vmcall_proto::guest::Telemetry;
use vmcall_proto::hypercall::Hypercall;

/// The fast path's state for one vCPU, owned by the run loop of its core.
#[repr(C)]
pub struct FastExit {
    /// The deadline the preemption timer aims at (the run loop's next deadline).
    pub until: u64,
    /// The fast path answers exits taken before this TSC (at most `until`); 0 = off.
    pub answer_until: u64,
    /// The preemption timer counts at the TSC rate shifted right by this (IA32_VMX_MISC).
    pub timer_shift: u32,
    /// Whether the guest waits exitless (its CPUID shows MONITOR).
    pub mwait: bool,
    pub core: u32,
    /// The run loop's exit total at its last entry less the telemetry page's `entries`
    /// then ([`FastExit::base`]): with the page's `entries` (one more per answer here), the
    /// exit total so far (for `exit_count`).
    exits_base: u64,
    /// `guest_info`'s and `tsc_per_ms`'s answers.
    pub info: u64,
    pub tsc_per_ms: u64,
    /// This core's mail word and kick flag (`xcore::MAIL`, `PerCore::kicked`).
    pub mail: *const AtomicU64,
    pub kicked: *const AtomicU64,
    /// The guest's telemetry (its status page, identity-mapped, read-only to the guest).
    pub telemetry: *mut Telemetry,
}

impl FastExit {
    /// Off until armed, answering nothing.
    pub fn new(
        core: u32,
        mail: &'static AtomicU64,
        kicked: &'static AtomicU64,
        telemetry: *mut Telemetry,
    ) -> FastExit {
        FastExit {
            until: 0,
            answer_until: 0,
            timer_shift: 0,
            mwait: false,
            core,
            exits_base: 0,
            info: 0,
            tsc_per_ms: 0,
            mail,
            kicked,
            telemetry,
        }
    }

    /// At the run loop's entry, once the telemetry page shows its counters: `exits_total`
    /// is its exit total (every exit before this entry).
    #[inline(always)]
    pub fn base(&mut self, exits_total: u64) {
        // `telemetry` is the guest's status page, valid for the incarnation (see `answer`).
        // SAFETY: a valid page (above); the guest is not running.
        let entries = unsafe { (*self.telemetry).entries };
        self.exits_base = exits_total.wrapping_sub(entries);
    }

    /// The exits answered here since the run loop's entry, (hypercalls, CPUIDs), read off
    /// the telemetry page (the one tally the answers keep): `exits_total` and `hypercalls`
    /// are the run loop's counters as they were at that entry ([`FastExit::base`]; the
    /// page's `hypercalls` were published equal to them).
    #[inline(always)]
    pub fn answered(&self, exits_total: u64, hypercalls: u32) -> (u64, u64) {
        // SAFETY: as in `base`.
        let t = unsafe { &*self.telemetry };
        let all = t.entries.wrapping_add(self.exits_base).wrapping_sub(exits_total);
        let h = t.hypercalls.wrapping_sub(u64::from(hypercalls));
        (h, all.wrapping_sub(h))
    }
}

/// The guest state and instructions the fast path uses: the backend's (VMX: the current
/// VMCS and the saved registers, `vmx::vcpu`; SVM: the VMCB and the saved registers,
/// `svm::vcpu`), a fake in host tests.
pub trait Cpu {
    /// Whether the exit of code `code` (as the landing hands it: VMX, the whole exit-reason
    /// field; SVM, the telemetry code of a VMMCALL or CPUID exit) is a hypercall, a CPUID:
    /// the only exits answered here. Two predicates, not a decoded kind: each folds into
    /// its branch (one compare). `code` also indexes the telemetry page's exit counters.
    fn is_hypercall(&self, code: u64) -> bool;
    fn is_cpuid(&self, code: u64) -> bool;
    fn read(&mut self, f: Field) -> u64;
    fn write(&mut self, f: Field, v: u64);
    /// Where the exiting instruction ends (its RIP plus its length), or `None` when the
    /// backend cannot tell (SVM without nRIP: bytes it cannot decode): then the run loop
    /// takes the exit. Asked once, after the answer is decided and before anything changes.
    fn rip_after(&mut self) -> Option<u64>;
    /// The processor's own, the same on both backends (host tests give fakes).
    #[inline(always)]
    fn rdtsc(&mut self) -> u64 {
        crate::arch::rdtsc()
    }
    #[inline(always)]
    fn cpuid(&mut self, leaf: u32, sub: u32) -> [u32; 4] {
        let r = raw_cpuid::native_cpuid::cpuid_count(leaf, sub);
        [r.eax, r.ebx, r.ecx, r.edx]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    SsAccessRights,
    Rflags,
    /// Written only (the new RIP, [`Cpu::rip_after`]).
    Rip,
    Interruptibility,
    /// The timer that bounds the guest's run (VMX: the VMX-preemption timer), in its own
    /// units: TSC ticks shifted right by [`FastExit::timer_shift`]. Written only; a
    /// backend whose timer counts to its deadline on its own (SVM) ignores the write.
    Timer,
    /// The general registers a CPUID and the answering hypercalls read and write (SVM
    /// keeps RAX in the VMCB, the others in the saved registers).
    Rax,
    Rbx,
    Rcx,
    Rdx,
}

/// Answers the exit of code `code` (as the landing hands it) if it can (see the module
/// header); `false` leaves everything as it was for the run loop (the timer aside, which
/// the run loop programs anyway).
#[inline(always)]
pub fn answer(c: &mut impl Cpu, fx: &mut FastExit, code: u64) -> bool {
    let t0 = c.rdtsc();
    if t0 >= fx.answer_until {
        return false;
    }
    // Single-stepping: the run loop leaves the trap pending (`exits::advance`).
    if c.read(Field::Rflags) & crate::exits::RFLAGS_TF != 0 {
        return false;
    }
    let hypercall = c.is_hypercall(code);
    if hypercall {
        // From CPL 0 only (the run loop injects #GP otherwise).
        if !crate::exits::ring0(c.read(Field::SsAccessRights)) {
            return false;
        }
        // SAFETY: the page is valid here (below).
        let entries = unsafe { (*fx.telemetry).entries };
        let facts = crate::exits::Facts {
            info: fx.info,
            tsc_per_ms: fx.tsc_per_ms,
            exits: fx.exits_base.wrapping_add(entries + 1),
        };
        let call = Hypercall::try_from(c.read(Field::Rax));
        let Some(value) = call.ok().and_then(|call| facts.answer(call)) else {
            return false;
        };
        if !quiet(c, fx, t0) {
            return false;
        }
        let Some(rip) = c.rip_after() else {
            return false;
        };
        c.write(Field::Rax, value);
        c.write(Field::Rip, rip);
    } else if c.is_cpuid(code) {
        if !quiet(c, fx, t0) {
            return false;
        }
        let (leaf, sub) = (c.read(Field::Rax) as u32, c.read(Field::Rcx) as u32);
        let r = crate::exits::cpuid_seen(leaf, sub, c.cpuid(leaf, sub), fx.core, fx.mwait);
        // (After the host's CPUID, which changes nothing: fewer registers live across it.)
        let Some(rip) = c.rip_after() else {
            return false;
        };
        c.write(Field::Rax, r[0] as u64);
        c.write(Field::Rbx, r[1] as u64);
        c.write(Field::Rcx, r[2] as u64);
        c.write(Field::Rdx, r[3] as u64);
        c.write(Field::Rip, rip);
    } else {
        return false;
    }
    let blocking = c.read(Field::Interruptibility);
    if let Some(b) = crate::exits::unblocked(blocking) {
        c.write(Field::Interruptibility, b);
    }
    // `telemetry` is the guest's status page, a frame of this core's private region that
    // outlives the vCPU.
    // SAFETY: that page is valid and writable here; the guest is not running.
    let t = unsafe { &mut *fx.telemetry };
    t.exits[code as usize] = t.exits[code as usize].wrapping_add(1);
    t.hypercalls = t.hypercalls.wrapping_add(hypercall as u64);
    t.entries = t.entries.wrapping_add(1);
    t.hypervisor_tsc = t.hypervisor_tsc.wrapping_add(c.rdtsc().wrapping_sub(t0));
    true
}

/// Programs the run timer for the deadline, then looks at the mail word and the
/// kick flag: whether the core has nothing to read.
#[inline(always)]
fn quiet(c: &mut impl Cpu, fx: &FastExit, now: u64) -> bool {
    // A 32-bit field: VMWRITE keeps the low half, so a value past it makes the timer fire
    // early, never late (the run loop then programs it again).
    c.write(Field::Timer, (fx.until - now) >> fx.timer_shift);
    // SAFETY: both point at statics of this core (`FastExit::new` takes 'static refs).
    let (mail, kicked) = unsafe { (&*fx.mail, &*fx.kicked) };
    kicked.load(Ordering::Acquire) == 0 && mail.load(Ordering::Acquire) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::vmx::GuestRegs;
    use vmcall_proto::guest::StatusPage;

    struct Fake {
        tsc: u64,
        reason: u64,
        regs: GuestRegs,
        ss_ar: u64,
        rflags: u64,
        len: u64,
        rip: u64,
        blocking: u64,
        timer: Option<u64>,
        cpuid: u32,
        /// Writes of the interruptibility state (a VMWRITE the fast path spends only when
        /// there is blocking to end).
        blocking_writes: u32,
    }
    impl Cpu for Fake {
        fn is_hypercall(&self, code: u64) -> bool {
            code == 18
        }
        fn is_cpuid(&self, code: u64) -> bool {
            code == 10
        }
        fn read(&mut self, f: Field) -> u64 {
            match f {
                Field::SsAccessRights => self.ss_ar,
                Field::Rflags => self.rflags,
                Field::Interruptibility => self.blocking,
                Field::Rax => self.regs.rax,
                Field::Rcx => self.regs.rcx,
                _ => panic!("{f:?} is not read"),
            }
        }
        fn write(&mut self, f: Field, v: u64) {
            match f {
                Field::Rip => self.rip = v,
                Field::Interruptibility => {
                    self.blocking = v;
                    self.blocking_writes += 1;
                }
                Field::Timer => self.timer = Some(v),
                Field::Rax => self.regs.rax = v,
                Field::Rbx => self.regs.rbx = v,
                Field::Rcx => self.regs.rcx = v,
                Field::Rdx => self.regs.rdx = v,
                _ => panic!("{f:?} is read-only"),
            }
        }
        fn rip_after(&mut self) -> Option<u64> {
            // A length of 0: an instruction the backend cannot decode.
            (self.len != 0).then(|| self.rip + self.len)
        }
        fn rdtsc(&mut self) -> u64 {
            self.tsc += 7;
            self.tsc
        }
        fn cpuid(&mut self, leaf: u32, _sub: u32) -> [u32; 4] {
            self.cpuid += 1;
            if leaf == 1 {
                [0x806f8, 0x0004_0800, 0xffff_ffff, 0xffff_ffff]
            } else {
                [leaf, 2, 3, 4]
            }
        }
    }

    // The fakes' exit codes are VMX's (the telemetry numbering): 18 a hypercall, 10 a
    // CPUID (the real predicates are `vmx::vcpu`'s, tested there).

    /// As the landing calls it, with the fake's exit reason and `regs` as the guest's.
    fn ans(c: &mut Fake, regs: &mut GuestRegs, fx: &mut FastExit) -> bool {
        let reason = c.reason;
        c.regs = *regs;
        let answered = answer(c, fx, reason);
        *regs = c.regs;
        answered
    }

    fn fake(reason: u64) -> Fake {
        Fake {
            tsc: 1000,
            reason,
            regs: GuestRegs::default(),
            ss_ar: 0x93,
            rflags: 0x202,
            len: 3,
            rip: 0x10_0000,
            blocking: 0,
            timer: None,
            cpuid: 0,
            blocking_writes: 0,
        }
    }

    static QUIET: AtomicU64 = AtomicU64::new(0);

    fn armed(
        page: &mut StatusPage,
        mail: &'static AtomicU64,
        kicked: &'static AtomicU64,
    ) -> FastExit {
        let mut fx = FastExit::new(3, mail, kicked, &mut page.telemetry);
        fx.until = 1_000_000;
        fx.answer_until = 1_000_000;
        fx.timer_shift = 5;
        fx.base(40);
        fx.info = 0x1234;
        fx.tsc_per_ms = 4001;
        fx
    }

    fn page() -> Box<StatusPage> {
        // SAFETY: StatusPage is plain u64s: all-zero is a valid value.
        Box::new(unsafe { core::mem::zeroed() })
    }

    #[test]
    fn the_answering_hypercalls_are_answered_counted_and_timed() {
        let mut p = page();
        let mut fx = armed(&mut p, &QUIET, &QUIET);
        let mut regs = GuestRegs { rax: Hypercall::Yield as u64, rbx: 9, ..Default::default() };
        let mut c = fake(18);
        assert!(ans(&mut c, &mut regs, &mut fx));
        assert_eq!((regs.rax, regs.rbx), (0, 9), "yield answers 0 and touches nothing else");
        assert_eq!(c.rip, 0x10_0003, "RIP past the VMCALL");
        assert_eq!(c.timer, Some((1_000_000 - 1007) >> 5), "the timer aims at the deadline");
        for (call, want) in [
            (Hypercall::GuestInfo, 0x1234),
            (Hypercall::TscPerMs, 4001),
            (Hypercall::ExitCount, 40 + 4), // three answered before it, itself included
        ] {
            regs.rax = call as u64;
            assert!(ans(&mut c, &mut regs, &mut fx));
            assert_eq!(regs.rax, want, "{call:?}");
        }
        assert_eq!(fx.answered(40, 0), (4, 0));
        let t = &p.telemetry;
        assert_eq!((t.exits[18], t.hypercalls, t.entries), (4, 4, 4));
        assert_eq!(t.hypervisor_tsc, 4 * 7, "from its first TSC read to its last");
    }

    #[test]
    fn cpuid_is_answered_with_the_run_loops_policy() {
        let mut p = page();
        let mut fx = armed(&mut p, &QUIET, &QUIET);
        let mut regs = GuestRegs { rax: 1, ..Default::default() };
        let mut c = fake(10);
        c.len = 2;
        assert!(ans(&mut c, &mut regs, &mut fx));
        let want = crate::exits::cpuid_seen(1, 0, [0x806f8, 0x0004_0800, !0, !0], 3, false);
        assert_eq!([regs.rax, regs.rbx, regs.rcx, regs.rdx], want.map(u64::from));
        assert_eq!(regs.rcx & (1 << 5), 0, "VMX hidden");
        assert_eq!(c.rip, 0x10_0002);
        assert_eq!(fx.answered(40, 0), (0, 1));
        assert_eq!((p.telemetry.exits[10], p.telemetry.hypercalls), (1, 0));
    }

    #[test]
    fn an_sti_shadow_ends_with_the_answered_instruction() {
        let mut p = page();
        let mut fx = armed(&mut p, &QUIET, &QUIET);
        let mut regs = GuestRegs { rax: 0, ..Default::default() };
        let mut c = fake(10);
        c.blocking = 0b1011;
        assert!(ans(&mut c, &mut regs, &mut fx));
        assert_eq!(c.blocking, 0b1000, "STI and MOV-SS blocking cleared, NMI blocking kept");
        assert_eq!(c.blocking_writes, 1);
        // Nothing to end: no VMWRITE spent on it.
        for blocking in [0, 0b1000] {
            let mut c = fake(10);
            c.blocking = blocking;
            assert!(ans(&mut c, &mut regs, &mut fx));
            assert_eq!((c.blocking, c.blocking_writes), (blocking, 0));
        }
    }

    #[test]
    fn exit_count_counts_the_cpuids_answered_here_too() {
        let mut p = page();
        let mut fx = armed(&mut p, &QUIET, &QUIET);
        let mut regs = GuestRegs::default();
        for _ in 0..2 {
            regs.rax = 0;
            assert!(ans(&mut fake(10), &mut regs, &mut fx));
        }
        regs.rax = Hypercall::ExitCount as u64;
        assert!(ans(&mut fake(18), &mut regs, &mut fx));
        assert_eq!(regs.rax, 40 + 2 + 1, "the base, two CPUIDs, itself");
    }

    /// Left for the run loop, with the guest's state untouched.
    fn declined(c: &mut Fake, regs: &mut GuestRegs, fx: &mut FastExit, p: &StatusPage) {
        let (before, rip) = (*regs, c.rip);
        assert!(!ans(c, regs, fx));
        assert_eq!((*regs, c.rip), (before, rip));
        assert_eq!(fx.answered(40, 0), (0, 0));
        assert_eq!(p.telemetry.entries, 0);
        assert_eq!(c.cpuid, 0, "CPUID not even executed");
    }

    #[test]
    fn everything_else_goes_to_the_run_loop() {
        static MAIL: AtomicU64 = AtomicU64::new(1 << 2);
        static KICKED: AtomicU64 = AtomicU64::new(1);
        let mut p = page();
        // Not armed, or past the deadline.
        let mut fx = armed(&mut p, &QUIET, &QUIET);
        fx.answer_until = 0;
        declined(&mut fake(10), &mut GuestRegs::default(), &mut fx, &p);
        fx.answer_until = 1007;
        declined(&mut fake(10), &mut GuestRegs::default(), &mut fx, &p);
        fx.answer_until = 1008;
        let mut c = fake(10);
        assert!(ans(&mut c, &mut GuestRegs::default(), &mut fx), "one tick before");
        assert_eq!(
            c.timer,
            Some((1_000_000 - 1007) >> 5),
            "answering stops earlier (a telemetry copy), the timer still aims at the deadline"
        );
        p.telemetry.entries = 0;
        // Other exits, other hypercalls, CPL 3.
        for reason in [0, 1, 12, 30, 48, 52, 18 | 1 << 31, 10 | 1 << 31] {
            declined(&mut fake(reason), &mut GuestRegs::default(), &mut fx, &p);
        }
        for call in [0, 2, 4, 6, 8, 13, 15, 16, 99, u64::MAX] {
            let mut regs = GuestRegs { rax: call, ..Default::default() };
            declined(&mut fake(18), &mut regs, &mut fx, &p);
        }
        let mut c = fake(18);
        c.ss_ar = 0xf3; // DPL 3
        declined(&mut c, &mut GuestRegs { rax: 3, ..Default::default() }, &mut fx, &p);
        c.ss_ar = 0x93 | 1 << 5; // DPL 1
        declined(&mut c, &mut GuestRegs { rax: 3, ..Default::default() }, &mut fx, &p);
        // Single-stepping.
        let mut c = fake(10);
        c.rflags = 0x302;
        declined(&mut c, &mut GuestRegs::default(), &mut fx, &p);
        // An instruction the backend cannot find the end of (SVM's decoder), for both (the
        // host's CPUID may have run: it changes nothing).
        for (reason, rax) in [(10, 0), (18, Hypercall::Yield as u64)] {
            let mut c = fake(reason);
            c.len = 0;
            c.cpuid = u32::MAX / 2;
            let mut regs = GuestRegs { rax, rcx: 7, ..Default::default() };
            let before = regs;
            assert!(!ans(&mut c, &mut regs, &mut fx));
            assert_eq!((regs, c.rip, c.blocking_writes), (before, 0x10_0000, 0));
            assert_eq!((fx.answered(40, 0), p.telemetry.entries), ((0, 0), 0));
        }
        // Mail or a kick waiting, for a CPUID and a `yield`.
        for (mail, kicked) in [(&MAIL, &QUIET), (&QUIET, &KICKED)] {
            let mut fx = armed(&mut p, mail, kicked);
            for (reason, rax) in [(10, 0), (18, Hypercall::Yield as u64)] {
                let mut regs = GuestRegs { rax, ..Default::default() };
                declined(&mut fake(reason), &mut regs, &mut fx, &p);
            }
        }
    }

    /// The fast path against the run loop's handlers (`exits`), on `exits`' fake vCPU.
    mod against_the_run_loop {
        use super::*;
        use crate::exits::tests::{ctx, exit, FakeVcpu, Lines};
        use crate::exits::{handle, Action, Field, Vcpu as _};

        /// `fastexit::Cpu` over the fake vCPU: the fast path sees the same VMCS fields, TSC and
        /// host CPUID as the run loop's handler.
        struct FastCpu<'a> {
            v: &'a mut FakeVcpu,
            len: u64,
        }
        impl crate::fastexit::Cpu for FastCpu<'_> {
            fn is_hypercall(&self, code: u64) -> bool {
                code == 18
            }
            fn is_cpuid(&self, code: u64) -> bool {
                code == 10
            }
            fn read(&mut self, f: crate::fastexit::Field) -> u64 {
                use crate::fastexit::Field as F;
                match f {
                    F::SsAccessRights => self.v.get(Field::SsAccessRights),
                    F::Rflags => self.v.get(Field::Rflags),
                    F::Rip => self.v.get(Field::Rip),
                    F::Interruptibility => self.v.get(Field::Interruptibility),
                    F::Timer => 0,
                    F::Rax => self.v.regs.rax,
                    F::Rbx => self.v.regs.rbx,
                    F::Rcx => self.v.regs.rcx,
                    F::Rdx => self.v.regs.rdx,
                }
            }
            fn write(&mut self, f: crate::fastexit::Field, x: u64) {
                use crate::fastexit::Field as F;
                match f {
                    F::Rip => self.v.write(Field::Rip, x),
                    F::Interruptibility => self.v.write(Field::Interruptibility, x),
                    F::Rax => self.v.regs.rax = x,
                    F::Rbx => self.v.regs.rbx = x,
                    F::Rcx => self.v.regs.rcx = x,
                    F::Rdx => self.v.regs.rdx = x,
                    _ => {}
                }
            }
            fn rip_after(&mut self) -> Option<u64> {
                Some(self.v.get(Field::Rip) + self.len)
            }
            fn rdtsc(&mut self) -> u64 {
                self.v.tsc += 1;
                self.v.tsc
            }
            fn cpuid(&mut self, leaf: u32, sub: u32) -> [u32; 4] {
                self.v.host_cpuid(leaf, sub)
            }
        }

        /// Hostile sweep: every hypercall number (valid, invalid, with high bits), every CPL,
        /// with and without STI/MOV-SS/NMI blocking, CPUID leaves; whatever the fast path
        /// answers, the run loop's handler must answer the same way (registers, RIP, blocking,
        /// no event injected), and after the fold the counters must agree (exit_count included).
        #[test]
        fn the_fast_path_answers_exactly_as_the_run_loop_would() {
            use core::sync::atomic::AtomicU64;
            static ZERO: AtomicU64 = AtomicU64::new(0);
            let page: &'static mut vmcall_proto::guest::StatusPage =
                // SAFETY: plain u64s, all-zero is valid.
                Box::leak(Box::new(unsafe { core::mem::zeroed() }));
            let calls = (0..17u64).chain([99, 1 << 32 | 3, 1 << 32 | 7, u64::MAX]);
            let mut answered = 0;
            for reason in [10u16, 18] {
                for rax in calls.clone() {
                    for ss_ar in [0x93u64, 0xb3, 0xd3, 0xf3] {
                        for blocking in [0u64, 1, 2, 8, 9] {
                            let (mut slow_ctx, mut slow) = (ctx(), FakeVcpu::new());
                            let (mut fast_ctx, mut fast) = (ctx(), FakeVcpu::new());
                            // Some history: exits the run loop counted before this entry.
                            for c in [&mut slow_ctx, &mut fast_ctx] {
                                c.counters.exits_total = 41;
                                c.counters.exits[10] = 7;
                                c.counters.exits[18] = 30;
                                c.counters.hypercalls = 29;
                            }
                            for v in [&mut slow, &mut fast] {
                                v.regs =
                                    GuestRegs { rax, rbx: 5, rcx: 1, rdx: 2, ..Default::default() };
                                v.write(Field::SsAccessRights, ss_ar);
                                v.write(Field::Interruptibility, blocking);
                                v.cpuid = [0x806f8, 0x0004_0800, 0xffff_ffff, 0xffff_ffff];
                            }
                            // The run loop's entry publishes its hypercall count.
                            page.telemetry.hypercalls = u64::from(fast_ctx.counters.hypercalls);
                            let mut fx = crate::fastexit::FastExit::new(
                                fast_ctx.core,
                                &ZERO,
                                &ZERO,
                                &mut page.telemetry,
                            );
                            fx.until = u64::MAX;
                            fx.answer_until = u64::MAX;
                            fx.mwait = fast_ctx.mwait;
                            fx.info = fast_ctx.info();
                            fx.tsc_per_ms = fast_ctx.tsc_per_ms;
                            fx.base(fast_ctx.counters.exits_total);
                            let len = if reason == 10 { 2 } else { 3 };
                            let ok = crate::fastexit::answer(
                                &mut FastCpu { v: &mut fast, len },
                                &mut fx,
                                u64::from(reason),
                            );
                            if !ok {
                                continue;
                            }
                            answered += 1;
                            let c = &fast_ctx.counters;
                            let (h, c) = fx.answered(c.exits_total, c.hypercalls);
                            fast_ctx.fold_fast((18, h), (10, c));
                            assert_eq!(
                                handle(
                                    &mut slow_ctx,
                                    &mut slow,
                                    &exit(reason, len),
                                    &mut Lines::default()
                                ),
                                Action::Resume
                            );
                            let case = format!(
                                "reason {reason} rax {rax:#x} ss {ss_ar:#x} blk {blocking}"
                            );
                            assert!(slow.injected.is_empty(), "{case}: the run loop injects");
                            assert_eq!(fast.regs, slow.regs, "{case}: registers");
                            for f in [Field::Rip, Field::Interruptibility] {
                                assert_eq!(fast.get(f), slow.get(f), "{case}: {f:?}");
                            }
                            assert_eq!(
                                fast_ctx.counters.exits_total, slow_ctx.counters.exits_total,
                                "{case}"
                            );
                            assert_eq!(fast_ctx.counters.exits, slow_ctx.counters.exits, "{case}");
                            assert_eq!(
                                fast_ctx.counters.hypercalls, slow_ctx.counters.hypercalls,
                                "{case}"
                            );
                        }
                    }
                }
            }
            // CPUID from any CPL (20 blocking/CPL combinations x 21 "leaves"), the four
            // answering hypercalls from CPL 0 (5 blocking values).
            assert_eq!(answered, 21 * 20 + 4 * 5);
        }
    }
}
