//! Ports as their PMD holds them (`PortRt`), and the vhost-user kind in full: the guest's RX and
//! TX virtqueues and the negotiated net features, plus delivery of one frame into the guest's RX
//! buffers (mergeable or not). Built by control, moved into the PMD, handed back to control for
//! teardown. Device-backed kinds (DPDK, tap) live in devport.rs.

use crate::devport::{EthPortRt, TapPortRt};
use crate::offload::{self, Frame, OffloadCaps, SoftScratch, VNET_HDR_LEN};
use crate::virtq::copy::Writer;
use crate::virtq::{PackedRing, SegList, VirtQueue, Virtq};
use crate::PortId;

/// Chains one frame may be spread over with mergeable RX buffers (64 KiB over 1 KiB buffers).
pub const MAX_RX_CHAINS: usize = 64;

/// How many chains ahead RX delivery starts loading descriptors (and half as far, buffers).
const RX_PREFETCH_AHEAD: u16 = 4;

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

pub struct VhostPortRt {
    pub id: PortId,
    pub features: NetFeatures,
    /// Guest RX queues (even virtqueue indices 0, 2, …), indexed by queue pair.
    pub rx: Box<[Option<Box<Virtq>>]>,
    /// Guest TX queues (odd virtqueue indices), indexed by queue pair.
    pub tx: Box<[Option<Box<Virtq>>]>,
    /// Listed in `RxScratch::dirty`: has used RX entries not yet flushed.
    pub rx_dirty: bool,
}

impl VhostPortRt {
    pub fn new(id: PortId, queue_pairs: usize) -> Box<Self> {
        Box::new(VhostPortRt {
            id,
            features: NetFeatures::default(),
            rx: (0..queue_pairs).map(|_| None).collect(),
            tx: (0..queue_pairs).map(|_| None).collect(),
            rx_dirty: false,
        })
    }

    /// The slot of virtqueue `index` (even: RX, odd: TX), if the port has that many queues.
    pub fn slot(&mut self, index: u16) -> Option<&mut Option<Box<Virtq>>> {
        let pair = (index / 2) as usize;
        if index.is_multiple_of(2) {
            self.rx.get_mut(pair)
        } else {
            self.tx.get_mut(pair)
        }
    }

    /// Every ring the port holds, for handing back to control.
    pub fn take_rings(&mut self) -> impl Iterator<Item = Box<Virtq>> + '_ {
        self.rx
            .iter_mut()
            .chain(self.tx.iter_mut())
            .filter_map(Option::take)
    }
}

/// Any port a PMD can poll and deliver to.
pub enum PortRt {
    Vhost(Box<VhostPortRt>),
    Eth(Box<EthPortRt>),
    Tap(Box<TapPortRt>),
}

impl From<Box<VhostPortRt>> for PortRt {
    fn from(p: Box<VhostPortRt>) -> Self {
        PortRt::Vhost(p)
    }
}

impl From<Box<EthPortRt>> for PortRt {
    fn from(p: Box<EthPortRt>) -> Self {
        PortRt::Eth(p)
    }
}

impl From<Box<TapPortRt>> for PortRt {
    fn from(p: Box<TapPortRt>) -> Self {
        PortRt::Tap(p)
    }
}

impl PortRt {
    pub fn id(&self) -> PortId {
        match self {
            PortRt::Vhost(p) => p.id,
            PortRt::Eth(p) => p.id,
            PortRt::Tap(p) => p.id,
        }
    }

    /// Offer a frame. Deliveries that are only queued (guest used entries, mbufs) list the port
    /// in `scratch.dirty` for the caller to flush. A frame whose offloads the port does not take
    /// is finished in software first (offload.rs).
    #[inline]
    pub fn deliver(&mut self, f: &Frame, scratch: &mut RxScratch) -> Delivery {
        if f.vnet.is_none() || self.offloads().take(&f.vnet) {
            self.deliver_as_is(f, scratch)
        } else {
            self.deliver_finished(f, scratch)
        }
    }

    #[inline]
    fn deliver_as_is(&mut self, f: &Frame, scratch: &mut RxScratch) -> Delivery {
        match self {
            PortRt::Vhost(p) => deliver(p, f, scratch),
            PortRt::Eth(p) => p.deliver(f, &mut scratch.dirty),
            PortRt::Tap(p) => p.deliver(f),
        }
    }

