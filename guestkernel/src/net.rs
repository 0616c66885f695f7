// SPDX-License-Identifier: MIT OR Apache-2.0
//! Frames: Ethernet II, ARP (RFC 826), IPv4 (RFC 791), ICMP echo (RFC 792) and UDP
//! (RFC 768), built into and parsed from byte slices, with the Internet checksum
//! (RFC 1071). Pure logic, no `unsafe`, host-tested: what the NIC drivers carry and the
//! `nic` workload speaks. Builders return the frame length (padded to the Ethernet
//! minimum of 60 bytes), or `None` when the buffer is too small; parsers check lengths,
//! versions and checksums and return `None` for anything else.
//!
//! May call: nothing but `core`.

pub type Mac = [u8; 6];
pub type Ipv4 = [u8; 4];

pub const BROADCAST: Mac = [0xff; 6];
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Ethernet header: destination, source, type.
pub const ETH_HEADER: usize = 14;
/// Shortest frame on the wire without its FCS (shorter ones are padded).
pub const MIN_FRAME: usize = 60;
/// Longest frame without FCS (1500-byte payload).
pub const MAX_FRAME: usize = 1514;
pub const IP_HEADER: usize = 20;
pub const UDP_HEADER: usize = 8;
pub const ICMP_HEADER: usize = 8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_UDP: u8 = 17;
const ARP_LEN: usize = 28;

pub mod arp_op {
    pub const REQUEST: u16 = 1;
    pub const REPLY: u16 = 2;
}
pub mod icmp_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const ECHO_REQUEST: u8 = 8;
}

/// Formats a MAC address as `52:54:00:12:34:56`.
pub struct MacFmt(pub Mac);
impl core::fmt::Display for MacFmt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// Formats an IPv4 address as `10.0.2.15`.
pub struct IpFmt(pub Ipv4);
impl core::fmt::Display for IpFmt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let a = self.0;
        write!(f, "{}.{}.{}.{}", a[0], a[1], a[2], a[3])
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn array<const K: usize>(b: &[u8], at: usize) -> [u8; K] {
    let mut a = [0; K];
    a.copy_from_slice(&b[at..at + K]);
    a
}

/// The one's-complement sum of `data` as big-endian 16-bit words (an odd last byte is
/// padded with zero), added to `acc`, not folded.
pub fn sum_words(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u16::from_be_bytes([c[0], c[1]]) as u32);
        // Fold early: no overflow however long the data.
        acc = (acc & 0xffff) + (acc >> 16);
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add((*last as u32) << 8);
    }
    acc
}

/// Folds a sum to 16 bits and complements it: the Internet checksum.
pub fn finish(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum of `data` (0 when `data` holds a correct checksum).
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum_words(data, 0))
}

/// The UDP pseudo-header's sum (source, destination, protocol, UDP length).
fn pseudo_sum(src: Ipv4, dst: Ipv4, proto: u8, len: u16) -> u32 {
    let mut acc = sum_words(&src, 0);
    acc = sum_words(&dst, acc);
    acc + proto as u32 + len as u32
}

/// A parsed Ethernet frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Eth<'a> {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
    pub payload: &'a [u8],
}

pub fn parse_eth(frame: &[u8]) -> Option<Eth<'_>> {
    (frame.len() >= ETH_HEADER).then(|| Eth {
        dst: array(frame, 0),
        src: array(frame, 6),
        ethertype: be16(frame, 12),
        payload: &frame[ETH_HEADER..],
    })
}

/// Writes the Ethernet header; the payload goes at `ETH_HEADER`.
fn put_eth(buf: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    buf[0..6].copy_from_slice(&dst);
    buf[6..12].copy_from_slice(&src);
    put16(buf, 12, ethertype);
}

/// Pads a frame of `len` bytes with zeros to [`MIN_FRAME`]; returns the padded length.
fn pad(buf: &mut [u8], len: usize) -> Option<usize> {
    let padded = len.max(MIN_FRAME);
    buf.get_mut(len..padded)?.fill(0);
    Some(padded)
}

