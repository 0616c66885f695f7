// SPDX-License-Identifier: MIT OR Apache-2.0
//! The host's control channel: requests from the host (`cargo xtask ctl`) on the machine's
//! second serial port (COM2), read by one core (the lowest core given a guest, chosen by
//! the BSP at planning), each forwarded to its guest's core as a controller's request from
//! the host (`caps::control::HOST`), answered on COM2 and as a `#mkv hostctl` record. The
//! wire format is `vmcall_proto::hostctl`.
//!
//! Once COM2 is set up (its FIFOs cleared: bytes the host sent earlier are gone), the
//! channel's first line is `hostctl::READY_ON` (or `READY_OFF`): the host's relay sends no
//! request before it.
//!
//! Nothing read from COM2 is trusted: a line is at most `hostctl::MAX_LINE` bytes (a longer
//! one is answered `error` once its end arrives), malformed lines and unknown guests are
//! answered, never acted on. Each look at the port is bounded: at most [`RX_PER_LOOK`]
//! bytes and [`REQUESTS_PER_LOOK`] requests, one look per millisecond at most, from the
//! inbox service (`caps::CapCore::poll`, through `caps::Env::host_serve`): a flood of bytes
//! costs the serving core no more than that between two looks at its inbox. Answers wait
//! in a bounded queue ([`TX_BYTES`], written as the UART takes them, never waited for); an
//! answer that finds it full is still in the serial log's record.
//!
//! Owns the channel's state (touched only by the serving core) and the COM2 UART. Calls
//! `caps::control` (the requests and answers), `console` (records), `arch` (ports, TSC),
//! `percpu` (which core this is).

use crate::caps::control::Control;
use crate::caps::Env;
use core::fmt::Write;
use vmcall_proto::hostctl::{self, outcome, StateWord};
use vmcall_proto::hypercall::{control, HvError};

/// The PC's COM2 port.
pub const COM2_PORT: u16 = 0x2f8;
/// Bytes read from the UART per look at most.
pub const RX_PER_LOOK: usize = 64;
/// Requests acted on per look at most (the rest of the bytes wait in the UART).
pub const REQUESTS_PER_LOOK: usize = 4;
/// Answer bytes queued for the UART at most.
pub const TX_BYTES: usize = 1024;
/// How long the host's request waits for its guest's core: as a controller's (64 protocol
/// levels of the default 50 ms: a clean death may have revokes of its own to finish).
pub const DEADLINE_MS: u64 = 64 * 50;

/// A guest the host may name.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub name: [u8; 32],
    /// The core running it, or why none does.
    pub core: Result<u16, &'static str>,
}

impl Target {
    fn name(&self) -> &[u8] {
        let n = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        &self.name[..n]
    }
}

/// What the BSP decides at planning (read-only after).
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The core serving the channel.
    pub core: usize,
    /// `[machine] host_control` (command line `host_control=1`): otherwise every request
    /// is refused.
    pub enabled: bool,
    pub targets: [Option<Target>; vmcall_proto::config::MAX_GUESTS],
}

static CONFIG: spin::Once<Config> = spin::Once::new();
static CHANNEL: spin::Mutex<Channel> = spin::Mutex::new(Channel::new());

/// The channel's core and guests. Called once, by the BSP, before any core runs a guest.
pub fn configure(c: Config) {
    CONFIG.call_once(|| c);
    // No guest is given legacy ports (their I/O bitmaps open only their own PCI functions'
    // BARs), and nothing else in the hypervisor drives COM2.
    // SAFETY: COM2's ports are the hypervisor's alone, so programming them disturbs nothing.
    unsafe { Com2.init() };
    // No core serves the channel yet: the lock is free. The line goes out as the UART
    // takes it (here, and at each look of the serving core).
    CHANNEL.lock().ready(c.enabled, &mut Com2);
    log::info!(
        "host control {} on COM2, served by core {}",
        if c.enabled { "on" } else { "off (requests are refused)" },
        c.core
    );
}

