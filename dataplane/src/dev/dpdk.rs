//! DPDK, made safe: the EAL initialised once per process, mbuf pools, Ethernet ports opened from
//! devargs (`rte_dev_probe`), and the burst calls. Control runs everything here except the
//! `MbufBurst` operations and `tx_burst`, which the PMD calls between its quiescent points.
//! This is the only module that calls into `dpdk_sys`.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use dpdk_sys as sys;

use crate::mem::seg::{Seg, SegList};
use crate::BURST;

pub use super::{device_name, EthConfig, Link};

#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    #[error("DPDK EAL initialisation failed ({args}): {reason} (see the EAL's messages above; check eal_args and hugepages)")]
    Eal { args: String, reason: String },
    #[error("mbuf pool {name}: {reason}")]
    Mempool { name: String, reason: String },
    #[error("devargs {devargs:?}: device probe failed: {reason}")]
    Probe { devargs: String, reason: String },
    #[error("devargs {devargs:?}: probed, but no Ethernet port is named {name:?}")]
    NoPort { devargs: String, name: String },
    #[error("port {name}: {op}: {reason}")]
    Port {
        name: String,
        op: &'static str,
        reason: String,
    },
    #[error("port {name}: {what} {want} exceeds the device's maximum {max}")]
    Limit {
        name: String,
        what: &'static str,
        want: u32,
        max: u32,
    },
}

/// DPDK's text for a negative errno or `rte_errno` value.
fn strerror(err: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static (or thread-local) NUL-terminated string.
    unsafe { CStr::from_ptr(sys::rte_strerror(err.abs())) }
        .to_string_lossy()
        .into_owned()
}

fn rte_errno() -> i32 {
    // SAFETY: reads the calling thread's rte_errno; no preconditions.
    unsafe { sys::rs_errno() }
}

/// Outcome of the one `rte_eal_init` call a process may make; later calls repeat it.
static EAL: Mutex<Option<Result<(), String>>> = Mutex::new(None);

/// Initialise the EAL with `args` (the program name is prepended) unless it already ran; a
/// failure is remembered, since DPDK cannot be initialised twice. The calling thread's CPU
/// affinity is restored afterwards: the EAL pins it to the main lcore, but control threads spawned
/// from it must not inherit that pinning.
pub fn eal_init(args: &[String]) -> Result<(), DpdkError> {
    let mut state = EAL.lock().unwrap_or_else(|p| p.into_inner());
    let joined = args.join(" ");
    if let Some(done) = &*state {
        return done.clone().map_err(|reason| DpdkError::Eal {
            args: joined,
            reason,
        });
    }
    let argv_owned: Vec<CString> = std::iter::once("ringswitch")
        .chain(args.iter().map(String::as_str))
        .map(|a| CString::new(a).unwrap_or_default())
        .collect();
    let mut argv: Vec<*mut libc::c_char> = argv_owned
        .iter()
        .map(|a| a.as_ptr() as *mut libc::c_char)
        .collect();
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    let mut cpus: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size matches the buffer.
    let have_cpus =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&cpus), &mut cpus) } == 0;
    // SAFETY: argv holds argc valid NUL-terminated strings that outlive the call (the EAL may
    // permute the pointer array, which we own, and keeps no reference past it).
    let rc = unsafe { sys::rte_eal_init(argv.len() as i32, argv.as_mut_ptr()) };
    if have_cpus {
        // SAFETY: restores the mask read above for the calling thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&cpus), &cpus) };
    }
    let result = if rc < 0 {
        let reason = strerror(rte_errno());
        release_hugedir_locks();
        Err(reason)
    } else {
        Ok(())
    };
    *state = Some(result.clone());
    result.map_err(|reason| DpdkError::Eal {
        args: joined,
        reason,
    })
}

/// A failed `rte_eal_init` can leave the exclusive flock it takes on each hugetlbfs directory
/// held (DPDK 22.11 unlocks them only at the end of a successful init), and every other DPDK
/// process on the machine then blocks in its own init. Close those directory fds: DPDK is never
/// used again in this process after a failure.
fn release_hugedir_locks() {
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for e in fds.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: fstatfs/fstat only write into the zeroed structs we pass.
        let (fs, st) = unsafe {
            let mut fs: libc::statfs = std::mem::zeroed();
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstatfs(fd, &mut fs) != 0 || libc::fstat(fd, &mut st) != 0 {
                continue;
            }
            (fs, st)
        };
        if fs.f_type == HUGETLBFS_MAGIC && st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            // SAFETY: the fd is the EAL's leaked lock descriptor on a hugetlbfs directory;
            // nothing in this process uses it again.
            unsafe {
                libc::flock(fd, libc::LOCK_UN);
                libc::close(fd);
            }
        }
    }
}

