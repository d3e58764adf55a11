//! Switching one frame: the MAC table's answer, then delivery into that port or a flood to
//! every other, letting go of every destination queue held whenever another PMD holds one it
//! needs (two PMDs never wait on each other). `Fabric` is a PMD's view of every port. PMD
//! threads.

use std::sync::Arc;

use super::tally::Verdict;
use crate::mem::copy::head_words;
use crate::net::l2::{header_keys, MacCache, MacTable};
use crate::net::vnet::Frame;
use crate::port::{Delivery, DeliveryScratch, Port};
use crate::{PortId, MAX_FRAME};

/// Every port, as destinations, and the MAC table: what forwarding needs, apart from the
/// source frame.
pub(super) struct Fabric {
    /// Indexed by PortId.
    pub(super) ports: Vec<Option<Arc<Port>>>,
    /// Ids of the ports present, in flooding order (capacity MAX_PORTS: never allocates).
    pub(super) active: Vec<PortId>,
    pub(super) macs: Arc<MacTable>,
    pub(super) mac_cache: MacCache,
    pub(super) dl: DeliveryScratch,
}

impl Fabric {
    #[inline]
    pub(super) fn port(&self, id: PortId) -> Option<&Port> {
        self.ports.get(id.0 as usize)?.as_deref()
    }

    /// Publish what the last burst delivered and let go of the destination queues: the
    /// sooner a guest sees its frames, the sooner it refills and sends.
    #[inline]
    pub(super) fn release_held(&mut self) {
        release_held(&self.ports, &mut self.dl)
    }

    /// Run the copies put off, then publish and let go of the guests' queues held; device
    /// queues stay held.
    #[inline]
    pub(super) fn release_held_guests(&mut self) {
        self.dl.copies.run();
        let ports = &self.ports;
        self.dl
            .held
            .retain(|&(id, q)| match ports[id.0 as usize].as_deref() {
                Some(p @ Port::Vhost(_)) => {
                    // SAFETY: listed in `held`, so this PMD holds the queue; the copies into it
                    // ran and no reference from the burst's deliveries is alive any more.
                    unsafe { p.flush_and_release(q as usize) };
                    false
                }
                _ => true,
            });
    }

    /// Switch one frame that arrived on port `src`.
    #[inline(always)]
    pub(super) fn forward(&mut self, src: PortId, f: &Frame) -> Verdict {
        if f.len < 14 {
            return Verdict::Runt;
        }
        if f.len > MAX_FRAME {
            return Verdict::TooBig;
        }
        let (w0, w4) = head_words(f.segs, f.skip);
        let (dst_mac, src_mac) = header_keys(w0, w4);
        if let Some(dst) = self.macs.switch(&mut self.mac_cache, dst_mac, src_mac, src) {
            if dst == src {
                return Verdict::NoDestination;
            }
            let Some(port) = self.ports.get(dst.0 as usize).and_then(|p| p.as_deref()) else {
                return Verdict::NoDestination;
            };
            return match deliver(&self.ports, &mut self.dl, port, f) {
                Delivery::Delivered => Verdict::Forwarded,
                Delivery::NoQueue | Delivery::Busy => Verdict::NoDestination,
                Delivery::Refused => Verdict::Undelivered,
                Delivery::BadOffload => Verdict::BadOffload,
            };
        }
        // Broadcast, multicast and unknown unicast: flood to every other port.
        let (mut delivered, mut refused, mut bad) = (false, false, false);
        for i in 0..self.active.len() {
            let id = self.active[i];
            if id == src {
                continue;
            }
            let Some(port) = self.ports[id.0 as usize].as_deref() else {
                continue;
            };
            match deliver(&self.ports, &mut self.dl, port, f) {
                Delivery::Delivered => delivered = true,
                Delivery::Refused => refused = true,
                Delivery::BadOffload => bad = true,
                Delivery::NoQueue | Delivery::Busy => {}
            }
        }
        match (delivered, bad, refused) {
            (true, _, _) => Verdict::Forwarded,
            (false, true, _) => Verdict::BadOffload,
            (false, false, true) => Verdict::Undelivered,
            (false, false, false) => Verdict::NoDestination,
        }
    }
}

/// Run the copies put off, publish what was delivered into the queues `rx` holds, and let
/// go of them.
#[inline]
fn release_held(ports: &[Option<Arc<Port>>], dl: &mut DeliveryScratch) {
    dl.copies.run();
    for (id, q) in dl.held.drain(..) {
        if let Some(p) = ports[id.0 as usize].as_deref() {
            // SAFETY: listed in `held`, so this PMD holds the queue; no reference from the
            // burst's deliveries is alive any more.
            unsafe { p.flush_and_release(q as usize) };
        }
    }
}

/// Offer a frame to `port`; when another PMD holds the queue it needs, let go of everything
/// this one holds (so two PMDs never wait on each other) and try again.
#[inline]
fn deliver(
    ports: &[Option<Arc<Port>>],
    dl: &mut DeliveryScratch,
    port: &Port,
    f: &Frame,
) -> Delivery {
    loop {
        match port.deliver(f, dl) {
            Delivery::Busy => wait_busy(ports, dl),
            d => return d,
        }
    }
}

#[cold]
fn wait_busy(ports: &[Option<Arc<Port>>], dl: &mut DeliveryScratch) {
    release_held(ports, dl);
    std::hint::spin_loop();
}
