//! Bursts, one kind of source each: a guest's TX ring (split or packed), a DPDK RX queue, a
//! tap queue. Each takes up to BURST frames within its pass budget, switches every one
//! (forward.rs), and publishes the burst's verdicts once. PMD threads.

use super::forward::Fabric;
use super::tally::{Tally, Verdict};
use crate::dev::dpdk::MbufBurst;
use crate::dev::tap::{self, TapIo, TAP_HDR_LEN};
use crate::mem::copy::gather;
use crate::mem::seg::{Seg, SegList};
use crate::net::features::NetFeatures;
use crate::net::vnet::{Frame, VnetHdr, VNET_HDR_LEN};
use crate::port::Port;
use crate::virtq::{PackedRing, VirtQueue};
use crate::{PortId, BURST};

/// How many frames ahead of the one being switched a guest TX burst loads frame data.
const TX_DATA_AHEAD: usize = 8;

/// Work one guest TX queue may cost a PMD per pass, in bytes of frames taken plus SEG_COST per
/// frame its TSO frames may be cut into: a burst stops early once it is spent, so cheap frames
/// that cost dearly (64 KiB TSO frames, segmented in software) cannot starve the other queues.
/// A burst of 32 frames of 1518 B (or 28 of 9000 B) fits; four 64 KiB TSO frames do.
const PASS_BUDGET: u32 = 256 * 1024;

/// What one frame made by software segmentation counts in PASS_BUDGET (its headers written,
/// its checksums and its delivery), in bytes.
const SEG_COST: u32 = 256;

/// What switching a burst needs, apart from the source queue it comes from.
pub(super) struct Fwd {
    pub(super) fabric: Fabric,
    /// The frame being switched, as segments (guest buffers, an mbuf chain or `tap_buf`).
    pub(super) src: Box<SegList>,
    /// Frames received from a DPDK port, freed after each burst.
    pub(super) mbufs: MbufBurst,
    pub(super) tap_hdr: [u8; TAP_HDR_LEN],
    pub(super) tap_buf: Box<[u8]>,
    /// SEG_COST for every frame the TSO frames switched since the burst began could be cut
    /// into (PASS_BUDGET).
    pub(super) seg_cost: u32,
}

impl Fwd {
    /// Count the frame just taken (in `self.src`) against its burst's PASS_BUDGET, `bytes`
    /// so far; true once the budget is spent. A frame refused before it was switched (`v`: a
    /// bad chain or header) cost little whatever its length, and counts as a small one.
    #[inline(always)]
    pub(super) fn over_budget(&self, bytes: &mut u32, v: Option<Verdict>) -> bool {
        let refused = matches!(
            v,
            Some(Verdict::BadDescriptor | Verdict::Runt | Verdict::TooBig | Verdict::BadOffload)
        );
        *bytes = bytes.saturating_add(if refused { 64 } else { self.src.total });
        bytes.saturating_add(self.seg_cost) >= PASS_BUDGET
    }

    /// Packed rings out of line: the split-ring path is the one to keep tight.
    #[inline(never)]
    pub(super) fn switch_packed(
        &mut self,
        src: PortId,
        queue: u16,
        ring: &mut PackedRing,
        features: NetFeatures,
    ) -> usize {
        self.switch_ring(src, queue, ring, features)
    }

    #[inline]
    pub(super) fn switch_ring<R: VirtQueue>(
        &mut self,
        src: PortId,
        queue: u16,
        ring: &mut R,
        features: NetFeatures,
    ) -> usize {
        let hdr_len = features.hdr_len as u32;
        let pending = ring.avail_pending();
        let n = pending.min(BURST as u16);
        if n == 0 {
            return 0;
        }
        // Every descriptor and frame of the burst was written on the guest's core: start the
        // descriptors' misses together, and each frame's TX_DATA_AHEAD frames before it is
        // switched (asked for all at once, the descriptors read for their addresses had to be
        // fetched again by the time the frames were walked).
        let mut heads = [0u16; BURST];
        let heads = &mut heads[..n as usize];
        for (i, h) in heads.iter_mut().enumerate() {
            *h = ring.head_at(i as u16);
            ring.prefetch_desc(*h);
        }
        for &h in heads.iter().take(TX_DATA_AHEAD) {
            ring.prefetch_data(h, hdr_len);
        }
        let mut tally = Tally::default();
        // The burst's chains go back to the guest only after the copies out of them ran.
        self.fabric.dl.defer_copies = true;
        // All the guest has sent fits in this burst: the PMD keeps up with the guest, and can
        // spend on handing the guest's lines back (not known of a packed ring, where the PMD
        // is the bottleneck and demoting costs; docs/performance.md, "Hot-path choices").
        self.fabric.dl.demote_sources = R::COUNTS_ALL_PENDING && pending <= BURST as u16;
        self.seg_cost = 0;
        let (mut bytes, mut taken) = (0u32, n);
        for (i, &head) in heads.iter().enumerate() {
            if let Some(&h) = heads.get(i + TX_DATA_AHEAD) {
                ring.prefetch_data(h, hdr_len);
            }
            let (v, len) = if ring.walk_chain(head, false, &mut self.src).is_err() {
                (Verdict::BadDescriptor, 0)
            } else if self.src.total < hdr_len {
                (Verdict::Runt, 0)
            } else {
                self.forward_walked(src, queue, hdr_len, features.tx_offloads)
            };
            tally.count(v, len);
            ring.push_used(head, 0);
            if self.over_budget(&mut bytes, Some(v)) {
                taken = i as u16 + 1;
                break;
            }
        }
        self.fabric.dl.defer_copies = false;
        self.fabric.dl.demote_sources = false;
        // Destination guests first (the sooner a guest sees its frames, the sooner it
        // refills); then, no frame needing its buffers any more, the source guest gets its
        // chains back before the device queues are flushed (a DPDK TX burst, which frees a
        // burst of mbufs).
        self.fabric.release_held_guests();
        ring.advance(taken);
        ring.flush();
        self.fabric.release_held();
        tally.publish(ring.stats());
        taken as usize
    }

