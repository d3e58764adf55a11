//! PMD threads: a pinned, busy-polling loop over the source queues assigned to it (guest TX queues,
//! DPDK RX queues, tap queues), which in the adaptive model sleeps when idle. It switches each frame by destination MAC and copies it straight
//! into the destination (a guest's RX buffers, an mbuf, a tap `writev`), whichever PMD polls the
//! destination's own source queues: destinations are shared (`Port`), each queue behind a lock held
//! for one burst. Control talks to a PMD only through a bounded command queue drained between
//! bursts; each command is acknowledged after the PMD applied it, which is the quiescent point
//! control waits for before it answers GET_VRING_BASE, unmaps memory, moves a source queue to
//! another PMD or tears a port down. Between bursts a PMD holds no destination lock.

mod adaptive;
mod burst;
mod command;
mod forward;
mod handle;
pub mod pipeline;
mod tally;
#[cfg(test)]
mod tests;

pub use handle::{PmdError, PmdHandle};

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use adaptive::Sleep;
use burst::Fwd;
use forward::Fabric;
use handle::Shared;
use pipeline::{hand_off, Role};
use tally::bump;

use crate::cpu::tsc;
use crate::dev::dpdk::MbufBurst;
use crate::dev::tap::TAP_HDR_LEN;
use crate::net::features::NetFeatures;
use crate::net::l2::{MacCache, MacTable};
use crate::port::lock::pmd_holder;
use crate::port::DeliveryScratch;
use crate::virtq::Virtq;
use crate::{PortId, MAX_FRAME, MAX_PORTS};

/// Source queues one PMD can poll.
pub const MAX_SOURCES: usize = 1024;

/// How a PMD spends the time it has nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Model {
    /// Run to completion, busy-polling always (as OVS-DPDK and VPP).
    #[default]
    Rtc,
    /// Busy-poll; after `idle_us` without a frame, ask the guests to kick, sleep on the kick
    /// eventfds (and tap fds), and poll again once one fires. A PMD with a DPDK source queue keeps
    /// polling (the vdevs here have no rx interrupts).
    Adaptive { idle_us: u32 },
    /// The last `tx_pmds` PMDs only switch and deliver; the others poll the source queues and
    /// hand guests' frames over to them (copied, in batches through `ArrayQueue`s).
    Pipeline { tx_pmds: u16 },
}

/// Busy cycles and packets of one source queue: written by the PMD polling it, read by control
/// (`pmd-rxq-show`, the `cycles` assignment, auto-rebalance). Travels with the queue.
#[repr(align(64))]
#[derive(Default, Debug)]
pub struct SourceLoad {
    pub busy_cycles: AtomicU64,
    pub packets: AtomicU64,
}

/// Where a source queue's frames come from.
pub enum Source {
    /// A guest's TX virtqueue, with the features negotiated when it started and the eventfd
    /// the guest kicks (when asked to: only an adaptive PMD about to sleep asks).
    Vhost {
        ring: Box<Virtq>,
        features: NetFeatures,
        kick: Option<File>,
    },
    /// RX queue `queue` of the port's DPDK device.
    Dpdk,
    /// Tap queue `queue` of the port.
    Tap,
}

/// One source queue, as the PMD polling it holds it. Moving it to another PMD moves this value
/// (the ring and its position), so no frame is lost or taken twice.
pub struct SourceQueue {
    pub port: PortId,
    /// Queue pair (vhost-user) or queue number (devices).
    pub queue: u16,
    pub source: Source,
    pub load: Arc<SourceLoad>,
    /// Frames moved by its last burst.
    burst: u32,
}

impl SourceQueue {
    pub fn new(port: PortId, queue: u16, source: Source, load: Arc<SourceLoad>) -> SourceQueue {
        SourceQueue {
            port,
            queue,
            source,
            load,
            burst: 0,
        }
    }
}

/// The PMD's own state; lives on the PMD thread only.
struct Pmd {
    shared: Arc<Shared>,
    /// The source queues it polls (capacity MAX_SOURCES: adding never allocates).
    sources: Vec<SourceQueue>,
    fwd: Fwd,
    /// The thread has a DPDK lcore id (mempool caches); done once the first DPDK port arrives.
    dpdk_registered: bool,
    /// Adaptive model: how it sleeps.
    sleep: Option<Sleep>,
    /// Pipeline model: what it hands over or takes.
    role: Option<Role>,
}

