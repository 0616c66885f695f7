// SPDX-License-Identifier: MIT OR Apache-2.0
//! Control of a running machine from the host: the relay `cargo xtask run` keeps between
//! the machine's second serial port (COM2, which the emulator connects to a TCP port of
//! 127.0.0.1 the relay listens on) and a Unix socket in the run folder ([`SOCKET`], mode
//! 0600: only the user who runs it); and the client side, `cargo xtask ctl RUN OP [GUEST]`.
//!
//! Clients send lines of `vmcall_proto::hostctl` (`<id> <op> <guest>`) and get the
//! hypervisor's answer line for each id. The relay is one thread that waits on nothing:
//! every socket non-blocking, every client served each round, the machine given one request
//! at a time in the order they came. A client that does not read its answers is dropped
//! once [`MAX_UNREAD`] bytes of them wait, so no client holds up another or the machine.
//! Only a connection the emulator's process group holds is taken as COM2 (see
//! `held_by_group`): a local process that connects to the port first cannot pose as the
//! machine.
//! Two requests the relay answers itself, the emulator being its child: `<id> pause` stops
//! the machine, `<id> resume` continues it ([`Stopper`]: Bochs's process group by SIGSTOP
//! and SIGCONT, QEMU's virtual machine by `stop` and `cont` on its QMP socket, so that its
//! TSC, host time, stands still too); the run's `--timeout` does not count paused time,
//! and the report lists the pauses.
//!
//! Nothing is sent to the machine before the hypervisor's ready line
//! (`vmcall_proto::hostctl::READY_ON`): what reaches COM2 before the hypervisor programs it
//! is lost. A request that comes earlier waits for it as long as its client does (the
//! client's `--wait`; [`READY_MARK`] in the run folder tells the client why it waited).
//!
//! May call `exit` (codes), `watch` (run folders).

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmcall_proto::hostctl::{self, outcome};

/// The client socket in a run folder.
pub const SOCKET: &str = "ctl.sock";
/// QEMU's QMP socket in the run folder (the relay's pause and resume under QEMU).
pub const QMP_SOCKET: &str = "qmp.sock";
/// How long `ctl` waits for an answer by default, seconds.
pub const DEFAULT_WAIT_S: u64 = 60;
/// The file the relay writes in the run folder once the hypervisor said it is ready
/// (`on` or `off`: host control in its config).
pub const READY_MARK: &str = "ctl.ready";

/// What the run loop needs to know of pauses.
#[derive(Default, Debug)]
pub struct Pauses {
    /// Since when the machine is paused (wall clock), if it is.
    pub since: Option<Instant>,
    /// Pauses over: (start, length).
    pub done: Vec<(Instant, Duration)>,
}

impl Pauses {
    /// Paused time in total so far, the pause in progress included.
    pub fn total(&self) -> Duration {
        self.done.iter().map(|d| d.1).sum::<Duration>()
            + self.since.map_or(Duration::ZERO, |s| s.elapsed())
    }
}

/// The relay of one run: built before the emulator starts (its COM2 port), started once
/// the emulator runs, stopped when the run ends.
pub struct Relay {
    listener: TcpListener,
    pub port: u16,
}

/// The relay at work.
pub struct Running {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
    pub pauses: Arc<Mutex<Pauses>>,
    pgid: u32,
    stopper: Stopper,
}

/// How the relay stops and continues the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopper {
    /// SIGSTOP and SIGCONT to the emulator's process group (Bochs: its TSC counts emulated
    /// instructions, so the machine sees no time pass).
    Signals,
    /// `stop` and `cont` on QEMU's QMP socket at this path: the virtual machine stops and
    /// its clocks with it (QEMU's TSC under TCG is host time, which a SIGSTOP lets run on,
    /// so a paused machine would see every deadline and probe period pass at once).
    Qmp(PathBuf),
}

/// How long a QMP exchange may take (QEMU answers at once unless its main loop is starved).
const QMP_WAIT: Duration = Duration::from_secs(10);

/// Runs QMP command `command` (`stop`, `cont`, `query-status`) on the socket at `path`:
/// the greeting, the capabilities handshake, then the command, each answered within
/// [`QMP_WAIT`]; returns the command's answer line (`{"return": ...}`). Events QEMU sends
/// meanwhile (`STOP`, `RESUME`) are skipped.
pub fn qmp(path: &Path, command: &str) -> Result<String> {
    let s = UnixStream::connect(path)
        .with_context(|| format!("QMP: cannot connect to {}", path.display()))?;
    s.set_read_timeout(Some(QMP_WAIT))?;
    s.set_write_timeout(Some(QMP_WAIT))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut next = |r: &mut BufReader<UnixStream>| -> Result<String> {
        loop {
            line.clear();
            if r.read_line(&mut line).context("QMP: no answer")? == 0 {
                bail!("QMP: QEMU closed the socket");
            }
            if !line.contains("\"event\"") {
                return Ok(line.trim().to_string());
            }
        }
    };
    let hello = next(&mut r)?;
    if !hello.contains("\"QMP\"") {
        bail!("QMP: not a QMP greeting: {hello}");
    }
    let mut answer = String::new();
    for cmd in ["qmp_capabilities", command] {
        writeln!(w, "{{\"execute\": \"{cmd}\"}}")?;
        answer = next(&mut r)?;
        if !answer.starts_with("{\"return\"") {
            bail!("QMP: {cmd}: {answer}");
        }
    }
    Ok(answer)
}

