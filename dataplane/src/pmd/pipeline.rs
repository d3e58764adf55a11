//! The pipeline model's hand-off: an rx PMD copies a burst of a guest's frames (with their
//! virtio-net headers) into a `Batch` and hands it to a tx PMD through a crossbeam
//! `ArrayQueue`; the tx PMD switches and delivers them and gives the batch back to the rx
//! PMD's free list. Batches are allocated once per rx PMD; when none is free the rx PMD leaves
//! the frames in the guest's ring (back-pressure, not loss). PMD threads.

use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use super::burst::Fwd;
use super::tally::{Tally, Verdict};
use super::Pmd;
use crate::mem::copy::gather;
use crate::mem::seg::Seg;
use crate::net::features::NetFeatures;
use crate::stats::QueueStats;
use crate::virtq::{VirtQueue, Virtq};
use crate::{PortId, BURST};

/// Room for one frame and its virtio-net header: an Ethernet frame of a 1500-byte MTU with a
/// VLAN tag fits, larger ones (TSO segments) are switched by the rx PMD itself.
pub const SLOT: usize = 2048;
/// Batches per rx PMD: 64 bursts in flight.
pub const BATCHES: usize = 64;
/// Batches a tx PMD's inbox holds.
pub const INBOX: usize = 256;

pub type Queue = ArrayQueue<Box<Batch>>;

/// One burst of copied frames from one source queue.
pub struct Batch {
    pub src: PortId,
    pub queue: u16,
    /// virtio-net header length and whether the header may ask for offloads (CSUM).
    pub hdr_len: u32,
    pub tx_offloads: bool,
    /// Where the source's counters are (the tx PMD publishes the verdicts).
    pub stats: Option<Arc<QueueStats>>,
    pub n: usize,
    /// Length of each frame, header included.
    pub lens: [u32; BURST],
    /// `BURST` slots of `SLOT` bytes.
    pub data: Box<[u8]>,
    /// The free list it goes back to.
    home: Arc<Queue>,
}

impl Batch {
    pub fn slot(&mut self, i: usize) -> &mut [u8] {
        &mut self.data[i * SLOT..(i + 1) * SLOT]
    }

    /// Back to the rx PMD that filled it.
    pub fn recycle(mut self: Box<Self>) {
        self.n = 0;
        self.stats = None;
        let home = self.home.clone();
        // The free list holds every batch of its PMD, so it has room.
        let _ = home.push(self);
    }
}

/// A free list of `BATCHES` batches for one rx PMD.
pub fn free_list() -> Arc<Queue> {
    let q = Arc::new(ArrayQueue::new(BATCHES));
    for _ in 0..BATCHES {
        let _ = q.push(Box::new(Batch {
            src: PortId(0),
            queue: 0,
            hdr_len: 0,
            tx_offloads: false,
            stats: None,
            n: 0,
            lens: [0; BURST],
            data: vec![0u8; BURST * SLOT].into_boxed_slice(),
            home: q.clone(),
        }));
    }
    q
}

/// A PMD's part in the pipeline.
pub enum Role {
    /// Polls source queues; hands guests' frames to the tx PMDs (source `i` to inbox `i % n`).
    Rx {
        inboxes: Vec<Arc<Queue>>,
        free: Arc<Queue>,
    },
    /// Switches and delivers what the rx PMDs hand it.
    Tx { inbox: Arc<Queue> },
}

impl Pmd {
    /// Pipeline model, on a tx PMD: deliver what the rx PMDs handed over (at most an inbox's
    /// worth per pass, so commands are not starved).
    #[inline(never)]
    pub(super) fn take_batches(&mut self) -> usize {
        let Some(Role::Tx { inbox }) = &self.role else {
            return 0;
        };
        let mut moved = 0;
        for _ in 0..INBOX {
            let Some(batch) = inbox.pop() else {
                break;
            };
            moved += self.fwd.deliver_batch(batch);
        }
        moved
    }
}

