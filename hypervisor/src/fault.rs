// SPDX-License-Identifier: MIT OR Apache-2.0
//! What happens when the hypervisor itself faults or panics: the core, vector, error code
//! and RIP are printed, then the core stops (an AP parks, the BSP ends the run as failed).
//!
//! May call: `arch`, `console`, `smp` (to post the failure); nothing calls back here but the
//! exception stubs and the panic machinery.

use crate::arch::idt::ExceptionFrame;

/// Called by the stubs in `arch::idt` with the frame they built.
#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn exception_entry(frame: &ExceptionFrame) -> ! {
    report(frame);
    crate::smp::this_core_failed(crate::smp::Failure::Exception, frame.vector as u32, frame.rip)
}

fn report(f: &ExceptionFrame) {
    crate::console::force_unlock_for_panic();
    let name = crate::arch::idt::exception_name(f.vector);
    let cr2 = if f.vector == 14 { crate::arch::read_cr2() } else { 0 };
    log::error!(
        "hypervisor exception: {name} (vector {}) error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} cr2={:#x}",
        f.vector, f.error_code, f.rip, f.cs, f.rflags, f.rsp, cr2
    );
}

#[cfg(all(not(test), target_os = "none"))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    crate::console::force_unlock_for_panic();
    log::error!("hypervisor panic: {info}");
    crate::smp::this_core_failed(crate::smp::Failure::Panic, 0, 0)
}
