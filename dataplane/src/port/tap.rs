//! A kernel tap as the PMDs share it (`TapPort`): control opens its queues; every PMD
//! delivers into it with a `writev` straight from the source buffers, one PMD reads each queue.

use std::sync::Arc;

use crate::dev::tap::{self, Tap, TapIo};
use crate::net::vnet::Frame;
use crate::port::Delivery;
use crate::stats::QueueStats;
use crate::PortId;

pub struct TapPort {
    pub id: PortId,
    /// Every queue is read (the kernel spreads its frames over them) and written (a frame goes
    /// to the queue numbered as the one it came from). The kernel serialises writers, so no
    /// lock: several PMDs may write one queue.
    pub queues: Box<[Tap]>,
    /// Per queue; written by any PMD, hence `add_shared`.
    pub to_port: Box<[Arc<QueueStats>]>,
    pub from_port: Box<[Arc<QueueStats>]>,
}

impl TapPort {
    #[inline]
    pub(crate) fn deliver(&self, f: &Frame) -> Delivery {
        let q = f.queue_among(self.queues.len());
        let (Some(tap), Some(s)) = (self.queues.get(q), self.to_port.get(q)) else {
            return Delivery::NoQueue;
        };
        // A tap takes any virtio-net header written to it (the kernel segments if need be).
        match tap::write_frame(tap.fd(), f) {
            TapIo::Done(n) => {
                s.add_shared(&s.packets, 1);
                s.add_shared(&s.bytes, n as u64);
                return Delivery::Delivered;
            }
            TapIo::WouldBlock => s.add_shared(&s.drop_tx_full, 1),
            TapIo::Error => s.add_shared(&s.drop_tx_error, 1),
        }
        Delivery::Refused
    }
}
