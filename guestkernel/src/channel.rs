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
//! MWAIT protocol: the same flag (`SLEEP_MWAIT`), then arm, check, sleep. The sender's store
//! into the armed line wakes the sleeper; the doorbell is only the backstop, rung by a
//! sender that still sees the flag [`WAKE_TICKS`] after its send. Why no interleaving loses
//! a wake-up, even with a monitor that forgets it was armed, is argued at
//! [`Chan::wait_mwait`].
//!
//! Peers that come and go (the policy is `vmcall_proto::endpoint`'s, shared with the host
//! bench): a send first compares the channel's link word in the status page with the word
//! this side's epoch began with (one load and one compare, no exit, no decoding; the word
//! changes only while this guest does not run, so on hardware its line stays in this core's
//! cache); a receive looks only when it finds the ring empty or in error: a message of this
//! side's epoch (the ring's epoch tags see to it) is delivered whatever the link says now,
//! so a dead peer's last messages come first. A peer that died makes it `PeerGone` (the
//! hypervisor also rings this guest's doorbell, so a sleeper wakes); once the peer's new
//! incarnation is up, the word carries a new epoch and operations say `Reset` until
//! [`Chan::resync`] starts over on the reset rings.

use crate::hypercall::call;
use core::sync::atomic::AtomicU64;
pub use vmcall_proto::channel::{message, ChannelError, Payload};
use vmcall_proto::channel::{Receiver, Ring, Sender, SLEEP_MWAIT};
pub use vmcall_proto::endpoint::CallEnd;
use vmcall_proto::endpoint::LinkWatch;
use vmcall_proto::guest::{BootInfo, StatusPage, STATUS_GPA};
use vmcall_proto::hypercall::Hypercall;

/// How long (TSC ticks) a sender waits for a peer sleeping in MWAIT to show it woke
/// before it rings the doorbell. The peer needs a few hundred instructions from its wake to
/// clearing its flag (Bochs: ticks are emulated instructions; hardware: a C1 exit takes
/// about a microsecond, a few thousand ticks); a peer whose core is in a VM exit that
/// long is rung needlessly, which costs one exit and loses nothing.
pub const WAKE_TICKS: u64 = 20_000;

pub struct Chan {
    pub tx: Sender<'static>,
    pub rx: Receiver<'static>,
    /// This channel's position in the boot-info table (the doorbell argument).
    pub number: usize,
    /// Ring the peer's doorbell when it sleeps (doorbell mode, [`Chan::set_doorbells`]);
    /// polling mode never does.
    doorbells: bool,
    /// Wait with MONITOR/MWAIT on the next message's line instead of the doorbell (set with
    /// [`Chan::use_mwait`]).
    mwait: bool,
    /// `doorbells || mwait`: a send looks at the peer's sleeping word (one test on the hot
    /// path instead of two).
    wake: bool,
    pub rung: u64,
    /// Attempts [`Chan::send`] found the ring full, and polls [`Chan::recv`] found it
    /// empty (counted in the spin paths only: how long each side waited for the other).
    pub full_spins: u64,
    pub empty_polls: u64,
    /// TSC ticks spent halted in [`Chan::recv_until`] (emulated instructions not executed,
    /// in Bochs): what a caller subtracts to count its work.
    pub idle_tsc: u64,
    /// The epoch this side's sender and receiver are in.
    pub epoch: u32,
    /// The channel's link word and what this side last saw of it.
    link: LinkWatch<'static>,
    tx_gpa: u64,
    rx_gpa: u64,
    slots: u32,
}

pub use vmcall_proto::endpoint::ack_every;

/// The link word of the channel at boot-info position `number` (see `guest::StatusPage`).
fn link_word(number: usize) -> &'static AtomicU64 {
    let page = STATUS_GPA as *const StatusPage;
    let number = number.min(vmcall_proto::guest::MAX_CHANNELS_PER_GUEST - 1);
    // The hypervisor maps the status page read-only for the guest's whole life; our page
    // tables identity-map it with the channel windows. It changes the word only while we do
    // not run; we only load it, relaxed (a plain load: allowed on read-only memory).
    // SAFETY: an aligned u64 inside that page (`number` is clamped to the table).
    unsafe { AtomicU64::from_ptr(core::ptr::addr_of!((*page).links[number].word) as *mut u64) }
}

