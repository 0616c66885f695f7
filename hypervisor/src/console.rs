// SPDX-License-Identifier: MIT OR Apache-2.0
//! The serial console (COM1, 16550 UART) and the `log` backend.
//!
//! Owns the UART and one line queue per core; calls only `arch` (port I/O) and `percpu`
//! (which core this is). Anything may call it, the capability core's inbox service included
//! ([`pump`]).
//!
//! No core ever waits for another core's line. A line is formatted into its core's own queue
//! (one producer, that core) and committed whole; the UART is then driven by whoever takes its
//! lock without waiting for it (`try_lock`), for at most [`PUMP_BYTES`] bytes per turn, one
//! line after another in the order they were committed (a global sequence number), a line in
//! progress always finished before the next one starts, so lines from different cores never
//! interleave. Turns are taken by the writing core right after its line ([`line`]: only what
//! the transmitter takes without waiting) and by every core that serves its inbox while lines
//! are queued ([`pump`]: the run loop adds no test of its own, so exits cost nothing more).
//! So a core is away from its inbox for the console at most one turn, about [`PUMP_BYTES`]
//! byte times of the UART (87 us each at 115200 baud: about 5.6 ms, 22,000 instructions in
//! Bochs at 4 M IPS),
//! whatever the other cores print. The exceptions, all bounded and named: a core whose queue
//! is full ([`QUEUE_BYTES`] of unsent output, only a flood such as an exit trace) takes turns
//! until its line fits; the end of the run and the first lines before the per-core state
//! exists write synchronously ([`flush`]). Log lines carry the core index (`[c2] ...`);
//! records ([`vmcall_proto::record`]) are written bare, one per line, for the host tools.

use crate::percpu::MAX_CORES;
use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use spin::Mutex;
use vmcall_proto::platform::COM1_PORT;

/// Bytes a core's queue holds (committed lines not yet sent, with their headers).
pub const QUEUE_BYTES: usize = 8192;
/// Longest line kept (longer ones are cut there): a line always fits an empty queue.
pub const MAX_LINE: usize = 1024;
/// Bytes one turn at the UART sends at most (CR and LF included): the console's share of a
/// core's longest stretch away from its inbox (`vmcall_proto::config`'s bound).
pub const PUMP_BYTES: usize = vmcall_proto::config::CONSOLE_TURN_BYTES as usize;
/// A queued line's header: its sequence number (8 bytes) and length (2 bytes).
const HEADER: usize = 10;
const _: () = assert!(QUEUE_BYTES.is_power_of_two() && MAX_LINE + HEADER < QUEUE_BYTES);

struct Uart {
    port: u16,
    /// The line being sent: its core and the bytes of it left (its header already read).
    current: Option<(usize, usize)>,
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

    /// Whether the transmitter takes a byte now (LSR's THRE).
    fn ready(&self) -> bool {
        // SAFETY: reading LSR of the UART we own.
        unsafe { crate::arch::inb(self.port + 5) & 0x20 != 0 }
    }

    /// One turn: sends queued lines, the one in progress first, for at most `budget` bytes;
    /// with `wait` false, only while the transmitter takes bytes without waiting.
    fn pump(&mut self, mut budget: usize, wait: bool) {
        while budget > 0 {
            if !wait && !self.ready() {
                return;
            }
            let (core, left) = match self.current {
                Some(c) => c,
                None => match oldest() {
                    Some(c) => c,
                    None => return,
                },
            };
            let q = &QUEUES[core];
            let mut head = q.head.load(Ordering::Relaxed);
            // Without waiting: a byte at a time, the transmitter asked before each.
            let n = left.min(budget).min(if wait { usize::MAX } else { 1 });
            for _ in 0..n {
                let b = q.byte(head);
                head += 1;
                if b == b'\n' {
                    self.put(b'\r');
                }
                self.put(b);
            }
            budget -= n;
            if n == left && (wait || self.ready()) {
                self.put(b'\r');
                self.put(b'\n');
                budget = budget.saturating_sub(2);
                self.current = None;
                PENDING.fetch_sub(1, Ordering::Relaxed);
            } else {
                // The CR LF of a finished line is sent on the next turn (zero bytes left).
                self.current = Some((core, left - n));
            }
            // The bytes sent are free for the producer again.
            q.head.store(head, Ordering::Release);
        }
    }
}

