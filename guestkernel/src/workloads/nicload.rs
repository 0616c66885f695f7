// SPDX-License-Identifier: MIT OR Apache-2.0
//! Workload `nic`: a guest's network cards, end to end through the emulator's user-mode
//! network (slirp: this guest is 10.0.2.15, the gateway 10.0.2.2; each card has its own
//! slirp instance).
//!
//! 1. Lists its devices (boot info) and scans bus 0: function 0 of every device number.
//!    It must see exactly its own functions, everything else all ones (with no devices:
//!    nothing at all). This is the isolation check, and all a device-less guest does.
//! 2. For each card: brings it up ([`guestkernel::nic::Nic::open`]), times `latency`
//!    software-raised interrupts from the trigger to the handler, asks the gateway's MAC
//!    address (ARP), sends `pings` ICMP echo requests to it and checks each reply. It
//!    answers ARP requests for its own address meanwhile.
//! 3. With `udp_port`, on the first card: echoes UDP datagrams sent to that port back to
//!    their sender, `datagrams` of them or until `echo_ms` (a host test reaches it
//!    through slirp's host forwarding).
//!
//! 4. With `crash=1` (a guest that restarts): the first incarnation, once its first card is
//!    up and has answered, sends a burst of echo requests it does not wait for and dies
//!    (`ud2`: its exception handler exits non-zero) with their replies due; every later
//!    incarnation
//!    first checks that its cards come to it as at boot (bus mastering off: the hypervisor
//!    quiesced them at the death) and that no frame of the dead one reached its memory,
//!    then brings them up and runs 1-3 again.
//!
//! A final `nic: done:` line gives each card's interrupts and frames. Exit statuses: 0
//! success, 1 the scan saw a function it does not own (or missed its own), 2 a card did
//! not come up, 3 no ARP reply, 4 an echo reply missing or wrong, 5 fewer datagrams
//! echoed than asked, 6 a send failed.

use guestkernel::net::{self, Echo, IpFmt, Ipv4, Mac, MacFmt, Route, Udp};
use guestkernel::nic::{Nic, NicError};
use guestkernel::pci::{self, Found};
use vmcall_proto::device::{bar_kind, DeviceDesc};
use vmcall_proto::guest::BootInfo;

/// slirp's default network: the guest's address and the gateway's.
pub const MY_IP: Ipv4 = [10, 0, 2, 15];
pub const GATEWAY: Ipv4 = [10, 0, 2, 2];
/// The echo identifier of our pings ("mk").
const IDENT: u16 = 0x6d6b;

const ISOLATION: u64 = 1;
const BRING_UP: u64 = 2;
const NO_ARP: u64 = 3;
const BAD_PING: u64 = 4;
const UDP_SHORT: u64 = 5;
const SEND_FAILED: u64 = 6;
const NOT_QUIESCED: u64 = 7;

/// A frame buffer the first incarnation of a `crash=1` guest hands its card (a static: the
/// same guest-physical address in every incarnation, zeroed by the hypervisor between
/// them). The next incarnation finds it all zero, or a frame reached it after the scrub.
static mut LANDING: [u8; 4096] = [0; 4096];

pub fn nic(bi: &BootInfo) -> u64 {
    pci::init(bi);
    let devs = pci::devices(bi);
    log::info!("nic: {} device(s) in my boot info, DMA offset {:#x}", devs.len(), bi.dma_offset);
    for (i, d) in devs.iter().enumerate() {
        describe(i, d);
    }
    if devs.is_empty() {
        // Without a device there is no PCI at all: the ports may raise #GP.
        if let Err((vector, _)) = pci::try_read_id(vmcall_proto::device::Bdf::new(0, 0, 0)) {
            let ok = vector == 13;
            log::info!(
                "nic: done: no device; configuration ports raise vector {vector}{}",
                if ok { " (#GP): no PCI at all" } else { ", not #GP" }
            );
            return if ok { 0 } else { ISOLATION };
        }
    }
    if let Err(status) = isolation(devs) {
        return status;
    }
    if bi.incarnation > 1 {
        if let Err(status) = after_restart(bi, devs) {
            return status;
        }
    }
    if devs.is_empty() {
        log::info!("nic: done: no device, and none visible (all ones on bus 0)");
        return 0;
    }
    let mut reports = [None; vmcall_proto::device::MAX_DEVICES_PER_GUEST];
    let mut status = 0;
    for (i, report) in reports.iter_mut().enumerate().take(devs.len()) {
        match card(bi, i) {
            Ok(r) => *report = Some(r),
            Err((s, r)) => {
                *report = r;
                if status == 0 {
                    status = s;
                }
            }
        }
    }
    let mut line = guestkernel::console::Line::new();
    use core::fmt::Write;
    let _ = write!(line, "nic: done:");
    for (i, d) in devs.iter().enumerate() {
        let _ = match &reports[i] {
            Some(r) => write!(
                line,
                " {} {}: {} interrupts, {} frames sent, {} received, {} dropped, {} overruns;",
                r.model,
                d.bdf(),
                pci::interrupts(i),
                r.sent,
                r.received,
                r.dropped,
                r.overruns
            ),
            None => write!(line, " {}: not up, {} interrupts;", d.bdf(), pci::interrupts(i)),
        };
    }
    let _ = writeln!(line, " {} unclaimed; exit {status}", pci::unclaimed());
    line.flush();
    status
}