/// Opens the channel called `name`, or the first one.
pub fn open(bi: &BootInfo, name: Option<&str>) -> Option<Chan> {
    let number = bi
        .channels()
        .iter()
        .position(|d| name.is_none_or(|n| vmcall_proto::fixed::get(&d.name) == Some(n)))?;
    open_index(bi, number)
}

/// Opens the channel at position `number` of the boot-info channel table.
pub fn open_index(bi: &BootInfo, number: usize) -> Option<Chan> {
    let d = bi.channels().get(number)?;
    // The hypervisor mapped both rings here (EPT) for the guest's life; our page tables
    // identity-map the windows.
    // SAFETY: both rings are mapped memory, accessed only through the ring's atomics.
    let (tx, rx) = unsafe {
        (Ring::from_raw(d.tx_gpa as *mut u8, d.slots), Ring::from_raw(d.rx_gpa as *mut u8, d.slots))
    };
    let link = LinkWatch::new(link_word(number));
    let epoch = link.epoch();
    // The receiver publishes its count after every message (`ack_every`): when a peer
    // dies, the ring counters say exactly what was in flight (the hypervisor counts it lost).
    Some(Chan {
        tx: Sender::with_epoch(tx, epoch),
        rx: Receiver::with_epoch(rx, ack_every(d.slots), epoch),
        number,
        doorbells: false,
        mwait: false,
        wake: false,
        rung: 0,
        full_spins: 0,
        empty_polls: 0,
        idle_tsc: 0,
        epoch,
        link,
        tx_gpa: d.tx_gpa,
        rx_gpa: d.rx_gpa,
        slots: d.slots,
    })
}

impl Chan {
    /// The link as it is now: `Ok` if the peer is up in this side's epoch.
    pub fn link(&self) -> Result<(), ChannelError> {
        self.link.link()
    }

    /// Starts over in the channel's current epoch (after `Reset`): a new sender and
    /// receiver on the reset rings. `PeerGone` while the peer is down.
    pub fn resync(&mut self) -> Result<u32, ChannelError> {
        let epoch = self.link.resync()?;
        // SAFETY: the same rings as at `open`, mapped for the guest's life.
        let (tx, rx) = unsafe {
            (
                Ring::from_raw(self.tx_gpa as *mut u8, self.slots),
                Ring::from_raw(self.rx_gpa as *mut u8, self.slots),
            )
        };
        self.tx = Sender::with_epoch(tx, epoch);
        self.rx = Receiver::with_epoch(rx, ack_every(self.slots), epoch);
        self.epoch = epoch;
        Ok(epoch)
    }

    /// Sends `m`, or `Full` (after a call given up, a ring full up to its slot stays `Full`
    /// until [`Chan::send`], [`Chan::send_until`] or the next call frees the slot, or
    /// [`Chan::after_full`] is called). If the last message taken was a [`Chan::call`]'s request
    /// whose reply is not written yet, `m` is that reply: it goes into the request's slot,
    /// where the caller waits for it polling (nothing to notify), not on this side's ring
    /// (`vmcall_proto::endpoint::LinkWatch::try_send_or_reply`).
    #[inline(always)]
    pub fn try_send(&mut self, m: &Payload) -> Result<(), ChannelError> {
        if self.link.try_send_or_reply(&mut self.tx, &mut self.rx, m)? {
            return Ok(());
        }
        if self.wake {
            notify(&self.tx, self.number, &mut self.rung);
        }
        Ok(())
    }

