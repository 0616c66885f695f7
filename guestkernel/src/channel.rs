// SPDX-License-Identifier: MIT OR Apache-2.0
//! The guest's channel API over `vmcall_proto::channel`: `send`, `try_send`, `recv`,
//! `try_recv`, and `wait`, which polls and then blocks on the doorbell, or with
//! [`Chan::use_mwait`] sleeps in MWAIT on the line the next message lands in (exitless
//! notification: no doorbell hypercall, no VM exit on either side).
//!
//! Doorbell protocol: a waiting receiver sets `sleeping` in its ring header, checks the
//! ring once more, then halts with interrupts on; a sender that sees `sleeping` after
//! publishing a message rings the peer (one hypercall). Either the sender sees the flag or
//! the receiver's re-check sees the message: no lost wake-up.
//!
//! Peers that come and go: every operation first reads the channel's link word in the
//! status page (one load, no exit). A peer that died makes it `PeerGone` (the hypervisor
//! also rings this guest's doorbell, so a sleeper wakes); once the peer's new incarnation
//! is up, the word carries a new epoch and operations say `Reset` until [`Chan::resync`]
//! starts over on the reset rings. A message read is always a message of this side's epoch
//! (the ring's epoch tags see to it); a receive that finds nothing or an error while the
//! link changed reports the change instead.

use crate::hypercall::call;
pub use vmcall_proto::channel::{message, ChannelError, Payload};
use vmcall_proto::channel::{Receiver, Ring, Sender};
use vmcall_proto::guest::{link_epoch, link_up, BootInfo, StatusPage, STATUS_GPA};
use vmcall_proto::hypercall::Hypercall;

pub struct Chan {
    pub tx: Sender<'static>,
    pub rx: Receiver<'static>,
    /// This channel's position in the boot-info table (the doorbell argument).
    pub number: usize,
    /// Ring the peer's doorbell when it sleeps (doorbell mode); polling mode never does.
    pub doorbells: bool,
    /// Wait with MONITOR/MWAIT on the next message's line instead of the doorbell (set with
    /// [`Chan::use_mwait`]).
    mwait: bool,
    pub rung: u64,
    /// The epoch this side's sender and receiver are in.
    pub epoch: u32,
    tx_gpa: u64,
    rx_gpa: u64,
    slots: u32,
}

/// The link word of the channel at boot-info position `number` (see `guest::StatusPage`).
fn link_word(number: usize) -> u64 {
    let page = STATUS_GPA as *const StatusPage;
    let number = number.min(vmcall_proto::guest::MAX_CHANNELS_PER_GUEST - 1);
    // The hypervisor maps the status page read-only for the guest's whole life; our page
    // tables identity-map it with the channel windows. The hypervisor changes the word only
    // while we do not run.
    // SAFETY: an aligned u64 inside that page (`number` is clamped to the table).
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*page).links[number].word)) }
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
    let epoch = link_epoch(link_word(number));
    // The receiver publishes its count after every message: when a peer dies, the ring
    // counters say exactly what was in flight (the hypervisor counts it lost).
    Some(Chan {
        tx: Sender::with_epoch(tx, epoch),
        rx: Receiver::with_epoch(rx, 1, epoch),
        number,
        doorbells: false,
        mwait: false,
        rung: 0,
        epoch,
        tx_gpa: d.tx_gpa,
        rx_gpa: d.rx_gpa,
        slots: d.slots,
    })
}

impl Chan {
    /// `PeerGone` or `Reset` if the link says so, for a link word `w`.
    fn check(&self, w: u64) -> Result<(), ChannelError> {
        if !link_up(w) {
            Err(ChannelError::PeerGone)
        } else if link_epoch(w) != self.epoch {
            Err(ChannelError::Reset)
        } else {
            Ok(())
        }
    }

    /// The link as it is now: `Ok` if the peer is up in this side's epoch.
    pub fn link(&self) -> Result<(), ChannelError> {
        self.check(link_word(self.number))
    }

    /// Starts over in the channel's current epoch (after `Reset`): a new sender and
    /// receiver on the reset rings. `PeerGone` while the peer is down.
    pub fn resync(&mut self) -> Result<u32, ChannelError> {
        let w = link_word(self.number);
        if !link_up(w) {
            return Err(ChannelError::PeerGone);
        }
        let epoch = link_epoch(w);
        // SAFETY: the same rings as at `open`, mapped for the guest's life.
        let (tx, rx) = unsafe {
            (
                Ring::from_raw(self.tx_gpa as *mut u8, self.slots),
                Ring::from_raw(self.rx_gpa as *mut u8, self.slots),
            )
        };
        self.tx = Sender::with_epoch(tx, epoch);
        self.rx = Receiver::with_epoch(rx, 1, epoch);
        self.epoch = epoch;
        Ok(epoch)
    }

