//! Ports as the PMDs share them (`Port`): the side frames are delivered into, each destination
//! queue behind a `TxLock` a PMD holds for a burst. The vhost-user kind in full: the guest's RX
//! queues and delivery of one frame into its RX buffers (mergeable or not). Device-backed kinds
//! (DPDK, tap) live in devport.rs; the source side (rx queues) in pmd.rs.

use crate::devport::{EthPort, TapPort};
use crate::offload::{self, Frame, OffloadCaps, SoftScratch};
use crate::stats::QueueStats;
use crate::txlock::{Holder, TxLock};
use crate::virtq::copy::{PendingCopies, Writer};
use crate::virtq::{PackedRing, SegList, VirtQueue, Virtq};
use crate::PortId;

/// Chains one frame may be spread over with mergeable RX buffers (64 KiB over 1 KiB buffers).
pub const MAX_RX_CHAINS: usize = 64;

/// How many chains ahead RX delivery starts loading descriptors (and half as far, buffers).
const RX_PREFETCH_AHEAD: u16 = 8;

/// How much of a frame copied at once (not put off) is prefetched before the copy: an MTU-sized
/// frame; past that the hardware's stream prefetcher has caught up.
const PREFETCH_FRAME_MAX: u32 = 2048;

/// What the guest negotiated that changes frame layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetFeatures {
    /// virtio-net header length: 12 with VERSION_1 or MRG_RXBUF, else 10.
    pub hdr_len: u8,
    pub mrg_rxbuf: bool,
    /// Offloads the guest takes on its RX queues (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN).
    pub rx_offloads: OffloadCaps,
    /// The guest may hand over frames with checksums or segmentation left to do (CSUM): its
    /// TX headers are read.
    pub tx_offloads: bool,
}

impl Default for NetFeatures {
    fn default() -> Self {
        NetFeatures {
            hdr_len: 12,
            mrg_rxbuf: false,
            rx_offloads: OffloadCaps::NONE,
            tx_offloads: false,
        }
    }
}

/// A guest RX queue as the PMDs deliver into it (behind its `TxLock`).
#[derive(Default)]
pub struct VhostRxq {
    pub ring: Option<Box<Virtq>>,
    /// What the guest negotiated when the ring was started.
    pub features: NetFeatures,
}

/// A vhost-user port's delivery side: the guest's RX queues (even virtqueue indices), each
/// behind a lock any PMD may take for a burst. Its TX queues are sources (`pmd::Rxq`), each
/// polled by one PMD.
pub struct VhostPort {
    pub id: PortId,
    pub rx: Box<[TxLock<VhostRxq>]>,
}

impl VhostPort {
    /// A guest's port with `queue_pairs` RX queues, none running yet.
    pub fn port(id: PortId, queue_pairs: usize) -> Port {
        Port::Vhost(VhostPort {
            id,
            rx: (0..queue_pairs)
                .map(|_| TxLock::new(VhostRxq::default()))
                .collect(),
        })
    }

