//! A destination queue several PMDs may deliver into (a guest RX ring, a DPDK TX queue), behind
//! a spinlock a PMD holds for one burst: taken at the burst's first frame for that queue,
//! released when the burst is flushed. Uncontended, that is one locked instruction per queue
//! and burst (measured: no cost that shows); when PMDs do share a queue (fewer queues than
//! PMDs), the loser waits for at most one burst. A ring is swapped by a PMD between its bursts
//! (`with`), holding the same lock: the holder is the only one touching the queue.
//!
//! A queue only one PMD ever delivers into (one PMD in all; a DPDK TX queue per PMD) is
//! `exclusive`: its holder word is then set and cleared with plain stores, a flag that says
//! "delivered into since the last flush", and only that PMD swaps its ring.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Who holds a lock: a PMD (its index + 1).
pub type Holder = u32;
const FREE: Holder = 0;

/// The holder of PMD number `index`.
pub fn pmd_holder(index: usize) -> Holder {
    index as Holder + 1
}

#[repr(align(64))]
pub struct DestLock<T> {
    holder: AtomicU32,
    exclusive: bool,
    inner: UnsafeCell<T>,
}

// SAFETY: `inner` is reached only through `get` by the current holder (or through `&mut self`),
// and the Acquire/Release pair on `holder` orders one holder's accesses before the next one's.
unsafe impl<T: Send> Sync for DestLock<T> {}

impl<T> DestLock<T> {
    pub fn new(v: T) -> Self {
        DestLock {
            holder: AtomicU32::new(FREE),
            exclusive: false,
            inner: UnsafeCell::new(v),
        }
    }

    /// Only one PMD will ever hold it (set before the PMDs see it).
    pub fn set_exclusive(&mut self, exclusive: bool) {
        self.exclusive = exclusive;
    }

    /// Take the lock for `who` if it is free (an exclusive one always is).
    #[inline]
    pub fn try_hold(&self, who: Holder) -> bool {
        if self.exclusive {
            self.holder.store(who, Ordering::Relaxed);
            return true;
        }
        self.holder
            .compare_exchange(FREE, who, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// `who` holds it (only `who` can have stored its own id, so Relaxed suffices).
    #[inline]
    pub fn held_by(&self, who: Holder) -> bool {
        self.holder.load(Ordering::Relaxed) == who
    }

    /// # Safety
    /// The caller holds the lock (`try_hold` returned true, no `release` since) and has no
    /// other reference from `get` alive.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get(&self) -> &mut T {
        // SAFETY: per the contract, the caller is the single holder and this is the only
        // reference into `inner`.
        unsafe { &mut *self.inner.get() }
    }

    /// Let go; everything done under the lock is visible to the next holder.
    #[inline]
    pub fn release(&self) {
        self.holder.store(FREE, Ordering::Release);
    }

    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }

    /// Access between bursts, as `who`: waits (sleeping) until no other PMD holds the queue,
    /// then runs `f` on it. For an exclusive queue, only its PMD may call this.
    pub fn with<R>(&self, who: Holder, f: impl FnOnce(&mut T) -> R) -> R {
        while !self.try_hold(who) {
            std::thread::sleep(Duration::from_micros(20));
        }
        // SAFETY: held just above; the reference does not outlive `f`.
        let r = f(unsafe { self.get() });
        self.release();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn holders_exclude_each_other() {
        let l = DestLock::new(0u64);
        assert!(l.try_hold(pmd_holder(0)));
        assert!(l.held_by(pmd_holder(0)));
        assert!(!l.try_hold(pmd_holder(1)));
        l.release();
        assert!(l.try_hold(pmd_holder(1)));
        l.release();
    }

    #[test]
    fn increments_under_the_lock_are_not_lost() {
        let l = Arc::new(DestLock::new(0u64));
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..100_000 {
                        while !l.try_hold(pmd_holder(i)) {
                            std::hint::spin_loop();
                        }
                        // SAFETY: held.
                        unsafe { *l.get() += 1 };
                        l.release();
                    }
                })
            })
            .collect();
        for _ in 0..1000 {
            l.with(pmd_holder(2), |v| *v += 1);
        }
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(l.with(pmd_holder(2), |v| *v), 201_000);
    }
}
