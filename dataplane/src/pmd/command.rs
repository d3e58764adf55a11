//! The command protocol between control and a PMD: control posts a `Command` with a one-shot
//! `Reply`; the PMD applies it between bursts (its quiescent point) and hands back what it
//! replaced (`Returned`), to be dropped on control. Apply runs on the PMD thread.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use super::{Pmd, SourceQueue, MAX_SOURCES};
use crate::net::features::NetFeatures;
use crate::port::Port;
use crate::virtq::Virtq;
use crate::PortId;

/// Something the PMD hands back to control, to be dropped (unmapped, closed) there.
pub enum Returned {
    SourceQueue(SourceQueue),
    Ring(Box<Virtq>),
}

/// A one-shot acknowledgement from the PMD, and the one place where control and the PMD agree
/// on whether a command happened: the PMD claims it (POSTED → TAKEN) before applying it, and
/// control, once it stops waiting, withdraws it (POSTED → CANCELLED) unless the PMD has it. A
/// command is so either applied (and control waits for DONE, which applying reaches without
/// blocking) or never applied (and control knows it failed): never applied after control gave
/// up on it, which once left a queue polled by two PMDs.
pub(super) struct Reply {
    /// POSTED, TAKEN, DONE or CANCELLED. The PMD's Release store of DONE, after it stopped
    /// using what the command replaced, pairs with control's Acquire load, so everything the
    /// PMD did before is visible to control; the claim and the withdrawal are one CAS each on
    /// POSTED, so only one of them wins.
    pub(super) state: AtomicU8,
    pub(super) returned: ArrayQueue<Returned>,
}

pub(super) const POSTED: u8 = 0;
pub(super) const TAKEN: u8 = 1;
pub(super) const DONE: u8 = 2;
pub(super) const CANCELLED: u8 = 3;

impl Reply {
    pub(super) fn new() -> Arc<Reply> {
        Arc::new(Reply {
            state: AtomicU8::new(POSTED),
            returned: ArrayQueue::new(1),
        })
    }

    /// PMD: claim the command; false if control withdrew it.
    pub(super) fn take(&self) -> bool {
        self.state
            .compare_exchange(POSTED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// PMD: applied; what it handed back is in `returned`.
    pub(super) fn done(&self) {
        self.state.store(DONE, Ordering::Release);
    }

    /// Control: withdraw a command the PMD has not claimed; false if it has.
    pub(super) fn cancel(&self) -> bool {
        self.state
            .compare_exchange(POSTED, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub(super) fn is_done(&self) -> bool {
        self.state.load(Ordering::Acquire) == DONE
    }
}

pub(super) enum Command {
    AddPort(Arc<Port>, Arc<Reply>),
    RemovePort(PortId, Arc<Reply>),
    AddSource(SourceQueue, Arc<Reply>),
    RemoveSource(PortId, u16, Arc<Reply>),
    /// Swap the ring of a guest RX queue (a destination every PMD may hold for a burst).
    SwapRing {
        port: PortId,
        queue: u16,
        features: NetFeatures,
        ring: Option<Box<Virtq>>,
        reply: Arc<Reply>,
    },
}

impl Command {
    pub(super) fn reply(&self) -> &Arc<Reply> {
        match self {
            Command::AddPort(_, r)
            | Command::RemovePort(_, r)
            | Command::AddSource(_, r)
            | Command::RemoveSource(_, _, r)
            | Command::SwapRing { reply: r, .. } => r,
        }
    }
}

impl Pmd {
    /// Apply a command control posted, unless control withdrew it first (then what it
    /// carries is dropped here: a ring or port it gave up on).
    #[cold]
    pub(super) fn apply(&mut self, cmd: Command) {
        if cmd.reply().take() {
            self.apply_taken(cmd);
        }
    }

    pub(super) fn apply_taken(&mut self, cmd: Command) {
        let f = &mut self.fwd.fabric;
        let (reply, back) = match cmd {
            Command::AddPort(port, reply) => {
                if matches!(*port, Port::Dpdk(_)) && !self.dpdk_registered {
                    self.dpdk_registered = true;
                    crate::dev::dpdk::register_thread();
                }
                let id = port.id();
                if let Some(slot) = f.ports.get_mut(id.0 as usize) {
                    if slot.is_none() {
                        f.active.push(id);
                    }
                    *slot = Some(port);
                }
                (reply, None)
            }
            Command::RemovePort(id, reply) => {
                f.active.retain(|&p| p != id);
                // Control keeps its own reference: the port is dropped there.
                f.ports.get_mut(id.0 as usize).and_then(Option::take);
                (reply, None)
            }
            Command::AddSource(sq, reply) => {
                let fd = self.wake_fd(&sq);
                if let (Some(s), Some((fd, eventfd))) = (&mut self.sleep, fd) {
                    // A queue it cannot watch would not wake it: then it never sleeps.
                    s.blind |= s.waiter.add(fd, eventfd).is_err();
                }
                // Refused by control beforehand; a full list would allocate here.
                if self.sources.len() < MAX_SOURCES {
                    self.sources.push(sq);
                    (reply, None)
                } else {
                    (reply, Some(Returned::SourceQueue(sq)))
                }
            }
            Command::RemoveSource(port, queue, reply) => {
                let back = self
                    .sources
                    .iter()
                    .position(|q| q.port == port && q.queue == queue)
                    .map(|i| self.sources.remove(i));
                if let (Some(s), Some((fd, _))) =
                    (&self.sleep, back.as_ref().and_then(|q| self.wake_fd(q)))
                {
                    s.waiter.remove(fd);
                }
                (reply, back.map(Returned::SourceQueue))
            }
            Command::SwapRing {
                port,
                queue,
                features,
                ring,
                reply,
            } => {
                let back = match f.ports.get(port.0 as usize).and_then(|p| p.as_deref()) {
                    Some(p) => p.swap_ring(f.dl.me, queue as usize, features, ring),
                    None => ring,
                };
                (reply, back.map(Returned::Ring))
            }
        };
        if let Some(b) = back {
            reply.returned.force_push(b);
        }
        reply.done();
    }
}
