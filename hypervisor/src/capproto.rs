// SPDX-License-Identifier: MIT OR Apache-2.0
//! Capability transfer and revocation across cores: a protocol between the per-core
//! hypervisor instances over `xcore` rings. Each core owns its guest's capability space;
//! no core ever reads or writes another's.
//!
//! * **Transfer.** The sender's core checks the source cap and the endpoint, takes the cap
//!   out (move: unmapping it first) or derives the copy, and sends `INSERT` to the peer's
//!   core, which checks that the channel really joins the two guests, inserts the cap into
//!   its guest's space under a fresh id and replies with the slot and id. A copy is recorded
//!   as a child (core, id) of its source; a failed move puts the cap back.
//! * **Revoke.** The holder's core takes the children list of the cap and sends `REVOKE`
//!   (by id) to every child's core at once, then waits for all replies. A core receiving
//!   `REVOKE` tombstones the cap (a stale slot then reads `Revoked`), unmaps it from its
//!   guest's EPT and runs INVEPT, revokes that cap's own children the same way (depth
//!   first), and only then replies. So when `cap_revoke` returns, every copy derived from the
//!   cap is gone and no core can still translate to it.
//!
//! Why it is safe. Nothing waits without serving: a core waiting for a reply keeps handling
//! requests (and stashes replies meant for an outer wait), so two revokes racing in opposite
//! directions, or a revoke meeting a transfer, each make progress. Revoke is idempotent per
//! id (`revoke_id` of a missing id answers 0), so racing revokes of overlapping trees
//! cannot double-free or fail. A core whose guest was stopped or has exited keeps serving its
//! inbox (its guest's caps are still revoked and unmapped; inserts are refused with
//! `PeerGone`), so a revoke never waits on a dead guest. The order "unmap, INVEPT, then
//! reply" is what makes "before revoke returns" true: the revoker resumes its guest only
//! after every affected core has flushed its translations.

use crate::exits::{GuestCtx, Vcpu};
use crate::xcore::{header, op, op_of, req_of};
use vmcall_proto::caps::{Cap, CapType, Child, Rights, MAX_CHILDREN};
use vmcall_proto::channel::Payload;
use vmcall_proto::hypercall::HvError;

/// How many send attempts before a ring is considered dead (the peer never drains it).
const SEND_TRIES: u32 = 10_000_000;

fn next_req(ctx: &mut GuestCtx) -> u32 {
    ctx.next_req = ctx.next_req.wrapping_add(1);
    ctx.next_req
}

/// Sends `m` to `to`, serving our own inbox while the ring is full; then kicks `to`.
fn send(ctx: &mut GuestCtx, v: &mut impl Vcpu, to: usize, m: &Payload) -> Result<(), HvError> {
    for _ in 0..SEND_TRIES {
        if v.x_send(to, m) {
            v.x_kick(to);
            return Ok(());
        }
        serve(ctx, v);
        crate::arch::pause();
    }
    log::error!("inter-core ring to core {to} never drained");
    Err(HvError::PeerGone)
}

fn is_reply(m: &Payload) -> bool {
    matches!(op_of(m), op::INSERT_REPLY | op::REVOKE_REPLY)
}

fn stash(ctx: &mut GuestCtx, from: usize, m: Payload) {
    match ctx.stash.iter_mut().find(|s| s.is_none()) {
        Some(s) => *s = Some((from, m)),
        None => log::error!("reply stash full; reply from core {from} dropped"),
    }
}

/// Waits for the reply to request `req` sent to `from`, serving everything else meanwhile.
fn wait_reply(ctx: &mut GuestCtx, v: &mut impl Vcpu, from: usize, req: u32) -> Payload {
    loop {
        if let Some(i) = ctx
            .stash
            .iter()
            .position(|s| matches!(s, Some((f, m)) if *f == from && req_of(m) == req))
        {
            return ctx.stash[i].take().map(|(_, m)| m).unwrap_or_default();
        }
        match v.x_recv() {
            Some((f, m)) if is_reply(&m) => {
                if f == from && req_of(&m) == req {
                    return m;
                }
                stash(ctx, f, m);
            }
            Some((f, m)) => handle_request(ctx, v, f, &m),
            None => crate::arch::pause(),
        }
    }
}