/// Pipeline model, on an rx PMD: copy a burst of the guest's frames into a free batch and
/// hand it to a tx PMD. Without a free batch the frames stay in the ring (back-pressure). Out
/// of line: the rtc path is the one to keep tight.
#[inline(never)]
pub(super) fn hand_off(
    fwd: &mut Fwd,
    role: &Option<Role>,
    port: PortId,
    queue: u16,
    ring: &mut Virtq,
    features: NetFeatures,
) -> usize {
    let Some(Role::Rx { inboxes, free }) = role else {
        return 0;
    };
    let Some(mut batch) = free.pop() else {
        return 0;
    };
    batch.src = port;
    batch.queue = queue;
    batch.hdr_len = features.hdr_len as u32;
    batch.tx_offloads = features.tx_offloads;
    batch.stats = Some(ring.stats().clone());
    let n = match ring {
        Virtq::Split(r) => fwd.copy_out(port, queue, r, features, &mut batch),
        Virtq::Packed(r) => fwd.copy_out(port, queue, r, features, &mut batch),
    };
    if batch.n == 0 {
        batch.recycle();
        return n;
    }
    // One source always to the same tx PMD: its frames stay in order.
    let inbox = &inboxes[(port.0 as usize + queue as usize) % inboxes.len()];
    if let Err(batch) = inbox.push(batch) {
        fwd.deliver_batch(batch);
    }
    n
}

impl Fwd {
    /// Pipeline model: take up to BURST frames from a guest's TX ring, copying each (with its
    /// header) into `batch`; a frame too big for a slot is switched here, as in `rtc`.
    pub(super) fn copy_out<R: VirtQueue>(
        &mut self,
        src: PortId,
        queue: u16,
        ring: &mut R,
        features: NetFeatures,
        batch: &mut Batch,
    ) -> usize {
        let hdr_len = features.hdr_len as u32;
        let n = ring.avail_pending().min(BURST as u16);
        let mut tally = Tally::default();
        self.seg_cost = 0;
        let (mut bytes, mut taken) = (0u32, n);
        for i in 0..n {
            let head = ring.head_at(i);
            let (v, len) = if ring.walk_chain(head, false, &mut self.src).is_err() {
                (Some(Verdict::BadDescriptor), 0)
            } else if self.src.total < hdr_len {
                (Some(Verdict::Runt), 0)
            } else if self.src.total as usize > SLOT {
                let (v, len) = self.forward_walked(src, queue, hdr_len, features.tx_offloads);
                (Some(v), len)
            } else {
                let k = batch.n;
                gather(&self.src, 0, batch.slot(k));
                batch.lens[k] = self.src.total;
                batch.n += 1;
                (None, 0)
            };
            if let Some(v) = v {
                tally.count(v, len);
            }
            ring.push_used(head, 0);
            if self.over_budget(&mut bytes, v) {
                taken = i + 1;
                break;
            }
        }
        ring.advance(taken);
        ring.flush();
        tally.publish_shared(ring.stats());
        taken as usize
    }

    /// Pipeline model, on a tx PMD: switch and deliver a batch an rx PMD handed over, count
    /// the verdicts on its source, give the batch back.
    pub(super) fn deliver_batch(&mut self, mut batch: Box<Batch>) -> usize {
        let mut tally = Tally::default();
        let (src, queue, hdr_len) = (batch.src, batch.queue, batch.hdr_len);
        for i in 0..batch.n {
            let total = batch.lens[i];
            self.src.clear();
            // SAFETY: the batch's slot, `total` <= SLOT bytes, held until it is recycled below.
            self.src
                .push(unsafe { Seg::new(batch.slot(i).as_mut_ptr(), total) });
            let (v, len) = self.forward_walked(src, queue, hdr_len, batch.tx_offloads);
            tally.count(v, len);
        }
        self.fabric.release_held();
        if let Some(s) = &batch.stats {
            tally.publish_shared(s);
        }
        let n = batch.n;
        batch.recycle();
        n
    }
}
