// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system test of the guest SDK's TCP/IP stack (`guestkernel::tcpip`, smoltcp over
//! the guest's e1000): workload `tcpecho` in Bochs, reached from the host through slirp's
//! forwarding of 127.0.0.1:17777 (`configs/tcp-echo.toml`). A host thread sends with
//! `std::net::UdpSocket` until three datagrams came back (smoltcp's UDP socket, port
//! 17778), then with `std::net::TcpStream` makes the three connections the guest waits for:
//! two of request/reply lines, one bulk stream written and read concurrently; every byte
//! must come back unchanged and in order. The run ends when the
//! guest exits after the third. Figures (host time, the guest's instructions) are
//! printed, never asserted. The same body runs on Bochs/VT-x and on QEMU/SVM (QEMU's
//! user-mode network forwards the same ports).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use systests::boot_config;
use xtask::cli::Emulator;

const ADDR: &str = "127.0.0.1:17777";
const UDP_ADDR: &str = "127.0.0.1:17778";
const LINES: usize = 20;
const BULK: usize = 256 * 1024;

/// The `k`-th line of connection `c`.
fn line(c: usize, k: usize) -> String {
    format!("connection {c} line {k}: {}\n", "abcdefghij".repeat(k % 7))
}

/// The bulk stream's bytes: position-dependent, so a reordering or a lost chunk shows.
fn bulk_byte(i: usize) -> u8 {
    (i.wrapping_mul(7) ^ (i >> 9)) as u8
}