    /// Sends `req` and waits for the reply, copied into `reply`: the request/reply turn of
    /// a client, what a program that asks its peer something and waits for the answer
    /// should call (rather than [`Chan::send`] then [`Chan::recv`]). It does what those two
    /// do, check for check (the link look before the send, a sleeping peer notified in
    /// doorbell or MWAIT mode, the reply's tag, sequence and re-read, a full look every
    /// [`LOOK_EVERY`](vmcall_proto::endpoint::LOOK_EVERY) empty polls), as one function
    /// (`vmcall_proto::endpoint::LinkWatch::call`): the ring ends' state stays in
    /// registers across the turn, and the reply moves once, from its slot into `reply`.
    /// The request goes as a call (its control word says so) and the peer writes the reply
    /// into the request's own slot, whether it answers with [`Chan::serve`] or with a
    /// receive and a send (its next message after taking the request is the reply): one
    /// cache line moves per round trip, twice, instead of two. It polls for the reply (as
    /// `recv`); a program that wants to sleep while it waits sends and then calls
    /// [`Chan::wait`]. Messages the peer sent before answering stay on the channel for the
    /// next receive. On an error `reply` holds nothing meaningful.
    #[inline(always)]
    pub fn call(&mut self, req: &Payload, reply: &mut Payload) -> Result<(), ChannelError> {
        // The mode is read after the send (by reference), off the way to the message.
        let (wake, number, rung) = (&self.wake, &self.number, &mut self.rung);
        self.link.call(
            &mut self.tx,
            &mut self.rx,
            req,
            reply,
            |tx| {
                if *wake {
                    notify(tx, *number, rung)
                }
            },
            core::hint::spin_loop,
        )
    }

    /// [`Chan::call`] with a deadline: `CallEnd::Replied` with the reply in `reply`; if
    /// the TSC passed `deadline` first (checked between tries of a full ring and every
    /// [`LOOK_EVERY`](vmcall_proto::endpoint::LOOK_EVERY) empty polls for the reply),
    /// `NotSent` (the request never left: the ring stayed full, or a call given up before
    /// did not settle in time) or `GivenUp`: its reply, if the peer still writes it, is
    /// discarded, and the request's slot is not written again until it comes or the peer
    /// has taken a later message (a send that would reuse it finds the ring `Full`
    /// meanwhile). One call at a time: a call after one given up first waits, within its
    /// own deadline, for that one to settle.
    /// `vmcall_proto::endpoint::LinkWatch::call_until`.
    #[inline(always)]
    pub fn call_until(
        &mut self,
        req: &Payload,
        reply: &mut Payload,
        deadline: u64,
    ) -> Result<CallEnd, ChannelError> {
        let (wake, number, rung) = (&self.wake, &self.number, &mut self.rung);
        self.link.call_until(
            &mut self.tx,
            &mut self.rx,
            req,
            reply,
            |tx| {
                if *wake {
                    notify(tx, *number, rung)
                }
            },
            core::hint::spin_loop,
            || crate::arch::rdtsc() >= deadline,
        )
    }

    /// Whether a call given up by [`Chan::call_until`] still holds its slot (its reply may
    /// still come).
    pub fn call_held(&self) -> bool {
        self.tx.call_held()
    }

    /// For a program that sends with [`Chan::try_send`] alone: after a `Full`, frees the
    /// slot a call given up holds if that call has settled (its late reply came, or the peer
    /// took a later message), so the next `try_send` can use it. Nothing otherwise.
    pub fn after_full(&mut self) -> Result<(), ChannelError> {
        self.link.after_full(&mut self.tx, &mut self.rx)
    }

    /// Answers requests until `handle` stops: the server's side of [`Chan::call`], what a
    /// program that answers its peer's requests should run (rather than a loop of
    /// [`Chan::recv`] and [`Chan::send`]). Waits for a request (polling, as `recv`, with
    /// every check of a receive), copies it once into a buffer of its own, and passes it to
    /// `handle`: `ControlFlow::Continue(reply)` sends `reply` (as `send`: the link look, a
    /// sleeping peer notified; the reply to a [`Chan::call`] goes into the request's slot)
    /// and waits for the next request; `Break(b)` returns `Ok(b)`
    /// and sends nothing for that request (a server that answers its last request before
    /// it stops sends that answer with `send`). One function for the whole loop
    /// (`vmcall_proto::endpoint::LinkWatch::serve`): the ring ends' state stays in
    /// registers from one request to the next.
    #[inline(always)]
    pub fn serve<B>(
        &mut self,
        handle: impl FnMut(&Payload) -> core::ops::ControlFlow<B, Payload>,
    ) -> Result<B, ChannelError> {
        let (wake, number, rung) = (&self.wake, &self.number, &mut self.rung);
        self.link.serve(
            &mut self.tx,
            &mut self.rx,
            handle,
            |tx| {
                if *wake {
                    notify(tx, *number, rung)
                }
            },
            core::hint::spin_loop,
        )
    }