impl Pmd {
    fn new(shared: Arc<Shared>, index: usize, macs: Arc<MacTable>) -> Pmd {
        Pmd {
            shared,
            sources: Vec::with_capacity(MAX_SOURCES),
            fwd: Fwd {
                fabric: Fabric {
                    ports: (0..MAX_PORTS).map(|_| None).collect(),
                    active: Vec::with_capacity(MAX_PORTS),
                    macs,
                    mac_cache: MacCache::new(pmd_holder(index)),
                    dl: DeliveryScratch::new(pmd_holder(index)),
                },
                src: Box::default(),
                mbufs: MbufBurst::default(),
                tap_hdr: [0; TAP_HDR_LEN],
                tap_buf: vec![0u8; MAX_FRAME as usize + 1].into_boxed_slice(),
                seg_cost: 0,
            },
            dpdk_registered: false,
            sleep: None,
            role: None,
        }
    }

    fn run(mut self) {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let mut t = tsc::now();
        while !shared.stop.load(Ordering::Relaxed) {
            // Quiescent point: between bursts, nothing of any ring is held.
            while let Some(cmd) = shared.cmds.pop() {
                self.apply(cmd);
            }
            crate::virtq::call::maintain();
            let (moved, busy) = self.poll_all(&mut t);
            if moved > 0 {
                bump(&stats.busy_cycles, busy);
                bump(&stats.packets, moved as u64);
                if let Some(s) = &mut self.sleep {
                    s.idle_since = 0;
                }
            } else {
                let t1 = tsc::now();
                bump(&stats.idle_cycles, t1.wrapping_sub(t));
                t = t1;
                // Nothing to do: PAUSE gives the pipeline to a sibling hyperthread (often the
                // guest's own vCPU thread) and stops this loop hammering lines the guest writes.
                std::hint::spin_loop();
                if let Some(s) = &mut self.sleep {
                    if s.idle_since == 0 {
                        s.idle_since = t1;
                    } else if t1.wrapping_sub(s.idle_since) > s.after {
                        self.sleep_until_kicked();
                    }
                }
            }
            bump(&stats.iterations, 1);
        }
    }

    /// One pass over every source queue; returns the frames moved and the busy cycles that took.
    /// `t`: the TSC at the start, advanced to the end of the pass if it moved frames.
    ///
    /// The pass's cycles are shared among the queues by the frames each moved: reading the
    /// TSC around every queue's burst costs more (the reads order themselves behind the
    /// burst's cache misses; docs/performance.md, "Hot-path choices").
    #[inline]
    fn poll_all(&mut self, t: &mut u64) -> (usize, u64) {
        let (mut moved, mut busy_queues) = (0, 0);
        for i in 0..self.sources.len() {
            let n = self.poll(i);
            self.sources[i].burst = n as u32;
            if n > 0 {
                moved += n;
                busy_queues += 1;
            }
        }
        if self.role.is_some() {
            moved += self.take_batches();
        }
        if moved == 0 {
            return (0, 0);
        }
        let t1 = tsc::now();
        let busy = t1.wrapping_sub(*t);
        *t = t1;
        for q in self.sources.iter().filter(|q| q.burst > 0) {
            let share = match busy_queues {
                1 => busy,
                // One iteration's cycles times a burst is far from overflowing; a u128
                // division is a call into compiler-rt.
                _ => busy.saturating_mul(q.burst as u64) / moved as u64,
            };
            bump(&q.load.busy_cycles, share);
            bump(&q.load.packets, q.burst as u64);
        }
        (moved, busy)
    }

    /// One burst from source queue `i`; what it delivered is published (and the destination
    /// queues let go) before it returns.
    #[inline]
    fn poll(&mut self, i: usize) -> usize {
        let sq = &mut self.sources[i];
        let (port, queue) = (sq.port, sq.queue);
        let n = match &mut sq.source {
            Source::Vhost { ring, features, .. } if self.role.is_some() => {
                hand_off(&mut self.fwd, &self.role, port, queue, ring, *features)
            }
            Source::Vhost { ring, features, .. } => match &mut **ring {
                Virtq::Split(r) => self.fwd.switch_ring(port, queue, r, *features),
                Virtq::Packed(r) => self.fwd.switch_packed(port, queue, r, *features),
            },
            Source::Dpdk => self.fwd.dpdk_burst(port, queue),
            Source::Tap => self.fwd.tap_burst(port, queue as usize),
        };
        self.fwd.fabric.release_held();
        n
    }
}
