//! ringswitch dataplane: the hot path, one room per job (docs/architecture.md). PMD threads
//! (pmd/) busy-poll source queues — guests' TX virtqueues (virtq/) over guest memory (mem/),
//! DPDK and tap devices (dev/) — switch frames with an L2 learning table (net/) into
//! destinations (port/), and publish counters (stats.rs); sched/ is the PMDs as one switch,
//! from control's side. No sockets, config parsing or logging inside the burst loop. This
//! file is the facade: the modules are private, and what control needs is re-exported here.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod cpu;
mod dev;
mod mem;
mod net;
mod pmd;
mod port;
mod sched;
mod stats;
mod virtq;

// The facade: what control (and the perf tools) build the switch from. Everything else is
// the dataplane's own.
pub use cpu::tsc;
pub use cpu::{prefetch, prefetch_w};
pub use dev::tap::Tap;
pub use mem::sigbus::faulted_owners;
pub use mem::table::{DirtyLog, MemError, MemTable, RegionDesc};
pub use net::features::NetFeatures;
pub use net::vnet::OffloadCaps;
pub use pmd::{Model, PmdError, Source};
pub use port::{dpdk::DpdkPort, tap::TapPort, Port, VhostPort};
pub use sched::{Assign, AutoLb, Dataplane, Move, PinError, PmdInfo, SourceQueueInfo};
pub use stats::{PmdCounters, QueueCounters, QueueStats};
pub use virtq::{split::RingAddrs, PackedRing, RingError, SplitRing, Virtq};

/// DPDK as control opens it: the EAL, mbuf pools, Ethernet devices and their link state.
pub mod dpdk {
    pub use crate::dev::dpdk::{
        device_name, eal_init, hw_drops, link, DpdkError, EthConfig, EthDev, Link, Mempool,
    };
}

/// The pieces the fuzz targets drive directly, below the switch: ring walks, delivery into a
/// guest's RX queue, the offload parser and software finishing. Not for control.
pub mod harness {
    pub use crate::mem::copy::gather;
    pub use crate::mem::seg::{Seg, SegList};
    pub use crate::net::offload::{finish, SoftScratch};
    pub use crate::net::vnet::{Frame, VnetHdr, MIN_GSO_SIZE, VNET_HDR_LEN};
    pub use crate::port::lock::pmd_holder;
    pub use crate::port::{Delivery, DeliveryScratch, GuestRxq};
    pub use crate::virtq::call::{install as install_notifier, maintain as maintain_notifier};
    #[cfg(fuzzing)]
    pub use crate::virtq::DESC_READS;
    pub use crate::virtq::{VirtQueue, MAX_CHAIN_DESCS};
}

/// Ports the switch can hold; ids are dense indices below this.
pub const MAX_PORTS: usize = 256;

/// Frames per burst, as DPDK and OVS use.
pub const BURST: usize = 32;

/// Largest frame (without virtio-net header) the switch carries: a TCP segment for TSO (IP's
/// 64 KiB) behind an Ethernet header and one VLAN tag.
pub const MAX_FRAME: u32 = 65535 + 18;

/// Index of a port in the switch (dense, assigned by control).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u16);

/// Index of a virtqueue within a vhost-user device (even: guest RX, odd: guest TX).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueueIdx(pub u16);

impl QueueIdx {
    /// The guest's receive queues are the even ones: the switch writes frames into them.
    pub fn is_guest_rx(self) -> bool {
        self.0.is_multiple_of(2)
    }
    pub fn pair(self) -> u16 {
        self.0 / 2
    }
}

/// A CPU to pin a PMD to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreId(pub usize);