    pub fn try_send(&mut self, m: &Payload) -> Result<(), ChannelError> {
        let w = link_word(self.number);
        self.check(w)?;
        if let Err(e) = self.tx.try_send(m) {
            // An error while the link changed: the change is the news.
            let now = link_word(self.number);
            if now != w {
                self.check(now)?;
            }
            return Err(e);
        }
        if self.mwait {
            self.nudge_monitor();
        }
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
        let w = link_word(self.number);
        self.check(w)?;
        match self.rx.try_recv() {
            Ok(Some(m)) => Ok(Some(m)),
            other => {
                // Nothing, or an error, while the link changed: the change is the news.
                let now = link_word(self.number);
                if now != w {
                    self.check(now)?;
                }
                other
            }
        }
    }

    /// Receives, spinning until a message comes.
    pub fn recv(&mut self) -> Result<Payload, ChannelError> {
        loop {
            if let Some(m) = self.try_recv()? {
                return Ok(m);
            }
            core::hint::spin_loop();
        }
    }

    /// Makes [`Chan::wait`] sleep in MWAIT where the hypervisor offers it exitless
    /// (`mwait = true` for this guest: CPUID shows MONITOR); returns whether it does. Where
    /// not, waits stay on the doorbell (and this side rings it).
    pub fn use_mwait(&mut self) -> bool {
        self.mwait = crate::arch::has_monitor();
        if !self.mwait {
            self.doorbells = true;
        }
        self.mwait
    }

    /// Whether waits sleep in MWAIT.
    pub fn mwait(&self) -> bool {
        self.mwait
    }

    /// Polls `polls` times, then sleeps until a doorbell (or any interrupt) and repeats.
    /// With [`Chan::use_mwait`], sleeps in MWAIT on the line the next message lands in
    /// instead: MONITOR, check once more, MWAIT. A store the sender makes after the check
    /// wakes the sleeper; one made before it is found by the check: no lost wake-up, and no
    /// `sleeping` flag, so the sender never rings (neither side exits).
    pub fn wait(&mut self, polls: u32) -> Result<Payload, ChannelError> {
        if self.mwait {
            return self.wait_mwait(polls);
        }
        loop {
            for _ in 0..polls {
                if let Some(m) = self.try_recv()? {
                    return Ok(m);
                }
                core::hint::spin_loop();
            }
            self.rx.set_sleeping(true);
            let again = self.try_recv();
            if let Ok(None) = again {
                crate::arch::wait_for_interrupt();
            }
            self.rx.set_sleeping(false);
            if let Some(m) = again? {
                return Ok(m);
            }
        }
    }

    /// After a send in MWAIT mode: drop our TLB entry for the message's page and store its
    /// control word once more. Needed in Bochs 2.7 only: its MONITOR invalidates the other
    /// CPUs' TLB entries at the monitored *physical* address taken as a linear one
    /// (`invlpg(paddr)` in its cpu/mwait.cc), so a peer whose TLB still holds a direct
    /// pointer to the page (any linear address under EPT) stores without the monitor check
    /// and the waiter sleeps through the message (seen: 47 round trips, then a lost
    /// wake-up). After INVLPG our next store refills the entry, and Bochs refuses a direct
    /// pointer to a monitored page: the store goes through the monitor check. Either the
    /// waiter armed its monitor before that store (it wakes) or after it, and then after the
    /// first control store too (its check finds the message). On hardware the monitor sees
    /// every store through cache coherence and this is a wasted TLB refill and store.
    fn nudge_monitor(&self) {
        crate::arch::invlpg(self.tx.last_line());
        self.tx.restore_last();
    }

    fn wait_mwait(&mut self, polls: u32) -> Result<Payload, ChannelError> {
        loop {
            for _ in 0..polls {
                if let Some(m) = self.try_recv()? {
                    return Ok(m);
                }
                core::hint::spin_loop();
            }
            // The line is a slot of our receive ring, mapped for the guest's life.
            // SAFETY: `use_mwait` found MONITOR offered; the line is mapped.
            unsafe { crate::arch::monitor(self.rx.next_line()) };
            if let Some(m) = self.try_recv()? {
                return Ok(m);
            }
            // A peer going down also wakes us: the hypervisor injects the doorbell vector,
            // an interrupt, and MWAIT runs with interrupts on.
            // SAFETY: `use_mwait` found MWAIT offered.
            unsafe { crate::arch::mwait() };
        }
    }
}
