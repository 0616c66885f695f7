//! A guest kernel for mkvisor: one entry function that gets the boot information and
//! returns the exit status (0: success). This one says hello, then plays `ping` to the
//! built-in `pong` guest at the other end of its first channel: it sends `n` messages and
//! checks each reply (`pong` checks each message too). The runtime gives it a heap, so
//! `alloc` works.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use guestkernel::channel::{self, message};
use guestkernel::{heap, log, timer, BootInfo};

guestkernel::entry!(main);

fn main(bi: &BootInfo) -> u64 {
    log::info!("hello from {} (guest {}) on core {}", bi.name(), bi.guest_id, bi.core);
    let Some(mut link) = channel::open(bi, None) else {
        log::error!("no channel: the config gives this guest none");
        return 1;
    };
    let n = bi.arg_u64("n", 10);
    // Give the peer a millisecond to start (the virtual timer), not that it needs it.
    if timer::sleep_ms(1).is_err() {
        log::error!("the timer hypercall was refused");
        return 1;
    }
    let mut replies = Vec::new();
    for i in 0..n {
        if let Err(e) = link.send(&message(i, 0)) {
            log::error!("send {i}: {e:?}");
            return 2;
        }
        match link.recv() {
            Ok(reply) if reply == message(i, 1) => replies.push(reply[0]),
            Ok(reply) => {
                log::error!("reply {i} is wrong: {reply:?}");
                return 1;
            }
            Err(e) => {
                log::error!("receive {i}: {e:?}");
                return 2;
            }
        }
    }
    let in_order = replies.iter().copied().eq(0..n);
    log::info!(
        "exchanged {n} messages with my peer, every reply checked; {} kept on a {} KiB heap",
        replies.len(),
        heap::size_bytes() >> 10
    );
    u64::from(!in_order)
}
