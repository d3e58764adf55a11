//! A vhost-user frontend written in Rust — a "guest" without a VM: guest memory in one memfd,
//! split rings laid out and driven by us, and the handshake through rust-vmm `vhost`'s frontend
//! side. It plays well-behaved or hostile guests against any vhost-user backend (the
//! hostile-guest test; the traffic tool builds on it). Runs on the caller's thread.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};
use virtio_bindings::{virtio_config, virtio_net, virtio_ring};

use anyhow::{ensure, Context};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << virtio_net::VIRTIO_NET_F_MRG_RXBUF;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;
pub const VIRTQ_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
pub const VIRTQ_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
pub const VIRTQ_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// An anonymous memory file of `size` bytes, as a frontend passes for its guest memory.
pub fn memfd(size: u64) -> std::io::Result<File> {
    let name = CString::new("ringswitch-frontend").unwrap_or_default();
    // SAFETY: memfd_create with a valid C string; the result is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size)?;
    Ok(f)
}

/// Guest memory: one memfd mapped shared; guest-physical address = offset in the file.
pub struct GuestMemory {
    file: File,
    ptr: *mut u8,
    size: usize,
}

impl GuestMemory {
    pub fn new(size: usize) -> anyhow::Result<GuestMemory> {
        GuestMemory::on_file(memfd(size as u64).context("memfd")?, size)
    }

