//! The running switch: PMD threads, the ports (vhost-user ports with a control thread each,
//! serving one frontend connection at a time; DPDK and tap ports opened here and handed to a PMD),
//! and the counters `ctl` reads. Runs on the main control thread.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use dataplane::dpdk::{self, EthConfig, EthDev, Mempool};
use dataplane::{Dataplane, DpdkPort, Port, PortId, QueueStats, Source, Tap, TapPort, VhostPort};
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, VhostUserVirtioFeatures};
use vhost::vhost_user::{BackendReqHandler, VhostUserBackendReqHandlerMut};

use crate::config::{Config, PortConfig, PortKind, PortSet, SocketPerm, VhostMode};
use crate::vhost_user::VhostUserDevice;

/// What `ctl` can see of a port.
pub struct PortInfo {
    /// Name, type and what it attaches to.
    pub config: PortConfig,
    /// Per queue pair: even = frames delivered into the port, odd = frames taken from it.
    pub queues: Vec<Arc<QueueStats>>,
    /// vhost-user: a frontend is connected; device ports: running (Relaxed: a display flag,
    /// publishes nothing else).
    pub connected: Arc<AtomicBool>,
    /// DPDK port id, for link state and the device's own counters.
    pub dpdk_port: Option<u16>,
    /// Why the port is not running (a device port that failed to start; the others run).
    pub error: Option<String>,
    id: PortId,
    /// The PMDs hold the port (false: it failed to start).
    started: bool,
    /// vhost-user: the thread serving the socket.
    thread: Option<PortThread>,
}

pub struct Switch {
    pub dp: Arc<Dataplane>,
    pub tsc_hz: u64,
    /// Ports, what they hold unique, and the DPDK pools; control threads only (start, ctl).
    inner: Mutex<Ports>,
}

struct Ports {
    list: Vec<PortInfo>,
    set: PortSet,
    pools: DpdkPools,
}

impl Switch {
    /// Start the PMDs and every port. A vhost-user port that cannot start (its socket is taken)
    /// stops the switch; a device port that cannot (bad devargs, no hugepages, EAL failure, no
    /// /dev/net/tun) is logged and listed with its error, and the other ports run.
    pub fn start(cfg: &Config) -> anyhow::Result<Switch> {
        let mut dp = Dataplane::start(&cfg.pmd_cores, cfg.model, cfg.rxq_assign, cfg.auto_lb)?;
        dp.always_lock = cfg.always_lock;
        for p in dp.pmds() {
            if let Some(e) = p.notifier_error() {
                log::warn!(
                    "PMD on core {}: no io_uring for guest notifications ({e}); a frontend \
                     that makes its call fd block can stall this PMD",
                    p.core().0
                );
            }
        }
        let dp = Arc::new(dp);
        let n_pmds = cfg.pmd_cores.len();
        let sw = Switch {
            tsc_hz: dataplane::tsc::hz(),
            inner: Mutex::new(Ports {
                list: Vec::new(),
                set: PortSet::default(),
                pools: DpdkPools::new(cfg, n_pmds),
            }),
            dp,
        };
        for pc in &cfg.ports {
            let vhost = matches!(pc.kind, PortKind::VhostUser { .. });
            match sw.add_port(pc.clone()) {
                Ok(_) => {}
                Err(e) if vhost => return Err(e),
                Err(e) => {
                    log::error!("{e:#}; the other ports run without it");
                    let mut ports = sw.ports();
                    let id = free_id(&ports.list).unwrap_or(PortId(0));
                    let mut info = PortInfo::new(pc, id, Vec::new());
                    info.error = Some(format!("{e:#}"));
                    ports.set.insert(pc)?;
                    ports.list.push(info);
                }
            }
        }
        Ok(sw)
    }

    fn ports(&self) -> std::sync::MutexGuard<'_, Ports> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read the ports (for `ctl`).
    pub fn with_ports<R>(&self, f: impl FnOnce(&[PortInfo]) -> R) -> R {
        f(&self.ports().list)
    }

