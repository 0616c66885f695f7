// SPDX-License-Identifier: MIT OR Apache-2.0
//! The slower parts of a guest's status page (`vmcall_proto::guest::StatusPage`): the
//! per-channel message counts copied from the rings, and the read-only windows through
//! which a controller reads its targets' pages.
//!
//! Invariants: the per-entry cost of the traffic counts is one compare ([`Traffic::due`]);
//! the copy itself ([`Traffic::refresh`], O(channels)) runs at most once per
//! `TRAFFIC_REFRESH_MS` of TSC, plus once when an incarnation ends. It reads only the two
//! header lines of rings that lie inside the channel's own memory (checked once, in
//! [`ring_hpas`]), with atomic loads: the counters are guest-written, so they are reported
//! as they are and used for nothing else. A target window maps exactly one frame (the
//! target's status page) read-only and never executable; the mapping is checked after it is
//! made.

use super::ChanMap;
use crate::ept;
use vmcall_proto::channel::{ring_bytes, Ring};
use vmcall_proto::guest::{channel_window, ChannelTraffic, StatusPage, MAX_CHANNELS_PER_GUEST};

/// Host-physical addresses of one endpoint's two rings: (the ring it sends on, the ring it
/// receives on), each 64-byte aligned and with its whole [`ring_bytes`] inside the
/// channel's memory; `None` otherwise (then no traffic is reported for it).
pub fn ring_hpas(ch: &ChanMap) -> Option<(u64, u64)> {
    let window = channel_window(ch.desc.index);
    let bytes = ring_bytes(ch.desc.slots);
    let at = |gpa: u64| {
        let off = gpa.checked_sub(window)?;
        (ch.desc.slots > 0 && off % 64 == 0 && off.checked_add(bytes)? <= ch.size)
            .then_some(ch.hpa + off)
    };
    Some((at(ch.desc.tx_gpa)?, at(ch.desc.rx_gpa)?))
}

/// Where a guest's per-channel counts come from, and when they are next due.
pub struct Traffic {
    /// Per channel (boot-info order): sending ring, receiving ring, slots.
    rings: [Option<(u64, u64, u32)>; MAX_CHANNELS_PER_GUEST],
    count: usize,
    /// TSC ticks between copies at most once (`TRAFFIC_REFRESH_MS`).
    period: u64,
    /// TSC from which the next copy is due.
    next: u64,
}

impl Traffic {
    /// The counts of `chans`, copied at most once per `period` TSC ticks; the first copy is
    /// due at once.
    pub fn new(chans: &[ChanMap], period: u64) -> Self {
        let mut rings = [None; MAX_CHANNELS_PER_GUEST];
        for (r, ch) in rings.iter_mut().zip(chans) {
            *r = ring_hpas(ch).map(|(tx, rx)| (tx, rx, ch.desc.slots));
        }
        Traffic { rings, count: chans.len().min(MAX_CHANNELS_PER_GUEST), period, next: 0 }
    }

    /// Whether a copy is due at `now` (the only per-entry cost).
    #[inline(always)]
    pub fn due(&self, now: u64) -> bool {
        now >= self.next
    }

    /// When the next copy is due (never, with no channel): the fast exit path answers no
    /// exit past it, so the copies keep their period while the guest exits only there.
    #[inline(always)]
    pub fn next_due(&self) -> u64 {
        if self.count == 0 {
            u64::MAX
        } else {
            self.next
        }
    }

    /// Copies every channel's counts into `page` and stamps it with `now`; the next copy is
    /// due `period` later.
    ///
    /// # Safety
    /// Every ring address given to [`Traffic::new`] (`ChanMap::hpa` and `size`) is memory
    /// that stays mapped for the rings' whole life and is accessed only atomically.
    #[cold]
    pub unsafe fn refresh(&mut self, page: &mut StatusPage, now: u64) {
        for (t, r) in page.traffic.iter_mut().zip(&self.rings[..self.count]) {
            let Some((tx, rx, slots)) = *r else { continue };
            // Both rings lie inside the channel's memory (`ring_hpas`), 64-byte aligned.
            // SAFETY: the caller vouches for that memory; only the header lines are loaded.
            let (send, recv) = unsafe {
                (Ring::from_raw(tx as *mut u8, slots), Ring::from_raw(rx as *mut u8, slots))
            };
            *t = ChannelTraffic {
                sent: send.sent(),
                received: recv.received(),
                inbound: recv.sent(),
                _reserved: 0,
            };
        }
        page.traffic_tsc = now;
        self.next = now.saturating_add(self.period);
    }
}

