//! The vhost-user backend as a hostile frontend sees it: arbitrary bytes, cut into sends that
//! carry 0–7 fds, or 40 (more than a message may), of one kind per send — memfds, eventfds
//! (plain, or blocking with the counter at its maximum, as a call fd that would block a plain
//! write), the ends of a pipe whose buffer is full, /dev/null — fed to the same connection
//! handler the switch runs, with the frontend's side shut once all is sent. Whatever arrives,
//! the handler must return (close the connection) without panicking (a hang is reported by
//! libFuzzer's -timeout), and the device must come back to a clean state that a well-behaved
//! frontend could use.
#![no_main]

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use control::vhost_user::VhostUserDevice;
use dataplane::{Dataplane, PortId, QueueStats, VhostPort};
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

/// One fd of kind `kind` (0..=7), as a hostile frontend might pass it for anything.
fn hostile_fd(kind: u8) -> std::fs::File {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let eventfd = |flags| {
        // SAFETY: eventfd(2); owned by the File at once.
        unsafe { std::fs::File::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC | flags)) }
    };
    let pipe = |end: usize| {
        let mut p = [0; 2];
        // SAFETY: pipe2(2) into a local array; both ends are owned below.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh fds, each owned once.
        let (r, w) = unsafe {
            (
                std::fs::File::from_raw_fd(p[0]),
                std::fs::File::from_raw_fd(p[1]),
            )
        };
        // Fill the pipe: a blocking write to it would now wait forever.
        // SAFETY: fcntl on an fd of ours.
        unsafe { libc::fcntl(p[1], libc::F_SETFL, libc::O_NONBLOCK) };
        while (&w).write(&[0u8; 4096]).is_ok() {}
        // SAFETY: as above: back to blocking.
        unsafe { libc::fcntl(p[1], libc::F_SETFL, 0) };
        if end == 0 {
            r
        } else {
            w
        }
    };
    match kind {
        0 | 1 => ringswitch_fuzz::memfd(0x10000),
        2 => eventfd(0),
        3 => eventfd(libc::EFD_NONBLOCK),
        4 => {
            let f = eventfd(0);
            (&f).write_all(&0xffff_ffff_ffff_fffeu64.to_ne_bytes())
                .expect("fill eventfd");
            f
        }
        5 => pipe(0),
        6 => pipe(1),
        _ => std::fs::File::open("/dev/null").expect("/dev/null"),
    }
}

/// Send `bytes` with `nfds` fresh fds of `kind` attached (SCM_RIGHTS), without waiting; false
/// if the socket's buffer is full (many tiny records), when the rest is not sent.
fn send_with_fds(s: &UnixStream, bytes: &[u8], nfds: usize, kind: u8) -> bool {
    let files: Vec<_> = (0..nfds).map(|_| hostile_fd(kind)).collect();
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
    // SAFETY: s is a connected socket and msg is fully initialised. A failed send (too many
    // fds in flight, say) is fine: the handler's reaction is what is under test.
    let r = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    r >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
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

    // Records: [head][length, u16 LE][bytes…], sent one sendmsg each. The head's low 3 bits
    // are the fd count, bit 6 makes it 40 (more than the backend takes), bits 3..=5 the kind
    // (`hostile_fd`; memfds for 0 and 1, so the old seeds keep their meaning).
    let mut records = Vec::new();
    let mut rest = data;
    while let [head, lo, hi, tail @ ..] = rest {
        let n = (u16::from_le_bytes([*lo, *hi]) as usize).min(tail.len());
        let nfds = if *head & 0x40 != 0 {
            40
        } else {
            (*head & 7) as usize
        };
        records.push((nfds, (*head >> 3) & 7, tail[..n].to_vec()));
        rest = &tail[n..];
    }
    // Everything is sent before the handler runs (no sender thread: that cost three quarters
    // of the run), as far as the socket's buffer takes it, then the frontend's side is shut.
    for (nfds, kind, bytes) in &records {
        if !send_with_fds(&frontend, bytes, *nfds, *kind) {
            break;
        }
    }
    let _ = frontend.shutdown(std::net::Shutdown::Write);
    control::vhost_user::serve_connection("fuzz", backend, &dev, &AtomicBool::new(false));
    // The replies, if any, are not looked at.
    let mut sink = Vec::new();
    let _ = (&frontend).read_to_end(&mut sink);
    // After the connection, nothing of it may remain running on the PMD.
    assert!(dev.lock().expect("device").is_idle());
});
