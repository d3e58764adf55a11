//! Virtqueues as the PMD sees them: split rings (split.rs) and packed rings (packed.rs) over
//! cached host pointers, behind one interface (`VirtQueue`) that the hot path is generic over;
//! descriptor chains gathered into segment lists, and scatter-gather copies between guests
//! (mem/copy.rs). Everything here runs on a PMD thread, except ring construction, which runs on
//! control.

use std::sync::Arc;

use virtio_bindings::virtio_ring;

use crate::cpu::{prefetch, prefetch_w};
use crate::mem::seg::{Seg, SegList, MAX_SEGS};
use crate::mem::table::{DirtyLog, MemTable};
use crate::stats::QueueStats;

pub mod call;
pub mod packed;
pub mod split;

pub use call::CallFd;
pub use packed::PackedRing;
pub use split::{RingError, SplitRing};

/// What the PMD does with a virtqueue, split or packed. Chains are taken in the order the
/// driver made them available and given back in the same order.
pub trait VirtQueue {
    /// Whether `avail_pending` counts every chain the driver made available (a split ring's
    /// index says so; a packed ring is scanned for a burst's worth at most).
    const COUNTS_ALL_PENDING: bool;
    /// How many chains are available (up to a burst's worth for packed rings); marks the ring
    /// broken if the driver's index is impossible.
    fn avail_pending(&mut self) -> u16;
    /// At least `want` chains available? Returns how many are known to be; reloads the
    /// driver's index at most once between flushes.
    fn avail_at_least(&mut self, want: u16) -> u16;
    /// The head of the `i`-th available chain (i < what `avail_pending` returned).
    fn head_at(&self, i: u16) -> u16;
    /// Cache hints for a chain's descriptor and data (nothing validated, nothing consumed).
    fn prefetch_desc(&self, head: u16);
    fn prefetch_data(&self, head: u16, offset: u32);
    /// RX look-ahead: descriptors `ahead` chains on, buffers (for a frame after a `hdr_len`-byte
    /// header) half as far.
    fn prefetch_ahead(&self, ahead: u16, hdr_len: u32);
    /// Gather the chain at `head` into `out`, every buffer checked against guest memory and for
    /// its direction, the walk bounded.
    fn walk_chain(&self, head: u16, writable: bool, out: &mut SegList) -> Result<(), ChainError>;
    /// Give back the chain at `head` with `len` bytes written, in the order chains were taken.
    fn push_used(&mut self, head: u16, len: u32);
    /// Consume `n` chains, each given back with `push_used` in this burst.
    fn advance(&mut self, n: u16);
    /// Publish what was given back and notify the driver if it asked.
    fn flush(&mut self);
    /// Log (dirty-page log, while migrating) the first `len` bytes of a chain the switch wrote.
    fn log_written(&self, chain: &SegList, len: u32);
    /// Whether copies into chains taken from it may wait until `flush` (`PendingCopies`):
    /// nothing given back is visible to the guest before, and no written page must be logged
    /// (a page is logged after it is written, while migrating).
    fn copies_may_wait(&self) -> bool;
    fn is_broken(&self) -> bool;
    fn stats(&self) -> &QueueStats;
}

/// A running virtqueue as its port holds it (boxed: the variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
pub enum Virtq {
    Split(SplitRing),
    Packed(PackedRing),
}

impl Virtq {
    /// Guest kicks on (the PMD will sleep) or off; true if chains are already waiting.
    pub fn set_kicks(&mut self, on: bool) -> bool {
        match self {
            Virtq::Split(r) => r.set_kicks(on),
            Virtq::Packed(r) => r.set_kicks(on),
        }
    }

    pub fn is_broken(&self) -> bool {
        match self {
            Virtq::Split(r) => r.is_broken(),
            Virtq::Packed(r) => r.is_broken(),
        }
    }

    pub fn stats(&self) -> &Arc<QueueStats> {
        match self {
            Virtq::Split(r) => &r.stats,
            Virtq::Packed(r) => &r.stats,
        }
    }

    pub fn flush(&mut self) {
        match self {
            Virtq::Split(r) => r.flush(),
            Virtq::Packed(r) => flush_packed(r),
        }
    }

    /// Log every page the ring writes from now on (runs on control, before the PMD has it).
    /// `used_gpa`: the frontend's `log_guest_addr` for a split ring's used ring.
    pub fn with_log(self, log: Arc<DirtyLog>, used_gpa: Option<u64>) -> Virtq {
        match self {
            Virtq::Split(r) => Virtq::Split(r.with_log(log, used_gpa)),
            Virtq::Packed(r) => Virtq::Packed(r.with_log(log)),
        }
    }

    /// Where the driver should resume: SET_VRING_BASE's value for a new ring (for packed rings
    /// the wrap counter is bit 15).
    pub fn base(&self) -> u16 {
        match self {
            Virtq::Split(r) => r.last_avail_idx,
            Virtq::Packed(r) => r.base(),
        }
    }
}

/// Out of line: the split ring's flush is on every burst's path.
#[inline(never)]
fn flush_packed(r: &mut PackedRing) {
    r.flush()
}

impl From<SplitRing> for Virtq {
    fn from(r: SplitRing) -> Self {
        Virtq::Split(r)
    }
}

