// SPDX-License-Identifier: MIT OR Apache-2.0
//! The hostile-guest suite: attacks on the hypervisor from CPL 0, each with the outcome the
//! hypervisor's policy defines (`hypervisor/src/exits.rs`), in one table ([`ATTACKS`]).
//!
//! Workload `attack`, argument `which`:
//! * `which=all` (the default) runs every [`Kind::Batch`] attack in table order: those the
//!   attacker survives (an exception delivered to it, an error code, or nothing visible).
//!   Exceptions are caught by [`crate::arch::probe!`], so one guest runs them all.
//! * `which=NAME` runs the one attack `NAME`: how [`Kind::Own`] attacks run, those that
//!   stop the guest (or may, until the hypervisor handles them), each in its own guest.
//! * `which=fence` is not an attack: the accomplice that gives the attacker a read-only
//!   copy of its grant over their channel `loot` (for the rights attacks), then waits for
//!   the attacker to finish.
//!
//! Each attack prints one line, `attack NAME: OUTCOME as expected` or
//! `attack NAME: UNEXPECTED: got ..., expected ...`; a `Stopped` attack first prints
//! `attack NAME: expecting to be stopped: ...` and, should it come back,
//! `attack NAME: UNEXPECTED: survived ...`. The run ends with
//! `attacks done: N run, M as expected`; the exit status is 0 only if M == N.
//!
//! Adding an attack: one entry in [`ATTACKS`] (name, expected outcome, kind, a function
//! from [`Env`] to what it [`Seen`]) before `hc-storm`, its name in the README's list, and
//! its outcome line in `BATCH` in `tests/hostile.rs` (an `Own` attack instead needs a guest
//! in a `configs/hostile/*.toml` and a check of its fault text). Capability attacks find
//! the attacker's grant mapped at [`OWN_MAP`], a read-only copy of the fence's grant and
//! the endpoint it came through in [`Env`] (`need_loot`, `loot_call`).

use crate::arch::probe;
use crate::hypercall::{call, call3, first_endpoint};
use vmcall_proto::guest::BootInfo;
use vmcall_proto::hypercall::{HvError, Hypercall, GRANT_WINDOW};

/// What an attack saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// An exception was delivered to the attacker (vector).
    Fault(u8),
    /// The attack completed (a hypercall's non-negative result, or the instruction worked).
    Value(u64),
    /// A hypercall returned this error.
    Error(HvError),
    /// A hypercall returned a negative value that is no error code.
    BadCode(i64),
    /// The attack could not be set up.
    NoSetup(&'static str),
}

/// The outcome the hypervisor's policy defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Fault(u8),
    Error(HvError),
    /// Completes without an exception (any result).
    Completes,
    /// The hypervisor stops the attacker: coming back at all is wrong.
    Stopped,
}

/// Whether an attack runs in the `which=all` sequence or needs a guest of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Batch,
    Own,
}

pub struct Attack {
    pub name: &'static str,
    pub expect: Expect,
    pub kind: Kind,
    pub run: fn(&mut Env<'_>) -> Seen,
}

const GP: Expect = Expect::Fault(13);
const UD: Expect = Expect::Fault(6);
const fn err(e: HvError) -> Expect {
    Expect::Error(e)
}
const fn batch(name: &'static str, expect: Expect, run: fn(&mut Env<'_>) -> Seen) -> Attack {
    Attack { name, expect, kind: Kind::Batch, run }
}
const fn own(name: &'static str, expect: Expect, run: fn(&mut Env<'_>) -> Seen) -> Attack {
    Attack { name, expect, kind: Kind::Own, run }
}

/// What the attacks may use: the boot info, the channel `loot` and the read-only copy
/// received on it, the attacker's own grant (slot 0) mapped read-write at the grant window.
pub struct Env<'a> {
    pub bi: &'a BootInfo,
    loot: Option<crate::channel::Chan>,
    /// The slot of the read-only copy the fence gave us.
    loot_slot: Option<u64>,
    /// Our endpoint slot for channel `loot`.
    loot_ep: Option<u64>,
    rng: u64,
}

const READY: u64 = 0x4ead;
const DONE: u64 = 0xd04e;
const R: u64 = 1;
const RW: u64 = 3;
/// Where the attacker maps its own grant (slot 0), read-write.
const OWN_MAP: u64 = GRANT_WINDOW.0;
/// A free, aligned address in the grant window (the grants are 2 MiB).
const FREE_MAP: u64 = GRANT_WINDOW.0 + (8 << 20);

impl<'a> Env<'a> {
    fn new(bi: &'a BootInfo) -> Self {
        Env { bi, loot: None, loot_slot: None, loot_ep: None, rng: 0x9e37_79b9_7f4a_7c15 }
    }

    /// Receives the fence's read-only copy (if there is a `loot` channel) and maps our own
    /// grant, for the capability attacks.
    fn setup(&mut self) {
        log::info!("attack setup: CR0 reads {:#x}, CR4 reads {:#x}", read_cr0(), read_cr4());
        if call(Hypercall::CapIdentify, 0, 0).is_ok_and(|i| i & 0xff == 1) {
            let m = call3(Hypercall::CapMap, 0, OWN_MAP, RW);
            log::info!("attack setup: my grant (slot 0) mapped read-write at {OWN_MAP:#x}: {m:?}");
        }
        let Some(mut c) = crate::channel::open(self.bi, Some("loot")) else { return };
        self.loot_ep = first_endpoint().map(|e| e + c.number as u64);
        if let Some(ep) = self.loot_ep {
            // Transfers need the receiver's consent once cap_accept exists; until then
            // the call is unknown and transfers need none.
            let a = call(Hypercall::CapAccept, ep, 4);
            log::info!("attack setup: cap_accept on the loot endpoint: {a:?}");
        }
        let _ = c.send(&[READY, 0, 0, 0, 0, 0, 0]);
        match c.recv() {
            Ok(m) if m[0] == READY => {
                self.loot_slot = Some(m[1]);
                log::info!("attack setup: the fence gave me a read-only copy in slot {}", m[1]);
            }
            other => log::error!("attack setup: no copy from the fence: {other:?}"),
        }
        self.loot = Some(c);
    }

