// SPDX-License-Identifier: MIT OR Apache-2.0
//! Control of a running machine from the host: the relay `cargo xtask run` keeps between
//! the machine's second serial port (COM2, which the emulator connects to a TCP port of
//! 127.0.0.1 the relay listens on) and a Unix socket in the run folder ([`SOCKET`], mode
//! 0600: only the user who runs it); and the client side, `cargo xtask ctl RUN OP [GUEST]`.
//!
//! Clients send one line of `vmcall_proto::hostctl` (`<id> <op> <guest>`) and get the
//! hypervisor's answer line for that id; one client at a time, in the order they connect.
//! Two requests the relay answers itself, the emulator being its child: `<id> pause` stops
//! the emulator's process group (SIGSTOP), `<id> resume` continues it (SIGCONT); the run's
//! `--timeout` does not count paused time, and the report lists the pauses.
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
}

impl Relay {
    /// Listens on a free port of 127.0.0.1 for the emulator's COM2.
    pub fn bind() -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").context("host control: no TCP port")?;
        let port = listener.local_addr()?.port();
        Ok(Relay { listener, port })
    }

    /// Starts the relay for the emulator of process group `pgid` in run folder `dir`;
    /// `com2`: whether the emulator was given COM2 (without it only pause and resume work).
    pub fn start(self, dir: &Path, pgid: u32, com2: bool) -> Result<Running> {
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
        let ends = Ends { clients, stop: s, pauses: p, pgid, com2, mark: dir.join(READY_MARK) };
        let thread = std::thread::Builder::new()
            .name("hostctl relay".into())
            .spawn(move || relay(listener, &ends))?;
        Ok(Running { stop, thread: Some(thread), socket, pauses, pgid })
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
            signal(self.pgid, nix::sys::signal::Signal::SIGCONT);
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

/// The longest line a client may send (a request is far shorter).
const CLIENT_LINE: usize = 256;
/// How long a connected client has to send its line.
const CLIENT_SEND: Duration = Duration::from_secs(5);

/// What the relay thread serves besides the machine.
struct Ends {
    clients: UnixListener,
    stop: Arc<AtomicBool>,
    pauses: Arc<Mutex<Pauses>>,
    pgid: u32,
    com2: bool,
    mark: PathBuf,
}

/// The machine's end: the emulator's COM2 connection, and what the hypervisor said.
struct Machine {
    conn: BufReader<TcpStream>,
    /// A line read in part (a read timed out in its middle).
    partial: String,
    /// `Some(host control on)` once the ready line came.
    ready: Option<bool>,
    closed: bool,
}

/// How long one read from the machine waits at most.
const TICK: Duration = Duration::from_millis(20);

impl Machine {
    /// The next whole line from the machine within [`TICK`], the ready line taken here
    /// (it sets `ready`, and is not returned).
    fn line(&mut self) -> Option<String> {
        if self.closed {
            return None;
        }
        match self.conn.read_line(&mut self.partial) {
            Ok(0) => {
                self.closed = true;
                None
            }
            Ok(_) if self.partial.ends_with('\n') => {
                let l = self.partial.trim_end().to_string();
                self.partial.clear();
                match hostctl::parse_ready(&l) {
                    Some(on) => {
                        self.ready = Some(on);
                        None
                    }
                    None => Some(l),
                }
            }
            _ => None,
        }
    }
}

fn relay(listener: TcpListener, ends: &Ends) {
    // The emulator connects at its start; the hypervisor says it is ready later.
    let mut machine: Option<Machine> = None;
    while !ends.stop.load(Ordering::SeqCst) {
        pump(&listener, &mut machine, &ends.mark);
        match ends.clients.accept() {
            Ok((c, _)) => serve_client(c, &listener, &mut machine, ends),
            Err(_) => {
                if machine.is_none() {
                    std::thread::sleep(TICK);
                }
            }
        }
    }
}

/// Takes the emulator's connection if it came, then reads (and drops) what the machine
/// sent for up to one tick: the ready line (then `mark` is written), stale answers of
/// clients that gave up.
fn pump(listener: &TcpListener, machine: &mut Option<Machine>, mark: &Path) {
    if machine.is_none() {
        if let Ok((s, _)) = listener.accept() {
            if s.set_nonblocking(false).is_ok() && s.set_read_timeout(Some(TICK)).is_ok() {
                *machine = Some(Machine {
                    conn: BufReader::new(s),
                    partial: String::new(),
                    ready: None,
                    closed: false,
                });
            }
        }
    }
    if let Some(m) = machine.as_mut() {
        let was = m.ready;
        let _ = m.line();
        if let (None, Some(on)) = (was, m.ready) {
            let _ = std::fs::write(mark, if on { "on\n" } else { "off\n" });
        }
    }
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

fn serve_client(
    mut c: UnixStream,
    listener: &TcpListener,
    machine: &mut Option<Machine>,
    ends: &Ends,
) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(CLIENT_SEND));
    let mut line = Vec::new();
    let _ = BufReader::new((&c).take(CLIENT_LINE as u64)).read_until(b'\n', &mut line);
    // What the client waits for, at most (the client's own deadline; it may go earlier).
    let wait = Duration::from_secs(DEFAULT_WAIT_S * 10);
    let text = String::from_utf8_lossy(&line).trim_end_matches(['\n', '\r']).to_string();
    let mut words = text.split_whitespace();
    let id = words.next().and_then(|w| w.parse::<u32>().ok());
    let id_word = id.map_or("-".to_string(), |i| i.to_string());
    let answer = match (id, words.next(), words.next()) {
        (Some(id), Some(w @ ("pause" | "resume")), None) => {
            pause(id, w == "pause", &ends.pauses, ends.pgid)
        }
        _ if !line.ends_with(b"\n") => format!("- {} the line has no end", outcome::ERROR),
        _ if !ends.com2 => format!(
            "{id_word} {} this machine has no COM2 (Bochs gives it one up to {} CPUs)",
            outcome::ERROR,
            crate::config::COM2_MAX_CPUS
        ),
        _ => {
            // Nothing goes to the machine before the hypervisor is ready for it: wait as
            // long as the client does (a paused machine never gets there: say so).
            let until = Instant::now() + wait;
            while machine.as_ref().is_none_or(|m| m.ready.is_none() && !m.closed)
                && Instant::now() < until
                && !ends.stop.load(Ordering::SeqCst)
                && !gone(&c)
            {
                pump(listener, machine, &ends.mark);
                if machine.is_none() {
                    std::thread::sleep(TICK);
                }
            }
            match machine.as_mut() {
                Some(m) if m.ready.is_some() => forward(m, &line, id, wait, &ends.stop),
                Some(m) if m.closed => {
                    format!("{id_word} {} the machine's COM2 connection is closed", outcome::GONE)
                }
                _ => format!(
                    "{id_word} {} the hypervisor has not opened host control (COM2) yet",
                    outcome::TIMEOUT
                ),
            }
        }
    };
    let _ = c.write_all(format!("{answer}\n").as_bytes());
}

