// SPDX-License-Identifier: MIT OR Apache-2.0
//! What happens when the hypervisor itself faults or panics: the core, vector, error code
//! and RIP are printed, then the core stops (an AP parks, the BSP ends the run as failed).

use crate::arch::idt::ExceptionFrame;

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization exception",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security exception",
    "reserved 31",
];

/// Called by the stubs in `arch::idt` with the frame they built.
#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn exception_entry(frame: &ExceptionFrame) -> ! {
    report(frame);
    crate::smp::this_core_failed(crate::smp::Failure::Exception, frame.vector as u32, frame.rip)
}

/// The mnemonic and name of an exception vector.
pub fn exception_name(vector: u64) -> &'static str {
    NAMES.get(vector as usize).copied().unwrap_or("unexpected interrupt")
}

fn report(f: &ExceptionFrame) {
    crate::console::force_unlock_for_panic();
    let name = exception_name(f.vector);
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