impl From<PackedRing> for Virtq {
    fn from(r: PackedRing) -> Self {
        Virtq::Packed(r)
    }
}

/// Host address of byte `offset` of the guest buffer at `addr` (`len` bytes), and how many bytes
/// from there a prefetch may touch: at most 128, as only the first lines are prefetched and only
/// they need to be mapped. None past the buffer's end or outside guest memory.
#[inline]
pub(crate) fn prefetch_span(
    mem: &MemTable,
    addr: u64,
    len: u32,
    offset: u32,
) -> Option<(*mut u8, u32)> {
    if offset >= len {
        return None;
    }
    let span = (len - offset).min(128);
    let p = mem.gpa_to_host(addr.wrapping_add(offset as u64), span as u64)?;
    Some((p, span))
}

/// Hints for an RX buffer at `p` (`span` bytes mapped there): its header is read, for it is
/// only stored when it differs (`Writer::write_header`), and the lines of the frame's first 64
/// bytes are taken for writing. Taking the buffer's first line instead missed the frame's own
/// line whenever the header ends a line, as it does in DPDK's RX buffers. A header on the
/// frame's first line (a buffer that starts with it, as Linux's mergeable ones do) is not asked
/// for apart: a read, then a write, of a line the guest holds is two transfers.
#[inline]
pub(crate) fn prefetch_rx(p: *mut u8, span: u32, hdr_len: u32) {
    if hdr_len >= span {
        // The frame starts in another buffer: only the header is here.
        prefetch(p);
        return;
    }
    let frame = p.wrapping_add(hdr_len as usize);
    if (p as usize ^ frame as usize) >= 64 {
        prefetch(p);
    }
    prefetch_w(frame);
    prefetch_w(p.wrapping_add((hdr_len + 63).min(span - 1) as usize));
}

/// Log (dirty-page log, while migrating) the first `len` bytes of a chain the switch wrote.
#[inline]
pub(crate) fn log_chain(log: &DirtyLog, mem: &MemTable, chain: &SegList, len: u32) {
    for piece in chain.pieces(0, len) {
        log.mark_host(mem, piece.ptr(), piece.len() as u64);
    }
}

/// Wake the driver (the one system call a PMD makes, when the guest asked for it), through
/// the PMD's notifier: never blocking, whatever the frontend did to its fd (call.rs).
#[inline]
pub(crate) fn notify(call: &Option<CallFd>, stats: &QueueStats) {
    if let Some(call) = call {
        if call.notify() {
            stats.add(&stats.guest_notifications, 1);
        }
    }
}

/// Translate one guest buffer into `out`, split where it crosses a memory-region boundary.
#[inline]
pub(crate) fn push_segs(
    mem: &MemTable,
    mut gpa: u64,
    len: u32,
    out: &mut SegList,
) -> Result<(), ChainError> {
    out.total = out.total.checked_add(len).ok_or(ChainError::BadAddress)?;
    let mut left = len as u64;
    while left > 0 {
        let (ptr, n) = mem
            .gpa_to_host_partial(gpa, left)
            .ok_or(ChainError::BadAddress)?;
        let slot = out.segs.get_mut(out.n).ok_or(ChainError::TooLong)?;
        // SAFETY: `n` bytes at `ptr` translated by the ring's memory table, which outlives
        // the chain's use (control swaps the table only with the ring handed back).
        *slot = unsafe { Seg::new(ptr, n as u32) };
        out.n += 1;
        left -= n;
        gpa = gpa.checked_add(n).ok_or(ChainError::BadAddress)?;
    }
    Ok(())
}

// The spec's flags, from virtio-bindings (u32 there; the ring fields are u16).
pub const VIRTQ_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
pub const VIRTQ_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
pub const VIRTQ_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;
pub const VRING_USED_F_NO_NOTIFY: u16 = virtio_ring::VRING_USED_F_NO_NOTIFY as u16;
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Descriptors read from guest memory, counted only in fuzzing builds: the fuzz targets'
/// cost oracle (a chain's walk must stay within MAX_CHAIN_DESCS reads).
#[cfg(fuzzing)]
pub static DESC_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(fuzzing)]
#[inline]
pub(crate) fn count_desc_read() {
    DESC_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(not(fuzzing))]
#[inline(always)]
pub(crate) fn count_desc_read() {}

/// Descriptors one chain may have, zero-length ones included (they add no segment, but each
/// costs a read): the walk of a chain is bounded by this, not by the queue size (32768).
pub const MAX_CHAIN_DESCS: u16 = MAX_SEGS as u16;

/// Why a chain was refused. Each becomes a counted drop; the chain is returned with length 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// Head or `next` index past the queue size.
    BadIndex,
    /// Address/length outside guest memory, or length sum overflow.
    BadAddress,
    /// More descriptors than the queue size (a loop) or than MAX_SEGS.
    TooLong,
    /// A readable buffer where a writable one was needed, or the reverse.
    WrongDirection,
    /// Indirect table of bad length, nested, or combined with NEXT.
    BadIndirect,
}

/// `vring_need_event` from the virtio spec: should the other side be notified when the index
/// moves from `old` to `new`, given it asked to hear at `event`?
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
pub(crate) mod mock;
