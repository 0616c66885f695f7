// SPDX-License-Identifier: MIT OR Apache-2.0
//! The serial console (COM1, 16550 UART) and the `log` backend.
//!
//! Every line is written whole under one spin lock, taken with interrupts off (the
//! hypervisor never enables them), so lines from different cores never interleave. Log
//! lines carry the core index (`[c2] ...`); records ([`vmcall_proto::record`]) are written
//! bare, one per line, for the host tools.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};
use spin::Mutex;
use vmcall_proto::platform::COM1_PORT;

struct Uart {
    port: u16,
}

impl Uart {
    /// Programs 115200 8N1, FIFOs on, no interrupts.
    ///
    /// # Safety
    /// `port` is a 16550-compatible UART that nothing else drives.
    unsafe fn init(&mut self) {
        let p = self.port;
        // SAFETY: standard 16550 programming sequence on a UART we own.
        unsafe {
            crate::arch::outb(p + 1, 0x00); // no interrupts
            crate::arch::outb(p + 3, 0x80); // DLAB on
            crate::arch::outb(p, 0x01); // divisor 1: 115200 baud
            crate::arch::outb(p + 1, 0x00);
            crate::arch::outb(p + 3, 0x03); // 8N1, DLAB off
            crate::arch::outb(p + 2, 0xc7); // FIFOs on and cleared
            crate::arch::outb(p + 4, 0x03); // DTR, RTS
        }
    }

    fn put(&mut self, b: u8) {
        // Bounded wait so a missing UART cannot hang the hypervisor.
        // SAFETY: reading LSR and writing THR of the UART we own.
        unsafe {
            for _ in 0..100_000 {
                if crate::arch::inb(self.port + 5) & 0x20 != 0 {
                    break;
                }
                crate::arch::pause();
            }
            crate::arch::outb(self.port, b);
        }
    }
}

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

static CONSOLE: Mutex<Uart> = Mutex::new(Uart { port: COM1_PORT });
/// Which core holds [`CONSOLE`] (its index), or `NOBODY`: lets a dying core tell whether it
/// is the one that must break the lock.
static OWNER: AtomicUsize = AtomicUsize::new(NOBODY);
const NOBODY: usize = usize::MAX;
const UNKNOWN_CORE: usize = usize::MAX - 1;

fn me() -> usize {
    crate::percpu::current_index().unwrap_or(UNKNOWN_CORE)
}

fn with_console(f: impl FnOnce(&mut Uart)) {
    let mut c = CONSOLE.lock();
    OWNER.store(me(), Ordering::Relaxed);
    f(&mut c);
    OWNER.store(NOBODY, Ordering::Relaxed);
}

/// Initialises COM1 and installs the logger.
///
/// # Safety
/// Called once, on the BSP, before any other core runs.
pub unsafe fn init() {
    // SAFETY: first and only initialisation, single core.
    unsafe { CONSOLE.lock().init() };
    // A second call would fail harmlessly; there is none.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// Writes one whole line (a newline is appended).
pub fn line(args: fmt::Arguments<'_>) {
    with_console(|c| {
        let _ = c.write_fmt(args);
        let _ = c.write_str("\n");
    });
}

/// Writes a record line: `#mkv <kind> <fields>`.
pub fn record(kind: &str, fields: fmt::Arguments<'_>) {
    line(format_args!("{}{} {}", vmcall_proto::record::PREFIX, kind, fields));
}

/// Writes a record: `record!(kind::CORE, "index={} vmx=on", i)`.
#[macro_export]
macro_rules! record {
    ($kind:expr, $($arg:tt)*) => {
        $crate::console::record($kind, format_args!($($arg)*))
    };
}

/// Breaks the console lock if the calling core died holding it (a fault while printing).
/// Used only on the way to parking or ending the run. A lock held by another core is left
/// alone: that core releases it when its line is written.
pub fn force_unlock_for_panic() {
    if CONSOLE.is_locked() && OWNER.load(Ordering::Relaxed) == me() {
        OWNER.store(NOBODY, Ordering::Relaxed);
        // No other core can be inside the critical section.
        // SAFETY: this core holds the lock and will never return to the code that would release it.
        unsafe { CONSOLE.force_unlock() };
    }
}

struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let level = match r.level() {
            log::Level::Error => "ERROR ",
            log::Level::Warn => "WARN ",
            _ => "",
        };
        match crate::percpu::current_index() {
            Some(i) => line(format_args!("[c{i}] {level}{}", r.args())),
            None => line(format_args!("[c?] {level}{}", r.args())),
        }
    }

    fn flush(&self) {}
}
