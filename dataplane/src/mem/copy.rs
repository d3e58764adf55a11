//! Scatter-gather copies between translated guest buffers: the one copy of the guest → guest
//! path. Runs on a PMD. Sources and destinations may overlap (one frontend may own both ports and
//! point them at the same memory), so copies are memmove, never copy_nonoverlapping.

use super::seg::{Seg, SegList};
use crate::cpu::prefetch_lines;

/// memmove, with sizes up to 64 bytes done inline (headers, 64-byte frames): a call into libc's
/// memmove per header and per small frame cost more than the copy. Every load comes before any
/// store, so overlapping buffers are copied correctly.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `n` bytes.
#[inline(always)]
pub unsafe fn copy_bytes(src: *const u8, dst: *mut u8, n: usize) {
    use std::ptr::{read_unaligned as rd, write_unaligned as wr};
    // SAFETY: in every arm, every access lies within [0, n) of src or dst, which the caller
    // guarantees are valid.
    unsafe {
        match n {
            0 => {}
            1..=7 => {
                let mut t = [0u8; 8];
                std::ptr::copy_nonoverlapping(src, t.as_mut_ptr(), n);
                std::ptr::copy_nonoverlapping(t.as_ptr(), dst, n);
            }
            8..=16 => {
                let (a, b) = (rd(src as *const u64), rd(src.add(n - 8) as *const u64));
                wr(dst as *mut u64, a);
                wr(dst.add(n - 8) as *mut u64, b);
            }
            17..=32 => {
                let (a, b) = (rd(src as *const u128), rd(src.add(n - 16) as *const u128));
                wr(dst as *mut u128, a);
                wr(dst.add(n - 16) as *mut u128, b);
            }
            33..=64 => {
                let a = rd(src as *const u128);
                let b = rd(src.add(16) as *const u128);
                let c = rd(src.add(n - 32) as *const u128);
                let d = rd(src.add(n - 16) as *const u128);
                wr(dst as *mut u128, a);
                wr(dst.add(16) as *mut u128, b);
                wr(dst.add(n - 32) as *mut u128, c);
                wr(dst.add(n - 16) as *mut u128, d);
            }
            _ => std::ptr::copy(src, dst, n),
        }
    }
}

/// Copy up to `out.len()` bytes of the chain, starting `skip` bytes in, into `out`.
/// Returns how many bytes were copied (less than `out.len()` only if the chain is shorter).
#[inline]
pub fn gather(src: &SegList, mut skip: u32, out: &mut [u8]) -> usize {
    let mut done = 0usize;
    for seg in src.segs() {
        if done == out.len() {
            break;
        }
        if skip >= seg.len() {
            skip -= seg.len();
            continue;
        }
        let n = ((seg.len() - skip) as usize).min(out.len() - done);
        // SAFETY: seg was bounds-checked against mapped guest memory when the chain was walked,
        // skip + n <= seg.len, and out has n bytes left at `done`.
        unsafe { copy_bytes(seg.ptr().add(skip as usize), out.as_mut_ptr().add(done), n) };
        done += n;
        skip = 0;
    }
    done
}

/// The chain's bytes `skip..skip + 8` and `skip + 4..skip + 12` as little-endian words (bytes
/// past its end read as 0): an Ethernet header's two addresses. Loaded in place when one piece
/// holds all twelve, as in nearly every frame; a copy through the stack would stall each load
/// on the stores that made it.
#[inline(always)]
pub fn head_words(src: &SegList, skip: u32) -> (u64, u64) {
    use std::ptr::read_unaligned as rd;
    let Some(p) = src.contiguous(skip, 12) else {
        return head_words_gathered(src, skip);
    };
    // SAFETY: the 12 bytes at p lie in one of the chain's buffers, which were bounds-checked
    // against mapped guest memory when the chain was walked.
    unsafe { (rd(p as *const u64), rd(p.add(4) as *const u64)) }
}

#[cold]
fn head_words_gathered(src: &SegList, skip: u32) -> (u64, u64) {
    let mut b = [0u8; 16];
    gather(src, skip, &mut b[..12]);
    let w = u128::from_le_bytes(b);
    (w as u64, (w >> 32) as u64)
}