fn pause(id: u32, on: bool, pauses: &Mutex<Pauses>, pgid: u32) -> String {
    let mut p = pauses.lock().unwrap_or_else(|e| e.into_inner());
    match (on, p.since) {
        (true, Some(_)) => format!("{id} {} already paused", outcome::BUSY),
        (false, None) => format!("{id} {} not paused", outcome::BUSY),
        (true, None) => {
            if !signal(pgid, nix::sys::signal::Signal::SIGSTOP) {
                return format!("{id} {} the emulator is gone", outcome::GONE);
            }
            p.since = Some(Instant::now());
            format!("{id} {} paused", outcome::OK)
        }
        (false, Some(since)) => {
            signal(pgid, nix::sys::signal::Signal::SIGCONT);
            p.since = None;
            p.done.push((since, since.elapsed()));
            format!("{id} {} resumed after {:.1} s", outcome::OK, since.elapsed().as_secs_f64())
        }
    }
}

/// Sends `line` to the machine and reads its answers until the one for `id` (a line
/// without a readable id: the next `-` answer).
fn forward(
    m: &mut Machine,
    line: &[u8],
    id: Option<u32>,
    wait: Duration,
    stop: &AtomicBool,
) -> String {
    if m.conn.get_mut().write_all(line).is_err() {
        return format!("- {} the machine's COM2 connection is closed", outcome::GONE);
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        if let Some(l) = m.line() {
            if let Some(a) = hostctl::parse_answer(&l) {
                if a.id == id || a.id.is_none() {
                    return l;
                }
            }
        } else if m.closed {
            return format!("- {} the machine's COM2 connection is closed", outcome::GONE);
        }
    }
    format!(
        "{} {} no answer from the machine",
        id.map_or("-".to_string(), |i| i.to_string()),
        outcome::TIMEOUT
    )
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

    /// A machine that says it is ready after `boot` (never: `None`), then answers every
    /// request line `ok echo`, after a stale answer. Returns the bytes it got before it
    /// was ready.
    fn fake_machine(port: u16, boot: Option<Duration>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            std::thread::sleep(boot.unwrap_or(Duration::from_secs(3)));
            s.set_nonblocking(true).unwrap();
            let mut early = vec![0u8; 256];
            let n = (&s).read(&mut early).unwrap_or(0);
            early.truncate(n);
            s.set_nonblocking(false).unwrap();
            if boot.is_none() {
                return early;
            }
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            w.write_all(format!("{}\n", hostctl::READY_ON).as_bytes()).unwrap();
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                let id = line.split_whitespace().next().unwrap_or("-").to_string();
                let id = if id.parse::<u32>().is_ok() { id } else { "-".into() };
                // A stale answer for another id first: the relay skips it.
                let _ = w.write_all(format!("424242 ok stale\n{id} ok echo {}", line).as_bytes());
                line.clear();
            }
            early
        })
    }

    #[test]
    fn the_relay_matches_answers_to_requests_and_pauses_its_emulator() {
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::bind().unwrap();
        let machine = fake_machine(relay.port, Some(Duration::from_millis(600)));
        // A process group of its own to pause: a sleeping child.
        let mut child = std::process::Command::new("sleep");
        std::os::unix::process::CommandExt::process_group(&mut child, 0);
        let mut child = child.arg("30").spawn().unwrap();
        let running = relay.start(dir.path(), child.id(), true).unwrap();
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
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(machine.join().unwrap(), b"", "nothing reached the machine before it was ready");
    }

    #[test]
    fn a_request_before_the_machine_is_ready_waits_with_a_deadline_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::bind().unwrap();
        let machine = fake_machine(relay.port, None);
        let running = relay.start(dir.path(), std::process::id(), true).unwrap();
        let t0 = Instant::now();
        let e = request(dir.path(), "7 query w1", Duration::from_secs(1)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3), "the client's deadline held");
        assert_eq!(crate::exit::of_error(&e), crate::exit::TIMEOUT);
        assert!(format!("{e:#}").contains("did not open host control (COM2) within 1 s"), "{e:#}");
        // The relay saw the client go and serves the next one (pause needs no machine).
        assert!(request(dir.path(), "8 resume", Duration::from_secs(5))
            .unwrap()
            .starts_with("8 busy"));
        running.finish(Instant::now());
        assert_eq!(machine.join().unwrap(), b"", "the abandoned request never reached it");

        // A machine without COM2 answers at once.
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::bind().unwrap();
        let running = relay.start(dir.path(), std::process::id(), false).unwrap();
        let a = request(dir.path(), "9 query w1", Duration::from_secs(5)).unwrap();
        assert!(a.starts_with("9 error this machine has no COM2"), "{a}");
        running.finish(Instant::now());
    }

    #[test]
    fn a_client_that_half_closes_before_ready_still_gets_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::bind().unwrap();
        let machine = fake_machine(relay.port, Some(Duration::from_millis(800)));
        let running = relay.start(dir.path(), std::process::id(), true).unwrap();
        let mut s = UnixStream::connect(dir.path().join(SOCKET)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"7 query w1\n").unwrap();
        // Done sending, still reading the answer (what `nc -N` and `socat` do).
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut a = String::new();
        BufReader::new(&s).read_line(&mut a).unwrap();
        assert_eq!(a.trim_end(), "7 ok echo 7 query w1", "answered, not given up on");
        drop(s);
        running.finish(Instant::now());
        assert_eq!(machine.join().unwrap(), b"");
    }

    #[test]
    fn outcomes_have_distinct_exit_codes() {
        let codes: std::collections::BTreeSet<u8> =
            outcome::ALL.iter().map(|o| exit_code(o)).collect();
        assert_eq!(codes.len(), outcome::ALL.len());
        assert_eq!(exit_code("ok"), 0);
    }
}
