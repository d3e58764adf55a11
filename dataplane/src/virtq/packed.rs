//! The packed-ring fast path (VIRTIO_F_RING_PACKED): one descriptor ring shared both ways. The
//! driver makes a chain available by writing its descriptors in ring order and flipping the
//! head's AVAIL/USED flags to match its wrap counter; the device returns chains in the order it
//! took them (so also for VIRTIO_F_IN_ORDER) by writing one used descriptor, with the buffer
//! id, over the first descriptor of each chain. Same interface and rules as `SplitRing`: built
//! on control, used by one PMD at a time, every guest-written value checked after it is read.

use std::fs::File;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring;

use super::split::{RingAddrs, RingError};
use super::*;
use crate::cpu::prefetch;
use crate::mem::table::{DirtyLog, MemTable};
use crate::stats::QueueStats;

const F_AVAIL: u16 = 1 << virtio_ring::VRING_PACKED_DESC_F_AVAIL;
const F_USED: u16 = 1 << virtio_ring::VRING_PACKED_DESC_F_USED;
/// Event suppression flags (the driver's and the device's area).
const EVENT_ENABLE: u16 = virtio_ring::VRING_PACKED_EVENT_FLAG_ENABLE as u16;
const EVENT_DISABLE: u16 = virtio_ring::VRING_PACKED_EVENT_FLAG_DISABLE as u16;
const EVENT_DESC: u16 = virtio_ring::VRING_PACKED_EVENT_FLAG_DESC as u16;

/// Chains found available and not yet consumed that the ring remembers: a TX burst plus the
/// most RX buffers one frame may take, with room to spare.
const PENDING_MAX: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
struct PDesc {
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
}

/// A chain the driver made available: where it starts, how many descriptors it spans, its
/// buffer id and the wrap counter of its position.
#[derive(Clone, Copy, Default)]
struct Pending {
    pos: u16,
    ndesc: u16,
    id: u16,
    wrap: bool,
}

pub struct PackedRing {
    mem: Arc<MemTable>,
    desc: *mut PDesc,
    /// Driver event suppression (the driver writes it): off_wrap, flags.
    driver: *const u16,
    /// Device event suppression (we write it).
    device: *mut u16,
    size: u16,
    /// Chains found available, in ring order: `pending[(first + i) % PENDING_MAX]`.
    pending: [Pending; PENDING_MAX],
    first: usize,
    n_pending: usize,
    /// Where the next available chain is looked for, and that position's wrap counter.
    scan_pos: u16,
    scan_wrap: bool,
    /// Chains given back (`push_used`) since the last `advance`: they are the first ones pending.
    pushed: usize,
    /// Given back but not yet written into the ring: written together at `flush`, so their
    /// cache-line transfers overlap instead of interleaving with the frame copies.
    shadow: [(Pending, u32); PENDING_MAX],
    shadow_n: usize,
    /// `scan` found the next position not available since the last flush: RX delivery does not
    /// read the driver's line again until then (as the split ring reloads `avail.idx` at most
    /// once per burst); `avail_pending` always looks.
    scan_dry: bool,
    /// Next used position and wrap counter, and where they were at the last notification.
    used_pos: u16,
    used_wrap: bool,
    signalled_pos: u16,
    signalled_wrap: bool,
    /// Used descriptors written since the last flush.
    dirty: bool,
    event_idx: bool,
    /// The guest corrupted the ring (a chain longer than the ring); skipped until reset.
    pub broken: bool,
    call: Option<CallFd>,
    pub stats: Arc<QueueStats>,
    log: Option<Arc<DirtyLog>>,
}

// SAFETY: as `SplitRing`: the pointers point into `mem`, which the ring keeps alive, and one
// thread at a time uses the ring (`&mut self`).
unsafe impl Send for PackedRing {}