    fn finish(&mut self) {
        if let Some(c) = self.loot.as_mut() {
            let _ = c.send(&[DONE, 0, 0, 0, 0, 0, 0]);
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// The workload `attack`.
pub fn attack(bi: &BootInfo) -> u64 {
    let which = bi.arg_word("which");
    if which == "fence" {
        return fence(bi);
    }
    let mut env = Env::new(bi);
    if which == "all" {
        env.setup();
    }
    let (mut run, mut good) = (0u64, 0u64);
    let chosen =
        ATTACKS
            .iter()
            .filter(|a| if which == "all" { a.kind == Kind::Batch } else { a.name == which });
    for a in chosen {
        run += 1;
        good += one(a, &mut env) as u64;
    }
    env.finish();
    if run == 0 {
        log::error!("attack: no attack called {which:?}");
        return 1;
    }
    log::info!("attacks done: {run} run, {good} as expected");
    if good == run {
        0
    } else {
        1
    }
}

fn describe(s: Seen) -> impl core::fmt::Display {
    struct D(Seen);
    impl core::fmt::Display for D {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self.0 {
                Seen::Fault(1) => f.write_str("#DB"),
                Seen::Fault(6) => f.write_str("#UD"),
                Seen::Fault(13) => f.write_str("#GP"),
                Seen::Fault(14) => f.write_str("#PF"),
                Seen::Fault(v) => write!(f, "exception {v}"),
                Seen::Value(v) => write!(f, "completed ({v:#x})"),
                Seen::Error(e) => write!(f, "{e:?}"),
                Seen::BadCode(c) => write!(f, "unknown error code {c}"),
                Seen::NoSetup(why) => write!(f, "no setup: {why}"),
            }
        }
    }
    D(s)
}

fn expected(e: Expect) -> impl core::fmt::Display {
    struct D(Expect);
    impl core::fmt::Display for D {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self.0 {
                Expect::Fault(v) => describe(Seen::Fault(v)).fmt(f),
                Expect::Error(e) => write!(f, "{e:?}"),
                Expect::Completes => f.write_str("completed"),
                Expect::Stopped => f.write_str("stopped by the hypervisor"),
            }
        }
    }
    D(e)
}

/// Runs one attack and prints its outcome line; whether it was the expected one.
fn one(a: &Attack, env: &mut Env<'_>) -> bool {
    if a.expect == Expect::Stopped {
        log::info!("attack {}: expecting to be stopped by the hypervisor", a.name);
    }
    let seen = (a.run)(env);
    let ok = match (a.expect, seen) {
        (Expect::Fault(v), Seen::Fault(w)) => v == w,
        (Expect::Error(e), Seen::Error(f)) => e == f,
        (Expect::Completes, Seen::Value(_)) => true,
        _ => false,
    };
    if ok {
        log::info!("attack {}: {} as expected", a.name, expected(a.expect));
    } else if a.expect == Expect::Stopped {
        log::error!("attack {}: UNEXPECTED: survived ({})", a.name, describe(seen));
    } else {
        log::error!(
            "attack {}: UNEXPECTED: got {}, expected {}",
            a.name,
            describe(seen),
            expected(a.expect)
        );
    }
    ok
}

fn seen(f: Option<(u8, u64)>, value: u64) -> Seen {
    match f {
        Some((v, _)) => Seen::Fault(v),
        None => Seen::Value(value),
    }
}

fn hc(nr: u64, a: u64, b: u64, c: u64) -> Seen {
    let ret: u64;
    // VMCALL (VMMCALL on AMD, as the runtime picked it) traps to the hypervisor, which
    // validates every argument and changes only RAX.
    // SAFETY: as above; an exception it injects instead is caught by the probe.
    let f = unsafe {
        if crate::hypercall::uses_vmmcall() {
            probe!("vmmcall", inout("rax") nr => ret, in("rdi") a, in("rsi") b, in("rdx") c, in("r10") 0u64)
        } else {
            probe!("vmcall", inout("rax") nr => ret, in("rdi") a, in("rsi") b, in("rdx") c, in("r10") 0u64)
        }
    };
    if let Some((v, _)) = f {
        return Seen::Fault(v);
    }
    match HvError::from_rax(ret) {
        Ok(v) => Seen::Value(v),
        Err(Ok(e)) => Seen::Error(e),
        Err(Err(code)) => Seen::BadCode(code),
    }
}

fn rdmsr(msr: u32) -> Seen {
    let (lo, hi): (u32, u32);
    // SAFETY: RDMSR only reads; a refused MSR raises #GP, which the probe catches.
    let f = unsafe { probe!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi) };
    seen(f, (hi as u64) << 32 | lo as u64)
}

fn wrmsr(msr: u32, v: u64) -> Seen {
    // The hypervisor intercepts every MSR write outside its pass-through list and must
    // refuse these with #GP; were it to let one through, that is the hole this suite finds.
    let (lo, hi) = (v as u32, (v >> 32) as u32);
    // SAFETY: as above; the #GP is caught by the probe.
    let f = unsafe { probe!("wrmsr", in("ecx") msr, in("eax") lo, in("edx") hi) };
    seen(f, 0)
}

fn efer() -> u64 {
    match rdmsr(0xc000_0080) {
        Seen::Value(v) => v,
        _ => 0,
    }
}

fn out8(port: u16, v: u8) -> Seen {
    // SAFETY: every port but 0xE9/0x80 writes is intercepted and must raise #GP.
    let f = unsafe { probe!("out dx, al", in("dx") port, in("al") v) };
    seen(f, 0)
}

fn out16(port: u16, v: u16) -> Seen {
    // SAFETY: as for `out8`.
    let f = unsafe { probe!("out dx, ax", in("dx") port, in("ax") v) };
    seen(f, 0)
}

fn out32(port: u16, v: u32) -> Seen {
    // SAFETY: as for `out8`.
    let f = unsafe { probe!("out dx, eax", in("dx") port, in("eax") v) };
    seen(f, 0)
}

fn in8(port: u16) -> Seen {
    let v: u8;
    // SAFETY: every port read is intercepted and must raise #GP.
    let f = unsafe { probe!("in al, dx", in("dx") port, out("al") v) };
    seen(f, v as u64)
}

fn in32(port: u16) -> Seen {
    let v: u32;
    // SAFETY: as for `in8`.
    let f = unsafe { probe!("in eax, dx", in("dx") port, out("eax") v) };
    seen(f, v as u64)
}

fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 (the hypervisor's read shadow) has no side effect.
    unsafe { core::arch::asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 (the read shadow) has no side effect.
    unsafe { core::arch::asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) };
    v
}

fn write_cr0(v: u64) -> Seen {
    // The values written differ from the current CR0 only in PE, PG, NE, CD or NW.
    // SAFETY: the hypervisor owns those bits and must refuse the change with #GP (probed).
    let f = unsafe { probe!("mov cr0, {v}", v = in(reg) v) };
    seen(f, 0)
}

fn write_cr4(v: u64) -> Seen {
    // SAFETY: as for `write_cr0`, for PAE and VMXE.
    let f = unsafe { probe!("mov cr4, {v}", v = in(reg) v) };
    seen(f, 0)
}

const CR0_PE: u64 = 1;
const CR0_NE: u64 = 1 << 5;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;

/// Sets CR4.OSXSAVE (allowed: not a bit the hypervisor owns) so that XSETBV reaches it.
fn osxsave() -> Result<(), Seen> {
    match write_cr4(read_cr4() | 1 << 18) {
        Seen::Value(_) => Ok(()),
        s => Err(s),
    }
}

fn xsetbv(xcr: u32, v: u64) -> Seen {
    if let Err(s) = osxsave() {
        return s;
    }
    let (lo, hi) = (v as u32, (v >> 32) as u32);
    // SAFETY: XSETBV always exits; the hypervisor allows only XCR0 = 1, else #GP (probed).
    let f = unsafe { probe!("xsetbv", in("ecx") xcr, in("eax") lo, in("edx") hi) };
    seen(f, 0)
}

/// A 16-byte memory operand for the VMX instructions (never valid for them).
static VMX_OPERAND: [u64; 2] = [0x1000, 0];

