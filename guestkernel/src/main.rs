// SPDX-License-Identifier: MIT OR Apache-2.0
//! The built-in guest: runs the workload its config names (`workloads::run`) on the guest
//! runtime library (`guestkernel`, `src/lib.rs`), which it may call freely.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
#![cfg_attr(not(target_os = "none"), allow(dead_code))]

extern crate alloc;

use guestkernel::{arch, channel, hypercall};

mod capattack;
mod capload;
mod capxfer;
mod exitbench;
mod ghost;
mod hostile;
mod kvfront;
mod kvworker;
mod linkloads;
mod meter;
mod netloads;
mod nicload;
mod pciattack;
mod supervise;
mod tcpecho;
mod workloads;

guestkernel::entry!(workloads::run);