/// An ARP packet for IPv4 over Ethernet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sender_mac: Mac,
    pub sender_ip: Ipv4,
    pub target_mac: Mac,
    pub target_ip: Ipv4,
}

impl Arp {
    /// Who has `target`? Tell `ip` at `mac`.
    pub fn request(mac: Mac, ip: Ipv4, target: Ipv4) -> Self {
        Arp {
            op: arp_op::REQUEST,
            sender_mac: mac,
            sender_ip: ip,
            target_mac: [0; 6],
            target_ip: target,
        }
    }
    /// The answer to `req` from `mac` (which owns `req.target_ip`).
    pub fn reply_to(req: &Arp, mac: Mac) -> Self {
        Arp {
            op: arp_op::REPLY,
            sender_mac: mac,
            sender_ip: req.target_ip,
            target_mac: req.sender_mac,
            target_ip: req.sender_ip,
        }
    }
}

/// An ARP frame from `arp.sender_mac`: broadcast for a request, to the target otherwise.
pub fn build_arp(buf: &mut [u8], arp: &Arp) -> Option<usize> {
    let len = ETH_HEADER + ARP_LEN;
    if buf.len() < len.max(MIN_FRAME) {
        return None;
    }
    let dst = if arp.op == arp_op::REQUEST { BROADCAST } else { arp.target_mac };
    put_eth(buf, dst, arp.sender_mac, ETHERTYPE_ARP);
    let p = &mut buf[ETH_HEADER..len];
    put16(p, 0, 1); // Ethernet
    put16(p, 2, ETHERTYPE_IPV4);
    p[4] = 6;
    p[5] = 4;
    put16(p, 6, arp.op);
    p[8..14].copy_from_slice(&arp.sender_mac);
    p[14..18].copy_from_slice(&arp.sender_ip);
    p[18..24].copy_from_slice(&arp.target_mac);
    p[24..28].copy_from_slice(&arp.target_ip);
    pad(buf, len)
}

/// The ARP packet in an Ethernet payload (IPv4 over Ethernet only).
pub fn parse_arp(payload: &[u8]) -> Option<Arp> {
    if payload.len() < ARP_LEN
        || be16(payload, 0) != 1
        || be16(payload, 2) != ETHERTYPE_IPV4
        || payload[4] != 6
        || payload[5] != 4
    {
        return None;
    }
    Some(Arp {
        op: be16(payload, 6),
        sender_mac: array(payload, 8),
        sender_ip: array(payload, 14),
        target_mac: array(payload, 18),
        target_ip: array(payload, 24),
    })
}

/// A parsed IPv4 packet (no options kept, no fragments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ip<'a> {
    pub src: Ipv4,
    pub dst: Ipv4,
    pub proto: u8,
    pub ttl: u8,
    pub id: u16,
    pub payload: &'a [u8],
}

/// The IPv4 packet in an Ethernet payload: version 4, a correct header checksum, not a
/// fragment; the payload ends where the total length says (Ethernet padding dropped).
pub fn parse_ipv4(payload: &[u8]) -> Option<Ip<'_>> {
    if payload.len() < IP_HEADER || payload[0] >> 4 != 4 {
        return None;
    }
    let ihl = (payload[0] & 0xf) as usize * 4;
    let total = be16(payload, 2) as usize;
    if ihl < IP_HEADER || total < ihl || total > payload.len() || checksum(&payload[..ihl]) != 0 {
        return None;
    }
    let frag = be16(payload, 6);
    if frag & 0x3fff != 0 {
        return None; // MF set or an offset: a fragment
    }
    Some(Ip {
        src: array(payload, 12),
        dst: array(payload, 16),
        proto: payload[9],
        ttl: payload[8],
        id: be16(payload, 4),
        payload: &payload[ihl..total],
    })
}

/// Addresses of an IPv4 frame: Ethernet and IP, source and destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src_ip: Ipv4,
    pub dst_ip: Ipv4,
}

impl Route {
    /// The way back: sources and destinations swapped.
    pub fn reversed(&self) -> Route {
        Route {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src_ip: self.dst_ip,
            dst_ip: self.src_ip,
        }
    }
}