/// The queue with the oldest line waiting: its core and that line's length, its header
/// consumed. Called with the UART lock held (the only consumer).
fn oldest() -> Option<(usize, usize)> {
    let mut best: Option<(u64, usize)> = None;
    for (i, q) in QUEUES.iter().enumerate() {
        let head = q.head.load(Ordering::Relaxed);
        if head == q.tail.load(Ordering::Acquire) {
            continue;
        }
        let seq = q.u64_at(head);
        if best.is_none_or(|(s, _)| seq < s) {
            best = Some((seq, i));
        }
    }
    let (_, core) = best?;
    let q = &QUEUES[core];
    let head = q.head.load(Ordering::Relaxed);
    let len = usize::from(q.byte(head + 8)) | usize::from(q.byte(head + 9)) << 8;
    q.head.store(head + HEADER, Ordering::Release);
    Some((core, len))
}

/// One core's queue of committed lines: written by that core only, read under the UART lock.
/// `head` and `tail` count bytes from the start (positions modulo [`QUEUE_BYTES`]).
struct Queue {
    buf: UnsafeCell<[u8; QUEUE_BYTES]>,
    /// First byte not yet sent (advanced by the consumer).
    head: AtomicUsize,
    /// End of the committed lines (advanced by the producer, release).
    tail: AtomicUsize,
}

// SAFETY: the bytes between `head` and `tail` are read only by the UART lock's holder, and
// written before the release of `tail` that publishes them; the bytes past `tail` only by the
// owning core, and only where the consumer has moved `head` past them (acquire).
unsafe impl Sync for Queue {}

impl Queue {
    const fn new() -> Self {
        Queue {
            buf: UnsafeCell::new([0; QUEUE_BYTES]),
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
        }
    }

    fn byte(&self, pos: usize) -> u8 {
        // SAFETY: an in-bounds read of a byte the protocol above gives the caller.
        unsafe { (*self.buf.get())[pos % QUEUE_BYTES] }
    }

    fn u64_at(&self, pos: usize) -> u64 {
        (0..8).fold(0, |v, k| v | u64::from(self.byte(pos + k)) << (8 * k))
    }

    fn set(&self, pos: usize, b: u8) {
        // The byte is past `tail`, and the consumer is done with it (the caller checked `head`).
        // SAFETY: an in-bounds write of a byte no one else reads or writes now.
        unsafe { (*self.buf.get())[pos % QUEUE_BYTES] = b };
    }

    /// Writes `bytes` from position `pos` on (wrapping around the end): at most two copies.
    fn set_all(&self, pos: usize, bytes: &[u8]) {
        let at = pos % QUEUE_BYTES;
        let first = bytes.len().min(QUEUE_BYTES - at);
        // As in `set`, for every byte: past `tail`, the consumer done with them (the caller
        // checked `head` for the last one), `bytes` no longer than the queue.
        // SAFETY: in-bounds writes of bytes no one else reads or writes now.
        let buf = unsafe { &mut *self.buf.get() };
        buf[at..at + first].copy_from_slice(&bytes[..first]);
        buf[..bytes.len() - first].copy_from_slice(&bytes[first..]);
    }
}

static QUEUES: [Queue; MAX_CORES] = [const { Queue::new() }; MAX_CORES];
/// Lines committed and not yet completely sent, over all queues.
static PENDING: AtomicUsize = AtomicUsize::new(0);
/// The next line's sequence number (commit order, over all cores).
static SEQ: AtomicU64 = AtomicU64::new(0);

/// Formats a line into the calling core's queue, past `tail`, not visible until committed.
struct LineWriter<'a> {
    q: &'a Queue,
    start: usize,
    len: usize,
}

impl LineWriter<'_> {
    /// Waits until the consumer is done with position `pos`: while the queue is full, turns
    /// at the UART (the line itself always fits an empty queue).
    fn room(&self, pos: usize) {
        while pos - self.q.head.load(Ordering::Acquire) >= QUEUE_BYTES {
            turn(PUMP_BYTES, true);
            crate::arch::pause();
        }
    }

    fn commit(self) {
        // The header's bytes come before the body's (free already if the body is not empty).
        self.room(self.start + HEADER - 1);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        for k in 0..8 {
            self.q.set(self.start + k, (seq >> (8 * k)) as u8);
        }
        self.q.set(self.start + 8, self.len as u8);
        self.q.set(self.start + 9, (self.len >> 8) as u8);
        PENDING.fetch_add(1, Ordering::Relaxed);
        self.q.tail.store(self.start + HEADER + self.len, Ordering::Release);
    }
}