fn describe(i: usize, d: &DeviceDesc) {
    let mut line = guestkernel::console::Line::new();
    use core::fmt::Write;
    let _ = write!(
        line,
        "nic: device {i}: {} {:04x}:{:04x} class {:06x}, pin {}, vector {:#x}, dma {}:",
        d.bdf(),
        d.vendor_id,
        d.device_id,
        d.class,
        d.irq_pin,
        d.vector,
        if d.flags & vmcall_proto::device::flags::DMA_UNCONFINED != 0 {
            "unconfined"
        } else {
            "off"
        }
    );
    for (b, bar) in d.bars.iter().enumerate() {
        let _ = match bar.kind {
            bar_kind::MEMORY => write!(line, " bar{b} memory {:#x}+{:#x}", bar.addr, bar.size),
            bar_kind::IO => write!(line, " bar{b} io {:#x}+{:#x}", bar.addr, bar.size),
            _ => Ok(()),
        };
    }
    let _ = writeln!(line);
    line.flush();
}

/// Scans bus 0 and checks it shows exactly the owned functions.
fn isolation(devs: &[DeviceDesc]) -> Result<(), u64> {
    let mut found =
        [Found { bdf: vmcall_proto::device::Bdf::new(0, 0, 0), vendor: 0, device: 0 }; 32];
    let mut n = 0;
    pci::scan_bus0(|f| {
        found[n] = f;
        n += 1;
    });
    let found = &found[..n];
    let mut line = guestkernel::console::Line::new();
    use core::fmt::Write;
    let _ = write!(line, "nic: bus 0, function 0 of devices 0-31:");
    if found.is_empty() {
        let _ = write!(line, " nothing answers (all ones)");
    }
    for f in found {
        let _ = write!(line, " {} {:04x}:{:04x}", f.bdf, f.vendor, f.device);
    }
    let _ = writeln!(line);
    line.flush();
    let check = pci::check_scan(devs, found);
    // Owned functions the scan does not cover (another bus or function) answer too.
    let mut elsewhere_ok = true;
    for d in devs.iter().filter(|d| d.bus != 0 || d.function != 0) {
        let v = pci::read16(d.bdf(), pci::reg::VENDOR_ID);
        if v != d.vendor_id {
            log::error!("nic: my function {} reads vendor {v:#06x}", d.bdf());
            elsewhere_ok = false;
        }
    }
    if check.exact() && elsewhere_ok {
        log::info!("nic: isolation: I see exactly my {} function(s)", devs.len());
        Ok(())
    } else {
        log::error!(
            "nic: isolation: {} of mine, {} not mine visible, {} of mine missing",
            check.own,
            check.foreign,
            check.missing
        );
        Err(ISOLATION)
    }
}

/// What one card did.
#[derive(Clone, Copy)]
struct Report {
    model: &'static str,
    sent: u64,
    received: u64,
    dropped: u64,
    overruns: u64,
}

fn report(n: &Nic) -> Report {
    let s = n.stats();
    Report {
        model: n.model(),
        sent: s.sent,
        received: s.received,
        dropped: s.dropped,
        overruns: s.overruns,
    }
}

/// A card with the little IPv4 host on it.
struct Host {
    nic: Nic,
    name: &'static str,
    mac: Mac,
    ip_id: u16,
    /// Frames received that were none of what was waited for (other traffic).
    other: u64,
}