/// The serving core's look at the channel (from the inbox service): reads what the host
/// sent, acts on whole requests, writes queued answers, times out requests unanswered.
pub fn serve(env: &mut impl Env, ctl: &mut Control) {
    let Some(cfg) = CONFIG.get() else { return };
    if crate::percpu::current_index() != Some(cfg.core) {
        return;
    }
    let Some(mut ch) = CHANNEL.try_lock() else { return };
    let now = crate::arch::rdtsc();
    if now < ch.next_look {
        return;
    }
    let per_ms = crate::arch::tsc::ticks_per_ms().max(1);
    ch.next_look = now.saturating_add(per_ms);
    let mut out = Emit;
    ch.look(cfg, &mut Com2, env, ctl, cfg.core, now, per_ms, &mut out);
}

/// The answer to host request `req` (from `caps::control::Control::answer` on the guest's
/// core): to the serving core, or taken here if this is it.
pub fn answer(env: &mut impl Env, req: u32, result: Result<u64, HvError>) {
    let Some(cfg) = CONFIG.get() else { return };
    if crate::percpu::current_index() == Some(cfg.core) {
        // Only this core takes the lock, never while holding it: it is free. Should that
        // ever not hold, the answer is dropped (the request times out) rather than wait.
        if let Some(mut ch) = CHANNEL.try_lock() {
            ch.answered(cfg, req, result, &mut Com2, &mut Emit);
        }
    } else if env.send(cfg.core, &Control::host_reply_message(req, result)) {
        env.kick(cfg.core);
    }
}

/// The UART as the channel sees it (a fake one in the tests).
pub trait Port {
    /// The next received byte, if one waits.
    fn rx(&mut self) -> Option<u8>;
    /// Writes `b` if the transmitter takes it now.
    fn tx(&mut self, b: u8) -> bool;
}

/// Where answers are recorded (the serial log; a list in the tests).
pub trait Recorder {
    fn record(&mut self, id: Option<u32>, op: u64, guest: &str, outcome: &str, detail: &str);
}

struct Emit;

impl Recorder for Emit {
    fn record(&mut self, id: Option<u32>, op: u64, guest: &str, outcome: &str, detail: &str) {
        use vmcall_proto::record::{kind, Quoted};
        let id = Id(id);
        crate::record!(
            kind::HOSTCTL,
            "id={id} op={} guest={} outcome={outcome} detail={} tsc={}",
            hostctl::op_name(op),
            Quoted(guest),
            Quoted(detail),
            crate::arch::rdtsc()
        );
    }
}

/// COM2, a 16550 the hypervisor owns.
struct Com2;

impl Com2 {
    /// 115200 8N1, FIFOs on, no interrupts.
    ///
    /// # Safety
    /// COM2 is the hypervisor's (no guest reaches it).
    unsafe fn init(&mut self) {
        let p = COM2_PORT;
        // SAFETY: the standard 16550 programming sequence on a UART only this module drives.
        unsafe {
            crate::arch::outb(p + 1, 0x00);
            crate::arch::outb(p + 3, 0x80);
            crate::arch::outb(p, 0x01);
            crate::arch::outb(p + 1, 0x00);
            crate::arch::outb(p + 3, 0x03);
            crate::arch::outb(p + 2, 0xc7);
            crate::arch::outb(p + 4, 0x03);
        }
    }
}

impl Port for Com2 {
    fn rx(&mut self) -> Option<u8> {
        // SAFETY: reading LSR, then RBR when it says data is ready, of the UART we own.
        unsafe {
            let lsr = crate::arch::inb(COM2_PORT + 5);
            // No UART there (all ones) or nothing received.
            if lsr == 0xff || lsr & 0x01 == 0 {
                return None;
            }
            Some(crate::arch::inb(COM2_PORT))
        }
    }
    fn tx(&mut self, b: u8) -> bool {
        // SAFETY: reading LSR, then writing THR when it is empty, of the UART we own.
        unsafe {
            let lsr = crate::arch::inb(COM2_PORT + 5);
            if lsr == 0xff || lsr & 0x20 == 0 {
                return false;
            }
            crate::arch::outb(COM2_PORT, b);
        }
        true
    }
}