impl Write for LineWriter<'_> {
    /// The bytes that fit the line, copied at once (one look at the room they need).
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(MAX_LINE - self.len);
        if n > 0 {
            let pos = self.start + HEADER + self.len;
            self.room(pos + n - 1);
            self.q.set_all(pos, &s.as_bytes()[..n]);
            self.len += n;
        }
        Ok(())
    }
}

static CONSOLE: Mutex<Uart> = Mutex::new(Uart { port: COM1_PORT, current: None });
/// Which core holds [`CONSOLE`] (its index), or `NOBODY`: lets a dying core tell whether it
/// is the one that must break the lock.
static OWNER: AtomicUsize = AtomicUsize::new(NOBODY);
const NOBODY: usize = usize::MAX;
const UNKNOWN_CORE: usize = usize::MAX - 1;

fn me() -> usize {
    crate::percpu::current_index().unwrap_or(UNKNOWN_CORE)
}

/// One turn at the UART if nobody else is taking one (never waits for the lock).
fn turn(budget: usize, wait: bool) {
    if let Some(mut c) = CONSOLE.try_lock() {
        OWNER.store(me(), Ordering::Relaxed);
        c.pump(budget, wait);
        OWNER.store(NOBODY, Ordering::Relaxed);
    }
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

/// Writes one whole line (a newline is appended): queued on this core, then one turn at the
/// UART if it is free. Before the core's per-core state exists (early boot, one core), the
/// line is written at once.
pub fn line(args: fmt::Arguments<'_>) {
    let Some(core) = crate::percpu::current_index().filter(|&c| c < MAX_CORES) else {
        let mut c = CONSOLE.lock();
        OWNER.store(UNKNOWN_CORE, Ordering::Relaxed);
        c.pump(usize::MAX, true);
        let mut w = Direct(&mut c);
        let _ = w.write_fmt(args);
        let _ = w.write_str("\n");
        OWNER.store(NOBODY, Ordering::Relaxed);
        return;
    };
    let q = &QUEUES[core];
    let start = q.tail.load(Ordering::Relaxed);
    let mut w = LineWriter { q, start, len: 0 };
    let _ = w.write_fmt(args);
    w.commit();
    turn(PUMP_BYTES, false);
}

/// A line formatted in parts into a buffer of its own and queued whole by
/// [`Staged::commit`]: its caller may serve the inbox between two parts (which may write
/// lines of their own: nothing of this one is queued yet). Cut at [`MAX_LINE`] bytes, as a
/// queued line is.
pub struct Staged {
    buf: [u8; MAX_LINE],
    len: usize,
}

impl Staged {
    /// A record's line (`#mkv <kind> `, its fields to follow).
    pub fn record(kind: &str) -> Self {
        let mut s = Staged { buf: [0; MAX_LINE], len: 0 };
        let _ = write!(s, "{}{} ", vmcall_proto::record::PREFIX, kind);
        s
    }

    /// Queues the line (one copy into the queue) and takes a turn at the UART, as [`line`].
    pub fn commit(self) {
        // Only whole characters were written (see `write_str`).
        let text = core::str::from_utf8(&self.buf[..self.len]).unwrap_or("(not UTF-8)");
        line(format_args!("{text}"));
    }
}

impl Write for Staged {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut n = s.len().min(MAX_LINE - self.len);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Writes straight to the UART (its lock held): the early-boot path.
struct Direct<'a>(&'a mut Uart);

impl Write for Direct<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.0.put(b'\r');
            }
            self.0.put(b);
        }
        Ok(())
    }
}

/// Whether lines are waiting for the UART (one load: the inbox service's test).
#[inline]
pub fn pending() -> bool {
    PENDING.load(Ordering::Relaxed) != 0
}

/// One turn at the UART for lines waiting, if nobody else is taking one: called by a core
/// serving its inbox, so queued lines go out while cores work. At most [`PUMP_BYTES`] bytes.
pub fn pump() {
    if pending() {
        turn(PUMP_BYTES, true);
    }
}

/// Sends every line queued so far, waiting for the lock: the end of the run (nothing waits
/// for this core's inbox any more).
pub fn flush() {
    let mut c = CONSOLE.lock();
    OWNER.store(me(), Ordering::Relaxed);
    c.pump(usize::MAX, true);
    OWNER.store(NOBODY, Ordering::Relaxed);
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
/// alone: that core releases it at the end of its turn.
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
