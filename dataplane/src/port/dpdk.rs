//! A DPDK Ethernet port as the PMDs share it (`DpdkPort`): control builds it around an opened
//! device; every PMD delivers into it (one copy into an mbuf, sent at the end of the burst,
//! through the TX queue of its own number), one PMD polls each RX queue.

use std::sync::Arc;

use crate::dev::dpdk::{EthDev, MbufBurst};
use crate::mem::copy::{gather, PendingCopies};
use crate::net::vnet::Frame;
use crate::port::delivery::{deliver_finished, Delivery, DeliveryScratch};
use crate::port::lock::DestLock;
use crate::stats::QueueStats;
use crate::PortId;

/// The largest frame whose lines `DpdkTxq::push` demotes: a small frame, as for deferred copies.
const DEMOTE_MAX: u32 = PendingCopies::MAX_LEN;

/// One TX queue of a DPDK port, held by a PMD for a burst.
pub struct DpdkTxq {
    queue: u16,
    /// Fresh mbufs from the port's pool, taken in bulk.
    fresh: MbufBurst,
    /// Filled mbufs waiting for the end of the burst, and their bytes.
    pending: MbufBurst,
    pending_bytes: u64,
    stats: Arc<QueueStats>,
}

pub struct DpdkPort {
    pub id: PortId,
    // Field order is drop order: the mbufs go back to their pool before `dev` (which holds the
    // pool) goes.
    /// TX queues: PMD number i sends on queue i modulo their number (its own queue when there
    /// are as many as PMDs; shared, and then contended, when fewer).
    pub tx: Box<[DestLock<DpdkTxq>]>,
    pub dev: EthDev,
    pub rx_queues: u16,
    /// Per RX queue: frames taken from the port.
    pub from_port: Box<[Arc<QueueStats>]>,
}

impl DpdkPort {
    /// `to_port` and `from_port`: counters per TX and per RX queue.
    pub fn new(
        id: PortId,
        dev: EthDev,
        to_port: Vec<Arc<QueueStats>>,
        from_port: Box<[Arc<QueueStats>]>,
    ) -> DpdkPort {
        DpdkPort {
            id,
            tx: to_port
                .into_iter()
                .enumerate()
                .map(|(q, stats)| {
                    DestLock::new(DpdkTxq {
                        queue: q as u16,
                        fresh: MbufBurst::default(),
                        pending: MbufBurst::default(),
                        pending_bytes: 0,
                        stats,
                    })
                })
                .collect(),
            rx_queues: from_port.len() as u16,
            from_port,
            dev,
        }
    }

    /// Copy a frame into a fresh mbuf of the PMD's TX queue, sent when the burst is flushed.
    #[inline]
    pub(crate) fn deliver(&self, f: &Frame, scratch: &mut DeliveryScratch) -> Delivery {
        // No division in the usual case of a queue per PMD (it is on every frame's path).
        let pmd = scratch.pmd_index();
        let q = if pmd < self.tx.len() {
            pmd
        } else {
            pmd % self.tx.len().max(1)
        };
        let Some(lock) = self.tx.get(q) else {
            return Delivery::NoQueue;
        };
        let demote = scratch.demote_sources;
        let Some(txq) = scratch.hold(self.id, q, lock) else {
            return Delivery::Busy;
        };
        if f.vnet.is_none() {
            return txq.push(&self.dev, f, demote);
        }
        let stats = txq.stats.clone();
        deliver_finished(f, scratch, &stats, |frame, _| {
            txq.push(&self.dev, frame, false)
        })
    }
}

impl DpdkTxq {
    /// Copy `f` into an mbuf and queue it; `demote`: then demote the lines it came from, if
    /// a small frame (see `DeliveryScratch::demote_sources`).
    #[inline]
    fn push(&mut self, dev: &EthDev, f: &Frame, demote: bool) -> Delivery {
        let s = &self.stats;
        let Some(mut m) = self.fresh.take(dev.pool()) else {
            s.add(&s.drop_no_mbuf, 1);
            return Delivery::Refused;
        };
        if !m.fill(f.len, |d| {
            gather(f.segs, f.skip, d);
        }) {
            // Larger than an mbuf of this pool holds (the pool is sized for the largest MTU).
            s.add(&s.drop_too_big, 1);
            return Delivery::Refused;
        }
        if demote && f.len <= DEMOTE_MAX {
            f.segs.demote(f.skip, f.len);
        }
        if self.pending.is_full() {
            self.flush(dev.port_id);
        }
        self.pending.push(m);
        self.pending_bytes += f.len as u64;
        Delivery::Delivered
    }

    /// Hand the queued frames to the device; what its TX ring cannot take is freed and counted.
    #[inline]
    pub(crate) fn flush(&mut self, port_id: u16) {
        if self.pending.is_empty() {
            return;
        }
        let queued = self.pending.len();
        let mut bytes = std::mem::take(&mut self.pending_bytes);
        let sent = self.pending.tx(port_id, self.queue);
        if sent < queued {
            bytes -= self.pending.bytes();
            self.pending.free_all();
        }
        let s = &self.stats;
        s.add(&s.packets, sent as u64);
        s.add(&s.bytes, bytes);
        s.add(&s.drop_tx_full, (queued - sent) as u64);
    }
}
