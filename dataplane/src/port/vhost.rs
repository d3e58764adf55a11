//! A guest's RX side as the PMDs share it (`VhostPort`): its RX queues, each behind a lock any
//! PMD may take for a burst, and delivery of one frame into the guest's RX buffers (mergeable
//! or not, split or packed ring). PMD threads; control builds the port and swaps its rings.

use crate::mem::copy::{PendingCopies, Writer};
use crate::net::features::NetFeatures;
use crate::net::vnet::Frame;
use crate::port::delivery::{deliver_finished, Delivery, DeliveryScratch, MAX_RX_CHAINS};
use crate::port::lock::DestLock;
use crate::port::Port;
use crate::virtq::{PackedRing, VirtQueue, Virtq};
use crate::PortId;

/// How many chains ahead RX delivery starts loading descriptors (and half as far, buffers).
const RX_PREFETCH_AHEAD: u16 = 8;

/// How much of a frame copied at once (not put off) is prefetched before the copy: an MTU-sized
/// frame; past that the hardware's stream prefetcher has caught up.
const PREFETCH_FRAME_MAX: u32 = 2048;

/// A guest RX queue as the PMDs deliver into it (behind its `DestLock`).
#[derive(Default)]
pub struct GuestRxq {
    pub ring: Option<Box<Virtq>>,
    /// What the guest negotiated when the ring was started.
    pub features: NetFeatures,
}

/// A vhost-user port's delivery side: the guest's RX queues (even virtqueue indices), each
/// behind a lock any PMD may take for a burst. Its TX queues are sources (`pmd::SourceQueue`), each
/// polled by one PMD.
pub struct VhostPort {
    pub id: PortId,
    pub rx: Box<[DestLock<GuestRxq>]>,
}

impl VhostPort {
    /// A guest's port with `queue_pairs` RX queues, none running yet.
    pub fn port(id: PortId, queue_pairs: usize) -> Port {
        Port::Vhost(VhostPort {
            id,
            rx: (0..queue_pairs)
                .map(|_| DestLock::new(GuestRxq::default()))
                .collect(),
        })
    }

    /// Into an RX queue: the running one numbered as the queue the frame came from (modulo
    /// the guest's queues), or the next running one.
    #[inline]
    pub(crate) fn deliver(&self, f: &Frame, scratch: &mut DeliveryScratch) -> Delivery {
        let n = self.rx.len();
        let first = f.queue_among(n);
        for i in 0..n {
            let q = if first + i < n {
                first + i
            } else {
                first + i - n
            };
            let Some(rxq) = scratch.hold(self.id, q, &self.rx[q]) else {
                return Delivery::Busy;
            };
            let features = rxq.features;
            let Some(ring) = rxq.ring.as_deref_mut().filter(|r| !r.is_broken()) else {
                continue;
            };
            if f.vnet.is_none() || features.rx_offloads.take(&f.vnet) {
                return match ring {
                    Virtq::Split(r) => fill_counted(r, features, f, scratch),
                    Virtq::Packed(r) => fill_packed(r, features, f, scratch),
                };
            }
            let stats = ring.stats().clone();
            return deliver_finished(f, scratch, &stats, |frame, scratch| match ring {
                Virtq::Split(r) => fill_counted(r, features, frame, scratch),
                Virtq::Packed(r) => fill_packed(r, features, frame, scratch),
            });
        }
        Delivery::NoQueue
    }
}

/// `fill`, counted on the ring's queue.
#[inline]
fn fill_counted<R: VirtQueue>(
    ring: &mut R,
    features: NetFeatures,
    f: &Frame,
    scratch: &mut DeliveryScratch,
) -> Delivery {
    let result = fill(ring, features, f, scratch);
    let s = ring.stats();
    match result {
        Ok(()) => {
            s.add(&s.packets, 1);
            s.add(&s.bytes, f.len as u64);
            return Delivery::Delivered;
        }
        Err(RxDrop::NoBuffer) => s.add(&s.drop_no_rx_buffer, 1),
        Err(RxDrop::TooBig) => s.add(&s.drop_too_big, 1),
        Err(RxDrop::BadDescriptor) => s.add(&s.drop_bad_descriptor, 1),
    }
    Delivery::Refused
}