impl Relay {
    /// Listens on a free port of 127.0.0.1 for the emulator's COM2.
    pub fn bind() -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").context("host control: no TCP port")?;
        let port = listener.local_addr()?.port();
        Ok(Relay { listener, port })
    }

    /// Starts the relay for the emulator of process group `pgid` in run folder `dir`;
    /// `com2`: whether the emulator was given COM2 (without it only pause and resume work);
    /// `stopper`: how a pause stops the machine.
    pub fn start(self, dir: &Path, pgid: u32, com2: bool, stopper: Stopper) -> Result<Running> {
        let socket = dir.join(SOCKET);
        let _ = std::fs::remove_file(&socket);
        let clients = UnixListener::bind(&socket).with_context(|| {
            format!("host control: cannot listen on {} (a path over 107 bytes?)", socket.display())
        })?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        clients.set_nonblocking(true)?;
        self.listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let pauses = Arc::new(Mutex::new(Pauses::default()));
        let (s, p) = (stop.clone(), pauses.clone());
        let listener = self.listener;
        let _ = std::fs::remove_file(dir.join(READY_MARK));
        let ends = Ends {
            clients,
            stop: s,
            pauses: p,
            pgid,
            com2,
            mark: dir.join(READY_MARK),
            stopper: stopper.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("hostctl relay".into())
            .spawn(move || relay(listener, &ends))?;
        Ok(Running { stop, thread: Some(thread), socket, pauses, pgid, stopper })
    }
}

impl Running {
    /// Whether the machine is paused now.
    pub fn paused(&self) -> bool {
        self.pauses.lock().map(|p| p.since.is_some()).unwrap_or(false)
    }

    /// Stops the relay (a paused emulator is continued first, so that it can be killed and
    /// reaped) and returns the pauses: seconds after `started`, length.
    pub fn finish(mut self, started: Instant) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
        let mut p = self.pauses.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(since) = p.since.take() {
            let _ = halt(&self.stopper, self.pgid, false);
            p.done.push((since, since.elapsed()));
        }
        p.done
            .iter()
            .map(|(at, len)| {
                let at = at.saturating_duration_since(started).as_secs_f64();
                ((at * 10.0).round() / 10.0, (len.as_secs_f64() * 10.0).round() / 10.0)
            })
            .collect()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn signal(pgid: u32, sig: nix::sys::signal::Signal) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), sig).is_ok()
}

/// Stops (`on`) or continues the machine as `stopper` says; the error says why not.
fn halt(stopper: &Stopper, pgid: u32, on: bool) -> Result<()> {
    use nix::sys::signal::Signal::{SIGCONT, SIGSTOP};
    match stopper {
        Stopper::Signals => {
            if signal(pgid, if on { SIGSTOP } else { SIGCONT }) {
                Ok(())
            } else {
                bail!("the emulator is gone")
            }
        }
        Stopper::Qmp(path) => qmp(path, if on { "stop" } else { "cont" }).map(drop),
    }
}

/// The longest line a client may send (a request is far shorter).
const CLIENT_LINE: usize = 256;
/// How long a client has to finish a line it began.
const CLIENT_SEND: Duration = Duration::from_secs(5);
/// How long a request waits for the machine (ready line and answer) at most: the client's
/// own deadline is shorter (`ctl --wait`), and a client that goes takes its requests along.
const REQUEST_WAIT: Duration = Duration::from_secs(DEFAULT_WAIT_S * 10);
/// Clients connected at once, at most; one more is answered `busy` and closed.
pub const MAX_CLIENTS: usize = 32;
/// Answers held for a client that does not read them, at most (bytes); past it the client
/// is dropped, with a warning on the run's console.
pub const MAX_UNREAD: usize = 16 * 1024;
/// Requests of one client waiting for the machine at once, at most; more are answered
/// `busy`.
const MAX_QUEUED: usize = 8;
/// Lines taken from one client per round of the relay (the others get their turn).
const LINES_PER_ROUND: usize = 16;

/// What the relay thread serves besides the machine.
struct Ends {
    clients: UnixListener,
    stop: Arc<AtomicBool>,
    pauses: Arc<Mutex<Pauses>>,
    pgid: u32,
    com2: bool,
    mark: PathBuf,
    stopper: Stopper,
}

/// The machine's end: the emulator's COM2 connection (non-blocking), and what the
/// hypervisor said.
struct Machine {
    conn: TcpStream,
    /// What came after the last whole line.
    partial: Vec<u8>,
    /// Request lines not yet taken by the socket.
    out: Vec<u8>,
    /// `Some(host control on)` once the ready line came.
    ready: Option<bool>,
    closed: bool,
}

