//! How an adaptive PMD sleeps: one epoll set over the kick eventfds of the guest queues it
//! polls, the tap queues it reads, and a wake eventfd control writes after posting a command.
//! Only used when the PMD has been idle past its threshold; never inside a burst.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const MAX_EVENTS: usize = 64;

pub struct Waiter {
    epoll: OwnedFd,
    wake: OwnedFd,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Read (and so reset) our own wake eventfd's counter (non-blocking: nothing to read is fine).
fn drain_wake(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads at most 8 bytes into a local u64; an empty non-blocking fd only returns
    // an error.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

impl Waiter {
    pub fn new() -> io::Result<Waiter> {
        // SAFETY: plain syscalls; each fd is owned at once.
        let epoll =
            unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        // SAFETY: as above.
        let wake = unsafe {
            OwnedFd::from_raw_fd(check(libc::eventfd(
                0,
                libc::EFD_CLOEXEC | libc::EFD_NONBLOCK,
            ))?)
        };
        let w = Waiter { epoll, wake };
        w.watch(w.wake.as_raw_fd(), libc::EPOLLIN as u32)?;
        Ok(w)
    }

    /// Watch `fd` for input; `eventfd`: a frontend's kick eventfd, watched edge-triggered and
    /// never read, for the frontend shares the file and could make a read block (clear
    /// O_NONBLOCK, empty the counter first). Every kick is an edge; the counter is the
    /// frontend's to fill.
    pub fn add(&self, fd: RawFd, eventfd: bool) -> io::Result<()> {
        let events = if eventfd {
            (libc::EPOLLIN | libc::EPOLLET) as u32
        } else {
            libc::EPOLLIN as u32
        };
        self.watch(fd, events)
    }

    fn watch(&self, fd: RawFd, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events,
            u64: fd as u32 as u64,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })
            .map(drop)
    }

    pub fn remove(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL; an fd not in the set is an error
        // we have no use for.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// A handle control can wake the PMD with (a dup of the wake eventfd).
    pub fn waker(&self) -> io::Result<Waker> {
        Ok(Waker(self.wake.try_clone()?))
    }

    /// Sleep until something watched has input or `timeout_ms` passes; returns how many fds
    /// fired. The wake eventfd is reset when it fired.
    pub fn wait(&self, timeout_ms: i32) -> usize {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        // SAFETY: `events` has room for MAX_EVENTS entries.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                MAX_EVENTS as i32,
                timeout_ms,
            )
        };
        let n = n.max(0) as usize;
        let wake = self.wake.as_raw_fd();
        if events[..n].iter().any(|ev| ev.u64 as RawFd == wake) {
            drain_wake(wake);
        }
        n
    }
}

/// Wakes a sleeping PMD (written after every command posted to an adaptive PMD).
pub struct Waker(OwnedFd);

impl Waker {
    pub fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local u64 to an eventfd we own.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn sleeps_until_woken_or_timed_out() {
        let w = Waiter::new().unwrap();
        let t = Instant::now();
        assert_eq!(w.wait(50), 0);
        assert!(t.elapsed() >= Duration::from_millis(40));
        let waker = w.waker().unwrap();
        let t = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                waker.wake();
            });
            assert_eq!(w.wait(5000), 1);
        });
        assert!(t.elapsed() < Duration::from_secs(2));
        // Reset when it fired: the next wait times out again.
        assert_eq!(w.wait(10), 0);
    }
}
