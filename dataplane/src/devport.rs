//! Ports backed by a device rather than a guest: a DPDK Ethernet port (`EthPortRt`) and a kernel
//! tap (`TapPortRt`), as their PMD holds them. Control builds them around an opened device and
//! moves them into the PMD; the PMD hands them back for closing. Delivery into them runs on the
//! PMD: one copy into an mbuf (DPDK), or a `writev` straight from the source buffers (tap).

use std::sync::Arc;

use crate::dpdk::{EthDev, MbufBurst};
use crate::offload::Frame;
use crate::port::Delivery;
use crate::stats::QueueStats;
use crate::tap::{self, Tap, TapIo};
use crate::virtq::copy::gather;
use crate::PortId;

pub struct EthPortRt {
    pub id: PortId,
    // Field order is drop order: the mbufs go back to their pool before `dev` (which holds the
    // pool) goes.
    /// Fresh mbufs from the port's pool, taken in bulk.
    fresh: MbufBurst,
    /// Filled mbufs waiting for the end of the burst.
    pending: MbufBurst,
    pub dev: EthDev,
    /// RX queues this PMD polls.
    pub rx_queues: u16,
    /// The TX queue this PMD sends on.
    pub tx_queue: u16,
    /// Listed in `RxScratch::dirty`: `pending` is not empty.
    pub dirty: bool,
    /// Frames sent into the port (its TX side).
    pub to_port: Arc<QueueStats>,
    /// Per RX queue: frames taken from the port.
    pub from_port: Box<[Arc<QueueStats>]>,
}

impl EthPortRt {
    pub fn new(
        id: PortId,
        dev: EthDev,
        rx_queues: u16,
        tx_queue: u16,
        to_port: Arc<QueueStats>,
        from_port: Box<[Arc<QueueStats>]>,
    ) -> Box<EthPortRt> {
        Box::new(EthPortRt {
            id,
            dev,
            rx_queues,
            tx_queue,
            fresh: MbufBurst::default(),
            pending: MbufBurst::default(),
            dirty: false,
            to_port,
            from_port,
        })
    }

    /// Copy a complete frame into a fresh mbuf and queue it for `flush`. The port is listed in
    /// `dirty` the first time it gets a frame after a flush.
    #[inline]
    pub fn deliver(&mut self, f: &Frame, dirty: &mut Vec<PortId>) -> Delivery {
        let s = &self.to_port;
        let Some(mut m) = self.fresh.take(self.dev.pool()) else {
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
        if self.pending.is_full() {
            self.flush();
        }
        self.pending.push(m);
        if !self.dirty {
            self.dirty = true;
            dirty.push(self.id);
        }
        Delivery::Delivered
    }

    /// Hand the queued frames to the device; what its TX ring cannot take is freed and counted.
    #[inline]
    pub fn flush(&mut self) {
        self.dirty = false;
        if self.pending.is_empty() {
            return;
        }
        let queued = self.pending.len();
        let mut bytes = self.pending.bytes();
        let sent = self.pending.tx(self.dev.port_id, self.tx_queue);
        if sent < queued {
            bytes -= self.pending.bytes();
            self.pending.free_all();
        }
        let s = &self.to_port;
        s.add(&s.packets, sent as u64);
        s.add(&s.bytes, bytes);
        s.add(&s.drop_tx_full, (queued - sent) as u64);
    }
}

pub struct TapPortRt {
    pub id: PortId,
    /// Every queue is read (the kernel spreads its frames over them) and written (a frame goes
    /// to the queue numbered as the one it came from).
    pub queues: Box<[Tap]>,
    pub to_port: Arc<QueueStats>,
    pub from_port: Box<[Arc<QueueStats>]>,
}

impl TapPortRt {
    #[inline]
    pub fn deliver(&mut self, f: &Frame) -> Delivery {
        let s = &self.to_port;
        let Some(q) = self.queues.get(f.queue_among(self.queues.len())) else {
            return Delivery::NoQueue;
        };
        match tap::write_frame(q.fd(), f) {
            TapIo::Done(n) => {
                s.add(&s.packets, 1);
                s.add(&s.bytes, n as u64);
                return Delivery::Delivered;
            }
            TapIo::WouldBlock => s.add(&s.drop_tx_full, 1),
            TapIo::Error => s.add(&s.drop_tx_error, 1),
        }
        Delivery::Refused
    }
}
