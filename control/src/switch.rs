//! The running switch: PMD threads, the ports (vhost-user ports with a control thread each,
//! serving one frontend connection at a time; DPDK and tap ports opened here and handed to a PMD),
//! and the counters `ctl` reads. Runs on the main control thread.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use dataplane::devport::{EthPortRt, TapPortRt};
use dataplane::dpdk::{self, EthConfig, EthDev, Mempool};
use dataplane::pmd::PmdHandle;
use dataplane::port::VhostPortRt;
use dataplane::stats::QueueStats;
use dataplane::tap::Tap;
use dataplane::{CoreId, PortId};
use vhost::vhost_user::BackendReqHandler;

use crate::config::{Config, PortConfig, PortKind, SocketPerm, VhostMode};
use crate::vhost_user::VhostUserDevice;

/// What `ctl` can see of a port.
pub struct PortInfo {
    pub name: String,
    /// "vhost-user", "dpdk" or "tap".
    pub kind: &'static str,
    /// What it attaches to: socket path, devargs or interface name.
    pub endpoint: String,
    /// Per queue pair: even = frames delivered into the port, odd = frames taken from it.
    pub queues: Vec<Arc<QueueStats>>,
    /// vhost-user: a frontend is connected; device ports: running (Relaxed: a display flag,
    /// publishes nothing else).
    pub connected: Arc<AtomicBool>,
    /// DPDK port id, for link state and the device's own counters.
    pub dpdk_port: Option<u16>,
    /// Why the port is not running (a device port that failed to start; the others run).
    pub error: Option<String>,
}

pub struct Switch {
    pub pmds: Vec<Arc<PmdHandle>>,
    pub ports: Vec<PortInfo>,
    pub tsc_hz: u64,
}

impl Switch {
    /// Start the PMDs and every port. A vhost-user port that cannot start (its socket is taken)
    /// stops the switch; a device port that cannot (bad devargs, no hugepages, EAL failure, no
    /// /dev/net/tun) is logged and listed with its error, and the other ports run.
    pub fn start(cfg: &Config) -> anyhow::Result<Switch> {
        let pmds = cfg
            .pmd_cores
            .iter()
            .map(|&c| PmdHandle::spawn(CoreId(c)).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let tsc_hz = dataplane::tsc::hz();
        let pmd_of = |i: usize| i % pmds.len();
        let mut pools = DpdkPools::new(cfg, pmds.len());
        let mut ports = Vec::new();
        for (i, pc) in cfg.ports.iter().enumerate() {
            let id = PortId(i as u16);
            let pmd = pmds[pmd_of(i)].clone();
            let context = || format!("port {} ({})", pc.name, pc.file.display());
            let started = match &pc.kind {
                PortKind::VhostUser { .. } => {
                    start_vhost_port(pc, id, pmd).with_context(context)?
                }
                PortKind::Dpdk { .. } => pools
                    .pool(pmd_of(i))
                    .and_then(|pool| start_dpdk_port(pc, id, &pmd, pool))
                    .with_context(context)
                    .unwrap_or_else(|e| PortInfo::failed(pc, e)),
                PortKind::Tap { ifname } => start_tap_port(pc, id, &pmd, ifname)
                    .with_context(context)
                    .unwrap_or_else(|e| PortInfo::failed(pc, e)),
            };
            ports.push(started);
        }
        Ok(Switch {
            pmds,
            ports,
            tsc_hz,
        })
    }
}

impl PortInfo {
    fn new(pc: &PortConfig, queues: Vec<Arc<QueueStats>>) -> PortInfo {
        let (kind, endpoint) = match &pc.kind {
            PortKind::VhostUser { socket, .. } => ("vhost-user", socket.display().to_string()),
            PortKind::Dpdk { devargs, .. } => ("dpdk", devargs.clone()),
            PortKind::Tap { ifname } => ("tap", ifname.clone()),
        };
        PortInfo {
            name: pc.name.clone(),
            kind,
            endpoint,
            queues,
            connected: Arc::new(AtomicBool::new(false)),
            dpdk_port: None,
            error: None,
        }
    }

    fn failed(pc: &PortConfig, e: anyhow::Error) -> PortInfo {
        log::error!("{e:#}; the other ports run without it");
        let mut info = PortInfo::new(pc, Vec::new());
        info.error = Some(format!("{e:#}"));
        info
    }
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
    /// Per PMD: mbufs the RX rings and TX rings of its ports can hold.
    need: Vec<u32>,
    frame_room: u32,
    pools: HashMap<usize, Arc<Mempool>>,
}

impl DpdkPools {
    fn new(cfg: &Config, n_pmds: usize) -> DpdkPools {
        let mut need = vec![0u32; n_pmds];
        let mut frame_room = 2048;
        for (i, pc) in cfg.ports.iter().enumerate() {
            if let PortKind::Dpdk {
                mtu,
                rx_desc,
                tx_desc,
                ..
            } = pc.kind
            {
                need[i % n_pmds] += pc.queues as u32 * (rx_desc as u32 + tx_desc as u32);
                // Ethernet header plus one VLAN tag beyond the MTU.
                frame_room = frame_room.max(mtu.unwrap_or(1500) as u32 + 18);
            }
        }
        DpdkPools {
            eal_args: cfg.eal_args.clone(),
            need,
            frame_room,
            pools: HashMap::new(),
        }
    }

