//! Control's handle on one PMD thread (`PmdHandle`): spawning and pinning it, and posting
//! commands it applies between bursts, waiting for each to be applied or withdrawn. Control
//! threads only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use super::adaptive::Sleep;
use super::command::{Command, Reply, Returned};
use super::pipeline::Role;
use super::{Model, Pmd, SourceQueue, MAX_SOURCES};
use crate::dev::epoll::{Waiter, Waker};
use crate::net::features::NetFeatures;
use crate::net::l2::MacTable;
use crate::port::Port;
use crate::stats::PmdStats;
use crate::virtq::Virtq;
use crate::{CoreId, PortId, MAX_PORTS};

/// How long control waits for a PMD to acknowledge a command before calling it stuck.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PmdError {
    #[error("cannot spawn PMD thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot pin PMD thread to core {0}")]
    Pin(usize),
    #[error("PMD on core {0} did not acknowledge a command within {ACK_TIMEOUT:?}")]
    Unresponsive(usize),
    #[error("port id {0} is beyond the switch's {MAX_PORTS} ports")]
    PortId(u16),
    #[error("PMD on core {0} already polls {MAX_SOURCES} source queues")]
    TooManySources(usize),
}

pub(super) struct Shared {
    pub(super) cmds: ArrayQueue<Command>,
    /// Wakes an adaptive PMD that sleeps.
    pub(super) waker: Option<Waker>,
    pub(super) stats: PmdStats,
    /// Set by control to end the loop (Relaxed: nothing else is published with it).
    pub(super) stop: AtomicBool,
}

/// Control's handle on one PMD thread.
pub struct PmdHandle {
    core: CoreId,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Why the PMD has no io_uring notifier (`virtq::call`), if it has none: its guest
    /// notifications are then plain writes, which a hostile frontend can block.
    notifier_error: Option<String>,
}

impl PmdHandle {
    /// Start PMD number `index` pinned to `core`, switching with the shared MAC table.
    /// `role`: its part in the pipeline model.
    pub fn spawn(
        core: CoreId,
        index: usize,
        macs: Arc<MacTable>,
        model: Model,
        role: Option<Role>,
    ) -> Result<PmdHandle, PmdError> {
        let waiter = match model {
            Model::Rtc | Model::Pipeline { .. } => None,
            Model::Adaptive { .. } => Some(Waiter::new().map_err(PmdError::Spawn)?),
        };
        let waker = waiter.as_ref().map(Waiter::waker).transpose();
        let shared = Arc::new(Shared {
            waker: waker.map_err(PmdError::Spawn)?,
            cmds: ArrayQueue::new(64),
            stats: PmdStats::default(),
            stop: AtomicBool::new(false),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("pmd-c{}", core.0))
            .spawn(move || {
                let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: core.0 });
                let notifier = crate::virtq::call::install().err().map(|e| e.to_string());
                let _ = tx.send((pinned, notifier));
                if pinned {
                    let mut pmd = Pmd::new(s, index, macs);
                    pmd.role = role;
                    if let (Model::Adaptive { idle_us }, Some(w)) = (model, waiter) {
                        pmd.sleep = Some(Sleep::new(w, idle_us));
                    }
                    pmd.run();
                }
            })
            .map_err(PmdError::Spawn)?;
        let notifier_error = match rx.recv() {
            Ok((true, e)) => e,
            _ => {
                let _ = thread.join();
                return Err(PmdError::Pin(core.0));
            }
        };
        Ok(PmdHandle {
            core,
            shared,
            thread: Some(thread),
            notifier_error,
        })
    }

    pub fn core(&self) -> CoreId {
        self.core
    }

    /// Why this PMD notifies guests with plain writes (no io_uring), if it does.
    pub fn notifier_error(&self) -> Option<&str> {
        self.notifier_error.as_deref()
    }

    pub fn stats(&self) -> &PmdStats {
        &self.shared.stats
    }

    /// Post a command and wait until the PMD applied it; returns what it handed back. Past
    /// ACK_TIMEOUT a command the PMD has not claimed is withdrawn (and never applied: the
    /// error means nothing happened); one it claimed is waited for, as it is being applied.
    fn call(&self, make: impl FnOnce(Arc<Reply>) -> Command) -> Result<Option<Returned>, PmdError> {
        let reply = Reply::new();
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut cmd = make(reply.clone());
        while let Err(back) = self.shared.cmds.push(cmd) {
            cmd = back;
            if Instant::now() > deadline || self.finished() {
                return Err(PmdError::Unresponsive(self.core.0));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        self.wake();
        while !reply.is_done() {
            if (Instant::now() > deadline || self.finished()) && reply.cancel() {
                return Err(PmdError::Unresponsive(self.core.0));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(reply.returned.pop())
    }

    fn wake(&self) {
        if let Some(w) = &self.shared.waker {
            w.wake();
        }
    }

    fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Make `port` a destination of this PMD.
    pub fn add_port(&self, port: Arc<Port>) -> Result<(), PmdError> {
        if port.id().0 as usize >= MAX_PORTS {
            return Err(PmdError::PortId(port.id().0));
        }
        self.call(|r| Command::AddPort(port, r)).map(drop)
    }

    /// Let go of a port (its source queues must have been removed first).
    pub fn remove_port(&self, port: PortId) -> Result<(), PmdError> {
        self.call(|r| Command::RemovePort(port, r)).map(drop)
    }

    /// Start polling a source queue.
    pub fn add_source(&self, sq: SourceQueue) -> Result<(), PmdError> {
        self.call(|r| Command::AddSource(sq, r)).map(drop)
    }

    /// Stop polling a source queue; returns it once the PMD no longer touches it.
    pub fn remove_source(&self, port: PortId, queue: u16) -> Result<Option<SourceQueue>, PmdError> {
        Ok(
            match self.call(|r| Command::RemoveSource(port, queue, r))? {
                Some(Returned::SourceQueue(q)) => Some(q),
                _ => None,
            },
        )
    }

    /// Install (Some) or detach (None) the ring of guest RX queue `queue` of `port`, between
    /// this PMD's bursts and under the queue's lock (other PMDs may deliver into it). Returns
    /// the ring it replaced, which no PMD touches any more.
    pub fn swap_ring(
        &self,
        port: PortId,
        queue: u16,
        features: NetFeatures,
        ring: Option<Box<Virtq>>,
    ) -> Result<Option<Box<Virtq>>, PmdError> {
        let r = self.call(|reply| Command::SwapRing {
            port,
            queue,
            features,
            ring,
            reply,
        })?;
        Ok(match r {
            Some(Returned::Ring(r)) => Some(r),
            _ => None,
        })
    }
}

impl Drop for PmdHandle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