/// Handles every request waiting in this core's inbox.
pub fn serve(ctx: &mut GuestCtx, v: &mut impl Vcpu) {
    while let Some((from, m)) = v.x_recv() {
        if is_reply(&m) {
            stash(ctx, from, m);
        } else {
            handle_request(ctx, v, from, &m);
        }
    }
}

fn reply(ctx: &mut GuestCtx, v: &mut impl Vcpu, to: usize, m: Payload) {
    if send(ctx, v, to, &m).is_err() {
        log::error!("could not reply to core {to}");
    }
}

fn handle_request(ctx: &mut GuestCtx, v: &mut impl Vcpu, from: usize, m: &Payload) {
    let req = req_of(m);
    match op_of(m) {
        op::INSERT => {
            let result = insert_from(ctx, from, m);
            let (code, id) = match result {
                Ok((slot, id)) => (slot as u64, id),
                Err(e) => (e.to_rax(), 0),
            };
            reply(ctx, v, from, [header(op::INSERT_REPLY, req), code, id, 0, 0, 0, 0]);
        }
        op::REVOKE => {
            let n = match ctx.caps.revoke_id(m[1]) {
                Some(c) => {
                    if let Some(gpa) = c.mapped_at {
                        let _ = v.ept_unmap(gpa, c.size);
                    }
                    let mut children = [None; MAX_CHILDREN];
                    for (dst, ch) in children.iter_mut().zip(c.children()) {
                        *dst = Some(ch);
                    }
                    1 + revoke_children(ctx, v, &children)
                }
                None => 0,
            };
            ctx.revoked_here = ctx.revoked_here.saturating_add(n);
            reply(ctx, v, from, [header(op::REVOKE_REPLY, req), n, 0, 0, 0, 0, 0]);
        }
        other => log::error!("unknown inter-core message {other} from core {from}"),
    }
}

/// Checks an `INSERT` against this core's own view (the channel must join us and `from`)
/// and inserts the cap.
fn insert_from(ctx: &mut GuestCtx, from: usize, m: &Payload) -> Result<(u32, u64), HvError> {
    if ctx.ended {
        return Err(HvError::PeerGone);
    }
    let joined = ctx.chan_peers[..ctx.chan_count]
        .iter()
        .any(|&(idx, peer)| idx as u64 == m[5] && peer == Some(from));
    if !joined {
        return Err(HvError::BadArgument);
    }
    let kind = match m[1] {
        1 => CapType::Memory,
        2 => CapType::Endpoint,
        _ => return Err(HvError::WrongType),
    };
    let rights = u8::try_from(m[2]).ok().and_then(Rights::from_bits).ok_or(HvError::BadArgument)?;
    Ok(ctx.caps.insert(Cap::new(kind, rights, m[3], m[4]))?)
}

/// Sends `REVOKE` for every child, then collects every reply: the total revoked.
fn revoke_children(
    ctx: &mut GuestCtx,
    v: &mut impl Vcpu,
    children: &[Option<Child>; MAX_CHILDREN],
) -> u64 {
    let mut pending = [None; MAX_CHILDREN];
    for (p, ch) in pending.iter_mut().zip(children.iter()) {
        let Some(ch) = ch else { continue };
        let req = next_req(ctx);
        let core = ch.core as usize;
        if send(ctx, v, core, &[header(op::REVOKE, req), ch.id, 0, 0, 0, 0, 0]).is_ok() {
            *p = Some((core, req));
        }
    }
    let mut n = 0;
    for (core, req) in pending.into_iter().flatten() {
        n += wait_reply(ctx, v, core, req)[1];
    }
    n
}