/// Ethernet and IPv4 headers for `body` bytes of protocol `proto` (don't-fragment, TTL 64,
/// header checksum); returns the offset of the body.
fn put_ip(buf: &mut [u8], r: &Route, proto: u8, id: u16, body: usize) -> Option<usize> {
    let total = IP_HEADER + body;
    if total > u16::MAX as usize || buf.len() < (ETH_HEADER + total).max(MIN_FRAME) {
        return None;
    }
    put_eth(buf, r.dst_mac, r.src_mac, ETHERTYPE_IPV4);
    let h = &mut buf[ETH_HEADER..ETH_HEADER + IP_HEADER];
    h[0] = 0x45;
    h[1] = 0;
    put16(h, 2, total as u16);
    put16(h, 4, id);
    put16(h, 6, 0x4000);
    h[8] = 64;
    h[9] = proto;
    put16(h, 10, 0);
    h[12..16].copy_from_slice(&r.src_ip);
    h[16..20].copy_from_slice(&r.dst_ip);
    let c = checksum(h);
    put16(h, 10, c);
    Some(ETH_HEADER + IP_HEADER)
}

/// An ICMP echo request or reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echo<'a> {
    /// [`icmp_type::ECHO_REQUEST`] or [`icmp_type::ECHO_REPLY`].
    pub kind: u8,
    pub ident: u16,
    pub seq: u16,
    pub data: &'a [u8],
}

/// An ICMP echo frame along `r`.
pub fn build_echo(buf: &mut [u8], r: &Route, ip_id: u16, e: &Echo<'_>) -> Option<usize> {
    let body = ICMP_HEADER + e.data.len();
    let at = put_ip(buf, r, PROTO_ICMP, ip_id, body)?;
    let m = &mut buf[at..at + body];
    m[0] = e.kind;
    m[1] = 0;
    put16(m, 2, 0);
    put16(m, 4, e.ident);
    put16(m, 6, e.seq);
    m[ICMP_HEADER..].copy_from_slice(e.data);
    let c = checksum(m);
    put16(m, 2, c);
    pad(buf, at + body)
}

/// The ICMP echo request or reply in an IPv4 packet, checksum checked.
pub fn parse_echo<'a>(ip: &Ip<'a>) -> Option<Echo<'a>> {
    let m = ip.payload;
    if ip.proto != PROTO_ICMP || m.len() < ICMP_HEADER || checksum(m) != 0 || m[1] != 0 {
        return None;
    }
    let kind = m[0];
    (kind == icmp_type::ECHO_REQUEST || kind == icmp_type::ECHO_REPLY).then(|| Echo {
        kind,
        ident: be16(m, 4),
        seq: be16(m, 6),
        data: &m[ICMP_HEADER..],
    })
}

/// A UDP datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Udp<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub data: &'a [u8],
}

/// A UDP frame along `r`, with its checksum (pseudo-header included).
pub fn build_udp(buf: &mut [u8], r: &Route, ip_id: u16, u: &Udp<'_>) -> Option<usize> {
    let body = UDP_HEADER + u.data.len();
    let at = put_ip(buf, r, PROTO_UDP, ip_id, body)?;
    let d = &mut buf[at..at + body];
    put16(d, 0, u.src_port);
    put16(d, 2, u.dst_port);
    put16(d, 4, body as u16);
    put16(d, 6, 0);
    d[UDP_HEADER..].copy_from_slice(u.data);
    let c = finish(sum_words(d, pseudo_sum(r.src_ip, r.dst_ip, PROTO_UDP, body as u16)));
    // A computed 0 is sent as all ones (0 means "no checksum").
    put16(d, 6, if c == 0 { 0xffff } else { c });
    pad(buf, at + body)
}

