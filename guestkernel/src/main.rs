// SPDX-License-Identifier: MIT OR Apache-2.0
//! The minimal per-core guest kernel. The hypervisor starts it in 64-bit mode with the
//! boot-info address in RDI (`vmcall_proto::guest`); it installs its own GDT, IDT and page
//! tables, logs through the console hypercall, and runs the workload its config names.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
#![cfg_attr(not(target_os = "none"), allow(dead_code))]

mod arch;
mod capattack;
mod capload;
mod capxfer;
mod channel;
mod console;
mod hostile;
mod hypercall;
mod linkloads;
mod netloads;
mod supervise;
mod workloads;

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .text.entry, "ax"
    .global guest_start
guest_start:
    cli
    xorl %ebp, %ebp
    call guest_main
1:  hlt
    jmp 1b
"#,
    options(att_syntax)
);

/// Entered from `guest_start` with the hypervisor's RDI and RSP.
#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn guest_main(boot_info: u64) -> ! {
    use vmcall_proto::guest::{BootInfo, BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
    console::init();
    arch::init();
    // The hypervisor wrote a BootInfo at this address; our page tables identity-map it. We
    // read it once, into our own copy.
    // SAFETY: a readable, aligned BootInfo (any bit pattern is valid) lives at `boot_info`.
    let bi: BootInfo = unsafe { core::ptr::read_volatile(boot_info as *const BootInfo) };
    if bi.magic != BOOT_INFO_MAGIC || bi.version != BOOT_INFO_VERSION {
        log::error!("bad boot info (magic {:#x}, version {})", bi.magic, bi.version);
        hypercall::exit(0xb0);
    }
    let status = workloads::run(&bi);
    hypercall::exit(status)
}

#[cfg(all(target_os = "none", not(test)))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    log::error!("guest panic: {info}");
    hypercall::exit(0xdead)
}