/// Packed rings out of line: the split-ring path is the one to keep tight.
#[inline(never)]
fn fill_packed(
    ring: &mut PackedRing,
    features: NetFeatures,
    f: &Frame,
    scratch: &mut DeliveryScratch,
) -> Delivery {
    fill_counted(ring, features, f, scratch)
}

/// Put off the copy of a small frame that lies in one buffer into one (see `PendingCopies`).
#[inline]
fn defer_copy(w: &mut Writer, f: &Frame, allowed: bool, copies: &mut PendingCopies) -> bool {
    if !allowed || f.len > PendingCopies::MAX_LEN {
        return false;
    }
    let Some(src) = f.segs.contiguous(f.skip, f.len) else {
        return false;
    };
    let Some(dst) = w.reserve(f.len) else {
        return false;
    };
    // SAFETY: `defer_copies` is only set while the frame's source stays put until the copies
    // run, and `dst` lies in a chain of a queue this PMD holds, whose used index is not
    // published before they run (`release_held`).
    if unsafe { copies.push(src, dst, f.len) } {
        return true;
    }
    // Full: this one now, and the writer is past it.
    // SAFETY: as above; both are valid now.
    unsafe { crate::mem::copy::copy_bytes(src, dst, f.len as usize) };
    true
}

enum RxDrop {
    NoBuffer,
    TooBig,
    BadDescriptor,
}

#[inline]
fn fill<R: VirtQueue>(
    ring: &mut R,
    features: NetFeatures,
    f: &Frame,
    scratch: &mut DeliveryScratch,
) -> Result<(), RxDrop> {
    let hdr_len = features.hdr_len as u32;
    let need = hdr_len + f.len;
    ring.prefetch_ahead(RX_PREFETCH_AHEAD, hdr_len);

    // Reserve chains (without consuming them) until they hold the frame.
    let mut count = 0u16;
    let mut room = 0u32;
    while room < need {
        if count as usize == MAX_RX_CHAINS || (count > 0 && !features.mrg_rxbuf) {
            return Err(RxDrop::TooBig);
        }
        if ring.avail_at_least(count + 1) <= count {
            return Err(RxDrop::NoBuffer);
        }
        let head = ring.head_at(count);
        let chain = &mut scratch.chains[count as usize];
        if ring.walk_chain(head, true, chain).is_err() {
            // A corrupt RX chain: give back everything reserved so far, empty, and drop.
            for c in &scratch.chains[..count as usize] {
                ring.push_used(c.head, 0);
            }
            ring.push_used(head, 0);
            ring.advance(count + 1);
            return Err(RxDrop::BadDescriptor);
        }
        room = room.saturating_add(chain.total);
        count += 1;
    }

    let chains = &scratch.chains[..count as usize];
    // num_buffers (bytes 10..12) is only read with MRG_RXBUF.
    let (lo, hi) = f.vnet.words(count);
    let mut w = Writer::new(chains);
    w.write_header(lo, hi, hdr_len);
    if !defer_copy(
        &mut w,
        f,
        scratch.defer_copies && ring.copies_may_wait(),
        &mut scratch.copies,
    ) {
        // Both sides' lines requested at once, rather than as the copy (and the hardware's
        // stream prefetcher behind it) reaches them (docs/performance.md, "Hot-path choices").
        let ahead = f.len.min(PREFETCH_FRAME_MAX);
        f.segs.prefetch(f.skip, ahead);
        w.prefetch_w(ahead);
        w.copy_chain(f.segs, f.skip);
    }

    let mut left = need;
    for c in chains {
        let n = left.min(c.total);
        ring.push_used(c.head, n);
        ring.log_written(c, n);
        left -= n;
    }
    ring.advance(count);
    Ok(())
}