/// Runs one VMX (or other always-intercepted) instruction; it must raise #UD.
macro_rules! vmx_insn {
    ($($t:tt)*) => {{
        // VMX instructions exit in VMX non-root operation; operands point at a harmless static.
        // SAFETY: the hypervisor injects #UD, which the probe catches.
        let f = unsafe { probe!($($t)*) };
        seen(f, 0)
    }};
}

/// A page-aligned page for the SVM instructions' rAX operand (a VMCB or SLB address, were
/// they to run): nothing else uses it.
#[repr(C, align(4096))]
struct SvmOperand([u8; 4096]);
static SVM_OPERAND: SvmOperand = SvmOperand([0; 4096]);

/// Runs one SVM instruction (its bytes) with rAX at [`SVM_OPERAND`] and ECX 0 (INVLPGA's
/// ASID); it must raise #UD.
macro_rules! svm_insn {
    ($bytes:literal) => {{
        // #UD on VT-x (no such instruction) and on SVM (intercepted, #UD injected), which
        // the probe catches.
        // SAFETY: never executed for real (the probe catches its #UD).
        let f = unsafe {
            probe!($bytes, inout("rax") SVM_OPERAND.0.as_ptr() as u64 => _, inout("ecx") 0u32 => _)
        };
        seen(f, 0)
    }};
}

fn console(bytes: &[u8]) -> Seen {
    hc(Hypercall::ConsoleWrite as u64, bytes.as_ptr() as u64, bytes.len() as u64, 0)
}

fn e9_text(bytes: &[u8]) -> Seen {
    for &b in bytes {
        if let s @ Seen::Fault(_) = out8(0xe9, b) {
            return s;
        }
    }
    Seen::Value(bytes.len() as u64)
}

fn need_loot(env: &Env<'_>) -> Result<(u64, u64), Seen> {
    match (env.loot_slot, env.loot_ep) {
        (Some(s), Some(e)) => Ok((s, e)),
        _ => Err(Seen::NoSetup("no read-only copy from a fence")),
    }
}

fn loot_call(env: &Env<'_>, f: impl FnOnce(u64, u64) -> Seen) -> Seen {
    match need_loot(env) {
        Ok((s, e)) => f(s, e),
        Err(s) => s,
    }
}

const CONSOLE: u64 = Hypercall::ConsoleWrite as u64;
const TIMER: u64 = Hypercall::TimerOneshot as u64;
const DOORBELL: u64 = Hypercall::Doorbell as u64;
const IDENTIFY: u64 = Hypercall::CapIdentify as u64;
const CONTROL: u64 = Hypercall::GuestControl as u64;
const SPLIT: u64 = Hypercall::CapSplit as u64;
const MAP: u64 = Hypercall::CapMap as u64;
const UNMAP: u64 = Hypercall::CapUnmap as u64;
const TRANSFER: u64 = Hypercall::CapTransfer as u64;
const REVOKE: u64 = Hypercall::CapRevoke as u64;

/// Every hypercall number but exit, with random arguments: only results or error codes,
/// never an exception, never a stop.
fn storm(env: &mut Env<'_>) -> Seen {
    const CALLS: u64 = 2000;
    let (mut errors, mut results) = (0u64, 0u64);
    for _ in 0..CALLS {
        let r = env.next();
        let mut nr = if r.is_multiple_of(8) { env.next() } else { r % 17 };
        if nr == Hypercall::Exit as u64 {
            nr = 15;
        }
        let arg = |env: &mut Env<'_>| {
            let x = env.next();
            if x & 1 == 0 {
                x >> 58 // a small number: a plausible slot, channel or vector
            } else {
                env.next()
            }
        };
        let (mut a, b, c) = (arg(env), arg(env), arg(env));
        if nr == CONSOLE {
            a |= 1 << 40; // never print our own memory (it holds this suite's strings)
        }
        match hc(nr, a, b, c) {
            Seen::Value(_) => results += 1,
            Seen::Error(_) => errors += 1,
            s => {
                log::error!("attack hc-storm: call {nr} ({a:#x}, {b:#x}, {c:#x}): {}", describe(s));
                return s;
            }
        }
    }
    let _ = call(Hypercall::TimerOneshot, 0, 32); // cancel whatever the storm armed
    log::info!("attack hc-storm: {CALLS} calls: {results} results, {errors} error codes");
    Seen::Value(CALLS)
}

/// VMCALL from ring 3: the hypervisor must answer #GP instead of serving the call. If it
/// served it, the UD2 after it raises #UD (the probe reports either).
fn vmcall_from_ring3() -> Seen {
    // SAFETY: after init, on our one vCPU, interrupts off, no page-table/GDT reference alive.
    let Some(user_stack) = (unsafe { crate::arch::user_mode_setup() }) else {
        return Seen::NoSetup("the kernel image is not in the first 2 MiB");
    };
    // IRETQ to ring 3 at the VMCALL (VMMCALL on AMD) below (user-accessible, as is the
    // stack).
    // SAFETY: the #GP it raises returns to ring 0 through the TSS and the probe's landing.
    let f = unsafe {
        if crate::hypercall::uses_vmmcall() {
            probe!(
                // One template string: `probe!` takes a single one when operands follow.
                "push {ss}\n push {usp}\n push 0x2\n push {cs}\n lea {t}, [rip + 3f]\n push {t}
                 iretq
                 3: mov eax, 1\n vmmcall\n ud2",
                ss = in(reg) crate::arch::USER_SS,
                usp = in(reg) user_stack,
                cs = in(reg) crate::arch::USER_CS,
                t = out(reg) _,
                out("rax") _,
            )
        } else {
            probe!(
                "push {ss}\n push {usp}\n push 0x2\n push {cs}\n lea {t}, [rip + 3f]\n push {t}
                 iretq
                 3: mov eax, 1\n vmcall\n ud2",
                ss = in(reg) crate::arch::USER_SS,
                usp = in(reg) user_stack,
                cs = in(reg) crate::arch::USER_CS,
                t = out(reg) _,
                out("rax") _,
            )
        }
    };
    seen(f, 0)
}

/// A VMCALL single-stepped (TF set by POPF, so the trap is due right after the VMCALL): the
/// hypervisor emulates the instruction, and must leave its single-step trap pending, as the
/// processor would have raised it. If the trap were lost, the UD2 after the VMCALL would
/// raise #UD instead (the probe reports either; its landing clears TF). Bochs 2.7 keeps the
/// trap across the exit on its own (it saves BS in the pending debug exceptions at the
/// VMCALL exit), so in Bochs this passes with or without the hypervisor's BS; it pins that
/// the guest gets exactly the #DB and that VM entry accepts BS (host tests pin the rest).
fn single_step_vmcall() -> Seen {
    // SAFETY: our own RFLAGS and a `yield`; the #DB returns through the probe's landing.
    let f = unsafe {
        if crate::hypercall::uses_vmmcall() {
            probe!(
                "pushfq\n or qword ptr [rsp], 0x100\n popfq\n vmmcall\n ud2",
                inout("rax") Hypercall::Yield as u64 => _,
            )
        } else {
            probe!(
                "pushfq\n or qword ptr [rsp], 0x100\n popfq\n vmcall\n ud2",
                inout("rax") Hypercall::Yield as u64 => _,
            )
        }
    };
    seen(f, 0)
}