/// `cap_transfer(slot, endpoint_slot, mode)`.
pub fn transfer(
    ctx: &mut GuestCtx,
    v: &mut impl Vcpu,
    slot: u64,
    ep_slot: u64,
    mode: u64,
) -> Result<u64, HvError> {
    let ep = *ctx.caps.get(ep_slot)?;
    if ep.kind != CapType::Endpoint {
        return Err(HvError::WrongType);
    }
    let peer = ctx.chan_peers[..ctx.chan_count]
        .iter()
        .find(|(idx, _)| *idx as u64 == ep.base)
        .and_then(|(_, p)| *p)
        .ok_or(HvError::PeerGone)?;
    if mode & !0xff01 != 0 {
        return Err(HvError::BadArgument);
    }
    let copy = mode & 1 == 1;
    let cap = if copy {
        let rights = Rights::from_bits((mode >> 8) as u8).ok_or(HvError::BadArgument)?;
        ctx.caps.copy_of(slot, rights)?
    } else {
        let c = *ctx.caps.get(slot)?;
        if !c.rights.contains(Rights::GRANT) {
            return Err(HvError::RightsEscalation);
        }
        if c.children().next().is_some() {
            return Err(HvError::HasCopies);
        }
        if let Some(gpa) = c.mapped_at {
            v.ept_unmap(gpa, c.size)?;
            ctx.caps.unmap(slot)?;
        }
        ctx.caps.take_for_move(slot)?
    };
    let req = next_req(ctx);
    let msg = [
        header(op::INSERT, req),
        cap.kind as u64,
        cap.rights.bits() as u64,
        cap.base,
        cap.size,
        ep.base,
        0,
    ];
    let sent = send(ctx, v, peer, &msg);
    let answer = sent.map(|()| wait_reply(ctx, v, peer, req));
    let (code, id) = match answer {
        Ok(r) => (r[1], r[2]),
        Err(e) => (e.to_rax(), 0),
    };
    match HvError::from_rax(code) {
        Ok(new_slot) => {
            if copy {
                ctx.caps.add_child(slot, Child { core: peer as u16, id })?;
            }
            ctx.transfers = ctx.transfers.saturating_add(1);
            Ok(new_slot)
        }
        Err(e) => {
            if !copy {
                // The move did not happen: the cap comes back (unmapped).
                let _ = ctx.caps.insert(cap);
            }
            Err(e.unwrap_or(HvError::PeerGone))
        }
    }
}

/// `cap_revoke(slot)`.
pub fn revoke(ctx: &mut GuestCtx, v: &mut impl Vcpu, slot: u64) -> Result<u64, HvError> {
    let children = ctx.caps.take_children(slot)?;
    Ok(revoke_children(ctx, v, &children))
}

#[cfg(test)]
mod tests {
    //! The protocol on real threads: one thread per "core", each owning its guest context;
    //! messages travel over std channels. The hypercalls go through the real dispatcher.
    use super::*;
    use crate::arch::vmx::GuestRegs;
    use crate::exits::{handle, Action, ConsoleSink, Event, Field, VmExit};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::{Arc, Mutex};
    use vmcall_proto::caps::Cap;

    /// What each core's guest has mapped in its EPT, visible to the test afterwards.
    type Maps = Arc<Mutex<Vec<(u64, u64)>>>;

    struct TestVcpu {
        regs: GuestRegs,
        inbox: Receiver<(usize, Payload)>,
        peers: Vec<Sender<(usize, Payload)>>,
        me: usize,
        maps: Maps,
    }

    impl Vcpu for TestVcpu {
        fn regs(&mut self) -> &mut GuestRegs {
            &mut self.regs
        }
        fn read(&mut self, _f: Field) -> u64 {
            0
        }
        fn write(&mut self, _f: Field, _v: u64) {}
        fn inject(&mut self, e: Event) {
            panic!("unexpected injection {e:?}");
        }
        fn set_interrupt_window(&mut self, _on: bool) {}
        fn read_guest(&mut self, _gpa: u64, _buf: &mut [u8]) -> Result<(), HvError> {
            Err(HvError::BadAddress)
        }
        fn host_cpuid(&mut self, _l: u32, _s: u32) -> [u32; 4] {
            [0; 4]
        }
        fn now(&mut self) -> u64 {
            0
        }
        fn send_ipi(&mut self, _apic: u32, _vector: u8) {}
        fn ept_map(&mut self, gpa: u64, _hpa: u64, size: u64, _write: bool) -> Result<(), HvError> {
            self.maps.lock().unwrap().push((gpa, size));
            Ok(())
        }
        fn ept_unmap(&mut self, gpa: u64, size: u64) -> Result<(), HvError> {
            let mut m = self.maps.lock().unwrap();
            let i = m.iter().position(|&x| x == (gpa, size)).ok_or(HvError::NotMapped)?;
            m.remove(i);
            Ok(())
        }
        fn x_send(&mut self, to: usize, m: &Payload) -> bool {
            self.peers[to].send((self.me, *m)).is_ok()
        }
        fn x_recv(&mut self) -> Option<(usize, Payload)> {
            self.inbox.try_recv().ok()
        }
        fn x_kick(&mut self, _to: usize) {}
    }

