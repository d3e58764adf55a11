//! The split-ring fast path: one virtqueue over cached host pointers into guest memory. Control
//! builds a `SplitRing` (validating every ring address once) and hands it to a PMD, which alone
//! touches it until it hands it back. Guest-written fields are read with volatile/atomic loads:
//! the guest may change them at any time, so every value is validated after it is read.

use std::fs::File;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use super::*;
use crate::cpu::prefetch;
use crate::mem::table::{DirtyLog, MemTable};
use crate::stats::QueueStats;

/// Used entries collected before they are written into the guest's ring (a burst's worth).
const SHADOW_USED: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadSize(u32),
    #[error("{what} ring at {addr:#x} (+{len:#x}) is not inside guest memory")]
    NotMapped {
        what: &'static str,
        addr: u64,
        len: u64,
    },
    #[error("{what} ring at {addr:#x} is misaligned")]
    Misaligned { what: &'static str, addr: u64 },
}

/// Where the frontend put the three parts of a ring, in its own virtual addresses.
#[derive(Debug, Clone, Copy, Default)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One split virtqueue, owned by exactly one thread at a time.
pub struct SplitRing {
    mem: Arc<MemTable>,
    desc: *const Desc,
    /// avail: flags, idx, ring[size], used_event.
    avail: *const u16,
    /// used: flags (u16), idx (u16), ring[size] of (id u32, len u32), avail_event (u16).
    used: *mut u8,
    size: u16,
    mask: u16,
    pub last_avail_idx: u16,
    /// `avail.idx` as last loaded and validated (never more than `size` ahead of last_avail_idx).
    avail_shadow: u16,
    /// `avail_at_least` reloaded `avail.idx` since the last flush.
    avail_reloaded: bool,
    /// Next used index to fill; published to the guest in `flush`.
    used_idx: u16,
    /// Used entries (id, len) not yet written into the guest's ring: the last `shadow_n`
    /// before `used_idx`.
    shadow_used: [(u32, u32); SHADOW_USED],
    shadow_n: usize,
    published_used: u16,
    /// `signalled_used` of the EVENT_IDX algorithm: the used index at the last notify check.
    signalled_used: u16,
    event_idx: bool,
    /// `last_avail_idx` when `avail_event` was last written (as that minus one).
    avail_event_at: u16,
    /// The queue was found corrupt (avail index jump); it is skipped until the device is reset.
    pub broken: bool,
    call: Option<CallFd>,
    pub stats: Arc<QueueStats>,
    /// Set while the frontend migrates the guest: every guest page written is logged.
    log: Option<RingLog>,
}

/// Dirty logging of one ring: the log, and the used ring's guest-physical address.
struct RingLog {
    log: Arc<DirtyLog>,
    used_gpa: Option<u64>,
}

// SAFETY: the raw pointers point into `mem`, which the ring keeps alive; the ring is moved between
// threads (control builds it, a PMD uses it, control takes it back) but only one thread uses it
// at a time, which `&mut self` on every accessor enforces.
unsafe impl Send for SplitRing {}