// ---- Attacks that stop the attacker (each in its own guest) ----

fn read_at(gpa: u64) -> Seen {
    log::info!("attack: reading guest-physical {gpa:#x}");
    // SAFETY: our page tables map `gpa`; EPT must not, so the hypervisor stops us here.
    let v = unsafe { core::ptr::read_volatile(gpa as *const u64) };
    Seen::Value(v)
}

fn write_at(gpa: u64, v: u32) -> Seen {
    log::info!("attack: writing guest-physical {gpa:#x}");
    // SAFETY: as for `read_at`.
    unsafe { core::ptr::write_volatile(gpa as *mut u32, v) };
    Seen::Value(0)
}

fn exec_at(gpa: u64) -> Seen {
    log::info!("attack: calling guest-physical {gpa:#x}");
    // Our page tables map `gpa` executable; EPT must refuse the fetch and stop us.
    // SAFETY: were it to run, it is a function (a RET is written there before the call).
    unsafe { core::arch::asm!("call {a}", a = in(reg) gpa, clobber_abi("C")) };
    Seen::Value(0)
}

fn map_high(gpa: u64) -> Result<(), Seen> {
    // SAFETY: after init, on our one vCPU; no page-table reference is alive.
    if unsafe { crate::arch::map_identity_2m(gpa) } {
        Ok(())
    } else {
        Err(Seen::NoSetup("no spare page tables"))
    }
}

fn phys_bits() -> u32 {
    let r = core::arch::x86_64::__cpuid(0x8000_0008);
    (r.eax & 0xff).clamp(36, 47)
}

fn triple_fault() -> Seen {
    let empty: [u16; 5] = [0; 5];
    log::info!("attack: loading an empty IDT, then raising #UD");
    // Deliberately unrecoverable: with no IDT, #UD becomes #DF becomes a triple fault.
    // SAFETY: the hypervisor must turn it into a stop; nothing after it runs.
    unsafe {
        core::arch::asm!("lidt [{p}]", "ud2", "2: jmp 2b", p = in(reg) empty.as_ptr(), options(noreturn))
    }
}

fn halt(timer: bool) -> Seen {
    if timer {
        let t = call(Hypercall::TimerOneshot, 1000, crate::arch::TIMER_VECTOR as u64);
        log::info!("attack: armed a timer ({t:?}); halting with interrupts off");
    } else {
        log::info!("attack: halting with interrupts off and no timer");
    }
    // CLI; HLT with nothing to wake us: the hypervisor must stop us (it would never wake).
    // SAFETY: touches no memory; were it to resume us, we carry on.
    unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    Seen::Value(0)
}

fn spin_forever() -> Seen {
    log::info!("attack: spinning forever with interrupts off");
    loop {
        core::hint::spin_loop();
    }
}

/// A line nobody writes, for `mwait-forever` to monitor.
static QUIET_LINE: [u64; 8] = [0; 8];

/// With exitless MWAIT (`mwait = true`): interrupts off, MONITOR on a line nobody writes,
/// MWAIT without interrupts as break events: nothing but an NMI or the VMX-preemption timer
/// ends it. The hypervisor must still stop it at its run budget.
fn mwait_forever() -> Seen {
    if !crate::arch::has_monitor() {
        log::info!("attack: MONITOR/MWAIT not offered (mwait = true?)");
        return Seen::Value(1);
    }
    log::info!("attack: MWAIT forever with interrupts off on a line nobody writes");
    loop {
        // CLI; MWAIT with ECX = 0: interrupts do not end it. Were it to return, we wait again.
        // SAFETY: MONITOR is offered; the line is our own static, mapped.
        unsafe {
            crate::arch::monitor(QUIET_LINE.as_ptr() as *const u8);
            core::arch::asm!("cli", "mwait", in("eax") 0, in("ecx") 0, options(nomem, nostack));
        }
    }
}

fn lapic_init() -> Seen {
    log::info!("attack: INIT to all other cores through the xAPIC ICR at 0xfee00300");
    // SAFETY: the local APIC's MMIO is not mapped for us in EPT: the first write stops us.
    unsafe {
        core::ptr::write_volatile(0xfee0_0310 as *mut u32, 0);
        core::ptr::write_volatile(0xfee0_0300 as *mut u32, 0x000c_4500);
    }
    Seen::Value(0)
}

fn rep_stos_across_end(bi: &BootInfo) -> Seen {
    let start = bi.memory_bytes - 16;
    log::info!("attack: rep stosb of 64 bytes from {start:#x}, across the end of my memory");
    // The first 16 bytes are ours and unused; the rest is past the partition.
    // SAFETY: EPT does not map the rest: the hypervisor stops us at its first byte.
    unsafe {
        core::arch::asm!("rep stosb", inout("rdi") start => _, inout("rcx") 64u64 => _, in("al") 0xa5u8, options(nostack))
    };
    Seen::Value(0)
}

fn foreign_channel(bi: &BootInfo) -> Seen {
    let k = bi.arg_int("window") as u32;
    if bi.channels().iter().any(|d| d.index == k) {
        return Seen::NoSetup("that channel is mine");
    }
    read_at(vmcall_proto::guest::channel_window(k))
}

fn write_readonly_cap() -> Seen {
    let m = call3(Hypercall::CapMap, 0, GRANT_WINDOW.0, R);
    log::info!("attack: mapped my grant read-only at {:#x}: {m:?}", GRANT_WINDOW.0);
    if m != Ok(0) {
        return Seen::NoSetup("could not map my grant read-only");
    }
    write_at(GRANT_WINDOW.0, 0xbad)
}

fn exec_channel(bi: &BootInfo) -> Seen {
    let Some(d) = bi.channels().first() else { return Seen::NoSetup("no channel") };
    // The payload of slot 0 of our own sending ring: the peer never reads it (no control
    // word says it was sent).
    let at = d.tx_gpa + vmcall_proto::channel::HEADER_BYTES as u64 + 8;
    // SAFETY: our own ring, mapped read-write for us; writing a RET (0xC3) there.
    unsafe { core::ptr::write_volatile(at as *mut u8, 0xc3) };
    exec_at(at)
}

fn doorbell_flood(env: &mut Env<'_>) -> Seen {
    let bi = env.bi;
    let Some(mut c) = crate::channel::open(bi, None) else { return Seen::NoSetup("no channel") };
    let (n, rings) = (bi.arg_int("n"), bi.arg_int("rings"));
    log::info!("attack: {n} messages to my peer, each followed by {rings} doorbells");
    let mut rung = 0;
    for i in 0..n {
        if c.send(&super::netloads::message(i, 0)).is_err() {
            return Seen::NoSetup("channel broken");
        }
        for _ in 0..rings {
            match hc(DOORBELL, c.number as u64, 0, 0) {
                Seen::Value(_) => rung += 1,
                s => return s,
            }
        }
    }
    log::info!("attack doorbell-flood: rang {rung} doorbells");
    Seen::Value(rung)
}

