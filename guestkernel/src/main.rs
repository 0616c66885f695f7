// SPDX-License-Identifier: MIT OR Apache-2.0
//! The built-in guest: runs the workload its config names (`workloads::run`, the registry,
//! with one module per workload family under `src/workloads/`) on the guest SDK, the
//! runtime library (`guestkernel`, `src/lib.rs` and the modules beside it), which it may
//! call freely; the library never calls a workload.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
#![cfg_attr(not(target_os = "none"), allow(dead_code))]

extern crate alloc;

use guestkernel::{arch, channel, hypercall};

mod workloads;

guestkernel::entry!(workloads::run);