/// How long the relay sleeps when a round found nothing to do.
const TICK: Duration = Duration::from_millis(10);

impl Machine {
    /// Reads what the machine sent (without waiting) and returns its whole lines, the
    /// ready line taken here (it sets `ready`, and is not returned).
    fn lines(&mut self) -> Vec<String> {
        let mut buf = [0u8; 1024];
        while !self.closed {
            match (&self.conn).read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.closed = true,
            }
        }
        let mut out = vec![];
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=nl).collect();
            let l = String::from_utf8_lossy(&raw).trim_end().to_string();
            match hostctl::parse_ready(&l) {
                Some(on) => self.ready = Some(on),
                None => out.push(l),
            }
        }
        // A machine that writes no line end is not listened to for ever.
        if self.partial.len() > 4096 {
            self.partial.clear();
        }
        out
    }

    /// Writes what it can of the pending request lines, without waiting.
    fn flush(&mut self) {
        while !self.out.is_empty() && !self.closed {
            match (&self.conn).write(&self.out) {
                Ok(0) => self.closed = true,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.closed = true,
            }
        }
    }
}

/// One client of the control socket: any number of request lines, each answered with one
/// line in the order the answers come; closed once it closed its sending half and every
/// answer went out.
struct Client {
    conn: UnixStream,
    token: u64,
    /// The line being read.
    line: Vec<u8>,
    /// When the line being read got its first byte.
    since: Option<Instant>,
    /// Answers not yet taken by the socket.
    out: Vec<u8>,
    /// Its requests queued for the machine or in flight.
    waiting: usize,
    /// It closed its sending half (or sent something it cannot continue from).
    eof: bool,
    /// Gone, or to be dropped.
    dead: bool,
}

impl Client {
    fn answer(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.push(b'\n');
    }

    /// Writes what it can of its answers, without waiting.
    fn flush(&mut self) {
        while !self.out.is_empty() && !self.dead {
            match (&self.conn).write(&self.out) {
                Ok(0) => self.dead = true,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.dead = true,
            }
        }
    }

    /// Reads up to [`LINES_PER_ROUND`] whole lines (without waiting).
    fn lines(&mut self) -> Vec<Vec<u8>> {
        let mut out = vec![];
        let mut buf = [0u8; 4096];
        loop {
            let mut took = false;
            while out.len() < LINES_PER_ROUND {
                let Some(nl) = self.line.iter().position(|&b| b == b'\n') else { break };
                out.push(self.line.drain(..=nl).collect());
                took = true;
            }
            if took {
                self.since = None;
            }
            if !self.line.is_empty() && self.since.is_none() {
                self.since = Some(Instant::now());
            }
            if out.len() >= LINES_PER_ROUND || self.eof || self.dead {
                break;
            }
            if self.line.len() > CLIENT_LINE {
                self.answer(&format!("- {} the line is too long", outcome::ERROR));
                self.line.clear();
                self.eof = true;
                break;
            }
            match (&self.conn).read(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => self.line.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.dead = true,
            }
        }
        if self.eof && !self.line.contains(&b'\n') && !self.line.is_empty() {
            self.answer(&format!("- {} the line has no end", outcome::ERROR));
            self.line.clear();
        } else if self.since.is_some_and(|t| t.elapsed() > CLIENT_SEND) {
            self.answer(&format!(
                "- {} no end of line within {} s",
                outcome::ERROR,
                CLIENT_SEND.as_secs()
            ));
            self.line.clear();
            self.eof = true;
        }
        out
    }
}

/// A request for the machine, queued or in flight.
struct Request {
    client: u64,
    line: Vec<u8>,
    id: Option<u32>,
    until: Instant,
}

/// Whether a process of process group `pgid` holds the other end of `s`, a connection
/// accepted on 127.0.0.1: the table of TCP sockets names the inode of the socket whose
/// address is `s`'s peer, and a process's open files say whether it holds it (Linux's
/// `/proc`). The emulator is started in a group of its own, so a local process that
/// connects to COM2's port (before the emulator, or after) is told apart from it.
fn held_by_group(s: &TcpStream, pgid: u32) -> bool {
    let (Ok(peer), Ok(local)) = (s.peer_addr(), s.local_addr()) else { return false };
    let Some(inode) = tcp_inode(peer.port(), local.port()) else { return false };
    let want = format!("socket:[{inode}]");
    let Ok(procs) = std::fs::read_dir("/proc") else { return false };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if process_group(pid) != Some(pgid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
        {
            return true;
        }
    }
    false
}

/// A process's group, from `/proc/PID/stat` (the fifth field; the name before it, in
/// parentheses, may hold spaces and parentheses).
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.get(stat.rfind(')')? + 1..)?.split_whitespace().nth(2)?.parse().ok()
}