    struct NoConsole;
    impl ConsoleSink for NoConsole {
        fn line(&mut self, _t: &str) {}
    }

    /// `n` cores all joined by channels (channel k joins cores a and b as listed), each with
    /// one 64 KiB memory cap in slot 0 and endpoint caps from slot 1 in channel order.
    fn cores(n: usize, channels: &[(usize, usize)]) -> Vec<(GuestCtx, TestVcpu, Maps)> {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| channel()).unzip();
        let mut out = Vec::new();
        for (me, inbox) in rxs.into_iter().enumerate() {
            let mut ctx = GuestCtx::new(me as u32, me as u32, 16, 1, u64::MAX);
            ctx.caps
                .insert(Cap::new(
                    CapType::Memory,
                    Rights::all(),
                    0x100_0000 * (me as u64 + 1),
                    0x1_0000,
                ))
                .unwrap();
            for (k, &(a, b)) in channels.iter().enumerate() {
                let peer = if a == me {
                    b
                } else if b == me {
                    a
                } else {
                    continue;
                };
                ctx.caps
                    .insert(Cap::new(CapType::Endpoint, Rights::READ | Rights::WRITE, k as u64, 0))
                    .unwrap();
                ctx.chan_peers[ctx.chan_count] = (k as u32, Some(peer));
                ctx.chan_count += 1;
            }
            let maps = Maps::default();
            let v = TestVcpu {
                regs: GuestRegs::default(),
                inbox,
                peers: txs.clone(),
                me,
                maps: maps.clone(),
            };
            out.push((ctx, v, maps));
        }
        out
    }

    fn hypercall(
        ctx: &mut GuestCtx,
        v: &mut TestVcpu,
        nr: u64,
        a: u64,
        b: u64,
        d: u64,
    ) -> Result<u64, HvError> {
        v.regs = GuestRegs { rax: nr, rdi: a, rsi: b, rdx: d, ..Default::default() };
        let e = VmExit { reason: 18, instruction_len: 3, ..VmExit::default() };
        assert_eq!(handle(ctx, v, &e, &mut NoConsole), Action::Resume);
        HvError::from_rax(v.regs.rax).map_err(|e| e.unwrap())
    }

    /// Runs `work` on each core's thread; a core whose work is done keeps serving until all
    /// are done (as a real core keeps serving after its guest ended).
    fn run(
        cores: Vec<(GuestCtx, TestVcpu, Maps)>,
        work: fn(usize, &mut GuestCtx, &mut TestVcpu),
    ) -> Vec<GuestCtx> {
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = cores.len();
        let stop = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = cores
            .into_iter()
            .enumerate()
            .map(|(i, (mut ctx, mut v, _))| {
                let (done, stop) = (done.clone(), stop.clone());
                std::thread::spawn(move || {
                    work(i, &mut ctx, &mut v);
                    if done.fetch_add(1, Ordering::SeqCst) + 1 == n {
                        stop.store(true, Ordering::SeqCst);
                    }
                    while !stop.load(Ordering::SeqCst) {
                        serve(&mut ctx, &mut v);
                        std::thread::yield_now();
                    }
                    serve(&mut ctx, &mut v);
                    ctx
                })
            })
            .collect();
        // A protocol that never finishes must fail the test, not hang it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !handles.iter().all(|h| h.is_finished()) {
            assert!(std::time::Instant::now() < deadline, "the protocol did not finish in 60 s");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        handles.into_iter().map(|h| h.join().expect("core thread")).collect()
    }

    #[test]
    fn copies_to_two_cores_are_revoked_everywhere() {
        let cs = cores(3, &[(0, 1), (0, 2)]);
        let maps: Vec<Maps> = cs.iter().map(|c| c.2.clone()).collect();
        static SLOTS: Mutex<Vec<u64>> = Mutex::new(Vec::new());
        let ctxs = run(cs, |i, ctx, v| {
            if i == 0 {
                // Copy read-only to cores 1 and 2 (endpoint slots 1 and 2).
                let s1 = hypercall(ctx, v, 12, 0, 1, 1 | 1 << 8).unwrap();
                let s2 = hypercall(ctx, v, 12, 0, 2, 1 | 1 << 8).unwrap();
                SLOTS.lock().unwrap().extend([s1, s2]);
                // A forged endpoint and a memory cap used as one.
                assert_eq!(hypercall(ctx, v, 12, 0, 9, 1 | 1 << 8), Err(HvError::NoSuchSlot));
                assert_eq!(hypercall(ctx, v, 12, 0, 0, 1 | 1 << 8), Err(HvError::WrongType));
                // Give the holders time to map their copies, then revoke.
                std::thread::sleep(std::time::Duration::from_millis(50));
                assert_eq!(hypercall(ctx, v, 13, 0, 0, 0), Ok(2));
            } else {
                // Wait for the copy to arrive (serving), map it read-only.
                let slot = loop {
                    serve(ctx, v);
                    if let Some((s, _)) = ctx
                        .caps
                        .live()
                        .find(|(_, c)| c.kind == CapType::Memory && c.rights == Rights::READ)
                    {
                        break s as u64;
                    }
                    std::thread::yield_now();
                };
                assert_eq!(hypercall(ctx, v, 10, slot, 0xc000_0000, 1), Ok(0));
                assert_eq!(
                    hypercall(ctx, v, 10, slot, 0xc010_0000, 3),
                    Err(HvError::RightsEscalation)
                );
                assert_eq!(
                    hypercall(ctx, v, 10, slot, 0xc010_0000, 1),
                    Err(HvError::AlreadyMapped)
                );
            }
        });
        // Every copy is gone: tombstoned slots, no mapping left on cores 1 and 2.
        for (i, ctx) in ctxs.iter().enumerate().skip(1) {
            assert!(
                ctx.caps.live().all(|(_, c)| c.kind != CapType::Memory || c.rights != Rights::READ),
                "core {i}"
            );
            assert!(maps[i].lock().unwrap().is_empty(), "core {i} still maps a revoked copy");
        }
        assert_eq!(ctxs[0].caps.get(0).unwrap().children().count(), 0);
    }

    #[test]
    fn racing_revokes_in_opposite_directions_finish() {
        // Both cores meet here, serving while they wait, once each holds the other's copy.
        static READY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        for _ in 0..50 {
            READY.store(0, Ordering::SeqCst);
            let cs = cores(2, &[(0, 1)]);
            let ctxs = run(cs, |i, ctx, v| {
                let _ = i;
                hypercall(ctx, v, 12, 0, 1, 1 | 1 << 8).unwrap();
                // Wait until the peer's copy has arrived here too, then revoke at once.
                loop {
                    serve(ctx, v);
                    if ctx
                        .caps
                        .live()
                        .any(|(_, c)| c.kind == CapType::Memory && c.rights == Rights::READ)
                    {
                        break;
                    }
                    std::thread::yield_now();
                }
                READY.fetch_add(1, Ordering::SeqCst);
                while READY.load(Ordering::SeqCst) < 2 {
                    serve(ctx, v);
                    std::thread::yield_now();
                }
                assert_eq!(hypercall(ctx, v, 13, 0, 0, 0), Ok(1));
            });
            for ctx in &ctxs {
                // Own region kept, the peer's copy revoked.
                assert!(ctx.caps.get(0).is_ok());
                assert_eq!(ctx.caps.live().count(), 2, "own region and the endpoint");
            }
        }
    }
}