impl PackedRing {
    /// Validate and translate the ring's three areas (`addrs.avail`: the driver's event
    /// suppression area, `addrs.used`: the device's). `base`: the next available position in
    /// bits 0..15 and its wrap counter in bit 15, as SET_VRING_BASE gives it.
    pub fn new(
        mem: Arc<MemTable>,
        size: u32,
        addrs: RingAddrs,
        base: u16,
        event_idx: bool,
        call: Option<File>,
        stats: Arc<QueueStats>,
    ) -> Result<PackedRing, RingError> {
        // Any size up to 32768 is allowed for packed rings, powers of two or not.
        if size == 0 || size > MAX_QUEUE_SIZE as u32 {
            return Err(RingError::BadSize(size));
        }
        let map = |what: &'static str, addr: u64, len: u64, align: u64| {
            let p = mem
                .uva_to_host(addr, len)
                .ok_or(RingError::NotMapped { what, addr, len })?;
            if !(p as usize as u64).is_multiple_of(align) {
                return Err(RingError::Misaligned { what, addr });
            }
            Ok(p)
        };
        let desc = map("descriptor", addrs.desc, 16 * size as u64, 16)? as *mut PDesc;
        let driver = map("driver event", addrs.avail, 4, 4)? as *const u16;
        let device = map("device event", addrs.used, 4, 4)? as *mut u16;
        let pos = (base & 0x7fff) % size as u16;
        let wrap = base & 0x8000 != 0;
        let ring = PackedRing {
            mem,
            desc,
            driver,
            device,
            size: size as u16,
            pending: [Pending::default(); PENDING_MAX],
            first: 0,
            n_pending: 0,
            scan_pos: pos,
            scan_wrap: wrap,
            pushed: 0,
            shadow: [(Pending::default(), 0); PENDING_MAX],
            shadow_n: 0,
            scan_dry: false,
            used_pos: pos,
            used_wrap: wrap,
            signalled_pos: pos,
            signalled_wrap: wrap,
            dirty: false,
            event_idx,
            broken: false,
            call: call.map(CallFd::new),
            stats,
            log: None,
        };
        ring.stats.ring_broken.store(0, Ordering::Relaxed);
        // Busy-polled: the driver need not kick us.
        // SAFETY: `device` spans 4 mapped bytes, 4-aligned (checked above); flags is the second u16.
        unsafe { AtomicU16::from_ptr(ring.device.add(1)) }.store(EVENT_DISABLE, Ordering::Relaxed);
        Ok(ring)
    }

    /// Ask the driver to kick us (`on`: the PMD is about to sleep) or not to (polling again).
    /// Returns whether chains are already waiting, which a kick asked for now would miss.
    pub fn set_kicks(&mut self, on: bool) -> bool {
        let flags = if on { EVENT_ENABLE } else { EVENT_DISABLE };
        // SAFETY: as in `new`: `device` spans 4 mapped bytes; flags is the second u16.
        unsafe { AtomicU16::from_ptr(self.device.add(1)) }.store(flags, Ordering::Relaxed);
        if self.log.is_some() {
            self.log_ring();
        }
        // Our flags before the driver's next descriptor: as for the used index in `flush`.
        fence(Ordering::SeqCst);
        self.avail_pending() > 0
    }

    /// Log every page the ring writes from now on (runs on control).
    pub fn with_log(mut self, log: Arc<DirtyLog>) -> PackedRing {
        self.log = Some(log);
        self.log_ring();
        self
    }

    /// The descriptor ring and the device area are what the ring itself writes.
    fn log_ring(&self) {
        if let Some(log) = &self.log {
            log.mark_host(&self.mem, self.desc as *const u8, 16 * self.size as u64);
            log.mark_host(&self.mem, self.device as *const u8, 4);
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// The next position to take, with its wrap counter in bit 15 (GET_VRING_BASE's answer).
    /// Taken chains are all given back by then, so the used position is the same.
    pub fn base(&self) -> u16 {
        let (pos, wrap) = match self.n_pending {
            0 => (self.scan_pos, self.scan_wrap),
            _ => {
                let p = self.pending[self.first];
                (p.pos, p.wrap)
            }
        };
        pos | (wrap as u16) << 15
    }

    fn flags_atomic(&self, pos: u16) -> &AtomicU16 {
        // SAFETY: pos < size, and the descriptor ring spans 16 * size mapped bytes, 16-aligned;
        // flags is the u16 at offset 14. Atomic: the guest writes it concurrently.
        unsafe { AtomicU16::from_ptr(std::ptr::addr_of_mut!((*self.desc.add(pos as usize)).flags)) }
    }

    #[inline]
    fn read_desc(&self, table: *const PDesc, i: u16) -> PDesc {
        count_desc_read();
        // SAFETY: callers pass i below the table's entry count; the table was bounds-checked.
        unsafe { std::ptr::read_volatile(table.add(i as usize)) }
    }

    fn next(&self, pos: u16, wrap: bool, n: u16) -> (u16, bool) {
        let p = pos as u32 + n as u32;
        if p >= self.size as u32 {
            ((p - self.size as u32) as u16, !wrap)
        } else {
            (p as u16, wrap)
        }
    }

    /// Look for more available chains until `want` are pending, or the ring has no more: then
    /// not again before the next flush.
    #[inline]
    fn scan(&mut self, want: usize) {
        if self.n_pending >= want || self.scan_dry {
            return;
        }
        // A burst's worth at least: descriptors come four to a cache line.
        let want = want.clamp(crate::BURST, PENDING_MAX);
        while self.n_pending < want && !self.broken {
            let (pos, wrap) = (self.scan_pos, self.scan_wrap);
            // Acquire: the chain's descriptors, written before the head's flags, are visible.
            let flags = self.flags_atomic(pos).load(Ordering::Acquire);
            if (flags & F_AVAIL != 0) != wrap || (flags & F_USED != 0) == wrap {
                self.scan_dry = true;
                return;
            }
            // The chain: consecutive descriptors while NEXT is set (an indirect one alone).
            let mut ndesc = 1u16;
            let mut d = self.read_desc(self.desc, pos);
            while d.flags & VIRTQ_DESC_F_NEXT != 0 {
                // Longer than any driver makes: not walked to its end (each step a read).
                if ndesc >= self.size.min(MAX_CHAIN_DESCS) {
                    self.mark_broken();
                    return;
                }
                let (p, _) = self.next(pos, wrap, ndesc);
                d = self.read_desc(self.desc, p);
                ndesc += 1;
            }
            let slot = (self.first + self.n_pending) % PENDING_MAX;
            self.pending[slot] = Pending {
                pos,
                ndesc,
                id: d.id, // the buffer id is in the chain's last descriptor
                wrap,
            };
            self.n_pending += 1;
            (self.scan_pos, self.scan_wrap) = self.next(pos, wrap, ndesc);
        }
    }

    #[cold]
    fn mark_broken(&mut self) {
        self.broken = true;
        self.stats.ring_broken.store(1, Ordering::Relaxed);
    }

    fn pending_at(&self, i: u16) -> Pending {
        self.pending[(self.first + i as usize) % PENDING_MAX]
    }

    /// Start loading the buffer bytes at `offset` of the chain at `head` (first descriptor only).
    #[inline]
    fn buffer_at(&self, head: u16, offset: u32) -> Option<(*mut u8, u32)> {
        if head >= self.size {
            return None;
        }
        let d = self.read_desc(self.desc, head);
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return None;
        }
        prefetch_span(&self.mem, d.addr, d.len, offset)
    }

    /// Write the used descriptor of the chain at `p` (flags last, with release: the driver
    /// reads id and len after it sees the flags flip).
    #[inline]
    fn write_used(&self, p: Pending, len: u32) {
        // SAFETY: p.pos < size (positions come from `scan`), inside the checked descriptor ring.
        unsafe {
            let d = self.desc.add(p.pos as usize);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*d).id), p.id);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*d).len), len);
        }
        let mut flags = if p.wrap { F_AVAIL | F_USED } else { 0 };
        if len > 0 {
            flags |= VIRTQ_DESC_F_WRITE;
        }
        self.flags_atomic(p.pos).store(flags, Ordering::Release);
    }

    /// Write the shadowed used descriptors, in ring order.
    #[inline]
    fn write_shadow(&mut self) {
        for i in 0..self.shadow_n {
            let (p, len) = self.shadow[i];
            self.write_used(p, len);
        }
        self.shadow_n = 0;
    }

    #[inline]
    fn notify(&mut self) {
        notify(&self.call, &self.stats);
    }
}

