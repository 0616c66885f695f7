// SPDX-License-Identifier: MIT OR Apache-2.0
//! The mkvisor ABI: everything that crosses a boundary between the hypervisor, the guest
//! kernel and the host tools. Nothing here depends on another crate of ours, and nothing
//! is copied by hand across that boundary: each side imports it from here.
//!
//! * [`record`]: the machine-readable lines the hypervisor writes to its serial console,
//!   which `cargo xtask run` turns into the run report.
//! * [`platform`]: the emulator/firmware ports the hypervisor uses to end a run.
//! * [`hypercall`]: the VMCALL ABI (numbers, registers, error codes).
//! * [`guest`]: a guest's memory layout and its boot-info structure.
//! * [`config`]: the machine description blob handed to the hypervisor.
//! * [`limits`]: the machine-wide counts `config` and `guest` both depend on.
//! * [`channel`]: the shared-memory message ring guests talk through.
//! * [`endpoint`]: when a channel end looks at its link word (the guest library's policy).
//! * [`caps`]: capabilities and the per-guest capability space.
//! * [`device`]: PCI functions guests own: config entries, boot-info descriptors, rules.
//! * [`kv`]: the sharded key-value service: key placement, ports, error lines.
#![cfg_attr(not(test), no_std)]

pub mod caps;
pub mod channel;
pub mod config;
pub mod device;
pub mod endpoint;
pub mod fixed;
pub mod guest;
pub mod hostctl;
pub mod hypercall;
pub mod kv;
pub mod limits;
pub mod platform;
pub mod record;

/// Version of this ABI. Bumped on any incompatible change to a layout or a record.
pub const ABI_VERSION: u32 = 1;
