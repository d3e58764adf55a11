//! The gate every vhost-user message passes before the `vhost` crate reads it, on the port's
//! control thread: the whole message must arrive within a deadline (the first one too, after
//! a connect), be no larger than the protocol allows, and carry at most the file descriptors
//! the crate takes. The crate itself, given more fds than it takes (MSG_CTRUNC), closes them,
//! calls it a retry and goes on reading the body as the next header — a message smuggled
//! inside another was answered that way — and it blocks for as long as a frontend leaves a
//! message half sent. Here both close the connection instead.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::MAX_MSG_SIZE;

/// How long a frontend has, once connected, to send its first message.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a message may take to arrive whole once its first byte has.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// File descriptors one message may carry: what the `vhost` crate takes (its
/// MAX_ATTACHED_FD_ENTRIES); a memory table's 8 regions is the most a frontend needs.
pub const MAX_FDS: usize = 32;
/// The most fds one message can carry on Linux (SCM_MAX_FD): room to count them all.
const SCM_MAX_FD: usize = 253;
const HEADER: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frontend disconnected")]
    Disconnected,
    #[error("no message within {0:?} of connecting")]
    Silent(Duration),
    #[error("a message still incomplete after {0:?} ({1} of {2} bytes)")]
    Incomplete(Duration, usize, usize),
    #[error("a message of {0} bytes, more than the protocol's {MAX_MSG_SIZE}")]
    TooLarge(usize),
    #[error("a message with {0} file descriptors (at most {MAX_FDS} are taken)")]
    TooManyFds(usize),
    #[error("a message whose file descriptors could not all be received")]
    Truncated,
    #[error("socket: {0}")]
    Socket(#[source] io::Error),
}

/// The start of the next message (the header, and as much of the body as `head` holds).
pub struct Message {
    pub head: [u8; 20],
    pub len: usize,
}

/// Wait for the next message to be complete in the socket (not read: the crate reads it).
/// `first`: none has come on this connection yet (then silence is bounded too).
pub fn await_message(s: &UnixStream, first: bool) -> Result<Message, FrameError> {
    let fd = s.as_raw_fd();
    let wait = if first {
        Some(FIRST_MESSAGE_TIMEOUT)
    } else {
        None
    };
    if !poll_in(fd, wait)? {
        return Err(FrameError::Silent(FIRST_MESSAGE_TIMEOUT));
    }
    let deadline = Instant::now() + MESSAGE_TIMEOUT;
    let _offset = PeekOffset::enable(fd)?;
    let mut msg = Message {
        head: [0; 20],
        len: 0,
    };
    let mut total = HEADER;
    let mut scratch = [0u8; 512];
    // Not all here yet: look again soon (a sender mid-write is done within microseconds), then
    // less and less often (one that stopped half way waits out the deadline at 1 ms a look).
    let mut nap = Duration::from_micros(20);
    while msg.len < total {
        let want = (total - msg.len).min(scratch.len());
        let Some((n, fds, truncated)) = peek(fd, &mut scratch[..want])? else {
            if Instant::now() > deadline {
                return Err(FrameError::Incomplete(MESSAGE_TIMEOUT, msg.len, total));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
            continue;
        };
        if n == 0 {
            // Hung up, before or in the middle of a message.
            return Err(FrameError::Disconnected);
        }
        if truncated {
            return Err(FrameError::Truncated);
        }
        // Each peek stops after a piece that carries fds, so `fds` are one piece's; the
        // crate's reads make room for MAX_FDS, and more in one piece is the MSG_CTRUNC case.
        // (A piece peeked twice reports its fds twice: that is only counted, not summed.)
        if fds > MAX_FDS {
            return Err(FrameError::TooManyFds(fds));
        }
        let before = msg.len;
        if let Some(room) = msg.head.get_mut(before..) {
            let k = room.len().min(n);
            room[..k].copy_from_slice(&scratch[..k]);
        }
        msg.len += n;
        if before < HEADER && msg.len >= HEADER {
            let size =
                u32::from_le_bytes([msg.head[8], msg.head[9], msg.head[10], msg.head[11]]) as usize;
            if size > MAX_MSG_SIZE {
                return Err(FrameError::TooLarge(size));
            }
            total = HEADER + size;
        }
    }
    Ok(msg)
}

/// poll(2) for input (or hang-up); false if `timeout` passed first.
fn poll_in(fd: RawFd, timeout: Option<Duration>) -> Result<bool, FrameError> {
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(FrameError::Socket(e));
        }
    }
}

/// Peek the next bytes past those already peeked (SO_PEEK_OFF), without waiting: how many (0:
/// the peer hung up), how many fds came with them (closed here: these are copies), and whether
/// fds were lost; None if nothing more is there yet.
fn peek(fd: RawFd, buf: &mut [u8]) -> Result<Option<(usize, usize, bool)>, FrameError> {
    const SPACE: usize = cmsg_space(SCM_MAX_FD * std::mem::size_of::<libc::c_int>());
    let mut cmsg = [0u64; SPACE.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = SPACE as _;
    // SAFETY: msg describes buffers of ours, valid for the call.
    let n = unsafe {
        libc::recvmsg(
            fd,
            &mut msg,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(FrameError::Socket(e)),
        };
    }
    let mut fds = 0;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled, within
    // msg_controllen; each SCM_RIGHTS entry's data holds `(len - CMSG_LEN(0)) / 4` fds, which
    // were installed in our table by the peek and are closed here.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const libc::c_int;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    libc::close(std::ptr::read_unaligned(data.add(i)));
                }
                fds += count;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Some((
        n as usize,
        fds,
        msg.msg_flags & libc::MSG_CTRUNC != 0,
    )))
}

