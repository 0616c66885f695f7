// SPDX-License-Identifier: MIT OR Apache-2.0
//! Workload `tcpecho`: a TCP echo server on the SDK's TCP/IP stack ([`guestkernel::tcpip`],
//! smoltcp) over the guest's first card, at slirp's 10.0.2.15. It listens on `port` with
//! `backlog` sockets, accepts connections as they come (a client's next one may arrive
//! while the last one is still closing) and sends every byte back on the connection it
//! came on; when the peer closes its side, it closes its own once everything is echoed.
//! With `udp_port`, it also echoes UDP datagrams to that port back to their sender
//! (smoltcp's UDP socket) meanwhile.
//! After `connections` connections, or at `ms`, it stops. A host reaches it through
//! slirp's host forwarding (`forward = ["tcp:HOST-PORT"]` on the card,
//! `configs/tcp-echo.toml`).
//!
//! Console: `tcpecho: up:` with the card and the address, one `tcpecho: connection N
//! from IP:PORT` when a connection is established and one `tcpecho: connection N closed:`
//! with its bytes, reads and instructions; at the end a `bench tcpecho:` line (work
//! instructions per read and per KiB, frames, sleeps and what ended them) and
//! `tcpecho: done:`. Exit statuses: 0 all connections served, 2 the card did not come up,
//! 5 fewer connections than asked by `ms`, 6 the port could not be listened on.

use alloc::vec::Vec;
use guestkernel::arch::rdtsc;
use guestkernel::pci;
use guestkernel::tcpip::smoltcp::iface::SocketHandle;
use guestkernel::tcpip::smoltcp::socket::tcp::{self, State};
use guestkernel::tcpip::{Config, Iface, Stats};
use vmcall_proto::guest::BootInfo;

const NOT_UP: u64 = 2;
const SHORT: u64 = 5;
const NO_LISTEN: u64 = 6;

/// The connection being served.
struct Conn {
    n: u64,
    bytes: u64,
    reads: u64,
    t0: u64,
    idle0: u64,
}

/// A listening socket and the connection it serves.
struct Slot {
    h: SocketHandle,
    conn: Option<Conn>,
}

/// Echoes what came, as far as the send buffer takes it (the rest waits in the receive
/// buffer); closes our side once the peer closed its own and everything is echoed.
fn echo(s: &mut tcp::Socket<'_>, c: &mut Conn, chunk: &mut [u8]) {
    while s.can_recv() && s.send_queue() < s.send_capacity() {
        let room = (s.send_capacity() - s.send_queue()).min(chunk.len());
        let Ok(got) = s.recv_slice(&mut chunk[..room]) else { break };
        if got == 0 {
            break;
        }
        let sent = s.send_slice(&chunk[..got]).unwrap_or(0);
        debug_assert_eq!(sent, got, "the send buffer had room for it");
        c.bytes += sent as u64;
        c.reads += 1;
    }
    if s.state() == State::CloseWait && s.recv_queue() == 0 {
        s.close();
    }
}

/// Established from our side: the handshake is done and we have not yet seen it end.
fn connected(s: State) -> bool {
    !matches!(
        s,
        State::Closed | State::Listen | State::SynSent | State::SynReceived | State::TimeWait
    )
}

/// Gone: ended (closed, reset, timed out), or back to listening.
fn ended(s: State) -> bool {
    matches!(s, State::Closed | State::Listen | State::TimeWait)
}