    /// Switch the guest frame in `self.src` (walked from its ring, or a pipeline batch's slot;
    /// at least `hdr_len` bytes), reading its virtio-net header only if the guest may leave
    /// work in it (`tx_offloads`).
    #[inline(always)]
    pub(super) fn forward_walked(
        &mut self,
        src: PortId,
        queue: u16,
        hdr_len: u32,
        tx_offloads: bool,
    ) -> (Verdict, u32) {
        if tx_offloads {
            return self.forward_offloaded(src, queue, hdr_len);
        }
        let len = self.src.total - hdr_len;
        let f = Frame {
            segs: &self.src,
            skip: hdr_len,
            len,
            vnet: VnetHdr::NONE,
            queue,
        };
        (self.fabric.forward(src, &f), len)
    }

    /// Switch the guest frame in `self.src`, whose virtio-net header may leave checksums or
    /// segmentation to do (the guest negotiated CSUM). Apart from the common path: a header
    /// passed around as a value is stored field by field, and loading it back whole stalls
    /// until those stores retire, which is behind the burst's cache misses.
    #[inline(never)]
    pub(super) fn forward_offloaded(
        &mut self,
        src: PortId,
        queue: u16,
        hdr_len: u32,
    ) -> (Verdict, u32) {
        let len = self.src.total - hdr_len;
        let mut b = [0u8; VNET_HDR_LEN];
        gather(&self.src, 0, &mut b);
        (self.forward_with_header(src, queue, &b, hdr_len, len), len)
    }

    /// Switch `self.src[skip..skip + len]` with the virtio-net header `hdr` its sender wrote
    /// (a guest that negotiated CSUM, a tap); a header that does not fit the frame drops it.
    pub(super) fn forward_with_header(
        &mut self,
        src: PortId,
        queue: u16,
        hdr: &[u8; VNET_HDR_LEN],
        skip: u32,
        len: u32,
    ) -> Verdict {
        let Ok(vnet) = VnetHdr::parse(hdr, len) else {
            return Verdict::BadOffload;
        };
        if vnet.gso_size > 0 {
            // At most 745 frames (MIN_GSO_SIZE); saturating all the same.
            let segs = len / vnet.gso_size as u32;
            self.seg_cost = self.seg_cost.saturating_add(segs.saturating_mul(SEG_COST));
        }
        let f = Frame {
            segs: &self.src,
            skip,
            len,
            vnet,
            queue,
        };
        self.fabric.forward(src, &f)
    }

    /// Take up to BURST frames from one RX queue of a DPDK port and switch them.
    #[inline]
    pub(super) fn dpdk_burst(&mut self, src: PortId, q: u16) -> usize {
        let Some(Port::Dpdk(p)) = self.fabric.port(src) else {
            return 0;
        };
        let n = self.mbufs.rx(p.dev.port_id, q);
        if n == 0 {
            return 0;
        }
        let mut tally = Tally::default();
        // The mbufs are freed only after the copies out of them ran.
        self.fabric.dl.defer_copies = true;
        for i in 0..n {
            // A chain of more mbufs than a segment list holds is not taken apart.
            let (v, len) = match self.mbufs.segs(i, &mut self.src) {
                Some(len) => {
                    let f = Frame {
                        segs: &self.src,
                        skip: 0,
                        len,
                        vnet: VnetHdr::NONE,
                        queue: q,
                    };
                    (self.fabric.forward(src, &f), len)
                }
                None => (Verdict::TooBig, 0),
            };
            tally.count(v, len);
        }
        self.fabric.dl.defer_copies = false;
        self.fabric.release_held();
        self.mbufs.free_all();
        if let Some(s) = self.fabric.port(src).and_then(|p| p.from_port(q as usize)) {
            tally.publish(s);
        }
        n
    }

    /// Read up to BURST frames from one tap queue (one `readv` each) and switch them.
    #[inline]
    pub(super) fn tap_burst(&mut self, src: PortId, q: usize) -> usize {
        let Some(Port::Tap(p)) = self.fabric.port(src) else {
            return 0;
        };
        let Some(fd) = p.queues.get(q).map(|t| t.fd()) else {
            return 0;
        };
        let mut tally = Tally::default();
        while (tally.packets as usize) < BURST {
            let TapIo::Done(len) = tap::read_frame(fd, &mut self.tap_hdr, &mut self.tap_buf) else {
                break;
            };
            self.src.clear();
            // SAFETY: the PMD's own read buffer; `len` bytes were read into it.
            self.src
                .push(unsafe { Seg::new(self.tap_buf.as_mut_ptr(), len) });
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr.copy_from_slice(&self.tap_hdr[..VNET_HDR_LEN]);
            let v = self.forward_with_header(src, q as u16, &hdr, 0, len);
            tally.count(v, len);
        }
        if let Some(s) = self.fabric.port(src).and_then(|p| p.from_port(q)) {
            tally.publish(s);
        }
        tally.packets as usize
    }
}