    /// Guest memory in `file` (sized to `size` here): a hugetlbfs file, say.
    pub fn on_file(file: File, size: usize) -> anyhow::Result<GuestMemory> {
        file.set_len(size as u64)
            .context("size guest memory file")?;
        // SAFETY: maps the whole file we just sized; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        ensure!(ptr != libc::MAP_FAILED, "mmap guest memory");
        Ok(GuestMemory {
            file,
            ptr: ptr.cast(),
            size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// The file behind the memory (a hostile frontend may shrink it under the backend).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Our virtual address of `gpa` (what SET_VRING_ADDR carries).
    pub fn uva(&self, gpa: u64) -> u64 {
        self.ptr as u64 + gpa
    }

    #[inline]
    fn at(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(
            gpa as usize + len <= self.size,
            "gpa {gpa:#x}+{len} outside guest memory"
        );
        // SAFETY: just checked to lie inside the mapping.
        unsafe { self.ptr.add(gpa as usize) }
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        // SAFETY: `at` checked the range; the backend may read it concurrently, as a real
        // guest's memory is read: bytes, no references kept.
        unsafe { std::ptr::copy(bytes.as_ptr(), self.at(gpa, bytes.len()), bytes.len()) }
    }

    /// `write` of a fixed-size piece: a few inline stores, no call (per-frame use).
    #[inline]
    pub fn write_array<const N: usize>(&self, gpa: u64, bytes: &[u8; N]) {
        // SAFETY: as in `write`.
        unsafe { std::ptr::write_unaligned(self.at(gpa, N) as *mut [u8; N], *bytes) }
    }

    /// `read_into` of a fixed-size piece, as `write_array`.
    #[inline]
    pub fn read_array<const N: usize>(&self, gpa: u64) -> [u8; N] {
        // SAFETY: as in `write`.
        unsafe { std::ptr::read_unaligned(self.at(gpa, N) as *const [u8; N]) }
    }

    /// Start loading the line of `gpa` (the backend wrote it on its own core).
    #[inline]
    pub fn prefetch(&self, gpa: u64) {
        dataplane::prefetch(self.at(gpa, 1));
    }

    /// Start taking the line of `gpa` for writing (the backend last read it on its own core).
    #[inline]
    pub fn prefetch_w(&self, gpa: u64) {
        dataplane::prefetch_w(self.at(gpa, 1));
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.read_into(gpa, &mut v);
        v
    }

    /// Fill `buf` from `gpa` (no allocation: for per-frame use).
    pub fn read_into(&self, gpa: u64, buf: &mut [u8]) {
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy(self.at(gpa, buf.len()), buf.as_mut_ptr(), buf.len()) };
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        // SAFETY: checked range; volatile because the backend reads it concurrently.
        unsafe { std::ptr::write_volatile(self.at(gpa, 2) as *mut u16, v) }
    }

    pub fn read_u16(&self, gpa: u64) -> u16 {
        // SAFETY: checked range; volatile because the backend writes it concurrently.
        unsafe { std::ptr::read_volatile(self.at(gpa, 2) as *const u16) }
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        // SAFETY: as in `read_u16`.
        unsafe { std::ptr::read_volatile(self.at(gpa, 4) as *const u32) }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; nothing refers to it after drop.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

/// One split virtqueue in guest memory, driven from the guest's side.
pub struct DriverRing {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Our next avail index (published in `publish`).
    pub avail_idx: u16,
}

impl DriverRing {
    /// Lay a ring of `size` entries out at `base` (page-aligned parts, as virtio-pci does).
    /// Returns the ring and the first free address after it.
    pub fn at(base: u64, size: u16) -> (DriverRing, u64) {
        assert!(
            size.is_power_of_two(),
            "split rings have a power-of-two size"
        );
        let n = size as u64;
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4096);
        let end = (used + 6 + 8 * n).next_multiple_of(4096);
        (
            DriverRing {
                size,
                desc,
                avail,
                used,
                avail_idx: 0,
            },
            end,
        )
    }

    pub fn set_desc(&self, mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(mem, self.desc, i & (self.size - 1), addr, len, flags, next);
    }

    /// Make chain `head` available without publishing it yet (see `set_avail_idx`).
    pub fn queue(&mut self, mem: &GuestMemory, head: u16) {
        let slot = (self.avail_idx & (self.size - 1)) as u64;
        mem.write_u16(self.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Make chain `head` available and publish the new index (release, as a guest's wmb).
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        self.queue(mem, head);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Write `avail.idx` as is: a hostile guest may jump it anywhere.
    pub fn set_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        fence(Ordering::Release);
        mem.write_u16(self.avail + 2, idx);
    }

    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        let idx = mem.read_u16(self.used + 2);
        fence(Ordering::Acquire);
        idx
    }

    /// The backend's `avail_event` (EVENT_IDX: it wants a kick once the avail index passes it).
    pub fn avail_event(&self, mem: &GuestMemory) -> u16 {
        mem.read_u16(self.used + 4 + 8 * self.size as u64)
    }

    /// (id, len) of used entry `i`.
    pub fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * (i & (self.size - 1)) as u64;
        (mem.read_u32(at), mem.read_u32(at + 4))
    }
}

/// Write descriptor `i` of the table at `table` (a ring's, or an indirect one).
pub fn write_desc(
    mem: &GuestMemory,
    table: u64,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write(table + 16 * i as u64, &d);
}

/// A connected vhost-user device: the frontend end of the socket and its rings' eventfds.
pub struct Device {
    pub frontend: Frontend,
    pub kicks: Vec<EventFd>,
    pub calls: Vec<EventFd>,
    /// The virtio features acked.
    pub features: u64,
}

impl Device {
    /// Connect to a backend listening on `socket` (its server mode) and run the handshake.
    pub fn connect(
        socket: &Path,
        mem: &GuestMemory,
        rings: &[&DriverRing],
    ) -> anyhow::Result<Device> {
        Device::connect_with(socket, mem, rings, 0)
    }

    /// As `connect`, also asking for the features in `extra` (those the backend offers).
    pub fn connect_with(
        socket: &Path,
        mem: &GuestMemory,
        rings: &[&DriverRing],
        extra: u64,
    ) -> anyhow::Result<Device> {
        let fe = Frontend::connect(socket, rings.len() as u64)
            .with_context(|| format!("connect to {}", socket.display()))?;
        Device::handshake(fe, mem, rings, extra)
    }

    /// Wait up to `timeout` for a backend to connect to us (its client mode), then run the
    /// handshake.
    pub fn accept(
        listener: &UnixListener,
        timeout: Duration,
        mem: &GuestMemory,
        rings: &[&DriverRing],
    ) -> anyhow::Result<Device> {
        listener.set_nonblocking(true)?;
        let start = Instant::now();
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ensure!(
                        start.elapsed() < timeout,
                        "no backend connected within {timeout:?}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        Device::handshake(
            Frontend::from_stream(stream, rings.len() as u64),
            mem,
            rings,
            0,
        )
    }

    /// The handshake a guest driver's frontend runs: features (VERSION_1, MRG_RXBUF and
    /// `extra` if offered), protocol features, the memory table (one region), then every
    /// ring's size, addresses, base (its used index: everything before it is done), kick, call
    /// and enable.
    fn handshake(
        mut fe: Frontend,
        mem: &GuestMemory,
        rings: &[&DriverRing],
        extra: u64,
    ) -> anyhow::Result<Device> {
        fe.set_owner()?;
        let offered = fe.get_features()?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let want = offered & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF | protocol | extra);
        fe.set_features(want)?;
        if want & protocol != 0 {
            let pf = fe.get_protocol_features()?;
            fe.set_protocol_features(
                pf & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK),
            )?;
        }
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.size(),
            userspace_addr: mem.uva(0),
            mmap_offset: 0,
            mmap_handle: mem.file.as_raw_fd(),
        }])?;
        let (mut kicks, mut calls) = (Vec::new(), Vec::new());
        for (i, r) in rings.iter().enumerate() {
            fe.set_vring_num(i, r.size)?;
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: r.size,
                    queue_size: r.size,
                    flags: 0,
                    desc_table_addr: mem.uva(r.desc),
                    used_ring_addr: mem.uva(r.used),
                    avail_ring_addr: mem.uva(r.avail),
                    log_addr: None,
                },
            )?;
            fe.set_vring_base(i, r.used_idx(mem))?;
            let (kick, call) = (EventFd::new(0)?, EventFd::new(0)?);
            fe.set_vring_kick(i, &kick)?;
            fe.set_vring_call(i, &call)?;
            if want & protocol != 0 {
                fe.set_vring_enable(i, true)?;
            }
            kicks.push(kick);
            calls.push(call);
        }
        Ok(Device {
            frontend: fe,
            kicks,
            calls,
            features: want,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_ring_layout() {
        let mem = GuestMemory::new(1 << 20).unwrap();
        let (r, end) = DriverRing::at(0x1000, 16);
        assert_eq!(
            (r.desc, r.avail, r.used, end),
            (0x1000, 0x1100, 0x2000, 0x3000)
        );
        let mut r = r;
        r.set_desc(&mem, 3, 0x8000, 64, VIRTQ_DESC_F_NEXT, 4);
        assert_eq!(mem.read(0x1000 + 48, 8), 0x8000u64.to_le_bytes());
        r.publish(&mem, 3);
        assert_eq!(mem.read_u16(r.avail + 4), 3);
        assert_eq!(mem.read_u16(r.avail + 2), 1);
        mem.write(0x2004, &[7, 0, 0, 0, 64, 0, 0, 0]);
        assert_eq!(r.used_elem(&mem, 0), (7, 64));
    }
}