/// What a received frame was, once the host answered what it answers by itself.
enum Event<'a> {
    ArpReply { ip: Ipv4, mac: Mac },
    Echo { from: Ipv4, echo: Echo<'a> },
    Udp { route: Route, udp: Udp<'a> },
    Other,
}

impl Host {
    fn send(&mut self, frame: &[u8]) -> Result<(), NicError> {
        self.nic.send(frame, pci::deadline_ms(1000))
    }

    /// Receives one frame by `deadline` and classifies it; answers ARP requests for our
    /// address on the way.
    fn next<'b>(&mut self, buf: &'b mut [u8], deadline: u64) -> Result<Event<'b>, NicError> {
        let n = self.nic.recv(buf, deadline)?;
        let frame: &'b [u8] = buf;
        let Some(eth) = net::parse_eth(&frame[..n]) else { return Ok(Event::Other) };
        if eth.ethertype == net::ETHERTYPE_ARP {
            let Some(arp) = net::parse_arp(eth.payload) else { return Ok(Event::Other) };
            if arp.op == net::arp_op::REQUEST && arp.target_ip == MY_IP {
                let mut out = [0u8; 64];
                let reply = net::Arp::reply_to(&arp, self.mac);
                if let Some(len) = net::build_arp(&mut out, &reply) {
                    self.send(&out[..len])?;
                }
                return Ok(Event::Other);
            }
            if arp.op == net::arp_op::REPLY {
                return Ok(Event::ArpReply { ip: arp.sender_ip, mac: arp.sender_mac });
            }
            return Ok(Event::Other);
        }
        if eth.ethertype != net::ETHERTYPE_IPV4 {
            return Ok(Event::Other);
        }
        let Some(ip) = net::parse_ipv4(eth.payload) else { return Ok(Event::Other) };
        if ip.dst != MY_IP {
            return Ok(Event::Other);
        }
        if let Some(echo) = net::parse_echo(&ip) {
            return Ok(Event::Echo { from: ip.src, echo });
        }
        if let Some(udp) = net::parse_udp(&ip) {
            let route =
                Route { src_mac: eth.src, dst_mac: eth.dst, src_ip: ip.src, dst_ip: ip.dst };
            return Ok(Event::Udp { route, udp });
        }
        Ok(Event::Other)
    }

    /// The gateway's MAC address: an ARP request, sent up to three times.
    fn arp(&mut self, reply_ms: u64) -> Result<Mac, (u64, NicError)> {
        let mut out = [0u8; 64];
        let len = net::build_arp(&mut out, &net::Arp::request(self.mac, MY_IP, GATEWAY))
            .expect("an ARP request fits 64 bytes");
        let mut buf = [0u8; net::MAX_FRAME];
        let mut last = NicError::Timeout("an ARP reply");
        for _ in 0..3 {
            let t0 = guestkernel::arch::rdtsc();
            self.send(&out[..len]).map_err(|e| (SEND_FAILED, e))?;
            let deadline = pci::deadline_ms(reply_ms.div_ceil(3));
            loop {
                match self.next(&mut buf, deadline) {
                    Ok(Event::ArpReply { ip, mac }) if ip == GATEWAY => {
                        log::info!(
                            "nic: {}: ARP: {} is at {} ({} TSC ticks after the request)",
                            self.name,
                            IpFmt(GATEWAY),
                            MacFmt(mac),
                            guestkernel::arch::rdtsc() - t0
                        );
                        return Ok(mac);
                    }
                    Ok(_) => self.other += 1,
                    Err(e) => {
                        last = e;
                        break;
                    }
                }
            }
            log::warn!("nic: {}: no ARP reply yet ({last})", self.name);
        }
        Err((NO_ARP, last))
    }

    /// `count` echo requests to the gateway, each reply checked (identifier, sequence,
    /// data); returns the round trips' TSC ticks, smallest and largest.
    fn ping(&mut self, gw: Mac, count: u64, reply_ms: u64) -> Result<(u64, u64), (u64, NicError)> {
        let route = Route { src_mac: self.mac, dst_mac: gw, src_ip: MY_IP, dst_ip: GATEWAY };
        let mut data = [0u8; 32];
        let (mut lo, mut hi) = (u64::MAX, 0);
        let mut buf = [0u8; net::MAX_FRAME];
        for seq in 1..=count as u16 {
            for (k, b) in data.iter_mut().enumerate() {
                *b = (seq as u8).wrapping_mul(31).wrapping_add(k as u8);
            }
            let req = Echo { kind: net::icmp_type::ECHO_REQUEST, ident: IDENT, seq, data: &data };
            let mut out = [0u8; 128];
            self.ip_id = self.ip_id.wrapping_add(1);
            let len = net::build_echo(&mut out, &route, self.ip_id, &req).expect("fits 128 bytes");
            let t0 = guestkernel::arch::rdtsc();
            self.send(&out[..len]).map_err(|e| (SEND_FAILED, e))?;
            let deadline = pci::deadline_ms(reply_ms);
            loop {
                match self.next(&mut buf, deadline) {
                    Ok(Event::Echo { from, echo })
                        if from == GATEWAY
                            && echo.kind == net::icmp_type::ECHO_REPLY
                            && echo.ident == IDENT
                            && echo.seq == seq =>
                    {
                        if echo.data != data {
                            log::error!("nic: {}: echo reply {seq} carries other data", self.name);
                            return Err((BAD_PING, NicError::Hardware("echo data differs")));
                        }
                        let rtt = guestkernel::arch::rdtsc() - t0;
                        (lo, hi) = (lo.min(rtt), hi.max(rtt));
                        log::info!(
                            "nic: {}: echo reply from {} seq {seq}: {} bytes, {rtt} TSC ticks",
                            self.name,
                            IpFmt(from),
                            echo.data.len()
                        );
                        break;
                    }
                    Ok(_) => self.other += 1,
                    Err(e) => {
                        log::error!("nic: {}: echo request {seq}: {e}", self.name);
                        return Err((BAD_PING, e));
                    }
                }
            }
        }
        Ok((lo, hi))
    }

    /// Echoes datagrams to `port` back to their senders.
    fn udp_echo(&mut self, port: u16, want: u64, echo_ms: u64) -> Result<u64, (u64, NicError)> {
        log::info!(
            "nic: {}: echoing UDP to {}:{port}, {want} datagram(s) within {echo_ms} ms",
            self.name,
            IpFmt(MY_IP)
        );
        let deadline = pci::deadline_ms(echo_ms);
        let mut buf = [0u8; net::MAX_FRAME];
        let mut out = [0u8; net::MAX_FRAME];
        let mut done = 0;
        while done < want {
            match self.next(&mut buf, deadline) {
                Ok(Event::Udp { route, udp }) if udp.dst_port == port => {
                    let back = route.reversed();
                    let reply = Udp { src_port: port, dst_port: udp.src_port, data: udp.data };
                    self.ip_id = self.ip_id.wrapping_add(1);
                    let Some(len) = net::build_udp(&mut out, &back, self.ip_id, &reply) else {
                        continue;
                    };
                    self.send(&out[..len]).map_err(|e| (SEND_FAILED, e))?;
                    done += 1;
                    log::info!(
                        "nic: {}: echoed {} bytes to {}:{}",
                        self.name,
                        udp.data.len(),
                        IpFmt(route.src_ip),
                        udp.src_port
                    );
                }
                Ok(_) => self.other += 1,
                Err(e @ NicError::Timeout(_)) => {
                    log::error!("nic: {}: {done} of {want} datagrams echoed: {e}", self.name);
                    return Err((UDP_SHORT, e));
                }
                Err(e) => return Err((SEND_FAILED, e)),
            }
        }
        Ok(done)
    }
}