/// The inode of the TCP socket of this network namespace with local port `local` and
/// remote port `remote` (`/proc/net/tcp`, then `tcp6`; ports in hex after the last `:`).
fn tcp_inode(local: u16, remote: u16) -> Option<u64> {
    let port = |a: &str| a.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() > 9 && port(f[1]) == Some(local) && port(f[2]) == Some(remote) {
                return f[9].parse().ok().filter(|&i| i != 0);
            }
        }
    }
    None
}

/// The relay's state between rounds.
struct State {
    machine: Option<Machine>,
    clients: Vec<Client>,
    queue: std::collections::VecDeque<Request>,
    flight: Option<Request>,
    tokens: u64,
    /// The client whose request went to the machine last: the next goes to another one
    /// first, so a client with requests queued does not hold up the others.
    last: Option<u64>,
}

impl State {
    fn client(&mut self, token: u64) -> Option<&mut Client> {
        self.clients.iter_mut().find(|c| c.token == token)
    }

    /// Answers request `r` with `line` (its client may be gone).
    fn answer(&mut self, r: &Request, line: &str) {
        if let Some(c) = self.client(r.client) {
            c.answer(line);
            c.waiting = c.waiting.saturating_sub(1);
        }
    }
}

fn relay(listener: TcpListener, ends: &Ends) {
    let mut st = State {
        machine: None,
        clients: vec![],
        queue: Default::default(),
        flight: None,
        tokens: 0,
        last: None,
    };
    while !ends.stop.load(Ordering::SeqCst) {
        if !round(&listener, ends, &mut st) {
            std::thread::sleep(TICK);
        }
    }
}

/// One round of the relay, waiting for nothing: the emulator's connection, the machine's
/// lines, new clients, their lines, the queue, deadlines, answers out. Whether anything
/// happened.
fn round(listener: &TcpListener, ends: &Ends, st: &mut State) -> bool {
    let mut busy = false;
    // The emulator connects at its start; anyone else who connects is turned away.
    while let Ok((s, _)) = listener.accept() {
        busy = true;
        if st.machine.is_some() || !held_by_group(&s, ends.pgid) {
            crate::exit::warn(format_args!(
                "host control: refused a connection to COM2's port that is not the emulator's"
            ));
            continue;
        }
        if s.set_nonblocking(true).is_ok() {
            st.machine =
                Some(Machine { conn: s, partial: vec![], out: vec![], ready: None, closed: false });
        }
    }
    // What the machine said: the ready line, the answer in flight, stale answers.
    let lines = st.machine.as_mut().map(|m| (m.ready, m.lines()));
    if let Some((was, lines)) = lines {
        busy |= !lines.is_empty();
        for l in lines {
            let Some(a) = hostctl::parse_answer(&l) else { continue };
            if st.flight.as_ref().is_some_and(|f| a.id == f.id || a.id.is_none()) {
                let f = st.flight.take().expect("in flight");
                st.answer(&f, &l);
            }
        }
        if let (None, Some(on)) = (was, st.machine.as_ref().and_then(|m| m.ready)) {
            let _ = std::fs::write(&ends.mark, if on { "on\n" } else { "off\n" });
        }
    }
    // New clients, up to the limit.
    while let Ok((c, _)) = ends.clients.accept() {
        busy = true;
        if c.set_nonblocking(true).is_err() {
            continue;
        }
        if st.clients.len() >= MAX_CLIENTS {
            let _ = (&c).write_all(
                format!("- {} {MAX_CLIENTS} clients connected already\n", outcome::BUSY).as_bytes(),
            );
            continue;
        }
        st.tokens += 1;
        st.clients.push(Client {
            conn: c,
            token: st.tokens,
            line: vec![],
            since: None,
            out: vec![],
            waiting: 0,
            eof: false,
            dead: false,
        });
    }
    // Their lines: pause and resume answered here, the rest queued for the machine.
    let closed = st.machine.as_ref().is_some_and(|m| m.closed);
    for c in st.clients.iter_mut() {
        for line in c.lines() {
            busy = true;
            let text = String::from_utf8_lossy(&line).trim_end_matches(['\n', '\r']).to_string();
            let mut words = text.split_whitespace();
            let id = words.next().and_then(|w| w.parse::<u32>().ok());
            let id_word = id.map_or("-".to_string(), |i| i.to_string());
            match (id, words.next(), words.next()) {
                (Some(id), Some(w @ ("pause" | "resume")), None) => {
                    c.answer(&pause(id, w == "pause", &ends.pauses, &ends.stopper, ends.pgid))
                }
                _ if !ends.com2 => c.answer(&format!(
                    "{id_word} {} this machine has no COM2 (Bochs gives it one up to {} CPUs)",
                    outcome::ERROR,
                    crate::config::COM2_MAX_CPUS
                )),
                _ if closed => c.answer(&format!(
                    "{id_word} {} the machine's COM2 connection is closed",
                    outcome::GONE
                )),
                _ if c.waiting >= MAX_QUEUED => c.answer(&format!(
                    "{id_word} {} {MAX_QUEUED} requests of this client wait already",
                    outcome::BUSY
                )),
                _ => {
                    c.waiting += 1;
                    st.queue.push_back(Request {
                        client: c.token,
                        line,
                        id,
                        until: Instant::now() + REQUEST_WAIT,
                    });
                }
            }
        }
        // A client that hung up takes its requests along.
        if c.waiting > 0 && gone(&c.conn) {
            c.dead = true;
        }
    }
    let live = |st: &State, token| st.clients.iter().any(|c| c.token == token && !c.dead);
    st.queue.retain(|r| st.clients.iter().any(|c| c.token == r.client && !c.dead));
    if st.flight.as_ref().is_some_and(|f| !live(st, f.client)) {
        // Its late answer is stale, and dropped.
        st.flight = None;
    }
    // The machine: the next request once it is ready and free; deadlines; a closed COM2.
    let now = Instant::now();
    if let Some(f) = st.flight.take() {
        if now > f.until {
            let w = f.id.map_or("-".to_string(), |i| i.to_string());
            st.answer(&f, &format!("{w} {} no answer from the machine", outcome::TIMEOUT));
        } else {
            st.flight = Some(f);
        }
    }
    let state = st.machine.as_ref().map(|m| (m.ready.is_some(), m.closed));
    if state.is_some_and(|(_, closed)| closed) {
        let pending: Vec<Request> =
            st.flight.take().into_iter().chain(st.queue.drain(..)).collect();
        for r in pending {
            let w = r.id.map_or("-".to_string(), |i| i.to_string());
            st.answer(
                &r,
                &format!("{w} {} the machine's COM2 connection is closed", outcome::GONE),
            );
        }
    } else if st.flight.is_none() && state.is_some_and(|(ready, _)| ready) {
        let next = st.queue.iter().position(|r| Some(r.client) != st.last).unwrap_or(0);
        if let Some(r) = st.queue.remove(next) {
            st.last = Some(r.client);
            busy = true;
            let m = st.machine.as_mut().expect("ready");
            m.out.extend_from_slice(&r.line);
            st.flight = Some(Request { until: now + REQUEST_WAIT, ..r });
        }
    }
    while st.queue.front().is_some_and(|r| now > r.until) {
        let r = st.queue.pop_front().expect("front");
        let w = r.id.map_or("-".to_string(), |i| i.to_string());
        st.answer(
            &r,
            &format!(
                "{w} {} the hypervisor has not opened host control (COM2) yet",
                outcome::TIMEOUT
            ),
        );
    }
    if let Some(m) = st.machine.as_mut() {
        m.flush();
    }
    // Answers out; a client that does not read them is dropped, not waited for.
    for c in st.clients.iter_mut() {
        c.flush();
        if c.out.len() > MAX_UNREAD && !c.dead {
            crate::exit::warn(format_args!(
                "host control: dropped a client that does not read its answers ({} bytes \
                 unread)",
                c.out.len()
            ));
            c.dead = true;
        }
        if c.eof && c.waiting == 0 && c.out.is_empty() {
            c.dead = true;
        }
    }
    let before = st.clients.len();
    st.clients.retain(|c| !c.dead);
    busy | (st.clients.len() != before)
}