/// The UDP datagram in an IPv4 packet: lengths checked, and the checksum unless the
/// sender left it out (0).
pub fn parse_udp<'a>(ip: &Ip<'a>) -> Option<Udp<'a>> {
    let d = ip.payload;
    if ip.proto != PROTO_UDP || d.len() < UDP_HEADER {
        return None;
    }
    let len = be16(d, 4) as usize;
    if len < UDP_HEADER || len > d.len() {
        return None;
    }
    let d = &d[..len];
    if be16(d, 6) != 0
        && finish(sum_words(d, pseudo_sum(ip.src, ip.dst, PROTO_UDP, len as u16))) != 0
    {
        return None;
    }
    Some(Udp { src_port: be16(d, 0), dst_port: be16(d, 2), data: &d[UDP_HEADER..] })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const GW: Mac = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
    const MY_IP: Ipv4 = [10, 0, 2, 15];
    const GW_IP: Ipv4 = [10, 0, 2, 2];
    const ROUTE: Route = Route { src_mac: ME, dst_mac: GW, src_ip: MY_IP, dst_ip: GW_IP };

    #[test]
    fn checksum_matches_rfc1071_and_a_known_header() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(finish(sum_words(&d, 0)), !0xddf2);
        // A well-known IPv4 header (192.168.0.1 -> 192.168.0.199, UDP): checksum b861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&[0xb8, 0x61]);
        assert_eq!(checksum(&h), 0);
        // Odd lengths pad with a zero byte; empty data sums to zero.
        assert_eq!(checksum(&[0x12]), !0x1200);
        assert_eq!(checksum(&[]), 0xffff);
    }

    #[test]
    fn long_data_does_not_overflow_the_sum() {
        let d = [0xff; 4096];
        assert_eq!(checksum(&d), 0);
    }

    #[test]
    fn arp_request_has_the_wire_layout() {
        let mut buf = [0xaa; 64];
        let n = build_arp(&mut buf, &Arp::request(ME, MY_IP, GW_IP)).unwrap();
        assert_eq!(n, MIN_FRAME);
        assert_eq!(&buf[0..6], &BROADCAST);
        assert_eq!(&buf[6..12], &ME);
        assert_eq!(&buf[12..22], &[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        assert_eq!(&buf[22..28], &ME);
        assert_eq!(&buf[28..32], &MY_IP);
        assert_eq!(&buf[32..38], &[0; 6]);
        assert_eq!(&buf[38..42], &GW_IP);
        assert!(buf[42..60].iter().all(|&b| b == 0), "padding is zeros");
        let eth = parse_eth(&buf[..n]).unwrap();
        assert_eq!(eth.ethertype, ETHERTYPE_ARP);
        let req = parse_arp(eth.payload).unwrap();
        assert_eq!(req, Arp::request(ME, MY_IP, GW_IP));
        let reply = Arp::reply_to(&req, GW);
        assert_eq!((reply.sender_ip, reply.target_mac, reply.target_ip), (GW_IP, ME, MY_IP));
        let n = build_arp(&mut buf, &reply).unwrap();
        assert_eq!(&buf[0..6], &ME, "a reply goes to the asker");
        assert_eq!(parse_arp(parse_eth(&buf[..n]).unwrap().payload), Some(reply));
    }

    #[test]
    fn arp_refuses_other_protocols_and_short_packets() {
        let mut buf = [0; 60];
        let n = build_arp(&mut buf, &Arp::request(ME, MY_IP, GW_IP)).unwrap();
        let p = &mut buf[ETH_HEADER..n];
        assert!(parse_arp(&p[..27]).is_none());
        p[3] = 0xdd; // IPv6
        assert!(parse_arp(p).is_none());
        assert!(build_arp(&mut [0; 59], &Arp::request(ME, MY_IP, GW_IP)).is_none());
    }

    #[test]
    fn echo_round_trips_with_checksums() {
        let mut buf = [0; 128];
        let data = *b"mkvisor!";
        let req = Echo { kind: icmp_type::ECHO_REQUEST, ident: 0x4d4b, seq: 7, data: &data };
        let n = build_echo(&mut buf, &ROUTE, 1, &req).unwrap();
        assert_eq!(n, MIN_FRAME); // 14 + 20 + 8 + 8 = 50, padded
        let eth = parse_eth(&buf[..n]).unwrap();
        assert_eq!((eth.dst, eth.src, eth.ethertype), (GW, ME, ETHERTYPE_IPV4));
        let ip = parse_ipv4(eth.payload).unwrap();
        assert_eq!((ip.src, ip.dst, ip.proto, ip.ttl), (MY_IP, GW_IP, PROTO_ICMP, 64));
        assert_eq!(ip.payload.len(), 16, "padding is not payload");
        assert_eq!(parse_echo(&ip), Some(req));
        // One flipped bit and the ICMP checksum fails.
        buf[ETH_HEADER + IP_HEADER + 9] ^= 1;
        let ip = parse_ipv4(&buf[ETH_HEADER..n]).unwrap();
        assert_eq!(parse_echo(&ip), None);
        // ... and in the IP header, the header checksum.
        buf[ETH_HEADER + 8] ^= 1;
        assert_eq!(parse_ipv4(&buf[ETH_HEADER..n]), None);
    }

    #[test]
    fn ipv4_refuses_fragments_and_bad_lengths() {
        let mut buf = [0; 128];
        let u = Udp { src_port: 1, dst_port: 2, data: b"x" };
        let n = build_udp(&mut buf, &ROUTE, 9, &u).unwrap();
        let good = buf;
        assert!(parse_ipv4(&good[ETH_HEADER..n]).is_some());
        let refix = |b: &mut [u8; 128]| {
            b[ETH_HEADER + 10..ETH_HEADER + 12].fill(0);
            let c = checksum(&b[ETH_HEADER..ETH_HEADER + IP_HEADER]);
            b[ETH_HEADER + 10..ETH_HEADER + 12].copy_from_slice(&c.to_be_bytes());
        };
        let mut frag = good;
        frag[ETH_HEADER + 6] = 0x20; // MF
        refix(&mut frag);
        assert!(parse_ipv4(&frag[ETH_HEADER..n]).is_none());
        let mut long = good;
        long[ETH_HEADER + 2..ETH_HEADER + 4].copy_from_slice(&200u16.to_be_bytes());
        refix(&mut long);
        assert!(parse_ipv4(&long[ETH_HEADER..n]).is_none());
        let mut v6 = good;
        v6[ETH_HEADER] = 0x65;
        assert!(parse_ipv4(&v6[ETH_HEADER..n]).is_none());
    }

    #[test]
    fn udp_round_trips_and_checks_its_pseudo_header() {
        let mut buf = [0; 256];
        let data = [0x5a; 100];
        let u = Udp { src_port: 40000, dst_port: 5555, data: &data };
        let n = build_udp(&mut buf, &ROUTE, 3, &u).unwrap();
        assert_eq!(n, ETH_HEADER + IP_HEADER + UDP_HEADER + 100);
        let ip = parse_ipv4(&buf[ETH_HEADER..n]).unwrap();
        assert_eq!(parse_udp(&ip), Some(u));
        // The same bytes claimed from another source fail the pseudo-header sum.
        let spoofed = Ip { src: [10, 0, 2, 3], ..ip };
        assert_eq!(parse_udp(&spoofed), None);
        // A sender that left the checksum out (0) is accepted.
        let at = ETH_HEADER + IP_HEADER;
        buf[at + 6..at + 8].fill(0);
        let ip = parse_ipv4(&buf[ETH_HEADER..n]).unwrap();
        assert_eq!(parse_udp(&ip).map(|u| u.data.len()), Some(100));
        // An echo goes back along the reversed route.
        let back = ROUTE.reversed();
        assert_eq!((back.src_mac, back.dst_ip), (GW, MY_IP));
    }

    #[test]
    fn builders_refuse_small_buffers() {
        let data = [0; 1500];
        let u = Udp { src_port: 1, dst_port: 2, data: &data };
        assert!(build_udp(&mut [0; MAX_FRAME], &ROUTE, 0, &u).is_none());
        let u = Udp { data: &data[..1472], ..u };
        assert_eq!(build_udp(&mut [0; MAX_FRAME], &ROUTE, 0, &u), Some(MAX_FRAME));
    }

    #[test]
    fn addresses_print_as_usual() {
        extern crate std;
        use std::string::ToString;
        assert_eq!(MacFmt(ME).to_string(), "52:54:00:12:34:56");
        assert_eq!(IpFmt(MY_IP).to_string(), "10.0.2.15");
    }
}