    /// Sends, spinning while the ring is full (and, while it is, freeing the slot a call
    /// given up holds as soon as that call settles: [`Chan::call_until`]).
    #[inline(always)]
    pub fn send(&mut self, m: &Payload) -> Result<(), ChannelError> {
        loop {
            match self.try_send(m) {
                Err(ChannelError::Full) => {
                    self.full_spins += 1;
                    if self.tx.call_held() {
                        self.free_held()?;
                    }
                    core::hint::spin_loop()
                }
                other => return other,
            }
        }
    }

    /// A blocking send's wait on a ring full up to the slot of a call given up: frees the
    /// slot if that call has settled ([`LinkWatch::after_full`]); an error there (a forged
    /// word in the call's slot, a count the flow control refuses) ends the send with it.
    /// Out of line: sends that find room never come here.
    #[cold]
    #[inline(never)]
    fn free_held(&mut self) -> Result<(), ChannelError> {
        self.link.after_full(&mut self.tx, &mut self.rx)
    }

    /// The next message, `Ok(None)` if none yet. A message of this side's epoch is
    /// delivered without looking at the link (a dead peer's last messages come before
    /// `PeerGone`); a receive that finds nothing or an error looks, and reports a change.
    ///
    /// An empty poll is one load and one compare; every
    /// [`LOOK_EVERY`](vmcall_proto::endpoint::LOOK_EVERY)-th empty poll in a row also checks
    /// the slot's word (corruption) and the link, so a caller that polls learns of either
    /// within that many polls. Before sleeping, use [`Chan::try_recv_now`].
    #[inline(always)]
    pub fn try_recv(&mut self) -> Result<Option<Payload>, ChannelError> {
        self.link.try_recv(&mut self.rx)
    }

    /// [`Chan::try_recv`] with the full look (slot word and link) whenever the ring is
    /// empty: the last look before a sleep, so no death goes unnoticed by a sleeper.
    pub fn try_recv_now(&mut self) -> Result<Option<Payload>, ChannelError> {
        self.link.try_recv_now(&mut self.rx)
    }

    /// Receives, spinning until a message comes: each poll one load and one compare, the
    /// full look (the slot's word, the link) every
    /// [`LOOK_EVERY`](vmcall_proto::endpoint::LOOK_EVERY) empty polls
    /// (`vmcall_proto::endpoint::LinkWatch::recv`).
    #[inline(always)]
    pub fn recv(&mut self) -> Result<Payload, ChannelError> {
        let polls = &mut self.empty_polls;
        self.link.recv(&mut self.rx, || {
            *polls += 1;
            core::hint::spin_loop()
        })
    }

    /// Receives, waiting until the TSC passes `deadline` at the latest (`Ok(None)` then):
    /// polls `polls` times, then sleeps in HLT until a doorbell (this side says it sleeps,
    /// so the peer's send rings it: [`Chan::set_doorbells`] on the peer), any other
    /// interrupt, or the deadline (the virtual timer, armed once per call and cancelled at
    /// the end: at most two hypercalls), and repeats. Errors as [`Chan::try_recv`].
    pub fn recv_until(
        &mut self,
        polls: u32,
        deadline: u64,
    ) -> Result<Option<Payload>, ChannelError> {
        let mut armed = false;
        let r = loop {
            match self.poll_until(polls, deadline) {
                Ok(None) => {}
                other => break other,
            }
            let now = crate::arch::rdtsc();
            if now >= deadline {
                break Ok(None);
            }
            self.rx.set_sleeping(true);
            let again = self.try_recv_now();
            if let Ok(None) = again {
                if !armed {
                    armed = crate::timer::arm(deadline - now).is_ok();
                }
                if armed {
                    crate::arch::wait_for_interrupt();
                    self.idle_tsc += crate::arch::rdtsc().saturating_sub(now);
                }
            }
            self.rx.set_sleeping(false);
            match again {
                Ok(None) => {}
                other => break other,
            }
        };
        if armed {
            let _ = crate::timer::arm(0);
        }
        r
    }

