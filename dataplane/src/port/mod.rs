//! Ports as the PMDs share them (`Port`): the side frames are delivered into, each destination
//! queue behind a `DestLock` (lock.rs) a PMD holds for a burst, dispatched here to its kind: a
//! guest's RX queues (vhost.rs), a DPDK port (dpdk.rs), a tap (tap.rs). How one delivery goes
//! and what a PMD holds meanwhile: delivery.rs. The source side (a PMD's source queues) is pmd/.

pub mod delivery;
pub mod dpdk;
pub mod lock;
pub mod tap;
pub mod vhost;

pub use delivery::{Delivery, DeliveryScratch};
use dpdk::DpdkPort;
use lock::Holder;
use tap::TapPort;
pub use vhost::{GuestRxq, VhostPort};

use crate::net::features::NetFeatures;
use crate::net::vnet::Frame;
use crate::stats::QueueStats;
use crate::virtq::Virtq;
use crate::PortId;

/// A port as every PMD holds it (shared, `Arc`): what frames are delivered into. Built by
/// control, handed to every PMD, handed back to control for teardown once all let go.
pub enum Port {
    Vhost(VhostPort),
    Dpdk(DpdkPort),
    Tap(TapPort),
}

impl Port {
    pub fn id(&self) -> PortId {
        match self {
            Port::Vhost(p) => p.id,
            Port::Dpdk(p) => p.id,
            Port::Tap(p) => p.id,
        }
    }

    /// Mark the destination queues only one of `n_pmds` PMDs delivers into: every queue when
    /// there is one PMD; a DPDK TX queue when there is one per PMD (PMD i sends on queue i).
    /// (`usize::MAX`: none, every queue is locked.)
    pub fn set_exclusive(&mut self, n_pmds: usize) {
        match self {
            Port::Vhost(p) => p.rx.iter_mut().for_each(|l| l.set_exclusive(n_pmds == 1)),
            Port::Dpdk(p) => {
                let own = p.tx.len() >= n_pmds;
                p.tx.iter_mut().for_each(|l| l.set_exclusive(own))
            }
            Port::Tap(_) => {}
        }
    }

    /// Swap guest RX queue `q`'s ring, between bursts, as PMD `me`; returns the old one.
    pub fn swap_ring(
        &self,
        me: Holder,
        q: usize,
        features: NetFeatures,
        ring: Option<Box<Virtq>>,
    ) -> Option<Box<Virtq>> {
        let Port::Vhost(p) = self else {
            return ring;
        };
        let Some(lock) = p.rx.get(q) else {
            return ring;
        };
        lock.with(me, |rxq| {
            rxq.features = features;
            std::mem::replace(&mut rxq.ring, ring)
        })
    }

    /// Offer a frame. A destination queue another PMD holds gives `Busy` (the caller lets go
    /// of what it holds and tries again); one taken here stays held, listed in
    /// `scratch.held`, until the caller flushes it. A frame whose offloads the port does not
    /// take is finished in software first (net/offload.rs).
    #[inline]
    pub fn deliver(&self, f: &Frame, scratch: &mut DeliveryScratch) -> Delivery {
        match self {
            Port::Vhost(p) => p.deliver(f, scratch),
            Port::Dpdk(p) => p.deliver(f, scratch),
            Port::Tap(p) => p.deliver(f),
        }
    }

    /// Publish what was delivered into queue `q` and let go of it.
    ///
    /// # Safety
    /// The caller's PMD holds queue `q` (it is in its `held` list) and no reference into it
    /// is alive.
    #[inline]
    pub unsafe fn flush_and_release(&self, q: usize) {
        match self {
            Port::Vhost(p) => {
                let l = &p.rx[q];
                // SAFETY: held, per the contract.
                if let Some(r) = unsafe { l.get() }.ring.as_mut() {
                    r.flush();
                }
                l.release();
            }
            Port::Dpdk(p) => {
                let l = &p.tx[q];
                // SAFETY: held, per the contract.
                unsafe { l.get() }.flush(p.dev.port_id);
                l.release();
            }
            Port::Tap(_) => {}
        }
    }

    /// The source side's counters of queue `q`, for device ports (a guest's are in its rings).
    pub fn from_port(&self, q: usize) -> Option<&QueueStats> {
        match self {
            Port::Vhost(_) => None,
            Port::Dpdk(p) => p.from_port.get(q).map(|s| &**s),
            Port::Tap(p) => p.from_port.get(q).map(|s| &**s),
        }
    }
}
