//! Scatter-gather copies between translated guest buffers: the one copy of the guest → guest
//! path. Runs on a PMD. Sources and destinations may overlap (one frontend may own both ports and
//! point them at the same memory), so copies are memmove, never copy_nonoverlapping.

use super::{Seg, SegList};

/// Copy up to `out.len()` bytes of the chain, starting `skip` bytes in, into `out`.
/// Returns how many bytes were copied (less than `out.len()` only if the chain is shorter).
#[inline]
pub fn gather(src: &SegList, mut skip: u32, out: &mut [u8]) -> usize {
    let mut done = 0usize;
    for seg in src.segs() {
        if done == out.len() {
            break;
        }
        if skip >= seg.len {
            skip -= seg.len;
            continue;
        }
        let n = ((seg.len - skip) as usize).min(out.len() - done);
        // SAFETY: seg was bounds-checked against mapped guest memory when the chain was walked,
        // skip + n <= seg.len, and out has n bytes left at `done`.
        unsafe { std::ptr::copy(seg.ptr.add(skip as usize), out.as_mut_ptr().add(done), n) };
        done += n;
        skip = 0;
    }
    done
}

/// A write position across the segments of several writable chains (mergeable RX buffers).
pub struct Writer<'a> {
    chains: &'a [SegList],
    chain: usize,
    seg: usize,
    off: u32,
}

impl<'a> Writer<'a> {
    pub fn new(chains: &'a [SegList]) -> Self {
        Writer {
            chains,
            chain: 0,
            seg: 0,
            off: 0,
        }
    }

    /// The next segment with room, or None when every chain is full.
    #[inline]
    fn current(&mut self) -> Option<Seg> {
        loop {
            let chain = self.chains.get(self.chain)?;
            match chain.segs().get(self.seg) {
                Some(s) if self.off < s.len => return Some(*s),
                Some(_) => {
                    self.seg += 1;
                    self.off = 0;
                }
                None => {
                    self.chain += 1;
                    self.seg = 0;
                    self.off = 0;
                }
            }
        }
    }

    /// Write `len` bytes from `src`. Returns the bytes written (short only when out of room).
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes (host memory or checked guest memory).
    #[inline]
    pub unsafe fn write_raw(&mut self, mut src: *const u8, len: u32) -> u32 {
        let mut left = len;
        while left > 0 {
            let Some(seg) = self.current() else { break };
            let n = (seg.len - self.off).min(left);
            // SAFETY: seg lies in checked guest memory and off + n <= seg.len; the caller
            // guarantees src has `left >= n` readable bytes.
            unsafe {
                std::ptr::copy(src, seg.ptr.add(self.off as usize), n as usize);
                src = src.add(n as usize);
            }
            self.off += n;
            left -= n;
        }
        len - left
    }

    pub fn write(&mut self, bytes: &[u8]) -> u32 {
        // SAFETY: a slice is valid for reads of its length.
        unsafe { self.write_raw(bytes.as_ptr(), bytes.len() as u32) }
    }

    /// Copy the source chain from byte `skip` to its end. Returns the bytes written.
    pub fn copy_chain(&mut self, src: &SegList, mut skip: u32) -> u32 {
        let mut done = 0;
        for seg in src.segs() {
            if skip >= seg.len {
                skip -= seg.len;
                continue;
            }
            let want = seg.len - skip;
            // SAFETY: the source segment was checked when its chain was walked; skip < seg.len.
            let n = unsafe { self.write_raw(seg.ptr.add(skip as usize), want) };
            done += n;
            if n < want {
                break;
            }
            skip = 0;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(bufs: &mut [Vec<u8>]) -> SegList {
        let mut l = SegList::default();
        for (i, b) in bufs.iter_mut().enumerate() {
            l.segs[i] = Seg {
                ptr: b.as_mut_ptr(),
                len: b.len() as u32,
            };
        }
        l.n = bufs.len();
        l.total = bufs.iter().map(|b| b.len() as u32).sum();
        l
    }

    #[test]
    fn gather_across_segments() {
        let mut bufs = vec![vec![1u8, 2, 3], vec![], vec![4, 5, 6, 7]];
        let l = list(&mut bufs);
        let mut out = [0u8; 4];
        assert_eq!(gather(&l, 2, &mut out), 4);
        assert_eq!(out, [3, 4, 5, 6]);
        let mut big = [0u8; 16];
        assert_eq!(gather(&l, 5, &mut big), 2);
    }

    #[test]
    fn writer_spans_chains_and_stops_when_full() {
        let mut src_bufs = vec![(0u8..10).collect::<Vec<_>>(), (10u8..25).collect()];
        let src = list(&mut src_bufs);
        let mut d1 = vec![vec![0u8; 4], vec![0u8; 3]];
        let mut d2 = vec![vec![0u8; 100]];
        let chains = [list(&mut d1), list(&mut d2)];
        let mut w = Writer::new(&chains);
        assert_eq!(w.write(&[0xaa, 0xbb]), 2);
        assert_eq!(w.copy_chain(&src, 3), 22);
        assert_eq!(d1[0], [0xaa, 0xbb, 3, 4]);
        assert_eq!(d1[1], [5, 6, 7]);
        assert_eq!(&d2[0][..17], &(8u8..25).collect::<Vec<_>>()[..]);

        let mut small = vec![vec![0u8; 5]];
        let chains = [list(&mut small)];
        let mut w = Writer::new(&chains);
        assert_eq!(w.copy_chain(&src, 0), 5);
        assert_eq!(w.write(&[1]), 0);
    }
}
