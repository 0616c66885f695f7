// SPDX-License-Identifier: MIT OR Apache-2.0
//! The guest's `log` backend: each record formatted into one line and written with the
//! console hypercall. The hypervisor tags it with the guest's name and core.

use core::fmt::{self, Write};

/// A line being built; flushed when full and at the end.
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Line { buf: [0; 256], len: 0 }
    }
    pub fn flush(&mut self) {
        crate::hypercall::console_write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        let mut l = Line::new();
        let _ = match r.level() {
            log::Level::Error => writeln!(l, "ERROR {}", r.args()),
            log::Level::Warn => writeln!(l, "WARN {}", r.args()),
            _ => writeln!(l, "{}", r.args()),
        };
        l.flush();
    }
    fn flush(&self) {}
}

pub fn init() {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}