impl VirtQueue for PackedRing {
    const COUNTS_ALL_PENDING: bool = false;

    #[inline]
    fn avail_pending(&mut self) -> u16 {
        self.scan_dry = false;
        self.scan(crate::BURST);
        self.n_pending as u16
    }

    #[inline]
    fn avail_at_least(&mut self, want: u16) -> u16 {
        self.scan(want as usize);
        self.n_pending as u16
    }

    #[inline]
    fn head_at(&self, i: u16) -> u16 {
        self.pending_at(i).pos
    }

    #[inline]
    fn prefetch_desc(&self, head: u16) {
        if head < self.size {
            prefetch(self.desc.wrapping_add(head as usize) as *const u8);
        }
    }

    #[inline]
    fn prefetch_data(&self, head: u16, offset: u32) {
        if let Some((p, _)) = self.buffer_at(head, offset) {
            prefetch(p);
        }
    }

    #[inline]
    fn prefetch_ahead(&self, ahead: u16, hdr_len: u32) {
        if (ahead as usize) < self.n_pending {
            self.prefetch_desc(self.head_at(ahead));
        }
        if ((ahead / 2) as usize) < self.n_pending {
            if let Some((p, len)) = self.buffer_at(self.head_at(ahead / 2), 0) {
                prefetch_rx(p, len, hdr_len);
            }
        }
    }