/// The accomplice: gives the attacker on channel `loot` a read-only copy of our grant.
fn fence(bi: &BootInfo) -> u64 {
    let Some(mut c) = crate::channel::open(bi, Some("loot")) else { return 1 };
    let Some(ep) = first_endpoint().map(|e| e + c.number as u64) else { return 1 };
    let _ = call(Hypercall::CapAccept, ep, 0);
    if !matches!(c.recv(), Ok(m) if m[0] == READY) {
        log::error!("fence: no ready message from the attacker");
        return 1;
    }
    let copy = call3(Hypercall::CapTransfer, 0, ep, 1 | R << 8);
    log::info!("fence: copied my grant read-only to the attacker: {copy:?}");
    let Ok(slot) = copy else { return 1 };
    let _ = c.send(&[READY, slot, 0, 0, 0, 0, 0]);
    match c.recv() {
        Ok(m) if m[0] == DONE => {
            log::info!("fence: the attacker is done");
            0
        }
        other => {
            log::error!("fence: expected the attacker's done message, got {other:?}");
            1
        }
    }
}

/// The attacks, in the order `which=all` runs the batch ones. Names are unique (checked by
/// a host test).
pub static ATTACKS: &[Attack] = &[
    // MSRs outside the allow-list: #GP on read and write.
    batch("msr-apic-base-read", GP, |_| rdmsr(0x1b)),
    batch("msr-apic-base-write", GP, |_| wrmsr(0x1b, 0)),
    batch("msr-feature-control-read", GP, |_| rdmsr(0x3a)),
    batch("msr-feature-control-write", GP, |_| wrmsr(0x3a, 0x1)),
    batch("msr-vmx-basic-read", GP, |_| rdmsr(0x480)),
    batch("msr-vmx-ept-vpid-cap-read", GP, |_| rdmsr(0x48c)),
    batch("msr-vmx-true-procbased-read", GP, |_| rdmsr(0x48e)),
    batch("msr-vmx-basic-write", GP, |_| wrmsr(0x480, 0)),
    batch("msr-sysenter-cs-read", GP, |_| rdmsr(0x174)),
    batch("msr-sysenter-esp-write", GP, |_| wrmsr(0x175, 0x8_0000)),
    batch("msr-sysenter-eip-write", GP, |_| wrmsr(0x176, 0x10_0000)),
    batch("msr-mtrr-cap-read", GP, |_| rdmsr(0xfe)),
    batch("msr-mtrr-def-type-write", GP, |_| wrmsr(0x2ff, 0)),
    batch("msr-mtrr-physbase0-write", GP, |_| wrmsr(0x200, 6)),
    batch("msr-misc-enable-read", GP, |_| rdmsr(0x1a0)),
    batch("msr-debugctl-write", GP, |_| wrmsr(0x1d9, 1)),
    batch("msr-smm-monitor-ctl-write", GP, |_| wrmsr(0x9b, 1)),
    batch("msr-tsc-write", GP, |_| wrmsr(0x10, 0)),
    batch("msr-tsc-adjust-write", GP, |_| wrmsr(0x3b, 1 << 40)),
    batch("msr-x2apic-id-read", GP, |_| rdmsr(0x802)),
    batch("msr-x2apic-tpr-write", GP, |_| wrmsr(0x808, 0xff)),
    batch("msr-x2apic-icr-init", GP, |_| wrmsr(0x830, 0x000c_4500)),
    batch("msr-x2apic-icr-sipi", GP, |_| wrmsr(0x830, 0x000c_4608)),
    batch("msr-x2apic-icr-nmi", GP, |_| wrmsr(0x830, 0x000c_4400)),
    batch("msr-x2apic-self-ipi", GP, |_| wrmsr(0x83f, 0xf0)),
    batch("msr-random-read", GP, |_| rdmsr(0xdead_beef)),
    batch("msr-hyperv-guest-os-id-write", GP, |_| wrmsr(0x4000_0000, 1)),
    batch("msr-amd-vm-cr-read", GP, |_| rdmsr(0xc001_0114)),
    batch("msr-x2apic-eoi-read", GP, |_| rdmsr(0x80b)),
    batch("msr-tsc-deadline-write", GP, |_| wrmsr(0x6e0, 1)),
    batch("msr-spec-ctrl-write", GP, |_| wrmsr(0x48, 1)),
    batch("msr-xss-write", GP, |_| wrmsr(0xda0, 1 << 8)),
    // Pass-through MSRs still refuse what the CPU refuses.
    batch("msr-kernel-gs-base-noncanonical", GP, |_| wrmsr(0xc000_0102, 0x0000_8000_0000_0000)),
    batch("msr-lstar-noncanonical", GP, |_| wrmsr(0xc000_0082, 0x0000_8000_0000_0000)),
    batch("msr-efer-clear-lme", GP, |_| wrmsr(0xc000_0080, efer() & !(1 << 8))),
    batch("msr-efer-clear-lma", GP, |_| wrmsr(0xc000_0080, efer() & !(1 << 10))),
    batch("msr-efer-set-svme", GP, |_| wrmsr(0xc000_0080, efer() | 1 << 12)),
    batch("msr-efer-set-reserved", GP, |_| wrmsr(0xc000_0080, efer() | 1 << 20)),
    batch("msr-pat-type-2", GP, |_| wrmsr(0x277, 0x0007_0406_0007_0402)),
    batch("msr-pat-type-3", GP, |_| wrmsr(0x277, 0x0007_0406_0007_0403)),
    batch("msr-pat-type-8", GP, |_| wrmsr(0x277, 0x0007_0406_0807_0406)),
    batch("msr-pat-type-ff", GP, |_| wrmsr(0x277, 0xff07_0406_0007_0406)),
    batch("msr-fs-base-noncanonical", GP, |_| wrmsr(0xc000_0100, 0x0000_8000_0000_0000)),
    batch("msr-gs-base-noncanonical", GP, |_| wrmsr(0xc000_0101, 0xffff_0000_0000_0000)),
    // I/O: only byte writes to 0xE9 and writes to 0x80.
    batch("io-com1-out", GP, |_| out8(0x3f8, b'!')),
    batch("io-com1-in", GP, |_| in8(0x3fd)),
    batch("io-pic-eoi", GP, |_| out8(0x20, 0x20)),
    batch("io-pic-mask", GP, |_| out8(0xa1, 0xff)),
    batch("io-pit-mode", GP, |_| out8(0x43, 0x34)),
    batch("io-pit-read", GP, |_| in8(0x40)),
    batch("io-pci-config-address", GP, |_| out32(0xcf8, 0x8000_0000)),
    batch("io-pci-config-data", GP, |_| in32(0xcfc)),
    batch("io-keyboard-reset", GP, |_| out8(0x64, 0xfe)),
    batch("io-reset-control", GP, |_| out8(0xcf9, 0x06)),
    batch("io-fast-a20-reset", GP, |_| out8(0x92, 0x01)),
    batch("io-apm-smi", GP, |_| out8(0xb2, 0)),
    batch("io-qemu-debug-exit", GP, |_| out8(0xf4, 0)),
    batch("io-bochs-shutdown", GP, |_| {
        // Every byte of "Shutdown" must be refused, not just the first.
        let mut first = Seen::Value(0);
        for (i, &b) in b"Shutdown".iter().enumerate() {
            let s = out8(0x8900, b);
            if i == 0 {
                first = s;
            } else if s != first {
                return s;
            }
        }
        first
    }),
    batch("io-e9-word", GP, |_| out16(0xe9, 0x2121)),
    batch("io-e9-dword", GP, |_| out32(0xe9, 0x2121_2121)),
    batch("io-e9-rep-outsb", GP, |_| {
        let text = *b"!!!!";
        // SAFETY: a string OUT of our own 4 bytes; the hypervisor must refuse it with #GP.
        let f = unsafe {
            probe!("rep outsb", inout("rsi") text.as_ptr() => _, inout("rcx") 4u64 => _, in("dx") 0xe9u16)
        };
        seen(f, 0)
    }),
    batch("io-e9-in", GP, |_| in8(0xe9)),
    batch("io-80-in", GP, |_| in8(0x80)),
    // Control registers: the bits the hypervisor owns.
    batch("cr0-clear-pe", GP, |_| write_cr0(read_cr0() & !CR0_PE)),
    batch("cr0-clear-pg", GP, |_| write_cr0(read_cr0() & !CR0_PG)),
    batch("cr0-clear-ne", GP, |_| write_cr0(read_cr0() & !CR0_NE)),
    batch("cr0-set-cd", GP, |_| write_cr0(read_cr0() | CR0_CD)),
    batch("cr0-set-nw", GP, |_| write_cr0(read_cr0() | CR0_NW)),
    batch("cr0-set-cd-nw", GP, |_| write_cr0(read_cr0() | CR0_CD | CR0_NW)),
    batch("cr0-set-reserved-bit-32", GP, |_| write_cr0(read_cr0() | 1 << 32)),
    batch("cr4-set-reserved-bit-63", GP, |_| write_cr4(read_cr4() | 1 << 63)),
    batch("cr4-set-vmxe", GP, |_| write_cr4(read_cr4() | 1 << 13)),
    batch("cr4-clear-pae", GP, |_| write_cr4(read_cr4() & !(1 << 5))),
    batch("cr8-reserved", GP, |_| {
        // SAFETY: CR8 is emulated; a value above 15 must be refused with #GP.
        let f = unsafe { probe!("mov cr8, {v}", v = in(reg) 16u64) };
        seen(f, 0)
    }),
    // VMX instructions, MONITOR/MWAIT, GETSEC: #UD.
    batch("vmxon", UD, |_| vmx_insn!("vmxon qword ptr [{p}]", p = in(reg) VMX_OPERAND.as_ptr())),
    batch("vmxoff", UD, |_| vmx_insn!("vmxoff")),
    batch("vmlaunch", UD, |_| vmx_insn!("vmlaunch")),
    batch("vmresume", UD, |_| vmx_insn!("vmresume")),
    batch("vmread", UD, |_| vmx_insn!("vmread {d}, {f}", d = out(reg) _, f = in(reg) 0x681eu64)),
    batch(
        "vmwrite",
        UD,
        |_| vmx_insn!("vmwrite {f}, {v}", f = in(reg) 0x681eu64, v = in(reg) 0u64),
    ),
    batch(
        "vmptrld",
        UD,
        |_| vmx_insn!("vmptrld qword ptr [{p}]", p = in(reg) VMX_OPERAND.as_ptr()),
    ),
    batch("vmptrst", UD, |_| {
        let mut slot = [0u64; 1];
        vmx_insn!("vmptrst qword ptr [{p}]", p = in(reg) slot.as_mut_ptr())
    }),
    batch(
        "vmclear",
        UD,
        |_| vmx_insn!("vmclear qword ptr [{p}]", p = in(reg) VMX_OPERAND.as_ptr()),
    ),
    batch(
        "invept",
        UD,
        |_| vmx_insn!("invept {t}, xmmword ptr [{p}]", t = in(reg) 2u64, p = in(reg) VMX_OPERAND.as_ptr()),
    ),
    batch(
        "invvpid",
        UD,
        |_| vmx_insn!("invvpid {t}, xmmword ptr [{p}]", t = in(reg) 2u64, p = in(reg) VMX_OPERAND.as_ptr()),
    ),
    batch("vmfunc", UD, |_| vmx_insn!("vmfunc", in("eax") 0u32, in("ecx") 0u32)),
    batch(
        "monitor",
        UD,
        |_| vmx_insn!("monitor", in("rax") VMX_OPERAND.as_ptr(), in("ecx") 0u32, in("edx") 0u32),
    ),
    batch("mwait", UD, |_| vmx_insn!("mwait", in("eax") 0u32, in("ecx") 0u32)),
    // GETSEC would write EBX, which LLVM reserves; it never completes here (CR4.SMXE is 0).
    batch("getsec", UD, |_| vmx_insn!("getsec", inout("eax") 0u32 => _)),
    // The SVM instructions (0F 01 D8, DA-DF; D9 is VMMCALL, the hypercall): #UD on VT-x,
    // where they do not exist, and on SVM, where the hypervisor intercepts every one (the
    // guest sees EFER.SVME clear). rAX points at a page of our own, never touched.
    batch("svm-vmrun", UD, |_| svm_insn!(".byte 0x0f, 0x01, 0xd8")),
    batch("svm-vmload", UD, |_| svm_insn!(".byte 0x0f, 0x01, 0xda")),
    batch("svm-vmsave", UD, |_| svm_insn!(".byte 0x0f, 0x01, 0xdb")),
    batch("svm-stgi", UD, |_| svm_insn!(".byte 0x0f, 0x01, 0xdc")),
    batch("svm-clgi", UD, |_| svm_insn!(".byte 0x0f, 0x01, 0xdd")),
    batch("svm-skinit", UD, |_| svm_insn!(".byte 0x0f, 0x01, 0xde")),
    batch("svm-invlpga", UD, |_| svm_insn!(".byte 0x0f, 0x01, 0xdf")),
    // Hypercalls from ring 3: #GP.
    batch("vmcall-from-ring3", GP, |_| vmcall_from_ring3()),
    batch("vmcall-single-stepped", Expect::Fault(1), |_| single_step_vmcall()),
    // XSETBV: only XCR0 = 1.
    batch("xsetbv-xcr1", GP, |_| xsetbv(1, 1)),
    batch("xsetbv-xcr0-avx", GP, |_| xsetbv(0, 7)),
    batch("xsetbv-xcr0-zero", GP, |_| xsetbv(0, 0)),
    batch("xsetbv-xcr0-reserved", GP, |_| xsetbv(0, 1 << 63 | 1)),
    // Cache flushes: emulated as no-ops (and counted in the report).
    batch("wbinvd", Expect::Completes, |_| {
        // SAFETY: WBINVD writes back caches; the hypervisor emulates it as a no-op.
        let f = unsafe { probe!("wbinvd") };
        seen(f, 0)
    }),
    own("invd", Expect::Completes, |_| {
        // INVD would discard dirty cache lines (the hypervisor's among them) if it ran.
        // SAFETY: it always exits, and the hypervisor emulates it as a no-op.
        let f = unsafe { probe!("invd") };
        seen(f, 0)
    }),
    // Hypercalls with bad numbers and arguments: error codes.
    batch("hc-unknown-16", err(HvError::UnknownCall), |_| hc(16, 0, 0, 0)),
    batch("hc-unknown-max", err(HvError::UnknownCall), |_| hc(u64::MAX, 0, 0, 0)),
    batch("hc-unknown-2pow32", err(HvError::UnknownCall), |_| hc(1 << 32, 0, 16, 0)),
    batch("hc-unknown-exit-high-bit", err(HvError::UnknownCall), |_| hc(1 << 63 | 2, 0, 0, 0)),
    batch("hc-console-past-end", err(HvError::BadAddress), |e| {
        hc(CONSOLE, e.bi.memory_bytes, 16, 0)
    }),
    batch("hc-console-straddle-end", err(HvError::BadAddress), |e| {
        hc(CONSOLE, e.bi.memory_bytes - 4, 16, 0)
    }),
    batch("hc-console-wrap", err(HvError::BadAddress), |_| hc(CONSOLE, u64::MAX - 2, 8, 0)),
    batch("hc-console-too-long", err(HvError::BadLength), |_| hc(CONSOLE, 0x10_0000, 257, 0)),
    batch("hc-console-len-max", err(HvError::BadLength), |_| hc(CONSOLE, 0x10_0000, u64::MAX, 0)),
    batch("hc-console-channel-window", err(HvError::BadAddress), |e| {
        match e.bi.channels().first() {
            Some(d) => hc(CONSOLE, d.tx_gpa, 16, 0),
            None => Seen::NoSetup("no channel"),
        }
    }),
    batch("hc-console-grant-window", err(HvError::BadAddress), |_| hc(CONSOLE, OWN_MAP, 16, 0)),
    batch("hc-console-lapic", err(HvError::BadAddress), |_| hc(CONSOLE, 0xfee0_0000, 16, 0)),
    batch("hc-timer-vector-31", err(HvError::BadArgument), |_| hc(TIMER, 1 << 40, 31, 0)),
    batch("hc-timer-vector-nmi", err(HvError::BadArgument), |_| hc(TIMER, 1 << 40, 2, 0)),
    batch("hc-timer-vector-256", err(HvError::BadArgument), |_| hc(TIMER, 1 << 40, 256, 0)),
    batch("hc-timer-vector-max", err(HvError::BadArgument), |_| hc(TIMER, 1 << 40, u64::MAX, 0)),
    batch("hc-doorbell-channel-not-mine", err(HvError::BadArgument), |e| {
        hc(DOORBELL, e.bi.channel_count as u64, 0, 0)
    }),
    batch("hc-doorbell-channel-16", err(HvError::BadArgument), |_| hc(DOORBELL, 16, 0, 0)),
    batch("hc-doorbell-channel-max", err(HvError::BadArgument), |_| hc(DOORBELL, u64::MAX, 0, 0)),
    // Capabilities: forged slots, rights, addresses.
    batch("cap-identify-slot-64", err(HvError::NoSuchSlot), |_| hc(IDENTIFY, 64, 0, 0)),
    batch("cap-identify-slot-2pow40", err(HvError::NoSuchSlot), |_| hc(IDENTIFY, 1 << 40, 0, 0)),
    batch("cap-identify-slot-max", err(HvError::NoSuchSlot), |_| hc(IDENTIFY, u64::MAX, 0, 0)),
    batch("cap-map-slot-64", err(HvError::NoSuchSlot), |_| hc(MAP, 64, FREE_MAP, R)),
    batch("cap-map-slot-max", err(HvError::NoSuchSlot), |_| hc(MAP, u64::MAX, FREE_MAP, R)),
    batch("cap-unmap-slot-2pow40", err(HvError::NoSuchSlot), |_| hc(UNMAP, 1 << 40, 0, 0)),
    batch("cap-split-slot-max", err(HvError::NoSuchSlot), |_| hc(SPLIT, u64::MAX, 4096, 0)),
    batch("cap-revoke-slot-64", err(HvError::NoSuchSlot), |_| hc(REVOKE, 64, 0, 0)),
    batch("cap-transfer-slot-max", err(HvError::NoSuchSlot), |e| {
        loot_call(e, |_, ep| hc(TRANSFER, u64::MAX, ep, 1 | R << 8))
    }),
    batch("cap-map-readonly-copy-writable", err(HvError::RightsEscalation), |e| {
        loot_call(e, |s, _| hc(MAP, s, FREE_MAP, RW))
    }),
    batch("cap-map-write-only", err(HvError::RightsEscalation), |e| {
        loot_call(e, |s, _| hc(MAP, s, FREE_MAP, 2))
    }),
    batch("cap-map-no-rights", err(HvError::RightsEscalation), |e| {
        loot_call(e, |s, _| hc(MAP, s, FREE_MAP, 0))
    }),
    batch("cap-map-grant-right", err(HvError::BadArgument), |e| {
        loot_call(e, |s, _| hc(MAP, s, FREE_MAP, 1 | 4))
    }),
    batch("cap-map-unknown-right", err(HvError::BadArgument), |e| {
        loot_call(e, |s, _| hc(MAP, s, FREE_MAP, 1 | 8))
    }),
    batch("cap-map-rights-above-byte", err(HvError::BadArgument), |e| {
        loot_call(e, |s, _| hc(MAP, s, FREE_MAP, 1 | 1 << 8))
    }),
    batch("cap-map-over-kernel", err(HvError::BadAddress), |e| {
        loot_call(e, |s, _| hc(MAP, s, vmcall_proto::guest::KERNEL_BASE, R))
    }),
    batch("cap-map-over-channel-window", err(HvError::BadAddress), |e| {
        loot_call(e, |s, _| hc(MAP, s, vmcall_proto::guest::CHANNEL_WINDOW_GPA, R))
    }),
    batch("cap-map-below-window", err(HvError::BadAddress), |e| {
        loot_call(e, |s, _| hc(MAP, s, GRANT_WINDOW.0 - 0x1000, R))
    }),
    batch("cap-map-across-4gib", err(HvError::BadAddress), |e| {
        loot_call(e, |s, _| hc(MAP, s, GRANT_WINDOW.1 - 0x1000, R))
    }),
    batch("cap-map-above-4gib", err(HvError::BadAddress), |e| {
        loot_call(e, |s, _| hc(MAP, s, GRANT_WINDOW.1, R))
    }),
    batch("cap-map-wrapping", err(HvError::BadAddress), |e| {
        loot_call(e, |s, _| hc(MAP, s, !0xfff, R))
    }),
    batch("cap-map-over-own-mapping", err(HvError::AddressInUse), |e| {
        loot_call(e, |s, _| hc(MAP, s, OWN_MAP, R))
    }),
    batch("cap-map-overlapping-own-mapping", err(HvError::AddressInUse), |e| {
        loot_call(e, |s, _| hc(MAP, s, OWN_MAP + (1 << 20), R))
    }),
    batch("cap-map-misaligned", err(HvError::Misaligned), |e| {
        loot_call(e, |s, _| hc(MAP, s, FREE_MAP + 0x800, R))
    }),
    batch("cap-unmap-not-mapped", err(HvError::NotMapped), |e| {
        loot_call(e, |s, _| hc(UNMAP, s, 0, 0))
    }),
    batch("cap-split-endpoint", err(HvError::WrongType), |e| {
        loot_call(e, |_, ep| hc(SPLIT, ep, 4096, 0))
    }),
    batch("cap-split-misaligned", err(HvError::BadOffset), |e| {
        loot_call(e, |s, _| hc(SPLIT, s, 0x800, 0))
    }),
    batch("cap-transfer-through-memory-cap", err(HvError::WrongType), |_| {
        hc(TRANSFER, 0, 0, 1 | R << 8)
    }),
    batch("cap-copy-more-rights", err(HvError::RightsEscalation), |e| {
        loot_call(e, |s, ep| hc(TRANSFER, s, ep, 1 | RW << 8))
    }),
    batch("cap-move-without-grant", err(HvError::RightsEscalation), |e| {
        loot_call(e, |s, ep| hc(TRANSFER, s, ep, 0))
    }),
    batch("cap-transfer-bad-mode", err(HvError::BadArgument), |e| {
        loot_call(e, |s, ep| hc(TRANSFER, s, ep, 2))
    }),
    // Console content: written, and filtered on its way to the serial log (the system
    // test checks the log for the raw bytes and for the `?` that replace them).
    batch("console-c0", Expect::Completes, |_| {
        console(b"attack console-c0 payload: <<A\x07\x08\x0b\x0c\x00\x7fB>>\n")
    }),
    batch("console-ansi", Expect::Completes, |_| {
        console(b"attack console-ansi payload: <<A\x1b[2J\x1b]0;owned\x07B>>\n")
    }),
    batch("console-c1", Expect::Completes, |_| {
        console("attack console-c1 payload: <<A\u{9b}2JB>>\n".as_bytes())
    }),
    batch("console-bidi", Expect::Completes, |_| {
        console("attack console-bidi payload: <<A\u{202e}B>>\n".as_bytes())
    }),
    batch("console-invalid-utf8", Expect::Completes, |_| {
        console(b"attack console-invalid-utf8 payload: <<A\xff\xfe\xc0\xafB>>\n")
    }),
    batch("console-e9-escape", Expect::Completes, |_| {
        e9_text(b"attack console-e9-escape payload: <<A\x1b[31mB>>\n")
    }),
    batch("console-e9-bidi", Expect::Completes, |_| {
        e9_text("attack console-e9-bidi payload: <<A\u{202e}B>>\n".as_bytes())
    }),
    batch("console-split-bidi", Expect::Completes, |_| {
        // U+202E cut between three console writes: the filter must see the whole character.
        let parts: [&[u8]; 3] =
            [b"attack console-split-bidi payload: <<A\xe2", b"\x80", b"\xaeB>>\n"];
        for p in parts {
            if let s @ (Seen::Fault(_) | Seen::Error(_) | Seen::BadCode(_)) = console(p) {
                return s;
            }
        }
        Seen::Value(0)
    }),
    batch("console-split-c1", Expect::Completes, |_| {
        let parts: [&[u8]; 2] = [b"attack console-split-c1 payload: <<A\xc2", b"\x9b2JB>>\n"];
        for p in parts {
            if let s @ (Seen::Fault(_) | Seen::Error(_) | Seen::BadCode(_)) = console(p) {
                return s;
            }
        }
        Seen::Value(0)
    }),
    batch("console-overlong-escape", Expect::Completes, |_| {
        // ESC as overlong 2- and 3-byte sequences.
        console(b"attack console-overlong-escape payload: <<A\xc0\x9b\xe0\x80\x9bB>>\n")
    }),
    batch("console-format-controls", Expect::Completes, |_| {
        console(
            "attack console-format-controls payload: <<A\u{2066}\u{2067}\u{2068}\u{2069}\u{200e}\u{200f}\u{61c}B>>\n"
                .as_bytes(),
        )
    }),
    batch("console-truncated-at-newline", Expect::Completes, |_| {
        // A sequence cut short by the end of the line must not swallow or glue lines.
        console(b"attack console-truncated-at-newline payload: <<A\xe2\x80\nB>>\n")
    }),
    // Guest control and the status page, with no control capability.
    batch("control-through-memory-cap", err(HvError::WrongType), |_| hc(CONTROL, 0, 0, 0)),
    batch("control-slot-64", err(HvError::NoSuchSlot), |_| hc(CONTROL, 64, 1, 0)),
    batch("control-stale-generation", err(HvError::NoSuchSlot), |_| hc(CONTROL, 9 << 32, 1, 0)),
    batch("status-page-read", Expect::Completes, |_| read_at(vmcall_proto::guest::STATUS_GPA)),
    // Keep this the last batch attack: its random hypercalls may split, unmap or move the
    // attacker's capabilities, which the attacks above rely on.
    batch("hc-storm", Expect::Completes, storm),
    // Attacks that stop the attacker, each in its own guest.
    own("read-past-end", Expect::Stopped, |e| read_at(e.bi.memory_bytes)),
    own("status-page-write", Expect::Stopped, |_| write_at(vmcall_proto::guest::STATUS_GPA, 1)),
    own("write-past-end", Expect::Stopped, |e| write_at(e.bi.memory_bytes + 0x1000, 0xbad)),
    own("exec-past-end", Expect::Stopped, |e| exec_at(e.bi.memory_bytes + 0x2000)),
    own("rep-stos-across-end", Expect::Stopped, |e| rep_stos_across_end(e.bi)),
    own("read-4gib", Expect::Stopped, |_| match map_high(1 << 32) {
        Ok(()) => read_at(1 << 32),
        Err(s) => s,
    }),
    own("read-top-of-physical", Expect::Stopped, |_| {
        let gpa = (1u64 << phys_bits()) - 0x1000;
        match map_high(gpa) {
            Ok(()) => read_at(gpa),
            Err(s) => s,
        }
    }),
    own("lapic-icr-init", Expect::Stopped, |_| lapic_init()),
    own("ioapic-write", Expect::Stopped, |_| write_at(0xfec0_0000, 0)),
    own("foreign-channel", Expect::Stopped, |e| foreign_channel(e.bi)),
    own("write-readonly-cap", Expect::Stopped, |_| write_readonly_cap()),
    own("exec-channel-window", Expect::Stopped, |e| exec_channel(e.bi)),
    own("triple-fault", Expect::Stopped, |_| triple_fault()),
    own("halt-forever", Expect::Stopped, |_| halt(false)),
    own("halt-timer-masked", Expect::Stopped, |_| halt(true)),
    own("spin-forever", Expect::Stopped, |_| spin_forever()),
    own("mwait-forever", Expect::Stopped, |_| mwait_forever()),
    own("doorbell-flood", Expect::Completes, doorbell_flood),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attack_names_are_unique_words() {
        for (i, a) in ATTACKS.iter().enumerate() {
            assert!(a.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "{}", a.name);
            assert!(ATTACKS[..i].iter().all(|b| b.name != a.name), "duplicate {}", a.name);
            assert!(a.name != "all" && a.name != "fence");
        }
        assert!(ATTACKS.iter().filter(|a| a.kind == Kind::Batch).count() >= 25);
    }

    #[test]
    fn attack_names_are_the_config_table_s() {
        // `cargo xtask` checks `which=` against vmcall-proto's list: it must be this table.
        let names: Vec<&str> = ATTACKS.iter().map(|a| a.name).collect();
        assert_eq!(names, vmcall_proto::guest::ATTACK_NAMES);
    }
}