/// Everything the workload does with card `i`.
fn card(bi: &BootInfo, i: usize) -> Result<Report, (u64, Option<Report>)> {
    let d = pci::devices(bi)[i];
    let reply_ms = bi.arg_int("reply_ms");
    let t0 = guestkernel::arch::rdtsc();
    let nic = match Nic::open(bi, i, pci::deadline_ms(reply_ms)) {
        Ok(n) => n,
        Err(e) => {
            log::error!("nic: device {i} ({}): not up: {e}", d.bdf());
            return Err((BRING_UP, None));
        }
    };
    let name = nic.model();
    log::info!(
        "nic: {name} {}: up in {} TSC ticks, MAC {}, interrupts at vector {:#x}",
        d.bdf(),
        guestkernel::arch::rdtsc() - t0,
        MacFmt(nic.mac()),
        d.vector
    );
    let mut host = Host { mac: nic.mac(), nic, name, ip_id: 0, other: 0 };
    let fail = |host: &Host, s: u64| Err((s, Some(report(&host.nic))));
    let samples = bi.arg_int("latency");
    if samples > 0 {
        let mut lat = [0u64; 64];
        let mut n = 0;
        for _ in 0..samples.min(64) {
            if let Some(t) = host.nic.interrupt_latency(pci::deadline_ms(100)) {
                lat[n] = t;
                n += 1;
            }
        }
        let lat = &mut lat[..n];
        lat.sort_unstable();
        if lat.is_empty() {
            log::warn!("nic: {name}: no software-raised interrupt arrived (not routed?)");
        } else {
            log::info!(
                "bench nic-irq-latency {name}: {} samples, TSC ticks trigger to handler: min {} median {} max {}",
                lat.len(),
                lat[0],
                lat[lat.len() / 2],
                lat[lat.len() - 1]
            );
        }
    }
    let gw = match host.arp(reply_ms) {
        Ok(m) => m,
        Err((s, e)) => {
            log::error!("nic: {name}: ARP for {}: {e}", IpFmt(GATEWAY));
            return fail(&host, s);
        }
    };
    let pings = bi.arg_int("pings");
    if pings > 0 {
        match host.ping(gw, pings, reply_ms) {
            Ok((lo, hi)) => log::info!(
                "bench nic-ping {name}: {pings} echo replies, round trip TSC ticks min {lo} max {hi}"
            ),
            Err((s, _)) => return fail(&host, s),
        }
    }
    if bi.arg_int("crash") == 1 && bi.incarnation == 1 && i == 0 {
        die_in_traffic(&mut host, gw);
    }
    let port = bi.arg_int("udp_port");
    if port != 0 && i == 0 {
        if let Err((s, _)) =
            host.udp_echo(port as u16, bi.arg_int("datagrams"), bi.arg_int("echo_ms"))
        {
            return fail(&host, s);
        }
    }
    let (wakes, lo, hi) = pci::wakes(i);
    log::info!(
        "bench nic-wake {name}: {wakes} waits ended by the card's interrupt, TSC ticks from \
         handler to waiter: min {lo} max {hi}"
    );
    if host.other > 0 {
        log::info!("nic: {name}: {} other frame(s) ignored", host.other);
    }
    Ok(report(&host.nic))
}