/// A request forwarded to a guest's core, waiting for its answer.
#[derive(Clone, Copy, Debug)]
struct Pending {
    id: u32,
    operation: u64,
    target: usize,
    deadline: u64,
}

/// Requests in flight at most (one per guest's core, as the rings allow).
const IN_FLIGHT: usize = 16;

/// The channel's state: the line being read, the requests in flight, the answers queued.
pub struct Channel {
    line: [u8; hostctl::MAX_LINE],
    len: usize,
    /// The line being read is past `MAX_LINE`: dropped up to its end, then answered.
    overflow: bool,
    pending: [Option<Pending>; IN_FLIGHT],
    tx: [u8; TX_BYTES],
    tx_head: usize,
    tx_len: usize,
    next_look: u64,
}

/// One answer line, formatted in place.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl Line {
    fn text(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

struct Id(Option<u32>);

impl core::fmt::Display for Id {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{id}"),
            None => f.write_str("-"),
        }
    }
}

/// The outcome and detail of a guest's core's answer to `operation`.
fn outcome_of(operation: u64, result: Result<u64, HvError>, detail: &mut Line) -> &'static str {
    match result {
        Ok(v) if operation & 0xff == control::COUNTER => {
            let _ = write!(detail, "value={v}");
            outcome::OK
        }
        Ok(w)
            if matches!(operation, control::START | control::RESTART)
                && hostctl::state_of(w) != control::RUNNING =>
        {
            let _ = write!(
                detail,
                "not started again (down for good, or it failed setup): {}",
                StateWord(w)
            );
            outcome::REFUSED
        }
        Ok(w) => {
            let _ = write!(detail, "{}", StateWord(w));
            outcome::OK
        }
        Err(HvError::Busy) => {
            let _ = detail.write_str(if operation == control::START {
                "already running, or kept down (it cannot be started again)"
            } else {
                "kept down (it cannot be started again), or a request is in flight"
            });
            outcome::BUSY
        }
        Err(HvError::Timeout) => {
            let _ = detail.write_str("no answer from the guest's core in time");
            outcome::TIMEOUT
        }
        Err(HvError::PeerGone) => {
            let _ = detail.write_str("the guest's core is out of the machine");
            outcome::GONE
        }
        Err(HvError::NotOwner) => {
            let _ = detail.write_str("the host does not control this guest");
            outcome::REFUSED
        }
        Err(e) => {
            let _ = write!(detail, "{e:?}");
            outcome::ERROR
        }
    }
}

impl Default for Channel {
    fn default() -> Self {
        Self::new()
    }
}

impl Channel {
    pub const fn new() -> Self {
        Channel {
            line: [0; hostctl::MAX_LINE],
            len: 0,
            overflow: false,
            pending: [None; IN_FLIGHT],
            tx: [0; TX_BYTES],
            tx_head: 0,
            tx_len: 0,
            next_look: 0,
        }
    }

    /// Queues the ready line (the channel's first): the host may send requests now.
    pub fn ready(&mut self, enabled: bool, port: &mut impl Port) {
        let line = if enabled { hostctl::READY_ON } else { hostctl::READY_OFF };
        self.queue(line.as_bytes());
        self.flush(port);
    }

    /// Queues one whole line and its `\n`, or nothing if it does not fit: the host never
    /// reads half a line.
    fn queue(&mut self, line: &[u8]) {
        if self.tx_len + line.len() < TX_BYTES {
            for &b in line.iter().chain(b"\n") {
                self.tx[(self.tx_head + self.tx_len) % TX_BYTES] = b;
                self.tx_len += 1;
            }
        }
    }

