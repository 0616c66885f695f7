// SPDX-License-Identifier: MIT OR Apache-2.0
//! The guest runtime: everything a guest kernel needs under mkvisor, as a library. It owns
//! the boot path (`guest_start`, the boot-info check), the CPU tables and exception
//! handlers ([`arch`]), the console and the `log` backend ([`console`]), hypercalls and
//! exit ([`hypercall`]), the virtual timer ([`timer`]), channels ([`channel`]),
//! capabilities ([`caps`]), the heap behind `alloc` ([`heap`]), its exit-free counters
//! ([`telemetry`]), the PCI functions it owns and their interrupts ([`pci`]), network
//! cards ([`nic`], with the drivers [`e1000`] and [`ne2k`]) and their frames ([`net`]), a
//! TCP/IP stack on them ([`tcpip`], smoltcp), and the panic handler; it
//! may call only `vmcall_proto`, smoltcp and the hypervisor (through hypercalls). Its linker script
//! (`linker.ld`: the image at guest-physical 1 MiB, entry `guest_start`) is what `cargo
//! xtask` links a guest crate with. A guest is a crate that names
//! its one entry function with [`entry!`]: the function gets the boot information and
//! returns the exit status. The built-in workloads (`src/main.rs`) are one such guest.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(target_os = "none"), allow(dead_code))]

extern crate alloc;

pub mod arch;
pub mod caps;
pub mod card;
pub mod channel;
pub mod console;
pub mod cpu;
pub mod e1000;
pub mod heap;
pub mod hypercall;
pub mod ne2k;
pub mod net;
pub mod nic;
pub mod pci;
pub mod tcpip;
pub mod telemetry;
pub mod timer;

pub use log;
pub use vmcall_proto;
pub use vmcall_proto::guest::BootInfo;

/// Names the guest's entry function: `fn(&BootInfo) -> u64`, called once the runtime is
/// up (console, CPU tables, boot information checked); what it returns is the guest's exit
/// status (0: success).
#[macro_export]
macro_rules! entry {
    ($f:path) => {
        /// The guest's entry, called by the runtime's `guest_main`.
        #[no_mangle]
        pub fn mkvisor_guest_entry(bi: &$crate::BootInfo) -> u64 {
            let f: fn(&$crate::BootInfo) -> u64 = $f;
            f(bi)
        }
    };
}

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
    use vmcall_proto::guest::{BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
    extern "Rust" {
        fn mkvisor_guest_entry(bi: &BootInfo) -> u64;
    }
    console::init();
    arch::init();
    arch::pick_hypercall_instruction();
    // The hypervisor wrote a BootInfo at this address; our page tables identity-map it. We
    // read it once, into our own copy.
    // SAFETY: a readable, aligned BootInfo (any bit pattern is valid) lives at `boot_info`.
    let bi: BootInfo = unsafe { core::ptr::read_volatile(boot_info as *const BootInfo) };
    if bi.magic != BOOT_INFO_MAGIC || bi.version != BOOT_INFO_VERSION {
        log::error!("bad boot info (magic {:#x}, version {})", bi.magic, bi.version);
        hypercall::exit(0xb0);
    }
    heap::init(bi.memory_bytes);
    // A guest without `entry!` does not link.
    // SAFETY: `entry!` defines this symbol with exactly this signature.
    let status = unsafe { mkvisor_guest_entry(&bi) };
    hypercall::exit(status)
}

#[cfg(all(target_os = "none", not(test)))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    log::error!("guest panic: {info}");
    hypercall::exit(0xdead)
}
