//! The adaptive model's sleeping: after an idle stretch a PMD asks its guests for kicks and
//! sleeps on their kick eventfds, its taps' fds and control's wake fd (dev/epoll.rs). PMD
//! thread; never inside a burst.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use super::tally::bump;
use super::{Pmd, Source, SourceQueue};
use crate::cpu::tsc;
use crate::dev::epoll::Waiter;
use crate::port::Port;

/// An adaptive PMD's sleeping: what it waits on, and since when it has been idle.
pub(super) struct Sleep {
    pub(super) waiter: Waiter,
    /// Idle cycles before sleeping.
    pub(super) after: u64,
    /// TSC when the current idle stretch began (0: not idle).
    pub(super) idle_since: u64,
    /// A queue's fd could not be watched: sleeping could miss its frames.
    pub(super) blind: bool,
}

/// Longest sleep: the loop then checks its stop flag and publishes counters.
const SLEEP_MAX_MS: i32 = 100;

impl Sleep {
    pub(super) fn new(waiter: Waiter, idle_us: u32) -> Sleep {
        Sleep {
            waiter,
            after: tsc::hz() / 1_000_000 * idle_us as u64,
            idle_since: 0,
            blind: false,
        }
    }
}

impl Pmd {
    /// Adaptive model: ask every guest queue for kicks, and unless frames or commands already
    /// wait, sleep until a kick, a tap's input, a command or the timeout. Then back to polling.
    #[cold]
    pub(super) fn sleep_until_kicked(&mut self) {
        let Some(s) = &mut self.sleep else {
            return;
        };
        s.idle_since = 0;
        if s.blind
            || self
                .sources
                .iter()
                .any(|q| matches!(q.source, Source::Dpdk))
        {
            return;
        }
        let mut waiting = false;
        for q in self.sources.iter_mut() {
            if let Source::Vhost { ring, .. } = &mut q.source {
                waiting |= ring.set_kicks(true);
            }
        }
        if !waiting && self.shared.cmds.is_empty() && !self.shared.stop.load(Ordering::Relaxed) {
            bump(&self.shared.stats.sleeps, 1);
            s.waiter.wait(SLEEP_MAX_MS);
        }
        for q in self.sources.iter_mut() {
            if let Source::Vhost { ring, .. } = &mut q.source {
                ring.set_kicks(false);
            }
        }
    }

    /// The fd that says source queue `q` has input (a guest's kick eventfd, a tap queue's fd),
    /// and whether it is an eventfd.
    pub(super) fn wake_fd(&self, q: &SourceQueue) -> Option<(RawFd, bool)> {
        match &q.source {
            Source::Vhost { kick, .. } => kick.as_ref().map(|k| (k.as_raw_fd(), true)),
            Source::Tap => match self.fwd.fabric.port(q.port) {
                Some(Port::Tap(p)) => p.queues.get(q.queue as usize).map(|t| (t.fd(), false)),
                _ => None,
            },
            Source::Dpdk => None,
        }
    }
}