/// Let the calling (Rust-spawned) thread use mempool caches: it gets an lcore id of its own.
/// Without it DPDK still works, only without per-lcore caches.
pub fn register_thread() -> bool {
    // SAFETY: valid on any thread once the EAL is initialised; callers only use it after
    // `eal_init` succeeded (a port cannot exist otherwise).
    unsafe { sys::rte_thread_register() == 0 }
}

/// An mbuf pool. Freed on drop; every port whose queues draw from it holds an `Arc` to it and
/// is closed first.
pub struct Mempool {
    ptr: NonNull<sys::rte_mempool>,
    /// Bytes of frame one mbuf can hold (data room minus headroom).
    pub frame_room: u32,
}

// SAFETY: a DPDK mempool is designed for concurrent use from any thread (lockless ring plus
// per-lcore caches); the pointer is valid until Drop.
unsafe impl Send for Mempool {}
// SAFETY: as above; no method takes `&self` to mutate anything but DPDK's own thread-safe state.
unsafe impl Sync for Mempool {}

impl Mempool {
    /// A pool of `n` mbufs, each able to hold a frame of `frame_room` bytes.
    pub fn new(name: &str, n: u32, frame_room: u32) -> Result<Arc<Mempool>, DpdkError> {
        let err = |reason: String| DpdkError::Mempool {
            name: name.to_owned(),
            reason,
        };
        let headroom = sys::RTE_PKTMBUF_HEADROOM;
        let data_room = u16::try_from(frame_room + headroom)
            .map_err(|_| err(format!("frame room {frame_room} does not fit one mbuf")))?;
        let cname = CString::new(name).map_err(|_| err("NUL in name".into()))?;
        // SAFETY: cname is a valid C string; SOCKET_ID_ANY lets DPDK choose the memory.
        let p = unsafe {
            sys::rte_pktmbuf_pool_create(cname.as_ptr(), n, 256, 0, data_room, sys::SOCKET_ID_ANY)
        };
        let ptr = NonNull::new(p).ok_or_else(|| err(strerror(rte_errno())))?;
        Ok(Arc::new(Mempool { ptr, frame_room }))
    }

    pub fn as_ptr(&self) -> *mut sys::rte_mempool {
        self.ptr.as_ptr()
    }
}

impl Drop for Mempool {
    fn drop(&mut self) {
        // SAFETY: no port uses the pool any more (they hold Arcs to it), so no mbuf of it is in
        // a device ring; mbufs a PMD still held were freed back before it returned its port.
        unsafe { sys::rte_mempool_free(self.ptr.as_ptr()) };
    }
}

/// An Ethernet port opened from devargs: configured, started, promiscuous. Stopped and
/// hot-unplugged on drop, before the pool its RX queues draw from is released.
pub struct EthDev {
    pub port_id: u16,
    pub name: String,
    pub mac: [u8; 6],
    pool: Arc<Mempool>,
}

impl EthDev {
    pub fn open(devargs: &str, cfg: &EthConfig, pool: Arc<Mempool>) -> Result<EthDev, DpdkError> {
        let name = device_name(devargs).to_owned();
        let c_devargs = CString::new(devargs).map_err(|_| DpdkError::Probe {
            devargs: devargs.into(),
            reason: "NUL in devargs".into(),
        })?;
        // SAFETY: a valid C string; the EAL is initialised (the caller holds a pool).
        let rc = unsafe { sys::rte_dev_probe(c_devargs.as_ptr()) };
        // -EEXIST: already probed by the EAL (a PCI device on the allow list); use it.
        if rc < 0 && rc != -libc::EEXIST {
            return Err(DpdkError::Probe {
                devargs: devargs.into(),
                reason: strerror(rc),
            });
        }
        let c_name = CString::new(name.as_str()).unwrap_or_default();
        let mut port_id = 0u16;
        // SAFETY: valid C string and out-pointer.
        if unsafe { sys::rte_eth_dev_get_port_by_name(c_name.as_ptr(), &mut port_id) } != 0 {
            return Err(DpdkError::NoPort {
                devargs: devargs.into(),
                name,
            });
        }
        let dev = EthDev {
            port_id,
            name,
            mac: [0; 6],
            pool,
        };
        // From here on, Drop unplugs the device if setting it up fails.
        dev.setup(cfg)
    }

