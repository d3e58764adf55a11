//! Segment lists: a frame as the translated buffers that hold it (guest buffers, an mbuf
//! chain, a tap buffer). Built by the ring walks and the device bursts on a PMD thread.

use crate::cpu::{demote, prefetch, prefetch_lines};

/// Descriptors one chain may span after translation. Linux sends at most ~20 (MAX_SKB_FRAGS + 2);
/// a longer chain is refused as a bad descriptor rather than walked.
pub const MAX_SEGS: usize = 64;

/// A host-virtual buffer the switch may read and write: a translated guest buffer, an mbuf's
/// data, a PMD's own buffer. The copies and checksums over segment lists dereference it, so
/// it can only be made by `Seg::new`, whose caller vouches for it.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    ptr: *mut u8,
    len: u32,
}

impl Seg {
    const EMPTY: Seg = Seg {
        ptr: std::ptr::null_mut(),
        len: 0,
    };

    /// # Safety
    /// `len` bytes at `ptr` are mapped, and stay mapped for as long as the segment (or a list
    /// holding it) is used: guest memory translated through the memory table of the ring
    /// being walked (which outlives the walk's use), an mbuf the PMD owns, a buffer of its
    /// own. The bytes may change under it (a guest writes its memory at any time): the code
    /// reading segments never assumes otherwise.
    #[inline(always)]
    pub unsafe fn new(ptr: *mut u8, len: u32) -> Seg {
        Seg { ptr, len }
    }

    #[inline(always)]
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    #[inline(always)]
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u32 {
        self.len
    }
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

    /// Where the list's bytes `from..from + len` are, if one buffer holds them all.
    #[inline]
    pub fn contiguous(&self, from: u32, len: u32) -> Option<*const u8> {
        let mut from = from;
        for seg in self.segs() {
            if from < seg.len {
                return (seg.len - from >= len).then(|| seg.ptr.wrapping_add(from as usize) as _);
            }
            from -= seg.len;
        }
        None
    }

    /// Start loading every cache line of the list's bytes `from..from + len`.
    #[inline]
    pub fn prefetch(&self, from: u32, len: u32) {
        for piece in self.pieces(from, len) {
            prefetch_lines(piece.ptr, piece.len, prefetch);
        }
    }

    /// Demote (`cpu::demote`) every cache line of the list's bytes `from..from + len`.
    #[inline]
    pub fn demote(&self, from: u32, len: u32) {
        for piece in self.pieces(from, len) {
            prefetch_lines(piece.ptr, piece.len, demote);
        }
    }

    /// The pieces of the list's buffers that hold its bytes `from..from + len` (fewer bytes if
    /// the list is shorter).
    pub fn pieces(&self, mut from: u32, mut len: u32) -> impl Iterator<Item = Seg> + '_ {
        self.segs().iter().filter_map(move |seg| {
            if len == 0 {
                return None;
            }
            if from >= seg.len {
                from -= seg.len;
                return None;
            }
            let n = (seg.len - from).min(len);
            let piece = Seg {
                ptr: seg.ptr.wrapping_add(from as usize),
                len: n,
            };
            len -= n;
            from = 0;
            Some(piece)
        })
    }

    /// Append the pieces of `src` that hold its bytes `from..from + len` (a frame assembled
    /// from parts of another, without copying); false if they do not all fit.
    pub fn push_range(&mut self, src: &SegList, from: u32, len: u32) -> bool {
        let mut got = 0;
        for piece in src.pieces(from, len) {
            if !self.push(piece) {
                return false;
            }
            got += piece.len;
        }
        got == len
    }

    /// A list over raw buffers (tests).
    #[cfg(test)]
    pub(crate) fn over_raw(bufs: &[(*mut u8, u32)]) -> SegList {
        let mut l = SegList::default();
        for &(ptr, len) in bufs {
            assert!(l.push(Seg { ptr, len }));
        }
        l
    }

    /// A list over the given buffers (tests).
    #[cfg(test)]
    pub(crate) fn over(bufs: &mut [Vec<u8>]) -> SegList {
        let raw: Vec<_> = bufs
            .iter_mut()
            .map(|b| (b.as_mut_ptr(), b.len() as u32))
            .collect();
        SegList::over_raw(&raw)
    }
}