/// Maps each target's status frame `frames[i]` read-only (never executable) at
/// `target_status(i)` in the EPT at `root`, and checks what it built: each window
/// translates to its frame, read-only, and nothing past it is mapped.
pub fn map_target_windows(
    f: &mut impl ept::Frames,
    root: u64,
    frames: &[u64],
) -> Result<(), &'static str> {
    use vmcall_proto::guest::{target_status, MAX_TARGET_WINDOWS};
    if frames.len() > MAX_TARGET_WINDOWS {
        return Err("too many target windows");
    }
    for (i, &hpa) in frames.iter().enumerate() {
        ept::map_with(f, root, target_status(i as u32), hpa, 4096, ept::Perm::Read)
            .map_err(|_| "target window mapping failed")?;
    }
    let read = ept::Perm::Read.bits();
    let ok = frames.iter().enumerate().all(|(i, &hpa)| {
        let gpa = target_status(i as u32);
        ept::translate_perm(f, root, gpa) == Some((hpa, read))
            && ept::translate_perm(f, root, gpa + 4095) == Some((hpa + 4095, read))
    }) && ept::translate(f, root, target_status(frames.len() as u32)).is_none();
    if ok {
        Ok(())
    } else {
        Err("target window self-check failed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ept::tests::host_frames;
    use vmcall_proto::channel::ring_pages_bytes;
    use vmcall_proto::guest::{target_status, ChannelDesc, TARGET_STATUS_GPA};
    use zerocopy::FromZeros;

    fn chan(index: u32, slots: u32, hpa: u64, size: u64, tx: u64, rx: u64) -> ChanMap {
        let window = channel_window(index);
        let mut desc = ChannelDesc::new_zeroed();
        desc.index = index;
        desc.slots = slots;
        desc.tx_gpa = window + tx;
        desc.rx_gpa = window + rx;
        ChanMap { desc, hpa, size, peer_apic: None, peer_core: None }
    }

    #[test]
    fn rings_must_lie_inside_the_channel() {
        let half = ring_pages_bytes(8);
        let c = chan(3, 8, 0x10_0000, 2 * half, 0, half);
        assert_eq!(ring_hpas(&c), Some((0x10_0000, 0x10_0000 + half)));
        let swapped = chan(3, 8, 0x10_0000, 2 * half, half, 0);
        assert_eq!(ring_hpas(&swapped), Some((0x10_0000 + half, 0x10_0000)));
        // Past the end, below the window, misaligned, no slots: no traffic read there.
        assert_eq!(ring_hpas(&chan(3, 8, 0x10_0000, 2 * half, 0, 2 * half)), None);
        let mut below = c;
        below.desc.rx_gpa = channel_window(3) - 64;
        assert_eq!(ring_hpas(&below), None);
        assert_eq!(ring_hpas(&chan(3, 8, 0x10_0000, 2 * half, 8, half)), None);
        assert_eq!(ring_hpas(&chan(3, 0, 0x10_0000, 2 * half, 0, half)), None);
    }

    /// Two rings of 4 slots, one page each, in host memory.
    #[repr(C, align(4096))]
    struct TwoRings([[u64; 512]; 2]);

    #[test]
    fn refresh_copies_the_ring_counters_at_most_once_per_period() {
        let mem = Box::new(TwoRings([[0; 512]; 2]));
        let base = &*mem as *const TwoRings as u64;
        // This endpoint sends on the second ring and receives on the first.
        let c = chan(0, 4, base, 8192, 4096, 0);
        let mut t = Traffic::new(&[c], 1000);
        assert!(t.due(0), "the first copy is due at once");
        // SAFETY: zeroes are a valid StatusPage (plain u64s).
        let mut page: Box<StatusPage> = unsafe { Box::new(core::mem::zeroed()) };
        // `mem` lives to the end of the test, page-aligned, and from here on is accessed
        // only through `Ring`.
        // SAFETY: so it is a ring's memory for as long as the rings are used.
        let (tx, rx) = unsafe {
            (Ring::from_raw((base + 4096) as *mut u8, 4), Ring::from_raw(base as *mut u8, 4))
        };
        let mut s = vmcall_proto::channel::Sender::new(tx);
        for i in 0..3 {
            s.try_send(&[i; 7]).unwrap();
        }
        let mut peer = vmcall_proto::channel::Sender::new(rx);
        for i in 0..4 {
            peer.try_send(&[i; 7]).unwrap();
        }
        let mut r = vmcall_proto::channel::Receiver::new(rx, 1);
        r.try_recv().unwrap().unwrap();
        // SAFETY: as above.
        unsafe { t.refresh(&mut page, 5) };
        let tr = &page.traffic[0];
        assert_eq!((tr.sent, tr.received, tr.inbound, page.traffic_tsc), (3, 1, 4, 5));
        assert!(!t.due(1004) && t.due(1005));
        // Guest-written words are reported as they are, epoch tags masked.
        let mut rx_epoch = vmcall_proto::channel::Receiver::with_epoch(rx, 1, 7);
        rx_epoch.flush_ack();
        // SAFETY: as above.
        unsafe { t.refresh(&mut page, 1005) };
        assert_eq!(page.traffic[0].received, 0, "the tagged count without its tag");
        assert_eq!(page.traffic[1].sent, 0, "only the guest's channels");
    }

    #[test]
    fn target_windows_are_read_only_single_frames() {
        let mut f = host_frames(64);
        let root = ept::new_root(&mut f).unwrap();
        let frames = [0x7000_0000, 0x7123_4000, 0x7000_0000 + 0x20_0000];
        map_target_windows(&mut f, root, &frames).unwrap();
        for (i, hpa) in frames.iter().enumerate() {
            let gpa = target_status(i as u32);
            assert_eq!(ept::translate_perm(&mut f, root, gpa + 8), Some((hpa + 8, 1)));
        }
        assert_eq!(ept::mapped_bytes(&mut f, root), 3 * 4096);
        assert_eq!(ept::translate(&mut f, root, TARGET_STATUS_GPA - 1), None);
        assert_eq!(ept::translate(&mut f, root, target_status(3)), None);
        // No targets: nothing mapped there at all.
        let mut f = host_frames(64);
        let root = ept::new_root(&mut f).unwrap();
        map_target_windows(&mut f, root, &[]).unwrap();
        assert_eq!(ept::mapped_bytes(&mut f, root), 0);
        assert_eq!(ept::translate(&mut f, root, TARGET_STATUS_GPA), None);
    }
}