    /// One look: answers written out, deadlines checked, then at most [`RX_PER_LOOK`] bytes
    /// read and [`REQUESTS_PER_LOOK`] requests acted on.
    #[allow(clippy::too_many_arguments)]
    pub fn look(
        &mut self,
        cfg: &Config,
        port: &mut impl Port,
        env: &mut impl Env,
        ctl: &mut Control,
        me: usize,
        now: u64,
        per_ms: u64,
        rec: &mut impl Recorder,
    ) {
        self.flush(port);
        for i in 0..IN_FLIGHT {
            if let Some(p) = self.pending[i].filter(|p| now > p.deadline) {
                self.pending[i] = None;
                self.reply(
                    port,
                    rec,
                    Some(p.id),
                    p.operation,
                    cfg,
                    p.target,
                    Err(HvError::Timeout),
                );
            }
        }
        let mut requests = 0;
        for _ in 0..RX_PER_LOOK {
            if requests == REQUESTS_PER_LOOK {
                break;
            }
            let Some(b) = port.rx() else { break };
            if b != b'\n' {
                if self.len < self.line.len() {
                    self.line[self.len] = b;
                    self.len += 1;
                } else {
                    self.overflow = true;
                }
                continue;
            }
            requests += 1;
            let (len, overflow) = (self.len, self.overflow);
            self.len = 0;
            self.overflow = false;
            let mut line = [0u8; hostctl::MAX_LINE];
            line[..len].copy_from_slice(&self.line[..len]);
            if overflow {
                self.error(port, rec, None, "line too long");
                continue;
            }
            match hostctl::parse(&line[..len]) {
                Err(e) => self.error(port, rec, e.id, e.why),
                Ok(r) => self.request(cfg, port, env, ctl, me, now, per_ms, rec, r),
            }
        }
        self.flush(port);
    }

    #[allow(clippy::too_many_arguments)]
    fn request(
        &mut self,
        cfg: &Config,
        port: &mut impl Port,
        env: &mut impl Env,
        ctl: &mut Control,
        me: usize,
        now: u64,
        per_ms: u64,
        rec: &mut impl Recorder,
        r: hostctl::Request<'_>,
    ) {
        let refuse = |s: &mut Self, port: &mut _, rec: &mut _, outcome, why: &str| {
            s.emit(port, rec, Some(r.id), r.operation, r.guest, outcome, why);
        };
        let Some(t) = cfg.targets.iter().flatten().find(|t| t.name() == r.guest.as_bytes()) else {
            return refuse(self, port, rec, outcome::REFUSED, "no guest of that name");
        };
        if !cfg.enabled {
            return refuse(
                self,
                port,
                rec,
                outcome::REFUSED,
                "host control is off in this machine's config ([machine] host_control = true)",
            );
        }
        let core = match t.core {
            Ok(c) => c as usize,
            Err(why) => return refuse(self, port, rec, outcome::REFUSED, why),
        };
        if self.pending.iter().flatten().any(|p| p.id == r.id) {
            return refuse(self, port, rec, outcome::ERROR, "that id is in flight already");
        }
        if self.pending.iter().flatten().any(|p| p.target == core) {
            return refuse(
                self,
                port,
                rec,
                outcome::BUSY,
                "a host request to its core is in flight",
            );
        }
        let Some(slot) = self.pending.iter().position(Option::is_none) else {
            return refuse(self, port, rec, outcome::BUSY, "too many requests in flight");
        };
        let sent = if core == me {
            ctl.host_request(me, r.id, r.operation);
            Ok(())
        } else {
            ctl.host_send(env, core, r.id, r.operation)
        };
        match sent {
            Ok(()) => {
                let deadline = now.saturating_add(DEADLINE_MS.saturating_mul(per_ms));
                self.pending[slot] =
                    Some(Pending { id: r.id, operation: r.operation, target: core, deadline });
            }
            Err(e) => self.reply(port, rec, Some(r.id), r.operation, cfg, core, Err(e)),
        }
    }

    /// A guest's core answered request `id`: the answer goes out (a late one, after its
    /// timeout was answered, is dropped).
    pub fn answered(
        &mut self,
        cfg: &Config,
        id: u32,
        result: Result<u64, HvError>,
        port: &mut impl Port,
        rec: &mut impl Recorder,
    ) {
        let Some(i) = self.pending.iter().position(|p| p.is_some_and(|p| p.id == id)) else {
            return;
        };
        let Some(p) = self.pending[i].take() else { return };
        self.reply(port, rec, Some(p.id), p.operation, cfg, p.target, result);
    }