    fn check(&self, op: &'static str, rc: i32) -> Result<(), DpdkError> {
        if rc < 0 {
            return Err(DpdkError::Port {
                name: self.name.clone(),
                op,
                reason: strerror(rc),
            });
        }
        Ok(())
    }

    fn setup(mut self, cfg: &EthConfig) -> Result<EthDev, DpdkError> {
        let port = self.port_id;
        let mut info = sys::rte_eth_dev_info::default();
        // SAFETY: port is a valid port id, info a valid out-pointer.
        self.check("dev_info_get", unsafe {
            sys::rte_eth_dev_info_get(port, &mut info)
        })?;
        for (what, want, max) in [
            ("source queues", cfg.rx_queues, info.max_rx_queues),
            ("tx queues", cfg.tx_queues, info.max_tx_queues),
        ] {
            if want > max {
                return Err(DpdkError::Limit {
                    name: self.name.clone(),
                    what,
                    want: want.into(),
                    max: max.into(),
                });
            }
        }
        let mut conf = sys::rte_eth_conf::default();
        if cfg.rx_queues > 1 {
            // Spread flows over the RX queues by IP/TCP/UDP hash, as far as the device can.
            conf.rxmode.mq_mode = sys::rte_eth_rx_mq_mode_RTE_ETH_MQ_RX_RSS;
            // SAFETY: reads an immutable constant defined in the shim.
            let hf = unsafe { sys::rs_rss_hf_ip_tcp_udp };
            conf.rx_adv_conf.rss_conf.rss_hf = hf & info.flow_type_rss_offloads;
        }
        // SAFETY: valid port id and conf.
        self.check("configure", unsafe {
            sys::rte_eth_dev_configure(port, cfg.rx_queues, cfg.tx_queues, &conf)
        })?;
        if let Some(mtu) = cfg.mtu {
            // SAFETY: valid port id.
            self.check("set_mtu", unsafe { sys::rte_eth_dev_set_mtu(port, mtu) })?;
        }
        // SAFETY: valid port id.
        let socket = unsafe { sys::rte_eth_dev_socket_id(port) } as u32;
        for q in 0..cfg.rx_queues {
            // SAFETY: valid port and queue; null conf means the driver's defaults; the pool
            // outlives the port (self holds it and stops the port first on drop).
            self.check("rx_queue_setup", unsafe {
                sys::rte_eth_rx_queue_setup(
                    port,
                    q,
                    cfg.rx_desc,
                    socket,
                    std::ptr::null(),
                    self.pool.as_ptr(),
                )
            })?;
        }
        for q in 0..cfg.tx_queues {
            // SAFETY: valid port and queue; null conf means the driver's defaults.
            self.check("tx_queue_setup", unsafe {
                sys::rte_eth_tx_queue_setup(port, q, cfg.tx_desc, socket, std::ptr::null())
            })?;
        }
        // SAFETY: valid port id, configured above.
        self.check("start", unsafe { sys::rte_eth_dev_start(port) })?;
        // A switch port must see frames for every MAC behind it. Some vdevs cannot (net_null):
        // not an error.
        // SAFETY: valid, started port.
        unsafe { sys::rte_eth_promiscuous_enable(port) };
        let mut mac = sys::rte_ether_addr::default();
        // SAFETY: valid port id and out-pointer.
        if unsafe { sys::rte_eth_macaddr_get(port, &mut mac) } == 0 {
            self.mac = mac.addr_bytes;
        }
        Ok(self)
    }

    pub fn pool(&self) -> &Mempool {
        &self.pool
    }
}

/// Link state of a DPDK port; safe to ask from control while a PMD polls the port.
pub fn link(port_id: u16) -> Link {
    let mut l = sys::rte_eth_link::default();
    // SAFETY: an out-pointer; an unknown port id only makes DPDK return an error.
    unsafe { sys::rte_eth_link_get_nowait(port_id, &mut l) };
    Link {
        up: l.link_status() != 0,
        speed_mbps: l.link_speed,
    }
}

/// The device's own counters: frames it dropped for lack of RX descriptors (`imissed`), RX
/// errors and TX errors, which the switch cannot see per packet.
pub fn hw_drops(port_id: u16) -> (u64, u64, u64) {
    let mut s = sys::rte_eth_stats::default();
    // SAFETY: an out-pointer; an unknown port id only makes DPDK return an error.
    unsafe { sys::rte_eth_stats_get(port_id, &mut s) };
    (s.imissed, s.ierrors, s.oerrors)
}