    fn pool(&mut self, pmd: usize) -> anyhow::Result<Arc<Mempool>> {
        if let Some(p) = self.pools.get(&pmd) {
            return Ok(p.clone());
        }
        dpdk::eal_init(&self.eal_args)?;
        // Rings full, plus what PMD bursts and per-lcore caches hold; 2^k - 1 suits the ring.
        let n = (self.need[pmd] + 4096).next_power_of_two() - 1;
        let pool = Mempool::new(&format!("rs_pmd{pmd}"), n, self.frame_room)?;
        log::info!(
            "DPDK: mbuf pool for PMD {pmd}: {n} mbufs of {} bytes",
            self.frame_room
        );
        self.pools.insert(pmd, pool.clone());
        Ok(pool)
    }
}

fn start_dpdk_port(
    pc: &PortConfig,
    id: PortId,
    pmd: &PmdHandle,
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
    let mut info = PortInfo::new(pc, queue_stats(pc.queues));
    let from_port = info.queues.iter().skip(1).step_by(2).cloned().collect();
    // One PMD sends on TX queue 0; more PMDs would each take a queue of their own.
    pmd.add_port(EthPortRt::new(
        id,
        dev,
        pc.queues,
        0,
        info.queues[0].clone(),
        from_port,
    ))?;
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
    Ok(info)
}

fn start_tap_port(
    pc: &PortConfig,
    id: PortId,
    pmd: &PmdHandle,
    ifname: &str,
) -> anyhow::Result<PortInfo> {
    let queues = (0..pc.queues)
        .map(|_| Tap::open(ifname))
        .collect::<Result<Vec<_>, _>>()?;
    let info = PortInfo::new(pc, queue_stats(pc.queues));
    pmd.add_port(Box::new(TapPortRt {
        id,
        queues: queues.into_boxed_slice(),
        to_port: info.queues[0].clone(),
        from_port: info.queues.iter().skip(1).step_by(2).cloned().collect(),
    }))?;
    log::info!("port {}: tap {ifname} with {} queue(s)", pc.name, pc.queues);
    info.connected.store(true, Ordering::Relaxed);
    Ok(info)
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

fn start_vhost_port(pc: &PortConfig, id: PortId, pmd: Arc<PmdHandle>) -> anyhow::Result<PortInfo> {
    let PortKind::VhostUser {
        mode,
        socket,
        socket_perm,
    } = &pc.kind
    else {
        anyhow::bail!("not a vhost-user port");
    };
    let info = PortInfo::new(pc, queue_stats(pc.queues));
    pmd.add_port(VhostPortRt::new(id, pc.queues as usize))?;
    let device = Arc::new(Mutex::new(VhostUserDevice::new(
        pc.name.clone(),
        id,
        pmd,
        info.queues.clone(),
    )));
    let listener = match mode {
        VhostMode::Server => Some(bind_socket(socket, *socket_perm)?),
        VhostMode::Client => None,
    };
    let (name, path, flag) = (pc.name.clone(), socket.clone(), info.connected.clone());
    std::thread::Builder::new()
        .name(format!("vhost-{}", pc.name))
        .spawn(move || match listener {
            Some(l) => serve_listener(&name, l, device, &flag),
            None => serve_client(&name, &path, device, &flag),
        })
        .context("spawn port thread")?;
    log::info!(
        "port {}: vhost-user {:?} on {} with {} queue pair(s)",
        pc.name,
        mode,
        socket.display(),
        pc.queues
    );
    Ok(info)
}

/// Bind a server socket, replacing a stale file from a crashed run but never a live socket.
pub fn bind_socket(path: &Path, perm: SocketPerm) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
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

fn serve_listener(
    name: &str,
    l: UnixListener,
    dev: Arc<Mutex<VhostUserDevice>>,
    flag: &AtomicBool,
) {
    for stream in l.incoming() {
        match stream {
            Ok(s) => serve_connection(name, s, &dev, flag),
            Err(e) => {
                log::error!("port {name}: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Client mode: connect to the frontend's socket, and again (with backoff) whenever it goes.
fn serve_client(name: &str, path: &Path, dev: Arc<Mutex<VhostUserDevice>>, flag: &AtomicBool) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                backoff = Duration::from_millis(50);
                serve_connection(name, s, &dev, flag);
            }
            Err(e)
                if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::ConnectionRefused =>
            {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                log::warn!("port {name}: connect {}: {e}", path.display());
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

pub fn serve_connection(
    name: &str,
    s: UnixStream,
    dev: &Arc<Mutex<VhostUserDevice>>,
    flag: &AtomicBool,
) {
    log::info!("port {name}: frontend connected");
    flag.store(true, Ordering::Relaxed);
    let mut h = BackendReqHandler::from_stream(s, dev.clone());
    loop {
        match h.handle_request() {
            Ok(()) => {}
            Err(vhost::vhost_user::Error::Disconnected)
            | Err(vhost::vhost_user::Error::PartialMessage) => {
                log::info!("port {name}: frontend disconnected");
                break;
            }
            Err(e) => {
                log::warn!("port {name}: closing connection: {e}");
                break;
            }
        }
    }
    flag.store(false, Ordering::Relaxed);
    match dev.lock() {
        Ok(mut d) => d.disconnect(),
        Err(p) => p.into_inner().disconnect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