    /// The answer `result` from the core `target` (its guest's name from `cfg`).
    #[allow(clippy::too_many_arguments)]
    fn reply(
        &mut self,
        port: &mut impl Port,
        rec: &mut impl Recorder,
        id: Option<u32>,
        operation: u64,
        cfg: &Config,
        target: usize,
        result: Result<u64, HvError>,
    ) {
        let mut detail = Line { buf: [0; 192], len: 0 };
        let o = outcome_of(operation, result, &mut detail);
        let name = cfg
            .targets
            .iter()
            .flatten()
            .find(|t| t.core == Ok(target as u16))
            .map_or(&b"?"[..], |t| t.name());
        let name = core::str::from_utf8(name).unwrap_or("?");
        self.emit(port, rec, id, operation, name, o, detail.text());
    }

    fn error(&mut self, port: &mut impl Port, rec: &mut impl Recorder, id: Option<u32>, why: &str) {
        self.emit(port, rec, id, u64::MAX, "", outcome::ERROR, why);
    }

    /// Queues the answer line and records it.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        port: &mut impl Port,
        rec: &mut impl Recorder,
        id: Option<u32>,
        operation: u64,
        guest: &str,
        outcome: &str,
        detail: &str,
    ) {
        rec.record(id, operation, guest, outcome, detail);
        let mut line = Line { buf: [0; 192], len: 0 };
        let _ = write!(line, "{} {outcome} {detail}", Id(id));
        self.queue(&line.buf[..line.len]);
        self.flush(port);
    }

    /// Writes queued answer bytes while the UART takes them.
    fn flush(&mut self, port: &mut impl Port) {
        while self.tx_len > 0 && port.tx(self.tx[self.tx_head]) {
            self.tx_head = (self.tx_head + 1) % TX_BYTES;
            self.tx_len -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use vmcall_proto::channel::Payload;

    #[derive(Default)]
    struct FakeUart {
        rx: VecDeque<u8>,
        tx: Vec<u8>,
        /// Bytes the transmitter takes before it is busy (per test step).
        room: usize,
    }
    impl Port for FakeUart {
        fn rx(&mut self) -> Option<u8> {
            self.rx.pop_front()
        }
        fn tx(&mut self, b: u8) -> bool {
            if self.room == 0 {
                return false;
            }
            self.room -= 1;
            self.tx.push(b);
            true
        }
    }
    impl FakeUart {
        fn lines(&self) -> Vec<String> {
            String::from_utf8_lossy(&self.tx).lines().map(str::to_string).collect()
        }
    }

    #[derive(Default)]
    struct Records(Vec<(Option<u32>, String, String)>);
    impl Recorder for Records {
        fn record(&mut self, id: Option<u32>, _: u64, guest: &str, outcome: &str, _: &str) {
            self.0.push((id, guest.to_string(), outcome.to_string()));
        }
    }

    #[derive(Default)]
    struct Net {
        sent: Vec<(usize, Payload)>,
        full: bool,
    }
    impl Env for Net {
        fn now(&mut self) -> u64 {
            0
        }
        fn send(&mut self, to: usize, m: &Payload) -> bool {
            if self.full {
                return false;
            }
            self.sent.push((to, *m));
            true
        }
        fn recv(&mut self) -> Option<(usize, Payload)> {
            None
        }
        fn kick(&mut self, _: usize) {}
        fn ept_map(&mut self, _: u64, _: u64, _: u64, _: bool) -> Result<(), HvError> {
            Ok(())
        }
        fn ept_unmap(&mut self, _: u64, _: u64) -> Result<(), HvError> {
            Ok(())
        }
    }

    fn target(name: &str, core: Result<u16, &'static str>) -> Option<Target> {
        let mut n = [0u8; 32];
        n[..name.len()].copy_from_slice(name.as_bytes());
        Some(Target { name: n, core })
    }

    fn config(enabled: bool) -> Config {
        let mut targets = [None; vmcall_proto::config::MAX_GUESTS];
        targets[0] = target("boss", Ok(0));
        targets[1] = target("w1", Ok(1));
        targets[2] = target("w2", Ok(2));
        targets[3] = target("late", Err("not started: no core for it"));
        Config { core: 0, enabled, targets }
    }

    struct Rig {
        cfg: Config,
        ch: Channel,
        uart: FakeUart,
        net: Net,
        ctl: Control,
        rec: Records,
        now: u64,
    }

    impl Rig {
        fn new(enabled: bool) -> Self {
            Rig {
                cfg: config(enabled),
                ch: Channel::new(),
                uart: FakeUart { room: usize::MAX, ..Default::default() },
                net: Net::default(),
                ctl: Control::default(),
                rec: Records::default(),
                now: 1000,
            }
        }
        fn send(&mut self, bytes: &[u8]) {
            self.uart.rx.extend(bytes);
        }
        fn look(&mut self) {
            let Rig { cfg, ch, uart, net, ctl, rec, now } = self;
            ch.look(cfg, uart, net, ctl, 0, *now, 1, rec);
        }
    }

    #[test]
    fn a_request_goes_to_its_guests_core_marked_as_the_hosts() {
        let mut r = Rig::new(true);
        r.send(b"5 stop w1\n");
        r.look();
        assert_eq!(r.net.sent.len(), 1);
        let (to, m) = r.net.sent[0];
        assert_eq!(to, 1);
        assert_eq!(m[1], control::STOP);
        assert_eq!(m[2], crate::caps::control::HOST_MARK);
        // The target's side: taken as from the host, which now holds the guest.
        let mut t = Control::default();
        t.deliver(0, &m);
        assert_eq!(t.released & (1 << crate::caps::control::HOST), 0, "held by the host");
        assert_eq!(t.take(), Some((crate::caps::control::HOST, 5, control::STOP)));
        // Its answer comes back and goes out on the port, once.
        let reply = Control::host_reply_message(5, Ok(control::state_word(control::HELD, 1, 0)));
        let (id, result) = Control::host_reply(&reply).unwrap();
        r.ch.answered(&r.cfg, id, result, &mut r.uart, &mut r.rec);
        r.ch.answered(&r.cfg, id, result, &mut r.uart, &mut r.rec);
        assert_eq!(r.uart.lines(), ["5 ok state=held n=1 status=0x0"]);
        assert_eq!(r.rec.0, [(Some(5), "w1".to_string(), "ok".to_string())]);
    }

    #[test]
    fn the_ready_line_goes_first_and_waits_for_the_uart() {
        let mut r = Rig::new(true);
        r.uart.room = 3;
        r.ch.ready(true, &mut r.uart);
        assert_eq!(r.uart.tx, b"rea", "as much as the UART takes");
        r.uart.room = usize::MAX;
        r.send(b"5 query w1\n");
        r.look();
        let lines = r.uart.lines();
        assert_eq!(lines[0], vmcall_proto::hostctl::READY_ON, "{lines:?}");
        assert_eq!(r.net.sent.len(), 1, "the request after it is served");
        let mut off = Rig::new(false);
        off.ch.ready(false, &mut off.uart);
        assert_eq!(off.uart.lines(), [vmcall_proto::hostctl::READY_OFF]);
    }

    #[test]
    fn the_hosts_own_cores_guest_is_asked_without_a_message() {
        let mut r = Rig::new(true);
        r.send(b"1 query boss\n");
        r.look();
        assert!(r.net.sent.is_empty());
        assert_eq!(r.ctl.take(), Some((crate::caps::control::HOST, 1, control::QUERY)));
    }

    #[test]
    fn bad_lines_unknown_guests_and_a_machine_without_host_control_are_answered() {
        let mut r = Rig::new(true);
        r.send(b"garbage\n1 kill w1\n2 stop nobody\n3 start late\n");
        r.look();
        let lines = r.uart.lines();
        assert!(lines[0].starts_with("- error expected `<id> <op> <guest>`"), "{lines:?}");
        assert!(lines[1].starts_with("1 error unknown operation"), "{lines:?}");
        assert_eq!(lines[2], "2 refused no guest of that name");
        assert_eq!(lines[3], "3 refused not started: no core for it");
        assert!(r.net.sent.is_empty(), "nothing acted on");

        let mut off = Rig::new(false);
        off.send(b"4 query w1\n");
        off.look();
        assert!(off.uart.lines()[0].starts_with("4 refused host control is off"));
        assert!(off.net.sent.is_empty());
    }

    #[test]
    fn a_flood_is_read_a_bounded_amount_per_look() {
        let mut r = Rig::new(true);
        // A line far too long, then many short ones.
        r.send(&[b'x'; 1000]);
        r.send(b"\n");
        for i in 1..=20 {
            r.send(format!("{i} query w2\n").as_bytes());
        }
        r.look();
        assert!(r.uart.rx.len() >= 1000 - RX_PER_LOOK, "at most RX_PER_LOOK bytes a look");
        let mut looks = 1;
        while !r.uart.rx.is_empty() {
            let before = r.uart.rx.len();
            r.look();
            assert!(before - r.uart.rx.len() <= RX_PER_LOOK);
            looks += 1;
        }
        let lines = r.uart.lines();
        assert_eq!(lines[0], "- error line too long");
        // One request to w2's core at a time: the first goes, the rest are busy.
        assert_eq!(r.net.sent.len(), 1);
        assert_eq!(lines.iter().filter(|l| l.contains(" busy ")).count(), 19);
        assert!(looks > 1000 / RX_PER_LOOK);
    }

    #[test]
    fn an_unanswered_request_times_out_and_its_late_answer_is_dropped() {
        let mut r = Rig::new(true);
        r.send(b"8 restart w2\n");
        r.look();
        r.now += DEADLINE_MS + 1;
        r.look();
        assert_eq!(r.uart.lines(), ["8 timeout no answer from the guest's core in time"]);
        r.ch.answered(&r.cfg, 8, Ok(0), &mut r.uart, &mut r.rec);
        assert_eq!(r.uart.lines().len(), 1);
        // The core's budget stays taken until its answer is back (the ring's bound).
        r.send(b"9 query w2\n");
        r.look();
        assert!(r.uart.lines()[1].starts_with("9 busy"), "{:?}", r.uart.lines());
    }

    #[test]
    fn starting_a_guest_that_stays_down_is_refused_and_answers_wait_for_the_uart() {
        let mut r = Rig::new(true);
        r.uart.room = 0;
        r.send(b"3 start w1\n");
        r.look();
        let down = control::state_word(control::EXITED, 1, 0);
        r.ch.answered(&r.cfg, 3, Ok(down), &mut r.uart, &mut r.rec);
        assert!(r.uart.tx.is_empty(), "the UART is busy: queued");
        r.uart.room = usize::MAX;
        r.look();
        assert!(r.uart.lines()[0].starts_with("3 refused not started again"));
    }

    #[test]
    fn the_hosts_request_shares_the_cores_budget_with_its_guests() {
        let mut r = Rig::new(true);
        let mut net = Net::default();
        r.ctl.start(&mut net, 1, control::QUERY, 100).unwrap();
        r.send(b"1 query w1\n");
        r.look();
        assert!(r.uart.lines()[0].starts_with("1 busy"), "{:?}", r.uart.lines());
        r.send(b"2 query w2\n");
        r.look();
        assert_eq!(r.ctl.start(&mut net, 2, control::QUERY, 100), Err(HvError::Busy));
        r.net.full = true;
        r.ctl.peer_gone(1);
        r.send(b"3 query w1\n");
        r.look();
        assert!(r.uart.lines()[1].starts_with("3 gone"), "{:?}", r.uart.lines());
    }
}