impl Drop for EthDev {
    fn drop(&mut self) {
        let mut info = sys::rte_eth_dev_info::default();
        // SAFETY: port_id is a valid port until removed below; no PMD polls it any more (it was
        // handed back through the quiescence protocol before control drops it).
        unsafe {
            sys::rte_eth_dev_stop(self.port_id);
            let have_dev = sys::rte_eth_dev_info_get(self.port_id, &mut info) == 0;
            sys::rte_eth_dev_close(self.port_id);
            if have_dev && !info.device.is_null() {
                sys::rte_dev_remove(info.device);
            }
        }
    }
}

/// Up to BURST mbufs a PMD holds: received frames, or empty mbufs waiting to be filled.
pub struct MbufBurst {
    m: [*mut sys::rte_mbuf; BURST],
    n: usize,
}

// SAFETY: the mbufs are owned exclusively by the burst; DPDK lets an mbuf be used and freed on
// any thread (the pool is thread-safe), and a burst is used by one thread at a time (`&mut`).
unsafe impl Send for MbufBurst {}

impl Default for MbufBurst {
    fn default() -> Self {
        MbufBurst {
            m: [std::ptr::null_mut(); BURST],
            n: 0,
        }
    }
}

impl MbufBurst {
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn is_full(&self) -> bool {
        self.n == BURST
    }

    /// Receive up to BURST frames from one RX queue (after `free_all` emptied the burst).
    #[inline]
    pub fn rx(&mut self, port: u16, queue: u16) -> usize {
        // SAFETY: m has BURST slots; port/queue belong to a started device this PMD owns.
        self.n = unsafe { sys::rs_eth_rx_burst(port, queue, self.m.as_mut_ptr(), BURST as u16) }
            as usize;
        // Start every frame's first line loading before the first is switched.
        for &m in &self.m[..self.n] {
            // SAFETY: a received mbuf; its header was just written by the driver.
            let data = unsafe { ((*m).buf_addr as *const u8).add((*m).data_off as usize) };
            crate::cpu::prefetch(data);
        }
        self.n
    }

    /// The data of received mbuf `i` (a chain of segments) as a segment list, and its length;
    /// None if the chain has more segments than a segment list holds.
    #[inline]
    pub fn segs(&self, i: usize, out: &mut SegList) -> Option<u32> {
        out.n = 0;
        out.total = 0;
        let mut m = self.m[i];
        while !m.is_null() {
            // SAFETY: m is an mbuf the driver handed us (or a `next` link of one); its data lies
            // at buf_addr + data_off for data_len bytes, by the mbuf contract.
            let (ptr, len, next) = unsafe {
                let mb = &*m;
                (
                    (mb.buf_addr as *mut u8).add(mb.data_off as usize),
                    mb.data_len as u32,
                    mb.next,
                )
            };
            // SAFETY: the data of an mbuf of the burst, owned until `free_all`, after the
            // frame's deliveries ran.
            *out.segs.get_mut(out.n)? = unsafe { Seg::new(ptr, len) };
            out.n += 1;
            out.total += len;
            m = next;
        }
        Some(out.total)
    }

    /// Top the burst up with fresh mbufs from `pool`; false if the pool could not give BURST.
    #[inline]
    pub fn refill(&mut self, pool: &Mempool) -> bool {
        if self.n > 0 {
            return true;
        }
        // SAFETY: m has BURST slots; the pool is alive (the caller's port holds it).
        let ok =
            unsafe { sys::rs_pktmbuf_alloc_bulk(pool.as_ptr(), self.m.as_mut_ptr(), BURST as u32) }
                == 0;
        if ok {
            self.n = BURST;
        }
        ok
    }

    /// Take one mbuf out (from a refilled burst).
    #[inline]
    pub fn pop(&mut self) -> Option<Mbuf> {
        self.n = self.n.checked_sub(1)?;
        NonNull::new(self.m[self.n]).map(Mbuf)
    }

    /// One fresh mbuf from `pool`, taken from this burst and refilled in bulk when empty.
    #[inline]
    pub fn take(&mut self, pool: &Mempool) -> Option<Mbuf> {
        if !self.refill(pool) {
            return None;
        }
        self.pop()
    }

    /// Append an mbuf; the caller checked `is_full` (a burst that is full frees it instead).
    #[inline]
    pub fn push(&mut self, m: Mbuf) {
        if let Some(slot) = self.m.get_mut(self.n) {
            *slot = std::mem::ManuallyDrop::new(m).0.as_ptr();
            self.n += 1;
        }
    }

