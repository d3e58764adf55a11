//! Virtqueues as the PMD sees them: split-ring access over cached host pointers (split.rs),
//! descriptor chains gathered into segment lists, and scatter-gather copies between guests (copy.rs).
//! Everything here runs on a PMD thread, except ring construction, which runs on control.

pub mod copy;
pub mod split;

pub use split::{RingError, SplitRing};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Descriptors one chain may span after translation. Linux sends at most ~20 (MAX_SKB_FRAGS + 2);
/// a longer chain is refused as a bad descriptor rather than walked.
pub const MAX_SEGS: usize = 64;

/// A host-virtual buffer inside guest memory, already bounds-checked against the memory table.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub ptr: *mut u8,
    pub len: u32,
}

impl Seg {
    const EMPTY: Seg = Seg {
        ptr: std::ptr::null_mut(),
        len: 0,
    };
}

/// The translated buffers of one descriptor chain.
pub struct SegList {
    pub head: u16,
    pub n: usize,
    /// Sum of `segs[..n].len`, checked.
    pub total: u32,
    pub segs: [Seg; MAX_SEGS],
}

impl Default for SegList {
    fn default() -> Self {
        SegList {
            head: 0,
            n: 0,
            total: 0,
            segs: [Seg::EMPTY; MAX_SEGS],
        }
    }
}

impl SegList {
    pub fn segs(&self) -> &[Seg] {
        &self.segs[..self.n]
    }

    /// Empty the list.
    pub fn clear(&mut self) {
        self.n = 0;
        self.total = 0;
    }

    /// Append a buffer; false (and nothing appended) if the list is full.
    pub fn push(&mut self, seg: Seg) -> bool {
        if self.n == MAX_SEGS {
            return false;
        }
        self.segs[self.n] = seg;
        self.n += 1;
        self.total += seg.len;
        true
    }

    /// Append the pieces of `src` that hold its bytes `from..from + len` (a frame assembled
    /// from parts of another, without copying); false if they do not all fit.
    pub fn push_range(&mut self, src: &SegList, mut from: u32, mut len: u32) -> bool {
        for seg in src.segs() {
            if len == 0 {
                break;
            }
            if from >= seg.len {
                from -= seg.len;
                continue;
            }
            let n = (seg.len - from).min(len);
            let piece = Seg {
                ptr: seg.ptr.wrapping_add(from as usize),
                len: n,
            };
            if !self.push(piece) {
                return false;
            }
            len -= n;
            from = 0;
        }
        len == 0
    }

    /// A list over the given buffers (tests).
    #[cfg(test)]
    pub(crate) fn over(bufs: &mut [Vec<u8>]) -> SegList {
        let mut l = SegList::default();
        for b in bufs.iter_mut() {
            assert!(l.push(Seg {
                ptr: b.as_mut_ptr(),
                len: b.len() as u32,
            }));
        }
        l
    }
}

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
