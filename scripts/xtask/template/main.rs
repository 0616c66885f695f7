//! A guest kernel for mkvisor: one entry function that gets the boot information and
//! returns the exit status (0: success). This one says hello, then plays `ping` to the
//! built-in `pong` guest at the other end of its first channel: it sends `n` messages and
//! checks each reply (`pong` checks each message too).
#![no_std]
#![no_main]

use guestkernel::channel::{self, message};
use guestkernel::{log, BootInfo};

guestkernel::entry!(main);

fn main(bi: &BootInfo) -> u64 {
    log::info!("hello from {} (guest {}) on core {}", bi.name(), bi.guest_id, bi.core);
    let Some(mut link) = channel::open(bi, None) else {
        log::error!("no channel: the config gives this guest none");
        return 1;
    };
    let n = bi.arg_u64("n", 10);
    for i in 0..n {
        if let Err(e) = link.send(&message(i, 0)) {
            log::error!("send {i}: {e:?}");
            return 2;
        }
        match link.recv() {
            Ok(reply) if reply == message(i, 1) => {}
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
    log::info!("exchanged {n} messages with my peer, every reply checked");
    0
}