    fn walk_chain(&self, head: u16, writable: bool, out: &mut SegList) -> Result<(), ChainError> {
        out.head = head;
        out.n = 0;
        out.total = 0;
        if head >= self.size {
            return Err(ChainError::BadIndex);
        }
        let d = self.read_desc(self.desc, head);
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            // A table of descriptors used in order; NEXT has no meaning there.
            if d.flags & VIRTQ_DESC_F_NEXT != 0 || !d.len.is_multiple_of(16) || d.len == 0 {
                return Err(ChainError::BadIndirect);
            }
            let count = d.len / 16;
            if count > self.size as u32 {
                return Err(ChainError::BadIndirect);
            }
            if count > MAX_CHAIN_DESCS as u32 {
                return Err(ChainError::TooLong);
            }
            let table = self
                .mem
                .gpa_to_host(d.addr, d.len as u64)
                .ok_or(ChainError::BadAddress)? as *const PDesc;
            if !(table as usize).is_multiple_of(std::mem::align_of::<PDesc>()) {
                return Err(ChainError::BadIndirect);
            }
            for i in 0..count as u16 {
                let e = self.read_desc(table, i);
                if e.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                    return Err(ChainError::BadIndirect);
                }
                if (e.flags & VIRTQ_DESC_F_WRITE != 0) != writable {
                    return Err(ChainError::WrongDirection);
                }
                push_segs(&self.mem, e.addr, e.len, out)?;
            }
            return Ok(());
        }
        let mut d = d;
        let mut pos = head;
        for _ in 0..self.size.min(MAX_CHAIN_DESCS) {
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
            pos = if pos + 1 == self.size { 0 } else { pos + 1 };
            d = self.read_desc(self.desc, pos);
        }
        Err(ChainError::TooLong)
    }

    /// Give back the next taken chain (chains come back in the order they were taken, which is
    /// the ring's order: `head` is that chain's position).
    #[inline]
    fn push_used(&mut self, head: u16, len: u32) {
        if self.pushed >= self.n_pending {
            return;
        }
        let p = self.pending_at(self.pushed as u16);
        debug_assert_eq!(p.pos, head);
        self.pushed += 1;
        if self.shadow_n == PENDING_MAX {
            self.write_shadow();
        }
        self.shadow[self.shadow_n] = (p, len);
        self.shadow_n += 1;
        (self.used_pos, self.used_wrap) = self.next(p.pos, p.wrap, p.ndesc);
        self.dirty = true;
    }

    #[inline]
    fn advance(&mut self, n: u16) {
        let n = (n as usize).min(self.n_pending);
        self.first = (self.first + n) % PENDING_MAX;
        self.n_pending -= n;
        self.pushed = 0;
    }

    /// Notify the driver if it asked to hear about what was given back since the last flush.
    #[inline]
    fn flush(&mut self) {
        self.scan_dry = false;
        if !self.dirty {
            return;
        }
        self.dirty = false;
        self.write_shadow();
        if self.log.is_some() {
            self.log_ring();
        }
        // As in the split ring: our used descriptors before the driver's event area.
        fence(Ordering::SeqCst);
        // SAFETY: `driver` spans 4 mapped bytes, 2-aligned (checked in `new`).
        let (off_wrap, flags) = unsafe {
            (
                std::ptr::read_volatile(self.driver),
                std::ptr::read_volatile(self.driver.add(1)),
            )
        };
        let notify = match flags {
            EVENT_ENABLE => true,
            EVENT_DESC if self.event_idx => {
                // vring_need_event over positions counted across one wrap, as DPDK's vhost.
                let size = self.size;
                let new = self.used_pos as i32;
                let mut old = self.signalled_pos as i32;
                if new <= old {
                    old -= size as i32;
                }
                let mut off = (off_wrap & 0x7fff) as i32;
                if self.used_wrap != (off_wrap >> 15 != 0) {
                    off -= size as i32;
                }
                ((new - off - 1) as u16) < ((new - old) as u16)
            }
            EVENT_DESC => true,
            _ => false,
        };
        self.signalled_pos = self.used_pos;
        self.signalled_wrap = self.used_wrap;
        if notify {
            self.notify();
        }
    }

    #[inline]
    fn log_written(&self, chain: &SegList, len: u32) {
        if let Some(log) = &self.log {
            log_chain(log, &self.mem, chain, len);
        }
    }

    /// No: a full shadow is written back mid-burst, and a used descriptor is visible at once.
    #[inline]
    fn copies_may_wait(&self) -> bool {
        false
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
    use super::super::mock::{MockGuest, UVA_OFFSET};
    use super::*;

    const DESC: u64 = 0x1000;
    const DRIVER: u64 = 0x3000;
    const DEVICE: u64 = 0x3004;

    /// A packed ring of `size` in a mock guest's memory, starting at `base`.
    fn ring(g: &MockGuest, size: u32, base: u16) -> PackedRing {
        let addrs = RingAddrs {
            desc: DESC + UVA_OFFSET,
            avail: DRIVER + UVA_OFFSET,
            used: DEVICE + UVA_OFFSET,
        };
        let stats = Arc::new(QueueStats::default());
        PackedRing::new(g.mem.clone(), size, addrs, base, false, None, stats).unwrap()
    }

    /// The driver's side: descriptor `pos` with the AVAIL/USED bits of wrap counter `wrap`.
    fn post(g: &MockGuest, pos: u16, addr: u64, len: u32, id: u16, flags: u16, wrap: bool) {
        let flags = flags | if wrap { F_AVAIL } else { F_USED };
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&id.to_le_bytes());
        b[14..16].copy_from_slice(&flags.to_le_bytes());
        g.write(DESC + 16 * pos as u64, &b);
    }

    /// The used descriptor at `pos`: (id, len, flags).
    fn used(g: &MockGuest, pos: u16) -> (u16, u32, u16) {
        let b = g.read(DESC + 16 * pos as u64, 16);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        (
            u16_at(12),
            u32::from_le_bytes(b[8..12].try_into().unwrap()),
            u16_at(14),
        )
    }

    #[test]
    fn chains_are_taken_and_given_back_in_ring_order_across_the_wrap() {
        let g = MockGuest::new(4);
        // Size 4, starting at position 2 with wrap counter 1 (bit 15 of the base).
        let mut r = ring(&g, 4, 2 | 0x8000);
        assert_eq!(r.avail_pending(), 0);
        // Nothing there: the driver's line is not read again before the burst ends.
        r.flush();
        // Chain id 7: positions 2 and 3. Chain id 9: position 0, after the wrap (counter 0).
        post(&g, 2, 0x10_0000, 100, 0, VIRTQ_DESC_F_NEXT, true);
        post(&g, 3, 0x10_1000, 50, 7, 0, true);
        post(&g, 0, 0x10_2000, 60, 9, 0, false);
        assert_eq!(r.avail_pending(), 2);
        assert_eq!((r.head_at(0), r.head_at(1)), (2, 0));
        let mut out = SegList::default();
        r.walk_chain(2, false, &mut out).unwrap();
        assert_eq!((out.n, out.total), (2, 150));
        r.walk_chain(0, false, &mut out).unwrap();
        assert_eq!(out.total, 60);
        assert_eq!(
            r.walk_chain(0, true, &mut out),
            Err(ChainError::WrongDirection)
        );
        r.push_used(2, 0);
        r.push_used(0, 0);
        r.advance(2);
        assert_eq!(
            used(&g, 2).2 & F_USED,
            0,
            "given back at the flush, not before"
        );
        r.flush();
        // Used descriptors over each chain's first one, with its buffer id and the wrap
        // counter of that position in both bits.
        assert_eq!(used(&g, 2), (7, 0, F_AVAIL | F_USED));
        assert_eq!(used(&g, 0), (9, 0, 0));
        assert_eq!(r.base(), 1, "next: position 1, wrap counter 0");
        // A used descriptor is not taken again, nor is one of the previous lap.
        assert_eq!(r.avail_pending(), 0);
        post(&g, 1, 0x10_3000, 10, 3, VIRTQ_DESC_F_WRITE, true);
        r.flush();
        assert_eq!(r.avail_pending(), 0);
    }

    #[test]
    fn indirect_tables_and_hostile_chains() {
        let g = MockGuest::new(8);
        let mut r = ring(&g, 8, 0x8000);
        // An indirect table of two writable buffers.
        let table = 0x10_0000;
        for (i, (addr, len)) in [(0x10_1000u64, 1000u32), (0x10_2000, 500)]
            .iter()
            .enumerate()
        {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[14..16].copy_from_slice(&VIRTQ_DESC_F_WRITE.to_le_bytes());
            g.write(table + 16 * i as u64, &b);
        }
        post(&g, 0, table, 32, 4, VIRTQ_DESC_F_INDIRECT, true);
        // A buffer outside guest memory.
        post(&g, 1, 0x7000_0000, 64, 5, VIRTQ_DESC_F_WRITE, true);
        assert_eq!(r.avail_at_least(2), 2);
        let mut out = SegList::default();
        r.walk_chain(0, true, &mut out).unwrap();
        assert_eq!((out.n, out.total), (2, 1500));
        assert_eq!(r.walk_chain(1, true, &mut out), Err(ChainError::BadAddress));
        r.push_used(0, 1500);
        r.push_used(1, 0);
        r.advance(2);
        r.flush();
        assert_eq!(
            used(&g, 0),
            (4, 1500, F_AVAIL | F_USED | VIRTQ_DESC_F_WRITE)
        );
        // A chain that never ends (NEXT on every descriptor of the ring): the ring is broken,
        // not walked forever.
        for pos in 2..8 {
            post(&g, pos, 0x10_0000, 16, 0, VIRTQ_DESC_F_NEXT, true);
        }
        for pos in 0..2 {
            post(&g, pos, 0x10_0000, 16, 0, VIRTQ_DESC_F_NEXT, false);
        }
        assert_eq!(r.avail_pending(), 0);
        assert!(r.is_broken());
        assert_eq!(r.stats.ring_broken.load(Ordering::Relaxed), 1);
    }
}