    /// Start one more port (at start-up, or `ctl add-port`). Nothing of it remains on failure.
    pub fn add_port(&self, pc: PortConfig) -> anyhow::Result<()> {
        let mut ports = self.ports();
        let context = || format!("port {} ({})", pc.name, pc.file.display());
        let cores: Vec<usize> = self.dp.pmds().iter().map(|p| p.core().0).collect();
        crate::config::check_affinity(&pc, &cores)?;
        check_fd_budget(&ports.list, &pc).with_context(context)?;
        ports.set.insert(&pc)?;
        let id = free_id(&ports.list)
            .with_context(|| format!("more than {} ports", dataplane::MAX_PORTS))
            .with_context(context);
        let started = id.and_then(|id| {
            let dp = &self.dp;
            match &pc.kind {
                PortKind::VhostUser { .. } => start_vhost_port(&pc, id, dp),
                PortKind::Dpdk { .. } => ports
                    .pools
                    .pool_for(id.0 as usize % dp.pmds().len(), &pc)
                    .and_then(|pool| start_dpdk_port(&pc, id, dp, pool)),
                PortKind::Tap { ifname } => start_tap_port(&pc, id, dp, ifname),
            }
            .with_context(context)
        });
        match started {
            Ok(info) => ports.list.push(info),
            Err(e) => {
                ports.set.remove(&pc);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stop and remove a port (`ctl del-port`): its thread ends, its PMD lets go of it at a
    /// quiescent point, and only then are its guest memory, device or tap released.
    pub fn del_port(&self, name: &str) -> anyhow::Result<()> {
        let mut ports = self.ports();
        let i = ports
            .list
            .iter()
            .position(|p| p.config.name == name)
            .with_context(|| format!("no port {name:?}"))?;
        let info = ports.list.remove(i);
        ports.set.remove(&info.config);
        drop(ports);
        info.stop(&self.dp)?;
        log::info!("port {name}: removed");
        Ok(())
    }

    /// Close the connection of every frontend that shrank a file we map (its guest memory or
    /// dirty log, turned into zero memory by `dataplane::sigbus`); its rings, memory and fds
    /// go with it, as on any disconnect, and it may connect again.
    pub fn close_faulted_connections(&self) {
        let faulted = dataplane::faulted_owners();
        if faulted.is_empty() {
            return;
        }
        for p in &self.ports().list {
            if !faulted.contains(&(p.id.0 as u32)) {
                continue;
            }
            if let Some(c) = p.thread.as_ref().and_then(|t| lock(&t.conn).take()) {
                log::warn!(
                    "port {}: closing connection: the frontend shrank a memory or log file \
                     the switch maps",
                    p.config.name
                );
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Log each ring a guest corrupted (flagged by its PMD in `ring_broken`) once; `reported`
    /// remembers (port, queue) pairs already logged, and forgets them once the flag clears.
    pub fn report_broken_rings(&self, reported: &mut std::collections::HashSet<(String, usize)>) {
        for p in &self.ports().list {
            for (q, s) in p.queues.iter().enumerate() {
                let key = (p.config.name.clone(), q);
                if s.ring_broken.load(Ordering::Relaxed) == 0 {
                    reported.remove(&key);
                } else if reported.insert(key) {
                    log::warn!(
                        "port {}: the guest corrupted virtqueue {q} (avail index jumped past the ring); it is stopped until the guest resets the device",
                        p.config.name
                    );
                }
            }
        }
    }

    /// The id of the running port named `name` (for `ctl`).
    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.ports()
            .list
            .iter()
            .find(|p| p.config.name == name && p.started)
            .map(|p| p.id)
    }

    /// The name of the port with id `id` (for `ctl`).
    pub fn port_name(&self, id: PortId) -> String {
        self.ports()
            .list
            .iter()
            .find(|p| p.id == id && p.started)
            .map_or_else(|| format!("#{}", id.0), |p| p.config.name.clone())
    }

    /// Remove the sockets ringswitch created (at exit).
    pub fn remove_sockets(&self) {
        for p in &self.ports().list {
            p.remove_socket();
        }
    }
}

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
fn check_fd_budget(list: &[PortInfo], pc: &PortConfig) -> anyhow::Result<()> {
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
fn fd_limit() -> u64 {
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

/// The lowest port id no port has.
fn free_id(list: &[PortInfo]) -> Option<PortId> {
    (0..dataplane::MAX_PORTS as u16)
        .map(PortId)
        .find(|id| list.iter().all(|p| p.id != *id))
}

impl PortInfo {
    fn new(pc: &PortConfig, id: PortId, queues: Vec<Arc<QueueStats>>) -> PortInfo {
        PortInfo {
            queues,
            connected: Arc::new(AtomicBool::new(false)),
            dpdk_port: None,
            error: None,
            id,
            config: pc.clone(),
            started: false,
            thread: None,
        }
    }

    fn stop(self, dp: &Dataplane) -> anyhow::Result<()> {
        if let Some(t) = &self.thread {
            t.stop();
        }
        if self.started {
            // Dropped here, on control, after every PMD let go of it.
            drop(dp.remove_port(self.id)?);
        }
        self.remove_socket();
        Ok(())
    }

    /// Remove the socket ringswitch created for the port, if it did (and it is one still).
    fn remove_socket(&self) {
        if let Some(socket) = self.config.server_socket() {
            remove_socket_file(socket);
        }
    }
}

/// The control thread serving a vhost-user port's socket, and how to stop it: a flag, and
/// `shutdown` of the listening socket and of the current connection, which wakes the thread
/// from `accept` or `recv`.
struct PortThread {
    stop: Arc<AtomicBool>,
    listener: Option<UnixListener>,
    conn: Arc<Mutex<Option<UnixStream>>>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl PortThread {
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(l) = &self.listener {
            // SAFETY: shutdown on a socket we own (a dup of the listening socket).
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(c) = lock(&self.conn).as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(h) = lock(&self.handle).take() {
            let _ = h.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fresh counters for `pairs` queue pairs.
fn queue_stats(pairs: u16) -> Vec<Arc<QueueStats>> {
    (0..pairs as usize * 2)
        .map(|_| Arc::new(QueueStats::default()))
        .collect()
}

/// One mbuf pool per PMD, sized for the DPDK ports that PMD polls; the EAL is started with the
/// first one.
struct DpdkPools {
    eal_args: Vec<String>,
    /// Per PMD: mbufs the RX and TX rings of the configured ports can hold.
    need: Vec<u32>,
    /// Frame bytes one mbuf holds: enough for the largest configured MTU.
    frame_room: u32,
    pools: HashMap<usize, Arc<Mempool>>,
}

/// Mbufs a DPDK port's rings can hold, and the frame room its MTU needs (Ethernet header and
/// one VLAN tag beyond the MTU).
fn dpdk_needs(pc: &PortConfig) -> (u32, u32) {
    match pc.kind {
        PortKind::Dpdk {
            mtu,
            rx_desc,
            tx_desc,
            ..
        } => (
            pc.queues as u32 * (rx_desc as u32 + tx_desc as u32),
            (mtu.unwrap_or(1500) as u32 + 18).max(2048),
        ),
        _ => (0, 0),
    }
}

impl DpdkPools {
    fn new(cfg: &Config, n_pmds: usize) -> DpdkPools {
        let mut need = vec![0u32; n_pmds];
        let mut frame_room = 2048;
        for (i, pc) in cfg.ports.iter().enumerate() {
            let (n, room) = dpdk_needs(pc);
            need[i % n_pmds] += n;
            frame_room = frame_room.max(room);
        }
        DpdkPools {
            eal_args: cfg.eal_args.clone(),
            need,
            frame_room,
            pools: HashMap::new(),
        }
    }

    /// The pool of PMD `pmd`, for port `pc` to draw from; made (and the EAL started) the first
    /// time. A port added later must fit the pool made for the configured ports.
    fn pool_for(&mut self, pmd: usize, pc: &PortConfig) -> anyhow::Result<Arc<Mempool>> {
        let (n, room) = dpdk_needs(pc);
        if let Some(p) = self.pools.get(&pmd) {
            anyhow::ensure!(
                room <= p.frame_room,
                "its MTU needs {room}-byte mbufs, the running pool has {} (configure the largest MTU at start)",
                p.frame_room
            );
            return Ok(p.clone());
        }
        dpdk::eal_init(&self.eal_args)?;
        // Rings full, plus what PMD bursts and per-lcore caches hold; 2^k - 1 suits the ring.
        let n = (self.need[pmd].max(n) + 4096).next_power_of_two() - 1;
        let room = self.frame_room.max(room);
        let pool = Mempool::new(&format!("rs_pmd{pmd}"), n, room)?;
        log::info!("DPDK: mbuf pool for PMD {pmd}: {n} mbufs of {room} bytes");
        self.pools.insert(pmd, pool.clone());
        Ok(pool)
    }
}

fn start_dpdk_port(
    pc: &PortConfig,
    id: PortId,
    dp: &Dataplane,
    pool: Arc<Mempool>,
) -> anyhow::Result<PortInfo> {
    let PortKind::Dpdk {
        devargs,
        mtu,
        rx_desc,
        tx_desc,
    } = &pc.kind
    else {
        anyhow::bail!("not a dpdk port");
    };
    let cfg = EthConfig {
        rx_queues: pc.queues,
        tx_queues: pc.queues,
        rx_desc: *rx_desc,
        tx_desc: *tx_desc,
        mtu: *mtu,
    };
    let dev = EthDev::open(devargs, &cfg, pool)?;
    let (port_id, mac) = (dev.port_id, dev.mac);
    let link = dpdk::link(port_id);
    let mut info = PortInfo::new(pc, id, queue_stats(pc.queues));
    let (to_port, from_port) = split_stats(&info.queues);
    let port = Port::Dpdk(DpdkPort::new(id, dev, to_port, from_port.into()));
    start_device_port(dp, port, pc)?;
    log::info!(
        "port {}: dpdk {devargs} (port id {port_id}, {}, {} queue(s), link {} {} Mb/s)",
        pc.name,
        fmt_mac(&mac),
        pc.queues,
        if link.up { "up" } else { "down" },
        link.speed_mbps
    );
    info.connected.store(true, Ordering::Relaxed);
    info.dpdk_port = Some(port_id);
    info.started = true;
    Ok(info)
}

/// A device port's counters: per queue, those of frames into it and those of frames from it.
fn split_stats(queues: &[Arc<QueueStats>]) -> (Vec<Arc<QueueStats>>, Vec<Arc<QueueStats>>) {
    let to = queues.iter().step_by(2).cloned().collect();
    let from = queues.iter().skip(1).step_by(2).cloned().collect();
    (to, from)
}

/// Hand a device port to the PMDs, and each of its source queues to the PMD the policy picks.
fn start_device_port(dp: &Dataplane, port: Port, pc: &PortConfig) -> anyhow::Result<()> {
    let id = port.id();
    dp.add_port(port, &pc.rxq_affinity)?;
    for q in 0..pc.queues {
        let source = match pc.kind {
            PortKind::Tap { .. } => Source::Tap,
            _ => Source::Dpdk,
        };
        if let Err(e) = dp.add_source(id, q, source) {
            drop(dp.remove_port(id));
            return Err(e.into());
        }
    }
    Ok(())
}

fn start_tap_port(
    pc: &PortConfig,
    id: PortId,
    dp: &Dataplane,
    ifname: &str,
) -> anyhow::Result<PortInfo> {
    let queues = (0..pc.queues)
        .map(|_| Tap::open(ifname))
        .collect::<Result<Vec<_>, _>>()?;
    let mut info = PortInfo::new(pc, id, queue_stats(pc.queues));
    let (to_port, from_port) = split_stats(&info.queues);
    let port = Port::Tap(TapPort {
        id,
        queues: queues.into_boxed_slice(),
        to_port: to_port.into(),
        from_port: from_port.into(),
    });
    start_device_port(dp, port, pc)?;
    log::info!("port {}: tap {ifname} with {} queue(s)", pc.name, pc.queues);
    info.connected.store(true, Ordering::Relaxed);
    info.started = true;
    Ok(info)
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

fn start_vhost_port(pc: &PortConfig, id: PortId, dp: &Arc<Dataplane>) -> anyhow::Result<PortInfo> {
    let PortKind::VhostUser {
        mode,
        socket,
        socket_perm,
    } = &pc.kind
    else {
        anyhow::bail!("not a vhost-user port");
    };
    let listener = match mode {
        VhostMode::Server => Some(bind_socket(socket, *socket_perm)?),
        VhostMode::Client => None,
    };
    let mut info = PortInfo::new(pc, id, queue_stats(pc.queues));
    dp.add_port(VhostPort::port(id, pc.queues as usize), &pc.rxq_affinity)?;
    let device = Arc::new(Mutex::new(VhostUserDevice::new(
        pc.name.clone(),
        id,
        dp.clone(),
        info.queues.clone(),
    )));
    let stop = Arc::new(AtomicBool::new(false));
    let conn = Arc::new(Mutex::new(None));
    let thread_listener = listener.as_ref().map(|l| l.try_clone()).transpose()?;
    let serve = Serve {
        name: pc.name.clone(),
        dev: device,
        connected: info.connected.clone(),
        stop: stop.clone(),
        conn: conn.clone(),
        busy: AtomicBool::new(false),
    };
    let path = socket.clone();
    let handle = std::thread::Builder::new()
        .name(format!("vhost-{}", pc.name))
        .spawn(move || match thread_listener {
            Some(l) => Arc::new(serve).listener(l),
            None => serve.client(&path),
        })
        .context("spawn port thread")?;
    log::info!(
        "port {}: vhost-user {:?} on {} with {} queue pair(s)",
        pc.name,
        mode,
        socket.display(),
        pc.queues
    );
    info.thread = Some(PortThread {
        stop,
        listener,
        conn,
        handle: Mutex::new(Some(handle)),
    });
    info.started = true;
    Ok(info)
}

/// Bind a server socket, replacing a stale file from a crashed run but never a live socket.
pub fn bind_socket(path: &Path, perm: SocketPerm) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if let Ok(md) = std::fs::symlink_metadata(path) {
        // Only a socket is ever replaced: a port file naming any other file must not make the
        // switch delete it.
        if !md.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket: not replaced",
                path.display()
            );
        }
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is in use by a running process", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    if perm.uid.is_some() || perm.gid.is_some() {
        std::os::unix::fs::chown(path, perm.uid, perm.gid)
            .with_context(|| format!("chown {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(perm.mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

/// Remove `path` if it is a socket (never any other file).
pub fn remove_socket_file(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// What a vhost-user port thread serves connections with.
struct Serve {
    name: String,
    dev: Arc<Mutex<VhostUserDevice>>,
    connected: Arc<AtomicBool>,
    /// Set by `PortThread::stop` (Relaxed: the shutdown that follows it is what wakes us).
    stop: Arc<AtomicBool>,
    /// The current connection, for `PortThread::stop` to shut down.
    conn: Arc<Mutex<Option<UnixStream>>>,
    /// Server mode: a connection is being served (a second one is refused). Cleared before
    /// the connection's last fd closes, so a frontend that saw it close may connect again.
    busy: AtomicBool,
}

impl Serve {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn serve(&self, s: UnixStream) {
        *lock(&self.conn) = s.try_clone().ok();
        // A stop that came before the connection was registered must still end it.
        if !self.stopped() {
            serve_connection(&self.name, s, &self.dev, &self.connected);
        }
        // Release: pairs with the listener's swap; before the last fd (ours) closes.
        self.busy.store(false, Ordering::Release);
        *lock(&self.conn) = None;
    }

    /// Server mode: one frontend at a time, served on a thread of its own, so that a second
    /// one is refused (with a log line) instead of waiting unanswered in the backlog, and a
    /// silent one only holds the port until its first message times out.
    fn listener(self: Arc<Self>, l: UnixListener) {
        let mut current: Option<std::thread::JoinHandle<()>> = None;
        for stream in l.incoming() {
            if self.stopped() {
                break;
            }
            match stream {
                // Acquire/Release: pairs with the serving thread's store when it ends.
                Ok(s) if self.busy.swap(true, Ordering::AcqRel) => {
                    log::warn!(
                        "port {}: refusing a second frontend while one is connected",
                        self.name
                    );
                    drop(s);
                }
                Ok(s) => {
                    if let Some(t) = current.take() {
                        let _ = t.join();
                    }
                    let me = self.clone();
                    let t = std::thread::Builder::new()
                        .name(format!("vhost-{}-conn", self.name))
                        .spawn(move || me.serve(s));
                    match t {
                        Ok(t) => current = Some(t),
                        Err(e) => {
                            log::error!("port {}: cannot serve a connection: {e}", self.name);
                            self.busy.store(false, Ordering::Release);
                        }
                    }
                }
                Err(e) => {
                    log::error!("port {}: accept: {e}", self.name);
                    self.pause(Duration::from_millis(100));
                }
            }
        }
        // Stopped: the connection was shut down with the listener, and ends promptly.
        if let Some(t) = current {
            let _ = t.join();
        }
    }

    /// Sleep for `d`, or less if the port is stopped meanwhile.
    fn pause(&self, d: Duration) {
        let end = std::time::Instant::now() + d;
        while !self.stopped() {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }

    /// Client mode: connect to the frontend's socket, and again (with backoff) whenever it
    /// goes. The backoff resets only after a connection that lived (a frontend that accepts
    /// and closes at once is retried ever more slowly, not thousands of times a second), the
    /// connect never waits on the frontend (a full backlog is a retry), and a stop is seen
    /// within a few milliseconds whatever the thread was waiting for.
    fn client(&self, path: &Path) {
        const FIRST: Duration = Duration::from_millis(50);
        const MAX: Duration = Duration::from_secs(2);
        const LIVED: Duration = Duration::from_secs(5);
        let mut backoff = FIRST;
        let mut last_error = None;
        while !self.stopped() {
            match connect_nonblocking(path) {
                Ok(s) => {
                    last_error = None;
                    let since = std::time::Instant::now();
                    self.serve(s);
                    if since.elapsed() >= LIVED {
                        backoff = FIRST;
                        continue;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::NotFound | ErrorKind::ConnectionRefused | ErrorKind::WouldBlock
                    ) => {}
                Err(e) => {
                    // Once per kind of error, not once per attempt.
                    if last_error != Some(e.kind()) {
                        log::warn!("port {}: connect {}: {e}", self.name, path.display());
                        last_error = Some(e.kind());
                    }
                }
            }
            self.pause(backoff);
            backoff = (backoff * 2).min(MAX);
        }
    }
}

/// Connect to a unix socket without waiting on its listener: a full backlog is `WouldBlock`
/// at once (a blocking connect would sleep until the frontend accepts). The stream returned
/// is blocking.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied within sun_path's bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: plain socket(2); the fd is owned by the UnixStream at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and ours.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un of the size given.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

pub fn serve_connection(
    name: &str,
    s: UnixStream,
    dev: &Arc<Mutex<VhostUserDevice>>,
    flag: &AtomicBool,
) {
    log::info!("port {name}: frontend connected");
    flag.store(true, Ordering::Relaxed);
    let mut replies = match s.try_clone() {
        Ok(r) => r,
        Err(e) => {
            log::warn!("port {name}: closing connection: {e}");
            return;
        }
    };
    let mut h = BackendReqHandler::from_stream(s, dev.clone());
    let mut first = true;
    loop {
        // Whole, bounded in size, fds and time, before the crate reads it (framing.rs).
        let next = match crate::framing::await_message(&replies, first) {
            Ok(m) => Peeked::from(&m),
            Err(crate::framing::FrameError::Disconnected) => {
                log::info!("port {name}: frontend disconnected");
                break;
            }
            Err(e) => {
                log::warn!("port {name}: closing connection: {e}");
                break;
            }
        };
        first = false;
        match h.handle_request() {
            Ok(()) => {}
            Err(vhost::vhost_user::Error::Disconnected)
            | Err(vhost::vhost_user::Error::PartialMessage) => {
                log::info!("port {name}: frontend disconnected");
                break;
            }
            // QEMU's vhost-user net enables its rings with SET_VRING_ENABLE before it sends
            // SET_FEATURES, and does not enable them again after (QEMU 8 and later also wait
            // for the REPLY_ACK). The vhost crate refuses the message then, after reading all
            // of it, without a reply; DPDK's vhost applies it. So do we, from the copy peeked
            // before the crate read it.
            Err(vhost::vhost_user::Error::InactiveFeature(f))
                if f == VhostUserVirtioFeatures::PROTOCOL_FEATURES =>
            {
                let Some((msg, (index, enable))) = next.vring_enable.map(|v| (next, v)) else {
                    log::warn!("port {name}: closing connection: inactive feature {f:?}");
                    break;
                };
                log::debug!("port {name}: SET_VRING_ENABLE {index} {enable} before SET_FEATURES");
                let result = dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .set_vring_enable(index, enable);
                if let Err(e) = &result {
                    log::warn!("port {name}: {e}");
                }
                if msg.need_reply() {
                    if let Err(e) = replies.write_all(&msg.ack(result.is_ok())) {
                        log::warn!("port {name}: closing connection: {e}");
                        break;
                    }
                }
            }
            Err(e) => {
                log::warn!("port {name}: closing connection: {e}");
                break;
            }
        }
    }
    flag.store(false, Ordering::Relaxed);
    dev.lock().unwrap_or_else(|p| p.into_inner()).disconnect();
}

/// The next vhost-user message as far as `serve_connection` needs it: its header, and for
/// SET_VRING_ENABLE its body (ring index, enable).
#[derive(Clone, Copy)]
struct Peeked {
    request: u32,
    flags: u32,
    vring_enable: Option<(u32, bool)>,
}

impl Peeked {
    fn need_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }

    /// A REPLY_ACK reply: header (protocol version 1), then a u64, 0 for success.
    fn ack(&self, ok: bool) -> [u8; 20] {
        let mut out = [0u8; 20];
        out[..4].copy_from_slice(&self.request.to_le_bytes());
        out[4..8].copy_from_slice(&(1 | VhostUserHeaderFlag::REPLY.bits()).to_le_bytes());
        out[8..12].copy_from_slice(&8u32.to_le_bytes());
        out[12] = u8::from(!ok);
        out
    }
}

impl Peeked {
    /// What `serve_connection` needs of the message the framing gate saw whole.
    fn from(m: &crate::framing::Message) -> Peeked {
        let b = &m.head;
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8));
        let vring_enable =
            (request == FrontendReq::SET_VRING_ENABLE as u32 && size == 8 && m.len >= 20)
                .then(|| (word(12), word(16) == 1));
        Peeked {
            request,
            flags,
            vring_enable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's order: SET_VRING_ENABLE before SET_FEATURES. The message is applied, its
    /// REPLY_ACK sent when asked for, and the connection stays up: a GET_FEATURES after it is
    /// answered.
    #[test]
    fn set_vring_enable_before_set_features_keeps_the_connection() {
        use std::io::Read;
        let dev = Arc::new(Mutex::new(crate::vhost_user::test_device("vm-q")));
        let (mut fe, be) = UnixStream::pair().unwrap();
        let served = std::thread::spawn(move || {
            serve_connection("vm-q", be, &dev, &AtomicBool::new(false));
        });
        let msg = |request: u32, flags: u32, body: &[u32]| -> Vec<u8> {
            let size = 4 * body.len() as u32;
            [request, flags, size]
                .iter()
                .chain(body)
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
        fe.write_all(&msg(18, 1, &[0, 1])).unwrap(); // SET_VRING_ENABLE ring 0, enable
        fe.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reply = [0u8; 20];
        // The same with NEED_REPLY, as QEMU 8+ sends it: acknowledged with success.
        fe.write_all(&msg(18, 1 | 8, &[1, 1])).unwrap();
        fe.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..12], [18, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0]);
        assert_eq!(reply[12..], [0; 8], "success");
        // Ring 2 does not exist: refused, and the connection still stays up.
        fe.write_all(&msg(18, 1 | 8, &[2, 1])).unwrap();
        fe.read_exact(&mut reply).unwrap();
        assert_eq!(reply[12..], [1, 0, 0, 0, 0, 0, 0, 0], "failure");
        fe.write_all(&msg(1, 1, &[])).unwrap(); // GET_FEATURES
        fe.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..4], 1u32.to_le_bytes(), "a GET_FEATURES reply");
        let features = u64::from_le_bytes(reply[12..].try_into().unwrap());
        assert_eq!(features, crate::vhost_user::OFFERED_FEATURES);
        drop(fe);
        served.join().unwrap();
    }

    #[test]
    fn sockets_get_their_mode_stale_ones_are_replaced_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("rs-sock-{}", std::process::id()));
        let path = dir.join("s.sock");
        let perm = SocketPerm {
            mode: 0o600,
            uid: Some(0),
            gid: None,
        };
        let l = bind_socket(&path, perm).unwrap();
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        // Live: a second switch must not steal it.
        let e = bind_socket(&path, perm).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        // Stale (the listener is gone, the file stays, as after a crash): replaced.
        drop(l);
        assert!(path.exists());
        let _l = bind_socket(&path, SocketPerm::default()).unwrap();
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o660);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