impl SplitRing {
    /// Validate and translate the ring addresses. Runs on control, never on a PMD.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: Arc<MemTable>,
        size: u32,
        addrs: RingAddrs,
        last_avail_idx: u16,
        event_idx: bool,
        call: Option<File>,
        stats: Arc<QueueStats>,
    ) -> Result<SplitRing, RingError> {
        if size == 0 || size > MAX_QUEUE_SIZE as u32 || !size.is_power_of_two() {
            return Err(RingError::BadSize(size));
        }
        let n = size as u64;
        let map = |what: &'static str, addr: u64, len: u64, align: u64| {
            let p = mem
                .uva_to_host(addr, len)
                .ok_or(RingError::NotMapped { what, addr, len })?;
            if !(p as usize as u64).is_multiple_of(align) {
                return Err(RingError::Misaligned { what, addr });
            }
            Ok(p)
        };
        let desc = map("descriptor", addrs.desc, 16 * n, 16)? as *const Desc;
        let avail = map("available", addrs.avail, 6 + 2 * n, 2)? as *const u16;
        let used = map("used", addrs.used, 6 + 8 * n, 4)?;
        let mut ring = SplitRing {
            mem,
            desc,
            avail,
            used,
            size: size as u16,
            mask: (size - 1) as u16,
            last_avail_idx,
            avail_shadow: last_avail_idx,
            avail_reloaded: false,
            used_idx: last_avail_idx,
            shadow_used: [(0, 0); SHADOW_USED],
            shadow_n: 0,
            published_used: last_avail_idx,
            signalled_used: last_avail_idx,
            event_idx,
            avail_event_at: last_avail_idx,
            broken: false,
            call: call.map(CallFd::new),
            stats,
            log: None,
        };
        // A new ring is a reset one. The PMD that flagged the old one has handed it back, so
        // control is the single writer here.
        ring.stats.ring_broken.store(0, Ordering::Relaxed);
        // Busy-polled: ask the guest not to kick us (flags without EVENT_IDX, avail_event with).
        ring.used_flags()
            .store(VRING_USED_F_NO_NOTIFY, Ordering::Relaxed);
        ring.set_avail_event();
        Ok(ring)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Ask the guest to kick us (`on`: the PMD is about to sleep) or not to (polling again).
    /// Returns whether chains are already waiting, which a kick asked for now would miss.
    pub fn set_kicks(&mut self, on: bool) -> bool {
        if on {
            self.used_flags().store(0, Ordering::Relaxed);
            if self.event_idx {
                // Kick when the guest publishes the entry at last_avail_idx.
                self.write_avail_event(self.last_avail_idx);
            }
        } else {
            self.used_flags()
                .store(VRING_USED_F_NO_NOTIFY, Ordering::Relaxed);
            self.set_avail_event();
        }
        self.log_used();
        // Our flags before the guest's index: as for used.idx in `flush`.
        fence(Ordering::SeqCst);
        self.avail_idx().load(Ordering::Acquire) != self.last_avail_idx
    }

    /// Log every page the ring writes from now on (runs on control, before the PMD has it).
    /// `used_gpa` is where the frontend says the used ring is (`log_guest_addr`); without it,
    /// the ring's own translation tells.
    pub fn with_log(mut self, log: Arc<DirtyLog>, used_gpa: Option<u64>) -> SplitRing {
        let used_gpa = used_gpa.or_else(|| self.mem.host_to_gpa(self.used));
        self.log = Some(RingLog { log, used_gpa });
        self.log_used();
        self
    }

    /// Log the used ring (entries, index and avail_event): written on every flush.
    fn log_used(&self) {
        if let Some(RingLog {
            log,
            used_gpa: Some(gpa),
        }) = &self.log
        {
            log.mark(*gpa, 6 + 8 * self.size as u64);
        }
    }

    fn avail_idx(&self) -> &AtomicU16 {
        // SAFETY: `avail` was checked in `new` to span 6 + 2*size bytes of mapped guest memory,
        // 2-aligned; `mem` keeps it mapped. Atomic access because the guest writes it concurrently.
        unsafe { AtomicU16::from_ptr(self.avail.add(1) as *mut u16) }
    }

    fn used_flags(&self) -> &AtomicU16 {
        // SAFETY: `used` spans 6 + 8*size mapped bytes, 4-aligned (checked in `new`).
        unsafe { AtomicU16::from_ptr(self.used as *mut u16) }
    }

    fn used_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: as for `used_flags`; idx is the second u16.
        unsafe { AtomicU16::from_ptr((self.used as *mut u16).add(1)) }
    }

    #[inline]
    fn read_avail_u16(&self, slot: usize) -> u16 {
        // SAFETY: callers pass slot <= size + 1 (flags, idx, ring[size], used_event all lie within
        // the 6 + 2*size checked bytes: slot 2 + size is used_event).
        unsafe { std::ptr::read_volatile(self.avail.add(slot)) }
    }

    fn write_avail_event(&self, v: u16) {
        // SAFETY: avail_event is the u16 at 4 + 8*size, the last two of the checked bytes.
        unsafe {
            std::ptr::write_volatile(self.used.add(4 + 8 * self.size as usize) as *mut u16, v)
        }
    }

    fn set_avail_event(&mut self) {
        if self.event_idx {
            // last_avail_idx - 1 is behind anything the guest will publish, so it never kicks.
            self.write_avail_event(self.last_avail_idx.wrapping_sub(1));
            self.avail_event_at = self.last_avail_idx;
        }
    }

    /// Keep the guest from ever kicking while we poll, rewriting `avail_event` only when it
    /// is about to fall too far behind. The guest reads it after every publish, and each
    /// rewrite costs it that line: a transfer per flush for nothing. It kicks when its index
    /// passes `avail_event` modulo 2^16; it is never more than `size` ahead of
    /// `last_avail_idx`, so a value up to 2^15 - size behind that is as good as the newest.
    #[inline]
    fn refresh_avail_event(&mut self) {
        if self.event_idx
            && self.last_avail_idx.wrapping_sub(self.avail_event_at) > 0x8000 - self.size
        {
            self.set_avail_event();
        }
    }

    #[cold]
    fn mark_broken(&mut self) {
        self.broken = true;
        self.stats.ring_broken.store(1, Ordering::Relaxed);
    }

    /// Get the writable chain `head` ready for a frame after a `hdr_len`-byte header: the guest
    /// last touched it on its own core. A hint, as `prefetch_data`.
    #[inline]
    pub fn prefetch_rx_buffer(&self, head: u16, hdr_len: u32) {
        if let Some((p, len)) = self.buffer_at(head, 0) {
            prefetch_rx(p, len, hdr_len);
        }
    }

    /// Host address of byte `offset` of chain `head` (looking at its first two descriptors
    /// only) and how many bytes from there (at most 128) are mapped and in that descriptor;
    /// None for indirect chains or bad entries.
    #[inline]
    fn buffer_at(&self, head: u16, offset: u32) -> Option<(*mut u8, u32)> {
        if head >= self.size {
            return None;
        }
        let mut d = self.read_desc(self.desc, head);
        let mut offset = offset;
        if offset >= d.len && d.flags & VIRTQ_DESC_F_NEXT != 0 && d.next < self.size {
            offset -= d.len;
            d = self.read_desc(self.desc, d.next);
        }
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return None;
        }
        prefetch_span(&self.mem, d.addr, d.len, offset)
    }

    #[inline]
    fn read_desc(&self, table: *const Desc, i: u16) -> Desc {
        count_desc_read();
        // SAFETY: callers check i < the table's entry count, and the table was bounds-checked
        // (the ring's own in `new`, an indirect one in `walk_chain`). Volatile: guest-owned.
        unsafe { std::ptr::read_volatile(table.add(i as usize)) }
    }

    #[inline]
    fn write_shadow(&mut self) {
        let first = self.used_idx.wrapping_sub(self.shadow_n as u16);
        for (i, &(id, len)) in self.shadow_used[..self.shadow_n].iter().enumerate() {
            let slot = (first.wrapping_add(i as u16) & self.mask) as usize;
            // SAFETY: slot < size, and used.ring[slot] lies at 4 + 8*slot within the checked
            // 6 + 8*size bytes; 4-aligned. Plain volatile stores: ordered by the release in
            // `flush`.
            unsafe {
                let elem = self.used.add(4 + 8 * slot) as *mut u32;
                std::ptr::write_volatile(elem, id);
                std::ptr::write_volatile(elem.add(1), len);
            }
        }
        self.shadow_n = 0;
    }

    #[inline]
    fn notify(&mut self) {
        notify(&self.call, &self.stats);
    }

    /// Used index not yet published (for tests and for handing the ring back).
    pub fn used_idx(&self) -> u16 {
        self.used_idx
    }

    pub fn mem(&self) -> &Arc<MemTable> {
        &self.mem
    }
}

