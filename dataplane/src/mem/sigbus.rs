//! A frontend that shrinks the file behind its guest memory or dirty log after we mapped it
//! (`ftruncate` of a memfd or of a hugetlbfs file) makes our next access to the mapping raise
//! SIGBUS, which would kill the switch with every port. Mappings of frontend files are
//! registered here; a SIGBUS inside one, on whatever thread, replaces that whole mapping with
//! anonymous zero memory (as Wayland compositors do for clients' shm pools), so the access
//! completes, and marks the mapping faulted. Control's watcher (`faulted_owners`) then closes
//! the frontend's connection, which unmaps it. A SIGBUS anywhere else goes to the handler that
//! was there before (Rust's stack-overflow handler, or the default action).
//!
//! The handler runs on any thread, inside any access: it only reads the slot table (atomics),
//! calls `mmap` (a system call, as async-signal-safe as `write`) and stores two atomics.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Mappings that can be watched at once: 256 ports of 8 regions and a log each, and more.
const SLOTS: usize = 4096;

struct Slot {
    /// Start of the mapping, 0 when the slot is free. Written last on registration (Release)
    /// and first on removal; the handler's Acquire load pairs with it.
    start: AtomicUsize,
    len: AtomicUsize,
    /// Who the mapping belongs to (a port id): what control closes when it faulted.
    owner: AtomicU32,
    /// Set by the handler (Release); read by `faulted_owners` and `Guard::faulted` (Acquire).
    faulted: AtomicBool,
    /// Claimed by a `Guard` (Acquire/Release on claim and release).
    taken: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    owner: AtomicU32::new(0),
    faulted: AtomicBool::new(false),
    taken: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
static INSTALL: Once = Once::new();
/// The SIGBUS action before ours, chained to for faults outside our mappings. Set once,
/// before our handler is installed (a OnceLock's `get` is one atomic load: fine in a handler).
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A registered mapping; dropping it unregisters it (before the mapping is unmapped: keep the
/// guard in a field declared before the mapping's owner).
pub struct Guard(Option<usize>);

impl Guard {
    /// Watch `[ptr, ptr + len)`, a mapping of a file a frontend (`owner`) can shrink. With every
    /// slot taken the mapping is not watched.
    pub fn register(ptr: *const u8, len: usize, owner: u32) -> Guard {
        INSTALL.call_once(install);
        if len == 0 {
            return Guard(None);
        }
        let slot = TABLE.iter().position(|s| {
            s.taken
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        });
        if let Some(i) = slot {
            let s = &TABLE[i];
            s.len.store(len, Ordering::Relaxed);
            s.owner.store(owner, Ordering::Relaxed);
            s.faulted.store(false, Ordering::Relaxed);
            s.start.store(ptr as usize, Ordering::Release);
        }
        Guard(slot)
    }

    /// The frontend shrank the file: the mapping is anonymous zero memory now.
    pub fn faulted(&self) -> bool {
        self.0
            .is_some_and(|i| TABLE[i].faulted.load(Ordering::Acquire))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            let s = &TABLE[i];
            s.start.store(0, Ordering::Release);
            s.taken.store(false, Ordering::Release);
        }
    }
}

/// The owners of mappings that faulted and are still mapped (control closes their
/// connections; once they are unmapped they are not listed any more).
pub fn faulted_owners() -> Vec<u32> {
    let mut owners: Vec<u32> = TABLE
        .iter()
        .filter(|s| s.start.load(Ordering::Acquire) != 0 && s.faulted.load(Ordering::Acquire))
        .map(|s| s.owner.load(Ordering::Relaxed))
        .collect();
    owners.sort_unstable();
    owners.dedup();
    owners
}

fn install() {
    // SAFETY: a zeroed sigaction is a valid value to fill in; `on_sigbus` has the signature
    // SA_SIGINFO handlers need; PREVIOUS is set before the handler that reads it can run.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old);
        let _ = PREVIOUS.set(old);
        libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut());
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in TABLE.iter() {
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Relaxed);
        if start == 0 || addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: [start, start + len) is a mapping of ours (registered, not yet unmapped: the
        // guard is dropped before it is); replacing it with anonymous memory of the same size
        // keeps every pointer into it valid.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            s.faulted.store(true, Ordering::Release);
            return;
        }
        break;
    }
    // Not ours (or not repairable): what was there before.
    // SAFETY: calling the previous SA_SIGINFO handler with our arguments is what the kernel
    // would have done; otherwise the previous action is restored and the faulting access,
    // repeated on return, meets it.
    unsafe {
        match PREVIOUS.get() {
            Some(p)
                if p.sa_flags & libc::SA_SIGINFO != 0
                    && p.sa_sigaction != libc::SIG_DFL
                    && p.sa_sigaction != libc::SIG_IGN =>
            {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(p.sa_sigaction);
                f(sig, info, ctx);
            }
            Some(p) => {
                libc::sigaction(libc::SIGBUS, p, std::ptr::null_mut());
            }
            None => {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::table::test_mem::memfd;
    use crate::mem::table::{DirtyLog, MemTable, RegionDesc};

    #[test]
    fn a_shrunk_memory_file_faults_its_mapping_not_the_process() {
        let file = memfd(0x10_0000);
        let keep = file.try_clone().unwrap();
        let regions = [RegionDesc {
            guest_phys_addr: 0,
            size: 0x10_0000,
            user_addr: 0x7000_0000,
            mmap_offset: 0,
        }];
        let mem = MemTable::map_for(&regions, vec![file], 7).unwrap();
        let p = mem.gpa_to_host(0x8000, 8).unwrap();
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_volatile(p, 0xab) };
        assert!(!mem.faulted());
        keep.set_len(0).unwrap();
        // SAFETY: inside the mapping; the file behind it is gone, so this raises SIGBUS.
        let v = unsafe { std::ptr::read_volatile(p) };
        assert_eq!(v, 0, "anonymous zero memory now");
        // SAFETY: as above; writes land in the anonymous memory.
        unsafe { std::ptr::write_volatile(p, 1) };
        assert!(mem.faulted());
        assert!(faulted_owners().contains(&7));
        drop(mem);
        assert!(
            !faulted_owners().contains(&7),
            "unregistered with its table"
        );
    }

    #[test]
    fn a_shrunk_log_file_faults_its_mapping_not_the_process() {
        let file = memfd(0x1000);
        let keep = file.try_clone().unwrap();
        let log = DirtyLog::map_for(file, 0x1000, 0, 9).unwrap();
        log.mark(0, 1);
        keep.set_len(0).unwrap();
        log.mark(0x10_0000, 1);
        assert!(log.faulted());
        assert!(faulted_owners().contains(&9));
    }
}