    /// Polls up to `polls` times, stopping at `deadline`.
    fn poll_until(&mut self, polls: u32, deadline: u64) -> Result<Option<Payload>, ChannelError> {
        for _ in 0..polls {
            if let Some(m) = self.try_recv()? {
                return Ok(Some(m));
            }
            if crate::arch::rdtsc() >= deadline {
                break;
            }
            core::hint::spin_loop();
        }
        Ok(None)
    }

    /// Sends, spinning while the ring is full until the TSC passes `deadline`
    /// (`Err(Full)` then).
    pub fn send_until(&mut self, m: &Payload, deadline: u64) -> Result<(), ChannelError> {
        loop {
            match self.try_send(m) {
                Err(ChannelError::Full) if crate::arch::rdtsc() < deadline => {
                    self.link.after_full(&mut self.tx, &mut self.rx)?;
                    core::hint::spin_loop()
                }
                other => return other,
            }
        }
    }

    /// Polls up to `polls` times (none for 0) as [`Chan::recv`] does: the spin before a
    /// sleep.
    #[inline(always)]
    fn poll(&mut self, polls: u32) -> Result<Option<Payload>, ChannelError> {
        if polls == 0 {
            return Ok(None);
        }
        self.link.recv_within(&mut self.rx, polls, core::hint::spin_loop)
    }

    /// Makes [`Chan::wait`] sleep in MWAIT where the hypervisor offers it exitless
    /// (`mwait = true` for this guest: CPUID shows MONITOR); returns whether it does. Where
    /// not, waits stay on the doorbell (and this side rings it).
    pub fn use_mwait(&mut self) -> bool {
        self.mwait = crate::arch::has_monitor();
        if !self.mwait {
            self.doorbells = true;
        }
        self.wake = true;
        self.mwait
    }

    /// Doorbell mode on or off: a send rings a peer that says it sleeps, and
    /// [`Chan::wait`] sleeps until a doorbell (set it on both sides).
    pub fn set_doorbells(&mut self, on: bool) {
        self.doorbells = on;
        self.wake = on || self.mwait;
    }

    /// Whether this side is in doorbell mode.
    pub fn doorbells(&self) -> bool {
        self.doorbells
    }

    /// Whether waits sleep in MWAIT.
    pub fn mwait(&self) -> bool {
        self.mwait
    }

    /// Polls `polls` times, then sleeps until a doorbell (or any interrupt) and repeats.
    /// With [`Chan::use_mwait`], sleeps in MWAIT on the line the next message lands in
    /// instead (see [`Chan::wait_mwait`]): the sender's store wakes it, neither side exits
    /// (the doorbell only as a backstop for a monitor that missed it).
    pub fn wait(&mut self, polls: u32) -> Result<Payload, ChannelError> {
        if self.mwait {
            return self.wait_mwait(polls);
        }
        loop {
            if let Some(m) = self.poll(polls)? {
                return Ok(m);
            }
            self.rx.set_sleeping(true);
            let again = self.try_recv_now();
            if let Ok(None) = again {
                crate::arch::wait_for_interrupt();
            }
            self.rx.set_sleeping(false);
            if let Some(m) = again? {
                return Ok(m);
            }
        }
    }