impl VirtQueue for SplitRing {
    const COUNTS_ALL_PENDING: bool = true;

    /// How many chains the guest has made available beyond `last_avail_idx`. One acquire load,
    /// paired with the guest's release (wmb) before it publishes `avail.idx`: ring entries and
    /// descriptors read after this see what the guest wrote before the index.
    #[inline]
    fn avail_pending(&mut self) -> u16 {
        if self.broken {
            return 0;
        }
        let idx = self.avail_idx().load(Ordering::Acquire);
        let pending = idx.wrapping_sub(self.last_avail_idx);
        if pending > self.size {
            self.mark_broken();
            return 0;
        }
        self.avail_shadow = idx;
        pending
    }

    /// Like `avail_pending`, but reuses the last loaded index while it still covers `want`
    /// chains, and loads it at most once between flushes: the RX side asks per frame, and a
    /// guest that is slow to refill would otherwise cost a miss on its cache line per frame
    /// (as DPDK's vhost, a burst sees the buffers there were when it started, plus one reload).
    #[inline]
    fn avail_at_least(&mut self, want: u16) -> u16 {
        let cached = self.avail_shadow.wrapping_sub(self.last_avail_idx);
        if cached >= want || self.avail_reloaded {
            return cached;
        }
        self.avail_reloaded = true;
        self.avail_pending()
    }

