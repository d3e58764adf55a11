//! Counters. Each struct has a single writer (the PMD that owns the queue) and any number of
//! readers (control, for `ringswitch ctl stats`). Relaxed atomics suffice: counters are
//! independent and readers only need eventually-current values; no other data is published here.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-queue counters, on their own cache line so PMDs never false-share them with control.
/// A port's queues come in pairs: odd entries count frames the switch took from the port (a
/// guest's TX queue, a device's RX queue), even ones frames it delivered into the port (a
/// guest's RX queue, a device's TX queue).
#[repr(align(64))]
#[derive(Default, Debug)]
pub struct QueueStats {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// TX queue: frames handed on to at least one destination queue.
    pub forwarded: AtomicU64,
    /// RX queue: the guest had no (or too few) receive buffers posted.
    pub drop_no_rx_buffer: AtomicU64,
    /// TX queue: malformed descriptor chain (bad address, loop, wrong direction, bad indirect).
    pub drop_bad_descriptor: AtomicU64,
    /// TX queue: frame shorter than an Ethernet header.
    pub drop_runt: AtomicU64,
    /// Frame larger than MAX_FRAME or than a segment list holds (taken from a port), or than the
    /// destination takes (a guest's buffer without MRG_RXBUF, an mbuf).
    pub drop_too_big: AtomicU64,
    /// TX queue: no port to send to (destination learned on the source port, or no other port
    /// with a running RX queue).
    pub drop_no_destination: AtomicU64,
    /// TX queue: every destination refused the frame; the reason is counted on the destination's
    /// side (`drop_no_rx_buffer`, `drop_too_big`, `drop_bad_descriptor`, `drop_no_mbuf`, …).
    pub drop_undelivered: AtomicU64,
    /// Device port: no free mbuf to copy the frame into (the pool is exhausted).
    pub drop_no_mbuf: AtomicU64,
    /// Device port: its TX queue was full (DPDK TX ring, or the tap's queue: EAGAIN).
    pub drop_tx_full: AtomicU64,
    /// Tap port: the kernel refused the frame (link down, …).
    pub drop_tx_error: AtomicU64,
    /// Taken from the port: its virtio-net header does not describe the frame (a checksum
    /// outside it, segmentation of something that is not TCP, headers not where it says).
    pub drop_bad_offload: AtomicU64,
    /// Delivered into the port: complete frames the switch made because the port does not take
    /// the offload the source used (checksums filled in, TCP segments cut to MSS).
    pub sw_offload: AtomicU64,
    /// Call-eventfd writes (interrupts injected into the guest).
    pub guest_notifications: AtomicU64,
    /// 1 once the guest corrupted the ring (avail index jumped); cleared by a device reset.
    pub ring_broken: AtomicU64,
}

impl QueueStats {
    /// Single-writer increment: a plain load + store, no locked instruction.
    #[inline]
    pub fn add(&self, c: &AtomicU64, n: u64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Increment by any of several writers (a tap queue every PMD writes; the cold
    /// software-offload counter).
    #[inline]
    pub fn add_shared(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> QueueCounters {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueCounters {
            packets: l(&self.packets),
            bytes: l(&self.bytes),
            forwarded: l(&self.forwarded),
            drop_no_rx_buffer: l(&self.drop_no_rx_buffer),
            drop_bad_descriptor: l(&self.drop_bad_descriptor),
            drop_runt: l(&self.drop_runt),
            drop_too_big: l(&self.drop_too_big),
            drop_no_destination: l(&self.drop_no_destination),
            drop_undelivered: l(&self.drop_undelivered),
            drop_no_mbuf: l(&self.drop_no_mbuf),
            drop_tx_full: l(&self.drop_tx_full),
            drop_tx_error: l(&self.drop_tx_error),
            drop_bad_offload: l(&self.drop_bad_offload),
            sw_offload: l(&self.sw_offload),
            guest_notifications: l(&self.guest_notifications),
            ring_broken: l(&self.ring_broken),
        }
    }
}

/// A plain copy of `QueueStats`, for control to format and sum.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounters {
    pub packets: u64,
    pub bytes: u64,
    pub forwarded: u64,
    pub drop_no_rx_buffer: u64,
    pub drop_bad_descriptor: u64,
    pub drop_runt: u64,
    pub drop_too_big: u64,
    pub drop_no_destination: u64,
    pub drop_undelivered: u64,
    pub drop_no_mbuf: u64,
    pub drop_tx_full: u64,
    pub drop_tx_error: u64,
    pub drop_bad_offload: u64,
    pub sw_offload: u64,
    pub guest_notifications: u64,
    pub ring_broken: u64,
}

impl QueueCounters {
    /// Add another queue's counters (per-port totals).
    pub fn accumulate(&mut self, o: &QueueCounters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.forwarded += o.forwarded;
        self.drop_no_rx_buffer += o.drop_no_rx_buffer;
        self.drop_bad_descriptor += o.drop_bad_descriptor;
        self.drop_runt += o.drop_runt;
        self.drop_too_big += o.drop_too_big;
        self.drop_no_destination += o.drop_no_destination;
        self.drop_undelivered += o.drop_undelivered;
        self.drop_no_mbuf += o.drop_no_mbuf;
        self.drop_tx_full += o.drop_tx_full;
        self.drop_tx_error += o.drop_tx_error;
        self.drop_bad_offload += o.drop_bad_offload;
        self.sw_offload += o.sw_offload;
        self.guest_notifications += o.guest_notifications;
        self.ring_broken += o.ring_broken;
    }

    pub fn drops(&self) -> u64 {
        self.drop_no_rx_buffer
            + self.drop_bad_descriptor
            + self.drop_runt
            + self.drop_too_big
            + self.drop_no_destination
            + self.drop_undelivered
            + self.drop_no_mbuf
            + self.drop_tx_full
            + self.drop_tx_error
            + self.drop_bad_offload
    }
}

/// Per-PMD counters and the quiescence epoch.
#[repr(align(64))]
#[derive(Default, Debug)]
pub struct PmdStats {
    pub iterations: AtomicU64,
    /// TSC cycles of passes over the source queues that moved at least one packet, and the rest
    /// (passes that moved none, commands, sleep).
    pub busy_cycles: AtomicU64,
    pub idle_cycles: AtomicU64,
    /// Frames taken from guests (what busy cycles are divided by).
    pub packets: AtomicU64,
    /// Adaptive model: times the PMD went to sleep (idle cycles include the sleep).
    pub sleeps: AtomicU64,
}

impl PmdStats {
    pub fn snapshot(&self) -> PmdCounters {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PmdCounters {
            iterations: l(&self.iterations),
            busy_cycles: l(&self.busy_cycles),
            idle_cycles: l(&self.idle_cycles),
            packets: l(&self.packets),
            sleeps: l(&self.sleeps),
        }
    }
}

#[derive(Default, Debug, Clone, Copy)]
pub struct PmdCounters {
    pub iterations: u64,
    pub busy_cycles: u64,
    pub idle_cycles: u64,
    pub packets: u64,
    pub sleeps: u64,
}
