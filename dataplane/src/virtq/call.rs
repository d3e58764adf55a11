//! Guest notifications that never block the PMD: the frontend's call eventfd is written through
//! an io_uring owned by the PMD thread (thread-local), never with a plain `write()`.
//!
//! The frontend owns its call fd: it may hand over a blocking eventfd with its counter at the
//! maximum, or a full pipe, and it shares the open file, so O_NONBLOCK set by us could be
//! cleared by it (we leave its flags alone: the file is the frontend's). A plain write would
//! then stop the PMD in the kernel, and every port with it. Through io_uring the write
//! completes inline when the fd is non-blocking and takes it at once (QEMU's and DPDK's call
//! fds are EFD_NONBLOCK: one `io_uring_enter` where a `write` was); a blocking fd's write is
//! handed to an io-wq worker, which waits there if it must, while the PMD goes on. Each call
//! fd has at most one write in flight: notifications asked for meanwhile collapse into one
//! more write after it completes, so a hostile fd can only stall its own port's notifications. A stuck write whose ring is gone is cancelled, which closes
//! the fd. Writes are submitted together once per PMD loop iteration (`maintain`). Threads
//! without a notifier (tests) write directly.
//!
//! A write through the uring costs more than a plain one (docs/performance.md, "What
//! containing a hostile frontend costs"); only guests that ask for interrupts pay it, and a
//! pass that notifies several queues pays one `io_uring_enter` for all.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

/// No write in flight.
const IDLE: u8 = 0;
/// A write is in flight; it will wake the guest.
const IN_FLIGHT: u8 = 1;
/// A write is in flight, and the guest was asked to be notified after it started: one more
/// write follows its completion.
const PENDING: u8 = 2;

/// Writes in flight one PMD can track (each a different call fd: one per fd at most).
const SLOTS: u32 = 1024;
/// `user_data` of cancel requests (slot indices are below SLOTS).
const CANCEL: u64 = u64::MAX;

/// A guest queue's call eventfd, shared between its ring and the writes in flight for it.
pub struct CallFd(Arc<CallState>);

struct CallState {
    file: File,
    /// IDLE, IN_FLIGHT or PENDING. AcqRel everywhere: the transitions order the guest-visible
    /// publish (before a notify) against the write that follows it.
    state: AtomicU8,
    /// The 8 bytes a write adds to the counter; lives as long as any write of it.
    one: u64,
}

impl CallFd {
    /// Take over the frontend's call fd.
    pub fn new(file: File) -> CallFd {
        CallFd(Arc::new(CallState {
            file,
            state: AtomicU8::new(IDLE),
            one: 1,
        }))
    }

    /// Wake the driver. Returns false if a write already in flight will (nothing submitted).
    #[inline]
    pub fn notify(&self) -> bool {
        let s = &self.0.state;
        loop {
            match s.compare_exchange(IDLE, IN_FLIGHT, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(PENDING) => return false,
                Err(_) => {
                    if s.compare_exchange(IN_FLIGHT, PENDING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        return false;
                    }
                    // It completed meanwhile: start a write of our own.
                }
            }
        }
        NOTIFIER.with(|n| match &mut *n.borrow_mut() {
            Some(n) => n.submit(&self.0),
            None => write_direct(&self.0),
        });
        true
    }

    /// Whether no write is in flight (tests).
    #[cfg(test)]
    fn idle(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == IDLE
    }
}

/// One write, for threads without a notifier (tests; control never notifies): it blocks if
/// the fd does.
#[cold]
fn write_direct(c: &CallState) {
    // SAFETY: writes 8 bytes from a u64 that outlives the call; any error is harmless.
    unsafe {
        libc::write(
            c.file.as_raw_fd(),
            &c.one as *const u64 as *const libc::c_void,
            8,
        )
    };
    c.state.store(IDLE, Ordering::Release);
}

/// A write in flight: the call fd it is for (kept open and its buffer alive until the
/// completion), and whether it has been asked to stop.
struct Slot {
    call: Arc<CallState>,
    cancelled: bool,
}

/// A PMD's io_uring for guest notifications.
struct Notifier {
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    in_use: u32,
    /// Writes pushed since the last submit.
    unsubmitted: u32,
    /// `maintain` calls until the next look for orphaned writes (while any is in flight).
    sweep_in: u32,
}

/// How often (in `maintain` calls, one per PMD loop iteration) stuck writes are looked at.
const SWEEP_EVERY: u32 = 16 * 1024;

thread_local! {
    static NOTIFIER: RefCell<Option<Notifier>> = const { RefCell::new(None) };
}

