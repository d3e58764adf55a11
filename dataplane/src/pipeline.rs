//! The pipeline model's hand-off: an rx PMD copies a burst of a guest's frames (with their
//! virtio-net headers) into a `Batch` and hands it to a tx PMD through a crossbeam
//! `ArrayQueue`; the tx PMD switches and delivers them and gives the batch back to the rx
//! PMD's free list. Batches are allocated once per rx PMD; when none is free the rx PMD leaves
//! the frames in the guest's ring (back-pressure, not loss).

use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use crate::stats::QueueStats;
use crate::{PortId, BURST};

/// Room for one frame and its virtio-net header: an Ethernet frame of a 1500-byte MTU with a
/// VLAN tag fits, larger ones (TSO segments) are switched by the rx PMD itself.
pub const SLOT: usize = 2048;
/// Batches per rx PMD: 64 bursts in flight.
pub const BATCHES: usize = 64;
/// Batches a tx PMD's inbox holds.
pub const INBOX: usize = 256;

pub type Queue = ArrayQueue<Box<Batch>>;

/// One burst of copied frames from one rx queue.
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
    /// Polls rx queues; hands guests' frames to the tx PMDs (source `i` to inbox `i % n`).
    Rx {
        inboxes: Vec<Arc<Queue>>,
        free: Arc<Queue>,
    },
    /// Switches and delivers what the rx PMDs hand it.
    Tx { inbox: Arc<Queue> },
}