    /// The head index of the `i`-th pending chain (i < avail_pending()).
    #[inline]
    fn head_at(&self, i: u16) -> u16 {
        let slot = self.last_avail_idx.wrapping_add(i) & self.mask;
        self.read_avail_u16(2 + slot as usize)
    }

    /// Start loading the descriptor `head` into cache. The guest wrote it on another core, so
    /// the first read misses; issuing these for a whole burst up front overlaps the misses.
    #[inline]
    fn prefetch_desc(&self, head: u16) {
        if head < self.size {
            prefetch(self.desc.wrapping_add(head as usize) as *const u8);
        }
    }

    /// RX look-ahead, called once per frame: start loading the descriptor of the chain `ahead`
    /// places on, and the buffer of the one `ahead / 2` on (whose descriptor an earlier call
    /// started loading). Frames are written into guest buffers the guest last touched on its own
    /// core; without this every frame waits for a descriptor miss and then a store miss.
    #[inline]
    fn prefetch_ahead(&self, ahead: u16, hdr_len: u32) {
        let cached = self.avail_shadow.wrapping_sub(self.last_avail_idx);
        if ahead < cached {
            self.prefetch_desc(self.head_at(ahead));
        }
        if ahead / 2 < cached {
            self.prefetch_rx_buffer(self.head_at(ahead / 2), hdr_len);
        }
    }

    /// Start loading the buffer byte at `offset` into the chain `head` (only its first two
    /// descriptors are looked at; indirect chains are skipped). A hint: nothing is validated
    /// beyond what makes the address mapped, and nothing is consumed.
    #[inline]
    fn prefetch_data(&self, head: u16, offset: u32) {
        if let Some((p, _)) = self.buffer_at(head, offset) {
            prefetch(p);
        }
    }