    /// Into an RX queue: the running one numbered as the queue the frame came from (modulo
    /// the guest's queues), or the next running one.
    #[inline]
    fn deliver(&self, f: &Frame, scratch: &mut RxScratch) -> Delivery {
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

/// A port as every PMD holds it (shared, `Arc`): what frames are delivered into. Built by
/// control, handed to every PMD, handed back to control for teardown once all let go.
pub enum Port {
    Vhost(VhostPort),
    Eth(EthPort),
    Tap(TapPort),
}

impl Port {
    pub fn id(&self) -> PortId {
        match self {
            Port::Vhost(p) => p.id,
            Port::Eth(p) => p.id,
            Port::Tap(p) => p.id,
        }
    }

    /// Mark the destination queues only one of `n_pmds` PMDs delivers into: every queue when
    /// there is one PMD; a DPDK TX queue when there is one per PMD (PMD i sends on queue i).
    /// (`usize::MAX`: none, every queue is locked.)
    pub fn set_exclusive(&mut self, n_pmds: usize) {
        match self {
            Port::Vhost(p) => p.rx.iter_mut().for_each(|l| l.set_exclusive(n_pmds == 1)),
            Port::Eth(p) => {
                let own = p.tx.len() >= n_pmds;
                p.tx.iter_mut().for_each(|l| l.set_exclusive(own))
            }
            Port::Tap(_) => {}
        }
    }

    /// Swap guest RX queue `q`'s ring, between bursts, as PMD `me`; returns the old one.
    pub fn swap_ring(
        &self,
        me: Holder,
        q: usize,
        features: NetFeatures,
        ring: Option<Box<Virtq>>,
    ) -> Option<Box<Virtq>> {
        let Port::Vhost(p) = self else {
            return ring;
        };
        let Some(lock) = p.rx.get(q) else {
            return ring;
        };
        lock.with(me, |rxq| {
            rxq.features = features;
            std::mem::replace(&mut rxq.ring, ring)
        })
    }

    /// Offer a frame. A destination queue another PMD holds gives `Busy` (the caller lets go
    /// of what it holds and tries again); one taken here stays held, listed in
    /// `scratch.held`, until the caller flushes it. A frame whose offloads the port does not
    /// take is finished in software first (offload.rs).
    #[inline]
    pub fn deliver(&self, f: &Frame, scratch: &mut RxScratch) -> Delivery {
        match self {
            Port::Vhost(p) => p.deliver(f, scratch),
            Port::Eth(p) => p.deliver(f, scratch),
            Port::Tap(p) => p.deliver(f),
        }
    }

    /// Publish what was delivered into queue `q` and let go of it.
    ///
    /// # Safety
    /// The caller's PMD holds queue `q` (it is in its `held` list) and no reference into it
    /// is alive.
    #[inline]
    pub unsafe fn flush_and_release(&self, q: usize) {
        match self {
            Port::Vhost(p) => {
                let l = &p.rx[q];
                // SAFETY: held, per the contract.
                if let Some(r) = unsafe { l.get() }.ring.as_mut() {
                    r.flush();
                }
                l.release();
            }
            Port::Eth(p) => {
                let l = &p.tx[q];
                // SAFETY: held, per the contract.
                unsafe { l.get() }.flush(p.dev.port_id);
                l.release();
            }
            Port::Tap(_) => {}
        }
    }

    /// The source side's counters of queue `q`, for device ports (a guest's are in its rings).
    pub fn from_port(&self, q: usize) -> Option<&QueueStats> {
        match self {
            Port::Vhost(_) => None,
            Port::Eth(p) => p.from_port.get(q).map(|s| &**s),
            Port::Tap(p) => p.from_port.get(q).map(|s| &**s),
        }
    }
}

/// Checksums filled in, segments cut, each resulting frame delivered as is with `each` into
/// the one queue already chosen (and held); `stats` counts the frames made.
#[cold]
pub(crate) fn deliver_finished(
    f: &Frame,
    scratch: &mut RxScratch,
    stats: &QueueStats,
    mut each: impl FnMut(&Frame, &mut RxScratch) -> Delivery,
) -> Delivery {
    let Some(mut soft) = scratch.soft.take() else {
        return Delivery::Refused;
    };
    // Each frame made is gone once delivered (its buffer is reused for the next).
    let defer = std::mem::replace(&mut scratch.defer_copies, false);
    let made = offload::finish(f, &mut soft, |frame| {
        matches!(each(frame, scratch), Delivery::Delivered)
    });
    scratch.defer_copies = defer;
    scratch.soft = Some(soft);
    let Ok(made) = made else {
        return Delivery::BadOffload;
    };
    stats.add_shared(&stats.sw_offload, made.frames as u64);
    match made.delivered {
        0 => Delivery::Refused,
        _ => Delivery::Delivered,
    }
}

/// Outcome of offering one frame to a destination port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// The port has no running RX queue (guest not connected, or queue not started).
    NoQueue,
    /// Counted on the destination queue (no RX buffer, too big, bad RX descriptor).
    Refused,
    /// The frame's offload header does not describe it (checksum or TCP headers not where it
    /// says): the source's fault, counted there.
    BadOffload,
    /// Another PMD holds the destination queue: nothing was done.
    Busy,
}

/// Scratch space for deliveries, one per PMD.
pub struct RxScratch {
    chains: Box<[SegList]>,
    /// This PMD, as a lock holder.
    pub me: Holder,
    /// Destination queues (port, queue) this PMD holds since it last flushed, each once.
    pub held: Vec<(PortId, u16)>,
    /// For frames finished in software; taken out while in use.
    soft: Option<Box<SoftScratch>>,
    /// Copies into held guest RX buffers not done yet: run before those queues are flushed,
    /// and before the frames' sources are handed back.
    pub copies: PendingCopies,
    /// Whether the frames now delivered stay where they are until `copies` runs (guest TX
    /// buffers and mbufs do; a tap's read buffer and software-finished frames do not).
    pub defer_copies: bool,
    /// Whether the frames now delivered are a guest's TX buffers whose small frames' lines
    /// are demoted (`crate::demote`) once copied into an mbuf: the guest writes them again
    /// when it reuses the buffer, and finds them in the shared cache instead of snooping
    /// them out of this core's. Measured with a testpmd guest sending 64 B to a DPDK port
    /// (g2p): the guest's cycles per frame fell from about 101 to 96 (a stall freeing its
    /// mbufs was gone), and the rate rose 3 %. Only while the PMD keeps up with the guest,
    /// and for small frames: demoting every burst's first lines cost g2p 1518 B 3 to 6 %.
    pub demote_sources: bool,
}

impl RxScratch {
    pub fn new(me: Holder) -> Self {
        RxScratch {
            chains: (0..MAX_RX_CHAINS).map(|_| SegList::default()).collect(),
            me,
            held: Vec::with_capacity(crate::pmd::MAX_PORTS * 2),
            soft: Some(Box::default()),
            copies: PendingCopies::new(),
            defer_copies: false,
            demote_sources: false,
        }
    }

    /// Which PMD this is (0, 1, …).
    #[inline]
    pub fn pmd_index(&self) -> usize {
        self.me as usize - 1
    }

    /// Queue `q` of `port`, held by this PMD from now until the next flush; None if another
    /// PMD holds it. The reference must be dropped before the next `hold` of the same queue.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn hold<'a, T>(
        &mut self,
        port: PortId,
        q: usize,
        lock: &'a TxLock<T>,
    ) -> Option<&'a mut T> {
        if !lock.held_by(self.me) {
            if !lock.try_hold(self.me) {
                return None;
            }
            self.held.push((port, q as u16));
        }
        // SAFETY: held by this PMD; callers keep one reference per queue at a time.
        Some(unsafe { lock.get() })
    }
}

/// `fill`, counted on the ring's queue.
#[inline]
fn fill_counted<R: VirtQueue>(
    ring: &mut R,
    features: NetFeatures,
    f: &Frame,
    scratch: &mut RxScratch,
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
    scratch: &mut RxScratch,
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
    unsafe { crate::virtq::copy::copy_bytes(src, dst, f.len as usize) };
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
    scratch: &mut RxScratch,
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
        // stream prefetcher behind it) reaches them: v2v 1518 B went from about 500 to 410
        // cycles per frame.
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
