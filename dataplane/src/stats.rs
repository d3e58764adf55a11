//! Counters. Each struct has a single writer (the PMD that owns the queue) and any number of
//! readers (control, for `ringswitch ctl stats`). Relaxed atomics suffice: counters are
//! independent and readers only need eventually-current values; no other data is published here.

use std::sync::atomic::{AtomicU64, Ordering};

/// The per-queue counters, defined once: `QueueStats` (the atomics the PMDs write),
/// `QueueCounters` (a plain snapshot control sums, serialises and prints), their names.
/// Counters named `drop_*` are drops (`QueueCounters::drops`).
macro_rules! queue_counters {
    ($($(#[doc = $doc:expr])* $name:ident,)*) => {
        /// Per-queue counters, on their own cache line so PMDs never false-share them with
        /// control. A port's queues come in pairs: odd entries count frames the switch took
        /// from the port (a guest's TX queue, a device's RX queue), even ones frames it
        /// delivered into the port (a guest's RX queue, a device's TX queue).
        #[repr(align(64))]
        #[derive(Default, Debug)]
        pub struct QueueStats {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// A plain copy of `QueueStats`, for control to sum, serialise and print.
        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct QueueCounters {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl QueueStats {
            pub fn snapshot(&self) -> QueueCounters {
                QueueCounters {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl QueueCounters {
            /// Every counter, by name, in order.
            pub fn named(&self) -> [(&'static str, u64); [$(stringify!($name)),*].len()] {
                [$((stringify!($name), self.$name)),*]
            }

            /// Add another queue's counters (per-port totals).
            pub fn accumulate(&mut self, o: &QueueCounters) {
                $(self.$name += o.$name;)*
            }
        }
    };
}

queue_counters! {
    packets,
    bytes,
    /// TX queue: frames handed on to at least one destination queue.
    forwarded,
    /// RX queue: the guest had no (or too few) receive buffers posted.
    drop_no_rx_buffer,
    /// TX queue: malformed descriptor chain (bad address, loop, wrong direction, bad indirect).
    drop_bad_descriptor,
    /// TX queue: frame shorter than an Ethernet header.
    drop_runt,
    /// Frame larger than MAX_FRAME or than a segment list holds (taken from a port), or than the
    /// destination takes (a guest's buffer without MRG_RXBUF, an mbuf).
    drop_too_big,
    /// TX queue: no port to send to (destination learned on the source port, or no other port
    /// with a running RX queue).
    drop_no_destination,
    /// TX queue: every destination refused the frame; the reason is counted on the destination's
    /// side (`drop_no_rx_buffer`, `drop_too_big`, `drop_bad_descriptor`, `drop_no_mbuf`, …).
    drop_undelivered,
    /// Device port: no free mbuf to copy the frame into (the pool is exhausted).
    drop_no_mbuf,
    /// Device port: its TX queue was full (DPDK TX ring, or the tap's queue: EAGAIN).
    drop_tx_full,
    /// Tap port: the kernel refused the frame (link down, …).
    drop_tx_error,
    /// Taken from the port: its virtio-net header does not describe the frame (a checksum
    /// outside it, segmentation of something that is not TCP, headers not where it says).
    drop_bad_offload,
    /// Delivered into the port: complete frames the switch made because the port does not take
    /// the offload the source used (checksums filled in, TCP segments cut to MSS).
    sw_offload,
    /// Call-eventfd writes (interrupts injected into the guest).
    guest_notifications,
    /// 1 once the guest corrupted the ring (avail index jumped); cleared by a device reset.
    ring_broken,
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
}

impl QueueCounters {
    /// Every frame dropped, whatever the reason (the `drop_*` counters).
    pub fn drops(&self) -> u64 {
        self.named()
            .iter()
            .filter(|(n, _)| n.starts_with("drop_"))
            .map(|(_, v)| v)
            .sum()
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

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PmdCounters {
    pub iterations: u64,
    pub busy_cycles: u64,
    pub idle_cycles: u64,
    pub packets: u64,
    pub sleeps: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_defined_once_and_drops_are_the_drop_counters() {
        let s = QueueStats::default();
        s.add(&s.packets, 5);
        s.add(&s.drop_runt, 2);
        s.add_shared(&s.drop_tx_full, 3);
        s.add(&s.sw_offload, 7);
        let c = s.snapshot();
        assert_eq!((c.packets, c.drop_runt, c.drop_tx_full), (5, 2, 3));
        assert_eq!(c.drops(), 5, "sw_offload and packets are not drops");
        let mut t = c;
        t.accumulate(&c);
        assert_eq!(t.drops(), 10);
        let names: Vec<&str> = c.named().iter().map(|(n, _)| *n).collect();
        assert_eq!(names.len(), 16);
        assert_eq!(names.iter().filter(|n| n.starts_with("drop_")).count(), 10);
        let v = serde_json::to_value(c).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 16);
        assert_eq!(v["drop_tx_full"], 3);
    }
}