const fn cmsg_space(len: usize) -> usize {
    // CMSG_SPACE: the header (16 bytes on 64-bit Linux) plus the data, aligned to 8.
    std::mem::size_of::<libc::cmsghdr>() + len.next_multiple_of(8)
}

/// SO_PEEK_OFF on for a while: each peek continues where the last one stopped, so a message
/// that arrived in pieces (or whose first piece carried fds, where a peek stops) can be seen
/// whole. Off again (and the offset gone) when dropped, before the crate reads.
struct PeekOffset(RawFd);

impl PeekOffset {
    fn enable(fd: RawFd) -> Result<PeekOffset, FrameError> {
        set_peek_off(fd, 0)?;
        Ok(PeekOffset(fd))
    }
}

impl Drop for PeekOffset {
    fn drop(&mut self) {
        let _ = set_peek_off(self.0, -1);
    }
}

fn set_peek_off(fd: RawFd, off: libc::c_int) -> Result<(), FrameError> {
    // SAFETY: setsockopt with a c_int option value that outlives the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            &off as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(FrameError::Socket(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    fn header(request: u32, size: u32) -> Vec<u8> {
        [request, 1, size]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    #[test]
    fn a_whole_message_passes_and_is_left_for_the_reader() {
        let (mut fe, be) = UnixStream::pair().unwrap();
        let mut m = header(11, 8);
        m.extend([3, 0, 0, 0, 0, 0, 0, 0]);
        fe.write_all(&m).unwrap();
        let got = await_message(&be, true).unwrap();
        assert_eq!(got.len, 20);
        assert_eq!(&got.head[..], &m[..]);
        let mut all = [0u8; 20];
        (&be).read_exact(&mut all).unwrap();
        assert_eq!(&all[..], &m[..], "nothing consumed");
    }

    #[test]
    fn a_message_in_pieces_with_fds_is_seen_whole() {
        let (fe, be) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        fe.send_with_fds(&[&header(5, 8)[..]], &[file.as_raw_fd()])
            .unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            (&fe).write_all(&[1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        });
        assert_eq!(await_message(&be, false).unwrap().len, 20);
        // Nothing consumed: the real reads start at the header.
        let mut all = [0u8; 20];
        (&be).read_exact(&mut all).unwrap();
        assert_eq!(&all[..12], &header(5, 8)[..]);
    }

    /// Found by the fuzzer: a piece arriving after the first 20 bytes.
    #[test]
    fn a_long_message_in_three_pieces_is_seen_whole() {
        let (mut fe, be) = UnixStream::pair().unwrap();
        let mut m = header(5, 100);
        m.resize(112, 7);
        std::thread::spawn(move || {
            for piece in [&m[..16], &m[16..40], &m[40..]] {
                fe.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(200));
        });
        assert_eq!(await_message(&be, false).unwrap().len, 112);
    }

    #[test]
    fn more_fds_than_taken_close_the_connection() {
        let (fe, be) = UnixStream::pair().unwrap();
        let files: Vec<_> = (0..40)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let mut m = header(1, 0); // GET_FEATURES, smuggled
        m.extend(header(1, 0));
        fe.send_with_fds(&[&m[..]], &raw).unwrap();
        assert!(matches!(
            await_message(&be, true),
            Err(FrameError::TooManyFds(40))
        ));
    }

    #[test]
    fn half_a_header_or_silence_times_out() {
        let (mut fe, be) = UnixStream::pair().unwrap();
        fe.write_all(&[1, 0, 0]).unwrap();
        let t = Instant::now();
        assert!(matches!(
            await_message(&be, false),
            Err(FrameError::Incomplete(_, 3, 12))
        ));
        assert!(t.elapsed() >= MESSAGE_TIMEOUT);
        let (_fe, be) = UnixStream::pair().unwrap();
        let t = Instant::now();
        assert!(matches!(
            await_message(&be, true),
            Err(FrameError::Silent(_))
        ));
        assert!(t.elapsed() >= FIRST_MESSAGE_TIMEOUT);
    }

    #[test]
    fn oversized_and_closed_are_refused() {
        let (mut fe, be) = UnixStream::pair().unwrap();
        fe.write_all(&header(5, 0x10_0000)).unwrap();
        assert!(matches!(
            await_message(&be, false),
            Err(FrameError::TooLarge(0x10_0000))
        ));
        drop(fe);
        let (fe, be) = UnixStream::pair().unwrap();
        drop(fe);
        assert!(matches!(
            await_message(&be, false),
            Err(FrameError::Disconnected)
        ));
    }
}
