// SPDX-License-Identifier: MIT OR Apache-2.0
//! What the capability system needs from its core ([`Env`]): time, the inter-core rings
//! and kicks, the multicast slots ([`mcast`]), the EPT of the core's guest, and the hooks
//! of the host's control channel. The hypervisor, the host tests and the model each
//! implement it; the capability code sees nothing else of the hardware.
//!
//! May call: [`control`] (the type its host hook hands over), [`mcast`] (the multicast
//! request's layout), `wire` (the part guest control needs, given to every `Env`),
//! `members` (membership's transport, also given to every `Env`), `vmcall_proto`.

use super::wire::Wire;
use super::{control, mcast};
use crate::members;
use vmcall_proto::channel::Payload;
use vmcall_proto::hypercall::HvError;

/// What the capability system needs from its core.
pub trait Env {
    /// The time-stamp counter now.
    fn now(&mut self) -> u64;
    /// Puts a message on the inter-core ring to core `to`; `false` if it is full (which
    /// the protocol's flow control rules out; treated as that core failing).
    fn send(&mut self, to: usize, m: &Payload) -> bool;
    /// The next inter-core message for this core, with its sender.
    fn recv(&mut self) -> Option<(usize, Payload)>;
    /// Tells core `to` it has mail (an NMI).
    fn kick(&mut self, to: usize);
    /// Maps host-physical `[hpa, hpa + size)` at `gpa` in this core's guest's EPT, never
    /// executable, and flushes its translations; all or nothing.
    fn ept_map(&mut self, gpa: u64, hpa: u64, size: u64, write: bool) -> Result<(), HvError>;
    /// Unmaps `[gpa, gpa + size)` and flushes the guest's EPT translations.
    fn ept_unmap(&mut self, gpa: u64, size: u64) -> Result<(), HvError>;
    /// Waits a little while an operation is in flight (a PAUSE on hardware).
    fn relax(&mut self) {}
    /// The guest's channel `channel` (config index) went down: show it to the guest now,
    /// before it runs again (it is not running while its core handles messages). Nothing
    /// to show by default (no guest, or no status page).
    fn link_down(&mut self, _channel: u32) {}
    /// The inbox is being served now (every [`super::CapCore::poll`] says so first): the
    /// hypervisor measures the stretches between these (see `percpu::PerCore::served`).
    fn served(&mut self) {}
    /// Publishes this core's multicast revoke `req` (see [`mcast`]): written once into
    /// this core's slot, then every core it names is rung (its mail word and its multicast
    /// bell) and kicked. `false` if this environment has no slots: the protocol then sends
    /// one `REVOKE` per copy on the rings.
    fn mc_publish(&mut self, _me: usize, _req: &mcast::Request) -> bool {
        false
    }
    /// The cores that rang this core's multicast bell since it last asked (their slots may
    /// hold a request naming it), taken.
    fn mc_rung(&mut self, _me: usize) -> u64 {
        0
    }
    /// Core `from`'s published request as core `me` needs it: a consistent copy of its
    /// sequence number, node and the copies on `me` only; `None` while it is rewritten.
    fn mc_read(&mut self, _from: usize, _me: usize) -> Option<mcast::Request> {
        None
    }
    /// This core's answer (an [`mcast::answer`] word) to core `to`'s request: its own reply
    /// line in `to`'s slot, then its bit in that slot's answered word.
    fn mc_answer(&mut self, _me: usize, _to: usize, _word: u64) {}
    /// The answered word of this core's slot: bit `c` set when core `c` wrote its line
    /// since this core's last publish (a doorbell: the line says which request it answers).
    fn mc_answered(&mut self, _me: usize) -> u64 {
        0
    }
    /// Core `from`'s reply line in this core's slot.
    fn mc_line(&mut self, _me: usize, _from: usize) -> u64 {
        0
    }
    /// The host's control channel is served now, if this core serves it (every
    /// [`super::CapCore::poll`] offers it, after the inbox): `ctl` takes the requests for this
    /// core's own guest. Nothing by default (no channel).
    fn host_serve(&mut self, _ctl: &mut control::Control) {}
    /// The answer to the host's request `req` (see `control::HOST`): to the core that
    /// serves the channel. Dropped by default (no channel).
    fn host_answer(&mut self, _req: u32, _result: Result<u64, HvError>) {}
}

/// Membership reaches the transport through the same environment.
impl<E: Env> Wire for E {
    fn now(&mut self) -> u64 {
        Env::now(self)
    }
    fn send(&mut self, to: usize, m: &Payload) -> bool {
        Env::send(self, to, m)
    }
    fn kick(&mut self, to: usize) {
        Env::kick(self, to)
    }
    fn host_answer(&mut self, req: u32, result: Result<u64, HvError>) {
        Env::host_answer(self, req, result)
    }
}

impl<E: Env> members::Net for E {
    fn now(&mut self) -> u64 {
        Env::now(self)
    }
    fn send(&mut self, to: usize, m: &Payload) -> bool {
        Env::send(self, to, m)
    }
    fn kick(&mut self, to: usize) {
        Env::kick(self, to)
    }
}
