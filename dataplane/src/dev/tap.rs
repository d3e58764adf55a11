//! Kernel tap devices, the fallback port when DPDK has none to offer. Control opens the device
//! (`Tap::open`); the PMD reads and writes it non-blocking, one frame per call, writing straight
//! from guest buffers (`writev`). The tap carries a 12-byte virtio-net header on every frame
//! (IFF_VNET_HDR) and has checksum and TCP segmentation offload on (TUNSETOFFLOAD): the kernel
//! hands over 64 KiB TCP segments with their checksum left to do, as a guest's driver would, and
//! takes them the same way. This is one of the few places a PMD makes system calls.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::net::vnet::{Frame, VNET_HDR_LEN};

/// The virtio-net header length the tap is set to (VERSION_1 layout, num_buffers included).
pub const TAP_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} must be 1..=15 bytes with no NUL or '/'")]
    BadName(String),
    #[error("open /dev/net/tun")]
    Open(#[source] io::Error),
    #[error("create tap {name} (TUNSETIFF)")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: set virtio-net header size or offloads")]
    VnetHdr {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: set link up")]
    LinkUp {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF and SIOC[GS]IFFLAGS use it: the name, then a short of flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
}

/// One queue of a tap device. Dropping the last queue of a non-persistent tap removes it.
pub struct Tap {
    fd: OwnedFd,
    pub name: String,
}

impl Tap {
    /// Create (or attach to) tap `name`, non-blocking, with a 12-byte virtio-net header, and set
    /// its link up.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/']) {
            return Err(TapError::BadName(name.into()));
        }
        let path = c"/dev/net/tun";
        // SAFETY: a valid C path; the returned fd (if any) is owned below.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(TapError::Open(io::Error::last_os_error()));
        }
        // SAFETY: raw is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new(name);
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE)
            as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is, laid out as the kernel's.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Create {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let hdr: libc::c_int = TAP_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(TapError::VnetHdr {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
        // SAFETY: TUNSETOFFLOAD takes its flags as the argument itself (an unsigned int).
        if unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                offloads as libc::c_ulong,
            )
        } < 0
        {
            return Err(TapError::VnetHdr {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        // The kernel may have picked another name (a `%d` pattern): use what it says.
        let got = CStr::from_bytes_until_nul(&req.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| name.into());
        let tap = Tap { fd, name: got };
        tap.set_up().map_err(|source| TapError::LinkUp {
            name: tap.name.clone(),
            source,
        })?;
        Ok(tap)
    }

    fn set_up(&self) -> io::Result<()> {
        // SAFETY: a plain datagram socket for interface ioctls, owned below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: s is a fresh fd.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let mut req = IfReq::new(&self.name);
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq.
        unsafe {
            if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
                return Err(io::Error::last_os_error());
            }
            req.flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// What one non-blocking tap call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapIo {
    /// A frame of this many bytes (without the virtio-net header) was read or written.
    Done(u32),
    /// Nothing to read, or no room in the device's queue (EAGAIN).
    WouldBlock,
    /// The kernel refused: link down (EIO), bad frame (EINVAL), …
    Error,
}

/// Read one frame into `buf` (its virtio-net header into `hdr`).
#[inline]
pub fn read_frame(fd: RawFd, hdr: &mut [u8; TAP_HDR_LEN], buf: &mut [u8]) -> TapIo {
    let iov = [
        libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: TAP_HDR_LEN,
        },
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        },
    ];
    // SAFETY: both iovecs point at memory we own mutably, of the stated lengths.
    let n = unsafe { libc::readv(fd, iov.as_ptr(), 2) };
    match n {
        n if n >= TAP_HDR_LEN as isize => TapIo::Done((n as usize - TAP_HDR_LEN) as u32),
        n if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) => {
            TapIo::WouldBlock
        }
        _ => TapIo::Error,
    }
}

/// Write one frame with its virtio-net header, straight from the source buffers (guest memory,
/// an mbuf).
#[inline]
pub fn write_frame(fd: RawFd, f: &Frame) -> TapIo {
    let mut hdr = [0u8; TAP_HDR_LEN];
    hdr[..VNET_HDR_LEN].copy_from_slice(&f.vnet.bytes());
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; crate::mem::seg::MAX_SEGS + 1];
    iov[0] = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: TAP_HDR_LEN,
    };
    let mut n = 1;
    let mut len = 0u32;
    for piece in f.segs.pieces(f.skip, f.len) {
        iov[n] = libc::iovec {
            iov_base: piece.ptr().cast(),
            iov_len: piece.len() as usize,
        };
        len += piece.len();
        n += 1;
    }
    // SAFETY: every iovec points into readable memory: the header, or pieces of segments that
    // were bounds-checked against mapped guest memory (or an mbuf we own) for their full length.
    let r = unsafe { libc::writev(fd, iov.as_ptr(), n as libc::c_int) };
    match r {
        r if r >= 0 => TapIo::Done(len),
        _ if io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) => TapIo::WouldBlock,
        _ => TapIo::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::seg::SegList;
    use crate::net::vnet::VnetHdr;

    /// Two queues of one tap device: what one writes as the "outside" is not looped back, so
    /// check the kernel's view instead: a written frame counts as received by the interface.
    #[test]
    fn open_write_and_count() {
        let name = format!("rs-t{}", std::process::id() % 100_000);
        let tap = Tap::open(&name).unwrap();
        assert_eq!(tap.name, name);
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_ne!(flags & libc::IFF_UP as u32, 0, "link set up");
        let rx_before = rx_packets(&name);
        let mut frame = vec![0xffu8; 6];
        frame.extend([2, 0, 0, 0, 0, 1, 0x88, 0xb5]);
        frame.resize(60, 0xab);
        // Split over two segments, with 4 bytes to skip in front (as a guest's header would be).
        let mut a = vec![9u8; 4];
        a.extend(&frame[..20]);
        let mut bufs = [a, frame[20..].to_vec()];
        let src = SegList::over(&mut bufs);
        let f = Frame {
            segs: &src,
            skip: 4,
            len: 60,
            vnet: VnetHdr::NONE,
            queue: 0,
        };
        assert_eq!(write_frame(tap.fd(), &f), TapIo::Done(60));
        assert_eq!(rx_packets(&name), rx_before + 1);
        // Nothing was sent by the kernel towards us yet (no addresses): a read would block.
        let mut hdr = [0u8; TAP_HDR_LEN];
        let mut buf = vec![0u8; 2048];
        let r = read_frame(tap.fd(), &mut hdr, &mut buf);
        assert!(matches!(r, TapIo::WouldBlock | TapIo::Done(_)), "{r:?}");
        assert!(matches!(Tap::open("x/y"), Err(TapError::BadName(_))));
    }

    fn rx_packets(name: &str) -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/rx_packets"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}
