//! Delivering one frame, as every PMD does it: the outcome (`Delivery`), the per-PMD scratch
//! that holds destination queues until the burst is flushed (`DeliveryScratch`), and delivery of a
//! frame whose offloads the destination does not take (finished in software first). PMD
//! threads.

use crate::mem::copy::PendingCopies;
use crate::mem::seg::SegList;
use crate::net::offload::{self, SoftScratch};
use crate::net::vnet::Frame;
use crate::port::lock::{DestLock, Holder};
use crate::stats::QueueStats;
use crate::PortId;

/// Chains one frame may be spread over with mergeable RX buffers (64 KiB over 1 KiB buffers).
pub const MAX_RX_CHAINS: usize = 64;

/// Checksums filled in, segments cut, each resulting frame delivered as is with `each` into
/// the one queue already chosen (and held); `stats` counts the frames made.
#[cold]
pub(crate) fn deliver_finished(
    f: &Frame,
    scratch: &mut DeliveryScratch,
    stats: &QueueStats,
    mut each: impl FnMut(&Frame, &mut DeliveryScratch) -> Delivery,
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
pub struct DeliveryScratch {
    /// Chains reserved for the frame being delivered into a guest RX queue.
    pub(crate) chains: Box<[SegList]>,
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
    /// are demoted (`crate::cpu::demote`) once copied into an mbuf: the guest writes them again
    /// when it reuses the buffer, and finds them in the shared cache instead of snooping
    /// them out of this core's (a stall of the guest freeing its mbufs goes). Only while the
    /// PMD keeps up with the guest, and for small frames: past that, demoting costs more than
    /// it saves (docs/performance.md, "Hot-path choices").
    pub demote_sources: bool,
}

impl DeliveryScratch {
    pub fn new(me: Holder) -> Self {
        DeliveryScratch {
            chains: (0..MAX_RX_CHAINS).map(|_| SegList::default()).collect(),
            me,
            held: Vec::with_capacity(crate::MAX_PORTS * 2),
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
        lock: &'a DestLock<T>,
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
