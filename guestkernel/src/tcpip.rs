// SPDX-License-Identifier: MIT OR Apache-2.0
//! A TCP/IP stack for guests: [smoltcp](https://docs.rs/smoltcp) over a card the guest
//! owns ([`crate::nic::Nic`]). [`NicDevice`] is smoltcp's `phy::Device` on the card;
//! [`Iface`] is the interface with static addressing ([`Config`]; slirp's network by
//! default), smoltcp's clock taken from the TSC, its sockets (TCP and UDP, buffers on the
//! guest heap), and the loop that drives it: [`Iface::poll`] moves frames until none moves,
//! [`Iface::wait`] halts until the card interrupts or smoltcp's next timer (a retransmit,
//! a delayed ACK) or the caller's deadline, whichever comes first. No busy polling while
//! idle: the core sleeps in HLT between frames.
//!
//! smoltcp because it is `no_std`, needs no allocator (the SDK's heap is used for socket
//! buffers only because it is there), is event-driven with no threads or timers of its
//! own (it says when it next wants to run, which is what [`Iface::wait`] sleeps on), and is
//! maintained. Built with `medium-ethernet`, `proto-ipv4`, `socket-tcp`, `socket-udp`
//! and `alloc` only; [`smoltcp`] is re-exported so a guest names the same version.
//!
//! Invariants: the interface never halts with a frame it could take waiting in the ring
//! (Bochs completes a transmit and slirp's answer within the register write that starts
//! it, so [`Iface::poll`] goes round again after any frame moved, and a card's interrupt
//! that came in the meantime ends the next wait at once); a frame the card would not
//! take is dropped and counted ([`Stats::send_errors`]): TCP sends it again.
//!
//! May call: `nic`, `pci` (interrupt waits, deadlines), `arch` (the TSC), `net`
//! (constants), smoltcp, `alloc`.

use crate::net::MAX_FRAME;
use crate::nic::{Nic, NicError};
use crate::pci;
use alloc::vec;
use alloc::vec::Vec;
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, HardwareAddress, IpCidr, Ipv4Address, PrettyPrinter,
};
use vmcall_proto::guest::BootInfo;

pub use smoltcp;

/// How long a send may wait for the card before the frame is dropped (ms).
const SEND_MS: u64 = 100;

/// Static addressing of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub address: [u8; 4],
    pub prefix_len: u8,
    pub gateway: [u8; 4],
}

impl Config {
    /// The emulators' user-mode network (slirp): 10.0.2.15/24, gateway 10.0.2.2.
    pub const SLIRP: Config =
        Config { address: [10, 0, 2, 15], prefix_len: 24, gateway: [10, 0, 2, 2] };
}

/// What the interface did, as a whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames handed to smoltcp, and their bytes.
    pub frames_in: u64,
    pub bytes_in: u64,
    /// Frames smoltcp sent that the card took, and their bytes.
    pub frames_out: u64,
    pub bytes_out: u64,
    /// Frames smoltcp sent that the card did not take in time (dropped).
    pub send_errors: u64,
    /// Receive errors the card reported (the frame is lost).
    pub recv_errors: u64,
    /// Rounds of smoltcp's `poll` (several per [`Iface::poll`] when frames move).
    pub polls: u64,
    /// Waits that halted, and how they ended: the card's interrupt, or the timer
    /// (smoltcp's next deadline or the caller's).
    pub sleeps: u64,
    pub irq_wakes: u64,
    pub timer_wakes: u64,
    /// TSC ticks spent halted in [`Iface::wait`] (emulated instructions not executed, in
    /// Bochs): the rest of a run is the work.
    pub idle_tsc: u64,
}

/// smoltcp's `phy::Device` on a card: one frame buffer each way, frames copied once
/// between the card's buffers and smoltcp's.
pub struct NicDevice {
    nic: Nic,
    rx: Vec<u8>,
    tx: Vec<u8>,
    stats: Stats,
    trace: bool,
}

impl NicDevice {
    pub fn new(nic: Nic) -> NicDevice {
        let (rx, tx) = (vec![0; MAX_FRAME], vec![0; MAX_FRAME]);
        NicDevice { nic, rx, tx, stats: Stats::default(), trace: false }
    }