/// Give the calling thread (a PMD) its notifier. Without one (io_uring unavailable) its
/// notifications are plain writes, which a frontend that clears O_NONBLOCK on its call fd can
/// block: the error says why.
pub fn install() -> io::Result<()> {
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .build(SLOTS)
        .or_else(|_| IoUring::new(SLOTS))?;
    let n = Notifier {
        ring,
        slots: (0..SLOTS).map(|_| None).collect(),
        free: (0..SLOTS).rev().collect(),
        in_use: 0,
        unsubmitted: 0,
        sweep_in: SWEEP_EVERY,
    };
    NOTIFIER.with(|cell| *cell.borrow_mut() = Some(n));
    Ok(())
}

/// Between bursts (once per PMD loop iteration): submit the writes of the pass, take the
/// completions (those the fds took at once, and those that waited), start the writes asked
/// for meanwhile, now and then cancel the stuck writes of rings that are gone. A few loads
/// when nothing is in flight.
#[inline]
pub fn maintain() {
    NOTIFIER.with(|n| {
        if let Some(n) = &mut *n.borrow_mut() {
            if n.in_use > 0 {
                n.maintain();
            }
        }
    });
}

/// Writes of this thread still in flight (tests).
#[cfg(test)]
pub fn in_flight() -> u32 {
    NOTIFIER.with(|n| n.borrow().as_ref().map_or(0, |n| n.in_use))
}

impl Notifier {
    fn submit(&mut self, call: &Arc<CallState>) {
        if self.free.is_empty() {
            // Every slot holds a write in flight: free those of rings that are gone first.
            self.cancel_orphans();
            self.reap();
        }
        let Some(i) = self.free.pop() else {
            // Every slot holds a live stuck write: this notification is not sent.
            call.state.store(IDLE, Ordering::Release);
            return;
        };
        self.slots[i as usize] = Some(Slot {
            call: call.clone(),
            cancelled: false,
        });
        self.in_use += 1;
        self.push_write(i);
    }

    #[inline(never)]
    fn maintain(&mut self) {
        if self.unsubmitted > 0 {
            self.unsubmitted = 0;
            // A write the fd takes at once has completed when this returns.
            let _ = self.ring.submit();
        }
        self.reap();
        if self.unsubmitted > 0 {
            // Writes asked for while others were in flight.
            self.unsubmitted = 0;
            let _ = self.ring.submit();
        }
        self.sweep_in -= 1;
        if self.sweep_in == 0 {
            self.sweep_in = SWEEP_EVERY;
            self.cancel_orphans();
        }
    }

