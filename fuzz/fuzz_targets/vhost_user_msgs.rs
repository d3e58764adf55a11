//! The vhost-user backend as a hostile frontend sees it: arbitrary bytes, cut into sends that
//! carry 0–8 memory fds, fed to the same connection handler the switch runs. Whatever arrives,
//! the handler must return (close the connection) without panicking, and the device must come
//! back to a clean state that a well-behaved frontend could use.
#![no_main]

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use control::vhost_user::VhostUserDevice;
use dataplane::port::VhostPort;
use dataplane::sched::Dataplane;
use dataplane::stats::QueueStats;
use dataplane::PortId;
use libfuzzer_sys::fuzz_target;

const QUEUE_PAIRS: usize = 2;

/// One PMD for the whole run, on the last CPU, holding port 0.
fn pmd() -> Arc<Dataplane> {
    static PMD: OnceLock<Arc<Dataplane>> = OnceLock::new();
    PMD.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let dp = Dataplane::start(&[cores - 1], Default::default(), Default::default(), None)
            .expect("PMD");
        dp.add_port(VhostPort::port(PortId(0), QUEUE_PAIRS), &[])
            .expect("port");
        Arc::new(dp)
    })
    .clone()
}

/// Send `bytes` with `nfds` fresh 64 KiB memfds attached (SCM_RIGHTS).
fn send_with_fds(s: &UnixStream, bytes: &[u8], nfds: usize) {
    let files: Vec<_> = (0..nfds).map(|_| ringswitch_fuzz::memfd(0x10000)).collect();
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
    let mut cbuf = vec![0u8; space.max(1)];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr() as *mut _;
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` bytes, enough for one header carrying the fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut i32, fds.len());
        }
    }
    // SAFETY: s is a connected socket and msg is fully initialised. A failed send (the backend
    // already closed) is fine: the handler's reaction is what is under test.
    unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
}

fuzz_target!(|data: &[u8]| {
    let pmd = pmd();
    let stats = (0..QUEUE_PAIRS * 2)
        .map(|_| Arc::new(QueueStats::default()))
        .collect();
    let dev = Arc::new(Mutex::new(VhostUserDevice::new(
        "fuzz".into(),
        PortId(0),
        pmd,
        stats,
    )));
    let (frontend, backend) = UnixStream::pair().expect("socketpair");

    // Records: [fd count (low 3 bits)][length, u16 LE][bytes…], sent one sendmsg each.
    let mut records = Vec::new();
    let mut rest = data;
    while let [head, lo, hi, tail @ ..] = rest {
        let n = (u16::from_le_bytes([*lo, *hi]) as usize).min(tail.len());
        records.push(((*head & 7) as usize, tail[..n].to_vec()));
        rest = &tail[n..];
    }
    let peer = std::thread::spawn(move || {
        for (nfds, bytes) in &records {
            send_with_fds(&frontend, bytes, *nfds);
        }
        let _ = frontend.shutdown(std::net::Shutdown::Write);
        // Swallow replies until the backend hangs up.
        let mut sink = Vec::new();
        let _ = (&frontend).read_to_end(&mut sink);
    });
    control::switch::serve_connection("fuzz", backend, &dev, &AtomicBool::new(false));
    peer.join().expect("frontend thread");
    // After the connection, nothing of it may remain running on the PMD.
    assert!(dev.lock().expect("device").is_idle());
});