    pub fn nic(&self) -> &Nic {
        &self.nic
    }

    /// Frames moved either way so far (received, sent or refused).
    fn moved(&self) -> u64 {
        self.stats.frames_in + self.stats.frames_out + self.stats.send_errors
    }
}

/// A received frame, lent to smoltcp.
pub struct RxToken<'a> {
    frame: &'a [u8],
}

/// Room for one frame to send; the card sends it when smoltcp has written it.
pub struct TxToken<'a> {
    nic: &'a mut Nic,
    buf: &'a mut [u8],
    stats: &'a mut Stats,
    trace: bool,
}

/// Logs a frame, decoded (`tcpip: rx` or `tx`, then smoltcp's description of each layer).
fn trace(way: &str, frame: &[u8]) {
    let p = PrettyPrinter::<EthernetFrame<&[u8]>>::new("", &frame);
    log::info!("tcpip: {way} {p}");
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // smoltcp never asks for more than the MTU it was given (a whole frame).
        let len = len.min(self.buf.len());
        let r = f(&mut self.buf[..len]);
        if self.trace {
            trace("tx", &self.buf[..len]);
        }
        match self.nic.send(&self.buf[..len], pci::deadline_ms(SEND_MS)) {
            Ok(()) => {
                self.stats.frames_out += 1;
                self.stats.bytes_out += len as u64;
            }
            Err(_) => self.stats.send_errors += 1,
        }
        r
    }
}

impl phy::Device for NicDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        match self.nic.try_recv(&mut self.rx, pci::deadline_ms(SEND_MS)) {
            Ok(Some(n)) => {
                self.stats.frames_in += 1;
                self.stats.bytes_in += n as u64;
                if self.trace {
                    trace("rx", &self.rx[..n]);
                }
                let trace = self.trace;
                Some((
                    RxToken { frame: &self.rx[..n] },
                    TxToken {
                        nic: &mut self.nic,
                        buf: &mut self.tx,
                        stats: &mut self.stats,
                        trace,
                    },
                ))
            }
            Ok(None) => None,
            Err(_) => {
                self.stats.recv_errors += 1;
                None
            }
        }
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        let trace = self.trace;
        Some(TxToken { nic: &mut self.nic, buf: &mut self.tx, stats: &mut self.stats, trace })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // An Ethernet medium's MTU counts the header: a whole frame without FCS.
        caps.max_transmission_unit = MAX_FRAME;
        // smoltcp clamps the TCP window it advertises to this many segments: as many as
        // the card's receive ring holds, so a peer sending a whole window at once loses
        // nothing (one segment only would cost a round trip per segment).
        caps.max_burst_size = Some(self.nic.rx_frames());
        caps
    }
}

/// How a [`Iface::wait`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// smoltcp has work now (data queued to send, a timer due): no sleep.
    Now,
    /// The card interrupted.
    Irq,
    /// smoltcp's next deadline or the caller's came.
    Timer,
}

/// A network interface on one card: smoltcp's `Interface`, its sockets and its device.
pub struct Iface {
    dev: NicDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    tsc_per_ms: u64,
}

impl Iface {
    /// Brings up the guest's device `i` ([`Nic::open`], waiting for the link until
    /// `deadline`) and puts an interface with `cfg`'s addressing on it.
    pub fn open(bi: &BootInfo, i: usize, cfg: &Config, deadline: u64) -> Result<Iface, NicError> {
        pci::init(bi);
        let nic = Nic::open(bi, i, deadline)?;
        Ok(Iface::new(nic, cfg, bi.tsc_per_ms))
    }