    /// Hand every mbuf to a TX queue. Returns how many it took; the rest stay in the burst.
    #[inline]
    pub fn tx(&mut self, port: u16, queue: u16) -> usize {
        // SAFETY: the first n slots hold mbufs we own; the driver takes ownership of `sent`.
        let sent = unsafe { sys::rs_eth_tx_burst(port, queue, self.m.as_mut_ptr(), self.n as u16) }
            as usize;
        self.m.copy_within(sent..self.n, 0);
        self.n -= sent;
        sent
    }

    /// Frame bytes held (sum of `pkt_len`).
    #[inline]
    pub fn bytes(&self) -> u64 {
        self.m[..self.n]
            .iter()
            // SAFETY: the first n slots hold valid mbufs we own.
            .map(|&m| unsafe { (*m).pkt_len } as u64)
            .sum()
    }

    /// Free every mbuf held.
    #[inline]
    pub fn free_all(&mut self) {
        if self.n > 0 {
            // SAFETY: the first n slots hold mbufs we own; none is used after this.
            unsafe { sys::rte_pktmbuf_free_bulk(self.m.as_mut_ptr(), self.n as u32) };
            self.n = 0;
        }
    }
}

impl Drop for MbufBurst {
    fn drop(&mut self) {
        self.free_all();
    }
}

/// One mbuf the PMD owns; freed back to its pool on drop.
pub struct Mbuf(NonNull<sys::rte_mbuf>);

impl Mbuf {
    /// Make the mbuf a single-segment frame of `len` bytes produced by `fill`; false (and
    /// nothing written) if its buffer has no room for `len` bytes.
    #[inline]
    pub fn fill(&mut self, len: u32, fill: impl FnOnce(&mut [u8])) -> bool {
        // SAFETY: we own the mbuf; its header is plain data.
        let m = unsafe { self.0.as_mut() };
        if len > (m.buf_len as u32).saturating_sub(m.data_off as u32) {
            return false;
        }
        // SAFETY: the mbuf's buffer has buf_len - data_off >= len bytes at buf_addr + data_off
        // (just checked). The memory is DPDK's, never a guest's, so a plain slice is sound while
        // we own the mbuf.
        fill(unsafe {
            std::slice::from_raw_parts_mut(
                (m.buf_addr as *mut u8).add(m.data_off as usize),
                len as usize,
            )
        });
        m.data_len = len as u16;
        m.pkt_len = len;
        true
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: we own the mbuf and nothing uses it after this.
        unsafe { sys::rs_pktmbuf_free(self.0.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test owns the EAL (a process can initialise it only once): a net_null port receives
    /// what it was given, and a burst round-trips through its TX queue.
    #[test]
    fn eal_pool_and_null_port() {
        eal_init(&[
            "--no-huge".into(),
            "-m".into(),
            "256".into(),
            "--no-shconf".into(),
            "--no-telemetry".into(),
            "--no-pci".into(),
            "--log-level=lib.eal:error".into(),
        ])
        .unwrap();
        assert!(register_thread());
        let pool = Mempool::new("rs_test_pool", 1023, 2048).unwrap();
        let cfg = EthConfig {
            rx_queues: 1,
            tx_queues: 1,
            rx_desc: 256,
            tx_desc: 256,
            mtu: None,
        };
        let e = EthDev::open("net_nosuchdriver0", &cfg, pool.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("net_nosuchdriver0"), "{e}");
        let dev = EthDev::open("net_null0,copy=1", &cfg, pool.clone()).unwrap();
        let mut out = MbufBurst::default();
        let mut stash = MbufBurst::default();
        assert!(stash.refill(&pool));
        for i in 0..4u8 {
            let mut m = stash.pop().unwrap();
            assert!(m.fill(60, |d| d.fill(i)));
            out.push(m);
        }
        assert_eq!(out.bytes(), 240);
        assert_eq!(out.tx(dev.port_id, 0), 4);
        assert!(out.is_empty());
        let mut rx = MbufBurst::default();
        let n = rx.rx(dev.port_id, 0);
        assert!(n > 0);
        let mut segs = SegList::default();
        assert_eq!(
            rx.segs(0, &mut segs),
            Some(64),
            "net_null's default frame size"
        );
        let mut big = stash.take(&pool).unwrap();
        assert!(
            !big.fill(4096, |_| unreachable!()),
            "no room for 4096 bytes"
        );
        rx.free_all();
        stash.free_all();
        drop(dev);
        // Every mbuf went back: the pool can be emptied again in full.
        let mut all = Vec::new();
        while stash.refill(&pool) {
            all.push(std::mem::take(&mut stash));
        }
        assert!(all.len() * BURST >= 1023 - BURST);
    }
}