/// Whether the client hung up: its socket closed, not only its sending half (a client
/// that shuts down writing after its line, as `nc -N` and `socat` do, still reads the
/// answer; a read returning 0 cannot tell the two apart, the socket's `POLLHUP` does).
fn gone(c: &UnixStream) -> bool {
    use nix::libc::{poll, pollfd, POLLERR, POLLHUP};
    use std::os::fd::AsRawFd;
    let mut p = pollfd { fd: c.as_raw_fd(), events: 0, revents: 0 };
    // SAFETY: one pollfd of an open descriptor `c` borrows, and no wait (timeout 0).
    let n = unsafe { poll(&mut p, 1, 0) };
    n < 0 || p.revents & (POLLHUP | POLLERR) != 0
}

fn pause(id: u32, on: bool, pauses: &Mutex<Pauses>, stopper: &Stopper, pgid: u32) -> String {
    let mut p = pauses.lock().unwrap_or_else(|e| e.into_inner());
    match (on, p.since) {
        (true, Some(_)) => format!("{id} {} already paused", outcome::BUSY),
        (false, None) => format!("{id} {} not paused", outcome::BUSY),
        (true, None) => {
            if let Err(e) = halt(stopper, pgid, true) {
                return format!("{id} {} {e:#}", outcome::GONE);
            }
            p.since = Some(Instant::now());
            format!("{id} {} paused", outcome::OK)
        }
        (false, Some(since)) => {
            if let Err(e) = halt(stopper, pgid, false) {
                // Still paused as far as anyone can tell: say so, keep the pause open.
                return format!("{id} {} {e:#}", outcome::GONE);
            }
            p.since = None;
            p.done.push((since, since.elapsed()));
            format!("{id} {} resumed after {:.1} s", outcome::OK, since.elapsed().as_secs_f64())
        }
    }
}