    /// An interface on a card already up.
    pub fn new(nic: Nic, cfg: &Config, tsc_per_ms: u64) -> Iface {
        let mut dev = NicDevice::new(nic);
        let mac = EthernetAddress(dev.nic.mac());
        let mut ic = smoltcp::iface::Config::new(HardwareAddress::Ethernet(mac));
        // Initial sequence numbers and ephemeral ports: the TSC at bring-up is as good a
        // seed as a guest has (exact instruction counts in Bochs: runs repeat).
        ic.random_seed = crate::arch::rdtsc();
        let tsc_per_ms = tsc_per_ms.max(1);
        let now = instant(crate::arch::rdtsc(), tsc_per_ms);
        let mut iface = Interface::new(ic, &mut dev, now);
        let [a, b, c, d] = cfg.address;
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(Ipv4Address::new(a, b, c, d).into(), cfg.prefix_len));
        });
        let [a, b, c, d] = cfg.gateway;
        let _ = iface.routes_mut().add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
        Iface { dev, iface, sockets: SocketSet::new(Vec::new()), tsc_per_ms }
    }

    /// smoltcp's clock: the TSC in microseconds.
    pub fn now(&self) -> Instant {
        instant(crate::arch::rdtsc(), self.tsc_per_ms)
    }

    pub fn nic(&self) -> &Nic {
        self.dev.nic()
    }

    pub fn stats(&self) -> Stats {
        self.dev.stats
    }

    /// With `on`, logs every frame either way, decoded by smoltcp (`tcpip: rx ...`).
    pub fn set_trace(&mut self, on: bool) {
        self.dev.trace = on;
    }

    /// A TCP socket with `rx` and `tx` bytes of buffer (heap).
    pub fn add_tcp(&mut self, rx: usize, tx: usize) -> SocketHandle {
        let s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; rx]),
            tcp::SocketBuffer::new(vec![0u8; tx]),
        );
        self.sockets.add(s)
    }

    /// A UDP socket holding up to `packets` datagrams and `bytes` bytes each way (heap).
    pub fn add_udp(&mut self, packets: usize, bytes: usize) -> SocketHandle {
        let buf =
            || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0u8; bytes]);
        self.sockets.add(udp::Socket::new(buf(), buf()))
    }

    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut(h)
    }

    pub fn udp(&mut self, h: SocketHandle) -> &mut udp::Socket<'static> {
        self.sockets.get_mut(h)
    }

    /// Runs smoltcp until no frame moves: takes what the card holds, sends what the
    /// sockets have queued, and goes round again after any frame (an answer may already
    /// be in the ring). Returns whether a socket's state may have changed.
    pub fn poll(&mut self) -> bool {
        let mut changed = false;
        loop {
            let before = self.dev.moved();
            let now = self.now();
            self.dev.stats.polls += 1;
            let r = self.iface.poll(now, &mut self.dev, &mut self.sockets);
            changed |= r == smoltcp::iface::PollResult::SocketStateChanged;
            if self.dev.moved() == before {
                return changed;
            }
        }
    }

    /// Sleeps until the card interrupts, smoltcp's next timer is due, or the TSC passes
    /// `deadline`, whichever is first; returns at once when smoltcp wants to run now.
    /// Call [`Iface::poll`] after it.
    pub fn wait(&mut self, deadline: u64) -> Wake {
        let now = crate::arch::rdtsc();
        let until = match self.iface.poll_delay(instant(now, self.tsc_per_ms), &self.sockets) {
            Some(d) if d == Duration::ZERO => return Wake::Now,
            Some(d) => {
                let ticks = (d.total_micros() as u128 * self.tsc_per_ms as u128 / 1000) as u64;
                now.saturating_add(ticks.max(1)).min(deadline)
            }
            None => deadline,
        };
        if now >= until {
            return Wake::Timer;
        }
        let s = &mut self.dev.stats;
        s.sleeps += 1;
        let irq = pci::wait_irq(self.dev.nic.index(), until);
        s.idle_tsc += crate::arch::rdtsc().saturating_sub(now);
        if irq {
            s.irq_wakes += 1;
            Wake::Irq
        } else {
            s.timer_wakes += 1;
            Wake::Timer
        }
    }
}

/// A TSC value as smoltcp's clock (microseconds).
fn instant(tsc: u64, tsc_per_ms: u64) -> Instant {
    Instant::from_micros((tsc as u128 * 1000 / tsc_per_ms as u128) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_becomes_microseconds() {
        assert_eq!(instant(0, 1_000_000), Instant::from_micros(0));
        assert_eq!(instant(2_500_000, 1_000_000), Instant::from_micros(2500));
        // Far into a run: no overflow on the way.
        assert_eq!(instant(u64::MAX / 2, 1 << 20).total_millis(), ((u64::MAX / 2) >> 20) as i64);
    }
}
