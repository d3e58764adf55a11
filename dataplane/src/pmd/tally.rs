//! What happened to each frame a PMD took (`Verdict`), tallied over a burst and published to
//! the source queue's counters once (`Tally`). PMD threads.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::stats::QueueStats;

/// What happened to one frame taken from a port.
#[derive(Clone, Copy)]
pub(super) enum Verdict {
    Forwarded,
    BadDescriptor,
    Runt,
    TooBig,
    NoDestination,
    Undelivered,
    BadOffload,
}

/// A burst's verdicts, published to the source queue's counters once.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) by_verdict: [u64; 7],
    pub(super) packets: u64,
    pub(super) forwarded_bytes: u64,
}

impl Tally {
    #[inline]
    pub(super) fn count(&mut self, v: Verdict, frame_len: u32) {
        self.packets += 1;
        self.by_verdict[v as usize] += 1;
        if matches!(v, Verdict::Forwarded) {
            self.forwarded_bytes += frame_len as u64;
        }
    }

    /// `publish` for counters two PMDs write (the pipeline's rx and tx PMDs).
    #[inline(never)]
    pub(super) fn publish_shared(&self, s: &QueueStats) {
        self.publish_with(s, QueueStats::add_shared)
    }

    #[inline]
    pub(super) fn publish(&self, s: &QueueStats) {
        self.publish_with(s, QueueStats::add)
    }

    #[inline(always)]
    pub(super) fn publish_with(&self, s: &QueueStats, add: impl Fn(&QueueStats, &AtomicU64, u64)) {
        let c = &self.by_verdict;
        add(s, &s.packets, self.packets);
        add(s, &s.bytes, self.forwarded_bytes);
        add(s, &s.forwarded, c[Verdict::Forwarded as usize]);
        add(
            s,
            &s.drop_bad_descriptor,
            c[Verdict::BadDescriptor as usize],
        );
        add(s, &s.drop_runt, c[Verdict::Runt as usize]);
        add(s, &s.drop_too_big, c[Verdict::TooBig as usize]);
        add(
            s,
            &s.drop_no_destination,
            c[Verdict::NoDestination as usize],
        );
        add(s, &s.drop_undelivered, c[Verdict::Undelivered as usize]);
        add(s, &s.drop_bad_offload, c[Verdict::BadOffload as usize]);
    }
}

/// Single-writer add to a counter control reads.
#[inline]
pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed)
}