/// Connects, retrying while nothing listens yet (Bochs not started); once slirp accepts,
/// the connection completes when the guest answers slirp's SYN, however long that takes
/// (the read timeout is long for that reason: closing early could leave slirp a
/// half-made connection the guest would count).
fn connect(deadline: Instant) -> TcpStream {
    loop {
        match TcpStream::connect_timeout(&ADDR.parse().unwrap(), Duration::from_secs(5)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
                s.set_nodelay(true).unwrap();
                return s;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "nothing accepted on {ADDR}: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// Sends each line and reads its echo before the next; returns the bytes echoed, or the
/// error with the number of lines echoed before it.
fn lines(s: &mut TcpStream, c: usize) -> Result<usize, (usize, std::io::Error)> {
    let mut total = 0;
    for k in 0..LINES {
        let l = line(c, k);
        s.write_all(l.as_bytes()).map_err(|e| (k, e))?;
        let mut back = vec![0; l.len()];
        s.read_exact(&mut back).map_err(|e| (k, e))?;
        assert_eq!(String::from_utf8_lossy(&back), l, "connection {c}");
        total += l.len();
    }
    Ok(total)
}

/// Writes `BULK` bytes from a second thread while this one reads the echo.
fn bulk(s: &mut TcpStream) -> std::io::Result<usize> {
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..BULK).map(bulk_byte).collect();
        for chunk in data.chunks(4096) {
            w.write_all(chunk)?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut back = vec![0; BULK];
    s.read_exact(&mut back)?;
    writer.join().unwrap()?;
    let bad = (0..BULK).find(|&i| back[i] != bulk_byte(i));
    assert_eq!(bad, None, "the bulk echo differs from byte {bad:?} on");
    Ok(BULK)
}

/// Datagrams to 127.0.0.1:17778 (the guest's UDP port 7778) until three echoes came back,
/// each a datagram we sent, unchanged; sent again every 300 ms until the guest is up (it may
/// echo copies slirp queued meanwhile). Returns the echoes.
fn datagrams(deadline: Instant) -> usize {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let (mut echoes, mut next) = (0, 0);
    let mut buf = [0u8; 2048];
    while echoes < 3 {
        assert!(Instant::now() < deadline, "no UDP echo from the guest");
        let _ = s.send_to(format!("datagram {next} from the host").as_bytes(), UDP_ADDR);
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            assert_eq!(from.port(), 17778);
            let e = String::from_utf8_lossy(&buf[..n]).into_owned();
            let k: usize = e
                .strip_prefix("datagram ")
                .and_then(|r| r.strip_suffix(" from the host"))
                .and_then(|k| k.parse().ok())
                .unwrap_or_else(|| panic!("not a datagram of ours: {e:?}"));
            assert!(k <= next, "{e:?}");
            echoes += 1;
            next += 1;
        }
    }
    echoes
}

/// One connection: its exchange, then our close and the guest's (end of stream). The
/// first one is made again if slirp gave up on the guest before it came up (reset or end
/// of stream before the first echo: the guest never had that connection).
fn session(c: usize, deadline: Instant) -> (usize, Duration) {
    loop {
        let mut s = connect(deadline);
        let t0 = Instant::now();
        let n = match if c == 3 { bulk(&mut s).map_err(|e| (1, e)) } else { lines(&mut s, c) } {
            Ok(n) => n,
            Err((0, e)) if c == 1 && Instant::now() < deadline => {
                eprintln!("host: connection 1 not answered ({e}); again");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            Err((_, e)) => panic!("connection {c}: {e}"),
        };
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap_or_else(|e| panic!("connection {c}: close: {e}"));
        assert!(rest.is_empty(), "connection {c}: {} bytes after the echo", rest.len());
        return (n, t0.elapsed());
    }
}

#[test]
fn a_guest_echoes_tcp_from_the_host_through_the_sdk_stack() {
    tcp_echo(Emulator::Bochs);
}

#[test]
fn a_guest_echoes_tcp_from_the_host_through_the_sdk_stack_on_qemu_svm() {
    tcp_echo(Emulator::Qemu);
}

/// The Bochs and QEMU runs forward the same host ports: one at a time (the tests of a file
/// run at once).
static PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tcp_echo(emulator: Emulator) {
    let _ports = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let client = std::thread::spawn(|| {
        let deadline = Instant::now() + Duration::from_secs(280);
        let echoes = datagrams(deadline);
        (echoes, (1..=3).map(|c| session(c, deadline)).collect::<Vec<_>>())
    });
    let b = boot_config(emulator, None, None, "", Some("configs/tcp-echo.toml"));
    let (echoes, sessions) = client.join().expect("the host client failed");
    assert_eq!(b.report.outcome, "ok", "{:?}\n{}", b.report.problems, b.serial);
    let g = b.guest("echo");
    assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}\n{}", b.serial);
    let said = |prefix: &str| {
        b.serial.lines().find_map(|l| l.strip_prefix("[echo@c0] ")?.strip_prefix(prefix))
    };
    assert!(said("tcpecho: up: e1000, MAC ").is_some(), "{}", b.serial);
    let line_bytes: usize = (0..LINES).map(|k| line(0, k).len()).sum();
    for (c, want) in [(1, line_bytes), (2, line_bytes), (3, BULK)] {
        assert!(said(&format!("tcpecho: connection {c} from 10.0.2.2:")).is_some(), "{c}");
        let closed = said(&format!("tcpecho: connection {c} closed (CLOSED): "));
        assert!(
            closed.is_some_and(|l| l.starts_with(&format!("{want} bytes echoed in "))),
            "connection {c}: {closed:?}\n{}",
            b.serial
        );
    }
    let total = 2 * line_bytes + BULK;
    let done = said(&format!("tcpecho: done: 3 connection(s), {total} bytes echoed, "));
    let udp: usize = done
        .and_then(|l| l.split_once(" datagram(s)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("{done:?}\n{}", b.serial));
    // The guest echoed at least what came back, maybe more (copies slirp queued).
    assert!(udp >= echoes && echoes == 3, "{udp} datagrams echoed, {echoes} came back");
    assert!(said("tcpecho: udp: echoed 24 bytes to 10.0.2.2:").is_some());
    // Interrupt-driven: the guest slept between frames and the card's interrupt woke it.
    let bench = said("bench tcpecho e1000: ").expect("a bench line");
    eprintln!("guest: {bench}");
    assert!(!bench.contains(" 0 sleeps") && !bench.contains("(0 ended by the card"), "{bench}");
    if emulator == Emulator::Bochs {
        // VT-x: the card's interrupts reach the guest's IDT without an exit.
        assert!(!g.exits.contains_key("external_interrupt"), "{:?}", g.exits);
    } else {
        // SVM: each through the host (an INTR exit) and the guest's EOI (a WRMSR exit).
        let count = |k: &str| g.exits.get(k).copied().unwrap_or(0);
        assert!(count("external_interrupt") >= 1 && count("wrmsr") >= 1, "{:?}", g.exits);
        eprintln!("guest exits on SVM: {:?}", g.exits);
    }
    for (c, (n, t)) in sessions.iter().enumerate() {
        eprintln!(
            "host: connection {}: {n} bytes echoed in {:.3} s ({:.0} bytes/s each way)",
            c + 1,
            t.as_secs_f64(),
            *n as f64 / t.as_secs_f64()
        );
    }
}