/// Sends one request line to run folder `dir`'s machine and waits up to `wait` for its
/// answer line.
pub fn request(dir: &Path, line: &str, wait: Duration) -> Result<String> {
    let path = dir.join(SOCKET);
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach the run's control socket {} (the run is over, or too old to have one)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(wait))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    match BufReader::new(s).read_line(&mut answer) {
        Ok(_) if answer.ends_with('\n') => Ok(answer.trim_end().to_string()),
        Ok(_) => bail!("the run closed the control socket without an answer"),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            let why = if dir.join(READY_MARK).exists() {
                format!("no answer within {:.0} s", wait.as_secs_f64())
            } else {
                format!(
                    "the hypervisor did not open host control (COM2) within {:.0} s: still \
                     booting, or it stopped before (--wait gives it longer)",
                    wait.as_secs_f64()
                )
            };
            Err(crate::exit::coded(crate::exit::TIMEOUT, anyhow::anyhow!(why)))
        }
        Err(e) => Err(e.into()),
    }
}

/// The exit code of an answer's outcome (see `cargo xtask ctl --help`).
pub fn exit_code(outcome_word: &str) -> u8 {
    match outcome_word {
        outcome::OK => crate::exit::OK,
        outcome::REFUSED => crate::exit::REFUSED,
        outcome::TIMEOUT => crate::exit::TIMEOUT,
        outcome::BUSY => crate::exit::BUSY,
        outcome::GONE => crate::exit::GONE,
        _ => crate::exit::USAGE,
    }
}

/// An id for a request of this process: unique enough among the clients of one run.
fn next_id() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (std::process::id().wrapping_mul(7919) ^ t) % 999_999_999 + 1
}

