//! The running switch: PMD threads, the ports (vhost-user ports with a control thread each,
//! serving one frontend connection at a time; DPDK and tap ports opened here and handed to a PMD),
//! and the counters `ctl` reads. Runs on the main control thread.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use dataplane::{Dataplane, PortId, QueueStats};

use crate::config::{Config, PortConfig, PortKind, PortSet};

mod fds;
mod listen;
mod start;

use fds::check_fd_budget;
pub use fds::{fd_budget, raise_fd_limit, FD_RESERVE};
pub use listen::{bind_socket, remove_socket_file};
use start::{start_dpdk_port, start_tap_port, start_vhost_port, DpdkPools};

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
