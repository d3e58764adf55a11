//! The switch's file-descriptor budget: what each port may cost, the reserve kept for
//! control, and raising the process limit at start. Control threads.

use super::PortInfo;
use crate::config::{PortConfig, PortKind};

/// File descriptors kept out of every port's budget: control (its clients, logs), DPDK and
/// the PMDs' own (epoll, io_uring) need them whatever the frontends do.
pub const FD_RESERVE: u64 = 256;

/// The most file descriptors a port can make the switch hold: per vhost-user virtqueue its
/// kick and call eventfds and the copies its ring and PMD hold (3.5 a virtqueue measured with
/// 128 of them), plus a memory table of 8 regions, a dirty log and the connection; a tap's
/// queues; a DPDK port's few.
pub fn fd_budget(pc: &PortConfig) -> u64 {
    let q = pc.queues as u64;
    match pc.kind {
        PortKind::VhostUser { .. } => 2 * q * 4 + 16,
        PortKind::Tap { .. } => q + 4,
        PortKind::Dpdk { .. } => 8,
    }
}

/// Refuse a port whose budget the fd limit cannot cover beside the running ports' and the
/// reserve: a frontend must never leave control (or a good guest) without fds.
pub(super) fn check_fd_budget(list: &[PortInfo], pc: &PortConfig) -> anyhow::Result<()> {
    let limit = fd_limit();
    let used: u64 = list.iter().map(|p| fd_budget(&p.config)).sum();
    let need = fd_budget(pc);
    let room = limit.saturating_sub(FD_RESERVE);
    if used + need > room {
        anyhow::bail!(
            "needs up to {need} file descriptors, and the switch's limit of {limit} \
             (RLIMIT_NOFILE) leaves {} beside the {used} the running ports may hold and {FD_RESERVE} \
             kept for control: raise the limit (LimitNOFILE=, ulimit -Hn) or give it fewer queues",
            room.saturating_sub(used)
        );
    }
    Ok(())
}

/// The soft RLIMIT_NOFILE (raised to the hard one at start, see `raise_fd_limit`).
pub(super) fn fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    r.rlim_cur
}

/// Raise the soft fd limit to the hard one (1024 is the usual soft limit; a 128-queue port
/// alone needs more); returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a struct of ours.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
    fd_limit()
}
