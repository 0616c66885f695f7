// SPDX-License-Identifier: MIT OR Apache-2.0
//! The minimal per-core guest kernel. For now it only boots and halts: the hypervisor does
//! not launch guests yet (that is the next layer), but the image is built and shipped on
//! the ISO so the pipeline is in place.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]

#[cfg(target_os = "none")]
mod entry {
    /// Entered in 64-bit mode by the hypervisor.
    #[no_mangle]
    #[link_section = ".text.entry"]
    extern "C" fn guest_start() -> ! {
        halt_forever()
    }

    fn halt_forever() -> ! {
        loop {
            // SAFETY: HLT only stops this virtual CPU until the next event.
            unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
        }
    }

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
        halt_forever()
    }
}