/// `cargo xtask ctl RUN OP [GUEST]`: prints the answer; returns the exit code.
pub fn command(run: &str, op: &str, guest: Option<&str>, wait: Duration) -> Result<u8> {
    let usage = |m: String| crate::exit::coded(crate::exit::USAGE, anyhow::anyhow!(m));
    let dir = crate::watch::find_run(&crate::runs_root(), Some(run))?;
    let id = next_id();
    let line = match (op, guest) {
        ("pause" | "resume", None) => format!("{id} {op}"),
        ("pause" | "resume", Some(_)) => {
            return Err(usage(format!("`{op}` acts on the whole machine: no guest")))
        }
        (op, Some(g)) if hostctl::OPS.iter().any(|(n, _)| *n == op) => format!("{id} {op} {g}"),
        (op, None) if hostctl::OPS.iter().any(|(n, _)| *n == op) => {
            return Err(usage(format!("`{op}` needs a guest name")))
        }
        (op, _) => {
            let ops: Vec<&str> = hostctl::OPS.iter().map(|(n, _)| *n).collect();
            return Err(usage(format!(
                "unknown operation `{op}` (expected {}, pause or resume)",
                ops.join(", ")
            )));
        }
    };
    let answer = request(&dir, &line, wait)?;
    let Some(a) = hostctl::parse_answer(&answer) else {
        bail!("not an answer: {answer}");
    };
    let target = guest.map_or(String::from("the machine"), |g| format!("guest {g}"));
    if a.outcome == outcome::OK {
        println!("{target}: {op}: {}", a.detail);
    } else {
        eprintln!("error: {target}: {op}: {} ({})", a.outcome, a.detail);
    }
    Ok(exit_code(a.outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake emulator, in a process group of its own as the real one is: a shell that
    /// connects to COM2's `port`, says it is ready after `boot` (never: `None`, and hangs
    /// up after 3 s), then answers every request line `ok echo`, after a stale answer.
    /// What reached it before it was ready goes to `early`.
    fn fake_emulator(port: u16, boot: Option<Duration>, early: &Path) -> std::process::Child {
        let script = format!(
            r#"exec 3<>/dev/tcp/127.0.0.1/{port} || exit 1
sleep {boot}
if read -t 0.2 -r x <&3; then printf '%s\n' "$x" > '{early}'; fi
{ready}
while read -r line <&3; do
  id=${{line%% *}}
  case "$id" in ''|*[!0-9]*) id=- ;; esac
  printf '424242 ok stale\n%s ok echo %s\n' "$id" "$line" >&3
done"#,
            boot = boot.unwrap_or(Duration::from_secs(3)).as_secs_f64(),
            early = early.display(),
            ready = if boot.is_some() {
                format!("printf '%s\\n' '{}' >&3", hostctl::READY_ON)
            } else {
                "exit 0".into()
            },
        );
        let mut c = std::process::Command::new("bash");
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        c.arg("-c").arg(script).spawn().expect("bash")
    }

    /// Ends a fake emulator (continued first, in case it was paused).
    fn end(mut c: std::process::Child) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = c.wait();
    }

    /// A QMP server of one connection: the greeting, then per command line the answer
    /// `answers` gives (events first where it says so); returns the commands it got.
    fn fake_qmp(
        path: &Path,
        answers: fn(&str) -> Vec<&'static str>,
    ) -> std::thread::JoinHandle<Vec<String>> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut w = s.try_clone().unwrap();
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut got = vec![];
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { break };
                for a in answers(&line) {
                    writeln!(w, "{a}").unwrap();
                }
                got.push(line);
            }
            got
        })
    }

    #[test]
    fn qmp_stops_through_the_handshake_skipping_events_and_names_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(QMP_SOCKET);
        let server = fake_qmp(&path, |l| {
            if l.contains("stop") {
                vec![r#"{"event": "STOP", "data": {}}"#, r#"{"return": {}}"#]
            } else {
                vec![r#"{"return": {}}"#]
            }
        });
        assert_eq!(qmp(&path, "stop").unwrap(), r#"{"return": {}}"#);
        assert_eq!(
            server.join().unwrap(),
            [r#"{"execute": "qmp_capabilities"}"#, r#"{"execute": "stop"}"#]
        );
        std::fs::remove_file(&path).unwrap();
        let server = fake_qmp(&path, |l| {
            if l.contains("cont") {
                vec![r#"{"error": {"class": "GenericError", "desc": "no"}}"#]
            } else {
                vec![r#"{"return": {}}"#]
            }
        });
        let e = qmp(&path, "cont").unwrap_err().to_string();
        assert!(e.contains("QMP: cont: {\"error\""), "{e}");
        drop(server);
        // No QEMU there: the error names the socket.
        let e = qmp(&dir.path().join("none"), "stop").unwrap_err().to_string();
        assert!(e.contains("cannot connect to") && e.contains("none"), "{e}");
    }

    #[test]
    fn the_relay_matches_answers_to_requests_and_pauses_its_emulator() {
        let dir = tempfile::tempdir().unwrap();
        let early = dir.path().join("early");
        let relay = Relay::bind().unwrap();
        let child = fake_emulator(relay.port, Some(Duration::from_millis(600)), &early);
        let running = relay.start(dir.path(), child.id(), true, Stopper::Signals).unwrap();
        let wait = Duration::from_secs(10);
        // Sent before the machine is ready: held until it is, then answered.
        assert!(!dir.path().join(READY_MARK).exists());
        let a = request(dir.path(), "7 query w1", wait).unwrap();
        assert_eq!(a, "7 ok echo 7 query w1");
        assert_eq!(std::fs::read_to_string(dir.path().join(READY_MARK)).unwrap(), "on\n");
        let a = request(dir.path(), "garbage", wait).unwrap();
        assert_eq!(a, "- ok echo garbage");
        assert_eq!(request(dir.path(), "8 pause", wait).unwrap(), "8 ok paused");
        assert!(running.paused());
        // Signal delivery is asynchronous: the state says so within a moment.
        let stat = || std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while !stat().contains(") T ") && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(stat().contains(") T "), "stopped: {}", stat());
        assert!(request(dir.path(), "9 pause", wait).unwrap().starts_with("9 busy"));
        assert!(request(dir.path(), "10 resume", wait).unwrap().starts_with("10 ok resumed"));
        assert!(!running.paused());
        let pauses = running.finish(Instant::now());
        assert_eq!(pauses.len(), 1);
        assert!(!dir.path().join(SOCKET).exists(), "the socket goes with the run");
        let e = request(dir.path(), "11 query w1", wait).unwrap_err();
        assert!(format!("{e:#}").contains("control socket"), "{e:#}");
        end(child);
        assert!(!early.exists(), "nothing reached the machine before it was ready");
    }

    #[test]
    fn a_request_before_the_machine_is_ready_waits_with_a_deadline_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let early = dir.path().join("early");
        let relay = Relay::bind().unwrap();
        let child = fake_emulator(relay.port, None, &early);
        let running = relay.start(dir.path(), child.id(), true, Stopper::Signals).unwrap();
        let t0 = Instant::now();
        let e = request(dir.path(), "7 query w1", Duration::from_secs(1)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3), "the client's deadline held");
        assert_eq!(crate::exit::of_error(&e), crate::exit::TIMEOUT);
        assert!(format!("{e:#}").contains("did not open host control (COM2) within 1 s"), "{e:#}");
        // The relay saw the client go and serves the next one (resume needs no machine).
        assert!(request(dir.path(), "8 resume", Duration::from_secs(5))
            .unwrap()
            .starts_with("8 busy"));
        // The machine hangs up without ever being ready: a request is answered `gone`.
        let mut c = child;
        let until = Instant::now() + Duration::from_secs(10);
        while c.try_wait().unwrap().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let a = request(dir.path(), "9 query w1", Duration::from_secs(5)).unwrap();
        assert!(a.starts_with("9 gone"), "{a}");
        running.finish(Instant::now());
        end(c);
        assert!(!early.exists(), "the abandoned request never reached it");

        // A machine without COM2 answers at once.
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::bind().unwrap();
        let running = relay.start(dir.path(), std::process::id(), false, Stopper::Signals).unwrap();
        let a = request(dir.path(), "9 query w1", Duration::from_secs(5)).unwrap();
        assert!(a.starts_with("9 error this machine has no COM2"), "{a}");
        running.finish(Instant::now());
    }

    #[test]
    fn a_client_that_half_closes_before_ready_still_gets_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let early = dir.path().join("early");
        let relay = Relay::bind().unwrap();
        let child = fake_emulator(relay.port, Some(Duration::from_millis(800)), &early);
        let running = relay.start(dir.path(), child.id(), true, Stopper::Signals).unwrap();
        let mut s = UnixStream::connect(dir.path().join(SOCKET)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"7 query w1\n").unwrap();
        // Done sending, still reading the answer (what `nc -N` and `socat` do).
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut a = String::new();
        BufReader::new(&s).read_line(&mut a).unwrap();
        assert_eq!(a.trim_end(), "7 ok echo 7 query w1", "answered, not given up on");
        // And then closed by the relay: its one request is answered.
        let mut rest = String::new();
        assert_eq!(BufReader::new(&s).read_line(&mut rest).unwrap(), 0, "{rest}");
        drop(s);
        running.finish(Instant::now());
        end(child);
        assert!(!early.exists());
    }

    #[test]
    fn a_process_that_connects_to_com2_first_cannot_pose_as_the_machine() {
        let t0 = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let early = dir.path().join("early");
        let relay = Relay::bind().unwrap();
        let port = relay.port;
        // The impostor (this process, not of the emulator's group) connects before the
        // emulator, says the machine is ready and forges an answer.
        let mut impostor = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
        let forged = format!("{}\n7 ok forged\n", hostctl::READY_ON);
        impostor.write_all(forged.as_bytes()).unwrap();
        let child = fake_emulator(relay.port, Some(Duration::from_millis(500)), &early);
        let running = relay.start(dir.path(), child.id(), true, Stopper::Signals).unwrap();
        let a = request(dir.path(), "7 query w1", Duration::from_secs(10)).unwrap();
        assert_eq!(a, "7 ok echo 7 query w1", "the emulator answered, not the impostor");
        // The impostor was hung up on, and got no request.
        impostor.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // (Closed with its forged lines unread: the kernel may say so with a reset.)
        let closed = |r: std::io::Result<usize>| {
            r.is_ok() || r.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
        };
        let mut got = vec![];
        assert!(closed(impostor.read_to_end(&mut got)), "closed, not left waiting");
        assert_eq!(got, b"", "no request reached the impostor");
        // One connecting later is turned away too, and the machine keeps answering.
        let mut late = TcpStream::connect(("127.0.0.1", port)).unwrap();
        late.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = late.write_all(b"8 ok forged\n");
        assert_eq!(
            request(dir.path(), "8 query w2", Duration::from_secs(10)).unwrap(),
            "8 ok echo 8 query w2"
        );
        let mut got = vec![];
        assert!(closed(late.read_to_end(&mut got)), "closed, not left waiting");
        assert_eq!(got, b"");
        running.finish(Instant::now());
        end(child);
        assert!(t0.elapsed() < Duration::from_secs(30), "within its deadline");
    }

    #[test]
    fn a_client_that_does_not_read_is_dropped_and_stalls_no_one() {
        let t0 = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let early = dir.path().join("early");
        let relay = Relay::bind().unwrap();
        let child = fake_emulator(relay.port, Some(Duration::from_millis(200)), &early);
        let running = relay.start(dir.path(), child.id(), true, Stopper::Signals).unwrap();
        let wait = Duration::from_secs(10);
        assert_eq!(request(dir.path(), "1 query w1", wait).unwrap(), "1 ok echo 1 query w1");
        // The hog pipelines requests (each answered, most `busy`) and reads none.
        let hog = UnixStream::connect(dir.path().join(SOCKET)).unwrap();
        hog.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let (done, dropped) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let burst = b"5 query w1\n".repeat(1000);
            for _ in 0..2000 {
                if let Err(e) = (&hog).write_all(&burst) {
                    let _ = done.send(e.kind());
                    return;
                }
            }
        });
        // Meanwhile every other client is answered by the machine, at once.
        for i in 2..30 {
            let t = Instant::now();
            let a = request(dir.path(), &format!("{i} query w2"), wait).unwrap();
            assert_eq!(a, format!("{i} ok echo {i} query w2"));
            assert!(t.elapsed() < Duration::from_secs(2), "answered in {:?}", t.elapsed());
        }
        // The hog is dropped: its writes fail (the relay closed it), they do not hang.
        let kind = dropped.recv_timeout(Duration::from_secs(20)).expect("the hog was dropped");
        assert!(
            matches!(kind, std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset),
            "{kind:?}"
        );
        writer.join().unwrap();
        assert_eq!(request(dir.path(), "40 query w3", wait).unwrap(), "40 ok echo 40 query w3");
        running.finish(Instant::now());
        end(child);
        assert!(t0.elapsed() < Duration::from_secs(60), "within its deadline");
    }

    #[test]
    fn outcomes_have_distinct_exit_codes() {
        let codes: std::collections::BTreeSet<u8> =
            outcome::ALL.iter().map(|o| exit_code(o)).collect();
        assert_eq!(codes.len(), outcome::ALL.len());
        assert_eq!(exit_code("ok"), 0);
    }
}
