// SPDX-License-Identifier: MIT OR Apache-2.0
//! Hypercalls (see `vmcall_proto::hypercall` for the ABI).

use core::sync::atomic::{AtomicU8, Ordering};
use vmcall_proto::hypercall::{HvError, Hypercall};

/// Which instruction makes a hypercall: 0 for VMCALL (Intel VT-x, the default), 1 for
/// VMMCALL (AMD SVM). Written once at boot (`arch::pick_hypercall_instruction`), before any
/// other hypercall.
static USE_VMMCALL: AtomicU8 = AtomicU8::new(0);

/// Sets the hypercall instruction: VMMCALL when `vmmcall`, else VMCALL. Called once, by
/// `arch::pick_hypercall_instruction` at boot, before any other hypercall.
pub fn set_vmmcall(vmmcall: bool) {
    USE_VMMCALL.store(vmmcall as u8, Ordering::Relaxed);
}

/// Whether hypercalls use VMMCALL (AMD) rather than VMCALL.
pub fn uses_vmmcall() -> bool {
    USE_VMMCALL.load(Ordering::Relaxed) != 0
}

/// Issues VMCALL `nr` with two arguments; returns RAX.
pub fn raw(nr: u64, a0: u64, a1: u64) -> u64 {
    raw3(nr, a0, a1, 0)
}

/// Issues VMCALL (VT-x) or VMMCALL (SVM, see [`set_vmmcall`]) `nr` with three arguments; returns
/// RAX.
#[cfg(target_os = "none")]
pub fn raw3(nr: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    let ret: u64;
    // Memory passed by address is only read. VMCALL inline (VT-x: two instructions more
    // than VMCALL alone, the test and the branch not taken); VMMCALL out of line.
    // VMCALL/VMMCALL traps to the hypervisor, which validates every argument.
    // SAFETY: the hypervisor changes only RAX.
    unsafe {
        core::arch::asm!(
            "cmp byte ptr [rip + {vmmcall}], 0",
            "jne 2f",
            "vmcall",
            "3:",
            ".pushsection .text.mkv_vmmcall, \"ax\"",
            "2: vmmcall",
            "jmp 3b",
            ".popsection",
            vmmcall = sym USE_VMMCALL,
            inlateout("rax") nr => ret, in("rdi") a0, in("rsi") a1,
            in("rdx") a2, in("r10") 0u64, options(nostack));
    }
    ret
}

#[cfg(not(target_os = "none"))]
pub fn raw3(_nr: u64, _a0: u64, _a1: u64, _a2: u64) -> u64 {
    HvError::UnknownCall.to_rax()
}

pub fn call(h: Hypercall, a0: u64, a1: u64) -> Result<u64, Result<HvError, i64>> {
    HvError::from_rax(raw(h as u64, a0, a1))
}

pub fn call3(h: Hypercall, a0: u64, a1: u64, a2: u64) -> Result<u64, Result<HvError, i64>> {
    HvError::from_rax(raw3(h as u64, a0, a1, a2))
}

/// Writes console bytes (at most `CONSOLE_MAX` per call).
pub fn console_write(bytes: &[u8]) {
    for chunk in bytes.chunks(vmcall_proto::hypercall::CONSOLE_MAX as usize) {
        let _ = call(Hypercall::ConsoleWrite, chunk.as_ptr() as u64, chunk.len() as u64);
    }
}

/// VM exits this guest has taken so far (this call's included).
pub fn exit_count() -> u64 {
    call(Hypercall::ExitCount, 0, 0).unwrap_or(0)
}

/// The first slot holding a channel endpoint capability (they follow the grants, in
/// boot-info channel order).
pub fn first_endpoint() -> Option<u64> {
    (0..vmcall_proto::caps::MAX_SLOTS as u64)
        .find(|&s| call(Hypercall::CapIdentify, s, 0).is_ok_and(|i| i & 0xff == 2))
}

/// Agrees to receive up to `n` capabilities through every channel endpoint this guest
/// holds (`cap_accept`): without it, peers' transfers are refused with `NotAccepted`.
pub fn accept_all(n: u64) {
    let Some(first) = first_endpoint() else { return };
    let mut ep = first;
    while call(Hypercall::CapAccept, ep, n).is_ok() {
        ep += 1;
    }
}

/// `cap_transfer`, retried while the peer has not accepted yet (it may still be starting),
/// for at most `ms` milliseconds.
pub fn transfer(slot: u64, ep: u64, mode: u64, ms: u64) -> Result<u64, Result<HvError, i64>> {
    let r = call3(Hypercall::CapTransfer, slot, ep, mode);
    if r != Err(Ok(HvError::NotAccepted)) {
        return r;
    }
    let tsc_per_ms = call(Hypercall::TscPerMs, 0, 0).unwrap_or(1);
    let start = crate::cpu::rdtsc();
    loop {
        let r = call3(Hypercall::CapTransfer, slot, ep, mode);
        if r != Err(Ok(HvError::NotAccepted))
            || crate::cpu::rdtsc().wrapping_sub(start) > ms * tsc_per_ms
        {
            return r;
        }
        core::hint::spin_loop();
    }
}

/// Logs whether a hypercall answered `want` (`tag: what: ...`); clears `ok` if not.
pub fn check(
    tag: &str,
    what: &str,
    got: Result<u64, Result<HvError, i64>>,
    want: Result<u64, HvError>,
    ok: &mut bool,
) {
    if got.map_err(|e| e.ok()) == want.map_err(Some) {
        log::info!("{tag}: {what}: {got:?} as expected");
    } else {
        log::error!("{tag}: {what}: got {got:?}, expected {want:?}");
        *ok = false;
    }
}

/// Ends this guest with `status`.
pub fn exit(status: u64) -> ! {
    let _ = call(Hypercall::Exit, status, 0);
    // The hypervisor never resumes a guest that exited; if it did, stop here.
    loop {
        core::hint::spin_loop();
    }
}
