//! Ports as their PMD holds them (`PortRt`), and the vhost-user kind in full: the guest's RX and
//! TX virtqueues and the negotiated net features, plus delivery of one frame into the guest's RX
//! buffers (mergeable or not). Built by control, moved into the PMD, handed back to control for
//! teardown. Device-backed kinds (DPDK, tap) live in devport.rs.

use crate::devport::{EthPortRt, TapPortRt};
use crate::virtq::copy::Writer;
use crate::virtq::{SegList, SplitRing};
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
}

impl Default for NetFeatures {
    fn default() -> Self {
        NetFeatures {
            hdr_len: 12,
            mrg_rxbuf: false,
        }
    }
}

pub struct VhostPortRt {
    pub id: PortId,
    pub features: NetFeatures,
    /// Guest RX queues (even virtqueue indices 0, 2, …), indexed by queue pair.
    pub rx: Box<[Option<Box<SplitRing>>]>,
    /// Guest TX queues (odd virtqueue indices), indexed by queue pair.
    pub tx: Box<[Option<Box<SplitRing>>]>,
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
    pub fn slot(&mut self, index: u16) -> Option<&mut Option<Box<SplitRing>>> {
        let pair = (index / 2) as usize;
        if index.is_multiple_of(2) {
            self.rx.get_mut(pair)
        } else {
            self.tx.get_mut(pair)
        }
    }

    /// Every ring the port holds, for handing back to control.
    pub fn take_rings(&mut self) -> impl Iterator<Item = Box<SplitRing>> + '_ {
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

    /// Offer the frame `src[skip..]` (`frame_len` bytes). Deliveries that are only queued (guest
    /// used entries, mbufs) list the port in `scratch.dirty` for the caller to flush.
    #[inline]
    pub fn deliver(
        &mut self,
        src: &SegList,
        skip: u32,
        frame_len: u32,
        scratch: &mut RxScratch,
    ) -> Delivery {
        match self {
            PortRt::Vhost(p) => deliver(p, src, skip, frame_len, scratch),
            PortRt::Eth(p) => p.deliver(src, skip, frame_len, &mut scratch.dirty),
            PortRt::Tap(p) => p.deliver(src, skip),
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
}

/// Scratch space for RX chains, allocated once per PMD.
pub struct RxScratch {
    chains: Box<[SegList]>,
    /// Ports given used RX entries since the owner last flushed them, each listed once.
    pub dirty: Vec<PortId>,
}

impl Default for RxScratch {
    fn default() -> Self {
        RxScratch {
            chains: (0..MAX_RX_CHAINS).map(|_| SegList::default()).collect(),
            dirty: Vec::with_capacity(crate::pmd::MAX_PORTS),
        }
    }
}

/// Copy the frame `src[skip..]` (`frame_len` bytes) with a fresh virtio-net header into the
/// first running RX queue of `port`. Used entries are written but not published: the port is
/// listed in `scratch.dirty` for the caller to flush once per burst.
#[inline]
pub fn deliver(
    port: &mut VhostPortRt,
    src: &SegList,
    skip: u32,
    frame_len: u32,
    scratch: &mut RxScratch,
) -> Delivery {
    let features = port.features;
    let Some(ring) = port.rx.iter_mut().flatten().find(|r| !r.broken) else {
        return Delivery::NoQueue;
    };
    let result = fill(ring, features, src, skip, frame_len, scratch);
    if !port.rx_dirty {
        port.rx_dirty = true;
        scratch.dirty.push(port.id);
    }
    let s = &ring.stats;
    match result {
        Ok(()) => {
            s.add(&s.packets, 1);
            s.add(&s.bytes, frame_len as u64);
            return Delivery::Delivered;
        }
        Err(RxDrop::NoBuffer) => s.add(&s.drop_no_rx_buffer, 1),
        Err(RxDrop::TooBig) => s.add(&s.drop_too_big, 1),
        Err(RxDrop::BadDescriptor) => s.add(&s.drop_bad_descriptor, 1),
    }
    Delivery::Refused
}

enum RxDrop {
    NoBuffer,
    TooBig,
    BadDescriptor,
}

#[inline]
fn fill(
    ring: &mut SplitRing,
    features: NetFeatures,
    src: &SegList,
    skip: u32,
    frame_len: u32,
    scratch: &mut RxScratch,
) -> Result<(), RxDrop> {
    let hdr_len = features.hdr_len as u32;
    let need = hdr_len + frame_len;
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
    hdr[10..12].copy_from_slice(&count.to_le_bytes()); // num_buffers (only read with MRG_RXBUF)
    let mut w = Writer::new(chains);
    w.write_unless_equal(&hdr[..hdr_len as usize]);
    w.copy_chain(src, skip);

    let mut left = need;
    for c in chains {
        let n = left.min(c.total);
        ring.push_used(c.head, n);
        left -= n;
    }
    ring.advance(count);
    Ok(())
}