    fn push_write(&mut self, i: u32) {
        let Some(slot) = &self.slots[i as usize] else {
            return;
        };
        let c = &slot.call;
        let sqe = opcode::Write::new(
            types::Fd(c.file.as_raw_fd()),
            &c.one as *const u64 as *const u8,
            8,
        )
        .build()
        .user_data(i as u64);
        // SAFETY: the buffer (`one`) and the fd belong to the CallState the slot keeps alive
        // until this write's completion is reaped.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            // The queue (SLOTS entries) is full of unsubmitted writes and cancels.
            let _ = self.ring.submit();
            // SAFETY: as above.
            let _ = unsafe { self.ring.submission().push(&sqe) };
        }
        self.unsubmitted += 1;
    }

    fn reap(&mut self) {
        let mut done = [0u32; 32];
        loop {
            let mut n = 0;
            for cqe in self.ring.completion() {
                if cqe.user_data() != CANCEL {
                    done[n] = cqe.user_data() as u32;
                    n += 1;
                    if n == done.len() {
                        break;
                    }
                }
            }
            for &i in &done[..n] {
                self.completed(i);
            }
            if n < done.len() {
                return;
            }
        }
    }

    /// The write of slot `i` completed (or failed, or was cancelled): start the one asked for
    /// meanwhile, or free the slot.
    fn completed(&mut self, i: u32) {
        let Some(slot) = self.slots.get_mut(i as usize).and_then(Option::take) else {
            return;
        };
        let s = &slot.call.state;
        // Our write was the one in flight: PENDING → another one, IN_FLIGHT → IDLE. Once IDLE,
        // the state is no longer ours (another PMD may start a write at once), so it is not
        // touched again; a cancelled write's ring is gone, and nobody else holds its state.
        let again = !slot.cancelled
            && loop {
                match s.compare_exchange(PENDING, IN_FLIGHT, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break true,
                    Err(IN_FLIGHT) => {
                        if s.compare_exchange(IN_FLIGHT, IDLE, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                        {
                            break false;
                        }
                    }
                    Err(_) => break false,
                }
            };
        if again {
            self.slots[i as usize] = Some(slot);
            self.push_write(i);
        } else {
            if slot.cancelled {
                s.store(IDLE, Ordering::Release);
            }
            self.in_use -= 1;
            self.free.push(i);
        }
    }

    /// A write still waiting for a ring nobody holds any more (the slot holds the last
    /// reference): cancel it, so its fd is closed.
    #[cold]
    fn cancel_orphans(&mut self) {
        let mut any = false;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(s) = slot else { continue };
            if s.cancelled || Arc::strong_count(&s.call) > 1 {
                continue;
            }
            s.cancelled = true;
            let sqe = opcode::AsyncCancel::new(i as u64).build().user_data(CANCEL);
            // SAFETY: a cancel refers to no memory of ours.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                let _ = self.ring.submit();
                s.cancelled = false; // next sweep
            }
            any = true;
        }
        if any {
            let _ = self.ring.submit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::time::{Duration, Instant};

    /// A blocking eventfd: the kind a hostile frontend hands over.
    fn blocking_eventfd() -> File {
        // SAFETY: a fresh fd, owned at once.
        unsafe { File::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) }
    }

    fn counter(f: &File) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local.
        let n = unsafe { libc::read(f.as_raw_fd(), &mut v as *mut u64 as *mut _, 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    /// Run `f` on a thread of its own with a notifier, as on a PMD.
    fn on_pmd_thread(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(|| {
            install().unwrap();
            f()
        })
        .join()
        .unwrap();
    }

    /// An eventfd's largest count: one more and a write blocks.
    const MAX: u64 = 0xffff_ffff_ffff_fffe;

    /// The hostile case: a blocking eventfd at its maximum, taken over as a call fd. Returns
    /// the call fd and the frontend's copy.
    fn hostile_call() -> (CallFd, File) {
        let f = blocking_eventfd();
        let hostile = f.try_clone().unwrap();
        let call = CallFd::new(f);
        // SAFETY: writes 8 bytes from a constant.
        let n = unsafe { libc::write(hostile.as_raw_fd(), &MAX as *const u64 as *const _, 8) };
        assert_eq!(n, 8);
        (call, hostile)
    }

    /// QEMU's and DPDK's call fds are non-blocking: the write completes inline.
    #[test]
    fn notifies_through_the_uring() {
        on_pmd_thread(|| {
            // SAFETY: a fresh fd, owned at once.
            let f = unsafe {
                File::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))
            };
            let reader = f.try_clone().unwrap();
            let call = CallFd::new(f);
            for _ in 0..3 {
                assert!(call.notify());
                maintain();
                assert!(call.idle(), "a non-blocking fd completes the write inline");
            }
            assert_eq!(counter(&reader), 3);
            assert_eq!(in_flight(), 0);
        });
    }

    /// A blocking fd that takes the write: it lands (by way of an io-wq worker).
    #[test]
    fn a_blocking_eventfd_is_notified_too() {
        on_pmd_thread(|| {
            let f = blocking_eventfd();
            let reader = f.try_clone().unwrap();
            let call = CallFd::new(f);
            assert!(call.notify());
            let t = Instant::now();
            while !call.idle() {
                maintain();
                assert!(t.elapsed() < Duration::from_secs(5), "write never landed");
                std::thread::yield_now();
            }
            assert_eq!(counter(&reader), 1);
        });
    }

    /// A blocking eventfd whose counter is at its maximum: a plain write would block forever. The notify returns at once; later ones collapse into
    /// one; once the guest reads the counter the write lands, and the one asked for after it.
    #[test]
    fn a_full_blocking_eventfd_never_blocks_the_caller() {
        on_pmd_thread(|| {
            let (call, hostile) = hostile_call();
            let t = Instant::now();
            assert!(call.notify());
            assert!(!call.notify(), "collapsed into the write in flight");
            assert!(!call.notify());
            maintain();
            assert!(t.elapsed() < Duration::from_secs(1));
            assert_eq!(in_flight(), 1);
            // The guest drains its counter: the waiting write lands, then the pending one.
            assert_eq!(counter(&hostile), MAX);
            let t = Instant::now();
            while !call.idle() {
                maintain();
                assert!(t.elapsed() < Duration::from_secs(5), "write never landed");
                std::thread::yield_now();
            }
            assert_eq!(counter(&hostile), 2);
            assert_eq!(in_flight(), 0);
        });
    }

    /// A write stuck on a fd whose ring was dropped is cancelled: nothing stays open.
    #[test]
    fn a_stuck_write_of_a_dropped_ring_is_cancelled() {
        on_pmd_thread(|| {
            let (call, hostile) = hostile_call();
            let weak = Arc::downgrade(&call.0);
            call.notify();
            maintain();
            drop(call);
            let t = Instant::now();
            while in_flight() > 0 {
                NOTIFIER.with(|n| n.borrow_mut().as_mut().unwrap().cancel_orphans());
                maintain();
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "stuck write not cancelled"
                );
                std::thread::yield_now();
            }
            assert!(weak.upgrade().is_none(), "the call fd is closed");
            assert_eq!(counter(&hostile), MAX, "the cancelled write never landed");
        });
    }

    #[test]
    fn without_a_notifier_writes_directly() {
        let f = blocking_eventfd();
        let reader = f.try_clone().unwrap();
        let call = CallFd::new(f);
        assert!(call.notify());
        assert!(call.idle());
        assert_eq!(counter(&reader), 1);
    }
}
