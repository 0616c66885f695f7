// SPDX-License-Identifier: MIT OR Apache-2.0
//! Ending a run: the final record, then leaving the emulator (see
//! [`vmcall_proto::platform`]). On real hardware the writes go nowhere and the core parks.

use vmcall_proto::platform::{
    ExitCode, BOCHS_SHUTDOWN_MAGIC, BOCHS_SHUTDOWN_PORT, QEMU_DEBUG_EXIT_PORT,
};
use vmcall_proto::record::{kind, outcome};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Refused,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => outcome::OK,
            Outcome::Failed => outcome::FAILED,
            Outcome::Refused => outcome::REFUSED,
        }
    }
    fn code(self) -> ExitCode {
        match self {
            Outcome::Ok => ExitCode::Ok,
            Outcome::Failed => ExitCode::Failed,
            Outcome::Refused => ExitCode::Refused,
        }
    }
}

/// Prints the end record and leaves the emulator. Never returns.
pub fn end_run(o: Outcome) -> ! {
    crate::console::force_unlock_for_panic();
    crate::record!(kind::END, "outcome={} tsc={}", o.as_str(), crate::arch::rdtsc());
    // Every core's queued lines, this one last: nothing waits for an inbox any more.
    crate::console::flush();
    // Writing them ends the run, which is the intent. Elsewhere they are unclaimed and the writes
    // are ignored.
    // SAFETY: these ports belong to the emulators' exit devices.
    unsafe {
        crate::arch::outl(QEMU_DEBUG_EXIT_PORT, o.code() as u32);
        for &b in BOCHS_SHUTDOWN_MAGIC {
            crate::arch::outb(BOCHS_SHUTDOWN_PORT, b);
        }
    }
    crate::arch::park()
}