    /// Gather the chain starting at `head` into `out`, checking every address against guest
    /// memory, the direction of every buffer, and bounding the walk (loops, indirect abuse).
    fn walk_chain(&self, head: u16, writable: bool, out: &mut SegList) -> Result<(), ChainError> {
        out.head = head;
        out.n = 0;
        out.total = 0;
        if head >= self.size {
            return Err(ChainError::BadIndex);
        }
        let mut table = self.desc;
        let mut entries = self.size;
        let mut d = self.read_desc(table, head);
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if d.flags & VIRTQ_DESC_F_NEXT != 0 || !d.len.is_multiple_of(16) || d.len == 0 {
                return Err(ChainError::BadIndirect);
            }
            let count = d.len / 16;
            if count > self.size as u32 {
                return Err(ChainError::BadIndirect);
            }
            table = self
                .mem
                .gpa_to_host(d.addr, d.len as u64)
                .ok_or(ChainError::BadAddress)? as *const Desc;
            if !(table as usize).is_multiple_of(std::mem::align_of::<Desc>()) {
                return Err(ChainError::BadIndirect);
            }
            entries = count as u16;
            d = self.read_desc(table, 0);
        }
        // A chain visits each descriptor at most once (more visits than entries means a loop)
        // and has at most MAX_CHAIN_DESCS of them, empty ones included.
        let mut ttl = entries.min(MAX_CHAIN_DESCS);
        loop {
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(ChainError::BadIndirect);
            }
            if (d.flags & VIRTQ_DESC_F_WRITE != 0) != writable {
                return Err(ChainError::WrongDirection);
            }
            push_segs(&self.mem, d.addr, d.len, out)?;
            if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(());
            }
            ttl -= 1;
            if ttl == 0 {
                return Err(ChainError::TooLong);
            }
            if d.next >= entries {
                return Err(ChainError::BadIndex);
            }
            d = self.read_desc(table, d.next);
        }
    }

    /// Record a completed chain. Visible to the guest only after `flush`: entries collect in a
    /// shadow and are written into the guest's used ring together, so their cache-line
    /// transfers overlap instead of interleaving with the frame copies (as DPDK's vhost does).
    #[inline]
    fn push_used(&mut self, head: u16, len: u32) {
        if self.shadow_n == SHADOW_USED {
            self.write_shadow();
        }
        self.shadow_used[self.shadow_n] = (head as u32, len);
        self.shadow_n += 1;
        self.used_idx = self.used_idx.wrapping_add(1);
    }

    /// Consume `n` chains: they must each get a used entry (`push_used`) in this burst.
    #[inline]
    fn advance(&mut self, n: u16) {
        self.last_avail_idx = self.last_avail_idx.wrapping_add(n);
    }

    /// Publish the used entries of this burst with one release store of `used.idx` (paired with
    /// the guest's read barrier after it loads `used.idx`), and notify the guest if it asked.
    #[inline]
    fn flush(&mut self) {
        self.avail_reloaded = false;
        if self.used_idx == self.published_used {
            return;
        }
        self.write_shadow();
        self.used_idx_atomic()
            .store(self.used_idx, Ordering::Release);
        self.published_used = self.used_idx;
        self.refresh_avail_event();
        self.log_used();
        // The guest writes used_event/flags, then reads used.idx; we write used.idx, then read
        // used_event/flags. Without a full fence both sides could miss each other's store.
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            let used_event = self.read_avail_u16(2 + self.size as usize);
            let old = self.signalled_used;
            self.signalled_used = self.used_idx;
            need_event(used_event, self.used_idx, old)
        } else {
            self.read_avail_u16(0) & VRING_AVAIL_F_NO_INTERRUPT == 0
        };
        if notify {
            self.notify();
        }
    }

    /// Log the first `len` bytes of a chain's buffers, written by the switch.
    #[inline]
    fn log_written(&self, chain: &SegList, len: u32) {
        if let Some(l) = &self.log {
            log_chain(&l.log, &self.mem, chain, len);
        }
    }

    /// Used elements are written early only into slots the guest looks at once `flush`
    /// publishes the index.
    #[inline]
    fn copies_may_wait(&self) -> bool {
        self.log.is_none()
    }

    #[inline]
    fn is_broken(&self) -> bool {
        self.broken
    }

    #[inline]
    fn stats(&self) -> &QueueStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::super::mock::MockGuest;
    use super::*;

    fn walk(
        g: &MockGuest,
        ring: &SplitRing,
        head: u16,
        writable: bool,
    ) -> Result<Vec<u8>, ChainError> {
        let mut l = SegList::default();
        ring.walk_chain(head, writable, &mut l)?;
        let mut out = vec![0u8; l.total as usize];
        crate::mem::copy::gather(&l, 0, &mut out);
        let _ = g;
        Ok(out)
    }

    #[test]
    fn plain_chained_and_indirect_chains() {
        let mut g = MockGuest::new(16);
        let mut ring = g.ring(false);
        let h1 = g.add_chain(&[vec![1, 2, 3]], 0);
        let h2 = g.add_chain(&[vec![4], vec![5, 6], vec![7]], 0);
        let h3 = g.add_indirect(&[vec![8, 9], vec![10]], 0);
        assert_eq!(ring.avail_pending(), 3);
        assert_eq!(ring.head_at(0), h1);
        assert_eq!(walk(&g, &ring, h1, false).unwrap(), [1, 2, 3]);
        assert_eq!(walk(&g, &ring, h2, false).unwrap(), [4, 5, 6, 7]);
        assert_eq!(walk(&g, &ring, h3, false).unwrap(), [8, 9, 10]);
        assert_eq!(walk(&g, &ring, h1, true), Err(ChainError::WrongDirection));
        for h in [h1, h2, h3] {
            ring.push_used(h, 0);
        }
        ring.advance(3);
        assert_eq!(g.used_idx(), 0, "not visible before flush");
        ring.flush();
        assert_eq!(g.used_idx(), 3);
        assert_eq!(g.used_elem(1), (h2 as u32, 0));
        assert_eq!(g.used_flags(), VRING_USED_F_NO_NOTIFY);
    }

    #[test]
    fn hostile_chains_are_refused() {
        let mut g = MockGuest::new(8);
        let ring = g.ring(false);
        // A loop: 0 -> 1 -> 0.
        let b = g.alloc(4);
        g.set_desc(0, b, 4, VIRTQ_DESC_F_NEXT, 1);
        g.set_desc(1, b, 4, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(walk(&g, &ring, 0, false), Err(ChainError::TooLong));
        // Outside guest memory, and a length that wraps the address space.
        g.set_desc(2, 0x4000_0000, 64, 0, 0);
        assert_eq!(walk(&g, &ring, 2, false), Err(ChainError::BadAddress));
        g.set_desc(2, u64::MAX - 8, 64, 0, 0);
        assert_eq!(walk(&g, &ring, 2, false), Err(ChainError::BadAddress));
        // next past the queue, head past the queue.
        g.set_desc(3, b, 4, VIRTQ_DESC_F_NEXT, 200);
        assert_eq!(walk(&g, &ring, 3, false), Err(ChainError::BadIndex));
        assert_eq!(walk(&g, &ring, 9, false), Err(ChainError::BadIndex));
        // Indirect: bad length, with NEXT, nested.
        let t = g.alloc(64);
        g.set_desc(4, t, 20, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(walk(&g, &ring, 4, false), Err(ChainError::BadIndirect));
        g.set_desc(4, t, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 5);
        assert_eq!(walk(&g, &ring, 4, false), Err(ChainError::BadIndirect));
        g.set_desc_in(t, 0, t, 32, VIRTQ_DESC_F_INDIRECT, 0);
        g.set_desc(4, t, 32, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(walk(&g, &ring, 4, false), Err(ChainError::BadIndirect));
        // An indirect loop is bounded by the table size.
        g.set_desc_in(t, 0, b, 4, VIRTQ_DESC_F_NEXT, 1);
        g.set_desc_in(t, 1, b, 4, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(walk(&g, &ring, 4, false), Err(ChainError::TooLong));
    }

    #[test]
    fn avail_jump_breaks_only_this_ring() {
        let mut g = MockGuest::new(8);
        let mut ring = g.ring(false);
        g.set_avail_idx(9);
        assert_eq!(ring.avail_pending(), 0);
        assert!(ring.broken);
        assert_eq!(ring.stats.snapshot().ring_broken, 1);
    }

    #[test]
    fn event_idx_notifications() {
        let g = MockGuest::new(8);
        let ring = SplitRing::new(
            g.mem.clone(),
            8,
            RingAddrs {
                desc: g.desc + super::super::mock::UVA_OFFSET,
                avail: g.avail + super::super::mock::UVA_OFFSET,
                used: g.used + super::super::mock::UVA_OFFSET,
            },
            0,
            true,
            Some(eventfd()),
            Arc::new(QueueStats::default()),
        );
        let mut ring = ring.unwrap();
        g.set_used_event(2); // interrupt when used.idx passes 2
        ring.push_used(0, 0);
        ring.flush();
        assert_eq!(ring.stats.snapshot().guest_notifications, 0);
        ring.push_used(1, 0);
        ring.push_used(2, 0);
        ring.flush();
        assert_eq!(ring.stats.snapshot().guest_notifications, 1);
        ring.push_used(3, 0);
        ring.flush();
        assert_eq!(ring.stats.snapshot().guest_notifications, 1);
    }

    /// While polled, an EVENT_IDX guest is never asked to kick, whatever it publishes (up to a
    /// ring's worth past what was taken), over several wraps of the 16-bit indices; and the
    /// line it reads for that is rewritten about every 2^15 entries, not on every flush.
    #[test]
    fn event_idx_guest_never_kicks_and_avail_event_is_rarely_rewritten() {
        let mut g = MockGuest::new(8);
        let mut ring = g.ring(true);
        let (mut idx, mut rewrites, mut event) = (0u16, 0, g.avail_event());
        for step in 0..65536u32 {
            let n = 1 + (step % 5) as u16;
            g.set_avail_idx(idx.wrapping_add(n));
            assert_eq!(ring.avail_pending(), n);
            for _ in 0..n {
                ring.push_used(0, 0);
            }
            ring.advance(n);
            ring.flush();
            idx = idx.wrapping_add(n);
            if g.avail_event() != event {
                event = g.avail_event();
                rewrites += 1;
            }
            for new in (1..=g.qsize).map(|k| idx.wrapping_add(k)) {
                // Linux's vring_need_event(avail_event, new, old) with old = idx.
                let kick = new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(idx);
                assert!(!kick, "kick at {new} (old {idx}, avail_event {event})");
            }
        }
        assert!((5..=7).contains(&rewrites), "{rewrites} rewrites");
    }

    #[test]
    fn no_interrupt_flag_is_honoured() {
        let g = MockGuest::new(8);
        let mut ring = g.ring(false);
        ring.call = Some(CallFd::new(eventfd()));
        ring.push_used(0, 0);
        ring.flush();
        assert_eq!(ring.stats.snapshot().guest_notifications, 1);
        g.write(g.avail, &VRING_AVAIL_F_NO_INTERRUPT.to_le_bytes());
        ring.push_used(1, 0);
        ring.flush();
        assert_eq!(ring.stats.snapshot().guest_notifications, 1);
    }

    #[test]
    fn refuses_bad_ring_layout() {
        let g = MockGuest::new(8);
        let mk = |size, desc| {
            SplitRing::new(
                g.mem.clone(),
                size,
                RingAddrs {
                    desc,
                    avail: g.avail + super::super::mock::UVA_OFFSET,
                    used: g.used + super::super::mock::UVA_OFFSET,
                },
                0,
                false,
                None,
                Arc::new(QueueStats::default()),
            )
        };
        assert!(matches!(
            mk(6, g.desc + 0x1000_0000),
            Err(RingError::BadSize(6))
        ));
        assert!(matches!(mk(8, 0x10), Err(RingError::NotMapped { .. })));
        assert!(matches!(
            mk(8, g.desc + 0x1000_0000 + 8),
            Err(RingError::Misaligned { .. })
        ));
    }

    fn eventfd() -> File {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd returns a fresh fd (checked) that the File then owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        // SAFETY: fd is valid and owned by nobody else.
        unsafe { File::from_raw_fd(fd) }
    }
}
