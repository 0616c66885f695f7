// SPDX-License-Identifier: MIT OR Apache-2.0
//! The guest's channel API over `vmcall_proto::channel`: `send`, `try_send`, `recv`,
//! `try_recv`, and `wait`, which polls and then blocks on the doorbell.
//!
//! Doorbell protocol: a waiting receiver sets `sleeping` in its ring header, checks the
//! ring once more, then halts with interrupts on; a sender that sees `sleeping` after
//! publishing a message rings the peer (one hypercall). Either the sender sees the flag or
//! the receiver's re-check sees the message: no lost wake-up.

use crate::hypercall::call;
pub use vmcall_proto::channel::{message, ChannelError, Payload};
use vmcall_proto::channel::{Receiver, Ring, Sender};
use vmcall_proto::guest::BootInfo;
use vmcall_proto::hypercall::Hypercall;

pub struct Chan {
    pub tx: Sender<'static>,
    pub rx: Receiver<'static>,
    /// This channel's position in the boot-info table (the doorbell argument).
    pub number: usize,
    /// Ring the peer's doorbell when it sleeps (doorbell mode); polling mode never does.
    pub doorbells: bool,
    pub rung: u64,
}

/// Opens the channel called `name`, or the first one.
pub fn open(bi: &BootInfo, name: Option<&str>) -> Option<Chan> {
    let (number, d) = bi
        .channels()
        .iter()
        .enumerate()
        .find(|(_, d)| name.is_none_or(|n| vmcall_proto::fixed::get(&d.name) == Some(n)))?;
    // The hypervisor mapped both rings here (EPT) for the guest's life; our page tables
    // identity-map the windows.
    // SAFETY: both rings are mapped memory, accessed only through the ring's atomics.
    let (tx, rx) = unsafe {
        (Ring::from_raw(d.tx_gpa as *mut u8, d.slots), Ring::from_raw(d.rx_gpa as *mut u8, d.slots))
    };
    Some(Chan {
        tx: Sender::new(tx),
        rx: Receiver::new(rx, (d.slots / 4).max(1)),
        number,
        doorbells: false,
        rung: 0,
    })
}

impl Chan {
    pub fn try_send(&mut self, m: &Payload) -> Result<(), ChannelError> {
        self.tx.try_send(m)?;
        if self.doorbells && self.tx.peer_sleeping() {
            let _ = call(Hypercall::Doorbell, self.number as u64, 0);
            self.rung += 1;
        }
        Ok(())
    }

    /// Sends, spinning while the ring is full.
    pub fn send(&mut self, m: &Payload) -> Result<(), ChannelError> {
        loop {
            match self.try_send(m) {
                Err(ChannelError::Full) => core::hint::spin_loop(),
                other => return other,
            }
        }
    }

    pub fn try_recv(&mut self) -> Result<Option<Payload>, ChannelError> {
        self.rx.try_recv()
    }

    /// Receives, spinning until a message comes.
    pub fn recv(&mut self) -> Result<Payload, ChannelError> {
        loop {
            if let Some(m) = self.rx.try_recv()? {
                return Ok(m);
            }
            core::hint::spin_loop();
        }
    }

    /// Polls `polls` times, then sleeps until a doorbell (or any interrupt) and repeats.
    pub fn wait(&mut self, polls: u32) -> Result<Payload, ChannelError> {
        loop {
            for _ in 0..polls {
                if let Some(m) = self.rx.try_recv()? {
                    return Ok(m);
                }
                core::hint::spin_loop();
            }
            self.rx.set_sleeping(true);
            let again = self.rx.try_recv();
            if let Ok(None) = again {
                crate::arch::wait_for_interrupt();
            }
            self.rx.set_sleeping(false);
            if let Some(m) = again? {
                return Ok(m);
            }
        }
    }
}