    /// The MWAIT wait: after `polls` polls, repeat: say `SLEEP_MWAIT` in the ring's
    /// `sleeping` word (store, full fence), arm (MONITOR on the next slot's line), check
    /// (the ring once more), sleep (MWAIT, interrupts on), clear the word, look again;
    /// until a message or an error.
    ///
    /// Why no interleaving loses a wake-up. The sender publishes (control store), then
    /// fences and reads `sleeping` ([`notify`]); the receiver stores `sleeping`, fences,
    /// then arms and checks. The two full fences (Dekker; SDM Vol. 3A 8.2.3.4 forbids
    /// reordering a load before an earlier store once MFENCE separates them) leave two
    /// cases. (1) The sender reads 0: the receiver's next flag store comes after the
    /// publication, so the check after it sees the message (and a look before it either
    /// sees it or finds the ring empty and loops to that store): it returns without
    /// sleeping on it. (2) The sender reads `SLEEP_MWAIT`: the receiver may be anywhere
    /// in its loop. The SDM's monitor (Vol. 2B MONITOR/MWAIT, Vol. 3A 8.10.4) then wakes it: a
    /// store to the armed line after MONITOR triggers it, MWAIT on a triggered monitor
    /// returns at once, and a store before MONITOR is seen by the check after it; a wake
    /// for any other reason (an interrupt, a VM exit, spuriously) just runs the loop
    /// again. But the sender does not rely on it: it waits until the flag changes (the
    /// receiver is up, and looks at the ring after clearing it, so after the publication)
    /// and otherwise rings the doorbell after [`WAKE_TICKS`]; the doorbell is an interrupt,
    /// and MWAIT (after STI) wakes on it whatever the monitor did, and a doorbell that
    /// comes before the MWAIT stays pending and ends it at once. So the monitor decides
    /// only how fast the receiver wakes, never whether it does.
    ///
    /// Why the backstop is needed: Bochs 2.7's monitor has three defects, seen here. (A)
    /// MONITOR arms the physical address of the last translation the CPU made on a TLB
    /// *miss* (`address_xlation.paddress1`; `tickle_read_linear` does not set it on a hit),
    /// which can be another line than the requested one (read in its source, not seen
    /// here: our sender's INVLPG of a 2-MiB page happened to force the miss): hence the
    /// INVLPG before MONITOR, which makes it miss. (B) MONITOR on any CPU invalidates a TLB
    /// entry on every CPU, and that disarms every CPU's monitor without waking one already
    /// in MWAIT (`TLB_invlpg` calls `reset_monitor`): with several pairs of guests, a
    /// sleeper's monitor is cleared by another pair's MONITOR and the reply's store finds
    /// nothing armed (issue 21: with three pairs on six cores every pair lost one of its
    /// first two wake-ups; one MWAIT pair beside two polling pairs lost none). No order of
    /// the receiver's own steps can prevent that, so the doorbell backstop is what keeps
    /// the wake-up. (C) A sender whose TLB holds a direct pointer to the page stores
    /// without the monitor check ([`nudge_monitor`]). Bochs fixed (A) and (B) after
    /// 2.7 (upstream commit b8f38eb8d: a TLB invalidation wakes the CPU instead).
    fn wait_mwait(&mut self, polls: u32) -> Result<Payload, ChannelError> {
        if let Some(m) = self.poll(polls)? {
            return Ok(m);
        }
        loop {
            self.rx.set_sleep(SLEEP_MWAIT);
            let line = self.rx.next_line();
            // Defect (A): make MONITOR translate `line` afresh instead of reusing a stale
            // translation (in Bochs this also resets our own monitor, armed next).
            crate::arch::invlpg(line);
            // The line is a slot of our receive ring, mapped for the guest's life.
            // SAFETY: `use_mwait` found MONITOR offered; the line is mapped.
            unsafe { crate::arch::monitor(line) };
            let first = self.try_recv_now();
            if let Ok(None) = first {
                // Woken by the store into the line, by the doorbell (the backstop, or a
                // peer going down: the hypervisor injects the doorbell vector), or by
                // anything else.
                // SAFETY: `use_mwait` found MWAIT offered.
                unsafe { crate::arch::mwait() };
            }
            // Up: say so at once (a sender waiting to see us awake stops waiting; we look
            // after this store, so we find what it published), then look. Woken by the
            // store (the usual case) the message is there: no MONITOR on the round trip,
            // and none to clear the other cores' monitors (defect B).
            self.rx.set_sleep(0);
            match first {
                Ok(Some(m)) => return Ok(m),
                Err(e) => return Err(e),
                Ok(None) => {}
            }
            if let Some(m) = self.try_recv_now()? {
                return Ok(m);
            }
        }
    }
}

