// SPDX-License-Identifier: MIT OR Apache-2.0
//! The part of a core's environment that guest control ([`super::control`]) and the channel
//! links ([`super::links`]) use: time, a ring message and its kick, and the host's answer.
//! Every [`super::Env`] is one (`env` says how), so those modules need not name `Env`,
//! whose host hook names theirs (no cycle).
//!
//! May call: `vmcall_proto` (the payload and error types), nothing of this crate.

use vmcall_proto::channel::Payload;
use vmcall_proto::hypercall::HvError;

pub trait Wire {
    /// The time-stamp counter now.
    fn now(&mut self) -> u64;
    /// Puts a message on the inter-core ring to core `to`; `false` if it is full.
    fn send(&mut self, to: usize, m: &Payload) -> bool;
    /// Tells core `to` it has mail.
    fn kick(&mut self, to: usize);
    /// The answer to the host's request `req` (see `control::HOST`).
    fn host_answer(&mut self, req: u32, result: Result<u64, HvError>);
}
