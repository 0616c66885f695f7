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