/// After publishing a message on `tx` (channel `number`): wake the peer if it said it
/// sleeps. A doorbell sleeper is rung at once. An MWAIT sleeper was armed on the line just
/// written (its flag came first, see [`Chan::wait_mwait`]), so the store normally woke it:
/// wait until it shows it is up (its flag changes) and ring only if it has not within
/// [`WAKE_TICKS`]. Counts the doorbells rung in `rung`. (A function of the sender alone,
/// not of the whole `Chan`: a send calls it with the state it needs, and the rest of the
/// `Chan` need not be in memory for it.)
#[inline(never)]
fn notify(tx: &Sender<'_>, number: usize, rung: &mut u64) {
    match tx.peer_sleep() {
        0 => {}
        SLEEP_MWAIT => {
            nudge_monitor(tx);
            let t0 = crate::arch::rdtsc();
            while tx.peer_sleep_now() == SLEEP_MWAIT {
                if crate::arch::rdtsc().wrapping_sub(t0) > WAKE_TICKS {
                    ring(number, rung);
                    return;
                }
                core::hint::spin_loop();
            }
        }
        _ => ring(number, rung),
    }
}

fn ring(number: usize, rung: &mut u64) {
    let _ = call(Hypercall::Doorbell, number as u64, 0);
    *rung += 1;
}

/// After a send, when the peer sleeps in MWAIT: drop our TLB entry for the message's
/// page and store its control word once more. Needed in Bochs 2.7 only (defect C in
/// [`Chan::wait_mwait`]): its MONITOR invalidates the other CPUs' TLB entries at the
/// monitored *physical* address taken as a linear one (`invlpg(paddr)` in its
/// cpu/mwait.cc), so a peer whose TLB still holds a direct pointer to the page (any
/// linear address under EPT) stores without the monitor check. After INVLPG our next
/// store refills the entry, Bochs refuses a direct pointer to a monitored page, and the
/// store goes through the monitor check. On hardware the monitor sees every store
/// through cache coherence and this is a wasted TLB refill and store.
fn nudge_monitor(tx: &Sender<'_>) {
    crate::arch::invlpg(tx.last_line());
    tx.restore_last();
}

/// The MWAIT wait ([`Chan::wait_mwait`]) and the sender's [`notify`] as a state
/// machine, explored exhaustively: every interleaving of the receiver's steps (flag, arm,
/// check, sleep) with the sender's (publish, read the flag, wait or ring), under sequential
/// consistency (the full fence on each side gives it for the flag and the control word),
/// against a monitor as good as the SDM's or as bad as Bochs 2.7's: a store that may miss it
/// (defects A and C) and a disarm, without a wake, at any moment (defect B). A lost wake-up
/// is a reachable state where the sender is done and the receiver sleeps with nothing left
/// to wake it. The seeded variants (the old design without the flag, the flag without the
/// doorbell backstop) must be found losing one, or the model proves nothing.
#[cfg(test)]
mod wake_model {
    use std::collections::{HashSet, VecDeque};

    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    enum R {
        Flag,
        Arm,
        Check,
        Mwait,
        Asleep,
        Up,
        Look,
        Done,
    }

    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    enum S {
        Publish,
        ReadFlag,
        Spin,
        Done,
    }

    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    struct St {
        r: R,
        s: S,
        msg: bool,
        flag: bool,
        armed: bool,
        triggered: bool,
        bell: bool,
    }

    #[derive(Clone, Copy)]
    struct Design {
        /// The receiver says `SLEEP_MWAIT` before it arms (the old design did not).
        flag: bool,
        /// A sender that still sees the flag rings the doorbell.
        backstop: bool,
    }

    #[derive(Clone, Copy)]
    struct Monitor {
        /// A store into the armed line may fail to trigger it (Bochs defects A and C).
        misses: bool,
        /// It may be disarmed at any moment without waking the sleeper (Bochs defect B).
        forgets: bool,
    }