pub fn tcpecho(bi: &BootInfo) -> u64 {
    let port = bi.arg_int("port") as u16;
    let want = bi.arg_int("connections");
    let ms = bi.arg_int("ms");
    let buffer = bi.arg_int("buffer") as usize;
    let t_open = rdtsc();
    let mut net = match Iface::open(bi, 0, &Config::SLIRP, pci::deadline_ms(2000)) {
        Ok(n) => n,
        Err(e) => {
            log::error!("tcpecho: the card did not come up: {e}");
            return NOT_UP;
        }
    };
    net.set_trace(bi.arg_int("trace") == 1);
    let model = net.nic().model();
    log::info!(
        "tcpecho: up: {model}, MAC {}, 10.0.2.15/24 via 10.0.2.2, in {} TSC ticks; listening \
         on TCP port {port} for {want} connection(s) within {ms} ms",
        guestkernel::net::MacFmt(net.nic().mac()),
        rdtsc() - t_open
    );
    // Several sockets listen on the port: a connection that comes while another one is
    // still closing (slirp connects the host's next one as soon as it saw our FIN, before
    // our last ACK came back) finds one listening, not a reset.
    let mut slots = Vec::new();
    for _ in 0..bi.arg_int("backlog") {
        let h = net.add_tcp(buffer, buffer);
        let s = net.tcp(h);
        // An echo answers each write at once: Nagle would hold a short answer back until
        // the previous one is acknowledged.
        s.set_nagle_enabled(false);
        if let Err(e) = s.listen(port) {
            log::error!("tcpecho: listen on {port}: {e}");
            return NO_LISTEN;
        }
        slots.push(Slot { h, conn: None });
    }
    let udp_port = bi.arg_int("udp_port") as u16;
    let udp = if udp_port != 0 {
        let u = net.add_udp(8, buffer);
        if let Err(e) = net.udp(u).bind(udp_port) {
            log::error!("tcpecho: bind UDP port {udp_port}: {e}");
            return NO_LISTEN;
        }
        log::info!("tcpecho: echoing UDP datagrams to port {udp_port} too");
        Some(u)
    } else {
        None
    };
    let mut datagrams = 0u64;
    let deadline = pci::deadline_ms(ms);
    let mut chunk = alloc::vec![0u8; buffer];
    let (mut accepted, mut done, mut bytes, mut reads) = (0u64, 0u64, 0u64, 0u64);
    let start: Stats = net.stats();
    // From the first connection on: the TSC and the idle ticks then.
    let mut span: Option<(u64, u64)> = None;
    while done < want {
        net.poll();
        let idle = net.stats().idle_tsc;
        if let Some(u) = udp {
            let u = net.udp(u);
            while let Ok((n, meta)) = u.recv_slice(&mut chunk) {
                if u.send_slice(&chunk[..n], meta.endpoint).is_ok() {
                    datagrams += 1;
                    log::info!("tcpecho: udp: echoed {n} bytes to {}", meta.endpoint);
                }
            }
        }
        for slot in slots.iter_mut() {
            let s = net.tcp(slot.h);
            if slot.conn.is_none() && connected(s.state()) {
                if accepted >= want {
                    // One more than asked for: refused, not served.
                    s.abort();
                    continue;
                }
                accepted += 1;
                match s.remote_endpoint() {
                    Some(r) => log::info!("tcpecho: connection {accepted} from {r}"),
                    None => log::info!("tcpecho: connection {accepted}"),
                }
                let t0 = rdtsc();
                span.get_or_insert((t0, idle));
                slot.conn = Some(Conn { n: accepted, bytes: 0, reads: 0, t0, idle0: idle });
            }
            if let Some(c) = slot.conn.as_mut() {
                echo(s, c, &mut chunk);
                let state = s.state();
                if ended(state) {
                    let busy = (rdtsc() - c.t0).saturating_sub(idle - c.idle0);
                    log::info!(
                        "tcpecho: connection {} closed ({state}): {} bytes echoed in {} reads, \
                         {busy} TSC ticks of work",
                        c.n,
                        c.bytes,
                        c.reads,
                    );
                    (bytes, reads) = (bytes + c.bytes, reads + c.reads);
                    done += 1;
                    slot.conn = None;
                }
            }
            if !s.is_open() && accepted < want {
                if let Err(e) = s.listen(port) {
                    log::error!("tcpecho: listen on {port} again: {e}");
                    return NO_LISTEN;
                }
            }
        }
        if done >= want || rdtsc() >= deadline {
            break;
        }
        net.wait(deadline);
    }
    // The work: from the first connection to the last close, less the time halted.
    let work =
        span.map_or(0, |(t0, idle0)| (rdtsc() - t0).saturating_sub(net.stats().idle_tsc - idle0));
    let st = net.stats();
    log::info!(
        "bench tcpecho {model}: {done} connections, {bytes} bytes in {reads} reads; work {} TSC \
         ticks per read, {} per KiB; frames in {} out {} ({} dropped sending); {} polls, {} \
         sleeps ({} ended by the card's interrupt, {} by a timer)",
        work.checked_div(reads).unwrap_or(0),
        (work * 1024).checked_div(bytes).unwrap_or(0),
        st.frames_in - start.frames_in,
        st.frames_out - start.frames_out,
        st.send_errors - start.send_errors,
        st.polls - start.polls,
        st.sleeps - start.sleeps,
        st.irq_wakes - start.irq_wakes,
        st.timer_wakes - start.timer_wakes
    );
    let status = if done >= want { 0 } else { SHORT };
    if status != 0 {
        log::error!("tcpecho: {done} of {want} connections served within {ms} ms");
    }
    log::info!(
        "tcpecho: done: {done} connection(s), {bytes} bytes echoed, {datagrams} datagram(s); {} \
         interrupts; exit {status}",
        pci::interrupts(net.nic().index())
    );
    status
}