/// The ones'-complement sum (RFC 1071) of the chain's bytes `from..from + len`, folded to 16 bits
/// (not inverted): what Internet checksums are made of. Bytes past the chain's end count as absent.
pub fn csum(src: &SegList, from: u32, len: u32) -> u16 {
    let mut sum = 0u64;
    // Whether the bytes summed so far are odd in number: the next piece's words are then
    // shifted by one byte, which swaps the bytes of its sum.
    let mut odd = false;
    for piece in src.pieces(from, len) {
        // SAFETY: a piece lies inside a segment, bounds-checked when it was made.
        let s = fold(unsafe { sum_be32(piece.ptr(), piece.len() as usize) });
        sum += if odd { s.swap_bytes() } else { s } as u64;
        odd ^= piece.len() % 2 == 1;
    }
    fold(sum)
}

/// Fold a sum of 16- or 32-bit big-endian words into 16 bits, end-around carry included
/// (2^16 = 1 in ones'-complement arithmetic).
pub fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Sum of `n` bytes as big-endian 32-bit words, the last partial word padded with zeros.
///
/// # Safety
/// `p` must be valid for reads of `n` bytes.
unsafe fn sum_be32(p: *const u8, n: usize) -> u64 {
    use std::ptr::read_unaligned as rd;
    let mut s = 0u64;
    let mut i = 0;
    // SAFETY: every read lies within [0, n) of p, which the caller guarantees is readable.
    unsafe {
        while i + 8 <= n {
            let v = u64::from_be(rd(p.add(i) as *const u64));
            s += (v >> 32) + (v & 0xffff_ffff);
            i += 8;
        }
        let mut tail = [0u8; 8];
        std::ptr::copy_nonoverlapping(p.add(i), tail.as_mut_ptr(), n - i);
        let v = u64::from_be_bytes(tail);
        s + (v >> 32) + (v & 0xffff_ffff)
    }
}

/// Small frame copies put off to the end of a burst, as DPDK's vhost batches its copies of
/// small frames: with each frame copied as it was delivered, its stores (into lines the
/// guest's core had) filled the store buffer and held up the next frame's descriptor loads.
/// Done in one go, the burst's descriptor misses overlap, and so do its stores.
pub struct PendingCopies {
    list: Vec<(*const u8, *mut u8, u32)>,
}

impl PendingCopies {
    /// Frames up to this size are put off (DPDK's MAX_BATCH_LEN).
    pub const MAX_LEN: u32 = 256;
    const CAPACITY: usize = 256;

    pub fn new() -> Self {
        PendingCopies {
            list: Vec::with_capacity(Self::CAPACITY),
        }
    }

    /// Put off copying `len` bytes from `src` to `dst`; false if the list is full.
    ///
    /// # Safety
    /// `src` must stay valid for reads and `dst` for writes of `len` bytes until `run`, which
    /// must come before either is handed back (to its guest, or to the mbuf pool).
    #[inline]
    pub unsafe fn push(&mut self, src: *const u8, dst: *mut u8, len: u32) -> bool {
        if self.list.len() == Self::CAPACITY {
            return false;
        }
        self.list.push((src, dst, len));
        true
    }

    /// Do every copy put off.
    #[inline]
    pub fn run(&mut self) {
        for &(src, dst, len) in &self.list {
            // SAFETY: `push`'s caller keeps both valid until now.
            unsafe { copy_bytes(src, dst, len as usize) };
        }
        self.list.clear();
    }
}