    fn next(d: Design, m: Monitor, st: St) -> Vec<St> {
        let mut out = Vec::new();
        let mut r = st;
        match st.r {
            R::Flag => {
                r.flag = d.flag;
                r.r = R::Arm;
                out.push(r);
            }
            R::Arm => {
                (r.armed, r.triggered, r.r) = (true, false, R::Check);
                out.push(r);
            }
            R::Check if st.msg => {
                (r.flag, r.r) = (false, R::Done);
                out.push(r);
            }
            R::Check => {
                r.r = R::Mwait;
                out.push(r);
            }
            // MWAIT returns at once on a monitor that triggered or is not armed, or on a
            // pending interrupt (the doorbell, taken); then the receiver clears its flag
            // and looks, and arms again if the ring is empty.
            R::Mwait if st.triggered || !st.armed || st.bell => {
                (r.bell, r.r) = (false, R::Up);
                out.push(r);
            }
            R::Mwait => {
                r.r = R::Asleep;
                out.push(r);
            }
            R::Asleep if st.triggered || st.bell => {
                (r.bell, r.r) = (false, R::Up);
                out.push(r);
            }
            R::Up => {
                (r.flag, r.r) = (false, R::Look);
                out.push(r);
            }
            R::Look => {
                r.r = if st.msg { R::Done } else { R::Flag };
                out.push(r);
            }
            R::Asleep | R::Done => {}
        }
        let mut s = st;
        match st.s {
            S::Publish => {
                (s.msg, s.s) = (true, S::ReadFlag);
                if st.armed {
                    let mut woke = s;
                    (woke.triggered, woke.armed) = (true, false);
                    out.push(woke);
                    if m.misses {
                        out.push(s);
                    }
                } else {
                    out.push(s);
                }
            }
            S::ReadFlag => {
                s.s = if st.flag && d.backstop { S::Spin } else { S::Done };
                out.push(s);
            }
            // Waits while the flag stays (a stutter, not a state); the flag cleared: done;
            // still set at the deadline: rings.
            S::Spin => {
                if st.flag {
                    s.bell = true;
                }
                s.s = S::Done;
                out.push(s);
            }
            S::Done => {}
        }
        if m.forgets && st.armed {
            let mut f = st;
            f.armed = false;
            out.push(f);
        }
        out
    }

    /// A reachable lost wake-up, if any.
    fn lost_wake_up(d: Design, m: Monitor) -> Option<St> {
        let start = St {
            r: R::Flag,
            s: S::Publish,
            msg: false,
            flag: false,
            armed: false,
            triggered: false,
            bell: false,
        };
        let (mut seen, mut todo) = (HashSet::from([start]), VecDeque::from([start]));
        while let Some(st) = todo.pop_front() {
            if st.s == S::Done && st.r == R::Asleep && !st.triggered && !st.bell {
                return Some(st);
            }
            for n in next(d, m, st) {
                if seen.insert(n) {
                    todo.push_back(n);
                }
            }
        }
        assert!(seen.iter().any(|s| s.r == R::Done), "the receiver can finish");
        None
    }

    const SDM: Monitor = Monitor { misses: false, forgets: false };
    const BOCHS: Monitor = Monitor { misses: true, forgets: true };

    #[test]
    fn the_flag_and_the_backstop_lose_no_wake_up_even_with_bochs_monitor() {
        let d = Design { flag: true, backstop: true };
        for m in [SDM, Monitor { misses: true, forgets: false }, BOCHS] {
            assert_eq!(lost_wake_up(d, m), None);
        }
    }

    #[test]
    fn arm_check_sleep_alone_is_sound_on_the_sdm_monitor_only() {
        let old = Design { flag: false, backstop: false };
        assert_eq!(lost_wake_up(old, SDM), None);
        for m in [BOCHS, Monitor { misses: false, forgets: true }] {
            assert!(lost_wake_up(old, m).is_some(), "seeded: the old design on Bochs");
        }
        let no_backstop = Design { flag: true, backstop: false };
        assert!(lost_wake_up(no_backstop, BOCHS).is_some(), "seeded: no doorbell backstop");
    }
}