/// `crash=1`, first incarnation: a burst of echo requests, then death with their replies due.
fn die_in_traffic(host: &mut Host, gw: Mac) -> ! {
    let route = Route { src_mac: host.mac, dst_mac: gw, src_ip: MY_IP, dst_ip: GATEWAY };
    let data = [0x5a_u8; 32];
    let mut sent = 0;
    for seq in 100..108u16 {
        let req = Echo { kind: net::icmp_type::ECHO_REQUEST, ident: IDENT, seq, data: &data };
        let mut out = [0u8; 128];
        host.ip_id = host.ip_id.wrapping_add(1);
        let len = net::build_echo(&mut out, &route, host.ip_id, &req).expect("fits 128 bytes");
        sent += host.send(&out[..len]).is_ok() as u32;
    }
    // SAFETY: a buffer of this guest's partition; it marks what the next incarnation checks.
    let landing = unsafe { &mut *core::ptr::addr_of_mut!(LANDING) };
    landing.fill(0xa5);
    log::info!("nic: crash: {sent} echo requests sent, replies due; dying now (incarnation 1)");
    // The runtime's #UD handler ends the guest with a non-zero status; its policy restarts it.
    // SAFETY: UD2 only raises #UD; nothing is left half-done (the buffer is a plain static).
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

/// A later incarnation, before touching its cards: each is as the hypervisor left it at
/// the death (bus mastering off), and nothing landed in memory the last one used.
fn after_restart(bi: &BootInfo, devs: &[DeviceDesc]) -> Result<(), u64> {
    for d in devs {
        let cmd = pci::read16(d.bdf(), pci::reg::COMMAND);
        let quiet = cmd & pci::command::BUS_MASTER == 0;
        log::info!(
            "nic: incarnation {}: {} found with command {cmd:#06x}: bus mastering {}",
            bi.incarnation,
            d.bdf(),
            if quiet { "off (quiesced at the death)" } else { "ON" }
        );
        if !quiet {
            return Err(NOT_QUIESCED);
        }
    }
    // SAFETY: this incarnation has not used the buffer yet; reading it only.
    let landing = unsafe { &*core::ptr::addr_of!(LANDING) };
    let dirty = landing.iter().filter(|&&b| b != 0).count();
    log::info!(
        "nic: incarnation {}: the dead incarnation's buffer reads {} non-zero bytes",
        bi.incarnation,
        dirty
    );
    if dirty != 0 {
        return Err(NOT_QUIESCED);
    }
    Ok(())
}