    /// The offloads the port takes as they are.
    #[inline]
    fn offloads(&self) -> OffloadCaps {
        match self {
            PortRt::Vhost(p) => p.features.rx_offloads,
            // A tap takes any virtio-net header written to it (the kernel segments if need be).
            PortRt::Tap(_) => OffloadCaps::ALL,
            PortRt::Eth(_) => OffloadCaps::NONE,
        }
    }

    /// Checksums filled in, segments cut, each resulting frame delivered as is.
    #[cold]
    fn deliver_finished(&mut self, f: &Frame, scratch: &mut RxScratch) -> Delivery {
        let Some(mut soft) = scratch.soft.take() else {
            return Delivery::Refused;
        };
        let mut no_queue = false;
        let made = offload::finish(f, &mut soft, |frame| {
            match self.deliver_as_is(frame, scratch) {
                Delivery::Delivered => return true,
                Delivery::NoQueue => no_queue = true,
                Delivery::Refused | Delivery::BadOffload => {}
            }
            false
        });
        scratch.soft = Some(soft);
        let Ok(made) = made else {
            return Delivery::BadOffload;
        };
        if let Some(s) = self.to_port_stats() {
            s.add(&s.sw_offload, made.frames as u64);
        }
        match made.delivered {
            0 if no_queue => Delivery::NoQueue,
            0 => Delivery::Refused,
            _ => Delivery::Delivered,
        }
    }

    /// Where deliveries into the port are counted (for a guest, its first RX queue).
    fn to_port_stats(&self) -> Option<&crate::stats::QueueStats> {
        match self {
            PortRt::Vhost(p) => p.rx.iter().flatten().next().map(|r| &**r.stats()),
            PortRt::Eth(p) => Some(&p.to_port),
            PortRt::Tap(p) => Some(&p.to_port),
        }
    }

    /// Publish what `deliver` queued.
    #[inline]
    pub fn flush(&mut self) {
        match self {
            PortRt::Vhost(p) => {
                p.rx_dirty = false;
                for r in p.rx.iter_mut().flatten() {
                    r.flush();
                }
            }
            PortRt::Eth(p) => p.flush(),
            PortRt::Tap(_) => {}
        }
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
}

/// Scratch space for RX chains, allocated once per PMD.
pub struct RxScratch {
    chains: Box<[SegList]>,
    /// Ports given used RX entries since the owner last flushed them, each listed once.
    pub dirty: Vec<PortId>,
    /// For frames finished in software; taken out while in use.
    soft: Option<Box<SoftScratch>>,
}

impl Default for RxScratch {
    fn default() -> Self {
        RxScratch {
            chains: (0..MAX_RX_CHAINS).map(|_| SegList::default()).collect(),
            dirty: Vec::with_capacity(crate::pmd::MAX_PORTS),
            soft: Some(Box::default()),
        }
    }
}

/// Copy a frame with its virtio-net header into an RX queue of `port`: the running one
/// numbered as the queue it came from (modulo the guest's queues), or the next running one.
/// Used entries are written but not published: the port is listed in `scratch.dirty` for the
/// caller to flush once per burst.
#[inline]
pub fn deliver(port: &mut VhostPortRt, f: &Frame, scratch: &mut RxScratch) -> Delivery {
    let features = port.features;
    let (before, from) = port.rx.split_at_mut(f.queue_among(port.rx.len()));
    let Some(ring) = from
        .iter_mut()
        .chain(before.iter_mut())
        .flatten()
        .find(|r| !r.is_broken())
    else {
        return Delivery::NoQueue;
    };
    if !port.rx_dirty {
        port.rx_dirty = true;
        scratch.dirty.push(port.id);
    }
    match &mut **ring {
        Virtq::Split(r) => fill_counted(r, features, f, scratch),
        Virtq::Packed(r) => fill_packed(r, features, f, scratch),
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
    ring.prefetch_ahead(RX_PREFETCH_AHEAD);

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
    let mut hdr = [0u8; 12];
    if !f.vnet.is_none() {
        hdr[..VNET_HDR_LEN].copy_from_slice(&f.vnet.bytes());
    }
    hdr[10..12].copy_from_slice(&count.to_le_bytes()); // num_buffers (only read with MRG_RXBUF)
    let mut w = Writer::new(chains);
    w.write_unless_equal(&hdr[..hdr_len as usize]);
    w.copy_chain(f.segs, f.skip);

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
