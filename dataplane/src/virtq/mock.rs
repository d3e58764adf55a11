//! A mock guest driver for ring tests: lays out a split ring in a memfd-backed memory table and
//! plays the driver's side (post chains, publish avail, read used) through raw guest memory.

use std::sync::Arc;

use super::*;
use crate::mem::table::{test_mem, MemTable};
use crate::stats::QueueStats;

pub const UVA_OFFSET: u64 = 0x1000_0000;
const MEM_SIZE: u64 = 0x20_0000;

pub struct MockGuest {
    pub mem: Arc<MemTable>,
    pub qsize: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    heap: u64,
}

impl MockGuest {
    pub fn new(qsize: u16) -> Self {
        let mem = test_mem::table(0, MEM_SIZE);
        let desc = 0x1000;
        let avail = desc + 16 * qsize as u64;
        let used = (avail + 6 + 2 * qsize as u64).next_multiple_of(4);
        MockGuest {
            mem,
            qsize,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            heap: 0x10_0000,
        }
    }

    pub fn ring(&self, event_idx: bool) -> SplitRing {
        let addrs = split::RingAddrs {
            desc: self.desc + UVA_OFFSET,
            avail: self.avail + UVA_OFFSET,
            used: self.used + UVA_OFFSET,
        };
        SplitRing::new(
            self.mem.clone(),
            self.qsize as u32,
            addrs,
            0,
            event_idx,
            None,
            Arc::new(QueueStats::default()),
        )
        .expect("ring")
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let p = self
            .mem
            .gpa_to_host(gpa, bytes.len() as u64)
            .expect("in memory");
        // SAFETY: p spans bytes.len() mapped bytes of the test's memory table.
        unsafe { std::ptr::copy(bytes.as_ptr(), p, bytes.len()) }
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.mem.gpa_to_host(gpa, len as u64).expect("in memory");
        let mut v = vec![0u8; len];
        // SAFETY: p spans len mapped bytes.
        unsafe { std::ptr::copy(p, v.as_mut_ptr(), len) }
        v
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        let g = self.heap;
        self.heap = (self.heap + len).next_multiple_of(16);
        assert!(self.heap < MEM_SIZE);
        g
    }

    pub fn set_desc_in(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(table + 16 * i as u64, &b);
    }

    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.set_desc_in(self.desc, i, addr, len, flags, next)
    }

    pub fn take_desc(&mut self) -> u16 {
        let d = self.next_desc;
        self.next_desc = (self.next_desc + 1) % self.qsize;
        d
    }

    /// Put `head` on the avail ring and publish the new index.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail_idx % self.qsize;
        self.write(self.avail + 4 + 2 * slot as u64, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write(self.avail + 2, &self.avail_idx.to_le_bytes());
    }

    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.write(self.avail + 2, &idx.to_le_bytes());
    }

    /// A chain of buffers holding `bufs`, flagged `flags` (plus NEXT where chained).
    pub fn add_chain(&mut self, bufs: &[Vec<u8>], flags: u16) -> u16 {
        let ids: Vec<u16> = bufs.iter().map(|_| self.take_desc()).collect();
        for (k, b) in bufs.iter().enumerate() {
            let g = self.alloc(b.len() as u64);
            self.write(g, b);
            let more = k + 1 < bufs.len();
            let next = if more { ids[k + 1] } else { 0 };
            let f = flags | if more { VIRTQ_DESC_F_NEXT } else { 0 };
            self.set_desc(ids[k], g, b.len() as u32, f, next);
        }
        self.publish(ids[0]);
        ids[0]
    }

    /// One ring descriptor pointing at an indirect table of `bufs`.
    pub fn add_indirect(&mut self, bufs: &[Vec<u8>], flags: u16) -> u16 {
        let table = self.alloc(16 * bufs.len() as u64);
        for (k, b) in bufs.iter().enumerate() {
            let g = self.alloc(b.len() as u64);
            self.write(g, b);
            let more = k + 1 < bufs.len();
            let f = flags | if more { VIRTQ_DESC_F_NEXT } else { 0 };
            self.set_desc_in(table, k as u16, g, b.len() as u32, f, (k + 1) as u16);
        }
        let head = self.take_desc();
        self.set_desc(
            head,
            table,
            16 * bufs.len() as u32,
            VIRTQ_DESC_F_INDIRECT,
            0,
        );
        self.publish(head);
        head
    }

    /// A writable receive chain of the given buffer sizes; returns the head and buffer addresses.
    pub fn add_rx(&mut self, lens: &[u32]) -> (u16, Vec<u64>) {
        let bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0xee; l as usize]).collect();
        let before = self.heap;
        let head = self.add_chain(&bufs, VIRTQ_DESC_F_WRITE);
        let mut gpas = Vec::new();
        let mut g = before;
        for &l in lens {
            gpas.push(g);
            g = (g + l as u64).next_multiple_of(16);
        }
        (head, gpas)
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le_bytes(self.read(self.used + 2, 2).try_into().unwrap())
    }

    pub fn used_flags(&self) -> u16 {
        u16::from_le_bytes(self.read(self.used, 2).try_into().unwrap())
    }

    /// (id, len) of used entry `i`.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let b = self.read(self.used + 4 + 8 * (i % self.qsize) as u64, 8);
        (
            u32::from_le_bytes(b[..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..].try_into().unwrap()),
        )
    }

    /// The device's avail_event (EVENT_IDX: kick once avail.idx passes it).
    pub fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * self.qsize as u64;
        u16::from_le_bytes(self.read(at, 2).try_into().unwrap())
    }

    /// Ask for an interrupt once used.idx passes `idx` (EVENT_IDX's used_event).
    pub fn set_used_event(&self, idx: u16) {
        self.write(self.avail + 4 + 2 * self.qsize as u64, &idx.to_le_bytes());
    }
}
