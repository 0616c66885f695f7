// SPDX-License-Identifier: MIT OR Apache-2.0
//! Messages between hypervisor instances. Each ordered pair of cores has one ring (the same
//! `vmcall_proto::channel` ring guests use) in hypervisor memory: core `a` is the only
//! producer of ring `[a][b]`, core `b` its only consumer. A message is followed by an NMI
//! to the target core: a running guest takes an NMI exit, a core in the hypervisor takes
//! the NMI through its IDT (which just returns); either way the core looks at its inbox
//! before it next enters its guest or while it waits for a reply. Nothing else is shared
//! between cores on these paths: no lock, no table another core writes. What travels here
//! (the capability protocol) is defined in `caps::proto`; this module only carries it.

use crate::percpu::MAX_CORES;
use core::cell::UnsafeCell;
use vmcall_proto::channel::{self, Payload, Receiver, Ring, Sender};

/// Slots per inter-core ring: what the capability protocol's flow control needs.
pub const SLOTS: u32 = crate::caps::proto::RING_SLOTS;
const RING_BYTES: usize = channel::ring_bytes(SLOTS) as usize;

#[repr(C, align(64))]
struct RingMem(UnsafeCell<[u8; RING_BYTES]>);
// SAFETY: ring memory is only accessed through the ring's atomics, by its one producer
// and its one consumer.
unsafe impl Sync for RingMem {}

static RINGS: [[RingMem; MAX_CORES]; MAX_CORES] =
    [const { [const { RingMem(UnsafeCell::new([0; RING_BYTES])) }; MAX_CORES] }; MAX_CORES];

/// Core index to APIC id, written once by the BSP before any AP starts, read-only after:
/// replicated configuration, not shared state.
static APIC_OF: spin::Once<([u32; MAX_CORES], usize)> = spin::Once::new();

pub fn publish_cores(apics: &[u32]) {
    APIC_OF.call_once(|| {
        let mut t = [0; MAX_CORES];
        t[..apics.len()].copy_from_slice(apics);
        (t, apics.len())
    });
}

fn ring(from: usize, to: usize) -> Ring<'static> {
    // SAFETY: static, 64-byte aligned, RING_BYTES long, accessed only through the ring.
    unsafe { Ring::from_raw(RINGS[from][to].0.get() as *mut u8, SLOTS) }
}

/// One core's ends of all its rings, and its counters. Lives in the core's guest context.
pub struct Link {
    me: usize,
    tx: [Option<Sender<'static>>; MAX_CORES],
    rx: [Option<Receiver<'static>>; MAX_CORES],
    next_from: usize,
    pub sent: u64,
    pub received: u64,
    pub nmis: u64,
}

impl Link {
    pub fn new(me: usize) -> Self {
        Link {
            me,
            tx: [const { None }; MAX_CORES],
            rx: [const { None }; MAX_CORES],
            next_from: 0,
            sent: 0,
            received: 0,
            nmis: 0,
        }
    }

    fn cores(&self) -> usize {
        APIC_OF.get().map_or(0, |t| t.1)
    }

    /// Puts `m` on the ring to `to`. `false` if it is full (the caller serves its own
    /// inbox and retries: the peer is doing the same, so rings drain).
    pub fn try_send(&mut self, to: usize, m: &Payload) -> bool {
        if to >= self.cores() || to == self.me {
            return false;
        }
        let me = self.me;
        let tx = self.tx[to].get_or_insert_with(|| Sender::new(ring(me, to)));
        let ok = tx.try_send(m).is_ok();
        self.sent += ok as u64;
        ok
    }

    /// Sends an NMI to core `to`.
    pub fn kick(&mut self, to: usize) {
        if let Some((t, n)) = APIC_OF.get() {
            if to < *n {
                crate::arch::apic::send_nmi(t[to]);
                self.nmis += 1;
            }
        }
    }

    /// The next message from any core (round robin), with its sender.
    pub fn try_recv(&mut self) -> Option<(usize, Payload)> {
        let n = self.cores();
        for k in 0..n {
            let from = (self.next_from + k) % n;
            if from == self.me {
                continue;
            }
            let me = self.me;
            let rx = self.rx[from].get_or_insert_with(|| Receiver::new(ring(from, me), 1));
            match rx.try_recv() {
                Ok(Some(m)) => {
                    self.next_from = (from + 1) % n;
                    self.received += 1;
                    return Some((from, m));
                }
                Ok(None) => {}
                Err(e) => log::error!("inter-core ring from core {from} is corrupt: {e:?}"),
            }
        }
        None
    }
}