impl Default for PendingCopies {
    fn default() -> Self {
        Self::new()
    }
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
                Some(s) if self.off < s.len() => return Some(*s),
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
            let n = (seg.len() - self.off).min(left);
            // SAFETY: seg lies in checked guest memory and off + n <= seg.len; the caller
            // guarantees src has `left >= n` readable bytes.
            unsafe {
                copy_bytes(src, seg.ptr().add(self.off as usize), n as usize);
                src = src.add(n as usize);
            }
            self.off += n;
            left -= n;
        }
        len - left
    }

    /// Write a virtio-net header of `len` (10 or 12) bytes given as two little-endian words,
    /// bytes 0..8 in `lo` and 8..12 in `hi`; when the destination already holds it, nothing
    /// is stored. For recycled RX buffers: they usually hold what we wrote last time (the
    /// guest's TX path leaves it so), and not storing keeps that line shared with the guest's
    /// core instead of taking it over and having the guest fetch it back (DPDK's vhost does
    /// the same: ASSIGN_UNLESS_EQUAL).
    ///
    /// Words, not bytes in memory: a header assembled in a stack buffer and loaded back wider
    /// than it was stored cannot be forwarded from the store buffer, so the load waited for
    /// every older store to reach the cache, the last frame's copy into guest memory with its
    /// cache misses included. That wait was a quarter of the v2v loop's time.
    #[inline]
    pub fn write_header(&mut self, lo: u64, hi: u32, len: u32) -> u32 {
        use std::ptr::{read_unaligned as rd, write_unaligned as wr};
        if len == 10 || len == 12 {
            if let Some(seg) = self.current().filter(|s| s.len() - self.off >= len) {
                // SAFETY: seg lies in checked guest memory and off + len <= seg.len, so the
                // 8-byte word at off and the 2 or 4 bytes after it are inside it.
                unsafe {
                    let p = seg.ptr().add(self.off as usize);
                    let (held_lo, held_hi) = match len {
                        12 => (rd(p as *const u64), rd(p.add(8) as *const u32)),
                        _ => (rd(p as *const u64), rd(p.add(8) as *const u16) as u32),
                    };
                    let hi = if len == 12 { hi } else { hi & 0xffff };
                    if held_lo != lo || held_hi != hi {
                        wr(p as *mut u64, lo);
                        match len {
                            12 => wr(p.add(8) as *mut u32, hi),
                            _ => wr(p.add(8) as *mut u16, hi as u16),
                        }
                    }
                }
                self.off += len;
                return len;
            }
        }
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&lo.to_le_bytes());
        b[8..].copy_from_slice(&hi.to_le_bytes());
        self.write(&b[..(len as usize).min(12)])
    }

    /// Start taking for writing every cache line of the next `len` bytes.
    #[inline]
    pub fn prefetch_w(&self, len: u32) {
        self.lines_ahead(len, crate::cpu::prefetch_w)
    }

    /// `hint` every cache line of the next `len` bytes (as far as the chains go).
    #[inline]
    fn lines_ahead(&self, len: u32, mut hint: impl FnMut(*const u8)) {
        let (mut left, mut off, mut seg) = (len, self.off, self.seg);
        for chain in self.chains.iter().skip(self.chain) {
            for s in chain.segs().iter().skip(seg) {
                if left == 0 {
                    return;
                }
                let n = s.len().saturating_sub(off).min(left);
                prefetch_lines(s.ptr().wrapping_add(off as usize), n, &mut hint);
                left -= n;
                off = 0;
            }
            seg = 0;
        }
    }

    /// The next `len` bytes, if the current segment has them all: taken, to be written by the
    /// caller.
    #[inline]
    pub fn reserve(&mut self, len: u32) -> Option<*mut u8> {
        let seg = self.current().filter(|s| s.len() - self.off >= len)?;
        let p = seg.ptr().wrapping_add(self.off as usize);
        self.off += len;
        Some(p)
    }

    pub fn write(&mut self, bytes: &[u8]) -> u32 {
        // SAFETY: a slice is valid for reads of its length.
        unsafe { self.write_raw(bytes.as_ptr(), bytes.len() as u32) }
    }

    /// Copy the source chain from byte `skip` to its end. Returns the bytes written.
    pub fn copy_chain(&mut self, src: &SegList, mut skip: u32) -> u32 {
        let mut done = 0;
        for seg in src.segs() {
            if skip >= seg.len() {
                skip -= seg.len();
                continue;
            }
            let want = seg.len() - skip;
            // SAFETY: the source segment was checked when its chain was walked; skip < seg.len.
            let n = unsafe { self.write_raw(seg.ptr().add(skip as usize), want) };
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

    #[test]
    fn copy_bytes_matches_memmove_for_every_small_size_and_overlap() {
        for n in 0..=80usize {
            for shift in [0isize, -5, 3, 17] {
                let mut buf: Vec<u8> = (0..200u8).collect();
                let mut want = buf.clone();
                let (s, d) = (60usize, (60 + shift) as usize);
                want.copy_within(s..s + n, d);
                // SAFETY: both ranges lie inside buf.
                unsafe { copy_bytes(buf.as_ptr().add(s), buf.as_mut_ptr().add(d), n) };
                assert_eq!(buf, want, "n={n} shift={shift}");
            }
        }
    }

    fn list(bufs: &mut [Vec<u8>]) -> SegList {
        SegList::over(bufs)
    }

    /// RFC 1071's reference: big-endian 16-bit words, an odd last byte padded on the right.
    fn csum_ref(b: &[u8]) -> u16 {
        let mut s: u64 = b
            .chunks(2)
            .map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u64)
            .sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn csum_matches_the_reference_over_any_split_and_offset() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 151 + 7) as u8 | 0x80).collect();
        for cut in [0usize, 1, 2, 3, 7, 8, 13, 150, 299] {
            for gap in [0usize, 1, 5] {
                let mut bufs = vec![
                    data[..cut].to_vec(),
                    data[cut..cut + gap.min(300 - cut)].to_vec(),
                    data[cut + gap.min(300 - cut)..].to_vec(),
                ];
                let l = list(&mut bufs);
                for (from, len) in [(0u32, 300u32), (1, 299), (3, 200), (14, 1), (0, 0)] {
                    let want = csum_ref(&data[from as usize..(from + len) as usize]);
                    assert_eq!(
                        csum(&l, from, len),
                        want,
                        "cut={cut} gap={gap} {from}+{len}"
                    );
                }
            }
        }
        assert_eq!(fold(0x1_fffe), 0xffff);
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
    fn head_words_in_place_and_across_pieces() {
        let bytes: Vec<u8> = (1..=20).collect();
        let words = |at: usize| {
            let w = |i: usize| u64::from_le_bytes(bytes[at + i..at + i + 8].try_into().unwrap());
            (w(0), w(4))
        };
        let mut whole = vec![bytes.clone()];
        assert_eq!(head_words(&list(&mut whole), 3), words(3), "one piece");
        let mut split = vec![
            bytes[..2].to_vec(),
            bytes[2..9].to_vec(),
            bytes[9..].to_vec(),
        ];
        assert_eq!(head_words(&list(&mut split), 1), words(1), "across pieces");
        let mut after = vec![bytes[..4].to_vec(), bytes[4..].to_vec()];
        assert_eq!(
            head_words(&list(&mut after), 4),
            words(4),
            "in the second piece"
        );
        let mut short = vec![vec![1u8, 2, 3]];
        assert_eq!(
            head_words(&list(&mut short), 0),
            (0x03_02_01, 0),
            "past the end reads 0"
        );
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

    #[test]
    fn contiguous_only_within_one_buffer() {
        let mut b = vec![vec![0u8; 10], vec![0u8; 20]];
        let l = list(&mut b);
        assert_eq!(
            l.contiguous(2, 8),
            Some(l.segs()[0].ptr().wrapping_add(2) as *const u8)
        );
        assert_eq!(l.contiguous(2, 9), None, "crosses into the second buffer");
        assert_eq!(
            l.contiguous(12, 18),
            Some(l.segs()[1].ptr().wrapping_add(2) as *const u8)
        );
        assert_eq!(l.contiguous(12, 19), None, "past the end");
        assert_eq!(l.contiguous(30, 1), None);
    }

    #[test]
    fn lines_ahead_are_every_line_of_the_next_bytes() {
        // 64-aligned buffers, so the lines are known: 100 bytes, then 200.
        let mut mem = vec![0u8; 512];
        let base = mem.as_mut_ptr().wrapping_add(mem.as_ptr().align_offset(64));
        let chains = [
            SegList::over_raw(&[(base, 100)]),
            SegList::over_raw(&[(base.wrapping_add(192), 200)]),
        ];
        let lines = |w: &Writer, len| {
            let mut got = Vec::new();
            w.lines_ahead(len, |p| got.push((p as usize - base as usize) / 64));
            got
        };
        let mut w = Writer::new(&chains);
        assert_eq!(w.write(&[0; 60]), 60);
        // Bytes 60..100 (lines 0 and 1), then 192..252 of the next chain (lines 3).
        assert_eq!(lines(&w, 100), [0, 1, 3]);
        assert_eq!(lines(&w, 4), [0]);
        assert_eq!(lines(&w, 1000), [0, 1, 3, 4, 5, 6]);
        assert_eq!(w.write(&[0; 40]), 40);
        assert_eq!(lines(&w, 1), [3], "the first chain is full");
    }

    #[test]
    fn reserve_takes_room_in_one_segment_only() {
        let mut d = vec![vec![0u8; 10], vec![0u8; 20]];
        let chains = [list(&mut d)];
        let mut w = Writer::new(&chains);
        assert_eq!(w.write(&[1, 2, 3, 4]), 4);
        assert!(w.reserve(7).is_none(), "6 bytes left in the first segment");
        let p = w.reserve(6).unwrap();
        assert_eq!(p, chains[0].segs()[0].ptr().wrapping_add(4));
        assert_eq!(w.reserve(20), Some(chains[0].segs()[1].ptr()));
        assert!(w.reserve(1).is_none());
    }

    #[test]
    fn pending_copies_run_in_order_and_refuse_when_full() {
        let src: Vec<u8> = (0..=255).collect();
        let mut dst = vec![0u8; 4 * PendingCopies::CAPACITY];
        let mut c = PendingCopies::new();
        for i in 0..PendingCopies::CAPACITY {
            // SAFETY: both ranges lie in the vectors, which outlive `run`.
            let ok = unsafe { c.push(src.as_ptr().add(i % 200), dst.as_mut_ptr().add(4 * i), 4) };
            assert!(ok);
        }
        // SAFETY: as above.
        assert!(!unsafe { c.push(src.as_ptr(), dst.as_mut_ptr(), 4) });
        assert_eq!(dst[4..8], [0; 4], "nothing copied before run");
        c.run();
        assert_eq!(dst[4..8], src[1..5]);
        assert_eq!(dst[4 * 255..4 * 256], src[55..59]);
    }

    #[test]
    fn write_header_leaves_the_same_bytes_and_writes_others() {
        let hdr = [3u8, 4, 0, 0, 0, 0, 0, 0, 5, 6, 1, 0];
        let lo = u64::from_le_bytes(hdr[..8].try_into().unwrap());
        let hi = u32::from_le_bytes(hdr[8..].try_into().unwrap());
        // Different bytes, equal bytes, and a header split over two segments, for both header
        // lengths: each ends up holding the header, followed by the frame.
        for len in [12usize, 10] {
            for (first, second, holds_it) in [(16, 16, false), (16, 16, true), (5, 30, false)] {
                let mut d = vec![vec![0xeeu8; first], vec![0xeeu8; second]];
                if holds_it {
                    d[0][..len].copy_from_slice(&hdr[..len]);
                }
                let chains = [list(&mut d)];
                let mut w = Writer::new(&chains);
                assert_eq!(w.write_header(lo, hi, len as u32), len as u32);
                assert_eq!(w.write(&[7, 8]), 2);
                let all: Vec<u8> = d.concat();
                assert_eq!(&all[..len], &hdr[..len]);
                assert_eq!(&all[len..len + 2], &[7, 8]);
            }
        }
        let mut d = vec![vec![0xeeu8; 12]];
        d[0][3] = 9;
        let chains = [list(&mut d)];
        Writer::new(&chains).write_header(lo, hi, 12);
        assert_eq!(d[0], hdr);
    }
}
