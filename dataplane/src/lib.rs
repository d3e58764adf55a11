//! ringswitch dataplane: the hot path. PMD threads (pmd.rs) busy-poll split virtqueues
//! (virtq/) over guest memory (guest_mem.rs), DPDK ports (dpdk.rs) and kernel taps (tap.rs),
//! switch frames with an L2 learning table (l2.rs) and publish counters (stats.rs). No sockets,
//! config parsing or logging inside the burst loop.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod devport;
pub mod dpdk;
pub mod guest_mem;
pub mod l2;
pub mod offload;
pub mod pipeline;
pub mod pmd;
pub mod port;
pub mod sched;
pub mod stats;
pub mod tap;
pub mod tsc;
pub mod txlock;
pub mod virtq;
pub mod waiter;

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

/// A cache prefetch hint (read); never faults, whatever the address.
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    prefetch_hint::<{ HINT_T0 }>(p)
}

/// A prefetch with intent to write (PREFETCHW): takes the line exclusive before the store needs
/// it, instead of loading it shared and upgrading it at the store.
#[inline(always)]
pub(crate) fn prefetch_w(p: *const u8) {
    prefetch_hint::<{ HINT_ET0 }>(p)
}

#[cfg(target_arch = "x86_64")]
const HINT_T0: i32 = std::arch::x86_64::_MM_HINT_T0;
#[cfg(target_arch = "x86_64")]
const HINT_ET0: i32 = std::arch::x86_64::_MM_HINT_ET0;
#[cfg(not(target_arch = "x86_64"))]
const HINT_T0: i32 = 0;
#[cfg(not(target_arch = "x86_64"))]
const HINT_ET0: i32 = 0;

#[inline(always)]
fn prefetch_hint<const HINT: i32>(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCH* are hints that perform no access visible to the program and cannot
    // fault on any address; PREFETCHT0 is x86_64 baseline, and CPUs without PREFETCHW treat it
    // as a NOP.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<HINT>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
