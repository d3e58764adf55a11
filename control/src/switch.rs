//! The running switch: PMD threads, the ports and their control threads (one per vhost-user
//! port, serving one frontend connection at a time), and the counters `ctl` reads.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use dataplane::pmd::PmdHandle;
use dataplane::port::VhostPortRt;
use dataplane::stats::QueueStats;
use dataplane::{CoreId, PortId};
use vhost::vhost_user::BackendReqHandler;

use crate::config::{Config, PortConfig, PortKind, SocketPerm, VhostMode};
use crate::vhost_user::VhostUserDevice;

/// What `ctl` can see of a port.
pub struct PortInfo {
    pub name: String,
    pub socket: String,
    /// One per virtqueue: even = guest RX, odd = guest TX.
    pub queues: Vec<Arc<QueueStats>>,
    /// A frontend is connected (Relaxed: a display flag, publishes nothing else).
    pub connected: Arc<AtomicBool>,
}

pub struct Switch {
    pub pmds: Vec<Arc<PmdHandle>>,
    pub ports: Vec<PortInfo>,
    pub tsc_hz: u64,
}

impl Switch {
    pub fn start(cfg: &Config) -> anyhow::Result<Switch> {
        let pmds = cfg
            .pmd_cores
            .iter()
            .map(|&c| PmdHandle::spawn(CoreId(c)).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let tsc_hz = dataplane::tsc::hz();
        let mut ports = Vec::new();
        for (i, pc) in cfg.ports.iter().enumerate() {
            let id = PortId(i as u16);
            let pmd = pmds[i % pmds.len()].clone();
            let info = match pc.kind {
                PortKind::VhostUser => start_vhost_port(pc, id, pmd),
            }
            .with_context(|| format!("port {} ({})", pc.name, pc.file.display()))?;
            ports.push(info);
        }
        Ok(Switch {
            pmds,
            ports,
            tsc_hz,
        })
    }
}

fn start_vhost_port(pc: &PortConfig, id: PortId, pmd: Arc<PmdHandle>) -> anyhow::Result<PortInfo> {
    let queues: Vec<Arc<QueueStats>> = (0..pc.queues as usize * 2)
        .map(|_| Arc::new(QueueStats::default()))
        .collect();
    pmd.add_port(VhostPortRt::new(id, pc.queues as usize))?;
    let device = Arc::new(Mutex::new(VhostUserDevice::new(
        pc.name.clone(),
        id,
        pmd,
        queues.clone(),
    )));
    let connected = Arc::new(AtomicBool::new(false));
    let listener = match pc.mode {
        VhostMode::Server => Some(bind_socket(&pc.socket, pc.socket_perm)?),
        VhostMode::Client => None,
    };
    let (name, path, flag) = (pc.name.clone(), pc.socket.clone(), connected.clone());
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
        pc.mode,
        pc.socket.display(),
        pc.queues
    );
    Ok(PortInfo {
        name: pc.name.clone(),
        socket: pc.socket.display().to_string(),
        queues,
        connected,
    })
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
